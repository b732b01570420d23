"""Native kernels (gemma2np._native) vs their NumPy twins (gemma2np.kernels.twins).

Every kernel is swept with hypothesis over awkward sizes (odd / prime K and N, M = 1 and M > 1,
GQA ratios, windows, masks with fully masked rows), thread counts 1/2/3, and both the AVX-512
and the portable scalar path (`simd` fixture). Bad inputs must raise TypeError/ValueError.
"""
import math
import os
import platform
import subprocess
import sys
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma2np import kernels, ops
from gemma2np.kernels import twins as ref

nat = pytest.importorskip("gemma2np._native")

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
FORMATS = ["float32", "bfloat16", "bfloat16_dp", "int8"]
SIMD_LEVELS = [1, 2, 0] if "avx512f" in nat.cpu_features() else [0]


@pytest.fixture(params=SIMD_LEVELS, ids=lambda l: {0: "scalar", 1: "avx512", 2: "avx512-nobf16"}[l])
def simd(request):
    got = nat.set_simd(request.param)
    assert got == request.param
    yield got
    nat.set_simd(1)


@pytest.fixture(autouse=True, scope="module")
def _always_fan_out():
    """Fan out whatever the work size (threshold 0), so the small shapes of these tests run the
    threaded code at n_threads 2 and 3; tests/test_threading.py covers the default threshold."""
    before = nat.get_parallel_threshold()
    nat.set_parallel_threshold(0)
    yield
    nat.set_parallel_threshold(before)


def _rng(seed):
    return np.random.default_rng(seed)


def _pack(w, fmt, block=32):
    if fmt == "float32":
        return w, None, 0
    if fmt in ("bfloat16", "bfloat16_dp"):
        return ref.to_bf16_bits(w), None, 0
    q, s = ref.quantize_int8(w, block)
    return q, s, block


# ----------------------------------------------------------------------------- linear


@SETTINGS
@given(M=st.sampled_from([1, 2, 3, 4, 5, 7, 9, 17]), N=st.integers(1, 41), K=st.integers(1, 131),
       fmt=st.sampled_from(FORMATS), block=st.sampled_from([16, 32, 64]), bias=st.booleans(),
       threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31))
def test_linear_matches_twin(simd, M, N, K, fmt, block, bias, threads, seed):
    r = _rng(seed)
    x = r.standard_normal((M, K), dtype=np.float32)
    w = r.standard_normal((N, K), dtype=np.float32)
    b = r.standard_normal(N, dtype=np.float32) if bias else None
    wp, s, blk = _pack(w, fmt, block)
    y = nat.linear(x, wp, fmt, s, b, blk, n_threads=threads)
    yr = ref.linear(x, wp, fmt, s, b, blk)
    assert y.shape == (M, N) and y.dtype == np.float32
    # any summation order is within 2*K*u*sum|x w| of the exact result (u = 2^-24)
    xq, wq = ref.linear_operands(x, wp, fmt, s, blk)
    bound = 2 * (K + 2) * 2.0**-24 * (np.abs(xq) @ np.abs(wq).T)
    if b is not None:
        bound += 2.0**-23 * (np.abs(yr) + np.abs(b))
    assert np.all(np.abs(y - yr) <= bound + 1e-30), np.max(np.abs(y - yr) - bound)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 13), N=st.integers(1, 70), K=st.integers(1, 200),
       fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2**31))
def test_linear_thread_and_batch_invariance(simd, M, N, K, fmt, seed):
    """Bitwise: the same result for any thread count, and row i of a batch == the row alone
    (bfloat16/int8 change semantics at ref.DP_MIN_M rows: there row i of a batch == row i in a
    batch of DP_MIN_M copies of it)."""
    r = _rng(seed)
    x = r.standard_normal((M, K), dtype=np.float32)
    wp, s, blk = _pack(r.standard_normal((N, K), dtype=np.float32), fmt)
    y1 = nat.linear(x, wp, fmt, s, None, blk, n_threads=1)
    for t in (2, 3):
        np.testing.assert_array_equal(nat.linear(x, wp, fmt, s, None, blk, n_threads=t), y1)
    mixed = fmt in ("bfloat16", "int8") and M >= ref.DP_MIN_M
    for i in (0, M - 1):
        xi = np.repeat(x[i:i + 1], ref.DP_MIN_M + 1, axis=0) if mixed else x[i:i + 1].copy()
        np.testing.assert_array_equal(nat.linear(xi, wp, fmt, s, None, blk, n_threads=2)[:1], y1[i:i + 1])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.sampled_from([1, 2, 5, 8, 13]), Ns=st.lists(st.integers(0, 45), min_size=1, max_size=4),
       K=st.integers(1, 150), fmt=st.sampled_from(FORMATS), block=st.sampled_from([16, 32]),
       threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31))
