"""Shared fixtures: small real tokenizers trained in seconds on the shipped Austen excerpts, one spaCy load per session,
and a local stand-in for the Hub's HTTP API."""

import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    RepoCard,
    RepoUrl,
    constants,
    repocard,
)
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lime_hf.annotation import SpacyAnnotator
from lime_hf.tokenization_lime import LimeTokenizer

# Excerpts of the six public-domain Austen novels ship with the tests (see tests/data/README.md): a clone
# needs nothing outside the repository.
AUSTEN = Path(__file__).resolve().parent / "data" / "austen"
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]

# Under pytest-xdist each worker takes its share of the cores: by default torch starts one thread per core in every
# worker, and on a small machine they spin-wait against each other. The subprocesses a test starts take the same
# count (OMP_NUM_THREADS), so that their float sums, and the logits they compare, are the worker's to the bit.
if _workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train fastest on one thread; two threads on a busy 2-core machine spin-wait ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


class FakeHub:
    """A stand-in for the Hub's HTTP API: each repository is a folder under `root`, each commit writes into it."""

    def __init__(self, root: Path):
        self.root = root
        self.commits: list[tuple[str, str]] = []  # (repo_id, commit message)

    def folder(self, repo_id: str) -> Path:
        validate_repo_id(repo_id)
        return self.root / repo_id

    def create_repo(self, repo_id: str, *, exist_ok: bool = False, **kwargs) -> RepoUrl:
        self.folder(repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return RepoUrl(f"{constants.ENDPOINT}/{repo_id}")

    def create_commit(
        self, repo_id: str, operations, *, commit_message: str, create_pr: bool | None = None, **kwargs
    ) -> CommitInfo:
        assert not create_pr, "the stand-in commits to main only"
        folder = self.folder(repo_id)
        assert folder.is_dir(), f"commit to {repo_id}, which was never created"
        for operation in operations:
            target = folder / operation.path_in_repo
            if isinstance(operation, CommitOperationAdd):
                target.parent.mkdir(parents=True, exist_ok=True)
                with operation.as_file() as source:  # a path, bytes or a file object alike
                    target.write_bytes(source.read())
            elif isinstance(operation, CommitOperationDelete):
                target.unlink()
            else:
                raise NotImplementedError(type(operation).__name__)
        self.commits.append((repo_id, commit_message))
        oid = f"{len(self.commits):040x}"
        return CommitInfo(
            commit_url=f"{constants.ENDPOINT}/{repo_id}/commit/{oid}",
            commit_message=commit_message,
            commit_description="",
            oid=oid,
        )

    def validate_yaml(self, content: str, **kwargs) -> None:
        """The Hub's card check before a commit: the metadata header must parse (else `ValueError`)."""
        ModelCard(content)

    def download(self, repo_id: str, filename: str, **kwargs) -> str:
        path = self.folder(repo_id) / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(path)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "create_repo", fake.create_repo)
    monkeypatch.setattr(HfApi, "create_commit", fake.create_commit)
    monkeypatch.setattr(repocard, "hf_hub_download", fake.download)  # `ModelCard.load(repo_id)`
    # `ModelCard.push_to_hub` first posts the card to the Hub's `/api/validate-yaml`.
    monkeypatch.setattr(RepoCard, "validate", lambda card, repo_type=None: fake.validate_yaml(str(card)))
    return fake
