"""Tag-head accuracy against spaCy's labels on held-out Austen text, for LIME and LIME+1 trained with tag heads.

Two small Llamas, LIME and LIME+1, each with heads on pos and ner, are trained the ordinary way on the five
training novels: spaCy annotation, pretokenized alignment and packing (`prepare_lm_dataset`), then `LimeTrainer`,
on the same token stream from the same initial weights. On held-out Persuasion every head prediction is scored
against the tag spaCy gave the whole document (the reference sees both sides of a word; a head only the left):

* LIME's head predicts the tag of the token just read: what `metadata_provider="model"` feeds in generation.
  Targets: POS >= 90 %, NER >= 95 %.
* LIME+1's head predicts the next token's tag (self-guidance): top-1 and top-5.

Each is scored teacher-forced (spaCy's tags fed before the position) and self-tagged (the honest mode of
`self_tagged_forward`: only the model's own predictions are ever fed, as in free generation; top-1 only). Held-out
next-token accuracy and perplexity are reported in three modes: spaCy's tags, self-tagged, and no tags.

`--models LIME_DIR LIME_PLUS1_DIR --tokenizer DIR` scores trained checkpoints instead (e.g. the reproduction's
`lm-lime_heads-s0` and `lm-lime_plus1_heads-s0` with its tokenizer), skipping the training.

Prints a table and writes benchmarks/results/tag_heads.{json,csv}.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
from common import (
    AUSTEN,
    EVAL_NOVEL,
    load_paragraphs,
    save_results,
    train_bpe,
)  # the benchmarks' shared helpers
from datasets import Dataset
from transformers import TrainingArguments, set_seed

from lime_hf import DataCollatorForLime, LimeConfig, LimeForCausalLM, LimeTokenizer
from lime_hf.pretrain import DEFAULT_TEXT_CONFIG, prepare_lm_dataset
from lime_hf.tag_heads import self_tagged_forward
from lime_hf.trainer import LimeTrainer

FIELDS = ("pos", "ner")
TARGETS = {"pos": 0.90, "ner": 0.95}


def eval_paragraphs(max_words: int) -> list[str]:
    """The first ~`max_words` words of the held-out novel, one paragraph per item."""
    paragraphs, words = [], 0
    for paragraph in (AUSTEN / EVAL_NOVEL).read_text(encoding="utf-8").split("\n\n"):
        if paragraph.strip() and words < max_words:
            paragraphs.append(paragraph)
            words += len(paragraph.split())
    return paragraphs


def full_blocks(dataset: Dataset, block_size: int) -> dict[str, torch.Tensor]:
    """The packed blocks of exactly `block_size` tokens, as `(blocks, block_size)` tensors."""
    dataset = dataset.filter(lambda ids: len(ids) == block_size, input_columns="input_ids")
    return {
        column: torch.tensor(dataset[column]) for column in ("input_ids", *(f"{name}_ids" for name in FIELDS))
    }


def train(
    shift: int, tokenizer: LimeTokenizer, train_blocks: Dataset, args: argparse.Namespace
) -> LimeForCausalLM:
    """One model with heads, trained through `LimeTrainer` from the seed's initial weights."""
    set_seed(args.seed)
    text_config = {
        **DEFAULT_TEXT_CONFIG,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": args.block_size,
    }
    text_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LimeConfig(
        text_config=text_config,
        metadata_fields=tokenizer.metadata_fields,
        metadata_shift=shift,
        tag_head_fields=list(FIELDS),
    )
    model = LimeForCausalLM(config)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            scratch, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
            lr_scheduler_type="cosine", warmup_steps=args.steps // 20, weight_decay=0.1, logging_steps=args.steps // 10,
            report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=args.seed, disable_tqdm=True,
        )  # fmt: skip
        trainer = LimeTrainer(
            model=model,
            args=training_args,
            train_dataset=train_blocks,
            data_collator=DataCollatorForLime(tokenizer),
            processing_class=tokenizer,
        )
        trainer.train()
    model.training_log = [entry for entry in trainer.state.log_history if "lm_loss" in entry]
    return model.eval()


class Tally:
    """Sums of correct predictions and counts, reported as fractions."""

    def __init__(self):
        self.correct: dict[str, float] = {}
        self.count: dict[str, float] = {}

    def add(self, key: str, correct: torch.Tensor, count: torch.Tensor | int) -> None:
        self.correct[key] = self.correct.get(key, 0.0) + float(correct)
        self.count[key] = self.count.get(key, 0.0) + float(count)

    def results(self) -> dict[str, float]:
        return {key: self.correct[key] / max(self.count[key], 1.0) for key in self.correct}


