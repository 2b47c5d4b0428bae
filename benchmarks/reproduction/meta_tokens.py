"""Experiment: learned meta-tokens (arXiv 2509.16278) at tiny scale, on the paper's synthetic recall tasks.

Tasks (generated from seeds, no prepared data; the answer follows a QUERY, `labels` cover the answer and EOS):

    recall    list recall / pointer: `n` lists `i a b c SEP`, then `QUERY i` -> list i (`a b c`)
    counting  segment counting: `n` segments `i s s s s SEP` over 4 symbols, then `QUERY i s` -> count of s in i
    parity    `n` bits, then `QUERY` -> their parity
    copying   `n` symbols, then `COPY` -> the same `n` symbols

Runs, each task, one seed (`meta-<task>_<variant>-s<seed>`), every one from the same backbone initialisation:

    plain        Llama (RoPE), no meta-tokens
    matched      Llama with a wider MLP holding as many parameters as `meta` (the capacity control)
    meta         Llama + meta-attention, meta-tokens injected at uniformly random positions (k = 0.1)
    meta_stride  the same, meta-tokens at a fixed stride (one after every 10 tokens): the placement ablation
    gpt2_plain   GPT-2 (learned absolute positions), no meta-tokens
    gpt2_meta    GPT-2 + meta-attention, random positions

Evaluation: exact match of the whole answer (teacher-forced argmax, which equals greedy decoding with the
meta-tokens at the same positions) on held-out problems of the training size (1x) and twice its size (2x, about
twice the training context). A meta-token model is evaluated with meta-tokens placed at random (k = 0.1) and at
the fixed stride, each with its positional encoding kept and zeroed at the meta-tokens
(`meta_positional="zero"`: the rotary cos/sin, or GPT-2's position embedding).

    python benchmarks/reproduce.py meta [--smoke]     # trains the missing runs, then writes the report
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from common import parameter_matched_width

from .harness import RESULTS, environment, log, optimizer_step, start_run, write_csv, write_json

PAD, BOS, EOS, SEP, QUERY, COPY, META = range(7)
SYMBOLS = 16
FIRST_SYMBOL = 7
FIRST_NUMBER = FIRST_SYMBOL + SYMBOLS  # numbers 0..31: list indices, item positions, counts, parity
VOCAB_SIZE = FIRST_NUMBER + 32
TASKS = ("recall", "copying", "counting", "parity")  # the order runs are trained in
META_VARIANTS = {  # variant -> (architecture, meta-token placement in training or None, parameter-matched)
    "plain": ("llama", None, False),
    "matched": ("llama", None, True),
    "meta": ("llama", "random", False),
    "meta_stride": ("llama", "stride", False),
    "gpt2_plain": ("gpt2", None, False),
    "gpt2_meta": ("gpt2", "random", False),
}
# Evaluations of a model trained with meta-tokens: placement at evaluation x positional encoding at them.
META_MODES = ("random", "random_zero", "stride", "stride_zero")


# ---------------------------------------------------------------------------------------------------- tasks


def number(value) -> np.ndarray:
    return FIRST_NUMBER + np.asarray(value)


def make_problems(task: str, size: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """`count` problems of one `size` (all of one length): `(count, length)` ids, and the answer's start."""
    symbols = lambda *shape: FIRST_SYMBOL + rng.integers(0, SYMBOLS, shape)  # noqa: E731
    rows = np.arange(count)
    if task == "recall":
        items = symbols(count, size, 3)
        lists = np.concatenate([np.broadcast_to(number(np.arange(size))[None, :, None], (count, size, 1)), items,
                                np.full((count, size, 1), SEP)], axis=2).reshape(count, -1)  # fmt: skip
        which = rng.integers(0, size, count)
        prompt = np.column_stack([lists, np.full(count, QUERY), number(which)])
        answer = items[rows, which]
    elif task == "counting":
        segments = FIRST_SYMBOL + rng.integers(0, 4, (count, size, 4))
        parts = np.concatenate([np.broadcast_to(number(np.arange(size))[None, :, None], (count, size, 1)),
                                segments, np.full((count, size, 1), SEP)], axis=2).reshape(count, -1)  # fmt: skip
        which, symbol = rng.integers(0, size, count), FIRST_SYMBOL + rng.integers(0, 4, count)
        prompt = np.column_stack([parts, np.full(count, QUERY), number(which), symbol])
        answer = number((segments[rows, which] == symbol[:, None]).sum(1))[:, None]
    elif task == "parity":
        bits = rng.integers(0, 2, (count, size))
        prompt = np.column_stack([FIRST_SYMBOL + bits, np.full(count, QUERY)])
        answer = number(bits.sum(1) % 2)[:, None]
    elif task == "copying":
        sequence = symbols(count, size)
        prompt = np.column_stack([sequence, np.full(count, COPY)])
        answer = sequence
    else:
        raise ValueError(f"Unknown task {task!r}; the tasks are {list(TASKS)}.")
    ids = np.column_stack([np.full(count, BOS), prompt, answer, np.full(count, EOS)])
    return ids.astype(np.int64), 1 + prompt.shape[1]


