"""`LimeDPOTrainer`: preference dataset preparation with the tags, its collator and the trainer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, IterableDataset
from trl import DPOTrainer
from trl.data_utils import (
    is_conversational,
    maybe_extract_prompt,
)
from trl.trainer.dpo_trainer import DataCollatorForPreference

from ...tokenization_lime import LimeTokenizer
from .common import (
    check_lime_tokenizer,
    common_prefix_length,
    encode,
    metadata_columns,
    missing_columns,
    pad_tags,
    row_chat_kwargs,
)
from .fused import LimeTagLossMixin


def tokenize_preference_batch(batch: dict[str, list], tokenizer: LimeTokenizer) -> dict[str, list]:
    """
    `prompt_ids`, `chosen_ids`, `rejected_ids` as `DPOTrainer` builds them, and the tags of each part:
    `prompt_<field>_ids` (of the prompt tokenised alone, the same for both answers), `chosen_<field>_ids`,
    `rejected_<field>_ids`.
    """
    prompts = batch["prompt"]
    row_kwargs = row_chat_kwargs(batch)
    if isinstance(prompts[0], str):
        prompt, chosen, rejected = (
            encode(tokenizer, texts)
            for texts in (
                prompts,
                [p + c for p, c in zip(prompts, batch["chosen"], strict=True)],
                [p + r for p, r in zip(prompts, batch["rejected"], strict=True)],
            )
        )
    else:
        prompt = encode(tokenizer, prompts, row_kwargs, add_generation_prompt=True)
        chosen = encode(tokenizer, [p + c for p, c in zip(prompts, batch["chosen"], strict=True)], row_kwargs)
        rejected = encode(
            tokenizer, [p + r for p, r in zip(prompts, batch["rejected"], strict=True)], row_kwargs
        )
    starts = [
        min(common_prefix_length(p, c), common_prefix_length(p, r))
        for p, c, r in zip(prompt["input_ids"], chosen["input_ids"], rejected["input_ids"], strict=True)
    ]
    output = {}
    for column in ["input_ids", *metadata_columns(tokenizer)]:
        suffix = "ids" if column == "input_ids" else column  # prompt_ids, prompt_pos_ids, ...
        for part, encoded in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            output[f"{part}_{suffix}"] = [
                row[:start] if part == "prompt" else row[start:]
                for row, start in zip(encoded[column], starts, strict=True)
            ]
    return output


def preference_columns(tokenizer: LimeTokenizer) -> list[str]:
    """The tag columns of a prepared preference dataset: `prompt_`, `chosen_` and `rejected_<field>_ids`."""
    return [
        f"{part}_{column}"
        for column in metadata_columns(tokenizer)
        for part in ("prompt", "chosen", "rejected")
    ]


def prepare_preference_dataset(
    dataset: Dataset | IterableDataset, tokenizer: LimeTokenizer, args: Any
) -> Dataset | IterableDataset:
    """`DPOTrainer._prepare_dataset` with the tags (see `tokenize_preference_batch`). `args` is the `DPOConfig`."""
    map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
    if "prompt" not in next(iter(dataset)):
        dataset = dataset.map(maybe_extract_prompt, **map_kwargs)
    first = next(iter(dataset))
    if not is_conversational(first):  # as TRL: each answer ends in EOS
        eos = tokenizer.eos_token
        dataset = dataset.map(
            lambda example: {
                key: example[key] if example[key].endswith(eos) else example[key] + eos
                for key in ("chosen", "rejected")
            },
            **map_kwargs,
        )
    dataset = dataset.map(
        tokenize_preference_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=list(first),
        **map_kwargs,
    )
    if (
        args.max_length is not None and args.truncation_mode == "keep_start"
    ):  # a prompt filling max_length has no answer
        dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length, **map_kwargs)
    return dataset


@dataclass
class LimeDataCollatorForPreference(DataCollatorForPreference):
    """TRL's `DataCollatorForPreference` plus the tags of each row (prompt + chosen, then prompt + rejected), cut
    and padded exactly like `input_ids`."""

    metadata_columns: Sequence[str] = field(default=("pos_ids", "ner_ids"))

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        missing_columns(examples[0], [f"prompt_{column}" for column in self.metadata_columns])
        output = super().torch_call(examples)
        part = slice(None)
        if self.max_length is not None:
            part = (
                slice(None, self.max_length)
                if self.truncation_mode == "keep_start"
                else slice(-self.max_length, None)
            )
        for column in self.metadata_columns:
            rows = [
                example[f"prompt_{column}"] + example[f"{answer}_{column}"]
                for answer in ("chosen", "rejected")
                for example in examples
            ]
            output[column] = pad_tags([row[part] for row in rows], self.pad_to_multiple_of)
        return output


class LimeDPOTrainer(LimeTagLossMixin, DPOTrainer):
    """
    `trl.DPOTrainer` for LIME models: same arguments, a `LimeTokenizer` as `processing_class`, a raw preference
    dataset (`prompt`, `chosen`, `rejected`; text or chats). Prompt, chosen and rejected tokens carry their tags, the
    reference model (a `ref_model`, or the PEFT model with its adapter disabled) reads the same tags, and a model
    with tag heads trains them on both answers. See the package docstring (`lime_hf.integrations.trl`).
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs,
    ):
        tokenizer = check_lime_tokenizer(processing_class)
        if data_collator is None:
            pad_token = (
                (args.pad_token if args is not None else None) or tokenizer.pad_token or tokenizer.eos_token
            )
            data_collator = LimeDataCollatorForPreference(
                pad_token_id=tokenizer.convert_tokens_to_ids(pad_token),
                max_length=args.max_length if args is not None else None,
                truncation_mode=args.truncation_mode if args is not None else "keep_start",
                pad_to_multiple_of=args.pad_to_multiple_of if args is not None else None,
                metadata_columns=metadata_columns(tokenizer),
            )
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self._install_lime_heads()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return prepare_preference_dataset(dataset, check_lime_tokenizer(processing_class), args)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._install_lime_heads()  # runs inside `__init__`, before the reference pass needs the LIME head
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *preference_columns(self._tokenizer)]


__all__ = [
    "LimeDPOTrainer",
    "LimeDataCollatorForPreference",
    "preference_columns",
    "prepare_preference_dataset",
    "tokenize_preference_batch",
]
