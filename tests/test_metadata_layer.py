"""Metadata at decoder layer k (`metadata_layer`): the honest one-pass LIME, against hand-written references."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import (
    VOCAB_SIZE,
    cache_of,
    enable_checkpointing,
    random_tags,
    run_without_lime_hf,
    tiny_lime,
)
from transformers import AutoModelForCausalLM, TrainingArguments

from lime_hf import LimeConfig, LimeForCausalLM
from lime_hf.cli.train import parse_train_arguments
from lime_hf.configuration_lime import UNKNOWN_ID
from lime_hf.tag_heads import self_tagged_forward
from lime_hf.trainer import LimeTrainer
from tests.test_tag_heads import collate, tiny_dataset

HONEST = {"tag_head_fields": ["pos", "ner"], "metadata_layer": 1}


def ids_and_tags(model, shape=(2, 9), seed=0):
    ids = torch.randint(3, VOCAB_SIZE, shape, generator=torch.Generator().manual_seed(seed))
    return ids, random_tags(model, shape, seed)


def token_tags(model, fed: dict[str, torch.Tensor]) -> dict:
    """The forward's arguments that feed exactly `fed` (field -> `(batch, seq)` tags each position reads)."""
    if not model.config.metadata_shift:
        return {f"{name}_ids": ids for name, ids in fed.items()}
    unknown = {name: torch.full_like(ids[:, :1], UNKNOWN_ID) for name, ids in fed.items()}
    return {
        **{f"{name}_ids": torch.cat([unknown[name], ids[:, :-1]], 1) for name, ids in fed.items()},
        "next_metadata_ids": {name: ids[:, -1] for name, ids in fed.items()},
    }


def llama_by_hand(model, ids: torch.Tensor, fed: dict[str, torch.Tensor]):
    """Logits and layer-k head logits of a Llama LIME model, its decoder layers run one by one, the weighted
    metadata embeddings of `fed` added to the input of layer `metadata_layer`."""
    base, k = model.language_model.model, model.config.metadata_layer
    length = ids.shape[1]
    hidden = base.embed_tokens(ids)
    positions = torch.arange(length)[None]
    rotary = base.rotary_emb(hidden, positions)
    causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    head_logits = None
    for index, layer in enumerate(base.layers):
        if index == k:
            head_logits = model.tag_heads(hidden)
            for name, table in model.metadata_embeddings.tables.items():
                weight = model.config.metadata_weights[name]
                hidden = hidden + weight * table(fed[name].masked_fill(fed[name] == UNKNOWN_ID, 0))
        hidden = layer(hidden, attention_mask=causal, position_ids=positions, position_embeddings=rotary)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return model.language_model.lm_head(base.norm(hidden)), head_logits


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metadata_layer": 2}, r"backbone has 2 decoder layers.*\[0, 2\)"),
        ({"metadata_layer": -1}, "must be an integer >= 0"),
        ({"metadata_training_source": "gold"}, "'given'.*'predicted'"),
        ({"metadata_training_source": "predicted", "metadata_layer": 1}, "needs tag heads"),
        ({"metadata_training_source": "predicted", "tag_head_fields": ["pos"]}, r"metadata layer.*> 0"),
        ({"predicted_tag_embedding": "soft"}, r"'argmax'.*'expected'.*got 'soft'"),
        ({"predicted_tag_embedding": "expected", "metadata_layer": 1}, "'expected'.*needs tag heads"),
        ({"predicted_tag_embedding": "expected", "tag_head_fields": ["pos"]}, r"metadata layer.*> 0"),
    ],
)
def test_bad_metadata_layer_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_lime("llama", **kwargs)
    config = tiny_lime("llama", **HONEST).config
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        config.metadata_layer = -1
    with pytest.raises(ValueError, match="'argmax'.*'expected'"):
        config.predicted_tag_embedding = "mean"
    # a refused value leaves the config as it was
    assert (config.metadata_layer, config.predicted_tag_embedding) == (1, "argmax")


