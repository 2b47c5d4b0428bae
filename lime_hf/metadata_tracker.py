"""The tags `generate` feeds, step by step: which rule gives a generated token's tags and how they are kept.

A LIME model (shift 0) needs the tags of every token it is fed, generated ones included; a LIME+1 model (shift 1)
is fed, at the last position, the tags of the token it is about to generate. Guidance and the metadata providers
that give them live in `tag_providers.py`; this file decides when each is asked and keeps what they said.
`generation.py` (`LimeGenerationMixin.generate`) makes a tracker per call and reads it at every step.

The one difference between the two, in one rule: the tags of token `t` are decided by the prefix `t + 1 - shift`
tokens long (LIME tags a token once it exists; LIME+1 before it exists). `MetadataTracker.deciding_prefix` says it.

Every generated token's tags are a pure function of its row's prompt and the tokens before the deciding prefix's
end, given by one rule, `GeneratedTags`: guidance where it covers the token, else the provider, else unknown. How
they are kept depends on the decoding. Greedy and sampled decoding append one token to every row at each step:
`InPlaceTracker` decides each token's tags once, in order, and keeps them as growing columns. Beam search reorders
rows, assisted decoding checks several candidates, and without a KV cache every position is re-fed:
`PrefixTrieTracker` memoises the tags by their deciding prefix, which keeps the output identical with and without
the cache and under any reordering. A generation step is bound by its number of operations, not their arithmetic:
the tags stay tensors `(rows, 1, fields)` from the provider to the forward, which takes them as one tensor
(`stacked_fed_ids`) and does not check them again (they come from checked prompt tags, parsed guidance and the
providers, checked where they are made).

Which prompt each row grew from is recorded, not guessed (`RowRecord`): the batch row index travels as the model
kwarg `lime_rows`, which `generate` expands with every other kwarg (beams, `num_return_sequences`); each step writes
it into the call's record, which the tracker and the logits processors that need it (`MetaTokenPlacement`) read.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``,
``transformers`` and flat siblings.
"""

from collections.abc import Callable

import torch

from .configuration_lime import PAD_ID, UNKNOWN_ID
from .tag_providers import GuidanceCallable, UnknownProvider, label_id

ONE_TOKEN_PER_FORWARD = (
    "metadata_provider='model' tags a token from the state the model computed one position before it, so it feeds "
    "one new token per forward: it cannot check several candidate tokens at once (assisted or prompt-lookup "
    "decoding). Use another provider there."
)


class RowRecord:
    """Which batch row (prompt) each row of one `generate` call grew from.

    `generate` passes the batch row index as the model kwarg `lime_rows` and expands it with every other kwarg
    (beams, `num_return_sequences`); each step's `prepare_inputs_for_generation` writes the expanded tensor here,
    before any logits processor runs. `origins` is its list, converted once per call rather than every step.
    """

    __slots__ = ("_origins", "rows")

    def __init__(self):
        self.rows: torch.LongTensor | None = None
        self._origins: list[int] = []

    def update(self, rows: torch.LongTensor) -> None:
        if rows is not self.rows:  # the same tensor every step of a call
            self.rows, self._origins = rows, rows.tolist()

    def origins(self, count: int) -> list[int]:
        """The batch row of each of `count` rows (before the first step: each row its own)."""
        return self._origins if self.rows is not None else list(range(count))


