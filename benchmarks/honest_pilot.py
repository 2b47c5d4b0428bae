"""A pilot of the honest LIME, written apart from the library: a plain Llama and one forward pre-hook.

Before `metadata_injection.py` existed, this script asked whether tags predicted after the first K layers help at
all, on the reproduction's cpu setting (its prepared Austen data, block order, schedule and initial backbone; see
`reproduction/`). A hook at the input of decoder layer K normalises the hidden state, predicts each field's tag of
token i (LIME; with `--shift 1` of token i+1) with one linear layer per field, and adds a table embedding:

    self   the embedding of the heads' own argmax, in training and at evaluation
    soft   the expected embedding under the heads' softmax
    aux    nothing added: the heads only train (the multi-task control)

loss = LM loss + weight * sum of the heads' cross-entropy against spaCy's full-document tags. It stays as an
independent cross-check of the library's mode (`reproduce.py honest`), whose default heads are larger (an MLP);
its `*_linear` runs use linear heads like these (`tag_head_type="linear"`).

    python benchmarks/honest_pilot.py run self 2 --seed 0     # one arm, ~15 min on one busy core
    python benchmarks/honest_pilot.py collect                 # results/honest_pilot.{json,csv} from the arms

The committed arms (`results/honest_pilot/`) were trained on 2026-12-06 by the first draft of this script (the same
computation, before its clean-up), two at a time on the shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from reproduction.harness import (
    DEFAULT_CACHE,
    PAD_ID,
    RESULTS,
    build_model,
    load_arrays,
    make_optimizer,
    run_settings,
    write_csv,
    write_json,
)
from reproduction.language_models import lm_blocks, stream_blocks
from torch import nn

FIELDS = ("pos", "ner")
ARMS = RESULTS / "honest_pilot"


class Injector(nn.Module):
    """Tag heads and tables at the input of one decoder layer (a forward pre-hook on it)."""

    def __init__(self, hidden: int, sizes: dict[str, int], mode: str):
        super().__init__()
        self.mode = mode
        self.norm = nn.LayerNorm(hidden)
        self.heads = nn.ModuleDict({f: nn.Linear(hidden, n) for f, n in sizes.items()})
        self.tables = nn.ModuleDict({f: nn.Embedding(n, hidden) for f, n in sizes.items()})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.02)
        self.logits: dict[str, torch.Tensor] = {}

    def hook(self, module, args, kwargs):
        hidden = args[0]  # `(batch, seq, hidden)`: the decoder layer's input, positional in transformers 5
        features = self.norm(hidden)
        self.logits = {f: head(features) for f, head in self.heads.items()}
        if self.mode == "aux":
            return None
        added = 0
        for f, logits in self.logits.items():
            weights = self.tables[f].weight
            added = added + (
                logits.softmax(-1) @ weights if self.mode == "soft" else weights[logits.argmax(-1)]
            )
        return (hidden + added.to(hidden.dtype), *args[1:]), kwargs


def fed(tags: torch.Tensor, shift: int) -> torch.Tensor:
    """The tag each position is fed: its own (shift 0) or the next token's, unknown (1) at the end (shift 1)."""
    if not shift:
        return tags
    return torch.cat([tags[:, 1:], torch.ones_like(tags[:, :1])], dim=1)