def test_linear_multi_equals_separate_calls(simd, M, Ns, K, fmt, block, threads, seed):
    """Bitwise: the fused call (q/k/v, gate/up) gives each matrix exactly its own linear()."""
    r = _rng(seed)
    x = r.standard_normal((M, K), dtype=np.float32)
    packed = [_pack(r.standard_normal((n, K), dtype=np.float32), fmt, block) for n in Ns]
    ys = nat.linear_multi(x, [p[0] for p in packed], fmt,
                          [p[1] for p in packed] if fmt == "int8" else None, packed[0][2],
                          n_threads=threads)
    assert len(ys) == len(Ns)
    for y, (wp, s, blk), n in zip(ys, packed, Ns):
        assert y.shape == (M, n) and y.dtype == np.float32
        np.testing.assert_array_equal(y, nat.linear(x, wp, fmt, s, None, blk, n_threads=threads))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.sampled_from([8, 9, 21]), N=st.integers(1, 70), K=st.integers(1, 300),
       block=st.sampled_from([16, 32, 48, 64]), tiny=st.booleans(), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**31))
def test_int8_prefill_is_bf16_of_dequantised_weights(simd, M, N, K, block, tiny, threads, seed):
    """Bitwise: at >= DP_MIN_M rows int8 weights act as bf16(q * scale), whichever way the kernel
    widens them (vcvtne2ps2bf16, which flushes denormal q*s to zero -- as vdpbf16ps treats denormal
    inputs -- or the exact rounding helper on the paths without avx512_bf16)."""
    r = _rng(seed)
    x = r.standard_normal((M, K), dtype=np.float32)
    w = r.standard_normal((N, K), dtype=np.float32)
    if tiny:  # blocks whose q * scale are denormal floats: the converter's flush-to-zero must not show
        w[: (N + 1) // 2] *= np.float32(1e-39)
    q, s = ref.quantize_int8(w, block)
    wb = ref.to_bf16_bits(ref.dequantize_int8(q, s, block))
    y8 = nat.linear(x, q, "int8", s, None, block, n_threads=threads)
    yb = nat.linear(x, wb, "bfloat16", None, None, 0, n_threads=threads)
    np.testing.assert_array_equal(y8, yb)


def test_linear_multi_rejects_bad_input():
    x = np.ones((2, 32), np.float32)
    w = np.ones((3, 32), np.float32)
    with pytest.raises(ValueError, match=r"ws\[1\] must have shape"):
        nat.linear_multi(x, [w, np.ones((3, 31), np.float32)])
    with pytest.raises(ValueError, match="1..8 matrices"):
        nat.linear_multi(x, [])
    with pytest.raises(ValueError, match="1..8 matrices"):
        nat.linear_multi(x, [w] * 9)
    with pytest.raises(ValueError, match="one scales array per matrix"):
        nat.linear_multi(x, [np.ones((3, 32), np.int8)] * 2, "int8", [np.ones((3, 1), np.float32)], 32)
    with pytest.raises(ValueError, match=r"scales\[0\] must have shape"):
        nat.linear_multi(x, [np.ones((3, 32), np.int8)], "int8", [np.ones((3, 2), np.float32)], 32)
    with pytest.raises(TypeError):
        nat.linear_multi(x, [w.astype(np.float64)])
    with pytest.raises(ValueError, match="contiguous"):
        nat.linear_multi(x, [np.ones((3, 64), np.float32)[:, ::2]])


@pytest.mark.parametrize("K", [1024, 2048, 1023])
@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "bfloat16_dp"])
def test_linear_prefill_power_of_two_rows(fmt, K):
    """Prefill with rows a multiple of 2 KB apart (copied to a padded stride first, against L1
    set conflicts) and beside it an odd K: the twin's result, the same for 1 and 2 threads."""
    r = _rng(K)
    M, N = 40, 45
    x = r.standard_normal((M, K), dtype=np.float32)
    wp, s, blk = _pack(r.standard_normal((N, K), dtype=np.float32), fmt)
    y = nat.linear(x, wp, fmt, s, None, blk, n_threads=2)
    np.testing.assert_array_equal(nat.linear(x, wp, fmt, s, None, blk, n_threads=1), y)
    yr = ref.linear(x, wp, fmt, s, None, blk)
    xq, wq = ref.linear_operands(x, wp, fmt, s, blk)
    bound = 2 * (K + 2) * 2.0**-24 * (np.abs(xq) @ np.abs(wq).T)
    assert np.all(np.abs(y - yr) <= bound + 1e-30)


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_large_shape(fmt):
    """A shape that exercises blocking (several W blocks, x chunks of 64 rows, K tails)."""
    r = _rng(1)
    M, N, K = 70, 301, 1037
    x = r.standard_normal((M, K), dtype=np.float32)
    wp, s, blk = _pack(r.standard_normal((N, K), dtype=np.float32) * 0.05, fmt)
    y = nat.linear(x, wp, fmt, s, None, blk, n_threads=2)
    yr = ref.linear(x, wp, fmt, s, None, blk)
    np.testing.assert_allclose(y, yr, rtol=1e-4, atol=1e-4 * np.abs(yr).max())


