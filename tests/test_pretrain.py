"""The pretraining script end to end: real spaCy, tokenizers trained here, the real Trainer, real processes."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    EvalPrediction,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lime_hf import LimeConfig, LimeForCausalLM, LimeTokenizer
from lime_hf.cli.train import main
from lime_hf.collator import DataCollatorForLime
from lime_hf.pretrain import check_launch, load_texts, prepare_lm_dataset
from lime_hf.trainer import LimeTrainer, compute_next_token_accuracy
from tests.conftest import AUSTEN
from tests.test_custom_field import Capitalised

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two small text files (~8k characters of Emma and of Persuasion) and a datasets cache beside them."""
    folder = tmp_path_factory.mktemp("corpus")
    for name in ("emma", "persuasion"):
        text = (AUSTEN / f"{name}.txt").read_text(encoding="utf-8")
        (folder / f"{name}.txt").write_text(text[2_000:10_000], encoding="utf-8")
    return folder


def pretrain_args(corpus: Path, output_dir: Path, *options: str) -> list[str]:
    """The script's command line: the two files, a tiny Llama, 64-token blocks, quick optimisation."""
    return [
        str(corpus / "emma.txt"),
        str(corpus / "persuasion.txt"),
        "--model-config",
        json.dumps(TINY_LLAMA),
        "--block-size",
        "64",
        "--cache-dir",
        str(corpus / "cache"),
        "--output-dir",
        str(output_dir),
        "--per-device-train-batch-size",
        "8",
        "--learning-rate",
        "3e-3",
        "--logging-steps",
        "1",
        *options,
    ]


class KeepTrained(TrainerCallback):
    """Holds on to the in-memory model and tokenizer at the end of training, and to the evaluation batches."""

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.model, self.tokenizer = model, processing_class

    def on_evaluate(self, args, state, control, eval_dataloader=None, **kwargs):
        self.eval_batches = list(eval_dataloader)


def next_token_accuracy_by_hand(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]
) -> tuple[float, int]:
    """The share of labelled positions whose next token is the argmax of the logits before it, and their count."""
    device = next(model.parameters()).device
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            predicted = model(**batch).logits[:, :-1].argmax(-1)
            labels = batch["labels"][:, 1:]
            scored = labels != -100
            correct += (predicted == labels)[scored].sum().item()
            total += scored.sum().item()
    return correct / total, total


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[Path, KeepTrained]:
    """One run: BPE trained on the corpus, 20% of the paragraphs held out, 10 steps, checkpoints every 5."""
    output_dir = tmp_path_factory.mktemp("run")
    kept = KeepTrained()
    options = ("--train-tokenizer", "400", "--eval-fraction", "0.2", "--max-steps", "10", "--save-steps", "5")
    main(pretrain_args(corpus, output_dir, *options), callbacks=[kept])
    return output_dir, kept


