"""llama.cpp GGUF files of Gemma 2 -> (config dict, HF-named state dict).

Layer 2 of the package. The file is parsed by the `gguf` package (llama.cpp's own Python reader,
`gguf.GGUFReader`); quantized tensors stay quantized, as gguf_quant.GGUFQuantTensor (the memory-mapped
blocks, dequantized by `gguf.quants.dequantize` where and when a consumer needs values). This module only
maps names, shapes and metadata, and undoes llama.cpp's conventions:

* Names: `token_embd` -> model.embed_tokens, `blk.N.attn_q/k/v/output` -> self_attn.{q,k,v,o}_proj,
  `blk.N.attn_norm` -> input_layernorm, `post_attention_norm`, `ffn_norm` -> pre_feedforward_layernorm,
  `post_ffw_norm`, `ffn_gate/up/down` -> mlp.*, `output_norm` -> model.norm, `output` -> lm_head
  (present only for an untied head; llama.cpp's converter writes none for Gemma 2).
* Shapes: GGUF lists dimensions fastest-first (ne[0] = row length); GGUFReader already reverses them,
  so a weight comes out as NumPy (out_features, in_features), exactly HF's layout. Shapes are checked
  against the config anyway (by the model's loader, naming the tensor).
* No q/k permutation: llama.cpp runs Gemma 2 with NEOX-style RoPE (rotate halves), the same as
  transformers, so its converter stores q/k unpermuted (unlike LLaMA).
* Norm weights: llama.cpp's converter stores Gemma's RMSNorm weight as `1 + w` (its graph multiplies
  by the stored weight). We subtract 1 on load. In float32 arithmetic this is exact for a value read
  from an F16/BF16/F32 file in [0.5, 2] (Sterbenz), and `1 + (x - 1)` gives back x, so the model
  multiplies by exactly what llama.cpp does. What is *lost* is upstream: if a converter ever stored the
  norms as F16/BF16 (llama.cpp keeps 1-D tensors in F32), `1 + w` was rounded at the magnitude of 1
  (bf16 step 2^-7 ~ 0.0078, f16 2^-10 ~ 0.001 near 1), i.e. w gets an absolute error up to half a step,
  far more than rounding w itself would have cost. We cannot recover that; we report what is stored.
* Query scale: GGUF has no query_pre_attn_scalar. llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA2, with
  a reference to gemma_pytorch's config.py) derives it from the layer count:
      type = 27B if n_layer == 46 else ...
      f_attention_scale = type == 27B ? 1/sqrt(n_embd / n_head)   (integer division: 4608/32 = 144)
                                      : 1/sqrt(n_embd_head_k)      (key_length: 256 for 2B and 9B)
  We reproduce that rule (query_pre_attn_scalar = hidden // heads for 46 layers, else head_dim), so a
  GGUF computes here what it computes in llama.cpp. transformers' own GGUF loader leaves the config
  default and ignores the softcap keys (noted in the project's numerics notes): not copied.
* Missing optional keys mean what they mean to llama.cpp: the softcaps default to its hparams defaults
  50 / 30 (src/llama-hparams.h), the sliding window to 4096 (every converter writes it), layer i slides
  iff i is even (set_swa_pattern(2)) and a key is masked iff q_pos - k_pos >= window -- the same rule
  as transformers' default layer_types and window.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from typing import Any

import numpy as np

from .checkpoint import CheckpointError, bfloat16
from .gguf_quant import GGUFQuantTensor
from .safeio import check_regular

__all__ = ["load_gguf", "read_gguf_config", "GGUF_TO_HF"]

ARCH = "gemma2"

# GGUF per-layer tensor name -> HF name (after `model.layers.N.`), and whether it is a (1 + w) norm.
_LAYER_MAP: dict[str, tuple[str, bool]] = {
    "attn_q": ("self_attn.q_proj", False),
    "attn_k": ("self_attn.k_proj", False),
    "attn_v": ("self_attn.v_proj", False),
    "attn_output": ("self_attn.o_proj", False),
    "attn_norm": ("input_layernorm", True),
    "post_attention_norm": ("post_attention_layernorm", True),
    "ffn_norm": ("pre_feedforward_layernorm", True),
    "post_ffw_norm": ("post_feedforward_layernorm", True),
    "ffn_gate": ("mlp.gate_proj", False),
    "ffn_up": ("mlp.up_proj", False),
    "ffn_down": ("mlp.down_proj", False),
}
_GLOBAL_MAP: dict[str, tuple[str, bool]] = {
    "token_embd": ("model.embed_tokens", False),
    "output_norm": ("model.norm", True),
    "output": ("lm_head", False),
}
GGUF_TO_HF = {"global": _GLOBAL_MAP, "layer": _LAYER_MAP}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


# GGUF value types (ggml's gguf.h): fixed element sizes; 8 = string (u64 length + bytes), 9 = array
# (u32 element type, u64 count, elements)
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_MAX_DEPTH = 8


class _Scan:
    """A bounds-checked walk over a GGUF header, before the `gguf` package reads it.

    The package trusts every count in the file: an array declaring 2**62 elements past the end of the data
    makes it loop, appending empty views, until memory runs out (found by tests/test_fuzz.py). Here every
    count is checked against the bytes that remain before anything is built, so a hostile header is a
    CheckpointError naming what is wrong, at a cost of one pass over the metadata."""

    def __init__(self, data, path: str):
        self.data, self.path, self.pos = data, path, 0

    def fail(self, what: str):
        raise CheckpointError(f"{self.path}: not a readable GGUF file ({what} at byte {self.pos})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > len(self.data) - self.pos:
            self.fail(f"{what} needs {n} bytes, {len(self.data) - self.pos} remain")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "little")

    def string(self, what: str) -> None:
        self.take(self.u64(what + " length"), what)

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _GGUF_FIXED:
            self.take(_GGUF_FIXED[vtype], what)
        elif vtype == 8:
            self.string(what)
        elif vtype == 9:
            if depth >= _GGUF_MAX_DEPTH:
                self.fail(f"{what}: arrays nested deeper than {_GGUF_MAX_DEPTH}")
            etype = self.u32(what + " element type")
            count = self.u64(what + " element count")
            if etype in _GGUF_FIXED:
                self.take(count * _GGUF_FIXED[etype], f"{what} ({count} elements)")
                return
            # strings take >= 8 bytes each, arrays >= 12: a count the rest of the file cannot hold is refused
            # before walking it
            smallest = 8 if etype == 8 else 12
            if count * smallest > len(self.data) - self.pos:
                self.fail(f"{what} declares {count} elements, more than the file holds")
            for _ in range(count):
                self.value(etype, what, depth + 1)
        else:
            self.fail(f"{what}: unknown value type {vtype}")


def _prescan(path: str) -> None:
    """Check a GGUF file's header (magic, version, every key/value and tensor record) against its size."""
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # an empty file cannot be mapped
            raise CheckpointError(f"{path}: not a readable GGUF file (empty)") from None
    data = memoryview(mm)
    try:
        _scan_header(_Scan(data, path))
    finally:
        data.release()
        mm.close()


