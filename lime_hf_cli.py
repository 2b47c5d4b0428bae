"""The `lime-hf` command line: every parser and option, and the entry point of the console script.

    lime-hf annotate book.txt --output annotated/          # spaCy once -> Arrow dataset of char-span tags
    lime-hf train book.txt --train-tokenizer 8000          # pretrain (lime_hf.pretrain); Trainer options too
    lime-hf generate MODEL_DIR "The king" --guide pos=VBD,DT,NN --show-tags
    lime-hf tag "The king left." --tokenizer MODEL_DIR     # how a text is tagged and aligned
    lime-hf demo                                           # baseline vs LIME vs LIME+1 in a few minutes
    lime-hf app MODEL_DIR                                  # a web page for guided generation
    lime-hf eval --model lime --model_args pretrained=MODEL_DIR --tasks T   # lm-eval's own command line

This module sits beside the `lime_hf` package, not in it, and imports only the standard library: importing
`lime_hf` registers its Auto classes, which imports torch and transformers (seconds), so `--help` and usage
errors answer from here at once. A command's work happens in `lime_hf.cli`, imported when the command runs.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

ALIGNMENTS = ("pretokenized", "offsets")  # LimeTokenizer's alignment modes
FIELDS = ("pos", "ner")  # the built-in metadata fields
SOURCES_HELP = (
    ".txt files (one document per paragraph), a `save_to_disk` folder, or one `datasets` name/folder"
)


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line and a pointer to `--help`, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n  (see `{self.prog} --help`)\n")


@dataclass
class ScriptArguments:
    """The pretraining options beyond `TrainingArguments` (`lime-hf train --help` shows them first)."""

    sources: list[str] = field(default_factory=list, metadata={"help": SOURCES_HELP})
    tokenizer: str | None = field(
        default=None,
        metadata={
            "metavar": "PATH",
            "help": "a saved LimeTokenizer, or any fast tokenizer (path or Hub id) to wrap in one",
        },
    )
    train_tokenizer: int | None = field(
        default=None,
        metadata={
            "metavar": "VOCAB",
            "help": "instead of --tokenizer: train a byte-level BPE of this vocabulary size",
            "type": int,
        },
    )
    alignment: str | None = field(
        default=None,
        metadata={
            "help": "how tags meet subwords in a new tokenizer (default: pretokenized)",
            "choices": ALIGNMENTS,
        },
    )
    spacy_model: str | None = field(
        default=None,
        metadata={"metavar": "NAME", "help": "spaCy pipeline of a new tokenizer (default: en_core_web_sm)"},
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "metavar": "JSON",
            "help": "the backbone's config (`text_config`) as a JSON file or string (default: a tiny Llama)",
        },
    )
    from_backbone: str | None = field(
        default=None,
        metadata={"metavar": "PATH", "help": "retrofit this causal-LM checkpoint (path or Hub id) instead"},
    )
    metadata_shift: int = field(
        default=0,
        metadata={
            "metavar": "{0,1}",
            "help": "0 = LIME, 1 = LIME+1 (default: 0)",
            "type": int,
            "choices": (0, 1),
        },
    )
    tag_heads: str | None = field(
        default=None,
        metadata={
            "metavar": "FIELDS",
            "help": "comma-separated fields that get tag heads (e.g. pos,ner): the model learns to predict its own "
            "metadata, so generation needs neither spaCy (LIME) nor oracle guidance (LIME+1)",
        },
    )
    metadata_dropout: float = field(
        default=0.0,
        metadata={
            "metavar": "P",
            "help": "probability of hiding a tag as 'unknown' in training (default: 0)",
            "type": float,
        },
    )
    block_size: int = field(
        default=512, metadata={"metavar": "N", "help": "tokens per packed block (default: 512)", "type": int}
    )
    eval_file: str | None = field(
        default=None, metadata={"metavar": "SOURCE", "help": "held-out texts, like the sources"}
    )
    eval_fraction: float | None = field(
        default=None,
        metadata={
            "metavar": "F",
            "help": "instead of --eval-file: hold out this fraction of the documents",
            "type": float,
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"metavar": "CONFIG", "help": "config name of a `datasets` source"}
    )
    split: str = field(
        default="train",
        metadata={"metavar": "SPLIT", "help": "split of a `datasets` source (default: train)"},
    )
    text_column: str = field(
        default="text",
        metadata={"metavar": "COLUMN", "help": "text column of a `datasets` source (default: text)"},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"metavar": "DIR", "help": "datasets cache folder (default: ~/.cache/huggingface/datasets)"},
    )
    num_proc: int = field(
        default=1,
        metadata={
            "metavar": "N",
            "help": "processes for annotation, alignment and packing (default: 1)",
            "type": int,
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "resume from the latest checkpoint in --output-dir", "action": "store_true"},
    )


TRAIN_EPILOG = """\
Trainer options: every `TrainingArguments` option is accepted as well, with dashes or underscores
(--output-dir, default lime-pretrain; --max-steps, --learning-rate, --per-device-train-batch-size,
--logging-steps, default 0.05 = every 5 % of the steps; --save-steps, --eval-strategy, --bf16, --use-cpu,
--push-to-hub, ...). `lime-hf train --help-trainer` lists all of them.
"""


def dashed(argv: Sequence[str]) -> list[str]:
    """Option names spelled with underscores (`--block_size 64`, the Trainer's style) in their dashed form."""
    spelled = []
    for arg in argv:
        name, equals, value = arg.partition("=")
        spelled.append(name.replace("_", "-") + equals + value if arg.startswith("--") else arg)
    return spelled


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The LIME options of `ScriptArguments` (dashed; see `dashed`), defaults left to the dataclass."""
    for option in fields(ScriptArguments):
        if option.name == "sources":
            continue
        flag = f"--{option.name.replace('_', '-')}"
        parser.add_argument(flag, dest=option.name, default=argparse.SUPPRESS, **option.metadata)
    parser.add_argument("--help-trainer", action=TrainerHelp)


class TrainerHelp(argparse.Action):
    """`--help-trainer`: print the `TrainingArguments` options (this imports transformers) and exit."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="list the Trainer's options"
        )

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None
    ):
        from lime_hf.pretrain import trainer_parser

        trainer_parser(parser.prog).print_help()
        parser.exit()