def batch_of(task: str, size: int, count: int, seed: list[int], placement: str | None, cfg: dict) -> dict:
    """Problems with answer-only labels, and meta-tokens placed as in training (`None`: none)."""
    from lime_hf import inject_meta_tokens

    ids, answer_start = make_problems(task, size, count, np.random.default_rng(seed))
    ids = torch.from_numpy(ids)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < answer_start, -100)
    if placement is None:
        return {"input_ids": ids, "labels": labels}
    generator = torch.Generator().manual_seed(int(np.random.default_rng(seed).integers(2**62)))
    every = cfg["every"] if placement == "stride" else None
    grown = inject_meta_tokens(ids, META, cfg["fraction"], labels=labels, generator=generator, every=every)
    return {"input_ids": grown["input_ids"], "labels": grown["labels"]}


# --------------------------------------------------------------------------------------------------- models


def backbone_config(arch: str, cfg: dict, mlp: int | None = None) -> dict:
    if arch == "gpt2":
        return dict(model_type="gpt2", vocab_size=VOCAB_SIZE, n_embd=cfg["hidden"], n_layer=cfg["layers"],
                    n_head=cfg["heads"], n_inner=mlp or 4 * cfg["hidden"], n_positions=cfg["max_positions"],
                    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    return dict(model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=cfg["hidden"],
                intermediate_size=mlp or cfg["intermediate"], num_hidden_layers=cfg["layers"],
                num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
                max_position_embeddings=cfg["max_positions"], bos_token_id=BOS, eos_token_id=EOS,
                pad_token_id=PAD, tie_word_embeddings=True)  # fmt: skip


def build_meta_model(variant: str, cfg: dict, seed: int, device: str = "cpu"):
    """The variant's model; for one seed every variant of an architecture starts from the same backbone weights
    (the meta-token model is that backbone plus meta-attention; the matched backbone only shares the seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lime_hf import LimeForCausalLM

    arch, placement, matched = META_VARIANTS[variant]

    def backbone(mlp: int | None = None, on: str = device):
        with torch.device(on):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(**backbone_config(arch, cfg, mlp)))

    if matched:
        meta, _ = build_meta_model("meta", cfg, seed, device="meta")
        width = parameter_matched_width(
            lambda mlp: backbone(mlp, "meta"), cfg["intermediate"], sum(p.numel() for p in meta.parameters())
        )
        return backbone(width), backbone_config(arch, cfg, width)
    if placement is None:
        return backbone(), backbone_config(arch, cfg)
    model = LimeForCausalLM.from_backbone(backbone(), metadata_fields={}, meta_token_ids=[META])
    return model, backbone_config(arch, cfg)


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def exact_match(model, batch: dict[str, torch.Tensor], device, chunk: int = 256) -> tuple[float, float]:
    """The share of problems whose every answer token is the argmax prediction (teacher forcing), and the share
    of answer tokens that are."""
    model.eval()
    rows, tokens, count = [], 0, 0
    for start in range(0, len(batch["input_ids"]), chunk):
        ids = batch["input_ids"][start : start + chunk].to(device)
        labels = batch["labels"][start : start + chunk].to(device)
        predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        rows.append(((predicted == target) | (target == -100)).all(dim=1).cpu())
        tokens += int(((predicted == target) & (target != -100)).sum())
        count += int((target != -100).sum())
    model.train()
    return float(torch.cat(rows).float().mean()), tokens / count


def eval_modes(variant: str) -> list[str]:
    arch, placement, _ = META_VARIANTS[variant]
    if placement is None:
        return ["none"]
    return list(META_MODES) if arch == "llama" else ["random", "random_zero"]


def evaluate(model, variant: str, task: str, cfg: dict, seed: int, device) -> dict:
    """Exact match in every evaluation mode, at 1x and 2x the training size, on fixed held-out problems."""
    results = {}
    for scale in (1, 2):
        size = cfg["sizes"][task] * scale
        for mode in eval_modes(variant):
            placement = None if mode == "none" else mode.split("_")[0]
            # Held-out problems: a seed range training never draws from; the same problems for every variant.
            batch = batch_of(
                task, size, cfg["test_problems"], [10**6, scale, TASKS.index(task)], placement, cfg
            )
            zero = mode.endswith("_zero")
            if zero:
                model.config.meta_positional = "zero"  # read at every call
            try:
                exact, token_accuracy = exact_match(model, batch, device)
            finally:
                if zero:
                    model.config.meta_positional = "keep"  # as every model here is trained
            results[f"{mode}/{scale}x"] = exact
            results[f"token_accuracy/{mode}/{scale}x"] = token_accuracy
            results[f"length/{scale}x"] = int(batch["input_ids"].shape[1])
    return results


# ------------------------------------------------------------------------------------------------------ runs


def meta_run_names(preset_cfg: dict) -> list[str]:
    return [f"meta-{task}_{variant}-s{seed}" for seed in preset_cfg["seeds"] for task in TASKS
            for variant in META_VARIANTS]  # fmt: skip


def run_meta(cache: Path, preset: str, name_variant: str, seed: int, device: torch.device, cfg: dict) -> dict:
    task, variant = name_variant.split("_", 1)
    name = f"meta-{name_variant}-s{seed}"
    model, text_config = build_meta_model(variant, cfg, seed)
    placement = META_VARIANTS[variant][1]
    total_steps = cfg["steps"]
    optimizer, scheduler, checkpoint, state = start_run(model, cfg, total_steps, device, cache, preset, name)
    step, history = state["step"], state["history"]
    eval_steps = sorted({int(round(x)) for x in np.linspace(0, total_steps, cfg["evals"])})
    loss_sum, loss_count = 0.0, 0
    while True:
        if step in eval_steps and (not history or history[-1]["step"] != step):
            point = {"step": step, "train_loss": loss_sum / loss_count if loss_count else None}
            point |= evaluate(model, variant, task, cfg, seed, device)
            history.append(point)
            loss_sum, loss_count = 0.0, 0
            shown = " ".join(
                f"{k}: {v:.3f}" for k, v in point.items() if k.count("/") == 1 and not k.startswith("length")
            )
            log(f"{name} step {step}/{total_steps} {shown}")
            checkpoint.maybe_save(step, history)
        if step >= total_steps:
            break
        # Fresh problems every step, from the seed and the step: the same stream for every variant of a seed.
        batch = batch_of(
            task, cfg["sizes"][task], cfg["batch"], [seed, step, TASKS.index(task)], placement, cfg
        )
        loss = model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss
        loss_sum += optimizer_step(model, optimizer, scheduler, loss)
        loss_count += 1
        step += 1
    result = {
        "run": name,
        "kind": "meta",
        "task": task,
        "variant": variant,
        "seed": seed,
        "preset": preset,
        "train_config": cfg,
        "model_config": text_config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
        "wall_s": checkpoint.wall_s(),
        "device": str(device),
        "environment": environment(),
    }
    checkpoint.remove()
    return result


# ---------------------------------------------------------------------------------------------------- report

LABELS = {
    "plain/none": "Llama (RoPE)",
    "matched/none": "Llama, parameter-matched",
    "meta/random": "Llama + meta, random",
    "meta/random_zero": "Llama + meta, random, zeroed PE",
    "meta_stride/stride": "Llama + meta, stride",
    "meta/stride": "Llama + meta (random-trained), stride",
    "gpt2_plain/none": "GPT-2 (absolute)",
    "gpt2_meta/random": "GPT-2 + meta, random",
    "gpt2_meta/random_zero": "GPT-2 + meta, random, zeroed PE",
}


def report_meta(cache: Path, preset: str, results: Path = RESULTS) -> dict:
    """`meta_tokens.json` (final exact match of every task, model and mode, and the comparisons the reviews
    asked for), `meta_tokens.csv` and `meta_tokens.png`."""
    import json

    runs = {p.stem: json.loads(p.read_text()) for p in sorted((cache / "runs" / preset).glob("meta-*.json"))}
    if not runs:
        raise SystemExit(f"report: no meta-token runs under {cache / 'runs' / preset}; run `meta` first")
    final: dict[str, dict[str, dict[str, float]]] = {}  # task -> "variant/mode" -> "1x"/"2x" -> mean
    token_final: dict[str, dict[str, dict[str, float]]] = {}  # the same, answer-token accuracy
    rows = []
    for task in TASKS:
        for variant in META_VARIANTS:
            chosen = [r for r in runs.values() if r["task"] == task and r["variant"] == variant]
            if not chosen:
                continue
            for mode in eval_modes(variant):
                for scale in ("1x", "2x"):
                    values = [r["history"][-1][f"{mode}/{scale}"] for r in chosen]
                    tokens = [r["history"][-1][f"token_accuracy/{mode}/{scale}"] for r in chosen]
                    final.setdefault(task, {}).setdefault(f"{variant}/{mode}", {})[scale] = float(
                        np.mean(values)
                    )
                    token_final.setdefault(task, {}).setdefault(f"{variant}/{mode}", {})[scale] = float(
                        np.mean(tokens)
                    )
                    rows.append({"task": task, "variant": variant, "eval_mode": mode, "scale": scale,
                                 "exact_match": float(np.mean(values)), "token_accuracy": float(np.mean(tokens)),
                                 "seeds": len(values), "length": chosen[0]["history"][-1][f"length/{scale}"],
                                 "parameters": chosen[0]["parameters"]})  # fmt: skip

    def gap(task: str, better: str, worse: str, scale: str) -> float | None:
        a, b = final.get(task, {}).get(better), final.get(task, {}).get(worse)
        return None if a is None or b is None else a[scale] - b[scale]

    comparisons = {
        label: {task: {s: gap(task, a, b, s) for s in ("1x", "2x")} for task in TASKS}
        for label, (a, b) in {
            "meta_minus_plain": ("meta/random", "plain/none"),
            "meta_minus_matched": ("meta/random", "matched/none"),
            "matched_minus_plain": ("matched/none", "plain/none"),
            "stride_trained_minus_random_trained": ("meta_stride/stride", "meta/random"),
            "random_trained_stride_eval_minus_random_eval": ("meta/stride", "meta/random"),
            "zeroed_pe_minus_kept_rope": ("meta/random_zero", "meta/random"),
            "zeroed_pe_minus_kept_gpt2": ("gpt2_meta/random_zero", "gpt2_meta/random"),
            "gpt2_meta_minus_gpt2_plain": ("gpt2_meta/random", "gpt2_plain/none"),
        }.items()
    }
    any_run = next(iter(runs.values()))
    headline = {
        "exact_match": final,
        "answer_token_accuracy": token_final,
        "comparisons": comparisons,
        "parameters": {r["variant"]: r["parameters"] for r in runs.values() if r["task"] == any_run["task"]},
        "config": any_run["train_config"],
        "seeds": sorted({r["seed"] for r in runs.values()}),
        "train_wall_s": {name: round(r["wall_s"], 1) for name, r in runs.items()},
        "environment": any_run["environment"],
    }
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "meta_tokens.json", headline)
    write_csv(results / "meta_tokens.csv", rows)
    plot_meta(results / "meta_tokens.png", final)
    log(f"report: wrote {results}/meta_tokens.json")
    return headline


def plot_meta(path: Path, final: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 4.6), sharey=True)
    bars = [key for key in LABELS if any(key in final.get(task, {}) for task in TASKS)]
    for axis, task in zip(axes, TASKS, strict=True):
        for offset, scale in enumerate(("1x", "2x")):
            values = [final.get(task, {}).get(key, {}).get(scale, np.nan) for key in bars]
            axis.barh(np.arange(len(bars)) + 0.4 * offset, values, height=0.4, label=f"{scale} training size")
        axis.set_title(task)
        axis.set_xlim(0, 1)
        axis.set_xlabel("exact match")
    axes[0].set_yticks(np.arange(len(bars)) + 0.2, [LABELS[key] for key in bars], fontsize=8)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=8)
    fig.suptitle("Meta-tokens at tiny scale: exact match at the training size and at twice it", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
