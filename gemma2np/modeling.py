"""Gemma2Model and its three heads, with transformers' argument names, outputs and behaviour.

The wiring of one decoder layer (transformers' Gemma2DecoderLayer), four norms per layer:

    h = h + post_attention_layernorm(self_attn(input_layernorm(h)))
    h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

The arithmetic lives in `ops` (read that first); matrix products and the attention core go
through a backend (`gemma2np.kernels`: the NumPy reference or the native kernels), chosen at load.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from typing import Any, Callable

import numpy as np

from . import ops
from .cache import CacheError, Gemma2Cache
from .checkpoint import (CheckpointError, bfloat16, check_state_dict, copy_to_ram, gather_rows, load_state_dict,
                         release_pages, save_state_dict)
from .config import CONFIG_NAME, Gemma2Config
from .parallel.tensor_parallel import load_collectively, make_tensor_parallel
from .outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from .rope import RotaryEmbedding

__all__ = [
    "Gemma2PreTrainedModel",
    "Gemma2Model",
    "Gemma2ForCausalLM",
    "Gemma2ForSequenceClassification",
    "Gemma2ForTokenClassification",
    "InputError",
]

_DTYPES = {"float32": np.float32, "float64": np.float64, np.float32: np.float32, np.float64: np.float64}
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


class InputError(ValueError):
    """An argument of a model call is of the wrong type, shape or range."""


def _resolve_backend(name: str, n_threads: int | None):
    """"numpy": the readable reference (`ops`, float32 or float64); "native"/"auto": gemma2np.kernels."""
    if name == "numpy":
        return _ReferenceBackend()
    if name not in ("native", "auto"):
        raise ValueError(f"backend must be 'numpy', 'native' or 'auto', got {name!r}")
    from .kernels import get_backend

    return get_backend(name, n_threads=n_threads)


class _ReferenceBackend:
    """The backend contract of docs/ARCHITECTURE.md served directly by the reference `ops`."""

    name = "numpy"

    def prepare_linear(self, w, bias=None, weights="float32", dtype=np.float32):
        return (np.asarray(w).astype(dtype, copy=False), None if bias is None else np.asarray(bias).astype(dtype))

    def linear(self, x, handle):
        w, b = handle
        return ops.linear(x, w, b)


class _LayerWeights:
    """Prepared weights of one decoder layer (backend handles for the projections, arrays for the norms)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _to_compute(a: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(a).astype(dtype, copy=False)


class Gemma2PreTrainedModel:
    """Shared loading, saving, initialisation and input checking."""

    config_class = Gemma2Config
    base_model_prefix = "model"
    head_kind = "base"  # which extra tensors the class has: base | causal_lm | sequence_classification | token_classification

    def __init__(
        self,
        config: Gemma2Config,
        state_dict: dict[str, np.ndarray] | None = None,
        *,
        backend: str = "numpy",
        dtype="float32",
        weights: str | None = None,
        n_threads: int | None = None,
        seed: int | None = 0,
        strict: bool = True,
        progress: Callable[[int, int], None] | None = None,
        mmap: bool = True,
        tensor_parallel: bool = False,
    ):
        if not isinstance(config, Gemma2Config):
            raise TypeError(f"config must be a Gemma2Config, got {type(config).__name__}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.config = config
        self.dtype = np.dtype(_DTYPES[dtype])
        self.training = False
        self._recorder: Callable[[str, np.ndarray], None] | None = None
        if state_dict is None:
            state_dict = self._random_state_dict(seed)
        self._mmap = mmap
        # this rank's shard under mpiexec (gemma2np.parallel), else every hook is the identity
        self.tp = make_tensor_parallel(config, tensor_parallel)
        self._load(state_dict, backend=backend, weights=weights, n_threads=n_threads, strict=strict, progress=progress)
        if self.tp.parallel:  # every rank runs rank 0's calls (errors from checking them are raised by all)
            self.forward = self.tp.follow_root(self.forward, (InputError, CacheError, TypeError))
            if hasattr(self, "generate"):
                self.generate = self.tp.follow_root_generate(self.generate, (InputError, CacheError, TypeError))

    # ------------------------------------------------------------------ names and shapes
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        shapes = c.parameter_shapes()
        if self.head_kind == "base":
            shapes = {k[len("model."):]: v for k, v in shapes.items()}
        elif self.head_kind == "causal_lm":
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        elif self.head_kind == "sequence_classification":
            shapes["score.weight"] = (c.num_labels, c.hidden_size)
        elif self.head_kind == "token_classification":
            shapes["score.weight"] = (c.num_labels, c.hidden_size)
            shapes["score.bias"] = (c.num_labels,)
        return shapes

    def _prefix(self) -> str:
        return "" if self.head_kind == "base" else "model."

    # ------------------------------------------------------------------ random init
    def _random_state_dict(self, seed: int | None) -> dict[str, np.ndarray]:
        """transformers' init: normal(0, initializer_range) for linears and the embedding (pad row zeroed),
        zeros for biases and for the RMSNorm weights (Gemma's norm scale is 1 + w, so w = 0 is identity)."""
        rng = np.random.default_rng(seed)
        std = self.config.initializer_range
        state = {}
        for name, shape in self.expected_shapes().items():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                state[name] = np.zeros(shape, np.float32)
            else:
                state[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
        emb = self._prefix() + "embed_tokens.weight"
        pad = self.config.pad_token_id
        if pad is not None and 0 <= pad < self.config.vocab_size:
            state[emb][pad] = 0.0
        if self.head_kind == "causal_lm" and self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state

    # ------------------------------------------------------------------ loading
    def _load(self, state, backend, weights, n_threads, strict, progress=None):
        c = self.config
        expected = self.expected_shapes()
        p = self._prefix()
        optional = set()
        if self.head_kind == "causal_lm" and c.tie_word_embeddings:
            optional.add("lm_head.weight")
        missing, unexpected = check_state_dict(state, expected, optional)
        # transformers drops some non-persistent buffers into old checkpoints; never fatal
        unexpected = [u for u in unexpected if not u.endswith("rotary_emb.inv_freq")]
        head_missing = [k for k in missing if not k.startswith(p)] if p else []
        if head_missing:
            # a checkpoint without this head (e.g. a causal-LM checkpoint loaded for classification) is
            # normal in transformers: the head is freshly initialised, with a warning saying so
            warnings.warn(f"{type(self).__name__}: {head_missing} not in the checkpoint, newly initialised "
                          "(normal(0, initializer_range), biases 0): train the head before using it", stacklevel=3)
            rng = np.random.default_rng()
            state = dict(state)
            for k in head_missing:
                shape = expected[k]
                state[k] = (np.zeros(shape, np.float32) if k.endswith(".bias")
                            else rng.normal(0.0, c.initializer_range, shape).astype(np.float32))
            missing = [k for k in missing if k not in head_missing]
        if missing and strict:
            raise CheckpointError(
                f"checkpoint is missing {len(missing)} tensor(s) the config requires, e.g. {missing[:5]}"
            )
        if unexpected:
            warnings.warn(f"checkpoint has {len(unexpected)} unexpected tensor(s), ignored: {unexpected[:5]}", stacklevel=3)
        self.missing_keys, self.unexpected_keys = missing, unexpected

        self.backend = _resolve_backend(backend, n_threads)
        if weights is None:
            weights = "float32" if self.backend.name == "numpy" else _default_weights(state[p + "embed_tokens.weight"])
        if self.backend.name == "numpy" and weights != "float32":
            raise ValueError("the numpy backend computes with float32/float64 weights; use backend='native' for "
                             f"weights={weights!r}")
        if weights not in ("float32", "bfloat16", "int8"):
            raise ValueError(f"weights must be 'float32', 'bfloat16' or 'int8', got {weights!r}")
        self.weights_format = weights
        dt = self.dtype

        if self.backend.name != "numpy" and dt != np.float32:
            raise ValueError(f"backend {self.backend.name!r} computes in float32; dtype={dt.name} needs backend='numpy'")

        tp = self.tp

        def lin(name, bias_name=None):
            w = tp.shard(name, state[name])  # tensor-parallel: this rank's rows / columns
            if not getattr(self, "_mmap", True):
                w = copy_to_ram(w)  # mmap=False: private copy (huge pages), file pages released as it goes
            b = tp.shard(bias_name, state.get(bias_name)) if bias_name else None
            kw = {"weights": weights}
            if self.backend.name == "numpy":
                kw["dtype"] = dt
            handle = self.backend.prepare_linear(w, b, **kw)
            if not any(np.shares_memory(w, a) for a in _arrays_of(handle)):
                release_pages(w)  # converted copy in use: let the file pages leave our resident set
            return handle

        self.embed_tokens = state[p + "embed_tokens.weight"]  # (V, E) kept in the file's dtype; rows gathered on use
        self.layers = []
        for i in range(c.num_hidden_layers):
            lp = f"{p}layers.{i}."
            bias = (lambda n: lp + f"self_attn.{n}.bias") if c.attention_bias else (lambda n: None)
            self.layers.append(_LayerWeights(
                **{n: lin(lp + f"self_attn.{n}.weight", bias(n)) for n in _PROJ},
                **{n: lin(lp + f"mlp.{n}.weight") for n in _MLP},
                **{n: _to_compute(state[lp + n + ".weight"], dt) for n in _NORMS},
            ))
            if progress is not None:  # (layers prepared, total): lets a CLI draw a loading bar
                progress(i + 1, c.num_hidden_layers)
        self.norm = _to_compute(state[p + "norm.weight"], dt)
        self._load_head(state, lin)
        self.rotary_emb = RotaryEmbedding(c.rope_parameters, c.head_dim, c.max_position_embeddings, dtype=dt)
        # Element-wise ops: the reference `ops` on the NumPy backend, the fused C kernels (tested against
        # the same ops) on the native one.
        self._native = self.backend.name != "numpy"
        self._state = state  # for save_pretrained / state_dict (memory-mapped: costs no RAM)

    def _load_head(self, state, lin):
        pass

    def _rms_norm(self, x, weight, eps):
        return self.backend.rmsnorm(x, weight, eps) if self._native else ops.rms_norm(x, weight, eps)

    def _geglu(self, gate, up, activation):
        return self.backend.geglu(gate, up, activation) if self._native else ops.geglu(gate, up, activation)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        backend: str = "numpy",
        dtype="float32",
        weights: str | None = None,
        n_threads: int | None = None,
        gguf_file: str | None = None,
        config: Gemma2Config | None = None,
        progress: Callable[[int, int], None] | None = None,
        mmap: bool = True,
        tensor_parallel: bool = False,
        **config_overrides,
    ):
        """Load an HF-format directory: config.json + model.safetensors (or shards + index), f32/f16/bf16.

        backend: "numpy" (the reference, default: exact and dependency-free) or "native" (C kernels).
        weights: in-memory weight format for the native backend: "float32", "bfloat16" or "int8"
                 (default: bfloat16 for a bf16/f16 checkpoint, float32 for an f32 one).
        dtype:   activations and the NumPy backend's weights: "float32" (default) or "float64" (ground truth).
        gguf_file: a llama.cpp GGUF file (path, or name inside the directory) instead of safetensors.
        mmap:    True (default): weights stay memory-mapped, loading is instant and pages come in on first use.
                 False: weights are copied into process memory as they load (file pages released behind,
                 so RSS still ends at ~1x the weights), like llama.cpp's --no-mmap: slower to load, then
                 independent of the page cache (and backed by huge pages where the OS gives them).
        tensor_parallel: under `mpiexec -n N` (N > 1), each rank holds its slice of every layer and the LM
                 head (gemma2np.parallel); every rank follows rank 0's forward / generate calls. A rank
                 that fails to load makes every rank raise (rank 0 reports it). One process: no effect.
        """
        return load_collectively(lambda: cls._from_pretrained(
            pretrained_model_name_or_path, backend=backend, dtype=dtype, weights=weights, n_threads=n_threads,
            gguf_file=gguf_file, config=config, progress=progress, mmap=mmap, tensor_parallel=tensor_parallel,
            **config_overrides), tensor_parallel)

    @classmethod
    def _from_pretrained(cls, pretrained_model_name_or_path, *, backend, dtype, weights, n_threads, gguf_file,
                         config, progress, mmap, tensor_parallel, **config_overrides):
        path = os.fspath(pretrained_model_name_or_path)
        if gguf_file is not None:
            from .gguf_io import load_gguf

            gpath = gguf_file if os.path.isabs(gguf_file) or not os.path.isdir(path) else os.path.join(path, gguf_file)
            if not os.path.exists(gpath) and os.path.exists(gguf_file):
                gpath = gguf_file
            cfg_dict, state = load_gguf(gpath)
            cfg = config or Gemma2Config.from_dict(cfg_dict, **config_overrides)
            state = _adapt_prefix(state, cls.head_kind)
        else:
            if not os.path.isdir(path):
                raise CheckpointError(f"model directory not found: {path!r}")
            cfg = config or Gemma2Config.from_pretrained(path, **config_overrides)
            state = _adapt_prefix(load_state_dict(path), cls.head_kind)
        model = cls(cfg, state, backend=backend, dtype=dtype, weights=weights, n_threads=n_threads, progress=progress,
                    mmap=mmap, tensor_parallel=tensor_parallel)
        model.name_or_path = path
        return model

    @classmethod
    def from_config(cls, config: Gemma2Config, seed: int | None = 0, empty_weights: bool = False, **kwargs):
        """A randomly initialised model (transformers' init, reproducible with `seed`).

        empty_weights=True builds the model with every tensor of the right shape but no memory behind it
        (read-only zero-stride views of one 0.0, like transformers' meta device): for inspecting shapes and
        parameter counts of a real-size config (gemma-2-27b) without allocating its weights.
        """
        if empty_weights:
            zero = np.zeros((), np.float32)
            state = {name: np.broadcast_to(zero, shape) for name, shape in cls._shapes_for(config).items()}
            if cls.head_kind == "causal_lm" and config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            return cls(config, state, **kwargs)
        return cls(config, None, seed=seed, **kwargs)

    @classmethod
    def _shapes_for(cls, config: Gemma2Config) -> dict[str, tuple[int, ...]]:
        probe = cls.__new__(cls)
        probe.config = config
        return probe.expected_shapes()

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape of every parameter of this model (the tied head counted once)."""
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict[str, np.ndarray]:
        """HF-named tensors as loaded (file dtype)."""
        state = dict(self._state)
        if self.head_kind == "causal_lm" and self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def save_pretrained(self, save_directory, dtype: str | None = None, max_shard_size: int | str | None = None):
        """Write config.json + model.safetensors (sharded with an index above max_shard_size bytes), the layout
        transformers' `from_pretrained` reads. dtype: "float32" | "bfloat16" | "float16" (default: as loaded)."""
        if isinstance(max_shard_size, str):
            max_shard_size = _parse_size(max_shard_size)
        os.makedirs(save_directory, exist_ok=True)
        cfg = self.config.to_dict()
        cfg["architectures"] = [type(self).__name__]
        state = self.state_dict()
        if dtype is not None:
            cfg["dtype"] = dtype
        else:
            cfg["dtype"] = _dtype_name(state[self._prefix() + "embed_tokens.weight"].dtype)
        save_state_dict(save_directory, state, max_shard_size=max_shard_size, dtype=dtype)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)

    def num_parameters(self) -> int:
        return self.config.num_parameters(self.head_kind)

    # ------------------------------------------------------------------ transformers-compatible odds and ends
    def eval(self):
        self.training = False
        return self

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    @contextlib.contextmanager
    def record_intermediates(self, names: Callable[[str], bool] | None = None):
        """Record every named intermediate of the forward passes run inside the block.

        >>> with model.record_intermediates() as rec:
        ...     model(input_ids=ids)
        >>> rec["layers.0.attn_out"].shape
        Names: see gemma2np.intermediates / docs. Arrays are copies in the compute dtype.
        """
        store: dict[str, np.ndarray] = {}

        def record(name, value):
            if names is None or names(name):
                store[name] = np.array(value, copy=True)

        base = self._base()
        previous = base._recorder
        base._recorder = record
        try:
            yield store
        finally:
            base._recorder = previous

    def _base(self) -> "Gemma2Model":
        return self


def _arrays_of(handle) -> list:
    """The arrays a prepared linear holds (a tuple, a bare array, or an object with .w/.scales/.bias)."""
    if isinstance(handle, np.ndarray):
        return [handle]
    if isinstance(handle, tuple):
        return [a for a in handle if isinstance(a, np.ndarray)]
    return [a for a in (getattr(handle, n, None) for n in ("w", "scales", "bias")) if isinstance(a, np.ndarray)]


def _default_weights(embed: np.ndarray) -> str:
    return "float32" if embed.dtype in (np.float32, np.float64) else "bfloat16"


def _dtype_name(dt) -> str:
    return "bfloat16" if dt == bfloat16 else str(np.dtype(dt))


def _parse_size(s: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    s = s.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * units[u])
    return int(s)


def _adapt_prefix(state: dict[str, np.ndarray], head_kind: str) -> dict[str, np.ndarray]:
    """Let a base checkpoint (no `model.` prefix) load into a head class and a head checkpoint into the base."""
    has_prefix = any(k.startswith("model.") for k in state)
    if head_kind == "base" and has_prefix:
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if head_kind != "base" and not has_prefix:
        return {"model." + k: v for k, v in state.items()}
    return state


# ============================================================================ input checking


def _as_int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise InputError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a


# ============================================================================ the base model


class Gemma2Model(Gemma2PreTrainedModel):
    """The decoder stack: embeddings, num_hidden_layers decoder layers, final norm -> hidden states."""

    head_kind = "base"

    def _base(self):
        return self

    # ------------------------------------------------------------------ argument checks
    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache_position, past_len):
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            input_ids = _as_int_array(input_ids, "input_ids")
            if input_ids.ndim != 2:
                raise InputError(f"input_ids must have shape (batch, seq_len), got {input_ids.shape}")
            if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= c.vocab_size):
                bad = input_ids[(input_ids < 0) | (input_ids >= c.vocab_size)].ravel()[0]
                raise InputError(f"token id {int(bad)} is out of range for vocab_size {c.vocab_size}")
            batch, seq = input_ids.shape
        else:
            inputs_embeds = np.asarray(inputs_embeds)
            if not np.issubdtype(inputs_embeds.dtype, np.floating):
                raise InputError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != c.hidden_size:
                raise InputError(
                    f"inputs_embeds must have shape (batch, seq_len, {c.hidden_size}), got {inputs_embeds.shape}"
                )
            batch, seq = inputs_embeds.shape[:2]
        if seq == 0:
            raise InputError("the input sequence is empty (seq_len = 0)")
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.ndim != 2:
                raise InputError(
                    f"attention_mask must be 2-D (batch, past + seq_len), got shape {attention_mask.shape}"
                )
            if attention_mask.shape != (batch, past_len + seq):
                raise InputError(
                    f"attention_mask has shape {attention_mask.shape}, expected ({batch}, {past_len + seq}) "
                    f"= (batch, cached tokens {past_len} + new tokens {seq})"
                )
            if not (attention_mask.dtype == bool or np.issubdtype(attention_mask.dtype, np.number)):
                raise InputError(f"attention_mask must be 0/1 or boolean, got dtype {attention_mask.dtype}")
            if attention_mask.dtype != bool and not np.isin(attention_mask, (0, 1)).all():
                raise InputError("attention_mask values must be 0 or 1")
            attention_mask = attention_mask.astype(bool)
        if cache_position is None:
            cache_position = np.arange(past_len, past_len + seq, dtype=np.int64)
        else:
            cache_position = _as_int_array(cache_position, "cache_position").astype(np.int64).reshape(-1)
            if cache_position.shape != (seq,):
                raise InputError(f"cache_position must have shape ({seq},), got {cache_position.shape}")
        if position_ids is None:
            # transformers' forward default: arange from the number of cached tokens, padding ignored
            # (generate() instead passes cumsum(attention_mask) - 1; real-token logits agree either way).
            position_ids = cache_position[None, :]
        else:
            position_ids = _as_int_array(position_ids, "position_ids").astype(np.int64)
            if position_ids.ndim == 1:
                position_ids = position_ids[None, :]
            if position_ids.ndim != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
                raise InputError(f"position_ids must have shape ({batch}, {seq}) or (1, {seq}), got {position_ids.shape}")
        if int(position_ids.max(initial=0)) + 1 > c.max_position_embeddings:
            # transformers runs such sequences (RoPE extrapolates, dynamic RoPE rescales); so do we, with a warning.
            warnings.warn(
                f"position {int(position_ids.max())} is past max_position_embeddings ({c.max_position_embeddings}): "
                "running anyway, as transformers does, but the model was not trained for it",
                stacklevel=4,
            )
        return input_ids, inputs_embeds, attention_mask, position_ids, cache_position, batch, seq

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
        **kwargs,
    ):
        c = self.config
        _reject_unknown(kwargs, ())
        output_attentions = c.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = c.use_cache if use_cache is None else use_cache
        return_dict = c.return_dict if return_dict is None else return_dict

        legacy = isinstance(past_key_values, (tuple, list))
        if legacy:
            try:
                cache = Gemma2Cache.from_legacy_cache(past_key_values, c.layer_types, c.sliding_window)
            except CacheError as exc:
                raise InputError(str(exc)) from None
        elif past_key_values is None:
            cache = Gemma2Cache(c.layer_types, c.sliding_window) if use_cache else None
        elif isinstance(past_key_values, Gemma2Cache):
            cache = past_key_values
        else:
            raise InputError(f"past_key_values must be a Gemma2Cache or a tuple of (keys, values), got "
                             f"{type(past_key_values).__name__}")
        past_len = cache.get_seq_length() if cache is not None else 0

        input_ids, inputs_embeds, mask, position_ids, cache_position, batch, seq = self._check_inputs(
            input_ids, inputs_embeds, attention_mask, position_ids, cache_position, past_len
        )
        rec = self._recorder

        # 1. embeddings, scaled by sqrt(hidden_size) (only when we look them up: transformers' Gemma2Model
        #    does not scale user-supplied inputs_embeds -- the scale lives inside its embedding module).
        if inputs_embeds is None:
            # rows of a memory-mapped table are read with pread (checkpoint.gather_rows), so lookups do not
            # pull pages of the 256000-row table into the resident set
            rows = gather_rows(self.embed_tokens, input_ids)  # ops.embed: (B, T) ids -> (B, T, E) rows
            h = ops.scale_embeddings(rows.astype(self.dtype), c.hidden_size)
        else:
            h = inputs_embeds.astype(self.dtype)
        if rec:
            rec("embeddings", h)

        # 2. RoPE tables for these positions, shared by every layer.
        cos, sin = self.rotary_emb(position_ids)

        # padding: key at absolute position j is valid iff attention_mask[:, j]
        all_hidden = [h] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            h, probs = self._decoder_layer(i, layer, h, cos, sin, cache_position, mask, cache, output_attentions)
            if output_hidden_states and i < len(self.layers) - 1:
                all_hidden.append(h)
            if output_attentions:
                all_attn.append(probs)
        if rec:
            rec(f"layers.{len(self.layers) - 1}.output", h)
        h = self._rms_norm(h, self.norm, c.rms_norm_eps)
        if rec:
            rec("final_norm", h)
        if output_hidden_states:
            # transformers' hidden_states: [embeddings, outputs of layers 0..L-2, final-norm output] (L + 1 entries);
            # the raw output of the last layer is not among them.
            all_hidden.append(h)

        if cache is not None:
            cache.seen_tokens = past_len + seq
        past = None
        if use_cache and cache is not None:
            past = cache.to_legacy_cache() if legacy else cache
        out = BaseModelOutputWithPast(
            last_hidden_state=h,
            past_key_values=past,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()

    def _decoder_layer(self, i, w, h, cos, sin, cache_position, mask, cache, output_attentions):
        c = self.config
        rec = self._recorder
        be = self.backend
        B, T, _ = h.shape
        H, K, D = self.tp.n_heads, self.tp.n_kv_heads, c.head_dim  # this rank's heads (all of them unsplit)

        # --- attention block ---------------------------------------------------------------
        residual = h
        x = self._rms_norm(h, w.input_layernorm, c.rms_norm_eps)
        if rec:
            rec(f"layers.{i}.input_norm", x)
        q, k, v = _linears(be, x, (w.q_proj, w.k_proj, w.v_proj))
        q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = k.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # (B, K, T, D)
        v = v.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # (B, K, T, D)
        # RoPE on the two halves of each head (rotate_half), keys cached *after* RoPE.
        if hasattr(be, "rope"):  # a backend's fused kernel (same op order, bitwise equal in float32)
            q, k = be.rope(q, cos, sin), be.rope(k, cos, sin)
        else:
            q, k = ops.apply_rotary_pos_emb(q, k, cos, sin)
        if rec:
            rec(f"layers.{i}.q", q)
            rec(f"layers.{i}.k", k)
            rec(f"layers.{i}.v", v)
        if cache is not None:
            k_all, v_all, k_pos = cache.update(k, v, cache_position, i)
        else:
            k_all, v_all, k_pos = k, v, cache_position
        key_valid = None if mask is None else mask[:, k_pos]
        window = c.sliding_window if c.layer_types[i] == "sliding_attention" else None
        if window == 1 and T == 1 and k_all.shape[2] > 1:
            # transformers 5.23 with sliding_window = 1, one new token after cached ones: its cache kept every
            # key (cache.py) while its mask covers W - 1 + 1 = 1 key; eager attention *broadcasts* that
            # (B, 1, 1, 1) mask over all keys, so the token attends to every cached key, padding included,
            # exactly when it may see itself. Its forward pass over the whole sequence does not do this; we
            # follow its generate() here so greedy tokens match (tests/test_against_transformers.py).
            self_visible = np.ones((B, 1), bool) if mask is None else mask[:, cache_position]
            key_valid = np.repeat(self_visible, k_all.shape[2], axis=1)
            window = None
        # scaling = query_pre_attn_scalar ** -0.5 (transformers: `config.query_pre_attn_scalar**-0.5`)
        scaling = float(c.query_pre_attn_scalar) ** -0.5
        need_probs = output_attentions or (rec is not None)
        if need_probs or not hasattr(be, "attention"):
            attn, probs = ops.attention(q, k_all, v_all, cache_position, k_pos, key_valid, scaling,
                                        c.attn_logit_softcapping, window, return_probs=True)
        else:
            attn, probs = be.attention(q, k_all, v_all, cache_position, k_pos, key_valid, scaling,
                                       c.attn_logit_softcapping, window), None
        if rec:
            rec(f"layers.{i}.attn_probs", probs)
        attn = attn.transpose(0, 2, 1, 3).reshape(B, T, H * D)
        attn = self.tp.allreduce(be.linear(attn, w.o_proj))  # tensor-parallel: sum of the ranks' partials
        if rec:
            rec(f"layers.{i}.attn_out", attn)
        attn = self._rms_norm(attn, w.post_attention_layernorm, c.rms_norm_eps)
        if rec:
            rec(f"layers.{i}.post_attn_norm", attn)
        h = residual + attn
        if rec:
            rec(f"layers.{i}.attn_residual", h)

        # --- feed-forward block --------------------------------------------------------------
        residual = h
        x = self._rms_norm(h, w.pre_feedforward_layernorm, c.rms_norm_eps)
        if rec:
            rec(f"layers.{i}.pre_ffn_norm", x)
        gate, up = _linears(be, x, (w.gate_proj, w.up_proj))
        if rec:
            rec(f"layers.{i}.gate", gate)
            rec(f"layers.{i}.up", up)
        y = self.tp.allreduce(be.linear(self._geglu(gate, up, c.hidden_activation), w.down_proj))
        if rec:
            rec(f"layers.{i}.ffn_out", y)
        y = self._rms_norm(y, w.post_feedforward_layernorm, c.rms_norm_eps)
        if rec:
            rec(f"layers.{i}.post_ffn_norm", y)
        h = residual + y
        if rec and i < c.num_hidden_layers - 1:
            rec(f"layers.{i}.output", h)
        return h, (self.tp.gather_heads(probs) if output_attentions else None)


def _linears(be, x, handles):
    """x through several linear layers; one fused call where the backend has one (the native backend
    runs q/k/v and gate/up in a single parallel loop; each result is what its own call gives)."""
    many = getattr(be, "linear_many", None)
    return many(x, handles) if many is not None else [be.linear(x, h) for h in handles]


def _reject_unknown(kwargs: dict, allowed) -> None:
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")


# ============================================================================ heads


class _WithBase(Gemma2PreTrainedModel):
    """A head on top of a Gemma2Model that shares its weights and backend."""

    def _load(self, state, backend, weights, n_threads, strict, progress=None):
        super()._load(state, backend, weights, n_threads, strict, progress)
        # a Gemma2Model view over the same prepared weights
        model = Gemma2Model.__new__(Gemma2Model)
        model.__dict__.update({k: v for k, v in self.__dict__.items()})
        model.head_kind = "base"
        self.model = model

    def _base(self):
        return self.model

    def _run_base(self, output_attentions, output_hidden_states, use_cache, past_key_values, input_ids,
                  attention_mask, position_ids, inputs_embeds, cache_position):
        return self.model.forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=True, cache_position=cache_position,
        )


