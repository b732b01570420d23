"""The int4 weight format (gemma2np/kernels/int4.py) and its C kernels (csrc/g2_int4.c).

Layers: the quantiser and its layout (NumPy); the C dequantiser bitwise against the twin; the C
linear against the twin over odd row counts, batch sizes and thread counts, on every SIMD level, and
bitwise the same for any thread count; the backends and from_pretrained(weights="int4").
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma2np.kernels import int4
from gemma2np.kernels import twins as ref

nat = pytest.importorskip("gemma2np._native")

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
SIMD_LEVELS = [1, 2, 0] if "avx512f" in nat.cpu_features() else [0]


@pytest.fixture(params=SIMD_LEVELS, ids=lambda l: {0: "scalar", 1: "avx512", 2: "avx512-nobf16"}[l])
def simd(request):
    assert nat.set_simd(request.param) == request.param
    yield request.param
    nat.set_simd(1)


@pytest.fixture(autouse=True, scope="module")
def _always_fan_out():
    """threshold 0: the small shapes here run the threaded code at n_threads 2 and 3"""
    before = nat.get_parallel_threshold()
    nat.set_parallel_threshold(0)
    yield
    nat.set_parallel_threshold(before)


def _weights(r, N, K, kind):
    w = r.standard_normal((N, K), dtype=np.float32)
    if kind == "scaled":  # rows and sub-blocks of very different magnitude, some tiny (f16 denormal d)
        w *= (10.0 ** r.uniform(-7, 2, size=(N, K // 32, 1))).repeat(32, axis=2).reshape(N, K).astype(np.float32)
    elif kind == "positive":  # sub-blocks with min > 0: the min is clamped to 0, the scale refitted
        w = np.abs(w) + 1.0
    elif kind == "sparse":  # zero sub-blocks and rows, constant sub-blocks
        w[:, : K // 2] = 0.0
        w[0] = 0.0
        w[:, -32:] = 0.75
    return w


# ----------------------------------------------------------------------------- format (NumPy)


def test_layout_is_4_5_bits_per_weight_and_decodes_as_documented():
    r = np.random.default_rng(0)
    w = r.standard_normal((3, 512), dtype=np.float32)
    codes, meta = int4.quantize_int4(w)
    assert codes.shape == (3, 256) and meta.shape == (3, 32) and codes.dtype == meta.dtype == np.uint8
    assert (codes.nbytes + meta.nbytes) * 8 / w.size == 4.5
    # decode weight (row 2, input k) by hand from the module doc's layout
    for k in (0, 1, 31, 32, 255, 256, 300, 511):
        s, j = k // 256, (k % 256) // 32
        mb = meta[2, 16 * s: 16 * s + 16]
        d = float(mb[0:2].view("<f2")[0])
        dmin = float(mb[2:4].view("<f2")[0])
        bits = int.from_bytes(mb[4:].tobytes(), "little")
        six = [(int.from_bytes(mb[4 + 3 * g: 7 + 3 * g].tobytes(), "little") >> (6 * t)) & 63
               for g in range(4) for t in range(4)]
        assert bits & 63 == six[0]
        u = (codes[2, k // 2] >> (4 * (k % 2))) & 15
        want = np.float32(np.float32(d) * np.float32(six[j])) * np.float32(u) - np.float32(np.float32(dmin) * np.float32(six[8 + j]))
        assert int4.dequantize_int4(codes, meta)[2, k] == want


def _q4_0_error(w):
    """llama.cpp Q4_0 (the same 4.5 bits/weight): d = signed absmax / -8, q = round(w / d) + 8 in 0..15"""
    x = w.reshape(-1, 32).astype(np.float64)
    mx = x[np.arange(len(x)), np.argmax(np.abs(x), axis=1)]
    d = mx / -8.0
    q = np.clip(np.rint(x / np.where(d == 0, 1, d)[:, None]) + 8, 0, 15)
    return np.mean(((q - 8) * d[:, None] - x) ** 2)


def _minmax_error(w):
    """plain asymmetric min/max rounding per 32 (Q4_1's rule, without the search)"""
    x = w.reshape(-1, 32).astype(np.float64)
    lo, hi = np.minimum(x.min(axis=1), 0), x.max(axis=1)
    d = (hi - lo) / 15
    q = np.clip(np.rint((x - lo[:, None]) / np.where(d == 0, 1, d)[:, None]), 0, 15)
    return np.mean((q * d[:, None] + lo[:, None] - x) ** 2)


@pytest.mark.parametrize("dist", ["normal", "laplace", "student3"])
def test_rmse_search_beats_absmax_rounding(dist):
    r = np.random.default_rng(1)
    shape = (64, 2304)
    w = {"normal": lambda: r.standard_normal(shape), "laplace": lambda: r.laplace(size=shape),
         "student3": lambda: r.standard_t(3, size=shape)}[dist]().astype(np.float32)
    err = np.mean((int4.dequantize_int4(*int4.quantize_int4(w)).astype(np.float64) - w) ** 2)
    assert err < 0.85 * _q4_0_error(w)
    assert err < _minmax_error(w)


@pytest.mark.parametrize("kind", ["normal", "scaled", "positive", "sparse"])
def test_quantiser_edge_blocks(kind):
    r = np.random.default_rng(2)
    w = _weights(r, 7, 512, kind)
    d = int4.dequantize_int4(*int4.quantize_int4(w))
    assert np.all(np.isfinite(d))
    blocks, dq = w.reshape(-1, 32), d.reshape(-1, 32)
    zero = np.all(blocks == 0, axis=1)
    assert np.all(dq[zero] == 0)  # an all-zero sub-block (and row) stays exactly zero
    # every weight is within about a step of its sub-block's grid, (max - min(min, 0)) / 15, plus what the
    # 6-bit rounding of the sub-block scales/mins against the super-block's largest (span S) costs: ~S / 63
    # each (a sub-block 126x smaller than its super-block's largest gets scale 0: all its weights -> -min)
    span = blocks.max(axis=1) - np.minimum(blocks.min(axis=1), 0)
    sup = np.repeat(span.reshape(-1, int4.NSUB).max(axis=1), int4.NSUB)
    assert np.all(np.abs(dq - blocks) <= span[:, None] / 15 * 1.6 + 2 * sup[:, None] / 63 + 1e-30)
    if kind != "scaled":  # one super-block-wide scale range: the sub-block step alone bounds the error
        assert np.all(np.abs(dq - blocks) <= span[:, None] / 15 * 1.6 + 1e-30)


def test_quantize_rows_equals_whole_and_checks_shape():
    r = np.random.default_rng(3)
    w = r.standard_normal((50, 256), dtype=np.float32)
    whole = int4.quantize_int4(w)
    released = []
    chunked = int4.quantize_rows(w.astype(ref.BF16).astype(np.float32), chunk_bytes=256 * 4 * 8,
                                 release=released.append)
    for t in (1, 3):
        c2, m2 = int4.quantize_rows(w, chunk_bytes=256 * 4 * 8, n_threads=t)
        np.testing.assert_array_equal(c2, whole[0])
        np.testing.assert_array_equal(m2, whole[1])
    assert len(released) == 7 and chunked[0].shape == whole[0].shape
    with pytest.raises(ValueError, match="multiple of 256"):
        int4.quantize_int4(np.zeros((2, 320), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        int4.quantize_int4(np.zeros(256, np.float32))


# ----------------------------------------------------------------------------- C kernels


@SETTINGS
@given(N=st.integers(1, 45), nsb=st.integers(1, 3), kind=st.sampled_from(["normal", "scaled", "positive", "sparse"]),
       threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31))
def test_dequantize_native_matches_twin(simd, N, nsb, kind, threads, seed):
    r = np.random.default_rng(seed)
    codes, meta = int4.quantize_int4(_weights(r, N, 256 * nsb, kind))
    np.testing.assert_array_equal(nat.dequantize_int4(codes, meta, n_threads=threads),
                                  int4.dequantize_int4(codes, meta))


def test_dequantize_native_f16_special_values(simd):
    """every f16 bit pattern of d (denormals, inf, NaN) widens as numpy's float16 -> float32 does"""
    codes = np.full((1, 128), 0x5A, np.uint8)
    meta = np.zeros((1, 16), np.uint8)
    meta[0, 4:] = int4._pack6(np.arange(16, dtype=np.uint32)[None] * 4 % 64)
    for h in list(range(0, 0x0400, 37)) + [0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0x8001, 0xFBFF]:
        meta[0, 0:2] = np.array([h], "<u2").view(np.uint8)
        meta[0, 2:4] = np.array([h ^ 0x8000], "<u2").view(np.uint8)
        with np.errstate(invalid="ignore"):
            want = int4.dequantize_int4(codes, meta)
        np.testing.assert_array_equal(nat.dequantize_int4(codes, meta), want)


@SETTINGS
@given(M=st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 17, 33]), N=st.integers(1, 45), nsb=st.integers(1, 3),
       kind=st.sampled_from(["normal", "scaled", "sparse"]), bias=st.booleans(),
       threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31))
