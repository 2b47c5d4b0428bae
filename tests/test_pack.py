"""Align and pack on datatrove: real executors (a local pool, Ray on a local cluster, the Slurm job scripts run here),
real spaCy and tokenizers; every shard compared block for block with `prepare_lm_dataset`."""

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
from datasets import Dataset, concatenate_datasets

from lime_hf.cli import main as cli_main
from lime_hf.data import annotate_dataset
from lime_hf.integrations.datatrove_pack import finalize_shards, meta_generator, pack_corpus, task_counts
from lime_hf.meta_tokens import add_meta_tokens, inject_meta_tokens
from lime_hf.pretrain import load_texts, prepare_lm_dataset
from lime_hf.shards import Manifest, check_manifest
from lime_hf.tokenization_lime import LimeTokenizer
from tests.conftest import AUSTEN, share_annotator
from tests.test_datatrove import FAKE_SLURM, REPO, run_until_exit

FILES = 4
BLOCK = 64


def lines() -> list[str]:
    """About 1,300 short documents (the lines of Emma and Persuasion excerpts): more than one packing batch of 1000."""
    found = []
    for name in ("emma", "persuasion"):
        text = (AUSTEN / f"{name}.txt").read_text(encoding="utf-8")[3_000:50_000]
        found += [line for line in text.splitlines() if line.strip()]
    return found[:1300]


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer, annotator) -> LimeTokenizer:
    """A pretokenized LimeTokenizer with the meta-token `<meta>`."""
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer, alignment="pretokenized")
    add_meta_tokens(tokenizer, ["<meta>"])
    return share_annotator(tokenizer, annotator)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def annotated(annotator) -> Dataset:
    """The documents annotated once (a whitespace-only one among them), in order."""
    rows = [{"id": f"d{row:04d}", "text": text} for row, text in enumerate(lines())]
    rows.insert(500, {"id": "d-blank", "text": "   \n  "})
    return annotate_dataset(Dataset.from_list(rows), annotator=annotator)


@pytest.fixture(scope="module")
def corpus(annotated, tmp_path_factory) -> Path:
    """The annotated documents as 4 Parquet files of consecutive rows, as `lime-hf annotate --executor` writes them."""
    folder = tmp_path_factory.mktemp("annotated")
    for index in range(FILES):
        annotated.shard(FILES, index, contiguous=True).to_parquet(str(folder / f"000_{index:05d}.parquet"))
    return folder


def file_rows(corpus: Path, files: list[int]) -> Dataset:
    """The rows of the input files `files`, in order (what the task reading them reads)."""
    return concatenate_datasets(
        [Dataset.from_parquet(str(corpus / f"000_{index:05d}.parquet")) for index in files]
    )


def blocks_of(folder: Path, rank: int) -> dict[str, list]:
    return pq.read_table(folder / "blocks" / f"{rank:05d}.parquet").to_pydict()


def expected_blocks(texts: Dataset, tokenizer: LimeTokenizer, block_size: int = BLOCK) -> dict[str, list]:
    packed = prepare_lm_dataset(texts.filter(lambda row: bool(row["text"].strip())), tokenizer, block_size)
    return packed.remove_columns("attention_mask")[:]


def assert_counts_match_files(folder: Path, manifest: Manifest) -> None:
    """The manifest on disk is the one returned, and its counts are those of the files."""
    assert Manifest.load(folder) == manifest
    for shard, path in zip(manifest.shards, manifest.files(folder), strict=True):
        table = pq.read_table(path)
        assert table.column_names == manifest.columns
        assert shard.blocks == table.num_rows
        assert shard.tokens == sum(map(len, table["input_ids"].to_pylist()))
        ids = table["input_ids"].to_pylist()
        assert shard.documents == sum(row.count(manifest.eos_token_id) for row in ids)


@pytest.fixture(scope="module")
def single(corpus, tokenizer_dir, tmp_path_factory) -> tuple[Path, Manifest]:
    run = tmp_path_factory.mktemp("single")
    manifest = pack_corpus(corpus, run / "out", tokenizer_dir, BLOCK, run / "logs", tasks=1)
    return run / "out", manifest


