"""Datasets pipeline: annotate once with spaCy, align many times to any tokenizer, pack for pretraining.

`annotate_dataset` stores each field's character spans in an Arrow column `lime_{field}` (a struct of
`starts`/`ends`/`labels` lists, the `Annotation` format of `annotation.py`); causal (prefix-only) annotation also
adds the column `lime_causal`, `True` in every row, so the dataset says how its labels were made (a dataset
without it holds full-document labels). `align_dataset` turns those
spans into `input_ids`/`attention_mask`/`{field}_ids` for a `LimeTokenizer` without running spaCy again.
Both are `datasets.map(batched=True)` calls: they run with `num_proc=N` (each process loads spaCy lazily),
show progress bars and resume from the datasets cache, as their functions hash deterministically.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from datasets import Dataset, Features, List, Value

from .annotation import FieldAnnotator, SpacyAnnotator
from .configuration_lime import SPECIAL_ID

ANNOTATION_PREFIX = "lime_"
CAUSAL_COLUMN = ANNOTATION_PREFIX + "causal"
SPANS_FEATURE = {
    "starts": List(Value("int32")),
    "ends": List(Value("int32")),
    "labels": List(Value("string")),
}


def annotation_columns(fields: Sequence[str], causal: bool = False) -> dict[str, Any]:
    """The columns annotation adds: `lime_{field}` spans per field, and the `lime_causal` marker if `causal`."""
    if causal and CAUSAL_COLUMN in [ANNOTATION_PREFIX + name for name in fields]:
        raise ValueError(
            f"A field named {CAUSAL_COLUMN[len(ANNOTATION_PREFIX) :]!r} would clash with the column {CAUSAL_COLUMN!r}."
        )
    columns: dict[str, Any] = {ANNOTATION_PREFIX + name: SPANS_FEATURE for name in fields}
    if causal:
        columns[CAUSAL_COLUMN] = Value("bool")
    return columns


class _Annotate:
    """Picklable `map` function: a batch of texts -> one spans column per field."""

    def __init__(self, annotator: SpacyAnnotator, text_column: str):
        self.annotator = annotator
        self.text_column = text_column

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        annotations = self.annotator(batch[self.text_column])
        columns = {
            ANNOTATION_PREFIX + field.name: [annotation[field.name] for annotation in annotations]
            for field in self.annotator.fields
        }
        if self.annotator.causal:
            columns[CAUSAL_COLUMN] = [True] * len(annotations)
        return columns


class _Align:
    """Picklable `map` function: texts + stored spans -> tokenizer outputs, no spaCy."""

    def __init__(self, tokenizer: Any, text_column: str, tokenizer_kwargs: dict[str, Any]):
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.tokenizer_kwargs = tokenizer_kwargs

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = batch[self.text_column]
        columns = {name: batch[ANNOTATION_PREFIX + name] for name in self.tokenizer.metadata_fields}
        annotations = [{name: spans[row] for name, spans in columns.items()} for row in range(len(texts))]
        return dict(self.tokenizer(texts, annotations=annotations, **self.tokenizer_kwargs))


def annotate_dataset(
    dataset: Dataset,
    annotator: SpacyAnnotator | None = None,
    text_column: str = "text",
    fields: Sequence[str | FieldAnnotator] = ("pos", "ner"),
    spacy_model: str | None = None,
    batch_size: int = 256,
    num_proc: int | None = None,
    causal: bool = False,
    **map_kwargs,
) -> Dataset:
    """
    Annotate `dataset[text_column]` once; adds a spans column `lime_{field}` per field.

    Args:
        dataset (`datasets.Dataset`): the corpus.
        annotator (`SpacyAnnotator`, *optional*): defaults to `SpacyAnnotator(fields, spacy_model, causal=causal)`.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding raw text.
        fields, spacy_model: used only when `annotator` is not given.
        batch_size (`int`, *optional*, defaults to 256): texts per `map` batch.
        num_proc (`int`, *optional*): worker processes; each loads its own spaCy pipeline.
        causal (`bool`, *optional*, defaults to `False`): prefix-only labels (`SpacyAnnotator(causal=True)`:
            each span labeled from the text up to its end, as a left-to-right model sees it); adds the column
            `lime_causal`. With `annotator`, the annotator's own `causal` decides and this must not contradict it.
        map_kwargs: further `Dataset.map` arguments (`cache_file_name`, `load_from_cache_file`, ...).
    """
    if annotator is None:
        annotator = SpacyAnnotator(fields, spacy_model=spacy_model, causal=causal)
    elif causal and not annotator.causal:
        raise ValueError(
            "`causal=True` but the given annotator is not causal: pass `SpacyAnnotator(causal=True)`."
        )
    check_column(dataset, text_column)
    columns = annotation_columns([field.name for field in annotator.fields], annotator.causal)
    features = Features({**dataset.features, **columns})
    return dataset.map(
        _Annotate(annotator, text_column),
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        features=features,
        desc="Annotating with spaCy" + (" (causal)" if annotator.causal else ""),
        **map_kwargs,
    )


def align_dataset(
    dataset: Dataset,
    tokenizer: Any,
    text_column: str = "text",
    keep_columns: bool = False,
    batch_size: int = 1000,
    num_proc: int | None = None,
    map_kwargs: dict[str, Any] | None = None,
    **tokenizer_kwargs,
) -> Dataset:
    """
    Tokenize an annotated dataset with a `LimeTokenizer`, aligning the stored spans (spaCy does not run).

    Args:
        dataset (`datasets.Dataset`): output of `annotate_dataset`, with a `lime_{field}` column for each of the
            tokenizer's metadata fields.
        tokenizer (`LimeTokenizer`): any alignment mode, any wrapped tokenizer.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding raw text.
        keep_columns (`bool`, *optional*, defaults to `False`): keep the input columns next to the outputs.
        batch_size (`int`, *optional*, defaults to 1000): texts per `map` batch.
        num_proc (`int`, *optional*): worker processes.
        map_kwargs (`dict`, *optional*): further `Dataset.map` arguments.
        tokenizer_kwargs: passed to the tokenizer call (`truncation`, `max_length`, `add_special_tokens`, ...).

    Returns:
        `datasets.Dataset` with `input_ids`, `attention_mask` and `{field}_ids` per row.
    """
    check_column(dataset, text_column)
    for name in tokenizer.metadata_fields:
        check_column(dataset, ANNOTATION_PREFIX + name, hint="run `annotate_dataset` with this field first")
    align = _Align(tokenizer, text_column, tokenizer_kwargs)
    map_kwargs = dict(map_kwargs or {})
    features = map_kwargs.pop("features", None)
    if features is None and len(dataset):
        features = output_features(align(dataset[:1]).keys())
    if features is not None and keep_columns:
        features = Features({**dataset.features, **features})
    return dataset.map(
        align,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=None if keep_columns else dataset.column_names,
        features=features,
        desc="Aligning metadata to tokens",
        **map_kwargs,
    )


def output_features(columns: Iterable[str]) -> Features | None:
    """Compact Arrow types of tokenizer outputs (declaring them also spares datasets its type inference);
    `None` where a column is not a known tokenizer output."""
    features = {}
    for column in columns:
        if column == "input_ids" or column.endswith("_ids"):
            features[column] = List(Value("int32"))
        elif column in ("attention_mask", "special_tokens_mask", "token_type_ids"):
            features[column] = List(Value("int8"))
        elif column == "offset_mapping":
            features[column] = List(List(Value("int64")))
        elif column in ("overflow_to_sample_mapping", "length"):
            features[column] = Value("int64")
        else:
            return None
    return Features(features)


class _Pack:
    """Picklable `map` function: concatenate documents (EOS after each) and cut `block_size` blocks."""

    def __init__(self, block_size: int, eos_token_id: int, columns: list[str], drop_last: bool):
        self.block_size = block_size
        self.eos_token_id = eos_token_id
        self.columns = columns
        self.drop_last = drop_last

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        stream: dict[str, list[int]] = {column: [] for column in self.columns}
        for row in range(len(batch["input_ids"])):
            keep = batch["attention_mask"][row] if "attention_mask" in batch else None
            values = {column: batch[column][row] for column in self.columns}
            if keep is not None and 0 in keep:  # padding is not text: leave it out of the stream
                values = {
                    column: [v for v, m in zip(seq, keep, strict=True) if m] for column, seq in values.items()
                }
            for column, sequence in values.items():
                stream[column].extend(sequence)
            if not values["input_ids"] or values["input_ids"][-1] != self.eos_token_id:
                for column in self.columns:
                    stream[column].append(self.eos_token_id if column == "input_ids" else SPECIAL_ID)
        total = len(stream["input_ids"])
        if self.drop_last:
            total -= total % self.block_size
        blocks = {
            column: [values[start : start + self.block_size] for start in range(0, total, self.block_size)]
            for column, values in stream.items()
        }
        blocks["attention_mask"] = [[1] * len(block) for block in blocks["input_ids"]]
        return blocks


def pack_dataset(
    dataset: Dataset,
    block_size: int,
    eos_token_id: int,
    drop_last: bool = False,
    batch_size: int = 1000,
    num_proc: int | None = None,
    **map_kwargs,
) -> Dataset:
    """
    Pack tokenized documents into blocks of `block_size` tokens for pretraining, carrying every field along.

    Documents are concatenated with `eos_token_id` after each one (unless it already ends with it); the EOS
    gets the special tag (id 2) in every field. Positions with `attention_mask == 0` (padding) are dropped.

    Args:
        dataset (`datasets.Dataset`): rows with `input_ids` and `{field}_ids` (e.g. from `align_dataset`).
        block_size (`int`): tokens per block.
        eos_token_id (`int`): the document separator, e.g. `tokenizer.eos_token_id`.
        drop_last (`bool`, *optional*, defaults to `False`): drop the shorter last block of each `map` batch
            (by default it is kept, so no token is lost; the collator pads it).
        batch_size (`int`, *optional*, defaults to 1000): documents per `map` batch; blocks never span batches.
        num_proc (`int`, *optional*): worker processes.

    Returns:
        `datasets.Dataset` with `input_ids`, `attention_mask` and `{field}_ids`, each of length `block_size`
        (the last block of a batch may be shorter unless `drop_last`).
    """
    if block_size < 1:
        raise ValueError(f"`block_size` must be a positive number of tokens, got {block_size}.")
    check_column(dataset, "input_ids")
    columns = ["input_ids", *(c for c in dataset.column_names if c.endswith("_ids") and c != "input_ids")]
    return dataset.map(
        _Pack(block_size, eos_token_id, columns, drop_last),
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        desc=f"Packing into blocks of {block_size}",
        **map_kwargs,
    )


def check_column(dataset: Dataset, column: str, hint: str = "") -> None:
    """Raise a clear error when `column` is missing from `dataset`."""
    if column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no column {column!r}"
            + (f" ({hint})" if hint else "")
            + f"; it has {dataset.column_names}."
        )


__all__ = ["align_dataset", "annotate_dataset", "pack_dataset"]
