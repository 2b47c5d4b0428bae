"""LIME configuration and the default metadata tag inventories.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only
``transformers`` and its flat siblings (`rules.py`, standard library only).
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .rules import check_lime_model_type, check_metadata_injection

# Every field reserves its first three ids; a label's index in its inventory is its id.
PAD_ID, UNKNOWN_ID, SPECIAL_ID = 0, 1, 2
RESERVED_LABELS = ("<pad>", "<unk>", "<special>")

# Fine-grained Penn Treebank tags of spaCy's English pipelines (`Token.tag_`), `_SP` = whitespace.
POS_TAGS = (
    "$", "''", ",", "-LRB-", "-RRB-", ".", ":", "ADD", "AFX", "CC", "CD", "DT", "EX", "FW", "HYPH",
    "IN", "JJ", "JJR", "JJS", "LS", "MD", "NFP", "NN", "NNP", "NNPS", "NNS", "PDT", "POS", "PRP",
    "PRP$", "RB", "RBR", "RBS", "RP", "SYM", "TO", "UH", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ",
    "WDT", "WP", "WP$", "WRB", "XX", "_SP", "``",
)  # fmt: skip
# The 18 OntoNotes entity types of spaCy's English NER, written as IOB labels.
ENTITY_TYPES = (
    "CARDINAL", "DATE", "EVENT", "FAC", "GPE", "LANGUAGE", "LAW", "LOC", "MONEY", "NORP",
    "ORDINAL", "ORG", "PERCENT", "PERSON", "PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART",
)  # fmt: skip
NER_TAGS = ("O",) + tuple(f"{prefix}-{etype}" for etype in ENTITY_TYPES for prefix in ("B", "I"))


def make_inventory(labels: list[str] | tuple[str, ...]) -> list[str]:
    """Prepend the reserved labels so that ``inventory.index(label)`` is the label's id."""
    return [*RESERVED_LABELS, *labels]


DEFAULT_METADATA_FIELDS: dict[str, list[str]] = {
    "pos": make_inventory(POS_TAGS),
    "ner": make_inventory(NER_TAGS),
}


def validate_metadata_fields(fields: dict[str, list[str]], allow_empty: bool = False) -> None:
    """Raise ``ValueError`` unless every field is a valid name with a well-formed inventory.

    No field at all is allowed only where something else enriches the model (`allow_empty`: its meta-tokens).
    """
    if not isinstance(fields, dict):
        raise ValueError(
            "`metadata_fields` must be a dict of field name -> label inventory, e.g. "
            f"{{'pos': make_inventory([...])}}, got {fields!r}."
        )
    if not fields and not allow_empty:
        raise ValueError(
            "`metadata_fields` is empty: give at least one field, e.g. {'pos': [...]}, or meta-tokens "
            "(`meta_token_ids=[...]`) for a model without metadata."
        )
    for name, labels in fields.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"Metadata field name {name!r} is not a Python identifier; it must be one "
                f"because the model takes it as the keyword argument `{name}_ids`."
            )
        if isinstance(labels, str) or not all(isinstance(label, str) for label in labels):
            raise ValueError(f"Field {name!r}: an inventory is a list of label strings, got {labels!r}.")
        if tuple(labels[:3]) != RESERVED_LABELS:
            raise ValueError(
                f"Field {name!r}: an inventory must start with the reserved labels "
                f"{list(RESERVED_LABELS)} (ids 0/1/2), got {list(labels[:3])}. "
                "Build it with `make_inventory(labels)`."
            )
        if len(set(labels)) != len(labels):
            duplicates = sorted({label for label in labels if labels.count(label) > 1})
            raise ValueError(f"Field {name!r}: duplicate labels {duplicates} in the inventory.")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_metadata_weights(weights: dict[str, float] | None) -> None:
    if weights is not None and (
        not isinstance(weights, dict) or not all(_is_number(weight) for weight in weights.values())
    ):
        raise ValueError(
            f"`metadata_weights` must map field names to numbers (e.g. {{'pos': 0.5}}), got {weights!r}."
        )


def check_metadata_shift(shift: int) -> None:
    if not isinstance(shift, int) or shift not in (0, 1):
        raise ValueError(f"`metadata_shift` must be 0 (LIME) or 1 (LIME+1), got {shift!r}.")


def check_tag_head_fields(fields: list[str] | None) -> None:
    if fields is not None and (isinstance(fields, str) or not all(isinstance(name, str) for name in fields)):
        raise ValueError(
            f"`tag_head_fields` must be a list of field names (e.g. ['pos', 'ner']), got {fields!r}."
        )


