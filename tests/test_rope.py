"""Tests for gemma2np.rope against goldens from transformers' Gemma2RotaryEmbedding (no torch needed), plus live torch
comparisons (@pytest.mark.torch), validation errors and closed-form properties of the rotation.

Tolerances, and why:
* inv_freq: <= 2 ulp. We compute float32 pow correctly rounded (== libm powf, torch's scalar path); torch's vectorised
  AVX512 pow (Sleef, 1-ulp accurate) differs by 1 ulp on ~1% of elements, which ones depending on the CPU; the
  following float32 reciprocal can turn that into 2 ulp of inv_freq (seen once, dynamic NTK at seq_len 2000).
* cos/sin from HF's own inv_freq: <= 1e-6 abs (the angle is then the same float32 product; only cos/sin rounding
  differs, measured <= 6e-8).
* cos/sin end to end: the 1-ulp inv_freq differences move the angle by up to pos * |d inv_freq|, which at high
  frequencies and positions ~1e4 reaches ~1e-3. That is a property of float32 RoPE itself (HF on a non-AVX512 CPU
  differs from HF here by the same amount), so the end-to-end bound is 1e-6 + (max(pos) * max|d inv_freq| + one
  float32 ulp of the largest angle) * scale (see e2e_bound), and where inv_freq is bit-identical it is the plain 1e-6.
"""
import json
import os
import warnings

import numpy as np
import pytest

from gemma2np import rope

HERE = os.path.dirname(os.path.abspath(__file__))
GOLD_DIR = os.path.join(HERE, "..", "reference_outputs", "rope")
GOLD = np.load(os.path.join(GOLD_DIR, "rope_goldens.npz"))
META = json.load(open(os.path.join(GOLD_DIR, "rope_goldens.json")))
CASES = sorted(META["cases"])


def ulp_diff(a, b):
    """Max distance in float32 units-in-the-last-place (both arrays positive or zero here)."""
    a = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    b = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
    return int(np.max(np.abs(a - b))) if a.size else 0


def e2e_bound(position_ids, inv, inv_ref, scale):
    """|cos - cos_ref| bound when inv_freq differs from the reference by a few ulps: the exact angles differ by at
    most max(pos) * max|d inv|, and each float32 product pos * inv then rounds by <= half an ulp of the angle
    (ulp(x) <= 2**-23 |x|), so +2**-23 * max angle; identical inv_freq gives identical angles: plain 1e-6."""
    d = np.abs(inv.astype(np.float64) - inv_ref.astype(np.float64))
    pmax = float(position_ids.max())
    extra = pmax * float(d.max()) + (2.0 ** -23 * pmax * float(np.max(inv_ref)) if d.max() > 0 else 0.0)
    return 1e-6 + extra * abs(scale)


