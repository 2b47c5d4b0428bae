"""Align and pack on datatrove: words/s per worker, 1 against 2 local workers.

Paragraphs of the Austen training novels are annotated once with spaCy (not timed), repeated `--repeat-corpus`
times (alignment and packing cost the same on repeated text; annotating a corpus this size would take far longer)
and written as annotated Parquet shards, as `lime-hf annotate --executor` writes them. Then `pack_corpus`
(reader -> LimePack -> blocks/*.parquet and the manifest) runs on the local executor with 1 and 2 workers,
alternated `--repeats` times with fresh output and logging folders, into blocks of 512 tokens of a pretokenized
LimeTokenizer (a 4,096-token byte-level BPE).

Each setup runs on the corpus and on its first quarter: the difference is the marginal rate (what a long run
sustains), the rest the fixed cost (worker processes, `import lime_hf`, the tokenizer's load), paid once per worker.
One worker runs in this process, so its fixed cost is ~0. Every run's manifest is checked to count every document.
Prints a table and writes benchmarks/results/pack_throughput.{json,csv}.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from common import (
    AUSTEN,
    cpu_scaling,
    load_paragraphs,
    save_results,
    train_bpe,
)  # the benchmarks' shared helpers
from datasets import Dataset
from loguru import logger  # datatrove logs through loguru

from lime_hf import LimeTokenizer
from lime_hf.data import annotate_dataset
from lime_hf.integrations.datatrove_pack import pack_corpus

SETUPS = [("local, 1 worker", 1), ("local, 2 workers", 2)]
BLOCK_SIZE = 512


def write_shards(annotated: Dataset, folder: Path, shards: int) -> None:
    """The annotated rows as `shards` Parquet files of consecutive rows."""
    folder.mkdir(parents=True)
    for index in range(shards):
        annotated.shard(shards, index, contiguous=True).to_parquet(str(folder / f"000_{index:05d}.parquet"))


def run_once(shards: Path, tokenizer: Path, work: Path, workers: int, tasks: int) -> tuple[float, dict]:
    """Seconds for one full align-and-pack run, and its manifest's counts."""
    start = time.perf_counter()
    manifest = pack_corpus(
        shards, work / "out", tokenizer, BLOCK_SIZE, work / "logs", tasks=tasks, workers=workers
    )
    return time.perf_counter() - start, manifest.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=AUSTEN)
    parser.add_argument("--max-words", type=int, default=40_000, help="words annotated")
    parser.add_argument("--repeat-corpus", type=int, default=12, help="copies of the annotated paragraphs")
    parser.add_argument("--shards", type=int, default=4, help="input files, and tasks")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    logger.remove()  # datatrove logs every task's stats to the console; they stay in each logging folder
    paragraphs = load_paragraphs(args.corpus, args.max_words)
    tokenizer = LimeTokenizer.from_tokenizer(train_bpe(paragraphs, 4096), alignment="pretokenized")
    annotated = annotate_dataset(Dataset.from_dict({"text": paragraphs}), annotator=tokenizer.annotator)
    rows = annotated.to_list() * args.repeat_corpus
    corpora = {"full": rows, "quarter": rows[: len(rows) // 4]}
    words_of = {size: sum(len(row["text"].split()) for row in subset) for size, subset in corpora.items()}

    seconds = {(name, size): [] for name, _ in SETUPS for size in corpora}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(Path(tmp) / "tokenizer")
        for size, subset in corpora.items():
            write_shards(Dataset.from_list(subset), Path(tmp) / size, args.shards)
        for repeat in range(args.repeats):
            for (name, workers), size in itertools.product(SETUPS, corpora):
                work = Path(tmp) / f"{workers}-{size}-{repeat}"
                elapsed, counts = run_once(
                    Path(tmp) / size, Path(tmp) / "tokenizer", work, workers, args.shards
                )
                if counts["documents"] != len(corpora[size]):
                    raise RuntimeError(
                        f"{name} packed {counts['documents']} of {len(corpora[size])} documents"
                    )
                seconds[name, size].append(elapsed)
    ceiling = cpu_scaling()

    table = []
    for name, workers in SETUPS:
        full, quarter = (statistics.median(seconds[name, size]) for size in ("full", "quarter"))
        marginal = (words_of["full"] - words_of["quarter"]) / (full - quarter)
        table.append({"setup": name, "full_s": full, "words_per_s": words_of["full"] / full,
                      "marginal_words_per_s": marginal, "marginal_words_per_s_per_worker": marginal / workers,
                      "fixed_s": full - words_of["full"] / marginal})  # fmt: skip
    one, two = table
    ratios = {
        "two_workers_end_to_end": two["words_per_s"] / one["words_per_s"],
        "two_workers_marginal": two["marginal_words_per_s"] / one["marginal_words_per_s"],
        "per_worker_marginal": two["marginal_words_per_s_per_worker"]
        / one["marginal_words_per_s_per_worker"],
    }
    print(
        f"{len(rows):,} documents, {words_of['full']:,} words (and a quarter of them) in {args.shards} shards, blocks "
        f"of {BLOCK_SIZE}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, pure-Python 2-process ceiling "
        f"{ceiling:.2f}x"
    )
    print(f"{'':18s} {'full s':>7s} {'words/s':>9s} {'marginal':>9s} {'per worker':>10s} {'fixed s':>8s}")
    for row in table:
        print(
            f"{row['setup']:18s} {row['full_s']:7.1f} {row['words_per_s']:9,.0f} {row['marginal_words_per_s']:9,.0f} "
            f"{row['marginal_words_per_s_per_worker']:10,.0f} {row['fixed_s']:8.1f}"
        )
    print(
        f"2 workers / 1 worker: {ratios['two_workers_end_to_end']:.2f}x end to end, "
        f"{ratios['two_workers_marginal']:.2f}x at the marginal rate ({ratios['per_worker_marginal']:.2f}x per worker)"
    )
    summary = {
        "corpus": {"documents": len(rows), "words": words_of, "annotated_words": sum(len(p.split()) for p in paragraphs),
                   "repeat_corpus": args.repeat_corpus, "shards": args.shards, "block_size": BLOCK_SIZE},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_end": os.getloadavg()},
        "seconds": {f"{name} / {size}": times for (name, size), times in seconds.items()},
        "ratios": ratios,
        "pure_python_2_process_speedup": ceiling,
    }  # fmt: skip
    save_results("pack_throughput", summary, table)


if __name__ == "__main__":
    main()
