"""Generation in one room: `LimeGenerationMixin.generate` and the per-row bookkeeping of the tags it feeds.

A LIME model (shift 0) needs the tags of every token it is fed, generated ones included; a LIME+1 model (shift 1)
is fed, at the last position, the tags of the token it is about to generate. Guidance and the metadata providers
that give them live in `tag_providers.py`; this file decides when each is asked and memoises what they said.

The one difference between the two, in one rule: the tags of token `t` are decided by the prefix `t + 1 - shift`
tokens long (LIME tags a token once it exists; LIME+1 before it exists). `MetadataTracker.deciding_prefix` says it.

Every generated token's tags are a pure function of its row's prompt and the tokens before the deciding prefix's
end. `MetadataTracker` memoises them by that prefix, which keeps the output identical with and without the KV
cache and lets beam search reorder rows freely. Which prompt each row grew from is recorded, not guessed: the
batch row index travels as the model kwarg `lime_rows`, which `generate` expands with every other kwarg (beams,
`num_return_sequences`); each step writes it into the call's `RowRecord`, which the tracker and the logits
processors that need it (`MetaTokenPlacement`) read.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``,
``transformers`` and flat siblings.
"""

import inspect
from collections.abc import Callable

import torch
from transformers import GenerationMixin, LogitsProcessorList
from transformers.utils import logging

from .compat import CACHE_NAME
from .configuration_lime import PAD_ID, SPECIAL_ID, UNKNOWN_ID, check_inventories
from .rules import check_generation_request, check_meta_generation
from .stacked_fields import parameters_fixed
from .tag_heads import self_tags
from .tag_providers import GuidanceCallable, ModelTagProvider, label_id, parse_guidance, resolve_provider

logger = logging.get_logger(__name__)


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


