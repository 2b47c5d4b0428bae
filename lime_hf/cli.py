"""The work of each `lime-hf` command; the parsers are in `lime_hf_cli` (`lime-hf --help` imports only them).

Every mistake in the user's input (a missing or empty file, a folder that holds no LIME model, guidance the model
cannot take, ...) ends the command with one line on stderr and exit code 2 (`argparse`'s `parser.error`).
`load_model` and `generate_with_tags` also serve the web page (`lime_hf.integrations.app`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.utils import logging as hf_logging

from lime_hf_cli import check_model_folder

from .generation import label_id
from .modeling_lime import LimeForCausalLM
from .tokenization_lime import LimeTokenizer


def run_annotate(args: argparse.Namespace) -> None:
    """Load the texts, annotate them (`annotate_dataset`: progress bar, `num_proc`) and `save_to_disk`."""
    from .data import annotate_dataset
    from .pretrain import load_texts

    if args.executor is not None:
        return run_annotate_datatrove(args)
    try:
        texts = load_texts(args.sources, args.dataset_config, args.split, args.text_column)
        annotated = annotate_dataset(
            texts,
            fields=args.fields,
            spacy_model=args.spacy_model,
            batch_size=args.batch_size,
            num_proc=args.num_proc,
        )
    except (ValueError, OSError) as error:  # unknown dataset or column, no documents, unknown spaCy pipeline
        args.parser.error(one_line(error))
    annotated.save_to_disk(str(args.output))
    print(f"Annotated {len(annotated)} texts with {', '.join(args.fields)}; saved to {args.output}")


def run_annotate_datatrove(args: argparse.Namespace) -> None:
    """`annotate --executor ...`: `lime_hf.integrations.datatrove.annotate_corpus`."""
    try:
        from .integrations.datatrove import annotate_corpus

        if len(args.sources) != 1:
            raise ValueError(f"--executor takes one input folder of shards, got {args.sources}")
        slurm = (
            {"partition": args.slurm_partition, "time": args.slurm_time} if args.executor == "slurm" else {}
        )
        logging_dir = args.logging_dir or str(args.output.parent / f"logs-{args.output.name}")
        annotate_corpus(
            args.sources[0], str(args.output), logging_dir, args.executor, args.tasks, args.workers,
            args.fields, args.spacy_model, args.text_column, args.batch_size, **slurm,
        )  # fmt: skip
    except ImportError as error:
        args.parser.error(f'{one_line(error)}; the executors need `pip install "lime_hf[datatrove]"`')
    except (ValueError, OSError, RuntimeError) as error:
        args.parser.error(one_line(error))
    done = "Submitted the Slurm job array for" if args.executor == "slurm" else "Annotated"
    print(
        f"{done} {args.sources[0]} ({', '.join(args.fields)}): Parquet shards in {args.output}, logs in {logging_dir}"
    )


def run_train(args: argparse.Namespace) -> None:
    """The pretraining script on every argument (`lime_hf_cli.main` has checked the LIME options)."""
    from .pretrain import main as pretrain_main

    try:
        pretrain_main(args.script_args)
    except (ValueError, OSError) as error:  # no documents, a tokenizer or backbone that does not load, ...
        args.parser.error(one_line(error))


def run_generate(args: argparse.Namespace) -> None:
    """Load model and tokenizer, tag the prompt, generate (guided when asked) and print each sequence."""
    hf_logging.disable_progress_bar()  # print the generated text only
    parser, guidance = args.parser, args.guidance  # checked against the config by `lime_hf_cli.main`
    try:
        model, tokenizer = load_model(args.model)
        for field, labels in guidance.items():
            for label in labels:
                label_id(model.config.metadata_fields, field, label)
    except (ValueError, OSError) as error:
        parser.error(one_line(error))
    if model.config.metadata_shift and not guidance and not model.config.tag_head_fields:
        example = ",".join(
            label for label in ("DT", "NN", "VBD") if label in model.config.metadata_fields.get("pos", ())
        )
        print(
            f"note: {args.model} is a LIME+1 model: it reads the tags of the token it is about to write, and without "
            f"--guide they are unknown.\n  Guide it one label per token, e.g. --guide pos={example or 'LABEL,LABEL'} "
            f"(`lime-hf tag TEXT --tokenizer {args.model}` shows its labels in context).",
            file=sys.stderr,
        )
    sampling = args.do_sample or any(
        value is not None for value in (args.temperature, args.top_k, args.top_p)
    )
    decoding = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=sampling,
        num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences,
        **{
            name: value
            for name, value in (
                ("temperature", args.temperature),
                ("top_k", args.top_k),
                ("top_p", args.top_p),
            )
            if value is not None
        },
    )
    set_seed(args.seed)
    try:
        sequences = generate_with_tags(
            model, tokenizer, args.prompt, guidance, args.provider, spacy_tags=args.show_tags, **decoding
        )
    except ValueError as error:  # e.g. more return sequences than beams without sampling
        parser.error(one_line(error))
    for sequence in sequences:
        print(sequence["text"])
        if args.show_tags:
            print(tags_table(sequence, tokenizer.metadata_fields), end="\n\n")
    if args.show_tags and guidance:
        for field in guidance:
            rows = [row for sequence in sequences for row in sequence["tokens"] if row["asked"].get(field)]
            agree = sum(row["asked"][field] == row["found"][field] for row in rows)
            print(f"spaCy finds the asked {field} tag on {agree} of {len(rows)} guided tokens.")


def run_tag(args: argparse.Namespace) -> None:
    """Print the text's tokens with their tags, as the model receives them."""
    try:
        tokenizer = load_lime_tokenizer(args.tokenizer, args.alignment)
        encoding = tokenizer(args.text, return_offsets_mapping=True)
    except (ValueError, OSError) as error:
        args.parser.error(one_line(error))
    header = ["#", "token", "id", "chars", *tokenizer.metadata_fields]
    rows = []
    for index, (token, (start, end)) in enumerate(
        zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    ):
        tags = [
            tokenizer.metadata_fields[name][encoding[f"{name}_ids"][index]]
            for name in tokenizer.metadata_fields
        ]
        rows.append([str(index), repr(tokenizer.decode([token])), str(token), f"{start}-{end}", *tags])
    print(f"{len(rows)} tokens, alignment {tokenizer.alignment!r}:")
    print(format_table(header, rows))