def run(mode: str, layer: int, seed: int, weight: float, shift: int, cache: Path) -> None:
    torch.set_num_threads(1)
    cfg, meta = run_settings(cache, "cpu", "lm")
    train_np, eval_np = (
        load_arrays(cache / "data" / "lm_train.npz"),
        load_arrays(cache / "data" / "lm_eval.npz"),
    )
    seq_len, batch, limit = cfg["seq_len"], cfg["batch"], cfg["eval_tokens"]
    train = {key: lm_blocks(train_np[key], seq_len) for key in ("input_ids", *FIELDS)}
    evaluated = {key: eval_np[key] for key in ("input_ids", *FIELDS)}
    evaluation = stream_blocks(evaluated, seq_len, meta["pad_token_id"], stop=limit)
    special = {key: meta[key] for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
    backbone, _ = build_model(cfg, meta["vocab_size"], special, seq_len, seed, None, None)
    torch.manual_seed(1000 + seed)
    injector = Injector(cfg["hidden"], {f: len(meta["metadata_fields"][f]) for f in FIELDS}, mode)
    backbone.model.layers[layer].register_forward_pre_hook(injector.hook, with_kwargs=True)
    model = nn.ModuleDict({"lm": backbone, "inj": injector})
    n_blocks = len(train["input_ids"])
    total = n_blocks // batch
    optimizer, scheduler = make_optimizer(model, cfg, total, torch.device("cpu"))
    order = np.random.default_rng(0).permutation(n_blocks)  # the reproduction's block order (epoch 0)
    started, history = time.time(), []
    for step in range(total + 1):
        if step in (total // 2, total):
            history.append({"step": step, **evaluate(model, evaluation, shift)})
            print(mode, layer, seed, history[-1], f"{time.time() - started:.0f}s", flush=True)
        if step == total:
            break
        index = torch.from_numpy(order[step * batch : (step + 1) * batch])
        ids = train["input_ids"][index]
        loss = backbone(input_ids=ids, labels=ids).loss
        for f in FIELDS:
            target = fed(train[f][index], shift)
            loss = loss + weight * nn.functional.cross_entropy(
                injector.logits[f].flatten(0, 1), target.flatten(), ignore_index=PAD_ID
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    ARMS.mkdir(parents=True, exist_ok=True)
    write_json(ARMS / f"{mode}_k{layer}_s{seed}_w{weight}_sh{shift}.json", history)


@torch.no_grad()
def evaluate(model: nn.ModuleDict, blocks: dict[str, torch.Tensor], shift: int) -> dict:
    model.eval()
    backbone, injector = model["lm"], model["inj"]
    nll = correct = count = 0
    tag_hits, tag_count = dict.fromkeys(FIELDS, 0), dict.fromkeys(FIELDS, 0)
    for start in range(0, len(blocks["input_ids"]), 16):
        ids, mask = blocks["input_ids"][start : start + 16], blocks["mask"][start : start + 16]
        logits = backbone(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target, keep = ids[:, 1:], mask[:, 1:].bool()
        losses = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        nll += losses[keep].sum().item()
        correct += (logits.argmax(-1) == target)[keep].sum().item()
        count += keep.sum().item()
        for f in FIELDS:
            reference = fed(blocks[f][start : start + 16], shift)
            scored = (reference > 1) & mask.bool()
            tag_hits[f] += ((injector.logits[f].argmax(-1) == reference) & scored).sum().item()
            tag_count[f] += scored.sum().item()
    model.train()
    tags = {f"{f}_tag_accuracy": tag_hits[f] / tag_count[f] for f in FIELDS}
    return {"accuracy": correct / count, "perplexity": math.exp(nll / count), **tags}


def collect() -> None:
    """One row per arm (its final evaluation), beside the reproduction's baseline of the same seed."""
    baselines = json.loads((RESULTS / "reproduce_runs.json").read_text())["runs"]
    rows = []
    for path in sorted(ARMS.glob("*.json")):
        mode, layer, seed, weight, shift = path.stem.split("_")
        final = json.loads(path.read_text())[-1]
        base = baselines[f"lm-baseline-{seed}"]["history"][-1]["plain"]
        rows.append(
            {
                "arm": path.stem,
                "mode": mode,
                "layer": int(layer[1:]),
                "seed": int(seed[1:]),
                "tag_loss_weight": float(weight[1:]),
                "shift": int(shift[2:]),
                "accuracy": final["accuracy"],
                "baseline_accuracy": base["accuracy"],
                "gain_points": 100 * (final["accuracy"] - base["accuracy"]),
                "perplexity": final["perplexity"],
                "baseline_perplexity": base["perplexity"],
                "pos_tag_accuracy": final["pos_tag_accuracy"],
                "ner_tag_accuracy": final["ner_tag_accuracy"],
            }
        )
    write_json(RESULTS / "honest_pilot.json", {"rows": rows})
    write_csv(RESULTS / "honest_pilot.csv", rows)
    for row in rows:
        print(
            f"{row['arm']:28} {100 * row['accuracy']:6.2f} % ({row['gain_points']:+.2f}) ppl {row['perplexity']:.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    arm = sub.add_parser("run", help="train and evaluate one arm")
    arm.add_argument("mode", choices=["self", "soft", "aux"])
    arm.add_argument("layer", type=int, help="the decoder layer whose input gets the tags")
    arm.add_argument("--seed", type=int, default=0)
    arm.add_argument("--weight", type=float, default=0.2, help="tag loss weight (default: %(default)s)")
    arm.add_argument("--shift", type=int, choices=[0, 1], default=0, help="1: predict the next token's tags")
    arm.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="the reproduction's prepared data")
    sub.add_parser("collect", help="write results/honest_pilot.{json,csv} from the arms' files")
    args = parser.parse_args()
    if args.command == "collect":
        collect()
    else:
        run(args.mode, args.layer, args.seed, args.weight, args.shift, args.cache)


if __name__ == "__main__":
    main()
