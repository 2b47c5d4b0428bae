"""The Transformers contract, in the spirit of Transformers' own common model and generation tests: every
backbone (Llama, Qwen2, GPT-2), LIME and LIME+1. A LIME model must take every keyword its backbone takes, mean
the same by it, and add only its metadata."""

import inspect
import warnings

import pytest
import torch
from tiny_models import VOCAB_SIZE, cache_of, random_tags, tiny_lime
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import MaxLengthCriteria
from transformers.generation.streamers import BaseStreamer
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

from lime_hf import LimeConfig, LimeForCausalLM, LimeModel
from lime_hf.compat import CACHE_NAME
from lime_hf.configuration_lime import SPECIAL_ID, UNKNOWN_ID

SETUPS = [(arch, shift) for arch in ("llama", "qwen2", "gpt2") for shift in (0, 1)]
SETUP_IDS = [f"{arch}-{'lime+1' if shift else 'lime'}" for arch, shift in SETUPS]
BOS = 1


def make_model(arch: str, shift: int, seed: int = 0) -> LimeForCausalLM:
    return tiny_lime(
        arch, seed=seed, metadata_shift=shift, text_config={"bos_token_id": BOS, "eos_token_id": 2}
    )


def zero_tables(model: LimeForCausalLM) -> LimeForCausalLM:
    """With all-zero tables the LIME model computes exactly what its backbone does, whatever the tags."""
    with torch.no_grad():
        for table in model.metadata_embeddings.tables.values():
            table.weight.zero_()
    return model


def prompt(model, batch: int = 2, length: int = 5, seed: int = 0) -> dict:
    ids = torch.randint(3, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **random_tags(model, ids.shape, seed)}


def parity_provider(ids: torch.LongTensor, step: int) -> dict:
    """Tags as a pure function of the tokens: the last token's parity (LIME) or the length's (LIME+1)."""
    return {
        "pos": [5 + int(row[-1]) % 2 for row in ids.tolist()],
        "ner": [3 + ids.shape[1] % 3] * ids.shape[0],
    }


@pytest.mark.parametrize(("arch", "shift"), SETUPS, ids=SETUP_IDS)
def test_model_attributes_are_those_of_an_in_tree_model(arch, shift):
    model = make_model(arch, shift)
    backbone_config = model.config.text_config
    assert model.base_model is model.language_model
    assert LimeModel(model.config).base_model is not None
    assert (model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers) == (
        backbone_config.vocab_size,
        backbone_config.hidden_size,
        backbone_config.num_hidden_layers,
    )
    model.config.use_cache = False  # as Trainer does for gradient checkpointing
    assert backbone_config.use_cache is False
    assert model._can_compile_fullgraph is True
    assert "cache" in inspect.signature(model.forward).parameters
    assert "vocab_size" not in model.config.to_diff_dict()  # stored once, in text_config


