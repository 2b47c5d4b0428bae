"""Every ```python block of the README and of each page in docs/ runs as written, in order, in one namespace per page
(as a reader's session would); every relative link of those pages points at a file of the repository."""

import ast
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lime_hf import LimeForCausalLM, LimeTokenizer
from tests.conftest import AUSTEN

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_snippets(page: Path) -> list[str]:
    return re.findall(
        r"^```python\n(.*?)^```$", page.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE
    )


def check_readme(namespace: dict, hub) -> None:
    assert isinstance(namespace["tok"], LimeTokenizer) and namespace["tok"].alignment == "pretokenized"
    assert namespace["lime"].config.metadata_shift == 0 and namespace["plus_one"].config.metadata_shift == 1
    assert torch.isfinite(namespace["out"].loss)
    assert namespace["guided"].shape[1] == namespace["prompts"]["input_ids"].shape[1] + 3
    assert namespace["trainer"].state.global_step == 4
    assert namespace["block"]["input_ids"].shape == (1, 22)  # 20 tokens and round(0.1 * 20) meta-tokens
    assert namespace["meta_out"].shape == (2, namespace["meta_prompt"]["input_ids"].shape[1] + 8)
    assert namespace["lora_trainer"].state.global_step == 2
    assert any("lora_A" in name for name, _ in namespace["peft_model"].named_parameters())


def check_model(namespace: dict, hub) -> None:
    assert isinstance(namespace["tok"], LimeTokenizer) and namespace["tok"].alignment == "pretokenized"
    assert (
        isinstance(namespace["plus_one"], LimeForCausalLM)
        and namespace["plus_one"].config.metadata_shift == 1
    )
    assert namespace["tokenizer"].alignment == "offsets"
    assert torch.isfinite(namespace["out"].loss)
    assert (hub.folder("me/lime-tiny-llama") / "model.safetensors").is_file()
    assert "README.md" in {path.name for path in hub.folder("me/lime-tiny-llama").iterdir()}


def check_tokenizer(namespace: dict, hub) -> None:
    assert namespace["offsets_tok"].alignment == "offsets"
    aligned = namespace["aligned"]
    assert len(aligned) == len(namespace["sentences"])
    assert all(len(row["pos_ids"]) == len(row["input_ids"]) for row in aligned)


def check_generation(namespace: dict, hub) -> None:
    assert namespace["more"].shape == (2, namespace["enc"]["input_ids"].shape[1] + 8)


def check_training(namespace: dict, hub) -> None:
    assert namespace["tokenizer"].alignment == "offsets"
    assert namespace["trainer"].state.global_step == 4
    # Fine-tuning with PEFT: the adapter holds LoRA and the whole tables; the merged model has no PEFT left.
    adapter = load_file(Path("lime-lora-adapter") / "adapter_model.safetensors")  # saved locally: no login
    assert any(".lora_A." in key for key in adapter)
    assert {
        "base_model.model.metadata_embeddings.tables.pos.weight",
        "base_model.model.tag_heads.proj.weight",
    } <= set(adapter)
    assert namespace["lora_trainer"].state.global_step == 4
    merged = namespace["merged"]
    assert (
        type(merged) is LimeForCausalLM
        and torch.count_nonzero(merged.metadata_embeddings.tables["pos"].weight) > 0
    )
    assert (hub.folder("me/lime-tiny-llama-tuned") / "model.safetensors").is_file()
    assert namespace["stream_trainer"].state.global_step == 4


def check_meta_tokens(namespace: dict, hub) -> None:
    assert namespace["grown"]["input_ids"].shape == (1, 22)
    assert (namespace["grown"]["labels"] == -100).sum() == 2
    assert namespace["meta_out"].shape[1] == namespace["meta_prompt"]["input_ids"].shape[1] + 8


def check_trl(namespace: dict, hub) -> None:
    assert namespace["sft_trainer"].state.global_step == 4 and namespace["dpo_trainer"].state.global_step == 2
    assert type(namespace["tuned"]) is LimeForCausalLM
    assert (hub.folder("me/lime-tiny-instruct-dpo") / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(hub.folder("me/lime-tiny-instruct-dpo")).eval()
    prompt = namespace["prompt"]
    with torch.no_grad():
        assert torch.equal(namespace["tuned"](**prompt).logits, reloaded(**prompt).logits)


def check_scale(namespace: dict, hub) -> None:
    manifest = namespace["manifest"]
    assert manifest.counts["documents"] == len(namespace["paragraphs"]) and manifest.counts["blocks"] > 1
    assert Path("blocks/blocks/00000.parquet").is_file() and Path("logs-blocks/completions/00000").is_file()


# What each page's snippets must have made; a page with snippets and no entry here fails.
CHECKS: dict[str, Callable[[dict, object], None]] = {
    "README.md": check_readme,
    "model.md": check_model,
    "tokenizer.md": check_tokenizer,
    "generation.md": check_generation,
    "training.md": check_training,
    "meta-tokens.md": check_meta_tokens,
    "trl.md": check_trl,
    "scale.md": check_scale,
}
WITH_SNIPPETS = [page for page in PAGES if python_snippets(page)]


def test_the_pages_have_their_snippets():
    assert {page.name for page in WITH_SNIPPETS} == set(CHECKS)
    assert len(python_snippets(ROOT / "README.md")) >= 5  # model, generation, training, meta-tokens, PEFT


@pytest.mark.parametrize("page", WITH_SNIPPETS, ids=lambda page: page.name)
def test_the_snippets_parse_and_elide_nothing(page: Path):
    for snippet in python_snippets(page):
        tree = ast.parse(snippet)  # a SyntaxError names the line
        assert not [
            node for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value is Ellipsis
        ]


@pytest.mark.parametrize("page", WITH_SNIPPETS, ids=lambda page: page.name)
def test_every_python_snippet_runs_as_written(page: Path, hub, tmp_path, monkeypatch):
    """In a fresh folder holding `emma.txt` and `persuasion.txt` excerpts; the Hub push goes to a local stand-in."""
    for name in ("emma", "persuasion"):
        text = (AUSTEN / f"{name}.txt").read_text(encoding="utf-8")[2_000:8_000]
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    for number, snippet in enumerate(python_snippets(page), 1):
        try:
            exec(compile(snippet, f"{page.name} python snippet {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page.name} snippet {number} failed:\n{snippet}") from error
    CHECKS[page.name](namespace, hub)


def test_relative_links_point_at_files():
    missing = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing
