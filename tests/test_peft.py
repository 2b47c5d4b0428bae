"""PEFT on retrofitted LIME models: LoRA plus the metadata tables through the Trainer, adapter save/reload/merge,
`generate` on the wrapped model, and what the prompt-learning methods do."""

import re

import pytest
import torch
from datasets import Dataset
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from tiny_models import TINY_TEXT_CONFIGS, enable_checkpointing, random_tags
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback, TrainingArguments

from lime_hf import DataCollatorForLime, LimeForCausalLM
from lime_hf.integrations.peft import lime_lora_config, lime_modules_to_save, lime_target_modules
from lime_hf.pretrain import prepare_lm_dataset
from lime_hf.trainer import LimeTrainer

HEADS = {"tag_head_fields": ["pos"]}
ADAPTED = {"llama": "q_proj|k_proj|v_proj|o_proj", "qwen2": "q_proj|k_proj|v_proj|o_proj", "gpt2": "c_attn"}


@pytest.fixture(scope="module")
def checkpoint(lime_offsets, tmp_path_factory) -> str:
    """A tiny random Llama saved as a plain causal-LM checkpoint, sized for the Austen tokenizer."""
    path = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**TINY_TEXT_CONFIGS["llama"], "vocab_size": len(lime_offsets)})
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def batch(model, seed=0, shape=(2, 9)):
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **random_tags(model, shape, seed)}


