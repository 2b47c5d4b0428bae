"""Reproduce LIME (arXiv 2512.07522) at small scale: data efficiency, the leak, and guided arithmetic.

Stages (each one resumable; run them in order, or `all`):

    prepare   CPU + spaCy. Annotates the Austen corpus once (tagger + NER), trains a byte-level BPE on the five
              training novels, aligns with LimeTokenizer (pretokenized: one token stream for every run), computes
              prefix-only tags for Persuasion and builds the synthetic addition data. Writes arrays to the cache.
    train     GPU when available, else CPU. Trains every run that has no result file yet (baseline / LIME /
              LIME+1 language models on Austen, and the addition models); `--jobs N` runs N at a time.
              Each run checkpoints at its evaluation points and resumes from there.
    generate  CPU + spaCy. Free generation with re-annotation from the trained models; perplexity of the
              generated text under a baseline of another seed.
    report    Curves (CSV, PNG) and the headline file `benchmarks/results/reproduce.json`.

    python benchmarks/reproduce.py all --smoke          # the whole pipeline on a tiny setting, ~2 min on CPU
    python benchmarks/reproduce.py all                  # the real thing (preset "gpu" on CUDA, else "cpu")

Every configuration, seed, version and wall time is recorded in the result files.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import AUSTEN, train_bpe  # the benchmarks' shared helpers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CACHE = Path(os.environ.get("LIME_REPRODUCE_CACHE", Path.home() / ".cache" / "lime_hf_reproduce"))
TRAIN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility")
EVAL_NOVEL = "persuasion"
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")
LM_VARIANTS = {"baseline": None, "lime": 0, "lime_plus1": 1}  # variant -> metadata_shift (None: no metadata)
ADD_VARIANTS = {"baseline": None, "lime_plus1_spacy": ("pos", "ner"), "lime_plus1_digit": ("digit",)}
PAD_ID, UNKNOWN_ID, SPECIAL_ID = 0, 1, 2  # lime_hf's reserved tag ids

# Words of context to the left of each word when tagging it from its prefix. spaCy's small English
# pipeline sees 4 tokens either side (tok2vec: window 1, depth 4), so 12 tokens cover the tagger exactly;
# the NER's transition state reaches further back (checked against 48 tokens in `prepare`).
PREFIX_WINDOW = 12

# Model and training settings. "cpu" is what the committed results used (no GPU was available; it fits a
# ~1 h background run on two busy cores); "gpu" is a larger setting for a CUDA machine (not run for the
# committed results); "smoke" checks the pipeline end to end. `eval_tokens`: the first N tokens of Persuasion
# (None = all of it). `max_digits`: operands of at most this many digits (the prepared data goes up to 4).
_LM = dict(min_lr_ratio=0.1, weight_decay=0.1, warmup_steps=100)
_ADD = dict(min_lr_ratio=0.1, weight_decay=0.1, warmup_steps=200, guidance_dropout=0.25)
PRESETS = {
    "gpu": {
        "lm": _LM | dict(hidden=256, intermediate=768, layers=8, heads=4, seq_len=256, batch=16, epochs=4,
                         lr=1e-3, evals=25, eval_tokens=None, seeds=(0, 1, 2)),
        "add": _ADD | dict(hidden=256, intermediate=1024, layers=4, heads=4, batch=256, steps=4000, lr=1e-3,
                           evals=9, max_digits=4, seeds=(0, 1)),
    },
    "cpu": {
        "lm": _LM | dict(hidden=128, intermediate=384, layers=4, heads=4, seq_len=128, batch=8, epochs=1,
                         lr=1.5e-3, warmup_steps=40, evals=11, eval_tokens=30_000, seeds=(0, 1)),
        "add": _ADD | dict(hidden=128, intermediate=512, layers=3, heads=4, batch=64, steps=3000, lr=2e-3,
                           warmup_steps=100, evals=7, max_digits=3, seeds=(0, 1)),
    },
    "smoke": {
        "lm": _LM | dict(hidden=32, intermediate=64, layers=2, heads=2, seq_len=64, batch=8, epochs=1, lr=3e-3,
                         warmup_steps=5, evals=3, eval_tokens=4_000, seeds=(0, 1)),
        "add": _ADD | dict(hidden=32, intermediate=64, layers=2, heads=2, batch=32, steps=40, lr=3e-3,
                           warmup_steps=5, evals=2, max_digits=3, seeds=(0, 1)),
    },
}  # fmt: skip
DATA_CONFIG = {
    "full": dict(bpe_vocab=4096, max_chars=None, add_train=50_000, add_test=1000, add_max_digits=4),
    "smoke": dict(bpe_vocab=512, max_chars=8_000, add_train=600, add_test=48, add_max_digits=3),
}
GENERATION = {
    "default": dict(prompts=24, prompt_words=40, new_tokens=64, temperature=1.0, top_k=50, seed=0),
    "smoke": dict(prompts=4, prompt_words=20, new_tokens=16, temperature=1.0, top_k=50, seed=0),
}


# --------------------------------------------------------------------------------------------------- helpers


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def environment() -> dict:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def unwrap(text: str) -> str:
    """Join the hard-wrapped lines of each paragraph with a space; paragraphs stay separated by a blank line."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    joined = (" ".join(line.strip() for line in paragraph.splitlines()).strip() for paragraph in paragraphs)
    return "\n\n".join(paragraph for paragraph in joined if paragraph)


def cut_at_paragraph(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars]


