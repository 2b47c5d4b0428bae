"""Where the tags of generated tokens come from during `generate`: guidance and metadata providers.

A LIME model (shift 0) needs the tags of every token it is fed, generated ones included: a *provider* gives them
(`AnnotatingProvider` re-annotates the decoded tail, `UnknownProvider` says "unknown", `ModelTagProvider` asks
the model's own tag heads, or a user callable). A LIME+1 model (shift 1) is fed, at the last position, the tags of
the token it is about to generate: *guidance* gives them (a schedule of labels per row, or a callable); where
guidance ends, the provider takes over. `metadata_tracker.MetadataTracker` decides when each is asked.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``,
``transformers`` and flat siblings.
"""

from collections.abc import Callable, Sequence

import torch

from .configuration_lime import UNKNOWN_ID
from .tag_heads import check_tag_heads

# (input_ids `(rows, seq)`, step) -> field -> one label (str) or tag id (int) per row; `None` = no opinion.
MetadataCallable = Callable[[torch.LongTensor, int], dict[str, Sequence[str | int | None]]]
GuidanceCallable = Callable[[torch.LongTensor, int], Sequence[str | int | None]]


def label_id(metadata_fields: dict[str, list[str]], field: str, label: str | int) -> int:
    """The id of `label` (a label string or an id) in `field`'s inventory; ValueError listing valid labels."""
    labels = metadata_fields[field]
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
        return label
    if isinstance(label, str) and label in labels:
        return labels.index(label)
    raise ValueError(f"Unknown label {label!r} for metadata field '{field}'. Valid labels: {labels[3:]}.")


class UnknownProvider:
    """Every generated token's tags are "unknown" (they embed to zero)."""

    def __call__(self, input_ids: torch.LongTensor, step: int) -> dict[str, list[int]]:
        return {}


class AnnotatingProvider:
    """Re-annotates the decoded tail of each row (a LIME model's default) to tag its last token.

    Only the last `window` tokens are decoded and annotated at each step, so the cost per token does not
    grow with the length of the text. Used with a LIME+1 model it returns unknown: the tags of a token that
    does not exist yet cannot be annotated.
    """

    def __init__(self, tokenizer, window: int = 32):
        self.tokenizer = tokenizer
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, step: int) -> dict[str, list[int]]:
        rows = [self.tokenizer.metadata_for_ids(row[-self.window :].tolist()) for row in input_ids]
        return {field: [tags[field][-1] for tags in rows] for field in self.tokenizer.metadata_fields}


def resolve_provider(metadata_provider, tokenizer, metadata_shift: int) -> Callable:
    """`"annotate"` (the default for LIME when a LimeTokenizer is given), `"unknown"` or a callable; the names'
    rules are `rules.check_generation_request`'s (checked before)."""
    if metadata_provider is None:
        metadata_provider = "annotate" if tokenizer is not None and not metadata_shift else "unknown"
    if callable(metadata_provider):
        return metadata_provider
    if metadata_provider == "unknown":
        return UnknownProvider()
    if not hasattr(tokenizer, "metadata_for_ids"):
        raise ValueError(
            "metadata_provider='annotate' re-annotates the generated text and needs the LimeTokenizer: "
            "pass `tokenizer=` to `generate`."
        )
    return AnnotatingProvider(tokenizer)


def parse_guidance(
    guidance: dict[str, Sequence | GuidanceCallable] | None,
    metadata_fields: dict[str, list[str]],
    batch_size: int,
) -> dict[str, list[list[int]] | GuidanceCallable]:
    """Validate guidance: field -> one schedule of labels per batch row (or one for all rows), or a callable.

    Returns field -> per-row lists of tag ids, or the callable unchanged.
    """
    parsed = {}
    for field, schedule in (guidance or {}).items():
        if callable(schedule):
            parsed[field] = schedule
            continue
        if isinstance(schedule, str) or not isinstance(schedule, Sequence):
            raise ValueError(
                f"Guidance for '{field}' must be a list of labels per batch row (e.g. [['VBZ', 'DT']]), a list "
                f"of labels for every row, or a callable (input_ids, step) -> labels; got {schedule!r}."
            )
        if all(isinstance(item, (str, int)) for item in schedule):
            schedule = [schedule] * batch_size
        if len(schedule) != batch_size:
            raise ValueError(
                f"Guidance for '{field}' has {len(schedule)} schedules but the batch has {batch_size} rows."
            )
        parsed[field] = [[label_id(metadata_fields, field, label) for label in row] for row in schedule]
    return parsed


