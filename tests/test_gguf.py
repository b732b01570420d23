"""GGUF loading: files written here with llama.cpp's own `gguf.GGUFWriter`, in llama.cpp's Gemma 2 layout
(tensor names, 1 + w norms, metadata keys), must give the logits of the safetensors model."""

from __future__ import annotations

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gemma2np import CheckpointError, Gemma2Config, Gemma2ForCausalLM  # noqa: E402
from gemma2np.gguf_io import load_gguf, read_gguf_config  # noqa: E402

Q = gguf.GGMLQuantizationType

# Tiny but non-degenerate: heads * head_dim (4 * 32 = 128) != hidden (64), GQA 2:1, a sliding window
# shorter than the test sequence, rows a multiple of Q8_0's 32-element blocks. query_pre_attn_scalar is
# head_dim because that is what llama.cpp uses for any layer count but 46.
TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=5, max_position_embeddings=64,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6, rope_theta=10000.0,
    initializer_range=0.2,  # large enough for the softcaps to bite
)
IDS = np.array([[2, 17, 5, 60, 33, 9, 71, 4, 88, 12, 40]], dtype=np.int64)

HF_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    layer, rest = parts[2], ".".join(parts[3:-1])
    return f"blk.{layer}.{HF_TO_GGUF_LAYER[rest]}.weight"


def make_model(tie=True, seed=0):
    cfg = Gemma2Config(**TINY, tie_word_embeddings=tie)
    model = Gemma2ForCausalLM.from_config(cfg, seed=seed)
    state = {k: np.array(v, dtype=np.float32) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed + 1)
    for k in state:  # HF inits norms to 0, which would hide a missing/extra `1 +`: randomise them
        if k.endswith("norm.weight"):
            state[k] = rng.normal(0.0, 0.5, size=state[k].shape).astype(np.float32)
    return cfg, state


def write_gguf(path, cfg, state, qtype=Q.F32, arch="gemma2", norm_qtype=Q.F32, meta=True):
    """What llama.cpp's convert_hf_to_gguf.py writes for Gemma 2: norms stored as 1 + w (F32 like every
    1-D tensor there), 2-D weights in `qtype`, no output tensor when the head is tied."""
    w = gguf.GGUFWriter(os.fspath(path), arch)
    if meta:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_sliding_window(cfg.sliding_window)
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_token_list([f"tok{i}" for i in range(cfg.vocab_size)])
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_pad_token_id(0)
    for hf, value in state.items():
        value = np.asarray(value, dtype=np.float32)
        if hf.endswith("norm.weight"):
            value = value + np.float32(1.0)
            t = norm_qtype
        else:
            t = qtype
        if t == Q.F32:
            w.add_tensor(gguf_name(hf), value)
        elif t == Q.F16:
            w.add_tensor(gguf_name(hf), value.astype(np.float16))
        else:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(value, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    cfg, state = make_model()
    hf_dir = d / "hf"
    Gemma2ForCausalLM(cfg, state).save_pretrained(hf_dir)
    ref = Gemma2ForCausalLM.from_pretrained(hf_dir)
    return d, cfg, state, ref(input_ids=IDS).logits


def test_f32_matches_safetensors(reference):
    d, cfg, state, want = reference
    write_gguf(d / "f32.gguf", cfg, state)
    cfg_dict, gstate = load_gguf(d / "f32.gguf")
    # norms: (1 + w) - 1 in float32 is not bit-exact for w far from 0, but 1 + that gives back 1 + w
    for k, v in state.items():
        np.testing.assert_allclose(np.asarray(gstate[k], np.float32), v, rtol=0, atol=2e-7, err_msg=k)
    got = Gemma2ForCausalLM.from_pretrained(d, gguf_file="f32.gguf")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
                "attn_logit_softcapping", "final_logit_softcapping", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "rope_theta"):
        assert getattr(got.config, key) == pytest.approx(getattr(cfg, key)), key
    logits = got(input_ids=IDS).logits
    err = float(np.abs(logits - want).max())
    assert err < 1e-6, err  # measured 0.0: (1 + w) - 1 then 1 + that gives back the stored 1 + w exactly


