"""The "int4" weight format (NumPy: the quantiser and the twin of the C matmul g2_linear_int4).

Layout, llama.cpp's Q4_K in spirit (4.5 bits per weight counting every scale): each row of W (N, K),
K a multiple of 256, is cut into super-blocks of 256 inputs, each into 8 sub-blocks of 32.
  codes  uint8 (N, K // 2): weight 2i in the low nibble of byte i, 2i+1 in the high nibble; u in 0..15
  meta   uint8 (N, K // 256 * 16): per super-block 16 bytes: d (float16, little-endian), dmin
         (float16), then 12 bytes holding 16 six-bit integers (the 8 sub-block scales ls_j, then the 8
         mins lm_j), 4 per 3 bytes: v0 | v1 << 6 | v2 << 12 | v3 << 18, little-endian.
A weight stands for  w = (d * ls_j) * u - (dmin * lm_j)  in float32: d * ls_j and dmin * lm_j are exact
(an 11-bit f16 significand times a 6-bit integer), (d * ls_j) * u too (4 more bits), so the single
rounding is the subtraction -- the C widening does the same two products and one subtraction.
128 + 16 bytes per 256 weights = 4.5 bits/weight, the size of Q4_0 (4 bits + one f16 per 32).

Scales are chosen by llama.cpp's RMSE-optimal search (make_qkx2_quants, as quantize_row_q4_K_ref):
per sub-block an asymmetric (scale, min) fitted by weighted least squares over 21 candidate
roundings, weights av|x| + |x| (big weights matter more); then the 8 scales and mins are rounded to
6 bits against the super-block's d = max scale / 63, dmin = max min / 63, and the codes re-rounded to
the final grid. Plain absmax rounding (Q4_0) is ~1.5x the squared error (tests/test_int4.py).
This module is the specification (the twin): float32 / float64 arithmetic, vectorised over
sub-blocks, every sum in an explicit order (_psum). NativeBackend quantises at load with its C port
(csrc/g2_int4_quant.c), which does the same IEEE operations in the same order: codes and meta are
bitwise these (tests/test_int4_quant.py). A row with a NaN / inf, or too large for float16 scales,
raises QuantizationError.
"""
from __future__ import annotations

import numpy as np

from .protocol import BackendError

SUPER = 256   # inputs per super-block (one d, dmin and 12 bytes of 6-bit scales/mins)
SUB = 32      # inputs per sub-block (one 6-bit scale and min)
NSUB = SUPER // SUB
META_BYTES = 16
_NSTEP, _RMIN, _RDELTA, _NMAX = 20, -1.0, 0.1, 15
# Rows with |w| > 2^40 are rejected before the search (their float16 scales would overflow anyway),
# and ranges / maxima below 2^-100 skip the divisions that could overflow: every float32 intermediate
# is then finite (w x x < 2 * 2^120), so the C quantiser and this one only meet IEEE arithmetic on
# finite numbers where NumPy's NaN rules (clip, casts) could differ from C's.
_HUGE = np.float32(2.0 ** 40)
_TINY = np.float32(2.0 ** -100)


def check_shape(N, K):
    if K % SUPER:
        raise ValueError("int4 weights need in_features a multiple of %d, got %d" % (SUPER, K))


def _nearest(a):
    # llama.cpp's nearest_int rounds half away from zero ... through a float bias trick that is
    # round-half-to-even for |a| < 2^22; np.rint is that (all arguments here are < 2^10)
    return np.rint(a)


def _psum(a):
    """Sum of each row of a (R, 32), in an explicit order: NumPy's pairwise summation of 32 values
    (8 interleaved accumulators r_j = ((a_j + a_{j+8}) + a_{j+16}) + a_{j+24}, then
    ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))), written out so that the result does not
    depend on how a NumPy version reduces, and so that the C quantiser (csrc/g2_int4_quant.c) can
    do the same additions in the same order. a's dtype is the accumulator's."""
    r = a[:, 0:8] + a[:, 8:16]
    r = r + a[:, 16:24]
    r = r + a[:, 24:32]
    return ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))


