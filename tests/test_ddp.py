"""DDP with batches that carry metadata and batches that carry none, with torch's default
`find_unused_parameters=False`: two real gloo processes under torchrun."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_lime

TESTS = Path(__file__).resolve().parent

RANK_SCRIPT = """
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, sys.argv[1])
from tiny_models import random_tags, tiny_lime

dist.init_process_group("gloo")
rank = dist.get_rank()
model = tiny_lime("llama").train()
ddp = DistributedDataParallel(model)  # find_unused_parameters=False: every parameter must get a gradient
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(rank))
for step in range(4):
    # Ranks alternate: one has both fields, the other only `pos_ids` or nothing at all.
    tags = random_tags(model, ids.shape, seed=step) if (rank + step) % 2 == 0 else {}
    if step == 3 and tags == {}:
        tags = {"pos_ids": random_tags(model, ids.shape)["pos_ids"]}
    optimizer.zero_grad()
    ddp(input_ids=ids, labels=ids, **tags).loss.backward()
    optimizer.step()
torch.save(model.state_dict(), f"{sys.argv[2]}/rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")  # one at a time: launchers and Ray take fixed ports
def test_ddp_mixes_batches_with_and_without_metadata_without_extra_flags(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT), encoding="utf-8")
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(script), str(TESTS), str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    initial = tiny_lime("llama").state_dict()
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), f"{name} differs between the ranks"
    for field in ("pos", "ner"):  # both tables learned from the ranks that had their tags
        name = f"metadata_embeddings.tables.{field}.weight"
        assert not torch.equal(ranks[0][name], initial[name])
