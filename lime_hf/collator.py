"""DataCollatorForLime: pad a batch of LIME features, build causal-LM labels, optionally drop metadata and
inject meta-tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .configuration_lime import SPECIAL_ID, UNKNOWN_ID
from .meta_tokens import IGNORE_INDEX, check_meta_fraction, check_meta_token_id, inject_meta_tokens


class DataCollatorForLime:
    """
    Collate `input_ids`, `attention_mask` and every `{field}_ids` into padded tensors for causal-LM training.

    Padding (tokens and tags alike) goes on the tokenizer's padding side, through `tokenizer.pad`. `labels` are
    `input_ids` with -100 wherever `attention_mask` is 0 — keyed on the mask, not on the pad id, which may equal
    EOS. With `metadata_dropout=p`, each real tag (id > 2: not padding, unknown or special) is replaced by the
    unknown id (1) with probability p, teaching the model to cope with missing metadata. With `meta_token_id`,
    each feature first gets `meta_fraction` of its length in meta-tokens at random positions (see
    [`inject_meta_tokens`]; the rows grow by that count): tags 'special' there, and labels -100, so the model
    never learns to predict a meta-token.

    Args:
        tokenizer (`LimeTokenizer`): provides padding (side, pad id) and `metadata_fields`.
        metadata_dropout (`float`, *optional*, defaults to 0.0): probability of replacing a tag by unknown.
        pad_to_multiple_of (`int`, *optional*): pad the length to a multiple of this value.
        seed (`int`, *optional*): seed of the dropout generator, for reproducible batches.
        generator (`torch.Generator`, *optional*): the dropout generator (overrides `seed`).
        meta_token_id (`int`, *optional*): a special token of `tokenizer` (see `add_meta_tokens`) to inject.
        meta_fraction (`float`, *optional*, defaults to 0.1): meta-tokens per token, in `[0, 1)`.

    The generator (dropout and meta-token positions) advances batch by batch: the same seed gives the same
    sequence of batches.

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
        meta_token_id: int | None = None,
        meta_fraction: float = 0.1,
    ):
        if not 0.0 <= metadata_dropout <= 1.0:
            raise ValueError(f"`metadata_dropout` is a probability in [0, 1], got {metadata_dropout}.")
        if meta_token_id is not None:
            check_meta_fraction(meta_fraction, "meta_fraction")
            check_meta_token_id(meta_token_id, len(tokenizer))
            if meta_token_id not in tokenizer.all_special_ids:
                raise ValueError(
                    f"`meta_token_id` {meta_token_id} ({tokenizer.convert_ids_to_tokens(meta_token_id)!r}) is not a "
                    "special token of the tokenizer; register the meta-token with `add_meta_tokens(tokenizer)`."
                )
        self.meta_token_id = meta_token_id
        self.meta_fraction = meta_fraction
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
        if self.meta_token_id is not None:
            features = [self.inject(feature) for feature in features]
        batch = self.tokenizer.pad(features, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        batch = {key: value.long() for key, value in batch.items()}
        if self.metadata_dropout > 0:
            for column in self.field_columns:
                batch[column] = self.drop_metadata(batch[column])
        ignored = batch["attention_mask"] == 0
        if self.meta_token_id is not None:
            ignored |= batch["input_ids"] == self.meta_token_id
        batch["labels"] = batch["input_ids"].masked_fill(ignored, IGNORE_INDEX)
        return batch

    def inject(self, feature: dict[str, Any]) -> dict[str, list[int]]:
        """One unpadded feature with meta-tokens inserted (every column grown alike), as lists."""
        metadata = {column: feature[column] for column in self.field_columns}
        grown = inject_meta_tokens(
            feature["input_ids"],
            self.meta_token_id,
            self.meta_fraction,
            attention_mask=feature.get("attention_mask"),
            metadata=metadata,
            generator=self.generator,
        )
        return {key: value.tolist() for key, value in grown.items()}

    def drop_metadata(self, tags: torch.Tensor) -> torch.Tensor:
        """Replace real tags (id > `SPECIAL_ID`) by `UNKNOWN_ID` with probability `metadata_dropout`."""
        return drop_tags(tags, self.metadata_dropout, self.generator)


def drop_tags(
    tags: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`tags` with each real tag (id > `SPECIAL_ID`) replaced by `UNKNOWN_ID` with `probability` (metadata dropout)."""
    draws = torch.rand(tags.shape, generator=generator, device=generator.device if generator else tags.device)
    return tags.masked_fill((draws.to(tags.device) < probability) & (tags > SPECIAL_ID), UNKNOWN_ID)


__all__ = ["DataCollatorForLime", "drop_tags"]
