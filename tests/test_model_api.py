"""The seed's model-call API beyond the goldens: `position_embeddings` on every class, transformers'
`logits_to_keep` forms, and the argument checks of issue #13 (every bad call is an InputError), with a
hypothesis sweep over the argument types of forward() on every head."""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma2np import (Gemma2Cache, Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma2ForTokenClassification,
                      Gemma2Model, InputError)
from gemma2np.model.validation import UnexpectedArgumentError

from conftest import BACKENDS, randomize_norms, tiny_config

CLASSES = [Gemma2Model, Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma2ForTokenClassification]
IDS = np.array([[2, 5, 9, 11, 3, 7, 40, 41], [0, 0, 2, 17, 18, 19, 20, 21]])
MASK = np.array([[1] * 8, [0, 0] + [1] * 6])


def _make(cls, backend="numpy", **cfg):
    c = tiny_config(pad_token_id=0, num_labels=3, **cfg)
    state = randomize_norms(cls.from_config(c, seed=5).state_dict(), 5)
    return cls(c, state, backend=backend)


def _main_output(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.fixture(scope="module", params=[(cls, be) for cls in CLASSES for be in BACKENDS],
                ids=lambda p: f"{p[0].__name__}-{p[1]}")
def any_model(request):
    cls, backend = request.param
    return _make(cls, backend)


@pytest.fixture(scope="module")
def lm():
    return _make(Gemma2ForCausalLM)


# ----------------------------------------------------------------------------- position_embeddings
def _own_tables(model, position_ids):
    base = model if isinstance(model, Gemma2Model) else model.model
    return base.rotary_emb(position_ids)


@pytest.mark.parametrize("position_ids", [None, np.array([[3, 4, 5, 6, 7, 8, 9, 10], [0, 0, 0, 1, 2, 3, 4, 5]])])
def test_own_position_embeddings_change_nothing(any_model, position_ids):
    """The cos/sin the model computes itself, passed back, give bitwise the same outputs (every class, backend)."""
    pos = np.arange(IDS.shape[1])[None] if position_ids is None else position_ids
    cos, sin = _own_tables(any_model, pos)
    kw = dict(input_ids=IDS, attention_mask=MASK, position_ids=position_ids, output_hidden_states=True)
    ref = any_model(**kw)
    got = any_model(**kw, position_embeddings=(cos.copy(), sin.copy()))
    np.testing.assert_array_equal(_main_output(got), _main_output(ref))
    for a, b in zip(got.hidden_states, ref.hidden_states):
        np.testing.assert_array_equal(a, b)


def test_own_position_embeddings_in_decode_steps(lm):
    """With a cache, the tables cover the new tokens only: prefill + one decode step, both overridden."""
    pre = lm(input_ids=IDS[:, :6], use_cache=True)
    step = lm(input_ids=IDS[:, 6:7], past_key_values=pre.past_key_values)
    pre2 = lm(input_ids=IDS[:, :6], use_cache=True, position_embeddings=_own_tables(lm, np.arange(6)[None]))
    step2 = lm(input_ids=IDS[:, 6:7], past_key_values=pre2.past_key_values,
               position_embeddings=_own_tables(lm, np.array([[6]])))
    np.testing.assert_array_equal(pre2.logits, pre.logits)
    np.testing.assert_array_equal(step2.logits, step.logits)


def test_other_position_embeddings_change_q_and_k_only(any_model):
    """Other tables rotate q and k differently; the embeddings and layer 0's v (computed before any
    rotation reaches the residual stream) stay bitwise the same, q/k of every layer move."""
    T = IDS.shape[1]
    cos, sin = _own_tables(any_model, np.arange(T)[None] * 3 + 1)  # the tables of other positions
    with any_model.record_intermediates() as ref:
        any_model(input_ids=IDS, attention_mask=MASK)
    with any_model.record_intermediates() as got:
        any_model(input_ids=IDS, attention_mask=MASK, position_embeddings=(cos, sin))
    np.testing.assert_array_equal(got["embeddings"], ref["embeddings"])
    np.testing.assert_array_equal(got["layers.0.input_norm"], ref["layers.0.input_norm"])
    np.testing.assert_array_equal(got["layers.0.v"], ref["layers.0.v"])
    for i in range(any_model.config.num_hidden_layers):
        for name in ("q", "k"):
            assert not np.array_equal(got[f"layers.{i}.{name}"], ref[f"layers.{i}.{name}"]), (i, name)


def test_position_embeddings_per_row_and_identity_rotation(lm):
    """A (B, T, D) table applies per row; cos = 1, sin = 0 (no rotation) equals position 0 everywhere."""
    B, T, D = IDS.shape[0], IDS.shape[1], lm.config.head_dim
    ones, zeros = np.ones((B, T, D), np.float32), np.zeros((B, T, D), np.float32)
    with lm.record_intermediates() as rec:
        lm(input_ids=IDS, position_embeddings=(ones, zeros))
    with lm.record_intermediates() as at0:
        lm(input_ids=IDS, position_ids=np.zeros((1, T), np.int64))
    np.testing.assert_array_equal(rec["layers.0.q"], at0["layers.0.q"])  # rotation by angle 0 is the identity
    # row 1 with the tables of other positions, row 0 with its own: only row 1 changes
    cos, sin = _own_tables(lm, np.stack([np.arange(T), np.arange(T) + 5]))
    ref = lm(input_ids=IDS).logits
    got = lm(input_ids=IDS, position_embeddings=(cos, sin)).logits
    np.testing.assert_array_equal(got[0], ref[0])
    assert not np.array_equal(got[1], ref[1])


def test_float64_model_takes_tables_in_float64():
    m = _make(Gemma2Model)
    m64 = Gemma2Model(m.config, m.state_dict(), dtype="float64")
    cos, sin = m64.rotary_emb(np.arange(8)[None])
    assert cos.dtype == np.float64
    np.testing.assert_array_equal(m64(input_ids=IDS, position_embeddings=(cos, sin)).last_hidden_state,
                                  m64(input_ids=IDS).last_hidden_state)


@pytest.mark.parametrize("pe, message", [
    ("cos", "tuple"),
    ((np.ones((2, 8, 12), np.float32),), "tuple"),
    ((np.ones((2, 8, 12)),) * 3, "tuple"),
    ((np.ones((2, 8, 11), np.float32),) * 2, "shape"),
    ((np.ones((2, 7, 12), np.float32),) * 2, "shape"),
    ((np.ones((3, 8, 12), np.float32),) * 2, "shape"),
    ((np.ones((8, 12), np.float32),) * 2, "shape"),
    ((np.ones((1, 2, 8, 12), np.float32),) * 2, "shape"),
    ((np.ones((2, 8, 12), np.int64),) * 2, "floating"),
    ((np.ones((2, 8, 12), complex),) * 2, "floating"),
    ((np.ones((2, 8, 12), bool),) * 2, "floating"),
    ((np.full((2, 8, 12), np.nan, np.float32),) * 2, "NaN"),
    ((np.ones((2, 8, 12), np.float32), np.ones((1, 8, 12), np.float32)), "same shape"),
    (([[1.0, 2.0], [3.0]], [[1.0]]), "rectangular"),
    ((None, None), "floating"),
])
def test_bad_position_embeddings_are_input_errors(any_model, pe, message):
    with pytest.raises(InputError, match=message):
        any_model(input_ids=IDS, position_embeddings=pe)


@pytest.mark.torch
@pytest.mark.parametrize("per_row", [False, True])
def test_position_embeddings_do_what_transformers_layers_do(per_row, tmp_path):
    """transformers 5.23 documents position_embeddings on the outer forward but raises a TypeError there
    (Gemma2Model passes its own tables *and* the kwarg to each layer: 'got multiple values'). Its layers take
    the tables and rotate q and k with them; emulate that by making its rotary module return our tables, and
    compare with gemma2np given the same tables."""
    import torch
    import transformers

    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM._from_config(transformers.Gemma2Config(**kw),
                                                     attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.5 if "norm" in name else 0.3)
    hf.save_pretrained(tmp_path)
    ours = Gemma2ForCausalLM.from_pretrained(tmp_path)
    B, T, D = IDS.shape[0], IDS.shape[1], 8
    rng = np.random.default_rng(1)
    angles = rng.uniform(-3, 3, (B if per_row else 1, T, D // 2)).astype(np.float32)
    emb = np.concatenate([angles, angles], axis=-1)  # rotate_half layout, arbitrary angles
    cos, sin = np.cos(emb), np.sin(emb)
    with pytest.raises(TypeError, match="multiple values"):
        hf(input_ids=torch.tensor(IDS), position_embeddings=(torch.tensor(cos), torch.tensor(sin)))
    hf.model.rotary_emb.forward = lambda x, position_ids: (torch.tensor(cos), torch.tensor(sin))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    got = ours(input_ids=IDS, attention_mask=MASK, position_embeddings=(cos, sin)).logits
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- logits_to_keep
def test_logits_to_keep_forms_match_slicing_the_full_logits(lm):
    """transformers' slice_logits_to_keep forms, each checked against slicing the full logits. The LM head
    is per position, but BLAS blocks a matmul by its row count, so fewer rows may round differently in the
    last bit: compare to float32 rounding (1e-6), which still catches any wrong row (logits differ by ~1)."""
    full = lm(input_ids=IDS).logits  # (B, T, V)
    T = IDS.shape[1]

    def same(keep, expected):
        got = lm(input_ids=IDS, logits_to_keep=keep).logits
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)

    same(3, full[:, -3:])
    same(np.int64(1), full[:, -1:])
    same(np.array(2), full[:, -2:])  # a 0-d integer array counts like an int
    same(T + 5, full)  # Python slicing clamps, as in transformers
    same([0, -1], full[:, [0, T - 1]])
    mask1 = np.arange(T) % 3 == 0
    same(mask1, full[:, mask1])
    same(np.array([[0, 2], [5, 7]]), np.stack([full[0, [0, 2]], full[1, [5, 7]]]))
    same(np.array([[1, 4]]), full[:, [1, 4]])  # (1, P) broadcasts over the batch
    mask2 = MASK.astype(bool)
    same(mask2, full[mask2])  # (N, V), flattened as transformers does
    same(np.array([], np.int64), full[:, :0])
    np.testing.assert_array_equal(lm(input_ids=IDS, logits_to_keep=0).logits, full)


@pytest.mark.parametrize("keep, message", [
    (2.0, "int or an index array"),
    (True, "bool"),
    (-1, ">= 0"),
    (None, "int or an index array"),
    ("2", "int or an index array"),
    ([8], "out of range"),
    ([-9], "out of range"),
    ([0.5, 1.0], "integer"),
    (np.array([[0, 8], [1, 2]]), r"\[0, 8\)"),
    (np.array([[-1, 0], [1, 2]]), r"\[0, 8\)"),
    (np.zeros((3, 2), np.int64), "shape"),
    (np.ones((2, 7), bool), "shape"),
    (np.zeros((1, 1, 1), np.int64), "1-D or 2-D"),
    ([[0, 1], [2]], "rectangular"),
])
def test_bad_logits_to_keep_is_an_input_error(lm, keep, message):
    with pytest.raises(InputError, match=message):
        lm(input_ids=IDS, logits_to_keep=keep)


def test_labels_with_cut_logits_is_an_input_error(lm):
    for keep in (2, MASK.astype(bool)):
        with pytest.raises(InputError, match="labels need logits at every position"):
            lm(input_ids=IDS, labels=IDS, logits_to_keep=keep)


# ----------------------------------------------------------------------------- issue #13: API calls
@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=IDS.astype(bool)), "integer"),
    (dict(input_ids=[[2, 3, 4], [2, 3]]), "rectangular"),
    (dict(input_ids=[[2, 3], [2, object()]]), "integer"),
    (dict(input_ids=[["a", "b"]]), "integer"),
    (dict(input_ids=[[2 ** 70, 3]]), "integer"),
    (dict(input_ids=IDS, attention_mask=[[1, 1], [1]]), "rectangular"),
    (dict(inputs_embeds=[[[0.0] * 32], [[0.0] * 31]]), "rectangular"),
    (dict(inputs_embeds=np.full((1, 2, 32), np.nan, np.float32)), "NaN"),
    (dict(inputs_embeds=np.full((1, 2, 32), np.inf)), "NaN"),
    (dict(input_ids=IDS, position_ids=IDS.astype(bool)), "integer"),
    (dict(input_ids=IDS, cache_position=np.ones(8, bool)), "integer"),
    (dict(input_ids=IDS, labels=IDS.astype(bool)), "integer"),
    (dict(input_ids=[[2, 3], [4]], labels=[[2, 3], [4]]), "rectangular"),
    (dict(input_ids=IDS, labels=IDS, num_items_in_batch=0), "num_items_in_batch"),
    (dict(input_ids=IDS, labels=IDS, num_items_in_batch="3"), "num_items_in_batch"),
])
def test_api_call_errors_of_issue_13(lm, kwargs, message):
    with pytest.raises(InputError, match=message):
        lm(**kwargs)


