"""SpacyAnnotator: character-span output, only the needed components, chunking of long texts."""

import multiprocessing
import pickle

import pytest

from lime_hf.annotation import FieldAnnotator, SpacyAnnotator, chunk_offsets
from lime_hf.configuration_lime import DEFAULT_METADATA_FIELDS


def test_spans_per_field(annotator):
    text = "Emma Woodhouse lived in Highbury.  Really!"
    (annotation,) = annotator([text])
    assert set(annotation) == {"pos", "ner"}
    pos = annotation["pos"]
    words = [text[s:e] for s, e in zip(pos["starts"], pos["ends"], strict=True)]
    assert words == ["Emma", "Woodhouse", "lived", "in", "Highbury", ".", " ", "Really", "!"]
    assert pos["labels"][:3] == ["NNP", "NNP", "VBD"] and pos["labels"][6] == "_SP"
    assert annotation["ner"]["labels"][:2] == ["B-PERSON", "I-PERSON"]
    for field, spans in annotation.items():
        assert set(spans["labels"]) <= set(DEFAULT_METADATA_FIELDS[field])


def test_only_needed_components_run():
    assert SpacyAnnotator(["pos"]).nlp.pipe_names == ["tok2vec", "tagger"]
    assert SpacyAnnotator(["ner"]).nlp.pipe_names == ["ner"]


def pipeline_id(annotator: SpacyAnnotator) -> int:
    return id(annotator.nlp)


def test_pipelines_are_shared_per_process_and_inherited_by_forked_workers(annotator):
    assert SpacyAnnotator(["pos"]).nlp is SpacyAnnotator(["pos"], batch_size=8).nlp
    assert SpacyAnnotator(["pos"]).nlp is not SpacyAnnotator(["ner"]).nlp
    # The annotator pickles without its pipeline; a forked worker finds the parent's in the cache.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(pipeline_id, (annotator,)) == id(annotator.nlp)


def test_unknown_field_and_bad_input_are_clear_errors(annotator):
    with pytest.raises(ValueError, match=r"Unknown metadata field 'dep'.*\['ner', 'pos'\]"):
        SpacyAnnotator(["pos", "dep"])
    with pytest.raises(ValueError, match="item 1 is a int"):
        annotator(["fine", 3])
    with pytest.raises(OSError, match="no_such_pipeline"):
        SpacyAnnotator(spacy_model="no_such_pipeline").nlp  # noqa: B018


def test_chunk_offsets_cut_at_newlines_then_spaces_then_anywhere():
    assert chunk_offsets("short", 10) == [0]
    assert chunk_offsets("aaaa\nbbbb cc dd", 8) == [0, 5, 13]
    assert chunk_offsets("x" * 25, 10) == [0, 10, 20]


def test_long_text_is_chunked_not_rejected(annotator):
    chunked = SpacyAnnotator(max_chars=60)
    text = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home.\n" * 5
    (annotation,) = chunked([text])
    (reference,) = annotator([text])
    for spans in annotation.values():
        assert spans["starts"] == sorted(spans["starts"]) and spans["ends"][-1] <= len(text)
    # Chunks end at newlines here, so the spans match those of the unchunked text.
    assert annotation["pos"]["starts"] == reference["pos"]["starts"]


def test_pickles_without_the_pipeline(annotator):
    clone = pickle.loads(pickle.dumps(annotator))
    assert clone._nlp is None and clone.metadata_fields == annotator.metadata_fields


class DigitPosition(FieldAnnotator):
    """Toy field: digits tagged by their position from the right in their number (units, tens, ...)."""

    name = "digit"
    labels = ("NONE", "D0", "D1", "D2", "D3+")
    whitespace_label = "NONE"

    def annotate(self, doc):
        spans = []
        for token in doc:
            if token.text.isdigit():
                for offset in range(len(token.text)):
                    place = min(len(token.text) - 1 - offset, 3)
                    spans.append(
                        (token.idx + offset, token.idx + offset + 1, f"D{place}" if place < 3 else "D3+")
                    )
        return spans


def test_custom_field_without_pipeline_components():
    annotator = SpacyAnnotator([DigitPosition()])
    assert annotator.nlp.pipe_names == []
    (annotation,) = annotator(["add 125 and 7"])
    assert annotation["digit"] == {
        "starts": [4, 5, 6, 12],
        "ends": [5, 6, 7, 13],
        "labels": ["D2", "D1", "D0", "D0"],
    }
