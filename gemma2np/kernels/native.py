"""Backends implementing the contract of docs/ARCHITECTURE.md ("Backend contract").

NumpyBackend  -- the NumPy twins (gemma2np.kernels.reference); prepare_linear returns a float32
                 array (the dequantised weights when weights="bfloat16"/"int8"), or a
                 LinearHandle when a bias is given.
NativeBackend -- the C/Cython kernels (gemma2np._native); prepare_linear returns a LinearHandle
                 holding the weights in the chosen storage format.

Both accept any float dtype for weights (incl. ml_dtypes.bfloat16) and activations; activations
are computed in float32.
"""
from __future__ import annotations

import numpy as np

from . import reference as ref

WEIGHT_FORMATS = ("float32", "bfloat16", "bfloat16_dp", "int8")
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_accurate")
_ERF_GELUS = ("gelu", "gelu_python")


class LinearHandle:
    """Prepared weights of one linear layer: y = x @ W^T + bias, W stored as `fmt`."""

    __slots__ = ("fmt", "w", "scales", "block", "bias", "out_features", "in_features")

    def __init__(self, fmt, w, scales=None, block=0, bias=None):
        self.fmt, self.w, self.scales, self.block, self.bias = fmt, w, scales, block, bias
        self.out_features, self.in_features = w.shape

    @property
    def nbytes(self):
        return sum(a.nbytes for a in (self.w, self.scales, self.bias) if a is not None)

    def __repr__(self):
        return "LinearHandle(%s, out=%d, in=%d%s)" % (self.fmt, self.out_features, self.in_features,
                                                      ", bias" if self.bias is not None else "")


def _pack(w, bias, weights, block):
    if weights not in WEIGHT_FORMATS:
        raise ValueError("weights must be one of %s, got %r" % (WEIGHT_FORMATS, weights))
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError("weight must be 2-D (out, in), got shape %s" % (w.shape,))
    b = None
    if bias is not None:
        b = np.ascontiguousarray(np.asarray(bias).astype(np.float32))
        if b.shape != (w.shape[0],):
            raise ValueError("bias must have shape (%d,), got %s" % (w.shape[0], b.shape))
    if weights == "float32":
        # no copy when w is already contiguous float32 (a memory-mapped f32 checkpoint stays mapped)
        return LinearHandle("float32", np.ascontiguousarray(w, dtype=np.float32), bias=b)
    if weights in ("bfloat16", "bfloat16_dp"):
        return LinearHandle(weights, ref.to_bf16_bits(w), bias=b)
    q, s = ref.quantize_int8(w, block)
    return LinearHandle("int8", q, s, block, bias=b)


def _as_2d(x, in_features):
    x = np.asarray(x)
    if x.shape[-1] != in_features:
        raise ValueError("x has %d features, the layer expects %d" % (x.shape[-1], in_features))
    lead = x.shape[:-1]
    return np.ascontiguousarray(x.reshape(-1, in_features), dtype=np.float32), lead


class NumpyBackend:
    name = "numpy"

    def __init__(self, n_threads=None, int8_block=ref.DEFAULT_INT8_BLOCK):
        self.n_threads = n_threads
        self.int8_block = int8_block

    def prepare_linear(self, w, bias=None, weights="float32"):
        h = _pack(w, bias, weights, self.int8_block)
        if h.fmt != "float32":
            # the packed weights: linear() then goes through reference.linear, which applies the
            # format's exact semantics (bf16 / int8 storage, activations rounded at DP_MIN_M rows)
            return h
        if bias is not None:
            return h
        return h.w

    def linear(self, x, handle):
        if isinstance(handle, LinearHandle):
            x2, lead = _as_2d(x, handle.in_features)
            y = ref.linear(x2, handle.w, handle.fmt, handle.scales, handle.bias, handle.block)
            return y.reshape(lead + (handle.out_features,))
        x = np.asarray(x, np.float32)
        return x @ np.asarray(handle).T

    def linear_many(self, x, handles):
        """[linear(x, h) for h in handles] (the native backend fuses them into one call)."""
        return [self.linear(x, h) for h in handles]

    def attention(self, q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window):
        return ref.attention(q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window)

    def rmsnorm(self, x, w, eps):
        return ref.rmsnorm(x, w, eps)

    def geglu(self, gate, up, activation="gelu_pytorch_tanh"):
        if activation in _TANH_GELUS:
            return ref.geglu(gate, up, "tanh")
        if activation in _ERF_GELUS:
            return ref.geglu(gate, up, "none")
        from .. import ops  # other activations: the readable reference
        return ops.geglu(np.asarray(gate, np.float32), np.asarray(up, np.float32), activation)

    def rope(self, x, cos, sin):
        return ref.rope(x, cos, sin)

    def softcap(self, x, cap):
        return x if cap is None else ref.softcap(x, cap)

    def argmax(self, x):
        return ref.argmax(x)

    def topk(self, x, k):
        return ref.topk(x, k)


_ALLOCATOR_TUNED = False


