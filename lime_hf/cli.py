"""`lime-hf`: annotate a corpus, pretrain, generate with guidance, or run the demo, from the command line.

    lime-hf annotate book.txt --output annotated/          # spaCy once -> Arrow dataset of char-span tags
    lime-hf train --help                                   # pretraining script (lime_hf.pretrain)
    lime-hf generate MODEL_DIR "The king" --guide pos=VBD,DT,NN
    lime-hf demo                                           # baseline vs LIME vs LIME+1 in a few minutes

`train` and `demo` import their modules (and the optional packages the demo needs) only when they run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.utils import logging as hf_logging

from .annotation import BUILTIN_FIELDS
from .data import annotate_dataset


def build_parser() -> argparse.ArgumentParser:
    """The `lime-hf` parser with its four subcommands; each subparser stores its handler as `run`."""
    parser = argparse.ArgumentParser(
        prog="lime-hf",
        description="LIME (Linguistic Metadata Embeddings) for Hugging Face Transformers.",
        epilog="Run `lime-hf COMMAND --help` for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_annotate_parser(commands)
    add_train_parser(commands)
    add_generate_parser(commands)
    add_demo_parser(commands)
    return parser


def add_annotate_parser(commands: Any) -> None:
    """`annotate`: text files or a `datasets` dataset -> annotated Arrow dataset on disk."""
    parser = commands.add_parser(
        "annotate",
        help="annotate text with spaCy and save the tag spans as an Arrow dataset",
        description=(
            "Run spaCy once over a corpus and save it with one column of character-span tags per field "
            "(`lime_pos`, `lime_ner`, ...), ready for `lime_hf.align_dataset` with any LimeTokenizer."
        ),
    )
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help=(
            ".txt files (every blank-line separated paragraph is one text), or one `save_to_disk` folder or "
            "`datasets` name"
        ),
    )
    parser.add_argument("--dataset-config", metavar="CONFIG", help="config name of a `datasets` source")
    parser.add_argument(
        "--split", default="train", help="split of a `datasets` source (default: %(default)s)"
    )
    parser.add_argument(
        "--text-column", default="text", help="text column of a `datasets` source (default: %(default)s)"
    )
    parser.add_argument("--output", "-o", required=True, type=Path, help="folder for `save_to_disk`")
    parser.add_argument(
        "--fields",
        nargs="+",
        default=["pos", "ner"],
        choices=sorted(BUILTIN_FIELDS),
        help="fields to annotate",
    )
    parser.add_argument("--spacy-model", help="spaCy pipeline name (default: en_core_web_sm)")
    parser.add_argument("--num-proc", type=int, help="worker processes, each with its own spaCy pipeline")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="texts per map batch (default: %(default)s)"
    )
    scale = parser.add_argument_group(
        "datatrove executors",
        "annotate a folder of .parquet or .jsonl[.gz] shards into Parquet shards with datatrove (needs "
        '`pip install "lime_hf[datatrove]"`); rerunning with the same --logging-dir resumes unfinished tasks',
    )
    scale.add_argument(
        "--executor", choices=["local", "slurm", "ray"], help="default: no datatrove, one machine"
    )
    scale.add_argument(
        "--tasks", type=int, default=1, help="output shards (<= input files) (default: %(default)s)"
    )
    scale.add_argument("--workers", type=int, default=-1, help="tasks at once (default: all)")
    scale.add_argument("--logging-dir", help="logs, stats and completions (default: OUTPUT/../logs-OUTPUT)")
    scale.add_argument("--slurm-partition", help="Slurm partition")
    scale.add_argument("--slurm-time", help="Slurm time limit per task, e.g. 24:00:00")
    parser.set_defaults(run=run_annotate, parser=parser)


def add_train_parser(commands: Any) -> None:
    """`train`: every argument goes to `lime_hf.pretrain.main`, `--help` included."""
    parser = commands.add_parser(
        "train",
        help="pretrain a LIME model (all arguments go to the training script; see `lime-hf train --help`)",
        add_help=False,
        prefix_chars="\0",  # no option is ours: `--help` and the rest reach the script untouched
    )
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    parser.set_defaults(run=run_train, parser=parser)


def add_generate_parser(commands: Any) -> None:
    """`generate`: a saved model folder + prompt -> generated text, optionally guided."""
    parser = commands.add_parser(
        "generate",
        help="generate text with a saved LIME / LIME+1 model, optionally guided by tags",
        description=(
            "Load a saved LIME model and its LimeTokenizer, tag the prompt with spaCy and generate. A LIME+1 "
            "model can be guided: `--guide pos=NNP,VBD` asks for a proper noun, then a past-tense verb, one "
            "label per generated token; after the schedule the provider takes over."
        ),
    )
    parser.add_argument("model", help="folder written by `save_pretrained` (model and LimeTokenizer)")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="(default: %(default)s)")
    parser.add_argument(
        "--guide",
        action="append",
        default=[],
        metavar="FIELD=LABELS",
        help=(
            "LIME+1 guidance: the labels of the next generated tokens, comma-separated (space-separated "
            "when a label is a comma: 'pos=NNP , VBD'); repeat the option for other fields"
        ),
    )
    parser.add_argument(
        "--provider",
        choices=["annotate", "unknown"],
        help=(
            "tags of generated tokens that guidance does not cover: re-annotate the text (LIME's default) "
            "or unknown (LIME+1's default)"
        ),
    )
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    parser.add_argument("--num-return-sequences", type=int, default=1, help="(default: %(default)s)")
    parser.set_defaults(run=run_generate, parser=parser)


def add_demo_parser(commands: Any) -> None:
    """`demo`: see `lime_hf.demo`."""
    parser = commands.add_parser(
        "demo",
        help="train baseline, LIME and LIME+1 tiny models on the World English Bible and compare them",
        description=(
            "Train a byte-level BPE, annotate a public-domain corpus (World English Bible) with spaCy, train "
            "three tiny Llama models on the same token stream (baseline without metadata, LIME, LIME+1), "
            "print and plot their held-out next-token accuracy, save the LIME+1 model and show guided "
            "generation. About five minutes on two CPU cores."
        ),
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("lime-demo"), help="where results go (default: %(default)s)"
    )
    parser.add_argument("--max-steps", type=int, help="training steps per model (default: the setting's)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long setting, for tests")
    parser.set_defaults(run=run_demo, parser=parser)


def run_annotate(args: argparse.Namespace) -> None:
    """Load the texts, annotate them (`annotate_dataset`: progress bar, `num_proc`) and `save_to_disk`."""
    from .pretrain import load_texts

    if args.executor is not None:
        return run_annotate_datatrove(args)
    try:
        texts = load_texts(args.sources, args.dataset_config, args.split, args.text_column)
        annotated = annotate_dataset(
            texts,
            fields=args.fields,
            spacy_model=args.spacy_model,
            batch_size=args.batch_size,
            num_proc=args.num_proc,
        )
    except (ValueError, OSError) as error:  # missing file or column, unknown dataset or spaCy pipeline
        args.parser.error(str(error))
    annotated.save_to_disk(str(args.output))
    print(f"Annotated {len(annotated)} texts with {', '.join(args.fields)}; saved to {args.output}")


def run_annotate_datatrove(args: argparse.Namespace) -> None:
    """`annotate --executor ...`: `lime_hf.integrations.datatrove.annotate_corpus`."""
    try:
        from .integrations.datatrove import annotate_corpus

        if len(args.sources) != 1:
            raise ValueError(f"--executor takes one input folder of shards, got {args.sources}")
        slurm = (
            {"partition": args.slurm_partition, "time": args.slurm_time} if args.executor == "slurm" else {}
        )
        logging_dir = args.logging_dir or str(args.output.parent / f"logs-{args.output.name}")
        annotate_corpus(
            args.sources[0], str(args.output), logging_dir, args.executor, args.tasks, args.workers,
            args.fields, args.spacy_model, args.text_column, args.batch_size, **slurm,
        )  # fmt: skip
    except ImportError as error:
        args.parser.error(f'{error}; the executors need `pip install "lime_hf[datatrove]"`')
    except (ValueError, OSError, RuntimeError) as error:
        args.parser.error(str(error))
    done = "Submitted the Slurm job array for" if args.executor == "slurm" else "Annotated"
    print(
        f"{done} {args.sources[0]} ({', '.join(args.fields)}): Parquet shards in {args.output}, logs in {logging_dir}"
    )


def run_train(args: argparse.Namespace) -> int:
    """Hand every argument to the pretraining script."""
    from .pretrain import main as pretrain_main

    return pretrain_main(args.script_args) or 0


def run_generate(args: argparse.Namespace) -> None:
    """Load model and tokenizer, tag the prompt, generate (guided when asked) and print each sequence."""
    # The Auto classes know the "lime" model type: importing this module imported `lime_hf`.
    hf_logging.disable_progress_bar()  # print the generated text only
    guidance = parse_guide_options(args.guide, args.parser)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    except (OSError, ValueError) as error:
        args.parser.error(f"could not load a model and tokenizer from {args.model!r}: {error}")
    set_seed(args.seed)
    encoding = tokenizer(args.prompt, return_tensors="pt")
    try:
        output = model.generate(
            **encoding,
            tokenizer=tokenizer,
            guidance=guidance or None,
            metadata_provider=args.provider,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            num_return_sequences=args.num_return_sequences,
        )
    except ValueError as error:  # unknown field or label, guidance for a LIME model, ...
        args.parser.error(str(error))
    for text in tokenizer.batch_decode(output, skip_special_tokens=True):
        print(text)


def parse_guide_options(options: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """`["pos=NNP,VBD", "ner=O"]` -> `{"pos": ["NNP", "VBD"], "ner": ["O"]}`; bad syntax -> usage error."""
    guidance: dict[str, list[str]] = {}
    for option in options:
        field, equals, value = option.partition("=")
        labels = value.split() if any(c.isspace() for c in value) else value.split(",")
        if not equals or not field or not all(labels):
            parser.error(
                f"--guide {option!r}: expected FIELD=LABEL,LABEL,... (e.g. pos=NNP,VBD), with no empty label"
            )
        if field in guidance:
            parser.error(f"--guide gives field {field!r} twice")
        guidance[field] = labels
    return guidance


def run_demo(args: argparse.Namespace) -> None:
    """Run `lime_hf.demo.main`."""
    from .demo import main as demo_main

    demo_main(output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed, quick=args.quick)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lime-hf` console script; returns the exit code."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
