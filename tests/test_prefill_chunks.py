"""Chunked prefill (generate(prefill_chunk_size=n), transformers 5.23's option; --prefill-chunk-size).

What holds, measured (docs/precision.md, "Chunked prefill"):
* native backend: bitwise the one-shot prefill -- logits and every cached key / value -- when no chunk starts
  past position W - 1 (a sliding layer's key view then starts at position 0, as in one pass, so the attention
  kernel's fixed 256-key chunks and 64-key blocks fall on the same keys) and, with bf16 / int8 / int4 weights,
  every chunk has B * n >= 8 rows (fewer take the float32 decode path of the linear kernels instead of the bf16
  prefill path). float32 weights: any chunk size. Either cache dtype.
* otherwise (native past the window, a short bf16 tail; the NumPy reference always, whose BLAS rounds by M):
  within a stated bound of the one-shot logits.
* greedy tokens equal transformers' on every golden with chunked prefill, on both backends.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma2np
from gemma2np import Gemma2Config, Gemma2ForCausalLM
from gemma2np.cli import main as cli_main
from gemma2np.generation import GenerationConfig, GenerationError
from gemma2np.generation import loop
from gemma2np.generation.loop import prefill

from conftest import BACKENDS  # noqa: E402
from golden_warnings import generate_warnings, load_warnings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "reference_outputs"
NATIVE = "native" in BACKENDS
needs_native = pytest.mark.skipif(not NATIVE, reason="the native extension is not built")


def _config(window):
    # head_dim 16, prompts up to 700: long enough that rows span several of the native kernel's 256-key chunks
    return Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20, sliding_window=window,
                        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
                        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, initializer_range=0.3)


_MODELS = {}


def _model(backend, weights=None, cache_dtype=None, window=300):
    key = (backend, weights, cache_dtype, window)
    if key not in _MODELS:
        kw = {} if weights is None else {"weights": weights}
        _MODELS[key] = Gemma2ForCausalLM.from_config(_config(window), seed=1, backend=backend, cache_dtype=cache_dtype,
                                                     **kw)
    return _MODELS[key]


def _inputs(T, B):
    ids = np.random.default_rng(T).integers(3, 97, size=(B, T))
    mask = np.ones((B, T), np.int64)
    if B == 2:
        mask[1, :5] = 0  # left padding in row 1
    return ids, mask


def _both(model, T, B, chunk):
    """(one-shot state, output), (chunked state, output) of prefill on the same prompt."""
    ids, mask = _inputs(T, B)
    return prefill(model, ids, mask, True, capacity=T + 4), prefill(model, ids, mask, True, capacity=T + 4,
                                                                     chunk_size=chunk)


def _bits(a):
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _assert_bitwise(one, chunked, what):
    """Same logits, same cached positions, same keys / values at every real token. (A left pad's own query sees
    no key and averages all the keys of its call -- transformers' finfo.min mask -- so pads' cached keys depend
    on the chunk; every later query masks them out.)"""
    (s1, o1), (s2, o2) = one, chunked
    np.testing.assert_array_equal(o2.logits, o1.logits, err_msg=f"{what}: logits")
    for i in range(len(s1.cache)):
        p1, p2 = s1.cache.positions[i], s2.cache.positions[i]
        np.testing.assert_array_equal(p2, p1, err_msg=f"{what}: layer {i} positions")
        real = s1.mask[:, p1].astype(bool)  # (B, L)
        for name, a, b in (("keys", s1.cache.keys[i], s2.cache.keys[i]),
                           ("values", s1.cache.values[i], s2.cache.values[i])):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: layer {i} {name}"
            assert np.array_equal(_bits(a).transpose(0, 2, 1, 3)[real], _bits(b).transpose(0, 2, 1, 3)[real]), \
                f"{what}: layer {i} {name}"

# ---------------------------------------------------------------------------- bitwise on the native backend


@needs_native
@pytest.mark.parametrize("cache_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("weights,chunks", [("float32", (1, 3, 8, 64, 100, 256)), ("bfloat16", (5, 64, 100, 256)),
                                            ("int8", (5, 64, 100)), ("int4", (5, 64, 100))])
@pytest.mark.parametrize("T,B", [(100, 1), (290, 2)])  # 290 crosses a 256-key chunk, stays within W - 1 = 299
def test_native_chunked_prefill_is_bitwise_one_shot(weights, chunks, cache_dtype, T, B):
    model = _model("native", weights, cache_dtype)
    for c in chunks:
        if c >= T:
            continue
        if weights != "float32" and B * (T % c or c) < 8:
            continue  # a tail chunk of < 8 rows: the decode path (test below)
        one, chunked = _both(model, T, B, c)
        _assert_bitwise(one, chunked, f"{weights} weights, cache {cache_dtype}, T={T}, B={B}, chunk {c}")


@needs_native
@pytest.mark.parametrize("cache_dtype", [None, "bfloat16"])
def test_native_bf16_tail_below_8_rows_is_within_the_bf16_bound(cache_dtype):
    """T = 100, chunks of 8 / 16: the last chunk has 4 rows, run by the float32 decode path of the bf16 linear
    kernels (the one-shot prefill rounds its activations to bf16): the logits differ, within the bf16 bound
    docs/precision.md gives for bf16 prefill (5e-2)."""
    model = _model("native", "bfloat16", cache_dtype)
    for c in (8, 16):
        (_, o1), (_, o2) = _both(model, 100, 1, c)
        assert np.abs(o2.logits - o1.logits).max() < 5e-2


@pytest.mark.parametrize("backend,weights", [("numpy", None)] + ([("native", "float32"), ("native", "bfloat16")]
                                                                  if NATIVE else []))
@pytest.mark.parametrize("cache_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("T", [290, 700])  # 700: chunks start past W - 1 = 299 (the sliding layer's window)
def test_chunked_prefill_within_bound(backend, weights, cache_dtype, T):
    """Where the bits may differ -- the NumPy reference (BLAS's rounding depends on the number of rows), the
    native backend once chunks start past the window (the sliding layer's key view then starts at
    chunk start - (W - 1), so its 256-key chunks / 64-key blocks split a row's keys elsewhere) -- the
    difference is float32 reordering: < 1e-5 on the logits (|logits| <= 3), 1e-3 with a bf16 cache (a key
    may round to the neighbouring bf16 value), 5e-2 with bf16 weights (the bf16 prefill bound)."""
    model = _model(backend, weights, cache_dtype)
    bound = 5e-2 if weights == "bfloat16" else 1e-3 if cache_dtype else 1e-5
    for c in (1, 64, 256, 512):
        if c >= T or (c == 1 and T > 300):
            continue
        (s1, o1), (s2, o2) = _both(model, T, 2, c)
        assert np.abs(o2.logits - o1.logits).max() < bound, c
        for i in range(len(s1.cache)):
            np.testing.assert_array_equal(s2.cache.positions[i], s1.cache.positions[i])
            real = s1.mask[:, s1.cache.positions[i]].astype(bool)  # (pads' keys: see _assert_bitwise)
            k1, k2 = (np.asarray(x, np.float32).transpose(0, 2, 1, 3)[real] for x in (s1.cache.keys[i],
                                                                                      s2.cache.keys[i]))
            assert np.abs(k2 - k1).max() < 50 * bound


# ---------------------------------------------------------------------------- generate()


def _gen_params():
    params = []
    for case_json in sorted(REF.glob("*/case.json")):
        if case_json.parent.name == "window_one":  # see the docstring below
            continue
        case = json.loads(case_json.read_text())
        for gen in case["generate"]:
            for backend in BACKENDS:
                params.append(pytest.param(case_json.parent, gen["name"], backend,
                                           id=f"{case_json.parent.name}-{gen['name']}-{backend}"))
    return params


GOLDEN_PARAMS = _gen_params()


def test_golden_generate_cases_present():
    assert len({p.values[0] for p in GOLDEN_PARAMS}) >= 4, GOLDEN_PARAMS


@pytest.mark.parametrize("case_dir,gen_name,backend", GOLDEN_PARAMS)
def test_goldens_greedy_tokens_with_chunked_prefill(case_dir, gen_name, backend):
    """transformers' greedy sequences, token for token, with the prompt fed 1, 2 and 3 tokens at a time.
    Not window_one (sliding_window = 1): transformers' one-token sliding_window == 1 quirk
    (model/decoder.py `layer_visibility`) lets a one-token call attend to every cached key, left pads included,
    and a pad's cached key depends on its call (a pad query sees no key and averages all of its call's keys), so
    chunked and one-shot prefill decode differently there; transformers' own prefill_chunk_size=1 run gives
    what ours gives (test_chunked_generate_is_transformers_chunked_generate), and it raises for chunks >= 2."""
    case = json.loads((case_dir / "case.json").read_text())
    gen = next(g for g in case["generate"] if g["name"] == gen_name)
    with np.load(case_dir / "golden.npz") as z:
        input_ids, mask, want = z[gen["inputs"]["input_ids"]], z[gen["inputs"]["attention_mask"]], z[gen["sequences"]]
    extra = {"weights": "float32"} if backend == "native" else {}
    with load_warnings(case_dir):
        model = getattr(gemma2np, case["class"]).from_pretrained(case_dir, backend=backend, **extra)
    for c in (1, 2, 3):
        with generate_warnings(case_dir, want):
            got = model.generate(input_ids=input_ids, attention_mask=mask, prefill_chunk_size=c, **gen["kwargs"])
        got = np.asarray(getattr(got, "sequences", got))
        np.testing.assert_array_equal(got, want, err_msg=f"prefill_chunk_size={c}")


@pytest.mark.torch
@pytest.mark.parametrize("case", ["window_one", "generate_eos_list", "causal_gqa"])
def test_chunked_generate_is_transformers_chunked_generate(case):
    """Live transformers 5.23, generate(prefill_chunk_size=c): the same sequences as ours. (window_one with
    c = 1 takes the one-token sliding_window == 1 quirk in both; transformers raises a shape error for
    c >= 2 on that config, so it is compared at c = 1 only.)"""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    case_dir = REF / case
    meta = json.loads((case_dir / "case.json").read_text())
    if not meta.get("generate"):
        pytest.skip(f"{case} has no generate golden")
    gen = meta["generate"][0]
    with np.load(case_dir / "golden.npz") as z:
        ids, mask = z[gen["inputs"]["input_ids"]], z[gen["inputs"]["attention_mask"]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(case_dir, dtype=torch.float32,
                                                           attn_implementation="eager")
    with load_warnings(case_dir):
        ours = getattr(gemma2np, meta["class"]).from_pretrained(case_dir)
    for c in (1,) if case == "window_one" else (1, 2, 3):
        want = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), prefill_chunk_size=c,
                           **gen["kwargs"])
        got = ours.generate(input_ids=ids, attention_mask=mask, prefill_chunk_size=c, **gen["kwargs"])
        np.testing.assert_array_equal(np.asarray(getattr(got, "sequences", got)), want.numpy(), err_msg=f"chunk {c}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_chunks_the_new_part_after_past_key_values(backend):
    """A chat's next turn: the cache holds the first turn, only the new tokens are chunked; the result is the
    unchunked continuation's (bitwise on native f32 weights, where the prompt stays within the window)."""
    model = _model(backend, "float32" if backend == "native" else None, window=300)
    ids, mask = _inputs(60, 2)
    outs = []
    for c in (None, 7):
        first = model.generate(input_ids=ids[:, :30], attention_mask=mask[:, :30], max_new_tokens=3,
                               return_dict_in_generate=True, prefill_chunk_size=c)
        turn2 = np.concatenate([first.sequences, ids[:, 30:]], axis=1)
        mask2 = np.concatenate([mask[:, :30], np.ones((2, turn2.shape[1] - 30), np.int64)], axis=1)
        out = model.generate(input_ids=turn2, attention_mask=mask2,
                             past_key_values=first.past_key_values, max_new_tokens=4, min_new_tokens=4,
                             return_dict_in_generate=True, output_logits=True, prefill_chunk_size=c)
        outs.append(out)
    np.testing.assert_array_equal(outs[1].sequences, outs[0].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits):
        if backend == "native":
            np.testing.assert_array_equal(b, a)
        else:
            assert np.abs(b - a).max() < 1e-5


def test_prefill_chunk_size_calls_the_model_once_per_chunk(monkeypatch):
    """transformers' split: chunks of n tokens (the last one shorter), each with the mask up to its end and its
    cache positions; the LM head for the last position only."""
    model = _model("numpy")
    calls = []
    real = type(model).forward

    def spy(self, **kw):
        calls.append((kw["input_ids"].shape[1], kw["attention_mask"].shape[1], kw.get("cache_position"),
                      kw["logits_to_keep"]))
        return real(self, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    ids, mask = _inputs(23, 2)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, prefill_chunk_size=10)
    assert [(n, m, list(p), k) for n, m, p, k in calls] == [
        (10, 10, list(range(0, 10)), 1), (10, 20, list(range(10, 20)), 1), (3, 23, list(range(20, 23)), 1)]


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "8", [4], np.float32(4)])
def test_bad_prefill_chunk_size_is_a_generation_error(bad):
    model = _model("numpy")
    with pytest.raises(GenerationError, match="prefill_chunk_size"):
        model.generate(input_ids=[[2, 3, 4]], max_new_tokens=1, prefill_chunk_size=bad)
    with pytest.raises(GenerationError, match="prefill_chunk_size"):
        model.generate(input_ids=[[2, 3, 4]], max_new_tokens=1,
                       generation_config=GenerationConfig(prefill_chunk_size=bad))