class GeneratedTags:
    """The tags of a generated token, by one rule: guidance where it covers the token, else the provider, else unknown.

    Called with the prefix that decides the token (`MetadataTracker.deciding_prefix`), the token's step (the
    how-many-th generated token it is), each row's batch row and, for the tag heads, a function giving the state
    before the prefix's last token (`(rows, 1, hidden)`). Returns `(rows, 1, fields)` tag ids (one position per row:
    the layout the forward reads), checked where they are made (guidance by `parse_guidance`, a callable's labels
    by `label_id`, the heads' argmax within their inventories): the forward takes them without checking them again.

    A step's operations are its cost, so: list guidance is one `(steps, batch, fields)` table, made once; the unknown
    provider is never called; and with nothing else to ask (the unknown provider, no guidance callable) every step's
    tags are known in advance, and a step does no tensor operation at all.

    Args:
        metadata_fields: the model's inventories.
        provider: see `tag_providers.resolve_provider`; `ModelTagProvider` gives `(rows, 1, fields)` ids itself.
        guidance: parsed guidance (see `tag_providers.parse_guidance`), indexed by batch row.
        batch_size: the number of prompts.
        device: where the tags are made.
    """

    def __init__(
        self,
        metadata_fields: dict[str, list[str]],
        provider: Callable,
        guidance: dict[str, list[list[int]] | GuidanceCallable],
        batch_size: int,
        device: torch.device,
    ):
        self.fields = list(metadata_fields)
        self.metadata_fields = metadata_fields
        self.provider = provider
        self.device = device
        self.uses_hidden_states = getattr(provider, "uses_hidden_states", False)
        self.asks_provider = not isinstance(provider, UnknownProvider)
        self.callables = {field: schedule for field, schedule in guidance.items() if callable(schedule)}
        lists = {field: schedule for field, schedule in guidance.items() if not callable(schedule)}
        self.known_in_advance = not self.asks_provider and not self.callables
        steps = max((len(row) for schedule in lists.values() for row in schedule), default=0)
        # The lists' ids, -1 where they say nothing (unknown where nothing else will be asked).
        table = torch.full((steps, batch_size, 1, len(self.fields)), -1, dtype=torch.long)
        for index, field in enumerate(self.fields):
            for row, tags in enumerate(lists.get(field, ())):
                table[: len(tags), row, 0, index] = torch.tensor(tags, dtype=torch.long)
        if self.known_in_advance:
            table[table < 0] = UNKNOWN_ID
        self.table = table.to(device)
        # Per batch row: the steps at which every field has a tag from its list (a callable's field: any step).
        self.covered = [
            min(
                len(lists[f][row]) if f in lists else float("inf") if f in self.callables else 0
                for f in self.fields
            )
            for row in range(batch_size)
        ]
        self._by_rows: dict[tuple[int, ...], tuple] = {}

    def __call__(
        self,
        input_ids: torch.LongTensor,
        step: int,
        batch_rows: tuple[int, ...],
        previous_hidden: Callable[[], torch.Tensor],
    ) -> torch.LongTensor:
        covered, columns, unknown = self.for_rows(batch_rows)
        if self.known_in_advance:
            return columns[step] if step < len(columns) else unknown
        guided = columns[step] if step < len(columns) else None  # -1 where no list says
        complete = step < covered
        if self.callables:
            guided, complete = self._call_guidance(guided, complete, input_ids, step)
        if complete:
            return guided
        provided = self._provided(input_ids, step, previous_hidden, unknown)
        return provided if guided is None else torch.where(guided >= 0, guided, provided)

    def for_rows(self, batch_rows: tuple[int, ...]) -> tuple[float, list[torch.LongTensor], torch.LongTensor]:
        """For rows of these batch rows: the steps the lists cover, each step's `(rows, 1, fields)` list tags, and
        `(rows, 1, fields)` unknown (made once per set of rows: a decoding call asks for the same rows every step)."""
        entry = self._by_rows.get(batch_rows)
        if entry is None:
            columns = list(self.table[:, list(batch_rows)].unbind(0))
            covered = min(self.covered[row] for row in batch_rows)
            shape = (len(batch_rows), 1, len(self.fields))
            unknown = torch.full(shape, UNKNOWN_ID, dtype=torch.long, device=self.device)
            entry = self._by_rows[batch_rows] = (covered, columns, unknown)
        return entry

    def _call_guidance(
        self, guided: torch.LongTensor | None, complete: bool, input_ids: torch.LongTensor, step: int
    ) -> tuple[torch.LongTensor, bool]:
        """`guided` with the guidance callables' labels (-1 where they say `None`), and whether every tag is given."""
        rows = input_ids.shape[0]
        if guided is None:
            guided = torch.full((rows, 1, len(self.fields)), -1, dtype=torch.long, device=self.device)
        else:
            guided = guided.clone()
        for field, schedule in self.callables.items():
            labels = self._labels(field, schedule(input_ids, step), rows, "guidance callable", -1)
            complete = complete and -1 not in labels
            guided[:, 0, self.fields.index(field)] = torch.tensor(
                labels, dtype=torch.long, device=self.device
            )
        return guided, complete

    def _provided(
        self,
        input_ids: torch.LongTensor,
        step: int,
        previous_hidden: Callable[[], torch.Tensor],
        unknown: torch.LongTensor,
    ) -> torch.LongTensor:
        """`(rows, 1, fields)`: the provider's tags (unknown where it has none)."""
        if not self.asks_provider:
            return unknown
        if self.uses_hidden_states:  # the tag heads: ids from their argmax (or draw)
            return self.provider(previous_hidden(), input_ids[:, -1:])
        given = self.provider(input_ids, step)
        rows = input_ids.shape[0]
        columns = [
            self._labels(field, given[field], rows, "metadata provider", UNKNOWN_ID)
            if field in given
            else [UNKNOWN_ID] * rows
            for field in self.fields
        ]
        return torch.tensor(columns, dtype=torch.long, device=self.device).T[:, None]

    def _labels(self, field: str, labels, rows: int, source: str, none: int) -> list[int]:
        """One label (or id, or `None`) per row -> ids (`none` for `None`). Raises on a label outside the inventory."""
        labels = list(labels)
        if len(labels) != rows:
            raise ValueError(
                f"The {source} gave {len(labels)} '{field}' labels for {rows} rows: one per row."
            )
        size = len(self.metadata_fields[field])
        # An id in range (the common case) needs no `label_id` call.
        return [
            none
            if label is None
            else label
            if type(label) is int and 0 <= label < size
            else label_id(self.metadata_fields, field, label)
            for label in labels
        ]


