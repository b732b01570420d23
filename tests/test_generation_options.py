"""generate()'s transformers options beyond the basics: min_p, no_repeat_ngram_size, stop_strings and
num_return_sequences; each processor / criterion against a brute-force reference, and each option through
generate(). The live comparison with transformers is in test_against_transformers.py (-m torch).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma2np import Gemma2Config, Gemma2ForCausalLM, GemmaTokenizer
from gemma2np.generation import (
    GenerationError,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    StopStringCriteria,
)
from gemma2np.generation.stopping_criteria import token_byte_strings

TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "tokenizer"


def _model(vocab=61, seed=0, eos=None):
    cfg = Gemma2Config(
        vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=3, max_position_embeddings=64, query_pre_attn_scalar=8,
        initializer_range=0.4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, eos_token_id=eos,
        pad_token_id=0, bos_token_id=2,
    )
    return Gemma2ForCausalLM.from_config(cfg, seed=seed)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def tok():
    return GemmaTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def tok_model(tok):
    """A random model over the test tokenizer's vocabulary, so its tokens decode to text."""
    return _model(vocab=len(tok), seed=3)


PROMPT = np.array([[2, 10, 11, 12, 13]])


# ---------------------------------------------------------------------------- min_p


def _min_p_keep_reference(scores: np.ndarray, min_p: float) -> np.ndarray:
    """Closed form in float64: keep token i iff p_i >= min_p * max_j p_j, i.e. s_i - max(s) >= log(min_p)."""
    s = scores.astype(np.float64)
    return s - s.max(axis=-1, keepdims=True) >= np.log(min_p) if min_p > 0 else np.ones_like(s, dtype=bool)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.02, 0.1, 0.25, 0.5, 0.9, 1.0]))
def test_min_p_against_closed_form(seed, min_p):
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((3, 40)) * rng.uniform(0.3, 5)).astype(np.float32)
    keep = _min_p_keep_reference(scores, min_p)
    # float32 rounding may flip tokens within a hair of the threshold: leave those out of the comparison
    gap = np.abs(scores.astype(np.float64) - scores.max(axis=-1, keepdims=True) - np.log(max(min_p, 1e-300)))
    clear = gap > 1e-5
    got = MinPLogitsWarper(min_p)(None, scores)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isfinite(got)[clear], keep[clear])
    np.testing.assert_array_equal(got[np.isfinite(got)], scores[np.isfinite(got)])  # kept scores unchanged
    assert np.isfinite(got).any(axis=-1).all()  # the most likely token always stays


def test_min_p_edges():
    s = np.array([[1.0, 1.0, 0.0, -3.0]], dtype=np.float32)
    # min_p = 1 keeps exactly the tokens tied for the maximum; 0 keeps everything
    assert np.isfinite(MinPLogitsWarper(1.0)(None, s)).tolist() == [[True, True, False, False]]
    np.testing.assert_array_equal(MinPLogitsWarper(0.0)(None, s), s)
    # p_2 / p_max = e^-1 = 0.368: kept at min_p 0.36, dropped at 0.37
    assert np.isfinite(MinPLogitsWarper(0.36)(None, s))[0, 2]
    assert not np.isfinite(MinPLogitsWarper(0.37)(None, s))[0, 2]
    for bad in (-0.1, 1.5, "x", True):
        with pytest.raises(ValueError, match="min_p"):
            MinPLogitsWarper(bad)


def test_min_p_in_generate(model):
    kw = dict(max_new_tokens=10, do_sample=True, top_k=0)
    # min_p = 1 leaves only the most likely token: sampling becomes greedy
    np.testing.assert_array_equal(model.generate(PROMPT, min_p=1.0, seed=5, **kw),
                                  model.generate(PROMPT, max_new_tokens=10))
    # min_p = 0 filters nothing: the same draws as without it
    np.testing.assert_array_equal(model.generate(PROMPT, min_p=0.0, seed=5, **kw), model.generate(PROMPT, seed=5, **kw))
    # scores seen by the sampler: every kept token passes the threshold (after temperature)
    out = model.generate(PROMPT, min_p=0.2, temperature=0.7, seed=1, return_dict_in_generate=True,
                         output_scores=True, output_logits=True, **kw)
    for logits, scores in zip(out.logits, out.scores):
        want = _min_p_keep_reference((logits / np.float32(0.7)).astype(np.float32), 0.2)
        np.testing.assert_array_equal(np.isfinite(scores), want)
    # greedy ignores min_p (transformers applies it only when sampling)
    np.testing.assert_array_equal(model.generate(PROMPT, max_new_tokens=6, min_p=0.5),
                                  model.generate(PROMPT, max_new_tokens=6))


# ---------------------------------------------------------------------------- no_repeat_ngram_size


def _banned_reference(row: list[int], n: int) -> set[int]:
    """Brute force: every token t such that (last n-1 tokens) + [t] already occurs as an n-gram of the row."""
    prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
    return {row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 8), min_size=0, max_size=14), min_size=1, max_size=3).filter(
    lambda rows: len({len(r) for r in rows}) == 1 and len(rows[0]) > 0), st.integers(1, 5))