def _legacy(lm, batch=2, change=lambda k: k):
    past = lm(input_ids=IDS[:batch, :5], use_cache=True).past_key_values.to_legacy_cache()
    return tuple((change(k), v) for k, v in past)


@pytest.mark.parametrize("make, message", [
    (lambda lm: _legacy(lm, change=lambda k: k * np.nan), "NaN"),
    (lambda lm: _legacy(lm, change=lambda k: k.astype(bool)), "numeric"),
    (lambda lm: _legacy(lm, change=lambda k: k.tolist()[:1] + [[[1.0]]]), "past_key_values"),
    (lambda lm: _legacy(lm, batch=1), "batch"),
    (lambda lm: lm(input_ids=IDS[:1, :5], use_cache=True).past_key_values, "batch"),
    (lambda lm: Gemma2Cache(["full_attention"], 4), "holds 1 layers, this model has 3"),
])
def test_bad_caches_are_input_errors(lm, make, message):
    with pytest.raises(InputError, match=message):
        lm(input_ids=IDS[:, 5:6], past_key_values=make(lm))


@pytest.mark.parametrize("name", ["use_cache", "output_attentions", "output_hidden_states", "return_dict"])
@pytest.mark.parametrize("value", ["False", np.zeros((2, 2)), 2, 0.5])
def test_yes_no_arguments_take_bools_only(any_model, name, value):
    with pytest.raises(InputError, match=name):
        any_model(input_ids=IDS, **{name: value})


