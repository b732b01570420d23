"""The C int4 quantiser (csrc/g2_int4_quant.c) against its NumPy twin (kernels/int4.py _quantize).

Layers: the C kernel bitwise against the twin -- codes, meta and the per-row status -- over shapes
(K a multiple of 256, odd row counts), distributions (Gaussian, Laplace, heavy tails, zero and
constant rows, magnitudes from denormal to too large for float16 scales, NaN / inf), float32 and bf16
input, every SIMD level and 1..4 threads; the wrapper's argument checks; the typed error the twin,
TwinBackend and NativeBackend raise for a row int4 cannot hold; NativeBackend's chunked path.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma2np.kernels import int4
from gemma2np.kernels import twins as ref

nat = pytest.importorskip("gemma2np._native")

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
SIMD_LEVELS = [1, 2, 0] if "avx512f" in nat.cpu_features() else [0]
KINDS = ["gauss", "laplace", "cauchy", "student2", "zero_rows", "const_rows", "const_subblocks", "positive",
         "negative", "magnitudes", "tiny", "denormal", "huge", "nonfinite", "bf16_grid", "ties"]


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


def _weights(seed, N, K, kind, scale_exp):
    """(N, K) float32 test weights of one kind, times 10**scale_exp for the magnitude-free kinds"""
    r = np.random.default_rng(seed)
    f = np.float32
    s = f(10.0 ** scale_exp)
    if kind == "gauss":
        w = r.standard_normal((N, K)) * s
    elif kind == "laplace":
        w = r.laplace(size=(N, K)) * s
    elif kind == "cauchy":  # heavy tails: a few weights 1e3..1e6 x the rest in one sub-block
        w = r.standard_cauchy((N, K)) * s
    elif kind == "student2":
        w = r.standard_t(2, size=(N, K)) * s
    elif kind == "zero_rows":  # zero rows, zero sub-blocks, -0.0 rows
        w = r.standard_normal((N, K)) * s
        w[::2] = 0.0
        w[:, 32:96] = 0.0
        if N > 1:
            w[1] = -0.0
    elif kind == "const_rows":  # a row of one value (positive, negative), and a sub-block of one value
        w = np.repeat(r.choice([-1.5, -0.25, 0.5, 3.0], size=(N, 1)) * s, K, axis=1)
        w[:, :32] = r.standard_normal((N, 32)) * s
    elif kind == "const_subblocks":  # every sub-block constant, values differing by sub-block
        w = np.repeat(r.standard_normal((N, K // 32)) * s, 32, axis=1)
    elif kind == "positive":  # min > 0: the min is clamped to 0, the scale refitted
        w = np.abs(r.standard_normal((N, K))) * s + s
    elif kind == "negative":
        w = -np.abs(r.standard_normal((N, K))) * s - s
    elif kind == "magnitudes":  # sub-blocks from 1e-12 to 1e5 in one super-block (f16 d / dmin from 0 to normal)
        w = r.standard_normal((N, K)) * np.repeat(10.0 ** r.uniform(-12, 5, size=(N, K // 32)), 32, axis=1)
    elif kind == "tiny":  # d and dmin are float16 denormals or underflow to 0
        w = r.standard_normal((N, K)) * 10.0 ** r.uniform(-9, -4)
    elif kind == "denormal":  # float32 denormal inputs
        w = r.standard_normal((N, K)) * 1e-39
        w[:, ::3] = r.standard_normal((N, len(range(0, K, 3)))) * 1e-44
    elif kind == "huge":  # around where dmin * 63 / d * 63 overflow float16, and beyond 2^40
        w = r.standard_normal((N, K)) * 10.0 ** r.uniform(5, 7.5, size=(N, 1))
        if N > 2:
            w[2, 7] = 3e12
    elif kind == "nonfinite":
        w = r.standard_normal((N, K)) * s
        bad = r.integers(0, N * K, size=max(1, N // 2))
        w.reshape(-1)[bad] = r.choice([np.nan, np.inf, -np.inf], size=bad.size)
    elif kind == "bf16_grid":  # few distinct values: many equal candidates and rounding ties
        w = r.integers(-8, 8, size=(N, K)) * s / 4
    elif kind == "ties":  # a sub-block spanning 0..15 exactly: every code lands on .5 boundaries of some candidate
        w = np.tile(np.arange(32) / 2.0, (N, K // 32)) * s
    else:
        raise AssertionError(kind)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(w, dtype=f)


def _native(w, bf16, threads):
    if bf16:
        return nat.quantize_int4(np.ascontiguousarray(w.astype(ref.BF16)).view(np.uint16), n_threads=threads)
    return nat.quantize_int4(w, n_threads=threads)


def _twin(w, bf16):
    return int4._quantize(w.astype(ref.BF16) if bf16 else w)


@SETTINGS
@given(N=st.integers(1, 9), nsb=st.sampled_from([1, 2, 3, 9]), kind=st.sampled_from(KINDS),
       scale_exp=st.sampled_from([-30, -6, 0, 3]), bf16=st.booleans(), threads=st.integers(1, 4),
       seed=st.integers(0, 2 ** 32 - 1))
def test_native_quantiser_is_bitwise_the_twin(simd, N, nsb, kind, scale_exp, bf16, threads, seed):
    w = _weights(seed, N, 256 * nsb, kind, scale_exp)
    codes, meta, status = _native(w, bf16, threads)
    tc, tm, ts = _twin(w, bf16)
    np.testing.assert_array_equal(status, ts)
    np.testing.assert_array_equal(codes, tc)
    np.testing.assert_array_equal(meta, tm)
    assert codes.shape == (N, 128 * nsb) and meta.shape == (N, 16 * nsb)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_quantises_as_the_twin_at_the_2b_width(simd, kind):
    """one gemma-2-2b-wide matrix (K = 2304, 9 super-blocks) per kind, threads 1 and 3"""
    w = _weights(11, 13, 2304, kind, 0)
    tc, tm, ts = int4._quantize(w)
    for t in (1, 3):
        c, m, s = nat.quantize_int4(w, n_threads=t)
        np.testing.assert_array_equal(s, ts)
        np.testing.assert_array_equal(c, tc)
        np.testing.assert_array_equal(m, tm)


def test_statuses_cover_each_case_and_bad_rows_hold_zeros_codes():
    """the kinds meant to hit each status do (so the comparisons above are not all of ok rows)"""
    ok = int4.STATUS_OK
    w = _weights(3, 6, 512, "nonfinite", 0)
    _, _, s = int4._quantize(w)
    assert set(s.tolist()) >= {int4.STATUS_NONFINITE}
    big = np.ones((4, 512), np.float32)
    big[1, 3] = 1e8  # a sub-block scale ~1e8 / 15 > 63 * 65504: d overflows float16
    big[2, 9] = -5e6  # a min below -63 * 65504: dmin overflows
    big[3, 0] = 2e12  # beyond 2^40: rejected before the search
    c, m, s = int4._quantize(big)
    assert s.tolist() == [ok, int4.STATUS_TOO_LARGE, int4.STATUS_TOO_LARGE, int4.STATUS_TOO_LARGE]
    zc, zm, _ = int4._quantize(np.zeros((1, 512), np.float32))
    np.testing.assert_array_equal(c[3], zc[0])  # a rejected row is quantised as zeros
    np.testing.assert_array_equal(m[3], zm[0])
    nc, nm, ns = nat.quantize_int4(big, n_threads=2)
    np.testing.assert_array_equal(ns, s)
    np.testing.assert_array_equal(nc, c)
    np.testing.assert_array_equal(nm, m)
    # the largest magnitudes that still fit decode to finite values near the input
    fit = np.full((1, 256), 3.5e6, np.float32)
    fit[0, ::2] = -3.5e6
    fc, fm = int4.quantize_int4(fit)
    d = int4.dequantize_int4(fc, fm)
    assert np.all(np.isfinite(d)) and np.max(np.abs(d - fit)) <= 7e6 / 15


def test_zero_meta_is_positive_zero():
    """d / dmin of a super-block without a positive scale / min are +0.0 (not a zero's sign)"""
    w = np.zeros((3, 256), np.float32)
    w[1] = -0.0  # every min is -0.0 (the search keeps min(x, 0)), their max too
    w[2, :128] = -0.0
    for c, m, _ in (int4._quantize(w), nat.quantize_int4(w, n_threads=1)):
        np.testing.assert_array_equal(m, 0)
        np.testing.assert_array_equal(c, 0)
        assert np.all(np.signbit(int4.dequantize_int4(c, m)) == False)  # noqa: E712


def test_native_wrapper_checks_its_arguments():
    w = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="multiple of 256"):
        nat.quantize_int4(np.zeros((2, 320), np.float32))
    with pytest.raises((TypeError, ValueError)):
        nat.quantize_int4(w.astype(np.float64))
    with pytest.raises((TypeError, ValueError)):
        nat.quantize_int4(np.zeros((2, 512), np.float32)[:, ::2])  # not contiguous
    with pytest.raises((TypeError, ValueError)):
        nat.quantize_int4(np.zeros(256, np.float32))
    c, m, s = nat.quantize_int4(np.zeros((0, 256), np.float32))
    assert c.shape == (0, 128) and m.shape == (0, 16) and s.shape == (0,)
    tc, tm, ts = int4._quantize(np.zeros((0, 256), np.float32))
    assert tc.shape == c.shape and tm.shape == m.shape and ts.shape == s.shape
    for q in (nat.quantize_int4, int4.quantize_int4):
        with pytest.raises(ValueError, match="positive multiple of 256"):
            q(np.zeros((3, 0), np.float32))