class Gemma2ForCausalLM(_WithBase):
    """Gemma2Model + the language-model head (tied to the embedding by default) + the final logit soft-cap."""

    head_kind = "causal_lm"

    def _load_head(self, state, lin):
        c = self.config
        if c.tie_word_embeddings or "lm_head.weight" not in state:
            # tied head: the embedding matrix doubles as the output projection (no lm_head tensor in the file)
            self.lm_head = lin("model.embed_tokens.weight")
            if not c.tie_word_embeddings:
                warnings.warn("untied config but no lm_head.weight in the checkpoint: using the embedding", stacklevel=4)
        else:
            self.lm_head = lin("lm_head.weight")

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
        logits_to_keep: int | np.ndarray = 0,
        **kwargs,
    ):
        c = self.config
        num_items = kwargs.pop("num_items_in_batch", None)
        _reject_unknown(kwargs, ())
        return_dict = c.return_dict if return_dict is None else return_dict
        if labels is not None:
            labels = _as_int_array(labels, "labels")
            shape = np.shape(input_ids) if input_ids is not None else np.shape(inputs_embeds)[:2]
            if labels.shape != tuple(shape):
                raise InputError(f"labels must have shape {tuple(shape)} like the input, got {labels.shape}")
        out = self._run_base(output_attentions, output_hidden_states, use_cache, past_key_values,
                             input_ids, attention_mask, position_ids, inputs_embeds, cache_position)
        h = out.last_hidden_state
        # logits_to_keep: an int keeps the last n positions (0 = all), an array selects positions.
        if isinstance(logits_to_keep, (int, np.integer)):
            if logits_to_keep < 0:
                raise InputError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, np.asarray(logits_to_keep)]
        # (B, T', V); tensor-parallel: each rank's vocabulary rows, gathered into the full logits
        logits = self.tp.gather_vocab(self.backend.linear(h, self.lm_head))
        rec = self.model._recorder
        if rec:
            rec("logits_raw", logits)
        logits = ops.softcap(logits, c.final_logit_softcapping)  # 30 * tanh(logits / 30)
        if rec:
            rec("logits", logits)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise InputError("labels need logits at every position: do not combine labels with logits_to_keep")
            _check_labels(labels, c.vocab_size)
            loss = ops.causal_lm_loss(logits, labels, num_items_in_batch=num_items)
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )
        return result if return_dict else result.to_tuple()

    def generate(self, *args, **kwargs):
        from .generation import generate

        return generate(self, *args, **kwargs)


