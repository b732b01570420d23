"""Input validation of the model calls: every bad argument becomes an InputError naming the problem.

Kept apart from the decoder math (decoder.py) so that reads as the computation alone.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..cache import CacheError, Gemma2Cache
from ..checkpoint import bfloat16

__all__ = ["InputError", "UnexpectedArgumentError", "as_array", "as_int_array", "check_cache_fits", "check_inputs",
           "check_labels", "check_num_items", "check_position_embeddings", "flag", "keep_logits", "reject_unknown",
           "resolve_cache"]


class InputError(ValueError):
    """An argument of a model call is of the wrong type, shape or range."""


class UnexpectedArgumentError(InputError, TypeError):
    """A keyword the call does not take: an InputError, and a TypeError as Python raises for a bad signature."""


def as_array(x, name: str) -> np.ndarray:
    """np.asarray with numpy's own refusals (ragged nested lists, unconvertible objects) as an InputError."""
    try:
        return np.asarray(x)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"{name} must be a rectangular array, got {type(x).__name__} ({exc})") from None


def as_int_array(x, name: str) -> np.ndarray:
    """An integer array, or an InputError. Booleans are refused: transformers' embedding, gather and loss
    take integer (long) tensors only, and a bool array of ids is almost surely a mask passed by mistake."""
    a = as_array(x, name)
    if a.dtype == object or a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a


def check_labels(labels: np.ndarray, n: int) -> None:
    bad = (labels != -100) & ((labels < 0) | (labels >= n))
    if bad.any():
        raise InputError(f"label {int(labels[bad].ravel()[0])} is out of range [0, {n}) (use -100 to ignore)")


def reject_unknown(kwargs: dict, allowed) -> None:
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise UnexpectedArgumentError(f"unexpected keyword argument(s): {', '.join(unknown)}")


def check_inputs(c, input_ids, inputs_embeds, attention_mask, position_ids, cache_position, past_len):
    """Validate and normalise the inputs of a forward pass (transformers' defaults) -> (input_ids,
    inputs_embeds, attention_mask as bool or None, position_ids (1|B, T), cache_position (T,), B, T)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        input_ids = as_int_array(input_ids, "input_ids")
        if input_ids.ndim != 2:
            raise InputError(f"input_ids must have shape (batch, seq_len), got {input_ids.shape}")
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= c.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= c.vocab_size)].ravel()[0]
            raise InputError(f"token id {int(bad)} is out of range for vocab_size {c.vocab_size}")
        batch, seq = input_ids.shape
    else:
        inputs_embeds = as_array(inputs_embeds, "inputs_embeds")
        if not np.issubdtype(inputs_embeds.dtype, np.floating):
            raise InputError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != c.hidden_size:
            raise InputError(
                f"inputs_embeds must have shape (batch, seq_len, {c.hidden_size}), got {inputs_embeds.shape}"
            )
        if not np.isfinite(inputs_embeds).all():
            # transformers would carry the NaN/inf through every layer into the logits: refuse it here
            raise InputError("inputs_embeds contains NaN or infinite values")
        if inputs_embeds.size and np.abs(inputs_embeds).max() > np.finfo(np.float32).max:
            # the float32 model would cast them to inf (and then NaN): refuse values that do not fit float32
            raise InputError("inputs_embeds has values beyond the float32 range")
        batch, seq = inputs_embeds.shape[:2]
    if seq == 0:
        raise InputError("the input sequence is empty (seq_len = 0)")
    if attention_mask is not None:
        attention_mask = as_array(attention_mask, "attention_mask")
        if attention_mask.ndim != 2:
            raise InputError(
                f"attention_mask must be 2-D (batch, past + seq_len), got shape {attention_mask.shape}"
            )
        if attention_mask.shape != (batch, past_len + seq):
            raise InputError(
                f"attention_mask has shape {attention_mask.shape}, expected ({batch}, {past_len + seq}) "
                f"= (batch, cached tokens {past_len} + new tokens {seq})"
            )
        if not (attention_mask.dtype == bool or np.issubdtype(attention_mask.dtype, np.number)):
            raise InputError(f"attention_mask must be 0/1 or boolean, got dtype {attention_mask.dtype}")
        if attention_mask.dtype != bool and not np.isin(attention_mask, (0, 1)).all():
            raise InputError("attention_mask values must be 0 or 1")
        attention_mask = attention_mask.astype(bool)
    if cache_position is None:
        cache_position = np.arange(past_len, past_len + seq, dtype=np.int64)
    else:
        cache_position = as_int_array(cache_position, "cache_position").astype(np.int64).reshape(-1)
        if cache_position.shape != (seq,):
            raise InputError(f"cache_position must have shape ({seq},), got {cache_position.shape}")
    if position_ids is None:
        # transformers' forward default: arange from the number of cached tokens, padding ignored
        # (generate() instead passes cumsum(attention_mask) - 1; real-token logits agree either way).
        position_ids = cache_position[None, :]
    else:
        position_ids = as_int_array(position_ids, "position_ids").astype(np.int64)
        if position_ids.ndim == 1:
            position_ids = position_ids[None, :]
        if position_ids.ndim != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
            raise InputError(f"position_ids must have shape ({batch}, {seq}) or (1, {seq}), got {position_ids.shape}")
    if int(position_ids.max(initial=0)) + 1 > c.max_position_embeddings:
        # transformers runs such sequences (RoPE extrapolates, dynamic RoPE rescales); so do we, with a warning.
        warnings.warn(
            f"position {int(position_ids.max())} is past max_position_embeddings ({c.max_position_embeddings}): "
            "running anyway, as transformers does, but the model was not trained for it",
            stacklevel=4,
        )
    return input_ids, inputs_embeds, attention_mask, position_ids, cache_position, batch, seq


def resolve_cache(past_key_values, use_cache, c, cache_dtype=None):
    """past_key_values as given (None, a Gemma2Cache, or transformers' legacy tuple of (keys, values) per
    layer) -> (the Gemma2Cache to fill or None, whether the caller passed the legacy form). cache_dtype: the
    model's (from_pretrained(..., cache_dtype=)), for the caches made here; a Gemma2Cache keeps its own."""
    legacy = isinstance(past_key_values, (tuple, list))
    if legacy:
        try:
            cache = Gemma2Cache.from_legacy_cache(past_key_values, c.layer_types, c.sliding_window, cache_dtype)
        except (CacheError, ValueError, TypeError) as exc:  # CacheError, or numpy refusing a ragged pair
            raise InputError(f"past_key_values: {exc}" if not isinstance(exc, CacheError) else str(exc)) from None
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            for name, a in (("keys", k), ("values", v)):
                # (bfloat16: what a model with cache_dtype="bfloat16" returns, fed back)
                if a.dtype == bool or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
                                           or a.dtype == bfloat16):
                    raise InputError(f"past_key_values[{i}] {name} must be a numeric array, got dtype {a.dtype}")
                if not np.isfinite(a).all():
                    # a NaN key or value would reach every later token's attention output: refuse it here
                    raise InputError(f"past_key_values[{i}] {name} contains NaN or infinite values")
    elif past_key_values is None:
        cache = Gemma2Cache(c.layer_types, c.sliding_window, dtype=cache_dtype) if use_cache else None
    elif isinstance(past_key_values, Gemma2Cache):
        cache = past_key_values
    else:
        raise InputError(f"past_key_values must be a Gemma2Cache or a tuple of (keys, values), got "
                         f"{type(past_key_values).__name__}")
    return cache, legacy


