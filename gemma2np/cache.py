"""The KV cache, shaped like transformers' cache for Gemma 2.

Each layer keeps the keys (after RoPE) and values it has seen, with the absolute position
(`cache_position`) of each. Global ("full_attention") layers keep the whole context. Sliding
layers keep at most `sliding_window - 1` positions between calls -- the same as transformers'
`DynamicSlidingWindowLayer` -- because the next query needs only the previous W - 1 keys plus
itself. During one call a sliding layer attends over (kept keys + new keys); the window rule in
`ops.visible_keys` then decides what each query sees.

Storage (issue #15): nothing is concatenated per step. A layer that keeps everything writes the new
rows in place into a preallocated buffer (B, K, capacity, D) -- capacity doubles when it runs out,
or is set once from a hint (`capacity=`, `reserve()`; generate() passes max_length) -- and attention
gets a view of the filled part. A sliding layer keeps its rows *contiguous and in positional order*
in a buffer of up to 2 (W - 1) rows: the new rows are written right after the kept ones, update()
returns a view of kept + new, and the kept window then just slides forward (its start advances).
When the new rows no longer fit behind it, the W - 1 kept rows move to the front once: with 2 (W - 1)
rows that is one move of W - 1 rows every W - 1 decode steps, i.e. amortised one row per token, where
a ring buffer of exactly W - 1 rows had to copy W - 1 rows per token to hand them over in order. Order
matters: the attention is a softmax-weighted sum over the keys, so another key order would change the
float32 summation order (and the bits). What update() returns is always exactly what the concatenating
cache returned: kept + new keys, in positional order, same shape and values (`rows_copied` counts the
old rows moved or copied; a call bringing more than W - 1 + W - 1 rows gets a fresh array instead).

dtype (cache_dtype, issue #15 item 2): None keeps the keys in the dtype they arrive in (the model's
compute dtype: float32, or float64). "bfloat16" rounds keys and values to bfloat16 when they are written
(round to nearest even: ml_dtypes' float -> bfloat16 cast) and update() returns bfloat16 arrays: every
key the attention sees, the new ones included, is the stored bf16 value (llama.cpp's f16 cache works
the same way), and the backends widen them exactly to float32 (docs/precision.md, "KV cache dtype").

The legacy format -- a tuple with one `(keys, values)` pair per layer, arrays of shape
(B, K, L, D) -- is accepted as `past_key_values` and returned in kind.
"""

from __future__ import annotations

import numpy as np

from .checkpoint import bfloat16


class CacheError(ValueError):
    pass


# cache_dtype names -> dtype; None means "as the keys arrive" (the model's compute dtype)
CACHE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": bfloat16}