def test_linear_int4_matches_twin(simd, M, N, nsb, kind, bias, threads, seed):
    r = np.random.default_rng(seed)
    K = 256 * nsb
    x = r.standard_normal((M, K), dtype=np.float32)
    codes, meta = int4.quantize_int4(_weights(r, N, K, kind))
    b = r.standard_normal(N, dtype=np.float32) if bias else None
    y = nat.linear_int4(x, codes, meta, b, n_threads=threads)
    yr = ref.linear(x, codes, "int4", meta, b, int4.SUPER)
    assert y.shape == (M, N) and y.dtype == np.float32
    xq, wq = ref.linear_operands(x, codes, "int4", meta, int4.SUPER)
    # any summation order of x . w, or of the decode kernel's two sums (see int4.magnitudes_int4), is
    # within 2 * K * u of the exact result relative to the magnitudes summed (u = 2^-24); xq is the
    # int8-rounded x the decode kernel multiplies
    bound = 2 * (K + 2) * 2.0**-24 * (np.abs(xq) @ (np.abs(wq) + int4.magnitudes_int4(codes, meta)).T)
    if b is not None:
        bound += 2.0**-23 * (np.abs(yr) + np.abs(b))
    assert np.all(np.abs(y - yr) <= bound + 1e-30), np.max(np.abs(y - yr) - bound)
    if M < ref.DP_MIN_M:  # decode: the twin replays the kernel's integer and float steps
        np.testing.assert_array_equal(y, yr)
    # bitwise: any thread count; row i of a batch == the row alone (at >= DP_MIN_M rows: among DP_MIN_M copies)
    for t in (1, 2, 3):
        np.testing.assert_array_equal(nat.linear_int4(x, codes, meta, b, n_threads=t), y)
    for i in (0, M - 1):
        xi = np.repeat(x[i:i + 1], ref.DP_MIN_M, axis=0) if M >= ref.DP_MIN_M else x[i:i + 1].copy()
        np.testing.assert_array_equal(nat.linear_int4(xi, codes, meta, b, n_threads=2)[:1], y[i:i + 1])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.sampled_from([1, 3, 8, 21]), N=st.integers(1, 70), nsb=st.integers(1, 2),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**31))
