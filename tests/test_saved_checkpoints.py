"""Checkpoints saved by an earlier version of the code (`tests/data/checkpoints/make.py`) load and compute exactly
what that version computed: logits (LIME, LIME+1, tag heads, meta-attention, Llama and GPT-2), the ids of greedy
and beam `generate` with and without guidance and providers, and `generate`'s `metadata_ids`."""

import sys
from pathlib import Path

import pytest
import torch

from lime_hf import LimeForCausalLM

CHECKPOINTS = Path(__file__).resolve().parent / "data" / "checkpoints"
sys.path.insert(0, str(CHECKPOINTS))
import make  # noqa: E402 - the calls whose outputs the references hold

ATOL = RTOL = 1e-5


def assert_same(actual, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif expected.is_floating_point():
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{where}: {m}")
    else:
        assert torch.equal(actual, expected), f"{where}: {actual} != {expected}"


@pytest.fixture(scope="module", params=list(make.MODES))
def saved(request) -> tuple[str, LimeForCausalLM, dict]:
    folder = CHECKPOINTS / request.param
    model = LimeForCausalLM.from_pretrained(folder).eval()
    return request.param, model, torch.load(folder / "reference.pt", weights_only=True)


@torch.no_grad()
def test_forward_equals_the_saved_reference(saved):
    name, model, reference = saved
    assert_same(make.forward_references(model), reference["forward"], name)


@torch.no_grad()
def test_generate_equals_the_saved_reference(saved):
    name, model, reference = saved
    calls = make.generate_calls(model)
    assert set(calls) == set(reference["generate"])
    for call, kwargs in calls.items():
        out = model.generate(**kwargs)
        actual = {"sequences": out.sequences, **dict(out.get("metadata_ids") or {})}
        assert_same(actual, reference["generate"][call], f"{name}/{call}")


def test_every_mode_is_saved():
    assert sorted(path.name for path in CHECKPOINTS.iterdir() if path.is_dir()) == sorted(make.MODES)
