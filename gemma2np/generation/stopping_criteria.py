"""Stopping criteria: each maps (input_ids (B, T) int64, scores (B, V)) -> (B,) bool, True = that row is done
(transformers 5.23's generation/stopping_criteria.py). generate() ORs them after every new token.
"""

from __future__ import annotations

import numpy as np

from .configuration import GenerationError, eos_list


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


def token_byte_strings(tokenizer) -> list[bytes | None]:
    """The bytes each token id stands for in decoded text, indexed by id (None for ids the vocabulary lacks).

    transformers' StopStringCriteria.clean_tokenizer_vocab in its "byte_fallback" mode, the one Gemma's
    tokenizer selects (its decoder is Replace("\u2581", " ") + ByteFallback + Fuse): a byte-fallback piece
    "<0xNN>" is that single byte; any other piece (special and added tokens included) is its text with
    "\u2581" written as a space, UTF-8 encoded.
    """
    vocab = tokenizer.get_vocab()
    table: list[bytes | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for piece, i in vocab.items():
        if (len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
                and all(c in "0123456789abcdefABCDEF" for c in piece[3:5])):
            table[i] = bytes([int(piece[3:5], 16)])
        else:
            table[i] = piece.replace("\u2581", " ").encode("utf-8")
    return table


def _stop_string_ends_here(tokens: list[bytes | None], stop: bytes) -> bool:
    """Does `stop` occur in the concatenated tokens, ending inside the LAST token?

    The last token must start with the end of the stop string (or hold all of it); going back, each earlier
    token must be exactly the next piece of what is still unmatched, except the first one, which may run
    off the start of the stop string. (transformers' docstring: ["st", "op"], ["las", "topper"] and
    ["s", "to", "pped"] match "stop"; ["stop", "at"] does not.) Unknown ids (None) match nothing.
    """
    last = tokens[-1]
    if last is None:
        return False
    for k in range(1, len(last) + 1):
        head = last[:k]
        if len(head) >= len(stop):  # the whole stop string inside the last token
            if head.endswith(stop):
                return True
            continue
        if head != stop[-k:]:
            continue
        rest = stop[:-k]  # still to match, right to left, by the earlier tokens
        for t in reversed(tokens[:-1]):
            if t is None:
                break
            if len(t) >= len(rest):
                if t.endswith(rest):
                    return True
                break
            if not rest.endswith(t):
                break
            rest = rest[:len(rest) - len(t)]  # (an empty token matches and leaves `rest` as it is)
    return False


def _can_end(token: bytes, stop: bytes) -> bool:
    """Can `token` be the last token of a match: it starts with a proper suffix of `stop`, or holds all of it."""
    return token.startswith(tuple(stop[-k:] for k in range(1, len(stop)))) or stop in token


class StopStringCriteria:
    """A row is done once its decoded text ends with one of the stop strings (transformers' StopStringCriteria).

    Only matches that end inside the newest token count, so a stop string already in the prompt does not stop
    generation; a match may start in the middle of a token and end in the middle of the newest one. Matching is
    on UTF-8 bytes, over the last max(len(stop string in bytes)) tokens, as transformers does.
    """

    def __init__(self, tokenizer, stop_strings: str | list[str]):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        try:
            items = list(stop_strings)
        except TypeError:
            items = None
        if not items or not all(isinstance(s, str) and s for s in items):
            raise GenerationError(f"`stop_strings` must be a non-empty string or a list of non-empty strings, "
                             f"got {stop_strings!r}")
        if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
            raise GenerationError("stop_strings need the model's tokenizer: pass tokenizer=... to generate()")
        self.stop_strings = tuple(items)
        self._stops = tuple(s.encode("utf-8") for s in items)
        self._tokens = token_byte_strings(tokenizer)
        self.maximum_token_len = max(len(s) for s in self._stops)
        # transformers refuses stop strings no token can end (its "unable to identify tokens matching" error)
        if not any(_can_end(t, s) for s in self._stops for t in self._tokens if t):
            raise GenerationError("no token of the tokenizer can end any of the stop strings "
                             f"{list(self.stop_strings)!r}: they cannot be generated")

    def __call__(self, input_ids, scores):
        input_ids = np.asarray(input_ids)[:, -self.maximum_token_len:]
        n = len(self._tokens)
        done = np.zeros(input_ids.shape[0], dtype=bool)
        for b, row in enumerate(input_ids.tolist()):
            tokens = [self._tokens[i] if 0 <= i < n else None for i in row]
            done[b] = any(_stop_string_ends_here(tokens, s) for s in self._stops)
        return done