@pytest.mark.parametrize(
    "qtype, bound",
    [
        # max |logit diff| / std(logits) measured on this model for seeds 0, 1, 2 (logit std ~1.75):
        #   F16 0.0027-0.0035, BF16 0.017-0.031, Q8_0 0.083-0.100 (Q8_0 is coarser than BF16 here: its step is
        #   blockmax/127 ~ 0.02 sigma for Gaussian weights without outliers, vs bf16's 2^-9 relative).
        # Bounds: ~3x the worst measured. Argmax tokens agree everywhere in all three.
        (Q.F16, 0.01),
        (Q.BF16, 0.1),
        (Q.Q8_0, 0.3),
    ],
)
def test_quantized_close_to_safetensors(reference, qtype, bound):
    d, cfg, state, want = reference
    name = f"{qtype.name}.gguf"
    write_gguf(d / name, cfg, state, qtype=qtype)
    _, gstate = load_gguf(d / name)
    # the loaded weights must be exactly what the gguf package's dequantizer decodes (no extra rounding)
    emb = np.asarray(gstate["model.embed_tokens.weight"], np.float32)
    expect = gguf.quants.dequantize(gguf.quants.quantize(state["model.embed_tokens.weight"], qtype), qtype) \
        if qtype != Q.F16 else state["model.embed_tokens.weight"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(emb, expect)
    logits = Gemma2ForCausalLM.from_pretrained(d, gguf_file=name)(input_ids=IDS).logits
    err = float(np.abs(logits - want).max()) / float(want.std())
    print(f"{qtype.name}: max |logit diff| / std(logits) = {err:.3g}")
    assert err < bound, err
    assert err > 0  # the quantization really happened
    np.testing.assert_array_equal(logits.argmax(-1), want.argmax(-1))


def test_bf16_norms_rounding_is_kept_as_stored(reference):
    """A file whose norms were stored as BF16(1 + w): we get back exactly BF16(1 + w) - 1, which differs
    from w by up to half a bf16 step at 1 (2^-8); that loss happened when the file was written."""
    d, cfg, state, _ = reference
    write_gguf(d / "bf16norm.gguf", cfg, state, norm_qtype=Q.BF16)
    _, gstate = load_gguf(d / "bf16norm.gguf")
    k = "model.layers.0.input_layernorm.weight"
    stored = gguf.quants.dequantize(gguf.quants.quantize(state[k] + np.float32(1), Q.BF16), Q.BF16)
    np.testing.assert_array_equal(gstate[k], stored - np.float32(1))
    assert np.abs(gstate[k] - state[k]).max() <= 2.0**-8 * 2  # |1 + w| < 2 here: step at most 2^-7


def test_untied_head(tmp_path):
    cfg, state = make_model(tie=False, seed=3)
    assert "lm_head.weight" in state
    Gemma2ForCausalLM(cfg, state).save_pretrained(tmp_path / "hf")
    want = Gemma2ForCausalLM.from_pretrained(tmp_path / "hf")(input_ids=IDS).logits
    write_gguf(tmp_path / "u.gguf", cfg, state)
    got = Gemma2ForCausalLM.from_pretrained(tmp_path, gguf_file="u.gguf")
    assert got.config.tie_word_embeddings is False
    assert float(np.abs(got(input_ids=IDS).logits - want).max()) < 1e-5


def test_query_scale_rule_of_llama_cpp(tmp_path):
    """llama.cpp: 1/sqrt(head_dim) unless the model has 46 layers (27B): then 1/sqrt(hidden // heads)."""
    cfg27 = Gemma2Config(**{**TINY, "num_hidden_layers": 46, "hidden_size": 96, "num_attention_heads": 4,
                            "head_dim": 32})
    write_gguf(tmp_path / "m46.gguf", cfg27, {})
    assert read_gguf_config(tmp_path / "m46.gguf")["query_pre_attn_scalar"] == 96 // 4
    cfg26 = Gemma2Config(**{**TINY, "num_hidden_layers": 26, "hidden_size": 96})
    write_gguf(tmp_path / "m26.gguf", cfg26, {})
    assert read_gguf_config(tmp_path / "m26.gguf")["query_pre_attn_scalar"] == 32
    # the published shapes: 27B -> 4608 // 32 = 144 (its config's value), 2B/9B -> head_dim 256


def test_not_gemma2(tmp_path):
    cfg, state = make_model()
    write_gguf(tmp_path / "llama.gguf", cfg, state, arch="llama")
    with pytest.raises(CheckpointError, match="architecture is 'llama', not 'gemma2'"):
        load_gguf(tmp_path / "llama.gguf")


def test_truncated(reference, tmp_path):
    d, cfg, state, _ = reference
    write_gguf(tmp_path / "full.gguf", cfg, state)
    raw = (tmp_path / "full.gguf").read_bytes()
    for cut in (len(raw) - 1000, len(raw) // 2, 40, 3):
        (tmp_path / "cut.gguf").write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="cut.gguf"):
            load_gguf(tmp_path / "cut.gguf")


def test_missing_file_and_not_gguf(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        load_gguf(tmp_path / "junk.gguf")


def test_unsupported_quant_type_is_dequantized_or_clear(reference, tmp_path):
    """Types beyond the four required ones go through gguf.quants (Q4_0 here); the error path names the type."""
    d, cfg, state, want = reference
    write_gguf(tmp_path / "q4.gguf", cfg, state, qtype=Q.Q4_0)
    logits = Gemma2ForCausalLM.from_pretrained(tmp_path, gguf_file="q4.gguf")(input_ids=IDS).logits
    assert np.isfinite(logits).all()
    # 4-bit is coarse (measured max diff 1.1-1.5 logit std, 80-90% argmax agreement) but the same model
    assert float(np.abs(logits - want).max()) < 3 * float(want.std())
    assert float(np.corrcoef(logits.ravel(), want.ravel())[0, 1]) > 0.8