def test_one_task_equals_prepare_lm_dataset_block_for_block(single, corpus, tokenizer):
    folder, manifest = single
    texts = load_texts([str(corpus)])
    expected = expected_blocks(texts, tokenizer)
    assert blocks_of(folder, 0) == expected
    lengths = [len(block) for block in expected["input_ids"]]
    assert (
        lengths.count(BLOCK) == len(lengths) - 2
    )  # two packing batches (1000 + 300 documents), no block spans them
    assert manifest.counts == {
        "shards": 1,
        "blocks": len(lengths),
        "tokens": sum(lengths),
        "documents": len(texts),
    }
    assert_counts_match_files(folder, manifest)
    assert manifest.block_size == BLOCK and manifest.meta_token_id is None and manifest.meta_seed is None
    check_manifest(manifest, tokenizer, fields=tokenizer.metadata_fields)
    words = sum(len(text.split()) for text in texts["text"])
    assert [record["words"] for record in task_counts(folder, 1)] == [words]


def test_two_workers_write_each_task_s_packing(corpus, tokenizer_dir, tokenizer, tmp_path):
    manifest = pack_corpus(
        corpus, tmp_path / "out", tokenizer_dir, BLOCK, tmp_path / "logs", tasks=2, workers=2
    )
    for rank in range(2):  # task r reads files r and r + 2
        assert blocks_of(tmp_path / "out", rank) == expected_blocks(
            file_rows(corpus, [rank, rank + 2]), tokenizer
        )
    assert [shard.file for shard in manifest.shards] == ["blocks/00000.parquet", "blocks/00001.parquet"]
    assert manifest.counts["documents"] == len(lines())
    assert_counts_match_files(tmp_path / "out", manifest)
    stats = json.loads((tmp_path / "logs" / "stats.json").read_text())
    pack_stats = next(step for step in stats if "pack" in step["name"])["stats"]
    assert pack_stats["blocks"]["total"] == manifest.counts["blocks"]


def test_raw_text_is_annotated_in_the_same_pipeline(tokenizer_dir, tokenizer, tmp_path):
    texts = lines()[:120]
    (tmp_path / "raw").mkdir()
    rows = "".join(json.dumps({"id": str(row), "text": text}) + "\n" for row, text in enumerate(texts))
    (tmp_path / "raw" / "part-0.jsonl").write_text(rows, encoding="utf-8")
    manifest = pack_corpus(tmp_path / "raw", tmp_path / "out", tokenizer_dir, BLOCK, tmp_path / "logs")
    assert blocks_of(tmp_path / "out", 0) == expected_blocks(Dataset.from_dict({"text": texts}), tokenizer)
    assert manifest.counts["documents"] == len(texts)


def test_meta_tokens_are_injected_seeded_and_recorded(corpus, tokenizer_dir, tokenizer, tmp_path):
    manifest = pack_corpus(
        corpus, tmp_path / "out", tokenizer_dir, BLOCK, tmp_path / "logs", meta_token="<meta>", seed=3
    )
    meta_id = tokenizer.convert_tokens_to_ids("<meta>")
    assert (manifest.meta_token_id, manifest.meta_fraction, manifest.meta_seed) == (meta_id, 0.1, 3)
    plain = expected_blocks(load_texts([str(corpus)]), tokenizer)
    generator = meta_generator(3, 0)  # task 0's draws, block after block
    expected = {column: [] for column in plain}
    for row in range(len(plain["input_ids"])):
        metadata = {column: plain[column][row] for column in plain if column != "input_ids"}
        grown = inject_meta_tokens(
            plain["input_ids"][row], meta_id, 0.1, metadata=metadata, generator=generator
        )
        for column in expected:
            expected[column].append(grown[column].tolist())
    written = blocks_of(tmp_path / "out", 0)
    assert written == expected
    assert len(written["input_ids"][0]) == BLOCK + 6  # round(0.1 * 64) meta-tokens
    assert_counts_match_files(tmp_path / "out", manifest)


def test_a_manifest_of_another_tokenizer_or_other_inventories_is_refused(
    single, wordpiece_tokenizer, tokenizer
):
    manifest = Manifest.load(single[0])
    with pytest.raises(ValueError, match="made with the tokenizer"):
        check_manifest(manifest, LimeTokenizer.from_tokenizer(wordpiece_tokenizer))
    fields = {**tokenizer.metadata_fields, "ner": tokenizer.metadata_fields["ner"][:-1]}
    with pytest.raises(ValueError, match="'ner' has .* labels in the shards"):
        check_manifest(manifest, tokenizer, fields=fields)


