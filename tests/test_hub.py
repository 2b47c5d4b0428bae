"""Hub publishing: the real push code paths against a local stand-in for the Hub, then loading without lime_hf.

Only the Hub's side is replaced (`FakeHub`: repositories are folders); Transformers' `push_to_hub`,
huggingface_hub's commit operations and model-card handling, and our card rendering run for real. Offline mode stays on during the pushes,
so a request that escaped the stand-in would fail the test instead of reaching the network.
"""

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    ModelCard,
)
from tiny_models import run_without_lime_hf, tiny_lime

from lime_hf import LimeForCausalLM, LimeTokenizer, modeling_lime
from lime_hf.model_card import push_to_hub, render_model_card
from tests.conftest import FakeHub, share_annotator

REPO_ID, NATIVE_REPO_ID = "fake-user/lime-tiny", "fake-user/lime-tiny-native"
REQUIRED_FILES = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"}
TEXT = "Emma Woodhouse, handsome, clever, and rich, lived in Highbury in 1815."
TRAINING_DATA = ["austen-novels", "HuggingFaceFW/fineweb-edu"]
METRICS = {"eval_loss": 3.2546, "eval_accuracy": 0.41237}


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer, annotator) -> LimeTokenizer:
    return share_annotator(LimeTokenizer.from_tokenizer(bpe_tokenizer, alignment="pretokenized"), annotator)


@pytest.fixture(scope="module")
def model(tokenizer) -> LimeForCausalLM:
    """A LIME+1 Qwen2 model with the tokenizer's vocabulary and a non-default field weight."""
    return tiny_lime(
        "qwen2", metadata_shift=1, metadata_weights={"ner": 0.5}, text_config={"vocab_size": len(tokenizer)}
    )


def publish_in_one_commit(model: LimeForCausalLM, tokenizer: LimeTokenizer, repo_id: str) -> None:
    push_to_hub(model, tokenizer, repo_id, training_data=TRAINING_DATA, metrics=METRICS)


def publish_natively(model: LimeForCausalLM, tokenizer: LimeTokenizer, repo_id: str) -> None:
    """Transformers' own pushes, then the card on its own."""
    model.push_to_hub(repo_id)
    tokenizer.push_to_hub(repo_id)
    card = render_model_card(model, tokenizer, repo_id=repo_id, training_data=TRAINING_DATA, metrics=METRICS)
    ModelCard(card).push_to_hub(repo_id)


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def relative_imports(source: str) -> set[str]:
    """Modules named by `from .x import y` statements."""
    return {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    }


def test_card_states_fields_inventories_shift_backbone_and_metrics(model, tokenizer):
    text = render_model_card(model, tokenizer, repo_id=REPO_ID, training_data=TRAINING_DATA, metrics=METRICS)
    assert not re.search(r"\{\{|\}\}|\{%|%\}", text)
    card = ModelCard(text)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["lime", "lime-plus-one", "linguistic-metadata", "qwen2"]
    assert card.data.datasets == TRAINING_DATA and card.data.metrics == list(METRICS)
    assert card.data.language == "en" and card.data.base_model is None
    for name, inventory in model.config.metadata_fields.items():
        assert f"| `{name}` | `{name}_ids` | {len(inventory) - 3} |" in text
        listing = re.search(rf"<code>{name}</code>.*?```text\n(.*?)```", text, flags=re.DOTALL).group(1)
        assert [line.split(maxsplit=1) for line in listing.splitlines()] == [
            [str(index), label] for index, label in enumerate(inventory)
        ]
    assert "| `ner` | `ner_ids` | 37 | 0.5 | `O` |" in text
    assert "LIME+1 (`metadata_shift=1`)" in text and "a_{i+1,d}" in text and "guidance=" in text
    assert "`qwen2`: 2 layers, hidden size 32" in text and "alignment `pretokenized`" in text
    assert "| eval_loss | 3.255 |" in text and "| eval_accuracy | 0.4124 |" in text
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True)' in text


def test_lime_card_without_tokenizer_data_or_metrics():
    text = render_model_card(tiny_lime("gpt2"))
    card = ModelCard(text)
    assert card.data.tags == ["lime", "linguistic-metadata", "gpt2"] and card.data.datasets is None
    assert "LIME (`metadata_shift=0`)" in text and "a_{i,d}" in text and "guidance=" not in text
    assert "not described by this card" in text and "Not stated." in text and "No metrics reported." in text


def test_card_names_the_hub_checkpoint_a_model_was_retrofitted_from(tmp_path):
    backbone = tiny_lime("llama").language_model
    backbone.config._name_or_path = "org/backbone-1b"  # as after `from_pretrained("org/backbone-1b")`
    card = ModelCard(render_model_card(LimeForCausalLM.from_backbone(backbone)))
    assert card.data.base_model == "org/backbone-1b" and "[`org/backbone-1b`]" in card.text
    backbone.save_pretrained(tmp_path)  # a local checkpoint is no Hub base model
    assert ModelCard(render_model_card(LimeForCausalLM.from_backbone(str(tmp_path)))).data.base_model is None