def spans_to_annotation(spans_by_field: dict[str, list[tuple[int, int, str]]]) -> dict:
    return {
        name: {
            "starts": [s for s, _, _ in spans],
            "ends": [e for _, e, _ in spans],
            "labels": [label for _, _, label in spans],
        }
        for name, spans in spans_by_field.items()
    }


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Compressed, in the smallest integer type that holds the values (the arrays travel to a GPU machine)."""
    small = {}
    for key, values in arrays.items():
        values = np.asarray(values)
        small[key] = values.astype(np.int16) if values.min() >= -(2**15) and values.max() < 2**15 else values
    np.savez_compressed(path, **small)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key].astype(np.int64) for key in data.files}


# ------------------------------------------------------------------------------------ the digit-level field


def _digit_field_class():
    """Built lazily so that `train` on a machine without spaCy still imports this file cheaply."""
    from lime_hf.annotation import FieldAnnotator

    class DigitPlaceField(FieldAnnotator):
        """
        Place value of every digit inside its number, counted from the right (`P0` = ones, `P1` = tens, ...);
        `+` and `=` by name. Needs only spaCy's tokenizer (`components = ()`), and `annotate_text` gives the
        same spans without spaCy, so generated text can be re-annotated anywhere.
        """

        name = "digit"
        max_places = 6
        labels = ("SP", *(f"P{i}" for i in range(6)), "PLUS", "EQ", "OTHER")
        whitespace_label = "SP"
        components = ()

        def annotate(self, doc):
            return self.annotate_text(doc.text)

        def annotate_text(self, text: str) -> list[tuple[int, int, str]]:
            spans = []
            for match in re.finditer(r"[0-9]+|\S", text):
                start, end = match.span()
                if match.group()[0].isdigit():
                    width = end - start
                    spans += [
                        (start + j, start + j + 1, f"P{min(width - 1 - j, self.max_places - 1)}")
                        for j in range(width)
                    ]
                else:
                    spans.append((start, end, {"+": "PLUS", "=": "EQ"}.get(match.group(), "OTHER")))
            return spans

    return DigitPlaceField


# ------------------------------------------------------------------------------------------------- prepare


def prepare(cache: Path, smoke: bool) -> None:
    data_dir = cache / "data"
    done = data_dir / "meta.json"
    if done.exists():
        log(f"prepare: {done} exists, skipping")
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    dcfg = DATA_CONFIG["smoke" if smoke else "full"]
    meta = {"data_config": dcfg, "prefix_window_tokens": PREFIX_WINDOW, "environment": environment()}
    started = time.time()
    meta["lm"] = prepare_lm(data_dir, dcfg)
    meta["add"] = prepare_addition(data_dir, dcfg)
    meta["prepare_wall_s"] = time.time() - started
    write_json(done, meta)
    log(f"prepare: done in {meta['prepare_wall_s']:.0f}s")


def prepare_lm(data_dir: Path, dcfg: dict) -> dict:
    from lime_hf import LimeTokenizer, SpacyAnnotator
    from lime_hf.annotation import NerField, PosField

    texts = {
        name: cut_at_paragraph(
            unwrap((AUSTEN / f"{name}.txt").read_text(encoding="utf-8")), dcfg["max_chars"]
        )
        for name in (*TRAIN_NOVELS, EVAL_NOVEL)
    }
    started = time.time()
    tokenizer = LimeTokenizer.from_tokenizer(
        train_bpe(
            [paragraph for name in TRAIN_NOVELS for paragraph in texts[name].split("\n\n")],
            dcfg["bpe_vocab"],
            dict(zip(("pad_token", "bos_token", "eos_token"), SPECIAL_TOKENS, strict=True)),
        ),
        alignment="pretokenized",
    )
    tokenizer.save_pretrained(data_dir / "tokenizer")
    annotator = SpacyAnnotator(max_chars=100_000, batch_size=4)
    tokenizer._annotator = annotator  # one loaded pipeline for everything below
    meta = {"bpe_wall_s": time.time() - started, "spacy_pipeline": annotator.nlp.meta.get("name")}
    meta["spacy_version"] = annotator.nlp.meta.get("version")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    fields = list(tokenizer.metadata_fields)

    def encode(text: str, annotation: dict) -> dict[str, np.ndarray]:
        enc = tokenizer(text, annotations=annotation)
        out = {"input_ids": np.asarray([bos, *enc["input_ids"], eos], dtype=np.int32)}
        for name in fields:
            out[name] = np.asarray([SPECIAL_ID, *enc[f"{name}_ids"], SPECIAL_ID], dtype=np.int16)
        return out

    started = time.time()
    stream: dict[str, list[np.ndarray]] = {"input_ids": [], **{name: [] for name in fields}}
    words = 0
    for name in TRAIN_NOVELS:
        annotation = annotator([texts[name]])[0]
        words += sum(
            not texts[name][s:e].isspace()
            for s, e in zip(annotation["pos"]["starts"], annotation["pos"]["ends"], strict=True)
        )
        for key, values in encode(texts[name], annotation).items():
            stream[key].append(values)
        log(f"prepare: annotated {name} ({len(texts[name]):,} chars)")
    train = {key: np.concatenate(values) for key, values in stream.items()}
    meta["train_annotate_wall_s"] = time.time() - started
    meta["train_words"] = int(words)

    text = texts[EVAL_NOVEL]
    annotation = annotator([text])[0]
    evaluation = encode(text, annotation)
    # Prefix-only tags: each word tagged from a window of text that ends with the word (no right context).
    started = time.time()
    prefix_annotation, agreement = prefix_tags(text, annotation, annotator, [PosField(), NerField()])
    prefix = encode(text, prefix_annotation)
    if not np.array_equal(prefix["input_ids"], evaluation["input_ids"]):
        raise RuntimeError("prefix-only annotation changed the token stream; it must only change the tags")
    for name in fields:
        evaluation[f"{name}_prefix"] = prefix[name]
    meta["prefix_tags_wall_s"] = time.time() - started
    meta["prefix_tags"] = agreement
    save_arrays(data_dir / "lm_train.npz", train)
    save_arrays(data_dir / "lm_eval.npz", evaluation)
    meta.update(
        train_tokens=int(len(train["input_ids"])),
        eval_tokens=int(len(evaluation["input_ids"])),
        vocab_size=len(tokenizer),
        train_chars=int(sum(len(texts[name]) for name in TRAIN_NOVELS)),
        eval_chars=len(text),
        metadata_fields=tokenizer.metadata_fields,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    changed = {name: float(np.mean(evaluation[name] != evaluation[f"{name}_prefix"])) for name in fields}
    meta["prefix_tags"]["token_fraction_changed_vs_full_doc"] = changed
    log(f"prepare: LM data {meta['train_tokens']:,} train / {meta['eval_tokens']:,} eval tokens; {changed}")
    return meta


def prefix_tags(text: str, annotation: dict, annotator, fields) -> tuple[dict, dict]:
    """
    Re-tag every non-space spaCy token of `text` seeing only the text up to and including it.

    Token k is tagged from the text of tokens k-PREFIX_WINDOW .. k (its own full-document span boundaries are
    kept, so the token stream does not change). Returns the new annotation and agreement statistics of the
    window against a 4x longer one on a sample of positions.
    """
    starts, ends = annotation["pos"]["starts"], annotation["pos"]["ends"]
    words = [k for k in range(len(starts)) if not text[starts[k] : ends[k]].isspace()]

    def tag_windows(positions: list[int], window: int) -> dict[str, list[str]]:
        pieces = [text[starts[max(0, k - window)] : ends[k]] for k in positions]
        labels: dict[str, list[str]] = {field.name: [] for field in fields}
        for piece, doc in zip(pieces, annotator.nlp.pipe(pieces, batch_size=512), strict=True):
            last = len(piece.rstrip())
            for field in fields:
                spans = field.annotate(doc)
                # The span ending at the window's end (the word itself), else the last one before it.
                label = next((lab for s, e, lab in reversed(spans) if s < last), field.whitespace_label)
                labels[field.name].append(label)
        return labels

    new = {name: dict(spans, labels=list(spans["labels"])) for name, spans in annotation.items()}
    tagged = tag_windows(words, PREFIX_WINDOW)
    for name, labels in tagged.items():
        for k, label in zip(words, labels, strict=True):
            new[name]["labels"][k] = label
    sample = [
        int(k) for k in np.random.default_rng(0).choice(words, size=min(600, len(words)), replace=False)
    ]
    longer = tag_windows(sample, 4 * PREFIX_WINDOW)
    index = {k: i for i, k in enumerate(words)}
    agreement = {
        "window_tokens": PREFIX_WINDOW,
        "words": len(words),
        "check_window_tokens": 4 * PREFIX_WINDOW,
        "check_sample": len(sample),
        "agreement_with_longer_window": {
            name: float(np.mean([tagged[name][index[k]] == longer[name][i] for i, k in enumerate(sample)]))
            for name in tagged
        },
        "word_fraction_changed_vs_full_doc": {
            name: float(np.mean([tagged[name][index[k]] != annotation[name]["labels"][k] for k in words]))
            for name in tagged
        },
    }
    return new, agreement


def addition_problems(rng: np.random.Generator, count: int, max_digits: int, exclude: set) -> list[tuple]:
    problems, seen = [], set(exclude)
    while len(problems) < count:
        a, b = (
            int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10**d))
            for d in rng.integers(1, max_digits + 1, size=2)
        )
        if (a, b) not in seen:
            seen.add((a, b))
            problems.append((a, b))
    return problems


def prepare_addition(data_dir: Path, dcfg: dict) -> dict:
    """Synthetic addition `37 + 85 = 122`, one character per token; tags of every field per character."""
    from lime_hf import SpacyAnnotator
    from lime_hf.alignment import label_to_id_maps, tags_from_offsets

    started = time.time()
    rng = np.random.default_rng(1234)
    test = addition_problems(rng, dcfg["add_test"], dcfg["add_max_digits"], set())
    train = addition_problems(rng, dcfg["add_train"], dcfg["add_max_digits"], set(test))
    chars = ["<|pad|>", "<|bos|>", "<|eos|>", *"0123456789", " ", "+", "="]
    char_id = {c: i for i, c in enumerate(chars)}
    digit = _digit_field_class()()
    spacy_annotator = SpacyAnnotator(("pos", "ner"), batch_size=1000)
    digit_annotator = SpacyAnnotator([digit], batch_size=1000)  # the FieldAnnotator route (tokenizer only)
    fields = {**spacy_annotator.metadata_fields, **digit_annotator.metadata_fields}
    whitespace = {"pos": "_SP", "ner": "O", "digit": digit.whitespace_label}
    label_to_id = label_to_id_maps(fields)

    def char_tags(texts: list[str], annotations: list[dict], names: list[str]) -> list[dict[str, list[int]]]:
        rows = []
        for text, annotation in zip(texts, annotations, strict=True):
            offsets = np.stack([np.arange(len(text)), np.arange(1, len(text) + 1)], axis=1)
            maps = {name: label_to_id[name] for name in names}
            tags = tags_from_offsets(annotation, offsets, text, maps, whitespace)
            rows.append({name: tags[name].tolist() for name in names})
        return rows

    def build(problems, with_prompt_only: bool) -> dict[str, np.ndarray]:
        texts = [f"{a} + {b} = {a + b}" for a, b in problems]
        prompts = [f"{a} + {b} = " for a, b in problems]
        spacy_full = char_tags(texts, spacy_annotator(texts), ["pos", "ner"])
        digit_full = char_tags(
            texts, [spans_to_annotation({"digit": digit.annotate_text(t)}) for t in texts], ["digit"]
        )
        width = 2 + max(len(t) for t in texts)
        out = {
            "input_ids": np.zeros((len(texts), width), dtype=np.int64),
            "prompt_len": np.asarray([1 + len(p) for p in prompts], dtype=np.int64),
            "length": np.asarray([2 + len(t) for t in texts], dtype=np.int64),
            "a": np.asarray([a for a, _ in problems]),
            "b": np.asarray([b for _, b in problems]),
        }
        for name in fields:
            out[name] = np.zeros((len(texts), width), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [char_id["<|bos|>"], *(char_id[c] for c in text), char_id["<|eos|>"]]
            out["input_ids"][row, : len(ids)] = ids
            tags = {**spacy_full[row], **digit_full[row]}
            for name in fields:
                out[name][row, : len(ids)] = [SPECIAL_ID, *tags[name], SPECIAL_ID]
        if with_prompt_only:  # tags of the prompt annotated alone: what a user without the answer can compute
            spacy_prompt = char_tags(prompts, spacy_annotator(prompts), ["pos", "ner"])
            digit_prompt = char_tags(
                prompts, [spans_to_annotation({"digit": digit.annotate_text(p)}) for p in prompts], ["digit"]
            )
            for name in fields:
                out[f"{name}_prompt"] = np.zeros((len(texts), width), dtype=np.int64)
            for row, prompt in enumerate(prompts):
                tags = {**spacy_prompt[row], **digit_prompt[row]}
                for name in fields:
                    out[f"{name}_prompt"][row, : 1 + len(prompt)] = [SPECIAL_ID, *tags[name]]
            # The FieldAnnotator route (spaCy tokenizer + `annotate(doc)`) must agree with `annotate_text`.
            via_spacy = char_tags(texts, digit_annotator(texts), ["digit"])
            if via_spacy != digit_full:
                raise RuntimeError("DigitPlaceField.annotate(doc) disagrees with annotate_text(text)")
        return out

    save_arrays(data_dir / "add_train.npz", build(train, False))
    save_arrays(data_dir / "add_test.npz", build(test, True))
    example = f"{test[0][0]} + {test[0][1]} = {sum(test[0])}"
    meta = {
        "train_problems": len(train),
        "test_problems": len(test),
        "max_digits": dcfg["add_max_digits"],
        "sampling": "each operand: a digit count uniform in 1..max_digits, then a uniform number of that many "
        "digits; test problems are disjoint from training problems; numpy seed 1234",
        "chars": chars,
        "metadata_fields": fields,
        "example": example,
        "example_tags": {
            name: [fields[name][i] for i in build([test[0]], False)[name][0][1 : 1 + len(example)]]
            for name in fields
        },
        "wall_s": time.time() - started,
    }
    log(f"prepare: addition data {len(train):,} train / {len(test):,} test; {meta['example_tags']}")
    return meta


# --------------------------------------------------------------------------------------------------- models


def build_model(cfg: dict, vocab_size: int, special: dict, max_positions: int, seed: int, shift, fields):
    """
    A tiny Llama: the bare backbone for `shift=None`, else LIME (0) / LIME+1 (1) on that same backbone.

    For one seed every variant starts from identical backbone weights (the LIME model loads the baseline's),
    so runs of a seed differ only by the metadata.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from lime_hf import LimeConfig, LimeForCausalLM

    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        **special,
    )
    torch.manual_seed(seed)
    backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **text_config))
    if shift is None:
        return backbone, {"model_type": "llama", **text_config}
    torch.manual_seed(seed)
    config = LimeConfig(
        text_config={"model_type": "llama", **text_config}, metadata_fields=fields, metadata_shift=shift
    )
    model = LimeForCausalLM(config)
    model.language_model.load_state_dict(backbone.state_dict())
    return model, {"model_type": "llama", **text_config}


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    tables = getattr(model, "metadata_embeddings", None)
    metadata = sum(p.numel() for p in tables.parameters()) if tables is not None else 0
    return {"total": total, "metadata": metadata, "backbone": total - metadata}


