"""Data-parallel evaluation: spread a list of work items (e.g. the token windows of a perplexity or
KL-divergence run) over the ranks, each rank holding a whole model, and gather the per-item results
on rank 0 in the original order.

    results = map_windows(lambda w: score(model, w), windows, comm)   # list on rank 0, None elsewhere

Item i goes to rank i mod N (round robin: windows of a corpus have equal lengths, so every rank gets
the same work within one item). Only rank 0 needs the real list; the other ranks may pass anything
(it is broadcast from rank 0, so every rank works on the same items). If `fn` raises on any rank,
every rank raises the same RankError naming the ranks and their errors (no rank is left waiting).
Results are combined by the caller on rank 0 in item order, so a sum over windows (e.g. of
negative log-likelihoods) is added in the same order as in one process: bitwise the same total.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .comm import Communicator, get_comm

__all__ = ["map_windows", "assignment"]


def assignment(n_items: int, rank: int, size: int) -> list[int]:
    """The item indices rank `rank` of `size` works on."""
    return list(range(rank, n_items, size))


def map_windows(fn: Callable, items: Sequence, comm: Communicator | None = None, *, all_ranks: bool = False,
                broadcast_items: bool = True):
    """[fn(item) for item in items], computed across the ranks; the list is returned on rank 0 (and on
    every rank with all_ranks=True), None on the others. broadcast_items=False: every rank already
    holds the same list (saves pickling large windows)."""
    comm = get_comm() if comm is None else comm
    if broadcast_items and comm.size > 1:
        items = comm.bcast_obj(list(items) if comm.rank == 0 else None)
    items = list(items)
    mine = assignment(len(items), comm.rank, comm.size)
    out, error = [], ""
    try:
        for i in mine:
            out.append(fn(items[i]))
    except Exception as e:  # reported collectively below, so no rank waits forever in the gather
        error = f"{type(e).__name__}: {e}"
    comm.check(not error, error, what="failed in map_windows")
    parts = comm.allgather_obj(out) if all_ranks else comm.gather_obj(out, root=0)
    if parts is None:
        return None
    results = [None] * len(items)
    for r, part in enumerate(parts):
        for i, value in zip(assignment(len(items), r, comm.size), part):
            results[i] = value
    return results
