"""What meta-tokens cost: training step time, generation throughput and parameters, against the same backbone
without meta-attention and a parameter-matched backbone (arXiv 2509.16278's reviews: +22 % parameters, 1.11x
slower inference with a dense mask).

Side by side in one run, for a tiny Llama (RoPE) and a tiny GPT-2 (learned absolute positions) of the same shape:

* training step (forward + backward + AdamW step) on blocks of `--seq-len` tokens, `--fraction` of them
  meta-tokens (`inject_meta_tokens` on blocks of L' tokens, L' + round(k L') = L), against the backbone on
  blocks of L plain tokens, and against a backbone with a wider MLP holding as many parameters as the
  meta-token model (the capacity control). Target: <= 1.10x the backbone;
* greedy `generate` with the KV cache, a meta-token placed every `--every` tokens (`MetaTokenPlacement`),
  against the backbone's own `generate` for the same number of new positions. Target: >= 0.95x the backbone's
  positions/s; the text tokens/s (meta-tokens not counted) are reported too, and the same model placing no
  meta-token (its fixed per-step cost);
* the parameters meta-attention adds, also at GPT-2 small's real shape (built on the meta device).

Repeats alternate between the models; medians are reported. Prints a table and writes
benchmarks/results/meta_attention.{json,csv}.

    python benchmarks/meta_attention.py [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
from common import parameter_matched_width, save_results  # the benchmarks' shared helpers
from transformers import AutoConfig, AutoModelForCausalLM

from lime_hf import LimeForCausalLM
from lime_hf.meta_tokens import MetaTokenPlacement, inject_meta_tokens, meta_token_count

VOCAB_SIZE = 8192
META_ID = VOCAB_SIZE - 1
SHAPES = {
    "llama": dict(model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB_SIZE, n_embd=256, n_inner=1024, n_layer=4, n_head=4,
                 n_positions=2048, bos_token_id=0, eos_token_id=0),  # GPT-2's 50256 is outside this vocabulary
}  # fmt: skip
MLP_KEY = {"llama": "intermediate_size", "gpt2": "n_inner"}
GPT2_SMALL = dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)


def count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def build(arch: str, mlp: int | None = None, meta: bool = False, device: str = "cpu") -> torch.nn.Module:
    """The backbone of `arch` (its MLP width `mlp`), or, with `meta`, a meta-token model on that backbone."""
    shape = {**SHAPES[arch], **({MLP_KEY[arch]: mlp} if mlp else {})} if arch in SHAPES else GPT2_SMALL
    with torch.device(device):
        torch.manual_seed(0)
        backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape))
        if not meta:
            return backbone
        return LimeForCausalLM.from_backbone(backbone, metadata_fields={}, meta_token_ids=[META_ID])


def parameters() -> list[dict]:
    rows = []
    for arch in (*SHAPES, "gpt2_small"):
        plain, meta = count(build(arch, device="meta")), count(build(arch, meta=True, device="meta"))
        rows.append(
            {
                "model": arch,
                "backbone_params": plain,
                "meta_params": meta,
                "overhead_percent": 100 * (meta / plain - 1),
            }
        )
    return rows


def alternate(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """One warm-up each, then `repeats` rounds calling every run in turn: the median seconds per call."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def train_steps(arch: str, batch: int, seq_len: int, fraction: float, repeats: int) -> dict:
    meta = build(arch, meta=True).train()
    plain = build(arch).train()
    width = parameter_matched_width(
        lambda mlp: build(arch, mlp, device="meta"), SHAPES[arch][MLP_KEY[arch]], count(meta)
    )
    matched = build(arch, width).train()
    generator = torch.Generator().manual_seed(0)
    # Blocks of L' text tokens grow to exactly L with their meta-tokens.
    text_len = next(n for n in range(seq_len, 0, -1) if n + meta_token_count(n, fraction) == seq_len)
    text = torch.randint(0, META_ID, (batch, text_len), generator=generator)
    with_meta = inject_meta_tokens(text, META_ID, fraction, generator=generator)["input_ids"]
    plain_ids = torch.randint(0, META_ID, (batch, seq_len), generator=generator)
    models = {
        "backbone": (plain, plain_ids),
        "meta": (meta, with_meta),
        "matched_backbone": (matched, plain_ids),
    }
    optimizers = {name: torch.optim.AdamW(model.parameters()) for name, (model, _) in models.items()}

    def step(name: str) -> Callable[[], None]:
        model, ids = models[name]

        def run() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return run

    medians = alternate({name: step(name) for name in models}, repeats)
    return {
        "arch": arch,
        "batch": batch,
        "seq_len": seq_len,
        "meta_tokens_per_row": int((with_meta[0] == META_ID).sum()),
        "params": {name: count(model) for name, (model, _) in models.items()},
        "matched_mlp_width": width,
        "median_s": medians,
        "meta_over_backbone": medians["meta"] / medians["backbone"],
        "matched_over_backbone": medians["matched_backbone"] / medians["backbone"],
        "meta_over_matched": medians["meta"] / medians["matched_backbone"],
    }


