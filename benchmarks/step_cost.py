"""The wrapper's fixed cost per decoding step: `LimeForCausalLM.generate` against its backbone's, every mode.

All models share the 4 x 256 benchmark backbone's weights (retrofits: zero metadata tables, random heads and
meta-attention). Each decodes greedily with the KV cache a fixed number of new tokens from the same prompt of
random ids (no tokenizer, no spaCy: only the model's own work is timed), and the runs alternate round by round
(median of the rounds). The ratio is the mode's tokens/s over the backbone's in the same run:

* lime_unknown: LIME, generated tokens tagged "unknown" (the tracker's bookkeeping alone);
* lime1_guided: LIME+1 with a POS schedule covering every new token;
* lime_heads: LIME whose tag heads tag each generated token (`metadata_provider="model"`);
* lime1_heads: LIME+1 guiding itself with its heads;
* lime_heads_linear, lime1_heads_linear: the same two with a linear classifier per field (`tag_head_type="linear"`)
  instead of the default MLP heads;
* meta_none: a meta-token model (no metadata fields) placing no meta-token; it hooks its backbone's layers, so it has
  its own copy of the weights, and is also timed against that copy with its hooks off (`meta_none/own_backbone`,
  `over_own_backbone` in the file).

Goal: >= 0.95x the backbone in every mode. Writes benchmarks/results/step_cost_<label>.json.

`--floor` bounds what any wrapper can reach with layer-0 tag heads: greedy decoding written by hand on the backbone
(no `generate`, no tracker, no LIME forward), once plain and once with exactly the per-step arithmetic of each heads
model (the new token's embedding, its heads' stacked logits and argmax, the stacked lookup of the tags' embeddings,
the backbone's last hidden state kept), side by side. Writes benchmarks/results/step_cost_floor.json.

    python benchmarks/step_cost.py --label after [--batch-sizes 1 8] [--new-tokens 64] [--repeats 5] [--clock cpu]
        [--profile MODE] [--count] [--floor]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lime_hf import LimeForCausalLM
from lime_hf.compat import CACHE_NAME
from lime_hf.stacked_fields import parameters_fixed

TEXT_CONFIG = dict(
    model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=2048, vocab_size=4096, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"
GUIDE = ["DT", "JJ", "NN", "VBD", "IN", "NNP", ",", "PRP", "VBD", "RB", "."]


def build_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(LlamaConfig(**TEXT_CONFIG)).eval()
    heads, linear = {"tag_head_fields": ["pos", "ner"]}, {"tag_head_type": "linear"}
    return {
        "backbone": backbone,
        "lime_unknown": LimeForCausalLM.from_backbone(backbone, metadata_shift=0).eval(),
        "lime1_guided": LimeForCausalLM.from_backbone(backbone, metadata_shift=1).eval(),
        "lime_heads": LimeForCausalLM.from_backbone(backbone, metadata_shift=0, **heads).eval(),
        "lime1_heads": LimeForCausalLM.from_backbone(backbone, metadata_shift=1, **heads).eval(),
        "lime_heads_linear": LimeForCausalLM.from_backbone(
            backbone, metadata_shift=0, **heads, **linear
        ).eval(),
        "lime1_heads_linear": LimeForCausalLM.from_backbone(
            backbone, metadata_shift=1, **heads, **linear
        ).eval(),
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
        "lime_heads_linear": {**special, "metadata_provider": "model"},
        "lime1_heads_linear": {**special, "metadata_provider": "model"},
        "meta_none": {},
    }
    calls = {name: (lambda m=models[name], e=extra[name]: m.generate(**decoding, **e)) for name in models}
    meta = models["meta_none"]
    calls["meta_none/own_backbone"] = functools.partial(
        generate_unhooked, meta, meta.meta_attention, **decoding
    )
    return calls


def generate_unhooked(model, site, **decoding) -> None:
    """`generate` of the backbone that `model` wraps (the same weights in the same memory), with the hooks of `site`
    (`model.meta_attention` or `model.metadata_injection`) off for the call: a model that hooks its backbone's layers
    has its own copy of the weights, and two identical models in different memory differ by several percent here."""
    site.detach()
    try:
        model.language_model.generate(**decoding)
    finally:
        site.attach(model.language_model)


def decode_by_hand(backbone, heads_model, ids: torch.LongTensor, new_tokens: int) -> None:
    """Greedy decoding with the KV cache written out, on `backbone`; with `heads_model` (layer-0 heads), each step
    also does that model's per-step arithmetic: the heads read the last hidden state and the new token's embedding,
    and the embeddings of their argmax tags join the token's."""
    reads_hidden = {"output_hidden_states": -1} if heads_model is not None else {}
    outputs = backbone(input_ids=ids, use_cache=True, **reads_hidden)
    cache, token = outputs[CACHE_NAME], outputs.logits[:, -1:].argmax(-1)
    embeddings = backbone.get_input_embeddings()
    for _ in range(new_tokens - 1):
        if heads_model is None:
            outputs = backbone(input_ids=token, **{CACHE_NAME: cache}, use_cache=True, logits_to_keep=1)
        else:
            heads, tables = heads_model.tag_heads, heads_model.metadata_embeddings
            embeds = embeddings(token)
            tags = heads.predict_stacked(heads.stacked_logits(outputs.hidden_states[-1][:, -1:], embeds))
            embeds = embeds + tables.lookup_stacked(tags, tables.names)
            outputs = backbone(
                inputs_embeds=embeds, **{CACHE_NAME: cache}, use_cache=True, logits_to_keep=1, **reads_hidden
            )
        token = outputs.logits[:, -1:].argmax(-1)


