import json
import re

import pytest
import torch
from tiny_models import (
    TINY_TEXT_CONFIGS,
    VOCAB_SIZE,
    enable_checkpointing,
    random_tags,
    run_without_lime_hf,
    tiny_lime,
)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from lime_hf import DEFAULT_METADATA_FIELDS, LimeConfig, LimeForCausalLM, LimeModel, make_inventory
from lime_hf.configuration_lime import NER_TAGS, POS_TAGS, UNKNOWN_ID

ARCHS = list(TINY_TEXT_CONFIGS)


def input_ids(shape=(2, 9), seed=0):
    return torch.randint(0, VOCAB_SIZE, shape, generator=torch.Generator().manual_seed(seed))


# --- config -------------------------------------------------------------------------------------------


def test_default_config_has_pos_and_ner_inventories():
    config = LimeConfig(text_config=TINY_TEXT_CONFIGS["llama"])
    assert list(config.metadata_fields) == ["pos", "ner"]
    assert config.metadata_fields == DEFAULT_METADATA_FIELDS
    assert config.metadata_fields["pos"][:3] == ["<pad>", "<unk>", "<special>"]
    assert len(POS_TAGS) == 50 and "_SP" in POS_TAGS and "VBZ" in POS_TAGS
    assert len(NER_TAGS) == 37 and NER_TAGS[:3] == ("O", "B-CARDINAL", "I-CARDINAL")
    assert config.metadata_weights == {"pos": 1.0, "ner": 1.0}
    assert config.metadata_shift == 0


def test_config_accepts_dict_or_config_backbones_and_round_trips(tmp_path):
    from_dict = LimeConfig(
        text_config=TINY_TEXT_CONFIGS["gpt2"], metadata_shift=1, metadata_weights={"ner": 0.5}
    )
    assert from_dict.text_config.model_type == "gpt2" and from_dict.text_config.n_embd == 32
    from_object = LimeConfig(text_config=from_dict.text_config)
    assert from_object.text_config is from_dict.text_config
    from_dict.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, LimeConfig)
    assert reloaded.metadata_fields == from_dict.metadata_fields
    assert reloaded.metadata_weights == {"pos": 1.0, "ner": 0.5}
    assert reloaded.metadata_shift == 1
    assert reloaded.text_config.to_dict() == from_dict.text_config.to_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metadata_shift": 2}, "must be 0 (LIME) or 1 (LIME+1), got 2"),
        ({"metadata_weights": {"dep": 1.0}}, "names unknown fields ['dep']"),
        ({"metadata_fields": {"pos": ["NN", "VB"]}}, "must start with the reserved labels"),
        ({"metadata_fields": {"my-field": make_inventory(["A"])}}, "not a Python identifier"),
        ({"metadata_fields": {"cap": make_inventory(["A", "A"])}}, "duplicate labels ['A']"),
        ({"metadata_fields": {}}, "`metadata_fields` is empty"),
    ],
)
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LimeConfig(text_config=TINY_TEXT_CONFIGS["llama"], **kwargs)


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("lime", text_config=TINY_TEXT_CONFIGS["llama"])
    assert isinstance(AutoModelForCausalLM.from_config(config), LimeForCausalLM)
    assert isinstance(AutoModel.from_config(config), LimeModel)


