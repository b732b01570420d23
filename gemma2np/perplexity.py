"""`gemma2np perplexity`: a model's perplexity over a text, and its KL divergence from a reference model.

How quantized ports are judged (llama.cpp's `llama-perplexity --kl-divergence`), over a corpus:

* The text is tokenized without special tokens and cut into **non-overlapping windows**: each is
  ``<bos>`` followed by the next N - 1 text tokens (N = ``--ctx``); a last partial window is dropped.
* In every window each position after the first is scored: position t predicts token t + 1, so
  N - 1 tokens per window, with NLL_t = -log softmax(logits_t)[token_{t+1}]. The mean over a window
  is exactly the loss transformers computes with ``labels=input_ids`` (its shift drops the first
  label). **perplexity = exp(mean NLL)** over every scored token of every window.
* With ``--against REF`` (another weight format, a GGUF, or ``float32``: the same checkpoint on
  the float32 NumPy reference) REF runs the same windows, and per scored token:
  ``KL(P_ref || P_model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v))`` (the reference is the
  distribution we approximate, as in llama.cpp's --kl-divergence), reported as mean, 99th percentile
  and max, and top-1 agreement (the two argmaxes equal), plus the perplexity of both.

Log-probabilities are computed in float64 from each model's float32 logits (after the final softcap),
so the statistics do not add rounding of their own; a KLD that comes out below 0 by rounding is 0.

`score_windows(model, windows, reference=None)` is the unit of work: a list of windows in, one
`WindowScore` per window out, independent of every other window. Data-parallel runs (MPI ranks, issue
11) split the window list, call it on their share and gather the scores; `summarize` then gives the
same figures as a single process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from .parallel import get_comm, map_windows

__all__ = ["PerplexityError", "WindowScore", "make_windows", "score_windows", "summarize",
           "add_perplexity_parser", "run_perplexity"]


class PerplexityError(ValueError):
    """Input that cannot be scored: a text too short for one window, a bad --ctx, models that do not match."""


@dataclass
class WindowScore:
    nll: np.ndarray  # (N - 1,) float64, the model's NLL of tokens 1 .. N - 1
    ref_nll: np.ndarray | None = None  # the same for the reference model
    kld: np.ndarray | None = None  # (N - 1,) KL(P_ref || P_model) at positions 0 .. N - 2
    top1: np.ndarray | None = None  # (N - 1,) bool, argmax equal


def make_windows(text_ids, ctx: int, bos_id: int, max_windows: int | None = None) -> np.ndarray:
    """(W, ctx) int64 windows: <bos> + ctx - 1 consecutive text tokens each, non-overlapping."""
    if not isinstance(ctx, (int, np.integer)) or ctx < 2:
        raise PerplexityError(f"--ctx must be at least 2 (<bos> and one scored token), got {ctx}")
    ids = np.asarray(text_ids, dtype=np.int64).ravel()
    n = ids.size // (ctx - 1)
    if max_windows is not None:
        if max_windows < 1:
            raise PerplexityError(f"--max-windows must be at least 1, got {max_windows}")
        n = min(n, int(max_windows))
    if n == 0:
        raise PerplexityError(f"the text has {ids.size} tokens, fewer than the {ctx - 1} one window of --ctx {ctx} "
                              "needs: use a longer text or a smaller --ctx")
    body = ids[: n * (ctx - 1)].reshape(n, ctx - 1)
    return np.concatenate([np.full((n, 1), bos_id, np.int64), body], axis=1)


def _log_probs(model, window: np.ndarray) -> np.ndarray:
    # with a cache dtype (--cache-dtype) the window runs through a cache of that dtype, so every query attends to
    # the stored (e.g. bf16-rounded) keys and values, as cached decoding does; else no cache (the same numbers)
    use_cache = getattr(model, "cache_dtype", None) is not None
    logits = model(input_ids=window[None], use_cache=use_cache).logits[0, :-1]  # (N - 1, V): positions 0 .. N - 2
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def score_windows(model, windows, reference=None, progress=None) -> list[WindowScore]:
    """Score each window with `model` (and `reference`, for KLD / top-1). Windows are independent."""
    out = []
    for k, w in enumerate(windows):
        w = np.asarray(w, dtype=np.int64)
        lp = _log_probs(model, w)
        target = w[1:]
        rows = np.arange(target.size)
        score = WindowScore(nll=-lp[rows, target])
        if reference is not None:
            lq = _log_probs(reference, w)
            score.ref_nll = -lq[rows, target]
            kld = np.sum(np.exp(lq) * (lq - lp), axis=-1)
            score.kld = np.maximum(kld, 0.0)  # >= 0 in exact arithmetic; clamp rounding below 0
            score.top1 = np.argmax(lp, axis=-1) == np.argmax(lq, axis=-1)
        out.append(score)
        if progress is not None:
            progress(k + 1, len(windows))
    return out


def summarize(scores: list[WindowScore], ctx: int) -> dict:
    """The report (the JSON of --json) from the scores of every window."""
    nll = np.concatenate([s.nll for s in scores])
    res = {"perplexity": float(np.exp(nll.mean())), "mean_nll": float(nll.mean()),
           "tokens_scored": int(nll.size), "windows": len(scores), "ctx": int(ctx)}
    if scores and scores[0].kld is not None:
        kld = np.concatenate([s.kld for s in scores])
        ref = np.concatenate([s.ref_nll for s in scores])
        res.update({
            "kld_mean": float(kld.mean()),
            "kld_p99": float(np.percentile(kld, 99)),
            "kld_max": float(kld.max()),
            "top1": float(np.mean(np.concatenate([s.top1 for s in scores]))),
            "perplexity_against": float(np.exp(ref.mean())),
        })
    return res


# ----------------------------------------------------------------------------- the command line


EPILOG = """\
examples:
  gemma2np perplexity --text val.txt --ctx 256                                   # the bundled model
  gemma2np perplexity --text val.txt --ctx 256 --backend native --weights int8 --against float32
  gemma2np perplexity --model shakespeare-q4_0.gguf --tokenizer DIR --text val.txt --ctx 256 --against DIR