def test_linear_int8_and_bf16_error_vs_float32():
    """Documented accuracy of the storage formats on Gaussian data (relative RMS error of y)."""
    r = _rng(2)
    x = r.standard_normal((8, 2304), dtype=np.float32)
    w = r.standard_normal((256, 2304), dtype=np.float32) * 0.02
    y64 = x.astype(np.float64) @ w.astype(np.float64).T
    limits = {"float32": 1e-6, "bfloat16": 3e-3, "bfloat16_dp": 4e-3, "int8": 8e-3}
    for fmt, lim in limits.items():
        wp, s, blk = _pack(w, fmt)
        y = nat.linear(x, wp, fmt, s, None, blk)
        rms = np.sqrt(np.mean((y - y64) ** 2) / np.mean(y64 ** 2))
        assert rms < lim, (fmt, rms)
        assert fmt == "float32" or rms > 1e-4  # the format really quantises


def test_quantize_int8_roundtrip():
    r = _rng(3)
    w = r.standard_normal((5, 77), dtype=np.float32)
    w[1, :32] = 0.0  # an all-zero block
    q, s = ref.quantize_int8(w, 32)
    assert q.dtype == np.int8 and s.shape == (5, 3) and s[1, 0] == 0
    d = ref.dequantize_int8(q, s, 32)
    err = np.abs(d - w)
    assert np.all(err <= np.repeat(s, 32, axis=1)[:, :77] * 0.5000001 + 1e-12)
    assert np.abs(q).max() == 127
    with pytest.raises(ValueError):
        ref.quantize_int8(w, 24)


