"""Tag heads: a LIME model predicts the metadata it is fed, from its own causal states.

For position i a field's head reads the previous position's final hidden state `h_{i-1}` (a learned start state
at the first position and after padding) together with the token embedding `E_tok(t_i)`, and predicts the tag
that position i is *fed*:

    LIME   (shift 0): a_i      the tag of token i (the token just generated);
    LIME+1 (shift 1): a_{i+1}  the tag of the next token (self-guidance).

`h_{i-1}` has only seen the tags fed to positions < i (a_{<i} for LIME, a_{<=i} for LIME+1), never the target,
so the prediction is causal and a pure function of the prefix t_{<=i}. In generation it costs no extra forward
pass: the previous step computed `h_{i-1}`, and `E_tok(t_i)` is a lookup. Trained jointly with the LM loss:

    loss = lm_loss + tag_loss_weight * sum_f CE(head_f(h_{i-1}, E_tok(t_i)), fed tag_f(i))

With `config.metadata_layer = k > 0` the heads read another input: the input of decoder layer k at position i
itself, `h^k_i`, which has seen the tokens t_{<=i} and no tag at all (the metadata joins after it, see
`metadata_injection.py`). The prediction is again a pure function of t_{<=i}, and it is made inside the one
forward pass (`start_state` and `token_norm` do not exist then: `h^k_i` holds `E_tok(t_i)` already).

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``,
``transformers`` and its flat siblings.
"""

import dataclasses
from collections import OrderedDict

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .compat import output_cache
from .configuration_lime import PAD_ID, UNKNOWN_ID
from .stacked_fields import StackedParameters, parameters_fixed

IGNORE_INDEX = -100


