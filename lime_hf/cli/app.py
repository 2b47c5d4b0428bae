"""`lime-hf app`: a local web page for guided generation with a saved model (`lime_hf.integrations.app`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..options import check_model_folder
from ._common import add_command, usage_errors


def add_parser(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "app",
        run,
        check,
        description=(
            "Serve a local web page: type a prompt, edit the guide tags per step, and see the generated tokens "
            "coloured by tag, with spaCy's tags of the output beside the asked ones."
        ),
    )
    parser.add_argument("model", help="folder written by `save_pretrained` (model and LimeTokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="(default: %(default)s; 0 picks a free port)")


def check(args: argparse.Namespace) -> None:
    check_model_folder(args.model)


def run(args: argparse.Namespace) -> None:
    """Serve the guided-generation page until interrupted."""
    from ..integrations.app import serve
    from ..tagged_generation import load_model

    with usage_errors(args.parser):
        model, tokenizer = load_model(args.model)
    serve(model, tokenizer, host=args.host, port=args.port, name=args.model)
