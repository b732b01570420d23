"""The benchmark harness (benchmarks/): the random GGUF writer, the timing protocol, the KV-byte model and
the llama-bench plumbing. Not speed: nothing here is timed. Tiny shapes only."""

import json
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import bench  # noqa: E402
import random_gguf  # noqa: E402
from gemma2np.gguf_io import load_gguf  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bench")

# every row is a whole number of Q6_K super-blocks (256) and of Q4_0 / Q8_0 blocks (32)
TINY = {"vocab_size": 384, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "sliding_window": 64, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "rope_theta": 10000.0, "initializer_range": 0.02, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
        "query_pre_attn_scalar": 128}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-gguf")
    return {q: (str(d / f"tiny-{q}.gguf"), random_gguf.ensure_random_gguf(str(d / f"tiny-{q}.gguf"), TINY, q, seed=3))
            for q in ("q4_0", "q8_0", "bf16")}


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "bf16"])
def test_random_gguf_reads_back_as_the_shape(ggufs, qtype):
    path, info = ggufs[qtype]
    cfg, state = load_gguf(path)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping"):
        assert cfg[key] == TINY[key], key
    assert cfg["tie_word_embeddings"] is True  # no output tensor, like llama.cpp's converter
    shapes = {hf: shape for _, hf, shape in random_gguf.tensor_layout(TINY)}
    assert set(state) == set(shapes)
    for name, arr in state.items():
        a = np.asarray(arr, np.float32)
        assert a.shape == shapes[name], name
        if name.endswith("norm.weight"):
            assert not a.any(), name  # stored 1 + w with w = 0; the reader subtracts the 1
        else:
            assert np.isfinite(a).all(), name
            assert 0.015 < float(a.std()) < 0.025, (name, float(a.std()))  # the checkpoints' init std 0.02
    assert info["tensor_types"]["token_embd"] == random_gguf.default_embd_type(qtype)


def test_random_gguf_tensor_types(ggufs):
    import gguf

    want = {"q4_0": ("Q4_0", "Q6_K"), "q8_0": ("Q8_0", "Q8_0"), "bf16": ("BF16", "BF16")}
    for q, (path, _) in ggufs.items():
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert types["token_embd.weight"] == want[q][1]
        assert types["blk.1.ffn_down.weight"] == want[q][0]
        assert types["output_norm.weight"] == "F32"


def test_bf16_gguf_holds_the_checkpoint_values(ggufs):
    """The BF16 file is the bf16 checkpoint's model (same seeded chunks), so llama.cpp's BF16 row and our
    bfloat16 row compute one model."""
    import ml_dtypes

    _, state = load_gguf(ggufs["bf16"][0])
    for name, shape in (("model.layers.1.mlp.up_proj.weight", (512, 256)), ("model.embed_tokens.weight", (384, 256))):
        want = np.concatenate(list(bench._chunks(name, shape, TINY, 3))).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(state[name]).view(np.uint16), want.view(np.uint16))


def test_random_blocks_scale_to_std():
    rng = np.random.default_rng(0)
    import gguf

    for q in ("q4_0", "q8_0", "q6_k"):
        blocks = random_gguf.random_blocks(q, 4096, 0.02, rng)
        w = gguf.quants.dequantize(blocks.reshape(-1), getattr(gguf.GGMLQuantizationType, random_gguf.QTYPES[q]))
        assert abs(float(w.std()) - 0.02) < 0.002, (q, float(w.std()))


def test_gguf_marker_reuse_and_rewrite(tmp_path):
    p = str(tmp_path / "x.gguf")
    a = random_gguf.ensure_random_gguf(p, TINY, "q4_0", seed=1)
    mtime = os.path.getmtime(p)
    assert random_gguf.ensure_random_gguf(p, TINY, "q4_0", seed=1) == a
    assert os.path.getmtime(p) == mtime  # reused
    with open(p, "r+b") as f:  # a truncated file does not match its marker: rewritten
        f.truncate(100)
    random_gguf.ensure_random_gguf(p, TINY, "q4_0", seed=1)
    assert os.path.getsize(p) == a["bytes"]


