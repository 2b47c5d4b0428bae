"""TRL's SFTTrainer and DPOTrainer on LIME models (lime_hf.integrations.trl): real TRL, tiny models, the shipped
chat and preference sets. The tags fed to the model in a TRL step are the tokenizer's, position by position."""

import json
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from packaging.version import Version
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

pytest.importorskip("trl")
from peft import get_peft_model  # noqa: E402
from trl import DPOConfig, SFTConfig  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

from lime_hf import LimeConfig, LimeForCausalLM  # noqa: E402
from lime_hf.configuration_lime import UNKNOWN_ID  # noqa: E402
from lime_hf.integrations.peft import lime_lora_config  # noqa: E402
from lime_hf.integrations.trl import LimeDPOTrainer, LimeSFTTrainer  # noqa: E402
from tests.test_chat_template import chat_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "trl"
FIELDS = ("pos_ids", "ner_ids")


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def tiny_model(tok, retrofit: bool = False, **config) -> LimeForCausalLM:
    torch.manual_seed(0)
    text_config = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    if retrofit:  # an "instruct checkpoint": a plain Llama, its metadata tables added at zero
        return LimeForCausalLM.from_backbone(LlamaForCausalLM(LlamaConfig(**text_config)), **config)
    return LimeForCausalLM(LimeConfig(text_config={"model_type": "llama", **text_config}, **config))


def arguments(config_class, tmp_path, **kwargs):
    defaults = dict(
        max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, seed=0, dataset_num_proc=None,
    )  # fmt: skip
    return config_class(str(tmp_path / "out"), **{**defaults, **kwargs})


def capture_inputs(model) -> list[dict]:
    """Every forward's keyword tensors, recorded by a forward pre-hook."""
    calls = []

    def hook(module, args, kwargs):
        calls.append({key: value.detach().clone() for key, value in kwargs.items() if torch.is_tensor(value)})

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def expected_documents(tok, examples: list[dict], key: str = "messages") -> dict[tuple, dict]:
    """input_ids -> the tags the tokenizer gives each token of that example (the chat tokenised on its own)."""
    encoded = [tok.apply_chat_template(example[key]) for example in examples]
    return {tuple(item["input_ids"]): {field: item[field] for field in FIELDS} for item in encoded}


def documents(batch: dict) -> list[dict]:
    """Each document of a batch: unpadded rows, or the packed documents of a padding-free row (by position_ids)."""
    if "attention_mask" in batch:
        return [
            {
                key: batch[key][row][batch["attention_mask"][row] == 1].tolist()
                for key in ("input_ids", *FIELDS)
            }
            for row in range(batch["input_ids"].shape[0])
        ]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    return [
        {key: batch[key][0, start:end].tolist() for key in ("input_ids", *FIELDS)}
        for start, end in zip(starts[:-1], starts[1:], strict=True)
    ]


def assert_tags_match(tok, calls: list[dict], expected: dict, max_length: int, shift: int) -> int:
    """Every document fed to the model carries the tokenizer's tags of its tokens; returns how many were seen."""
    seen = 0
    for call in calls:
        for index, document in enumerate(documents(call)):
            if not document["input_ids"] or all(token == tok.pad_token_id for token in document["input_ids"]):
                continue  # padding at the end of a padding-free row
            ids = tuple(document["input_ids"])
            full = next(key for key in expected if key[: len(ids)] == ids)  # truncation keeps the start
            assert len(ids) <= max_length
            for field in FIELDS:
                want = expected[full][field][: len(ids)]
                if shift and index > 0 and "position_ids" in call and "attention_mask" not in call:
                    want = [UNKNOWN_ID, *want[1:]]  # LIME+1 packed: the previous document must not read it
                assert document[field] == want, field
            seen += 1
    return seen


@pytest.fixture(params=["pretokenized", "offsets"])
def tok(request, annotator):
    return chat_tokenizer(request.param, annotator)


