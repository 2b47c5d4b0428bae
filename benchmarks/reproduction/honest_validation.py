"""A validation text for the honest stage, so that choices between its variants are not made on the test text.

The stage's evaluation ("test") is the first `eval_tokens` (30,000) tokens of Persuasion, which no run trains on.
The validation text is the next `eval_tokens` tokens of the same stream, `[eval_tokens, 2 * eval_tokens)`: the same
novel, not trained on either, and never read during training. Each finished run's final model
(`models/{preset}/{run}`, saved in bfloat16) is scored there: the baseline without tags, every honest run with its
own tags (`input_ids` alone), with its heads' tag accuracy. The same saved model is scored on the test text too,
as a check against the number the run recorded at the end of its training (in float32, before the bfloat16 save).
A run that reads its heads' argmax is also scored on validation reading their expected embeddings
(`predicted_tag_embedding="expected"`, `validation_read_expected`): the check that chose that reading.

The variant that validation selects is the honest LIME (one that injects tags; the `heads_only` controls inject
none) with the highest mean gain over the baseline across seeds; the report gives its test gain beside it.
Results per run are cached in `validation/{preset}/{run}.json`; a run whose model is not on this machine keeps the
row of the committed `reproduce_honest_validation.json`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from .harness import PRESETS, RESULTS, load_arrays, log, run_settings, write_csv, write_json
from .honest import GOALS, HONEST_VARIANTS, evaluate_own_tags
from .language_models import evaluate_lm, stream_blocks

FILE = "reproduce_honest_validation"
# Nothing injected: not an honest LIME to select.
CONTROLS = ("heads_only", "heads_only_linear", "heads_only_plus1_linear")
# An argmax run's validation score with its heads' tags read as expected embeddings.
READ_EXPECTED = "validation_read_expected"
EVAL_BATCH = 16


def load_final_model(model_dir: Path, variant: str):
    from transformers import AutoModelForCausalLM

    from lime_hf import LimeForCausalLM

    loader = AutoModelForCausalLM if variant == "baseline" else LimeForCausalLM
    return loader.from_pretrained(model_dir, dtype=torch.float32).eval()


def score(model, variant: str, blocks: dict[str, torch.Tensor]) -> dict:
    """The baseline's plain accuracy, or a honest run's with its own tags (and its heads' tag accuracy)."""
    device = torch.device("cpu")
    if variant == "baseline":
        return evaluate_lm(model, blocks, {}, device, EVAL_BATCH)
    return evaluate_own_tags(model, blocks, device, EVAL_BATCH)


def read_expected(model, blocks: dict[str, torch.Tensor]) -> dict:
    """An argmax run's score with its heads' tags read as expected embeddings instead (`predicted_tag_embedding`, a
    choice that can be switched on a trained model): the check that chose that reading, on validation alone."""
    model.config.predicted_tag_embedding = "expected"
    try:
        return evaluate_own_tags(model, blocks, torch.device("cpu"), EVAL_BATCH)
    finally:
        model.config.predicted_tag_embedding = "argmax"


def validate_run(
    cache: Path, preset: str, name: str, variant: str, splits, spans: dict, argmax: bool = False
) -> dict | None:
    """One run's cached scores on both texts; computed from its saved model when missing, None without one.
    `splits()`: the evaluation blocks of both texts, from the run's token stream. `argmax`: a run that reads its
    heads' argmax, also scored on validation reading their expected embeddings (`READ_EXPECTED`)."""
    path = cache / "validation" / preset / f"{name}.json"
    model_dir = cache / "models" / preset / name
    record = json.loads(path.read_text()) if path.exists() else None
    if not model_dir.exists() or (record is not None and (not argmax or READ_EXPECTED in record)):
        return record
    model = load_final_model(model_dir, variant)
    if record is None:
        record = {"run": name, "variant": variant, "preset": preset, "token_spans": spans}
        record["weights"] = "the saved model, bfloat16"
        record |= {split: score(model, variant, blocks) for split, blocks in splits().items()}
        log(
            f"validation: {name} {record['validation']['accuracy']:.4f} (test {record['test']['accuracy']:.4f})"
        )
    if argmax:
        record[READ_EXPECTED] = read_expected(model, splits()["validation"])
    write_json(path, record)
    return record


def validation_records(cache: Path, preset: str, lm: dict) -> dict[str, dict]:
    """Scores of the baseline and every honest run: from the cache, the saved models, or the committed file."""
    cfg, meta = run_settings(cache, preset, "lm")
    n = cfg["eval_tokens"]
    spans = {"test": [0, n], "validation": [n, 2 * n]}
    if meta["eval_tokens"] < 2 * n:  # the smoke data: no text after the test's
        log(
            f"validation: the evaluation novel has {meta['eval_tokens']:,} tokens, fewer than {2 * n:,}; skipped"
        )
        return {}

    @functools.cache
    def splits(stream: str) -> dict[str, dict[str, torch.Tensor]]:
        arrays = load_arrays(cache / "data" / f"{stream}_eval.npz")
        return {
            split: stream_blocks(arrays, cfg["seq_len"], meta["pad_token_id"], start, stop)
            for split, (start, stop) in spans.items()
        }

    committed_path = RESULTS / f"{FILE}.json"
    committed = json.loads(committed_path.read_text())["runs"] if committed_path.exists() else {}
    records = {}
    for name, run in sorted(lm.items()):
        if run["variant"] not in ("baseline", *HONEST_VARIANTS):
            continue
        blocks = functools.partial(splits, run.get("token_stream", "lm"))  # the stream it was evaluated on
        argmax = (
            run["variant"] not in ("baseline", *CONTROLS)
            and run.get("config", {}).get("predicted_tag_embedding", "argmax") == "argmax"
        )
        record = validate_run(cache, preset, name, run["variant"], blocks, spans, argmax)
        if record is None and committed.get(name, {}).get("preset") == preset:
            record = committed[name]
        if record is None:
            log(f"validation: {name} has no saved model and no committed row; left out")
            continue
        records[name] = record
    return records


def report_validation(cache: Path, preset: str, lm: dict, results: Path) -> dict:
    """`reproduce_honest_validation.{json,csv}`: every run on validation and test against the baseline of its
    seed, the mean per variant, and the variant that validation selects with its test gain."""
    records = validation_records(cache, preset, lm)
    rows = []
    for name, record in records.items():
        run = lm[name]
        base = records.get(f"lm-baseline-s{run['seed']}")
        if run["variant"] == "baseline" or base is None:
            continue
        mode = "own_tags"
        valid, base_valid = record["validation"], base["validation"]
        final, base_final = run["history"][-1][mode], lm[base["run"]]["history"][-1]["plain"]
        rows.append(
            {
                "run": name,
                "variant": run["variant"],
                "seed": run["seed"],
                "tags_read": mode,
                "validation_accuracy": valid["accuracy"],
                "validation_baseline_accuracy": base_valid["accuracy"],
                "validation_gain_points": 100 * (valid["accuracy"] - base_valid["accuracy"]),
                "validation_pos_tag_accuracy": valid["pos_tag_accuracy"],
                "validation_pos_tag_accuracy_causal": valid["pos_tag_accuracy_causal"],
                "test_accuracy": final["accuracy"],
                "test_baseline_accuracy": base_final["accuracy"],
                "test_gain_points": 100 * (final["accuracy"] - base_final["accuracy"]),
                "test_pos_tag_accuracy": final["pos_tag_accuracy"],
                "test_pos_tag_accuracy_causal": final["pos_tag_accuracy_causal"],
                "test_accuracy_saved_model": record["test"]["accuracy"],
                "test_gain_points_saved_model": 100 * (record["test"]["accuracy"] - base["test"]["accuracy"]),
                "validation_gain_points_read_expected": None
                if READ_EXPECTED not in record
                else 100 * (record[READ_EXPECTED]["accuracy"] - base_valid["accuracy"]),
            }
        )

    summary = {}
    for variant in sorted({row["variant"] for row in rows}):
        group = [row for row in rows if row["variant"] == variant]
        summary[variant] = {"seeds": [row["seed"] for row in group]} | {
            f"mean_{key}": float(np.mean([row[key] for row in group]))
            for key in ("validation_gain_points", "test_gain_points", "validation_pos_tag_accuracy")
        }
    seeds = set(PRESETS[preset]["lm"]["seeds"])
    eligible = {v: s for v, s in summary.items() if v not in CONTROLS and set(s["seeds"]) == seeds}
    best = max(eligible, key=lambda v: eligible[v]["mean_validation_gain_points"]) if eligible else None
    selected = None
    if best is not None:
        chosen = [row for row in rows if row["variant"] == best]
        selected = {
            "variant": best,
            "rule": "highest mean validation gain (own tags) over the baseline, among the variants that inject "
            "tags and have every seed",
            "validation_gain_points": {f"s{row['seed']}": row["validation_gain_points"] for row in chosen},
            "test_gain_points": {f"s{row['seed']}": row["test_gain_points"] for row in chosen},
            "test_pos_tag_accuracy": {f"s{row['seed']}": row["test_pos_tag_accuracy"] for row in chosen},
        } | summary[best]
        selected["accuracy_goal_met"] = selected["mean_test_gain_points"] >= GOALS["accuracy_gain_points"]
    headline = {"goals": GOALS, "selected": selected, "summary": summary, "rows": rows, "runs": records}
    write_json(results / f"{FILE}.json", headline)
    if rows:
        write_csv(results / f"{FILE}.csv", rows)
    return headline
