"""End-to-end benchmark at the real Gemma 2 shapes (random weights; nothing is downloaded). Not a test.

    python benchmarks/bench.py                                  # the gemma-2-2b table (takes a while)
    python benchmarks/bench.py --layers 2 --prefill 16 --decode 4   # a quick check of the script
    python benchmarks/bench.py --model 9b --formats bfloat16,int8,int4,gguf-q4_0 --llama-bench PATH
    python benchmarks/bench.py --suite issue10 --out-dir results/   # every row of issue 10 (JSON + Markdown)
    python benchmarks/bench.py --suite issue15 --out-dir results/   # long context (issue 15)

1. Writes what the rows need to --cache-dir: random-weight checkpoints in the HF layout
   (gemma-2-{2b,9b,27b}-{f32,bf16}[-L<layers>]; init std 0.02 like transformers, RMSNorm weights 0, pad row
   of the embedding 0, tied LM head; one tensor chunk at a time, ~100 MB of RAM; the bf16 checkpoint holds
   exactly the bf16 rounding of the f32 one) and random GGUFs (benchmarks/random_gguf.py: Q4_0 / Q8_0
   written as blocks directly, BF16 from the checkpoint's values). Complete files are reused.
2. Measures the machine's read bandwidth (2 threads; see `measure_bandwidth`).
3. Runs every row in a FRESH SUBPROCESS (so peak RSS is that row's): load (from_pretrained,
   memory-mapped), one untimed warm-up call, prefill (one forward of a (1, T) prompt with a fresh
   cache and logits_to_keep=1, as generate() does), decode (one token per step with the cache,
   greedy, right after the prefill of each --decode-at length), peak RSS (getrusage ru_maxrss).
   llama.cpp rows (--llama-bench PATH) run its llama-bench on GGUFs of the same shape in the same run.
4. Prints a Markdown table (+ a details table) and optionally writes JSON (--json OUT).

gemma2np is found by import: the installed package (pip install .) if there is one, else the source tree
this script sits in. Config files come from the package (gemma2np/configs, package data). See
benchmarks/README.md for what each column means.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the source tree; used only when gemma2np is not installed
GB = 1e9
MARKER = ".bench-complete.json"
RESULT_TAG = "@@BENCH-RESULT@@ "
MODELS = ("2b", "9b", "27b")
# GGUF formats: gemma2np row "gguf-<q>" and llama.cpp row "<q>" on the same file
GGUF_FORMATS = ("q4_0", "q8_0", "bf16")
# the llama.cpp file type that has the same weight format as a gemma2np row (for the ratio column)
SAME_FORMAT = {"bfloat16": "bf16", "int8": "q8_0", "gguf-q8_0": "q8_0", "int4": "q4_0", "gguf-q4_0": "q4_0",
               "gguf-bf16": "bf16"}


# ============================================================================ finding gemma2np


def _package_dir():
    """(directory of the gemma2np package children will import, how it was found). The installed package
    wins; a source checkout is used only when nothing is installed (then children get it on PYTHONPATH)."""
    spec = importlib.util.find_spec("gemma2np")
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0], "installed"
    src = os.path.join(ROOT, "gemma2np")
    if os.path.isfile(os.path.join(src, "__init__.py")):
        return src, "source tree"
    raise SystemExit("gemma2np is neither installed nor next to this script (pip install . first)")


def config_path(model: str) -> str:
    if model not in MODELS:
        raise SystemExit(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    path = os.path.join(_package_dir()[0], "configs", f"gemma-2-{model}.config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing (gemma2np/configs/*.json are package data)")
    return path


def load_config(model: str, layers: int | None = None) -> dict:
    with open(config_path(model)) as f:
        base = json.load(f)
    if layers is None or layers == base["num_hidden_layers"]:
        return base
    cfg = dict(base, num_hidden_layers=layers)
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:layers]
    return cfg


def git_commit(path: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() + ("+dirty" if dirty else "")) if r.returncode == 0 else None


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


def ckpt_dir(cache_dir, fmt, layers, full_layers, model="2b"):
    return os.path.join(cache_dir, f"gemma-2-{model}-{fmt}" + ("" if layers == full_layers else f"-L{layers}"))


def ensure_checkpoints(cache_dir, fmts, layers, seed, log, model="2b"):
    """Write (or reuse) the random-weight checkpoints; returns {fmt: directory}."""
    base = load_config(model)
    full = base["num_hidden_layers"]
    layers = full if layers is None else layers
    cfg = load_config(model, layers)
    dirs = {fmt: ckpt_dir(cache_dir, fmt, layers, full, model) for fmt in fmts}
    spec = {"layers": layers, "seed": seed, "config": f"gemma-2-{model}.config.json", "version": 1}
    # bench_reference.py writes the same bf16 files (same seeds, chunks and shards) under its own marker
    ref_spec = {"config": f"gemma-2-{model}", "layers": layers, "seed": seed, "version": 1}
    todo = {}
    for fmt, d in dirs.items():
        found = False
        for marker, want in ((MARKER, spec), (".bench-reference-complete.json", ref_spec if fmt == "bf16" else None)):
            try:
                with open(os.path.join(d, marker)) as f:
                    found = want is not None and json.load(f) == want
            except (OSError, ValueError):
                pass
            if found:
                break
        if found:
            log(f"reusing {d}")
            continue
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


def gguf_path(cache_dir, model, qtype, layers, full_layers):
    return os.path.join(cache_dir, f"gemma-2-{model}-{qtype}" + ("" if layers == full_layers else f"-L{layers}") + ".gguf")


def ensure_gguf(cache_dir, model, qtype, layers, seed, log):
    """Write (or reuse) a random GGUF of `qtype` (benchmarks/random_gguf.py); returns its path."""
    from random_gguf import ensure_random_gguf

    full = load_config(model)["num_hidden_layers"]
    layers = full if layers is None else layers
    path = gguf_path(cache_dir, model, qtype, layers, full)
    ensure_random_gguf(path, load_config(model, layers), qtype, seed=seed, log=log)
    return path


def param_counts(cfg: dict) -> dict:
    """Weights per kind: linear layers, embedding (= tied head), norms."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    per_layer = h * (nq * d) * 2 + h * (nkv * d) * 2 + 3 * h * i
    return {"linear": L * per_layer, "embed": cfg["vocab_size"] * h, "norms": (4 * L + 1) * h}


def file_bytes(cfg: dict, fmt: str) -> int:
    """Bytes on disk of a checkpoint ('f32' / 'bf16') or GGUF ('q4_0' / 'q8_0' / 'bf16-gguf') of this shape."""
    p = param_counts(cfg)
    per = {"f32": 4.0, "bf16": 2.0, "q4_0": 18 / 32, "q8_0": 34 / 32, "bf16-gguf": 2.0}[fmt]
    embd = {"q4_0": 210 / 256}.get(fmt, per)  # Q4_0 files carry a Q6_K embedding
    return int(p["linear"] * per + p["embed"] * embd + p["norms"] * 4)