def run_demo(args: argparse.Namespace) -> None:
    """Run `lime_hf.demo.main`."""
    from .demo import main as demo_main

    demo_main(output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed, quick=args.quick)


def run_app(args: argparse.Namespace) -> None:
    """Serve the guided-generation page (`lime_hf.integrations.app`) until interrupted."""
    from .integrations.app import serve

    try:
        model, tokenizer = load_model(args.model)
    except (ValueError, OSError) as error:
        args.parser.error(one_line(error))
    serve(model, tokenizer, host=args.host, port=args.port, name=args.model)


# ---- Shared by the commands and the web page ------------------------------------------------------------------


def one_line(error: BaseException) -> str:
    """An exception's message on one line (some libraries' messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def load_model(path: str) -> tuple[LimeForCausalLM, LimeTokenizer]:
    """The LIME model and LimeTokenizer saved in folder `path`, in eval mode; `ValueError` if it holds others."""
    check_model_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not isinstance(tokenizer, LimeTokenizer):
        raise ValueError(
            f"{path!r} holds a {type(tokenizer).__name__}, not a LimeTokenizer: save the model's one there"
        )
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tokenizer


def load_lime_tokenizer(path: str, alignment: str | None) -> LimeTokenizer:
    """A saved LimeTokenizer (re-wrapped for another `alignment`), or a fast tokenizer wrapped in one."""
    base = AutoTokenizer.from_pretrained(path)
    if isinstance(base, LimeTokenizer) and alignment in (None, base.alignment):
        return base
    return LimeTokenizer.from_tokenizer(
        base, alignment=alignment or "pretokenized", spacy_model=getattr(base, "spacy_model", None)
    )


def generate_with_tags(
    model: LimeForCausalLM,
    tokenizer: LimeTokenizer,
    prompt: str,
    guidance: dict[str, list[str]],
    provider: str | None = None,
    spacy_tags: bool = True,
    **decoding: Any,
) -> list[dict[str, Any]]:
    """
    Generate from one prompt; per returned sequence its `text` and, per generated token, the `token` text, the
    tags it was `fed` (guidance or provider, by field), the tags it was `asked` (guidance) and, with
    `spacy_tags`, the tags spaCy `found` in the output (otherwise spaCy never runs on it).
    """
    encoding = tokenizer(prompt, return_tensors="pt").to(model.device)
    start = encoding["input_ids"].shape[1]
    output = model.generate(
        **encoding,
        tokenizer=tokenizer,
        guidance={field: [labels] for field, labels in guidance.items()} or None,
        metadata_provider=provider,
        return_dict_in_generate=True,
        **decoding,
    )
    fields = (
        tokenizer.metadata_fields
    )  # the model's inventories (`generate` checks them), in the tokenizer's order
    sequences = []
    for row, ids in enumerate(output.sequences.tolist()):
        # The tags generate fed for each position (guidance or provider); padding after an early EOS is dropped.
        fed_ids = {field: output.metadata_ids[f"{field}_ids"][row].tolist() for field in fields}
        ids = [token for index, token in enumerate(ids) if index < start or token != tokenizer.pad_token_id]
        found = tokenizer.metadata_for_ids(ids) if spacy_tags else None
        rows = []
        for step, token in enumerate(ids[start:]):
            position = start + step
            rows.append(
                {
                    "token": tokenizer.decode([token]),
                    "fed": {field: fields[field][fed_ids[field][position]] for field in fields},
                    "asked": {
                        field: labels[step] for field, labels in guidance.items() if step < len(labels)
                    },
                    "found": {field: fields[field][found[field][position]] for field in fields}
                    if found
                    else {},
                }
            )
        sequences.append({"text": tokenizer.decode(ids, skip_special_tokens=True), "tokens": rows})
    return sequences


def tags_table(sequence: dict[str, Any], fields: dict[str, list[str]]) -> str:
    """`--show-tags`: one row per generated token, the tags it was fed (guidance's where asked) beside spaCy's."""
    header = ["#", "token"]
    for field in fields:
        header += [f"{field} fed", f"{field} spaCy"]
    rows = [
        [str(step), repr(row["token"])]
        + [tag for field in fields for tag in (row["fed"][field], row["found"][field])]
        for step, row in enumerate(sequence["tokens"])
    ]
    return format_table(header, rows)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, a rule under the header."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
