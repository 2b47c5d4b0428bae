"""Aligned block shards: the on-disk format between packing at scale and streaming training.

A shard folder holds packed causal-LM blocks, as `prepare_lm_dataset` makes them, in Parquet files, and a
`manifest.json` that says what they were made with:

    <folder>/manifest.json
    <folder>/blocks/00000.parquet     one file per writing task: columns `input_ids` and `{field}_ids`
    <folder>/blocks/00001.parquet     (lists of int32, `block_size` long except a batch's last block)

Blocks with injected meta-tokens (`meta_token_id` set) are longer by the meta-tokens: a block of `n` packed tokens
holds `n + meta_token_count(n, meta_fraction)` ids, drawn with `meta_seed` (see `lime_hf.meta_tokens`).

The manifest names the tokenizer (its name, vocabulary size and a fingerprint of its vocabulary and merges), the
fields with their inventories, the block size and EOS id, the meta-token (if blocks carry injected ones) and the
counts per shard and in all. Training reads it first and refuses shards made for another tokenizer or other
inventories (`check_manifest`), before it reads a block.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from .data import output_features

FORMAT = "lime_hf.blocks"
VERSION = 1
MANIFEST = "manifest.json"
BLOCKS = "blocks"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's backend (vocabulary, merges, normalizer, pre-tokenizer)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend.pop("truncation", None)  # call-time settings, not the vocabulary
    backend.pop("padding", None)
    return hashlib.sha256(json.dumps(backend, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ShardInfo:
    """One Parquet file of blocks, relative to the shard folder."""

    file: str
    blocks: int
    tokens: int
    documents: int


@dataclass
class Manifest:
    """What a shard folder holds and what it was made with."""

    tokenizer: dict[str, Any]  # name_or_path, vocab_size, fingerprint
    fields: dict[str, list[str]]  # field -> inventory, as `LimeTokenizer.metadata_fields`
    block_size: int
    eos_token_id: int
    meta_token_id: int | None = None
    meta_fraction: float = 0.0
    meta_seed: int | None = None  # seeds the meta-token positions (None: none injected, or not recorded)
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, block_size: int, **kwargs: Any) -> Manifest:
        """The manifest of blocks made with `tokenizer` (a `LimeTokenizer`), before any shard is written."""
        return cls(
            tokenizer={
                "name_or_path": tokenizer.name_or_path,
                "vocab_size": len(tokenizer),
                "fingerprint": tokenizer_fingerprint(tokenizer),
            },
            fields={name: list(inventory) for name, inventory in tokenizer.metadata_fields.items()},
            block_size=block_size,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )

    @property
    def counts(self) -> dict[str, int]:
        return {
            "shards": len(self.shards),
            "blocks": sum(shard.blocks for shard in self.shards),
            "tokens": sum(shard.tokens for shard in self.shards),
            "documents": sum(shard.documents for shard in self.shards),
        }

    @property
    def columns(self) -> list[str]:
        return ["input_ids", *(f"{name}_ids" for name in self.fields)]

    def files(self, folder: str | Path) -> list[str]:
        """The shards' paths, in shard order."""
        return [str(Path(folder) / shard.file) for shard in self.shards]

    def to_json(self) -> str:
        """The text of `manifest.json` (the counts in all included, for readers)."""
        return json.dumps(asdict(self) | {"counts": self.counts}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST) -> Manifest:
        """The manifest of `manifest.json`'s `text`; `source` names it in errors."""
        data = json.loads(text)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(
                f"{source} is not a {FORMAT} manifest of version {VERSION} "
                f"(format={data.get('format')!r}, version={data.get('version')!r})."
            )
        data.pop("counts", None)
        data["shards"] = [ShardInfo(**shard) for shard in data["shards"]]
        return cls(**data)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} is not a shard folder: it has no {MANIFEST}. Shard folders are written by "
                "`lime-hf pack` (or `lime_hf.integrations.datatrove_pack.pack_corpus`)."
            )
        return cls.from_json(path.read_text(), str(path))


