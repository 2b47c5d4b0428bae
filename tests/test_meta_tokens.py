"""Meta-tokens in the data: injection (rate, uniform positions, seeds, labels, tags), the collator option, the
tokenizer's special meta-token, bad input."""

import itertools
from collections import Counter

import pytest
import torch
from datasets import Dataset
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from lime_hf import DataCollatorForLime, LimeConfig, LimeForCausalLM, LimeTokenizer
from lime_hf.meta_tokens import add_meta_tokens, inject_meta_tokens, meta_token_count
from tests.conftest import share_annotator
from tests.tiny_models import TINY_TEXT_CONFIGS

META = 99
TEXTS = [
    "Emma Woodhouse, handsome, clever, and rich, lived in Highbury.",
    "She was twenty-one.",
    "Mr. Knightley came.",
]
# Chi-square quantiles at p = 0.999 (upper 0.1 %), by degrees of freedom.
CHI2_999 = {14: 36.123, 21: 46.797}


def chi_square(counts: list[int], total: int) -> float:
    expected = total / len(counts)
    return sum((count - expected) ** 2 / expected for count in counts)


@pytest.fixture
def meta_tokenizer(bpe_tokenizer, annotator) -> tuple[LimeTokenizer, int]:
    """A fresh offsets-mode LimeTokenizer (the session's ones stay untouched) with `<meta>` added."""
    tokenizer = share_annotator(LimeTokenizer.from_tokenizer(bpe_tokenizer, alignment="offsets"), annotator)
    (meta_id,) = add_meta_tokens(tokenizer)
    return tokenizer, meta_id


# round(k n), rounded half up: 512 x 0.1 = 51.2 -> 51, 37 x 0.25 = 9.25 -> 9, 5 x 0.1 = 0.5 -> 1, 1 x 0.5 -> 1
@pytest.mark.parametrize(
    ("length", "fraction", "count"),
    [(10, 0.1, 1), (512, 0.1, 51), (37, 0.25, 9), (5, 0.1, 1), (7, 0.0, 0), (1, 0.5, 1)],
)
def test_injection_rate_is_exact_and_the_tokens_keep_their_order(length, fraction, count):
    ids = torch.arange(length) + META + 1
    out = inject_meta_tokens(ids, META, fraction, seed=0)
    assert meta_token_count(length, fraction) == count
    assert out["input_ids"].shape == (length + count,)
    assert int((out["input_ids"] == META).sum()) == count
    assert torch.equal(out["input_ids"][out["input_ids"] != META], ids)
    assert torch.equal(out["attention_mask"], torch.ones(length + count, dtype=torch.long))


def test_positions_are_uniform_over_positions_and_over_arrangements():
    # 20 tokens at k = 0.1: 2 meta-tokens among 22 positions, each position equally likely (2/22).
    draws = 2000
    hits = torch.zeros(22, dtype=torch.long)
    for seed in range(draws):
        hits += inject_meta_tokens(torch.arange(20), META, 0.1, seed=seed)["input_ids"] == META
    assert chi_square(hits.tolist(), 2 * draws) < CHI2_999[21], hits
    # 4 tokens at k = 0.5: 2 meta-tokens among 6 positions; all 15 arrangements equally likely, none other.
    arrangements = Counter(
        tuple(
            (inject_meta_tokens(torch.arange(4), META, 0.5, seed=seed)["input_ids"] == META)
            .nonzero()
            .flatten()
            .tolist()
        )
        for seed in range(draws)
    )
    assert set(arrangements) == set(itertools.combinations(range(6), 2))
    assert chi_square(list(arrangements.values()), draws) < CHI2_999[14], arrangements


