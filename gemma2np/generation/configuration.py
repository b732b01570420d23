"""Generation settings: `GenerationConfig`, where its values come from, and their checks.

Precedence, as in transformers 5.23: explicit generate() arguments > the `generation_config` argument >
the checkpoint's generation_config.json > the model's config.json (eos/pad/bos) > transformers' global
defaults (`DEFAULTS`: max_length 20, top_k 50, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import numpy as np

from ..safeio import read_json_file

GENERATION_CONFIG_NAME = "generation_config.json"


class GenerationError(ValueError):
    """A generate() argument or generation setting gemma2np refuses; the message names the argument."""


class GenerationTypeError(GenerationError, TypeError):
    """An argument of the wrong kind (e.g. an unknown keyword, a generator that is not a numpy Generator).
    Also a TypeError, as Python raises for unexpected keywords."""


# transformers' GenerationConfig._get_default_generation_params(): used when neither the caller nor the
# checkpoint's generation_config.json sets a value.
DEFAULTS = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "use_cache": True,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
}


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
    min_p: float | None = None
    no_repeat_ngram_size: int | None = None
    num_return_sequences: int | None = None
    stop_strings: str | list[str] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    use_cache: bool | None = None
    # transformers 5.23's GenerationConfig.prefill_chunk_size: None (default) prefills the prompt in one forward;
    # n feeds it through the model n tokens at a time with the cache (the last chunk may be shorter)
    prefill_chunk_size: int | None = None
    extra: dict = field(default_factory=dict, repr=False)  # other keys of generation_config.json (ignored)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        names = setting_names()
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "GenerationConfig | None":
        """Read `directory/generation_config.json`; None when the file is absent."""
        path = os.path.join(os.fspath(directory), GENERATION_CONFIG_NAME)
        if not os.path.isfile(path):
            return None
        # the strict reader (bounded nesting / integer literals, UTF-8, regular files only): a hostile file is a
        # GenerationError, never a RecursionError or a blocked read
        d = read_json_file(path, GenerationError)
        if not isinstance(d, dict):
            raise GenerationError(f"{path!r} must hold a JSON object")
        return cls.from_dict(d)

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        return cls(eos_token_id=getattr(config, "eos_token_id", None),
                   pad_token_id=getattr(config, "pad_token_id", None),
                   bos_token_id=getattr(config, "bos_token_id", None))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {k: v for k, v in d.items() if v is not None}


def setting_names() -> set[str]:
    """The settings generate() accepts as keyword arguments (every GenerationConfig field but `extra`)."""
    return {f.name for f in fields(GenerationConfig)} - {"extra"}


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


def eos_list(eos) -> list[int]:
    """eos_token_id (None, an int or a list) as a list of ints."""
    if eos is None:
        return []
    if isinstance(eos, (int, np.integer)):
        return [int(eos)]
    return [int(e) for e in eos]


# ============================================================================ checks


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _check_int(name, v, minimum):
    if v is not None and (not _is_int(v) or v < minimum):
        raise GenerationError(f"`{name}` must be an integer >= {minimum}, got {v!r}")


def check_seed(seed) -> None:
    """seed: None or an integer >= 0 (what numpy.random.default_rng accepts as one number)."""
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise GenerationError(f"`seed` must be an integer >= 0 or None, got {seed!r}")


def validate(gc: GenerationConfig) -> None:
    """Clear errors for nonsense values (transformers raises for the same ones, at generate or processor time;
    gemma2np also refuses values transformers silently ignores, such as a negative no_repeat_ngram_size)."""
    _check_int("max_new_tokens", gc.max_new_tokens, 1)
    _check_int("max_length", gc.max_length, 1)
    _check_int("min_new_tokens", gc.min_new_tokens, 0)
    _check_int("min_length", gc.min_length, 0)
    _check_int("no_repeat_ngram_size", gc.no_repeat_ngram_size, 0)
    _check_int("num_return_sequences", gc.num_return_sequences, 1)
    _check_int("prefill_chunk_size", gc.prefill_chunk_size, 1)
    if gc.prefill_chunk_size is not None and gc.use_cache is False:
        # transformers 5.23 (_prefill): "Cannot use prefill chunking without a cache" (chunks pass their keys
        # to the next chunk through the cache)
        raise GenerationError("`prefill_chunk_size` needs the KV cache: it cannot be combined with use_cache=False")
    for name in ("do_sample", "use_cache"):
        v = getattr(gc, name)
        if v is not None and not isinstance(v, (bool, np.bool_)):
            raise GenerationError(f"`{name}` must be True, False or None, got {v!r}")
    t = gc.temperature
    if t is not None:
        if not _is_number(t) or not np.isfinite(t) or t < 0:
            raise GenerationError(f"`temperature` must be a finite number >= 0, got {t!r}")
        if gc.do_sample and t == 0:
            raise GenerationError("`temperature` must be strictly positive when do_sample=True "
                                  "(temperature 0 means greedy: use do_sample=False)")
    k = gc.top_k
    if k is not None and (not _is_int(k) or k < 0):
        raise GenerationError(f"`top_k` must be an integer >= 0 (0 disables top-k), got {k!r}")
    p = gc.top_p
    if p is not None and (not _is_number(p) or not 0 < p <= 1):
        raise GenerationError(f"`top_p` must be in (0, 1], got {p!r}")
    m = gc.min_p
    if m is not None and (not _is_number(m) or not 0 <= m <= 1):
        raise GenerationError(f"`min_p` must be in [0, 1], got {m!r}")
    r = gc.repetition_penalty
    if r is not None and (not _is_number(r) or not np.isfinite(r) or r <= 0):
        raise GenerationError(f"`repetition_penalty` must be a finite number > 0 (1.0 = no penalty), got {r!r}")
    for name in ("pad_token_id", "bos_token_id"):
        v = getattr(gc, name)
        if v is not None and not _is_int(v):
            raise GenerationError(f"`{name}` must be an integer or None, got {v!r}")
    eos = gc.eos_token_id
    if eos is not None:
        items = [eos] if isinstance(eos, (int, np.integer)) else eos
        try:
            ok = not isinstance(items, (str, bytes)) and all(_is_int(e) for e in items)
        except TypeError:
            ok = False
        if not ok:
            raise GenerationError(f"`eos_token_id` must be an integer or a list of integers, got {eos!r}")
    ss = gc.stop_strings
    if ss is not None:
        items = [ss] if isinstance(ss, str) else ss
        if not isinstance(items, (list, tuple)) or not items or not all(isinstance(x, str) and x for x in items):
            raise GenerationError(f"`stop_strings` must be a non-empty string or a list of non-empty strings, got {ss!r}")
    if gc.num_return_sequences is not None and gc.num_return_sequences > 1 and not gc.do_sample:
        # transformers 5.23's GenerationConfig.validate raises the same (greedy rows would all be identical)
        raise GenerationError("Greedy methods (do_sample != True) without beam search do not support "
                              f"`num_return_sequences` different than 1 (got {gc.num_return_sequences}).")
