"""`gemma2np convert` and the torch-free reader of Google's official PyTorch checkpoints.

Fixtures in tests/data/original/ were written by scripts/make_original_fixture.py with torch; the
expected HF tensors there were split by torch the way transformers' convert_gemma2_weights_to_hf.py does.
Nothing here imports torch except the test marked `torch`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from gemma2np import CheckpointError, Gemma2Config, Gemma2ForCausalLM
from gemma2np.checkpoint import read_safetensors
from gemma2np.convert import ConvertError, add_convert_parser, convert, main, published_config, run_convert
from gemma2np.original import UnsafeCheckpointError, load_original_checkpoint, load_torch_file

DATA = os.path.join(os.path.dirname(__file__), "data", "original")
CONFIG = os.path.join(DATA, "config.json")
TOKENIZER = os.path.join(os.path.dirname(__file__), "data", "tokenizer", "tokenizer.model")
IDS = np.array([[2, 5, 17, 9, 30, 11, 3, 8, 21]], dtype=np.int64)

VARIANTS = {  # checkpoint -> the expected HF tensors (as written by torch)
    "model_f32.ckpt": "expected_f32.safetensors",
    "model_bf16.ckpt": "expected_bf16.safetensors",
    "model_bf16_legacy.ckpt": "expected_bf16.safetensors",
    "sharded": "expected_bf16.safetensors",  # shared storage with offsets + column-major o_proj
}


def expected(name):
    tensors, _ = read_safetensors(os.path.join(DATA, name), mmap=False)
    return tensors


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def as_f32(a):
    return np.asarray(a).astype(np.float32)


@pytest.mark.parametrize("ckpt", sorted(VARIANTS))
def test_convert_matches_torch_split(ckpt, tmp_path):
    out = convert(os.path.join(DATA, ckpt), tmp_path / "hf", config_file=CONFIG)
    got, _ = read_safetensors(os.path.join(out, "model.safetensors"))
    want = expected(VARIANTS[ckpt])
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == np.float32, k  # default --dtype float32 (bf16 -> f32 is exact)
        np.testing.assert_array_equal(got[k], as_f32(want[k]), err_msg=k)
    cfg = load_json(os.path.join(out, "config.json"))
    assert cfg["torch_dtype"] == "float32" and cfg["hidden_size"] == 16


def test_bfloat16_output_rounds_like_torch(tmp_path):
    """f32 checkpoint -> --dtype bfloat16 must equal torch's `.to(torch.bfloat16)` bit for bit
    (expected_bf16 was made that way from the same f32 weights): round to nearest even."""
    out = convert(os.path.join(DATA, "model_f32.ckpt"), tmp_path, config_file=CONFIG, dtype="bfloat16")
    got, _ = read_safetensors(os.path.join(out, "model.safetensors"))
    want = expected("expected_bf16.safetensors")
    for k in want:
        assert got[k].dtype == ml_dtypes.bfloat16, k
        np.testing.assert_array_equal(got[k].view(np.uint16), want[k].view(np.uint16), err_msg=k)
    assert load_json(os.path.join(out, "config.json"))["torch_dtype"] == "bfloat16"


def test_converted_model_runs_and_matches(tmp_path):
    out = convert(os.path.join(DATA, "model_f32.ckpt"), tmp_path, config_file=CONFIG)
    model = Gemma2ForCausalLM.from_pretrained(out)
    cfg = Gemma2Config.from_json_file(CONFIG)
    ref = Gemma2ForCausalLM(cfg, expected("expected_f32.safetensors"))
    a, b = model(input_ids=IDS).logits, ref(input_ids=IDS).logits
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_reader_details():
    sd = load_original_checkpoint(os.path.join(DATA, "model_f32.ckpt"))
    # the complex RoPE buffer is read correctly (then dropped by the converter): e^{i t f_j}
    fc = sd["freqs_cis"]
    assert fc.dtype == np.complex64 and fc.shape == (32, 4)
    f = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(fc, np.exp(1j * np.outer(np.arange(32), f)), atol=2e-5)
    # qkv is fused: (4 + 2 * 2) heads * 8 rows
    assert sd["model.layers.0.self_attn.qkv_proj.weight"].shape == (64, 16)
    # the sharded folder's strided o_proj and offset views equal the contiguous bf16 file
    a = load_original_checkpoint(os.path.join(DATA, "sharded"))
    b = load_original_checkpoint(os.path.join(DATA, "model_bf16.ckpt"))
    assert sorted(a) == sorted(b)
    for k in b:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# ----------------------------------------------------------------------------- malicious pickles
class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _torch_like_zip(path, payload_obj, protocol=2):
    """A zip laid out exactly like torch.save's: <name>/data.pkl, <name>/version, <name>/byteorder."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(payload_obj, protocol=protocol))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def _evil_payloads(marker):
    import subprocess

    cmd = f"touch {marker}"
    return {
        "os.system": _Evil(os.system, cmd),
        "subprocess": _Evil(subprocess.check_call, ["touch", str(marker)]),
        "eval": _Evil(eval, f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("kind", ["os.system", "subprocess", "eval"])
def test_malicious_checkpoint_is_refused_and_never_runs(kind, tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_payloads(marker)[kind]
    # hidden inside an otherwise plausible checkpoint, next to a real-looking tensor name
    path = tmp_path / "model.ckpt"
    _torch_like_zip(path, {"model_state_dict": {"embedder.weight": evil}})
    names = {"os.system": r"(posix|os|nt)\.system", "subprocess": r"subprocess\.check_call", "eval": r"builtins\.eval"}
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle global " + names[kind]):
        load_original_checkpoint(path)
    assert not marker.exists()
    # the command line reports it and exits 2, still without running it
    rc = main(["--input-checkpoint", str(path), "--config", CONFIG, "--output-dir", str(tmp_path / "out")])
    assert rc == 2
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # the same payload as a bare (legacy-format) pickle stream
    raw = tmp_path / "legacy.ckpt"
    raw.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        load_torch_file(raw)
    assert not marker.exists()


def test_sanity_the_payload_would_run(tmp_path):
    """Guard against a vacuous test above: the same bytes, given to plain pickle, do create the marker."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_evil_payloads(marker)["os.system"], protocol=2))
    assert marker.exists()


def test_other_globals_refused(tmp_path):
    path = tmp_path / "x.ckpt"
    _torch_like_zip(path, {"model_state_dict": {"a": np.zeros(3)}})  # numpy's own reduce: not a torch tensor
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        load_torch_file(path)


# ----------------------------------------------------------------------------- malformed input
def test_truncated_zip(tmp_path):
    with open(os.path.join(DATA, "model_f32.ckpt"), "rb") as f:
        raw = f.read()
    for cut in (len(raw) - 10, len(raw) - 300, len(raw) // 2, 100, 2):
        p = tmp_path / "cut.ckpt"
        p.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="cut.ckpt") as info:
            load_original_checkpoint(p)
        assert not isinstance(info.value, UnsafeCheckpointError)


def test_truncated_legacy(tmp_path):
    with open(os.path.join(DATA, "model_bf16_legacy.ckpt"), "rb") as f:
        raw = f.read()
    for cut in (len(raw) - 10, len(raw) // 2, 30):
        p = tmp_path / "cut.ckpt"
        p.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="cut.ckpt"):
            load_original_checkpoint(p)


def test_missing_storage_member(tmp_path):
    p = tmp_path / "hole.ckpt"
    with zipfile.ZipFile(os.path.join(DATA, "model_f32.ckpt")) as src, zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            if not info.filename.endswith("/data/3"):
                z.writestr(info.filename, src.read(info))
    with pytest.raises(CheckpointError, match=r"storage .*data/3 is missing"):
        load_original_checkpoint(p)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.ckpt"
    p.write_bytes(b"hello world")
    with pytest.raises(CheckpointError, match="neither a torch zip"):
        load_original_checkpoint(p)
    with pytest.raises(CheckpointError, match="not found"):
        load_original_checkpoint(tmp_path / "nope.ckpt")


def test_wrong_model_size(tmp_path):
    with pytest.raises(CheckpointError, match=r"hidden size 16 and 2 layers") as info:
        convert(os.path.join(DATA, "model_f32.ckpt"), tmp_path / "o", model_size="2B")
    assert "2304" in str(info.value)  # names what the config expected
    assert not (tmp_path / "o").exists()  # nothing written
    with pytest.raises(ConvertError, match="unknown model size '7B'"):
        convert(os.path.join(DATA, "model_f32.ckpt"), tmp_path / "o", model_size="7B")
    with pytest.raises(ConvertError, match="exactly one"):
        convert(os.path.join(DATA, "model_f32.ckpt"), tmp_path / "o")
    # a config whose heads disagree with the fused qkv rows
    cfg = load_json(CONFIG)
    cfg["num_key_value_heads"] = 4
    (tmp_path / "bad.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"qkv_proj.weight has shape \(64, 16\).*implies \(96, 16\)"):
        convert(os.path.join(DATA, "model_f32.ckpt"), tmp_path / "o", config_file=tmp_path / "bad.json")


def test_cli_exit_codes(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="gemma2np")
    add_convert_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "--input-checkpoint", os.path.join(DATA, "model_bf16.ckpt"),
                              "--config", CONFIG, "--output-dir", str(tmp_path / "out"),
                              "--dtype", "bfloat16", "--tokenizer", TOKENIZER])
    assert args.func is run_convert
    assert run_convert(args) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        assert (tmp_path / "out" / f).exists(), f
    assert Gemma2ForCausalLM.from_pretrained(tmp_path / "out")(input_ids=IDS).logits.shape == (1, 9, 32)
    capsys.readouterr()
    rc = main(["--input-checkpoint", os.path.join(DATA, "model_bf16.ckpt"), "--model-size", "9b",
               "--output-dir", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("gemma2np convert: error: ") and err.count("\n") == 1, err
    rc = main(["--input-checkpoint", str(tmp_path / "missing.ckpt"), "--model-size", "2B",
               "--output-dir", str(tmp_path / "o3")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_tokenizer_is_usable(tmp_path):
    pytest.importorskip("sentencepiece")
    from gemma2np import GemmaTokenizer

    convert(os.path.join(DATA, "model_bf16.ckpt"), tmp_path, config_file=CONFIG, tokenizer=TOKENIZER)
    tok = GemmaTokenizer.from_pretrained(tmp_path)
    ids = tok("hello world")["input_ids"]
    assert ids[0] == 2  # <bos> added, as the published tokenizer_config says


def test_published_configs():
    counts = {"2B": 2_614_341_888, "9B": 9_241_705_984, "27B": 27_227_128_320}
    scalars = {"2B": 256, "9B": 256, "27B": 144}
    for size, n in counts.items():
        cfg = Gemma2Config.from_dict(published_config(size))
        assert cfg.num_parameters() == n, size
        assert cfg.query_pre_attn_scalar == scalars[size], size


# ----------------------------------------------------------------------------- against transformers
@pytest.mark.torch
def test_transformers_loads_converted(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = convert(os.path.join(DATA, "model_f32.ckpt"), tmp_path, config_file=CONFIG)
    hf = transformers.Gemma2ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(torch.from_numpy(IDS)).logits.numpy()
    got = Gemma2ForCausalLM.from_pretrained(out)(input_ids=IDS).logits
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
