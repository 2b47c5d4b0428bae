"""Causal (prefix-only) annotation: every label equals the pipeline's label for the last token of the prefix that
ends with it, computed here by brute force (one `nlp` call per prefix); boundaries are the full-document ones."""

import pickle

import pytest
from datasets import Dataset, load_dataset

from lime_hf.annotation import SpacyAnnotator, load_pipeline, resolve_fields
from lime_hf.data import annotate_dataset
from tests.test_annotation import DigitPosition

# Longer than the default windows (4 tokens for pos, 8 for ner), with entities, contractions, hyphens,
# abbreviations, emoji, CRLF and runs of whitespace.
TEXTS = [
    "Captain Frederick Wentworth of the Royal Navy didn't write to Miss Anne Elliot of Kellynch Hall in "
    "Somersetshire until the summer of 1814, when Lady Russell's carriage came back from Bath.",
    '  She said: "Mr. Elliot\'s well-known friend, e.g. Colonel Wallis, is here!" \r\n\r\nThey went to '
    "Uppercross 😀 on Tuesday, the 5th of May, at 10 a.m., with $5.00 (approx.) for Mrs. Musgrove.",
]


@pytest.fixture(scope="module")
def causal() -> SpacyAnnotator:
    return SpacyAnnotator(causal=True)


def brute_force_labels(text: str, ends: list[int]) -> dict[str, list[str]]:
    """pos and ner of the last token of `nlp(text[:end])` for every end: the definition, without windows."""
    nlp = load_pipeline(None, resolve_fields(["pos", "ner"]))
    labels = {"pos": [], "ner": []}
    for end in ends:
        last = nlp(text[:end])[-1]
        labels["pos"].append(last.tag_)
        labels["ner"].append(f"{last.ent_iob_}-{last.ent_type_}" if last.ent_type_ else "O")
    return labels


@pytest.mark.parametrize("text", TEXTS)
def test_labels_are_those_of_each_prefix_and_boundaries_those_of_the_full_document(text, causal, annotator):
    (annotation,) = causal([text])
    (full,) = annotator([text])
    for name in ("pos", "ner"):
        assert annotation[name]["starts"] == full[name]["starts"]
        assert annotation[name]["ends"] == full[name]["ends"]
    expected = brute_force_labels(text, full["pos"]["ends"])
    assert annotation["pos"]["labels"] == expected["pos"]
    assert annotation["ner"]["labels"] == expected["ner"]
    # The right context matters: some full-document labels are not what the prefix gives.
    assert annotation["pos"]["labels"] != full["pos"]["labels"]


def test_full_document_labels_leak_the_right_context(causal, annotator):
    """With "Wentworth" still unseen, "Captain" is no person yet; the full document's label knows what follows."""
    text = "She met Captain Wentworth at Uppercross."
    assert annotator([text])[0]["ner"]["labels"][2:4] == ["B-PERSON", "I-PERSON"]
    assert causal([text])[0]["ner"]["labels"][2:4] == ["O", "B-PERSON"]


def test_windows_cross_chunks_of_long_texts(annotator):
    text = TEXTS[0] + "\n" + TEXTS[0]
    (annotation,) = SpacyAnnotator(causal=True, max_chars=60)([text])
    (full,) = SpacyAnnotator(max_chars=60)([text])
    assert annotation["pos"]["ends"] == full["pos"]["ends"]
    expected = brute_force_labels(text, full["pos"]["ends"])  # whole prefixes, no chunks
    assert annotation["pos"]["labels"] == expected["pos"]
    assert annotation["ner"]["labels"] == expected["ner"]


