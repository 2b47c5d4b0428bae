"""LIME models: a decoder backbone whose input embeddings are enriched with metadata embeddings.

    E(t_i) = E_tok(t_i) + sum_d w_d * E_d(a_{i+s,d})     (s = `config.metadata_shift`: 0 = LIME, 1 = LIME+1)

One forward, read top to bottom: the tags in -> embeddings (token + metadata) -> meta-attention preparation ->
the backbone -> tag heads -> output. Tag heads (`tag_heads.py`) and meta-attention (`meta_attention.py`) compute
their part; generation (`generation.py`, `LimeGenerationMixin`) owns `generate`, and `metadata_tracker.py` its per-step bookkeeping.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only
``torch``, ``transformers`` and its flat siblings.
"""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import TransformersKwargs

from .compat import accept_past_key_values, backbone_parameters, cache_keyword
from .configuration_lime import UNKNOWN_ID, LimeConfig
from .generation import LimeGenerationMixin
from .meta_attention import LimeMetaAttentionLayers, MetaAttentionState
from .metadata_embeddings import LimeMetadataEmbeddings, LimeTagEmbedding
from .metadata_injection import STATE_KEYWORD as INJECTION_KEYWORD
from .metadata_injection import LimeMetadataInjection, MetadataInjectionState
from .retrofit import detach_backbone, initialize_new_parts, settings_with, take_parts
from .tag_heads import LimeCausalLMOutputWithPast, LimeTagHeads, self_tags

# PEFT's prompt tuning and p-tuning put learned embeddings in front of the token embeddings (`inputs_embeds`)
# and pass the tags on unchanged: no tag belongs to those positions, and guessing would misalign every other.
UNTAGGED_TRAINING = (
    "A model with tag heads was given `labels` but no tags (`<field>_ids`): its heads would learn nothing and its "
    "LM would train on tags it never reads in use. Pass the tags `LimeTokenizer` emits, or say what the forward "
    "reads: `self_tag=True` (the heads' own causal predictions: one sequential step per token, or in the same pass "
    "with `metadata_layer` > 0) or `self_tag=False` (unknown tags: the backbone alone)."
)
PREPENDED_POSITIONS = (
    " The input has {} more positions than the tags: if PEFT's prompt tuning or p-tuning put virtual tokens in "
    "front of `inputs_embeds`, those have no tags, so a LIME model cannot be tuned that way. Use LoRA "
    "(`lime_hf.integrations.peft.lime_lora_config`) or prefix tuning, whose virtual tokens live in the KV cache."
)


_ACCEPTED: dict[type, frozenset[str]] = {}


