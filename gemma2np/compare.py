"""`gemma2np compare`: check another implementation's tensors against gemma2np, tensor by tensor.

A *reference file* (.npz or .safetensors) holds the input of one forward pass and any of the
tensors the other implementation computed for it:

* ``input_ids`` (B, T) integer (a 1-D (T,) array is taken as batch 1), required;
* ``attention_mask`` (B, T) 0/1, optional (padded positions are then left out of the comparison);
* ``position_ids`` (B, T) or (1, T), optional (default: transformers' forward default, arange);
* tensors under our canonical names, transformers' names (``hidden_states.{i}``, ``attentions.{i}``,
  ``logits``) or llama.cpp's callback names (``l_out-{il}``, ``result_output``, ...): see
  gemma2np.intermediates and docs/intermediates.md.

gemma2np runs the same input (no cache), and every reference tensor is compared with ours:
max / mean absolute error, max relative error, cosine similarity, for logits the top-1 / top-5
agreement, and ``ok`` = numpy.isclose(ours, reference, atol, rtol) everywhere, i.e.
``|ours - ref| <= atol + rtol * |ref|`` elementwise (NaN is never close). The report names the
FIRST tensor in forward order that is not ok -- under the name the reference file uses -- which is
where the other port's bug is (everything after it inherits the error).

Padded positions: when ``attention_mask`` is given, only positions where it is 1 are compared
(along the token axis: axis 1 of (B, T, ...) tensors, axis 2 of q / k / v / attention
probabilities). What a model computes at a pad position is implementation-defined garbage.

llama.cpp's own output is read directly, no reference file needed: ``--llamacpp-log FILE`` (the text
output of llama-eval-callback or llama-debug --verbose: gemma2np.llamacpp_log parses it,
gemma2np.llamacpp_compare compares the printed corner values and sums) and ``--llamacpp-logits FILE``
(llama-debug --save-logits' last-token logits, tokens from the -tokens.bin beside it, compared as
``result_output``). Both default to atol = rtol = 1e-3 (measured, see gemma2np.llamacpp_compare).
``--model`` may be a .gguf file.

Exit status of the CLI: 0 all tensors within tolerance, 1 some are not, 2 bad input (unreadable
file, no input_ids, unknown tensor name without --ignore-unknown, shape mismatch, missing model,
a truncated or malformed llama.cpp log).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from .intermediates import IntermediatesError, forward_order, load_tensors, lookup, run_with_intermediates, token_axis
from .llamacpp_compare import DEFAULT_LOG_ATOL, DEFAULT_LOG_RTOL, compare_llamacpp_log
from .llamacpp_log import LlamaCppLogError, read_log, read_logits

__all__ = [
    "CompareError",
    "TensorReport",
    "CompareReport",
    "compare_to_reference",
    "add_compare_parser",
    "run_compare",
    "main",
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
]

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
_LOGIT_NAMES = ("logits", "logits_raw")


class CompareError(ValueError):
    """The reference cannot be compared: missing input_ids, unknown names, shape mismatch, ..."""


@dataclass
class TensorReport:
    name: str  # as in the reference file
    canonical: str
    shape: tuple  # of the reference tensor, in our layout
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    ok: bool
    compared: int  # number of elements compared (padded positions left out)
    positions: str = "all"  # "all", or "last N" when the reference holds only the last N tokens
    top1: float | None = None
    top5: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        for k in ("max_abs", "mean_abs", "max_rel", "cosine", "top1", "top5"):
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = None  # JSON has no NaN / inf
        if self.top1 is None:
            del d["top1"], d["top5"]
        return d


@dataclass
class CompareReport:
    tensors: list[TensorReport]
    first_divergence: str | None
    atol: float
    rtol: float
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None

    def to_dict(self) -> dict:
        return {
            "tensors": [t.to_dict() for t in self.tensors],
            "first_divergence": self.first_divergence,
            "atol": self.atol,
            "rtol": self.rtol,
            "ok": self.ok,
            "ignored": list(self.ignored),
        }

    def format_table(self) -> str:
        head = ("name", "canonical", "shape", "max_abs", "mean_abs", "max_rel", "cosine", "top1", "top5", "ok")
        rows = []
        for t in self.tensors:
            shape = "x".join(map(str, t.shape)) + ("" if t.positions == "all" else f" ({t.positions})")
            rows.append((
                t.name, t.canonical if t.canonical != t.name else "", shape,
                _fmt(t.max_abs), _fmt(t.mean_abs), _fmt(t.max_rel), _fmt(t.cosine, cos=True),
                "" if t.top1 is None else f"{t.top1:.3f}", "" if t.top5 is None else f"{t.top5:.3f}",
                "ok" if t.ok else ("FIRST" if t.name == self.first_divergence else "no"),
            ))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append("")
        lines.append(f"tolerance: |ours - ref| <= {self.atol:g} + {self.rtol:g} * |ref| elementwise")
        if self.ignored:
            lines.append(f"ignored (unknown names): {', '.join(self.ignored)}")
        if self.ok:
            lines.append(f"OK: all {len(self.tensors)} tensors within tolerance")
        else:
            first = next(t for t in self.tensors if t.name == self.first_divergence)
            n_bad = sum(not t.ok for t in self.tensors)
            lines.append(f"DIVERGED: first divergence at {first.name}"
                         + (f" ({first.canonical})" if first.canonical != first.name else "")
                         + f"; {n_bad} of {len(self.tensors)} tensors out of tolerance")
        return "\n".join(lines)


def _fmt(x, cos=False):
    if x is None:
        return ""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.7f}" if cos else f"{x:.3e}"


# ----------------------------------------------------------------------------- the comparison


def _int_input(reference, key):
    a = np.asarray(reference[key])
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise CompareError(f"{key} must be an integer array, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise CompareError(f"{key} must have shape (batch, seq_len) or (seq_len,), got {a.shape}")
    return a.astype(np.int64)


def compare_to_reference(model, reference: dict, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                         ignore_unknown: bool = False) -> CompareReport:
    """Run `model` on reference["input_ids"] (+ attention_mask, position_ids) and compare every other tensor.

    Names may be canonical, transformers' or llama.cpp's (gemma2np.intermediates.lookup). Raises
    CompareError for input that cannot be compared (see the module docstring)."""
    if atol < 0 or rtol < 0 or not (math.isfinite(atol) and math.isfinite(rtol)):
        raise CompareError(f"atol and rtol must be finite and >= 0, got atol={atol}, rtol={rtol}")
    if "input_ids" not in reference:
        raise CompareError("the reference has no input_ids")
    input_ids = _int_input(reference, "input_ids")
    mask = None
    if "attention_mask" in reference:
        mask = _int_input(reference, "attention_mask")
        if mask.shape != input_ids.shape:
            raise CompareError(f"attention_mask has shape {mask.shape}, input_ids {input_ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise CompareError("attention_mask values must be 0 or 1")
    position_ids = _int_input(reference, "position_ids") if "position_ids" in reference else None

    c = model.config
    L = c.num_hidden_layers
    causal = hasattr(model, "lm_head")
    order = {n: k for k, n in enumerate(forward_order(L, causal_lm=True))}
    aliases, ignored = [], []
    for k, name in enumerate(n for n in reference if n not in INPUT_KEYS):
        try:
            alias = lookup(name, L)
        except IntermediatesError as exc:
            if ignore_unknown:
                ignored.append(name)
                continue
            raise CompareError(f"{exc} (use --ignore-unknown to skip such tensors)") from None
        if alias.canonical in _LOGIT_NAMES and not causal:
            raise CompareError(f"{name!r}: the model has no language-model head to compute logits")
        aliases.append((order[alias.canonical], k, alias))
    aliases.sort(key=lambda t: t[:2])
    if not aliases:
        raise CompareError("the reference holds no tensors to compare (only inputs"
                           + (f"; ignored: {', '.join(ignored)})" if ignored else ")"))

    needed = {a.canonical for _, _, a in aliases}
    try:
        ours = run_with_intermediates(model, input_ids, attention_mask=mask, position_ids=position_ids,
                                      names=needed.__contains__)
    except (ValueError, TypeError) as exc:  # InputError (token id out of range, ...) is a ValueError
        raise CompareError(f"gemma2np cannot run the reference input: {exc}") from None

    reports = []
    for _, _, alias in aliases:
        reports.append(_compare_one(alias, np.asarray(reference[alias.name]), ours[alias.canonical], mask, c,
                                    atol, rtol))
    first = next((r.name for r in reports if not r.ok), None)
    return CompareReport(reports, first, float(atol), float(rtol), ignored)


def _compare_one(alias, ref, got, mask, config, atol, rtol) -> TensorReport:
    name = alias.name
    if not (np.issubdtype(ref.dtype, np.floating) or ref.dtype.kind == "V" or str(ref.dtype) == "bfloat16"):
        raise CompareError(f"{name!r}: expected a floating-point tensor, got dtype {ref.dtype}")
    try:
        ref = alias.to_canonical(ref, config)
    except IntermediatesError as exc:
        raise CompareError(f"{name!r}: {exc}") from None
    ref = ref.astype(np.float64)
    got = np.asarray(got, dtype=np.float64)
    ax = token_axis(alias.canonical)
    positions = "all"
    valid = None if mask is None else mask.astype(bool)  # (B, T)

    if alias.canonical.endswith("attn_probs") and ref.ndim == 4 and ref.shape[:3] == got.shape[:3] \
            and ref.shape[3] > got.shape[3] and not ref[..., got.shape[3]:].any():
        ref = ref[..., : got.shape[3]]  # llama.cpp pads the KV cells: extra key columns are exactly 0
    if ref.shape != got.shape:
        fewer = (alias.allow_fewer_tokens and ref.ndim == got.ndim
                 and ref.shape[:ax] == got.shape[:ax] and ref.shape[ax + 1:] == got.shape[ax + 1:]
                 and 0 < ref.shape[ax] < got.shape[ax])
        if not fewer:
            raise CompareError(f"{name!r} has shape {tuple(ref.shape)} (in our layout), gemma2np's "
                               f"{alias.canonical} has {tuple(got.shape)}")
        n = ref.shape[ax]
        got = np.take(got, np.arange(got.shape[ax] - n, got.shape[ax]), axis=ax)
        valid = None if valid is None else valid[:, -n:]
        positions = f"last {n}"

    # bring the token axis next to the batch axis, keep only the real (unpadded) positions
    a = np.moveaxis(got, ax, 1)
    b = np.moveaxis(ref, ax, 1)
    if valid is not None:
        if valid.shape != a.shape[:2]:
            raise CompareError(f"{name!r}: attention_mask {valid.shape} does not match the tensor's "
                               f"(batch, tokens) {a.shape[:2]}")
        a, b = a[valid], b[valid]  # (N, ...)
    else:
        a, b = a.reshape((-1,) + a.shape[2:]), b.reshape((-1,) + b.shape[2:])

    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - b)
        close = np.isclose(a, b, atol=atol, rtol=rtol)
        finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
        if a.size == 0:
            max_abs = mean_abs = max_rel = 0.0
            cosine = 1.0
        else:
            max_abs = float(np.max(diff)) if finite else float("nan")
            mean_abs = float(np.mean(diff)) if finite else float("nan")
            big = np.abs(b) > atol  # relative error where |ref| is not dominated by atol
            max_rel = float(np.max(diff[big] / np.abs(b[big]))) if finite and big.any() else (0.0 if finite else float("nan"))
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            if not finite:
                cosine = float("nan")
            elif na == 0 and nb == 0:
                cosine = 1.0
            elif na == 0 or nb == 0:
                cosine = 0.0
            else:
                cosine = float(np.vdot(a, b) / (na * nb))
    top1 = top5 = None
    if alias.canonical in _LOGIT_NAMES and a.size:
        flat_a = a.reshape(-1, a.shape[-1])
        flat_b = b.reshape(-1, b.shape[-1])
        top1 = float(np.mean(np.argmax(flat_a, -1) == np.argmax(flat_b, -1)))
        k = min(5, flat_a.shape[-1])
        ta = np.argsort(-flat_a, axis=-1, kind="stable")[:, :k]
        tb = np.argsort(-flat_b, axis=-1, kind="stable")[:, :k]
        top5 = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta.tolist(), tb.tolist())]))
    return TensorReport(
        name=name, canonical=alias.canonical, shape=tuple(int(s) for s in ref.shape),
        max_abs=max_abs, mean_abs=mean_abs, max_rel=max_rel, cosine=cosine,
        ok=bool(close.all() and finite), compared=int(a.size), positions=positions, top1=top1, top5=top5,
    )


# ----------------------------------------------------------------------------- the command line


COMPARE_EPILOG = """\
examples:
  gemma2np compare --reference my_port.npz                         # against the bundled model
  gemma2np compare --model ~/gemma-2-2b --reference ref.safetensors --json report.json
  gemma2np compare --model ~/gemma-2-2b --reference ref.npz --dtype float64   # a float64 ground truth
  gemma2np compare --model ~/gemma-2-2b-Q8_0.gguf --reference ref.npz

