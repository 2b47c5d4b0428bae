"""Streaming training: blocks read as training needs them, from a shard folder or packed on the fly.

    shard folder (`lime-hf pack`, `write_shards`)  ─► shard_stream ─┐
    annotated / aligned dataset (Arrow or streamed) ─► document_stream ─┴► BlockStream ─► StreamingLimeTrainer

A `BlockStream` cuts its source into *units* (row ranges of the shard files, or batches of documents) and lays them
out for `datasets.distributed.split_dataset_by_node`: unit `i * world_size + r` belongs to rank `r`, so each rank
reads only its own units and, within a rank, each dataloader worker its own units (`datasets` gives worker `w` of
`n` the units `w::n`). Blocks are disjoint and complete across ranks and workers:

- a shard folder is cut into `world_size` contiguous, equal ranges of blocks (a rank reads about `1 / world_size`
  of every file's rows, seeking by row group); the last `total % world_size` blocks are dropped, so that every
  rank holds the same number of blocks and DDP ranks never run out at different steps;
- documents are packed `pack_batch_size` documents at a time, as `prepare_lm_dataset` packs them (same
  `_Align` and `_Pack` functions, same batches: same blocks); the batches go to the ranks in turn, so ranks differ
  by at most one batch of documents. Nothing is dropped.

Resuming (`--resume`) starts every unit at its first unseen block: `BlockStream.resume_skips` replays the
dataloader's order (each worker batches its own units; the `DataLoader` takes one batch per live worker in turn)
from the global step alone. A shard folder's block counts are in its manifest, so nothing read before is read
again; documents are aligned and packed again (no training) to count the blocks of the units this rank consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from datasets import Dataset, Features, IterableDataset, List, Value, load_dataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from transformers import TrainerCallback, TrainingArguments

from .collator import DataCollatorForLime
from .data import ANNOTATION_PREFIX, _Align, _Pack
from .options import TrainOptions
from .shards import MANIFEST, Manifest, check_manifest
from .trainer import LimeTrainer, next_token_metrics

# Documents per packing batch: `pack_dataset`'s default, so that the blocks are its blocks.
PACK_BATCH_SIZE = 1000
READ_BATCH_SIZE = 256  # Parquet rows decoded at a time


# ---- Readers: one unit -> its blocks --------------------------------------------------------------------------


def _block(row: dict[str, list[int]]) -> dict[str, list[int]]:
    """A block as `pack_dataset` returns it: every column, and an all-ones attention mask."""
    return {**row, "attention_mask": [1] * len(row["input_ids"])}


class _ShardReader:
    """Picklable: a unit of a shard folder (pieces `(file, start, stop)` of block rows) -> its blocks."""

    def __init__(self, columns: list[str]):
        self.columns = columns

    def __call__(self, unit: tuple[tuple[str, int, int], ...], skip: int) -> Iterator[dict[str, list[int]]]:
        for file, start, stop in unit:
            if skip >= stop - start:
                skip -= stop - start
                continue
            yield from _read_rows(file, start + skip, stop, self.columns)
            skip = 0

    def count(self, unit: tuple[tuple[str, int, int], ...]) -> int:
        return sum(stop - start for _, start, stop in unit)


def _read_rows(file: str, start: int, stop: int, columns: list[str]) -> Iterator[dict[str, list[int]]]:
    """Rows `[start, stop)` of a Parquet file, decoding only the row groups that hold them."""
    parquet = pq.ParquetFile(file)
    groups, position, first = [], 0, None
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if position < stop and position + rows > start:
            groups.append(group)
            first = position if first is None else first
        position += rows
    if not groups:
        return
    row = first
    for batch in parquet.iter_batches(batch_size=READ_BATCH_SIZE, row_groups=groups, columns=columns):
        data = batch.to_pydict()
        for index in range(max(start - row, 0), min(stop - row, batch.num_rows)):
            yield _block({column: data[column][index] for column in columns})
        row += batch.num_rows
        if row >= stop:
            return


class _DocumentPacker:
    """
    Picklable: a unit of documents -> its blocks, aligned (when the rows hold `lime_{field}` spans) and packed with
    the map path's own functions. A unit is `(start, stop)` rows of a `Dataset`, or `(index, num_shards)`: that
    shard of an `IterableDataset`, packed `batch_size` documents at a time.
    """

    def __init__(self, source: Dataset | IterableDataset, tokenizer: Any, block_size: int, batch_size: int):
        self.source = source
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.aligned = "input_ids" in source.column_names
        self.align = None if self.aligned else _Align(tokenizer, "text", {})

    def batches(self, unit: tuple[int, int]) -> Iterator[dict[str, list]]:
        if isinstance(self.source, Dataset):
            start, stop = unit
            if start < stop:
                yield self.source[start:stop]
        elif unit[1]:  # `(index, num_shards)`; `(0, 0)` pads the units to a multiple of the world size
            index, num_shards = unit
            yield from self.source.shard(num_shards, index).iter(batch_size=self.batch_size)

    def blocks(self, unit: tuple[int, int]) -> Iterator[dict[str, list[int]]]:
        for batch in self.batches(unit):
            if not self.aligned:
                batch = self.align(batch)
            columns = ["input_ids", *(c for c in batch if c.endswith("_ids") and c != "input_ids")]
            packed = _Pack(self.block_size, self.tokenizer.eos_token_id, columns, drop_last=False)(batch)
            for row in range(len(packed["input_ids"])):
                yield {column: packed[column][row] for column in packed}

    def __call__(self, unit: tuple[int, int], skip: int) -> Iterator[dict[str, list[int]]]:
        for index, block in enumerate(self.blocks(unit)):
            if index >= skip:
                yield block

    def count(self, unit: tuple[int, int]) -> int:
        return sum(1 for _ in self.blocks(unit))


def _generate(units: list[tuple[Any, int]], reader: Callable) -> Iterator[dict[str, list[int]]]:
    """`IterableDataset.from_generator`'s function: the blocks of `units` (each with the blocks to skip)."""
    for entry in units:
        if entry is not None:  # another rank's slot, or padding
            yield from reader(*entry)


