"""The pretraining options and the checks of user input that need no model: standard library only.

`lime_hf.pretrain` (the library) and `lime_hf.cli` (the command line) share them. The CLI runs the checks before
it imports torch, so a mistake is answered at once; the library runs the same functions on the same values, so a
Python caller gets the same message. Each check raises `ValueError` saying what is wrong and what to give instead.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rules import check_lime_model_type, check_metadata_injection

# `LimeTokenizer`'s alignment modes and the built-in fields, repeated here so that the CLI's parsers need not import
# tokenization_lime (torch, transformers); tests/test_cli.py checks that both places agree.
ALIGNMENTS = ("pretokenized", "offsets")
FIELDS = ("pos", "ner")
SOURCES_HELP = (
    ".txt files (one document per paragraph; see --sample-by), or one .csv/.json/.jsonl/.parquet file, "
    "`save_to_disk` folder or `datasets` name/folder"
)
# What one document is in a .txt source: `datasets`' text loader's `sample_by`.
SAMPLE_BY = ("line", "paragraph", "document")
SAMPLE_BY_HELP = (
    "one document of a .txt source: a line, a paragraph (between blank lines) or the whole file (default: "
    "paragraph)"
)
# The backbone when neither --model-config nor --from-backbone is given: a small Llama (~3 M parameters
# without the embeddings). `vocab_size` and the special token ids always come from the tokenizer.
DEFAULT_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}


@dataclass
class TrainOptions:
    """
    The pretraining options beyond `TrainingArguments` (`lime-hf train --help` shows them first). Each field's
    metadata holds its `argparse` settings: the CLI builds its `train` parser from them.
    """

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
            "help": "comma-separated fields with tag heads (e.g. pos,ner): the model predicts their tags itself",
        },
    )
    tag_head_type: str = field(
        default="mlp",
        metadata={
            "help": "a shared hidden layer, then a classifier per field (mlp, the default), or a linear "
            "classifier per field",
            "choices": ("mlp", "linear"),
        },
    )
    metadata_layer: int = field(
        default=0,
        metadata={
            "metavar": "K",
            "help": "the decoder layer the metadata joins at (default: 0); with --tag-heads and K > 0 the model "
            "tags its own input in one pass (the honest mode)",
            "type": int,
        },
    )
    metadata_training_source: str = field(
        default="given",
        metadata={
            "help": "what the LM reads in training: the given tags, or the heads' own, as at inference "
            "(predicted: needs --tag-heads and --metadata-layer > 0) (default: given)",
            "choices": ("given", "predicted"),
        },
    )
    predicted_tag_embedding: str = field(
        default="argmax",
        metadata={
            "help": "read the heads' tags as their argmax's embedding, or as the embeddings averaged under their "
            "probabilities (expected) (default: argmax)",
            "choices": ("argmax", "expected"),
        },
    )
    metadata_dropout: float = field(
        default=0.0,
        metadata={
            "metavar": "P",
            "help": "share of tags hidden in training (default: 0)",
            "type": float,
        },
    )
    meta_token: str | None = field(
        default=None,
        metadata={
            "metavar": "TOKEN",
            "help": "add TOKEN (e.g. '<meta>') as a learned meta-token: meta-attention in the model, injected at "
            "random positions of every block (see --meta-fraction)",
        },
    )
    meta_fraction: float | None = field(
        default=None,
        metadata={
            "metavar": "K",
            "help": "with --meta-token: meta-tokens per token of a block, in (0, 1); blocks are packed shorter so "
            "that with them they hold --block-size tokens (default: 0.1, the paper's)",
            "type": float,
        },
    )
    sample_by: str | None = field(default=None, metadata={"help": SAMPLE_BY_HELP, "choices": SAMPLE_BY})
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
    shards: str | None = field(
        default=None,
        metadata={
            "metavar": "FOLDER",
            "help": "instead of sources: stream-train from this shard folder (`lime-hf pack`); needs --tokenizer "
            "(the one the shards were packed with) and --max-steps; the block size is the shards'",
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "stream-train from the source (an annotated or aligned dataset), aligning and packing on the "
            "fly instead of mapping the whole corpus first; needs --max-steps",
            "action": "store_true",
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "resume from the latest checkpoint in --output-dir", "action": "store_true"},
    )

    @property
    def tag_head_fields(self) -> list[str]:
        """The fields named by `tag_heads` (empty: no heads)."""
        return [name.strip() for name in (self.tag_heads or "").split(",") if name.strip()]


def check_train_options(options: TrainOptions) -> None:
    """The option combinations `train` refuses before it loads anything (`ValueError` saying what to give)."""
    if (options.tokenizer is None) == (options.train_tokenizer is None):
        raise ValueError(
            "Give exactly one of --tokenizer PATH (a saved LimeTokenizer or a fast tokenizer to wrap) or "
            "--train-tokenizer VOCAB_SIZE (train a byte-level BPE on the corpus)."
        )
    if options.shards is not None or options.streaming:
        check_streaming_options(options)
        check_sample_by(options.sample_by, text_files=False)
    else:
        check_sample_by(options.sample_by, text_files=check_sources(options.sources))
    if options.metadata_layer < 0:
        raise ValueError(f"--metadata-layer must be 0 or more, got {options.metadata_layer}.")
    check_metadata_injection(
        metadata_layer=options.metadata_layer,
        training_source=options.metadata_training_source,
        predicted_tag_embedding=options.predicted_tag_embedding,
        tag_head_fields=options.tag_head_fields,
    )
    check_meta_token_options(options.meta_token, options.meta_fraction)
    fields: Sequence[str] | None = FIELDS  # a new LimeTokenizer's; None: known once a Hub tokenizer loads
    saved = Path(options.tokenizer or "") / "tokenizer_config.json"
    if options.tokenizer and saved.is_file():  # a folder here: a Hub id is checked once it is loaded
        config = json.loads(saved.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") == "LimeTokenizer":
            check_saved_tokenizer(config.get("alignment"), config.get("spacy_model"), options)
            fields = list(config.get("metadata_fields") or FIELDS)
    elif options.tokenizer and not Path(options.tokenizer).exists():
        fields = None
    if fields is not None and (unknown := [f for f in options.tag_head_fields if f not in fields]):
        raise ValueError(
            f"--tag-heads names unknown field(s) {unknown}; the tokenizer's fields are {list(fields)}."
        )
    if options.eval_file is not None:
        check_sources([options.eval_file])
    backbone_config = Path(options.from_backbone or "") / "config.json"
    if options.from_backbone and backbone_config.is_file():
        config = json.loads(backbone_config.read_text(encoding="utf-8"))
        if config.get("model_type") == "lime":
            kind = "LIME+1" if config.get("metadata_shift") else "LIME"
            raise ValueError(
                f"--from-backbone {options.from_backbone!r} is already a {kind} model (metadata shift "
                f"{config.get('metadata_shift', 0)}): --from-backbone retrofits a plain causal LM; continue "
                "a LIME run from one of its checkpoint-N folders with --resume-from-checkpoint"
            )
    check_block_size(block_size_of(options), max_positions(options))


def block_size_of(options: TrainOptions) -> int:
    """The block size a run trains on: a shard folder's, from its manifest, else `--block-size`."""
    if options.shards is None:
        return options.block_size
    manifest = json.loads((Path(options.shards) / "manifest.json").read_text(encoding="utf-8"))
    return manifest["block_size"]


