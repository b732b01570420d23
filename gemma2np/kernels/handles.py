"""Prepared weights of a linear layer: LinearHandle for the twins and native backends (the storage
formats), ReferenceLinear for the reference backend (the stored weight, converted at use).

Formats ("float32", "bfloat16", "bfloat16_dp", "int8", "int4") and their exact semantics: kernels/twins.py
(int4's layout: kernels/int4.py). "q4_0" (kernels/q4_0.py) is made only from a GGUF's Q4_0 tensors
(kernels/gguf_repack.py), never by quantising: it is not a `weights=` choice.
(twins.pack makes a handle; the native backend packs with its bitwise-equal C converters).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

WEIGHT_FORMATS = ("float32", "bfloat16", "bfloat16_dp", "int8", "int4")


class LinearHandle:
    """Prepared weights of one linear layer: y = x @ W^T + bias, W stored as `fmt`."""

    __slots__ = ("fmt", "w", "scales", "block", "bias", "out_features", "in_features")

    def __init__(self, fmt, w, scales=None, block=0, bias=None):
        self.fmt, self.w, self.scales, self.block, self.bias = fmt, w, scales, block, bias
        self.out_features, self.in_features = w.shape
        if fmt in ("int4", "q4_0"):  # w: the codes, two 4-bit inputs per byte; scales: per-block bytes / f16
            self.in_features *= 2

    @property
    def nbytes(self):
        return sum(a.nbytes for a in (self.w, self.scales, self.bias) if a is not None)

    def arrays(self):
        """The arrays the handle holds (to tell whether it still shares memory with a checkpoint)."""
        return [a for a in (self.w, self.scales, self.bias) if a is not None]

    def __repr__(self):
        return "LinearHandle(%s, out=%d, in=%d%s)" % (self.fmt, self.out_features, self.in_features,
                                                      ", bias" if self.bias is not None else "")


def check_bias(bias, out_features):
    if bias is None:
        return None
    b = np.ascontiguousarray(np.asarray(bias).astype(np.float32))
    if b.shape != (out_features,):
        raise ValueError("bias must have shape (%d,), got %s" % (out_features, b.shape))
    return b


def as_2d(x, in_features):
    """(..., in) -> (contiguous float32 (M, in), the leading shape)."""
    x = np.asarray(x)
    if x.shape[-1] != in_features:
        raise ValueError("x has %d features, the layer expects %d" % (x.shape[-1], in_features))
    lead = x.shape[:-1]
    return np.ascontiguousarray(x.reshape(-1, in_features), dtype=np.float32), lead


class ReferenceLinear(NamedTuple):
    """A linear layer of the reference backend (kernels/ops_backend.py): y = x @ W^T + bias.

    `w` is the weight as the checkpoint stores it (a memory-mapped bf16/f16/f32 array, or a GGUF view):
    it is converted to `dtype` at each use and the converted copy dropped after, so a bf16 model never
    holds a float copy of its weights. `row_block`: None converts the whole weight per call (a decoder
    layer's projection); an int converts and multiplies `row_block` output rows at a time (the LM head,
    whose float copy is the largest tensor of the model). Indexing [0] gives the stored weight.
    """

    w: np.ndarray                  # (out, in) as stored
    bias: np.ndarray | None        # (out,) in the compute dtype, or None
    dtype: np.dtype                # the compute dtype (float32 or float64)
    row_block: int | None = None   # rows converted at a time, or None: all of them

    @property
    def out_features(self):
        return self.w.shape[0]

    def arrays(self):
        # a quantized GGUF weight (gguf_quant.GGUFQuantTensor) is its blocks: never dequantized to compare
        return [a for a in (getattr(self.w, "raw", self.w), self.bias) if a is not None]
