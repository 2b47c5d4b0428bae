"""lm-eval's own machinery on a local cloze task: the `lime` model's loglikelihoods equal a hand computation."""

import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from lime_hf import LimeConfig, LimeForCausalLM  # noqa: E402
from lime_hf.integrations.lm_eval import LimeLM  # noqa: E402


@pytest.mark.slow
def test_loglikelihood_matches_hand_computation(tmp_path, lime_offsets, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    text_config = dict(model_type="llama", vocab_size=len(lime_offsets), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LimeForCausalLM(LimeConfig(text_config=text_config)).eval()
    with torch.no_grad():
        for table in model.metadata_embeddings.parameters():
            table.normal_()  # retrofitted tables start at zero; make them matter
    model.save_pretrained(tmp_path / "m")
    lime_offsets.save_pretrained(tmp_path / "m")
    lm = LimeLM(pretrained=str(tmp_path / "m"), batch_size=1, device="cpu")
    request = Instance("loglikelihood", doc={}, arguments=("Anne Elliot was a", " woman"), idx=0)
    (got,) = lm.loglikelihood([request])
    ids = lm.tok_encode("Anne Elliot was a woman")
    context_len = len(lm.tok_encode("Anne Elliot was a"))
    tags = lm.causal_tags(torch.tensor([ids]))
    assert all((ids >= 3).any() for ids in tags.values())  # real labels, not unknown
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits
        logits = model(torch.tensor([ids]), **tags).logits.log_softmax(-1)[0]
    assert not torch.allclose(plain.log_softmax(-1)[0], logits)  # the tags matter
    expected = sum(logits[i - 1, ids[i]].item() for i in range(context_len, len(ids)))
    assert math.isclose(got[0], expected, rel_tol=1e-4)
