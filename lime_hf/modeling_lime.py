"""LIME models: a decoder backbone whose input embeddings are enriched with metadata embeddings.

    E(t_i) = E_tok(t_i) + sum_d w_d * E_d(a_{i+s,d})     (s = `config.metadata_shift`: 0 = LIME, 1 = LIME+1)

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only
``torch``, ``transformers`` and its flat siblings.
"""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_lime import PAD_ID, UNKNOWN_ID, LimeConfig, check_inventories
from .generation import MetadataTracker, parse_guidance, resolve_provider
from .tag_heads import LimeTagHeads, ModelTagProvider, forward_with_tag_heads

logger = logging.get_logger(__name__)

# `*_ids` arguments of transformers that are not metadata fields.
NON_METADATA_IDS = frozenset({"input_ids", "position_ids", "token_type_ids", "next_metadata_ids"})


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
        self.weights = dict(config.metadata_weights)
        self.shift = config.metadata_shift

    def forward(
        self,
        metadata_ids: dict[str, torch.LongTensor],
        input_shape: tuple[int, int],
        next_metadata_ids: dict[str, torch.LongTensor] | None = None,
    ) -> torch.Tensor | None:
        """
        Args:
            metadata_ids: field -> `(batch, seq)` tag ids of the input tokens themselves (validated).
            input_shape: `(batch, seq)` of the input.
            next_metadata_ids: field -> `(batch,)` tag ids of the token *after* the input (LIME+1 only);
                fields left out are unknown there.

        Returns:
            `(batch, seq, hidden)` sum of the weighted field embeddings, or `None` when no field is given
            (so the caller adds nothing and the backbone computes exactly what it would alone).
        """
        next_metadata_ids = next_metadata_ids or {}
        total = None
        for name, table in self.tables.items():
            ids, next_ids = metadata_ids.get(name), next_metadata_ids.get(name)
            if ids is None and next_ids is None:
                continue
            if self.shift:
                ids = self._shift_left(ids, next_ids, input_shape)
            # Unknown shares the zero padding row: "no metadata" must add exactly nothing.
            embedded = table(ids.masked_fill(ids == UNKNOWN_ID, PAD_ID))
            if self.weights[name] != 1.0:
                embedded = embedded * self.weights[name]
            total = embedded if total is None else total + embedded
        return total

    @staticmethod
    def _shift_left(
        ids: torch.LongTensor | None, next_ids: torch.LongTensor | None, input_shape: tuple[int, int]
    ) -> torch.LongTensor:
        """LIME+1: position i takes the tag of token i+1; the last position takes `next_ids` or unknown."""
        if ids is None:  # only the lookahead tag is known for this field
            ids = torch.full(input_shape, UNKNOWN_ID, dtype=torch.long, device=next_ids.device)
        last = next_ids.view(-1, 1) if next_ids is not None else torch.full_like(ids[:, :1], UNKNOWN_ID)
        return torch.cat([ids[:, 1:], last.to(ids.dtype)], dim=1)