def test_prefill_chunk_size_needs_the_cache():
    """transformers: "Cannot use prefill chunking without a cache"."""
    model = _model("numpy")
    with pytest.raises(GenerationError, match="use_cache=False"):
        model.generate(input_ids=[[2, 3, 4]], max_new_tokens=1, prefill_chunk_size=2, use_cache=False)
    ok = model.generate(input_ids=[[2, 3, 4]], max_new_tokens=2, prefill_chunk_size=np.int64(2))
    assert ok.shape == (1, 5)


def test_prefill_chunk_size_from_generation_config_json(tmp_path):
    """generation_config.json's prefill_chunk_size is a setting like the others (explicit arguments win)."""
    model = _model("numpy")
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"prefill_chunk_size": 0}))
    loaded = Gemma2ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(GenerationError, match="prefill_chunk_size"):
        loaded.generate(input_ids=[[2, 3, 4]], max_new_tokens=1)
    assert loaded.generate(input_ids=[[2, 3, 4]], max_new_tokens=1, prefill_chunk_size=2).shape == (1, 4)


# ---------------------------------------------------------------------------- CLI and the RSS script


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_prefill_chunk_size(command, capsys, monkeypatch):
    seen = []
    real = loop.prefill

    def spy(*a, **kw):
        seen.append(kw.get("chunk_size"))
        return real(*a, **kw)

    monkeypatch.setattr(loop, "prefill", spy)
    if command == "generate":
        argv = ["generate", "--prompt", "ROMEO: what light", "--max-new-tokens", "3", "--prefill-chunk-size", "2"]
    else:
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hello\n"))
        argv = ["chat", "--max-new-tokens", "3", "--prefill-chunk-size", "2"]
    assert cli_main(argv) == 0
    assert seen and all(c == 2 for c in seen)
    capsys.readouterr()
    assert cli_main([command, "--prefill-chunk-size", "0"]) == 2
    assert "prefill-chunk-size" in capsys.readouterr().err


def test_long_prompt_rss_script_smoke(tmp_path):
    """benchmarks/long_prompt_rss.py on a tiny saved model: it runs, its KV bytes are the cache's buffers."""
    model = _model("numpy", window=8)
    model.save_pretrained(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "long_prompt_rss.py"), "--model", str(tmp_path),
                        "--backend", "numpy", "--prompt", "40", "--prefill-chunk-size", "16"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # 2 layers of (1, K=2, rows, D=16) float32 keys + values: the full layer 40 rows (capacity min(41, 1024)),
    # the sliding layer 2 (W - 1) = 14 rows, of which W - 1 = 7 filled
    per_row = 2 * 2 * 16 * 4
    assert res["kv_allocated_bytes"] == per_row * (41 + 14)
    assert res["kv_filled_bytes"] == per_row * (40 + 7)
    assert res["peak_rss_bytes"] > 0 and res["prefill_chunk_size"] == 16
    assert res["ratio"] == pytest.approx(res["peak_rss_bytes"] / (res["weights_bytes"] + res["kv_allocated_bytes"]))
