"""gemma2np.chat_session.ChatSession: the KV cache is reused across turns (each conversation token goes through
the model once), replies equal a recomputation over the whole conversation, Ctrl-C ends a reply and the session
goes on, the context is respected; and generate()'s past_key_values, which the session is built on.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gemma2np import Gemma2Config, Gemma2ForCausalLM, GemmaTokenizer
from gemma2np.chat import render_gemma2_chat
from gemma2np.chat_session import ChatSession
from gemma2np.generation import GenerationError, get_generation_config

TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "tokenizer"
BUNDLED = Path(__file__).resolve().parent.parent / "gemma2np" / "data" / "gemma2-shakespeare"


@pytest.fixture(scope="module")
def tok():
    return GemmaTokenizer.from_pretrained(TOKENIZER_DIR)


def _model(tok, context=256, window=8, seed=0):
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=window,
                       max_position_embeddings=context, query_pre_attn_scalar=8, initializer_range=0.3,
                       eos_token_id=1, pad_token_id=0, bos_token_id=2)
    return Gemma2ForCausalLM.from_config(cfg, seed=seed)


@pytest.fixture(scope="module")
def model(tok):
    return _model(tok)  # sliding window 8: the conversation soon outgrows it, so the trimmed cache is exercised


class CountingModel:
    """Wraps a model; records how many tokens each forward pass is fed."""

    def __init__(self, inner):
        self.inner, self.fed = inner, []
        self.config, self.backend = inner.config, inner.backend
        self.generation_config = get_generation_config(inner)

    def __call__(self, *args, **kwargs):
        self.fed.append(int(np.shape(kwargs["input_ids"])[1]))
        return self.inner(*args, **kwargs)

    def generate(self, *args, **kwargs):
        from gemma2np.generation import generate

        return generate(self, *args, **kwargs)


TURNS = ["Good morrow, my lord.", "What news from the court?", "  And then?  ", "Farewell."]


def test_each_token_is_fed_once(model, tok):
    counting = CountingModel(model)
    s = ChatSession(counting, tok, dict(do_sample=False), max_new_tokens=12)
    for i, msg in enumerate(TURNS):
        before = len(s.ids)
        calls_before = len(counting.fed)
        r = s.send(msg)
        prefill = counting.fed[calls_before]
        assert prefill == r.prefilled == len(s.ids) - len(r.reply_ids) - r.cached
        if i == 0:
            assert r.cached == 0
        else:  # only the new turn: the previous reply's last token (never fed yet) plus the template's new tokens
            assert r.cached == before - 1
            assert prefill == len(s.ids) - len(r.reply_ids) - before + 1
        assert counting.fed[calls_before + 1:] == [1] * (r.new_tokens - 1)  # then one token per decode step
    # over the whole session every token went through the model exactly once (the last reply token not yet)
    assert sum(counting.fed) == len(s.ids) - 1
    # without reuse, each turn reads the whole conversation again
    counting2 = CountingModel(model)
    s2 = ChatSession(counting2, tok, dict(do_sample=False), max_new_tokens=12, reuse_cache=False)
    for msg in TURNS:
        s2.send(msg)
    assert s2.ids == s.ids
    assert sum(counting2.fed) > sum(counting.fed) + 3 * 12


def test_conversation_tokens_follow_the_template(model, tok):
    s = ChatSession(model, tok, dict(do_sample=False), max_new_tokens=6)
    r1 = s.send(TURNS[0])
    s.send(TURNS[2])
    # the tokens equal the template's rendering of the conversation, with the model's reply kept as generated
    # ids (6 tokens, no <end_of_turn> since the reply was cut by max_new_tokens)
    first = tok.apply_chat_template([{"role": "user", "content": TURNS[0]}], add_generation_prompt=True,
                                    return_dict=False)
    assert s.ids[:len(first)] == first
    tail = render_gemma2_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                               {"role": "user", "content": TURNS[2]}], add_generation_prompt=True, bos_token="")
    tail = tail[tail.index("y") + 1:]  # what the template puts after the model's reply
    n = len(first) + len(r1.reply_ids)
    assert s.ids[len(first):n] == r1.reply_ids
    assert s.ids[n:n + len(tok.encode(tail, add_special_tokens=False))] == tok.encode(tail, add_special_tokens=False)
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]


def test_replies_equal_a_recomputation_of_the_whole_conversation(model, tok):
    """Greedy: token for token what generate() gives on the whole conversation without any cache; the logits
    agree to float32 rounding. (Not bitwise: the cached reply keys were computed one token at a time, a
    (1, d) matrix product, which BLAS rounds differently from the batched prefill of a recomputation.)"""
    s = ChatSession(model, tok, dict(do_sample=False), max_new_tokens=10)
    for msg in TURNS:
        before = len(s.ids)
        cache = s.cache
        r = s.send(msg)
        prompt = np.asarray([s.ids[:len(s.ids) - len(r.reply_ids)]])
        fresh = model.generate(prompt, max_new_tokens=10, eos_token_id=s.eos_token_id, do_sample=False,
                               return_dict_in_generate=True, output_logits=True)
        assert r.reply_ids == fresh.sequences[0, prompt.shape[1]:].tolist()
        if cache is not None:  # the same turn once more on a copy of the cache, to look at its logits
            again = _replay_turn(model, s, prompt, before)
            for a, b in zip(again.logits, fresh.logits):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def _replay_turn(model, session, prompt, cached_len):
    """Recompute the conversation up to `cached_len` tokens into a fresh cache the way the session did, then
    continue from it like the session's turn did."""
    s2 = ChatSession(model, session.tokenizer, dict(do_sample=False), max_new_tokens=10)
    for m in session.messages[:-2:2]:
        s2.send(m["content"])
    assert len(s2.ids) == cached_len
    return model.generate(prompt, max_new_tokens=10, eos_token_id=session.eos_token_id, do_sample=False,
                          past_key_values=s2.cache, return_dict_in_generate=True, output_logits=True)


