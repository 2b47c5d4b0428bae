"""Experiments on the reviewers' questions: a model that predicts its own tags, a plain-BPE baseline, tag noise.

Runs (language models on the same Austen data and schedule as `language_models.py`):

    lime_heads          LIME with tag heads (pos, ner): evaluated also *self-tagged*, the honest mode in which every
                        tag it reads is its own causal prediction (`lime_hf.tag_heads.self_tagged_forward`), and with
                        10 / 30 / 50 % of the full-document input tags replaced by random labels (tagger noise).
    lime_plus1_heads    LIME+1 with tag heads: self-tagged evaluation (it guides itself); free generation
                        self-guided in `free_generation.py`.
    baseline_plain_bpe  the baseline on the plain BPE (the same vocabulary, its own byte-level pre-splitting, no
                        linguistic pre-tokenization), evaluated on exactly the text of the other runs' evaluation
                        tokens; per-token metrics differ by tokenization, so nats per character are reported too.

`report_self_tagging` adds the headline numbers: the data fraction with self-predicted tags (target <= 80 %),
the plain-BPE comparison and the noise curve.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from common import AUSTEN

from .harness import (
    SPECIAL_ID,
    TRAIN_NOVELS,
    autocast,
    cut_at_paragraph,
    load_arrays,
    log,
    save_arrays,
    unwrap,
)
from .language_models import EvalMode, LmSpec, add_counts, evaluate_lm, next_token_counts

HEAD_FIELDS = ("pos", "ner")
NOISE_FRACTIONS = (0.1, 0.3, 0.5)


# ------------------------------------------------------------------------------------------- evaluations


@torch.no_grad()
def evaluate_self_tagged(model, blocks: dict[str, torch.Tensor], device, batch: int) -> dict:
    """Next-token accuracy and perplexity when the model reads only its own causal tag predictions, and the
    accuracy of those predictions against spaCy's full-document tags (of the tag each position is fed)."""
    from lime_hf.tag_heads import self_tagged_forward

    model.eval()
    nll, correct, count = 0.0, 0, 0
    tag_correct = {name: 0 for name in HEAD_FIELDS}
    tag_count = {name: 0 for name in HEAD_FIELDS}
    for start in range(0, len(blocks["input_ids"]), batch):
        ids = blocks["input_ids"][start : start + batch].to(device)
        mask = blocks["mask"][start : start + batch].to(device)
        with autocast(device):
            logits, fed = self_tagged_forward(model, ids, attention_mask=mask)
        nll, correct, count = add_counts((nll, correct, count), next_token_counts(logits, ids, mask))
        for name in HEAD_FIELDS:
            reference = model.tag_heads.fed_tags(blocks[name][start : start + batch].to(device))
            scored = (reference > 1) & mask.bool()
            tag_correct[name] += ((fed[name] == reference) & scored).sum().item()
            tag_count[name] += scored.sum().item()
    model.train()
    metrics = {"accuracy": correct / count, "perplexity": math.exp(nll / count), "loss": nll / count}
    metrics.update(
        {f"{name}_tag_accuracy": tag_correct[name] / max(tag_count[name], 1) for name in HEAD_FIELDS}
    )
    return metrics | {"tokens": count}


def noisy(tags: torch.Tensor, fraction: float, num_labels: int, seed: int) -> torch.Tensor:
    """Replace `fraction` of the real tags (ids > 2) by labels drawn uniformly from the field's real labels."""
    generator = torch.Generator().manual_seed(seed)
    replace = (torch.rand(tags.shape, generator=generator) < fraction) & (tags > SPECIAL_ID)
    random_labels = torch.randint(SPECIAL_ID + 1, num_labels, tags.shape, generator=generator)
    return torch.where(replace, random_labels, tags)


def head_modes(shift: int, metadata_fields: dict[str, list[str]]):
    """Extra evaluations of a model with heads: self-tagged; for LIME also full-document tags with noise."""

    def modes(device: torch.device, batch: int) -> dict[str, EvalMode]:
        result: dict[str, EvalMode] = {
            "self_tags": lambda model, blocks: evaluate_self_tagged(model, blocks, device, batch)
        }
        for fraction in NOISE_FRACTIONS if shift == 0 else ():
            percent = round(100 * fraction)

            def evaluate(model, blocks, fraction=fraction, percent=percent):
                keys = {name: f"{name}_noise{percent}" for name in HEAD_FIELDS}
                for seed, (name, key) in enumerate(keys.items()):
                    if key not in blocks:  # the same noisy tags at every evaluation point
                        blocks[key] = noisy(blocks[name], fraction, len(metadata_fields[name]), seed)
                return evaluate_lm(model, blocks, {f"{n}_ids": k for n, k in keys.items()}, device, batch)

            result[f"noise_{percent}"] = evaluate
        return result

    return modes


# ------------------------------------------------------------------------------------------- plain BPE