def test_f32_to_bf16_matches_ml_dtypes(simd):
    """Bitwise x.astype(ml_dtypes.bfloat16) on both paths: random values, ties, denormals, the
    extremes, every 65,537th bit pattern and NaNs with payloads (ml_dtypes gives 0x7FC0 / 0xFFC0;
    an all-2**32 sweep of both paths matched too, see csrc/g2_elementwise.c)."""
    r = _rng(4)
    x = np.concatenate([r.standard_normal(1000, dtype=np.float32) * 1e3,
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-40, 3.4e38], np.float32),
                        # exact ties: even and odd mantissa below the cut
                        np.array([0x3F808000, 0x3F818000, 0x3F80C000], np.uint32).view(np.float32),
                        np.arange(0, 2**32, 65537, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        np.array([0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0xFF800001, 0x7FA5A5A5,
                                  0x7F8100FF], np.uint32).view(np.float32)])
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    for threads in (1, 2):
        np.testing.assert_array_equal(nat.f32_to_bf16(x, n_threads=threads), want)
    # a size past the threading threshold, with a ragged tail
    y = r.standard_normal(70001, dtype=np.float32)
    np.testing.assert_array_equal(nat.f32_to_bf16(y, n_threads=2), y.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_set_simd_zero_really_runs_the_scalar_path():
    """tanh is a polynomial on the AVX-512 path and libm's tanhf on the scalar one: forcing the
    scalar path must change some results (else the `simd` fixture would test one path twice)."""
    if SIMD_LEVELS == [0]:
        pytest.skip("no AVX-512: only the scalar path exists")
    x = _rng(9).standard_normal(100000, dtype=np.float32) * 3
    try:
        a = nat.tanh(x)
        assert nat.set_simd(0) == 0 and nat.get_simd() == 0
        b = nat.tanh(x)
    finally:
        nat.set_simd(1)
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_linear_rejects_bad_input():
    x = np.ones((2, 8), np.float32)
    w = np.ones((3, 8), np.float32)
    with pytest.raises(TypeError):
        nat.linear(x.astype(np.float64), w)
    with pytest.raises(TypeError):
        nat.linear(x, w.astype(np.float16))
    with pytest.raises(TypeError):
        nat.linear(x, w, "bfloat16")  # float32 passed as bf16 bits
    with pytest.raises(ValueError):
        nat.linear(np.ones((8, 2), np.float32).T, w)  # non-contiguous
    with pytest.raises(ValueError):
        nat.linear(x, np.ones((3, 7), np.float32))
    with pytest.raises(ValueError):
        nat.linear(x[None], w)
    with pytest.raises(ValueError):
        nat.linear(x, w, "float16")
    with pytest.raises(ValueError):
        nat.linear(x, w, bias=np.ones(4, np.float32))
    q, s = ref.quantize_int8(w, 16)
    with pytest.raises(ValueError):
        nat.linear(x, q, "int8", s, block=0)
    with pytest.raises(ValueError):
        nat.linear(x, q, "int8", s, block=24)
    with pytest.raises(ValueError):
        nat.linear(x, q, "int8", s[:, :0], block=16)
    with pytest.raises(ValueError):
        nat.linear(x, q, "int8", None, block=16)
    with pytest.raises(ValueError):
        nat.linear(x, w, n_threads=0)
    with pytest.raises(ValueError):
        nat.linear(x, w, out=np.empty((2, 4), np.float32))


# ----------------------------------------------------------------------------- attention


@st.composite
def attention_case(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    rep = draw(st.sampled_from([1, 2, 3]))
    T = draw(st.integers(1, 9))
    past = draw(st.integers(0, 140))
    D = draw(st.sampled_from([1, 3, 8, 16, 17, 32, 40]))
    window = draw(st.sampled_from([None, 1, 2, 5, 64]))
    softcap = draw(st.sampled_from([None, 50.0, 0.5]))
    masked = draw(st.sampled_from(["none", "random", "left_pad"]))
    seed = draw(st.integers(0, 2**31))
    threads = draw(st.sampled_from([1, 2, 3]))
    return B, Hkv, rep, T, past, D, window, softcap, masked, seed, threads


@SETTINGS
@given(case=attention_case())
def test_attention_matches_twin(simd, case):
    B, Hkv, rep, T, past, D, window, softcap, masked, seed, threads = case
    r = _rng(seed)
    S = past + T
    q = r.standard_normal((B, Hkv * rep, T, D), dtype=np.float32) * 2
    k = r.standard_normal((B, Hkv, S, D), dtype=np.float32) * 2
    v = r.standard_normal((B, Hkv, S, D), dtype=np.float32)
    q_pos = np.arange(past, S, dtype=np.int64)
    k_pos = np.arange(S, dtype=np.int64)
    kv = None
    if masked == "random":
        kv = r.random((B, S)) < 0.6
    elif masked == "left_pad":  # the first rows of batch 0 see nothing at all
        kv = np.ones((B, S), bool)
        kv[0, :past + max(1, T // 2)] = False
    out = nat.attention(q, k, v, q_pos, k_pos, kv, 1.0 / math.sqrt(D), softcap, window, n_threads=threads)
    want = ref.attention(q, k, v, q_pos, k_pos, kv, 1.0 / math.sqrt(D), softcap, window)
    if simd == 0:  # the scalar path is the twin's arithmetic step for step (tests/test_attention_kernels.py)
        np.testing.assert_array_equal(out, want)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    again = nat.attention(q, k, v, q_pos, k_pos, kv, 1.0 / math.sqrt(D), softcap, window,
                          n_threads=1 if threads != 1 else 2)
    np.testing.assert_array_equal(out, again)


def test_attention_fully_masked_row_is_uniform_average():
    r = _rng(5)
    q = r.standard_normal((1, 2, 3, 4), dtype=np.float32)
    k = r.standard_normal((1, 1, 5, 4), dtype=np.float32)
    v = r.standard_normal((1, 1, 5, 4), dtype=np.float32)
    kv = np.zeros((1, 5), bool)
    out = nat.attention(q, k, v, np.arange(2, 5), np.arange(5), kv, 0.5, 50.0, None)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=2, keepdims=True), out.shape), rtol=1e-6, atol=1e-6)
    # a query before every key (q_pos < all k_pos) is fully masked too
    out = nat.attention(q, k, v, np.array([-3, 0, 1]), np.arange(5), None, 0.5, None, None)
    np.testing.assert_allclose(out[:, :, 0], np.broadcast_to(v.mean(axis=2), out[:, :, 0].shape), rtol=1e-6, atol=1e-6)


def test_attention_matches_ops():
    """The twin and the native kernel agree with gemma2np.ops.attention (the readable reference)."""
    r = _rng(6)
    q = r.standard_normal((2, 4, 3, 16), dtype=np.float32) * 3
    k = r.standard_normal((2, 2, 10, 16), dtype=np.float32) * 3
    v = r.standard_normal((2, 2, 10, 16), dtype=np.float32)
    kv = np.ones((2, 10), bool)
    kv[1, :8] = False
    args = (q, k, v, np.arange(7, 10), np.arange(10), kv, 0.25, 50.0, 4)
    want = ops.attention(*args)
    np.testing.assert_allclose(nat.attention(*args), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(ref.attention(*args), want, rtol=2e-5, atol=2e-5)


def test_attention_rejects_bad_input():
    q = np.zeros((1, 3, 2, 4), np.float32)
    k = np.zeros((1, 2, 5, 4), np.float32)
    qp, kp = np.arange(3, 5), np.arange(5)
    with pytest.raises(ValueError):  # 3 query heads over 2 kv heads
        nat.attention(q, k, k, qp, kp, None, 1.0)
    q = np.zeros((1, 4, 2, 4), np.float32)
    with pytest.raises(TypeError):
        nat.attention(q, k, k, qp.astype(np.int32), kp, None, 1.0)
    with pytest.raises(ValueError):
        nat.attention(q, k, k, np.arange(3), kp, None, 1.0)
    with pytest.raises(ValueError):
        nat.attention(q, k, np.zeros((1, 2, 5, 3), np.float32), qp, kp, None, 1.0)
    with pytest.raises(ValueError):
        nat.attention(q, k, k, qp, kp, np.ones((1, 4), bool), 1.0)
    with pytest.raises(ValueError):
        nat.attention(q[:, :, :, ::2], k, k, qp, kp, None, 1.0)
    with pytest.raises(TypeError):
        nat.attention(q.astype(np.float64), k, k, qp, kp, None, 1.0)


# ----------------------------------------------------------------------------- row / elementwise kernels


@SETTINGS
@given(R=st.integers(1, 9), D=st.integers(1, 300), threads=st.sampled_from([1, 2, 3]),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2**31))
def test_rmsnorm(simd, R, D, threads, scale, seed):
    r = _rng(seed)
    x = r.standard_normal((R, D), dtype=np.float32) * np.float32(scale)
    w = r.standard_normal(D, dtype=np.float32)
    out = nat.rmsnorm(x, w, 1e-6, n_threads=threads)
    np.testing.assert_allclose(out, ref.rmsnorm(x, w, 1e-6), rtol=3e-6, atol=1e-6)
    np.testing.assert_array_equal(out, nat.rmsnorm(x, w, 1e-6, n_threads=1))
    np.testing.assert_allclose(out, ops.rms_norm(x, w, 1e-6), rtol=3e-6, atol=1e-6)


@SETTINGS
@given(n=st.integers(0, 5000), approx=st.sampled_from(["tanh", "none"]), threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**31))
def test_geglu(simd, n, approx, threads, seed):
    r = _rng(seed)
    g = r.standard_normal(n, dtype=np.float32) * 4
    u = r.standard_normal(n, dtype=np.float32)
    out = nat.geglu(g, u, approx, n_threads=threads)
    np.testing.assert_allclose(out, ref.geglu(g, u, approx), rtol=1e-5, atol=1e-6)


