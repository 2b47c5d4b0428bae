"""`LimeTrainer` and the next-token metrics: `Trainer` for LIME models, usable with any `Trainer` setup.

    trainer = LimeTrainer(model=model, args=args, train_dataset=..., eval_dataset=..., **next_token_metrics())

`lime_hf/pretrain.py` (`lime-hf train`) is the script built on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
from huggingface_hub import CommitInfo
from transformers import EvalPrediction, PrinterCallback, ProgressCallback, Trainer
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import EvalLoopOutput

from .configuration_lime import SPECIAL_ID, UNKNOWN_ID, check_inventories
from .model_card import push_to_hub, render_model_card
from .modeling_lime import LimePreTrainedModel
from .tokenization_lime import LimeTokenizer


class NextTokenAccuracy(evaluate.Metric):
    """
    Next-token accuracy as an `evaluate` metric: the share of positions whose predicted token is the reference;
    references equal to -100 (padding, unlabelled positions) are ignored. One row per sequence.

    `evaluate.load("accuracy")` downloads its script from the Hugging Face Hub (and needs scikit-learn), so it
    fails offline unless cached; this metric is defined here and instantiated directly, which needs no network.
    """

    def _info(self) -> evaluate.MetricInfo:
        sequence = datasets.List(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description=self.__doc__,
            citation="",
            inputs_description="predictions, references: per sequence, the predicted and the true next token ids.",
            features=datasets.Features({"predictions": sequence, "references": sequence}),
        )

    def _compute(self, predictions: list[list[int]], references: list[list[int]]) -> dict[str, float]:
        predicted = np.concatenate([np.asarray(row, dtype=np.int64) for row in predictions] or [[]])
        expected = np.concatenate([np.asarray(row, dtype=np.int64) for row in references] or [[]])
        scored = expected != -100
        return {
            "accuracy": float((predicted[scored] == expected[scored]).mean()) if scored.any() else math.nan
        }


def preprocess_logits_for_metrics(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the argmax token per position, so evaluation stores `(batch, seq)` ids instead of logits."""
    if isinstance(logits, tuple):  # (logits, past_key_values, ...)
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_next_token_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """`accuracy`: the prediction at position i is scored against the label at i + 1."""
    predictions, labels = prediction.predictions, prediction.label_ids
    return NextTokenAccuracy(keep_in_memory=True).compute(
        predictions=predictions[:, :-1], references=labels[:, 1:]
    )


def next_token_metrics() -> dict[str, Callable]:
    """`Trainer(..., **next_token_metrics())`: reports `eval_accuracy` (next-token accuracy)."""
    return {
        "compute_metrics": compute_next_token_accuracy,
        "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
    }


def perplexity(loss: float) -> float:
    """`exp(loss)`, infinite where that overflows a float."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def rounded_logs(logs: dict[str, float]) -> dict[str, float]:
    """The logs to print: floats to 4 significant digits, kept numbers (stock callbacks print them as strings)."""
    return {key: float(f"{value:.4g}") if isinstance(value, float) else value for key, value in logs.items()}


class NumericProgressCallback(ProgressCallback):
    """`ProgressCallback` whose log lines show numbers, `{'loss': 9.154}`, not `{'loss': '9.154'}`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            logs = {key: value for key, value in (logs or {}).items() if key != "total_flos"}
            self.training_bar.write(str(rounded_logs(logs)))


