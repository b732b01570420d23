"""Compare a llama.cpp tensor log (llama-eval-callback / llama-debug --verbose) with gemma2np.

Layer 6 (tools). `compare_llamacpp_log(model, log)` runs gemma2np on the token ids of the log with every
intermediate recorded, brings each of our tensors into the *ggml layout* of the logged node (a NumPy
array of shape reversed(ne): ne[0] fastest, no batch axis), takes the same corner elements llama.cpp
printed and checks them and the printed sum. The first node out of tolerance -- in log order, under
llama.cpp's name -- is where the port diverges.

What each logged node is compared with (llama.cpp's Gemma 2 graph, src/models/gemma2.cpp and
build_norm / build_qkv / build_attn / build_ffn in src/llama-graph.cpp):

* named nodes map to our canonical intermediates: ``inp_scaled`` embeddings, ``attn_norm-{il}``,
  ``Qcur-{il}`` / ``Kcur-{il}`` (the ROPE node: the earlier MUL_MAT / RESHAPE nodes of the same name are
  the projection *before* RoPE and are skipped), ``Vcur-{il}`` (both its MUL_MAT and RESHAPE node),
  ``kq_soft_max-{il}``, ``attn_post_norm``, ``sa_out``, ``ffn_norm``, ``ffn_gate``, ``ffn_up``,
  ``ffn_out``, ``ffn_post_norm`` (stock llama.cpp names it without a layer: the layer is read from its
  weight, ``blk.N.post_ffw_norm.weight``), ``l_out``, ``result_norm``, ``result_output``;
* nodes we do not record are *derived* from our recorded tensors in float64, following the graph:
  ``embd`` (embeddings / sqrt(E)), ``norm-{il}`` / ``norm`` (RMS_NORM of its source: x / sqrt(mean(x^2) + eps),
  before the weight), the SCALE of Qcur (q * query_pre_attn_scalar^-0.5), ``kq-{il}`` ... ``kq_scaled_2``
  (scaled q.k, softcap), ``kqv-{il}`` / the FLASH_ATTN_EXT node (probs . v per head), ``kqv_out-{il}``
  (heads merged), ``ffn_geglu-{il}`` (gelu_tanh(gate) * up), the unnamed MUL_MAT by
  ``blk.N.attn_output.weight`` (our attn_out) and by the output matrix (logits_raw) and the softcap's
  SCALE / TANH nodes;
* views and layout ops of a node we know are followed: RESHAPE and CONT keep the logical element order,
  PERMUTE is applied when the axis mapping is unambiguous, a VIEW with its source's shape is the
  source, GET_ROWS by ``inp_out_ids`` / ``out_ids`` picks the output rows (llama.cpp computes the last
  layer after attention only for the output tokens: the *last-row-only* layout);
* everything else is listed as skipped with the reason: graph inputs (positions, masks, row ids), the KV
  cache (SET_ROWS / views / f16 copies), quantized nodes (no values printed), views we cannot place.

Tolerance, per printed value v (printed %12.4f) against ours x::

    |x - v| <= 0.5e-4 + atol + rtol * |v|

(0.5e-4 = half a unit of the 4th printed decimal). The printed sum s is the float32 sequential sum of
all N elements (common_debug_print_tensor); ours is the exact sum S of our tensor, and ::

    |S - s| <= N * atol + rtol * sum|x_i| + 2^-24 * sum_k |S_k| + 0.5e-6

where the first two terms are the per-element tolerance summed over the tensor, the third bounds
llama.cpp's float32 rounding (each of the N - 1 additions rounds by at most 2^-24 of its partial sum
S_k, computed from our values in ggml order) and the last is the %f printing. Both grow with the
tensor's size, so a large tensor is not held to a small one's standard. Elements we cannot derive
(padding cells of the KV cache in ``kq``) are left out, and then the sum is not checked.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .intermediates import run_with_intermediates
from .llamacpp_log import LlamaCppLog, LlamaCppLogError, LogTensor, corner_indices

__all__ = ["LogEntryReport", "SkippedEntry", "LlamaCppLogReport", "compare_llamacpp_log",
           "DEFAULT_LOG_ATOL", "DEFAULT_LOG_RTOL", "PRINT_HALF_UNIT"]

# Measured on the fixtures (tests/data/llamacpp): llama.cpp F32 GGUF, F32 KV cache, against gemma2np's
# float32 reference; see docs/porting-guide.md. Loosen for BF16 / quantized GGUFs.
DEFAULT_LOG_ATOL = 1e-3
DEFAULT_LOG_RTOL = 1e-3
PRINT_HALF_UNIT = 0.5e-4  # values are printed %12.4f
SUM_PRINT_HALF_UNIT = 0.5e-6  # sums are printed %f
F32_UNIT_ROUNDOFF = 2.0 ** -24

_LAYER_NAME_RE = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z0-9_]*)-(?P<il>\d+)$")
_BLK_RE = re.compile(r"^blk\.(\d+)\.")
_TOKENS_MAJOR = {  # llama.cpp base name -> our per-layer suffix, (T, N) tensors
    "attn_norm": "input_norm", "attn_post_norm": "post_attn_norm", "sa_out": "attn_residual",
    "ffn_norm": "pre_ffn_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_out": "ffn_out",
    "ffn_post_norm": "post_ffn_norm", "l_out": "output",
}
_GLOBAL = {"inp_scaled": "embeddings", "result_norm": "final_norm", "result_output": "logits"}
_INPUTS = {"inp_tokens", "inp_pos", "inp_out_ids", "out_ids", "attn_inp_kq_mask", "attn_inp_kq_mask_swa",
           "attn_inp_k_idxs", "attn_inp_v_idxs", "self_kq_mask", "self_kq_mask_swa"}


class _Skip(Exception):
    pass


@dataclass
class LogEntryReport:
    name: str  # as llama.cpp printed it
    op: str
    line: int
    ne: tuple
    target: str  # our canonical tensor, or how it is derived from them
    positions: str  # "all" or "rows [...]" (the output rows of the last layer)
    compared: int  # printed values compared
    max_abs: float  # max |ours - printed| over them
    worst: float  # max over values and the sum of |diff| / tolerance (> 1: out of tolerance)
    sum_printed: float | None
    sum_ours: float | None
    sum_tol: float | None
    ok: bool

    def to_dict(self):
        d = asdict(self)
        d["ne"] = list(self.ne)
        for k in ("max_abs", "worst", "sum_printed", "sum_ours", "sum_tol"):
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = None
        return d


@dataclass
class SkippedEntry:
    name: str
    op: str
    line: int
    reason: str


@dataclass
class LlamaCppLogReport:
    path: str
    token_ids: list
    entries: list[LogEntryReport]
    skipped: list[SkippedEntry]
    atol: float
    rtol: float
    first_divergence: LogEntryReport | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None

    def to_dict(self) -> dict:
        return {
            "log": self.path, "token_ids": list(self.token_ids), "atol": self.atol, "rtol": self.rtol,
            "ok": self.ok,
            "first_divergence": None if self.ok else {"name": self.first_divergence.name,
                                                       "line": self.first_divergence.line,
                                                       "target": self.first_divergence.target},
            "compared": [e.to_dict() for e in self.entries],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def format_table(self) -> str:
        head = ("line", "llama.cpp name", "op", "ne", "gemma2np", "max_abs", "worst", "sum (llama.cpp / ours)", "ok")
        rows = []
        for e in self.entries:
            ne = "x".join(str(n) for n in e.ne[: max(1, max(i + 1 for i, n in enumerate(e.ne) if n != 1 or i == 0))])
            s = "" if e.sum_ours is None else f"{e.sum_printed:.4f} / {e.sum_ours:.4f}"
            target = e.target + ("" if e.positions == "all" else f" {e.positions}")
            rows.append((str(e.line), e.name, e.op, ne, target, f"{e.max_abs:.2e}", f"{e.worst:.2f}", s,
                         "ok" if e.ok else ("FIRST" if e is self.first_divergence else "no")))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append("")
        lines.append(f"tolerance: |ours - printed| <= {PRINT_HALF_UNIT:g} + {self.atol:g} + {self.rtol:g} * |printed| "
                     f"per value; sums: N * {self.atol:g} + {self.rtol:g} * sum|x| + float32 rounding "
                     "(worst = largest |diff| / tolerance)")
        if self.skipped:
            reasons: dict[str, int] = {}
            for s in self.skipped:
                reasons[s.reason] = reasons.get(s.reason, 0) + 1
            lines.append(f"skipped {len(self.skipped)} nodes: " + "; ".join(f"{n} x {r}" for r, n in reasons.items()))
        lines += self.notes
        if self.ok:
            lines.append(f"OK: all {len(self.entries)} compared llama.cpp tensors within tolerance")
        else:
            f = self.first_divergence
            n_bad = sum(not e.ok for e in self.entries)
            lines.append(f"DIVERGED: first divergence at {f.name} (log line {f.line}, {f.op}; gemma2np {f.target}); "
                         f"{n_bad} of {len(self.entries)} compared tensors out of tolerance")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- our tensors in ggml layout


def _g(a: np.ndarray) -> np.ndarray:
    """A NumPy array (.., n1, n0) -> 4-D (ne3, ne2, ne1, ne0), float64."""
    a = np.asarray(a, dtype=np.float64)
    while a.ndim < 4:
        a = a[None]
    if a.ndim > 4:
        raise _Skip("more than 4 dimensions")
    return a


def _ne_of(g: np.ndarray) -> tuple:
    return tuple(reversed(g.shape))


def _gelu_tanh(x):
    # the same formula as ops.gelu_tanh, in float64
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class _Ours:
    """Our recorded tensors (canonical names) and the ggml-layout arrays of the log nodes met so far."""

    def __init__(self, model, recorded, n_tokens):
        self.c = model.config
        self.rec = recorded
        self.T = n_tokens
        self.nodes: dict[str, tuple[np.ndarray, str, str]] = {}  # log name -> (g, target, positions)
        self.out_rows: list[int] | None = None

    def canon(self, name):
        return np.asarray(self.rec[name][0], dtype=np.float64)  # batch 1

    def rows(self, n_rows: int) -> tuple[np.ndarray, str]:
        if not 0 < n_rows <= self.T:
            raise LlamaCppLogError(f"a node with {n_rows} token rows, but the log lists {self.T} tokens: the log is "
                                   "of another run")
        if n_rows == self.T:
            return np.arange(self.T), "all"
        rows = self.out_rows
        if rows is None or len(rows) != n_rows:
            rows = list(range(self.T - n_rows, self.T))  # llama.cpp's default outputs: the last tokens
        return np.asarray(rows), f"rows {rows[0]}" if len(rows) == 1 else f"rows {rows}"

    def tokens_major(self, canonical, ne):
        a = self.canon(canonical)  # (T, N)
        rows, pos = self.rows(ne[1])
        return _g(a[rows]), canonical, pos

    def heads(self, kind):
        # q / k / v: ours (H, T, D) -> ggml ne [D, H, T]: NumPy (T, H, D)
        return self.canon(kind).transpose(1, 0, 2)

    def probs_v(self, il):
        p = self.canon(f"layers.{il}.attn_probs")  # (H, T, S)
        v = self.canon(f"layers.{il}.v")  # (K, S, D)
        rep = self.c.num_attention_heads // self.c.num_key_value_heads
        return np.einsum("hts,hsd->htd", p, np.repeat(v, rep, axis=0))  # (H, T, D), GQA repeat_interleave

    def check_n_kv(self, n_kv):
        # llama.cpp pads the KV cells it attends over (to a multiple of 256 at most the context size):
        # refuse a number no real run prints before allocating (H, T, n_kv) arrays for it
        if n_kv > 2 * max(self.T, self.c.max_position_embeddings) + 256:
            raise LlamaCppLogError(f"{n_kv} KV cells for {self.T} tokens: implausible, the log is corrupt")

    def kq(self, il, n_kv):
        c = self.c
        self.check_n_kv(n_kv)
        q = self.canon(f"layers.{il}.q") * float(c.query_pre_attn_scalar) ** -0.5
        k = np.repeat(self.canon(f"layers.{il}.k"), c.num_attention_heads // c.num_key_value_heads, axis=0)
        s = np.einsum("htd,hsd->hts", q, k)  # (H, T, S)
        if n_kv < s.shape[2]:
            raise _Skip("fewer KV cells than tokens")
        out = np.full(s.shape[:2] + (n_kv,), np.nan)  # cells past the S keys: not derivable (cache padding)
        out[..., : s.shape[2]] = s
        return out


def _layer_of_weight(t: LogTensor):
    for src in (t.src1, t.src0):
        m = _BLK_RE.match(src or "")
        if m:
            return int(m.group(1))
    return None


def _derive(t: LogTensor, o: _Ours) -> tuple[np.ndarray, str, str]:
    """(g, target, positions) for one log node, or raise _Skip(reason)."""
    c = o.c
    name = t.name
    m = _LAYER_NAME_RE.match(name)
    base, il = (m["base"], int(m["il"])) if m else (name, None)
    if il is not None and il >= c.num_hidden_layers:
        raise LlamaCppLogError(f"{name!r}: layer {il} does not exist (the model has {c.num_hidden_layers} layers): "
                               "the log is of another model")
    src0 = o.nodes.get(t.src0)
    src1 = o.nodes.get(t.src1) if t.src1 else None

    if name in _INPUTS or t.op in ("NONE",):
        raise _Skip("graph input")
    if t.values is None:
        raise _Skip("no values printed (quantized type)")

    # --- named nodes
    if name in _GLOBAL:
        return o.tokens_major(_GLOBAL[name], t.ne)
    if base in _TOKENS_MAJOR and (il is not None or base == "ffn_post_norm") and t.op not in ("RESHAPE", "VIEW"):
        if il is None:  # stock llama.cpp: cb(cur, "ffn_post_norm", -1); the weight names the layer
            il = _layer_of_weight(t)
            if il is None:
                raise _Skip("ffn_post_norm without a layer (no blk.N weight among its sources)")
        return o.tokens_major(f"layers.{il}.{_TOKENS_MAJOR[base]}", t.ne)
    if base in ("embd", "inp_embd") and t.op == "GET_ROWS":
        e = o.canon("embeddings")
        return _g(e / np.float64(np.float32(math.sqrt(c.hidden_size)))), "embeddings / sqrt(E)", "all"
    if base in ("Qcur", "Kcur") and il is not None:
        if t.op != "ROPE":
            raise _Skip("Qcur/Kcur before RoPE (we record q, k after RoPE)")
        kind = "q" if base == "Qcur" else "k"
        return _g(o.heads(f"layers.{il}.{kind}")), f"layers.{il}.{kind}", "all"
    if base == "Vcur" and il is not None and t.op in ("MUL_MAT", "RESHAPE", "ADD"):
        v = o.heads(f"layers.{il}.v")  # (T, K, D)
        if t.ne[2] == 1 and t.ne[1] == v.shape[0]:  # the 2-D projection (T, K*D)
            v = v.reshape(v.shape[0], -1)
        return _g(v), f"layers.{il}.v", "all"
    if base == "kq" and il is not None:
        return _g(o.kq(il, t.ne[0])), f"layers.{il}.q . k * scalar^-0.5", "all"
    if base in ("kq_scaled_1", "kq_tanh", "kq_scaled_2") and il is not None and src0 is not None:
        cap = float(c.attn_logit_softcapping)
        g = src0[0]
        g = g / cap if base == "kq_scaled_1" else np.tanh(g) if base == "kq_tanh" else g * cap
        return g, f"layers.{il} attention scores ({base})", "all"
    if base == "kq_soft_max" and il is not None:
        p = o.canon(f"layers.{il}.attn_probs")  # (H, T, S)
        n_kv = t.ne[0]
        o.check_n_kv(n_kv)
        if n_kv < p.shape[2]:
            raise _Skip("fewer KV cells than keys")
        out = np.zeros(p.shape[:2] + (n_kv,))  # cells past the S keys are masked: exactly 0 in llama.cpp
        out[..., : p.shape[2]] = p
        return _g(out), f"layers.{il}.attn_probs", "all"
    if base == "kqv" and il is not None and t.op == "MUL_MAT":
        return _g(o.probs_v(il)), f"layers.{il}.attn_probs . v", "all"  # ne [D, T, H]: NumPy (H, T, D)
    if t.op == "FLASH_ATTN_EXT":
        il = _layer_of_cache(t)
        if il is None:
            raise _Skip("FLASH_ATTN_EXT of an unknown layer")
        return _g(o.probs_v(il).transpose(1, 0, 2)), f"layers.{il}.attn_probs . v", "all"  # ne [D, H, T]
    if base == "ffn_geglu" and src0 is not None and src1 is not None and src0[0].shape == src1[0].shape:
        return _gelu_tanh(src0[0]) * src1[0], f"gelu_tanh(layers.{il}.gate) * up", src0[2]
    if t.op == "RMS_NORM" and src0 is not None:
        x = src0[0]
        g = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + float(c.rms_norm_eps))
        return g, f"rms_normalize({src0[1]})", src0[2]

    # --- unnamed nodes and layout ops of known nodes
    if name.startswith("cache_") or t.op in ("SET_ROWS", "CPY") or (t.src0 or "").startswith("cache_"):
        raise _Skip("KV cache")
    if t.op == "MUL_MAT":
        w = t.src0 or ""
        lw = _BLK_RE.match(w)
        if lw and w.endswith(".attn_output.weight"):
            return o.tokens_major(f"layers.{int(lw.group(1))}.attn_out", t.ne)
        if w in ("token_embd.weight", "output.weight") and t.src1 == "result_norm":
            return o.tokens_major("logits_raw", t.ne)
        raise _Skip("matrix product not mapped")
    if src0 is None:
        raise _Skip("derived from a node we do not follow" if t.src0 else "unnamed node")
    g0, target0, pos0 = src0
    if t.op in ("RESHAPE", "CONT") or (t.op == "VIEW" and _ne_of(g0) == t.ne):
        if g0.size != t.size:
            raise _Skip("a partial view")
        return g0.reshape(tuple(reversed(t.ne))), target0, pos0
    if t.op == "PERMUTE":
        return _permute(g0, t.ne), target0, pos0
    if t.op == "TRANSPOSE":
        return np.swapaxes(g0, 2, 3), target0, pos0
    if t.op == "GET_ROWS" and t.src1 in ("inp_out_ids", "out_ids"):
        if g0.shape[2] != o.T:
            raise _Skip("rows of a node that holds only some rows")
        rows, pos = o.rows(t.ne[1])
        return g0[:, :, rows, :], target0, pos
    if t.op == "TANH":
        return np.tanh(g0), f"tanh({target0})", pos0
    if t.op == "SCALE" and target0 == "logits_raw":
        return g0 / float(c.final_logit_softcapping), "logits_raw / final_logit_softcapping", pos0
    if t.op == "SCALE" and re.fullmatch(r"layers\.\d+\.q", target0):
        return g0 * float(c.query_pre_attn_scalar) ** -0.5, f"{target0} * query_pre_attn_scalar^-0.5", pos0
    if t.op == "ADD" and src1 is not None and src1[0].shape == g0.shape:
        return g0 + src1[0], f"{target0} + {src1[1]}", pos0
    raise _Skip("a view with another shape (its strides and offset are not in the log)" if t.op == "VIEW"
                else f"{t.op} not followed")


def _layer_of_cache(t: LogTensor):
    for s in (t.src1, t.src0):
        m = re.match(r"cache_[kv]_l(\d+)", s or "")
        if m:
            return int(m.group(1))
    return None


def _permute(g: np.ndarray, ne_dst: tuple) -> np.ndarray:
    ne_src = _ne_of(g)
    # ggml dim j of the result is the source dim i with ne_src[i] == ne_dst[j]; only unambiguous
    # when the sizes > 1 are distinct (size-1 dims can go anywhere)
    big = [n for n in ne_src if n > 1]
    if len(set(big)) != len(big) or sorted(ne_src) != sorted(ne_dst):
        raise _Skip("a permute we cannot place (repeated dimension sizes)")
    free = [i for i, n in enumerate(ne_src) if n == 1]
    src_of = []
    for n in ne_dst:
        src_of.append(ne_src.index(n) if n > 1 else free.pop(0))
    # NumPy axis of ggml dim i is 3 - i
    return np.transpose(g, [3 - src_of[3 - a] for a in range(4)])


# ----------------------------------------------------------------------------- the comparison


def _compare_entry(t: LogTensor, g: np.ndarray, atol, rtol):
    if _ne_of(g) != t.ne:
        raise LlamaCppLogError(f"{t.name!r} (line {t.line}) has ne {list(t.ne)}, gemma2np's tensor {list(_ne_of(g))}: "
                               "the log is of another model or configuration")
    idx = [np.arange(t.ne[3])] + [corner_indices(int(n)) for n in reversed(t.ne[:3])]
    ours = g[np.ix_(*idx)].ravel()
    ref = t.values
    known = ~np.isnan(ours)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(ours - ref)
        tol = PRINT_HALF_UNIT + atol + rtol * np.abs(ref)
        ratio = np.where(np.isfinite(ref), diff / tol, np.inf)[known]
    worst = float(ratio.max()) if ratio.size else 0.0
    max_abs = float(diff[known].max()) if known.any() else 0.0
    sum_ours = sum_tol = None
    if known.all() and t.sum is not None:
        flat = g.ravel()  # ggml order: i0 fastest = C order of reversed(ne)
        sum_ours = float(np.sum(flat))
        partial = np.abs(np.cumsum(flat))
        sum_tol = float(flat.size * atol + rtol * np.sum(np.abs(flat)) + F32_UNIT_ROUNDOFF * np.sum(partial)
                        + SUM_PRINT_HALF_UNIT)
        r = abs(sum_ours - t.sum) / sum_tol if math.isfinite(t.sum) else math.inf
        worst = max(worst, r)
    return int(known.sum()), max_abs, worst, sum_ours, sum_tol


def compare_llamacpp_log(model, log: LlamaCppLog, atol: float = DEFAULT_LOG_ATOL,
                         rtol: float = DEFAULT_LOG_RTOL) -> LlamaCppLogReport:
    """Run `model` (a Gemma2ForCausalLM) on the log's token ids and compare every node we can place.

    Raises LlamaCppLogError for a log that cannot be compared (no token ids, incomplete evaluation,
    shapes of another model)."""
    if atol < 0 or rtol < 0 or not (math.isfinite(atol) and math.isfinite(rtol)):
        raise LlamaCppLogError(f"atol and rtol must be finite and >= 0, got atol={atol}, rtol={rtol}")
    ev = log.evaluation()
    if not any(t.name == "result_output" for t in ev):
        raise LlamaCppLogError(f"{log.path}: the evaluation ends at {ev[-1].name!r} (line {ev[-1].line}) without "
                               "result_output: a truncated log (llama.cpp's logger can lose the end of its output at "
                               "exit: run it again), or a --tensor-filter that leaves out result_output")
    ids = np.asarray([log.token_ids], dtype=np.int64)
    c = model.config
    if ids.max() >= c.vocab_size or ids.min() < 0:
        raise LlamaCppLogError(f"{log.path}: token id {int(ids.max())} is outside the model's vocabulary "
                               f"[0, {c.vocab_size}): the log is of another model")
    recorded = run_with_intermediates(model, ids)
    o = _Ours(model, recorded, ids.shape[1])
    for t in ev:
        if t.name in ("inp_out_ids", "out_ids") and t.values is not None and t.ne[0] <= 2 * 3:
            o.out_rows = [int(v) for v in t.values]
    entries, skipped = [], []
    for t in ev:
        try:
            try:
                g, target, pos = _derive(t, o)
            except LlamaCppLogError:
                raise
            except (ValueError, IndexError) as exc:  # sources of shapes that do not combine: a corrupt log
                raise _Skip(f"cannot derive from its sources ({type(exc).__name__})") from None
        except _Skip as why:
            skipped.append(SkippedEntry(t.name, t.op, t.line, str(why)))
            o.nodes.pop(t.name, None)  # a later node must not pick up an earlier namesake
            continue
        o.nodes[t.name] = (g, target, pos)
        n, max_abs, worst, s_ours, s_tol = _compare_entry(t, g, atol, rtol)
        entries.append(LogEntryReport(t.name, t.op, t.line, t.ne, target, pos, n, max_abs, worst,
                                      t.sum if s_ours is not None else None, s_ours, s_tol, bool(worst <= 1.0)))
    first = next((e for e in entries if not e.ok), None)
    report = LlamaCppLogReport(log.path, list(log.token_ids), entries, skipped, float(atol), float(rtol), first)
    if len(log.evaluations) > 1:
        report.notes.append(f"the log holds {len(log.evaluations)} graph evaluations (llama-debug's warm-up first); "
                            f"compared the one over the {ids.shape[1]} logged tokens")
    return report
