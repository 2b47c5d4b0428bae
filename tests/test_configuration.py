"""`LimeConfig` rejects an invalid value when it is made, changed or saved, with a message that says what is
allowed, and leaves a rejected change unapplied."""

import pytest

from lime_hf import LimeConfig, make_inventory

TEXT = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)  # fmt: skip

# field -> (a valid value, an invalid one, what the message says is allowed)
FIELDS = {
    "metadata_shift": (1, 2, r"must be 0 \(LIME\) or 1 \(LIME\+1\), got 2"),
    "self_guidance": ("sample", "greedy", r"must be 'argmax' or 'sample', got 'greedy'"),
    "meta_positional": ("zero", "drop", r"must be 'keep' .* or 'zero' .*, got 'drop'"),
    "tag_loss_weight": (0.5, -1.0, r"must be a number >= 0, got -1.0"),
    "tag_head_fields": (["pos"], "pos", r"must be a list of field names"),
    "meta_token_ids": ([5], [5, 5], r"repeats ids: \[5, 5\]"),
    "metadata_weights": ({"pos": 0.5, "ner": 1.0}, {"pos": "high"}, r"must map field names to numbers"),
    "metadata_fields": (
        {"pos": make_inventory(["NN"])},
        {"pos": ["NN", "VB"]},
        r"must start with the reserved labels \['<pad>', '<unk>', '<special>'\]",
    ),
}


@pytest.mark.parametrize("field", list(FIELDS))
def test_an_invalid_value_is_rejected_when_made(field):
    valid, invalid, allowed = FIELDS[field]
    assert getattr(LimeConfig(text_config=TEXT, **{field: valid}), field) == valid
    with pytest.raises(ValueError, match=allowed):
        LimeConfig(text_config=TEXT, **{field: invalid})


@pytest.mark.parametrize("field", list(FIELDS))
def test_an_invalid_value_is_rejected_when_changed_and_the_config_keeps_its_value(field):
    valid, invalid, allowed = FIELDS[field]
    config = LimeConfig(text_config=TEXT)
    before = getattr(config, field)
    with pytest.raises(ValueError, match=allowed):
        setattr(config, field, invalid)
    assert getattr(config, field) == before
    setattr(config, field, valid)
    assert getattr(config, field) == valid


@pytest.mark.parametrize(
    ("changes", "allowed"),
    [
        ({"tag_head_fields": ["dep"]}, r"`tag_head_fields` names unknown fields \['dep'\]; the fields are"),
        ({"metadata_weights": {"dep": 1.0}}, r"`metadata_weights` names unknown fields \['dep'\]"),
        ({"meta_token_ids": [97]}, r"outside the vocabulary of 97 tokens: .* integer in \[0, 97\)"),
        ({"metadata_fields": {}}, r"`metadata_fields` is empty: give at least one field.* or meta-tokens"),
    ],
)
def test_rules_across_fields_are_checked_when_made_and_when_saved(tmp_path, changes, allowed):
    with pytest.raises(ValueError, match=allowed):
        LimeConfig(text_config=TEXT, **changes)
    config = LimeConfig(text_config=TEXT)
    for field, value in changes.items():  # each value is allowed on its own, not with the others
        setattr(config, field, value)
    with pytest.raises(ValueError, match=allowed):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_a_valid_config_saves_and_loads_the_same(tmp_path):
    config = LimeConfig(text_config=TEXT, metadata_shift=1, tag_head_fields=["pos"], meta_token_ids=[96])
    config.save_pretrained(tmp_path)
    loaded = LimeConfig.from_pretrained(tmp_path)
    for field in FIELDS:
        assert getattr(loaded, field) == getattr(config, field), field