def build_train_parser(prog: str = "lime-hf train") -> Parser:
    """`train`'s parser: the LIME options; the Trainer's options are left over for `HfArgumentParser`."""
    parser = Parser(
        prog=prog,
        usage=f"{prog} SOURCE [SOURCE ...] (--tokenizer PATH | --train-tokenizer VOCAB) [options]",
        description=(
            "Pretrain a LIME decoder on raw texts: annotate, align, pack, train, evaluate, save.\n\n"
            f"SOURCE (first): {SOURCES_HELP}."
        ),
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a prefix of a Trainer option must not match one of ours
    )
    add_train_arguments(parser)
    return parser


def parse_train_arguments(
    argv: Sequence[str], prog: str = "lime-hf train"
) -> tuple[ScriptArguments, list[str]]:
    """
    `train`'s command line -> the LIME options (the dataclass's defaults where not given) and the options left
    for the Trainer. The sources come first: which later words are values of Trainer options is unknown here.
    """
    argv = dashed(argv)
    count = next((index for index, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    known, rest = build_train_parser(prog).parse_known_args(argv[count:])
    return ScriptArguments(sources=argv[:count], **vars(known)), rest


def check_train_arguments(args: ScriptArguments) -> None:
    """The option combinations `train` refuses before it loads anything (`ValueError` saying what to give)."""
    if (args.tokenizer is None) == (args.train_tokenizer is None):
        raise ValueError(
            "Give exactly one of --tokenizer PATH (a saved LimeTokenizer or a fast tokenizer to wrap) or "
            "--train-tokenizer VOCAB_SIZE (train a byte-level BPE on the corpus)."
        )
    check_sources(args.sources)
    if args.eval_file is not None:
        check_sources([args.eval_file])
    backbone_config = Path(args.from_backbone or "") / "config.json"
    if args.from_backbone and backbone_config.is_file():
        config = json.loads(backbone_config.read_text(encoding="utf-8"))
        if config.get("model_type") == "lime":
            kind = "LIME+1" if config.get("metadata_shift") else "LIME"
            raise ValueError(
                f"--from-backbone {args.from_backbone!r} is already a {kind} model (metadata shift "
                f"{config.get('metadata_shift', 0)}): --from-backbone retrofits a plain causal LM; continue "
                "a LIME run from one of its checkpoint-N folders with --resume-from-checkpoint"
            )


def check_sources(sources: Sequence[str]) -> bool:
    """
    Refuse sources that cannot give documents, before anything loads them; True for .txt files, False for one
    dataset. A .txt file must exist, hold something and be UTF-8 (`ValueError` naming the file otherwise).
    """
    if not sources:
        raise ValueError(
            "No sources given: pass .txt files, a `save_to_disk` folder or a `datasets` name (before the options)."
        )
    text_files = [source for source in sources if source.endswith(".txt")]
    if not text_files:
        if len(sources) > 1:
            raise ValueError(
                f"Several dataset sources {list(sources)}: give one dataset (or .txt files only)."
            )
        return False
    if len(text_files) != len(sources):
        raise ValueError(
            f"Mixed sources {list(sources)}: give either .txt files only, or one dataset (name or folder)."
        )
    missing = [path for path in text_files if not Path(path).is_file()]
    if missing:
        raise ValueError(f"No such text file(s): {missing}.")
    if not any([check_utf8_text(Path(path)) for path in text_files]):  # every file checked
        raise ValueError(f"No documents: {text_files} hold only whitespace.")
    return True


def check_utf8_text(path: Path, chunk_size: int = 1 << 20) -> bool:
    """
    `path` holds at least one byte and decodes as UTF-8 (read in chunks: corpora may be large); returns whether
    it holds more than whitespace.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            try:
                has_text = bool(decoder.decode(chunk).strip()) or has_text
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path} is not UTF-8 text: byte 0x{chunk[error.start]:02x} at offset {offset + error.start} "
                    "is invalid; convert the file first (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None
            offset += len(chunk)
    if offset == 0:
        raise ValueError(f"{path} is empty (0 bytes): give a file with text in it.")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: it ends inside a multi-byte character.") from None
    return has_text


def check_model_folder(path: str) -> dict[str, Any]:
    """The config of the LIME model saved in folder `path`; `ValueError` saying what the folder is instead."""
    folder = Path(path)
    if not folder.exists():
        raise ValueError(
            f"no such folder {path!r}: give a folder written by `save_pretrained` (model and tokenizer)"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path!r} holds no config.json: give a folder written by `save_pretrained`")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type != "lime":
        raise ValueError(
            f"{path!r} holds a {model_type!r} model, not a LIME model; retrofit it first "
            "(`LimeForCausalLM.from_backbone`, or `lime-hf train --from-backbone`)"
        )
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(
            f"{path!r} holds no weights (model.safetensors): save the model there with `save_pretrained`"
        )
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{path!r} holds no tokenizer.json: save the model's LimeTokenizer there too")
    return config


def check_guidance(
    config: dict[str, Any], guidance: dict[str, list[str]], provider: str | None, name: str
) -> None:
    """What `--guide` and `--provider` ask of the model (its `config.json`), in the options' words."""
    fields, shift = config.get("metadata_fields") or {}, config.get("metadata_shift", 0)
    if guidance and not shift:
        raise ValueError(
            f"--guide needs a LIME+1 model (metadata shift 1), but {name!r} is a LIME model (shift 0): it is fed "
            "the tags of tokens it wrote, which --provider annotate gives; drop --guide"
        )
    if provider == "annotate" and shift:
        raise ValueError(
            f"{name!r} is a LIME+1 model (metadata shift 1): it reads the tags of the token it is about to write, "
            "which re-annotating (--provider annotate) cannot know; guide it with --guide, or use --provider unknown"
        )
    for wanted in guidance:
        if wanted not in fields:
            raise ValueError(
                f"--guide {wanted}=...: {name!r} has no metadata field {wanted!r}; its fields: {', '.join(fields)}"
            )


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


def positive(kind: type) -> Any:
    """An argparse `type` accepting numbers > 0 of `kind`."""

    def convert(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value

    convert.__name__ = f"positive {kind.__name__}"
    return convert


def probability(text: str) -> float:
    """An argparse `type` for a number in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError(text)
    return value


def build_parser() -> Parser:
    """The `lime-hf` parser; each subcommand stores its handler's name (in `lime_hf.cli`) as `command`."""
    parser = Parser(
        prog="lime-hf",
        description="LIME (Linguistic Metadata Embeddings) for Hugging Face Transformers.",
        epilog="Run `lime-hf COMMAND --help` for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    add_annotate_parser(commands)
    add_train_parser(commands)
    add_generate_parser(commands)
    add_tag_parser(commands)
    add_demo_parser(commands)
    add_app_parser(commands)
    return parser


def add_annotate_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "annotate",
        help="annotate text with spaCy and save the tag spans as an Arrow dataset",
        description=(
            "Run spaCy once over a corpus and save it with one column of character-span tags per field "
            "(`lime_pos`, `lime_ner`, ...), ready for `lime_hf.align_dataset` with any LimeTokenizer."
        ),
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    parser.add_argument("--dataset-config", metavar="CONFIG", help="config name of a `datasets` source")
    parser.add_argument(
        "--split", default="train", help="split of a `datasets` source (default: %(default)s)"
    )
    parser.add_argument(
        "--text-column", default="text", help="text column of a `datasets` source (default: %(default)s)"
    )
    parser.add_argument("--output", "-o", required=True, type=Path, help="folder for `save_to_disk`")
    parser.add_argument(
        "--fields",
        nargs="+",
        default=list(FIELDS),
        choices=FIELDS,
        help="fields to annotate (default: pos ner)",
    )
    parser.add_argument("--spacy-model", help="spaCy pipeline name (default: en_core_web_sm)")
    parser.add_argument(
        "--num-proc", type=positive(int), help="worker processes, each with its own spaCy pipeline"
    )
    parser.add_argument(
        "--batch-size", type=positive(int), default=256, help="texts per map batch (default: %(default)s)"
    )
    scale = parser.add_argument_group(
        "datatrove executors",
        "annotate a folder of .parquet or .jsonl[.gz] shards into Parquet shards with datatrove (needs "
        '`pip install "lime_hf[datatrove]"`); rerunning with the same --logging-dir resumes unfinished tasks',
    )
    scale.add_argument(
        "--executor", choices=["local", "slurm", "ray"], help="default: no datatrove, one machine"
    )
    scale.add_argument(
        "--tasks", type=int, default=1, help="output shards (<= input files) (default: %(default)s)"
    )
    scale.add_argument("--workers", type=int, default=-1, help="tasks at once (default: all)")
    scale.add_argument("--logging-dir", help="logs, stats and completions (default: OUTPUT/../logs-OUTPUT)")
    scale.add_argument("--slurm-partition", help="Slurm partition")
    scale.add_argument("--slurm-time", help="Slurm time limit per task, e.g. 24:00:00")
    parser.set_defaults(parser=parser)


def add_train_parser(commands: Any) -> None:
    """`train`'s arguments are parsed by `build_train_parser` (and the Trainer's by `lime_hf.pretrain`)."""
    parser = commands.add_parser(
        "train",
        help="pretrain a LIME model (see `lime-hf train --help`)",
        add_help=False,
        prefix_chars="\0",  # `--help` and the rest reach `build_train_parser` untouched
    )
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    parser.set_defaults(parser=parser)


def add_generate_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "generate",
        help="generate text with a saved LIME / LIME+1 model, optionally guided by tags",
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
            "LIME+1 guidance: the labels of the next generated tokens, comma-separated (space-separated "
            "when a label is a comma: 'pos=NNP , VBD'); repeat the option for other fields"
        ),
    )
    parser.add_argument(
        "--provider",
        choices=["annotate", "unknown", "model"],
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
        "--show-tags",
        action="store_true",
        help="print each generated token with the tags it was fed and the tags spaCy finds in the output",
    )
    parser.set_defaults(parser=parser)


def add_tag_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "tag",
        help="show how a text is tokenized and tagged (a table of tokens with their POS/NER tags)",
        description=(
            "Tokenize TEXT with a LimeTokenizer (or a fast tokenizer, wrapped in one) and print every token "
            "with its metadata tags, as the model receives them."
        ),
    )
    parser.add_argument("text", help="the text to tag ('-' reads standard input)")
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="a saved LimeTokenizer or model folder, or a fast tokenizer",
    )
    parser.add_argument(
        "--alignment",
        choices=ALIGNMENTS,
        help="alignment mode (default: the tokenizer's own, else pretokenized)",
    )
    parser.set_defaults(parser=parser)


