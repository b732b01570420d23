"""The preallocated KV cache (gemma2np/cache.py, issue #15 item 1) against the concatenating cache it replaced.

`ConcatCache` below is that old implementation, kept verbatim as the reference: every update must return the
same keys, values and positions -- same shape, dtype, order and bits -- and hold the same contents afterwards,
for any prompt length, chunking, window (across its edge), capacity hint and growth. A model decoding with
either cache must then give bitwise-equal logits on every backend (same inputs to the same attention kernel).
Copies are bounded: with enough capacity a layer that keeps everything is never reallocated and copies no old
row; a sliding layer holds at most 2 (W - 1) rows, copies at most W - 1 old rows in one update (moving its kept
rows to the front) and amortised at most one row per decoded token.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import BACKENDS
from gemma2np import Gemma2Cache, Gemma2Config, Gemma2ForCausalLM
from gemma2np.cache import CacheError


class ConcatCache(Gemma2Cache):
    """The cache before issue #15: concatenate kept + new on every update, then trim a sliding layer."""

    def __init__(self, layer_types, sliding_window, capacity=None, dtype=None):
        super().__init__(layer_types, sliding_window)
        n = len(self.layer_types)
        self._lk, self._lv, self._lp = [None] * n, [None] * n, [None] * n

    keys = property(lambda self: self._lk)
    values = property(lambda self: self._lv)
    positions = property(lambda self: self._lp)

    def layer_shape(self, i):
        return None if self._lk[i] is None else self._lk[i].shape

    def reserve(self, total_tokens):
        pass

    def update(self, k, v, k_pos, layer_idx):
        if self._lk[layer_idx] is None:
            full_k, full_v, full_pos = k, v, k_pos
        else:
            old = self._lk[layer_idx]
            full_k = np.concatenate([old, k.astype(old.dtype, copy=False)], axis=2)
            full_v = np.concatenate([self._lv[layer_idx], v.astype(old.dtype, copy=False)], axis=2)
            full_pos = np.concatenate([self._lp[layer_idx], k_pos])
        if self.is_sliding(layer_idx) and self.sliding_window is not None and self.sliding_window > 1:
            start = max(full_k.shape[2] - (self.sliding_window - 1), 0)
            self._lk[layer_idx] = full_k[:, :, start:]
            self._lv[layer_idx] = full_v[:, :, start:]
            self._lp[layer_idx] = full_pos[start:]
        else:
            self._lk[layer_idx], self._lv[layer_idx], self._lp[layer_idx] = full_k, full_v, full_pos
        return full_k, full_v, full_pos

    def reorder(self, index):
        for i in range(len(self._lk)):
            if self._lk[i] is not None:
                self._lk[i], self._lv[i] = self._lk[i][index], self._lv[i][index]

    def to_legacy_cache(self):
        return tuple(zip(self._lk, self._lv))


