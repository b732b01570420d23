"""NumPy twins of the native kernels (gemma2np._native), same names, arguments and outputs, and
TwinBackend, the backend protocol served by them (`backend="twins"`).

They are the specification the C kernels are tested against (tests/test_kernels.py). Where a twin's
math is an op of gemma2np.ops (rmsnorm, geglu, rope, softcap, argmax, topk) it is a thin float32
adapter over that op, so the numerics live in one place. What is the C kernels' own lives here:
the weight formats below, and attention's formulation (masked keys skipped as -inf, a query row with
no visible key set to the uniform average over all S keys, which is what ops' finfo.min mask yields;
the keys in fixed chunks whose partial softmaxes are merged in chunk order, a score q . k summed in
blocks of ATT_DBLK elements of D (one chain per block, then the block sums), step for step the C
kernel's scalar path, so the two are bitwise equal).
`n_threads` and `out` are accepted for signature compatibility; `out`, when given, receives the result.

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
  "int4"         w uint8 codes (N, K // 2), scales uint8 (N, K // 256 * 16) (layout and quantiser:
                 kernels/int4.py, 4.5 bits/weight). With fewer than DP_MIN_M rows (decode) x is
                 quantised to int8 per block of 32 inputs and multiplied with the codes in integers
                 (llama.cpp's way), the product of the dequantised x and W in the C kernel's float
                 order: int4.linear_decode, bitwise the C kernel. With DP_MIN_M rows or more W is bf16
                 of its float32 dequantisation and x rounded to bf16, like "int8". A matrix whose
                 in_features is not a multiple of 256 is packed as "int8" instead.
(`linear_operands` returns the float32 x and W a call stands for.)

Measured accuracy (benchmarks/bench_kernels.py, Gaussian x and W, K = 2304 / 9216, relative RMS
error of y against float64): float32 2e-7..4e-7, bfloat16 1.7e-3 (weight rounding only),
bfloat16_dp 2.3e-3 (x rounded to bf16 as well), int8 block 32 5.3e-3.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .. import ops
from ..checkpoint import gather_rows
from ..gguf_quant import GGUFQuantTensor
from . import gguf_repack, handles, int4, q4_0

BF16 = ml_dtypes.bfloat16
FORMATS = ("float32", "bfloat16", "int8", "bfloat16_dp", "int4")
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
    if fmt == "int4":
        return int4.dequantize_int4(w, scales)
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
    rounded = fmt == "bfloat16_dp" or (fmt in ("bfloat16", "int8", "int4") and x.shape[0] >= DP_MIN_M)
    if rounded:
        x = _round_bf16(x)
        if fmt in ("int8", "int4"):
            wf = _round_bf16(wf)
    elif fmt == "int4":  # decode: x as its int8 quantisation stands for it
        q, sx = int4.quantize_x(x)
        x = (q.reshape(x.shape[0], -1, int4.SUB) * sx[:, :, None]).reshape(x.shape).astype(np.float32)
    return x, wf


def linear(x, w, fmt="float32", scales=None, bias=None, block=0, n_threads=None, out=None):
    """y (M, N) = x (M, K) @ W^T (+ bias), W as described by fmt (see module doc)."""
    x = np.asarray(x, np.float32)
    if fmt == "int4" and x.shape[0] < DP_MIN_M:
        y = int4.linear_decode(x, w, scales)
    else:
        x, wf = linear_operands(x, w, fmt, scales, block)
        y = x @ wf.T
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return _put(out, y.astype(np.float32, copy=False))


ATT_BLOCK = 64   # keys per online-softmax step of a chunk (csrc/g2_attention.c)
ATT_CHUNK = 256  # keys per chunk, the unit of the split and the merge (csrc/g2_attention.c)
ATT_DBLK = 16    # elements of D per chain of a score (csrc/g2_attention.c: dot_scalar)


def _exp_ref(x):
    """The scalar C path's exp: float32 of the double exp (np.exp in float64, rounded once)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(np.asarray(x, np.float32).astype(np.float64)).astype(np.float32)


def _tanh_ref(x):
    """The scalar C path's tanh: float32 of the double tanh."""
    return np.tanh(np.asarray(x, np.float32).astype(np.float64)).astype(np.float32)


def _seq_sum(terms, axis, start=None):
    """start + t_0 + t_1 + ... along `axis` (start: +0.0, or an array of the other axes' shape),
    added one by one in float32: the C loops' order (np.add.accumulate is sequential, unlike np.sum's
    pairwise summation)."""
    terms = np.moveaxis(terms, axis, -1)
    start = np.zeros(terms.shape[:-1], np.float32) if start is None else start
    return np.add.accumulate(np.concatenate([start[..., None], terms], axis=-1), axis=-1)[..., -1]


