"""Metadata injected at decoder layer k (`config.metadata_layer = k > 0`): honest LIME in one parallel pass.

The first k decoder layers read the tokens alone. At the input of layer k, for every position i:

    logits_f = head_f(h^k_i)                         h^k_i has seen t_{<=i} and no tag (tag_heads.py)
    a_f(i)   = the given tag where it is known, else argmax(logits_f)   (LIME+1 guidance is a given tag)
    h^k_i   += sum_f w_f * E_f(a_f(i))                (the same tables as LIME's, looked up at layer k)

and layers k.. run on the enriched states. A model given `input_ids` alone thus tags them itself inside the one
forward pass (no spaCy, no oracle, no sequential self-tagging), the same way in training ("predicted" training
source: the argmax replaces the given tags, which still train the heads) and at inference. With
`config.predicted_tag_embedding = "expected"` a tag from the heads is read with their doubt,
`sum_c softmax(logits_f)_c E_f(c)` in place of `E_f(argmax logits_f)`; a given tag is read as it is. Each
prediction is a pure function of the prefix t_{<=i}, so the output is the same with and without the KV cache.

The computation runs in a forward pre-hook on decoder layer k, so the backbone's code and weight names stay its own
(`LimeMetadataInjection.attach` is idempotent, `detach` removes it). `LimeForCausalLM.forward` builds a
`MetadataInjectionState` per call and passes it down as the keyword `metadata_injection_state`, which Transformers
hands to every decoder layer; the hook reads it there and records the heads' logits and the fed tags in it. The
hook itself holds nothing: no state is shared between calls.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``,
``transformers`` and its flat siblings.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .configuration_lime import UNKNOWN_ID

STATE_KEYWORD = "metadata_injection_state"


@dataclass
class MetadataInjectionState:
    """One forward call's injection: its inputs, and what the hook records (read once the backbone has run).

    site: the model's `LimeMetadataInjection`, whose hook alone applies this state (two LIME models retrofitted on
        one backbone object each hook it; each call is applied once, by its own model's hook).
    embeddings: the model's `LimeMetadataEmbeddings`.
    heads: the model's `LimeTagHeads`, or `None` (given tags only).
    metadata_ids: field -> `(batch, seq)` given tags of the input tokens (validated).
    next_metadata_ids: field -> `(batch,)` LIME+1 guidance for the token after the input, or `None`.
    predict: whether the heads' argmax fills the positions whose fed tag is unknown.
    override: whether the heads' argmax replaces the given tags (`metadata_training_source="predicted"` in
        training).
    expected: whether the heads' tags are read as their probability-weighted embeddings
        (`predicted_tag_embedding="expected"`), rather than their argmax's.
    stacked_logits: recorded: `(batch, seq, fields, width)` the heads' logits (`LimeTagHeads.stacked_logits`).
    fed: recorded: the tags each position read (LIME+1: the next token's), field -> `(batch, seq)`; where every tag
        read is the heads' own, their `(batch, seq, fields)` ids as predicted. `tag_logits` and `fed_ids` give both
        as dicts, built only when asked (a generation step asks for neither).
    """

    site: "LimeMetadataInjection"
    embeddings: nn.Module
    heads: nn.Module | None
    metadata_ids: dict[str, torch.LongTensor]
    next_metadata_ids: dict[str, torch.LongTensor] | None
    predict: bool
    override: bool
    expected: bool = False
    stacked_logits: torch.Tensor | None = None
    fed: dict[str, torch.LongTensor] | torch.LongTensor | None = None

    @property
    def tag_logits(self) -> dict[str, torch.Tensor]:
        """Field -> `(batch, seq, labels)` the heads' logits (fields with a head)."""
        return self.heads.unstack(self.stacked_logits) if self.stacked_logits is not None else {}

    @property
    def fed_ids(self) -> dict[str, torch.LongTensor] | None:
        """Field -> `(batch, seq)` the tag each position read; `None` before the hook has run."""
        if not isinstance(self.fed, torch.Tensor):
            return self.fed
        predicted = dict(zip(self.heads.fields, self.fed.unbind(-1), strict=True))
        unknown = {name: torch.full_like(self.fed[..., 0], UNKNOWN_ID) for name in self.embeddings.tables}
        return unknown | predicted

    def inject(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(batch, seq, hidden)` input of layer k -> the same plus the metadata embeddings of the fed tags."""
        heads = self.heads
        self.stacked_logits = stacked = heads.stacked_logits(hidden) if heads is not None else None
        predicted = (
            heads.predict_stacked(stacked)
            if stacked is not None and (self.predict or self.override)
            else None
        )
        given = self.metadata_ids.keys() | (self.next_metadata_ids or {}).keys()
        if predicted is not None and not given and not torch.is_grad_enabled():
            # Every tag read is the heads' (the other fields are unknown: zeros): one lookup or one blend, nothing to
            # merge. This is a generation step of the honest mode, where each operation counts.
            self.fed = predicted
            return hidden + self._read_predictions(predicted).to(hidden.dtype)
        predicted = (
            dict(zip(heads.fields, predicted.unbind(-1), strict=True)) if predicted is not None else {}
        )
        # A field with a prediction and no given tag reads the prediction as it is (no merge to pay per step).
        merged = [name for name in self.embeddings.tables if name in given or name not in predicted]
        fed = self.embeddings.fed_ids(
            self.metadata_ids, tuple(hidden.shape[:2]), self.next_metadata_ids, merged
        )
        from_heads = {}  # field -> where the heads' tag is read: `None` everywhere, else a `(batch, seq)` mask
        for name, ids in predicted.items():
            from_heads[name] = fed[name] == UNKNOWN_ID if name in given and not self.override else None
            fed[name] = ids if from_heads[name] is None else torch.where(from_heads[name], ids, fed[name])
        self.fed = fed
        # Without gradients a field unknown everywhere adds exact zeros: skip its lookup (training keeps it, so
        # that every table takes part in every step for DDP).
        looked_up = fed if torch.is_grad_enabled() else {name: fed[name] for name in (given | set(predicted))}
        if self.expected and predicted:
            others = {name: ids for name, ids in looked_up.items() if name not in predicted}
            return hidden + self._read_expected(fed, from_heads, others).to(hidden.dtype)
        if not looked_up:
            return hidden
        return hidden + self.embeddings.lookup(looked_up).to(hidden.dtype)

    def _read_predictions(self, predicted: torch.LongTensor) -> torch.Tensor:
        """`(batch, seq, fields)` the heads' tags (their argmax) -> `(batch, seq, hidden)` what the model reads for
        them: their embeddings (`"argmax"`), or the embeddings averaged under the heads' probabilities
        (`"expected"`; detached, so that only the tag loss trains the heads)."""
        if not self.expected:
            return self.embeddings.lookup_stacked(predicted, self.heads.fields)
        probabilities = self.heads.probabilities_stacked(self.stacked_logits).detach()
        return self.embeddings.expected_stacked(probabilities, self.heads.fields)

    def _read_expected(
        self,
        fed: dict[str, torch.LongTensor],
        from_heads: dict[str, torch.Tensor | None],
        others: dict[str, torch.LongTensor],
    ) -> torch.Tensor:
        """`"expected"` where some tags are given: the heads' blend where they supply the tag (`from_heads`: field ->
        where, `None` for everywhere), the given tags looked up as they are elsewhere, and so are `others`, the fields
        without a head."""
        fields = self.heads.fields
        probabilities = self.heads.probabilities_stacked(self.stacked_logits).detach()
        looked_up = dict(others)
        if any(from_heads[name] is not None for name in fields):
            everywhere = torch.ones_like(fed[fields[0]], dtype=torch.bool)
            read_heads = torch.stack(
                [everywhere if from_heads[name] is None else from_heads[name] for name in fields], -1
            )
            probabilities = probabilities * read_heads[..., None].to(probabilities.dtype)
            for name in fields:  # the given tags, unknown (zero) where the heads' blend is read
                if from_heads[name] is not None:
                    looked_up[name] = fed[name].masked_fill(from_heads[name], UNKNOWN_ID)
        embedded = self.embeddings.expected_stacked(probabilities, fields)
        return embedded + self.embeddings.lookup(looked_up) if looked_up else embedded


class _InjectionHook:
    """Forward pre-hook of decoder layer k: the call's state (if it is this site's) adds the metadata to the hidden
    states. An object (not a closure), so that a deep copy of the model hooks the copy's own site."""

    def __init__(self, site: "LimeMetadataInjection"):
        self.site = site

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        state = kwargs.get(STATE_KEYWORD)
        if state is None or state.site is not self.site:
            return None
        if args:  # every supported backbone passes the hidden states first, positionally
            return (state.inject(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state.inject(kwargs["hidden_states"])}


class LimeMetadataInjection:
    """Where the metadata joins the backbone (`layer`: a decoder layer index > 0), and the hook that adds it."""

    def __init__(self, layer: int):
        self.layer = layer
        self._handle = None

    def attach(self, backbone: nn.Module) -> None:
        """Hook decoder layer `layer` of `backbone` (a `*ForCausalLM`). Idempotent: an earlier hook (on this
        backbone or a replaced one) is removed first."""
        self.detach()
        base = backbone.base_model
        decoder_layers = getattr(base, "layers", None) or getattr(base, "h", None)
        if not isinstance(decoder_layers, nn.ModuleList) or not self.layer < len(decoder_layers):
            raise ValueError(
                f"metadata_layer={self.layer} adds the metadata at the input of that decoder layer of the backbone, "
                f"found as `layers` (Llama, Qwen2, ...) or `h` (GPT-2) on its base model; {type(base).__name__} "
                "has no such layer."
            )
        self._handle = decoder_layers[self.layer].register_forward_pre_hook(
            _InjectionHook(self), with_kwargs=True
        )

    def detach(self) -> None:
        """Remove the hook (the backbone then runs without metadata)."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None

    @staticmethod
    def check_applied(state: MetadataInjectionState) -> None:
        """Raise if the backbone ran without calling the hook with `state` (it did not hand its keywords on to its
        decoder layers, or the hook was detached): the metadata would be silently missing."""
        if state.fed is None and not torch.compiler.is_compiling():
            raise ValueError(
                "The metadata was not added at the decoder layer `config.metadata_layer`: the backbone did not pass "
                f"`{STATE_KEYWORD}` on to its decoder layers, or the injection hook was detached "
                "(`model.metadata_injection.attach(model.language_model)` puts it back)."
            )


__all__ = ["LimeMetadataInjection", "MetadataInjectionState"]
