"""Experiment: the held-out Austen cloze, scored by lm-evaluation-harness.

A LAMBADA-style task on *Persuasion* (the novel no model trained on): each item is the last word of a sentence,
its context the paragraph up to that word (lm-eval cuts it from the left to the models' training length). The
trained language models of the reproduction are scored by lm-eval's own `simple_evaluate`, as a user would run
them: the baseline as `--model hf`, the LIME models as `--model lime` with each tag source (`tags=`):

    baseline            hf
    lime                lime, tags=prefix (causal spaCy tags) and tags=none
    lime_plus1          lime, tags=none (unguided: the next token's tags would be the answer's)
    lime_heads          lime, tags=model (its own causal predictions), prefix and none
    lime_plus1_heads    lime, tags=model (self-guided) and none (unguided)

Metrics: `acc` (every token of the word is the model's greedy choice, as LAMBADA's) and the word's perplexity.
Results: `reproduce_cloze.{json,csv}` beside the other results; `cloze_table` is the README's table.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
from common import AUSTEN

from .harness import EVAL_NOVEL, PRESETS, log, unwrap, write_csv, write_json

TASK = "austen_cloze"
ITEMS = {"smoke": 40, "default": 300}
# Runs scored, and the `tags` each is scored with (None: the baseline, `--model hf`).
ROWS = {
    "baseline": (None,),
    "lime": ("prefix", "none"),
    "lime_plus1": ("none",),
    "lime_heads": ("model", "prefix", "none"),
    "lime_plus1_heads": ("model", "none"),
}
ABBREVIATIONS = {"Mr", "Mrs", "Dr", "St", "Esq"}
# A sentence's last word: letters only, right before . ! or ? (and any closing quote), then a space or the end.
LAST_WORD = re.compile(r"(?<= )([A-Za-z]+)[.!?]+[\"']?(?=\s|$)")


def cloze_items(text: str, count: int, min_context_words: int = 12) -> list[dict]:
    """The first `count` sentence-final words of `text` (paragraphs separated by blank lines) as cloze items.

    The context is the paragraph up to the word, without its trailing space; the target is `" " + word`, so a
    context's tokens never depend on the word (lm-eval encodes them apart)."""
    items = []
    for paragraph in text.split("\n\n"):
        for match in LAST_WORD.finditer(paragraph):
            word, context = match.group(1), paragraph[: match.start(1)].rstrip()
            if word in ABBREVIATIONS or len(context.split()) < min_context_words:
                continue
            items.append({"context": context, "word": f" {word}"})
            if len(items) == count:
                return items
    return items


def write_task(folder: Path, items: list[dict]) -> Path:
    """The task as lm-eval reads it: a YAML file and its JSON-lines data in `folder` (an `--include_path`)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "persuasion_cloze.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{word}}"\nmetric_list:\n'
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def model_args(model_dir: Path, tokenizer_dir: Path, max_length: int, tags: str | None) -> dict:
    """`--model_args` of one row: the run's weights, the shared tokenizer, float32 on CPU, the training length."""
    args = dict(pretrained=str(model_dir), tokenizer=str(tokenizer_dir), trust_remote_code=True,
                dtype="float32", max_length=max_length, batch_size=8)  # fmt: skip
    return args if tags is None else {**args, "tags": tags}


