"""`lime-hf pack`: align a corpus to a saved LimeTokenizer and pack it into block shards on datatrove executors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import add_command, one_line, positive, usage_errors


def add_parser(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "pack",
        run,
        check,
        description=(
            "Align a corpus to a saved LimeTokenizer and pack it into blocks (as `lime-hf train` packs them: EOS "
            "between documents, tags aligned), written as a shard folder: OUTPUT/blocks/*.parquet, one per task, and "
            "OUTPUT/manifest.json. Runs as a datatrove pipeline; rerunning the same command resumes unfinished tasks "
            "and writes the manifest once all are done."
        ),
    )
    parser.add_argument(
        "input",
        metavar="INPUT",
        help="folder (or fsspec URL) of .parquet or .jsonl[.gz|.zst] files: annotated (`lime-hf annotate "
        "--executor ...`: the lime_{field} columns) or raw text, which is annotated first",
    )
    parser.add_argument("--output", "-o", required=True, help="the shard folder to write")
    parser.add_argument(
        "--tokenizer", required=True, metavar="PATH", help="a saved LimeTokenizer (or model) folder"
    )
    parser.add_argument(
        "--block-size", required=True, type=positive(int), metavar="N", help="tokens per block"
    )
    parser.add_argument("--text-column", default="text", help="the input's text key (default: %(default)s)")
    meta = parser.add_argument_group(
        "meta-tokens", "inject a meta-token into every block, recorded in the manifest"
    )
    meta.add_argument("--meta-token", metavar="TOKEN", help="a special token of the tokenizer, e.g. '<meta>'")
    meta.add_argument("--meta-fraction", type=float, metavar="K", help="meta-tokens per token (default: 0.1)")
    meta.add_argument("--seed", type=int, help="seeds the meta-token positions (default: 0)")
    scale = parser.add_argument_group("datatrove executors")
    scale.add_argument(
        "--executor", choices=["local", "slurm", "ray"], default="local", help="default: local"
    )
    scale.add_argument("--tasks", type=positive(int), default=1, help="shards (<= input files) (default: 1)")
    scale.add_argument("--workers", type=int, default=-1, help="tasks at once (default: all)")
    scale.add_argument("--logging-dir", help="logs, stats and completions (default: OUTPUT/../logs-OUTPUT)")
    scale.add_argument("--slurm-partition", help="Slurm partition")
    scale.add_argument("--slurm-time", help="Slurm time limit per task, e.g. 24:00:00")


def is_url(path: str) -> bool:
    return "://" in path


def check(args: argparse.Namespace) -> None:
    if args.workers == 0 or args.workers < -1:
        raise ValueError(f"--workers must be >= 1 (or -1 for all), got {args.workers}")
    if args.meta_token is None and (flags := [f for f, v in (("--meta-fraction", args.meta_fraction), ("--seed", args.seed)) if v is not None]):  # fmt: skip
        raise ValueError(f"{', '.join(flags)} set up meta-tokens: add --meta-token TOKEN, or drop them")
    if args.meta_fraction is not None and not 0.0 <= args.meta_fraction < 1.0:
        raise ValueError(f"--meta-fraction must lie in [0, 1), got {args.meta_fraction}")
    slurm = [flag for flag, value in (("--slurm-partition", args.slurm_partition), ("--slurm-time", args.slurm_time)) if value]  # fmt: skip
    if args.executor != "slurm" and slurm:
        raise ValueError(f"{', '.join(slurm)} apply to --executor slurm only, not {args.executor}")
    if args.executor == "slurm" and len(slurm) < 2:
        raise ValueError("--executor slurm needs --slurm-partition and --slurm-time (e.g. cpu and 24:00:00)")
    if not is_url(args.input) and not Path(args.input).is_dir():
        raise ValueError(f"no such input folder {args.input!r}")
    if not Path(args.tokenizer).is_dir():
        raise ValueError(
            f"no such tokenizer folder {args.tokenizer!r}: give a saved LimeTokenizer or model folder"
        )
    if is_url(args.output) and args.logging_dir is None:
        raise ValueError(f"--output {args.output} is a URL: give --logging-dir too")


def run(args: argparse.Namespace) -> None:
    """`lime_hf.integrations.datatrove_pack.pack_corpus`, then what it packed."""
    output = Path(args.output)
    logging_dir = args.logging_dir or str(output.parent / f"logs-{output.name}")
    slurm = {"partition": args.slurm_partition, "time": args.slurm_time} if args.executor == "slurm" else {}
    meta = {
        "meta_fraction": 0.1 if args.meta_fraction is None else args.meta_fraction,
        "seed": args.seed or 0,
    }
    try:
        from ..integrations.datatrove_pack import pack_corpus, task_counts
    except ImportError as error:
        args.parser.error(f'{one_line(error)}; packing needs `pip install "lime_hf[datatrove]"`')
    with usage_errors(args.parser, ValueError, OSError, RuntimeError):
        manifest = pack_corpus(
            args.input, args.output, args.tokenizer, args.block_size, logging_dir, args.executor, args.tasks,
            args.workers, args.text_column, args.meta_token, **meta, **slurm,
        )  # fmt: skip
        if manifest is None:
            print(
                f"Submitted the Slurm job array packing {args.input} into {args.output}, and a job that writes its "
                f"manifest once the array succeeds; logs in {logging_dir}. After a failure, run the same command again."
            )
            return
        words = sum(record["words"] for record in task_counts(args.output, args.tasks))
    counts = manifest.counts
    meta_note = f", with {args.meta_token} meta-tokens" if args.meta_token else ""
    print(
        f"Packed {args.input}: {counts['documents']:,} documents, {words:,} words -> {counts['blocks']:,} blocks of "
        f"{args.block_size} tokens{meta_note}, {counts['tokens']:,} tokens in {counts['shards']} shards; "
        f"manifest {Path(args.output) / 'manifest.json'}, logs in {logging_dir}"
    )
