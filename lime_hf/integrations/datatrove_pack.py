"""Align and pack a corpus into aligned block shards (`lime_hf.shards`) as a [datatrove](https://github.com/huggingface/datatrove) pipeline.

    ParquetReader (annotated: the `lime_{field}` span columns of `lime-hf annotate`) ─┐
    JsonlReader / ParquetReader (raw text) ─► LimeAnnotate (spaCy) ──────────────────┴─► LimePack ─► blocks/{rank:05d}.parquet

`LimePack` aligns the stored spans to a `LimeTokenizer` and packs blocks exactly as `prepare_lm_dataset` does
(`align_dataset`, then `pack_dataset`: EOS after each document, tags carried along, batches of 1000 documents that
no block spans), then optionally injects meta-tokens (`inject_meta_tokens`, seeded per task). Each task reads its
share of the input files (file `i` goes to task `i % tasks`) and writes one shard of the shard folder:

    OUT/blocks/{rank:05d}.parquet    the task's blocks (`input_ids` and `{field}_ids`); none if it packed no block
    OUT/counts/{rank:05d}.json       written last: the shard's counts and what it was made with
    OUT/manifest.json                written once every task is done: the counts files merged (`finalize_shards`)

So task `r`'s shard equals `prepare_lm_dataset` on task `r`'s documents, in reading order, block for block; with one
task, on the whole corpus.

Resuming is datatrove's: a finished task leaves `completions/{rank:05d}` in the logging folder and is skipped on
the next run; an unfinished one runs again from its first file, deletes its counts file and rewrites its shard
from scratch. `pack_corpus` writes the manifest as soon as every task is complete: at the end of a local or Ray
run, and for Slurm in a one-task job that the job array's success starts (or, when the array has already finished,
right away on rerunning the same call).

Needs `pip install "lime_hf[datatrove]"`.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datatrove.data import DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from transformers import AutoTokenizer

from ..data import ANNOTATION_PREFIX, _Align, _Pack
from ..meta_tokens import check_meta_fraction, inject_meta_tokens
from ..shards import BLOCKS, MANIFEST, Manifest, ShardInfo
from ..tokenization_lime import LimeTokenizer
from .datatrove import LimeAnnotate, _first_record_keys, _folder, build_executor, detect_reader

COUNTS = "counts"
PACK_BATCH = 1000  # documents per packing batch: `pack_dataset`'s default, as `prepare_lm_dataset` packs


def load_pack_tokenizer(tokenizer: Any) -> LimeTokenizer:
    """A saved `LimeTokenizer` (path) or one given as it is; `ValueError` unless it is one with an EOS token."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    if not isinstance(tokenizer, LimeTokenizer):
        raise ValueError(
            f"Packing needs a saved LimeTokenizer, got a {type(tokenizer).__name__}: wrap it with "
            "`LimeTokenizer.from_tokenizer(...)` and `save_pretrained` it first (it decides the alignment and fields)."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("Packing separates documents with EOS, but the tokenizer has no `eos_token`.")
    return tokenizer


def meta_token_id_of(tokenizer: LimeTokenizer, token: str) -> int:
    """The id of the meta-token `token`; `ValueError` unless it is a special token of the tokenizer."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id not in tokenizer.all_special_ids:
        raise ValueError(
            f"The meta-token {token!r} is not a special token of the tokenizer; register it with "
            "`add_meta_tokens(tokenizer, [...])` and save the tokenizer again."
        )
    return token_id


def meta_generator(seed: int, rank: int) -> torch.Generator:
    """The generator of task `rank`'s meta-token positions: one stream per (seed, task), the same on every rerun."""
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])
    )


def pack_documents(
    documents: list[dict[str, Any]],
    tokenizer: LimeTokenizer,
    block_size: int,
    meta_token_id: int | None = None,
    meta_fraction: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, list[list[int]]]:
    """
    One packing batch: documents (`text` and the `lime_{field}` spans) -> blocks of `input_ids` and `{field}_ids`,
    by the functions `align_dataset` and `pack_dataset` map; with `meta_token_id`, meta-tokens injected into each
    block (`inject_meta_tokens` with `generator`, block after block).
    """
    columns = ["input_ids", *(f"{name}_ids" for name in tokenizer.metadata_fields)]
    batch = {"text": [document["text"] for document in documents]}
    for name in tokenizer.metadata_fields:
        batch[ANNOTATION_PREFIX + name] = [document[ANNOTATION_PREFIX + name] for document in documents]
    aligned = _Align(tokenizer, "text", {})(batch)
    blocks = _Pack(block_size, tokenizer.eos_token_id, columns, drop_last=False)(aligned)
    blocks = {column: blocks[column] for column in columns}
    if meta_token_id is None:
        return blocks
    grown = {column: [] for column in columns}
    for row in range(len(blocks["input_ids"])):
        metadata = {column: blocks[column][row] for column in columns[1:]}
        injected = inject_meta_tokens(
            blocks["input_ids"][row], meta_token_id, meta_fraction, metadata=metadata, generator=generator
        )
        for column in columns:
            grown[column].append(injected[column].tolist())
    return grown


