"""Choosing the next token from the processed scores: greedy argmax or one multinomial draw per row.

`pick_next_tokens` is the one place generate() picks. The greedy pick is the model backend's `argmax`
(kernels/protocol.py: `ops.argmax` on the reference backend, the C `g2_argmax` on the native one, bitwise
the same: the first maximal index, the first NaN if any, as torch.argmax on CPU).
"""

from __future__ import annotations

import numpy as np

from .configuration import GenerationError


def pick_next_tokens(scores: np.ndarray, do_sample: bool, rng: np.random.Generator | None, backend) -> np.ndarray:
    """(B, V) float32 processed scores -> (B,) int64 next tokens: one draw per row, or the backend's argmax."""
    if do_sample:
        return sample_rows(scores, rng)
    return np.asarray(backend.argmax(scores), dtype=np.int64)


def sample_rows(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from softmax(scores) (transformers: softmax + torch.multinomial).

    Numerics: the softmax is taken in float64 (max subtracted; -inf scores give exactly 0) and the draw
    is the inverse CDF of one uniform per row, `searchsorted(cumsum(p), u * sum(p))`, so a token with
    probability 0 is never drawn and the result depends only on the seed and the scores. torch's RNG
    stream cannot be reproduced, so sampled tokens match transformers in distribution, not draw for draw.
    """
    s = scores.astype(np.float64)
    if not np.isfinite(s.max(axis=-1)).all():
        raise GenerationError("every token was filtered out (all scores are -inf or NaN): cannot sample")
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    cdf = np.cumsum(e, axis=-1)
    u = rng.random(scores.shape[0]) * cdf[:, -1]
    out = np.empty(scores.shape[0], dtype=np.int64)
    for b in range(scores.shape[0]):
        j = int(np.searchsorted(cdf[b], u[b], side="right"))
        out[b] = min(j, scores.shape[1] - 1)
    return out