def make(meta, dtype=np.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some cases deliberately trigger HF's warnings (e.g. yarn implicit factor)
        return rope.RotaryEmbedding(meta["rope_parameters"], meta["head_dim"], meta["max_position_embeddings"], dtype)


# ---------------------------------------------------------------------------------------------------- goldens

@pytest.mark.parametrize("name", CASES)
def test_init_inv_freq_and_scaling(name):
    m = META["cases"][name]
    emb = make(m)
    gold = GOLD[f"{name}/init_inv_freq"]
    assert emb.inv_freq.dtype == np.float32 and emb.inv_freq.shape == gold.shape
    assert ulp_diff(emb.inv_freq, gold) <= 2
    # the mismatches are rare (Sleef vs correctly rounded); more would mean a formula/order difference
    assert np.mean(emb.inv_freq == gold) >= 0.95
    assert emb.attention_scaling == m["init_attention_scaling"]  # Python-float formulas: exact


@pytest.mark.parametrize("name", CASES)
def test_forward_sequence_matches_hf(name):
    """Replays HF's sequence of forward calls: checks the state machine (dynamic growth/keep/reset, longrope
    short/long switch) through inv_freq after every call, and cos/sin both from HF's inv_freq and end to end."""
    m = META["cases"][name]
    emb = make(m)
    for i in range(m["n_calls"]):
        p = GOLD[f"{name}/{i}/position_ids"]
        gcos, gsin, ginv = GOLD[f"{name}/{i}/cos"], GOLD[f"{name}/{i}/sin"], GOLD[f"{name}/{i}/inv_freq"]
        cos, sin = emb(p)
        assert cos.dtype == np.float32 and cos.shape == gcos.shape == (p.shape[0], p.shape[1], m["head_dim"])
        # state: the right frequency set was selected (different sets differ by far more than 1 ulp)
        assert ulp_diff(emb.inv_freq, ginv) <= 2, f"call {i}"
        assert emb.attention_scaling == m["attention_scaling"][i]
        # end to end, with the bound explained in the module docstring
        bound = e2e_bound(p, emb.inv_freq, ginv, emb.attention_scaling)
        np.testing.assert_allclose(cos, gcos, rtol=0, atol=bound, err_msg=f"call {i}")
        np.testing.assert_allclose(sin, gsin, rtol=0, atol=bound, err_msg=f"call {i}")
        # forward path alone: HF's own inv_freq in, HF's cos/sin out within 1e-6
        saved = emb.inv_freq
        emb.inv_freq = ginv
        c2, s2 = emb.cos_sin(p)
        emb.inv_freq = saved
        np.testing.assert_allclose(c2, gcos, rtol=0, atol=1e-6, err_msg=f"call {i}")
        np.testing.assert_allclose(s2, gsin, rtol=0, atol=1e-6, err_msg=f"call {i}")


def test_goldens_cover_dynamic_grow_keep_reset():
    """Guard that the golden sequence really exercises the dynamic state machine (not a vacuous replay)."""
    name = "dynamic_f2_small"
    inv = [GOLD[f"{name}/{i}/inv_freq"] for i in range(META["cases"][name]["n_calls"])]
    init = GOLD[f"{name}/init_inv_freq"]
    maxp = [int(GOLD[f"{name}/{i}/position_ids"].max()) + 1 for i in range(len(inv))]
    assert maxp[:5] == [100, 700, 600, 512, 100]
    assert np.array_equal(inv[0], init)              # below max: original
    assert not np.allclose(inv[1], init)             # 700 > 512: grown
    assert np.array_equal(inv[2], inv[1])            # 600 <= cached 700: kept
    assert np.array_equal(inv[3], inv[1])            # seq_len == max (not <): kept
    assert np.array_equal(inv[4], init)              # 100 < 512: reset
    emb = make(META["cases"][name])
    cached = []
    for i in range(len(inv)):
        emb(GOLD[f"{name}/{i}/position_ids"])
        cached.append(emb.max_seq_len_cached)
    assert cached == [512, 700, 700, 700, 512, 2000, 3000]


def test_longrope_switches_on_seq_len():
    name = "longrope"
    m = META["cases"][name]
    emb = make(m)
    short = rope.compute_inv_freq(m["rope_parameters"], m["head_dim"], m["max_position_embeddings"])[0]
    long_ = rope.compute_inv_freq(m["rope_parameters"], m["head_dim"], m["max_position_embeddings"], 257)[0]
    assert not np.allclose(short, long_)
    for p_max, want in [(199, short), (255, short), (256, long_), (2999, long_), (99, short)]:
        emb(np.array([[0, p_max]]))
        assert np.array_equal(emb.inv_freq, want), p_max   # seq_len = p_max + 1 > 256 selects long


@pytest.mark.parametrize("name", sorted(META["init_only"]))
def test_compute_inv_freq_python_seq_len(name):
    m = META["init_only"][name]
    for i, seq_len in enumerate(m["seq_lens"]):
        inv, af = rope.compute_inv_freq(m["rope_parameters"], m["head_dim"], m["max_position_embeddings"], seq_len)
        gold = GOLD[f"init/{name}/{i}/inv_freq"]
        assert inv.shape == gold.shape and ulp_diff(inv, gold) <= 2
        assert af == m["attention_scaling"][i]


def test_partial_rotary_factor_dims():
    # default (Gemma2's own init) ignores it; the ROPE_INIT_FUNCTIONS types use int(head_dim * prf)
    p = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    assert rope.compute_inv_freq(p, 64, 4096)[0].shape == (32,)
    p = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5}
    assert rope.compute_inv_freq(p, 64, 4096)[0].shape == (16,)
    # proportional keeps head_dim // 2 entries, the NoPE tail being zero frequency (identity rotation)
    p = {"rope_type": "proportional", "rope_theta": 1e4, "partial_rotary_factor": 0.25}
    inv = rope.compute_inv_freq(p, 64, 4096)[0]
    assert inv.shape == (32,) and np.all(inv[8:] == 0) and np.all(inv[:8] > 0)


