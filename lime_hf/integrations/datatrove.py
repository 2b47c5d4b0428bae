"""Annotate a corpus at pretraining scale as a [datatrove](https://github.com/huggingface/datatrove) pipeline.

    JsonlReader / ParquetReader ─► LimeAnnotate (spaCy, the `annotate_dataset` function) ─► ParquetWriter

The same pipeline runs on datatrove's `LocalPipelineExecutor`, `SlurmPipelineExecutor` and
`RayPipelineExecutor`. Each task reads its share of the input files (file `i` goes to task `i % tasks`) and
writes one Parquet file, `000_{rank:05d}.parquet`, with the columns `id`, `text` and one spans column
`lime_{field}` per field, typed as `annotate_dataset` types them. The folder loads with
`datasets.load_dataset("parquet", data_dir=...)` (or `lime-hf train FOLDER`) and goes straight to `align_dataset`
or `prepare_lm_dataset`: spaCy does not run again.

Resuming is datatrove's: a finished task leaves `completions/{rank:05d}` in the logging folder and is skipped
on the next run with the same logging folder; an unfinished one runs again from its first file and rewrites
its output file from scratch (`ParquetWriter` opens it with mode `wb`), so a killed worker loses nothing and
duplicates nothing. Other metadata of the input rows (e.g. `url`) is not written; compose your own pipeline
with `LimeAnnotate` and a writer of your choice to keep it.

Needs `pip install "lime_hf[datatrove]"` (datatrove, and ray for the Ray executor).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq
from datasets import Features, Value
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.pipeline.writers import ParquetWriter

from ..annotation import FieldAnnotator, SpacyAnnotator
from ..data import CAUSAL_COLUMN, _Annotate, annotation_columns

# Input file endings -> the datatrove reader for them (JsonlReader infers gzip/zstd from the name).
READERS = {
    ".parquet": ParquetReader,
    ".jsonl": JsonlReader,
    ".jsonl.gz": JsonlReader,
    ".jsonl.zst": JsonlReader,
}
EXECUTORS = {"local": LocalPipelineExecutor, "slurm": SlurmPipelineExecutor, "ray": RayPipelineExecutor}


class LimeAnnotate(PipelineStep):
    """
    datatrove step: annotate each document's text with spaCy and store the spans in
    `document.metadata["lime_{field}"]` (the `Annotation` format: `starts`/`ends`/`labels` lists).

    Documents are annotated in batches of `batch_size` by the very function `annotate_dataset` maps, so the
    spans are those of `annotate_dataset`, span for span. Each task (process) loads its own spaCy pipeline on
    its first batch. Stats: `words` (whitespace-separated, the unit of the benchmarks) and `spans_lime_{field}`.

    Args:
        fields (`Sequence[str | FieldAnnotator]`, *optional*, defaults to `("pos", "ner")`): the fields.
        spacy_model (`str`, *optional*): the spaCy pipeline (default: en_core_web_sm).
        batch_size (`int`, *optional*, defaults to 256): documents per annotation batch.
        annotator (`SpacyAnnotator`, *optional*): instead of `fields`, `spacy_model` and `causal`.
        causal (`bool`, *optional*, defaults to `False`): prefix-only labels (`SpacyAnnotator(causal=True)`); also
            sets `document.metadata["lime_causal"] = True`.
    """

    name = "🍋 LIME annotate"
    type = "🏷 - ANNOTATOR"

    def __init__(
        self,
        fields: Sequence[str | FieldAnnotator] = ("pos", "ner"),
        spacy_model: str | None = None,
        batch_size: int = 256,
        annotator: SpacyAnnotator | None = None,
        causal: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive number of documents, got {batch_size}.")
        self.annotator = (
            annotator
            if annotator is not None
            else SpacyAnnotator(fields, spacy_model=spacy_model, causal=causal)
        )
        self.batch_size = batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        annotate = _Annotate(self.annotator, text_column="text")
        for batch in iter(lambda: list(itertools.islice(data, self.batch_size)), []):
            with self.track_time(unit="batch"):
                columns = annotate({"text": [document.text for document in batch]})
            for row, document in enumerate(batch):
                for column, values in columns.items():
                    document.metadata[column] = values[row]
                    if column != CAUSAL_COLUMN:
                        self.stat_update(f"spans_{column}", value=len(values[row]["starts"]))
                self.stat_update("words", value=len(document.text.split()))
                self.stat_update("documents")
                yield document


def _folder(folder: Any) -> Any:
    """datatrove takes str paths, fsspec URLs and `DataFolder`s; a `pathlib.Path` becomes its str."""
    return os.fspath(folder) if isinstance(folder, os.PathLike) else folder


def annotation_features(fields: Sequence[str], causal: bool = False) -> Features:
    """The output columns: `id`, `text`, `lime_{field}` per field (and `lime_causal` if `causal`), typed as
    `annotate_dataset` types them."""
    return Features({"id": Value("string"), "text": Value("string"), **annotation_columns(fields, causal)})


def _annotation_row(writer: ParquetWriter, document: Document) -> dict[str, Any]:
    """`ParquetWriter` adapter: one row of id, text and the spans columns (the writer's schema picks them)."""
    return {"id": document.id, "text": document.text, **document.metadata}


def annotation_writer(
    output_folder: Any, fields: Sequence[str], batch_size: int = 1000, causal: bool = False
) -> ParquetWriter:
    """A `ParquetWriter` of `annotation_features(fields, causal)` rows, one file per task; `batch_size` rows per write."""
    return ParquetWriter(
        _folder(output_folder),
        adapter=_annotation_row,
        schema=annotation_features(fields, causal).arrow_schema,
        batch_size=batch_size,
    )


def detect_reader(input_folder: Any, text_key: str = "text") -> PipelineStep:
    """
    The datatrove reader of `input_folder` (a local path or an fsspec URL: `s3://...`, `hf://datasets/...`), chosen by
    the endings of the files in it: `.parquet`, or `.jsonl` / `.jsonl.gz` / `.jsonl.zst`. The folder must hold one
    format only (one file ending). Documents without text are skipped by the reader (with a warning), as `load_texts` drops them.
    """
    folder = get_datafolder(_folder(input_folder))
    by_length = sorted(READERS, key=len, reverse=True)  # `.jsonl.gz` before `.jsonl`
    found = {
        next((e for e in by_length if path.endswith(e)), None) for path in folder.list_files(recursive=True)
    }
    found.discard(None)
    if len(found) != 1:
        raise ValueError(
            f"The input folder {folder.path!r} must hold files of one format, .parquet or .jsonl[.gz|.zst]; "
            + (f"it holds {sorted(found)}." if found else "it holds none.")
        )
    [ending] = found
    first_file = folder.list_files(recursive=True, glob_pattern=f"**/*{ending}")[0]
    keys = _first_record_keys(folder, first_file, ending)
    if keys is not None and text_key not in keys:
        raise ValueError(
            f"No document has the text key {text_key!r}: the first record of {first_file!r} in {folder.path!r} has "
            f"keys {keys}; name the text key with --text-column (`text_key=` in Python)"
        )
    return READERS[ending](folder, text_key=text_key, glob_pattern=f"**/*{ending}")


def _first_record_keys(folder: Any, path: str, ending: str) -> list[str] | None:
    """The columns of a Parquet file, or the keys of a JSONL file's first record (None: the file holds none)."""
    if ending == ".parquet":
        with folder.open(path, "rb") as file:
            return pq.ParquetFile(file).schema_arrow.names
    with folder.open(path, "rt", compression="infer") as file:
        line = next((line for line in file if line.strip()), None)
    return None if line is None else list(json.loads(line))


def annotation_pipeline(
    input_folder: Any,
    output_folder: Any,
    fields: Sequence[str] = ("pos", "ner"),
    spacy_model: str | None = None,
    text_key: str = "text",
    batch_size: int = 256,
    writer_batch_size: int = 1000,
    causal: bool = False,
) -> list[PipelineStep]:
    """
    The three steps reader -> `LimeAnnotate` -> Parquet writer, for any datatrove executor.

    Args:
        input_folder: folder (path or fsspec URL) of `.parquet` or `.jsonl[.gz|.zst]` shards.
        output_folder: where the annotated Parquet shards go.
        fields, spacy_model, batch_size, causal: see `LimeAnnotate`.
        text_key (`str`, *optional*, defaults to `"text"`): the input's text column; written as `text`.
        writer_batch_size (`int`, *optional*, defaults to 1000): rows per Parquet write.
    """
    return [
        detect_reader(input_folder, text_key=text_key),
        LimeAnnotate(fields, spacy_model=spacy_model, batch_size=batch_size, causal=causal),
        annotation_writer(output_folder, fields, batch_size=writer_batch_size, causal=causal),
    ]


def build_executor(
    pipeline: list[PipelineStep],
    executor: str = "local",
    tasks: int = 1,
    workers: int = -1,
    logging_dir: Any = None,
    **executor_kwargs: Any,
) -> PipelineExecutor:
    """
    A datatrove executor of `pipeline`.

    Args:
        executor (`str`): `"local"` (a process pool on this machine), `"slurm"` (a job array; needs
            `partition=` and `time=`) or `"ray"` (the Ray cluster `ray.init` connects to).
        tasks (`int`): how many tasks (output shards) the input files are divided into; at most one task per
            input file does work.
        workers (`int`): tasks running at once (-1: all; for Slurm, the job array's `%` limit).
        logging_dir: logs, stats and `completions/`; rerunning with the same folder resumes.
        executor_kwargs: further arguments of the executor class (`cpus_per_task`, `mem_per_cpu_gb`, `sbatch_args`, ...).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"Unknown executor {executor!r}; choose one of {sorted(EXECUTORS)}.")
    if tasks < 1 or workers == 0 or workers < -1:
        raise ValueError(
            f"`tasks` must be >= 1 and `workers` >= 1 (or -1 for all), got {tasks} and {workers}."
        )
    if executor == "slurm":
        missing = [name for name in ("partition", "time") if not executor_kwargs.get(name)]
        if missing:
            raise ValueError(
                f"The Slurm executor needs {' and '.join(missing)} (e.g. partition='cpu', time='24:00:00')."
            )
    return EXECUTORS[executor](
        pipeline, tasks=tasks, workers=workers, logging_dir=_folder(logging_dir), **executor_kwargs
    )


def annotate_corpus(
    input_folder: Any,
    output_folder: Any,
    logging_dir: Any,
    executor: str = "local",
    tasks: int = 1,
    workers: int = -1,
    fields: Sequence[str] = ("pos", "ner"),
    spacy_model: str | None = None,
    text_key: str = "text",
    batch_size: int = 256,
    causal: bool = False,
    **executor_kwargs: Any,
) -> PipelineExecutor:
    """
    Annotate the shards of `input_folder` into `output_folder` on a datatrove executor (see `build_executor`).

    Local and Ray runs block until every task is done and raise `RuntimeError` naming the unfinished tasks
    otherwise (rerun the same call to resume them). A Slurm run submits the job array and returns; rerun the same
    call after it ends to resubmit unfinished tasks. `causal` as in `LimeAnnotate`. Returns the executor.
    """
    pipeline = annotation_pipeline(
        input_folder,
        output_folder,
        fields,
        spacy_model=spacy_model,
        text_key=text_key,
        batch_size=batch_size,
        causal=causal,
    )
    runner = build_executor(pipeline, executor, tasks, workers, logging_dir, **executor_kwargs)
    runner.run()
    if executor != "slurm":
        unfinished = runner.get_incomplete_ranks()
        if unfinished:
            raise RuntimeError(
                f"Tasks {unfinished} of {tasks} did not finish (see the logs in {runner.logging_dir.path}); "
                "run again with the same logging folder to resume them."
            )
        if not get_datafolder(_folder(output_folder)).list_files(recursive=True):
            raise RuntimeError(
                f"Nothing was written to {output_folder}: no document in {input_folder} had text under the key "
                f"{text_key!r}; name the text key with --text-column (`text_key=` in Python)"
            )
    return runner


__all__ = [
    "LimeAnnotate",
    "annotate_corpus",
    "annotation_features",
    "annotation_pipeline",
    "annotation_writer",
    "build_executor",
    "detect_reader",
]
