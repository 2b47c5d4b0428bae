"""Real lm-eval on the local YAML tasks of tests/data/lm_eval: for every request type (loglikelihood, multiple
choice, generate_until, loglikelihood_rolling) and every tag source, the scores of a tiny trained LIME model
equal a hand computation that uses neither `LimeLM` nor `self_tagged_forward` (spaCy called on each prefix window;
self-tagging written out as a loop without a cache); a context's tags never depend on its continuation."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from tiny_models import run_without_lime_hf, tiny_lime

from lime_hf.configuration_lime import UNKNOWN_ID
from lime_hf.integrations.lm_eval import LimeLM
from lime_hf.tag_heads import self_tagged_forward
from tests.test_lm_eval import prefix_tags_by_spacy

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["lime_cloze", "lime_choice", "lime_generate", "lime_rolling"]
HEADS = {"tag_head_fields": ["pos", "ner"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lime_offsets, corpus_lines) -> Path:
    """A tiny LIME model with tag heads, trained for a few steps on Emma, saved with its LimeTokenizer."""
    model = tiny_lime("llama", text_config={"vocab_size": len(lime_offsets)}, **HEADS).train()
    batch = lime_offsets(corpus_lines[:64], padding=True, truncation=True, max_length=48, return_tensors="pt")
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pos_ids", "ner_ids")}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        rows = slice(16 * (step % 4), 16 * (step % 4 + 1))
        loss = model(**{key: value[rows] for key, value in inputs.items()}, labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]  # it learned something
    path = tmp_path_factory.mktemp("lime") / "model"
    model.eval().save_pretrained(path)
    lime_offsets.save_pretrained(path)
    return path


def self_tagged_by_hand(model, ids: list[int]) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Self-tagging written out, without a KV cache: `(seq, vocab)` logits and the tags each position was fed.

    Position i is fed, per field, its head's argmax over the labels (ids from 2 up: padding and unknown are never
    predicted), the head reading the final hidden state of position i-1 (the learned start state at 0) beside
    token i's embedding; the whole prefix is read again for every position. A field without a head is unknown.
    """
    heads, fields, shift = model.tag_heads, list(model.config.metadata_fields), model.config.metadata_shift
    fed = {name: [] for name in fields}

    def read(length: int):
        """The model reading `ids[:length]`, position j fed `fed[name][j]`."""
        row = torch.tensor([ids[:length]])
        if shift:  # LIME+1 takes the tokens' own tags and moves them one left: fed[j] is given as token j+1's
            tags = {f"{name}_ids": torch.tensor([[UNKNOWN_ID, *fed[name][: length - 1]]]) for name in fields}
            after = {name: torch.tensor([fed[name][length - 1]]) for name in fields}
            return model(row, **tags, next_metadata_ids=after)
        return model(row, **{f"{name}_ids": torch.tensor([fed[name][:length]]) for name in fields})

    with torch.no_grad():
        for i in range(len(ids)):
            previous = heads.start_state if i == 0 else read(i).last_hidden_state[0, -1]
            embedding = model.get_input_embeddings()(torch.tensor([ids[i]]))
            logits = heads(previous[None, None], embedding[None])
            for name in fields:
                fed[name].append(int(logits[name][0, 0, 2:].argmax()) + 2 if name in logits else UNKNOWN_ID)
        return read(len(ids)).logits[0], fed


def logprobs_by_hand(lm: LimeLM, ids: list[int]) -> torch.Tensor:
    """`(seq, vocab)` log-probabilities of the model reading `ids` with `lm.tags`'s tags, without HFLM and
    without `LimeLM.causal_tags` or `self_tagged_forward`."""
    model, row = lm.model, torch.tensor([ids])
    with torch.no_grad():
        if lm.tags == "model":
            logits, _ = self_tagged_by_hand(model, ids)
        elif lm.tags == "none":
            unknown = torch.full_like(row, UNKNOWN_ID)
            logits = model(row, **{f"{name}_ids": unknown for name in model.config.metadata_fields}).logits[0]
        else:  # spaCy on each token's window of text, written out in test_lm_eval.py
            tags = prefix_tags_by_spacy(lm.tokenizer, model.config.metadata_fields, ids)
            fed = {f"{name}_ids": torch.tensor([values]) for name, values in tags.items()}
            logits = model(row, **fed).logits[0]
    return logits.log_softmax(-1)