@pytest.mark.parametrize("name", CASES)
def test_float64_mode_is_close_to_hf_float32(name):
    """float64 ground truth vs HF float32: differences are float32 rounding of the angle, ~|angle| * 2**-23."""
    m = META["cases"][name]
    emb = make(m, np.float64)
    assert emb.inv_freq.dtype == np.float64
    for i in range(m["n_calls"]):
        p = GOLD[f"{name}/{i}/position_ids"]
        cos, sin = emb(p)
        assert cos.dtype == np.float64
        max_angle = float(p.max()) * float(emb.inv_freq.max())
        bound = (1e-6 + 4 * max_angle * 2.0 ** -23) * abs(emb.attention_scaling)
        np.testing.assert_allclose(cos, GOLD[f"{name}/{i}/cos"], rtol=0, atol=bound)
        np.testing.assert_allclose(sin, GOLD[f"{name}/{i}/sin"], rtol=0, atol=bound)


def test_output_dtype_cast():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    m = META["cases"]["yarn_f4"]
    p = GOLD["yarn_f4/0/position_ids"]
    c32, _ = make(m)(p)
    cbf, _ = make(m, ml_dtypes.bfloat16)(p)
    c16, _ = make(m, np.float16)(p)
    # computed in float32 then cast once, like HF's cos.to(x.dtype)
    assert np.array_equal(cbf, c32.astype(ml_dtypes.bfloat16))
    assert np.array_equal(c16, c32.astype(np.float16))


# ---------------------------------------------------------------------------------------------------- validation

BASE = {"rope_theta": 10000.0}