def _dot_blocks(qg, kb):
    """q . k as the C kernel orders it (csrc/g2_attention.c: dot_scalar): per block of ATT_DBLK
    elements a sequential chain P_i = ((0 + q_d k_d) + q_(d+1) k_(d+1)) + ..., then
    ((0 + P_0) + P_1) + ... in block order, every product and sum rounded to float32.
    qg (B,G,R,T,D), kb (B,G,n,D) -> (B,G,R,T,n)."""
    D = qg.shape[-1]
    pad = -D % ATT_DBLK  # zero products add +0.0 to a chain that is never -0.0: no change
    if pad:
        qg = np.concatenate([qg, np.zeros(qg.shape[:-1] + (pad,), np.float32)], axis=-1)
        kb = np.concatenate([kb, np.zeros(kb.shape[:-1] + (pad,), np.float32)], axis=-1)
    nb = qg.shape[-1] // ATT_DBLK
    prod = qg[:, :, :, :, None, :] * kb[:, :, None, None, :, :]  # (B,G,R,T,n,D)
    blocks = _seq_sum(prod.reshape(prod.shape[:-1] + (nb, ATT_DBLK)), axis=-1)  # (..., nb)
    return _seq_sum(blocks, axis=-1)


def _kv_f32(x):
    """K / V as float32: bf16 given as uint16 bits or ml_dtypes.bfloat16 is widened (exact)."""
    x = np.asarray(x)
    if x.dtype == np.uint16:
        return bf16_to_f32(x)
    return np.asarray(x, np.float32)


def _attention_chunk(qg, k, v, vis, scaling, cap):
    """One chunk's partial for every row (the C att_row_chunk): online softmax over blocks of
    ATT_BLOCK keys. qg (B,G,R,T,D), k/v (B,G,n,D) float32, vis (B,1|G*R,T,n) ->
    (max, sum, acc (B,G*R,T,D), visible count)."""
    B, G, R, T, D = qg.shape
    H = G * R
    f = np.float32
    mx = np.full((B, H, T), -np.inf, f)
    l = np.zeros((B, H, T), f)
    acc = np.zeros((B, H, T, D), f)
    nvis = np.zeros((B, H, T), np.int64)
    for j0 in range(0, k.shape[2], ATT_BLOCK):
        j1 = min(k.shape[2], j0 + ATT_BLOCK)
        vb = np.broadcast_to(vis[..., j0:j1], (B, H, T, j1 - j0))
        anyv = vb.any(axis=-1)
        if not anyv.any():
            continue
        sc = _dot_blocks(qg, k[:, :, j0:j1]).reshape(B, H, T, j1 - j0) * f(scaling)
        if cap is not None:
            sc = f(cap) * _tanh_ref(sc / f(cap))
        bmax = np.max(np.where(vb, sc, -np.inf), axis=-1)
        upd = anyv & (bmax > mx)
        with np.errstate(invalid="ignore"):
            a = np.where(nvis == 0, f(0.0), _exp_ref(mx - bmax))
        l = np.where(upd, l * a, l)
        acc = np.where(upd[..., None], acc * a[..., None], acc)
        mx = np.where(upd, bmax, mx)
        with np.errstate(invalid="ignore"):
            p = _exp_ref(np.where(vb, sc - mx[..., None], -np.inf))
        # adding -0.0 is the exact identity: a masked key leaves l and acc as they are
        l = _seq_sum(np.where(vb, p, f(-0.0)), axis=-1, start=l)
        vv = np.repeat(v[:, :, j0:j1], R, axis=1)[:, :, None]  # (B,H,1,n,D)
        with np.errstate(invalid="ignore", over="ignore"):
            terms = np.where(vb[..., None], p[..., None] * vv, f(-0.0))  # (B,H,T,n,D)
        acc = _seq_sum(terms, axis=-2, start=acc)
        nvis = nvis + vb.sum(axis=-1)
    return mx, l, acc, nvis


