"""A plain checkpoint folder (GPT-2, Llama) given to LIME's own loaders is a clear error, never a default backbone.

Read as a LIME config, a plain config.json has no `text_config`: LIME once built its default 7B Llama from it (the
process was killed for memory), or a Llama with the default `intermediate_size`. `AutoModelForCausalLM` still loads
the plain model, as it should.
"""

import re

import pytest
import torch
from tiny_models import TINY_TEXT_CONFIGS
from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

import lime_hf  # noqa: F401  (registers the LIME auto classes)
from lime_hf import LimeConfig, LimeForCausalLM


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def plain_folder(request, tmp_path_factory):
    """A saved tiny random plain checkpoint: (folder, model_type, its model class)."""
    arch = request.param
    folder = tmp_path_factory.mktemp(f"plain-{arch}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_TEXT_CONFIGS[arch]))
    model.save_pretrained(folder)
    return folder, arch, {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}[arch]


def refusal(folder, model_type) -> str:
    return re.escape(
        f"{str(folder)!r} holds a {model_type!r} model, not a LIME model; retrofit it first "
        f"(`LimeForCausalLM.from_backbone({str(folder)!r}, ...)`"
    )


@pytest.mark.parametrize("load", [LimeForCausalLM.from_pretrained, LimeConfig.from_pretrained])
def test_lime_loaders_refuse_a_plain_checkpoint(plain_folder, load):
    folder, model_type, _ = plain_folder
    with pytest.raises(ValueError, match=refusal(folder, model_type)):
        load(folder)


def test_the_auto_classes_load_the_plain_model(plain_folder):
    folder, model_type, model_class = plain_folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is model_class
    assert AutoConfig.from_pretrained(folder).model_type == model_type


def test_a_retrofit_keeps_the_checkpoint_sizes(plain_folder):
    folder, model_type, _ = plain_folder
    model = LimeForCausalLM.from_backbone(str(folder))
    assert model.config.text_config.to_dict() == AutoConfig.from_pretrained(folder).to_dict()


def test_no_default_backbone():
    with pytest.raises(ValueError, match=re.escape("LimeConfig needs `text_config`, the backbone's config")):
        LimeConfig()
    with pytest.raises(ValueError, match=re.escape("LimeConfig needs `text_config`")):
        LimeConfig(metadata_shift=1, hidden_size=4096)
