"""The few collectives tensor parallelism needs, over MPI (mpi4py) or a single process.

    comm = get_comm()          # MPIComm under `mpiexec -n N` (N > 1), else SingleProcessComm
    y = comm.allreduce_sum(x)  # the sum of every rank's x, bitwise the same on every rank
    parts = comm.allgather_obj(obj); comm.bcast_obj(obj); comm.barrier()
    comm.check(ok, message)    # collective error check: raises RankError on every rank if one failed

Numerics of allreduce_sum (why not MPI_Allreduce): MPI leaves the order of a floating-point sum to
the implementation (recursive doubling, ring, Rabenseifner...), so the result may depend on the
message size and, in principle, differ between ranks. Every rank here gathers all partial sums and
adds them in rank order, ((p0 + p1) + p2) + ...: deterministic, independent of the MPI library and
bitwise equal on every rank, so every rank holds the same hidden state, computes the same logits and
draws the same sampled token, and no rank's control flow can drift from rank 0's. The cost is
(N - 1) * nbytes received per rank instead of a ring's 2 (N - 1) / N * nbytes; Gemma's allreduce
payload is one hidden vector per token (9 KB at 2B, 18 KB at 27B), so per-message latency, not
bandwidth, is what matters (README, "Scaling model").

Failure behaviour: an MPI job cannot recover from a rank that stops taking part in collectives,
so `install_abort_on_error()` makes an uncaught exception on any rank print its traceback (with
the rank) and call MPI_Abort, which ends every rank at once instead of leaving the others waiting in
a collective forever. A rank that dies (killed, segfault, os._exit) is caught by the launcher:
mpiexec (hydra) and Slurm's srun end the whole job when one process exits abnormally.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

ABORT_GRACE_S = 0.5  # seconds between printing the reason for an abort and MPI_Abort (MPIComm.abort)

__all__ = ["ParallelError", "RankError", "Communicator", "SingleProcessComm", "MPIComm", "get_comm",
           "mpi_world_size", "install_abort_on_error"]


class ParallelError(ValueError):
    """A tensor-parallel setup that cannot work (bad split, no MPI, a mismatch between ranks)."""


class RankError(ParallelError):
    """Some rank failed (to load, or to validate its input); raised on every rank by `check`."""


class Communicator:
    """The interface: rank, size and the collectives. Every method is collective: all ranks call it."""

    rank: int = 0
    size: int = 1

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def allgather(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        """Concatenate every rank's x along `axis` (rank order); the sizes along axis may differ."""
        raise NotImplementedError

    def allgather_obj(self, obj) -> list:
        raise NotImplementedError

    def gather_obj(self, obj, root: int = 0):
        """A list of every rank's obj on `root`, None elsewhere."""
        raise NotImplementedError

    def bcast_obj(self, obj, root: int = 0):
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def abort(self, message: str, code: int = 1):
        raise NotImplementedError

    # ------------------------------------------------------------------ built on the above
    def check(self, ok: bool, message: str = "", what: str = "failed") -> None:
        """Collective error check: every rank says whether it succeeded; if any did not, every rank
        raises the same RankError naming the failed ranks and their messages (so rank 0 can report
        it once and all ranks leave together, instead of the healthy ones waiting in a collective)."""
        reports = self.allgather_obj((bool(ok), "" if ok else str(message)))
        bad = [(r, m) for r, (o, m) in enumerate(reports) if not o]
        if bad:
            detail = "; ".join(f"rank {r}: {m}" for r, m in bad)
            raise RankError(f"{len(bad)} of {self.size} rank(s) {what}: {detail}")

    @property
    def is_root(self) -> bool:
        return self.rank == 0


class SingleProcessComm(Communicator):
    """One process: every collective is the identity (allreduce of one partial sum is that sum)."""

    rank, size = 0, 1

    def allreduce_sum(self, x):
        return x

    def allgather(self, x, axis=-1):
        return x

    def allgather_obj(self, obj):
        return [obj]

    def gather_obj(self, obj, root=0):
        return [obj]

    def bcast_obj(self, obj, root=0):
        return obj

    def barrier(self):
        pass

    def abort(self, message, code=1):
        raise ParallelError(message)


