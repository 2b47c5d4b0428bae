"""Annotation on datatrove: real executors (local pool, Ray on a local cluster, the Slurm job script run here), real
spaCy, outputs compared span for span with `annotate_dataset`."""

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from datasets import Dataset, load_dataset

from lime_hf.cli import main as cli_main
from lime_hf.cli.train import main
from lime_hf.data import align_dataset, annotate_dataset
from lime_hf.integrations import datatrove
from lime_hf.pretrain import load_texts, prepare_lm_dataset
from tests.conftest import AUSTEN
from tests.test_pretrain import TINY_LLAMA

REPO = Path(__file__).resolve().parents[1]
SHARDS = 4


def shard_rows() -> list[list[dict]]:
    """About 5k words of Emma and Persuasion paragraphs, dealt into 4 shards; every row has an id."""
    paragraphs = []
    for name in ("emma", "persuasion"):
        text = (AUSTEN / f"{name}.txt").read_text(encoding="utf-8")[3_000:17_000]
        paragraphs += [p for p in text.split("\n\n") if p.strip()]
    return [
        [{"id": f"s{shard}-{row}", "text": text} for row, text in enumerate(paragraphs[shard::SHARDS])]
        for shard in range(SHARDS)
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The shards as JSONL files."""
    folder = tmp_path_factory.mktemp("shards")
    for shard, rows in enumerate(shard_rows()):
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (folder / f"part-{shard}.jsonl").write_text(lines, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def reference(annotator) -> Dataset:
    """`annotate_dataset` on the same rows, sorted by id."""
    rows = [row for shard in shard_rows() for row in shard]
    return annotate_dataset(Dataset.from_list(rows), annotator=annotator).sort("id")


def read_output(folder: Path) -> Dataset:
    return load_dataset("parquet", data_dir=str(folder), split="train").sort("id")


def assert_same_annotation(output: Dataset, reference: Dataset) -> None:
    """Every document exactly once, the same text and the same spans, span for span."""
    assert len(set(output["id"])) == len(output), "a document was written twice"
    assert output["id"] == reference["id"]
    assert output["text"] == reference["text"]
    for column in ("lime_pos", "lime_ner"):
        assert output[column] == reference[column], column


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory) -> Path:
    """The local executor, 4 tasks on 2 worker processes."""
    run = tmp_path_factory.mktemp("local")
    datatrove.annotate_corpus(corpus, run / "out", run / "logs", executor="local", tasks=SHARDS, workers=2)
    return run


def test_local_executor_with_two_workers_equals_annotate_dataset(local_run, reference):
    output = read_output(local_run / "out")
    assert output.features == datatrove.annotation_features(["pos", "ner"])
    assert_same_annotation(output, reference)
    assert sorted(p.name for p in (local_run / "out").iterdir()) == [f"000_{r:05d}.parquet" for r in range(4)]
    assert sorted(p.name for p in (local_run / "logs" / "completions").iterdir()) == [
        f"{r:05d}" for r in range(4)
    ]
    stats = json.loads((local_run / "logs" / "stats.json").read_text())
    words = next(step for step in stats if "LIME" in step["name"])["stats"]["words"]["total"]
    assert words == sum(len(text.split()) for text in reference["text"])


def test_output_is_read_by_align_dataset_and_prepare_lm_dataset(local_run, reference, lime_pretokenized):
    output = read_output(local_run / "out")
    assert align_dataset(output, lime_pretokenized)[:] == align_dataset(reference, lime_pretokenized)[:]
    texts = load_texts([str(local_run / "out")])
    assert sorted(texts.column_names) == ["lime_ner", "lime_pos", "text"]
    packed = prepare_lm_dataset(texts, lime_pretokenized, block_size=64)
    expected = prepare_lm_dataset(
        Dataset.from_dict({"text": texts["text"]}), lime_pretokenized, block_size=64
    )
    assert packed[:] == expected[:]


def test_lime_hf_train_reads_the_shards_without_running_spacy(corpus, local_run, tmp_path):
    """`--spacy-model missing` would fail on the first annotation: training on the shards never annotates."""
    output_dir = tmp_path / "model"
    main(
        [str(local_run / "out"), "--train-tokenizer", "400", "--spacy-model", "no_such_pipeline",
         "--model-config", json.dumps(TINY_LLAMA), "--block-size", "64", "--max-steps", "4",
         "--learning-rate", "3e-3", "--logging-steps", "1", "--per-device-train-batch-size", "4",
         "--output-dir", str(output_dir), "--cache-dir", str(tmp_path / "cache")]
    )  # fmt: skip
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]  # it trained on the shards' blocks
    with pytest.raises(OSError, match="no_such_pipeline"):  # the same run on the raw shards needs spaCy
        main([str(corpus), "--train-tokenizer", "400", "--spacy-model", "no_such_pipeline",
              "--model-config", json.dumps(TINY_LLAMA), "--block-size", "64", "--max-steps", "2",
              "--output-dir", str(tmp_path / "raw"), "--cache-dir", str(tmp_path / "cache")])  # fmt: skip


def test_parquet_input_and_a_rerun_skips_completed_tasks(local_run, reference, tmp_path):
    """Parquet shards in (the local run's own output); a second run with the same logging folder does nothing."""
    datatrove.annotate_corpus(local_run / "out", tmp_path / "out", tmp_path / "logs", tasks=2, workers=1)
    assert_same_annotation(read_output(tmp_path / "out"), reference)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    datatrove.annotate_corpus(local_run / "out", tmp_path / "out", tmp_path / "logs", tasks=2, workers=1)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before


KILL_SCRIPT = """
import sys

from lime_hf.integrations.datatrove import annotation_pipeline, build_executor
from tests.kill_once import KillOnce

if __name__ == "__main__":
    corpus, out, logs, marker = sys.argv[1:]
    reader, annotate, writer = annotation_pipeline(corpus, out, batch_size=2, writer_batch_size=2)
    kill = KillOnce(marker, rank=2, after=5)
    build_executor([reader, annotate, kill, writer], tasks=4, workers=1, logging_dir=logs).run()
"""


def run_until_exit(command: list[str], env: dict, log: Path) -> tuple[int, str]:
    """Run `command` in its own session until its main process exits; then end what it left behind (the executor's
    multiprocess manager outlives a SIGKILLed parent). Returns the exit code and the output."""
    with log.open("w") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return code, log.read_text()


@pytest.mark.slow
def test_a_killed_worker_resumes_with_nothing_lost_or_duplicated(corpus, reference, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(script), str(corpus), str(tmp_path / "out"), str(tmp_path / "logs")]
    command.append(str(tmp_path / "killed"))
    code, output = run_until_exit(command, env, tmp_path / "first.log")
    assert code == -signal.SIGKILL, output[-3000:]
    assert sorted(p.name for p in (tmp_path / "logs" / "completions").iterdir()) == ["00000", "00001"]
    partial = tmp_path / "out" / "000_00002.parquet"
    assert partial.stat().st_size > 0  # task 2 had written batches when it died (no footer: unreadable)
    with pytest.raises(Exception, match="(?i)parquet"):
        pq.read_table(partial)
    code, output = run_until_exit(command, env, tmp_path / "second.log")
    assert code == 0, output[-3000:]
    assert "Skipping 2 already completed tasks" in output
    assert_same_annotation(read_output(tmp_path / "out"), reference)


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")  # one at a time: launchers and Ray take fixed ports
def test_ray_executor_on_a_local_cluster_equals_the_local_run(corpus, local_run, tmp_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        datatrove.annotate_corpus(
            corpus,
            tmp_path / "out",
            tmp_path / "logs",
            executor="ray",
            tasks=SHARDS,
            workers=2,
            mem_per_cpu_gb=1,
        )
    finally:
        ray.shutdown()
    output, local = read_output(tmp_path / "out"), read_output(local_run / "out")
    assert output[:] == local[:]
    assert len(list((tmp_path / "logs" / "completions").iterdir())) == SHARDS


FAKE_SLURM = {
    # Record the submission and answer as sbatch does.
    "sbatch": 'echo "$@" >> "$FAKE_SLURM_LOG"; echo "Submitted batch job 4242"',
    # Run the command on this machine without srun's options (-l, -n N).
    "srun": 'while [[ "$1" == -* ]]; do [[ "$1" == -n ]] && shift; shift; done; exec "$@"',
    "scontrol": 'echo "$4"',  # `scontrol show hostnames NODELIST`
}


def test_slurm_job_script_is_generated_and_runs_each_array_task(corpus, reference, tmp_path, monkeypatch):
    """sbatch, srun and scontrol are the cluster we do not have: stand-ins submit nothing and run the generated
    job script's command here, once per array task, as Slurm would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(tmp_path / "sbatch.log"),
    }
    logs = tmp_path / "logs"
    options = dict(partition="cpu", time="02:00:00", cpus_per_task=1, mem_per_cpu_gb=3)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_SLURM_LOG", env["FAKE_SLURM_LOG"])
    datatrove.annotate_corpus(corpus, tmp_path / "out", logs, "slurm", tasks=2, workers=2, **options)
    script = (logs / "launch_script.slurm").read_text()
    for directive in (
        "--partition=cpu",
        "--time=02:00:00",
        "--array=0-1%2",
        "--cpus-per-task=1",
        "--mem-per-cpu=3G",
    ):
        assert f"#SBATCH {directive}\n" in script
    assert f"srun  -l -n 1 launch_pickled_pipeline {logs / 'executor.pik'}" in script
    submissions = (tmp_path / "sbatch.log").read_text().splitlines()
    assert (
        len(submissions) == 2 and "--export=ALL,RUN_OFFSET=0" in submissions[0]
    )  # the array, then merge_stats
    assert not (tmp_path / "out").exists()
    for task in ("0", "1"):
        array_env = {**env, "SLURM_ARRAY_TASK_ID": task, "SLURM_NODELIST": "node1", "SLURM_JOB_ID": "4242"}
        result = subprocess.run(["bash", str(logs / "launch_script.slurm")], env=array_env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_annotation(read_output(tmp_path / "out"), reference)
    assert sorted(p.name for p in (logs / "completions").iterdir()) == ["00000", "00001"]


def test_cli_annotates_with_the_local_executor(corpus, reference, tmp_path, capsys):
    out = tmp_path / "annotated"
    assert cli_main(["annotate", str(corpus), "-o", str(out), "--executor", "local", "--tasks", "4", "--workers", "1"]) == 0  # fmt: skip
    assert "Parquet shards in" in capsys.readouterr().out
    assert_same_annotation(read_output(out), reference)
    assert len(list((tmp_path / "logs-annotated" / "completions").iterdir())) == 4


@pytest.mark.parametrize(
    "options, message",
    [
        (["--executor", "slurm", "--tasks", "2"], "The Slurm executor needs partition and time"),
        (["--executor", "local", "--tasks", "0"], "`tasks` must be >= 1"),
        (["--executor", "banana"], "invalid choice: 'banana'"),
    ],
)
def test_cli_bad_executor_options_are_one_line_errors(options, message, corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["annotate", str(corpus), "-o", str(tmp_path / "out"), *options])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_input_folder_of_no_or_mixed_formats_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"one format, .parquet or .jsonl\[.gz\|.zst\]; it holds none"):
        datatrove.detect_reader(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"text": "A."}\n')
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"it holds \['.jsonl', '.parquet'\]"):
        datatrove.detect_reader(tmp_path)
    with pytest.raises(ValueError, match="Unknown executor 'spark'"):
        datatrove.build_executor([], "spark")
