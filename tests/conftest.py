"""Shared fixtures: small real tokenizers trained in seconds on the Austen corpus, one spaCy load per session."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lime_hf.annotation import SpacyAnnotator
from lime_hf.tokenization_lime import LimeTokenizer

AUSTEN = Path("/work/shared/data/austen")
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    """About 200k characters of Emma, one paragraph line per item."""
    text = (AUSTEN / "emma.txt").read_text(encoding="utf-8")[:200_000]
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def bpe_tokenizer(corpus_lines) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style, no prefix space) with bos/eos/pad special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus_lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


@pytest.fixture(scope="session")
def wordpiece_tokenizer(corpus_lines) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece (lower-casing, [CLS] ... [SEP] template)."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    backend.train_from_iterator(corpus_lines, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


@pytest.fixture(scope="session")
def annotator() -> SpacyAnnotator:
    """The default pos + ner annotator, its pipeline loaded once for the session."""
    annotator = SpacyAnnotator()
    annotator.nlp  # noqa: B018 - load now, not inside the first timed test
    return annotator


def share_annotator(tokenizer: LimeTokenizer, annotator: SpacyAnnotator) -> LimeTokenizer:
    """Let a tokenizer reuse the session's loaded pipeline (same fields) instead of loading its own."""
    tokenizer._annotator = annotator
    return tokenizer


@pytest.fixture(scope="session")
def lime_pretokenized(bpe_tokenizer, annotator) -> LimeTokenizer:
    return share_annotator(LimeTokenizer.from_tokenizer(bpe_tokenizer, alignment="pretokenized"), annotator)


@pytest.fixture(scope="session")
def lime_offsets(bpe_tokenizer, annotator) -> LimeTokenizer:
    return share_annotator(LimeTokenizer.from_tokenizer(bpe_tokenizer, alignment="offsets"), annotator)
