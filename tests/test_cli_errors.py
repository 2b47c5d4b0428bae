"""Every mistake a user types into `lime-hf`: one or two clear lines on stderr, exit code 2, no traceback.

Each case runs the installed console script as a real subprocess, offline, on real files and tiny saved models.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_TEXT_CONFIGS
from transformers import GPT2Config, GPT2LMHeadModel

from lime_hf import LimeConfig, LimeForCausalLM, LimeTokenizer
from lime_hf.options import TrainOptions
from lime_hf.pretrain import build_tokenizer
from tests.test_cli import run_cli


def save_tiny_lime(folder: Path, tokenizer: LimeTokenizer, metadata_shift: int) -> Path:
    """A tiny random LIME (shift 0) or LIME+1 (shift 1) Llama with its LimeTokenizer, saved to `folder`."""
    torch.manual_seed(0)
    text_config = {**TINY_TEXT_CONFIGS["llama"], "vocab_size": len(tokenizer)}
    LimeForCausalLM(LimeConfig(text_config=text_config, metadata_shift=metadata_shift)).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workdir(bpe_tokenizer, tmp_path_factory) -> Path:
    """Bad and good inputs side by side: text files, an empty folder, LIME, LIME+1 and plain GPT-2 folders."""
    folder = tmp_path_factory.mktemp("cli-errors")
    (folder / "corpus.txt").write_text(
        "Emma Woodhouse lived in Highbury.\n\nShe was happy.\n", encoding="utf-8"
    )
    (folder / "empty.txt").write_bytes(b"")
    (folder / "whitespace.txt").write_text("  \n\n\t \n\n", encoding="utf-8")
    (folder / "latin1.txt").write_bytes("Caf\u00e9 au lait.\n".encode("latin-1"))
    (folder / "empty-folder").mkdir()
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer)
    save_tiny_lime(folder / "lime", tokenizer, metadata_shift=0)
    save_tiny_lime(folder / "lime-plus-1", tokenizer, metadata_shift=1)
    config = GPT2Config(vocab_size=len(bpe_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(folder / "gpt2")
    bpe_tokenizer.save_pretrained(folder / "gpt2")
    (folder / "content-shards").mkdir()  # JSONL whose text key is not `text`
    (folder / "content-shards" / "a.jsonl").write_text(
        '{"content": "Emma lived in Highbury."}\n', encoding="utf-8"
    )
    (folder / "empty-text-shards").mkdir()  # a `text` key, and no document with text in it
    (folder / "empty-text-shards" / "a.jsonl").write_text('{"text": ""}\n', encoding="utf-8")
    (folder / "config-only").mkdir()
    (folder / "config-only" / "config.json").write_text(json.dumps({"model_type": "lime"}), encoding="utf-8")
    return folder


CASES = {
    "missing text file": (
        ["train", "nosuch.txt", "--train-tokenizer", "400"],
        "No such text file(s): ['nosuch.txt']",
    ),
    "train without a tokenizer": (["train", "corpus.txt"], "Give exactly one of --tokenizer PATH"),
    "train with two tokenizers": (
        ["train", "corpus.txt", "--tokenizer", "lime", "--train-tokenizer", "400"],
        "Give exactly one of --tokenizer PATH",
    ),
    "sources after the options": (["train", "--train-tokenizer", "400", "corpus.txt"], "before the options"),
    "unknown train option": (
        ["train", "corpus.txt", "--train-tokenizer", "400", "--no-such-option", "3"],
        "Unrecognized arguments ['--no-such-option', '3']",
    ),
    "annotate an empty file": (["annotate", "empty.txt", "-o", "out"], "empty.txt is empty (0 bytes)"),
    "train on an empty file": (
        ["train", "empty.txt", "--train-tokenizer", "400"],
        "empty.txt is empty (0 bytes)",
    ),
    "annotate whitespace only": (
        ["annotate", "whitespace.txt", "-o", "out"],
        "No documents: ['whitespace.txt'] hold only whitespace",
    ),
    "train on whitespace only": (
        ["train", "whitespace.txt", "--train-tokenizer", "400"],
        "No documents: ['whitespace.txt'] hold only whitespace",
    ),
    "a file that is not UTF-8": (
        ["annotate", "latin1.txt", "-o", "out"],
        "latin1.txt is not UTF-8 text: byte 0xe9 at offset 3 is invalid",
    ),
    "a dataset that is not reachable offline": (
        ["annotate", "nobody/no-such-dataset", "-o", "out"],
        "Cannot load 'nobody/no-such-dataset'",
    ),
    "generate from an empty folder": (
        ["generate", "empty-folder", "Emma"],
        "'empty-folder' holds no config.json",
    ),
    "generate from a missing path": (
        ["generate", "no/such/folder", "Emma"],
        "no such folder 'no/such/folder'",
    ),
    "generate from a plain GPT-2 folder": (
        ["generate", "gpt2", "Emma"],
        "'gpt2' holds a 'gpt2' model, not a LIME model; retrofit it first (`LimeForCausalLM.from_backbone('gpt2', ...)`",
    ),
    "guide a plain GPT-2 model": (
        ["generate", "gpt2", "Emma", "--guide", "pos=NN"],
        "'gpt2' holds a 'gpt2' model, not a LIME model",
    ),
    "guide a LIME model": (
        ["generate", "lime", "Emma", "--guide", "pos=NN"],
        "'lime': guidance (--guide) gives the tags of the next token, which only a LIME+1 model (metadata_shift=1) "
        "reads; this is a LIME model (metadata_shift=0)",
    ),
    "guide a field the model lacks": (
        ["generate", "lime-plus-1", "Emma", "--guide", "dep=nsubj"],
        "'lime-plus-1': guidance (--guide) for 'dep': the model has no metadata field 'dep'; its fields: ner, pos",
    ),
    "a LIME+1 model used as LIME": (
        ["generate", "lime-plus-1", "Emma", "--provider", "annotate"],
        "'lime-plus-1': metadata provider 'annotate' tags tokens that exist, and a LIME+1 model (metadata_shift=1) "
        "reads the tags of the token it is about to write: use guidance (--guide) or 'unknown'",
    ),
    "a LIME+1 checkpoint used as a backbone": (
        ["train", "corpus.txt", "--tokenizer", "lime-plus-1", "--from-backbone", "lime-plus-1"],
        "--from-backbone 'lime-plus-1' is already a LIME+1 model (metadata shift 1)",
    ),
    "a LIME config without weights": (["generate", "config-only", "Emma"], "'config-only' holds no weights"),
    "an empty prompt": (["generate", "lime", "  "], "the prompt is empty"),
    "a zero temperature": (
        ["generate", "lime", "Emma", "--temperature", "0"],
        "invalid positive float value: '0'",
    ),
    "more sequences than greedy decoding gives": (
        ["generate", "lime", "Emma", "--num-return-sequences", "2"],
        "--num-return-sequences 2 needs sampling (--do-sample, --top-k, ...) or at least as many beams",
    ),
    "provider 'model' without tag heads": (
        ["generate", "lime", "Emma", "--provider", "model"],
        "'lime': metadata provider 'model' reads the model's tag heads, and this model has none",
    ),
    "tag with a missing tokenizer": (["tag", "Emma", "--tokenizer", "nowhere"], "no such folder 'nowhere'"),
    "tag with a path that is not there": (
        ["tag", "Emma", "--tokenizer", "no/such/folder"],
        "no such folder 'no/such/folder': give a saved tokenizer or model folder, or a Hub id (owner/name)",
    ),
    "tag with a Hub id that is not reachable": (  # HF_HUB_OFFLINE=1: the Hub id is tried, and fails
        ["tag", "Emma", "--tokenizer", "nobody/no-such-tokenizer"],
        "no such folder 'nobody/no-such-tokenizer', and it does not load as a Hub id: ",
    ),
    # Options that one way of annotating would ignore are refused (datatrove is not imported for it).
    "annotate --executor with --num-proc": (
        ["annotate", "empty-folder", "-o", "out", "--executor", "local", "--num-proc", "2"],
        "--executor local reads a folder of .parquet or .jsonl shards; --num-proc only apply without it",
    ),
    "annotate --executor with a dataset config and split": (
        [
            "annotate",
            "empty-folder",
            "-o",
            "out",
            "--executor",
            "ray",
            "--dataset-config",
            "c",
            "--split",
            "s",
        ],
        "--dataset-config, --split only apply without it",
    ),
    "annotate with executor options but no executor": (
        ["annotate", "corpus.txt", "-o", "out", "--tasks", "4"],
        "--tasks set up a datatrove executor: add --executor local (or slurm, ray), or drop them",
    ),
    "annotate --executor local with Slurm options": (
        ["annotate", "empty-folder", "-o", "out", "--executor", "local", "--slurm-partition", "p"],
        "--slurm-partition apply to --executor slurm only, not local",
    ),
    "annotate --executor shards without the text key": (
        ["annotate", "content-shards", "-o", "out", "--executor", "local"],
        "No document has the text key 'text': the first record of 'a.jsonl' in ",
    ),
    "train a saved LimeTokenizer with another spaCy pipeline": (
        ["train", "corpus.txt", "--tokenizer", "lime", "--spacy-model", "en_core_web_trf"],
        "--spacy-model en_core_web_trf differs from the saved LimeTokenizer's pipeline, the default (en_core_web_sm)",
    ),
    "train a saved LimeTokenizer with another alignment": (
        ["train", "corpus.txt", "--tokenizer", "lime", "--alignment", "offsets"],
        "--alignment offsets differs from the saved LimeTokenizer's 'pretokenized'",
    ),
    "tag an empty text": (["tag", "", "--tokenizer", "lime"], "the text is empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_clear_line_and_exit_code_2(case, workdir):
    argv, message = CASES[case]
    result = run_cli(*argv, cwd=workdir)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-2].startswith(f"lime-hf {argv[0]}: error: ") and lines[-1].startswith("  (see `lime-hf")
    assert len(lines) == 2, result.stderr  # nothing else: no warnings, no progress bars


def test_a_lime_plus_one_model_without_guidance_says_how_to_guide_it(workdir):
    result = run_cli("generate", "lime-plus-1", "Emma was", "--max-new-tokens", "2", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "note: lime-plus-1 is a LIME+1 model" in result.stderr
    assert "--guide pos=DT,NN,VBD" in result.stderr
    assert result.stdout.startswith("Emma was")


def test_an_annotate_run_that_writes_nothing_fails(workdir):
    """Every document is skipped (no text): the run itself succeeds, and its empty output is an error."""
    result = run_cli("annotate", "empty-text-shards", "-o", "empty-out", "--executor", "local", cwd=workdir)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Annotated" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-2] == (
        "lime-hf annotate: error: Nothing was written to empty-out: no document in empty-text-shards had text under "
        "the key 'text'; name the text key with --text-column (`text_key=` in Python)"
    )


def test_the_console_script_is_installed():
    assert shutil.which("lime-hf", path=os.path.dirname(sys.executable)) is not None


def test_a_loaded_lime_tokenizer_keeps_its_own_pipeline(workdir):
    """The same rule where the saved LimeTokenizer is only known once loaded (a Hub id): `build_tokenizer`."""
    options = TrainOptions(
        sources=["corpus.txt"], tokenizer=str(workdir / "lime"), spacy_model="en_core_web_trf"
    )
    with pytest.raises(
        ValueError, match="--spacy-model en_core_web_trf differs from the saved LimeTokenizer's"
    ):
        build_tokenizer(options, train_texts=None)
    options.spacy_model = None
    assert isinstance(build_tokenizer(options, train_texts=None), LimeTokenizer)