@pytest.mark.parametrize("shift", [0, 1])
def test_given_tags_join_at_layer_k_exactly_as_by_hand(shift):
    model = tiny_lime("llama", metadata_shift=shift, metadata_weights={"ner": 0.5}, **HONEST)
    ids, tags = ids_and_tags(model)
    nxt = {"pos": torch.tensor([5, 6]), "ner": torch.tensor([3, 4])} if shift else None
    out = model(input_ids=ids, **tags, next_metadata_ids=nxt)
    fed = {name: tags[f"{name}_ids"] for name in ("pos", "ner")}
    if shift:
        fed = {name: torch.cat([ids_[:, 1:], nxt[name][:, None]], 1) for name, ids_ in fed.items()}
    logits, head_logits = llama_by_hand(model, ids, fed)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-4)
    for name in ("pos", "ner"):
        assert torch.equal(out.fed_metadata_ids[name], fed[name])
        torch.testing.assert_close(out.tag_logits[name], head_logits[name], atol=1e-5, rtol=1e-4)
    # The first k layers read no tags: the heads' logits do not depend on them.
    torch.testing.assert_close(model(input_ids=ids).tag_logits["pos"], out.tag_logits["pos"], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("shift", [0, 1])
def test_bare_input_ids_is_one_pass_fed_the_heads_argmax(arch, shift):
    model = tiny_lime(arch, metadata_shift=shift, **HONEST)
    ids, _ = ids_and_tags(model)
    calls = []
    handle = model.language_model.register_forward_pre_hook(lambda *args: calls.append(1))
    bare = model(input_ids=ids)
    handle.remove()
    assert len(calls) == 1  # no sequential self-tagging
    predicted = model.tag_heads.predict(bare.tag_logits)
    assert all(torch.equal(bare.fed_metadata_ids[name], predicted[name]) for name in predicted)
    explicit = model(input_ids=ids, **token_tags(model, predicted))
    torch.testing.assert_close(bare.logits, explicit.logits, atol=0, rtol=0)
    assert torch.equal(model(input_ids=ids, self_tag=True).logits, bare.logits)
    logits, fed = self_tagged_forward(model, ids)
    assert torch.equal(logits, bare.logits) and torch.equal(fed["pos"], predicted["pos"])
    # self_tag=False: missing tags unknown, the backbone alone.
    unknown = model(input_ids=ids, self_tag=False).logits
    torch.testing.assert_close(unknown, model.language_model(input_ids=ids).logits, atol=0, rtol=0)


def cached_and_uncached_agree(model) -> tuple[torch.Tensor, object]:
    """Assert that a cached step equals the full forward, and cached generation the uncached one, with left padding;
    returns the padding mask and the cached generation's output (6 new tokens after 7)."""
    ids, _ = ids_and_tags(model, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    full = model(input_ids=ids, attention_mask=mask)
    prefix = model(input_ids=ids[:, :-2], attention_mask=mask[:, :-2], use_cache=True)
    step = model(input_ids=ids[:, -2:], attention_mask=mask, cache=cache_of(prefix), use_cache=True)
    torch.testing.assert_close(step.logits, full.logits[:, -2:], atol=1e-5, rtol=1e-4)
    assert torch.equal(step.fed_metadata_ids["pos"], full.fed_metadata_ids["pos"][:, -2:])
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cached = model.generate(ids, **settings)
    uncached = model.generate(ids, use_cache=False, **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    for name in ("pos_ids", "ner_ids"):
        assert torch.equal(cached.metadata_ids[name], uncached.metadata_ids[name])
    return mask, cached


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("shift", [0, 1])
def test_cached_steps_and_generation_equal_uncached_with_left_padding(arch, shift):
    model = tiny_lime(arch, metadata_shift=shift, **HONEST)
    mask, cached = cached_and_uncached_agree(model)
    # The reported tags are the ones the heads fed: fed back explicitly, the model computes the same logits.
    sequences, extended = cached.sequences, torch.cat([mask, torch.ones_like(mask[:, :6])], 1)
    positions = (extended.cumsum(-1) - 1).clamp(min=0)
    bare = model(input_ids=sequences, attention_mask=extended, position_ids=positions)
    given = dict(cached.metadata_ids)
    if shift:  # the tag of the token after the output: the heads' own
        given["next_metadata_ids"] = {name: ids_[:, -1] for name, ids_ in bare.fed_metadata_ids.items()}
    explicit = model(input_ids=sequences, attention_mask=extended, position_ids=positions, **given)
    torch.testing.assert_close(explicit.logits, bare.logits, atol=0, rtol=0)


def test_generation_without_tags_needs_no_tracker_and_equals_the_step_by_step_argmax():
    model = tiny_lime("llama", **HONEST)
    ids, _ = ids_and_tags(model, (1, 5))
    seen = []
    original = model.prepare_inputs_for_generation

    def spy(input_ids, lime_tracker=None, lime_rows=None, lime_record=None, **kwargs):
        seen.append(lime_tracker)
        return original(
            input_ids, lime_tracker=lime_tracker, lime_rows=lime_rows, lime_record=lime_record, **kwargs
        )

    model.prepare_inputs_for_generation = spy
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert seen and all(tracker is None for tracker in seen)
    sequence = ids
    for _ in range(4):  # greedy by hand, every step one bare forward over the whole text
        sequence = torch.cat([sequence, model(input_ids=sequence).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, sequence)


def test_guided_lime_plus_one_feeds_the_guidance_then_guides_itself():
    model = tiny_lime("llama", metadata_shift=1, **HONEST)
    ids, _ = ids_and_tags(model, (1, 5))
    labels = model.config.metadata_fields["pos"]
    out = model.generate(
        ids, max_new_tokens=4, do_sample=False, guidance={"pos": ["VBZ", "DT"]}, return_dict_in_generate=True
    )
    fed = out.metadata_ids["pos_ids"][0, 5:]  # tags of the generated tokens
    assert fed[:2].tolist() == [labels.index("VBZ"), labels.index("DT")]
    bare = model(input_ids=out.sequences)  # after the guidance: the heads' own next-token tags
    assert torch.equal(fed[2:], bare.fed_metadata_ids["pos"][0, 6:8])
    unguided = model.generate(ids, max_new_tokens=4, do_sample=False)
    by_hand = model(input_ids=ids, next_metadata_ids={"pos": torch.tensor([labels.index("VBZ")])})
    assert out.sequences[0, 5] == by_hand.logits[0, -1].argmax()
    assert unguided.shape == out.sequences.shape


def added_at_layer_k(model, **inputs) -> tuple[torch.Tensor, object]:
    """What the injection added to the input of layer k (captured before and after it), and the output."""
    layer = model.language_model.model.layers[model.config.metadata_layer]
    seen = {}
    before = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("before", args[0]), prepend=True)
    after = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("after", args[0]))
    out = model(**inputs)
    before.remove(), after.remove()
    return seen["after"] - seen["before"], out


@pytest.mark.parametrize("source", ["given", "predicted"])
def test_training_reads_the_given_tags_or_the_heads_argmax(source):
    model = tiny_lime("llama", metadata_training_source=source, **HONEST).train()
    ids, tags = ids_and_tags(model)
    added, out = added_at_layer_k(model, input_ids=ids, labels=ids, **tags)
    predicted = model.tag_heads.predict(out.tag_logits)
    expected = predicted if source == "predicted" else {name: tags[f"{name}_ids"] for name in predicted}
    assert not torch.equal(predicted["pos"], tags["pos_ids"])
    assert all(torch.equal(out.fed_metadata_ids[name], expected[name]) for name in expected)
    torch.testing.assert_close(added, model.metadata_embeddings.lookup(expected), atol=1e-6, rtol=0)
    assert set(out.tag_losses) == {"pos", "ner"}  # the given tags train the heads either way
    out.loss.backward()
    unused = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert unused == []  # DDP with find_unused_parameters=False
    # In evaluation mode given tags are read as given.
    _, evaluated = added_at_layer_k(model.eval(), input_ids=ids, **tags)
    assert torch.equal(evaluated.fed_metadata_ids["pos"], tags["pos_ids"])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_lime("llama", metadata_training_source="predicted", **HONEST).train()
    ids, tags = ids_and_tags(model)
    model(input_ids=ids, labels=ids, **tags).loss.backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    enable_checkpointing(model)
    model(input_ids=ids, labels=ids, **tags).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_untagged_training_batch_is_refused_but_scoring_with_labels_is_honest():
    model = tiny_lime("llama", **HONEST)
    ids, _ = ids_and_tags(model)
    scored = model(input_ids=ids, labels=ids)  # evaluation: perplexity of bare text, tags from the heads
    assert torch.equal(scored.logits, model(input_ids=ids).logits) and scored.tag_losses == {}
    with pytest.raises(ValueError, match="no tags"):
        model.train()(input_ids=ids, labels=ids)


def test_trainer_lowers_the_loss_and_logs_the_tag_losses(tmp_path):
    model = tiny_lime("llama", metadata_training_source="predicted", **HONEST).train()
    data = tiny_dataset(model)
    args = TrainingArguments(
        tmp_path, max_steps=30, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=5,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = LimeTrainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"lm_loss", "pos_tag_loss", "ner_tag_loss"} <= set(logs[0])
    assert logs[-1]["loss"] < logs[0]["loss"] and logs[-1]["pos_tag_loss"] < 0.5 * logs[0]["pos_tag_loss"]


def test_from_backbone_keeps_the_logits_and_save_load_remote_code_keep_them(tmp_path):
    backbone = tiny_lime("llama").language_model  # a plain LlamaForCausalLM
    model = LimeForCausalLM.from_backbone(backbone, metadata_shift=1, **HONEST).eval()
    ids, tags = ids_and_tags(model)
    torch.testing.assert_close(
        model(input_ids=ids, **tags).logits, backbone(input_ids=ids).logits, atol=0, rtol=0
    )
    trained = tiny_lime("qwen2", metadata_shift=1, metadata_training_source="predicted", **HONEST)
    trained.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "metadata_injection.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert (reloaded.config.metadata_layer, reloaded.config.metadata_training_source) == (1, "predicted")
    expected = trained(input_ids=ids).logits
    assert torch.equal(reloaded(input_ids=ids).logits, expected)
    torch.save({"input_ids": ids, "logits": expected}, tmp_path / "case.pt")
    out = run_without_lime_hf(
        """
        import torch
        from transformers import AutoModelForCausalLM
        case = torch.load("case.pt")
        model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("lime_hf"), type(model).__module__
        assert torch.equal(model(input_ids=case["input_ids"]).logits, case["logits"])
        print("OK", model.config.metadata_layer)
        """,
        cwd=tmp_path,
    )
    assert out.strip() == "OK 1"


def test_attach_is_idempotent_and_detach_removes_the_metadata():
    model = tiny_lime("llama", **HONEST)
    ids, tags = ids_and_tags(model)
    expected = model(input_ids=ids, **tags).logits
    model.metadata_injection.attach(model.language_model)
    assert torch.equal(model(input_ids=ids, **tags).logits, expected)  # not added twice
    model.metadata_injection.detach()
    with pytest.raises(ValueError, match="was not added at the decoder layer"):
        model(input_ids=ids, **tags)
    model.metadata_injection.attach(model.language_model)
    assert torch.equal(model(input_ids=ids, **tags).logits, expected)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_compiles_with_fullgraph(arch):
    model = tiny_lime(arch, metadata_shift=1, **HONEST)
    ids, tags = ids_and_tags(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for inputs in ({"input_ids": ids}, {"input_ids": ids, **tags}):
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits)


def layer_input(model, ids: torch.Tensor) -> torch.Tensor:
    """The input of decoder layer `metadata_layer` before the metadata joins it (what the heads read)."""
    seen = []
    layer = model.language_model.base_model.layers[model.config.metadata_layer]
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]), prepend=True)
    model(input_ids=ids)
    handle.remove()
    return seen[0]


