"""Hostile inputs to the loaders (issue #13): every case gets a typed gemma2np error naming the problem,
and nothing outside the model directory is ever opened.

Layers: sharded index / file checks (safeio + checkpoint), the safetensors header (differential against
the `safetensors` library), config.json, GGUF metadata, original torch checkpoints, the tokenizer, the CLI.
"""

import builtins
import io
import json
import os
import signal
import struct
import zipfile

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gemma2np import CheckpointError, Gemma2ForCausalLM
from gemma2np.checkpoint import bfloat16, load_state_dict, read_safetensors, write_safetensors

from conftest import tiny_config

IDS = np.array([[2, 5, 9, 11]])


def _save(tmp_path, **kw):
    m = Gemma2ForCausalLM.from_config(tiny_config(), seed=0)
    m.save_pretrained(tmp_path, **kw)
    return m


# ============================================================================ opens outside the model dir


class _OpenRecorder:
    """Records every path opened through open / io.open / os.open / np.memmap while active."""

    def __init__(self, monkeypatch):
        self.paths = []
        real_open, real_os_open, real_memmap = builtins.open, os.open, np.memmap.__new__

        def rec(p):
            if isinstance(p, (str, bytes, os.PathLike)):
                self.paths.append(os.path.realpath(os.fsdecode(p)))

        def my_open(file, *a, **k):
            rec(file)
            return real_open(file, *a, **k)

        def my_os_open(path, *a, **k):
            rec(path)
            return real_os_open(path, *a, **k)

        def my_memmap(cls, filename, *a, **k):
            rec(getattr(filename, "name", filename))
            return real_memmap(cls, filename, *a, **k)

        monkeypatch.setattr(builtins, "open", my_open)
        monkeypatch.setattr(io, "open", my_open)
        monkeypatch.setattr(os, "open", my_os_open)
        monkeypatch.setattr(np.memmap, "__new__", my_memmap)

    def outside(self, root):
        root = os.path.realpath(root)
        return [p for p in self.paths if not (p == root or p.startswith(root + os.sep))]


@pytest.fixture
def sharded(tmp_path):
    d = tmp_path / "model"
    _save(d, max_shard_size=20_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return d, index


def _set_shard(d, index, value):
    wm = dict(index["weight_map"])
    wm[next(iter(wm))] = value
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


@pytest.mark.parametrize("value", ["../../etc/hostname", "/etc/hostname", "/dev/urandom", "../outside.safetensors",
                                   "sub/model.safetensors", "..", ".", "", "a\x00b"])
def test_index_names_outside_the_directory_are_refused_before_opening(sharded, monkeypatch, value):
    d, index = sharded
    (d.parent / "outside.safetensors").write_bytes((d / sorted(set(index["weight_map"].values()))[0]).read_bytes())
    (d / "sub").mkdir()
    _set_shard(d, index, value)
    rec = _OpenRecorder(monkeypatch)
    with pytest.raises(CheckpointError, match="not a plain file name"):
        Gemma2ForCausalLM.from_pretrained(d)
    assert rec.outside(d) == []
    # and no shard at all was opened: the names are checked before any file is
    assert not [p for p in rec.paths if p.endswith(".safetensors")]


@pytest.mark.parametrize("target, message", [
    ("../outside.safetensors", "outside the model directory"),
    ("/dev/urandom", "outside the model directory"),
])
def test_symlinks_out_of_the_directory_are_refused(sharded, monkeypatch, target, message):
    d, index = sharded
    outside = d.parent / "outside.safetensors"
    outside.write_bytes(b"x")
    os.symlink(target if target.startswith("/") else str(outside), d / "link.safetensors")
    _set_shard(d, index, "link.safetensors")
    rec = _OpenRecorder(monkeypatch)
    with pytest.raises(CheckpointError, match=message):
        Gemma2ForCausalLM.from_pretrained(d)
    assert rec.outside(d) == []


def test_non_regular_files_inside_are_refused_without_blocking(sharded, monkeypatch):
    d, index = sharded
    os.mkfifo(d / "fifo.safetensors")  # opening a FIFO for reading would block forever
    (d / "adir.safetensors").mkdir()
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("the loader blocked on a FIFO"))
    signal.alarm(20)
    try:
        for name, what in (("fifo.safetensors", "a FIFO"), ("adir.safetensors", "a directory")):
            _set_shard(d, index, name)
            rec = _OpenRecorder(monkeypatch)
            with pytest.raises(CheckpointError, match=what):
                Gemma2ForCausalLM.from_pretrained(d)
            assert not [p for p in rec.paths if p.endswith(name)]
        # the single-file layout too: model.safetensors as a FIFO
        os.remove(d / "model.safetensors.index.json")
        os.mkfifo(d / "model.safetensors")
        with pytest.raises(CheckpointError, match="a FIFO"):
            load_state_dict(d)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_hub_cache_symlinks_to_blobs_are_followed(tmp_path):
    """transformers' cache: <repo>/snapshots/<rev>/model.safetensors -> ../../blobs/<sha>: a real layout."""
    src = tmp_path / "src"
    m = _save(src)
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in os.listdir(src):
        blob = repo / "blobs" / ("sha-" + name)
        blob.write_bytes((src / name).read_bytes())
        os.symlink(os.path.join("..", "..", "blobs", "sha-" + name), snap / name)
    again = Gemma2ForCausalLM.from_pretrained(snap)
    np.testing.assert_array_equal(again(input_ids=IDS).logits, m(input_ids=IDS).logits)
    # ... but not to another repository's blobs
    other = tmp_path / "models--evil" / "blobs"
    other.mkdir(parents=True)
    (other / "w").write_bytes((src / "model.safetensors").read_bytes())
    os.remove(snap / "model.safetensors")
    os.symlink(str(other / "w"), snap / "model.safetensors")
    with pytest.raises(CheckpointError, match="outside the model directory"):
        load_state_dict(snap)