@pytest.mark.parametrize(("arch", "shift"), SETUPS, ids=SETUP_IDS)
def test_the_cache_is_accepted_under_both_names(arch, shift):
    model = make_model(arch, shift)
    enc = prompt(model, batch=1)
    first = {key: value[:, :4] for key, value in enc.items()}
    last = {key: value[:, 4:] for key, value in enc.items()}
    last["attention_mask"] = enc["attention_mask"]
    if shift:  # LIME+1's prefix ends before token 4, so the lookahead is token 4's tags
        first["next_metadata_ids"] = {"pos": enc["pos_ids"][:, 4], "ner": enc["ner_ids"][:, 4]}
    full = model(**enc).logits[:, -1]
    for name in ("cache", "past_key_values"):  # the old name warns where transformers says `cache`
        cache = DynamicCache(config=model.config.text_config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model(**first, use_cache=True, **{name: cache})
            torch.testing.assert_close(model(**last, **{name: cache}).logits[:, -1], full)
    if CACHE_NAME == "cache":  # as the backbone's `deprecate_kwarg`: `cache` wins, with a warning
        with pytest.warns(FutureWarning, match="Both `past_key_values` and `cache` are set"):
            model(**enc, cache=DynamicCache(), past_key_values=DynamicCache())
    else:
        with pytest.raises(ValueError, match="Pass the KV cache once"):
            model(**enc, cache=DynamicCache(), past_key_values=DynamicCache())


@pytest.mark.parametrize(("arch", "shift"), SETUPS, ids=SETUP_IDS)
def test_no_deprecation_warnings_from_our_calls(arch, shift):
    model = make_model(arch, shift)
    enc = prompt(model)
    logger = hf_logging.get_logger("transformers")
    with warnings.catch_warnings(record=True) as caught, CaptureLogger(logger) as logs:
        warnings.simplefilter("always")
        model(**enc, use_cache=True)
        model.generate(**enc, max_new_tokens=3, do_sample=False, metadata_provider=parity_provider)
    messages = [str(warning.message) for warning in caught] + [logs.out]
    assert not [message for message in messages if "deprecat" in message.lower()], messages


@pytest.mark.parametrize(("arch", "shift"), SETUPS, ids=SETUP_IDS)
def test_generation_keywords_mean_what_they_mean_for_the_backbone(arch, shift):
    model = zero_tables(make_model(arch, shift))
    backbone = model.language_model
    enc = prompt(model)
    common = {"max_new_tokens": 6, "metadata_provider": parity_provider}

    class BanFive(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.index_fill(1, torch.tensor([5]), -float("inf"))

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    greedy = backbone.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=6)
    cases = [
        {"do_sample": False, "bad_words_ids": [[int(greedy[0, 6])]]},
        {"do_sample": False, "negative_prompt_ids": enc["input_ids"][:1, :2], "guidance_scale": 1.5},
        {"do_sample": False, "logits_processor": LogitsProcessorList([BanFive()])},
        {"do_sample": False, "stopping_criteria": StoppingCriteriaList([MaxLengthCriteria(max_length=8)])},
        {"num_beams": 3, "num_return_sequences": 2, "do_sample": False},
        {"do_sample": True, "top_k": 10, "num_return_sequences": 2},
    ]
    for case in cases:
        batch = {key: value[:1] for key, value in enc.items()} if "negative_prompt_ids" in case else enc
        torch.manual_seed(0)
        expected = backbone.generate(
            batch["input_ids"], attention_mask=batch["attention_mask"], **case, max_new_tokens=6
        )
        torch.manual_seed(0)
        assert torch.equal(model.generate(**batch, **case, **common), expected), case
    assert (
        int(greedy[0, 6]) not in model.generate(**enc, **common, bad_words_ids=[[int(greedy[0, 6])]])[0, 5:]
    )

    ours, theirs = Collect(), Collect()
    single = {key: value[:1] for key, value in enc.items()}
    model.generate(**single, **common, streamer=ours)
    backbone.generate(single["input_ids"], max_new_tokens=6, streamer=theirs)
    assert len(ours.chunks) == len(theirs.chunks) == 8  # the prompt, 6 tokens, the end
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(ours.chunks, theirs.chunks, strict=True))


@pytest.mark.parametrize(("arch", "shift"), SETUPS, ids=SETUP_IDS)
def test_constrained_beam_search_fails_as_for_the_backbone(arch, shift, monkeypatch):
    model = make_model(arch, shift)
    enc = prompt(model, batch=1)
    errors = []
    for generate in (model.language_model.generate, model.generate):
        with pytest.raises(ValueError) as error:
            generate(enc["input_ids"], max_new_tokens=3, num_beams=2, force_words_ids=[[5]])
        errors.append(str(error.value))
    assert errors[0] == errors[1] and "Constrained Beam Search" in errors[0]


@pytest.mark.parametrize(("arch", "shift"), SETUPS, ids=SETUP_IDS)
def test_assisted_and_prompt_lookup_decoding_equal_greedy(arch, shift):
    model = make_model(arch, shift)
    enc = prompt(model, batch=1, length=8)
    common = {"max_new_tokens": 6, "do_sample": False, "metadata_provider": parity_provider}
    greedy = model.generate(**enc, **common)
    assistant = make_model(arch, shift, seed=1)
    assert torch.equal(model.generate(**enc, **common, assistant_model=assistant), greedy)
    assert torch.equal(model.generate(**enc, **common, prompt_lookup_num_tokens=2), greedy)


