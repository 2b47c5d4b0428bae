"""`lime-hf generate`: generate with a saved LIME / LIME+1 model, guided by tags where asked."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..options import check_model_folder
from ..rules import PROVIDER_NAMES, check_generation_request
from ._common import add_command, format_table, positive, probability, usage_errors


def add_parser(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "generate",
        run,
        check,
        description=(
            "Load a saved LIME model and its LimeTokenizer, tag the prompt with spaCy and generate. A LIME+1 "
            "model can be guided: `--guide pos=NNP,VBD` asks for a proper noun, then a past-tense verb, one "
            "label per generated token; after the schedule the provider takes over."
        ),
    )
    parser.add_argument("model", help="folder written by `save_pretrained` (model and LimeTokenizer)")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=positive(int), default=20, help="(default: %(default)s)")
    parser.add_argument(
        "--guide",
        action="append",
        default=[],
        metavar="FIELD=LABELS",
        help=(
            "LIME+1 guidance: the labels of the next generated tokens, one per token from the first, comma-separated "
            "(space-separated when a label is a comma: 'pos=NNP , VBD'); repeat the option for other fields. After "
            "the last label the provider tags that field (--provider): to hold a label, repeat it (ner=O,O,O,O)"
        ),
    )
    parser.add_argument(
        "--provider",
        choices=PROVIDER_NAMES,
        help=(
            "tags of generated tokens that guidance does not cover: the model's tag heads (the default for a "
            "model with heads), re-annotate the text (LIME's default otherwise) or unknown"
        ),
    )
    decoding = parser.add_argument_group("decoding (greedy unless sampling is asked for)")
    decoding.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    decoding.add_argument(
        "--temperature", type=positive(float), help="sampling temperature (implies --do-sample)"
    )
    decoding.add_argument(
        "--top-k", type=positive(int), help="sample from the k likeliest tokens (implies --do-sample)"
    )
    decoding.add_argument(
        "--top-p",
        type=probability,
        help="sample from the smallest set of tokens of this probability (implies --do-sample)",
    )
    decoding.add_argument(
        "--num-beams", type=positive(int), default=1, help="beam search width (default: %(default)s)"
    )
    decoding.add_argument(
        "--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)"
    )
    decoding.add_argument(
        "--num-return-sequences", type=positive(int), default=1, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--meta-every",
        type=positive(int),
        metavar="N",
        help="a model with meta-tokens: its meta-token after every N ordinary tokens, in the prompt and in the "
        "generated text (a model trained with --meta-fraction K saw one per 1/K - 1 tokens on average: 9 for 0.1)",
    )
    parser.add_argument(
        "--show-tags",
        action="store_true",
        help="print each generated token with the tags it was fed, where each came from (guide, or the provider: "
        "heads, spaCy, unknown) and the tags spaCy finds in the output",
    )


def check(args: argparse.Namespace) -> None:
    """The guidance, the saved model's config.json and the decoding options, before the model loads."""
    args.guidance = parse_guide_options(args.guide)
    config = check_model_folder(args.model)
    try:
        check_generation_request(
            fields=config.get("metadata_fields") or {},
            metadata_shift=config.get("metadata_shift", 0),
            has_tag_heads=bool(config.get("tag_head_fields")),
            guidance_fields=args.guidance,
            provider=args.provider,
        )
    except ValueError as error:
        raise ValueError(f"{args.model!r}: {error}") from None
    if not args.prompt.strip():
        raise ValueError("the prompt is empty: give the text to continue")
    args.meta_token_ids = config.get("meta_token_ids") or []
    if args.meta_every is not None and not args.meta_token_ids:
        raise ValueError(
            f"--meta-every places the model's meta-tokens, and {args.model!r} has none (its config's meta_token_ids "
            "is empty); train one with `lime-hf train ... --meta-token '<meta>'`"
        )
    args.decoding = decoding_settings(args)


