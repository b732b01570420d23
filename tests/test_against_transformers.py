"""Live differential tests against transformers (dev-only: `python -m pytest -m torch`).

Random tiny configs with every feature switched on or off at random; the same weights go through
transformers 5.23 (eager, float32) and gemma2np; logits, hidden states, loss and greedy tokens must
agree. The committed goldens (tests/test_goldens.py) cover the same ground without torch.
"""

import copy
from pathlib import Path

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


def _pair(kw, seed, tmp_path):
    """The same random weights in transformers (eager, float32) and in gemma2np."""
    import torch
    import transformers

    hf_cfg = transformers.Gemma2Config(**copy.deepcopy(kw))
    torch.manual_seed(seed)
    hf = transformers.Gemma2ForCausalLM._from_config(copy.deepcopy(hf_cfg), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.5 if "norm" in name else 0.3)
    hf.save_pretrained(tmp_path)
    return hf, gemma2np.Gemma2ForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("seed", range(40))
def test_random_config_matches_transformers(seed, tmp_path):
    import torch

    kw = _random_case(seed)
    hf, ours = _pair(kw, seed, tmp_path)

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


# ---------------------------------------------------------------------------- generate options


def _padded_batch(rng, vocab):
    B, T = 2, int(rng.integers(3, 12))
    ids = rng.integers(3, vocab, size=(B, T))
    mask = np.ones((B, T), np.int64)
    pads = int(rng.integers(0, T - 1))
    mask[1, :pads] = 0
    ids[1, :pads] = 0
    return ids, mask


@pytest.mark.parametrize("seed", range(16))
def test_generate_options_match_transformers(seed, tmp_path):
    """no_repeat_ngram_size (greedy tokens), num_return_sequences (sequences), the whole processor chain in
    transformers' order (the first step's processed scores: repetition penalty, no-repeat n-grams, temperature,
    top-k, top-p, min-p), and the greedy + num_return_sequences refusal, against transformers' generate."""
    import torch

    kw = _random_case(seed)
    hf, ours = _pair(kw, seed, tmp_path)
    rng = np.random.default_rng(1000 + seed)
    ids, mask = _padded_batch(rng, kw["vocab_size"])
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
    n = int(rng.integers(4, 16))

    ngram = int(rng.integers(1, 4))
    with torch.no_grad():
        want = hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=n, do_sample=False,
                           no_repeat_ngram_size=ngram).numpy()
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, no_repeat_ngram_size=ngram)
    np.testing.assert_array_equal(got, want)

    # num_return_sequences: the expansion (rows repeated in place), deterministic through top_k=1
    with torch.no_grad():
        want = hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=n, do_sample=True, top_k=1,
                           num_return_sequences=3).numpy()
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=True, top_k=1, num_return_sequences=3)
    np.testing.assert_array_equal(got, want)

    # the first step's scores after every processor (they depend on the prompt only, not on any draw)
    opts = dict(do_sample=True, temperature=float(rng.choice([0.6, 1.0, 1.7])), top_k=int(rng.choice([0, 5, 20])),
                top_p=float(rng.choice([0.7, 0.95, 1.0])), min_p=float(rng.choice([0.02, 0.1, 0.3])),
                repetition_penalty=float(rng.choice([1.0, 1.3])), no_repeat_ngram_size=int(rng.integers(0, 3)),
                max_new_tokens=1, num_return_sequences=2)
    with torch.no_grad():
        want = hf.generate(input_ids=t_ids, attention_mask=t_mask, return_dict_in_generate=True, output_scores=True,
                           **opts).scores[0].numpy()
    got = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, seed=0,
                        **opts).scores[0]
    assert got.shape == want.shape == (4, kw["vocab_size"])
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=str(opts))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-4, atol=1e-4)

    with pytest.raises(ValueError, match="num_return_sequences"):
        hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=2, do_sample=False, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, num_return_sequences=2)


@pytest.mark.parametrize("seed", range(6))
def test_stop_strings_match_transformers(seed, tmp_path):
    """generate(stop_strings=..., tokenizer=...) with the test tokenizer: greedy tokens identical to transformers',
    for a stop string cut out of the free continuation (so it is hit, often across token boundaries), in a
    padded batch with and without an eos criterion."""
    import torch
    from transformers import AutoTokenizer

    from gemma2np.generation import StopStringCriteria

    tok_dir = Path(__file__).resolve().parent / "data" / "tokenizer"
    hf_tok, tok = AutoTokenizer.from_pretrained(tok_dir), gemma2np.GemmaTokenizer.from_pretrained(tok_dir)
    kw = {**_random_case(seed), "vocab_size": len(tok)}
    hf, ours = _pair(kw, seed, tmp_path)
    rng = np.random.default_rng(2000 + seed)
    ids, mask = _padded_batch(rng, len(tok))
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    text = tok.decode(free[int(rng.integers(2)), ids.shape[1]:])
    a = int(rng.integers(0, max(len(text) - 4, 1)))
    stops = [text[a:a + int(rng.integers(1, 5))] or "a", "never-generated-xyz"]
    for eos in ([], [1]):
        with torch.no_grad():
            want = hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=20, do_sample=False,
                               eos_token_id=eos or None, pad_token_id=0, stop_strings=stops,
                               tokenizer=hf_tok).numpy()
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                            pad_token_id=0, stop_strings=stops, tokenizer=tok)
        np.testing.assert_array_equal(got, want, err_msg=repr(stops))
        # the case bites: some row does meet a stop string while generating
        crit = StopStringCriteria(tok, stops)
        assert any(crit(got[:, :t], None).any() for t in range(ids.shape[1] + 1, got.shape[1] + 1))


def test_stop_string_token_table_matches_transformers():
    """Our per-token bytes are transformers' StopStringCriteria.clean_tokenizer_vocab for Gemma's tokenizer."""
    from transformers import AutoTokenizer
    from transformers.generation.stopping_criteria import StopStringCriteria

    from gemma2np.generation.stopping_criteria import token_byte_strings

    tok_dir = Path(__file__).resolve().parent / "data" / "tokenizer"
    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    mode = StopStringCriteria._get_stop_string_matching_mode(hf_tok)
    assert mode == "byte_fallback"
    pieces, idx = StopStringCriteria.clean_tokenizer_vocab(hf_tok, stop_string_matching_mode=mode)
    table = token_byte_strings(gemma2np.GemmaTokenizer.from_pretrained(tok_dir))
    assert len(table) == len(pieces)
    assert all(table[i] == p for p, i in zip(pieces, idx))
