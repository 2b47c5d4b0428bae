"""`predicted_tag_embedding="expected"`: the heads' tags read as their probability-weighted embeddings (its bad values:
`test_metadata_layer.py`)."""

import pytest
import torch
from tiny_models import cache_of, run_without_lime_hf, tiny_lime
from transformers import AutoModelForCausalLM, TrainingArguments

from lime_hf.cli.train import parse_train_arguments
from lime_hf.compat import CACHE_NAME
from lime_hf.configuration_lime import DEFAULT_METADATA_FIELDS, PAD_ID, UNKNOWN_ID, make_inventory
from lime_hf.model_card import render_model_card
from lime_hf.options import check_train_options
from lime_hf.trainer import LimeTrainer
from tests.test_metadata_layer import HONEST, added_at_layer_k, cached_and_uncached_agree, ids_and_tags
from tests.test_tag_heads import collate, tiny_dataset

EXPECTED = HONEST | {"predicted_tag_embedding": "expected"}


def expected_embedding(model, name: str, logits: torch.Tensor) -> torch.Tensor:
    """By hand: `w_f * sum_c softmax(logits)_c E_f(c)` over the labels (padding and unknown excluded)."""
    probabilities = logits[..., UNKNOWN_ID + 1 :].softmax(-1)
    table = model.metadata_embeddings.tables[name].weight[UNKNOWN_ID + 1 :]
    return model.config.metadata_weights[name] * probabilities @ table


@pytest.mark.parametrize("shift", [0, 1])
def test_bare_input_ids_read_the_probability_weighted_embeddings(shift):
    model = tiny_lime("llama", metadata_shift=shift, metadata_weights={"ner": 0.5}, **EXPECTED)
    ids, _ = ids_and_tags(model)
    added, out = added_at_layer_k(model, input_ids=ids)
    by_hand = sum(expected_embedding(model, name, logits) for name, logits in out.tag_logits.items())
    torch.testing.assert_close(added, by_hand, atol=1e-6, rtol=1e-5)
    predicted = model.tag_heads.predict(out.tag_logits)  # the reported tags stay the heads' argmax
    assert all(torch.equal(out.fed_metadata_ids[name], predicted[name]) for name in predicted)
    model.config.predicted_tag_embedding = "argmax"
    argmax_added, argmax_out = added_at_layer_k(model, input_ids=ids)
    torch.testing.assert_close(argmax_added, model.metadata_embeddings.lookup(predicted), atol=1e-6, rtol=0)
    assert not torch.allclose(argmax_out.logits, out.logits)
    torch.testing.assert_close(argmax_out.tag_logits["pos"], out.tag_logits["pos"], atol=0, rtol=0)


@pytest.mark.parametrize("training", [False, True])
def test_given_tags_are_read_as_given_and_a_field_without_a_head_is_looked_up(training):
    """Also in training, where metadata dropout hides tags: the heads' blend fills the hidden ones."""
    model = tiny_lime("llama", **(EXPECTED | {"tag_head_fields": ["pos"]})).train(training)
    ids, tags = ids_and_tags(model)
    pos = tags["pos_ids"].clone()
    pos[:, ::2] = UNKNOWN_ID  # the heads fill every other position
    added, out = added_at_layer_k(model, input_ids=ids, pos_ids=pos, ner_ids=tags["ner_ids"], labels=ids)
    from_heads = (pos == UNKNOWN_ID)[..., None]
    given_pos = model.metadata_embeddings.lookup({"pos": pos})
    by_hand = torch.where(from_heads, expected_embedding(model, "pos", out.tag_logits["pos"]), given_pos)
    by_hand = by_hand + model.metadata_embeddings.lookup({"ner": tags["ner_ids"]})
    torch.testing.assert_close(added, by_hand, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.fed_metadata_ids["ner"], tags["ner_ids"])
    if training:
        out.loss.backward()
        assert all(parameter.grad is not None for parameter in model.parameters())
        return
    # Every tag given: exactly what the argmax model reads (nothing comes from the heads).
    full, _ = added_at_layer_k(model, input_ids=ids, **tags)
    model.config.predicted_tag_embedding = "argmax"
    torch.testing.assert_close(full, added_at_layer_k(model, input_ids=ids, **tags)[0], atol=1e-6, rtol=0)


