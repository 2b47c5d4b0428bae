"""Generation from one text prompt with a saved LIME model, reported token by token with the tags it was fed.

`lime-hf generate` prints it, the guided-generation page (`lime_hf.integrations.app`) shows it.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from .configuration_lime import RESERVED_LABELS, SPECIAL_ID
from .meta_tokens import MetaTokenPlacement, place_meta_tokens
from .modeling_lime import LimeForCausalLM
from .options import check_model_folder
from .tokenization_lime import LimeTokenizer


def load_model(path: str) -> tuple[LimeForCausalLM, LimeTokenizer]:
    """The LIME model and LimeTokenizer saved in folder `path`, in eval mode; `ValueError` if it holds others."""
    check_model_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not isinstance(tokenizer, LimeTokenizer):
        raise ValueError(
            f"{path!r} holds a {type(tokenizer).__name__}, not a LimeTokenizer: save the model's one there"
        )
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tokenizer


def load_lime_tokenizer(path: str, alignment: str | None) -> LimeTokenizer:
    """A saved LimeTokenizer (re-wrapped for another `alignment`), or a fast tokenizer wrapped in one."""
    base = AutoTokenizer.from_pretrained(path)
    if isinstance(base, LimeTokenizer) and alignment in (None, base.alignment):
        return base
    return LimeTokenizer.from_tokenizer(
        base, alignment=alignment or "pretokenized", spacy_model=getattr(base, "spacy_model", None)
    )


def provider_source(config: Any, provider: str | None) -> str:
    """Who tags generated tokens that guidance does not cover: `"heads"`, `"spaCy"` or `"unknown"` (`generate`'s rule)."""
    provider = provider or (
        "model" if config.tag_head_fields else "unknown" if config.metadata_shift else "annotate"
    )
    return {"model": "heads", "annotate": "spaCy"}.get(provider, provider)


def generate_with_tags(
    model: LimeForCausalLM,
    tokenizer: LimeTokenizer,
    prompt: str,
    guidance: dict[str, list[str]],
    provider: str | None = None,
    spacy_tags: bool = True,
    meta_every: int | None = None,
    **decoding: Any,
) -> list[dict[str, Any]]:
    """
    Generate from one prompt; per returned sequence its `text` and, per generated token, the `token` text, the
    tags it was `fed` (guidance or provider, by field) and where each came `from` (`"guide"`, or the provider:
    `"heads"`, `"spaCy"`, `"unknown"`), the tags it was `asked` (guidance) and, with `spacy_tags`, the tags spaCy
    `found` in the output (otherwise spaCy never runs on it).

    With `meta_every`, the model's (first) meta-token follows every `meta_every` ordinary tokens, in the prompt
    (`place_meta_tokens`) and in the generated text (`MetaTokenPlacement`); guidance labels are for the ordinary
    tokens, and the meta-tokens are fed the special tag.
    """
    encoding = tokenizer(prompt, return_tensors="pt").to(model.device)
    if meta_every is not None:
        meta_id = model.config.meta_token_ids[0]
        encoding = place_meta_tokens(
            encoding.pop("input_ids"),
            meta_id,
            every=meta_every,
            attention_mask=encoding.pop("attention_mask"),
            metadata_ids=dict(encoding),
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        decoding["logits_processor"] = [MetaTokenPlacement(meta_id, every=meta_every)]
        length = encoding["input_ids"].shape[1]
        guidance = {
            field: around_meta_tokens(labels, length, meta_every, decoding.get("max_new_tokens", 20))
            for field, labels in guidance.items()
        }
    start = encoding["input_ids"].shape[1]
    output = model.generate(
        **encoding,
        tokenizer=tokenizer,
        guidance={field: [labels] for field, labels in guidance.items()} or None,
        metadata_provider=provider,
        return_dict_in_generate=True,
        **decoding,
    )
    fields = (
        tokenizer.metadata_fields
    )  # the model's inventories (`generate` checks them), in the tokenizer's order
    source = provider_source(model.config, provider)
    sequences = []
    for row, ids in enumerate(output.sequences.tolist()):
        # The tags generate fed for each position (guidance or provider); padding after an early EOS is dropped.
        fed_ids = {field: output.metadata_ids[f"{field}_ids"][row].tolist() for field in fields}
        ids = [token for index, token in enumerate(ids) if index < start or token != tokenizer.pad_token_id]
        found = tokenizer.metadata_for_ids(ids) if spacy_tags else None
        rows = []
        for step, token in enumerate(ids[start:]):
            position = start + step
            rows.append(
                {
                    "token": tokenizer.decode([token]),
                    "fed": {field: fields[field][fed_ids[field][position]] for field in fields},
                    "from": {
                        field: "guide" if step < len(guidance.get(field, ())) else source for field in fields
                    },
                    "asked": {
                        field: labels[step] for field, labels in guidance.items() if step < len(labels)
                    },
                    "found": {field: fields[field][found[field][position]] for field in fields}
                    if found
                    else {},
                }
            )
        sequences.append({"text": tokenizer.decode(ids, skip_special_tokens=True), "tokens": rows})
    return sequences


def around_meta_tokens(labels: list[str], start: int, every: int, steps: int) -> list[str]:
    """A guidance schedule for the ordinary generated tokens, with the special label put in at each step that
    `MetaTokenPlacement(every=every)` gives a meta-token (position `start + step`)."""
    labels, schedule = list(labels), []
    for step in range(steps):
        if not labels:
            break
        is_meta = (start + step + 1) % (every + 1) == 0
        schedule.append(RESERVED_LABELS[SPECIAL_ID] if is_meta else labels.pop(0))
    return schedule


__all__ = ["generate_with_tags", "load_lime_tokenizer", "load_model", "provider_source"]
