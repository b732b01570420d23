"""Run under mpiexec by tests/test_mpi.py: the bundled model (bf16 checkpoint) tensor-parallel in every weight
format of the native backend, and the float64 ground truth of the NumPy reference, against the same format
in one process: logits of a 40-token prompt, a decode step through the (sharded) KV cache, and 16 greedy
tokens. Rank 0 writes {format: max|diff|, greedy tokens equal, the format's own error} to argv[1].
bf16 / int8 prefill rounds activations to bf16, so a float32 reordering that moves an activation across a
rounding boundary shows up as one bf16 step: TP differs from one process at the level of the format's own
rounding, which is why the driver bounds it by a fraction of the format's error against float32."""
import json
import sys

import numpy as np

from gemma2np import Gemma2ForCausalLM
from gemma2np.kernels import native_available
from gemma2np.parallel import get_comm

comm = get_comm()
D = "gemma2np/data/gemma2-shakespeare"
ids = np.random.default_rng(0).integers(3, 4096, size=(2, 40))
runs = [("numpy", "float64", None)]
if native_available():
    runs += [("native", "float32", "float32"), ("native", "float32", "bfloat16"), ("native", "float32", "int8")]
res = {}
f32 = Gemma2ForCausalLM.from_pretrained(D, weights="float32")(input_ids=ids).logits  # the float32 reference
for backend, dtype, weights in runs:
    kw = dict(backend=backend, dtype=dtype, weights=weights)
    tp = Gemma2ForCausalLM.from_pretrained(D, tensor_parallel=True, **kw)
    one = Gemma2ForCausalLM.from_pretrained(D, **kw)
    a, b = tp(input_ids=ids), one(input_ids=ids)
    nxt = np.argmax(b.logits[:, -1], -1)[:, None]
    a2 = tp(input_ids=nxt, past_key_values=a.past_key_values).logits
    b2 = one(input_ids=nxt, past_key_values=b.past_key_values).logits
    d = max(float(np.abs(a.logits - b.logits).max()), float(np.abs(a2 - b2).max()))
    g_tp = tp.generate(input_ids=ids[:, :8], max_new_tokens=16, min_new_tokens=16)
    g_one = one.generate(input_ids=ids[:, :8], max_new_tokens=16, min_new_tokens=16)
    res[f"{backend}/{dtype}/{weights}"] = {"max_diff": d, "greedy_equal": bool(np.array_equal(g_tp, g_one)),
                                           # the format's own error, one process against float32
                                           "format_error": float(np.abs(b.logits - f32).max())}
if comm.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)
