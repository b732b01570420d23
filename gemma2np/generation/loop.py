"""generate(): transformers' greedy / multinomial-sampling loop, as a sequence of named steps.

What one call does, in transformers 5.23's order (generation/utils.py `generate` -> `_sample`):

    resolve_settings        explicit arguments > generation_config > generation_config.json > config.json > defaults
    prepare_inputs          input_ids / attention_mask checked, the mask inferred when absent, each row
                            repeated num_return_sequences times
    prepare_lengths         max_length / min_length from max_new_tokens, max_length, min_new_tokens ...
    build_logits_processors repetition penalty, no-repeat n-grams, min lengths, the caller's processors, then
                            (sampling only) temperature, top-k, top-p, min-p
    build_stopping_criteria max_length, stop strings, eos, the caller's criteria
    prefill                 the whole prompt in ONE forward pass, or prefill_chunk_size tokens at a time with
                            the cache (logits of the last position only)
    loop:  last_logits -> processors -> pick_next_tokens (sample, or backend.argmax) -> pad finished rows -> append
           -> stopping criteria -> stream -> decode_step (one token with the KV cache)

Returns (batch, prompt + new) token ids; stops as soon as every row has finished.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from ..cache import Gemma2Cache
from ..outputs import ModelOutput
from .configuration import (
    DEFAULTS,
    GenerationConfig,
    GenerationError,
    GenerationTypeError,
    check_seed,
    eos_list,
    get_generation_config,
    setting_names,
    validate,
)
from .logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from .picking import pick_next_tokens
from .stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StopStringCriteria, StoppingCriteriaList
from .streamers import as_streamer


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """return_dict_in_generate=True: sequences plus, on request, per-step processed scores / raw logits."""

    sequences: np.ndarray | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    past_key_values: Any = None


# transformers applies generate()'s keyword arguments last, None included, and then treats None as "off" for
# these (measured on transformers 5.23): eos_token_id=None disables eos stopping, top_k=None disables top-k,
# temperature/top_p/repetition_penalty=None are no-ops. Length arguments and pad/bos/do_sample/use_cache given
# as None stay unset (their defaults apply).
_NONE_MEANS_OFF = {"eos_token_id": [], "top_k": 0, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0}


def _setting(gc: GenerationConfig, name: str):
    """A resolved setting: its value, or transformers' default when unset."""
    v = getattr(gc, name)
    return DEFAULTS[name] if v is None else v


# ============================================================================ steps before the loop