def test_linear_int4_is_bf16_linear_or_int8_x_product_of_dequantised(simd, M, N, nsb, threads, seed):
    """Bitwise: prefill is the bfloat16_dp linear of bf16(W) -- the int8 recipe. Decode (M < DP_MIN_M)
    is the twin int4.linear_decode on every SIMD level; as numbers, the dequantised W's product with
    x, off by no more than what rounding x to int8 per 32 (|x - xq| |w|) and the float sums cost."""
    r = np.random.default_rng(seed)
    K = 256 * nsb
    x = r.standard_normal((M, K), dtype=np.float32)
    x[0, :32] *= 1e3  # an outlier block: its own scale, the others unaffected
    codes, meta = int4.quantize_int4(_weights(r, N, K, "scaled"))
    wf = int4.dequantize_int4(codes, meta)
    y = nat.linear_int4(x, codes, meta, n_threads=threads)
    if M >= ref.DP_MIN_M:
        np.testing.assert_array_equal(y, nat.linear(x, ref.to_bf16_bits(wf), "bfloat16_dp", n_threads=threads))
    else:
        np.testing.assert_array_equal(y, int4.linear_decode(x, codes, meta))
        xq, _ = ref.linear_operands(x, codes, "int4", meta, int4.SUPER)
        x64, w64 = x.astype(np.float64), wf.astype(np.float64)
        bound = np.abs(x64 - xq) @ np.abs(w64).T + 2 * (K + 2) * 2.0**-24 * (np.abs(xq) @ int4.magnitudes_int4(codes, meta).T)
        assert np.all(np.abs(y - x64 @ w64.T) <= bound * (1 + 1e-6) + 1e-30)
        # the x rounding is the documented one: |x - xq| <= sx / 2 per block, sx = amax / 127
        q, sx = int4.quantize_x(x)
        amax = np.abs(x.reshape(M, -1, 32)).max(axis=2)
        np.testing.assert_array_equal(sx, amax / np.float32(127))
        assert np.all(np.abs(x.reshape(M, -1, 32) - q.reshape(M, -1, 32) * sx[:, :, None]) <= sx[:, :, None] * 0.5001)
        assert np.abs(q).max() <= 127 and np.all(np.abs(q.reshape(M, -1, 32)).max(axis=2) == 127)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.sampled_from([1, 2, 5, 7, 9, 16, 19]), N=st.sampled_from([1, 3, 7, 31, 45, 97]),
       K=st.sampled_from([256, 2304, 9216]), seed=st.integers(0, 2**31))
