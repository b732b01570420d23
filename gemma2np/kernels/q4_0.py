"""The "q4_0" weight format: llama.cpp's Q4_0 blocks run natively (NumPy: the repack, the dequantiser
and the twin of the C matmul g2_linear_q4_0 of csrc/g2_q4_0.c).

Q4_0 (ggml-common.h block_q4_0): per block of 32 inputs of a row, 18 bytes: d (float16), then 16 bytes
qs; byte i holds input i in its low nibble and input i + 16 in its high nibble; w = d * (u - 8), u in
0..15. gguf.quants.dequantize computes exactly float32(d) * float32(u - 8) (exact: 11 x 4 bits).

Layout here (the same bits, aligned: the 18-byte blocks would put every row's codes at odd offsets):
  codes   uint8 (N, K // 2): per block of 32 the 16 qs bytes, in the file's order
  scales  uint16 (N, K // 32): the f16 bits of d
K is a multiple of 32. 16 + 2 bytes per 32 weights = 4.5 bits/weight: the GGUF's own size.

linear(x (M, K)) -- this twin defines the arithmetic, the C kernel reproduces it bit for bit:
* M < DP_MIN_M (decode): llama.cpp's q4_0 x q8_0 dot product. x is quantised per block of 32 inputs
  by the int4 decode's rounding (kernels/int4.py quantize_x: q int8, scale sx per block), the codes are
  never widened to a weight matrix, and per row n, input row m and block b the integer
  isum = sum (u - 8) q is exact. The float work (csrc/g2_q4_0.c's decode comment): blocks in groups of
  4, padded with empty blocks (q = 0, sx = 0, d = 0: they add +0); 16 float32 lanes, lane l of group g
  the isum over the 8 inputs 32b + 4r .. + 3 and 32b + 16 + 4r .. + 3 of block b = 4g + l // 4,
  r = l % 4;
      acc_l = acc_l + float(isum_l) * (d_b * sx_b)        (each product and the sum rounded: no FMA)
  then y = the lanes summed as a fixed tree (lanes l + 8, then + 4, + 2, + 1). Each output is one fixed
  sequence of operations: the same for any thread count, batch size or SIMD path. y is the exact dot
  product of the dequantised W with the dequantised x (q * sx) to float32 rounding; the rounding of x
  (|x - q sx| <= sx / 2 = amax / 254 per block) is the error against float x.
* M >= DP_MIN_M (prefill): x rounded to bf16 (RNE) and W to bf16 of its float32 dequantisation (RNE),
  then the product, as "int8" and "int4" do (the C kernel: vdpbf16ps on those operands, bitwise
  linear(..., "bfloat16_dp") of the widened weights; its sums are within float32 rounding of this twin).
"""
from __future__ import annotations

import numpy as np

BLOCK = 32
GGUF_BLOCK_BYTES = 18
LANES = 16


def check_shape(N, K):
    if K <= 0 or K % BLOCK:
        raise ValueError("q4_0 weights need in_features a multiple of %d, got %d" % (BLOCK, K))