@pytest.mark.parametrize("content, message", [
    (json.dumps({"weight_map": ["model.safetensors"]}), "weight_map must be an object"),
    (json.dumps({"weight_map": {"model.norm.weight": None}}), "not a shard file name"),
    (json.dumps({"weight_map": {"model.norm.weight": {"file": "x"}}}), "not a shard file name"),
    (json.dumps({"weight_map": {"model.norm.weight": 3}}), "not a shard file name"),
    (json.dumps({"weight_map": {"model.norm.weight": "."}}), "not a plain file name"),
    (json.dumps(["weight_map"]), "weight_map must be an object"),
    (json.dumps({"metadata": {}}), "weight_map must be an object"),
    (b'{"weight_map": {"a": "\xff\xfe.safetensors"}}', "not valid UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ('{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}', "too long"),
    ('{"weight_map": {"a": NaN}}', "not a shard file name"),
    ("{", "not valid JSON"),
])
def test_malformed_index_structure(sharded, content, message):
    d, _ = sharded
    p = d / "model.safetensors.index.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(d)


def test_index_that_is_a_directory_or_fifo(sharded):
    d, _ = sharded
    os.remove(d / "model.safetensors.index.json")
    (d / "model.safetensors.index.json").mkdir()
    with pytest.raises(CheckpointError, match="a directory"):
        load_state_dict(d)


# ============================================================================ safetensors header == the library


def _file(header, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _theirs(path):
    """The library's verdict: {name: (dtype tag, shape, bytes)} or None if it refuses."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            out = {}
            for k in f.keys():
                a = f.get_tensor(k)
                out[k] = (a.dtype, tuple(a.shape), np.ascontiguousarray(a).tobytes())
            return out
    except safetensors.SafetensorError:
        return None


def _ours(path):
    try:
        tensors, _ = read_safetensors(path)
    except CheckpointError:
        return None
    return {k: (a.dtype, tuple(a.shape), np.ascontiguousarray(a).tobytes()) for k, a in tensors.items()}


def _same_verdict(path, raw: bytes):
    path.write_bytes(raw)
    theirs, ours = _theirs(path), _ours(path)
    assert (theirs is None) == (ours is None), (
        f"library {'refuses' if theirs is None else 'accepts'}, we {'refuse' if ours is None else 'accept'}: {raw[:300]!r}")
    if theirs is not None:
        assert ours == theirs
    return ours


@pytest.mark.parametrize("name, header, data", [
    ("10 bytes inserted into the data", {"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, bytes(34)),
    ("offsets shifted by 2", {"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [2, 26]}}, bytes(26)),
    ("gap", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
             "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12)),
    ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
    ("truncated", {"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, bytes(20)),
    ("bool dim", b'{"x":{"dtype":"F32","shape":[2,true],"data_offsets":[0,8]}}', bytes(8)),
    ("float dim", b'{"x":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', bytes(8)),
    ("dim past u64", b'{"x":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,8]}}', bytes(8)),
    ("product overflow with a 0", b'{"x":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', b""),
    ("deep nesting", b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":' + b"[" * 126 + b"]" * 126 + b"}}",
     bytes(4)),
    ("very deep nesting", b'{"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}", b""),
    ("huge int literal", b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":' + b"9" * 5000 + b"}}", bytes(4)),
    ("NaN literal", b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":NaN}}', bytes(4)),
    ("lone surrogate", b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":"\\ud800"}}', bytes(4)),
    ("repeated field", b'{"x":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    ("two __metadata__", b'{"__metadata__":{},"__metadata__":{},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
     bytes(4)),
    ("metadata not strings", b'{"__metadata__":{"a":1},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    ("non-UTF-8 header", b'{"x\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    ("not an object", b"[]", b""),
    ("empty with data", b"{}", b"abcd"),
])
def test_library_refusals_are_ours_too(tmp_path, name, header, data):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_file(header, data))
    assert _theirs(path) is None
    with pytest.raises(CheckpointError):
        read_safetensors(path)


@pytest.mark.parametrize("name, header, data", [
    ("unknown field", b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":{"q":[1,2]}}}', bytes(4)),
    ("empty tensors at 0", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[0],'
                           b'"data_offsets":[0,0]}}', bytes(4)),
    ("scalar", b'{"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', bytes(4)),
    ("name repeated: last wins", b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},'
                                 b'"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    ("depth 127", b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":' + b"[" * 125 + b"]" * 125 + b"}}",
     bytes(4)),
    ("big ints elsewhere", b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":' + b"9" * 300 + b"}}", bytes(4)),
    ("leading whitespace and padding", b'  {"x":{"dtype":"U16","shape":[2],"data_offsets":[0,4]}}   ', bytes(4)),
    ("metadata null", b'{"__metadata__":null,"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}', bytes(4)),
    ("empty", b"{}", b""),
])
def test_library_acceptances_are_ours_too(tmp_path, name, header, data):
    assert _same_verdict(tmp_path / "m.safetensors", _file(header, data)) is not None


_DT = {"F32": np.float32, "F16": np.float16, "BF16": bfloat16, "I64": np.int64, "U8": np.uint8, "F64": np.float64,
       "I32": np.int32, "BOOL": np.bool_}


@st.composite
def _valid_file(draw):
    n = draw(st.integers(0, 4))
    tensors = {}
    for i in range(n):
        tag = draw(st.sampled_from(sorted(_DT)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        data = draw(st.binary(min_size=int(np.prod(shape)) * np.dtype(_DT[tag]).itemsize,
                              max_size=int(np.prod(shape)) * np.dtype(_DT[tag]).itemsize))
        tensors[f"t{i}"] = np.frombuffer(data, dtype=np.uint8).view(_DT[tag]).reshape(shape) if data else \
            np.zeros(shape, _DT[tag])
    return safetensors.numpy.save(tensors, metadata=draw(st.sampled_from([None, {"format": "pt"}])))


def _header_span(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    return 8, 8 + n


@st.composite
def _mutated(draw):
    raw = bytearray(draw(_valid_file()))
    kind = draw(st.sampled_from(["insert", "delete", "truncate", "flip", "offsets", "header_len", "json_edit",
                                 "append"]))
    if kind == "insert":
        pos = draw(st.integers(0, len(raw)))
        raw[pos:pos] = draw(st.binary(min_size=1, max_size=12))
    elif kind == "delete" and len(raw) > 8:
        a = draw(st.integers(0, len(raw) - 1))
        del raw[a:a + draw(st.integers(1, 8))]
    elif kind == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif kind == "flip":
        pos = draw(st.integers(0, len(raw) - 1))
        raw[pos] = draw(st.integers(0, 255))
    elif kind == "append":
        raw += draw(st.binary(min_size=1, max_size=12))
    elif kind == "header_len":
        (n,) = struct.unpack("<Q", raw[:8])
        raw[:8] = struct.pack("<Q", max(0, n + draw(st.integers(-9, 9))))
    else:  # rewrite the JSON header: shift offsets, change a dtype / shape, add a key, drop a field
        a, b = _header_span(raw)
        header = json.loads(bytes(raw[a:b]))
        names = [k for k in header if k != "__metadata__"]
        if names:
            name = draw(st.sampled_from(names))
            field = draw(st.sampled_from(["data_offsets", "dtype", "shape", "extra", "drop"] if kind == "json_edit"
                                         else ["data_offsets"]))
            info = header[name]
            if field == "data_offsets":
                i = draw(st.integers(0, 1))
                info["data_offsets"][i] = max(0, info["data_offsets"][i] + draw(st.integers(-4, 4)))
            elif field == "dtype":
                info["dtype"] = draw(st.sampled_from(sorted(_DT) + ["U16", "F8_E4M3", "F99", "f32"]))
            elif field == "shape":
                info["shape"] = draw(st.lists(st.integers(0, 5), max_size=3))
            elif field == "extra":
                info[draw(st.sampled_from(["x", "dtype_", "__metadata__"]))] = draw(
                    st.sampled_from([1, "s", [1, [2]], None, 1.5]))
            else:
                del info[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        text = json.dumps(header).encode()
        text += b" " * draw(st.integers(0, 7))
        raw = bytearray(struct.pack("<Q", len(text)) + text + bytes(raw[b:]))
    return bytes(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(raw=st.one_of(_valid_file(), _mutated()))
def test_differential_against_the_safetensors_library(tmp_path, raw):
    """Our memory-mapped reader and safetensors.safe_open agree on every file: both accept (same tensors,
    bit for bit) or both refuse. F8/F4 dtypes (known to the library, no NumPy type) are the one exception,
    refused by us on purpose; the generator never writes them except as a header edit, checked below."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw)
    ours = _ours(path)
    theirs = _theirs_or_unsupported(path)
    event("unsupported dtype" if theirs == "unsupported" else "refused" if theirs is None else "accepted")
    if theirs == "unsupported":
        assert ours is None
        return
    assert (theirs is None) == (ours is None), raw[:400]
    if ours is not None:
        assert ours == theirs


def _theirs_or_unsupported(path):
    try:
        return _theirs(path)
    except (AttributeError, TypeError):  # the numpy framework has no float8 type: the library is the one failing
        with open(path, "rb") as f:
            raw = f.read()
        safetensors.deserialize(raw)  # header valid for the library
        return "unsupported"


def test_unsupported_library_dtypes_are_named(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_file({"x": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)))
    safetensors.deserialize(path.read_bytes())  # valid for the library
    with pytest.raises(CheckpointError, match="unsupported dtype F8_E4M3"):
        read_safetensors(path)


# ============================================================================ writing with the library


def test_writer_is_the_library(tmp_path, monkeypatch):
    calls = []
    real = safetensors.numpy.save_file

    def spy(tensors, filename, metadata=None):
        calls.append(metadata)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", spy)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(tmp_path / "w.safetensors", {"a": a, "b": a[:, ::2]}, dtype=bfloat16)
    assert calls == [{"format": "pt"}]
    with safetensors.safe_open(str(tmp_path / "w.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert got["a"].dtype == bfloat16 and got["b"].shape == (3, 2)
    np.testing.assert_array_equal(got["b"].astype(np.float32), a[:, ::2])  # small ints: exact in bf16
    ours, _ = read_safetensors(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(ours["a"], got["a"])
    assert not os.path.exists(tmp_path / "w.safetensors.tmp")


# ============================================================================ config.json

from gemma2np import ConfigError, Gemma2Config  # noqa: E402


def _config_file(tmp_path, text):
    p = tmp_path / "config.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _base():
    return tiny_config().to_dict()


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ('{"a":' * 150 + "1" + "}" * 150, "nested more than 100"),
    ('{"vocab_size": ' + "9" * 5000 + "}", "too long"),
    (b'{"model_type": "gemma2", "x": "\xff\xfe"}', "not valid UTF-8"),
    ("{", "not valid JSON"),
])
def test_config_json_syntax(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        Gemma2Config.from_json_file(_config_file(tmp_path, text))


def test_config_json_that_is_a_fifo_or_directory(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked on a FIFO config.json"))
    signal.alarm(20)
    try:
        with pytest.raises(ConfigError, match="a FIFO"):
            Gemma2Config.from_pretrained(tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    os.remove(tmp_path / "config.json")
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match="a directory"):
        Gemma2Config.from_pretrained(tmp_path)


@pytest.mark.parametrize("update, message", [
    ({"id2label": {"1e9": "a"}}, "not an integer"),
    ({"id2label": {"x": "a"}}, "not an integer"),
    ({"id2label": {"0": 5}}, "not a label string"),
    ({"id2label": {"0": ["a"]}}, "not a label string"),
    ({"id2label": "abc"}, "id2label must be an object"),
    ({"label2id": ["a"]}, "label2id must be an object"),
    ({"num_labels": 10**10, "id2label": None}, "num_labels must be an integer in"),
    ({"num_hidden_layers": 10**9, "layer_types": None}, "num_hidden_layers = 1000000000 is beyond"),
    ({"vocab_size": 10**12}, "vocab_size = 1000000000000 is beyond"),
    ({"hidden_size": 10**9, "num_attention_heads": 1, "num_key_value_heads": 1}, "hidden_size = 1000000000 is beyond"),
    ({"head_dim": 10**9}, "head_dim = 1000000000 is beyond"),
    ({"layer_types": 7}, "layer_types must be a list"),
    ({"layer_types": [1, [2], {}]}, "entries must be one of"),
    ({"num_key_value_groups": 3}, "cannot be set"),
    ({"head_dim": 1}, "head_dim must be even"),  # found by tests/test_fuzz.py: passed, then failed in forward
    ({"head_dim": 3}, "head_dim must be even"),
    ({"__class__": 3}, "cannot be set"),
])
def test_config_contents(update, message):
    d = _base()
    d.update(update)
    with pytest.raises(ConfigError, match=message):
        Gemma2Config.from_dict(d)


def test_config_sizes_fail_fast():
    import time

    t = time.perf_counter()
    for update in ({"num_labels": 10**10, "id2label": None}, {"num_hidden_layers": 10**9, "layer_types": None}):
        with pytest.raises(ConfigError):
            Gemma2Config.from_dict(dict(_base(), **update))
    assert time.perf_counter() - t < 5  # was 15 s to a MemoryError, and a hang


# one valid rope_parameters per type (checked to load), and the number fields each reads
_ROPE_OK = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "attention_factor": 1.0,
             "beta_fast": 32.0, "beta_slow": 1.0},
    "yarn_mscale": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "mscale": 1.0,
                    "mscale_all_dim": 0.5},
    "longrope": {"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": 32,
                 "short_factor": [1.0] * 6, "long_factor": [2.0] * 6, "attention_factor": 1.0},
    "llama3": {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 32, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0},
    "proportional": {"rope_type": "proportional", "partial_rotary_factor": 0.5},
    "default": {"rope_type": "default"},
}
_POSITIVE = {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "rope_theta",
             "partial_rotary_factor"}


def _rope_cases():
    for kind, params in _ROPE_OK.items():
        for key in sorted(set(params) - {"rope_type"} | {"rope_theta"}):
            values = [float("nan"), float("inf"), -float("inf"), -1.0] + ([0.0] if key in _POSITIVE else [])
            if key in ("short_factor", "long_factor"):
                values = [[v] * 6 for v in (float("nan"), float("inf"), 0.0, -1.0)]
            for v in values:
                yield pytest.param(kind, key, v, id=f"{kind}-{key}-{v if not isinstance(v, list) else v[0]}")


@pytest.mark.parametrize("kind", sorted(_ROPE_OK))
def test_rope_base_cases_are_valid(kind):
    cfg = tiny_config(rope_parameters=dict(_ROPE_OK[kind], rope_theta=10000.0))
    assert cfg.rope_parameters["rope_type"] == _ROPE_OK[kind]["rope_type"]


@pytest.mark.parametrize("kind, key, value", list(_rope_cases()))
def test_rope_numbers_that_would_give_nan(kind, key, value):
    params = dict(_ROPE_OK[kind], rope_theta=10000.0)
    params[key] = value
    with pytest.raises(ConfigError, match=key if key != "rope_theta" else "rope_theta"):
        with _no_warnings_check():
            tiny_config(rope_parameters=params)


class _no_warnings_check:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *a):
        self._w.__exit__(*a)


def test_rope_scaling_linear_factor_zero_from_config_json(tmp_path):
    """The issue's case: {"rope_type":"linear","factor":0} passed and gave NaN logits."""
    d = _base()
    d.pop("rope_parameters")
    d["rope_scaling"] = {"rope_type": "linear", "factor": 0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="factor must be > 0"):
        Gemma2Config.from_pretrained(tmp_path)
    d["rope_scaling"]["factor"] = 0.5  # a factor < 1 compresses: transformers warns, the numbers are finite
    (tmp_path / "config.json").write_text(json.dumps(d))
    with _no_warnings_check():
        assert Gemma2Config.from_pretrained(tmp_path).rope_parameters["factor"] == 0.5


def test_rope_arithmetic_failures_are_config_errors():
    # head_dim 2 with dynamic: HF's exponent dim / (dim - 2) divides by zero past the context
    with pytest.raises(ConfigError, match="rope"):
        with _no_warnings_check():
            tiny_config(head_dim=2, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    # yarn with rope_theta 1: log(base) = 0 in the correction range
    with pytest.raises(ConfigError, match="rope"):
        with _no_warnings_check():
            tiny_config(rope_parameters=dict(_ROPE_OK["yarn"], rope_theta=1.0))


# ============================================================================ GGUF metadata

gguf = pytest.importorskip("gguf")


def _write_gguf_meta(path, cfg, state, overrides: dict):
    """A Gemma 2 GGUF (as tests/test_gguf.py writes it) whose metadata keys can be replaced by any typed value:
    overrides maps key -> (kind, value), kind one of string/uint32/float32/int32/bool/array, or None to drop."""
    from test_gguf import gguf_name

    meta = {
        "gemma2.context_length": ("uint32", cfg.max_position_embeddings),
        "gemma2.embedding_length": ("uint32", cfg.hidden_size),
        "gemma2.block_count": ("uint32", cfg.num_hidden_layers),
        "gemma2.feed_forward_length": ("uint32", cfg.intermediate_size),
        "gemma2.attention.head_count": ("uint32", cfg.num_attention_heads),
        "gemma2.attention.head_count_kv": ("uint32", cfg.num_key_value_heads),
        "gemma2.attention.key_length": ("uint32", cfg.head_dim),
        "gemma2.attention.value_length": ("uint32", cfg.head_dim),
        "gemma2.attention.layer_norm_rms_epsilon": ("float32", cfg.rms_norm_eps),
        "gemma2.attention.sliding_window": ("uint32", cfg.sliding_window),
        "gemma2.rope.freq_base": ("float32", cfg.rope_theta),
        "tokenizer.ggml.bos_token_id": ("uint32", 2),
    }
    meta.update(overrides)
    w = gguf.GGUFWriter(os.fspath(path), "gemma2")
    for key, spec in meta.items():
        if spec is None:
            continue
        kind, value = spec
        {"string": w.add_string, "uint32": w.add_uint32, "float32": w.add_float32, "int32": w.add_int32,
         "bool": w.add_bool, "array": w.add_array}[kind](key, value)
    for hf, value in state.items():
        value = np.asarray(value, dtype=np.float32)
        w.add_tensor(gguf_name(hf), value + np.float32(1.0) if hf.endswith("norm.weight") else value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_model():
    from test_gguf import make_model

    return make_model()


@pytest.mark.parametrize("overrides, error, message", [
    ({}, None, None),  # the unmodified file loads: the cases below fail for the reason given, not another
    ({"gemma2.attention.head_count": ("string", "4")}, CheckpointError, "head_count should be an integer"),
    ({"gemma2.attention.head_count": ("array", [4, 4, 4])}, CheckpointError, "head_count should be an integer"),
    ({"gemma2.attention.head_count": ("bool", True)}, CheckpointError, "head_count should be an integer"),
    ({"gemma2.attention.head_count": ("uint32", 0)}, CheckpointError, "head_count must be positive"),
    ({"gemma2.attention.head_count": None}, CheckpointError, "lacks gemma2.attention.head_count"),
    ({"gemma2.embedding_length": ("float32", 64.0)}, CheckpointError, "embedding_length should be an integer"),
    ({"gemma2.block_count": ("string", "x")}, CheckpointError, "block_count should be an integer"),
    ({"gemma2.rope.freq_base": ("string", "1e4")}, CheckpointError, "freq_base should be a finite number"),
    ({"gemma2.rope.freq_base": ("float32", float("nan"))}, CheckpointError, "freq_base should be a finite number"),
    ({"gemma2.attention.layer_norm_rms_epsilon": ("float32", float("inf"))}, CheckpointError, "finite"),
    ({"gemma2.attention.sliding_window": ("string", "4")}, CheckpointError, "sliding_window should be an integer"),
    ({"gemma2.context_length": ("array", [1])}, CheckpointError, "context_length should be an integer"),
    ({"gemma2.rope.scaling.type": ("uint32", 1)}, CheckpointError, "scaling.type should be a string"),
    ({"gemma2.rope.scaling.type": ("string", "yarn")}, CheckpointError, "unsupported rope scaling"),
    ({"gemma2.rope.scaling.type": ("string", "linear"), "gemma2.rope.scaling.factor": ("float32", 0.0)},
     ConfigError, "factor must be > 0"),
    ({"gemma2.rope.scaling.type": ("string", "linear"), "gemma2.rope.scaling.factor": ("float32", -2.0)},
     ConfigError, "factor must be > 0"),
    ({"gemma2.rope.scaling.type": ("string", "linear"), "gemma2.rope.scaling.factor": ("string", "2")},
     CheckpointError, "scaling.factor should be a finite number"),
    ({"tokenizer.ggml.bos_token_id": ("string", "2")}, CheckpointError, "bos_token_id should be an integer"),
    ({"general.name": ("uint32", 3)}, CheckpointError, "general.name should be a string"),
    ({"gemma2.attn_logit_softcapping": ("string", "50")}, CheckpointError, "softcapping should be a finite number"),
])
def test_gguf_metadata_of_the_wrong_type(tmp_path, gguf_model, overrides, error, message):
    cfg, state = gguf_model
    path = tmp_path / "m.gguf"
    _write_gguf_meta(path, cfg, state, overrides)
    if error is None:
        Gemma2ForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
        return
    with pytest.raises(error, match=message):
        Gemma2ForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")


def test_gguf_fifo_is_refused_without_blocking(tmp_path):
    from gemma2np.gguf_io import load_gguf

    os.mkfifo(tmp_path / "m.gguf")
    with pytest.raises(CheckpointError, match="a FIFO"):
        load_gguf(tmp_path / "m.gguf")


# ============================================================================ original checkpoints

from gemma2np.original import _read_member, load_original_checkpoint, load_torch_file  # noqa: E402

ORIG = os.path.join(os.path.dirname(__file__), "data", "original")


def _rezip(src, dst, replace=None, compress=zipfile.ZIP_STORED, extra=None):
    """Copy a torch.save zip member by member; replace: {suffix: bytes}; extra: {name: bytes} added."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new(data) if callable(new) else new
            zout.writestr(info.filename, data, compress_type=compress)
        for name, data in (extra or {}).items():
            zout.writestr(name, data, compress_type=compress)


def test_zip_bomb_member_is_refused_before_inflating(tmp_path, monkeypatch):
    """A DEFLATED member declaring 64 MB (64 KB on disk) for a 512-float storage: refused from the sizes alone."""
    p = tmp_path / "bomb.ckpt"
    _rezip(os.path.join(ORIG, "model_f32.ckpt"), p, replace={"/data/0": lambda d: d + bytes(64 << 20)},
           compress=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(p) < 1 << 20
    inflated = []
    real_read = zipfile.ZipExtFile.read
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: inflated.append(n) or real_read(self, n))
    with pytest.raises(CheckpointError, match=r"data/0 declares 67110912 bytes, 512 x float32 needs 2048"):
        load_original_checkpoint(p)
    assert all(0 <= n <= 1 << 20 for n in inflated)  # only small records were read, never the bomb


def test_declared_size_beyond_what_deflate_can_produce(tmp_path):
    p = tmp_path / "x.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a", bytes(4096))
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("a")
        info.file_size = 10**9  # a forged central directory: 1 GB from a few bytes
        with pytest.raises(CheckpointError, match="more than DEFLATE can produce"):
            _read_member(z, info, 10**9, str(p))


def test_deflated_checkpoint_reads_in_bounded_pieces(tmp_path, monkeypatch):
    import gemma2np.original as original

    p = tmp_path / "deflated.ckpt"
    _rezip(os.path.join(ORIG, "model_f32.ckpt"), p, compress=zipfile.ZIP_DEFLATED)
    monkeypatch.setattr(original, "_CHUNK", 100)  # several pieces per storage
    got = load_original_checkpoint(p)
    want = load_original_checkpoint(os.path.join(ORIG, "model_f32.ckpt"))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_other_zip_compression_is_refused(tmp_path):
    p = tmp_path / "bz.ckpt"
    _rezip(os.path.join(ORIG, "model_f32.ckpt"), p, compress=zipfile.ZIP_BZIP2)
    with pytest.raises(CheckpointError, match="compression method 12"):
        load_original_checkpoint(p)


@pytest.mark.parametrize("name", ["model_f32.ckpt", "model_bf16.ckpt"])
def test_truncated_or_damaged_zip_is_a_checkpoint_error(tmp_path, name):
    raw = open(os.path.join(ORIG, name), "rb").read()
    p = tmp_path / "cut.ckpt"
    for cut in range(2, len(raw), 211):
        p.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError):
            load_original_checkpoint(p)
    deflated = tmp_path / "d.ckpt"
    _rezip(os.path.join(ORIG, name), deflated, compress=zipfile.ZIP_DEFLATED)
    raw = deflated.read_bytes()
    rng = np.random.default_rng(0)
    for _ in range(60):  # damaged bytes anywhere: a typed error or (if the damage hit nothing) a result
        b = bytearray(raw)
        for i in rng.integers(0, len(b), 3):
            b[i] ^= 0xFF
        p.write_bytes(bytes(b))
        try:
            load_original_checkpoint(p)
        except CheckpointError:
            pass


def test_corrupt_legacy_pickle_overflow(tmp_path):
    p = tmp_path / "legacy.ckpt"
    p.write_bytes(b"\x80\x04\x8e" + b"\xff" * 8 + b"x")  # BINBYTES8 longer than any size: OverflowError
    with pytest.raises(CheckpointError, match="malformed pickle.*(OverflowError|byte count)"):
        load_torch_file(p)
    p.write_bytes(b"\x80\x02" + b"(" * 100_000 + b".")  # MARK * 1e5
    with pytest.raises(CheckpointError, match="malformed pickle"):
        load_torch_file(p)


def test_legacy_key_list_of_the_wrong_type(tmp_path):
    raw = open(os.path.join(ORIG, "model_bf16_legacy.ckpt"), "rb").read()
    import pickle

    f = io.BytesIO(raw)
    parts = []
    for _ in range(4):  # magic, protocol, sys info, the state dict (persistent ids kept as they are)
        start = f.tell()

        class P(pickle.Unpickler):
            def persistent_load(self, pid):
                return None

            def find_class(self, m, n):
                return lambda *a, **k: None

        P(f).load()
        parts.append(raw[start:f.tell()])
    p = tmp_path / "k.ckpt"
    p.write_bytes(b"".join(parts) + pickle.dumps(5, protocol=2) + raw[f.tell():])
    with pytest.raises(CheckpointError, match="key list is a int"):
        load_torch_file(p)


def _storage_dtypes(path):
    """{storage key: dtype} of a torch zip, found with our restricted unpickler."""
    from gemma2np.original import RestrictedUnpickler

    found = {}
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))

        def load(dtype, key, numel):
            found[key] = dtype
            return np.zeros(numel, dtype)

        RestrictedUnpickler(io.BytesIO(z.read(pkl)), load).load()
    return found


def _big_endian_copy(src, dst):
    dtypes = _storage_dtypes(src)

    def swap(key):
        def f(data):
            dt = dtypes[key]
            if dt == bfloat16:
                return np.frombuffer(data, np.uint16).byteswap().tobytes()
            return np.frombuffer(data, dt).astype(dt.newbyteorder(">")).tobytes()
        return f

    replace = {f"/data/{k}": swap(k) for k in dtypes}
    replace["/byteorder"] = b"big"
    _rezip(src, dst, replace=replace)


@pytest.mark.parametrize("name", ["model_f32.ckpt", "model_bf16.ckpt"])
def test_big_endian_archives_are_byte_swapped(tmp_path, name):
    src = os.path.join(ORIG, name)
    big = tmp_path / "big.ckpt"
    _big_endian_copy(src, big)
    assert open(big, "rb").read() != open(src, "rb").read()
    want = load_original_checkpoint(src)
    got = load_original_checkpoint(big)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].dtype.byteorder in "=|<", k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # incl. complex64 freqs_cis and bf16
    # the flag alone, on little-endian data, is refused by nothing and gives other numbers: it is honoured
    flag_only = tmp_path / "flag.ckpt"
    _rezip(src, flag_only, replace={"/byteorder": b"big"})
    other = load_original_checkpoint(flag_only)
    assert any(not np.array_equal(other[k], want[k], equal_nan=True) for k in want)


@pytest.mark.torch
def test_big_endian_archives_read_like_torch(tmp_path):
    torch = pytest.importorskip("torch")
    big = tmp_path / "big.ckpt"
    _big_endian_copy(os.path.join(ORIG, "model_bf16.ckpt"), big)
    theirs = torch.load(big, weights_only=True)
    theirs = theirs.get("model_state_dict", theirs)
    ours = load_original_checkpoint(big)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k].astype(np.float32) if ours[k].dtype == bfloat16 else ours[k],
                                      v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy(), err_msg=k)


def test_original_shard_index_names_outside_are_refused(tmp_path, monkeypatch):
    import shutil

    d = tmp_path / "sharded"
    shutil.copytree(os.path.join(ORIG, "sharded"), d)
    index = json.loads((d / "pytorch_model.bin.index.json").read_text())
    for bad in ("../../etc/hostname", "/etc/hostname", "/dev/urandom"):
        wm = dict(index["weight_map"])
        wm[next(iter(wm))] = bad
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
        rec = _OpenRecorder(monkeypatch)
        with pytest.raises(CheckpointError, match="not a plain file name"):
            load_original_checkpoint(d)
        assert rec.outside(d) == [] and not [p for p in rec.paths if p.endswith(".bin")]
        monkeypatch.undo()
    (d / "pytorch_model.bin.index.json").write_bytes(b'{"weight_map": ["a"]}')
    with pytest.raises(CheckpointError, match="weight_map must be an object"):
        load_original_checkpoint(d)


# ============================================================================ tokenizer

from gemma2np import GemmaTokenizer  # noqa: E402
from gemma2np.tokenizer import MAX_PADDED_ELEMENTS, TokenizerError  # noqa: E402

TOK_DIR = os.path.join(os.path.dirname(__file__), "data", "tokenizer")


@pytest.fixture(scope="module")
def tok():
    return GemmaTokenizer.from_pretrained(TOK_DIR)


@pytest.mark.parametrize("text", ["a\ud800b", "\udcff", ["ok", "x\udfffy"], "<start_of_turn>\ud800"])
def test_lone_surrogates(tok, text):
    with pytest.raises(TokenizerError, match="lone surrogate"):
        tok(text)
    # transformers' GemmaTokenizer refuses them too (a TypeError from the tokenizers library); fine text works
    assert tok("a b")["input_ids"]


@pytest.mark.parametrize("ids", [None, 1.5, [1.5], "12", b"12", np.array([1.5]), np.array([True]), [True], {1, 2}.pop])
def test_decode_of_non_ids(tok, ids):
    with pytest.raises(TokenizerError):
        tok.decode(ids)


@pytest.mark.parametrize("seqs", [None, 5, "ab"])
def test_batch_decode_of_non_batches(tok, seqs):
    with pytest.raises(TokenizerError):
        tok.batch_decode(seqs)


def test_padding_to_an_absurd_length_fails_before_allocating(tok, monkeypatch):
    calls = []
    real_full = np.full
    monkeypatch.setattr(np, "full", lambda shape, *a, **k: calls.append(shape) or real_full(shape, *a, **k))
    with pytest.raises(TokenizerError, match="smaller max_length"):
        tok("hi", padding="max_length", max_length=10**10)
    with pytest.raises(TokenizerError, match="smaller max_length"):
        tok(["hi"] * 3, padding=True, pad_to_multiple_of=MAX_PADDED_ELEMENTS)
    assert calls == []
    for bad in ("5", 5.0, True, -1):
        with pytest.raises(TokenizerError, match="max_length must be"):
            tok("hi", padding="max_length", max_length=bad)
    out = tok("hi", padding="max_length", max_length=16)  # and a sane length still pads
    assert out["input_ids"].shape == (1, 16)


def _tok_copy(tmp_path):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(TOK_DIR, d)
    return d


@pytest.mark.parametrize("content, message", [
    (b'{"a": "\xff"}', "not valid UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested"),
    (b'{"model_max_length": ' + b"9" * 5000 + b"}", "too long"),
    (b'{"added_tokens_decoder": {"x": {"content": "<pad>"}}}', "not a token id"),
    (b'{"added_tokens_decoder": [1]}', "added_tokens_decoder must be an object"),
])
def test_tokenizer_config_json(tmp_path, content, message):
    d = _tok_copy(tmp_path)
    (d / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=message):
        GemmaTokenizer.from_pretrained(d)


def test_tokenizer_files_that_are_fifos(tmp_path):
    d = _tok_copy(tmp_path)
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("the tokenizer blocked on a FIFO"))
    signal.alarm(20)
    try:
        os.remove(d / "tokenizer_config.json")
        os.mkfifo(d / "tokenizer_config.json")
        with pytest.raises(TokenizerError, match="a FIFO"):
            GemmaTokenizer.from_pretrained(d)
        os.remove(d / "tokenizer_config.json")
        os.remove(d / "tokenizer.model")
        os.mkfifo(d / "tokenizer.model")
        with pytest.raises(TokenizerError, match="not found|a FIFO"):
            GemmaTokenizer.from_pretrained(d)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ============================================================================ CLI input decoding

import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args, stdin=b"", env=None):
    return subprocess.run([sys.executable, "-m", "gemma2np", *args], input=stdin, capture_output=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


@pytest.mark.parametrize("how", ["stdin", "argv", "chat", "stdin-strict", "chat-strict"])
def test_cli_invalid_utf8_is_one_line_and_exit_2(how):
    bad = b"ROMEO \xff\xfe:"
    strict = {"PYTHONIOENCODING": "utf-8:strict"} if how.endswith("strict") else None
    if how.startswith("stdin"):
        r = _cli(["generate", "--max-new-tokens", "2"], stdin=bad, env=strict)
    elif how == "argv":
        r = _cli(["generate", "--max-new-tokens", "2", "--prompt", bad])
    else:
        r = _cli(["chat", "--max-new-tokens", "2"], stdin=b"hello\n" + bad + b"\n", env=strict)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "not" in lines[0] and "UTF-8" in lines[0], err


def test_convert_config_file_json_errors(tmp_path):
    from gemma2np.convert import convert

    for content, message in ((b"\xff{}", "not valid UTF-8"), (b"[" * 100_000, "nested|not valid JSON"),
                             (b'{"vocab_size": ' + b"1" * 5000 + b"}", "too long")):
        cfg = tmp_path / "c.json"
        cfg.write_bytes(content)
        with pytest.raises(ConfigError, match=message):
            convert(os.path.join(ORIG, "model_f32.ckpt"), tmp_path / "out", config_file=cfg)


def test_legacy_pickle_with_a_huge_length_does_not_allocate_it(tmp_path):
    """Found by scripts/fuzz_atheris.py: a legacy file whose pickle declares a 2**31-byte BINBYTES8 made the
    buffered reader allocate that much before noticing the file is short."""
    p = tmp_path / "legacy.ckpt"
    p.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 31) + b"x" * 10)
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="malformed pickle"):
            load_torch_file(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 24


@pytest.mark.parametrize("container", ["legacy", "zip"])
def test_pickle_memo_index_cannot_grow_the_memo_table(tmp_path, container):
    """LONG_BINPUT 2**32 - 1 would make CPython's unpickler allocate and zero a 64 GB memo table."""
    evil = b"\x80\x02N" + b"r" + struct.pack("<I", 2**32 - 1) + b"."
    p = tmp_path / "m.ckpt"
    if container == "legacy":
        p.write_bytes(evil)
    else:
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("archive/data.pkl", evil)
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="memo index 4294967295"):
            load_torch_file(p)
        assert tracemalloc.get_traced_memory()[1] < 1 << 24
    finally:
        tracemalloc.stop()


def test_oversized_json_metadata_is_refused_unread(tmp_path, monkeypatch):
    import gemma2np.safeio as safeio

    monkeypatch.setattr(safeio, "MAX_JSON_FILE", 1000)
    (tmp_path / "config.json").write_text(json.dumps({"x": "y" * 2000}))
    with pytest.raises(ConfigError, match="more than the 1000"):
        Gemma2Config.from_pretrained(tmp_path)


def test_hostile_generation_config_is_a_typed_error(tmp_path):
    """generation_config.json goes through the same strict JSON reader as config.json: deep nesting and
    non-UTF-8 bytes are a GenerationError (a ValueError), for the API and for `gemma2np info`."""
    import shutil
    import subprocess
    import sys

    from gemma2np import Gemma2ForCausalLM
    from gemma2np.cli import DEFAULT_MODEL_DIR
    from gemma2np.generation import GenerationError

    for name, payload in (("deep", b"[" * 100000 + b"]" * 100000), ("bytes", b'{"top_k": "\xff"}')):
        d = tmp_path / name
        shutil.copytree(DEFAULT_MODEL_DIR, d)
        (d / "generation_config.json").write_bytes(payload)
        m = Gemma2ForCausalLM.from_pretrained(d)
        with pytest.raises(GenerationError, match="generation_config.json"):
            m.generate(input_ids=np.array([[2, 5, 6]]), max_new_tokens=2)
        r = subprocess.run([sys.executable, "-m", "gemma2np", "info", "--model", str(d)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "generation_config.json" in r.stderr


@pytest.mark.parametrize("etype, count", [(8, 2**62), (4, 2**62), (9, 2**40), (8, 7885070015651643392)])
def test_gguf_array_counts_past_the_file_are_refused_before_reading(tmp_path, etype, count):
    """An array whose declared element count the file cannot hold: the `gguf` package would loop on it
    (appending empty views until memory ran out; found by tests/test_fuzz.py). Refused up front, quickly."""
    import time

    from gemma2np.checkpoint import CheckpointError
    from gemma2np.gguf_io import load_gguf

    key = b"tokenizer.ggml.tokens"
    raw = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
           + struct.pack("<IIQ", 9, etype, count) + b"\0" * 64)
    p = tmp_path / "m.gguf"
    p.write_bytes(raw)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="elements"):
        load_gguf(p)
    assert time.monotonic() - t0 < 5


def test_gguf_header_walk_accepts_valid_files(tmp_path):
    """The header walk refuses no valid file: GGUFs written by the gguf package (llama.cpp's own writer) in
    F32 / F16 / Q8_0 with the full metadata. (Checked by hand on llama.cpp's convert_hf_to_gguf.py output of
    the bundled model, F32 / BF16 / Q8_0 / Q4_0, which is too large to commit.)"""
    from gemma2np.gguf_io import _prescan, load_gguf
    from test_gguf import Q, make_model, write_gguf

    for qtype in (Q.F32, Q.F16, Q.Q8_0):
        cfg, state = make_model()
        p = tmp_path / f"m-{qtype.name}.gguf"
        write_gguf(p, cfg, state, qtype=qtype)
        _prescan(str(p))
        load_gguf(p)
