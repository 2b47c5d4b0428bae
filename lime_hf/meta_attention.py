"""Meta-attention: learned meta-tokens that attend only to each other (arXiv 2509.16278).

After every decoder layer of the backbone, a meta-attention sublayer with its own pre-norm and Q/K/V/O adds, at
each meta-token position i, a residual branch over the meta-tokens j <= i of the same row:

    h_i += O(softmax(Q_i K_j^T / sqrt(d) + M_causal + P) V_j)     P[i, j] = 0 iff i and j are both meta-tokens

It is computed on the gathered meta positions only (each row's meta-tokens padded to the batch's largest count):
`k` meta-tokens cost `k^2`, never a dense `L x L` mask, and every other position passes through bit for bit. A
row without meta-tokens is left as it is (no fully masked softmax row, so no NaN).

The sublayers are wired into the backbone with module hooks, so that the backbone's code and weight names stay
its own (`attach` is idempotent, `detach` removes them). `LimeForCausalLM.forward` builds a `MetaAttentionState`
per call and runs the backbone inside `scope(state, inputs)`: the state goes down as the keyword
`meta_attention_state`, which Transformers hands to every decoder layer (a gradient-checkpointing replay, run
after the call has returned, gets the same keyword), and into a `ContextVar` for the positional hook, set and
reset around the call. No hook keeps state between calls.

KV cache: the meta keys/values of layer `l` are extra layers of the backbone's own `Cache`, at index
`num_layers + 1 + l`; index `num_layers` holds which of those slots are real meta-tokens (1) or padding (0).
Beam reordering, `repeat_interleave` and batch selection act on every layer, so they need nothing more.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``,
``transformers`` and its flat siblings.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .tag_heads import IGNORE_INDEX

STATE_KEYWORD = "meta_attention_state"
# `is_meta` of the backbone call under way when its positional encoding is to be zeroed there, else `None`.
_ZEROED_POSITIONS: ContextVar[torch.BoolTensor | None] = ContextVar("lime_zeroed_positions", default=None)


@dataclass
class MetaAttentionState:
    """What the meta-attention sublayers of one forward call share.

    is_meta: `(batch, seq)` which input positions are meta-tokens.
    index: `(batch, m)` each row's meta positions in order, padded (with non-meta positions) to the batch's
        largest count `m`.
    valid: `(batch, m)` which entries of `index` are meta positions (the rest is padding).
    mask: `(batch, 1, m, past + m)` which cached and new meta keys each gathered query attends to.
    cache: the backbone's cache, holding the meta keys/values after the backbone's layers (or `None`).
    num_layers: the backbone's number of decoder layers.
    """

    is_meta: torch.BoolTensor
    index: torch.LongTensor
    valid: torch.BoolTensor
    mask: torch.BoolTensor
    cache: Cache | None
    num_layers: int

    @classmethod
    def build(
        cls, is_meta: torch.BoolTensor, cache: Cache | None, num_layers: int
    ) -> "MetaAttentionState | None":
        """The state of a call whose input has meta-tokens at `is_meta`; `None` when it has none (nothing to do)."""
        if not is_meta.any():  # most decoding steps
            return None
        counts = is_meta.sum(dim=1)
        new = int(counts.max())
        # A stable sort puts each row's meta positions first, in order; the rest pads the row.
        index = torch.sort((~is_meta).to(torch.int8), dim=1, stable=True).indices[:, :new]
        valid = torch.arange(new, device=is_meta.device) < counts[:, None]
        past_valid = valid[:, :0]
        if cache is not None:
            _check_dynamic(cache)
            while len(cache.layers) <= 2 * num_layers:
                cache.layers.append(DynamicLayer())
            slots = cache.layers[num_layers]
            if slots.get_seq_length() > 0:
                past_valid = slots.keys[:, 0, :, 0] > 0
            flags = valid.to(torch.float32)[:, None, :, None]
            slots.update(flags, flags)
        past = past_valid.shape[1]
        keys = torch.cat([past_valid, valid], dim=1)
        # Query j (the row's j-th new meta-token) sees the cached meta-tokens and the new ones up to itself. A
        # padding query also sees itself, so that no softmax row is empty; its output is never written back.
        key_position = torch.arange(past + new, device=is_meta.device)
        query_position = past + torch.arange(new, device=is_meta.device)[:, None]
        mask = (keys[:, None, :] & (key_position <= query_position)) | (key_position == query_position)
        return cls(is_meta, index, valid, mask[:, None], cache, num_layers)


def _check_dynamic(cache: Cache) -> None:
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"Meta-attention keeps its keys/values in extra layers of a `DynamicCache`, and a {type(cache).__name__} "
            "has a fixed set of layers: use the default dynamic cache (no `cache_implementation`)."
        )


class LimeMetaAttention(nn.Module):
    """One meta-attention sublayer: pre-norm, Q/K/V/O over the gathered meta positions, residual back."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        text_config = config.get_text_config()
        self.hidden_size = text_config.hidden_size
        self.num_heads = text_config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.layer_idx = layer_idx
        self.norm = nn.LayerNorm(self.hidden_size)
        self.q_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, state: MetaAttentionState) -> torch.Tensor:
        """
        Args:
            hidden_states: `(batch, seq, hidden)` the decoder layer's output.
            state: the call's meta positions, mask and cache.

        Returns:
            `(batch, seq, hidden)`: `hidden_states` plus the meta-attention branch at meta positions; every other
            position is `hidden_states` itself.
        """
        batch, new = state.index.shape
        gather_index = state.index[..., None].expand(-1, -1, self.hidden_size)
        gathered = hidden_states.gather(1, gather_index)
        x = self.norm(gathered)
        shape = (batch, new, self.num_heads, self.head_dim)
        query = self.q_proj(x).view(shape).transpose(1, 2)
        key = self.k_proj(x).view(shape).transpose(1, 2)
        value = self.v_proj(x).view(shape).transpose(1, 2)
        if state.cache is not None:
            key, value = state.cache.layers[state.num_layers + 1 + self.layer_idx].update(key, value)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=state.mask)
        output = self.o_proj(attended.transpose(1, 2).reshape(batch, new, self.hidden_size))
        # Padding entries write their own input back, so every non-meta position is copied bit for bit.
        updated = torch.where(state.valid[..., None], gathered + output.to(gathered.dtype), gathered)
        return hidden_states.scatter(1, gather_index, updated)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Initialise every weight (used where the sublayers are built on the meta device, e.g. `from_backbone`)."""
        with torch.no_grad():
            self.norm.reset_parameters()
            for layer in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                layer.weight.normal_(0.0, std)


class LimeMetaAttentionLayers(nn.Module):
    """The sublayers of every decoder layer, and the hooks that run them inside the backbone.

    Also zeroes the positional encoding at meta positions when `config.meta_positional == "zero"` (read at each
    call, so it may be switched at inference): the rotary `cos`/`sin` become 1/0 there (the rotation is the
    identity), or the learned absolute position embedding becomes 0. `position_ids` are never changed, since
    Transformers reads non-monotonic ones as packed sequences.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.meta_token_ids = list(config.meta_token_ids)
        num_layers = config.get_text_config().num_hidden_layers
        self.layers = nn.ModuleList([LimeMetaAttention(config, index) for index in range(num_layers)])
        self._handles = []  # of the hooks `attach` installed

    def attach(self, backbone: nn.Module) -> None:
        """Hook the sublayers into `backbone` (a `*ForCausalLM`). Idempotent: hooks from an earlier `attach` (to
        this backbone or a replaced one) are removed first."""
        self.detach()
        base = backbone.base_model
        decoder_layers = getattr(base, "layers", None) or getattr(base, "h", None)
        if not isinstance(decoder_layers, nn.ModuleList) or len(decoder_layers) != len(self.layers):
            raise ValueError(
                f"Meta-attention follows each decoder layer of the backbone, found as `layers` (Llama, Qwen2, ...) "
                f"or `h` (GPT-2) on its base model; {type(base).__name__} has no such list of "
                f"{len(self.layers)} layers."
            )
        self._handles = [
            layer.register_forward_hook(_SublayerHook(self, index), with_kwargs=True)
            for index, layer in enumerate(decoder_layers)
        ]
        self.positional_kind = None
        if isinstance(getattr(base, "rotary_emb", None), nn.Module):
            self.positional_kind = "rotary"
            self._handles.append(base.rotary_emb.register_forward_hook(_PositionalHook("rotary")))
        elif isinstance(getattr(base, "wpe", None), nn.Module):
            self.positional_kind = "absolute"
            self._handles.append(base.wpe.register_forward_hook(_PositionalHook("absolute")))
        self.check_positional()

    def detach(self) -> None:
        """Remove the hooks `attach` installed (the backbone runs as if it had no meta-attention)."""
        for handle in getattr(self, "_handles", ()):
            handle.remove()
        self._handles = []

    @contextmanager
    def scope(self, state: MetaAttentionState, inputs: dict) -> Iterator[None]:
        """One backbone call with meta-tokens: `state` into its keywords `inputs` (for the sublayers) and, where
        the positional encoding is zeroed at meta-tokens, the meta positions into the positional hook's
        `ContextVar`."""
        inputs[STATE_KEYWORD] = state
        zero = state.is_meta if self.config.meta_positional == "zero" else None
        token = _ZEROED_POSITIONS.set(zero)
        try:
            yield
        finally:
            _ZEROED_POSITIONS.reset(token)

    def check_positional(self) -> None:
        """Raise unless the backbone has the positional encoding that `meta_positional="zero"` acts on."""
        if self.config.meta_positional == "zero" and self.positional_kind is None:
            raise ValueError(
                "meta_positional='zero' zeroes the rotary cos/sin (`rotary_emb`) or the learned position embedding "
                "(`wpe`) at meta-tokens, and this backbone has neither (use meta_positional='keep')."
            )

    def is_meta(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """`(batch, seq)` which ids are meta-tokens."""
        if len(self.meta_token_ids) == 1:  # the usual case, one op
            return input_ids == self.meta_token_ids[0]
        return torch.isin(input_ids, torch.tensor(self.meta_token_ids, device=input_ids.device))

    def mask_labels(self, labels: torch.LongTensor) -> torch.LongTensor:
        """The labels with every meta-token target ignored: the model never learns to predict meta-tokens."""
        return labels.masked_fill(self.is_meta(labels), IGNORE_INDEX)

    def prepare(
        self,
        input_ids: torch.LongTensor | None,
        labels: torch.LongTensor | None,
        cache: Cache | None,
        use_cache: bool,
        keep_cache: bool,
    ) -> tuple[torch.LongTensor | None, Cache | None, MetaAttentionState | None]:
        """Labels, cache and state for one backbone call (run it inside `scope(state, inputs)`).

        Args:
            input_ids: `(batch, seq)` the call's ids (meta positions are read from them; with `inputs_embeds`
                alone the call has none).
            labels: `(batch, seq)` or `None`; meta-token targets become `-100`.
            cache, use_cache: as given to the model; a cache is created here when the backbone would create one,
                so that the meta keys/values go into the same object.
            keep_cache: whether the backbone's layers write the cache in this call (not under gradient
                checkpointing in training).
        """
        self.check_positional()
        if labels is not None:
            labels = self.mask_labels(labels)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.get_text_config())
        if input_ids is None:
            return labels, cache, None
        state = MetaAttentionState.build(
            self.is_meta(input_ids), cache if keep_cache else None, len(self.layers)
        )
        return labels, cache, state