@pytest.mark.parametrize("params, match", [
    ({"rope_type": "bogus", **BASE}, "Unknown rope_type"),
    ({"rope_type": "axial", **BASE}, "Unknown rope_type"),        # no init function in transformers
    ({"rope_type": "linear", **BASE}, "factor"),
    ({"rope_type": "dynamic", **BASE}, "factor"),
    ({"rope_type": "linear", "factor": None, **BASE}, "factor"),
    ({"rope_type": "linear", "factor": "2", **BASE}, "factor"),
    ({"rope_type": "yarn", "factor": 2.0, **BASE}, "original_max_position_embeddings"),
    ({"rope_type": "longrope", "original_max_position_embeddings": 256, "long_factor": [1.0] * 32, **BASE},
     "short_factor"),
    ({"rope_type": "longrope", "original_max_position_embeddings": 256, "short_factor": [1.0] * 31,
      "long_factor": [1.0] * 32, **BASE}, "length 32"),
    ({"rope_type": "longrope", "original_max_position_embeddings": 256, "short_factor": [1.0] * 32,
      "long_factor": [1.0], **BASE}, "length 32"),
    ({"rope_type": "longrope", "original_max_position_embeddings": 256, "short_factor": "x",
      "long_factor": [1.0] * 32, **BASE}, "list of numbers"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
      **BASE}, "high_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, "rope_theta"),
    ({"rope_type": "default"}, "rope_theta"),
    ({"rope_type": "default", "rope_theta": -1.0}, "rope_theta"),
])
def test_validation_errors(params, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            rope.validate_rope_parameters(params, 64)


def test_odd_head_dim_rejected_like_hf():
    with pytest.raises(ValueError, match="even rotary dimension"):
        rope.validate_rope_parameters({"rope_type": "default", **BASE}, 255)
    rope.validate_rope_parameters({"rope_type": "default", **BASE}, 3)  # HF allows tiny test heads <= 4


@pytest.mark.parametrize("params, match", [
    ({"rope_type": "linear", "factor": 0.5, **BASE}, "factor field must be"),
    ({"rope_type": "linear", "factor": 2.0, "foo": 1, **BASE}, "Unrecognized keys"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096, "attention_factor": 1, **BASE},
     "attention_factor"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096, "beta_fast": 1, "beta_slow": 2,
      **BASE}, "beta_fast"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024, **BASE}, "does not match"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 1024, **BASE}, "greater than low_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192, **BASE}, "less than max_position_embeddings"),
    ({"rope_type": "longrope", "original_max_position_embeddings": 256, "short_factor": [1.0] * 32,
      "long_factor": [1.0] * 32, **BASE}, "factor"),
    ({"rope_type": "proportional", **BASE}, "partial_rotary_factor"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5, **BASE}, "cannot apply"),
])
def test_validation_warnings(params, match):
    with pytest.warns(UserWarning, match=match):
        rope.validate_rope_parameters(params, 64, max_position_embeddings=8192)


def test_valid_configs_are_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in CASES:
            m = META["cases"][name]
            if name in ("yarn_attention_factor", "proportional_factor", "longrope"):
                continue  # these deliberately trigger (mirrored) HF warnings
            rope.validate_rope_parameters(m["rope_parameters"], m["head_dim"], m["max_position_embeddings"])
        # old-style "type" is accepted as rope_type
        rope.validate_rope_parameters({"type": "linear", "factor": 2.0, **BASE}, 64)


# ---------------------------------------------------------------------------------------------------- closed form

def test_rotate_half_closed_form():
    x = np.arange(8.0)
    np.testing.assert_array_equal(rope.rotate_half(x), [-4, -5, -6, -7, 0, 1, 2, 3])
    # rotate_half twice is negation (a 90-degree rotation in each (i, i + D/2) plane)
    y = np.random.default_rng(1).standard_normal((2, 3, 5, 16))
    np.testing.assert_array_equal(rope.rotate_half(rope.rotate_half(y)), -y)


def _rot(D, positions, dtype=np.float64, theta=10000.0):
    emb = rope.RotaryEmbedding({"rope_type": "default", "rope_theta": theta}, D, 8192, dtype)
    return emb(np.asarray(positions)[None, :])