def _same(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    assert np.array_equal(a, b), what


def _same_contents(new, old):
    for i in range(len(old)):
        assert new.layer_shape(i) == old.layer_shape(i), i
        for name in ("keys", "values", "positions"):
            a, b = getattr(new, name)[i], getattr(old, name)[i]
            assert (a is None) == (b is None), (name, i)
            if a is not None:
                _same(a, b, f"{name}[{i}]")


# ---------------------------------------------------------------------------- update(), layer by layer

windows = st.sampled_from([None, 1, 2, 3, 4, 5, 8])
chunk_lists = st.lists(st.integers(1, 12), min_size=1, max_size=14)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window=windows, chunks=chunk_lists, hint=st.one_of(st.none(), st.integers(1, 60)),
       batch=st.integers(1, 2), kv=st.integers(1, 2), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_update_returns_what_the_concatenating_cache_returned(window, chunks, hint, batch, kv, seed, dtype):
    """A prefill of any length (past the window too), then chunks or single tokens; with or without a
    capacity hint (growth by doubling, or one allocation): returned arrays and kept contents are identical."""
    types = ["sliding_attention", "full_attention"]
    new, old = Gemma2Cache(types, window, capacity=hint), ConcatCache(types, window)
    rng = np.random.default_rng(seed)
    seen, snapshots = 0, []
    for t in chunks:
        pos = np.arange(seen, seen + t, dtype=np.int64)
        for i in range(len(types)):
            k, v = (rng.standard_normal((batch, kv, t, 3)).astype(dtype) for _ in range(2))
            got, want = new.update(k, v, pos, i), old.update(k.copy(), v.copy(), pos, i)
            for name, a, b in zip(("keys", "values", "positions"), got, want):
                _same(a, b, f"layer {i} {name} after {seen} + {t}")
        seen += t
        new.seen_tokens = old.seen_tokens = seen
        _same_contents(new, old)
        legacy = new.to_legacy_cache()
        snapshots.append(([(k.copy(), v.copy()) for k, v in legacy], legacy))
    # legacy tuples taken earlier still hold what they held (views of rows never rewritten, or copies)
    for frozen, legacy in snapshots:
        for (fk, fv), (k, v) in zip(frozen, legacy):
            _same(k, fk, "legacy keys")
            _same(v, fv, "legacy values")


@settings(max_examples=60, deadline=None)
@given(window=st.integers(2, 9), prompt=st.integers(1, 20), steps=st.integers(1, 60), hint=st.sampled_from([None, 1000]))
def test_sliding_layer_holds_2w_rows_and_copies_one_row_per_token(window, prompt, steps, hint):
    """A sliding layer never allocates more than 2 (W - 1) rows, copies at most W - 1 old rows in one update,
    and over `steps` decoded tokens at most steps + W - 1 old rows in total when its buffer is allocated
    once (the hint), plus at most 3 (W - 1) for growth without one (doubling, then once to 2 (W - 1)). The W - 1 ring buffer it
    replaces copied W - 1 rows on every step once it had wrapped."""
    cache = Gemma2Cache(["sliding_attention"], window, capacity=hint)
    keep = window - 1
    rng = np.random.default_rng(prompt)
    seen = 0
    for t in [prompt] + [1] * steps:
        before = cache.rows_copied
        k = rng.standard_normal((1, 1, t, 2)).astype(np.float32)
        keys, _, pos = cache.update(k, k, np.arange(seen, seen + t, dtype=np.int64), 0)
        seen += t
        assert cache._k[0].shape[2] <= 2 * keep
        assert cache.rows_copied - before <= keep
        np.testing.assert_array_equal(pos, np.arange(seen - keys.shape[2], seen))
        assert keys.shape[2] == min(seen, keep + t)
        np.testing.assert_array_equal(keys[0, 0, -t:], k[0, 0])  # the new rows, last, in order
    assert cache.rows_copied <= steps + keep + (0 if hint else 3 * keep)
    np.testing.assert_array_equal(cache.positions[0], np.arange(seen - min(seen, keep), seen))


@pytest.mark.parametrize("window", [2, 3, 17])
def test_amortised_copies_tend_to_one_row_per_token(window):
    """Many decode steps: rows copied per token -> 1 (one move of W - 1 rows every W - 1 steps), and the returned
    keys are views of the buffer on every step (no per-step copy of the window)."""
    keep = window - 1
    cache = Gemma2Cache(["sliding_attention"], window, capacity=4096)
    one = np.ones((2, 2, 1, 4), np.float32)
    cache.update(np.ones((2, 2, 5, 4), np.float32), np.ones((2, 2, 5, 4), np.float32), np.arange(5), 0)
    steps = 50 * keep
    for s in range(5, 5 + steps):
        keys, values, pos = cache.update(one * s, one * -s, np.array([s]), 0)
        assert np.shares_memory(keys, cache._k[0]) and np.shares_memory(values, cache._v[0])
        assert keys[0, 0, -1, 0] == s and pos[-1] == s and keys.shape[2] == min(s + 1, keep + 1)
    assert steps - keep <= cache.rows_copied <= steps + keep


@pytest.mark.parametrize("window", [2, 3, 5])
@pytest.mark.parametrize("hint", [None, 7, 100])
def test_sweep_prefill_sizes_and_chunks_across_the_window_edge(window, hint):
    """Every prefill length from 1 to 2 W + 3, then 3 W tokens in chunks of 1, 2, W - 1, W and 2 W + 1 (single
    steps, chunked prefill, calls bigger than the buffer), batch 2: every update returns what the concatenating
    cache returned and the kept contents agree after each call."""
    types = ["sliding_attention", "full_attention"]
    rng = np.random.default_rng(window)
    for prefill in range(1, 2 * window + 4):
        for chunk in sorted({1, 2, max(window - 1, 1), window, 2 * window + 1}):
            new, old = Gemma2Cache(types, window, capacity=hint), ConcatCache(types, window)
            seen = 0
            for t in [prefill] + [chunk] * (3 * window // chunk + 1):
                pos = np.arange(seen, seen + t, dtype=np.int64)
                for i in range(2):
                    k, v = (rng.standard_normal((2, 1, t, 2)).astype(np.float32) for _ in range(2))
                    for name, a, b in zip(("keys", "values", "positions"), new.update(k, v, pos, i),
                                          old.update(k.copy(), v.copy(), pos, i)):
                        _same(a, b, f"prefill {prefill}, chunk {chunk}: layer {i} {name} after {seen} + {t}")
                seen += t
                new.seen_tokens = old.seen_tokens = seen
                _same_contents(new, old)
                assert new._k[0].shape[2] <= max(2 * (window - 1), 1)


@pytest.mark.parametrize("window", [None, 1, 4])
def test_enough_capacity_means_no_reallocation_and_no_copy(window):
    """A layer that keeps everything, with a capacity hint: one buffer for the whole run, the returned keys
    are views of it, and not one old row is copied (the concatenating cache copied the whole cache per step)."""
    cache = Gemma2Cache(["full_attention", "sliding_attention"], window, capacity=64)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 2, 9, 4)).astype(np.float32)
    cache.update(k, k, np.arange(9), 0)
    buf = cache._k[0]
    for s in range(9, 64):
        k = rng.standard_normal((2, 2, 1, 4)).astype(np.float32)
        keys, values, _ = cache.update(k, k, np.array([s]), 0)
        assert cache._k[0] is buf and np.shares_memory(keys, buf) and keys.shape[2] == s + 1
    assert cache.rows_copied == 0


