"""The parts of `LimeForCausalLM.from_backbone`: a LIME model built around an existing backbone.

A plain causal LM gets zero-initialised metadata tables (its logits unchanged until they train), random tag heads
and meta-attention. A LIME model given instead keeps what it learned: its tables, heads and meta-attention carry
over where their shapes still fit, and only what the new settings add or reshape starts fresh.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``,
``transformers`` and its flat siblings.
"""

import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_lime import LimeConfig


def settings_with(config: LimeConfig, config_kwargs: dict) -> dict:
    """A LIME model's settings (every `LimeConfig` argument but `text_config`) with `config_kwargs` applied."""
    names = [name for name in LimeConfig.__annotations__ if name != "text_config"]
    settings = {name: getattr(config, name) for name in names}
    fields = config_kwargs.get("metadata_fields", settings["metadata_fields"])
    if fields != settings["metadata_fields"]:
        raise ValueError(
            "from_backbone on a LIME model keeps its metadata fields and their inventories (its tables were "
            "trained on them); to change them, retrofit its backbone instead: "
            "`LimeForCausalLM.from_backbone(model.language_model, metadata_fields=...)`."
        )
    return {**settings, **config_kwargs}


def detach_backbone(model: PreTrainedModel) -> None:
    """Remove a LIME model's hooks from its backbone (meta-attention, metadata injection)."""
    for part in (model.meta_attention, model.metadata_injection):
        if part is not None:
            part.detach()


def take_parts(model: PreTrainedModel, trained: PreTrainedModel) -> None:
    """Share `trained`'s metadata tables, tag heads and meta-attention weights with `model` where their shapes are
    the same; the rest stays on the meta device for `initialize_new_parts`."""
    own = model.state_dict(keep_vars=True)
    kept = {
        key: value
        for key, value in trained.state_dict(keep_vars=True).items()
        if not key.startswith("language_model.") and key in own and own[key].shape == value.shape
    }
    model.load_state_dict(kept, strict=False, assign=True)


def initialize_new_parts(model: PreTrainedModel, backbone: PreTrainedModel) -> None:
    """Build `model`'s parts still on the meta device beside `backbone` (zero tables, random heads and
    meta-attention) and hook meta-attention and metadata injection into it."""
    std = getattr(backbone.config, "initializer_range", 0.02)
    for table in model.metadata_embeddings.tables.values():
        if table.weight.is_meta:
            table.to_empty(device=backbone.device).to(backbone.dtype)
            with torch.no_grad():
                table.weight.zero_()
    if model.tag_heads is not None and _on_meta_device(model.tag_heads):
        model.tag_heads.to_empty(device=backbone.device).to(backbone.dtype)
        model.tag_heads.reset_parameters(std)
    if model.meta_attention is not None:
        if _on_meta_device(model.meta_attention):  # random: a retrofit learns its meta-tokens from scratch
            model.meta_attention.to_empty(device=backbone.device).to(backbone.dtype)
            for sublayer in model.meta_attention.layers:
                sublayer.reset_parameters(std)
        model.meta_attention.attach(backbone)
    if model.metadata_injection is not None:
        model.metadata_injection.attach(backbone)


def _on_meta_device(module: nn.Module) -> bool:
    """Whether any parameter of `module` is still on the meta device (not loaded, not built)."""
    return any(parameter.is_meta for parameter in module.parameters())
