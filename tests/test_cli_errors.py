"""Every mistake a user types into `lime-hf`: one or two clear lines on stderr, exit code 2, no traceback.

Each case runs the installed console script as a real subprocess, offline, on real files and tiny saved models.
"""

import json
import os
import re
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
from tests.test_cli import run_cli, table_rows


def save_tiny_lime(
    folder: Path, tokenizer: LimeTokenizer, metadata_shift: int, tag_head_fields: tuple[str, ...] = ()
) -> Path:
    """A tiny random LIME (shift 0) or LIME+1 (shift 1) Llama (with tag heads for `tag_head_fields`) and its
    LimeTokenizer, saved to `folder`."""
    torch.manual_seed(0)
    text_config = {**TINY_TEXT_CONFIGS["llama"], "vocab_size": len(tokenizer)}
    config = LimeConfig(
        text_config=text_config, metadata_shift=metadata_shift, tag_head_fields=list(tag_head_fields)
    )
    LimeForCausalLM(config).save_pretrained(folder)
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
    save_tiny_lime(folder / "lime-plus-1-heads", tokenizer, metadata_shift=1, tag_head_fields=("pos", "ner"))
    (folder / "lines.txt").write_text("Emma lived in Highbury.\nShe was happy.\nHe came.\n", encoding="utf-8")
    (folder / "tasks").mkdir()  # a task whose data file is not there
    (folder / "tasks" / "gone.yaml").write_text(
        "task: gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: gone.jsonl\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{word}}'\n",
        encoding="utf-8",
    )
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
    # Checked before anything loads (issue 23): the model's fields, its position range, no abbreviations.
    "an unknown --tag-heads field": (
        ["train", "corpus.txt", "--train-tokenizer", "400", "--tag-heads", "pos,nerr"],
        "--tag-heads names unknown field(s) ['nerr']; the tokenizer's fields are ['pos', 'ner'].",
    ),
    "a block larger than the backbone's positions": (
        ["train", "corpus.txt", "--train-tokenizer", "400", "--block-size", "4096"],
        "--block-size 4096 is not allowed: it must lie between 1 and the backbone's max_position_embeddings (1024).",
    ),
    "a block larger than the --model-config positions": (
        [
            "train",
            "corpus.txt",
            "--train-tokenizer",
            "400",
            "--block-size",
            "200",
            "--model-config",
            '{"model_type": "gpt2", "n_positions": 128}',
        ],
        "--block-size 200 is not allowed: it must lie between 1 and the backbone's max_position_embeddings (128).",
    ),  # fmt: skip
    "an abbreviated Trainer option": (
        ["train", "corpus.txt", "--train-tokenizer", "400", "--max-step", "3"],
        "Unrecognized arguments ['--max-step', '3'] (did you mean --max-steps for --max-step?)",
    ),
    "--sample-by with a dataset source": (
        ["annotate", "nobody/no-such-dataset", "-o", "out", "--sample-by", "line"],
        "--sample-by line splits .txt files into documents; a dataset source's rows are its documents",
    ),
    # Wording (issue 23): a file is not a folder, sources come first, a local data file is not a Hub id.
    "annotate --executor on a file": (
        ["annotate", "corpus.txt", "-o", "out", "--executor", "local"],
        "--executor reads a folder of .parquet or .jsonl shards, and 'corpus.txt' is a file: annotate it without "
        "--executor",
    ),
    "train with the sources after the options": (
        ["train", "--train-tokenizer", "500", "corpus.txt"],
        "The sources come first, before the options: `lime-hf train corpus.txt [options]`",
    ),
    "a local .csv that is not there": (
        ["annotate", "nothere.csv", "-o", "out"],
        "No such data file 'nothere.csv'.",
    ),
    "tag --heads of a model without heads": (
        ["tag", "Emma", "--tokenizer", "lime", "--heads"],
        "--heads shows the predictions of a model's tag heads, and 'lime' has none",
    ),
    # `lime-hf eval`: lm-eval's command line, its errors one line too.
    "eval with an unknown tag source": (
        ["eval", "--model", "lime", "--model_args", "pretrained=lime,tags=spacy", "--tasks", "x"],
        "tags must be one of ['prefix', 'model', 'none'], got 'spacy'",
    ),
    "eval of LIME+1 with prefix tags": (
        ["eval", "--model", "lime", "--model_args", "pretrained=lime-plus-1,tags=prefix", "--tasks", "x"],
        "A LIME+1 model reads the tags of the next token, which the harness can only know from the answer itself",
    ),
    "eval with tags=model without heads": (
        ["eval", "--model", "lime", "--model_args", "pretrained=lime,tags=model", "--tasks", "x"],
        "tags=model uses the model's tag heads, and this checkpoint has none",
    ),
    "eval of a plain GPT-2 folder": (
        ["eval", "--model", "lime", "--model_args", "pretrained=gpt2", "--tasks", "x"],
        "'gpt2' holds a 'gpt2' model, not a LIME model",
    ),
    "eval of a task whose data file is missing": (
        [
            "eval",
            "--model",
            "lime",
            "--model_args",
            "pretrained=lime",
            "--tasks",
            "gone",
            "--include_path",
            "tasks",
        ],
        "task 'gone' (tasks/gone.yaml): its data file 'gone.jsonl' is neither beside the YAML (tasks) nor in the "
        "working directory",
    ),
    "eval of an unknown task": (
        ["eval", "--model", "lime", "--model_args", "pretrained=lime", "--tasks", "no_such_task"],
        "Tasks not found: no_such_task; `lime-hf eval ls tasks` lists lm-eval's tasks",
    ),
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


