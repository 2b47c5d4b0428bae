"""Experiment: data efficiency and the leak. Baseline / LIME / LIME+1 language models on Austen, evaluated on
Persuasion with full-document, prefix-only and no tags."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lime_hf.collator import drop_tags

from .harness import (
    PAD_ID,
    autocast,
    build_model,
    count_parameters,
    environment,
    load_arrays,
    log,
    optimizer_step,
    run_settings,
    start_run,
)

LM_VARIANTS = {"baseline": None, "lime": 0, "lime_plus1": 1}  # variant -> metadata_shift (None: no metadata)

# A mode evaluates a model on the evaluation blocks: (model, blocks) -> metrics.
EvalMode = Callable[[torch.nn.Module, dict[str, torch.Tensor]], dict]


@dataclass(frozen=True)
class LmSpec:
    """What sets a language-model run apart: metadata shift, tag heads, token stream and extra evaluations.

    `arrays`: the prepared data `data/{arrays}_train.npz` / `_eval.npz`, made by `prepare(cache)` when missing;
    `cut_eval`: evaluate the first `eval_tokens` of the stream (else all of it: a stream prepared to cover the
    same text); `extra_modes(device, batch)`: evaluations beyond `lm_eval_modes`; `config`: further `LimeConfig`
    options; `train_tags`: the training tags, `"{field}"` arrays (spaCy's full-document tags) or `"{field}_{train_tags}"`;
    `extra_fields`: fields beyond the prepared data's pos and ner (name -> inventory), whose arrays the stream holds
    under the same names; `metadata_dropout`: the share of training tags hidden as unknown (`lime_hf.collator.drop_tags`,
    drawn from a generator seeded with the run's seed and the step).
    """

    shift: int | None
    tag_heads: tuple[str, ...] = ()
    arrays: str = "lm"
    cut_eval: bool = True
    prepare: Callable[[Path, dict], None] | None = None
    extra_modes: Callable[[torch.device, int], dict[str, EvalMode]] | None = None
    config: dict | None = None
    train_tags: str | None = None
    extra_fields: dict[str, list[str]] | None = None
    metadata_dropout: float = 0.0


# ------------------------------------------------------------------------------------------ language models


def lm_blocks(array: np.ndarray, seq_len: int) -> torch.Tensor:
    n_blocks = len(array) // seq_len
    return torch.from_numpy(array[: n_blocks * seq_len].astype(np.int64).reshape(n_blocks, seq_len))


def eval_blocks(array: np.ndarray, seq_len: int, fill: int) -> torch.Tensor:
    """The whole evaluation stream in blocks; the last one padded with `fill`."""
    n_blocks = math.ceil(len(array) / seq_len)
    padded = np.full(n_blocks * seq_len, fill, dtype=np.int64)
    padded[: len(array)] = array
    return torch.from_numpy(padded.reshape(n_blocks, seq_len))


def stream_blocks(
    arrays: dict[str, np.ndarray], seq_len: int, pad: int, start: int = 0, stop: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokens `[start, stop)` of a prepared stream as evaluation blocks: every array (tags padded with `PAD_ID`),
    `input_ids` padded with `pad`, and `mask` (1 on the real tokens)."""
    cut = {key: values[start:stop] for key, values in arrays.items()}
    blocks = {key: eval_blocks(values, seq_len, PAD_ID) for key, values in cut.items()}
    blocks["input_ids"] = eval_blocks(cut["input_ids"], seq_len, pad)
    blocks["mask"] = eval_blocks(np.ones(len(cut["input_ids"]), dtype=np.int64), seq_len, 0)
    return blocks


def next_token_counts(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int, int]:
    """Summed NLL, correct top-1 predictions and scored positions of one batch's next-token predictions
    (`logits` `(batch, seq, vocab)` of every position; padding and each block's first token are not scored)."""
    logits = logits[:, :-1].float()
    target, keep = ids[:, 1:], mask[:, 1:].bool()
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return losses[keep].sum().item(), (logits.argmax(-1) == target)[keep].sum().item(), keep.sum().item()


def add_counts(total: tuple[float, int, int], batch: tuple[float, int, int]) -> tuple[float, int, int]:
    return tuple(a + b for a, b in zip(total, batch, strict=True))


@torch.no_grad()
def evaluate_lm(model, blocks: dict[str, torch.Tensor], tags: dict[str, str], device, batch: int) -> dict:
    """Next-token accuracy and perplexity over the evaluation stream; `tags`: model argument -> array key."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for start in range(0, len(blocks["input_ids"]), batch):
        ids = blocks["input_ids"][start : start + batch].to(device)
        mask = blocks["mask"][start : start + batch].to(device)
        extra = {arg: blocks[key][start : start + batch].to(device) for arg, key in tags.items()}
        with autocast(device):
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits
        nll, correct, count = add_counts((nll, correct, count), next_token_counts(logits, ids, mask))
    model.train()
    return {
        "accuracy": correct / count,
        "perplexity": math.exp(nll / count),
        "loss": nll / count,
        "tokens": count,
    }


def lm_eval_modes(shift, fields=("pos", "ner")) -> dict[str, dict[str, str]]:
    if shift is None:
        return {"plain": {}}
    return {
        "full_doc_tags": {f"{name}_ids": name for name in fields},
        "prefix_tags": {f"{name}_ids": f"{name}_prefix" for name in fields},
        "no_tags": {},
    }


def run_lm(
    cache: Path, preset: str, variant: str, seed: int, device: torch.device, spec: LmSpec | None = None
) -> dict:
    cfg, meta = run_settings(cache, preset, "lm")
    spec = spec or LmSpec(LM_VARIANTS[variant])
    shift = spec.shift
    name = f"lm-{variant}-s{seed}"
    if spec.prepare is not None:
        spec.prepare(cache, cfg)
    train_np, eval_np = (
        load_arrays(cache / "data" / f"{spec.arrays}_train.npz"),
        load_arrays(cache / "data" / f"{spec.arrays}_eval.npz"),
    )
    seq_len, batch = cfg["seq_len"], cfg["batch"]
    fields = meta["metadata_fields"] | (spec.extra_fields or {})
    tag_keys = {name: name if spec.train_tags is None else f"{name}_{spec.train_tags}" for name in fields}
    train = {
        key: lm_blocks(train_np[key], seq_len) for key in ("input_ids", *tag_keys.values()) if key in train_np
    }
    limit = cfg["eval_tokens"] if spec.cut_eval else None
    evaluation = stream_blocks(eval_np, seq_len, meta["pad_token_id"], stop=limit)
    n_blocks = len(train["input_ids"])
    steps_per_epoch = n_blocks // batch
    total_steps = cfg["epochs"] * steps_per_epoch
    eval_steps = sorted({int(round(x)) for x in np.linspace(0, total_steps, cfg["evals"])})
    special = {k: meta[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    model, text_config = build_model(
        cfg,
        meta["vocab_size"],
        special,
        seq_len,
        seed,
        shift,
        fields,
        list(spec.tag_heads),
        spec.config,
    )
    optimizer, scheduler, checkpoint, state = start_run(model, cfg, total_steps, device, cache, preset, name)
    step, history = state["step"], state["history"]
    loss_sum, loss_count = 0.0, 0
    eval_batch = 64 if device.type == "cuda" else 16
    modes: dict[str, EvalMode] = {
        mode: lambda model, blocks, tags=tags: evaluate_lm(model, blocks, tags, device, eval_batch)
        for mode, tags in lm_eval_modes(shift, fields).items()
    }
    modes.update(spec.extra_modes(device, eval_batch) if spec.extra_modes else {})
    orders: dict[int, np.ndarray] = {}
    while True:
        if step in eval_steps and (not history or history[-1]["step"] != step):
            point = {
                "step": step,
                "tokens_seen": step * batch * seq_len,
                "train_loss": loss_sum / loss_count if loss_count else None,
                "lr": scheduler.get_last_lr()[0],
            }
            point.update({mode: evaluate(model, evaluation) for mode, evaluate in modes.items()})
            history.append(point)
            loss_sum, loss_count = 0.0, 0
            log(
                f"{name} step {step}/{total_steps} tokens {point['tokens_seen']:,} "
                + " ".join(
                    f"{m}: acc {point[m]['accuracy']:.4f} ppl {point[m]['perplexity']:.1f}" for m in modes
                )
            )
            checkpoint.maybe_save(step, history)
        if step >= total_steps:
            break
        epoch, within = divmod(step, steps_per_epoch)
        if epoch not in orders:  # the same block order for every run: a permutation per epoch, seed = epoch
            orders = {epoch: np.random.default_rng(epoch).permutation(n_blocks)}
        index = torch.from_numpy(orders[epoch][within * batch : (within + 1) * batch])
        ids = train["input_ids"][index].to(device)
        extra = {} if shift is None else {f"{name}_ids": train[key][index] for name, key in tag_keys.items()}
        if spec.metadata_dropout:
            # Drawn per step, so that a resumed run hides the same tags as an unbroken one.
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
            extra = {key: drop_tags(tags, spec.metadata_dropout, generator) for key, tags in extra.items()}
        extra = {key: tags.to(device) for key, tags in extra.items()}
        with autocast(device):
            loss = model(input_ids=ids, labels=ids, **extra).loss
        loss_sum += optimizer_step(model, optimizer, scheduler, loss)
        loss_count += 1
        step += 1
    wall = checkpoint.wall_s()
    model_dir = cache / "models" / preset / name
    model.to(torch.bfloat16).save_pretrained(model_dir)
    result = {
        "run": name,
        "kind": "lm",
        "variant": variant,
        "seed": seed,
        "preset": preset,
        "metadata_shift": shift,
        "tag_heads": list(spec.tag_heads),
        "config": spec.config or {},
        "training_tags": "spaCy full-document" if spec.train_tags is None else f"spaCy {spec.train_tags}",
        "metadata_dropout": spec.metadata_dropout,
        "token_stream": spec.arrays,
        "train_config": cfg,
        "model_config": text_config,
        "parameters": count_parameters(model),
        "data": {
            "train_tokens": int(len(train_np["input_ids"])),
            "train_blocks": n_blocks,
            "seq_len": seq_len,
            "tokens_per_step": batch * seq_len,
            "total_steps": total_steps,
            "total_tokens_seen": total_steps * batch * seq_len,
            "eval_tokens": int(evaluation["mask"].sum()),
            "order": "blocks permuted per epoch with numpy default_rng(epoch): identical for every run",
        },
        "eval_modes": {
            **{mode: tags or "no metadata" for mode, tags in lm_eval_modes(shift, fields).items()},
            **{mode: "see the experiment's module" for mode in modes if mode not in lm_eval_modes(shift)},
        },
        "history": history,
        "wall_s": wall,
        "device": str(device),
        "environment": environment(),
    }
    checkpoint.remove()
    return result
