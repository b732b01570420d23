"""Parsing llama.cpp's own verification output (gemma2np.llamacpp_log): the logs and logits files in
tests/data/llamacpp/ were written by a real llama.cpp build (scripts/make_llamacpp_fixtures.py,
fixtures.json names the commit); broken variants are cut from them here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gemma2np import GemmaTokenizer
from gemma2np.llamacpp_log import LlamaCppLogError, corner_indices, parse_log, read_log, read_logits

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "llamacpp"
MODEL = ROOT / "gemma2np" / "data" / "gemma2-shakespeare"
EVAL_LOG = DATA / "eval-callback-f32.log"
DEBUG_LOG = DATA / "llama-debug-verbose-f32.log"
LOGITS = DATA / "llamacpp-shakespeare-f32.bin"


def prompt_ids():
    info = json.loads((DATA / "fixtures.json").read_text())
    return GemmaTokenizer.from_pretrained(MODEL)(info["prompt"])["input_ids"]


def test_fixtures_record_the_llama_cpp_commit():
    info = json.loads((DATA / "fixtures.json").read_text())
    assert len(info["llama_cpp_commit"]) == 40
    for name in info["files"]:
        assert (DATA / name).is_file(), name


def test_eval_callback_log_tokens_and_entries():
    log = read_log(EVAL_LOG)
    assert log.token_ids == prompt_ids()  # llama.cpp's tokenizer and ours agree on the prompt
    assert len(log.evaluations) == 1
    ev = log.evaluation()
    first = ev[0]
    assert (first.name, first.op, first.type, first.ne) == ("embd", "GET_ROWS", "f32", (256, 8, 1, 1))
    assert (first.src0, first.src0_ne, first.src1, first.src1_ne) == ("token_embd.weight", (256, 4096, 1, 1),
                                                                     "inp_tokens", (8, 1, 1, 1))
    assert first.values.shape == (6 * 6,)  # ne0 = 256 and ne1 = 8 are cut to 3 + 3 corners each
    assert ev[-1].name == "result_output" and ev[-1].ne == (4096, 1, 1, 1) and ev[-1].values.size == 6
    names = [t.name for t in ev]
    assert names.count("norm-0") == 4 - 1  # attn_norm, attn_post_norm, ffn_norm: ffn_post_norm's is plain "norm"
    assert "node_7 (view) (permuted)" in names  # view names with spaces survive
    # unary-source header: "SCALE(embd{256, 8, 1, 1}, })"
    scaled = next(t for t in ev if t.name == "inp_scaled")
    assert scaled.src1 is None and scaled.src0 == "embd"
    assert np.isfinite(scaled.sum)


def test_llama_debug_log_warmup_is_a_separate_evaluation():
    log = read_log(DEBUG_LOG)  # llama-debug --verbose: warm-up on <bos><eos> first, "Token ids (8):" listing
    assert log.token_ids == prompt_ids()
    assert len(log.evaluations) == 2
    warm = next(t for t in log.evaluations[0] if t.name == "inp_scaled")
    assert warm.ne[1] == 2
    assert log.evaluation() is log.evaluations[1]


def test_corner_indices():
    assert corner_indices(6).tolist() == [0, 1, 2, 3, 4, 5]
    assert corner_indices(7).tolist() == [0, 1, 2, 4, 5, 6]
    assert corner_indices(1).tolist() == [0]


SYNTH = """\
number of input tokens = 2
0.00.1 I   2
0.00.1 I   7
ggml_debug:                   x-0 (view) (permuted) = (f32)    PERMUTE(x-0 (view){2, 1, 1, 1}, }) = {2, 1, 1, 1}
    [
        [
            [         nan,        -inf  ],
        ],
    ]
    sum = nan