def test_the_seed_reproduces_the_positions_and_a_generator_advances():
    ids = torch.arange(100)
    first, again, other = (inject_meta_tokens(ids, META, seed=seed)["input_ids"] for seed in (1, 1, 2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    generator = torch.Generator().manual_seed(1)
    assert torch.equal(inject_meta_tokens(ids, META, generator=generator)["input_ids"], first)
    assert not torch.equal(inject_meta_tokens(ids, META, generator=generator)["input_ids"], first)


def test_fixed_stride_puts_one_meta_token_after_every_n_tokens():
    out = inject_meta_tokens(torch.arange(25) + META + 1, META, every=10, labels=torch.arange(25))
    assert (out["input_ids"] == META).nonzero().flatten().tolist() == [10, 21]
    assert out["labels"][[10, 21]].tolist() == [-100, -100] and out["input_ids"].shape == (27,)
    assert (
        inject_meta_tokens(torch.arange(20) + META + 1, META, every=10)["input_ids"] == META
    ).nonzero().flatten().tolist() == [10, 21]


def test_labels_are_ignored_and_tags_special_at_meta_positions():
    ids = torch.arange(30) + 3
    out = inject_meta_tokens(ids, META, 0.2, seed=3, labels=ids, metadata={"pos_ids": ids % 7 + 3})
    is_meta = out["input_ids"] == META
    assert int(is_meta.sum()) == 6
    assert (out["labels"][is_meta] == -100).all()
    assert torch.equal(out["labels"][~is_meta], ids)
    assert (out["pos_ids"][is_meta] == 2).all()
    assert torch.equal(out["pos_ids"][~is_meta], ids % 7 + 3)


def test_a_padded_batch_grows_inside_the_real_tokens_and_keeps_its_padding_side():
    pad = 50  # not the default pad id 0: padding added to a row copies the row's own
    rows = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [5, 6, 7, 8, 9, pad, pad, pad, pad, pad]]
    masks = [[1] * 10, [1] * 5 + [0] * 5]
    for side in ("right", "left"):
        ids = torch.tensor(
            rows if side == "right" else [row[5:] + row[:5] if i else row for i, row in enumerate(rows)]
        )
        mask = torch.tensor(masks if side == "right" else [masks[0], masks[1][5:] + masks[1][:5]])
        out = inject_meta_tokens(
            ids, META, 0.2, seed=0, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
        )
        # Row 0: 10 tokens -> 2 meta-tokens; row 1: 5 tokens -> 1 meta-token and 1 more padding token.
        assert out["input_ids"].shape == (2, 12)
        assert (out["input_ids"] == META).sum(dim=1).tolist() == [2, 1]
        assert out["attention_mask"].sum(dim=1).tolist() == [12, 6]
        real = out["attention_mask"][1] == 1
        expected_real = torch.tensor([0] * 6 + [1] * 6) if side == "left" else torch.tensor([1] * 6 + [0] * 6)
        assert torch.equal(out["attention_mask"][1], expected_real)
        assert (out["input_ids"][1][~real] == pad).all() and (out["labels"][1][~real] == -100).all()
        kept = out["input_ids"][1][real]
        assert kept[kept != META].tolist() == [5, 6, 7, 8, 9]


def test_collator_injects_per_feature_reproducibly(meta_tokenizer):
    tokenizer, meta_id = meta_tokenizer
    features = [dict(encoding) for encoding in (tokenizer(text) for text in TEXTS)]
    collate = DataCollatorForLime(tokenizer, meta_token_id=meta_id, meta_fraction=0.1, seed=0)
    batch = collate(features)
    lengths = [len(feature["input_ids"]) for feature in features]
    counts = [meta_token_count(length, 0.1) for length in lengths]
    assert min(counts) >= 1
    grown = [length + count for length, count in zip(lengths, counts, strict=True)]
    assert batch["input_ids"].shape == (3, max(grown))
    is_meta = batch["input_ids"] == meta_id
    assert is_meta.sum(dim=1).tolist() == counts
    assert batch["attention_mask"].sum(dim=1).tolist() == grown
    ignored = is_meta | (batch["attention_mask"] == 0)
    assert (batch["labels"][ignored] == -100).all()
    assert torch.equal(batch["labels"][~ignored], batch["input_ids"][~ignored])
    for field in ("pos", "ner"):
        assert (batch[f"{field}_ids"][is_meta] == 2).all()
        for row, feature in enumerate(features):
            real = (batch["attention_mask"][row] == 1) & ~is_meta[row]
            assert batch[f"{field}_ids"][row][real].tolist() == feature[f"{field}_ids"]
    # The same seed gives the same batches in sequence; the generator advances between batches.
    again = DataCollatorForLime(tokenizer, meta_token_id=meta_id, seed=0)
    assert torch.equal(again(features)["input_ids"], batch["input_ids"])
    assert not torch.equal(collate(features)["input_ids"], batch["input_ids"])
    # Without `meta_token_id` the collator is as before.
    plain = DataCollatorForLime(tokenizer)(features)
    assert plain["input_ids"].shape == (3, max(lengths)) and not (plain["input_ids"] == meta_id).any()


def test_trainer_trains_metadata_and_meta_attention_on_collated_batches(
    meta_tokenizer, bpe_tokenizer, tmp_path
):
    tokenizer, meta_id = meta_tokenizer
    # The recipe for an existing checkpoint: grow its vocabulary to the tokenizer's, then add meta-attention.
    torch.manual_seed(0)
    text_config = {**TINY_TEXT_CONFIGS["llama"], "vocab_size": len(bpe_tokenizer)}
    backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text_config))
    backbone.resize_token_embeddings(len(tokenizer))
    model = LimeForCausalLM.from_backbone(backbone, meta_token_ids=[meta_id])  # pos + ner tables too
    features = [dict(tokenizer(text)) for text in TEXTS * 4]
    collate = DataCollatorForLime(tokenizer, meta_token_id=meta_id, seed=0)

    # The loss is the cross-entropy over every target that is neither a meta-token nor padding.
    batch = collate(features[:3])
    assert (batch["input_ids"] == meta_id).sum() == sum(
        meta_token_count(len(f["input_ids"]), 0.1) for f in features[:3]
    )
    with torch.no_grad():
        output = model.eval()(**batch)
    logits, target = output.logits[:, :-1], batch["labels"][:, 1:]
    keep = target != -100
    assert torch.allclose(output.loss, F.cross_entropy(logits[keep], target[keep]))

    sublayer = model.meta_attention.layers[0]
    before = (
        sublayer.q_proj.weight.detach().clone(),
        model.metadata_embeddings.tables["pos"].weight.detach().clone(),
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
    )
    Trainer(
        model=model.train(), args=args, train_dataset=Dataset.from_list(features), data_collator=collate
    ).train()
    model.cpu()  # the Trainer put it on the machine's accelerator, if any
    assert not torch.equal(sublayer.q_proj.weight, before[0])  # meta-attention learns from the meta-tokens
    assert not torch.equal(model.metadata_embeddings.tables["pos"].weight, before[1])


