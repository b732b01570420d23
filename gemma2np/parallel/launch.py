"""The command line under `mpiexec -n N gemma2np generate ...` (N > 1): one tensor-parallel job.

`cli_session(args)` wraps one CLI command; with one process it does nothing. With N > 1:
  * only rank 0 prints: the other ranks' stdout / stderr go to /dev/null (what they would print is
    what rank 0 prints: every rank follows rank 0's generate call, tensor_parallel.py);
  * only rank 0 reads the prompt: the others get a placeholder (their arguments are replaced by rank
    0's inside generate), so --prompt-file / stdin need to exist on rank 0's host only;
  * only the commands in TP_COMMANDS run; any other exits with one error line (code 2) on rank 0;
  * an error raised on every rank together (a collective load check, bad input checked the same way
    on every rank, or every rank failing within 10 s: comm.all_failed) is left to the CLI's own handler,
    which rank 0 alone prints; any other exception (say, an error on rank 0 alone) would leave the other
    ranks waiting in a collective, so it is printed on the real stderr of its rank and ends the job with
    MPI_Abort.
"""
from __future__ import annotations

import contextlib
import os
import sys

from .comm import RankError, get_comm, install_abort_on_error, mpi_world_size

__all__ = ["cli_session", "TP_COMMANDS", "DP_COMMANDS", "is_collective"]

TP_COMMANDS = ("generate",)  # tensor-parallel: every rank holds a slice of the model
DP_COMMANDS = ("perplexity",)  # data-parallel: every rank holds the whole model and scores its share of windows
SILENCED = False  # True on ranks > 0 once their stdout / stderr go to /dev/null (they keep their streamer)


def is_collective(exc: BaseException) -> bool:
    """Raised on every rank at the same point (so no rank is left inside a collective): a RankError, an
    error marked by tensor_parallel._run_collectively / load_collectively, or one raised from such an error."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, RankError) or getattr(exc, "_g2_reported_on_root", False):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


@contextlib.contextmanager
def cli_session(args):
    if mpi_world_size() <= 1:
        yield None
        return
    comm = get_comm()
    install_abort_on_error(comm)
    command = getattr(args, "command", None)
    if command not in TP_COMMANDS + DP_COMMANDS:
        if comm.rank == 0:
            print(f"gemma2np {command}: error: under mpiexec ({comm.size} processes) only "
                  f"{', '.join(TP_COMMANDS)} runs (tensor-parallel), and {', '.join(DP_COMMANDS)} (data-parallel); "
                  f"run {command} as one process", file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(2)
    if comm.rank != 0:
        global SILENCED
        devnull = open(os.devnull, "w")
        sys.stdout = sys.stderr = devnull
        SILENCED = True
        if hasattr(args, "prompt"):
            # a placeholder: rank 0's prompt is what every rank generates from (tensor_parallel.py)
            args.prompt, args.prompt_file = "(the prompt of rank 0)", None
    try:
        yield comm
    except BaseException as e:  # noqa: B036 (KeyboardInterrupt and SystemExit too: the job must end)
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        if is_collective(e) or comm.all_failed():
            raise  # every rank raised it: the CLI's handler reports it, printed by rank 0 only
        sys.__stderr__.write(f"gemma2np {command} [rank {comm.rank}/{comm.size}]: error: "
                             f"{' '.join(str(e).split()) or type(e).__name__}\n")
        sys.__stderr__.flush()
        comm.abort(f"ending the job: rank {comm.rank} failed alone", code=130 if isinstance(e, KeyboardInterrupt) else 2)
