"""The attention kernel (csrc/g2_attention.c) against its NumPy twin (kernels/twins.attention).

The kernel cuts the keys into fixed chunks of ATT_CHUNK keys, computes each chunk's partial softmax
and merges them in chunk order, on one of two schedules (split over chunks for decode, blocked over
query rows for prefill). The twin follows the same arithmetic, so:
  - the portable scalar path equals the twin bitwise;
  - the AVX-512 path (fused multiply-adds, polynomial exp / tanh) is within 2e-5 (rtol and atol) of
    it, the standard tests/test_kernels.py has always held the kernel to;
  - every thread count (1 runs the stream schedule, 2..4 the split one for few query rows) gives
    the same bits; bf16 K/V give the bits of their float32 widening; strided views the bits of
    their contiguous copies.
Lengths sweep the sliding-window edge and the chunk edges.
"""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma2np.kernels import twins as ref

nat = pytest.importorskip("gemma2np._native")

CHUNK = ref.ATT_CHUNK
SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SIMD_LEVELS = [0, 1] if "avx512f" in nat.cpu_features() else [0]
BF16 = ml_dtypes.bfloat16


@pytest.fixture(params=SIMD_LEVELS, ids=lambda l: {0: "scalar", 1: "avx512"}[l])
def simd(request):
    got = nat.set_simd(request.param)
    assert got == request.param
    yield got
    nat.set_simd(1)


@pytest.fixture(autouse=True, scope="module")
def _always_fan_out():
    """Fan out whatever the work size, so small shapes run the threaded schedules."""
    before = nat.get_parallel_threshold()
    nat.set_parallel_threshold(0)
    yield
    nat.set_parallel_threshold(before)


def _strided(a, r, pad_rows=3):
    """A view of `a` (B,H,S,D) inside a larger buffer (B,H,S+pad,D), like the cache's (B, K, L, D)
    slice of its (B, K, capacity, D) buffer: strided over heads and batches."""
    B, H, S, D = a.shape
    buf = r.standard_normal((B, H, S + pad_rows, D), dtype=np.float32).astype(a.dtype)
    buf[:, :, :S] = a
    view = buf[:, :, :S]
    assert not view.flags.c_contiguous or S == 0 or B * H == 1
    return view


def _check(simd, q, k, v, q_pos, k_pos, kv, scaling, softcap, window, threads=(1, 2, 3, 4)):
    """The kernel at every thread count (identical bits), against the twin."""
    outs = [nat.attention(q, k, v, q_pos, k_pos, kv, scaling, softcap, window, n_threads=t) for t in threads]
    for o, t in zip(outs[1:], threads[1:]):
        np.testing.assert_array_equal(o, outs[0], err_msg="n_threads=%d vs %d" % (t, threads[0]))
    want = ref.attention(q, k, v, q_pos, k_pos, kv, scaling, softcap, window)
    if simd == 0:
        np.testing.assert_array_equal(outs[0], want)
    else:
        np.testing.assert_allclose(outs[0], want, rtol=2e-5, atol=2e-5)
    return outs[0]


def _inputs(r, B, Hkv, rep, T, S, D, scale=2.0):
    q = r.standard_normal((B, Hkv * rep, T, D), dtype=np.float32) * np.float32(scale)
    k = r.standard_normal((B, Hkv, S, D), dtype=np.float32) * np.float32(scale)
    v = r.standard_normal((B, Hkv, S, D), dtype=np.float32)
    return q, k, v


# ----------------------------------------------------------------------------- sweeps


@SETTINGS
@given(window=st.sampled_from([4, 5, 7]), n_windows=st.floats(0.0, 3.2), T=st.integers(1, 12),
       softcap=st.sampled_from([None, 50.0]), rep=st.sampled_from([1, 2]), seed=st.integers(0, 2**31))
def test_across_the_window_edge(simd, window, n_windows, T, softcap, rep, seed):
    r = np.random.default_rng(seed)
    S = max(T, int(n_windows * window))
    q, k, v = _inputs(r, 1, 2, rep, T, S, 16)
    _check(simd, q, k, v, np.arange(S - T, S), np.arange(S), None, 0.25, softcap, window)


