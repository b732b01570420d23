"""Read llama.cpp's own verification output: tensor logs and `--save-logits` files.

Layer 6 (tools), no model code. Two formats, both written by stock llama.cpp tools:

* The **tensor log** of ``llama-eval-callback -m X.gguf -p PROMPT`` or ``llama-debug -m X.gguf -p PROMPT
  --verbose`` (llama.cpp's ``common/debug.cpp``, ``common_debug_cb_eval``): for every node of the
  compute graph a header line ::

      common_debug_cb_eval:              attn_norm-0 = (f32)        MUL(norm-0{256, 8, 1, 1}, blk.0.attn_norm.weight{256, 1, 1, 1}}) = {256, 8, 1, 1}

  (name right-aligned in 24 columns, type, ``ggml_op_desc``, src0 and src1 with their ``ne``, and the
  node's ``ne``, fastest dimension first), then -- unless the type is quantized -- the values: for each
  ``i3`` a nested ``[ ... ]`` block holding, along each of ne[0..2], the first and last 3 indices when
  the dimension is longer than 6 (all of them otherwise), printed ``%12.4f``; then ``sum = %f``, the
  sum of *every* element, accumulated sequentially in float32 in ggml order (i0 fastest). Older
  llama.cpp builds print ``ggml_debug:`` instead of ``common_debug_cb_eval:``; both are read.
  The input token ids are in the log too: ``number of input tokens = N`` followed by N lines of one id
  (llama-eval-callback, on stderr), or ``Token ids (N):`` followed by ``piece(id) piece(id) ...``
  (llama-debug). A log may hold several graph evaluations (llama-debug's warm-up run on
  ``<bos><eos>`` comes first): `LlamaCppLog.evaluation` picks the one over the listed tokens.

* The **logits files** of ``llama-debug --save-logits``: ``data/llamacpp-<model>.bin`` holds the last
  token's logits (float32, native byte order, vocab_size values) and ``llamacpp-<model>-tokens.bin``
  beside it the prompt's token ids (int32).

Everything that is not a well-formed log or logits file raises `LlamaCppLogError` (a ValueError)
naming the file, the line and what is wrong.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "LlamaCppLogError",
    "LogTensor",
    "LlamaCppLog",
    "parse_log",
    "read_log",
    "corner_indices",
    "read_logits",
    "CORNER",
]

CORNER = 3  # common_debug_print_tensor(..., n = 3): first and last 3 indices of a long dimension

_HEADER_RE = re.compile(
    r"(?:common_debug_cb_eval|ggml_debug):\s+(?P<name>.*?) = \((?P<type>[A-Za-z0-9_]+)\)\s*"
    r"(?P<op>[A-Za-z0-9_()]+?)\((?P<src0>.*?)\{(?P<ne0>[-\d, ]*)\}, "
    r"(?:(?P<src1>.*?)\{(?P<ne1>[-\d, ]*)\})?\}\) = \{(?P<ne>[-\d, ]+)\}\s*$"
)
_SUM_RE = re.compile(r"^\s*sum = (?P<sum>\S+)\s*$")
# a line of the nested value block: "[", "],", "]", "..., " or "[ v, v, ..., v  ],"
_DATA_RE = re.compile(r"^\s*(\[|\],?|\.\.\.,|\[.*\],)\s*$")
_NUM_RE = re.compile(r"[-+]?(?:nan|inf|\d+\.\d+|\d+)", re.IGNORECASE)
_N_TOKENS_RE = re.compile(r"number of input tokens = (\d+)")
_TOKEN_IDS_RE = re.compile(r"Token ids \((\d+)\):[ \t]*\n")
# LOG_INF lines may carry common_log's prefix "0.00.148.735 I " (timestamp, level letter)
_ONE_ID_RE = re.compile(r"^(?:[\d.]+ [A-Z] )?\s*(-?\d+)\s*$")
_PIECE_ID_RE = re.compile(r"(.*?)\((-?\d+)\) ", re.DOTALL)
# ggml_op_desc types whose data the callback does not print (quantized: ggml_is_quantized)
_PRINTED_TYPES = {"f32", "f16", "bf16", "i64", "i32", "i16", "i8"}


class LlamaCppLogError(ValueError):
    """A llama.cpp log or logits file that cannot be read: truncated, malformed, or without token ids."""


@dataclass
class LogTensor:
    """One graph node as printed by llama.cpp's eval callback.

    ne: ggml dimensions, fastest first (4 entries); the NumPy layout of the node is reversed(ne).
    values: the printed corner values in print order (see `corner_indices`), or None when llama.cpp
    printed none (quantized type). sum: the printed sum of all elements (float32 accumulation)."""

    name: str
    type: str
    op: str
    src0: str
    src0_ne: tuple
    src1: str | None
    src1_ne: tuple | None
    ne: tuple
    values: np.ndarray | None
    sum: float | None
    line: int  # 1-based line number of the header

    @property
    def size(self) -> int:
        return int(np.prod(self.ne))


def corner_indices(n: int, k: int = CORNER) -> np.ndarray:
    """The indices llama.cpp prints along one dimension of length n: all, or the first and last k."""
    if n > 2 * k:
        return np.concatenate([np.arange(k), np.arange(n - k, n)])
    return np.arange(n)


def _expected_count(ne) -> int:
    # the i3 loop prints every index; i2, i1, i0 are cut to the corners
    return int(ne[3]) * int(np.prod([len(corner_indices(int(d))) for d in ne[:3]]))


@dataclass
class LlamaCppLog:
    """A parsed tensor log: every printed node (in log order), split into graph evaluations, and the tokens."""

    path: str
    tensors: list[LogTensor]
    evaluations: list[list[LogTensor]]
    token_ids: list[int] | None
    notes: list[str] = field(default_factory=list)

    def evaluation(self) -> list[LogTensor]:
        """The graph evaluation over the logged token ids (the last one if several match: the real run
        comes after llama-debug's warm-up)."""
        if self.token_ids is None:
            raise LlamaCppLogError(
                f"{self.path}: no token ids in the log (llama-eval-callback prints them on stderr: capture "
                "both streams, e.g. `llama-eval-callback ... > log.txt 2>&1`)")
        n = len(self.token_ids)
        counts = [_n_tokens(ev) for ev in self.evaluations]
        match = [ev for ev, c in zip(self.evaluations, counts) if c == n]
        if not match:
            raise LlamaCppLogError(
                f"{self.path}: the log lists {n} token ids but its {len(counts)} graph evaluation(s) ran on "
                f"{counts} tokens (a prompt split into several micro-batches? run with -b and -ub >= {n})")
        return match[-1]


def _n_tokens(evaluation) -> int | None:
    for t in evaluation:
        if t.name == "inp_scaled":
            return int(t.ne[1])
    return None


def _parse_ne(text: str, where: str) -> tuple:
    try:
        ne = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise LlamaCppLogError(f"{where}: cannot read the dimensions {{{text}}}") from None
    if len(ne) != 4 or min(ne) < 0:
        raise LlamaCppLogError(f"{where}: expected 4 non-negative ggml dimensions, got {{{text}}}")
    return ne


def _float(tok: str) -> float:
    return float(tok.lower().replace("-nan", "nan").replace("+nan", "nan"))


def parse_log(text: str, path: str = "<log>") -> LlamaCppLog:
    """Parse the text of a llama.cpp tensor log (see the module docstring). Raises LlamaCppLogError."""
    lines = text.splitlines()
    tensors: list[LogTensor] = []
    cur = None  # the entry whose values are being read: dict
    for lineno, line in enumerate(lines, 1):
        m = _HEADER_RE.search(line)
        if m:
            if cur is not None:
                raise LlamaCppLogError(f"{path}:{lineno}: a new tensor starts before the values of "
                                       f"{cur['name']!r} (line {cur['line']}) end with their sum: truncated entry")
            where = f"{path}:{lineno}"
            name = m["name"].strip()
            if not name:
                raise LlamaCppLogError(f"{where}: a tensor header without a name")
            ne = _parse_ne(m["ne"], where)
            entry = dict(name=name, type=m["type"].lower(), op=m["op"].strip(), src0=m["src0"].strip(),
                         src0_ne=_parse_ne(m["ne0"], where) if m["ne0"] else None,
                         src1=None if m["src1"] is None else m["src1"].strip(),
                         src1_ne=None if m["ne1"] is None else _parse_ne(m["ne1"], where),
                         ne=ne, line=lineno, nums=[], sums=[])
            if entry["type"] not in _PRINTED_TYPES or _expected_count(ne) == 0:
                tensors.append(_finish(entry, path, printed=False))
            else:
                cur = entry
            continue
        if cur is None:
            if _SUM_RE.match(line):
                raise LlamaCppLogError(f"{path}:{lineno}: a `sum =` line without a tensor header before it")
            continue  # any other log output between entries
        s = _SUM_RE.match(line)
        if s:
            try:
                cur["sums"].append(_float(s["sum"]))
            except ValueError:
                raise LlamaCppLogError(f"{path}:{lineno}: cannot read the sum {s['sum']!r}") from None
            if len(cur["sums"]) == cur["ne"][3]:
                tensors.append(_finish(cur, path, printed=True))
                cur = None
            continue
        if not _DATA_RE.match(line):
            if not "".join(lines[lineno:]).strip():  # the last line, cut short
                break
            raise LlamaCppLogError(f"{path}:{lineno}: unexpected text inside the values of {cur['name']!r} "
                                   f"(line {cur['line']}): {line.strip()[:60]!r}")
        body = line.strip()
        if body.startswith("[") and len(body) > 1:
            try:
                cur["nums"].extend(_float(t) for t in _NUM_RE.findall(body))
            except ValueError:
                raise LlamaCppLogError(f"{path}:{lineno}: cannot read the values {body[:60]!r}") from None
    if cur is not None:
        raise LlamaCppLogError(f"{path}: the log ends inside the values of {cur['name']!r} (line {cur['line']}): "
                               "truncated")
    if not tensors:
        raise LlamaCppLogError(f"{path}: no tensors in the log (expected `common_debug_cb_eval: NAME = (TYPE) "
                               "OP(...) = {ne}` lines from llama-eval-callback or llama-debug --verbose)")
    return LlamaCppLog(path, tensors, _split_evaluations(tensors), _token_ids(text, path))


def _finish(entry: dict, path: str, printed: bool) -> LogTensor:
    values = None
    total = None
    if printed:
        want = _expected_count(entry["ne"])
        if len(entry["nums"]) != want:
            raise LlamaCppLogError(
                f"{path}:{entry['line']}: {entry['name']!r} with ne {{{', '.join(map(str, entry['ne']))}}} should "
                f"print {want} values, the log has {len(entry['nums'])}: malformed or truncated entry")
        values = np.asarray(entry["nums"], dtype=np.float64)
        total = entry["sums"][-1]  # every i3 block prints the same total
    return LogTensor(entry["name"], entry["type"], entry["op"], entry["src0"], entry["src0_ne"], entry["src1"],
                     entry["src1_ne"], entry["ne"], values, total, entry["line"])


def _split_evaluations(tensors: list[LogTensor]) -> list[list[LogTensor]]:
    # every evaluation of the Gemma 2 graph starts at the token embedding lookup and has one
    # inp_scaled; a new evaluation begins where the name of the log's first node comes again
    first = tensors[0].name
    evs: list[list[LogTensor]] = []
    for t in tensors:
        if t.name == first or not evs:
            evs.append([])
        evs[-1].append(t)
    return evs


def _token_ids(text: str, path: str) -> list[int] | None:
    m = None
    for m in _N_TOKENS_RE.finditer(text):
        pass  # the last listing (one per run)
    if m is not None:
        n = int(m.group(1))
        ids = []
        for line in text[m.end():].splitlines()[1:]:
            if len(ids) == n:
                break
            one = _ONE_ID_RE.match(line)
            if one is None:
                raise LlamaCppLogError(f"{path}: `number of input tokens = {n}` is followed by {len(ids)} ids, "
                                       f"then {line.strip()[:40]!r}: truncated token list")
            ids.append(int(one.group(1)))
        if len(ids) != n:
            raise LlamaCppLogError(f"{path}: `number of input tokens = {n}` but the log ends after {len(ids)} ids")
        return ids
    for m in _TOKEN_IDS_RE.finditer(text):
        pass
    if m is not None:
        n = int(m.group(1))
        rest = text[m.end():]
        ids, pos = [], 0
        for _ in range(n):  # piece(id) piece(id) ...: a piece may itself hold spaces or newlines
            p = _PIECE_ID_RE.match(rest, pos)
            if p is None:
                raise LlamaCppLogError(f"{path}: `Token ids ({n}):` is followed by only {len(ids)} `piece(id)` "
                                       "entries: truncated token list")
            ids.append(int(p.group(2)))
            pos = p.end()
        return ids
    return None


def read_log(path: str | os.PathLike) -> LlamaCppLog:
    """Read and parse a llama.cpp tensor log file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LlamaCppLogError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise LlamaCppLogError(f"{path}: cannot read: {exc}") from None
    if b"\0" in raw[:65536]:
        raise LlamaCppLogError(f"{path}: a binary file, not a llama.cpp text log")
    return parse_log(raw.decode("utf-8", errors="replace"), path)


def read_logits(path: str | os.PathLike, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read `llama-debug --save-logits` output -> (logits (vocab_size,) float32, token ids (T,) int64).

    `path` is the ``llamacpp-<model>.bin``; the ids come from ``llamacpp-<model>-tokens.bin`` beside it."""
    path = os.fspath(path)
    if not path.endswith(".bin"):
        raise LlamaCppLogError(f"{path}: expected llama-debug's llamacpp-<model>.bin (the logits file)")
    tokens_path = path[: -len(".bin")] + "-tokens.bin"
    for p in (path, tokens_path):
        if not os.path.isfile(p):
            raise LlamaCppLogError(f"{p}: no such file" + (" (llama-debug --save-logits writes it beside the logits)"
                                                          if p == tokens_path else ""))
    logits = _read_binary(path, np.float32)
    ids = _read_binary(tokens_path, np.int32)
    if logits.size != vocab_size:
        raise LlamaCppLogError(f"{path}: holds {logits.size} float32 values, the model's vocabulary has {vocab_size}"
                               " (a file of another model, or of embeddings?)")
    if ids.size == 0:
        raise LlamaCppLogError(f"{tokens_path}: no token ids")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise LlamaCppLogError(f"{tokens_path}: token id {int(ids.max() if ids.max() >= vocab_size else ids.min())} "
                               f"is outside the vocabulary [0, {vocab_size})")
    return logits, ids.astype(np.int64)


def _read_binary(path: str, dtype) -> np.ndarray:
    size = os.path.getsize(path)
    item = np.dtype(dtype).itemsize
    if size % item:
        raise LlamaCppLogError(f"{path}: {size} bytes is not a whole number of {np.dtype(dtype).name} values: "
                               "truncated or not a llama-debug file")
    return np.fromfile(path, dtype=dtype)