def _qkx2(x, w):
    """make_qkx2_quants(32, 15, x, w, rmin=-1, rdelta=0.1, nstep=20, use_mad=False) on rows of x
    (R, 32), float32 -> (scale (R,), min_pos (R,)) with w ~= scale * L - min_pos.

    The candidate codes L are rounded in float32 as llama.cpp does; the weighted sums are taken in
    float64 (_psum's order) and each candidate's squared error is expanded from them,
    sum w (s L + m - x)^2 = s^2 Swll + m^2 Sw + Swxx + 2 s m Swl - 2 s Swxl - 2 m Swx,
    which needs no pass over the weights beyond the three products w L, w L L, w L x (the direct
    form took ~3x the time; the float64 sums keep the expansion's cancellation ~1e-12 of Swxx, far
    below the differences between candidates it decides). Every operation is one IEEE operation on
    float32 or float64 in a fixed order (the C quantiser repeats them: its results are bitwise these)."""
    f, g = np.float32, np.float64
    xmin = x.min(axis=1)
    # the min is clamped to <= 0; written as a select so that a min of -0.0 gives +0.0 (np.minimum
    # of two zeros returns either one, and the sign would reach dmin's float16 bits)
    mn = np.where(xmin < 0, xmin, f(0))
    mx = x.max(axis=1)
    sum_w = _psum(w.astype(g))
    wx = w * x
    sum_x = _psum(wx.astype(g))
    sum_xx = _psum((wx * x).astype(g))
    flat = mx == mn
    # a sub-block whose range is below _TINY gets scale 0 and min -mn without a search: its grid step
    # (< 2^-104) is far below float16's smallest d, and 15 / range could overflow to inf, whose
    # inf * 0 made NaN candidate codes (the search then ended at this same (0, -mn))
    tiny = ~flat & (mx - mn < _TINY)
    safe = np.where(flat | tiny, f(1), mx - mn)
    xm = x - mn[:, None]

    def sums(isc):
        L = np.rint(isc[:, None] * xm)
        np.clip(L, 0, _NMAX, out=L)
        wl = w * L
        return _psum(wl.astype(g)), _psum((wl * L).astype(g)), _psum((wl * x).astype(g))

    def err(s, m, sl, sl2, sxl):
        return s * s * sl2 + m * m * sum_w + sum_xx + 2 * s * m * sl - 2 * s * sxl - 2 * m * sum_x

    iscale = f(_NMAX) / safe
    sl, sl2, sxl = sums(iscale)
    best_scale, best_min = (f(1) / iscale).astype(g), mn.astype(g)
    best = err(best_scale, best_min, sl, sl2, sxl)
    for i in range(_NSTEP + 1):
        sl, sl2, sxl = sums(f(_RMIN + _RDELTA * i + _NMAX) / safe)
        D = sum_w * sl2 - sl * sl
        ok = D > 0
        Ds = np.where(ok, D, 1.0)
        ts = (sum_w * sxl - sum_x * sl) / Ds
        tm = (sl2 * sum_x - sl * sxl) / Ds
        pos = tm > 0  # the min is clamped to <= 0 (so it is a non-negative offset), scale refitted
        tm = np.where(pos, 0.0, tm)
        ts = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1.0), ts)
        mad = err(ts, tm, sl, sl2, sxl)
        better = ok & (mad < best)
        best = np.where(better, mad, best)
        best_scale = np.where(better, ts, best_scale)
        best_min = np.where(better, tm, best_min)
    best_scale = np.where(flat | tiny, 0.0, best_scale)
    best_min = np.where(tiny, mn.astype(g), best_min)
    return best_scale.astype(f), (-best_min).astype(f)


def _pack6(v):
    """(R, 16) ints in 0..63 -> (R, 12) uint8, 4 values per 3 bytes."""
    v = v.astype(np.uint32).reshape(v.shape[0], 4, 4)
    word = v[:, :, 0] | (v[:, :, 1] << 6) | (v[:, :, 2] << 12) | (v[:, :, 3] << 18)
    out = np.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], axis=2)
    return out.reshape(v.shape[0], 12).astype(np.uint8)


def _unpack6(b):
    b = b.astype(np.uint32).reshape(b.shape[0], 4, 3)
    word = b[:, :, 0] | (b[:, :, 1] << 8) | (b[:, :, 2] << 16)
    v = np.stack([(word >> s) & 63 for s in (0, 6, 12, 18)], axis=2)
    return v.reshape(b.shape[0], 16)


