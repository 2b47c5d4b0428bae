"""LIME configuration and the default metadata tag inventories.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only
``transformers`` and its flat siblings.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

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
    if not fields and not allow_empty:
        raise ValueError(
            "`metadata_fields` is empty: give at least one field, e.g. {'pos': [...]}, or meta-tokens "
            "(`meta_token_ids=[...]`) for a model without metadata."
        )
    for name, labels in fields.items():
        if not name.isidentifier():
            raise ValueError(
                f"Metadata field name {name!r} is not a Python identifier; it must be one "
                f"because the model takes it as the keyword argument `{name}_ids`."
            )
        if tuple(labels[:3]) != RESERVED_LABELS:
            raise ValueError(
                f"Field {name!r}: an inventory must start with the reserved labels "
                f"{list(RESERVED_LABELS)} (ids 0/1/2), got {list(labels[:3])}. "
                "Build it with `make_inventory(labels)`."
            )
        if len(set(labels)) != len(labels):
            duplicates = sorted({label for label in labels if labels.count(label) > 1})
            raise ValueError(f"Field {name!r}: duplicate labels {duplicates} in the inventory.")


def validate_tag_heads(
    fields: list[str], metadata_fields: dict[str, list[str]], loss_weight: float, self_guidance: str
) -> None:
    """Raise ``ValueError`` unless the tag-head options name existing fields and allowed values."""
    unknown = sorted(set(fields) - set(metadata_fields))
    if unknown:
        raise ValueError(
            f"`tag_head_fields` names unknown fields {unknown}; the fields are {list(metadata_fields)}."
        )
    if not loss_weight >= 0:
        raise ValueError(f"`tag_loss_weight` must be a number >= 0, got {loss_weight!r}.")
    if self_guidance not in ("argmax", "sample"):
        raise ValueError(f"`self_guidance` must be 'argmax' or 'sample', got {self_guidance!r}.")


def validate_meta_tokens(meta_token_ids: list[int], meta_positional: str, vocab_size: int) -> None:
    """Raise ``ValueError`` unless every meta-token id is in the vocabulary and the positional variant exists."""
    for token_id in meta_token_ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ValueError(
                f"`meta_token_ids` holds {token_id!r}, outside the vocabulary of {vocab_size} tokens: a meta-token "
                f"id must be an integer in [0, {vocab_size}). Add the meta-token to the tokenizer (and resize the "
                "embeddings) first."
            )
    if len(set(meta_token_ids)) != len(meta_token_ids):
        raise ValueError(f"`meta_token_ids` repeats ids: {meta_token_ids}.")
    if meta_positional not in ("keep", "zero"):
        raise ValueError(
            f"`meta_positional` must be 'keep' (meta-tokens keep their positional encoding) or 'zero' (it is zeroed "
            f"at meta-token positions), got {meta_positional!r}."
        )


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
            The backbone's config (any decoder-only architecture: Llama, Qwen2, GPT-2, ...). A dict must
            name its `model_type`; `None` gives a default Llama config.
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
        self_guidance (`str`, *optional*, defaults to `"argmax"`):
            How the heads choose a tag during generation: `"argmax"` or `"sample"` (from their softmax).
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
    ]
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    metadata_fields: dict[str, list[str]] | None = None
    metadata_weights: dict[str, float] | None = None
    metadata_shift: int = 0
    tag_head_fields: list[str] | None = None
    tag_loss_weight: float = 0.2
    self_guidance: str = "argmax"
    meta_token_ids: list[int] | None = None
    meta_positional: str = "keep"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.metadata_fields is None:
            self.metadata_fields = {name: list(labels) for name, labels in DEFAULT_METADATA_FIELDS.items()}
        self.metadata_fields = {name: list(labels) for name, labels in self.metadata_fields.items()}
        self.meta_token_ids = list(self.meta_token_ids or [])
        validate_meta_tokens(self.meta_token_ids, self.meta_positional, self.text_config.vocab_size)
        validate_metadata_fields(self.metadata_fields, allow_empty=bool(self.meta_token_ids))
        weights = self.metadata_weights or {}
        unknown = sorted(set(weights) - set(self.metadata_fields))
        if unknown:
            raise ValueError(
                f"`metadata_weights` names unknown fields {unknown}; "
                f"the fields are {list(self.metadata_fields)}."
            )
        self.metadata_weights = {name: float(weights.get(name, 1.0)) for name in self.metadata_fields}
        if getattr(self, "auto_map", None) is None:
            # Lets `trust_remote_code=True` users load a saved folder without lime_hf installed.
            self.auto_map = {
                "AutoConfig": "configuration_lime.LimeConfig",
                "AutoModel": "modeling_lime.LimeModel",
                "AutoModelForCausalLM": "modeling_lime.LimeForCausalLM",
            }
        if self.metadata_shift not in (0, 1):
            raise ValueError(f"`metadata_shift` must be 0 (LIME) or 1 (LIME+1), got {self.metadata_shift!r}.")
        self.tag_head_fields = list(self.tag_head_fields or [])
        validate_tag_heads(
            self.tag_head_fields, self.metadata_fields, self.tag_loss_weight, self.self_guidance
        )

    # Trainer and `generate` read these on a model's config; they live in `text_config` only, so the saved
    # config holds each value once.
    vocab_size = TextConfigAttribute()
    hidden_size = TextConfigAttribute()
    num_hidden_layers = TextConfigAttribute()
    use_cache = TextConfigAttribute()


__all__ = ["LimeConfig"]
