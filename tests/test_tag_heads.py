"""Tag heads: causal, trained with the LM loss through the Trainer, saved, loaded, remote code, grown on checkpoints."""

import pytest
import torch
from datasets import Dataset
from tiny_models import VOCAB_SIZE, random_tags, run_without_lime_hf, tiny_lime
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

from lime_hf import LimeConfig, LimeForCausalLM
from lime_hf.model_card import render_model_card
from lime_hf.tag_heads import self_tagged_forward
from lime_hf.trainer import LimeTrainer

HEADS = {"tag_head_fields": ["pos", "ner"]}


def ids_and_tags(model, shape=(2, 9), seed=0):
    ids = torch.randint(3, VOCAB_SIZE, shape, generator=torch.Generator().manual_seed(seed))
    return ids, random_tags(model, shape, seed)


def with_weights_of(model_with_heads, model_without):
    """Copy the shared (backbone + metadata) weights; the heads keep their own."""
    missing = model_with_heads.load_state_dict(model_without.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("tag_heads.") for key in missing)
    return model_with_heads


def test_without_heads_nothing_changes_and_heads_never_change_the_logits():
    plain = tiny_lime("llama")
    assert plain.tag_heads is None and plain.config.tag_head_fields == []
    assert not any("tag_heads" in name for name in plain.state_dict())
    headed = with_weights_of(tiny_lime("llama", seed=1, **HEADS), plain)
    ids, tags = ids_and_tags(plain)
    assert torch.equal(headed(input_ids=ids, **tags).logits, plain(input_ids=ids, **tags).logits)
    extra = sum(p.numel() for p in headed.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == sum(p.numel() for p in headed.tag_heads.parameters())


@pytest.mark.parametrize("shift", [0, 1])
def test_head_at_position_i_never_sees_its_target(shift):
    """Tags from the fed tag of position i on, and tokens after i, leave the head's prediction at i unchanged."""
    model = tiny_lime("llama", metadata_shift=shift, **HEADS)
    ids, tags = ids_and_tags(model)
    reference = model(input_ids=ids, **tags).tag_logits
    for i in range(ids.shape[1]):
        changed_tags = {key: value.clone() for key, value in tags.items()}
        for value in changed_tags.values():  # position i is fed the tag of token i + shift
            value[:, i + shift :] = torch.randint(3, 20, value[:, i + shift :].shape)
        changed_ids = ids.clone()
        changed_ids[:, i + 1 :] = torch.randint(3, VOCAB_SIZE, changed_ids[:, i + 1 :].shape)
        changed = model(input_ids=changed_ids, **changed_tags).tag_logits
        for name in reference:
            torch.testing.assert_close(changed[name][:, : i + 1], reference[name][:, : i + 1])
            if i + 1 < ids.shape[1]:  # and the test can fail: later positions do move
                assert not torch.allclose(changed[name][:, i + 1 :], reference[name][:, i + 1 :])


@pytest.mark.parametrize("shift", [0, 1])
def test_loss_is_lm_loss_plus_weighted_tag_losses(shift):
    plain = tiny_lime("gpt2", metadata_shift=shift)
    model = with_weights_of(tiny_lime("gpt2", metadata_shift=shift, tag_loss_weight=0.5, **HEADS), plain)
    ids, tags = ids_and_tags(model)
    tags["pos_ids"][0, 2] = 1  # unknown tags are no targets
    out = model(input_ids=ids, labels=ids, **tags)
    assert torch.equal(out.lm_loss, plain(input_ids=ids, labels=ids, **tags).loss)
    for name, logits in out.tag_logits.items():
        targets = tags[f"{name}_ids"]
        if shift:
            targets = torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], -100)], dim=1)
        targets = targets.masked_fill(targets == 1, -100)
        expected = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100
        )
        torch.testing.assert_close(out.tag_losses[name], expected)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * sum(out.tag_losses.values()))


def test_left_padding_gives_the_first_real_token_the_start_state():
    model = tiny_lime("llama", **HEADS)
    ids, tags = ids_and_tags(model, (1, 6))
    alone = model(input_ids=ids, **tags).tag_logits["pos"]
    padded = {key: torch.cat([torch.zeros_like(value[:, :3]), value], dim=1) for key, value in tags.items()}
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    out = model(input_ids=torch.cat([torch.zeros_like(ids[:, :3]), ids], 1), attention_mask=mask, **padded)
    torch.testing.assert_close(out.tag_logits["pos"][:, 3:], alone, atol=1e-5, rtol=1e-4)


