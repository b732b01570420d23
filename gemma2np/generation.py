"""Text generation: transformers' `generate()` (greedy and multinomial sampling) for gemma2np models.

What one call does, in transformers 5.23's order (generation/utils.py `generate` -> `_sample`):

1. Resolve the settings: explicit arguments > the checkpoint's generation_config.json > the model's
   config.json (eos/pad/bos) > transformers' global defaults (max_length 20, top_k 50, ...).
2. Prefill: the whole prompt in ONE forward pass, with position_ids = cumsum(attention_mask) - 1
   (pads get position 0, as transformers 5.23's `_prepare_position_ids_for_generation` does) and
   `logits_to_keep=1`, so the LM head (the largest matmul of a small model) runs for the last position only.
3. Each step: logits of the last position (float32) -> logits processors -> argmax (greedy) or a draw
   from softmax (sampling) -> rows that already finished get pad_token_id -> append -> stopping
   checks (max_length, eos) -> one-token forward pass with the KV cache, the attention mask grown by
   one column of ones and the position ids advanced by one.
4. Return (batch, prompt + new) token ids; stop as soon as every row has finished.

Logits processors run in transformers' order: repetition penalty, min_length, min_new_tokens, then
user-supplied processors, then -- only when sampling -- temperature, top-k, top-p.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .cache import Gemma2Cache
from .outputs import ModelOutput

__all__ = [
    "GenerationConfig",
    "generate",
    "LogitsProcessorList",
    "RepetitionPenaltyLogitsProcessor",
    "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor",
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "TextStreamer",
    "GenerateDecoderOnlyOutput",
]

GENERATION_CONFIG_NAME = "generation_config.json"

# transformers' GenerationConfig._get_default_generation_params(): used when neither the caller nor the
# checkpoint's generation_config.json sets a value.
_DEFAULTS = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "use_cache": True,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
}


# ============================================================================ configuration


@dataclass
class GenerationConfig:
    """The generation settings gemma2np understands (a subset of transformers' GenerationConfig).

    None means "unset": the value then comes from the next source (see the module docstring).
    """

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    use_cache: bool | None = None
    extra: dict = field(default_factory=dict, repr=False)  # other keys of generation_config.json (ignored)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "GenerationConfig | None":
        """Read `directory/generation_config.json`; None when the file is absent."""
        path = os.path.join(os.fspath(directory), GENERATION_CONFIG_NAME)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path!r}: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path!r} must hold a JSON object")
        return cls.from_dict(d)

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        return cls(eos_token_id=getattr(config, "eos_token_id", None),
                   pad_token_id=getattr(config, "pad_token_id", None),
                   bos_token_id=getattr(config, "bos_token_id", None))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {k: v for k, v in d.items() if v is not None}


def get_generation_config(model) -> GenerationConfig:
    """The model's generation defaults, as transformers builds `model.generation_config`: the checkpoint's
    generation_config.json when there is one, else the token ids of config.json. Cached on the model."""
    gc = getattr(model, "generation_config", None)
    if isinstance(gc, GenerationConfig):
        return gc
    gc = None
    path = getattr(model, "name_or_path", None)
    if path and os.path.isdir(path):
        gc = GenerationConfig.from_pretrained(path)
    if gc is None:
        gc = GenerationConfig.from_model_config(model.config)
    else:
        # a generation_config.json without token ids inherits them from config.json (transformers does the same
        # when it creates the file from the model config; a hand-written file may omit them)
        base = GenerationConfig.from_model_config(model.config)
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if name not in gc.extra and getattr(gc, name) is None:
                setattr(gc, name, getattr(base, name))
    try:
        model.generation_config = gc
    except AttributeError:  # pragma: no cover - objects with __slots__
        pass
    return gc


# ============================================================================ logits processors
# Each processor maps (input_ids (B, T) int64, scores (B, V) float32) -> new scores, as in transformers.


class LogitsProcessorList(list):
    """A list of processors applied in order (transformers' LogitsProcessorList)."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for p in self:
            scores = p(input_ids, scores)
        return scores


def _eos_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, (int, np.integer)):
        return [int(eos)]
    return [int(e) for e in eos]


class RepetitionPenaltyLogitsProcessor:
    """CTRL's penalty: for every token id already in the sequence, a positive score is divided by `penalty`
    and a negative one multiplied by it (so penalty > 1 always lowers the token), once per token id.

    prompt_ignore_length: leading positions to leave out, an int or one per row. generate() passes the
    number of left pads of each row (transformers 5.x: `(attention_mask != 0).argmax(1)`), so pad
    tokens are not penalised.
    """

    def __init__(self, penalty: float, prompt_ignore_length: int | np.ndarray | None = None):
        if not isinstance(penalty, (float, int)) or isinstance(penalty, bool) or not penalty > 0:
            raise ValueError(f"`repetition_penalty` has to be a strictly positive float, but is {penalty}")
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
            raise ValueError(f"`min_length` has to be a non-negative integer, but is {min_length}")
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
                raise ValueError(f"`{name}` has to be a non-negative integer, but is {v}")
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
            raise ValueError(msg)
        self.temperature = float(temperature)

    def __call__(self, input_ids, scores):
        scores = np.asarray(scores)
        return (scores / np.asarray(self.temperature, dtype=scores.dtype)).astype(scores.dtype)


class TopKLogitsWarper:
    """Keep the top_k highest scores (ties with the k-th score are kept too, as in transformers), -inf elsewhere."""

    def __init__(self, top_k: int, filter_value: float = -np.inf, min_tokens_to_keep: int = 1):
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k <= 0:
            raise ValueError(f"`top_k` has to be a strictly positive integer, but is {top_k}")
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
            raise ValueError(f"`top_p` has to be a float in (0, 1], but is {top_p}")
        if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"`min_tokens_to_keep` has to be a positive integer, but is {min_tokens_to_keep}")
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