def resolve_settings(model, generation_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    """kwargs > generation_config argument > the model's generation config (generation_config.json) > defaults."""
    base = generation_config if generation_config is not None else get_generation_config(model)
    gc = GenerationConfig(**{f: getattr(base, f) for f in setting_names()})
    for k, v in kwargs.items():
        if v is not None:
            setattr(gc, k, v)
        elif k in _NONE_MEANS_OFF:
            setattr(gc, k, _NONE_MEANS_OFF[k])
    validate(gc)
    return gc


def _as_array(name: str, value) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise GenerationError(f"{name} must be a rectangular (batch, length) array of integers: {e}") from None


def prepare_inputs(gc: GenerationConfig, input_ids, attention_mask, pad: int | None, eos: list[int]):
    """-> (ids, mask): (B * num_return_sequences, T0) int64 each. No input_ids: start from bos. No mask: inferred
    like transformers (ids != pad_token_id if the pad token occurs and differs from eos, else all ones).
    num_return_sequences > 1 repeats each row in place (transformers' repeat_interleave: rows 0, 0, 1, 1, ...)."""
    if input_ids is None:
        if gc.bos_token_id is None:
            raise GenerationError("input_ids is None and there is no bos_token_id to start from")
        input_ids = np.full((1, 1), gc.bos_token_id, dtype=np.int64)
    ids = _as_array("input_ids", input_ids)
    if ids.dtype == object or not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(f"input_ids must be an integer array, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GenerationError(f"input_ids must have shape (batch, prompt_len) with prompt_len >= 1, got {ids.shape}")
    ids = ids.astype(np.int64)
    B, T0 = ids.shape
    if attention_mask is None:
        mask = np.ones((B, T0), dtype=np.int64)
        if pad is not None and (ids == pad).any() and pad not in eos:
            mask = (ids != pad).astype(np.int64)
    else:
        mask = _as_array("attention_mask", attention_mask)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise GenerationError(f"attention_mask has shape {mask.shape}, expected {ids.shape} like input_ids")
        if mask.dtype == object or not np.isin(mask, (0, 1)).all():
            raise GenerationError("attention_mask values must be 0 or 1")
        mask = mask.astype(np.int64)
    n = _setting(gc, "num_return_sequences")
    if n > 1:
        ids, mask = np.repeat(ids, n, axis=0), np.repeat(mask, n, axis=0)
    return ids, mask


def prepare_lengths(gc: GenerationConfig, prompt_len: int, config, max_length_passed: bool) -> tuple[int, int]:
    """-> (max_length, min_length), both counting the prompt (transformers' _prepare_generated_length)."""
    if gc.max_new_tokens is not None:
        if gc.max_length is not None and max_length_passed:
            warnings.warn(f"both max_new_tokens (={gc.max_new_tokens}) and max_length (={gc.max_length}) are set: "
                          "max_new_tokens takes precedence", stacklevel=4)
        max_length = gc.max_new_tokens + prompt_len
    elif gc.max_length is not None:
        max_length = gc.max_length
    else:
        max_length = DEFAULTS["max_length"] + prompt_len
        if getattr(config, "max_position_embeddings", None):
            max_length = min(max_length, config.max_position_embeddings)
    if prompt_len >= max_length:
        raise GenerationError(f"input length is {prompt_len} tokens but max_length is {max_length}: nothing to generate "
                         "(increase max_length or, better, set max_new_tokens)")
    min_length = _setting(gc, "min_length")
    if gc.min_new_tokens is not None:
        min_length = gc.min_new_tokens + prompt_len
    return max_length, min_length


def build_logits_processors(gc: GenerationConfig, prompt_len: int, mask: np.ndarray, min_length: int,
                            eos: list[int], do_sample: bool, extra: Iterable[Callable] | None) -> LogitsProcessorList:
    """The processors, in transformers' order (_get_logits_processor)."""
    procs = LogitsProcessorList()
    rp = _setting(gc, "repetition_penalty")
    if rp != 1.0:
        # left pads are not penalised: transformers passes (mask != 0).argmax(1) as prompt_ignore_length
        procs.append(RepetitionPenaltyLogitsProcessor(float(rp), prompt_ignore_length=(mask != 0).argmax(axis=1)))
    if _setting(gc, "no_repeat_ngram_size") > 0:
        procs.append(NoRepeatNGramLogitsProcessor(int(gc.no_repeat_ngram_size)))
    if eos and min_length > 0:
        procs.append(MinLengthLogitsProcessor(int(min_length), eos))
    if eos and gc.min_new_tokens is not None and gc.min_new_tokens > 0:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, int(gc.min_new_tokens), eos))
    if extra is not None:
        procs.extend(extra)
    if do_sample:  # the former "logits warpers": only when sampling
        t, k, p = _setting(gc, "temperature"), _setting(gc, "top_k"), _setting(gc, "top_p")
        if t != 1.0:
            procs.append(TemperatureLogitsWarper(float(t)))
        if k != 0:
            procs.append(TopKLogitsWarper(int(k)))
        if p < 1.0:
            procs.append(TopPLogitsWarper(float(p)))
        if gc.min_p is not None:  # after temperature, as transformers (and llama.cpp) apply it
            procs.append(MinPLogitsWarper(float(gc.min_p)))
    return procs


def build_stopping_criteria(gc: GenerationConfig, max_length: int, eos: list[int], tokenizer,
                            extra: Iterable[Callable] | None) -> StoppingCriteriaList:
    """max_length for everyone, stop strings and eos per row, then the caller's criteria (transformers'
    _get_stopping_criteria; a row is done when any of them says so)."""
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length)])
    if gc.stop_strings is not None:
        if tokenizer is None:
            raise GenerationError("stop_strings need the model's tokenizer to find them in the token ids: "
                                  "pass tokenizer=... to generate() (as transformers requires)")
        criteria.append(StopStringCriteria(tokenizer, gc.stop_strings))
    if eos:
        criteria.append(EosTokenCriteria(eos))
    if extra is not None:
        criteria.extend(extra)
    return criteria


# ============================================================================ forward passes


