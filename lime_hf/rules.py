"""Rules that both the model and the CLI apply, each written once with one message.

`LimeForCausalLM.generate` checks a generation request against its config, the CLI against a saved `config.json`
before it loads anything; `LimeConfig` and `lime-hf train` check where the metadata joins the model the same way.
Both say the same thing. Standard library only: the CLI's pre-flight must not import torch, and
`save_pretrained` copies this file next to the model's other code.
"""

from collections.abc import Iterable

PROVIDER_NAMES = ("annotate", "unknown", "model")
# Where lm-eval's `lime` model (`lime_hf.integrations.lm_eval`) takes each position's tags from: `tags=` of
# `--model_args`.
EVAL_TAG_SOURCES = ("prefix", "model", "none")


def check_generation_request(
    *,
    fields: Iterable[str],
    metadata_shift: int,
    has_tag_heads: bool,
    guidance_fields: Iterable[str] = (),
    provider: object = None,
) -> None:
    """Raise `ValueError` if guidance or a metadata provider asks something of a model that it cannot do.

    Args:
        fields: the model's metadata fields (`config.metadata_fields`).
        metadata_shift: 0 for LIME (position i reads token i's tags), 1 for LIME+1 (token i+1's).
        has_tag_heads: whether the model predicts its own tags (`config.tag_head_fields` is not empty).
        guidance_fields: the fields that guidance (`guidance=` / `--guide`) gives tags for.
        provider: the metadata provider asked for: one of `PROVIDER_NAMES`, a callable, or `None` (the default).
    """
    fields, guidance_fields = list(fields), list(guidance_fields)
    if guidance_fields and not metadata_shift:
        raise ValueError(
            "guidance (--guide) gives the tags of the next token, which only a LIME+1 model (metadata_shift=1) "
            "reads; this is a LIME model (metadata_shift=0), which reads the tags of tokens it wrote: drop the "
            "guidance and let a metadata provider tag them"
        )
    for field in guidance_fields:
        if field not in fields:
            raise ValueError(
                f"guidance (--guide) for {field!r}: the model has no metadata field {field!r}; "
                f"its fields: {', '.join(fields) or 'none'}"
            )
    if provider is None or callable(provider):
        return
    if provider not in PROVIDER_NAMES:
        raise ValueError(
            f"metadata provider (--provider) {provider!r} is not one of {', '.join(PROVIDER_NAMES)} "
            "(or, in Python, a callable (input_ids, step) -> tags)"
        )
    if provider == "model" and not has_tag_heads:
        raise ValueError(
            "metadata provider 'model' reads the model's tag heads, and this model has none "
            "(config.tag_head_fields is empty): use 'annotate' or 'unknown', or train tag heads"
        )
    if provider == "annotate" and metadata_shift:
        alternatives = (
            "guidance (--guide), 'model' (its tag heads) or 'unknown'"
            if has_tag_heads
            else ("guidance (--guide) or 'unknown'")
        )
        raise ValueError(
            "metadata provider 'annotate' tags tokens that exist, and a LIME+1 model (metadata_shift=1) reads "
            f"the tags of the token it is about to write: use {alternatives}"
        )


def check_metadata_injection(
    *,
    metadata_layer: int,
    training_source: str,
    tag_head_fields: Iterable[str],
    num_hidden_layers: int | None = None,
    predicted_tag_embedding: str = "argmax",
) -> None:
    """Raise `ValueError` unless `metadata_layer` (where the metadata joins the residual stream),
    `metadata_training_source` (what the LM reads in training) and `predicted_tag_embedding` (how it reads the heads'
    tags) fit the model.

    Args:
        metadata_layer: 0 (the token embeddings) or a decoder layer index k > 0.
        training_source: "given" or "predicted" (the heads' own argmax, computed in the same forward).
        predicted_tag_embedding: "argmax" or "expected" (the embeddings averaged under the heads' probabilities).
        tag_head_fields: the fields with tag heads.
        num_hidden_layers: the backbone's number of decoder layers, where known.
    """
    if num_hidden_layers is not None and not metadata_layer < num_hidden_layers:
        raise ValueError(
            f"metadata layer (--metadata-layer) {metadata_layer}: the backbone has {num_hidden_layers} decoder layers, "
            f"and the metadata joins the input of a decoder layer k in [0, {num_hidden_layers}) "
            "(0: the token embeddings)"
        )
    heads_at_layer = {
        "metadata training source (--metadata-training-source) 'predicted' trains the LM on its tag heads' own "
        "argmax": training_source == "predicted",
        "predicted tag embedding (--predicted-tag-embedding) 'expected' averages the embeddings under the tag heads' "
        "probabilities": predicted_tag_embedding == "expected",
    }
    for option, chosen in heads_at_layer.items():
        if chosen and not (list(tag_head_fields) and metadata_layer):
            raise ValueError(
                f"{option}, computed in the same forward: it needs tag heads (--tag-heads) and a metadata layer "
                f"(--metadata-layer) > 0; got tag heads {list(tag_head_fields) or 'none'} and metadata layer "
                f"{metadata_layer}"
            )