def _scan_header(sc: _Scan) -> None:
    data = sc.data
    if bytes(sc.take(4, "magic")) != b"GGUF":
        sc.fail("no GGUF magic")
    version = sc.u32("version")
    if version not in (2, 3):
        sc.fail(f"GGUF version {version} (2 and 3 are read)")
    n_tensors, n_kv = sc.u64("tensor count"), sc.u64("metadata count")
    # every key/value takes >= 8 + 4 + 1 bytes and every tensor record >= 8 + 4 + 8 + 4 + 8
    if n_kv * 13 + n_tensors * 32 > len(data) - sc.pos:
        sc.fail(f"{n_kv} metadata entries and {n_tensors} tensors declared, more than the file holds")
    for i in range(n_kv):
        sc.string(f"metadata key {i}")
        sc.value(sc.u32(f"metadata {i} type"), f"metadata value {i}")
    for i in range(n_tensors):
        sc.string(f"tensor {i} name")
        n_dims = sc.u32(f"tensor {i} dimension count")
        if n_dims > 4:  # GGML_MAX_DIMS
            sc.fail(f"tensor {i} has {n_dims} dimensions (at most 4)")
        sc.take(8 * n_dims + 4 + 8, f"tensor {i} record")


def _open(path: str):
    try:
        import gguf
    except ImportError:  # pragma: no cover - a declared dependency
        raise CheckpointError("reading GGUF files needs the `gguf` package (pip install gguf)") from None
    if not os.path.lexists(path):
        raise CheckpointError(f"GGUF file not found: {path!r}")
    check_regular(path, CheckpointError, "GGUF file")  # never open a FIFO / device / directory
    _prescan(path)
    try:
        return gguf, gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError / IndexError / struct errors on bad input
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}; truncated?)") from None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as exc:  # the gguf package decoding a malformed value (bad string bytes, array types)
        raise CheckpointError(f"GGUF metadata {key} cannot be read ({type(exc).__name__}: {exc})") from None


