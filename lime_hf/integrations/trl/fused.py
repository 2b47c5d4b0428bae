"""TRL's fused LM head on a LIME model: the backbone's causal LM fed the enriched `inputs_embeds` (and the tag heads
on the same hidden states), and the mixin that adds the heads' loss to TRL's."""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from ...configuration_lime import check_inventories
from ...modeling_lime import LimePreTrainedModel
from .common import FUSED_OUTPUTS, metadata_columns, unwrap_lime


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


__all__ = [
    "LimeTagLossMixin",
    "lime_fused_forward",
    "use_lime_fused_lm_head",
]
