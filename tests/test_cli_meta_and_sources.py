"""Issue 23, items 3, 6, 8 and 9 from the command line: meta-token placement in `train` and `generate`, the tag
source of `train`'s metrics, no warning noise, and a PEFT adapter folder named as one.

Each command runs the installed console script as a real subprocess, offline, on real files and tiny saved models.
"""

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_models import TINY_TEXT_CONFIGS, tiny_lime
from transformers import TrainingArguments

from lime_hf import DataCollatorForLime, LimeConfig, LimeForCausalLM, LimeTokenizer
from lime_hf.integrations.peft import lime_lora_config
from lime_hf.trainer import LimeTrainer
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(bpe_tokenizer, tmp_path_factory) -> Path:
    """A tiny LIME model's LoRA adapter folder, saved as `LimeTrainer` saves one (adapter and tokenizer)."""
    folder = tmp_path_factory.mktemp("cli-meta")
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer)
    torch.manual_seed(0)
    model = LimeForCausalLM(
        LimeConfig(text_config={**TINY_TEXT_CONFIGS["llama"], "vocab_size": len(tokenizer)})
    )
    get_peft_model(model, lime_lora_config(model, r=4)).save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "adapter")
    model.save_pretrained(folder / "lime")
    tokenizer.save_pretrained(folder / "lime")
    return folder


def one_line_error(result, command: str) -> str:
    """The error line of a command refused with exit code 2 and nothing else on stderr."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[1].startswith("  (see `lime-hf"), result.stderr
    assert lines[0].startswith(f"lime-hf {command}: error: ")
    return lines[0]


# ---- Item 9: a PEFT adapter folder is named as one ----------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "app"])
def test_an_adapter_folder_is_named_with_the_way_to_merge_it(command, workdir):
    argv = [command, "adapter", "Emma"] if command == "generate" else [command, "adapter"]
    error = one_line_error(run_cli(*argv, cwd=workdir), command)
    assert "'adapter' is a PEFT adapter (adapter_config.json), not a whole model" in error
    assert "PeftModel.from_pretrained(base, 'adapter').merge_and_unload().save_pretrained('merged')" in error


# ---- Item 8: no warning a user cannot act on -----------------------------------------------------------------


def test_wrapping_a_lime_model_with_peft_warns_nothing():
    model = tiny_lime()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(model, lime_lora_config(model, r=4))
    assert [str(warning.message) for warning in caught] == []


def test_lime_trainer_on_cpu_does_not_ask_for_pinned_memory(lime_pretokenized, tmp_path):
    """User code: a `TrainingArguments` left at its defaults, on a machine the Trainer runs on the CPU."""
    tokenizer = lime_pretokenized
    model = tiny_lime(text_config={"vocab_size": len(tokenizer)})
    args = TrainingArguments(tmp_path, max_steps=1, use_cpu=True, report_to="none", save_strategy="no")
    trainer = LimeTrainer(
        model=model,
        args=args,
        train_dataset=[tokenizer("Emma Woodhouse lived in Highbury.")] * 2,
        data_collator=DataCollatorForLime(tokenizer),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [warning for warning in caught if "pin_memory" in str(warning.message)]


def test_the_meta_token_page_runs_without_a_word_on_stderr(tmp_path):
    """docs/meta-tokens.md's snippets in a fresh interpreter: no bos/eos outside the vocabulary, nothing else."""
    page = (ROOT / "docs" / "meta-tokens.md").read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"^```python\n(.*?)^```$", page, flags=re.DOTALL | re.MULTILINE))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_lime_hf_eval_prints_no_lm_eval_noise(workdir, tmp_path):
    """Outside a git repository, with the `lime` model: neither the backend warning nor git's "fatal"."""
    shutil.copytree(ROOT / "tests" / "data" / "lm_eval", tmp_path / "tests" / "data" / "lm_eval")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "lime_hf.cli", "eval", "--model", "lime", "--model_args",
               f"pretrained={workdir / 'lime'},tags=none", "--tasks", "lime_cloze", "--include_path",
               "tests/data/lm_eval", "--device", "cpu", "--limit", "1"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "neither marked as CausalLM or Seq2SeqLM" not in result.stderr
    assert "not a git repository" not in result.stderr