def _check_labels(labels: np.ndarray, n: int) -> None:
    bad = (labels != -100) & ((labels < 0) | (labels >= n))
    if bad.any():
        raise InputError(f"label {int(labels[bad].ravel()[0])} is out of range [0, {n}) (use -100 to ignore)")


class Gemma2ForSequenceClassification(_WithBase):
    """Gemma2Model + a linear score layer (no bias), pooled at the last non-pad token of each row."""

    head_kind = "sequence_classification"

    def _load_head(self, state, lin):
        self.score = lin("score.weight")

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
        **kwargs,
    ):
        c = self.config
        _reject_unknown(kwargs, ())
        return_dict = c.return_dict if return_dict is None else return_dict
        out = self._run_base(output_attentions, output_hidden_states, use_cache, past_key_values,
                             input_ids, attention_mask, position_ids, inputs_embeds, cache_position)
        logits = self.backend.linear(out.last_hidden_state, self.score)  # (B, T, num_labels)
        batch = logits.shape[0]
        if c.pad_token_id is None and batch != 1:
            raise InputError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if c.pad_token_id is None or input_ids is None:
            # transformers cannot see padding in inputs_embeds: it takes the last position
            last = np.full(batch, logits.shape[1] - 1)
        else:
            # the rightmost token that is not pad_token_id (works for left and right padding alike):
            # argmax of index * non_pad, which is 0 for a row of pads, as in transformers.
            ids = np.asarray(input_ids)
            non_pad = (ids != c.pad_token_id).astype(np.int64)
            last = (np.arange(ids.shape[1]) * non_pad).argmax(-1)
        pooled = logits[np.arange(batch), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = _sequence_classification_loss(pooled, np.asarray(labels), c)
        result = SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )
        return result if return_dict else result.to_tuple()