@SETTINGS
@given(S=st.sampled_from([CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK + 1, 3 * CHUNK + 63,
                          4 * CHUNK + 65]),
       T=st.sampled_from([1, 2, 5, 16, 17]), D=st.sampled_from([64, 128, 256, 17]),
       window=st.sampled_from([None, CHUNK - 3, CHUNK + 40]), softcap=st.sampled_from([None, 50.0]),
       seed=st.integers(0, 2**31))
def test_across_chunk_edges(simd, S, T, D, window, softcap, seed):
    r = np.random.default_rng(seed)
    T = min(T, S)
    q, k, v = _inputs(r, 1, 2, 2, T, S, D)
    _check(simd, q, k, v, np.arange(S - T, S), np.arange(S), None, 1.0 / math.sqrt(D), softcap, window)


@SETTINGS
@given(B=st.integers(2, 3), T=st.integers(1, 70), past=st.sampled_from([0, 3, 200, 300, 600]),
       D=st.sampled_from([1, 3, 8, 33, 64, 256]), rep=st.sampled_from([1, 2, 4]),
       window=st.sampled_from([None, 5, 100]), softcap=st.sampled_from([None, 0.5, 50.0]),
       seed=st.integers(0, 2**31))
def test_batches_with_left_padding(simd, B, T, past, D, rep, window, softcap, seed):
    """B > 1 with key_valid: left padding (the first keys of a row invalid, of batch 0 all of them
    for its first query rows: fully masked rows are the uniform average) and random holes."""
    r = np.random.default_rng(seed)
    S = past + T
    q, k, v = _inputs(r, B, 2, rep, T, S, D)
    kv = np.ones((B, S), bool)
    kv[0, :past + max(1, T // 2)] = False
    kv[1, :r.integers(0, S + 1)] = False
    if B > 2:
        kv[2] = r.random(S) < 0.5
    _check(simd, q, k, v, np.arange(past, S), np.arange(S), kv, 1.0 / math.sqrt(D), softcap, window)


@SETTINGS
@given(T=st.integers(1, 40), past=st.sampled_from([0, 7, 250, 513]), D=st.sampled_from([3, 64, 256]),
       bf16=st.booleans(), window=st.sampled_from([None, 9]), seed=st.integers(0, 2**31))
def test_strided_views_give_the_bits_of_contiguous_copies(simd, T, past, D, bf16, window, seed):
    r = np.random.default_rng(seed)
    S = past + T
    q, k, v = _inputs(r, 2, 2, 2, T, S, D)
    if bf16:
        k, v = k.astype(BF16), v.astype(BF16)
    # q as the model hands it: (B, T, H, D) transposed to (B, H, T, D)
    qs = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    ks, vs = _strided(k, r), _strided(v, r)
    args = (np.arange(past, S), np.arange(S), None, 1.0 / math.sqrt(D), 50.0, window)
    want = nat.attention(q, k, v, *args)
    for t in (1, 2, 3):
        np.testing.assert_array_equal(nat.attention(qs, ks, vs, *args, n_threads=t), want)


@SETTINGS
@given(T=st.integers(1, 20), past=st.sampled_from([0, 40, 255, 700]), D=st.sampled_from([1, 17, 64, 256]),
       masked=st.booleans(), seed=st.integers(0, 2**31))
def test_bf16_kv_gives_the_bits_of_its_float32_widening(simd, T, past, D, masked, seed):
    r = np.random.default_rng(seed)
    S = past + T
    q, k, v = _inputs(r, 2, 2, 2, T, S, D)
    kb, vb = k.astype(BF16), v.astype(BF16)
    kv = (r.random((2, S)) < 0.7) if masked else None
    args = (np.arange(past, S), np.arange(S), kv, 1.0 / math.sqrt(D), 50.0, None)
    want = nat.attention(q, kb.astype(np.float32), vb.astype(np.float32), *args)
    for kk, vv in ((kb, vb), (kb.view(np.uint16), vb.view(np.uint16))):
        np.testing.assert_array_equal(nat.attention(q, kk, vv, *args, n_threads=2), want)
    _check(simd, q, kb.view(np.uint16), vb.view(np.uint16), *args)


def test_decode_at_long_context(simd):
    """One query row per head against 2049 keys (9 chunks), the gemma-2-2b head shape."""
    r = np.random.default_rng(1)
    S = 8 * CHUNK + 1
    q, k, v = _inputs(r, 1, 4, 2, 1, S, 256, scale=1.0)
    _check(simd, q, k, v, np.array([S - 1]), np.arange(S), None, 256 ** -0.5, 50.0, None)
    _check(simd, q, k, v, np.array([S - 1]), np.arange(S), None, 256 ** -0.5, 50.0, 4096)


def test_prefill_blocked_rows_and_window(simd):
    """70 query rows (several query blocks) over 3 chunks, causal and sliding."""
    r = np.random.default_rng(2)
    T, S = 70, 2 * CHUNK + 200
    q, k, v = _inputs(r, 1, 2, 2, T, S, 64)
    for window in (None, 37, CHUNK):
        _check(simd, q, k, v, np.arange(S - T, S), np.arange(S), None, 0.125, 50.0, window)


# ----------------------------------------------------------------------------- semantics


def test_keys_outside_the_window_or_masked_are_never_read():
    """NaN keys / values the query cannot see leave the output finite (skipped, not multiplied by 0)."""
    r = np.random.default_rng(3)
    S, T, W = 3 * CHUNK + 10, 3, 20
    q, k, v = _inputs(r, 2, 1, 2, T, S, 32)
    k[:, :, :S - T - W + 1] = np.nan  # before every row's window
    v[:, :, :S - T - W + 1] = np.nan
    kv = np.ones((2, S), bool)
    kv[1, S - 5] = False  # masked in batch 1
    k[1, :, S - 5] = np.nan
    v[1, :, S - 5] = np.nan
    for t in (1, 2):
        out = nat.attention(q, k, v, np.arange(S - T, S), np.arange(S), kv, 0.2, None, W, n_threads=t)
        assert np.isfinite(out).all()
    assert np.isfinite(ref.attention(q, k, v, np.arange(S - T, S), np.arange(S), kv, 0.2, None, W)).all()


def test_fully_masked_rows_are_the_uniform_average_at_long_context(simd):
    r = np.random.default_rng(4)
    S = 2 * CHUNK + 3
    q, k, v = _inputs(r, 1, 1, 2, 2, S, 16)
    kv = np.zeros((1, S), bool)
    out = _check(simd, q, k, v, np.arange(S - 2, S), np.arange(S), kv, 0.25, None, None)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=2, keepdims=True), out.shape), rtol=1e-5, atol=1e-6)


