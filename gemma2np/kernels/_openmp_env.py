"""OpenMP defaults for the native backend, put into the environment before the extension loads.

Why (issue 13, "under load"): an OpenMP worker thread that has finished its share does not sleep
at once, it spins waiting for the next parallel region -- libgomp's default is 300,000 spins, about
3 ms (its own estimate; several ms with the slow `pause` of recent x86 cores), and LLVM's libomp
keeps spinning for KMP_BLOCKTIME = 200 ms. On an idle machine that hides the wake-up cost. On a
busy one (another busy process on every core) the spinning threads burn the CPU time the scheduler
would give the thread with real work, and a thread that has spent its slice is then descheduled
in the middle of the next region, holding the join for a whole time slice: decoding with the bundled
model at 2 threads ran at 2-36 tok/s there, against ~600 at 1 thread.

What: unless the user has chosen a wait policy, bound the spinning --

  GOMP_SPINCOUNT = GOMP_SPINCOUNT_DEFAULT  (libgomp, GCC builds)   unless OMP_WAIT_POLICY or
                                                                   GOMP_SPINCOUNT is set
  KMP_BLOCKTIME  = KMP_BLOCKTIME_DEFAULT   (LLVM / Intel libomp)   unless OMP_WAIT_POLICY or
                                                                   KMP_BLOCKTIME is set

so a waiting thread spins a few microseconds (catching back-to-back regions inside one kernel) and
then sleeps until the next region wakes it. The user's own settings always win: a variable that is
already in the environment, or OMP_WAIT_POLICY (which libgomp's GOMP_SPINCOUNT would override), is
never touched; GEMMA2NP_OMP_DEFAULTS=0 turns the whole thing off. The kernels themselves also keep
small work on the calling thread (csrc: g2_set_parallel_threshold), so this mostly matters for the
larger ops.

Limits: an OpenMP runtime reads these variables once, when it is loaded. If another library in the
process loaded the same runtime before gemma2np's extension, the defaults do not reach it (set the
variables yourself before starting Python then). They are process environment variables: OpenMP
runtimes loaded later in the process (e.g. by torch) and child processes see them too.
"""
from __future__ import annotations

import os
from typing import MutableMapping

GOMP_SPINCOUNT_DEFAULT = "1000"
KMP_BLOCKTIME_DEFAULT = "0"

__all__ = ["apply_defaults", "GOMP_SPINCOUNT_DEFAULT", "KMP_BLOCKTIME_DEFAULT"]


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put the defaults above into `environ` (default os.environ) where the user has not chosen.
    Returns the variables it set (empty if it set none)."""
    env = os.environ if environ is None else environ
    if env.get("GEMMA2NP_OMP_DEFAULTS", "").strip() == "0" or "OMP_WAIT_POLICY" in env:
        return {}
    done = {}
    for key, value in (("GOMP_SPINCOUNT", GOMP_SPINCOUNT_DEFAULT), ("KMP_BLOCKTIME", KMP_BLOCKTIME_DEFAULT)):
        if key not in env:
            env[key] = value
            done[key] = value
    return done
