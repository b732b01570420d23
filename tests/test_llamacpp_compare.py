"""`gemma2np compare --llamacpp-log / --llamacpp-logits` on real llama.cpp output (tests/data/llamacpp/,
made by scripts/make_llamacpp_fixtures.py): a correct run passes, the broken GGUF (attention norms stored
as w instead of 1 + w) fails first at attn_norm-0, bad files are exit status 2 with one line."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from gemma2np import Gemma2Config, Gemma2ForCausalLM
from gemma2np.compare import main as compare_main
from gemma2np.llamacpp_compare import DEFAULT_LOG_ATOL, DEFAULT_LOG_RTOL, PRINT_HALF_UNIT, compare_llamacpp_log
from gemma2np.llamacpp_log import LlamaCppLogError, corner_indices, read_log

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "llamacpp"
MODEL = ROOT / "gemma2np" / "data" / "gemma2-shakespeare"


@pytest.fixture(scope="module")
def model():
    return Gemma2ForCausalLM.from_pretrained(MODEL)


def run(argv, capsys=None):
    return compare_main([str(a) for a in argv])


def test_correct_log_passes_and_every_named_tensor_is_compared(model, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert run(["--model", MODEL, "--llamacpp-log", DATA / "eval-callback-f32.log", "--json", out]) == 0
    text = capsys.readouterr().out
    assert "OK: all 106 compared llama.cpp tensors within tolerance" in text
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["first_divergence"] is None
    compared = {(e["name"], e["op"]) for e in rep["compared"]}
    L = model.config.num_hidden_layers
    for il in range(L):
        for name in ("attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_post_norm", "sa_out", "ffn_norm",
                     "ffn_gate", "ffn_up", "ffn_geglu", "ffn_out", "l_out", "norm"):
            assert any(n == f"{name}-{il}" for n, _ in compared), f"{name}-{il}"
    assert ("Qcur-0", "ROPE") in compared and ("Qcur-0", "MUL_MAT") not in compared  # post-RoPE only
    for name in ("inp_scaled", "embd", "result_norm", "result_output", "ffn_post_norm", "norm"):
        assert any(n == name for n, _ in compared), name
    targets = {e["target"] for e in rep["compared"]}
    assert {"layers.3.attn_out", "logits_raw", "logits", "layers.3.post_ffn_norm"} <= targets
    # the unnamed o_proj product and the lm head are placed by their weights
    assert any(e["name"].startswith("node_") and e["target"] == "layers.0.attn_out" for e in rep["compared"])
    # last-row-only layout: llama.cpp computes the last layer after attention for the output token only
    last = {e["name"]: e for e in rep["compared"] if e["line"] > 2990}
    assert last["sa_out-3"]["positions"] == "rows 7" and last["sa_out-3"]["ne"] == [256, 1, 1, 1]
    reasons = {s["reason"] for s in rep["skipped"]}
    assert any("before RoPE" in r for r in reasons) and "KV cache" in reasons


def test_flash_attention_off_log_compares_the_attention_probabilities(model):
    rep = compare_llamacpp_log(model, read_log(DATA / "eval-callback-f32-fa-off.log"))
    assert rep.ok, rep.format_table()
    names = {e.name: e for e in rep.entries}
    for il in range(4):
        assert names[f"kq_soft_max-{il}"].target == f"layers.{il}.attn_probs"
        assert f"kq-{il}" in names and f"kq_tanh-{il}" in names and f"kqv-{il}" in names
    # padded KV cells: 256 columns, the 8 real keys first; the masked cells are exactly 0 on both sides
    assert names["kq_soft_max-0"].ne == (256, 8, 4, 1)
    assert names["kq-0"].sum_ours is None  # padding cells of kq are not derivable: sum not checked


def test_llama_debug_log_with_warmup(model, capsys):
    assert run(["--model", MODEL, "--llamacpp-log", DATA / "llama-debug-verbose-f32.log"]) == 0
    assert "2 graph evaluations" in capsys.readouterr().out


def test_broken_gguf_log_names_the_first_wrong_tensor(model, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert run(["--model", MODEL, "--llamacpp-log", DATA / "eval-callback-broken-attn-norm.log", "--json", out]) == 1
    text = capsys.readouterr().out
    assert "DIVERGED: first divergence at attn_norm-0 (log line 53, MUL; gemma2np layers.0.input_norm)" in text
    rep = json.loads(out.read_text())
    assert rep["first_divergence"]["name"] == "attn_norm-0"
    by_line = {e["line"]: e for e in rep["compared"]}
    ok_before = [e for e in rep["compared"] if e["line"] < 53]
    assert [e["name"] for e in ok_before] == ["embd", "inp_scaled", "norm-0"] and all(e["ok"] for e in ok_before)
    assert by_line[53]["worst"] > 100


def test_tolerance_formula_is_what_the_docs_say(model):
    base = read_log(DATA / "eval-callback-f32.log")
    ours = compare_llamacpp_log(model, base, atol=0.0, rtol=0.0)
    # with the printed values replaced by ours rounded to 4 decimals, even atol = rtol = 0 must pass
    # every value check (|x - round(x)| <= 0.5e-4); moving one value just past the bound must fail
    from gemma2np.intermediates import run_with_intermediates

    rec = run_with_intermediates(model, np.asarray([base.token_ids]))
    x = rec["layers.0.input_norm"][0].astype(np.float64)  # (T, E) = ggml ne [E, T]
    corner = x[np.ix_(corner_indices(8), corner_indices(256))].ravel()
    for delta, ok in ((0.0, True), (0.9, True), (1.1, False)):
        log = copy.deepcopy(base)
        t = next(t for t in log.evaluation() if t.name == "attn_norm-0")
        t.values = np.round(corner, 4)
        tol = PRINT_HALF_UNIT + DEFAULT_LOG_ATOL + DEFAULT_LOG_RTOL * abs(t.values[5])
        t.values[5] = corner[5] + delta * tol * (1 - 1e-9 if ok else 1)
        t.sum = float(np.sum(x))
        rep = compare_llamacpp_log(model, log)
        e = next(e for e in rep.entries if e.name == "attn_norm-0")
        assert e.ok is ok, (delta, e)
    # the sum: N * atol + rtol * sum|x| + 2^-24 * sum_k |S_k| + 0.5e-6
    g = x.ravel()
    sum_tol = g.size * DEFAULT_LOG_ATOL + DEFAULT_LOG_RTOL * np.abs(g).sum() + 2.0 ** -24 * np.abs(np.cumsum(g)).sum() \
        + 0.5e-6
    for factor, ok in ((0.99, True), (1.01, False)):
        log = copy.deepcopy(base)
        t = next(t for t in log.evaluation() if t.name == "attn_norm-0")
        t.values = np.round(corner, 4)
        t.sum = float(g.sum() + factor * sum_tol)
        e = next(e for e in compare_llamacpp_log(model, log).entries if e.name == "attn_norm-0")
        assert e.ok is ok and e.sum_tol == pytest.approx(sum_tol, rel=1e-12)
    assert ours.entries  # atol = rtol = 0 still compares


def test_nan_in_the_log_is_a_divergence(model):
    log = read_log(DATA / "eval-callback-f32.log")
    t = next(t for t in log.evaluation() if t.name == "ffn_up-1")
    t.values = t.values.copy()
    t.values[0] = np.nan
    rep = compare_llamacpp_log(model, log)
    assert rep.first_divergence.name == "ffn_up-1"


def test_log_of_another_model_is_exit_2(tmp_path, capsys):
    cfg = Gemma2Config(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    d = tmp_path / "other"
    Gemma2ForCausalLM.from_config(cfg, seed=0).save_pretrained(d)
    assert run(["--model", d, "--llamacpp-log", DATA / "eval-callback-f32.log"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model" in err[0]


@pytest.mark.parametrize("kind", ["cut_values", "cut_after_a_sum", "no_tokens", "missing"])
def test_bad_logs_are_exit_2_with_one_line(tmp_path, capsys, kind):
    lines = (DATA / "eval-callback-f32.log").read_text().splitlines(keepends=True)
    k = next(i for i, l in enumerate(lines) if "result_norm " in l)
    path = tmp_path / "bad.log"
    if kind == "cut_values":  # what llama.cpp's unflushed logger often leaves
        path.write_text("".join(lines[: k + 3]))
        want = "truncated"
    elif kind == "cut_after_a_sum":
        path.write_text("".join(lines[: k + 7]))  # header, 5 value lines, sum
        want = "without result_output"
    elif kind == "no_tokens":
        path.write_text("".join(l for l in lines if " I   " not in l and "number of input tokens" not in l))
        want = "no token ids"
    else:
        want = "no such file"
    assert run(["--model", MODEL, "--llamacpp-log", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err


def test_logits_file(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert run(["--model", MODEL, "--llamacpp-logits", DATA / "llamacpp-shakespeare-f32.bin", "--json", out]) == 0
    rep = json.loads(out.read_text())
    (t,) = rep["tensors"]
    assert t["name"] == "result_output" and t["positions"] == "last 1" and t["top1"] == 1.0
    assert (rep["atol"], rep["rtol"]) == (DEFAULT_LOG_ATOL, DEFAULT_LOG_RTOL)
    capsys.readouterr()
    # a port whose argmax logit is off by 0.05 fails
    logits = np.fromfile(DATA / "llamacpp-shakespeare-f32.bin", dtype=np.float32)
    logits[np.argmax(logits)] += 0.05
    bad = tmp_path / "llamacpp-bad.bin"
    logits.tofile(bad)
    (tmp_path / "llamacpp-bad-tokens.bin").write_bytes((DATA / "llamacpp-shakespeare-f32-tokens.bin").read_bytes())
    assert run(["--model", MODEL, "--llamacpp-logits", bad]) == 1
    capsys.readouterr()
    (tmp_path / "llamacpp-bad-tokens.bin").unlink()
    assert run(["--model", MODEL, "--llamacpp-logits", bad]) == 2
    assert "-tokens.bin: no such file" in capsys.readouterr().err


def test_gguf_model_runs_what_llama_cpp_ran(tmp_path, capsys):
    """--model X.gguf: gemma2np on the broken GGUF computes what llama.cpp computed from it (the log passes),
    so the divergence above is the file's, not llama.cpp's arithmetic."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_gguf import write_gguf

    model = Gemma2ForCausalLM.from_pretrained(MODEL)
    state = {k: np.asarray(v, dtype=np.float32) for k, v in model.state_dict().items()}
    for k in state:  # stored as w instead of 1 + w: write_gguf adds 1, so hand it w - 1
        if k.endswith("input_layernorm.weight"):
            state[k] = state[k] - np.float32(1.0)
    path = tmp_path / "broken.gguf"
    write_gguf(path, model.config, state)
    log = DATA / "eval-callback-broken-attn-norm.log"
    # the broken model's activations are far off the trained distribution (|x| ~ 100), where llama.cpp's
    # F16 flash-attention K/V cost up to ~1.6e-3: 3e-3 is still rounding-level here ...
    tol = ["--atol", "3e-3", "--rtol", "3e-3"]
    assert run(["--model", path, "--llamacpp-log", log, *tol]) == 0, capsys.readouterr().out[-2000:]
    capsys.readouterr()
    # ... and the same tolerance against the real checkpoint still points at the wrong norm
    assert run(["--model", MODEL, "--llamacpp-log", log, *tol]) == 1
    assert "first divergence at attn_norm-0" in capsys.readouterr().out


