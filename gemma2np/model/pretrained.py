"""Gemma2PreTrainedModel: what every model class shares -- loading (HF directories, GGUF), random init,
saving, and the hook that records named intermediates. The decoder math is decoder.py.

Loading prepares each weight once for the chosen backend (kernels/protocol.py): linear layers become
backend handles (memory-mapped where the format allows), norm weights arrays of the compute dtype.
The reference ("numpy") keeps the stored weights and converts them at use (kernels/ops_backend.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Callable

import numpy as np

from .. import intermediates
from ..checkpoint import (CheckpointError, bfloat16, check_state_dict, copy_to_ram, load_state_dict, release_pages,
                          save_state_dict)
from ..config import CONFIG_NAME, Gemma2Config
from ..gguf_io import load_gguf
from ..kernels import get_backend
from ..kernels.gguf_repack import fallback_types
from ..kernels.ops_backend import VOCAB_ROW_BLOCK, ReferenceBackend
from ..parallel.tensor_parallel import load_collectively, make_tensor_parallel
from ..rope import RotaryEmbedding
from .embeddings import resized_rows, resolve_new_num_tokens
from ..cache import check_cache_dtype
from .validation import CacheError, InputError

__all__ = ["Gemma2PreTrainedModel", "no_tap"]

_DTYPES = {"float32": np.float32, "float64": np.float64, np.float32: np.float32, np.float64: np.float64}
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


# what checking a call's arguments raises: under tensor parallelism every rank checks rank 0's arguments and
# raises these together (nothing else may leave a rank behind in a collective: parallel/tensor_parallel.py)
_CHECK_ERRORS = (InputError, CacheError, TypeError)


def no_tap(name: str, value) -> None:
    """The recording hook while nothing records: does nothing."""


class _LayerWeights:
    """Prepared weights of one decoder layer (backend handles for the projections, arrays for the norms)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _to_compute(a: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(a).astype(dtype, copy=False)


class Gemma2PreTrainedModel:
    """What every model class shares: loading, saving, random initialisation and the recording hook."""

    config_class = Gemma2Config
    base_model_prefix = "model"
    head_kind = "base"  # which extra tensors the class has: base | causal_lm | sequence_classification | token_classification
    cache_dtype = None  # dtype of the KV caches this model makes (None: its compute dtype; cache.py)

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
        cache_dtype=None,
    ):
        if not isinstance(config, Gemma2Config):
            raise TypeError(f"config must be a Gemma2Config, got {type(config).__name__}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.config = config
        self.dtype = np.dtype(_DTYPES[dtype])
        # set before _load: the heads' Gemma2Model view copies the attributes there
        self.cache_dtype = check_cache_dtype(cache_dtype)
        self.training = False
        self._tap = no_tap  # the one recording hook: record_intermediates() swaps in a recorder
        # this rank's shard under mpiexec (gemma2np.parallel); one process: every tp hook is the identity
        self.tp = make_tensor_parallel(config, tensor_parallel)
        if state_dict is None:
            state_dict = self._random_state_dict(self.tp.same_seed(seed))  # tensor-parallel: rank 0's seed
        self._mmap = mmap
        self._load(state_dict, backend=backend, weights=weights, n_threads=n_threads, strict=strict, progress=progress)
        if self.tp.parallel:  # every rank runs rank 0's calls; errors from checking them are raised by all
            self.forward = self.tp.follow_root(self.forward, _CHECK_ERRORS)
            if hasattr(self, "generate"):
                self.generate = self.tp.follow_root_generate(self.generate, _CHECK_ERRORS)
            self.save_pretrained = self.tp.root_only(self.save_pretrained)  # one writer of the (whole) files
            for name in ("resize_token_embeddings", "set_input_embeddings"):  # would rebuild a whole LM head
                setattr(self, name, self.tp.refuse(name))

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

        be = self.backend = get_backend(backend, n_threads=n_threads, dtype=self.dtype)
        if weights is None:
            weights = _default_weights(state[p + "embed_tokens.weight"]) if len(be.weight_formats) > 1 else "float32"
        if weights not in ("float32", "bfloat16", "int8", "int4"):
            raise ValueError(f"weights must be 'float32', 'bfloat16', 'int8' or 'int4', got {weights!r}")
        if weights not in be.weight_formats:
            raise ValueError(f"the {be.name} backend computes with {'/'.join(be.weight_formats)} weights; use "
                             f"backend='native' for weights={weights!r}")
        self.weights_format = weights
        dt = self.dtype
        if not isinstance(be, ReferenceBackend):
            slow = fallback_types(state.values())
            if slow:  # one warning per load: these GGUF types have no native kernel here
                warnings.warn(f"GGUF tensor type(s) {', '.join(slow)} have no native kernel: expanded to bfloat16 "
                              "at load (Q8_0, Q6_K, Q4_K and Q4_0 run natively)", stacklevel=3)

        tp = self.tp

        def lin(name, bias_name=None, head=False):
            w = tp.shard(name, state[name])  # tensor-parallel: this rank's rows / columns (else w itself)
            if not self._mmap:
                w = copy_to_ram(w)  # mmap=False: private copy (huge pages), file pages released as it goes
            b = tp.shard(bias_name, state.get(bias_name)) if bias_name else None
            handle = be.prepare_linear(w, b, weights=_head_weights(weights) if head else weights,
                                       **(_head_options(be) if head else {}))
            stored = getattr(w, "raw", w)  # a quantized GGUF tensor: its blocks (never np.asarray'd here)
            if not any(np.shares_memory(stored, a) for a in _arrays_of(handle)):
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
                names=intermediates.layer_names(i),
            ))
            if progress is not None:  # (layers prepared, total): lets a CLI draw a loading bar
                progress(i + 1, c.num_hidden_layers)
        self.norm = _to_compute(state[p + "norm.weight"], dt)
        self._load_head(state, lambda name, bias_name=None: lin(name, bias_name, head=True))
        self.rotary_emb = RotaryEmbedding(c.rope_parameters, c.head_dim, c.max_position_embeddings, dtype=dt)
        self._state = state  # for save_pretrained / state_dict (memory-mapped: costs no RAM)

    def _load_head(self, state, lin):
        pass

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
        cache_dtype=None,
        **config_overrides,
    ):
        """Load an HF-format directory: config.json + model.safetensors (or shards + index), f32/f16/bf16.

        backend: "numpy" (the reference, default: exact and dependency-free) or "native" (C kernels).
        weights: in-memory weight format for the native backend: "float32", "bfloat16", "int8" or "int4"
            (4.5 bits per weight, kernels/int4.py)
                 (default: bfloat16 for a bf16/f16 checkpoint, float32 for an f32 one). It applies to float
                 tensors only: a GGUF's quantized tensors keep their own format (Q4_0 natively, Q8_0 / Q6_K as
                 int8, Q4_K as int4, other types bf16; docs/precision.md, "GGUF quants").
        dtype:   activations and the NumPy backend's weights: "float32" (default) or "float64" (ground truth).
        gguf_file: a llama.cpp GGUF file (path, or name inside the directory) instead of safetensors.
        mmap:    True (default): weights stay memory-mapped, loading is instant and pages come in on first use.
                 False: weights are copied into process memory as they load (file pages released behind,
                 so RSS still ends at ~1x the weights), like llama.cpp's --no-mmap: slower to load, then
                 independent of the page cache (and backed by huge pages where the OS gives them).
        tensor_parallel: under `mpiexec -n N` (N > 1) each rank holds its slice of every layer and of the LM
                 head (gemma2np/parallel), and every rank follows rank 0's forward / generate calls. A rank
                 that fails to load makes every rank raise (rank 0 reports it). One process: no effect.
        cache_dtype: the KV cache's storage dtype for every cache this model makes (forward with use_cache,
                 generate, chat): None (default: the compute dtype, float32), "float32" or "bfloat16" (keys and
                 values rounded to bf16 when written, half the cache bytes; docs/precision.md). A Gemma2Cache
                 passed as past_key_values keeps its own dtype (Gemma2Cache(..., dtype=...)).
        """
        check_cache_dtype(cache_dtype)  # a mistake there fails before anything is read
        return load_collectively(lambda: cls._from_pretrained(
            pretrained_model_name_or_path, backend=backend, dtype=dtype, weights=weights, n_threads=n_threads,
            gguf_file=gguf_file, config=config, progress=progress, mmap=mmap, tensor_parallel=tensor_parallel,
            cache_dtype=cache_dtype, **config_overrides), tensor_parallel)

    @classmethod
    def _from_pretrained(cls, pretrained_model_name_or_path, *, backend, dtype, weights, n_threads, gguf_file,
                         config, progress, mmap, tensor_parallel, cache_dtype=None, **config_overrides):
        path = os.fspath(pretrained_model_name_or_path)
        if gguf_file is not None:
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
                    mmap=mmap, tensor_parallel=tensor_parallel, cache_dtype=cache_dtype)
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
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}  # shapes only: nothing dequantized

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

    def prepared_weights(self) -> dict:
        """What the loaded weights take: {"formats": {format: linear layers}, "bytes": int, "gguf_quant": bool
        (some weight came from a GGUF's quantized tensor)}. Formats are the
        backend's ("int8", "q4_0", ...; the reference: the stored dtype or GGUF type it widens at use);
        bytes count every linear once (a tied head is the embedding) plus the norm vectors. For a GGUF
        on the native backend this is about the file's size (docs/precision.md, "GGUF quants")."""
        from collections import Counter

        base = self._base()
        handles = [getattr(layer, n) for layer in base.layers for n in _PROJ + _MLP]
        handles += [getattr(self, n) for n in ("lm_head", "score") if getattr(self, n, None) is not None]
        formats, total = Counter(), sum(getattr(layer, n).nbytes for layer in base.layers for n in _NORMS)
        for h in handles:
            w = h.w if hasattr(h, "w") else h  # LinearHandle / ReferenceLinear, or a bare float32 matrix
            fmt = getattr(h, "fmt", None) or getattr(w, "type_name", None) or _dtype_name(w.dtype)
            formats[fmt] += 1
            total += h.nbytes if hasattr(h, "fmt") else sum(a.nbytes for a in h.arrays() if a is not None)
        total += base.norm.nbytes
        quant = any(getattr(v, "raw", None) is not None for v in self._state.values())
        return {"formats": dict(formats), "bytes": int(total), "gguf_quant": quant}

    def num_parameters(self) -> int:
        return self.config.num_parameters(self.head_kind)

    # ------------------------------------------------------------------ token embeddings (PreTrainedModel's API)
    def get_input_embeddings(self) -> np.ndarray:
        """The token embedding matrix (vocab_size, hidden_size), in the checkpoint's dtype (transformers returns
        the nn.Embedding module; here the array itself, read-only when memory-mapped)."""
        return self.embed_tokens

    def get_output_embeddings(self) -> np.ndarray | None:
        """The LM head's weight (vocab_size, hidden_size) -- the embedding matrix itself when tied -- or None for
        the classes without an LM head (Gemma2Model and the classification heads), as transformers."""
        if self.head_kind != "causal_lm":
            return None
        return self.embed_tokens if self._head_is_tied() else self._state["lm_head.weight"]

    def set_input_embeddings(self, value) -> None:
        """Replace the token embedding matrix by `value` (vocab_size, hidden_size), any float dtype; a tied LM
        head follows it (transformers re-ties on tie_weights()). To change the vocabulary size use
        resize_token_embeddings: a matrix of another size is refused here, since the config, the id checks and
        the head all go by config.vocab_size."""
        c = self.config
        try:
            value = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputError(f"the embedding matrix must be an array, got {type(value).__name__} ({exc})") from None
        if not np.issubdtype(value.dtype, np.floating) and value.dtype != bfloat16:
            raise InputError(f"the embedding matrix must be floating point, got dtype {value.dtype}")
        if value.shape != (c.vocab_size, c.hidden_size):
            raise InputError(f"the embedding matrix must have shape (vocab_size, hidden_size) = "
                             f"({c.vocab_size}, {c.hidden_size}), got {value.shape}; use resize_token_embeddings "
                             "to change the vocabulary size")
        if not np.isfinite(value.astype(np.float32)).all():
            raise InputError("the embedding matrix contains NaN or infinite values")
        self._replace_vocab_tensors(value, None)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True, *, seed: int | None = None) -> np.ndarray:
        """transformers' PreTrainedModel.resize_token_embeddings: the embedding matrix (and an untied LM head)
        get new_num_tokens rows (rounded up to a multiple of pad_to_multiple_of), the first rows kept bitwise,
        added rows initialised around the old rows' mean (mean_resizing, the default) or normal(0,
        initializer_range); a tied head follows; config.vocab_size is updated. Returns the new matrix.
        seed (gemma2np only): the NumPy generator of the added rows (transformers uses torch's global one).
        The procedure and its fallbacks: gemma2np/model/embeddings.py."""
        old = self.embed_tokens
        n = resolve_new_num_tokens(new_num_tokens, pad_to_multiple_of, old.shape[0])
        if n is None or n == old.shape[0]:
            return old  # transformers returns the module unchanged in both cases
        if not isinstance(mean_resizing, (bool, np.bool_)):
            raise InputError(f"mean_resizing must be True or False, got {mean_resizing!r}")
        rng = np.random.default_rng(seed)
        init = self.config.initializer_range
        try:
            embed = resized_rows(old, n, bool(mean_resizing), init, rng)
            head = None
            if self.head_kind == "causal_lm" and not self._head_is_tied():
                # transformers' _get_resized_lm_head: the same initialisation from the head's own rows
                head = resized_rows(self._state["lm_head.weight"], n, bool(mean_resizing), init, rng)
        except MemoryError:
            raise InputError(f"cannot allocate a ({n}, {old.shape[1]}) embedding matrix") from None
        self.config.vocab_size = n  # transformers: config.get_text_config().vocab_size = new size
        self._replace_vocab_tensors(embed, head)
        return embed

    def _head_is_tied(self) -> bool:
        # as _load_head decides it: tied by the config, or no lm_head tensor to load
        return self.config.tie_word_embeddings or "lm_head.weight" not in self._state

    def _replace_vocab_tensors(self, embed: np.ndarray, head: np.ndarray | None) -> None:
        """Swap in a new embedding matrix (and LM head weight) on this model and on a head's .model view, and
        re-prepare the LM head handle for the backend, in the format it was loaded with."""
        p = self._prefix()
        tied = self._head_is_tied()
        state = dict(self._state)
        state[p + "embed_tokens.weight"] = embed
        if head is not None:
            state["lm_head.weight"] = head
        elif tied:
            state.pop("lm_head.weight", None)  # a tied head has no tensor of its own (state_dict drops it too)
        views = [self] + [m for m in (getattr(self, "model", None),) if m is not None and m is not self]
        lm_head = None
        if self.head_kind == "causal_lm":
            lm_head = self.backend.prepare_linear(embed if tied else state["lm_head.weight"], None,
                                                  weights=_head_weights(self.weights_format),
                                                  **_head_options(self.backend))
        for m in views:
            m._state = state
            m.embed_tokens = embed
            if lm_head is not None:
                m.lm_head = lm_head

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
        previous = base._tap
        base._tap = record  # only the hook changes: the same kernels run with recording on or off
        try:
            yield store
        finally:
            base._tap = previous

    def _base(self):
        """The Gemma2Model whose forward pass records (the model itself, or a head's .model)."""
        return self


def _head_options(be) -> dict:
    """prepare_linear options of a head (LM head, classification score). The reference converts a head
    VOCAB_ROW_BLOCK rows at a time (kernels/ops_backend.py): a bf16 model never holds the float copy of
    its 256000-row matrix. The other backends pack their weights at load and take no such option."""
    return {"row_block": VOCAB_ROW_BLOCK} if isinstance(be, ReferenceBackend) else {}


def _head_weights(weights: str) -> str:
    """The format of a head (LM head, classification score) given the model's `weights`: the same, except
    int4 heads stay int8. Every logit is one dot product with a head row, so 4-bit head rows move the
    logits directly: on the bundled model an int4 LM head doubles the KL divergence to float32
    (docs/precision.md); llama.cpp's Q4_0 / Q4_K_M files likewise keep output.weight (or a tied
    token_embd) at Q6_K."""
    return "int8" if weights == "int4" else weights


def _arrays_of(handle) -> list:
    """The arrays a prepared linear holds (a bare array, a tuple of arrays, or a LinearHandle)."""
    if isinstance(handle, np.ndarray):
        return [handle]
    if isinstance(handle, tuple):
        return [a for a in handle if isinstance(a, np.ndarray)]
    return handle.arrays()


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
