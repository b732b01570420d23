#!/usr/bin/env python
"""Train a small sentencepiece tokenizer shaped like Gemma 2's.

    python scripts/train_tokenizer.py --vocab-size 1500 --out tests/data/tokenizer corpus1.txt corpus2.txt

or from Python::

    from scripts.train_tokenizer import train_gemma_style_tokenizer
    train_gemma_style_tokenizer(["a.txt", "b.txt"], 1500, "out_dir")
    train_gemma_style_tokenizer(iter(["line one", "line two"]), 1500, "out_dir")

The model is BPE with byte fallback, split digits, no dummy prefix, whitespace kept
verbatim (identity normalization, no whitespace collapsing), and the special pieces at
Gemma 2's ids:

    0 <pad>  1 <eos>  2 <bos>  3 <unk>  4 <mask>  5 <2mass>  6 [@BOS@]
    7..105 <unused0>..<unused98>  106 <start_of_turn>  107 <end_of_turn>

(ids 4..107 are USER_DEFINED pieces, so sentencepiece itself matches them in raw text,
like Gemma's own tokenizer.model; 0..2 are CONTROL, 3 is UNKNOWN). The 256 byte pieces
<0x00>..<0xFF> follow at 108..363, then the learned merges.

Writes ``tokenizer.model``, ``tokenizer_config.json`` (Gemma-2-it style, including the
chat template) and ``special_tokens_map.json`` into ``out_dir``. Only needs sentencepiece.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Iterable, Iterator, Sequence

GEMMA_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3
# ids 4..107 (the real Gemma 2 vocabulary: <mask>, <2mass>, [@BOS@], 99 unused, turn markers)
GEMMA_USER_DEFINED = (
    ["<mask>", "<2mass>", "[@BOS@]"]
    + [f"<unused{i}>" for i in range(99)]
    + ["<start_of_turn>", "<end_of_turn>"]
)
N_SPECIAL = len(GEMMA_CONTROL) + len(GEMMA_USER_DEFINED)  # 108
BYTE_OFFSET = N_SPECIAL  # <0x00> is at id 108
MIN_VOCAB_SIZE = N_SPECIAL + 256 + 1

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gemma2np.chat import GEMMA2_CHAT_TEMPLATE  # noqa: E402  (single source of the template string)


def _added_tokens_decoder() -> dict:
    """Like Gemma 2's tokenizer_config.json: 0..3 and the turn markers are special."""
    out = {}
    pieces = GEMMA_CONTROL + GEMMA_USER_DEFINED
    for i, p in enumerate(pieces):
        special = i < 4 or p in ("<start_of_turn>", "<end_of_turn>")
        out[str(i)] = {
            "content": p,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    return out


def tokenizer_config(model_max_length: int = 8192) -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(),
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": "<bos>",
        "chat_template": GEMMA2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": model_max_length,
        "pad_token": "<pad>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def special_tokens_map() -> dict:
    tok = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": tok("<bos>"),
        "eos_token": tok("<eos>"),
        "pad_token": tok("<pad>"),
        "unk_token": tok("<unk>"),
    }


def _sentences(text_files_or_iterator) -> Iterator[str]:
    if isinstance(text_files_or_iterator, (str, os.PathLike)):
        text_files_or_iterator = [text_files_or_iterator]
    for item in text_files_or_iterator:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and os.path.isfile(item)):
            with open(item, encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.rstrip("\n")
                    if line:
                        yield line
        elif isinstance(item, str):
            for line in item.split("\n"):
                if line:
                    yield line
        else:
            raise TypeError(f"expected file paths or strings, got {type(item).__name__}")


def verify_gemma_layout(model_file: str) -> None:
    """Raise AssertionError unless the special pieces sit at Gemma's ids with the right types."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    T = pb.ModelProto.SentencePiece
    for i, p in enumerate(GEMMA_CONTROL):
        want = T.UNKNOWN if p == "<unk>" else T.CONTROL
        assert proto.pieces[i].piece == p and proto.pieces[i].type == want, (i, proto.pieces[i])
    for j, p in enumerate(GEMMA_USER_DEFINED):
        i = 4 + j
        assert proto.pieces[i].piece == p and proto.pieces[i].type == T.USER_DEFINED, (i, proto.pieces[i])
    for b in range(256):
        pc = proto.pieces[BYTE_OFFSET + b]
        assert pc.piece == f"<0x{b:02X}>" and pc.type == T.BYTE, (BYTE_OFFSET + b, pc)
    ts = proto.trainer_spec
    ns = proto.normalizer_spec
    assert ts.model_type == pb.TrainerSpec.BPE and ts.byte_fallback and ts.split_digits
    assert not ns.add_dummy_prefix and not ns.remove_extra_whitespaces and ns.name == "identity"
    sp = spm.SentencePieceProcessor(model_file=model_file)
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.encode("<start_of_turn>user\n") [0] == 106


def train_gemma_style_tokenizer(
    text_files_or_iterator: Iterable | str,
    vocab_size: int,
    out_dir: str,
    *,
    model_max_length: int = 8192,
    character_coverage: float = 1.0,
    input_sentence_size: int = 2_000_000,
    seed_sentencepiece_size: int = 1_000_000,
    num_threads: int = 1,
) -> str:
    """Train a Gemma-2-shaped sentencepiece BPE model; return the tokenizer.model path.

    text_files_or_iterator: a path, a list of paths, or an iterable of text strings
    (strings that are not existing files are treated as text; multi-line strings are
    split into lines).
    vocab_size: total size including the 108 special pieces and the 256 byte pieces.
    """
    import sentencepiece as spm

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (108 special + 256 byte pieces + 1)")
    os.makedirs(out_dir, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(text_files_or_iterator),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_number=True,
        split_by_whitespace=True,
        treat_whitespace_as_suffix=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=character_coverage,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        unk_surface=" \u2047 ",
        user_defined_symbols=GEMMA_USER_DEFINED,
        max_sentence_length=16384,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=num_threads,
        minloglevel=2,
    )
    model_file = os.path.join(out_dir, "tokenizer.model")
    with open(model_file, "wb") as f:
        f.write(buf.getvalue())
    verify_gemma_layout(model_file)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(model_max_length), f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_tokens_map(), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return model_file


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="UTF-8 text files")
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--model-max-length", type=int, default=8192)
    a = ap.parse_args(argv)
    path = train_gemma_style_tokenizer(a.inputs, a.vocab_size, a.out, model_max_length=a.model_max_length)
    import sentencepiece as spm

    print(f"wrote {path} (vocab {spm.SentencePieceProcessor(model_file=path).get_piece_size()})")


if __name__ == "__main__":
    main()
