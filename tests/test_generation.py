import logging

import pytest
import torch
from tiny_models import random_tags, tiny_lime
from transformers.utils import logging as hf_logging

from lime_hf.configuration_lime import PAD_ID, POS_TAGS, UNKNOWN_ID

VBZ, DT, NN = (3 + POS_TAGS.index(tag) for tag in ("VBZ", "DT", "NN"))


def prompt(model, batch=2, length=5, seed=0):
    ids = torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **random_tags(model, ids.shape, seed)}


def greedy_by_hand(model, enc, steps, next_tag=None, own_tags=None):
    """Greedy decoding without `generate` or a cache: every step re-feeds the whole sequence and its tags.

    `next_tag(row, step)` -> the pos tag of the token about to be generated (LIME+1);
    `own_tags(row, ids)` -> the (pos, ner) tags of the last token of `ids` (LIME).
    """
    ids, pos, ner = enc["input_ids"], enc["pos_ids"], enc["ner_ids"]
    for step in range(steps):
        extra = {}
        if next_tag is not None:
            upcoming = torch.tensor([next_tag(row, step) for row in range(ids.shape[0])])
            extra = {"next_metadata_ids": {"pos": upcoming}}
        logits = model(input_ids=ids, pos_ids=pos, ner_ids=ner, **extra).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        if next_tag is not None:
            new_pos, new_ner = upcoming, torch.full_like(upcoming, UNKNOWN_ID)
        else:
            new_pos, new_ner = torch.tensor([own_tags(row, ids[row]) for row in range(ids.shape[0])]).T
        pos = torch.cat([pos, new_pos.view(-1, 1)], dim=1)
        ner = torch.cat([ner, new_ner.view(-1, 1)], dim=1)
    return ids


def test_guided_generation_feeds_the_schedule_then_the_provider():
    model = tiny_lime("llama", metadata_shift=1)
    enc = prompt(model)
    schedules = [[VBZ, DT, NN], [NN]]  # rows may differ in length; then the provider (here: DT) takes over
    expected = greedy_by_hand(
        model, enc, 6, next_tag=lambda row, step: schedules[row][step] if step < len(schedules[row]) else DT
    )
    guided = model.generate(
        **enc,
        max_new_tokens=6,
        do_sample=False,
        guidance={"pos": [["VBZ", "DT", "NN"], ["NN"]]},
        metadata_provider=lambda ids, step: {"pos": ["DT"] * ids.shape[0]},
    )
    assert torch.equal(guided, expected)
    unguided = model.generate(**enc, max_new_tokens=6, do_sample=False, metadata_provider="unknown")
    assert not torch.equal(guided, unguided)


def test_guidance_callable_gets_input_ids_and_step():
    model = tiny_lime("qwen2", metadata_shift=1)
    enc = prompt(model, batch=1)
    calls = []

    def schedule(input_ids, step):
        calls.append((input_ids.shape[1], step))
        return ["VBZ" if step % 2 else "NN"]

    out = model.generate(**enc, max_new_tokens=4, do_sample=False, guidance={"pos": schedule})
    assert calls == [(5, 0), (6, 1), (7, 2), (8, 3)]
    expected = greedy_by_hand(model, enc, 4, next_tag=lambda row, step: VBZ if step % 2 else NN)
    assert torch.equal(out, expected)


def test_lime_provider_tags_each_generated_token():
    model = tiny_lime("gpt2")
    enc = prompt(model)

    def tag_of_last(ids, step):  # parity of the last token: a stand-in for re-annotation
        return {"pos": [VBZ if row[-1] % 2 else NN for row in ids.tolist()]}

    out = model.generate(**enc, max_new_tokens=6, do_sample=False, metadata_provider=tag_of_last)
    expected = greedy_by_hand(
        model, enc, 6, own_tags=lambda row, ids: (VBZ if ids[-1] % 2 else NN, UNKNOWN_ID)
    )
    assert torch.equal(out, expected)