def test_geglu_large_matches_ops_and_threads(simd):
    r = _rng(7)
    g = r.standard_normal((3, 30000), dtype=np.float32) * 5
    u = r.standard_normal((3, 30000), dtype=np.float32)
    out = nat.geglu(g, u, "tanh", n_threads=2)
    np.testing.assert_allclose(out, ops.geglu(g, u), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out, nat.geglu(g, u, "tanh", n_threads=1))


@SETTINGS
@given(B=st.integers(1, 3), H=st.integers(1, 4), T=st.integers(1, 7), half=st.integers(1, 20),
       per_batch=st.booleans(), threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31))
def test_rope_bitwise(simd, B, H, T, half, per_batch, threads, seed):
    r = _rng(seed)
    D = 2 * half
    x = r.standard_normal((B, H, T, D), dtype=np.float32)
    ang = r.standard_normal((B if per_batch else 1, T, D), dtype=np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    out = nat.rope(x, cos, sin, n_threads=threads)
    np.testing.assert_array_equal(out, ref.rope(x, cos, sin))
    if per_batch:
        np.testing.assert_array_equal(out, ops.apply_rotary_pos_emb(x, x, cos, sin)[0])
    # in place
    y = x.copy()
    nat.rope(y, cos, sin, out=y)
    np.testing.assert_array_equal(y, out)


def test_rope_rejects_bad_input():
    x = np.zeros((1, 2, 3, 4), np.float32)
    with pytest.raises(ValueError):
        nat.rope(np.zeros((1, 2, 3, 5), np.float32), np.zeros((3, 5), np.float32), np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError):
        nat.rope(x, np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError):
        nat.rope(x, np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32))
    with pytest.raises(TypeError):
        nat.rope(x, np.zeros((3, 4)), np.zeros((3, 4)))


