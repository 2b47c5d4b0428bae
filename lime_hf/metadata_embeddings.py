"""The metadata embeddings: one table per field, `E_d`, and the weighted sum of the fed tags' rows.

    sum_d w_d * E_d(a_{i+s,d})     (s = `config.metadata_shift`: 0 = LIME, 1 = LIME+1)

Padding and unknown ids embed to exact zeros, so "no metadata" adds nothing. The lookup runs on the tables stacked
into one (`stacked_fields.py`): one embedding for every field.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``,
``transformers`` and its flat siblings.
"""

import torch
from torch import nn

from .configuration_lime import PAD_ID, UNKNOWN_ID, LimeConfig
from .stacked_fields import StackedParameters


class LimeTagEmbedding(nn.Embedding):
    """A field's table: row = tag id. The padding and unknown rows are zero and never trained."""


class LimeMetadataEmbeddings(nn.Module):
    """One embedding table per metadata field; padding and unknown ids embed to zero."""

    def __init__(self, config: LimeConfig):
        super().__init__()
        hidden_size = config.get_text_config().hidden_size
        self.tables = nn.ModuleDict(
            {
                name: LimeTagEmbedding(len(labels), hidden_size, padding_idx=PAD_ID)
                for name, labels in config.metadata_fields.items()
            }
        )
        self.names = tuple(config.metadata_fields)  # the fields' order in stacked tags (`stacked_fed_ids`)
        self.weights = dict(config.metadata_weights)
        self.shift = config.metadata_shift
        self._stacked: dict[tuple, StackedParameters] = {}  # keyed by (kind, names[, width])

    def forward(
        self,
        metadata_ids: dict[str, torch.LongTensor],
        input_shape: tuple[int, int],
        next_metadata_ids: dict[str, torch.LongTensor] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            metadata_ids: field -> `(batch, seq)` tag ids of the input tokens themselves (validated).
            input_shape: `(batch, seq)` of the input.
            next_metadata_ids: field -> `(batch,)` tag ids of the token *after* the input (LIME+1 only);
                fields left out are unknown there.

        Returns:
            `(batch, seq, hidden)` sum of the weighted field embeddings (see `lookup`).
        """
        return self.lookup(self.fed_ids(metadata_ids, input_shape, next_metadata_ids))

    def fed_ids(
        self,
        metadata_ids: dict[str, torch.LongTensor],
        input_shape: tuple[int, int],
        next_metadata_ids: dict[str, torch.LongTensor] | None = None,
        names: list[str] | None = None,
    ) -> dict[str, torch.LongTensor]:
        """Every field (or those in `names`) -> `(batch, seq)` the tag each position reads: the token's own (LIME) or
        the next token's (LIME+1, the last position taking `next_metadata_ids`); unknown where not given."""
        next_metadata_ids = next_metadata_ids or {}
        fed = {}
        for name, table in self.tables.items():
            if names is not None and name not in names:
                continue
            ids, next_ids = metadata_ids.get(name), next_metadata_ids.get(name)
            if self.shift:
                ids = self._shift_left(ids, next_ids, input_shape, table.weight.device)
            elif ids is None:
                ids = torch.full(input_shape, UNKNOWN_ID, dtype=torch.long, device=table.weight.device)
            fed[name] = ids
        return fed

    def lookup(self, fed_ids: dict[str, torch.LongTensor]) -> torch.Tensor:
        """`(batch, seq, hidden)` sum of the weighted embeddings of the fields' fed tags (at least one field). A field
        unknown everywhere embeds to exact zeros; `forward` still looks it up, so that every table takes part in
        every step (DDP needs no `find_unused_parameters` for batches with and without metadata)."""
        names = tuple(fed_ids)
        return self.lookup_stacked(torch.stack([fed_ids[name] for name in names], dim=-1), names)

    def lookup_stacked(self, ids: torch.LongTensor, names: tuple[str, ...]) -> torch.Tensor:
        """`(..., fields)` tag ids of the fields `names`, in that order -> `(..., hidden)` the sum of their weighted
        embeddings: one lookup in the stacked tables (see `stacked_fields.py`)."""
        table, offsets = self._stacked_table(names)
        return nn.functional.embedding(ids + offsets, table).sum(-2)

    def expected_stacked(self, probabilities: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`(..., fields, width)` a distribution over each field's tags (of `names`, in that order; zero past a
        field's own inventory) -> `(..., hidden)` the sum of the fields' weighted embeddings averaged under it,
        `sum_f w_f sum_c p_f(c) E_f(c)`. A one-hot distribution gives `lookup_stacked`'s value."""
        width = probabilities.shape[-1]
        tables = self._cached(("padded", names, width), lambda: self._pad_tables(names, width))
        return probabilities.flatten(-2).to(tables.dtype) @ tables  # one matmul over every field's rows

    def _stacked_table(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.LongTensor]:
        """The weighted tables of `names` one after the other (`_weighted_tables`), and where each one starts."""
        return self._cached(("table", names), lambda: self._stack_tables(names))

    def _cached(self, key: tuple, build):
        if key not in self._stacked:
            self._stacked[key] = StackedParameters()
        return self._stacked[key].get(build)

    def _stack_tables(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.LongTensor]:
        parts = self._weighted_tables(names)
        starts = [0, *[len(part) for part in parts[:-1]]]
        return torch.cat(parts), torch.tensor(starts, device=parts[0].device).cumsum(0)

    def _pad_tables(self, names: tuple[str, ...], width: int) -> torch.Tensor:
        """`(fields * width, hidden)`: the weighted tables of `names`, each padded with zero rows to `width`."""
        parts = self._weighted_tables(names)
        return torch.cat([nn.functional.pad(part, (0, 0, 0, width - len(part))) for part in parts])

    def _weighted_tables(self, names: tuple[str, ...]) -> list[torch.Tensor]:
        """Each table of `names` times its weight. Padding and unknown rows are zeros: "no metadata" adds exactly
        nothing, and they are never trained."""
        tables = [self.tables[name] for name in names]
        reserved = torch.tensor([PAD_ID, UNKNOWN_ID], device=tables[0].weight.device)
        return [
            table.weight.index_fill(0, reserved, 0.0) * self.weights.get(name, 1.0)
            for name, table in zip(names, tables, strict=True)
        ]

    @staticmethod
    def _shift_left(
        ids: torch.LongTensor | None,
        next_ids: torch.LongTensor | None,
        input_shape: tuple[int, int],
        device: torch.device,
    ) -> torch.LongTensor:
        """LIME+1: position i takes the tag of token i+1; the last position takes `next_ids` or unknown."""
        if ids is None:  # at most the lookahead tag is known for this field
            ids = torch.full(input_shape, UNKNOWN_ID, dtype=torch.long, device=device)
        last = next_ids.view(-1, 1) if next_ids is not None else torch.full_like(ids[:, :1], UNKNOWN_ID)
        return torch.cat([ids[:, 1:], last.to(ids.dtype)], dim=1)


__all__ = ["LimeMetadataEmbeddings", "LimeTagEmbedding"]
