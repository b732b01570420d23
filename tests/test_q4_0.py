"""The "q4_0" weight format (gemma2np/kernels/q4_0.py: llama.cpp's Q4_0 blocks) and its C kernels
(csrc/g2_q4_0.c).

Layers: the repack from GGUF blocks and the dequantiser against gguf.quants (llama.cpp's reference values);
the C dequantiser bitwise against the twin; the twin's decode (x rounded to int8 per 32, integer dots) spelled
out in scalars and bounded against the float product; the C decode bitwise against the twin over shapes
(gemma-2's in_features, odd block counts), batch sizes 1..7, thread counts 1..4 and special x, on every SIMD
level; the C prefill bitwise the bfloat16_dp linear of the widened weights and within float32 rounding of the
twin; bad input.
"""
import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma2np.kernels import int4, q4_0
from gemma2np.kernels import twins as ref

nat = pytest.importorskip("gemma2np._native")

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SIMD_LEVELS = [1, 2, 0] if "avx512f" in nat.cpu_features() else [0]
Q = gguf.GGMLQuantizationType.Q4_0


@pytest.fixture(params=SIMD_LEVELS, ids=lambda l: {0: "scalar", 1: "avx512", 2: "avx512-nobf16"}[l])
def simd(request):
    assert nat.set_simd(request.param) == request.param
    yield request.param
    nat.set_simd(1)


@pytest.fixture(autouse=True, scope="module")
def _always_fan_out():
    """threshold 0: the small shapes here run the threaded code at n_threads 2..4"""
    before = nat.get_parallel_threshold()
    nat.set_parallel_threshold(0)
    yield
    nat.set_parallel_threshold(before)