def from_gguf_blocks(raw, release=None, chunk_rows=None):
    """raw uint8 (N, K // 32 * 18), the Q4_0 blocks of a GGUF tensor -> (codes, scales), chunk by chunk of
    rows (a memory-mapped tensor's pages released behind each chunk with release(chunk))."""
    raw = np.asarray(raw)
    N, rb = raw.shape
    if rb % GGUF_BLOCK_BYTES:
        raise ValueError("Q4_0 rows must be whole 18-byte blocks, got %d bytes" % rb)
    nb = rb // GGUF_BLOCK_BYTES
    codes = np.empty((N, nb * 16), np.uint8)
    scales = np.empty((N, nb), np.uint16)
    rows = chunk_rows or max(1, (8 << 20) // max(1, rb))
    for r0 in range(0, N, rows):
        chunk = raw[r0:r0 + rows]
        b = chunk.reshape(-1, nb, GGUF_BLOCK_BYTES)
        scales[r0:r0 + rows] = np.ascontiguousarray(b[:, :, :2]).view("<u2")[:, :, 0]
        codes[r0:r0 + rows] = b[:, :, 2:].reshape(-1, nb * 16)
        if release is not None:
            release(chunk)
    return codes, scales


def _d(scales):
    return np.asarray(scales, np.uint16).view("<f2").astype(np.float32)


def _nibbles(codes):
    """codes (N, K/2) -> (lo - 8, hi - 8) as float32 (N, K/32, 16): inputs 32b + l and 32b + 16 + l."""
    c = np.asarray(codes, np.uint8)
    c = c.reshape(c.shape[0], -1, LANES)
    lo = (c & 15).astype(np.int8) - np.int8(8)
    hi = (c >> 4).astype(np.int8) - np.int8(8)
    return lo.astype(np.float32), hi.astype(np.float32)


def dequantize_q4_0(codes, scales):
    """(codes, scales) -> float32 (N, K): d * (u - 8), exactly gguf.quants.dequantize of the Q4_0 blocks."""
    lo, hi = _nibbles(codes)
    d = _d(scales)[:, :, None]
    N = lo.shape[0]
    return np.concatenate([d * lo, d * hi], axis=2).reshape(N, -1)


def _lane_tree(acc):
    """(..., 16) float32 lanes -> (...): (l + 8), then (+ 4), (+ 2), (+ 1), as the C kernel sums them."""
    s = acc[..., :8] + acc[..., 8:]
    s = s[..., :4] + s[..., 4:]
    s = s[..., :2] + s[..., 2:]
    return s[..., 0] + s[..., 1]


def linear_decode(x, codes, scales):
    """The decode arithmetic of the module doc: x (M, K) float32 -> (M, N) float32."""
    from .int4 import quantize_x  # the activation rounding the int4 decode uses (one definition)

    f = np.float32
    q, sx = quantize_x(np.asarray(x, f))
    M, K = q.shape
    c = np.asarray(codes, np.uint8)
    N = c.shape[0]
    nb = K // BLOCK
    P = -(-nb // 4) * 4  # blocks padded to whole groups of 4
    # (u - 8) per input, in input order (byte i: input i low nibble, input i + 16 high)
    c = c.reshape(N, nb, LANES).astype(np.int64)
    w = np.concatenate([(c & 15) - 8, (c >> 4) - 8], axis=2)
    wp = np.zeros((N, P, BLOCK), np.int64)
    wp[:, :nb] = w
    qp = np.zeros((M, P, BLOCK), np.int64)
    qp[:, :nb] = q.reshape(M, nb, BLOCK)
    # lane (b, r): inputs 4r .. 4r + 3 of each half of block b -> (half, r, k)
    isum = np.einsum("nbhrk,mbhrk->mnbr", wp.reshape(N, P, 2, 4, 4), qp.reshape(M, P, 2, 4, 4), optimize=True)
    isum = isum.reshape(M, N, P // 4, LANES).astype(f)  # exact: |isum| < 2^24
    dp = np.zeros((N, P), f)
    dp[:, :nb] = _d(scales)
    sxp = np.zeros((M, P), f)
    sxp[:, :nb] = sx
    with np.errstate(invalid="ignore", over="ignore"):  # inf / NaN blocks of x: inf / NaN outputs
        S = dp[None] * sxp[:, None]  # (M, N, P): d_b * sx_b, one rounding
        S = np.repeat(S, 4, axis=2).reshape(M, N, P // 4, LANES)
        acc = np.zeros((M, N, LANES), f)
        for g in range(P // 4):
            acc = acc + isum[:, :, g] * S[:, :, g]
        return _lane_tree(acc)


def linear(x, codes, scales, bias=None, n_threads=None, out=None, dp_min_m=8):
    """y (M, N) = x (M, K) @ W^T (+ bias), the twin of the C g2_linear_q4_0 (see the module doc)."""
    from .twins import _round_bf16  # the bf16 rounding the other formats' twins use

    x = np.asarray(x, np.float32)
    if x.shape[0] < dp_min_m:
        y = linear_decode(x, codes, scales)
    else:
        y = _round_bf16(x) @ _round_bf16(dequantize_q4_0(codes, scales)).T
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    y = y.astype(np.float32, copy=False)
    if out is None:
        return y
    out[...] = y
    return out
