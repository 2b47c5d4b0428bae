"""Honest LIME's speed: a model given `input_ids` alone, tagging them itself, against its backbone.

On the 4 x 256 benchmark backbone (`step_cost.TEXT_CONFIG`), every model shares the backbone's weights (retrofits:
zero metadata tables, random heads); the models with `metadata_layer > 0` get their own copy of it, since their hook
sits on one of its layers. Measured side by side in one run, as ratios to the backbone:

* scoring: one `model(input_ids=...)` call, batch 4, at 64/256/1,024 tokens, no tags given, for
  - backbone: the backbone's forward;
  - layer0_heads: today's LIME with tag heads (`metadata_layer=0`), which self-tags bare input sequentially (one
    cached step per token) before its forward;
  - honest: LIME with heads at `metadata_layer=2`, which tags inside its one forward (the default MLP heads);
  - honest_linear: the same with one linear classifier per field (`tag_head_type="linear"`, the honest runs' best);
  - honest_expected: honest_linear reading its tags as their probability-weighted embeddings
    (`predicted_tag_embedding="expected"`);
  (goal: honest <= 1.3x the backbone at 1,024 tokens)
* generation: greedy tokens/s with the KV cache, batch 1 and 8, no tags, guidance or provider given, for
  - backbone; honest, honest_linear and honest_expected (their own tags); honest1, honest1_linear and
    honest1_expected (LIME+1 at layer 2, guiding itself);
  - layer0_heads: today's heads model (`metadata_provider="model"`, the tracker's per-step work), for reference;
  (goal: >= 0.95x the backbone)
  Each layer-k model is also timed against its own backbone (the copy of the weights it wraps, its hook detached
  for that call): two identical models in different memory differ by several percent on this machine, which
  `backbone_copy` (a plain copy of the backbone) shows.

Runs alternate round by round; each number is the median of the rounds. Writes benchmarks/results/honest_speed.json
and .csv and prints a table.

    python benchmarks/honest_speed.py [--threads 1] [--rounds 5] [--generation-rounds 15] [--new-tokens 64]
        [--clock wall|cpu] [--label NAME]
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import statistics
from functools import partial
from pathlib import Path

import torch
from step_cost import CLOCKS, TEXT_CONFIG, generate_unhooked
from transformers import AutoModelForCausalLM, LlamaConfig

from lime_hf import LimeForCausalLM

RESULTS = Path(__file__).resolve().parent / "results"
HEADS = {"tag_head_fields": ["pos", "ner"]}
EXPECTED = {"predicted_tag_embedding": "expected"}
LAYER = 2  # of the backbone's 4 (the lead's pilot: layer 2)
SCORING_LENGTHS = (64, 256, 1024)
SCORING_BATCH = 4
GENERATION_BATCHES = (1, 8)
PROMPT_LENGTH = 16


def build_models(device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(LlamaConfig(**TEXT_CONFIG)).eval().to(device)
    return {
        "backbone": backbone,
        "backbone_copy": copy.deepcopy(backbone),  # the control: an identical model in other memory
        "layer0_heads": LimeForCausalLM.from_backbone(backbone, **HEADS).eval(),
        "honest": LimeForCausalLM.from_backbone(
            copy.deepcopy(backbone), metadata_layer=LAYER, **HEADS
        ).eval(),
        "honest1": LimeForCausalLM.from_backbone(
            copy.deepcopy(backbone), metadata_shift=1, metadata_layer=LAYER, **HEADS
        ).eval(),
        # The heads the honest runs recommend (docs/reproduction.md): one linear classifier per field.
        "honest_linear": LimeForCausalLM.from_backbone(
            copy.deepcopy(backbone), metadata_layer=LAYER, tag_head_type="linear", **HEADS
        ).eval(),
        "honest1_linear": LimeForCausalLM.from_backbone(
            copy.deepcopy(backbone), metadata_shift=1, metadata_layer=LAYER, tag_head_type="linear", **HEADS
        ).eval(),
        # Linear heads whose tags are read as their probability-weighted embeddings (the honest stage's choice).
        "honest_expected": LimeForCausalLM.from_backbone(
            copy.deepcopy(backbone), metadata_layer=LAYER, tag_head_type="linear", **EXPECTED, **HEADS
        ).eval(),
        "honest1_expected": LimeForCausalLM.from_backbone(
            copy.deepcopy(backbone),
            metadata_shift=1,
            metadata_layer=LAYER,
            tag_head_type="linear",
            **EXPECTED,
            **HEADS,
        ).eval(),
    }


def random_ids(shape: tuple[int, int], device: torch.device) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, TEXT_CONFIG["vocab_size"], shape, generator=generator).to(device)


def timed(call, device: torch.device, clock: str) -> float:
    """Seconds of `call()`: wall time, or with `clock="cpu"` this thread's CPU time (a shared machine's waits for
    a core are not counted; CPU only)."""
    now = CLOCKS[clock]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = now()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return now() - start


def median_times(
    calls: dict, rounds: int, device: torch.device, sequential_rounds: int, clock: str
) -> dict[str, float]:
    """name -> median seconds over alternating rounds (after one warm-up each); the sequential self-tagger, which
    costs minutes on a CPU at 1,024 tokens, runs `sequential_rounds` times."""
    for call in calls.values():
        call()
    seconds = {name: [] for name in calls}
    for index in range(rounds):
        for name, call in calls.items():
            if name == "layer0_heads" and index >= sequential_rounds:
                continue
            seconds[name].append(timed(call, device, clock))
    return {name: statistics.median(values) for name, values in seconds.items()}


@torch.no_grad()
def scoring(models: dict, rounds: int, device: torch.device, clock: str) -> list[dict]:
    rows = []
    for length in SCORING_LENGTHS:
        ids = random_ids((SCORING_BATCH, length), device)
        calls = {
            name: partial(models[name], input_ids=ids)
            for name in ("backbone", "layer0_heads", "honest", "honest_linear", "honest_expected")
        }
        seconds = median_times(calls, rounds, device, 1 if length > 256 else 2, clock)
        for name, value in seconds.items():
            rows.append(
                {
                    "benchmark": "scoring",
                    "model": name,
                    "batch": SCORING_BATCH,
                    "tokens": length,
                    "seconds": round(value, 5),
                    "ratio_to_backbone": round(value / seconds["backbone"], 3),
                }
            )
            print(f"scoring  {name:13s} batch {SCORING_BATCH} x {length:5d}: {value:8.4f} s "
                  f"{value / seconds['backbone']:7.2f}x the backbone", flush=True)  # fmt: skip
    return rows


@torch.no_grad()
def generation(models: dict, rounds: int, new_tokens: int, device: torch.device, clock: str) -> list[dict]:
    """Greedy generation against the shared backbone, and each layer-k model also against its own backbone (a copy
    of the same weights): `backbone_copy`, a plain copy, shows how far two identical models already differ."""
    rows = []
    for batch in GENERATION_BATCHES:
        ids = random_ids((batch, PROMPT_LENGTH), device)
        decoding = dict(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
        extra = {"layer0_heads": {"metadata_provider": "model"}}
        calls = {
            name: partial(model.generate, **decoding, **extra.get(name, {})) for name, model in models.items()
        }
        own = [
            name for name, model in models.items() if getattr(model, "metadata_injection", None) is not None
        ]
        calls |= {
            f"{name}/own_backbone": partial(
                generate_unhooked, models[name], models[name].metadata_injection, **decoding
            )
            for name in own
        }
        seconds = median_times(calls, rounds, device, rounds, clock)
        for name in models:
            value = seconds[name]
            speed = batch * new_tokens / value
            ratio = seconds["backbone"] / value
            own_ratio = seconds[f"{name}/own_backbone"] / value if name in own else None
            rows.append(
                {
                    "benchmark": "generation",
                    "model": name,
                    "batch": batch,
                    "tokens": new_tokens,
                    "seconds": round(value, 5),
                    "tokens_per_s": round(speed, 1),
                    "ratio_to_backbone": round(ratio, 3),
                    "ratio_to_own_backbone": None if own_ratio is None else round(own_ratio, 3),
                }
            )
            against_own = "" if own_ratio is None else f", {own_ratio:6.3f}x its own backbone"
            print(
                f"generate {name:14s} batch {batch}: {speed:9.1f} tokens/s {ratio:6.3f}x the backbone{against_own}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="scoring rounds")
    parser.add_argument("--generation-rounds", type=int, default=15, help="generation rounds (noisier: more)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--label", default="", help="suffix of the result files (e.g. h100)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = build_models(device)
    rows = scoring(models, args.rounds, device, args.clock) + generation(
        models, args.generation_rounds, args.new_tokens, device, args.clock
    )
    name = "honest_speed" + (f"_{args.label}" if args.label else "")
    summary = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": args.threads,
        "clock": args.clock,
        "rounds": {"scoring": args.rounds, "generation": args.generation_rounds},
        "load_average_at_end": os.getloadavg(),
        "backbone": TEXT_CONFIG,
        "metadata_layer": LAYER,
        "goals": {"scoring_1024_ratio_max": 1.3, "generation_ratio_min": 0.95},
        "torch": torch.__version__,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    with (RESULTS / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({key for row in rows for key in row}))
        writer.writeheader()
        writer.writerows(rows)
    print(
        "\n| benchmark | model | batch | tokens | seconds | x backbone (scoring: time; generation: tokens/s) "
        "| x its own backbone (generation) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['benchmark']} | {row['model']} | {row['batch']} | {row['tokens']} | {row['seconds']} | "
              f"{row['ratio_to_backbone']} | {row.get('ratio_to_own_backbone') or ''} |")  # fmt: skip


if __name__ == "__main__":
    main()
