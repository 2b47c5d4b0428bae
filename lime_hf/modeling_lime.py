"""LIME models: a decoder backbone whose input embeddings are enriched with metadata embeddings.

    E(t_i) = E_tok(t_i) + sum_d w_d * E_d(a_{i+s,d})     (s = `config.metadata_shift`: 0 = LIME, 1 = LIME+1)

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only
``torch``, ``transformers`` and its flat siblings.
"""

import inspect

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import TransformersKwargs, logging

from .configuration_lime import PAD_ID, SPECIAL_ID, UNKNOWN_ID, LimeConfig, check_inventories
from .generation import MetadataTracker, parse_guidance, resolve_provider
from .meta_attention import STATE_KEYWORD, LimeMetaAttentionLayers, check_meta_generation
from .tag_heads import LimeTagHeads, ModelTagProvider, forward_with_tag_heads, self_tags

logger = logging.get_logger(__name__)


def merge_cache_arguments(cache, past_key_values):
    """The KV cache passed as `cache` (transformers >= 5.24) or `past_key_values` (its earlier name)."""
    if cache is not None and past_key_values is not None:
        raise ValueError(
            "Pass the KV cache once: as `cache`, or as `past_key_values` (its name before transformers 5.24)."
        )
    return cache if cache is not None else past_key_values


def cache_argument_name(parameters: frozenset[str]) -> str:
    """The name under which a forward with these `parameters` takes the KV cache in the installed transformers."""
    return "cache" if "cache" in parameters else "past_key_values"


# How `GenerationMixin` of the installed transformers carries the cache in its model kwargs.
GENERATION_CACHE_NAME = cache_argument_name(
    frozenset(inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters)
)


# PEFT's prompt tuning and p-tuning put learned embeddings in front of the token embeddings (`inputs_embeds`)
# and pass the tags on unchanged: no tag belongs to those positions, and guessing would misalign every other.
PREPENDED_POSITIONS = (
    " The input has {} more positions than the tags: if PEFT's prompt tuning or p-tuning put virtual tokens in "
    "front of `inputs_embeds`, those have no tags, so a LIME model cannot be tuned that way. Use LoRA "
    "(`lime_hf.integrations.peft.lime_lora_config`) or prefix tuning, whose virtual tokens live in the KV cache."
)


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
    ) -> torch.Tensor:
        """
        Args:
            metadata_ids: field -> `(batch, seq)` tag ids of the input tokens themselves (validated).
            input_shape: `(batch, seq)` of the input.
            next_metadata_ids: field -> `(batch,)` tag ids of the token *after* the input (LIME+1 only);
                fields left out are unknown there.

        Returns:
            `(batch, seq, hidden)` sum of the weighted field embeddings. A field that is not given is unknown
            everywhere and embeds to exact zeros; it is still looked up, so that every table takes part in
            every step (DDP needs no `find_unused_parameters` for batches with and without metadata).
        """
        next_metadata_ids = next_metadata_ids or {}
        total = None
        for name, table in self.tables.items():
            ids, next_ids = metadata_ids.get(name), next_metadata_ids.get(name)
            if self.shift:
                ids = self._shift_left(ids, next_ids, input_shape, table.weight.device)
            elif ids is None:
                ids = torch.full(input_shape, UNKNOWN_ID, dtype=torch.long, device=table.weight.device)
            # Unknown shares the zero padding row: "no metadata" must add exactly nothing.
            embedded = table(ids.masked_fill(ids == UNKNOWN_ID, PAD_ID))
            if self.weights[name] != 1.0:
                embedded = embedded * self.weights[name]
            total = embedded if total is None else total + embedded
        return total

    @staticmethod
    def _shift_left(
        ids: torch.LongTensor | None,
        next_ids: torch.LongTensor | None,
        input_shape: tuple[int, int],
        device: torch.device,
    ) -> torch.LongTensor:
        """LIME+1: position i takes the tag of token i+1; the last position takes `next_ids` or unknown."""
        if ids is None:  # at most the lookahead tag is known for this field
            ids = torch.full(input_shape, UNKNOWN_ID, dtype=torch.long, device=device)
        last = next_ids.view(-1, 1) if next_ids is not None else torch.full_like(ids[:, :1], UNKNOWN_ID)
        return torch.cat([ids[:, 1:], last.to(ids.dtype)], dim=1)