def check_tag_loss_weight(weight: float) -> None:
    if not _is_number(weight) or not weight >= 0:
        raise ValueError(f"`tag_loss_weight` must be a number >= 0, got {weight!r}.")


def check_tag_head_type(head_type: str) -> None:
    if head_type not in ("mlp", "linear"):
        raise ValueError(
            f"`tag_head_type` must be 'mlp' (a shared hidden layer, then one linear classifier per field) or 'linear' "
            f"(one linear classifier per field on the normalised state), got {head_type!r}."
        )


def check_self_guidance(self_guidance: str) -> None:
    if self_guidance not in ("argmax", "sample"):
        raise ValueError(f"`self_guidance` must be 'argmax' or 'sample', got {self_guidance!r}.")


def check_metadata_layer(layer: int) -> None:
    """An integer >= 0 (whether it is below the backbone's number of layers is checked against `text_config`)."""
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise ValueError(
            f"`metadata_layer` must be an integer >= 0 (0: the metadata embeddings join the token embeddings; k: "
            f"they join the input of decoder layer k), got {layer!r}."
        )


def check_metadata_training_source(source: str) -> None:
    if source not in ("given", "predicted"):
        raise ValueError(
            f"`metadata_training_source` must be 'given' (training reads the tags passed in) or 'predicted' "
            f"(training reads the tag heads' own argmax, as inference does), got {source!r}."
        )


def check_predicted_tag_embedding(embedding: str) -> None:
    if embedding not in ("argmax", "expected"):
        raise ValueError(
            f"`predicted_tag_embedding` must be 'argmax' (the embedding of the heads' most likely tag) or 'expected' "
            f"(the embeddings averaged under the heads' probabilities), got {embedding!r}."
        )


def check_meta_token_ids(meta_token_ids: list[int] | None) -> None:
    """Integers >= 0, each once (whether they are in the vocabulary is checked against `text_config`)."""
    if meta_token_ids is None:
        return
    if isinstance(meta_token_ids, (str, int)) or not all(
        isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0
        for token_id in meta_token_ids
    ):
        raise ValueError(
            f"`meta_token_ids` must be a list of token ids (integers >= 0), got {meta_token_ids!r}. Add the "
            "meta-token to the tokenizer (and resize the embeddings) first."
        )
    if len(set(meta_token_ids)) != len(meta_token_ids):
        raise ValueError(f"`meta_token_ids` repeats ids: {list(meta_token_ids)}.")


def check_meta_positional(meta_positional: str) -> None:
    if meta_positional not in ("keep", "zero"):
        raise ValueError(
            f"`meta_positional` must be 'keep' (meta-tokens keep their positional encoding) or 'zero' (it is zeroed "
            f"at meta-token positions), got {meta_positional!r}."
        )


# Each LIME field's own rule, applied whenever it is set (during construction too); the rules across fields are
# `LimeConfig.validate_lime`'s, applied at the end of construction and on save (as transformers' `@strict`).
FIELD_CHECKS = {
    "metadata_fields": lambda fields: fields is None or validate_metadata_fields(fields, allow_empty=True),
    "metadata_weights": check_metadata_weights,
    "metadata_shift": check_metadata_shift,
    "tag_head_fields": check_tag_head_fields,
    "tag_loss_weight": check_tag_loss_weight,
    "tag_head_type": check_tag_head_type,
    "self_guidance": check_self_guidance,
    "metadata_layer": check_metadata_layer,
    "metadata_training_source": check_metadata_training_source,
    "predicted_tag_embedding": check_predicted_tag_embedding,
    "meta_token_ids": check_meta_token_ids,
    "meta_positional": check_meta_positional,
}


def check_inventories(tokenizer_fields: dict[str, list[str]], model_fields: dict[str, list[str]]) -> None:
    """Raise ``ValueError`` unless a tokenizer emits exactly the fields and label ids a model reads."""
    if tokenizer_fields == model_fields:
        return
    for name in sorted(set(tokenizer_fields) | set(model_fields)):
        if tokenizer_fields.get(name) != model_fields.get(name):
            raise ValueError(
                f"The tokenizer's and the model's metadata inventories differ in field {name!r}: tokenizer "
                f"{tokenizer_fields.get(name)}, model {model_fields.get(name)} (tokenizer fields "
                f"{list(tokenizer_fields)}, model fields {list(model_fields)}). Build the tokenizer with the "
                "model's fields, or the model with `metadata_fields=tokenizer.metadata_fields`."
            )


