"""Pure alignment functions: character spans + offsets -> tag ids, and pretokenization segments."""

import numpy as np
import pytest

from lime_hf.alignment import (
    fill_reserved,
    first_non_whitespace,
    is_whitespace,
    join_annotations,
    label_to_id_maps,
    segment_offsets,
    tags_from_offsets,
)
from lime_hf.configuration_lime import DEFAULT_METADATA_FIELDS, PAD_ID, SPECIAL_ID

MAPS = label_to_id_maps(DEFAULT_METADATA_FIELDS)
WHITESPACE = {"pos": "_SP", "ner": "O"}
POS, NER = MAPS["pos"], MAPS["ner"]


def spans(*triples):
    return {
        "starts": [s for s, _, _ in triples],
        "ends": [e for _, e, _ in triples],
        "labels": [label for _, _, label in triples],
    }


# "Emma  met Mr. Knightley"; spaCy-like tokens (the single trailing space of a token is in no span).
TEXT = "Emma  met Mr. Knightley"
ANNOTATION = {
    "pos": spans((0, 4, "NNP"), (5, 6, "_SP"), (6, 9, "VBD"), (10, 13, "NNP"), (14, 23, "NNP")),
    "ner": spans((0, 4, "B-PERSON"), (5, 6, "O"), (6, 9, "O"), (10, 13, "B-PERSON"), (14, 23, "I-PERSON")),
}


def test_first_non_whitespace_per_token():
    offsets = np.array([[0, 2], [4, 6], [5, 9], [9, 11], [3, 3]])
    assert first_non_whitespace(TEXT, offsets).tolist() == [0, -1, 6, 10, -1]


def test_tags_follow_first_non_whitespace_character():
    # Subwords: "Em" "ma" " " " " " me" "t" " Mr" "." " Kn" "ightley"
    offsets = [(0, 2), (2, 4), (4, 5), (5, 6), (6, 8), (8, 9), (9, 12), (12, 13), (13, 16), (16, 23)]
    tags = tags_from_offsets(ANNOTATION, offsets, TEXT, MAPS, WHITESPACE)
    assert tags["pos"].tolist() == [POS[t] for t in ["NNP", "NNP", "_SP", "_SP", "VBD", "VBD"] + ["NNP"] * 4]
    # Every subword repeats its word's entity tag, B- included.
    assert (
        tags["ner"].tolist()
        == [NER[t] for t in ["B-PERSON"] * 2 + ["O"] * 4 + ["B-PERSON"] * 2] + [NER["I-PERSON"]] * 2
    )


def test_segments_cut_at_every_boundary_and_a_lone_space_joins_the_next_word():
    segments = segment_offsets(ANNOTATION, TEXT)
    assert [TEXT[s:e] for s, e in segments.tolist()] == ["Emma", " ", " met", " Mr.", " Knightley"]
    # A cut inside a word from another field's span is honoured too.
    annotation = {**ANNOTATION, "extra": spans((0, 2, "X"))}
    assert [TEXT[s:e] for s, e in segment_offsets(annotation, TEXT).tolist()][:2] == ["Em", "ma"]
    assert segment_offsets({"pos": spans()}, "").shape == (0, 2)
    assert [TEXT[s:e] for s, e in segment_offsets({"pos": spans()}, TEXT).tolist()] == [TEXT]


def test_newline_does_not_join_and_uncovered_text_is_whitespace_tagged():
    text = "a\nb"
    annotation = {"pos": spans((0, 1, "DT"), (2, 3, "NN"))}
    assert [text[s:e] for s, e in segment_offsets(annotation, text).tolist()] == ["a", "\n", "b"]
    tags = tags_from_offsets(annotation, [(0, 1), (1, 2), (2, 3)], text, {"pos": POS}, WHITESPACE)
    assert tags["pos"].tolist() == [POS["DT"], POS["_SP"], POS["NN"]]


def test_label_outside_inventory_is_a_clear_error():
    annotation = {"pos": spans((0, 4, "NOPE")), "ner": spans()}
    with pytest.raises(ValueError, match=r"Field 'pos': the label 'NOPE' is not in .*Allowed labels: \['\$'"):
        tags_from_offsets(annotation, [(0, 4)], TEXT, MAPS, WHITESPACE)


def test_fill_reserved_marks_special_and_padding():
    tags = np.array([5, 6, 7, 8])
    filled = fill_reserved(tags, np.array([False, True, False, True]), np.array([False, False, False, True]))
    assert filled.tolist() == [5, SPECIAL_ID, 7, PAD_ID]


def test_whitespace_table_agrees_with_str_isspace_on_every_code_point():
    every_character = "".join(map(chr, range(0x110000)))
    expected = np.array([character.isspace() for character in every_character])
    assert np.array_equal(is_whitespace(every_character), expected)


def test_joined_annotations_shift_spans_and_reject_spans_beyond_their_text():
    first = {"pos": spans((0, 4, "NNP")), "ner": spans((0, 4, "B-PERSON"))}
    second = {"pos": spans((1, 3, "VBD")), "ner": spans()}
    joined, bases = join_annotations([first, second], [5, 3], ["pos", "ner"])
    assert bases.tolist() == [0, 5]
    assert joined["pos"]["starts"].tolist() == [0, 6] and joined["pos"]["ends"].tolist() == [4, 8]
    assert joined["pos"]["labels"] == ["NNP", "VBD"] and joined["ner"]["labels"] == ["B-PERSON"]
    with pytest.raises(
        ValueError,
        match=r"Field 'pos': the span \[1, 3\) of text 1 does not lie within the text's 2 characters",
    ):
        join_annotations([first, second], [5, 2], ["pos", "ner"])
    with pytest.raises(ValueError, match=r"The annotation of text 1 has no field 'ner'"):
        join_annotations([first, {"pos": spans()}], [5, 3], ["pos", "ner"])
