"""Annotate once / align many over datasets, packing, and DataCollatorForLime."""

import pytest
import torch
from datasets import Dataset, load_from_disk

from lime_hf.collator import DataCollatorForLime
from lime_hf.data import align_dataset, annotate_dataset, pack_dataset
from lime_hf.tokenization_lime import LimeTokenizer
from tests.conftest import share_annotator


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, corpus_lines):
    """A disk-backed dataset (the datasets cache only works for those), bad inputs included."""
    path = tmp_path_factory.mktemp("corpus")
    Dataset.from_dict({"text": corpus_lines[:60] + ["", "  \r\n", "😀 東京"]}).save_to_disk(path)
    return load_from_disk(path)


@pytest.fixture(scope="module")
def annotated(corpus, annotator):
    return annotate_dataset(corpus, annotator=annotator, batch_size=16)


def test_annotation_is_stored_as_character_spans(annotated, corpus, annotator):
    assert annotated.column_names == ["text", "lime_pos", "lime_ner"]
    row = annotated[3]
    assert row["lime_pos"] == annotator([corpus[3]["text"]])[0]["pos"]
    assert annotated[60]["lime_pos"] == {"starts": [], "ends": [], "labels": []}


def test_second_annotation_hits_the_cache(annotated, corpus, annotator):
    again = annotate_dataset(corpus, annotator=annotator, batch_size=16)
    assert again._fingerprint == annotated._fingerprint and again.cache_files == annotated.cache_files


@pytest.mark.parametrize("mode", ["pretokenized", "offsets"])
def test_align_equals_direct_tokenization_without_spacy(mode, annotated, bpe_tokenizer, annotator):
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer, alignment=mode)
    aligned = align_dataset(annotated, tokenizer)
    assert tokenizer.annotator._nlp is None  # spaCy never loaded
    assert aligned.column_names == ["input_ids", "attention_mask", "pos_ids", "ner_ids"]
    direct = share_annotator(LimeTokenizer.from_tokenizer(bpe_tokenizer, alignment=mode), annotator)
    for index in (0, 5, 61, 62):
        assert aligned[index] == dict(direct(annotated[index]["text"]))
    again = align_dataset(annotated, tokenizer)
    assert again.cache_files == aligned.cache_files


def test_align_needs_the_annotation_columns(corpus, bpe_tokenizer):
    with pytest.raises(ValueError, match="no column 'lime_pos'.*annotate_dataset"):
        align_dataset(corpus, LimeTokenizer.from_tokenizer(bpe_tokenizer))


@pytest.mark.slow
def test_two_processes_give_the_same_annotations(annotated, corpus):
    parallel = annotate_dataset(corpus, batch_size=16, num_proc=2, load_from_cache_file=False)
    assert parallel["lime_ner"] == annotated["lime_ner"]


def test_packing_carries_every_field(annotated, bpe_tokenizer):
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer)
    aligned = align_dataset(annotated, tokenizer)
    packed = pack_dataset(aligned, block_size=32, eos_token_id=tokenizer.eos_token_id)
    assert set(packed.column_names) == {"input_ids", "attention_mask", "pos_ids", "ner_ids"}
    ids = [t for block in packed["input_ids"] for t in block]
    pos = [t for block in packed["pos_ids"] for t in block]
    expected = [t for row in aligned["input_ids"] for t in [*row, tokenizer.eos_token_id]]
    assert ids == expected  # nothing lost, EOS after every document
    assert all(len(block) == 32 for block in packed["input_ids"][:-1])
    assert all(p == 2 for t, p in zip(ids, pos, strict=True) if t == tokenizer.eos_token_id)
    dropped = pack_dataset(aligned, block_size=32, eos_token_id=tokenizer.eos_token_id, drop_last=True)
    assert {len(block) for block in dropped["pos_ids"]} == {32}


def test_collator_pads_builds_labels_and_drops_metadata(lime_pretokenized):
    # Pad id equal to EOS: labels must follow the attention mask, not the pad id.
    features = [
        dict(lime_pretokenized("Emma smiled.")),
        dict(lime_pretokenized("She laughed at Mr. Knightley.")),
    ]
    features[0]["input_ids"][-1] = lime_pretokenized.pad_token_id
    batch = DataCollatorForLime(lime_pretokenized)(features)
    assert set(batch) == {"input_ids", "attention_mask", "pos_ids", "ner_ids", "labels"}
    mask = batch["attention_mask"].bool()
    assert (batch["labels"][~mask] == -100).all() and (
        batch["labels"][mask] == batch["input_ids"][mask]
    ).all()
    assert (batch["pos_ids"][~mask] == 0).all() and (batch["pos_ids"][mask] > 2).all()

    lime_pretokenized.padding_side = "left"
    try:
        left = DataCollatorForLime(lime_pretokenized, metadata_dropout=0.5, seed=0)(features)
    finally:
        lime_pretokenized.padding_side = "right"
    assert left["attention_mask"][0, 0] == 0 and left["pos_ids"][0, 0] == 0
    real = left["attention_mask"].bool()
    dropped = (left["pos_ids"] == 1) & real
    assert 0 < dropped.sum() < real.sum() and (left["pos_ids"][~real] == 0).all()
    again = DataCollatorForLime(lime_pretokenized, metadata_dropout=0.5, seed=0)
    lime_pretokenized.padding_side = "left"
    try:
        assert torch.equal(again(features)["pos_ids"], left["pos_ids"])
    finally:
        lime_pretokenized.padding_side = "right"
    with pytest.raises(ValueError, match="metadata_dropout"):
        DataCollatorForLime(lime_pretokenized, metadata_dropout=1.5)
