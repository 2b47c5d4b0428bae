"""`import lime_hf`: cheap (no torch, no transformers), lazy names, and "lime" registered with the Auto classes
whichever is imported first. Each case runs in a fresh interpreter, since registration happens once per process."""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lime_hf
from lime_hf import LimeTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
}  # fmt: skip


def run_python(code: str, cwd: Path) -> list[str]:
    """Run `code` in a fresh interpreter; its standard output, line by line."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def test_import_lime_hf_imports_neither_torch_nor_transformers(tmp_path):
    out = run_python(
        """
        import sys
        import lime_hf
        print(sorted(name for name in ("torch", "transformers", "datasets", "spacy") if name in sys.modules))
        """,
        tmp_path,
    )
    assert out == ["[]"]


# Ways a user meets the Auto classes after (or before) `import lime_hf`; the checks below then run in each.
FIRST_IMPORTS = {
    "lime_hf, then the Auto classes": "import lime_hf\nfrom transformers import AutoConfig",
    "the Auto classes, then lime_hf": "from transformers import AutoConfig\nimport lime_hf",
    "transformers alone, then lime_hf": "import transformers\nimport lime_hf\nAutoConfig = transformers.AutoConfig",
    # transformers imports its Auto classes half way through `modeling_utils`: registering must wait for it
    "lime_hf, then PreTrainedModel": "import lime_hf\nfrom transformers import PreTrainedModel, AutoConfig",
    # configuration_lime imports AutoConfig while it is itself half imported
    "a lazy name first": "from lime_hf import LimeConfig\nfrom transformers import AutoConfig",
    "a library module first": "from lime_hf.modeling_lime import LimeForCausalLM\nfrom transformers import AutoConfig",
}


@pytest.mark.parametrize("first", list(FIRST_IMPORTS))
def test_the_auto_classes_know_lime_whatever_is_imported_first(first, bpe_tokenizer, tmp_path):
    LimeTokenizer.from_tokenizer(bpe_tokenizer).save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "config.json").write_text(json.dumps({"model_type": "lime"}), encoding="utf-8")
    code = FIRST_IMPORTS[first] + textwrap.dedent(
        f"""
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
        config = AutoConfig.for_model("lime", text_config={TINY!r})
        print(type(config).__name__, type(AutoModelForCausalLM.from_config(config)).__name__)
        print(type(AutoModel.from_config(config)).__name__)
        print(type(AutoTokenizer.from_pretrained("tokenizer")).__name__)
        """
    )
    assert run_python(code, tmp_path) == ["LimeConfig LimeForCausalLM", "LimeModel", "LimeTokenizer"]


def test_a_saved_model_carries_its_code_files_for_remote_code(tmp_path):
    """`_auto_class` on the Hub classes: `save_pretrained` copies the code, whichever module the class came from."""
    run_python(
        f"""
        from lime_hf.configuration_lime import LimeConfig
        from lime_hf.modeling_lime import LimeForCausalLM
        LimeForCausalLM(LimeConfig(text_config={TINY!r})).save_pretrained("model")
        """,
        tmp_path,
    )
    files = {path.name for path in (tmp_path / "model").iterdir()}
    assert {"configuration_lime.py", "modeling_lime.py", "model.safetensors"} <= files
    auto_map = json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_lime.LimeForCausalLM"


def test_register_is_idempotent():
    lime_hf.register()
    lime_hf.register()
    from transformers import AutoConfig

    assert type(AutoConfig.for_model("lime", text_config=TINY)).__name__ == "LimeConfig"


def test_the_lazy_table_the_type_checking_mirror_and_all_agree():
    tree = ast.parse((REPO / "lime_hf" / "__init__.py").read_text(encoding="utf-8"))
    (mirror_block,) = [
        node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    ]
    mirror = {alias.name: node.module for node in mirror_block.body for alias in node.names}
    assert mirror == lime_hf._LAZY
    assert sorted(lime_hf.__all__) == sorted([*lime_hf._LAZY, "register"])
    for name in lime_hf.__all__:  # each name resolves, to what its module defines
        assert getattr(lime_hf, name) is not None
    assert set(lime_hf.__all__) <= set(dir(lime_hf))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        lime_hf.no_such_name  # noqa: B018