def attention(q, k, v, q_pos, k_pos, key_valid, scaling, softcap=None, window=None,
              n_threads=None, out=None):
    """q (B,Hq,T,D) float32, k/v (B,Hkv,S,D) float32 or bf16 (uint16 bits or ml_dtypes.bfloat16)
    -> (B,Hq,T,D); see ARCHITECTURE.md for the visibility rule. softcap/window: None or <= 0
    means none. The C kernel's arithmetic, step for step (csrc/g2_attention.c): chunks of ATT_CHUNK
    keys, each an online softmax over blocks of ATT_BLOCK keys, merged in chunk order; a row with
    no visible key is the uniform average of all S values. Bitwise equal to the C scalar path."""
    f = np.float32
    q = np.asarray(q, f)
    k, v = _kv_f32(k), _kv_f32(v)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    R = Hq // Hkv
    qg = q.reshape(B, Hkv, R, T, D)
    cap = float(softcap) if softcap is not None and softcap > 0 else None
    win = int(window) if window is not None and window > 0 else 0
    qp = np.asarray(q_pos, np.int64)[:, None]
    kp = np.asarray(k_pos, np.int64)[None, :]
    vis = kp <= qp
    if win:
        vis = vis & (kp > qp - win)
    vis = vis[None, None]  # (1,1,T,S)
    if key_valid is not None:
        vis = vis & np.asarray(key_valid).astype(bool)[:, None, None, :]
    M = np.full((B, Hq, T), -np.inf, f)
    L = np.zeros((B, Hq, T), f)
    ACC = np.zeros((B, Hq, T, D), f)
    NV = np.zeros((B, Hq, T), np.int64)
    for c0 in range(0, S, ATT_CHUNK):
        c1 = min(S, c0 + ATT_CHUNK)
        m, l, a, nvc = _attention_chunk(qg, k[:, :, c0:c1], v[:, :, c0:c1], vis[..., c0:c1], scaling, cap)
        first = (NV == 0) & (nvc > 0)
        both = (NV > 0) & (nvc > 0)
        mn = np.where(m > M, m, M)
        with np.errstate(invalid="ignore", over="ignore"):
            fo, fn = _exp_ref(M - mn), _exp_ref(m - mn)
            Lb = L * fo + l * fn
            Ab = ACC * fo[..., None] + a * fn[..., None]
        L = np.where(first, l, np.where(both, Lb, L))
        ACC = np.where(first[..., None], a, np.where(both[..., None], Ab, ACC))
        M = np.where(first, m, np.where(both, mn, M))
        NV = NV + nvc
    with np.errstate(invalid="ignore", divide="ignore"):
        res = ACC / L[..., None]
    none = NV == 0
    if S == 0:
        res = np.zeros((B, Hq, T, D), f)
    elif none.any():  # uniform average over all S keys, summed in key order
        uni = _seq_sum(np.repeat(v, R, axis=1), axis=2) / f(S)  # (B,Hq,D)
        res = np.where(none[..., None], uni[:, :, None, :], res)
    return _put(out, res.astype(f, copy=False))


def rmsnorm(x, w, eps=1e-6, n_threads=None, out=None):
    """x * 1/sqrt(mean(x^2) + eps) * (1 + w) over the last axis, float32: ops.rms_norm."""
    return _put(out, ops.rms_norm(np.asarray(x, np.float32), np.asarray(w, np.float32), eps))


_APPROX = {"tanh": "gelu_pytorch_tanh", "none": "gelu"}


def geglu(gate, up, approximate="tanh", n_threads=None, out=None):
    """gelu(gate) * up; approximate="tanh" (Gemma's gelu_pytorch_tanh) or "none" (erf): ops.geglu."""
    if approximate not in _APPROX:
        raise ValueError("approximate must be 'tanh' or 'none'")
    return _put(out, ops.geglu(np.asarray(gate, np.float32), np.asarray(up, np.float32), _APPROX[approximate]))


def rope(x, cos, sin, n_threads=None, out=None):
    """x * cos + rotate_half(x) * sin; x (B,H,T,D), cos/sin (T,D), (1,T,D) or (B,T,D) (ops' formula
    for one tensor: the C kernel rotates q and k in separate calls)."""
    x = np.asarray(x, np.float32)
    cos = np.asarray(cos, np.float32)
    sin = np.asarray(sin, np.float32)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    return _put(out, (x * cos[:, None]) + (ops.rotate_half(x) * sin[:, None]))


def softcap(x, cap, n_threads=None, out=None):
    """cap * tanh(x / cap): ops.softcap."""
    return _put(out, ops.softcap(np.asarray(x, np.float32), cap))


def tanh(x, n_threads=None, out=None):
    """tanh(x), float32."""
    return _put(out, np.tanh(np.asarray(x, np.float32)))


def exp(x, n_threads=None, out=None):
    """exp(x), float32."""
    return _put(out, np.exp(np.asarray(x, np.float32)))


def argmax(x, n_threads=None):
    """Argmax over the last axis -> int64 (first maximum; first NaN wins): ops.argmax."""
    return ops.argmax(np.asarray(x, np.float32))


def topk(x, k, n_threads=None):
    """Top-k over the last axis -> (values, indices), value-descending, ties by smaller index: ops.topk."""
    return ops.topk(np.asarray(x, np.float32), k)


