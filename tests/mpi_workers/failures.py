"""Run under mpiexec by tests/test_mpi.py: how a job ends when one rank fails (argv[1] = the mode).

  raise      rank 1 raises an uncaught exception while rank 0 waits in an allreduce
             -> MPI_Abort: the job ends, rank 1's traceback and a line naming the rank on stderr
  exit       rank 1 exits (os._exit(3)) while rank 0 waits -> the launcher ends the job
  check      rank 1 fails to "load": comm.check raises RankError on every rank, printed once by rank 0
  loadfail   from_pretrained(tensor_parallel=True) where rank 1's directory does not exist: every rank
             raises, rank 0 prints one traceback naming rank 1's CheckpointError
  badinput   rank 0 calls the model with a token id past the vocabulary (the others with good ids): every
             rank raises rank 0's InputError (they all check rank 0's arguments), printed once
"""
import os
import sys
import time

import numpy as np

from gemma2np.parallel import get_comm, install_abort_on_error

comm = get_comm()
install_abort_on_error(comm)
mode = sys.argv[1]
if mode == "raise":
    if comm.rank == 1:
        time.sleep(0.2)
        raise FloatingPointError("rank one blew up")
    comm.allreduce_sum(np.ones(4, np.float32))
elif mode == "exit":
    if comm.rank == 1:
        time.sleep(0.2)
        os._exit(3)
    comm.allreduce_sum(np.ones(4, np.float32))
elif mode == "check":
    ok = comm.rank != 1
    comm.check(ok, "cannot read model.safetensors (simulated)", what="failed to load")
elif mode in ("loadfail", "badinput"):
    from gemma2np import Gemma2ForCausalLM

    d = "gemma2np/data/gemma2-shakespeare"
    if mode == "loadfail" and comm.rank == 1:
        d = "/nonexistent/model/dir"
    model = Gemma2ForCausalLM.from_pretrained(d, tensor_parallel=True)
    ids = np.array([[5, 99999 if comm.rank == 0 else 6]])
    model(input_ids=ids)
print("unreachable: rank", comm.rank, flush=True)
