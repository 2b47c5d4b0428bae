"""Streaming training: the loader's blocks/s against the training step rate, and the training process's peak RSS
while it streams a corpus, against a map-and-load run, at two corpus sizes.

(a) Loader: `shard_stream` -> `DataLoader` -> `DataCollatorForLime` (batch 8, blocks of 256, no workers), blocks/s,
    and the same for blocks aligned and packed on the fly (`document_stream`, spaCy spans stored beforehand);
    against the 4 x 256 benchmark model's training steps/s (forward, backward, AdamW; batch 8 x 256) times 8.
    Goal: loader >= 10x the blocks training consumes.
(b) Memory: a subprocess trains the 4 x 256 model a fixed number of steps and reports its peak RSS
    (`resource.getrusage`, ru_maxrss), streaming (`StreamingLimeTrainer`) or map-and-load (the blocks as a
    `Dataset` in memory, `LimeTrainer`), on a small corpus and on one at least 20x the model's RAM working set
    (parameters, gradients and AdamW's two moments: 16 bytes per parameter). Goal: streaming RSS flat.

The shards hold real token ids (the Austen novels, tokenized by a BPE of 4096 tokens, repeated) and random tags.

    python benchmarks/streaming.py [--small-mb 100] [--large-mb 1800] [--steps 20] [--workdir /tmp/lime-stream-bench]
Writes benchmarks/results/streaming.json and streaming.csv.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from common import AUSTEN, check_corpus, load_paragraphs, save_results, train_bpe
from transformers import TrainingArguments

from lime_hf import DataCollatorForLime, LimeConfig, LimeForCausalLM, LimeTokenizer
from lime_hf.shards import BLOCKS, Manifest, ShardInfo
from lime_hf.streaming import StreamingLimeTrainer, document_stream, shard_stream

BLOCK, BATCH = 256, 8  # the other benchmarks' training shape
TEXT_CONFIG = dict(
    model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=1024,
)  # fmt: skip
BLOCKS_PER_SHARD = 20_000


def make_tokenizer(folder: Path) -> LimeTokenizer:
    paragraphs = load_paragraphs(AUSTEN, max_words=500_000)
    tokenizer = LimeTokenizer.from_tokenizer(train_bpe(paragraphs[:3000], vocab_size=4096))
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_corpus(folder: Path, tokenizer: LimeTokenizer, megabytes: int) -> Manifest:
    """A shard folder of about `megabytes` of blocks (3 int32 columns): Austen's token ids over and over."""
    paragraphs = load_paragraphs(AUSTEN, max_words=500_000)
    encodings = tokenizer.backend_tokenizer.encode_batch(paragraphs, add_special_tokens=False)
    ids = np.concatenate([np.array([*row.ids, tokenizer.eos_token_id], np.int32) for row in encodings])
    manifest = Manifest.for_tokenizer(tokenizer, BLOCK)
    columns = manifest.columns
    total = megabytes * 2**20 // (BLOCK * 4 * len(columns))
    rng = np.random.default_rng(0)
    (folder / BLOCKS).mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, total, BLOCKS_PER_SHARD)):
        count = min(BLOCKS_PER_SHARD, total - start)
        offsets = (np.arange(start, start + count) * BLOCK) % (len(ids) - BLOCK)
        arrays = {"input_ids": ids[offsets[:, None] + np.arange(BLOCK)]}
        for name, labels in manifest.fields.items():
            arrays[f"{name}_ids"] = rng.integers(3, len(labels), (count, BLOCK), dtype=np.int32)
        table = pa.table(
            {
                column: pa.FixedSizeListArray.from_arrays(arrays[column].ravel(), BLOCK).cast(
                    pa.list_(pa.int32())
                )
                for column in columns
            }
        )
        file = f"{BLOCKS}/{index:05d}.parquet"
        pq.write_table(table, folder / file)
        documents = int((arrays["input_ids"] == tokenizer.eos_token_id).sum())
        manifest.shards.append(ShardInfo(file, count, count * BLOCK, documents))
    manifest.save(folder)
    return manifest


def model_for(tokenizer: LimeTokenizer) -> LimeForCausalLM:
    torch.manual_seed(0)
    text_config = {**TEXT_CONFIG, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    return LimeForCausalLM(LimeConfig(text_config=text_config, metadata_fields=tokenizer.metadata_fields))


def loader_rate(dataset, tokenizer: LimeTokenizer, blocks: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, collate_fn=DataCollatorForLime(tokenizer))
    iterator = iter(loader)
    next(iterator)  # opening the first file is not the rate
    start, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += batch["input_ids"].shape[0]
        if seen >= blocks:
            break
    return seen / (time.perf_counter() - start)


def step_rate(tokenizer: LimeTokenizer, steps: int) -> float:
    model = model_for(tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, len(tokenizer), (BATCH, BLOCK))
    tags = {f"{name}_ids": torch.full_like(ids, 3) for name in tokenizer.metadata_fields}
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids, **tags).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return 1 / statistics.median(times[2:])


def annotated_documents(tokenizer: LimeTokenizer):
    from datasets import Dataset

    from lime_hf.data import annotate_dataset

    paragraphs = load_paragraphs(AUSTEN, max_words=40_000)
    return annotate_dataset(Dataset.from_dict({"text": paragraphs}), tokenizer.annotator)


# ---- (b) the measured child process -----------------------------------------------------------------------------


