"""Gemma tokenizer: sentencepiece model + transformers' GemmaTokenizer behaviour.

    tok = GemmaTokenizer.from_pretrained("path/to/dir")     # tokenizer.model (+ tokenizer_config.json)
    tok.encode("Hello")                                     # [2, ...]  (<bos> first, like transformers)
    tok(["a", "longer text"], padding=True)                 # {"input_ids": int64 (2, T), "attention_mask": ...}
    tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

Behaviour copied from transformers 5.x GemmaTokenizer (checked against goldens in
reference_outputs/tokenizer/):

* Encoding: the text is first split around *added tokens* (every control / user-defined
  piece of the model: <pad> <eos> <bos> <unk> <mask> <unusedN> <start_of_turn> ... and any
  entry of tokenizer_config.json's added_tokens_decoder), leftmost-longest match, with no
  whitespace stripping around them; each piece of text in between is encoded by
  sentencepiece on its own (BPE, byte fallback, no dummy prefix, whitespace kept).
  ``add_special_tokens=True`` prepends <bos> (add_bos_token) and appends <eos> only if
  add_eos_token.
* Decoding: pieces are joined with "▁" -> " ", runs of byte pieces <0xNN> are decoded as
  UTF-8, and a run that is not valid UTF-8 becomes one U+FFFD *per byte* (the tokenizers
  ByteFallback decoder; not Python's errors="replace"). Added tokens decode to their text.
  ``skip_special_tokens`` drops the special tokens (bos/eos/unk/pad/mask and those flagged
  special, e.g. the turn markers) but keeps <unusedN>. No clean-up of spaces (transformers
  ignores clean_up_tokenization_spaces for BPE tokenizers).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .safeio import open_regular, read_json_file
from .chat import GEMMA2_CHAT_TEMPLATE, ChatTemplateError, is_gemma2_template, render_gemma2_chat

__all__ = ["GemmaTokenizer", "TokenizerError", "BatchEncoding", "ChatTemplateError"]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenizerError(ValueError):
    """Missing / broken tokenizer files, bad arguments, out-of-range ids."""


# Most ids a padded batch may hold (batch x length): 2**26 int64 ids = 512 MiB per array. Far above any real
# batch (Gemma's 8192-token context x 8192 sequences), low enough that a typo cannot exhaust memory.
MAX_PADDED_ELEMENTS = 1 << 26


def _check_encodable(text: str) -> None:
    """Text must be encodable as UTF-8 for sentencepiece (C++): a lone surrogate ("a\ud800b", or bytes that
    Python decoded with surrogateescape) would otherwise give sentencepiece's bare RuntimeError. transformers'
    GemmaTokenizer refuses such text too (a TypeError from the tokenizers library)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"text holds a lone surrogate U+{ord(text[e.start]):04X} at position {e.start}, "
                             "which is not encodable as UTF-8 (invalid input bytes?)") from None