def check_meta_generation(config, generate_kwargs: dict, generation_config) -> None:
    """Raise unless `generate(generation_config, **generate_kwargs)` suits this model's meta-tokens: every
    meta-token placement in `logits_processor` places one of them, and no candidate decoding rolls the cache back
    (a crop counts tokens, and the meta slots are not one per token), asked for in the keywords or in the
    generation config."""
    for processor in generate_kwargs.get("logits_processor") or []:
        token_id = getattr(processor, "meta_token_id", None)
        if token_id is not None and token_id not in config.meta_token_ids:
            raise ValueError(
                f"A meta-token placement asks for meta-token id {token_id}, but this model's meta-tokens are "
                f"{config.meta_token_ids or 'none'}: "
                + (
                    "place one of them."
                    if config.meta_token_ids
                    else "build the model with `LimeConfig(meta_token_ids=[...])` to give it meta-attention."
                )
            )
    candidates = [
        key
        for key in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
        if generate_kwargs.get(key) or getattr(generation_config, key, None)
    ]
    if config.meta_token_ids and candidates:
        raise ValueError(
            f"Assisted and prompt-lookup decoding ({candidates}) crop the KV cache by tokens, which the meta-attention "
            "cache does not follow: generate without them."
        )


def check_lime_model_type(model_type: object, source: str) -> None:
    """Raise `ValueError` unless `model_type` (read from `source`'s config.json) is a LIME model's.

    A plain checkpoint (GPT-2, Llama, ...) is a backbone: it becomes a LIME model by retrofitting, never by reading
    its config as a LIME config (which would build a default backbone instead of the checkpoint's).
    """
    if model_type != "lime":
        raise ValueError(
            f"{source!r} holds a {model_type!r} model, not a LIME model; retrofit it first "
            f"(`LimeForCausalLM.from_backbone({source!r}, ...)`, or `lime-hf train --from-backbone`), "
            "or load it as it is with `AutoModelForCausalLM.from_pretrained`"
        )


def check_eval_tags(tags: str | None, *, metadata_shift: int, has_tag_heads: bool) -> str:
    """The tag source of lm-eval's `lime` model for `tags=` (None: the model's default); `ValueError` if it cannot be.

    Default: the tag heads (`model`) where the model has them, else spaCy on the text up to each token (`prefix`)
    for LIME and unknown tags (`none`) for LIME+1, which reads the next token's tags.
    """
    tags = tags or ("model" if has_tag_heads else "none" if metadata_shift else "prefix")
    if tags not in EVAL_TAG_SOURCES:
        raise ValueError(
            f"tags must be one of {list(EVAL_TAG_SOURCES)}, got {tags!r}: prefix (spaCy on the text up to each "
            "token), model (the model's tag heads) or none (every tag unknown)."
        )
    if tags == "model" and not has_tag_heads:
        raise ValueError(
            "tags=model uses the model's tag heads, and this checkpoint has none (config.tag_head_fields "
            "is empty): use tags=prefix (LIME) or tags=none."
        )
    if metadata_shift and tags == "prefix":
        raise ValueError(
            "A LIME+1 model reads the tags of the next token, which the harness can only know from the "
            "answer itself: run it unguided (tags=none) or, with tag heads, self-guided (tags=model)."
        )
    return tags


__all__ = [
    "EVAL_TAG_SOURCES",
    "PROVIDER_NAMES",
    "check_eval_tags",
    "check_generation_request",
    "check_lime_model_type",
    "check_meta_generation",
    "check_metadata_injection",
]
