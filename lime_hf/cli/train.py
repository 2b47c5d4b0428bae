"""`lime-hf train`: the command line of the pretraining pipeline (`lime_hf.pretrain.run`).

The sources come first, then the LIME options (`TrainOptions`), then any `TrainingArguments` option, dashed or
with underscores. The LIME options are parsed and checked once, here, before anything heavy loads; the Trainer's
are parsed by `HfArgumentParser` when the command runs. `main` is the same command as a script
(`examples/pretrain.py`, under `accelerate launch` or `torchrun`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..options import SOURCES_HELP, TrainOptions, check_train_options
from ._common import Parser, add_command, usage_errors

if TYPE_CHECKING:
    from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

PROG = "lime-hf train"
EPILOG = """\
Trainer options: every `TrainingArguments` option is accepted as well, with dashes or underscores
(--output-dir, default lime-pretrain; --max-steps, --learning-rate, --per-device-train-batch-size,
--logging-steps, default 0.05 = every 5 % of the steps; --save-steps, --eval-strategy, --bf16, --use-cpu,
--push-to-hub, ...). `lime-hf train --help-trainer` lists all of them.
"""


def add_parser(subparsers: Any) -> None:
    """`train` hands its whole command line to `build_train_parser` (and the rest to the Trainer's parser)."""
    parser = add_command(
        subparsers,
        "train",
        run,
        check,
        add_help=False,
        prefix_chars="\0",  # `--help` and the rest reach `build_train_parser` untouched
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER)


def check(args: argparse.Namespace) -> None:
    args.options, args.trainer_argv = parse_train_arguments(args.argv, args.parser.prog)
    check_train_options(args.options)


def run(args: argparse.Namespace) -> None:
    """Parse the Trainer's options, then run the pipeline on the checked LIME options."""
    with usage_errors(args.parser):  # a typo'd Trainer option is refused before the pipeline loads anything
        training_args = trainer_arguments(args.trainer_argv, args.parser.prog)
    from .. import pretrain

    with usage_errors(args.parser):  # no documents, a tokenizer or backbone that does not load, ...
        pretrain.run(args.options, training_args)


def main(
    argv: Sequence[str] | None = None,
    callbacks: list[TrainerCallback] | None = None,
    prog: str = PROG,
) -> None:
    """`lime-hf train` as a script: `argv` (default `sys.argv[1:]`) -> `lime_hf.pretrain.run`; `ValueError` for bad input."""
    from .. import pretrain

    pretrain.run(*parse_args(argv, prog), callbacks=callbacks)


def parse_args(argv: Sequence[str] | None = None, prog: str = PROG) -> tuple[TrainOptions, TrainingArguments]:
    """The sources and LIME options (checked) and every `TrainingArguments` option of `argv`."""
    options, rest = parse_train_arguments(sys.argv[1:] if argv is None else argv, prog)
    check_train_options(options)
    return options, trainer_arguments(rest, prog)


def dashed(argv: Sequence[str]) -> list[str]:
    """Option names spelled with underscores (`--block_size 64`, the Trainer's style) in their dashed form."""
    spelled = []
    for arg in argv:
        name, equals, value = arg.partition("=")
        spelled.append(name.replace("_", "-") + equals + value if arg.startswith("--") else arg)
    return spelled


def build_train_parser(prog: str = PROG) -> Parser:
    """The LIME options of `TrainOptions` (dashed; defaults left to the dataclass); the Trainer's are left over."""
    parser = Parser(
        prog=prog,
        usage=(
            f"{prog} SOURCE [SOURCE ...] (--tokenizer PATH | --train-tokenizer VOCAB) [options]\n"
            f"       {prog} --shards FOLDER --tokenizer PATH --max-steps N [options]"
        ),
        description=(
            "Pretrain a LIME decoder on raw texts: annotate, align, pack, train, evaluate, save.\n\n"
            f"SOURCE (first): {SOURCES_HELP}."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a prefix of a Trainer option must not match one of ours
    )
    for option in fields(TrainOptions):
        if option.name != "sources":
            flag = f"--{option.name.replace('_', '-')}"
            parser.add_argument(flag, dest=option.name, default=argparse.SUPPRESS, **option.metadata)
    parser.add_argument("--help-trainer", action=TrainerHelp)
    return parser


def parse_train_arguments(argv: Sequence[str], prog: str = PROG) -> tuple[TrainOptions, list[str]]:
    """
    `train`'s command line -> the LIME options (the dataclass's defaults where not given) and the options left
    for the Trainer. The sources come first: which later words are values of Trainer options is unknown here.
    """
    argv = dashed(argv)
    count = next((index for index, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    known, rest = build_train_parser(prog).parse_known_args(argv[count:])
    # A word right after an option is that option's value (e.g. --output-dir's folder), never a late source.
    late = [
        arg
        for previous, arg in zip(["", *rest], rest, strict=False)
        if not arg.startswith("-")
        and not (previous.startswith("-") and "=" not in previous)
        and (arg.endswith(".txt") or Path(arg).exists())
    ]
    if count == 0 and late and "shards" not in vars(known):
        raise ValueError(
            f"The sources come first, before the options: `{prog} {' '.join(late)} [options]` "
            f"(got {', '.join(late)} after them)."
        )
    return TrainOptions(sources=argv[:count], **vars(known)), rest


class TrainerHelp(argparse.Action):
    """`--help-trainer`: print the `TrainingArguments` options (this imports transformers) and exit."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="list the Trainer's options"
        )

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None
    ):
        trainer_parser(parser.prog).print_help()
        parser.exit()


def trainer_parser(prog: str = PROG) -> HfArgumentParser:
    """The `TrainingArguments` options, with this command's defaults: output folder, 20 logs per run."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(
        TrainingArguments, prog=prog, usage=f"{prog} SOURCE ... [options]", allow_abbrev=False
    )
    parser.set_defaults(output_dir="lime-pretrain", logging_steps=0.05, logging_first_step=True)
    return parser


def trainer_arguments(argv: Sequence[str], prog: str = PROG) -> TrainingArguments:
    """The `TrainingArguments` of `argv` (what the LIME parser left); `ValueError` for an unknown option."""
    parser = trainer_parser(prog)
    training_args, unknown = parser.parse_args_into_dataclasses(
        args=list(argv), return_remaining_strings=True
    )
    if unknown:
        known = [*parser._option_string_actions, *build_train_parser(prog)._option_string_actions]
        names = [arg.partition("=")[0] for arg in unknown if arg.startswith("--")]
        hints = [f"{close[0]} for {name}" for name in names if (close := get_close_matches(name, known, n=1))]
        raise ValueError(
            f"Unrecognized arguments {unknown}"
            + (f" (did you mean {', '.join(hints)}?)" if hints else "")
            + f": `{prog} --help` lists the LIME options, `{prog} --help-trainer` the Trainer's."
        )
    return training_args