def generation(arch: str, batch: int, prompt_len: int, new_tokens: int, every: int, repeats: int) -> dict:
    """Greedy `generate` of `new_tokens` positions: the backbone; the meta-token model with a meta-token every
    `every` positions (`meta`); and the same model with the same logits processor placing none
    (`meta_model_no_meta_tokens`), which splits the cost into the wrapper's fixed per-step part (hooks, processor,
    `LimeForCausalLM`) and what the meta positions themselves cost."""
    plain = build(arch).eval()
    meta = LimeForCausalLM.from_backbone(copy.deepcopy(plain), metadata_fields={}, meta_token_ids=[META_ID])
    meta.eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, META_ID, (batch, prompt_len), generator=generator)
    common = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    calls = {
        "backbone": lambda: plain.generate(**common),
        "meta": lambda: meta.generate(**common, logits_processor=[MetaTokenPlacement(META_ID, every=every)]),
        # `positions=[]` forbids the meta-token everywhere: the same processor's work, no meta position.
        "meta_model_no_meta_tokens": lambda: meta.generate(
            **common, logits_processor=[MetaTokenPlacement(META_ID, positions=[])]
        ),
    }
    outputs = {}

    def run(name: str) -> Callable[[], None]:
        def call() -> None:
            outputs[name] = calls[name]()

        return call

    with torch.inference_mode():
        medians = alternate({name: run(name) for name in calls}, repeats)
    counts = {
        name: int((output[:, prompt_len:] == META_ID).sum()) // batch for name, output in outputs.items()
    }
    assert counts["meta_model_no_meta_tokens"] == 0 and counts["meta"] > 0, counts
    meta_count = counts["meta"]
    positions_per_s = {name: batch * new_tokens / seconds for name, seconds in medians.items()}
    text_tokens_per_s = positions_per_s["meta"] * (new_tokens - meta_count) / new_tokens
    return {
        "arch": arch,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "meta_every": every,
        "meta_tokens_generated_per_row": meta_count,
        "median_s": medians,
        "positions_per_s": positions_per_s,
        "meta_over_backbone": positions_per_s["meta"] / positions_per_s["backbone"],
        "no_meta_tokens_over_backbone": positions_per_s["meta_model_no_meta_tokens"]
        / positions_per_s["backbone"],
        "meta_text_tokens_per_s": text_tokens_per_s,
        "meta_text_tokens_over_backbone": text_tokens_per_s / positions_per_s["backbone"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--generate-batches", type=int, nargs="+", default=[1, 8])
    # One thread: on a shared machine more threads than free cores made each step 10x slower and erratic.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = parameters()
    print(f"{'model':>11} {'backbone params':>16} {'with meta-attention':>20} {'overhead':>9}")
    for row in params:
        print(
            f"{row['model']:>11} {row['backbone_params']:>16,} {row['meta_params']:>20,} {row['overhead_percent']:>8.1f}%"
        )
    steps = [train_steps(arch, args.batch_size, args.seq_len, args.fraction, args.repeats) for arch in SHAPES]
    print(
        f"\ntraining step, batch {args.batch_size} x {args.seq_len}, k = {args.fraction} (median of {args.repeats})"
    )
    print(
        f"{'arch':>6} {'backbone ms':>12} {'meta ms':>9} {'matched ms':>11} {'meta/backbone':>14} {'meta/matched':>13}"
    )
    for row in steps:
        ms = {name: 1e3 * value for name, value in row["median_s"].items()}
        print(f"{row['arch']:>6} {ms['backbone']:>12.1f} {ms['meta']:>9.1f} {ms['matched_backbone']:>11.1f} "
              f"{row['meta_over_backbone']:>14.3f} {row['meta_over_matched']:>13.3f}  (target <= 1.10)")  # fmt: skip
    generate = [
        generation(arch, batch, args.prompt_len, args.new_tokens, args.every, args.repeats)
        for arch in SHAPES
        for batch in args.generate_batches
    ]
    print(
        f"\ngenerate {args.new_tokens} new positions after {args.prompt_len}, a meta-token every {args.every}"
    )
    print(
        f"{'arch':>6} {'batch':>5} {'backbone pos/s':>15} {'meta pos/s':>11} {'ratio':>6} {'text tok/s ratio':>17}"
        f" {'no meta-tokens ratio':>21}"
    )
    for row in generate:
        rate = row["positions_per_s"]
        print(f"{row['arch']:>6} {row['batch']:>5} {rate['backbone']:>15.1f} {rate['meta']:>11.1f} "
              f"{row['meta_over_backbone']:>6.3f} {row['meta_text_tokens_over_backbone']:>17.3f} "
              f"{row['no_meta_tokens_over_backbone']:>21.3f}  (target >= 0.95)")  # fmt: skip

    device = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    report = {"parameters": params, "train_step": steps, "generation": generate, "shapes": SHAPES,
              "args": vars(args), "device": device}  # fmt: skip
    rows = [
        {"measure": "train_step_meta_over_backbone", "arch": r["arch"], "batch": r["batch"], "value": r["meta_over_backbone"]}
        for r in steps
    ] + [
        {"measure": "train_step_meta_over_matched", "arch": r["arch"], "batch": r["batch"], "value": r["meta_over_matched"]}
        for r in steps
    ] + [
        {"measure": "generate_positions_meta_over_backbone", "arch": r["arch"], "batch": r["batch"], "value": r["meta_over_backbone"]}
        for r in generate
    ] + [
        {"measure": "generate_positions_no_meta_tokens_over_backbone", "arch": r["arch"], "batch": r["batch"],
         "value": r["no_meta_tokens_over_backbone"]}
        for r in generate
    ] + [
        {"measure": "param_overhead_percent", "arch": r["model"], "batch": "", "value": r["overhead_percent"]}
        for r in params
    ]  # fmt: skip
    save_results("meta_attention", report, rows)


if __name__ == "__main__":
    main()