@dataclass
class DecodeState:
    """What the forward passes need between steps: the sequences so far, their mask and positions, the cache."""

    ids: np.ndarray  # (B, T) int64, prompt + tokens chosen so far
    mask: np.ndarray  # (B, T') int64 attention mask of the tokens fed so far (T' = T after prefill)
    pos: np.ndarray  # (B, T') int64 position ids
    cache: Gemma2Cache | None


def prefill(model, ids: np.ndarray, mask: np.ndarray, use_cache: bool, cache: Gemma2Cache | None = None,
            capacity: int | None = None, chunk_size: int | None = None):
    """The prompt through the model -> (state, output with the last position's logits).

    position ids from the mask: a row's first real token is position 0 whatever its left padding
    (transformers 5.23: cumsum(mask) - 1, pads filled with 0). Only real tokens' logits matter, and
    pad keys are masked out, so the pads' own positions have no effect on the result.
    `logits_to_keep=1`: the LM head (the largest matmul of a small model) runs for the last position only.

    cache: a Gemma2Cache that already holds the first `cache.get_seq_length()` tokens of `ids` (a previous
    generate() call, e.g. the earlier turns of a chat): only the tokens after them are fed, at their absolute
    cache positions, with the attention mask of the whole sequence -- as transformers does when generate() is
    given past_key_values.
    capacity: the most tokens the cache will hold (generate's max_length), so it is allocated once instead of
    growing by doubling (gemma2np/cache.py).
    chunk_size: None feeds the (new part of the) prompt in ONE forward pass. An int n feeds it n tokens at a
    time, transformers 5.23's `prefill_chunk_size` (generation/utils.py `_prefill`): chunk k gets its tokens,
    their positions and cache positions, and the attention mask up to its end; the cache carries the keys
    from chunk to chunk, and the output of the last chunk is returned. The activations of one forward are
    then those of n tokens, not of the whole prompt (an 8k prompt's MLP alone is ~0.9 GB per tensor in
    float32). What stays bitwise equal to the one-shot prefill is in docs/precision.md ("Chunked prefill").
    """
    cfg = model.config
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 0
    if cache is None and use_cache:
        cache = Gemma2Cache(cfg.layer_types, cfg.sliding_window, capacity=capacity,
                            dtype=getattr(model, "cache_dtype", None))  # from_pretrained(cache_dtype=)
        seen = 0
    elif cache is not None:
        cache.reserve(capacity)
        seen = cache.get_seq_length()
    if cache is None:  # use_cache=False (generate() refuses it with a chunk size)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1,
                    return_dict=True)
        return DecodeState(ids, mask, pos, None), out
    T = ids.shape[1]
    starts = [seen] if chunk_size is None else range(seen, T, chunk_size)
    for a in starts:
        b = T if chunk_size is None else min(a + chunk_size, T)
        # a fresh cache fed the whole prompt at once takes the plain call (cache_position and the mask are then
        # the model's defaults, as before); every other call names its cache positions
        kw = {} if a == 0 and b == T else dict(cache_position=np.arange(a, b, dtype=np.int64))
        out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
                    past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True, **kw)
    return DecodeState(ids, mask, pos, cache), out


def check_past_cache(cache, ids: np.ndarray, use_cache: bool, num_return_sequences: int) -> None:
    """A past_key_values given to generate() must be a Gemma2Cache of the same batch holding a proper prefix."""
    if not isinstance(cache, Gemma2Cache):
        raise GenerationTypeError(f"past_key_values must be a Gemma2Cache (from an earlier generate(..., "
                                  f"return_dict_in_generate=True)), got {type(cache).__name__}")
    if not use_cache:
        raise GenerationError("past_key_values given with use_cache=False: the cache would be ignored")
    if num_return_sequences > 1:
        raise GenerationError("past_key_values cannot be combined with num_return_sequences > 1")
    seen = cache.get_seq_length()
    if not 0 <= seen < ids.shape[1]:
        raise GenerationError(f"past_key_values holds {seen} tokens but input_ids has {ids.shape[1]}: input_ids must "
                              "hold the cached tokens plus at least one new token")
    batches = {s[0] for s in map(cache.layer_shape, range(len(cache))) if s is not None}
    if batches and batches != {ids.shape[0]}:
        raise GenerationError(f"past_key_values has batch size {sorted(batches)} but input_ids has {ids.shape[0]} rows")


