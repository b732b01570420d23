"""The bfloat16 KV cache option (gemma2np/cache.py `dtype=`, from_pretrained(..., cache_dtype=), --cache-dtype;
issue #15 item 2).

Keys and values are rounded to bfloat16 (round to nearest even) when written and update() returns bf16 arrays.
What is checked here:
* the rounding is RNE, recomputed by hand from the float32 bits, and equals ml_dtypes' cast;
* update() returns exactly what the concatenating cache returns when fed the rounded keys (same shapes, order,
  bits), across the window edge, capacity growth, chunked prefills and fresh-array calls;
* a model with a bf16 cache computes exactly what the same model computes on a float32 cache holding the
  rounded (then widened) keys -- "as if widened to float32" -- on every backend, with B > 1, left padding,
  chunked prefill and single-token decode; an explicit float32 cache is bitwise the default one;
* the plumbing: from_pretrained / from_config, generate, a Gemma2Cache passed in, legacy tuples fed back,
  the CLI's --cache-dtype (generate, chat, perplexity), and a typed CacheError for a bad dtype.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import BACKENDS
from gemma2np import Gemma2Cache, Gemma2Config, Gemma2ForCausalLM
from gemma2np.cache import CacheError, check_cache_dtype
from gemma2np.checkpoint import bfloat16
from gemma2np.cli import main as cli_main
from gemma2np import ops
from gemma2np.kernels.ops_backend import ReferenceBackend
from test_cache_prealloc import ConcatCache


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint16 if a.dtype == bfloat16 else np.uint32)


def _same(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    assert np.array_equal(_bits(a), _bits(b)), what


def _rne_by_hand(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 round to nearest, ties to even, on the bits (finite inputs): keep the top 16 bits
    after adding 0x7FFF plus the lowest kept bit."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return r.astype(np.uint16).view(bfloat16)


# ---------------------------------------------------------------------------- the rounding


def test_rounding_is_round_to_nearest_even_as_ml_dtypes():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * np.float32(10.0) ** rng.integers(-8, 8, 20000),
        # exact ties: bf16 value + half an ulp of it, both parities of the kept last bit
        (np.arange(1, 2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32),
        np.array([0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1e-40], np.float32),
    ])
    cache = Gemma2Cache(["full_attention"], None, dtype="bfloat16")
    k = x.reshape(1, 1, -1, 1)
    keys, values, _ = cache.update(k, -k, np.arange(k.shape[2]), 0)
    assert keys.dtype == bfloat16 and values.dtype == bfloat16
    _same(keys.ravel(), _rne_by_hand(x), "RNE by hand")
    _same(keys.ravel(), x.astype(bfloat16), "ml_dtypes' cast")
    _same(values.ravel(), (-x).astype(bfloat16), "values")
    ties = (np.arange(1, 2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    down = _rne_by_hand(ties).view(np.uint16) == (np.arange(1, 2000) & ~1) + (np.arange(1, 2000) & 1) * 2
    assert down.all()  # a tie goes to the even neighbour: n -> n when n is even, n + 1 when odd


# ---------------------------------------------------------------------------- update(), layer by layer

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window=st.sampled_from([None, 1, 2, 3, 5, 8]), chunks=st.lists(st.integers(1, 12), min_size=1, max_size=14),
       hint=st.one_of(st.none(), st.integers(1, 60)), batch=st.integers(1, 2), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_bf16_update_is_the_concatenating_cache_of_the_rounded_keys(window, chunks, hint, batch, seed, dtype):
    types = ["sliding_attention", "full_attention"]
    new, old = Gemma2Cache(types, window, capacity=hint, dtype="bfloat16"), ConcatCache(types, window)
    rng = np.random.default_rng(seed)
    seen = 0
    for t in chunks:
        pos = np.arange(seen, seen + t, dtype=np.int64)
        for i in range(len(types)):
            k, v = (rng.standard_normal((batch, 2, t, 3)).astype(dtype) for _ in range(2))
            got = new.update(k, v, pos, i)
            want = old.update(k.astype(bfloat16), v.astype(bfloat16), pos, i)
            for name, a, b in zip(("keys", "values", "positions"), got, want):
                _same(a, b, f"layer {i} {name} after {seen} + {t}")
        seen += t
        new.seen_tokens = old.seen_tokens = seen
        for i in range(len(types)):
            for name in ("keys", "values", "positions"):
                _same(getattr(new, name)[i], getattr(old, name)[i], f"kept {name}[{i}]")


def test_float32_cache_dtype_keeps_float32_keys_in_place():
    """dtype="float32" on float32 keys: the same arrays as the default cache (no rounding, no copy of the input)."""
    a, b = Gemma2Cache(["full_attention"], None, dtype="float32"), Gemma2Cache(["full_attention"], None)
    k = np.random.default_rng(1).standard_normal((1, 2, 5, 4)).astype(np.float32)
    for x, y in zip(a.update(k, k, np.arange(5), 0), b.update(k, k, np.arange(5), 0)):
        _same(x, y, "float32")
    assert a._k[0].dtype == np.float32


def test_bf16_cache_adopts_a_float_legacy_tuple_rounding_it_when_written():
    types = ["sliding_attention", "full_attention"]
    rng = np.random.default_rng(2)
    legacy = tuple((rng.standard_normal((1, 1, n, 2)).astype(np.float32),) * 2 for n in (3, 5))
    cache = Gemma2Cache.from_legacy_cache(legacy, types, 4, dtype="bfloat16")
    k = rng.standard_normal((1, 1, 1, 2)).astype(np.float32)
    keys, _, pos = cache.update(k, k, np.array([5]), 1)
    _same(keys, np.concatenate([legacy[1][0], k], axis=2).astype(bfloat16), "adopted rows rounded")
    assert legacy[1][0].dtype == np.float32  # the caller's arrays are left alone


# ---------------------------------------------------------------------------- the reference computes from the bf16 keys


def test_reference_attention_widens_bf16_keys_exactly_and_leaves_float32_alone():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 2, 7, 8)).astype(np.float32) for _ in range(2))
    qp, kp = np.arange(4, 7), np.arange(7)
    kv = np.ones((2, 7), bool)
    kv[1, :2] = False
    be = ReferenceBackend()
    kb, vb = k.astype(bfloat16), v.astype(bfloat16)
    got, probs = be.attention(q, kb, vb, qp, kp, kv, 0.35, 5.0, 4, return_probs=True)
    want, wprobs = ops.attention(q, kb.astype(np.float32), vb.astype(np.float32), qp, kp, kv, 0.35, 5.0, 4,
                                 return_probs=True)
    _same(got, want, "bf16 cache = float32 attention of the widened keys")
    _same(probs, wprobs, "probs")
    _same(be.attention(q, k, v, qp, kp, kv, 0.35, 5.0, 4), ops.attention(q, k, v, qp, kp, kv, 0.35, 5.0, 4), "f32")
    assert not np.array_equal(got, ops.attention(q, k, v, qp, kp, kv, 0.35, 5.0, 4))  # the rounding shows


class RoundedFloat32Cache(Gemma2Cache):
    """A float32 cache whose new keys and values are rounded through bfloat16 first (computed by hand from
    the rounded keys): what a bf16 cache must compute, if its backends widen the keys exactly."""

    def update(self, k, v, k_pos, layer_idx):
        r = (lambda a: a.astype(bfloat16).astype(a.dtype))
        return super().update(r(k), r(v), k_pos, layer_idx)


def _config(window, layer_types, kv_heads=2, groups=2):
    return Gemma2Config(
        vocab_size=61, hidden_size=32, intermediate_size=24, num_hidden_layers=len(layer_types),
        num_attention_heads=kv_heads * groups, num_key_value_heads=kv_heads, head_dim=8, sliding_window=window,
        layer_types=list(layer_types), max_position_embeddings=64, query_pre_attn_scalar=8,
        initializer_range=0.4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
    )


_MODELS = {}


def _model(backend, window, types, groups=2, cache_dtype=None):
    key = (backend, window, tuple(types), groups, cache_dtype)
    if key not in _MODELS:
        _MODELS[key] = Gemma2ForCausalLM.from_config(_config(window, types, groups=groups), seed=7, backend=backend,
                                                     cache_dtype=cache_dtype)
    return _MODELS[key]


# the bf16 cache's numerics are defined by the reference; the twins and the native kernel must widen the same
# way (the native kernel today widens a float32 copy; a bf16-reading kernel must give the same bits)
@pytest.mark.parametrize("backend", BACKENDS + ["twins"])
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(window=st.integers(2, 6), prompt=st.integers(1, 12), chunks=st.lists(st.integers(1, 3), max_size=10),
       hint=st.one_of(st.none(), st.integers(1, 40)), batch=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       types=st.sampled_from([("sliding_attention", "full_attention"), ("full_attention", "sliding_attention")]))
def test_bf16_cache_model_is_float32_attention_over_the_rounded_keys(backend, window, prompt, chunks, hint, batch,
                                                                     groups, types):
    model = _model(backend, window, types, groups)
    total = prompt + sum(chunks)
    ids = np.random.default_rng(total).integers(3, 61, size=(batch, total))
    mask = np.ones((batch, total), np.int64)
    if batch == 2 and prompt > 1:
        mask[1, :min(2, prompt - 1)] = 0  # left padding in row 1
    caches = [Gemma2Cache(model.config.layer_types, window, capacity=hint, dtype="bfloat16"),
              RoundedFloat32Cache(model.config.layer_types, window, capacity=hint)]
    start = 0
    for n in [prompt] + chunks:
        end = start + n
        a, b = (model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], past_key_values=c,
                      use_cache=True).logits for c in caches)
        _same(a, b, f"logits of tokens {start}..{end}")
        start = end
    for i in range(len(types)):
        _same(caches[0].keys[i], caches[1].keys[i].astype(bfloat16), f"kept keys {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_float32_cache_dtype_is_bitwise_the_default(backend):
    types = ("sliding_attention", "full_attention")
    a, b = _model(backend, 3, types), _model(backend, 3, types, cache_dtype="float32")
    ids = np.random.default_rng(4).integers(3, 61, size=(2, 6))
    ra, rb = (m.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                         output_logits=True) for m in (a, b))
    np.testing.assert_array_equal(ra.sequences, rb.sequences)
    for x, y in zip(ra.logits, rb.logits):
        _same(x, y, "logits")
    assert rb.past_key_values.dtype == np.float32 and rb.past_key_values._k[0].dtype == np.float32


def test_bf16_cache_on_a_float64_model_rounds_from_float64_and_widens_to_float64():
    """The float64 ground truth with a bf16 cache: keys rounded straight from float64 (ml_dtypes), attention
    in float64 over the widened values -- the float64 model on a cache holding those rounded keys."""
    cfg = _config(3, ["sliding_attention", "full_attention"])
    model = Gemma2ForCausalLM.from_config(cfg, seed=7, dtype="float64")
    ids = np.random.default_rng(8).integers(3, 61, size=(1, 9))
    caches = [Gemma2Cache(cfg.layer_types, 3, dtype="bfloat16"), RoundedFloat32Cache(cfg.layer_types, 3)]
    for a, b in ((0, 5), (5, 6), (6, 7), (7, 9)):
        x, y = (model(input_ids=ids[:, a:b], past_key_values=c, use_cache=True).logits for c in caches)
        assert x.dtype == np.float64
        _same(x, y, f"tokens {a}..{b}")
    assert caches[1]._k[1].dtype == np.float64


def test_reorder_keeps_the_bf16_rows():
    types = ["sliding_attention", "full_attention"]
    new, old = Gemma2Cache(types, 3, capacity=20, dtype="bfloat16"), ConcatCache(types, 3)
    rng = np.random.default_rng(9)
    for s, t in ((0, 5), (5, 1), (6, 1), (7, 1)):
        for i in range(2):
            k = rng.standard_normal((3, 2, t, 2)).astype(np.float32)
            new.update(k, k * 2, np.arange(s, s + t), i)
            old.update(k.astype(bfloat16), (k * 2).astype(bfloat16), np.arange(s, s + t), i)
    new.reorder(np.array([2, 0, 0]))
    old.reorder(np.array([2, 0, 0]))
    k = rng.standard_normal((3, 2, 1, 2)).astype(np.float32)
    for i in range(2):
        for a, b in zip(new.update(k, k, np.array([8]), i), old.update(k.astype(bfloat16), k.astype(bfloat16),
                                                                        np.array([8]), i)):
            _same(a, b, f"after reorder, layer {i}")


# ---------------------------------------------------------------------------- plumbing


def test_generate_and_forward_use_the_models_cache_dtype():
    types = ("sliding_attention", "full_attention")
    m = _model("numpy", 3, types, cache_dtype="bfloat16")
    assert m.cache_dtype == bfloat16 and m.model.cache_dtype == bfloat16
    ids = np.random.default_rng(5).integers(3, 61, size=(1, 5))
    out = m.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    cache = out.past_key_values
    assert cache.dtype == bfloat16 and all(k.dtype == bfloat16 for k in cache.keys)
    # the same run on a float32 model handed an explicit bf16 Gemma2Cache
    plain = _model("numpy", 3, types)
    given_cache = Gemma2Cache(plain.config.layer_types, 3, dtype="bfloat16")
    out2 = plain.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, past_key_values=given_cache,
                          return_dict_in_generate=True)
    np.testing.assert_array_equal(out.sequences, out2.sequences)
    assert out2.past_key_values is given_cache
    # forward(use_cache=True) makes a bf16 cache; the legacy tuple it returns holds bf16 arrays and can be fed back
    first = m(input_ids=ids, use_cache=True)
    legacy = first.past_key_values.to_legacy_cache()
    assert all(k.dtype == bfloat16 and v.dtype == bfloat16 for k, v in legacy)
    nxt = np.array([[9]])
    via_tuple = m(input_ids=nxt, past_key_values=legacy, use_cache=True)
    via_cache = m(input_ids=nxt, past_key_values=first.past_key_values, use_cache=True)
    _same(via_tuple.logits, via_cache.logits, "legacy tuple fed back")
    assert all(k.dtype == bfloat16 for k, _ in via_tuple.past_key_values)


@pytest.mark.parametrize("bad", ["float16", "bf16", "int8", "", 3, np.float16, np.int32, object()])
def test_a_bad_cache_dtype_is_a_cache_error(bad):
    with pytest.raises(CacheError, match="cache_dtype must be 'float32', 'bfloat16' or None"):
        check_cache_dtype(bad)
    with pytest.raises(CacheError, match="cache_dtype must be"):
        Gemma2Cache(["full_attention"], None, dtype=bad)
    with pytest.raises(CacheError, match="cache_dtype must be"):
        Gemma2ForCausalLM.from_config(_config(3, ["full_attention"]), cache_dtype=bad)
    with pytest.raises(CacheError, match="cache_dtype must be"):
        Gemma2ForCausalLM.from_pretrained("/no/such/dir", cache_dtype=bad)  # refused before anything is read


@pytest.mark.parametrize("good,want", [(None, None), ("auto", None), ("float32", np.float32), (np.float32, np.float32),
                                       ("bfloat16", bfloat16), (bfloat16, bfloat16)])
def test_cache_dtype_names(good, want):
    assert check_cache_dtype(good) == (None if want is None else np.dtype(want))


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_cache_dtype(command, capsys, monkeypatch):
    """--cache-dtype reaches from_pretrained (generate and chat); a bad value is argparse's exit 2."""
    seen = {}
    real = Gemma2ForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen["cache_dtype"] = kw.get("cache_dtype")
        return real(*a, **kw)

    monkeypatch.setattr(Gemma2ForCausalLM, "from_pretrained", staticmethod(spy))
    if command == "generate":
        argv = ["generate", "--prompt", "ROMEO:", "--max-new-tokens", "5", "--cache-dtype", "bfloat16"]
    else:
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hello\n"))
        argv = ["chat", "--max-new-tokens", "5", "--cache-dtype", "bfloat16"]
    assert cli_main(argv) == 0
    assert seen["cache_dtype"] == "bfloat16"
    with pytest.raises(SystemExit) as e:
        cli_main([command, "--cache-dtype", "float16"])
    assert e.value.code == 2
    assert "--cache-dtype" in capsys.readouterr().err


def test_cli_perplexity_through_a_bf16_cache(tmp_path):
    """perplexity --cache-dtype runs each window through a cache of that dtype: float32 gives the no-cache
    figures, bfloat16 a small but nonzero KL divergence from them."""
    text = tmp_path / "t.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n" * 6,
                    encoding="utf-8")
    res = {}
    for cd in (None, "float32", "bfloat16"):
        out = tmp_path / f"{cd}.json"
        extra = ["--cache-dtype", cd] if cd else []
        assert cli_main(["perplexity", "--text", str(text), "--ctx", "48", "--max-windows", "2",
                         "--against", "float32", "--json", str(out), *extra]) == 0
        res[cd] = json.loads(out.read_text())
    assert res[None]["kld_max"] == 0.0
    assert abs(res["float32"]["perplexity"] - res[None]["perplexity"]) < 1e-4 * res[None]["perplexity"]
    assert 0 < res["bfloat16"]["kld_mean"] < 1e-3 and res["bfloat16"]["top1"] > 0.9
