"""`lime-hf eval`: lm-evaluation-harness's own command line, with the `lime` model registered."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import add_command


def add_parser(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "eval",
        run,
        add_help=False,
        prefix_chars="\0",  # every argument, `--help` included, reaches lm-eval unchanged
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> None:
    try:
        from ..integrations.lm_eval import main
    except ImportError as error:
        args.parser.error(f'{error}; `lime-hf eval` needs `pip install "lime_hf[eval]"`')
    main(args.argv)
