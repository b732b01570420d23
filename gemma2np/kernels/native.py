"""NativeBackend: the backend protocol on the C/Cython kernels (gemma2np._native).

prepare_linear returns a LinearHandle (kernels/handles.py) holding the weights in the chosen storage
format; activations are float32. Each kernel is tested against its NumPy twin (kernels/twins.py).
Two ops stay NumPy on purpose, to keep results bitwise what they were and what transformers gives:
`softcap` of the final logits is ops.softcap (the C g2_softcap's polynomial tanh is ~1 ulp off
np.tanh), and `geglu` with an activation other than the GELUs is ops.geglu (no C kernel for it).
"""
from __future__ import annotations

import os

import numpy as np

from .. import ops
from ..checkpoint import bfloat16, gather_rows, release_pages
from ..gguf_quant import GGUFQuantTensor
from . import gguf_repack, int4, twins
from .handles import WEIGHT_FORMATS, LinearHandle, as_2d, check_bias

_TANH_GELUS = twins._TANH_GELUS
_ERF_GELUS = twins._ERF_GELUS


_ALLOCATOR_TUNED = False


def _tune_allocator_once(nat):
    """Process-wide, once, when the first native backend is made (opt out: GEMMA2NP_NO_MALLOPT=1):
    glibc's malloc keeps freed blocks up to 32 MB in the heap instead of unmapping them, so the
    activations of each forward pass are not page-faulted in afresh (0.3 s of a 1.8 s prefill of
    gemma-2-2b with bf16 weights; see csrc/g2_dispatch.c, g2_tune_malloc)."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    if os.environ.get("GEMMA2NP_NO_MALLOPT", "") not in ("", "0"):
        return
    nat.tune_malloc()


def _rows(a):
    """a itself when its last axis is contiguous (what the attention kernel takes with strides),
    else a contiguous copy."""
    if a.ndim == 4 and (a.shape[3] <= 1 or a.strides[3] == a.itemsize) and \
            all(s % a.itemsize == 0 for s in a.strides):
        return a
    return np.ascontiguousarray(a)


def _kv_operand(x):
    """K or V for the attention kernel: bf16 (ml_dtypes.bfloat16) as its uint16 bits, anything
    else as float32; strided views kept (see _rows)."""
    x = np.asarray(x)
    if x.dtype == bfloat16:
        return _rows(x).view(np.uint16)
    return _rows(np.asarray(x, np.float32))


class NativeBackend:
    """The C kernels. n_threads=None: OMP_NUM_THREADS, else the number of physical cores."""

    name = "native"
    dtype = np.dtype(np.float32)
    weight_formats = WEIGHT_FORMATS

    _int4_chunk_bytes = 32 << 20  # source bytes per chunk of rows of the int4 quantiser

    def __init__(self, n_threads=None, int8_block=twins.DEFAULT_INT8_BLOCK):
        from .. import _native
        self._nat = _native
        self.n_threads = _native.default_threads() if n_threads is None else int(n_threads)
        if self.n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        _tune_allocator_once(_native)
        self.int8_block = int8_block

    def prepare_linear(self, w, bias=None, weights="float32"):
        """`weights` applies to float tensors; a quantized GGUF tensor runs in its own format (Q8_0 / Q6_K ->
        int8, Q4_K -> int4, Q4_0 -> q4_0, others bf16: kernels/gguf_repack.py)."""
        if isinstance(w, GGUFQuantTensor):
            return gguf_repack.prepare_gguf_linear(w, bias, release=release_pages)
        if weights == "int8":
            b = check_bias(bias, np.shape(w)[0])
            q, s = self._quantize_int8(w)
            return LinearHandle("int8", q, s, self.int8_block, bias=b)
        if weights == "int4" and np.ndim(w) == 2 and np.shape(w)[1] % int4.SUPER == 0:
            b = check_bias(bias, np.shape(w)[0])
            codes, meta = self._quantize_int4(w)
            return LinearHandle("int4", codes, meta, int4.SUPER, bias=b)
        if weights == "int4":  # 2-D check / the int8 stand-in of a matrix int4 cannot hold: twins.pack
            return self.prepare_linear(w, bias, "int8") if np.ndim(w) == 2 else twins.pack(w, bias, weights, self.int8_block)
        return twins.pack(w, bias, weights, self.int8_block)

    def _quantize_int8(self, w):
        """The C quantiser (bitwise equal to twins.quantize_int8), in chunks of rows: a memory-mapped
        checkpoint tensor is read, quantised and its pages released chunk by chunk, so quantising the
        256000-row LM head never holds a float copy of it or all of its file pages at once."""
        w = np.asarray(w) if not isinstance(w, np.memmap) else w
        if w.ndim != 2:
            raise ValueError("weight must be 2-D (out, in), got shape %s" % (w.shape,))
        N, K = w.shape
        blk = self.int8_block
        q = np.empty((N, K), np.int8)
        s = np.empty((N, -(-K // blk)), np.float32)
        rows = max(1, (32 << 20) // max(1, K * w.dtype.itemsize))
        for r0 in range(0, N, rows):
            chunk = w[r0:r0 + rows]
            src = np.ascontiguousarray(chunk).view(np.uint16) if chunk.dtype == bfloat16 else \
                np.ascontiguousarray(chunk, dtype=np.float32)
            q[r0:r0 + rows], s[r0:r0 + rows] = self._nat.quantize_int8(src, blk, n_threads=self.n_threads)
            release_pages(chunk)
        return q, s

    def _quantize_int4(self, w):
        """The C int4 quantiser (csrc/g2_int4_quant.c, bitwise int4.quantize_int4), in chunks of rows
        with the checkpoint's pages released behind them, as _quantize_int8; bf16 chunks go to C as
        their bits (widened there, exactly). A row int4 cannot hold raises int4.QuantizationError."""
        N, K = w.shape
        codes = np.empty((N, K // 2), np.uint8)
        meta = np.empty((N, K // int4.SUPER * int4.META_BYTES), np.uint8)
        rows = max(1, self._int4_chunk_bytes // max(1, K * w.dtype.itemsize))
        for r0 in range(0, N, rows):
            chunk = w[r0:r0 + rows]
            src = np.ascontiguousarray(chunk).view(np.uint16) if chunk.dtype == bfloat16 else \
                np.ascontiguousarray(chunk, dtype=np.float32)
            codes[r0:r0 + rows], meta[r0:r0 + rows], status = self._nat.quantize_int4(src, n_threads=self.n_threads)
            release_pages(chunk)
            int4.check_status(status, r0)
        return codes, meta

    def linear(self, x, handle):
        if not isinstance(handle, LinearHandle):  # a plain matrix: treat as float32 weights
            handle = twins.pack(handle, None, "float32", self.int8_block)
        x2, lead = as_2d(x, handle.in_features)
        if handle.fmt == "int4":
            y = self._nat.linear_int4(x2, handle.w, handle.scales, handle.bias, n_threads=self.n_threads)
            return y.reshape(lead + (handle.out_features,))
        if handle.fmt == "q4_0":
            y = self._nat.linear_q4_0(x2, handle.w, handle.scales, handle.bias, n_threads=self.n_threads)
            return y.reshape(lead + (handle.out_features,))
        y = self._nat.linear(x2, handle.w, handle.fmt, handle.scales, handle.bias, handle.block,
                             n_threads=self.n_threads)
        return y.reshape(lead + (handle.out_features,))

    def linear_many(self, x, handles):
        """Several linears of the same x (q/k/v, gate/up) in one kernel call: x is rounded/split
        once and every matrix's row blocks share one parallel loop. Each result is exactly what
        linear(x, h) gives; mixed formats or biases fall back to separate calls."""
        hs = [h if isinstance(h, LinearHandle) else twins.pack(h, None, "float32", self.int8_block)
              for h in handles]
        h0 = hs[0]
        fusable = 1 < len(hs) <= self._nat.MAX_PARTS and all(
            h.fmt == h0.fmt and h.block == h0.block and h.in_features == h0.in_features and h.bias is None
            for h in hs)
        if not fusable:
            return [self.linear(x, h) for h in hs]
        x2, lead = as_2d(x, h0.in_features)
        if h0.fmt == "int4":  # x quantised / packed once for all of them
            ys = self._nat.linear_int4_multi(x2, [h.w for h in hs], [h.scales for h in hs], n_threads=self.n_threads)
            return [y.reshape(lead + (h.out_features,)) for y, h in zip(ys, hs)]
        if h0.fmt == "q4_0":  # x quantised once for all of them (decode)
            ys = self._nat.linear_q4_0_multi(x2, [h.w for h in hs], [h.scales for h in hs], n_threads=self.n_threads)
            return [y.reshape(lead + (h.out_features,)) for y, h in zip(ys, hs)]
        ys = self._nat.linear_multi(x2, [h.w for h in hs], h0.fmt,
                                    [h.scales for h in hs] if h0.fmt == "int8" else None, h0.block,
                                    n_threads=self.n_threads)
        return [y.reshape(lead + (h.out_features,)) for y, h in zip(ys, hs)]

    def embed(self, table, ids):
        return gather_rows(table, ids).astype(np.float32)  # see ReferenceBackend.embed

    def attention(self, q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window, return_probs=False):
        """q (B,Hq,T,D); k, v (B,Hkv,S,D) as float32 arrays or ml_dtypes.bfloat16 arrays
        (gemma2np.checkpoint.bfloat16: the bf16 KV cache), both of one dtype. Views whose last axis
        is contiguous (the cache hands (B, K, L, D) slices of a (B, K, capacity, D) buffer) go to the
        kernel as they are, with their strides: no per-step copy of the cache."""
        c = np.ascontiguousarray
        kv = None if key_valid is None else c(np.asarray(key_valid).astype(np.uint8, copy=False))
        kk, vv = _kv_operand(k), _kv_operand(v)
        if kk.dtype != vv.dtype:  # one bf16, one float32: widen both (exact)
            kk, vv = _rows(np.asarray(k, np.float32)), _rows(np.asarray(v, np.float32))
        out = self._nat.attention(_rows(np.asarray(q, np.float32)), kk, vv, c(q_pos, dtype=np.int64),
                                  c(k_pos, dtype=np.int64), kv, float(scaling), softcap, window,
                                  n_threads=self.n_threads)
        if not return_probs:
            return out
        # the C kernel keeps no probabilities (it streams over the keys); they are recomputed with ops in
        # float32 for output_attentions / recording, while `out` stays the C kernel's
        return out, twins.attention_probs_f32(q, k, q_pos, k_pos, key_valid, scaling, softcap, window)

    def rmsnorm(self, x, w, eps):
        c = np.ascontiguousarray
        return self._nat.rmsnorm(c(x, dtype=np.float32), c(w, dtype=np.float32), float(eps),
                                 n_threads=self.n_threads)

    def geglu(self, gate, up, activation="gelu_pytorch_tanh"):
        if activation not in _TANH_GELUS + _ERF_GELUS:
            return ops.geglu(np.asarray(gate, np.float32), np.asarray(up, np.float32), activation)
        c = np.ascontiguousarray
        return self._nat.geglu(c(gate, dtype=np.float32), c(up, dtype=np.float32),
                               "tanh" if activation in _TANH_GELUS else "none",
                               n_threads=self.n_threads)

    def rope(self, q, k, cos, sin):
        c = np.ascontiguousarray
        cos, sin = c(cos, dtype=np.float32), c(sin, dtype=np.float32)
        return tuple(self._nat.rope(c(x, dtype=np.float32), cos, sin, n_threads=self.n_threads) for x in (q, k))

    def softcap(self, x, cap):
        return ops.softcap(x, cap)  # NumPy on purpose: see the module docstring

    def argmax(self, x):
        return self._nat.argmax(np.ascontiguousarray(x, dtype=np.float32), n_threads=self.n_threads)

    def topk(self, x, k):
        return self._nat.topk(np.ascontiguousarray(x, dtype=np.float32), int(k),
                              n_threads=self.n_threads)
