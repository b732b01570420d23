"""Merging the LM head's vocabulary shards: full logits, argmax, top-k.

Each rank holds the logits of its vocabulary rows [offset, offset + V_r) (ranks in vocabulary
order). The merges below give exactly what the same operation on the concatenated logits gives:

  gather_logits   the concatenation (allgather): V * 4 bytes per row, minus the rank's own part
                  (1 MB per token at vocab 256000). What generate() uses, since its logits
                  processors (repetition penalty, top-p, ...) read the whole distribution.
  global_argmax   np.argmax semantics: the first maximal index; a NaN counts as the maximum and
                  the first NaN wins. 12 bytes per row per rank (value + index).
  global_topk     kernels.topk semantics: value-descending, ties by smaller index; each rank sends
                  its own top-k (k * 12 bytes per row), and the global top-k is among them.

`merge_argmax` / `merge_topk` are the pure merges over the per-rank candidates (testable in one
process); the `global_*` functions run them on what `comm.allgather_obj` collected.
"""
from __future__ import annotations

import numpy as np

__all__ = ["gather_logits", "local_argmax", "merge_argmax", "global_argmax", "local_topk", "merge_topk",
           "global_topk"]


def gather_logits(local: np.ndarray, comm) -> np.ndarray:
    """(..., V_r) on every rank -> (..., V) on every rank (rank order = vocabulary order)."""
    return comm.allgather(local, axis=-1)


def local_argmax(local: np.ndarray, offset: int):
    """(max value, global index) per row of this rank's shard; np.argmax's first-max / first-NaN rule."""
    local = np.asarray(local)
    idx = np.argmax(local, axis=-1)
    val = np.take_along_axis(local, idx[..., None], axis=-1)[..., 0]
    return val, idx.astype(np.int64) + offset


def merge_argmax(values: list, indices: list) -> np.ndarray:
    """Per-rank candidates (in vocabulary order) -> the global argmax. A later rank wins only with a
    strictly larger value (so ties go to the lower index, as np.argmax), and a NaN beats everything
    but an earlier NaN."""
    best_v = np.array(values[0], copy=True)
    best_i = np.array(indices[0], copy=True)
    for v, i in zip(values[1:], indices[1:]):
        v = np.asarray(v)
        take = (~np.isnan(best_v)) & ((v > best_v) | np.isnan(v))
        best_v = np.where(take, v, best_v)
        best_i = np.where(take, i, best_i)
    return best_i


def global_argmax(local: np.ndarray, offset: int, comm) -> np.ndarray:
    val, idx = local_argmax(local, offset)
    parts = comm.allgather_obj((val, idx))
    return merge_argmax([p[0] for p in parts], [p[1] for p in parts])


def local_topk(local: np.ndarray, k: int, offset: int):
    """This shard's top-min(k, V_r): value-descending, ties by smaller index (a stable sort)."""
    local = np.asarray(local, np.float32)
    if np.isnan(local).any():
        raise ValueError("topk input contains NaN")
    idx = np.argsort(-local, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(local, idx, axis=-1), idx.astype(np.int64) + offset


def merge_topk(values: list, indices: list, k: int):
    """Concatenate the candidates in vocabulary order and take the top k with a stable sort on the
    value: equal values keep vocabulary order, i.e. ties by smaller index, as one process does."""
    v = np.concatenate([np.asarray(a) for a in values], axis=-1)
    i = np.concatenate([np.asarray(a) for a in indices], axis=-1)
    order = np.argsort(-v, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(v, order, axis=-1), np.take_along_axis(i, order, axis=-1)


def global_topk(local: np.ndarray, k: int, offset: int, comm):
    parts = comm.allgather_obj(local_topk(local, k, offset))
    return merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
