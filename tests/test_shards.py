"""The shard folder format itself (`lime_hf.shards`): `write_shards` round trip, the manifest, `check_manifest`."""

import json

import pyarrow.parquet as pq
import pytest
from datasets import Dataset, concatenate_datasets

from lime_hf.pretrain import prepare_lm_dataset
from lime_hf.shards import Manifest, check_manifest, write_shards
from lime_hf.tokenization_lime import LimeTokenizer
from tests.conftest import AUSTEN


@pytest.fixture(scope="module")
def blocks(lime_pretokenized) -> Dataset:
    text = (AUSTEN / "emma.txt").read_text(encoding="utf-8")[3_000:9_000]
    texts = Dataset.from_dict({"text": [p for p in text.split("\n\n") if p.strip()]})
    return prepare_lm_dataset(texts, lime_pretokenized, block_size=32)


def test_write_shards_round_trip(blocks, lime_pretokenized, tmp_path):
    manifest = write_shards(blocks, tmp_path, lime_pretokenized, block_size=32, num_shards=3)
    assert Manifest.load(tmp_path) == manifest
    assert manifest.files(tmp_path) == [str(tmp_path / "blocks" / f"0000{i}.parquet") for i in range(3)]
    read = concatenate_datasets([Dataset.from_parquet(path) for path in manifest.files(tmp_path)])
    assert read[:] == blocks.select_columns(manifest.columns)[:]
    assert manifest.columns == ["input_ids", "pos_ids", "ner_ids"]
    assert pq.read_schema(manifest.files(tmp_path)[0]).field("input_ids").type.value_type.bit_width == 32
    counts = json.loads((tmp_path / "manifest.json").read_text())["counts"]
    assert counts == manifest.counts
    assert counts["blocks"] == len(blocks) and counts["tokens"] == sum(map(len, blocks["input_ids"]))
    eos = lime_pretokenized.eos_token_id
    assert counts["documents"] == sum(row.count(eos) for row in blocks["input_ids"])
    check_manifest(manifest, lime_pretokenized, fields=lime_pretokenized.metadata_fields)


def test_check_manifest_names_another_tokenizer_and_other_inventories(
    blocks, lime_pretokenized, wordpiece_tokenizer, tmp_path
):
    manifest = write_shards(blocks, tmp_path, lime_pretokenized, block_size=32)
    with pytest.raises(
        ValueError, match=r"made with the tokenizer .* \(vocabulary of 600, fingerprint .*pack them again"
    ):
        check_manifest(manifest, LimeTokenizer.from_tokenizer(wordpiece_tokenizer))
    pos = lime_pretokenized.metadata_fields["pos"]
    fields = {**lime_pretokenized.metadata_fields, "pos": [*pos[:5], "XX", *pos[6:]]}
    with pytest.raises(
        ValueError, match=rf"the model's: 'pos' has {len(pos)} labels .* at index 5 \(.* against 'XX'\)"
    ):
        check_manifest(manifest, lime_pretokenized, fields=fields)
    with pytest.raises(ValueError, match="'dep' is only in the other"):
        check_manifest(manifest, lime_pretokenized, fields={**fields, "pos": pos, "dep": ["a"]})


def test_a_folder_without_a_manifest_or_of_another_format_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a shard folder: it has no manifest.json"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="is not a lime_hf.blocks manifest of version 1"):
        Manifest.load(tmp_path)
