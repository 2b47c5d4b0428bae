"""A toy third field (is-capitalised) end to end: annotator -> tokenizer -> save/reload -> model, no model edits."""

import pytest
import torch

from lime_hf.annotation import FieldAnnotator
from lime_hf.configuration_lime import LimeConfig
from lime_hf.tokenization_lime import LimeTokenizer


class Capitalised(FieldAnnotator):
    """Whether a spaCy token starts with an upper-case letter; needs only spaCy's tokenizer."""

    name = "cap"
    labels = ("SPACE", "UPPER", "LOWER")
    whitespace_label = "SPACE"

    def annotate(self, doc):
        return [
            (token.idx, token.idx + len(token), "UPPER" if token.text[:1].isupper() else "LOWER")
            for token in doc
            if not token.is_space
        ]


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer, annotator):
    tokenizer = LimeTokenizer.from_tokenizer(bpe_tokenizer, fields=("pos", "ner", Capitalised()))
    tokenizer.annotator.nlp  # noqa: B018 - one load for the module
    return tokenizer


def test_custom_field_in_the_tokenizer(tokenizer):
    assert list(tokenizer.metadata_fields) == ["pos", "ner", "cap"]
    assert tokenizer.metadata_fields["cap"] == ["<pad>", "<unk>", "<special>", "SPACE", "UPPER", "LOWER"]
    text = "Emma met  Harriet"
    encoding = tokenizer(text, return_offsets_mapping=True)
    expected = []
    for start, end in encoding["offset_mapping"]:
        piece = text[start:end]
        if piece.isspace():
            expected.append("SPACE")
        else:
            first = start + len(piece) - len(piece.lstrip())
            word = text[: first + 1].split()[-1]  # the word holding the first non-space character
            expected.append("UPPER" if word[0].isupper() else "LOWER")
    assert [tokenizer.metadata_fields["cap"][i] for i in encoding["cap_ids"]] == expected
    assert set(expected) == {"SPACE", "UPPER", "LOWER"}


def test_custom_field_survives_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"No annotator for the metadata fields \['cap'\]"):
        LimeTokenizer.from_pretrained(tmp_path)("Emma")
    reloaded = LimeTokenizer.from_pretrained(tmp_path, field_annotators=[Capitalised()])
    assert dict(reloaded("Emma met Harriet")) == dict(tokenizer("Emma met Harriet"))
    # Aligning precomputed annotations needs no annotator at all.
    annotation = tokenizer.annotator(["Emma"])[0]
    assert LimeTokenizer.from_pretrained(tmp_path)("Emma", annotations=annotation)["cap_ids"] == [4, 4]


def test_custom_field_through_the_model(tokenizer):
    from lime_hf.modeling_lime import LimeForCausalLM

    config = LimeConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        },
        metadata_fields=tokenizer.metadata_fields,
    )
    torch.manual_seed(0)
    model = LimeForCausalLM(config).eval()
    batch = tokenizer(["Emma met Harriet.", "she smiled"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        flipped = {
            **batch,
            "cap_ids": torch.where(batch["cap_ids"] > 3, 9 - batch["cap_ids"], batch["cap_ids"]),
        }
        changed = model(**flipped).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    # The model embeds the custom field without any model code knowing it: other tags, other logits.
    assert not torch.allclose(logits, changed)