def _bad(kind, N=9, K=512, row=5):
    w = np.random.default_rng(1).standard_normal((N, K)).astype(np.float32)
    w[row, 100] = {"nan": np.nan, "inf": -np.inf, "large": -3e7}[kind]
    return w


@pytest.mark.parametrize("kind,match", [("nan", "row 5 .* NaN or infinite"), ("inf", "row 5 .* NaN or infinite"),
                                        ("large", "row 5 .* too large for int4")])
def test_rows_int4_cannot_hold_raise_a_typed_error_everywhere(kind, match):
    from gemma2np.kernels.native import NativeBackend
    from gemma2np.kernels.protocol import BackendError
    w = _bad(kind)
    assert issubclass(int4.QuantizationError, BackendError) and issubclass(int4.QuantizationError, ValueError)
    with pytest.raises(int4.QuantizationError, match=match):
        int4.quantize_int4(w)
    with pytest.raises(int4.QuantizationError, match=match):
        ref.TwinBackend().prepare_linear(w, weights="int4")
    with pytest.raises(int4.QuantizationError, match=match):
        NativeBackend(n_threads=2).prepare_linear(w.astype(ref.BF16), weights="int4")
    with pytest.raises(int4.QuantizationError, match=match):
        NativeBackend(n_threads=1).prepare_linear(w, weights="int4")
    # chunked: the row is numbered in the whole matrix
    with pytest.raises(int4.QuantizationError, match=match):
        int4.quantize_rows(w, chunk_bytes=512 * 4 * 2)
    # the first bad row is the one named, whatever the kind
    w2 = _bad("large", row=2)
    w2[7, 0] = np.nan
    with pytest.raises(int4.QuantizationError, match="row 2 "):
        NativeBackend(n_threads=2).prepare_linear(w2, weights="int4")
    with pytest.raises(int4.QuantizationError, match="row 2 "):
        int4.quantize_int4(w2)