class TextConfigAttribute:
    """An attribute of the backbone's config, read and written through from the LIME config."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, config: "LimeConfig | None", owner: type | None = None):
        return self if config is None else getattr(config.text_config, self.name)

    def __set__(self, config: "LimeConfig", value) -> None:
        setattr(config.text_config, self.name, value)


class LimeConfig(PreTrainedConfig):
    r"""
    Configuration of a LIME (Linguistic Metadata Embeddings) decoder: any decoder-only backbone plus one
    small embedding table per metadata field, added to the token embeddings.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The backbone's config (any decoder-only architecture: Llama, Qwen2, GPT-2, ...), required. A dict must
            name its `model_type`. There is no default backbone (it would be a 7B Llama built by accident): to
            retrofit a checkpoint use `LimeForCausalLM.from_backbone(path)`.
        metadata_fields (`dict[str, list[str]]`, *optional*):
            Field name -> label inventory. A label's index is its id; ids 0/1/2 are padding/unknown/special.
            Defaults to `{"pos": <spaCy fine-grained tags>, "ner": <IOB over 18 OntoNotes types>}`.
        metadata_weights (`dict[str, float]`, *optional*):
            The weight `w_d` of each field's embedding in `E_tok(t) + sum_d w_d E_d(a_d)`; 1.0 by default.
        metadata_shift (`int`, *optional*, defaults to 0):
            0 = LIME (position i sees the tags of token i); 1 = LIME+1 (position i sees the tags of token
            i+1, so the next token's tags can guide generation).
        tag_head_fields (`list[str]`, *optional*):
            Fields with a tag head (see `tag_heads.py`): the model learns to predict the tags it is fed, so that
            generation needs no tagger (LIME) or no oracle guidance (LIME+1). None (the default): no heads.
        tag_loss_weight (`float`, *optional*, defaults to 0.2):
            Weight of the heads' summed cross-entropy in the training loss, `lm_loss + weight * sum(tag_losses)`.
        tag_head_type (`str`, *optional*, defaults to `"mlp"`):
            The heads' shape. `"mlp"`: LayerNorm -> a shared Linear -> GELU -> a Linear per field. `"linear"`:
            LayerNorm -> a Linear per field, so that the tags must be a linear read-out of the state the heads read;
            with `metadata_layer > 0` the tag loss then shapes the first k decoder layers themselves (multi-task
            supervision), where an MLP head can absorb it.
        self_guidance (`str`, *optional*, defaults to `"argmax"`):
            How the heads choose a tag during generation: `"argmax"` or `"sample"` (from their softmax).
        metadata_layer (`int`, *optional*, defaults to 0):
            Where the metadata embeddings join the residual stream. 0: added to the token embeddings (LIME as in
            the paper). k in [1, num_hidden_layers): added to the input of decoder layer k (see
            `metadata_injection.py`); the first k layers read no tags, and the tag heads read that tag-free state
            at token i itself, so a model given `input_ids` alone tags them in the same parallel forward (the
            honest mode, as fast as the backbone). Without tag heads, k > 0 only moves where given tags enter.
        metadata_training_source (`str`, *optional*, defaults to `"given"`):
            What the LM reads in training (`model.train()`) where tag heads exist: `"given"` (the tags passed in,
            teacher forcing) or `"predicted"` (the heads' own argmax in every position of a field with a head,
            exactly what inference feeds; the given tags still train the heads). `"predicted"` needs tag heads
            and `metadata_layer > 0` (at layer 0 the prediction would need one sequential step per token).
        predicted_tag_embedding (`str`, *optional*, defaults to `"argmax"`):
            What the model reads where its heads supply a tag (`metadata_layer > 0`): `"argmax"`, the embedding of
            the most likely tag, `E_f(argmax p_f)`; or `"expected"`, the embeddings averaged under the heads'
            probabilities, `sum_c p_f(c) E_f(c)`, which keeps their doubt: where a head is unsure the model reads a
            blend, not a confident wrong tag. Given tags are read as they are, so training on given tags reads it
            only where a tag is unknown (metadata dropout, a field not given, LIME+1's last position), and
            everywhere with `metadata_training_source="predicted"`; it can be switched on a trained model. Needs
            tag heads and `metadata_layer > 0`.
        meta_token_ids (`list[int]`, *optional*):
            Token ids of learned meta-tokens (see `meta_attention.py`). Non-empty: a meta-attention sublayer
            follows every decoder layer, over the meta-token positions only, and meta-token targets are left out
            of the loss. None or empty (the default): no meta-attention, the model is exactly LIME.
        meta_positional (`str`, *optional*, defaults to `"keep"`):
            `"keep"`: meta-tokens have the backbone's positional encoding; `"zero"`: it is zeroed at meta-token
            positions (rotary cos/sin = 1/0, or a zero learned position embedding).
    """

    model_type = "lime"
    _auto_class = "AutoConfig"  # `save_pretrained` copies the code files, for `trust_remote_code=True` users
    # `Trainer.evaluate` need not gather the KV cache: `cache` since transformers 5.24, `past_key_values` before.
    keys_to_ignore_at_inference = [
        "cache",
        "past_key_values",
        "lm_loss",
        "tag_losses",
        "tag_logits",
        "last_hidden_state",
        "fed_metadata_ids",
    ]
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    metadata_fields: dict[str, list[str]] | None = None
    metadata_weights: dict[str, float] | None = None
    metadata_shift: int = 0
    tag_head_fields: list[str] | None = None
    tag_loss_weight: float = 0.2
    tag_head_type: str = "mlp"
    self_guidance: str = "argmax"
    metadata_layer: int = 0
    metadata_training_source: str = "given"
    predicted_tag_embedding: str = "argmax"
    meta_token_ids: list[int] | None = None
    meta_positional: str = "keep"

    def __post_init__(self, **kwargs):
        if self.text_config is None:
            raise ValueError(
                "LimeConfig needs `text_config`, the backbone's config: a `PreTrainedConfig` or a dict naming its "
                "`model_type` (e.g. {'model_type': 'llama', 'hidden_size': 256, ...}); to retrofit a checkpoint, "
                "use `LimeForCausalLM.from_backbone(path, ...)`."
            )
        super().__post_init__(**kwargs)
        if self.metadata_fields is None:
            self.metadata_fields = {name: list(labels) for name, labels in DEFAULT_METADATA_FIELDS.items()}
        self.metadata_fields = {name: list(labels) for name, labels in self.metadata_fields.items()}
        self.meta_token_ids = list(self.meta_token_ids or [])
        self.tag_head_fields = list(self.tag_head_fields or [])
        self.validate_lime()
        weights = self.metadata_weights or {}
        self.metadata_weights = {name: float(weights.get(name, 1.0)) for name in self.metadata_fields}
        if getattr(self, "auto_map", None) is None:
            # Lets `trust_remote_code=True` users load a saved folder without lime_hf installed.
            self.auto_map = {
                "AutoConfig": "configuration_lime.LimeConfig",
                "AutoModel": "modeling_lime.LimeModel",
                "AutoModelForCausalLM": "modeling_lime.LimeForCausalLM",
            }

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """The saved config, refused unless it is a LIME model's: read as a LIME config, a plain checkpoint's
        config.json would give no `text_config` (or one without its own sizes)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        check_lime_model_type(config_dict.get("model_type"), str(pretrained_model_name_or_path))
        return config_dict, kwargs

    def __setattr__(self, name: str, value) -> None:
        check = FIELD_CHECKS.get(name)
        if check is not None:
            check(value)  # before the value is set: a rejected value leaves the config as it was
        super().__setattr__(name, value)

    def validate(self) -> None:
        """Every rule, the backbone's and LIME's (`save_pretrained` calls it before it writes)."""
        super().validate()
        self.validate_lime()

    def validate_lime(self) -> None:
        """Raise ``ValueError`` unless the LIME fields agree with each other and with the backbone."""
        for name, check in FIELD_CHECKS.items():
            check(getattr(self, name))
        meta_token_ids = self.meta_token_ids or []
        validate_metadata_fields(self.metadata_fields, allow_empty=bool(meta_token_ids))
        vocab_size = self.text_config.vocab_size
        for token_id in meta_token_ids:
            if not token_id < vocab_size:
                raise ValueError(
                    f"`meta_token_ids` holds {token_id!r}, outside the vocabulary of {vocab_size} tokens: a "
                    f"meta-token id must be an integer in [0, {vocab_size}). Add the meta-token to the tokenizer "
                    "(and resize the embeddings) first."
                )
        check_metadata_injection(
            metadata_layer=self.metadata_layer,
            training_source=self.metadata_training_source,
            predicted_tag_embedding=self.predicted_tag_embedding,
            tag_head_fields=self.tag_head_fields or (),
            num_hidden_layers=self.text_config.num_hidden_layers,
        )
        for option in ("metadata_weights", "tag_head_fields"):
            unknown = sorted(set(getattr(self, option) or ()) - set(self.metadata_fields))
            if unknown:
                raise ValueError(
                    f"`{option}` names unknown fields {unknown}; the fields are {list(self.metadata_fields)}."
                )

    # Trainer and `generate` read these on a model's config; they live in `text_config` only, so the saved
    # config holds each value once.
    vocab_size = TextConfigAttribute()
    hidden_size = TextConfigAttribute()
    num_hidden_layers = TextConfigAttribute()
    use_cache = TextConfigAttribute()


__all__ = ["LimeConfig"]