def kv_bytes_per_token(cfg: dict, depth: float, elem_bytes: int) -> float:
    """Bytes of keys + values one decode step reads at `depth` cached tokens: every global layer reads all of
    them, a sliding layer at most its window (it attends to the last sliding_window positions, itself included)."""
    L, nkv, d = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    w = cfg.get("sliding_window") or 0
    types = cfg.get("layer_types") or ["sliding_attention" if k % 2 == 0 else "full_attention" for k in range(L)]
    total = 0.0
    for t in types[:L]:
        keys = depth + 1
        if t == "sliding_attention" and w:
            keys = min(keys, w)
        total += 2 * keys * nkv * d * elem_bytes
    return total


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
        if hasattr(obj, "arrays") and callable(obj.arrays):  # kernels.LinearHandle (any format: all its arrays)
            return sum(nbytes(a) for a in obj.arrays())
        if hasattr(obj, "w") and hasattr(obj, "fmt"):  # an older LinearHandle without arrays()
            return sum(nbytes(getattr(obj, a)) for a in ("w", "scales", "bias"))
        return 0

    base = model.model
    total = 0
    for layer in base.layers:
        total += sum(nbytes(v) for v in vars(layer).values())
    total += nbytes(base.norm) + nbytes(model.lm_head)
    return total


def _run_protocol(spec, forward_prefill, forward_decode, argmax_last, state_out=None):
    """The shared timing protocol. forward_prefill(ids) -> state; forward_decode(state, token) -> state.

    Every prefill length T of spec["prefill"] is timed `repeat` times from a fresh cache; after each T in
    spec["decode_at"] (default: the first length) `decode` steps are timed right after every one of those
    prefills (so decode always starts from a fresh cache of T tokens, and no extra prefill is spent on it).
    state_out: a list that receives the last state (its cache is measured after the row)."""
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
    res["prefill_tok_s"], res["decode_tok_s_at"] = {}, {}
    repeat = max(1, int(spec.get("repeat", 1)))
    decode_at = spec.get("decode_at") or spec["prefill"][:1]
    n = spec["decode"]
    # Every figure is the best of `repeat` runs: on a shared VM the same run varies by +-15%, and the
    # best run is the one least disturbed by neighbours (the same rule for every row, transformers included).
    for T in spec["prefill"]:
        if T > spec.get("max_prefill", T):
            res["prefill_tok_s"][str(T)] = None
            continue
        ids = rng.integers(3, vocab, size=(1, T))
        ids[0, 0] = 2  # bos
        best = best_dec = 0.0
        for _ in range(repeat):
            st = None  # drop the previous state first: its cache would otherwise count in this prefill's peak RSS
            t = time.perf_counter()
            st = forward_prefill(ids)
            tok = argmax_last(st)
            best = max(best, T / (time.perf_counter() - t))
            if T in decode_at and n > 0:
                t = time.perf_counter()
                for _ in range(n):
                    st = forward_decode(st, tok)
                    tok = argmax_last(st)
                best_dec = max(best_dec, n / (time.perf_counter() - t))
        res["prefill_tok_s"][str(T)] = best
        if T in decode_at and n > 0:
            res["decode_tok_s_at"][str(T)] = best_dec
            res.setdefault("decode_tok_s", best_dec)  # the first depth: the column of the 128-token table
            res.setdefault("decode_context", T)
    if state_out is not None:
        state_out.append(st)
    return res


def _cache_kwargs(cache_dtype):
    """How the installed gemma2np takes a KV cache dtype: ({kwargs for Gemma2Cache}, {for from_pretrained}),
    or None if it has no such option (then only float32 rows run)."""
    import inspect

    from gemma2np.cache import Gemma2Cache

    if cache_dtype in (None, "float32"):
        return {}, {}
    params = inspect.signature(Gemma2Cache.__init__).parameters
    for name in ("cache_dtype", "dtype"):
        if name in params:
            return {name: cache_dtype}, {}
    from gemma2np import Gemma2ForCausalLM

    if "cache_dtype" in inspect.signature(Gemma2ForCausalLM.from_pretrained).parameters:
        return {}, {"cache_dtype": cache_dtype}
    return None


def _array_bytes(obj, seen=None, depth=0):
    """Bytes of the distinct NumPy buffers reachable from obj's attributes / lists (the cache's allocation)."""
    import numpy as np

    seen = set() if seen is None else seen
    if depth > 4 or obj is None:
        return 0
    if isinstance(obj, np.ndarray):
        base = obj
        while isinstance(base.base, np.ndarray):
            base = base.base
        key = id(base)
        if key in seen:
            return 0
        seen.add(key)
        return base.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(_array_bytes(o, seen, depth + 1) for o in obj)
    if isinstance(obj, dict):
        return sum(_array_bytes(o, seen, depth + 1) for o in obj.values())
    if hasattr(obj, "__dict__") and depth == 0:
        return sum(_array_bytes(o, seen, depth + 1) for o in vars(obj).values())
    return 0


def gemma2np_steps(model, capacity=None, cache_kwargs=None, model_makes_cache=False):
    """(prefill, decode, argmax_last) of the protocol for a gemma2np model, driven as generate() does: a
    fresh cache (given generate's capacity hint, prompt + new tokens, when the installed cache takes one)
    and the prompt with logits_to_keep=1, then one token per step (mask, positions, cache_position).
    model_makes_cache: let the model's forward create the cache (past_key_values=None, use_cache=True), for a
    cache option the model holds (from_pretrained(cache_dtype=...)) rather than Gemma2Cache's arguments."""
    import inspect

    import numpy as np

    from gemma2np.cache import Gemma2Cache

    cfg = model.config
    kw = dict(cache_kwargs or {})
    if capacity is not None and "capacity" in inspect.signature(Gemma2Cache.__init__).parameters:
        kw["capacity"] = None  # filled per prompt below

    class S:  # decode state
        pass

    def prefill(ids):
        s = S()
        T = ids.shape[1]
        if "capacity" in kw:
            kw["capacity"] = T + capacity
        s.cache = None if model_makes_cache else Gemma2Cache(cfg.layer_types, cfg.sliding_window, **kw)
        s.mask = np.ones((1, T), np.int64)
        s.pos = np.arange(T, dtype=np.int64)[None]
        s.out = model(input_ids=ids, attention_mask=s.mask, position_ids=s.pos, past_key_values=s.cache,
                      use_cache=True, logits_to_keep=1, return_dict=True)
        if model_makes_cache:
            s.cache = s.out.past_key_values
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
    from gemma2np import Gemma2ForCausalLM

    cache_dtype = spec.get("cache_dtype") or "float32"
    kws = _cache_kwargs(cache_dtype)
    if kws is None:
        return {"na": f"the installed gemma2np has no cache_dtype option ({cache_dtype} cache)"}
    cache_kw, load_kw = kws
    load_kw = dict(load_kw)
    if spec.get("gguf_file"):
        load_kw["gguf_file"] = spec["gguf_file"]
    if spec.get("weights"):
        load_kw["weights"] = spec["weights"]
    t = time.perf_counter()
    model = Gemma2ForCausalLM.from_pretrained(spec["dir"], backend=spec["backend"],
                                              n_threads=spec["threads"] if spec["backend"] == "native" else None,
                                              **load_kw)
    load_s = time.perf_counter() - t
    after_load = _proc_status()

    prefill, decode, argmax_last = gemma2np_steps(model, capacity=spec["decode"], cache_kwargs=cache_kw,
                                                  model_makes_cache="cache_dtype" in load_kw)
    last = []
    res = _run_protocol(spec, prefill, decode, argmax_last, state_out=last)
    st = last[0]
    res.update(load_s=load_s, weight_bytes=_gemma2np_weight_bytes(model), after_load=after_load,
               at_end=_proc_status(), peak_rss=_peak_rss(), kv_alloc_bytes=_array_bytes(st.cache))
    # the dtype the cache really stores (its buffers; never the `keys` property, which would copy them)
    buf = next((b for b in getattr(st.cache, "_k", []) if b is not None), None)
    res["kv_dtype"] = None if buf is None else str(buf.dtype)
    if buf is not None and res["kv_dtype"] != cache_dtype:
        return {"na": f"cache_dtype={cache_dtype} asked, the cache holds {buf.dtype} (option not applied)"}
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
        from gemma2np import _native

        x2 = np.ones((1, K), np.float32)
        out["native_linear"] = best(lambda: _native.linear(x2, a, "float32", None, None, 0, n_threads=threads))
    except Exception as e:  # noqa: BLE001
        out["native_linear_error"] = f"{type(e).__name__}: {e}"
    out["gbs"] = max(v for k, v in out.items() if k in ("numpy_2threads", "blas_gemv", "native_linear"))
    return out