@pytest.mark.parametrize("shift", [0, 1])
def test_self_tagged_forward_equals_the_loop_written_out(shift):
    model = tiny_lime("llama", metadata_shift=shift, **HEADS)
    ids = torch.randint(3, 97, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    expected_logits, expected_fed = self_tagged_by_hand(model, ids)
    with torch.no_grad():
        logits, fed = self_tagged_forward(model, torch.tensor([ids]))
        bare = model(torch.tensor([ids])).logits  # input_ids alone: the forward tags them itself
    assert {name: tags[0].tolist() for name, tags in fed.items()} == expected_fed
    assert all(len(set(tags)) > 1 for tags in expected_fed.values())  # the heads' choices vary
    torch.testing.assert_close(logits[0], expected_logits)
    torch.testing.assert_close(bare[0], expected_logits)


def loglikelihood_by_hand(lm: LimeLM, context: str, continuation: str) -> float:
    """Sum of the continuation's token log-probabilities (tokens split as lm-eval splits them)."""
    context_len, ids = len(lm.tok_encode(context)), lm.tok_encode(context + continuation)
    logprobs = logprobs_by_hand(lm, ids)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(context_len, len(ids)))


def greedy_by_hand(lm: LimeLM, context: str, until: list[str], max_tokens: int) -> str:
    """Greedy decoding by re-reading the whole text each step, cut at the first stop string."""
    ids = lm.tok_encode(context)
    start = len(ids)
    for _ in range(max_tokens):
        ids.append(logprobs_by_hand(lm, ids)[-1].argmax().item())
        if ids[-1] == lm.tokenizer.eos_token_id:
            break
    text = lm.tok_decode(ids[start:])
    for stop in until:
        text = text.split(stop)[0]
    return text


@pytest.fixture(scope="module")
def evaluations(trained, tmp_path_factory):
    """Every task through `simple_evaluate` once per tag source: tags -> (the LimeLM, results)."""
    manager = TaskManager(include_path=str(ROOT / "tests" / "data" / "lm_eval"))
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # the YAML files name their data relative to the repository root
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        for tags in ("prefix", "model", "none"):
            lm = LimeLM(pretrained=str(trained), tags=tags, batch_size=1, device="cpu")
            results = simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, log_samples=True)
            runs[tags] = lm, results
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("tags", ["prefix", "model", "none"])
def test_every_request_type_matches_a_hand_computation(evaluations, tags):
    lm, results = evaluations[tags]
    assert results["config"]["lime_tags"] == tags and results["config"]["lime_guidance"] is None
    samples = results["samples"]
    for sample in samples["lime_cloze"]:
        ((got, _),) = sample["resps"][0]
        expected = loglikelihood_by_hand(lm, sample["doc"]["context"], sample["doc"]["word"])
        assert got == pytest.approx(expected, rel=1e-4)
    for sample in samples["lime_choice"]:
        got = [resp[0][0] for resp in sample["resps"]]
        expected = [
            loglikelihood_by_hand(lm, sample["doc"]["context"], f" {c}") for c in sample["doc"]["choices"]
        ]
        assert got == pytest.approx(expected, rel=1e-4)
        assert sample["acc"] == float(max(range(len(got)), key=got.__getitem__) == sample["doc"]["answer"])
    for sample in samples["lime_generate"]:
        (got,) = sample["filtered_resps"]
        assert got == greedy_by_hand(lm, sample["doc"]["context"], ["\n", "."], max_tokens=6)
    for sample in samples["lime_rolling"]:
        ((got,),) = sample["resps"]
        ids = [lm.prefix_token_id, *lm.tok_encode(sample["doc"]["text"])]
        assert len(ids) <= lm.max_length  # one window: the whole text read at once
        logprobs = logprobs_by_hand(lm, ids)
        assert got == pytest.approx(sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))), rel=1e-4)


@pytest.mark.slow
def test_the_tag_sources_score_differently(evaluations):
    scores = {
        tags: results["samples"]["lime_cloze"][0]["resps"][0][0][0]
        for tags, (_, results) in evaluations.items()
    }
    assert len({round(score, 4) for score in scores.values()}) == 3, scores


@pytest.mark.slow
@pytest.mark.parametrize("tags", ["prefix", "model"])
def test_context_tags_do_not_depend_on_the_continuation(trained, tags):
    lm = LimeLM(pretrained=str(trained), tags=tags, batch_size=1, device="cpu")
    context = lm.tok_encode("Emma Woodhouse, handsome, clever, and")
    rows = [torch.tensor([context + lm.tok_encode(text)]) for text in (" rich", " silly and poor, said Emma")]
    if tags == "model":
        fed = [self_tagged_forward(lm.model, row)[1] for row in rows]
    else:
        fed = [lm.causal_tags(row) for row in rows]
    for name in fed[0]:
        assert torch.equal(fed[0][name][:, : len(context)], fed[1][name][:, : len(context)])
    short, long = (lm._model_call(row)[0, : len(context)] for row in rows)
    torch.testing.assert_close(short, long)  # the continuation's first token is scored from the context alone


