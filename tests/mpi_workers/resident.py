"""Run by tests/test_mpi.py, under mpiexec (argv[3] = "tp") or as one process ("one"): resident weight memory,
measured (not counted). Every rank loads the float32 checkpoint argv[1] memory-mapped on the NumPy
reference, tensor-parallel or not, and runs a forward pass that touches every weight it holds; the growth of
its resident set (/proc/self/status RssFile + RssAnon) over load + forward is its resident weight bytes.
Rank 0 writes {"ranks": [bytes per rank]} to argv[2]. One process per measurement, so no mapping of an
earlier model can be shared with a later one."""
import json
import sys

import numpy as np

from gemma2np import Gemma2ForCausalLM
from gemma2np.parallel import get_comm

directory, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
comm = get_comm()


def rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssFile", "RssAnon"):
                out[k] = int(v.split()[0]) * 1024
    return out["RssFile"] + out["RssAnon"]


before = rss()
model = Gemma2ForCausalLM.from_pretrained(directory, tensor_parallel=(mode == "tp"))
model(input_ids=np.arange(5, 37)[None])
ranks = comm.gather_obj(rss() - before)
if comm.rank == 0:
    with open(out, "w") as f:
        json.dump({"ranks": ranks}, f)
