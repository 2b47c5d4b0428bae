"""Meta-tokens and meta-attention: the mask, the positional variants, the loss, the cache, save/load, placement."""

import copy

import pytest
import torch
from tiny_models import VOCAB_SIZE, enable_checkpointing, random_tags, run_without_lime_hf, tiny_lime
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from lime_hf import LimeConfig, LimeForCausalLM, LimeModel
from lime_hf.meta_attention import _ZEROED_POSITIONS, MetaAttentionState
from lime_hf.meta_tokens import MetaTokenPlacement, place_meta_tokens
from lime_hf.metadata_tracker import RowRecord

META = VOCAB_SIZE - 1  # the last id of the tiny vocabulary is the meta-token
ARCHS = ["llama", "gpt2"]


def meta_lime(arch: str, seed: int = 0, **kwargs) -> LimeForCausalLM:
    model = tiny_lime(arch, seed=seed, meta_token_ids=[META], **kwargs)
    model.generation_config.pad_token_id = 0
    return model


def plain_with_weights_of(model: LimeForCausalLM) -> LimeForCausalLM:
    """The same LIME model without meta-attention (`meta_token_ids=[]`), sharing every other weight."""
    plain = tiny_lime(model.config.text_config.model_type, meta_token_ids=[])
    unexpected = plain.load_state_dict(model.state_dict(), strict=False).unexpected_keys
    assert unexpected and all(key.startswith("meta_attention.") for key in unexpected)
    return plain


def ids_with_meta(shape=(2, 12), seed=0, meta=((0, 3), (0, 7), (1, 5))) -> torch.LongTensor:
    ids = torch.randint(3, META, shape, generator=torch.Generator().manual_seed(seed))
    for row, position in meta:
        ids[row, position] = META
    return ids


def first_meta(ids: torch.LongTensor) -> list[int]:
    return [int((row == META).nonzero()[0]) for row in ids]


def test_the_sublayer_attends_causally_among_meta_tokens_only():
    sublayer = meta_lime("llama").meta_attention.layers[0]
    is_meta = torch.zeros(2, 10, dtype=torch.bool)
    is_meta[0, [2, 5, 8]] = True
    is_meta[1, [4]] = True
    state = MetaAttentionState.build(is_meta, None, num_layers=2)
    assert state.mask.shape == (2, 1, 3, 3)  # k x k, not a dense L x L mask
    hidden = torch.randn(2, 10, 32)
    out = sublayer(hidden, state)
    assert torch.equal(out[~is_meta], hidden[~is_meta])  # non-meta positions bit for bit
    assert not torch.equal(out[is_meta], hidden[is_meta])
    assert torch.isfinite(out).all()

    later = hidden.clone()
    later[0, 5] += 1.0  # the second meta-token of row 0
    changed = sublayer(later, state)
    assert torch.equal(changed[0, 2], out[0, 2])  # an earlier meta-token does not see it
    assert not torch.equal(changed[0, 8], out[0, 8])  # a later one does
    assert torch.equal(changed[1], out[1])

    ordinary = hidden.clone()
    ordinary[0, 3] += 1.0  # a non-meta token: no meta-token reads it
    assert torch.equal(sublayer(ordinary, state)[is_meta], out[is_meta])
    assert MetaAttentionState.build(torch.zeros(2, 10, dtype=torch.bool), None, 2) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_inside_the_model_non_meta_states_pass_through_the_sublayer(arch):
    model = meta_lime(arch)
    ids = ids_with_meta()
    layer = (
        model.language_model.base_model.layers[1] if arch == "llama" else model.language_model.base_model.h[1]
    )
    seen = {}
    before = layer.register_forward_hook(lambda m, a, o: seen.update(before=o), prepend=True)
    after = layer.register_forward_hook(lambda m, a, o: seen.update(after=o))
    sublayer = model.meta_attention.layers[1]
    masks = sublayer.register_forward_pre_hook(lambda m, args: seen.update(mask=args[1].mask.shape))
    model(input_ids=ids)
    before.remove(), after.remove(), masks.remove()
    assert seen["mask"] == (2, 1, 2, 2)  # 2 and 1 meta-tokens: a 2 x 2 mask, not 12 x 12
    is_meta = ids == META
    assert torch.equal(seen["after"][~is_meta], seen["before"][~is_meta])
    assert not torch.equal(seen["after"][is_meta], seen["before"][is_meta])