def test_matches_the_readable_reference():
    """Kernel and twin agree with gemma2np.ops.attention (transformers' formulation) at 3 chunks."""
    from gemma2np import ops
    r = np.random.default_rng(5)
    S, T = 3 * CHUNK + 5, 4
    q, k, v = _inputs(r, 2, 2, 2, T, S, 64)
    kv = np.ones((2, S), bool)
    kv[1, :100] = False
    for window in (None, 300):
        args = (q, k, v, np.arange(S - T, S), np.arange(S), kv, 0.125, 50.0, window)
        want = ops.attention(*args)
        np.testing.assert_allclose(nat.attention(*args, n_threads=2), want, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(ref.attention(*args), want, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- the backend glue


def test_native_backend_passes_cache_views_without_a_copy(monkeypatch):
    from gemma2np.kernels import native
    be = native.NativeBackend(n_threads=2)
    r = np.random.default_rng(6)
    q, k, v = _inputs(r, 1, 2, 2, 1, 300, 64)
    for dt in (np.float32, BF16):
        ks, vs = _strided(k.astype(dt), r), _strided(v.astype(dt), r)
        kk = native._kv_operand(ks)
        assert np.shares_memory(kk, ks) and kk.dtype == (np.uint16 if dt is BF16 else np.float32)
        seen = {}
        real = be._nat.attention

        def spy(qq, k_, v_, *a, **kw):
            seen["k"], seen["v"] = k_, v_
            return real(qq, k_, v_, *a, **kw)

        monkeypatch.setattr(be, "_nat", type("N", (), {"attention": staticmethod(spy)}))
        out = be.attention(q, ks, vs, np.array([299]), np.arange(300), None, 0.125, 50.0, None)
        monkeypatch.undo()
        assert np.shares_memory(seen["k"], ks) and np.shares_memory(seen["v"], vs)
        want = nat.attention(q, np.ascontiguousarray(ks), np.ascontiguousarray(vs), np.array([299]),
                             np.arange(300), None, 0.125, 50.0, None)
        np.testing.assert_array_equal(out, want)
    # mixed dtypes (bf16 k, float32 v) are widened, not rejected
    out = be.attention(q, k.astype(BF16), v, np.array([299]), np.arange(300), None, 0.125, None, None)
    np.testing.assert_array_equal(out, nat.attention(q, k.astype(BF16).astype(np.float32), v, np.array([299]),
                                                     np.arange(300), None, 0.125, None, None))


def test_native_backend_return_probs_with_bf16_kv():
    from gemma2np.kernels import native
    be = native.NativeBackend(n_threads=1)
    r = np.random.default_rng(7)
    q, k, v = _inputs(r, 1, 1, 2, 3, 10, 8)
    out, probs = be.attention(q, k.astype(BF16), v.astype(BF16), np.arange(7, 10), np.arange(10), None,
                              0.3, None, 4, return_probs=True)
    assert probs.shape == (1, 2, 3, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.einsum("bhts,bhsd->bhtd", probs,
                                         np.repeat(v.astype(BF16).astype(np.float32), 2, axis=1)),
                               out, rtol=1e-5, atol=1e-6)


def test_rejects_bad_layouts_and_dtypes():
    r = np.random.default_rng(8)
    q, k, v = _inputs(r, 1, 2, 2, 2, 6, 8)
    qp, kp = np.arange(4, 6), np.arange(6)
    with pytest.raises(ValueError, match="last axis"):
        nat.attention(q, np.asfortranarray(k), v, qp, kp, None, 1.0)
    with pytest.raises(ValueError, match="last axis"):
        nat.attention(q.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2), k, v, qp, kp, None, 1.0)
    with pytest.raises(TypeError, match="same dtype"):
        nat.attention(q, k.astype(BF16), v, qp, kp, None, 1.0)
    with pytest.raises(TypeError):
        nat.attention(q.astype(BF16), k, v, qp, kp, None, 1.0)
    with pytest.raises(TypeError):
        nat.attention(q, k.astype(np.float16), v.astype(np.float16), qp, kp, None, 1.0)
    base = np.zeros(4096, np.float32)  # row stride 34 bytes: not whole float32 elements
    bad = np.lib.stride_tricks.as_strided(base, (1, 2, 6, 8), (8192, 4096, 34, 4))
    with pytest.raises(ValueError, match="whole elements"):
        nat.attention(q, bad, v, qp, kp, None, 1.0)


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_rows_together_give_the_bits_of_rows_alone(simd, bf16):
    """The tiled kernel (several query rows and heads of a kv head at once, with the causal
    diagonal inside a tile) gives each row the bits of a call with that row alone."""
    r = np.random.default_rng(9)
    T, S, rep, D = 37, CHUNK + 90, 3, 40
    q, k, v = _inputs(r, 2, 2, rep, T, S, D)
    if bf16:
        k, v = k.astype(BF16), v.astype(BF16)
    kv = np.ones((2, S), bool)
    kv[1, :30] = False
    qp, kp = np.arange(S - T, S), np.arange(S)
    for window in (None, 11):
        full = nat.attention(q, k, v, qp, kp, kv, 0.15, 50.0, window, n_threads=2)
        for hh in range(rep):
            for t in (0, 1, 5, 17, 36):
                one = nat.attention(q[:, hh::rep, t:t + 1], k, v, qp[t:t + 1], kp, kv, 0.15, 50.0, window,
                                    n_threads=1)
                np.testing.assert_array_equal(one, full[:, hh::rep, t:t + 1])


# ----------------------------------------------------------------------------- the AVX-512 tiles


@SETTINGS
@given(rep=st.sampled_from([1, 2, 3, 4]), T=st.integers(1, 40), past=st.sampled_from([0, 5, 63, 64, 65, 200]),
       D=st.sampled_from([1, 15, 16, 17, 31, 33, 64, 100, 256]), bf16=st.booleans(),
       window=st.sampled_from([None, 3, 70]), holes=st.booleans(), seed=st.integers(0, 2**31))
def test_tiles_and_block_tails_give_each_row_its_own_bits(simd, rep, T, past, D, bf16, window, holes, seed):
    """The scores are 4 (2) rows x 64 keys per tile over d-blocks of ATT_DBLK, p * V 4 rows x 64
    (2 x 128 with at most 2 active rows); rows per call up to 32, then a second call. Whatever
    tile, tile tail (1..4 rows), block tail (S % 64), d-block tail (D % 16), visibility mask (the
    all-visible fast path or masked keys) or thread count a row lands in, it keeps its bits."""
    r = np.random.default_rng(seed)
    S = past + T
    q, k, v = _inputs(r, 2, 2, rep, T, S, D)
    if bf16:
        k, v = k.astype(BF16).view(np.uint16), v.astype(BF16).view(np.uint16)
    kv = (r.random((2, S)) < 0.8) if holes else None
    qp, kp = np.arange(past, S), np.arange(S)
    args = (kv, 1.0 / math.sqrt(D), 50.0, window)
    full = _check(simd, q, k, v, qp, kp, *args, threads=(1, 2, 3))
    for t in sorted({0, T // 2, T - 1}):
        for hh in sorted({0, rep - 1}):
            one = nat.attention(q[:, hh::rep, t:t + 1], k, v, qp[t:t + 1], kp, *args, n_threads=1)
            np.testing.assert_array_equal(one, full[:, hh::rep, t:t + 1])
    # a middle slice of the rows (other tiles, other neighbours)
    t0, t1 = T // 3, T - T // 4
    if t1 > t0:
        part = nat.attention(q[:, :, t0:t1], k, v, qp[t0:t1], kp, *args, n_threads=2)
        np.testing.assert_array_equal(part, full[:, :, t0:t1])


def test_twin_scores_are_the_blocked_chain_in_d_order():
    """The documented order of q . k (the scalar path's, the twin's): per block of ATT_DBLK
    elements a float32 chain from 0 in d order, then the block sums from 0 in block order --
    written out here with Python scalars, against the twin's vectorised version."""
    r = np.random.default_rng(11)
    D = 2 * ref.ATT_DBLK + 5
    q = r.standard_normal((1, 1, 2, 3, D), dtype=np.float32)
    k = r.standard_normal((1, 1, 4, D), dtype=np.float32)
    got = ref._dot_blocks(q, k)
    f = np.float32
    for i in range(2):
        for t in range(3):
            for j in range(4):
                tot = f(0.0)
                for d0 in range(0, D, ref.ATT_DBLK):
                    p = f(0.0)
                    for d in range(d0, min(D, d0 + ref.ATT_DBLK)):
                        p = f(p + f(q[0, 0, i, t, d] * k[0, 0, j, d]))
                    tot = f(tot + p)
                assert got[0, 0, i, t, j] == tot
    # and it is a different order from a plain pairwise sum, so the test can tell them apart
    big = r.standard_normal((1, 1, 1, 1, 256), dtype=np.float32)
    kb = r.standard_normal((1, 1, 64, 256), dtype=np.float32)
    assert not np.array_equal(ref._dot_blocks(big, kb), np.sum(big[0, 0, 0] * kb[0, 0], axis=-1)[None, None, None])


def test_avx512_scores_stay_as_accurate_as_the_scalar_path():
    """Against float64: the AVX-512 path (fused chains per d-block) is within 2x of the scalar
    path's error (unfused products, the same order) on the gemma-2 head shape with large scores."""
    if 1 not in SIMD_LEVELS:
        pytest.skip("no AVX-512 on this CPU")
    r = np.random.default_rng(12)
    T, S, D = 48, 3 * CHUNK + 7, 256
    q, k, v = _inputs(r, 1, 2, 2, T, S, D, scale=3.0)
    qp, kp = np.arange(S - T, S), np.arange(S)
    q64 = q.astype(np.float64)
    k64, v64 = (np.repeat(x.astype(np.float64), 2, axis=1) for x in (k, v))
    s = np.einsum("bhtd,bhsd->bhts", q64, k64) / 16.0
    s = 50.0 * np.tanh(s / 50.0)
    s = np.where(kp[None, :] <= qp[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhts,bhsd->bhtd", p / p.sum(-1, keepdims=True), v64)
    errs = {}
    for level in (0, 1):
        nat.set_simd(level)
        try:
            errs[level] = np.abs(nat.attention(q, k, v, qp, kp, None, 1.0 / 16, 50.0, None) - want).max()
        finally:
            nat.set_simd(1)
    assert errs[1] <= 2.0 * errs[0] + 1e-7, errs
