"""Logits processors: each maps (input_ids (B, T) int64, scores (B, V) float32) -> new scores, as in
transformers 5.23's generation/logits_process.py (same names, same numerics).

`build_logits_processors` (in loop.py) puts them in transformers' order.
"""

from __future__ import annotations

import numpy as np

from .configuration import GenerationError
from .configuration import eos_list as _eos_list


class LogitsProcessorList(list):
    """A list of processors applied in order (transformers' LogitsProcessorList)."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for p in self:
            scores = p(input_ids, scores)
        return scores


class RepetitionPenaltyLogitsProcessor:
    """CTRL's penalty: for every token id already in the sequence, a positive score is divided by `penalty`
    and a negative one multiplied by it (so penalty > 1 always lowers the token), once per token id.

    prompt_ignore_length: leading positions to leave out, an int or one per row. generate() passes the
    number of left pads of each row (transformers 5.x: `(attention_mask != 0).argmax(1)`), so pad
    tokens are not penalised.
    """

    def __init__(self, penalty: float, prompt_ignore_length: int | np.ndarray | None = None):
        if not isinstance(penalty, (float, int)) or isinstance(penalty, bool) or not penalty > 0:
            raise GenerationError(f"`repetition_penalty` has to be a strictly positive float, but is {penalty}")
        self.penalty = float(penalty)
        self.prompt_ignore_length = prompt_ignore_length

    def __call__(self, input_ids, scores):
        input_ids = np.asarray(input_ids)
        scores = np.array(scores, copy=True)
        B, V = scores.shape
        seen = np.zeros((B, V + 1), dtype=bool)  # column V absorbs ignored positions / ids beyond the head
        ids = np.minimum(input_ids, V)
        if self.prompt_ignore_length is not None:
            ign = np.broadcast_to(np.asarray(self.prompt_ignore_length), (B,))
            ids = np.where(np.arange(ids.shape[1])[None, :] < ign[:, None], V, ids)
        seen[np.arange(B)[:, None], ids] = True
        seen = seen[:, :V]
        penalised = np.where(scores < 0, scores * self.penalty, scores / self.penalty).astype(scores.dtype)
        return np.where(seen, penalised, scores)


class MinLengthLogitsProcessor:
    """EOS score -> -inf while the whole sequence (prompt included) is shorter than min_length."""

    def __init__(self, min_length: int, eos_token_id):
        if not isinstance(min_length, (int, np.integer)) or min_length < 0:
            raise GenerationError(f"`min_length` has to be a non-negative integer, but is {min_length}")
        self.min_length = int(min_length)
        self.eos = _eos_list(eos_token_id)

    def __call__(self, input_ids, scores):
        scores = np.array(scores, copy=True)
        if np.shape(input_ids)[-1] < self.min_length:
            eos = [e for e in self.eos if 0 <= e < scores.shape[-1]]
            scores[:, eos] = -np.inf
        return scores


class MinNewTokensLengthLogitsProcessor:
    """EOS score -> -inf while fewer than min_new_tokens tokens have been generated after the prompt."""

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id):
        for name, v in (("prompt_length_to_skip", prompt_length_to_skip), ("min_new_tokens", min_new_tokens)):
            if not isinstance(v, (int, np.integer)) or v < 0:
                raise GenerationError(f"`{name}` has to be a non-negative integer, but is {v}")
        self.prompt_length_to_skip = int(prompt_length_to_skip)
        self.min_new_tokens = int(min_new_tokens)
        self.eos = _eos_list(eos_token_id)

    def __call__(self, input_ids, scores):
        scores = np.array(scores, copy=True)
        if np.shape(input_ids)[-1] - self.prompt_length_to_skip < self.min_new_tokens:
            eos = [e for e in self.eos if 0 <= e < scores.shape[-1]]
            scores[:, eos] = -np.inf
        return scores


class TemperatureLogitsWarper:
    """scores / temperature (float32 division, as torch does on the float32 logits)."""

    def __init__(self, temperature: float):
        if isinstance(temperature, bool) or not isinstance(temperature, (float, int)) or not temperature > 0:
            msg = f"`temperature` (={temperature}) has to be a strictly positive float"
            if temperature == 0:
                msg += "; for greedy decoding set do_sample=False"
            raise GenerationError(msg)
        self.temperature = float(temperature)

    def __call__(self, input_ids, scores):
        scores = np.asarray(scores)
        return (scores / np.asarray(self.temperature, dtype=scores.dtype)).astype(scores.dtype)


class TopKLogitsWarper:
    """Keep the top_k highest scores (ties with the k-th score are kept too, as in transformers), -inf elsewhere."""

    def __init__(self, top_k: int, filter_value: float = -np.inf, min_tokens_to_keep: int = 1):
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k <= 0:
            raise GenerationError(f"`top_k` has to be a strictly positive integer, but is {top_k}")
        self.top_k = max(int(top_k), min_tokens_to_keep)
        self.filter_value = filter_value

    def __call__(self, input_ids, scores):
        scores = np.asarray(scores)
        k = min(self.top_k, scores.shape[-1])
        kth = np.partition(scores, -k, axis=-1)[..., -k, None]  # the k-th largest score of each row
        return np.where(scores < kth, np.asarray(self.filter_value, scores.dtype), scores)


class TopPLogitsWarper:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability sums to >= top_p.

    Mirrors transformers exactly: sort ascending, float32 softmax + cumsum, drop tokens whose cumulative
    probability is <= 1 - top_p, always keep the last min_tokens_to_keep (the most likely ones).
    """

    def __init__(self, top_p: float, filter_value: float = -np.inf, min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if not 0 < top_p <= 1.0:
            raise GenerationError(f"`top_p` has to be a float in (0, 1], but is {top_p}")
        if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise GenerationError(f"`min_tokens_to_keep` has to be a positive integer, but is {min_tokens_to_keep}")
        self.top_p = top_p
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids, scores):
        scores = np.asarray(scores)
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        # softmax and cumsum in the scores' dtype (float32), like torch: the threshold test is on these values
        e = np.exp(sorted_scores - sorted_scores[..., -1:])
        probs = e / e.sum(axis=-1, keepdims=True, dtype=scores.dtype)
        cum = np.cumsum(probs, axis=-1, dtype=scores.dtype)
        remove_sorted = cum <= np.asarray(1 - self.top_p, dtype=scores.dtype)
        remove_sorted[..., -self.min_tokens_to_keep:] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        return np.where(remove, np.asarray(self.filter_value, scores.dtype), scores)