def read_text_config(spec: str) -> dict[str, Any]:
    """A backbone config from a JSON file or an inline JSON object (`--model-config`); it must name its `model_type`."""
    text = Path(spec).read_text(encoding="utf-8") if Path(spec).is_file() else spec
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--model-config {spec!r} is neither a JSON file nor a JSON object ({error}). "
            'Example: \'{"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4}\'.'
        ) from error
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(
            f"--model-config must be a JSON object with a `model_type` (llama, qwen2, gpt2, ...), got {config!r}."
        )
    return config


def max_positions(options: TrainOptions) -> int | None:
    """
    The backbone's position range, where it is known before loading: `--model-config`, the default backbone, or a
    `--from-backbone` folder here (GPT-2 calls it `n_positions`); None for a Hub id.
    """
    if options.from_backbone is not None:
        config_file = Path(options.from_backbone) / "config.json"
        if not config_file.is_file():
            return None
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config = config.get("text_config", config)  # a LIME checkpoint: refused below, with its own message
    else:
        config = read_text_config(options.model_config) if options.model_config else DEFAULT_TEXT_CONFIG
    return config.get("max_position_embeddings", config.get("n_positions"))


def check_block_size(block_size: int, max_positions: int | None) -> None:
    """A packed block must fit the backbone's position range (`max_positions`; None: not known)."""
    if block_size < 1 or (max_positions is not None and block_size > max_positions):
        raise ValueError(
            f"--block-size {block_size} is not allowed: it must lie between 1 and the backbone's "
            f"max_position_embeddings ({max_positions})."
        )