@pytest.mark.parametrize(("arch", "shift"), SETUPS, ids=SETUP_IDS)
def test_generate_returns_the_tags_it_fed(arch, shift):
    model = make_model(arch, shift)
    enc = prompt(model)
    guidance = {"guidance": {"pos": [["NN", "VBZ"], ["DT"]]}} if shift else {}
    out = model.generate(
        **enc, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
        metadata_provider=parity_provider, **guidance,
    )  # fmt: skip
    tags = out.metadata_ids
    assert set(tags) == {"pos_ids", "ner_ids"}
    assert all(value.shape == out.sequences.shape for value in tags.values())
    assert torch.equal(tags["pos_ids"][:, :5], enc["pos_ids"]) and torch.equal(
        tags["ner_ids"][:, :5], enc["ner_ids"]
    )
    # Each generated position holds what the provider (or guidance) said for it, as the model was fed it.
    for position in range(5, out.sequences.shape[1]):
        if shift:
            expected = parity_provider(out.sequences[:, :position], 0)
        else:
            expected = parity_provider(out.sequences[:, : position + 1], 0)
        assert tags["ner_ids"][:, position].tolist() == expected["ner"]
        if not shift:
            assert tags["pos_ids"][:, position].tolist() == expected["pos"]
    if shift:
        nn, vbz, dt = (model.config.metadata_fields["pos"].index(tag) for tag in ("NN", "VBZ", "DT"))
        assert tags["pos_ids"][0, 5:7].tolist() == [nn, vbz] and tags["pos_ids"][1, 5] == dt
    # The model's forward over the whole output with these tags gives the scores generation chose from.
    logits = model(input_ids=out.sequences, **tags).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), out.sequences[:, 5:])


# transformers 5.24 deprecates `generate(past_key_values=...)`; the old name is tested on purpose.
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize(("arch", "shift"), SETUPS, ids=SETUP_IDS)
@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
def test_continuing_from_the_output_and_its_cache_equals_one_call(arch, shift, cache_name):
    model = make_model(arch, shift)
    model.generation_config.eos_token_id = None  # a row that ends early would restart in the second call
    enc = prompt(model)
    schedule = [["NN", "VBZ", "DT", "NN", "JJ", "NN"], ["DT", "NN"]]
    common = {"do_sample": False, "metadata_provider": parity_provider, "return_dict_in_generate": True}

    def guide(start):
        return {"guidance": {"pos": [row[start:] for row in schedule]}} if shift else {}

    one = model.generate(**enc, max_new_tokens=6, **common, **guide(0))
    first = model.generate(**enc, max_new_tokens=3, **common, **guide(0))
    second = model.generate(
        first.sequences,
        attention_mask=torch.ones_like(first.sequences),
        max_new_tokens=3,
        **{cache_name: cache_of(first)},
        **first.metadata_ids,
        **common,
        **guide(3),
    )
    assert torch.equal(second.sequences, one.sequences)
    for key in one.metadata_ids:
        assert torch.equal(second.metadata_ids[key], one.metadata_ids[key])


@pytest.mark.parametrize(("arch", "shift"), SETUPS, ids=SETUP_IDS)
def test_generation_without_a_prompt_starts_from_bos(arch, shift):
    model = make_model(arch, shift)
    common = {
        "max_new_tokens": 4,
        "min_new_tokens": 4,
        "do_sample": False,
        "metadata_provider": parity_provider,
    }
    out = model.generate(**common, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 5) and out.sequences[0, 0] == BOS
    assert out.metadata_ids["pos_ids"][0, 0] == out.metadata_ids["ner_ids"][0, 0] == SPECIAL_ID
    bos = torch.tensor([[BOS]])
    special = torch.full_like(bos, SPECIAL_ID)
    assert torch.equal(
        model.generate(input_ids=bos, pos_ids=special, ner_ids=special, **common), out.sequences
    )
    assert model.language_model.generate(max_new_tokens=4, min_new_tokens=4).shape == (
        1,
        5,
    )  # as the backbone