# --- forward: backbone equivalence, metadata, shift -------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_without_metadata_the_model_is_its_backbone(arch):
    model = tiny_lime(arch)
    ids = input_ids()
    backbone_logits = model.language_model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits, backbone_logits)
    unknown = {key: torch.full_like(ids, UNKNOWN_ID) for key in random_tags(model, ids.shape)}
    assert torch.equal(model(input_ids=ids, **unknown).logits, backbone_logits)
    padding = {key: torch.zeros_like(ids) for key in unknown}
    assert torch.equal(model(input_ids=ids, **padding).logits, backbone_logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_embeddings_are_added_to_token_embeddings(arch):
    model = tiny_lime(arch, metadata_weights={"pos": 0.5, "ner": 2.0})
    ids, tags = input_ids(), random_tags(model, (2, 9))
    tables = model.metadata_embeddings.tables
    expected = (
        model.get_input_embeddings()(ids)
        + 0.5 * tables["pos"].weight[tags["pos_ids"]]
        + 2.0 * tables["ner"].weight[tags["ner_ids"]]
    )
    logits = model(input_ids=ids, **tags).logits
    assert torch.allclose(logits, model.language_model(inputs_embeds=expected).logits, atol=1e-6)
    assert not torch.allclose(logits, model(input_ids=ids).logits)


def test_lime_plus_one_shifts_tags_internally():
    plus_one = tiny_lime("llama", metadata_shift=1)
    lime = tiny_lime("llama")
    lime.load_state_dict(plus_one.state_dict())
    ids, tags = input_ids(), random_tags(plus_one, (2, 9))
    next_pos = torch.tensor([5, 7])

    def shifted(tag_ids, last):
        return torch.cat([tag_ids[:, 1:], last.view(-1, 1)], dim=1)

    unknown = torch.full((2,), UNKNOWN_ID)
    expected = lime(
        input_ids=ids, pos_ids=shifted(tags["pos_ids"], unknown), ner_ids=shifted(tags["ner_ids"], unknown)
    )
    assert torch.equal(plus_one(input_ids=ids, **tags).logits, expected.logits)

    guided = plus_one(input_ids=ids, **tags, next_metadata_ids={"pos": next_pos})
    expected = lime(
        input_ids=ids, pos_ids=shifted(tags["pos_ids"], next_pos), ner_ids=shifted(tags["ner_ids"], unknown)
    )
    assert torch.equal(guided.logits, expected.logits)
    # The last position sees the guidance tag, so guidance changes the next-token distribution.
    assert not torch.allclose(guided.logits[:, -1], plus_one(input_ids=ids, **tags).logits[:, -1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shift", [0, 1])
def test_kv_cache_matches_full_forward(arch, shift):
    model = tiny_lime(arch, metadata_shift=shift)
    ids, tags = input_ids((2, 10)), random_tags(model, (2, 10))
    full = model(input_ids=ids, **tags).logits
    prefix = {key: value[:, :6] for key, value in tags.items()}
    # With the cache, a LIME+1 model learns the tag of the token after the prefix from `next_metadata_ids`.
    lookahead = (
        {"next_metadata_ids": {"pos": tags["pos_ids"][:, 6], "ner": tags["ner_ids"][:, 6]}} if shift else {}
    )
    first = model(input_ids=ids[:, :6], **prefix, **lookahead, past_key_values=DynamicCache(), use_cache=True)
    rest = {key: value[:, 6:] for key, value in tags.items()}
    second = model(input_ids=ids[:, 6:], **rest, past_key_values=first.past_key_values, use_cache=True)
    assert torch.allclose(torch.cat([first.logits, second.logits], dim=1), full, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_and_eager_attention_agree(arch):
    sdpa = tiny_lime(arch, attn_implementation="sdpa")
    eager = tiny_lime(arch, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.language_model.config._attn_implementation == "sdpa"
    assert eager.language_model.config._attn_implementation == "eager"
    ids, tags = input_ids(), random_tags(sdpa, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    assert torch.allclose(
        sdpa(input_ids=ids, attention_mask=mask, **tags).logits[0, 3:],
        eager(input_ids=ids, attention_mask=mask, **tags).logits[0, 3:],
        atol=1e-5,
    )


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_lime("llama").train()
    ids, tags = input_ids(), random_tags(model, (2, 9))

    def loss_and_grad():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids, **tags).loss
        loss.backward()
        return loss.detach(), model.metadata_embeddings.tables["pos"].weight.grad.clone()

    plain_loss, plain_grad = loss_and_grad()
    enable_checkpointing(model)
    assert model.language_model.model.gradient_checkpointing
    ckpt_loss, ckpt_grad = loss_and_grad()
    assert torch.allclose(plain_loss, ckpt_loss) and torch.allclose(plain_grad, ckpt_grad, atol=1e-6)
    assert plain_grad.abs().sum() > 0


def test_bf16_forward_and_backward():
    model = tiny_lime("llama").to(torch.bfloat16).train()
    ids, tags = input_ids(), random_tags(model, (2, 9))
    out = model(input_ids=ids, labels=ids, **tags)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert model.metadata_embeddings.tables["ner"].weight.grad.dtype == torch.bfloat16


def test_padding_and_unknown_rows_stay_zero_and_get_no_gradient():
    model = tiny_lime("llama").train()
    table = model.metadata_embeddings.tables["pos"].weight
    assert torch.count_nonzero(table[:2]) == 0 and torch.count_nonzero(table[2:]) > 0
    ids = input_ids()
    pos = torch.randint(0, 4, ids.shape, generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids, pos_ids=pos).loss.backward()
    assert torch.count_nonzero(table.grad[:2]) == 0 and torch.count_nonzero(table.grad[2:4]) > 0


def test_resize_token_embeddings_keeps_metadata_working():
    model = tiny_lime("llama", text_config={"tie_word_embeddings": True})
    model.resize_token_embeddings(VOCAB_SIZE + 11)
    assert model.config.text_config.vocab_size == VOCAB_SIZE + 11
    ids = torch.tensor([[VOCAB_SIZE + 10, 3, 4]])
    out = model(input_ids=ids, **random_tags(model, (1, 3)))
    assert out.logits.shape == (1, 3, VOCAB_SIZE + 11)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_num_items_in_batch_loss_matches_the_backbone():
    model = tiny_lime("qwen2")
    ids = input_ids()
    labels = ids.clone()
    labels[:, :4] = -100
    lime_loss = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    backbone_loss = model.language_model(
        input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40)
    ).loss
    mean_loss = model(input_ids=ids, labels=labels).loss
    assert torch.equal(lime_loss, backbone_loss)
    assert torch.allclose(lime_loss, mean_loss * 10 / 40)  # 2 rows x 5 predicted tokens, summed then / 40


def test_custom_field_works_without_model_code_changes():
    fields = {**DEFAULT_METADATA_FIELDS, "cap": make_inventory(["LOWER", "UPPER"])}
    model = tiny_lime("llama", metadata_fields=fields)
    ids = input_ids()
    cap = torch.randint(3, 5, ids.shape, generator=torch.Generator().manual_seed(3))
    expected = model.get_input_embeddings()(ids) + model.metadata_embeddings.tables["cap"].weight[cap]
    logits = model(input_ids=ids, cap_ids=cap).logits
    assert torch.allclose(logits, model.language_model(inputs_embeds=expected).logits, atol=1e-6)


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_kwargs", "message"),
    [
        (
            lambda ids: {"pos_ids": torch.full_like(ids, 53)},
            r"`pos_ids` holds tag id 53, outside field 'pos'.*0\.\.52",
        ),
        (
            lambda ids: {"ner_ids": torch.full_like(ids, -1)},
            r"`ner_ids` holds tag id -1, outside field 'ner'.*0\.\.39",
        ),
        (
            lambda ids: {"pos_ids": ids[:, :5]},
            r"`pos_ids` has shape \(2, 5\) but the input has shape \(2, 9\)",
        ),
        (
            lambda ids: {"dep_ids": ids},
            r"`dep_ids` is neither a metadata field of this model \(its fields are \['pos_ids', 'ner_ids'\]\) "
            r"nor an argument of its LlamaForCausalLM backbone",
        ),
        (
            lambda ids: {"pos_ids": ids.float()},
            r"`pos_ids` must hold integer tag ids, got dtype torch.float32",
        ),
        (lambda ids: {"next_metadata_ids": {"pos": ids[:, 0]}}, r"only guide LIME\+1 models"),
    ],
)
def test_bad_metadata_raises_a_clear_value_error(make_kwargs, message):
    model = tiny_lime("llama")
    ids = input_ids()
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, **make_kwargs(ids))


def test_bad_lookahead_raises_a_clear_value_error():
    model = tiny_lime("llama", metadata_shift=1)
    ids = input_ids()
    with pytest.raises(ValueError, match=r"next_metadata_ids\['pos'\]` has shape \(2, 1\); expected \(2,\)"):
        model(input_ids=ids, next_metadata_ids={"pos": ids[:, :1]})
    with pytest.raises(ValueError, match=r"next_metadata_ids\['pos'\]` holds tag id 99"):
        model(input_ids=ids, next_metadata_ids={"pos": torch.tensor([99, 3])})
    with pytest.raises(ValueError, match=r"names unknown field 'dep'"):
        model(input_ids=ids, next_metadata_ids={"dep": torch.tensor([3, 3])})


# --- retrofit, save and load -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_retrofit_keeps_the_checkpoint_logits_then_learns_metadata(arch, tmp_path):
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_TEXT_CONFIGS[arch])).eval()
    backbone.save_pretrained(tmp_path)
    ids = input_ids()
    expected = backbone(input_ids=ids).logits
    for source in (backbone, str(tmp_path)):
        model = LimeForCausalLM.from_backbone(source, metadata_shift=1).eval()
        assert model.config.metadata_shift == 1
        tags = random_tags(model, ids.shape)
        assert torch.equal(model(input_ids=ids).logits, expected)
        assert torch.equal(model(input_ids=ids, **tags).logits, expected)

    model.train()
    optimizer = torch.optim.SGD(model.metadata_embeddings.parameters(), lr=0.1)
    model(input_ids=ids, labels=ids, **tags).loss.backward()
    optimizer.step()
    assert torch.count_nonzero(model.metadata_embeddings.tables["pos"].weight) > 0
    assert not torch.equal(model.eval()(input_ids=ids, **tags).logits, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_with_auto_classes(arch, tmp_path):
    model = tiny_lime(arch, metadata_shift=1)
    ids, tags = input_ids(), random_tags(model, (2, 9))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert {"configuration_lime.py", "modeling_lime.py"} <= {p.name for p in tmp_path.iterdir()}
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_lime.LimeForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is LimeForCausalLM and reloaded.config.metadata_shift == 1
    assert torch.equal(reloaded(input_ids=ids, **tags).logits, model(input_ids=ids, **tags).logits)
    hidden = AutoModel.from_pretrained(tmp_path)(input_ids=ids, **tags).last_hidden_state
    assert hidden.shape == (2, 9, 32)
    eager = LimeForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.language_model.config._attn_implementation == "eager"


def test_tied_embeddings_survive_save_and_load(tmp_path):
    model = tiny_lime("llama", text_config={"tie_word_embeddings": True})
    model.save_pretrained(tmp_path)
    reloaded = LimeForCausalLM.from_pretrained(tmp_path)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    assert torch.equal(reloaded.get_output_embeddings().weight, model.get_output_embeddings().weight)


@pytest.mark.slow
def test_remote_code_loads_without_lime_hf(tmp_path):
    model = tiny_lime("qwen2", metadata_shift=1)
    ids, tags = input_ids(), random_tags(model, (2, 9))
    model.save_pretrained(tmp_path / "model")
    torch.save(
        {"input_ids": ids, **tags, "logits": model(input_ids=ids, **tags).logits}, tmp_path / "case.pt"
    )
    out = run_without_lime_hf(
        """
        import torch
        from transformers import AutoModelForCausalLM
        try:
            import lime_hf
            raise SystemExit("lime_hf should not be importable here")
        except ImportError:
            pass
        case = torch.load("case.pt")
        expected = case.pop("logits")
        model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("lime_hf"), type(model).__module__
        assert torch.equal(model(**case).logits, expected)
        print("OK", type(model).__name__, model.config.metadata_shift)
        """,
        cwd=tmp_path,
    )
    assert out.strip() == "OK LimeForCausalLM 1"
