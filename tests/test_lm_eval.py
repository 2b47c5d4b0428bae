"""lm-eval's own machinery on a local cloze task: the `lime` model's loglikelihoods equal a hand computation."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from lime_hf import LimeConfig, LimeForCausalLM
from lime_hf.integrations.lm_eval import LimeLM


@pytest.mark.slow
def test_loglikelihood_matches_hand_computation(tmp_path, lime_offsets, monkeypatch):
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
    request = Instance("loglikelihood", doc={}, arguments=("Anne Elliot was a", " woman"), idx=0)
    (got,) = lm.loglikelihood([request])
    ids = lm.tok_encode("Anne Elliot was a woman")
    context_len = len(lm.tok_encode("Anne Elliot was a"))
    tags = lm.causal_tags(torch.tensor([ids]))
    assert all((ids >= 3).any() for ids in tags.values())  # real labels, not unknown
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits
        logits = model(torch.tensor([ids]), **tags).logits.log_softmax(-1)[0]
    assert not torch.allclose(plain.log_softmax(-1)[0], logits)  # the tags matter
    expected = sum(logits[i - 1, ids[i]].item() for i in range(context_len, len(ids)))
    assert math.isclose(got[0], expected, rel_tol=1e-4)


@pytest.mark.slow
def test_lime_hf_eval_subprocess_records_tag_source(tmp_path, lime_offsets):
    torch.manual_seed(0)
    text_config = dict(model_type="llama", vocab_size=len(lime_offsets), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LimeForCausalLM(LimeConfig(text_config=text_config)).save_pretrained(tmp_path / "m")
    lime_offsets.save_pretrained(tmp_path / "m")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    # The README's form: lm-eval inserts its `run` subcommand itself when none is given.
    command = [sys.executable, "-c", "import sys; from lime_hf_cli import main; sys.exit(main())", "eval",
               "--model", "lime", "--model_args", f"pretrained={tmp_path / 'm'},tags=prefix", "--tasks",
               "lime_cloze", "--include_path", "tests/data/lm_eval", "--device", "cpu", "--batch_size", "1",
               "--output_path", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(path.read_text())
    assert results["config"]["model_args"]["tags"] == "prefix" or "tags=prefix" in str(
        results["config"]["model_args"]
    )
    assert results["config"]["lime_tags"] == "prefix" and results["config"]["lime_guidance"] is None
    assert set(results["results"]["lime_cloze"]) >= {"acc,none"}
