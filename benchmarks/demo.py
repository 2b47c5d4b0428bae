"""The demo's numbers: runs `lime_hf.demo.main` (the code `lime-hf demo` runs) with its default settings and
records the held-out accuracy curves, LIME's steps to the baseline's final accuracy and the generated texts.

Usage: python benchmarks/demo.py [--seed 0] [--output-dir lime-demo-benchmark]
Writes benchmarks/results/demo.json and demo.csv (one row per accuracy measurement).
"""

import argparse
import ast
import contextlib
import io
import os
import platform
import re
import sys
import time

import torch
from common import save_results  # the benchmarks' shared helpers

from lime_hf import demo

# The three texts `guided_generation` prints, e.g. "  LIME+1, guided:      'After these things, ...'".
GENERATED = re.compile(
    r"^  (LIME\+1, guided|LIME\+1, self-guided|baseline):\s+('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")",
    re.MULTILINE,
)
AGREEMENT = re.compile(r"spaCy finds the asked tag on (\d+) of (\d+) tokens")


class Tee(io.TextIOBase):
    """Writes to the terminal and keeps a copy: the demo's output is read back for the generated texts."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        return self.copy.write(text)

    def flush(self) -> None:
        self.stream.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="lime-demo-benchmark")
    args = parser.parse_args()

    settings = demo.DEFAULT_SETTINGS
    tee = Tee(sys.stdout)
    start = time.perf_counter()
    with contextlib.redirect_stdout(tee):
        curves = demo.main(output_dir=args.output_dir, seed=args.seed)
    wall_s = time.perf_counter() - start
    output = tee.copy.getvalue()

    tokens_per_step = settings.batch_size * settings.block_size
    rows = [
        {
            "step": step,
            "tokens": step * tokens_per_step,
            **{f"{name}_accuracy": curves[name][index][1] for name in curves},
        }
        for index, (step, _) in enumerate(curves["baseline"])
    ]
    final = {name: curve[-1][1] for name, curve in curves.items()}
    reached = demo.tokens_to_reach(curves["LIME"], final["baseline"])
    agree, asked = map(int, AGREEMENT.search(output).groups())
    summary = {
        "what": "lime_hf.demo.main with DEFAULT_SETTINGS (lime-hf demo): held-out next-token accuracy",
        "seed": args.seed,
        "settings": {
            key: getattr(settings, key)
            for key in ("train_books", "eval_books", "vocab_size", "block_size", "batch_size", "max_steps")
        }
        | {"text_config": settings.text_config, "prompt": settings.prompt, "guidance": settings.guidance},
        "tokens_per_step": tokens_per_step,
        "curves": {name: [[step, accuracy] for step, accuracy in curve] for name, curve in curves.items()},
        "final_accuracy": final,
        "lime_steps_to_baseline_final": reached,
        # The texts as printed (their repr), read back.
        "generated": {name: ast.literal_eval(text) for name, text in GENERATED.findall(output)},
        "guided_tags_spacy_agrees": agree,
        "guided_tags_asked": asked,
        "wall_s": wall_s,
        "device": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1min_at_end": os.getloadavg()[0],
            "torch": torch.__version__,
        },
    }
    save_results("demo", summary, rows)
    print(f"\n{wall_s:.0f} s; wrote benchmarks/results/demo.json and demo.csv")


if __name__ == "__main__":
    main()
