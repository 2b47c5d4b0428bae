"""lm-evaluation-harness model `lime`: an `HFLM` that feeds a LIME model its tags without leaking.

    lime-hf eval --model lime --model_args pretrained=PATH,tags=prefix --tasks T --include_path DIR

lm-eval hands the model token ids only. Here every position's tags are annotated causally: token i takes the
tags spaCy gives it in the decoded text of tokens 0..i (the last `window` of them), the same rule as
`generate`'s annotating provider. A token's tags thus never come from text after it, so a continuation is
never scored with tags read from itself or what follows. `tags` (a `model_args` option, hence recorded in
the results' `config.model_args`):

- `prefix` (default for LIME): causal annotation as above;
- `none`: every tag unknown (embeds to zero: the backbone alone). LIME+1 always runs this way, *unguided*:
  it reads the tags of the next token, which the harness cannot supply without the answer.
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

TAG_SOURCES = ("prefix", "none")


@register_model("lime")
class LimeLM(HFLM):
    """`HFLM` for `LimeForCausalLM` checkpoints saved with their `LimeTokenizer`.

    Args:
        tags (`str`, *optional*): `"prefix"` (LIME default) or `"none"` (LIME+1 allows only this).
        window (`int`, *optional*, defaults to 32): tokens decoded and annotated to tag each position.
        kwargs: every `HFLM` argument (`pretrained`, `batch_size`, `device`, ...).
    """

    def __init__(self, *args, tags: str | None = None, window: int = 32, **kwargs):
        import lime_hf  # noqa: F401 - registers the "lime" Auto classes before HFLM loads the checkpoint

        super().__init__(*args, **kwargs)
        shift = getattr(self.model.config, "metadata_shift", None)
        if shift is None:
            raise ValueError(
                f"--model lime needs a LIME checkpoint (model_type 'lime'); got {self.model.config.model_type!r}. "
                "Use --model hf for other models."
            )
        tags = tags or ("none" if shift else "prefix")
        if tags not in TAG_SOURCES:
            raise ValueError(f"tags must be one of {list(TAG_SOURCES)}, got {tags!r}.")
        if shift and tags != "none":
            raise ValueError(
                "A LIME+1 model reads the tags of the next token, which the harness can only know from the "
                "answer itself: it runs unguided here (tags=none)."
            )
        if tags == "prefix" and not hasattr(self.tokenizer, "metadata_for_ids"):
            raise ValueError("tags=prefix annotates text and needs the checkpoint's LimeTokenizer.")
        self.tags = tags
        self.window = int(window)

    def causal_tags(self, input_ids: torch.LongTensor) -> dict[str, torch.LongTensor]:
        """`<field>_ids` `(batch, seq)`: token i tagged from the decoded text of tokens `i-window+1..i` alone."""
        if self.tags == "none":
            return {}
        fields = self.tokenizer.metadata_fields
        rows = {field: [] for field in fields}
        for row in input_ids.tolist():
            tagged = [
                self.tokenizer.metadata_for_ids(row[max(0, i + 1 - self.window) : i + 1])
                for i in range(len(row))
            ]
            for field in fields:
                rows[field].append([tags[field][-1] for tags in tagged])
        return {f"{field}_ids": torch.tensor(rows[field], device=input_ids.device) for field in fields}

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inps, **self.causal_tags(inps)).logits

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        if self.tags == "prefix":
            generation_kwargs.update(self.causal_tags(context), tokenizer=self.tokenizer)
        else:
            generation_kwargs["metadata_provider"] = "unknown"
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def main(argv: list[str] | None = None) -> None:
    """`lime-hf eval`: lm-eval's own command line, with the `lime` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
