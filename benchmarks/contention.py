"""Decode speed on a busy machine (issue 13, "under load"). A script, not a test.

    python benchmarks/contention.py                       # both models, idle and loaded, 3 runs each
    python benchmarks/contention.py --models bundled --tokens 32 --repeat 1   # a quick check

For each model -- the bundled one (4 layers, hidden 256: tiny ops, where fanning work out to threads
cannot pay) and a random "small" Gemma 2 shape (hidden 1024, 6 layers, vocab 32768, ~128 M
parameters, bf16 weights: between the bundled model and gemma-2-2b) -- and each backend row
(native at 2 threads, native at 1 thread, numpy), it measures greedy decode tokens/s

  * idle: nothing else running (besides whatever else the machine runs), and
  * loaded: with one busy process (`python -c 'while True: pass'`) per core we may run on,

every run in a fresh subprocess (the OpenMP runtime reads its environment once, at load), decode
timed from the streamer's per-token timestamps after a short prefill. Printed: a Markdown table of
the median tok/s (and the range over --repeat runs). The machine this was written on is shared, so
figures are rough; compare rows from the same run only.

Extra rows: --env 'KEY=VALUE ...' runs the native 2-thread row again with that environment, e.g.
--env 'G2_PAR_MIN_US=0 GOMP_SPINCOUNT=300000' for the behaviour before issue 13's fix (every kernel
fans out, libgomp's default spinning).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TAG = "@@CONTENTION@@ "

SMALL = dict(vocab_size=32768, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=4, head_dim=128, sliding_window=512,
             max_position_embeddings=4096, query_pre_attn_scalar=128)


# ============================================================================ child: one measurement


def child(spec: dict) -> dict:
    sys.path.insert(0, ROOT)
    import numpy as np
    from gemma2np import Gemma2Config, Gemma2ForCausalLM

    kw = dict(backend=spec["backend"], n_threads=spec["threads"])
    if spec["backend"] == "native":
        kw["weights"] = "bfloat16"
    if spec["model"] == "bundled":
        path = os.path.join(ROOT, "gemma2np", "data", "gemma2-shakespeare")
        model = Gemma2ForCausalLM.from_pretrained(path, **kw)
    elif spec["model"] == "2b":  # the random gemma-2-2b bf16 checkpoint benchmarks/bench.py writes
        model = Gemma2ForCausalLM.from_pretrained(spec["checkpoint_2b"], **kw)
    else:
        model = Gemma2ForCausalLM.from_config(Gemma2Config(**SMALL), seed=0, **kw)
    prompt = np.array([[2] + list(range(10, 10 + spec["prompt"] - 1))], np.int64)

    class Clock:  # streamer: put() gets the prompt, then one (batch,) array per new token
        def __init__(self):
            self.t = []

        def put(self, ids):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)  # warm-up
    rates = []
    for _ in range(spec["repeat"]):
        c = Clock()
        model.generate(prompt, max_new_tokens=spec["tokens"] + 1, do_sample=False, eos_token_id=None, streamer=c)
        # c.t[1] = the first new token (after the prefill); decode = the steps after it
        rates.append((len(c.t) - 2) / (c.t[-1] - c.t[1]))
    return {"rates": rates}


# ============================================================================ parent


def busy_procs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run_row(spec: dict, env_extra: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env.update(env_extra)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bundled,small", help="comma list of: bundled, small, 2b")
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per run")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (prefilled first)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (each in the same process)")
    ap.add_argument("--busy", type=int, default=None, help="busy processes when loaded (default: one per core)")
    ap.add_argument("--env", action="append", default=[], metavar="'KEY=VALUE ...'",
                    help="an extra native 2-thread row with these environment variables (repeatable: one row "
                         "each; several variables space-separated)")
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy rows")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--checkpoint-2b", default="/tmp/gemma2np-bench/gemma-2-2b-bf16",
                    help="model '2b': a gemma-2-2b bf16 checkpoint (python benchmarks/bench.py --skip-f32 writes one)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(TAG + json.dumps(child(json.loads(a.child))), flush=True)
        return 0

    ncores = len(os.sched_getaffinity(0))
    nbusy = ncores if a.busy is None else a.busy
    rows = [("native", 2, {}), ("native", 1, {})] + [("native", 2, dict(kv.split("=", 1) for kv in e.split())) for e in a.env]
    if not a.no_numpy:
        rows.append(("numpy", None, {}))
    results = []
    for load in ("idle", "loaded"):
        procs = busy_procs(nbusy) if load == "loaded" else []
        try:
            time.sleep(0.5 if procs else 0)
            for model in a.models.split(","):
                for backend, threads, env in rows:
                    spec = dict(model=model, backend=backend, threads=threads, tokens=a.tokens, prompt=a.prompt,
                                repeat=a.repeat, checkpoint_2b=a.checkpoint_2b)
                    res = run_row(spec, env, timeout=1800)
                    res.update(load=load, model=model, backend=backend, threads=threads, env=env)
                    results.append(res)
                    print("%-6s %-7s %-6s threads=%-4s %-28s %s" % (
                        load, model, backend, threads, " ".join("%s=%s" % kv for kv in env.items()),
                        res.get("error") or " ".join("%.1f" % r for r in res["rates"])), file=sys.stderr, flush=True)
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
    print("Decode tok/s, median of %d runs (range), %d tokens after a %d-token prompt; loaded = %d busy "
          "processes on %d cores.\n" % (a.repeat, a.tokens, a.prompt, nbusy, ncores))
    print("| model | backend | threads | env | idle | loaded |")
    print("|---|---|---|---|---|---|")

    def cell(r):
        if r is None or "rates" not in r:
            return "error" if r else "-"
        v = r["rates"]
        return "%.1f (%.1f-%.1f)" % (statistics.median(v), min(v), max(v)) if len(v) > 1 else "%.1f" % v[0]

    for model in a.models.split(","):
        for backend, threads, env in rows:
            pick = {r["load"]: r for r in results
                    if r["model"] == model and r["backend"] == backend and r["threads"] == threads and r["env"] == env}
            print("| %s | %s | %s | %s | %s | %s |" % (model, backend, threads or "-",
                                                      " ".join("%s=%s" % kv for kv in env.items()) or "-",
                                                      cell(pick.get("idle")), cell(pick.get("loaded"))))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cores": ncores, "busy": nbusy, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
