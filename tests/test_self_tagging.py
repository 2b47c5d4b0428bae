"""Generation with the tag heads: `metadata_provider="model"` (LIME) and self-guidance (LIME+1)."""

import pytest
import torch
from test_generation import prompt
from tiny_models import tiny_lime

from lime_hf import LimeTokenizer
from lime_hf.cli import main
from lime_hf.tag_heads import self_tagged_forward

HEADS = {"tag_head_fields": ["pos", "ner"]}
DECODINGS = [
    {"do_sample": False},
    {"num_beams": 3, "num_return_sequences": 2},
    {"do_sample": True, "top_k": 5, "num_return_sequences": 2},
]


def prompt_tags(enc):
    return {name: enc[f"{name}_ids"] for name in ("pos", "ner")}


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_is_the_self_tagged_reading_of_its_output(arch, shift):
    """Every generated token is the argmax of the honest forward over the output: the tags generation fed are
    the heads' causal predictions, the same as when the finished text is read back."""
    model = tiny_lime(arch, metadata_shift=shift, **HEADS)
    enc = prompt(model)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    logits, _ = self_tagged_forward(model, out, prompt_metadata=prompt_tags(enc), prompt_length=5)
    assert torch.equal(logits[:, 4:-1].argmax(-1), out[:, 5:])
    unknown = model.generate(**enc, max_new_tokens=8, do_sample=False, metadata_provider="unknown")
    assert not torch.equal(out, unknown)  # the heads' tags matter


def test_model_provider_is_the_default_for_a_model_with_heads():
    model = tiny_lime("llama", **HEADS)
    enc = prompt(model)
    default = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert torch.equal(
        default, model.generate(**enc, max_new_tokens=6, do_sample=False, metadata_provider="model")
    )


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("decoding", DECODINGS)
def test_output_is_the_same_with_dynamic_static_and_no_cache(shift, decoding):
    model = tiny_lime("llama", metadata_shift=shift, self_guidance="sample", **HEADS)
    enc = prompt(model)
    outputs = []
    for cache in ({"use_cache": True}, {"use_cache": False}, {"cache_implementation": "static"}):
        torch.manual_seed(0)
        outputs.append(model.generate(**enc, max_new_tokens=7, **cache, **decoding))
    assert outputs[0].shape == (2 * decoding.get("num_return_sequences", 1), 12)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_sampled_self_guidance_differs_from_argmax_and_follows_the_seed():
    argmax = tiny_lime("llama", metadata_shift=1, **HEADS)
    sampled = tiny_lime("llama", metadata_shift=1, self_guidance="sample", **HEADS)
    enc = prompt(argmax, batch=4)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(sampled.generate(**enc, max_new_tokens=10, do_sample=False))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], argmax.generate(**enc, max_new_tokens=10, do_sample=False))


def test_guidance_and_self_guidance_mix_per_row_and_per_step():
    """Row 0 is guided for two steps, then guides itself; row 1 guides itself throughout."""
    model = tiny_lime("llama", metadata_shift=1, **HEADS)
    enc = prompt(model)
    guidance = {"pos": [["VBZ", "DT"], []], "ner": [["O", "B-PERSON"], []]}
    mixed = model.generate(**enc, max_new_tokens=8, do_sample=False, guidance=guidance)
    # The honest reading with the two guided tags as given tags of the first two generated tokens.
    row = mixed[:1]
    guided_tags = {
        "pos": torch.cat([enc["pos_ids"][:1], torch.tensor([[45, 14]])], 1),  # VBZ, DT
        "ner": torch.cat([enc["ner_ids"][:1], torch.tensor([[3, 30]])], 1),  # O, B-PERSON
    }
    assert (
        model.config.metadata_fields["pos"][45] == "VBZ"
        and model.config.metadata_fields["ner"][30] == "B-PERSON"
    )
    logits, fed = self_tagged_forward(model, row, prompt_metadata=guided_tags, prompt_length=7)
    assert fed["pos"][0, 4:6].tolist() == [45, 14]
    assert torch.equal(logits[:, 4:-1].argmax(-1), row[:, 5:])
    alone = model.generate(
        **{key: value[1:] for key, value in enc.items()}, max_new_tokens=8, do_sample=False
    )
    assert torch.equal(mixed[1:], alone)
    assert not torch.equal(
        mixed[:1], model.generate(**{k: v[:1] for k, v in enc.items()}, max_new_tokens=8, do_sample=False)
    )