def test_linear_int4_gemma_shapes_bitwise_for_any_thread_count(simd, M, N, K, seed):
    """K = 256 and the gemma-2 in_features (2304 / 9216-like), odd N, decode and prefill batches:
    bitwise the same for 1..4 threads, decode bitwise the twin, every row the row alone."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((M, K), dtype=np.float32)
    codes, meta = int4.quantize_int4(r.standard_normal((N, K), dtype=np.float32))
    y = nat.linear_int4(x, codes, meta, n_threads=1)
    for t in (2, 3, 4):
        np.testing.assert_array_equal(nat.linear_int4(x, codes, meta, n_threads=t), y)
    if M < ref.DP_MIN_M:
        np.testing.assert_array_equal(y, ref.linear(x, codes, "int4", meta, None, int4.SUPER))
        np.testing.assert_array_equal(nat.linear_int4(x[-1:].copy(), codes, meta, n_threads=3), y[-1:])
    else:
        np.testing.assert_array_equal(nat.linear_int4(x[-ref.DP_MIN_M:].copy(), codes, meta, n_threads=3),
                                      y[-ref.DP_MIN_M:])


def test_linear_int4_decode_special_x(simd):
    """zero, tiny, huge, inf and NaN blocks of x: the kernel equals the twin, an all-zero block adds
    nothing, and a non-finite block makes the output non-finite (never a silently finite result)"""
    r = np.random.default_rng(7)
    K, N = 512, 9
    codes, meta = int4.quantize_int4(r.standard_normal((N, K), dtype=np.float32))
    x = r.standard_normal((6, K), dtype=np.float32)
    x[0, :32] = 0.0
    x[1, 32:64] *= 1e-38  # denormal-sized block: its own scale keeps it
    x[2, 64:96] *= 1e30
    x[3, 5] = np.inf
    x[4, 300] = np.nan
    x[5] = 0.0
    y = nat.linear_int4(x, codes, meta, n_threads=2)
    with np.errstate(invalid="ignore"):
        yt = int4.linear_decode(x, codes, meta)
    np.testing.assert_array_equal(y, yt)
    assert np.all(np.isfinite(y[:3])) and not np.any(np.isfinite(y[3:5])) and np.all(y[5] == 0)
    x0 = x[0].copy()
    x0[:32] = r.standard_normal(32)
    y0 = nat.linear_int4(x0[None], codes, meta)
    assert not np.array_equal(y0[0], y[0])  # the zero block was seen as zero, not skipped by accident
    q, sx = int4.quantize_x(x[:1])
    assert sx[0, 0] == 0 and np.all(q[0, :32] == 0)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.sampled_from([1, 4, 8, 19]), Ns=st.lists(st.integers(0, 37), min_size=1, max_size=4),
       nsb=st.integers(1, 2), threads=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**31))
def test_linear_int4_multi_equals_separate_calls(simd, M, Ns, nsb, threads, seed):
    """q/k/v-style: one call over several matrices (x quantised / packed once) is bitwise each
    matrix's own linear_int4, for any thread count (empty matrices included)"""
    r = np.random.default_rng(seed)
    K = 256 * nsb
    x = r.standard_normal((M, K), dtype=np.float32)
    packed = [int4.quantize_int4(r.standard_normal((N, K), dtype=np.float32)) for N in Ns]
    ys = nat.linear_int4_multi(x, [c for c, _ in packed], [m for _, m in packed], n_threads=threads)
    assert len(ys) == len(Ns)
    for y, (c, m), N in zip(ys, packed, Ns):
        assert y.shape == (M, N)
        np.testing.assert_array_equal(y, nat.linear_int4(x, c, m, n_threads=1))