@SETTINGS
@given(n=st.integers(0, 3000), cap=st.sampled_from([0.5, 30.0, 50.0]), threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**31))
def test_softcap(simd, n, cap, threads, seed):
    r = _rng(seed)
    x = r.standard_normal(n, dtype=np.float32) * 60
    out = nat.softcap(x, cap, n_threads=threads)
    np.testing.assert_allclose(out, ref.softcap(x, cap), rtol=3e-7, atol=3e-7 * cap)
    assert np.all(np.abs(out) <= cap)
    with pytest.raises(ValueError):
        nat.softcap(x, 0.0)


@SETTINGS
@given(R=st.integers(1, 5), V=st.integers(1, 3000), k=st.integers(1, 60), ties=st.booleans(),
       threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31))
def test_argmax_topk(simd, R, V, k, ties, threads, seed):
    r = _rng(seed)
    x = r.standard_normal((R, V), dtype=np.float32)
    if ties:
        x = np.round(x * 2).astype(np.float32)  # many equal values, incl. -0.0 and 0.0
    np.testing.assert_array_equal(nat.argmax(x, n_threads=threads), ref.argmax(x))
    k = min(k, V)
    vals, idx = nat.topk(x, k, n_threads=threads)
    rv, ri = ref.topk(x, k)
    np.testing.assert_array_equal(idx, ri)
    np.testing.assert_array_equal(vals, rv)


