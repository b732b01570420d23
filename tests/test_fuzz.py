"""Bounded fuzzing of the loaders and the tokenizer (issue #13): hypothesis mutates small, valid inputs -- a
safetensors model directory, a sharded index, config.json, a GGUF file, official torch checkpoints (zip,
DEFLATE-recompressed and legacy) -- and throws arbitrary text / ids / arguments at the tokenizer.

Every outcome must be a success or a gemma2np error (a ValueError subclass defined in gemma2np): never a
foreign exception, a crash, a hang, a file opened outside the model directory, or (for a loaded model whose
weights are all finite) non-finite logits. Runs in-process on tiny inputs under an address-space limit, so a
runaway allocation shows up as a MemoryError failure instead of taking the machine down. The whole file takes
well under a minute; FUZZ_EXAMPLES=n scales every target (e.g. a long run outside CI).
"""

import contextlib
import json
import os
import resource
import shutil
import struct
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma2np import Gemma2Config, Gemma2ForCausalLM, GemmaTokenizer
from gemma2np.checkpoint import load_state_dict
from gemma2np.original import load_original_checkpoint

from conftest import tiny_config
from test_hardening import _OpenRecorder

N = int(os.environ.get("FUZZ_EXAMPLES", "3"))  # 3: about 10 s here; CI must stay well under 60 s
HERE = os.path.dirname(os.path.abspath(__file__))
ORIG = os.path.join(HERE, "data", "original")
TOK_DIR = os.path.join(HERE, "data", "tokenizer")
_HC = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def FUZZ(examples):
    return settings(deadline=None, suppress_health_check=_HC, max_examples=examples * N)


_REAL_OPEN = open


def _typed(exc: BaseException) -> bool:
    """A gemma2np error: a ValueError whose class is defined in the package."""
    return isinstance(exc, ValueError) and type(exc).__module__.split(".")[0] == "gemma2np"


_WARM = []


def _warm_up():
    """Start the thread pools once, before any cap: OpenBLAS and OpenMP reserve address space for each
    worker thread (stacks, buffers, malloc arenas) on their first call. Started under the cap, that first
    call could fail to allocate -- a MemoryError that depends on test order, or a crash inside the BLAS
    library, which does not check its allocations -- whatever the input under test."""
    if not _WARM:
        a = np.ones((64, 64), np.float32)
        for _ in range(2):
            a @ a
        cfg = Gemma2Config(**_MICRO)
        Gemma2ForCausalLM.from_config(cfg, seed=0)(input_ids=np.array([[1, 2, 3]]))
        _WARM.append(True)


@contextlib.contextmanager
def _memory_cap(extra=2 << 30):
    """RLIMIT_AS = what the process maps now + `extra`, restored afterwards."""
    _warm_up()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with _REAL_OPEN("/proc/self/statm") as f:  # not through a test's open() recorder
        now = int(f.read().split()[0]) * resource.getpagesize()
    cap = now + extra if hard == resource.RLIM_INFINITY else min(hard, now + extra)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _outcome(fn, *args, **kwargs):
    """fn(...) -> (result, None) or (None, the typed error); anything else fails the test."""
    with _memory_cap(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args, **kwargs), None
        except Exception as exc:  # noqa: BLE001 -- exactly what is being checked
            if not _typed(exc):
                raise AssertionError(f"foreign exception {type(exc).__name__}: {exc}") from exc
            return None, exc


@st.composite
def _mutation(draw, raw: bytes, protect: int = 0):
    """A few byte-level edits of `raw`: flips, inserts, deletes, truncation, 8-byte integers overwritten."""
    b = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "int64", "int32"]))
        if not b:
            break
        pos = draw(st.integers(min(protect, len(b) - 1), len(b) - 1))
        if kind == "flip":
            b[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del b[pos:pos + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del b[pos:]
        else:
            fmt = "<q" if kind == "int64" else "<i"
            value = draw(st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**62, len(b), len(b) * 2 + 7]))
            if kind == "int32":
                value = max(-(2**31), min(2**31 - 1, value))
            b[pos:pos + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(b)


# ============================================================================ safetensors model directory

_MICRO = dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=4)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    d = tmp_path_factory.mktemp("micro")
    Gemma2ForCausalLM.from_config(tiny_config(**_MICRO), seed=0).save_pretrained(d)
    return d


