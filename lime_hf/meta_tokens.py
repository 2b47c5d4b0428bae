"""Where meta-tokens go: in training data (`inject_meta_tokens`), in prompts (`place_meta_tokens`) and in generated
text (`MetaTokenPlacement`).

A model reads meta-tokens with its meta-attention (`LimeConfig(meta_token_ids=[...])`, see `meta_attention.py`);
these helpers only decide their positions (pure torch, not a Hub file). `add_meta_tokens` makes them special
tokens of a tokenizer. Training data gets them at uniformly random positions (the paper's k = 0.1), or at a fixed
stride. Every stride follows the same convention, so that a prompt placed with `every=N` and generation with
`MetaTokenPlacement(every=N)` continue one pattern: every `N` ordinary tokens are followed by a meta-token, i.e.
position `p` (from 0) holds one iff `(p + 1) % (N + 1) == 0`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from .configuration_lime import PAD_ID, SPECIAL_ID
from .tag_heads import IGNORE_INDEX


def _check_placement(meta_token_id: int, every: int | None, positions, policy=None) -> list[int] | None:
    """Raise on a bad placement; return `positions` as a list (a generator is read once, here)."""
    check_meta_token_id(meta_token_id)
    given = [
        name
        for name, value in (("every", every), ("positions", positions), ("policy", policy))
        if value is not None
    ]
    if len(given) != 1:
        allowed = (
            "`every`, `positions` or `policy`"
            if policy is not None or positions is not None
            else "`every` or `positions`"
        )
        raise ValueError(f"Give exactly one of {allowed} to place meta-tokens; got {given or 'none'}.")
    check_every(every)
    if positions is None:
        return None
    positions = list(positions)
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in positions):
        raise ValueError(f"`positions` must be integer positions >= 0, got {positions!r}.")
    if len(set(positions)) != len(positions):
        raise ValueError(f"`positions` must be distinct (one meta-token per position), got {positions!r}.")
    return positions


class MetaTokenPlacement(LogitsProcessor):
    """Force a meta-token at chosen positions of the generated text, and forbid it everywhere else.

    A position is the index the next token takes in its row of `sequences`, counted without the row's left padding
    when `attention_mask` is given (as `place_meta_tokens` counts), so that a stride placed in the prompts goes on
    in every row; without it, prompt padding included. `policy` decides per row.

    Args:
        meta_token_id: the meta-token to place (one of the model's `config.meta_token_ids`).
        every: a meta-token after every `every` ordinary tokens: at positions `p` with `(p + 1) % (every + 1) == 0`.
        positions: the positions that take a meta-token.
        policy: a callable `(input_ids_row) -> bool`: whether the row's next token is a meta-token.
        attention_mask: `(batch, prompt_len)` the prompts' mask given to `generate` (left padding, 0 there);
            the rows of beams and `num_return_sequences` take their prompt's: a LIME model's `generate` binds the
            placement to its record of which prompt each row grew from (`for_rows`).

    Example: `model.generate(**prompt, logits_processor=[MetaTokenPlacement(meta_id, every=4,
    attention_mask=prompt["attention_mask"])])`, with `prompt = place_meta_tokens(ids, meta_id, every=4)`.
    """

    def __init__(
        self,
        meta_token_id: int,
        every: int | None = None,
        positions: Sequence[int] | None = None,
        policy: Callable[[torch.LongTensor], bool] | None = None,
        attention_mask: torch.Tensor | None = None,
    ):
        positions = _check_placement(meta_token_id, every, positions, policy)
        self.meta_token_id = meta_token_id
        self.every = every
        self.positions = None if positions is None else frozenset(positions)
        self.policy = policy
        # Each prompt's left padding, subtracted from the sequence index (nothing when no row is padded).
        padding = None if attention_mask is None else (attention_mask == 0).sum(dim=1)
        self.padding = padding if padding is not None and bool(padding.any()) else None
        self.record = None  # `metadata_tracker.RowRecord`: the prompt of each row, set by `for_rows`

    def for_rows(self, record) -> MetaTokenPlacement:
        """A copy of this placement reading each row's prompt from `record` (a `metadata_tracker.RowRecord`, which a LIME
        model's `generate` fills at every step); the placement given stays as it was, for other calls."""
        bound = copy.copy(self)
        bound.record = record
        return bound

    def forced(self, input_ids: torch.LongTensor) -> bool | torch.BoolTensor:
        """Whether the next token is the meta-token: one answer for every row (`every`, `positions` on unpadded
        prompts), or `(batch,)` answers (`policy`, or rows with their own padding)."""
        if self.policy is not None:
            return torch.tensor([bool(self.policy(row)) for row in input_ids], device=input_ids.device)
        if self.padding is None:
            position = input_ids.shape[1]
            return (
                (position + 1) % (self.every + 1) == 0
                if self.every is not None
                else position in self.positions
            )
        prompts = self._prompts(input_ids.shape[0]).to(input_ids.device)
        position = input_ids.shape[1] - self.padding.to(input_ids.device)[prompts]
        if self.every is not None:
            return (position + 1) % (self.every + 1) == 0
        return torch.tensor([int(p) in self.positions for p in position], device=input_ids.device)

    def _prompts(self, rows: int) -> torch.LongTensor:
        """`(rows,)` the prompt of each row: as recorded by `generate`, else each row its own prompt."""
        prompts = self.padding.shape[0]
        origins = self.record.rows if self.record is not None else None
        if origins is None and rows == prompts:
            return torch.arange(rows)
        if origins is None or len(origins) != rows or int(origins.max()) >= prompts:
            raise ValueError(
                f"`attention_mask` has {prompts} prompt rows, and generation has {rows} rows: give the mask of "
                "the prompts passed to `generate` (a LIME model's `generate` says which prompt each row of beams "
                "and `num_return_sequences` grew from; called outside it, the rows must be the prompts)."
            )
        return origins

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.meta_token_id >= scores.shape[-1]:
            raise ValueError(
                f"Meta-token id {self.meta_token_id} is outside the model's vocabulary of {scores.shape[-1]} tokens."
            )
        forced = self.forced(input_ids)
        if isinstance(forced, bool):  # the same for every row: two small ops per step
            processed = torch.full_like(scores, float("-inf")) if forced else scores.clone()
            processed[:, self.meta_token_id] = 0.0 if forced else float("-inf")
            return processed
        is_meta = torch.arange(scores.shape[-1], device=scores.device) == self.meta_token_id
        only_meta = torch.where(is_meta, 0.0, float("-inf")).to(scores.dtype)
        return torch.where(forced[:, None], only_meta, scores.masked_fill(is_meta, float("-inf")))


def place_meta_tokens(
    input_ids: torch.LongTensor,
    meta_token_id: int,
    every: int | None = None,
    positions: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    metadata_ids: dict[str, torch.LongTensor] | None = None,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Insert meta-tokens into prompts.

    Args:
        input_ids: `(batch, seq)` prompts, padded on either side (`attention_mask` says where).
        meta_token_id: the meta-token to insert.
        every: a meta-token after every `every` ordinary tokens (and before the next one), counted over each row's
            tokens without padding.
        positions: the positions the meta-tokens take in each row's new sequence (without padding); a position
            may be at most the row's new length so far (the end).
        attention_mask: `(batch, seq)`, 1 for tokens, 0 for padding; all ones if not given.
        metadata_ids: `{"<field>_ids": (batch, seq)}` the prompts' tags, as `LimeTokenizer` returns them; meta
            positions get the tag 'special' (id 2).
        pad_token_id: the id of the padding the new batch is left-padded with.

    Returns:
        `{"input_ids", "attention_mask", **metadata_ids}`, left-padded (as `generate` wants), ready for
        `model.generate(**placed)`.
    """
    positions = _check_placement(meta_token_id, every, positions)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    metadata_ids = metadata_ids or {}
    rows = []
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        tokens = input_ids[row][keep].tolist()
        tags = {name: ids[row][keep].tolist() for name, ids in metadata_ids.items()}
        meta = [False] * len(tokens)
        if every is not None:
            slots = range(
                len(tokens) - 1 - (len(tokens) - 1) % every, 0, -every
            )  # after every `every` tokens
            for slot in slots:
                tokens.insert(slot, meta_token_id)
                meta.insert(slot, True)
        else:
            for position in sorted(positions):
                if position > len(tokens):
                    raise ValueError(
                        f"Meta-token position {position} is beyond row {row}, which has {len(tokens)} tokens "
                        "(without padding) at that point."
                    )
                tokens.insert(position, meta_token_id)
                meta.insert(position, True)
        rows.append((tokens, meta, tags))
    length = max(len(tokens) for tokens, _, _ in rows)
    placed = {
        "input_ids": torch.full((len(rows), length), pad_token_id, dtype=input_ids.dtype),
        "attention_mask": torch.zeros((len(rows), length), dtype=attention_mask.dtype),
    }
    placed.update(
        {name: torch.full((len(rows), length), PAD_ID, dtype=ids.dtype) for name, ids in metadata_ids.items()}
    )
    for row, (tokens, meta, tags) in enumerate(rows):
        start = length - len(tokens)
        placed["input_ids"][row, start:] = torch.tensor(tokens, dtype=input_ids.dtype)
        placed["attention_mask"][row, start:] = 1
        for name, values in tags.items():
            for index, is_meta in enumerate(meta):  # the original tags, in order, around the meta-tokens
                if is_meta:
                    values.insert(index, SPECIAL_ID)
            placed[name][row, start:] = torch.tensor(values, dtype=placed[name].dtype)
    return {name: tensor.to(input_ids.device) for name, tensor in placed.items()}


def add_meta_tokens(tokenizer: Any, tokens: Sequence[str] = ("<meta>",)) -> list[int]:
    """
    Register `tokens` as special tokens of `tokenizer` (kept with its existing extra special tokens) and return
    their ids, for `LimeConfig(meta_token_ids=...)`.

    A LimeTokenizer then tags them 'special' (id 2) in every field, `decode(..., skip_special_tokens=True)`
    drops them, and they are saved with the tokenizer. Grow the model's vocabulary to match with
    `model.resize_token_embeddings(len(tokenizer))` when the ids are new.
    """
    tokenizer.add_special_tokens({"extra_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(list(tokens))


def check_meta_token_id(meta_token_id: int, vocab_size: int | None = None) -> None:
    """Raise `ValueError` unless `meta_token_id` is a token id (in `[0, vocab_size)` when the size is known)."""
    if isinstance(meta_token_id, bool) or not isinstance(meta_token_id, int) or meta_token_id < 0:
        raise ValueError(f"`meta_token_id` must be a token id (an integer >= 0), got {meta_token_id!r}.")
    if vocab_size is not None and meta_token_id >= vocab_size:
        raise ValueError(
            f"`meta_token_id` {meta_token_id} is outside the vocabulary of {vocab_size} ids (allowed: 0 to "
            f"{vocab_size - 1}); add the meta-token to the tokenizer first (`add_meta_tokens(tokenizer)`)."
        )


def check_meta_fraction(fraction: float, name: str = "fraction") -> None:
    """Raise `ValueError` unless `fraction` (meta-tokens per token) lies in `[0, 1)`."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"`{name}` (meta-tokens per token) must lie in [0, 1), got {fraction!r}.")


def check_every(every: int | None) -> None:
    """Raise `ValueError` unless `every` (ordinary tokens between meta-tokens) is `None` or an integer >= 1."""
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(
            f"`every` is the number of ordinary tokens between meta-tokens: an integer >= 1, got {every!r}."
        )


def meta_token_count(length: int, fraction: float) -> int:
    """The number of meta-tokens injected into `length` tokens: `fraction * length` rounded half up."""
    return math.floor(fraction * length + 0.5)


def inject_meta_tokens(
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    meta_token_id: int,
    fraction: float = 0.1,
    seed: int | None = None,
    labels: torch.Tensor | Sequence | None = None,
    attention_mask: torch.Tensor | Sequence | None = None,
    metadata: Mapping[str, torch.Tensor | Sequence] | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    every: int | None = None,
) -> dict[str, torch.Tensor]:
    """
    Insert meta-tokens at uniformly random positions of each row (or at a fixed stride), for pretraining with
    meta-tokens.

    A row of `n` real tokens (`attention_mask` 1; all of them without a mask) gets `m = meta_token_count(n,
    fraction)` meta-tokens: its `n + m` output positions hold the meta-tokens at `m` of them drawn uniformly
    without replacement (every arrangement equally likely; the tokens keep their order). With `every=N`
    instead (the fixed-stride placement), one meta-token follows every `N` tokens: `m = n // N`. Nothing is dropped:
    the output is longer than the input, `(length + max m,)`, so to train on blocks of `L` tokens, pack blocks
    of `L'` tokens with `L' + meta_token_count(L', fraction) = L`. Rows of a batch may be padded on either side
    (real tokens contiguous); a row that grows less than the longest gets more padding on its padding side
    (its own pad id, mask 0, labels -100, tags 0).

    At meta positions `attention_mask` is 1, `labels` -100 (never a target) and every `{field}_ids` of
    `metadata` the special tag (2).

    Args:
        input_ids: `(length,)` or `(batch_size, length)` token ids (tensor or lists).
        meta_token_id (`int`): the meta-token's id.
        fraction (`float`, *optional*, defaults to 0.1): meta-tokens per real token, in `[0, 1)` (the paper's k).
        seed (`int`, *optional*): seeds the positions (same seed, same output); ignored if `generator` is given.
        labels, attention_mask: optional, the shape of `input_ids`.
        metadata (`dict[str, ...]`, *optional*): `{field}_ids` -> tag ids, the shape of `input_ids`.
        generator (`torch.Generator`, *optional*): draws the positions (e.g. one generator for a whole epoch).
        vocab_size (`int`, *optional*): when given, `meta_token_id` must be below it.
        every (`int`, *optional*): a fixed stride instead of random positions (`fraction` and the seed unused).

    Returns:
        `dict[str, torch.LongTensor]`: `input_ids`, `attention_mask`, `labels` (if given) and the `metadata`
        columns, each `(length + m,)` or `(batch_size, length + max m)`.
    """
    check_meta_fraction(fraction)
    check_meta_token_id(meta_token_id, vocab_size)
    check_every(every)
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() not in (1, 2):
        raise ValueError(
            f"`input_ids` must be (length,) or (batch_size, length), got shape {tuple(ids.shape)}."
        )
    columns = {"input_ids": ids}
    if attention_mask is not None:
        columns["attention_mask"] = torch.as_tensor(attention_mask, dtype=torch.long)
    if labels is not None:
        columns["labels"] = torch.as_tensor(labels, dtype=torch.long)
    columns.update({key: torch.as_tensor(value, dtype=torch.long) for key, value in (metadata or {}).items()})
    for key, value in columns.items():
        if value.shape != ids.shape:
            raise ValueError(
                f"`{key}` has shape {tuple(value.shape)}, but `input_ids` has {tuple(ids.shape)}."
            )
    mask = columns.pop("attention_mask", torch.ones_like(ids))
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)

    batched = ids.dim() == 2
    rows = (
        [{key: value[row] for key, value in columns.items()} for row in range(len(ids))]
        if batched
        else [columns]
    )
    masks = list(mask) if batched else [mask]
    grown = [
        grow_row(row, row_mask, meta_token_id, fraction, generator, every)
        for row, row_mask in zip(rows, masks, strict=True)
    ]
    width = max(count for _, count in grown)
    out = {key: [] for key in ("input_ids", "attention_mask", *columns)}
    for row, (parts, count), row_mask in zip(rows, grown, masks, strict=True):
        left_padded = len(row_mask) > 0 and row_mask[0] == 0 and row_mask[-1] == 1
        # A row that grew less than the longest gets more of its own padding; it has padding since it is shorter.
        pad_id = int(row["input_ids"][row_mask == 0][0]) if count < width else 0
        for key, (before, inner, after) in parts.items():
            fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}.get(key, PAD_ID)  # PAD_ID == mask 0
            extra = torch.full((width - count,), fill, dtype=torch.long)
            out[key].append(
                torch.cat((extra, before, inner, after) if left_padded else (before, inner, after, extra))
            )
    return {key: torch.stack(values) if batched else values[0] for key, values in out.items()}


