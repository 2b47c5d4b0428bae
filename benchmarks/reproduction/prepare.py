"""Stage `prepare`: annotate the Austen corpus once, train the BPE, align, prefix-only tags, addition data.

`prepare_causal` adds causal (prefix-only) tags of every novel, training novels included, next to the prepared
data: `lm_train_causal.npz` / `lm_eval_causal.npz` hold `pos_causal` and `ner_causal` aligned with the
`input_ids` of `lm_train.npz` / `lm_eval.npz`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
from common import AUSTEN, train_bpe  # the benchmarks' shared helpers

from .harness import (
    DATA_CONFIG,
    EVAL_NOVEL,
    SPECIAL_ID,
    SPECIAL_TOKENS,
    TRAIN_NOVELS,
    cut_at_paragraph,
    environment,
    load_arrays,
    log,
    save_arrays,
    spans_to_annotation,
    unwrap,
    write_json,
)

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


# ----------------------------------------------------------------------------------- the dependency field

# The labels of the English pipelines' parser (en_core_web_sm 3.x), and `_SP` for whitespace tokens.
DEP_LABELS = (
    "ROOT", "acl", "acomp", "advcl", "advmod", "agent", "amod", "appos", "attr", "aux", "auxpass", "case", "cc",
    "ccomp", "compound", "conj", "csubj", "csubjpass", "dative", "dep", "det", "dobj", "expl", "intj", "mark",
    "meta", "neg", "nmod", "npadvmod", "nsubj", "nsubjpass", "nummod", "oprd", "parataxis", "pcomp", "pobj",
    "poss", "preconj", "predet", "prep", "prt", "punct", "quantmod", "relcl", "xcomp", "_SP",
)  # fmt: skip


def dep_field():
    """
    spaCy's dependency label of each token (`Token.dep_`), a field of the honest stage's richer supervision.
    Read causally (the parser sees the text up to the token), it is the parser's guess of the role of the phrase
    the token opens or continues (`the` at the end of "Anne saw the" is `dobj`): syntax that the library's `pos`
    (`Token.tag_`) and `ner` do not carry. The parser's state reaches back through the sentence: on the first
    12,000 characters of Persuasion (2,488 tokens), 8 tokens of left context gave the labels of 32 for 89.7 % of the
    tokens and 16 for 94.1 % (and the causal labels those of the whole document for 59.9 %). 8 is what this stage
    could afford on two CPU cores (16 costs twice the time). Built lazily, like the digit field.
    """
    from lime_hf.annotation import FieldAnnotator, token_spans

    class DepField(FieldAnnotator):
        name = "dep"
        labels = DEP_LABELS
        whitespace_label = "_SP"
        components = ("parser",)
        causal_window = 8
        token_level = True

        def annotate(self, doc):
            starts, lengths, deps, spaces = doc.to_array(["IDX", "LENGTH", "DEP", "IS_SPACE"]).T.tolist()
            strings = doc.vocab.strings
            labels = ["_SP" if space else strings[dep] for dep, space in zip(deps, spaces, strict=True)]
            return token_spans(starts, lengths, labels)

    return DepField()


# ------------------------------------------------------------------------------------------------- prepare


def prepare(cache: Path, smoke: bool) -> None:
    data_dir = cache / "data"
    done = data_dir / "meta.json"
    if done.exists():
        log(f"prepare: {done} exists, skipping")
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    dcfg = DATA_CONFIG["smoke" if smoke else "full"]
    meta = {"data_config": dcfg, "prefix_window_tokens": causal_windows(), "environment": environment()}
    started = time.time()
    meta["lm"] = prepare_lm(data_dir, dcfg)
    meta["add"] = prepare_addition(data_dir, dcfg)
    meta["prepare_wall_s"] = time.time() - started
    write_json(done, meta)
    log(f"prepare: done in {meta['prepare_wall_s']:.0f}s")


def causal_windows() -> dict[str, int]:
    """Tokens of left context the library's causal mode gives each field (pos: exact; ner: measured)."""
    from lime_hf.annotation import NerField, PosField

    return {field.name: field.causal_window for field in (PosField(), NerField())}


def prepare_lm(data_dir: Path, dcfg: dict) -> dict:
    from lime_hf import LimeTokenizer, SpacyAnnotator

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
    # Prefix-only tags: each token tagged from a window of text that ends with it (no right context).
    started = time.time()
    prefix_annotation, agreement = prefix_tags(text, annotation, annotator)
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