def test_no_repeat_ngram_against_brute_force(rows, n):
    ids = np.array(rows, dtype=np.int64)
    V = 7  # ids 7 and 8 lie beyond the head: they can never be banned
    scores = np.random.default_rng(len(rows[0])).standard_normal((len(rows), V)).astype(np.float32)
    got = NoRepeatNGramLogitsProcessor(n)(ids, scores)
    for b, row in enumerate(rows):
        banned = {t for t in _banned_reference(row, n) if t < V} if len(row) >= n else set()
        assert set(np.flatnonzero(np.isneginf(got[b])).tolist()) == banned
        keep = ~np.isneginf(got[b])
        np.testing.assert_array_equal(got[b, keep], scores[b, keep])


def test_no_repeat_ngram_in_generate(model):
    ids = np.array([[2, 10, 11, 10, 11, 12], [2, 30, 31, 32, 33, 34]])
    free = model.generate(ids, max_new_tokens=20)
    for n in (1, 2, 3):
        out = model.generate(ids, max_new_tokens=20, no_repeat_ngram_size=n)
        assert out.shape == free.shape
        for row in out.tolist():
            T0 = ids.shape[1]
            for t in range(T0, len(row)):  # no n-gram ending at a new token occurred before
                if t + 1 >= n:
                    gram = tuple(row[t + 1 - n:t + 1])
                    earlier = {tuple(row[i:i + n]) for i in range(t + 1 - n)}
                    assert gram not in earlier, (n, t, gram)
    with pytest.raises(GenerationError, match="no_repeat_ngram_size"):
        model.generate(PROMPT, max_new_tokens=2, no_repeat_ngram_size=-1)
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=20, no_repeat_ngram_size=0), free)


# ---------------------------------------------------------------------------- stop_strings


def _stop_reference(tokens: list[bytes], stop: bytes, window: int) -> bool:
    """Brute force on bytes: within the last `window` tokens, `stop` occurs and ends after the start of the
    last token (so it overlaps the newest token)."""
    tokens = tokens[-window:]
    text = b"".join(tokens)
    start_of_last = len(text) - len(tokens[-1])
    return any(text.startswith(stop, p) and p + len(stop) > start_of_last for p in range(len(text) - len(stop) + 1))


def test_token_byte_strings(tok):
    table = token_byte_strings(tok)
    assert len(table) == len(tok)
    for i in range(len(tok)):
        piece = tok.convert_ids_to_tokens(i)
        if piece.startswith("<0x") and len(piece) == 6:
            assert table[i] == bytes([int(piece[3:5], 16)])
        else:
            assert table[i] == piece.replace("\u2581", " ").encode()
    # ordinary text: the tokens' bytes concatenate to the decoded text
    ids = tok.encode("To be, or not to be: é 中 😀\n", add_special_tokens=False)
    assert b"".join(table[i] for i in ids) == tok.decode(ids).encode()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["stop", " the", "st", "op", "pper", "las", "top", "é", "中", "\n", "s", "to",
                                 "pped", "😀", "x", "<end_of_turn>"]), min_size=1, max_size=10),
       st.data())
def test_stop_strings_against_brute_force(tok, words, data):
    text = "".join(words)
    ids = tok.encode(text, add_special_tokens=False)
    table = token_byte_strings(tok)
    dec = b"".join(table[i] for i in ids)
    a = data.draw(st.integers(0, len(dec) - 1))
    b = data.draw(st.integers(a + 1, min(len(dec), a + 8)))
    stop_b = dec[a:b]
    try:
        stop = stop_b.decode("utf-8")
    except UnicodeDecodeError:  # a cut through a multi-byte character: not a str
        stop = data.draw(st.sampled_from(["stop", "op", "中", "\n"]))
        stop_b = stop.encode()
    crit = StopStringCriteria(tok, [stop, "zzzz"])
    window = crit.maximum_token_len
    for t in range(1, len(ids) + 1):
        got = crit(np.array([ids[:t], ids[:t]]), None)
        want = _stop_reference([table[i] for i in ids[:t]], stop_b, window)
        assert got.tolist() == [want, want], (stop, ids[:t])


def test_stop_string_examples_from_transformers_docstring():
    """["st", "op"], ["stop"], ["st", "opera"], ["sto", "pper"], ["las", "topper"], ["s", "to", "pped"] match
    "stop"; ["stop", "at"], ["st", "op", "at"], ["st", "opera", "tion"] do not."""

    class Vocab:
        pieces = ["st", "op", "stop", "opera", "sto", "pper", "las", "topper", "s", "to", "pped", "at", "tion"]

        def get_vocab(self):
            return {p: i for i, p in enumerate(self.pieces)}

    v = Vocab()
    crit = StopStringCriteria(v, "stop")
    ids = lambda *ps: np.array([[v.pieces.index(p) for p in ps]])  # noqa: E731
    for seq in (["st", "op"], ["stop"], ["st", "opera"], ["sto", "pper"], ["las", "topper"], ["s", "to", "pped"]):
        assert crit(ids(*seq), None).tolist() == [True], seq
    for seq in (["stop", "at"], ["st", "op", "at"], ["st", "opera", "tion"]):
        assert crit(ids(*seq), None).tolist() == [False], seq