class MetadataTracker:
    """The tags `generate` feeds: the prompt's, and those `GeneratedTags` gives each generated token; handed to the
    forward at every step (`model_inputs`) and returned with the output (`metadata_ids`).

    Every generated token's tags are a pure function of its row's prompt and of the prefix that decides them
    (`deciding_prefix`). How they are kept depends on the decoding: `InPlaceTracker` (greedy and sampling, where
    every step appends one token to each row) or `PrefixTrieTracker` (beam search, assisted decoding; see there).

    Args:
        prompt_metadata: field -> `(batch, prompt_len)` tags of the prompt (checked); missing fields are unknown.
        prompt_ids: `(batch, prompt_len)` the prompt.
        metadata_fields: the model's inventories.
        metadata_shift: 0 (LIME) or 1 (LIME+1).
        provider: tags of generated tokens where guidance has none (see `tag_providers.resolve_provider`).
        guidance: parsed guidance (see `tag_providers.parse_guidance`), indexed by batch row.
        stacked_inputs: whether the forward takes the tags each position reads as one tensor (`stacked_fed_ids`: a
            model adding its metadata to the input embeddings), else as `<field>_ids` and `next_metadata_ids` (a
            model adding it at decoder layer k, whose heads complete them).

    Each call names the batch row every row of `input_ids` grew from (`origins`): `generate` expands rows for beams
    and `num_return_sequences` after this is built.
    """

    def __init__(
        self,
        prompt_metadata: dict[str, torch.LongTensor],
        prompt_ids: torch.LongTensor,
        metadata_fields: dict[str, list[str]],
        metadata_shift: int,
        provider: Callable,
        guidance: dict[str, list[list[int]] | GuidanceCallable],
        stacked_inputs: bool = True,
    ):
        self.fields = list(metadata_fields)
        self.metadata_fields = metadata_fields
        self.shift = metadata_shift
        self.provider = provider
        self.stacked_inputs = stacked_inputs
        self.batch_size, self.prompt_len = prompt_ids.shape
        # `(batch, prompt_len, fields)`: a prompt position's tags for every field at once.
        self.prompt_tags = torch.stack(
            [prompt_metadata.get(field, torch.full_like(prompt_ids, UNKNOWN_ID)) for field in self.fields],
            dim=-1,
        )
        self.tags = GeneratedTags(metadata_fields, provider, guidance, self.batch_size, prompt_ids.device)
        # A provider reading hidden states (the tag heads) needs them: `record_hidden`.
        self.uses_hidden_states = self.tags.uses_hidden_states
        self._pad = torch.full((1, len(self.fields)), PAD_ID, dtype=torch.long, device=prompt_ids.device)

    def deciding_prefix(self, token: int) -> int:
        """The length of the prefix that decides the tags of the token at position `token`: LIME tags a token once
        it exists (`token + 1`), LIME+1 before it exists (`token`), as guidance for it."""
        return token + 1 - self.shift

    def model_inputs(self, input_ids: torch.LongTensor, length: int, origins: list[int]) -> dict:
        """The forward's tags for the last `length` positions of `input_ids` (`origins`: the batch row of each row)."""
        end = input_ids.shape[1]
        return self._inputs(self._tags(input_ids, range(end - length, end + self.shift), origins), length)

    def record_hidden(self, last_hidden: torch.Tensor) -> None:
        """Keep the final states `(rows, new positions, hidden)` of the forward just run (the tag heads read them)."""
        raise NotImplementedError

    def metadata_ids(
        self, sequences: torch.LongTensor, origins: list[int], eos_token_ids: list[int] | None = None
    ) -> dict[str, torch.LongTensor]:
        """`<field>_ids` `(rows, seq)` of every position of `generate`'s output `sequences`.

        A LIME model never fed its last generated token; its tags are computed here as the next step would
        have, so that continuing from `sequences` with them feeds what one longer call would have fed. After a
        row's first generated EOS nothing is computed: a position keeps the tags the steps fed it (greedy and
        sampling feed a finished row padding), else it is padding, `PAD_ID` (beam search pads a finished beam's
        tail, which no step fed and no tag head could read).
        """
        ended = None
        if eos_token_ids and sequences.shape[1] > self.prompt_len:
            generated = sequences[:, self.prompt_len :]
            is_eos = torch.isin(generated, torch.tensor(eos_token_ids, device=sequences.device))
            ended = (
                (is_eos.cumsum(dim=1) - is_eos.long()) > 0
            ).T.tolist()  # per position: rows ended before it
        tags = self._tags(sequences, range(sequences.shape[1]), origins, ended)
        return dict(
            zip((f"{field}_ids" for field in self.fields), tags.permute(2, 0, 1).contiguous(), strict=True)
        )

    def _tags(
        self,
        input_ids: torch.LongTensor,
        positions: range,
        origins: list[int],
        ended: list[list[bool]] | None = None,
    ) -> torch.LongTensor:
        """`(rows, len(positions), fields)` the tags of the tokens of `input_ids` at `positions` (LIME+1's may end
        one past its end: the next token's). `ended`: per generated position, the rows that keep what the steps
        fed them there (else `PAD_ID`): nothing is computed for them."""
        raise NotImplementedError

    def _inputs(self, tags: torch.LongTensor, length: int) -> dict:
        """The forward's inputs from `(rows, length + shift, fields)` tags of the fed tokens (LIME+1: and of the token
        after them): the tag each position reads as one tensor, or `<field>_ids` (+ `next_metadata_ids`)."""
        if self.stacked_inputs:
            return {"stacked_fed_ids": tags[:, self.shift :] if self.shift else tags}
        inputs = {f"{field}_ids": tags[:, :length, index] for index, field in enumerate(self.fields)}
        if self.shift:
            inputs["next_metadata_ids"] = {
                field: tags[:, length, index] for index, field in enumerate(self.fields)
            }
        return inputs

    def _prompt_part(
        self, positions: range, origins: list[int], device: torch.device
    ) -> torch.LongTensor | None:
        """`(rows, n, fields)` the prompt's tags at those of `positions` inside the prompt (`None` if none is)."""
        prompt_end = min(positions.stop, self.prompt_len)
        if positions.start >= prompt_end:
            return None
        return self.prompt_tags[origins, positions.start : prompt_end].to(device)

    def _prompt_states(self, input_ids: torch.LongTensor, batch_rows: list[int]) -> torch.Tensor:
        """`(rows, 1, hidden)`: the state before each prompt's last token (LIME+1's first self-guided tag)."""
        prompt_metadata = dict(zip(self.fields, self.prompt_tags[batch_rows].unbind(-1), strict=True))
        return self.provider.prompt_states(input_ids[:, : self.prompt_len], prompt_metadata, batch_rows)[
            :, None
        ]