def _typed(reader, path: str, key: str, kind: str, default: Any = None, required: bool = False) -> Any:
    """A metadata value of the expected type, else CheckpointError naming the key and what it holds.

    kind "int": an integer (not a bool; llama.cpp's per-layer arrays are not Gemma 2); "float": a finite
    number; "str": a string. A wrong type (head_count stored as a string, ...) never reaches int()/float()."""
    v = _field(reader, key)
    if v is None:
        if required:
            raise CheckpointError(f"{path}: GGUF metadata lacks {key}")
        return default
    if kind == "int":
        ok = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
        v = int(v) if ok else v
    elif kind == "float":
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        ok = ok and math.isfinite(float(v))
        v = float(v) if ok else v
    else:
        ok = isinstance(v, str)
    if not ok:
        raise CheckpointError(f"{path}: GGUF metadata {key} should be {'a finite number' if kind == 'float' else 'an integer' if kind == 'int' else 'a string'}, "
                              f"got {type(v).__name__} {v!r:.60}")
    return v


def _config_from_reader(reader, path: str, vocab_rows: int | None) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{path}: GGUF architecture is {arch!r:.60}, not 'gemma2' (only Gemma 2 is supported)")

    def num(key, kind="int", default=None, required=False):
        return _typed(reader, path, f"{ARCH}.{key}", kind, default, required)

    def positive(key, value):
        if value <= 0:
            raise CheckpointError(f"{path}: GGUF metadata {ARCH}.{key} must be positive, got {value}")
        return value

    hidden = positive("embedding_length", num("embedding_length", required=True))
    n_layer = positive("block_count", num("block_count", required=True))
    n_head = positive("attention.head_count", num("attention.head_count", required=True))
    n_kv = num("attention.head_count_kv", default=n_head)
    # llama.cpp: n_embd_head_k = key_length if present, else n_embd / n_head
    head_dim = num("attention.key_length", default=hidden // n_head)
    v_dim = num("attention.value_length", default=head_dim)
    if v_dim != head_dim:
        raise CheckpointError(f"{path}: key_length {head_dim} != value_length {v_dim}; Gemma 2 has one head_dim")
    # The query scale rule of llama.cpp (see the module docstring): 27B is recognised by its 46 layers.
    query_pre_attn_scalar = hidden // n_head if n_layer == 46 else head_dim

    caps = {}
    for key, default in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)):
        caps[key] = num(key, "float", default)

    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, list):
        raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.tokens should be a list, got {type(tokens).__name__}")
    if vocab_rows is not None:
        vocab = vocab_rows  # the embedding is what the model computes with
    elif tokens is not None:
        vocab = len(tokens)
    else:
        raise CheckpointError(f"{path}: cannot tell the vocabulary size (no token list, no token_embd)")

    cfg: dict[str, Any] = {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": num("feed_forward_length", required=True),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": num("context_length", default=8192),
        "rms_norm_eps": num("attention.layer_norm_rms_epsilon", "float", 1e-6),
        # llama.cpp's Gemma 2 graph uses ggml_gelu, the tanh approximation
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": num("rope.freq_base", "float", 10000.0),
        "sliding_window": num("attention.sliding_window", default=4096),
        "query_pre_attn_scalar": query_pre_attn_scalar,
        **caps,
    }
    scaling = num("rope.scaling.type", "str")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise CheckpointError(f"{path}: unsupported rope scaling {scaling!r:.60} for Gemma 2")
        # a factor <= 0 / NaN is refused by Gemma2Config (ConfigError), as for config.json
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": num("rope.scaling.factor", "float", 1.0)}
    for hf_key, gg_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id")):
        v = _typed(reader, path, f"tokenizer.ggml.{gg_key}", "int")
        if v is not None:
            cfg[hf_key] = v
    name = _typed(reader, path, "general.name", "str")
    if name is not None:
        cfg["_name_or_path"] = name
    return cfg