def _load_and_run(d):
    model = Gemma2ForCausalLM.from_pretrained(d)
    logits = model(input_ids=np.array([[1, 2, 3, 4, 5]])).logits
    state = load_state_dict(d)
    weights_finite = all(np.isfinite(np.asarray(v, np.float64)).all() for v in state.values())
    # a flipped data byte can make a weight NaN: that is the file's content, not a parsing error
    assert np.isfinite(logits).all() or not weights_finite
    return logits


@FUZZ(60)
@given(data=st.data())
def test_fuzz_safetensors_directory(micro, tmp_path_factory, data):
    raw = (micro / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    # mostly the header (where parsing happens), sometimes anywhere
    region = data.draw(st.sampled_from(["header", "anywhere"]))
    mutated = data.draw(_mutation(raw[: 8 + n], 0) if region == "header" else _mutation(raw))
    if region == "header":
        mutated += raw[8 + n:]
    d = tmp_path_factory.mktemp("st")
    shutil.copy(micro / "config.json", d / "config.json")
    (d / "model.safetensors").write_bytes(mutated)
    _outcome(_load_and_run, d)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=8)
_SHARD_NAMES = st.sampled_from(["../../etc/hostname", "/etc/hostname", "/dev/urandom", "..", ".", "", "sub/x",
                                "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                "config.json", "missing.safetensors", "a\x00b", "\\x", "sub"])


@FUZZ(50)
@given(data=st.data())
def test_fuzz_sharded_index(micro, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("sharded")
    Gemma2ForCausalLM.from_pretrained(micro).save_pretrained(d, max_shard_size=3000)
    (d / "sub").mkdir()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(wm)))
        wm[key] = data.draw(_SHARD_NAMES | _JSON)
    doc = data.draw(st.sampled_from(["ok", "replace", "list"]))
    content = {"ok": index, "replace": {"weight_map": data.draw(_JSON)}, "list": [index]}[doc]
    (d / "model.safetensors.index.json").write_text(json.dumps(content))
    import _pytest.monkeypatch

    mp = _pytest.monkeypatch.MonkeyPatch()
    try:
        rec = _OpenRecorder(mp)
        _outcome(_load_and_run, d)
    finally:
        mp.undo()
    assert rec.outside(d) == []


# ============================================================================ config.json

_CONFIG_KEYS = sorted(tiny_config().to_dict())
_VALUES = st.one_of(_JSON, st.integers(-3, 10**12), st.sampled_from([0, -1, 10**9, 10**10, float("nan"), float("inf"),
                                                                     "1e9", True, None]),
                    st.fixed_dictionaries({"rope_type": st.sampled_from(["linear", "dynamic", "yarn", "longrope",
                                                                         "llama3", "default", "x"])},
                                          optional={"factor": st.floats() | st.integers(-2, 4),
                                                    "rope_theta": st.floats() | st.integers(-1, 10),
                                                    "original_max_position_embeddings": st.integers(-1, 64),
                                                    "low_freq_factor": st.floats(), "high_freq_factor": st.floats(),
                                                    "attention_factor": st.floats(), "beta_fast": st.floats(),
                                                    "partial_rotary_factor": st.floats(),
                                                    "short_factor": st.lists(st.floats(), max_size=3)}))


@FUZZ(150)
@given(data=st.data())
def test_fuzz_config(tmp_path_factory, data):
    d = tiny_config(**_MICRO).to_dict()
    for _ in range(data.draw(st.integers(1, 4))):
        key = data.draw(st.sampled_from(_CONFIG_KEYS + ["rope_scaling", "num_labels", "id2label", "label2id", "x"]))
        d[key] = data.draw(_VALUES)
    text = json.dumps(d)
    if data.draw(st.booleans()):  # and the bytes themselves
        text = data.draw(_mutation(text.encode()))
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    cfg, err = _outcome(Gemma2Config.from_json_file, path)
    if cfg is not None and cfg.num_hidden_layers <= 4 and cfg.hidden_size <= 64 and cfg.vocab_size <= 64 \
            and cfg.intermediate_size <= 64 and cfg.head_dim <= 16 and cfg.num_attention_heads <= 8:
        # a config that validates builds a model whose logits are finite
        model, err = _outcome(Gemma2ForCausalLM.from_config, cfg, seed=0)
        if model is not None:
            out, err = _outcome(model, input_ids=np.array([[1, 2, 3]]) % cfg.vocab_size, return_dict=True)
            if out is not None:
                assert np.isfinite(out.logits).all(), cfg.to_dict()


# ============================================================================ GGUF

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from test_gguf import write_gguf

    cfg = Gemma2Config(**dict(tiny_config(**_MICRO).to_dict(), vocab_size=16))
    state = {k: np.asarray(v) for k, v in Gemma2ForCausalLM.from_config(cfg, seed=0).state_dict().items()}
    p = tmp_path_factory.mktemp("gguf") / "m.gguf"
    write_gguf(p, cfg, state)
    return p


@FUZZ(60)
@given(data=st.data())
def test_fuzz_gguf(gguf_file, tmp_path_factory, data):
    raw = gguf_file.read_bytes()
    d = tmp_path_factory.mktemp("g")
    (d / "m.gguf").write_bytes(data.draw(_mutation(raw[:2048]) if data.draw(st.booleans()) else _mutation(raw))
                               + (raw[2048:] if len(raw) > 2048 else b""))

    def run():
        model = Gemma2ForCausalLM.from_pretrained(d, gguf_file="m.gguf")
        return model(input_ids=np.array([[1, 2, 3]])).logits

    _outcome(run)


# ============================================================================ original torch checkpoints


def _deflated(src, dst):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    d = tmp_path_factory.mktemp("orig")
    _deflated(os.path.join(ORIG, "model_bf16.ckpt"), d / "deflated.ckpt")
    return {"zip": os.path.join(ORIG, "model_f32.ckpt"), "deflated": str(d / "deflated.ckpt"),
            "legacy": os.path.join(ORIG, "model_bf16_legacy.ckpt")}


@FUZZ(90)
@given(data=st.data())
def test_fuzz_original_checkpoint(originals, tmp_path_factory, data):
    kind = data.draw(st.sampled_from(sorted(originals)))
    raw = open(originals[kind], "rb").read()
    p = tmp_path_factory.mktemp("o") / "x.ckpt"
    p.write_bytes(data.draw(_mutation(raw)))
    _outcome(load_original_checkpoint, p)


# ============================================================================ tokenizer


@pytest.fixture(scope="module")
def tok():
    return GemmaTokenizer.from_pretrained(TOK_DIR)


_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40) | st.sampled_from(
    ["a\ud800b", "\udcff", "<start_of_turn>user\n<eos>", "<unused3><0x41>", "\x00", " " * 5])
