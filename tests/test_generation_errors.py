"""Bad generate() arguments get a typed gemma2np error naming the argument (issue #13): GenerationError, a
ValueError; GenerationTypeError (also a TypeError) for arguments of the wrong kind. Never numpy's or Python's
own exception from deep inside the loop.
"""
from __future__ import annotations

import numpy as np
import pytest

from gemma2np import Gemma2Config, Gemma2ForCausalLM
from gemma2np.generation import GenerationConfig, GenerationError, GenerationTypeError


@pytest.fixture(scope="module")
def model():
    cfg = Gemma2Config(vocab_size=31, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=4, sliding_window=3, max_position_embeddings=32,
                       eos_token_id=1, pad_token_id=0, bos_token_id=2)
    return Gemma2ForCausalLM.from_config(cfg, seed=0)


PROMPT = np.array([[2, 5, 6]])


@pytest.mark.parametrize("kw,name", [
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed="7"), "seed"),
    (dict(seed=True), "seed"),
    (dict(seed=[1, 2]), "seed"),
    (dict(do_sample="yes"), "do_sample"),
    (dict(use_cache=1), "use_cache"),
    (dict(max_new_tokens="5"), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_length=True), "max_length"),
    (dict(min_length=-1), "min_length"),
    (dict(min_new_tokens=1.5), "min_new_tokens"),
    (dict(do_sample=True, temperature="hot"), "temperature"),
    (dict(do_sample=True, temperature=float("inf")), "temperature"),
    (dict(do_sample=True, top_p=[0.5]), "top_p"),
    (dict(do_sample=True, top_p=float("nan")), "top_p"),
    (dict(do_sample=True, top_k=2.5), "top_k"),
    (dict(do_sample=True, top_k=True), "top_k"),
    (dict(do_sample=True, min_p="x"), "min_p"),
    (dict(do_sample=True, min_p=float("nan")), "min_p"),
    (dict(repetition_penalty="1.2"), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(do_sample=True, num_return_sequences="2"), "num_return_sequences"),
    (dict(num_return_sequences=3), "num_return_sequences"),  # greedy: refused, as transformers does
    (dict(stop_strings=5), "stop_strings"),
    (dict(stop_strings=[""]), "stop_strings"),
    (dict(eos_token_id="x"), "eos_token_id"),
    (dict(eos_token_id=[1, None]), "eos_token_id"),
    (dict(eos_token_id=True), "eos_token_id"),
    (dict(pad_token_id=1.5), "pad_token_id"),
    (dict(bos_token_id="a"), "bos_token_id"),
    (dict(generator="rng"), "generator"),
    (dict(generator=np.random.default_rng(0), seed=1), "seed or generator"),
    (dict(generation_config={"max_new_tokens": 2}), "generation_config"),
    (dict(streamer=5), "streamer"),
    (dict(logits_processor=5), "logits_processor"),
    (dict(logits_processor=[5]), "logits_processor"),
    (dict(stopping_criteria="abc"), "stopping_criteria"),
    (dict(return_dict_in_generate="yes"), "return_dict_in_generate"),
    (dict(output_scores=1), "output_scores"),
    (dict(output_logits="no"), "output_logits"),
    (dict(num_beams=2), "num_beams"),
])
def test_bad_option_is_a_typed_error_naming_it(model, kw, name):
    with pytest.raises(GenerationError, match=name) as e:
        model.generate(PROMPT, **{"max_new_tokens": 2, **kw})
    assert isinstance(e.value, ValueError)


def test_wrong_kinds_are_also_type_errors(model):
    for kw in (dict(num_beams=2), dict(generator="x"), dict(streamer=5), dict(generation_config={})):
        with pytest.raises(TypeError):
            model.generate(PROMPT, max_new_tokens=2, **kw)
        with pytest.raises(GenerationTypeError):
            model.generate(PROMPT, max_new_tokens=2, **kw)


@pytest.mark.parametrize("ids,mask,name", [
    ([[2, 5], [3]], None, "input_ids"),                                    # ragged
    (np.array([[True, False]]), None, "input_ids"),                         # bool ids
    (np.array([[1.0, 2.0]]), None, "input_ids"),                            # float ids
    ([["a", "b"]], None, "input_ids"),
    (np.zeros((1, 0), np.int64), None, "input_ids"),                        # empty prompt
    (np.zeros((1, 2, 2), np.int64), None, "input_ids"),
    (PROMPT, [[1, 1], [1]], "attention_mask"),                              # ragged
    (PROMPT, np.ones((1, 2)), "attention_mask"),                            # wrong shape
    (PROMPT, np.array([[1, 2, 1]]), "attention_mask"),                      # not 0/1
    (PROMPT, np.array([["1", "1", "1"]]), "attention_mask"),
])
def test_bad_inputs(model, ids, mask, name):
    with pytest.raises(GenerationError, match=name):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_good_seeds_still_work(model):
    kw = dict(max_new_tokens=4, do_sample=True)
    for seed in (0, np.int64(3), 2**70):  # numpy accepts arbitrarily large non-negative seeds
        a = model.generate(PROMPT, seed=seed, **kw)
        np.testing.assert_array_equal(a, model.generate(PROMPT, seed=seed, **kw))


def test_bad_values_in_a_generation_config(model):
    with pytest.raises(GenerationError, match="top_k"):
        model.generate(PROMPT, generation_config=GenerationConfig(max_new_tokens=2, do_sample=True, top_k="9"))
