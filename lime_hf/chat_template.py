"""Chat templates with metadata: where each message's text lies in a rendered chat, and spans kept whole.

`LimeTokenizer.apply_chat_template` renders a chat with the template as the base tokenizer does, then finds each
message's text in the rendered string. Every message is annotated on its own (no tag crosses a message boundary);
everything else is the template's own text (role markers, special tokens, separators), tagged "special".

Pure functions on strings and numpy arrays. This file is copied next to a saved tokenizer (remote code): it imports
only numpy, the standard library and flat siblings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Span = tuple[int, int]


def message_texts(message: Any) -> list[str]:
    """The texts a message holds: its `content` string, or the `text` of each text block of a content list."""
    content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
    if isinstance(content, str):
        return [content] if content else []
    if isinstance(content, (list, tuple)):
        return [block["text"] for block in content if isinstance(block, dict) and block.get("text")]
    return []


def locate_messages(rendered: str, messages: Iterable[Any]) -> list[Span]:
    """
    The `[start, end)` span of each message text in `rendered`, in order of the messages.

    Each text is searched after the previous one, as written or trimmed (templates often `| trim` the content);
    a text the template does not write verbatim is an error, since its tokens could not get its tags.
    """
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        for text in message_texts(message):
            for candidate in dict.fromkeys((text, text.strip(), text.rstrip(), text.lstrip())):
                start = rendered.find(candidate, cursor) if candidate else -1
                if start >= 0:
                    break
            else:
                role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
                raise ValueError(
                    f"The chat template does not write the text of message {index} (role {role!r}) as given, so "
                    f"its tokens cannot get its tags: {text[:60]!r}. LimeTokenizer.apply_chat_template needs a "
                    "template that writes each message's content verbatim (trimming is fine)."
                )
            spans.append((start, start + len(candidate)))
            cursor = start + len(candidate)
    return spans


def complement(spans: Sequence[Span], length: int) -> list[Span]:
    """The non-empty gaps between sorted, disjoint `spans` within `[0, length)`."""
    gaps, cursor = [], 0
    for start, end in [*spans, (length, length)]:
        if start > cursor:
            gaps.append((cursor, start))
        cursor = max(cursor, end)
    return gaps


def place_annotations(
    annotations: Sequence[dict[str, dict[str, list]]], starts: Sequence[int], fields: Sequence[str]
) -> dict[str, dict[str, list]]:
    """One annotation of a rendered chat from the annotations of its message texts, each shifted to its start."""
    placed = {}
    for field in fields:
        placed[field] = {
            "starts": [
                start + offset
                for annotation, start in zip(annotations, starts, strict=True)
                for offset in annotation[field]["starts"]
            ],
            "ends": [
                start + offset
                for annotation, start in zip(annotations, starts, strict=True)
                for offset in annotation[field]["ends"]
            ],
            "labels": [label for annotation in annotations for label in annotation[field]["labels"]],
        }
    return placed


def added_token_pattern(added_tokens: Iterable[Any], split_special_tokens: bool) -> re.Pattern | None:
    """
    A regex matching the added tokens the backend extracts from text (every added token; the special ones only
    unless `split_special_tokens`), longest first, with the whitespace an `lstrip`/`rstrip` token absorbs.
    """
    tokens = [
        token for token in added_tokens if token.content and not (split_special_tokens and token.special)
    ]
    if not tokens:
        return None
    alternatives = [
        (r"\s*" if token.lstrip else "") + re.escape(token.content) + (r"\s*" if token.rstrip else "")
        for token in sorted(tokens, key=lambda token: len(token.content), reverse=True)
    ]
    return re.compile("|".join(alternatives))


def keep_whole(segments: np.ndarray, whole: Sequence[Span], length: int) -> np.ndarray:
    """
    Re-cut consecutive `segments` (shape `(n, 2)`, covering `[0, length)`) so that every span of `whole` is cut at
    both ends and nothing inside it is cut: each whole span (or union of overlapping ones) is one segment.
    """
    if not whole:
        return segments
    whole = np.asarray(whole, dtype=np.int64).reshape(-1, 2)
    cuts = np.unique(np.concatenate([segments[:, 0], [0, length], whole.ravel()]))
    inside = ((cuts[:, None] > whole[:, 0]) & (cuts[:, None] < whole[:, 1])).any(axis=1)
    cuts = cuts[~inside]
    return np.stack([cuts[:-1], cuts[1:]], axis=1)


def assistant_mask(
    offsets: Sequence[Span], generation_spans: Sequence[Span], attention_mask: Sequence[int]
) -> list[int]:
    """1 for each (non-padding) token overlapping a `{% generation %}` span, as `apply_chat_template` marks it."""
    return [
        int(
            bool(keep)
            and any(start < span_end and end > span_start for span_start, span_end in generation_spans)
        )
        for (start, end), keep in zip(offsets, attention_mask, strict=True)
    ]


__all__ = [
    "added_token_pattern",
    "assistant_mask",
    "complement",
    "keep_whole",
    "locate_messages",
    "place_annotations",
]
