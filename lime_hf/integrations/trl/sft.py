"""`LimeSFTTrainer`: SFT dataset preparation with the tags (text, chats, prompt-completion; truncation and packing),
its collator and the trainer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, IterableDataset
from trl import SFTTrainer, pack_dataset
from trl.data_utils import (
    is_conversational,
    is_conversational_from_value,
    maybe_convert_to_chatml,
)
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ...configuration_lime import PAD_ID, UNKNOWN_ID
from ...tokenization_lime import LimeTokenizer
from .common import (
    IGNORE_INDEX,
    check_lime_tokenizer,
    common_prefix_length,
    encode,
    metadata_columns,
    missing_columns,
    pad_tags,
    row_chat_kwargs,
    slice_columns,
    unwrap_lime,
)
from .fused import LimeTagLossMixin


def tokenize_sft_batch(
    batch: dict[str, list],
    tokenizer: LimeTokenizer,
    text_field: str,
    completion_only_loss: bool,
    assistant_only_loss: bool,
    chat_template: str | None,
) -> dict[str, list]:
    """
    `input_ids`, the tags and `labels` of a batch of SFT examples (language modeling: `text_field` or `messages`;
    prompt-completion: `prompt` and `completion`), with -100 outside the completion (`completion_only_loss`) and
    outside the assistant turns (`assistant_only_loss`), as `SFTTrainer` builds them.
    """
    chat_kwargs = {"chat_template": chat_template}
    row_kwargs = row_chat_kwargs(batch)
    masks = []
    if "prompt" in batch:
        prompts = batch["prompt"]
        joined = [
            prompt + completion for prompt, completion in zip(prompts, batch["completion"], strict=True)
        ]
        if isinstance(prompts[0], str):
            prompt_ids = encode(tokenizer, prompts)["input_ids"]
            encoded = encode(tokenizer, joined)
        else:
            prompt_ids = encode(tokenizer, prompts, row_kwargs, add_generation_prompt=True, **chat_kwargs)[
                "input_ids"
            ]
            encoded = encode(
                tokenizer, joined, row_kwargs, return_assistant_tokens_mask=assistant_only_loss, **chat_kwargs
            )
        if completion_only_loss:
            starts = [
                common_prefix_length(prompt, ids)
                for prompt, ids in zip(prompt_ids, encoded["input_ids"], strict=True)
            ]
            masks.append(
                [
                    [0] * start + [1] * (len(ids) - start)
                    for start, ids in zip(starts, encoded["input_ids"], strict=True)
                ]
            )
    else:
        texts = batch["messages"] if "messages" in batch else batch[text_field]
        kwargs = (
            {}
            if isinstance(texts[0], str)
            else {"return_assistant_tokens_mask": assistant_only_loss, **chat_kwargs}
        )
        encoded = encode(tokenizer, texts, row_kwargs if kwargs else None, **kwargs)
    if assistant_only_loss:
        if any(1 not in mask for mask in encoded["assistant_masks"]):
            raise RuntimeError(
                "`assistant_only_loss=True`, but an example has no assistant tokens: the chat template needs "
                "`{% generation %}` ... `{% endgeneration %}` around the assistant turns."
            )
        masks.append(encoded["assistant_masks"])
    labels = [
        [token if all(bits) else IGNORE_INDEX for token, *bits in zip(ids, *row_masks, strict=True)]
        for ids, *row_masks in zip(encoded["input_ids"], *masks, strict=True)
    ]
    return {
        "input_ids": encoded["input_ids"],
        "labels": labels,
        **{c: encoded[c] for c in metadata_columns(tokenizer)},
    }


def prepare_sft_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: LimeTokenizer,
    args: Any,
    packing: bool,
    formatting_func: Callable[[dict], str] | None,
    completion_only_loss: bool,
    chat_template: str | None = None,
) -> Dataset | IterableDataset:
    """
    `SFTTrainer._prepare_dataset` with the tags: tokenise (tags, labels), truncate every column alike (or pack, the
    tags alongside), drop examples left without a label. `args` is the `SFTConfig`.
    """
    if "input_ids" in next(iter(dataset)):
        raise ValueError(
            "The dataset is already tokenised: give a LIME trainer raw text, chats or prompt-completion pairs, so "
            "that its LimeTokenizer tags every token (TRL's preparation would keep `input_ids` alone)."
        )
    map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
    columns = ["input_ids", "labels", *metadata_columns(tokenizer)]
    if formatting_func is not None:
        dataset = dataset.map(lambda example: {"text": formatting_func(example)}, **map_kwargs)
    if is_conversational_from_value(next(iter(dataset))):
        dataset = dataset.map(maybe_convert_to_chatml, remove_columns="conversations", **map_kwargs)
    first = next(iter(dataset))
    if not is_conversational(first):  # as TRL: a text ends in EOS
        eos = tokenizer.eos_token
        key = "completion" if "completion" in first else args.dataset_text_field
        dataset = dataset.map(
            lambda example: {key: example[key] if example[key].endswith(eos) else example[key] + eos},
            **map_kwargs,
        )
    dataset = dataset.map(
        tokenize_sft_batch,
        batched=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "text_field": args.dataset_text_field,
            "completion_only_loss": completion_only_loss,
            "assistant_only_loss": args.assistant_only_loss,
            "chat_template": chat_template,
        },
        remove_columns=list(first),
        **map_kwargs,
    )
    if packing:
        if args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")
        dataset = dataset.select_columns(columns)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
    if args.max_length is not None:
        if args.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(
                f"Unsupported truncation mode {args.truncation_mode!r}: 'keep_start' or 'keep_end'."
            )
        part = (
            slice(None, args.max_length)
            if args.truncation_mode == "keep_start"
            else slice(-args.max_length, None)
        )
        dataset = dataset.map(slice_columns, fn_kwargs={"columns": columns, "part": part}, **map_kwargs)
    dataset = dataset.filter(
        lambda example: any(label != IGNORE_INDEX for label in example["labels"]), **map_kwargs
    )
    return dataset.shuffle(seed=args.seed) if args.shuffle_dataset else dataset


@dataclass
class LimeDataCollatorForLanguageModeling(DataCollatorForLanguageModeling):
    """
    TRL's `DataCollatorForLanguageModeling` plus the tags (`metadata_columns`), padded with 0 or, padding-free,
    concatenated like `input_ids`. For a LIME+1 model (`metadata_shift=1`) the tag of each packed document's first
    token, after the first, becomes unknown: the previous document's last position reads it, and unpacked it would
    read unknown there.
    """

    metadata_columns: Sequence[str] = ("pos_ids", "ner_ids")
    metadata_shift: int = 0

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        missing_columns(examples[0], self.metadata_columns)
        output = super().torch_call(examples)
        for column in self.metadata_columns:
            rows = [list(example[column]) for example in examples]
            if self.padding_free:
                rows = [[tag for row in rows for tag in row]]
            tags = pad_tags(rows, self.pad_to_multiple_of)
            if self.metadata_shift and "position_ids" in output:
                starts = (output["position_ids"] == 0) & (tags != PAD_ID)
                starts[:, 0] = False
                tags = tags.masked_fill(starts, UNKNOWN_ID)
            output[column] = tags
        return output


class LimeSFTTrainer(LimeTagLossMixin, SFTTrainer):
    """
    `trl.SFTTrainer` for LIME models: same arguments, a `LimeTokenizer` as `processing_class`, raw datasets (text,
    chats, prompt-completion; TRL's column names). Every tag stays aligned with its token through tokenisation,
    completion-only and assistant-only loss, truncation and packing (padding-free included); the fused LM head sees
    the metadata; a model with tag heads trains them too. See the package docstring (`lime_hf.integrations.trl`).
    """

    def __init__(
        self,
        model,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs,
    ):
        check_lime_tokenizer(processing_class)
        if args is not None and (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
            raise ValueError(
                "`skip_prepare_dataset=True` skips the preparation that tags the dataset: LimeSFTTrainer tokenises "
                "raw text, chats and prompt-completion pairs itself. Remove it from `dataset_kwargs`."
            )
        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if data_collator is None:
            self.data_collator = LimeDataCollatorForLanguageModeling(
                pad_token_id=self._tokenizer.pad_token_id,
                padding_free=self.padding_free,
                return_position_ids=self.data_collator.return_position_ids,
                pad_to_multiple_of=self.args.pad_to_multiple_of,
                metadata_columns=metadata_columns(self._tokenizer),
                metadata_shift=unwrap_lime(self.model).config.metadata_shift,
            )
        self._install_lime_heads()

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if self._is_vision_dataset:
            raise ValueError("LIME models are text models: a vision dataset cannot be tagged.")
        return prepare_sft_dataset(
            dataset,
            check_lime_tokenizer(processing_class),
            args,
            packing,
            formatting_func,
            self.completion_only_loss,
            self.chat_template,
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *metadata_columns(self._tokenizer)]


__all__ = [
    "LimeDataCollatorForLanguageModeling",
    "LimeSFTTrainer",
    "prepare_sft_dataset",
    "tokenize_sft_batch",
]