def test_linear_int4_multi_bad_input():
    c, m = int4.quantize_int4(np.ones((3, 512), np.float32))
    c2, m2 = int4.quantize_int4(np.ones((3, 256), np.float32))
    x = np.ones((2, 512), np.float32)
    with pytest.raises(ValueError, match="expects 256"):
        nat.linear_int4_multi(x, [c, c2], [m, m2])
    with pytest.raises(ValueError, match="pairs"):
        nat.linear_int4_multi(x, [c], [m, m])
    with pytest.raises(ValueError, match="pairs"):
        nat.linear_int4_multi(x, [c] * (nat.MAX_PARTS + 1), [m] * (nat.MAX_PARTS + 1))
    with pytest.raises(ValueError, match="meta"):
        nat.linear_int4_multi(x, [c], [m[:, :16]])


def test_linear_int4_bad_input():
    codes, meta = int4.quantize_int4(np.ones((3, 512), np.float32))
    x = np.ones((2, 512), np.float32)
    with pytest.raises(ValueError, match="features"):
        nat.linear_int4(np.ones((2, 256), np.float32), codes, meta)
    with pytest.raises(ValueError, match="meta"):
        nat.linear_int4(x, codes, meta[:, :16])
    with pytest.raises(ValueError, match="meta"):
        nat.linear_int4(x, codes, meta[:2])
    with pytest.raises(ValueError, match="multiple of 256"):
        nat.linear_int4(np.ones((2, 320), np.float32), np.zeros((3, 160), np.uint8), np.zeros((3, 16), np.uint8))
    with pytest.raises(ValueError, match="bias"):
        nat.linear_int4(x, codes, meta, np.ones(4, np.float32))
    with pytest.raises((TypeError, ValueError)):
        nat.linear_int4(x, codes.view(np.int8), meta)
    with pytest.raises((TypeError, ValueError)):
        nat.linear_int4(x.astype(np.float64), codes, meta)
    with pytest.raises((TypeError, ValueError)):
        nat.dequantize_int4(codes[:, ::2], meta)
    assert nat.linear_int4(np.ones((0, 512), np.float32), codes, meta).shape == (0, 3)


# ----------------------------------------------------------------------------- backends and the model


def test_backends_pack_int4_alike_and_fall_back_to_int8_for_odd_in_features(tmp_path):
    from gemma2np.kernels.native import NativeBackend
    r = np.random.default_rng(4)
    w = r.standard_normal((33, 512), dtype=np.float32).astype(ref.BF16)
    mm = np.memmap(tmp_path / "w.bin", dtype=ref.BF16, mode="w+", shape=w.shape)
    mm[:] = w
    mm.flush()
    be = NativeBackend(n_threads=2)
    h = be.prepare_linear(np.memmap(tmp_path / "w.bin", dtype=ref.BF16, mode="r", shape=w.shape), weights="int4")
    ht = ref.TwinBackend().prepare_linear(w, weights="int4")
    assert h.fmt == ht.fmt == "int4" and (h.out_features, h.in_features) == (33, 512)
    np.testing.assert_array_equal(h.w, ht.w)
    np.testing.assert_array_equal(h.scales, ht.scales)
    assert h.nbytes * 8 / w.size == 4.5
    x = r.standard_normal((2, 3, 512), dtype=np.float32)
    y = be.linear(x, h)
    assert y.shape == (2, 3, 33)
    np.testing.assert_array_equal(y.reshape(6, 33), nat.linear_int4(x.reshape(6, 512), h.w, h.scales, n_threads=2))
    y2 = be.linear_many(x, [h, h])
    np.testing.assert_array_equal(y2[0], y)
    odd = be.prepare_linear(w[:, :320], weights="int4")
    assert odd.fmt == ref.TwinBackend().prepare_linear(w[:, :320], weights="int4").fmt == "int8"


BUNDLED = __import__("pathlib").Path(__file__).resolve().parents[1] / "gemma2np" / "data" / "gemma2-shakespeare"


