"""The backend protocol (gemma2np/kernels/protocol.py): every op on all three backends.

* the reference backend IS ops (bitwise, float32 and float64);
* the twins equal ops bitwise where they share the math, and the C kernels' attention to float32 rounding;
* the native backend equals the twins as tests/test_kernels.py requires (bitwise or to a few ulp);
* return_probs / recording never changes which kernel computes the output;
* `compare --backend native` and recording see the native attention kernel (a perturbed kernel shows).
"""

import numpy as np
import pytest

from gemma2np import Gemma2ForCausalLM, kernels, ops
from gemma2np.compare import compare_to_reference
from gemma2np.kernels import OPS, Backend, NativeBackend, ReferenceBackend, TwinBackend
from gemma2np.model.decoder import layer_visibility

from conftest import randomize_norms, tiny_config

HAVE_NATIVE = kernels.native_available()
needs_native = pytest.mark.skipif(not HAVE_NATIVE, reason="gemma2np._native is not built")


def _backends():
    out = [ReferenceBackend("float32"), ReferenceBackend("float64"), TwinBackend()]
    if HAVE_NATIVE:
        out += [NativeBackend(n_threads=1), NativeBackend(n_threads=2)]
    return out


def _attn_inputs(seed=0, B=2, H=4, K=2, T=5, S=9, D=8, dtype=np.float32):
    r = np.random.default_rng(seed)
    q = r.standard_normal((B, H, T, D)).astype(dtype)
    k = r.standard_normal((B, K, S, D)).astype(dtype)
    v = r.standard_normal((B, K, S, D)).astype(dtype)
    q_pos = np.arange(S - T, S, dtype=np.int64)
    k_pos = np.arange(S, dtype=np.int64)
    valid = np.ones((B, S), bool)
    valid[1, :6] = False  # row 1: the first query sees no key at all (uniform row)
    return q, k, v, q_pos, k_pos, valid


@pytest.mark.parametrize("cls", [ReferenceBackend, TwinBackend, NativeBackend])
def test_every_backend_implements_every_op(cls):
    missing = [op for op in OPS if not callable(getattr(cls, op, None))]
    assert not missing, f"{cls.__name__} lacks {missing}"


def test_instances_satisfy_the_protocol():
    for be in _backends():
        assert isinstance(be, Backend), type(be).__name__  # name, dtype, weight_formats and every op
        assert "float32" in be.weight_formats and be.dtype in (np.float32, np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reference_backend_is_ops(dtype):
    """No numerics of its own: each method returns exactly what the ops function gives."""
    be = ReferenceBackend(dtype)
    dt = np.dtype(dtype)
    r = np.random.default_rng(1)
    x = r.standard_normal((2, 3, 16)).astype(dt)
    w = r.standard_normal(16).astype(dt)
    W = r.standard_normal((5, 16)).astype(np.float32)
    b = r.standard_normal(5).astype(np.float32)
    np.testing.assert_array_equal(be.rmsnorm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6))
    h = be.prepare_linear(W, b)
    np.testing.assert_array_equal(be.linear(x, h), ops.linear(x, W.astype(dt), b.astype(dt)))
    h2 = be.prepare_linear(W)
    for y, want in zip(be.linear_many(x, [h, h2]), [ops.linear(x, W.astype(dt), b.astype(dt)),
                                                  ops.linear(x, W.astype(dt))]):
        np.testing.assert_array_equal(y, want)
    for act in ops.ACT_FNS:
        np.testing.assert_array_equal(be.geglu(x, x[::-1], act), ops.geglu(x, x[::-1], act))
    np.testing.assert_array_equal(be.softcap(x * 40, 30.0), ops.softcap(x * 40, 30.0))
    assert be.softcap(x, None) is x
    np.testing.assert_array_equal(be.argmax(x), np.argmax(x, axis=-1))
    vals, idx = be.topk(x, 4)
    np.testing.assert_array_equal(idx, np.argsort(-x, axis=-1, kind="stable")[..., :4])
    q, k, v, qp, kp, valid = _attn_inputs(dtype=dt)
    cos = r.standard_normal((2, 5, 8)).astype(dt)
    sin = r.standard_normal((2, 5, 8)).astype(dt)
    for got, want in zip(be.rope(q, k[:, :, :5], cos, sin), ops.apply_rotary_pos_emb(q, k[:, :, :5], cos, sin)):
        np.testing.assert_array_equal(got, want)
    out, probs = be.attention(q, k, v, qp, kp, valid, 0.3, 5.0, 3, return_probs=True)
    want_out, want_probs = ops.attention(q, k, v, qp, kp, valid, 0.3, 5.0, 3, return_probs=True)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(probs, want_probs)
    table = r.standard_normal((11, 4)).astype(np.float32)
    ids = np.array([[1, 10, 3], [0, 0, 7]])
    e = be.embed(table, ids)
    assert e.dtype == dt
    np.testing.assert_array_equal(e, table[ids].astype(dt))
    with pytest.raises(ValueError, match="weights"):
        be.prepare_linear(W, weights="int8")