class ModelTagProvider:
    """`metadata_provider="model"`: the tag heads give the tags of generated tokens, on the model's device.

    For LIME it tags each generated token; for LIME+1 it predicts the next token's tags where guidance is absent
    (self-guidance). The tracker keeps the last hidden states and calls this with the state before the prefix's
    last token and that token, so each tag is a pure function of the prefix (the same with and without the KV
    cache, and under beam reordering). It gives the ids of every field as one `(rows, 1, fields)` tensor, which stays
    on the device; fields without a head get "unknown".

    Args:
        model: the `LimeForCausalLM` (with tag heads).
        attention_mask: `(batch, prompt_len)` mask of the prompt (left padding), if any.
        self_guidance: `"argmax"` or `"sample"` (draw from the head's softmax); default `config.self_guidance`.
    """

    uses_hidden_states = True

    def __init__(self, model, attention_mask: torch.Tensor | None = None, self_guidance: str | None = None):
        check_tag_heads(model)
        self.model = model
        self.attention_mask = attention_mask
        self.sample = (self_guidance or model.config.self_guidance) == "sample"
        # Resolved once per `generate` call: finding them walks the backbone's modules, and this runs every step.
        self.heads = model.tag_heads
        self.embeddings = model.get_input_embeddings()
        fields = list(model.config.metadata_fields)
        # Where each head's field sits among the model's fields (`None`: every field has a head, in order).
        self.columns = [fields.index(name) for name in self.heads.fields]
        if self.columns == list(range(len(fields))):
            self.columns = None
        self.num_fields = len(fields)

    def __call__(self, previous_hidden: torch.Tensor, tokens: torch.LongTensor) -> torch.LongTensor:
        """`(rows, 1, hidden)` states before each row's last token, `(rows, 1)` those tokens -> `(rows, 1, fields)`
        tag ids of the model's fields, in its order (one position per row, as the forward reads them)."""
        embeds = self.embeddings(tokens.to(previous_hidden.device))
        logits = self.heads.stacked_logits(previous_hidden, embeds)
        if self.sample:
            predicted = torch.stack(
                list(self.heads.predict(self.heads.unstack(logits), sample=True).values()), dim=-1
            )
        else:
            predicted = self.heads.predict_stacked(logits)
        if self.columns is None:
            return predicted
        tags = torch.full((*predicted.shape[:2], self.num_fields), UNKNOWN_ID, device=predicted.device)
        tags[..., self.columns] = predicted
        return tags

    def prompt_states(
        self,
        prompt_ids: torch.LongTensor,
        prompt_metadata: dict[str, torch.LongTensor],
        batch_rows: list[int],
    ) -> torch.Tensor:
        """`(rows, hidden)`: the hidden state before each prompt's last token (LIME+1's first self-guided tag).

        The prompt without its last token is run once; where it is empty or ends in padding, the start state.
        """
        heads = self.heads
        rows, length = prompt_ids.shape
        start = heads.start_state.expand(rows, -1)
        if length < 2:
            return start
        mask = None if self.attention_mask is None else self.attention_mask[batch_rows].to(prompt_ids.device)
        head_ids = {f"{name}_ids": tags[:, :-1] for name, tags in prompt_metadata.items()}
        extra = {"next_metadata_ids": {name: tags[:, -1] for name, tags in prompt_metadata.items()}}
        if mask is not None:
            extra["attention_mask"] = mask[:, :-1]
            extra["position_ids"] = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
        # Only the hidden states are read: no logits or tag logits past the last position.
        outputs = self.model(
            input_ids=prompt_ids[:, :-1], use_cache=False, logits_to_keep=1, **head_ids, **extra
        )
        previous = outputs.last_hidden_state[:, -1]
        if mask is not None:
            previous = torch.where((mask[:, -2] == 0)[:, None], start, previous)
        return previous


__all__ = [
    "AnnotatingProvider",
    "GuidanceCallable",
    "MetadataCallable",
    "ModelTagProvider",
    "UnknownProvider",
    "label_id",
    "parse_guidance",
    "resolve_provider",
]
