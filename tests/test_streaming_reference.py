"""The reference backend on bf16/f16 checkpoints (issue 10 item 3): weights stay as stored and are converted
at use (per layer; the LM head per block of VOCAB_ROW_BLOCK vocabulary rows), with results bitwise equal to
converting everything at load (the pre-streaming behaviour, GEMMA2NP_REFERENCE_CONVERT=load) and to a
model built from the state dict widened up front. And the memory claim, measured in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import randomize_norms, tiny_config
from gemma2np import Gemma2ForCausalLM
from gemma2np.checkpoint import _mapping_of, bfloat16
from gemma2np.kernels import BackendError, ReferenceBackend
from gemma2np.kernels.handles import ReferenceLinear
from gemma2np.kernels.ops_backend import CONVERT_ENV, VOCAB_ROW_BLOCK
from gemma2np import ops  # noqa: E402 (after the package's own imports, as the other test files)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# two full vocabulary blocks and a partial third, so the blocked head really is blocked
VOCAB = 2 * VOCAB_ROW_BLOCK + 77
IDS = np.array([[2, 17, 5, 60, 33, 9, 71, 4, 88, 12, VOCAB - 1], [3, 3, 8000, 9000, 16000, 1, 0, 5, 6, 7, 8]])
MASK = np.array([[1] * 11, [0, 0] + [1] * 9])
SRC = {"bfloat16": bfloat16, "float16": np.float16}


def _state(tied: bool, seed=0):
    cfg = tiny_config(vocab_size=VOCAB, tie_word_embeddings=tied, attention_bias=True)
    m = Gemma2ForCausalLM.from_config(cfg, seed=seed)
    state = randomize_norms({k: np.array(v, np.float32) for k, v in m.state_dict().items()}, seed)
    rng = np.random.default_rng(seed + 7)
    for k in state:  # non-zero biases, so the blocked bias add is exercised too
        if k.endswith(".bias"):
            state[k] = rng.normal(0, 0.3, state[k].shape).astype(np.float32)
    return cfg, state


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoints(request, tmp_path_factory):
    """{source dtype: directory} of one random model saved as bf16 and as f16."""
    tied = request.param
    cfg, state = _state(tied)
    d = tmp_path_factory.mktemp("stream")
    dirs = {}
    for src in SRC:
        dirs[src] = d / src
        Gemma2ForCausalLM(cfg, state).save_pretrained(dirs[src], dtype=src)
    return tied, dirs


def _run(model):
    """Prefill with padding, then three cached decode steps: every logit the model gave, as one list."""
    out = model(input_ids=IDS, attention_mask=MASK, use_cache=True)
    logits, past, mask = [out.logits], out.past_key_values, MASK
    for step in range(3):
        nxt = np.argmax(logits[-1][:, -1], axis=-1)[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), mask.dtype)], axis=1)
        out = model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
        logits.append(out.logits)
        past = out.past_key_values
    return logits


def _linears(model):
    hs = [getattr(layer, n) for layer in model.model.layers
          for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    return hs + [model.lm_head]


def _assert_bitwise(a_list, b_list):
    for a, b in zip(a_list, b_list, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("src", list(SRC))
def test_streamed_equals_eager_and_upfront(checkpoints, src, dtype, monkeypatch):
    tied, dirs = checkpoints
    monkeypatch.delenv(CONVERT_ENV, raising=False)
    streamed = Gemma2ForCausalLM.from_pretrained(dirs[src], dtype=dtype)
    assert streamed.backend.convert == "use"
    # no float copy held: every linear keeps the memory-mapped source array of the file's dtype
    for h in _linears(streamed):
        assert isinstance(h, ReferenceLinear) and h.w.dtype == SRC[src] and _mapping_of(h.w)[0] is not None
    assert streamed.lm_head.row_block == VOCAB_ROW_BLOCK
    got = _run(streamed)

    monkeypatch.setenv(CONVERT_ENV, "load")
    eager = Gemma2ForCausalLM.from_pretrained(dirs[src], dtype=dtype)
    assert eager.backend.convert == "load"
    for h in _linears(eager):
        assert h.w.dtype == np.dtype(dtype) and _mapping_of(h.w)[0] is None  # converted at load, in RAM
    _assert_bitwise(got, _run(eager))

    # the state dict widened before the model sees it (no code of the backend converts anything)
    monkeypatch.delenv(CONVERT_ENV)
    state = {k: np.asarray(v).astype(dtype) for k, v in streamed.state_dict().items()}
    upfront = Gemma2ForCausalLM(streamed.config, state, dtype=dtype)
    for h in _linears(upfront):
        assert h.w.dtype == np.dtype(dtype)
    _assert_bitwise(got, _run(upfront))
    assert np.shares_memory(streamed.lm_head.w, streamed.model.embed_tokens) == tied


def test_widened_weights_give_their_file_pages_back(checkpoints, monkeypatch):
    """After each use, a widened memory-mapped projection's pages are released (ops_backend._at_use), so
    the resident set holds one float copy, not the whole map: every linear of the model and every block
    of the LM head is released at least once by one forward, and only after it was widened."""
    from gemma2np.kernels import ops_backend

    tied, dirs = checkpoints
    monkeypatch.delenv(CONVERT_ENV, raising=False)
    m = Gemma2ForCausalLM.from_pretrained(dirs["bfloat16"])
    released = []
    real = ops_backend.release_pages
    monkeypatch.setattr(ops_backend, "release_pages", lambda a: (released.append(a), real(a))[1])
    m(input_ids=IDS, attention_mask=MASK)
    spans = {(_mapping_of(a)[1], a.nbytes) for a in released}
    for h in _linears(m):
        off, n = _mapping_of(h.w)[1], h.w.nbytes
        covered = sum(nb for o, nb in spans if off <= o < off + n)
        assert covered >= n, h.w.shape  # the whole tensor (or all of its row blocks) was released


def test_f32_checkpoint_at_float32_stays_zero_copy(tmp_path):
    cfg, state = _state(True)
    Gemma2ForCausalLM(cfg, state).save_pretrained(tmp_path)
    m = Gemma2ForCausalLM.from_pretrained(tmp_path)
    for h in _linears(m):
        assert h.w.dtype == np.float32 and _mapping_of(h.w)[0] is not None
        # linear uses the mapped array itself: astype(copy=False) returns it unchanged
        assert h.w.astype(h.dtype, copy=False) is h.w


def test_gguf_f16_is_streamed_and_bitwise_equal_to_eager(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    cfg, state = _state(True)
    cfg.attention_bias = False
    state = {k: v for k, v in state.items() if not k.endswith(".bias")}
    path = tmp_path / "m-f16.gguf"
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    w = gguf.GGUFWriter(os.fspath(path), "gemma2")
    for add, v in [(w.add_context_length, cfg.max_position_embeddings), (w.add_embedding_length, cfg.hidden_size),
                   (w.add_block_count, cfg.num_hidden_layers), (w.add_feed_forward_length, cfg.intermediate_size),
                   (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                   (w.add_key_length, cfg.head_dim), (w.add_value_length, cfg.head_dim),
                   (w.add_layer_norm_rms_eps, cfg.rms_norm_eps), (w.add_sliding_window, cfg.sliding_window),
                   (w.add_attn_logit_softcapping, cfg.attn_logit_softcapping),
                   (w.add_final_logit_softcapping, cfg.final_logit_softcapping), (w.add_rope_freq_base, cfg.rope_theta)]:
        add(v)
    for k, v in state.items():
        if k in names:
            name = names[k]
        else:
            parts = k.split(".")
            name = f"blk.{parts[2]}.{short['.'.join(parts[3:-1])]}.weight"
        if k.endswith("norm.weight"):
            w.add_tensor(name, v + np.float32(1.0))  # llama.cpp's 1 + w, F32
        else:
            w.add_tensor(name, v.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.delenv(CONVERT_ENV, raising=False)
    streamed = Gemma2ForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, query_pre_attn_scalar=cfg.query_pre_attn_scalar)
    for h in _linears(streamed):
        assert h.w.dtype == np.float16 and _mapping_of(h.w)[0] is not None
    got = _run(streamed)
    monkeypatch.setenv(CONVERT_ENV, "load")
    eager = Gemma2ForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, query_pre_attn_scalar=cfg.query_pre_attn_scalar)
    _assert_bitwise(got, _run(eager))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_linear_is_the_per_block_matmul(dtype):
    """The definition of a blocked head: block r0 of the output = ops.linear(x, W[r0:r0+n] widened, b[r0:r0+n]),
    whatever the shape of x; equal to the full matmul within rounding; one block = the full matmul, bitwise."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((1000, 24)).astype(bfloat16)
    b = rng.standard_normal(1000).astype(np.float32)
    be = ReferenceBackend(np.dtype(dtype).name, convert="use")
    for shape in [(1, 1, 24), (2, 3, 24), (5, 24)]:
        x = rng.standard_normal(shape).astype(dtype)
        h = be.prepare_linear(W, b, row_block=300)
        y = be.linear(x, h)
        Wd, bd = W.astype(dtype), b.astype(dtype)
        want = np.concatenate([ops.linear(x, Wd[r:r + 300], bd[r:r + 300]) for r in range(0, 1000, 300)], axis=-1)
        assert y.dtype == dtype and np.array_equal(y, want)
        np.testing.assert_allclose(y, ops.linear(x, Wd, bd), rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
        one = be.linear(x, be.prepare_linear(W, b, row_block=1000))
        assert np.array_equal(one, ops.linear(x, Wd, bd))


def test_bad_options_are_typed_errors(monkeypatch):
    be = ReferenceBackend()
    for bad in (0, -3, 2.5, True, "8192"):
        with pytest.raises(ValueError, match="row_block"):
            be.prepare_linear(np.zeros((4, 4), np.float32), row_block=bad)
    monkeypatch.setenv(CONVERT_ENV, "sometimes")
    with pytest.raises(BackendError, match=CONVERT_ENV):
        ReferenceBackend()
    with pytest.raises(BackendError, match="convert"):
        ReferenceBackend(convert="never")


# ----------------------------------------------------------------------------------------------- peak memory

_CHILD = textwrap.dedent("""
    import json, sys, threading, time, tracemalloc
    import numpy as np

    def anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise SystemExit("no RssAnon")

    from gemma2np import Gemma2ForCausalLM
    ids = np.arange(1, 17)[None] * 997 % 50000
    base = anon()
    peak = [base]
    done = threading.Event()
    def sample():  # RssAnon every 0.5 ms (a sampler can miss a short peak; tracemalloc below cannot)
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    tracemalloc.start()
    m = Gemma2ForCausalLM.from_pretrained(sys.argv[1])
    held = tracemalloc.get_traced_memory()[0]  # what the loaded model holds (NumPy reports to tracemalloc)
    # the peak of the forward pass alone: the load's traced peak counts reads of JSON files with
    # f.read(limit), which reserves the limit without touching it (not resident; RssAnon covers the load)
    tracemalloc.reset_peak()
    logits = m(input_ids=ids, use_cache=False).logits
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    done.set()
    t.join()
    peak[0] = max(peak[0], anon())
    print(json.dumps({"anon_peak": peak[0] - base, "held": held, "traced_peak": traced_peak, "logits": float(np.abs(logits).sum())}))
""")


def _child(path, env_extra):
    env = {k: v for k, v in os.environ.items() if k != CONVERT_ENV}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **env_extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _CHILD, os.fspath(path)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_memory_of_a_bf16_model_stays_far_below_its_float32_size(tmp_path):
    """~100 M parameters in bf16 (200 MB on disk, 400 MB as float32), tied 50000-row head: one forward of 16
    tokens with backend numpy float32 must stay <= 40% of the float32 size in anonymous memory; the eager
    conversion (the old path) is run too and must exceed it, so this test can fail."""
    from safetensors.numpy import save_file

    cfg = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=50000, hidden_size=1024,
               intermediate_size=4096, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
               head_dim=128, query_pre_attn_scalar=128, sliding_window=8, max_position_embeddings=64,
               final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True,
               dtype="bfloat16")
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (nq * d, h), p + "self_attn.k_proj.weight": (nkv * d, h),
                       p + "self_attn.v_proj.weight": (nkv * d, h), p + "self_attn.o_proj.weight": (h, nq * d),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
        shapes.update({p + n + ".weight": (h,) for n in ("input_layernorm", "post_attention_layernorm",
                                                          "pre_feedforward_layernorm", "post_feedforward_layernorm")})
    rng = np.random.default_rng(0)
    # one shard per tensor group with the safetensors library (bf16 through ml_dtypes)
    groups = [[k for k in shapes if not k.startswith("model.layers.")]] + [
        [k for k in shapes if k.startswith(f"model.layers.{n}.")] for n in range(cfg["num_hidden_layers"])]
    weight_map = {}
    for g, names in enumerate(groups):
        fname = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (rng.standard_normal(shapes[k], dtype=np.float32) * np.float32(0.02)).astype(bfloat16)
                   for k in names}
        save_file(tensors, os.fspath(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    f32_bytes = 4 * n_params
    limit = 0.4 * f32_bytes

    streamed = _child(tmp_path, {})
    eager = _child(tmp_path, {CONVERT_ENV: "load"})
    assert streamed["logits"] == eager["logits"]  # the same forward (bitwise: the same float sum)
    assert streamed["anon_peak"] <= limit, (streamed, f32_bytes)
    assert streamed["traced_peak"] <= limit, (streamed, f32_bytes)  # includes what the model holds
    assert streamed["held"] < 0.01 * f32_bytes, (streamed, f32_bytes)  # no float copy of any weight
    assert eager["anon_peak"] > limit and eager["traced_peak"] > limit, (eager, f32_bytes)
    assert eager["held"] > 0.9 * f32_bytes, (eager, f32_bytes)
