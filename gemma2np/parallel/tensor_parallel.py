"""What the model calls to run tensor-parallel (or not): one object per model, `model.tp`.

    tp = Unsplit(config)                      # one process: every hook is the identity
    tp = TensorParallel(config, get_comm())   # under mpiexec: this rank's shard (sharding.ShardPlan)

The model uses, unconditionally:
    tp.shard(name, array)    at load: this rank's slice of a weight (by its HF name)
    tp.n_heads, tp.n_kv_heads  the heads its decoder layers compute (and its KV cache holds)
    tp.allreduce(x)          after o_proj and after down_proj: the sum of the ranks' partial outputs
    tp.gather_vocab(logits)  after the LM head: the full (..., vocab) logits on every rank
    tp.gather_heads(probs)   output_attentions: (B, H, T, S) from the ranks' heads
and, when tensor-parallel, wraps the public forward / generate so that every rank runs rank 0's call
(`follow_root`): the other ranks may run the same script (SPMD, as MPI programs do) or pass anything;
they compute with rank 0's arguments, in lockstep with its collectives.

Why every rank gets identical numbers: the allreduce adds the partial sums in rank order on every
rank (comm.py), so the hidden state, the logits and hence every sampled token are bitwise the same on
all ranks; generate's random generator is synchronised from rank 0 as well. Against one process the
results differ only by the order of the sums that were split (o_proj, down_proj): well within 1e-5.

Failure behaviour: a call with bad input raises on every rank at the same point (every rank checks
rank 0's arguments the same way) and only rank 0 prints it (comm.install_abort_on_error); any other
exception inside a tensor-parallel call may leave the other ranks waiting in a collective, so it
aborts the job with its message.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from . import launch
from .comm import Communicator, ParallelError, RankError, get_comm, install_abort_on_error
from .sharding import ShardPlan

__all__ = ["Unsplit", "TensorParallel", "make_tensor_parallel", "weight_bytes", "load_collectively"]

# objects of generate() that stay rank-local (not broadcast): followers stream nothing, keep their own
# callables (the same script makes the same ones) and their own KV cache (it holds their heads); the
# generator is synchronised separately
_LOCAL_GENERATE_ARGS = ("streamer", "logits_processor", "stopping_criteria", "tokenizer", "generator",
                        "past_key_values")


class Unsplit:
    """One process: the whole model, every hook the identity (results bitwise as without tensor parallelism)."""

    rank, size = 0, 1
    parallel = False

    def __init__(self, config):
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads

    def shard(self, name, a):
        return a

    def same_seed(self, seed):
        return seed

    def allreduce(self, x):
        return x

    def gather_vocab(self, logits):
        return logits

    def gather_heads(self, probs):
        return probs


class TensorParallel:
    """This rank's part of a tensor-parallel model (see the module doc)."""

    parallel = True

    def __init__(self, config, comm: Communicator):
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.plan = ShardPlan.from_config(config, comm.rank, comm.size)
        self.n_heads = self.plan.n_heads
        self.n_kv_heads = self.plan.n_kv_heads
        install_abort_on_error(comm)

    def shard(self, name, a):
        if a is None:
            return None
        if name.endswith("o_proj.bias"):
            # added once: rank 0's partial sum carries the bias, the others add zeros
            return a if self.rank == 0 else np.zeros_like(np.asarray(a))
        if name.endswith("embed_tokens.weight"):
            # only reached through the tied LM head (the embedding lookup reads whole rows itself)
            name = "lm_head.weight"
        return self.plan.shard(name, a)

    def same_seed(self, seed):
        """A random init must be the same model on every rank: rank 0's seed (fresh entropy if None)."""
        if self.rank == 0 and seed is None:
            seed = _fresh_seed()
        return self.comm.bcast_obj(seed)

    def allreduce(self, x):
        return self.comm.allreduce_sum(x)

    def gather_vocab(self, logits):
        return self.comm.allgather(logits, axis=-1)

    def gather_heads(self, probs):
        if probs is None:
            return None
        mine = probs[:, :len(self.plan.q_heads)]  # a placeholder rank contributes no head
        return self.comm.allgather(mine, axis=1)

    def root_only(self, fn):
        """fn run by rank 0 alone (save_pretrained writes the whole checkpoint, from the memory-mapped
        files every rank loaded); the others wait, and an error there is raised on every rank."""
        return _root_only(self.comm, fn)

    def refuse(self, name):
        """A method that cannot run on a shard (it rebuilds a whole tensor): a typed error, on every rank."""
        def call(*args, **kwargs):
            raise ParallelError(f"{name}() does not run on a tensor-parallel model: call it in one process, "
                                "save_pretrained, and load the result with tensor_parallel=True")
        return call

    # ------------------------------------------------------------------ every rank follows rank 0
    def follow_root(self, forward, collective_errors=(ValueError, TypeError)):
        """forward(*args, **kwargs) on every rank with rank 0's arguments; past_key_values stays each rank's
        own (its cache holds its own heads). Errors of the types in `collective_errors` come from checking
        those (identical) arguments, so every rank raises them together: rank 0 reports them, the others
        leave quietly. Any other exception aborts the job (its peers may be inside a collective)."""
        comm = self.comm

        @functools.wraps(forward)
        def call(*args, **kwargs):
            own_cache = kwargs.pop("past_key_values", None)
            args, kwargs, root_has_cache = comm.bcast_obj((args, kwargs, own_cache is not None) if comm.rank == 0
                                                          else None)
            if root_has_cache != (own_cache is not None):
                comm.abort(f"rank 0 {'passed' if root_has_cache else 'did not pass'} past_key_values and rank "
                           f"{comm.rank} {'did not' if root_has_cache else 'did'}: every rank must pass its own cache")
            if own_cache is not None:
                kwargs["past_key_values"] = own_cache
            return _run_collectively(comm, forward, args, kwargs, collective_errors)

        call._g2_follows_root = True
        return call

    def follow_root_generate(self, generate, collective_errors=(ValueError, TypeError)):
        """generate() on every rank with rank 0's arguments and random state: every rank draws the same
        tokens and stops at the same step. Only rank 0 streams."""
        comm = self.comm

        @functools.wraps(generate)
        def call(*args, **kwargs):
            local = {k: kwargs.pop(k) for k in _LOCAL_GENERATE_ARGS if k in kwargs}
            gen = local.pop("generator", None)
            if comm.rank == 0:
                if gen is None and kwargs.get("seed") is None:
                    # fresh OS entropy, drawn once and shared (one process would draw it in generate)
                    kwargs["seed"] = _fresh_seed()
                state = gen.bit_generator.state if isinstance(gen, np.random.Generator) else None
                payload = (args, kwargs, state, gen is not None)
            else:
                payload = None
            args, kwargs, state, has_gen = comm.bcast_obj(payload)
            if has_gen:
                if comm.rank != 0:
                    if not isinstance(gen, np.random.Generator) or type(gen.bit_generator).__name__ != state["bit_generator"]:
                        gen = np.random.Generator(getattr(np.random, state["bit_generator"])())
                    gen.bit_generator.state = state
                kwargs["generator"] = gen
            if comm.rank != 0 and not _output_silenced():
                local.pop("streamer", None)  # only rank 0 prints (the CLI silences the others' output instead)
            kwargs.update(local)
            return _run_collectively(comm, generate, args, kwargs, collective_errors)

        call._g2_follows_root = True
        return call