def test_a_training_batch_without_meta_tokens_still_reaches_every_sublayer():
    """DDP without `find_unused_parameters`: every sublayer gets a (zero) gradient, and the loss is the plain one."""
    model = meta_lime("llama").train()
    ids = torch.randint(3, META, (2, 10))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    sublayer_grads = [p.grad for p in model.meta_attention.parameters()]
    assert all(grad is not None and not grad.any() for grad in sublayer_grads)
    plain = plain_with_weights_of(model).train()
    assert torch.equal(out.logits, plain(input_ids=ids, labels=ids).logits)


@pytest.mark.parametrize("arch", ARCHS + ["qwen2"])
def test_without_meta_tokens_the_model_is_the_plain_one(arch):
    model = meta_lime(arch)
    plain = plain_with_weights_of(model)
    assert plain.meta_attention is None and plain.config.meta_token_ids == []
    assert set(plain.state_dict()) == set(tiny_lime(arch).state_dict())
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == layers * (4 * hidden * hidden + 2 * hidden)  # Q/K/V/O and a LayerNorm per layer
    ids = torch.randint(3, META, (2, 10))
    tags = random_tags(model, (2, 10))
    assert torch.equal(model(input_ids=ids, **tags).logits, plain(input_ids=ids, **tags).logits)
    mixed = ids_with_meta(meta=((0, 4),))  # row 1 has none: it is the plain model's row
    assert torch.equal(model(input_ids=mixed).logits[1], plain(input_ids=mixed).logits[1])
    out, ref = model(input_ids=mixed).logits[0], plain(input_ids=mixed).logits[0]
    assert torch.equal(out[:4], ref[:4]) and not torch.equal(out[4], ref[4])


def test_meta_tokens_alone_need_no_metadata_fields():
    model = meta_lime("gpt2", metadata_fields={})
    assert model.config.metadata_fields == {} and len(model.metadata_embeddings.tables) == 0
    ids = ids_with_meta()
    plain = plain_with_weights_of(model)
    assert model(input_ids=ids).logits.shape == (2, 12, VOCAB_SIZE)
    assert torch.equal(model(input_ids=ids).logits[:, :3], plain(input_ids=ids).logits[:, :3])
    with pytest.raises(ValueError, match=r"`metadata_fields` is empty.*or meta-tokens"):
        LimeConfig(text_config={"model_type": "gpt2", "vocab_size": VOCAB_SIZE}, metadata_fields={})


@pytest.mark.parametrize("arch", ARCHS)
def test_zeroed_positional_encoding_at_meta_tokens(arch):
    model = meta_lime(arch)
    ids = ids_with_meta()
    is_meta = ids == META
    base = model.language_model.base_model
    module = base.rotary_emb if arch == "llama" else base.wpe
    seen = {}
    handle = module.register_forward_hook(lambda m, a, o: seen.update(out=o))  # runs after the zeroing hook
    keep = model(input_ids=ids).logits
    kept = seen["out"]
    model.config.meta_positional = "zero"  # read at each call: a switch at inference
    zero = model(input_ids=ids).logits
    handle.remove()
    assert _ZEROED_POSITIONS.get() is None  # scoped to the call: a direct backbone call sees nothing
    if arch == "llama":
        (cos, sin), (kept_cos, kept_sin) = seen["out"], kept
        assert torch.equal(cos[is_meta], torch.ones_like(cos[is_meta]))
        assert torch.equal(sin[is_meta], torch.zeros_like(sin[is_meta]))
        assert torch.equal(cos[~is_meta], kept_cos.expand_as(cos)[~is_meta])
        assert torch.equal(sin[~is_meta], kept_sin.expand_as(sin)[~is_meta])
    else:
        position_embeds = seen["out"]
        assert torch.equal(position_embeds[is_meta], torch.zeros_like(position_embeds[is_meta]))
        assert torch.equal(position_embeds[~is_meta], kept.expand_as(position_embeds)[~is_meta])
    for row, start in enumerate(first_meta(ids)):
        assert torch.equal(zero[row, :start], keep[row, :start])  # before the first meta-token: identical
        assert not torch.allclose(zero[row, start], keep[row, start])
    rebuilt = meta_lime(arch, meta_positional="zero")  # the same weights, zeroing from the config
    assert torch.equal(rebuilt(input_ids=ids).logits, zero)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_loss_leaves_out_meta_token_targets(arch):
    model = meta_lime(arch)
    ids = ids_with_meta()
    out = model(input_ids=ids, labels=ids)
    logits, targets = out.logits[:, :-1].reshape(-1, VOCAB_SIZE), ids[:, 1:].reshape(-1)
    kept = targets != META
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    assert torch.allclose(out.loss, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(out.loss, torch.nn.functional.cross_entropy(logits, targets))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.meta_attention.parameters())


