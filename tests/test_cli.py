"""The `gemma2np` command line, end to end in subprocesses (`python -m gemma2np ...`).

Runs on the bundled model when it is installed (gemma2np/data/gemma2-shakespeare with config.json +
weights); otherwise on a tiny random model built here with the test tokenizer.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gemma2np.generation import get_generation_config
from gemma2np import Gemma2Config, Gemma2ForCausalLM, GemmaTokenizer
from gemma2np.cli import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "tokenizer"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def _bundled_ready() -> bool:
    d = Path(DEFAULT_MODEL_DIR)
    return (d / "config.json").is_file() and any(d.glob("*.safetensors")) and (d / "tokenizer.model").is_file()


def _tiny_model(directory: Path, context: int = 64) -> Path:
    tok = GemmaTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                       max_position_embeddings=context, query_pre_attn_scalar=8, initializer_range=0.2)
    Gemma2ForCausalLM.from_config(cfg, seed=0).save_pretrained(directory)
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / f, directory / f)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    if _bundled_ready():
        return Path(DEFAULT_MODEL_DIR)
    return _tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """Always the tiny model (64-token context), for the context-overflow errors."""
    return _tiny_model(tmp_path_factory.mktemp("small"))


def run(*args, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "gemma2np", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture
def cli(capsys):
    """`gemma2np ARGS` run in this process (gemma2np.cli.main), as a CompletedProcess: the same exit status
    and output as the subprocess, without a new interpreter each time (for the many user-mistake checks)."""
    from gemma2np.cli import main

    def call(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err)

    return call


def assert_user_error(r: subprocess.CompletedProcess, match: str):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert match in lines[0], lines[0]
    assert lines[0].startswith("gemma2np ")


def _expected_text(model_dir: Path, prompt_ids, n: int, echo: bool = False) -> str:
    model = Gemma2ForCausalLM.from_pretrained(model_dir)
    tok = GemmaTokenizer.from_pretrained(model_dir)
    ids = np.asarray([prompt_ids])
    eos = get_generation_config(model).eos_token_id
    # do_sample=False: the CLI's generate is greedy unless asked, whatever generation_config.json says
    out = model.generate(ids, max_new_tokens=n, eos_token_id=eos if eos is not None else [], do_sample=False)
    return tok.decode(out[0, 0 if echo else ids.shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------------- generate


def test_generate_prompt_streams_greedy_text(model_dir):
    r = run("generate", "--model", model_dir, "--prompt", "ROMEO:", "--max-new-tokens", 8)
    assert r.returncode == 0, r.stderr
    tok = GemmaTokenizer.from_pretrained(model_dir)
    # stdout holds exactly the prompt and the greedy continuation the Python API produces, decoded
    # together, then a newline
    full = _expected_text(model_dir, tok("ROMEO:")["input_ids"], 8, echo=True)
    assert full.startswith("ROMEO:")
    assert r.stdout == full + "\n"
    assert "time to first token" in r.stderr and "tokens/s" in r.stderr
    assert "Traceback" not in r.stderr


def test_generate_no_echo_prints_the_continuation_only(model_dir):
    r = run("generate", "--model", model_dir, "--prompt", "ROMEO:", "--max-new-tokens", 8, "--no-echo")
    assert r.returncode == 0, r.stderr
    tok = GemmaTokenizer.from_pretrained(model_dir)
    assert r.stdout == _expected_text(model_dir, tok("ROMEO:")["input_ids"], 8) + "\n"


def test_generate_from_stdin_and_file(model_dir, tmp_path):
    a = run("generate", "--model", model_dir, "--max-new-tokens", 5, stdin="JULIET:")
    assert a.returncode == 0, a.stderr
    f = tmp_path / "p.txt"
    f.write_text("JULIET:", encoding="utf-8")
    b = run("generate", "--model", model_dir, "--max-new-tokens", 5, "--prompt-file", f)
    assert b.returncode == 0, b.stderr
    c = run("generate", "--model", model_dir, "--max-new-tokens", 5, "--prompt", "JULIET:")
    assert a.stdout == b.stdout == c.stdout


def test_generate_chat_template(model_dir):
    r = run("generate", "--model", model_dir, "--chat", "--prompt", "Who art thou?", "--max-new-tokens", 6)
    assert r.returncode == 0, r.stderr
    tok = GemmaTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Who art thou?"}], add_generation_prompt=True,
                                  return_dict=False)
    assert f"[{len(ids)} prompt tokens" in r.stderr  # the template was applied (bos + turn markers)
    assert "Who art thou?" not in r.stdout and "model\n" not in r.stdout  # the template is not echoed


def test_generate_sampling_reproducible(model_dir):
    args = ("generate", "--model", model_dir, "--prompt", "ROMEO:", "--max-new-tokens", 8, "--temperature", 1.3,
            "--top-k", 40, "--top-p", 0.95, "--repetition-penalty", 1.1)
    a, b = run(*args, "--seed", 7), run(*args, "--seed", 7)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout


def test_generate_context_is_respected(small_dir):
    r = run("generate", "--model", small_dir, "--prompt", "word " * 50, "--max-new-tokens", 50)
    assert r.returncode == 0, r.stderr
    assert "to stay within the 64-token context" in r.stderr


# ---------------------------------------------------------------------------- user mistakes -> status 2


@pytest.mark.parametrize("extra,match", [
    (("--temperature", "-1"), "temperature"),
    (("--top-p", "0"), "top-p"),
    (("--top-p", "1.5"), "top-p"),
    (("--top-k", "-3"), "top-k"),
    (("--repetition-penalty", "0"), "repetition-penalty"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be at least 1"),
])
def test_invalid_sampling_values(model_dir, extra, match):
    assert_user_error(run("generate", "--model", model_dir, "--prompt", "x", *extra), match)


def test_user_errors(small_dir, tmp_path):
    assert_user_error(run("generate", "--model", tmp_path / "nope", "--prompt", "x"), "model directory not found")
    assert_user_error(run("info", "--model", tmp_path / "nope"), "model directory not found")
    assert_user_error(run("generate", "--model", small_dir, "--prompt", "word " * 80), "context is 64 tokens")
    assert_user_error(run("generate", "--model", small_dir, "--prompt", "   "), "the prompt is empty")
    assert_user_error(run("generate", "--model", small_dir, "--prompt-file", tmp_path / "missing.txt"),
                      "cannot read --prompt-file")
    # a directory that is not a model
    (tmp_path / "empty").mkdir()
    assert_user_error(run("generate", "--model", tmp_path / "empty", "--prompt", "x"), "no config.json")
    # missing tokenizer
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(small_dir / f, no_tok / f)
    assert_user_error(run("generate", "--model", no_tok, "--prompt", "x"), "cannot load the tokenizer")
    # broken tokenizer
    shutil.copy(small_dir / "config.json", no_tok / "config.json")
    (no_tok / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert_user_error(run("generate", "--model", no_tok, "--prompt", "x"), "cannot load the tokenizer")
    # broken config / broken weights
    bad = tmp_path / "bad"
    shutil.copytree(small_dir, bad)
    (bad / "config.json").write_text("{not json")
    assert_user_error(run("info", "--model", bad), "cannot read the config")
    assert_user_error(run("generate", "--model", bad, "--prompt", "x"), "cannot load the model")
    shutil.copy(small_dir / "config.json", bad / "config.json")
    (bad / "model.safetensors").write_bytes(b"\x00" * 5)
    assert_user_error(run("generate", "--model", bad, "--prompt", "x"), "cannot load the model")


def test_no_command_and_unknown_option():
    r = run()
    assert r.returncode == 2 and "usage: gemma2np" in r.stderr
    r = run("generate", "--no-such-option")
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", [(), ("generate",), ("chat",), ("info",), ("compare",), ("convert",)])
def test_help_has_examples(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and "gemma2np" in r.stdout


# ---------------------------------------------------------------------------- runtime options


def test_weights_int8_implies_native_backend(cli, model_dir):
    pytest.importorskip("gemma2np._native")
    r = cli("generate", "--model", model_dir, "--prompt", "ROMEO:", "--max-new-tokens", 3, "--weights", "int8", "-v")
    assert r.returncode == 0, r.stderr
    assert "backend native, weights int8" in r.stderr
    assert_user_error(cli("generate", "--model", model_dir, "--prompt", "x", "--weights", "int8", "--backend", "numpy"),
                      "--weights int8 runs on the native backend")


@pytest.mark.parametrize("n", ["0", "-2"])
def test_threads_must_be_positive(cli, model_dir, n):
    assert_user_error(cli("generate", "--model", model_dir, "--prompt", "x", "--threads", n),
                      f"--threads must be at least 1, got {n}")


def test_verbose_says_what_runs(model_dir):
    r = run("generate", "--model", model_dir, "--prompt", "ROMEO:", "--max-new-tokens", 2, "--verbose")
    assert r.returncode == 0, r.stderr
    assert "backend numpy" in r.stderr and "loaded " in r.stderr
    from gemma2np.kernels import native_available

    if native_available():
        import gemma2np._native as nat

        r = run("generate", "--model", model_dir, "--prompt", "ROMEO:", "--max-new-tokens", 2, "--backend", "native",
                "--threads", 1, "-v")
        assert r.returncode == 0, r.stderr
        line = next(x for x in r.stderr.splitlines() if x.startswith("[loaded"))
        assert "backend native" in line and "1 threads" in line
        assert f"OpenMP {'on' if nat.have_openmp() else 'off'}" in line
        simd = ("scalar" if nat.get_simd() == 0 else
                "AVX-512 + AVX-512 BF16" if "avx512bf16" in nat.cpu_features() and nat.get_simd() == 1 else "AVX-512")
        assert f"SIMD {simd}" in line


# ---------------------------------------------------------------------------- GGUF


def _write_gguf(path: Path, model_dir: Path) -> Path:
    """The model as llama.cpp's converter writes Gemma 2 (F32 weights, norms stored as 1 + w): the writer of
    tests/test_gguf.py (gguf's own GGUFWriter, gemma2np's name map inverted)."""
    pytest.importorskip("gguf")
    from test_gguf import write_gguf

    model = Gemma2ForCausalLM.from_pretrained(model_dir)
    write_gguf(path, model.config, model.state_dict())
    return path


@pytest.fixture(scope="module")
def gguf_dir(model_dir, tmp_path_factory) -> Path:
    """model.gguf + the tokenizer files, and no config.json: everything comes from the GGUF."""
    d = tmp_path_factory.mktemp("gguf")
    _write_gguf(d / "model.gguf", model_dir)
    for f in TOKENIZER_FILES:
        shutil.copy(Path(model_dir) / f, d / f)
    return d


def test_generate_from_a_gguf_file(gguf_dir):
    model = Gemma2ForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf")
    tok = GemmaTokenizer.from_pretrained(gguf_dir)
    ids = np.asarray([tok("ROMEO:")["input_ids"]])
    eos = get_generation_config(model).eos_token_id
    want = tok.decode(model.generate(ids, max_new_tokens=6, eos_token_id=eos)[0], skip_special_tokens=True) + "\n"
    a = run("generate", "--model", gguf_dir / "model.gguf", "--prompt", "ROMEO:", "--max-new-tokens", 6)
    assert a.returncode == 0, a.stderr
    b = run("generate", "--model", gguf_dir, "--gguf-file", "model.gguf", "--prompt", "ROMEO:", "--max-new-tokens", 6)
    assert b.returncode == 0, b.stderr
    assert a.stdout == b.stdout == want


def test_info_and_compare_on_a_gguf_file(cli, gguf_dir, model_dir, tmp_path):
    r = cli("info", "--model", gguf_dir / "model.gguf", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    cfg = Gemma2Config.from_pretrained(model_dir)
    assert j["parameters"] == cfg.num_parameters("causal_lm")
    assert j["checkpoint_files"] == ["model.gguf"] and j["checkpoint_tensor_types"] == {"F32": len(
        Gemma2ForCausalLM.from_pretrained(model_dir).state_dict())}
    # a reference made from the GGUF model passes against the GGUF and names the model it ran
    from gemma2np.intermediates import run_with_intermediates, save_intermediates

    model = Gemma2ForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf")
    ids = np.asarray([[2, 17, 5, 60, 33, 9]])
    save_intermediates(tmp_path / "ref.npz", {"input_ids": ids, **run_with_intermediates(model, ids)})
    r = cli("compare", "--model", gguf_dir / "model.gguf", "--reference", tmp_path / "ref.npz")
    assert r.returncode == 0, r.stdout + r.stderr
    assert str(gguf_dir / "model.gguf") in r.stdout


def test_gguf_mistakes(cli, gguf_dir, model_dir, tmp_path):
    assert_user_error(cli("generate", "--model", gguf_dir / "model.gguf", "--gguf-file", "x.gguf", "--prompt", "x"),
                      "give one of them")
    assert_user_error(cli("info", "--model", gguf_dir, "--gguf-file", "nope.gguf"), "GGUF file not found")
    fake = tmp_path / "fake.gguf"
    fake.write_text("not gguf")
    assert_user_error(cli("info", "--model", fake), "does not start with the GGUF magic")
    # a directory with a .gguf but no config.json: the hint says how to load it
    assert_user_error(cli("info", "--model", gguf_dir), f"--model {gguf_dir / 'model.gguf'}")
    # a safetensors file instead of its directory
    assert_user_error(cli("info", "--model", Path(model_dir) / "model.safetensors"), "pass its directory")
    # no tokenizer beside the GGUF
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(gguf_dir / "model.gguf", lone / "model.gguf")
    assert_user_error(cli("generate", "--model", lone / "model.gguf", "--prompt", "x"), "pass --tokenizer DIR")
    r = cli("generate", "--model", lone / "model.gguf", "--tokenizer", gguf_dir, "--prompt", "ROMEO:",
            "--max-new-tokens", 2)
    assert r.returncode == 0, r.stderr
    # truncated GGUF
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((gguf_dir / "model.gguf").read_bytes()[:-1000])
    r = cli("info", "--model", cut)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cut.gguf" in r.stderr


def test_convert_gguf_to_hf_directory(cli, gguf_dir, tmp_path):
    out = tmp_path / "hf"
    r = cli("convert", "--input-checkpoint", gguf_dir / "model.gguf", "--output-dir", out, "--tokenizer", gguf_dir)
    assert r.returncode == 0, r.stderr
    ids = np.asarray([[2, 17, 5, 60, 33, 9, 71]])
    want = Gemma2ForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf")(input_ids=ids).logits
    got = Gemma2ForCausalLM.from_pretrained(out)(input_ids=ids).logits
    np.testing.assert_array_equal(got, want)  # float32 written: the same numbers the GGUF gives
    assert GemmaTokenizer.from_pretrained(out)("ROMEO:")["input_ids"] == GemmaTokenizer.from_pretrained(gguf_dir)(
        "ROMEO:")["input_ids"]
    # a GGUF carries its config
    r = cli("convert", "--input-checkpoint", gguf_dir / "model.gguf", "--output-dir", tmp_path / "o2",
            "--model-size", "2B")
    assert_user_error(r, "carries its own config")


# ---------------------------------------------------------------------------- convert, compare: user mistakes


def test_convert_mistakes_name_the_problem(cli, model_dir, tmp_path):
    st = Path(model_dir) / "model.safetensors"
    assert_user_error(cli("convert", "--input-checkpoint", st, "--model-size", "2B", "--output-dir", tmp_path / "o"),
                      "is a safetensors file")
    assert_user_error(cli("convert", "--input-checkpoint", model_dir, "--model-size", "2B", "--output-dir",
                          tmp_path / "o"), "already a Hugging Face model directory")
    assert not (tmp_path / "o").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    ckpt = ROOT / "tests" / "data" / "original" / "model_f32.ckpt"
    config = ROOT / "tests" / "data" / "original" / "config.json"
    r = cli("convert", "--input-checkpoint", ckpt, "--config", config, "--output-dir", full)
    assert_user_error(r, "exists and is not empty")
    assert sorted(os.listdir(full)) == ["keep.txt"]
    r = cli("convert", "--input-checkpoint", ckpt, "--config", config, "--output-dir", full, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (full / "model.safetensors").is_file()
    assert_user_error(cli("convert", "--input-checkpoint", ckpt, "--output-dir", tmp_path / "o3"),
                      "one of --model-size or --config is required")


def test_compare_defaults_to_the_bundled_model_and_explains_references(cli, tmp_path):
    r = cli("compare", "--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and "np.savez(" in r.stdout and "making a reference file" in r.stdout
    text = tmp_path / "notes.txt"
    text.write_text("these are not tensors\n")
    assert_user_error(cli("compare", "--reference", text), "is not a reference file")
    if not _bundled_ready():
        pytest.skip("the bundled model is not installed")
    from gemma2np.intermediates import run_with_intermediates, save_intermediates

    model = Gemma2ForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    ids = np.asarray([[2, 40, 41, 42]])
    save_intermediates(tmp_path / "ref.npz", {"input_ids": ids, "logits": run_with_intermediates(model, ids)["logits"]})
    r = cli("compare", "--reference", tmp_path / "ref.npz")
    assert r.returncode == 0, r.stdout + r.stderr
    assert DEFAULT_MODEL_DIR in r.stdout


# ---------------------------------------------------------------------------- chat


def test_chat_scripted_session_ends_on_eof(model_dir):
    r = run("chat", "--model", model_dir, "--max-new-tokens", 4, stdin="Good morrow\n/reset\nHow now?\nAnd then?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("model> ") == 3
    assert "(conversation cleared)" in r.stderr
    assert "Traceback" not in r.stderr


def test_chat_exit_command_and_ctrl_c(model_dir):
    r = run("chat", "--model", model_dir, "--max-new-tokens", 2, stdin="/exit\nnot read\n")
    assert r.returncode == 0 and "model> " not in r.stdout
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "gemma2np", "chat", "--model", str(model_dir)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = p.stderr.readline()  # printed once the model is loaded and the loop waits for input
        assert "chat with the model" in banner
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------- info


def test_info_refuses_a_damaged_checkpoint(cli, small_dir, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(small_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    assert_user_error(cli("info", "--model", bad), "damaged or incomplete")
    # a whole file that lacks a tensor the config needs
    from gemma2np.checkpoint import read_safetensors, write_safetensors

    tensors, _ = read_safetensors(small_dir / "model.safetensors", mmap=False)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    write_safetensors(bad / "model.safetensors", tensors)
    assert_user_error(cli("info", "--model", bad), "model.layers.1.mlp.up_proj.weight")


def test_info_says_what_runs(cli, model_dir):
    from gemma2np.cli_models import system_info

    r = cli("info", "--model", model_dir)
    assert r.returncode == 0, r.stderr
    assert f"runs on          {system_info()}" in r.stdout


def test_info(model_dir):
    r = run("info", "--model", model_dir)
    assert r.returncode == 0, r.stderr
    cfg = Gemma2Config.from_pretrained(model_dir)
    n = cfg.num_parameters("causal_lm")
    assert f"{n:,}" in r.stdout
    assert "layer types" in r.stdout and "float32" in r.stdout and "int8" in r.stdout
    j = json.loads(run("info", "--model", model_dir, "--json").stdout)
    assert j["parameters"] == n
    assert j["layer_types"] == list(cfg.layer_types)
    # float32 weights: 4 bytes per parameter; bfloat16 halves the matrices; int8 is smaller still
    assert j["weight_bytes"]["float32"] == 4 * n
    assert j["weight_bytes"]["int8"] < j["weight_bytes"]["bfloat16"] < j["weight_bytes"]["float32"]


def test_bundled_model_is_the_default():
    if not _bundled_ready():
        r = run("info")
        assert r.returncode in (0, 2) and "Traceback" not in r.stderr
        pytest.skip("the bundled model is not installed yet")
    r = run("info")
    assert r.returncode == 0 and DEFAULT_MODEL_DIR in r.stdout
    r = run("generate", "--prompt", "ROMEO:", "--max-new-tokens", 4)
    assert r.returncode == 0, r.stderr


def test_console_script_when_installed(model_dir):
    exe = shutil.which("gemma2np")
    if exe is None:
        pytest.skip("gemma2np is not pip-installed here (the console script is declared in pyproject.toml)")
    r = subprocess.run([exe, "info", "--model", str(model_dir)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
