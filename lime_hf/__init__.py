"""lime_hf: LIME (Linguistic Metadata Embeddings) for Hugging Face Transformers.

Importing the package registers the model type ``"lime"`` with the Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoTokenizer`), and costs almost nothing: the names below load on first use (PEP 562),
and the registration happens when transformers' Auto classes are imported (`lime_hf._auto`), so the `lime-hf`
command line (`lime_hf.cli`) answers `--help` without importing torch. `lime_hf.register()` registers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._auto import register, register_when_used

__version__ = "0.1.0"

# Each public name -> the module that defines it (`TYPE_CHECKING` below mirrors this table for type checkers and
# IDEs; tests/test_cli.py checks that the two and `__all__` agree).
_LAZY = {
    "DEFAULT_METADATA_FIELDS": "configuration_lime",
    "DataCollatorForLime": "collator",
    "FieldAnnotator": "annotation",
    "LimeConfig": "configuration_lime",
    "LimeForCausalLM": "modeling_lime",
    "LimeModel": "modeling_lime",
    "LimePreTrainedModel": "modeling_lime",
    "LimeTokenizer": "tokenization_lime",
    "MetaTokenPlacement": "meta_tokens",
    "NerField": "annotation",
    "PosField": "annotation",
    "SpacyAnnotator": "annotation",
    "add_meta_tokens": "meta_tokens",
    "align_dataset": "data",
    "annotate_dataset": "data",
    "check_inventories": "configuration_lime",
    "inject_meta_tokens": "meta_tokens",
    "make_inventory": "configuration_lime",
    "pack_dataset": "data",
    "place_meta_tokens": "meta_tokens",
    "push_to_hub": "model_card",
    "render_model_card": "model_card",
}

if TYPE_CHECKING:
    from .annotation import FieldAnnotator, NerField, PosField, SpacyAnnotator
    from .collator import DataCollatorForLime
    from .configuration_lime import DEFAULT_METADATA_FIELDS, LimeConfig, check_inventories, make_inventory
    from .data import align_dataset, annotate_dataset, pack_dataset
    from .meta_tokens import MetaTokenPlacement, add_meta_tokens, inject_meta_tokens, place_meta_tokens
    from .model_card import push_to_hub, render_model_card
    from .modeling_lime import LimeForCausalLM, LimeModel, LimePreTrainedModel
    from .tokenization_lime import LimeTokenizer


def __getattr__(name: str) -> Any:
    """Import the module that defines `name` on first use, and keep the value here."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "DEFAULT_METADATA_FIELDS",
    "DataCollatorForLime",
    "FieldAnnotator",
    "LimeConfig",
    "LimeForCausalLM",
    "LimeModel",
    "LimePreTrainedModel",
    "LimeTokenizer",
    "MetaTokenPlacement",
    "NerField",
    "PosField",
    "SpacyAnnotator",
    "add_meta_tokens",
    "align_dataset",
    "annotate_dataset",
    "check_inventories",
    "inject_meta_tokens",
    "make_inventory",
    "pack_dataset",
    "place_meta_tokens",
    "push_to_hub",
    "register",
    "render_model_card",
]

register_when_used()
