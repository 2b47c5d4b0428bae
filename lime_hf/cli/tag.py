"""`lime-hf tag`: how a text is tokenized and tagged, as a table of tokens with their tags."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from ..options import ALIGNMENTS
from ._common import add_command, format_table, one_line

# The shape of a Hub repository id, `name` or `owner/name` (huggingface_hub's `validate_repo_id`, simplified):
# anything else that is not a folder here cannot be a tokenizer.
HUB_ID = re.compile(r"(?!\.)[\w.-]+(/(?!\.)[\w.-]+)?")


def add_parser(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "tag",
        run,
        check,
        description=(
            "Tokenize TEXT with a LimeTokenizer (or a fast tokenizer, wrapped in one) and print every token "
            "with its metadata tags, as the model receives them."
        ),
    )
    parser.add_argument("text", help="the text to tag ('-' reads standard input)")
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="a saved LimeTokenizer or model folder, or a fast tokenizer (folder or Hub id)",
    )
    parser.add_argument(
        "--alignment",
        choices=ALIGNMENTS,
        help="alignment mode (default: the tokenizer's own, else pretokenized)",
    )


def check(args: argparse.Namespace) -> None:
    args.text = sys.stdin.read() if args.text == "-" else args.text
    if not args.text.strip():
        raise ValueError("the text is empty: give a text to tag")
    if not Path(args.tokenizer).exists() and not HUB_ID.fullmatch(args.tokenizer):
        raise ValueError(
            f"no such folder {args.tokenizer!r}: give a saved tokenizer or model folder, or a Hub id (owner/name)"
        )


def run(args: argparse.Namespace) -> None:
    """Print the text's tokens with their tags, as the model receives them."""
    from ..tagged_generation import load_lime_tokenizer

    try:
        tokenizer = load_lime_tokenizer(args.tokenizer, args.alignment)
        encoding = tokenizer(args.text, return_offsets_mapping=True)
    except (ValueError, OSError) as error:
        if Path(args.tokenizer).exists():
            args.parser.error(one_line(error))
        # Not a folder here, so it was tried as a Hub id: offline, or no such repository, or no tokenizer in it.
        args.parser.error(
            f"no such folder {args.tokenizer!r}, and it does not load as a Hub id: {one_line(error)}"
        )
    header = ["#", "token", "id", "chars", *tokenizer.metadata_fields]
    rows = []
    for index, (token, (start, end)) in enumerate(
        zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    ):
        tags = [
            tokenizer.metadata_fields[name][encoding[f"{name}_ids"][index]]
            for name in tokenizer.metadata_fields
        ]
        rows.append([str(index), repr(tokenizer.decode([token])), str(token), f"{start}-{end}", *tags])
    print(f"{len(rows)} tokens, alignment {tokenizer.alignment!r}:")
    print(format_table(header, rows))