class QuantizationError(BackendError):
    """A weight matrix int4 cannot hold: a NaN or infinity, or magnitudes whose float16 super-block
    scale d or dmin would overflow (|w| beyond about 4e6: dmin * 63 caps a sub-block's min at 4.1e6)."""


STATUS_OK, STATUS_NONFINITE, STATUS_TOO_LARGE = 0, 1, 2


def check_status(status, row0=0):
    """Raise QuantizationError for the first row whose status (uint8 per row, _quantize's or the C
    quantiser's) is not STATUS_OK; rows are numbered from row0 (a chunk's first row)."""
    bad = np.flatnonzero(status)
    if bad.size == 0:
        return
    r = int(bad[0])
    if status[r] == STATUS_NONFINITE:
        raise QuantizationError("int4: row %d of the weight has a NaN or infinite value" % (row0 + r))
    raise QuantizationError("int4: row %d of the weight is too large for int4 (its float16 super-block "
                            "scale overflows: |w| must stay below about 4e6)" % (row0 + r))


def quantize_int4(w):
    """w (N, K) float -> (codes uint8 (N, K//2), meta uint8 (N, K//256*16)); see the module doc.
    QuantizationError names the first row with a NaN / infinity, or too large for the format."""
    codes, meta, status = _quantize(w)
    check_status(status)
    return codes, meta


