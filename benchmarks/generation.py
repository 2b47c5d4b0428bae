"""Generation throughput on a tiny config: the backbone's own `generate`, guided LIME+1, LIME re-annotating, and
the tag heads (LIME tagging itself, LIME+1 guiding itself).

All models share one backbone's weights (LIME's tables are zero-padded extras) and decode greedily with the
KV cache for a fixed number of new tokens, alternated over several repetitions (median reported):

* backbone: the plain `LlamaForCausalLM.generate`;
* LIME+1 guided: a POS schedule covering every new token. Target: >= 0.9x the backbone's tokens/s;
* LIME re-annotating: the default provider re-annotates each row's decoded tail with spaCy for every new
  token. Its cost per token is reported against the length of the text before generation;
* LIME with `metadata_provider="model"` and LIME+1 self-guided: tag heads (pos, ner) give the tags of every
  generated token on the device, no decode, no spaCy; at batch 1 and 8. Target: >= 0.9x the backbone.

Prints tables and writes benchmarks/results/generation.{json,csv}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from common import AUSTEN, load_paragraphs, save_results, train_bpe  # the benchmarks' shared helpers
from transformers import AutoModelForCausalLM, LlamaConfig

from lime_hf import LimeForCausalLM, LimeTokenizer

TEXT_CONFIG = dict(
    model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
)  # fmt: skip
GUIDE = ["DT", "JJ", "NN", "VBD", "IN", "NNP", ",", "PRP", "VBD", "RB", "."]


def timings(run: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `run`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def build_models(
    vocab_size: int, tag_head_fields: list[str] | None = None
) -> tuple[torch.nn.Module, LimeForCausalLM, LimeForCausalLM]:
    """A random backbone and LIME / LIME+1 retrofits of it (same weights, metadata tables and heads added)."""
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(
        LlamaConfig(**{**TEXT_CONFIG, "vocab_size": vocab_size})
    ).eval()
    heads = {"tag_head_fields": tag_head_fields}
    lime = LimeForCausalLM.from_backbone(backbone, metadata_shift=0, **heads).eval()
    lime_plus_one = LimeForCausalLM.from_backbone(backbone, metadata_shift=1, **heads).eval()
    return backbone, lime, lime_plus_one


def side_by_side(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """One warm-up each, then `repeats` rounds calling every run in turn; seconds per call, per run."""
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                times[name].extend(timings(run, 1))
    return times


def prompt_of_length(tokenizer: LimeTokenizer, text: str, length: int, batch_size: int) -> dict:
    """The first `length` tokens of `text`, with their tags, repeated `batch_size` times."""
    encoding = tokenizer(text, return_tensors="pt")
    return {key: value[:, :length].repeat(batch_size, 1) for key, value in encoding.items()}


def throughput(args: argparse.Namespace, tokenizer: LimeTokenizer, text: str) -> dict:
    """Tokens/s of the backbone and guided LIME+1, side by side, at one prompt length."""
    backbone, _, lime_plus_one = build_models(len(tokenizer))
    prompt = prompt_of_length(tokenizer, text, args.prompt_len, args.batch_size)
    decoding = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    schedule = (GUIDE * (args.new_tokens // len(GUIDE) + 1))[: args.new_tokens]
    runs = {
        "backbone": lambda: backbone.generate(
            input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], **decoding
        ),
        "lime_plus_one_guided": lambda: lime_plus_one.generate(
            **prompt, guidance={"pos": schedule}, **decoding
        ),
    }
    times = side_by_side(runs, args.repeats)
    new_tokens = args.new_tokens * args.batch_size
    tokens_per_s = {name: new_tokens / statistics.median(values) for name, values in times.items()}
    return {
        "times_s": times,
        "tokens_per_s": tokens_per_s,
        "guided_over_backbone": tokens_per_s["lime_plus_one_guided"] / tokens_per_s["backbone"],
    }


def self_tagging_throughput(args: argparse.Namespace, tokenizer: LimeTokenizer, text: str) -> list[dict]:
    """Tokens/s of LIME tagging itself and LIME+1 guiding itself (tag heads) against the backbone, per batch size."""
    backbone, lime, lime_plus_one = build_models(len(tokenizer), tag_head_fields=["pos", "ner"])
    decoding = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    rows = []
    for batch_size in args.self_tagging_batch_sizes:
        prompt = prompt_of_length(tokenizer, text, args.prompt_len, batch_size)
        runs = {
            "backbone": lambda prompt=prompt: backbone.generate(
                input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], **decoding
            ),
            "lime_model_provider": lambda prompt=prompt: lime.generate(
                **prompt, metadata_provider="model", **decoding
            ),
            "lime_plus_one_self_guided": lambda prompt=prompt: lime_plus_one.generate(**prompt, **decoding),
        }
        times = side_by_side(runs, args.repeats)
        rate = {
            name: args.new_tokens * batch_size / statistics.median(values) for name, values in times.items()
        }
        rows.append(
            {
                "batch_size": batch_size,
                **{f"{name}_tokens_per_s": value for name, value in rate.items()},
                "lime_model_over_backbone": rate["lime_model_provider"] / rate["backbone"],
                "self_guided_over_backbone": rate["lime_plus_one_self_guided"] / rate["backbone"],
            }
        )
    return rows


def re_annotation_cost(args: argparse.Namespace, tokenizer: LimeTokenizer, text: str) -> list[dict]:
    """Per-token cost of LIME's re-annotating provider against the backbone, at growing text lengths."""
    backbone, lime, _ = build_models(len(tokenizer))
    tokenizer.annotator.nlp  # noqa: B018 - load spaCy before timing
    decoding = dict(max_new_tokens=args.annotate_new_tokens, min_new_tokens=args.annotate_new_tokens)
    rows = []
    with torch.inference_mode():
        for length in args.lengths:
            prompt = prompt_of_length(tokenizer, text, length, 1)
            backbone_s = timings(
                lambda prompt=prompt: backbone.generate(
                    input_ids=prompt["input_ids"], do_sample=False, **decoding
                ),
                args.repeats,
            )
            lime_s = timings(
                lambda prompt=prompt: lime.generate(
                    **prompt, tokenizer=tokenizer, do_sample=False, **decoding
                ),
                args.repeats,
            )
            per_token = 1000 / args.annotate_new_tokens
            rows.append(
                {
                    "text_tokens": prompt["input_ids"].shape[1],
                    "backbone_ms_per_token": statistics.median(backbone_s) * per_token,
                    "lime_annotating_ms_per_token": statistics.median(lime_s) * per_token,
                }
            )
            rows[-1]["annotation_ms_per_token"] = (
                rows[-1]["lime_annotating_ms_per_token"] - rows[-1]["backbone_ms_per_token"]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--self-tagging-batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--annotate-new-tokens", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 512, 1536])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    paragraphs = load_paragraphs(AUSTEN, 20_000)
    tokenizer = LimeTokenizer.from_tokenizer(train_bpe(paragraphs), alignment="pretokenized")
    text = " ".join(paragraphs)

    speed = throughput(args, tokenizer, text)
    print(f"greedy, batch {args.batch_size}, {args.new_tokens} new tokens, median of {args.repeats}")
    for name, rate in speed["tokens_per_s"].items():
        print(f"  {name:22s} {rate:8.1f} tokens/s")
    print(f"  guided LIME+1 / backbone = {speed['guided_over_backbone']:.3f} (target >= 0.9)")

    self_tagging = self_tagging_throughput(args, tokenizer, text)
    print(f"\ntag heads (pos, ner) on device, greedy, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"  {'batch':>5} {'backbone':>9} {'LIME model':>10} {'ratio':>6} {'LIME+1 self':>11} {'ratio':>6}")
    for row in self_tagging:
        print(
            f"  {row['batch_size']:5d} {row['backbone_tokens_per_s']:9.1f} {row['lime_model_provider_tokens_per_s']:10.1f} "
            f"{row['lime_model_over_backbone']:6.3f} {row['lime_plus_one_self_guided_tokens_per_s']:11.1f} "
            f"{row['self_guided_over_backbone']:6.3f}   (target >= 0.9)"
        )

    cost = re_annotation_cost(args, tokenizer, text)
    print(f"\nLIME re-annotating provider, batch 1, {args.annotate_new_tokens} new tokens (ms per token)")
    print(f"  {'text tokens':>11s} {'backbone':>9s} {'LIME':>9s} {'annotation':>10s}")
    for row in cost:
        print(
            f"  {row['text_tokens']:11d} {row['backbone_ms_per_token']:9.2f} "
            f"{row['lime_annotating_ms_per_token']:9.2f} {row['annotation_ms_per_token']:10.2f}"
        )

    summary = {
        "args": vars(args),
        "text_config": TEXT_CONFIG,
        "throughput": speed,
        "self_tagging": self_tagging,
        "re_annotation": cost,
    }
    save_results("generation", summary, cost)


if __name__ == "__main__":
    main()
