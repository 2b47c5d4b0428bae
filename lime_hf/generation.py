"""Metadata for generated tokens: providers, guidance and the per-row tag bookkeeping of `generate`.

A LIME model (shift 0) needs the tags of every token it is fed, generated ones included: a *provider* gives
them (re-annotating the decoded tail, "unknown", the model's own tag heads, or a user callable). A LIME+1 model (shift 1) is fed, at
the last position, the tags of the token it is about to generate: *guidance* gives them (a schedule of
labels per row, or a callable); where guidance ends, the provider takes over.

Every generated token's tags are a pure function of its row's prompt and the tokens generated before it
(and, for shift 0, of the token itself). `MetadataTracker` memoises them by that prefix, which keeps the
output identical with and without the KV cache and lets beam search reorder rows freely.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``
and flat siblings.
"""

from collections.abc import Callable, Sequence

import torch

from .configuration_lime import UNKNOWN_ID

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
    """`"annotate"` (the default when a LimeTokenizer is given), `"unknown"` or a callable."""
    if metadata_provider is None:
        metadata_provider = "annotate" if tokenizer is not None and not metadata_shift else "unknown"
    if callable(metadata_provider):
        return metadata_provider
    if metadata_provider == "unknown":
        return UnknownProvider()
    if metadata_provider == "annotate":
        if metadata_shift:
            raise ValueError(
                "metadata_provider='annotate' tags tokens that exist; a LIME+1 model needs the tags of the token "
                "it is about to generate. Give `guidance`, or a callable provider, or 'unknown'."
            )
        if not hasattr(tokenizer, "metadata_for_ids"):
            raise ValueError(
                "metadata_provider='annotate' re-annotates the generated text and needs the LimeTokenizer: "
                "pass `tokenizer=` to `generate`."
            )
        return AnnotatingProvider(tokenizer)
    raise ValueError(
        f"metadata_provider must be 'annotate', 'unknown', 'model' (the model's tag heads) or a callable "
        f"(input_ids, step) -> tags, got {metadata_provider!r}."
    )


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
        if field not in metadata_fields:
            raise ValueError(
                f"Guidance names unknown metadata field '{field}'; fields: {list(metadata_fields)}."
            )
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


class _PrefixNode:
    """A generated prefix in a trie: the tags of the token it determines, and its one-token extensions.

    A trie keeps memory linear in the tokens generated; a dict keyed by whole prefixes grows quadratically.
    """

    __slots__ = ("children", "hidden", "parent", "tags")

    def __init__(self, parent: "_PrefixNode | None" = None):
        self.children: dict[int, _PrefixNode] = {}
        self.tags: dict[str, int] | None = None
        self.parent = parent
        self.hidden: torch.Tensor | None = None  # final hidden state at the prefix's last token (tag heads)

    def descend(self, tokens: list[int]) -> "_PrefixNode":
        """The node of this prefix extended by `tokens`, created on the way where missing."""
        node = self
        for token in tokens:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _PrefixNode(node)
            node = child
        return node