def test_growth_by_doubling_copies_amortised_linear():
    """Without a hint, capacity doubles: 1000 single-token updates copy 1 + 2 + ... + 512 = 1023 old rows in
    total, under 2 per token (the concatenating cache copied ~500,000), in 10 reallocations."""
    cache = Gemma2Cache(["full_attention"], None)
    one = np.ones((1, 1, 1, 2), np.float32)
    buf, reallocations = None, 0
    for s in range(1000):
        cache.update(one * s, one, np.array([s]), 0)
        if cache._k[0] is not buf:
            buf, reallocations = cache._k[0], reallocations + 1
    assert cache.rows_copied == 1023 and reallocations == 1 + 10  # the first allocation, then 10 doublings
    np.testing.assert_array_equal(cache.keys[0][0, 0, :, 0], np.arange(1000))


def test_legacy_arrays_are_never_written_into():
    """from_legacy_cache adopts the caller's arrays without a copy; decoding on must not change them (a full
    sliding ring would otherwise be overwritten in place)."""
    types = ["sliding_attention", "full_attention"]
    rng = np.random.default_rng(1)
    ks = [rng.standard_normal((1, 1, n, 2)).astype(np.float32) for n in (3, 7)]
    legacy = tuple((k, k + 1) for k in ks)
    frozen = [(k.copy(), v.copy()) for k, v in legacy]
    cache = Gemma2Cache.from_legacy_cache(legacy, types, 4)
    ref = ConcatCache.from_legacy_cache(legacy, types, 4)
    ref._lk, ref._lv, ref._lp = list(ref._k), list(ref._v), list(ref._p)  # (built by the parent, with its fields)
    for s in range(7, 15):
        k = rng.standard_normal((1, 1, 1, 2)).astype(np.float32)
        for i in range(2):
            for a, b in zip(cache.update(k, k, np.array([s]), i), ref.update(k, k, np.array([s]), i)):
                _same(a, b, "after a legacy tuple")
    for (fk, fv), (k, v) in zip(frozen, legacy):
        _same(k, fk, "legacy keys")
        _same(v, fv, "legacy values")


