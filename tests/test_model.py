"""Model-level behaviour not covered by the goldens: bad input, float64 truth, outputs API, intermediates."""

import warnings

import numpy as np
import pytest

from gemma2np import (Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification,
                      Gemma2ForTokenClassification, Gemma2Model, InputError)

from gemma2np.intermediates import forward_order

from conftest import randomize_norms, tiny_config


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    m = Gemma2ForCausalLM.from_config(cfg, seed=3)
    return Gemma2ForCausalLM(cfg, randomize_norms(m.state_dict(), 3))


IDS = np.array([[2, 5, 9, 11, 3, 7, 40, 41, 1, 8], [0, 0, 2, 17, 18, 19, 20, 21, 22, 23]])
MASK = np.array([[1] * 10, [0, 0] + [1] * 8])


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=np.array([[2, 97]])), "out of range"),
    (dict(input_ids=np.array([[2, -1]])), "out of range"),
    (dict(input_ids=np.array([[2.0, 3.0]])), "integer"),
    (dict(input_ids=np.array([2, 3])), "shape"),
    (dict(input_ids=np.zeros((1, 0), np.int64)), "empty"),
    (dict(), "exactly one"),
    (dict(input_ids=IDS, inputs_embeds=np.zeros((2, 10, 32), np.float32)), "exactly one"),
    (dict(inputs_embeds=np.zeros((2, 10, 31), np.float32)), "inputs_embeds"),
    (dict(inputs_embeds=np.zeros((2, 10, 32), np.int64)), "floating"),
    (dict(input_ids=IDS, attention_mask=np.ones((2, 9))), "attention_mask"),
    (dict(input_ids=IDS, attention_mask=np.ones((2, 1, 10, 10))), "attention_mask"),
    (dict(input_ids=IDS, attention_mask=np.full((2, 10), 2)), "0 or 1"),
    (dict(input_ids=IDS, position_ids=np.zeros((3, 10), np.int64)), "position_ids"),
    (dict(input_ids=IDS, labels=np.zeros((2, 9), np.int64)), "labels"),
    (dict(input_ids=IDS, labels=np.full((2, 10), 500)), "out of range"),
    (dict(input_ids=IDS, past_key_values="cache"), "past_key_values"),
    (dict(input_ids=IDS, past_key_values=((np.zeros((2, 2, 3, 12)),) * 2,)), "one"),
])
def test_bad_input_is_a_clear_error(model, kwargs, message):
    with pytest.raises(InputError, match=message):
        model(**kwargs)


def test_unknown_keyword_is_a_type_error(model):
    with pytest.raises(TypeError, match="output_logits"):
        model(input_ids=IDS, output_logits=True)


def test_long_sequence_warns_and_runs():
    cfg = tiny_config(max_position_embeddings=8)
    m = Gemma2ForCausalLM.from_config(cfg)
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        out = m(input_ids=np.arange(2, 14)[None])
    assert np.isfinite(out.logits).all()


def test_float64_is_a_close_ground_truth(model):
    m64 = Gemma2ForCausalLM(model.config, model.state_dict(), dtype="float64")
    o32 = model(input_ids=IDS, attention_mask=MASK, labels=IDS)
    o64 = m64(input_ids=IDS, attention_mask=MASK, labels=IDS)
    assert o64.logits.dtype == np.float64 and o32.logits.dtype == np.float32
    diff = np.abs(o64.logits - o32.logits).max()
    print(f"float32 vs float64 max|diff| logits {diff:.2e}")
    assert 0 < diff < 1e-4
    assert abs(float(o64.loss) - float(o32.loss)) < 1e-5


def test_outputs_behave_like_model_output(model):
    out = model(input_ids=IDS, attention_mask=MASK, labels=IDS, output_hidden_states=True)
    assert out["logits"] is out.logits and out[0] is out.loss and out[1] is out.logits
    assert list(out.keys()) == ["loss", "logits", "past_key_values", "hidden_states"]
    t = model(input_ids=IDS, attention_mask=MASK, use_cache=False, return_dict=False)
    assert isinstance(t, tuple) and len(t) == 1 and np.array_equal(t[0], out.logits)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_padding_does_not_change_real_tokens(model):
    """Left padding with an attention mask gives the same logits at real tokens as the unpadded row,
    given the same positions (RoPE is relative, so even default arange positions agree)."""
    padded = model(input_ids=IDS[1:], attention_mask=MASK[1:]).logits[0, 2:]
    alone = model(input_ids=IDS[1:, 2:]).logits[0]
    assert np.abs(padded - alone).max() < 1e-5


def test_sliding_window_is_enforced(model):
    """Changing a token more than sliding_window positions back changes nothing in a model whose layers
    all slide, and something in one with a global layer."""
    cfg = tiny_config(layer_types=["sliding_attention"] * 3)
    m = Gemma2ForCausalLM(cfg, model.state_dict())
    a = IDS[:1].copy()
    b = a.copy()
    b[0, 0] = 60
    # with 3 sliding layers of window 4, position t sees back at most 3 * 3 = 9 positions: t=9 reaches 0
    la, lb = m(input_ids=a).logits, m(input_ids=b).logits
    assert np.abs(la[0, 9] - lb[0, 9]).max() > 0
    cfg1 = tiny_config(num_hidden_layers=1, layer_types=["sliding_attention"])
    s = {k: v for k, v in model.state_dict().items() if ".layers." not in k or ".layers.0." in k}
    m1 = Gemma2ForCausalLM(cfg1, s)
    l1a, l1b = m1(input_ids=a).logits, m1(input_ids=b).logits
    assert np.array_equal(l1a[0, 4:], l1b[0, 4:])  # window 4: position >= 4 cannot see position 0
    assert not np.array_equal(l1a[0, 3], l1b[0, 3])