def test_tokenizer_knows_the_meta_token_as_special(meta_tokenizer, bpe_tokenizer, tmp_path):
    tokenizer, meta_id = meta_tokenizer
    assert meta_id == len(bpe_tokenizer) and len(tokenizer) == len(bpe_tokenizer) + 1
    assert meta_id in tokenizer.all_special_ids
    assert add_meta_tokens(tokenizer) == [meta_id]  # adding it again changes nothing
    assert len(tokenizer) == len(bpe_tokenizer) + 1
    # In text (offsets alignment) it is one token with the special tag in every field.
    encoding = tokenizer("Emma <meta> came.")
    position = encoding["input_ids"].index(meta_id)
    assert encoding["pos_ids"][position] == encoding["ner_ids"][position] == 2
    assert tokenizer.decode(encoding["input_ids"], skip_special_tokens=True) == "Emma  came."
    assert tokenizer.metadata_for_ids([meta_id, *encoding["input_ids"][:2]])["pos"][0] == 2
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is LimeTokenizer
    assert reloaded.convert_tokens_to_ids("<meta>") == meta_id and meta_id in reloaded.all_special_ids
    assert reloaded.convert_ids_to_tokens(meta_id) == "<meta>"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(fraction=1.0), r"`fraction` .* must lie in \[0, 1\), got 1.0"),
        (dict(fraction=-0.1), r"`fraction` .* must lie in \[0, 1\), got -0.1"),
        (dict(meta_token_id=-1), r"`meta_token_id` must be a token id \(an integer >= 0\), got -1"),
        (dict(meta_token_id="<meta>"), r"must be a token id .* got '<meta>'"),
        (dict(vocab_size=99), r"`meta_token_id` 99 is outside the vocabulary of 99 ids \(allowed: 0 to 98\)"),
        (dict(labels=[1, 2]), r"`labels` has shape \(2,\), but `input_ids` has \(4,\)"),
        (dict(attention_mask=[1, 0, 1, 1]), r"real tokens .* must be contiguous"),
        (dict(attention_mask=[1, 2, 1, 1]), r"must hold 0 and 1 only"),
        (
            dict(every=0),
            r"`every` is the number of ordinary tokens between meta-tokens: an integer >= 1, got 0",
        ),
    ],
)
def test_bad_input(kwargs, message):
    arguments = {"input_ids": [3, 4, 5, 6], "meta_token_id": META, **kwargs}
    with pytest.raises(ValueError, match=message):
        inject_meta_tokens(**arguments)


