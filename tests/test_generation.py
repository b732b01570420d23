"""gemma2np.generation: stopping, lengths, padding, streaming, sampling and the logits processors.

Greedy equality with transformers is in test_generation_goldens.py; the processors are compared to
transformers' own on random logits in the @pytest.mark.torch test at the end.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from gemma2np import Gemma2Config, Gemma2ForCausalLM
from gemma2np.generation import (
    GenerationConfig,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TextStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
    _sample_rows,
    generate,
)

TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "tokenizer"


def _model(eos=None, pad=0, vocab=61, window=3, seed=0):
    cfg = Gemma2Config(
        vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=window, max_position_embeddings=64,
        query_pre_attn_scalar=8, initializer_range=0.4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        eos_token_id=eos, pad_token_id=pad, bos_token_id=2,
    )
    return Gemma2ForCausalLM.from_config(cfg, seed=seed)


@pytest.fixture(scope="module")
def model():
    return _model()


PROMPT = np.array([[2, 10, 11, 12, 13]])


# ---------------------------------------------------------------------------- lengths and stopping


def test_greedy_lengths(model):
    out = model.generate(PROMPT, max_new_tokens=7)
    assert out.shape == (1, 12) and out.dtype == np.int64
    np.testing.assert_array_equal(out[:, :5], PROMPT)
    assert model.generate(PROMPT, max_length=9).shape == (1, 9)
    with pytest.warns(UserWarning, match="max_new_tokens takes precedence"):
        assert model.generate(PROMPT, max_length=9, max_new_tokens=3).shape == (1, 8)
    assert model.generate(PROMPT).shape == (1, 25)  # transformers' default: 20 new tokens
    with pytest.raises(ValueError, match="input length is 5 tokens but max_length is 5"):
        model.generate(PROMPT, max_length=5)


def test_default_max_length_capped_at_context(model):
    prompt = np.full((1, 50), 7)
    assert model.generate(prompt).shape == (1, 64)  # 50 + 20 capped at max_position_embeddings = 64


def test_use_cache_false_matches_cache(model):
    ids = np.array([[0, 0, 2, 5, 6], [2, 9, 8, 7, 6]])
    mask = (ids != 0).astype(np.int64)
    a = model.generate(ids, attention_mask=mask, max_new_tokens=9)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=9, use_cache=False)
    np.testing.assert_array_equal(a, b)


def test_left_padded_batch_equals_rows_alone(model):
    """position_ids = cumsum(mask) - 1 makes a left-padded row generate what it generates alone."""
    rows = [[2, 5, 6], [2, 9, 8, 7, 6, 5], [2, 4]]
    T = max(map(len, rows))
    ids = np.array([[0] * (T - len(r)) + r for r in rows])
    mask = (ids != 0).astype(np.int64)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    for b, r in enumerate(rows):
        alone = model.generate(np.array([r]), max_new_tokens=10)
        np.testing.assert_array_equal(batch[b, T:], alone[0, len(r):])
    # the mask is inferred from pad tokens when not given (pad 0 is not an eos id)
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=10), batch)


def _greedy_tokens(model, prompt, n):
    return model.generate(prompt, max_new_tokens=n, eos_token_id=[])[:, prompt.shape[1]:]


def test_eos_list_stops_rows_and_pads(model):
    prompt = np.array([[2, 10, 11, 12, 13], [2, 30, 31, 32, 33]])
    free = _greedy_tokens(model, prompt, 12)
    # an eos list: row 0 stops at the first occurrence of its 3rd token, row 1 at the first of its 4th
    e0, e1 = int(free[0, 2]), int(free[1, 3])
    out = model.generate(prompt, max_new_tokens=12, eos_token_id=[e0, e1], pad_token_id=59)
    new = out[:, 5:]
    for b in range(2):
        stop = next(i for i, t in enumerate(free[b]) if t in (e0, e1))
        np.testing.assert_array_equal(new[b, :stop + 1], free[b, :stop + 1])  # eos itself is kept
        assert (new[b, stop + 1:] == 59).all()  # then padding
    # all rows finished -> stops early
    assert out.shape[1] == 5 + max(next(i for i, t in enumerate(free[b]) if t in (e0, e1)) for b in range(2)) + 1
    # a single int works too, and pad falls back to the first eos id when unset
    single = model.generate(prompt[:1], max_new_tokens=12, eos_token_id=e0, pad_token_id=None)
    assert single[0, -1] == e0


def test_eos_from_config_and_generation_config_json(tmp_path):
    m = _model(eos=None)
    free = _greedy_tokens(m, PROMPT, 8)
    e = int(free[0, 1])
    # from config.json
    m2 = _model(eos=[e, 1])
    out = m2.generate(PROMPT, max_new_tokens=8)
    assert out[0, -1] == e and out.shape[1] <= 5 + 2
    # from generation_config.json next to the checkpoint, taking precedence over config.json
    m.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": [1, {e}], "pad_token_id": 0}}')
    loaded = Gemma2ForCausalLM.from_pretrained(tmp_path)
    out = loaded.generate(PROMPT, max_new_tokens=8)
    assert out[0, -1] == e
    assert loaded.generation_config.eos_token_id == [1, e]
    # an explicit argument beats both; like transformers, an explicit None (or []) means "no eos"
    assert loaded.generate(PROMPT, max_new_tokens=8, eos_token_id=[]).shape == (1, 13)
    assert loaded.generate(PROMPT, max_new_tokens=8, eos_token_id=None).shape == (1, 13)


def test_min_new_tokens_blocks_eos(model):
    free = _greedy_tokens(model, PROMPT, 10)
    e = int(free[0, 0])  # the very first greedy token
    assert model.generate(PROMPT, max_new_tokens=10, eos_token_id=e).shape[1] == 6
    out = model.generate(PROMPT, max_new_tokens=10, eos_token_id=e, min_new_tokens=4)
    assert e not in out[0, 5:9].tolist()
    out = model.generate(PROMPT, max_new_tokens=10, eos_token_id=e, min_length=8)
    assert e not in out[0, 5:8].tolist()


def test_stopping_criteria_callable(model):
    out = model.generate(PROMPT, max_new_tokens=10, stopping_criteria=[lambda ids, s: ids.shape[1] >= 8])
    assert out.shape == (1, 8)


# ---------------------------------------------------------------------------- streaming


class _Recorder:
    def __init__(self):
        self.calls, self.ended = [], 0

    def put(self, value):
        self.calls.append(np.array(value))

    def end(self):
        self.ended += 1


def test_streamer_receives_prompt_then_every_token(model):
    ids = np.array([[0, 2, 5, 6], [2, 9, 8, 7]])
    rec = _Recorder()
    out = model.generate(ids, max_new_tokens=6, streamer=rec)
    np.testing.assert_array_equal(rec.calls[0], ids)
    assert len(rec.calls) == 1 + 6 and rec.ended == 1
    np.testing.assert_array_equal(np.stack(rec.calls[1:], axis=1), out[:, 4:])
    got = []
    out2 = model.generate(ids, max_new_tokens=6, streamer=got.append)
    assert len(got) == 6 and all(g.shape == (2,) for g in got)
    np.testing.assert_array_equal(np.stack(got, axis=1), out2[:, 4:])


def test_text_streamer_prints_the_decoded_new_text():
    pytest.importorskip("sentencepiece")
    from gemma2np import GemmaTokenizer

    tok = GemmaTokenizer.from_pretrained(TOKENIZER_DIR)
    m = _model(vocab=len(tok))
    prompt = np.array([tok("To be, or not")["input_ids"]])
    buf = io.StringIO()
    out = m.generate(prompt, max_new_tokens=15, streamer=TextStreamer(tok, skip_prompt=True, file=buf), eos_token_id=[])
    assert buf.getvalue() == tok.decode(out[0, prompt.shape[1]:]) + "\n"
    buf = io.StringIO()
    m.generate(prompt, max_new_tokens=3, streamer=TextStreamer(tok, file=buf), eos_token_id=[])
    assert buf.getvalue().startswith(tok.decode(prompt[0]))
    with pytest.raises(ValueError, match="batch size 1"):
        m.generate(np.repeat(prompt, 2, 0), max_new_tokens=2, streamer=TextStreamer(tok))


# ---------------------------------------------------------------------------- sampling


def test_sampling_reproducible(model):
    kw = dict(max_new_tokens=12, do_sample=True, top_k=0, temperature=1.5)
    a = model.generate(PROMPT, seed=123, **kw)
    np.testing.assert_array_equal(a, model.generate(PROMPT, seed=123, **kw))
    np.testing.assert_array_equal(a, model.generate(PROMPT, generator=np.random.default_rng(123), **kw))
    others = [model.generate(PROMPT, seed=s, **kw) for s in range(5)]
    assert any(not np.array_equal(a, o) for o in others)
    # top_k=1 sampling is greedy
    np.testing.assert_array_equal(model.generate(PROMPT, max_new_tokens=8, do_sample=True, top_k=1, seed=0),
                                  model.generate(PROMPT, max_new_tokens=8))


def test_sample_rows_follows_softmax():
    rng = np.random.default_rng(0)
    scores = np.array([[0.0, 1.0, 2.0, -np.inf, 0.5]], dtype=np.float32)
    p = np.exp(scores[0].astype(np.float64) - 2.0)
    p /= p.sum()
    n = 20000
    draws = np.array([_sample_rows(scores, rng)[0] for _ in range(n)])
    freq = np.bincount(draws, minlength=5) / n
    assert freq[3] == 0  # -inf is never drawn
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / n).max())
    with pytest.raises(ValueError, match="every token was filtered out"):
        _sample_rows(np.full((1, 3), -np.inf, np.float32), rng)


@pytest.mark.parametrize("kw,match", [
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, temperature=0.0), "strictly positive when do_sample"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(do_sample=True, top_k=2.5), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(eos_token_id="x"), "eos_token_id"),
])
def test_invalid_settings(model, kw, match):
    with pytest.raises(ValueError, match=match):
        model.generate(PROMPT, **{"max_new_tokens": 2, **kw})


def test_bad_arguments(model):
    with pytest.raises(TypeError, match="num_beams"):
        model.generate(PROMPT, num_beams=2)
    with pytest.raises(ValueError, match="either seed or generator"):
        model.generate(PROMPT, seed=1, generator=np.random.default_rng())
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.generate(PROMPT, attention_mask=np.ones((1, 3)))
    with pytest.raises(ValueError, match="integer array"):
        model.generate(np.array([[1.5, 2.0]]))


def test_no_input_ids_starts_from_bos(model):
    out = model.generate(max_new_tokens=3)
    assert out.shape == (1, 4) and out[0, 0] == 2


def test_return_dict_in_generate(model):
    out = model.generate(PROMPT, max_new_tokens=4, return_dict_in_generate=True, output_scores=True,
                         output_logits=True)
    assert out.sequences.shape == (1, 9) and len(out.scores) == 4 and len(out.logits) == 4
    np.testing.assert_array_equal(np.argmax(np.stack(out.scores), -1)[:, 0], out.sequences[0, 5:])


def test_generation_config_argument(model):
    gc = GenerationConfig(max_new_tokens=3)
    assert generate(model, PROMPT, generation_config=gc).shape == (1, 8)
    assert generate(model, PROMPT, generation_config=gc, max_new_tokens=4).shape == (1, 9)


def test_user_logits_processor_runs(model):
    ban = lambda ids, s: np.where(np.arange(s.shape[-1]) == 7, s, -np.inf).astype(s.dtype)  # noqa: E731
    out = model.generate(PROMPT, max_new_tokens=4, logits_processor=[ban])
    assert (out[0, 5:] == 7).all()


# ---------------------------------------------------------------------------- processors vs closed forms


def test_processors_closed_forms():
    s = np.array([[2.0, -1.0, 0.5, 3.0, -2.0]], dtype=np.float32)
    ids = np.array([[0, 1, 1]])
    # repetition penalty: seen ids 0 and 1 (once each, even if repeated): positive / p, negative * p
    got = RepetitionPenaltyLogitsProcessor(2.0)(ids, s)
    np.testing.assert_array_equal(got, [[1.0, -2.0, 0.5, 3.0, -2.0]])
    got = RepetitionPenaltyLogitsProcessor(2.0, prompt_ignore_length=np.array([1]))(ids, s)  # id 0 ignored
    np.testing.assert_array_equal(got, [[2.0, -2.0, 0.5, 3.0, -2.0]])
    # temperature
    np.testing.assert_allclose(TemperatureLogitsWarper(0.5)(ids, s), s * 2)
    # top-k: keep the 2 largest
    got = TopKLogitsWarper(2)(ids, s)
    assert np.isfinite(got).tolist() == [[True, False, False, True, False]]
    # top-p: p = softmax(s); keep the smallest top set with mass >= top_p
    p = np.exp(s[0] - s.max())
    p /= p.sum()
    order = np.argsort(-p)
    for top_p in (0.1, 0.6, 0.9, 0.99, 1.0):
        n_keep = int(np.searchsorted(np.cumsum(p[order]), top_p - 1e-7) + 1)
        keep = np.zeros(5, bool)
        keep[order[:n_keep]] = True
        got = TopPLogitsWarper(top_p)(ids, s)
        assert np.isfinite(got[0]).tolist() == keep.tolist(), top_p
        np.testing.assert_array_equal(got[0, keep], s[0, keep])
    # min length / min new tokens: eos -inf only while too short
    assert np.isneginf(MinLengthLogitsProcessor(4, [1, 3])(ids, s)[0, [1, 3]]).all()
    np.testing.assert_array_equal(MinLengthLogitsProcessor(3, [1, 3])(ids, s), s)
    assert np.isneginf(MinNewTokensLengthLogitsProcessor(2, 2, 1)(ids, s)[0, 1])
    np.testing.assert_array_equal(MinNewTokensLengthLogitsProcessor(1, 2, 1)(ids, s), s)
    # the list applies in order
    lst = LogitsProcessorList([TemperatureLogitsWarper(2.0), TopKLogitsWarper(1)])
    assert np.isfinite(lst(ids, s)).sum() == 1


# ---------------------------------------------------------------------------- vs transformers


@pytest.mark.torch
@pytest.mark.parametrize("seed", range(4))
def test_processors_match_transformers(seed):
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(seed)
    B, V = 3, 97
    scores = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    ids = rng.integers(0, V, size=(B, 12))
    ign = np.array([0, 3, 5])
    cases = [
        (RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=ign),
         lp.RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=torch.from_numpy(ign))),
        (RepetitionPenaltyLogitsProcessor(0.7), lp.RepetitionPenaltyLogitsProcessor(0.7)),
        (MinLengthLogitsProcessor(13, [1, 5]), lp.MinLengthLogitsProcessor(13, [1, 5])),
        (MinNewTokensLengthLogitsProcessor(4, 9, [2]), lp.MinNewTokensLengthLogitsProcessor(4, 9, [2])),
        (TemperatureLogitsWarper(0.7), lp.TemperatureLogitsWarper(0.7)),
        (TopKLogitsWarper(10), lp.TopKLogitsWarper(10)),
        (TopPLogitsWarper(0.8), lp.TopPLogitsWarper(0.8)),
        (TopPLogitsWarper(0.3), lp.TopPLogitsWarper(0.3)),
    ]
    for ours, theirs in cases:
        want = theirs(torch.from_numpy(ids), torch.from_numpy(scores.copy())).numpy()
        got = ours(ids, scores)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=type(ours).__name__)
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=1e-6, atol=0, err_msg=type(ours).__name__)
    # the sampling chain in transformers' order
    ours = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.9),
                                TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
    theirs = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.9),
                                     lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.9)])
    want = theirs(torch.from_numpy(ids), torch.from_numpy(scores.copy())).numpy()
    got = ours(ids, scores)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))


@pytest.mark.torch
@pytest.mark.parametrize("case", ["causal_gqa", "generate_eos_list"])
@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=12, repetition_penalty=1.5),
    dict(max_new_tokens=12, repetition_penalty=0.8, min_new_tokens=5),
    dict(max_length=14),
    dict(max_new_tokens=10, do_sample=True, top_k=1, temperature=0.7),  # sampling reduced to argmax
    dict(max_new_tokens=12, eos_token_id=None),  # an explicit None turns eos stopping off
])
def test_greedy_variants_match_transformers(case, kw):
    """Deterministic settings beyond the goldens (repetition penalty with left padding, min_new_tokens with an eos
    list, max_length, top_k=1 sampling), token for token against transformers' generate on the golden models."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = Path(__file__).resolve().parent.parent / "reference_outputs" / case
    with np.load(d / "golden.npz") as z:
        ids, mask = z["gen.input_ids"], z["gen.attention_mask"]
    hf = transformers.Gemma2ForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                           **{"do_sample": False, **kw}).numpy()
    got = Gemma2ForCausalLM.from_pretrained(d).generate(ids, attention_mask=mask, seed=0, **kw)
    np.testing.assert_array_equal(got, want)


def test_explicit_none_disables_like_transformers(model):
    """transformers treats generate(top_k=None) as "no top-k" (not the default 50): same here."""
    kw = dict(max_new_tokens=6, do_sample=True, seed=3)
    np.testing.assert_array_equal(model.generate(PROMPT, top_k=None, **kw), model.generate(PROMPT, top_k=0, **kw))
    np.testing.assert_array_equal(model.generate(PROMPT, temperature=None, repetition_penalty=None, top_p=None, **kw),
                                  model.generate(PROMPT, **kw))