def test_bad_inputs_are_clear_errors(corpus, annotated, tokenizer_dir, bpe_tokenizer, tmp_path):
    partial = tmp_path / "pos-only"
    partial.mkdir()
    annotated.remove_columns("lime_ner").to_parquet(str(partial / "a.parquet"))
    with pytest.raises(ValueError, match=r"has the spans columns \['lime_pos'\] but not \['lime_ner'\]"):
        pack_corpus(partial, tmp_path / "out", tokenizer_dir, BLOCK, tmp_path / "logs")
    bpe_tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="needs a saved LimeTokenizer, got a "):
        pack_corpus(corpus, tmp_path / "out", tmp_path / "plain", BLOCK, tmp_path / "logs")
    with pytest.raises(ValueError, match="The meta-token 'the' is not a special token"):
        pack_corpus(corpus, tmp_path / "out", tokenizer_dir, BLOCK, tmp_path / "logs", meta_token="the")
    with pytest.raises(RuntimeError, match=r"Tasks \[0, 1\] of 2 have not finished"):
        finalize_shards(tmp_path / "out", 2)


def test_shards_of_another_run_in_the_folder_are_refused(single, tmp_path):
    folder = tmp_path / "out"
    (folder / "counts").mkdir(parents=True)
    record = json.loads((single[0] / "counts" / "00000.json").read_text())
    for rank, block_size in ((0, BLOCK), (1, 2 * BLOCK)):
        other = {
            **record,
            "rank": rank,
            "world_size": 2,
            "manifest": {**record["manifest"], "block_size": block_size},
        }
        (folder / "counts" / f"{rank:05d}.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="not of one run of 2 tasks .* 2 different settings"):
        finalize_shards(folder, 2)
    with pytest.raises(ValueError, match="other counts files: \\['counts/00001.json'\\]"):
        finalize_shards(folder, 1)


KILL_SCRIPT = """
import sys

from lime_hf.integrations.datatrove import build_executor
from lime_hf.integrations.datatrove_pack import finalize_shards, pack_pipeline
from tests.kill_once import KillOnce

if __name__ == "__main__":
    corpus, out, tokenizer, logs, marker = sys.argv[1:]
    reader, pack = pack_pipeline(corpus, out, tokenizer, 64)
    pack.batch_size = 20  # packing batches of 20 documents: task 2 has written two when it dies
    kill = KillOnce(marker, rank=2, after=50)
    build_executor([reader, kill, pack], tasks=4, workers=1, logging_dir=logs).run()
    finalize_shards(out, 4)
"""


@pytest.mark.slow
def test_a_killed_task_resumes_with_nothing_lost_or_duplicated(corpus, tokenizer_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(script), str(corpus), str(tmp_path / "out"), str(tokenizer_dir)]
    code, output = run_until_exit(
        [*command, str(tmp_path / "logs"), str(tmp_path / "killed")], env, tmp_path / "1.log"
    )
    assert code == -signal.SIGKILL, output[-3000:]
    assert sorted(p.name for p in (tmp_path / "logs" / "completions").iterdir()) == ["00000", "00001"]
    assert sorted(p.name for p in (tmp_path / "out" / "counts").iterdir()) == ["00000.json", "00001.json"]
    assert (tmp_path / "out" / "blocks" / "00002.parquet").stat().st_size > 0  # partial, without a footer
    assert not (tmp_path / "out" / "manifest.json").exists()
    code, output = run_until_exit(
        [*command, str(tmp_path / "logs"), str(tmp_path / "killed")], env, tmp_path / "2.log"
    )
    assert code == 0, output[-3000:]
    assert "Skipping 2 already completed tasks" in output
    # The same pipeline, never killed, in fresh folders.
    code, output = run_until_exit([*command[:3], str(tmp_path / "clean"), str(tokenizer_dir), str(tmp_path / "clean-logs"), str(tmp_path / "killed")], env, tmp_path / "3.log")  # fmt: skip
    assert code == 0, output[-3000:]
    resumed, clean = Manifest.load(tmp_path / "out"), Manifest.load(tmp_path / "clean")
    assert resumed == clean and resumed.counts["documents"] == len(lines())
    for rank in range(4):
        assert blocks_of(tmp_path / "out", rank) == blocks_of(tmp_path / "clean", rank)


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")  # one at a time: launchers and Ray take fixed ports
def test_ray_executor_on_a_local_cluster_equals_the_local_executor(
    corpus, tokenizer_dir, tokenizer, tmp_path
):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        manifest = pack_corpus(
            corpus, tmp_path / "out", tokenizer_dir, BLOCK, tmp_path / "logs", "ray", tasks=2, workers=2,
            mem_per_cpu_gb=1,
        )  # fmt: skip
    finally:
        ray.shutdown()
    for rank in range(2):
        assert blocks_of(tmp_path / "out", rank) == expected_blocks(
            file_rows(corpus, [rank, rank + 2]), tokenizer
        )
    assert_counts_match_files(tmp_path / "out", manifest)


def test_slurm_submits_the_array_then_the_manifest_job(
    corpus, tokenizer_dir, tokenizer, tmp_path, monkeypatch
):
    """sbatch, srun and scontrol are stand-ins (as in test_datatrove): the generated job scripts run here, the
    array's tasks and then the manifest job, as Slurm would; then the same call finds everything done."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "sbatch.log"))
    logs, out = tmp_path / "logs", tmp_path / "out"
    options = dict(partition="cpu", time="01:00:00", cpus_per_task=1)
    assert pack_corpus(corpus, out, tokenizer_dir, BLOCK, logs, "slurm", tasks=2, **options) is None
    submissions = (
        (tmp_path / "sbatch.log").read_text().splitlines()
    )  # the array, its merge_stats, the manifest job, ...
    assert "--dependency=afterok:4242" in submissions[2] and "finalize" not in submissions[0]
    env = {**os.environ, "SLURM_NODELIST": "node1", "SLURM_JOB_ID": "4242"}
    scripts = [
        (logs, "0"),
        (logs, "1"),
        (logs / "finalize", "0"),
    ]  # the array, then the job that waits for it
    for folder, task in scripts:
        result = subprocess.run(["bash", str(folder / "launch_script.slurm")], env={**env, "SLURM_ARRAY_TASK_ID": task}, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    manifest = Manifest.load(out)
    for rank in range(2):
        assert blocks_of(out, rank) == expected_blocks(file_rows(corpus, [rank, rank + 2]), tokenizer)
    submitted = (tmp_path / "sbatch.log").read_text()
    assert pack_corpus(corpus, out, tokenizer_dir, BLOCK, logs, "slurm", tasks=2, **options) == manifest
    assert (tmp_path / "sbatch.log").read_text() == submitted  # nothing left to submit


def test_cli_packs_and_says_what_it_found(corpus, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "blocks"
    assert cli_main(["pack", str(corpus), "-o", str(out), "--tokenizer", str(tokenizer_dir), "--block-size", "64", "--tasks", "2", "--workers", "1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    counts = Manifest.load(out).counts
    words = sum(len(text.split()) for text in lines())
    expected = (
        f"{counts['documents']:,} documents, {words:,} words -> {counts['blocks']:,} blocks of 64 tokens, "
    )
    assert expected + f"{counts['tokens']:,} tokens in 2 shards" in printed
    assert len(list((tmp_path / "logs-blocks" / "completions").iterdir())) == 2


@pytest.mark.parametrize(
    "options, message",
    [
        (["--block-size", "0"], "argument --block-size: invalid positive int value: '0'"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--meta-fraction", "0.2"], "--meta-fraction set up meta-tokens: add --meta-token"),
        (["--meta-token", "<meta>", "--meta-fraction", "1.5"], "--meta-fraction must lie in [0, 1)"),
        (["--slurm-time", "1:00:00"], "--slurm-time apply to --executor slurm only, not local"),
        (["--executor", "slurm"], "--executor slurm needs --slurm-partition and --slurm-time"),
        (["--tokenizer", "no/such/folder"], "no such tokenizer folder 'no/such/folder'"),
        (
            ["--meta-token", "the"],
            "The meta-token 'the' is not a special token",
        ),  # found when the tokenizer loads
    ],
)
def test_cli_bad_inputs_are_one_line_errors(options, message, corpus, tokenizer_dir, tmp_path, capsys):
    arguments = ["pack", str(corpus), "-o", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)]
    if "--block-size" not in options:
        arguments += ["--block-size", "64"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*arguments, *options])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert (
        message in error and "Traceback" not in error and len(error.strip().splitlines()) == 2
    )  # + `see --help`


def test_cli_missing_input_folder_is_a_one_line_error(tokenizer_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pack", str(tmp_path / "none"), "-o", str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir), "--block-size", "8"])  # fmt: skip
    assert exit_info.value.code == 2 and "no such input folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["pack", "--help"], ["pack", "x", "-o", "y", "--tokenizer", "z", "--block-size", "8"]]
)
def test_cli_help_and_usage_errors_load_nothing_heavy(argv):
    code = f"import sys; from lime_hf.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\n"
    code += "print(sorted(name for name in ('torch', 'transformers', 'datatrove') if name in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[-1] == "[]", result.stderr