def test_mixed_dtypes_follow_the_old_concatenation():
    """Legacy float32 keys with float64 values (odd, but accepted): new values are cast to the keys' dtype
    and the values buffer takes the concatenation's dtype, as before."""
    types = ["full_attention", "sliding_attention"]
    legacy = tuple((np.ones((1, 1, 2, 2), np.float32), np.ones((1, 1, 2, 2), np.float64) / 3) for _ in types)
    new = Gemma2Cache.from_legacy_cache(legacy, types, 3)
    old = ConcatCache.from_legacy_cache(legacy, types, 3)
    old._lk, old._lv, old._lp = list(old._k), list(old._v), list(old._p)
    v = np.full((1, 1, 1, 2), 1 / 7, np.float64)
    for i in range(2):
        for a, b in zip(new.update(v, v, np.array([2]), i), old.update(v, v, np.array([2]), i)):
            _same(a, b, f"layer {i}")


def test_reorder_selects_batch_rows_like_before():
    types = ["sliding_attention", "full_attention"]
    new, old = Gemma2Cache(types, 3, capacity=20), ConcatCache(types, 3)
    rng = np.random.default_rng(2)
    for s, t in ((0, 5), (5, 1), (6, 1)):
        for i in range(2):
            k = rng.standard_normal((3, 2, t, 2)).astype(np.float32)
            new.update(k, k * 2, np.arange(s, s + t), i)
            old.update(k, k * 2, np.arange(s, s + t), i)
    for index in (np.array([2, 0, 0]), np.array([True, False, True])):
        new.reorder(index)
        old.reorder(index)
        _same_contents(new, old)
    k = rng.standard_normal((2, 2, 1, 2)).astype(np.float32)
    for i in range(2):
        for a, b in zip(new.update(k, k, np.array([7]), i), old.update(k, k, np.array([7]), i)):
            _same(a, b, "after reorder")


def test_shape_mismatch_is_a_cache_error_and_changes_nothing():
    cache = Gemma2Cache(["full_attention"], None)
    cache.update(np.ones((1, 2, 3, 4)), np.ones((1, 2, 3, 4)), np.arange(3), 0)
    with pytest.raises(CacheError, match=r"cached keys have shape \(1, 2, 3, 4\)"):
        cache.update(np.ones((2, 2, 1, 4)), np.ones((2, 2, 1, 4)), np.array([3]), 0)
    assert cache.layer_shape(0) == (1, 2, 3, 4)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "8"])
def test_capacity_must_be_a_positive_int(bad):
    with pytest.raises(CacheError, match="capacity must be a positive integer"):
        Gemma2Cache(["full_attention"], None, capacity=bad)
    with pytest.raises(CacheError, match="capacity must be a positive integer"):
        Gemma2Cache(["full_attention"], None).reserve(bad)


# ---------------------------------------------------------------------------- the model on either cache


def _config(window, layer_types):
    return Gemma2Config(
        vocab_size=61, hidden_size=32, intermediate_size=24, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=window,
        layer_types=list(layer_types), max_position_embeddings=64, query_pre_attn_scalar=8,
        initializer_range=0.4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
    )


_MODELS = {}


def _model(backend, dtype, window, types):
    key = (backend, dtype, window, tuple(types))
    if key not in _MODELS:
        _MODELS[key] = Gemma2ForCausalLM.from_config(_config(window, types), seed=7, backend=backend, dtype=dtype)
    return _MODELS[key]


RUNS = [(b, "float32") for b in BACKENDS + ["twins"]] + [("numpy", "float64")]


@pytest.mark.parametrize("backend,dtype", RUNS)
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(window=st.integers(2, 6), prompt=st.integers(1, 12), chunks=st.lists(st.integers(1, 3), max_size=10),
       hint=st.one_of(st.none(), st.integers(1, 40)), batch=st.integers(1, 2),
       types=st.sampled_from([("sliding_attention", "full_attention"), ("full_attention", "sliding_attention"),
                              ("sliding_attention", "sliding_attention", "full_attention")]))