def test_session_is_deterministic_and_reproducible(model, tok):
    """The same session replayed gives bitwise the same logits: the reused cache holds no stale state."""
    a = ChatSession(model, tok, dict(do_sample=True, temperature=0.9), max_new_tokens=8, seed=4)
    b = ChatSession(model, tok, dict(do_sample=True, temperature=0.9), max_new_tokens=8, seed=4)
    ra = [a.send(m).reply_ids for m in TURNS]
    rb = [b.send(m).reply_ids for m in TURNS]
    assert ra == rb
    assert len({tuple(r) for r in ra}) > 1  # the session's one random stream: turns differ


class _InterruptAfter:
    def __init__(self, n):
        self.n, self.seen = n, -1  # the first put() is the prompt

    def put(self, value):
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt

    def end(self):
        pass


def test_ctrl_c_ends_the_reply_and_the_session_goes_on(model, tok):
    counting = CountingModel(model)
    s = ChatSession(counting, tok, dict(do_sample=False), max_new_tokens=20)
    s.send(TURNS[0])
    r = s.send(TURNS[1], streamer=_InterruptAfter(4))
    assert r.interrupted and r.new_tokens == 4 and len(r.reply_ids) == 4
    assert s.cache is None  # dropped: the interrupted pass may have updated only some layers
    assert s.ids[-4:] == r.reply_ids and s.messages[-1]["content"] == r.reply
    n = len(s.ids)
    r3 = s.send(TURNS[2])  # the next turn reads the whole conversation once ...
    assert not r3.interrupted and r3.cached == 0 and r3.prefilled == len(s.ids) - len(r3.reply_ids)
    assert s.ids[n:n + 2] == tok.encode("<end_of_turn>\n", add_special_tokens=False)  # the cut reply is closed
    r4 = s.send(TURNS[3])  # ... and the cache is reused again after it
    assert r4.cached > 0 and r4.prefilled < 25
    # an interrupt before the first token: an empty reply, still a usable session
    r5 = s.send("One more.", streamer=_InterruptAfter(0))
    assert r5.interrupted and r5.reply_ids == [] and r5.reply == ""
    assert s.send("And another.").new_tokens > 0


def test_context_is_respected(tok):
    small = _model(tok, context=64)
    s = ChatSession(small, tok, dict(do_sample=False), max_new_tokens=20)
    results = [s.send(m) for m in TURNS * 2]
    assert any(r.truncated_history for r in results)
    assert len(s.ids) <= 64
    for r in results:
        assert r.prefilled + r.cached + r.new_tokens <= 64
    with pytest.raises(GenerationError, match="context"):
        s.send("word " * 80)
    with pytest.raises(GenerationError, match="message"):
        s.send("   ")