# ============================================================================ streaming


class TextStreamer:
    """Print generated text to stdout as soon as whole words are formed (transformers' TextStreamer).

    `generate(..., streamer=TextStreamer(tok, skip_prompt=True))` prints only the new text. Batch size 1.
    The text is decoded from all tokens received since the last newline and printed up to the last
    space, so multi-token words and multi-byte characters are never printed half-formed.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, file=None, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.file = file
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value) -> None:
        value = np.asarray(value)
        if value.ndim > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        value = value.reshape(-1)
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(int(v) for v in value)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):  # after a newline the cache is flushed
            printable = text[self.print_len:]
            self.token_cache, self.print_len = [], 0
        elif text and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
            printable = ""
        elif text and _is_cjk(ord(text[-1])):
            printable = text[self.print_len:]
            self.print_len += len(printable)
        else:  # up to the last space: the last word may still grow with the next token
            printable = text[self.print_len: text.rfind(" ") + 1]
            self.print_len += len(printable)
        self.on_finalized_text(printable)

    def end(self) -> None:
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len:]
            self.token_cache, self.print_len = [], 0
        else:
            printable = ""
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        f = self.file if self.file is not None else sys.stdout
        print(text, flush=True, end="" if not stream_end else None, file=f)


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


class _CallableStreamer:
    """Adapts a plain callable: it receives each step's new tokens, a (batch,) int64 array (not the prompt)."""

    def __init__(self, fn):
        self.fn = fn
        self.first = True

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        self.fn(np.asarray(value).reshape(-1))

    def end(self):
        pass


# ============================================================================ outputs


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """return_dict_in_generate=True: sequences plus, on request, per-step processed scores / raw logits."""

    sequences: np.ndarray | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    past_key_values: Any = None


# ============================================================================ generate


def _check_int(name, v, minimum):
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {v!r}")


def _validate(gc: GenerationConfig) -> None:
    """Clear errors for nonsense values (transformers raises for the same ones, at generate or processor time)."""
    _check_int("max_new_tokens", gc.max_new_tokens, 1)
    _check_int("max_length", gc.max_length, 1)
    _check_int("min_new_tokens", gc.min_new_tokens, 0)
    _check_int("min_length", gc.min_length, 0)
    t = gc.temperature
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)) or not np.isfinite(t) or t < 0:
            raise ValueError(f"`temperature` must be a finite number >= 0, got {t!r}")
        if gc.do_sample and t == 0:
            raise ValueError("`temperature` must be strictly positive when do_sample=True "
                             "(temperature 0 means greedy: use do_sample=False)")
    k = gc.top_k
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0):
        raise ValueError(f"`top_k` must be an integer >= 0 (0 disables top-k), got {k!r}")
    p = gc.top_p
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0 < p <= 1):
        raise ValueError(f"`top_p` must be in (0, 1], got {p!r}")
    r = gc.repetition_penalty
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float, np.floating)) or not np.isfinite(r)
                          or r <= 0):
        raise ValueError(f"`repetition_penalty` must be a finite number > 0 (1.0 = no penalty), got {r!r}")
    for name in ("pad_token_id", "bos_token_id"):
        v = getattr(gc, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise ValueError(f"`{name}` must be an integer or None, got {v!r}")
    eos = gc.eos_token_id
    if eos is not None:
        items = [eos] if isinstance(eos, (int, np.integer)) else eos
        try:
            ok = all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in items)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"`eos_token_id` must be an integer or a list of integers, got {eos!r}")


