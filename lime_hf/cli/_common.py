"""What the commands share: the parser class, argparse types, one-line errors and plain-text tables.

Standard library only: every command's parser is built from here on each `lime-hf` call, `--help` included.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

# Every command, in the order `lime-hf --help` lists them, with its line there. The module `lime_hf.cli.<name>`
# holds the command's arguments and work; only the module of the command being run is imported.
COMMANDS = {
    "annotate": "annotate text with spaCy and save the tag spans as an Arrow dataset",
    "pack": "align a corpus to a saved LimeTokenizer and pack it into block shards (datatrove executors)",
    "train": "pretrain a LIME model (see `lime-hf train --help`)",
    "generate": "generate text with a saved LIME / LIME+1 model, optionally guided by tags",
    "tag": "show how a text is tokenized and tagged (a table of tokens with their POS/NER tags)",
    "demo": "train baseline, LIME and LIME+1 tiny models on the World English Bible and compare them",
    "app": "serve a web page for guided generation with a saved model",
    "eval": "lm-eval's command line with the `lime` model (--model lime; see `lime-hf eval --help`)",
}


class Parser(argparse.ArgumentParser):
    """
    An `ArgumentParser` whose errors are one line and a pointer to `--help`, without the usage block, and that
    takes no abbreviations: `--max-step` is a typo to report, not `--max-steps`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n  (see `{self.prog} --help`)\n")


def add_command(
    subparsers: Any,
    name: str,
    run: Callable[[argparse.Namespace], Any],
    check: Callable[[argparse.Namespace], Any] | None = None,
    **kwargs: Any,
) -> Parser:
    """
    The subcommand `name`'s parser (`kwargs` as for `add_parser`). `lime_hf.cli.main` calls `check(args)` first
    (standard library only: it refuses mistakes before anything heavy loads; a `ValueError` is a usage error),
    then `run(args)`, the work; `args.parser` is this parser, for one-line errors.
    """
    parser = subparsers.add_parser(name, help=COMMANDS[name], **kwargs)
    parser.set_defaults(parser=parser, run=run, check=check)
    return parser


def one_line(error: BaseException | str) -> str:
    """An exception's message on one line (some libraries' messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


@contextmanager
def usage_errors(parser: argparse.ArgumentParser, *kinds: type[BaseException]) -> Iterator[None]:
    """
    Turn the exceptions `kinds` (default `ValueError` and `OSError`: input the command cannot use) into the
    parser's one-line error and exit code 2.
    """
    caught = kinds or (ValueError, OSError)
    try:
        yield
    except caught as error:
        parser.error(one_line(error))


def positive(kind: type) -> Any:
    """An argparse `type` accepting numbers > 0 of `kind`."""

    def convert(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value

    convert.__name__ = f"positive {kind.__name__}"
    return convert


def probability(text: str) -> float:
    """An argparse `type` for a number in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError(text)
    return value


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, a rule under the header."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