def make_optimizer(model, cfg: dict, total_steps: int, device: torch.device):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )

    def factor(step: int) -> float:
        if step < cfg["warmup_steps"]:
            return (step + 1) / cfg["warmup_steps"]
        progress = (step - cfg["warmup_steps"]) / max(1, total_steps - cfg["warmup_steps"])
        return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, progress))
        )

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(model, optimizer, scheduler, loss: torch.Tensor) -> float:
    """Backward, clip the gradient norm to 1, step optimizer and schedule; returns the loss value."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class Checkpoint:
    """
    Resumable state of one training run (model, optimizer, schedule, step, history, wall time), written at
    evaluation points at most once a minute.
    """

    def __init__(self, path: Path, model, optimizer, scheduler, every_s: float = 60.0):
        self.path, self.every_s = path, every_s
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.last = self.started = time.time()
        self.wall_before = 0.0

    def load(self) -> dict:
        """The saved step and history, restoring model, optimizer and schedule; a fresh start if none."""
        if not self.path.exists():
            return {"step": 0, "history": []}
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.wall_before, self.started = state["wall_s"], time.time()
        log(f"resuming {self.path.stem} at step {state['step']}")
        return state

    def wall_s(self) -> float:
        """Training wall time of the run so far, across resumes."""
        return self.wall_before + time.time() - self.started

    def maybe_save(self, step: int, history: list[dict]) -> None:
        if time.time() - self.last < self.every_s:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        state = {"step": step, "history": history, "wall_s": self.wall_s()}
        for key in ("model", "optimizer", "scheduler"):
            state[key] = getattr(self, key).state_dict()
        torch.save(state, tmp)
        tmp.replace(self.path)
        self.last = time.time()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def run_settings(cache: Path, preset: str, kind: str) -> tuple[dict, dict]:
    """The preset's training settings and the prepared data's metadata for one kind of run ("lm" or "add")."""
    return PRESETS[preset][kind], json.loads((cache / "data" / "meta.json").read_text())[kind]


def start_run(model, cfg: dict, total_steps: int, device, cache: Path, preset: str, name: str):
    """Model on `device`, optimizer and schedule, and the run's checkpoint: resumed from it where one exists."""
    model.to(device).train()
    optimizer, scheduler = make_optimizer(model, cfg, total_steps, device)
    checkpoint = Checkpoint(cache / "checkpoints" / preset / f"{name}.pt", model, optimizer, scheduler)
    return optimizer, scheduler, checkpoint, checkpoint.load()