def test_native_backend_quantises_in_chunks_like_the_twin(tmp_path, monkeypatch):
    """NativeBackend's chunked C path (pages released per chunk) equals the twin's quantize_rows on a
    memory-mapped bf16 tensor, with chunks of a few rows (the 32 MB chunk size made small)."""
    from gemma2np.kernels import native
    r = np.random.default_rng(5)
    w = (r.standard_normal((37, 768)) * 0.02).astype(ref.BF16)
    mm = np.memmap(tmp_path / "w.bin", dtype=ref.BF16, mode="w+", shape=w.shape)
    mm[:] = w
    mm.flush()
    released = []
    monkeypatch.setattr(native, "release_pages", lambda a: released.append(a.shape[0]))
    be = native.NativeBackend(n_threads=2)
    monkeypatch.setattr(be, "_int4_chunk_bytes", 768 * 2 * 5)
    h = be.prepare_linear(np.memmap(tmp_path / "w.bin", dtype=ref.BF16, mode="r", shape=w.shape), weights="int4")
    tc, tm = int4.quantize_rows(w, chunk_bytes=768 * 4 * 3)
    np.testing.assert_array_equal(h.w, tc)
    np.testing.assert_array_equal(h.scales, tm)
    assert sum(released) == 37 and len(released) == 8  # chunks of 5 rows
