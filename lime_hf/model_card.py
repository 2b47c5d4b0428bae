"""Model cards for LIME models, and publishing a model, its tokenizer and its card to the Hub in one commit.

The card is rendered from the Jinja template `model_cards/lime_model_card.md` (shipped as the package data
`lime_hf.model_cards`). This module is not remote code: the files copied next to the weights never import it.
"""

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .configuration_lime import RESERVED_LABELS, check_inventories
from .modeling_lime import LimePreTrainedModel
from .tokenization_lime import LimeTokenizer

TEMPLATE_PACKAGE, TEMPLATE_NAME = "lime_hf.model_cards", "lime_model_card.md"
DEFAULT_SPACY_MODEL = "en_core_web_sm"


def render_model_card(
    model: LimePreTrainedModel,
    tokenizer: LimeTokenizer | None = None,
    *,
    repo_id: str | None = None,
    training_data: Sequence[str] | None = None,
    metrics: Mapping[str, float] | None = None,
    base_model: str | None = None,
) -> str:
    """
    The model card (`README.md`) of a LIME model: YAML metadata, then the method, backbone, metadata fields
    with their full inventories, training data, metrics, usage and limitations.

    Args:
        model: the LIME model the card describes.
        tokenizer: its `LimeTokenizer` (alignment mode, spaCy pipeline); its inventories must be the model's.
        repo_id: the Hub repository, used in the title and the loading snippets.
        training_data: names or Hub ids of the training data sets (Hub ids become links on the Hub).
        metrics: evaluation results, metric name -> value; `<split>_metadata_source` (the tags they were measured
            with, as `LimeTrainer` records it) is a row of the table, not a metric of the card's metadata.
        base_model: the Hub id of the retrofitted checkpoint; by default the backbone's `name_or_path` when
            that is a Hub id (as after `LimeForCausalLM.from_backbone("org/name")`), else none.

    Returns:
        The card's Markdown text.
    """
    if tokenizer is not None:
        check_inventories(tokenizer.metadata_fields, model.config.metadata_fields)
    base_model = base_model or backbone_hub_id(model)
    metrics = dict(metrics or {})
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        language=None if tokenizer is None else spacy_model(tokenizer).split("_")[0],
        base_model=base_model,
        datasets=list(training_data or []) or None,
        metrics=[name for name in metrics if not name.endswith("_metadata_source")] or None,
        tags=card_tags(model),
    )
    text = load_template().render(
        card_data=card_data.to_yaml(),
        model_name=repo_id.split("/")[-1] if repo_id else "LIME model",
        repo_id=repo_id or "path/to/model",
        method="LIME+1" if model.config.metadata_shift else "LIME",
        shift=model.config.metadata_shift,
        metadata_layer=model.config.metadata_layer,
        backbone=describe_backbone(model),
        parameters=count_parameters(model),
        base_model=base_model,
        tokenizer=describe_tokenizer(tokenizer),
        spacy_model=DEFAULT_SPACY_MODEL if tokenizer is None else spacy_model(tokenizer),
        fields=describe_fields(model, tokenizer),
        tag_heads=describe_tag_heads(model),
        meta_tokens=describe_meta_tokens(model),
        guidance_example=guidance_example(model.config.metadata_fields),
        training_data=list(training_data or []),
        metrics={name: format_value(value) for name, value in metrics.items()},
    )
    ModelCard(text)  # parses the YAML header: a malformed card fails here, not on the Hub
    return text


def push_to_hub(
    model: LimePreTrainedModel,
    tokenizer: LimeTokenizer | None,
    repo_id: str,
    *,
    training_data: Sequence[str] | None = None,
    metrics: Mapping[str, float] | None = None,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload LIME model, tokenizer and model card",
    create_pr: bool = False,
) -> CommitInfo:
    """
    Publish a self-contained LIME repository in one commit: weights (safetensors), config with `auto_map`, the
    code files for `trust_remote_code=True`, the tokenizer files and a `README.md` from `render_model_card`.

    The repository is created if needed. Later `model.push_to_hub(repo_id)` calls keep the card (Transformers
    loads a repository's existing card and only adds tags to it).

    Args:
        model, tokenizer, training_data, metrics, base_model: see `render_model_card`; `tokenizer=None` pushes
            the model and its card alone.
        repo_id: `"namespace/name"`, or `"name"` for your own namespace.
        private: visibility of a newly created repository (`None`: the namespace's default).
        token: Hub token; by default the one saved by `hf auth login` or `HF_TOKEN`.
        commit_message: the commit's title.
        create_pr: open a pull request instead of committing to `main`.

    Returns:
        The commit's `CommitInfo` (its URL, and `pr_url` with `create_pr=True`).
    """
    api = HfApi(library_name="lime_hf")
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card = render_model_card(
        model,
        tokenizer,
        repo_id=repo_id,
        training_data=training_data,
        metrics=metrics,
        base_model=base_model,
    )
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        Path(folder, "README.md").write_text(card, encoding="utf-8")
        # One atomic commit, as Transformers' own `push_to_hub` makes (`upload_folder` may split a folder).
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=path)
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id, operations, commit_message=commit_message, token=token, create_pr=create_pr
        )


