"""The per-step paths of generation: the in-place tracker (greedy, sampling) against the prefix trie, the rule for a
generated token's tags (`GeneratedTags`), and the forward's stacked tags."""

import pytest
import torch
from tiny_models import random_tags, tiny_lime

from lime_hf.configuration_lime import POS_TAGS, UNKNOWN_ID
from lime_hf.generation import LimeGenerationMixin
from lime_hf.metadata_tracker import GeneratedTags, InPlaceTracker, PrefixTrieTracker
from lime_hf.tag_providers import UnknownProvider

VBZ, DT, NN = (3 + POS_TAGS.index(tag) for tag in ("VBZ", "DT", "NN"))


def prompt(model, batch=2, length=5, seed=0):
    ids = torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **random_tags(model, ids.shape, seed)}


def generate_both_ways(model, monkeypatch, **kwargs):
    """`generate` with the tracker it picks (and which one that was), then forced onto the prefix trie."""
    made = []
    original = LimeGenerationMixin._new_tracker

    def recording(self, *args, **kw):
        made.append(type(tracker := original(self, *args, **kw)))
        return tracker

    monkeypatch.setattr(LimeGenerationMixin, "_new_tracker", recording)
    torch.manual_seed(0)
    picked = model.generate(**kwargs, return_dict_in_generate=True)
    monkeypatch.setattr(LimeGenerationMixin, "_extends_rows_in_place", lambda *args: False)
    torch.manual_seed(0)
    trie = model.generate(**kwargs, return_dict_in_generate=True)
    assert made == [InPlaceTracker, PrefixTrieTracker]
    return picked, trie


def assert_same(picked, trie):
    assert torch.equal(picked.sequences, trie.sequences)
    assert picked.metadata_ids.keys() == trie.metadata_ids.keys()
    for name, ids in picked.metadata_ids.items():
        assert torch.equal(ids, trie.metadata_ids[name]), name


@pytest.mark.parametrize(
    "shift, extra",
    [
        (0, {"metadata_provider": "unknown"}),
        (
            0,
            {
                "metadata_provider": lambda ids, step: {
                    "pos": [VBZ if row[-1] % 2 else None for row in ids.tolist()]
                }
            },
        ),
        (1, {"guidance": {"pos": [["VBZ", "DT", "NN"], ["NN"]]}, "metadata_provider": "unknown"}),
        (
            1,
            {
                "guidance": {
                    "pos": [["VBZ"], ["NN", "DT"]],
                    "ner": lambda ids, step: [None, "O"][: ids.shape[0]],
                },
                "metadata_provider": lambda ids, step: {"pos": ["DT"] * ids.shape[0]},
            },
        ),
    ],
)
@pytest.mark.parametrize("use_cache", [True, False])
def test_in_place_tracker_matches_the_prefix_trie(monkeypatch, shift, extra, use_cache):
    model = tiny_lime("llama", metadata_shift=shift)
    picked, trie = generate_both_ways(
        model, monkeypatch, **prompt(model), max_new_tokens=6, do_sample=False, use_cache=use_cache, **extra
    )
    assert_same(picked, trie)


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize(
    "heads", [["pos", "ner"], ["ner"]]
)  # every field, or a field without a head (unknown)
def test_in_place_tracker_matches_the_prefix_trie_with_heads(monkeypatch, shift, heads):
    model = tiny_lime("qwen2", metadata_shift=shift, tag_head_fields=heads)
    picked, trie = generate_both_ways(
        model, monkeypatch, **prompt(model, batch=3), max_new_tokens=6, do_sample=False
    )
    assert_same(picked, trie)
    if heads == ["ner"]:
        generated = picked.metadata_ids["pos_ids"][:, 5 + shift :]
        assert (generated == UNKNOWN_ID).all()


def test_in_place_tracker_matches_the_prefix_trie_when_sampling_several_sequences(monkeypatch):
    model = tiny_lime("llama", metadata_shift=1, tag_head_fields=["pos", "ner"])
    picked, trie = generate_both_ways(
        model, monkeypatch, **prompt(model), max_new_tokens=5, do_sample=True, num_return_sequences=2
    )
    assert_same(picked, trie)


