"""What the benchmark scripts share: the Austen corpus, a quickly trained BPE and the results folder."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# The folder of the six novels: LIME_AUSTEN, else ../shared/data/austen beside the checkout (the machine the
# committed results come from). A clone has only the tests' excerpts; docs/reproduction.md says where to get them.
AUSTEN = Path(
    os.environ.get("LIME_AUSTEN", Path(__file__).resolve().parents[2] / "shared" / "data" / "austen")
)
# File name -> (title, Project Gutenberg ebook number); the committed results used the janeaustenr 1.0.0 texts.
NOVELS = {
    "emma.txt": ("Emma", 158),
    "mansfieldpark.txt": ("Mansfield Park", 141),
    "northangerabbey.txt": ("Northanger Abbey", 121),
    "persuasion.txt": ("Persuasion", 105),
    "prideprejudice.txt": ("Pride and Prejudice", 1342),
    "sensesensibility.txt": ("Sense and Sensibility", 161),
}
EVAL_NOVEL = "persuasion.txt"
RESULTS = Path(__file__).resolve().parent / "results"


def check_corpus(corpus_dir: Path = AUSTEN) -> None:
    """Stop with one line naming the first missing novel and where to get it (a clone does not ship them)."""
    for name, (title, ebook) in NOVELS.items():
        if not (corpus_dir / name).is_file():
            raise SystemExit(
                f"benchmarks: {corpus_dir / name} is missing: save {title} (Project Gutenberg ebook #{ebook}) "
                f"and the other five Austen novels there as UTF-8 text, or set LIME_AUSTEN to their folder "
                f"(docs/reproduction.md)"
            )


def load_paragraphs(corpus_dir: Path, max_words: int) -> list[str]:
    """Paragraphs (blank-line separated) of the training novels (all but Persuasion), up to ~`max_words`."""
    if corpus_dir == AUSTEN:
        check_corpus(corpus_dir)
    elif not any(corpus_dir.glob("*.txt")):
        raise SystemExit(f"benchmarks: no .txt files in {corpus_dir}")
    paragraphs, words = [], 0
    for path in sorted(corpus_dir.glob("*.txt")):
        if path.name == EVAL_NOVEL:
            continue
        for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
            if paragraph.strip():
                paragraphs.append(paragraph)
                words += len(paragraph.split())
                if words >= max_words:
                    return paragraphs
    return paragraphs


def train_bpe(
    texts: list[str], vocab_size: int = 4096, special_tokens: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """
    A byte-level BPE (GPT-2 style, no prefix space) trained on `texts` in seconds. `special_tokens` maps
    tokenizer roles to tokens (`{"pad_token": ..., "eos_token": ...}`), given ids 0, 1, ... in order of first
    appearance; by default EOS doubles as pad.
    """
    special_tokens = special_tokens or {"eos_token": "<|eos|>", "pad_token": "<|eos|>"}
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(special_tokens.values())),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def save_results(name: str, summary: dict, rows: list[dict]) -> None:
    """Write `results/{name}.json` (everything) and `results/{name}.csv` (the table rows)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(RESULTS / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def busy_loop(iterations: int) -> int:
    total = 0
    for value in range(iterations):
        total += value * value
    return total


def cpu_scaling(iterations: int = 5_000_000) -> float:
    """The speedup of pure-Python work in 2 processes over 1 on this machine now: the ceiling for num_proc=2."""
    start = time.perf_counter()
    for _ in range(2):
        busy_loop(iterations)
    serial = time.perf_counter() - start
    with multiprocessing.get_context("fork").Pool(2) as pool:  # forked workers are ready at once
        start = time.perf_counter()
        pool.map(busy_loop, [iterations, iterations], chunksize=1)
        parallel = time.perf_counter() - start
    return serial / parallel


def parameter_matched_width(build: Callable[[int], object], base: int, target: int) -> int:
    """The MLP width at which `build(width)` (a model, best on the meta device) has the parameter count closest to
    `target`: a backbone as large as one with extra modules, the capacity control."""

    def count(width: int) -> int:
        return sum(parameter.numel() for parameter in build(width).parameters())

    return base + round((target - count(base)) / (count(base + 1) - count(base)))