@torch.no_grad()
def score(model: LimeForCausalLM, blocks: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    """Head accuracies (teacher-forced top-1/top-5, self-tagged top-1) and next-token accuracy/perplexity."""
    heads, tally = model.tag_heads, Tally()
    for start in range(0, blocks["input_ids"].shape[0], batch_size):
        ids = blocks["input_ids"][start : start + batch_size]
        tags = {name: blocks[f"{name}_ids"][start : start + batch_size] for name in FIELDS}
        forced = model(input_ids=ids, **{f"{name}_ids": value for name, value in tags.items()})
        self_logits, fed = self_tagged_forward(model, ids)
        plain = model(input_ids=ids)
        for name in FIELDS:
            targets = heads.fed_tags(tags[name])
            valid = targets > 1  # padding and unknown are no targets
            top5 = forced.tag_logits[name].topk(5, dim=-1).indices
            tally.add(f"{name}_forced_top1", ((top5[..., 0] == targets) & valid).sum(), valid.sum())
            tally.add(
                f"{name}_forced_top5", ((top5 == targets[..., None]).any(-1) & valid).sum(), valid.sum()
            )
            tally.add(f"{name}_self_top1", ((fed[name] == targets) & valid).sum(), valid.sum())
        for mode, logits in (("spacy", forced.logits), ("self", self_logits), ("none", plain.logits)):
            predicted, expected = logits[:, :-1], ids[:, 1:]
            tally.add(
                f"next_token_accuracy_{mode}", (predicted.argmax(-1) == expected).sum(), expected.numel()
            )
            loss = torch.nn.functional.cross_entropy(
                predicted.flatten(0, 1).float(), expected.flatten(), reduction="sum"
            )
            tally.add(f"next_token_loss_{mode}", loss, expected.numel())
    results = tally.results()
    for mode in ("spacy", "self", "none"):
        results[f"next_token_perplexity_{mode}"] = math.exp(results.pop(f"next_token_loss_{mode}"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-words", type=int, default=600_000)
    parser.add_argument("--eval-words", type=int, default=20_000)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="a tiny setting that checks the script end to end"
    )
    parser.add_argument(
        "--models", nargs=2, metavar=("LIME_DIR", "LIME_PLUS1_DIR"), help="score these instead"
    )
    parser.add_argument("--tokenizer", help="the saved LimeTokenizer of --models")
    args = parser.parse_args()
    if args.quick:
        args.train_words, args.eval_words, args.steps, args.batch_size = 20_000, 2_000, 20, 4

    started = time.time()
    if args.models:
        tokenizer = LimeTokenizer.from_pretrained(args.tokenizer)
    else:
        paragraphs = load_paragraphs(AUSTEN, args.train_words)
        tokenizer = LimeTokenizer.from_tokenizer(train_bpe(paragraphs), alignment="pretokenized")
        train_blocks = prepare_lm_dataset(Dataset.from_dict({"text": paragraphs}), tokenizer, args.block_size)
        print(f"{len(train_blocks)} training blocks")
    eval_set = prepare_lm_dataset(
        Dataset.from_dict({"text": eval_paragraphs(args.eval_words)}), tokenizer, args.block_size
    )
    blocks = full_blocks(eval_set, args.block_size)
    print(f"{blocks['input_ids'].shape[0]} held-out blocks of {args.block_size}")

    results = {}
    for index, (name, shift) in enumerate((("lime", 0), ("lime_plus1", 1))):
        if args.models:
            model = LimeForCausalLM.from_pretrained(args.models[index], dtype=torch.float32).eval()
            model.training_log = f"trained elsewhere: {args.models[index]}"
        else:
            model = train(shift, tokenizer, train_blocks, args)
        results[name] = score(model, blocks, args.batch_size) | {"training_log": model.training_log}

    rows = []
    print(f"\ntag-head accuracy vs spaCy on held-out {EVAL_NOVEL} ({blocks['input_ids'].numel():,} tokens)")
    print(
        f"  {'model':<11} {'field':<5} {'forced top-1':>12} {'forced top-5':>12} {'self top-1':>10}  target"
    )
    for name in results:
        for field in FIELDS:
            row = {
                "model": name,
                "field": field,
                **{
                    key: results[name][f"{field}_{key}"]
                    for key in ("forced_top1", "forced_top5", "self_top1")
                },
            }
            target = f">= {TARGETS[field]:.0%}" if name == "lime" else "report"
            print(
                f"  {name:<11} {field:<5} {row['forced_top1']:12.1%} {row['forced_top5']:12.1%} "
                f"{row['self_top1']:10.1%}  {target}"
            )
            rows.append(row)
    print("\nheld-out next-token accuracy / perplexity: spaCy's tags, self-tagged (honest), no tags")
    for name, values in results.items():
        cells = "  ".join(
            f"{mode} {values[f'next_token_accuracy_{mode}']:.1%} / {values[f'next_token_perplexity_{mode}']:.1f}"
            for mode in ("spacy", "self", "none")
        )
        print(f"  {name:<11} {cells}")
    summary = {"args": vars(args), "results": results, "wall_s": time.time() - started}
    save_results("tag_heads_quick" if args.quick else "tag_heads", summary, rows)


if __name__ == "__main__":
    main()