common_debug_cb_eval:                   q = (q8_0)    MUL_MAT(a{2, 1, 1, 1}, b{2, 1, 1, 1}}) = {2, 1, 1, 1}
"""


def test_older_prefix_nonfinite_values_and_quantized_nodes():
    log = parse_log(SYNTH)
    assert log.token_ids == [2, 7]
    a, q = log.tensors
    assert a.name == "x-0 (view) (permuted)" and np.isnan(a.values[0]) and a.values[1] == -np.inf
    assert np.isnan(a.sum)
    assert q.values is None and q.sum is None and (q.src0, q.src1) == ("a", "b")  # quantized: no values printed


def _lines():
    return EVAL_LOG.read_text().splitlines(keepends=True)


@pytest.mark.parametrize("cut", ["mid_values", "mid_line", "header_only"])
def test_truncated_logs_are_errors(tmp_path, cut):
    lines = _lines()
    k = next(i for i, l in enumerate(lines) if "ffn_up-1 " in l)
    if cut == "mid_values":
        text = "".join(lines[: k + 3])
    elif cut == "mid_line":
        text = "".join(lines[: k + 3]) + lines[k + 3][:30]
    else:
        text = "".join(lines[: k + 1])
    with pytest.raises(LlamaCppLogError, match="truncated"):
        parse_log(text)


def test_malformed_entries_are_errors():
    lines = _lines()
    k = next(i for i, l in enumerate(lines) if "attn_norm-0 " in l)
    dropped = "".join(lines[: k + 3] + lines[k + 4:])  # one row of values missing
    with pytest.raises(LlamaCppLogError, match="should print 36 values, the log has 30"):
        parse_log(dropped)
    garbage = "".join(lines[: k + 3] + ["warning: something else\n"] + lines[k + 3:])
    with pytest.raises(LlamaCppLogError, match="unexpected text inside the values of 'attn_norm-0'"):
        parse_log(garbage)
    bad_ne = "".join(lines).replace("= {256, 8, 1, 1}", "= {256, 8, 1}", 1)
    with pytest.raises(LlamaCppLogError, match="4 non-negative ggml dimensions"):
        parse_log(bad_ne)


def test_log_without_tokens_or_tensors(tmp_path):
    no_ids = "".join(l for l in _lines() if " I   " not in l and "number of input tokens" not in l)
    log = parse_log(no_ids)
    with pytest.raises(LlamaCppLogError, match="2>&1"):
        log.evaluation()
    with pytest.raises(LlamaCppLogError, match="no tensors"):
        parse_log("llama.cpp said nothing useful\n")
    with pytest.raises(LlamaCppLogError, match="no such file"):
        read_log(tmp_path / "missing.log")
    b = tmp_path / "binary.log"
    b.write_bytes(b"\x00\x01\x02")
    with pytest.raises(LlamaCppLogError, match="binary"):
        read_log(b)


def test_token_count_must_match_an_evaluation():
    text = EVAL_LOG.read_text().replace("number of input tokens = 8", "number of input tokens = 7", 1)
    with pytest.raises(LlamaCppLogError, match="lists 7 token ids but its 1 graph evaluation"):
        parse_log(text).evaluation()


def test_read_logits_and_bad_files(tmp_path):
    logits, ids = read_logits(LOGITS, 4096)
    assert logits.dtype == np.float32 and logits.shape == (4096,) and np.isfinite(logits).all()
    assert ids.tolist() == prompt_ids()
    with pytest.raises(LlamaCppLogError, match="4096 float32 values, the model's vocabulary has 1000"):
        read_logits(LOGITS, 1000)
    cut = tmp_path / "llamacpp-x.bin"
    cut.write_bytes(LOGITS.read_bytes()[:-2])
    (tmp_path / "llamacpp-x-tokens.bin").write_bytes((DATA / "llamacpp-shakespeare-f32-tokens.bin").read_bytes())
    with pytest.raises(LlamaCppLogError, match="not a whole number of float32"):
        read_logits(cut, 4096)
    alone = tmp_path / "llamacpp-y.bin"
    alone.write_bytes(LOGITS.read_bytes())
    with pytest.raises(LlamaCppLogError, match="-tokens.bin: no such file"):
        read_logits(alone, 4096)
    bad_ids = tmp_path / "llamacpp-z.bin"
    bad_ids.write_bytes(LOGITS.read_bytes())
    (tmp_path / "llamacpp-z-tokens.bin").write_bytes(np.array([2, 5000], np.int32).tobytes())
    with pytest.raises(LlamaCppLogError, match="outside the vocabulary"):
        read_logits(bad_ids, 4096)
