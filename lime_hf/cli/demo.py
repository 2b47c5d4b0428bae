"""`lime-hf demo`: baseline, honest LIME, LIME and LIME+1 tiny models trained and compared in a few minutes
(`lime_hf.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import add_command, positive


def add_parser(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "demo",
        run,
        description=(
            "Train a byte-level BPE, annotate a public-domain corpus (World English Bible) with spaCy, train "
            "four tiny Llama models on the same token stream (baseline without metadata; honest LIME, which "
            "tags its input itself, no spaCy or oracle at evaluation; LIME with spaCy's tags; LIME+1 with the "
            "true next-token tags), print and plot their held-out next-token accuracy, save the LIME+1 and "
            "honest LIME models and show guided and self-tagged generation. About five minutes on two CPU cores."
        ),
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("lime-demo"), help="where results go (default: %(default)s)"
    )
    parser.add_argument(
        "--max-steps", type=positive(int), help="training steps per model (default: the setting's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long setting, for tests")


def run(args: argparse.Namespace) -> None:
    from ..demo import main

    main(output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed, quick=args.quick)