def _sequence_classification_loss(pooled: np.ndarray, labels: np.ndarray, c: Gemma2Config):
    """transformers' ForSequenceClassificationLoss: the problem type is config.problem_type, else inferred:
    one label -> regression (MSE); integer labels -> single-label (cross-entropy); otherwise multi-label (BCE)."""
    n = c.num_labels
    problem = c.problem_type
    if problem is None:
        if n == 1:
            problem = "regression"
        elif labels.dtype in (np.int64, np.int32):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
        # transformers writes the inferred type into the config on the first call, so later calls keep it
        c.problem_type = problem
    if problem == "regression":
        labels = labels.astype(pooled.dtype)
        if n == 1:
            return ops.mse_loss(np.squeeze(pooled), np.squeeze(labels))
        return ops.mse_loss(pooled, labels)
    if problem == "single_label_classification":
        labels = _as_int_array(labels, "labels").reshape(-1)
        _check_labels(labels, n)
        return ops.cross_entropy(pooled.reshape(-1, n), labels)
    labels = labels.astype(pooled.dtype)
    if labels.shape != pooled.shape:
        raise InputError(f"multi-label labels must have shape {pooled.shape}, got {labels.shape}")
    return ops.bce_with_logits(pooled, labels)


class Gemma2ForTokenClassification(_WithBase):
    """Gemma2Model + dropout (training only; this package runs inference) + a linear score layer with bias."""

    head_kind = "token_classification"

    def _load_head(self, state, lin):
        self.score = lin("score.weight", "score.bias")

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
        **kwargs,
    ):
        c = self.config
        _reject_unknown(kwargs, ())
        return_dict = c.return_dict if return_dict is None else return_dict
        out = self._run_base(output_attentions, output_hidden_states, use_cache, past_key_values,
                             input_ids, attention_mask, position_ids, inputs_embeds, cache_position)
        logits = self.backend.linear(out.last_hidden_state, self.score)  # (B, T, num_labels)
        loss = None
        if labels is not None:
            labels = _as_int_array(labels, "labels")
            if labels.shape != logits.shape[:2]:
                raise InputError(f"labels must have shape {logits.shape[:2]}, got {labels.shape}")
            _check_labels(labels, c.num_labels)
            loss = ops.cross_entropy(logits.reshape(-1, c.num_labels), labels.reshape(-1))
        result = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
        )
        return result if return_dict else result.to_tuple()