class MPIComm(Communicator):
    """mpi4py's COMM_WORLD (or a given communicator). Arrays go through the buffer interface (no
    pickling); `bytes_sent` counts the payload this rank contributed to collectives (for benchmarks)."""

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.bytes_sent = 0
        self.n_allreduce = 0
        # a communicator of its own for failure agreement (all_failed), so that it can never match a
        # collective the healthy ranks are in on the main one
        self._failures = self.comm.Dup()

    def allreduce_sum(self, x):
        x = np.ascontiguousarray(x)
        buf = np.empty((self.size,) + x.shape, x.dtype)
        self.comm.Allgather(x, buf)
        self.bytes_sent += x.nbytes
        self.n_allreduce += 1
        # rank order, one addition at a time: see the module docstring
        acc = buf[0].copy()
        for r in range(1, self.size):
            acc += buf[r]
        return acc

    def allgather(self, x, axis=-1):
        x = np.ascontiguousarray(x)
        axis = axis % x.ndim
        moved = np.ascontiguousarray(np.moveaxis(x, axis, 0))
        lengths = self.comm.allgather(moved.shape[0])  # one small exchange: every rank's length along axis
        row = int(np.prod(moved.shape[1:]))  # the other axes are the same on every rank
        counts = [n * row for n in lengths]
        buf = np.empty(sum(counts), x.dtype)
        self.comm.Allgatherv(moved, (buf, counts))
        self.bytes_sent += x.nbytes
        parts, start = [], 0
        for n, c in zip(lengths, counts):
            parts.append(buf[start:start + c].reshape((n,) + moved.shape[1:]))
            start += c
        return np.moveaxis(np.concatenate(parts, axis=0), 0, axis)

    def allgather_obj(self, obj):
        return self.comm.allgather(obj)

    def gather_obj(self, obj, root=0):
        return self.comm.gather(obj, root=root)

    def bcast_obj(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, message, code=1):
        err = sys.__stderr__ or sys.stderr  # the real stderr (the CLI silences ranks > 0's sys.stderr)
        err.write(f"gemma2np [rank {self.rank}/{self.size}]: {message}\n")
        err.flush()
        # the launcher forwards our stderr from a pipe; MPI_Abort makes it kill every rank and exit, and
        # hydra can do that before it has read what is still in the pipe (the message was lost in about
        # one run in ten). A moment's grace lets it drain: the job is ending anyway.
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)

    def all_failed(self, timeout: float = 10.0) -> bool:
        """Called by a rank that hit an error outside any collective check: True when every rank calls it
        within `timeout` s (they all failed the same way, e.g. the same bad argument), so they can leave
        together and rank 0 report it once; False when some rank is elsewhere (then the job must abort)."""
        req = self._failures.Ibarrier()
        deadline = time.monotonic() + timeout
        while not req.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def wait_all(self, timeout: float, what: str) -> None:
        """A barrier with a deadline: if some rank does not arrive within `timeout` seconds (stuck,
        or still loading a file it cannot read), abort the job with a message instead of waiting."""
        req = self.comm.Ibarrier()
        deadline = time.monotonic() + timeout
        while not req.Test():
            if time.monotonic() > deadline:
                self.abort(f"{what}: not every rank arrived within {timeout:.0f} s; aborting the job")
            time.sleep(0.001)


def mpi_world_size() -> int:
    """The number of processes the launcher started, read from its environment WITHOUT importing MPI
    (importing mpi4py initialises MPI, which a plain single-process run should not pay for).
    MPICH/hydra and srun --mpi=pmi2: PMI_SIZE; Open MPI: OMPI_COMM_WORLD_SIZE; srun --mpi=pmix:
    SLURM_NTASKS next to PMIX_RANK."""
    env = os.environ
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if env.get(var, "").isdigit():
            return int(env[var])
    if "PMIX_RANK" in env and env.get("SLURM_NTASKS", "").isdigit():
        return int(env["SLURM_NTASKS"])
    return 1


_WORLD = None


def get_comm() -> Communicator:
    """The world communicator: MPIComm when launched with more than one process, else the identity.
    Raises ParallelError (not ImportError) when the launcher started several processes but mpi4py
    is missing, naming the package extra that brings it."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if mpi_world_size() <= 1:
        _WORLD = SingleProcessComm()
        return _WORLD
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        raise ParallelError("this run was started by an MPI launcher but mpi4py is not installed: "
                            "pip install 'gemma2np[mpi]'") from e
    _WORLD = MPIComm()
    if _WORLD.size == 1:
        _WORLD = SingleProcessComm()
    return _WORLD


_HOOKED = False


def install_abort_on_error(comm: Communicator) -> None:
    """Once per process, with more than one rank: an uncaught exception prints its traceback tagged
    with the rank, then MPI_Abort ends the whole job (mpi4py's `python -m mpi4py` does the same).
    Exceptions that every rank raised together after a collective check (RankError, and errors rank 0
    found in the input and broadcast; marked `_g2_reported_on_root`) are printed by rank 0 only."""
    global _HOOKED
    if _HOOKED or comm.size <= 1:
        return
    _HOOKED = True
    previous = sys.excepthook

    def hook(etype, value, tb):
        collective = isinstance(value, RankError) or getattr(value, "_g2_reported_on_root", False)
        if collective:
            # every rank raised the same error at the same point: nobody is stuck in a collective. Rank 0
            # prints it; then all meet (so no rank's exit makes the launcher kill rank 0 mid-print) and
            # leave normally, exit status 1; a rank that never arrives makes it an abort after all.
            if comm.rank == 0:
                previous(etype, value, tb)
            sys.stdout.flush()
            sys.stderr.flush()
            if getattr(comm, "all_failed", lambda timeout: True)(timeout=60.0):
                return
            comm.abort(f"{etype.__name__}: {value} (some rank did not leave with the others)")
        sys.stderr.write(f"gemma2np [rank {comm.rank}/{comm.size}]: uncaught exception, aborting the MPI job\n")
        previous(etype, value, tb)
        sys.stderr.flush()
        comm.abort(f"{etype.__name__}: {value}")

    sys.excepthook = hook
