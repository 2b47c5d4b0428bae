"""Every committed run of `benchmarks/meta_attention.py` side by side, with how often each goal was met.

The latest run is `results/meta_attention.json` (the Benchmarks table reads it); the glibc-tuned run is
`results/meta_attention_glibc_tuned.json`; earlier runs, overwritten in git history, were recovered into
`results/meta_attention_runs/` with a `provenance` field (commit, date, shape, machine load).

Usage: python benchmarks/meta_attention_runs.py   (prints the Markdown table and tallies of docs/benchmarks.md)
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STEP_GOAL, GENERATE_GOAL = 1.10, 0.95  # meta-token model / backbone: step time at most, positions/s at least
# Every run on record, oldest first (the two current files carry no provenance field of their own).
RUNS = {
    "meta_attention_runs/2026-12-03_d631de3.json": "d631de3, a smaller trial shape, load not recorded",
    "meta_attention_runs/2026-12-03_06f18fb.json": "06f18fb, busy machine",
    "meta_attention_runs/2026-12-03_50f17f5.json": "50f17f5, busy machine",
    "meta_attention.json": "35ab04b, quiet machine (the Benchmarks table)",
    "meta_attention_glibc_tuned.json": "35ab04b, quiet machine, glibc malloc tuned",
}


def load_runs() -> list[tuple[str, dict]]:
    """(label, results) of every run on record, oldest first."""
    return [(label, json.loads((RESULTS / name).read_text())) for name, label in RUNS.items()]


def default_shape(data: dict) -> bool:
    """The benchmark's default shape (training batch 8 x 512, generate at batch 1 and 8), not the first trial."""
    return data["args"]["batch_size"] == 8 and data["args"]["seq_len"] == 512


def ratios(data: dict, section: str, key: str) -> dict[tuple[str, int | None], float]:
    """`{(arch, batch): ratio}`; training steps have no batch key."""
    return {
        (row["arch"], row["batch"] if section == "generation" else None): row[key]
        for row in data[section]
        if key in row
    }


def cell(values: dict, arch: str, batches: tuple) -> str:
    found = [(batch, values[(arch, batch)]) for batch in batches if (arch, batch) in values]
    if not found:
        found = [(batch, value) for (name, batch), value in values.items() if name == arch]
        return " / ".join(f"{value:.2f}x (batch {batch})" for batch, value in found) or "-"
    return " / ".join(f"{value:.2f}x" for _, value in found)


def table() -> str:
    lines = [
        "| run | step Llama / GPT-2 | step / parameter-matched, Llama / GPT-2 | generate Llama, batch 1 / 8 "
        "| generate GPT-2, batch 1 / 8 | no meta-token placed, batch 1, Llama / GPT-2 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, data in load_runs():
        step = ratios(data, "train_step", "meta_over_backbone")
        matched = ratios(data, "train_step", "meta_over_matched")
        generate = ratios(data, "generation", "meta_over_backbone")
        none = ratios(data, "generation", "no_meta_tokens_over_backbone")
        none_cell = (
            " / ".join(f"{none[(arch, 1)]:.2f}x" for arch in ("llama", "gpt2")) if none else "(not measured)"
        )
        lines.append(
            f"| {label} | {step[('llama', None)]:.2f}x / {step[('gpt2', None)]:.2f}x "
            f"| {matched[('llama', None)]:.2f}x / {matched[('gpt2', None)]:.2f}x "
            f"| {cell(generate, 'llama', (1, 8))} | {cell(generate, 'gpt2', (1, 8))} | {none_cell} |"
        )
    return "\n".join(lines)


def tallies() -> dict[str, tuple[int, int]]:
    """(met, measured) per goal over the runs at the default shape, and over every run."""
    counts = {}
    for scope, keep in (("default_shape", default_shape), ("all", lambda data: True)):
        runs = [data for _, data in load_runs() if keep(data)]
        steps = [
            value for data in runs for value in ratios(data, "train_step", "meta_over_backbone").values()
        ]
        generates = [
            value for data in runs for value in ratios(data, "generation", "meta_over_backbone").values()
        ]
        counts[f"step_{scope}"] = (sum(round(v, 2) <= STEP_GOAL for v in steps), len(steps))
        counts[f"generate_{scope}"] = (sum(round(v, 2) >= GENERATE_GOAL for v in generates), len(generates))
    return counts


def ranges() -> dict[str, tuple[float, float]]:
    """Lowest and highest ratio per measure over the runs at the default shape."""
    runs = [data for _, data in load_runs() if default_shape(data)]
    out = {}
    for name, section, key, arch in (
        ("step_llama", "train_step", "meta_over_backbone", "llama"),
        ("step_gpt2", "train_step", "meta_over_backbone", "gpt2"),
        ("matched", "train_step", "meta_over_matched", None),
        ("generate", "generation", "meta_over_backbone", None),
        ("no_meta_token", "generation", "no_meta_tokens_over_backbone", None),
    ):
        values = [
            value
            for data in runs
            for (row_arch, _), value in ratios(data, section, key).items()
            if arch in (None, row_arch)
        ]
        out[name] = (min(values), max(values))
    return out


if __name__ == "__main__":
    print(table())
    print({name: f"met in {met} of {total}" for name, (met, total) in tallies().items()})
    print({name: f"{low:.2f}-{high:.2f}x" for name, (low, high) in ranges().items()})
