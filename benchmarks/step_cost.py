"""The wrapper's fixed cost per decoding step: `LimeForCausalLM.generate` against its backbone's, every mode.

All models share the 4 x 256 benchmark backbone's weights (retrofits: zero metadata tables, random heads and
meta-attention). Each decodes greedily with the KV cache a fixed number of new tokens from the same prompt of
random ids (no tokenizer, no spaCy: only the model's own work is timed), and the runs alternate round by round
(median of the rounds). The ratio is the mode's tokens/s over the backbone's in the same run:

* lime_unknown: LIME, generated tokens tagged "unknown" (the tracker's bookkeeping alone);
* lime1_guided: LIME+1 with a POS schedule covering every new token;
* lime_heads: LIME whose tag heads tag each generated token (`metadata_provider="model"`);
* lime1_heads: LIME+1 guiding itself with its heads;
* meta_none: a meta-token model (no metadata fields) placing no meta-token.

Goal: >= 0.95x the backbone in every mode. Writes benchmarks/results/step_cost_<label>.json.

    python benchmarks/step_cost.py --label after [--batch-sizes 1 8] [--new-tokens 64] [--repeats 5] [--clock cpu]
        [--profile MODE] [--count]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lime_hf import LimeForCausalLM

TEXT_CONFIG = dict(
    model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=2048, vocab_size=4096, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"
GUIDE = ["DT", "JJ", "NN", "VBD", "IN", "NNP", ",", "PRP", "VBD", "RB", "."]


def build_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(LlamaConfig(**TEXT_CONFIG)).eval()
    heads = {"tag_head_fields": ["pos", "ner"]}
    return {
        "backbone": backbone,
        "lime_unknown": LimeForCausalLM.from_backbone(backbone, metadata_shift=0).eval(),
        "lime1_guided": LimeForCausalLM.from_backbone(backbone, metadata_shift=1).eval(),
        "lime_heads": LimeForCausalLM.from_backbone(backbone, metadata_shift=0, **heads).eval(),
        "lime1_heads": LimeForCausalLM.from_backbone(backbone, metadata_shift=1, **heads).eval(),
        # Its own copy: meta-attention hooks the backbone's layers, which would slow every other mode.
        "meta_none": LimeForCausalLM.from_backbone(
            copy.deepcopy(backbone), metadata_fields={}, meta_token_ids=[TEXT_CONFIG["vocab_size"] - 1]
        ).eval(),
    }


def runs(models: dict, batch_size: int, prompt_len: int, new_tokens: int) -> dict:
    """name -> a zero-argument call generating `new_tokens` tokens for `batch_size` rows."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, TEXT_CONFIG["vocab_size"] - 1, (batch_size, prompt_len), generator=generator)
    decoding = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
    )  # fmt: skip
    special = {"pos_ids": torch.full_like(ids, 2), "ner_ids": torch.full_like(ids, 2)}
    schedule = (GUIDE * (new_tokens // len(GUIDE) + 1))[:new_tokens]
    extra = {
        "backbone": {},
        "lime_unknown": {**special, "metadata_provider": "unknown"},
        "lime1_guided": {**special, "guidance": {"pos": schedule}, "metadata_provider": "unknown"},
        "lime_heads": {**special, "metadata_provider": "model"},
        "lime1_heads": {**special, "metadata_provider": "model"},
        "meta_none": {},
    }
    return {name: (lambda m=models[name], e=extra[name]: m.generate(**decoding, **e)) for name in models}


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def side_by_side(calls: dict, repeats: int, clock: str = "wall") -> dict[str, list[float]]:
    """One warm-up each, then `repeats` rounds calling every run in turn; seconds per call. `clock="cpu"` counts
    the CPU time of this thread (torch runs its ops on it at one thread): on a shared machine, time spent waiting
    for a core is not counted."""
    now = CLOCKS[clock]
    times = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            start = now()
            call()
            times[name].append(now() - start)
    return times


def calls_per_generate(call) -> tuple[int, int]:
    """(torch calls, Python function calls) of one `call()`, counted by cProfile: built-in calls whose name says
    torch, and calls of functions written in Python."""
    profiler = cProfile.Profile()
    profiler.runcall(call)
    torch_calls = python_calls = 0
    for (filename, _, name), (_, calls, *_) in pstats.Stats(profiler).stats.items():
        if filename == "~":
            torch_calls += calls if "torch" in name or "Tensor" in name else 0
        else:
            python_calls += calls
    return torch_calls, python_calls


def write_counts(models: dict, args: argparse.Namespace) -> None:
    """`step_cost_counts.json`: per mode and batch size, the torch and Python calls per generated token beyond the
    backbone's. Unlike times, counts do not depend on the machine's load."""
    rows = []
    for batch_size in args.batch_sizes:
        calls = runs(models, batch_size, args.prompt_len, args.new_tokens)
        for call in calls.values():
            call()
        counts = {name: calls_per_generate(call) for name, call in calls.items()}
        for name, (torch_calls, python_calls) in counts.items():
            row = {
                "batch_size": batch_size,
                "mode": name,
                "torch_calls_per_step_beyond_backbone": (torch_calls - counts["backbone"][0])
                / args.new_tokens,
                "python_calls_per_step_beyond_backbone": (python_calls - counts["backbone"][1])
                / args.new_tokens,
            }
            rows.append(row)
            print(f"batch {batch_size:2d}  {name:14s} +{row['torch_calls_per_step_beyond_backbone']:6.1f} torch calls "
                  f"+{row['python_calls_per_step_beyond_backbone']:6.1f} Python calls per step")  # fmt: skip
    path = RESULTS / "step_cost_counts.json"
    path.write_text(json.dumps({"new_tokens": args.new_tokens, "rows": rows}, indent=1) + "\n")
    print("wrote", path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--label", default="after")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: less noise on a shared machine)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this thread's CPU time (for a shared, loaded machine; needs --threads 1)",
    )
    parser.add_argument("--profile", help="profile this mode at the first batch size instead of timing")
    parser.add_argument(
        "--count",
        action="store_true",
        help="count each mode's calls per step beyond the backbone's (load-independent) instead of timing",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = build_models()
    with torch.inference_mode():
        if args.profile:
            call = runs(models, args.batch_sizes[0], args.prompt_len, args.new_tokens)[args.profile]
            call()
            profiler = cProfile.Profile()
            profiler.runcall(call)
            pstats.Stats(profiler).sort_stats("cumtime").print_stats(60)
            return
        if args.count:
            return write_counts(models, args)
        rows = []
        for batch_size in args.batch_sizes:
            calls = runs(models, batch_size, args.prompt_len, args.new_tokens)
            times = side_by_side(calls, args.repeats, args.clock)
            base = statistics.median(times["backbone"])
            for name, values in times.items():
                median = statistics.median(values)
                rows.append(
                    {
                        "batch_size": batch_size,
                        "mode": name,
                        "ms_per_step": 1000 * median / args.new_tokens,
                        "over_backbone": base / median,
                        "times_s": values,
                    }
                )
                print(
                    f"batch {batch_size:2d}  {name:14s} {1000 * median / args.new_tokens:7.2f} ms/step  {base / median:.3f}x"
                )
    summary = {key: value for key, value in vars(args).items() if key not in ("profile", "count")}
    summary["torch"], summary["goal"] = torch.__version__, ">= 0.95x the backbone in every mode"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"step_cost_{args.label}.json"
    path.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
