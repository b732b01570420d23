"""Run under mpiexec by tests/test_mpi.py: the collectives, the vocabulary merges and map_windows on
real ranks. Every check is an assert; rank 0 writes "ok <checks>" to argv[1] at the end. A failing
assert aborts the job (install_abort_on_error), which the driver sees as a non-zero exit."""
import json
import sys

import numpy as np

from gemma2np.kernels import twins
from gemma2np.parallel import RankError, even_split, get_comm, install_abort_on_error, map_windows
from gemma2np.parallel.merge import gather_logits, global_argmax, global_topk

comm = get_comm()
install_abort_on_error(comm)
R, N = comm.rank, comm.size
assert N > 1, "run me under mpiexec -n 2 or more"
done = []

# allreduce_sum: the rank-order sum, bitwise the same on every rank
rng = np.random.default_rng(1234)
parts = rng.normal(size=(N, 3, 5)).astype(np.float32) * np.float32(1e3)
got = comm.allreduce_sum(parts[R])
want = parts[0].copy()
for r in range(1, N):
    want += parts[r]
assert np.array_equal(got, want), (got, want)
everyone = comm.allgather_obj(got.tobytes())
assert all(b == everyone[0] for b in everyone)
done.append("allreduce_sum")

# allgather with uneven sizes along an axis
x = np.full((2, R + 1, 3), R, np.float32)
g = comm.allgather(x, axis=1)
assert g.shape == (2, N * (N + 1) // 2, 3)
assert np.array_equal(g[0, :, 0], np.concatenate([np.full(r + 1, r, np.float32) for r in range(N)]))
done.append("allgather")

# vocabulary shards: full logits, argmax (ties and NaN), top-k
V = 37
full = rng.integers(0, 3, size=(4, V)).astype(np.float32)   # the same on every rank (same seed)
full[1, 25] = np.nan
sl = even_split(V, N)[R]
local = full[:, sl.start:sl.stop]
assert np.array_equal(gather_logits(local, comm), full, equal_nan=True)
assert np.array_equal(global_argmax(local, sl.start, comm), np.argmax(full, axis=-1))
clean = np.nan_to_num(full, nan=-1.0)
v, i = global_topk(clean[:, sl.start:sl.stop], 6, sl.start, comm)
wv, wi = twins.topk(clean, 6)
assert np.array_equal(i, wi) and np.array_equal(v, wv)
done.append("merges")

# data-parallel map: results on rank 0 in item order; the items are rank 0's
items = list(range(11)) if R == 0 else None
res = map_windows(lambda w: (w * w, comm.rank), items, comm)
if R == 0:
    assert [a for a, _ in res] == [w * w for w in range(11)]
    assert sorted({b for _, b in res}) == list(range(min(N, 11)))  # every rank worked
else:
    assert res is None
done.append("map_windows")

# a failure on one rank is raised on every rank, naming it
try:
    map_windows(lambda w: 1 // (w - 1), list(range(4)), comm, broadcast_items=False)
    raise AssertionError("expected RankError")
except RankError as e:
    assert "rank 1" in str(e) and "ZeroDivisionError" in str(e), e
done.append("check")

comm.barrier()
if R == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"size": N, "checks": done}, f)