# ---- Streams ---------------------------------------------------------------------------------------------------


@dataclass
class BlockStream:
    """
    A training corpus read as it is needed: its units, laid out for `world_size` ranks (unit `i * world_size + r`
    is rank `r`'s `i`-th), the reader that turns a unit into blocks, and the blocks' features.

    `dataset(rank)` is rank `rank`'s `datasets.IterableDataset` (through `split_dataset_by_node`); with `skips`
    (unit index -> blocks already trained on, from `resume_skips`) each unit starts at its first unseen block.
    """

    units: list[Any]
    reader: Any  # `_ShardReader` or `_DocumentPacker`: `reader(unit, skip)` and `reader.count(unit)`
    features: Features
    world_size: int = 1
    manifest: Manifest | None = None
    fields: dict[str, list[str]] | None = None

    def dataset(self, rank: int = 0, num_workers: int = 0, resume: _Resume | None = None) -> IterableDataset:
        """
        Rank `rank`'s blocks, for a `DataLoader` of `num_workers` workers; `resume` (from `resume_at`) starts each
        unit at its first unseen block and the workers' turn where the interrupted run left it.
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"`rank` must lie in [0, {self.world_size}) for this stream, got {rank}.")
        resume = resume or _Resume({}, 0)
        layout = self.worker_units(rank, num_workers)
        workers, rounds = len(layout), max(map(len, layout))
        # DataLoader worker p reads the units of worker (p + first) % n: the loader's turn goes on where it stopped.
        shifted = [layout[(p + resume.first_worker) % workers] for p in range(workers)]
        order = [units[i] if i < len(units) else None for i in range(rounds) for units in shifted]
        # Only this rank's slots are filled: `split_dataset_by_node` gives rank r the units r::world_size, and
        # datasets gives dataloader worker p of n the rank's units p::n.
        units: list[tuple[Any, int] | None] = [None] * (len(order) * self.world_size)
        for position, index in enumerate(order):
            if index is not None:
                units[position * self.world_size + rank] = (self.units[index], resume.skips.get(index, 0))
        stream = IterableDataset.from_generator(
            _generate, features=self.features, gen_kwargs={"units": units, "reader": self.reader}
        )
        return split_dataset_by_node(stream, rank=rank, world_size=self.world_size)

    def worker_units(self, rank: int, num_workers: int) -> list[list[int]]:
        """The unit indices each dataloader worker of `rank` reads, in order (one list for `num_workers=0`)."""
        mine = list(range(rank, len(self.units), self.world_size))
        workers = max(num_workers, 1)
        return [mine[worker::workers] for worker in range(workers)]

    def resume_at(self, rank: int, batches: int, batch_size: int, num_workers: int = 0) -> _Resume:
        """
        Where rank `rank` stands after `batches` batches of `batch_size`, replaying the `DataLoader`: each worker
        batches its own units (a short batch at its end), and the loader takes one batch per live worker in turn.
        Block counts come from the reader (a manifest's are free; documents are packed again to count them).
        """
        layout = self.worker_units(rank, num_workers)
        workers = [_Counted(self.reader, [self.units[index] for index in units]) for units in layout]
        taken, round_, first = [0] * len(workers), 0, 0
        while batches > 0:
            live = [w for w, worker in enumerate(workers) if worker.more_than(round_ * batch_size)]
            if not live:
                break  # the stream is spent: the Trainer's next epoch reads it again from the start
            for w in live[:batches]:
                taken[w] += 1
            first = live[batches] if batches < len(live) else 0
            batches -= min(len(live), batches)
            round_ += 1
        skips = {}
        for units, worker, count in zip(layout, workers, taken, strict=True):
            consumed = count * batch_size
            for index, blocks in zip(units, worker.counts(consumed), strict=False):
                skips[index] = min(consumed, blocks)
                consumed -= skips[index]
        return _Resume({index: skip for index, skip in skips.items() if skip}, first)


@dataclass
class _Resume:
    """Blocks already read per unit index, and the dataloader worker whose turn is next."""

    skips: dict[int, int]
    first_worker: int


class _Counted:
    """A worker's units with their block counts, counted only as far as they are asked for."""

    def __init__(self, reader: Any, units: list[Any]):
        self.reader, self.units, self.sizes = reader, units, []

    def more_than(self, blocks: int) -> bool:
        while sum(self.sizes) <= blocks and len(self.sizes) < len(self.units):
            self.sizes.append(self.reader.count(self.units[len(self.sizes)]))
        return sum(self.sizes) > blocks

    def counts(self, blocks: int) -> list[int]:
        """The block counts of the units that hold the first `blocks` blocks."""
        self.more_than(blocks)
        return self.sizes


def _block_features(columns: Sequence[str]) -> Features:
    return Features(
        {column: List(Value("int32")) for column in columns} | {"attention_mask": List(Value("int8"))}
    )


def shard_stream(
    folder: str | Path,
    tokenizer: Any,
    fields: dict[str, list[str]] | None = None,
    world_size: int = 1,
    num_workers: int = 0,
) -> BlockStream:
    """
    Stream the blocks of a shard folder (`lime-hf pack`, `write_shards`), checked before any block is read.

    Args:
        folder (`str` or `Path`): the shard folder (`manifest.json`, `blocks/*.parquet`).
        tokenizer (`LimeTokenizer`): the tokenizer the blocks must have been made with.
        fields (`dict`, *optional*): the model's `config.metadata_fields`, which the shards' inventories must equal.
        world_size (`int`, *optional*, defaults to 1): training processes; each reads `total // world_size` blocks,
            a contiguous range (the last `total % world_size` blocks are left out).
        num_workers (`int`, *optional*, defaults to 0): dataloader workers per process; each rank's range is cut
            into that many units, one per worker.
    """
    manifest = Manifest.load(folder)
    check_manifest(manifest, tokenizer, fields)
    files, sizes = manifest.files(folder), [shard.blocks for shard in manifest.shards]
    per_rank, pieces = sum(sizes) // world_size, max(num_workers, 1)
    if per_rank < pieces:
        raise ValueError(
            f"{folder} holds {sum(sizes)} blocks: too few for {world_size} process(es) with {pieces} unit(s) each."
        )
    ranges = [
        [_cut(rank * per_rank, per_rank, pieces, piece) for piece in range(pieces)]
        for rank in range(world_size)
    ]
    # Unit i * world_size + r is rank r's i-th: the layout `split_dataset_by_node` reads.
    units = [
        _pieces(files, sizes, *ranges[rank][piece]) for piece in range(pieces) for rank in range(world_size)
    ]
    return BlockStream(
        units=units,
        reader=_ShardReader(manifest.columns),
        features=_block_features(manifest.columns),
        world_size=world_size,
        manifest=manifest,
        fields=manifest.fields,
    )


def _cut(start: int, length: int, pieces: int, piece: int) -> tuple[int, int]:
    """The `piece`-th of `pieces` near-equal contiguous parts of `[start, start + length)`."""
    return start + length * piece // pieces, start + length * (piece + 1) // pieces


def _pieces(files: list[str], sizes: list[int], start: int, stop: int) -> tuple[tuple[str, int, int], ...]:
    """Global block rows `[start, stop)` as `(file, first row, end row)` pieces of the files."""
    pieces, offset = [], 0
    for file, size in zip(files, sizes, strict=True):
        low, high = max(start, offset), min(stop, offset + size)
        if low < high:
            pieces.append((file, low - offset, high - offset))
        offset += size
    return tuple(pieces)


def document_stream(
    source: Dataset | IterableDataset,
    tokenizer: Any,
    block_size: int,
    world_size: int = 1,
    pack_batch_size: int = PACK_BATCH_SIZE,
) -> BlockStream:
    """
    Stream blocks aligned and packed on the fly from annotated documents (a `text` column and a `lime_{field}`
    spans column per field of `tokenizer`) or aligned ones (`input_ids` and `{field}_ids`).

    A `Dataset` (memory-mapped Arrow: `load_from_disk`, `load_dataset`) is packed `pack_batch_size` documents at a
    time, as `prepare_lm_dataset` packs it: the same blocks, in the same order on one process. An
    `IterableDataset` (`load_dataset(..., streaming=True)`) is packed shard by shard (`source.n_shards`), the last
    batch of each shard packed on its own.

    Args:
        source (`Dataset` or `IterableDataset`): the documents.
        tokenizer (`LimeTokenizer`): aligns the spans; its EOS separates documents.
        block_size (`int`): tokens per block.
        world_size (`int`, *optional*, defaults to 1): training processes; batches of documents (`Dataset`) or
            shards (`IterableDataset`) go to the ranks in turn.
        pack_batch_size (`int`, *optional*, defaults to 1000): documents per packing batch.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("Packing separates documents with EOS, but the tokenizer has no `eos_token`.")
    columns = source.column_names or []
    if "input_ids" not in columns:
        spans = [ANNOTATION_PREFIX + name for name in tokenizer.metadata_fields]
        missing = [column for column in ["text", *spans] if column not in columns]
        if missing:
            raise ValueError(
                f"The documents have no column(s) {missing}; they have {columns}. Stream annotated documents (`text` "
                "and a `lime_{field}` spans column per field: `lime-hf annotate`) or aligned ones (`input_ids` and "
                "`{field}_ids`)."
            )
    if isinstance(source, Dataset):
        starts = range(0, len(source), pack_batch_size)
        units = [(start, min(start + pack_batch_size, len(source))) for start in starts]
    else:
        units = [(index, source.n_shards) for index in range(source.n_shards)]
    units += [(0, 0)] * (
        -len(units) % world_size
    )  # empty units  # a multiple of world_size; a rank may get one unit fewer
    reader = _DocumentPacker(source, tokenizer, block_size, pack_batch_size)
    field_columns = [f"{name}_ids" for name in tokenizer.metadata_fields]
    return BlockStream(
        units=units,
        reader=reader,
        features=_block_features(["input_ids", *field_columns]),
        world_size=world_size,
        fields=dict(tokenizer.metadata_fields),
    )


# ---- Training --------------------------------------------------------------------------------------------------


class StreamingLimeTrainer(LimeTrainer):
    """
    `LimeTrainer` on a `BlockStream`: each process reads its own share, and resuming starts at the next unseen
    block without reading what was trained on.

    `Trainer` hands an `IterableDataset` to accelerate, which would dispatch it from the main process
    (`dispatch_batches`, its default for iterables) or shard it again (`IterableDataset.shard` or
    `IterableDatasetShard`). This trainer's dataset is already this rank's share (`split_dataset_by_node`), so its
    dataloader is prepared for one process: no dispatching, no second split; batches still go to the device.
    `--max-steps` is required (a stream has no length).

    Args:
        train_stream (`BlockStream`): from `shard_stream` or `document_stream`, for `args.world_size` processes.
        Others: as `LimeTrainer` (no `train_dataset`).
    """

    def __init__(self, *args, train_stream: BlockStream, **kwargs):
        if "train_dataset" in kwargs:
            raise ValueError("`StreamingLimeTrainer` reads `train_stream`; do not pass a `train_dataset`.")
        self.train_stream = train_stream
        super().__init__(*args, **kwargs)
        if train_stream.world_size != self.args.world_size:
            raise ValueError(
                f"The stream is laid out for {train_stream.world_size} process(es), but this run has "
                f"{self.args.world_size}: build it with `world_size=args.world_size`."
            )
        if self.args.max_steps <= 0:
            raise ValueError(
                "Streaming training needs --max-steps: a stream has no length to count epochs in."
            )
        model_fields = getattr(self.model.config, "metadata_fields", None)
        if model_fields is not None and train_stream.fields != {k: list(v) for k, v in model_fields.items()}:
            name = next(
                name
                for name in sorted(set(train_stream.fields) | set(model_fields))
                if train_stream.fields.get(name)
                != (list(model_fields[name]) if name in model_fields else None)
            )
            raise ValueError(
                f"The stream's metadata fields differ from the model's, first in {name!r}: the stream has "
                f"{train_stream.fields.get(name)}, the model {model_fields.get(name)}. Stream blocks made with the "
                "model's tokenizer."
            )
        self.train_dataset = train_stream.dataset(self.args.process_index, self.args.dataloader_num_workers)

    def get_train_dataloader(self) -> DataLoader:
        return self._stream_dataloader(self.train_dataset)

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        rank, workers = self.args.process_index, self.args.dataloader_num_workers
        resume = self.train_stream.resume_at(rank, num_batches, self._train_batch_size, workers)
        return self._stream_dataloader(self.train_stream.dataset(rank, workers, resume))

    def _stream_dataloader(self, dataset: IterableDataset) -> DataLoader:
        from accelerate.data_loader import prepare_data_loader

        loader = DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            collate_fn=self._get_collator_with_removed_columns(self.data_collator, description="training"),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers
            and self.args.dataloader_num_workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor,
        )
        # One process's view: accelerate neither dispatches nor re-shards this rank's share.
        return prepare_data_loader(
            loader,
            device=self.args.device,
            num_processes=1,
            process_index=0,
            put_on_device=True,
            dispatch_batches=False,
            non_blocking=self.args.accelerator_config.non_blocking,
        )


# ---- The script (`lime-hf train --shards FOLDER` / `--streaming`) ------------------------------------------------


def streaming_trainer(
    options: TrainOptions, training_args: TrainingArguments, callbacks: list[TrainerCallback] | None = None
) -> tuple[StreamingLimeTrainer, bool]:
    """`lime_hf.pretrain.run`'s trainer for `--shards` or `--streaming`, and whether there is an eval set."""
    from .pretrain import (
        build_model_for,
        build_tokenizer,
        check_model_block_size,
        spacy_source,
        training_data,
    )

    if training_args.max_steps <= 0:
        raise ValueError("Streaming training needs --max-steps N: a stream has no length to count epochs in.")
    tokenizer = build_tokenizer(options, None)
    # Shards packed with meta-tokens (`lime-hf pack --meta-token`) give the model meta-attention for them.
    manifest = Manifest.load(options.shards) if options.shards is not None else None
    meta_token_ids = [manifest.meta_token_id] if manifest and manifest.meta_token_id is not None else []
    model = build_model_for(options, tokenizer, meta_token_ids)
    world_size = training_args.world_size
    if options.shards is not None:
        stream = shard_stream(
            options.shards,
            tokenizer,
            model.config.metadata_fields,
            world_size=world_size,
            num_workers=training_args.dataloader_num_workers,
        )
        block_size = stream.manifest.block_size
    else:
        block_size = options.block_size
        stream = document_stream(load_documents(options), tokenizer, block_size, world_size=world_size)
    check_model_block_size(block_size, model)
    eval_dataset = None
    if options.eval_file is not None:
        with training_args.main_process_first(desc="preparing the eval set"):
            eval_dataset = eval_blocks(options, tokenizer, block_size)
    trainer = StreamingLimeTrainer(
        model=model,
        args=training_args,
        train_stream=stream,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorForLime(tokenizer, metadata_dropout=options.metadata_dropout),
        processing_class=tokenizer,
        callbacks=callbacks,
        training_data=training_data([options.shards] if options.shards else options.sources),
        metadata_source=spacy_source(tokenizer),
        **next_token_metrics(),
    )
    return trainer, eval_dataset is not None


def load_documents(options: TrainOptions) -> Dataset | IterableDataset:
    """
    The documents of `--streaming`'s source: a `save_to_disk` folder (memory-mapped, not loaded) or a `datasets`
    name or data folder, read with `load_dataset(..., streaming=True)`. Empty texts are dropped, as `load_texts`
    drops them.
    """
    from .pretrain import _has_text, _load_dataset_source

    source = options.sources[0]
    folder = Path(source)
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        documents = _load_dataset_source(source, None, options.split, options.cache_dir)
    else:
        documents = load_dataset(
            source, options.dataset_config, split=options.split, streaming=True, cache_dir=options.cache_dir
        )
    columns = documents.column_names or []
    if options.text_column in columns and options.text_column != "text":
        documents = documents.rename_column(options.text_column, "text")
    if "input_ids" not in columns and "text" in (documents.column_names or []):
        keep = ["text", *(c for c in documents.column_names if c.startswith(ANNOTATION_PREFIX))]
        documents = documents.select_columns(keep).filter(_has_text, input_columns="text")
    return documents


def eval_blocks(options: TrainOptions, tokenizer: Any, block_size: int) -> Dataset:
    """The held-out blocks of `--eval-file`: a shard folder's (small: read whole), or texts annotated, aligned and
    packed like the map path's."""
    from .pretrain import load_texts, prepare_lm_dataset

    if (Path(options.eval_file) / MANIFEST).is_file():
        manifest = Manifest.load(options.eval_file)
        check_manifest(manifest, tokenizer)
        return Dataset.from_parquet(manifest.files(options.eval_file), cache_dir=options.cache_dir)
    texts = load_texts(
        [options.eval_file],
        dataset_config=options.dataset_config,
        split=options.split,
        text_column=options.text_column,
        cache_dir=options.cache_dir,
    )
    return prepare_lm_dataset(texts, tokenizer, block_size, options.num_proc)


__all__ = ["BlockStream", "StreamingLimeTrainer", "document_stream", "shard_stream", "streaming_trainer"]