def test_inputs_embeds_beyond_float32_are_refused(lm):
    with pytest.raises(InputError, match="float32 range"):
        lm(inputs_embeds=np.full((1, 2, 32), 1e300))


def test_unknown_keyword_is_an_input_error_and_a_type_error(any_model):
    with pytest.raises(UnexpectedArgumentError, match="output_logits") as info:
        any_model(input_ids=IDS, output_logits=True)
    assert isinstance(info.value, InputError) and isinstance(info.value, TypeError)


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 2]), "one class per row"),
    (np.array([0, 7]), "out of range"),
    (np.array([[0.0, 1.0]]), "shape"),
    (np.array(["a", "b"]), "numeric"),
    (np.array([[np.nan, 0, 0], [0, 0, 0]]), "NaN"),
    ([[1], [2, 3]], "rectangular"),
])
def test_sequence_classification_bad_labels(labels, message):
    m = _make(Gemma2ForSequenceClassification)
    with pytest.raises(InputError, match=message):
        m(input_ids=IDS, labels=labels)
    assert m.config.problem_type is None  # a refused call does not fix the problem type


# ---- the property sweep: arbitrary values for each argument -> a result or an InputError, never anything else
_JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 200), st.floats(allow_nan=True), st.text(max_size=3),
    st.just(object()), st.just({"a": 1}), st.just(np.nan),
    st.lists(st.integers(-3, 120), max_size=4),
    st.lists(st.lists(st.integers(-3, 120), min_size=1, max_size=4), min_size=1, max_size=3),
    st.lists(st.lists(st.floats(-2, 2), min_size=1, max_size=3), min_size=1, max_size=2),
    st.tuples(st.integers(0, 3), st.integers(0, 3)),
    st.sampled_from([np.zeros((2, 8), np.int64), np.ones((2, 8), bool), np.zeros((2, 8, 32), np.float32),
                     np.zeros((1, 8, 12), np.float32), np.arange(8), np.zeros((2, 8), np.float16),
                     np.zeros((0,), np.int64), np.zeros((2, 0), np.int64), np.array(3), np.zeros((2, 8), complex),
                     np.array([[2 ** 62] * 8]), np.array([[-(2 ** 62)] * 8]), np.full((2, 8), 2, np.uint8)]),
)
_ARGS = ["input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache",
         "output_attentions", "output_hidden_states", "return_dict", "cache_position", "position_embeddings"]