making a reference file: run your implementation on some token ids and save the ids and whatever
tensors it computed, under our names (layers.{i}.attn_out, final_norm, logits, ...), transformers'
(hidden_states.{i}, attentions.{i}, logits) or llama.cpp's (l_out-{il}, result_output, ...); see
docs/intermediates.md for every name and layout. From Python:

  import numpy as np
  np.savez("ref.npz", input_ids=ids, logits=my_logits, **{"hidden_states.1": my_h1})

(a .safetensors with the same keys works too). To see the format, dump gemma2np's own tensors:
gemma2np.intermediates.run_with_intermediates + save_intermediates.
"""


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Register `compare` on an argparse subparsers object (gemma2np.cli); sets func=run_compare."""
    p = subparsers.add_parser(
        "compare",
        help="compare another implementation's tensors (npz/safetensors, llama.cpp logs) with gemma2np, tensor by tensor",
        description=__doc__.split("\n\n")[0] + " Exit status: 0 all within tolerance, 1 not, 2 bad input.",
        epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run_compare)
    return p


def _add_arguments(p):
    from .cli_models import add_model_args

    add_model_args(p, runtime=False)  # --model DIR|FILE.gguf (default: the bundled model), --gguf-file
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--reference", help=".npz or .safetensors with input_ids and named tensors")
    src.add_argument("--llamacpp-log", metavar="FILE",
                     help="the output of llama-eval-callback or llama-debug --verbose (stdout and stderr); "
                          "tokens from the log")
    src.add_argument("--llamacpp-logits", metavar="FILE",
                     help="llama-debug --save-logits' llamacpp-<model>.bin (tokens from the -tokens.bin beside it)")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    p.add_argument("--atol", type=float, default=None,
                   help=f"absolute tolerance (default {DEFAULT_ATOL:g}; llama.cpp logs and logits "
                        f"{DEFAULT_LOG_ATOL:g}, see gemma2np.llamacpp_compare)")
    p.add_argument("--rtol", type=float, default=None,
                   help=f"relative tolerance (default {DEFAULT_RTOL:g}; llama.cpp logs and logits {DEFAULT_LOG_RTOL:g})")
    p.add_argument("--backend", default=None, choices=("numpy", "native", "auto"),
                   help="gemma2np backend (default numpy, the reference; --weights bfloat16/int8 imply native)")
    p.add_argument("--weights", default=None, choices=("float32", "bfloat16", "int8", "int4"),
                   help="weight format of the native backend")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="gemma2np compute dtype (float64: a ground truth)")
    p.add_argument("--ignore-unknown", action="store_true",
                   help="skip tensors whose names we do not know instead of failing")


