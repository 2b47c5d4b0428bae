"""Issue 23, items 3, 6, 8 and 9 from the command line: meta-token placement in `train` and `generate`, the tag
source of `train`'s metrics, no warning noise, and a PEFT adapter folder named as one.

Each command runs the installed console script as a real subprocess, offline, on real files and tiny saved models.
"""

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_models import TINY_TEXT_CONFIGS

from lime_hf import LimeConfig, LimeForCausalLM, LimeTokenizer
from lime_hf.integrations.peft import lime_lora_config
from tests.test_cli import run_cli


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