def test_lime_plus_1_guidance_weights_and_fields_of_three_sizes_are_read_by_hand():
    """LIME+1, partly given: position i reads token i+1's given tag (the guidance at the last position) where it is
    known, else the heads' blend; a headed field given nowhere reads the blend everywhere, a field without a head its
    own tags. Three inventories of different sizes share the padded table; every weight differs from 1."""
    fields = DEFAULT_METADATA_FIELDS | {"mood": make_inventory(["indicative", "imperative", "question"])}
    weights = {"pos": 0.5, "ner": 2.0, "mood": 1.5}
    model = tiny_lime(
        "llama", metadata_shift=1, metadata_fields=fields, metadata_weights=weights,
        **(EXPECTED | {"tag_head_fields": ["pos", "mood"]}),
    )  # fmt: skip
    ids, tags = ids_and_tags(model)
    pos = tags["pos_ids"].clone()
    pos[:, 1::3] = UNKNOWN_ID
    guidance = {"pos": torch.tensor([5, UNKNOWN_ID])}  # row 0 guided, row 1 left to the heads
    added, out = added_at_layer_k(
        model, input_ids=ids, pos_ids=pos, ner_ids=tags["ner_ids"], next_metadata_ids=guidance
    )
    fed_pos = torch.cat([pos[:, 1:], guidance["pos"][:, None]], 1)
    fed_ner = torch.cat([tags["ner_ids"][:, 1:], torch.full_like(pos[:, :1], UNKNOWN_ID)], 1)
    blend_pos = expected_embedding(model, "pos", out.tag_logits["pos"])
    by_hand = torch.where(
        (fed_pos == UNKNOWN_ID)[..., None], blend_pos, model.metadata_embeddings.lookup({"pos": fed_pos})
    )
    by_hand = by_hand + expected_embedding(model, "mood", out.tag_logits["mood"])
    by_hand = by_hand + model.metadata_embeddings.lookup({"ner": fed_ner})
    torch.testing.assert_close(added, by_hand, atol=1e-6, rtol=1e-5)
    assert out.fed_metadata_ids["pos"][0, -1] == 5 and out.fed_metadata_ids["pos"][1, -1] > UNKNOWN_ID


