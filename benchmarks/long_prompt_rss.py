"""Peak RSS of generate() with a long prompt, against weights + KV cache (issue #15: <= 1.2x at 8k).

    python benchmarks/long_prompt_rss.py                                # 8192 tokens, one-shot prefill
    python benchmarks/long_prompt_rss.py --prefill-chunk-size 512       # the chunked prefill
    python benchmarks/long_prompt_rss.py --model DIR --prompt 8192 --cache-dtype bfloat16

One configuration per process, so the peak (getrusage ru_maxrss = VmHWM) is this run's: load the model
(memory-mapped; native backend, the checkpoint's weight format), then generate(max_new_tokens=1) on a
random (1, --prompt) prompt: the prefill, the LM head for the last position and one greedy pick; no decode
step (the first new token reaches max_length). Reported, in bytes: the weights as loaded
(`prepared_weights()["bytes"]`), the KV cache's buffers as allocated and as filled, peak RSS, and
peak / (weights + KV allocated). RSS is meaningful on a busy machine; the seconds printed are not a
benchmark.

The default checkpoint is benchmarks/bench.py's 2B-shape bf16 one (/tmp/gemma2np-bench/gemma-2-2b-bf16,
random weights of gemma-2-2b's shape); run bench.py once to write it if it is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = "/tmp/gemma2np-bench/gemma-2-2b-bf16"

# VmRSS / VmHWM / RssAnon / RssFile of this process in bytes: bench.py (the same directory) reads them
from bench import _proc_status as _status  # noqa: E402


def kv_bytes(cache) -> tuple[int, int]:
    """(allocated, filled) bytes of a Gemma2Cache's key + value buffers (positions not counted)."""
    alloc = filled = 0
    for i in range(len(cache)):
        k, v = cache._k[i], cache._v[i]
        if k is None:
            continue
        alloc += k.nbytes + v.nbytes
        filled += (k.nbytes + v.nbytes) // k.shape[2] * cache._n[i]
    return alloc, filled


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompt", type=int, default=8192, help="prompt tokens (default 8192)")
    ap.add_argument("--prefill-chunk-size", type=int, default=None, help="generate()'s prefill_chunk_size")
    ap.add_argument("--cache-dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--backend", default="native")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not os.path.isdir(args.model):
        sys.exit(f"{args.model} is not a directory: run benchmarks/bench.py once to write the 2B-shape checkpoint")
    sys.path.insert(0, ROOT)
    import numpy as np

    from gemma2np.modeling import Gemma2ForCausalLM

    t0 = time.time()
    model = Gemma2ForCausalLM.from_pretrained(args.model, backend=args.backend, cache_dtype=args.cache_dtype)
    after_load = _status()
    ids = np.random.default_rng(args.seed).integers(3, model.config.vocab_size, size=(1, args.prompt))
    t1 = time.time()
    out = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, prefill_chunk_size=args.prefill_chunk_size,
                         return_dict_in_generate=True)
    t2 = time.time()
    weights = model.prepared_weights()["bytes"]
    alloc, filled = kv_bytes(out.past_key_values)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    res = dict(model=args.model, backend=model.backend.name, prompt=args.prompt,
               prefill_chunk_size=args.prefill_chunk_size, cache_dtype=args.cache_dtype or "float32",
               weights_bytes=weights, kv_allocated_bytes=alloc, kv_filled_bytes=filled, peak_rss_bytes=peak,
               ratio=peak / (weights + alloc), rss_after_load=after_load, at_end=_status(),
               load_s=round(t1 - t0, 1), generate_s=round(t2 - t1, 1), next_token=int(out.sequences[0, -1]))
    print(json.dumps(res))
    G = 1e9
    print(f"prompt {args.prompt}, prefill_chunk_size {args.prefill_chunk_size}, cache {res['cache_dtype']}: "
          f"peak RSS {peak / G:.2f} GB = {res['ratio']:.3f} x (weights {weights / G:.2f} GB + KV {alloc / G:.2f} GB "
          f"allocated, {filled / G:.2f} GB filled)", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
