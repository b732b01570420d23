"""The KV cache, shaped like transformers' cache for Gemma 2.

Each layer keeps the keys (after RoPE) and values it has seen, with the absolute position
(`cache_position`) of each. Global ("full_attention") layers keep the whole context. Sliding
layers keep at most `sliding_window - 1` positions between calls -- the same as transformers'
`DynamicSlidingWindowLayer` -- because the next query needs only the previous W - 1 keys plus
itself. During one call a sliding layer attends over (kept keys + new keys); the window rule in
`ops.visible_keys` then decides what each query sees.

The legacy format -- a tuple with one `(keys, values)` pair per layer, arrays of shape
(B, K, L, D) -- is accepted as `past_key_values` and returned in kind.
"""

from __future__ import annotations

import numpy as np


class CacheError(ValueError):
    pass


class Gemma2Cache:
    """Per-layer key/value store.  keys/values[i]: (B, K, L_i, D); positions[i]: (L_i,) int64."""

    def __init__(self, layer_types, sliding_window: int | None):
        self.layer_types = list(layer_types)
        self.sliding_window = sliding_window
        n = len(self.layer_types)
        self.keys: list[np.ndarray | None] = [None] * n
        self.values: list[np.ndarray | None] = [None] * n
        self.positions: list[np.ndarray | None] = [None] * n
        self.seen_tokens = 0  # tokens processed so far (transformers: get_seq_length())

    # transformers-style accessors
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return len(self.layer_types)

    def is_sliding(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == "sliding_attention"

    def update(self, k: np.ndarray, v: np.ndarray, k_pos: np.ndarray, layer_idx: int):
        """Append new keys/values (B, K, T, D) at positions k_pos (T,); return everything this call attends to:
        (keys, values, positions) = kept + new. Then trim a sliding layer to its last W - 1 positions.

        sliding_window == 1 keeps every key: transformers trims with `keys[:, :, -W + 1:]`, which for W = 1
        is `keys[:, :, 0:]` (see model/decoder.py, layer_visibility, for what its decode steps then attend to)."""
        if self.keys[layer_idx] is None:
            full_k, full_v, full_pos = k, v, k_pos
        else:
            old = self.keys[layer_idx]
            if old.shape[0] != k.shape[0] or old.shape[1] != k.shape[1] or old.shape[3] != k.shape[3]:
                raise CacheError(
                    f"layer {layer_idx}: cached keys have shape {old.shape}, new keys {k.shape}: batch size, "
                    "kv heads and head_dim must match the cache"
                )
            full_k = np.concatenate([old, k.astype(old.dtype, copy=False)], axis=2)
            full_v = np.concatenate([self.values[layer_idx], v.astype(old.dtype, copy=False)], axis=2)
            full_pos = np.concatenate([self.positions[layer_idx], k_pos])
        if self.is_sliding(layer_idx) and self.sliding_window is not None and self.sliding_window > 1:
            keep = self.sliding_window - 1
            start = max(full_k.shape[2] - keep, 0)
            self.keys[layer_idx] = full_k[:, :, start:]
            self.values[layer_idx] = full_v[:, :, start:]
            self.positions[layer_idx] = full_pos[start:]
        else:
            self.keys[layer_idx], self.values[layer_idx], self.positions[layer_idx] = full_k, full_v, full_pos
        return full_k, full_v, full_pos

    def reorder(self, index: np.ndarray) -> None:
        """Select / reorder batch rows (beam search style)."""
        for i in range(len(self.keys)):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][index]
                self.values[i] = self.values[i][index]

    # ---------------------------------------------------------------- legacy tuple format
    def to_legacy_cache(self) -> tuple:
        return tuple((self.keys[i], self.values[i]) for i in range(len(self.keys)))

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
            cache.keys[i] = np.asarray(k)
            cache.values[i] = np.asarray(v)
            cache.positions[i] = np.arange(seen - n, seen, dtype=np.int64)
        cache.seen_tokens = seen
        return cache
