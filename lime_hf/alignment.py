"""Granularity alignment: character-span annotations (see `annotation.py`) -> one tag id per subword token.

Pure functions on numpy arrays; no spaCy, no tokenizer. Two rules cover both alignment modes:

* **First non-whitespace character.** A token covering characters `[start, end)` takes, in every field, the
  label of the span holding its first non-whitespace character. Whitespace-only tokens (and characters no
  span covers) take the field's whitespace label. Every subword of a word therefore repeats the word's tags,
  `B-`/`I-` entity tags included.
* **Segments** (pretokenized mode). The text is cut at every span boundary of every field, so no segment
  crosses a linguistic-token boundary; a lone space before a segment that starts with a non-whitespace
  character joins it (GPT-2 style `" word"`). Segments are encoded as the "words" of a pretokenized input,
  and each subword takes its segment's tags.

This file is copied next to a saved tokenizer (remote code): it imports only numpy, the standard library and
flat siblings.
"""

from __future__ import annotations

from itertools import chain

import numpy as np

from .configuration_lime import PAD_ID, SPECIAL_ID

# Every code point for which `str.isspace()` holds is at most U+3000: a lookup table beats `np.isin`. Its last
# entry, U+3001, is not a space and stands for every code point above it.
_SPACE_TABLE_SIZE = 0x3002
_IS_SPACE = np.array([chr(code).isspace() for code in range(_SPACE_TABLE_SIZE)], dtype=bool)