def _quantize(w):
    """quantize_int4 without raising: (codes, meta, status uint8 (N,)); a row with a bad status has
    all-zero codes and meta, the quantisation of a row of zeros (the C quantiser's contract too)."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError("weight must be 2-D (out, in), got shape %s" % (w.shape,))
    N, K = w.shape
    check_shape(N, K)
    if K == 0:
        raise ValueError("int4 weights need in_features a positive multiple of %d, got 0" % SUPER)
    f = np.float32
    x = np.ascontiguousarray(w, dtype=f)
    nonfinite = ~np.isfinite(x).all(axis=1)
    status = np.where(nonfinite, STATUS_NONFINITE, STATUS_OK).astype(np.uint8)
    with np.errstate(invalid="ignore"):
        huge = (np.abs(x) > _HUGE).any(axis=1) & ~nonfinite
    status[huge] = STATUS_TOO_LARGE
    if status.any():
        x = np.where(status[:, None] != 0, f(0), x)
    x = x.reshape(-1, SUB)  # (N*K/32, 32) sub-blocks
    av = np.sqrt(_psum(x * x) / f(SUB))
    wt = av[:, None] + np.abs(x)
    sc, mn = _qkx2(x, wt)
    sc = sc.reshape(-1, NSUB)
    mn = mn.reshape(-1, NSUB)
    max_sc, max_mn = sc.max(axis=1), mn.max(axis=1)
    # 63 / max overflows for a max below ~2e-37: below _TINY the 6-bit values are 0 (d / dmin are 0 in
    # float16 there anyway, so the weights they stand for are unchanged)
    inv_sc = np.where(max_sc > _TINY, f(63) / np.where(max_sc > _TINY, max_sc, f(1)), f(0))
    inv_mn = np.where(max_mn > _TINY, f(63) / np.where(max_mn > _TINY, max_mn, f(1)), f(0))
    ls = np.clip(_nearest(inv_sc[:, None] * sc), 0, 63).astype(np.uint8)
    lm = np.clip(_nearest(inv_mn[:, None] * mn), 0, 63).astype(np.uint8)
    # d = 0 (+0, not the sign of a zero max) where the max is not positive: every scale is then 0
    with np.errstate(over="ignore"):  # an overflow to inf is reported through the status
        d = np.where(max_sc > 0, max_sc / f(63), f(0)).astype(np.float16)
        dmin = np.where(max_mn > 0, max_mn / f(63), f(0)).astype(np.float16)
    overflow = ~(np.isfinite(d) & np.isfinite(dmin)).reshape(N, K // SUPER).all(axis=1)
    status[overflow & (status == STATUS_OK)] = STATUS_TOO_LARGE
    with np.errstate(invalid="ignore", over="ignore"):  # inf d x 0 in an overflowed row: zeroed below
        D, M = _sub_scales(d, dmin, ls, lm)  # (S, 8) float32, exact
    xs = x.reshape(-1, NSUB, SUB)
    Dz = np.where(D > 0, D, f(1))
    with np.errstate(invalid="ignore"):  # only rows reported as too large reach inf here
        u = np.clip(_nearest((xs + M[:, :, None]) / Dz[:, :, None]), 0, 15)
        u = np.where(D[:, :, None] > 0, u, 0).astype(np.uint8).reshape(N, K)
    codes = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    meta = np.empty((d.shape[0], META_BYTES), np.uint8)
    meta[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    meta[:, 2:4] = dmin.astype("<f2").view(np.uint8).reshape(-1, 2)
    meta[:, 4:] = _pack6(np.concatenate([ls, lm], axis=1))
    meta = meta.reshape(N, K // SUPER * META_BYTES)
    codes[status != 0] = 0  # a row int4 cannot hold: all-zero codes and meta (what zeros quantise to)
    meta[status != 0] = 0
    return codes, meta, status


def _sub_scales(d, dmin, ls, lm):
    f = np.float32
    return d.astype(f)[:, None] * ls.astype(f), dmin.astype(f)[:, None] * lm.astype(f)


def dequantize_int4(codes, meta):
    """(codes, meta) -> float32 (N, K): (d * ls) * u - dmin * lm per weight (see the module doc)."""
    codes = np.asarray(codes, np.uint8)
    N, K2 = codes.shape
    K = 2 * K2
    m = np.asarray(meta, np.uint8).reshape(-1, META_BYTES)
    d = np.ascontiguousarray(m[:, 0:2]).view("<f2")[:, 0]
    dmin = np.ascontiguousarray(m[:, 2:4]).view("<f2")[:, 0]
    v = _unpack6(m[:, 4:])
    D, M = _sub_scales(d, dmin, v[:, :NSUB], v[:, NSUB:])
    u = np.empty((N, K), np.uint8)
    u[:, 0::2] = codes & 15
    u[:, 1::2] = codes >> 4
    u = u.reshape(-1, NSUB, SUB).astype(np.float32)
    return (D[:, :, None] * u - M[:, :, None]).reshape(N, K)


def magnitudes_int4(codes, meta):
    """float32 (N, K): |(d * ls) * u| + |dmin * lm| per weight, the size of the two terms the fused
    decode kernel sums separately (sum_j (d ls_j) sum x u - (dmin lm_j) sum x): its rounding errors
    are relative to these, not to |w| (tests/test_int4.py's bound)."""
    codes = np.asarray(codes, np.uint8)
    N, K2 = codes.shape
    m = np.asarray(meta, np.uint8).reshape(-1, META_BYTES)
    d = np.ascontiguousarray(m[:, 0:2]).view("<f2")[:, 0]
    dmin = np.ascontiguousarray(m[:, 2:4]).view("<f2")[:, 0]
    v = _unpack6(m[:, 4:])
    D, M = _sub_scales(d, dmin, v[:, :NSUB], v[:, NSUB:])
    u = np.empty((N, 2 * K2), np.uint8)
    u[:, 0::2] = codes & 15
    u[:, 1::2] = codes >> 4
    u = u.reshape(-1, NSUB, SUB).astype(np.float32)
    return (np.abs(D[:, :, None] * u) + np.abs(M[:, :, None])).reshape(N, 2 * K2)


def quantize_rows(w, chunk_bytes=4 << 20, release=None, n_threads=1):
    """quantize_int4 in chunks of rows (a memory-mapped checkpoint tensor is read, quantised and,
    with release(chunk), its pages dropped chunk by chunk: no float copy of the whole tensor).
    n_threads > 1 quantises that many chunks at a time (NumPy releases the GIL in its loops); every
    chunk's result depends on its rows alone, so the output is the same for any n_threads."""
    N, K = w.shape
    check_shape(N, K)
    codes = np.empty((N, K // 2), np.uint8)
    meta = np.empty((N, K // SUPER * META_BYTES), np.uint8)
    rows = max(1, chunk_bytes // (K * 4))  # rows of float32 per chunk (the search holds ~10 such temporaries)

    def one(r0):
        chunk = w[r0:r0 + rows]
        codes[r0:r0 + rows], meta[r0:r0 + rows], status = _quantize(np.asarray(chunk, np.float32))
        check_status(status, r0)
        if release is not None:
            release(chunk)

    starts = range(0, N, rows)
    if n_threads > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            list(pool.map(one, starts))
    else:
        for r0 in starts:
            one(r0)
    return codes, meta


# ----------------------------------------------------------------------------- the decode matmul's twin


def quantize_x(x):
    """x (M, K) float32 -> (q int8 (M, K), sx float32 (M, K // 32)): the decode kernel's activation
    rounding, per block of 32 inputs sx = amax / 127 (float32), q = rint(x / sx) (RNE) in -127..127;
    sx = 0 (an all-zero block), inf or NaN (the block holds inf / NaN) gives q = 0."""
    f = np.float32
    x = np.asarray(x, f)
    M, K = x.shape
    xb = x.reshape(M, K // SUB, SUB)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        sx = (np.max(np.abs(xb), axis=2) / f(127)).astype(f)
        ok = (sx > 0) & np.isfinite(sx)
        r = np.rint(xb / np.where(ok, sx, f(1))[:, :, None])
    q = np.where(ok[:, :, None], np.clip(r, -127, 127), 0).astype(np.int8)
    return q.reshape(M, K), sx


def _reduce16(a):
    """(..., 16) -> (...): the kernel's fixed order, halves added lane-wise 16 -> 8 -> 4 -> 2 -> 1"""
    t8 = a[..., :8] + a[..., 8:]
    t4 = t8[..., :4] + t8[..., 4:]
    return (t4[..., 0] + t4[..., 2]) + (t4[..., 1] + t4[..., 3])


def linear_decode(x, codes, meta):
    """y (M, N) = x @ W^T the way g2_linear_int4 computes it for M < DP_MIN_M (csrc/g2_int4.c's decode
    comment): x quantised by quantize_x, exact integer sums of u * q per 8 inputs, then the float
    work in the kernel's order (float32 multiplies and adds, no FMA) -- bitwise the C kernel."""
    f = np.float32
    codes = np.asarray(codes, np.uint8)
    N, K2 = codes.shape
    K = 2 * K2
    S = K // SUPER
    q, sx = quantize_x(x)
    M = q.shape[0]
    u = np.empty((N, K), np.int32)
    u[:, 0::2] = codes & 15
    u[:, 1::2] = codes >> 4
    # isum[m, n, s, l']: l' = 16 h + l, the exact sum over inputs s*256 + 8 l' .. + 7 (< 2^24 in size)
    isum = np.einsum("nsk,msk->mns", u.reshape(N, S * 32, 8), q.astype(np.int32).reshape(M, S * 32, 8),
                     optimize=True).reshape(M, N, S, 32).astype(f)
    qsum = q.astype(np.int32).reshape(M, S, NSUB, SUB).sum(axis=3).astype(f)  # (M, S, 8)
    m = np.asarray(meta, np.uint8).reshape(N, S, META_BYTES)
    d = np.ascontiguousarray(m[:, :, 0:2]).view("<f2")[:, :, 0].astype(f)
    dmin = np.ascontiguousarray(m[:, :, 2:4]).view("<f2")[:, :, 0].astype(f)
    v = _unpack6(m[:, :, 4:].reshape(N * S, 12)).reshape(N, S, 16).astype(f)
    sxs = sx.reshape(M, 1, S, NSUB)
    with np.errstate(invalid="ignore", over="ignore"):
        Sd = (v[None, :, :, :NSUB] * d[None, :, :, None]) * sxs     # (M, N, S, 8): ((float) ls * d) * sx
        Sm = (v[None, :, :, NSUB:] * dmin[None, :, :, None]) * sxs  # ((float) lm * dmin) * sx
        acc = np.zeros((M, N, 16), f)
        for s in range(S):
            for h in range(2):
                acc = acc + isum[:, :, s, 16 * h:16 * h + 16] * np.repeat(Sd[:, :, s, 4 * h:4 * h + 4], 4, axis=2)
            acc[:, :, 8:] = acc[:, :, 8:] - Sm[:, :, s] * qsum[:, None, s]
        return _reduce16(acc)