def test_corrupt_shapes_are_errors_not_garbage(model):
    log = read_log(DATA / "eval-callback-f32.log")
    t = next(t for t in log.evaluation() if t.name == "l_out-3")
    t.ne = (256, 9, 1, 1)  # more rows than the 8 logged tokens
    with pytest.raises(LlamaCppLogError, match="9 token rows, but the log lists 8 tokens"):
        compare_llamacpp_log(model, log)
    log = read_log(DATA / "eval-callback-f32-fa-off.log")
    t = next(t for t in log.evaluation() if t.name == "kq_soft_max-0")
    t.ne = (10 ** 9, 8, 4, 1)
    with pytest.raises(LlamaCppLogError, match="implausible"):
        compare_llamacpp_log(model, log)


def test_randomly_damaged_logs_give_a_report_or_a_typed_error(model):
    """Deleted, duplicated or garbled lines anywhere: never a foreign exception."""
    from gemma2np.llamacpp_log import parse_log

    lines = (DATA / "eval-callback-f32-fa-off.log").read_text().splitlines(keepends=True)
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(40):
        damaged = list(lines)
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(0, len(damaged)))
            action = rng.integers(0, 3)
            if action == 0:
                del damaged[k]
            elif action == 1:
                damaged.insert(k, damaged[k])
            else:
                line = damaged[k]
                j = int(rng.integers(0, max(len(line) - 1, 1)))
                damaged[k] = line[:j] + "#{-9,}"[int(rng.integers(0, 6))] + line[j + 1:]
        try:
            rep = compare_llamacpp_log(model, parse_log("".join(damaged)))
            outcomes.add("ok" if rep.ok else "diverged")
        except LlamaCppLogError:
            outcomes.add("error")
    assert "error" in outcomes  # most damage is detected as such