def child_probe(spec):
    """What the installed gemma2np can do (rows it cannot run are reported n/a, not run)."""
    import gemma2np
    from gemma2np.kernels import native_available

    pkg = os.path.dirname(os.path.abspath(gemma2np.__file__))
    find = importlib.util.find_spec
    return {"file": pkg, "version": getattr(gemma2np, "__version__", None), "native": bool(native_available()),
            "int4": find("gemma2np.kernels.int4") is not None,
            # GGUF quants kept as blocks (issue 10 item 2); without it a quantized GGUF is expanded to float32
            "gguf_native_quant": any(find(m) is not None for m in ("gemma2np.gguf_quant", "gemma2np.kernels.q4_0")),
            "cache_dtype_bfloat16": _cache_kwargs("bfloat16") is not None,
            "git_commit": git_commit(pkg) or _installed_from_commit()}


def _installed_from_commit():
    """For a `pip install <dir>`: the git commit of the directory pip recorded (PEP 610 direct_url.json)."""
    try:
        from importlib.metadata import distribution

        url = json.loads(distribution("gemma2np").read_text("direct_url.json") or "{}").get("url", "")
    except Exception:  # noqa: BLE001  (no metadata, not a local install)
        return None
    if url.startswith("file://") and os.path.isdir(url[7:]):
        c = git_commit(url[7:])
        return None if c is None else f"{c} (installed from {url[7:]})"
    return None


def child_llama(spec):
    """Run one llama-bench command; its peak RSS is this (fresh) process's only child's."""
    t = time.perf_counter()
    try:
        p = subprocess.run(spec["cmd"], capture_output=True, text=True, timeout=spec["timeout"])
    except subprocess.TimeoutExpired:
        return {"error": f"llama-bench timed out after {spec['timeout']} s"}
    return {"returncode": p.returncode, "stdout": p.stdout, "stderr_tail": p.stderr.strip().splitlines()[-5:],
            "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "llama_wall_s": time.perf_counter() - t}


def child_reference(spec):
    from bench_reference import measure  # the same directory

    return measure(spec["dir"], spec.get("dtype", "float32"), spec.get("tokens", 16), spec.get("repeat", 2),
                   gguf_file=spec.get("gguf_file"), compare_native=spec.get("compare_native", True))


def child_demo(spec):
    """Generate `new_tokens` greedy tokens from a random `prompt_tokens`-token prompt; peak RSS."""
    import numpy as np

    from gemma2np import Gemma2ForCausalLM

    kw = {"gguf_file": spec["gguf_file"]} if spec.get("gguf_file") else {"weights": spec["weights"]}
    t = time.perf_counter()
    model = Gemma2ForCausalLM.from_pretrained(spec["dir"], backend="native", n_threads=spec["threads"], **kw)
    load_s = time.perf_counter() - t
    ids = np.random.default_rng(7).integers(3, model.config.vocab_size, size=(1, spec["prompt_tokens"]))
    ids[0, 0] = 2
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=spec["new_tokens"], do_sample=False, eos_token_id=None)
    gen_s = time.perf_counter() - t
    new = [int(x) for x in np.asarray(out)[0, ids.shape[1]:]]
    return {"load_s": load_s, "generate_s": gen_s, "new_tokens": new, "weight_bytes": _gemma2np_weight_bytes(model),
            "peak_rss": _peak_rss(), "at_end": _proc_status()}


def child_main(spec_json):
    spec = json.loads(spec_json)
    kind = spec["kind"]
    children = {"bandwidth": measure_bandwidth, "gemma2np": child_gemma2np, "transformers": child_transformers,
                "probe": child_probe, "llama": child_llama, "reference": child_reference, "demo": child_demo}
    if kind not in children:
        raise SystemExit(f"unknown child kind {kind!r}")
    res = children[kind](spec)
    sys.stdout.write(RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()


# ============================================================================ parent


def run_child(spec, threads, timeout, log):
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    if _package_dir()[1] == "source tree":  # nothing installed: children import the tree this script sits in
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
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
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


# ---------------------------------------------------------------------------- llama.cpp rows


def llama_version(exe):
    try:
        p = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.strip()]
    commit = None
    for x in lines:
        if "commit" in x:
            commit = x.split("commit", 1)[1].strip(" )")
    return {"lines": lines[-2:], "commit": commit}


def llama_commands(exe, gguf, prefill, decode, decode_at, threads, reps, extra):
    """llama-bench invocations for one GGUF: prompt processing at each prefill length, then generation of
    `decode` tokens -- at depth 0 for the short table (`-p 128 -n 64`, llama-bench's usual pair), at the
    depths of decode_at (`-n 64 -d N`: N tokens are processed first, untimed) for the long-context one."""
    base = [exe, "-m", gguf, "-t", str(threads), "-r", str(reps), "-o", "json"] + list(extra)
    long_ctx = any(d > 512 for d in decode_at)
    if not long_ctx:
        return [base + ["-p", ",".join(map(str, prefill)), "-n", str(decode)]]
    cmds = [base + ["-p", ",".join(map(str, prefill)), "-n", "0"]]
    if decode > 0:
        cmds.append(base + ["-p", "0", "-n", str(decode), "-d", ",".join(map(str, decode_at))])
    return cmds


