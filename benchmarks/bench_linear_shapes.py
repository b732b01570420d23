"""Per-linear rates of one decoder layer at a model's shape (not a test; issue 10, "why is int8 slow at 9B").

    python benchmarks/bench_linear_shapes.py --models 2b,9b --formats bfloat16,int8 [--threads 1 --cpu-time]

For each model shape (gemma2np/configs/gemma-2-{2b,9b,27b}) and weight format, random weights (std 0.02)
are prepared as the model prepares them (NativeBackend.prepare_linear, so int8 goes through the C
quantiser and its chunked allocation), and the layer's calls are timed the way the decoder makes them:
q/k/v and gate/up fused (linear_many), o_proj and down_proj alone. Decode (M = 1) reports the weight-read
GB/s (codes + scales), prefill (M = --prefill) GFLOP/s. Each figure is the best of --reps passes.

Decode must stream from DRAM, as in the model: the layer is copied until the copies exceed --cold-mb
(default 1200 MB; this VM reports a 480 MB L3, so a smaller set is partly served from cache) and a pass runs
over all of them. --cpu-time times with process_time (user + system CPU of the process): with one thread on
a busy machine it does not count the time the thread waited for a core. --no-thp turns off NumPy's
madvise(MADV_HUGEPAGE) for the weights (4 KB pages). The last column is how much of the process's anonymous
memory is in transparent huge pages.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gemma2np.kernels.handles import LinearHandle  # noqa: E402
from gemma2np.kernels.twins import BF16  # noqa: E402

GROUPS = (("qkv", ("q", "k", "v")), ("o", ("o",)), ("gateup", ("gate", "up")), ("down", ("down",)))


def layer_shapes(cfg: dict) -> dict:
    """(out, in) of each projection of one decoder layer."""
    E, F, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return {"q": (H * D, E), "k": (KV * D, E), "v": (KV * D, E), "o": (E, H * D),
            "gate": (F, E), "up": (F, E), "down": (E, F)}


def load_config(model: str) -> dict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gemma2np", "configs",
                        f"gemma-2-{model}.config.json")
    with open(path) as f:
        return json.load(f)


def handle_bytes(h) -> int:
    return h.w.nbytes + (0 if h.scales is None else h.scales.nbytes)


def make_layer(be, shapes: dict, fmt: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shp in shapes.items():
        w = (rng.standard_normal(shp, dtype=np.float32) * np.float32(0.02)).astype(BF16)
        out[name] = be.prepare_linear(w, None, fmt)
    return out


def copy_layer(layer: dict) -> dict:
    """A fresh allocation of every array (timing only: the same values)."""
    return {k: LinearHandle(h.fmt, h.w.copy(), None if h.scales is None else h.scales.copy(), h.block)
            for k, h in layer.items()}


def time_pass(be, layers, M, shapes, clock, reps):
    """Best-of-reps seconds per layer of each group over one pass through `layers`."""
    rng = np.random.default_rng(1)
    xs = {g: rng.standard_normal((M, shapes[names[0]][1]), dtype=np.float32) for g, names in GROUPS}
    best = dict.fromkeys(xs, float("inf"))
    for r in range(reps + 1):  # the first pass warms up
        acc = dict.fromkeys(xs, 0.0)
        for L in layers:
            for g, names in GROUPS:
                t = clock()
                if len(names) > 1:
                    be.linear_many(xs[g], tuple(L[n] for n in names))
                else:
                    be.linear(xs[g], L[names[0]])
                acc[g] += clock() - t
        if r:
            best = {g: min(best[g], acc[g] / len(layers)) for g in best}
    return best


def thp_share() -> float | None:
    try:
        with open("/proc/self/smaps_rollup") as f:
            d = {p[0]: int(p[1]) for p in (line.split() for line in f) if len(p) >= 2 and p[1].isdigit()}
        return d.get("AnonHugePages:", 0) / max(1, d.get("Anonymous:", 0))
    except OSError:
        return None


def run(model, fmt, threads, prefill, reps, cold_mb, clock, shapes=None, log=print):
    from gemma2np.kernels.native import NativeBackend

    be = NativeBackend(n_threads=threads)
    shapes = shapes or layer_shapes(load_config(model))
    base = make_layer(be, shapes, fmt)
    per_layer = sum(handle_bytes(h) for h in base.values())
    layers = [base] + [copy_layer(base) for _ in range(max(1, -(-cold_mb * 10**6 // per_layer)) - 1)]
    rows = []
    for M in (1, prefill):
        t = time_pass(be, layers, M, shapes, clock, reps)
        for g, names in GROUPS:
            nbytes = sum(handle_bytes(base[n]) for n in names)
            flops = sum(2 * M * shapes[n][0] * shapes[n][1] for n in names)
            rows.append(dict(model=model, fmt=fmt, threads=be.n_threads, M=M, group=g, ms=t[g] * 1e3,
                             GBs=nbytes / t[g] / 1e9, GFLOPs=flops / t[g] / 1e9))
    thp = thp_share()
    for r in rows:
        r["thp"] = thp
        rate = "%6.1f GB/s" % r["GBs"] if r["M"] == 1 else "%6.0f GFLOP/s" % r["GFLOPs"]
        log("%-4s %-9s nt=%d M=%-4d %-7s %9.2f ms  %s   (layers %d, %.0f MB; THP %s)" % (
            model, fmt, r["threads"], r["M"], r["group"], r["ms"], rate, len(layers), len(layers) * per_layer / 1e6,
            "n/a" if thp is None else "%.0f%%" % (100 * thp)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="2b,9b")
    ap.add_argument("--formats", default="bfloat16,int8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cold-mb", type=int, default=1200)
    ap.add_argument("--cpu-time", action="store_true", help="time with process_time (for --threads 1 on a busy machine)")
    ap.add_argument("--no-thp", action="store_true", help="4 KB pages: no MADV_HUGEPAGE for NumPy's buffers")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    if a.no_thp:
        (getattr(np, "_core", None) or np.core).multiarray._set_madvise_hugepage(False)
    clock = time.process_time if a.cpu_time else time.perf_counter
    rows = []
    for model in a.models.split(","):
        for fmt in a.formats.split(","):
            rows += run(model, fmt, a.threads, a.prefill, a.reps, a.cold_mb, clock)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