def test_sft_feeds_each_token_its_tags_and_reloads(tok, tmp_path):
    """Conversational SFT, unpadded batches, truncated: the forward sees the tokenizer's tags; the saved model reloads
    with equal logits."""
    chats = rows("chat.jsonl")
    model = tiny_model(tok)
    trainer = LimeSFTTrainer(
        model=model,
        args=arguments(SFTConfig, tmp_path, max_length=40),
        train_dataset=Dataset.from_list(chats),
        processing_class=tok,
    )
    calls = capture_inputs(model)
    trainer.train()
    assert assert_tags_match(tok, calls, expected_documents(tok, chats), 40, shift=0) == 8
    trainer.save_model(str(tmp_path / "sft"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()
    batch = tok.apply_chat_template(
        [chat["messages"] for chat in chats[:2]], padding=True, return_tensors="pt"
    )
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


@pytest.mark.slow
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("heads", [False, True])
def test_sft_packed_padding_free_feeds_each_document_its_tags(tok, tmp_path, shift, heads):
    """BFD packing (padding-free, position_ids): the tags are packed alongside; LIME+1's document starts read unknown."""
    chats = rows("chat.jsonl")
    model = tiny_model(
        tok, retrofit=heads, metadata_shift=shift, tag_head_fields=["pos", "ner"] if heads else None
    )
    trainer = LimeSFTTrainer(
        model=model,
        args=arguments(SFTConfig, tmp_path, packing=True, max_length=96),
        train_dataset=Dataset.from_list(chats),
        processing_class=tok,
    )
    calls = capture_inputs(model)
    trainer.train()
    assert all("position_ids" in call and "attention_mask" not in call for call in calls)
    assert assert_tags_match(tok, calls, expected_documents(tok, chats), 96, shift=shift) >= 8
    if heads:
        assert all("tag_loss" in log for log in trainer.state.log_history[:-1])


def hand_sft_loss(model, batch: dict) -> torch.Tensor:
    """Next-token CE of the labelled positions plus the weighted tag-head CE, from the full logits of the model's
    own (unfused) forward."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        out = model(**inputs)
    labels = batch["labels"][:, 1:]
    lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    tag = 0.0
    for field, logits in out.tag_logits.items():
        targets = batch[f"{field}_ids"].clone()
        targets[(targets <= UNKNOWN_ID) | (batch["attention_mask"] == 0)] = -100
        tag = tag + F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    return lm + model.config.tag_loss_weight * tag


@pytest.mark.parametrize("task", ["assistant_only", "prompt_completion"])
def test_sft_loss_equals_a_hand_computation(annotator, tmp_path, task):
    """The trainer's loss (fused LM head + tag heads) on one batch equals the CE computed from the full logits;
    assistant-only and completion-only labels cover exactly the answer's tokens."""
    tok = chat_tokenizer("pretokenized", annotator)
    chats = rows("chat.jsonl")
    if task == "prompt_completion":
        data = [{"prompt": chat["messages"][:-1], "completion": chat["messages"][-1:]} for chat in chats]
        settings = {}
    else:
        data, settings = chats, {"assistant_only_loss": True}
    model = tiny_model(tok, retrofit=True, tag_head_fields=["pos", "ner"])
    trainer = LimeSFTTrainer(
        model=model,
        args=arguments(SFTConfig, tmp_path, **settings),
        train_dataset=Dataset.from_list(data),
        processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    for row in range(batch["input_ids"].shape[0]):
        labelled = batch["labels"][row] != -100
        answer = tok.decode(batch["input_ids"][row][labelled]).removesuffix(
            "\n"
        )  # prompt-completion: the turn's end
        assert answer.endswith("<|eos|>") and answer.removesuffix("<|eos|>") in {
            chat["messages"][-1]["content"] for chat in chats
        }
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, hand_sft_loss(model, batch), rtol=1e-5, atol=1e-5)


def test_sft_on_text_keeps_eos_whole(annotator, tmp_path):
    """Language-modelling text: TRL's appended EOS is one special token, tagged special, in the pretokenized mode."""
    tok = chat_tokenizer("pretokenized", annotator)
    texts = [chat["messages"][-1]["content"] for chat in rows("chat.jsonl")]
    model = tiny_model(tok, metadata_shift=1)
    trainer = LimeSFTTrainer(
        model=model,
        args=arguments(SFTConfig, tmp_path, max_steps=1),
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tok,
    )
    calls = capture_inputs(model)
    trainer.train()
    expected = {tuple(item["input_ids"]): item for item in (tok(text + tok.eos_token) for text in texts)}
    for document in documents(calls[0]):
        want = expected[tuple(document["input_ids"])]
        assert document["input_ids"][-1] == tok.eos_token_id and want["pos_ids"][-1] == 2
        assert all(document[field] == want[field] for field in FIELDS)


def test_what_cannot_carry_tags_is_refused(annotator, bpe_tokenizer, tmp_path):
    tok = chat_tokenizer("pretokenized", annotator)
    data = Dataset.from_list(rows("chat.jsonl"))
    model = tiny_model(tok)
    with pytest.raises(ValueError, match="needs a `LimeTokenizer`"):
        LimeSFTTrainer(
            model=model,
            args=arguments(SFTConfig, tmp_path),
            train_dataset=data,
            processing_class=bpe_tokenizer,
        )
    with pytest.raises(ValueError, match="skip_prepare_dataset"):
        LimeSFTTrainer(
            model=model, args=arguments(SFTConfig, tmp_path, dataset_kwargs={"skip_prepare_dataset": True}),
            train_dataset=data, processing_class=tok,
        )  # fmt: skip
    with pytest.raises(ValueError, match="already tokenised"):
        LimeSFTTrainer(
            model=model, args=arguments(SFTConfig, tmp_path),
            train_dataset=Dataset.from_dict({"input_ids": [[5, 6, 7]]}), processing_class=tok,
        )  # fmt: skip
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
    )
    with pytest.raises(ValueError, match="needs a `LimeTokenizer`"):
        LimeSFTTrainer(model=model, args=arguments(SFTConfig, tmp_path), train_dataset=data)
    trainer = LimeSFTTrainer(
        model=model, args=arguments(SFTConfig, tmp_path), train_dataset=data, processing_class=tok,
        data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id),
    )  # fmt: skip
    with pytest.raises(ValueError, match="dropped the tags"):
        trainer.train()
    with pytest.raises(ValueError, match="Expected a LIME model"):
        LimeSFTTrainer(
            model=llama, args=arguments(SFTConfig, tmp_path), train_dataset=data, processing_class=tok
        )