def write_shards(
    blocks: Dataset,
    folder: str | Path,
    tokenizer: Any,
    block_size: int,
    num_shards: int = 1,
    **manifest_kwargs: Any,
) -> Manifest:
    """
    Write packed blocks (as `prepare_lm_dataset` returns them) into a shard folder, in `num_shards` contiguous
    Parquet files, and its manifest. The one-machine way to a shard folder; `lime-hf pack` is the scalable one.

    Args:
        blocks (`datasets.Dataset`): `input_ids` and the tokenizer's `{field}_ids` per block.
        folder (`str` or `Path`): the shard folder to write.
        tokenizer (`LimeTokenizer`): the tokenizer the blocks were made with.
        block_size (`int`): the packing block size.
        num_shards (`int`, *optional*, defaults to 1): files to split the blocks into.
        manifest_kwargs: further `Manifest` fields (`meta_token_id`, `meta_fraction`).
    """
    if not 1 <= num_shards <= max(len(blocks), 1):
        raise ValueError(
            f"`num_shards` must be between 1 and the number of blocks ({len(blocks)}), got {num_shards}."
        )
    manifest = Manifest.for_tokenizer(tokenizer, block_size, **manifest_kwargs)
    blocks = blocks.select_columns(manifest.columns).cast(output_features(manifest.columns))
    for index in range(num_shards):
        shard = blocks.shard(num_shards, index, contiguous=True)
        file = f"{BLOCKS}/{index:05d}.parquet"
        (Path(folder) / BLOCKS).mkdir(parents=True, exist_ok=True)
        shard.to_parquet(str(Path(folder) / file))
        ids = shard["input_ids"]
        documents = sum(row.count(manifest.eos_token_id) for row in ids)  # each document ends with EOS
        manifest.shards.append(ShardInfo(file, len(shard), sum(map(len, ids)), documents))
    manifest.save(folder)
    return manifest


def check_manifest(manifest: Manifest, tokenizer: Any, fields: dict[str, list[str]] | None = None) -> None:
    """Raise a `ValueError` naming the difference when the shards were made with another tokenizer or other
    inventories than `tokenizer`'s (or the model's `fields`, e.g. `config.metadata_fields`)."""
    expected = Manifest.for_tokenizer(tokenizer, manifest.block_size)
    if manifest.tokenizer["fingerprint"] != expected.tokenizer["fingerprint"]:
        raise ValueError(
            f"The shards were made with the tokenizer {manifest.tokenizer['name_or_path']!r} (vocabulary of "
            f"{manifest.tokenizer['vocab_size']}, fingerprint {manifest.tokenizer['fingerprint']}), not with "
            f"{expected.tokenizer['name_or_path']!r} (vocabulary of {expected.tokenizer['vocab_size']}, fingerprint "
            f"{expected.tokenizer['fingerprint']}): pack them again with this tokenizer."
        )
    for owner, wanted in (("tokenizer", expected.fields), ("model", fields)):
        if wanted is None:
            continue
        wanted = {name: list(inventory) for name, inventory in wanted.items()}
        if manifest.fields != wanted:
            differences = "; ".join(
                _field_difference(name, manifest.fields.get(name), wanted.get(name))
                for name in sorted(set(manifest.fields) | set(wanted))
                if manifest.fields.get(name) != wanted.get(name)
            )
            raise ValueError(f"The shards' metadata fields differ from the {owner}'s: {differences}.")


def _field_difference(name: str, shards: list[str] | None, wanted: list[str] | None) -> str:
    if shards is None or wanted is None:
        return f"{name!r} is only in the {'shards' if wanted is None else 'other'}"
    index = next(i for i in range(max(len(shards), len(wanted))) if _label(shards, i) != _label(wanted, i))
    return (
        f"{name!r} has {len(shards)} labels in the shards and {len(wanted)} in the other, the first difference at "
        f"index {index} ({_label(shards, index)} against {_label(wanted, index)})"
    )


def _label(labels: list[str], index: int) -> str:
    return repr(labels[index]) if index < len(labels) else "nothing"


__all__ = [
    "BLOCKS",
    "MANIFEST",
    "Manifest",
    "ShardInfo",
    "check_manifest",
    "tokenizer_fingerprint",
    "write_shards",
]