def test_collator_bad_input(meta_tokenizer, bpe_tokenizer):
    tokenizer, meta_id = meta_tokenizer
    with pytest.raises(
        ValueError, match=rf"`meta_token_id` {meta_id + 1} is outside the vocabulary of {meta_id + 1} ids"
    ):
        DataCollatorForLime(tokenizer, meta_token_id=meta_id + 1)
    with pytest.raises(
        ValueError, match=r"`meta_token_id` 300 \('.*'\) is not a special token of the tokenizer"
    ):
        DataCollatorForLime(tokenizer, meta_token_id=300)
    with pytest.raises(ValueError, match=r"`meta_fraction` .* must lie in \[0, 1\), got 1.5"):
        DataCollatorForLime(tokenizer, meta_token_id=meta_id, meta_fraction=1.5)


# ---- Meta-tokens on a trained LIME model (issue 23, item 3) ----------------------------------------------------


def test_from_backbone_adds_meta_tokens_to_a_trained_lime_model(meta_tokenizer, bpe_tokenizer, tmp_path):
    """The documented recipe on a LIME model itself: its tables, heads and settings carry over; meta-attention is new."""
    tokenizer, meta_id = meta_tokenizer
    torch.manual_seed(0)
    text_config = {**TINY_TEXT_CONFIGS["llama"], "vocab_size": len(bpe_tokenizer)}
    trained = LimeForCausalLM(
        LimeConfig(text_config=text_config, metadata_shift=1, tag_head_fields=["pos"])
    ).eval()
    with torch.no_grad():  # as if trained: tables that change the logits
        trained.metadata_embeddings.tables["pos"].weight[3:].normal_()
    batch = tokenizer(TEXTS[:1], return_tensors="pt")
    reference = trained(**batch).logits
    pos_table, head = (
        trained.metadata_embeddings.tables["pos"].weight,
        trained.tag_heads.classifiers["pos"].weight,
    )

    trained.resize_token_embeddings(len(tokenizer))
    model = LimeForCausalLM.from_backbone(trained, meta_token_ids=[meta_id]).eval()

    assert model.config.meta_token_ids == [meta_id] and model.config.metadata_shift == 1
    assert model.config.tag_head_fields == ["pos"] and model.tag_heads.classifiers["pos"].weight is head
    assert model.metadata_embeddings.tables["pos"].weight is pos_table
    assert not any(parameter.is_meta for parameter in model.parameters())
    with torch.no_grad():  # no meta-token in the input: the trained model's logits exactly
        assert torch.equal(model(**batch).logits[..., : len(bpe_tokenizer)], reference)
    placed = inject_meta_tokens(
        batch["input_ids"], meta_id, every=3, metadata={k: batch[k] for k in ("pos_ids", "ner_ids")}
    )
    with torch.no_grad():  # the meta-tokens are read by the new meta-attention
        assert model(**placed).logits.shape[1] == placed["input_ids"].shape[1]
    # The route through a saved folder gives the same model.
    model.save_pretrained(tmp_path)
    assert LimeForCausalLM.from_pretrained(tmp_path).config.meta_token_ids == [meta_id]
    with pytest.raises(ValueError, match="from_backbone on a LIME model keeps its metadata fields"):
        LimeForCausalLM.from_backbone(
            model, metadata_fields={"pos": list(model.config.metadata_fields["pos"])}
        )