def parse_llama_json(text):
    """llama-bench -o json -> [{n_prompt, n_gen, n_depth, best_ts, avg_ts, ...}]; best_ts = the fastest
    repetition (samples_ts), the same best-of rule as our rows."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON array in llama-bench output")
    rows = json.loads(text[start:text.rfind("]") + 1])
    out = []
    for r in rows:
        samples = r.get("samples_ts") or [r.get("avg_ts")]
        out.append({k: r.get(k) for k in ("n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts", "model_size",
                                          "model_n_params", "model_type", "build_commit", "n_threads", "type_k",
                                          "type_v", "flash_attn", "n_batch", "n_ubatch", "cpu_info", "repack")}
                   | {"best_ts": max(samples), "samples_ts": samples})
    return out


def run_llama_row(exe, gguf, prefill, decode, decode_at, threads, reps, extra, timeout, log):
    """All llama-bench tests of one GGUF. A crash in ggml's AMX matmul (segfault at prompt processing on
    this AVX-512 + AMX host, llama.cpp issue #20824) is retried once with --repack 0 (no AMX / repacked
    weight buffers), and the row says so."""
    res = {"tests": [], "peak_rss": 0, "cmds": [], "notes": []}
    for cmd in llama_commands(exe, gguf, prefill, decode, decode_at, threads, reps, extra):
        if res["notes"]:  # an earlier command of this file needed the fallback: start with it
            cmd = cmd + ["--repack", "0"]
        r = run_child({"kind": "llama", "cmd": cmd, "timeout": timeout}, threads, timeout + 60, log)
        if r.get("returncode", 0) < 0 and "--repack" not in cmd:
            log(f"  llama-bench died (signal {-r['returncode']}); retrying with --repack 0")
            res["notes"].append(f"signal {-r['returncode']} with default buffers; ran with --repack 0")
            cmd = cmd + ["--repack", "0"]
            r = run_child({"kind": "llama", "cmd": cmd, "timeout": timeout}, threads, timeout + 60, log)
        res["cmds"].append(" ".join(cmd))
        if "error" in r:
            return {"error": r["error"], "cmds": res["cmds"]}
        if r["returncode"] != 0:
            return {"error": f"llama-bench exit {r['returncode']}: {' | '.join(r.get('stderr_tail', []))[-200:]}",
                    "cmds": res["cmds"]}
        try:
            res["tests"] += parse_llama_json(r["stdout"])
        except ValueError as e:
            return {"error": f"llama-bench output: {e}", "cmds": res["cmds"]}
        res["peak_rss"] = max(res["peak_rss"], r["peak_rss"])
        res["wall_s"] = res.get("wall_s", 0) + r.get("wall_s", 0)
    res["prefill_tok_s"] = {str(t["n_prompt"]): t["best_ts"] for t in res["tests"] if t["n_gen"] == 0}
    res["decode_tok_s_at"] = {}
    for t in res["tests"]:
        if t["n_prompt"] == 0 and t["n_gen"]:
            # depth 0 (short table) stands for decode after the first prefill length, like our column
            d = t["n_depth"] or (prefill[0] if not any(x > 512 for x in decode_at) else 0)
            res["decode_tok_s_at"][str(d)] = t["best_ts"]
    res["weight_bytes"] = next((t["model_size"] for t in res["tests"] if t.get("model_size")), None)
    res["kv_elem_bytes"] = {"f16": 2, "bf16": 2, "f32": 4, "q8_0": 34 / 32}.get(
        next((t["type_k"] for t in res["tests"] if t.get("type_k")), "f16"), 2)
    return res


# ---------------------------------------------------------------------------- planning


def parse_list(s, cast=str):
    return [cast(x.strip()) for x in str(s).split(",") if x.strip()]


def plan_model(job, args, probe, have_hf, log):
    """Rows of one model: [{"system", "weights", "cache", "needs": (kind, fmt), "spec" | "na"}]."""
    rows = []
    cfg_full = load_config(job["model"], job.get("layers"))
    na = {}
    if not probe.get("native"):
        na["native"] = "gemma2np._native is not importable"
    for b in job["backends"]:
        if b == "numpy":
            if "float32" in job["formats"]:
                src = "bf16" if args.skip_f32 or job["model"] != "2b" else "f32"
                rows.append({"system": "gemma2np numpy", "weights": "float32" + (" (from bf16)" if src == "bf16" else ""),
                             "cache": "float32", "needs": ("ckpt", src),
                             "spec": {"kind": "gemma2np", "backend": "numpy", "weights": "float32",
                                      "max_prefill": args.numpy_max_prefill}})
        elif b == "native":
            for w in job["formats"]:
                for cd in job["cache_dtypes"]:
                    row = {"system": "gemma2np native", "weights": w, "cache": cd}
                    why = na.get("native")
                    if w.startswith("gguf-"):
                        q = w[5:]
                        row["needs"] = ("gguf", q)
                        row["spec"] = {"kind": "gemma2np", "backend": "native", "weights": None}
                        if q != "bf16" and not probe.get("gguf_native_quant") and not args.force:
                            why = why or (f"the installed gemma2np expands {q.upper()} GGUFs to float32 at load "
                                          f"(~{4 * sum(param_counts(cfg_full).values()) / GB:.0f} GB); no native GGUF quants")
                    else:
                        src = "f32" if w == "float32" and not args.skip_f32 and job["model"] == "2b" else "bf16"
                        row["needs"] = ("ckpt", src)
                        row["spec"] = {"kind": "gemma2np", "backend": "native", "weights": w}
                        if w == "int4" and not probe.get("int4"):
                            why = why or "the installed gemma2np has no int4 weights"
                        if w == "float32" and src == "bf16":
                            row["weights"] = "float32 (from bf16)"
                        elif w in ("int8", "int4"):
                            row["weights"] = f"{w} (from bf16)"
                    if cd != "float32" and not probe.get("cache_dtype_bfloat16") and not args.force:
                        why = why or f"the installed gemma2np has no cache_dtype option ({cd})"
                    if why:
                        row["na"] = why
                    if cd != "float32":
                        row["spec"]["cache_dtype"] = cd
                    rows.append(row)
        elif b in ("transformers", "hf"):
            if not have_hf:
                log("skipping transformers: torch/transformers not importable")
                continue
            for w, lab in (("fp32", "fp32"), ("bf16", "bf16")):
                if (w == "fp32" and "float32" in job["formats"]) or (w == "bf16" and "bfloat16" in job["formats"]):
                    src = "bf16" if w == "bf16" or args.skip_f32 or job["model"] != "2b" else "f32"
                    rows.append({"system": "transformers eager", "weights": lab + (" (from bf16)" if w == "fp32" and src == "bf16" else ""),
                                 # transformers' cache takes the model's dtype
                                 "cache": "float32" if w == "fp32" else "bfloat16", "needs": ("ckpt", src),
                                 "spec": {"kind": "transformers", "weights": w}})
        else:
            raise SystemExit(f"unknown backend {b!r} (numpy, native, transformers)")
    if args.llama_bench:
        for q in job["llama"]:
            rows.append({"system": "llama.cpp", "weights": q.upper(), "cache": "f16", "needs": ("gguf", q), "llama": True})
    return rows


def estimate_s(job, rows, bw=30e9, threads=2, run=None):
    """A rough wall-time estimate of a job's rows (not of writing files: see files_estimate_s). Assumed rates,
    from check runs here: prefill ~300 GFLOP/s, decode at 80% of ~30 GB/s, loading int8 and int4 ~15 ns of CPU
    per linear weight (int4: the C quantiser of csrc/g2_int4_quant.c; the NumPy one took ~20x that), the numpy
    reference ~15 ns per weight and forward."""
    cfg = load_config(job["model"], job.get("layers"))
    p = param_counts(cfg)
    n_par = p["linear"] + p["embed"]
    total = 0.0
    per = {"bfloat16": 2, "float32": 4, "int8": 1.06, "int4": 0.56, "gguf-q4_0": 0.56, "gguf-q8_0": 1.06,
           "gguf-bf16": 2, "BF16": 2, "Q8_0": 1.06, "Q4_0": 0.56}
    load_ns = {"int8": 15, "int4": 15}
    for r in rows:
        if r.get("na"):
            continue
        w = r["weights"].split()[0]
        wb = n_par * per.get(w, 2)
        reps = job["repeat"] if not r.get("llama") else job["repeat"] + 1
        pre = sum(T * 2 * n_par / 300e9 + 4 * T * T * cfg["num_hidden_layers"] * cfg["num_attention_heads"]
                  * cfg["head_dim"] / 300e9 for T in job["prefill"])
        dec = len(job["decode_at"]) * job["decode"] * wb / (0.8 * bw)
        load = wb / 2e9 + p["linear"] * load_ns.get(w, 0) * 1e-9 / threads
        total += load + reps * (pre + dec) + 10
    run = run or {"reference": bool(job.get("reference")), "demo": bool(job.get("demo"))}
    if run["reference"]:
        total += job["reference_repeat"] * n_par * 15e-9 + 30
    if run["demo"]:
        total += 60 + 32 * n_par * 0.56 / (0.8 * bw)
    return total


def files_estimate_s(model, cfg, needs, args, layers, full):
    """Seconds to write the files not written yet: ~100 MB/s for normal-valued files (checkpoints, BF16
    GGUFs: NumPy's normal generator dominates), ~300 MB/s for GGUFs of random blocks."""
    t = 0.0
    for kind, fmt in needs:
        if kind == "ckpt":
            if os.path.exists(os.path.join(ckpt_dir(args.cache_dir, fmt, layers, full, model), MARKER)):
                continue
            t += file_bytes(cfg, fmt) / 100e6
        else:
            if os.path.exists(gguf_path(args.cache_dir, model, fmt, layers, full) + ".complete.json"):
                continue
            t += file_bytes(cfg, {"bf16": "bf16-gguf"}.get(fmt, fmt)) / (100e6 if fmt == "bf16" else 300e6)
    return t


def extras_run(job, probe, args):
    """Whether the job's reference / demo rows can run with the installed gemma2np (else they are n/a and
    their files are not written for them)."""
    native_q = bool(probe.get("gguf_native_quant")) or args.force
    ref = job.get("reference")
    return {"reference": bool(ref) and (ref == "bf16" or native_q), "demo": bool(job.get("demo")) and native_q}


def ensure_files(job, rows, args, log, probe=None):
    """Write what the rows need; a file that does not fit on the disk makes its rows n/a."""
    full = load_config(job["model"])["num_hidden_layers"]
    layers = job.get("layers") or full
    cfg = load_config(job["model"], layers)
    paths, want = {}, []
    for r in rows:
        if not r.get("na") and r["needs"] not in want:
            want.append(r["needs"])
    run = extras_run(job, probe or {}, args)
    for ref in ([job["reference"]] if run["reference"] else []) + ([("gguf", "q4_0")] if run["demo"] else []):
        key = ref if isinstance(ref, tuple) else (("ckpt", "bf16") if ref == "bf16" else ("gguf", ref))
        if key not in want:
            want.append(key)
    for kind, fmt in want:
        size = file_bytes(cfg, fmt if kind == "ckpt" else {"bf16": "bf16-gguf"}.get(fmt, fmt))
        if kind == "ckpt":
            target = ckpt_dir(args.cache_dir, fmt, layers, full, job["model"])
            done = os.path.exists(os.path.join(target, MARKER))
        else:
            target = gguf_path(args.cache_dir, job["model"], fmt, layers, full)
            done = os.path.exists(target + ".complete.json")
        os.makedirs(args.cache_dir, exist_ok=True)
        free = shutil.disk_usage(args.cache_dir).free
        if not done and size > free - 2e9:
            paths[(kind, fmt)] = {"na": f"{size / GB:.1f} GB file does not fit ({free / GB:.1f} GB free in {args.cache_dir})"}
            continue
        try:
            if kind == "ckpt":
                paths[(kind, fmt)] = ensure_checkpoints(args.cache_dir, [fmt], layers, args.seed, log, job["model"])[fmt]
            else:
                paths[(kind, fmt)] = ensure_gguf(args.cache_dir, job["model"], fmt, layers, args.seed, log)
        except OSError as e:
            paths[(kind, fmt)] = {"na": f"writing the {fmt} file failed: {e}"}
    return paths


def run_job(job, args, probe, bw, have_hf, llama_ver, log):
    """Every row of one model: returns {"job", "rows", "reference", "demo"}."""
    rows = plan_model(job, args, probe, have_hf, log)
    paths = ensure_files(job, rows, args, log, probe)
    cfg = load_config(job["model"])
    common = {"threads": args.threads, "prefill": job["prefill"], "decode": job["decode"], "repeat": job["repeat"],
              "decode_at": job["decode_at"], "vocab_size": cfg["vocab_size"]}
    for r in rows:
        if r.get("na"):
            r["result"] = {"na": r["na"]}
            continue
        where = paths.get(r["needs"])
        if isinstance(where, dict):
            r["result"] = where
            continue
        log(f"running {job['model']} {r['system']} / {r['weights']} / cache {r['cache']} ...")
        if r.get("llama"):
            r["result"] = run_llama_row(args.llama_bench, where, job["prefill"], job["decode"], job["decode_at"],
                                        args.threads, job["repeat"], parse_list(args.llama_args, str) if args.llama_args else [],
                                        args.timeout, log)
            continue
        spec = dict(common, **r["spec"])
        if r["needs"][0] == "gguf":
            spec.update(dir=os.path.dirname(where), gguf_file=where)
        else:
            spec["dir"] = where
        r["spec"] = spec
        res = run_child(spec, args.threads, args.timeout, log)
        if "error" not in res and "na" not in res:
            log("  load %.1f s, prefill %s tok/s, decode %s tok/s, peak RSS %.2f GB" % (
                res["load_s"], {k: (None if v is None else round(v, 1)) for k, v in res["prefill_tok_s"].items()},
                {k: round(v, 2) for k, v in res["decode_tok_s_at"].items()}, res["peak_rss"] / GB))
        r["result"] = res
    out = {"job": job, "rows": rows}
    if job.get("reference"):
        src = job["reference"]
        key = ("ckpt", "bf16") if src == "bf16" else ("gguf", src)
        where = paths.get(key)
        if src != "bf16" and not probe.get("gguf_native_quant") and not args.force:
            out["reference"] = {"na": f"the installed gemma2np expands {src.upper()} GGUFs to float32 at load"}
        elif isinstance(where, dict):
            out["reference"] = where
        else:
            log(f"running {job['model']} numpy reference (float32, from {src}) ...")
            spec = {"kind": "reference", "dtype": "float32", "tokens": 16, "repeat": job["reference_repeat"]}
            spec.update({"dir": os.path.dirname(where), "gguf_file": where} if key[0] == "gguf" else {"dir": where})
            out["reference"] = run_child(spec, args.threads, args.timeout, log) | {"source": src}
    if job.get("demo"):
        where = paths.get(("gguf", "q4_0"))
        if not probe.get("gguf_native_quant") and not args.force:
            out["demo"] = {"na": "the installed gemma2np expands Q4_0 GGUFs to float32 at load"}
        elif isinstance(where, dict):
            out["demo"] = where
        else:
            log(f"running {job['model']} demo: generate 16 tokens from the Q4_0 GGUF ...")
            out["demo"] = run_child({"kind": "demo", "dir": os.path.dirname(where), "gguf_file": where,
                                     "threads": args.threads, "prompt_tokens": 16, "new_tokens": 16},
                                    args.threads, args.timeout, log)
    return out


# ---------------------------------------------------------------------------- rendering


def fmt_num(v, spec="%.1f"):
    return "-" if v is None else spec % v


def _kv_elem(row):
    if row.get("llama"):
        return row["result"].get("kv_elem_bytes", 2)
    return 2 if row["cache"] == "bfloat16" else 4


def render_job(out, machine):
    job, rows = out["job"], out["rows"]
    cfg = load_config(job["model"], job.get("layers"))
    bw = machine["bandwidth_gbs"] * GB
    P, D = job["prefill"], job["decode_at"]
    llama = {r["weights"].lower(): r["result"] for r in rows if r.get("llama") and "prefill_tok_s" in r["result"]}
    cols = (["system", "weights", "KV cache", "load s"] + [f"prefill {T} tok/s" for T in P]
            + [f"decode @{d} tok/s" for d in D] + ["peak RSS GB", "weight GB", "RSS/weights"]
            + [f"% of ceiling @{d}" for d in D] + (["vs llama.cpp (same format)"] if llama else []))
    lines = [f"### gemma-2-{job['model']} shape, {cfg['num_hidden_layers']} layers",
             "", f"Decode: {job['decode']} tokens right after a prefill of the depth shown (llama.cpp: "
             + ("`-n N -d depth`" if any(d > 512 for d in D) else "`-n N` at depth 0") + "). "
             "Ceiling = measured bandwidth / (weight bytes + KV bytes read per token at the mean depth).", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        res = r["result"]
        head = [r["system"], r["weights"], r["cache"]]
        if "na" in res or "error" in res:
            msg = ("n/a: " + res["na"]) if "na" in res else ("ERROR: " + res["error"][:120])
            lines.append("| " + " | ".join(head + [msg] + ["-"] * (len(cols) - 4)) + " |")
            continue
        wb = res.get("weight_bytes") or 0
        pre = [fmt_num(res["prefill_tok_s"].get(str(T))) for T in P]
        dec = [res["decode_tok_s_at"].get(str(d)) for d in D]
        pct = []
        for d, v in zip(D, dec):
            kv = kv_bytes_per_token(cfg, d + job["decode"] / 2, _kv_elem(r))
            pct.append(fmt_num(None if v is None or not wb else 100.0 * v * (wb + kv) / bw, "%.0f%%"))
        cells = head + ["-" if r.get("llama") else "%.1f" % res["load_s"]] + pre + [fmt_num(v, "%.2f") for v in dec] + [
            "%.2f" % (res["peak_rss"] / GB), fmt_num(wb / GB if wb else None, "%.2f"),
            fmt_num(res["peak_rss"] / wb if wb else None, "%.2f")] + pct
        if llama:
            ref = llama.get(SAME_FORMAT.get(r["weights"].split()[0], ""))
            if r.get("llama") or ref is None:
                cells.append("-")
            else:
                parts = []
                for T in P:
                    a, b = res["prefill_tok_s"].get(str(T)), ref["prefill_tok_s"].get(str(T))
                    if a and b:
                        parts.append(f"p{T} {a / b:.2f}x")
                for d in D:
                    a, b = res["decode_tok_s_at"].get(str(d)), ref["decode_tok_s_at"].get(str(d))
                    if a and b:
                        parts.append(f"d{d} {a / b:.2f}x")
                cells.append(f"{SAME_FORMAT[r['weights'].split()[0]].upper()}: " + ", ".join(parts))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Details (GB; RSS from /proc/self/status: anon = private copies, file = mapped file pages; "
                  "KV alloc = the cache's buffers at the end of the row):", "",
              "| system | weights | KV cache | first call s | RSS after load (anon + file) | RSS at end (anon + file) | "
              "KV alloc MB | RSS/(weights+KV alloc) | KV MB read per token " + " / ".join(f"@{d}" for d in D)
              + " | row wall s | notes |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def rss(d):
        if not d:
            return "-"
        return "%.2f (%.2f + %.2f)" % (d.get("VmRSS", 0) / GB, d.get("RssAnon", 0) / GB, d.get("RssFile", 0) / GB)

    for r in rows:
        res = r["result"]
        if "na" in res or "error" in res:
            continue
        kvs = " / ".join("%.1f" % (kv_bytes_per_token(cfg, d + job["decode"] / 2, _kv_elem(r)) / 1e6) for d in D)
        notes = "; ".join(res.get("notes", []) + ([" && ".join(res["cmds"])] if r.get("llama") else []))
        lines.append(f"| {r['system']} | {r['weights']} | {r['cache']} | {fmt_num(res.get('warmup_s'))} | "
                     f"{rss(res.get('after_load'))} | {rss(res.get('at_end'))} | "
                     f"{fmt_num(res['kv_alloc_bytes'] / 1e6 if res.get('kv_alloc_bytes') else None, '%.1f')} | "
                     f"{fmt_num(res['peak_rss'] / (res['weight_bytes'] + res['kv_alloc_bytes']) if res.get('kv_alloc_bytes') else None, '%.2f')} | {kvs} | "
                     f"{res.get('wall_s', 0):.0f} | {notes} |")
    ref = out.get("reference")
    if ref:
        lines += ["", f"NumPy reference (backend=\"numpy\", float32), gemma-2-{job['model']} from "
                      f"{ref.get('source', job['reference'])}:", ""]
        if "na" in ref or "error" in ref:
            lines.append("n/a: " + ref.get("na", ref.get("error", "")))
        else:
            fb = ref["float_bytes"]
            lines += ["| tokens | load s | forward s (each) | peak RSS GB | peak anon GB | anon / float32 size |",
                      "|---|---|---|---|---|---|",
                      f"| {ref['tokens']} | {ref['load_s']:.1f} | {' / '.join(f'{t:.2f}' for t in ref['forward_s'])} | "
                      f"{ref['peak_rss'] / GB:.2f} | {ref['peak_anon_delta'] / GB:.2f} | "
                      f"{ref['peak_anon_delta'] / fb:.1%} of {fb / GB:.1f} GB |"]
            vs = ref.get("vs_native")
            if vs:
                lines += ["", "Its logits against the native backend's on the same weights (max |logit| "
                          f"{vs['max_abs_logit']:.2f}; bounds of docs/precision.md, relative to max(1, max |logit|)):", "",
                          "| native run | max abs diff | mean abs diff | bound | within | top-1 agreement |",
                          "|---|---|---|---|---|---|"]
                for name, what in (("prefill", "one call (prefill kernels)"),
                                   ("chunked", "4-token calls with a cache (decode kernels)")):
                    r = vs[name]
                    lines.append(f"| {what} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | {r['bound']:.2e} | "
                                 f"{'yes' if r['within'] else 'NO'} | {r['top1_agree']:.3f} |")
    demo = out.get("demo")
    if demo:
        lines += ["", f"Demo: gemma-2-{job['model']} from the Q4_0 GGUF (native), 16 greedy tokens after a 16-token prompt:", ""]
        if "na" in demo or "error" in demo:
            lines.append("n/a: " + demo.get("na", demo.get("error", "")))
        else:
            lines.append(f"load {demo['load_s']:.1f} s, generate {demo['generate_s']:.1f} s "
                         f"({len(demo['new_tokens'])} tokens), peak RSS {demo['peak_rss'] / GB:.2f} GB "
                         f"({'< 20 GB: ok' if demo['peak_rss'] < 20e9 else '>= 20 GB: FAILS the bound'}); "
                         f"tokens {demo['new_tokens']}")
    return "\n".join(lines)


def render_machine(machine):
    m = machine
    return "\n".join([
        f"Machine: {m['cpu']} | {m['cores']} logical cores | threads used: {m['threads']} | measured read "
        f"bandwidth: {m['bandwidth_gbs']:.1f} GB/s ({m['bandwidth_detail']})",
        f"gemma2np: {m['gemma2np']['file']} ({m['gemma2np_source']}), git commit {m['gemma2np']['git_commit'] or m['git_commit'] or '?'}; "
        f"features: " + ", ".join(f"{k}={m['gemma2np'][k]}" for k in ("native", "int4", "gguf_native_quant", "cache_dtype_bfloat16")),
        f"llama.cpp: {m['llama_cpp'].get('commit') if m.get('llama_cpp') else 'not run'}"
        + (f" ({' / '.join(m['llama_cpp'].get('lines', []))})" if m.get("llama_cpp") else ""),
        "Random weights; every row runs in a fresh subprocess; each figure is the best of the row's repeats."])


# ---------------------------------------------------------------------------- suites

# issue 10: 9B / 27B rows, int4 and GGUF Q4_0 at 2B; issue 15: long context at 2B. --layers N applies to
# every model (N = 1 or 2 checks the whole run in minutes).
SUITES = {
    "issue10": [
        {"model": "2b", "formats": ["bfloat16", "int8", "int4", "gguf-q4_0", "gguf-q8_0"], "llama": ["bf16", "q8_0", "q4_0"],
         "prefill": [128], "decode": 64, "decode_at": [128]},
        {"model": "9b", "formats": ["bfloat16", "int8", "int4", "gguf-q4_0", "gguf-q8_0"], "llama": ["q8_0", "q4_0"],
         "prefill": [128], "decode": 64, "decode_at": [128], "reference": "bf16"},
        {"model": "27b", "formats": ["gguf-q4_0"], "llama": ["q4_0"], "prefill": [128], "decode": 64,
         "decode_at": [128], "reference": "q4_0", "demo": True},
    ],
    "issue15": [
        {"model": "2b", "formats": ["bfloat16", "int8", "int4"], "cache_dtypes": ["float32", "bfloat16"],
         "llama": ["bf16", "q8_0", "q4_0"], "prefill": [2048, 8192], "decode": 64, "decode_at": [2048, 8192]},
    ],
}


def build_jobs(args):
    def given(v, cast=int):
        return None if v is None else parse_list(v, cast)

    if args.suite:
        jobs = [dict(j) for j in SUITES[args.suite]]
        for j in jobs:
            j.setdefault("cache_dtypes", ["float32"])
            j["backends"] = ["native"]
            j["repeat"] = args.repeat if args.repeat is not None else (2 if args.suite == "issue10" else 1)
    else:
        fmts = parse_list(args.formats)
        lf = parse_list(args.llama_formats) if args.llama_formats else \
            list(dict.fromkeys(SAME_FORMAT[f] for f in fmts if f in SAME_FORMAT))
        jobs = [{"model": args.model, "formats": fmts, "llama": lf, "prefill": [128, 512], "decode": 64,
                 "decode_at": None, "backends": parse_list(args.backends), "repeat": args.repeat or 3,
                 "cache_dtypes": parse_list(args.cache_dtypes or "float32")}]
        if args.reference:
            jobs[0]["reference"] = args.reference
        jobs[0]["demo"] = args.demo
    for j in jobs:
        suite_prefill, suite_at = j["prefill"], j.get("decode_at")
        j["prefill"] = given(args.prefill) or j["prefill"]
        j["decode"] = args.decode if args.decode is not None else j["decode"]
        if given(args.decode_at):
            j["decode_at"] = given(args.decode_at)
        elif args.prefill and suite_at:  # other lengths: decode after each of them if the suite decodes after all
            j["decode_at"] = j["prefill"] if suite_at == suite_prefill else j["prefill"][:1]
        else:
            j["decode_at"] = suite_at or j["prefill"][:1]
        if any(d not in j["prefill"] for d in j["decode_at"]):
            raise SystemExit(f"--decode-at {j['decode_at']} must be among the --prefill lengths {j['prefill']}")
        j["layers"] = args.layers
        j["reference_repeat"] = args.reference_repeat
        if args.cache_dtypes and args.suite:
            j["cache_dtypes"] = parse_list(args.cache_dtypes)
        if args.llama_formats and args.suite:
            j["llama"] = parse_list(args.llama_formats)
    if args.suite and args.models:
        keep = parse_list(args.models)
        jobs = [j for j in jobs if j["model"] in keep]
    return jobs


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), help="run every row of an issue (issue10: 2b/9b/27b at 128 "
                    "tokens, reference, 27B demo; issue15: 2b at 2048/8192) and write --out-dir/<suite>.{json,md}")
    ap.add_argument("--models", help="with --suite: only these models (e.g. 2b,9b)")
    ap.add_argument("--out-dir", default=".", help="where --suite writes <suite>.json and <suite>.md")
    ap.add_argument("--model", default="2b", choices=MODELS, help="shape (gemma2np/configs/gemma-2-<model>)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all of the model)")
    ap.add_argument("--formats", default="float32,bfloat16,int8,int4,gguf-q4_0",
                    help="weight formats: float32, bfloat16, int8, int4 (from the bf16 checkpoint), gguf-q4_0, "
                         "gguf-q8_0, gguf-bf16 (a random GGUF, native backend); numpy: float32 only; transformers: "
                         "float32 -> fp32 row, bfloat16 -> bf16 row")
    ap.add_argument("--backends", default="numpy,native,transformers", help="numpy,native,transformers")
    ap.add_argument("--cache-dtypes", default=None,
                    help="KV cache dtypes of the native rows: float32,bfloat16 (default float32; issue15: both)")
    ap.add_argument("--prefill", default=None, help="prompt lengths (default 128,512; suites: theirs)")
    ap.add_argument("--decode", type=int, default=None, help="decoded tokens (default 64)")
    ap.add_argument("--decode-at", default=None, help="prefill lengths after which decode is timed (default: the first)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="report the best of this many runs of each measurement (default 3; issue10 2, issue15 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-f32", action="store_true",
                    help="do not write the 10.5 GB f32 checkpoint; float32 rows load the bf16 one (always so for 9b/27b)")
    ap.add_argument("--numpy-max-prefill", type=int, default=512,
                    help="skip numpy-backend prefills longer than this (default 512: run all)")
    ap.add_argument("--reference", choices=("bf16", "q4_0", "q8_0"),
                    help="also time the numpy reference (16-token forward) from this file of --model")
    ap.add_argument("--demo", action="store_true",
                    help="also generate 16 tokens from the Q4_0 GGUF of --model (native) and report peak RSS")
    ap.add_argument("--reference-repeat", type=int, default=2, help="forwards timed by the reference row")
    ap.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench: adds its rows on GGUFs of the same shape")
    ap.add_argument("--llama-formats", help="GGUF types for llama.cpp rows (default: the counterparts of --formats: "
                                            "bfloat16 -> bf16, int8 -> q8_0, int4 -> q4_0)")
    ap.add_argument("--llama-args", help="extra llama-bench arguments, comma-separated (e.g. '-fa,on' or '--repack,0')")
    ap.add_argument("--force", action="store_true", help="run rows the installed gemma2np seems to lack the feature for")
    ap.add_argument("--estimate-only", action="store_true", help="print the plan and its estimated time, run nothing")
    ap.add_argument("--cache-dir", default="/tmp/gemma2np-bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bandwidth-bytes", type=float, default=2e9)
    ap.add_argument("--bandwidth-reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=7200, help="per-row timeout in seconds")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args.child)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    jobs = build_jobs(args)
    pkg, how = _package_dir()
    probe = run_child({"kind": "probe"}, 1, 600, log)
    if "error" in probe:
        raise SystemExit("cannot import gemma2np in a child process: " + probe["error"])
    log(f"gemma2np: {probe['file']} ({how}); native={probe['native']} int4={probe['int4']} "
        f"gguf_native_quant={probe['gguf_native_quant']} cache_dtype_bfloat16={probe['cache_dtype_bfloat16']}")
    have_hf = transformers_available()
    if args.llama_bench and not os.access(args.llama_bench, os.X_OK):
        raise SystemExit(f"--llama-bench {args.llama_bench!r} is not an executable")
    llama_ver = llama_version(args.llama_bench) if args.llama_bench else None

    total, disk = 0.0, 0
    for j in jobs:
        rows = plan_model(j, args, probe, have_hf, lambda m: None)
        run = extras_run(j, probe, args)
        est = estimate_s(j, rows, threads=args.threads, run=run)
        total += est
        cfg = load_config(j["model"], j["layers"])
        need = {r["needs"] for r in rows if not r.get("na")}
        need |= {("ckpt", "bf16")} if run["reference"] and j["reference"] == "bf16" else set()
        need |= {("gguf", j["reference"])} if run["reference"] and j["reference"] != "bf16" else set()
        need |= {("gguf", "q4_0")} if run["demo"] else set()
        mb = sum(file_bytes(cfg, f if k == "ckpt" else {"bf16": "bf16-gguf"}.get(f, f)) for k, f in need)
        disk += mb
        full = load_config(j["model"])["num_hidden_layers"]
        est_w = files_estimate_s(j["model"], cfg, need, args, j["layers"] or full, full)
        est += est_w
        total += est_w
        log(f"plan gemma-2-{j['model']} ({cfg['num_hidden_layers']} layers): {len(rows)} rows "
            f"({sum(1 for r in rows if r.get('na'))} n/a), files {mb / GB:.1f} GB, ~{est / 60:.0f} min")
    log(f"estimated run time ~{total / 60:.0f} min (rough; includes writing the missing files), "
        f"files up to {disk / GB:.1f} GB in {args.cache_dir}")
    if args.estimate_only:
        return None

    log("measuring read bandwidth ...")
    bw = run_child({"kind": "bandwidth", "bytes": args.bandwidth_bytes, "reps": args.bandwidth_reps,
                    "threads": args.threads}, args.threads, args.timeout, log)
    if "error" in bw:
        raise SystemExit("bandwidth measurement failed: " + bw["error"])
    detail = ", ".join(f"{k} {bw[k]:.1f}" for k in ("numpy_2threads", "blas_gemv", "native_linear") if k in bw)
    log(f"  {bw['gbs']:.1f} GB/s ({detail})")
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "bandwidth_gbs": bw["gbs"],
               "bandwidth_detail": detail, "python": platform.python_version(), "gemma2np": probe,
               "gemma2np_source": how, "git_commit": git_commit(ROOT), "llama_cpp": llama_ver,
               "layers": args.layers, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    t0 = time.perf_counter()
    outs = [run_job(j, args, probe, bw, have_hf, llama_ver, log) for j in jobs]
    machine["run_s"] = time.perf_counter() - t0
    text = "\n\n".join([render_machine(machine)] + [render_job(o, machine) for o in outs])
    print(text)
    doc = {"machine": machine, "bandwidth": bw, "jobs": outs, "args": vars(args)}
    paths = []
    if args.suite:
        os.makedirs(args.out_dir, exist_ok=True)
        paths = [os.path.join(args.out_dir, f"{args.suite}.json"), os.path.join(args.out_dir, f"{args.suite}.md")]
        with open(paths[1], "w") as f:
            f.write(f"# bench.py --suite {args.suite}\n\n{text}\n")
    if args.json:
        paths.insert(0, args.json)
    for p in paths:
        if p.endswith(".md"):
            continue
        with open(p, "w") as f:
            json.dump(doc, f, indent=2)
    for p in paths:
        log(f"wrote {p}")
    return doc


if __name__ == "__main__":
    main()
