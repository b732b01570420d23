"""Past one machine: tensor parallelism (Megatron style) and data-parallel evaluation over MPI.

  comm.py      the collectives (allreduce sum, allgather, bcast, barrier, abort) over mpi4py, and
               the single-process identity implementation
  sharding.py  which slice of each weight a rank holds (ShardPlan)
  merge.py     the LM head's vocabulary shards merged: full logits, argmax, top-k
  data.py      map_windows: work items spread over ranks, results gathered on rank 0

mpi4py is optional (`pip install "gemma2np[mpi]"`); it is imported only when the launcher started
more than one process.
"""
from .comm import (Communicator, MPIComm, ParallelError, RankError, SingleProcessComm, get_comm,
                   install_abort_on_error, mpi_world_size)
from .data import map_windows
from .merge import gather_logits, global_argmax, global_topk, merge_argmax, merge_topk
from .sharding import ShardPlan, even_split

__all__ = ["Communicator", "MPIComm", "SingleProcessComm", "ParallelError", "RankError", "get_comm",
           "install_abort_on_error", "mpi_world_size", "map_windows", "gather_logits", "global_argmax",
           "global_topk", "merge_argmax", "merge_topk", "ShardPlan", "even_split"]