_GENERATE_ARGS = {f.name for f in fields(GenerationConfig)} - {"extra"}
_NONE_MEANS_OFF = {"eos_token_id": [], "top_k": 0, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0}


def generate(
    model,
    input_ids=None,
    attention_mask=None,
    generation_config: GenerationConfig | None = None,
    logits_processor: Iterable[Callable] | None = None,
    stopping_criteria: Iterable[Callable] | None = None,
    streamer=None,
    seed: int | None = None,
    generator: np.random.Generator | None = None,
    return_dict_in_generate: bool = False,
    output_scores: bool = False,
    output_logits: bool = False,
    **kwargs,
):
    """Generate token ids with transformers' `generate` semantics (greedy or multinomial sampling).

    Arguments (transformers' names; "unset" values come from the checkpoint's generation_config.json,
    then config.json, then the defaults shown):
      input_ids        (batch, prompt_len) int array; None -> a (1, 1) array holding bos_token_id.
      attention_mask   (batch, prompt_len) 0/1, left padding for batches of unequal prompts; when absent it is
                       inferred like transformers: ids != pad_token_id if the pad token occurs (and differs from
                       eos), else all ones.
      max_new_tokens   tokens to generate at most (takes precedence over max_length).
      max_length       prompt + new tokens at most (default 20 + prompt length, capped at max_position_embeddings).
      min_new_tokens / min_length   eos is blocked (score -inf) until this many new / total tokens.
      do_sample        False (default): greedy argmax. True: draw from softmax of the processed scores.
      temperature (1.0), top_k (50; 0 disables), top_p (1.0), repetition_penalty (1.0): used as transformers does;
                       temperature, top_k and top_p only when do_sample=True.
      eos_token_id     int or list (instruction-tuned Gemma 2 stops on [1, 107]); a row stops at its first eos.
                       Passing None explicitly disables eos stopping, as in transformers (so does []).
      pad_token_id     fills rows that finished while others continue (default: the first eos id).
      use_cache        True (default): prefill once then one token per step with the KV cache; False recomputes
                       the whole sequence each step (slow; for checking the cache).
      seed / generator reproducible sampling: an int seed or a numpy Generator (default: fresh OS entropy).
      streamer         an object with put(ids)/end() (put first receives the prompt, then each step's (batch,)
                       tokens, as in transformers -- e.g. TextStreamer), or a plain callable called with each
                       step's (batch,) new tokens.
      logits_processor extra processors (callables (input_ids, scores) -> scores) run after the built-in
                       non-sampling ones and before temperature/top-k/top-p, as in transformers.
      stopping_criteria extra callables (input_ids, scores) -> bool or (batch,) bool; True finishes a row.
      return_dict_in_generate / output_scores / output_logits: return a GenerateDecoderOnlyOutput.

    Returns (batch, prompt_len + new) int64 ids (or GenerateDecoderOnlyOutput). Rows that finished early
    are padded with pad_token_id; generation stops when every row has finished.
    """
    unknown = [k for k in kwargs if k not in _GENERATE_ARGS]
    if unknown:
        raise TypeError(f"generate() got unsupported argument(s): {', '.join(sorted(unknown))} "
                        f"(supported: {', '.join(sorted(_GENERATE_ARGS))}, generation_config, logits_processor, "
                        "stopping_criteria, streamer, seed, generator, return_dict_in_generate, output_scores, "
                        "output_logits)")
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config must be a gemma2np GenerationConfig, got {type(generation_config).__name__}")
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None and not isinstance(generator, np.random.Generator):
        raise TypeError(f"generator must be a numpy.random.Generator, got {type(generator).__name__}")

    # ---- 1. settings: kwargs > generation_config argument > model's generation config > defaults
    base = generation_config if generation_config is not None else get_generation_config(model)
    gc = GenerationConfig(**{f: getattr(base, f) for f in _GENERATE_ARGS})
    for k, v in kwargs.items():
        if v is not None:
            setattr(gc, k, v)
        elif k in _NONE_MEANS_OFF:
            # transformers applies generate()'s keyword arguments last, None included, and then treats None as
            # "off": eos_token_id=None disables eos stopping, top_k=None disables top-k, temperature/top_p/
            # repetition_penalty=None are no-ops (measured on transformers 5.23). Length arguments and
            # pad/bos/do_sample/use_cache given as None stay unset (their defaults apply).
            setattr(gc, k, _NONE_MEANS_OFF[k])
    _validate(gc)
    user_set_max_length = gc.max_length is not None
    do_sample = bool(gc.do_sample if gc.do_sample is not None else _DEFAULTS["do_sample"])
    use_cache = bool(gc.use_cache if gc.use_cache is not None else _DEFAULTS["use_cache"])
    eos = _eos_list(gc.eos_token_id)
    pad = gc.pad_token_id
    if pad is None and eos:
        pad = eos[0]  # transformers: "Setting pad_token_id to eos_token_id"
    cfg = model.config

    # ---- 2. inputs
    if input_ids is None:
        if gc.bos_token_id is None:
            raise ValueError("input_ids is None and there is no bos_token_id to start from")
        input_ids = np.full((1, 1), gc.bos_token_id, dtype=np.int64)
    ids = np.asarray(input_ids)
    if ids.dtype == object or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, prompt_len) with prompt_len >= 1, got {ids.shape}")
    ids = ids.astype(np.int64)
    B, T0 = ids.shape
    if attention_mask is None:
        mask = np.ones((B, T0), dtype=np.int64)
        if pad is not None and (ids == pad).any() and pad not in eos:
            mask = (ids != pad).astype(np.int64)
    else:
        mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, expected {ids.shape} like input_ids")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask values must be 0 or 1")
        mask = mask.astype(np.int64)

    # ---- 3. lengths (transformers' _prepare_generated_length)
    if gc.max_new_tokens is not None:
        if user_set_max_length and kwargs.get("max_length") is not None:
            warnings.warn(f"both max_new_tokens (={gc.max_new_tokens}) and max_length (={gc.max_length}) are set: "
                          "max_new_tokens takes precedence", stacklevel=2)
        max_length = gc.max_new_tokens + T0
    elif user_set_max_length:
        max_length = gc.max_length
    else:
        max_length = _DEFAULTS["max_length"] + T0
        if getattr(cfg, "max_position_embeddings", None):
            max_length = min(max_length, cfg.max_position_embeddings)
    if T0 >= max_length:
        raise ValueError(f"input length is {T0} tokens but max_length is {max_length}: nothing to generate "
                         "(increase max_length or, better, set max_new_tokens)")
    min_length = gc.min_length if gc.min_length is not None else _DEFAULTS["min_length"]
    if gc.min_new_tokens is not None:
        min_length = gc.min_new_tokens + T0

    # ---- 4. processors, in transformers' order (_get_logits_processor)
    procs = LogitsProcessorList()
    rp = gc.repetition_penalty if gc.repetition_penalty is not None else _DEFAULTS["repetition_penalty"]
    if rp != 1.0:
        # left pads are not penalised: transformers passes (mask != 0).argmax(1) as prompt_ignore_length
        procs.append(RepetitionPenaltyLogitsProcessor(float(rp), prompt_ignore_length=(mask != 0).argmax(axis=1)))
    if eos and min_length > 0:
        procs.append(MinLengthLogitsProcessor(int(min_length), eos))
    if eos and gc.min_new_tokens is not None and gc.min_new_tokens > 0:
        procs.append(MinNewTokensLengthLogitsProcessor(T0, int(gc.min_new_tokens), eos))
    if logits_processor is not None:
        procs.extend(logits_processor)
    if do_sample:
        t = gc.temperature if gc.temperature is not None else _DEFAULTS["temperature"]
        k = gc.top_k if gc.top_k is not None else _DEFAULTS["top_k"]
        p = gc.top_p if gc.top_p is not None else _DEFAULTS["top_p"]
        if t != 1.0:
            procs.append(TemperatureLogitsWarper(float(t)))
        if k != 0:
            procs.append(TopKLogitsWarper(int(k)))
        if p < 1.0:
            procs.append(TopPLogitsWarper(float(p)))
        rng = generator if generator is not None else np.random.default_rng(seed)
    criteria = list(stopping_criteria) if stopping_criteria is not None else []

    if streamer is not None and not hasattr(streamer, "put"):
        if not callable(streamer):
            raise TypeError("streamer must have put()/end() methods or be a callable")
        streamer = _CallableStreamer(streamer)
    if streamer is not None:
        streamer.put(ids.copy())

    # ---- 5. prefill
    # position ids from the mask: a row's first real token is position 0 whatever its left padding
    # (transformers 5.23: cumsum(mask) - 1, pads filled with 0). Only real tokens' logits matter, and
    # pad keys are masked out, so the pads' own positions have no effect on the result.
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 0
    cache = Gemma2Cache(cfg.layer_types, cfg.sliding_window) if use_cache else None
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                use_cache=use_cache, logits_to_keep=1, return_dict=True)

    unfinished = np.ones(B, dtype=bool)
    all_scores, all_logits = [], []
    try:
        while True:
            # ---- 6. choose the next token of every row
            # float32 copy of the last position's (softcapped) logits, as transformers' `.to(torch.float32)`
            logits = np.array(out.logits[:, -1], dtype=np.float32)
            scores = procs(ids, logits)
            if output_scores:
                all_scores.append(scores)
            if output_logits:
                all_logits.append(logits)
            if do_sample:
                nxt = _sample_rows(scores, rng)
            else:
                # argmax returns the first maximal index, as torch.argmax does on CPU
                nxt = np.argmax(scores, axis=-1).astype(np.int64)
            if eos:
                nxt = np.where(unfinished, nxt, pad)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            # ---- 7. stopping: max_length for everyone, eos per row, user criteria
            done = np.full(B, ids.shape[1] >= max_length)
            if eos:
                done |= np.isin(ids[:, -1], eos)
            for crit in criteria:
                done |= np.broadcast_to(np.asarray(crit(ids, scores), dtype=bool), (B,))
            unfinished &= ~done
            if streamer is not None:
                streamer.put(nxt.copy())
            if not unfinished.any():
                break
            # ---- 8. next forward: one token with the cache (or the whole sequence without)
            mask = np.concatenate([mask, np.ones((B, 1), dtype=mask.dtype)], axis=1)
            pos = np.concatenate([pos, pos[:, -1:] + 1], axis=1)
            if use_cache:
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, -1:],
                            past_key_values=cache, use_cache=True,
                            cache_position=np.array([ids.shape[1] - 1], dtype=np.int64),
                            logits_to_keep=1, return_dict=True)
            else:
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                            logits_to_keep=1, return_dict=True)
    finally:
        if streamer is not None:
            streamer.end()

    if return_dict_in_generate:
        return GenerateDecoderOnlyOutput(
            sequences=ids,
            scores=tuple(all_scores) if output_scores else None,
            logits=tuple(all_logits) if output_logits else None,
            past_key_values=cache,
        )
    return ids


def _sample_rows(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from softmax(scores) (transformers: softmax + torch.multinomial).

    Numerics: the softmax is taken in float64 (max subtracted; -inf scores give exactly 0) and the draw
    is the inverse CDF of one uniform per row, `searchsorted(cumsum(p), u * sum(p))`, so a token with
    probability 0 is never drawn and the result depends only on the seed and the scores. torch's RNG
    stream cannot be reproduced, so sampled tokens match transformers in distribution, not draw for draw.
    """
    s = scores.astype(np.float64)
    if not np.isfinite(s.max(axis=-1)).all():
        raise ValueError("every token was filtered out (all scores are -inf or NaN): cannot sample")
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    cdf = np.cumsum(e, axis=-1)
    u = rng.random(scores.shape[0]) * cdf[:, -1]
    out = np.empty(scores.shape[0], dtype=np.int64)
    for b in range(scores.shape[0]):
        j = int(np.searchsorted(cdf[b], u[b], side="right"))
        out[b] = min(j, scores.shape[1] - 1)
    return out