def test_row_bytes_refuses_partial_blocks():
    with pytest.raises(ValueError, match="blocks"):
        random_gguf.row_bytes("q6_k", 288)


def test_protocol_decodes_after_each_depth():
    """decode_at: every listed prefill is followed by `decode` steps in each repeat, from that prefill's state."""
    calls = []

    def prefill(ids):
        calls.append(("p", ids.shape[1]))
        return {"len": ids.shape[1]}

    def decode(st, tok):
        calls.append(("d", st["len"]))
        return {"len": st["len"] + 1}

    spec = {"vocab_size": 100, "prefill": [4, 8, 16], "decode": 3, "decode_at": [8, 16], "repeat": 2}
    res = bench._run_protocol(spec, prefill, decode, lambda st: 5)
    assert calls[:3] == [("p", 4), ("d", 4), ("d", 5)]  # warm-up
    body = calls[3:]
    assert body[:2] == [("p", 4), ("p", 4)]
    assert body[2:6] == [("p", 8), ("d", 8), ("d", 9), ("d", 10)]
    assert body[6:10] == body[2:6]
    assert body[10:14] == [("p", 16), ("d", 16), ("d", 17), ("d", 18)]
    assert len(body) == 18
    assert set(res["prefill_tok_s"]) == {"4", "8", "16"} and set(res["decode_tok_s_at"]) == {"8", "16"}
    assert res["decode_context"] == 8 and res["decode_tok_s"] == res["decode_tok_s_at"]["8"]


def test_kv_bytes_per_token_matches_the_cache():
    """The KV bytes a decode step reads = the keys and values the cache hands attention at that step."""
    from gemma2np.cache import Gemma2Cache
    from gemma2np.config import Gemma2Config

    cfg = dict(TINY, num_hidden_layers=4)
    c = Gemma2Config(**{k: v for k, v in cfg.items() if k != "initializer_range"})
    nkv, d = cfg["num_key_value_heads"], cfg["head_dim"]
    for depth in (10, 63, 64, 100):
        cache = Gemma2Cache(c.layer_types, c.sliding_window)
        k = np.zeros((1, nkv, depth, d), np.float32)
        read = 0
        for i in range(4):
            cache.update(k, k, np.arange(depth), i)
            kk, vv = cache.update(k[:, :, :1], k[:, :, :1], np.array([depth]), i)[:2]
            # a sliding layer's attention sees its last `window` positions (the mask cuts the rest)
            n = kk.shape[2] if not cache.is_sliding(i) else min(kk.shape[2], c.sliding_window)
            read += 2 * n * nkv * d * 4
        assert bench.kv_bytes_per_token(cfg, depth, 4) == read, depth


def test_llama_commands():
    short = bench.llama_commands("lb", "m.gguf", [128], 64, [128], 2, 3, [])
    assert short == [["lb", "-m", "m.gguf", "-t", "2", "-r", "3", "-o", "json", "-p", "128", "-n", "64"]]
    long = bench.llama_commands("lb", "m.gguf", [2048, 8192], 64, [2048, 8192], 2, 1, ["-fa", "on"])
    assert long[0][-6:] == ["-fa", "on", "-p", "2048,8192", "-n", "0"]
    assert long[1][-6:] == ["-p", "0", "-n", "64", "-d", "2048,8192"]


def test_parse_llama_json_recorded_output():
    """A real `llama-bench -p 8 -n 2 -r 2 -o json --repack 0` output (random 1-layer 2B-shaped Q4_0 file)."""
    with open(os.path.join(DATA, "llama-bench-q4_0-L1.json")) as f:
        text = f.read()
    rows = bench.parse_llama_json("some log line\n" + text)
    raw = json.loads(text)
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [(8, 0), (0, 2)]
    for r, x in zip(rows, raw):
        assert r["best_ts"] == max(x["samples_ts"]) and r["model_size"] == x["model_size"]
    with pytest.raises(ValueError):
        bench.parse_llama_json("error: failed to load model")