def test_bad_input_like_the_full_mode(causal, annotator):
    texts = ["", "   ", "\r\n", "😀", "😀 東京", "a" * 300 + " end", "x" * 120]
    annotations = causal(texts)
    for text, annotation, full in zip(texts, annotations, annotator(texts), strict=True):
        for name in ("pos", "ner"):
            assert annotation[name]["ends"] == full[name]["ends"], text
        assert annotation["pos"]["labels"] == brute_force_labels(text, full["pos"]["ends"])["pos"]
    assert annotations[0]["pos"] == {"starts": [], "ends": [], "labels": []}
    # An enormous word cut into chunks inside the word: windows stay within `max_chars`, boundaries unchanged.
    word = "Elliot" * 50
    chunked = SpacyAnnotator(["pos"], causal=True, max_chars=40)([word + " said."])[0]["pos"]
    assert chunked["ends"] == SpacyAnnotator(["pos"], max_chars=40)([word + " said."])[0]["pos"]["ends"]
    with pytest.raises(ValueError, match="list of strings"):
        causal("not a list")
    with pytest.raises(ValueError, match="causal_window"):
        SpacyAnnotator(causal=True, causal_window=-1)


def test_custom_field_sees_only_the_prefix():
    """Place values counted from the right: with no right context every digit is the units digit."""
    (annotation,) = SpacyAnnotator([DigitPosition(), "pos"], causal=True)(["add 125 and 7"])
    assert annotation["digit"] == {
        "starts": [4, 5, 6, 12],
        "ends": [5, 6, 7, 13],
        "labels": ["D0", "D0", "D0", "D0"],
    }
    assert annotation["pos"]["labels"] == brute_force_labels("add 125 and 7", [3, 7, 11, 13])["pos"]


def test_window_override_and_pickling():
    annotator = SpacyAnnotator(["pos", "ner", DigitPosition()], causal=True)
    assert {window: [f.name for f in fields] for window, fields in annotator._causal_groups().items()} == {
        4: ["pos"],
        8: ["ner"],
        32: ["digit"],
    }
    wide = SpacyAnnotator(causal=True, causal_window=48)
    assert list(wide._causal_groups()) == [48]
    clone = pickle.loads(pickle.dumps(wide))
    assert clone.causal and clone.causal_window == 48 and clone._nlp is None
    (narrow,) = SpacyAnnotator(["pos"], causal=True, causal_window=0)([TEXTS[0]])
    assert narrow["pos"]["ends"] == SpacyAnnotator(["pos"])([TEXTS[0]])[0]["pos"]["ends"]


def test_annotate_dataset_marks_causal_data(causal, annotator):
    dataset = Dataset.from_dict({"text": [TEXTS[1], "", "Anne smiled."]})
    annotated = annotate_dataset(dataset, causal=True, load_from_cache_file=False)
    assert annotated.column_names == ["text", "lime_pos", "lime_ner", "lime_causal"]
    assert annotated["lime_causal"] == [True, True, True]
    expected = causal(dataset["text"])
    assert annotated["lime_pos"] == [a["pos"] for a in expected]
    assert annotated["lime_ner"] == [a["ner"] for a in expected]
    assert "lime_causal" not in annotate_dataset(dataset, annotator=annotator).column_names
    with pytest.raises(ValueError, match="not causal"):
        annotate_dataset(dataset, annotator=annotator, causal=True)

    class Causal(DigitPosition):
        name = "causal"

    with pytest.raises(ValueError, match="clash"):
        annotate_dataset(dataset, fields=[Causal()], causal=True)


def test_datatrove_local_executor_carries_causal_annotation(causal, tmp_path):
    datatrove = pytest.importorskip("lime_hf.integrations.datatrove", reason="needs the datatrove extra")
    rows = [
        {"id": f"r{i}", "text": text} for i, text in enumerate([*TEXTS, "Anne smiled at Captain Wentworth."])
    ]
    (tmp_path / "in").mkdir()
    Dataset.from_list(rows).to_json(tmp_path / "in" / "part.jsonl")
    datatrove.annotate_corpus(tmp_path / "in", tmp_path / "out", tmp_path / "logs", causal=True)
    output = load_dataset("parquet", data_dir=str(tmp_path / "out"), split="train").sort("id")
    assert output.features == datatrove.annotation_features(["pos", "ner"], causal=True)
    assert output["lime_causal"] == [True] * len(rows)
    reference = annotate_dataset(Dataset.from_list(rows), annotator=causal).sort("id")
    assert output["lime_pos"] == reference["lime_pos"] and output["lime_ner"] == reference["lime_ner"]