def test_rotation_preserves_norm_and_is_a_plane_rotation():
    rng = np.random.default_rng(2)
    D, T = 32, 7
    q = rng.standard_normal((1, 3, T, D))
    k = rng.standard_normal((1, 1, T, D))
    pos = np.array([0, 1, 5, 100, 1000, 8191, 20000])
    cos, sin = _rot(D, pos)
    q2, k2 = rope.apply_rotary_pos_emb(q, k, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(q2, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(k2, axis=-1), np.linalg.norm(k, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(q2[:, :, 0], q[:, :, 0], atol=0)  # position 0 is the identity
    # explicit formula: pair (i, i + D/2) rotated by angle pos * theta**(-2i/D)
    inv = 1.0 / 10000.0 ** (np.arange(0, D, 2) / D)
    ang = pos[:, None] * inv
    x1, x2 = q[..., : D // 2], q[..., D // 2:]
    want = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    np.testing.assert_allclose(q2, want, atol=1e-9)


def test_relative_position_property():
    """q(m) . k(n) depends only on m - n."""
    rng = np.random.default_rng(3)
    D = 64
    q = rng.standard_normal((1, 1, 1, D))
    k = rng.standard_normal((1, 1, 1, D))

    def score(m, n):
        cq, sq = _rot(D, [m])
        ck, sk = _rot(D, [n])
        qm, _ = rope.apply_rotary_pos_emb(q, q, cq, sq)
        _, kn = rope.apply_rotary_pos_emb(k, k, ck, sk)
        return float(np.sum(qm * kn))

    for delta in (0, 1, 7, 300):
        ref = score(delta, 0)
        for n in (1, 50, 4000):
            assert abs(score(n + delta, n) - ref) < 1e-9 * max(1.0, abs(ref))
    assert abs(score(7, 0) - score(0, 0)) > 1e-3  # and it does depend on the offset


def test_apply_rotary_rejects_partial_cos():
    q = np.zeros((1, 1, 2, 8))
    cos = np.ones((1, 2, 4))
    with pytest.raises(ValueError, match="head_dim"):
        rope.apply_rotary_pos_emb(q, q, cos, cos)


def test_position_ids_validation():
    emb = rope.RotaryEmbedding({"rope_type": "default", **BASE}, 8, 64)
    with pytest.raises(ValueError):
        emb(np.arange(4))                  # 1-D
    with pytest.raises(ValueError):
        emb(np.zeros((1, 4), np.float32))  # not integer


# ---------------------------------------------------------------------------------------------------- live torch

@pytest.mark.torch
@pytest.mark.parametrize("name", CASES)
def test_live_against_transformers(name):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    import copy

    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding
    from transformers.models.gemma2.modeling_gemma2 import apply_rotary_pos_emb as hf_apply

    m = META["cases"][name]
    hd = m["head_dim"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = Gemma2Config(head_dim=hd, hidden_size=hd * 2, num_attention_heads=2, num_key_value_heads=1,
                           num_hidden_layers=2, intermediate_size=8, vocab_size=16,
                           max_position_embeddings=m["max_position_embeddings"],
                           rope_parameters=copy.deepcopy(m["rope_parameters"]))
    hf = Gemma2RotaryEmbedding(cfg)
    ours = make(m)
    x = torch.zeros(1)
    rng = np.random.default_rng(4)
    for i in range(m["n_calls"]):
        p = GOLD[f"{name}/{i}/position_ids"]
        hc, hs = hf(x, torch.from_numpy(p))
        c, s = ours(p)
        assert ulp_diff(ours.inv_freq, hf.inv_freq.numpy()) <= 2
        bound = e2e_bound(p, ours.inv_freq, hf.inv_freq.numpy(), ours.attention_scaling)
        np.testing.assert_allclose(c, hc.numpy(), rtol=0, atol=bound)
        np.testing.assert_allclose(s, hs.numpy(), rtol=0, atol=bound)
        # apply_rotary_pos_emb with identical cos/sin inputs: same float32 op order -> bit identical
        q = rng.standard_normal((p.shape[0], 2, p.shape[1], hd)).astype(np.float32)
        k = rng.standard_normal((p.shape[0], 1, p.shape[1], hd)).astype(np.float32)
        hq, hk = hf_apply(torch.from_numpy(q), torch.from_numpy(k), hc, hs)
        oq, ok = rope.apply_rotary_pos_emb(q, k, hc.numpy(), hs.numpy())
        np.testing.assert_array_equal(oq, hq.numpy())
        np.testing.assert_array_equal(ok, hk.numpy())


@pytest.mark.torch
def test_live_standardization_record_is_current():
    """The recorded kwargs -> rope_parameters standardization table still matches the installed transformers."""
    pytest.importorskip("torch")
    import copy

    from transformers import Gemma2Config
    for case in META["standardize"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = Gemma2Config(max_position_embeddings=8192, **copy.deepcopy(case["kwargs"]))
        assert dict(cfg.rope_parameters) == case["rope_parameters"]