def test_twins_are_ops_where_the_math_is_shared():
    be = TwinBackend()
    r = np.random.default_rng(2)
    x = (r.standard_normal((3, 4, 24)) * 3).astype(np.float32)
    w = r.standard_normal(24).astype(np.float32)
    np.testing.assert_array_equal(be.rmsnorm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6))
    for act in ops.ACT_FNS:
        np.testing.assert_array_equal(be.geglu(x, x[::-1], act), ops.geglu(x, x[::-1], act))
    np.testing.assert_array_equal(be.softcap(x * 40, 30.0), ops.softcap(x * 40, 30.0))
    np.testing.assert_array_equal(be.argmax(x), ops.argmax(x))
    for a, b in zip(be.topk(x, 5), ops.topk(x, 5)):
        np.testing.assert_array_equal(a, b)
    q, k, *_ = _attn_inputs()
    cos = r.standard_normal((2, 5, 8)).astype(np.float32)
    sin = r.standard_normal((2, 5, 8)).astype(np.float32)
    for got, want in zip(be.rope(q, k[:, :, :5], cos, sin), ops.apply_rotary_pos_emb(q, k[:, :, :5], cos, sin)):
        np.testing.assert_array_equal(got, want)
    W = r.standard_normal((6, 24)).astype(np.float32)
    np.testing.assert_array_equal(be.linear(x, be.prepare_linear(W)), x @ W.T)


