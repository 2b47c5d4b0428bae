"""Corpus annotation on datatrove: 1 vs 2 local workers, and the Ray executor against the local one.

The same JSONL shards of the Austen training novels go through `annotate_corpus` (reader -> LimeAnnotate ->
Parquet writer) on each executor, alternated `--repeats` times with fresh output and logging folders (a reused
logging folder would skip the completed tasks). Measured side by side in one run, since absolute times on shared
machines are noisy:

1. LocalPipelineExecutor, 2 workers against 1 worker, in words/s. Target: >= 1.7x.
2. RayPipelineExecutor (a local Ray cluster of 2 CPUs, started once before timing) against the local executor,
   both with 2 workers. `ray.init` is timed separately.

Each setup runs on the corpus and on its first quarter. The difference is the marginal rate (what a long run
sustains) and the rest the fixed cost (worker processes, spaCy loads): a pretraining corpus pays the fixed cost
once per worker, a benchmark of seconds pays it on every run. One worker runs in this process, where spaCy is
already loaded, so its fixed cost is ~0. Every run's output is checked to hold every input document once.
Prints a table and writes benchmarks/results/datatrove_annotation.{json,csv}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from common import AUSTEN, cpu_scaling, load_paragraphs, save_results  # the benchmarks' shared helpers
from loguru import logger  # datatrove logs through loguru

from lime_hf import SpacyAnnotator
from lime_hf.integrations.datatrove import annotate_corpus

# (name, executor, workers)
SETUPS = [("local, 1 worker", "local", 1), ("local, 2 workers", "local", 2), ("ray, 2 workers", "ray", 2)]


def write_shards(texts: list[str], folder: Path, shards: int) -> None:
    """Deal the paragraphs into `shards` JSONL files, every row with an id."""
    folder.mkdir(parents=True)
    for shard in range(shards):
        rows = [{"id": f"{shard}-{row}", "text": text} for row, text in enumerate(texts[shard::shards])]
        (folder / f"part-{shard:03d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_once(shards: Path, work: Path, executor: str, workers: int, tasks: int) -> tuple[float, int]:
    """Seconds for one full annotation run, and the number of rows it wrote."""
    output = work / "output"
    start = time.perf_counter()
    annotate_corpus(shards, output, work / "logs", executor=executor, tasks=tasks, workers=workers)
    elapsed = time.perf_counter() - start
    return elapsed, sum(pq.read_metadata(path).num_rows for path in output.glob("*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=AUSTEN)
    parser.add_argument("--max-words", type=int, default=80_000)
    parser.add_argument("--shards", type=int, default=4, help="input files, and tasks")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    logger.remove()  # datatrove logs every task's stats to the console; they stay in each logging folder
    texts = load_paragraphs(args.corpus, args.max_words)
    words = sum(len(text.split()) for text in texts)
    SpacyAnnotator().nlp  # noqa: B018 - the spaCy package is read from disk once, before any timing
    import ray  # only this benchmark's Ray setup needs it

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - start

    corpora = {"full": texts, "quarter": texts[: len(texts) // 4]}
    seconds = {(name, size): [] for name, _, _ in SETUPS for size in corpora}
    with tempfile.TemporaryDirectory() as tmp:
        for size, subset in corpora.items():
            write_shards(subset, Path(tmp) / size, args.shards)
        for repeat in range(args.repeats):
            for (name, executor, workers), size in itertools.product(SETUPS, corpora):
                work = Path(tmp) / f"{executor}-{workers}-{size}-{repeat}"
                elapsed, rows = run_once(Path(tmp) / size, work, executor, workers, args.shards)
                if rows != len(corpora[size]):
                    raise RuntimeError(f"{name} wrote {rows} rows for {len(corpora[size])} documents")
                seconds[name, size].append(elapsed)
    ray.shutdown()
    ceiling = cpu_scaling()

    words_of = {size: sum(len(text.split()) for text in subset) for size, subset in corpora.items()}
    rows = []
    for name, _, _ in SETUPS:
        full, quarter = (statistics.median(seconds[name, size]) for size in ("full", "quarter"))
        # Two sizes separate the fixed cost (process start, spaCy load) from the rate a long run sustains.
        marginal = (words_of["full"] - words_of["quarter"]) / (full - quarter)
        rows.append({"setup": name, "full_s": full, "words_per_s": words / full, "marginal_words_per_s": marginal,
                     "fixed_s": full - words / marginal})  # fmt: skip
    by_name = {row["setup"]: row for row in rows}
    one, two, on_ray = by_name["local, 1 worker"], by_name["local, 2 workers"], by_name["ray, 2 workers"]
    summary_ratios = {
        "two_workers_end_to_end": two["words_per_s"] / one["words_per_s"],
        "two_workers_marginal": two["marginal_words_per_s"] / one["marginal_words_per_s"],
        "ray_over_local_time_end_to_end": on_ray["full_s"] / two["full_s"],
        "ray_over_local_time_marginal": two["marginal_words_per_s"] / on_ray["marginal_words_per_s"],
    }
    print(
        f"{len(texts)} paragraphs, {words:,} words (and a quarter of them) in {args.shards} shards, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, pure-Python 2-process ceiling {ceiling:.2f}x"
    )
    print(f"{'':18s} {'full s':>7s} {'words/s':>9s} {'marginal':>9s} {'fixed s':>8s}")
    for row in rows:
        print(
            f"{row['setup']:18s} {row['full_s']:7.1f} {row['words_per_s']:9,.0f} "
            f"{row['marginal_words_per_s']:9,.0f} {row['fixed_s']:8.1f}"
        )
    print(
        f"2 workers / 1 worker: {summary_ratios['two_workers_end_to_end']:.2f}x end to end, "
        f"{summary_ratios['two_workers_marginal']:.2f}x marginal rate (target >= 1.7x)"
    )
    print(
        f"ray / local (2 workers): {summary_ratios['ray_over_local_time_end_to_end']:.2f}x the time end to end, "
        f"{summary_ratios['ray_over_local_time_marginal']:.2f}x at the marginal rate; ray.init {ray_init_s:.1f} s once"
    )

    summary = {
        "corpus": {"paragraphs": len(texts), "words": words_of, "shards": args.shards},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_end": os.getloadavg()},
        "seconds": {f"{name} / {size}": times for (name, size), times in seconds.items()},
        "ratios": summary_ratios,
        "ray_init_s": ray_init_s,
        "pure_python_2_process_speedup": ceiling,
    }
    save_results("datatrove_annotation", summary, rows)


if __name__ == "__main__":
    main()