@pytest.fixture(scope="module")
def saved_tokenizer(bpe_tokenizer, tmp_path_factory) -> Path:
    """A saved LimeTokenizer (the session's BPE, wrapped)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    LimeTokenizer.from_tokenizer(bpe_tokenizer).save_pretrained(folder)
    return folder


def test_run_writes_model_tokenizer_checkpoints_and_metrics(trained):
    output_dir, kept = trained
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "modeling_lime.py",
    ):
        assert (output_dir / name).is_file(), name
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 10 and losses[-1] < losses[0]
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
    # Ten steps learned: the held-out loss is below the first step's training loss (ln 400 = 6.0 at the start,
    # every token equally likely), though not near certainty.
    assert metrics["eval_perplexity"] > 1.0 and metrics["eval_loss"] < losses[0] - 0.2
    # The accuracy the Trainer reported, counted here on the same evaluation batches (one position may flip
    # between GPU kernels).
    accuracy, scored = next_token_accuracy_by_hand(kept.model, kept.eval_batches)
    assert metrics["eval_accuracy"] == pytest.approx(accuracy, abs=1 / scored) and scored > 1000


def test_saved_model_and_tokenizer_reload_through_the_auto_classes(trained):
    output_dir, kept = trained
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    assert isinstance(tokenizer, LimeTokenizer) and isinstance(model, LimeForCausalLM)
    assert tokenizer.get_vocab() == kept.tokenizer.get_vocab() and len(tokenizer) == 400
    assert model.config.metadata_fields == tokenizer.metadata_fields
    text = "Emma Woodhouse smiled at Mr. Knightley in Highbury."
    batch = tokenizer(text, return_tensors="pt")
    assert {key: value.tolist() for key, value in batch.items()} == {
        key: value.tolist() for key, value in kept.tokenizer(text, return_tensors="pt").items()
    }
    in_memory = copy.deepcopy(kept.model).to("cpu").eval()  # the Trainer put it on the accelerator, if any
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, in_memory(**batch).logits)


def test_next_token_accuracy_scores_the_shifted_labels():
    labels = np.array([[5, 6, 7, 8], [5, 9, -100, -100]])
    # Row 0 predicts 6, 0, 8 for 6, 7, 8; row 1 predicts 9 for 9 (the rest is padding).
    predictions = np.array([[6, 0, 8, 1], [9, 3, 3, -100]])
    metrics = compute_next_token_accuracy(EvalPrediction(predictions=predictions, label_ids=labels))
    assert metrics == {"accuracy": 3 / 4}


def test_resume_continues_from_the_checkpoint(corpus, saved_tokenizer, tmp_path):
    """Stop at step 4, resume to step 6: the same weights as six uninterrupted steps.

    On the CPU: the comparison is bit for bit, which GPU kernels (atomic adds in backward passes) do not promise.
    """
    options = ("--tokenizer", str(saved_tokenizer), "--lr-scheduler-type", "constant", "--save-steps", "2")
    options += ("--use_cpu",)
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    main(pretrain_args(corpus, resumed, *options, "--max-steps", "4"))
    shutil.rmtree(resumed / "checkpoint-2")  # a run from scratch would write it again
    main(pretrain_args(corpus, resumed, *options, "--max-steps", "6", "--resume"))
    main(pretrain_args(corpus, straight, *options, "--max-steps", "6"))

    assert sorted(path.name for path in resumed.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    straight_state = json.loads((straight / "trainer_state.json").read_text())
    assert [entry.get("loss") for entry in state["log_history"][:6]] == [
        entry.get("loss") for entry in straight_state["log_history"][:6]
    ]
    weights, expected = load_file(resumed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_custom_field_columns_survive_remove_unused_columns(bpe_tokenizer, corpus_lines, tmp_path):
    """`cap_ids` (a custom field, a `**kwargs` input) is dropped by `Trainer`, kept by `LimeTrainer`."""
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer, fields=("pos", "ner", Capitalised()))
    blocks = prepare_lm_dataset(Dataset.from_dict({"text": corpus_lines[:12]}), tokenizer, block_size=32)
    assert set(blocks.column_names) == {"input_ids", "attention_mask", "pos_ids", "ner_ids", "cap_ids"}
    text_config = {**TINY_LLAMA, "vocab_size": len(tokenizer)}
    model = LimeForCausalLM(LimeConfig(text_config=text_config, metadata_fields=tokenizer.metadata_fields))
    seen: list[dict[str, torch.Tensor]] = []  # the keyword arguments of every forward call
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
    )
    assert args.remove_unused_columns
    setup = dict(
        model=model,
        args=args,
        train_dataset=blocks,
        eval_dataset=blocks.select(range(4)),
        data_collator=DataCollatorForLime(tokenizer),
    )

    with pytest.raises(ValueError, match=r"lack the metadata columns \['cap_ids'\]"):
        Trainer(**setup).train()
    assert not seen

    trainer = LimeTrainer(**setup)
    trainer.train()
    metrics = trainer.evaluate()
    assert len(seen) == 2 and all({"pos_ids", "ner_ids", "cap_ids"} <= set(kwargs) for kwargs in seen)
    upper, lower = (tokenizer.metadata_fields["cap"].index(label) for label in ("UPPER", "LOWER"))
    assert all({upper, lower} <= set(kwargs["cap_ids"].unique().tolist()) for kwargs in seen)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def test_load_texts_reads_paragraphs_and_datasets(tmp_path):
    (tmp_path / "a.txt").write_text("Emma smiled.\n\nShe was\nhappy.\n\n\n  \n\nThe end.", encoding="utf-8")
    texts = load_texts([str(tmp_path / "a.txt")], cache_dir=str(tmp_path / "cache"))
    assert texts.column_names == ["text"] and texts["text"] == ["Emma smiled.", "She was\nhappy.", "The end."]

    saved = tmp_path / "saved"
    DatasetDict(
        {
            "train": Dataset.from_dict({"body": ["One.", " ", "Two."], "id": [1, 2, 3]}),
            "test": Dataset.from_dict({"body": ["x"], "id": [4]}),
        }
    ).save_to_disk(saved)
    texts = load_texts([str(saved)], text_column="body")
    assert texts.column_names == ["text"] and texts["text"] == ["One.", "Two."]
    with pytest.raises(ValueError, match=r"no split 'validation'; it has \['train', 'test'\]"):
        load_texts([str(saved)], split="validation", text_column="body")
    with pytest.raises(ValueError, match=r"no column 'text'.*--text-column"):
        load_texts([str(saved)])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--train-tokenizer", "400", "--tokenizer", "x"], "exactly one of --tokenizer"),
        (["--train-tokenizer", "100"], "--train-tokenizer 100 is too small"),
        (["--train-tokenizer", "400", "--block-size", "4096"], r"--block-size 4096 is not allowed.*\(128\)"),
        (["--train-tokenizer", "400", "--from-backbone", "x"], "either --model-config .* or --from-backbone"),
        (["--train-tokenizer", "400", "--eval-fraction", "1.5"], "strictly between 0 and 1"),
        (
            ["--train-tokenizer", "400", "--eval-file", "{corpus}/emma.txt", "--eval-fraction", "0.1"],
            "not both",
        ),
    ],
)
def test_bad_options_are_clear_errors(options, message, corpus, tmp_path):
    argv = pretrain_args(corpus, tmp_path, *(option.format(corpus=corpus) for option in options))
    with pytest.raises(ValueError, match=message):
        main(argv)


def test_bad_sources_and_configs_are_clear_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="No sources given"):
        load_texts([])
    with pytest.raises(ValueError, match=r"No such text file\(s\): \['missing.txt'\]"):
        load_texts(["missing.txt"])
    with pytest.raises(ValueError, match="Mixed sources"):
        load_texts([str(corpus / "emma.txt"), "some/dataset"])
    with pytest.raises(ValueError, match="Cannot load '.*nowhere'.*Couldn't find any data file"):
        load_texts([str(tmp_path / "nowhere")])
    argv = pretrain_args(corpus, tmp_path, "--train-tokenizer", "400")
    argv[argv.index("--model-config") + 1] = "{hidden_size: 32}"
    with pytest.raises(ValueError, match="neither a JSON file nor a JSON object"):
        main(argv)


def test_inventory_mismatch_names_both(bpe_tokenizer, tmp_path):
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer, fields=("pos", "ner", Capitalised()))
    config = LimeConfig(text_config={**TINY_LLAMA, "vocab_size": len(tokenizer)})
    with pytest.raises(ValueError, match=r"differ in field 'cap': tokenizer \['<pad>', .*\], model None"):
        LimeTrainer(
            model=LimeForCausalLM(config),
            args=TrainingArguments(output_dir=str(tmp_path), report_to=[]),
            processing_class=tokenizer,
        )


def test_the_demo_scores_honest_lime_on_its_own_tags(lime_pretokenized, corpus_lines, tmp_path):
    """The demo's honest curve: `OwnTagsEvaluation` trains on the batches' tags but evaluates on `input_ids` alone,
    so a `metadata_layer` model reads the tags its heads predict (not spaCy's) on the held-out text."""
    from lime_hf.demo import OwnTagsEvaluation
    from lime_hf.pretrain import build_model

    blocks = prepare_lm_dataset(Dataset.from_dict({"text": corpus_lines[:12]}), lime_pretokenized, 32)
    blocks = blocks.select(range(4))
    torch.manual_seed(0)
    model = build_model(
        lime_pretokenized,
        model_config=json.dumps(TINY_LLAMA),
        tag_head_fields=("pos", "ner"),
        metadata_layer=1,
    )
    collator = DataCollatorForLime(lime_pretokenized)
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, report_to="none", use_cpu=True)
    trainer = OwnTagsEvaluation(model=model, args=args, eval_dataset=blocks, data_collator=collator)
    evaluated = trainer.evaluate()["eval_loss"]

    batch = collator(list(blocks))
    untagged = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        own = model.eval()(**untagged)
        given = model(**batch)
    assert evaluated == pytest.approx(own.loss.item(), rel=1e-5)
    assert not own.tag_losses  # no tags given: nothing to score the heads against, and the loss is the LM's
    assert not torch.equal(own.fed_metadata_ids["pos"], batch["pos_ids"])  # it read its own tags, not spaCy's
    assert own.lm_loss.item() != pytest.approx(given.lm_loss.item(), rel=1e-4)


