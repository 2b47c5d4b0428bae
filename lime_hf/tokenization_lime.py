"""LimeTokenizer: any fast tokenizer plus per-token linguistic metadata (`pos_ids`, `ner_ids`, ...).

This file is copied next to a saved tokenizer (remote code): it imports only `transformers`, numpy, the
standard library and its flat siblings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import accumulate, chain
from typing import Any

import numpy as np
from transformers import TokenizersBackend
from transformers.tokenization_utils_base import BatchEncoding
from transformers.utils.chat_template_utils import render_jinja_template

from .alignment import (
    batch_segment_offsets,
    fill_reserved,
    first_non_whitespace,
    join_annotations,
    label_to_id_maps,
    tags_from_offsets,
)
from .annotation import BUILTIN_FIELDS, FieldAnnotator, SpacyAnnotator, check_texts, resolve_fields
from .chat_template import (
    added_token_pattern,
    assistant_mask,
    complement,
    keep_whole,
    locate_messages,
    place_annotations,
)
from .configuration_lime import DEFAULT_METADATA_FIELDS, PAD_ID, validate_metadata_fields

ALIGNMENTS = ("pretokenized", "offsets")


class LimeTokenizer(TokenizersBackend):
    r"""
    A fast tokenizer that also returns linguistic metadata ids, one per token and field (`{field}_ids`).

    Text is annotated by spaCy (see [`SpacyAnnotator`]) as character spans, which are aligned to the subword
    tokens in one of two modes:

    - `"pretokenized"` (the LIME paper's tokenization, default for new pretraining): the text is cut at every
      annotation boundary (a lone space joins the word after it, GPT-2 style) and the pieces are encoded as
      pretokenized words, so no token crosses a linguistic-token boundary. With a byte-level BPE without prefix
      space, `decode(input_ids)` returns the input text exactly. With tokenizers that add a prefix to each word
      (Metaspace `▁`, byte-level with `add_prefix_space=True`) or that drop whitespace (WordPiece/BERT), the
      ids differ from the base tokenizer's and decoding is not exact; use `"offsets"` for those.
    - `"offsets"` (for existing checkpoints): `input_ids` are exactly the wrapped tokenizer's; a token takes the
      tags of the linguistic token holding its first non-whitespace character; whitespace-only tokens take the
      whitespace tag (`_SP` for pos, `O` for ner).

    Special tokens get tag id 2 and padding tag id 0 in every field. Added tokens written in the text (`<|eos|>`,
    role markers) stay whole tokens in both modes, as the base tokenizer encodes them. `offset_mapping` (when
    requested) holds absolute character offsets into the input text in both modes. Chats go through
    [`~LimeTokenizer.apply_chat_template`]. Create one with [`~LimeTokenizer.from_tokenizer`].

    Args:
        alignment (`str`, *optional*, defaults to `"pretokenized"`): `"pretokenized"` or `"offsets"`.
        metadata_fields (`dict[str, list[str]]`, *optional*):
            Field -> inventory, the format of `LimeConfig.metadata_fields`; defaults to pos + ner.
        whitespace_labels (`dict[str, str]`, *optional*):
            Field -> label of whitespace-only tokens; taken from the field annotators when omitted.
        spacy_model (`str`, *optional*): the spaCy pipeline to annotate with (default: `en_core_web_sm`).
        field_annotators (`list[FieldAnnotator]`, *optional*):
            Annotators of custom (non built-in) fields. They are not saved: pass them again to `from_pretrained`.
    """

    def __init__(
        self,
        *args,
        alignment: str = "pretokenized",
        metadata_fields: dict[str, list[str]] | None = None,
        whitespace_labels: dict[str, str] | None = None,
        spacy_model: str | None = None,
        field_annotators: Sequence[FieldAnnotator] | None = None,
        **kwargs,
    ):
        if alignment not in ALIGNMENTS:
            raise ValueError(f"`alignment` must be one of {list(ALIGNMENTS)}, got {alignment!r}.")
        metadata_fields = {
            name: list(labels) for name, labels in (metadata_fields or DEFAULT_METADATA_FIELDS).items()
        }
        validate_metadata_fields(metadata_fields)
        self._field_annotators = field_annotators_for(metadata_fields, field_annotators or ())
        whitespace_labels = dict(whitespace_labels or {})
        for name, annotator in self._field_annotators.items():
            whitespace_labels.setdefault(name, annotator.whitespace_label)
        check_whitespace_labels(metadata_fields, whitespace_labels)
        super().__init__(
            *args,
            alignment=alignment,
            metadata_fields=metadata_fields,
            whitespace_labels=whitespace_labels,
            spacy_model=spacy_model,
            **kwargs,
        )
        self.alignment = alignment
        self.metadata_fields = metadata_fields
        self.whitespace_labels = whitespace_labels
        self.spacy_model = spacy_model
        self.model_input_names = ["input_ids", "attention_mask", *(f"{name}_ids" for name in metadata_fields)]
        self._label_to_id = label_to_id_maps(metadata_fields)
        # Built now (spaCy itself loads lazily) so the tokenizer's state, hence its datasets fingerprint, never
        # changes with use.
        self._annotator = (
            SpacyAnnotator(list(self._field_annotators.values()), spacy_model=spacy_model)
            if len(self._field_annotators) == len(metadata_fields)
            else None
        )

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs) -> dict[str, Any]:
        # The generic path for subclasses with their own `__init__` rebuilds the backend from the vocabulary
        # alone and silently drops BPE merges; `tokenizer.json` already holds the complete backend.
        tokenizer_file = kwargs.get("tokenizer_file")
        if tokenizer_file is not None and os.path.isfile(tokenizer_file):
            return dict(kwargs)
        return super().convert_to_native_format(trust_remote_code=trust_remote_code, **kwargs)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: TokenizersBackend,
        alignment: str = "pretokenized",
        spacy_model: str | None = None,
        fields: Sequence[str | FieldAnnotator] = ("pos", "ner"),
        **kwargs,
    ) -> LimeTokenizer:
        """
        Wrap a fast tokenizer (any `PreTrainedTokenizerFast`/`TokenizersBackend`).

        Args:
            tokenizer: the tokenizer to wrap; its backend, special tokens and settings are copied.
            alignment (`str`, *optional*, defaults to `"pretokenized"`): `"pretokenized"` or `"offsets"`.
            spacy_model (`str`, *optional*): the spaCy pipeline to annotate with.
            fields (`Sequence[str | FieldAnnotator]`, *optional*, defaults to `("pos", "ner")`):
                Built-in field names and/or `FieldAnnotator` instances for custom fields.
            kwargs: further `LimeTokenizer` init arguments, overriding those copied from `tokenizer`.
        """
        if not isinstance(tokenizer, TokenizersBackend):
            raise ValueError(
                f"`from_tokenizer` needs a fast tokenizer (PreTrainedTokenizerFast), got {type(tokenizer).__name__}."
            )
        annotators = resolve_fields(fields)
        settings = {
            key: tokenizer.init_kwargs[key]
            for key in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces")
            if key in tokenizer.init_kwargs
        }
        settings.update(
            tokenizer_object=tokenizer.backend_tokenizer,
            padding_side=tokenizer.padding_side,
            truncation_side=tokenizer.truncation_side,
            model_max_length=tokenizer.model_max_length,
            chat_template=tokenizer.chat_template,
            **{
                key: str(value)
                for key, value in tokenizer.special_tokens_map.items()
                if isinstance(value, str)
            },
        )
        return cls(
            alignment=alignment,
            metadata_fields={annotator.name: annotator.inventory for annotator in annotators},
            whitespace_labels={annotator.name: annotator.whitespace_label for annotator in annotators},
            spacy_model=spacy_model,
            field_annotators=[annotator for annotator in annotators if annotator.name not in BUILTIN_FIELDS],
            **{**settings, **kwargs},
        )

    @property
    def annotator(self) -> SpacyAnnotator:
        """The annotator (`list[str] -> list[Annotation]`) for this tokenizer's fields; spaCy loads on first use."""
        if self._annotator is None:
            missing = [name for name in self.metadata_fields if name not in self._field_annotators]
            raise ValueError(
                f"No annotator for the metadata fields {missing}: custom fields are not saved with the "
                "tokenizer; pass `field_annotators=[...]` (FieldAnnotator instances) to `from_pretrained`, "
                "or give precomputed annotations (`annotations=`)."
            )
        return self._annotator

    def _encode_plus(
        self,
        text: str | Sequence[str],
        text_pair: Any = None,
        is_split_into_words: bool = False,
        return_offsets_mapping: bool = False,
        return_overflowing_tokens: bool = False,
        return_tensors: str | None = None,
        annotations: Sequence[dict] | dict | None = None,
        template_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
        **kwargs,
    ) -> BatchEncoding:
        if text_pair is not None:
            raise ValueError("LimeTokenizer encodes single texts; `text_pair` is not supported.")
        if is_split_into_words:
            raise ValueError(
                "LimeTokenizer pre-tokenizes text itself from the annotations; pass raw text, not "
                "`is_split_into_words=True`."
            )
        is_batched = isinstance(text, (list, tuple))
        texts = check_texts(text if is_batched else [text])
        if annotations is None:
            annotations = self.annotator(texts)
        elif not is_batched:
            annotations = [annotations]
        if len(annotations) != len(texts):
            raise ValueError(f"Got {len(annotations)} annotations for {len(texts)} texts.")
        if not texts:
            return BatchEncoding({name: [] for name in self.model_input_names}, tensor_type=return_tensors)

        # The whole batch aligns in one vectorised pass over its texts joined end to end.
        annotation, bases = join_annotations(
            list(annotations), [len(text) for text in texts], list(self.metadata_fields)
        )
        joined_text = "".join(texts)
        # `template_spans` (per text, from `apply_chat_template`): the chat template's own text, tagged special.
        template_spans = template_spans or [()] * len(texts)
        if self.alignment == "pretokenized":
            segments = self._keep_whole(
                batch_segment_offsets(annotation, bases, joined_text), texts, template_spans
            )
            absolute = np.concatenate([segment + base for segment, base in zip(segments, bases, strict=True)])
            pieces = list(map(joined_text.__getitem__, map(slice, *absolute.T.tolist())))
            inputs = split_rows(pieces, [len(segment) for segment in segments])
        else:
            segments, inputs = None, texts
        encoded = super()._encode_plus(
            inputs,
            is_split_into_words=segments is not None,
            return_offsets_mapping=False,
            return_overflowing_tokens=return_overflowing_tokens,
            **kwargs,
        )
        sample_of_row = list(encoded.get("overflow_to_sample_mapping", range(len(texts))))
        lengths = [len(encoding) for encoding in encoded.encodings]
        template_chars = np.zeros(len(joined_text), dtype=bool)
        for base, spans in zip(bases.tolist(), template_spans, strict=True):
            for start, end in spans:
                template_chars[base + start : base + end] = True
        tags, offsets = self._align_batch(
            encoded.encodings,
            lengths,
            sample_of_row,
            annotation,
            bases,
            joined_text,
            segments,
            template_chars,
        )
        data = dict(encoded)
        data.update({f"{name}_ids": field_tags for name, field_tags in tags.items()})
        if return_offsets_mapping:
            data["offset_mapping"] = split_rows(list(map(tuple, offsets.tolist())), lengths)
        output = BatchEncoding(data, encoded.encodings, tensor_type=return_tensors)
        if not is_batched and return_tensors is None and not return_overflowing_tokens:
            output = BatchEncoding(
                {key: value[0] if isinstance(value[0], list) else value for key, value in output.items()},
                output.encodings,
            )
        return output

    def _keep_whole(
        self,
        segments: list[np.ndarray],
        texts: list[str],
        template_spans: Sequence[Sequence[tuple[int, int]]],
    ) -> list[np.ndarray]:
        """
        Pretokenized segments re-cut so that added tokens written in a text (`<|eos|>`, role markers) and chat
        template spans are whole segments: spaCy would split `<|eos|>` into `<`, `|`, ..., which the backend would
        then encode as characters. Inside a whole segment the backend extracts added tokens as it always does.
        """
        pattern = added_token_pattern(self.added_tokens_decoder.values(), bool(self.split_special_tokens))
        if pattern is None and not any(template_spans):
            return segments
        return [
            keep_whole(
                text_segments,
                [*spans, *(match.span() for match in (pattern.finditer(text) if pattern else ()))],
                len(text),
            )
            for text_segments, text, spans in zip(segments, texts, template_spans, strict=True)
        ]

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        tools: list[dict | Any] | None = None,
        documents: list[dict[str, str]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> str | list[str] | list[int] | list[list[int]] | BatchEncoding:
        """
        `PreTrainedTokenizerBase.apply_chat_template` with the metadata ids (`pos_ids`, `ner_ids`, ...) beside
        `input_ids` (with `return_dict=True`, the default; `return_dict=False` returns the `input_ids` alone).

        The chat is rendered by the template exactly as the base tokenizer renders it (`tokenize=False` returns that
        text). Each message's text is found in it and annotated on its own, so no tag crosses a message boundary;
        the template's own text (role markers, special tokens, separators) is tagged special (id 2). In the
        `offsets` alignment the `input_ids` are the base tokenizer's; in `pretokenized` the template's added tokens
        stay whole tokens and the message texts are cut at their linguistic boundaries. `add_generation_prompt`,
        `continue_final_message`, `tools`, `documents`, padding, truncation and `return_assistant_tokens_mask`
        (templates with `{% generation %}`) work as for the base tokenizer; `sanitize_control_tokens` does not.
        Only message text (`content`, or the text blocks of a content list) is annotated: other fields the
        template writes (tool calls, reasoning) are template text.
        """
        if kwargs.get("sanitize_control_tokens"):
            raise ValueError(
                "LimeTokenizer.apply_chat_template does not support `sanitize_control_tokens=True`: added tokens "
                "written in a message stay tokens (tagged special). Remove them from the messages instead."
            )
        render_kwargs = dict(
            tools=tools,
            documents=documents,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **kwargs,
        )
        rendered = super().apply_chat_template(conversation, tokenize=False, **render_kwargs)
        if not tokenize:
            return rendered
        is_batched = isinstance(rendered, list)
        texts = rendered if is_batched else [rendered]
        chats = [getattr(chat, "messages", chat) for chat in (conversation if is_batched else [conversation])]
        message_spans = [locate_messages(text, chat) for text, chat in zip(texts, chats, strict=True)]
        generation_spans = (
            self._generation_spans(conversation if is_batched else [conversation], texts, render_kwargs)
            if return_assistant_tokens_mask
            else None
        )
        flat_spans = [span for spans in message_spans for span in spans]
        message_annotations = iter(
            self.annotator(
                [texts[row][start:end] for row, spans in enumerate(message_spans) for start, end in spans]
            )
            if flat_spans
            else []
        )
        annotations = [
            place_annotations(
                [next(message_annotations) for _ in spans],
                [start for start, _ in spans],
                list(self.metadata_fields),
            )
            for spans in message_spans
        ]
        tokenizer_kwargs = dict(tokenizer_kwargs or {})
        return_offsets = tokenizer_kwargs.pop("return_offsets_mapping", False)
        encoded = self(
            texts,
            annotations=annotations,
            template_spans=[
                complement(spans, len(text)) for spans, text in zip(message_spans, texts, strict=True)
            ],
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            add_special_tokens=False,
            return_offsets_mapping=return_offsets or generation_spans is not None,
            **tokenizer_kwargs,
        )
        data = dict(encoded)
        if generation_spans is not None:
            data["assistant_masks"] = [
                assistant_mask(offsets, spans, mask)
                for offsets, spans, mask in zip(
                    data["offset_mapping"], generation_spans, data["attention_mask"], strict=True
                )
            ]
            if not return_offsets:
                del data["offset_mapping"]
        if not return_dict:
            data = {"input_ids": data["input_ids"]}
        if not is_batched and not return_tensors and len(data["input_ids"]) == 1:
            data = {key: value[0] for key, value in data.items()}
        output = BatchEncoding(data, encoded.encodings, tensor_type=return_tensors)
        return output if return_dict else output["input_ids"]

    def _generation_spans(
        self, conversations: list[Any], texts: list[str], render_kwargs: dict[str, Any]
    ) -> list[list[tuple[int, int]]]:
        """The `{% generation %}` character spans of each rendered chat (the assistant turns of the template)."""
        render_kwargs = dict(render_kwargs)
        chat_template = self.get_chat_template(render_kwargs.pop("chat_template"), render_kwargs["tools"])
        rendered, spans = render_jinja_template(
            conversations=conversations,
            chat_template=chat_template,
            return_assistant_tokens_mask=True,
            **{**self.special_tokens_map, **render_kwargs},
        )
        if rendered != texts:
            raise ValueError(
                "The chat template renders these messages differently when asked for the assistant mask; "
                "`return_assistant_tokens_mask=True` cannot be supported for them."
            )
        return [[tuple(span) for span in chat_spans] for chat_spans in spans]

    def _align_batch(
        self,
        encodings: list[Any],
        lengths: list[int],
        sample_of_row: list[int],
        annotation: dict[str, dict],
        bases: np.ndarray,
        joined_text: str,
        segments: list[np.ndarray] | None,
        template_chars: np.ndarray,
    ) -> tuple[dict[str, list[list[int]]], np.ndarray]:
        """
        Tag ids per field (one list per row) and absolute character offsets of every encoded row (Rust
        `Encoding`s of `lengths` tokens; offsets of all rows concatenated, shape `(sum(lengths), 2)`), computed
        in one vectorised pass over the batch's texts joined end to end (`joined_text`, its `annotation`, and
        `bases`, the start of each text; see `join_annotations`). A unit whose first non-whitespace character (or
        first character, if it has none) is a chat template's (`template_chars`, per joined character) is special.

        A row's "units" are its tokens (offsets mode) or its sample's segments (pretokenized mode, where a
        token's word id indexes its segment and its offsets are relative to the segment).
        """
        row_bases = bases[sample_of_row]
        offsets = np.fromiter(chain.from_iterable(flatten_rows(encodings, "offsets")), dtype=np.int64)
        offsets = offsets.reshape(-1, 2)
        if segments is None:
            units = offsets + np.repeat(row_bases, lengths)[:, None]
            unit_of_token = np.arange(len(units))
        else:
            units = np.concatenate([segment + base for segment, base in zip(segments, bases, strict=True)])
            unit_bases = np.concatenate([[0], np.cumsum([len(segment) for segment in segments])])[
                sample_of_row
            ]
            # None (special and padding tokens) becomes NaN in a float array, then -1.
            word_ids = np.array(flatten_rows(encodings, "word_ids"), dtype=np.float64)
            word_ids = np.nan_to_num(word_ids, nan=-1).astype(np.int64)
            unit_of_token = np.where(word_ids >= 0, word_ids + np.repeat(unit_bases, lengths), -1)
            # Offsets relative to the segment become absolute in the sample's text; special tokens get (0, 0).
            segment_starts = units[:, 0] - np.repeat(bases, [len(segment) for segment in segments])
            offsets = np.where(unit_of_token[:, None] >= 0, offsets + segment_starts[unit_of_token, None], 0)
        unit_tags = tags_from_offsets(
            annotation, units, joined_text, self._label_to_id, self.whitespace_labels
        )
        input_ids = np.array(flatten_rows(encodings, "ids"), dtype=np.int64)
        is_special = np.isin(input_ids, self.all_special_ids) | (unit_of_token < 0)
        if template_chars.any():
            anchors = first_non_whitespace(joined_text, units)
            anchors = np.where(anchors >= 0, anchors, np.minimum(units[:, 0], len(joined_text) - 1))
            is_special |= (unit_of_token >= 0) & template_chars[anchors][unit_of_token]
        is_padding = np.array(flatten_rows(encodings, "attention_mask"), dtype=np.int64) == 0
        tags = {
            name: split_rows(fill_reserved(field_tags[unit_of_token], is_special, is_padding), lengths)
            for name, field_tags in unit_tags.items()
        }
        return tags, offsets

    def _pad(
        self,
        encoded_inputs: dict[str, Any],
        max_length: int | None = None,
        padding_strategy: Any = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict[str, Any]:
        """Pad like the base tokenizer, and pad every `{field}_ids` with the padding tag (0) on the same side."""
        length = len(encoded_inputs[self.model_input_names[0]])
        kwargs = {"padding_strategy": padding_strategy} if padding_strategy is not None else {}
        encoded_inputs = super()._pad(
            encoded_inputs,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        difference = len(encoded_inputs[self.model_input_names[0]]) - length
        if difference:
            side = padding_side or self.padding_side
            for name in self.metadata_fields:
                key = f"{name}_ids"
                if key in encoded_inputs:
                    tags, pad = list(encoded_inputs[key]), [PAD_ID] * difference
                    encoded_inputs[key] = tags + pad if side == "right" else pad + tags
        return encoded_inputs

    def metadata_for_ids(
        self, input_ids: Sequence[int], annotation: dict | None = None
    ) -> dict[str, list[int]]:
        """
        Tag ids for an arbitrary id sequence (e.g. generated tokens), shape `(len(input_ids),)` per field.

        The ids are decoded, the text is annotated (unless `annotation` of that decoded text is given) and each
        token takes the tags of its first non-whitespace character; special tokens get the special tag.
        Token character offsets come from decoding growing prefixes, so this costs `O(len(input_ids)^2)`
        decoding work: meant for short tails, not corpora.
        """
        input_ids = [int(token) for token in input_ids]
        ends = [
            len(self._tokenizer.decode(input_ids[: index + 1], skip_special_tokens=False))
            for index in range(len(input_ids))
        ]
        # Byte-level pieces of one character decode to U+FFFD until complete, so prefix lengths can shrink.
        ends = np.maximum.accumulate(np.asarray(ends or [0], dtype=np.int64))[: len(input_ids)]
        offsets = (
            np.stack([np.concatenate([[0], ends[:-1]]), ends], axis=1) if len(input_ids) else np.zeros((0, 2))
        )
        text = self._tokenizer.decode(input_ids, skip_special_tokens=False)
        annotation = annotation if annotation is not None else self.annotator([text])[0]
        tags = tags_from_offsets(annotation, offsets, text, self._label_to_id, self.whitespace_labels)
        is_special = np.isin(np.asarray(input_ids, dtype=np.int64), self.all_special_ids)
        no_padding = np.zeros_like(is_special)
        return {
            name: fill_reserved(field_tags, is_special, no_padding).tolist()
            for name, field_tags in tags.items()
        }


def split_rows(values: np.ndarray | list, lengths: list[int]) -> list[list]:
    """Cut the concatenated values of every row back into one Python list per row (`lengths` items each)."""
    flat = values.tolist() if isinstance(values, np.ndarray) else values
    ends = list(accumulate(lengths))
    return [flat[end - length : end] for end, length in zip(ends, lengths, strict=True)]


def flatten_rows(encodings: list[Any], attribute: str) -> list:
    """One attribute (`ids`, `word_ids`, ...) of every encoding, concatenated (C-speed `chain`)."""
    return list(chain.from_iterable(getattr(encoding, attribute) for encoding in encodings))


def field_annotators_for(
    metadata_fields: dict[str, list[str]], custom: Sequence[FieldAnnotator]
) -> dict[str, FieldAnnotator]:
    """Annotator per field (custom ones by name, else built-in); checks each against the saved inventory."""
    by_name = {annotator.name: annotator for annotator in custom}
    unknown = sorted(set(by_name) - set(metadata_fields))
    if unknown:
        raise ValueError(
            f"`field_annotators` for {unknown} match no metadata field; the fields are {list(metadata_fields)}."
        )
    annotators = {}
    for name, inventory in metadata_fields.items():
        annotator = by_name.get(name) or (BUILTIN_FIELDS[name]() if name in BUILTIN_FIELDS else None)
        if annotator is None:
            continue
        if annotator.inventory != list(inventory):
            raise ValueError(
                f"Field {name!r}: the annotator {annotator!r} has the inventory {annotator.inventory}, but the "
                f"tokenizer's is {list(inventory)}."
            )
        annotators[name] = annotator
    return annotators


def check_whitespace_labels(metadata_fields: dict[str, list[str]], whitespace_labels: dict[str, str]) -> None:
    """Every field needs a whitespace label from its own inventory."""
    for name, inventory in metadata_fields.items():
        if name not in whitespace_labels:
            raise ValueError(
                f"Field {name!r} has no whitespace label: pass its `FieldAnnotator` in `field_annotators` or "
                f"`whitespace_labels={{{name!r}: ...}}`."
            )
        if whitespace_labels[name] not in inventory[3:]:
            raise ValueError(
                f"Field {name!r}: the whitespace label {whitespace_labels[name]!r} is not in its inventory "
                f"{inventory[3:]}."
            )


LimeTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = ["LimeTokenizer"]
