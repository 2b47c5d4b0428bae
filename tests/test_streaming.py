"""Streaming training: shard folders and on-the-fly packing read as training needs them, each rank and dataloader
worker its own blocks, resumed at the next unseen block; the real Trainer, real processes, real spaCy."""

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import TrainingArguments

from lime_hf import DataCollatorForLime, LimeConfig, LimeForCausalLM, LimeTokenizer
from lime_hf.cli.train import main
from lime_hf.data import align_dataset, annotate_dataset, pack_dataset
from lime_hf.meta_tokens import add_meta_tokens
from lime_hf.pretrain import prepare_lm_dataset
from lime_hf.shards import Manifest, write_shards
from lime_hf.streaming import StreamingLimeTrainer, document_stream, shard_stream
from tests.test_cli import run_cli
from tests.test_pretrain import TINY_LLAMA

REPO = Path(__file__).resolve().parents[1]
BLOCK = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def annotated(corpus_lines, annotator) -> Dataset:
    """About 300 paragraphs of Emma with their spaCy spans."""
    return annotate_dataset(Dataset.from_dict({"text": corpus_lines[:300]}), annotator)


@pytest.fixture(scope="module")
def blocks(annotated, lime_pretokenized) -> Dataset:
    return prepare_lm_dataset(annotated, lime_pretokenized, BLOCK)


@pytest.fixture(scope="module")
def shards(blocks, lime_pretokenized, tmp_path_factory) -> Path:
    """The blocks in 3 shard files of unequal sizes."""
    folder = tmp_path_factory.mktemp("shards")
    write_shards(blocks, folder, lime_pretokenized, BLOCK, num_shards=3)
    return folder