def test_metadata_tag_heads_and_meta_tokens_in_one_model():
    model = meta_lime("qwen2", tag_head_fields=["pos"])
    ids = ids_with_meta()
    tags = random_tags(model, ids.shape)
    out = model(input_ids=ids, labels=ids, output_hidden_states=True, **tags)
    logits, targets = out.logits[:, :-1].reshape(-1, VOCAB_SIZE), ids[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits[targets != META], targets[targets != META])
    assert torch.allclose(out.lm_loss, expected, atol=1e-6, rtol=0) and "pos" in out.tag_losses
    base = LimeModel(model.config).eval()
    base.load_state_dict(model.state_dict())
    assert torch.equal(base(input_ids=ids, **tags).last_hidden_state, out.last_hidden_state)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = meta_lime("llama").train()
        if checkpointing:
            enable_checkpointing(model)
        ids = ids_with_meta()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.meta_attention.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("positional", ["keep", "zero"])
def test_step_by_step_with_the_cache_equals_one_forward(arch, positional):
    model = meta_lime(arch, meta_positional=positional)
    ids = ids_with_meta(meta=((0, 3), (0, 4), (0, 9), (1, 6)))
    full = model(input_ids=ids, use_cache=False).logits
    out = model(input_ids=ids[:, :5], use_cache=True)
    steps, cache = [out.logits], out.get("cache", out.get("past_key_values"))  # its name since 5.24 / before
    for i in range(5, ids.shape[1]):
        out = model(input_ids=ids[:, i : i + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    layers = model.config.num_hidden_layers
    assert len(cache.layers) == 2 * layers + 1  # the backbone's, which slots are real, the meta keys/values
    assert cache.get_seq_length() == ids.shape[1]
    # Meta slots: 2 in the prefill (row 0), then one at step 6 (row 1) and one at step 9 (row 0).
    assert cache.layers[layers + 1].keys.shape[2] == 4


DECODING = {
    "greedy": dict(do_sample=False),
    "beams": dict(num_beams=3, num_return_sequences=2),
    "sampling": dict(do_sample=True, top_k=20),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("decoding", list(DECODING))
def test_generation_is_the_same_with_and_without_the_cache(arch, decoding):
    model = meta_lime(arch, meta_positional="zero")
    ids = torch.randint(3, META, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2], ids[1, :2] = 0, 0  # left padding
    prompt = place_meta_tokens(ids, META, every=3, attention_mask=mask)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        runs.append(
            model.generate(
                **prompt,
                max_new_tokens=9,
                use_cache=use_cache,
                logits_processor=[MetaTokenPlacement(META, every=3, attention_mask=prompt["attention_mask"])],
                metadata_provider="unknown",
                return_dict_in_generate=True,
                output_scores=True,
                **DECODING[decoding],
            )
        )
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for with_cache, without in zip(runs[0].scores, runs[1].scores, strict=True):
        finite = torch.isfinite(with_cache)
        assert torch.equal(finite, torch.isfinite(without))
        assert torch.allclose(with_cache[finite], without[finite], atol=1e-4)
    # The stride placed in the prompts goes on through the generated tokens of every row, the padded one too
    # (rows of beams and return sequences repeat their prompt's padding).
    sequences = runs[0].sequences
    padding = (prompt["attention_mask"] == 0).sum(dim=1).repeat_interleave(sequences.shape[0] // 2)
    assert padding.tolist()[-1] > 0
    for row, pad in zip(sequences, padding.tolist(), strict=True):
        tokens = row[pad:]
        assert (tokens == META).tolist() == [(p + 1) % 4 == 0 for p in range(len(tokens))]


def test_placement_reads_the_recorded_prompt_of_each_row():
    """Beams and return sequences of prompts with different padding: each row continues its own prompt's stride,
    because `generate` records which prompt each row grew from and binds the placement to that record."""
    model = meta_lime("llama", meta_positional="zero")
    ids = torch.randint(3, META, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3], ids[0, :3] = 0, 0  # the first prompt is the shorter one
    prompt = place_meta_tokens(ids, META, every=2, attention_mask=mask)
    placement = MetaTokenPlacement(META, every=2, attention_mask=prompt["attention_mask"])
    out = model.generate(
        **prompt, max_new_tokens=7, num_beams=2, num_return_sequences=2, logits_processor=[placement]
    )
    assert placement.record is None  # the caller's placement is left unbound
    padding = (prompt["attention_mask"] == 0).sum(dim=1).tolist()
    assert out.shape[0] == 4 and padding[0] > padding[1]
    for row, pad in zip(out, [padding[0]] * 2 + [padding[1]] * 2, strict=True):
        tokens = row[pad:]
        assert (tokens == META).tolist() == [(p + 1) % 3 == 0 for p in range(len(tokens))]
    # The record decides, not the order of the rows: rows recorded as grown from the second prompt take its padding.
    record = RowRecord()
    record.update(torch.tensor([1, 1, 0, 0]))
    rows = torch.ones(4, prompt["input_ids"].shape[1], dtype=torch.long)
    forced = placement.for_rows(record).forced(rows)
    expected = [(rows.shape[1] - padding[origin] + 1) % 3 == 0 for origin in (1, 1, 0, 0)]
    assert forced.tolist() == expected and expected[0] != expected[2]


def after_an_odd_token(row: torch.LongTensor) -> bool:
    return int(row[-1]) != META and int(row[-1]) % 2 == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_beams_with_per_row_meta_tokens_are_the_same_with_and_without_the_cache(arch):
    """A policy puts meta-tokens at different steps in different beams: padded meta slots, reordered each step."""
    model = meta_lime(arch)
    ids = torch.randint(3, META, (2, 5), generator=torch.Generator().manual_seed(3))
    runs = [
        model.generate(
            input_ids=ids,
            max_new_tokens=10,
            num_beams=3,
            num_return_sequences=3,
            use_cache=use_cache,
            logits_processor=[MetaTokenPlacement(META, policy=after_an_odd_token)],
            metadata_provider="unknown",
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    is_meta = runs[0][:, 5:] == META
    assert (is_meta != is_meta[:1]).any()  # the rows have meta-tokens at different steps


def test_placement_by_positions_and_by_policy():
    model = meta_lime("llama")
    ids = torch.randint(3, META, (2, 4), generator=torch.Generator().manual_seed(2))
    at = model.generate(
        input_ids=ids,
        max_new_tokens=6,
        logits_processor=[MetaTokenPlacement(META, positions=(p for p in (5, 8)))],  # any iterable, read once
    )
    assert (at == META).nonzero()[:, 1].tolist() == [5, 8, 5, 8]

    def after_an_even_token(row: torch.LongTensor) -> bool:
        return int(row[-1]) != META and int(row[-1]) % 2 == 0

    by_policy = model.generate(
        input_ids=ids,
        max_new_tokens=8,
        logits_processor=[MetaTokenPlacement(META, policy=after_an_even_token)],
    )
    for row in by_policy:
        for position in range(ids.shape[1], row.shape[0]):
            assert bool(row[position] == META) is after_an_even_token(row[:position])


def test_place_meta_tokens_in_prompts():
    ids = torch.tensor([[0, 0, 11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    tags = {"pos_ids": ids % 7 + 3}
    placed = place_meta_tokens(ids, META, every=3, attention_mask=mask, metadata_ids=tags, pad_token_id=0)
    M = META
    assert placed["input_ids"].tolist() == [
        [0, 0, 0, 11, 12, 13, M, 14, 15],
        [21, 22, 23, M, 24, 25, 26, M, 27],
    ]
    assert placed["attention_mask"].tolist() == [[0, 0, 0] + [1] * 6, [1] * 9]
    assert placed["pos_ids"][1].tolist() == [3, 4, 5, 2, 6, 7, 8, 2, 9]  # 'special' (2) at meta-tokens
    assert placed["pos_ids"][0, :3].tolist() == [0] * 3  # padding
    at = place_meta_tokens(ids[1:], M, positions=[0, 4])
    assert at["input_ids"].tolist() == [[M, 21, 22, 23, M, 24, 25, 26, 27]]
    with pytest.raises(ValueError, match=r"position 12 is beyond row 0, which has 8 tokens"):
        place_meta_tokens(ids[1:], M, positions=[0, 12])


def test_save_load_and_remote_code(tmp_path):
    model = meta_lime("llama", meta_positional="zero")
    ids = ids_with_meta()
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "meta_attention.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert reloaded.config.meta_token_ids == [META] and reloaded.config.meta_positional == "zero"
    assert torch.equal(reloaded(input_ids=ids).logits, expected)
    torch.save({"input_ids": ids, "expected": expected}, tmp_path / "case.pt")
    out = run_without_lime_hf(
        """
        import torch
        from transformers import AutoModelForCausalLM
        case = torch.load("case.pt")
        model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("lime_hf"), type(model).__module__
        assert torch.equal(model(input_ids=case["input_ids"]).logits, case["expected"])
        print("OK", len(model.meta_attention.layers))
        """,
        cwd=tmp_path,
    )
    assert out.strip() == "OK 2"


def test_a_lime_checkpoint_grows_meta_attention_and_keeps_its_logits(tmp_path):
    plain = tiny_lime("llama")
    plain.save_pretrained(tmp_path / "plain")
    grown = LimeForCausalLM.from_pretrained(tmp_path / "plain", meta_token_ids=[META]).eval()
    assert grown.config.meta_token_ids == [META]
    sublayer = grown.meta_attention.layers[0]
    assert sublayer.q_proj.weight.std() > 0 and torch.equal(sublayer.norm.weight, torch.ones(32))
    ids, tags = torch.randint(3, META, (2, 8)), random_tags(plain, (2, 8))
    assert torch.equal(grown(input_ids=ids, **tags).logits, plain(input_ids=ids, **tags).logits)


def test_a_deep_copy_and_a_retrofit_run_their_own_sublayers():
    model = meta_lime("gpt2")
    ids = ids_with_meta()
    expected = model(input_ids=ids).logits
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.meta_attention.layers[0].o_proj.weight.mul_(3.0)
    assert torch.equal(model(input_ids=ids).logits, expected)
    assert not torch.equal(twin(input_ids=ids).logits, expected)

    torch.manual_seed(0)
    backbone = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    ).eval()  # fmt: skip
    retrofit = LimeForCausalLM.from_backbone(backbone, meta_token_ids=[META]).eval()
    assert all(torch.isfinite(p).all() for p in retrofit.meta_attention.parameters())
    plain_ids = torch.randint(3, META, (2, 8))
    assert torch.equal(retrofit(input_ids=plain_ids).logits, backbone(input_ids=plain_ids).logits)
    out, ref = retrofit(input_ids=ids).logits, backbone(input_ids=ids).logits
    assert not torch.allclose(out[0, 3], ref[0, 3])  # the sublayers are hooked into the new backbone


def test_bad_inputs_get_clear_errors():
    text = {"model_type": "llama", "vocab_size": VOCAB_SIZE}
    with pytest.raises(
        ValueError, match=rf"`meta_token_ids` holds {VOCAB_SIZE}, outside the vocabulary of 97"
    ):
        LimeConfig(text_config=text, meta_token_ids=[VOCAB_SIZE])
    with pytest.raises(
        ValueError, match=r"`meta_token_ids` must be a list of token ids \(integers >= 0\), got \[-1\]"
    ):
        LimeConfig(text_config=text, meta_token_ids=[-1])
    with pytest.raises(ValueError, match=r"`meta_positional` must be 'keep' .* or 'zero'"):
        LimeConfig(text_config=text, meta_token_ids=[5], meta_positional="none")
    bloom = {"model_type": "bloom", "vocab_size": VOCAB_SIZE, "hidden_size": 32, "n_layer": 2, "n_head": 4}
    alibi = LimeForCausalLM(
        LimeConfig(text_config=bloom, meta_token_ids=[META])
    ).eval()  # no positional table
    assert alibi(input_ids=ids_with_meta()).logits.shape == (2, 12, VOCAB_SIZE)
    alibi.config.meta_positional = "zero"
    no_zeroing = r"meta_positional='zero' zeroes the rotary .* and this backbone has neither"
    with pytest.raises(ValueError, match=no_zeroing):
        alibi(input_ids=ids_with_meta())
    with pytest.raises(ValueError, match=no_zeroing):
        LimeForCausalLM(LimeConfig(text_config=bloom, meta_token_ids=[META], meta_positional="zero"))
    ids = torch.randint(3, META, (1, 4))
    plain = tiny_lime("llama")
    with pytest.raises(
        ValueError, match=r"meta-token id 96, but this model's meta-tokens are none.*meta_token_ids"
    ):
        plain.generate(input_ids=ids, max_new_tokens=2, logits_processor=[MetaTokenPlacement(META, every=2)])
    model = meta_lime("llama")
    with pytest.raises(ValueError, match=r"meta-token id 95, but this model's meta-tokens are \[96\]"):
        model.generate(input_ids=ids, max_new_tokens=2, logits_processor=[MetaTokenPlacement(95, every=2)])
    with pytest.raises(ValueError, match=r"Give exactly one of `every`, `positions` or `policy`"):
        MetaTokenPlacement(META, every=2, positions=[3])
    with pytest.raises(ValueError, match=r"`every` .* an integer >= 1, got 0"):
        MetaTokenPlacement(META, every=0)
    with pytest.raises(ValueError, match=r"`positions` must be distinct .*, got \[3, 5, 3\]"):
        MetaTokenPlacement(META, positions=[3, 5, 3])
    with pytest.raises(ValueError, match=r"`positions` must be distinct"):
        place_meta_tokens(ids, META, positions=[1, 1])
    with pytest.raises(ValueError, match=r"`attention_mask` has 2 prompt rows, and generation has 3 rows"):
        MetaTokenPlacement(META, every=2, attention_mask=torch.tensor([[0, 1], [1, 1]]))(
            torch.ones(3, 4, dtype=torch.long), torch.zeros(3, VOCAB_SIZE)
        )
    with pytest.raises(ValueError, match=r"Meta-token id 500 is outside the model's vocabulary of 97"):
        MetaTokenPlacement(500, every=2)(ids, torch.zeros(1, VOCAB_SIZE))
    with pytest.raises(
        ValueError, match=r"Assisted and prompt-lookup decoding \(\['assistant_model'\]\) crop"
    ):
        model.generate(input_ids=ids, max_new_tokens=2, assistant_model=meta_lime("llama", seed=1))
    lookup = GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=2)
    with pytest.raises(
        ValueError, match=r"Assisted and prompt-lookup decoding \(\['prompt_lookup_num_tokens'\]\)"
    ):
        model.generate(ids, lookup)  # asked for in the generation config, not as a keyword
    with pytest.raises(ValueError, match=r"extra layers of a `DynamicCache`, and a StaticCache"):
        model.generate(
            input_ids=ids_with_meta()[:1], max_new_tokens=2, cache_implementation="static", do_sample=False
        )