def write_floor(models: dict, args: argparse.Namespace) -> None:
    """`step_cost_floor.json`: per batch size, the hand-written decoding with each layer-0 heads model's arithmetic
    against the plain one (`decode_by_hand`), and the same models through `generate` in the same rounds."""
    names = ("lime_heads", "lime1_heads", "lime_heads_linear", "lime1_heads_linear")
    backbone, rows = models["backbone"], []
    for batch_size in args.batch_sizes:
        generated = runs(models, batch_size, args.prompt_len, args.new_tokens)
        ids = torch.randint(3, TEXT_CONFIG["vocab_size"] - 1, (batch_size, args.prompt_len))
        calls = {"by_hand/backbone": functools.partial(decode_by_hand, backbone, None, ids, args.new_tokens)}
        for name in names:
            calls[f"by_hand/{name}"] = functools.partial(
                decode_by_hand, backbone, models[name], ids, args.new_tokens
            )
        calls |= {f"generate/{name}": generated[name] for name in ("backbone", *names)}
        with parameters_fixed():  # as inside `generate`: the stacked heads and tables are built once
            times = side_by_side(calls, args.repeats, args.clock)
        for name, values in times.items():
            base = statistics.median(times[f"{name.split('/')[0]}/backbone"])
            row = {
                "batch_size": batch_size,
                "run": name,
                "ms_per_step": 1000 * statistics.median(values) / args.new_tokens,
            }
            row |= {"over_backbone": base / statistics.median(values), "times_s": values}
            rows.append(row)
            print(
                f"batch {batch_size:2d}  {name:30s} {row['ms_per_step']:7.2f} ms/step  {row['over_backbone']:.3f}x"
            )
    summary = {key: value for key, value in vars(args).items() if key not in ("profile", "count", "floor")}
    summary["torch"] = torch.__version__
    path = RESULTS / "step_cost_floor.json"
    path.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    print("wrote", path)


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
    parser.add_argument(
        "--floor",
        action="store_true",
        help="time hand-written decoding with each layer-0 heads model's per-step arithmetic (no wrapper) instead",
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
        if args.floor:
            return write_floor(models, args)
        rows = []
        for batch_size in args.batch_sizes:
            calls = runs(models, batch_size, args.prompt_len, args.new_tokens)
            times = side_by_side(calls, args.repeats, args.clock)
            base = statistics.median(times["backbone"])
            for name, values in times.items():
                median = statistics.median(values)
                row = {"batch_size": batch_size, "mode": name, "ms_per_step": 1000 * median / args.new_tokens}
                row |= {"over_backbone": base / median, "times_s": values}
                if f"{name}/own_backbone" in times:
                    row["over_own_backbone"] = statistics.median(times[f"{name}/own_backbone"]) / median
                rows.append(row)
                own = (
                    f"  {row['over_own_backbone']:.3f}x its own backbone"
                    if "over_own_backbone" in row
                    else ""
                )
                print(
                    f"batch {batch_size:2d}  {name:22s} {row['ms_per_step']:7.2f} ms/step  {base / median:.3f}x{own}"
                )
    summary = {key: value for key, value in vars(args).items() if key not in ("profile", "count")}
    summary["torch"], summary["goal"] = torch.__version__, ">= 0.95x the backbone in every mode"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"step_cost_{args.label}.json"
    path.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
