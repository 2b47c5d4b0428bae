"""Issue 23, items 3, 6, 8 and 9 from the command line: meta-token placement in `train` and `generate`, the tag
source of `train`'s metrics, no warning noise, and a PEFT adapter folder named as one.

Each command runs the installed console script as a real subprocess, offline, on real files and tiny saved models.
"""

import contextlib
import io
import json
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
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from lime_hf import DataCollatorForLime, LimeConfig, LimeForCausalLM, LimeTokenizer
from lime_hf.cli.train import main as train_main
from lime_hf.integrations.peft import lime_lora_config
from lime_hf.meta_tokens import meta_token_count
from lime_hf.trainer import LimeTrainer
from tests.conftest import AUSTEN
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(bpe_tokenizer, tmp_path_factory) -> Path:
    """A tiny LIME model (`lime`), its LoRA adapter folder saved as `LimeTrainer` saves one (`adapter`: adapter and
    tokenizer), and a text file."""
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
    (folder / "corpus.txt").write_text("Emma Woodhouse lived in Highbury.\n", encoding="utf-8")
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


# ---- Item 3: the meta-token options' mistakes, refused before anything loads ---------------------------------

META_OPTION_CASES = {
    "--meta-fraction without --meta-token": (
        ["train", "corpus.txt", "--train-tokenizer", "400", "--meta-fraction", "0.1"],
        "--meta-fraction sets how many meta-tokens --meta-token injects: add --meta-token '<meta>'",
    ),
    "--meta-fraction out of range": (
        ["train", "corpus.txt", "--train-tokenizer", "400", "--meta-token", "<meta>", "--meta-fraction", "1"],
        "--meta-fraction is meta-tokens per token, in (0, 1): got 1.0",
    ),
    "an empty --meta-token": (
        ["train", "corpus.txt", "--train-tokenizer", "400", "--meta-token", " "],
        "--meta-token is empty",
    ),
    "--meta-every on a model without meta-tokens": (
        ["generate", "lime", "Emma", "--meta-every", "3"],
        "--meta-every places the model's meta-tokens, and 'lime' has none",
    ),
}


@pytest.mark.parametrize("case", list(META_OPTION_CASES))
def test_meta_token_option_mistakes_are_one_line(case, workdir):
    argv, message = META_OPTION_CASES[case]
    assert message in one_line_error(run_cli(*argv, cwd=workdir), argv[0])


# ---- Item 8: no warning a user cannot act on -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wrapping_a_lime_model_with_peft_warns_nothing(arch):
    model = tiny_lime(arch)
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


# ---- Items 3 and 6: `train` with meta-tokens, its results say their tag source --------------------------------


class BatchProbe(TrainerCallback):
    """Keeps the first training batch the Trainer's dataloader gives (what the model is fed)."""

    batch = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.batch = next(iter(train_dataloader))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`lime-hf train` (as the script `lime_hf.cli.train.main`, the same command) of a LIME+1 model with a POS
    head and the meta-token `<meta>`: (its folder, its stdout, the first training batch)."""
    folder = tmp_path_factory.mktemp("trained")
    corpus = (AUSTEN / "emma.txt").read_text(encoding="utf-8")[:6_000]
    (folder / "corpus.txt").write_text(corpus, encoding="utf-8")
    probe = BatchProbe()
    argv = [str(folder / "corpus.txt"), "--train-tokenizer", "400", "--metadata-shift", "1", "--tag-heads", "pos",
            "--meta-token", "<meta>", "--meta-fraction", "0.2", "--block-size", "32", "--eval-fraction", "0.3",
            "--cache-dir", str(folder / "cache"), "--output-dir", str(folder / "model"), "--max-steps", "2",
            "--per-device-train-batch-size", "4", "--use-cpu", "--report-to", "none", "--save-strategy", "no",
            "--disable-tqdm", "true"]  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train_main(argv, callbacks=[probe])
    return folder / "model", stdout.getvalue(), probe.batch


def test_train_injects_the_meta_token_and_gives_the_model_meta_attention(trained):
    folder, stdout, batch = trained
    tokenizer = AutoTokenizer.from_pretrained(folder)
    meta_id = tokenizer.convert_tokens_to_ids("<meta>")
    assert meta_id in tokenizer.all_special_ids
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.meta_token_ids == [meta_id] and model.meta_attention is not None
    # Blocks of 27 tokens (27 + round(0.2 * 27) = 32; shorter ones at the ends) get 0.2 of their length in
    # meta-tokens, left out of the loss.
    assert f"Meta-token '<meta>' (id {meta_id}): 0.2 of each block" in stdout
    is_meta = batch["input_ids"] == meta_id
    tokens = batch["attention_mask"].sum(dim=1) - is_meta.sum(dim=1)
    assert batch["input_ids"].shape[1] <= 32 and tokens.max() == 27
    assert is_meta.sum(dim=1).tolist() == [meta_token_count(int(n), 0.2) for n in tokens]
    assert (batch["labels"][is_meta] == -100).all() and (batch["pos_ids"][is_meta] == 2).all()


def test_train_results_say_they_were_measured_with_oracle_next_token_tags(trained):
    folder, stdout, _ = trained
    source = "oracle next-token tags (spaCy en_core_web_sm, whole document)"
    assert re.search(rf"eval_metadata_source\s+= {re.escape(source)}", stdout), stdout[-1500:]
    for name in ("eval_results.json", "all_results.json"):
        results = json.loads((folder / name).read_text(encoding="utf-8"))
        assert results["eval_metadata_source"] == source
        assert 0.0 <= results["eval_pos_tag_accuracy"] <= 1.0 and "eval_accuracy" in results
    assert f"| eval_metadata_source | {source} |" in (folder / "README.md").read_text(encoding="utf-8")


def test_generate_places_the_meta_token_in_the_prompt_and_the_output(trained):
    folder, _, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = "Emma Woodhouse, handsome, clever"
    length = len(tokenizer(prompt)["input_ids"])
    result = run_cli("generate", folder, prompt, "--meta-every", "3", "--max-new-tokens", "8", "--guide", "pos=NN,NN",
                     "--show-tags", cwd=folder.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 1) for line in result.stdout.splitlines() if re.match(r"\d+\s", line)]
    assert [int(step) for step, _ in rows] == list(range(len(rows))) and len(rows) > 4
    # The prompt has `length + (length - 1) // 3` positions with its meta-tokens; the stride goes on in the output.
    start = length + (length - 1) // 3
    placed = [row.startswith("'<meta>'") for _, row in rows]
    assert placed == [(start + step + 1) % 4 == 0 for step in range(len(rows))]
    assert (
        "--meta-every" not in result.stderr
    )  # no note that none is placed (the short schedule gets its own)


def test_generate_says_when_a_meta_token_model_gets_none(trained):
    folder, _, _ = trained
    result = run_cli(
        "generate", folder, "Emma", "--max-new-tokens", "2", "--guide", "pos=NN", cwd=folder.parent
    )
    assert result.returncode == 0, result.stderr
    assert "reads meta-tokens ('<meta>') and none is placed: add --meta-every N" in result.stderr
