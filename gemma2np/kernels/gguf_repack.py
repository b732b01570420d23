"""Quantized GGUF weights (gguf_quant.GGUFQuantTensor) -> the native backend's weight formats, at load.

Every repack below is lossless: the handle stands for exactly the float32 values gguf.quants.dequantize
(llama.cpp's reference dequantizers) gives, checked tensor by tensor in tests/test_gguf_quant.py.

  Q8_0  -> "int8", block 32: q = the int8 codes, scale = float32(d). The int8 kernels form q * scale in
           float32, which is gguf's x * d exactly (one rounding-free product: 8 x 11 bits).
  Q6_K  -> "int8", block 16: q = q6 - 32 (-32..31), scale = d * sc (f16 x int8: exact in float32); the
           kernels' q * scale is gguf's (d * sc) * q, the same two float32 products in the same order.
  Q4_K  -> "int4" (kernels/int4.py, the same formula (d * ls) * u - dmin * lm): d and dmin are copied,
           the 12 bytes of 6-bit scales / mins unpacked as llama.cpp's get_scale_min_k4 and packed in
           int4's order, and the nibbles reordered (Q4_K: byte i of a 32-byte group holds input i of an
           even sub-block low and of the next sub-block high; int4: inputs 2i / 2i + 1 of byte i).
  Q4_0  -> "q4_0" (kernels/q4_0.py): the codes and f16 scales split out of the 18-byte blocks.
  other -> "bfloat16" (Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ*, ...): dequantized chunk by chunk and
           rounded to bf16 (RNE), never held as float32; pretrained warns once per load naming the types.

As for checkpoints, the file pages of each chunk are released behind it (`release`), and a block whose
f16 scale is inf / NaN is a CheckpointError naming the tensor (gguf_quant.check_finite).
"""
from __future__ import annotations

import numpy as np

from ..gguf_quant import GGUFQuantTensor, check_finite
from . import int4, q4_0
from .handles import LinearHandle, check_bias

NATIVE_TYPES = ("Q8_0", "Q6_K", "Q4_K", "Q4_0")
_CHUNK_BYTES = 8 << 20  # bytes of GGUF blocks repacked at a time