@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_attention_of_every_backend_matches_ops_and_probs_do_not_change_the_output(window, softcap):
    q, k, v, qp, kp, valid = _attn_inputs(seed=3)
    want_out, want_probs = ops.attention(q, k, v, qp, kp, valid, 0.35, softcap, window, return_probs=True)
    for be in _backends():
        args = [a.astype(be.dtype) if a.dtype.kind == "f" else a for a in (q, k, v)] + [qp, kp, valid]
        plain = be.attention(*args, 0.35, softcap, window)
        out, probs = be.attention(*args, 0.35, softcap, window, return_probs=True)
        np.testing.assert_array_equal(out, plain)  # asking for probs never changes the output
        assert probs.shape == want_probs.shape
        np.testing.assert_allclose(out, want_out, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(probs, want_probs, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


@needs_native
def test_native_equals_twins():
    tw, nb = TwinBackend(), NativeBackend(n_threads=2)
    r = np.random.default_rng(4)
    x = r.standard_normal((2, 7, 40)).astype(np.float32)
    w = r.standard_normal(40).astype(np.float32)
    np.testing.assert_allclose(nb.rmsnorm(x, w, 1e-6), tw.rmsnorm(x, w, 1e-6), rtol=3e-6, atol=1e-6)
    for act in ("gelu_pytorch_tanh", "gelu", "silu"):
        np.testing.assert_allclose(nb.geglu(x, x[::-1], act), tw.geglu(x, x[::-1], act), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(nb.softcap(x * 40, 30.0), tw.softcap(x * 40, 30.0))  # both ops.softcap
    np.testing.assert_array_equal(nb.argmax(x), tw.argmax(x))
    for a, b in zip(nb.topk(x, 3), tw.topk(x, 3)):
        np.testing.assert_array_equal(a, b)
    q, k, *_ = _attn_inputs()
    cos = r.standard_normal((2, 5, 8)).astype(np.float32)
    sin = r.standard_normal((2, 5, 8)).astype(np.float32)
    for a, b in zip(nb.rope(q, k[:, :, :5], cos, sin), tw.rope(q, k[:, :, :5], cos, sin)):
        np.testing.assert_array_equal(a, b)
    W = r.standard_normal((9, 40)).astype(np.float32)
    for fmt in ("float32", "bfloat16", "int8"):
        hs_n = [nb.prepare_linear(W, weights=fmt), nb.prepare_linear(W[:5], weights=fmt)]
        hs_t = [tw.prepare_linear(W, weights=fmt), tw.prepare_linear(W[:5], weights=fmt)]
        for yn, yt in zip(nb.linear_many(x, hs_n), tw.linear_many(x, hs_t)):
            np.testing.assert_allclose(yn, yt, rtol=1e-5, atol=1e-5)
        for yn, h in zip(nb.linear_many(x, hs_n), hs_n):
            np.testing.assert_array_equal(yn, nb.linear(x, h))  # fused == separate, bitwise
    table = r.standard_normal((11, 4)).astype(np.float32)
    np.testing.assert_array_equal(nb.embed(table, np.array([[3, 4]])), tw.embed(table, np.array([[3, 4]])))


# ----------------------------------------------------------------------------- the model on each backend

IDS = np.array([[2, 5, 9, 11, 3, 7, 40, 41, 1, 8], [0, 0, 2, 17, 18, 19, 20, 21, 22, 23]])
MASK = np.array([[1] * 10, [0, 0] + [1] * 8])
MODEL_BACKENDS = [dict(backend="numpy"), dict(backend="numpy", dtype="float64"), dict(backend="twins")] + (
    [dict(backend="native", n_threads=1), dict(backend="native", weights="int8", n_threads=2)] if HAVE_NATIVE else [])


@pytest.fixture(scope="module")
def state():
    cfg = tiny_config()
    return cfg, randomize_norms(Gemma2ForCausalLM.from_config(cfg, seed=5).state_dict(), 5)


@pytest.mark.parametrize("kw", MODEL_BACKENDS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_recording_and_output_attentions_never_change_the_outputs(state, kw):
    cfg, sd = state
    model = Gemma2ForCausalLM(cfg, sd, **kw)
    plain = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
    att = model(input_ids=IDS, attention_mask=MASK, output_attentions=True)
    with model.record_intermediates() as rec:
        recd = model(input_ids=IDS, attention_mask=MASK)
    np.testing.assert_array_equal(att.logits, plain.logits)
    np.testing.assert_array_equal(recd.logits, plain.logits)
    L = cfg.num_hidden_layers
    for i in range(L - 1):
        np.testing.assert_array_equal(rec[f"layers.{i}.output"], plain.hidden_states[i + 1])
    for i in range(L):
        np.testing.assert_array_equal(rec[f"layers.{i}.attn_probs"], att.attentions[i])
    np.testing.assert_array_equal(rec["final_norm"], plain.hidden_states[L])


def test_twins_model_agrees_with_the_reference(state):
    cfg, sd = state
    ref = Gemma2ForCausalLM(cfg, sd)(input_ids=IDS, attention_mask=MASK).logits
    tw = Gemma2ForCausalLM(cfg, sd, backend="twins")(input_ids=IDS, attention_mask=MASK).logits
    np.testing.assert_allclose(tw, ref, rtol=1e-5, atol=1e-5)


def test_layer_visibility_window_one_decode_quirk():
    """sliding_window=1, one new token after cached ones: transformers' generate attends to every cached
    key exactly when the token may see itself (decoder.layer_visibility documents why)."""
    cfg = tiny_config(sliding_window=1)
    sliding = cfg.layer_types.index("sliding_attention")
    full = cfg.layer_types.index("full_attention")
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]], bool)
    k_pos, q_pos = np.arange(4), np.array([3])
    key_valid, window = layer_visibility(cfg, sliding, 3, 1, k_pos, q_pos, mask)
    assert window is None
    np.testing.assert_array_equal(key_valid, [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    key_valid, window = layer_visibility(cfg, full, 3, 1, k_pos, q_pos, mask)
    assert window is None
    np.testing.assert_array_equal(key_valid, mask)
    key_valid, window = layer_visibility(cfg, sliding, 3, 4, k_pos, np.arange(4), mask)  # prefill: the window
    assert window == 1
    np.testing.assert_array_equal(key_valid, mask)
    key_valid, window = layer_visibility(cfg, sliding, 2, 1, k_pos, q_pos, None)
    np.testing.assert_array_equal(key_valid, np.ones((2, 4), bool))


@needs_native
def test_compare_and_recording_check_the_native_attention_kernel(state, monkeypatch):
    """A perturbed C attention kernel shows in what recording and `compare --backend native` see:
    the first divergence is the first attention output (the probabilities are recomputed, not the C's)."""
    from gemma2np import _native

    cfg, sd = state
    model = Gemma2ForCausalLM(cfg, sd, backend="native", n_threads=1)
    with model.record_intermediates() as good:
        model(input_ids=IDS)
    reference = {"input_ids": IDS, **{k: v for k, v in good.items()}}
    assert compare_to_reference(model, reference).ok

    real = _native.attention

    def perturbed(*args, **kw):
        return real(*args, **kw) + np.float32(1e-2)

    monkeypatch.setattr(_native, "attention", perturbed)
    with model.record_intermediates() as bad:
        model(input_ids=IDS)
    np.testing.assert_array_equal(bad["layers.0.attn_probs"], good["layers.0.attn_probs"])
    assert not np.array_equal(bad["layers.0.attn_out"], good["layers.0.attn_out"])
    report = compare_to_reference(model, reference)
    assert not report.ok and report.first_divergence == "layers.0.attn_out"
