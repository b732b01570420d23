"""resize_token_embeddings / get_input_embeddings / set_input_embeddings / get_output_embeddings
(transformers' PreTrainedModel API; gemma2np/model/embeddings.py), and a differential test against
transformers 5.23 (marked torch)."""

import copy
import warnings

import numpy as np
import pytest

from gemma2np import (Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma2ForTokenClassification,
                      Gemma2Model, InputError)
from gemma2np.checkpoint import bfloat16
from gemma2np.model.embeddings import mean_and_covariance, resized_rows

from conftest import BACKENDS, randomize_norms, tiny_config

CLASSES = [Gemma2Model, Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma2ForTokenClassification]
IDS = np.array([[2, 5, 9, 11, 3, 7, 40, 41], [0, 0, 2, 17, 18, 19, 20, 96]])


def _make(cls=Gemma2ForCausalLM, backend="numpy", **cfg):
    c = tiny_config(pad_token_id=0, **cfg)
    state = randomize_norms(cls.from_config(c, seed=7).state_dict(), 7)
    return cls(c, state, backend=backend)


def _out(model, ids):
    out = model(input_ids=ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("tie", [True, False])
def test_grow_keeps_rows_updates_config_and_runs(cls, tie):
    m = _make(cls, tie_word_embeddings=tie)
    old = m.get_input_embeddings().copy()
    before = _out(m, IDS)
    head_before = None if m.get_output_embeddings() is None else m.get_output_embeddings().copy()
    new = m.resize_token_embeddings(130, seed=0)
    assert new.shape == (130, 32) and new.dtype == old.dtype
    assert m.config.vocab_size == 130
    assert m.get_input_embeddings() is new
    np.testing.assert_array_equal(new[:97], old)  # kept rows bitwise
    if cls is Gemma2ForCausalLM:
        head = m.get_output_embeddings()
        assert head.shape == (130, 32)
        if tie:
            assert head is new  # the tied head follows
        else:
            np.testing.assert_array_equal(head[:97], head_before)
            assert not np.array_equal(head[97:], new[97:])  # its own rows, from its own statistics
    else:
        assert m.get_output_embeddings() is None
    after = _out(m, IDS)
    if cls is Gemma2ForCausalLM:
        assert after.shape == before.shape[:2] + (130,)
        # the old vocabulary's logits: the same rows of the head, more rows in the matmul (BLAS may block it
        # differently, hence float32 rounding and not bitwise)
        np.testing.assert_allclose(after[..., :97], before, rtol=2e-6, atol=2e-6)
    else:
        np.testing.assert_array_equal(after, before)  # nothing but the embedding table changed
    _out(m, np.array([[2, 97, 129]]))  # the new ids are valid now
    with pytest.raises(InputError, match="out of range"):
        m(input_ids=np.array([[130]]))


@pytest.mark.parametrize("tie", [True, False])
def test_shrink_is_exact_and_pad_to_multiple_of_rounds_up(tie):
    m = _make(tie_word_embeddings=tie)
    old = m.get_input_embeddings().copy()
    old_head = m.get_output_embeddings().copy()
    new = m.resize_token_embeddings(50, pad_to_multiple_of=16)  # -> 64 rows
    assert new.shape == (64, 32) and m.config.vocab_size == 64
    np.testing.assert_array_equal(new, old[:64])
    np.testing.assert_array_equal(m.get_output_embeddings(), old_head[:64])
    assert m.resize_token_embeddings(None, pad_to_multiple_of=48).shape == (96, 32)  # None: pad the current size
    assert m(input_ids=np.array([[2, 95]])).logits.shape == (1, 2, 96)


def test_noop_cases_return_the_matrix_untouched():
    m = _make()
    e = m.get_input_embeddings()
    assert m.resize_token_embeddings() is e
    assert m.resize_token_embeddings(97) is e
    assert m.config.vocab_size == 97


@pytest.mark.parametrize("kwargs, message", [
    (dict(new_num_tokens=0), "positive"), (dict(new_num_tokens=-3), "positive"), (dict(new_num_tokens=1.5), "positive"),
    (dict(new_num_tokens=True), "positive"), (dict(new_num_tokens="100"), "positive"),
    (dict(new_num_tokens=100, pad_to_multiple_of=0), "pad_to_multiple_of"),
    (dict(new_num_tokens=100, pad_to_multiple_of=8.0), "pad_to_multiple_of"),
    (dict(new_num_tokens=2 ** 40), "int32"),
    (dict(new_num_tokens=100, mean_resizing="yes"), "mean_resizing"),
])
def test_bad_resize_arguments_are_input_errors(kwargs, message):
    m = _make()
    with pytest.raises(InputError, match=message):
        m.resize_token_embeddings(**kwargs)
    assert m.config.vocab_size == 97 and m.get_input_embeddings().shape == (97, 32)


def test_added_rows_follow_the_old_rows_mean_and_covariance():
    """Seed-free property of the draw: mean + L z with L L^T = 1e-9 cov. With many added rows the sample mean
    and covariance of the new rows match the target within sampling error (here ~3% for 20000 rows)."""
    rng = np.random.default_rng(1)
    old = (rng.normal(0, 1, (600, 6)) @ rng.normal(0, 0.3, (6, 6)) + rng.normal(0, 1, 6)).astype(np.float32)
    new = resized_rows(old, 600 + 20000, True, 0.02, np.random.default_rng(2))
    added = new[600:].astype(np.float64)
    mean, cov = mean_and_covariance(old)
    np.testing.assert_allclose(mean, old.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(old.T, bias=True), rtol=1e-4, atol=1e-6)
    target = 1e-9 * cov.astype(np.float64)
    sample_cov = np.cov(added.T, bias=True)
    assert np.linalg.norm(sample_cov - target) < 0.06 * np.linalg.norm(target)
    # sample mean within 5 standard errors of the old mean, per dimension
    se = np.sqrt(np.diag(target) / added.shape[0])
    assert (np.abs(added.mean(0) - mean) < 5 * se + 1e-7).all()  # + float32 rounding of the rows near the mean


def test_singular_covariance_falls_back_to_the_mean():
    """Fewer rows than columns: the covariance has rank < E, Cholesky fails, and transformers puts the mean
    itself in every added row."""
    old = np.random.default_rng(3).normal(0, 0.3, (5, 32)).astype(np.float32)
    new = resized_rows(old, 9, True, 0.02, np.random.default_rng(0))
    mean, _ = mean_and_covariance(old)
    for row in new[5:]:
        np.testing.assert_array_equal(row, mean)


def test_without_mean_resizing_rows_are_normal_with_initializer_range():
    old = np.zeros((10, 16), np.float32)
    new = resized_rows(old, 10 + 5000, False, 0.3, np.random.default_rng(0))
    added = new[10:]
    assert abs(added.mean()) < 0.01 and abs(added.std() - 0.3) < 0.01


def test_seed_makes_the_draw_reproducible_and_bf16_stays_bf16():
    a, b = _make(), _make()
    np.testing.assert_array_equal(a.resize_token_embeddings(120, seed=5), b.resize_token_embeddings(120, seed=5))
    old = np.random.default_rng(0).normal(0, 0.3, (200, 8)).astype(bfloat16)
    new = resized_rows(old, 230, True, 0.02, np.random.default_rng(0))
    assert new.dtype == bfloat16
    np.testing.assert_array_equal(new[:200].view(np.uint16), old.view(np.uint16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resized_model_saves_and_loads(backend, tmp_path):
    m = _make(backend=backend, tie_word_embeddings=False)
    m.resize_token_embeddings(101, seed=1)
    ref = m(input_ids=np.array([[2, 99, 100]])).logits
    m.save_pretrained(tmp_path)
    back = Gemma2ForCausalLM.from_pretrained(tmp_path, backend=backend)
    assert back.config.vocab_size == 101
    np.testing.assert_array_equal(back(input_ids=np.array([[2, 99, 100]])).logits, ref)


def test_native_int8_head_is_requantised():
    if "native" not in BACKENDS:
        pytest.skip("native extension not built")
    m = Gemma2ForCausalLM(_make().config, _make().state_dict(), backend="native", weights="int8")
    m.resize_token_embeddings(110, seed=0)
    fresh = Gemma2ForCausalLM(m.config, m.state_dict(), backend="native", weights="int8")
    np.testing.assert_array_equal(m(input_ids=IDS).logits, fresh(input_ids=IDS).logits)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_set_input_embeddings_and_the_tied_head_follow(cls):
    m = _make(cls)
    new = np.random.default_rng(9).normal(0, 0.3, (97, 32)).astype(np.float32)
    m.set_input_embeddings(new)
    assert m.get_input_embeddings() is new
    state = m.state_dict()
    fresh = cls(m.config, state)  # a model built from the same tensors computes the same numbers
    np.testing.assert_array_equal(_out(m, IDS), _out(fresh, IDS))
    if cls is Gemma2ForCausalLM:
        assert m.get_output_embeddings() is new


@pytest.mark.parametrize("value, message", [
    (np.zeros((96, 32), np.float32), "resize_token_embeddings"),
    (np.zeros((97, 31), np.float32), "shape"),
    (np.zeros((97, 32), np.int64), "floating"),
    (np.full((97, 32), np.nan, np.float32), "NaN"),
    ([[0.0] * 32] * 96 + [[0.0]], "array"),
])
def test_bad_set_input_embeddings(value, message):
    m = _make()
    with pytest.raises(InputError, match=message):
        m.set_input_embeddings(value)


# ----------------------------------------------------------------------------- against transformers
def _hf_pair(tie, vocab=97, hidden=32):
    import torch
    import transformers

    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, sliding_window=4, pad_token_id=0, tie_word_embeddings=tie,
              query_pre_attn_scalar=8, initializer_range=0.3)  # the scalar explicit: the defaults differ (256 / 224)
    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM._from_config(transformers.Gemma2Config(**copy.deepcopy(kw)),
                                                     attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.3)
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    ours = Gemma2ForCausalLM(Gemma2Config(**kw), state)
    return hf, ours


@pytest.mark.torch
@pytest.mark.parametrize("tie", [True, False])
def test_resize_matches_transformers(tie):
    import torch

    hf, ours = _hf_pair(tie)
    hf_old_head = hf.lm_head.weight.detach().numpy().copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.resize_token_embeddings(2097)  # 2000 added rows: enough for distribution statistics
    ours.resize_token_embeddings(2097, seed=0)
    assert ours.config.vocab_size == hf.config.vocab_size == 2097
    hf_e = hf.get_input_embeddings().weight.detach().numpy()
    hf_h = hf.get_output_embeddings().weight.detach().numpy()
    e, h = ours.get_input_embeddings(), ours.get_output_embeddings()
    assert e.shape == hf_e.shape and h.shape == hf_h.shape
    np.testing.assert_array_equal(e[:97], hf_e[:97])  # kept rows bitwise, on both sides
    np.testing.assert_array_equal(h[:97], hf_h[:97])
    np.testing.assert_array_equal(h[:97], hf_old_head)
    assert (h is e) == tie and (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    for ours_rows, hf_rows, old in ((e, hf_e, e[:97]), (h, hf_h, h[:97])):
        mean, cov = mean_and_covariance(old)
        for rows in (ours_rows[97:].astype(np.float64), hf_rows[97:].astype(np.float64)):
            target = 1e-9 * cov.astype(np.float64)
            # both sides draw around the same mean with the same covariance (sampling error ~ sqrt(E / n))
            assert np.linalg.norm(np.cov(rows.T, bias=True) - target) < 0.25 * np.linalg.norm(target)
            assert np.abs(rows.mean(0) - mean).max() < 5 * np.sqrt(np.diag(target).max() / rows.shape[0]) + 1e-7
    # the same model afterwards: transformers' logits with its resized matrices = ours with the same matrices
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    twin = Gemma2ForCausalLM(ours.config, state)
    ids = np.array([[2, 5, 2000, 96, 1500]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(twin(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.torch
def test_resize_fallback_and_shrink_match_transformers_exactly():
    """vocab < hidden: a singular covariance, so transformers fills the added rows with the mean -- a
    deterministic case, compared number for number; and shrinking is a plain copy of the first rows."""
    hf, ours = _hf_pair(True, vocab=20, hidden=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.resize_token_embeddings(26)
    ours.resize_token_embeddings(26)
    # mean summed in float64 here, float32 in torch: equal to float32 rounding
    np.testing.assert_allclose(ours.get_input_embeddings(), hf.get_input_embeddings().weight.detach().numpy(),
                               rtol=1e-6, atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.resize_token_embeddings(11, pad_to_multiple_of=4)
    ours.resize_token_embeddings(11, pad_to_multiple_of=4)
    np.testing.assert_array_equal(ours.get_input_embeddings()[:12],
                                  hf.get_input_embeddings().weight.detach().numpy()[:12])
    assert ours.config.vocab_size == hf.config.vocab_size == 12


@pytest.mark.torch
@pytest.mark.parametrize("tie", [True, False])
def test_no_mean_resizing_matches_transformers_distribution(tie):
    hf, ours = _hf_pair(tie)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.resize_token_embeddings(3097, mean_resizing=False)
    ours.resize_token_embeddings(3097, mean_resizing=False, seed=0)
    for a in (hf.get_input_embeddings().weight.detach().numpy()[97:], ours.get_input_embeddings()[97:],
              hf.get_output_embeddings().weight.detach().numpy()[97:], ours.get_output_embeddings()[97:]):
        assert abs(a.mean()) < 0.01 and abs(a.std() - 0.3) < 0.01  # normal(0, initializer_range)
