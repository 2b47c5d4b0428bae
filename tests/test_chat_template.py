"""LimeTokenizer.apply_chat_template: the base tokenizer's ids, tags per message, the template's tokens special."""

import functools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lime_hf import LimeConfig, LimeForCausalLM, LimeTokenizer
from lime_hf.configuration_lime import SPECIAL_ID
from tests.conftest import AUSTEN, share_annotator

ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# A small ChatML-like template whose assistant turns are marked for `return_assistant_tokens_mask`.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}{{ '<|eos|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim }}{{ '<|eos|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "You answer questions about Jane Austen."},
    {"role": "user", "content": "Where did Emma Woodhouse live?"},
    {"role": "assistant", "content": "She lived at Hartfield, in Highbury."},
]


@functools.cache
def chat_base_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on Emma, with pad/bos/eos and the role markers as special tokens, and a template."""
    text = (AUSTEN / "emma.txt").read_text(encoding="utf-8")[:100_000]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>", *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([line for line in text.splitlines() if line.strip()], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )


def chat_tokenizer(alignment: str, annotator) -> LimeTokenizer:
    return share_annotator(
        LimeTokenizer.from_tokenizer(chat_base_tokenizer(), alignment=alignment), annotator
    )


def labels(tokenizer: LimeTokenizer, field: str, ids: list[int]) -> list[str]:
    return [tokenizer.metadata_fields[field][tag] for tag in ids]


@pytest.fixture(params=["offsets", "pretokenized"])
def tok(request, annotator) -> LimeTokenizer:
    return chat_tokenizer(request.param, annotator)


def test_the_rendered_text_is_the_base_tokenizers(tok):
    base = chat_base_tokenizer()
    for prompt in (False, True):
        assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt) == (
            base.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
        )


def test_offsets_ids_and_assistant_masks_are_the_base_tokenizers(annotator):
    tok, base = chat_tokenizer("offsets", annotator), chat_base_tokenizer()
    for kwargs in ({}, {"add_generation_prompt": True}, {"continue_final_message": True}):
        assert (
            tok.apply_chat_template(CHAT, **kwargs)["input_ids"]
            == base.apply_chat_template(CHAT, **kwargs)["input_ids"]
        )
    ours = tok.apply_chat_template(CHAT, return_assistant_tokens_mask=True)
    theirs = base.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    assert ours["assistant_masks"] == theirs["assistant_masks"] and 1 in ours["assistant_masks"]
    assert tok.apply_chat_template(CHAT, return_dict=False) == theirs["input_ids"]


def test_template_tokens_are_special_and_whole(tok):
    """Role markers and `<|eos|>` stay one token each (as the base tokenizer has them), tagged special like every
    other token the template writes (the newlines); message tokens carry real tags."""
    encoded = tok.apply_chat_template(CHAT, tokenizer_kwargs={"return_offsets_mapping": True})
    tokens = tok.convert_ids_to_tokens(encoded["input_ids"])
    base_tokens = chat_base_tokenizer().convert_ids_to_tokens(
        chat_base_tokenizer().apply_chat_template(CHAT)["input_ids"]
    )
    for special in [*ROLE_TOKENS, "<|eos|>"]:
        assert tokens.count(special) == base_tokens.count(special) > 0
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    message_chars = set()
    for message in CHAT:
        start = rendered.index(message["content"])
        message_chars.update(range(start, start + len(message["content"])))
    for field in tok.metadata_fields:
        for tag, (start, end) in zip(encoded[f"{field}_ids"], encoded["offset_mapping"], strict=True):
            anchor = next((i for i in range(start, end) if not rendered[i].isspace()), start)
            inside = anchor in message_chars
            assert (tag == SPECIAL_ID) != inside, (field, rendered[start:end])
    assert tok.decode(encoded["input_ids"]) == rendered


def test_each_message_is_annotated_on_its_own(annotator):
    """The issue's case: the NER tag of 'Highbury.' does not spill over the role marker after it. In the
    pretokenized alignment a message's tokens and tags are those of the message encoded alone."""
    tok = chat_tokenizer("pretokenized", annotator)
    chat = [{"role": "user", "content": "Emma lived in Highbury."}]
    encoded = tok.apply_chat_template(chat, add_generation_prompt=True)
    tokens = tok.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[-2:] == ["<|assistant|>", "Ċ"]
    # "Highbury" is B-GPE, "." is O, then <|eos|> \n <|assistant|> \n are the template's
    assert labels(tok, "ner", encoded["ner_ids"])[-6:] == ["B-GPE", "O", *["<special>"] * 4]
    encoded = tok.apply_chat_template(CHAT)
    for message in CHAT:
        alone = tok(message["content"])
        start = next(
            i
            for i in range(len(encoded["input_ids"]))
            if encoded["input_ids"][i : i + len(alone["input_ids"])] == alone["input_ids"]
        )
        for field in tok.metadata_fields:
            assert encoded[f"{field}_ids"][start : start + len(alone["input_ids"])] == alone[f"{field}_ids"]