--against float32 is the same checkpoint on the float32 NumPy reference. KLD is KL(P_against || P_model).
"""


def add_perplexity_parser(subparsers) -> argparse.ArgumentParser:
    """Register `perplexity` on an argparse subparsers object (gemma2np.cli); sets func=run_perplexity."""
    p = subparsers.add_parser(
        "perplexity", help="perplexity over a text, and KL divergence from a reference model",
        description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF-format model directory or a llama.cpp .gguf (default: the bundled model)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="directory with tokenizer.model (default: the model directory / the .gguf's directory)")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    p.add_argument("--ctx", type=int, required=True, metavar="N", help="window length in tokens, <bos> included")
    p.add_argument("--max-windows", type=int, default=None, metavar="K", help="score only the first K windows")
    p.add_argument("--backend", choices=("numpy", "native"), default="numpy", help="backend of --model")
    p.add_argument("--weights", choices=("float32", "bfloat16", "int8", "int4"), default=None,
                   help="weight format of the native backend")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute dtype of --model")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="threads of the native backend")
    p.add_argument("--cache-dtype", choices=("float32", "bfloat16"), default=None,
                   help="score each window through a KV cache of this dtype (default: no cache)")
    p.add_argument("--against", metavar="REF", default=None,
                   help="reference model: a directory, a .gguf, or `float32` (this checkpoint, float32 NumPy)")
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    p.set_defaults(func=run_perplexity)
    return p


def _error(msg: str) -> int:
    print(f"gemma2np perplexity: error: {msg}", file=sys.stderr)
    return 2


def _load(path: str, **kw):
    from .modeling import Gemma2ForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.endswith(".gguf"):
            if not os.path.isfile(path):
                raise OSError(f"no such file: {path}")
            return Gemma2ForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                     gguf_file=os.path.basename(path), **kw)
        if not os.path.isdir(path):
            raise OSError(f"model directory not found: {path}")
        return Gemma2ForCausalLM.from_pretrained(path, **kw)


class _Bar:
    def __init__(self, label):
        self.label = label

    def __call__(self, done, total):
        n = int(30 * done / max(total, 1))
        sys.stderr.write(f"\r{self.label} [{'#' * n}{'.' * (30 - n)}] {done}/{total} windows")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run_perplexity(args) -> int:
    from .cli import DEFAULT_MODEL_DIR
    from .tokenizer import GemmaTokenizer

    path = args.model or DEFAULT_MODEL_DIR
    tok_dir = args.tokenizer or (os.path.dirname(os.path.abspath(path)) if path.endswith(".gguf") else path)
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        return _error(f"cannot read --text {args.text}: {exc}")
    kw = dict(backend=args.backend, weights=args.weights, dtype=args.dtype, n_threads=args.threads,
              cache_dtype=args.cache_dtype)
    try:
        model = _load(path, **kw)
        reference = None
        if args.against == "float32":
            reference = _load(path, backend="numpy", dtype="float32")
        elif args.against is not None:
            reference = _load(args.against, backend="numpy", dtype="float32")
    except (ValueError, OSError, KeyError, ImportError) as exc:
        return _error(f"cannot load a model: {' '.join(str(exc).split())}")
    try:
        tok = GemmaTokenizer.from_pretrained(tok_dir)
    except (ValueError, OSError) as exc:
        return _error(f"cannot load the tokenizer from {tok_dir} (pass --tokenizer DIR): {' '.join(str(exc).split())}")
    if reference is not None and reference.config.vocab_size != model.config.vocab_size:
        return _error(f"--against has a vocabulary of {reference.config.vocab_size} tokens, the model "
                      f"{model.config.vocab_size}: KL divergence needs the same vocabulary")
    try:
        ids = tok.encode(text, add_special_tokens=False)
        if ids and max(ids) >= model.config.vocab_size:
            raise PerplexityError(f"the tokenizer produced id {max(ids)} but the model has {model.config.vocab_size} "
                                  "tokens: tokenizer and model do not match")
        if args.ctx is not None and args.ctx > model.config.max_position_embeddings:
            raise PerplexityError(f"--ctx {args.ctx} exceeds the model's context of "
                                  f"{model.config.max_position_embeddings} tokens")
        windows = make_windows(ids, args.ctx, tok.bos_token_id, args.max_windows)
    except PerplexityError as exc:
        return _error(str(exc))
    bar = _Bar("scoring") if sys.stderr.isatty() else None  # like the loading bar of gemma2np.cli
    comm = get_comm()
    if comm.size > 1:
        # under mpiexec: data-parallel, each rank scores windows rank, rank + N, ... with its whole model;
        # rank 0 gathers them in window order, so summarize adds exactly what one process adds
        scores = map_windows(lambda w: score_windows(model, [w], reference)[0], windows, comm,
                             broadcast_items=False)  # every rank tokenized the same text
        if comm.rank != 0:
            return 0
    else:
        scores = score_windows(model, windows, reference, progress=bar)
    res = summarize(scores, args.ctx)
    cache_note = f", {args.cache_dtype} KV cache" if args.cache_dtype else ""
    print(f"model: {path} (backend {model.backend.name}, {args.weights or 'as stored'}, {args.dtype}{cache_note})  "
          f"text: {args.text} ({len(ids)} tokens)")
    print(f"{res['windows']} windows of {res['ctx']} tokens (<bos> + {res['ctx'] - 1}), {res['tokens_scored']} tokens "
          f"scored")
    print(f"perplexity {res['perplexity']:.4f}  (mean NLL {res['mean_nll']:.5f} nats/token)")
    if reference is not None:
        print(f"against {args.against}: perplexity {res['perplexity_against']:.4f}; "
              f"KLD mean {res['kld_mean']:.3e}  p99 {res['kld_p99']:.3e}  max {res['kld_max']:.3e}; "
              f"top-1 agreement {100 * res['top1']:.2f} %")
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(res, f, indent=1)
        except OSError as exc:
            return _error(f"cannot write {args.json}: {exc}")
    return 0
