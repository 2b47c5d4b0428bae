"""Write the saved checkpoints and their reference outputs (`python tests/data/checkpoints/make.py`).

Each folder holds a tiny random LIME model saved by `save_pretrained` (weights and config only: the copied
remote-code files are removed, the test loads the folder with the installed `lime_hf`) and `reference.pt`: the
logits of a fixed tagged input and the ids and `metadata_ids` of fixed `generate` calls, as this code computed
them. `tests/test_saved_checkpoints.py` loads every folder with the code of the day and compares. The references
are written once, by the code before a change, and never rewritten to make a later change pass.

Deterministic: fixed seeds, CPU, float32, greedy/beam decoding.
"""

import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(
    0, str(HERE.parent.parent.parent)
)  # the repository root, whose `lime_hf` is the code of the day

from lime_hf import LimeConfig, LimeForCausalLM, MetaTokenPlacement  # noqa: E402

VOCAB_SIZE, META = 64, 63
BACKBONES = {
    "llama": dict(
        model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    ),
    "gpt2": dict(
        model_type="gpt2", vocab_size=VOCAB_SIZE, n_embd=16, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
    ),
}  # fmt: skip
# name -> (backbone, LimeConfig arguments)
MODES = {
    "llama-lime": ("llama", dict(metadata_shift=0)),
    "llama-lime1": ("llama", dict(metadata_shift=1)),
    "llama-lime-heads": ("llama", dict(metadata_shift=0, tag_head_fields=["pos", "ner"])),
    "llama-lime1-heads": ("llama", dict(metadata_shift=1, tag_head_fields=["pos"])),
    "llama-lime-meta": ("llama", dict(metadata_shift=0, meta_token_ids=[META], meta_positional="zero")),
    "gpt2-lime": ("gpt2", dict(metadata_shift=0, metadata_weights={"ner": 0.5})),
    "gpt2-lime1-heads": ("gpt2", dict(metadata_shift=1, tag_head_fields=["pos", "ner"])),
    "gpt2-meta-only": ("gpt2", dict(metadata_fields={}, meta_token_ids=[META])),
}


def build(name: str) -> LimeForCausalLM:
    """The random model of mode `name`, every table and head non-zero (a zero table would hide a broken path)."""
    backbone, kwargs = MODES[name]
    torch.manual_seed(sum(map(ord, name)))
    model = LimeForCausalLM(LimeConfig(text_config=BACKBONES[backbone], **kwargs)).eval()
    with torch.no_grad():
        for table in model.metadata_embeddings.tables.values():
            table.weight[3:].normal_(0.0, 0.5)
    return model


def inputs(model: LimeForCausalLM) -> dict:
    """A fixed batch of 2 rows x 10 tokens, the first row left-padded by 2, tags for every field."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, META, (2, 10), generator=generator)
    if model.config.meta_token_ids:
        ids[:, [3, 7]] = META
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    tags = {
        f"{field}_ids": torch.randint(
            3, len(model.config.metadata_fields[field]), ids.shape, generator=generator
        )
        for field in sorted(model.config.metadata_fields)  # a saved config lists its fields sorted
    }
    for field_ids in tags.values():
        field_ids[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, **tags}


def forward_references(model: LimeForCausalLM) -> dict:
    """Logits (and tag-head logits and losses) of the fixed batch; LIME+1 also with `next_metadata_ids`."""
    batch = inputs(model)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    refs = {"logits": out.logits, "loss": out.loss}
    if model.tag_heads is not None:
        refs["lm_loss"] = out.lm_loss
        refs["tag_losses"] = dict(out.tag_losses)
        refs["tag_logits"] = dict(out.tag_logits)
        # Bare `input_ids`: a heads model reads them tagged by its own heads (lm-eval's `--model hf`).
        refs["self_tagged_logits"] = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if model.config.metadata_shift:
        following = {field: torch.tensor([3, 4]) for field in sorted(model.config.metadata_fields)}
        refs["guided_logits"] = model(**batch, next_metadata_ids=following).logits
    # An incremental continuation through the KV cache: one more token after the batch.
    first = model(**batch, use_cache=True)
    cache = first["cache"] if "cache" in first else first["past_key_values"]
    step = {
        "input_ids": torch.tensor([[5], [6]]),
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
    }
    step.update({f"{field}_ids": torch.full((2, 1), 4) for field in sorted(model.config.metadata_fields)})
    cache_name = "cache" if "cache" in first else "past_key_values"
    refs["cached_step_logits"] = model(**step, **{cache_name: cache}).logits
    return refs


def generate_calls(model: LimeForCausalLM) -> dict[str, dict]:
    """name -> the keywords of one `generate` call on the fixed prompt (greedy or beam, deterministic)."""
    batch = inputs(model)
    config = model.config
    prompt = {key: value[:, :6] for key, value in batch.items()}
    placement, bare_placement = {}, {}
    if config.meta_token_ids:
        placement = {
            "logits_processor": [MetaTokenPlacement(META, every=3, attention_mask=prompt["attention_mask"])]
        }
        bare_placement = {"logits_processor": [MetaTokenPlacement(META, every=2)]}
    common = dict(
        max_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0, **placement
    )
    calls = {
        "greedy": dict(**prompt, **common),
        "greedy_no_cache": dict(**prompt, **common, use_cache=False),
        "beam": dict(**prompt, **common, num_beams=3, num_return_sequences=2),
        "unknown": dict(**prompt, **common, metadata_provider="unknown"),
        "no_prompt": dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, **bare_placement),
    }
    if config.metadata_shift:
        guidance = {"pos": [["VBZ", "DT", "NN"], ["NNP"]]}
        calls["guided"] = dict(**prompt, **common, guidance=guidance)
        # No EOS: a beam that ends early is padded, and today's `metadata_ids` cannot tag padding after it.
        calls["guided_beam"] = dict(
            **prompt, **common, guidance=guidance, num_beams=2, num_return_sequences=2, suppress_tokens=[2]
        )
    if config.tag_head_fields:
        calls["model_provider"] = dict(**prompt, **common, metadata_provider="model")
        calls["untagged_prompt"] = dict(
            input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], **common
        )
    return calls


def generate_references(model: LimeForCausalLM) -> dict:
    refs = {}
    for name, call in generate_calls(model).items():
        out = model.generate(**call)
        refs[name] = {"sequences": out.sequences, **dict(out.get("metadata_ids") or {})}
    return refs


@torch.no_grad()
def main() -> None:
    for name in MODES:
        folder = HERE / name
        shutil.rmtree(folder, ignore_errors=True)
        model = build(name)
        model.save_pretrained(folder)
        for code in folder.glob("*.py"):  # remote code: the test loads with the installed lime_hf
            code.unlink()
        refs = {"forward": forward_references(model), "generate": generate_references(model)}
        torch.save(refs, folder / "reference.pt")
        print(name, sum(p.numel() for p in model.parameters()), "parameters")


if __name__ == "__main__":
    main()
