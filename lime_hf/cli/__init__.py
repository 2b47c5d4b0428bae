"""The `lime-hf` command line: `main` parses, checks and runs one command; each command is a module here.

    lime-hf annotate book.txt --output annotated/          # spaCy once -> Arrow dataset of char-span tags
    lime-hf train book.txt --train-tokenizer 8000          # pretrain (lime_hf.pretrain); Trainer options too
    lime-hf generate MODEL_DIR "The king" --guide pos=VBD,DT,NN --show-tags
    lime-hf tag "The king left." --tokenizer MODEL_DIR     # how a text is tagged and aligned
    lime-hf demo                                           # baseline vs LIME vs LIME+1 in a few minutes
    lime-hf app MODEL_DIR                                  # a web page for guided generation
    lime-hf eval --model lime --model_args pretrained=MODEL_DIR --tasks T   # lm-eval's own command line

Each command module holds its arguments (`add_parser`), its checks of the user's input (`check`, standard library
only) and its work (`run`, which imports torch, transformers, spaCy and the library's heavy modules when it
runs). So `--help` and every usage error answer in tens of milliseconds. The CLI uses the library; the library
never imports the CLI. Every mistake in the user's input ends the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import annotate, app, demo, generate, tag, train
from . import eval as evaluate
from ._common import Parser, usage_errors

COMMANDS = (annotate, train, generate, tag, demo, app, evaluate)


def build_parser() -> Parser:
    """The `lime-hf` parser, one subcommand per module of `COMMANDS`."""
    parser = Parser(
        prog="lime-hf",
        description="LIME (Linguistic Metadata Embeddings) for Hugging Face Transformers.",
        epilog="Run `lime-hf COMMAND --help` for the options of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lime-hf` console script; returns the exit code."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.check is not None:
        with usage_errors(args.parser, ValueError):  # refuse what can be refused before anything heavy loads
            args.check(args)
    return args.run(args) or 0


__all__ = ["build_parser", "main"]
