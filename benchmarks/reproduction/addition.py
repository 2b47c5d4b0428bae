"""Experiment: guided arithmetic. Baseline / LIME+1 (POS+NER or a digit-place field) on synthetic addition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .harness import (
    UNKNOWN_ID,
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

ADD_VARIANTS = {"baseline": None, "lime_plus1_spacy": ("pos", "ner"), "lime_plus1_digit": ("digit",)}

# ----------------------------------------------------------------------------------------------- addition


def add_eval_modes(fields) -> list[str]:
    return ["greedy"] if fields is None else ["guided", "unguided"]


@torch.no_grad()
def exact_match(model, test: dict[str, np.ndarray], fields, mode: str, device, max_new: int) -> np.ndarray:
    """
    Greedy answers for every test problem; returns per-problem correctness (answer digits then EOS, exactly).

    guided:   LIME+1 gets the oracle tags of the whole true problem (prompt and answer; the answer's tags as
              `guidance`, the next-token tag one step ahead, the EOS's special tag last).
    unguided: the prompt's tags come from annotating the prompt alone; every generated token's tag is
              "unknown" (the library's default provider for LIME+1 without guidance).
    greedy:   the baseline (no metadata).
    """
    model.eval()
    correct = np.zeros(len(test["input_ids"]), dtype=bool)
    for prompt_len in np.unique(test["prompt_len"]):  # equal-length prompts: no padding needed
        rows = np.flatnonzero(test["prompt_len"] == prompt_len)
        prompt = torch.from_numpy(test["input_ids"][rows, :prompt_len]).to(device)
        kwargs = dict(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )
        if fields is not None:
            source = "" if mode == "guided" else "_prompt"
            for name in fields:
                kwargs[f"{name}_ids"] = torch.from_numpy(test[f"{name}{source}"][rows, :prompt_len]).to(
                    device
                )
            kwargs["metadata_provider"] = "unknown"
            if mode == "guided":
                kwargs["guidance"] = {
                    name: [[int(t) for t in test[name][r, prompt_len : test["length"][r]]] for r in rows]
                    for name in fields
                }
        with autocast(device):
            generated = model.generate(**kwargs)[:, prompt_len:].cpu().numpy()
        for i, r in enumerate(rows):
            target = test["input_ids"][r, prompt_len : test["length"][r]]
            correct[r] = len(generated[i]) >= len(target) and np.array_equal(
                generated[i][: len(target)], target
            )
    model.train()
    return correct


def small_operands(arrays: dict[str, np.ndarray], max_digits: int) -> dict[str, np.ndarray]:
    """The problems whose operands have at most `max_digits` digits, trimmed to their longest length."""
    keep = (arrays["a"] < 10**max_digits) & (arrays["b"] < 10**max_digits)
    width = int(arrays["length"][keep].max())
    return {k: (v[keep][:, :width] if v.ndim == 2 else v[keep]) for k, v in arrays.items()}


def run_add(cache: Path, preset: str, variant: str, seed: int, device: torch.device) -> dict:
    cfg, meta = run_settings(cache, preset, "add")
    fields = ADD_VARIANTS[variant]
    name = f"add-{variant}-s{seed}"
    train_np, test = (
        small_operands(load_arrays(cache / "data" / "add_train.npz"), cfg["max_digits"]),
        small_operands(load_arrays(cache / "data" / "add_test.npz"), cfg["max_digits"]),
    )
    ids = torch.from_numpy(train_np["input_ids"])
    positions = torch.arange(ids.shape[1])
    prompt_len = torch.from_numpy(train_np["prompt_len"])[:, None]
    length = torch.from_numpy(train_np["length"])[:, None]
    answer = (positions >= prompt_len) & (positions < length)  # the answer digits and the EOS
    labels = ids.masked_fill(~answer, -100)  # the loss covers the answer only
    mask = (positions < length).long()
    tags = {name: torch.from_numpy(train_np[name]) for name in (fields or ())}
    n, batch = len(ids), cfg["batch"]
    steps_per_epoch = n // batch
    total_steps = cfg["steps"]
    eval_steps = sorted({int(round(x)) for x in np.linspace(0, total_steps, cfg["evals"])})
    max_new = cfg["max_digits"] + 2
    metadata_fields = {k: meta["metadata_fields"][k] for k in fields} if fields else None
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    model, text_config = build_model(
        cfg,
        len(meta["chars"]),
        special,
        ids.shape[1] + 8,
        seed,
        None if fields is None else 1,
        metadata_fields,
    )
    optimizer, scheduler, checkpoint, state = start_run(model, cfg, total_steps, device, cache, preset, name)
    step, history = state["step"], state["history"]
    loss_sum, loss_count = 0.0, 0
    modes = add_eval_modes(fields)
    final_correct = {}
    while True:
        if step in eval_steps and (not history or history[-1]["step"] != step):
            point = {
                "step": step,
                "examples_seen": step * batch,
                "train_loss": loss_sum / loss_count if loss_count else None,
            }
            for mode in modes:
                final_correct[mode] = exact_match(model, test, fields, mode, device, max_new)
                point[mode] = float(final_correct[mode].mean())
            history.append(point)
            loss_sum, loss_count = 0.0, 0
            log(f"{name} step {step}/{total_steps} " + " ".join(f"{m}: {point[m]:.3f}" for m in modes))
            checkpoint.maybe_save(step, history)
        if step >= total_steps:
            break
        epoch, within = divmod(step, steps_per_epoch)
        index = torch.from_numpy(
            np.random.default_rng(epoch).permutation(n)[within * batch : (within + 1) * batch]
        )
        inputs = {"input_ids": ids[index].to(device), "attention_mask": mask[index].to(device)}
        for field, values in tags.items():
            values = values[index].clone()
            # Guidance dropout: for a quarter of the problems every answer tag is unknown, the exact
            # condition of unguided generation, so "unguided" is not an input the model never saw.
            drop = torch.from_numpy(
                np.random.default_rng([seed, step]).random(len(index)) < cfg["guidance_dropout"]
            )
            values[drop[:, None] & answer[index]] = UNKNOWN_ID
            inputs[f"{field}_ids"] = values.to(device)
        with autocast(device):
            loss = model(**inputs, labels=labels[index].to(device)).loss
        loss_sum += optimizer_step(model, optimizer, scheduler, loss)
        loss_count += 1
        step += 1
    result = {
        "run": name,
        "kind": "add",
        "variant": variant,
        "seed": seed,
        "preset": preset,
        "fields": fields,
        "metadata_shift": None if fields is None else 1,
        "train_config": cfg,
        "model_config": text_config,
        "parameters": count_parameters(model),
        "data": {
            **{k: meta[k] for k in ("sampling", "example")},
            "max_digits": cfg["max_digits"],
            "train_problems": n,
            "test_problems": len(test["input_ids"]),
        },
        "eval_modes": modes,
        "history": history,
        "final_correct": {mode: correct.astype(int).tolist() for mode, correct in final_correct.items()},
        "wall_s": checkpoint.wall_s(),
        "device": str(device),
        "environment": environment(),
    }
    checkpoint.remove()
    return result