def check_cache_dtype(dtype) -> np.dtype | None:
    """A cache dtype: None (or "auto") -> None; "float32" / "bfloat16" (names or dtypes) -> the dtype;
    anything else a CacheError naming the choices."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    if isinstance(dtype, str):
        if dtype in CACHE_DTYPES:
            return CACHE_DTYPES[dtype]
    else:
        try:
            dt = np.dtype(dtype)
        except (TypeError, ValueError):
            dt = None
        if dt is not None and dt in CACHE_DTYPES.values():
            return dt
    raise CacheError(f"cache_dtype must be 'float32', 'bfloat16' or None (the model's dtype), got {dtype!r:.40}")


def _check_capacity(capacity):
    """A capacity hint: None or a positive int (a bool or anything else is a CacheError)."""
    if capacity is None:
        return None
    if isinstance(capacity, (bool, np.bool_)) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise CacheError(f"capacity must be a positive integer or None, got {capacity!r:.40}")
    return int(capacity)


class Gemma2Cache:
    """Per-layer key/value store.  keys/values[i]: (B, K, L_i, D); positions[i]: (L_i,) int64.

    capacity: an optional hint, the total number of tokens this cache will hold (generate() passes
    max_length): global layers allocate that many rows at their first update instead of growing by
    doubling; sliding layers never hold more than 2 (sliding_window - 1). np.empty leaves untouched
    rows unbacked by memory, so a generous hint costs address space, not RSS.

    dtype: None (default: keys and values stay in the dtype they arrive in), "float32" or "bfloat16"
    (rounded when written, see the module docstring). transformers' StaticCache takes its dtype the
    same way; models take it as from_pretrained(..., cache_dtype=...).

    keys / values / positions are built on access, in positional order: views of the filled rows for a
    layer that keeps everything, copies for a sliding layer (its buffer is rewritten later); either way
    they stay valid as the cache moves on. update()'s arrays are views (no copy) and are meant for the
    call that made them: a sliding layer's rows are moved later. For shapes alone use layer_shape(i),
    which builds nothing."""

    def __init__(self, layer_types, sliding_window: int | None, capacity: int | None = None, dtype=None):
        self.layer_types = list(layer_types)
        self.sliding_window = sliding_window
        self.capacity = _check_capacity(capacity)
        self.dtype = check_cache_dtype(dtype)
        n = len(self.layer_types)
        # per layer: key / value / position buffers (None until the first update), rows kept, first kept row
        self._k: list[np.ndarray | None] = [None] * n
        self._v: list[np.ndarray | None] = [None] * n
        self._p: list[np.ndarray | None] = [None] * n
        self._n = [0] * n
        self._start = [0] * n  # always 0 on a layer that keeps everything
        # False for arrays adopted from a legacy tuple: they belong to the caller and are never written into
        self._owned = [True] * n
        self.seen_tokens = 0  # tokens processed so far (transformers: get_seq_length())
        self.rows_copied = 0  # rows of old keys copied by update() (growth, sliding moves): a cost counter

    # transformers-style accessors
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return len(self.layer_types)

    def is_sliding(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == "sliding_attention"

    def reserve(self, total_tokens: int | None) -> None:
        """Capacity hint for later updates (e.g. a chat's next generate() call): grow once to it, not by doubling."""
        total_tokens = _check_capacity(total_tokens)
        if total_tokens is not None:
            self.capacity = max(self.capacity or 0, total_tokens)

    def _keep(self, i: int) -> int | None:
        """Rows layer i keeps between calls: sliding_window - 1 on a sliding layer, None (all) otherwise.

        sliding_window == 1 keeps every key: transformers trims with `keys[:, :, -W + 1:]`, which for W = 1
        is `keys[:, :, 0:]` (see model/decoder.py, layer_visibility, for what its decode steps then attend to)."""
        if self.is_sliding(i) and self.sliding_window is not None and self.sliding_window > 1:
            return self.sliding_window - 1
        return None

    def layer_shape(self, i: int) -> tuple | None:
        """(B, K, L, D) of what layer i holds, or None when it is empty -- without building the arrays."""
        k = self._k[i]
        return None if k is None else (k.shape[0], k.shape[1], self._n[i], k.shape[3])

    # ------------------------------------------------------------------------------ contents
    def _ordered(self, buf: np.ndarray | None, i: int) -> np.ndarray | None:
        """Layer i's rows of buf in positional order (axis -2 for keys/values, axis 0 for positions).

        A layer that keeps everything: a view of the filled part (rows there are never written again, so
        the view stays valid). A sliding layer: a copy, since its rows move to the front later."""
        if buf is None:
            return None
        a, b = self._start[i], self._start[i] + self._n[i]
        rows = buf[a:b] if buf.ndim == 1 else buf[:, :, a:b]
        return rows if self._keep(i) is None else rows.copy()

    @property
    def keys(self) -> list:
        return [self._ordered(b, i) for i, b in enumerate(self._k)]

    @property
    def values(self) -> list:
        return [self._ordered(b, i) for i, b in enumerate(self._v)]

    @property
    def positions(self) -> list:
        return [self._ordered(b, i) for i, b in enumerate(self._p)]

    # ------------------------------------------------------------------------------ update
    def _realloc(self, i: int, new_cap: int, like_k: np.ndarray, kdtype, vdtype) -> None:
        """New buffers of new_cap rows for layer i; its kept rows are copied to the front (counted), start 0."""
        k, n, a = self._k[i], self._n[i], self._start[i]
        B, K, _, D = like_k.shape if k is None else k.shape
        nk = np.empty((B, K, new_cap, D), kdtype)
        nv = np.empty((B, K, new_cap, D), vdtype)
        npos = np.empty(new_cap, np.int64)
        if n:
            # (into a bf16 cache this rounds rows adopted from a float legacy tuple: they are written into it)
            nk[:, :, :n] = k[:, :, a:a + n]
            nv[:, :, :n] = self._v[i][:, :, a:a + n]
            npos[:n] = self._p[i][a:a + n]
            self.rows_copied += n
        self._k[i], self._v[i], self._p[i], self._owned[i], self._start[i] = nk, nv, npos, True, 0

    def _usable(self, i: int, kdtype, vdtype) -> bool:
        """Layer i's buffers exist, are ours to write, and have the dtypes this update writes."""
        return (self._k[i] is not None and self._owned[i] and self._k[i].dtype == kdtype
                and self._v[i].dtype == vdtype)

    def _dtypes(self, i: int, k: np.ndarray, v: np.ndarray):
        """(kdtype, vdtype) of layer i after this update, checking the new keys fit the cached ones.

        With a cache dtype both are it. Without one, the values of the concatenating cache this replaces:
        the kept rows' dtype wins (new keys and values are cast to the keys' dtype, as
        `np.concatenate([old, k.astype(old.dtype)])` did), and values take the dtype that concatenation gave."""
        old = self._k[i]
        if old is not None and (old.shape[0] != k.shape[0] or old.shape[1] != k.shape[1] or old.shape[3] != k.shape[3]):
            raise CacheError(
                f"layer {i}: cached keys have shape {self.layer_shape(i)}, new keys {k.shape}: batch size, "
                "kv heads and head_dim must match the cache"
            )
        if self.dtype is not None:
            return self.dtype, self.dtype
        if old is None:
            return k.dtype, v.dtype
        return old.dtype, np.result_type(self._v[i].dtype, old.dtype)

    def update(self, k: np.ndarray, v: np.ndarray, k_pos: np.ndarray, layer_idx: int):
        """Append new keys/values (B, K, T, D) at positions k_pos (T,); return everything this call attends to:
        (keys, values, positions) = kept + new, in positional order. Then a sliding layer keeps its last W - 1.

        The values are those of the concatenating cache this replaces, bit for bit (see _dtypes; with a
        cache dtype, the new rows rounded to it)."""
        i = layer_idx
        kdtype, vdtype = self._dtypes(i, k, v)
        if self.dtype is not None or self._k[i] is not None:
            # (to bfloat16: ml_dtypes' cast, round to nearest even; to float32 from float32: no copy)
            k, v = k.astype(kdtype, copy=False), v.astype(kdtype, copy=False)
        T = k.shape[2]
        n, keep = self._n[i], self._keep(i)
        need = n + T
        if keep is None:
            # a layer that keeps everything: grow (capacity max(need, 2 x old, hint); amortised O(1) rows
            # copied per token), write the new rows after the kept ones, return views of the filled part
            cap = 0 if self._k[i] is None else self._k[i].shape[2]
            if need > cap or not self._usable(i, kdtype, vdtype):
                self._realloc(i, max(need, 2 * cap, self.capacity or 0), k, kdtype, vdtype)
            return self._write(i, 0, n, k, v, k_pos)
        if need > 2 * keep:
            return self._fresh(i, k, v, k_pos, kdtype, vdtype)
        # a sliding layer: kept rows [start, start + n) are contiguous and in order; write the new ones behind
        cap = 0 if self._k[i] is None else self._k[i].shape[2]
        if need > cap or not self._usable(i, kdtype, vdtype):
            # grow by doubling (or to the hint) up to 2 (W - 1) rows: room for W - 1 steps past the window
            self._realloc(i, max(need, min(max(2 * cap, self.capacity or 0), 2 * keep)), k, kdtype, vdtype)
        elif self._start[i] + need > cap and cap < 2 * keep:
            # no room behind the kept rows of a buffer smaller than 2 (W - 1): grow it to that once (moving
            # the kept rows as a move to the front would), so that moves then come once per W - 1 new rows
            self._realloc(i, 2 * keep, k, kdtype, vdtype)
        elif self._start[i] + need > cap:
            # no room behind the kept rows: move them to the front, once per (cap - W + 1) >= W - 1 new rows
            a = self._start[i]
            for buf in (self._k[i], self._v[i]):
                buf[:, :, :n] = buf[:, :, a:a + n]  # (numpy copies through a buffer if the ranges overlap)
            self._p[i][:n] = self._p[i][a:a + n]
            self._start[i] = 0
            self.rows_copied += n
        out = self._write(i, self._start[i], n, k, v, k_pos)
        drop = max(0, need - keep)  # the window slides: the oldest rows fall out of what is kept
        self._start[i] += drop
        self._n[i] = need - drop
        return out

    def _write(self, i: int, a: int, n: int, k, v, k_pos):
        """Write the T new rows after layer i's n kept rows at buffer row a; return views of kept + new."""
        b = a + n + k.shape[2]
        kb, vb, pb = self._k[i], self._v[i], self._p[i]
        kb[:, :, a + n:b] = k
        vb[:, :, a + n:b] = v
        pb[a + n:b] = k_pos
        self._n[i] = b - a
        return kb[:, :, a:b], vb[:, :, a:b], pb[a:b]

    def _fresh(self, i: int, k, v, k_pos, kdtype, vdtype):
        """A sliding-layer call bringing more rows than 2 (W - 1) - kept (a long prefill): kept + new as a fresh
        array (the new arrays themselves when nothing is kept), then the last W - 1 rows into the buffer."""
        n, keep, a = self._n[i], self._keep(i), self._start[i]
        if n == 0:
            full_k, full_v, full_p = k, v, k_pos
        else:
            shape = k.shape[:2] + (n + k.shape[2],) + k.shape[3:]
            full_k, full_v, full_p = np.empty(shape, kdtype), np.empty(shape, vdtype), np.empty(shape[2], np.int64)
            full_k[:, :, :n], full_v[:, :, :n], full_p[:n] = (
                self._k[i][:, :, a:a + n], self._v[i][:, :, a:a + n], self._p[i][a:a + n])
            full_k[:, :, n:], full_v[:, :, n:], full_p[n:] = k, v, k_pos
            self.rows_copied += n
        cap = 0 if self._k[i] is None else self._k[i].shape[2]
        if cap < keep or not self._usable(i, kdtype, vdtype):
            self._n[i] = 0  # (nothing to carry over: the tail below replaces it)
            # room for W - 1 decode steps behind the kept rows (or what the hint says will come)
            self._realloc(i, min(2 * keep, max(keep, self.capacity or 2 * keep)), full_k, kdtype, vdtype)
        tail = full_k.shape[2] - keep
        self._k[i][:, :, :keep] = full_k[:, :, tail:]
        self._v[i][:, :, :keep] = full_v[:, :, tail:]
        self._p[i][:keep] = full_p[tail:]
        self._start[i], self._n[i] = 0, keep
        return full_k, full_v, full_p

    def reorder(self, index: np.ndarray) -> None:
        """Select / reorder batch rows (beam search style)."""
        for i in range(len(self._k)):
            if self._k[i] is not None:
                # only the filled rows are copied (capacity hint rows stay unbacked), to the front of a buffer
                # of the same capacity
                a, n, cap = self._start[i], self._n[i], self._k[i].shape[2]
                bufs = []
                for buf in (self._k[i], self._v[i]):
                    rows = buf[:, :, a:a + n][index]
                    new = np.empty(rows.shape[:2] + (cap,) + rows.shape[3:], rows.dtype)
                    new[:, :, :n] = rows
                    bufs.append(new)
                pos = np.empty(cap, np.int64)
                pos[:n] = self._p[i][a:a + n]
                self._k[i], self._v[i], self._p[i] = bufs[0], bufs[1], pos
                self._start[i], self._owned[i] = 0, True

    # ---------------------------------------------------------------- legacy tuple format
    def to_legacy_cache(self) -> tuple:
        """((keys, values), ...) per layer, (B, K, L_i, D) in positional order. The arrays stay valid as the
        cache moves on (views of rows never written again, or copies of a sliding layer's rows)."""
        return tuple(zip(self.keys, self.values))

    @classmethod
    def from_legacy_cache(cls, past, layer_types, sliding_window, dtype=None) -> "Gemma2Cache":
        """Rebuild from ((k, v), ...) per layer. The number of tokens seen is read from a global layer
        (it holds them all); a sliding layer holds the last min(seen, W - 1) of them. dtype: the cache dtype
        (see Gemma2Cache); the adopted rows are converted to it when the first update copies them."""
        if not isinstance(past, (tuple, list)) or len(past) != len(layer_types):
            n = len(past) if isinstance(past, (tuple, list)) else type(past).__name__
            raise CacheError(f"past_key_values must hold one (keys, values) pair per layer ({len(layer_types)}), got {n}")
        cache = cls(layer_types, sliding_window, dtype=dtype)
        lengths = []
        for i, pair in enumerate(past):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise CacheError(f"past_key_values[{i}] must be a (keys, values) pair")
            k, v = (np.asarray(a) for a in pair)
            if k.ndim != 4 or k.shape != v.shape:
                raise CacheError(f"past_key_values[{i}]: keys {k.shape} and values {v.shape} must both be (B, K, L, D)")
            lengths.append(k.shape[2])
        full = [n for n, t in zip(lengths, layer_types) if t != "sliding_attention"]
        if not full and sliding_window is not None and max(lengths) >= sliding_window - 1:
            # every layer slides and holds a full window: the tuple no longer says how many tokens were seen,
            # and guessing would put the next tokens at wrong positions (silently wrong RoPE / window)
            raise CacheError(
                "past_key_values: every layer is sliding and holds sliding_window - 1 positions, so the number of "
                "tokens already seen cannot be recovered from a legacy tuple; pass the Gemma2Cache instead"
            )
        seen = full[0] if full else max(lengths)
        if any(n != seen for n in full):
            raise CacheError(f"global layers of past_key_values disagree on the cached length: {sorted(set(full))}")
        for i, (k, v) in enumerate(past):
            n = lengths[i]
            if layer_types[i] == "sliding_attention" and n > seen:
                raise CacheError(f"past_key_values[{i}] (sliding) holds {n} positions but only {seen} were seen")
            if layer_types[i] != "sliding_attention" and n != seen:
                raise CacheError(f"past_key_values[{i}] holds {n} positions, expected {seen}")
            # adopted without a copy; update() never writes into them (it reallocates first, see _owned)
            cache._k[i], cache._v[i] = np.asarray(k), np.asarray(v)
            cache._p[i] = np.arange(seen - n, seen, dtype=np.int64)
            cache._n[i], cache._owned[i] = n, False
        cache.seen_tokens = seen
        return cache
