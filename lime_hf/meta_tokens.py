"""Where meta-tokens go: in prompts (`place_meta_tokens`) and in generated text (`MetaTokenPlacement`).

A model reads meta-tokens with its meta-attention (`LimeConfig(meta_token_ids=[...])`, see `meta_attention.py`);
these helpers only decide their positions. Both follow the same stride convention, so that a prompt placed with
`every=N` and generation with `MetaTokenPlacement(every=N)` continue one pattern: every `N` ordinary tokens are
followed by a meta-token, i.e. position `p` (from 0) holds one iff `(p + 1) % (N + 1) == 0`.
"""

from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessor

from .configuration_lime import PAD_ID, SPECIAL_ID


def _check_placement(meta_token_id: int, every: int | None, positions, policy=None) -> None:
    if isinstance(meta_token_id, bool) or not isinstance(meta_token_id, int) or meta_token_id < 0:
        raise ValueError(f"`meta_token_id` must be a token id (an integer >= 0), got {meta_token_id!r}.")
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
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(
            f"`every` is the number of ordinary tokens between meta-tokens: an integer >= 1, got {every!r}."
        )
    if positions is not None and any(
        isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in positions
    ):
        raise ValueError(f"`positions` must be integer positions >= 0, got {list(positions)!r}.")


class MetaTokenPlacement(LogitsProcessor):
    """Force a meta-token at chosen positions of the generated text, and forbid it everywhere else.

    A position is the index the next token takes in the row of `sequences` (prompt and any left padding included),
    so `every` and `positions` place the same steps in every row; `policy` decides per row.

    Args:
        meta_token_id: the meta-token to place (one of the model's `config.meta_token_ids`).
        every: a meta-token after every `every` ordinary tokens: at positions `p` with `(p + 1) % (every + 1) == 0`.
        positions: the positions that take a meta-token.
        policy: a callable `(input_ids_row) -> bool`: whether the row's next token is a meta-token.

    Example: `model.generate(**inputs, logits_processor=[MetaTokenPlacement(meta_id, every=4)])`.
    """

    def __init__(
        self,
        meta_token_id: int,
        every: int | None = None,
        positions: Sequence[int] | None = None,
        policy: Callable[[torch.LongTensor], bool] | None = None,
    ):
        _check_placement(meta_token_id, every, positions, policy)
        self.meta_token_id = meta_token_id
        self.every = every
        self.positions = None if positions is None else frozenset(positions)
        self.policy = policy

    def forced(self, input_ids: torch.LongTensor) -> bool | torch.BoolTensor:
        """Whether the next token is the meta-token: one answer for every row (`every`, `positions`), or `(batch,)`
        answers (`policy`)."""
        if self.policy is not None:
            return torch.tensor([bool(self.policy(row)) for row in input_ids], device=input_ids.device)
        position = input_ids.shape[1]
        return (
            (position + 1) % (self.every + 1) == 0 if self.every is not None else position in self.positions
        )

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
    _check_placement(meta_token_id, every, positions)
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


__all__ = ["MetaTokenPlacement", "place_meta_tokens"]
