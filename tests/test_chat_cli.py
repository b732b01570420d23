"""`gemma2np chat` end to end in subprocesses: the cache reuse is visible in the per-turn line, Ctrl-C during a
reply returns to the prompt (the session goes on), Ctrl-C or Ctrl-D at the prompt leaves, the new decoding
options reach generate()."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "gemma2np" / "data" / "gemma2-shakespeare"
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

pytestmark = pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="bundled model not installed")


def run(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "gemma2np", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=240, env=ENV, cwd=ROOT)


def test_chat_turns_reuse_the_cache():
    r = run("chat", "--seed", 1, "--max-new-tokens", 12, stdin="Who art thou?\nWhither goest thou?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("model> ") == 2
    lines = [ln for ln in r.stderr.splitlines() if "tokens read" in ln]
    assert len(lines) == 2
    assert "0 from the cache" in lines[0] and "0 from the cache" not in lines[1]
    assert all("time to first token" in ln and "tokens/s" in ln for ln in lines)
    assert "model loaded in" in r.stderr and "sampling, temperature 0.8" in r.stderr  # the checkpoint's defaults
    # the same seed gives the same conversation; --greedy overrides the checkpoint
    assert run("chat", "--seed", 1, "--max-new-tokens", 12, stdin="Who art thou?\nWhither goest thou?\n").stdout \
        == r.stdout
    g = run("chat", "--greedy", "--max-new-tokens", 12, stdin="Who art thou?\n")
    assert g.returncode == 0 and "greedy; at most 12 tokens" in g.stderr


def test_chat_options_are_checked():
    for args, match in ((("--greedy", "--temperature", "0.5"), "contradicts"), (("--seed", "-3"), "seed"),
                        (("--min-p", "1.5"), "min-p"), (("--max-new-tokens", "0"), "max-new-tokens")):
        r = run("chat", *args, stdin="hi\n")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert match in r.stderr.strip().splitlines()[-1]


def _read_until(stream, text: str, timeout: float, count: int = 1, buf: bytes = b"") -> str:
    end = time.time() + timeout
    fd = stream.fileno()
    while buf.count(text.encode()) < count:
        left = end - time.time()
        assert left > 0, f"timed out waiting for {text!r}; got {buf!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"stream closed before {text!r}; got {buf!r}"
            buf += chunk
    return buf.decode(errors="replace")


def test_ctrl_c_during_a_reply_returns_to_the_prompt():
    p = subprocess.Popen([sys.executable, "-m", "gemma2np", "chat", "--max-new-tokens", "1000", "--seed", "0"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    try:
        _read_until(p.stderr, "chat with the model", 60)
        p.stdin.write(b"Who art thou?\n")
        p.stdin.flush()
        out = _read_until(p.stdout, "model> ", 60)
        out += _read_until(p.stdout, " ", 60)  # some of the reply has been printed: the model is generating
        p.send_signal(signal.SIGINT)
        err = _read_until(p.stderr, "[interrupted]", 60)
        p.stdin.write(b"And then?\n")  # the session goes on: a second turn
        p.stdin.flush()
        err = _read_until(p.stderr, "tokens read", 120, count=2, buf=err.encode())
        out += _read_until(p.stdout, "model> ", 10)
        p.send_signal(signal.SIGINT)  # Ctrl-C at the prompt (or during this reply, then EOF): leaves cleanly
        rest_out, rest_err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    err += rest_err.decode(errors="replace")
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert out.count("model> ") == 2
    turns = [ln for ln in err.splitlines() if "tokens read" in ln]
    assert len(turns) == 2 and err.index("[interrupted]") < err.index(turns[0])
    # the interrupted reply's cache was dropped, so the second turn re-read the conversation once (the cache
    # is reused again from the turn after it; see test_chat_session.py)
    assert "0 from the cache" in turns[1]


def test_generate_decoding_options():
    """--stop, --num-return-sequences, --no-repeat-ngram-size and --min-p reach generate() (same tokens as the
    Python API with the same arguments)."""
    import numpy as np

    from gemma2np import Gemma2ForCausalLM, GemmaTokenizer

    model = Gemma2ForCausalLM.from_pretrained(BUNDLED)
    tok = GemmaTokenizer.from_pretrained(BUNDLED)
    ids = np.asarray([tok("JULIET:")["input_ids"]])

    def api(**kw):
        out = model.generate(ids, max_new_tokens=30, eos_token_id=[1], tokenizer=tok, **kw)
        return [tok.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]

    r = run("generate", "--prompt", "JULIET:", "--max-new-tokens", 30, "--stop", "man")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(api(do_sample=False, stop_strings=["man"])[0] + "\n") and r.stdout.rstrip().endswith("man")
    r = run("generate", "--prompt", "JULIET:", "--max-new-tokens", 30, "--no-repeat-ngram-size", 2)
    assert r.returncode == 0 and r.stdout.endswith(api(do_sample=False, no_repeat_ngram_size=2)[0] + "\n")
    r = run("generate", "--prompt", "JULIET:", "--max-new-tokens", 30, "--min-p", 0.1, "--seed", 4)
    assert r.returncode == 0 and r.stdout.endswith(api(do_sample=True, min_p=0.1, seed=4)[0] + "\n")
    r = run("generate", "--prompt", "JULIET:", "--max-new-tokens", 30, "--num-return-sequences", 2, "--do-sample",
            "--seed", 5)
    assert r.returncode == 0, r.stderr
    want = api(do_sample=True, num_return_sequences=2, seed=5)
    assert r.stdout.count("--- sequence ") == 2 and all(w in r.stdout for w in want)
    for args, match in ((("--num-return-sequences", 2), "num-return-sequences"), (("--min-p", -1), "min-p"),
                        (("--no-repeat-ngram-size", -1), "no-repeat-ngram-size"), (("--seed", -1), "seed")):
        r = run("generate", "--prompt", "x", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and match in r.stderr.splitlines()[-1], r.stderr