def check_position_embeddings(position_embeddings, batch: int, seq: int, head_dim: int, dtype):
    """The seed's `position_embeddings`: a (cos, sin) pair of shape (batch_size, seq_len, head_dim) that
    replaces the model's RoPE tables for this call (every layer) -> (cos, sin) in the compute dtype.

    A batch dimension of 1 is accepted too (it broadcasts over the batch, as in torch, and it is the shape
    the model's own tables have for shared position_ids, so passing those back changes nothing). cos and
    sin must have the same shape (the native RoPE kernel takes one table shape for both)."""
    if not isinstance(position_embeddings, (tuple, list)) or len(position_embeddings) != 2:
        got = type(position_embeddings).__name__
        if isinstance(position_embeddings, (tuple, list)):
            got += f" of length {len(position_embeddings)}"
        raise InputError("position_embeddings must be a (cos, sin) tuple of arrays of shape "
                         f"(batch, seq_len, head_dim) = ({batch}, {seq}, {head_dim}), got {got}")
    out = []
    for name, a in zip(("cos", "sin"), position_embeddings):
        a = as_array(a, f"position_embeddings {name}")
        if not np.issubdtype(a.dtype, np.floating):
            raise InputError(f"position_embeddings {name} must be floating point, got dtype {a.dtype}")
        if a.ndim != 3 or a.shape[0] not in (1, batch) or a.shape[1:] != (seq, head_dim):
            raise InputError(f"position_embeddings {name} must have shape ({batch}, {seq}, {head_dim}) "
                             f"(batch, seq_len, head_dim) or (1, {seq}, {head_dim}), got {a.shape}")
        if not np.isfinite(a).all():
            raise InputError(f"position_embeddings {name} contains NaN or infinite values")
        # the model's own tables are in the compute dtype (rope.RotaryEmbedding): cast to it, so float32 tables
        # pass through untouched (astype without copy) and float64 models rotate in float64
        out.append(a.astype(dtype, copy=False))
    if out[0].shape != out[1].shape:
        raise InputError(f"position_embeddings cos {out[0].shape} and sin {out[1].shape} must have the same shape")
    return out[0], out[1]


