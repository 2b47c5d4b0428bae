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

import csv
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


# ---------------------------------------------------------------------------------------------- per item

# Paired per-item comparisons: a reference run (read as `tags`) -> the runs compared with it on the same items, each
# with its tag source. The baseline pairs are the question of the table above; the layer-2 runs of `honest.py` pair
# with their multi-task control `heads_only` (the same architecture and heads, nothing injected), whose logits do
# not depend on the tags. A pair whose models are not in the cache is skipped.
ITEM_PAIRS = {
    ("baseline", None): (
        ("lime", "prefix"),
        ("honest_causal_linear", "model"),  # the mode the README recommends for plain text
        *(("lime_heads", "prefix"), ("lime_heads", "model")),
    ),
    ("heads_only", "model"): (
        *(("honest_given", "prefix"), ("honest_given", "model")),
        *(("honest_causal", "prefix"), ("honest_causal", "model")),
        *(("honest_best", "model"), ("honest_predicted", "model")),
    ),
}
POS_GROUPS = {"NN": "noun", "NNS": "noun", "NNP": "proper noun", "NNPS": "proper noun",
              "JJ": "adjective", "JJR": "adjective", "JJS": "adjective", "RB": "adverb", "RBR": "adverb",
              "RBS": "adverb"}  # fmt: skip
FREQUENCY_BINS = ((0, "<10"), (10, "10-99"), (100, "100-999"), (1000, ">=1000"))  # occurrences in training


def column(variant: str, tags: str | None, seed: int) -> str:
    """The per-item CSV's column prefix of one scored model."""
    return f"{variant}|{tags or 'hf'}|s{seed}"


def score_items(manager, model_dir: Path, tokenizer_dir: Path, seq_len: int, tags: str | None, device: str):
    """Each item's log-likelihood of its word and whether every token of it is the greedy choice (lm-eval's
    `log_samples`), by item index."""
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="hf" if tags is None else "lime",
        model_args=model_args(model_dir, tokenizer_dir, seq_len, tags),
        tasks=[TASK],
        task_manager=manager,
        device=device,
        log_samples=True,
    )
    return {s["doc_id"]: (float(s["perplexity"]), int(s["acc"])) for s in out["samples"][TASK]}