def decode_step(model, state: DecodeState, new_tokens: np.ndarray):
    """One new token per row: the mask grows by a column of ones, positions advance by one; with the cache only
    the new token is fed (cache_position = its index), without it the whole sequence is recomputed."""
    B = state.ids.shape[0]
    state.mask = np.concatenate([state.mask, np.ones((B, 1), dtype=state.mask.dtype)], axis=1)
    state.pos = np.concatenate([state.pos, state.pos[:, -1:] + 1], axis=1)
    if state.cache is not None:
        return model(input_ids=new_tokens[:, None], attention_mask=state.mask, position_ids=state.pos[:, -1:],
                     past_key_values=state.cache, use_cache=True,
                     cache_position=np.array([state.ids.shape[1] - 1], dtype=np.int64),
                     logits_to_keep=1, return_dict=True)
    return model(input_ids=state.ids, attention_mask=state.mask, position_ids=state.pos, use_cache=False,
                 logits_to_keep=1, return_dict=True)


def last_logits(out) -> np.ndarray:
    """float32 copy of the last position's (softcapped) logits, as transformers' `.to(torch.float32)`."""
    return np.array(out.logits[:, -1], dtype=np.float32)


# ============================================================================ generate


def _check_call(kwargs: dict, generation_config, seed, generator, streamer, logits_processor, stopping_criteria,
                flags: dict) -> None:
    """Arguments of the wrong kind -> GenerationTypeError / GenerationError naming the argument."""
    unknown = [k for k in kwargs if k not in setting_names()]
    if unknown:
        raise GenerationTypeError(
            f"generate() got unsupported argument(s): {', '.join(sorted(unknown))} "
            f"(supported: {', '.join(sorted(setting_names()))}, generation_config, logits_processor, "
            "stopping_criteria, streamer, tokenizer, past_key_values, seed, generator, return_dict_in_generate, "
            "output_scores, "
            "output_logits)")
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise GenerationTypeError(
            f"generation_config must be a gemma2np GenerationConfig, got {type(generation_config).__name__}")
    check_seed(seed)
    if seed is not None and generator is not None:
        raise GenerationError("pass either seed or generator, not both")
    if generator is not None and not isinstance(generator, np.random.Generator):
        raise GenerationTypeError(f"generator must be a numpy.random.Generator, got {type(generator).__name__}")
    if streamer is not None and not hasattr(streamer, "put") and not callable(streamer):
        raise GenerationTypeError(f"streamer must have put()/end() methods or be a callable, got {type(streamer).__name__}")
    for name, fns in (("logits_processor", logits_processor), ("stopping_criteria", stopping_criteria)):
        if fns is None:
            continue
        if isinstance(fns, (str, bytes)) or not hasattr(fns, "__iter__") or not all(callable(f) for f in fns):
            raise GenerationTypeError(f"{name} must be a list of callables (input_ids, scores) -> ..., got {fns!r}")
    for name, v in flags.items():
        if v is not None and not isinstance(v, (bool, np.bool_)):  # None: unset, i.e. False
            raise GenerationTypeError(f"`{name}` must be True or False, got {v!r}")


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
    tokenizer=None,
    past_key_values: Gemma2Cache | None = None,
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
      temperature (1.0), top_k (50; 0 disables), top_p (1.0), min_p (unset), repetition_penalty (1.0): used as
                       transformers does; temperature, top_k, top_p and min_p only when do_sample=True.
      no_repeat_ngram_size  n > 0: never generate an n-gram already in the sequence (prompt included).
      num_return_sequences  each prompt row is repeated this many times (rows 0, 0, 1, 1, ...); > 1 needs
                       do_sample=True, as in transformers.
      stop_strings     a string or list: a row stops once its text ends with one of them (needs tokenizer=).
      eos_token_id     int or list (instruction-tuned Gemma 2 stops on [1, 107]); a row stops at its first eos.
                       Passing None explicitly disables eos stopping, as in transformers (so does []).
      pad_token_id     fills rows that finished while others continue (default: the first eos id).
      use_cache        True (default): prefill once then one token per step with the KV cache; False recomputes
                       the whole sequence each step (slow; for checking the cache).
      prefill_chunk_size  None (default): the prompt in one forward pass. n >= 1: n tokens per forward with the
                       cache (transformers' chunked prefill; the last chunk may be shorter), so a long prompt's
                       activations are those of n tokens. Needs use_cache. docs/precision.md says when the result
                       is bitwise the one-shot prefill's.
      seed / generator reproducible sampling: an int seed >= 0 or a numpy Generator (default: fresh OS entropy).
      streamer         an object with put(ids)/end() (put first receives the prompt, then each step's (batch,)
                       tokens, as in transformers -- e.g. TextStreamer), or a plain callable called with each
                       step's (batch,) new tokens.
      logits_processor extra processors (callables (input_ids, scores) -> scores) run after the built-in
                       non-sampling ones and before temperature/top-k/top-p/min-p, as in transformers.
      stopping_criteria extra callables (input_ids, scores) -> bool or (batch,) bool; True finishes a row.
      tokenizer        the model's tokenizer (a GemmaTokenizer); only needed for stop_strings.
      past_key_values  a Gemma2Cache holding the first tokens of input_ids (returned by an earlier call with
                       return_dict_in_generate=True): only the rest is prefilled, e.g. a chat's new turn. It is
                       updated in place.
      return_dict_in_generate / output_scores / output_logits: return a GenerateDecoderOnlyOutput.

    Returns (batch * num_return_sequences, prompt_len + new) int64 ids (or GenerateDecoderOnlyOutput). Rows that
    finished early are padded with pad_token_id; generation stops when every row has finished.
    Bad arguments raise GenerationError (a ValueError; GenerationTypeError, also a TypeError, for wrong kinds).
    """
    _check_call(kwargs, generation_config, seed, generator, streamer, logits_processor, stopping_criteria,
                dict(return_dict_in_generate=return_dict_in_generate, output_scores=output_scores,
                     output_logits=output_logits))
    gc = resolve_settings(model, generation_config, kwargs)
    do_sample = bool(_setting(gc, "do_sample"))
    use_cache = bool(_setting(gc, "use_cache"))
    eos = eos_list(gc.eos_token_id)
    pad = gc.pad_token_id
    if pad is None and eos:
        pad = eos[0]  # transformers: "Setting pad_token_id to eos_token_id"
    ids, mask = prepare_inputs(gc, input_ids, attention_mask, pad, eos)
    B, T0 = ids.shape
    if past_key_values is not None:
        check_past_cache(past_key_values, ids, use_cache, _setting(gc, "num_return_sequences"))
    max_length, min_length = prepare_lengths(gc, T0, model.config, kwargs.get("max_length") is not None)
    procs = build_logits_processors(gc, T0, mask, min_length, eos, do_sample, logits_processor)
    criteria = build_stopping_criteria(gc, max_length, eos, tokenizer, stopping_criteria)
    rng = (generator if generator is not None else np.random.default_rng(seed)) if do_sample else None
    streamer = as_streamer(streamer)
    if streamer is not None:
        streamer.put(ids.copy())

    # the cache is allocated once for max_length tokens (capped at the context the model was made for: a
    # max_new_tokens of 10**6 must not reserve gigabytes up front; past the cap the cache grows by doubling)
    capacity = min(max_length, model.config.max_position_embeddings)
    state, out = prefill(model, ids, mask, use_cache, past_key_values, capacity=capacity,
                         chunk_size=gc.prefill_chunk_size)
    unfinished = np.ones(B, dtype=bool)
    all_scores, all_logits = [], []
    try:
        while True:
            logits = last_logits(out)
            scores = procs(state.ids, logits)
            if output_scores:
                all_scores.append(scores)
            if output_logits:
                all_logits.append(logits)
            nxt = pick_next_tokens(scores, do_sample, rng, model.backend)
            if eos:  # rows that already finished get pad_token_id (transformers: only with an eos criterion)
                nxt = np.where(unfinished, nxt, pad)
            state.ids = np.concatenate([state.ids, nxt[:, None]], axis=1)
            unfinished &= ~criteria(state.ids, scores)
            if streamer is not None:
                streamer.put(nxt.copy())
            if not unfinished.any():
                break
            out = decode_step(model, state, nxt)
    finally:
        if streamer is not None:
            streamer.end()

    if return_dict_in_generate:
        return GenerateDecoderOnlyOutput(
            sequences=state.ids,
            scores=tuple(all_scores) if output_scores else None,
            logits=tuple(all_logits) if output_logits else None,
            past_key_values=state.cache,
        )
    return state.ids
