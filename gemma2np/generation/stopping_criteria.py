"""Stopping criteria: each maps (input_ids (B, T) int64, scores (B, V)) -> (B,) bool, True = that row is done
(transformers 5.23's generation/stopping_criteria.py). generate() ORs them after every new token.
"""

from __future__ import annotations

import numpy as np

from .configuration import eos_list


class StoppingCriteriaList(list):
    """A list of criteria; a row is done when any of them says so."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        B = np.shape(input_ids)[0]
        done = np.zeros(B, dtype=bool)
        for crit in self:
            done |= np.broadcast_to(np.asarray(crit(input_ids, scores), dtype=bool), (B,))
        return done


class MaxLengthCriteria:
    """Every row is done once the sequence (prompt included) holds max_length tokens."""

    def __init__(self, max_length: int):
        self.max_length = int(max_length)

    def __call__(self, input_ids, scores):
        return np.full(np.shape(input_ids)[0], np.shape(input_ids)[1] >= self.max_length)


class EosTokenCriteria:
    """A row is done when its last token is one of the eos ids."""

    def __init__(self, eos_token_id):
        self.eos_token_id = eos_list(eos_token_id)

    def __call__(self, input_ids, scores):
        return np.isin(np.asarray(input_ids)[:, -1], self.eos_token_id)
