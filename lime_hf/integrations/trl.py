"""TRL for LIME models: `SFTTrainer` and `DPOTrainer` that keep every tag aligned with its token.

    from lime_hf.integrations.trl import LimeDPOTrainer, LimeSFTTrainer

    trainer = LimeSFTTrainer(model=model, args=SFTConfig(...), train_dataset=chats, processing_class=lime_tokenizer)

Why subclasses. TRL's own preparation keeps only `input_ids` (and the loss masks): truncation cuts `input_ids` and
`labels` alone, packing selects those two columns, the signature columns drop the rest, and its collators build
nothing else. Then its trainers patch the model's forward with a fused LM head (`add_fused_lm_head`) that runs
`model.base_model` directly: on a LIME model that is the backbone's causal LM, which neither adds the metadata
embeddings nor returns hidden states. These classes change exactly those steps and nothing else:

- dataset preparation: the `LimeTokenizer` tokenises text, chats (`apply_chat_template`: every message annotated on
  its own, the template's tokens tagged special) and prompt-completion pairs with their `<field>_ids`; labels come
  from the completion and assistant masks as in TRL; truncation cuts every column alike; packing (`bfd`,
  `bfd_split`, `wrapped`, through `trl.pack_dataset`) packs the tags alongside.
- collators: TRL's, plus the tags padded with 0 (padding-free: concatenated like `input_ids`). In a padding-free
  batch a LIME+1 model would show a document's last position the tag of the next document's first token; that tag
  is set to unknown (1), exactly what the last position of an unpacked row sees.
- the fused LM head: TRL's kernel runs on the backbone's causal LM (`model.language_model`) fed the LIME model's
  enriched `inputs_embeds`, so the log-probabilities never build the full logits and see the metadata. A model
  with tag heads also runs its heads on the same hidden states (a packed document's first position starts from the
  heads' start state) and the tag loss, weighted by `config.tag_loss_weight`, is added to TRL's loss (SFT: divided
  by the batch's label count like the LM loss; DPO: a per-batch mean). It is logged as `tag_loss`.

DPO feeds the reference model the same tags (TRL hands it every collator key), also for PEFT models, whose
reference is the model with its adapter disabled. Train LoRA with `peft_config=lime_lora_config(model)`
(`lime_hf.integrations.peft`). What these trainers refuse, with the setting to change: a tokenizer that is not a
`LimeTokenizer`, a model that is not a LIME model, vision datasets, `skip_prepare_dataset` (TRL's collators would
drop the tags), `padding_free` for DPO (TRL itself turns it off).

Needs `pip install "lime_hf[trl]"`.
"""

from __future__ import annotations

import functools
import json
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from trl import DPOTrainer, SFTTrainer, pack_dataset
from trl.data_utils import (
    is_conversational,
    is_conversational_from_value,
    maybe_convert_to_chatml,
    maybe_extract_prompt,
)
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import add_fused_lm_head, pad

from ..configuration_lime import PAD_ID, UNKNOWN_ID, check_inventories
from ..modeling_lime import LimePreTrainedModel
from ..tokenization_lime import LimeTokenizer

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


# --------------------------------------------------------------------------------------------------------------
# SFT


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


# --------------------------------------------------------------------------------------------------------------
# The fused LM head


def lime_fused_forward(
    model: LimePreTrainedModel,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    inputs_embeds: torch.FloatTensor | None = None,
    labels: torch.LongTensor | None = None,
    next_metadata_ids: dict[str, torch.LongTensor] | None = None,
    **kwargs,
) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
    """
    One forward with TRL's fused LM head on the backbone (`model.language_model`, see `use_lime_fused_lm_head`),
    fed the metadata-enriched embeddings. Returns TRL's `FusedCausalLMOutput` and, for a model with tag heads whose
    tags are given, the heads' losses (`{"sum": field -> summed CE, "mean": field -> mean CE}`; else `{}`).
    """
    # The model's own forward steps up to the backbone (see `LimeForCausalLM.forward`), then TRL's fused head.
    metadata_ids = model.collect_tags(kwargs.pop("pos_ids", None), kwargs.pop("ner_ids", None), kwargs)
    token_embeds = model.token_embeddings(input_ids, inputs_embeds)
    embeds = model.embed(token_embeds, metadata_ids, next_metadata_ids)
    labels, _, meta_state = model.prepare_meta_attention(input_ids, labels, None, False)
    # Heads at decoder layer k (`metadata_layer` > 0) run inside the backbone; those at layer 0 read its output.
    injection = model.prepare_metadata_injection(metadata_ids, next_metadata_ids, predict=True)
    heads = model.tag_heads
    captured = []
    hook = None
    if heads is not None and metadata_ids and injection is None:
        hook = model.language_model.base_model.register_forward_hook(
            lambda module, args, output: captured.append(
                output[0] if isinstance(output, tuple) else output.last_hidden_state
            )
        )
    try:
        outputs = model.run_backbone(
            model.language_model,
            meta_state,
            injection,
            None,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            fused_lm_head=True,
            **{**kwargs, "use_cache": False},
        )
    finally:
        if hook is not None:
            hook.remove()
    if injection is not None and heads is not None and metadata_ids:
        tag_logits = injection.tag_logits
    elif captured:
        previous = heads.previous_states(captured[-1], attention_mask)
        if (
            position_ids is not None and attention_mask is None
        ):  # padding-free: each packed document starts afresh
            previous = torch.where(
                (position_ids == 0)[..., None], heads.start_state.to(previous.dtype), previous
            )
        tag_logits = heads(previous, token_embeds)
    else:
        return outputs, {}
    return outputs, {
        "sum": heads.losses(tag_logits, metadata_ids, attention_mask, num_items_in_batch=1),
        "mean": heads.losses(tag_logits, metadata_ids, attention_mask),
    }


