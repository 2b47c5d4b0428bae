"""Every ```python block of the README runs as written, in order, in one namespace (as a reader's session would)."""

import ast
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from lime_hf import LimeForCausalLM, LimeTokenizer
from tests.conftest import AUSTEN

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(
        r"^```python\n(.*?)^```$", README.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE
    )


def test_the_readme_snippets_parse_and_elide_nothing():
    snippets = python_snippets()
    assert len(snippets) >= 7
    for snippet in snippets:
        tree = ast.parse(snippet)  # a SyntaxError names the line
        assert not [
            node for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value is Ellipsis
        ]


def test_every_python_snippet_runs_as_written(hub, tmp_path, monkeypatch):
    """In a fresh folder holding `emma.txt` and `persuasion.txt` excerpts; the Hub push goes to a local stand-in."""
    for name in ("emma", "persuasion"):
        text = (AUSTEN / f"{name}.txt").read_text(encoding="utf-8")[2_000:8_000]
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__readme__"}
    for number, snippet in enumerate(python_snippets(), 1):
        try:
            exec(compile(snippet, f"README.md python snippet {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README snippet {number} failed:\n{snippet}") from error

    assert isinstance(namespace["tok"], LimeTokenizer) and namespace["tok"].alignment == "pretokenized"
    assert (
        isinstance(namespace["plus_one"], LimeForCausalLM)
        and namespace["plus_one"].config.metadata_shift == 1
    )
    assert namespace["tokenizer"].alignment == "offsets"
    assert torch.isfinite(namespace["out"].loss)
    assert namespace["trainer"].state.global_step == 4
    assert (hub.folder("me/lime-tiny-llama") / "model.safetensors").is_file()
    assert "README.md" in {path.name for path in hub.folder("me/lime-tiny-llama").iterdir()}
    # Fine-tuning with PEFT: the adapter holds LoRA and the whole tables; the merged model has no PEFT left.
    adapter = load_file(hub.folder("me/lime-tiny-llama-lora") / "adapter_model.safetensors")
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