# ------------------------------------------------------------------------------------------ language models


def lm_blocks(array: np.ndarray, seq_len: int) -> torch.Tensor:
    n_blocks = len(array) // seq_len
    return torch.from_numpy(array[: n_blocks * seq_len].astype(np.int64).reshape(n_blocks, seq_len))


def eval_blocks(array: np.ndarray, seq_len: int, fill: int) -> torch.Tensor:
    """The whole evaluation stream in blocks; the last one padded with `fill`."""
    n_blocks = math.ceil(len(array) / seq_len)
    padded = np.full(n_blocks * seq_len, fill, dtype=np.int64)
    padded[: len(array)] = array
    return torch.from_numpy(padded.reshape(n_blocks, seq_len))


@torch.no_grad()
def evaluate_lm(model, blocks: dict[str, torch.Tensor], tags: dict[str, str], device, batch: int) -> dict:
    """Next-token accuracy and perplexity over the evaluation stream; `tags`: model argument -> array key."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for start in range(0, len(blocks["input_ids"]), batch):
        ids = blocks["input_ids"][start : start + batch].to(device)
        mask = blocks["mask"][start : start + batch].to(device)
        extra = {arg: blocks[key][start : start + batch].to(device) for arg, key in tags.items()}
        with autocast(device):
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits[:, :-1].float()
        target, keep = ids[:, 1:], mask[:, 1:].bool()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        nll += losses[keep].sum().item()
        correct += (logits.argmax(-1) == target)[keep].sum().item()
        count += keep.sum().item()
    model.train()
    return {"accuracy": correct / count, "perplexity": math.exp(nll / count), "loss": nll / count}


def lm_eval_modes(shift) -> dict[str, dict[str, str]]:
    if shift is None:
        return {"plain": {}}
    return {
        "full_doc_tags": {"pos_ids": "pos", "ner_ids": "ner"},
        "prefix_tags": {"pos_ids": "pos_prefix", "ner_ids": "ner_prefix"},
        "no_tags": {},
    }


def run_lm(cache: Path, preset: str, variant: str, seed: int, device: torch.device) -> dict:
    cfg, meta = run_settings(cache, preset, "lm")
    shift = LM_VARIANTS[variant]
    name = f"lm-{variant}-s{seed}"
    train_np, eval_np = (
        load_arrays(cache / "data" / "lm_train.npz"),
        load_arrays(cache / "data" / "lm_eval.npz"),
    )
    seq_len, batch = cfg["seq_len"], cfg["batch"]
    train = {key: lm_blocks(train_np[key], seq_len) for key in ("input_ids", "pos", "ner")}
    pad = meta["pad_token_id"]
    eval_arrays = {key: eval_np[key][: cfg["eval_tokens"]] for key in eval_np}
    evaluation = {key: eval_blocks(values, seq_len, PAD_ID) for key, values in eval_arrays.items()}
    evaluation["input_ids"] = eval_blocks(eval_arrays["input_ids"], seq_len, pad)
    evaluation["mask"] = eval_blocks(np.ones(len(eval_arrays["input_ids"]), dtype=np.int64), seq_len, 0)
    n_blocks = len(train["input_ids"])
    steps_per_epoch = n_blocks // batch
    total_steps = cfg["epochs"] * steps_per_epoch
    eval_steps = sorted({int(round(x)) for x in np.linspace(0, total_steps, cfg["evals"])})
    special = {k: meta[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    model, text_config = build_model(
        cfg, meta["vocab_size"], special, seq_len, seed, shift, meta["metadata_fields"]
    )
    optimizer, scheduler, checkpoint, state = start_run(model, cfg, total_steps, device, cache, preset, name)
    step, history = state["step"], state["history"]
    loss_sum, loss_count = 0.0, 0
    modes = lm_eval_modes(shift)
    eval_batch = 64 if device.type == "cuda" else 16
    orders: dict[int, np.ndarray] = {}
    while True:
        if step in eval_steps and (not history or history[-1]["step"] != step):
            point = {
                "step": step,
                "tokens_seen": step * batch * seq_len,
                "train_loss": loss_sum / loss_count if loss_count else None,
                "lr": scheduler.get_last_lr()[0],
            }
            point.update(
                {
                    mode: evaluate_lm(model, evaluation, tags, device, eval_batch)
                    for mode, tags in modes.items()
                }
            )
            history.append(point)
            loss_sum, loss_count = 0.0, 0
            log(
                f"{name} step {step}/{total_steps} tokens {point['tokens_seen']:,} "
                + " ".join(
                    f"{m}: acc {point[m]['accuracy']:.4f} ppl {point[m]['perplexity']:.1f}" for m in modes
                )
            )
            checkpoint.maybe_save(step, history)
        if step >= total_steps:
            break
        epoch, within = divmod(step, steps_per_epoch)
        if epoch not in orders:  # the same block order for every run: a permutation per epoch, seed = epoch
            orders = {epoch: np.random.default_rng(epoch).permutation(n_blocks)}
        index = torch.from_numpy(orders[epoch][within * batch : (within + 1) * batch])
        ids = train["input_ids"][index].to(device)
        extra = (
            {}
            if shift is None
            else {"pos_ids": train["pos"][index].to(device), "ner_ids": train["ner"][index].to(device)}
        )
        with autocast(device):
            loss = model(input_ids=ids, labels=ids, **extra).loss
        loss_sum += optimizer_step(model, optimizer, scheduler, loss)
        loss_count += 1
        step += 1
    wall = checkpoint.wall_s()
    model_dir = cache / "models" / preset / name
    model.to(torch.bfloat16).save_pretrained(model_dir)
    result = {
        "run": name,
        "kind": "lm",
        "variant": variant,
        "seed": seed,
        "preset": preset,
        "metadata_shift": shift,
        "train_config": cfg,
        "model_config": text_config,
        "parameters": count_parameters(model),
        "data": {
            "train_tokens": int(len(train_np["input_ids"])),
            "train_blocks": n_blocks,
            "seq_len": seq_len,
            "tokens_per_step": batch * seq_len,
            "total_steps": total_steps,
            "total_tokens_seen": total_steps * batch * seq_len,
            "eval_tokens": int(len(eval_arrays["input_ids"])),
            "order": "blocks permuted per epoch with numpy default_rng(epoch): identical for every run",
        },
        "eval_modes": {mode: tags or "no metadata" for mode, tags in modes.items()},
        "history": history,
        "wall_s": wall,
        "device": str(device),
        "environment": environment(),
    }
    checkpoint.remove()
    return result


# ----------------------------------------------------------------------------------------------- addition


def add_eval_modes(fields) -> list[str]:
    return ["greedy"] if fields is None else ["guided", "unguided"]


@torch.no_grad()
def exact_match(model, test: dict[str, np.ndarray], fields, mode: str, device, max_new: int) -> np.ndarray:
    """
    Greedy answers for every test problem; returns per-problem correctness (answer digits then EOS, exactly).

    guided:   LIME+1 gets the oracle tags of the whole true problem (prompt and answer; the answer's tags as
              `guidance`, the next-token tag one step ahead, the EOS's special tag last).
    unguided: the prompt's tags come from annotating the prompt alone; every generated token's tag is
              "unknown" (the library's default provider for LIME+1 without guidance).
    greedy:   the baseline (no metadata).
    """
    model.eval()
    correct = np.zeros(len(test["input_ids"]), dtype=bool)
    for prompt_len in np.unique(test["prompt_len"]):  # equal-length prompts: no padding needed
        rows = np.flatnonzero(test["prompt_len"] == prompt_len)
        prompt = torch.from_numpy(test["input_ids"][rows, :prompt_len]).to(device)
        kwargs = dict(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )
        if fields is not None:
            source = "" if mode == "guided" else "_prompt"
            for name in fields:
                kwargs[f"{name}_ids"] = torch.from_numpy(test[f"{name}{source}"][rows, :prompt_len]).to(
                    device
                )
            kwargs["metadata_provider"] = "unknown"
            if mode == "guided":
                kwargs["guidance"] = {
                    name: [[int(t) for t in test[name][r, prompt_len : test["length"][r]]] for r in rows]
                    for name in fields
                }
        with autocast(device):
            generated = model.generate(**kwargs)[:, prompt_len:].cpu().numpy()
        for i, r in enumerate(rows):
            target = test["input_ids"][r, prompt_len : test["length"][r]]
            correct[r] = len(generated[i]) >= len(target) and np.array_equal(
                generated[i][: len(target)], target
            )
    model.train()
    return correct


def small_operands(arrays: dict[str, np.ndarray], max_digits: int) -> dict[str, np.ndarray]:
    """The problems whose operands have at most `max_digits` digits, trimmed to their longest length."""
    keep = (arrays["a"] < 10**max_digits) & (arrays["b"] < 10**max_digits)
    width = int(arrays["length"][keep].max())
    return {k: (v[keep][:, :width] if v.ndim == 2 else v[keep]) for k, v in arrays.items()}


def run_add(cache: Path, preset: str, variant: str, seed: int, device: torch.device) -> dict:
    cfg, meta = run_settings(cache, preset, "add")
    fields = ADD_VARIANTS[variant]
    name = f"add-{variant}-s{seed}"
    train_np, test = (
        small_operands(load_arrays(cache / "data" / "add_train.npz"), cfg["max_digits"]),
        small_operands(load_arrays(cache / "data" / "add_test.npz"), cfg["max_digits"]),
    )
    ids = torch.from_numpy(train_np["input_ids"])
    positions = torch.arange(ids.shape[1])
    prompt_len = torch.from_numpy(train_np["prompt_len"])[:, None]
    length = torch.from_numpy(train_np["length"])[:, None]
    answer = (positions >= prompt_len) & (positions < length)  # the answer digits and the EOS
    labels = ids.masked_fill(~answer, -100)  # the loss covers the answer only
    mask = (positions < length).long()
    tags = {name: torch.from_numpy(train_np[name]) for name in (fields or ())}
    n, batch = len(ids), cfg["batch"]
    steps_per_epoch = n // batch
    total_steps = cfg["steps"]
    eval_steps = sorted({int(round(x)) for x in np.linspace(0, total_steps, cfg["evals"])})
    max_new = cfg["max_digits"] + 2
    metadata_fields = {k: meta["metadata_fields"][k] for k in fields} if fields else None
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    model, text_config = build_model(
        cfg,
        len(meta["chars"]),
        special,
        ids.shape[1] + 8,
        seed,
        None if fields is None else 1,
        metadata_fields,
    )
    optimizer, scheduler, checkpoint, state = start_run(model, cfg, total_steps, device, cache, preset, name)
    step, history = state["step"], state["history"]
    loss_sum, loss_count = 0.0, 0
    modes = add_eval_modes(fields)
    final_correct = {}
    while True:
        if step in eval_steps and (not history or history[-1]["step"] != step):
            point = {
                "step": step,
                "examples_seen": step * batch,
                "train_loss": loss_sum / loss_count if loss_count else None,
            }
            for mode in modes:
                final_correct[mode] = exact_match(model, test, fields, mode, device, max_new)
                point[mode] = float(final_correct[mode].mean())
            history.append(point)
            loss_sum, loss_count = 0.0, 0
            log(f"{name} step {step}/{total_steps} " + " ".join(f"{m}: {point[m]:.3f}" for m in modes))
            checkpoint.maybe_save(step, history)
        if step >= total_steps:
            break
        epoch, within = divmod(step, steps_per_epoch)
        index = torch.from_numpy(
            np.random.default_rng(epoch).permutation(n)[within * batch : (within + 1) * batch]
        )
        inputs = {"input_ids": ids[index].to(device), "attention_mask": mask[index].to(device)}
        for field, values in tags.items():
            values = values[index].clone()
            # Guidance dropout: for a quarter of the problems every answer tag is unknown, the exact
            # condition of unguided generation, so "unguided" is not an input the model never saw.
            drop = torch.from_numpy(
                np.random.default_rng([seed, step]).random(len(index)) < cfg["guidance_dropout"]
            )
            values[drop[:, None] & answer[index]] = UNKNOWN_ID
            inputs[f"{field}_ids"] = values.to(device)
        with autocast(device):
            loss = model(**inputs, labels=labels[index].to(device)).loss
        loss_sum += optimizer_step(model, optimizer, scheduler, loss)
        loss_count += 1
        step += 1
    result = {
        "run": name,
        "kind": "add",
        "variant": variant,
        "seed": seed,
        "preset": preset,
        "fields": fields,
        "metadata_shift": None if fields is None else 1,
        "train_config": cfg,
        "model_config": text_config,
        "parameters": count_parameters(model),
        "data": {
            **{k: meta[k] for k in ("sampling", "example")},
            "max_digits": cfg["max_digits"],
            "train_problems": n,
            "test_problems": len(test["input_ids"]),
        },
        "eval_modes": modes,
        "history": history,
        "final_correct": {mode: correct.astype(int).tolist() for mode, correct in final_correct.items()},
        "wall_s": checkpoint.wall_s(),
        "device": str(device),
        "environment": environment(),
    }
    checkpoint.remove()
    return result


# ------------------------------------------------------------------------------------------------- train


def run_names(preset: str, only: str | None = None) -> list[str]:
    names = []
    if only in (None, "lm"):
        names += [f"lm-{v}-s{s}" for s in PRESETS[preset]["lm"]["seeds"] for v in LM_VARIANTS]
    if only in (None, "add"):
        names += [f"add-{v}-s{s}" for s in PRESETS[preset]["add"]["seeds"] for v in ADD_VARIANTS]
    return names


def run_one(cache: Path, preset: str, name: str, threads: int | None = None) -> None:
    path = cache / "runs" / preset / f"{name}.json"
    if path.exists():
        log(f"{name}: done already ({path})")
        return
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    kind, variant, seed = re.fullmatch(r"(lm|add)-(\w+)-s(\d+)", name).groups()
    runner = run_lm if kind == "lm" else run_add
    result = runner(cache, preset, variant, int(seed), device)
    write_json(path, result)
    log(f"{name}: finished in {result['wall_s']:.0f}s -> {path}")


def train(cache: Path, preset: str, jobs: int, only: str | None, runs: list[str] | None) -> None:
    names = runs or run_names(preset, only)
    pending = [n for n in names if not (cache / "runs" / preset / f"{n}.json").exists()]
    log(f"train: preset {preset}, {len(pending)} of {len(names)} runs to do, {jobs} at a time")
    if jobs <= 1:
        for name in pending:
            run_one(cache, preset, name)
        return
    logs = cache / "logs" / preset
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    queue = list(pending)
    while queue or running:
        while queue and len(running) < jobs:
            name = queue.pop(0)
            command = [sys.executable, __file__, "run-one", "--run", name, "--preset", preset,
                       "--cache", str(cache), "--threads", str(threads)]  # fmt: skip
            with open(logs / f"{name}.log", "a") as handle:
                running.append((name, subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                status = "ok" if item[1].returncode == 0 else f"FAILED ({item[1].returncode})"
                log(f"train: {item[0]} {status}")
                if item[1].returncode:
                    failed.append(item[0])
    if failed:
        raise SystemExit(f"runs failed: {failed}; see {logs}")


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
    if path.exists():
        log(f"generate: {path} exists, skipping")
        return
    models = cache / "models" / preset
    seeds = sorted(int(p.name.split("-s")[-1]) for p in models.glob("lm-baseline-s*"))
    if not seeds:
        log(f"generate: no trained models under {models}, skipping")
        return
    judge_seed = 1 if 1 in seeds else seeds[0]
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
    }

    def judge_nll(prompt_ids: torch.Tensor, continuation: torch.Tensor) -> tuple[float, int]:
        ids = torch.cat([prompt_ids, continuation], dim=1)
        logits = judge(input_ids=ids).logits[0, prompt_ids.shape[1] - 1 : -1]
        nll = torch.nn.functional.cross_entropy(logits.float(), continuation[0], reduction="sum")
        return nll.item(), continuation.shape[1]

    def trim(tokens: torch.Tensor) -> torch.Tensor:
        eos = (tokens[0] == tokenizer.eos_token_id).nonzero()
        return tokens[:, : int(eos[0]) + 1] if len(eos) else tokens

    records, samples = [], {}
    # The true continuation, as reference.
    for index, ((prompt, continuation), enc) in enumerate(zip(prompts, encoded, strict=True)):
        full = tokenizer(prompt + continuation, return_tensors="pt")["input_ids"]
        n = enc["input_ids"].shape[1]
        if torch.equal(full[:, :n], enc["input_ids"]):
            nll, count = judge_nll(enc["input_ids"], full[:, n : n + g["new_tokens"]])
            records.append(
                {"generator": "true_text", "seed": None, "prompt": index, "nll": nll, "tokens": count}
            )
    for seed in [s for s in seeds if s != judge_seed]:
        for label, (variant, extra) in generators.items():
            if not (models / f"lm-{variant}-s{seed}").exists():
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
            "generator_seeds": [s for s in seeds if s != judge_seed],
        },
        "prompts": [prompt for prompt, _ in prompts],
        "summary": summary,
        "records": records,
        "samples": samples,
        "wall_s": time.time() - started,
        "environment": environment(),
    }
    write_json(path, result)
    log(f"generate: {json.dumps(summary)}")


# --------------------------------------------------------------------------------------------------- report


def crossing(tokens: list[float], values: list[float], target: float) -> float | None:
    """Tokens at which a curve first reaches `target`, linearly interpolated between evaluation points."""
    for j, value in enumerate(values):
        if value >= target:
            if j == 0:
                return float(tokens[0])
            t0, t1, v0 = tokens[j - 1], tokens[j], values[j - 1]
            return float(t0 + (target - v0) / (value - v0) * (t1 - t0))
    return None


def mean_or_none(values: list) -> float | None:
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def summarise(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": values}


def curve(run: dict, mode: str, metric: str = "accuracy") -> tuple[list, list]:
    return [p["tokens_seen"] for p in run["history"]], [p[mode][metric] for p in run["history"]]


def report(cache: Path, preset: str, results: Path) -> dict:
    runs_dir = cache / "runs" / preset
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(runs_dir.glob("*-s*.json"))}
    if not runs:
        raise SystemExit(f"report: no run results under {runs_dir}; run `train` first")
    generation_path = runs_dir / "generation.json"
    generation = json.loads(generation_path.read_text()) if generation_path.exists() else None
    meta = json.loads((cache / "data" / "meta.json").read_text())
    results.mkdir(parents=True, exist_ok=True)
    lm = {name: run for name, run in runs.items() if run["kind"] == "lm"}
    add = {name: run for name, run in runs.items() if run["kind"] == "add"}
    seeds = sorted({run["seed"] for run in lm.values() if run["variant"] == "baseline"})
    paired = [s for s in seeds if all(f"lm-{v}-s{s}" in lm for v in LM_VARIANTS)]
    headline: dict = {}

    fractions: dict[str, dict[str, list]] = {}
    if paired:
        # Data efficiency: tokens LIME needs to reach the baseline's final accuracy (paired by seed).
        for target_kind in ("final", "best"):
            for label, (variant, mode) in {
                "lime": ("lime", "full_doc_tags"),
                "lime_prefix_tags": ("lime", "prefix_tags"),
                "lime_no_tags": ("lime", "no_tags"),
                "lime_plus1_oracle": ("lime_plus1", "full_doc_tags"),
            }.items():
                values = []
                for s in paired:
                    base = lm[f"lm-baseline-s{s}"]
                    accuracies = [p["plain"]["accuracy"] for p in base["history"]]
                    target = accuracies[-1] if target_kind == "final" else max(accuracies)
                    total = base["history"][-1]["tokens_seen"]
                    tokens = crossing(*curve(lm[f"lm-{variant}-s{s}"], mode), target)
                    values.append(None if tokens is None else tokens / total)
                fractions.setdefault(label, {})[target_kind] = values
        headline["data_fraction_lime"] = mean_or_none(fractions["lime"]["final"])
        headline["data_fraction_lime_prefix_tags"] = mean_or_none(fractions["lime_prefix_tags"]["final"])
        headline["data_fraction_target"] = 0.60
        headline["data_fraction_paper_500m"] = 0.4365
        headline["data_fraction_per_seed"] = {label: v["final"] for label, v in fractions.items()}
        headline["data_fraction_vs_best_baseline_accuracy"] = {
            label: {"mean": mean_or_none(v["best"]), "per_seed": v["best"]} for label, v in fractions.items()
        }
        headline["data_fraction_lime_plus1_oracle"] = mean_or_none(fractions["lime_plus1_oracle"]["final"])

        # Final metrics of every model and tag source.
        final: dict[str, dict] = {}
        for variant, shift in LM_VARIANTS.items():
            for mode in lm_eval_modes(shift):
                rows = [lm[f"lm-{variant}-s{s}"]["history"][-1][mode] for s in paired]
                final[f"{variant}/{mode}"] = {
                    metric: summarise([r[metric] for r in rows]) for metric in ("accuracy", "perplexity")
                }
        headline["final_eval_metrics"] = final
        base_acc = final["baseline/plain"]["accuracy"]["mean"]
        base_loss = np.mean([lm[f"lm-baseline-s{s}"]["history"][-1]["plain"]["loss"] for s in paired])
        gains = {}
        for mode in ("full_doc_tags", "prefix_tags", "no_tags"):
            loss = np.mean([lm[f"lm-lime-s{s}"]["history"][-1][mode]["loss"] for s in paired])
            gains[mode] = {
                "accuracy_gain": final[f"lime/{mode}"]["accuracy"]["mean"] - base_acc,
                "loss_gain_nats": float(base_loss - loss),
            }
        full_gain = gains["full_doc_tags"]
        headline["leak"] = {
            "lime_gain_over_baseline": gains,
            "accuracy_gain_surviving_with_prefix_tags": gains["prefix_tags"]["accuracy_gain"] / full_gain["accuracy_gain"]
            if full_gain["accuracy_gain"] > 0 else None,
            "loss_gain_surviving_with_prefix_tags": gains["prefix_tags"]["loss_gain_nats"] / full_gain["loss_gain_nats"]
            if full_gain["loss_gain_nats"] > 0 else None,
            "prefix_tags": meta["lm"]["prefix_tags"],
        }  # fmt: skip
    if generation:
        headline["generation"] = {"config": generation["config"], "summary": generation["summary"]}

    # Addition.
    def add_final(variant: str, mode: str) -> dict:
        values = [run["history"][-1][mode] for run in add.values() if run["variant"] == variant]
        return summarise(values) if values else None

    def add_curve(variant: str, mode: str) -> list[float] | None:
        """Mean exact match over seeds at every evaluation point."""
        values = [[p[mode] for p in run["history"]] for run in add.values() if run["variant"] == variant]
        return np.mean(values, axis=0).tolist() if values else None

    spacy_block = {
        "baseline": add_final("baseline", "greedy"),
        "lime_plus1_unguided": add_final("lime_plus1_spacy", "unguided"),
        "lime_plus1_guided": add_final("lime_plus1_spacy", "guided"),
    }
    digit_block = {
        "baseline": spacy_block["baseline"],
        "lime_plus1_unguided": add_final("lime_plus1_digit", "unguided"),
        "lime_plus1_guided": add_final("lime_plus1_digit", "guided"),
    }
    if all(spacy_block.values()):
        headline["addition_exact_match"] = {k: v["mean"] for k, v in spacy_block.items()} | {
            "fields": ["pos", "ner"]
        }
        headline["addition_exact_match_digit_field"] = {
            k: (v["mean"] if v else None) for k, v in digit_block.items()
        } | {"fields": ["digit"]}
        headline["addition_exact_match_per_seed"] = {
            "pos_ner": {k: v["per_seed"] for k, v in spacy_block.items()},
            "digit": {k: v["per_seed"] for k, v in digit_block.items() if v},
        }
        # Every model ends near the ceiling; the budget at which each gets there is the real difference.
        setups = {
            "baseline": ("baseline", "greedy"),
            "lime_plus1_unguided": "unguided",
            "lime_plus1_guided": "guided",
        }
        headline["addition_exact_match_by_step"] = {
            "steps": [point["step"] for point in next(iter(add.values()))["history"]],
            **{
                fields_label: {
                    setup: add_curve(*(how if isinstance(how, tuple) else (variant, how)))
                    for setup, how in setups.items()
                }
                for fields_label, variant in (("pos_ner", "lime_plus1_spacy"), ("digit", "lime_plus1_digit"))
            },
        }
    lm_any = next(iter(lm.values()), None)
    add_any = next(iter(add.values()), None)
    headline["config"] = {
        "preset": preset,
        "lm_train_config": PRESETS[preset]["lm"],
        "lm_model_config": lm_any and lm_any["model_config"],
        "lm_parameters": lm_any
        and {r["variant"]: r["parameters"] for r in lm.values() if paired and r["seed"] == paired[0]},
        "lm_data": lm_any and lm_any["data"],
        "add_train_config": PRESETS[preset]["add"],
        "add_model_config": add_any and add_any["model_config"],
        "add_data": add_any and add_any["data"],
        "data_config": meta["data_config"],
        "prefix_window_tokens": meta["prefix_window_tokens"],
        "spacy_pipeline": f"{meta['lm']['spacy_pipeline']} {meta['lm']['spacy_version']}",
        "generation": GENERATION["smoke" if preset == "smoke" else "default"],
        "seeds": {"lm": paired, "add": sorted({r["seed"] for r in add.values()})},
        "tokenization": "byte-level BPE trained on the five training novels, LimeTokenizer alignment "
        "'pretokenized' for every run (baseline included)",
        "eval_points": "evenly spaced over training; data fractions interpolate linearly between them",
        "fraction_definition": "tokens LIME needs to first reach the final next-token accuracy of the baseline "
        "of the same seed (identical backbone init and data order), over the baseline's total tokens; mean over "
        "seeds, null if any seed never reaches it",
    }
    headline["device"] = {
        "train": sorted({r["device"] for r in runs.values()}),
        "train_environment": lm_any and lm_any["environment"],
        "train_wall_s": {name: round(run["wall_s"], 1) for name, run in runs.items()},
        "prepare_wall_s": meta.get("prepare_wall_s"),
        "generation_wall_s": generation and generation["wall_s"],
    }
    write_json(results / "reproduce.json", headline)
    write_json(results / "reproduce_runs.json", {"prepare": meta, "runs": runs, "generation": generation})
    write_csvs(results, lm, add, generation)
    plot(results, lm, add, paired, fractions)
    log(f"report: wrote {results}/reproduce.json")
    return headline


def write_csvs(results: Path, lm: dict, add: dict, generation: dict | None) -> None:
    with open(results / "reproduce_curves.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["run", "variant", "seed", "step", "tokens_seen", "eval_tags", "accuracy", "perplexity", "loss"]
        )
        for name, run in lm.items():
            for point in run["history"]:
                for mode in lm_eval_modes(run["metadata_shift"]):
                    m = point[mode]
                    writer.writerow([name, run["variant"], run["seed"], point["step"], point["tokens_seen"], mode,
                                     f"{m['accuracy']:.6f}", f"{m['perplexity']:.4f}", f"{m['loss']:.6f}"])  # fmt: skip
    with open(results / "reproduce_addition.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "variant", "seed", "step", "examples_seen", "mode", "exact_match"])
        for name, run in add.items():
            for point in run["history"]:
                for mode in run["eval_modes"]:
                    writer.writerow([name, run["variant"], run["seed"], point["step"], point["examples_seen"], mode,
                                     f"{point[mode]:.4f}"])  # fmt: skip
    if generation:
        with open(results / "reproduce_generation.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["generator", "judge_perplexity", "tokens", "samples", "distinct_bigram_ratio"])
            for label, row in generation["summary"].items():
                writer.writerow([label, f"{row['judge_perplexity']:.3f}", row["tokens"], row["samples"],
                                 f"{row.get('distinct_bigram_ratio', float('nan')):.4f}"])  # fmt: skip


LINES = {
    ("baseline", "plain"): ("baseline (no metadata)", "black", "-"),
    ("lime", "full_doc_tags"): ("LIME, full-document tags", "tab:blue", "-"),
    ("lime", "prefix_tags"): ("LIME, prefix-only tags", "tab:blue", "--"),
    ("lime", "no_tags"): ("LIME, no tags", "tab:blue", ":"),
    ("lime_plus1", "full_doc_tags"): ("LIME+1, oracle next-token tags", "tab:orange", "-"),
    ("lime_plus1", "prefix_tags"): ("LIME+1, prefix-only next-token tags", "tab:orange", "--"),
}


def plot(results: Path, lm: dict, add: dict, seeds: list[int], fractions: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if lm and seeds:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        for (variant, mode), (label, color, style) in LINES.items():
            for axis, metric in zip(axes, ("accuracy", "perplexity"), strict=True):
                curves = [curve(lm[f"lm-{variant}-s{s}"], mode, metric) for s in seeds]
                tokens = np.asarray(curves[0][0]) / 1e6
                values = np.asarray([c[1] for c in curves])
                start = 1 if metric == "perplexity" else 0  # the untrained model's perplexity dwarfs the rest
                axis.plot(tokens[start:], values.mean(0)[start:], color=color, linestyle=style, label=label)
                axis.fill_between(
                    tokens[start:], values.min(0)[start:], values.max(0)[start:], color=color, alpha=0.12
                )
        base_final = np.mean([lm[f"lm-baseline-s{s}"]["history"][-1]["plain"]["accuracy"] for s in seeds])
        axes[0].axhline(base_final, color="grey", linewidth=0.8)
        fraction = mean_or_none(fractions["lime"]["final"])
        if fraction is not None:
            total = lm[f"lm-baseline-s{seeds[0]}"]["history"][-1]["tokens_seen"] / 1e6
            axes[0].axvline(fraction * total, color="tab:blue", linewidth=0.8)
            axes[0].annotate(f" LIME reaches the baseline's final\n accuracy at {fraction:.1%} of the tokens",
                             (fraction * total, base_final), xytext=(6, 28), textcoords="offset points", fontsize=8)  # fmt: skip
        axes[0].set(xlabel="training tokens seen (M)", ylabel="next-token accuracy on Persuasion")
        axes[0].set_ylim(bottom=max(0.0, base_final - 0.2))
        axes[1].set(xlabel="training tokens seen (M)", ylabel="perplexity on Persuasion", yscale="log")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Tiny Llama on five Austen novels, evaluated on Persuasion (mean, min-max band over {len(seeds)} seeds)", fontsize=10)  # fmt: skip
        fig.tight_layout()
        fig.savefig(results / "reproduce_data_efficiency.png", dpi=120)
        plt.close(fig)
    if add:
        fig, axis = plt.subplots(figsize=(7, 4.5))
        styles = {
            ("baseline", "greedy"): ("baseline", "black", "-"),
            ("lime_plus1_spacy", "guided"): ("LIME+1 POS/NER, guided (oracle tags)", "tab:orange", "-"),
            ("lime_plus1_spacy", "unguided"): ("LIME+1 POS/NER, unguided", "tab:orange", "--"),
            ("lime_plus1_digit", "guided"): ("LIME+1 digit place, guided (oracle tags)", "tab:green", "-"),
            ("lime_plus1_digit", "unguided"): ("LIME+1 digit place, unguided", "tab:green", "--"),
        }
        for (variant, mode), (label, color, style) in styles.items():
            chosen = [run for run in add.values() if run["variant"] == variant]
            if not chosen:
                continue
            x = np.asarray([p["examples_seen"] for p in chosen[0]["history"]]) / 1e3
            y = np.asarray([[p[mode] for p in run["history"]] for run in chosen])
            axis.plot(x, y.mean(0), color=color, linestyle=style, label=label, marker="o", markersize=3)
            axis.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.12)
        axis.set(
            xlabel="training problems seen (thousands)",
            ylabel="exact match on held-out problems",
            ylim=(0, 1.02),
        )
        axis.legend(fontsize=8)
        digits = next(iter(add.values()))["data"]["max_digits"]
        axis.set_title(
            f"Synthetic addition (1-{digits} digit operands), mean and min-max over seeds", fontsize=10
        )
        fig.tight_layout()
        fig.savefig(results / "reproduce_addition.png", dpi=120)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------- table


def dig(data: dict | None, *keys):
    for key in keys:
        if not isinstance(data, (dict, list)):
            return None
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def benchmarks_table(results: Path = RESULTS) -> str:
    """The README's one table: overheads, throughput and data efficiency, read from the results JSON files."""

    def load(name: str) -> dict | None:
        path = results / name
        return json.loads(path.read_text()) if path.exists() else None

    overhead, annotation = load("overhead.json"), load("annotation.json")
    generation, reproduce = load("generation.json"), load("reproduce.json")
    pending = "_pending: run `python benchmarks/{}`_"

    def ratio(value, suffix="x") -> str | None:
        return None if value is None else f"{value:.2f}{suffix}"

    sizes = dig(overhead, "parameters") or []
    params = " / ".join(
        f"{r['size_class']}: +{r['metadata_params'] / 1e3:.0f} k ({r['overhead_percent']:.3f} %)"
        for r in sizes
    )
    fraction = dig(reproduce, "data_fraction_lime")
    prefix = dig(reproduce, "data_fraction_lime_prefix_tags")
    efficiency = None
    if reproduce is not None:
        efficiency = (f"{fraction:.1%}" if fraction is not None else "never reached") + (
            f" (prefix-only tags: {prefix:.1%})"
            if prefix is not None
            else " (prefix-only tags: never reached)"
        )
    rows = [
        ("metadata parameters (Llama 500M / 1B / 2B, POS + NER)", params or None, "+0.01 % (paper)",
         "overhead.py"),
        ("training step time, LIME / backbone", ratio(dig(overhead, "step_time", "lime_over_backbone")),
         "<= 1.03x", "overhead.py"),
        ("LimeTokenizer end to end / raw spaCy `nlp.pipe`",
         ratio(dig(annotation, "spacy_vs_tokenizer", "tokenizer_over_spacy_throughput")), ">= 0.9x",
         "annotation.py"),
        ("align from cached annotations / annotate",
         ratio(dig(annotation, "datasets_map", "align_speedup_over_annotate")), ">= 20x", "annotation.py"),
        ("`datasets.map` annotation, `num_proc=2` / 1 process",
         ratio(dig(annotation, "datasets_map", "num_proc_2_speedup")), ">= 1.7x", "annotation.py"),
        ("guided LIME+1 `generate` tokens/s / backbone",
         ratio(dig(generation, "throughput", "guided_over_backbone")), ">= 0.9x", "generation.py"),
        ("tokens LIME needs to reach the baseline's final accuracy (tiny Llama, Austen)", efficiency,
         "<= 60 % (paper: 43.65 %)", "reproduce.py"),
    ]  # fmt: skip
    lines = ["| measure | result | target | script |", "| --- | --- | --- | --- |"]
    for measure, value, target, script in rows:
        lines.append(
            f"| {measure} | {value if value is not None else pending.format(script)} | {target} | `{script}` |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "stage", choices=["prepare", "train", "run-one", "generate", "report", "all", "table"]
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny data and models: the whole pipeline in minutes"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"work folder (default {DEFAULT_CACHE})"
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="default: smoke with --smoke, else gpu on CUDA, else cpu"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (subprocesses)")
    parser.add_argument(
        "--only", choices=["lm", "add"], help="train only the language-model or addition runs"
    )
    parser.add_argument("--run", action="append", help="train only this run (repeatable), e.g. lm-lime-s0")
    parser.add_argument("--threads", type=int, help="torch CPU threads of a run (set by `train --jobs`)")
    parser.add_argument(
        "--results", type=Path, help="where report writes (default benchmarks/results; smoke: cache)"
    )
    args = parser.parse_args(argv)
    if args.stage == "table":  # the README's Benchmarks table, from whatever results exist
        print(benchmarks_table(args.results or RESULTS))
        return
    cache = args.cache / "smoke" if args.smoke else args.cache
    preset = args.preset or ("smoke" if args.smoke else None)
    if preset is None:
        trained = [p for p in ("gpu", "cpu") if (cache / "runs" / p).exists()]
        if args.stage in ("train", "run-one", "all") or not trained:
            preset = "gpu" if torch.cuda.is_available() else "cpu"
        else:
            preset = trained[0]
    results = args.results or (cache / "results" if args.smoke else RESULTS)
    if args.stage in ("prepare", "all"):
        prepare(cache, args.smoke or preset == "smoke")
    if args.stage == "run-one":
        for name in args.run:
            run_one(cache, preset, name, args.threads)
    if args.stage in ("train", "all"):
        train(cache, preset, args.jobs, args.only, args.run)
    if args.stage in ("generate", "all"):
        generate_stage(cache, preset)
    if args.stage in ("report", "all"):
        headline = report(cache, preset, results)
        keys = ["data_fraction_lime", "data_fraction_lime_prefix_tags", "addition_exact_match"]
        print(json.dumps({k: headline.get(k) for k in keys}, indent=2))


if __name__ == "__main__":
    main()
