"""The demo's numbers: runs `lime_hf.demo.main` (the code `lime-hf demo` runs) with its default settings and
records the held-out accuracy curves (with the tags each model read), honest LIME's and LIME's steps to the
baseline's final accuracy, and the generated texts.

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
import resource
import sys
import time

import torch
from common import save_results  # the benchmarks' shared helpers

from lime_hf import demo

# The four texts `guided_generation` prints, e.g. "  LIME+1, guided:           'After these things, ...'".
GENERATED = re.compile(
    r"^  (LIME\+1, guided|LIME\+1, self-guided|honest LIME, self-tagged|baseline):\s+"
    r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")",
    re.MULTILINE,
)
AGREEMENT = re.compile(r"spaCy finds the asked tag on (\d+) of (\d+) tokens")
OWN_TAGS = re.compile(r"honest LIME's own POS tags of the new tokens: (.*)$", re.MULTILINE)


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
    load_at_start = os.getloadavg()[0]
    start = time.perf_counter()
    with contextlib.redirect_stdout(tee):
        curves = demo.main(output_dir=args.output_dir, seed=args.seed)
    wall_s = time.perf_counter() - start
    # CPU seconds of this process and its annotation workers: on a shared machine they vary less than the wall time.
    cpu_s = sum(
        usage.ru_utime + usage.ru_stime
        for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
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
    reached = {
        name: demo.tokens_to_reach(curves[name], final["baseline"]) for name in ("LIME", "honest LIME")
    }
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
        # What each curve's model read on the held-out text ("own tags": `input_ids` alone, tagged by its heads).
        "tags_read": demo.TAGS,
        "curves": {name: [[step, accuracy] for step, accuracy in curve] for name, curve in curves.items()},
        "final_accuracy": final,
        "honest_gain_points": 100 * (final["honest LIME"] - final["baseline"]),
        "lime_steps_to_baseline_final": reached["LIME"],
        "honest_steps_to_baseline_final": reached["honest LIME"],
        # The texts as printed (their repr), read back.
        "generated": {name: ast.literal_eval(text) for name, text in GENERATED.findall(output)},
        "guided_tags_spacy_agrees": agree,
        "guided_tags_asked": asked,
        "honest_own_pos_tags": OWN_TAGS.search(output).group(1).split(),
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "device": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1min_at_start": load_at_start,
            "load_average_1min_at_end": os.getloadavg()[0],
            "torch": torch.__version__,
        },
    }
    save_results("demo", summary, rows)
    print(f"\n{wall_s:.0f} s ({cpu_s:.0f} CPU s); wrote benchmarks/results/demo.json and demo.csv")


if __name__ == "__main__":
    main()
