"""The reference ops (gemma2np/ops.py) against closed forms and explicit loops, in float32 and float64.

The goldens check the composition against transformers; these check each op on its own, including
the activations no golden config uses (mish, relu2, gelu_10, leaky_relu, quick_gelu, ...).
"""

import math

import numpy as np
import pytest

from gemma2np import ops

DTYPES = [np.float32, np.float64]
POINTS = [-7.5, -2.0, -1.0, -0.25, 0.0, 0.3, 1.0, 2.5, 12.0, 20.0]


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _gelu_erf(x):
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# scalar closed forms (float64 math), the formulas of transformers' ACT2FN
CLOSED = {
    "gelu_pytorch_tanh": _gelu_tanh, "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh, "gelu_accurate": _gelu_tanh,
    "gelu": _gelu_erf, "gelu_python": _gelu_erf,
    "gelu_10": lambda x: min(max(_gelu_erf(x), -10.0), 10.0),
    "quick_gelu": lambda x: x * _sig(1.702 * x),
    "relu": lambda x: max(x, 0.0),
    "relu6": lambda x: min(max(x, 0.0), 6.0),
    "relu2": lambda x: max(x, 0.0) ** 2,
    "silu": lambda x: x * _sig(x),
    "swish": lambda x: x * _sig(x),
    "sigmoid": _sig,
    "tanh": math.tanh,
    "linear": lambda x: x,
    "mish": lambda x: x * math.tanh(math.log1p(math.exp(x))),
    "leaky_relu": lambda x: x if x >= 0 else 0.01 * x,
}


def test_every_activation_has_a_closed_form_here():
    assert set(CLOSED) == set(ops.ACT_FNS)


@pytest.mark.parametrize("name", sorted(CLOSED))
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_closed_forms(name, dtype):
    x = np.array(POINTS, dtype)
    got = ops.ACT_FNS[name](x)
    want = np.array([CLOSED[name](float(v)) for v in x])
    assert got.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    # geglu = act(gate) * up
    up = np.linspace(-2, 2, len(POINTS)).astype(dtype)
    np.testing.assert_allclose(ops.geglu(x, up, name), want * up, rtol=tol, atol=tol)