class NumericPrinterCallback(PrinterCallback):
    """`PrinterCallback` (`disable_tqdm=True`) whose log lines show numbers, not strings."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero:
            print(rounded_logs({key: value for key, value in (logs or {}).items() if key != "total_flos"}))


class LimeTrainer(Trainer):
    """
    `Trainer` for LIME models. Differences from `Trainer`:

    - Custom metadata columns reach the model. `Trainer` (with `remove_unused_columns=True`, the default) keeps
      only columns named in `model.forward`'s signature; `pos_ids`/`ner_ids` are, but custom fields travel as
      `**kwargs` and would be dropped. `LimeTrainer` adds every `{field}_ids` of `model.config.metadata_fields`
      to the kept columns (the extension point TRL's trainers use, `_set_signature_columns_if_needed`).
    - Evaluation also reports `perplexity = exp(loss)` (`eval_perplexity`).
    - A model with tag heads logs its loss parts next to `loss`: `lm_loss` and `{field}_tag_loss` per field
      (training: averaged per optimizer step like `loss`; evaluation: `eval_lm_loss`, `eval_{field}_tag_loss`), and
      at evaluation its heads' accuracy against the given tags, `eval_{field}_tag_accuracy` (over the positions
      whose fed tag is a real label: not padding, unknown or special).
    - Results say where the tags they were measured with came from: `log_metrics` and `save_metrics` (stdout,
      `eval_results.json`, `all_results.json`), `push_to_hub` and `create_model_card` add `eval_metadata_source`,
      e.g. "oracle next-token tags (spaCy)" for LIME+1, which reads the tags of the very token it predicts.
    - A `LimeTokenizer` given as `processing_class` must have the model's metadata inventories.
    - Its log lines print numbers as numbers (`{'loss': 9.154}`; stock `Trainer` prints them as strings).
    - `push_to_hub` commits model, tokenizer and the LIME model card (fields, inventories, shift, backbone,
      training data, the latest eval metrics) in one commit, in place of Transformers' generic card.
    """

    def __init__(
        self,
        *args,
        training_data: list[str] | None = None,
        metadata_source: str = "the dataset's",
        **kwargs,
    ):
        """
        `Trainer`'s arguments, plus `training_data`: names of the training data sets, for the model card, and
        `metadata_source`: where the evaluation batches' tags come from (e.g. "spaCy en_core_web_sm"), recorded with
        the results as `eval_metadata_source`.
        """
        super().__init__(*args, **kwargs)
        if self.args.device.type == "cpu":  # pinned memory only speeds copies to an accelerator; torch warns
            self.args.dataloader_pin_memory = False
        for stock, numeric in (
            (ProgressCallback, NumericProgressCallback),
            (PrinterCallback, NumericPrinterCallback),
        ):
            if self.pop_callback(stock) is not None:
                self.add_callback(numeric)
        self.training_data = training_data
        kind = "oracle next-token tags" if getattr(self.model.config, "metadata_shift", 0) else "given tags"
        self.metadata_source = f"{kind} ({metadata_source})"
        # Loss parts of models with tag heads, summed on device since the last log (train) or per evaluation.
        self._loss_parts: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        # Per field with a head: [right, scored] tag predictions of the current evaluation, on device.
        self._tag_counts: dict[str, list[torch.Tensor]] = {}
        self._loss_parts_step, self._eval_batches = 0, 0
        if isinstance(self.processing_class, LimeTokenizer):
            check_inventories(self.processing_class.metadata_fields, self.model.config.metadata_fields)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            fields = getattr(self.model.config, "metadata_fields", None) or {}
            self._signature_columns += [
                f"{name}_ids" for name in fields if f"{name}_ids" not in self._signature_columns
            ]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if isinstance(outputs, dict) and outputs.get("lm_loss") is not None:
            parts = {"lm_loss": outputs["lm_loss"]}
            parts.update(
                {f"{name}_tag_loss": value for name, value in (outputs.get("tag_losses") or {}).items()}
            )
            sums = self._loss_parts["train" if model.training else "eval"]
            for key, value in parts.items():
                sums[key] = sums.get(key, 0) + value.detach()
            self._eval_batches += not model.training
            if not model.training and outputs.get("tag_logits") is not None:
                self._count_tags(outputs["tag_logits"], inputs)
        return (loss, outputs) if return_outputs else loss

    def _count_tags(self, tag_logits: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        """Add each head's right and scored predictions of the tag each position is fed (the next token's for
        LIME+1), over positions fed a real label."""
        shift = self.model.config.metadata_shift
        for name, logits in tag_logits.items():
            tags = inputs.get(f"{name}_ids")
            if tags is None:
                continue
            mask = inputs.get("attention_mask", torch.ones_like(tags))
            if shift:  # position i is fed token i+1's tag; the last position's is unknown
                tags = torch.cat([tags[:, 1:], torch.full_like(tags[:, :1], UNKNOWN_ID)], dim=1)
            scored = (tags > SPECIAL_ID) & mask.bool()
            right = ((logits.argmax(-1) == tags) & scored).sum()
            counts = self._tag_counts.setdefault(name, [torch.zeros_like(right), torch.zeros_like(right)])
            counts[0] += right
            counts[1] += scored.sum()

    def with_metadata_source(self, split: str, metrics: dict[str, float]) -> dict[str, float | str]:
        """`metrics` of an evaluation split (`eval`, `test`, ...) with `{split}_metadata_source` added."""
        if split == "train" or f"{split}_loss" not in metrics:
            return metrics
        return {**metrics, f"{split}_metadata_source": self.metadata_source}

    def log_metrics(self, split: str, metrics: dict[str, float]) -> None:
        super().log_metrics(split, self.with_metadata_source(split, metrics))

    def save_metrics(self, split: str, metrics: dict[str, float], combined: bool = True) -> None:
        super().save_metrics(split, self.with_metadata_source(split, metrics), combined)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        sums = self._loss_parts["train"]
        if "loss" in logs and sums:
            # Like `loss`: micro-batch losses normalised over the accumulated batch, summed, per optimizer step.
            steps = max(self.state.global_step - self._loss_parts_step, 1)
            for key, value in sums.items():
                logs[key] = nested_gather(value, self.args.parallel_mode).mean().item() / steps
            sums.clear()
            self._loss_parts_step = self.state.global_step
        super().log(logs, start_time)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ) -> CommitInfo | None:
        """Push the model, its tokenizer and the LIME model card to `hub_model_id` (from the main process)."""
        if revision is not None or kwargs:
            raise ValueError(
                f"LimeTrainer.push_to_hub commits to the repository's main branch with the LIME model card; "
                f"it does not take revision={revision!r} or {sorted(kwargs)}."
            )
        if not isinstance(self.model, LimePreTrainedModel):
            raise ValueError(
                f"LimeTrainer.push_to_hub pushes a LIME model with its model card; this trainer's model is a "
                f"{type(self.model).__name__}. Push a PEFT adapter with `trainer.model.push_to_hub(repo_id)`, or "
                "merge it (`trainer.model.merge_and_unload()`) and push that with `lime_hf.model_card.push_to_hub`."
            )
        if not self.is_world_process_zero():
            return None
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        return push_to_hub(
            self.model,
            self.processing_class if isinstance(self.processing_class, LimeTokenizer) else None,
            self.hub_model_id,
            training_data=self.training_data,
            metrics=self.latest_eval_metrics(),
            token=token if token is not None else self.args.hub_token,
            commit_message=commit_message or "End of training",
        )

    def latest_eval_metrics(self) -> dict[str, float | str]:
        """The latest evaluation's metrics (no `epoch`), with their `eval_metadata_source`; empty if none ran."""
        evaluations = [entry for entry in self.state.log_history if "eval_loss" in entry]
        if not evaluations:
            return {}
        return self.with_metadata_source(
            "eval", {key: value for key, value in evaluations[-1].items() if key != "epoch"}
        )

    def create_model_card(self, *args, **kwargs) -> None:
        """Write the LIME model card (`README.md`: fields, inventories, shift, backbone, training data, the latest
        evaluation with its tag source) to `output_dir`, in place of Transformers' generic card; on the main process.
        The generic card's arguments are not used."""
        if not self.is_world_process_zero() or not isinstance(self.model, LimePreTrainedModel):
            return
        card = render_model_card(
            self.model,
            self.processing_class if isinstance(self.processing_class, LimeTokenizer) else None,
            training_data=self.training_data,
            metrics=self.latest_eval_metrics(),
        )
        Path(self.args.output_dir, "README.md").write_text(card, encoding="utf-8")

    def evaluation_loop(
        self,
        dataloader: torch.utils.data.DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        self._loss_parts["eval"].clear()
        self._tag_counts.clear()
        self._eval_batches = 0
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        for key, value in self._loss_parts["eval"].items():
            mean = nested_gather(value, self.args.parallel_mode).mean().item() / max(self._eval_batches, 1)
            output.metrics[f"{metric_key_prefix}_{key}"] = mean
        for name, counts in self._tag_counts.items():
            right, scored = (nested_gather(count, self.args.parallel_mode).sum().item() for count in counts)
            output.metrics[f"{metric_key_prefix}_{name}_tag_accuracy"] = (
                right / scored if scored else math.nan
            )
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
        return output


__all__ = ["LimeTrainer", "NextTokenAccuracy", "next_token_metrics", "perplexity"]