def test_configs_come_from_the_package():
    for m in bench.MODELS:
        cfg = bench.load_config(m)
        assert cfg["model_type"] == "gemma2"
        assert bench.load_config(m, 2)["num_hidden_layers"] == 2
    pkg, _ = bench._package_dir()
    assert os.path.dirname(bench.config_path("27b")) == os.path.join(pkg, "configs")


def test_file_bytes_close_to_the_written_file(ggufs):
    for q in ("q4_0", "q8_0"):
        path, info = ggufs[q]
        est = bench.file_bytes(TINY, q)
        assert est <= info["bytes"] < est + 64 * 1024, q  # header + vocab + alignment on top of the tensors


def _parser():
    return bench.build_parser()

def test_suite_jobs_follow_overrides():
    jobs = bench.build_jobs(_parser().parse_args(["--suite", "issue15"]))
    assert [j["model"] for j in jobs] == ["2b"]
    assert jobs[0]["decode_at"] == [2048, 8192] and jobs[0]["cache_dtypes"] == ["float32", "bfloat16"]
    assert jobs[0]["repeat"] == 1
    # other lengths: the long-context suite still decodes after each of them
    j = bench.build_jobs(_parser().parse_args(["--suite", "issue15", "--prefill", "600,1100"]))[0]
    assert j["prefill"] == [600, 1100] and j["decode_at"] == [600, 1100]
    j10 = bench.build_jobs(_parser().parse_args(["--suite", "issue10", "--prefill", "16", "--models", "9b,27b"]))
    assert [j["model"] for j in j10] == ["9b", "27b"] and all(j["decode_at"] == [16] for j in j10)
    assert j10[0]["reference"] == "bf16" and j10[1]["demo"] is True
    with pytest.raises(SystemExit, match="decode-at"):
        bench.build_jobs(_parser().parse_args(["--prefill", "16", "--decode-at", "32"]))


def test_rows_missing_features_are_na():
    args = _parser().parse_args(["--model", "9b", "--backends", "native", "--formats", "bfloat16,int4,gguf-q4_0",
                                 "--cache-dtypes", "float32,bfloat16", "--llama-bench", "/bin/true"])
    job = bench.build_jobs(args)[0]
    probe = {"native": True, "int4": False, "gguf_native_quant": False, "cache_dtype_bfloat16": False}
    rows = bench.plan_model(job, args, probe, False, lambda m: None)
    na = {(r["weights"].split()[0], r["cache"]): r.get("na") for r in rows if not r.get("llama")}
    assert na[("bfloat16", "float32")] is None
    assert "int4" in na[("int4", "float32")] and "float32 at load" in na[("gguf-q4_0", "float32")]
    assert "cache_dtype" in na[("bfloat16", "bfloat16")]
    assert [r["weights"] for r in rows if r.get("llama")] == ["BF16", "Q4_0"]
    probe = dict(probe, int4=True, gguf_native_quant=True, cache_dtype_bfloat16=True)
    assert not any(r.get("na") for r in bench.plan_model(job, args, probe, False, lambda m: None))


@pytest.mark.parametrize("weights", ["bfloat16", "int8", "int4"])
def test_weight_bytes_equal_info_formula(weights):
    """The benchmark's weight bytes (summed over the prepared handles) = `gemma2np info`'s formula."""
    from gemma2np import Gemma2Config, Gemma2ForCausalLM
    from gemma2np.cli import _weight_bytes
    from gemma2np.kernels import native_available

    if not native_available():
        pytest.skip("needs the native extension")
    cfg = Gemma2Config(**{k: v for k, v in TINY.items() if k != "initializer_range"})
    model = Gemma2ForCausalLM.from_config(cfg, seed=0, backend="native", weights=weights)
    assert bench._gemma2np_weight_bytes(model) == _weight_bytes(cfg)[weights]


def test_protocol_result_is_json():
    """bench_tp.py and the transformers child dump the protocol's result as JSON: no state objects in it."""
    spec = {"vocab_size": 50, "prefill": [3], "decode": 2, "repeat": 1}
    last = []
    res = bench._run_protocol(spec, lambda ids: {"n": ids.shape[1]}, lambda st, t: {"n": st["n"] + 1},
                              lambda st: 4, state_out=last)
    json.dumps(res)
    assert last == [{"n": 5}]
