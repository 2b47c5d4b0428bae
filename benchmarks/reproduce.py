"""Reproduce LIME (arXiv 2512.07522) at small scale: data efficiency, the leak, and guided arithmetic.

Stages (each one resumable; run them in order, or `all`):

    prepare   CPU + spaCy. Annotates the Austen corpus once (tagger + NER), trains a byte-level BPE on the five
              training novels, aligns with LimeTokenizer (pretokenized: one token stream for every run), computes
              prefix-only tags for Persuasion and builds the synthetic addition data. Writes arrays to the cache.
    train     GPU when available, else CPU. Trains every run that has no result file yet (baseline / LIME /
              LIME+1 language models on Austen, and the addition models); `--jobs N` runs N at a time.
              Each run checkpoints at its evaluation points and resumes from there.
    generate  CPU + spaCy. Free generation with re-annotation from the trained models; perplexity of the
              generated text under a baseline of another seed.
    report    Curves (CSV, PNG) and the headline file `benchmarks/results/reproduce.json`.
    meta      The meta-token experiment (arXiv 2509.16278, `reproduction/meta_tokens.py`), on its own: synthetic
              recall tasks generated from seeds (no `prepare`), its runs trained (resumable) and reported in
              `benchmarks/results/meta_tokens.{json,csv,png}`. One torch thread per run unless `--threads`.
    honest    The honest LIME (issue 22, `reproduction/honest.py`): tags predicted by the model itself after the
              first layers, in one forward; its runs (and the baseline and LIME references) trained, resumable,
              and reported in `benchmarks/results/reproduce_honest.{json,csv}`; every run's saved model is also
              scored on a validation text, the next `eval_tokens` of Persuasion, which chooses between variants
              (`reproduce_honest_validation.{json,csv}`). Needs spaCy's causal tags of the novels, and for one
              variant its causal dependency labels (computed once into the cache, resumable per novel).
    cloze     CPU + spaCy. The held-out Persuasion cloze (last word of a sentence), every trained language model
              scored by lm-evaluation-harness (`reproduce_cloze.json`). Not part of `all`.
    cloze-items  The cloze item by item (lm-eval's `log_samples`): LIME models against their reference on the same
              words, paired, by the word's length in tokens, POS and training frequency
              (`reproduce_cloze_items.{csv,json}`; resumable per model).

    python benchmarks/reproduce.py all --smoke          # the whole pipeline on a tiny setting, ~2 min on CPU
    python benchmarks/reproduce.py all                  # the real thing (preset "gpu" on CUDA, else "cpu")
    python benchmarks/reproduce.py meta [--smoke]       # the meta-token experiment

Every configuration, seed, version and wall time is recorded in the result files. The stages and experiments live
in the `reproduction` package beside this script (one module per experiment over a shared harness).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import check_corpus
from reproduction.cloze import cloze_stage, items_stage
from reproduction.free_generation import generate_stage
from reproduction.harness import DEFAULT_CACHE, PRESETS, RESULTS
from reproduction.honest import report_honest_stage, restore_references
from reproduction.meta_tokens import report_meta
from reproduction.prepare import prepare
from reproduction.report import benchmarks_table, report
from reproduction.runs import run_one, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "stage",
        choices=[
            "prepare",
            "train",
            "run-one",
            "generate",
            "report",
            "all",
            "table",
            "meta",
            "honest",
            "cloze",
            "cloze-items",
        ],
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny data and models: the whole pipeline in minutes"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"work folder (default {DEFAULT_CACHE})"
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="default: smoke with --smoke, else gpu on CUDA, else cpu"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (subprocesses)")
    parser.add_argument(
        "--only",
        choices=["lm", "add", "meta", "honest"],
        help="train only the language-model, addition or meta-token runs",
    )
    parser.add_argument("--run", action="append", help="train only this run (repeatable), e.g. lm-lime-s0")
    parser.add_argument("--threads", type=int, help="torch CPU threads of a run (set by `train --jobs`)")
    parser.add_argument(
        "--results", type=Path, help="where report writes (default benchmarks/results; smoke: cache)"
    )
    args = parser.parse_args(argv)
    if args.stage == "table":  # the README's Benchmarks table, from whatever results exist
        print(benchmarks_table(args.results or RESULTS))
        return
    cache = args.cache / "smoke" if args.smoke else args.cache
    preset = args.preset or ("smoke" if args.smoke else None)
    if preset is None:
        trained = [p for p in ("gpu", "cpu") if (cache / "runs" / p).exists()]
        if args.stage in ("train", "run-one", "all") or not trained:
            preset = "gpu" if torch.cuda.is_available() else "cpu"
        else:
            preset = trained[0]
    results = args.results or (cache / "results" if args.smoke else RESULTS)
    # These stages read the novels (train: the plain-BPE baseline's tokenizer); stop early if one is missing.
    training_lm = (args.stage == "train" and args.only in (None, "lm", "honest")) or args.stage == "honest"
    if args.stage in ("prepare", "all", "generate", "cloze", "cloze-items") or training_lm:
        check_corpus()
    if args.stage == "meta":
        # Tiny models: one thread each is fastest, and more threads than free cores slow a shared machine down.
        train(cache, preset, args.jobs, "meta", args.run, args.threads or 1)
        headline = report_meta(cache, preset, results)
        print(json.dumps(headline["comparisons"], indent=2))
        return
    if args.stage == "honest":
        prepare(cache, args.smoke or preset == "smoke")
        restore_references(cache, preset)
        train(cache, preset, args.jobs, "honest", args.run, args.threads)
        headline = report_honest_stage(cache, preset, results)
        print(json.dumps({key: headline[key] for key in ("summary", "selected_on_validation")}, indent=2))
        return
    if args.stage in ("prepare", "all"):
        prepare(cache, args.smoke or preset == "smoke")
    if args.stage == "run-one":
        for name in args.run:
            run_one(cache, preset, name, args.threads)
    if args.stage in ("train", "all"):
        train(cache, preset, args.jobs, args.only, args.run)
    if args.stage in ("generate", "all"):
        generate_stage(cache, preset)
    if args.stage == "cloze":
        cloze_stage(cache, preset, results)
    if args.stage == "cloze-items":
        items_stage(cache, preset, results)
    if args.stage in ("report", "all"):
        headline = report(cache, preset, results)
        keys = ["data_fraction_lime", "data_fraction_lime_prefix_tags", "addition_exact_match"]
        print(json.dumps({k: headline.get(k) for k in keys}, indent=2))


if __name__ == "__main__":
    main()
