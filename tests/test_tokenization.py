"""LimeTokenizer: both alignment modes, Transformers tokenizer behaviour, saving/loading, bad input."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import lime_hf  # noqa: F401 - registers LimeTokenizer with AutoTokenizer
from lime_hf.configuration_lime import DEFAULT_METADATA_FIELDS
from lime_hf.tokenization_lime import LimeTokenizer
from tests.conftest import share_annotator

TEXT = "Emma Woodhouse, handsome, clever, and rich,  lived in London.\nShe was 21."
BAD_INPUTS = [
    "",
    " ",
    "   \n\t  ",
    "Hi 😀👩‍👩‍👧 there",
    "東京は日本の首都です。",
    "e\u0301 cafe\u0301 \u200bzero\u200dwidth",
    "bell\x07 null\x00 esc\x1b",
    "line one\r\nline two\r\n",
    "<|eos|> is a special token",
]


def labels(tokenizer, encoding, field):
    return [tokenizer.metadata_fields[field][i] for i in encoding[f"{field}_ids"]]


def test_metadata_fields_match_the_model_config(lime_pretokenized):
    assert lime_pretokenized.metadata_fields == DEFAULT_METADATA_FIELDS
    assert lime_pretokenized.model_input_names == ["input_ids", "attention_mask", "pos_ids", "ner_ids"]


@pytest.mark.parametrize("mode", ["pretokenized", "offsets"])
def test_word_tags_repeat_on_every_subword(mode, lime_pretokenized, lime_offsets):
    tokenizer = lime_pretokenized if mode == "pretokenized" else lime_offsets
    encoding = tokenizer(TEXT, return_offsets_mapping=True)
    assert {len(v) for v in encoding.values()} == {len(encoding["input_ids"])}
    by_piece = {
        TEXT[s:e]: (pos, ner)
        for (s, e), pos, ner in zip(
            encoding["offset_mapping"],
            labels(tokenizer, encoding, "pos"),
            labels(tokenizer, encoding, "ner"),
            strict=True,
        )
    }
    # "Emma" is split into subwords; each carries NNP and B-PERSON.
    assert by_piece["E"] == by_piece["mma"] == ("NNP", "B-PERSON")
    assert by_piece[" Woodhouse"] == ("NNP", "I-PERSON")
    assert by_piece["\n"] == ("_SP", "O")
    assert by_piece["2"] == by_piece["1"] == ("CD", "B-DATE")


def test_pretokenized_round_trip_and_no_token_crosses_a_boundary(lime_pretokenized):
    encoding = lime_pretokenized(TEXT, return_offsets_mapping=True)
    assert lime_pretokenized.decode(encoding["input_ids"]) == TEXT
    (annotation,) = lime_pretokenized.annotator([TEXT])
    boundaries = {b for spans in annotation.values() for b in spans["starts"] + spans["ends"]}
    for start, end in encoding["offset_mapping"]:
        inner = {b for b in boundaries if start < b < end}
        # Only a lone leading space may precede a boundary inside a token (GPT-2 style " word").
        assert inner <= ({start + 1} if TEXT[start] == " " else set()), TEXT[start:end]


def test_offsets_mode_keeps_the_base_ids(lime_offsets, bpe_tokenizer):
    encoding = lime_offsets(TEXT, return_offsets_mapping=True)
    base = bpe_tokenizer(TEXT, return_offsets_mapping=True)
    assert encoding["input_ids"] == base["input_ids"]
    assert encoding["offset_mapping"] == base["offset_mapping"]
    # Whitespace-only subwords take the whitespace tags.
    whitespace = [i for i, (s, e) in enumerate(encoding["offset_mapping"]) if TEXT[s:e].isspace()]
    assert whitespace and all(
        encoding["pos_ids"][i] == lime_offsets.metadata_fields["pos"].index("_SP") for i in whitespace
    )


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", ["pretokenized", "offsets"])
def test_padding_truncation_and_tensors_agree_across_fields(side, mode, lime_pretokenized, lime_offsets):
    tokenizer = lime_pretokenized if mode == "pretokenized" else lime_offsets
    texts = ["Emma smiled.", TEXT]
    batch = tokenizer(
        texts, padding="max_length", max_length=40, truncation=True, padding_side=side, return_tensors="pt"
    )
    assert set(batch) == {"input_ids", "attention_mask", "pos_ids", "ner_ids"}
    assert all(v.shape == (2, 40) for v in batch.values())
    pad = batch["attention_mask"] == 0
    assert pad[0].any() and (batch["input_ids"][pad] == tokenizer.pad_token_id).all()
    assert (batch["pos_ids"][pad] == 0).all() and (batch["ner_ids"][~pad] > 2).all()
    assert bool(pad[0, 0]) == (side == "left")
    single = tokenizer(texts[0])
    real = batch["attention_mask"][0].bool()
    assert batch["pos_ids"][0][real].tolist() == single["pos_ids"]
    truncated = tokenizer(TEXT, truncation=True, max_length=5)
    assert all(len(v) == 5 for v in truncated.values())
    assert truncated["pos_ids"] == tokenizer(TEXT)["pos_ids"][:5]


def test_pad_method_pads_metadata_on_the_padding_side(lime_pretokenized):
    features = [lime_pretokenized("Emma smiled."), lime_pretokenized(TEXT)]
    for side in ("left", "right"):
        lime_pretokenized.padding_side = side
        try:
            batch = lime_pretokenized.pad(features, return_tensors="pt")
        finally:
            lime_pretokenized.padding_side = "right"
        width = batch["input_ids"].shape[1] - len(features[0]["input_ids"])
        padded = batch["pos_ids"][0, :width] if side == "left" else batch["pos_ids"][0, -width:]
        assert padded.tolist() == [0] * width
        assert (batch["attention_mask"][0] == 0).sum() == width


def test_special_tokens_get_the_special_tag_and_absolute_offsets(bpe_tokenizer, annotator):
    tokenizer = share_annotator(
        LimeTokenizer.from_tokenizer(bpe_tokenizer, add_bos_token=True, add_eos_token=True), annotator
    )
    encoding = tokenizer(["Emma smiled.", "She   laughed."], return_offsets_mapping=True)
    for row, text in enumerate(["Emma smiled.", "She   laughed."]):
        ids = encoding["input_ids"][row]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert encoding["pos_ids"][row][0] == encoding["ner_ids"][row][-1] == 2
        pieces = [text[s:e] for s, e in encoding["offset_mapping"][row][1:-1]]
        assert "".join(pieces) == text
    plain = tokenizer("Emma smiled.", add_special_tokens=False)
    assert plain["input_ids"] == encoding["input_ids"][0][1:-1] and 2 not in plain["pos_ids"]


def test_wordpiece_in_offsets_mode(wordpiece_tokenizer, annotator):
    tokenizer = share_annotator(
        LimeTokenizer.from_tokenizer(wordpiece_tokenizer, alignment="offsets"), annotator
    )
    encoding = tokenizer(TEXT)
    assert encoding["input_ids"] == wordpiece_tokenizer(TEXT)["input_ids"]
    assert encoding["pos_ids"][0] == encoding["pos_ids"][-1] == 2  # [CLS] ... [SEP]
    offsets = tokenizer(TEXT, return_offsets_mapping=True)["offset_mapping"]
    tokens = wordpiece_tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    tags = dict(zip(zip(tokens, offsets, strict=True), labels(tokenizer, encoding, "ner"), strict=True))
    start = TEXT.index("London")
    london = [(token, (s, e)) for token, (s, e) in tags if start <= s and e <= start + len("London")]
    # The 600-token WordPiece splits the (lower-cased) word into pieces; each repeats the word's entity tag.
    assert len(london) > 1 and "".join(token.removeprefix("##") for token, _ in london) == "london"
    assert [tags[piece] for piece in london] == ["B-GPE"] * 3
    assert [tags[piece] for piece in tags if piece[0] in ("emma", "woodhouse")] == ["B-PERSON", "I-PERSON"]


def test_invalid_calls_are_clear_errors(lime_pretokenized, bpe_tokenizer):
    with pytest.raises(ValueError, match="text_pair"):
        lime_pretokenized("a", "b")
    with pytest.raises(ValueError, match="is_split_into_words"):
        lime_pretokenized(["a", "b"], is_split_into_words=True)
    with pytest.raises(ValueError, match=r"Unknown metadata field 'morph'"):
        LimeTokenizer.from_tokenizer(bpe_tokenizer, fields=("pos", "morph"))
    with pytest.raises(ValueError, match="alignment"):
        LimeTokenizer.from_tokenizer(bpe_tokenizer, alignment="words")
    bad = {
        "pos": {"starts": [0], "ends": [1], "labels": ["VERB"]},
        "ner": {"starts": [], "ends": [], "labels": []},
    }
    with pytest.raises(ValueError, match=r"Field 'pos': the label 'VERB' is not in"):
        lime_pretokenized("a", annotations=bad)


@pytest.mark.parametrize("text", BAD_INPUTS)
def test_bad_input_keeps_lengths_and_round_trip(text, lime_pretokenized, lime_offsets, bpe_tokenizer):
    pretokenized = lime_pretokenized(text, return_offsets_mapping=True)
    assert len({len(v) for v in pretokenized.values()}) == 1
    assert lime_pretokenized.decode(pretokenized["input_ids"]) == text
    offsets = lime_offsets(text)
    assert offsets["input_ids"] == bpe_tokenizer(text)["input_ids"]
    assert len({len(v) for v in offsets.values()}) == 1


def test_batch_equals_items_on_bad_inputs(lime_pretokenized):
    batch = lime_pretokenized(BAD_INPUTS)
    for row, text in enumerate(BAD_INPUTS):
        single = lime_pretokenized(text)
        assert {key: batch[key][row] for key in batch} == dict(single)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=3))
def test_properties_on_arbitrary_unicode(texts, lime_pretokenized, lime_offsets, bpe_tokenizer):
    annotations = lime_pretokenized.annotator(texts)
    for tokenizer in (lime_pretokenized, lime_offsets):
        batch = tokenizer(texts, annotations=annotations)
        for row, text in enumerate(texts):
            item = tokenizer(text, annotations=annotations[row])
            assert {key: batch[key][row] for key in batch} == dict(item)
            assert len({len(v) for v in item.values()}) == 1
    for row, text in enumerate(texts):
        assert (
            lime_pretokenized.decode(lime_pretokenized(text, annotations=annotations[row])["input_ids"])
            == text
        )
        assert (
            lime_offsets(text, annotations=annotations[row])["input_ids"] == bpe_tokenizer(text)["input_ids"]
        )


def test_metadata_for_ids_matches_the_encoding(lime_offsets):
    encoding = lime_offsets(TEXT)
    tags = lime_offsets.metadata_for_ids(encoding["input_ids"])
    assert tags == {"pos": encoding["pos_ids"], "ner": encoding["ner_ids"]}


def backend_model(tokenizer):
    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]


@pytest.mark.parametrize("mode", ["pretokenized", "offsets"])
def test_save_and_reload_give_identical_outputs(mode, tmp_path, bpe_tokenizer):
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer, alignment=mode)
    tokenizer.save_pretrained(tmp_path)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert {"tokenization_lime.py", "annotation.py", "alignment.py", "configuration_lime.py"} <= set(saved)
    expected = tokenizer([TEXT, "Hi"], padding=True, return_offsets_mapping=True)
    for loaded in (LimeTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert type(loaded) is LimeTokenizer and loaded.alignment == mode
        # Ids equal after reload: the backend (with its BPE merges) must survive.
        assert backend_model(loaded) == backend_model(tokenizer)
        assert dict(loaded([TEXT, "Hi"], padding=True, return_offsets_mapping=True)) == dict(expected)


@pytest.mark.slow
def test_remote_code_loads_without_lime_hf(tmp_path, bpe_tokenizer):
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer, alignment="pretokenized")
    tokenizer.save_pretrained(tmp_path / "tok")
    expected = dict(tokenizer(TEXT))
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import sys

        class BlockLimeHF:
            def find_spec(self, name, path=None, target=None):
                if name == "lime_hf" or name.startswith("lime_hf."):
                    raise ImportError("lime_hf is blocked in this test")

        sys.meta_path.insert(0, BlockLimeHF())
        """)
    )
    script = textwrap.dedent(f"""
        import json
        try:
            import lime_hf
            raise SystemExit("lime_hf should not be importable")
        except ImportError:
            pass
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r}, trust_remote_code=True)
        print(json.dumps([type(tok).__module__, dict(tok({TEXT!r}))]))
    """)
    env = {
        "PYTHONPATH": str(tmp_path / "shim"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, outputs = json.loads(result.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules") and outputs == expected


@pytest.mark.slow
def test_text_of_one_and_a_half_million_characters(lime_offsets):
    text = ("Emma walked to Highbury.\n" + " " * 975) * 1500
    assert len(text) == 1_500_000
    encoding = lime_offsets(text)
    assert len({len(v) for v in encoding.values()}) == 1
    assert lime_offsets.decode(encoding["input_ids"]) == text
    # Every chunk is annotated: each of the 1500 "Emma"s (first subword included) is a proper noun.
    assert (
        np.count_nonzero(np.array(encoding["pos_ids"]) == lime_offsets.metadata_fields["pos"].index("NNP"))
        >= 1500
    )