def _root_only(comm, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        error = None
        if comm.rank == 0:
            try:
                fn(*args, **kwargs)
            except Exception as e:  # reported collectively: every rank raises
                error = e
        comm.check(error is None, f"{type(error).__name__}: {error}", what=f"failed in {fn.__name__}")

    return call


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)


def _output_silenced() -> bool:
    return launch.SILENCED


def _run_collectively(comm, fn, args, kwargs, collective_errors):
    try:
        return fn(*args, **kwargs)
    except collective_errors as e:
        e._g2_reported_on_root = True  # the same error on every rank: rank 0 prints it (install_abort_on_error)
        raise
    except Exception as e:
        comm.abort(f"{type(e).__name__} during a tensor-parallel call: {e}")
        raise


def make_tensor_parallel(config, tensor_parallel, comm: Communicator | None = None):
    """The model's `tp` object: Unsplit when tensor_parallel is false or only one process runs."""
    if not tensor_parallel:
        return Unsplit(config)
    comm = get_comm() if comm is None else comm
    if comm.size == 1:
        return Unsplit(config)
    return TensorParallel(config, comm)


def load_collectively(load, tensor_parallel, timeout: float | None = None):
    """Run `load()` (building this rank's model) and agree across ranks that it worked.

    Every rank loads; then each says whether it succeeded (comm.check). If one failed, every rank raises:
    rank 0 its own error if it failed too (the same typed error one process gives), else a RankError
    naming the failed ranks and their messages; only rank 0 prints it. A rank that does not arrive
    within `timeout` seconds (default GEMMA2NP_TP_LOAD_TIMEOUT or 600) aborts the job."""
    comm = get_comm() if tensor_parallel else None
    if comm is None or comm.size == 1:
        return load()
    install_abort_on_error(comm)
    model, error = None, None
    try:
        model = load()
    except Exception as e:  # reported collectively below
        error = e
    if timeout is None:
        timeout = float(os.environ.get("GEMMA2NP_TP_LOAD_TIMEOUT", "600"))
    if hasattr(comm, "wait_all"):
        comm.wait_all(timeout, "loading the tensor-parallel model")
    try:
        comm.check(error is None, f"{type(error).__name__}: {error}", what="failed to load the model")
    except RankError as e:
        own = error if comm.rank == 0 and error is not None else e
        own._g2_reported_on_root = True
        raise own from None
    return model


def weight_bytes(model) -> dict:
    """Bytes of the weights this rank holds: 'sharded' (the linear layers and the LM head, split over the
    ranks) and 'replicated' (norm weights, the o_proj bias, classification heads). The embedding table is
    not counted: its rows are read with pread when looked up and never become resident."""
    sharded = replicated = 0
    for layer in model.layers:
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            for a in _arrays(getattr(layer, n)):  # weights, int8 scales, biases
                if n == "o_proj" and a.ndim == 1:
                    replicated += a.nbytes  # the o_proj bias (zeros on ranks > 0)
                else:
                    sharded += a.nbytes
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            replicated += np.asarray(getattr(layer, n)).nbytes
    replicated += np.asarray(model.norm).nbytes
    head = getattr(model, "lm_head", None)
    if head is not None:
        sharded += sum(a.nbytes for a in _arrays(head))
    score = getattr(model, "score", None)
    if score is not None:
        replicated += sum(a.nbytes for a in _arrays(score))
    return {"sharded": int(sharded), "replicated": int(replicated)}


def _arrays(handle) -> list:
    """The arrays a prepared linear holds, weight first: a bare array, a tuple, or an object with
    w / scales / bias attributes."""
    if isinstance(handle, np.ndarray):
        return [handle]
    if isinstance(handle, (tuple, list)):
        return [a for a in handle if isinstance(a, np.ndarray)]
    return [a for a in (getattr(handle, n, None) for n in ("w", "scales", "bias")) if isinstance(a, np.ndarray)]

