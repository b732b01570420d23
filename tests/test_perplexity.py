"""`gemma2np perplexity`: windows, perplexity and KL divergence recomputed from the public API
(`model(input_ids=..., labels=...)`), the data-parallel seam, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gemma2np import Gemma2Config, Gemma2ForCausalLM, GemmaTokenizer
from gemma2np.cli import main as cli_main
from gemma2np.perplexity import PerplexityError, make_windows, score_windows, summarize

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "gemma2np" / "data" / "gemma2-shakespeare"
# public-domain verse (Sonnet 18), enough for a few 32-token windows
TEXT = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


@pytest.fixture(scope="module")
def model():
    return Gemma2ForCausalLM.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def ids():
    return GemmaTokenizer.from_pretrained(MODEL).encode(TEXT, add_special_tokens=False)


def test_windows_are_bos_plus_consecutive_non_overlapping_text():
    w = make_windows(list(range(10, 33)), ctx=5, bos_id=2)
    assert w.shape == (5, 5)  # 23 tokens // 4 = 5 windows, 3 tokens dropped
    assert (w[:, 0] == 2).all()
    assert w[:, 1:].ravel().tolist() == list(range(10, 30))
    assert make_windows(list(range(10, 33)), ctx=5, bos_id=2, max_windows=2).shape == (2, 5)
    with pytest.raises(PerplexityError, match="at least 2"):
        make_windows([1, 2, 3], ctx=1, bos_id=2)
    with pytest.raises(PerplexityError, match="fewer than the 9"):
        make_windows([1, 2, 3], ctx=10, bos_id=2)
    with pytest.raises(PerplexityError, match="--max-windows"):
        make_windows([1, 2, 3], ctx=2, bos_id=2, max_windows=0)


def test_perplexity_is_exp_of_transformers_loss_from_the_api(model, ids):
    windows = make_windows(ids, ctx=32, bos_id=2)
    assert len(windows) >= 4
    res = summarize(score_windows(model, windows), ctx=32)
    # labels=input_ids: transformers' mean NLL over the 31 scored positions of each window
    losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert res["tokens_scored"] == 31 * len(windows) and res["windows"] == len(windows)
    assert res["perplexity"] == pytest.approx(float(np.exp(np.mean(losses))), rel=1e-6)


def test_kld_and_top1_recomputed_from_the_api(model, ids):
    windows = make_windows(ids, ctx=32, bos_id=2, max_windows=3)
    # the reference: a randomly perturbed copy of the model (a stand-in for a differently quantized port)
    rng = np.random.default_rng(0)
    state = {k: np.asarray(v, np.float32) for k, v in model.state_dict().items()}
    state = {k: v + rng.normal(0, 0.02, v.shape).astype(np.float32) if v.ndim == 2 else v for k, v in state.items()}
    other = Gemma2ForCausalLM(model.config, state)
    res = summarize(score_windows(model, windows, reference=other), ctx=32)
    kl, agree, ref_losses = [], [], []
    for w in windows:
        p = model(input_ids=w[None]).logits[0, :-1].astype(np.float64)
        q = other(input_ids=w[None]).logits[0, :-1].astype(np.float64)
        ps = np.exp(p - p.max(-1, keepdims=True)); ps /= ps.sum(-1, keepdims=True)
        qs = np.exp(q - q.max(-1, keepdims=True)); qs /= qs.sum(-1, keepdims=True)
        kl.extend(np.sum(qs * np.log(qs / ps), axis=-1))  # KL(P_ref || P_model)
        agree.extend(p.argmax(-1) == q.argmax(-1))
        ref_losses.append(float(other(input_ids=w[None], labels=w[None]).loss))
    kl = np.asarray(kl)
    assert res["kld_mean"] == pytest.approx(kl.mean(), rel=1e-6)
    assert res["kld_max"] == pytest.approx(kl.max(), rel=1e-6)
    assert res["kld_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-6)
    assert res["top1"] == pytest.approx(np.mean(agree))
    assert res["perplexity_against"] == pytest.approx(np.exp(np.mean(ref_losses)), rel=1e-6)
    assert 0 < res["kld_mean"] and res["top1"] < 1  # the perturbation is visible


def test_against_itself_is_zero_and_the_window_split_is_exact(model, ids):
    windows = make_windows(ids, ctx=16, bos_id=2)
    whole = score_windows(model, windows, reference=model)
    res = summarize(whole, ctx=16)
    assert res["kld_max"] == 0.0 and res["top1"] == 1.0 and res["perplexity_against"] == res["perplexity"]
    # the data-parallel seam: scoring shares of the window list and concatenating gives the same figures
    parts = score_windows(model, windows[:3], reference=model) + score_windows(model, windows[3:], reference=model)
    assert summarize(parts, ctx=16) == res


def test_cli_json_and_against_float32(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "p.json"
    assert cli_main(["perplexity", "--text", str(text), "--ctx", "32", "--max-windows", "2", "--dtype", "float64",
                     "--against", "float32", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"perplexity", "tokens_scored", "windows", "ctx", "kld_mean", "kld_p99", "kld_max", "top1",
            "perplexity_against"} <= set(res)
    assert res["windows"] == 2 and res["tokens_scored"] == 62 and res["ctx"] == 32
    assert 0 < res["kld_max"] < 1e-6  # float64 vs float32 of the same weights
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "KLD mean" in printed


@pytest.mark.parametrize("args, message", [
    (["--ctx", "100000"], "exceeds the model's context"),
    (["--ctx", "1"], "at least 2"),
    (["--ctx", "1000"], "fewer than"),
    (["--ctx", "32", "--against", "/no/such/dir"], "model directory not found"),
    (["--ctx", "32", "--model", "/no/such.gguf"], "no such file"),
])
def test_cli_errors_are_exit_2_with_one_line(tmp_path, capsys, args, message):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert cli_main(["perplexity", "--text", str(text), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_vocabulary_mismatch(tmp_path, capsys):
    cfg = Gemma2Config(vocab_size=5000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=64)
    d = tmp_path / "other"
    Gemma2ForCausalLM.from_config(cfg, seed=0).save_pretrained(d)
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert cli_main(["perplexity", "--text", str(text), "--ctx", "32", "--against", str(d)]) == 2
    assert "same vocabulary" in capsys.readouterr().err


def test_cli_gguf_model_against_its_source_directory(tmp_path, capsys):
    """--model X.gguf (tokenizer.model beside it): an F32 GGUF of the bundled model scores exactly like it."""
    import shutil
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from test_gguf import write_gguf

    model = Gemma2ForCausalLM.from_pretrained(MODEL)
    write_gguf(tmp_path / "m.gguf", model.config, {k: np.asarray(v, np.float32) for k, v in model.state_dict().items()})
    shutil.copyfile(MODEL / "tokenizer.model", tmp_path / "tokenizer.model")
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "p.json"
    assert cli_main(["perplexity", "--model", str(tmp_path / "m.gguf"), "--text", str(text), "--ctx", "32",
                     "--against", str(MODEL), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["kld_max"] == 0.0 and res["perplexity"] == res["perplexity_against"]