def prepare_plain_bpe(cache: Path, cfg: dict) -> None:
    """`lm_plain_{train,eval}.npz`: the training novels and the evaluation text through the plain BPE.

    The evaluation stream covers exactly the text of the first `eval_tokens` tokens of the LIME-tokenized one.
    """
    from tokenizers import Tokenizer

    data = cache / "data"
    if (data / "lm_plain_eval.npz").exists():
        return
    meta = json.loads((data / "meta.json").read_text())
    bpe = Tokenizer.from_file(str(data / "tokenizer" / "tokenizer.json"))  # the LimeTokenizer's own BPE
    bos, eos = meta["lm"]["bos_token_id"], meta["lm"]["eos_token_id"]
    max_chars = meta["data_config"]["max_chars"]
    train = []
    for name in TRAIN_NOVELS:
        text = cut_at_paragraph(unwrap((AUSTEN / f"{name}.txt").read_text(encoding="utf-8")), max_chars)
        train.append(np.asarray([bos, *bpe.encode(text).ids, eos], dtype=np.int32))
    lime_eval = load_arrays(data / "lm_eval.npz")["input_ids"][: cfg["eval_tokens"]]
    text = bpe.decode([int(i) for i in lime_eval if i not in (bos, eos)], skip_special_tokens=True)
    evaluation = np.asarray([bos, *bpe.encode(text).ids], dtype=np.int32)
    save_arrays(data / "lm_plain_train.npz", {"input_ids": np.concatenate(train)})
    save_arrays(data / "lm_plain_eval.npz", {"input_ids": evaluation})
    plain = {"eval_chars": len(text), "eval_tokens": len(evaluation), "lime_eval_tokens": len(lime_eval)}
    plain["train_tokens"] = int(sum(len(part) for part in train))
    (data / "lm_plain_meta.json").write_text(json.dumps(plain, indent=2) + "\n")
    log(f"prepare: plain BPE {plain}")


# ------------------------------------------------------------------------------------------------ runs


def self_tagging_specs(metadata_fields: dict[str, list[str]] | None = None) -> dict[str, LmSpec]:
    """The runs of this experiment: variant -> `LmSpec`."""
    fields = metadata_fields or {}
    return {
        "lime_heads": LmSpec(0, HEAD_FIELDS, extra_modes=head_modes(0, fields)),
        "lime_plus1_heads": LmSpec(1, HEAD_FIELDS, extra_modes=head_modes(1, fields)),
        "baseline_plain_bpe": LmSpec(None, arrays="lm_plain", cut_eval=False, prepare=prepare_plain_bpe),
    }


SELF_TAGGING_VARIANTS = tuple(self_tagging_specs())


# ---------------------------------------------------------------------------------------------- report


def report_self_tagging(lm: dict, cache: Path, crossing, mean_or_none) -> dict:
    """Headline numbers of this experiment from whatever of its runs exist (paired with the baseline by seed)."""
    headline: dict = {}
    seeds = sorted({run["seed"] for run in lm.values() if run["variant"] == "baseline"})

    def final(run: dict, mode: str, metric: str = "accuracy"):
        return run["history"][-1][mode][metric]

    fractions = {"self_tags": [], "full_doc_tags": [], "prefix_tags": []}
    for seed in seeds:
        base, heads = lm.get(f"lm-baseline-s{seed}"), lm.get(f"lm-lime_heads-s{seed}")
        if base is None or heads is None:
            continue
        target, total = final(base, "plain"), base["history"][-1]["tokens_seen"]
        for mode in fractions:
            tokens = crossing(
                [p["tokens_seen"] for p in heads["history"]],
                [p[mode]["accuracy"] for p in heads["history"]],
                target,
            )
            fractions[mode].append(None if tokens is None else tokens / total)
    if fractions["self_tags"]:
        headline["data_fraction_lime_self_tags"] = mean_or_none(fractions["self_tags"])
        headline["data_fraction_lime_self_tags_target"] = 0.80
        headline["data_fraction_lime_heads_per_seed"] = fractions
    finals = {}
    for name, run in lm.items():
        if run["variant"] in SELF_TAGGING_VARIANTS:
            finals[name] = {mode: run["history"][-1][mode] for mode in run["eval_modes"]}
    headline["self_tagging_final_eval_metrics"] = finals
    noise = {}
    for name, run in lm.items():
        if run["variant"] == "lime_heads":
            point = run["history"][-1]
            noise[name] = (
                {"0": point["full_doc_tags"]["accuracy"]}
                | {str(round(100 * f)): point[f"noise_{round(100 * f)}"]["accuracy"] for f in NOISE_FRACTIONS}
                | {"no_tags": point["no_tags"]["accuracy"]}
            )
    if noise:
        headline["tag_noise_accuracy_lime_heads"] = noise
    plain_meta = cache / "data" / "lm_plain_meta.json"
    if plain_meta.exists():
        chars = json.loads(plain_meta.read_text())["eval_chars"]
        comparison = {}
        for seed in seeds:
            base, plain = lm.get(f"lm-baseline-s{seed}"), lm.get(f"lm-baseline_plain_bpe-s{seed}")
            if base is None or plain is None:
                continue
            for label, run in (("lime_tokenization", base), ("plain_bpe", plain)):
                metrics = run["history"][-1]["plain"]
                data = run[
                    "data"
                ]  # runs from before `tokens` was recorded: every block's first token is unscored
                tokens = metrics.get("tokens") or data["eval_tokens"] - math.ceil(
                    data["eval_tokens"] / data["seq_len"]
                )
                comparison.setdefault(label, {})[f"s{seed}"] = {
                    "accuracy": metrics["accuracy"],
                    "perplexity": metrics["perplexity"],
                    "nats_per_char": metrics["loss"] * tokens / chars,
                    "scored_tokens": tokens,
                }
        headline["plain_bpe_baseline"] = comparison | {"eval_chars": chars}
    return headline