class _PrefixNode:
    """A generated prefix in a trie: the tags of the token it determines, and its one-token extensions.

    A trie keeps memory linear in the tokens generated; a dict keyed by whole prefixes grows quadratically.
    """

    __slots__ = ("children", "hidden", "parent", "tags")

    def __init__(self, parent: "_PrefixNode | None" = None):
        self.children: dict[int, _PrefixNode] = {}
        self.tags: list[int] | None = None  # one tag id per field, in the tracker's field order
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
        prompt_metadata: field -> `(batch, prompt_len)` tags of the prompt; missing fields are unknown.
        prompt_ids: `(batch, prompt_len)` the prompt.
        metadata_fields: the model's inventories.
        metadata_shift: 0 (LIME) or 1 (LIME+1).
        provider: tags of generated tokens where guidance has none (see `tag_providers.resolve_provider`).
        guidance: parsed guidance (see `tag_providers.parse_guidance`), indexed by batch row.

    Each call names the batch row every row of `input_ids` grew from (`origins`): `generate` expands rows for beams
    and `num_return_sequences` after this is built.

    A step's cost does not grow with the text: the trie nodes of the last prefixes looked up are kept (the cursor),
    and a step whose rows extend them in place (greedy, sampling) descends one level instead of walking from the
    root; beam search, which reorders rows, walks from the root.
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
        # `(fields, batch, prompt_len)`: a prompt position's tags for every field at once.
        self.prompt_metadata = torch.stack(
            [prompt_metadata.get(field, torch.full_like(prompt_ids, UNKNOWN_ID)) for field in self.fields]
        )
        self.prefixes = [_PrefixNode() for _ in range(self.batch_size)]
        # A provider reading hidden states (the tag heads) needs each prefix's last state: `record_hidden`.
        self.uses_hidden_states = getattr(provider, "uses_hidden_states", False)
        self._fed_nodes: list[_PrefixNode] = []
        # (ids `(rows, length)`, origins, the nodes of those prefixes): the last lookup of `_nodes`.
        self._cursor: tuple[torch.LongTensor, list[int], list[_PrefixNode]] | None = None

    def deciding_prefix(self, token: int) -> int:
        """The length of the prefix that decides the tags of the token at position `token`: LIME tags a token once
        it exists (`token + 1`), LIME+1 before it exists (`token`), as guidance for it."""
        return token + 1 - self.shift

    def model_inputs(self, input_ids: torch.LongTensor, length: int, origins: list[int]) -> dict:
        """`<field>_ids` for the last `length` positions of `input_ids` (+ LIME+1's `next_metadata_ids`: the tags of
        the token after them). `origins`: the batch row of each row."""
        end = input_ids.shape[1]
        inputs = self._tags(input_ids, range(end - length, end), origins)
        if self.shift:
            tags = self._token_tags(input_ids, end, origins)
            inputs["next_metadata_ids"] = dict(zip(self.fields, tags.unbind(0), strict=True))
        if self.uses_hidden_states:  # the prefixes this forward feeds last: their states tag the next tokens
            self._fed_nodes = self._nodes(input_ids, end, origins)
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
        return self._tags(sequences, range(sequences.shape[1]), origins, ended)

    def _tags(
        self,
        input_ids: torch.LongTensor,
        positions: range,
        origins: list[int],
        ended: list[list[bool]] | None = None,
    ) -> dict[str, torch.LongTensor]:
        """`<field>_ids` `(rows, len(positions))` of `input_ids` at `positions` (`ended`: see `_token_tags`)."""
        columns = []
        prompt_end = min(positions.stop, self.prompt_len)
        if positions.start < prompt_end:  # `(fields, rows, n)`
            columns.append(
                self.prompt_metadata[:, origins, positions.start : prompt_end].to(input_ids.device)
            )
        for token in range(max(positions.start, self.prompt_len), positions.stop):
            padding = ended[token - self.prompt_len] if ended is not None else None
            columns.append(self._token_tags(input_ids, token, origins, padding)[..., None])
        tags = columns[0] if len(columns) == 1 else torch.cat(columns, dim=2)
        return {
            f"{field}_ids": field_tags for field, field_tags in zip(self.fields, tags.unbind(0), strict=True)
        }

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
        """`(fields, rows)` tags of the generated token at position `token` of each row. The rows `padding` marks
        keep the tags the steps fed them, if any, else `PAD_ID`: nothing is computed for them."""
        prefix_end = self.deciding_prefix(token)
        nodes = self._nodes(input_ids, prefix_end, origins)
        missing = [
            row for row, node in enumerate(nodes) if node.tags is None and not (padding and padding[row])
        ]
        if missing:
            step = token - self.prompt_len  # the how-many-th generated token
            computed = self._compute(input_ids[missing, :prefix_end], step, missing, nodes, origins)
            for index, row in enumerate(missing):
                nodes[row].tags = [computed[field][index] for field in self.fields]
        pad = [PAD_ID] * len(self.fields)
        return torch.tensor([node.tags or pad for node in nodes], device=input_ids.device).T

    def _compute(
        self,
        input_ids: torch.LongTensor,
        step: int,
        rows: list[int],
        nodes: list[_PrefixNode],
        origins: list[int],
    ) -> dict[str, list[int]]:
        """Guidance where it covers `step`, else the provider, else unknown (`rows`: the rows of `input_ids`)."""
        batch_rows = [origins[row] for row in rows]
        guided = {}
        for field, schedule in self.guidance.items():
            if callable(schedule):
                guided[field] = list(schedule(input_ids, step))
            else:
                guided[field] = [schedule[b][step] if step < len(schedule[b]) else None for b in batch_rows]
        needs_provider = len(guided) < len(self.fields) or any(
            tag is None for tags in guided.values() for tag in tags
        )
        provided = {}
        if needs_provider and self.uses_hidden_states:
            provided = self.provider(
                self._previous_hidden(input_ids, rows, nodes, batch_rows), input_ids[:, -1]
            )
        elif needs_provider:
            provided = self.provider(input_ids, step)
        unknown = [None] * len(rows)
        result = {}
        for field in self.fields:
            size, column = len(self.metadata_fields[field]), []
            # Runs per row and field at every step: an id in range (the heads' tags) needs no `label_id` call.
            for given, fallback in zip(guided.get(field, unknown), provided.get(field, unknown), strict=True):
                tag = given if given is not None else fallback
                if tag is None:
                    tag = UNKNOWN_ID
                elif not (type(tag) is int and 0 <= tag < size):
                    tag = label_id(self.metadata_fields, field, tag)
                column.append(tag)
            result[field] = column
        return result

    def _previous_hidden(
        self, input_ids: torch.LongTensor, rows: list[int], nodes: list[_PrefixNode], batch_rows: list[int]
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
        prompt_origins = [batch_rows[i] for i in prompt_rows]
        prompt_states = self.provider.prompt_states(
            input_ids[prompt_rows, : self.prompt_len],
            dict(zip(self.fields, self.prompt_metadata[:, prompt_origins].unbind(0), strict=True)),
            prompt_origins,
        )
        states = iter(prompt_states)
        return torch.stack([next(states) if parent is None else parent.hidden for parent in parents])


class LimeGenerationMixin(GenerationMixin):
    """`GenerationMixin` with metadata for the generated tokens: the tracker, the providers, self-tagging of an
    untagged prompt, and `metadata_ids` in the output. Mixed into `LimeForCausalLM`, which provides the forward and
    its tag checks (`_collect_metadata`, `_check_metadata`)."""

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config=None,
        guidance: dict | None = None,
        metadata_provider=None,
        **kwargs,
    ):
        r"""
        `GenerationMixin.generate` with metadata for the generated tokens. Every decoding setup works (greedy,
        sampling, beam search, left-padded batches, `num_return_sequences`), with and without the KV cache.
        Only this model's `<field>_ids` are read as metadata; every other keyword (`bad_words_ids`, logits
        processors, stopping criteria, streamers, `assistant_model`, ...) means what it means for the backbone.
        With no prompt, generation starts from BOS (tags: special), as the backbone's does.

        With `return_dict_in_generate=True` the output also holds `metadata_ids`: `{"<field>_ids": (rows, seq)}`,
        the tags of every position of `sequences` (with `metadata_layer > 0` and heads: recomputed by one parallel
        forward over `sequences` after generating, see `_tags_read`). Passing them back with `sequences` and the output's cache
        continues the generation exactly as one longer call would.

        Args:
            inputs, generation_config, kwargs: as for `GenerationMixin.generate`. The prompt's tags come in as
                `pos_ids`/`ner_ids`/`<field>_ids` `(batch, prompt_len)`, e.g. `model.generate(**encoding)`.
                With none of them, a model whose heads provide the tags tags the prompt itself first (one
                incremental pass over the prompt, `tag_heads.self_tags`, as `forward` does for bare `input_ids`).
                A model with heads at `metadata_layer > 0` tags prompt and generated tokens inside its forward: given
                no tags, guidance or provider it generates exactly as its backbone does (no per-step bookkeeping);
                given tags or guidance, those are fed where given and the heads fill the rest.
                Pass `tokenizer=` (a `LimeTokenizer`) to let a LIME model re-annotate what it generates.
            guidance (`dict`, *optional*): LIME+1 only. Field -> the labels of the next generated tokens: one
                list per batch row (lengths may differ), one list for every row, or a callable
                `(input_ids, step) -> labels` (one label or `None` per row). Where it ends, the provider
                takes over. Example: `guidance={"pos": [["VBZ", "DT"]]}`.
            metadata_provider (*optional*): tags of generated tokens where guidance has none: `"model"` (the
                tag heads, on device: the default for a model that has them; LIME+1 guides itself by
                `config.self_guidance`), `"annotate"` (re-annotate the decoded tail; default for LIME when
                `tokenizer` is given), `"unknown"`, or a callable `(input_ids, step) -> {field: labels}` giving
                the tags of each row's last token (LIME) or of its next token (LIME+1).
        """
        self._check_generation_override()
        config = self.config
        check_generation_request(
            fields=config.metadata_fields,
            metadata_shift=config.metadata_shift,
            has_tag_heads=self.tag_heads is not None,
            guidance_fields=guidance or (),
            provider=metadata_provider,
        )
        check_meta_generation(config, kwargs, generation_config or self.generation_config)
        inputs, prompt_ids, prompt_metadata = self._prompt(inputs, generation_config, kwargs)
        tracker = kwargs.pop("lime_tracker", None)  # set when a LIME model assists another one's generation
        if tracker is not None:
            self._check_assisted_tracker(tracker)
        elif config.metadata_fields and not (
            self._tags_in_pass()
            and not prompt_metadata
            and not guidance
            and metadata_provider in (None, "model")
        ):  # meta-tokens only, or the heads at layer k tag every token inside the forward: no tags to track
            tracker = self._new_tracker(prompt_ids, prompt_metadata, guidance, metadata_provider, kwargs)
        if CACHE_NAME == "past_key_values" and "cache" in kwargs:  # `generate` before 5.24 knows the old name
            kwargs["past_key_values"] = kwargs.pop("cache")
        # Each row's batch row: `generate` expands it with the other model kwargs (beams, `num_return_sequences`),
        # and each step records it for the tracker and the logits processors that ask (`for_rows`). An assistant
        # gets the assisted model's, with its tracker and record.
        rows = kwargs.pop("lime_rows", None)
        if rows is None:
            rows = torch.arange(prompt_ids.shape[0], device=prompt_ids.device)
        record = kwargs.pop("lime_record", None) or RowRecord()
        if kwargs.get("logits_processor"):
            kwargs["logits_processor"] = LogitsProcessorList(
                processor.for_rows(record) if hasattr(processor, "for_rows") else processor
                for processor in kwargs["logits_processor"]
            )
        with parameters_fixed():  # the stacked heads and tables are checked once, not at every step
            output = super().generate(
                inputs, generation_config, lime_tracker=tracker, lime_rows=rows, lime_record=record, **kwargs
            )
        if isinstance(output, torch.Tensor) or not (tracker is not None or self._tags_in_pass()):
            return output
        # The output holds `num_return_sequences` rows per prompt, in prompt order, whatever the decoding.
        config = generation_config or self.generation_config
        returned = kwargs.get("num_return_sequences") or config.num_return_sequences
        origins = torch.arange(prompt_ids.shape[0]).repeat_interleave(returned or 1).tolist()
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        eos = [eos] if isinstance(eos, int) else list(eos if eos is not None else [])
        given = tracker.metadata_ids(output.sequences, origins, eos) if tracker is not None else {}
        if self._tags_in_pass():
            given = self._tags_read(output.sequences, given, kwargs.get("attention_mask"), origins)
        output["metadata_ids"] = given
        return output

    def _tags_in_pass(self) -> bool:
        """Whether the forward tags every position itself (tag heads at `metadata_layer > 0`): generation then
        needs no provider, and no per-step bookkeeping unless tags or guidance are given."""
        return bool(self.config.metadata_layer) and self.tag_heads is not None

    def _tags_read(
        self,
        sequences: torch.LongTensor,
        given: dict[str, torch.LongTensor],
        attention_mask: torch.Tensor | None,
        origins: list[int],
    ) -> dict[str, torch.LongTensor]:
        """`<field>_ids` `(rows, seq)` of `sequences` as a model tagging in the pass read them: one parallel forward
        over the output, fed the `given` tags (prompt, guidance) as generation fed them. Each heads' tag is a pure
        function of its prefix, so this recomputes exactly the tags the steps fed, at the cost of one forward pass
        (only when `return_dict_in_generate=True`). A LIME+1 model never reads its first token's own tag: unknown
        unless given."""
        extra = {}
        if attention_mask is not None:
            mask = attention_mask[origins].to(sequences.device)
            mask = torch.cat([mask, mask.new_ones(len(origins), sequences.shape[1] - mask.shape[1])], dim=1)
            extra = {
                "attention_mask": mask,
                "position_ids": (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0),
            }
        fed = self(input_ids=sequences, use_cache=False, **given, **extra).fed_metadata_ids
        if not self.config.metadata_shift:
            return {f"{name}_ids": ids for name, ids in fed.items()}
        first = {
            name: given.get(f"{name}_ids", torch.full_like(sequences, UNKNOWN_ID))[:, :1] for name in fed
        }
        return {f"{name}_ids": torch.cat([first[name], ids[:, :-1]], dim=1) for name, ids in fed.items()}

    def _check_generation_override(self) -> None:
        if "lime_tracker" not in inspect.signature(self.prepare_inputs_for_generation).parameters:
            raise ValueError(
                "This model's `prepare_inputs_for_generation` was replaced by one that does not feed the tags of "
                "generated tokens (PEFT's prefix tuning, prompt tuning and p-tuning replace it), so LIME "
                "`generate` cannot run on it. Generate with a LoRA-tuned model (`lime_hf.integrations.peft`)."
            )

    def _prompt(
        self, inputs: torch.LongTensor | None, generation_config, kwargs: dict
    ) -> tuple[torch.LongTensor | None, torch.LongTensor, dict[str, torch.LongTensor]]:
        """`inputs` for `GenerationMixin.generate`, the prompt ids and their tags (popped from `kwargs`): BOS with
        special tags when there is no prompt."""
        prompt_ids = inputs if inputs is not None else kwargs.get("input_ids")
        prompt_metadata = self._collect_metadata(
            kwargs.pop("pos_ids", None), kwargs.pop("ner_ids", None), kwargs
        )
        if prompt_ids is None:
            if kwargs.get("inputs_embeds") is not None:
                raise ValueError(
                    "LIME generation needs the prompt as `input_ids`: `inputs_embeds` alone carry no tags."
                )
            inputs = prompt_ids = self._bos_prompt(generation_config, kwargs)
            prompt_metadata = {
                name: torch.full_like(inputs, SPECIAL_ID) for name in self.config.metadata_fields
            }
        self._check_metadata(tuple(prompt_ids.shape), prompt_metadata, None)
        return inputs, prompt_ids, prompt_metadata

    def _bos_prompt(self, generation_config, kwargs: dict) -> torch.LongTensor:
        """`(1, 1)` BOS ids: where the backbone's `generate` starts when it is given no prompt."""
        bos_token_id = kwargs.get("bos_token_id")
        if bos_token_id is None:
            bos_token_id = (generation_config or self.generation_config).bos_token_id
        if bos_token_id is None:
            raise ValueError(
                "`generate` was given no prompt and the model has no `bos_token_id` to start from: pass "
                "`input_ids` (with their `<field>_ids` tags) or set `generation_config.bos_token_id`."
            )
        return torch.full((1, 1), bos_token_id, dtype=torch.long, device=self.device)

    def _new_tracker(
        self,
        prompt_ids: torch.LongTensor,
        prompt_metadata: dict[str, torch.LongTensor],
        guidance: dict | None,
        metadata_provider,
        kwargs: dict,
    ) -> MetadataTracker:
        """The tracker of one `generate` call: provider resolved, an untagged prompt tagged by the heads."""
        config, tokenizer = self.config, kwargs.get("tokenizer")
        if getattr(tokenizer, "metadata_fields", None) is not None:
            check_inventories(tokenizer.metadata_fields, config.metadata_fields)
        if self._tags_in_pass() and metadata_provider in (None, "model"):
            # The forward's heads fill every tag left unknown (generated tokens, an untagged prompt).
            metadata_provider = "unknown"
        elif metadata_provider == "model" or (metadata_provider is None and self.tag_heads is not None):
            metadata_provider = ModelTagProvider(self, kwargs.get("attention_mask"))
            if not prompt_metadata:  # an untagged prompt (lm-eval's `--model hf`): the heads tag it causally
                prompt_metadata, _ = self_tags(self, prompt_ids, kwargs.get("attention_mask"))
        if metadata_provider is None and tokenizer is None and not guidance:
            logger.warning_once(
                "LIME generate: no `tokenizer`, `guidance` or `metadata_provider` given, so generated tokens get "
                "'unknown' metadata."
            )
        return MetadataTracker(
            prompt_metadata=prompt_metadata,
            prompt_ids=prompt_ids,
            metadata_fields=config.metadata_fields,
            metadata_shift=config.metadata_shift,
            provider=resolve_provider(metadata_provider, tokenizer, config.metadata_shift),
            guidance=parse_guidance(guidance, config.metadata_fields, prompt_ids.shape[0]),
        )

    def _check_assisted_tracker(self, tracker: MetadataTracker) -> None:
        if (tracker.metadata_fields, tracker.shift) != (
            self.config.metadata_fields,
            self.config.metadata_shift,
        ):
            raise ValueError(
                "An assistant model must read the same metadata as the model it assists: same fields and "
                f"metadata_shift (assisted model: shift {tracker.shift}, fields {list(tracker.metadata_fields)}; "
                f"assistant: shift {self.config.metadata_shift}, fields {list(self.config.metadata_fields)})."
            )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        lime_tracker: MetadataTracker | None = None,
        lime_rows: torch.LongTensor | None = None,
        lime_record: RowRecord | None = None,
        **kwargs,
    ) -> dict:
        """The backbone's inputs for one step, plus the tags of the positions it feeds (see `MetadataTracker`)."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, **kwargs
        )
        record = lime_record if lime_record is not None else RowRecord()
        if lime_rows is not None:
            record.update(lime_rows)
        if lime_tracker is not None:
            origins = record.origins(input_ids.shape[0])
            model_inputs.update(
                lime_tracker.model_inputs(input_ids, model_inputs["input_ids"].shape[1], origins)
            )
        return model_inputs

    # Private: the one point of `generate` that sees each step's outputs before the next step's inputs are built
    # (logits processors see the scores only), and the tag heads read the states the step computed.
    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        tracker = model_kwargs.get("lime_tracker")
        # The tag heads read these states at the next step (not an assistant's: it has its own states).
        if tracker is not None and getattr(tracker.provider, "model", None) is self:
            tracker.record_hidden(outputs.last_hidden_state)
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)


__all__ = [
    "LimeGenerationMixin",
    "MetadataTracker",
    "RowRecord",
]