class LimePack(PipelineStep):
    """
    datatrove step (the pipeline's last): align annotated documents to a `LimeTokenizer`, pack them into blocks and
    write the task's shard, `{output_folder}/blocks/{rank:05d}.parquet`, then its counts file
    `{output_folder}/counts/{rank:05d}.json` (see the module docstring). Documents of whitespace only are dropped,
    as `load_texts` drops them. Stats: `documents`, `words`, `blocks`, `tokens`.

    Args:
        output_folder: the shard folder (path or fsspec URL).
        tokenizer: a saved `LimeTokenizer`'s path (each task loads it) or a `LimeTokenizer`.
        block_size (`int`): tokens per packed block (before meta-tokens).
        meta_token_id (`int`, *optional*): inject this meta-token into every block (`inject_meta_tokens`).
        meta_fraction (`float`, *optional*, defaults to 0.1): meta-tokens per token, with `meta_token_id`.
        seed (`int`, *optional*, defaults to 0): seeds the meta-token positions (`meta_generator(seed, rank)`).
        batch_size (`int`, *optional*, defaults to 1000): documents per packing batch (`pack_dataset`'s).
    """

    name = "🍋 LIME align and pack"
    type = "🔢 - TOKENIZER"

    def __init__(
        self,
        output_folder: Any,
        tokenizer: Any,
        block_size: int,
        meta_token_id: int | None = None,
        meta_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = PACK_BATCH,
    ):
        super().__init__()
        if block_size < 1 or batch_size < 1:
            raise ValueError(
                f"`block_size` and `batch_size` must be positive, got {block_size} and {batch_size}."
            )
        if meta_token_id is not None:
            check_meta_fraction(meta_fraction, "meta_fraction")
        self.output_folder = get_datafolder(_folder(output_folder))
        self.tokenizer = os.fspath(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer
        self.block_size = block_size
        self.meta_token_id = meta_token_id
        self.meta_fraction = meta_fraction if meta_token_id is not None else 0.0
        self.seed = seed
        self.batch_size = batch_size

    def header(self, tokenizer: LimeTokenizer) -> Manifest:
        """The manifest of these blocks, without shards."""
        meta = self.meta_token_id is not None
        return Manifest.for_tokenizer(
            tokenizer,
            self.block_size,
            meta_token_id=self.meta_token_id,
            meta_fraction=self.meta_fraction,
            meta_seed=self.seed if meta else None,
        )

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tokenizer = load_pack_tokenizer(self.tokenizer)
        header = self.header(tokenizer)
        counts_file, blocks_file = f"{COUNTS}/{rank:05d}.json", f"{BLOCKS}/{rank:05d}.parquet"
        for stale in (counts_file, blocks_file):  # a killed earlier attempt's: this attempt rewrites both
            if self.output_folder.exists(stale):
                self.output_folder.rm(stale)
        generator = meta_generator(self.seed, rank) if self.meta_token_id is not None else None
        schema = pa.schema([(column, pa.list_(pa.int32())) for column in header.columns])
        shard = ShardInfo(blocks_file, blocks=0, tokens=0, documents=0)
        words, file, writer = 0, None, None
        try:
            documents = self.documents(data, list(tokenizer.metadata_fields))
            for batch in iter(lambda: list(itertools.islice(documents, self.batch_size)), []):
                with self.track_time(unit="batch"):
                    blocks = pack_documents(
                        batch, tokenizer, self.block_size, self.meta_token_id, self.meta_fraction, generator
                    )
                    if writer is None:
                        file = self.output_folder.open(blocks_file, "wb")
                        writer = pq.ParquetWriter(file, schema)
                    writer.write_table(pa.table(blocks, schema=schema))
                tokens = sum(map(len, blocks["input_ids"]))
                batch_words = sum(len(document["text"].split()) for document in batch)
                shard.blocks, shard.tokens = shard.blocks + len(blocks["input_ids"]), shard.tokens + tokens
                shard.documents, words = shard.documents + len(batch), words + batch_words
                for stat, value in (("documents", len(batch)), ("words", batch_words)):
                    self.stat_update(stat, value=value)
                self.stat_update("blocks", value=len(blocks["input_ids"]))
                self.stat_update("tokens", value=tokens)
        finally:
            if writer is not None:
                writer.close()
                file.close()
        counts = {
            "rank": rank,
            "world_size": world_size,
            "words": words,
            "shard": asdict(shard) if shard.blocks else None,
            "manifest": asdict(header),
        }
        with self.output_folder.open(counts_file, "w") as handle:
            handle.write(json.dumps(counts, indent=2) + "\n")
        yield from ()

    def documents(self, data: DocumentsPipeline, fields: list[str]) -> Iterator[dict[str, Any]]:
        """Each document with text, as `text` and its `lime_{field}` spans for `fields`."""
        columns = [ANNOTATION_PREFIX + name for name in fields]
        for document in data:
            if not document.text.strip():
                self.stat_update("dropped_empty")
                continue
            if missing := [column for column in columns if column not in document.metadata]:
                raise ValueError(
                    f"Document {document.id!r} has no spans column {missing}: the tokenizer's fields are {fields}; "
                    "annotate them first (`lime-hf annotate --fields ...`) or pack from raw text."
                )
            yield {"text": document.text, **{column: document.metadata[column] for column in columns}}


class FinalizeShards(PipelineStep):
    """datatrove step (a one-task pipeline of its own): `finalize_shards`, for a Slurm job that runs after the
    packing job array has succeeded."""

    name = "🍋 LIME shard manifest"
    type = "💽 - WRITER"

    def __init__(self, output_folder: Any, tasks: int):
        super().__init__()
        self.output_folder = _folder(output_folder)
        self.tasks = tasks

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        finalize_shards(self.output_folder, self.tasks)
        yield from ()


def task_counts(output_folder: Any, tasks: int) -> list[dict[str, Any]]:
    """
    The counts files of the `tasks` tasks of one run, in task order. `RuntimeError` while some task has not
    written its own; `ValueError` when they are not of one run (another number of tasks, tokenizer, block size
    or meta-token settings wrote into the same folder).
    """
    folder = get_datafolder(_folder(output_folder))
    names = [f"{COUNTS}/{rank:05d}.json" for rank in range(tasks)]
    missing = [rank for rank, name in enumerate(names) if not folder.exists(name)]
    if missing:
        raise RuntimeError(
            f"Tasks {missing} of {tasks} have not finished packing into {folder.path}: run the same command (the "
            "same logging folder) again to resume them; the manifest is written once all are done."
        )
    others = sorted(set(folder.list_files(glob_pattern=f"{COUNTS}/*.json")) - set(names))
    records = []
    for name in names:
        with folder.open(name, "r") as handle:
            records.append(json.load(handle))
    headers = {json.dumps(record["manifest"], sort_keys=True) for record in records}
    if others or len(headers) > 1 or any(record["world_size"] != tasks for record in records):
        raise ValueError(
            f"The shards in {folder.path} are not of one run of {tasks} tasks (other counts files: {others[:3]}, "
            f"{len(headers)} different settings): pack into an empty folder."
        )
    return records


def finalize_shards(output_folder: Any, tasks: int) -> Manifest:
    """Merge the `tasks` counts files of `output_folder` into its `manifest.json` (see `task_counts`); returns it."""
    records = task_counts(output_folder, tasks)
    shards = [ShardInfo(**record["shard"]) for record in records if record["shard"] is not None]
    manifest = Manifest(**{**records[0]["manifest"], "shards": shards})
    with get_datafolder(_folder(output_folder)).open(MANIFEST, "w") as handle:
        handle.write(manifest.to_json())
    return manifest


def _is_annotated(reader: PipelineStep, tokenizer: LimeTokenizer) -> bool:
    """Whether the input's first record has the tokenizer's spans columns (all of them; some is an error)."""
    ending = reader.glob_pattern.removeprefix("**/*")
    first = reader.data_folder.list_files(recursive=True, glob_pattern=reader.glob_pattern)[0]
    keys = _first_record_keys(reader.data_folder, first, ending) or []
    columns = [ANNOTATION_PREFIX + name for name in tokenizer.metadata_fields]
    present = [column for column in columns if column in keys]
    if present and present != columns:
        raise ValueError(
            f"{first!r} has the spans columns {present} but not {sorted(set(columns) - set(present))}: the tokenizer's "
            f"fields are {list(tokenizer.metadata_fields)}; annotate the corpus with all of them."
        )
    return bool(present)


def pack_pipeline(
    input_folder: Any,
    output_folder: Any,
    tokenizer: Any,
    block_size: int,
    text_key: str = "text",
    meta_token: str | None = None,
    meta_fraction: float = 0.1,
    seed: int = 0,
    annotate_batch_size: int = 256,
) -> list[PipelineStep]:
    """
    reader -> (`LimeAnnotate` with the tokenizer's annotator, when the input is raw text) -> `LimePack`.

    Args:
        input_folder: `.parquet` or `.jsonl[.gz|.zst]` files (path or fsspec URL): annotated (the `lime_{field}`
            spans columns of every field of the tokenizer, as `lime-hf annotate` writes them) or raw text.
        output_folder, block_size, meta_fraction, seed: see `LimePack`.
        tokenizer: a saved `LimeTokenizer`'s path (or the tokenizer).
        text_key (`str`, *optional*, defaults to `"text"`): the text column.
        meta_token (`str`, *optional*): a special token of the tokenizer to inject (e.g. `"<meta>"`).
        annotate_batch_size (`int`, *optional*, defaults to 256): documents per spaCy batch for raw text.
    """
    loaded = load_pack_tokenizer(tokenizer)
    meta_token_id = meta_token_id_of(loaded, meta_token) if meta_token is not None else None
    reader = detect_reader(input_folder, text_key=text_key)
    annotate = (
        []
        if _is_annotated(reader, loaded)
        else [LimeAnnotate(annotator=loaded.annotator, batch_size=annotate_batch_size)]
    )
    pack = LimePack(output_folder, tokenizer, block_size, meta_token_id, meta_fraction, seed)
    return [reader, *annotate, pack]


def pack_corpus(
    input_folder: Any,
    output_folder: Any,
    tokenizer: Any,
    block_size: int,
    logging_dir: Any,
    executor: str = "local",
    tasks: int = 1,
    workers: int = -1,
    text_key: str = "text",
    meta_token: str | None = None,
    meta_fraction: float = 0.1,
    seed: int = 0,
    **executor_kwargs: Any,
) -> Manifest | None:
    """
    Align and pack the files of `input_folder` into the shard folder `output_folder` (see `pack_pipeline`) on a
    datatrove executor (see `build_executor`), and write its manifest.

    Local and Ray runs block until every task is done, then write the manifest and return it; they raise
    `RuntimeError` naming unfinished tasks otherwise (rerun the same call to resume them). A Slurm run submits the
    job array and, after it, a one-task job that writes the manifest, and returns `None`; rerun the same call
    after a failure to resubmit the unfinished tasks; once all are done, the rerun writes the manifest and returns it.
    """
    pipeline = pack_pipeline(
        input_folder, output_folder, tokenizer, block_size, text_key, meta_token, meta_fraction, seed
    )
    runner = build_executor(pipeline, executor, tasks, workers, logging_dir, **executor_kwargs)
    if executor == "slurm":
        if runner.get_incomplete_ranks():
            finalize_logs = os.path.join(_folder(logging_dir), "finalize")
            finalize = build_executor(
                [FinalizeShards(output_folder, tasks)],
                "slurm",
                1,
                1,
                finalize_logs,
                depends=runner,
                **executor_kwargs,
            )
            finalize.run()  # submits the array first, then the manifest job: afterok on the array
            return None
    else:
        runner.run()
        unfinished = runner.get_incomplete_ranks()
        if unfinished:
            raise RuntimeError(
                f"Tasks {unfinished} of {tasks} did not finish (see the logs in {runner.logging_dir.path}); "
                "run again with the same logging folder to resume them."
            )
    return finalize_shards(output_folder, tasks)


__all__ = [
    "FinalizeShards",
    "LimePack",
    "finalize_shards",
    "pack_corpus",
    "pack_documents",
    "pack_pipeline",
    "task_counts",
]