def tiny_dataset(model, rows=32, length=16):
    """A synthetic language whose tags are a function of the token: heads can learn them."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB_SIZE, (rows, length), generator=generator)
    pos = 3 + ids % 7
    ner = 3 + (ids % 3 == 0).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "pos_ids": pos.tolist(), "ner_ids": ner.tolist()})


def collate(features):
    batch = {key: torch.tensor([feature[key] for feature in features]) for key in features[0]}
    batch["labels"] = batch["input_ids"].clone()
    return batch


def test_trainer_logs_lm_loss_and_each_tag_loss(tmp_path):
    model = tiny_lime("llama", tag_loss_weight=0.5, **HEADS).train()
    data = tiny_dataset(model)
    args = TrainingArguments(
        tmp_path, max_steps=30, per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=1e-2,
        logging_steps=5, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = LimeTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collate
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6
    for entry in logs:
        assert entry["loss"] == pytest.approx(
            entry["lm_loss"] + 0.5 * (entry["pos_tag_loss"] + entry["ner_tag_loss"]), rel=1e-3
        )
    assert logs[-1]["pos_tag_loss"] < 0.5 * logs[0]["pos_tag_loss"]  # the heads learn
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(
        metrics["eval_lm_loss"] + 0.5 * (metrics["eval_pos_tag_loss"] + metrics["eval_ner_tag_loss"]),
        rel=1e-3,
    )


def test_heads_save_load_and_run_as_remote_code(tmp_path):
    model = tiny_lime("qwen2", metadata_shift=1, self_guidance="sample", **HEADS)
    ids, tags = ids_and_tags(model)
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "tag_heads.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert reloaded.config.tag_head_fields == ["pos", "ner"] and reloaded.config.self_guidance == "sample"
    expected = model(input_ids=ids, **tags).tag_logits
    for name, logits in reloaded(input_ids=ids, **tags).tag_logits.items():
        assert torch.equal(logits, expected[name])
    torch.save({"input_ids": ids, **tags, "pos": expected["pos"]}, tmp_path / "case.pt")
    out = run_without_lime_hf(
        """
        import torch
        from transformers import AutoModelForCausalLM
        case = torch.load("case.pt")
        expected = case.pop("pos")
        model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("lime_hf"), type(model).__module__
        assert torch.equal(model(**case).tag_logits["pos"], expected)
        print("OK", sorted(model.tag_heads.classifiers))
        """,
        cwd=tmp_path,
    )
    assert out.strip() == "OK ['ner', 'pos']"


def test_checkpoints_grow_heads_and_keep_their_logits(tmp_path):
    plain = tiny_lime("llama")
    plain.save_pretrained(tmp_path / "lime")
    grown = LimeForCausalLM.from_pretrained(tmp_path / "lime", tag_head_fields=["pos"]).eval()
    ids, tags = ids_and_tags(plain)
    assert torch.equal(grown(input_ids=ids, **tags).logits, plain(input_ids=ids, **tags).logits)
    assert grown.tag_heads.classifiers["pos"].weight.abs().sum() > 0

    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    ).eval()  # fmt: skip
    retrofit = LimeForCausalLM.from_backbone(backbone, metadata_shift=1, **HEADS).eval()
    assert torch.equal(retrofit(input_ids=ids, **tags).logits, backbone(input_ids=ids).logits)
    heads = dict(retrofit.tag_heads.named_parameters())
    assert all(torch.isfinite(value).all() for value in heads.values())
    assert heads["proj.weight"].std() > 0 and not heads["start_state"].any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tag_head_fields": ["dep"]}, r"`tag_head_fields` names unknown fields \['dep'\]; the fields are \['pos', 'ner'\]"),
        ({"tag_head_fields": ["pos"], "tag_loss_weight": -1}, r"`tag_loss_weight` must be a number >= 0, got -1"),
        ({"tag_head_fields": ["pos"], "self_guidance": "beam"}, r"`self_guidance` must be 'argmax' or 'sample', got 'beam'"),
        ({"tag_head_fields": ["pos"], "tag_head_type": "deep"}, r"`tag_head_type` must be 'mlp' .* or 'linear' .*, got 'deep'"),
    ],
)  # fmt: skip
def test_bad_tag_head_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LimeConfig(text_config={"model_type": "llama", "vocab_size": VOCAB_SIZE}, **kwargs)


def test_linear_heads_at_layer_zero_read_both_inputs_with_one_classifier_per_field():
    mlp, linear = tiny_lime("llama", **HEADS), tiny_lime("llama", tag_head_type="linear", **HEADS)
    hidden_size = linear.config.hidden_size
    assert mlp.config.tag_head_type == "mlp" and mlp.tag_heads.proj.in_features == 2 * hidden_size
    assert linear.tag_heads.proj is None and linear.tag_heads.act is None
    assert linear.tag_heads.classifiers["pos"].in_features == 2 * hidden_size  # [h_{i-1}; E_tok(t_i)]
    ids, tags = ids_and_tags(linear)
    out = linear(input_ids=ids, **tags)
    heads = linear.tag_heads
    features = torch.cat(
        [
            heads.hidden_norm(heads.previous_states(out.last_hidden_state)),
            heads.token_norm(linear.get_input_embeddings()(ids)),
        ],
        dim=-1,
    )
    for name, labels in linear.config.metadata_fields.items():
        assert out.tag_logits[name].shape == (*ids.shape, len(labels))
        torch.testing.assert_close(out.tag_logits[name], heads.classifiers[name](features), atol=0, rtol=0)
    logits, fed = self_tagged_forward(linear, ids)
    assert logits.shape == (*ids.shape, VOCAB_SIZE) and fed["pos"].shape == ids.shape


def test_model_card_describes_the_heads():
    card = render_model_card(tiny_lime("llama", metadata_shift=1, tag_head_fields=["pos"]))
    assert "| Tag heads | `pos`:" in card and "self-guidance `argmax`" in card
    assert "- tag-heads" in card and "### Tag heads" in card
    assert "the model guides itself (`argmax`)" in card
    assert "Guidance is an oracle" not in card
    assert "Tag heads" not in render_model_card(tiny_lime("llama"))
    assert '`tag_head_type="mlp"`' in card
    linear = render_model_card(tiny_lime("llama", tag_head_fields=["pos"], tag_head_type="linear"))
    assert 'a linear classifier per field, `tag_head_type="linear"`' in linear


def as_model_inputs(model, fed):
    """The `<field>_ids` (and LIME+1's lookahead) under which a full forward feeds position i `fed[:, i]`."""
    if not model.config.metadata_shift:
        return {f"{name}_ids": tags for name, tags in fed.items()}
    return {
        **{
            f"{name}_ids": torch.cat([torch.ones_like(tags[:, :1]), tags[:, :-1]], 1)
            for name, tags in fed.items()
        },
        "next_metadata_ids": {name: tags[:, -1] for name, tags in fed.items()},
    }


@pytest.mark.parametrize("shift", [0, 1])
def test_self_tagged_forward_feeds_only_its_own_predictions(shift):
    model = tiny_lime("llama", metadata_shift=shift, **HEADS)
    ids, tags = ids_and_tags(model, (2, 6))
    prompt = {name: tags[f"{name}_ids"] for name in ("pos", "ner")}
    logits, fed = self_tagged_forward(model, ids, prompt_metadata=prompt, prompt_length=2)
    # By hand, without a cache: h_{i-1} from a full forward over the tags fed so far, then the head.
    heads, given = model.tag_heads, 2 - shift
    expected = {name: torch.ones_like(ids) for name in prompt}
    for name in prompt:
        expected[name][:, :given] = heads.fed_tags(prompt[name][:, :2])[:, :given]
    for i in range(given, ids.shape[1]):
        previous = heads.start_state.expand(2, -1)
        if i:
            fed_so_far = {name: tags[:, :i] for name, tags in expected.items()}
            previous = model(input_ids=ids[:, :i], **as_model_inputs(model, fed_so_far)).last_hidden_state[
                :, -1
            ]
        predicted = heads.predict(heads(previous[:, None], model.get_input_embeddings()(ids[:, i : i + 1])))
        for name in expected:
            expected[name][:, i] = predicted[name][:, 0]
    for name in expected:
        assert torch.equal(fed[name], expected[name])
    torch.testing.assert_close(logits, model(input_ids=ids, **as_model_inputs(model, fed)).logits)
    # Tags after the prompt are never read.
    scrambled = {
        name: torch.cat([tags[:, :2], torch.randint(3, 20, tags[:, 2:].shape)], 1)
        for name, tags in prompt.items()
    }
    assert torch.equal(
        self_tagged_forward(model, ids, prompt_metadata=scrambled, prompt_length=2)[1]["pos"], fed["pos"]
    )