def read_gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Only the config dict of a Gemma 2 GGUF (metadata; no tensor is dequantized)."""
    path = os.fspath(path)
    _, reader = _open(path)
    rows = None
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            rows = int(t.shape[1])  # GGUF dims are [n_embd, n_vocab]
    return _config_from_reader(reader, path, rows)


def _to_array(gguf, t, path: str) -> np.ndarray | GGUFQuantTensor:
    """One tensor in (out, in) order. F32/F16 stay memory-mapped views, BF16 becomes an exact
    ml_dtypes.bfloat16 view; a quantized 2-D tensor (Q8_0, Q4_K, ...) becomes a GGUFQuantTensor over its
    memory-mapped blocks (never expanded here: see gguf_quant). Other quantized shapes (1-D; no Gemma 2
    converter writes one) are dequantized by the gguf package's reference dequantizers."""
    Q = gguf.GGMLQuantizationType
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF ne[] is fastest-first
    data = t.data
    if t.tensor_type in (Q.F32, Q.F16, Q.F64):
        return data.reshape(shape)
    if t.tensor_type == Q.BF16:
        out = data.view(np.uint16).view(bfloat16) if data.dtype == np.uint8 else data.view(bfloat16)
        return out.reshape(shape)
    if t.tensor_type not in gguf.GGML_QUANT_SIZES:
        raise CheckpointError(f"{path}: tensor {t.name} has unknown GGML type {int(t.tensor_type)}")
    if len(shape) == 2:
        return GGUFQuantTensor(data, t.tensor_type, shape, t.name, path)
    flat = GGUFQuantTensor(data, t.tensor_type, (1, math.prod(shape)), t.name, path)
    return flat.dequantize().reshape(shape)


def load_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a llama.cpp Gemma 2 GGUF -> (config dict for Gemma2Config.from_dict, {HF name: array}).

    Quantized weights come out as gguf_quant.GGUFQuantTensor (array-like; np.asarray dequantizes)."""
    path = os.fspath(path)
    gguf, reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{path}: GGUF architecture is {arch!r}, not 'gemma2' (only Gemma 2 is supported)")
    size = os.path.getsize(path)
    state: dict[str, np.ndarray] = {}
    rows = None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path}: tensor {t.name} runs past the end of the file (truncated)")
        m = _BLK.match(t.name)
        if m:
            layer, short, kind = m.groups()
            if short not in _LAYER_MAP:
                raise CheckpointError(f"{path}: unexpected tensor {t.name} for a Gemma 2 GGUF")
            hf, is_norm = _LAYER_MAP[short]
            hf_name = f"model.layers.{int(layer)}.{hf}.{kind}"
        else:
            base, _, kind = t.name.rpartition(".")
            if base == "rope_freqs":
                continue  # llama.cpp's optional precomputed RoPE factors; recomputed from rope_theta
            if base not in _GLOBAL_MAP:
                raise CheckpointError(f"{path}: unexpected tensor {t.name} for a Gemma 2 GGUF")
            hf, is_norm = _GLOBAL_MAP[base]
            hf_name = f"{hf}.{kind}"
        try:
            arr = _to_array(gguf, t, path)
        except CheckpointError:
            raise
        except (ValueError, IndexError) as exc:
            raise CheckpointError(f"{path}: cannot read tensor {t.name} ({exc}; truncated file?)") from None
        if is_norm:
            # stored as 1 + w (see module docstring): subtract in float32, exact for values near 1
            arr = np.asarray(arr).astype(np.float32) - np.float32(1.0)
        if hf_name == "model.embed_tokens.weight":
            rows = arr.shape[0]
        state[hf_name] = arr
    if "model.embed_tokens.weight" not in state:
        raise CheckpointError(f"{path}: no token_embd.weight tensor; not a complete Gemma 2 GGUF")
    cfg = _config_from_reader(reader, path, rows)
    # llama.cpp ties the head when no `output` tensor exists; an untied one is loaded as lm_head
    cfg["tie_word_embeddings"] = "lm_head.weight" not in state
    return cfg, state