def test_decoding_is_bitwise_the_concatenating_caches(backend, dtype, window, prompt, chunks, hint, batch, types):
    """Prefill then chunks / single tokens, across the window edge and capacity growth: logits equal bit for
    bit to the same model on the old cache (the attention kernels see the same keys in the same order)."""
    model = _model(backend, dtype, window, types)
    total = prompt + sum(chunks)
    ids = np.random.default_rng(total).integers(3, 61, size=(batch, total))
    mask = np.ones((batch, total), np.int64)
    if batch == 2:
        mask[1, :min(2, prompt - 1) if prompt > 1 else 0] = 0  # some left padding in row 1
    caches = [Gemma2Cache(model.config.layer_types, window, capacity=hint),
              ConcatCache(model.config.layer_types, window)]
    start = 0
    for n in [prompt] + chunks:
        end = start + n
        a, b = (model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], past_key_values=c,
                      use_cache=True).logits for c in caches)
        _same(a, b, f"logits of tokens {start}..{end}")
        start = end
    _same_contents(*caches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_allocates_max_length_once(backend):
    """generate() passes max_length as the capacity hint: each global layer is allocated once for it and no
    old row is copied while decoding (sliding layers stay at W - 1), and the greedy tokens equal those
    decoded without any cache."""
    model = _model(backend, "float32", 4, ("sliding_attention", "full_attention"))
    ids = np.random.default_rng(3).integers(3, 61, size=(1, 6))
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    cache = out.past_key_values
    assert cache._k[1].shape[2] == 18 and cache._k[0].shape[2] == 6  # 2 (W - 1) rows on the sliding layer
    full_copies = cache.rows_copied
    no_cache = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, use_cache=False)
    np.testing.assert_array_equal(out.sequences, no_cache)
    assert cache.layer_shape(1) == (1, 2, 17, 8)
    # only the sliding layer moved old rows (its W - 1 = 3 kept rows to the front, once every 3 steps)
    assert full_copies <= 12 + 3


def test_a_reused_cache_grows_once_to_the_next_max_length():
    """A chat's next turn (generate with past_key_values) reserves its max_length: the global layer grows once
    to it, and the tokens equal those of a fresh generate over the whole sequence."""
    model = _model("numpy", "float32", 4, ("sliding_attention", "full_attention"))
    ids = np.random.default_rng(4).integers(3, 61, size=(1, 5))
    first = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    cache = first.past_key_values
    assert cache._k[1].shape[2] == 9
    turn = np.concatenate([first.sequences, [[7, 8, 9]]], axis=1)  # 12 tokens, 8 of them cached
    second = model.generate(turn, max_new_tokens=10, do_sample=False, eos_token_id=None, past_key_values=cache,
                            return_dict_in_generate=True)
    assert second.past_key_values is cache and cache._k[1].shape[2] == 22 and cache.layer_shape(1)[2] == 21
    fresh = model.generate(turn, max_new_tokens=10, do_sample=False, eos_token_id=None)
    np.testing.assert_array_equal(second.sequences, fresh)


@pytest.mark.parametrize("backend", BACKENDS + ["twins"])
@pytest.mark.parametrize("kv_heads,groups", [(1, 1), (2, 2)])
def test_longer_decode_at_a_wider_head_is_bitwise_the_same(backend, kv_heads, groups):
    """head_dim 64, a 40-token window, 100 tokens decoded one by one after a 30-token prefill (crossing the
    window edge, ring wrap-around and three capacity doublings): bitwise-equal logits on the old cache. With
    one kv head per query head the reference attention multiplies the cache views themselves (no repeat_kv copy)."""
    cfg = Gemma2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=kv_heads * groups, num_key_value_heads=kv_heads, head_dim=64, sliding_window=40,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, query_pre_attn_scalar=64,
        initializer_range=0.2, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM.from_config(cfg, seed=1, backend=backend)
    ids = np.random.default_rng(5).integers(3, 97, size=(1, 130))
    caches = [Gemma2Cache(cfg.layer_types, 40), ConcatCache(cfg.layer_types, 40)]
    a, b = (model(input_ids=ids[:, :30], past_key_values=c, use_cache=True).logits for c in caches)
    _same(a, b, "prefill")
    for t in range(30, 130):
        a, b = (model(input_ids=ids[:, t:t + 1], past_key_values=c, use_cache=True).logits for c in caches)
        _same(a, b, f"token {t}")
    assert caches[0]._k[1].shape[2] == 30 * 8 and caches[0]._k[0].shape[2] == 2 * 39