class MetadataTracker:
    """Tags of prompt and generated tokens during `generate`, memoised per row prefix (beams reorder and
    fork rows, and without a KV cache every position is re-fed at every step).

    Args:
        prompt_metadata: field -> `(rows, prompt_len)` tags of the (expanded) prompt; missing fields are unknown.
        prompt_ids: `(rows, prompt_len)` the expanded prompt.
        metadata_fields: the model's inventories.
        metadata_shift: 0 (LIME) or 1 (LIME+1).
        provider: tags of generated tokens where guidance has none (see `resolve_provider`).
        guidance: parsed guidance (see `parse_guidance`), indexed by *batch* row.

    `generate` expands rows for beams and `num_return_sequences` (`repeat_interleave`) after this is built;
    row `r` of the expanded batch is batch row `r // expansion`.
    """

    def __init__(
        self,
        prompt_metadata: dict[str, torch.LongTensor],
        prompt_ids: torch.LongTensor,
        metadata_fields: dict[str, list[str]],
        metadata_shift: int,
        provider: Callable,
        guidance: dict[str, list[list[int]] | GuidanceCallable],
    ):
        self.fields = list(metadata_fields)
        self.metadata_fields = metadata_fields
        self.shift = metadata_shift
        self.provider = provider
        self.guidance = guidance
        self.batch_size, self.prompt_len = prompt_ids.shape
        self.batch_prompt_metadata = {
            field: prompt_metadata.get(field, torch.full_like(prompt_ids, UNKNOWN_ID))
            for field in self.fields
        }
        self.expansion = 1
        self.prompt_metadata = self.batch_prompt_metadata
        self.prefixes = [_PrefixNode() for _ in range(self.batch_size)]
        # A provider reading hidden states (the tag heads) needs each prefix's last state: `record_hidden`.
        self.uses_hidden_states = getattr(provider, "uses_hidden_states", False)
        self._fed_nodes: list[_PrefixNode] = []
        self._last_nodes: tuple[int, list[_PrefixNode]] = (-1, [])  # (prefix end, nodes) of the last lookup

    def model_inputs(self, input_ids: torch.LongTensor, length: int) -> dict:
        """`<field>_ids` for the last `length` positions of `input_ids` (+ LIME+1's `next_metadata_ids`)."""
        inputs = self._tags(input_ids, range(input_ids.shape[1] - length, input_ids.shape[1]))
        if self.shift:
            next_tags = self._generated_tags(input_ids, input_ids.shape[1])
            inputs["next_metadata_ids"] = {
                field: torch.tensor(next_tags[field], device=input_ids.device) for field in self.fields
            }
        if self.uses_hidden_states:  # usually `_generated_tags` just found these nodes
            full = input_ids.shape[1]
            self._fed_nodes = (
                self._last_nodes[1] if self._last_nodes[0] == full else self._nodes(input_ids, full)
            )
        return inputs

    def record_hidden(self, last_hidden: torch.Tensor) -> None:
        """Keep the final states `(rows, new positions, hidden)` of the forward just run, for the prefixes fed.

        Each prefix ending at a new position keeps its state; walking up from the longest stops at the first
        prefix that has one already (without a KV cache every position is re-fed).
        """
        for row, node in enumerate(self._fed_nodes):
            for position in range(last_hidden.shape[1] - 1, -1, -1):
                if node is None or node.hidden is not None:
                    break
                node.hidden = last_hidden[row, position]
                node = node.parent

    def _nodes(self, input_ids: torch.LongTensor, prefix_end: int) -> list[_PrefixNode]:
        generated = input_ids[:, self.prompt_len : prefix_end].tolist()
        return [self.prefixes[row // self.expansion].descend(tokens) for row, tokens in enumerate(generated)]

    def metadata_ids(self, sequences: torch.LongTensor) -> dict[str, torch.LongTensor]:
        """`<field>_ids` `(rows, seq)` of every position of `generate`'s output `sequences`.

        A LIME model never fed its last generated token; its tags are computed here as the next step would
        have, so that continuing from `sequences` with them feeds what one longer call would have fed.
        """
        return self._tags(sequences, range(sequences.shape[1]))

    def _tags(self, input_ids: torch.LongTensor, positions: range) -> dict[str, torch.LongTensor]:
        """`<field>_ids` `(rows, len(positions))` of `input_ids` at `positions`."""
        self._expand_to(input_ids.shape[0])
        columns = [self._columns(input_ids, position) for position in positions]  # one trie walk per position
        return {
            f"{field}_ids": torch.stack([column[index] for column in columns], 1)
            for index, field in enumerate(self.fields)
        }

    def _expand_to(self, rows: int) -> None:
        """Beams and `num_return_sequences` repeat each batch row; prompt tags follow (`repeat_interleave`)."""
        if rows != self.batch_size * self.expansion:
            self.expansion = rows // self.batch_size
            self.prompt_metadata = {
                field: tags.repeat_interleave(self.expansion, dim=0)
                for field, tags in self.batch_prompt_metadata.items()
            }

    def _columns(self, input_ids: torch.LongTensor, position: int) -> torch.LongTensor:
        """`(fields, rows)`: every field's tags at `position`."""
        if position < self.prompt_len:
            return torch.stack([self.prompt_metadata[field][:, position] for field in self.fields]).to(
                input_ids.device
            )
        # LIME+1 fixed a generated token's tags before the token existed (as guidance for it).
        tags = self._generated_tags(input_ids, position + 1 - self.shift)
        return torch.tensor([tags[field] for field in self.fields], device=input_ids.device)

    def _generated_tags(self, input_ids: torch.LongTensor, prefix_end: int) -> dict[str, list[int]]:
        """Tags of the generated token that `input_ids[:, :prefix_end]` determines, per row."""
        step = prefix_end - self.prompt_len - (1 - self.shift)
        nodes = self._nodes(input_ids, prefix_end)
        self._last_nodes = (prefix_end, nodes)
        missing = [row for row, node in enumerate(nodes) if node.tags is None]
        if missing:
            batch_rows = [row // self.expansion for row in missing]
            computed = self._compute(input_ids[missing, :prefix_end], batch_rows, step, missing, nodes)
            for index, row in enumerate(missing):
                nodes[row].tags = {field: computed[field][index] for field in self.fields}
        return {field: [node.tags[field] for node in nodes] for field in self.fields}

    def _compute(
        self,
        input_ids: torch.LongTensor,
        batch_rows: list[int],
        step: int,
        rows: list[int],
        nodes: list[_PrefixNode],
    ) -> dict[str, list[int]]:
        """Guidance where it covers `step`, else the provider, else unknown (`rows`: the expanded rows)."""
        guided = {field: [None] * len(batch_rows) for field in self.fields}
        for field, schedule in self.guidance.items():
            if callable(schedule):
                guided[field] = list(schedule(input_ids, step))
            else:
                guided[field] = [schedule[b][step] if step < len(schedule[b]) else None for b in batch_rows]
        needs_provider = any(tag is None for tags in guided.values() for tag in tags)
        provided = {}
        if needs_provider and self.uses_hidden_states:
            provided = self.provider(self._previous_hidden(input_ids, rows, nodes), input_ids[:, -1])
        elif needs_provider:
            provided = self.provider(input_ids, step)
        result = {}
        for field in self.fields:
            fallback = provided.get(field, [None] * len(batch_rows))
            result[field] = [
                UNKNOWN_ID if tag is None else label_id(self.metadata_fields, field, tag)
                for tag in (g if g is not None else f for g, f in zip(guided[field], fallback, strict=True))
            ]
        return result

    def _previous_hidden(
        self, input_ids: torch.LongTensor, rows: list[int], nodes: list[_PrefixNode]
    ) -> torch.Tensor:
        """`(len(rows), hidden)`: the state before each prefix's last token, as recorded for its parent prefix.

        The prompt's own last token (LIME+1's first self-guided tag) has no recorded parent: the provider
        computes the state from the prompt once.
        """
        parents = [nodes[row].parent for row in rows]
        if any(parent is not None and parent.hidden is None for parent in parents):
            raise ValueError(
                "metadata_provider='model' tags a token from the state the model computed one position before it, "
                "so it feeds one new token per forward: it cannot check several candidate tokens at once "
                "(assisted or prompt-lookup decoding). Use another provider there."
            )
        if all(parent is not None for parent in parents):
            return torch.stack([parent.hidden for parent in parents])
        prompt_rows = [index for index, parent in enumerate(parents) if parent is None]
        prompt_states = self.provider.prompt_states(
            input_ids[prompt_rows, : self.prompt_len],
            {field: tags[[rows[i] for i in prompt_rows]] for field, tags in self.prompt_metadata.items()},
            [rows[i] // self.expansion for i in prompt_rows],
        )
        states = iter(prompt_states)
        return torch.stack([next(states) if parent is None else parent.hidden for parent in parents])