def grow_row(
    row: dict[str, torch.Tensor],
    row_mask: torch.Tensor,
    meta_token_id: int,
    fraction: float,
    generator: torch.Generator | None,
    every: int | None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int]:
    """One row's columns as (padding before, real tokens with meta-tokens inserted, padding after), and `m`."""
    start, end = real_span(row_mask)
    count = meta_token_count(end - start, fraction) if every is None else (end - start) // every
    is_meta = torch.zeros(end - start + count, dtype=torch.bool)
    if every is None:
        is_meta[torch.randperm(len(is_meta), generator=generator)[:count]] = True
    else:
        is_meta[every :: every + 1] = True
    meta_fill = {"input_ids": meta_token_id, "labels": IGNORE_INDEX, "attention_mask": 1}
    parts = {}
    for key, value in {**row, "attention_mask": row_mask}.items():
        inner = torch.full((len(is_meta),), meta_fill.get(key, SPECIAL_ID), dtype=torch.long)
        inner[~is_meta] = value[start:end]
        parts[key] = (value[:start], inner, value[end:])
    return parts, count


def real_span(attention_mask: torch.Tensor) -> tuple[int, int]:
    """`(start, end)` of the row's real tokens; `ValueError` unless they are one run (padding on one side)."""
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(f"`attention_mask` must hold 0 and 1 only, got {attention_mask.unique().tolist()}.")
    count = int(attention_mask.sum())
    start = int(attention_mask.argmax()) if count else 0
    if not bool(attention_mask[start : start + count].all()):
        raise ValueError(
            "The real tokens (attention_mask 1) of a row must be contiguous, with padding on one side; got "
            f"{attention_mask.tolist()}."
        )
    return start, start + count


__all__ = [
    "MetaTokenPlacement",
    "add_meta_tokens",
    "inject_meta_tokens",
    "meta_token_count",
    "place_meta_tokens",
]