def _tune_allocator_once(nat):
    """Process-wide, once, when the first native backend is made (opt out: GEMMA2NP_NO_MALLOPT=1):
    glibc's malloc keeps freed blocks up to 32 MB in the heap instead of unmapping them, so the
    activations of each forward pass are not page-faulted in afresh (0.3 s of a 1.8 s prefill of
    gemma-2-2b with bf16 weights; see csrc/gemma2np_kernels.c, g2_tune_malloc)."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    import os
    if os.environ.get("GEMMA2NP_NO_MALLOPT", "") not in ("", "0"):
        return
    nat.tune_malloc()


class NativeBackend(NumpyBackend):
    """The C kernels. n_threads=None: OMP_NUM_THREADS, else the number of physical cores."""

    name = "native"

    def __init__(self, n_threads=None, int8_block=ref.DEFAULT_INT8_BLOCK):
        from .. import _native
        self._nat = _native
        self.n_threads = _native.default_threads() if n_threads is None else int(n_threads)
        if self.n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        _tune_allocator_once(_native)
        self.int8_block = int8_block

    def prepare_linear(self, w, bias=None, weights="float32"):
        if weights == "int8":
            b = None
            if bias is not None:
                b = np.ascontiguousarray(np.asarray(bias).astype(np.float32))
                if b.shape != (np.shape(w)[0],):
                    raise ValueError("bias must have shape (%d,), got %s" % (np.shape(w)[0], b.shape))
            q, s = self._quantize_int8(w)
            return LinearHandle("int8", q, s, self.int8_block, bias=b)
        return _pack(w, bias, weights, self.int8_block)

    def _quantize_int8(self, w):
        """The C quantiser (bitwise equal to reference.quantize_int8), in chunks of rows: a memory-mapped
        checkpoint tensor is read, quantised and its pages released chunk by chunk, so quantising the
        256000-row LM head never holds a float copy of it or all of its file pages at once."""
        from ..checkpoint import bfloat16, release_pages

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

    def linear(self, x, handle):
        if not isinstance(handle, LinearHandle):  # a plain matrix: treat as float32 weights
            handle = _pack(handle, None, "float32", self.int8_block)
        x2, lead = _as_2d(x, handle.in_features)
        y = self._nat.linear(x2, handle.w, handle.fmt, handle.scales, handle.bias, handle.block,
                             n_threads=self.n_threads)
        return y.reshape(lead + (handle.out_features,))

    def linear_many(self, x, handles):
        """Several linears of the same x (q/k/v, gate/up) in one kernel call: x is rounded/split
        once and every matrix's row blocks share one parallel loop. Each result is exactly what
        linear(x, h) gives; mixed formats or biases fall back to separate calls."""
        hs = [h if isinstance(h, LinearHandle) else _pack(h, None, "float32", self.int8_block)
              for h in handles]
        h0 = hs[0]
        fusable = 1 < len(hs) <= self._nat.MAX_PARTS and all(
            h.fmt == h0.fmt and h.block == h0.block and h.in_features == h0.in_features and h.bias is None
            for h in hs)
        if not fusable:
            return [self.linear(x, h) for h in hs]
        x2, lead = _as_2d(x, h0.in_features)
        ys = self._nat.linear_multi(x2, [h.w for h in hs], h0.fmt,
                                    [h.scales for h in hs] if h0.fmt == "int8" else None, h0.block,
                                    n_threads=self.n_threads)
        return [y.reshape(lead + (h.out_features,)) for y, h in zip(ys, hs)]

    def attention(self, q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window):
        c = np.ascontiguousarray
        kv = None if key_valid is None else c(np.asarray(key_valid).astype(np.uint8, copy=False))
        return self._nat.attention(c(q, dtype=np.float32), c(k, dtype=np.float32),
                                   c(v, dtype=np.float32), c(q_pos, dtype=np.int64),
                                   c(k_pos, dtype=np.int64), kv, float(scaling), softcap, window,
                                   n_threads=self.n_threads)

    def rmsnorm(self, x, w, eps):
        c = np.ascontiguousarray
        return self._nat.rmsnorm(c(x, dtype=np.float32), c(w, dtype=np.float32), float(eps),
                                 n_threads=self.n_threads)

    def geglu(self, gate, up, activation="gelu_pytorch_tanh"):
        if activation not in _TANH_GELUS + _ERF_GELUS:
            return NumpyBackend.geglu(self, gate, up, activation)
        c = np.ascontiguousarray
        return self._nat.geglu(c(gate, dtype=np.float32), c(up, dtype=np.float32),
                               "tanh" if activation in _TANH_GELUS else "none",
                               n_threads=self.n_threads)

    def rope(self, x, cos, sin):
        c = np.ascontiguousarray
        return self._nat.rope(c(x, dtype=np.float32), c(cos, dtype=np.float32),
                              c(sin, dtype=np.float32), n_threads=self.n_threads)

    def softcap(self, x, cap):
        if cap is None:
            return x
        return self._nat.softcap(np.ascontiguousarray(x, dtype=np.float32), float(cap),
                                 n_threads=self.n_threads)

    def argmax(self, x):
        return self._nat.argmax(np.ascontiguousarray(x, dtype=np.float32), n_threads=self.n_threads)

    def topk(self, x, k):
        return self._nat.topk(np.ascontiguousarray(x, dtype=np.float32), int(k),
                              n_threads=self.n_threads)
