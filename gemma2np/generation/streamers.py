"""Streamers: generate() hands them the prompt, then each step's new tokens (transformers' streamers.py)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .configuration import GenerationError, GenerationTypeError


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
            raise GenerationError("TextStreamer only supports batch size 1")
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


def as_streamer(streamer):
    """None, an object with put()/end(), or a plain callable (wrapped so it sees only the new tokens)."""
    if streamer is None or hasattr(streamer, "put"):
        return streamer
    if not callable(streamer):
        raise GenerationTypeError("streamer must have put()/end() methods or be a callable")
    return _CallableStreamer(streamer)