def test_generation_without_a_prompt_needs_a_bos_token():
    model = tiny_lime("llama", text_config={"bos_token_id": None})
    model.generation_config.bos_token_id = None
    with pytest.raises(ValueError, match="no prompt and the model has no `bos_token_id`"):
        model.generate(max_new_tokens=2)


@pytest.mark.parametrize(("arch", "shift"), SETUPS, ids=SETUP_IDS)
@pytest.mark.parametrize("with_metadata", [True, False], ids=["tags", "no-tags"])
def test_static_cache_equals_dynamic_cache(arch, shift, with_metadata):
    model = make_model(arch, shift)
    enc = prompt(model)
    if not with_metadata:
        enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    common = {
        "max_new_tokens": 5,
        "do_sample": False,
        "metadata_provider": parity_provider if with_metadata else "unknown",
    }
    dynamic = model.generate(**enc, **common)
    static = model.generate(**enc, **common, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_ignored_ids_keyword_is_an_error_not_silence():
    model = tiny_lime("qwen2")
    ids = torch.randint(3, VOCAB_SIZE, (1, 4))
    with pytest.raises(
        ValueError, match=r"`morph_ids` is neither a metadata field.*Qwen2ForCausalLM backbone"
    ):
        model(input_ids=ids, morph_ids=ids)
    gpt2 = tiny_lime("gpt2")
    torch.testing.assert_close(  # GPT-2 takes token_type_ids itself: they reach it
        gpt2(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits,
        gpt2.language_model(
            inputs_embeds=gpt2.get_input_embeddings()(ids), token_type_ids=torch.zeros_like(ids)
        ).logits,
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_table_gets_a_gradient_with_or_without_its_field(arch):
    """DDP without `find_unused_parameters` needs every parameter in every step's graph."""
    model = tiny_lime(arch)
    ids = torch.randint(3, VOCAB_SIZE, (2, 6))
    for tags in ({}, {"pos_ids": torch.full_like(ids, 5)}):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, **tags).loss.backward()
        for name, table in model.metadata_embeddings.tables.items():
            assert table.weight.grad is not None, name
        assert model.metadata_embeddings.tables["ner"].weight.grad.abs().sum() == 0  # unknown embeds to zero
    for tags in ({}, {"ner_ids": torch.full_like(ids, UNKNOWN_ID)}):
        torch.testing.assert_close(
            model(input_ids=ids, **tags).logits, model.language_model(input_ids=ids).logits, rtol=0, atol=0
        )


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "shift"), [("llama", 0), ("gpt2", 1)], ids=["llama-lime", "gpt2-lime+1"])
def test_forward_compiles_with_fullgraph(arch, shift):
    model = make_model(arch, shift)
    enc = prompt(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(**enc).logits, model(**enc).logits)


def test_config_top_level_attributes_write_through_and_round_trip(tmp_path):
    config = LimeConfig(text_config={"model_type": "llama", "vocab_size": 50, "hidden_size": 16,
                                     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2})  # fmt: skip
    config.vocab_size = 64
    config.save_pretrained(tmp_path)
    loaded = LimeConfig.from_pretrained(tmp_path)
    assert loaded.vocab_size == loaded.text_config.vocab_size == 64
    assert loaded.hidden_size == 16 and loaded.num_hidden_layers == 1


@pytest.mark.parametrize("shift", [0, 1])
def test_returned_tags_follow_beams_and_returned_sequences(shift):
    model = make_model("llama", shift)
    enc = prompt(model)
    out = model.generate(
        **enc, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
        return_dict_in_generate=True, metadata_provider=parity_provider,
    )  # fmt: skip
    assert out.metadata_ids["pos_ids"].shape == out.sequences.shape == (4, 9)
    assert torch.equal(out.metadata_ids["pos_ids"][:, :5], enc["pos_ids"].repeat_interleave(2, dim=0))
    for position in range(5, 9):  # a pure function of each returned row's own prefix
        prefix = out.sequences[:, : position + (1 - shift)]
        assert out.metadata_ids["ner_ids"][:, position].tolist() == parity_provider(prefix, 0)["ner"]