def _gguf_q4_0(r, N, K, kind="normal"):
    """Real Q4_0 blocks (gguf.quants.quantize: bitwise llama.cpp's quantize_row_q4_0_ref) of random weights."""
    w = r.standard_normal((N, K), dtype=np.float32)
    if kind == "scaled":  # blocks of very different magnitude, some with f16-denormal d
        w *= (10.0 ** r.uniform(-7, 2, size=(N, K // 32, 1))).repeat(32, axis=2).reshape(N, K).astype(np.float32)
    elif kind == "sparse":
        w[:, : K // 2] = 0.0
        w[0] = 0.0
    return gguf.quants.quantize(w, Q)


@SETTINGS
@given(N=st.integers(1, 40), nb=st.integers(1, 12), kind=st.sampled_from(["normal", "scaled", "sparse"]),
       seed=st.integers(0, 2**31))
def test_repack_and_dequantize_equal_gguf(N, nb, kind, seed):
    raw = _gguf_q4_0(np.random.default_rng(seed), N, 32 * nb, kind)
    codes, scales = q4_0.from_gguf_blocks(raw, chunk_rows=7)  # several chunks
    assert codes.shape == (N, 16 * nb) and scales.shape == (N, nb)
    assert codes.nbytes + scales.nbytes == raw.nbytes  # 4.5 bits per weight, the GGUF's own size
    np.testing.assert_array_equal(q4_0.dequantize_q4_0(codes, scales), gguf.quants.dequantize(raw, Q))
    np.testing.assert_array_equal(nat.dequantize_q4_0(codes, scales, n_threads=2), gguf.quants.dequantize(raw, Q))


def test_decode_twin_is_the_documented_lane_arithmetic():
    """the twin's decode, spelled out for one row and one x row in plain scalars: x rounded by the int4
    decode's quantize_x, exact integer sums of (u - 8) q per lane, float32 scaling, the lane tree"""
    r = np.random.default_rng(3)
    K = 32 * 6  # 6 blocks: one whole group of 4 and one padded group
    codes, scales = q4_0.from_gguf_blocks(_gguf_q4_0(r, 1, K))
    x = r.standard_normal((1, K), dtype=np.float32)
    x[0, 40:64] *= 20.0  # block 1 of its own magnitude
    f = np.float32
    q, sx = int4.quantize_x(x)
    d = scales.view("<f2").astype(f)[0]
    acc = [f(0)] * 16
    for g in range(2):
        for l in range(16):
            b, rr = 4 * g + l // 4, l % 4
            if b >= 6:
                continue  # a padded block adds +0
            isum = 0
            for i in range(4 * rr, 4 * rr + 4):
                c = int(codes[0, 16 * b + i])
                isum += ((c & 15) - 8) * int(q[0, 32 * b + i]) + ((c >> 4) - 8) * int(q[0, 32 * b + 16 + i])
            acc[l] = f(acc[l] + f(f(isum) * f(d[b] * sx[0, b])))
    s8 = [f(acc[i] + acc[i + 8]) for i in range(8)]
    s4 = [f(s8[i] + s8[i + 4]) for i in range(4)]
    want = f(f(s4[0] + s4[2]) + f(s4[1] + s4[3]))
    assert q4_0.linear_decode(x, codes, scales)[0, 0] == want
    # and it is the dot product of the dequantised x (q * sx) with the dequantised row, to float32 rounding
    wf = q4_0.dequantize_q4_0(codes, scales).astype(np.float64)
    xq = (q.reshape(1, -1, 32) * sx[:, :, None].astype(np.float64)).reshape(1, K)
    mag = (np.abs(xq) @ np.abs(wf).T)[0, 0]
    assert abs(float(want) - (xq @ wf.T)[0, 0]) <= 1e-5 * mag
    assert abs(float(want) - (x.astype(np.float64) @ wf.T)[0, 0]) > 1e-5 * mag  # x was rounded: visibly


@SETTINGS
@given(M=st.integers(1, 20), N=st.integers(1, 45), nb=st.integers(1, 20),
       kind=st.sampled_from(["normal", "scaled", "sparse"]), bias=st.booleans(), seed=st.integers(0, 2**31))
def test_linear_q4_0_matches_twin_for_any_thread_count(simd, M, N, nb, kind, bias, seed):
    r = np.random.default_rng(seed)
    K = 32 * nb
    codes, scales = q4_0.from_gguf_blocks(_gguf_q4_0(r, N, K, kind))
    x = r.standard_normal((M, K), dtype=np.float32)
    b = r.standard_normal(N, dtype=np.float32) if bias else None
    y = nat.linear_q4_0(x, codes, scales, b, n_threads=1)
    assert y.shape == (M, N) and y.dtype == np.float32
    for t in (2, 3, 4):  # bitwise the same for any thread count
        np.testing.assert_array_equal(nat.linear_q4_0(x, codes, scales, b, n_threads=t), y)
    yr = q4_0.linear(x, codes, scales, b, dp_min_m=ref.DP_MIN_M)
    if M < ref.DP_MIN_M:
        np.testing.assert_array_equal(y, yr)  # decode: bitwise the twin, on every SIMD path
        for i in (0, M - 1):  # and row i of a batch is the row alone
            np.testing.assert_array_equal(nat.linear_q4_0(x[i:i + 1].copy(), codes, scales, b)[0], y[i])
    else:
        # prefill: bitwise the bfloat16_dp linear of bf16(W) (the int8 / int4 recipe) ...
        wb = ref.f32_to_bf16(q4_0.dequantize_q4_0(codes, scales))
        yb = nat.linear(x, wb, "bfloat16_dp", n_threads=2)
        np.testing.assert_array_equal(y, yb if b is None else yb + b)
        # ... which is the twin's product to float32 summation rounding
        xq, wq = ref._round_bf16(x), ref.bf16_to_f32(wb)
        bound = 2 * (K + 2) * 2.0**-24 * (np.abs(xq) @ np.abs(wq).T)
        if b is not None:
            bound += 2.0**-23 * (np.abs(yr) + np.abs(b))
        assert np.all(np.abs(y - yr) <= bound + 1e-30)


@pytest.mark.parametrize("K", [96, 1024, 2304])  # 1024: bf16 rows 2 KB apart, the padded-scratch path
@pytest.mark.parametrize("M", [8, 9, 31, 64])  # 16- and 32-row x panels and their tails
def test_linear_q4_0_prefill_bitwise_bf16dp_for_any_thread_count(simd, M, K):
    """prefill (csrc/g2_q4_0.c, g2_gemm_op_drive widen 3 with avx512_bf16): bitwise the bfloat16_dp linear of
    dequantize_q4_0's weights rounded to bf16, for 1..3 threads; N = 61 runs the 14/8/4/2/1-row tiles"""
    r = np.random.default_rng(M * 7919 + K)
    N = 61
    codes, scales = q4_0.from_gguf_blocks(_gguf_q4_0(r, N, K, "scaled"))
    x = r.standard_normal((M, K), dtype=np.float32)
    wb = ref.f32_to_bf16(q4_0.dequantize_q4_0(codes, scales))
    want = nat.linear(x, wb, "bfloat16_dp", n_threads=1)
    for t in (1, 2, 3):
        np.testing.assert_array_equal(nat.linear_q4_0(x, codes, scales, n_threads=t), want)
    # and each part of a fused call (gate/up-like) is the same product
    ys = nat.linear_q4_0_multi(x, [codes, codes[:17]], [scales, scales[:17]], n_threads=2)
    np.testing.assert_array_equal(ys[0], want)
    np.testing.assert_array_equal(ys[1], want[:, :17])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 7), N=st.sampled_from([1, 3, 7, 31, 45, 97]),
       nb=st.sampled_from([1, 3, 5, 37, 72, 112, 288]), seed=st.integers(0, 2**31))
def test_linear_q4_0_decode_gemma_shapes_bitwise_for_any_thread_count(simd, M, N, nb, seed):
    """K = 32 nb: odd block counts (a padded last group) and gemma-2's in_features 2304 / 3584 / 9216;
    odd N (4-row tiles and single rows); decode bitwise the twin for 1..4 threads, every row the row alone"""
    r = np.random.default_rng(seed)
    K = 32 * nb
    codes, scales = q4_0.from_gguf_blocks(_gguf_q4_0(r, N, K))
    x = r.standard_normal((M, K), dtype=np.float32)
    y = nat.linear_q4_0(x, codes, scales, n_threads=1)
    np.testing.assert_array_equal(y, q4_0.linear_decode(x, codes, scales))
    for t in (2, 3, 4):
        np.testing.assert_array_equal(nat.linear_q4_0(x, codes, scales, n_threads=t), y)
    np.testing.assert_array_equal(nat.linear_q4_0(x[-1:].copy(), codes, scales, n_threads=3), y[-1:])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 7), N=st.integers(1, 40), nb=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_linear_q4_0_decode_is_the_int8_x_product_of_dequantised(simd, M, N, nb, seed):
    """as numbers, the decode is the dequantised W's product with x, off by no more than rounding x to
    int8 per 32 (|x - xq| |w|) and the float32 scaling and sums cost; the x rounding is int4's"""
    r = np.random.default_rng(seed)
    K = 32 * nb
    x = r.standard_normal((M, K), dtype=np.float32)
    x[0, :32] *= 1e3  # an outlier block: its own scale, the others unaffected
    codes, scales = q4_0.from_gguf_blocks(_gguf_q4_0(r, N, K, "scaled"))
    y = nat.linear_q4_0(x, codes, scales, n_threads=2)
    q, sx = int4.quantize_x(x)
    xq = (q.reshape(M, -1, 32) * sx[:, :, None].astype(np.float64)).reshape(M, K)
    x64, w64 = x.astype(np.float64), q4_0.dequantize_q4_0(codes, scales).astype(np.float64)
    bound = np.abs(x64 - xq) @ np.abs(w64).T + 2 * (K + 2) * 2.0**-24 * (np.abs(xq) @ np.abs(w64).T)
    assert np.all(np.abs(y - x64 @ w64.T) <= bound * (1 + 1e-6) + 1e-30)
    assert np.all(np.abs(y - xq @ w64.T) <= 2 * (K + 2) * 2.0**-24 * (np.abs(xq) @ np.abs(w64).T) + 1e-30)


def test_linear_q4_0_decode_special_x(simd):
    """zero, tiny, huge, inf and NaN blocks of x (as int4's decode): the kernel equals the twin, an
    all-zero block adds nothing, and a non-finite block makes the output non-finite"""
    r = np.random.default_rng(7)
    K, N = 32 * 11, 9
    codes, scales = q4_0.from_gguf_blocks(_gguf_q4_0(r, N, K))
    x = r.standard_normal((7, K), dtype=np.float32)
    x[0, :32] = 0.0
    x[1, 32:64] *= 1e-38  # denormal-sized block: its own scale keeps it
    x[2, 64:96] *= 1e30
    x[3, 5] = np.inf
    x[4, 300] = np.nan  # in the last (padded) group
    x[5] = 0.0
    x[6, 320:352] = np.float32(1e-45)  # the smallest denormal: sx = 1e-45 / 127 underflows to 0, q = 0
    for t in (1, 2, 3):
        y = nat.linear_q4_0(x, codes, scales, n_threads=t)
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(y, q4_0.linear_decode(x, codes, scales))
    assert np.all(np.isfinite(y[:3])) and not np.any(np.isfinite(y[3:5])) and np.all(y[5] == 0)
    assert np.all(np.isfinite(y[6]))
    x0 = x[0].copy()
    x0[:32] = r.standard_normal(32)
    assert not np.array_equal(nat.linear_q4_0(x0[None], codes, scales)[0], y[0])  # the zero block was seen
    xt = np.zeros((1, K), np.float32)
    xt[0, 32:64] = x[1, 32:64]  # the denormal-sized block alone: a denormal, non-zero result, as the twin's
    yt = nat.linear_q4_0(xt, codes, scales)
    np.testing.assert_array_equal(yt, q4_0.linear_decode(xt, codes, scales))
    assert np.all(yt != 0) and np.all(np.abs(yt) < 1e-30)
    q, sx = int4.quantize_x(x)
    assert sx[0, 0] == 0 and np.all(q[0, :32] == 0) and sx[6, 10] == 0 and np.all(q[6, 320:352] == 0)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.sampled_from([1, 4, 7, 8, 19]), Ns=st.lists(st.integers(0, 37), min_size=1, max_size=4),
       nb=st.sampled_from([1, 5, 8]), threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31))