def test_a_launch_the_trainer_does_not_join_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="started 2 processes, but the Trainer sees a world of 1.*--use_cpu"):
        check_launch(SimpleNamespace(world_size=1))


RANK_SCRIPT = """
import sys

import torch
from transformers import TrainerCallback

from lime_hf.cli.train import main


class SaveRankState(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        torch.save(
            {
                "world_size": args.world_size,
                "global_step": state.global_step,
                "vocab": processing_class.get_vocab(),
                "state_dict": model.state_dict(),
            },
            f"{args.output_dir}/rank{args.process_index}.pt",
        )


main(sys.argv[1:], callbacks=[SaveRankState()])
"""


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")  # one at a time: launchers and Ray take fixed ports
@pytest.mark.parametrize(
    "launcher",
    [
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no"],
        ["torchrun", "--nproc_per_node", "2"],
    ],
    ids=["accelerate", "torchrun"],
)  # fmt: skip
def test_two_processes_train_one_model(launcher, corpus, tmp_path):
    """Two CPU (gloo) processes: one tokenizer, one set of weights, equal to the saved model."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT), encoding="utf-8")
    output_dir = tmp_path / "out"
    options = ("--train-tokenizer", "400", "--eval-fraction", "0.2", "--max-steps", "3", "--use_cpu")
    command = [str(Path(sys.executable).parent / launcher[0]), *launcher[1:], str(script)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [*command, *pretrain_args(corpus, output_dir, *options)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    ranks = [torch.load(output_dir / f"rank{rank}.pt") for rank in (0, 1)]
    assert [report["world_size"] for report in ranks] == [2, 2]
    assert [report["global_step"] for report in ranks] == [3, 3]
    assert ranks[0]["vocab"] == ranks[1]["vocab"]
    saved = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()
    for name, tensor in saved.items():
        assert torch.equal(ranks[0]["state_dict"][name], tensor) and torch.equal(
            ranks[1]["state_dict"][name], tensor
        )
    # The two processes trained together: the held-out loss is below the first step's training loss.
    losses = [
        entry["loss"]
        for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    assert len(losses) == 3
    assert json.loads((output_dir / "eval_results.json").read_text())["eval_loss"] < losses[0]


def test_push_to_hub_commits_model_tokenizer_and_the_lime_card(corpus, tmp_path, hub):
    options = ("--train-tokenizer", "400", "--eval-fraction", "0.2", "--max-steps", "2")
    hub_options = ("--push_to_hub", "--hub_model_id", "fake-user/lime-pretrained")
    main(pretrain_args(corpus, tmp_path / "run", *options, *hub_options))
    assert [message for _, message in hub.commits] == ["Model save"]  # one commit, after evaluation
    pushed = hub.folder("fake-user/lime-pretrained")
    for name in ("model.safetensors", "config.json", "modeling_lime.py", "tokenizer.json", "README.md"):
        assert (pushed / name).is_file(), name
    card = (pushed / "README.md").read_text()
    metrics = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert "emma.txt" in card and "persuasion.txt" in card
    for name in ("eval_accuracy", "eval_perplexity"):
        assert f"| {name} | {metrics[name]:.4g} |" in card
