"""GGUFQuantTensor: a quantized GGUF tensor (Q4_0, Q8_0, Q4_K, Q6_K, ...) kept as its memory-mapped blocks.

Layer 2 of the package, beside gguf_io. load_gguf used to expand every quantized tensor to float32 at load
(a 27B Q4_0 file of 15.5 GB became 108 GB); it now hands out one of these instead, and each consumer
widens what it needs when it needs it:

* the numpy reference (kernels/ops_backend.py) calls `astype` per use -- the whole matrix for a decoder
  projection, VOCAB_ROW_BLOCK rows at a time (a row slice, `t[r0:r1]`) for the LM head -- and drops it;
* the embedding lookup dequantizes only the gathered rows (`gather`);
* the native backend repacks the blocks into its own formats at load (kernels/gguf_repack.py);
* state_dict / save_pretrained / convert see an array-like: `np.asarray(t)` dequantizes on demand.

Values: always `gguf.quants.dequantize`, the gguf package's NumPy port of llama.cpp's reference
dequantizers (exactly llama.cpp's values). Every type dequantizes block by block and every block lies
inside one row (GGUF rows are whole blocks), so rows r0:r1 dequantized alone are bitwise the same rows
of the whole tensor dequantized at once: the per-use widening computes with exactly the array the old
expand-at-load path held.
"""
from __future__ import annotations

import math

import numpy as np

from .checkpoint import CheckpointError

__all__ = ["GGUFQuantTensor", "is_quant"]


class GGUFQuantTensor:
    """A 2-D quantized GGUF tensor: `raw` (rows, row_bytes) uint8 blocks, usually a view of the file's map.

    shape is NumPy's (out_features, in_features) order; dtype is that of its dequantized values (float32),
    so shape / dtype checks and np.asarray treat it like the array it stands for."""

    __slots__ = ("raw", "ggml_type", "shape", "name", "path")
    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, raw: np.ndarray, ggml_type, shape: tuple[int, int], name: str = "", path: str = ""):
        import gguf

        self.ggml_type = gguf.GGMLQuantizationType(int(ggml_type))
        self.shape = (int(shape[0]), int(shape[1]))
        self.name, self.path = name, path
        block, type_bytes = self.block_shape
        rows, cols = self.shape
        if cols % block:
            raise CheckpointError(f"{path}: tensor {name} ({self.type_name}) has rows of {cols} values, not a "
                                  f"multiple of its block size {block}")
        row_bytes = cols // block * type_bytes
        raw = np.asarray(raw)
        if raw.dtype != np.uint8 or raw.size != rows * row_bytes:
            raise CheckpointError(f"{path}: tensor {name} ({self.type_name}, shape {self.shape}) should hold "
                                  f"{rows * row_bytes} bytes, found {raw.size} (truncated or corrupt)")
        self.raw = raw.reshape(rows, row_bytes)

    # ------------------------------------------------------------------ what it is
    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def block_shape(self) -> tuple[int, int]:
        """(values per block, bytes per block) of the type (gguf.GGML_QUANT_SIZES)."""
        import gguf

        return gguf.GGML_QUANT_SIZES[self.ggml_type]

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"GGUFQuantTensor({self.name or '?'}, {self.type_name}, shape={self.shape})"

    # ------------------------------------------------------------------ values
    def dequantize_rows(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Rows r0:r1 as float32 (r1 - r0, in_features), llama.cpp's values (gguf.quants.dequantize).
        A block whose scale decodes to inf / NaN is a CheckpointError naming the tensor, not silent NaN."""
        import gguf

        r1 = self.shape[0] if r1 is None else r1
        try:
            out = gguf.quants.dequantize(self.raw[r0:r1], self.ggml_type)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {self.name} is {self.type_name}, which the installed gguf "
                                  "package cannot dequantize; re-quantize the model to F32/F16/BF16/Q8_0 (or a "
                                  "type gguf.quants supports)") from None
        out = out.reshape(-1, self.shape[1])
        check_finite(out, self)
        return out

    def dequantize(self) -> np.ndarray:
        return self.dequantize_rows(0, self.shape[0])

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        """The dequantized values in `dtype` (float32 -> float64 / bf16 are the usual NumPy casts of them)."""
        return self.dequantize().astype(dtype, copy=False)

    def __array__(self, dtype=None, copy=None):
        a = self.dequantize()
        return a if dtype is None else a.astype(dtype, copy=False)

    def gather(self, index) -> np.ndarray:
        """self[index] for an integer array of row ids, float32, shape index.shape + (in_features,):
        only the gathered rows' blocks are read and dequantized (the embedding lookup)."""
        flat = np.asarray(index).reshape(-1)
        uniq, inverse = np.unique(flat, return_inverse=True)
        rows = np.empty((len(uniq), self.shape[1]), np.float32)
        for i, r in enumerate(uniq):
            rows[i] = self.dequantize_rows(int(r), int(r) + 1)[0]
        return rows[inverse].reshape(np.shape(index) + (self.shape[1],))

    def __getitem__(self, key):
        """Row slices (tensor-parallel shards, blocks of the LM head) stay quantized views; a key that
        reaches into the columns or picks rows by index dequantizes what it selects."""
        if isinstance(key, slice) and key.step in (None, 1):
            r0, r1, _ = key.indices(self.shape[0])
            r1 = max(r0, r1)
            return GGUFQuantTensor(self.raw[r0:r1], self.ggml_type, (r1 - r0, self.shape[1]), self.name, self.path)
        if isinstance(key, (int, np.integer)):
            r = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= r < self.shape[0]:
                raise IndexError(f"row {key} out of range for {self.shape[0]} rows")
            return self.dequantize_rows(r, r + 1)[0]
        if isinstance(key, np.ndarray) and key.dtype.kind in "iu":
            return self.gather(key)
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], slice) and isinstance(key[1], slice):
            rows = self[key[0]]
            return np.asarray(rows.column_slice(key[1]))  # the selected values, float32
        return np.asarray(self)[key]

    def column_slice(self, sl: slice) -> "GGUFQuantTensor | np.ndarray":
        """Columns sl of every row: still quantized when sl falls on block boundaries (whole blocks are
        byte ranges of each row), else the dequantized columns (float32)."""
        block, type_bytes = self.block_shape
        c0, c1, _ = sl.indices(self.shape[1])
        if c0 % block == 0 and (c1 % block == 0 or c1 == self.shape[1]):
            raw = np.ascontiguousarray(self.raw[:, c0 // block * type_bytes:c1 // block * type_bytes])
            return GGUFQuantTensor(raw, self.ggml_type, (self.shape[0], c1 - c0), self.name, self.path)
        return np.ascontiguousarray(self.dequantize()[:, c0:c1])

    def copy_to_ram(self) -> "GGUFQuantTensor":
        """The same blocks in private memory (from_pretrained(mmap=False))."""
        from .checkpoint import copy_to_ram

        return GGUFQuantTensor(copy_to_ram(self.raw), self.ggml_type, self.shape, self.name, self.path)


def check_finite(values: np.ndarray, t: GGUFQuantTensor) -> None:
    """A GGUF block whose f16 scale is inf / NaN (a corrupt or hostile file) decodes to non-finite weights:
    refused with the tensor's name rather than computed with."""
    if not np.isfinite(values).all():
        raise CheckpointError(f"{t.path}: tensor {t.name} ({t.type_name}) has blocks that decode to inf/NaN "
                              "(a corrupt scale)")


def is_quant(a) -> bool:
    return isinstance(a, GGUFQuantTensor)
