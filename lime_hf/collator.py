"""DataCollatorForLime: pad a batch of LIME features, build causal-LM labels, optionally drop metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .configuration_lime import SPECIAL_ID, UNKNOWN_ID


class DataCollatorForLime:
    """
    Collate `input_ids`, `attention_mask` and every `{field}_ids` into padded tensors for causal-LM training.

    Padding (tokens and tags alike) goes on the tokenizer's padding side, through `tokenizer.pad`. `labels` are
    `input_ids` with -100 wherever `attention_mask` is 0 — keyed on the mask, not on the pad id, which may equal
    EOS. With `metadata_dropout=p`, each real tag (id > 2: not padding, unknown or special) is replaced by the
    unknown id (1) with probability p, teaching the model to cope with missing metadata.

    Args:
        tokenizer (`LimeTokenizer`): provides padding (side, pad id) and `metadata_fields`.
        metadata_dropout (`float`, *optional*, defaults to 0.0): probability of replacing a tag by unknown.
        pad_to_multiple_of (`int`, *optional*): pad the length to a multiple of this value.
        seed (`int`, *optional*): seed of the dropout generator, for reproducible batches.
        generator (`torch.Generator`, *optional*): the dropout generator (overrides `seed`).

    Call it on a list of features (dicts of lists or tensors); returns a dict of `torch.LongTensor` of shape
    `(batch_size, sequence_length)`: `input_ids`, `attention_mask`, `{field}_ids`, `labels`.
    """

    def __init__(
        self,
        tokenizer: Any,
        metadata_dropout: float = 0.0,
        pad_to_multiple_of: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ):
        if not 0.0 <= metadata_dropout <= 1.0:
            raise ValueError(f"`metadata_dropout` is a probability in [0, 1], got {metadata_dropout}.")
        self.tokenizer = tokenizer
        self.metadata_dropout = metadata_dropout
        self.pad_to_multiple_of = pad_to_multiple_of
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        self.field_columns = [f"{name}_ids" for name in tokenizer.metadata_fields]

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        keep = ["input_ids", "attention_mask", *self.field_columns]
        missing = [column for column in self.field_columns if column not in features[0]]
        if missing:
            raise ValueError(
                f"The features lack the metadata columns {missing}; they have {sorted(features[0])}."
            )
        features = [{key: feature[key] for key in keep if key in feature} for feature in features]
        batch = self.tokenizer.pad(features, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        batch = {key: value.long() for key, value in batch.items()}
        if self.metadata_dropout > 0:
            for column in self.field_columns:
                batch[column] = self.drop_metadata(batch[column])
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    def drop_metadata(self, tags: torch.Tensor) -> torch.Tensor:
        """Replace real tags (id > `SPECIAL_ID`) by `UNKNOWN_ID` with probability `metadata_dropout`."""
        draws = torch.rand(tags.shape, generator=self.generator)
        return tags.masked_fill((draws < self.metadata_dropout) & (tags > SPECIAL_ID), UNKNOWN_ID)


__all__ = ["DataCollatorForLime"]