def test_heads_share_the_base(model):
    cfg = tiny_config(num_labels=3)
    base_state = {k: v for k, v in model.state_dict().items() if k.startswith("model.")}
    rng = np.random.default_rng(0)
    seq = Gemma2ForSequenceClassification(cfg, dict(base_state, **{"score.weight": rng.normal(size=(3, 32)).astype(np.float32)}))
    tok = Gemma2ForTokenClassification(cfg, dict(base_state, **{"score.weight": rng.normal(size=(3, 32)).astype(np.float32),
                                                                "score.bias": rng.normal(size=3).astype(np.float32)}))
    h = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states[-1]
    out = seq(input_ids=IDS, attention_mask=MASK, labels=np.array([0, 2]))
    # pooled at the rightmost non-pad token (pad_token_id = 0): the last position in both rows
    np.testing.assert_allclose(out.logits, h[:, -1] @ seq.state_dict()["score.weight"].T, rtol=1e-5, atol=1e-6)
    assert out.loss.shape == ()
    t = tok(input_ids=IDS, labels=np.zeros((2, 10), np.int64))
    assert t.logits.shape == (2, 10, 3) and np.isfinite(t.loss)
    with pytest.raises(InputError):
        seq(input_ids=IDS, labels=np.array([0, 5]))


def test_record_intermediates_names_and_consistency(model):
    with model.record_intermediates() as rec:
        out = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
    L = model.config.num_hidden_layers
    np.testing.assert_array_equal(rec["embeddings"], out.hidden_states[0])
    for i in range(L - 1):
        np.testing.assert_array_equal(rec[f"layers.{i}.output"], out.hidden_states[i + 1])
    np.testing.assert_array_equal(rec["final_norm"], out.hidden_states[L])
    np.testing.assert_array_equal(rec["logits"], out.logits)
    assert rec["layers.0.q"].shape == (2, 4, 10, 12) and rec["layers.0.k"].shape == (2, 2, 10, 12)
    assert rec["layers.1.attn_probs"].shape == (2, 4, 10, 10)
    assert np.abs(np.tanh(rec["logits_raw"] / 3.0) * 3.0 - rec["logits"]).max() < 1e-6
    # every canonical name recorded once, in the order the forward pass computes them
    assert list(rec) == forward_order(L)
    # nothing is recorded outside the block: a different call afterwards leaves the store as it was
    before = {k: v.copy() for k, v in rec.items()}
    model(input_ids=IDS[:1, :4])
    assert list(rec) == list(before)
    for k, v in before.items():
        np.testing.assert_array_equal(rec[k], v)


def test_base_model_outputs(model):
    base = Gemma2Model(model.config, {k[6:]: v for k, v in model.state_dict().items()})
    out = base(input_ids=IDS, attention_mask=MASK, output_attentions=True)
    assert out.last_hidden_state.shape == (2, 10, 32) and len(out.attentions) == 3
    np.testing.assert_allclose(out.attentions[0].sum(-1), 1.0, rtol=1e-5)
    # a fully masked (left-pad) query row is uniform over all keys, as transformers' finfo.min mask makes it
    np.testing.assert_allclose(out.attentions[0][1, :, 0], 1 / 10, rtol=1e-6)


def test_head_missing_from_checkpoint_is_initialised_with_a_warning(model, tmp_path):
    model.save_pretrained(tmp_path)  # a causal-LM checkpoint: no score.weight
    with pytest.warns(UserWarning, match="score.weight"):
        seq = Gemma2ForSequenceClassification.from_pretrained(tmp_path)
    assert seq.state_dict()["score.weight"].shape == (seq.config.num_labels, 32)
    out = seq(input_ids=IDS, attention_mask=MASK)
    assert out.logits.shape == (2, seq.config.num_labels) and np.isfinite(out.logits).all()


def test_causal_lm_save_pretrained_keeps_generation_config(tmp_path):
    """save_pretrained writes generation_config.json beside the weights (as transformers does), so a saved copy
    of the bundled model keeps its sampling defaults, and a model without a file gets config.json's token ids."""
    import json
    import os

    from gemma2np import Gemma2ForCausalLM
    from gemma2np.cli import DEFAULT_MODEL_DIR
    from gemma2np.generation import get_generation_config

    m = Gemma2ForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    m.save_pretrained(tmp_path / "copy")
    with open(os.path.join(DEFAULT_MODEL_DIR, "generation_config.json"), encoding="utf-8") as f:
        original = json.load(f)
    with open(tmp_path / "copy" / "generation_config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved == original
    again = Gemma2ForCausalLM.from_pretrained(tmp_path / "copy")
    assert get_generation_config(again).to_dict() == get_generation_config(m).to_dict()

    fresh = Gemma2ForCausalLM.from_config(m.config, seed=0)
    fresh.save_pretrained(tmp_path / "fresh")
    with open(tmp_path / "fresh" / "generation_config.json", encoding="utf-8") as f:
        assert json.load(f) == {"bos_token_id": m.config.bos_token_id, "eos_token_id": m.config.eos_token_id,
                                "pad_token_id": m.config.pad_token_id}
