"""Input validation of the model calls: every bad argument becomes an InputError naming the problem.

Kept apart from the decoder math (decoder.py) so that reads as the computation alone.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..cache import CacheError, Gemma2Cache

__all__ = ["InputError", "as_int_array", "check_inputs", "check_labels", "reject_unknown", "resolve_cache"]


class InputError(ValueError):
    """An argument of a model call is of the wrong type, shape or range."""


def as_int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise InputError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a


def check_labels(labels: np.ndarray, n: int) -> None:
    bad = (labels != -100) & ((labels < 0) | (labels >= n))
    if bad.any():
        raise InputError(f"label {int(labels[bad].ravel()[0])} is out of range [0, {n}) (use -100 to ignore)")


def reject_unknown(kwargs: dict, allowed) -> None:
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")


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
        inputs_embeds = np.asarray(inputs_embeds)
        if not np.issubdtype(inputs_embeds.dtype, np.floating):
            raise InputError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != c.hidden_size:
            raise InputError(
                f"inputs_embeds must have shape (batch, seq_len, {c.hidden_size}), got {inputs_embeds.shape}"
            )
        batch, seq = inputs_embeds.shape[:2]
    if seq == 0:
        raise InputError("the input sequence is empty (seq_len = 0)")
    if attention_mask is not None:
        attention_mask = np.asarray(attention_mask)
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


def resolve_cache(past_key_values, use_cache, c):
    """past_key_values as given (None, a Gemma2Cache, or transformers' legacy tuple of (keys, values) per
    layer) -> (the Gemma2Cache to fill or None, whether the caller passed the legacy form)."""
    legacy = isinstance(past_key_values, (tuple, list))
    if legacy:
        try:
            cache = Gemma2Cache.from_legacy_cache(past_key_values, c.layer_types, c.sliding_window)
        except CacheError as exc:
            raise InputError(str(exc)) from None
    elif past_key_values is None:
        cache = Gemma2Cache(c.layer_types, c.sliding_window) if use_cache else None
    elif isinstance(past_key_values, Gemma2Cache):
        cache = past_key_values
    else:
        raise InputError(f"past_key_values must be a Gemma2Cache or a tuple of (keys, values), got "
                         f"{type(past_key_values).__name__}")
    return cache, legacy