def test_eval_help_explains_the_lime_model_and_its_tag_sources(workdir):
    result = run_cli("eval", "--help", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "usage: lime-hf eval --model lime --model_args pretrained=PATH[,tags=SOURCE]"
    )
    for source in ("tags=prefix", "tags=model", "tags=none"):
        assert f"\n  {source}  " in result.stdout
    assert "lime-hf eval run --help" in result.stdout


def test_a_one_sentence_per_line_file_is_reported_and_splits_by_line(workdir):
    """The default cuts paragraphs, and says so; a file of lines read as one paragraph gets a note."""
    result = run_cli("annotate", "lines.txt", "-o", "by-paragraph", "--fields", "pos", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [
        "Read 1 document (9 words) from lines.txt: one per paragraph (--sample-by paragraph, the default; line, "
        "paragraph or document)",
        "note: each file is one paragraph of 3 lines in all, so one document; if each line is a document (one "
        "sentence per line), pass --sample-by line",
    ]
    result = run_cli(
        "annotate", "lines.txt", "-o", "by-line", "--fields", "pos", "--sample-by", "line", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        "Read 3 documents (9 words) from lines.txt: one per line (--sample-by line; line, paragraph or document)"
    )
    assert "Annotated 3 texts with pos" in result.stdout


def test_tag_shows_the_heads_predictions_and_why_subwords_repeat_b_tags(workdir):
    """`tag --heads` adds one column per head (the heads' causal predictions, as `self_tags` gives them)."""
    from lime_hf.tag_heads import self_tags

    text = "Emma Woodhouse went to London."
    result = run_cli("tag", text, "--tokenizer", "lime-plus-1-heads", "--heads", cwd=workdir)
    assert result.returncode == 0, result.stderr
    header = re.split(r" {2,}", result.stdout.splitlines()[1].strip())
    assert header == ["#", "token", "id", "chars", "ner", "pos", "pos heads", "ner heads"]
    rows = table_rows(result.stdout)
    model = LimeForCausalLM.from_pretrained(workdir / "lime-plus-1-heads").eval()
    ids = LimeTokenizer.from_pretrained(workdir / "lime-plus-1-heads")(text)["input_ids"]
    with torch.no_grad():
        tags, _ = self_tags(model, torch.tensor([ids]))
    labels = model.config.metadata_fields
    assert [row[-2] for row in rows] == [labels["pos"][tag] for tag in tags["pos"][0].tolist()]
    assert [row[-1] for row in rows] == [labels["ner"][tag] for tag in tags["ner"][0].tolist()]
    if any(a[4] == b[4] and a[4].startswith("B-") for a, b in zip(rows, rows[1:], strict=False)):
        assert "note: every subword of a word carries the word's tags, B- included" in result.stderr


def test_generate_says_which_tags_the_guide_gave_and_which_the_heads(workdir):
    result = run_cli(
        "generate", "lime-plus-1-heads", "Emma", "--guide", "ner=O", "--max-new-tokens", "3", "--show-tags",
        cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "note: --guide ner gives 1 label(s) for up to 3 new tokens: the first 1 follow it, the rest take their ner "
        "tags from the provider (heads); repeat a label to hold it (ner=O,O,O,...)" in result.stderr
    )
    header = re.split(r" {2,}", result.stdout.splitlines()[1].strip())
    assert header == ["#", "token", "ner fed", "from", "ner spaCy", "pos fed", "from", "pos spaCy"]
    sources = [(row[3], row[6]) for row in table_rows(result.stdout)]
    assert sources == [("guide", "heads"), ("heads", "heads"), ("heads", "heads")]


def test_an_abbreviated_option_is_not_taken_for_the_option(workdir):
    result = run_cli("generate", "lime", "Emma", "--max-new-token", "2", cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[0] == "lime-hf: error: unrecognized arguments: --max-new-token 2"


def test_an_eval_split_that_leaves_no_training_document_fails(workdir):
    """The whole file is one document: holding a tenth of it out leaves nothing to train on (after loading it)."""
    result = run_cli(
        "train", "corpus.txt", "--train-tokenizer", "400", "--sample-by", "document", "--eval-fraction", "0.1",
        cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-2] == (
        "lime-hf train: error: --eval-fraction 0.1 of 1 document(s) leaves none to train on: cut the texts into more "
        "documents (--sample-by line: one per line), or hold out an --eval-file instead."
    )