def test_argmax_nan_and_topk_errors():
    x = np.array([[1.0, np.nan, 5.0, np.nan], [np.nan, 2, 3, 4]], np.float32)
    np.testing.assert_array_equal(nat.argmax(x), np.argmax(x, axis=-1))
    with pytest.raises(ValueError):
        nat.topk(x, 2)
    y = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError):
        nat.topk(y, 0)
    with pytest.raises(ValueError):
        nat.topk(y, 6)
    with pytest.raises(ValueError):
        nat.argmax(np.zeros((2, 0), np.float32))
    with pytest.raises(TypeError):
        nat.argmax([1.0, 2.0])


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("fmt", FORMATS)
def test_backends_linear_agree(fmt):
    r = _rng(8)
    w = r.standard_normal((33, 70)).astype(ml_dtypes.bfloat16)  # a bf16 checkpoint tensor
    b = r.standard_normal(33).astype(np.float32)
    x = r.standard_normal((2, 3, 70)).astype(np.float32)
    nb, cb = kernels.get_backend("twins"), kernels.get_backend("native", n_threads=2)
    for bias in (None, b):
        yn = nb.linear(x, nb.prepare_linear(w, bias, weights=fmt))
        yc = cb.linear(x, cb.prepare_linear(w, bias, weights=fmt))
        assert yn.shape == yc.shape == (2, 3, 33)
        np.testing.assert_allclose(yc, yn, rtol=1e-5, atol=1e-5)


