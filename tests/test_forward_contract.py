"""The forward's contract after the redesign: `past_key_values=` as the backbone takes it, self-tagging only where it
is documented or asked for, and meta-attention hooks that attach once and detach."""

import warnings

import pytest
import torch
from tiny_models import random_tags, tiny_lime
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from lime_hf.compat import CACHE_NAME
from lime_hf.configuration_lime import UNKNOWN_ID
from lime_hf.meta_attention import _SublayerHook

IDS = torch.tensor([[5, 9, 13, 2, 7, 11], [4, 8, 15, 16, 23, 42]])


def cached_logits(model, keyword: str) -> tuple[torch.Tensor, list]:
    """The logits of the last two tokens fed after a cache of the first four, the cache passed as `keyword`."""
    tags = random_tags(model, IDS.shape)
    first = model(IDS[:, :4], use_cache=True, **{name: ids[:, :4] for name, ids in tags.items()})
    cache = first["cache"] if "cache" in first else first["past_key_values"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = model(
            IDS[:, 4:], **{keyword: cache}, **{name: ids[:, 4:] for name, ids in tags.items()}
        ).logits
    return logits, [str(warning.message) for warning in caught if issubclass(warning.category, FutureWarning)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_past_key_values_is_taken_and_warned_about_as_the_backbone_does(arch):
    model = tiny_lime(arch)
    with_cache, quiet = cached_logits(model, "cache")
    with_old_name, warned = cached_logits(model, "past_key_values")
    torch.testing.assert_close(with_old_name, with_cache, rtol=0, atol=0)
    assert quiet == []
    backbone = AutoModelForCausalLM.from_config(model.config.text_config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone(IDS, past_key_values=None)
    backbone_warned = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    if CACHE_NAME == "cache":  # transformers >= 5.24: deprecated, with the backbone's horizon
        assert [message.split(" for ")[0] for message in warned] == [
            message.split(" for ")[0] for message in backbone_warned
        ]
        assert warned == ["`past_key_values` is deprecated and will be removed in version 5.40.0 for "
                          "`LimeForCausalLM.forward`. Use `cache` instead."]  # fmt: skip
    else:  # the current name before 5.24: silent, as the backbone is
        assert warned == backbone_warned == []


def test_generate_and_trainer_do_not_trigger_the_deprecation(tmp_path):
    model = tiny_lime("llama", tag_head_fields=["pos"])
    tags = random_tags(model, IDS.shape)
    rows = [
        {"input_ids": ids, "labels": ids, **{n: t[i] for n, t in tags.items()}} for i, ids in enumerate(IDS)
    ]
    args = TrainingArguments(tmp_path, max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        model.generate(IDS, max_new_tokens=3, do_sample=False, **tags)
        model.generate(IDS, max_new_tokens=3, do_sample=False, num_beams=2, **tags)
        Trainer(model=model.train(), args=args, train_dataset=rows, eval_dataset=rows).train()
        Trainer(model=model, args=args, eval_dataset=rows).evaluate()


@torch.no_grad()
def test_self_tagging_happens_where_documented_or_asked_for():
    model = tiny_lime("llama", tag_head_fields=["pos", "ner"])
    unknown = {f"{name}_ids": torch.full_like(IDS, UNKNOWN_ID) for name in model.config.metadata_fields}
    bare = model(IDS).logits  # documented: `input_ids` alone, no labels -> the heads' own tags
    torch.testing.assert_close(model(IDS, self_tag=True).logits, bare, rtol=0, atol=0)
    torch.testing.assert_close(
        model(IDS, self_tag=False).logits, model(IDS, **unknown).logits, rtol=0, atol=0
    )
    assert not torch.equal(bare, model(IDS, **unknown).logits)
    with pytest.raises(ValueError, match=r"given `labels` but no tags.*`self_tag=True`.*`self_tag=False`"):
        model(IDS, labels=IDS)
    assert model(IDS, labels=IDS, self_tag=False).loss is not None
    with pytest.raises(ValueError, match=r"`self_tag=True` tags `input_ids` from their first token"):
        model(IDS, self_tag=True, **unknown)
    with pytest.raises(
        ValueError, match=r"`self_tag=True` reads the model's tag heads, and this model has none"
    ):
        tiny_lime("llama")(IDS, self_tag=True)


def sublayer_hooks(model) -> list[int]:
    layers = model.language_model.base_model.layers
    return [
        sum(isinstance(hook, _SublayerHook) for hook in layer._forward_hooks.values()) for layer in layers
    ]


@torch.no_grad()
def test_meta_attention_hooks_attach_once_and_detach():
    model = tiny_lime("llama", metadata_fields={}, meta_token_ids=[96], meta_positional="zero")
    ids = IDS.masked_fill(IDS % 3 == 0, 96)
    with_meta = model(ids).logits
    model.meta_attention.attach(model.language_model)
    model.meta_attention.attach(model.language_model)
    assert sublayer_hooks(model) == [1, 1]
    torch.testing.assert_close(model(ids).logits, with_meta, rtol=0, atol=0)
    model.meta_attention.detach()
    assert sublayer_hooks(model) == [0, 0]
    torch.testing.assert_close(model(ids).logits, model.language_model(ids).logits, rtol=0, atol=0)
    assert not torch.equal(model(ids).logits, with_meta)
    model.meta_attention.attach(model.language_model)
    torch.testing.assert_close(model(ids).logits, with_meta, rtol=0, atol=0)
