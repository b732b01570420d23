"""NumPy twins of the native kernels (gemma2np._native), same names, arguments and outputs.

They are the specification the C kernels are tested against (tests/test_kernels.py) and the
implementation behind the "numpy" backend. Math follows gemma2np.ops (float32 throughout; RMSNorm
with 1 + w; tanh-approximated GELU; rotate-half RoPE; softcap before the mask; a query row with no
visible key gets the uniform average over all S keys). `n_threads` and `out` are accepted for
signature compatibility; `out`, when given, receives the result.

Weight formats of `linear` (quantisation happens once, at load, with the helpers below):
  "float32"      w float32 (N, K)
  "bfloat16"     w uint16 bf16 bits (N, K), widened exactly; x stays float32 when x has fewer than
                 DP_MIN_M rows (decode), and is rounded to bf16 (RNE) with DP_MIN_M rows or more
                 (prefill: the product then runs on vdpbf16ps, ~2x the float32 FMA rate)
  "bfloat16_dp"  as bfloat16, but x is rounded to bf16 (RNE) for every batch size
  "int8"         w int8 (N, K), scales float32 (N, ceil(K / block)); w ~= q * scale, symmetric absmax
                 per block of `block` consecutive inputs; with fewer than DP_MIN_M rows x stays
                 float32 and W = q * scale; with DP_MIN_M rows or more x is rounded to bf16 and
                 W to bf16(q * scale) (RNE), like "bfloat16"
(`linear_operands` returns the float32 x and W a call stands for.)

Measured accuracy (benchmarks/bench_kernels.py, Gaussian x and W, K = 2304 / 9216, relative RMS
error of y against float64): float32 2e-7..4e-7, bfloat16 1.7e-3 (weight rounding only),
bfloat16_dp 2.3e-3 (x rounded to bf16 as well), int8 block 32 5.3e-3.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16
FORMATS = ("float32", "bfloat16", "int8", "bfloat16_dp")
DEFAULT_INT8_BLOCK = 32
DP_MIN_M = 8  # G2_DP_MIN_M of csrc/gemma2np_kernels.h


# ----------------------------------------------------------------------------- weight formats


def f32_to_bf16(x, n_threads=None):
    """float32 -> bf16 bits (uint16), round to nearest even (ml_dtypes)."""
    return np.asarray(x, dtype=np.float32).astype(BF16).view(np.uint16)


def bf16_to_f32(bits):
    """bf16 bits (uint16) -> float32 (exact)."""
    return np.asarray(bits, dtype=np.uint16).view(BF16).astype(np.float32)


def to_bf16_bits(w):
    """Any float array (incl. ml_dtypes.bfloat16) -> C-contiguous uint16 bf16 bits."""
    w = np.asarray(w)
    if w.dtype == BF16:
        return np.ascontiguousarray(w).view(np.uint16)
    return np.ascontiguousarray(w.astype(np.float32).astype(BF16).view(np.uint16))


def quantize_int8(w, block=DEFAULT_INT8_BLOCK):
    """Symmetric absmax int8 per (row, block of `block` inputs): w (N, K) -> (q int8 (N, K),
    scales float32 (N, ceil(K/block))), scale = absmax / 127, q = rint(w / scale) in [-127, 127].
    An all-zero block gets scale 0 and q 0."""
    if block <= 0 or block % 16:
        raise ValueError("block must be a positive multiple of 16, got %r" % (block,))
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError("w must be 2-D (N, K)")
    N, K = w.shape
    nb = -(-K // block)
    q = np.empty((N, K), np.int8)
    scales = np.empty((N, nb), np.float32)
    # in chunks of rows, so quantising the 256000 x 2304 LM head never holds float32 copies of it all
    rows = max(1, (16 << 20) // (nb * block * 4))
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        wp = np.zeros((r1 - r0, nb * block), np.float32)
        wp[:, :K] = w[r0:r1]
        wb = wp.reshape(r1 - r0, nb, block)
        amax = np.max(np.abs(wb), axis=2)
        sc = (amax / np.float32(127.0)).astype(np.float32)
        safe = np.where(sc > 0, sc, np.float32(1.0))
        q[r0:r1] = np.clip(np.rint(wb / safe[:, :, None]), -127, 127).astype(np.int8).reshape(r1 - r0, -1)[:, :K]
        scales[r0:r1] = sc
    return q, scales


def dequantize_int8(q, scales, block=DEFAULT_INT8_BLOCK):
    """(N, K) int8 + (N, nb) scales -> float32 (N, K), computed as float32(q) * scale (the C
    kernel forms exactly these values)."""
    q = np.asarray(q)
    K = q.shape[1]
    s = np.repeat(np.asarray(scales, np.float32), block, axis=1)[:, :K]
    return q.astype(np.float32) * s


def weight_as_f32(w, fmt="float32", scales=None, block=0):
    """The float32 matrix a (w, fmt, scales, block) triple stands for."""
    if fmt == "float32":
        return np.asarray(w, np.float32)
    if fmt in ("bfloat16", "bfloat16_dp"):
        return bf16_to_f32(w)
    if fmt == "int8":
        return dequantize_int8(w, scales, block)
    raise ValueError("fmt must be one of %s, got %r" % (FORMATS, fmt))


def _put(out, y):
    if out is None:
        return y
    out[...] = y
    return out


# ----------------------------------------------------------------------------- kernels


def _round_bf16(a):
    return bf16_to_f32(f32_to_bf16(a))


def linear_operands(x, w, fmt="float32", scales=None, block=0):
    """The float32 (x, W) that linear(x (M, K), w, fmt, ...) multiplies (see module doc)."""
    x = np.asarray(x, np.float32)
    wf = weight_as_f32(w, fmt, scales, block)
    rounded = fmt == "bfloat16_dp" or (fmt in ("bfloat16", "int8") and x.shape[0] >= DP_MIN_M)
    if rounded:
        x = _round_bf16(x)
        if fmt == "int8":
            wf = _round_bf16(wf)
    return x, wf


def linear(x, w, fmt="float32", scales=None, bias=None, block=0, n_threads=None, out=None):
    """y (M, N) = x (M, K) @ W^T (+ bias), W as described by fmt (see module doc)."""
    x, wf = linear_operands(x, w, fmt, scales, block)
    y = x @ wf.T
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return _put(out, y.astype(np.float32, copy=False))


def attention(q, k, v, q_pos, k_pos, key_valid, scaling, softcap=None, window=None,
              n_threads=None, out=None):
    """q (B,Hq,T,D), k/v (B,Hkv,S,D) -> (B,Hq,T,D); see ARCHITECTURE.md for the visibility rule.
    softcap/window: None or <= 0 means none."""
    q = np.asarray(q, np.float32)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    r = Hq // Hkv
    kk = np.repeat(np.asarray(k, np.float32), r, axis=1)
    vv = np.repeat(np.asarray(v, np.float32), r, axis=1)
    s = (q @ np.swapaxes(kk, -1, -2)) * np.float32(scaling)
    if softcap is not None and softcap > 0:
        c = np.float32(softcap)
        s = np.tanh(s / c) * c
    qp = np.asarray(q_pos, np.int64)[:, None]
    kp = np.asarray(k_pos, np.int64)[None, :]
    vis = kp <= qp
    if window is not None and window > 0:
        vis = vis & (kp > qp - window)
    vis = np.broadcast_to(vis[None, None], (B, 1, T, S))
    if key_valid is not None:
        vis = vis & np.asarray(key_valid).astype(bool)[:, None, None, :]
    none = ~vis.any(axis=-1, keepdims=True)  # rows with no visible key -> uniform
    s = np.where(vis, s, -np.inf)
    s = np.where(none, np.float32(0.0), s)
    e = np.exp(s - np.max(s, axis=-1, keepdims=True))
    p = e / np.sum(e, axis=-1, keepdims=True)
    return _put(out, (p @ vv).astype(np.float32, copy=False))


def rmsnorm(x, w, eps=1e-6, n_threads=None, out=None):
    """x * 1/sqrt(mean(x^2) + eps) * (1 + w) over the last axis, float32 (ops.rms_norm)."""
    x = np.asarray(x, np.float32)
    inv = np.float32(1.0) / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
    return _put(out, (x * inv) * (np.float32(1.0) + np.asarray(w, np.float32)))


def geglu(gate, up, approximate="tanh", n_threads=None, out=None):
    """gelu(gate) * up; approximate="tanh" (Gemma's gelu_pytorch_tanh) or "none" (erf)."""
    g = np.asarray(gate, np.float32)
    f = np.float32
    if approximate == "tanh":
        a = f(0.5) * g * (f(1.0) + np.tanh(f(math.sqrt(2.0 / math.pi)) * (g + f(0.044715) * g * g * g)))
    elif approximate == "none":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        a = f(0.5) * g * (f(1.0) + erf(g / f(math.sqrt(2.0))).astype(np.float32))
    else:
        raise ValueError("approximate must be 'tanh' or 'none'")
    return _put(out, (a * np.asarray(up, np.float32)).astype(np.float32, copy=False))


def rope(x, cos, sin, n_threads=None, out=None):
    """x * cos + rotate_half(x) * sin; x (B,H,T,D), cos/sin (T,D), (1,T,D) or (B,T,D)."""
    x = np.asarray(x, np.float32)
    cos = np.asarray(cos, np.float32)
    sin = np.asarray(sin, np.float32)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return _put(out, (x * cos[:, None]) + (rot * sin[:, None]))


def softcap(x, cap, n_threads=None, out=None):
    """cap * tanh(x / cap) (ops.softcap)."""
    x = np.asarray(x, np.float32)
    c = np.float32(cap)
    return _put(out, np.tanh(x / c) * c)


def tanh(x, n_threads=None, out=None):
    """tanh(x), float32."""
    return _put(out, np.tanh(np.asarray(x, np.float32)))


def exp(x, n_threads=None, out=None):
    """exp(x), float32."""
    return _put(out, np.exp(np.asarray(x, np.float32)))


def argmax(x, n_threads=None):
    """Argmax over the last axis -> int64 (first maximum; first NaN wins, numpy semantics)."""
    return np.argmax(np.asarray(x, np.float32), axis=-1).astype(np.int64)


def topk(x, k, n_threads=None):
    """Top-k over the last axis -> (values, indices), value-descending, ties by smaller index."""
    x = np.asarray(x, np.float32)
    if np.isnan(x).any():
        raise ValueError("topk input contains NaN")
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k].astype(np.int64)
    return np.take_along_axis(x, idx, axis=-1), idx
