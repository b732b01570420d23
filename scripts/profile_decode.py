"""Where one decode step's time goes: per-op wall / CPU time and bytes read, at a given depth (issue #15).

    OMP_NUM_THREADS=1 python scripts/profile_decode.py --model /tmp/gemma2np-bench/gemma-2-2b-bf16-L2 \
        --weights bfloat16 --depth 2048 --steps 8

Every backend method of the loaded model is wrapped (on the instance, nothing of the package changes)
with time.perf_counter (wall) and time.thread_time (CPU of the calling thread: with OMP_NUM_THREADS=1
the op's whole work, and a busy machine hardly moves it). The prompt is `depth` random tokens run as
one prefill (not timed), then `steps` decode steps are timed. Reported per step: each op's time, its
bytes (a linear: its weight bytes; attention: the K/V rows it reads; element-wise ops: input + output),
the rate, and "model python" = the step's wall time minus every wrapped op (reshapes, the cache's
update, masks, validation, the residual adds) plus the minor page faults (ru_minflt) per step.
The CPU-time rates are a per-op cost, not a speed claim: measure tok/s with benchmarks/bench.py on a
quiet machine.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gemma2np.cache import Gemma2Cache  # noqa: E402
from gemma2np.kernels.handles import LinearHandle  # noqa: E402
from gemma2np.modeling import Gemma2ForCausalLM  # noqa: E402

OPS = ("embed", "rmsnorm", "linear", "linear_many", "rope", "attention", "geglu", "softcap", "argmax")


def _nbytes(a):
    return int(getattr(a, "nbytes", 0))


def _handle_bytes(h):
    if isinstance(h, LinearHandle):
        return _nbytes(h.w) + (_nbytes(h.scales) if h.scales is not None else 0)
    w = getattr(h, "w", h)  # the reference backend's ReferenceLinear, or a plain matrix
    return _nbytes(getattr(w, "raw", w))


def _shape(h):
    """(in, out) of a linear handle of any backend"""
    w = getattr(h, "w", h)
    return int(w.shape[1]), int(w.shape[0])


def _op_bytes(name, args, out):
    """Bytes an op reads (weights, cache) plus what it writes, as a rough lower bound of its traffic."""
    if name == "linear":
        return _handle_bytes(args[1]) + _nbytes(args[0]) + _nbytes(out)
    if name == "linear_many":
        return sum(_handle_bytes(h) for h in args[1]) + _nbytes(args[0]) + sum(_nbytes(o) for o in out)
    if name == "attention":
        q, k, v, q_pos, k_pos, key_valid, scaling, softcap, window = args[:9]
        S = k.shape[2]
        seen = S if window is None else min(S, int(window))  # rows the kernel reads (others it skips)
        row = k.shape[0] * k.shape[1] * k.shape[3]
        return seen * row * (k.itemsize + v.itemsize) + 2 * _nbytes(q)
    if name == "embed":  # the rows looked up, not the table
        return _nbytes(out) // 2 * (2 if args[0].dtype.itemsize == 2 else 1) + _nbytes(args[1]) + _nbytes(out)
    outs = out if isinstance(out, tuple) else (out,)
    return sum(_nbytes(a) for a in args if isinstance(a, np.ndarray)) + sum(_nbytes(o) for o in outs)


class OpTimer:
    def __init__(self, backend):
        self.be = backend
        self.on = False
        self.rec = defaultdict(lambda: [0, 0.0, 0.0, 0])  # key -> calls, wall, cpu, bytes
        self.depth = 0  # only the outermost backend call is timed (a backend's linear_many may call its linear)
        self.tape, self.mode, self.pos = [], None, 0  # --replay: "record" the ops' outputs, then "replay" them
        for name in OPS:
            orig = getattr(backend, name)
            setattr(backend, name, self._wrap(name, orig))

    def _wrap(self, name, orig):
        def timed(*args, **kw):
            if self.depth:  # called from inside another backend method: part of that one
                return orig(*args, **kw)
            if self.mode == "record":
                self.depth += 1
                try:
                    out = orig(*args, **kw)
                finally:
                    self.depth -= 1
                self.tape.append(out)
                return out
            if self.mode == "replay":  # no kernel runs: what is left is the model's own Python
                self.pos += 1
                return self.tape[self.pos - 1]
            if not self.on:
                return orig(*args, **kw)
            self.depth += 1
            try:
                w0, c0 = time.perf_counter(), time.thread_time()
                out = orig(*args, **kw)
                w1, c1 = time.perf_counter(), time.thread_time()
            finally:
                self.depth -= 1
            r = self.rec[self._key(name, args)]
            r[0] += 1
            r[1] += w1 - w0
            r[2] += c1 - c0
            r[3] += _op_bytes(name, args, out)
            return out
        return timed

    @staticmethod
    def _key(name, args):
        if name == "linear":
            return "linear %d->%d" % _shape(args[1])
        if name == "linear_many":
            return "linear_many " + "+".join(str(_shape(h)[1]) for h in args[1])
        if name == "attention":
            return "attention " + ("sliding" if args[8] is not None else "global")
        return name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", default="bfloat16")
    ap.add_argument("--backend", default="native")
    ap.add_argument("--cache-dtype", default=None)
    ap.add_argument("--depth", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay", action="store_true", help="also time a step whose backend calls return the "
                    "outputs recorded in the previous step (the model's Python alone: validation, cache, "
                    "masks, reshapes, residual adds)")
    a = ap.parse_args(argv)

    kw = {"n_threads": a.threads} if a.backend == "native" and a.threads else {}
    if a.cache_dtype:
        kw["cache_dtype"] = a.cache_dtype
    model = Gemma2ForCausalLM.from_pretrained(a.model, backend=a.backend, weights=a.weights, **kw)
    cfg = model.config
    timer = OpTimer(model.backend)
    rng = np.random.default_rng(a.seed)
    ids = rng.integers(0, cfg.vocab_size, (1, a.depth), dtype=np.int64)
    cache = Gemma2Cache(cfg.layer_types, cfg.sliding_window, capacity=a.depth + a.steps + 8,
                        **({"dtype": a.cache_dtype} if a.cache_dtype else {}))
    mask = np.ones((1, a.depth + a.steps + 8), np.int64)
    out = model(input_ids=ids, attention_mask=mask[:, :a.depth], past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    tok = int(np.argmax(out.logits[0, -1]))

    def step(n, tok):
        o = model(input_ids=np.array([[tok]], np.int64), attention_mask=mask[:, :n + 1],
                  position_ids=np.array([[n]], np.int64), past_key_values=cache, use_cache=True,
                  cache_position=np.array([n], np.int64), logits_to_keep=1)
        return int(model.backend.argmax(o.logits[0, -1]))

    tok = step(a.depth, tok)  # warm-up step (first-touch of the decode buffers)
    walls, cpus, procs = [], [], []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    timer.on = True
    for s in range(a.steps):
        w0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        tok = step(a.depth + 1 + s, tok)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.thread_time() - c0)
        procs.append(time.process_time() - p0)
    timer.on = False
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    flt = (ru1.ru_minflt - ru0.ru_minflt) / a.steps
    vcs = (ru1.ru_nvcsw - ru0.ru_nvcsw) / a.steps  # voluntary switches: a thread went to sleep (futex waits)
    ivcs = (ru1.ru_nivcsw - ru0.ru_nivcsw) / a.steps

    n = a.steps
    step_wall, step_cpu = sum(walls) / n, sum(cpus) / n
    print("# %s, %s weights, %d layers, depth %d, %d steps, threads %s; per step (busy machine)" % (
        a.model, a.weights, cfg.num_hidden_layers, a.depth, n, getattr(model.backend, "n_threads", "-")))
    print("| op | calls | wall ms | cpu ms | MB | GB/s (cpu) | % of step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tw = tc = tb = 0.0
    for key, (calls, w, c, b) in sorted(timer.rec.items(), key=lambda kv: -kv[1][2]):
        w, c, b = w / n, c / n, b / n
        tw, tc, tb = tw + w, tc + c, tb + b
        print("| %s | %d | %.3f | %.3f | %.2f | %.1f | %.1f |" % (
            key, calls // n, 1e3 * w, 1e3 * c, b / 1e6, b / c / 1e9 if c > 0 else 0.0, 100 * c / step_cpu))
    print("| model python (rest; includes these timers' own ~10 us per call) | | %.3f | %.3f | | | %.1f |" % (
        1e3 * (step_wall - tw), 1e3 * (step_cpu - tc), 100 * (step_cpu - tc) / step_cpu))
    print("| **step** | | %.3f | %.3f | %.2f | %.1f | 100 |" % (1e3 * step_wall, 1e3 * step_cpu, tb / 1e6,
                                                                 tb / step_cpu / 1e9))
    replay = None
    if a.replay:
        timer.mode = "record"
        tok = step(a.depth + 1 + n, tok)
        timer.mode = "replay"
        best = float("inf")
        for r in range(5):  # the recorded step's outputs, at the next positions (the cache grows by a row)
            timer.pos = 0
            c0 = time.thread_time()
            step(a.depth + 2 + n + r, tok)
            best = min(best, time.thread_time() - c0)
        timer.mode = None
        replay = best
        print("model python alone (backend calls replayed from a recorded step): %.3f ms cpu per step" % (1e3 * best))
    print("minor page faults per step: %.1f; context switches per step: %.1f voluntary (a thread slept: "
          "OpenMP waits), %.1f involuntary; process CPU per step (all threads, spinning included): %.3f ms"
          % (flt, vcs, ivcs, 1e3 * sum(procs) / n))
    return {"ops": {k: tuple(v) for k, v in timer.rec.items()}, "steps": n, "step_cpu": step_cpu,
            "replay_cpu": replay, "model": model}


if __name__ == "__main__":
    main()