def randomised_lora(model, seed=0):
    """LoRA with random (not zero) B matrices and random tables, so that every part changes the output."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lime_lora_config(model, r=4, init_lora_weights=False))
    with torch.no_grad():
        for table in peft_model.base_model.model.metadata_embeddings.tables.values():
            table.weight[3:].normal_()
    return peft_model.eval()


@pytest.mark.parametrize("arch", sorted(ADAPTED))
def test_lora_adapts_the_attention_and_trains_the_lime_modules_whole(arch):
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_TEXT_CONFIGS[arch]))
    model = LimeForCausalLM.from_backbone(backbone, **HEADS)
    config = lime_lora_config(model, r=4)
    assert config.target_modules == lime_target_modules(model) == rf"language_model\..*\.({ADAPTED[arch]})"
    assert config.modules_to_save == ["metadata_embeddings", "tag_heads"] == lime_modules_to_save(model)
    assert config.task_type == "CAUSAL_LM"

    peft_model = get_peft_model(model, config)
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    lora = {name for name in trainable if ".lora_" in name}
    adapted = {re.search(r"\.(\w+)\.lora_", name).group(1) for name in lora}
    assert adapted == set(ADAPTED[arch].split("|"))
    assert all(".language_model." in name for name in lora)
    lime_parameters = {
        f"base_model.model.{module}.modules_to_save.default.{name}"
        for module in ("metadata_embeddings", "tag_heads")
        for name, _ in getattr(model, module).original_module.named_parameters()
    }
    assert trainable == lora | lime_parameters
    assert not any(name.startswith("base_model.model.tag_heads.original_module") for name in trainable)


def meta_retrofit():
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_TEXT_CONFIGS["llama"]))
    meta = backbone.config.vocab_size - 1
    return LimeForCausalLM.from_backbone(backbone, meta_token_ids=[meta]).eval(), meta


def test_meta_attention_sublayers_and_meta_token_rows_train_whole_save_and_merge(tmp_path):
    """New parts of a retrofit with meta-tokens: its sublayers train in full (PEFT's copy is the one the hooks
    run), the meta-token's embedding row trains alone; adapter reload and merge give the same logits."""
    model, meta = meta_retrofit()
    layers = len(model.meta_attention.layers)
    config = lime_lora_config(model, r=4)
    sublayers = [f"meta_attention.layers.{index}" for index in range(layers)]
    assert config.modules_to_save == ["metadata_embeddings", *sublayers] == lime_modules_to_save(model)
    assert config.trainable_token_indices == [meta]
    assert config.target_modules == lime_target_modules(model) == rf"language_model\..*\.({ADAPTED['llama']})"

    inputs = batch(model)
    inputs["input_ids"][:, 4] = meta
    with torch.no_grad():
        before = model(**inputs).logits
    peft_model = get_peft_model(model, config).eval()
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    copies = {name for name in trainable if ".meta_attention.layers." in name}
    assert {name.split(".modules_to_save.default.")[1] for name in copies} == {
        name for name, _ in model.meta_attention.layers[0].original_module.named_parameters()
    }
    assert len(copies) == 6 * layers  # norm weight and bias, q/k/v/o
    assert {name for name in trainable if "token_adapter" in name} == {
        "base_model.model.language_model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    }
    with torch.no_grad():
        assert torch.equal(peft_model(**inputs).logits, before)  # LoRA B = 0, copies equal, zero delta
        for index in range(layers):
            peft_model.base_model.model.meta_attention.layers[index].modules_to_save[
                "default"
            ].o_proj.weight.normal_()
        with_copies = peft_model(**inputs).logits
        assert torch.equal(with_copies[:, :4], before[:, :4])  # before the first meta-token nothing changes
        assert not torch.allclose(with_copies[:, 4:], before[:, 4:], atol=1e-3)  # the trained copies run
        embedding = peft_model.base_model.model.language_model.model.embed_tokens
        embedding.token_adapter.trainable_tokens_delta["default"].normal_()
        adapted = peft_model(**inputs).logits
        assert not torch.allclose(adapted[:, 4:], with_copies[:, 4:], atol=1e-3)

        peft_model.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(meta_retrofit()[0], tmp_path / "adapter").eval()
        assert torch.allclose(reloaded(**inputs).logits, adapted, atol=1e-5)
        merged = peft_model.merge_and_unload()
        assert all(
            type(sublayer).__name__ == "LimeMetaAttention" for sublayer in merged.meta_attention.layers
        )
        assert torch.allclose(merged(**inputs).logits, adapted, atol=1e-5)


def test_lora_config_options_and_bad_models():
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_TEXT_CONFIGS["llama"]))
    model = LimeForCausalLM.from_backbone(backbone)
    config = lime_lora_config(
        model, target_modules=["q_proj"], modules_to_save=["lm_head", "metadata_embeddings"]
    )
    assert config.target_modules == {"q_proj"}
    assert config.modules_to_save == ["metadata_embeddings", "lm_head"]
    with pytest.raises(ValueError, match=r"task_type must be 'CAUSAL_LM', got 'SEQ_CLS'"):
        lime_lora_config(model, task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"Expected a LIME model .*LlamaForCausalLM.*'llama'.*from_backbone"):
        lime_lora_config(backbone)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_TEXT_CONFIGS["gpt2"]))
    for block in gpt2.transformer.h:
        del block.attn.c_attn  # a backbone whose attention has none of the known projection names
    with pytest.raises(ValueError, match=r"no attention projections .*'gpt2'.*Pass `target_modules=`"):
        lime_lora_config(LimeForCausalLM.from_backbone(gpt2))


class RecordLogits(TrainerCallback):
    """The wrapped model's logits on a fixed batch after every optimizer step, as the Trainer left it."""

    def __init__(self, inputs):
        self.inputs, self.logits = inputs, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits[state.global_step] = model(**self.inputs).logits
        model.train()