class BatchEncoding(dict):
    """A dict with attribute access, like transformers' BatchEncoding."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _token_str(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, Mapping):  # {"content": "<bos>", ...} as in special_tokens_map.json
        return v.get("content")
    return str(v)


class GemmaTokenizer:
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        *,
        bos_token: str | None = "<bos>",
        eos_token: str | None = "<eos>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = "<pad>",
        mask_token: str | None = "<mask>",
        additional_special_tokens: Sequence[str] | None = None,
        added_tokens_decoder: Mapping[str | int, Any] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        padding_side: str = "left",
        truncation_side: str = "right",
        model_max_length: int = 8192,
        chat_template: str | None = None,
        **unused: Any,
    ):
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover
            raise TokenizerError("gemma2np.tokenizer needs the 'sentencepiece' package") from e
        vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(vocab_file):
            raise TokenizerError(f"tokenizer.model not found: {vocab_file!r}")
        sp = spm.SentencePieceProcessor()
        with open_regular(vocab_file, TokenizerError, "tokenizer.model") as f:  # never a FIFO / device
            blob = f.read()
        try:
            sp.LoadFromSerializedProto(blob)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError on garbage
            raise TokenizerError(f"cannot load sentencepiece model {vocab_file!r}: {e}") from e
        if sp.get_piece_size() == 0:
            raise TokenizerError(f"sentencepiece model {vocab_file!r} has an empty vocabulary")
        self.vocab_file = vocab_file
        self.sp_model = sp
        n = sp.get_piece_size()
        self._pieces = [sp.id_to_piece(i) for i in range(n)]
        self._vocab = {p: i for i, p in enumerate(self._pieces)}
        self._byte_of = {}
        for i in range(n):
            if sp.is_byte(i):
                m = _BYTE_PIECE.match(self._pieces[i])
                if m:
                    self._byte_of[i] = int(m.group(1), 16)

        self.bos_token = _token_str(bos_token)
        self.eos_token = _token_str(eos_token)
        self.unk_token = _token_str(unk_token)
        self.pad_token = _token_str(pad_token)
        self.mask_token = _token_str(mask_token)
        self.additional_special_tokens = [_token_str(t) for t in (additional_special_tokens or [])]
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        if padding_side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if truncation_side not in ("left", "right"):
            raise TokenizerError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = int(model_max_length)
        self.chat_template = chat_template

        # Added tokens: control / unknown / user-defined pieces of the model, plus the config's.
        added: dict[int, tuple[str, bool]] = {}  # id -> (content, special)
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i):
                added[i] = (self._pieces[i], True)
        for i in self._user_defined_ids(blob):
            added.setdefault(i, (self._pieces[i], False))
        if not isinstance(added_tokens_decoder or {}, Mapping):
            raise TokenizerError(f"added_tokens_decoder must be an object of id -> token, got "
                                 f"{type(added_tokens_decoder).__name__}")
        for k, v in (added_tokens_decoder or {}).items():
            try:
                i = int(k) if not isinstance(k, bool) and (isinstance(k, int) or len(str(k)) <= 20) else None
            except (TypeError, ValueError):
                i = None
            if i is None or i < 0:
                raise TokenizerError(f"added_tokens_decoder key {k!r:.40} is not a token id")
            content = _token_str(v)
            special = bool(v.get("special", False)) if isinstance(v, Mapping) else False
            if content is None:
                continue
            if i < n and self._pieces[i] != content:
                raise TokenizerError(
                    f"tokenizer_config.json says id {i} is {content!r} but tokenizer.model has {self._pieces[i]!r}"
                )
            if i >= n:
                raise TokenizerError(f"added token {content!r} has id {i} outside the vocabulary ({n})")
            added[i] = (content, special)
        for t in self.additional_special_tokens:
            if t in self._vocab:
                added[self._vocab[t]] = (t, True)
        self._added = added
        self._added_ids = {c: i for i, (c, _) in added.items()}
        contents = sorted(self._added_ids, key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(c) for c in contents)) if contents else None

        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            t = getattr(self, name)
            if t is not None and t not in self._vocab:
                raise TokenizerError(f"{name} {t!r} is not in the vocabulary of {vocab_file!r}")
        if self.mask_token is not None and self.mask_token not in self._vocab:
            self.mask_token = None
        special_ids = {i for i, (_, s) in added.items() if s}
        for t in self.all_special_tokens:
            special_ids.add(self._vocab[t])
        self._special_ids = frozenset(special_ids)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _user_defined_ids(blob: bytes) -> list[int]:
        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
        except Exception:  # protobuf missing: rely on tokenizer_config.json's added_tokens_decoder
            return []
        proto = pb.ModelProto()
        try:
            proto.ParseFromString(blob)
        except Exception:  # sentencepiece itself accepted the blob: fall back to tokenizer_config.json
            return []
        ud = pb.ModelProto.SentencePiece.USER_DEFINED
        return [i for i, p in enumerate(proto.pieces) if p.type == ud]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "GemmaTokenizer":
        """Load from a directory holding tokenizer.model and (optionally) tokenizer_config.json /
        special_tokens_map.json, or from a tokenizer.model path. kwargs override the config."""
        path = os.fspath(path)
        if os.path.isdir(path):
            d, model = path, os.path.join(path, "tokenizer.model")
        elif os.path.isfile(path):
            d, model = os.path.dirname(path), path
        else:
            raise TokenizerError(f"tokenizer path does not exist: {path!r}")
        if not os.path.isfile(model):
            extra = " (only tokenizer.json is supported by transformers; gemma2np needs the sentencepiece file)" if os.path.isfile(os.path.join(d, "tokenizer.json")) else ""
            raise TokenizerError(f"tokenizer.model not found in {d!r}{extra}")
        cfg: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = os.path.join(d, name)
            if os.path.lexists(p):
                data = read_json_file(p, TokenizerError, repr(p))  # UTF-8, bounded depth, regular file
                if not isinstance(data, dict):
                    raise TokenizerError(f"{p!r} must hold a JSON object")
                cfg.update(data)
        tpl_file = os.path.join(d, "chat_template.jinja")
        if "chat_template" not in cfg and os.path.lexists(tpl_file):
            with open_regular(tpl_file, TokenizerError, "chat_template.jinja") as f:
                try:
                    cfg["chat_template"] = f.read().decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TokenizerError(f"{tpl_file!r} is not UTF-8: {e}") from None
        if isinstance(cfg.get("chat_template"), list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in cfg["chat_template"] if isinstance(t, Mapping)}
            cfg["chat_template"] = named.get("default")
        cfg.update(kwargs)
        return cls(model, **cfg)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write what `from_pretrained` (here and transformers' GemmaTokenizer) reads back as this tokenizer:
        tokenizer.model, tokenizer_config.json, special_tokens_map.json and, as transformers 5 does,
        chat_template.jinja for the chat template. Returns the paths written.

        The model's generation defaults (generation_config.json) belong to the model, not the tokenizer:
        `model.save_pretrained(d)` and `tok.save_pretrained(d)` into the same d make a complete directory."""
        d = os.fspath(save_directory)
        if os.path.exists(d) and not os.path.isdir(d):
            raise TokenizerError(f"save_directory {d!r} is a file, not a directory")
        os.makedirs(d, exist_ok=True)
        specials = {name: getattr(self, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")}
        config: dict[str, Any] = {
            "tokenizer_class": "GemmaTokenizer",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            **specials,
            "additional_special_tokens": list(self.additional_special_tokens),
            # transformers' AddedToken fields; gemma2np reads content and special
            "added_tokens_decoder": {
                str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                         "special": sp}
                for i, (c, sp) in sorted(self._added.items())
            },
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "model_max_length": self.model_max_length,
            # the published gemma-2 values (transformers' GemmaTokenizer defaults)
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            "sp_model_kwargs": {},
        }
        written = []
        model_path = os.path.join(d, "tokenizer.model")
        if not (os.path.exists(model_path) and os.path.samefile(model_path, self.vocab_file)):
            if os.path.isfile(self.vocab_file):  # byte for byte the file we loaded
                with open(self.vocab_file, "rb") as f:
                    blob = f.read()
            else:  # it went away since: the model sentencepiece holds (transformers does the same)
                blob = self.sp_model.serialized_model_proto()
            with open(model_path, "wb") as f:
                f.write(blob)
        written.append(model_path)
        template_path = os.path.join(d, "chat_template.jinja")
        if isinstance(self.chat_template, str):
            with open(template_path, "w", encoding="utf-8") as f:
                f.write(self.chat_template)
            written.append(template_path)
        elif os.path.isfile(template_path):  # a stale template would be read back as this tokenizer's
            os.remove(template_path)
        for name, data in (("tokenizer_config.json", config),
                           ("special_tokens_map.json", {**{k: v for k, v in specials.items() if v is not None},
                                                        "additional_special_tokens": list(self.additional_special_tokens)})):
            path = os.path.join(d, name)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
                f.write("\n")
            written.append(path)
        return tuple(written)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _tok_id(self, t):
        return None if t is None else self._vocab.get(t)

    bos_token_id = property(lambda self: self._tok_id(self.bos_token))
    eos_token_id = property(lambda self: self._tok_id(self.eos_token))
    unk_token_id = property(lambda self: self._tok_id(self.unk_token))
    pad_token_id = property(lambda self: self._tok_id(self.pad_token))
    mask_token_id = property(lambda self: self._tok_id(self.mask_token))

    @property
    def all_special_tokens(self) -> list[str]:
        out = []
        for t in [self.bos_token, self.eos_token, self.unk_token, self.pad_token, self.mask_token,
                  *self.additional_special_tokens]:
            if t is not None and t not in out and t in self._vocab:
                out.append(t)
        return out

    @property
    def all_special_ids(self) -> list[int]:
        return [self._vocab[t] for t in self.all_special_tokens]

    @property
    def added_tokens_decoder(self) -> dict[int, str]:
        return {i: c for i, (c, _) in sorted(self._added.items())}

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._vocab.get(tokens, self.unk_token_id)
        return [self._vocab.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, (int, np.integer)):
            return self._pieces[self._check_id(ids)]
        return [self._pieces[self._check_id(i)] for i in self._as_id_list(ids)
                if not (skip_special_tokens and int(i) in self._special_ids)]

    def _check_id(self, i) -> int:
        i = int(i)
        if not 0 <= i < len(self._pieces):
            raise TokenizerError(f"token id {i} out of range for vocabulary of size {len(self._pieces)}")
        return i

    @staticmethod
    def _as_id_list(ids) -> list[int]:
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1:
                raise TokenizerError(f"expected a 1-D sequence of ids, got shape {ids.shape} (use batch_decode)")
            if not np.issubdtype(ids.dtype, np.integer) or ids.dtype == np.bool_:
                raise TokenizerError(f"token ids must be integers, got an array of {ids.dtype}")
            return [int(x) for x in ids]
        if isinstance(ids, (bool, np.bool_)):
            raise TokenizerError("token ids must be integers, got bool")
        if isinstance(ids, (int, np.integer)):
            return [int(ids)]
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TokenizerError(f"token ids must be an int, a sequence of ints or a 1-D int array, got "
                                 f"{type(ids).__name__}")
        out = []
        for x in ids:
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
                raise TokenizerError(f"token ids must be integers, got {type(x).__name__} (use batch_decode for a batch)")
            out.append(int(x))
        return out

    # ------------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> list[str]:
        return [self._pieces[i] for i in self._encode_text(text)]

    def _encode_text(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a str, got {type(text).__name__}")
        _check_encodable(text)
        ids: list[int] = []
        pos = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                if m.start() > pos:
                    ids.extend(self.sp_model.encode(text[pos:m.start()]))
                ids.append(self._added_ids[m.group(0)])
                pos = m.end()
        if pos < len(text):
            ids.extend(self.sp_model.encode(text[pos:]))
        return ids

    def _n_special_added(self, add_special_tokens: bool) -> int:
        return int(add_special_tokens and self.add_bos_token and self.bos_token_id is not None) + int(
            add_special_tokens and self.add_eos_token and self.eos_token_id is not None)

    def _with_special(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool = False,
               max_length: int | None = None, **kwargs: Any) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens, truncation=truncation,
                    max_length=max_length, **kwargs)["input_ids"]

    def _truncate(self, ids: list[int], add_special_tokens: bool, max_length: int) -> list[int]:
        room = max_length - self._n_special_added(add_special_tokens)
        if room < 0:
            raise TokenizerError(f"max_length={max_length} is too small for the special tokens")
        if len(ids) <= room:
            return ids
        return ids[:room] if self.truncation_side == "right" else ids[len(ids) - room:]

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Encode one text or a batch. Without padding: lists of ids (like transformers). With
        padding (or return_tensors="np"): int64 NumPy arrays of shape (batch, T)."""
        bad = set(kwargs) - {"verbose", "return_token_type_ids"}
        if bad:
            raise TokenizerError(f"unsupported arguments: {sorted(bad)}")
        if return_tensors not in (None, "np"):
            raise TokenizerError(f"return_tensors must be None or 'np' (gemma2np has no torch), got {return_tensors!r}")
        single = isinstance(text, str)
        if not single:
            if isinstance(text, (bytes, np.ndarray)) or not isinstance(text, Sequence) or not all(isinstance(t, str) for t in text):
                raise TokenizerError("text must be a str or a list of str")
        texts = [text] if single else list(text)

        if padding is True or padding == "longest":
            strategy = "longest"
        elif padding in (False, None, "do_not_pad"):
            strategy = None
        elif padding == "max_length":
            strategy = "max_length"
        else:
            raise TokenizerError(f"padding must be True/False/'longest'/'max_length'/'do_not_pad', got {padding!r}")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {side!r}")
        if truncation not in (False, None, "do_not_truncate"):
            if truncation not in (True, "longest_first", "only_first"):
                raise TokenizerError(f"unsupported truncation={truncation!r}")
            limit = max_length if max_length is not None else self.model_max_length
        else:
            limit = None
        if strategy == "max_length" and max_length is None:
            max_length = self.model_max_length
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
                                       or max_length < 0):
            raise TokenizerError(f"max_length must be a non-negative integer, got {max_length!r}")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool)
                                               or not isinstance(pad_to_multiple_of, (int, np.integer))
                                               or pad_to_multiple_of < 0):
            raise TokenizerError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")

        seqs = []
        for t in texts:
            ids = self._encode_text(t)
            if limit is not None:
                ids = self._truncate(ids, add_special_tokens, limit)
            seqs.append(self._with_special(ids, add_special_tokens))

        want_mask = return_attention_mask is not False
        if strategy is None and return_tensors is None:
            out = BatchEncoding(input_ids=seqs[0] if single else seqs)
            if want_mask:
                masks = [[1] * len(s) for s in seqs]
                out["attention_mask"] = masks[0] if single else masks
            return out

        if strategy is None:
            lengths = {len(s) for s in seqs}
            if len(lengths) > 1:
                raise TokenizerError("sequences have different lengths: pass padding=True to get an array")
        target = max((len(s) for s in seqs), default=0) if strategy != "max_length" else max(max_length, max((len(s) for s in seqs), default=0))
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if strategy is not None and self.pad_token_id is None:
            raise TokenizerError("padding needs a pad_token")
        if len(seqs) * target > MAX_PADDED_ELEMENTS:
            # checked before allocating: max_length=10**10 would otherwise ask NumPy for 74.5 GiB
            raise TokenizerError(f"padding {len(seqs)} sequence(s) to length {target} needs {len(seqs) * target} "
                                 f"ids, more than the supported {MAX_PADDED_ELEMENTS}: pass a smaller max_length")
        ids_arr = np.full((len(seqs), target), self.pad_token_id if self.pad_token_id is not None else 0, dtype=np.int64)
        mask = np.zeros((len(seqs), target), dtype=np.int64)
        for b, s in enumerate(seqs):
            if side == "left":
                ids_arr[b, target - len(s):] = s
                mask[b, target - len(s):] = 1
            else:
                ids_arr[b, :len(s)] = s
                mask[b, :len(s)] = 1
        out = BatchEncoding(input_ids=ids_arr)
        if want_mask:
            out["attention_mask"] = mask
        return out

    # ------------------------------------------------------------------ decoding
    def decode(self, token_ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        """transformers' Gemma decode. clean_up_tokenization_spaces is accepted and ignored
        (transformers ignores it for BPE tokenizers)."""
        if isinstance(token_ids, Mapping):
            token_ids = token_ids["input_ids"]
        ids = self._as_id_list(token_ids)
        parts: list[str] = []
        run: list[int] = []

        def flush():
            if run:
                try:
                    parts.append(bytes(run).decode("utf-8"))
                except UnicodeDecodeError:
                    parts.append("\ufffd" * len(run))
                run.clear()

        for i in ids:
            i = self._check_id(i)
            if skip_special_tokens and i in self._special_ids:
                continue
            b = self._byte_of.get(i)
            if b is not None and i not in self._added:
                run.append(b)
                continue
            flush()
            if i in self._added:
                parts.append(self._added[i][0].replace("\u2581", " "))
            else:
                parts.append(self._pieces[i].replace("\u2581", " "))
        flush()
        return "".join(parts)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        if isinstance(sequences, Mapping):
            sequences = sequences["input_ids"]
        if isinstance(sequences, (str, bytes, int, np.integer)) or not isinstance(sequences, Iterable):
            raise TokenizerError(f"batch_decode takes a batch of id sequences, got {type(sequences).__name__}")
        if isinstance(sequences, np.ndarray) and sequences.ndim == 1:
            sequences = sequences[None]
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        conversation,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ):
        """Gemma 2's chat format, rendered in Python. Like transformers 5.x: tokenize=False ->
        the string (list of strings for a batch of conversations); tokenize=True ->
        a BatchEncoding with input_ids/attention_mask (return_dict=False -> just the ids).
        The rendered text already starts with <bos>, so no second <bos> is added."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise TokenizerError("this tokenizer has no chat_template (tokenizer_config.json has none)")
        if not is_gemma2_template(template):
            raise TokenizerError("only Gemma 2's chat template is implemented (gemma2np renders it without jinja)")
        if continue_final_message:
            raise TokenizerError("continue_final_message is not supported")
        if kwargs:
            raise TokenizerError(f"unsupported arguments: {sorted(kwargs)}")
        if isinstance(conversation, Sequence) and not isinstance(conversation, (str, bytes)) and len(conversation) == 0:
            raise ChatTemplateError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        batched = isinstance(conversation, Sequence) and len(conversation) > 0 and isinstance(conversation[0], (list, tuple))
        convs = conversation if batched else [conversation]
        rendered = [render_gemma2_chat(c, bos_token=self.bos_token or "", add_generation_prompt=add_generation_prompt)
                    for c in convs]
        if not tokenize:
            return rendered if batched else rendered[0]
        out = self(rendered if batched else rendered[0], add_special_tokens=False, padding=padding,
                   truncation=truncation, max_length=max_length, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]

    def __repr__(self) -> str:
        return (f"GemmaTokenizer(vocab_file={self.vocab_file!r}, vocab_size={self.vocab_size}, "
                f"padding_side={self.padding_side!r}, add_bos_token={self.add_bos_token})")