def check_streaming_options(options: TrainOptions) -> None:
    """`--shards FOLDER` (no sources) or `--streaming` with one dataset source; no held-out fraction of a stream."""
    if options.shards is not None:
        if options.sources or options.streaming:
            raise ValueError("Give either --shards FOLDER or sources (with --streaming), not both.")
        if not (Path(options.shards) / "manifest.json").is_file():
            raise ValueError(
                f"--shards {options.shards!r} is not a shard folder: it has no manifest.json (write one with "
                "`lime-hf pack`)."
            )
    elif check_sources(options.sources):
        raise ValueError(
            "--streaming reads an annotated or aligned dataset (a `save_to_disk` folder or a `datasets` name), not "
            ".txt files: annotate them first (`lime-hf annotate`), or pack them (`lime-hf pack`) and use --shards."
        )
    if options.tokenizer is None:
        raise ValueError(
            "Streaming needs --tokenizer (for --shards, the LimeTokenizer they were packed with): training a BPE "
            "would read the whole corpus first."
        )
    if options.eval_fraction is not None:
        raise ValueError(
            "A stream has no documents to hold out: give --eval-file instead of --eval-fraction."
        )
    if options.meta_token is not None:
        raise ValueError(
            "--meta-token injects meta-tokens while packing, which a stream does not do here: pack the shards with "
            "them (`lime-hf pack --meta-token`), or train from texts without --shards/--streaming."
        )


def check_meta_token_options(meta_token: str | None, meta_fraction: float | None) -> None:
    """`--meta-token` names a token; `--meta-fraction` goes with it and lies in (0, 1)."""
    if meta_token is not None and not meta_token.strip():
        raise ValueError("--meta-token is empty: give the meta-token's text, e.g. --meta-token '<meta>'")
    if meta_fraction is None:
        return
    if meta_token is None:
        raise ValueError(
            "--meta-fraction sets how many meta-tokens --meta-token injects: add --meta-token '<meta>'"
        )
    if not 0.0 < meta_fraction < 1.0:
        raise ValueError(f"--meta-fraction is meta-tokens per token, in (0, 1): got {meta_fraction}")


def check_saved_tokenizer(
    saved_alignment: str | None, saved_spacy_model: str | None, options: TrainOptions
) -> None:
    """
    `--tokenizer` names a saved LimeTokenizer, which `train` uses as it is: its alignment and spaCy pipeline made
    the tags its model reads. Refuse `--alignment` / `--spacy-model` asking for others rather than ignore them.
    """
    if options.alignment not in (None, saved_alignment):
        raise ValueError(
            f"--alignment {options.alignment} differs from the saved LimeTokenizer's {saved_alignment!r}; "
            "drop --alignment, or pass the base tokenizer to wrap it anew."
        )
    if options.spacy_model not in (None, saved_spacy_model):
        pipeline = repr(saved_spacy_model) if saved_spacy_model else "the default (en_core_web_sm)"
        raise ValueError(
            f"--spacy-model {options.spacy_model} differs from the saved LimeTokenizer's pipeline, {pipeline}, "
            "which tags the texts its way; drop --spacy-model, or pass the base tokenizer to wrap it anew."
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


def check_sample_by(sample_by: str | None, text_files: bool) -> None:
    """`--sample-by` splits .txt files into documents; a dataset's rows are its documents already."""
    if sample_by is not None and not text_files:
        raise ValueError(
            f"--sample-by {sample_by} splits .txt files into documents; a dataset source's rows are its documents: "
            "drop --sample-by"
        )


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
    check_not_adapter(folder, path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path!r} holds no config.json: give a folder written by `save_pretrained`")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    check_lime_model_type(config.get("model_type"), path)
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(
            f"{path!r} holds no weights (model.safetensors): save the model there with `save_pretrained`"
        )
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{path!r} holds no tokenizer.json: save the model's LimeTokenizer there too")
    return config


def check_not_adapter(folder: Path, path: str) -> None:
    """Refuse a PEFT adapter folder where a whole model is needed, saying how to merge it onto its base."""
    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file():
        return
    base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    base_model = (
        f"`AutoModelForCausalLM.from_pretrained({base!r})`" if base else "the model it was trained on"
    )
    raise ValueError(
        f"{path!r} is a PEFT adapter (adapter_config.json), not a whole model: merge it onto its base in Python, "
        f"`PeftModel.from_pretrained(base, {path!r}).merge_and_unload().save_pretrained('merged')` with `base` "
        f"{base_model} (for a LIME retrofit: `LimeForCausalLM.from_backbone(...)` with the arguments it was "
        "trained with), save the tokenizer to 'merged' too, and give 'merged' (docs/training.md, PEFT)"
    )


__all__ = [
    "ALIGNMENTS",
    "DEFAULT_TEXT_CONFIG",
    "FIELDS",
    "SAMPLE_BY",
    "SOURCES_HELP",
    "TrainOptions",
    "check_block_size",
    "check_meta_token_options",
    "check_model_folder",
    "check_not_adapter",
    "check_sample_by",
    "check_saved_tokenizer",
    "check_sources",
    "check_streaming_options",
    "check_train_options",
    "check_utf8_text",
    "max_positions",
    "read_text_config",
]
