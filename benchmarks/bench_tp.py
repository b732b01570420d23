"""Tensor parallelism at the gemma-2-2b shape, same machine, same cores: 1 process x 2 threads against
2 ranks x 1 thread (mpiexec). Not a test. Random weights, written once (benchmarks/bench.py's writer).

    python benchmarks/bench_tp.py                                   # the real run (bf16 native; takes a while)
    python benchmarks/bench_tp.py --layers 2 --prefill 16 --decode 4   # a quick check of the script

Every row runs in fresh processes with bench.py's protocol (warm-up, prefill of a (1, T) prompt with the
cache and logits_to_keep=1, greedy decode; best of --repeat). Per row it reports prefill / decode tok/s,
per-rank peak RSS and weight bytes, and for the tensor-parallel row the bytes each rank contributes to
the collectives per decoded token (allreduce payloads + its share of the gathered logits; with the
rank-order allreduce (Allgather) every rank also receives (N - 1) times its own payload).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import bench  # noqa: E402  (checkpoint writer, timing protocol, /proc helpers)

TAG = "@@BENCH-TP@@ "


def worker(spec):
    import numpy as np

    from gemma2np.modeling import Gemma2ForCausalLM
    from gemma2np.parallel import get_comm
    from gemma2np.parallel.tensor_parallel import weight_bytes

    comm = get_comm()
    t = time.perf_counter()
    model = Gemma2ForCausalLM.from_pretrained(spec["dir"], backend=spec["backend"], weights=spec["weights"],
                                              n_threads=spec["threads"], tensor_parallel=True)
    load_s = time.perf_counter() - t
    after_load = bench._proc_status()

    prefill, decode, argmax_last = bench.gemma2np_steps(model)
    res = bench._run_protocol(spec, prefill, decode, argmax_last)
    # bytes this rank puts into collectives per decoded token (MPIComm counts them)
    per_token = None
    if hasattr(comm, "bytes_sent"):
        st = prefill(np.full((1, 8), 5, np.int64))
        b0, n0 = comm.bytes_sent, comm.n_allreduce
        for _ in range(4):
            st = decode(st, argmax_last(st))
        per_token = {"bytes": (comm.bytes_sent - b0) / 4, "allreduces": (comm.n_allreduce - n0) / 4}
    res.update(load_s=load_s, after_load=after_load, at_end=bench._proc_status(), peak_rss=bench._peak_rss(),
               weight_bytes=weight_bytes(model.model), comm_per_token=per_token,
               plan=getattr(getattr(model.tp, "plan", None), "describe", lambda: "whole model")())
    everyone = comm.gather_obj(res)
    if comm.rank == 0:
        print(TAG + json.dumps(everyone), flush=True)


def run(spec, ranks, threads, timeout):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(dict(spec, threads=threads))]
    if ranks > 1:
        mpiexec = shutil.which("mpiexec")
        if mpiexec is None:
            sys.exit("mpiexec not found: pip install 'gemma2np[mpi]'")
        cmd = [mpiexec, "-n", str(ranks)] + cmd
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {p.returncode}):\n{p.stderr[-3000:]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default="/tmp/gemma2np-bench")
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--backend", default="native")
    ap.add_argument("--weights", default="bfloat16", choices=["float32", "bfloat16", "int8"])
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cores", type=int, default=2, help="1 process x CORES threads vs CORES ranks x 1 thread")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    fmt = "f32" if args.weights == "float32" and args.backend == "numpy" else "bf16"
    dirs = bench.ensure_checkpoints(args.cache_dir, [fmt], args.layers, 0, lambda m: print(m, file=sys.stderr))
    spec = {"dir": dirs[fmt], "backend": args.backend, "weights": args.weights, "prefill": [args.prefill],
            "decode": args.decode, "repeat": args.repeat, "vocab_size": 256000}
    rows = {}
    for label, ranks, threads in ((f"1 process x {args.cores} threads", 1, args.cores),
                                  (f"{args.cores} ranks x 1 thread", args.cores, 1)):
        print(f"running {label} ...", file=sys.stderr)
        rows[label] = run(spec, ranks, threads, args.timeout)
    print(f"\ngemma-2-2b shape, {args.layers} layers, {args.backend} {args.weights}; prefill {args.prefill} tokens, "
          f"decode {args.decode} tokens (best of {args.repeat})\n")
    print("| run | prefill tok/s | decode tok/s | peak RSS per rank GB | weight bytes per rank GB | "
          "collective bytes / token / rank | allreduces / token |")
    print("|---|---|---|---|---|---|---|")
    for label, ranks in rows.items():
        r0 = ranks[0]
        rss = " / ".join(f"{r['peak_rss'] / 1e9:.2f}" for r in ranks)
        wb = " / ".join(f"{(r['weight_bytes']['sharded'] + r['weight_bytes']['replicated']) / 1e9:.2f}" for r in ranks)
        c = r0["comm_per_token"]
        cb = "-" if c is None else "%.1f KB" % (c["bytes"] / 1e3)
        ca = "-" if c is None else "%.0f" % c["allreduces"]
        print(f"| {label} | {r0['prefill_tok_s'][str(args.prefill)]:.1f} | {r0['decode_tok_s']:.2f} | {rss} | {wb} | "
              f"{cb} | {ca} |")
    for label, ranks in rows.items():
        for r in ranks:
            print(f"  {label}: {r['plan']}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
