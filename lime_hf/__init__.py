"""lime_hf: LIME (Linguistic Metadata Embeddings) for Hugging Face Transformers.

Importing the package registers the model type ``"lime"`` with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .annotation import FieldAnnotator, NerField, PosField, SpacyAnnotator
from .collator import DataCollatorForLime
from .configuration_lime import DEFAULT_METADATA_FIELDS, LimeConfig, check_inventories, make_inventory
from .data import align_dataset, annotate_dataset, pack_dataset
from .meta_tokens import MetaTokenPlacement, place_meta_tokens
from .model_card import push_to_hub, render_model_card
from .modeling_lime import LimeForCausalLM, LimeModel, LimePreTrainedModel
from .tokenization_lime import LimeTokenizer

AutoConfig.register("lime", LimeConfig)
AutoModel.register(LimeConfig, LimeModel)
AutoModelForCausalLM.register(LimeConfig, LimeForCausalLM)
AutoTokenizer.register(LimeConfig, tokenizer_class=LimeTokenizer)
# `save_pretrained` then copies the code files next to the weights, for `trust_remote_code=True` users.
LimeConfig.register_for_auto_class()
LimeModel.register_for_auto_class("AutoModel")
LimeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

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
    "align_dataset",
    "annotate_dataset",
    "check_inventories",
    "make_inventory",
    "pack_dataset",
    "place_meta_tokens",
    "push_to_hub",
    "render_model_card",
]
