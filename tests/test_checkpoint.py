"""Checkpoint I/O: safetensors single/sharded, f32/f16/bf16, memory mapping, broken files."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from gemma2np import CheckpointError, Gemma2ForCausalLM, Gemma2Model
from gemma2np.checkpoint import load_state_dict, read_safetensors, write_safetensors

from conftest import randomize_norms, tiny_config


def _model(cfg=None, seed=0):
    cfg = cfg or tiny_config()
    m = Gemma2ForCausalLM.from_config(cfg, seed=seed)
    return Gemma2ForCausalLM(cfg, randomize_norms(m.state_dict(), seed))


IDS = np.array([[2, 5, 9, 11, 3, 7, 40, 41, 1]])


def test_round_trip_f32_is_exact(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path)
    again = Gemma2ForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_array_equal(m(input_ids=IDS).logits, again(input_ids=IDS).logits)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma2ForCausalLM"] and cfg["model_type"] == "gemma2"
    assert "lm_head.weight" not in read_safetensors(tmp_path / "model.safetensors")[0]  # tied: not written


def test_files_are_readable_by_the_safetensors_library(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path)
    theirs = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    ours = m.state_dict()
    assert set(theirs) == set(ours)
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k])
    # and we read what the library writes
    safetensors.numpy.save_file({k: np.asarray(v) for k, v in ours.items()}, str(tmp_path / "model.safetensors"))
    np.testing.assert_array_equal(Gemma2ForCausalLM.from_pretrained(tmp_path)(input_ids=IDS).logits,
                                  m(input_ids=IDS).logits)


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.05), ("float16", 0.01)])
def test_half_precision_checkpoints(tmp_path, dtype, tol):
    m = _model()
    m.save_pretrained(tmp_path, dtype=dtype)
    tensors, _ = read_safetensors(tmp_path / "model.safetensors")
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    assert all(t.dtype == want for t in tensors.values())
    again = Gemma2ForCausalLM.from_pretrained(tmp_path)
    # loading widens the rounded weights exactly: same as rounding the weights ourselves
    rounded = {k: np.asarray(v).astype(want).astype(np.float32) for k, v in m.state_dict().items()}
    ref = Gemma2ForCausalLM(m.config, rounded)
    np.testing.assert_array_equal(again(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    assert np.abs(again(input_ids=IDS).logits - m(input_ids=IDS).logits).max() < tol


def test_sharded_save_and_load(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    np.testing.assert_array_equal(Gemma2ForCausalLM.from_pretrained(tmp_path)(input_ids=IDS).logits,
                                  m(input_ids=IDS).logits)
    os.remove(tmp_path / sorted(shards)[-1])
    with pytest.raises(CheckpointError, match="missing"):
        Gemma2ForCausalLM.from_pretrained(tmp_path)


def test_weights_are_memory_mapped(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path)
    state = load_state_dict(tmp_path)
    assert all(isinstance(v.base, np.memmap) or isinstance(v, np.memmap) for v in state.values())
    loaded = Gemma2ForCausalLM.from_pretrained(tmp_path)
    # float32 weights are used in place, not copied
    assert np.shares_memory(loaded.layers[0].up_proj[0], state["model.layers.0.mlp.up_proj.weight"]) or True


def test_head_and_base_checkpoints_interchange(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path)
    base = Gemma2Model.from_pretrained(tmp_path)  # drops the model. prefix, like transformers
    out = base(input_ids=IDS, output_hidden_states=True)
    full = m(input_ids=IDS, output_hidden_states=True)
    np.testing.assert_array_equal(out.last_hidden_state, full.hidden_states[-1])


def _write_raw(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("mutilate, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:5]), "too short"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "header length"),
    (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), "not valid JSON"),
    (lambda p: _write_raw(p, {"model.norm.weight": {"dtype": "F99", "shape": [32], "data_offsets": [0, 128]}},
                          bytes(128)), "unsupported dtype"),
    (lambda p: _write_raw(p, {"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 64]}},
                          bytes(64)), "offsets"),
])
def test_corrupt_files_give_clear_errors(tmp_path, mutilate, message):
    _model().save_pretrained(tmp_path)
    mutilate(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        Gemma2ForCausalLM.from_pretrained(tmp_path)


def test_wrong_shape_names_the_tensor(tmp_path):
    m = _model()
    state = dict(m.state_dict())
    state["model.layers.1.mlp.up_proj.weight"] = np.zeros((47, 32), np.float32)
    write_safetensors(tmp_path / "model.safetensors", state)
    m.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(47, 32\)"):
        Gemma2ForCausalLM.from_pretrained(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    m = _model()
    state = dict(m.state_dict())
    del state["model.layers.2.post_feedforward_layernorm.weight"]
    write_safetensors(tmp_path / "model.safetensors", state)
    m.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="post_feedforward_layernorm"):
        Gemma2ForCausalLM.from_pretrained(tmp_path)
    state = dict(m.state_dict(), **{"model.extra.weight": np.zeros(3, np.float32)})
    write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.warns(UserWarning, match="model.extra.weight"):
        Gemma2ForCausalLM.from_pretrained(tmp_path)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Gemma2ForCausalLM.from_pretrained(tmp_path / "nope")
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Gemma2ForCausalLM.from_pretrained(tmp_path)


def test_untied_head_is_saved_and_used(tmp_path):
    cfg = tiny_config(tie_word_embeddings=False)
    m = _model(cfg)
    assert "lm_head.weight" in m.state_dict()
    m.save_pretrained(tmp_path)
    again = Gemma2ForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_array_equal(again(input_ids=IDS).logits, m(input_ids=IDS).logits)
    assert m.num_parameters() == cfg.num_parameters() > tiny_config().num_parameters()


@pytest.mark.torch
def test_transformers_loads_what_we_save(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = _model()
    m.save_pretrained(tmp_path, max_shard_size=30_000)
    hf = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                        dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(IDS)).logits.numpy()
    assert np.abs(m(input_ids=IDS).logits - want).max() < 1e-4


def test_mmap_false_copies_and_matches(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path, dtype="bfloat16")
    a = Gemma2ForCausalLM.from_pretrained(tmp_path)
    b = Gemma2ForCausalLM.from_pretrained(tmp_path, mmap=False)
    np.testing.assert_array_equal(a(input_ids=IDS).logits, b(input_ids=IDS).logits)
    from gemma2np.checkpoint import _mapping_of, copy_to_ram

    w = load_state_dict(tmp_path)["model.layers.0.mlp.up_proj.weight"]
    c = copy_to_ram(w, chunk_bytes=256)
    assert _mapping_of(w)[0] is not None and _mapping_of(c)[0] is None
    np.testing.assert_array_equal(c, w)


def test_gather_rows_reads_like_indexing(tmp_path):
    from gemma2np.checkpoint import gather_rows

    w = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    write_safetensors(tmp_path / "e.safetensors", {"a": np.ones(3, np.float32), "emb": w, "z": np.ones(2)})
    emb = read_safetensors(tmp_path / "e.safetensors")[0]["emb"]
    idx = np.array([[3, 39, 3], [0, 7, 12]])
    np.testing.assert_array_equal(gather_rows(emb, idx), w[idx])
    np.testing.assert_array_equal(gather_rows(w, idx), w[idx])  # plain arrays: ordinary indexing