class MinPLogitsWarper:
    """min-p: drop tokens whose probability is below min_p times the probability of the most likely token.

    Mirrors transformers: float32 softmax of the scores, threshold `min_p * max(probs)` in float32, strict `<`;
    the min_tokens_to_keep most likely tokens always stay. Runs after temperature (so it sees the tempered
    distribution) and after top-k / top-p, where transformers puts it.
    """

    def __init__(self, min_p: float, filter_value: float = -np.inf, min_tokens_to_keep: int = 1):
        if isinstance(min_p, bool) or not isinstance(min_p, (int, float, np.floating)) or not 0 <= min_p <= 1.0:
            raise GenerationError(f"`min_p` has to be a float in the [0, 1] interval, but is {min_p}")
        if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise GenerationError(f"`min_tokens_to_keep` has to be a positive integer, but is {min_tokens_to_keep}")
        self.min_p = float(min_p)
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids, scores):
        scores = np.asarray(scores)
        # softmax in the scores' dtype (float32) as torch.softmax does: the threshold test is on these values
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = e / e.sum(axis=-1, keepdims=True, dtype=scores.dtype)
        scaled_min_p = np.asarray(self.min_p, dtype=scores.dtype) * probs.max(axis=-1, keepdims=True)
        remove = probs < scaled_min_p
        k = min(self.min_tokens_to_keep, probs.shape[-1])
        top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]  # the k most likely: never removed
        np.put_along_axis(remove, top, False, axis=-1)
        return np.where(remove, np.asarray(self.filter_value, scores.dtype), scores)


class NoRepeatNGramLogitsProcessor:
    """Ban every token that would complete an n-gram already present in the sequence (prompt included).

    The next token completes an n-gram whose first n - 1 tokens are the current last n - 1 tokens; every earlier
    window of n tokens that starts with those n - 1 tokens bans its own last token (score -inf). As in
    transformers, left pads are part of the sequence (they can form n-grams too), and n = 1 bans every token
    already seen.
    """

    def __init__(self, ngram_size: int):
        if isinstance(ngram_size, bool) or not isinstance(ngram_size, (int, np.integer)) or ngram_size <= 0:
            raise GenerationError(f"`ngram_size` has to be a strictly positive integer, but is {ngram_size}")
        self.ngram_size = int(ngram_size)

    def __call__(self, input_ids, scores):
        input_ids = np.asarray(input_ids)
        scores = np.asarray(scores)
        n = self.ngram_size
        B, cur_len = input_ids.shape
        if cur_len < n:  # no complete n-gram yet
            return scores
        prefix = input_ids[:, cur_len + 1 - n:]  # (B, n - 1): the n-gram the next token would complete
        windows = np.lib.stride_tricks.sliding_window_view(input_ids, n, axis=1)  # (B, cur_len - n + 1, n)
        matches = (windows[..., :-1] == prefix[:, None, :]).all(axis=-1)  # (B, windows)
        V = scores.shape[-1]
        banned = np.zeros((B, V + 1), dtype=bool)  # column V absorbs non-matching windows / ids beyond the head
        banned[np.arange(B)[:, None], np.where(matches, np.minimum(windows[..., -1], V), V)] = True
        return np.where(banned[:, :V], np.asarray(-np.inf, scores.dtype), scores)
