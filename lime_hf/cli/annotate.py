"""`lime-hf annotate`: run spaCy once over a corpus and save its tag spans (`datasets` or datatrove executors)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..options import FIELDS, SAMPLE_BY, SAMPLE_BY_HELP, SOURCES_HELP, check_sample_by, check_sources
from ._common import add_command, one_line, positive, usage_errors


def add_parser(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "annotate",
        run,
        check,
        description=(
            "Run spaCy once over a corpus and save it with one column of character-span tags per field "
            "(`lime_pos`, `lime_ner`, ...), ready for `lime_hf.align_dataset` with any LimeTokenizer."
        ),
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    parser.add_argument("--sample-by", choices=SAMPLE_BY, help=SAMPLE_BY_HELP)
    parser.add_argument("--dataset-config", metavar="CONFIG", help="config name of a `datasets` source")
    parser.add_argument("--split", help="split of a `datasets` source (default: train)")
    parser.add_argument(
        "--text-column",
        default="text",
        help="text column of a `datasets` source, or text key of --executor shards (default: %(default)s)",
    )
    parser.add_argument("--output", "-o", required=True, type=Path, help="folder for `save_to_disk`")
    parser.add_argument(
        "--fields",
        nargs="+",
        default=list(FIELDS),
        choices=FIELDS,
        help="fields to annotate (default: pos ner)",
    )
    parser.add_argument("--spacy-model", help="spaCy pipeline name (default: en_core_web_sm)")
    parser.add_argument(
        "--num-proc", type=positive(int), help="worker processes, each with its own spaCy pipeline"
    )
    parser.add_argument(
        "--batch-size", type=positive(int), default=256, help="texts per map batch (default: %(default)s)"
    )
    parser.add_argument(
        "--causal",
        action="store_true",
        help="label each token from the text up to and including it (prefix-only: what a left-to-right model can "
        "know) instead of the whole document: the same tokens without the right-context leak, about 7x slower; "
        "the output gets a `lime_causal` column",
    )
    scale = parser.add_argument_group(
        "datatrove executors",
        "annotate a folder of .parquet or .jsonl[.gz] shards into Parquet shards with datatrove (needs "
        '`pip install "lime_hf[datatrove]"`); rerunning with the same --logging-dir resumes unfinished tasks',
    )
    scale.add_argument(
        "--executor", choices=["local", "slurm", "ray"], help="default: no datatrove, one machine"
    )
    scale.add_argument("--tasks", type=int, help="output shards (<= input files) (default: 1)")
    scale.add_argument("--workers", type=int, help="tasks at once (default: all)")
    scale.add_argument("--logging-dir", help="logs, stats and completions (default: OUTPUT/../logs-OUTPUT)")
    scale.add_argument("--slurm-partition", help="Slurm partition")
    scale.add_argument("--slurm-time", help="Slurm time limit per task, e.g. 24:00:00")


# The options of one way of annotating that the other would ignore: each is refused there instead.
DATASETS_ONLY = {
    "num_proc": "--num-proc",
    "dataset_config": "--dataset-config",
    "split": "--split",
    "sample_by": "--sample-by",
}
EXECUTOR_ONLY = {"tasks": "--tasks", "workers": "--workers", "logging_dir": "--logging-dir"}
SLURM_ONLY = {"slurm_partition": "--slurm-partition", "slurm_time": "--slurm-time"}


def given(args: argparse.Namespace, options: dict[str, str]) -> list[str]:
    """The flags among `options` (dest -> flag) that the command line sets."""
    return [flag for dest, flag in options.items() if getattr(args, dest) is not None]


def check(args: argparse.Namespace) -> None:
    if args.executor is None:
        if flags := given(args, {**EXECUTOR_ONLY, **SLURM_ONLY}):
            raise ValueError(
                f"{', '.join(flags)} set up a datatrove executor: add --executor local (or slurm, ray), or drop them"
            )
        check_sample_by(args.sample_by, text_files=check_sources(args.sources))
        return
    if flags := given(args, DATASETS_ONLY):
        raise ValueError(
            f"--executor {args.executor} reads a folder of .parquet or .jsonl shards; {', '.join(flags)} only apply "
            "without it (a `datasets` source or .txt files, on this machine): drop them and spread the work with "
            "--tasks and --workers, or annotate without --executor"
        )
    if args.executor != "slurm" and (flags := given(args, SLURM_ONLY)):
        raise ValueError(f"{', '.join(flags)} apply to --executor slurm only, not {args.executor}")
    if len(args.sources) != 1:
        raise ValueError(f"--executor takes one input folder of shards, got {args.sources}")
    if Path(args.sources[0]).is_file():
        raise ValueError(
            f"--executor reads a folder of .parquet or .jsonl shards, and {args.sources[0]!r} is a file: annotate "
            "it without --executor (on this machine), or put it in a folder of shards"
        )


def run(args: argparse.Namespace) -> None:
    """Load the texts, annotate them (`annotate_dataset`: progress bar, `num_proc`) and `save_to_disk`."""
    if args.executor is not None:
        return run_datatrove(args)
    from ..data import annotate_dataset
    from ..pretrain import describe_texts, load_texts

    with usage_errors(args.parser):  # unknown dataset or column, no documents, unknown spaCy pipeline
        texts = load_texts(
            args.sources,
            args.dataset_config,
            args.split or "train",
            args.text_column,
            sample_by=args.sample_by,
        )
        print(f"Read {describe_texts(texts, args.sources, args.sample_by)}")
        annotated = annotate_dataset(
            texts,
            fields=args.fields,
            spacy_model=args.spacy_model,
            batch_size=args.batch_size,
            num_proc=args.num_proc,
            causal=args.causal,
        )
    annotated.save_to_disk(str(args.output))
    tags = "causal (prefix-only) " if args.causal else ""
    print(f"Annotated {len(annotated)} texts with {tags}{', '.join(args.fields)}; saved to {args.output}")


def run_datatrove(args: argparse.Namespace) -> None:
    """`annotate --executor ...`: `lime_hf.integrations.datatrove.annotate_corpus`."""
    slurm = {"partition": args.slurm_partition, "time": args.slurm_time} if args.executor == "slurm" else {}
    logging_dir = args.logging_dir or str(args.output.parent / f"logs-{args.output.name}")
    try:
        from ..integrations.datatrove import annotate_corpus

        annotate_corpus(
            args.sources[0], str(args.output), logging_dir, args.executor,
            1 if args.tasks is None else args.tasks, -1 if args.workers is None else args.workers,
            args.fields, args.spacy_model, args.text_column, args.batch_size, args.causal, **slurm,
        )  # fmt: skip
    except ImportError as error:
        args.parser.error(f'{one_line(error)}; the executors need `pip install "lime_hf[datatrove]"`')
    except (ValueError, OSError, RuntimeError) as error:
        args.parser.error(one_line(error))
    done = "Submitted the Slurm job array for" if args.executor == "slurm" else "Annotated"
    print(
        f"{done} {args.sources[0]} ({', '.join(args.fields)}): Parquet shards in {args.output}, logs in {logging_dir}"
    )