class _SublayerHook:
    """Forward hook of a decoder layer: its output goes through the meta-attention sublayer `index`.

    An object (not a closure), so that a deep copy of the model hooks the copy's own sublayers. The sublayer is
    looked up at each call, so that a module put in its place (PEFT's trained copy in `modules_to_save`, then the
    merged module) is the one that runs.
    """

    def __init__(self, layers: "LimeMetaAttentionLayers", index: int):
        self.layers, self.index = layers, index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output):
        state = kwargs.get(STATE_KEYWORD)
        if state is None and not (module.training and torch.is_grad_enabled()):
            return None  # most decoding steps: checked first, as this runs at every layer of every call
        sublayer = self.layers.layers[self.index]
        # Decoder layers return the hidden states, or a tuple that starts with them (older versions).
        hidden = output[0] if isinstance(output, tuple) else output
        if state is None:
            # A training batch without meta-tokens: the sublayer joins the graph with an exact zero, so that DDP
            # needs no `find_unused_parameters` for batches with and without meta-tokens.
            hidden = hidden + sum(parameter.sum() for parameter in sublayer.parameters()) * 0.0
        else:
            hidden = sublayer(hidden, state)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _PositionalHook:
    """Forward hook of the rotary embedding or of the position table: zero the encoding at meta positions."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, module: nn.Module, args: tuple, output):
        is_meta = _ZEROED_POSITIONS.get()
        if is_meta is None:
            return None
        if self.kind == "rotary":  # `(cos, sin)`, each `(batch or 1, seq, head_dim)`
            cos, sin = output
            where = is_meta[..., None]
            return torch.where(where, torch.ones_like(cos), cos), torch.where(
                where, torch.zeros_like(sin), sin
            )
        return torch.where(
            is_meta[..., None], torch.zeros_like(output), output
        )  # `(batch or 1, seq, hidden)`


__all__ = ["LimeMetaAttention", "LimeMetaAttentionLayers", "MetaAttentionState"]