_HEAD_ARGS = {Gemma2Model: [], Gemma2ForCausalLM: ["labels", "logits_to_keep", "num_items_in_batch"],
              Gemma2ForSequenceClassification: ["labels"], Gemma2ForTokenClassification: ["labels"]}
_SWEEP_MODELS = {}


def _sweep_model(cls):
    if cls not in _SWEEP_MODELS:
        _SWEEP_MODELS[cls] = _make(cls, BACKENDS[-1])
    return _SWEEP_MODELS[cls]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_forward_argument_types_give_results_or_input_errors(cls, data):
    model = _sweep_model(cls)
    names = _ARGS + _HEAD_ARGS[cls]
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=4), label="args")
    kwargs = {"input_ids": IDS}  # a valid base call, then some arguments replaced by arbitrary values
    if data.draw(st.booleans(), label="continue from a cache"):
        cache = Gemma2Cache(model.config.layer_types, model.config.sliding_window)
        model(input_ids=IDS[:, :3], past_key_values=cache, use_cache=True)  # fills the cache (every class)
        kwargs["past_key_values"] = cache
        kwargs["input_ids"] = IDS[:, 3:]
        if data.draw(st.booleans(), label="legacy tuple"):
            kwargs["past_key_values"] = kwargs["past_key_values"].to_legacy_cache()
    for name in chosen:
        kwargs[name] = data.draw(_JUNK, label=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # past-max_position warnings are the point of some draws
            # an overflow or invalid value inside numpy fails the test (underflow is normal: exp of masked scores)
            with np.errstate(over="raise", invalid="raise", divide="raise"):
                out = model(**kwargs)
    except InputError:
        return
    _assert_finite(out.to_tuple() if hasattr(out, "to_tuple") else out, kwargs)


def _assert_finite(x, kwargs):
    """Every array in a result (outputs, hidden states, loss) is finite; the cache object is skipped."""
    if isinstance(x, (tuple, list)):
        for y in x:
            _assert_finite(y, kwargs)
    elif isinstance(x, (np.ndarray, float, np.floating)):
        assert np.isfinite(x).all(), kwargs