class LimePreTrainedModel(PreTrainedModel):
    config_class = LimeConfig
    # The backbone (a `*ForCausalLM`) is the model's body; the metadata tables sit beside it.
    base_model_prefix = "language_model"
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
        self.meta_attention = LimeMetaAttentionLayers(config) if config.meta_token_ids else None
        if self.meta_attention is not None:
            self.meta_attention.attach(self.language_model)
        self.post_init()

    @property
    def _backbone_parameters(self) -> frozenset[str]:
        """The argument names of the backbone's forward (read once: they decide how the backbone is called)."""
        backbone_class = type(self.language_model)
        if getattr(self, "_backbone_parameters_of", None) is not backbone_class:
            self._backbone_parameters_of = backbone_class
            self._backbone_parameters_cache = frozenset(inspect.signature(backbone_class.forward).parameters)
        return self._backbone_parameters_cache

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # normal init, zero padding row
        # Loaded weights carry the flag; their unknown row is zero already.
        if isinstance(module, LimeTagEmbedding) and not getattr(module.weight, "_is_hf_initialized", False):
            with torch.no_grad():
                module.weight[UNKNOWN_ID].zero_()
        if isinstance(module, LimeTagHeads) and not getattr(module.start_state, "_is_hf_initialized", False):
            with torch.no_grad():
                module.start_state.zero_()

    @property
    def _can_compile_fullgraph(self) -> bool:
        # The metadata tables add no graph break; whether the whole forward compiles is the backbone's matter.
        return self.language_model._can_compile_fullgraph

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
        if model.meta_attention is not None:  # random: a retrofit learns its meta-tokens from scratch
            model.meta_attention.to_empty(device=backbone.device)
            model.meta_attention.to(backbone.dtype)
            for sublayer in model.meta_attention.layers:
                sublayer.reset_parameters(getattr(backbone.config, "initializer_range", 0.02))
            model.meta_attention.attach(backbone)
        return model

    def prepare_backbone_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        pos_ids: torch.LongTensor | None,
        ner_ids: torch.LongTensor | None,
        next_metadata_ids: dict[str, torch.LongTensor] | None,
        kwargs: dict,
    ) -> tuple[torch.FloatTensor, dict]:
        """The enriched `inputs_embeds` and the keywords left for the backbone (this model's fields removed)."""
        kwargs = dict(kwargs)
        metadata_ids = self._collect_metadata(pos_ids, ner_ids, kwargs)
        self._check_backbone_kwargs(kwargs)
        return self.embed_inputs(input_ids, inputs_embeds, metadata_ids, next_metadata_ids), kwargs

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
        if not self.config.metadata_fields:  # a model with meta-tokens only
            return inputs_embeds
        return inputs_embeds + self.metadata_embeddings(metadata_ids, input_shape, next_metadata_ids)

    def prepare_meta_attention(
        self,
        input_ids: torch.LongTensor | None,
        labels: torch.LongTensor | None,
        cache,
        use_cache: bool | None,
        kwargs: dict,
    ) -> tuple[torch.LongTensor | None, object]:
        """Labels without meta-token targets and the cache for the backbone; the call's meta-attention state goes
        into the backbone's `kwargs` (see `meta_attention.py`). Without meta-tokens: both as given."""
        if self.meta_attention is None:
            return labels, cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        # Under gradient checkpointing in training the backbone's layers write no cache; neither do the sublayers.
        checkpointing = getattr(self.language_model.base_model, "gradient_checkpointing", False)
        writes_cache = not (checkpointing and self.training and torch.is_grad_enabled())
        labels, cache, state = self.meta_attention.prepare(input_ids, labels, cache, use_cache, writes_cache)
        if state is not None:
            kwargs[STATE_KEYWORD] = state
        return labels, cache

    def _collect_metadata(
        self, pos_ids: torch.LongTensor | None, ner_ids: torch.LongTensor | None, kwargs: dict
    ) -> dict[str, torch.LongTensor]:
        """Pop this model's `<field>_ids` from `kwargs`; every other keyword is left for the backbone."""
        given = {"pos": pos_ids, "ner": ner_ids}
        for name in self.config.metadata_fields:
            if f"{name}_ids" in kwargs:
                given[name] = kwargs.pop(f"{name}_ids")
        given = {name: ids for name, ids in given.items() if ids is not None}
        unknown = sorted(set(given) - set(self.config.metadata_fields))
        if unknown:
            raise ValueError(
                f"Unknown metadata field(s) {unknown} (passed as {[f'{name}_ids' for name in unknown]}). "
                f"This model's fields are {list(self.config.metadata_fields)}, "
                f"taken as {[f'{name}_ids' for name in self.config.metadata_fields]}."
            )
        return given

    def _check_backbone_kwargs(self, kwargs: dict) -> None:
        """A `<name>_ids` keyword that is neither a field of this model nor an argument of the backbone would be
        swallowed by the backbone's `**kwargs` without effect: most likely a mistyped or missing field."""
        accepted = self._backbone_parameters | TransformersKwargs.__optional_keys__
        for key in kwargs:
            # Token-type ids are generic inputs that `generate` forwards to any model; backbones may ignore them.
            if key.endswith("_ids") and key not in accepted and not key.endswith("token_type_ids"):
                raise ValueError(
                    f"`{key}` is neither a metadata field of this model (its fields are "
                    f"{[f'{name}_ids' for name in self.config.metadata_fields]}) nor an argument of its "
                    f"{type(self.language_model).__name__} backbone."
                )

    def _check_metadata(
        self,
        input_shape: tuple[int, int],
        metadata_ids: dict[str, torch.LongTensor],
        next_metadata_ids: dict[str, torch.LongTensor] | None,
    ) -> None:
        if torch.compiler.is_compiling():
            return  # the checks read tensor values; a compiled graph must not break on them
        if next_metadata_ids and not self.config.metadata_shift:
            raise ValueError(
                "`next_metadata_ids` (tags of the token after the input) only guide LIME+1 models "
                "(metadata_shift=1); this model has metadata_shift=0."
            )
        for name, ids in metadata_ids.items():
            if tuple(ids.shape) != input_shape:
                prepended = (
                    ids.dim() == 2 and ids.shape[0] == input_shape[0] and ids.shape[1] < input_shape[1]
                )
                raise ValueError(
                    f"`{name}_ids` has shape {tuple(ids.shape)} but the input has shape {input_shape}: "
                    f"field '{name}' needs exactly one tag per input token."
                    + (PREPENDED_POSITIONS.format(input_shape[1] - ids.shape[1]) if prepended else "")
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

    _auto_class = "AutoModel"  # `save_pretrained` copies the code files, for `trust_remote_code=True` users

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        pos_ids: torch.LongTensor | None = None,
        ner_ids: torch.LongTensor | None = None,
        next_metadata_ids: dict[str, torch.LongTensor] | None = None,
        past_key_values=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """See `LimeForCausalLM.forward`; the LM head is not applied."""
        backbone = self.language_model.base_model
        inputs_embeds, kwargs = self.prepare_backbone_inputs(
            input_ids, inputs_embeds, pos_ids, ner_ids, next_metadata_ids, kwargs
        )
        cache_name = cache_argument_name(self._backbone_parameters)
        _, kwargs[cache_name] = self.prepare_meta_attention(
            input_ids, None, merge_cache_arguments(cache, past_key_values), use_cache, kwargs
        )
        return backbone(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )


class LimeForCausalLM(LimePreTrainedModel, GenerationMixin):
    """A LIME decoder with its LM head. Attention, MLPs, head and loss are the backbone's, untouched."""

    _auto_class = "AutoModelForCausalLM"  # `save_pretrained` copies the code files (remote code)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pos_ids: torch.LongTensor | None = None,
        ner_ids: torch.LongTensor | None = None,
        next_metadata_ids: dict[str, torch.LongTensor] | None = None,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids.
            attention_mask, position_ids, cache, inputs_embeds, labels, use_cache, logits_to_keep:
                as for the backbone's causal LM; `labels` `(batch, seq)` are shifted inside the loss as usual.
                The output holds the KV cache under the name the installed transformers uses (`cache` since
                5.24, `past_key_values` before).
            pos_ids, ner_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
                The tags of the tokens in `input_ids`, exactly as `LimeTokenizer` emits them, for LIME and
                LIME+1 alike (a LIME+1 model shifts them itself). A missing field counts as unknown.
                Custom fields are passed the same way as `<field>_ids` keyword arguments.
            next_metadata_ids (`dict[str, torch.LongTensor]`, *optional*):
                LIME+1 only: field -> `(batch,)` tags of the token that follows the input (guidance); the last
                position sees unknown otherwise.
            past_key_values: the KV cache under its name before transformers 5.24; give `cache` or this.
            kwargs: the backbone's extra arguments (`num_items_in_batch`, `output_hidden_states`, ...).

        A model with tag heads given `input_ids` alone (no `<field>_ids`, no `next_metadata_ids`, no cache) tags
        itself: its heads predict every position's tags causally, exactly as `tag_heads.self_tagged_forward`
        (the honest mode: each tag depends on the tokens up to it only), and the forward then reads those
        tags. This costs a second pass: one incremental step per position (the FLOPs of about one forward,
        but `seq` sequential calls, no gradient) before the ordinary forward. So a harness that passes token
        ids only (lm-eval's `--model hf`) scores the model as it generates. The tag losses then stay empty
        (there are no given tags to learn); `position_ids` are derived from `attention_mask` for the tagging.
        A model without heads reads unknown tags here, as for any missing field.
        """
        if self.tag_heads is not None:  # tag_heads.py: the heads read the token embeddings and hidden states
            kwargs = dict(kwargs)
            metadata_ids = self._collect_metadata(pos_ids, ner_ids, kwargs)
            self._check_backbone_kwargs(kwargs)
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
            token_embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
            cache = merge_cache_arguments(cache, past_key_values)
            fed_ids, fed_next = metadata_ids, next_metadata_ids
            if not metadata_ids and next_metadata_ids is None and input_ids is not None and cache is None:
                fed_ids, fed_next = self_tags(self, input_ids, attention_mask)  # e.g. lm-eval's `--model hf`
            cache_name = cache_argument_name(self._backbone_parameters)
            labels, kwargs[cache_name] = self.prepare_meta_attention(
                input_ids, labels, cache, use_cache, kwargs
            )
            return forward_with_tag_heads(
                self,
                self.embed_inputs(None, token_embeds, fed_ids, fed_next),
                token_embeds,
                metadata_ids,
                attention_mask,
                labels,
                logits_to_keep,
                position_ids=position_ids,
                use_cache=use_cache,
                **kwargs,
            )
        inputs_embeds, kwargs = self.prepare_backbone_inputs(
            input_ids, inputs_embeds, pos_ids, ner_ids, next_metadata_ids, kwargs
        )
        cache_name = cache_argument_name(self._backbone_parameters)
        labels, kwargs[cache_name] = self.prepare_meta_attention(
            input_ids, labels, merge_cache_arguments(cache, past_key_values), use_cache, kwargs
        )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
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
        Only this model's `<field>_ids` are read as metadata; every other keyword (`bad_words_ids`, logits
        processors, stopping criteria, streamers, `assistant_model`, ...) means what it means for the backbone.
        With no prompt, generation starts from BOS (tags: special), as the backbone's does.

        With `return_dict_in_generate=True` the output also holds `metadata_ids`: `{"<field>_ids": (rows, seq)}`,
        the tags of every position of `sequences`. Passing them back with `sequences` and the output's cache
        continues the generation exactly as one longer call would.

        Args:
            inputs, generation_config, kwargs: as for `GenerationMixin.generate`. The prompt's tags come in as
                `pos_ids`/`ner_ids`/`<field>_ids` `(batch, prompt_len)`, e.g. `model.generate(**encoding)`.
                With none of them, a model whose heads provide the tags tags the prompt itself first (one
                incremental pass over the prompt, as `forward` does for untagged `input_ids`).
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
        if "lime_tracker" not in inspect.signature(self.prepare_inputs_for_generation).parameters:
            raise ValueError(
                "This model's `prepare_inputs_for_generation` was replaced by one that does not feed the tags of "
                "generated tokens (PEFT's prefix tuning, prompt tuning and p-tuning replace it), so LIME "
                "`generate` cannot run on it. Generate with a LoRA-tuned model (`lime_hf.integrations.peft`)."
            )
        prompt_ids = inputs if inputs is not None else kwargs.get("input_ids")
        prompt_metadata = self._collect_metadata(
            kwargs.pop("pos_ids", None), kwargs.pop("ner_ids", None), kwargs
        )
        if prompt_ids is None:
            if kwargs.get("inputs_embeds") is not None:
                raise ValueError(
                    "LIME generation needs the prompt as `input_ids`: `inputs_embeds` alone carry no tags."
                )
            inputs = prompt_ids = self._bos_prompt(generation_config, kwargs)
            prompt_metadata = {
                name: torch.full_like(inputs, SPECIAL_ID) for name in self.config.metadata_fields
            }
        self._check_metadata(tuple(prompt_ids.shape), prompt_metadata, None)
        if guidance and not self.config.metadata_shift:
            raise ValueError(
                "`guidance` gives the tags of the *next* token, which only a LIME+1 model (metadata_shift=1) "
                "reads; this is a LIME model (metadata_shift=0). Use `metadata_provider` for its tags."
            )
        if metadata_provider == "model" or (metadata_provider is None and self.tag_heads is not None):
            metadata_provider = ModelTagProvider(self, kwargs.get("attention_mask"))
        if isinstance(metadata_provider, ModelTagProvider) and not prompt_metadata:
            # An untagged prompt (lm-eval's `--model hf`): the heads tag it causally, as `forward` does.
            prompt_metadata, _ = self_tags(self, prompt_ids, kwargs.get("attention_mask"))
        tokenizer = kwargs.get("tokenizer")
        if getattr(tokenizer, "metadata_fields", None) is not None:
            check_inventories(tokenizer.metadata_fields, self.config.metadata_fields)
        if metadata_provider is None and tokenizer is None and not guidance and self.config.metadata_fields:
            logger.warning_once(
                "LIME generate: no `tokenizer`, `guidance` or `metadata_provider` given, so generated tokens get "
                "'unknown' metadata."
            )
        tracker = kwargs.pop("lime_tracker", None)  # set when a LIME model assists another one's generation
        if tracker is None and self.config.metadata_fields:  # meta-tokens only: no tags to track
            tracker = MetadataTracker(
                prompt_metadata=prompt_metadata,
                prompt_ids=prompt_ids,
                metadata_fields=self.config.metadata_fields,
                metadata_shift=self.config.metadata_shift,
                provider=resolve_provider(metadata_provider, tokenizer, self.config.metadata_shift),
                guidance=parse_guidance(guidance, self.config.metadata_fields, prompt_ids.shape[0]),
            )
        elif tracker is not None and (tracker.metadata_fields, tracker.shift) != (
            self.config.metadata_fields,
            self.config.metadata_shift,
        ):
            raise ValueError(
                "An assistant model must read the same metadata as the model it assists: same fields and "
                f"metadata_shift (assisted model: shift {tracker.shift}, fields {list(tracker.metadata_fields)}; "
                f"assistant: shift {self.config.metadata_shift}, fields {list(self.config.metadata_fields)})."
            )
        check_meta_generation(self.config, kwargs, generation_config or self.generation_config)
        if GENERATION_CACHE_NAME == "past_key_values" and "cache" in kwargs:
            kwargs["past_key_values"] = merge_cache_arguments(
                kwargs.pop("cache"), kwargs.get("past_key_values")
            )
        output = super().generate(inputs, generation_config, lime_tracker=tracker, **kwargs)
        if isinstance(output, torch.Tensor) or tracker is None:
            return output
        # The tags of every position of `sequences`, as `generate` fed them (or, for the last token of a LIME
        # model, as it would feed them next): continuing from `output` with them equals one longer call.
        output["metadata_ids"] = tracker.metadata_ids(output.sequences)
        return output

    def _bos_prompt(self, generation_config, kwargs: dict) -> torch.LongTensor:
        """`(1, 1)` BOS ids: where the backbone's `generate` starts when it is given no prompt."""
        bos_token_id = kwargs.get("bos_token_id")
        if bos_token_id is None:
            bos_token_id = (generation_config or self.generation_config).bos_token_id
        if bos_token_id is None:
            raise ValueError(
                "`generate` was given no prompt and the model has no `bos_token_id` to start from: pass "
                "`input_ids` (with their `<field>_ids` tags) or set `generation_config.bos_token_id`."
            )
        return torch.full((1, 1), bos_token_id, dtype=torch.long, device=self.device)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        tracker = model_kwargs.get("lime_tracker")
        # The tag heads read these states at the next step (not an assistant's: it has its own states).
        if tracker is not None and getattr(tracker.provider, "model", None) is self:
            tracker.record_hidden(outputs.last_hidden_state)
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