def test_stop_strings_in_generate(tok, tok_model):
    prompt = np.array([tok("To be, or not")["input_ids"]])
    T0 = prompt.shape[1]
    free = tok_model.generate(prompt, max_new_tokens=25, eos_token_id=[])
    table = token_byte_strings(tok)
    new_text = b"".join(table[i] for i in free[0, T0:])
    assert len(new_text) > 12
    stop = new_text[5:9].decode("utf-8", errors="ignore") or new_text[5:6].decode("utf-8", errors="ignore")
    out = tok_model.generate(prompt, max_new_tokens=25, eos_token_id=[], stop_strings=stop, tokenizer=tok)
    # stops at the first new token whose text completes the stop string, and is otherwise the same continuation
    crit = StopStringCriteria(tok, stop)
    first = next(t for t in range(T0 + 1, free.shape[1] + 1) if crit(free[:, :t], None)[0])
    np.testing.assert_array_equal(out, free[:, :first])
    assert stop.encode() in b"".join(table[i] for i in out[0])
    # several rows: the ones that stopped are padded with pad_token_id once an eos criterion exists
    two = np.repeat(prompt, 2, axis=0)
    with pytest.raises(GenerationError, match="tokenizer"):
        tok_model.generate(prompt, max_new_tokens=3, stop_strings="x")
    for bad in ("", [], ["ok", ""], [3], 5):
        with pytest.raises(GenerationError, match="stop_strings"):
            tok_model.generate(two, max_new_tokens=3, stop_strings=bad, tokenizer=tok)


def test_stop_string_already_in_the_prompt_does_not_stop(tok, tok_model):
    prompt = np.array([tok("halt here: halt")["input_ids"]])
    out = tok_model.generate(prompt, max_new_tokens=5, eos_token_id=[], stop_strings=["halt"], tokenizer=tok)
    free = tok_model.generate(prompt, max_new_tokens=5, eos_token_id=[])
    # (unless the first new token itself completes "halt" with the prompt's end, which the reference decides)
    crit = StopStringCriteria(tok, "halt")
    n = next((t for t in range(prompt.shape[1] + 1, free.shape[1] + 1) if crit(free[:, :t], None)[0]), free.shape[1])
    np.testing.assert_array_equal(out, free[:, :n])


# ---------------------------------------------------------------------------- num_return_sequences


def test_num_return_sequences(model):
    ids = np.array([[0, 2, 5, 6], [2, 9, 8, 7]])
    mask = (ids != 0).astype(np.int64)
    # rows are repeated in place (0, 0, 0, 1, 1, 1); with top_k=1 sampling each copy is its row's greedy output
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=3)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    np.testing.assert_array_equal(out, np.repeat(greedy, 3, axis=0))
    # real sampling: 6 rows, reproducible with a seed, copies of one prompt differ
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.5,
              num_return_sequences=3)
    a = model.generate(ids, seed=11, **kw)
    assert a.shape == (6, 16)
    np.testing.assert_array_equal(a[:, :4], np.repeat(ids, 3, axis=0))
    np.testing.assert_array_equal(a, model.generate(ids, seed=11, **kw))
    assert len({tuple(r) for r in a[:3].tolist()}) > 1
    # each copy is one draw of the same distribution: the same as sampling the repeated batch directly
    np.testing.assert_array_equal(a, model.generate(np.repeat(ids, 3, 0), seed=11,
                                                    **{**kw, "attention_mask": np.repeat(mask, 3, 0),
                                                       "num_return_sequences": 1}))
    # greedy with several sequences is refused, as transformers does
    with pytest.raises(GenerationError, match="num_return_sequences"):
        model.generate(ids, max_new_tokens=2, num_return_sequences=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(GenerationError, match="num_return_sequences"):
            model.generate(ids, max_new_tokens=2, do_sample=True, num_return_sequences=bad)
    assert model.generate(ids, max_new_tokens=2, num_return_sequences=1).shape == (2, 6)


# ---------------------------------------------------------------------------- the pick


def test_greedy_pick_is_the_backends_argmax(model, monkeypatch):
    from conftest import BACKENDS

    calls = []
    real = model.backend.argmax
    monkeypatch.setattr(model.backend, "argmax", lambda x: calls.append(x.shape) or real(x))
    out = model.generate(PROMPT, max_new_tokens=6)
    assert calls == [(1, model.config.vocab_size)] * 6
    monkeypatch.setattr(model.backend, "argmax", lambda x: np.full(x.shape[0], 7))
    assert (model.generate(PROMPT, max_new_tokens=3)[0, 5:] == 7).all()
    monkeypatch.undo()
    # every backend picks the same tokens (native: the C g2_argmax)
    for b in BACKENDS:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            kw = {"weights": "float32"} if b == "native" else {}
            other = Gemma2ForCausalLM.from_pretrained(d, backend=b, **kw)
            np.testing.assert_array_equal(other.generate(PROMPT, max_new_tokens=6), out)
