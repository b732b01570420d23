"""The backend protocol: every op the model (and generation) runs through a backend.

Three implementations (docs/ARCHITECTURE.md, "Backend protocol"):
  ReferenceBackend (kernels/ops_backend.py)  IS gemma2np.ops, float32 or float64; no numerics of its own
  TwinBackend      (kernels/twins.py)        the NumPy twins of the C kernels (their specification)
  NativeBackend    (kernels/native.py)       the C/Cython kernels (gemma2np._native)

The model calls these methods unconditionally; what a backend cannot do faster it does with `ops`.
Shapes: B batch, T new tokens, S keys (cache + new), H query heads, K kv heads, D head_dim.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

# the op methods every backend implements (tests/test_backends.py checks all three)
OPS = ("prepare_linear", "embed", "rmsnorm", "linear", "linear_many", "rope", "attention", "geglu",
       "softcap", "argmax", "topk")


class BackendError(ValueError):
    """A backend that does not exist, cannot run here, or cannot do what was asked of it."""


class NativeUnavailableError(BackendError, ImportError):
    """backend="native" was asked for, but gemma2np._native cannot be imported (not built, or broken)."""


@runtime_checkable
class Backend(Protocol):
    name: str                       # "numpy" (the reference), "twins" or "native"
    dtype: np.dtype                 # the compute dtype of activations (float32; the reference: or float64)
    weight_formats: tuple           # the `weights=` values prepare_linear accepts

    def prepare_linear(self, w, bias=None, weights: str = "float32") -> Any:
        """w (out, in) of any float dtype (memory-mapped ok), bias (out,) or None -> an opaque handle."""

    def embed(self, table, ids) -> np.ndarray:
        """Rows of the embedding table: table (V, E) in the file's dtype, ids (B, T) -> (B, T, E) compute dtype."""

    def rmsnorm(self, x, w, eps) -> np.ndarray:
        """Gemma RMSNorm, scale (1 + w): x (..., E), w (E,) -> (..., E)."""

    def linear(self, x, handle) -> np.ndarray:
        """x (..., in) -> (..., out)."""

    def linear_many(self, x, handles) -> list:
        """[linear(x, h) for h in handles], each bitwise what its own call gives (native: one fused call)."""

    def rope(self, q, k, cos, sin) -> tuple:
        """q (B, H, T, D), k (B, K, T, D), cos/sin (B, T, D) -> (q, k) rotated (rotate_half layout)."""

    def attention(self, q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window, return_probs=False):
        """q (B, H, T, D) after RoPE, k/v (B, K, S, D), q_pos (T,), k_pos (S,) int64 absolute positions,
        key_valid (B, S) bool or None -> out (B, H, T, D) [, probs (B, H, T, S) when return_probs].
        Key j is visible from query i iff k_pos[j] <= q_pos[i], (window is None or q_pos[i] - window <
        k_pos[j]) and key_valid[b, j]; a row with no visible key is the uniform average over all S keys.
        return_probs never changes which kernel computes `out`."""

    def geglu(self, gate, up, activation) -> np.ndarray:
        """act(gate) * up, act = config.hidden_activation: (..., F), (..., F) -> (..., F)."""

    def softcap(self, x, cap) -> np.ndarray:
        """cap * tanh(x / cap); cap None: x itself."""

    def argmax(self, x) -> np.ndarray:
        """(..., V) -> (...) int64, the first maximum (first NaN wins), as np.argmax / torch.argmax on CPU."""

    def topk(self, x, k) -> tuple:
        """(..., V) -> (values, indices) (..., k), value-descending, ties by the smaller index; NaN: error."""
