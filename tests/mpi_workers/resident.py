"""Run under mpiexec by tests/test_mpi.py: resident weight memory per rank, measured (not counted).

Rank 0 writes a random float32 checkpoint (hidden 512, 4 layers, intermediate 4096, vocab 32000: 181 MB);
every rank loads it tensor-parallel on the NumPy reference (memory-mapped) and runs a forward pass that
touches every weight it holds; the growth of its resident set (/proc/self/status RssFile + RssAnon) is
its resident weight bytes. The same in one process (tensor_parallel=False) gives the whole. Rank 0
writes {whole, ranks: [...]} in bytes to argv[1]."""
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from gemma2np import Gemma2Config, Gemma2ForCausalLM
from gemma2np.parallel import get_comm

comm = get_comm()


def rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssFile", "RssAnon"):
                out[k] = int(v.split()[0]) * 1024
    return out["RssFile"] + out["RssAnon"]


cfg = Gemma2Config(hidden_size=512, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=64, vocab_size=32000, sliding_window=64)
d = None
if comm.rank == 0:
    d = tempfile.mkdtemp(prefix="g2-resident-")
    Gemma2ForCausalLM.from_config(cfg, seed=0).save_pretrained(d)
d = comm.bcast_obj(d)
ids = np.arange(5, 37)[None]


def resident(tp):
    before = rss()
    model = Gemma2ForCausalLM.from_pretrained(d, tensor_parallel=tp)
    model(input_ids=ids)
    grown = rss() - before
    weights = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    del model
    return grown, weights


tp_grown, weights = resident(True)
one_grown, _ = resident(False) if comm.rank == 0 else (None, None)
ranks = comm.gather_obj(tp_grown)
if comm.rank == 0:
    shutil.rmtree(d)
    with open(sys.argv[1], "w") as f:
        json.dump({"file_bytes": weights, "whole": one_grown, "ranks": ranks}, f)
