"""Causal (prefix-only) annotation against full-document annotation: words/s side by side, and the windows.

1. Throughput on Austen paragraphs, alternated `repeats` times in one run (absolute times on shared machines are
   noisy): `SpacyAnnotator()` (full document), `SpacyAnnotator(causal=True)` (the default windows: 4 tokens
   for pos, 8 for ner, in two passes), and `causal_window=12` for every field (one pass; the window the
   reproduction's first prefix-only tags used).
2. Agreement of each window with a 48-token window on the opening of Persuasion, per field: how many labels
   differ. It sets the defaults (`PosField.causal_window`, `NerField.causal_window`); also the fraction of labels
   that differ from the full-document ones (the leak causal annotation removes).

Prints a table and writes benchmarks/results/causal_annotation.{json,csv}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from common import AUSTEN, EVAL_NOVEL, load_paragraphs, save_results  # the benchmarks' shared helpers

from lime_hf import SpacyAnnotator

FIELDS = ("pos", "ner")
REFERENCE_WINDOW = 48


def throughput(
    texts: list[str], annotators: dict[str, SpacyAnnotator], repeats: int, batch_size: int
) -> dict:
    """Seconds per pass over `texts` for each annotator, the annotators alternated in every repeat."""
    batches = [texts[start : start + batch_size] for start in range(0, len(texts), batch_size)]
    for annotator in annotators.values():
        annotator(texts[:2])  # load every pipeline outside the timed region
    seconds: dict[str, list[float]] = {name: [] for name in annotators}
    for _ in range(repeats):
        for name, annotator in annotators.items():
            start = time.perf_counter()
            for batch in batches:
                annotator(batch)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def window_agreement(text: str, windows: list[int]) -> dict:
    """Labels that differ from a `REFERENCE_WINDOW`-token window (and from the full document), per window."""
    reference = SpacyAnnotator(causal=True, causal_window=REFERENCE_WINDOW)([text])[0]
    full = SpacyAnnotator()([text])[0]
    total = len(full["pos"]["labels"])
    result = {
        "chars": len(text),
        "tokens": total,
        "reference_window": REFERENCE_WINDOW,
        "reference_differs_from_full_document": {
            name: sum(a != b for a, b in zip(reference[name]["labels"], full[name]["labels"], strict=True))
            / total
            for name in FIELDS
        },
        "labels_differing_from_reference": {},
    }
    for window in windows:
        causal = SpacyAnnotator(causal=True, causal_window=window)([text])[0]
        result["labels_differing_from_reference"][window] = {
            name: sum(a != b for a, b in zip(causal[name]["labels"], reference[name]["labels"], strict=True))
            for name in FIELDS
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=AUSTEN)
    parser.add_argument("--max-words", type=int, default=15_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="texts per annotator call")
    parser.add_argument("--agreement-chars", type=int, default=40_000, help="opening of Persuasion checked")
    parser.add_argument("--windows", type=int, nargs="+", default=[2, 4, 6, 8, 12])
    args = parser.parse_args()

    texts = load_paragraphs(args.corpus, args.max_words)
    words = sum(len(text.split()) for text in texts)
    annotators = {
        "full document": SpacyAnnotator(),
        "causal (pos 4, ner 8 tokens)": SpacyAnnotator(causal=True),
        "causal, 12 tokens for all": SpacyAnnotator(causal=True, causal_window=12),
    }
    seconds = throughput(texts, annotators, args.repeats, args.batch_size)
    full = statistics.median(seconds["full document"])
    rows = [
        {
            "measure": name,
            "words_per_s": words / statistics.median(times),
            "ratio_to_full_document": full / statistics.median(times),
        }
        for name, times in seconds.items()
    ]
    opening = " ".join((args.corpus / EVAL_NOVEL).read_text(encoding="utf-8")[: args.agreement_chars].split())
    agreement = window_agreement(opening, args.windows)

    print(f"{len(texts)} paragraphs, {words:,} words, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"{'':32s} {'words/s':>10s}  ratio to full document")
    for row in rows:
        print(f"{row['measure']:32s} {row['words_per_s']:10,.0f}  {row['ratio_to_full_document']:.3f}")
    print(f"labels differing from a {REFERENCE_WINDOW}-token window, of {agreement['tokens']:,} tokens:")
    for window, counts in agreement["labels_differing_from_reference"].items():
        print(f"  window {window:3d}: {counts}")
    print(
        f"  {REFERENCE_WINDOW}-token window vs full document: {agreement['reference_differs_from_full_document']}"
    )

    summary = {
        "corpus": {"paragraphs": len(texts), "words": words, "max_words": args.max_words},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_end": os.getloadavg()},
        "seconds": seconds,
        "rows": rows,
        "window_agreement": agreement,
    }
    save_results("causal_annotation", summary, rows)


if __name__ == "__main__":
    main()