_IDS = st.one_of(st.none(), st.integers(-5, 400), st.floats(), st.text(max_size=3), st.booleans(),
                 st.lists(st.one_of(st.integers(-5, 400), st.floats(), st.booleans(), st.none()), max_size=6),
                 st.lists(st.lists(st.integers(0, 300), max_size=3), max_size=3),
                 st.builds(np.array, st.lists(st.integers(-3, 300), max_size=5)))


@FUZZ(150)
@given(text=st.one_of(_TEXT, st.lists(_TEXT, max_size=3), st.integers(), st.none()),
       padding=st.sampled_from([False, True, "longest", "max_length", "bogus", None]),
       max_length=st.one_of(st.none(), st.integers(-2, 64), st.sampled_from([10**10, 2**40]), st.floats(), st.text()),
       truncation=st.sampled_from([False, True, "longest_first", "x"]),
       pad_to_multiple_of=st.one_of(st.none(), st.integers(-1, 9), st.sampled_from([2**30]), st.text(max_size=1)),
       ids=_IDS, skip=st.booleans())
def test_fuzz_tokenizer(tok, text, padding, max_length, truncation, pad_to_multiple_of, ids, skip):
    _outcome(tok, text, padding=padding, max_length=max_length, truncation=truncation,
             pad_to_multiple_of=pad_to_multiple_of)
    _outcome(tok.decode, ids, skip_special_tokens=skip)
    _outcome(tok.batch_decode, ids if isinstance(ids, list) else [ids])
    if isinstance(text, str):
        _outcome(tok.apply_chat_template, [{"role": "user", "content": text}], add_generation_prompt=True)