def test_batches_padding_tensors_and_truncation(tok):
    chats = [CHAT, CHAT[1:2]]
    batch = tok.apply_chat_template(
        chats, padding=True, return_tensors="pt", return_assistant_tokens_mask=True
    )
    assert set(batch) == {"input_ids", "attention_mask", "pos_ids", "ner_ids", "assistant_masks"}
    assert all(value.shape == batch["input_ids"].shape for value in batch.values())
    single = tok.apply_chat_template(chats[1])
    length = len(single["input_ids"])
    for key in ("input_ids", "pos_ids", "ner_ids"):  # right padding, tags padded with 0
        assert batch[key][1, :length].tolist() == single[key]
    assert batch["pos_ids"][1, length:].eq(0).all() and batch["assistant_masks"][1].eq(0).all()
    truncated = tok.apply_chat_template(CHAT, truncation=True, max_length=7)
    assert {key: value for key, value in truncated.items()} == {
        key: value[:7] for key, value in tok.apply_chat_template(CHAT).items()
    }


def test_added_tokens_written_in_text_stay_whole(annotator):
    """Outside chats too: `<|eos|>` in a text is one token in the pretokenized alignment, as in the base's."""
    tok, base = chat_tokenizer("pretokenized", annotator), chat_base_tokenizer()
    text = "Emma smiled.<|eos|> Mr. Knightley <|user|>answered."
    encoded = tok(text)
    assert encoded["input_ids"].count(base.convert_tokens_to_ids("<|eos|>")) == 1
    assert encoded["input_ids"].count(base.convert_tokens_to_ids("<|user|>")) == 1
    assert tok.decode(encoded["input_ids"]) == text
    eos = encoded["input_ids"].index(base.convert_tokens_to_ids("<|eos|>"))
    assert encoded["pos_ids"][eos] == SPECIAL_ID and encoded["pos_ids"][eos - 1] != SPECIAL_ID


def test_a_template_that_rewrites_the_content_is_an_error(tok):
    with pytest.raises(ValueError, match="does not write the text of message 0"):
        tok.apply_chat_template(
            CHAT, chat_template="{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
        )
    with pytest.raises(ValueError, match="sanitize_control_tokens"):
        tok.apply_chat_template(CHAT, sanitize_control_tokens=True)


def test_generate_continues_a_tagged_chat_prompt_with_guidance(annotator):
    """A LIME+1 model continues the tagged chat prompt; the guidance tags are what its generated positions read."""
    tok = chat_tokenizer("pretokenized", annotator)
    torch.manual_seed(0)
    model = LimeForCausalLM(
        LimeConfig(
            text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4},
            metadata_shift=1,
        )
    ).eval()  # fmt: skip
    prompt = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_tensors="pt")
    guidance = ["PRP", "VBD", "IN"]
    output = model.generate(
        **prompt,
        guidance={"pos": [guidance]},
        max_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
    )
    length = prompt["input_ids"].shape[1]
    assert output.sequences[0, :length].tolist() == prompt["input_ids"][0].tolist()
    assert labels(tok, "pos", output.metadata_ids["pos_ids"][0, length : length + 3].tolist()) == guidance
    assert output.metadata_ids["pos_ids"][0, :length].tolist() == prompt["pos_ids"][0].tolist()