def label_to_id_maps(metadata_fields: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """Field -> {label: id}, a label's id being its index in the field's inventory."""
    return {
        field: {label: index for index, label in enumerate(labels)}
        for field, labels in metadata_fields.items()
    }


def code_points(text: str) -> np.ndarray:
    """The code points of `text`, shape `(len(text),)`, dtype uint32 (lone surrogates pass through)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def is_whitespace_code(codes: np.ndarray) -> np.ndarray:
    """Boolean array shaped like `codes`: whether each code point is whitespace (`str.isspace`)."""
    return _IS_SPACE[np.minimum(codes, _SPACE_TABLE_SIZE - 1)]


def is_whitespace(text: str) -> np.ndarray:
    """Boolean array of shape `(len(text),)`: whether each character is whitespace (`str.isspace`)."""
    return is_whitespace_code(code_points(text))


def first_non_whitespace(text: str, offsets: np.ndarray) -> np.ndarray:
    """
    For each token `[start, end)`, the index of its first non-whitespace character, or -1 if it has none.

    Args:
        text (`str`): the text the offsets point into.
        offsets (`np.ndarray` of shape `(num_tokens, 2)`): character offsets `[start, end)` of each token.

    Returns:
        `np.ndarray` of shape `(num_tokens,)`, dtype int64.
    """
    length = len(text)
    positions = np.arange(length + 1, dtype=np.int64)
    positions[:length][is_whitespace(text)] = length
    # next_char[i] = the first non-whitespace position >= i (or `length`): a reversed running minimum.
    next_char = np.minimum.accumulate(positions[::-1])[::-1]
    starts = np.minimum(np.maximum(offsets[:, 0], 0), length)  # np.clip is slow on small arrays
    anchors = next_char[starts]
    return np.where(anchors < offsets[:, 1], anchors, -1)


def span_label_ids(spans: dict[str, list], label_to_id: dict[str, int], field: str) -> np.ndarray:
    """The ids of a field's span labels, shape `(num_spans,)`; a label outside the inventory is an error."""
    try:
        return np.fromiter(
            map(label_to_id.__getitem__, spans["labels"]), dtype=np.int64, count=len(spans["labels"])
        )
    except KeyError as error:
        allowed = [label for label in label_to_id if not label.startswith("<")]
        raise ValueError(
            f"Field {field!r}: the label {error.args[0]!r} is not in the field's inventory. Allowed labels: "
            f"{allowed}. Use an annotator whose labels match the inventory, or extend the inventory."
        ) from None


def tags_at(
    anchors: np.ndarray, spans: dict[str, list], label_to_id: dict[str, int], whitespace_id: int, field: str
) -> np.ndarray:
    """Tag id of the span holding each anchor character; `whitespace_id` where none does or anchor is -1."""
    starts = np.asarray(spans["starts"], dtype=np.int64)
    if len(starts) == 0:
        return np.full(len(anchors), whitespace_id, dtype=np.int64)
    ends = np.asarray(spans["ends"], dtype=np.int64)
    ids = span_label_ids(spans, label_to_id, field)
    # Spans are sorted and disjoint: the candidate is the last span starting at or before the anchor.
    candidate = np.maximum(np.searchsorted(starts, anchors, side="right") - 1, 0)
    covered = (anchors >= starts[candidate]) & (anchors < ends[candidate]) & (anchors >= 0)
    return np.where(covered, ids[candidate], whitespace_id)


def tags_from_offsets(
    annotation: dict[str, dict[str, list]],
    offsets: np.ndarray | list[tuple[int, int]],
    text: str,
    label_to_id: dict[str, dict[str, int]],
    whitespace_labels: dict[str, str],
) -> dict[str, np.ndarray]:
    """
    Tag ids of tokens given by character offsets, by the first-non-whitespace-character rule.

    Args:
        annotation (`Annotation`): the text's spans per field (see `annotation.py`).
        offsets (`np.ndarray` or list of pairs, shape `(num_tokens, 2)`): `[start, end)` of each token in `text`.
        text (`str`): the annotated text.
        label_to_id (`dict[str, dict[str, int]]`): per field, label -> id (see `label_to_id_maps`).
        whitespace_labels (`dict[str, str]`): per field, the label of whitespace-only tokens.

    Returns:
        `dict[str, np.ndarray]`: field -> tag ids of shape `(num_tokens,)`. Special and padding tokens are not
        recognised here (their empty offsets give the whitespace tag); callers overwrite them.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    anchors = first_non_whitespace(text, offsets)
    tags = {}
    for field, label_ids in label_to_id.items():
        if field not in annotation:
            raise ValueError(f"The annotation has no field {field!r}; it has {sorted(annotation)}.")
        whitespace_id = label_ids[whitespace_labels[field]]
        tags[field] = tags_at(anchors, annotation[field], label_ids, whitespace_id, field)
    return tags


def flatten(columns: list[dict[str, list]], key: str) -> list:
    """`columns[0][key] + columns[1][key] + ...` (C-speed `chain`, no per-item Python frames)."""
    return list(chain.from_iterable(spans[key] for spans in columns))


def join_annotations(
    annotations: list[dict[str, dict[str, list]]], lengths: list[int], fields: list[str]
) -> tuple[dict[str, dict[str, np.ndarray | list]], np.ndarray]:
    """
    One annotation of the texts joined end to end, so a whole batch aligns in one vectorised pass.

    Args:
        annotations: one `Annotation` per text.
        lengths: the length of each text.
        fields: the fields to join; each annotation must have them all.

    Returns:
        The joined annotation (each text's spans shifted by the text's start) and the start of every text,
        shape `(num_texts,)`.
    """
    bases = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    joined = {}
    for field in fields:
        missing = [row for row, annotation in enumerate(annotations) if field not in annotation]
        if missing:
            raise ValueError(
                f"The annotation of text {missing[0]} has no field {field!r}; it has {sorted(annotations[missing[0]])}."
            )
        columns = [annotation[field] for annotation in annotations]
        counts = [len(spans["starts"]) for spans in columns]
        starts, ends = (np.array(flatten(columns, key), dtype=np.int64) for key in ("starts", "ends"))
        outside = np.flatnonzero((starts < 0) | (starts > ends) | (ends > np.repeat(np.diff(bases), counts)))
        if len(outside):
            row, span = int(np.searchsorted(np.cumsum(counts), outside[0], side="right")), outside[0]
            raise ValueError(
                f"Field {field!r}: the span [{int(starts[span])}, {int(ends[span])}) of text {row} does not lie "
                f"within the text's {lengths[row]} characters. Spans must be `start <= end` inside their text."
            )
        shift = np.repeat(bases[:-1], counts)
        joined[field] = {"starts": starts + shift, "ends": ends + shift, "labels": flatten(columns, "labels")}
    return joined, bases[:-1]


def segment_offsets(annotation: dict[str, dict[str, list]], text: str) -> np.ndarray:
    """
    Cut `text` at every span boundary of every field; a lone space joins the non-whitespace segment after it.

    Returns:
        `np.ndarray` of shape `(num_segments, 2)`: `[start, end)` of consecutive segments that together cover
        `text` exactly (no segment for an empty text).
    """
    joined, bases = join_annotations([annotation], [len(text)], list(annotation))
    return batch_segment_offsets(joined, bases, text)[0]


def batch_segment_offsets(
    annotation: dict[str, dict[str, np.ndarray | list]], bases: np.ndarray, text: str
) -> list[np.ndarray]:
    """
    `segment_offsets` of every text of a batch in one pass: `text` and `annotation` are the batch joined end
    to end (see `join_annotations`), `bases` the start of each text. Segments never cross from one text into
    the next. Returns each text's segments, shape `(num_segments, 2)`, in that text's own coordinates.
    """
    boundaries = np.append(bases, len(text))
    cuts = np.sort(
        np.concatenate(
            [boundaries, *(spans[key] for spans in annotation.values() for key in ("starts", "ends"))]
        )
    )
    # Deduplicate the sorted array by hand: numpy 2.4's hash-based `np.unique` is ~20x slower here.
    cuts = cuts[np.concatenate(([True], cuts[1:] != cuts[:-1]))]
    if len(cuts) > 2:
        inner, previous = cuts[1:-1], cuts[:-2]
        codes = code_points(text)
        lone_space = (inner - previous == 1) & (codes[inner - 1] == ord(" "))
        joins = lone_space & ~is_whitespace_code(codes[inner]) & ~np.isin(inner, boundaries)
        cuts = np.delete(cuts, 1 + np.flatnonzero(joins))
    starts = cuts[:-1]
    segments = np.split(np.stack([starts, cuts[1:]], axis=1), np.searchsorted(starts, bases[1:]))
    return [text_segments - base for text_segments, base in zip(segments, bases, strict=True)]


def fill_reserved(tags: np.ndarray, is_special: np.ndarray, is_padding: np.ndarray) -> np.ndarray:
    """Set special-token positions to `SPECIAL_ID` and padding positions to `PAD_ID` (boolean masks)."""
    return np.where(is_padding, PAD_ID, np.where(is_special, SPECIAL_ID, tags))


__all__ = [
    "fill_reserved",
    "first_non_whitespace",
    "join_annotations",
    "label_to_id_maps",
    "batch_segment_offsets",
    "segment_offsets",
    "tags_from_offsets",
]
