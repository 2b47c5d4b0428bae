"""Meta-attention against a dense reference written here from the paper's formula (arXiv 2509.16278):

    h_i + O(softmax(Q K^T / sqrt(d) + M_causal + P) V)_i    at meta-token positions i, h_i elsewhere,

with `P[i, j] = 0` iff i and j are both meta-tokens, else -inf, every `L x L` score computed, from the sublayer's
own pre-norm and Q/K/V/O weights. Checked per sublayer (its input and output, captured by a forward hook) and for
the whole model (the plain backbone with the reference after each decoder layer), on GPT-2 and Llama.
"""

import math

import pytest
import torch
from tiny_models import VOCAB_SIZE, tiny_lime
from torch import nn
from transformers import AutoModelForCausalLM

from lime_hf import LimeForCausalLM

META = VOCAB_SIZE - 1
# Row 0: four meta-tokens, two of them adjacent; row 1: one at the very start and one later; row 2: none.
META_POSITIONS = {0: [2, 5, 6, 11], 1: [0, 8], 2: []}


def ids_with_meta(length: int = 14) -> torch.LongTensor:
    ids = torch.randint(3, META, (len(META_POSITIONS), length), generator=torch.Generator().manual_seed(0))
    for row, positions in META_POSITIONS.items():
        ids[row, positions] = META
    return ids


def meta_model(arch: str, positional: str = "keep") -> LimeForCausalLM:
    return tiny_lime(arch, seed=1, meta_token_ids=[META], meta_positional=positional)


def dense_meta_attention(
    sublayer: nn.Module, hidden: torch.Tensor, is_meta: torch.BoolTensor, num_heads: int
) -> torch.Tensor:
    """The formula above on `(batch, seq, hidden)` states, with the sublayer's `norm` and `q/k/v/o_proj`."""
    batch, length, size = hidden.shape
    head_dim = size // num_heads
    x = sublayer.norm(hidden)

    def split(projection: nn.Module) -> torch.Tensor:  # (batch, heads, seq, head_dim)
        return projection(x).view(batch, length, num_heads, head_dim).transpose(1, 2)

    query, key, value = split(sublayer.q_proj), split(sublayer.k_proj), split(sublayer.v_proj)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    both_meta = is_meta[:, :, None] & is_meta[:, None, :]
    bias = torch.zeros(batch, 1, length, length).masked_fill(~(causal & both_meta)[:, None], float("-inf"))
    scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim) + bias
    # A non-meta row is all -inf (NaN after the softmax); the branch is not added there.
    attended = scores.softmax(-1).nan_to_num(0.0) @ value
    branch = sublayer.o_proj(attended.transpose(1, 2).reshape(batch, length, size))
    return torch.where(is_meta[..., None], hidden + branch, hidden)


def num_heads(model: LimeForCausalLM) -> int:
    return model.config.get_text_config().num_attention_heads


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    base = backbone.base_model
    return base.layers if hasattr(base, "layers") else base.h


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_each_sublayer_equals_the_dense_reference(arch):
    model = meta_model(arch)
    ids = ids_with_meta()
    is_meta = ids == META
    seen = []

    def capture(module, args, kwargs, output):
        seen.append((module, args[0] if args else kwargs["hidden_states"], output))

    hooks = [
        sublayer.register_forward_hook(capture, with_kwargs=True) for sublayer in model.meta_attention.layers
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    assert [module for module, _, _ in seen] == list(model.meta_attention.layers)  # each once, in order
    for sublayer, hidden, output in seen:
        with torch.no_grad():
            expected = dense_meta_attention(sublayer, hidden, is_meta, num_heads(model))
        torch.testing.assert_close(output, expected)
        assert not torch.allclose(expected[is_meta], hidden[is_meta])  # the branch is not negligible


def reference_model(model: LimeForCausalLM, ids: torch.LongTensor) -> nn.Module:
    """The plain backbone with the LIME model's weights, the dense reference after each decoder layer and, for
    `meta_positional="zero"`, the positional encoding zeroed at meta positions (rotary cos/sin = 1/0)."""
    is_meta = ids == META
    reference = AutoModelForCausalLM.from_config(model.config.get_text_config()).eval()
    reference.load_state_dict(model.language_model.state_dict())
    for layer, sublayer in zip(decoder_layers(reference), model.meta_attention.layers, strict=True):

        def after_layer(module, args, output, sublayer=sublayer):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = dense_meta_attention(sublayer, hidden, is_meta[:, -hidden.shape[1] :], num_heads(model))
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        layer.register_forward_hook(after_layer)
    if model.config.meta_positional == "zero":
        base = reference.base_model
        if hasattr(base, "rotary_emb"):
            base.rotary_emb.register_forward_hook(
                lambda module, args, output: (
                    torch.where(is_meta[..., None], 1.0, output[0]),
                    torch.where(is_meta[..., None], 0.0, output[1]),
                )
            )
        else:
            base.wpe.register_forward_hook(
                lambda module, args, output: torch.where(is_meta[..., None], 0.0, output)
            )
    return reference


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("positional", ["keep", "zero"])
def test_the_model_equals_the_backbone_with_the_dense_reference(arch, positional):
    model = meta_model(arch, positional)
    ids = ids_with_meta()
    with torch.no_grad():
        expected = reference_model(model, ids)(input_ids=ids).logits
        logits = model(input_ids=ids, use_cache=False).logits
        plain = AutoModelForCausalLM.from_config(model.config.get_text_config()).eval()
        plain.load_state_dict(model.language_model.state_dict())
        without = plain(input_ids=ids).logits
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits[0], without[0], atol=1e-3)  # meta-attention changed row 0's logits
    torch.testing.assert_close(logits[2], without[2])  # row 2 has no meta-token: the plain backbone's

    # Step by step with the KV cache (meta keys/values cached): the same logits, position by position.
    with torch.no_grad():
        out = model(input_ids=ids[:, :4], use_cache=True)
        steps, cache = (
            [out.logits],
            out.get("cache", out.get("past_key_values")),
        )  # its name since 5.24 / before
        for i in range(4, ids.shape[1]):
            out = model(input_ids=ids[:, i : i + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected)