def load_template() -> jinja2.Template:
    """The card template; undefined variables raise, so no placeholder can stay unrendered."""
    source = resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    return environment.from_string(source)


def backbone_hub_id(model: LimePreTrainedModel) -> str | None:
    """The backbone checkpoint's Hub id when the model was retrofitted from one (not from a local folder)."""
    name = model.config.get_text_config().name_or_path
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def card_tags(model: LimePreTrainedModel) -> list[str]:
    """Hub tags: the method, the backbone architecture and any tags added with `model.add_model_tags`."""
    tags = ["lime", "linguistic-metadata", model.config.get_text_config().model_type]
    if model.config.metadata_shift:
        tags.insert(1, "lime-plus-one")
    if model.tag_heads is not None:
        tags.insert(-1, "tag-heads")
    if model.meta_attention is not None:
        tags.insert(-1, "meta-tokens")
    return tags + [tag for tag in model.model_tags or [] if tag not in tags]


def spacy_model(tokenizer: LimeTokenizer) -> str:
    """The spaCy pipeline the tokenizer annotates with."""
    return tokenizer.spacy_model or DEFAULT_SPACY_MODEL


def describe_tokenizer(tokenizer: LimeTokenizer | None) -> dict[str, Any] | None:
    """Alignment mode and vocabulary size (added tokens included) of the tokenizer, if any."""
    if tokenizer is None:
        return None
    return {"alignment": tokenizer.alignment, "vocab_size": len(tokenizer)}


def describe_backbone(model: LimePreTrainedModel) -> dict[str, Any]:
    """Architecture, depth, width and vocabulary of the backbone."""
    text_config = model.config.get_text_config()
    return {
        "model_type": text_config.model_type,
        "num_layers": text_config.num_hidden_layers,
        "hidden_size": text_config.hidden_size,
        "vocab_size": text_config.vocab_size,
    }


def count_parameters(model: LimePreTrainedModel) -> dict[str, str]:
    """Total and metadata-table parameter counts (abbreviated) and the tables' share of the total."""
    total = model.num_parameters()
    metadata = sum(parameter.numel() for parameter in model.metadata_embeddings.parameters())
    return {
        "total": abbreviate(total),
        "metadata": abbreviate(metadata),
        "metadata_share": f"{100 * metadata / total:.3g}%",
    }


def describe_tag_heads(model: LimePreTrainedModel) -> dict[str, Any] | None:
    """The fields with tag heads, their shape, loss weight, self-guidance mode, the LM's training source, how it reads
    the heads' tags and parameter count; None without heads."""
    if model.tag_heads is None:
        return None
    config = model.config
    return {
        "fields": ", ".join(f"`{name}`" for name in config.tag_head_fields),
        "head_type": config.tag_head_type,
        "loss_weight": f"{config.tag_loss_weight:g}",
        "self_guidance": config.self_guidance,
        "training_source": config.metadata_training_source,
        "tag_embedding": config.predicted_tag_embedding,
        "parameters": abbreviate(sum(parameter.numel() for parameter in model.tag_heads.parameters())),
    }


def describe_meta_tokens(model: LimePreTrainedModel) -> dict[str, Any] | None:
    """The meta-token ids, positional variant and meta-attention parameter count; None without meta-tokens."""
    if model.meta_attention is None:
        return None
    return {
        "ids": ", ".join(str(token_id) for token_id in model.config.meta_token_ids),
        "positional": model.config.meta_positional,
        "parameters": abbreviate(sum(parameter.numel() for parameter in model.meta_attention.parameters())),
    }


def abbreviate(count: int) -> str:
    """`2_000_178_000` -> `"2.00B"`, `27_776` -> `"27.8K"`: three significant digits."""
    for suffix, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.3g}{suffix}"
    return str(count)


def describe_fields(model: LimePreTrainedModel, tokenizer: LimeTokenizer | None) -> list[dict[str, Any]]:
    """Per metadata field: name, inventory, number of real labels, weight and whitespace tag."""
    config = model.config
    return [
        {
            "name": name,
            "inventory": inventory,
            "num_labels": len(inventory) - len(RESERVED_LABELS),
            "weight": f"{config.metadata_weights[name]:g}",
            "whitespace_label": "–" if tokenizer is None else f"`{tokenizer.whitespace_labels[name]}`",
        }
        for name, inventory in config.metadata_fields.items()
    ]


def guidance_example(metadata_fields: Mapping[str, Sequence[str]]) -> str | None:
    """A `guidance=` value for the usage snippet: `VBZ` for a pos field, else the first field's first label; None
    for a model without metadata fields (meta-tokens only)."""
    if not metadata_fields:
        return None
    field = "pos" if "pos" in metadata_fields else next(iter(metadata_fields))
    labels = metadata_fields[field]
    label = "VBZ" if "VBZ" in labels else labels[len(RESERVED_LABELS)]
    return json.dumps({field: [label]})


def format_value(value: float) -> str:
    """Floats with four significant digits; other values as they print."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
