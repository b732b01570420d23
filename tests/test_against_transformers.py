"""Live differential tests against transformers (dev-only: `python -m pytest -m torch`).

Random tiny configs with every feature switched on or off at random; the same weights go through
transformers 5.23 (eager, float32) and gemma2np; logits, hidden states, loss and greedy tokens must
agree. The committed goldens (tests/test_goldens.py) cover the same ground without torch.
"""

import copy

import numpy as np
import pytest

import gemma2np

pytestmark = pytest.mark.torch  # deselected by default (pyproject addopts); run with -m torch


def _random_case(seed):
    rng = np.random.default_rng(seed)
    heads = int(rng.choice([2, 4]))
    kv = int(rng.choice([h for h in (1, 2, 4) if heads % h == 0]))
    layers = int(rng.integers(1, 4))
    kw = dict(vocab_size=int(rng.integers(40, 90)), hidden_size=heads * int(rng.choice([4, 8])),
              intermediate_size=int(rng.integers(8, 40)), num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv, head_dim=int(rng.choice([4, 6, 8])),
              query_pre_attn_scalar=int(rng.choice([5, 16, 64])), sliding_window=int(rng.integers(1, 6)),
              attn_logit_softcapping=float(rng.choice([2.0, 50.0])), final_logit_softcapping=float(rng.choice([1.5, 30.0])),
              attention_bias=bool(rng.integers(2)), tie_word_embeddings=bool(rng.integers(2)),
              max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
              hidden_activation=str(rng.choice(["gelu_pytorch_tanh", "gelu", "silu"])))
    if rng.integers(2):
        kw["layer_types"] = [str(rng.choice(["sliding_attention", "full_attention"])) for _ in range(layers)]
    return kw


@pytest.mark.parametrize("seed", range(40))
def test_random_config_matches_transformers(seed, tmp_path):
    import torch
    import transformers

    kw = _random_case(seed)
    hf_cfg = transformers.Gemma2Config(**copy.deepcopy(kw))
    torch.manual_seed(seed)
    hf = transformers.Gemma2ForCausalLM._from_config(copy.deepcopy(hf_cfg), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.5 if "norm" in name else 0.3)
    hf.save_pretrained(tmp_path)
    ours = gemma2np.Gemma2ForCausalLM.from_pretrained(tmp_path)

    rng = np.random.default_rng(seed)
    B, T = 2, int(rng.integers(3, 14))
    ids = rng.integers(3, kw["vocab_size"], size=(B, T))
    mask = np.ones((B, T), np.int64)
    pads = int(rng.integers(0, T - 1))
    mask[1, :pads] = 0
    ids[1, :pads] = 0
    labels = ids.copy()
    labels[1, :pads] = -100
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
                  output_hidden_states=True)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert np.abs(got.logits - want.logits.numpy()).max() < 1e-4
    assert abs(float(got.loss) - float(want.loss)) < 1e-4
    for a, b in zip(got.hidden_states, want.hidden_states):
        assert np.abs(a - b.numpy()).max() < 1e-4

    n = int(rng.integers(1, 10))
    with torch.no_grad():
        hf_gen = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False).numpy()
    our_gen = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    np.testing.assert_array_equal(np.asarray(our_gen), hf_gen)
