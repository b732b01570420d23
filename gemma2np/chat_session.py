"""A multi-turn chat with Gemma 2's template that keeps the KV cache between turns (what `gemma2np chat` runs).

Each turn only the new tokens go through the model: the cache already holds the conversation so far, the
model's replies included. The conversation is kept as token ids, exactly as they were fed or generated (the
reply is not re-tokenized from its text, as llama.cpp does too), and a new turn appends

    [<end_of_turn>]  "\\n<start_of_turn>user\\n" + message.strip() + "<end_of_turn>\\n<start_of_turn>model\\n"

(the <end_of_turn> only when the reply did not end with it), which is what Gemma 2's chat template renders
between two turns. The first turn is the template's own rendering (<bos> included).

Numerics: greedy replies are token for token those of a recomputation over the whole conversation; the logits
agree to float32 rounding, not bitwise, because the reply's keys/values were computed one token at a time
(a (1, d) matrix product) where a recomputation computes them in one batched prefill, and the BLAS kernels
round those two differently (see tests/test_chat_session.py).

When the conversation plus a reply would outgrow the context, the oldest exchanges are dropped and the rest is
re-rendered with the template and prefilled afresh. A reply interrupted with Ctrl-C (KeyboardInterrupt) keeps
the text produced so far in the conversation; the cache, possibly left half-updated by the interrupted forward
pass, is dropped, so the next turn prefills the whole conversation once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .generation import get_generation_config
from .generation.configuration import GenerationError, eos_list

DEFAULT_MAX_NEW_TOKENS = 200  # when neither the caller nor generation_config.json sets max_new_tokens


@dataclass
class TurnResult:
    """What one turn did: the reply and how much work it took."""

    reply: str
    reply_ids: list[int]
    prefilled: int  # tokens fed to the model in the prefill of this turn
    cached: int  # tokens of the conversation already in the cache (not recomputed)
    new_tokens: int
    time_to_first_token: float  # seconds from the start of the turn to the first new token
    decode_seconds: float  # from the first to the last new token
    interrupted: bool = False
    truncated_history: bool = False  # old exchanges were dropped to fit the context

    @property
    def tokens_per_second(self) -> float:
        """Decode speed after the first token (nan with fewer than two tokens)."""
        if self.new_tokens < 2 or self.decode_seconds <= 0:
            return float("nan")
        return (self.new_tokens - 1) / self.decode_seconds


class _TurnStreamer:
    """Forwards to the user's streamer; records the new tokens and when the first one arrived."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens: list[int] = []
        self.first: float | None = None
        self.last: float | None = None
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            self.last = now
            self.tokens.extend(int(v) for v in np.asarray(value).reshape(-1))
        self._prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


@dataclass
class ChatSession:
    """Talk to a causal LM with Gemma 2's chat template, reusing the KV cache across turns.

    generate_kwargs go to every generate() call (do_sample, temperature, ...); unset ones come from the
    checkpoint's generation_config.json as usual. `reuse_cache=False` recomputes the whole conversation
    each turn (for checking). eos: the model's eos ids plus <end_of_turn>.
    """

    model: object
    tokenizer: object
    generate_kwargs: dict = field(default_factory=dict)
    max_new_tokens: int | None = None
    seed: int | None = None
    reuse_cache: bool = True

    def __post_init__(self):
        gc = get_generation_config(self.model)
        if self.max_new_tokens is None:
            self.max_new_tokens = gc.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        for k in ("max_new_tokens", "eos_token_id", "num_return_sequences", "past_key_values", "seed", "generator",
                  "tokenizer", "streamer"):
            if k in self.generate_kwargs:
                raise GenerationError(f"ChatSession sets `{k}` itself (pass max_new_tokens= / seed= to ChatSession)")
        self.eot = self._end_of_turn_id()
        self.eos_token_id = eos_list(gc.eos_token_id) + ([self.eot] if self.eot is not None else [])
        self.context = self.model.config.max_position_embeddings
        self.rng = np.random.default_rng(self.seed)  # one stream for the session: turns differ, sessions repeat
        self.reset()

    def _end_of_turn_id(self) -> int | None:
        try:
            eot = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        except (ValueError, KeyError):
            return None
        return eot if isinstance(eot, int) and eot != getattr(self.tokenizer, "unk_token_id", None) else None

    def reset(self) -> None:
        """Forget the conversation."""
        self.messages: list[dict] = []
        self.ids: list[int] = []  # the conversation as fed / generated, the last reply token included
        self.cache = None  # holds the keys/values of ids[:-1] (the last token has not been fed yet)

    # ------------------------------------------------------------------ turn tokens
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _next_turn_ids(self, message: str) -> list[int]:
        """The tokens the template puts after the conversation so far for a new user message."""
        if not self.ids:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], add_generation_prompt=True, return_dict=False))
        close = [] if self.eot is not None and self.ids[-1] == self.eot else self._encode("<end_of_turn>")
        return close + self._encode("\n<start_of_turn>user\n" + message.strip() + "<end_of_turn>\n"
                                    "<start_of_turn>model\n")

    def _rerender(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))

    # ------------------------------------------------------------------ one turn
    def send(self, message: str, streamer=None) -> TurnResult:
        """Add a user message, generate the reply (streamed to `streamer`), return what happened.

        Ctrl-C (KeyboardInterrupt) while the reply is generated ends the reply early: the result has
        interrupted=True and the session goes on."""
        if not isinstance(message, str) or not message.strip():
            raise GenerationError("message must be a non-empty string")
        start = time.perf_counter()
        messages = self.messages + [{"role": "user", "content": message}]
        ids = self.ids + self._next_turn_ids(message)
        cache = self.cache if self.reuse_cache else None
        truncated = False
        # no room for the reply: drop the oldest exchanges, re-render the rest, prefill it afresh
        while len(messages) > 1 and len(ids) + self.max_new_tokens > self.context:
            messages = messages[2:]
            ids, cache, truncated = self._rerender(messages), None, True
        if len(ids) >= self.context:
            raise GenerationError(f"the message is {len(ids)} tokens; the context is {self.context} tokens")
        max_new = min(self.max_new_tokens, self.context - len(ids))
        cached = cache.get_seq_length() if cache is not None else 0
        rec = _TurnStreamer(streamer)
        interrupted = False
        try:
            out = self.model.generate(
                np.asarray([ids], dtype=np.int64), **self.generate_kwargs, max_new_tokens=max_new,
                eos_token_id=self.eos_token_id, generator=self.rng, streamer=rec, past_key_values=cache,
                tokenizer=self.tokenizer, return_dict_in_generate=True)
            reply_ids = [int(t) for t in out.sequences[0, len(ids):]]
            self.cache = out.past_key_values if self.reuse_cache else None
        except KeyboardInterrupt:
            interrupted = True
            reply_ids = rec.tokens
            self.cache = None  # the interrupted forward pass may have updated only some layers
        self.ids = ids + reply_ids
        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        first = rec.first if rec.first is not None else time.perf_counter()
        return TurnResult(
            reply=reply, reply_ids=reply_ids, prefilled=len(ids) - cached, cached=cached, new_tokens=len(rec.tokens),
            time_to_first_token=first - start, decode_seconds=(rec.last or first) - first, interrupted=interrupted,
            truncated_history=truncated)