# ----------------------------------------------------------------------------- the backend


def pack(w, bias, weights, block):
    """w (out, in) of any float dtype -> LinearHandle holding it in format `weights`."""
    if weights not in handles.WEIGHT_FORMATS:
        raise ValueError("weights must be one of %s, got %r" % (handles.WEIGHT_FORMATS, weights))
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError("weight must be 2-D (out, in), got shape %s" % (w.shape,))
    b = handles.check_bias(bias, w.shape[0])
    if weights == "float32":
        # no copy when w is already contiguous float32 (a memory-mapped f32 checkpoint stays mapped)
        return handles.LinearHandle("float32", np.ascontiguousarray(w, dtype=np.float32), bias=b)
    if weights in ("bfloat16", "bfloat16_dp"):
        return handles.LinearHandle(weights, to_bf16_bits(w), bias=b)
    if weights == "int4" and w.shape[1] % int4.SUPER == 0:
        codes, meta = int4.quantize_rows(w)
        return handles.LinearHandle("int4", codes, meta, int4.SUPER, bias=b)
    # int8, or int4 of a matrix whose in_features is not a multiple of 256 (no Gemma 2 matrix)
    q, s = quantize_int8(w, block)
    return handles.LinearHandle("int8", q, s, block, bias=b)


_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_accurate")
_ERF_GELUS = ("gelu", "gelu_python")


def attention_probs_f32(q, k, q_pos, k_pos, key_valid, scaling, softcap, window):
    """The probabilities of an attention call, for return_probs: ops.attention_probs in float32. The
    output itself stays the backend kernel's (twins.attention, or the C kernel); both follow the same
    visibility rule, so these are the weights that output averages with (to float32 rounding)."""
    f = np.float32
    return ops.attention_probs(np.asarray(q, f), np.asarray(k, f), np.asarray(q_pos, np.int64),
                               np.asarray(k_pos, np.int64), key_valid, scaling, softcap, window)


class TwinBackend:
    """The backend protocol on the twins: float32 activations, every weight format of the C kernels
    (prepare_linear -> a float32 array for float32 weights without bias, else a LinearHandle)."""

    name = "twins"
    dtype = np.dtype(np.float32)

    def __init__(self, n_threads=None, int8_block=DEFAULT_INT8_BLOCK):
        self.weight_formats = handles.WEIGHT_FORMATS
        self.n_threads = n_threads
        self.int8_block = int8_block

    def prepare_linear(self, w, bias=None, weights="float32"):
        if isinstance(w, GGUFQuantTensor):  # a GGUF's own quantization, whatever `weights` says
            return gguf_repack.prepare_gguf_linear(w, bias)
        h = pack(w, bias, weights, self.int8_block)
        # packed weights go through twins.linear, which applies the format's exact semantics (bf16 / int8
        # storage, activations rounded at DP_MIN_M rows); plain float32 weights are a bare matrix
        return h if (h.fmt != "float32" or bias is not None) else h.w

    def embed(self, table, ids):
        return gather_rows(table, ids).astype(np.float32)  # see ReferenceBackend.embed

    def rmsnorm(self, x, w, eps):
        return rmsnorm(x, w, eps)

    def linear(self, x, handle):
        if isinstance(handle, handles.LinearHandle):
            x2, lead = handles.as_2d(x, handle.in_features)
            if handle.fmt == "q4_0":
                y = q4_0.linear(x2, handle.w, handle.scales, handle.bias, dp_min_m=DP_MIN_M)
                return y.reshape(lead + (handle.out_features,))
            y = linear(x2, handle.w, handle.fmt, handle.scales, handle.bias, handle.block)
            return y.reshape(lead + (handle.out_features,))
        return np.asarray(x, np.float32) @ np.asarray(handle).T

    def linear_many(self, x, handles):
        return [self.linear(x, h) for h in handles]

    def rope(self, q, k, cos, sin):
        return rope(q, cos, sin), rope(k, cos, sin)

    def attention(self, q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window, return_probs=False):
        out = attention(q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window)
        if not return_probs:
            return out
        return out, attention_probs_f32(q, k, q_pos, k_pos, key_valid, scaling, softcap, window)

    def geglu(self, gate, up, activation="gelu_pytorch_tanh"):
        if activation in _TANH_GELUS:
            return geglu(gate, up, "tanh")
        if activation in _ERF_GELUS:
            return geglu(gate, up, "none")
        return ops.geglu(np.asarray(gate, np.float32), np.asarray(up, np.float32), activation)

    def softcap(self, x, cap):
        return x if cap is None else softcap(x, cap)

    def argmax(self, x):
        return argmax(x)

    def topk(self, x, k):
        return topk(x, k)