def parse_guide_options(options: Sequence[str]) -> dict[str, list[str]]:
    """`["pos=NNP,VBD", "ner=O"]` -> `{"pos": ["NNP", "VBD"], "ner": ["O"]}`; `ValueError` for bad syntax."""
    guidance: dict[str, list[str]] = {}
    for option in options:
        name, equals, value = option.partition("=")
        labels = value.split() if any(c.isspace() for c in value) else value.split(",")
        if not equals or not name or not all(labels):
            raise ValueError(
                f"--guide {option!r}: expected FIELD=LABEL,LABEL,... (e.g. pos=NNP,VBD), with no empty label"
            )
        if name in guidance:
            raise ValueError(f"--guide gives field {name!r} twice")
        guidance[name] = labels
    return guidance


def decoding_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`generate`'s decoding keywords: sampling when any sampling option is given; `ValueError` if they clash."""
    sampling_options = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    sampling_options = {name: value for name, value in sampling_options.items() if value is not None}
    sampling = args.do_sample or bool(sampling_options)
    if args.num_return_sequences > args.num_beams and not sampling:
        raise ValueError(
            f"--num-return-sequences {args.num_return_sequences} needs sampling (--do-sample, --top-k, ...) "
            f"or at least as many beams (--num-beams {args.num_return_sequences}): greedy decoding gives one"
        )
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=sampling,
        num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences,
        **sampling_options,
    )


def run(args: argparse.Namespace) -> None:
    """Load model and tokenizer, tag the prompt, generate (guided when asked) and print each sequence."""
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from ..tag_providers import label_id
    from ..tagged_generation import generate_with_tags, load_model, provider_source

    hf_logging.disable_progress_bar()  # print the generated text only
    guidance = args.guidance
    with usage_errors(args.parser):
        model, tokenizer = load_model(args.model)
        for field, labels in guidance.items():
            for label in labels:
                label_id(model.config.metadata_fields, field, label)
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
    if args.meta_token_ids and args.meta_every is None:
        print(
            f"note: {args.model} reads meta-tokens ({tokenizer.convert_ids_to_tokens(args.meta_token_ids[0])!r}) and "
            "none is placed: add --meta-every N to put one after every N tokens (9 for a model trained with "
            "--meta-fraction 0.1).",
            file=sys.stderr,
        )
    source = provider_source(model.config, args.provider)
    for field, labels in guidance.items():
        if len(labels) < args.max_new_tokens:
            print(
                f"note: --guide {field} gives {len(labels)} label(s) for up to {args.max_new_tokens} new tokens: "
                f"the first {len(labels)} follow it, the rest take their {field} tags from the provider ({source}); "
                f"repeat a label to hold it ({field}={','.join([labels[-1]] * 3)},...)",
                file=sys.stderr,
            )
    set_seed(args.seed)
    with usage_errors(args.parser, ValueError):
        sequences = generate_with_tags(
            model,
            tokenizer,
            args.prompt,
            guidance,
            args.provider,
            spacy_tags=args.show_tags,
            meta_every=args.meta_every,
            **args.decoding,
        )
    for sequence in sequences:
        print(sequence["text"])
        if args.show_tags:
            print(tags_table(sequence, tokenizer.metadata_fields), end="\n\n")
    if args.show_tags and guidance:
        for field in guidance:
            rows = [row for sequence in sequences for row in sequence["tokens"] if row["asked"].get(field)]
            agree = sum(row["asked"][field] == row["found"][field] for row in rows)
            print(f"spaCy finds the asked {field} tag on {agree} of {len(rows)} guided tokens.")


def tags_table(sequence: dict[str, Any], fields: dict[str, list[str]]) -> str:
    """
    `--show-tags`: one row per generated token, the tags it was fed and where from (`guide`, or the provider:
    `heads`, `spaCy`, `unknown`) beside spaCy's tags of the output.
    """
    header = ["#", "token"]
    for field in fields:
        header += [f"{field} fed", "from", f"{field} spaCy"]
    rows = [
        [str(step), repr(row["token"])]
        + [tag for field in fields for tag in (row["fed"][field], row["from"][field], row["found"][field])]
        for step, row in enumerate(sequence["tokens"])
    ]
    return format_table(header, rows)
