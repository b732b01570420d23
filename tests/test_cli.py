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


def assert_user_error(r: subprocess.CompletedProcess, match: str):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert match in lines[0], lines[0]
    assert lines[0].startswith("gemma2np ")


def _expected_text(model_dir: Path, prompt_ids, n: int) -> str:
    model = Gemma2ForCausalLM.from_pretrained(model_dir)
    tok = GemmaTokenizer.from_pretrained(model_dir)
    ids = np.asarray([prompt_ids])
    eos = get_generation_config(model).eos_token_id
    # do_sample=False: the CLI's generate is greedy unless asked, whatever generation_config.json says
    out = model.generate(ids, max_new_tokens=n, eos_token_id=eos if eos is not None else [], do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------------- generate


def test_generate_prompt_streams_greedy_text(model_dir):
    r = run("generate", "--model", model_dir, "--prompt", "ROMEO:", "--max-new-tokens", 8)
    assert r.returncode == 0, r.stderr
    tok = GemmaTokenizer.from_pretrained(model_dir)
    # stdout holds exactly the greedy continuation that the Python API produces, then a newline
    assert r.stdout == _expected_text(model_dir, tok("ROMEO:")["input_ids"], 8) + "\n"
    assert "time to first token" in r.stderr and "tokens/s" in r.stderr
    assert "Traceback" not in r.stderr


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


@pytest.mark.parametrize("cmd", [(), ("generate",), ("chat",), ("info",)])
def test_help_has_examples(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and "gemma2np" in r.stdout


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
