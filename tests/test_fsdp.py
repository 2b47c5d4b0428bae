"""The README's FSDP2 configuration, launched for real with `accelerate launch --config_file` on 2 CPU processes.

What it shows (accelerate 1.16, transformers 5.24, torch 2.13): on CPU, accelerate never enables FSDP. Its
`AcceleratorState` turns `distributed_type: FSDP` into FSDP only for accelerator devices (CUDA, XPU, NPU, ...);
with `--use_cpu` the run is plain data parallel over gloo (`MULTI_CPU`), the parameters stay ordinary tensors,
and no FSDP setting has any effect. Without `--use_cpu` the processes see no GPU and do not form a group. The
tests pin both behaviours, and check what does hold on CPU: full weights saved, reloaded logits equal to the
in-memory model's, and weights after 3 steps equal to a 1-process run on the same data.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.test_pretrain import REPO, TINY_LLAMA, corpus  # noqa: F401 - the shared corpus fixture

RECORD_SCRIPT = """
import sys

import torch
from accelerate.state import AcceleratorState
from transformers import TrainerCallback

from lime_hf.pretrain import main


class RecordLogits(TrainerCallback):
    '''The in-memory model's logits on 2 training blocks (every rank runs the forward), and how it is wrapped.'''

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        inputs = {k: v[:2] for k, v in next(iter(train_dataloader)).items() if k != "labels"}
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits
        record = {
            "world_size": args.world_size,
            "global_step": state.global_step,
            "distributed_type": str(AcceleratorState().distributed_type),
            "parameter_types": sorted({type(p).__name__ for p in model.parameters()}),
            "inputs": inputs,
            "logits": logits,
        }
        torch.save(record, f"{args.output_dir}/rank{args.process_index}.pt")


main(sys.argv[1:], callbacks=[RecordLogits()])
"""


def readme_fsdp_config() -> str:
    """The YAML block of the README's FSDP paragraph, verbatim."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**FSDP.**") :]
    return re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)


def run_training(texts: Path, tmp_path: Path, name: str, launcher: list[str], *options: str):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(RECORD_SCRIPT), encoding="utf-8")
    output_dir = tmp_path / name
    arguments = [
        str(texts / "emma.txt"), "--train-tokenizer", "400", "--model-config", json.dumps(TINY_LLAMA),
        "--block-size", "64", "--max-steps", "3", "--learning-rate", "3e-3", "--seed", "0",
        "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(output_dir), *options,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [*launcher, str(script), *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result, output_dir


def accelerate_fsdp(tmp_path: Path) -> list[str]:
    config = tmp_path / "fsdp.yaml"
    config.write_text(readme_fsdp_config(), encoding="utf-8")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # 2 processes instead of the README's 8, full precision for a float comparison; every FSDP key as written.
    return [
        accelerate,
        "launch",
        "--config_file",
        str(config),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
    ]


@pytest.mark.slow
def test_readme_fsdp_config_on_two_cpu_processes(corpus, tmp_path):  # noqa: F811
    assert "fsdp_version: 2" in readme_fsdp_config() and "FULL_STATE_DICT" in readme_fsdp_config()
    launched, fsdp_dir = run_training(
        corpus, tmp_path, "fsdp", accelerate_fsdp(tmp_path), "--use_cpu", "--per-device-train-batch-size", "4"
    )
    assert launched.returncode == 0, launched.stderr[-5000:]
    single, single_dir = run_training(
        corpus, tmp_path, "single", [sys.executable], "--use_cpu", "--per-device-train-batch-size", "8"
    )
    assert single.returncode == 0, single.stderr[-5000:]

    ranks = [torch.load(fsdp_dir / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [3, 3]
    # The recorded truth: accelerate ran data parallel over gloo, not FSDP (no DTensor parameters).
    assert [r["distributed_type"] for r in ranks] == ["DistributedType.MULTI_CPU"] * 2
    assert [r["parameter_types"] for r in ranks] == [["Parameter"]] * 2

    saved = AutoModelForCausalLM.from_pretrained(fsdp_dir).eval()  # full weights in model.safetensors
    assert (fsdp_dir / "model.safetensors").is_file()
    with torch.no_grad():
        logits = saved(**ranks[0]["inputs"]).logits
    torch.testing.assert_close(logits, ranks[0]["logits"], rtol=0, atol=1e-6)

    # 3 steps of 2 x 4 blocks equal 3 steps of 8 blocks on one process: same batches, same weights.
    reference = AutoModelForCausalLM.from_pretrained(single_dir).state_dict()
    weights = saved.state_dict()
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_readme_fsdp_config_without_a_gpu_does_not_form_a_group(corpus, tmp_path):  # noqa: F811
    launched, _ = run_training(
        corpus, tmp_path, "fsdp", accelerate_fsdp(tmp_path), "--per-device-train-batch-size", "4"
    )
    assert launched.returncode != 0
    assert "The launcher started 2 processes, but the Trainer sees a world of 1" in launched.stderr