def _error(msg: str) -> int:
    print(f"gemma2np compare: error: {msg}", file=sys.stderr)
    return 2


def _check_reference_file(path: str) -> None:
    """Refuse, naming the problem, a file that is neither format (numpy's own message for a text file is
    about allow_pickle). .npz files are zip archives; safetensors start with an 8-byte header length and '{'."""
    if not os.path.isfile(path):
        raise IntermediatesError(f"{path}: no such file (the --reference file)")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:6] == b"\x93NUMPY":
        return  # .npz (a zip), or a bare .npy that load_tensors reports itself
    if len(head) == 9 and head[8:9] == b"{":
        return
    raise IntermediatesError(f"{path} is not a reference file: expected an .npz (numpy.savez) or .safetensors "
                             "holding input_ids and the tensors to check (see gemma2np compare --help)")


def run_compare(args) -> int:
    """Run the comparison for parsed arguments; print the table; return the exit status (0 / 1 / 2)."""
    from .cli_models import UserError, load_model, resolve_model

    llama = args.llamacpp_log is not None or args.llamacpp_logits is not None
    atol = args.atol if args.atol is not None else (DEFAULT_LOG_ATOL if llama else DEFAULT_ATOL)
    rtol = args.rtol if args.rtol is not None else (DEFAULT_LOG_RTOL if llama else DEFAULT_RTOL)
    log = None
    try:
        src = resolve_model(args)
        if args.llamacpp_log is not None:
            log = read_log(args.llamacpp_log)  # before loading the model: a bad log fails fast
            log.evaluation()
        elif args.reference is not None:
            _check_reference_file(args.reference)
            reference = load_tensors(args.reference)
        model = load_model(args, src, dtype=args.dtype)  # quiet: e.g. a classification head's score.weight
    except (UserError, IntermediatesError, LlamaCppLogError) as exc:
        return _error(str(exc))
    source = args.reference or args.llamacpp_log or args.llamacpp_logits
    try:
        if log is not None:
            report = compare_llamacpp_log(model, log, atol=atol, rtol=rtol)
            ids = np.asarray([log.token_ids])
        else:
            if args.llamacpp_logits is not None:
                logits, token_ids = read_logits(args.llamacpp_logits, model.config.vocab_size)
                # the last token's logits, under llama.cpp's name: compared with our last position
                reference = {"input_ids": token_ids[None], "result_output": logits[None]}
            report = compare_to_reference(model, reference, atol=atol, rtol=rtol, ignore_unknown=args.ignore_unknown)
            ids = np.asarray(reference["input_ids"])
    except (CompareError, LlamaCppLogError) as exc:
        return _error(str(exc))
    print(f"model: {src.label} (backend {model.backend.name}, {args.dtype})  reference: {source}  "
          f"input_ids: {tuple(ids.shape)}"
          + ("  attention_mask: yes (pads skipped)" if args.reference and "attention_mask" in reference else ""))
    print()
    print(report.format_table())
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report.to_dict(), f, indent=1)
        except OSError as exc:
            return _error(f"cannot write {args.json}: {exc}")
    return 0 if report.ok else 1


def main(argv=None) -> int:
    """`python -m gemma2np.compare ...` (the same options as `gemma2np compare`)."""
    p = argparse.ArgumentParser(prog="gemma2np compare", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return run_compare(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
