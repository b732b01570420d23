"""End-to-end benchmark at the real gemma-2-2b shape (random weights; nothing is downloaded). Not a test.

    python benchmarks/bench.py                                  # the full run (takes a while)
    python benchmarks/bench.py --layers 2 --prefill 16 --decode 4   # a quick check of the script

1. Writes random-weight gemma-2-2b checkpoints (HF layout: config.json, sharded safetensors + index;
   init std 0.02 like transformers, RMSNorm weights 0, pad row of the embedding 0, tied LM head) to
   --cache-dir/gemma-2-2b-{f32,bf16}[-L<layers>], one tensor chunk at a time, so writing them needs
   ~100 MB of RAM. Existing complete checkpoints are reused. The bf16 checkpoint holds exactly the
   bf16 rounding of the f32 one (same random values).
2. Measures the machine's read bandwidth (2 threads; see `measure_bandwidth`).
3. Runs every row in a FRESH SUBPROCESS (so peak RSS is that row's): load (from_pretrained,
   memory-mapped), one untimed warm-up call, prefill (one forward of a (1, T) prompt with a fresh
   cache and logits_to_keep=1, as generate() does), decode (one token per step with the cache,
   greedy, after the prefill of the first --prefill length), peak RSS (getrusage ru_maxrss).
4. Prints a Markdown table (+ a details table) and optionally writes JSON (--json OUT).

Rows: gemma2np numpy (float32), gemma2np native (float32 / bfloat16 / int8), transformers eager
(fp32 / bf16) when torch + transformers import. See benchmarks/README.md for what each column means.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG_JSON = os.path.join(ROOT, "gemma2np", "configs", "gemma-2-2b.config.json")
GB = 1e9
MARKER = ".bench-complete.json"
RESULT_TAG = "@@BENCH-RESULT@@ "


# ============================================================================ checkpoint writing


def _layout(cfg: dict) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Shards: [embed + final norm], then one shard per decoder layer. HF names, tied LM head."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shards = [[("model.embed_tokens.weight", (cfg["vocab_size"], h)), ("model.norm.weight", (h,))]]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shards.append([
            (p + "self_attn.q_proj.weight", (nq * d, h)),
            (p + "self_attn.k_proj.weight", (nkv * d, h)),
            (p + "self_attn.v_proj.weight", (nkv * d, h)),
            (p + "self_attn.o_proj.weight", (h, nq * d)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ] + [(p + n + ".weight", (h,)) for n in ("input_layernorm", "post_attention_layernorm",
                                                  "pre_feedforward_layernorm", "post_feedforward_layernorm")])
    return shards


def _chunks(name, shape, cfg, seed, chunk_elems=1 << 24):
    """float32 chunks (row blocks) of one tensor: normal(0, std) for matrices, zeros for norms.
    Deterministic per (seed, name), so the f32 and bf16 checkpoints hold the same values."""
    import numpy as np

    rows = shape[0]
    cols = 1 if len(shape) == 1 else shape[1]
    if name.endswith("norm.weight"):
        yield np.zeros(shape, np.float32)
        return
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    std = np.float32(cfg.get("initializer_range", 0.02))
    step = max(1, chunk_elems // cols)
    pad = cfg.get("pad_token_id")
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        a = rng.standard_normal((r1 - r0, cols), dtype=np.float32)
        a *= std
        if name == "model.embed_tokens.weight" and pad is not None and r0 <= pad < r1:
            a[pad - r0] = 0.0  # transformers zeroes the padding row of the embedding
        yield a


def _write_shards(paths_by_fmt: dict, tensors, cfg, seed):
    """Write one shard in every requested format ('f32' / 'bf16') at once, streaming the data."""
    import ml_dtypes
    import numpy as np

    files = {}
    for fmt, path in paths_by_fmt.items():
        tag, size = ("F32", 4) if fmt == "f32" else ("BF16", 2)
        header = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in tensors:
            n = 1
            for s in shape:
                n *= s
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [off, off + n * size]}
            off += n * size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        f = open(path + ".tmp", "wb")
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        files[fmt] = f
    try:
        for name, shape in tensors:
            for a in _chunks(name, shape, cfg, seed):
                for fmt, f in files.items():
                    f.write((a if fmt == "f32" else a.astype(ml_dtypes.bfloat16)).tobytes())
    finally:
        for f in files.values():
            f.close()
    for fmt, path in paths_by_fmt.items():
        os.replace(path + ".tmp", path)


def ckpt_dir(cache_dir, fmt, layers, full_layers):
    return os.path.join(cache_dir, f"gemma-2-2b-{fmt}" + ("" if layers == full_layers else f"-L{layers}"))


def ensure_checkpoints(cache_dir, fmts, layers, seed, log):
    """Write (or reuse) the random-weight checkpoints; returns {fmt: directory}."""
    with open(CONFIG_JSON) as f:
        base = json.load(f)
    full = base["num_hidden_layers"]
    cfg = dict(base, num_hidden_layers=layers)
    dirs = {fmt: ckpt_dir(cache_dir, fmt, layers, full) for fmt in fmts}
    spec = {"layers": layers, "seed": seed, "config": os.path.basename(CONFIG_JSON), "version": 1}
    todo = {}
    for fmt, d in dirs.items():
        try:
            with open(os.path.join(d, MARKER)) as f:
                if json.load(f) == spec:
                    log(f"reusing {d}")
                    continue
        except (OSError, ValueError):
            pass
        todo[fmt] = d
    if not todo:
        return dirs
    shards = _layout(cfg)
    n = len(shards)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for fmt, d in todo.items():
        os.makedirs(d, exist_ok=True)
        for fn in os.listdir(d):
            if fn.endswith((".safetensors", ".tmp")) or fn in (MARKER, "model.safetensors.index.json"):
                os.remove(os.path.join(d, fn))
    t0 = time.perf_counter()
    for k, (fname, tensors) in enumerate(zip(names, shards)):
        _write_shards({fmt: os.path.join(d, fname) for fmt, d in todo.items()}, tensors, cfg, seed)
        log(f"  wrote shard {k + 1}/{n} ({', '.join(todo)}) {time.perf_counter() - t0:.0f} s")
    for fmt, d in todo.items():
        size = 4 if fmt == "f32" else 2
        weight_map, total = {}, 0
        for fname, tensors in zip(names, shards):
            for name, shape in tensors:
                weight_map[name] = fname
                m = 1
                for s in shape:
                    m *= s
                total += m * size
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        c = dict(cfg, torch_dtype="float32" if fmt == "f32" else "bfloat16")
        c["dtype"] = c["torch_dtype"]
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
        with open(os.path.join(d, MARKER), "w") as f:
            json.dump(spec, f)
        log(f"wrote {d} ({total / GB:.2f} GB)")
    return dirs


# ============================================================================ child-side helpers


def _proc_status():
    """VmRSS / VmHWM / RssAnon / RssFile of this process in bytes (Linux), else {}."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _peak_rss():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _gemma2np_weight_bytes(model):
    """Bytes of the prepared weights the model reads per decoded token: every linear handle (incl. the
    LM head, once), the norms; the embedding only if it is a different buffer from the LM head (then
    only one row of it is read per token, so it is not counted)."""
    import numpy as np

    seen = set()

    def nbytes(obj):
        if obj is None:
            return 0
        if isinstance(obj, (tuple, list)):
            return sum(nbytes(o) for o in obj)
        if isinstance(obj, np.ndarray):
            key = (obj.__array_interface__["data"][0], obj.nbytes)
            if key in seen:
                return 0
            seen.add(key)
            return obj.nbytes
        if hasattr(obj, "w") and hasattr(obj, "fmt"):  # kernels.LinearHandle
            return sum(nbytes(getattr(obj, a)) for a in ("w", "scales", "bias"))
        return 0

    base = model.model
    total = 0
    for layer in base.layers:
        total += sum(nbytes(v) for v in vars(layer).values())
    total += nbytes(base.norm) + nbytes(model.lm_head)
    return total