def word_properties(items: list[dict], tokenizer, train_text: str) -> list[dict]:
    """Per item: the word, spaCy's POS tag of it read after its context (`SpacyAnnotator`, the full pipeline),
    its group, its count in the training novels (case-insensitive, whole words) and its length in tokens, as lm-eval
    splits it (the tokens of context + word beyond those of the context)."""
    from collections import Counter

    from lime_hf import SpacyAnnotator

    counts = Counter(re.findall(r"[a-z]+", train_text.lower()))
    annotator = SpacyAnnotator(["pos"])
    texts = [item["context"] + item["word"] for item in items]
    rows = []
    for item, text, annotation in zip(items, texts, annotator(texts), strict=True):
        pos = annotation["pos"]
        (label,) = [lab for s, e, lab in zip(pos["starts"], pos["ends"], pos["labels"], strict=True)
                    if e == len(text)]  # fmt: skip
        count = counts[item["word"].strip().lower()]
        length = len(tokenizer(text)["input_ids"]) - len(tokenizer(item["context"])["input_ids"])
        rows.append({
            "word": item["word"].strip(), "pos": label,
            "pos_group": POS_GROUPS.get(label, "verb" if label.startswith("VB") else "other"),
            "train_count": count, "frequency": [name for low, name in FREQUENCY_BINS if count >= low][-1],
            "tokens": length, "length": str(length) if length < 3 else "3+",
        })  # fmt: skip
    return rows


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` against `losses` (ties dropped): the sign test, and McNemar's
    exact test when the two counts are the discordant pairs."""
    from scipy.stats import binomtest

    return float(binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0


def paired_stats(ref_ll: np.ndarray, ll: np.ndarray, ref_acc: np.ndarray, acc: np.ndarray) -> dict:
    """Paired statistics of a compared model against a reference on the same items, from `(seeds, items)` arrays:
    the compared model's log-likelihood of the word minus the reference's, averaged per item over the seeds (mean,
    its standard error over items, wins/losses and the sign test; the word perplexity ratio), and the accuracy's
    discordant pairs counted per item and seed, with McNemar's exact test."""
    diff = (ll - ref_ll).mean(axis=0)
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    gained, lost = int(((acc == 1) & (ref_acc == 0)).sum()), int(((acc == 0) & (ref_acc == 1)).sum())
    return {
        "items": len(diff), "mean_ll_diff": float(diff.mean()),
        "ll_diff_stderr": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan"),
        "wins": wins, "losses": losses, "sign_test_p": sign_test(wins, losses),
        "word_perplexity_ratio": float(np.exp(-diff.mean())),
        "acc_reference": float(ref_acc.mean()), "acc": float(acc.mean()),
        "acc_gained": gained, "acc_lost": lost, "mcnemar_p": sign_test(gained, lost),
    }  # fmt: skip


BREAKDOWNS = ("all", "length", "pos_group", "frequency")  # "all": one group of every item


def scores(rows: list[dict], model: tuple[str, str | None], seeds: list[int], metric: str) -> np.ndarray:
    """`(seeds, items)`: one model's `metric` ("ll" or "acc") on `rows` of the per-item table."""
    keys = [f"{column(*model, seed)}|{metric}" for seed in seeds]
    return np.array([[float(row[key]) for row in rows] for key in keys])


def compare_items(table: list[dict], seeds: tuple[int, ...]) -> list[dict]:
    """`paired_stats` of every pair of `ITEM_PAIRS` that `table` (one row per item) has scored for at least one seed
    (the seeds that have both models), over all items and per group of each property of the word."""
    rows = []
    for reference, compared in ITEM_PAIRS.items():
        for model in compared:
            both = [
                s for s in seeds if {f"{column(*m, s)}|ll" for m in (reference, model)} <= table[0].keys()
            ]
            if not both:
                continue
            for by in BREAKDOWNS:
                for group in sorted({row.get(by, "all") for row in table}, key=str):
                    members = [row for row in table if row.get(by, "all") == group]
                    arrays = [
                        scores(members, m, both, metric)
                        for metric in ("ll", "acc")
                        for m in (reference, model)
                    ]
                    rows.append({"reference": reference[0], "reference_tags": reference[1] or "hf",
                                 "variant": model[0], "tags": model[1], "seeds": both, "by": by, "group": group,
                                 **paired_stats(*arrays)})  # fmt: skip
    return rows


def items_stage(cache: Path, preset: str, results: Path, device: str = "cpu") -> dict:
    """The per-item comparison: scores the models of `ITEM_PAIRS` found in the cache item by item through lm-eval
    (`log_samples`), beside each word's properties, into `reproduce_cloze_items.csv` (one row per item; resumable:
    a model already scored there is not scored again; seed by seed, spaCy's slow `prefix` tags last), and writes the paired
    statistics to `reproduce_cloze_items.json`. The cache is only read."""
    import tempfile

    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    import lime_hf.integrations.lm_eval  # noqa: F401 - registers lm-eval's `lime` model

    from .harness import TRAIN_NOVELS

    text = unwrap((AUSTEN / f"{EVAL_NOVEL}.txt").read_text(encoding="utf-8"))
    items = cloze_items(text, ITEMS["smoke" if preset == "smoke" else "default"])
    seq_len, seeds = PRESETS[preset]["lm"]["seq_len"], tuple(PRESETS[preset]["lm"]["seeds"])
    tokenizer_dir = cache / "data" / "tokenizer"
    path = results / "reproduce_cloze_items.csv"
    if path.exists():
        with open(path, newline="") as handle:
            table = list(csv.DictReader(handle))
    else:
        train_text = "\n".join(
            unwrap((AUSTEN / f"{n}.txt").read_text(encoding="utf-8")) for n in TRAIN_NOVELS
        )
        properties = word_properties(items, AutoTokenizer.from_pretrained(tokenizer_dir), train_text)
        table = [{"item": index, **row} for index, row in enumerate(properties)]
    models = {pair for reference, compared in ITEM_PAIRS.items() for pair in (reference, *compared)}
    todo = sorted(
        ((*model, seed) for model in models for seed in seeds), key=lambda m: (m[2], m[1] == "prefix", str(m))
    )
    with tempfile.TemporaryDirectory() as folder:
        manager = TaskManager(include_path=str(write_task(Path(folder), items)))
        for variant, tags, seed in todo:
            name, model_dir = column(variant, tags, seed), cache / "models" / preset / f"lm-{variant}-s{seed}"
            if f"{name}|ll" in table[0] or not model_dir.exists():
                continue
            started = time.time()
            scores = score_items(manager, model_dir, tokenizer_dir, seq_len, tags, device)
            for index, row in enumerate(table):
                row[f"{name}|ll"], row[f"{name}|acc"] = scores[index]
            write_csv(path, table)  # after every model: a stopped stage goes on from here
            log(f"cloze items: {name} in {time.time() - started:.0f} s")
    comparisons = compare_items(table, seeds)
    scored = [key[: -len("|ll")] for key in table[0] if key.endswith("|ll")]
    per_model = {name: {"acc": float(np.mean([float(row[f"{name}|acc"]) for row in table])),
                        "word_perplexity": float(np.exp(-np.mean([float(row[f"{name}|ll"]) for row in table])))}
                 for name in scored}  # fmt: skip
    summary = {"task": TASK, "preset": preset, "items": len(table), "per_model": per_model, "pairs": {
        f"{r[0]}|{r[1] or 'hf'}": [f"{v}|{t}" for v, t in c] for r, c in ITEM_PAIRS.items()},
        "breakdowns": {"length": "tokens of the word (lm-eval's split)", "pos_group": "spaCy's tag of the word, "
                       "read after its context, grouped", "frequency": "occurrences in the five training novels"},
        "comparisons": comparisons}  # fmt: skip
    write_json(results / "reproduce_cloze_items.json", summary)
    print(items_table(comparisons))
    return summary


def items_table(comparisons: list[dict], by: str = "all") -> str:
    """Markdown table of the paired comparisons over one breakdown (`by`)."""
    lines = [
        "| reference | compared, tags | group | items | Δ log-lik. ± s.e. | wins / losses (sign p) | word ppl ratio "
        "| acc gained / lost (McNemar p) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in comparisons:
        if r["by"] != by:
            continue
        lines.append(
            f"| {r['reference']} | {r['variant']}, {r['tags']} | {r['group']} | {r['items']} | "
            f"{r['mean_ll_diff']:+.3f} ± {r['ll_diff_stderr']:.3f} | {r['wins']} / {r['losses']} "
            f"({r['sign_test_p']:.2g}) | {r['word_perplexity_ratio']:.2f} | {r['acc_gained']} / {r['acc_lost']} "
            f"({r['mcnemar_p']:.2g}) |"
        )
    return "\n".join(lines)
