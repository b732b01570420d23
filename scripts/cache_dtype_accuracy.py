#!/usr/bin/env python3
"""Accuracy of the bfloat16 KV cache against the float32 one (docs/precision.md, "KV cache dtype").

For N prompts cut from a held-out text (<bos> + P tokens each, consecutive, non-overlapping), the same model
runs twice, once with cache_dtype="float32" and once with "bfloat16":

* teacher-forced decode: prefill the prompt, then feed the text's next M tokens one at a time (the cached
  decode path); at each of the M + 1 predicted positions KL(P_f32 || P_bf16) and whether the top-1 agrees;
* greedy generation: M new tokens from each prompt; the fraction of positions with the same token, how many
  of the N continuations are identical, and the mean index of the first differing token.

    python scripts/cache_dtype_accuracy.py --text val/timon_of_athens_gut.txt --backend numpy
    python scripts/cache_dtype_accuracy.py --text val/timon_of_athens_gut.txt --backend native

(val/ from scripts/prepare_corpus.py.) Prints one markdown row per run; --json writes the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma2np import Gemma2ForCausalLM, GemmaTokenizer  # noqa: E402
from gemma2np.cli import DEFAULT_MODEL_DIR  # noqa: E402


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def teacher_forced(model, prompt, cont):
    """Logits (M + 1, V) of the positions after the prompt and after each continuation token, decoded with the cache."""
    out = model(input_ids=prompt[None], use_cache=True, logits_to_keep=1)
    cache, rows = out.past_key_values, [out.logits[0, -1]]
    for t in cont:
        out = model(input_ids=np.array([[t]]), past_key_values=cache, use_cache=True)
        rows.append(out.logits[0, -1])
    return np.stack(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--text", required=True)
    ap.add_argument("--backend", default="numpy", choices=("numpy", "native"))
    ap.add_argument("--weights", default=None)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=191, help="text tokens per prompt (after <bos>)")
    ap.add_argument("--new", type=int, default=64, help="tokens decoded per prompt")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    tok = GemmaTokenizer.from_pretrained(args.model)
    ids = np.array(tok.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False), np.int64)
    span = args.prompt_len + args.new
    if ids.size < args.prompts * span:
        raise SystemExit(f"the text has {ids.size} tokens, {args.prompts} x {span} are needed")
    kw = dict(backend=args.backend, **({"weights": args.weights} if args.weights else {}))
    models = {cd: Gemma2ForCausalLM.from_pretrained(args.model, cache_dtype=cd, **kw) for cd in ("float32", "bfloat16")}
    bos = tok.bos_token_id
    kld, top1, same_tok, same_seq, first_diff = [], [], [], 0, []
    for n in range(args.prompts):
        piece = ids[n * span:(n + 1) * span]
        prompt = np.concatenate([[bos], piece[:args.prompt_len]]).astype(np.int64)
        cont = piece[args.prompt_len:]
        lp, lq = (log_softmax(teacher_forced(models[cd], prompt, cont)) for cd in ("float32", "bfloat16"))
        kld.append(np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=-1), 0.0))
        top1.append(lp.argmax(-1) == lq.argmax(-1))
        seqs = [models[cd].generate(prompt[None], max_new_tokens=args.new, do_sample=False, eos_token_id=None)
                [0, prompt.size:] for cd in ("float32", "bfloat16")]
        same = seqs[0] == seqs[1]
        same_tok.append(same)
        same_seq += bool(same.all())
        first_diff.append(int(np.argmin(same)) if not same.all() else args.new)
    kld, top1, same_tok = np.concatenate(kld), np.concatenate(top1), np.concatenate(same_tok)
    m = models["float32"]
    res = {
        "backend": args.backend, "weights": m.weights_format, "prompts": args.prompts,
        "prompt_tokens": args.prompt_len + 1, "new_tokens": args.new, "positions": int(kld.size),
        "kld_mean": float(kld.mean()), "kld_p99": float(np.quantile(kld, 0.99)), "kld_max": float(kld.max()),
        "top1": float(top1.mean()), "greedy_token_agreement": float(same_tok.mean()),
        "greedy_identical": same_seq, "greedy_first_diff_mean": float(np.mean(first_diff)),
    }
    print(f"| {args.backend} {m.weights_format} weights | {res['positions']} | {res['kld_mean']:.2e} | "
          f"{res['kld_p99']:.2e} | {res['kld_max']:.2e} | {100 * res['top1']:.2f} % | "
          f"{100 * res['greedy_token_agreement']:.2f} % | {same_seq}/{args.prompts} | "
          f"{res['greedy_first_diff_mean']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