@pytest.fixture(scope="module")
def lora_run(checkpoint, lime_offsets, corpus_lines, tmp_path_factory):
    """Three LimeTrainer steps of LoRA plus tables plus tag heads on a retrofit, an adapter saved at each step."""
    output_dir = tmp_path_factory.mktemp("lora")
    model = LimeForCausalLM.from_backbone(checkpoint, **HEADS)
    peft_model = get_peft_model(model, lime_lora_config(model, r=4, lora_alpha=8))
    blocks = prepare_lm_dataset(Dataset.from_dict({"text": corpus_lines[:16]}), lime_offsets, block_size=32)
    inputs = {key: torch.tensor(value) for key, value in blocks[:2].items()}
    recorder = RecordLogits(inputs)
    args = TrainingArguments(
        output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps",
        save_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = LimeTrainer(
        model=peft_model,
        args=args,
        train_dataset=blocks,
        data_collator=DataCollatorForLime(lime_offsets),
        processing_class=lime_offsets,
        callbacks=[recorder],
    )
    trainer.train()
    return peft_model, trainer, recorder, output_dir


def test_trainer_trains_lora_tables_and_heads_and_leaves_the_checkpoint_alone(lora_run, checkpoint):
    peft_model, trainer, _, _ = lora_run
    assert trainer.state.global_step == 3
    assert {"lm_loss", "pos_tag_loss"} <= set(trainer.state.log_history[0])  # LimeTrainer's loss parts
    lime = peft_model.base_model.model
    for name, table in lime.metadata_embeddings.modules_to_save.default.tables.items():
        assert torch.count_nonzero(table.weight[3:]) > 0, name  # from_backbone's zeros were trained
        assert torch.count_nonzero(table.weight[:2]) == 0  # padding and unknown stay zero
        assert torch.count_nonzero(lime.metadata_embeddings.original_module.tables[name].weight) == 0
    initial_heads = lime.tag_heads.original_module.state_dict()  # PEFT trains a copy of the heads
    trained_heads = lime.tag_heads.modules_to_save.default.state_dict()
    assert all(
        not torch.equal(trained_heads[key], initial_heads[key])
        for key in ("proj.weight", "classifiers.pos.weight")
    )
    lora_b = [p for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)
    original = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    frozen = {
        name.removeprefix("base_model.model.language_model.").replace(".base_layer", ""): p
        for name, p in peft_model.named_parameters()
        if ".language_model." in name and ".lora_" not in name
    }
    assert frozen.keys() == original.keys()
    assert all(torch.equal(p, original[name]) for name, p in frozen.items())


def test_lime_trainer_pushes_no_adapter_under_a_lime_model_card(lora_run, hub):
    _, trainer, _, _ = lora_run
    with pytest.raises(
        ValueError, match=r"model is a PeftModelForCausalLM\. Push a PEFT adapter with .*merge_and_unload"
    ):
        trainer.push_to_hub()
    assert not hub.commits


def test_saved_adapters_reload_and_merge_to_the_same_logits_at_every_step(lora_run, checkpoint):
    _, _, recorder, output_dir = lora_run
    assert sorted(recorder.logits) == [1, 2, 3]
    base = LimeForCausalLM.from_backbone(checkpoint, **HEADS).eval()
    with torch.no_grad():
        untrained = base(**recorder.inputs).logits
    for step, trained in recorder.logits.items():
        assert not torch.allclose(trained, untrained, atol=1e-3)  # each step moved the output
        fresh = LimeForCausalLM.from_backbone(checkpoint, **HEADS)
        reloaded = PeftModel.from_pretrained(fresh, output_dir / f"checkpoint-{step}").eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(**recorder.inputs).logits, trained, atol=1e-5)
            merged = reloaded.merge_and_unload()
            assert type(merged) is LimeForCausalLM and type(merged.tag_heads).__name__ == "LimeTagHeads"
            assert torch.allclose(merged(**recorder.inputs).logits, trained, atol=1e-5)
    assert not torch.allclose(recorder.logits[1], recorder.logits[3], atol=1e-3)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(checkpoint):
    """Reentrant checkpointing needs inputs that require grad; the trainable tables make `inputs_embeds` so."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same random tag head
        peft_model = randomised_lora(LimeForCausalLM.from_backbone(checkpoint, **HEADS)).train()
        if checkpointing:
            enable_checkpointing(peft_model, use_reentrant=True)
        inputs = batch(peft_model)
        loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads = {name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    assert torch.equal(loss, checkpointed_loss)
    assert grads.keys() == checkpointed_grads.keys() and all(
        g is not None for g in checkpointed_grads.values()
    )
    assert all(torch.allclose(grads[name], checkpointed_grads[name], atol=1e-6) for name in grads)


@pytest.mark.parametrize("setup", ["guidance", "annotating provider", "model provider"])
def test_generate_on_the_peft_model_equals_the_merged_model(setup, checkpoint, lime_offsets):
    """LIME+1 guided by a schedule, LIME re-annotating with spaCy, LIME+1 guiding itself with its tag head."""
    generation = {"max_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True}
    if setup == "guidance":
        model = LimeForCausalLM.from_backbone(checkpoint, metadata_shift=1)
        generation.update(guidance={"pos": [["NN", "VBZ", "DT"], ["JJ"]]}, metadata_provider="unknown")
    elif setup == "annotating provider":
        model = LimeForCausalLM.from_backbone(checkpoint)
        generation.update(tokenizer=lime_offsets)
    else:
        model = LimeForCausalLM.from_backbone(checkpoint, metadata_shift=1, **HEADS)
        generation.update(metadata_provider="model")
    peft_model = randomised_lora(model)
    texts = ["Emma walked to Highbury.", "Mr. Knightley smiled at her."]
    encoding = lime_offsets(texts, return_tensors="pt", padding=True, padding_side="left")
    wrapped = peft_model.generate(**encoding, **generation)
    merged = peft_model.merge_and_unload().generate(**encoding, **generation)
    assert torch.equal(wrapped.sequences, merged.sequences)
    assert wrapped.metadata_ids.keys() == merged.metadata_ids.keys() == {"pos_ids", "ner_ids"}
    for name, tags in wrapped.metadata_ids.items():
        assert torch.equal(tags, merged.metadata_ids[name]), name
    generated_pos = wrapped.metadata_ids["pos_ids"][:, encoding["input_ids"].shape[1] :]
    labels = lime_offsets.metadata_fields["pos"]
    if setup == "guidance":
        assert generated_pos[0, :3].tolist() == [labels.index(tag) for tag in ("NN", "VBZ", "DT")]
        assert generated_pos[1, 0].item() == labels.index("JJ")
    else:
        assert (generated_pos > 2).any()  # real tags, from spaCy or from the tag head


@pytest.mark.parametrize("prompt_config", [PromptTuningConfig, PromptEncoderConfig])
def test_prompt_tuning_and_p_tuning_fail_with_a_clear_error(prompt_config, checkpoint):
    model = LimeForCausalLM.from_backbone(checkpoint)
    options = {"encoder_hidden_size": 16} if prompt_config is PromptEncoderConfig else {}
    peft_model = get_peft_model(model, prompt_config(task_type="CAUSAL_LM", num_virtual_tokens=4, **options))
    inputs = batch(model)
    with pytest.raises(
        ValueError,
        match=r"`pos_ids` has shape \(2, 9\) but the input has shape \(2, 13\).* 4 more positions than the tags: "
        r"if PEFT's prompt tuning or p-tuning .* Use LoRA",
    ):
        peft_model(**inputs)
    with pytest.raises(ValueError, match=r"`prepare_inputs_for_generation` was replaced .*LoRA"):
        peft_model.generate(**inputs, max_new_tokens=2)


def test_prefix_tuning_keeps_the_tags_on_their_tokens(checkpoint):
    model = LimeForCausalLM.from_backbone(checkpoint)
    with torch.no_grad():
        for table in model.metadata_embeddings.tables.values():
            table.weight[3:].normal_()
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    inputs = batch(model)
    with torch.no_grad():
        logits = peft_model(**inputs).logits
        # By hand: the virtual tokens as a KV cache in front, the tags on the real tokens.
        by_hand = model(
            input_ids=inputs["input_ids"],
            attention_mask=torch.ones(2, 4 + 9, dtype=torch.long),
            cache=peft_model.get_prompt(batch_size=2, max_cache_len=4 + 9),
            pos_ids=inputs["pos_ids"],
            ner_ids=inputs["ner_ids"],
        ).logits
        without_tags = peft_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits
    assert torch.allclose(logits, by_hand, atol=1e-6)
    assert not torch.allclose(logits, without_tags, atol=1e-3)  # the tags count
    peft_model.train()
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    with pytest.raises(ValueError, match=r"`prepare_inputs_for_generation` was replaced .*prefix tuning"):
        peft_model.generate(**inputs, max_new_tokens=2)
