"""The shared harness of the reproduction: settings, files, models, optimisation and resumable checkpoints."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CACHE = Path(os.environ.get("LIME_REPRODUCE_CACHE", Path.home() / ".cache" / "lime_hf_reproduce"))
TRAIN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility")
EVAL_NOVEL = "persuasion"
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")
PAD_ID, UNKNOWN_ID, SPECIAL_ID = 0, 1, 2  # lime_hf's reserved tag ids

# Words of context to the left of each word when tagging it from its prefix. spaCy's small English
# pipeline sees 4 tokens either side (tok2vec: window 1, depth 4), so 12 tokens cover the tagger exactly;
# the NER's transition state reaches further back (checked against 48 tokens in `prepare`).
PREFIX_WINDOW = 12

# Model and training settings. "cpu" is what the committed results used (no GPU was available; it fits a
# ~1 h background run on two busy cores); "gpu" is a larger setting for a CUDA machine (not run for the
# committed results); "smoke" checks the pipeline end to end. "meta" is the meta-token experiment's own setting. `eval_tokens`: the first N tokens of Persuasion
# (None = all of it). `max_digits`: operands of at most this many digits (the prepared data goes up to 4).
_LM = dict(min_lr_ratio=0.1, weight_decay=0.1, warmup_steps=100)
_ADD = dict(min_lr_ratio=0.1, weight_decay=0.1, warmup_steps=200, guidance_dropout=0.25)
# Meta-tokens (reproduction/meta_tokens.py): `sizes` are the training problem sizes (lists, segments, bits,
# symbols), evaluated at 1x and 2x; `fraction`: meta-tokens per token (random placement); `every`: the stride.
_META = dict(
    min_lr_ratio=0.1,
    weight_decay=0.1,
    warmup_steps=50,
    lr=3e-3,
    fraction=0.1,
    every=10,
    max_positions=128,
    sizes=dict(recall=6, counting=6, parity=24, copying=12),
)
PRESETS = {
    "gpu": {
        "lm": _LM | dict(hidden=256, intermediate=768, layers=8, heads=4, seq_len=256, batch=16, epochs=4,
                         lr=1e-3, evals=25, eval_tokens=None, seeds=(0, 1, 2)),
        "add": _ADD | dict(hidden=256, intermediate=1024, layers=4, heads=4, batch=256, steps=4000, lr=1e-3,
                           evals=9, max_digits=4, seeds=(0, 1)),

        "meta": _META | dict(hidden=128, intermediate=384, layers=4, heads=4, batch=64, steps=6000, evals=7,
                             test_problems=1000, seeds=(0, 1, 2)),
    },
    "cpu": {
        "lm": _LM | dict(hidden=128, intermediate=384, layers=4, heads=4, seq_len=128, batch=8, epochs=1,
                         lr=1.5e-3, warmup_steps=40, evals=11, eval_tokens=30_000, seeds=(0, 1)),
        "add": _ADD | dict(hidden=128, intermediate=512, layers=3, heads=4, batch=64, steps=3000, lr=2e-3,
                           warmup_steps=100, evals=7, max_digits=3, seeds=(0, 1)),

        "meta": _META | dict(hidden=64, intermediate=192, layers=2, heads=4, batch=32, steps=1000, evals=3,
                             test_problems=256, seeds=(0,)),
    },
    "smoke": {
        "lm": _LM | dict(hidden=32, intermediate=64, layers=2, heads=2, seq_len=64, batch=8, epochs=1, lr=3e-3,
                         warmup_steps=5, evals=3, eval_tokens=4_000, seeds=(0, 1)),
        "add": _ADD | dict(hidden=32, intermediate=64, layers=2, heads=2, batch=32, steps=40, lr=3e-3,
                           warmup_steps=5, evals=2, max_digits=3, seeds=(0, 1)),

        "meta": _META | dict(hidden=16, intermediate=32, layers=1, heads=2, batch=4, steps=4, evals=2,
                             warmup_steps=2, test_problems=8, sizes=dict(recall=2, counting=2, parity=4, copying=3),
                             seeds=(0,)),
    },
}  # fmt: skip
DATA_CONFIG = {
    "full": dict(bpe_vocab=4096, max_chars=None, add_train=50_000, add_test=1000, add_max_digits=4),
    "smoke": dict(bpe_vocab=512, max_chars=8_000, add_train=600, add_test=48, add_max_digits=3),
}
GENERATION = {
    "default": dict(prompts=24, prompt_words=40, new_tokens=64, temperature=1.0, top_k=50, seed=0),
    "smoke": dict(prompts=4, prompt_words=20, new_tokens=16, temperature=1.0, top_k=50, seed=0),
}


# --------------------------------------------------------------------------------------------------- helpers


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def write_csv(path: Path, rows: list[dict]) -> None:
    """`rows` (dicts with the same keys) as a CSV file with a header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def environment() -> dict:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def unwrap(text: str) -> str:
    """Join the hard-wrapped lines of each paragraph with a space; paragraphs stay separated by a blank line."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    joined = (" ".join(line.strip() for line in paragraph.splitlines()).strip() for paragraph in paragraphs)
    return "\n\n".join(paragraph for paragraph in joined if paragraph)


def cut_at_paragraph(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars]


def spans_to_annotation(spans_by_field: dict[str, list[tuple[int, int, str]]]) -> dict:
    return {
        name: {
            "starts": [s for s, _, _ in spans],
            "ends": [e for _, e, _ in spans],
            "labels": [label for _, _, label in spans],
        }
        for name, spans in spans_by_field.items()
    }


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Compressed, in the smallest integer type that holds the values (the arrays travel to a GPU machine). Written
    under another name and then renamed: the resumable stages take an existing file as done, so a killed process
    (or another one preparing the same file) must never leave half of one."""
    small = {}
    for key, values in arrays.items():
        values = np.asarray(values)
        small[key] = values.astype(np.int16) if values.min() >= -(2**15) and values.max() < 2**15 else values
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    np.savez_compressed(partial, **small)
    os.replace(partial, path)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key].astype(np.int64) for key in data.files}


