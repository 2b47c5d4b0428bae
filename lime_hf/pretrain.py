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

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
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
from .data import ANNOTATION_PREFIX, align_dataset, annotate_dataset, check_column, pack_dataset
from .modeling_lime import LimeForCausalLM
from .options import TrainOptions, check_saved_tokenizer, check_sources
from .tokenization_lime import LimeTokenizer
from .trainer import LimeTrainer, next_token_metrics

logger = logging.get_logger(__name__)

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
) -> Dataset:
    """
    Load raw texts as a dataset with a column `text`, one document per row; empty documents are dropped. The
    spans columns `lime_{field}` of an annotated source are kept.

    Args:
        sources (`list[str]`): either
            - `.txt` files: every paragraph (text between blank lines, line breaks inside kept) is a document,
              so packing puts EOS between paragraphs and annotation parallelises over them;
            - one folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
            - one `datasets` name or folder of data files, read with `load_dataset`.
        dataset_config (`str`, *optional*): the config name of a `load_dataset` source.
        split (`str`, *optional*, defaults to `"train"`): the split of a dataset source.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the text in a dataset source.
        cache_dir (`str`, *optional*): the datasets cache folder.

    The result is disk-backed (in the datasets cache), so every later `map` is cached and other processes of a
    distributed run reuse the main process's work.
    """
    text_files = sources if check_sources(sources) else []
    if text_files:
        texts = load_dataset(
            "text", data_files=text_files, sample_by="paragraph", split="train", cache_dir=cache_dir
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
    parts = texts.train_test_split(test_size=eval_fraction, seed=seed)
    return parts["train"], parts["test"]


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
) -> LimeForCausalLM:
    """
    A new LIME model for `tokenizer`'s fields: a backbone of `model_config` (a JSON file or string; default a tiny
    Llama), or the causal-LM checkpoint `from_backbone` (path or Hub id) retrofitted; with `metadata_shift` (0 LIME,
    1 LIME+1), tag heads of `tag_head_type` for `tag_head_fields`, the metadata joining at decoder layer
    `metadata_layer` and the LM training on `metadata_training_source` tags (see `LimeConfig`).
    """
    lime_kwargs = dict(
        metadata_fields=tokenizer.metadata_fields,
        metadata_shift=metadata_shift,
        tag_head_fields=list(tag_head_fields),
        tag_head_type=tag_head_type,
        metadata_layer=metadata_layer,
        metadata_training_source=metadata_training_source,
    )
    if from_backbone is not None:
        if model_config is not None:
            raise ValueError(
                "Give either --model-config (a new model) or --from-backbone (retrofit), not both."
            )
        model = LimeForCausalLM.from_backbone(from_backbone, **lime_kwargs)
        vocab_size = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the backbone {from_backbone} embeds only "
                f"{vocab_size}: pass the backbone's own tokenizer."
            )
        return model
    text_config = read_text_config(model_config) if model_config else dict(DEFAULT_TEXT_CONFIG)
    text_config.update(
        vocab_size=max(text_config.get("vocab_size", 0), len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LimeConfig(text_config=text_config, **lime_kwargs)
    return LimeForCausalLM(config)


def read_text_config(spec: str) -> dict[str, Any]:
    """A backbone config from a JSON file or an inline JSON object; it must name its `model_type`."""
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


def check_block_size(block_size: int, config: LimeConfig) -> None:
    """A block must fit the backbone's position range."""
    max_positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if block_size < 1 or (max_positions is not None and block_size > max_positions):
        raise ValueError(
            f"--block-size {block_size} is not allowed: it must lie between 1 and the backbone's "
            f"max_position_embeddings ({max_positions})."
        )


# ---- Data ----------------------------------------------------------------------------------------------------


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


def load_train_and_eval_texts(options: TrainOptions, seed: int) -> tuple[Dataset, Dataset | None]:
    """The training documents and the held-out ones (`--eval-file` or `--eval-fraction`), if any."""
    source_options = dict(
        dataset_config=options.dataset_config,
        split=options.split,
        text_column=options.text_column,
        cache_dir=options.cache_dir,
    )
    texts = load_texts(options.sources, **source_options)
    eval_texts = load_texts([options.eval_file], **source_options) if options.eval_file else None
    return split_texts(texts, eval_texts, options.eval_fraction, seed)


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

    Writes to `training_args.output_dir`: the model (safetensors + code files), the tokenizer,
    `train_results.json`, `eval_results.json` (`eval_loss`, `eval_accuracy`, `eval_perplexity`) when there is an
    eval set, the trainer state, and `checkpoint-*` folders every `save_steps`. `callbacks` are passed on to the
    Trainer.
    """
    check_launch(training_args)
    setup_logging(training_args)
    set_seed(training_args.seed)  # before the model is built, so its initialisation is reproducible
    # Processes other than the main one wait here, then find every step below in the datasets cache.
    with training_args.main_process_first(desc="loading texts and the tokenizer"):
        train_texts, eval_texts = load_train_and_eval_texts(options, training_args.seed)
        tokenizer = build_tokenizer(options, train_texts)
    model = build_model(
        tokenizer,
        model_config=options.model_config,
        from_backbone=options.from_backbone,
        metadata_shift=options.metadata_shift,
        tag_head_fields=options.tag_head_fields,
        tag_head_type=options.tag_head_type,
        metadata_layer=options.metadata_layer,
        metadata_training_source=options.metadata_training_source,
    )
    check_block_size(options.block_size, model.config)
    with training_args.main_process_first(desc="annotating, aligning and packing"):
        train_dataset = prepare_lm_dataset(train_texts, tokenizer, options.block_size, options.num_proc)
        eval_dataset = (
            prepare_lm_dataset(eval_texts, tokenizer, options.block_size, options.num_proc)
            if eval_texts is not None
            else None
        )
    logger.info(
        f"{len(train_dataset)} training blocks of {options.block_size} tokens, "
        f"{0 if eval_dataset is None else len(eval_dataset)} eval blocks; model: {model.num_parameters():,} parameters."
    )
    trainer = LimeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorForLime(tokenizer, metadata_dropout=options.metadata_dropout),
        processing_class=tokenizer,
        callbacks=callbacks,
        training_data=[Path(source).name if Path(source).exists() else source for source in options.sources],
        **next_token_metrics(),
    )
    checkpoint = training_args.resume_from_checkpoint or (True if options.resume else None)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    # Model and tokenizer, on the main process; with --push_to_hub also the Hub commit with the model card.
    trainer.save_model()
    trainer.end()
    if trainer.is_world_process_zero():
        print(f"Saved the model, its tokenizer and the metrics to {training_args.output_dir}")


__all__ = ["build_model", "build_tokenizer", "load_texts", "prepare_lm_dataset", "run"]