def test_linear_q4_0_multi_equals_separate_calls(simd, M, Ns, nb, threads, seed):
    """q/k/v or gate/up in one call (x quantised once): each result bitwise linear_q4_0's, empty parts too"""
    r = np.random.default_rng(seed)
    K = 32 * nb
    x = r.standard_normal((M, K), dtype=np.float32)
    packed = [q4_0.from_gguf_blocks(_gguf_q4_0(r, n, K)) if n else
              (np.zeros((0, K // 2), np.uint8), np.zeros((0, nb), np.uint16)) for n in Ns]
    ys = nat.linear_q4_0_multi(x, [c for c, _ in packed], [s for _, s in packed], n_threads=threads)
    assert len(ys) == len(Ns)
    for y, (c, s), n in zip(ys, packed, Ns):
        assert y.shape == (M, n)
        np.testing.assert_array_equal(y, nat.linear_q4_0(x, c, s, n_threads=1))


@pytest.mark.parametrize("M", [1, 5, 9])
def test_native_backend_linear_many_fuses_q4_0(M):
    """NativeBackend.linear_many (q/k/v, gate/up) on q4_0 handles: each output bitwise linear(x, h) and,
    decoding, bitwise the twin backend's; a handle with a bias falls back to separate calls alike"""
    from gemma2np.kernels.handles import LinearHandle
    from gemma2np.kernels.native import NativeBackend

    r = np.random.default_rng(M)
    K = 32 * 9
    hs = [LinearHandle("q4_0", *q4_0.from_gguf_blocks(_gguf_q4_0(r, n, K)), block=32) for n in (24, 8, 8)]
    x = r.standard_normal((1, M, K), dtype=np.float32)
    be, tw = NativeBackend(n_threads=2), ref.TwinBackend()
    ys = be.linear_many(x, hs)
    for y, h in zip(ys, hs):
        assert y.shape == (1, M, h.out_features)
        np.testing.assert_array_equal(y, be.linear(x, h))
    if M < ref.DP_MIN_M:
        for y, yt in zip(ys, tw.linear_many(x, hs)):
            np.testing.assert_array_equal(y, yt)
    hb = LinearHandle("q4_0", hs[1].w, hs[1].scales, 32, r.standard_normal(8, dtype=np.float32))
    for y, h in zip(be.linear_many(x, [hs[0], hb]), [hs[0], hb]):
        np.testing.assert_array_equal(y, be.linear(x, h))


def test_linear_q4_0_multi_bad_input():
    r = np.random.default_rng(0)
    c, s = q4_0.from_gguf_blocks(_gguf_q4_0(r, 3, 64))
    c2, s2 = q4_0.from_gguf_blocks(_gguf_q4_0(r, 3, 96))
    x = np.zeros((1, 64), np.float32)
    with pytest.raises(ValueError, match="matrix 1 expects 96"):
        nat.linear_q4_0_multi(x, [c, c2], [s, s2])
    with pytest.raises(ValueError, match="pairs"):
        nat.linear_q4_0_multi(x, [c], [s, s])
    with pytest.raises(ValueError, match="pairs"):
        nat.linear_q4_0_multi(x, [c] * (nat.MAX_PARTS + 1), [s] * (nat.MAX_PARTS + 1))
    with pytest.raises(ValueError, match="scales must have shape"):
        nat.linear_q4_0_multi(x, [c], [s[:, :1].copy()])


def test_linear_q4_0_bad_input():
    codes = np.zeros((3, 16), np.uint8)
    scales = np.zeros((3, 1), np.uint16)
    x = np.zeros((1, 32), np.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        nat.linear_q4_0(np.zeros((1, 34), np.float32), np.zeros((3, 17), np.uint8), scales)
    with pytest.raises(ValueError, match="scales must have shape"):
        nat.linear_q4_0(x, codes, np.zeros((3, 2), np.uint16))
    with pytest.raises(ValueError, match="features"):
        nat.linear_q4_0(np.zeros((1, 64), np.float32), codes, scales)
    with pytest.raises((TypeError, ValueError)):
        nat.linear_q4_0(x, codes, scales.astype(np.float32))
    with pytest.raises(ValueError, match="18-byte"):
        q4_0.from_gguf_blocks(np.zeros((2, 20), np.uint8))