def test_linear_heads_are_a_norm_and_one_linear_per_field_and_save_load_as_remote_code(tmp_path):
    model = tiny_lime("llama", tag_head_type="linear", metadata_training_source="predicted", **HONEST)
    heads, hidden_size = model.tag_heads, model.config.hidden_size
    assert heads.proj is None and {name.split(".")[0] for name, _ in heads.named_parameters()} == {
        "hidden_norm",
        "classifiers",
    }
    ids, _ = ids_and_tags(model)
    out = model(input_ids=ids)
    features = torch.nn.functional.layer_norm(
        layer_input(model, ids), (hidden_size,), heads.hidden_norm.weight, heads.hidden_norm.bias
    )
    for name, labels in model.config.metadata_fields.items():
        classifier = heads.classifiers[name]
        assert out.tag_logits[name].shape == (*ids.shape, len(labels))
        by_hand = features @ classifier.weight.T + classifier.bias
        torch.testing.assert_close(out.tag_logits[name], by_hand, atol=1e-5, rtol=1e-4)
        assert torch.equal(out.fed_metadata_ids[name], heads.predict(out.tag_logits)[name])
    model.save_pretrained(tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert reloaded.config.tag_head_type == "linear" and reloaded.tag_heads.proj is None
    again = reloaded(input_ids=ids)
    assert torch.equal(again.logits, out.logits) and torch.equal(
        again.tag_logits["pos"], out.tag_logits["pos"]
    )
    torch.save({"input_ids": ids, "logits": out.logits, "pos": out.tag_logits["pos"]}, tmp_path / "case.pt")
    printed = run_without_lime_hf(
        """
        import torch
        from transformers import AutoModelForCausalLM
        case = torch.load("case.pt")
        model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("lime_hf"), type(model).__module__
        out = model(input_ids=case["input_ids"])
        assert torch.equal(out.logits, case["logits"]) and torch.equal(out.tag_logits["pos"], case["pos"])
        print("OK", model.config.tag_head_type, model.tag_heads.proj)
        """,
        cwd=tmp_path,
    )
    assert printed.strip() == "OK linear None"


def test_config_round_trips_and_layer_zero_is_unchanged(tmp_path):
    config = tiny_lime("llama", metadata_training_source="predicted", **HONEST).config
    config.save_pretrained(tmp_path)
    loaded = LimeConfig.from_pretrained(tmp_path)
    assert (loaded.metadata_layer, loaded.metadata_training_source) == (1, "predicted")
    plain = tiny_lime("llama", tag_head_fields=["pos"])
    assert plain.metadata_injection is None and hasattr(plain.tag_heads, "start_state")


DDP_SCRIPT = """
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, sys.argv[1])
from tiny_models import random_tags, tiny_lime

dist.init_process_group("gloo")
rank = dist.get_rank()
model = tiny_lime(
    "llama", tag_head_fields=["pos", "ner"], metadata_layer=1, metadata_training_source="predicted",
    predicted_tag_embedding=sys.argv[3],
)
ddp = DistributedDataParallel(model.train())  # find_unused_parameters=False: every parameter must get a gradient
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(rank))
for step in range(3):
    tags = random_tags(model, ids.shape, seed=step) if (rank + step) % 2 == 0 else {"pos_ids": random_tags(model, ids.shape)["pos_ids"]}
    optimizer.zero_grad()
    ddp(input_ids=ids, labels=ids, **tags).loss.backward()
    optimizer.step()
torch.save(model.state_dict(), f"{sys.argv[2]}/rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")  # one at a time: launchers and Ray take fixed ports
@pytest.mark.parametrize("embedding", ["argmax", "expected"])
def test_ddp_trains_the_predicted_source_without_unused_parameters(tmp_path, embedding):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT, encoding="utf-8")
    torchrun = Path(sys.executable).parent / "torchrun"
    tests = Path(__file__).resolve().parent
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(script), str(tests), str(tmp_path), embedding],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    initial = tiny_lime("llama", **HONEST).state_dict()
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), name  # gradients were averaged: the ranks agree
    moved = [name for name, tensor in ranks[0].items() if not torch.equal(tensor, initial[name])]
    assert any(name.startswith("tag_heads.") for name in moved)
    assert any(name.startswith("metadata_embeddings.") for name in moved)


def test_lime_hf_train_takes_the_head_type():
    argv = ["emma.txt", "--train-tokenizer", "400", "--tag-heads", "pos", "--metadata-layer", "1"]
    assert parse_train_arguments(argv)[0].tag_head_type == "mlp"
    options, rest = parse_train_arguments([*argv, "--tag-head-type", "linear", "--max-steps", "2"])
    assert (options.tag_head_type, rest) == ("linear", ["--max-steps", "2"])
    with pytest.raises(SystemExit):
        parse_train_arguments([*argv, "--tag-head-type", "deep"])
