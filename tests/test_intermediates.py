"""gemma2np.intermediates: canonical names, aliases (transformers, llama.cpp), files; float64 mode; and the
Gemma 2 porting traps of docs/porting-guide.md, each simulated as a buggy port and caught by compare.

The trap tests build a *buggy port* by patching one numerics detail of gemma2np (the way a port gets it
wrong), record its tensors as a reference file would hold them, and check that `compare_to_reference`
against the correct model names the tensor docs/porting-guide.md says diverges first.
Runs without torch: the references are the committed transformers goldens in reference_outputs/.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gemma2np import Gemma2ForCausalLM, Gemma2Model, ops
from gemma2np import intermediates as im
from gemma2np.compare import compare_to_reference

REF = Path(__file__).resolve().parent.parent / "reference_outputs"
CASE = REF / "causal_gqa"  # GQA 4/2, head_dim 12, query_pre_attn_scalar 20, window 4 < 12 tokens, 4 layers


@pytest.fixture(scope="module")
def golden():
    with np.load(CASE / "golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def model():
    return Gemma2ForCausalLM.from_pretrained(CASE)


# ----------------------------------------------------------------------------- canonical names


def test_forward_order_is_the_recording_order(model, golden):
    L = model.config.num_hidden_layers
    rec = im.run_with_intermediates(model, golden["call0.input_ids"], golden["call0.attention_mask"])
    assert list(rec) == im.forward_order(L)  # every name recorded, exactly once, in forward order
    assert len(rec) == 1 + 14 * L + 3
    assert im.forward_order(L, causal_lm=False) == im.forward_order(L)[:-2]
    base = Gemma2Model.from_pretrained(CASE)
    assert list(im.run_with_intermediates(base, golden["call0.input_ids"])) == im.forward_order(L, causal_lm=False)


def test_recorded_shapes_match_the_documentation(model, golden):
    c = model.config
    B, T = golden["call0.input_ids"].shape
    dims = dict(B=B, T=T, S=T, E=c.hidden_size, H=c.num_attention_heads, K=c.num_key_value_heads, D=c.head_dim,
                F=c.intermediate_size, V=c.vocab_size)
    dims["T'"] = T
    rec = im.run_with_intermediates(model, golden["call0.input_ids"], golden["call0.attention_mask"])
    for name, value in rec.items():
        key = name.split(".")[-1] if name.startswith("layers.") else name
        shape_doc = im.DESCRIPTIONS[key][0]
        want = tuple(dims[s.strip()] for s in shape_doc.strip("()").split(","))
        assert value.shape == want, (name, shape_doc)
    doc = (Path(__file__).resolve().parent.parent / "docs" / "intermediates.md").read_text()
    for key in im.DESCRIPTIONS:
        assert f"`{key}`" in doc or f".{key}`" in doc, f"{key} is not documented in docs/intermediates.md"


def test_bad_num_layers():
    with pytest.raises(im.IntermediatesError):
        im.forward_order(0)


# ----------------------------------------------------------------------------- aliases


def test_transformers_aliases_are_the_transformers_outputs(model, golden):
    """hidden_states.{i} / attentions.{i} / logits resolve to the intermediates that ARE those outputs."""
    L = model.config.num_hidden_layers
    ids, mask = golden["call0.input_ids"], golden["call0.attention_mask"]
    with model.record_intermediates() as rec:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == L + 1
    for i, h in enumerate(out.hidden_states):
        np.testing.assert_array_equal(rec[im.resolve(f"hidden_states.{i}", L)], h)
        # and the goldens agree with what the alias points at
        np.testing.assert_allclose(rec[im.resolve(f"hidden_states.{i}", L)], golden[f"call0.hidden_states.{i}"],
                                   atol=1e-4)
    for i, a in enumerate(out.attentions):
        np.testing.assert_array_equal(rec[im.resolve(f"attentions.{i}", L)], a)
    np.testing.assert_array_equal(rec[im.resolve("logits", L)], out.logits)
    assert im.resolve(f"hidden_states.{L}", L) == "final_norm"  # NOT layers.{L-1}.output
    assert im.resolve(f"hidden_states.{L - 1}", L) == f"layers.{L - 2}.output"
    assert im.resolve("hidden_states.0") == "embeddings"


@pytest.mark.parametrize("name, canonical", [
    ("inp_scaled", "embeddings"), ("attn_norm-0", "layers.0.input_norm"), ("Qcur-1", "layers.1.q"),
    ("Kcur-2", "layers.2.k"), ("Vcur-3", "layers.3.v"), ("Qcur_scaled-0", "layers.0.q"),
    ("kq_soft_max-1", "layers.1.attn_probs"), ("attn_post_norm-2", "layers.2.post_attn_norm"),
    ("sa_out-0", "layers.0.attn_residual"), ("ffn_norm-1", "layers.1.pre_ffn_norm"),
    ("ffn_gate-2", "layers.2.gate"), ("ffn_up-3", "layers.3.up"), ("ffn_out-0", "layers.0.ffn_out"),
    ("ffn_post_norm-1", "layers.1.post_ffn_norm"), ("l_out-3", "layers.3.output"),
    ("result_norm", "final_norm"), ("result_output", "logits"),
    ("layers.2.gate", "layers.2.gate"), ("logits_raw", "logits_raw"),
])
def test_llama_cpp_and_canonical_names_resolve(name, canonical):
    assert im.resolve(name, 4) == canonical


@pytest.mark.parametrize("name, message", [
    ("hidden_states.5", "hidden_states.0 .. hidden_states.4"),
    ("l_out-4", "layer 4 does not exist"),
    ("layers.4.q", "layer 4 does not exist"),
    ("ffn_post_norm", "layer index"),
    ("kqv_out-0", "before o_proj"),
    ("inp_embd", "unscaled"),
    ("model.layers.0.mlp", "unknown tensor name"),
    ("layers.0.qq", "unknown tensor name"),
])
def test_unknown_names_are_clear_errors(name, message):
    with pytest.raises(im.IntermediatesError, match=message):
        im.lookup(name, 4)


def test_resolve_hidden_states_needs_num_layers():
    with pytest.raises(im.IntermediatesError, match="num_layers"):
        im.resolve("hidden_states.2")


def _to_llama_layout(rec, c, T):
    """Our (batch 1) tensors written the way a llama.cpp graph-callback dump holds them (ggml ne reversed)."""
    q = rec["layers.0.q"][0]  # (H, T, D)
    return {
        "inp_scaled": rec["embeddings"][0],
        "attn_norm-0": rec["layers.0.input_norm"][0],
        "Qcur-0": q.transpose(1, 0, 2),  # (T, H, D): ggml ne = [D, H, T]
        "Qcur_scaled-1": rec["layers.1.q"][0].transpose(1, 0, 2) * np.float32(c.query_pre_attn_scalar ** -0.5),
        "Kcur-1": rec["layers.1.k"][0].transpose(1, 0, 2),
        "Vcur-2": rec["layers.2.v"][0].transpose(1, 0, 2).reshape(T, -1),  # first Vcur callback: (T, K*D)
        "kq_soft_max-0": np.concatenate([rec["layers.0.attn_probs"][0],  # (H, T, n_kv) with padded KV cells
                                         np.zeros(rec["layers.0.attn_probs"][0].shape[:2] + (4,), np.float32)], -1),
        "sa_out-1": rec["layers.1.attn_residual"][0][None, None],  # a 4-D dump (1, 1, T, E)
        "ffn_gate-0": rec["layers.0.gate"][0], "ffn_up-0": rec["layers.0.up"][0],
        "ffn_out-3": rec["layers.3.ffn_out"][0],
        "l_out-3": rec["layers.3.output"][0][-1:],  # llama.cpp computes the last layer for the output rows only
        "result_norm": rec["final_norm"][0][-1:],
        "result_output": rec["logits"][0][-1:],
    }


def test_llama_cpp_layouts_convert_to_ours(model, golden):
    ids = golden["call5.input_ids"]  # batch 1: llama.cpp tensors have no batch axis
    rec = im.run_with_intermediates(model, ids)
    c = model.config
    for name, arr in _to_llama_layout(rec, c, ids.shape[1]).items():
        alias = im.lookup(name, c.num_hidden_layers)
        assert alias.source == "llama.cpp"
        conv = alias.to_canonical(arr, c)
        want = rec[alias.canonical]
        if conv.shape != want.shape:  # fewer tokens (last ones) or padded KV cells
            if alias.canonical.endswith("attn_probs"):
                conv = conv[..., : want.shape[-1]]
            else:
                want = want[:, -conv.shape[1]:]
        np.testing.assert_allclose(conv, want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_llama_cpp_pre_rope_qcur_is_refused(model, golden):
    rec = im.run_with_intermediates(model, golden["call5.input_ids"])
    flat = rec["layers.0.q"][0].transpose(1, 0, 2).reshape(12, -1)
    with pytest.raises(im.IntermediatesError, match="BEFORE RoPE"):
        im.lookup("Qcur-0", 4).to_canonical(flat, model.config)
    with pytest.raises(im.IntermediatesError, match="llama.cpp"):
        im.lookup("Kcur-0", 4).to_canonical(np.zeros((12, 3, 12), np.float32), model.config)


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_save_and_load_round_trip(tmp_path, model, golden, ext):
    rec = im.run_with_intermediates(model, golden["call0.input_ids"], golden["call0.attention_mask"])
    tensors = {"input_ids": golden["call0.input_ids"], "attention_mask": golden["call0.attention_mask"], **rec,
               "bf16": rec["embeddings"].astype(ml_dtypes.bfloat16), "f64": rec["logits"].astype(np.float64)}
    path = tmp_path / f"t{ext}"
    im.save_intermediates(path, tensors)
    back = im.load_tensors(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        want_dtype = np.float32 if (ext == ".npz" and k == "bf16") else v.dtype  # .npz has no bfloat16
        assert back[k].dtype == want_dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k].astype(np.float64), np.asarray(v).astype(np.float64), err_msg=k)


def test_file_errors(tmp_path):
    with pytest.raises(im.IntermediatesError, match="no such file"):
        im.load_tensors(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(im.IntermediatesError, match="cannot read"):
        im.load_tensors(junk)
    junk2 = tmp_path / "junk.bin"
    junk2.write_bytes(b"\x00" * 3)
    with pytest.raises(im.IntermediatesError, match="cannot read"):
        im.load_tensors(junk2)
    with pytest.raises(im.IntermediatesError, match=".npz or .safetensors"):
        im.save_intermediates(tmp_path / "x.pt", {"a": np.zeros(2)})


# ----------------------------------------------------------------------------- float64 mode


def test_float64_matches_the_goldens_and_float32(golden):
    m32 = Gemma2ForCausalLM.from_pretrained(CASE)
    m64 = Gemma2ForCausalLM.from_pretrained(CASE, dtype="float64")
    for call in ("call0", "call1", "call5"):
        ids = golden[f"{call}.input_ids"]
        mask = golden.get(f"{call}.attention_mask")
        out = m64(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert out.logits.dtype == np.float64
        np.testing.assert_allclose(out.logits, golden[f"{call}.logits"], atol=1e-4, rtol=0)
        for i, h in enumerate(out.hidden_states):
            np.testing.assert_allclose(h, golden[f"{call}.hidden_states.{i}"], atol=1e-4, rtol=0)
        r32 = im.run_with_intermediates(m32, ids, mask)
        r64 = im.run_with_intermediates(m64, ids, mask)
        assert list(r32) == list(r64)
        for name in r32:
            assert r64[name].dtype == np.float64, name
            scale = max(1.0, float(np.abs(r64[name]).max()))
            assert np.abs(r32[name] - r64[name]).max() <= 1e-5 * scale, name


@pytest.mark.parametrize("case", ["mha_untied_bias", "act_gelu", "base_model", "rope_yarn", "bf16_checkpoint"])
def test_float64_other_cases(case):
    import json

    import gemma2np

    d = REF / case
    spec = json.loads((d / "case.json").read_text())
    with np.load(d / "golden.npz") as z:
        g = {k: z[k] for k in z.files}
    m = getattr(gemma2np, spec["class"]).from_pretrained(d, dtype="float64")
    call = spec["calls"][0]
    args = {k: g[v] for k, v in call["inputs"].items() if k in ("input_ids", "attention_mask", "position_ids")}
    out = m(**args, output_hidden_states=True)
    for i, h in enumerate(out.hidden_states):
        np.testing.assert_allclose(h, g[f"{call['name']}.hidden_states.{i}"], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- porting traps


def _interleaved_rope(orig):
    """RoPE on interleaved pairs (2j, 2j+1) instead of halves (j, j + D/2): the GPT-J / Meta-llama layout."""
    def rope(q, k, cos, sin):
        D = q.shape[-1]
        perm = np.r_[0:D:2, 1:D:2]
        inv = np.argsort(perm)
        qe, ke = orig(q[..., perm], k[..., perm], cos, sin)
        return qe[..., inv], ke[..., inv]
    return rope


def _mask_then_cap_attention(q, k, v, q_pos, k_pos, key_valid, scaling, softcap_value, window, return_probs=False):
    n_rep = q.shape[1] // k.shape[1]
    k, v = ops.repeat_kv(k, n_rep), ops.repeat_kv(v, n_rep)
    s = (q @ np.swapaxes(k, -1, -2)) * q.dtype.type(scaling)
    s = s + ops.attention_bias(q_pos, k_pos, key_valid, window, q.dtype.type)
    s = ops.softcap(s, softcap_value)  # the bug: capping turns the mask into -cap
    p = ops.softmax(s, -1)
    return (p @ v, p) if return_probs else p @ v


def _zero_masked_rows(orig):
    def attention(*args, **kw):
        out, probs = orig(*args, **{**kw, "return_probs": True})
        q_pos, k_pos, key_valid, window = args[3], args[4], args[5], args[8]
        allowed = ops.visible_keys(q_pos, k_pos, window)[None]
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :]
        dead = ~allowed.any(-1)  # (B, T) query rows with no visible key
        probs = np.where(dead[:, None, :, None], 0, probs).astype(probs.dtype)
        out = probs @ ops.repeat_kv(args[2], probs.shape[1] // args[2].shape[1])
        return (out, probs) if kw.get("return_probs") else out
    return attention


def _bug(name, mp, m):
    """Patch `m` (or ops, while the buggy reference is recorded) the way a port gets `name` wrong."""
    c = m.config
    layer0 = m.layers[0]
    if name == "embedding_normalizer_dtype":  # sqrt(E) rounded to bf16 although the compute runs in float32
        mp.setattr(ops, "embedding_normalizer",
                   lambda e, dtype=np.float32: np.asarray(np.asarray(e ** 0.5, ml_dtypes.bfloat16), dtype))
    elif name == "rmsnorm_w_instead_of_1_plus_w":
        orig = ops.rms_norm
        mp.setattr(ops, "rms_norm", lambda x, w, eps: orig(x, w - 1, eps))
    elif name == "gguf_norm_plus_one_twice":  # GGUF already stores 1 + w; adding 1 again
        orig = ops.rms_norm
        mp.setattr(ops, "rms_norm", lambda x, w, eps: orig(x, w + 1, eps))
    elif name == "rope_interleaved":
        mp.setattr(ops, "apply_rotary_pos_emb", _interleaved_rope(ops.apply_rotary_pos_emb))
    elif name == "scale_by_head_dim":
        mp.setattr(c, "query_pre_attn_scalar", c.head_dim)
    elif name == "softcap_after_mask":
        mp.setattr(ops, "attention", _mask_then_cap_attention)
    elif name == "window_off_by_one":  # W + 1 keys instead of W (the query included)
        mp.setattr(ops, "visible_keys", lambda q, k, w: (k[None] <= q[:, None]) & (
            True if w is None else k[None] >= q[:, None] - w))
    elif name == "wrong_layers_slide":  # odd layers slide instead of even ones
        swap = {"sliding_attention": "full_attention", "full_attention": "sliding_attention"}
        mp.setattr(c, "layer_types", [swap[t] for t in c.layer_types])
    elif name == "gqa_tile_order":
        mp.setattr(ops, "repeat_kv", lambda x, n: x if n == 1 else np.tile(x, (1, n, 1, 1)))
    elif name == "gelu_exact_instead_of_tanh":
        mp.setattr(c, "hidden_activation", "gelu")
    elif name == "missing_post_ffn_norm":  # Llama-style two norms per layer
        orig = ops.rms_norm
        mp.setattr(ops, "rms_norm", lambda x, w, eps: x if w is layer0.post_feedforward_layernorm else orig(x, w, eps))
    elif name == "no_final_softcap":
        mp.setattr(c, "final_logit_softcapping", None)
    elif name == "untied_random_head":  # no lm_head.weight in the file -> a port initialises one
        w = np.random.default_rng(0).normal(0, 0.3, (c.vocab_size, c.hidden_size)).astype(np.float32)
        mp.setattr(m, "lm_head", m.backend.prepare_linear(w))
    elif name == "bf16_rope_inv_freq":  # model.to(bfloat16) also casts the RoPE inv_freq buffer
        r = m.rotary_emb
        mp.setattr(r, "inv_freq", r.inv_freq.astype(ml_dtypes.bfloat16).astype(r.inv_freq.dtype))
    elif name == "fully_masked_rows_zero":  # -inf mask + nan_to_num instead of finfo.min: pad rows 0, not uniform
        mp.setattr(ops, "attention", _zero_masked_rows(ops.attention))
    else:
        raise KeyError(name)


# trap -> (first divergence, tolerances).  docs/porting-guide.md quotes this table.
TRAPS = {
    "embedding_normalizer_dtype": ("embeddings", dict(atol=1e-6, rtol=1e-5)),
    "rmsnorm_w_instead_of_1_plus_w": ("layers.0.input_norm", {}),
    "gguf_norm_plus_one_twice": ("layers.0.input_norm", {}),
    "rope_interleaved": ("layers.0.q", {}),
    "scale_by_head_dim": ("layers.0.attn_probs", {}),
    "softcap_after_mask": ("layers.0.attn_probs", {}),
    "window_off_by_one": ("layers.0.attn_probs", {}),
    "wrong_layers_slide": ("layers.0.attn_probs", {}),
    "gqa_tile_order": ("layers.0.attn_probs", {}),
    "gelu_exact_instead_of_tanh": ("layers.0.ffn_out", {}),
    "missing_post_ffn_norm": ("layers.0.post_ffn_norm", {}),
    "no_final_softcap": ("logits", {}),
    "untied_random_head": ("logits_raw", {}),
    "bf16_rope_inv_freq": ("layers.0.q", {}),
    "fully_masked_rows_zero": (None, {}),  # pad rows only: compare skips them; whole-tensor goldens catch it
}


def _buggy_reference(trap, golden, monkeypatch):
    buggy = Gemma2ForCausalLM.from_pretrained(CASE)
    ids, mask = golden["call0.input_ids"], golden["call0.attention_mask"]  # row 1 is left-padded
    with monkeypatch.context() as mp:
        _bug(trap, mp, buggy)
        rec = im.run_with_intermediates(buggy, ids, mask)
    return {"input_ids": ids, "attention_mask": mask, **rec}


@pytest.mark.parametrize("trap", list(TRAPS))
def test_porting_trap_is_caught_at_the_right_tensor(trap, model, golden, monkeypatch):
    expected, tol = TRAPS[trap]
    ref = _buggy_reference(trap, golden, monkeypatch)
    report = compare_to_reference(model, ref, **tol)
    assert report.first_divergence == expected, report.format_table()
    if expected is not None:
        # everything before the first divergence agrees, and the error does not stay hidden
        names = [t.name for t in report.tensors]
        assert all(t.ok for t in report.tensors[: names.index(expected)])
        assert not [t for t in report.tensors if t.name == "logits"][0].ok or expected == "logits_raw"


def test_fully_masked_rows_differ_only_at_pads(model, golden, monkeypatch):
    """The uniform-row rule matters only at padded queries: compare skips them, whole tensors do not agree."""
    ref = _buggy_reference("fully_masked_rows_zero", golden, monkeypatch)
    good = im.run_with_intermediates(model, ref["input_ids"], ref["attention_mask"])
    pad = ~ref["attention_mask"].astype(bool)  # (B, T)
    diff = np.abs(good["layers.0.attn_probs"] - ref["layers.0.attn_probs"]).max(axis=(1, 3))  # (B, T)
    assert diff[pad].min() > 0.01 and diff[~pad].max() == 0
    # ours is the uniform average over all S keys at a padded query (transformers' finfo.min behaviour)
    row = good["layers.0.attn_probs"][1, :, 0]
    np.testing.assert_allclose(row, 1.0 / row.shape[-1], rtol=1e-6)


def test_hidden_states_last_is_after_the_final_norm(model, golden):
    """A port that dumps the raw last-layer output as hidden_states[L] diverges exactly there."""
    L = model.config.num_hidden_layers
    ids, mask = golden["call0.input_ids"], golden["call0.attention_mask"]
    rec = im.run_with_intermediates(model, ids, mask)
    ref = {"input_ids": ids, "attention_mask": mask, "logits": golden["call0.logits"]}
    ref.update({f"hidden_states.{i}": golden[f"call0.hidden_states.{i}"] for i in range(L)})
    ref[f"hidden_states.{L}"] = rec[f"layers.{L - 1}.output"]
    report = compare_to_reference(model, ref)
    assert report.first_divergence == f"hidden_states.{L}"
    assert [t.name for t in report.tensors if not t.ok] == [f"hidden_states.{L}"]


def test_position_ids_cumsum_vs_arange(model, golden):
    """generate's cumsum(mask) - 1 positions vs forward's arange on a left-padded row: q / k differ (RoPE is
    absolute), every attention probability, hidden state and logit at real positions agrees (RoPE is relative)."""
    ids, mask = golden["call0.input_ids"], golden["call0.attention_mask"]
    pos = np.where(mask == 1, np.cumsum(mask, -1) - 1, 1)
    rec = im.run_with_intermediates(model, ids, mask, position_ids=pos)
    report = compare_to_reference(model, {"input_ids": ids, "attention_mask": mask, **rec})
    assert report.first_divergence == "layers.0.q"
    bad = {t.canonical.split(".")[-1] for t in report.tensors if not t.ok}
    assert bad == {"q", "k"}, report.format_table()
    # and the golden made by transformers with these position_ids is matched when the file carries them
    ref = {"input_ids": ids, "attention_mask": mask, "position_ids": golden["call4.position_ids"],
           "logits": golden["call4.logits"]}
    ref.update({f"hidden_states.{i}": golden[f"call4.hidden_states.{i}"] for i in range(5)})
    assert compare_to_reference(model, ref).ok


def test_inputs_embeds_are_not_scaled(golden):
    """transformers 5.23 scales inside its embedding module: user inputs_embeds are used as given."""
    d = REF / "sharded_inputs_embeds"
    with np.load(d / "golden.npz") as z:
        g = {k: z[k] for k in z.files}
    m = Gemma2ForCausalLM.from_pretrained(d)
    with m.record_intermediates() as r:
        out = m(inputs_embeds=g["call1.inputs_embeds"])
    np.testing.assert_array_equal(r["embeddings"], g["call1.inputs_embeds"].astype(np.float32))
    np.testing.assert_allclose(out.logits, g["call1.logits"], atol=1e-4)
