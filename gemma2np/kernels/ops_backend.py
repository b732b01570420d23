"""ReferenceBackend: the backend protocol served by gemma2np.ops itself (float32 or float64).

It has no numerics of its own: every method is one call of the reference op, so `backend="numpy"`
computes exactly what a reader of ops.py expects.

Weights at any size (issue 10): a linear handle (handles.ReferenceLinear) keeps the weight as stored --
memory-mapped bf16/f16/f32 -- and `linear` converts it to the compute dtype at use, dropping the copy
after. A bf16 27B model therefore needs one layer's float copy at a time, not 108 GB; an f32 checkpoint
at float32 is used in place (astype(copy=False): zero copies, as before). The conversion is exact
(bf16/f16 -> f32 -> f64 are widenings), and it is the same `astype` the load-time conversion did, so
every projection multiplies the same float array as before: bitwise the same results.

The LM head (prepare_linear(..., row_block=VOCAB_ROW_BLOCK), set by the model's loader for its heads) is
converted and multiplied VOCAB_ROW_BLOCK vocabulary rows at a time, each block's logits written into the
(..., V) result. This *defines* the reference's head as blocked, whatever the checkpoint's dtype: OpenBLAS
does not give the same bits for x @ W[a:b].T as for the columns a:b of x @ W.T (measured on this machine:
its threaded gemv splits the columns between threads differently, and unaligned blocks differ even on one
thread), so a blocked head is not the full matmul, only its equal within float rounding. With one rule for
all dtypes, a bf16 checkpoint and its exact f32 widening still give identical logits, and the eager
conversion below gives the same bits as the streaming one. Heads with at most VOCAB_ROW_BLOCK rows (the
bundled model's 4096, classification heads, every golden) are one block: the full matmul, as before.

GEMMA2NP_REFERENCE_CONVERT=load (or ReferenceBackend(convert="load")) converts every weight once at
load instead, as gemma2np did before: faster repeated forwards, a full float copy in memory, the same
bits. It exists to prove that claim (tests/test_streaming_reference.py) and for small models.

Quantized GGUF weights (gguf_quant.GGUFQuantTensor) take the same road: `astype` dequantizes the whole
projection per use, a row slice of the LM head one block of rows, with gguf's reference dequantizer --
the same float32 values the old expand-at-load path held, hence the same bits.
"""
from __future__ import annotations

import os

import numpy as np

from .. import ops
from ..checkpoint import bfloat16, gather_rows, release_pages
from ..gguf_quant import is_quant
from .handles import ReferenceLinear
from .protocol import BackendError

_DTYPES = {"float32": np.float32, "float64": np.float64}
# rows of the LM head converted at a time: 8192 x 4608 (gemma-2-27b) is 151 MB in float32, 302 MB in
# float64, against 4.7 / 9.4 GB for the whole 256000-row head; large enough that BLAS runs at full speed
VOCAB_ROW_BLOCK = 8192
CONVERT_ENV = "GEMMA2NP_REFERENCE_CONVERT"
_CONVERT = ("use", "load")


def _at_use(w, dt):
    """The stored weight w in the compute dtype dt, for one use. When that is a conversion (a widening of
    bf16/f16, a dequantization), the file pages it read are released afterwards (checkpoint.release_pages):
    the float copy is what the matmul uses, and the OS page cache keeps the pages for the next use, so the
    process's resident set holds one projection's float copy instead of every page of the memory map (a
    9B bf16 checkpoint: 18.5 GB of mapped pages otherwise). Residency only: the values are the same."""
    out = w.astype(dt, copy=False)
    if out is not w:
        release_pages(w)
    return out


class ReferenceBackend:
    name = "numpy"
    weight_formats = ("float32",)

    def __init__(self, dtype="float32", n_threads=None, convert=None):
        dt = np.dtype(_DTYPES.get(dtype, dtype))
        if dt not in (np.float32, np.float64):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype = dt
        self.n_threads = n_threads  # unused: NumPy's own BLAS threads
        if convert is None:
            convert = os.environ.get(CONVERT_ENV, "").strip() or "use"
        if convert not in _CONVERT:
            raise BackendError(f"the reference converts weights at 'use' (default) or at 'load' ({CONVERT_ENV}), "
                               f"got {convert!r}")
        self.convert = convert

    def prepare_linear(self, w, bias=None, weights="float32", row_block=None):
        """row_block (reference only): convert and multiply that many output rows at a time (the LM head)."""
        if weights != "float32":
            raise ValueError("the numpy backend computes with float32/float64 weights; use backend='native' for "
                             f"weights={weights!r}")
        if row_block is not None and (isinstance(row_block, bool) or not isinstance(row_block, (int, np.integer))
                                      or row_block < 1):
            raise ValueError(f"row_block must be a positive integer or None, got {row_block!r}")
        if not is_quant(w):  # a GGUFQuantTensor stays quantized: astype / row slices dequantize per use
            w = np.asarray(w)
        if self.convert == "load":
            w = w.astype(self.dtype, copy=False)  # the pre-streaming behaviour: one float copy, kept
        return ReferenceLinear(w, None if bias is None else np.asarray(bias).astype(self.dtype), self.dtype,
                               None if row_block is None else int(row_block))

    def embed(self, table, ids):
        # rows of a memory-mapped table are read with pread (checkpoint.gather_rows), so lookups do not
        # pull pages of the 256000-row table into the resident set; then widened to the compute dtype
        return gather_rows(table, ids).astype(self.dtype)

    def rmsnorm(self, x, w, eps):
        return ops.rms_norm(x, w, eps)

    def linear(self, x, handle):
        w, b, dt, rows = handle
        n_out = w.shape[0]
        if rows is None or n_out <= rows:
            # astype(copy=False): an array already in the compute dtype is used in place; else an exact
            # widening of the stored weight, freed when this call returns
            return ops.linear(x, _at_use(w, dt), b)
        out = np.empty(x.shape[:-1] + (n_out,), np.result_type(x.dtype, dt))
        for r0 in range(0, n_out, rows):
            # x keeps its shape (B, T, E): numpy then makes the same gemm/gemv calls per block whatever the path
            out[..., r0:r0 + rows] = ops.linear(x, _at_use(w[r0:r0 + rows], dt),
                                                None if b is None else b[r0:r0 + rows])
        return out

    def linear_many(self, x, handles):
        return [self.linear(x, h) for h in handles]

    def rope(self, q, k, cos, sin):
        return ops.apply_rotary_pos_emb(q, k, cos, sin)

    def attention(self, q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window, return_probs=False):
        # a bf16 KV cache (cache.py) hands over bf16 keys / values: widened to the compute dtype, which is exact,
        # so the reference computes with the stored (rounded) numbers; float32 / float64 ones pass untouched
        k, v = (a.astype(q.dtype) if a.dtype == bfloat16 else a for a in (k, v))
        return ops.attention(q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window, return_probs=return_probs)

    def geglu(self, gate, up, activation="gelu_pytorch_tanh"):
        return ops.geglu(gate, up, activation)

    def softcap(self, x, cap):
        return ops.softcap(x, cap)

    def argmax(self, x):
        return ops.argmax(x)

    def topk(self, x, k):
        return ops.topk(x, k)