def test_rows_ended_by_eos_get_padding_where_no_step_fed_them(monkeypatch):
    model = tiny_lime("llama", tag_head_fields=["pos", "ner"])
    enc = prompt(model, batch=3)
    first = model.generate(**enc, max_new_tokens=1, do_sample=False)[:, -1]
    eos = int(first[0])  # row 0 ends at its first token; greedy feeds it padding from then on
    picked, trie = generate_both_ways(
        model, monkeypatch, **enc, max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    assert_same(picked, trie)
    assert (picked.metadata_ids["pos_ids"][0, -1] == 0).item()  # PAD_ID: the last token was never fed


def test_decoding_modes_pick_their_tracker():
    model = tiny_lime("llama")
    in_place = model._extends_rows_in_place
    assert in_place(None, {}) and in_place(None, {"do_sample": True, "num_return_sequences": 3})
    assert not in_place(None, {"num_beams": 2})
    assert not in_place(None, {"prompt_lookup_num_tokens": 2})
    assert not in_place(None, {"assistant_model": tiny_lime("llama", seed=1)})


def test_generated_tags_take_guidance_then_the_provider_then_unknown():
    fields = tiny_lime("llama", metadata_shift=1).config.metadata_fields
    guidance = {"pos": [[VBZ, DT], [NN]]}
    ids = torch.tensor([[0, 0, 0], [1, 1, 1]])
    no_state = lambda: None  # noqa: E731

    def provider(input_ids, step):  # row 0: pos NN, row 1: ner O
        rows = input_ids[:, 0].tolist()
        return {"pos": [None if row else "NN" for row in rows], "ner": ["O" if row else None for row in rows]}

    tags = GeneratedTags(fields, provider, guidance, 2, torch.device("cpu"))
    o = 3 + fields["ner"][3:].index("O")
    assert tags(ids, 0, (0, 1), no_state).tolist() == [[[VBZ, UNKNOWN_ID]], [[NN, o]]]
    assert tags(ids, 1, (0, 1), no_state).tolist() == [[[DT, UNKNOWN_ID]], [[UNKNOWN_ID, o]]]
    assert tags(ids[1:], 1, (1,), no_state).tolist() == [[[UNKNOWN_ID, o]]]
    # With the unknown provider every step is known in advance: the same tensors, asked again.
    known = GeneratedTags(fields, UnknownProvider(), guidance, 2, torch.device("cpu"))
    assert known(ids, 1, (0, 1), no_state).tolist() == [[[DT, UNKNOWN_ID]], [[UNKNOWN_ID, UNKNOWN_ID]]]
    assert known(ids, 5, (0, 1), no_state) is known(ids, 6, (0, 1), no_state)


def test_a_provider_must_give_one_label_per_row():
    fields = tiny_lime("llama").config.metadata_fields
    tags = GeneratedTags(fields, lambda ids, step: {"pos": ["NN"]}, {}, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="gave 1 'pos' labels for 2 rows"):
        tags(torch.zeros(2, 3, dtype=torch.long), 0, (0, 1), lambda: None)


@pytest.mark.parametrize("shift", [0, 1])
def test_stacked_fed_ids_read_as_the_tags_they_stack(shift):
    model = tiny_lime("llama", metadata_shift=shift)
    enc = prompt(model)
    upcoming = {"pos": torch.tensor([VBZ, NN]), "ner": torch.tensor([3, 4])}
    extra = {"next_metadata_ids": upcoming} if shift else {}
    expected = model(**enc, **extra).logits
    tags = torch.stack([enc["pos_ids"], enc["ner_ids"]], dim=-1)
    if shift:  # each position reads the next token's tags
        tags = torch.cat(
            [tags[:, 1:], torch.stack([upcoming["pos"], upcoming["ner"]], dim=-1)[:, None]], dim=1
        )
    stacked = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], stacked_fed_ids=tags)
    assert torch.equal(stacked.logits, expected)
    with pytest.raises(ValueError, match="pass them alone"):
        model(**enc, stacked_fed_ids=tags)


def test_no_tags_without_gradients_read_as_unknown_everywhere():
    model = tiny_lime("llama", metadata_shift=1)
    ids = prompt(model)["input_ids"]
    unknown = {name: torch.full_like(ids, UNKNOWN_ID) for name in ("pos_ids", "ner_ids")}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids, **unknown).logits)