@pytest.mark.parametrize("shift", [0, 1])
def test_cached_steps_and_generation_equal_uncached_with_left_padding(shift):
    model = tiny_lime("qwen2", metadata_shift=shift, **EXPECTED)
    _, cached = cached_and_uncached_agree(model)
    ids = cached.sequences[:1, :7]
    sequence = ids  # greedy by hand: each step one bare forward over the whole text
    for _ in range(6):
        sequence = torch.cat([sequence, model(input_ids=sequence).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached.sequences[:1], sequence)


@pytest.mark.parametrize("embedding", ["argmax", "expected"])
def test_generation_continues_from_its_sequences_and_cache_as_one_longer_call(embedding):
    model = tiny_lime("llama", **(HONEST | {"predicted_tag_embedding": embedding}))
    ids, _ = ids_and_tags(model, (2, 5))
    settings = dict(do_sample=False, return_dict_in_generate=True, use_cache=True)
    whole = model.generate(ids, max_new_tokens=8, **settings)
    first = model.generate(ids, max_new_tokens=4, **settings)
    rest = model.generate(first.sequences, max_new_tokens=4, **{CACHE_NAME: cache_of(first)}, **settings)
    assert torch.equal(rest.sequences, whole.sequences)
    for name in ("pos_ids", "ner_ids"):
        assert torch.equal(rest.metadata_ids[name], whole.metadata_ids[name])
    if embedding == "argmax":  # its reported tags are all it read: passed back, they change nothing
        tagged = model.generate(first.sequences, max_new_tokens=4, **first.metadata_ids, **settings)
        assert torch.equal(tagged.sequences, whole.sequences)


def test_training_on_own_predictions_trains_the_heads_through_the_tag_loss_alone():
    config = EXPECTED | {"metadata_training_source": "predicted", "tag_loss_weight": 0.0}
    model = tiny_lime("llama", **config).train()
    ids, tags = ids_and_tags(model)
    added, out = added_at_layer_k(model, input_ids=ids, labels=ids, **tags)
    by_hand = sum(expected_embedding(model, name, logits) for name, logits in out.tag_logits.items())
    torch.testing.assert_close(added, by_hand, atol=1e-6, rtol=1e-5)  # the heads' doubt, not the given tags
    out.loss.backward()
    assert all(parameter.grad is not None for parameter in model.parameters())  # DDP: every parameter used
    heads = [parameter.grad for parameter in model.tag_heads.parameters()]
    assert all(torch.count_nonzero(grad) == 0 for grad in heads)  # the LM loss does not reach the heads
    assert torch.count_nonzero(model.metadata_embeddings.tables["pos"].weight.grad[UNKNOWN_ID + 1 :]) > 0
    assert torch.count_nonzero(model.metadata_embeddings.tables["pos"].weight.grad[[PAD_ID, UNKNOWN_ID]]) == 0


def test_trainer_trains_it_and_save_load_card_and_remote_code_keep_it(tmp_path):
    model = tiny_lime("llama", metadata_training_source="predicted", **EXPECTED).train()
    args = TrainingArguments(
        tmp_path / "run", max_steps=20, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=5,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = LimeTrainer(model=model, args=args, train_dataset=tiny_dataset(model), data_collator=collate)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["loss"] < logs[0]["loss"]
    model.eval().save_pretrained(tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert reloaded.config.predicted_tag_embedding == "expected"
    ids, _ = ids_and_tags(model)
    logits = model(input_ids=ids).logits
    assert torch.equal(reloaded(input_ids=ids).logits, logits)
    card = render_model_card(reloaded)
    assert 'averaged under the head\'s probabilities (`predicted_tag_embedding="expected"`)' in card
    torch.save({"input_ids": ids, "logits": logits}, tmp_path / "case.pt")
    printed = run_without_lime_hf(
        """
        import torch
        from transformers import AutoModelForCausalLM
        case = torch.load("case.pt")
        model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).eval()
        assert torch.equal(model(input_ids=case["input_ids"]).logits, case["logits"])
        print("OK", model.config.predicted_tag_embedding)
        """,
        cwd=tmp_path,
    )
    assert printed.strip() == "OK expected"


def test_no_model_is_built_on_a_config_changed_to_break_the_rule(tmp_path):
    """The rule holds where the config changes after it was made: a `from_pretrained` keyword, or an edited config."""
    model = tiny_lime("llama", tag_head_fields=["pos"])  # heads at layer 0
    model.save_pretrained(tmp_path)
    rule = (
        "'expected' averages the embeddings under the tag heads' probabilities, computed in the same forward"
    )
    with pytest.raises(ValueError, match=rule):
        AutoModelForCausalLM.from_pretrained(tmp_path, predicted_tag_embedding="expected")
    model.config.predicted_tag_embedding = "expected"
    with pytest.raises(ValueError, match=rule):
        AutoModelForCausalLM.from_config(model.config)
    model.config.metadata_layer = 1  # the pair holds again
    assert AutoModelForCausalLM.from_config(model.config).metadata_injection.layer == 1


def test_lime_hf_train_takes_it_and_refuses_it_without_a_metadata_layer(tmp_path):
    text = tmp_path / "emma.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich.\n", encoding="utf-8")
    argv = [str(text), "--train-tokenizer", "400", "--tag-heads", "pos"]
    options, _ = parse_train_arguments(
        [*argv, "--metadata-layer", "1", "--predicted-tag-embedding", "expected"]
    )
    assert options.predicted_tag_embedding == "expected"
    check_train_options(options)
    options, _ = parse_train_arguments([*argv, "--predicted-tag-embedding", "expected"])
    with pytest.raises(ValueError, match=r"'expected'.*needs tag heads \(--tag-heads\) and a metadata layer"):
        check_train_options(options)
    with pytest.raises(SystemExit):
        parse_train_arguments([*argv, "--predicted-tag-embedding", "mean"])