def add_demo_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="train baseline, LIME and LIME+1 tiny models on the World English Bible and compare them",
        description=(
            "Train a byte-level BPE, annotate a public-domain corpus (World English Bible) with spaCy, train "
            "three tiny Llama models on the same token stream (baseline without metadata, LIME, LIME+1), "
            "print and plot their held-out next-token accuracy, save the LIME+1 model and show guided "
            "generation. About five minutes on two CPU cores."
        ),
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("lime-demo"), help="where results go (default: %(default)s)"
    )
    parser.add_argument(
        "--max-steps", type=positive(int), help="training steps per model (default: the setting's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long setting, for tests")
    parser.set_defaults(parser=parser)


def add_app_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "app",
        help="serve a web page for guided generation with a saved model",
        description=(
            "Serve a local web page: type a prompt, edit the guide tags per step, and see the generated tokens "
            "coloured by tag, with spaCy's tags of the output beside the asked ones."
        ),
    )
    parser.add_argument("model", help="folder written by `save_pretrained` (model and LimeTokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="(default: %(default)s; 0 picks a free port)")
    parser.set_defaults(parser=parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lime-hf` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # lm-eval's own command line, arguments unchanged, with the `lime` model registered
    if argv[:1] == ["eval"]:
        from lime_hf.integrations.lm_eval import main as eval_main

        eval_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:  # refuse what can be refused before anything heavy is imported
        if args.command == "train":
            check_train_arguments(parse_train_arguments(args.script_args)[0])
        elif args.command == "annotate" and args.executor is None:  # datatrove checks its input folder
            check_sources(args.sources)
        elif args.command == "generate":
            args.guidance = parse_guide_options(args.guide)
            check_guidance(check_model_folder(args.model), args.guidance, args.provider, args.model)
            if not args.prompt.strip():
                raise ValueError("the prompt is empty: give the text to continue")
            sampling = args.do_sample or any(
                v is not None for v in (args.temperature, args.top_k, args.top_p)
            )
            if args.num_return_sequences > args.num_beams and not sampling:
                raise ValueError(
                    f"--num-return-sequences {args.num_return_sequences} needs sampling (--do-sample, --top-k, ...) "
                    f"or at least as many beams (--num-beams {args.num_return_sequences}): greedy decoding gives one"
                )
        elif args.command == "app":
            check_model_folder(args.model)
        elif args.command == "tag":
            args.text = sys.stdin.read() if args.text == "-" else args.text
            if not args.text.strip():
                raise ValueError("the text is empty: give a text to tag")
            if not Path(args.tokenizer).exists():
                raise ValueError(f"no such folder {args.tokenizer!r}: give a saved tokenizer or model folder")
    except ValueError as error:
        args.parser.error(str(error))
    from lime_hf import cli  # the commands' work: torch, transformers, spaCy, ...

    return getattr(cli, f"run_{args.command}")(args) or 0


if __name__ == "__main__":
    sys.exit(main())