def _accepted_keywords(backbone: nn.Module) -> frozenset[str]:
    """The keywords a backbone's forward takes, with transformers' common ones, once per class (checked every call)."""
    owner = type(backbone)
    if owner not in _ACCEPTED:
        _ACCEPTED[owner] = backbone_parameters(backbone) | TransformersKwargs.__optional_keys__
    return _ACCEPTED[owner]


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
        # The config checked its rules across fields when it was made; `from_pretrained(..., key=value)` and a user's
        # edits set fields one at a time since, and a model built on a broken pair would ignore one of them silently.
        config.validate_lime()
        super().__init__(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.metadata_embeddings = LimeMetadataEmbeddings(config)
        self.tag_heads = LimeTagHeads(config) if config.tag_head_fields else None
        self.meta_attention = LimeMetaAttentionLayers(config) if config.meta_token_ids else None
        if self.meta_attention is not None:
            self.meta_attention.attach(self.language_model)
        # Not a module: the tables and heads stay where they are (their weight names do not depend on the layer).
        self.metadata_injection = (
            LimeMetadataInjection(config.metadata_layer) if config.metadata_layer else None
        )
        if self.metadata_injection is not None:
            self.metadata_injection.attach(self.language_model)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # normal init, zero padding row
        # Loaded weights carry the flag; their unknown row is zero already.
        if isinstance(module, LimeTagEmbedding) and not getattr(module.weight, "_is_hf_initialized", False):
            with torch.no_grad():
                module.weight[UNKNOWN_ID].zero_()
        if (
            isinstance(module, LimeTagHeads)
            and module.reads_previous_state
            and not getattr(module.start_state, "_is_hf_initialized", False)
        ):
            with torch.no_grad():
                module.start_state.zero_()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether activation checkpointing is on. PEFT reads this name on every `get_peft_model`, where recent
        Transformers deprecate it with a FutureWarning the user can do nothing about: answered here, silently."""
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

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

        A LIME model (or its folder) keeps what it learned: its backbone, metadata tables, tag heads and
        meta-attention carry over with its settings, which `config_kwargs` change; a part the change reshapes, or
        adds, starts fresh. So `from_backbone(lime_model, meta_token_ids=ids)` after `add_meta_tokens(tokenizer)` and
        `lime_model.resize_token_embeddings(len(tokenizer))` gives the same LIME model with a new, random
        meta-attention. The model given becomes the new model's body: use the returned one.

        Args:
            model_or_path: a loaded causal LM, or a path/Hub id for `AutoModelForCausalLM.from_pretrained`.
            config_kwargs: `LimeConfig` arguments (`metadata_fields`, `metadata_weights`, `metadata_shift`,
                `tag_head_fields`, ...). Tag heads start random: they never change the logits.
        """
        backbone = model_or_path
        if not isinstance(backbone, PreTrainedModel):
            backbone = AutoModelForCausalLM.from_pretrained(model_or_path)
        trained = backbone if isinstance(backbone, LimePreTrainedModel) else None
        if trained is not None:
            config_kwargs = settings_with(trained.config, config_kwargs)
            backbone = trained.language_model
            detach_backbone(trained)  # its hooks would run the old parts inside the new model
        config = LimeConfig(text_config=backbone.config, **config_kwargs)
        with torch.device("meta"):  # skip building (and initialising) a second backbone
            model = cls(config)
        model.language_model = backbone
        if trained is not None:
            take_parts(model, trained)
        initialize_new_parts(model, backbone)
        return model

    # The steps of the forward, in order.

    def collect_tags(
        self, pos_ids: torch.LongTensor | None, ner_ids: torch.LongTensor | None, kwargs: dict
    ) -> dict[str, torch.LongTensor]:
        """Step 1: this model's `<field>_ids`, popped from `kwargs`. Every other keyword is left for the backbone,
        where a stray `<name>_ids` is refused (the backbone would swallow it without effect)."""
        metadata_ids = self._collect_metadata(pos_ids, ner_ids, kwargs)
        self._check_backbone_kwargs(kwargs)
        return metadata_ids

    def token_embeddings(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor | None
    ) -> torch.FloatTensor:
        """`(batch, seq, hidden)` token embeddings `E_tok`: looked up, or as given."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        return self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds

    def embed(
        self,
        token_embeds: torch.FloatTensor,
        metadata_ids: dict[str, torch.LongTensor],
        next_metadata_ids: dict[str, torch.LongTensor] | None,
        stacked_fed_ids: torch.LongTensor | None = None,
    ) -> torch.FloatTensor:
        """Step 2: the token embeddings plus the metadata embeddings, after validating the tags (`stacked_fed_ids`,
        from `generate`'s tracker, were checked where they were made). With `metadata_layer > 0` the metadata joins
        later (step 3, `prepare_metadata_injection`): token embeddings only."""
        if stacked_fed_ids is not None:
            names = self.metadata_embeddings.names
            return token_embeds + self.metadata_embeddings.lookup_stacked(stacked_fed_ids, names)
        input_shape = tuple(token_embeds.shape[:2])
        self._check_metadata(input_shape, metadata_ids, next_metadata_ids)
        if not self.config.metadata_fields or self.metadata_injection is not None:
            return token_embeds
        if not metadata_ids and not next_metadata_ids and not torch.is_grad_enabled():
            # Unknown everywhere embeds to exact zeros. Training still looks them up, so that every table takes
            # part in every step (DDP needs no `find_unused_parameters`).
            return token_embeds
        return token_embeds + self.metadata_embeddings(metadata_ids, input_shape, next_metadata_ids)

    def prepare_meta_attention(
        self,
        input_ids: torch.LongTensor | None,
        labels: torch.LongTensor | None,
        cache,
        use_cache: bool | None,
    ) -> tuple[torch.LongTensor | None, object, MetaAttentionState | None]:
        """Step 3: labels without meta-token targets, the cache for the backbone and the call's meta-attention
        state (see `meta_attention.py`). Without meta-tokens: labels and cache as given, no state."""
        if self.meta_attention is None:
            return labels, cache, None
        use_cache = self.config.use_cache if use_cache is None else use_cache
        # Under gradient checkpointing in training the backbone's layers write no cache; neither do the sublayers.
        checkpointing = getattr(self.language_model.base_model, "gradient_checkpointing", False)
        writes_cache = not (checkpointing and self.training and torch.is_grad_enabled())
        return self.meta_attention.prepare(input_ids, labels, cache, use_cache, writes_cache)

    def prepare_metadata_injection(
        self,
        metadata_ids: dict[str, torch.LongTensor],
        next_metadata_ids: dict[str, torch.LongTensor] | None,
        predict: bool,
    ) -> MetadataInjectionState | None:
        """Step 3b (`metadata_layer > 0` only, else `None`): what the hook at decoder layer k adds (see
        `metadata_injection.py`). `predict`: the heads' argmax fills the unknown tags; in training with
        `metadata_training_source="predicted"` it replaces the given ones."""
        if self.metadata_injection is None:
            return None
        heads = self.tag_heads
        override = heads is not None and self.training and self.config.metadata_training_source == "predicted"
        return MetadataInjectionState(
            site=self.metadata_injection,
            embeddings=self.metadata_embeddings,
            heads=heads,
            metadata_ids=metadata_ids,
            next_metadata_ids=next_metadata_ids,
            predict=predict and heads is not None,
            override=override,
            expected=self.config.predicted_tag_embedding == "expected",
        )

    def run_backbone(
        self,
        module: nn.Module,
        meta_state: MetaAttentionState | None,
        injection: MetadataInjectionState | None,
        cache,
        **inputs,
    ):
        """Step 4: `module` (the backbone or its base model) on the embeddings, given the cache under the name it
        takes, inside the call's meta-attention scope, with the call's metadata injection (if any)."""
        inputs[cache_keyword(module)] = cache
        if injection is not None:
            inputs[INJECTION_KEYWORD] = injection
        if meta_state is None:  # no meta-attention, or no meta-token in this call
            outputs = module(**inputs)
        else:
            with self.meta_attention.scope(meta_state, inputs):
                outputs = module(**inputs)
        if injection is not None:
            self.metadata_injection.check_applied(injection)
        return outputs

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
        accepted = _accepted_keywords(self.language_model)
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
        checked = [(name, f"{name}_ids", ids) for name, ids in metadata_ids.items()]
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
            checked.append((name, f"next_metadata_ids['{name}']", ids))
        self._check_ranges(checked)

    def _check_ranges(self, checked: list[tuple[str, str, torch.Tensor]]) -> None:
        """Raise unless every `(field, argument, ids)` holds integer ids of its field's inventory: one reduction per
        tensor and one transfer for them all. (`generate`'s steps pass `stacked_fed_ids`, checked where made.)"""
        for _, argument, ids in checked:
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise ValueError(f"`{argument}` must hold integer tag ids, got dtype {ids.dtype}.")
        checked = [item for item in checked if item[2].numel()]
        if not checked:
            return
        bounds = torch.stack([bound for *_, ids in checked for bound in torch.aminmax(ids)]).tolist()
        for index, (name, argument, ids) in enumerate(checked):
            size = len(self.config.metadata_fields[name])
            low, high = bounds[2 * index : 2 * index + 2]
            if low < 0 or high >= size:
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

    @accept_past_key_values
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
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """See `LimeForCausalLM.forward`; the LM head is not applied. Missing tags are unknown, except with
        `metadata_layer > 0`, where the tag heads fill them inside the pass, as in `LimeForCausalLM`."""
        metadata_ids = self.collect_tags(pos_ids, ner_ids, kwargs)
        inputs_embeds = self.embed(
            self.token_embeddings(input_ids, inputs_embeds), metadata_ids, next_metadata_ids
        )
        _, cache, meta_state = self.prepare_meta_attention(input_ids, None, cache, use_cache)
        injection = self.prepare_metadata_injection(metadata_ids, next_metadata_ids, predict=True)
        return self.run_backbone(
            self.language_model.base_model,
            meta_state,
            injection,
            cache,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )


class LimeForCausalLM(LimePreTrainedModel, LimeGenerationMixin):
    """A LIME decoder with its LM head. Attention, MLPs, head and loss are the backbone's, untouched."""

    _auto_class = "AutoModelForCausalLM"  # `save_pretrained` copies the code files (remote code)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    @accept_past_key_values
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
        self_tag: bool | None = None,
        stacked_fed_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | LimeCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids.
            attention_mask, position_ids, cache, inputs_embeds, labels, use_cache, logits_to_keep:
                as for the backbone's causal LM; `labels` `(batch, seq)` are shifted inside the loss as usual.
                The output holds the KV cache under the name the installed transformers uses (`cache` since
                5.24, `past_key_values` before). `past_key_values=` is taken as the backbone takes it: deprecated
                (with a warning) where the installed transformers says `cache`.
            pos_ids, ner_ids (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
                The tags of the tokens in `input_ids`, exactly as `LimeTokenizer` emits them, for LIME and
                LIME+1 alike (a LIME+1 model shifts them itself). A missing field counts as unknown.
                Custom fields are passed the same way as `<field>_ids` keyword arguments.
            next_metadata_ids (`dict[str, torch.LongTensor]`, *optional*):
                LIME+1 only: field -> `(batch,)` tags of the token that follows the input (guidance); the last
                position sees unknown otherwise.
            self_tag (`bool`, *optional*): whether a model with tag heads reads `input_ids` tagged by its own heads
                (`tag_heads.self_tags`: every position's tags predicted causally from the tokens up to it, the
                honest mode). It costs one sequential step per position (no gradient) before the forward.
                `None` (the default): self-tag exactly when a heads model gets `input_ids` alone (no tags, no
                `next_metadata_ids`, no cache) and no `labels`, so that a harness passing token ids only (lm-eval's
                `--model hf`) scores the model as it generates; given `labels` but no tags it raises, asking which.
                `False`: missing tags are unknown. A model without heads reads unknown for missing tags.
                With `metadata_layer > 0` (the honest mode) self-tagging costs nothing: the heads read the input of
                decoder layer k and fill every unknown tag inside the one forward pass, with or without a cache
                (`None` and `True`); only a training call (`model.train()`) with `labels` and no tags raises, since
                no head would learn. `False`: missing tags are unknown.
            stacked_fed_ids (`torch.LongTensor` of shape `(batch, seq, fields)`, *optional*): what `generate`'s steps
                pass instead of `<field>_ids` and `next_metadata_ids`: the tag each position reads (LIME+1: the next
                token's), every field of `config.metadata_fields` in order, made and checked by its tracker (from
                the checked prompt tags, guidance and providers), so the forward neither checks nor shifts them again.
                Only for `metadata_layer = 0`.
            kwargs: the backbone's extra arguments (`num_items_in_batch`, `output_hidden_states`, ...).

        Returns the backbone's `CausalLMOutputWithPast`; with tag heads a `LimeCausalLMOutputWithPast` whose loss is
        `lm_loss + tag_loss_weight * sum(tag_losses)`, with `tag_logits` where every position's logits are kept
        (`logits_to_keep=0`, the default; with `metadata_layer > 0` also the tags read, as `fed_metadata_ids`).
        Generation keeps one position's logits and gets neither.
        """
        # 1. The tags: given, or the heads' own (self-tagging: sequential at layer 0, in the pass at k > 0).
        metadata_ids = self.collect_tags(pos_ids, ner_ids, kwargs)
        token_embeds = self.token_embeddings(input_ids, inputs_embeds)
        source = self._tag_source(
            self_tag, metadata_ids, next_metadata_ids, input_ids, cache, labels, stacked_fed_ids
        )
        fed_ids, fed_next = metadata_ids, next_metadata_ids
        if source == "sequential":
            fed_ids, fed_next = self_tags(self, input_ids, attention_mask)
        # 2. Embeddings. 3. Meta-attention; the metadata injection at layer k.
        inputs_embeds = self.embed(token_embeds, fed_ids, fed_next, stacked_fed_ids)
        labels, cache, meta_state = self.prepare_meta_attention(input_ids, labels, cache, use_cache)
        injection = self.prepare_metadata_injection(fed_ids, fed_next, predict=source == "in_pass")
        # 4. The backbone. Heads at layer 0 read its last hidden state (`-1` records only that one).
        heads = self.tag_heads
        reads_last = heads is not None and injection is None
        asked_hidden = kwargs.pop("output_hidden_states", None)
        outputs = self.run_backbone(
            self.language_model,
            meta_state,
            injection,
            cache,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            output_hidden_states=(asked_hidden or -1) if reads_last else asked_hidden,
            **kwargs,
        )
        if heads is None:
            return outputs
        # 5. Tag heads: computed by the injection at layer k (every new position), else here where every
        # position's logits are kept (training, evaluation; generation tags its tokens itself); losses against the
        # given tags where there are labels.
        hidden = outputs.hidden_states[-1] if reads_last else None
        keeps_every_position = isinstance(logits_to_keep, int) and logits_to_keep == 0
        tag_logits = None
        if keeps_every_position and injection is not None:
            tag_logits = injection.tag_logits
        elif keeps_every_position:
            tag_logits = heads(heads.previous_states(hidden, attention_mask), token_embeds)
        # 6. The output.
        result = LimeCausalLMOutputWithPast(
            **{key: value for key, value in outputs.items() if key != "hidden_states"},
            hidden_states=outputs.hidden_states if asked_hidden else None,
            tag_logits=tag_logits,
            last_hidden_state=hidden,
            fed_metadata_ids=injection.fed_ids if injection is not None and keeps_every_position else None,
        )
        if outputs.loss is not None and tag_logits is not None:
            tag_losses = heads.losses(
                tag_logits, metadata_ids, attention_mask, kwargs.get("num_items_in_batch")
            )
            result.lm_loss, result.tag_losses = outputs.loss, tag_losses
            result.loss = outputs.loss + heads.weighted_loss(tag_logits, tag_losses)
        return result

    def _tag_source(
        self,
        self_tag: bool | None,
        metadata_ids: dict[str, torch.LongTensor],
        next_metadata_ids: dict | None,
        input_ids: torch.LongTensor | None,
        cache,
        labels: torch.LongTensor | None,
        stacked_fed_ids: torch.LongTensor | None = None,
    ) -> str:
        """Where this call's tags come from (see `self_tag` in `forward`): `"given"` (missing ones unknown),
        `"sequential"` (layer-0 heads, one step per token before the forward) or `"in_pass"` (heads at layer k fill
        the missing ones inside the forward). Raises where it cannot, or must be told."""
        if stacked_fed_ids is not None:
            if (
                metadata_ids
                or next_metadata_ids is not None
                or self_tag
                or self.metadata_injection is not None
            ):
                raise ValueError(
                    "`stacked_fed_ids` are every tag the input reads (`generate` passes them at each step): pass them "
                    "alone, without `<field>_ids`, `next_metadata_ids` or `self_tag=True`, to a model with "
                    "`metadata_layer=0`."
                )
            return "given"
        if self.tag_heads is None:
            if self_tag:
                raise ValueError("`self_tag=True` reads the model's tag heads, and this model has none.")
            return "given"
        untagged = not metadata_ids and next_metadata_ids is None
        if self.metadata_injection is not None:
            if self_tag is False:
                return "given"
            # Training a heads model on untagged batches would train no head: say so rather than run.
            if self_tag is None and untagged and labels is not None and self.training:
                raise ValueError(UNTAGGED_TRAINING)
            return "in_pass"
        bare = untagged and input_ids is not None and cache is None
        if self_tag is None:
            if not bare:
                return "given"
            if labels is not None:
                raise ValueError(UNTAGGED_TRAINING)
            return "sequential"
        if self_tag and not bare:
            raise ValueError(
                "`self_tag=True` tags `input_ids` from their first token: pass `input_ids` alone, without tags, "
                "`next_metadata_ids` or a cache."
            )
        return "sequential" if self_tag else "given"


__all__ = ["LimeForCausalLM", "LimeModel", "LimePreTrainedModel"]
