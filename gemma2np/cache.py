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
gets a view of the filled part. A sliding layer grows the same way up to W - 1 rows, then becomes a
ring buffer of exactly W - 1 rows. What update() returns is always exactly what the concatenating
cache returned: kept + new keys, in positional order, same shape and values. Order matters: the
attention is a softmax-weighted sum over the keys, so another key order would change the float32
summation order (and the bits). Once a ring has wrapped, that order is restored by a copy of the
kept W - 1 rows into the returned array (the only per-step copy; `rows_copied` counts them).

The legacy format -- a tuple with one `(keys, values)` pair per layer, arrays of shape
(B, K, L, D) -- is accepted as `past_key_values` and returned in kind.
"""

from __future__ import annotations

import numpy as np


class CacheError(ValueError):
    pass


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
    doubling; sliding layers never hold more than sliding_window - 1. np.empty leaves untouched rows
    unbacked by memory, so a generous hint costs address space, not RSS.

    keys / values / positions are built on access, in positional order: views of the filled rows for a
    layer that keeps everything, copies for a sliding layer (its ring overwrites rows later); either way
    they stay valid as the cache moves on. For shapes alone use layer_shape(i), which builds nothing."""

    def __init__(self, layer_types, sliding_window: int | None, capacity: int | None = None):
        self.layer_types = list(layer_types)
        self.sliding_window = sliding_window
        self.capacity = _check_capacity(capacity)
        n = len(self.layer_types)
        # per layer: key / value / position buffers (None until the first update), rows kept, ring start
        self._k: list[np.ndarray | None] = [None] * n
        self._v: list[np.ndarray | None] = [None] * n
        self._p: list[np.ndarray | None] = [None] * n
        self._n = [0] * n
        self._start = [0] * n
        # False for arrays adopted from a legacy tuple: they belong to the caller and are never written into
        self._owned = [True] * n
        self.seen_tokens = 0  # tokens processed so far (transformers: get_seq_length())
        self.rows_copied = 0  # rows of old keys copied by update() (growth, ring reordering): a cost counter

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
    def _segments(self, i: int) -> list:
        """Buffer row ranges [(a, b), ...] that hold layer i's rows in positional order (two once a ring wrapped)."""
        n, start, cap = self._n[i], self._start[i], self._k[i].shape[2]
        if start + n <= cap:
            return [(start, start + n)]
        return [(start, cap), (0, start + n - cap)]

    def _ordered(self, buf: np.ndarray | None, i: int) -> np.ndarray | None:
        """Layer i's rows of buf in positional order (axis -2 for keys/values, axis 0 for positions).

        A layer that keeps everything: a view of the filled part (rows there are never written again, so
        the view stays valid). A sliding layer: a fresh array, since its ring overwrites rows later."""
        if buf is None:
            return None
        pos = buf.ndim == 1
        if self._keep(i) is None:
            return buf[:self._n[i]] if pos else buf[:, :, :self._n[i]]
        parts = [buf[a:b] if pos else buf[:, :, a:b] for a, b in self._segments(i)]
        return np.concatenate(parts, axis=0 if pos else 2)

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
    def _grow(self, i: int, need: int, like_k: np.ndarray, vdtype, limit: int | None) -> None:
        """Make layer i's buffers (unringed, start 0) hold at least `need` rows: capacity max(need, 2 x old,
        hint), at most `limit`; the filled rows are copied over once (amortised O(1) per token)."""
        k, n = self._k[i], self._n[i]
        cap = 0 if k is None else k.shape[2]
        if need <= cap and self._owned[i] and (k is None or self._v[i].dtype == vdtype):
            return
        new_cap = max(need, 2 * cap, self.capacity or 0)
        if limit is not None:
            new_cap = min(new_cap, limit)
        B, K, _, D = like_k.shape if k is None else k.shape
        kdtype = like_k.dtype if k is None else k.dtype
        nk = np.empty((B, K, new_cap, D), kdtype)
        nv = np.empty((B, K, new_cap, D), vdtype)
        npos = np.empty(new_cap, np.int64)
        if n:
            nk[:, :, :n] = k[:, :, :n]
            nv[:, :, :n] = self._v[i][:, :, :n]
            npos[:n] = self._p[i][:n]
            self.rows_copied += n
        self._k[i], self._v[i], self._p[i], self._owned[i] = nk, nv, npos, True

    def update(self, k: np.ndarray, v: np.ndarray, k_pos: np.ndarray, layer_idx: int):
        """Append new keys/values (B, K, T, D) at positions k_pos (T,); return everything this call attends to:
        (keys, values, positions) = kept + new, in positional order. Then a sliding layer keeps its last W - 1.

        The values are those of the concatenating cache this replaces, bit for bit: the kept rows' dtype
        wins (new keys and values are cast to the keys' dtype, as `np.concatenate([old, k.astype(old.dtype)])`
        did), and values take the dtype that concatenation would have given."""
        i = layer_idx
        old = self._k[i]
        if old is not None:
            if old.shape[0] != k.shape[0] or old.shape[1] != k.shape[1] or old.shape[3] != k.shape[3]:
                raise CacheError(
                    f"layer {i}: cached keys have shape {self.layer_shape(i)}, new keys {k.shape}: batch size, "
                    "kv heads and head_dim must match the cache"
                )
            kdtype = old.dtype
            vdtype = np.result_type(self._v[i].dtype, kdtype)
            k, v = k.astype(kdtype, copy=False), v.astype(kdtype, copy=False)
        else:
            kdtype, vdtype = k.dtype, v.dtype
        T = k.shape[2]
        n, keep = self._n[i], self._keep(i)
        need = n + T
        if keep is None or (self._start[i] == 0 and need <= keep):
            # in place: write the new rows after the kept ones, return views of the filled part
            self._grow(i, need, k, vdtype, keep)
            kb, vb, pb = self._k[i], self._v[i], self._p[i]
            kb[:, :, n:need] = k
            vb[:, :, n:need] = v
            pb[n:need] = k_pos
            self._n[i] = need
            return kb[:, :, :need], vb[:, :, :need], pb[:need]
        # a sliding layer that is full or fills up now: kept + new in positional order is a fresh array
        # (at most W - 1 old rows copied), then the ring keeps the last W - 1 of them
        if n == 0:  # nothing kept (a first prefill longer than the window): the new arrays themselves, no copy
            full_k, full_v, full_p = k, v, k_pos
        else:
            full_k = np.empty(k.shape[:2] + (need,) + k.shape[3:], kdtype)
            full_v = np.empty(full_k.shape, vdtype)
            full_p = np.empty(need, np.int64)
            at = 0
            for a, b in self._segments(i):
                full_k[:, :, at:at + b - a] = self._k[i][:, :, a:b]
                full_v[:, :, at:at + b - a] = self._v[i][:, :, a:b]
                full_p[at:at + b - a] = self._p[i][a:b]
                at += b - a
            self.rows_copied += n
            full_k[:, :, n:], full_v[:, :, n:], full_p[n:] = k, v, k_pos
        cap = 0 if self._k[i] is None else self._k[i].shape[2]
        if T >= keep or cap < keep or not self._owned[i] or self._v[i].dtype != vdtype:
            # a fresh ring of exactly W - 1 rows from the tail (prefill longer than the window, first fill)
            self._k[i] = full_k[:, :, need - keep:].copy()
            self._v[i] = full_v[:, :, need - keep:].copy()
            self._p[i] = np.array(full_p[need - keep:], dtype=np.int64)
            self._start[i], self._owned[i] = 0, True
        else:
            # T < W - 1 new rows overwrite the oldest ones, at ring slots (start + n + j) mod (W - 1)
            at = (self._start[i] + n) % keep
            first = min(T, keep - at)  # rows before the ring's end, then the rest from slot 0
            for buf, new in ((self._k[i], k), (self._v[i], v)):
                buf[:, :, at:at + first] = new[:, :, :first]
                buf[:, :, :T - first] = new[:, :, first:]
            self._p[i][at:at + first] = k_pos[:first]
            self._p[i][:T - first] = k_pos[first:]
            self._start[i] = (self._start[i] + n + T) % keep
        self._n[i] = keep
        return full_k, full_v, full_p

    def reorder(self, index: np.ndarray) -> None:
        """Select / reorder batch rows (beam search style)."""
        for i in range(len(self._k)):
            if self._k[i] is not None:
                # only the filled rows are copied (capacity hint rows stay unbacked); a ring keeps its slots
                rows = slice(None) if self._keep(i) is not None else slice(0, self._n[i])
                k, v = self._k[i][:, :, rows][index], self._v[i][:, :, rows][index]
                if rows.stop is not None:
                    cap = self._k[i].shape[2]
                    nk, nv = np.empty(k.shape[:2] + (cap,) + k.shape[3:], k.dtype), np.empty(
                        v.shape[:2] + (cap,) + v.shape[3:], v.dtype)
                    nk[:, :, :rows.stop], nv[:, :, :rows.stop] = k, v
                    k, v = nk, nv
                self._k[i], self._v[i], self._owned[i] = k, v, True
                self._p[i] = self._p[i].copy()

    # ---------------------------------------------------------------- legacy tuple format
    def to_legacy_cache(self) -> tuple:
        """((keys, values), ...) per layer, (B, K, L_i, D) in positional order. The arrays stay valid as the
        cache moves on (views of rows never written again, or copies of a sliding layer's ring)."""
        return tuple(zip(self.keys, self.values))

    @classmethod
    def from_legacy_cache(cls, past, layer_types, sliding_window) -> "Gemma2Cache":
        """Rebuild from ((k, v), ...) per layer. The number of tokens seen is read from a global layer
        (it holds them all); a sliding layer holds the last min(seen, W - 1) of them."""
        if not isinstance(past, (tuple, list)) or len(past) != len(layer_types):
            n = len(past) if isinstance(past, (tuple, list)) else type(past).__name__
            raise CacheError(f"past_key_values must hold one (keys, values) pair per layer ({len(layer_types)}), got {n}")
        cache = cls(layer_types, sliding_window)
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