class InPlaceTracker(MetadataTracker):
    """Greedy and sampled decoding: every step appends one token to each row in place, so each generated token's tags
    are decided once, in order, and kept as one `(rows, 1, fields)` column per token, the heads reading the last state
    of the forward before. A step feeding one token hands the forward that column; a column known to be unknown
    everywhere is not handed at all (it embeds to zeros)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.columns: list[torch.LongTensor] = []  # the tags of the generated token `prompt_len + i`
        self.batch_rows: tuple[int, ...] | None = None  # each row's batch row, the same at every step
        self._fed_end = 0  # the length of the input of the last forward
        self._hidden: torch.Tensor | None = None  # `(rows, 1, hidden)` its final state at its last position
        self._hidden_at = -1  # that position
        self._unknown: torch.LongTensor | None = None  # the column `GeneratedTags` gives where all is unknown

    def model_inputs(self, input_ids: torch.LongTensor, length: int, origins: list[int]) -> dict:
        end = self._fed_end = input_ids.shape[1]
        if not (length == 1 and end > self.prompt_len and self.stacked_inputs):
            return super().model_inputs(input_ids, length, origins)
        # A decoding step: one new token, one column.
        self._decide(input_ids, end + self.shift, origins)
        column = self.columns[end - 1 + self.shift - self.prompt_len]
        if column is self._unknown:
            return {}
        return {"stacked_fed_ids": column}

    def record_hidden(self, last_hidden: torch.Tensor) -> None:
        self._hidden, self._hidden_at = last_hidden[:, -1:], self._fed_end - 1

    def _tags(
        self,
        input_ids: torch.LongTensor,
        positions: range,
        origins: list[int],
        ended: list[list[bool]] | None = None,
    ) -> torch.LongTensor:
        self._decide(input_ids, positions.stop, origins, ended)
        prompt = self._prompt_part(positions, origins, input_ids.device)
        first = max(positions.start, self.prompt_len) - self.prompt_len
        generated = self.columns[first : positions.stop - self.prompt_len]
        parts = ([prompt] if prompt is not None else []) + (
            [torch.cat(generated, dim=1)] if generated else []
        )
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _decide(
        self,
        input_ids: torch.LongTensor,
        stop: int,
        origins: list[int],
        ended: list[list[bool]] | None = None,
    ) -> None:
        """Decide the tags of every generated token before position `stop` not decided yet (at a decoding step: the
        one the step feeds, or LIME+1's next token)."""
        if self.batch_rows is None:
            self.batch_rows = tuple(origins)
            self._unknown = self.tags.for_rows(self.batch_rows)[2]
        while self.prompt_len + len(self.columns) < stop:
            token = self.prompt_len + len(self.columns)
            prefix_end = self.deciding_prefix(token)
            prefix = input_ids if prefix_end == input_ids.shape[1] else input_ids[:, :prefix_end]
            padding = ended[token - self.prompt_len] if ended is not None else None
            self.columns.append(self._column(prefix, token - self.prompt_len, padding))

    def _column(self, prefix: torch.LongTensor, step: int, padding: list[bool] | None) -> torch.LongTensor:
        """`(rows, 1, fields)` the tags `prefix` decides; `PAD_ID` for the rows `padding` marks (nothing computed)."""
        if not padding or not any(padding):
            return self.tags(
                prefix, step, self.batch_rows, lambda: self._previous_hidden(prefix, self.batch_rows)
            )
        column = self._pad.expand(len(self.batch_rows), 1, -1).clone()
        missing = [row for row, ended in enumerate(padding) if not ended]
        if missing:
            rows = tuple(self.batch_rows[row] for row in missing)
            column[missing] = self.tags(
                prefix[missing], step, rows, lambda: self._previous_hidden(prefix[missing], rows, missing)
            )
        return column

    def _previous_hidden(
        self, prefix: torch.LongTensor, batch_rows: tuple[int, ...], rows: list[int] | None = None
    ) -> torch.Tensor:
        """`(rows, 1, hidden)`: the state before the prefix's last token: the last forward's at its last position, or
        for the prompt's own last token (LIME+1's first tag) the state the provider computes from the prompt."""
        if self._hidden is not None and self._hidden_at == prefix.shape[1] - 2:
            return self._hidden if rows is None else self._hidden[rows]
        if prefix.shape[1] == self.prompt_len:
            return self._prompt_states(prefix, list(batch_rows))
        raise ValueError(ONE_TOKEN_PER_FORWARD)


class _PrefixNode:
    """A generated prefix in a trie: the tags of the token it determines, and its one-token extensions.

    A trie keeps memory linear in the tokens generated; a dict keyed by whole prefixes grows quadratically.
    """

    __slots__ = ("children", "hidden", "parent", "tags")

    def __init__(self, parent: "_PrefixNode | None" = None):
        self.children: dict[int, _PrefixNode] = {}
        self.tags: torch.LongTensor | None = None  # `(1, fields)` the tags of the token it decides
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


class PrefixTrieTracker(MetadataTracker):
    """Beam search reorders and forks rows, assisted decoding checks several candidate tokens at once, and without a
    KV cache every position is re-fed at every step: the tags are memoised by the prefix that decides them, in a
    trie per batch row, which keeps the output identical with and without the cache under any reordering.

    A step's cost does not grow with the text: the trie nodes of the last prefixes looked up are kept (the cursor),
    and a step whose rows extend them in place descends one level instead of walking from the root; beam search,
    which reorders rows, walks from the root.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefixes = [_PrefixNode() for _ in range(self.batch_size)]
        self._fed_nodes: list[_PrefixNode] = []
        # (ids `(rows, length)`, origins, the nodes of those prefixes): the last lookup of `_nodes`.
        self._cursor: tuple[torch.LongTensor, list[int], list[_PrefixNode]] | None = None

    def model_inputs(self, input_ids: torch.LongTensor, length: int, origins: list[int]) -> dict:
        inputs = super().model_inputs(input_ids, length, origins)
        if self.uses_hidden_states:  # the prefixes this forward feeds last: their states tag the next tokens
            self._fed_nodes = self._nodes(input_ids, input_ids.shape[1], origins)
        return inputs

    def record_hidden(self, last_hidden: torch.Tensor) -> None:
        """Each prefix ending at a new position keeps its state; walking up from the longest stops at the first
        prefix that has one already (without a KV cache every position is re-fed)."""
        for row, node in enumerate(self._fed_nodes):
            for position in range(last_hidden.shape[1] - 1, -1, -1):
                if node is None or node.hidden is not None:
                    break
                node.hidden = last_hidden[row, position]
                node = node.parent

    def _tags(
        self,
        input_ids: torch.LongTensor,
        positions: range,
        origins: list[int],
        ended: list[list[bool]] | None = None,
    ) -> torch.LongTensor:
        prompt = self._prompt_part(positions, origins, input_ids.device)
        columns = [prompt] if prompt is not None else []
        for token in range(max(positions.start, self.prompt_len), positions.stop):
            padding = ended[token - self.prompt_len] if ended is not None else None
            columns.append(self._token_tags(input_ids, token, origins, padding))
        return columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)

    def _nodes(self, input_ids: torch.LongTensor, prefix_end: int, origins: list[int]) -> list[_PrefixNode]:
        """The trie node of each row's prefix `input_ids[:, :prefix_end]`, from the cursor where the rows extend
        it in place, else walked from the root."""
        if prefix_end <= self.prompt_len:
            return [self.prefixes[origin] for origin in origins]
        if self._cursor is not None:
            ids, cursor_origins, nodes = self._cursor
            length = ids.shape[1]
            if (
                length <= prefix_end <= length + 1
                and origins == cursor_origins
                and torch.equal(input_ids[:, :length], ids)
            ):
                if prefix_end == length:
                    return nodes
                tokens = input_ids[:, length].tolist()
                nodes = [node.descend((token,)) for node, token in zip(nodes, tokens, strict=True)]
                self._cursor = (input_ids[:, :prefix_end].clone(), origins, nodes)
                return nodes
        generated = input_ids[:, self.prompt_len : prefix_end].tolist()
        nodes = [
            self.prefixes[origin].descend(tokens) for origin, tokens in zip(origins, generated, strict=True)
        ]
        # A copy: beam search writes its sequences in place.
        self._cursor = (input_ids[:, :prefix_end].clone(), origins, nodes)
        return nodes

    def _token_tags(
        self,
        input_ids: torch.LongTensor,
        token: int,
        origins: list[int],
        padding: list[bool] | None = None,
    ) -> torch.LongTensor:
        """`(rows, 1, fields)` tags of the generated token at position `token` of each row. The rows `padding` marks
        keep the tags the steps fed them, if any, else `PAD_ID`: nothing is computed for them."""
        prefix_end = self.deciding_prefix(token)
        nodes = self._nodes(input_ids, prefix_end, origins)
        missing = [
            row for row, node in enumerate(nodes) if node.tags is None and not (padding and padding[row])
        ]
        if missing:
            prefixes = input_ids[missing, :prefix_end]
            batch_rows = tuple(origins[row] for row in missing)
            computed = self.tags(
                prefixes,
                token - self.prompt_len,
                batch_rows,
                lambda: self._previous_hidden(prefixes, [nodes[row] for row in missing], batch_rows),
            )
            for index, row in enumerate(missing):
                nodes[row].tags = computed[index]
        return torch.stack([node.tags if node.tags is not None else self._pad for node in nodes])

    def _previous_hidden(
        self, prefixes: torch.LongTensor, nodes: list[_PrefixNode], batch_rows: tuple[int, ...]
    ) -> torch.Tensor:
        """`(len(nodes), 1, hidden)`: the state before each prefix's last token, as recorded for its parent prefix.

        The prompt's own last token (LIME+1's first self-guided tag) has no recorded parent: the provider
        computes the state from the prompt once.
        """
        parents = [node.parent for node in nodes]
        if any(parent is not None and parent.hidden is None for parent in parents):
            raise ValueError(ONE_TOKEN_PER_FORWARD)
        if all(parent is not None for parent in parents):
            return torch.stack([parent.hidden for parent in parents])[:, None]
        prompt_rows = [index for index, parent in enumerate(parents) if parent is None]
        prompt_states = self._prompt_states(prefixes[prompt_rows], [batch_rows[i] for i in prompt_rows])
        states = iter(prompt_states[:, 0])
        return torch.stack([next(states) if parent is None else parent.hidden for parent in parents])[:, None]


__all__ = ["GeneratedTags", "InPlaceTracker", "MetadataTracker", "PrefixTrieTracker", "RowRecord"]
