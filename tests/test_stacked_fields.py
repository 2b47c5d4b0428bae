"""The heads and tables stacked across fields (`stacked_fields.py`): the same numbers as field by field, and never
stale after the parameters change."""

import copy

import pytest
import torch
from tiny_models import tiny_lime

from lime_hf.configuration_lime import UNKNOWN_ID
from lime_hf.stacked_fields import StackedParameters, parameters_fixed


def honest(**kwargs):
    return tiny_lime(metadata_layer=1, tag_head_fields=["pos", "ner"], tag_head_type="linear", **kwargs)


def field_by_field(model, ids: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    """The heads' logits, their argmax and the states after layer 1, computed one field at a time by hand."""
    base = model.language_model.model
    hidden = base.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1])[None]
    rotary = base.rotary_emb(hidden, position_ids)
    # No mask: SDPA attends causally (`is_causal`) when it is given none.
    hidden = base.layers[0](
        hidden, attention_mask=None, position_embeddings=rotary, position_ids=position_ids
    )
    heads, tables = model.tag_heads, model.metadata_embeddings.tables
    features = heads.hidden_norm(hidden)
    logits = {name: heads.classifiers[name](features) for name in heads.fields}
    argmax = {name: logits[name][..., UNKNOWN_ID + 1 :].argmax(-1) + UNKNOWN_ID + 1 for name in logits}
    added = sum(tables[name](argmax[name]) for name in argmax)
    return logits, argmax, hidden + added


@torch.no_grad()
def test_stacked_heads_and_lookup_equal_field_by_field():
    model = honest()
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    logits, argmax, _ = field_by_field(model, ids)
    out = model(input_ids=ids)
    for name in logits:
        torch.testing.assert_close(out.tag_logits[name], logits[name])
        assert torch.equal(out.fed_metadata_ids[name], argmax[name])
    stacked = model.metadata_embeddings.lookup({name: argmax[name] for name in argmax})
    expected = sum(model.metadata_embeddings.tables[name](argmax[name]) for name in argmax)
    torch.testing.assert_close(stacked, expected)


@torch.no_grad()
def test_unknown_and_padding_embed_to_zero_and_weights_scale():
    model = tiny_lime(metadata_weights={"pos": 0.5})
    embeddings = model.metadata_embeddings
    with torch.no_grad():
        embeddings.tables["pos"].weight[UNKNOWN_ID] = 3.0  # a row that must never be read
    ids = torch.tensor([[0, 1, 5]])
    out = embeddings.lookup({"pos": ids, "ner": torch.tensor([[0, 1, 1]])})
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    torch.testing.assert_close(out[0, 2], 0.5 * embeddings.tables["pos"].weight[5])


def change(model, how: str) -> None:
    """Change the heads' and tables' parameters after the stacked tensors were built, as a user would."""
    classifier = model.tag_heads.classifiers["pos"]
    if how == "optimizer step":
        model.train()
        ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(4))
        tags = {"pos_ids": torch.full_like(ids, 5), "ner_ids": torch.full_like(ids, 3)}
        optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
        model(input_ids=ids, labels=ids, **tags).loss.backward()
        optimizer.step()
        model.eval()
        return
    with torch.no_grad():
        if how == "in place":
            classifier.weight.normal_()
            model.metadata_embeddings.tables["ner"].weight.normal_()
        elif how == "load_state_dict":
            state = copy.deepcopy(model.state_dict())
            state["tag_heads.classifiers.pos.weight"].normal_()
            state["metadata_embeddings.tables.ner.weight"].normal_()
            model.load_state_dict(state)
        else:  # assigned
            classifier.weight = torch.nn.Parameter(torch.randn_like(classifier.weight))


@pytest.mark.parametrize("how", ["in place", "load_state_dict", "assigned", "optimizer step"])
def test_a_change_to_the_parameters_is_always_read(how):
    model = honest()
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids)  # builds the stacked tensors
    change(model, how)
    with torch.no_grad():
        after = model(input_ids=ids)
    rebuilt = model(
        input_ids=ids
    )  # with gradients on: stacked inside the graph, from the parameters themselves
    assert not torch.equal(after.tag_logits["pos"], before.tag_logits["pos"])
    torch.testing.assert_close(after.logits, rebuilt.logits)
    for name in rebuilt.tag_logits:
        torch.testing.assert_close(after.tag_logits[name], rebuilt.tag_logits[name])
        assert torch.equal(after.fed_metadata_ids[name], rebuilt.fed_metadata_ids[name])


@torch.no_grad()
def test_a_dtype_change_is_read():
    model = honest()
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids)
    model.to(torch.float64)
    out = model(input_ids=ids)
    assert out.tag_logits["pos"].dtype == torch.float64 and out.logits.dtype == torch.float64


def test_stacked_parameters_are_built_once_per_fixed_block_and_at_every_call_elsewhere():
    weight = torch.nn.Parameter(torch.ones(2))
    stacked, builds = StackedParameters(), []

    def build():
        builds.append(1)
        return weight.detach() * 2

    with torch.no_grad():
        stacked.get(build)
        stacked.get(build)
        assert len(builds) == 2  # outside a block: every call
        with parameters_fixed():
            first = stacked.get(build)
            assert stacked.get(build) is first and len(builds) == 3
        weight.add_(1.0)
        with parameters_fixed():  # a new block builds anew
            assert torch.equal(stacked.get(build), torch.full((2,), 4.0)) and len(builds) == 4
    with parameters_fixed():  # with gradients on, built in the graph every time
        assert stacked.get(lambda: weight * 2).requires_grad


def test_generate_builds_the_stacked_tensors_once_per_call(monkeypatch):
    model = honest()
    builds = []
    stack = model.tag_heads._stack_classifiers
    monkeypatch.setattr(model.tag_heads, "_stack_classifiers", lambda: builds.append(1) or stack())
    ids = torch.randint(3, 97, (1, 4), generator=torch.Generator().manual_seed(5))
    model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert len(builds) == 1
    with torch.no_grad():
        model(input_ids=ids)
    assert len(builds) == 2  # a forward outside `generate` stacks once


@torch.no_grad()
def test_a_generation_step_returns_no_tag_logits_and_fields_without_a_head_read_unknown():
    model = tiny_lime(metadata_layer=1, tag_head_fields=["pos"], tag_head_type="linear")
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    full = model(input_ids=ids)
    assert set(full.fed_metadata_ids) == {"pos", "ner"}
    assert torch.equal(full.fed_metadata_ids["ner"], torch.full_like(ids, UNKNOWN_ID))
    step = model(input_ids=ids, logits_to_keep=1)
    assert step.tag_logits is None and step.fed_metadata_ids is None
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1])