def _run_protocol(spec, forward_prefill, forward_decode, argmax_last):
    """The shared timing protocol. forward_prefill(ids) -> state; forward_decode(state, token) -> state."""
    import numpy as np

    rng = np.random.default_rng(1234)
    vocab = spec["vocab_size"]
    res = {}
    # warm-up: a short prefill + 2 decode steps (pages in memory-mapped weights, JIT/alloc warm-up)
    t0 = time.perf_counter()
    st = forward_prefill(rng.integers(3, vocab, size=(1, min(8, spec["prefill"][0]))))
    for _ in range(2):
        st = forward_decode(st, argmax_last(st))
    res["warmup_s"] = time.perf_counter() - t0
    res["prefill_tok_s"] = {}
    repeat = max(1, int(spec.get("repeat", 1)))
    # Every figure is the best of `repeat` runs: on a shared VM the same run varies by +-15%, and the
    # best run is the one least disturbed by neighbours (the same rule for every row, transformers included).
    for k, T in enumerate(spec["prefill"]):
        if T > spec.get("max_prefill", T):
            res["prefill_tok_s"][str(T)] = None
            continue
        ids = rng.integers(3, vocab, size=(1, T))
        ids[0, 0] = 2  # bos
        best = 0.0
        for _ in range(repeat):
            t = time.perf_counter()
            st = forward_prefill(ids)
            tok = argmax_last(st)
            best = max(best, T / (time.perf_counter() - t))
        res["prefill_tok_s"][str(T)] = best
        if k == 0 and spec["decode"] > 0:
            n = spec["decode"]
            best = 0.0
            for r in range(repeat):
                if r:  # caches are updated in place: start every decode run from a fresh prefill
                    st = forward_prefill(ids)
                    tok = argmax_last(st)
                t = time.perf_counter()
                for _ in range(n):
                    st = forward_decode(st, tok)
                    tok = argmax_last(st)
                best = max(best, n / (time.perf_counter() - t))
            res["decode_tok_s"] = best
            res["decode_context"] = T
    return res