def child(mode: str, shards: str, tokenizer_dir: str, steps: int, output: str) -> None:
    """Train `steps` steps streaming or map-and-load, print the peak RSS in MiB."""
    from datasets import Dataset

    from lime_hf.trainer import LimeTrainer

    torch.set_num_threads(1)
    tokenizer = LimeTokenizer.from_pretrained(tokenizer_dir)
    model = model_for(tokenizer)
    args = TrainingArguments(
        output, max_steps=steps, per_device_train_batch_size=BATCH, report_to="none", use_cpu=True,
        save_strategy="no", logging_strategy="no", dataloader_pin_memory=False,
    )  # fmt: skip
    common = dict(
        model=model, args=args, data_collator=DataCollatorForLime(tokenizer), processing_class=tokenizer
    )
    if mode == "stream":
        stream = shard_stream(shards, tokenizer, model.config.metadata_fields)
        trainer = StreamingLimeTrainer(train_stream=stream, **common)
    else:
        files = Manifest.load(shards).files(shards)
        blocks = Dataset.from_parquet(files, keep_in_memory=True, cache_dir=f"{output}/cache")
        trainer = LimeTrainer(train_dataset=blocks, **common)
    trainer.train()
    print(f"peak_rss_mib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")


def peak_rss(mode: str, shards: Path, tokenizer_dir: Path, steps: int, workdir: Path) -> tuple[float, float]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(shards), str(tokenizer_dir), str(steps), str(workdir / mode)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    line = next(line for line in result.stdout.splitlines() if line.startswith("peak_rss_mib="))
    return float(line.split("=")[1]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-mb", type=int, default=100)
    parser.add_argument("--large-mb", type=int, default=1800)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lime-stream-bench"))
    parser.add_argument("--child", nargs=5, metavar=("MODE", "SHARDS", "TOKENIZER", "STEPS", "OUTPUT"))
    args = parser.parse_args()
    if args.child:
        mode, shards, tokenizer_dir, steps, output = args.child
        return child(mode, shards, tokenizer_dir, int(steps), output)
    check_corpus()
    torch.set_num_threads(1)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    tokenizer = make_tokenizer(args.workdir / "tokenizer")
    parameters = model_for(tokenizer).num_parameters()
    working_set_mb = 16 * parameters / 2**20
    sizes = {"small": args.small_mb, "large": args.large_mb}
    corpora = {name: write_corpus(args.workdir / name, tokenizer, mb) for name, mb in sizes.items()}

    # (a) loader against training
    steps_per_s = step_rate(tokenizer, steps=5)
    shard_rate = loader_rate(
        shard_stream(args.workdir / "small", tokenizer).dataset(), tokenizer, blocks=8000
    )
    documents = annotated_documents(tokenizer)
    packing_rate = loader_rate(document_stream(documents, tokenizer, BLOCK).dataset(), tokenizer, blocks=400)
    training_blocks_per_s = steps_per_s * BATCH
    rows = [
        {"measure": "train steps/s (4x256, batch 8 x 256, CPU)", "value": round(steps_per_s, 2)},
        {"measure": "blocks/s training consumes", "value": round(training_blocks_per_s, 1)},
        {"measure": "shard loader blocks/s (collated)", "value": round(shard_rate, 1)},
        {"measure": "shard loader / training", "value": round(shard_rate / training_blocks_per_s, 1)},
        {"measure": "align+pack loader blocks/s (collated)", "value": round(packing_rate, 1)},
        {"measure": "align+pack loader / training", "value": round(packing_rate / training_blocks_per_s, 1)},
    ]
    # (b) peak RSS, streaming against map-and-load
    memory = []
    for name, manifest in corpora.items():
        parquet_mb = (
            sum((args.workdir / name / shard.file).stat().st_size for shard in manifest.shards) / 2**20
        )
        corpus_mb = manifest.counts["tokens"] * 4 * len(manifest.columns) / 2**20  # int32 Arrow in memory
        for mode in ("stream", "map"):
            rss, seconds = peak_rss(
                mode, args.workdir / name, args.workdir / "tokenizer", args.steps, args.workdir
            )
            memory.append(
                {"corpus": name, "blocks": manifest.counts["blocks"], "arrow_mib": round(corpus_mb),
                 "parquet_mib": round(parquet_mb),
                 "mode": mode, "peak_rss_mib": round(rss), "seconds": round(seconds, 1)}
            )  # fmt: skip
            rows.append(
                {"measure": f"peak RSS MiB, {mode}, {name} corpus ({corpus_mb:.0f} MiB)", "value": round(rss)}
            )
    for row in rows:
        print(f"{row['measure']:<58} {row['value']:>10}")
    stream_rss = [row["peak_rss_mib"] for row in memory if row["mode"] == "stream"]
    summary = {
        "machine": {"platform": platform.platform(), "torch_threads": 1, "device": "cpu"},
        "model": {
            "text_config": TEXT_CONFIG,
            "parameters": parameters,
            "working_set_mib": round(working_set_mb, 1),
        },
        "corpus_sizes_mib": sizes,
        "large_corpus_over_working_set": round(args.large_mb / working_set_mb, 1),
        "loader": {
            "train_steps_per_s": steps_per_s,
            "train_blocks_per_s": training_blocks_per_s,
            "shard_loader_blocks_per_s": shard_rate,
            "packing_loader_blocks_per_s": packing_rate,
            "goal": ">= 10x the blocks training consumes",
            "met": shard_rate >= 10 * training_blocks_per_s,
        },
        "memory": memory,
        "stream_rss_growth_mib": stream_rss[-1] - stream_rss[0],
        "steps": args.steps,
    }
    save_results("streaming", summary, rows)


if __name__ == "__main__":
    main()
