"""Pretrain (or continue pretraining) a LIME decoder with `Trainer`: the whole pipeline, start to finish.

    texts (.txt files or a dataset) ─► annotate with spaCy (once, cached) ─► align to the tokenizer
        ─► pack into blocks ─► LimeForCausalLM ─► LimeTrainer ─► output dir: model + tokenizer + metrics

`run(options, training_args)` is the pipeline; its options are a `TrainOptions` (`lime_hf.options`) and a
`TrainingArguments`. The command line that fills both is `lime-hf train` (`lime_hf.cli.train`), also run as
`python examples/pretrain.py ...` or on several processes with `accelerate launch --multi_gpu --num_processes N
examples/pretrain.py ...` / `torchrun --nproc_per_node N ...`:

    lime-hf train emma.txt persuasion.txt --train-tokenizer 8000 --eval-fraction 0.05 \\
        --output-dir lime-austen --max-steps 2000 --per-device-train-batch-size 16

`LimeTrainer` and `next_token_metrics` (`lime_hf/trainer.py`) are reusable with any `Trainer` setup.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging

from .annotation import SpacyAnnotator
from .collator import DataCollatorForLime
from .configuration_lime import LimeConfig
from .data import (
    ANNOTATION_PREFIX,
    CAUSAL_COLUMN,
    align_dataset,
    annotate_dataset,
    check_column,
    pack_dataset,
)
from .meta_tokens import add_meta_tokens, meta_token_count
from .modeling_lime import LimeForCausalLM
from .options import (
    DEFAULT_TEXT_CONFIG,
    TrainOptions,
    check_block_size,
    check_sample_by,
    check_saved_tokenizer,
    check_sources,
    read_text_config,
)
from .tokenization_lime import LimeTokenizer
from .trainer import LimeTrainer, next_token_metrics

logger = logging.get_logger(__name__)

# A local data file given as a source: its suffix -> the `datasets` builder that reads it (one split, "train").
DATA_FILE_BUILDERS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".parquet": "parquet",
}
# Special tokens of a tokenizer trained by --train-tokenizer (GPT-2 style: one token begins and ends texts).
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
BYTE_ALPHABET_SIZE = 256


# ---- Texts ---------------------------------------------------------------------------------------------------


def _has_text(text: str) -> bool:
    """Keep documents with at least one non-whitespace character."""
    return bool(text.strip())


def load_texts(
    sources: list[str],
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    cache_dir: str | None = None,
    sample_by: str | None = None,
) -> Dataset:
    """
    Load raw texts as a dataset with a column `text`, one document per row; empty documents are dropped. The
    spans columns `lime_{field}` of an annotated source are kept.

    Args:
        sources (`list[str]`): either
            - `.txt` files, cut into documents by `sample_by`: by default every paragraph (text between blank
              lines, line breaks inside kept) is a document, so packing puts EOS between paragraphs and annotation
              parallelises over them;
            - one folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
            - one local `.csv`, `.json`, `.jsonl[.gz]` or `.parquet` file;
            - one `datasets` name or folder of data files, read with `load_dataset`.
        dataset_config (`str`, *optional*): the config name of a `load_dataset` source.
        split (`str`, *optional*, defaults to `"train"`): the split of a dataset source.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the text in a dataset source.
        cache_dir (`str`, *optional*): the datasets cache folder.
        sample_by (`str`, *optional*, defaults to `"paragraph"`): what one document of a `.txt` file is: a `"line"`,
            a `"paragraph"` or the whole file (`"document"`), as `datasets`' text loader's `sample_by`.

    The result is disk-backed (in the datasets cache), so every later `map` is cached and other processes of a
    distributed run reuse the main process's work.
    """
    text_files = sources if check_sources(sources) else []
    check_sample_by(sample_by, bool(text_files))
    if text_files:
        texts = load_dataset(
            "text",
            data_files=text_files,
            sample_by=sample_by or "paragraph",
            split="train",
            cache_dir=cache_dir,
        )
    else:
        texts = _load_dataset_source(sources[0], dataset_config, split, cache_dir)
    check_column(texts, text_column, hint="choose the text column with --text-column")
    # Stored spans (`annotate_dataset`, or the datatrove pipeline's Parquet shards) travel along: no re-annotation.
    texts = texts.select_columns(
        [text_column, *(c for c in texts.column_names if c.startswith(ANNOTATION_PREFIX))]
    )
    if text_column != "text":
        texts = texts.rename_column(text_column, "text")
    texts = texts.filter(_has_text, input_columns="text", desc="Dropping empty documents")
    if len(texts) == 0:
        raise ValueError(f"No documents: {sources} hold no text (only empty or whitespace-only paragraphs).")
    return texts


def _load_dataset_source(
    source: str, dataset_config: str | None, split: str, cache_dir: str | None
) -> Dataset:
    """A `save_to_disk` folder or a `load_dataset` source, as the `Dataset` of `split`."""
    folder = Path(source)
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        loaded = load_from_disk(source)
        if not isinstance(loaded, DatasetDict):
            return loaded
        if split not in loaded:
            raise ValueError(f"The saved dataset {source} has no split {split!r}; it has {list(loaded)}.")
        return loaded[split]
    builder = next((name for suffix, name in DATA_FILE_BUILDERS.items() if source.endswith(suffix)), None)
    if builder is not None:  # a local data file, never a Hub id: read by its format's builder
        if not folder.is_file():
            raise ValueError(f"No such data file {source!r}.")
        return load_dataset(builder, data_files=source, split="train", cache_dir=cache_dir)
    if folder.is_file():
        raise ValueError(
            f"{source!r} is a file of a format not read here: give .txt files, or one {', '.join(DATA_FILE_BUILDERS)} "
            "file, a `save_to_disk` folder or a `datasets` name."
        )
    try:
        return load_dataset(source, dataset_config, split=split, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError) as error:  # ConnectionError: not cached, Hub unreachable
        raise ValueError(
            f"Cannot load {source!r}: it is neither a .txt file, a `save_to_disk` folder, nor a dataset that "
            f"`datasets.load_dataset` finds ({type(error).__name__}: {error})."
        ) from error


def split_texts(
    texts: Dataset, eval_texts: Dataset | None, eval_fraction: float | None, seed: int
) -> tuple[Dataset, Dataset | None]:
    """Train and eval documents: the given eval set, or `eval_fraction` of the documents held out (seeded)."""
    if eval_fraction is None:
        return texts, eval_texts
    if eval_texts is not None:
        raise ValueError("Give either --eval-file or --eval-fraction, not both.")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must lie strictly between 0 and 1, got {eval_fraction}.")
    held_out = math.ceil(eval_fraction * len(texts))  # as `train_test_split` rounds it
    if held_out >= len(texts):
        raise ValueError(
            f"--eval-fraction {eval_fraction} of {len(texts)} document(s) leaves none to train on: cut the texts into "
            "more documents (--sample-by line: one per line), or hold out an --eval-file instead."
        )
    parts = texts.train_test_split(test_size=eval_fraction, seed=seed)
    return parts["train"], parts["test"]


def describe_texts(texts: Dataset, sources: Sequence[str], sample_by: str | None) -> str:
    """
    What `load_texts` found, for the user: documents, words and how a .txt source was cut (with a hint when each
    file came out as one document of several lines: a one-sentence-per-line corpus read by paragraph).
    """
    documents, words, lines = len(texts), 0, 0
    for batch in texts.iter(batch_size=1000):
        words += sum(len(text.split()) for text in batch["text"])
        lines += sum(text.strip().count("\n") + 1 for text in batch["text"])
    found = f"{documents:,} document{'s' * (documents != 1)} ({words:,} words) from {', '.join(sources)}"
    if not all(source.endswith(".txt") for source in sources):
        return found
    unit = sample_by or "paragraph"
    text = (
        f"{found}: one per {unit} "
        f"(--sample-by {unit}{'' if sample_by else ', the default'}; line, paragraph or document)"
    )
    if unit == "paragraph" and documents <= len(sources) and lines > documents:
        text += (
            f"\nnote: each file is one paragraph of {lines:,} lines in all, so one document; if each line is a "
            "document (one sentence per line), pass --sample-by line"
        )
    return text


# ---- Tokenizer -----------------------------------------------------------------------------------------------


def train_bpe(texts: Dataset, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE (no prefix space, so `pretokenized` decoding is exact) on `texts`."""
    if vocab_size <= BYTE_ALPHABET_SIZE + 2:
        raise ValueError(
            f"--train-tokenizer {vocab_size} is too small: a byte-level BPE needs more than "
            f"{BYTE_ALPHABET_SIZE + 2} tokens (256 bytes + 2 special tokens) to learn any merge."
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    batches = (batch["text"] for batch in texts.iter(batch_size=1000))
    backend.train_from_iterator(batches, trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def cached_bpe(texts: Dataset, vocab_size: int) -> PreTrainedTokenizerFast:
    """
    `train_bpe`, cached next to the dataset's cache files under the dataset's fingerprint, like a datasets `map`:
    the main process trains and saves it, the other processes (and later runs) load it.
    """
    if not texts.cache_files:
        return train_bpe(texts, vocab_size)
    # `_fingerprint` identifies the dataset's content and transforms; datasets keys its own caches on it.
    folder = Path(texts.cache_files[0]["filename"]).parent / f"lime_bpe_{texts._fingerprint}_{vocab_size}"
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer = train_bpe(texts, vocab_size)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tokenizer(options: TrainOptions, train_texts: Dataset) -> LimeTokenizer:
    """
    The `LimeTokenizer` of `options.tokenizer` (a saved LimeTokenizer, used as it is, or a fast tokenizer to wrap;
    path or Hub id) or a byte-level BPE of `options.train_tokenizer` tokens trained on `train_texts`, wrapped with
    `options.alignment` (default: pretokenized) and `options.spacy_model`.
    """
    if options.tokenizer is not None:
        base = AutoTokenizer.from_pretrained(options.tokenizer)
        if isinstance(base, LimeTokenizer):
            check_saved_tokenizer(base.alignment, base.spacy_model, options)
            return base
    else:
        base = cached_bpe(train_texts, options.train_tokenizer)
        if len(base) < options.train_tokenizer:
            logger.warning(
                f"--train-tokenizer {options.train_tokenizer}: the corpus is too small for that many tokens; the "
                f"BPE learned every merge it offers and has {len(base)} tokens, not {options.train_tokenizer}."
            )
    return LimeTokenizer.from_tokenizer(
        base, alignment=options.alignment or "pretokenized", spacy_model=options.spacy_model
    )


# ---- Model ---------------------------------------------------------------------------------------------------


def build_model(
    tokenizer: LimeTokenizer,
    *,
    model_config: str | None = None,
    from_backbone: str | None = None,
    metadata_shift: int = 0,
    tag_head_fields: Sequence[str] = (),
    tag_head_type: str = "mlp",
    metadata_layer: int = 0,
    metadata_training_source: str = "given",
    predicted_tag_embedding: str = "argmax",
    meta_token_ids: Sequence[int] = (),
) -> LimeForCausalLM:
    """
    A new LIME model for `tokenizer`'s fields: a backbone of `model_config` (a JSON file or string; default a tiny
    Llama), or the causal-LM checkpoint `from_backbone` (path or Hub id) retrofitted; with `metadata_shift` (0 LIME,
    1 LIME+1), tag heads of `tag_head_type` for `tag_head_fields`, the metadata joining at decoder layer
    `metadata_layer`, the LM training on `metadata_training_source` tags and reading the heads' tags as
    `predicted_tag_embedding`, and meta-attention for `meta_token_ids`
    (see `LimeConfig`).
    """
    lime_kwargs = dict(
        metadata_fields=tokenizer.metadata_fields,
        metadata_shift=metadata_shift,
        tag_head_fields=list(tag_head_fields),
        tag_head_type=tag_head_type,
        metadata_layer=metadata_layer,
        metadata_training_source=metadata_training_source,
        predicted_tag_embedding=predicted_tag_embedding,
        meta_token_ids=list(meta_token_ids),
    )
    if from_backbone is not None:
        if model_config is not None:
            raise ValueError(
                "Give either --model-config (a new model) or --from-backbone (retrofit), not both."
            )
        backbone = AutoModelForCausalLM.from_pretrained(from_backbone)
        vocab_size = backbone.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab_size:
            if len(tokenizer) - len(meta_token_ids) > vocab_size:
                raise ValueError(
                    f"The tokenizer has {len(tokenizer)} tokens but the backbone {from_backbone} embeds only "
                    f"{vocab_size}: pass the backbone's own tokenizer."
                )
            backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows for the meta-tokens
        return LimeForCausalLM.from_backbone(backbone, **lime_kwargs)
    text_config = read_text_config(model_config) if model_config else dict(DEFAULT_TEXT_CONFIG)
    text_config.update(
        vocab_size=max(text_config.get("vocab_size", 0), len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LimeConfig(text_config=text_config, **lime_kwargs)
    return LimeForCausalLM(config)


# ---- Data ----------------------------------------------------------------------------------------------------


def block_size_before_meta_tokens(block_size: int, fraction: float) -> int:
    """The longest packed block that, grown by `fraction` of its length in meta-tokens, holds `block_size` tokens."""
    return max(
        length
        for length in range(1, block_size + 1)
        if length + meta_token_count(length, fraction) <= block_size
    )


def prepare_lm_dataset(
    texts: Dataset,
    tokenizer: LimeTokenizer,
    block_size: int,
    num_proc: int = 1,
    annotator: SpacyAnnotator | None = None,
) -> Dataset:
    """
    Turn documents into packed causal-LM blocks carrying every metadata field.

    annotate (`annotate_dataset`, spaCy, cached; skipped when `texts` already has a `lime_{field}` spans column per
    field of the tokenizer and no `annotator` is given) -> align (`align_dataset`) -> pack (`pack_dataset`, EOS after
    each document). Returns `input_ids`, `attention_mask` and `{field}_ids` per block of `block_size` tokens
    (the last block of each packing batch may be shorter; the collator pads it).

    Args:
        texts (`datasets.Dataset`): documents in a `text` column (as `load_texts` returns them).
        tokenizer (`LimeTokenizer`): its fields decide what is annotated; it needs an EOS token.
        block_size (`int`): tokens per block.
        num_proc (`int`, *optional*, defaults to 1): processes for each step.
        annotator (`SpacyAnnotator`, *optional*): defaults to `tokenizer.annotator` (the tokenizer's fields).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("Packing separates documents with EOS, but the tokenizer has no `eos_token`.")
    annotated = texts
    if annotator is not None or not all(
        ANNOTATION_PREFIX + f in texts.column_names for f in tokenizer.metadata_fields
    ):
        annotated = annotate_dataset(
            texts, annotator=annotator if annotator is not None else tokenizer.annotator, num_proc=num_proc
        )
    aligned = align_dataset(annotated, tokenizer, num_proc=num_proc)
    return pack_dataset(aligned, block_size, eos_token_id=tokenizer.eos_token_id, num_proc=num_proc)


# ---- The script ----------------------------------------------------------------------------------------------


def load_train_and_eval_texts(
    options: TrainOptions, seed: int, report: bool = False
) -> tuple[Dataset, Dataset | None]:
    """
    The training documents and the held-out ones (`--eval-file` or `--eval-fraction`), if any; with `report`,
    print what was found (documents, words, how .txt files were cut).
    """
    source_options = dict(
        dataset_config=options.dataset_config,
        split=options.split,
        text_column=options.text_column,
        cache_dir=options.cache_dir,
        sample_by=options.sample_by,
    )
    texts = load_texts(options.sources, **source_options)
    eval_texts = load_texts([options.eval_file], **source_options) if options.eval_file else None
    train_texts, eval_texts = split_texts(texts, eval_texts, options.eval_fraction, seed)
    if report:
        print(f"Read {describe_texts(texts, options.sources, options.sample_by)}")
        if options.eval_file:
            print(f"Held out {describe_texts(eval_texts, [options.eval_file], options.sample_by)}")
        elif eval_texts is not None:
            print(
                f"Held out {len(eval_texts):,} of them for evaluation (--eval-fraction {options.eval_fraction})"
            )
    return train_texts, eval_texts


def count_tokens(blocks: Dataset) -> int:
    """The tokens packed into `blocks` (the last block of a packing batch may be short), from the Arrow lengths."""
    return pc.sum(pc.list_value_length(blocks.data.column("input_ids"))).as_py() or 0


def check_launch(training_args: TrainingArguments) -> None:
    """Refuse to run when the launcher's processes would not train one model together."""
    launched = os.environ.get("WORLD_SIZE")
    if launched is not None and int(launched) != training_args.world_size:
        raise ValueError(
            f"The launcher started {launched} processes, but the Trainer sees a world of {training_args.world_size}, "
            "so each process would train its own model into the same folder. On machines without GPUs, add "
            "--use_cpu to train on CPU processes that communicate through gloo."
        )


def setup_logging(training_args: TrainingArguments) -> None:
    """The main process logs at `--log_level` (library default: warnings), replicas at `--log_level_replica`."""
    log_level = training_args.get_process_log_level()
    logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)


def run(
    options: TrainOptions,
    training_args: TrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> None:
    """
    Pretrain with `options` (checked with `lime_hf.options.check_train_options`) and `training_args`.

    Writes to `training_args.output_dir`: the model (safetensors + code files), the tokenizer, its model card
    (`README.md`), `train_results.json`, `eval_results.json` (`eval_loss`, `eval_accuracy`, `eval_perplexity`, with
    heads `eval_{field}_tag_accuracy`, and `eval_metadata_source`: the tags they were measured with) when there is
    an eval set, the trainer state, and `checkpoint-*` folders every `save_steps`. `callbacks` are passed on to the
    Trainer.
    """
    check_launch(training_args)
    setup_logging(training_args)
    set_seed(training_args.seed)  # before the model is built, so its initialisation is reproducible
    if options.shards is not None or options.streaming:
        from .streaming import streaming_trainer

        trainer, evaluate = streaming_trainer(options, training_args, callbacks)
    else:
        trainer, evaluate = map_trainer(options, training_args, callbacks)
    train_and_save(trainer, training_args, options.resume, evaluate)


def build_model_for(
    options: TrainOptions, tokenizer: LimeTokenizer, meta_token_ids: Sequence[int] = ()
) -> LimeForCausalLM:
    """`build_model` with the model options of `options`."""
    return build_model(
        tokenizer,
        model_config=options.model_config,
        from_backbone=options.from_backbone,
        metadata_shift=options.metadata_shift,
        tag_head_fields=options.tag_head_fields,
        tag_head_type=options.tag_head_type,
        metadata_layer=options.metadata_layer,
        metadata_training_source=options.metadata_training_source,
        predicted_tag_embedding=options.predicted_tag_embedding,
        meta_token_ids=list(meta_token_ids),
    )


def check_model_block_size(block_size: int, model: LimeForCausalLM) -> None:
    """`check_block_size` against the built model's position range."""
    check_block_size(block_size, getattr(model.config.get_text_config(), "max_position_embeddings", None))


def training_data(sources: Sequence[str]) -> list[str]:
    """The training sources' names, for the model card."""
    return [Path(source).name if Path(source).exists() else source for source in sources]


def spacy_source(tokenizer: LimeTokenizer, texts: Dataset | None = None) -> str:
    """The tags the pipeline trains and evaluates on, for the results (`eval_metadata_source`): causal when the
    annotated `texts` say so (`lime_causal`), whole-document when spaCy runs here; `None`: as annotated before."""
    model = tokenizer.spacy_model or "en_core_web_sm"
    if texts is None:
        return f"spaCy {model}, as annotated before packing"
    causal = CAUSAL_COLUMN in (texts.column_names or [])
    return f"spaCy {model}, " + ("causal (prefix-only)" if causal else "whole document")


def map_trainer(
    options: TrainOptions, training_args: TrainingArguments, callbacks: list[TrainerCallback] | None
) -> tuple[LimeTrainer, bool]:
    """The trainer on the whole corpus annotated, aligned and packed by `datasets.map`; and whether to evaluate."""
    # Processes other than the main one wait here, then find every step below in the datasets cache.
    with training_args.main_process_first(desc="loading texts and the tokenizer"):
        train_texts, eval_texts = load_train_and_eval_texts(
            options, training_args.seed, report=training_args.process_index == 0
        )
        tokenizer = build_tokenizer(options, train_texts)
    meta_token_ids = add_meta_tokens(tokenizer, [options.meta_token]) if options.meta_token else []
    meta_fraction = 0.1 if options.meta_fraction is None else options.meta_fraction
    model = build_model_for(options, tokenizer, meta_token_ids)
    check_model_block_size(options.block_size, model)
    packed_size = options.block_size
    if meta_token_ids:
        packed_size = block_size_before_meta_tokens(options.block_size, meta_fraction)
        if training_args.process_index == 0:
            print(
                f"Meta-token {options.meta_token!r} (id {meta_token_ids[0]}): {meta_fraction:g} of each block, at "
                f"random positions; blocks of {packed_size} tokens grow to at most {options.block_size}."
            )
    with training_args.main_process_first(desc="annotating, aligning and packing"):
        train_dataset = prepare_lm_dataset(train_texts, tokenizer, packed_size, options.num_proc)
        eval_dataset = (
            prepare_lm_dataset(eval_texts, tokenizer, packed_size, options.num_proc)
            if eval_texts is not None
            else None
        )
    if training_args.process_index == 0:
        held_out = (
            ""
            if eval_dataset is None
            else (f"; eval: {count_tokens(eval_dataset):,} tokens in {len(eval_dataset):,} blocks")
        )
        print(
            f"Packed {count_tokens(train_dataset):,} training tokens into {len(train_dataset):,} blocks of up to "
            f"{options.block_size}{held_out}; model: {model.num_parameters():,} parameters"
        )
    trainer = LimeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorForLime(
            tokenizer,
            metadata_dropout=options.metadata_dropout,
            meta_token_id=meta_token_ids[0] if meta_token_ids else None,
            meta_fraction=meta_fraction,
        ),
        processing_class=tokenizer,
        callbacks=callbacks,
        training_data=training_data(options.sources),
        metadata_source=spacy_source(tokenizer, eval_texts if eval_texts is not None else train_texts),
        **next_token_metrics(),
    )
    return trainer, eval_dataset is not None


def train_and_save(
    trainer: LimeTrainer, training_args: TrainingArguments, resume: bool, evaluate: bool
) -> None:
    """Train (from the latest checkpoint with `resume`), evaluate when there is an eval set, save everything."""
    checkpoint = training_args.resume_from_checkpoint or (True if resume else None)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    if evaluate:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    # Model and tokenizer, on the main process; with --push_to_hub also the Hub commit with the model card.
    trainer.save_model()
    trainer.create_model_card()  # README.md: the LIME card, with the latest evaluation and its tag source
    trainer.end()
    if trainer.is_world_process_zero():
        print(f"Saved the model, its tokenizer and the metrics to {training_args.output_dir}")


__all__ = ["build_model", "build_tokenizer", "load_texts", "prepare_lm_dataset", "run"]