def test_refuses_settings_it_owns(model, tok):
    for k in ("max_new_tokens", "eos_token_id", "seed", "past_key_values"):
        with pytest.raises(GenerationError, match=k):
            ChatSession(model, tok, {k: 1})


# ---------------------------------------------------------------------------- generate(past_key_values=...)


def test_generate_continues_from_a_cache(model):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 1000, size=(1, 11))
    first = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=[], return_dict_in_generate=True)
    assert first.past_key_values.get_seq_length() == first.sequences.shape[1] - 1
    more = np.concatenate([first.sequences, rng.integers(3, 1000, size=(1, 6))], axis=1)
    a = model.generate(more, max_new_tokens=7, do_sample=False, eos_token_id=[], past_key_values=first.past_key_values)
    b = model.generate(more, max_new_tokens=7, do_sample=False, eos_token_id=[])
    np.testing.assert_array_equal(a, b)
    cache = first.past_key_values  # updated in place by the call above: it now holds more[:, :-1] + 6 new tokens
    assert cache.get_seq_length() == more.shape[1] + 6
    more = a
    with pytest.raises(GenerationError, match="past_key_values holds"):
        model.generate(more[:, :-1], max_new_tokens=2, past_key_values=cache)
    with pytest.raises(GenerationError, match="Gemma2Cache"):
        model.generate(more, max_new_tokens=2, past_key_values=[(1, 2)])
    with pytest.raises(GenerationError, match="use_cache"):
        model.generate(more, max_new_tokens=2, past_key_values=cache, use_cache=False)
    with pytest.raises(GenerationError, match="batch"):
        model.generate(np.repeat(more, 2, 0), max_new_tokens=2, past_key_values=cache)


# ---------------------------------------------------------------------------- sampling defaults from the checkpoint


def test_generation_config_json_sets_the_defaults(tok, tmp_path):
    m = _model(tok, seed=2)
    m.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 1.5, "top_k": 0, "max_new_tokens": 9, "no_repeat_ngram_size": 2}))
    loaded = Gemma2ForCausalLM.from_pretrained(tmp_path)
    prompt = np.array([[2, 40, 41, 42]])
    outs = [loaded.generate(prompt, seed=s) for s in range(4)]
    assert all(o.shape == (1, 13) for o in outs)  # max_new_tokens from the file
    assert len({tuple(o[0]) for o in outs}) > 1  # sampled
    # explicit arguments override the file
    greedy = loaded.generate(prompt, do_sample=False, max_new_tokens=5)
    np.testing.assert_array_equal(greedy, m.generate(prompt, do_sample=False, max_new_tokens=5,
                                                     no_repeat_ngram_size=2))
    # the chat session takes its reply length from the file too
    assert ChatSession(loaded, tok).max_new_tokens == 9
    assert ChatSession(m, tok).max_new_tokens == 200


def test_bundled_model_samples_by_default():
    if not (BUNDLED / "model.safetensors").is_file():
        pytest.skip("bundled model not installed")
    gc = json.loads((BUNDLED / "generation_config.json").read_text())
    assert gc["do_sample"] is True and 0 < gc["temperature"] < 1 and gc["top_p"] < 1 and gc["max_new_tokens"] > 0
    m = Gemma2ForCausalLM.from_pretrained(BUNDLED)
    tk = GemmaTokenizer.from_pretrained(BUNDLED)
    s = ChatSession(m, tk, seed=0)
    assert s.max_new_tokens == gc["max_new_tokens"]
    r = s.send("Who art thou?")
    # a sampled first reply that does not loop: no line repeated more than twice (greedy repeats one line)
    lines = [ln.strip() for ln in r.reply.splitlines() if ln.strip()]
    assert lines and max(lines.count(ln) for ln in lines) <= 2, r.reply
    g = ChatSession(m, tk, dict(do_sample=False)).send("Who art thou?")
    glines = [ln.strip() for ln in g.reply.splitlines() if ln.strip()]
    assert max(glines.count(ln) for ln in glines) > 2  # what the sampling defaults avoid


@pytest.mark.torch
def test_bundled_generation_config_reads_the_same_in_transformers():
    transformers = pytest.importorskip("transformers")
    theirs = transformers.GenerationConfig.from_pretrained(BUNDLED)
    ours = json.loads((BUNDLED / "generation_config.json").read_text())
    for k in ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "eos_token_id", "pad_token_id"):
        assert getattr(theirs, k) == ours[k], k