def gemma2np_steps(model):
    """(prefill, decode, argmax_last) of the protocol for a gemma2np model, driven as generate() does: a
    fresh cache and the prompt with logits_to_keep=1, then one token per step (mask, positions, cache_position)."""
    import numpy as np

    from gemma2np.cache import Gemma2Cache

    cfg = model.config

    class S:  # decode state
        pass

    def prefill(ids):
        s = S()
        T = ids.shape[1]
        s.cache = Gemma2Cache(cfg.layer_types, cfg.sliding_window)
        s.mask = np.ones((1, T), np.int64)
        s.pos = np.arange(T, dtype=np.int64)[None]
        s.out = model(input_ids=ids, attention_mask=s.mask, position_ids=s.pos, past_key_values=s.cache,
                      use_cache=True, logits_to_keep=1, return_dict=True)
        return s

    def decode(s, tok):
        s.mask = np.concatenate([s.mask, np.ones((1, 1), np.int64)], axis=1)
        s.pos = s.pos[:, -1:] + 1
        n = s.mask.shape[1]
        s.out = model(input_ids=np.array([[tok]], np.int64), attention_mask=s.mask, position_ids=s.pos,
                      past_key_values=s.cache, use_cache=True, cache_position=np.array([n - 1], np.int64),
                      logits_to_keep=1, return_dict=True)
        return s

    def argmax_last(s):
        return int(np.argmax(s.out.logits[0, -1]))

    return prefill, decode, argmax_last


def child_gemma2np(spec):
    sys.path.insert(0, ROOT)
    from gemma2np.modeling import Gemma2ForCausalLM

    t = time.perf_counter()
    model = Gemma2ForCausalLM.from_pretrained(spec["dir"], backend=spec["backend"], weights=spec["weights"],
                                              n_threads=spec["threads"] if spec["backend"] == "native" else None)
    load_s = time.perf_counter() - t
    after_load = _proc_status()

    prefill, decode, argmax_last = gemma2np_steps(model)
    res = _run_protocol(spec, prefill, decode, argmax_last)
    res.update(load_s=load_s, weight_bytes=_gemma2np_weight_bytes(model), after_load=after_load,
               at_end=_proc_status(), peak_rss=_peak_rss())
    return res