def _chunks(t: GGUFQuantTensor):
    rows = max(1, _CHUNK_BYTES // max(1, t.raw.shape[1]))
    for r0 in range(0, t.shape[0], rows):
        yield r0, t.raw[r0:r0 + rows]


def _f16(b):
    """(..., 2) uint8 little-endian f16 bytes -> float32 (exact)."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _q8_0(t, release):
    N, K = t.shape
    nb = K // 32
    q = np.empty((N, K), np.int8)
    s = np.empty((N, nb), np.float32)
    for r0, raw in _chunks(t):
        b = raw.reshape(-1, nb, 34)
        s[r0:r0 + len(raw)] = _f16(b[:, :, :2])
        q[r0:r0 + len(raw)] = b[:, :, 2:].view(np.int8).reshape(-1, K)
        check_finite(s[r0:r0 + len(raw)], t)
        if release is not None:
            release(raw)
    return LinearHandle("int8", q, s, 32)


def _q6_k(t, release):
    N, K = t.shape
    ns = K // 256
    q = np.empty((N, K), np.int8)
    s = np.empty((N, K // 16), np.float32)
    for r0, raw in _chunks(t):
        n = len(raw)
        b = raw.reshape(n * ns, 210)
        # the unpacking of gguf.quants.Q6_K.dequantize_blocks (ql 128, qh 64, scales 16 int8, d f16)
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
        scale = _f16(d)[:, None] * sc.view(np.int8).astype(np.float32)  # d * sc: exact in float32
        lo = ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        lo = (lo & np.uint8(15)).reshape(-1, 8, 32)
        hi = qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        hi = (hi & np.uint8(3)).reshape(-1, 8, 32)
        q[r0:r0 + n] = ((lo | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(n, K)
        s[r0:r0 + n] = scale.reshape(n, K // 16)
        check_finite(s[r0:r0 + n], t)
        if release is not None:
            release(raw)
    return LinearHandle("int8", q, s, 16)


def _q4_k(t, release):
    N, K = t.shape
    ns = K // 256
    codes = np.empty((N, K // 2), np.uint8)
    meta = np.empty((N, ns * int4.META_BYTES), np.uint8)
    for r0, raw in _chunks(t):
        n = len(raw)
        b = raw.reshape(n * ns, 144)  # d f16, dmin f16, 12 bytes scales/mins, 128 bytes qs
        sc = b[:, 4:16].reshape(-1, 3, 4)
        dq, mq, mdq = sc[:, 0], sc[:, 1], sc[:, 2]
        # llama.cpp get_scale_min_k4 (the unpacking of gguf.quants.Q4_K.get_scale_min)
        ls = np.concatenate([dq & 0x3F, (mdq & 0x0F) | ((dq >> 2) & 0x30)], axis=1)
        lm = np.concatenate([mq & 0x3F, (mdq >> 4) | ((mq >> 2) & 0x30)], axis=1)
        m = np.empty((n * ns, int4.META_BYTES), np.uint8)
        m[:, :4] = b[:, :4]  # d, dmin: the same f16 bytes
        m[:, 4:] = int4._pack6(np.concatenate([ls, lm], axis=1))
        qs = b[:, 16:].reshape(-1, 4, 32)
        u = np.stack([qs & 15, qs >> 4], axis=1)  # (S, 2, 4, 32): [nibble, group, i]
        u = u.transpose(0, 2, 1, 3).reshape(-1, 256)  # sub-block 2g from the low nibbles, 2g + 1 from the high
        codes[r0:r0 + n] = (u[:, 0::2] | (u[:, 1::2] << 4)).reshape(n, K // 2)
        meta[r0:r0 + n] = m.reshape(n, -1)
        check_finite(_f16(b[:, :4].reshape(-1, 2, 2)), t)
        if release is not None:
            release(raw)
    return LinearHandle("int4", codes, meta, int4.SUPER)


def _q4_0(t, release):
    codes, scales = q4_0.from_gguf_blocks(t.raw, release=release)
    check_finite(q4_0._d(scales), t)
    return LinearHandle("q4_0", codes, scales, q4_0.BLOCK)


def _bf16(t, release):
    from .twins import f32_to_bf16

    bits = np.empty(t.shape, np.uint16)
    for r0, raw in _chunks(t):
        bits[r0:r0 + len(raw)] = f32_to_bf16(t.dequantize_rows(r0, r0 + len(raw)))  # RNE, per chunk
        if release is not None:
            release(raw)
    return LinearHandle("bfloat16", bits)


_REPACK = {"Q8_0": _q8_0, "Q6_K": _q6_k, "Q4_K": _q4_k, "Q4_0": _q4_0}


def prepare_gguf_linear(t: GGUFQuantTensor, bias=None, release=None) -> LinearHandle:
    """The LinearHandle of a quantized GGUF weight (see the module doc for each type)."""
    h = _REPACK.get(t.type_name, _bf16)(t, release)
    h.bias = check_bias(bias, t.shape[0])
    return h


def fallback_types(tensors) -> list[str]:
    """The GGUF types among `tensors` that are not run natively (expanded to bf16), sorted."""
    return sorted({t.type_name for t in tensors if isinstance(t, GGUFQuantTensor) and t.type_name not in NATIVE_TYPES})


def native_nbytes(type_name: str, rows: int, cols: int) -> int:
    """Bytes the native backend holds for a (rows, cols) GGUF matrix of `type_name` (the formats above)."""
    n = rows * cols
    if type_name == "Q4_0":
        return n // 2 + n // 32 * 2
    if type_name == "Q4_K":
        return n // 2 + n // 256 * int4.META_BYTES
    if type_name in ("Q8_0", "Q6_K"):
        return n + n // (32 if type_name == "Q8_0" else 16) * 4
    return 2 * n if type_name != "F32" else 4 * n  # bf16 (F16 / BF16 checkpoints' default; other quants)