def keep_logits(h: np.ndarray, logits_to_keep) -> np.ndarray:
    """transformers' slice_logits_to_keep on h (B, T, E), with every bad value an InputError:

    int n          keep the last n positions (0 = all; n > T keeps all, as Python slicing does) -> (B, n, E)
    1-D int array  positions kept for every row (negative ones count from the end, as torch indexing) -> (B, P, E)
    1-D bool (T,)  a mask over the positions -> (B, P, E)
    2-D int (B|1, P)  positions per row (torch.take_along_dim: no negative ones) -> (B, P, E)
    2-D bool (B, T)   the True positions of every row, flattened -> (N, E)

    Refused (transformers does something surprising or crashes): negative ints (it would keep positions
    |n|.. instead), bools and floats as a count, other ranks, indices out of range."""
    B, T = h.shape[:2]
    if isinstance(logits_to_keep, np.ndarray) and logits_to_keep.ndim == 0 \
            and np.issubdtype(logits_to_keep.dtype, np.integer):
        logits_to_keep = logits_to_keep[()]  # a 0-d integer array counts like an np.integer
    if isinstance(logits_to_keep, (bool, np.bool_)):
        raise InputError(f"logits_to_keep must be an int or an index array, got the bool {logits_to_keep}")
    if isinstance(logits_to_keep, (int, np.integer)):
        n = int(logits_to_keep)
        if n < 0:
            raise InputError(f"logits_to_keep must be >= 0, got {n}")
        return h[:, -n:] if n else h
    if logits_to_keep is None or isinstance(logits_to_keep, (float, complex, str, bytes)):
        raise InputError(f"logits_to_keep must be an int or an index array, got {type(logits_to_keep).__name__}")
    idx = as_array(logits_to_keep, "logits_to_keep")
    if idx.size == 0 and idx.ndim == 1 and idx.dtype != bool:
        idx = idx.astype(np.int64)  # [] : keep no position (torch: an empty index)
    if idx.dtype == bool:
        if idx.shape == (T,):
            return h[:, idx]
        if idx.shape == (B, T):
            return h[idx]
        raise InputError(f"a boolean logits_to_keep must have shape ({T},) or ({B}, {T}), got {idx.shape}")
    if idx.dtype == object or not np.issubdtype(idx.dtype, np.integer):
        raise InputError(f"logits_to_keep must be an int or an integer index array, got dtype {idx.dtype}")
    if idx.ndim == 1:
        if idx.size and (idx.min() < -T or idx.max() >= T):
            raise InputError(f"logits_to_keep index out of range for {T} positions: {idx.tolist()[:8]}")
        return h[:, idx]
    if idx.ndim == 2:
        if idx.shape[0] not in (1, B):
            raise InputError(f"a 2-D logits_to_keep must have shape ({B}, P) or (1, P), got {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= T):
            raise InputError(f"logits_to_keep positions must be in [0, {T}), got {idx.tolist()[:2]}")
        return np.take_along_axis(h, idx[..., None].astype(np.intp), axis=1)
    raise InputError(f"logits_to_keep must be an int, or a 1-D or 2-D index array, got shape {idx.shape}")


def flag(value, name: str, default: bool) -> bool:
    """A yes/no argument (use_cache, output_attentions, output_hidden_states, return_dict): None -> the
    config's default; a bool (or 0 / 1) as given; anything else an InputError (an array's truth value is
    ambiguous, and a string like "False" would be taken as True)."""
    if value is None:
        return bool(default)
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise InputError(f"{name} must be True, False or None, got {value!r:.40}")


def check_cache_fits(cache, batch: int, c, kv_heads: int | None = None) -> None:
    """A cache that already holds keys must have this call's batch size and the model's kv heads / head_dim
    (else Gemma2Cache.update would fail mid-forward). kv_heads: the heads this model caches (tensor-parallel:
    the rank's), default the config's."""
    if cache is None:
        return
    K = c.num_key_value_heads if kv_heads is None else kv_heads
    if len(cache) != c.num_hidden_layers:
        # (only the count: a cache's layer types may differ on purpose, see tests/test_cache.py)
        raise InputError(f"past_key_values holds {len(cache)} layers, this model has {c.num_hidden_layers}: "
                         "use a cache made for this model")
    for i in range(len(cache)):
        shape = cache.layer_shape(i)  # (not cache.keys: that would copy every sliding layer's ring per call)
        if shape is not None and (shape[0] != batch or shape[1] != K or shape[3] != c.head_dim):
            raise InputError(f"past_key_values layer {i} holds keys of shape {shape}, this call needs "
                             f"({batch}, {K}, L, {c.head_dim}): batch size, kv heads and head_dim "
                             "must match the cache")


def check_num_items(n):
    """transformers' num_items_in_batch (the loss is sum / n, for gradient accumulation): None, or a positive
    finite number (a 0-d array too); 0 would give an infinite loss, anything else a foreign numpy error."""
    if n is None:
        return None
    if isinstance(n, np.ndarray) and n.ndim == 0:
        n = n[()]
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, float, np.integer, np.floating)) \
            or not np.isfinite(n) or n <= 0:
        raise InputError(f"num_items_in_batch must be a positive number, got {n!r:.40}")
    return n
