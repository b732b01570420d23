"""Coverage-guided fuzzing of the loaders and the tokenizer with atheris (libFuzzer for Python). Not part of CI:
tests/test_fuzz.py is the bounded hypothesis version that is.

    pip install atheris            # in a virtualenv
    python scripts/fuzz_atheris.py -runs=20000 -rss_limit_mb=4096 [corpus_dir]

The first input byte picks a target (safetensors file, config.json, sharded index, GGUF, torch checkpoint,
tokenizer text); the rest is that target's file / text, seeded from the repository's own small files. An
outcome other than success or a gemma2np error (a ValueError defined in the package) is reported by atheris
as a crash, with the input saved for replay (`python scripts/fuzz_atheris.py crash-<hash>`).
"""

import os
import sys
import tempfile
import warnings

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's package (a development script)

with atheris.instrument_imports():
    import numpy as np

    from gemma2np import Gemma2Config, Gemma2ForCausalLM, GemmaTokenizer
    from gemma2np.checkpoint import load_state_dict, read_safetensors
    from gemma2np.gguf_io import load_gguf
    from gemma2np.original import load_original_checkpoint

TOK = GemmaTokenizer.from_pretrained(os.path.join(ROOT, "tests", "data", "tokenizer"))
WORK = tempfile.mkdtemp(prefix="gemma2np-atheris-")


def _typed(exc):
    return isinstance(exc, ValueError) and type(exc).__module__.split(".")[0] == "gemma2np"


def _write(name, data):
    path = os.path.join(WORK, name)
    if os.path.lexists(path):
        os.remove(path)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _target(kind, data):
    if kind == 0:
        read_safetensors(_write("model.safetensors", data))
    elif kind == 1:
        Gemma2Config.from_json_file(_write("config.json", data))
    elif kind == 2:
        for stale in ("model.safetensors",):
            if os.path.lexists(os.path.join(WORK, stale)):
                os.remove(os.path.join(WORK, stale))
        _write("model.safetensors.index.json", data)
        try:
            load_state_dict(WORK)
        finally:
            os.remove(os.path.join(WORK, "model.safetensors.index.json"))
    elif kind == 3:
        load_gguf(_write("m.gguf", data))
    elif kind == 4:
        load_original_checkpoint(_write("m.ckpt", data))
    else:
        text = data.decode("utf-8", "surrogateescape") if kind == 5 else data.decode("latin-1")
        ids = TOK(text, padding="max_length", max_length=len(data) % 64)["input_ids"]
        TOK.decode(ids[0])
        TOK.decode(list(np.frombuffer(data[: len(data) // 8 * 8], np.int64)))


def TestOneInput(data: bytes):
    if not data:
        return
    kind = data[0] % 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _target(kind, data[1:])
        except Exception as exc:  # noqa: BLE001
            if not _typed(exc):
                raise


def _seed(corpus: str) -> None:
    """Fill an empty corpus directory with the repository's small valid files, one per target."""
    data = os.path.join(ROOT, "tests", "data")
    model = os.path.join(ROOT, "gemma2np", "data", "gemma2-shakespeare")
    seeds = {0: None, 1: os.path.join(model, "config.json"), 3: None,
             4: os.path.join(data, "original", "model_f32.ckpt"),
             5: os.path.join(data, "tokenizer", "tokenizer_config.json")}
    os.makedirs(corpus, exist_ok=True)
    if os.listdir(corpus):
        return
    import json

    import safetensors.numpy

    blobs = {k: open(v, "rb").read() for k, v in seeds.items() if v}
    blobs[0] = safetensors.numpy.save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.int64)})
    blobs[2] = json.dumps({"weight_map": {"a": "model.safetensors", "b": "../x"}}).encode()
    blobs[4 + 100] = open(os.path.join(data, "original", "model_bf16_legacy.ckpt"), "rb").read()
    for k, blob in blobs.items():
        with open(os.path.join(corpus, f"seed-{k}"), "wb") as f:
            f.write(bytes([k % 100]) + blob)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        if not arg.startswith("-") and not os.path.isfile(arg):
            _seed(arg)
    if len(sys.argv) > 1 and os.path.isfile(sys.argv[1]) and not sys.argv[1].startswith("-"):
        with open(sys.argv[1], "rb") as f:  # replay one input
            TestOneInput(f.read())
        sys.exit(0)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