def test_from_pretrained_int4_native_equals_twins_and_keeps_the_head_int8():
    from gemma2np import Gemma2ForCausalLM
    ids = np.array([[2, 45, 300, 17, 999, 4000, 12, 7, 88, 1023, 5]])
    nat_m = Gemma2ForCausalLM.from_pretrained(BUNDLED, backend="native", weights="int4", n_threads=2)
    twin_m = Gemma2ForCausalLM.from_pretrained(BUNDLED, backend="twins", weights="int4")
    f32_m = Gemma2ForCausalLM.from_pretrained(BUNDLED, backend="numpy")
    assert nat_m.weights_format == "int4"
    assert nat_m.layers[0].q_proj.fmt == "int4" and nat_m.lm_head.fmt == "int8"
    for n_tok in (ids.shape[1], 1):  # prefill (>= DP_MIN_M rows) and decode
        a = nat_m(ids[:, :n_tok]).logits
        b = twin_m(ids[:, :n_tok]).logits
        c = f32_m(ids[:, :n_tok]).logits
        # same weights; the kernels' summation orders and polynomial exp differ from the twins by ulps, which
        # at >= DP_MIN_M tokens can flip the bf16 rounding of an activation (a 2^-9 step; int8 alike)
        np.testing.assert_allclose(a, b, atol=5e-2 if n_tok >= ref.DP_MIN_M else 1e-3, rtol=0)
        assert np.max(np.abs(a - c)) > 1e-3  # it is not float32 ...
        assert np.mean(np.argmax(a, -1) == np.argmax(c, -1)) >= 0.8  # ... but close to it


def test_cli_weights_int4_runs_native_and_info_counts_its_bytes(capsys):
    import json

    from gemma2np.cli import main
    from gemma2np import Gemma2ForCausalLM
    assert main(["generate", "--model", str(BUNDLED), "--weights", "int4", "--prompt", "To be",
                 "--max-new-tokens", "4", "-v"]) == 0
    out = capsys.readouterr()
    assert "int4" in out.out + out.err
    assert main(["info", "--model", str(BUNDLED), "--json"]) == 0
    wb = json.loads(capsys.readouterr().out)["weight_bytes"]
    m = Gemma2ForCausalLM.from_pretrained(BUNDLED, backend="native", weights="int4")
    mats = [getattr(l, n) for l in m.layers for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj")] + [m.lm_head]
    vec_bytes = wb["float32"] - 4 * sum(h.out_features * h.in_features for h in mats)
    assert wb["int4"] == sum(h.nbytes for h in mats) + vec_bytes  # the handles' bytes exactly
    assert wb["int4"] < wb["int8"]


_GFNI_OFF_SCRIPT = r"""
import numpy as np
from gemma2np import _native as nat
from gemma2np.kernels import int4, q4_0
r = np.random.default_rng(5)
nat.set_parallel_threshold(0)
for N, K, M in ((1, 256, 1), (7, 512, 2), (13, 2304, 3), (4, 768, 7)):
    w = r.standard_normal((N, K), dtype=np.float32)
    codes, meta = int4.quantize_int4(w)
    qc = r.integers(0, 256, (N, K // 2), dtype=np.uint8)
    qs = (r.standard_normal((N, K // 32)) * 0.01).astype(np.float16).view(np.uint16)
    x = r.standard_normal((M, K), dtype=np.float32)
    for t in (1, 2, 3):
        np.testing.assert_array_equal(nat.linear_int4(x, codes, meta, n_threads=t), int4.linear_decode(x, codes, meta))
        np.testing.assert_array_equal(nat.linear_q4_0(x, qc, qs, n_threads=t), q4_0.linear_decode(x, qc, qs))
print("ok")
"""


@pytest.mark.skipif("avx512vnni" not in nat.cpu_features(), reason="needs AVX-512 VNNI")
def test_decode_without_gfni_matches_twin():
    """G2_GFNI=0 (read once per process, hence a subprocess): the VNNI decode tiles with the two-op high
    nibble step, which GFNI CPUs otherwise never run, are bitwise the twins too (int4 and q4_0)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, G2_GFNI="0", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _GFNI_OFF_SCRIPT], capture_output=True, text=True, timeout=240,
                       env=env, cwd=root)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
