"""Tiny random backbones and a subprocess runner in which `lime_hf` cannot be imported."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from lime_hf import LimeConfig, LimeForCausalLM

VOCAB_SIZE = 97

TINY_TEXT_CONFIGS = {
    "llama": dict(
        model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
    "qwen2": dict(
        model_type="qwen2", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=128),
}  # fmt: skip


def cache_of(output):
    """The KV cache of a forward or `generate` output, under the name of the installed transformers."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def tiny_lime(arch: str = "llama", seed: int = 0, **config_kwargs) -> LimeForCausalLM:
    """A random LIME model on a tiny backbone, in eval mode, with non-zero metadata tables."""
    torch.manual_seed(seed)
    text_config = {**TINY_TEXT_CONFIGS[arch], **config_kwargs.pop("text_config", {})}
    return LimeForCausalLM(LimeConfig(text_config=text_config, **config_kwargs)).eval()


def enable_checkpointing(model, use_reentrant: bool | None = None) -> None:
    """Turn on activation checkpointing under the name the installed transformers has.

    `activation_checkpointing_enable(activation_checkpointing_kwargs=)` since 5.21, where the older
    `gradient_checkpointing_enable(gradient_checkpointing_kwargs=)` warns; a PeftModel hands either to its base model.
    """
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def random_tags(model: LimeForCausalLM, shape: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random valid tag ids (special and real labels, no padding/unknown) for every field of `model`."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{name}_ids": torch.randint(2, len(labels), shape, generator=generator)
        for name, labels in model.config.metadata_fields.items()
    }


BLOCK_LIME_HF = """
import importlib.abc, sys
class _BlockLimeHf(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lime_hf" or name.startswith("lime_hf."):
            raise ImportError("lime_hf is blocked in this interpreter")
sys.meta_path.insert(0, _BlockLimeHf())
"""


def run_without_lime_hf(script: str, cwd: Path) -> str:
    """Run `script` in a fresh Python where `import lime_hf` fails; return its stdout, raise on failure."""
    env = {**os.environ, "HF_MODULES_CACHE": str(cwd / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    code = BLOCK_LIME_HF + textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout
