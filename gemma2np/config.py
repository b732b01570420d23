"""Gemma2Config: every field of Hugging Face's Gemma2Config, its validation, and config.json I/O.

Layer 1 of the package: imports nothing else from gemma2np.

Two sets of defaults exist and both are honoured:

* ``Gemma2Config()`` built in Python uses the defaults of the documented signature (the seed:
  hidden_size=3072, 28 layers, 16 heads, query_pre_attn_scalar=224, ...).
* A config.json read from disk means exactly what transformers 5.23 makes of it: a key missing
  from the file takes *transformers'* current class default (hidden_size=2304, 26 layers,
  query_pre_attn_scalar=256, ...), because that is what a user loading the same directory with
  transformers gets. The published gemma-2 files carry every key, so this only matters for
  hand-written files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from typing import Any

from .safeio import read_json_file  # layer 0: strict JSON, regular files only

__all__ = ["Gemma2Config", "ConfigError", "ACTIVATIONS", "LAYER_TYPES"]

CONFIG_NAME = "config.json"

# hidden_activation names accepted by transformers' ACT2FN that this package implements (see ops.ACT_FNS).
ACTIVATIONS = (
    "gelu_pytorch_tanh",
    "gelu_new",
    "gelu_fast",
    "gelu",
    "gelu_python",
    "gelu_accurate",
    "quick_gelu",
    "relu",
    "relu6",
    "relu2",
    "silu",
    "swish",
    "sigmoid",
    "tanh",
    "linear",
    "mish",
    "leaky_relu",
    "gelu_10",
)

LAYER_TYPES = ("sliding_attention", "full_attention")

# transformers 5.23's Gemma2Config class defaults where they differ from the seed's documented signature
# (the defaults of `Gemma2Config.__init__` below): what a key missing from a config.json means.
TRANSFORMERS_DEFAULTS: dict[str, Any] = dict(
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    query_pre_attn_scalar=256,
)


# Upper bounds on the sizes a config may declare. A config is read before any tensor, and some sizes build
# Python structures at once (one layer_types entry per layer, one id2label entry per label) or arrays (RoPE
# frequencies of head_dim / 2): a hostile `num_labels: 10**10` or `num_hidden_layers: 10**9` must be an error,
# not a MemoryError or a hang. The bounds are far above every published model (Gemma 2 27B: 46 layers,
# hidden 4608, vocab 256000) and the tensor shapes are checked against the file afterwards anyway.
MAX_LAYERS = 4096
MAX_DIM = 1 << 20  # hidden_size, intermediate_size, head_dim, head counts
MAX_VOCAB = 1 << 24
MAX_LABELS = 1 << 18  # > any Gemma vocabulary: token classification over the vocabulary still fits
_BOUNDS = dict(vocab_size=MAX_VOCAB, hidden_size=MAX_DIM, intermediate_size=MAX_DIM, num_hidden_layers=MAX_LAYERS,
               num_attention_heads=MAX_DIM, num_key_value_heads=MAX_DIM, head_dim=MAX_DIM)


_MAX_JSON_DEPTH = 100  # published configs nest 3 deep; deeper JSON would also break deepcopy / json.dumps


class ConfigError(ValueError):
    """A Gemma2Config field is missing, of the wrong type or inconsistent with another field."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _standardize_rope(rope_parameters, rope_scaling, rope_theta, max_position_embeddings) -> dict:
    """Fold old-style keys into `rope_parameters` the way transformers' RotaryEmbeddingConfigMixin does.

    Priority (transformers 5.23, `convert_rope_params_to_dict` + `standardize_rope_params`):
    `rope_scaling` (the 2024 key) replaces `rope_parameters` when given; `rope_theta` fills in a missing
    theta; an old `"type"` key names the `rope_type`; yarn / longrope / llama3 get
    `original_max_position_embeddings = max_position_embeddings` unless they carry one.
    """
    params = copy.deepcopy(rope_scaling or rope_parameters or {})
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters / rope_scaling must be a dict, got {type(params).__name__}")
    params.setdefault("rope_theta", 10000.0 if rope_theta is None else rope_theta)
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


class Gemma2Config:
    """Configuration of a Gemma 2 model; field names, meanings and defaults as in transformers.

    Fields with an effect on the computation (see README "Config fields" for the code using each):
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, hidden_activation, max_position_embeddings, initializer_range,
    rms_norm_eps, use_cache, pad/eos/bos_token_id, tie_word_embeddings, rope_parameters (rope_theta,
    rope_scaling), attention_bias, attention_dropout, final_logit_softcapping,
    attn_logit_softcapping, query_pre_attn_scalar, sliding_window, layer_types,
    use_bidirectional_attention, num_labels / id2label / label2id, problem_type, classifier_dropout,
    output_hidden_states, output_attentions, return_dict.
    """

    model_type = "gemma2"

    def __init__(
        self,
        vocab_size: int = 256000,
        hidden_size: int = 3072,
        intermediate_size: int = 24576,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 16,
        head_dim: int = 256,
        hidden_activation: str = "gelu_pytorch_tanh",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 1,
        bos_token_id: int | None = 2,
        tie_word_embeddings: bool = True,
        rope_theta: float | None = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        final_logit_softcapping: float | None = 30.0,
        attn_logit_softcapping: float | None = 50.0,
        query_pre_attn_scalar: float = 224,
        sliding_window: int | None = 4096,
        layer_types: list[str] | None = None,
        rope_parameters: dict | None = None,
        use_bidirectional_attention: bool | None = None,
        num_labels: int | None = None,
        id2label: dict | None = None,
        label2id: dict | None = None,
        problem_type: str | None = None,
        classifier_dropout: float | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_activation = hidden_activation
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.final_logit_softcapping = final_logit_softcapping
        self.attn_logit_softcapping = attn_logit_softcapping
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.sliding_window = sliding_window
        self.use_bidirectional_attention = use_bidirectional_attention
        self.problem_type = problem_type
        self.classifier_dropout = classifier_dropout
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.return_dict = return_dict

        # RoPE: transformers 5.x keeps everything in `rope_parameters`; the 2024 keys `rope_theta` and
        # `rope_scaling` are folded into it (and `rope_theta` stays readable as an attribute).
        self.rope_parameters = _standardize_rope(rope_parameters, rope_scaling, rope_theta, max_position_embeddings)

        # Default layer pattern (transformers: `bool((i + 1) % 2)`): layer 0, 2, 4, ... slide; odd layers are global.
        if layer_types is None and _is_int(num_hidden_layers) and 0 < num_hidden_layers <= MAX_LAYERS:
            layer_types = [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_hidden_layers)
            ]
        if layer_types is not None and not isinstance(layer_types, (list, tuple)):
            raise ConfigError(f"layer_types must be a list of strings, got {type(layer_types).__name__}")
        self.layer_types = list(layer_types) if layer_types is not None else None

        # Labels: as PreTrainedConfig, id2label wins over num_labels; default 2 labels.
        if id2label is not None:
            id2label = _label_map(id2label)
            if num_labels is not None and num_labels != len(id2label):
                warnings.warn(
                    f"num_labels={num_labels} disagrees with id2label ({len(id2label)} entries); using id2label",
                    stacklevel=2,
                )
        else:
            n = 2 if num_labels is None else num_labels
            if not _is_int(n) or not 1 <= n <= MAX_LABELS:
                raise ConfigError(f"num_labels must be an integer in [1, {MAX_LABELS}], got {num_labels!r}")
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.id2label = id2label
        if label2id is not None and not isinstance(label2id, dict):
            raise ConfigError(f"label2id must be an object of label -> id, got {type(label2id).__name__}")
        self.label2id = dict(label2id) if label2id is not None else {v: k for k, v in id2label.items()}

        # Everything else (hidden_act, cache_implementation, torch_dtype, architectures, ...) is kept as an
        # attribute, as transformers does, so that save_pretrained writes it back. `hidden_act` has no effect
        # for Gemma 2: transformers' Gemma2MLP reads `hidden_activation` only.
        for key, value in kwargs.items():
            try:
                setattr(self, key, value)
            except (AttributeError, TypeError):  # a read-only property (num_key_value_groups), __class__, ...
                raise ConfigError(f"config key {key!r:.80} cannot be set: it is derived or reserved") from None
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def rope_theta(self) -> float:
        return self.rope_parameters.get("rope_theta", 10000.0)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if not _is_int(n) or not 1 <= n <= MAX_LABELS:
            raise ConfigError(f"num_labels must be an integer in [1, {MAX_LABELS}], got {n!r}")
        self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == "sliding_attention"

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape of every weight of the base model (`model.` prefix), without allocating."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        nq, nkv = self.num_attention_heads, self.num_key_value_heads
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            shapes[p + "self_attn.q_proj.weight"] = (nq * d, h)
            shapes[p + "self_attn.k_proj.weight"] = (nkv * d, h)
            shapes[p + "self_attn.v_proj.weight"] = (nkv * d, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, nq * d)
            if self.attention_bias:
                shapes[p + "self_attn.q_proj.bias"] = (nq * d,)
                shapes[p + "self_attn.k_proj.bias"] = (nkv * d,)
                shapes[p + "self_attn.v_proj.bias"] = (nkv * d,)
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
            for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm"):
                shapes[p + norm + ".weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        return shapes

    def num_parameters(self, head: str = "causal_lm") -> int:
        """Parameter count as transformers' `model.num_parameters()` reports it (tied head counted once)."""
        n = sum(math.prod(s) for s in self.parameter_shapes().values())
        if head == "causal_lm" and not self.tie_word_embeddings:
            n += self.vocab_size * self.hidden_size
        elif head == "sequence_classification":
            n += self.num_labels * self.hidden_size
        elif head == "token_classification":
            n += self.num_labels * self.hidden_size + self.num_labels
        return n

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first field that is missing, mistyped or inconsistent."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if name in _BOUNDS and value > _BOUNDS[name]:
                raise ConfigError(f"{name} = {value} is beyond the supported maximum {_BOUNDS[name]}")
        if self.head_dim % 2:
            # RoPE rotates the two halves of every head (Gemma 2 has no pass-through part): an odd head_dim
            # cannot be rotated. transformers refuses it above 4 and fails at the first forward below.
            raise ConfigError(f"head_dim must be even (RoPE rotates pairs of dimensions), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}): each key/value head serves a whole group of query heads"
            )
        # transformers' Gemma2Config.validate_architecture refuses this too (although head_dim is explicit).
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}), as transformers requires"
            )
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown hidden_activation {self.hidden_activation!r}; supported: {', '.join(ACTIVATIONS)}"
            )
        for name in ("rms_norm_eps", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not _is_number(self.initializer_range) or self.initializer_range < 0:
            raise ConfigError(f"initializer_range must be a non-negative number, got {self.initializer_range!r}")
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value <= 0):
                raise ConfigError(f"{name} must be a positive number or null, got {value!r}")
        if not _is_number(self.attention_dropout) or not 0 <= self.attention_dropout <= 1:
            raise ConfigError(f"attention_dropout must be in [0, 1], got {self.attention_dropout!r}")
        if self.layer_types is None or len(self.layer_types) != self.num_hidden_layers:
            n = None if self.layer_types is None else len(self.layer_types)
            raise ConfigError(
                f"layer_types has {n} entries but num_hidden_layers is {self.num_hidden_layers}: one type per layer"
            )
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"layer_types entries must be one of {LAYER_TYPES}, got {bad[0]!r}")
        if "sliding_attention" in self.layer_types:
            if not _is_int(self.sliding_window) or self.sliding_window <= 0:
                raise ConfigError(
                    f"sliding_window must be a positive integer when a layer slides, got {self.sliding_window!r}"
                )
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise ConfigError(f"{name} must be an integer or null, got {value!r}")
        eos = self.eos_token_id
        eos_list = eos if isinstance(eos, (list, tuple)) else [eos]
        if eos is not None and not all(_is_int(e) for e in eos_list):
            raise ConfigError(f"eos_token_id must be an integer, a list of integers or null, got {eos!r}")
        if self.problem_type not in (None, "regression", "single_label_classification",
                                     "multi_label_classification"):
            raise ConfigError(f"unknown problem_type {self.problem_type!r}")
        if self.classifier_dropout is not None and not _is_number(self.classifier_dropout):
            raise ConfigError(f"classifier_dropout must be a number or null, got {self.classifier_dropout!r}")
        from_rope = _validate_rope_lazily(self.rope_parameters, self.head_dim, self.max_position_embeddings)
        if from_rope:
            raise ConfigError(from_rope)

    # ------------------------------------------------------------------ dict / json I/O
    def to_dict(self) -> dict[str, Any]:
        """All fields, in the layout transformers 5.x writes (rope_parameters + layer_types)."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["model_type"] = self.model_type
        out.setdefault("architectures", None)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, CONFIG_NAME))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides) -> "Gemma2Config":
        """Build from a config.json dict, filling missing keys with transformers 5.23's defaults."""
        if not isinstance(config_dict, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(config_dict).__name__}")
        d = dict(config_dict)
        d.update(overrides)
        model_type = d.pop("model_type", "gemma2")
        if model_type not in ("gemma2", None):
            raise ConfigError(f"config.json is for model_type {model_type!r}, not 'gemma2'")
        for key, value in TRANSFORMERS_DEFAULTS.items():
            d.setdefault(key, value)
        if d.get("num_labels") is not None and d.get("id2label") is not None:
            d.pop("num_labels")
        try:
            return cls(**d)
        except TypeError as exc:  # a field given twice or of a shape __init__ cannot take
            raise ConfigError(f"invalid config: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Gemma2Config":
        path = os.fspath(path)
        if not os.path.lexists(path):
            raise ConfigError(f"no config.json at {path!r}")
        # non-UTF-8 bytes, nesting deeper than any config (RecursionError in json), integer literals past
        # int()'s 4,300 digits, a FIFO or directory in place of the file: all ConfigError
        data = read_json_file(path, ConfigError, path, max_depth=_MAX_JSON_DEPTH)
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "Gemma2Config":
        """Read `<dir>/config.json` (or a path to the json file itself)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        config = cls.from_json_file(path)
        if overrides:
            d = config.to_dict()
            d.update(overrides)
            config = cls.from_dict(d)
        return config

    def copy(self) -> "Gemma2Config":
        return copy.deepcopy(self)

    def __eq__(self, other) -> bool:
        return isinstance(other, Gemma2Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Gemma2Config {self.to_json_string()}"


def _label_map(id2label) -> dict[int, str]:
    """id2label as {int: str}; keys are JSON strings of integers ("0", "1", ...) or ints, as transformers
    turns them with int(key). Refused: keys int() cannot read ("1e9", "x"), non-string labels, too many."""
    if not isinstance(id2label, dict):
        raise ConfigError(f"id2label must be an object of id -> label, got {type(id2label).__name__}")
    if len(id2label) > MAX_LABELS:
        raise ConfigError(f"id2label has {len(id2label)} entries, beyond the supported maximum {MAX_LABELS}")
    out = {}
    for k, v in id2label.items():
        if isinstance(k, bool) or not isinstance(k, (int, str)):
            raise ConfigError(f"id2label key {k!r:.40} is not an integer")
        try:
            i = int(k) if isinstance(k, int) or len(k) <= 20 else None
        except ValueError:
            i = None
        if i is None:
            raise ConfigError(f"id2label key {k!r:.40} is not an integer (transformers reads the keys with int())")
        if not isinstance(v, str):
            raise ConfigError(f"id2label[{k!r:.40}] is {type(v).__name__} {v!r:.40}, not a label string")
        out[i] = v
    return out


# RoPE fields that are numbers: NaN / inf in any of them, or a factor <= 0, makes the frequencies NaN or inf
# (linear `inv_freq / 0`, yarn/llama3 divisions, longrope `1 / (ext * freq)`); transformers only warns.
_ROPE_POSITIVE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "rope_theta")
_ROPE_NON_NEGATIVE = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _check_rope_numbers(p: dict) -> str | None:
    for key in _ROPE_POSITIVE + _ROPE_NON_NEGATIVE + ("partial_rotary_factor",):
        v = p.get(key)
        if v is None or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue  # absent / None (a default) / not a number: rope.validate_rope_parameters decides
        if not math.isfinite(v):
            return f"rope_parameters {key} must be finite, got {v!r}"
        if key in _ROPE_POSITIVE and v <= 0:
            return f"rope_parameters {key} must be > 0, got {v!r} (it would make the RoPE frequencies inf / NaN)"
        if key in _ROPE_NON_NEGATIVE and v < 0:
            return f"rope_parameters {key} must be >= 0, got {v!r}"
        if key == "partial_rotary_factor" and not 0 < v <= 1:
            return f"rope_parameters partial_rotary_factor must be in (0, 1], got {v!r}"
    for key in ("short_factor", "long_factor"):
        v = p.get(key)
        if isinstance(v, (list, tuple)):
            bad = [x for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)
                   and not (math.isfinite(x) and x > 0)]
            if bad:
                return f"rope_parameters {key} entries must be finite and > 0, got {bad[0]!r}"
    return None


def _validate_rope_lazily(rope_parameters: dict, head_dim: int, max_position_embeddings: int | None = None) -> str | None:
    """Run rope.validate_rope_parameters; return its message instead of raising (config imports no module
    of the package at import time; rope.py is a leaf module of pure functions)."""
    from . import rope  # local import: rope.py does not import the config

    validate = getattr(rope, "validate_rope_parameters", None)
    if validate is None:
        return None
    bad = _check_rope_numbers(rope_parameters) if isinstance(rope_parameters, dict) else None
    if bad:
        return bad
    try:
        validate(rope_parameters, head_dim)
    except ValueError as exc:
        return f"invalid rope_parameters: {exc}"
    return _probe_rope(rope, rope_parameters, head_dim, max_position_embeddings)


def _probe_rope(rope, params: dict, head_dim: int, max_pos: int | None) -> str | None:
    """Compute the frequencies the config implies (head_dim / 2 numbers: cheap) at the context length and past
    it (dynamic / longrope change there): anything non-finite or any arithmetic error is a config error, found
    now rather than as NaN logits. Only checks; the model computes its own."""
    import numpy as np  # numpy is a dependency of the package; imported here to keep config light

    compute = getattr(rope, "compute_inv_freq", None)
    if compute is None or max_pos is None:
        return None
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            for seq_len in (None, np.int64(2 * max_pos)):
                inv, scale = compute(params, head_dim, max_pos, seq_len=seq_len)
                if not (np.all(np.isfinite(inv)) and math.isfinite(scale)):
                    return (f"rope_parameters {params!r:.200} give non-finite RoPE frequencies or scaling "
                            f"(at sequence length {seq_len or max_pos})")
    except (ArithmeticError, ValueError, TypeError, KeyError) as exc:
        return f"invalid rope_parameters: computing the frequencies fails ({type(exc).__name__}: {exc})"
    return None
