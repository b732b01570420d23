"""Run under mpiexec by tests/test_mpi.py: how a job ends when one rank fails (argv[1] = the mode).

  raise      rank 1 raises an uncaught exception while rank 0 waits in an allreduce
             -> MPI_Abort: the job ends, rank 1's traceback and a line naming the rank on stderr
  exit       rank 1 exits (os._exit(3)) while rank 0 waits -> the launcher ends the job
  check      rank 1 fails to "load": comm.check raises RankError on every rank, printed once by rank 0
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
print("unreachable: rank", comm.rank, flush=True)