def test_gelu_10_clips_and_relu2_squares():
    x = np.array([-30.0, 30.0, 3.0], np.float64)
    np.testing.assert_array_equal(ops.ACT_FNS["gelu_10"](x), [0.0, 10.0, _gelu_erf(3.0)])
    np.testing.assert_array_equal(ops.ACT_FNS["relu2"](np.array([-3.0, 3.0])), [0.0, 9.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_closed_form(dtype):
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype)
    eps = 1e-6
    out = ops.rms_norm(x, np.zeros(2, dtype), eps)
    assert out.dtype == dtype
    r = math.sqrt(12.5 + eps)
    np.testing.assert_allclose(out, [[3 / r, 4 / r], [0, 0]], rtol=1e-6)
    # Gemma's scale is (1 + w): w = 1 doubles, w = -1 zeroes
    np.testing.assert_allclose(ops.rms_norm(x, np.array([1.0, -1.0], dtype), eps), [[6 / r, 0.0], [0, 0]], rtol=1e-6)


def test_linear_and_embedding_scale():
    x = np.arange(6, dtype=np.float64).reshape(1, 2, 3)
    w = np.array([[1.0, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(ops.linear(x, w), [[[0, 3], [3, 9]]])
    np.testing.assert_array_equal(ops.linear(x, w, np.array([10.0, 20.0])), [[[10, 23], [13, 29]]])
    assert ops.embedding_normalizer(2304) == 48.0 and ops.embedding_normalizer(2304).dtype == np.float32
    np.testing.assert_array_equal(ops.scale_embeddings(np.ones((1, 1, 4), np.float32), 16), 4.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(dtype):
    x = np.array([-1e4, -50.0, -1.0, 0.0, 1e-3, 29.0, 1e4], dtype)
    got = ops.softcap(x, 30.0)
    np.testing.assert_allclose(got, [30 * math.tanh(v / 30) for v in x.astype(np.float64)], rtol=1e-6)
    assert np.all(np.abs(got) <= 30.0) and got[3] == 0.0
    assert ops.softcap(x, None) is x


def test_visible_keys_explicit():
    q, k = np.array([3, 4]), np.arange(6)
    want_causal = np.array([[kk <= qq for kk in k] for qq in q])
    np.testing.assert_array_equal(ops.visible_keys(q, k, None), want_causal)
    want_window = np.array([[qq - 2 < kk <= qq for kk in k] for qq in q])  # a window of 2 keys incl. itself
    np.testing.assert_array_equal(ops.visible_keys(q, k, 2), want_window)


def test_attention_bias_is_finfo_min():
    bias = ops.attention_bias(np.array([1]), np.arange(3), np.array([[True, False, True]]), None, np.float32)
    assert bias.shape == (1, 1, 1, 3)
    np.testing.assert_array_equal(bias[0, 0, 0], [0.0, np.finfo(np.float32).min, np.finfo(np.float32).min])


def test_softmax_and_repeat_kv():
    x = np.array([[1.0, 2.0, 3.0]])
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(ops.softmax(x), [e / e.sum()], rtol=1e-15)
    np.testing.assert_allclose(ops.softmax(x + 1000.0), ops.softmax(x), rtol=1e-15)  # shift-invariant, no overflow
    kv = np.arange(2)[None, :, None, None] * np.ones((1, 2, 1, 1))  # heads [0, 1]
    np.testing.assert_array_equal(ops.repeat_kv(kv, 3)[0, :, 0, 0], [0, 0, 0, 1, 1, 1])  # repeat_interleave order


def _attention_loop(q, k, v, q_pos, k_pos, valid, scaling, cap, window):
    """The definition, one (batch, head, query) at a time, in float64."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    out = np.zeros((B, H, T, D))
    for b in range(B):
        for h in range(H):
            g = h // (H // K)
            for t in range(T):
                vis = [k_pos[j] <= q_pos[t] and (window is None or q_pos[t] - window < k_pos[j]) and valid[b, j]
                       for j in range(S)]
                if not any(vis):  # finfo.min everywhere: the uniform average of all keys
                    out[b, h, t] = v[b, g].mean(axis=0)
                    continue
                s = np.array([cap * math.tanh(float(q[b, h, t] @ k[b, g, j]) * scaling / cap) for j in range(S)])
                s = np.where(vis, s, -np.inf)
                p = np.exp(s - s.max())
                out[b, h, t] = (p / p.sum()) @ v[b, g]
    return out


@pytest.mark.parametrize("window", [None, 1, 3])
def test_attention_against_the_loop(window):
    r = np.random.default_rng(0)
    B, H, K, T, S, D = 2, 4, 2, 3, 6, 5
    q, k, v = (r.standard_normal(s) for s in ((B, H, T, D), (B, K, S, D), (B, K, S, D)))
    q_pos, k_pos = np.arange(3, 6), np.arange(6)
    valid = np.ones((B, S), bool)
    valid[1, :5] = False  # batch 1, query 0 (position 3) sees nothing
    out, probs = ops.attention(q, k, v, q_pos, k_pos, valid, 0.4, 2.0, window, return_probs=True)
    np.testing.assert_allclose(out, _attention_loop(q, k, v, q_pos, k_pos, valid, 0.4, 2.0, window), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(probs, ops.attention_probs(q, k, q_pos, k_pos, valid, 0.4, 2.0, window))
    np.testing.assert_array_equal(ops.attention(q, k, v, q_pos, k_pos, valid, 0.4, 2.0, window), out)


def test_argmax_and_topk():
    x = np.array([[1.0, 3.0, 3.0, -1.0], [np.nan, 1.0, np.nan, 2.0]], np.float32)
    np.testing.assert_array_equal(ops.argmax(x), [1, 0])  # the first maximum; the first NaN
    vals, idx = ops.topk(x[:1], 3)
    np.testing.assert_array_equal(idx, [[1, 2, 0]])
    np.testing.assert_array_equal(vals, [[3, 3, 1]])
    with pytest.raises(ValueError, match="NaN"):
        ops.topk(x, 2)


def test_losses_closed_forms():
    C = 5
    logits = np.zeros((3, C))
    labels = np.array([0, 4, -100])
    assert ops.cross_entropy(logits, labels) == pytest.approx(math.log(C))  # uniform: log C per counted item
    assert ops.cross_entropy(logits, labels, num_items_in_batch=4) == pytest.approx(2 * math.log(C) / 4)
    assert np.isnan(ops.cross_entropy(logits, np.full(3, -100)))
    # causal LM: position t predicts labels[t + 1]; the last position predicts nothing
    lg = np.full((1, 3, C), -1e9)
    lg[0, 0, 2] = lg[0, 1, 4] = 0.0  # certain of the next tokens 2 then 4
    assert ops.causal_lm_loss(lg, np.array([[1, 2, 4]])) == pytest.approx(0.0, abs=1e-12)
    assert ops.mse_loss(np.array([1.0, 3.0]), np.array([0.0, 0.0])) == 5.0
    assert ops.bce_with_logits(np.zeros(4), np.array([0.0, 1.0, 0.0, 1.0])) == pytest.approx(math.log(2))
    x, y = np.array([3.0, -40.0]), np.array([1.0, 0.0])
    want = np.mean([-math.log(_sig(3.0)), -math.log(1 - _sig(-40.0))])
    assert ops.bce_with_logits(x, y) == pytest.approx(want, rel=1e-12)