def test_card_refuses_a_tokenizer_with_other_inventories(bpe_tokenizer):
    pos_only = LimeTokenizer.from_tokenizer(bpe_tokenizer, fields=("pos",))
    with pytest.raises(ValueError, match="inventories differ in field 'ner'"):
        render_model_card(tiny_lime(), pos_only)


def check_repository(hub: FakeHub, repo_id: str, model: LimeForCausalLM, tokenizer: LimeTokenizer) -> str:
    """Assert that the pushed repository is self-contained and carries the card; return the card."""
    repo = hub.folder(repo_id)
    files = {path.name for path in repo.iterdir()}
    assert files >= REQUIRED_FILES
    assert "model_card.py" not in files
    for code in ("configuration_lime.py", "modeling_lime.py", "tokenization_lime.py"):
        assert relative_imports((repo / code).read_text()) | {code[:-3]} <= {name[:-3] for name in files}
    assert (repo / "modeling_lime.py").read_text() == Path(modeling_lime.__file__).read_text()
    assert json.loads((repo / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_lime.LimeConfig",
        "AutoModel": "modeling_lime.LimeModel",
        "AutoModelForCausalLM": "modeling_lime.LimeForCausalLM",
    }
    tokenizer_auto_map = json.loads((repo / "tokenizer_config.json").read_text())["auto_map"]
    assert tokenizer_auto_map["AutoTokenizer"][0] == "tokenization_lime.LimeTokenizer"
    readme = (repo / "README.md").read_text()
    assert readme == render_model_card(
        model, tokenizer, repo_id=repo_id, training_data=TRAINING_DATA, metrics=METRICS
    )
    return readme


def remote_code_script(readme: str, output: str) -> str:
    """The card's remote-code loading snippet, then encode `TEXT` and save the outputs, then its generate snippet."""
    remote_load, _, generate = python_blocks(readme)
    save = f"""
import torch
encoding = tokenizer([{TEXT!r}], return_tensors="pt")
modules = [type(tokenizer).__module__, type(model).__module__]
torch.save({{"modules": modules, "encoding": dict(encoding), "logits": model(**encoding).logits.detach()}}, {output!r})
"""
    return remote_load + save + generate


@pytest.mark.slow
def test_pushed_repositories_are_self_contained_and_load_without_lime_hf(hub, model, tokenizer, monkeypatch):
    publishers = {REPO_ID: publish_in_one_commit, NATIVE_REPO_ID: publish_natively}
    for repo_id, publish in publishers.items():
        publish(model, tokenizer, repo_id)
    assert [repo_id for repo_id, _ in hub.commits] == [REPO_ID] + [NATIVE_REPO_ID] * 3
    readmes = {repo_id: check_repository(hub, repo_id, model, tokenizer) for repo_id in publishers}

    # The cards' own snippets: load with remote code and generate, in one fresh process without lime_hf ...
    run_without_lime_hf(
        "".join(remote_code_script(readme, f"{repo_id}.pt") for repo_id, readme in readmes.items()),
        cwd=hub.root,
    )
    expected = tokenizer([TEXT], return_tensors="pt")
    with torch.no_grad():
        expected_logits = model(**expected).logits
    for repo_id in publishers:
        loaded = torch.load(hub.root / f"{repo_id}.pt")
        assert all(module.startswith("transformers_modules.") for module in loaded["modules"])
        assert loaded["encoding"].keys() == expected.keys()
        for key, ids in expected.items():
            assert torch.equal(loaded["encoding"][key], ids), (repo_id, key)
        assert torch.equal(loaded["logits"], expected_logits), repo_id

    # ... and with lime_hf imported.
    monkeypatch.chdir(hub.root)
    for readme in readmes.values():
        namespace = {}
        exec(python_blocks(readme)[1], namespace)
        assert type(namespace["model"]) is LimeForCausalLM and type(namespace["tokenizer"]) is LimeTokenizer


def test_a_later_model_push_keeps_the_card(hub, model, tokenizer):
    publish_in_one_commit(model, tokenizer, REPO_ID)
    card = (hub.folder(REPO_ID) / "README.md").read_text()
    model.push_to_hub(REPO_ID, commit_message="Upload model after more training", tags=["continued"])
    assert hub.commits[-1] == (REPO_ID, "Upload model after more training")
    updated = ModelCard.load(hub.folder(REPO_ID) / "README.md")
    assert updated.text == ModelCard(card).text and updated.data.tags[-1] == "continued"
