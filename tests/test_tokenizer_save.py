"""GemmaTokenizer.save_pretrained writes what from_pretrained (ours, and transformers') reads back."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gemma2np import GemmaTokenizer
from gemma2np.tokenizer import TokenizerError
from gemma2np.cli import DEFAULT_MODEL_DIR

TESTS = Path(__file__).resolve().parent
SOURCES = [TESTS / "data" / "tokenizer"] + ([Path(DEFAULT_MODEL_DIR)] if (Path(DEFAULT_MODEL_DIR) / "tokenizer.model").is_file() else [])
TEXTS = ["Hello world", "ROMEO:\nWherefore art thou?", "  two  spaces\tand a tab", "naïve café — 日本語 🎭",
         "<start_of_turn>user\nhi<end_of_turn>\n", "<bos>already<eos>", ""]


def _same_behaviour(a: GemmaTokenizer, b: GemmaTokenizer) -> None:
    assert len(a) == len(b) and a.get_vocab() == b.get_vocab()
    assert a.all_special_tokens == b.all_special_tokens and a.all_special_ids == b.all_special_ids
    assert a.added_tokens_decoder == b.added_tokens_decoder
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "add_bos_token", "add_eos_token",
                 "padding_side", "truncation_side", "model_max_length", "chat_template"):
        assert getattr(a, name) == getattr(b, name), name
    for t in TEXTS:
        ids = a(t)["input_ids"]
        assert b(t)["input_ids"] == ids, t
        assert b.decode(ids) == a.decode(ids) and b.decode(ids, skip_special_tokens=True) == a.decode(
            ids, skip_special_tokens=True)
    ba, bb = a(TEXTS[:3], padding=True), b(TEXTS[:3], padding=True)
    np.testing.assert_array_equal(ba["input_ids"], bb["input_ids"])
    np.testing.assert_array_equal(ba["attention_mask"], bb["attention_mask"])
    if a.chat_template is not None:
        conv = [{"role": "user", "content": "Who art thou?"}]
        assert a.apply_chat_template(conv, add_generation_prompt=True, return_dict=False) == \
            b.apply_chat_template(conv, add_generation_prompt=True, return_dict=False)


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_round_trip(src, tmp_path):
    tok = GemmaTokenizer.from_pretrained(src)
    written = tok.save_pretrained(tmp_path / "out")
    names = sorted(Path(p).name for p in written)
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= set(names)
    assert ("chat_template.jinja" in names) == (tok.chat_template is not None)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    _same_behaviour(tok, GemmaTokenizer.from_pretrained(tmp_path / "out"))


def test_changed_settings_are_saved(tmp_path):
    tok = GemmaTokenizer.from_pretrained(SOURCES[0])
    tok.padding_side, tok.add_eos_token, tok.model_max_length = "right", True, 77
    tok.save_pretrained(tmp_path)
    back = GemmaTokenizer.from_pretrained(tmp_path)
    assert (back.padding_side, back.add_eos_token, back.model_max_length) == ("right", True, 77)
    assert back("x")["input_ids"][-1] == back.convert_tokens_to_ids("<eos>")
    _same_behaviour(tok, back)


def test_save_into_its_own_directory_and_errors(tmp_path):
    d = tmp_path / "own"
    shutil.copytree(SOURCES[-1], d)
    tok = GemmaTokenizer.from_pretrained(d)
    before = (d / "tokenizer.model").read_bytes()
    tok.save_pretrained(d)  # tokenizer.model is the file it was loaded from: left as it is
    assert (d / "tokenizer.model").read_bytes() == before
    _same_behaviour(tok, GemmaTokenizer.from_pretrained(d))
    # a template saved earlier does not survive a save without one
    tok.chat_template = None
    tok.save_pretrained(d)
    assert not (d / "chat_template.jinja").exists()
    assert GemmaTokenizer.from_pretrained(d).chat_template is None
    assert "chat_template" not in json.loads((d / "tokenizer_config.json").read_text())
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(TokenizerError, match="is a file"):
        tok.save_pretrained(f)


@pytest.mark.torch
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_transformers_reads_what_we_save(src, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = GemmaTokenizer.from_pretrained(src)
    tok.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for t in TEXTS:
        assert theirs(t)["input_ids"] == tok(t)["input_ids"], t
    if tok.chat_template is not None:
        conv = [{"role": "user", "content": "Who art thou?"}]
        assert theirs.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) == \
            tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
