"""FSDP on 2 CPU processes over gloo: the FSDP2 configuration of docs/scale.md under `accelerate launch --config_file`, and
FSDP2 sharding itself (`fully_shard`, under torchrun).

What the first shows (accelerate 1.16, transformers 5.24, torch 2.13): on CPU, accelerate never enables FSDP. Its
`AcceleratorState` turns `distributed_type: FSDP` into FSDP only for accelerator devices (CUDA, XPU, NPU, ...);
with `--use_cpu` the run is plain data parallel over gloo (`MULTI_CPU`), the parameters stay ordinary tensors,
and no FSDP setting has any effect, on any machine. Without `--use_cpu` on a machine without a GPU the processes
do not form a group (that test skips where there is a GPU). The tests pin both behaviours, and check what does hold on CPU: full weights saved, reloaded logits equal to the
in-memory model's, and weights after 3 steps equal to a 1-process run on the same data.

The second shards a LIME model with torch's FSDP2 the way accelerate wraps it on GPUs (each decoder layer a unit,
the rest in the root), on a CPU device mesh whatever the machine, trains 3 steps, gathers the full state dict, saves it with `save_pretrained`, and checks
the reloaded logits and the weights against a 1-process run.
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
from tiny_models import tiny_lime
from transformers import AutoModelForCausalLM

from tests.test_pretrain import REPO, TINY_LLAMA, corpus  # noqa: F401 - the shared corpus fixture

RECORD_SCRIPT = """
import sys

import torch
from accelerate.state import AcceleratorState
from transformers import TrainerCallback

from lime_hf.cli.train import main


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
    """The YAML block of the FSDP paragraph of docs/scale.md, verbatim."""
    page = (REPO / "docs" / "scale.md").read_text(encoding="utf-8")
    section = page[page.index("**FSDP.**") :]
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
    # 2 processes instead of the page's 8, full precision for a float comparison; every FSDP key as written.
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
@pytest.mark.xdist_group("two_processes")  # one at a time: launchers and Ray take fixed ports
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

    # 3 steps of 2 x 4 blocks equal 3 steps of 8 blocks on one process: same batches, same weights. The all-reduce
    # sums gradients in another order than one batch does, and Adam divides by sqrt(v), so a weight near zero
    # can move by a few 1e-6 (measured 3.1e-6); 1e-5 is still 1/300 of one step (lr 3e-3), so a missed or
    # repeated step or batch fails.
    reference = AutoModelForCausalLM.from_pretrained(single_dir).state_dict()
    weights = saved.state_dict()
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")  # one at a time: launchers and Ray take fixed ports
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="pins what the launch does on a machine without a GPU; this one has one"
)
def test_readme_fsdp_config_without_a_gpu_never_trains_as_one_process(corpus, tmp_path):  # noqa: F811
    """Without `--use_cpu` and without a GPU, accelerate 1.16 gives each of the 2 processes a world of 1, which
    `pretrain` refuses with a message; accelerate 1.10 forms the 2-process group on the CPU and trains with it.
    Either is fine; two processes silently training two models is not."""
    launched, output_dir = run_training(
        corpus, tmp_path, "fsdp", accelerate_fsdp(tmp_path), "--per-device-train-batch-size", "4"
    )
    if launched.returncode != 0:
        assert "The launcher started 2 processes, but the Trainer sees a world of 1" in launched.stderr
        return
    ranks = [torch.load(output_dir / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [3, 3]


# accelerate will not shard on CPU, so this runs FSDP2 itself the way accelerate's TRANSFORMER_BASED_WRAP does on
# GPUs: `fully_shard` on every decoder layer, then on the whole model (tables, embeddings, norm, head in the root).
FULLY_SHARD_SCRIPT = """
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, sys.argv[1])
from test_fsdp import BATCH, train_steps
from tiny_models import tiny_lime

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
# A CPU mesh named explicitly: by default `fully_shard` takes the machine's accelerator (CUDA where there is one).
mesh = init_device_mesh("cpu", (world,))
model = tiny_lime().train()
for layer in model.language_model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
parameter_types = sorted({type(p).__name__ for p in model.parameters()})
shard = {name: tensor.chunk(world)[rank] for name, tensor in BATCH.items()}
train_steps(model, shard)

model.eval()
with torch.no_grad():
    logits = model(**{k: v for k, v in shard.items() if k != "labels"}).logits
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    model.save_pretrained(sys.argv[2], state_dict=full)
torch.save({"logits": logits, "parameter_types": parameter_types}, f"{sys.argv[2]}/rank{rank}.pt")
dist.destroy_process_group()
"""

# 4 rows of 16 tokens: 2 rows per rank, the same tokens in every row count, so the ranks' mean gradients average
# to the full batch's.
_generator = torch.Generator().manual_seed(0)
BATCH = {
    "input_ids": torch.randint(3, 64, (4, 16), generator=_generator),
    "pos_ids": torch.randint(2, 20, (4, 16), generator=_generator),
    "ner_ids": torch.randint(2, 10, (4, 16), generator=_generator),
}
BATCH["labels"] = BATCH["input_ids"]


def train_steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")  # one at a time: launchers and Ray take fixed ports
def test_fsdp2_fully_shard_on_two_gloo_processes_saves_a_full_state_dict(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(textwrap.dedent(FULLY_SHARD_SCRIPT), encoding="utf-8")
    torchrun = Path(sys.executable).parent / "torchrun"
    saved_dir = tmp_path / "saved"
    saved_dir.mkdir()
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(script), str(REPO / "tests"), str(saved_dir)],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    ranks = [torch.load(saved_dir / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["parameter_types"] for r in ranks] == [["DTensor"]] * 2  # sharded for real

    # The full state dict reloads with from_pretrained and gives each rank's in-memory logits.
    saved = AutoModelForCausalLM.from_pretrained(saved_dir).eval()
    with torch.no_grad():
        for rank, record in enumerate(ranks):
            shard = {k: v.chunk(2)[rank] for k, v in BATCH.items() if k != "labels"}
            torch.testing.assert_close(saved(**shard).logits, record["logits"], rtol=0, atol=1e-5)

    # 3 sharded steps on 2 x 2 rows equal 3 steps on the 4 rows in one process.
    reference = tiny_lime().train()
    train_steps(reference, BATCH)
    weights = saved.state_dict()
    assert weights.keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
