"""ReferenceBackend: the backend protocol served by gemma2np.ops itself (float32 or float64).

It has no numerics of its own: every method is one call of the reference op, so `backend="numpy"`
computes exactly what a reader of ops.py expects. Weights are kept (or memory-mapped) as arrays of
the compute dtype; a linear handle is the pair (weight, bias).
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..checkpoint import gather_rows

_DTYPES = {"float32": np.float32, "float64": np.float64}


class ReferenceBackend:
    name = "numpy"
    weight_formats = ("float32",)

    def __init__(self, dtype="float32", n_threads=None):
        dt = np.dtype(_DTYPES.get(dtype, dtype))
        if dt not in (np.float32, np.float64):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype = dt
        self.n_threads = n_threads  # unused: NumPy's own BLAS threads

    def prepare_linear(self, w, bias=None, weights="float32"):
        if weights != "float32":
            raise ValueError("the numpy backend computes with float32/float64 weights; use backend='native' for "
                             f"weights={weights!r}")
        # astype(copy=False): a memory-mapped float32 tensor stays mapped in a float32 model
        return (np.asarray(w).astype(self.dtype, copy=False),
                None if bias is None else np.asarray(bias).astype(self.dtype))

    def embed(self, table, ids):
        # rows of a memory-mapped table are read with pread (checkpoint.gather_rows), so lookups do not
        # pull pages of the 256000-row table into the resident set; then widened to the compute dtype
        return gather_rows(table, ids).astype(self.dtype)

    def rmsnorm(self, x, w, eps):
        return ops.rms_norm(x, w, eps)

    def linear(self, x, handle):
        w, b = handle
        return ops.linear(x, w, b)

    def linear_many(self, x, handles):
        return [self.linear(x, h) for h in handles]

    def rope(self, q, k, cos, sin):
        return ops.apply_rotary_pos_emb(q, k, cos, sin)

    def attention(self, q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window, return_probs=False):
        return ops.attention(q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window, return_probs=return_probs)

    def geglu(self, gate, up, activation="gelu_pytorch_tanh"):
        return ops.geglu(gate, up, activation)

    def softcap(self, x, cap):
        return ops.softcap(x, cap)

    def argmax(self, x):
        return ops.argmax(x)

    def topk(self, x, k):
        return ops.topk(x, k)
