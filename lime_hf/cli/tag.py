"""`lime-hf tag`: how a text is tokenized and tagged, as a table of tokens with their tags."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from ..options import ALIGNMENTS, check_model_folder
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
    parser.add_argument(
        "--heads",
        action="store_true",
        help="also show the tags the model's tag heads predict for each token, causally (from the tokens up to it; "
        "for LIME+1, from those before it): --tokenizer must be a saved model with tag heads",
    )


def check(args: argparse.Namespace) -> None:
    args.text = sys.stdin.read() if args.text == "-" else args.text
    if not args.text.strip():
        raise ValueError("the text is empty: give a text to tag")
    if not Path(args.tokenizer).exists() and not HUB_ID.fullmatch(args.tokenizer):
        raise ValueError(
            f"no such folder {args.tokenizer!r}: give a saved tokenizer or model folder, or a Hub id (owner/name)"
        )
    if args.heads:
        config = check_model_folder(args.tokenizer)
        if not config.get("tag_head_fields"):
            raise ValueError(
                f"--heads shows the predictions of a model's tag heads, and {args.tokenizer!r} has none "
                "(config.tag_head_fields is empty)"
            )
        if args.alignment is not None:
            raise ValueError(
                "--heads tags the text as the model reads it, with its own tokenizer: drop --alignment"
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
    if args.heads:
        for name, tags in heads_predictions(args.tokenizer, encoding["input_ids"]).items():
            header.append(f"{name} heads")
            for row, tag in zip(rows, tags, strict=True):
                row.append(tag)
    print(f"{len(rows)} tokens, alignment {tokenizer.alignment!r}:")
    print(format_table(header, rows))
    labels = [row[4 : 4 + len(tokenizer.metadata_fields)] for row in rows]  # the given tags, not the heads'
    if any(
        a == b and a.startswith("B-")
        for pair in zip(labels, labels[1:], strict=False)
        for a, b in zip(*pair, strict=True)
    ):
        print(
            "note: every subword of a word carries the word's tags, B- included: LIME tags words (spaCy's tokens), "
            "and a subword reads its word's tags, so a word reads the same tags under any tokenizer "
            "(docs/tokenizer.md, alignment)",
            file=sys.stderr,
        )


def heads_predictions(path: str, input_ids: list[int]) -> dict[str, list[str]]:
    """Per field with a tag head, the label the model saved in `path` predicts for each token, causally."""
    import torch
    from transformers.utils import logging as hf_logging

    from ..tag_heads import self_tags
    from ..tagged_generation import load_model

    hf_logging.disable_progress_bar()  # print the table only
    model, _ = load_model(path)
    with torch.no_grad():
        tags, _ = self_tags(model, torch.tensor([input_ids]))
    labels = model.config.metadata_fields
    return {
        name: [labels[name][tag] for tag in tags[name][0].tolist()] for name in model.config.tag_head_fields
    }