def test_lime_re_annotates_what_it_generates_given_the_tokenizer(lime_offsets):
    model = tiny_lime("llama", text_config={"vocab_size": len(lime_offsets)})
    enc = lime_offsets(["Emma walked to Highbury with Mr. Knightley."], return_tensors="pt")

    def spacy_tags_of_last(row, ids):  # the whole text re-annotated; the provider annotates a tail window
        tags = lime_offsets.metadata_for_ids(ids.tolist())
        return tags["pos"][-1], tags["ner"][-1]

    out = model.generate(**enc, max_new_tokens=5, do_sample=False, tokenizer=lime_offsets)
    assert torch.equal(out, greedy_by_hand(model, enc, 5, own_tags=spacy_tags_of_last))
    assert not torch.equal(
        out, model.generate(**enc, max_new_tokens=5, do_sample=False, metadata_provider="unknown")
    )


def test_tokenizer_and_model_inventories_must_match(lime_offsets):
    model = tiny_lime("llama", metadata_fields={"pos": ["<pad>", "<unk>", "<special>", "X"]})
    enc = lime_offsets("Emma smiled.", return_tensors="pt")
    with pytest.raises(ValueError, match=r"inventories differ in field 'ner'.*model None"):
        model.generate(input_ids=enc["input_ids"], max_new_tokens=1, tokenizer=lime_offsets)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize(
    "decoding",
    [
        {"do_sample": False},
        {"num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "top_k": 5, "num_return_sequences": 2},
    ],
)
def test_output_is_the_same_with_and_without_the_kv_cache(arch, shift, decoding):
    model = tiny_lime(arch, metadata_shift=shift)
    enc = prompt(model)
    if shift:
        metadata = {"guidance": {"pos": [["VBZ", "DT"], ["NN", "NN", "VBZ", "DT"]], "ner": ["O"]}}
    else:
        metadata = {
            "metadata_provider": lambda ids, step: {"pos": [VBZ if r[-1] % 2 else NN for r in ids.tolist()]}
        }
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        outputs.append(model.generate(**enc, max_new_tokens=7, use_cache=use_cache, **metadata, **decoding))
    expected_rows = 2 * decoding.get("num_return_sequences", 1)
    assert outputs[0].shape == (expected_rows, 12)
    assert torch.equal(outputs[0], outputs[1])


def test_guided_beams_with_heads_return_padding_tags_after_a_beam_ends():
    """A beam that ends early is padded after its EOS: no step fed that tail, so its tags are padding (computing
    them would ask the heads for states that were never computed)."""
    model = tiny_lime("llama", metadata_shift=1, tag_head_fields=["pos", "ner"])
    enc = prompt(model)
    beams = {"num_beams": 3, "do_sample": False, "guidance": {"pos": [["VBZ"], ["DT"]]}, "max_new_tokens": 8}
    eos = int(model.generate(**enc, **beams)[0, 6])  # the best beam's second token ends it
    out = model.generate(
        **enc, **beams, num_return_sequences=2, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True
    )
    generated = out.sequences[:, 5:]
    is_eos = generated == eos
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    assert after_eos.any()  # a beam ended early
    for name in ("pos", "ner"):
        tags = out.metadata_ids[f"{name}_ids"][:, 5:]
        assert (tags[after_eos] == PAD_ID).all() and (tags[~after_eos] > UNKNOWN_ID).all()
    assert out.metadata_ids["pos_ids"][:, 5].tolist() == [VBZ, VBZ, DT, DT]  # each prompt's guidance


def test_left_padded_batch_matches_rows_generated_alone():
    model = tiny_lime("llama", metadata_shift=1)
    long, short = prompt(model, batch=1, length=6, seed=1), prompt(model, batch=1, length=3, seed=2)
    batch = {
        key: torch.cat([long[key], torch.cat([torch.zeros_like(short[key][:, :3]), short[key]], dim=1)])
        for key in long
    }  # left padding: ids 0, attention 0, tags 0 (padding)
    guidance = [["VBZ", "DT", "NN"], ["DT", "NN"]]
    together = model.generate(**batch, max_new_tokens=5, do_sample=False, guidance={"pos": guidance})
    alone_long = model.generate(**long, max_new_tokens=5, do_sample=False, guidance={"pos": guidance[:1]})
    alone_short = model.generate(**short, max_new_tokens=5, do_sample=False, guidance={"pos": guidance[1:]})
    assert torch.equal(together[0], alone_long[0])
    assert torch.equal(together[1, 3:], alone_short[0])


def test_unknown_guidance_label_lists_the_valid_ones():
    model = tiny_lime("llama", metadata_shift=1)
    with pytest.raises(
        ValueError, match=r"Unknown label 'VERB' for metadata field 'pos'\. Valid labels: \['\$'"
    ):
        model.generate(**prompt(model), max_new_tokens=2, guidance={"pos": [["VERB"], ["NN"]]})
    with pytest.raises(
        ValueError, match=r"guidance \(--guide\) for 'dep': the model has no metadata field 'dep'"
    ):
        model.generate(**prompt(model), max_new_tokens=2, guidance={"dep": [["x"], ["y"]]})
    with pytest.raises(ValueError, match=r"has 3 schedules but the batch has 2 rows"):
        model.generate(**prompt(model), max_new_tokens=2, guidance={"pos": [["NN"], ["NN"], ["NN"]]})


def test_guidance_needs_a_lime_plus_one_model():
    model = tiny_lime("llama")
    with pytest.raises(ValueError, match=r"only a LIME\+1 model \(metadata_shift=1\) reads"):
        model.generate(**prompt(model), max_new_tokens=2, guidance={"pos": [["NN"], ["NN"]]})


def test_annotating_provider_cannot_serve_a_lime_plus_one_model():
    model = tiny_lime("llama", metadata_shift=1)
    with pytest.raises(
        ValueError,
        match=r"'annotate' tags tokens that exist, and a LIME\+1 model .* reads the tags of the token it is about to write",
    ):
        model.generate(**prompt(model), max_new_tokens=2, metadata_provider="annotate")


def test_missing_provider_warns_once(caplog, monkeypatch):
    model = tiny_lime("llama")
    hf_logging.warning_once.cache_clear()  # "once" is per process; start this test from a clean slate
    monkeypatch.setattr(hf_logging._get_library_root_logger(), "propagate", True)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            model.generate(**prompt(model), max_new_tokens=2, do_sample=False)
    warnings = [
        record for record in caplog.records if "generated tokens get 'unknown' metadata" in record.message
    ]
    assert len(warnings) == 1


@pytest.mark.slow
def test_guidance_steers_a_trained_lime_plus_one_model():
    """A synthetic language where a token's tag decides its class: tag 3 + c <-> tokens 10c .. 10c+9."""
    torch.manual_seed(0)
    classes, per_class = 5, 10
    model = tiny_lime(
        "llama", metadata_shift=1, metadata_fields={"pos": ["<pad>", "<unk>", "<special>", *"ABCDE"]}
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(150):
        tag_class = torch.randint(0, classes, (16, 16))
        ids = tag_class * per_class + torch.randint(0, per_class, tag_class.shape)
        loss = model(input_ids=ids, pos_ids=tag_class + 3, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()

    schedule = torch.randint(0, classes, (4, 30), generator=torch.Generator().manual_seed(1))
    start = torch.tensor([[0], [10], [20], [30]])
    out = model.generate(
        input_ids=start,
        pos_ids=start // per_class + 3,
        max_new_tokens=30,
        do_sample=True,
        guidance={"pos": [["ABCDE"[c] for c in row] for row in schedule.tolist()]},
    )
    followed = (out[:, 1:] // per_class == schedule).float().mean().item()
    assert followed > 0.9, (
        f"generated tokens follow the guidance only {followed:.0%} of the time (chance: 20%)"
    )