def preference_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probabilities of each row's completion tokens, from the full logits of the model's own forward."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", *FIELDS)}
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    logps = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def test_dpo_feeds_policy_and_reference_the_tags_and_its_loss_is_dpos(annotator, tmp_path):
    """Chosen and rejected rows carry the tags of prompt and answer; the reference reads the same; the sigmoid DPO
    loss (plus the tag heads' loss) equals a hand computation; the trained model reloads with equal logits."""
    tok = chat_tokenizer("offsets", annotator)
    pairs = rows("preference.jsonl")
    model, reference = (tiny_model(tok, tag_head_fields=["pos"]) for _ in range(2))
    trainer = LimeDPOTrainer(
        model=model, ref_model=reference, args=arguments(DPOConfig, tmp_path, max_length=48),
        train_dataset=Dataset.from_list(pairs), processing_class=tok,
    )  # fmt: skip
    policy_calls, reference_calls = capture_inputs(model), capture_inputs(reference)
    trainer.train()
    expected = {}
    for pair in pairs:
        for answer in ("chosen", "rejected"):
            encoded = tok.apply_chat_template(pair["prompt"] + pair[answer])
            expected[tuple(encoded["input_ids"])] = encoded
    assert assert_tags_match(tok, policy_calls, expected, 48, shift=0) == 16
    for policy, ref in zip(policy_calls, reference_calls, strict=True):
        assert all(torch.equal(policy[key], ref[key]) for key in ("input_ids", *FIELDS))

    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    policy, ref = preference_logps(model, batch), preference_logps(reference, batch)
    chosen, rejected = (policy - ref).chunk(2)
    dpo = -F.logsigmoid(trainer.beta * (chosen - rejected)).mean()
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", *FIELDS)}
    with torch.no_grad():
        heads = model(**inputs, labels=batch["input_ids"]).tag_losses
    torch.testing.assert_close(loss, dpo + model.config.tag_loss_weight * heads["pos"], rtol=1e-5, atol=1e-5)

    trainer.save_model(str(tmp_path / "dpo"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo").eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


@pytest.mark.slow
@pytest.mark.skipif(
    Version(peft.__version__) < Version("0.21"),
    reason="peft before 0.21 calls the wrapped model's `forward` directly, so the forward pre-hook this test records "
    "the inputs with does not fire (the training itself runs)",
)
def test_dpo_with_lora_reads_the_tags_with_and_without_the_adapter(annotator, tmp_path):
    """LoRA through PEFT on a retrofitted model: the reference pass (adapter disabled) reads the same tags."""
    tok = chat_tokenizer("pretokenized", annotator)
    retrofit = tiny_model(tok, retrofit=True, tag_head_fields=["pos"])
    model = get_peft_model(retrofit, lime_lora_config(retrofit, r=4, lora_alpha=8))
    trainer = LimeDPOTrainer(
        model=model, args=arguments(DPOConfig, tmp_path), train_dataset=Dataset.from_list(rows("preference.jsonl")),
        processing_class=tok,
    )  # fmt: skip
    calls = capture_inputs(retrofit)
    tables_before = retrofit.metadata_embeddings.tables["pos"].weight.detach().clone()
    trainer.train()
    policy, reference = calls[0::2], calls[1::2]  # each step: the policy forward, then the reference forward
    assert len(policy) == len(reference) == 2
    for first, second in zip(policy, reference, strict=True):
        assert all(torch.equal(first[key], second[key]) for key in ("input_ids", *FIELDS))
        assert first["pos_ids"].gt(UNKNOWN_ID).any()
    trained = model.base_model.model.metadata_embeddings.modules_to_save["default"].tables["pos"].weight
    assert not torch.equal(trained, tables_before)