def test_tag_source_options_are_checked_and_recorded(tmp_path, lime_offsets):
    vocab = {"text_config": {"vocab_size": len(lime_offsets)}}
    for name, kwargs in {"plus1_heads": {"metadata_shift": 1, **HEADS}, "lime": {}}.items():
        tiny_lime("llama", **vocab, **kwargs).save_pretrained(tmp_path / name)
        lime_offsets.save_pretrained(tmp_path / name)
    plus1 = str(tmp_path / "plus1_heads")
    assert LimeLM(pretrained=plus1, device="cpu").get_model_info()["lime_guidance"] == "self-guided"
    info = LimeLM(pretrained=plus1, tags="none", device="cpu").get_model_info()
    assert (info["lime_tags"], info["lime_guidance"]) == ("none", "unguided")
    with pytest.raises(ValueError, match="run it unguided \\(tags=none\\) or, with tag heads, self-guided"):
        LimeLM(pretrained=plus1, tags="prefix", device="cpu")
    assert LimeLM(pretrained=str(tmp_path / "lime"), device="cpu").tags == "prefix"
    with pytest.raises(
        ValueError, match="tags=model uses the model's tag heads, and this checkpoint has none"
    ):
        LimeLM(pretrained=str(tmp_path / "lime"), tags="model", device="cpu")
    with pytest.raises(ValueError, match=r"tags must be one of \['prefix', 'model', 'none'\], got 'gold'"):
        LimeLM(pretrained=str(tmp_path / "lime"), tags="gold", device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("shift", [0, 1])
def test_stock_hf_model_with_remote_code_scores_the_self_tagged_reading(tmp_path, bpe_tokenizer, shift):
    """`lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True`, in a Python where lime_hf cannot
    be imported: the heads tag the harness's bare `input_ids` (and generate's prompt) themselves."""
    model = tiny_lime("llama", metadata_shift=shift, text_config={"vocab_size": len(bpe_tokenizer)}, **HEADS)
    model.save_pretrained(tmp_path / "model")
    bpe_tokenizer.save_pretrained(tmp_path / "model")  # a plain tokenizer: the model needs no annotator
    # Stock lm-eval reads a task's relative data_files from the working directory: run it in the tasks' folder.
    shutil.copytree(ROOT / "tests" / "data" / "lm_eval", tmp_path / "tasks")
    run_without_lime_hf(
        """
        import sys
        from lm_eval.__main__ import cli_evaluate
        sys.argv = ["lm_eval", "run", "--model", "hf", "--model_args", "pretrained=../model,trust_remote_code=True",
                    "--tasks", "lime_cloze,lime_choice,lime_generate", "--include_path", ".",
                    "--device", "cpu", "--batch_size", "1", "--output_path", "../out", "--log_samples"]
        cli_evaluate()
        assert not [name for name in sys.modules if name.startswith("lime_hf")]
        """,
        cwd=tmp_path / "tasks",
    )
    lm = LimeLM(pretrained=str(tmp_path / "model"), tags="model", batch_size=1, device="cpu")
    samples = {
        task: [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{task}_*.jsonl")).open()]
        for task in ("lime_cloze", "lime_choice", "lime_generate")
    }
    for sample in samples["lime_cloze"]:
        expected = loglikelihood_by_hand(lm, sample["doc"]["context"], sample["doc"]["word"])
        assert float(sample["resps"][0][0][0]) == pytest.approx(expected, rel=1e-4)
    for sample in samples["lime_choice"]:
        got = [float(resp[0][0]) for resp in sample["resps"]]
        expected = [
            loglikelihood_by_hand(lm, sample["doc"]["context"], f" {c}") for c in sample["doc"]["choices"]
        ]
        assert got == pytest.approx(expected, rel=1e-4)
    for sample in samples["lime_generate"]:
        assert sample["filtered_resps"] == [greedy_by_hand(lm, sample["doc"]["context"], ["\n", "."], 6)]
    unknown = {f"{name}_ids": torch.full((1, 6), UNKNOWN_ID) for name in model.config.metadata_fields}
    row = torch.tensor([lm.tok_encode("Anne Elliot was a woman")[:6]])
    assert not torch.allclose(lm.model(row).logits, lm.model(row, **unknown).logits)  # self-tagging matters
