"""Resizing the token embedding matrix the way transformers 5.23 does it
(PreTrainedModel.resize_token_embeddings -> _get_resized_embeddings / _get_resized_lm_head).

    new_num_tokens      rows wanted (None: keep the current count); rounded up to pad_to_multiple_of
    kept rows           rows [:min(old, new)] copied unchanged (bitwise), so shrinking only drops the last rows
    added rows, mean_resizing=True (the default): drawn from a multivariate normal with the old rows' mean and
        1e-9 x their covariance (the vocabulary-expansion recipe, nlp.stanford.edu/~johnhew/vocab-expansion.html),
        computed in float32; when 1e-9 x covariance is not symmetric positive definite (e.g. fewer rows than
        columns, so the covariance is singular) every added row is the mean itself
    added rows, mean_resizing=False: normal(0, config.initializer_range), as transformers' _init_weights
    dtype               the old matrix's (bf16 stays bf16: the new rows are rounded to it, as `.to(dtype)` does)

transformers samples with torch's global generator; here a NumPy Generator (seeded by `seed`) draws the
standard normals, so the rows are the same *distribution*, not the same numbers.
"""

from __future__ import annotations

import numpy as np

from .validation import InputError

__all__ = ["resized_rows", "resolve_new_num_tokens", "mean_and_covariance"]

_CHUNK = 8192  # rows per step of the statistics: a 256000 x 2304 table is never widened to float32 at once
_MAX_TOKENS = 2 ** 31 - 1  # token ids are int32 in every tokenizer format this package reads


def resolve_new_num_tokens(new_num_tokens, pad_to_multiple_of, old_num_tokens: int) -> int | None:
    """transformers' size rule -> the new row count, or None for "do nothing" (both arguments None)."""
    for name, v in (("new_num_tokens", new_num_tokens), ("pad_to_multiple_of", pad_to_multiple_of)):
        if v is not None and (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1):
            # transformers raises ValueError for a non-int pad_to_multiple_of and crashes later (ZeroDivisionError,
            # RuntimeError of nn.Embedding) on 0 or negative counts: one clear error for all of them here
            raise InputError(f"{name} must be a positive integer or None, got {v!r}")
    if pad_to_multiple_of is not None:
        n = old_num_tokens if new_num_tokens is None else int(new_num_tokens)
        new_num_tokens = ((n + pad_to_multiple_of - 1) // pad_to_multiple_of) * pad_to_multiple_of
    if new_num_tokens is not None and new_num_tokens > _MAX_TOKENS:
        raise InputError(f"new_num_tokens {new_num_tokens} is beyond {_MAX_TOKENS} (token ids are int32)")
    return None if new_num_tokens is None else int(new_num_tokens)


def mean_and_covariance(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (E,) and covariance (E, E) of the rows of w (V, E), both float32 as transformers computes them
    (`w.to(float32)`; cov = centered.T @ centered / V, the biased estimate). Summed in chunks of rows (float64
    for the mean, float32 matmuls for the covariance) so memory stays at one chunk; the rounding therefore
    differs from torch's single matmul in the last bits, which a random draw cannot see."""
    V, E = w.shape
    total = np.zeros(E, np.float64)
    for s in range(0, V, _CHUNK):
        total += np.asarray(w[s:s + _CHUNK], np.float32).sum(axis=0, dtype=np.float64)
    mean = (total / V).astype(np.float32)
    cov = np.zeros((E, E), np.float32)
    for s in range(0, V, _CHUNK):
        c = np.asarray(w[s:s + _CHUNK], np.float32) - mean
        cov += c.T @ c
    return mean, cov / np.float32(V)


def _cholesky_if_positive_definite(m: np.ndarray) -> np.ndarray | None:
    """torch.distributions.constraints.positive_definite.check, then its factor: symmetric to
    torch.isclose(m, m.T, atol=1e-6) (rtol 1e-5) and a successful Cholesky factorisation (float32)."""
    if not np.isclose(m, m.T, rtol=1e-5, atol=1e-6).all():
        return None
    try:
        return np.linalg.cholesky(m)
    except np.linalg.LinAlgError:
        return None


def resized_rows(old: np.ndarray, new_num_tokens: int, mean_resizing: bool, initializer_range: float,
                 rng: np.random.Generator) -> np.ndarray:
    """The resized matrix (new_num_tokens, E) in old's dtype: kept rows copied, added rows initialised as the
    module docstring says. `old` may be memory-mapped (read-only); it is never modified."""
    V, E = old.shape
    out = np.empty((new_num_tokens, E), old.dtype)
    n = min(V, new_num_tokens)
    out[:n] = old[:n]  # the kept rows, bitwise
    added = new_num_tokens - V
    if added <= 0:
        return out
    if not mean_resizing:
        # transformers: _init_weights(new nn.Embedding / nn.Linear) = normal(0, initializer_range) (the new module
        # has no padding_idx, so no row is zeroed), then the old rows are copied over the first V
        out[V:] = rng.normal(0.0, initializer_range, size=(added, E)).astype(np.float32).astype(old.dtype)
        return out
    mean, cov = mean_and_covariance(old)
    # transformers: MultivariateNormal(mean, covariance_matrix=1e-9 * cov) when that matrix passes
    # constraints.positive_definite; its sample is mean + L @ z with L = cholesky(1e-9 * cov), z standard normal
    scale_tril = _cholesky_if_positive_definite(np.float32(1e-9) * cov)
    if scale_tril is None:
        rows = np.broadcast_to(mean, (added, E))  # transformers: "just initialize with the mean"
    else:
        z = rng.standard_normal((added, E)).astype(np.float32)
        rows = mean + z @ scale_tril.T
    out[V:] = rows.astype(old.dtype)
    return out