@dataclasses.dataclass
class LimeCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    `CausalLMOutputWithPast` of a model with tag heads. `loss` is `lm_loss + tag_loss_weight * sum(tag_losses)`.

    lm_loss (`torch.FloatTensor` of shape `()`, *optional*): the next-token loss alone (when `labels` are given).
    tag_losses (`dict[str, torch.FloatTensor]`, *optional*): field -> the head's cross-entropy against the fed tags
        (when `labels` and the field's tags are given).
    tag_logits (`dict[str, torch.FloatTensor]`, *optional*): field -> `(batch, seq, labels)` head logits, when
        every position's logits are kept (`logits_to_keep=0`, as in training and evaluation).
    last_hidden_state (`torch.FloatTensor` of shape `(batch, seq, hidden)`): the backbone's final hidden states,
        which the heads read at the next position (generation keeps the last one per prefix); `None` with
        `metadata_layer > 0`, whose heads read the input of layer k instead.
    fed_metadata_ids (`dict[str, torch.LongTensor]`, *optional*): with `metadata_layer > 0`, when every position's
        logits are kept, field -> `(batch, seq)`
        the tag each position read: given where known, else the heads' argmax (LIME+1: the next token's tag).
    """

    lm_loss: torch.FloatTensor | None = None
    tag_losses: dict[str, torch.FloatTensor] | None = None
    tag_logits: dict[str, torch.FloatTensor] | None = None
    last_hidden_state: torch.FloatTensor | None = None
    fed_metadata_ids: dict[str, torch.LongTensor] | None = None

    def __setattr__(self, name: str, value) -> None:
        # `ModelOutput.__setattr__` reads the dataclass fields at every assignment, and `__init__` assigns all ten:
        # ~150 Python calls per output, at every generation step of a model with heads. For one of its own fields
        # it does just this; any other name goes to it.
        if name not in _OUTPUT_FIELDS:
            return super().__setattr__(name, value)
        if value is not None:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)


_OUTPUT_FIELDS = frozenset(field.name for field in dataclasses.fields(LimeCausalLMOutputWithPast))


class LimeTagHeads(nn.Module):
    """One classifier per field of `config.tag_head_fields` reading `[h_{i-1}; E_tok(t_i)]` (`metadata_layer = 0`), or
    `h^k_i`, the input of decoder layer k at position i (`metadata_layer = k > 0`), normalised: over a shared hidden
    layer (`tag_head_type="mlp"`) or directly (`"linear"`)."""

    def __init__(self, config):
        super().__init__()
        hidden_size = config.get_text_config().hidden_size
        self.shift = config.metadata_shift
        self.loss_weight = config.tag_loss_weight
        self.reads_previous_state = not config.metadata_layer
        if self.reads_previous_state:
            self.start_state = nn.Parameter(torch.zeros(hidden_size))
            self.token_norm = nn.LayerNorm(hidden_size)
        # Each input normalised on its own: the final hidden state and a raw embedding differ widely in scale.
        self.hidden_norm = nn.LayerNorm(hidden_size)
        width = (2 if self.reads_previous_state else 1) * hidden_size
        # "linear" has no shared layer: the tags must be linearly readable from the state itself.
        self.proj = nn.Linear(width, hidden_size) if config.tag_head_type == "mlp" else None
        self.act = nn.GELU() if self.proj is not None else None
        features = hidden_size if self.proj is not None else width
        self.classifiers = nn.ModuleDict(
            {name: nn.Linear(features, len(config.metadata_fields[name])) for name in config.tag_head_fields}
        )
        self.fields = tuple(config.tag_head_fields)
        self.sizes = [len(config.metadata_fields[name]) for name in self.fields]
        self._stacked = StackedParameters()
        self._label_masks: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def reset_parameters(self, std: float = 0.02) -> None:
        """Initialise every weight (used where the heads are built on the meta device, e.g. `from_backbone`)."""
        with torch.no_grad():
            if self.reads_previous_state:
                self.start_state.zero_()
                self.token_norm.reset_parameters()
            self.hidden_norm.reset_parameters()
            shared = [self.proj] if self.proj is not None else []
            for layer in (*shared, *self.classifiers.values()):
                layer.weight.normal_(0.0, std)
                layer.bias.zero_()

    def previous_states(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(batch, seq, hidden)` -> `h_{i-1}` for every position i: the start state at 0 and after padding.

        The input is taken to start its sequence: after a KV cache, the first position's true `h_{i-1}` is in
        the previous call (generation and `self_tagged_forward` keep it themselves).
        """
        start = self.start_state.to(hidden_states.dtype).expand(hidden_states.shape[0], 1, -1)
        previous = torch.cat([start, hidden_states[:, :-1]], dim=1)
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask[
                :, -hidden_states.shape[1] :
            ]  # a cached call's mask covers the cache
            after_padding = torch.cat(
                [torch.ones_like(attention_mask[:, :1], dtype=torch.bool), attention_mask[:, :-1] == 0], dim=1
            )
            previous = torch.where(after_padding[..., None], start, previous)
        return previous

    def forward(
        self, hidden: torch.Tensor, token_embeds: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """`(batch, seq, hidden)` states -> field -> `(batch, seq, labels)` logits of the fed tags.

        `hidden` is `h_{i-1}` with `token_embeds` `E_tok(t_i)` (`metadata_layer = 0`), or `h^k_i` alone (k > 0).
        """
        return self.unstack(self.stacked_logits(hidden, token_embeds))

    def stacked_logits(self, hidden: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`forward`'s logits as one tensor `(batch, seq, fields, width)`: field `self.fields[f]` at `[..., f, :size]`
        (`width`: the largest inventory; the rest of a row is zero). One matmul for every field."""
        features = self.hidden_norm(hidden)
        if self.reads_previous_state:
            features = torch.cat([features, self.token_norm(token_embeds.to(hidden.dtype))], dim=-1)
        if self.proj is not None:
            features = self.act(self.proj(features))
        weight, bias = self._stacked_classifier()
        return nn.functional.linear(features, weight, bias).unflatten(-1, (len(self.fields), -1))

    def unstack(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        """`(..., fields, width)` -> field -> `(..., labels)`: views of each field's labels."""
        return {
            name: stacked[..., f, :size]
            for f, (name, size) in enumerate(zip(self.fields, self.sizes, strict=True))
        }

    def _stacked_classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifiers as one linear layer, weight `(fields * width, features)` and bias, each field's rows
        padded with zeros to `width`."""
        return self._stacked.get(self._stack_classifiers)

    def _stack_classifiers(self) -> tuple[torch.Tensor, torch.Tensor]:
        layers = [self.classifiers[name] for name in self.fields]
        pad = [max(self.sizes) - size for size in self.sizes]
        weight = torch.cat(
            [nn.functional.pad(layer.weight, (0, 0, 0, n)) for layer, n in zip(layers, pad, strict=True)]
        )
        bias = torch.cat(
            [nn.functional.pad(layer.bias, (0, n)) for layer, n in zip(layers, pad, strict=True)]
        )
        return weight, bias

    def _label_mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`(fields, width)`: `-inf` where no label is (padding, unknown and each row's zero tail), else 0. It depends
        on the inventories alone, so it is kept for good (per device and dtype)."""
        key = (device, dtype)
        if key not in self._label_masks:
            mask = torch.full((len(self.fields), max(self.sizes)), float("-inf"), device=device, dtype=dtype)
            for f, size in enumerate(self.sizes):
                mask[f, UNKNOWN_ID + 1 : size] = 0.0
            self._label_masks[key] = mask
        return self._label_masks[key]

    def fed_tags(self, tags: torch.LongTensor) -> torch.LongTensor:
        """The tag each position is fed, from the tokens' own tags `(batch, seq)`; the last LIME+1 one is unknown."""
        if not self.shift:
            return tags
        return torch.cat([tags[:, 1:], torch.full_like(tags[:, :1], UNKNOWN_ID)], dim=1)

    def losses(
        self,
        tag_logits: dict[str, torch.Tensor],
        metadata_ids: dict[str, torch.LongTensor],
        attention_mask: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Cross-entropy of each head whose field's tags are given; padding, unknown and masked positions ignored.

        With `num_items_in_batch` (the Trainer's count of labelled tokens over an accumulated batch) the sum is
        divided by it, like the LM loss, so gradient accumulation weighs both losses alike.
        """
        losses = {}
        for name, logits in tag_logits.items():
            if name not in metadata_ids:
                continue
            targets = self.fed_tags(metadata_ids[name])
            ignored = (targets == PAD_ID) | (targets == UNKNOWN_ID)
            if attention_mask is not None and attention_mask.dim() == 2:
                ignored |= attention_mask == 0
            targets = targets.masked_fill(ignored, IGNORE_INDEX)
            loss = nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
            losses[name] = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        return losses

    def weighted_loss(
        self, tag_logits: dict[str, torch.Tensor], losses: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """`tag_loss_weight * sum(losses)`, the heads' part of the training loss. A head whose field has no tags in
        this batch still joins the graph with an exact zero (DDP needs every parameter used)."""
        unused = sum(logits.sum() * 0.0 for name, logits in tag_logits.items() if name not in losses)
        return self.loss_weight * sum(losses.values()) + unused

    def predict(
        self, tag_logits: dict[str, torch.Tensor], sample: bool = False
    ) -> dict[str, torch.LongTensor]:
        """Field -> tag ids from head logits (any leading shape): argmax, or a draw from the softmax.

        Padding and unknown are never predicted: the heads are not trained on them.
        """
        predicted = {}
        first = UNKNOWN_ID + 1  # ids 0 (padding) and 1 (unknown) precede every label
        for name, logits in tag_logits.items():
            logits = logits[..., first:].float()
            if sample:
                ids = torch.multinomial(logits.flatten(0, -2).softmax(-1), 1).view(logits.shape[:-1])
            else:
                ids = logits.argmax(-1)
            predicted[name] = ids + first
        return predicted

    def predict_stacked(self, stacked: torch.Tensor) -> torch.LongTensor:
        """`predict`'s argmax on `stacked_logits`: `(..., fields, width)` -> `(..., fields)` tag ids, in one
        operation (padding, unknown and each row's zero tail are masked out)."""
        return (stacked + self._label_mask(stacked.device, stacked.dtype)).argmax(-1)

    def probabilities_stacked(self, stacked: torch.Tensor) -> torch.Tensor:
        """The heads' softmax on `stacked_logits`: `(..., fields, width)` -> the same shape, zero on padding, unknown
        and each row's zero tail (the labels `predict_stacked` chooses from)."""
        return (stacked + self._label_mask(stacked.device, stacked.dtype)).softmax(-1)


def check_tag_heads(model) -> None:
    """Raise unless `model` has tag heads (for `metadata_provider="model"` and the self-tagged evaluation)."""
    if getattr(model, "tag_heads", None) is None:
        raise ValueError(
            "metadata_provider='model' and self-tagging need tag heads, and this model has none. Train it with "
            "`LimeConfig(tag_head_fields=['pos', 'ner'], ...)` (or grow them on a checkpoint with "
            "`from_pretrained(..., tag_head_fields=[...])` / `from_backbone(..., tag_head_fields=[...])`)."
        )


@torch.no_grad()
@parameters_fixed()  # one step per position: the stacked heads and tables are built once
def self_tagged_forward(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    prompt_metadata: dict[str, torch.LongTensor] | None = None,
    prompt_length: int = 0,
    sample: bool = False,
) -> tuple[torch.FloatTensor, dict[str, torch.LongTensor]]:
    """The honest evaluation: the model reads `input_ids` fed only its own causal tag predictions.

    Position by position (with the KV cache), the heads predict the tag position i is fed from `h_{i-1}` and
    `E_tok(t_i)`; that tag goes in, and `h_i` comes out. Only the first `prompt_length` tokens may carry given tags
    (`prompt_metadata`, tags of the tokens themselves, which should be prefix-only tags); a LIME+1 model's last
    prompt position is fed the predicted tag of the first token after the prompt. Fields without a head are
    unknown after the prompt.

    Args:
        model: a `LimeForCausalLM` with tag heads.
        input_ids: `(batch, seq)`; attention_mask: `(batch, seq)` (left padding allowed).
        prompt_metadata: field -> `(batch, >= prompt_length)` given tags.
        prompt_length: how many leading tokens take their given tags.
        sample: draw the predicted tags from the heads' softmax instead of the argmax.

    Returns:
        `(batch, seq, vocab)` logits and field -> `(batch, seq)` the tags each position was fed.

    With `metadata_layer > 0` this is one parallel forward (the heads fill the unknown tags inside it; argmax only).
    """
    check_tag_heads(model)
    if model.config.metadata_layer:
        return _in_pass_forward(model, input_ids, attention_mask, prompt_metadata, prompt_length, sample)
    heads, shift = model.tag_heads, model.config.metadata_shift
    prompt_metadata = prompt_metadata or {}
    batch, length = input_ids.shape
    fields = list(model.config.metadata_fields)
    fed = {name: torch.full_like(input_ids, UNKNOWN_ID) for name in fields}
    given_until = max(prompt_length - shift, 0)  # LIME+1 position i is fed a_{i+1}
    for name, tags in prompt_metadata.items():
        fed[name][:, :given_until] = heads.fed_tags(tags[:, :prompt_length])[:, :given_until]
    embeddings = model.get_input_embeddings()
    previous = heads.start_state.expand(batch, -1)
    positions = None if attention_mask is None else (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache_kwargs, logits = {}, []
    for i in range(length):
        token = input_ids[:, i : i + 1]
        predicted = heads.predict(heads(previous[:, None], embeddings(token)), sample=sample)
        for name, ids in predicted.items():
            if i >= given_until or name not in prompt_metadata:
                fed[name][:, i] = ids[:, 0]
        step = {"input_ids": token, "use_cache": True, **cache_kwargs}
        if shift:
            step["next_metadata_ids"] = {name: fed[name][:, i] for name in fields}
        else:
            step.update({f"{name}_ids": fed[name][:, i : i + 1] for name in fields})
        if attention_mask is not None:
            step["attention_mask"] = attention_mask[:, : i + 1]
            step["position_ids"] = positions[:, i : i + 1]
        outputs = model(**step)
        cache_kwargs = {"cache": output_cache(outputs)}
        logits.append(outputs.logits[:, -1:])
        previous = outputs.last_hidden_state[:, -1]
        if attention_mask is not None:
            previous = torch.where((attention_mask[:, i] == 0)[:, None], heads.start_state, previous)
    return torch.cat(logits, dim=1), fed


def _in_pass_forward(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    prompt_metadata: dict[str, torch.LongTensor] | None,
    prompt_length: int,
    sample: bool,
) -> tuple[torch.FloatTensor, dict[str, torch.LongTensor]]:
    """`self_tagged_forward` of a model with `metadata_layer > 0`: the prompt's tags given, the rest unknown."""
    if sample:
        raise ValueError(
            "With `metadata_layer` > 0 the heads tag inside the forward pass by their argmax: `sample=True` has no "
            "meaning there."
        )
    given = {}
    for name, tags in (prompt_metadata or {}).items():
        given[f"{name}_ids"] = torch.full_like(input_ids, UNKNOWN_ID)
        given[f"{name}_ids"][:, :prompt_length] = tags[:, :prompt_length]
    extra = {}
    if attention_mask is not None:
        extra["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **given, **extra)
    return outputs.logits, outputs.fed_metadata_ids


def self_tags(
    model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
) -> tuple[dict[str, torch.LongTensor], dict[str, torch.LongTensor]]:
    """The tags a model with heads gives `input_ids` itself, in the form `forward` takes them.

    Runs `self_tagged_forward` (one incremental step per position) and returns field -> `(batch, seq)` tags of
    the tokens themselves (`<field>_ids`) and field -> `(batch,)` `next_metadata_ids`: empty for LIME; for
    LIME+1 the predicted tag of the token after the input (a LIME+1 model never reads its first token's own
    tag, which is left unknown).
    """
    _, fed = self_tagged_forward(model, input_ids, attention_mask)
    if not model.config.metadata_shift:
        return fed, {}
    unknown = torch.full_like(input_ids[:, :1], UNKNOWN_ID)
    token_tags = {name: torch.cat([unknown, ids[:, :-1]], dim=1) for name, ids in fed.items()}
    return token_tags, {name: ids[:, -1] for name, ids in fed.items()}


__all__ = [
    "LimeCausalLMOutputWithPast",
    "LimeTagHeads",
    "check_tag_heads",
    "self_tagged_forward",
    "self_tags",
]