def cloze_stage(cache: Path, preset: str, results: Path, device: str = "cpu") -> dict:
    """Score every trained run of `preset` on the cloze and write `reproduce_cloze.{json,csv}` to `results`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lime_hf.integrations.lm_eval  # noqa: F401 - registers lm-eval's `lime` model

    meta = json.loads((cache / "data" / "meta.json").read_text())
    text = unwrap((AUSTEN / f"{EVAL_NOVEL}.txt").read_text(encoding="utf-8"))  # no model trained on any of it
    items = cloze_items(text, ITEMS["smoke" if preset == "smoke" else "default"])
    manager = TaskManager(include_path=str(write_task(cache / "cloze", items)))
    seq_len = PRESETS[preset]["lm"]["seq_len"]
    rows = []
    for seed in PRESETS[preset]["lm"]["seeds"]:
        for variant, sources in ROWS.items():
            model_dir = cache / "models" / preset / f"lm-{variant}-s{seed}"
            if not model_dir.exists():
                continue
            for tags in sources:
                started = time.time()
                out = lm_eval.simple_evaluate(
                    model="hf" if tags is None else "lime",
                    model_args=model_args(model_dir, cache / "data" / "tokenizer", seq_len, tags),
                    tasks=[TASK],
                    task_manager=manager,
                    device=device,
                )
                scores, config = out["results"][TASK], out["config"]
                rows.append({
                    "variant": variant, "seed": seed, "model": "hf" if tags is None else "lime",
                    "tags": config.get("lime_tags"), "guidance": config.get("lime_guidance"),
                    "acc": scores["acc,none"], "acc_stderr": scores["acc_stderr,none"],
                    "perplexity": scores["perplexity,none"], "wall_s": time.time() - started,
                })  # fmt: skip
                log(
                    f"cloze: {variant} s{seed} tags={tags}: acc {rows[-1]['acc']:.4f} ppl {rows[-1]['perplexity']:.1f}"
                )
    if not rows:
        raise SystemExit(
            f"cloze: no trained language model in {cache / 'models' / preset} (looked for lm-<variant>-s<seed> "
            f"with variants {list(ROWS)}): run `reproduce.py train` first."
        )
    summary = {
        "task": TASK, "preset": preset, "items": len(items), "example": items[0] if items else None,
        "novel": EVAL_NOVEL, "items_from": "the first sentence-final words of the novel",
        "max_length_tokens": seq_len,
        "data_config": meta["data_config"], "lm_eval_version": lm_eval.__version__, "rows": rows,
        "mean_over_seeds": mean_over_seeds(rows),
    }  # fmt: skip
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "reproduce_cloze.json", summary)
    write_csv(results / "reproduce_cloze.csv", rows)
    print(cloze_table(summary))
    return summary


def mean_over_seeds(rows: list[dict]) -> list[dict]:
    """One row per (variant, tags): accuracy, its standard error and perplexity averaged over the seeds that have
    the run (every seed scores the same items, so a mean's item-sampling error is about one seed's)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["tags"], row["guidance"]), []).append(row)
    return [
        {"variant": variant, "tags": tags, "guidance": guidance, "seeds": [row["seed"] for row in group],
         "acc": float(np.mean([row["acc"] for row in group])),
         "acc_stderr": float(np.mean([row["acc_stderr"] for row in group])),
         "perplexity": float(np.mean([row["perplexity"] for row in group]))}
        for (variant, tags, guidance), group in groups.items()
    ]  # fmt: skip


LABELS = {
    ("baseline", None): "baseline (`--model hf`)",
    ("lime", "prefix"): "LIME, prefix tags (`tags=prefix`)",
    ("lime", "none"): "LIME, no tags (`tags=none`)",
    ("lime_plus1", "none"): "LIME+1, unguided (`tags=none`)",
    ("lime_heads", "model"): "LIME with heads, self-tagged (`tags=model`)",
    ("lime_heads", "prefix"): "LIME with heads, prefix tags",
    ("lime_heads", "none"): "LIME with heads, no tags",
    ("lime_plus1_heads", "model"): "LIME+1 with heads, self-guided (`tags=model`)",
    ("lime_plus1_heads", "none"): "LIME+1 with heads, unguided",
}


def cloze_table(summary: dict) -> str:
    """The README's Markdown table of the cloze results (means over seeds)."""
    lines = ["| model, tags | seeds | accuracy ± s.e. | word perplexity |", "| --- | --- | --- | --- |"]
    for row in summary["mean_over_seeds"]:
        label = LABELS.get((row["variant"], row["tags"]), f"{row['variant']}, {row['tags']}")
        seeds = len(row["seeds"])
        accuracy = f"{row['acc']:.2%} ± {row['acc_stderr']:.2%}".replace("%", " %")
        lines.append(f"| {label} | {seeds} | {accuracy} | {row['perplexity']:.4g} |")
    return "\n".join(lines)
