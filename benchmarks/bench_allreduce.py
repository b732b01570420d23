"""Allreduce latency on this machine (loopback / shared memory), to feed the README's scaling model.

    mpiexec -n 2 python benchmarks/bench_allreduce.py [--iters 2000] [--json OUT]

For the payloads tensor-parallel Gemma 2 sends -- one hidden vector per token (float32: 2B 9 KB,
9B 14 KB, 27B 18 KB) at decode, 128 of them at a 128-token prefill -- it times:
  g2       gemma2np.parallel's allreduce_sum (Allgather + rank-order sum: deterministic, the one in use)
  mpi      MPI_Allreduce(SUM) of the same buffer, for comparison
  bcast    an 8-byte MPI_Bcast (what a forward call's input broadcast costs at the least)
Reports the median and the 90th percentile in microseconds. Ranks are pinned to nothing: on a busy
machine the figures wander; take the median of a few runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from gemma2np.parallel import MPIComm  # noqa: E402

SHAPES = {"2B": 2304, "9B": 3584, "27B": 4608}


def _time(fn, iters):
    out = np.empty(iters)
    for i in range(iters):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return float(np.median(out)) * 1e6, float(np.percentile(out, 90)) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    comm = MPIComm()
    mpi = comm.MPI
    if comm.size < 2:
        sys.exit("run under mpiexec -n 2 (or more)")
    rows = []
    for model, E in SHAPES.items():
        for tokens in (1, 128):
            x = np.random.default_rng(comm.rank).normal(size=(tokens, E)).astype(np.float32)
            y = np.empty_like(x)
            iters = args.iters if tokens == 1 else max(50, args.iters // 20)
            for _ in range(20):  # warm-up
                comm.allreduce_sum(x)
            comm.barrier()
            g2 = _time(lambda: comm.allreduce_sum(x), iters)
            comm.barrier()
            raw = _time(lambda: comm.comm.Allreduce(x, y, op=mpi.SUM), iters)
            rows.append({"model": model, "tokens": tokens, "bytes": x.nbytes, "g2_us": g2, "mpi_us": raw})
    one = np.zeros(1, np.int64)
    comm.barrier()
    bc = _time(lambda: comm.comm.Bcast(one, root=0), args.iters)
    if comm.rank == 0:
        print(f"ranks {comm.size}, {mpi.Get_library_version().splitlines()[0].strip()}")
        print(f"{'shape':6s} {'tokens':>6s} {'bytes':>9s} {'g2 allreduce us (p50/p90)':>27s} {'MPI_Allreduce us':>20s}")
        for r in rows:
            print(f"{r['model']:6s} {r['tokens']:6d} {r['bytes']:9d} {r['g2_us'][0]:13.1f} / {r['g2_us'][1]:7.1f}"
                  f"    {r['mpi_us'][0]:9.1f} / {r['mpi_us'][1]:7.1f}")
        print(f"8-byte bcast: {bc[0]:.1f} / {bc[1]:.1f} us")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": comm.size, "rows": rows, "bcast_us": bc}, f, indent=1)


if __name__ == "__main__":
    main()