@pytest.mark.parametrize("shift", [0, 1])
def test_left_padded_batch_matches_rows_generated_alone(shift):
    model = tiny_lime("llama", metadata_shift=shift, **HEADS)
    long, short = prompt(model, batch=1, length=6, seed=1), prompt(model, batch=1, length=3, seed=2)
    batch = {
        key: torch.cat([long[key], torch.cat([torch.zeros_like(short[key][:, :3]), short[key]], dim=1)])
        for key in long
    }
    together = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(together[0], model.generate(**long, max_new_tokens=6, do_sample=False)[0])
    assert torch.equal(together[1, 3:], model.generate(**short, max_new_tokens=6, do_sample=False)[0])


def test_model_provider_needs_heads():
    model = tiny_lime("llama")
    with pytest.raises(
        ValueError, match=r"metadata provider 'model' reads the model's tag heads, and this model has none"
    ):
        model.generate(**prompt(model), max_new_tokens=2, metadata_provider="model")
    with pytest.raises(
        ValueError, match=r"metadata provider \(--provider\) 'spacy' is not one of annotate, unknown, model"
    ):
        model.generate(**prompt(model), max_new_tokens=2, metadata_provider="spacy")


@pytest.mark.parametrize("shift", [0, 1])
def test_cli_generate_tags_with_the_heads_and_never_re_annotates(
    shift, bpe_tokenizer, tmp_path, capsys, monkeypatch
):
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer)
    model = tiny_lime("llama", metadata_shift=shift, text_config={"vocab_size": len(tokenizer)}, **HEADS)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompt_text = "Emma was"
    encoding = tokenizer(prompt_text, return_tensors="pt")
    expected = model.generate(**encoding, max_new_tokens=5, do_sample=False, metadata_provider="model")

    def no_re_annotation(self, ids):
        raise AssertionError("generated tokens were re-annotated")

    monkeypatch.setattr(LimeTokenizer, "metadata_for_ids", no_re_annotation)
    main(["generate", str(tmp_path), prompt_text, "--max-new-tokens", "5"])
    assert capsys.readouterr().out == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("shift", [0, 1])
def test_returned_metadata_ids_are_the_self_tagged_tags(shift):
    model = tiny_lime("qwen2", metadata_shift=shift, **HEADS)
    enc = prompt(model)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    _, fed = self_tagged_forward(model, out.sequences, prompt_metadata=prompt_tags(enc), prompt_length=5)
    for name in ("pos", "ner"):
        returned = out.metadata_ids[f"{name}_ids"]  # the tags of the tokens themselves
        own = fed[name] if not shift else fed[name][:, :-1]  # LIME+1 fed token i's tag at position i - 1
        assert torch.equal(returned[:, 5:], own[:, 5:] if not shift else own[:, 4:])


def test_model_provider_refuses_to_check_several_candidates_at_once():
    model = tiny_lime("llama", **HEADS)
    with pytest.raises(ValueError, match=r"feeds one new token per forward"):
        model.generate(
            **prompt(model, batch=1),
            max_new_tokens=6,
            do_sample=False,
            assistant_model=tiny_lime("llama", seed=1),
        )


@pytest.mark.parametrize("shift", [0, 1])
def test_input_ids_alone_are_read_self_tagged_and_generate_tags_an_untagged_prompt(shift):
    """What a harness that passes token ids only (lm-eval's `--model hf`) gets: the honest reading."""
    model = tiny_lime("llama", metadata_shift=shift, **HEADS)
    ids = prompt(model, length=7)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    honest, fed = self_tagged_forward(model, ids, attention_mask=mask)
    out = model(ids, attention_mask=mask)
    torch.testing.assert_close(out.logits[mask.bool()], honest[mask.bool()])
    unknown = {f"{name}_ids": torch.full_like(ids, 1) for name in ("pos", "ner")}
    assert not torch.allclose(out.logits, model(ids, attention_mask=mask, **unknown).logits)
    with pytest.raises(ValueError, match="given `labels` but no tags"):  # training must say what it reads
        model(ids, labels=ids)
    labelled = model(ids, labels=ids, self_tag=True)  # no given tags to learn: the loss is the LM loss alone
    assert labelled.tag_losses == {} and torch.allclose(labelled.loss, labelled.lm_loss)
    generated = model.generate(ids[1:], max_new_tokens=6, do_sample=False)
    logits, _ = self_tagged_forward(model, generated)
    assert torch.equal(logits[:, 6:-1].argmax(-1), generated[:, 7:])
    plain = tiny_lime("llama", metadata_shift=shift)  # without heads: missing tags are unknown, as before
    assert torch.equal(plain(ids).logits, plain(ids, **unknown).logits)
