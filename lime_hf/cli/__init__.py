"""The `lime-hf` command line: `main` parses, checks and runs one command; each command is a module here.

    lime-hf annotate book.txt --output annotated/          # spaCy once -> Arrow dataset of char-span tags
    lime-hf pack annotated/ -o blocks/ --tokenizer TOK_DIR --block-size 512   # aligned block shards, datatrove
    lime-hf train book.txt --train-tokenizer 8000          # pretrain (lime_hf.pretrain); Trainer options too
    lime-hf generate MODEL_DIR "The king" --guide pos=VBD,DT,NN --show-tags
    lime-hf tag "The king left." --tokenizer MODEL_DIR     # how a text is tagged and aligned
    lime-hf demo                                           # baseline vs LIME vs LIME+1 in a few minutes
    lime-hf app MODEL_DIR                                  # a web page for guided generation
    lime-hf eval --model lime --model_args pretrained=MODEL_DIR --tasks T   # lm-eval's own command line

Each command module holds its arguments (`add_parser`), its checks of the user's input (`check`, standard library
only) and its work (`run`, which imports torch, transformers, spaCy and the library's heavy modules when it
runs); only the module of the command being run is imported. So `--help` and every usage error answer in tens
of milliseconds. The CLI uses the library; the library
never imports the CLI. Every mistake in the user's input ends the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from ._common import COMMANDS, Parser, usage_errors


def build_parser(command: str | None = None) -> Parser:
    """
    The `lime-hf` parser: `command` (default: every command) with its arguments, the other commands by name only,
    for `lime-hf --help` (their arguments are parsed only when they run).
    """
    parser = Parser(
        prog="lime-hf",
        description="LIME (Linguistic Metadata Embeddings) for Hugging Face Transformers.",
        epilog="Run `lime-hf COMMAND --help` for the options of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, help in COMMANDS.items():
        if command in (None, name):
            importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lime-hf` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word that is not an option (`lime-hf` itself has only -h); for `--help`, none.
    command = next((arg for arg in argv if not arg.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    if args.check is not None:
        with usage_errors(args.parser, ValueError):  # refuse what can be refused before anything heavy loads
            args.check(args)
    return args.run(args) or 0


__all__ = ["build_parser", "main"]
