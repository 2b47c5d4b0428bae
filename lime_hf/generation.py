"""Generation in one room: `LimeGenerationMixin.generate`, which makes the call's tag tracker
(`metadata_tracker.py`: which rule gives a generated token's tags and how they are kept) and reads it at every step.

Which prompt each row grew from is recorded, not guessed: the batch row index travels as the model kwarg
`lime_rows`, which `generate` expands with every other kwarg (beams, `num_return_sequences`); each step writes it
into the call's `RowRecord`, which the tracker and the logits processors that need it (`MetaTokenPlacement`) read.
With tag heads at `metadata_layer > 0` and no tags, guidance or provider given, the forward tags every token itself
and generation keeps no tracker at all.

This file is copied next to the weights by ``save_pretrained`` (remote code), so it imports only ``torch``,
``transformers`` and flat siblings.
"""

import inspect

import torch
from transformers import GenerationMixin, LogitsProcessorList
from transformers.generation import GenerationMode
from transformers.utils import logging

from .compat import CACHE_NAME
from .configuration_lime import SPECIAL_ID, UNKNOWN_ID, check_inventories
from .metadata_tracker import InPlaceTracker, MetadataTracker, PrefixTrieTracker, RowRecord
from .rules import check_generation_request, check_meta_generation
from .stacked_fields import parameters_fixed
from .tag_heads import self_tags
from .tag_providers import ModelTagProvider, parse_guidance, resolve_provider

logger = logging.get_logger(__name__)


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
        forward over `sequences` after generating, see `_tags_read`). Passing them back with `sequences` and the
        output's cache continues the generation exactly as one longer call would; with
        `predicted_tag_embedding="expected"` they are the heads' argmax, not the blend the model read: pass
        `sequences` and the cache alone, and the heads blend again.

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
            in_place = self._extends_rows_in_place(generation_config, kwargs)
            tracker = self._new_tracker(
                prompt_ids, prompt_metadata, guidance, metadata_provider, kwargs, in_place
            )
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
        in_place: bool,
    ) -> MetadataTracker:
        """The tracker of one `generate` call: provider resolved, an untagged prompt tagged by the heads; its tags kept
        as columns where every step extends each row in place (`in_place`), else in a trie."""
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
        tracker = InPlaceTracker if in_place else PrefixTrieTracker
        return tracker(
            prompt_metadata=prompt_metadata,
            prompt_ids=prompt_ids,
            metadata_fields=config.metadata_fields,
            metadata_shift=config.metadata_shift,
            provider=resolve_provider(metadata_provider, tokenizer, config.metadata_shift),
            guidance=parse_guidance(guidance, config.metadata_fields, prompt_ids.shape[0]),
            stacked_inputs=not config.metadata_layer,
        )

    def _extends_rows_in_place(self, generation_config, kwargs: dict) -> bool:
        """Whether every step of this call appends one token to each row in place: greedy and sampled decoding, as
        transformers resolves the call's settings (not beam search, which reorders rows, nor assisted or
        prompt-lookup decoding, which check several candidate tokens, nor a custom decoding loop)."""
        if kwargs.get("custom_generate") is not None:
            return False
        resolved, _ = self._prepare_generation_config(generation_config, **kwargs)
        mode = resolved.get_generation_mode(kwargs.get("assistant_model"))
        return mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)

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


__all__ = ["LimeGenerationMixin"]