class LimePreTrainedModel(PreTrainedModel):
    config_class = LimeConfig
    base_model_prefix = "lime"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: LimeConfig):
        super().__init__(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.metadata_embeddings = LimeMetadataEmbeddings(config)
        self.tag_heads = LimeTagHeads(config) if config.tag_head_fields else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # normal init, zero padding row
        # Loaded weights carry the flag; their unknown row is zero already.
        if isinstance(module, LimeTagEmbedding) and not getattr(module.weight, "_is_hf_initialized", False):
            with torch.no_grad():
                module.weight[UNKNOWN_ID].zero_()
        if isinstance(module, LimeTagHeads) and not getattr(module.start_state, "_is_hf_initialized", False):
            with torch.no_grad():
                module.start_state.zero_()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @classmethod
    def from_backbone(cls, model_or_path: PreTrainedModel | str, **config_kwargs) -> "LimePreTrainedModel":
        """Retrofit a causal-LM checkpoint: its weights plus zero-initialised metadata tables.

        Until the tables are trained, the LIME model's logits equal the checkpoint's for any metadata.

        Args:
            model_or_path: a loaded causal LM, or a path/Hub id for `AutoModelForCausalLM.from_pretrained`.
            config_kwargs: `LimeConfig` arguments (`metadata_fields`, `metadata_weights`, `metadata_shift`,
                `tag_head_fields`, ...). Tag heads start random: they never change the logits.
        """
        backbone = model_or_path
        if not isinstance(backbone, PreTrainedModel):
            backbone = AutoModelForCausalLM.from_pretrained(model_or_path)
        config = LimeConfig(text_config=backbone.config, **config_kwargs)
        with torch.device("meta"):  # skip building (and initialising) a second backbone
            model = cls(config)
        model.language_model = backbone
        model.metadata_embeddings.to_empty(device=backbone.device)
        model.metadata_embeddings.to(backbone.dtype)
        with torch.no_grad():
            for table in model.metadata_embeddings.tables.values():
                table.weight.zero_()
        if model.tag_heads is not None:
            model.tag_heads.to_empty(device=backbone.device)
            model.tag_heads.to(backbone.dtype)
            model.tag_heads.reset_parameters(getattr(backbone.config, "initializer_range", 0.02))
        return model

    def embed_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        metadata_ids: dict[str, torch.LongTensor],
        next_metadata_ids: dict[str, torch.LongTensor] | None,
    ) -> torch.FloatTensor:
        """Token embeddings `(batch, seq, hidden)` plus the metadata embeddings, after validating the tags."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        input_shape = tuple(inputs_embeds.shape[:2])
        self._check_metadata(input_shape, metadata_ids, next_metadata_ids)
        metadata_embeds = self.metadata_embeddings(metadata_ids, input_shape, next_metadata_ids)
        return inputs_embeds if metadata_embeds is None else inputs_embeds + metadata_embeds

    def _collect_metadata(
        self, pos_ids: torch.LongTensor | None, ner_ids: torch.LongTensor | None, kwargs: dict
    ) -> dict[str, torch.LongTensor]:
        """Gather the `<field>_ids` arguments (popping custom ones from `kwargs`); reject unknown fields."""
        given = {"pos": pos_ids, "ner": ner_ids}
        for key in [key for key in kwargs if key.endswith("_ids") and key not in NON_METADATA_IDS]:
            given[key.removesuffix("_ids")] = kwargs.pop(key)
        given = {name: ids for name, ids in given.items() if ids is not None}
        unknown = sorted(set(given) - set(self.config.metadata_fields))
        if unknown:
            raise ValueError(
                f"Unknown metadata field(s) {unknown} (passed as {[f'{name}_ids' for name in unknown]}). "
                f"This model's fields are {list(self.config.metadata_fields)}, "
                f"taken as {[f'{name}_ids' for name in self.config.metadata_fields]}."
            )
        return given

    def _check_metadata(
        self,
        input_shape: tuple[int, int],
        metadata_ids: dict[str, torch.LongTensor],
        next_metadata_ids: dict[str, torch.LongTensor] | None,
    ) -> None:
        if next_metadata_ids and not self.config.metadata_shift:
            raise ValueError(
                "`next_metadata_ids` (tags of the token after the input) only guide LIME+1 models "
                "(metadata_shift=1); this model has metadata_shift=0."
            )
        for name, ids in metadata_ids.items():
            if tuple(ids.shape) != input_shape:
                raise ValueError(
                    f"`{name}_ids` has shape {tuple(ids.shape)} but the input has shape {input_shape}: "
                    f"field '{name}' needs exactly one tag per input token."
                )
            self._check_range(name, f"{name}_ids", ids)
        for name, ids in (next_metadata_ids or {}).items():
            if name not in self.config.metadata_fields:
                raise ValueError(
                    f"`next_metadata_ids` names unknown field '{name}'; fields: {list(self.config.metadata_fields)}."
                )
            if tuple(ids.shape) != input_shape[:1]:
                raise ValueError(
                    f"`next_metadata_ids['{name}']` has shape {tuple(ids.shape)}; expected ({input_shape[0]},): "
                    "one tag per batch row."
                )
            self._check_range(name, f"next_metadata_ids['{name}']", ids)

    def _check_range(self, name: str, argument: str, ids: torch.Tensor) -> None:
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"`{argument}` must hold integer tag ids, got dtype {ids.dtype}.")
        size = len(self.config.metadata_fields[name])
        if ids.numel() and bool(((ids < 0) | (ids >= size)).any()):
            bad = ids[(ids < 0) | (ids >= size)][0].item()
            raise ValueError(
                f"`{argument}` holds tag id {bad}, outside field '{name}' whose inventory has {size} labels: "
                f"valid ids are 0..{size - 1} (0 padding, 1 unknown, 2 special, 3.. labels)."
            )


class LimeModel(LimePreTrainedModel):
    """The LIME backbone without its LM head: returns the last hidden states `(batch, seq, hidden)`.

    It holds the same modules as `LimeForCausalLM`, so the two load each other's checkpoints.
    """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        pos_ids: torch.LongTensor | None = None,
        ner_ids: torch.LongTensor | None = None,
        next_metadata_ids: dict[str, torch.LongTensor] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """See `LimeForCausalLM.forward`; the LM head is not applied."""
        metadata_ids = self._collect_metadata(pos_ids, ner_ids, kwargs)
        inputs_embeds = self.embed_inputs(input_ids, inputs_embeds, metadata_ids, next_metadata_ids)
        return self.language_model.base_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )


class LimeForCausalLM(LimePreTrainedModel, GenerationMixin):
    """A LIME decoder with its LM head. Attention, MLPs, head and loss are the backbone's, untouched."""

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pos_ids: torch.LongTensor | None = None,
        ner_ids: torch.LongTensor | None = None,
        next_metadata_ids: dict[str, torch.LongTensor] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids.
            attention_mask, position_ids, past_key_values, inputs_embeds, labels, use_cache, logits_to_keep:
                as for the backbone's causal LM; `labels` `(batch, seq)` are shifted inside the loss as usual.
            pos_ids, ner_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
                The tags of the tokens in `input_ids`, exactly as `LimeTokenizer` emits them, for LIME and
                LIME+1 alike (a LIME+1 model shifts them itself). A missing field counts as unknown.
                Custom fields are passed the same way as `<field>_ids` keyword arguments.
            next_metadata_ids (`dict[str, torch.LongTensor]`, *optional*):
                LIME+1 only: field -> `(batch,)` tags of the token that follows the input (guidance); the last
                position sees unknown otherwise.
            kwargs: the backbone's extra arguments (`num_items_in_batch`, `output_hidden_states`, ...).
        """
        metadata_ids = self._collect_metadata(pos_ids, ner_ids, kwargs)
        if self.tag_heads is not None:  # tag_heads.py: the heads read the token embeddings and hidden states
            token_embeds = self.embed_inputs(input_ids, inputs_embeds, {}, None)
            return forward_with_tag_heads(
                self,
                self.embed_inputs(None, token_embeds, metadata_ids, next_metadata_ids),
                token_embeds,
                metadata_ids,
                attention_mask,
                labels,
                logits_to_keep,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        inputs_embeds = self.embed_inputs(input_ids, inputs_embeds, metadata_ids, next_metadata_ids)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config=None,
        guidance: dict | None = None,
        metadata_provider=None,
        **kwargs,
    ):
        r"""
        `GenerationMixin.generate` with metadata for the generated tokens. Every decoding setup works (greedy,
        sampling, beam search, left-padded batches, `num_return_sequences`), with and without the KV cache.

        Args:
            inputs, generation_config, kwargs: as for `GenerationMixin.generate`. The prompt's tags come in as
                `pos_ids`/`ner_ids`/`<field>_ids` `(batch, prompt_len)`, e.g. `model.generate(**encoding)`.
                Pass `tokenizer=` (a `LimeTokenizer`) to let a LIME model re-annotate what it generates.
            guidance (`dict`, *optional*): LIME+1 only. Field -> the labels of the next generated tokens: one
                list per batch row (lengths may differ), one list for every row, or a callable
                `(input_ids, step) -> labels` (one label or `None` per row). Where it ends, the provider
                takes over. Example: `guidance={"pos": [["VBZ", "DT"]]}`.
            metadata_provider (*optional*): tags of generated tokens where guidance has none: `"model"` (the
                tag heads, on device: the default for a model that has them; LIME+1 guides itself by
                `config.self_guidance`), `"annotate"` (re-annotate the decoded tail; default for LIME when
                `tokenizer` is given), `"unknown"`, or a callable `(input_ids, step) -> {field: labels}` giving
                the tags of each row's last token (LIME) or of its next token (LIME+1).
        """
        prompt_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt_ids is None:
            raise ValueError(
                "LIME generation needs the prompt as `input_ids` (inputs_embeds alone carry no tags)."
            )
        prompt_metadata = self._collect_metadata(
            kwargs.pop("pos_ids", None), kwargs.pop("ner_ids", None), kwargs
        )
        self._check_metadata(tuple(prompt_ids.shape), prompt_metadata, None)
        if guidance and not self.config.metadata_shift:
            raise ValueError(
                "`guidance` gives the tags of the *next* token, which only a LIME+1 model (metadata_shift=1) "
                "reads; this is a LIME model (metadata_shift=0). Use `metadata_provider` for its tags."
            )
        if metadata_provider == "model" or (metadata_provider is None and self.tag_heads is not None):
            metadata_provider = ModelTagProvider(self, kwargs.get("attention_mask"))
        tokenizer = kwargs.get("tokenizer")
        if getattr(tokenizer, "metadata_fields", None) is not None:
            check_inventories(tokenizer.metadata_fields, self.config.metadata_fields)
        if metadata_provider is None and tokenizer is None and not guidance:
            logger.warning_once(
                "LIME generate: no `tokenizer`, `guidance` or `metadata_provider` given, so generated tokens get "
                "'unknown' metadata."
            )
        kwargs["lime_tracker"] = MetadataTracker(
            prompt_metadata=prompt_metadata,
            prompt_ids=prompt_ids,
            metadata_fields=self.config.metadata_fields,
            metadata_shift=self.config.metadata_shift,
            provider=resolve_provider(metadata_provider, tokenizer, self.config.metadata_shift),
            guidance=parse_guidance(guidance, self.config.metadata_fields, prompt_ids.shape[0]),
        )
        return super().generate(inputs, generation_config, **kwargs)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        tracker = model_kwargs.get("lime_tracker")
        if tracker is not None and tracker.uses_hidden_states:  # the tag heads read these states next step
            tracker.record_hidden(outputs.last_hidden_state[:, -1])
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        lime_tracker: MetadataTracker | None = None,
        **kwargs,
    ) -> dict:
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, **kwargs
        )
        if lime_tracker is not None:
            model_inputs.update(lime_tracker.model_inputs(input_ids, model_inputs["input_ids"].shape[1]))
        return model_inputs


__all__ = ["LimeForCausalLM", "LimeModel", "LimePreTrainedModel"]