def test_backends_other_ops_agree():
    r = _rng(9)
    nb, cb = kernels.get_backend("twins"), kernels.get_backend("native")
    x = r.standard_normal((2, 5, 24), dtype=np.float32)
    w = r.standard_normal(24, dtype=np.float32)
    np.testing.assert_allclose(cb.rmsnorm(x, w, 1e-6), nb.rmsnorm(x, w, 1e-6), rtol=3e-6, atol=1e-6)
    np.testing.assert_allclose(cb.geglu(x, x[::-1]), nb.geglu(x, x[::-1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cb.geglu(x, x, "silu"), nb.geglu(x, x, "silu"), rtol=1e-6)
    np.testing.assert_allclose(cb.softcap(x * 100, 30.0), nb.softcap(x * 100, 30.0), rtol=1e-6, atol=1e-5)
    assert cb.softcap(x, None) is x
    np.testing.assert_array_equal(cb.argmax(x), nb.argmax(x))


def test_get_backend_when_native_missing(monkeypatch):
    monkeypatch.setattr(kernels, "_checked", True)
    monkeypatch.setattr(kernels, "_import_error", ImportError("simulated"))
    monkeypatch.setattr(kernels, "_warned", False)
    assert not kernels.native_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for explicitly: an error, no warning besides
        with pytest.raises(kernels.NativeUnavailableError, match="simulated") as e:
            kernels.get_backend("native")
    assert isinstance(e.value, ImportError) and isinstance(e.value, ValueError) and "\n" not in str(e.value)
    with pytest.warns(RuntimeWarning, match="native extension"):
        assert kernels.get_backend("auto").name == "numpy"  # the reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.get_backend("auto").name == "numpy"  # warned once already
    with pytest.raises(kernels.BackendError):
        kernels.get_backend("cuda")


def test_default_threads_honours_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert nat.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= nat.default_threads() <= (len(__import__("os").sched_getaffinity(0)))


# ----------------------------------------------------------------------------- tanh / exp


def _ulp_error(got, x, f):
    """|got - f(x)| in units of the float32 spacing at f(x) (float64 truth); results beyond the
    float32 range must be +-inf, underflow is measured against the smallest denormal."""
    with np.errstate(over="ignore", invalid="ignore"):
        ref = f(x.astype(np.float64))
        big = np.abs(ref) > np.finfo(np.float32).max
        assert np.all(got[big] == np.sign(ref[big]) * np.inf)
        ref, got = ref[~big], got[~big].astype(np.float64)
        sp = np.maximum(np.spacing(np.abs(ref.astype(np.float32))).astype(np.float64), 2.0**-149)
        return np.abs(got - ref) / sp


# the range includes x > 88.72, where the NumPy twin's float32 exp overflows to inf on purpose
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("name", ["tanh", "exp"])
def test_tanh_exp_max_ulp_over_float_range(simd, name):
    """Every 997th float32 bit pattern (all of them: denormals, saturation, overflow). Measured
    max error of the AVX-512 versions: tanh 1.39 ulp, exp 0.97 ulp (glibc tanhf: 2.09 ulp;
    NumPy's own float32 tanh 1.37, exp 2.3)."""
    x = np.arange(0, 2**32, 997, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([x[np.isfinite(x)], np.float32([0.5625, -0.5625, 9.0, 9.1, 88.72283, 88.72284,
                                                       -87.33655, -103.97, -104.0, 1e-30, -1e-40])])
    f = {"tanh": np.tanh, "exp": np.exp}[name]
    got = getattr(nat, name)(x, n_threads=2)
    err = _ulp_error(got, x, f)
    assert err.max() <= (1.5 if simd else 3.0), (name, err.max(), x[np.argmax(err)])
    np.testing.assert_array_equal(got, getattr(nat, name)(x, n_threads=1))
    np.testing.assert_allclose(got, getattr(ref, name)(x), rtol=3e-7, atol=1e-44)
    special = np.float32([np.nan, np.inf, -np.inf, 0.0, -0.0])
    out = getattr(nat, name)(special)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, f(special))
    assert np.signbit(out[4]) == np.signbit(f(special)[4])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(N=st.integers(1, 40), K=st.integers(1, 300), block=st.sampled_from([16, 32, 64]),
       bf16=st.booleans(), threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31))
def test_quantize_int8_native_matches_twin(simd, N, K, block, bf16, threads, seed):
    r = _rng(seed)
    w = (r.standard_normal((N, K), dtype=np.float32) * np.float32(r.choice([1e-3, 1.0, 50.0]))).astype(np.float32)
    w[0, : min(K, block)] = 0.0  # an all-zero block
    src = ref.to_bf16_bits(w) if bf16 else w
    q, s = nat.quantize_int8(src, block, n_threads=threads)
    qr, sr = ref.quantize_int8(ref.bf16_to_f32(src) if bf16 else w, block)
    np.testing.assert_array_equal(q, qr)
    np.testing.assert_array_equal(s, sr)


def test_native_backend_int8_from_memmap_bf16(tmp_path):
    """prepare_linear(weights="int8") on a bf16 memory map (the checkpoint path) == quantising the array."""
    from gemma2np import kernels, ops
    from gemma2np.checkpoint import bfloat16, read_safetensors, write_safetensors

    w = _rng(5).standard_normal((300, 96), dtype=np.float32).astype(bfloat16)
    write_safetensors(tmp_path / "w.safetensors", {"w": w})
    mm = read_safetensors(tmp_path / "w.safetensors")[0]["w"]
    be = kernels.get_backend("native", n_threads=2)
    h = be.prepare_linear(mm, weights="int8")
    q, s = ref.quantize_int8(w.astype(np.float32), be.int8_block)
    np.testing.assert_array_equal(h.w, q)
    np.testing.assert_array_equal(h.scales, s)
    with pytest.raises(ValueError):
        nat.quantize_int8(np.zeros((2, 8), np.float32), 24)
    with pytest.raises(TypeError):
        nat.quantize_int8(np.zeros((2, 8), np.float64), 32)


# ----------------------------------------------------------------------------- allocator

_ACTIVATION_CHURN = """
import resource, numpy as np
from gemma2np.kernels.native import NativeBackend
NativeBackend(n_threads=1)
def step():  # the allocation pattern of one FFN block at T = 128: 4.7 MB arrays made and freed
    a = np.ones((128, 9216), np.float32); b = np.ones((128, 9216), np.float32)
    c = a * b; d = np.ones((128, 2304), np.float32); del a, b
    e = c + 1; del c
    return float(e[0, 0] + d[0, 0])
step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt tuning is glibc-only")
def test_native_backend_keeps_activation_blocks_in_the_heap():
    """The first NativeBackend sets glibc's mmap/trim thresholds (g2_tune_malloc), so freed
    activation-sized blocks are reused instead of being unmapped and page-faulted in again."""
    def faults(env_extra):
        env = dict(os.environ, **env_extra)
        out = subprocess.run([sys.executable, "-c", _ACTIVATION_CHURN], env=env, check=True,
                             capture_output=True, text=True).stdout
        return int(out.strip().splitlines()[-1])

    untuned = faults({"GEMMA2NP_NO_MALLOPT": "1"})
    tuned = faults({})
    # 20 steps x ~3 x 4.7 MB: glibc's defaults fault thousands of pages back in; tuned, ~none
    assert untuned > 5000, untuned
    assert tuned < untuned / 20, (tuned, untuned)
