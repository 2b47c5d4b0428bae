"""What the SFT and DPO parts share: the tag columns, the checks of tokenizer and model, encoding with tags, and
slicing and padding tag columns alongside `input_ids`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl.trainer.utils import pad

from ...configuration_lime import PAD_ID
from ...modeling_lime import LimePreTrainedModel
from ...tokenization_lime import LimeTokenizer

# Every per-token field TRL's fused head can compute: SFT and DPO each read a subset.
FUSED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


IGNORE_INDEX = -100


def metadata_columns(tokenizer: LimeTokenizer) -> list[str]:
    """The tag columns a `LimeTokenizer` emits: `<field>_ids` for each of its metadata fields."""
    return [f"{name}_ids" for name in tokenizer.metadata_fields]


def check_lime_tokenizer(tokenizer: Any) -> LimeTokenizer:
    """The processing class, if it is a `LimeTokenizer` (only it returns tags); else a `ValueError`."""
    if not isinstance(tokenizer, LimeTokenizer):
        raise ValueError(
            f"A LIME trainer needs a `LimeTokenizer` as `processing_class` (it returns the tags), got "
            f"{type(tokenizer).__name__}. Wrap yours: `LimeTokenizer.from_tokenizer(tokenizer, alignment='offsets')`."
        )
    return tokenizer


def unwrap_lime(model: Any) -> LimePreTrainedModel:
    """The LIME model inside `model` (a `PeftModel` or the model itself); a `ValueError` for any other model."""
    base = model.get_base_model() if is_peft_model(model) else model
    if getattr(base.config, "model_type", None) != "lime":
        raise ValueError(
            f"Expected a LIME model (model_type 'lime'), got {type(base).__name__}. Retrofit a checkpoint first: "
            "`LimeForCausalLM.from_backbone(...)`, or use TRL's own trainers for a model without metadata."
        )
    return base


def common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
    """How many leading ids two sequences share (where a completion starts after its tokenised prompt)."""
    length = 0
    for first, second in zip(ids, other_ids, strict=False):
        if first != second:
            break
        length += 1
    return length


def encode(
    tokenizer: LimeTokenizer, inputs: list, row_kwargs: list[dict] | None = None, **chat_kwargs
) -> dict[str, list]:
    """
    Tokenise a batch of texts (`tokenizer(texts)`) or of chats (`apply_chat_template`), tags included.

    `row_kwargs` (per row: `tools`, `chat_template_kwargs` of the dataset) tokenises each chat on its own.
    """
    if isinstance(inputs[0], str):
        return dict(tokenizer(list(inputs)))
    if row_kwargs is None:
        return dict(
            tokenizer.apply_chat_template(list(inputs), tokenize=True, return_dict=True, **chat_kwargs)
        )
    rows = [
        tokenizer.apply_chat_template([chat], tokenize=True, return_dict=True, **chat_kwargs, **kwargs)
        for chat, kwargs in zip(inputs, row_kwargs, strict=True)
    ]
    return {key: [row[key][0] for row in rows] for key in rows[0]}


def row_chat_kwargs(batch: dict[str, list]) -> list[dict] | None:
    """Per-row `tools` / `chat_template_kwargs` columns of a batch, as `apply_chat_template` keywords (or None)."""
    if "tools" not in batch and "chat_template_kwargs" not in batch:
        return None
    size = len(next(iter(batch.values())))
    rows = []
    for index in range(size):
        tools = batch.get("tools", [None] * size)[index]
        rows.append(
            {
                "tools": json.loads(tools) if isinstance(tools, str) else tools,
                **(batch.get("chat_template_kwargs", [None] * size)[index] or {}),
            }
        )
    return rows


def slice_columns(example: dict[str, list], columns: Sequence[str], part: slice) -> dict[str, list]:
    """The same slice of every per-token column (truncation that keeps the tags aligned)."""
    return {column: example[column][part] for column in columns}


def pad_tags(rows: list[list[int]], pad_to_multiple_of: int | None) -> torch.Tensor:
    """Right-pad rows of tag ids with the padding tag (0), as TRL pads `input_ids`."""
    tensors = [torch.tensor(row, dtype=torch.long) for row in rows]
    return pad(tensors, padding_value=PAD_ID, padding_side="right", pad_to_multiple_of=pad_to_multiple_of)


def missing_columns(example: dict, columns: Sequence[str]) -> None:
    missing = [column for column in columns if column not in example]
    if missing:
        raise ValueError(
            f"The batch lacks the tag columns {missing} (it has {sorted(example)}): prepare the dataset with a LIME "
            "trainer (`LimeSFTTrainer`, `LimeDPOTrainer`) and a `LimeTokenizer`."
        )


__all__ = [
    "FUSED_OUTPUTS",
    "IGNORE_INDEX",
    "check_lime_tokenizer",
    "common_prefix_length",
    "encode",
    "metadata_columns",
    "missing_columns",
    "pad_tags",
    "row_chat_kwargs",
    "slice_columns",
    "unwrap_lime",
]