# --------------------------------------------------------------------------------------------------- models


def build_model(
    cfg: dict,
    vocab_size: int,
    special: dict,
    max_positions: int,
    seed: int,
    shift,
    fields,
    tag_heads=None,
    options: dict | None = None,
):
    """
    A tiny Llama: the bare backbone for `shift=None`, else LIME (0) / LIME+1 (1) on that same backbone, with
    tag heads on the fields `tag_heads` if given and further `LimeConfig` options `options`.

    For one seed every variant starts from identical backbone weights (the LIME model loads the baseline's),
    so runs of a seed differ only by the metadata.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from lime_hf import LimeConfig, LimeForCausalLM

    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        **special,
    )
    torch.manual_seed(seed)
    backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **text_config))
    if shift is None:
        return backbone, {"model_type": "llama", **text_config}
    torch.manual_seed(seed)
    config = LimeConfig(
        text_config={"model_type": "llama", **text_config},
        metadata_fields=fields,
        metadata_shift=shift,
        tag_head_fields=tag_heads or None,
        **(options or {}),
    )
    model = LimeForCausalLM(config)
    model.language_model.load_state_dict(backbone.state_dict())
    return model, {"model_type": "llama", **text_config}


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    tables = getattr(model, "metadata_embeddings", None)
    metadata = sum(p.numel() for p in tables.parameters()) if tables is not None else 0
    heads = getattr(model, "tag_heads", None)
    head_params = sum(p.numel() for p in heads.parameters()) if heads is not None else 0
    return {
        "total": total,
        "metadata": metadata,
        "tag_heads": head_params,
        "backbone": total - metadata - head_params,
    }


def make_optimizer(model, cfg: dict, total_steps: int, device: torch.device):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )

    def factor(step: int) -> float:
        if step < cfg["warmup_steps"]:
            return (step + 1) / cfg["warmup_steps"]
        progress = (step - cfg["warmup_steps"]) / max(1, total_steps - cfg["warmup_steps"])
        return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, progress))
        )

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(model, optimizer, scheduler, loss: torch.Tensor) -> float:
    """Backward, clip the gradient norm to 1, step optimizer and schedule; returns the loss value."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class Checkpoint:
    """
    Resumable state of one training run (model, optimizer, schedule, step, history, wall time), written at
    evaluation points at most once a minute.
    """

    def __init__(self, path: Path, model, optimizer, scheduler, every_s: float = 60.0):
        self.path, self.every_s = path, every_s
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.last = self.started = time.time()
        self.wall_before = 0.0

    def load(self) -> dict:
        """The saved step and history, restoring model, optimizer and schedule; a fresh start if none."""
        if not self.path.exists():
            return {"step": 0, "history": []}
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.wall_before, self.started = state["wall_s"], time.time()
        log(f"resuming {self.path.stem} at step {state['step']}")
        return state

    def wall_s(self) -> float:
        """Training wall time of the run so far, across resumes."""
        return self.wall_before + time.time() - self.started

    def maybe_save(self, step: int, history: list[dict]) -> None:
        if time.time() - self.last < self.every_s:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        state = {"step": step, "history": history, "wall_s": self.wall_s()}
        for key in ("model", "optimizer", "scheduler"):
            state[key] = getattr(self, key).state_dict()
        torch.save(state, tmp)
        tmp.replace(self.path)
        self.last = time.time()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def run_settings(cache: Path, preset: str, kind: str) -> tuple[dict, dict]:
    """The preset's training settings and the prepared data's metadata for one kind of run ("lm" or "add")."""
    return PRESETS[preset][kind], json.loads((cache / "data" / "meta.json").read_text())[kind]


def start_run(model, cfg: dict, total_steps: int, device, cache: Path, preset: str, name: str):
    """Model on `device`, optimizer and schedule, and the run's checkpoint: resumed from it where one exists."""
    model.to(device).train()
    optimizer, scheduler = make_optimizer(model, cfg, total_steps, device)
    checkpoint = Checkpoint(cache / "checkpoints" / preset / f"{name}.pt", model, optimizer, scheduler)
    return optimizer, scheduler, checkpoint, checkpoint.load()