@pytest.fixture(scope="module")
def saved_tokenizer(lime_pretokenized, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    lime_pretokenized.save_pretrained(folder)
    return folder


def ids(rows) -> list[tuple[int, ...]]:
    return [tuple(row["input_ids"]) for row in rows]


def tiny_model(tokenizer: LimeTokenizer, **lime_kwargs) -> LimeForCausalLM:
    torch.manual_seed(0)
    text_config = {**TINY_LLAMA, "vocab_size": len(tokenizer)}
    return LimeForCausalLM(
        LimeConfig(text_config=text_config, metadata_fields=tokenizer.metadata_fields, **lime_kwargs)
    )


# ---- The blocks ------------------------------------------------------------------------------------------------


def test_a_shard_stream_gives_the_packed_blocks_in_order(shards, blocks, lime_pretokenized):
    rows = list(shard_stream(shards, lime_pretokenized).dataset())
    assert len(rows) == len(blocks)
    for column in ("input_ids", "pos_ids", "ner_ids", "attention_mask"):
        assert [row[column] for row in rows] == blocks[column]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_read_disjoint_equal_shares_that_cover_the_blocks(
    shards, blocks, lime_pretokenized, world_size
):
    """Contiguous equal ranges; only the last `total % world_size` blocks are left out."""
    stream = shard_stream(shards, lime_pretokenized, world_size=world_size)
    shares = [ids(stream.dataset(rank)) for rank in range(world_size)]
    per_rank = len(blocks) // world_size
    assert [len(share) for share in shares] == [per_rank] * world_size
    assert sum(shares, []) == ids(blocks)[: per_rank * world_size]


def test_dataloader_workers_read_disjoint_units_that_cover_the_rank(shards, blocks, lime_pretokenized):
    stream = shard_stream(shards, lime_pretokenized, world_size=2, num_workers=2)
    seen = []
    for rank in range(2):
        loader = DataLoader(stream.dataset(rank), batch_size=5, num_workers=2, collate_fn=list)
        seen += [block for batch in loader for block in ids(batch)]
    assert sorted(seen) == sorted(ids(blocks)[: len(blocks) // 2 * 2])
    assert len(set(seen)) == len(set(ids(blocks)))  # no block twice (the blocks themselves are distinct)


@pytest.mark.parametrize("source", ["dataset", "iterable", "aligned"])
def test_on_the_fly_packing_gives_the_map_path_blocks(annotated, lime_pretokenized, source):
    expected = pack_dataset(
        align_dataset(annotated, lime_pretokenized), BLOCK, lime_pretokenized.eos_token_id, batch_size=64
    )
    documents = {
        "dataset": annotated,
        "iterable": annotated.to_iterable_dataset(num_shards=1),
        "aligned": align_dataset(annotated, lime_pretokenized),
    }[source]
    rows = list(document_stream(documents, lime_pretokenized, BLOCK, pack_batch_size=64).dataset())
    for column in ("input_ids", "pos_ids", "ner_ids"):
        assert [row[column] for row in rows] == expected[column]


def test_on_the_fly_ranks_share_the_document_batches(annotated, lime_pretokenized):
    stream = document_stream(annotated, lime_pretokenized, BLOCK, world_size=2, pack_batch_size=64)
    shares = [ids(stream.dataset(rank)) for rank in range(2)]
    aligned = align_dataset(annotated, lime_pretokenized)
    expected = ids(pack_dataset(aligned, BLOCK, lime_pretokenized.eos_token_id, batch_size=64))
    assert sorted(shares[0] + shares[1]) == sorted(expected) and not set(shares[0]) & set(shares[1])


@pytest.mark.parametrize(("kind", "num_workers"), [("shards", 0), ("shards", 2), ("documents", 2)])
def test_resume_skips_start_each_unit_at_its_first_unseen_block(
    shards, annotated, lime_pretokenized, kind, num_workers
):
    """The dataloader's own order (workers in turn, uneven units spent early) continues after the skips."""
    if kind == "shards":
        stream = shard_stream(shards, lime_pretokenized, world_size=2, num_workers=num_workers)
    else:  # 5 batches of 64 documents for 2 ranks: rank 0 has 3 units, its workers 2 and 1
        stream = document_stream(annotated, lime_pretokenized, BLOCK, world_size=2, pack_batch_size=64)

    def batches(dataset):
        loader = DataLoader(dataset, batch_size=4, num_workers=num_workers, collate_fn=ids)
        return list(loader)

    whole = batches(stream.dataset(0, num_workers))
    for done in (1, 6, 7, len(whole) - 2):
        resume = stream.resume_at(0, done, batch_size=4, num_workers=num_workers)
        assert batches(stream.dataset(0, num_workers, resume)) == whole[done:]


# ---- Bad manifests -----------------------------------------------------------------------------------------------


def test_a_manifest_of_another_tokenizer_or_other_inventories_is_refused(
    shards, lime_pretokenized, wordpiece_tokenizer, tmp_path
):
    with pytest.raises(ValueError, match="were made with the tokenizer"):
        shard_stream(shards, LimeTokenizer.from_tokenizer(wordpiece_tokenizer))
    model_fields = {"pos": lime_pretokenized.metadata_fields["pos"]}
    with pytest.raises(ValueError, match="differ from the model's: 'ner' is only in the shards"):
        shard_stream(shards, lime_pretokenized, fields=model_fields)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        shard_stream(tmp_path, lime_pretokenized)


def test_the_trainer_refuses_a_model_of_other_inventories(shards, lime_pretokenized, tmp_path):
    stream = shard_stream(shards, lime_pretokenized)
    model = tiny_model(lime_pretokenized)
    model.config.metadata_fields = {"pos": lime_pretokenized.metadata_fields["pos"]}
    args = TrainingArguments(tmp_path, max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="differ from the model's"):
        StreamingLimeTrainer(model=model, args=args, train_stream=stream)


@pytest.mark.slow
def test_cli_errors_are_one_line_and_exit_2(shards, saved_tokenizer, wordpiece_tokenizer, tmp_path):
    other = tmp_path / "other-tokenizer"
    LimeTokenizer.from_tokenizer(wordpiece_tokenizer).save_pretrained(other)
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(manifest | {"version": 99}))
    cases = {
        "needs --max-steps": ["--shards", shards, "--tokenizer", saved_tokenizer],
        "not a shard folder": ["--shards", tmp_path, "--tokenizer", saved_tokenizer, "--max-steps", "2"],
        "were made with the tokenizer": ["--shards", shards, "--tokenizer", other, "--max-steps", "2"],
        "of version 1": ["--shards", broken, "--tokenizer", saved_tokenizer, "--max-steps", "2"],
        "not .txt files": ["x.txt", "--streaming", "--tokenizer", saved_tokenizer, "--max-steps", "2"],
    }
    (tmp_path / "x.txt").write_text("Some text.\n", encoding="utf-8")
    for message, args in cases.items():
        result = run_cli("train", *args, "--output-dir", tmp_path / "out", "--use-cpu", cwd=tmp_path)
        assert result.returncode == 2, (message, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], (message, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


# ---- Training ------------------------------------------------------------------------------------------------


class Recording(DataCollatorForLime):
    """The collator, keeping every batch it makes."""

    def __call__(self, features):
        batch = super().__call__(features)
        self.batches = [*getattr(self, "batches", []), batch]
        return batch


def test_dropout_meta_tokens_and_tag_heads_train_on_the_stream(blocks, lime_pretokenized, tmp_path):
    tokenizer = copy.deepcopy(lime_pretokenized)
    (meta_id,) = add_meta_tokens(tokenizer)
    write_shards(blocks, tmp_path / "shards", tokenizer, BLOCK, num_shards=2)
    model = tiny_model(tokenizer, tag_head_fields=["pos"], meta_token_ids=[meta_id])
    collator = Recording(tokenizer, metadata_dropout=0.5, meta_token_id=meta_id, meta_fraction=0.1, seed=0)
    trainer = StreamingLimeTrainer(
        model=model,
        args=TrainingArguments(
            tmp_path / "out", max_steps=3, per_device_train_batch_size=4, report_to="none", use_cpu=True,
            logging_steps=1,
        ),
        train_stream=shard_stream(tmp_path / "shards", tokenizer, model.config.metadata_fields),
        data_collator=collator,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 3
    first = collator.batches[0]
    assert first["input_ids"].shape == (4, BLOCK + 3)  # round(0.1 * 32) meta-tokens per block
    assert ((first["input_ids"] == meta_id) == (first["labels"] == -100)).all()
    real = torch.tensor(blocks["pos_ids"][:4]) > 2
    assert (first["pos_ids"] == 1).sum() > 0.3 * real.sum()  # half of the real tags hidden
    assert all("pos_tag_loss" in entry for entry in trainer.state.log_history[:3])
    meta_free = first["input_ids"][first["input_ids"] != meta_id].view(4, BLOCK)
    assert meta_free.tolist() == blocks["input_ids"][:4]  # the first blocks, in order


def stream_args(shards: Path, tokenizer: Path, output_dir: Path, *options: str) -> list[str]:
    return [
        "--shards", str(shards), "--tokenizer", str(tokenizer), "--model-config", json.dumps(TINY_LLAMA),
        "--output-dir", str(output_dir), "--per-device-train-batch-size", "4", "--learning-rate", "3e-3",
        "--lr-scheduler-type", "constant", "--logging-steps", "1", "--save-steps", "2", "--use_cpu", *options,
    ]  # fmt: skip


def test_resume_continues_at_the_next_unseen_block(shards, saved_tokenizer, tmp_path):
    """Stop at step 4, resume to step 7: bitwise the weights of 7 uninterrupted steps (CPU, constant rate)."""
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    main(stream_args(shards, saved_tokenizer, resumed, "--max-steps", "4"))
    shutil.rmtree(resumed / "checkpoint-2")
    main(stream_args(shards, saved_tokenizer, resumed, "--max-steps", "7", "--resume"))
    main(stream_args(shards, saved_tokenizer, straight, "--max-steps", "7"))
    state = json.loads((resumed / "trainer_state.json").read_text())
    straight_state = json.loads((straight / "trainer_state.json").read_text())
    assert state["global_step"] == 7
    assert [e.get("loss") for e in state["log_history"][:7]] == [
        e.get("loss") for e in straight_state["log_history"][:7]
    ]
    weights, expected = load_file(resumed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_streaming_a_saved_annotated_dataset_from_the_command_line(annotated, saved_tokenizer, tmp_path):
    annotated.save_to_disk(tmp_path / "annotated")
    output = tmp_path / "out"
    main([
        str(tmp_path / "annotated"), "--streaming", "--tokenizer", str(saved_tokenizer), "--block-size", str(BLOCK),
        "--model-config", json.dumps(TINY_LLAMA), "--output-dir", str(output), "--max-steps", "2",
        "--per-device-train-batch-size", "4", "--use_cpu",
    ])  # fmt: skip
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2
    assert (output / "model.safetensors").is_file()


def test_shards_packed_with_a_meta_token_give_the_model_meta_attention(
    annotated, lime_pretokenized, tmp_path
):
    tokenizer = copy.deepcopy(lime_pretokenized)
    (meta_id,) = add_meta_tokens(tokenizer, ["<meta>"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    folder = tmp_path / "shards"
    write_shards(
        prepare_lm_dataset(annotated, tokenizer, BLOCK),
        folder,
        tokenizer,
        BLOCK,
        meta_token_id=meta_id,
        meta_fraction=0.1,
    )
    main(stream_args(folder, tmp_path / "tokenizer", tmp_path / "out", "--max-steps", "1"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["meta_token_ids"] == [meta_id]


RANK_SCRIPT = """
import sys

import torch
from transformers import TrainingArguments

from lime_hf import DataCollatorForLime, LimeConfig, LimeForCausalLM, LimeTokenizer
from lime_hf.streaming import StreamingLimeTrainer, shard_stream

shards, tokenizer_dir, out, config, steps = sys.argv[1:6]


class Recording(DataCollatorForLime):
    seen = []

    def __call__(self, features):
        self.seen += [list(feature["input_ids"]) for feature in features]
        return super().__call__(features)


tokenizer = LimeTokenizer.from_pretrained(tokenizer_dir)
torch.manual_seed(0)
model = LimeForCausalLM(LimeConfig(text_config=eval(config), metadata_fields=tokenizer.metadata_fields))
args = TrainingArguments(out, max_steps=int(steps), per_device_train_batch_size=4, report_to="none", use_cpu=True,
                         save_strategy="no", dataloader_num_workers=int(sys.argv[6]))
stream = shard_stream(shards, tokenizer, model.config.metadata_fields, world_size=args.world_size,
                      num_workers=args.dataloader_num_workers)
collator = Recording(tokenizer)
trainer = StreamingLimeTrainer(model=model, args=args, train_stream=stream, data_collator=collator,
                               processing_class=tokenizer)
trainer.train()
rank = args.process_index
torch.save({"seen": collator.seen if not args.dataloader_num_workers else None,
            "state": model.state_dict()}, f"{out}/rank{rank}.pt")
"""


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")  # one at a time: launchers and Ray take fixed ports
def test_two_gloo_processes_train_on_disjoint_shares_that_cover_the_blocks(
    shards, blocks, saved_tokenizer, tmp_path
):
    """torchrun, 2 CPU processes: every block once (the collator records them), the ranks' weights equal."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT), encoding="utf-8")
    per_rank = len(blocks) // 2
    steps = per_rank // 4  # whole batches of 4: the share is read to its last full batch
    config = repr({**TINY_LLAMA, "vocab_size": 600})
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(script), str(shards), str(saved_tokenizer), str(tmp_path),
         config, str(steps), "0"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    seen = [[tuple(block) for block in rank["seen"]] for rank in ranks]
    expected = ids(blocks)
    assert seen[0] == expected[: steps * 4] and seen[1] == expected[per_rank : per_rank + steps * 4]
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    assert Manifest.load(shards).counts["blocks"] == len(blocks)