def prefix_tags(text: str, annotation: dict, annotator, check_chars: int = 6_000) -> tuple[dict, dict]:
    """
    Re-tag every spaCy token of `text` seeing only the text up to and including it: the library's causal mode
    (`SpacyAnnotator(causal=True)`), whose span boundaries are those of `annotation` (the full-document one), so
    the token stream does not change. Returns the new annotation and agreement statistics of the default
    windows against a 48-token window on the first `check_chars` characters.
    """
    from lime_hf import SpacyAnnotator

    def causal(window: int | None = None):
        return SpacyAnnotator(
            annotator.fields,
            annotator.spacy_model,
            max_chars=annotator.max_chars,
            causal=True,
            causal_window=window,
        )

    new = causal()([text])[0]
    for name, spans in annotation.items():
        if new[name]["ends"] != spans["ends"]:
            raise RuntimeError(f"causal annotation changed the {name} spans; it must only change the labels")
    excerpt = cut_at_paragraph(text, check_chars)
    default, longer = causal()([excerpt])[0], causal(48)([excerpt])[0]
    words = [
        k
        for k, (s, e) in enumerate(zip(annotation["pos"]["starts"], annotation["pos"]["ends"], strict=True))
        if not text[s:e].isspace()
    ]
    agreement = {
        "window_tokens": causal_windows(),
        "words": len(words),
        "check_window_tokens": 48,
        "check_tokens": len(default["pos"]["labels"]),
        "agreement_with_longer_window": {
            name: float(np.mean(np.asarray(default[name]["labels"]) == np.asarray(longer[name]["labels"])))
            for name in new
        },
        "word_fraction_changed_vs_full_doc": {
            name: float(np.mean([new[name]["labels"][k] != annotation[name]["labels"][k] for k in words]))
            for name in new
        },
    }
    return new, agreement


def prepare_causal(cache: Path, cfg: dict | None = None, field=None, name: str = "causal") -> dict:
    """
    Causal tags of every novel (`pos_causal`, `ner_causal`) aligned with the prepared token streams, written
    next to them as `data/lm_train_causal.npz` and `data/lm_eval_causal.npz` (with their `input_ids`, checked
    equal to the prepared ones) and `data/causal_meta.json`. Resumable: each novel is saved to
    `data/causal/{novel}.npz` as soon as it is done. The signature fits `LmSpec.prepare`; `cfg` is unused.

    `field` (a `FieldAnnotator`): that field alone instead of the tokenizer's, into `data/{name}/`,
    `data/lm_{split}_{name}.npz` and `data/{name}_meta.json` (`{field}_causal`, and for the evaluation novel also
    the field's full-document tags as `{field}`).
    """
    from lime_hf import LimeTokenizer, SpacyAnnotator

    data_dir = cache / "data"
    done = data_dir / f"{name}_meta.json"
    if done.exists():
        return json.loads(done.read_text())
    meta = json.loads((data_dir / "meta.json").read_text())
    tokenizer = LimeTokenizer.from_pretrained(data_dir / "tokenizer")
    if field is not None:  # the same BPE and alignment, with this field's inventory
        tokenizer = LimeTokenizer.from_tokenizer(tokenizer, alignment=tokenizer.alignment, fields=[field])
    fields = list(tokenizer.metadata_fields)
    annotators = [field] if field is not None else fields
    annotator = SpacyAnnotator(annotators, max_chars=100_000, batch_size=4, causal=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    (data_dir / name).mkdir(exist_ok=True)
    started = time.time()

    def encode(text: str, annotation: dict, suffix: str) -> dict[str, np.ndarray]:
        enc = tokenizer(text, annotations=annotation)
        arrays = {"input_ids": np.asarray([bos, *enc["input_ids"], eos], dtype=np.int32)}
        for key in fields:
            arrays[f"{key}{suffix}"] = np.asarray(
                [SPECIAL_ID, *enc[f"{key}_ids"], SPECIAL_ID], dtype=np.int16
            )
        return arrays

    for novel in (*TRAIN_NOVELS, EVAL_NOVEL):
        path = data_dir / name / f"{novel}.npz"
        if path.exists():
            continue
        novel_started = time.time()
        text = cut_at_paragraph(
            unwrap((AUSTEN / f"{novel}.txt").read_text(encoding="utf-8")), meta["data_config"]["max_chars"]
        )
        arrays = encode(text, annotator([text])[0], "_causal")
        if field is not None and novel == EVAL_NOVEL:  # the reference of the full-document evaluation mode
            full = encode(text, SpacyAnnotator(annotators, max_chars=100_000, batch_size=4)([text])[0], "")
            arrays |= {key: full[key] for key in fields}
        save_arrays(path, arrays)
        log(f"prepare_causal: {name} {novel} ({len(text):,} chars) in {time.time() - novel_started:.0f}s")
    windows = causal_windows() if field is None else {field.name: field.causal_window}
    stats = {"wall_s_this_run": time.time() - started, "windows": windows, "fraction_changed": {}}
    for split, novels in (("train", TRAIN_NOVELS), ("eval", (EVAL_NOVEL,))):
        parts = [load_arrays(data_dir / name / f"{novel}.npz") for novel in novels]
        arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        prepared = load_arrays(data_dir / f"lm_{split}.npz")
        if not np.array_equal(arrays["input_ids"], prepared["input_ids"]):
            raise RuntimeError(
                f"the causal {split} stream differs from lm_{split}.npz: tokenizer or texts changed"
            )
        save_arrays(data_dir / f"lm_{split}_{name}.npz", arrays)
        full = arrays if field is not None else prepared
        stats["fraction_changed"][split] = {
            key: float(np.mean(arrays[f"{key}_causal"] != full[key])) for key in fields if key in full
        }
        if split == "eval" and field is None:
            stats["eval_agreement_with_prefix"] = {
                key: float(np.mean(arrays[f"{key}_causal"] == prepared[f"{key}_prefix"])) for key in fields
            }
    write_json(done, stats)
    log(f"prepare_causal: {name} done {stats}")
    return stats


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