def use_lime_fused_lm_head(model: LimePreTrainedModel, tag_losses: list | None = None) -> None:
    """
    Replace the fused LM head TRL's trainers put on `model` (they patch `model.forward`; its `model.base_model` is
    the backbone's causal LM, which would skip the metadata) by one that feeds the metadata: TRL's kernel goes on
    the backbone and `model(..., fused_lm_head=True)` runs `lime_fused_forward`. The tag-head losses of each call
    are appended to `tag_losses`, where the trainer adds them to its loss. Without `fused_lm_head` the forward is
    the model's own.
    """
    vars(model).pop("forward", None)  # TRL's patch is an instance attribute; the class forward is LIME's
    if "forward" not in vars(model.language_model):
        add_fused_lm_head(model.language_model, outputs=FUSED_OUTPUTS)
    forward = type(model).forward

    @functools.wraps(forward)
    def fused_forward(self, *args, fused_lm_head: bool = False, **kwargs):
        if not fused_lm_head:
            return forward(self, *args, **kwargs)
        if args:
            raise ValueError("Pass the inputs of a fused LIME forward by name (`input_ids=...`).")
        outputs, losses = lime_fused_forward(self, **kwargs)
        if tag_losses is not None and losses:
            tag_losses.append(losses)
        return outputs

    model.forward = types.MethodType(fused_forward, model)


class LimeTagLossMixin:
    """Adds the tag heads' loss, recorded by the policy's fused forward during `compute_loss`, to TRL's loss."""

    def _install_lime_heads(self) -> None:
        if getattr(self, "_lime_tag_losses", None) is not None:
            return
        self._lime_tag_losses: list = []
        lime = unwrap_lime(self.model)
        check_inventories(self.processing_class.metadata_fields, lime.config.metadata_fields)
        use_lime_fused_lm_head(lime, self._lime_tag_losses)
        if getattr(self, "ref_model", None) is not None:
            use_lime_fused_lm_head(unwrap_lime(self.ref_model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        missing = [column for column in metadata_columns(self.processing_class) if column not in inputs]
        if missing:
            raise ValueError(
                f"The batch has no {missing}: the data collator dropped the tags. Leave `data_collator` unset (the "
                "trainer's collator pads the tags) or make yours pass every `<field>_ids` column."
            )
        self._lime_tag_losses.clear()
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not self._lime_tag_losses:
            return result
        losses = self._lime_tag_losses[
            0
        ]  # the policy's forward comes first; a PEFT reference pass may follow
        if num_items_in_batch is not None and isinstance(self, SFTTrainer):  # divided like SFT's token loss
            tag_loss = sum(losses["sum"].values()) / torch.as_tensor(num_items_in_batch).clamp(min=1)
            if self.args.average_tokens_across_devices:
                tag_loss = tag_loss * self.accelerator.num_processes
        else:
            tag_loss = sum(losses["mean"].values())
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["tag_loss"].append(
            self.accelerator.gather_for_metrics(tag_loss.detach()).mean().item()
        )
        weighted = unwrap_lime(self.model).config.tag_loss_weight * tag_loss.to(
            result[0].device if return_outputs else result.device
        )
        return (result[0] + weighted, result[1]) if return_outputs else result + weighted


class LimeSFTTrainer(LimeTagLossMixin, SFTTrainer):
    """
    `trl.SFTTrainer` for LIME models: same arguments, a `LimeTokenizer` as `processing_class`, raw datasets (text,
    chats, prompt-completion; TRL's column names). Every tag stays aligned with its token through tokenisation,
    completion-only and assistant-only loss, truncation and packing (padding-free included); the fused LM head sees
    the metadata; a model with tag heads trains them too. See the module docstring.
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


# --------------------------------------------------------------------------------------------------------------
# DPO


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
    with tag heads trains them on both answers. See the module docstring.
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
    "LimeDataCollatorForLanguageModeling",
    "LimeDataCollatorForPreference",
    "LimeSFTTrainer",
    "prepare_preference_dataset",
    "prepare_sft_dataset",
    "use_lime_fused_lm_head",
]
