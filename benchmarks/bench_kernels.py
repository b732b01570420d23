"""Micro-benchmark of the native linear kernel (not a test).

    python benchmarks/bench_kernels.py [--threads 2] [--reps 5] [--formats float32,bfloat16,...]

For (N, K) in {(9216, 2304), (2304, 9216)} (gemma-2-2b MLP shapes; add 256000x2304 for the LM
head) and each weight format: GFLOP/s at M=1 (decode) and M=128 (prefill), and the weight-read
GB/s at M=1. Also prints the relative error of each format vs float64 on random data
(max |y - y64| / max |y64|, and the relative RMS error). Timings are the minimum over --reps runs.

At M=1 the weights must come from DRAM, as in the model (26 layers >> L3): the call cycles through
enough copies of the weights to exceed --cold-mb (default 160 MB) and reports the time per call.
"""
import argparse
import time

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gemma2np import _native
from gemma2np.kernels import twins as ref


def bench(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--formats", default="float32,bfloat16,bfloat16_dp,int8")
    ap.add_argument("--block", type=int, default=ref.DEFAULT_INT8_BLOCK)
    ap.add_argument("--shapes", default="9216x2304,2304x9216")
    ap.add_argument("--ms", default="1,128")
    ap.add_argument("--cold-mb", type=float, default=160.0)
    args = ap.parse_args()
    nt = args.threads or _native.default_threads()
    print("cpu:", " ".join(_native.cpu_features()), "| simd:", _native.get_simd(),
          "| openmp:", _native.have_openmp(), "| threads:", nt)
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        w32 = (rng.standard_normal((N, K), dtype=np.float32) * 0.02).astype(np.float32)
        packed = {}
        for fmt in args.formats.split(","):
            if fmt == "float32":
                packed[fmt] = (w32, None, 0)
            elif fmt in ("bfloat16", "bfloat16_dp"):
                packed[fmt] = (ref.to_bf16_bits(w32), None, 0)
            elif fmt == "int8":
                q, s = ref.quantize_int8(w32, args.block)
                packed[fmt] = (q, s, args.block)
        for M in map(int, args.ms.split(",")):
            x = rng.standard_normal((M, K), dtype=np.float32)
            y64 = x.astype(np.float64) @ w32.astype(np.float64).T
            for fmt, (w, s, blk) in packed.items():
                y = _native.linear(x, w, fmt, s, None, blk, n_threads=nt)
                err_max = np.abs(y - y64).max() / np.abs(y64).max()
                err_rms = np.sqrt(np.mean((y - y64) ** 2) / np.mean(y64 ** 2))
                wbytes = w.nbytes + (s.nbytes if s is not None else 0)
                if M == 1:
                    ncopy = max(1, int(np.ceil(args.cold_mb * 1e6 / wbytes)))
                    copies = [(w, s)] + [(w.copy(), None if s is None else s.copy())
                                         for _ in range(ncopy - 1)]

                    def run(copies=copies, x=x, fmt=fmt, blk=blk):
                        for wc, sc in copies:
                            _native.linear(x, wc, fmt, sc, None, blk, n_threads=nt)
                    t = bench(run, args.reps) / len(copies)
                    del copies
                else:
                    t = bench(lambda: _native.linear(x, w, fmt, s, None, blk, n_threads=nt), args.reps)
                gflops = 2.0 * M * N * K / t / 1e9
                extra = "  %6.1f GB/s" % (wbytes / t / 1e9) if M == 1 else ""
                print("N=%5d K=%5d M=%4d %-12s %8.2f ms %7.1f GFLOP/s%s   err max %.2e rms %.2e"
                      % (N, K, M, fmt, t * 1e3, gflops, extra, err_max, err_rms))
        t = bench(lambda: x @ w32.T, args.reps)
        print("N=%5d K=%5d M=%4d numpy f32    %8.2f ms %7.1f GFLOP/s (BLAS reference)"
              % (N, K, M, t * 1e3, 2.0 * M * N * K / t / 1e9))


if __name__ == "__main__":
    main()
