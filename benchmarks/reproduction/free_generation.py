"""Stage `generate`: free generation from the trained language models, scored by a baseline of another seed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from common import AUSTEN  # the benchmarks' shared helpers

from .harness import EVAL_NOVEL, GENERATION, environment, log, unwrap, write_json

# ---------------------------------------------------------------------------------------------- generation


def generation_prompts(count: int, words: int) -> list[tuple[str, str]]:
    """(prompt, true continuation) pairs: the first `words` words of evenly spaced long Persuasion paragraphs."""
    paragraphs = unwrap((AUSTEN / f"{EVAL_NOVEL}.txt").read_text(encoding="utf-8")).split("\n\n")
    long = [p.split(" ") for p in paragraphs if len(p.split(" ")) >= words + 60]
    chosen = [long[int(i)] for i in np.linspace(0, len(long) - 1, min(count, len(long)))]
    return [(" ".join(p[:words]), " " + " ".join(p[words:])) for p in chosen]


@torch.no_grad()
def generate_stage(cache: Path, preset: str) -> None:
    """Sample continuations of Persuasion prompts; score them with a baseline trained from another seed."""
    from transformers import AutoModelForCausalLM

    import lime_hf  # noqa: F401 - registers the "lime" model type
    from lime_hf import LimeTokenizer

    path = cache / "runs" / preset / "generation.json"
    # Resumable per generator and seed: what an earlier call scored is kept, only the rest is generated.
    previous = (
        json.loads(path.read_text()) if path.exists() else {"records": [], "samples": {}, "wall_s": 0.0}
    )
    models = cache / "models" / preset
    baselines = sorted(int(p.name.split("-s")[-1]) for p in models.glob("lm-baseline-s*"))
    if not baselines:
        log(f"generate: no trained baseline under {models} to judge with, skipping")
        return
    judge_seed = 1 if 1 in baselines else baselines[0]
    seeds = sorted({int(p.name.split("-s")[-1]) for p in models.glob("lm-*-s*")} | {judge_seed})
    if previous["records"] and previous["config"]["judge"] != f"lm-baseline-s{judge_seed}":
        raise SystemExit(
            f"generate: {path} was judged by {previous['config']['judge']}; remove it to start over"
        )
    started = time.time()
    tokenizer = LimeTokenizer.from_pretrained(cache / "data" / "tokenizer")
    tokenizer.annotator.nlp  # noqa: B018 - load spaCy once
    load = lambda name: AutoModelForCausalLM.from_pretrained(models / name, dtype=torch.float32).eval()  # noqa: E731
    judge = load(f"lm-baseline-s{judge_seed}")
    g = GENERATION["smoke" if preset == "smoke" else "default"]
    prompts = generation_prompts(g["prompts"], g["prompt_words"])
    encoded = [tokenizer(prompt, return_tensors="pt") for prompt, _ in prompts]
    generators = {
        "baseline": ("baseline", {}),
        "lime_reannotated": ("lime", {"tokenizer": tokenizer, "metadata_provider": "annotate"}),
        "lime_unknown_tags": ("lime", {"metadata_provider": "unknown"}),
        "lime_plus1_unguided": ("lime_plus1", {"metadata_provider": "unknown"}),
        # self_tagging.py's models: tags from the model's own heads, no spaCy in the loop.
        "lime_heads_reannotated": ("lime_heads", {"tokenizer": tokenizer, "metadata_provider": "annotate"}),
        "lime_heads_model_provider": ("lime_heads", {"metadata_provider": "model"}),
        "lime_plus1_heads_self_guided": ("lime_plus1_heads", {}),
    }

    def judge_nll(prompt_ids: torch.Tensor, continuation: torch.Tensor) -> tuple[float, int]:
        ids = torch.cat([prompt_ids, continuation], dim=1)
        logits = judge(input_ids=ids).logits[0, prompt_ids.shape[1] - 1 : -1]
        nll = torch.nn.functional.cross_entropy(logits.float(), continuation[0], reduction="sum")
        return nll.item(), continuation.shape[1]

    def trim(tokens: torch.Tensor) -> torch.Tensor:
        eos = (tokens[0] == tokenizer.eos_token_id).nonzero()
        return tokens[:, : int(eos[0]) + 1] if len(eos) else tokens

    records, samples = previous["records"], previous["samples"]
    done = {(record["generator"], record["seed"]) for record in records}
    todo = [
        (seed, label)
        for seed in seeds
        if seed != judge_seed
        for label, (variant, _) in generators.items()
        if (label, seed) not in done and (models / f"lm-{variant}-s{seed}").exists()
    ]
    if ("true_text", None) in done and not todo:
        log(f"generate: every generator in {path} already, skipping")
        return
    # The true continuation, as reference.
    for index, ((prompt, continuation), enc) in enumerate(zip(prompts, encoded, strict=True)):
        if ("true_text", None) in done:
            break
        full = tokenizer(prompt + continuation, return_tensors="pt")["input_ids"]
        n = enc["input_ids"].shape[1]
        if torch.equal(full[:, :n], enc["input_ids"]):
            nll, count = judge_nll(enc["input_ids"], full[:, n : n + g["new_tokens"]])
            records.append(
                {"generator": "true_text", "seed": None, "prompt": index, "nll": nll, "tokens": count}
            )
    for seed in [s for s in seeds if s != judge_seed]:
        for label, (variant, extra) in generators.items():
            if (seed, label) not in todo:
                continue
            model = load(f"lm-{variant}-s{seed}")
            texts = []
            for index, enc in enumerate(encoded):
                inputs = {
                    k: v
                    for k, v in enc.items()
                    if variant != "baseline" or k in ("input_ids", "attention_mask")
                }
                torch.manual_seed(g["seed"] + index)
                output = model.generate(
                    **inputs, **extra, do_sample=True, top_k=g["top_k"], temperature=g["temperature"],
                    max_new_tokens=g["new_tokens"], pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )  # fmt: skip
                new = trim(output[:, enc["input_ids"].shape[1] :])
                nll, count = judge_nll(enc["input_ids"], new)
                tokens = new[0].tolist()
                records.append(
                    {
                        "generator": label, "seed": seed, "prompt": index, "nll": nll, "tokens": count,
                        "distinct_bigrams": len(set(zip(tokens, tokens[1:], strict=False))), "bigrams": max(0, len(tokens) - 1),
                    }
                )  # fmt: skip
                texts.append(tokenizer.decode(tokens))
            samples[f"{label}-s{seed}"] = texts
            log(f"generate: {label} seed {seed} done")
    summary = {}
    for label in ["true_text", *generators]:
        rows = [r for r in records if r["generator"] == label]
        if rows:
            summary[label] = {
                "judge_perplexity": math.exp(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows)),
                "tokens": sum(r["tokens"] for r in rows),
                "samples": len(rows),
            }
            if label != "true_text":
                summary[label]["distinct_bigram_ratio"] = sum(r["distinct_bigrams"] for r in rows) / max(
                    1, sum(r["bigrams"] for r in rows)
                )
    result = {
        "config": {
            **g,
            "judge": f"lm-baseline-s{judge_seed}",
            "generator_seeds": sorted({r["seed"] for r in records if r["seed"] is not None}),
        },
        "prompts": [prompt for prompt, _ in prompts],
        "summary": summary,
        "records": records,
        "samples": samples,
        "wall_s": previous["wall_s"] + time.time() - started,
        "environment": environment(),
    }
    write_json(path, result)
    log(f"generate: {json.dumps(summary)}")
