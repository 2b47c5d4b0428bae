"""The `lime-hf` console script, run as a real subprocess: real spaCy, real tokenizers, tiny real models."""

import ast
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from tiny_models import TINY_TEXT_CONFIGS
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from lime_hf import LimeConfig, LimeForCausalLM, LimeTokenizer, SpacyAnnotator, pretrain, tokenization_lime
from lime_hf.annotation import BUILTIN_FIELDS
from lime_hf.cli import main, train
from lime_hf.cli.train import parse_train_arguments
from lime_hf.options import ALIGNMENTS, FIELDS
from tests.conftest import AUSTEN, share_annotator

LIME_HF = shutil.which("lime-hf", path=Path(sys.executable).parent) or shutil.which("lime-hf")


def run_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed console script offline, with its own datasets cache, and capture its output."""
    assert LIME_HF is not None, "the `lime-hf` console script is not installed: run `pip install -e .`"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cwd / "datasets-cache")}
    return subprocess.run(
        [LIME_HF, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def lime_plus_one_dir(bpe_tokenizer, tmp_path_factory) -> Path:
    """A saved tiny random LIME+1 Llama with its LimeTokenizer (the session's BPE, pretokenized)."""
    folder = tmp_path_factory.mktemp("lime-plus-1")
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer)
    torch.manual_seed(0)
    text_config = {**TINY_TEXT_CONFIGS["llama"], "vocab_size": len(tokenizer)}
    LimeForCausalLM(LimeConfig(text_config=text_config, metadata_shift=1)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_help_lists_every_command(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: lime-hf" in result.stdout
    for command in ("annotate", "train", "generate", "tag", "demo", "app", "eval"):
        assert f"    {command} " in result.stdout


@pytest.mark.parametrize("command", ["annotate", "generate", "tag", "demo", "app"])
def test_each_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: lime-hf {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["generate", "--help"], ["train", "x.txt"], ["eval", "--help"]]
)
def test_help_and_usage_errors_import_neither_torch_nor_transformers(argv):
    code = f"import sys; from lime_hf.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\n"
    code += "print(sorted(name for name in ('torch', 'transformers', 'lm_eval') if name in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[-1] == "[]", result.stderr


def test_annotate_saves_span_columns_for_every_paragraph(tmp_path):
    (tmp_path / "a.txt").write_text("Emma Woodhouse lived in Highbury.\n\nShe was happy.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Mr. Knightley came to Hartfield on Tuesday.", encoding="utf-8")
    result = run_cli("annotate", "a.txt", "b.txt", "--output", "annotated", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "Read 3 documents (15 words) from a.txt, b.txt: one per paragraph (--sample-by paragraph, the default; "
        "line, paragraph or document)\n"
    )
    assert "Annotated 3 texts with pos, ner" in result.stdout

    annotated = load_from_disk(str(tmp_path / "annotated"))
    assert [text.rstrip("\n") for text in annotated["text"]] == [  # paragraphs, as `load_texts` cuts them
        "Emma Woodhouse lived in Highbury.",
        "She was happy.",
        "Mr. Knightley came to Hartfield on Tuesday.",
    ]
    first = annotated[0]
    pos, ner = first["lime_pos"], first["lime_ner"]
    words = [first["text"][start:end] for start, end in zip(pos["starts"], pos["ends"], strict=True)]
    assert words == ["Emma", "Woodhouse", "lived", "in", "Highbury", "."]
    assert pos["labels"][:3] == ["NNP", "NNP", "VBD"]
    assert ner["labels"][:2] == ["B-PERSON", "I-PERSON"]
    assert annotated[2]["lime_ner"]["labels"][-2] == "B-DATE"  # Tuesday


def test_annotate_rejects_a_missing_file_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "missing.txt" in capsys.readouterr().err


def test_train_help_shows_the_lime_options_first_and_points_to_the_trainers(tmp_path):
    result = run_cli("train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: lime-hf train SOURCE")
    assert "--train-tokenizer VOCAB" in out and "--metadata-shift {0,1}" in out
    assert "--learning-rate" not in out.split("Trainer options:")[0]  # the Trainer's come behind the pointer
    assert "lime-hf train --help-trainer" in out
    assert len(out.splitlines()) < 80
    assert out.count("(default: 512)") == 1  # each default once

    trainer = run_cli("train", "--help-trainer", cwd=tmp_path)
    assert trainer.returncode == 0, trainer.stderr
    assert "--learning_rate LEARNING_RATE, --learning-rate LEARNING_RATE" in trainer.stdout


def test_train_reads_sources_first_then_lime_and_trainer_options():
    args, rest = parse_train_arguments(
        ["a.txt", "b.txt", "--max_steps", "10", "--train-tokenizer", "400", "--bf16", "--eval-file", "e.txt"]
    )
    assert args.sources == ["a.txt", "b.txt"] and args.train_tokenizer == 400 and args.eval_file == "e.txt"
    assert args.block_size == 512  # the dataclass's default
    assert rest == ["--max-steps", "10", "--bf16"]


def test_train_hands_every_argument_to_the_pretraining_pipeline(monkeypatch, tmp_path):
    received = []
    monkeypatch.setattr(pretrain, "run", lambda *args, **kwargs: received.append((args, kwargs)))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Emma was happy.\n", encoding="utf-8")
    argv = [str(corpus), "--train-tokenizer", "400", "--max_steps", "3", "--block-size", "64", "--use-cpu"]
    assert main(["train", *argv]) == 0
    assert len(received) == 1
    (options, training_args), kwargs = received[0]
    assert kwargs == {}
    assert options.sources == [str(corpus)] and options.train_tokenizer == 400 and options.block_size == 64
    assert training_args.max_steps == 3 and training_args.use_cpu


def test_generate_follows_the_guidance(lime_plus_one_dir, annotator, tmp_path):
    prompt, steps = "Emma was", 4
    result = run_cli(
        "generate",
        lime_plus_one_dir,
        prompt,
        "--guide",
        "pos=NNP,VBD",
        "--max-new-tokens",
        steps,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr

    tokenizer = share_annotator(AutoTokenizer.from_pretrained(lime_plus_one_dir), annotator)
    model = AutoModelForCausalLM.from_pretrained(lime_plus_one_dir)
    encoding = tokenizer(prompt, return_tensors="pt")
    expected = model.generate(
        **encoding, guidance={"pos": [["NNP", "VBD"]]}, max_new_tokens=steps, do_sample=False
    )
    assert result.stdout == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"
    assert result.stdout.startswith(prompt)


def test_generate_with_an_unknown_label_lists_the_valid_ones(lime_plus_one_dir, tmp_path):
    result = run_cli("generate", lime_plus_one_dir, "Emma was", "--guide", "pos=NNP,VERB", cwd=tmp_path)
    assert result.returncode == 2
    assert "Unknown label 'VERB' for metadata field 'pos'. Valid labels: ['$'" in result.stderr
    assert "'VBD'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "guide, message",
    [
        ("pos", "expected FIELD=LABEL,LABEL,..."),
        ("pos=NNP,,VBD", "expected FIELD=LABEL,LABEL,..."),
        ("=NNP", "expected FIELD=LABEL,LABEL,..."),
    ],
)
def test_generate_rejects_bad_guide_syntax(guide, message, lime_plus_one_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(lime_plus_one_dir), "Emma", "--guide", guide])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_reads_whitespace_separated_labels_when_a_label_is_a_comma(lime_plus_one_dir, tmp_path):
    """`pos=NNP , NN` holds whitespace, so it splits there: three labels, the second the comma tag `,`."""
    schedule = ["NNP", ",", "NN"]
    result = run_cli(
        "generate", lime_plus_one_dir, "Emma was", "--guide", "pos=NNP ,\tNN", "--max-new-tokens", 4,
        "--show-tags", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header = re.split(r" {2,}", result.stdout.splitlines()[1].strip())
    fed = [row[header.index("pos fed")] for row in table_rows(result.stdout)]
    assert fed == [*schedule, "<unk>"]  # the schedule, then LIME+1's default provider
    assert "spaCy finds the asked pos tag on" in result.stdout and "of 3 guided tokens." in result.stdout


@pytest.mark.slow
def test_quick_demo_prints_plots_and_saves_a_reloadable_model(tmp_path):
    result = run_cli("demo", "--quick", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"

    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "accuracy.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = ["baseline", "honest LIME", "LIME", "LIME+1"]
    assert list(rows[0]) == ["step", "tokens", *names]
    assert [row["step"] for row in rows] == ["0", "2", "4"]
    lines = result.stdout.splitlines()
    header = lines.index("Held-out next-token accuracy:") + 1
    # Every column names its model and, below, the tags that model read on the held-out text.
    assert lines[header].split() == ["baseline", "honest", "LIME", "LIME", "LIME+1"]
    assert re.split(r" {2,}", lines[header + 1].strip()) == [
        "step",
        "tokens",
        "no tags",
        "own tags",
        "spaCy tags",
        "true next tags",
    ]
    for row, line in zip(rows, lines[header + 2 : header + 5], strict=True):  # the same numbers, in percent
        assert line.split() == [row["step"], f"{int(row['tokens']):,}"] + [
            f"{100 * float(row[name]):.2f}%" for name in names
        ]
    assert "Final held-out next-token accuracy (the tags each model read):" in result.stdout
    gain = 100 * (float(rows[-1]["honest LIME"]) - float(rows[-1]["baseline"]))
    assert f"predicted in the same forward pass), ends {gain:+.2f} points from the baseline." in result.stdout
    assert "Guided generation with the LIME+1 model" in result.stdout
    assert "spaCy finds the asked tag on" in result.stdout

    model = AutoModelForCausalLM.from_pretrained(out / "lime-plus-1")
    tokenizer = AutoTokenizer.from_pretrained(out / "lime-plus-1")
    assert isinstance(model, LimeForCausalLM) and model.config.metadata_shift == 1
    assert isinstance(tokenizer, LimeTokenizer)
    assert tokenizer.metadata_fields == model.config.metadata_fields

    # Honest LIME: its tags join at layer 1 of 2, from its own heads; the self-tagged text it printed is what the
    # saved model writes from the prompt's input_ids alone, with the POS tags it printed.
    honest = AutoModelForCausalLM.from_pretrained(out / "honest-lime")
    assert honest.config.metadata_layer == 1 and honest.config.tag_head_fields == ["pos", "ner"]
    ids = tokenizer("After these things", return_tensors="pt")["input_ids"]
    written = honest.generate(input_ids=ids, max_new_tokens=2, do_sample=False)[0]
    assert f"  honest LIME, self-tagged: {tokenizer.decode(written)!r}" in result.stdout
    own_pos = honest(input_ids=written[None]).fed_metadata_ids["pos"][0, ids.shape[1] :]
    labels = " ".join(honest.config.metadata_fields["pos"][tag] for tag in own_pos.tolist())
    assert f"honest LIME's own POS tags of the new tokens: {labels}" in result.stdout


TINY_LLAMA_JSON = (
    '{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, '
    '"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}'
)


def test_train_logs_loss_and_learning_rate_says_where_it_saved_and_warns_of_a_small_vocabulary(tmp_path):
    (tmp_path / "small.txt").write_text(
        (AUSTEN / "emma.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8"
    )
    result = run_cli(
        "train", "small.txt", "--train-tokenizer", "8000", "--model-config", TINY_LLAMA_JSON, "--block-size", "64",
        "--max-steps", "4", "--per-device-train-batch-size", "4", "--output-dir", "run", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    logs = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{'loss'")]
    assert [sorted(log) for log in logs] == [
        ["epoch", "grad_norm", "learning_rate", "loss"]
    ] * 4  # every step
    assert all(isinstance(log[key], float) for log in logs for key in log)  # numbers, not strings
    assert logs[0]["learning_rate"] > logs[-1]["learning_rate"] > 0  # the linear decay
    assert re.search(
        r"^Read [\d,]+ documents \([\d,]+ words\) from small.txt: one per paragraph \(--sample-by paragraph, the "
        r"default; line, paragraph or document\)$",
        result.stdout,
        flags=re.MULTILINE,
    )
    assert re.search(
        r"^Packed [\d,]+ training tokens into [\d,]+ blocks of up to 64; model: ", result.stdout, re.M
    )
    assert result.stdout.rstrip().endswith("Saved the model, its tokenizer and the metrics to run")
    vocabulary = len(AutoTokenizer.from_pretrained(tmp_path / "run"))
    assert vocabulary < 8000
    assert (
        f"--train-tokenizer 8000: the corpus is too small for that many tokens; the BPE learned every merge it offers and has {vocabulary} tokens, not 8000."
        in result.stderr
    )
    assert "pin_memory" not in result.stderr


@pytest.mark.parametrize("use_cpu", [False, True])
def test_train_runs_on_the_machines_accelerator_unless_told_use_cpu(use_cpu, tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("Emma was happy.\n", encoding="utf-8")
    argv = [str(corpus), "--train-tokenizer", "400", "--output-dir", str(tmp_path)]
    args, training_args = train.parse_args(argv + (["--use_cpu"] if use_cpu else []))
    # The Trainer takes the machine's accelerator (a CUDA GPU, ...) unless told `--use_cpu`.
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    expected = "cpu" if use_cpu or accelerator is None else accelerator.type
    assert training_args.device.type == expected  # LimeTrainer turns pinned memory off on the CPU
    assert training_args.logging_steps == 0.05 and training_args.logging_first_step
    assert args.sources == [str(corpus)] and args.train_tokenizer == 400


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a `format_table` table (columns split on runs of two or more spaces)."""
    lines = text.splitlines()
    rule = next(index for index, line in enumerate(lines) if line.startswith("-"))
    rows = []
    for line in lines[rule + 1 :]:
        if not line.strip():
            break
        rows.append(re.split(r" {2,}", line.strip()))
    return rows


def test_generate_show_tags_prints_the_fed_and_the_found_tags(lime_plus_one_dir, annotator, tmp_path):
    prompt, schedule = "Emma was", ["NNP", "VBD", "DT"]
    result = run_cli(
        "generate", lime_plus_one_dir, prompt, "--guide", "pos=" + ",".join(schedule), "--max-new-tokens", 4,
        "--show-tags", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokenizer = share_annotator(AutoTokenizer.from_pretrained(lime_plus_one_dir), annotator)
    model = AutoModelForCausalLM.from_pretrained(lime_plus_one_dir)
    encoding = tokenizer(prompt, return_tensors="pt")
    ids = model.generate(**encoding, guidance={"pos": [schedule]}, max_new_tokens=4, do_sample=False)[
        0
    ].tolist()
    start = encoding["input_ids"].shape[1]
    found = tokenizer.metadata_for_ids(ids)
    labels = tokenizer.metadata_fields

    assert result.stdout.splitlines()[0] == tokenizer.decode(ids, skip_special_tokens=True)
    columns = result.stdout.splitlines()[1].split("  ")
    header = ["#", "token", *(kind for name in labels for kind in (f"{name} fed", "from", f"{name} spaCy"))]
    assert [column.strip() for column in columns if column.strip()] == header
    rows = table_rows(result.stdout)
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    assert [row[1] for row in rows] == [repr(tokenizer.decode([token])) for token in ids[start:]]
    columns = {
        name: [row[2 + 3 * index : 5 + 3 * index] for row in rows] for index, name in enumerate(labels)
    }
    # guidance, then LIME+1's default provider; ner was not guided
    assert [(fed, source) for fed, source, _ in columns["pos"]] == [
        *((s, "guide") for s in schedule),
        ("<unk>", "unknown"),
    ]
    assert [(fed, source) for fed, source, _ in columns["ner"]] == [("<unk>", "unknown")] * 4
    for name in labels:
        assert [spacy for _, _, spacy in columns[name]] == [labels[name][tag] for tag in found[name][start:]]
    assert (
        "note: --guide pos gives 3 label(s) for up to 4 new tokens: the first 3 follow it, the rest take their pos "
        "tags from the provider (unknown); repeat a label to hold it (pos=DT,DT,DT,...)" in result.stderr
    )
    agree = sum(asked == spacy for asked, (_, _, spacy) in zip(schedule, columns["pos"], strict=False))
    assert f"spaCy finds the asked pos tag on {agree} of 3 guided tokens." in result.stdout


@pytest.mark.parametrize(
    "options, settings",
    [
        (["--num-beams", "2", "--num-return-sequences", "2"], dict(num_beams=2, num_return_sequences=2)),
        (["--top-k", "5", "--seed", "3"], dict(do_sample=True, top_k=5)),
        (
            ["--temperature", "0.7", "--top-p", "0.9", "--seed", "1"],
            dict(do_sample=True, temperature=0.7, top_p=0.9),
        ),
    ],
)
def test_generate_decoding_options_match_generate(options, settings, lime_plus_one_dir, annotator, tmp_path):
    prompt = "Emma was"
    result = run_cli(
        "generate",
        lime_plus_one_dir,
        prompt,
        "--guide",
        "pos=DT,NN",
        "--max-new-tokens",
        5,
        *options,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    tokenizer = share_annotator(AutoTokenizer.from_pretrained(lime_plus_one_dir), annotator)
    model = AutoModelForCausalLM.from_pretrained(lime_plus_one_dir).eval()
    set_seed(int(options[options.index("--seed") + 1]) if "--seed" in options else 0)
    output = model.generate(
        **tokenizer(prompt, return_tensors="pt"),
        guidance={"pos": [["DT", "NN"]]},
        max_new_tokens=5,
        **settings,
    )
    expected = tokenizer.batch_decode(output, skip_special_tokens=True)
    assert result.stdout == "".join(f"{text}\n" for text in expected)
    assert len(expected) == settings.get("num_return_sequences", 1)


@pytest.mark.parametrize("alignment", ["pretokenized", "offsets"])
def test_tag_prints_every_token_with_its_tags(alignment, bpe_tokenizer, annotator, tmp_path):
    bpe_tokenizer.save_pretrained(tmp_path / "bpe")  # a plain fast tokenizer: `tag` wraps it
    text = "Emma Woodhouse lived in Highbury."
    result = run_cli("tag", text, "--tokenizer", "bpe", "--alignment", alignment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tokenizer = share_annotator(LimeTokenizer.from_tokenizer(bpe_tokenizer, alignment=alignment), annotator)
    encoding = tokenizer(text, return_offsets_mapping=True)
    labels = tokenizer.metadata_fields
    assert result.stdout.splitlines()[0] == f"{len(encoding['input_ids'])} tokens, alignment {alignment!r}:"
    expected = [
        [
            str(index),
            repr(tokenizer.decode([token])),
            str(token),
            f"{start}-{end}",
            labels["pos"][pos],
            labels["ner"][ner],
        ]
        for index, (token, (start, end), pos, ner) in enumerate(
            zip(
                encoding["input_ids"],
                encoding["offset_mapping"],
                encoding["pos_ids"],
                encoding["ner_ids"],
                strict=True,
            )
        )
    ]
    assert table_rows(result.stdout) == expected
    assert [row[4] for row in expected[:3]] == ["NNP", "NNP", "NNP"] and expected[-1][4] == "."


def test_the_cli_copies_of_the_tokenizer_names_agree_with_the_library():
    """`lime_hf.options` repeats them so that the parsers need not import the tokenizer (torch, transformers)."""
    assert ALIGNMENTS == tokenization_lime.ALIGNMENTS and tuple(BUILTIN_FIELDS) == FIELDS


def test_annotate_causal_writes_prefix_only_tags_and_says_so(tmp_path):
    text = "Emma Woodhouse lived in Highbury. She saw the duck."
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    result = run_cli("annotate", "a.txt", "--output", "annotated", "--causal", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Annotated 1 texts with causal (prefix-only) pos, ner" in result.stdout
    annotated = load_from_disk(str(tmp_path / "annotated"))
    assert annotated["lime_causal"] == [True]
    causal = SpacyAnnotator(("pos", "ner"), causal=True)([annotated[0]["text"]])[0]
    assert annotated[0]["lime_pos"] == causal["pos"] and annotated[0]["lime_ner"] == causal["ner"]