def child_transformers(spec):
    import numpy as np
    import torch
    from transformers import Gemma2ForCausalLM

    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["weights"]]
    t = time.perf_counter()
    model = Gemma2ForCausalLM.from_pretrained(spec["dir"], attn_implementation="eager", dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t
    after_load = _proc_status()
    seen, wbytes = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if p.data_ptr() not in seen and p.is_floating_point() and p.dim() >= 1 and p.numel() > 1:
            seen.add(p.data_ptr())
            wbytes += p.numel() * p.element_size()
    # buffers include RoPE inv_freq etc. (tiny); parameters dominate.

    class S:
        pass

    def prefill(ids):
        s = S()
        ids = torch.from_numpy(np.asarray(ids, np.int64))
        s.mask = torch.ones_like(ids)
        with torch.inference_mode():
            s.out = model(input_ids=ids, attention_mask=s.mask, use_cache=True, logits_to_keep=1)
        return s

    def decode(s, tok):
        s.mask = torch.cat([s.mask, torch.ones((1, 1), dtype=s.mask.dtype)], dim=1)
        n = s.mask.shape[1]
        with torch.inference_mode():
            s.out = model(input_ids=torch.tensor([[tok]]), attention_mask=s.mask,
                          past_key_values=s.out.past_key_values, use_cache=True,
                          cache_position=torch.tensor([n - 1]), logits_to_keep=1)
        return s

    def argmax_last(s):
        return int(torch.argmax(s.out.logits[0, -1]))

    res = _run_protocol(spec, prefill, decode, argmax_last)
    res.update(load_s=load_s, weight_bytes=wbytes, after_load=after_load, at_end=_proc_status(),
               peak_rss=_peak_rss(), torch_version=torch.__version__)
    return res


def measure_bandwidth(spec):
    """2-thread read bandwidth of a large array, three ways (best of `reps` each):
    numpy_2threads: two Python threads each np.add.reduce-ing half of a float32 array (the GIL is
                    released inside the reduction);
    blas_gemv:      OpenBLAS float32 matrix @ vector over the array (BLAS threads = --threads);
    native_linear:  gemma2np._native.linear at M=1 over the array as float32 weights (the decode kernel).
    The ceiling used for '% of bandwidth' is the maximum of the three."""
    import threading

    import numpy as np

    nbytes = int(spec["bytes"])
    K = 4096
    N = max(1, nbytes // (4 * K))
    a = np.empty((N, K), np.float32)
    a.fill(1.0)  # touch every page
    reps = spec["reps"]
    threads = spec["threads"]
    out = {"bytes": a.nbytes}

    def best(fn):
        fn()
        b = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            b = min(b, time.perf_counter() - t)
        return a.nbytes / b / GB

    flat = a.reshape(-1)
    parts = np.array_split(flat, threads)

    def threaded_sum():
        ts = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    out["numpy_2threads"] = best(threaded_sum)
    x = np.ones(K, np.float32)
    out["blas_gemv"] = best(lambda: a @ x)
    try:
        sys.path.insert(0, ROOT)
        from gemma2np import _native

        x2 = np.ones((1, K), np.float32)
        out["native_linear"] = best(lambda: _native.linear(x2, a, "float32", None, None, 0, n_threads=threads))
    except Exception as e:  # noqa: BLE001
        out["native_linear_error"] = f"{type(e).__name__}: {e}"
    out["gbs"] = max(v for k, v in out.items() if k in ("numpy_2threads", "blas_gemv", "native_linear"))
    return out


def child_main(spec_json):
    spec = json.loads(spec_json)
    kind = spec["kind"]
    if kind == "bandwidth":
        res = measure_bandwidth(spec)
    elif kind == "gemma2np":
        res = child_gemma2np(spec)
    elif kind == "transformers":
        res = child_transformers(spec)
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    sys.stdout.write(RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()


# ============================================================================ parent


def run_child(spec, threads, timeout, log):
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                           capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["wall_s"] = time.perf_counter() - t
            if p.stderr.strip():
                res["stderr_tail"] = p.stderr.strip().splitlines()[-3:]
            return res
    tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
    log("  child failed (exit %s):\n    %s" % (p.returncode, "\n    ".join(tail)))
    return {"error": f"exit {p.returncode}: {tail[-1] if tail else ''}"}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def transformers_available():
    import importlib.util

    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def native_available():
    sys.path.insert(0, ROOT)
    try:
        from gemma2np.kernels import native_available as na
        return na()
    except Exception:  # noqa: BLE001
        return False


def plan_rows(args, have_native, have_hf):
    """[(label, weights label, spec-without-common-fields, checkpoint format)]"""
    fmts = [f.strip() for f in args.formats.split(",") if f.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    src32 = "bf16" if args.skip_f32 else "f32"
    rows, skipped = [], []
    for b in backends:
        if b == "numpy":
            if "float32" in fmts:
                rows.append(("gemma2np numpy", "float32" + (" (from bf16)" if args.skip_f32 else ""),
                             {"kind": "gemma2np", "backend": "numpy", "weights": "float32",
                              "max_prefill": args.numpy_max_prefill}, src32))
        elif b == "native":
            if not have_native:
                skipped.append("gemma2np native: gemma2np._native is not importable")
                continue
            for w in fmts:
                if w == "float32":
                    src, lab = src32, "float32" + (" (from bf16)" if args.skip_f32 else "")
                else:
                    src = "bf16"
                    lab = w if w == "bfloat16" else f"{w} (from bf16)"
                rows.append(("gemma2np native", lab, {"kind": "gemma2np", "backend": "native", "weights": w}, src))
        elif b in ("transformers", "hf"):
            if not have_hf:
                skipped.append("transformers: torch/transformers not importable")
                continue
            for w, lab in (("fp32", "fp32"), ("bf16", "bf16")):
                if (w == "fp32" and "float32" in fmts) or (w == "bf16" and "bfloat16" in fmts):
                    # each loads the checkpoint of its own dtype (bf16 from the bf16 files, no f32 detour)
                    src = "bf16" if w == "bf16" else src32
                    rows.append(("transformers eager", lab + (" (from bf16)" if args.skip_f32 and w == "fp32" else ""),
                                 {"kind": "transformers", "weights": w}, src))
        else:
            raise SystemExit(f"unknown backend {b!r} (numpy, native, transformers)")
    return rows, skipped


def fmt_num(v, spec="%.1f"):
    return "-" if v is None else spec % v


def render(results, machine, prefill, decode):
    cols = ["system", "weights", "load s"] + [f"prefill {T} tok/s" for T in prefill] + \
           [f"decode tok/s ({decode} tok)", "peak RSS GB", "RSS/weights", "% of bandwidth ceiling"]
    lines = [
        f"Machine: {machine['cpu']} | {machine['cores']} logical cores | threads used: {machine['threads']} | "
        f"measured read bandwidth: {machine['bandwidth_gbs']:.1f} GB/s ({machine['bandwidth_detail']})",
        f"Model: gemma-2-2b shape, {machine['layers']} layers, random weights; decode after a "
        f"{prefill[0]}-token prefill; rows run in fresh subprocesses.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in results:
        res = r["result"]
        if "error" in res:
            lines.append(f"| {r['system']} | {r['weights']} | " + " | ".join(
                ["ERROR: " + res["error"][:80]] + ["-"] * (len(cols) - 3)) + " |")
            continue
        wb = res["weight_bytes"]
        dec = res.get("decode_tok_s")
        pct = None if dec is None else 100.0 * dec * wb / (machine["bandwidth_gbs"] * GB)
        pre = [fmt_num(res["prefill_tok_s"].get(str(T))) + ("" if res["prefill_tok_s"].get(str(T)) is not None
                                                            else " (skipped)") for T in prefill]
        lines.append("| " + " | ".join(
            [r["system"], r["weights"], "%.1f" % res["load_s"]] + pre +
            [fmt_num(dec, "%.2f"), "%.2f" % (res["peak_rss"] / GB),
             "%.2f" % (res["peak_rss"] / wb), fmt_num(pct, "%.0f%%")]) + " |")
    lines += ["", "Details (bytes in GB; RSS split from /proc/self/status: anon = private copies, file = "
                  "mapped checkpoint pages):", "",
              "| system | weights | weight GB | first call s | RSS after load (anon + file) | "
              "RSS at end (anon + file) | row wall s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        res = r["result"]
        if "error" in res:
            continue

        def rss(d):
            if not d:
                return "-"
            return "%.2f (%.2f + %.2f)" % (d.get("VmRSS", 0) / GB, d.get("RssAnon", 0) / GB, d.get("RssFile", 0) / GB)

        lines.append(f"| {r['system']} | {r['weights']} | {res['weight_bytes'] / GB:.2f} | {res['warmup_s']:.1f} | "
                     f"{rss(res.get('after_load'))} | {rss(res.get('at_end'))} | {res.get('wall_s', 0):.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all 26 of gemma-2-2b)")
    ap.add_argument("--formats", default="float32,bfloat16,int8",
                    help="weight formats (native: float32,bfloat16,int8; numpy: float32 only; transformers: "
                         "float32 -> fp32 row, bfloat16 -> bf16 row)")
    ap.add_argument("--backends", default="numpy,native,transformers", help="numpy,native,transformers")
    ap.add_argument("--prefill", default="128,512", help="prompt lengths for prefill (the first one also "
                                                          "precedes decode)")
    ap.add_argument("--decode", type=int, default=64, help="decoded tokens")
    ap.add_argument("--repeat", type=int, default=3, help="report the best of this many runs of each measurement")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-f32", action="store_true",
                    help="do not write the 10.5 GB f32 checkpoint; float32 rows load the bf16 one")
    ap.add_argument("--numpy-max-prefill", type=int, default=512,
                    help="skip numpy-backend prefills longer than this (default 512: run all)")
    ap.add_argument("--cache-dir", default="/tmp/gemma2np-bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bandwidth-bytes", type=float, default=2e9)
    ap.add_argument("--bandwidth-reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=7200, help="per-row timeout in seconds")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    with open(CONFIG_JSON) as f:
        base_cfg = json.load(f)
    layers = args.layers or base_cfg["num_hidden_layers"]
    prefill = [int(t) for t in args.prefill.split(",") if t.strip()]
    if not prefill or min(prefill) < 1:
        raise SystemExit("--prefill needs at least one positive length")

    have_native, have_hf = native_available(), transformers_available()
    rows, skipped = plan_rows(args, have_native, have_hf)
    for s in skipped:
        log("skipping " + s)
    need = sorted({r[3] for r in rows})
    dirs = ensure_checkpoints(args.cache_dir, need, layers, args.seed, log) if need else {}

    log("measuring read bandwidth ...")
    bw = run_child({"kind": "bandwidth", "bytes": args.bandwidth_bytes, "reps": args.bandwidth_reps,
                    "threads": args.threads}, args.threads, args.timeout, log)
    if "error" in bw:
        raise SystemExit("bandwidth measurement failed: " + bw["error"])
    detail = ", ".join(f"{k} {bw[k]:.1f}" for k in ("numpy_2threads", "blas_gemv", "native_linear") if k in bw)
    log(f"  {bw['gbs']:.1f} GB/s ({detail})")

    common = {"threads": args.threads, "prefill": prefill, "decode": args.decode, "repeat": args.repeat,
              "vocab_size": base_cfg["vocab_size"]}
    results = []
    for system, wlabel, spec, src in rows:
        spec = dict(common, **spec, dir=dirs[src])
        log(f"running {system} / {wlabel} ...")
        res = run_child(spec, args.threads, args.timeout, log)
        if "error" not in res:
            log("  load %.1f s, prefill %s tok/s, decode %s tok/s, peak RSS %.2f GB" % (
                res["load_s"], {k: (None if v is None else round(v, 1)) for k, v in res["prefill_tok_s"].items()},
                None if res.get("decode_tok_s") is None else round(res["decode_tok_s"], 2), res["peak_rss"] / GB))
        results.append({"system": system, "weights": wlabel, "spec": spec, "result": res})

    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "layers": layers,
               "bandwidth_gbs": bw["gbs"], "bandwidth_detail": detail, "python": platform.python_version()}
    table = render(results, machine, prefill, args.decode)
    if skipped:
        table += "\n\nSkipped: " + "; ".join(skipped)
    nskip = [T for T in prefill if T > args.numpy_max_prefill]
    if nskip and any(r["spec"].get("backend") == "numpy" for r in results):
        table += f"\n\nNot run: numpy-backend prefill {nskip} (longer than --numpy-max-prefill {args.numpy_max_prefill})."
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "bandwidth": bw, "results": results,
                       "args": vars(args)}, f, indent=2)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
