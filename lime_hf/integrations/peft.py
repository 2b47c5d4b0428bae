"""PEFT for LIME models: LoRA on the backbone's attention, with the metadata tables (and tag heads) trained whole.

    model = LimeForCausalLM.from_backbone("an/existing-checkpoint")
    peft_model = get_peft_model(model, lime_lora_config(model, r=8))

Why `modules_to_save` and not `trainable_token_indices`: the latter trains chosen rows of an embedding that is
already trained (new tokens added to a vocabulary) and keeps the rest frozen. A retrofitted model's metadata
tables are new and start at zero, every row has to be learnt, and they are small (a few dozen rows per field):
PEFT's mechanism for modules trained in full is `modules_to_save`. It trains a copy of each module, saves it in
the adapter and puts it in place of the original on `merge_and_unload`. The tag heads and the meta-attention
sublayers, new too, go the same way (the hooks that run a sublayer look it up at each call, so they run PEFT's
copy). The meta-tokens are new rows of the token embedding: `trainable_token_indices` trains those rows only.

Prompt-learning methods: prefix tuning trains and scores as it is; its virtual tokens exist only in the KV
cache, so the tags stay on the real tokens they belong to. Prompt tuning and p-tuning put virtual tokens in
front of `inputs_embeds`, and those positions have no tags: the model raises a `ValueError` that says so. For
every prompt-learning method PEFT's `generate` swaps in its own `prepare_inputs_for_generation`, which does not
feed the tags of generated tokens, and LIME's `generate` refuses it with a `ValueError`. Generate with LoRA.

Needs `pip install "lime_hf[peft]"`.
"""

from __future__ import annotations

import re

from peft import LoraConfig
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers.pytorch_utils import Conv1D

from ..modeling_lime import LimePreTrainedModel

# The attention projections of Llama, Qwen2, Mistral, Gemma and their kin; other backbones take PEFT's default.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _check_lime(model: LimePreTrainedModel) -> None:
    if getattr(model.config, "model_type", None) != "lime":
        raise ValueError(
            f"Expected a LIME model (`LimeForCausalLM`, model_type 'lime'), got {type(model).__name__} with "
            f"model_type {getattr(model.config, 'model_type', None)!r}. Retrofit a checkpoint first: "
            "`LimeForCausalLM.from_backbone(...)`."
        )


def lime_modules_to_save(model: LimePreTrainedModel) -> list[str]:
    """The modules a LIME model adds to its backbone: `metadata_embeddings`, `tag_heads` if it has them, and each
    meta-attention sublayer (`meta_attention.layers.<i>`) if it has meta-tokens."""
    _check_lime(model)
    modules = ["metadata_embeddings"] + (["tag_heads"] if model.tag_heads is not None else [])
    if model.meta_attention is not None:
        modules += [f"meta_attention.layers.{index}" for index in range(len(model.meta_attention.layers))]
    return modules


def lime_target_modules(model: LimePreTrainedModel) -> str:
    """A `target_modules` regex of the backbone's attention projections (the LIME modules are never matched).

    q/k/v/o projections where the backbone has them (Llama, Qwen2, ...); else PEFT's default for the backbone's
    `model_type` (GPT-2: `c_attn`).
    """
    _check_lime(model)
    backbone_type = model.config.text_config.model_type
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.language_model.named_modules()}
    names = [name for name in ATTENTION_PROJECTIONS if name in leaf_names]
    if not names:
        names = [
            name
            for name in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(backbone_type, [])
            if name in leaf_names
        ]
    if not names:
        raise ValueError(
            f"Found no attention projections to adapt in the {backbone_type!r} backbone (looked for "
            f"{list(ATTENTION_PROJECTIONS)} and PEFT's defaults for {backbone_type!r}). Pass `target_modules=` "
            "to `lime_lora_config`: the names of the backbone's linear layers to adapt."
        )
    return rf"language_model\..*\.({'|'.join(map(re.escape, names))})"


def lime_lora_config(model: LimePreTrainedModel, **lora_kwargs) -> LoraConfig:
    """A `LoraConfig` for `model`: LoRA on the backbone's attention; metadata tables, tag heads and meta-attention
    sublayers trained whole; the meta-tokens' rows of the token embedding trained (`trainable_token_indices`).

    Args:
        model (`LimeForCausalLM`): typically fresh from `LimeForCausalLM.from_backbone`.
        lora_kwargs: any `LoraConfig` argument (`r`, `lora_alpha`, `lora_dropout`, ...). `target_modules`
            replaces the attention projections found by `lime_target_modules`; `modules_to_save` is added to
            `lime_modules_to_save(model)`; `trainable_token_indices` defaults to `model.config.meta_token_ids`
            (new tokens, e.g. after `resize_token_embeddings`). `task_type` is `"CAUSAL_LM"`.

    Returns:
        The config for `peft.get_peft_model(model, config)`.
    """
    modules_to_save = lime_modules_to_save(model)
    modules_to_save += [
        name for name in lora_kwargs.pop("modules_to_save", None) or [] if name not in modules_to_save
    ]
    if lora_kwargs.setdefault("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise ValueError(
            f"A LIME model is a causal LM: task_type must be 'CAUSAL_LM', got {lora_kwargs['task_type']!r}."
        )
    if lora_kwargs.get("target_modules") is None:
        lora_kwargs["target_modules"] = lime_target_modules(model)
        # GPT-2's projections are `Conv1D`s (weights stored transposed): PEFT needs `fan_in_fan_out`, and warns
        # while setting it itself when it is not given.
        if any(isinstance(module, Conv1D) for module in model.language_model.modules()):
            lora_kwargs.setdefault("fan_in_fan_out", True)
    if lora_kwargs.get("trainable_token_indices") is None and model.config.meta_token_ids:
        lora_kwargs["trainable_token_indices"] = list(model.config.meta_token_ids)
    return LoraConfig(modules_to_save=modules_to_save, **lora_kwargs)


__all__ = ["lime_lora_config", "lime_modules_to_save", "lime_target_modules"]
