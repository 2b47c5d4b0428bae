"""lm-evaluation-harness model `lime`: an `HFLM` that feeds a LIME model its tags without leaking.

    lime-hf eval --model lime --model_args pretrained=PATH,tags=prefix --tasks T --include_path DIR

lm-eval hands the model token ids only. `tags` (a `model_args` option) says where each position's tags come
from; it is recorded in the results twice: in `config.model_args` (where given) and as `config.lime_tags`,
with `config.lime_guidance` (how a LIME+1 model is guided: `self-guided` or `unguided`; `None` for LIME).

- `prefix` (default for LIME without tag heads): token i takes the tags spaCy gives it in the decoded text of
  tokens 0..i (the last `window` of them), the same rule as `generate`'s annotating provider. A token's tags
  never come from text after it, so a continuation is never scored with tags read from itself;
- `model` (default for a model with tag heads): the heads' own causal predictions, exactly as the model's
  forward tags `input_ids` alone (`tag_heads.self_tagged_forward`); the same as stock `--model hf`.
  For LIME+1 this is *self-guided*: the heads predict the next token's tags;
- `none`: every tag unknown (embeds to zero: the backbone alone). A LIME+1 model without heads always runs
  this way, *unguided*: it reads the tags of the next token, which the harness cannot supply without the answer.

Importing this module also quiets lm-eval's lookup of the git commit it records (`git_hash`), which printed
"fatal: not a git repository" on every run outside a repository; the value recorded is the same.

It also lets a task YAML name its data files relative to its own folder: lm-eval hands
`dataset_kwargs.data_files` to `datasets.load_dataset`, which reads a relative path from the working directory;
here a relative path that exists beside the YAML is read from there (one that does not keeps lm-eval's meaning),
so `lime-hf eval --include_path DIR` works from any directory.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import lm_eval.evaluator
import torch
from lm_eval.api.registry import register_model
from lm_eval.api.task import ConfigurableTask
from lm_eval.loggers.utils import get_commit_from_path
from lm_eval.models.huggingface import HFLM

# Importing lime_hf (this package) registers the "lime" Auto classes that HFLM loads checkpoints with.
from ..configuration_lime import UNKNOWN_ID
from ..rules import EVAL_TAG_SOURCES, check_eval_tags

TAG_SOURCES = EVAL_TAG_SOURCES


@register_model("lime")
class LimeLM(HFLM):
    """`HFLM` for `LimeForCausalLM` checkpoints saved with their `LimeTokenizer` (`tags=prefix` needs it).

    Args:
        tags (`str`, *optional*): `"prefix"`, `"model"` (needs tag heads) or `"none"`; LIME+1 takes `"model"`
            (self-guided) or `"none"` (unguided). Default: `"model"` with heads, else `"prefix"` for LIME and
            `"none"` for LIME+1.
        window (`int`, *optional*, defaults to 32): tokens decoded and annotated to tag each position (`prefix`).
        kwargs: every `HFLM` argument (`pretrained`, `batch_size`, `device`, ...).
    """

    def __init__(self, *args, tags: str | None = None, window: int = 32, **kwargs):
        # A causal LM: said here, since lm-eval's lists of Transformers architectures do not know `lime` and warn.
        kwargs.setdefault("backend", "causal")
        super().__init__(*args, **kwargs)
        config = self.model.config
        shift = getattr(config, "metadata_shift", None)
        if shift is None:
            raise ValueError(
                f"--model lime needs a LIME checkpoint (model_type 'lime'); got {config.model_type!r}. "
                "Use --model hf for other models."
            )
        tags = check_eval_tags(tags, metadata_shift=shift, has_tag_heads=bool(config.tag_head_fields))
        if tags == "prefix" and not hasattr(self.tokenizer, "metadata_for_ids"):
            raise ValueError("tags=prefix annotates text and needs the checkpoint's LimeTokenizer.")
        self.tags = tags
        self.window = int(window)

    def causal_tags(self, input_ids: torch.LongTensor) -> dict[str, torch.LongTensor]:
        """The `<field>_ids` `(batch, seq)` the forward is given for `input_ids`.

        `prefix`: token i tagged from the decoded text of tokens `i-window+1..i` alone; `none`: unknown
        everywhere (given explicitly, so that a model with heads does not tag itself); `model`: none given,
        and the forward is asked to tag the input with its heads (`self_tag=True`).
        """
        fields = self.model.config.metadata_fields
        if self.tags == "model":
            return {}
        if self.tags == "none":
            return {f"{field}_ids": torch.full_like(input_ids, UNKNOWN_ID) for field in fields}
        rows = {field: [] for field in self.tokenizer.metadata_fields}
        for row in input_ids.tolist():
            tagged = [
                self.tokenizer.metadata_for_ids(row[max(0, i + 1 - self.window) : i + 1])
                for i in range(len(row))
            ]
            for field in rows:
                rows[field].append([tags[field][-1] for tags in tagged])
        return {f"{field}_ids": torch.tensor(ids, device=input_ids.device) for field, ids in rows.items()}

    def get_model_info(self) -> dict:
        """`HFLM`'s model information (`results["config"]`) plus where the tags came from."""
        guidance = None
        if self.model.config.metadata_shift:
            guidance = "self-guided" if self.tags == "model" else "unguided"
        return {**super().get_model_info(), "lime_tags": self.tags, "lime_guidance": guidance}

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        self_tag = {"self_tag": True} if self.tags == "model" else {}
        with torch.no_grad():
            return self.model(inps, **self.causal_tags(inps), **self_tag).logits

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        if self.tags == "prefix":  # the prompt annotated causally, then each generated token re-annotated
            generation_kwargs.update(
                self.causal_tags(context), tokenizer=self.tokenizer, metadata_provider="annotate"
            )
        else:  # `model`: the heads tag the untagged prompt and every generated token; `none`: all unknown
            generation_kwargs["metadata_provider"] = "model" if self.tags == "model" else "unknown"
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def git_commit_hash() -> str | None:
    """lm-eval's `get_git_commit_hash` (the results' `git_hash`) without git's "fatal: not a git repository" on
    stderr, which every evaluation run outside a git repository printed."""
    try:
        command = ["git", "describe", "--always"]
        return subprocess.check_output(command, stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


lm_eval.evaluator.get_git_commit_hash = git_commit_hash


def beside(data_files: Any, folder: Path) -> Any:
    """`data_files` (a path, a list, or split -> either) with each relative path that exists in `folder` made absolute."""
    if isinstance(data_files, dict):
        return {split: beside(files, folder) for split, files in data_files.items()}
    if isinstance(data_files, list):
        return [beside(files, folder) for files in data_files]
    if isinstance(data_files, str) and not Path(data_files).is_absolute() and "://" not in data_files:
        local = folder / data_files
        return str(local) if any(local.parent.glob(local.name)) else data_files
    return data_files


def _download_beside_yaml(download):
    """`ConfigurableTask.download`, reading the task's relative `data_files` from its YAML's folder where they are."""

    @functools.wraps(download)
    def wrapper(self, dataset_kwargs=None, **kwargs):
        source = (self.config.metadata or {}).get(
            "config_source", "inline"
        )  # the YAML's path (lm-eval's record)
        if dataset_kwargs and "data_files" in dataset_kwargs and source != "inline":
            dataset_kwargs = {
                **dataset_kwargs,
                "data_files": beside(dataset_kwargs["data_files"], Path(source).parent),
            }
        return download(self, dataset_kwargs, **kwargs)

    wrapper.reads_beside_yaml = True
    return wrapper


if not getattr(
    ConfigurableTask.download, "reads_beside_yaml", False
):  # once, even if this module is reloaded
    ConfigurableTask.download = _download_beside_yaml(ConfigurableTask.download)


def main(argv: list[str] | None = None) -> None:
    """`lime-hf eval`: lm-eval's own command line, with the `lime` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
