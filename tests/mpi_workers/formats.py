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
runs = [("numpy", "float64", None), ("numpy", "float32", None)]
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
    greedy = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)  # (the bundled model samples by default)
    g_tp = tp.generate(input_ids=ids[:, :8], **greedy)
    g_one = one.generate(input_ids=ids[:, :8], **greedy)
    res[f"{backend}/{dtype}/{weights}"] = {"max_diff": d, "greedy_equal": bool(np.array_equal(g_tp, g_one)),
                                           "max_abs_logit": float(np.abs(b.logits).max()),
                                           # the format's own error, one process against float32
                                           "format_error": float(np.abs(b.logits - f32).max())}
# a GGUF file (llama.cpp's layout, Q8_0 weights, written by tests/test_gguf.py's writer) loads tensor-parallel too
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from gemma2np import Gemma2Config  # noqa: E402
from gemma2np.checkpoint import load_state_dict  # noqa: E402

gguf_path = sys.argv[1] + ".q8_0.gguf"
if comm.rank == 0:
    import test_gguf

    cfg = Gemma2Config.from_pretrained(D)
    test_gguf.write_gguf(gguf_path, cfg, {k: np.asarray(v, np.float32) for k, v in load_state_dict(D).items()},
                         qtype=test_gguf.Q.Q8_0)
comm.barrier()
tp = Gemma2ForCausalLM.from_pretrained(D, gguf_file=gguf_path, tensor_parallel=True)(input_ids=ids).logits
one = Gemma2ForCausalLM.from_pretrained(D, gguf_file=gguf_path)(input_ids=ids).logits
res["gguf-q8_0/numpy"] = {"max_diff": float(np.abs(tp - one).max()), "greedy_equal": True,
                          "max_abs_logit": float(np.abs(one).max()),
                          "format_error": float(np.abs(one - f32).max())}
if native_available():  # the native backend runs the Q8_0 blocks as int8: row shards and whole-block columns
    tpm = Gemma2ForCausalLM.from_pretrained(D, gguf_file=gguf_path, tensor_parallel=True, backend="native")
    one = Gemma2ForCausalLM.from_pretrained(D, gguf_file=gguf_path, backend="native")(input_ids=ids).logits
    res["gguf-q8_0/native"] = {"max_diff": float(np.abs(tpm(input_ids=ids).logits - one).max()), "greedy_equal": True,
                               "format_error": float(np.abs(one - f32).max()),
                               "int8": all(h.fmt == "int8" for h in vars(tpm.model.layers[0]).values()
                                           if hasattr(h, "fmt"))}
# random init (from_config) tensor-parallel: one model across the ranks, seeded or not
small = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=256, sliding_window=8)
x = ids[:, :10] % 256
a = Gemma2ForCausalLM.from_config(small, seed=5, tensor_parallel=True)(input_ids=x).logits
b = Gemma2ForCausalLM.from_config(small, seed=5)(input_ids=x).logits
u = Gemma2ForCausalLM.from_config(small, seed=None, tensor_parallel=True)(input_ids=x).logits
res["from_config"] = {"max_diff": float(np.abs(a - b).max()), "greedy_equal": True, "max_abs_logit": 1.0,
                      "unseeded_ranks_agree": all(np.array_equal(v, u) for v in comm.allgather_obj(u))}
# save_pretrained: rank 0 writes the whole checkpoint (the others wait), and it reloads as the same model
saved = comm.bcast_obj(__import__("tempfile").mkdtemp(prefix="g2-tp-save-") if comm.rank == 0 else None)
Gemma2ForCausalLM.from_config(small, seed=5, tensor_parallel=True).save_pretrained(saved)
c = Gemma2ForCausalLM.from_pretrained(saved)(input_ids=x).logits
res["save_pretrained"] = {"max_diff": float(np.abs(c - b).max()), "greedy_equal": True, "max_abs_logit": 1e-6}
try:  # resizing the vocabulary would rebuild a whole LM head on every rank: refused, on every rank
    Gemma2ForCausalLM.from_config(small, seed=5, tensor_parallel=True).resize_token_embeddings(300)
    res["resize_refused"] = False
except ValueError as e:
    res["resize_refused"] = "does not run on a tensor-parallel model" in str(e)
comm.barrier()
if comm.rank == 0:
    __import__("shutil").rmtree(saved)
    __import__("os").remove(gguf_path)
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)
