"""Named intermediate tensors of the Gemma 2 forward pass, and the names other ports give them.

Every tensor the forward pass records (``model.record_intermediates()``) has one *canonical* name;
``forward_order(num_layers)`` lists them in the order they are computed. Other implementations
name the same tensors differently; this module maps their names (*aliases*) to ours:

* Hugging Face transformers' ``output_hidden_states`` / ``output_attentions`` tuples:
  ``hidden_states.{i}`` (0 = ``embeddings``, 1 .. L-1 = ``layers.{i-1}.output``, L = ``final_norm``:
  transformers' last entry is *after* the final norm), ``attentions.{i}`` = ``layers.{i}.attn_probs``,
  and ``logits``;
* llama.cpp's graph-callback names (``llama-eval-callback``, ``ggml_backend_sched_eval_callback``),
  from its Gemma 2 graph (``src/models/gemma2-iswa.cpp`` + ``build_attn_mha`` / ``build_ffn`` in
  ``src/llama-graph.cpp``): ``inp_scaled``, ``attn_norm-{il}``, ``Qcur-{il}``, ``Kcur-{il}``,
  ``Vcur-{il}``, ``kq_soft_max-{il}``, ``attn_post_norm-{il}``, ``sa_out-{il}``, ``ffn_norm-{il}``,
  ``ffn_gate-{il}``, ``ffn_up-{il}``, ``ffn_out-{il}``, ``l_out-{il}``, ``result_norm``,
  ``result_output``. llama.cpp tensors come without a batch axis and in ggml's order, reversed for
  NumPy (a ggml tensor with ne = [E, T] is a (T, E) array); ``lookup`` returns a function that
  brings such an array to our layout (see docs/intermediates.md for every shape).

The full table, with shapes and meanings, is docs/intermediates.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

from .checkpoint import read_safetensors, write_safetensors

__all__ = [
    "PER_LAYER",
    "LayerNames",
    "layer_names",
    "EMBEDDINGS",
    "FINAL_NORM",
    "LOGITS_RAW",
    "LOGITS",
    "GLOBAL_BEFORE",
    "GLOBAL_AFTER",
    "DESCRIPTIONS",
    "ALIASES",
    "IntermediatesError",
    "Alias",
    "forward_order",
    "is_canonical",
    "resolve",
    "lookup",
    "token_axis",
    "run_with_intermediates",
    "save_intermediates",
    "load_tensors",
]


class IntermediatesError(ValueError):
    """An unknown tensor name, a layout that cannot be converted, or an unreadable tensor file."""


# ----------------------------------------------------------------------------- canonical names

# The one definition of the names: the model records under these (gemma2np/model/decoder.py, heads.py).
EMBEDDINGS = "embeddings"
FINAL_NORM = "final_norm"
LOGITS_RAW = "logits_raw"
LOGITS = "logits"
GLOBAL_BEFORE = (EMBEDDINGS,)


@dataclass(frozen=True)
class LayerNames:
    """The names of decoder layer i's intermediates, in computation order: f"layers.{i}.{field}"."""

    input_norm: str
    q: str
    k: str
    v: str
    attn_probs: str
    attn_out: str
    post_attn_norm: str
    attn_residual: str
    pre_ffn_norm: str
    gate: str
    up: str
    ffn_out: str
    post_ffn_norm: str
    output: str


# per decoder layer i, in computation order: the names are f"layers.{i}.{suffix}"
PER_LAYER = tuple(f.name for f in fields(LayerNames))
GLOBAL_AFTER = (FINAL_NORM, LOGITS_RAW, LOGITS)


def layer_names(i: int) -> LayerNames:
    """The full names of layer i's intermediates (built once per layer at load, so recording costs no
    string formatting in the forward pass)."""
    return LayerNames(*(f"layers.{i}.{s}" for s in PER_LAYER))

# name (or per-layer suffix) -> (shape, meaning).  B batch, T tokens of this call, S keys (cache + new),
# E hidden_size, H attention heads, K key/value heads, D head_dim, F intermediate_size, V vocab_size.
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "embeddings": ("(B, T, E)", "token embeddings x sqrt(E) (factor rounded to the compute dtype); "
                                "inputs_embeds are used as given"),
    "input_norm": ("(B, T, E)", "input_layernorm(h): RMSNorm with scale (1 + w), in float32"),
    "q": ("(B, H, T, D)", "query projection after RoPE (not scaled by query_pre_attn_scalar ** -0.5)"),
    "k": ("(B, K, T, D)", "key projection after RoPE (what the KV cache stores)"),
    "v": ("(B, K, T, D)", "value projection"),
    "attn_probs": ("(B, H, T, S)", "attention probabilities after scale, softcap, mask, softmax "
                                   "(transformers' `attentions`)"),
    "attn_out": ("(B, T, E)", "attention output after o_proj, before post_attention_layernorm"),
    "post_attn_norm": ("(B, T, E)", "post_attention_layernorm(attn_out)"),
    "attn_residual": ("(B, T, E)", "h + post_attn_norm: the residual stream between the two blocks"),
    "pre_ffn_norm": ("(B, T, E)", "pre_feedforward_layernorm(attn_residual)"),
    "gate": ("(B, T, F)", "gate_proj(pre_ffn_norm), before the activation"),
    "up": ("(B, T, F)", "up_proj(pre_ffn_norm)"),
    "ffn_out": ("(B, T, E)", "down_proj(act(gate) * up), before post_feedforward_layernorm"),
    "post_ffn_norm": ("(B, T, E)", "post_feedforward_layernorm(ffn_out)"),
    "output": ("(B, T, E)", "attn_residual + post_ffn_norm: the layer's output (next layer's input)"),
    "final_norm": ("(B, T, E)", "the model's final RMSNorm of the last layer's output (last_hidden_state)"),
    "logits_raw": ("(B, T', V)", "lm_head(final_norm) before the final softcap (T' = T unless logits_to_keep)"),
    "logits": ("(B, T', V)", "final_logit_softcapping * tanh(logits_raw / final_logit_softcapping)"),
}

_LAYER_RE = re.compile(r"^layers\.(\d+)\.([a-z_]+)$")


def forward_order(num_layers: int, causal_lm: bool = True) -> list[str]:
    """Every canonical name, in the order the forward pass computes them.

    ``causal_lm=False`` leaves out ``logits_raw`` / ``logits`` (Gemma2Model and the classification heads)."""
    if not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise IntermediatesError(f"num_layers must be a positive integer, got {num_layers!r}")
    names = list(GLOBAL_BEFORE)
    for i in range(int(num_layers)):
        names.extend(f"layers.{i}.{s}" for s in PER_LAYER)
    names.extend(GLOBAL_AFTER if causal_lm else GLOBAL_AFTER[:1])
    return names


def is_canonical(name: str, num_layers: int | None = None) -> bool:
    """True for a canonical name (a layer index is checked against num_layers when given)."""
    if name in GLOBAL_BEFORE or name in GLOBAL_AFTER:
        return True
    m = _LAYER_RE.match(name)
    if not m or m.group(2) not in PER_LAYER:
        return False
    return num_layers is None or int(m.group(1)) < num_layers


def token_axis(canonical: str) -> int:
    """The axis of a canonical tensor that runs over the T tokens of the call (for masking padded positions)."""
    m = _LAYER_RE.match(canonical)
    if m and m.group(2) in ("q", "k", "v", "attn_probs"):
        return 2
    return 1


# ----------------------------------------------------------------------------- aliases

# alias pattern -> canonical pattern, for documentation and for `resolve`. {i} is a layer index, L = num_layers.
ALIASES: dict[str, str] = {
    # Hugging Face transformers (output_hidden_states=True / output_attentions=True)
    "hidden_states.0": "embeddings",
    "hidden_states.{i+1}  (i + 1 < L)": "layers.{i}.output",
    "hidden_states.{L}": "final_norm",
    "attentions.{i}": "layers.{i}.attn_probs",
    "logits": "logits",
    # llama.cpp graph callbacks (src/models/gemma2-iswa.cpp, src/llama-graph.cpp)
    "inp_scaled": "embeddings",
    "attn_norm-{i}": "layers.{i}.input_norm",
    "Qcur-{i}": "layers.{i}.q",
    "Kcur-{i}": "layers.{i}.k",
    "Vcur-{i}": "layers.{i}.v",
    "Qcur_scaled-{i}": "layers.{i}.q   (older llama.cpp: q * query_pre_attn_scalar ** -0.5, divided out)",
    "kq_soft_max-{i}": "layers.{i}.attn_probs",
    "attn_post_norm-{i}": "layers.{i}.post_attn_norm",
    "sa_out-{i}": "layers.{i}.attn_residual",
    "ffn_norm-{i}": "layers.{i}.pre_ffn_norm",
    "ffn_gate-{i}": "layers.{i}.gate",
    "ffn_up-{i}": "layers.{i}.up",
    "ffn_out-{i}": "layers.{i}.ffn_out",
    "ffn_post_norm-{i}": "layers.{i}.post_ffn_norm   (stock llama.cpp names it `ffn_post_norm` in every layer)",
    "l_out-{i}": "layers.{i}.output",
    "result_norm": "final_norm",
    "result_output": "logits",
}

_LLAMA_PER_LAYER = {
    "attn_norm": "input_norm",
    "Qcur": "q",
    "Kcur": "k",
    "Vcur": "v",
    "Qcur_scaled": "q",
    "kq_soft_max": "attn_probs",
    "attn_post_norm": "post_attn_norm",
    "sa_out": "attn_residual",
    "ffn_norm": "pre_ffn_norm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_out": "ffn_out",
    "ffn_post_norm": "post_ffn_norm",
    "l_out": "output",
}
_LLAMA_GLOBAL = {"inp_scaled": "embeddings", "result_norm": "final_norm", "result_output": "logits"}
_LLAMA_RE = re.compile(r"^([A-Za-z_]+)-(\d+)$")
_HF_HIDDEN_RE = re.compile(r"^hidden_states\.(\d+)$")
_HF_ATTN_RE = re.compile(r"^attentions\.(\d+)$")
# names llama.cpp gives tensors we do not record, for a helpful error
_LLAMA_UNMAPPED = {
    "inp_embd": "the unscaled embedding (we record `embeddings` = inp_embd * sqrt(E): use inp_scaled)",
    "kq": "raw q.k scores (not recorded; compare kq_soft_max)",
    "kqv": "per-head attention output before the head merge (not recorded)",
    "kqv_out": "attention output before o_proj (not recorded; compare attn_post_norm / sa_out)",
    "ffn_gelu": "gelu(gate) (not recorded; compare ffn_gate and ffn_up)",
    "ffn_geglu": "gelu(gate) * up (not recorded; compare ffn_gate, ffn_up, ffn_out)",
    "ffn_gate_par": "gelu(gate) * up (not recorded; compare ffn_gate, ffn_up, ffn_out)",
}


@dataclass(frozen=True)
class Alias:
    """How a reference tensor's name maps onto ours.

    canonical: our name; source: "canonical" | "transformers" | "llama.cpp";
    to_canonical(array, config) -> array in our layout (identity unless the source is llama.cpp);
    allow_fewer_tokens: the reference may hold only the LAST T' positions (HF logits_to_keep; llama.cpp
    computes the last layer only for the output tokens), compared against our last T' positions."""

    name: str
    canonical: str
    source: str
    to_canonical: Callable[[np.ndarray, object], np.ndarray]
    allow_fewer_tokens: bool = False


def _identity(a, config):
    return a


def _llama_tokens_major(a, config):
    # (T, N) -> (1, T, N); leading singleton axes of a 4-D ggml dump are dropped first
    a = _squeeze_leading(a, 2)
    if a.ndim != 2:
        raise IntermediatesError(f"expected a 2-D (T, N) llama.cpp tensor, got shape {a.shape}")
    return a[None]


def _llama_heads(kind):
    def convert(a, config):
        heads = config.num_attention_heads if kind == "q" else config.num_key_value_heads
        d = config.head_dim
        a = _squeeze_leading(a, 3)
        if a.ndim == 2 and kind == "v" and a.shape[1] == heads * d:
            a = a.reshape(a.shape[0], heads, d)  # Vcur before the reshape: same values
        if a.ndim == 2:
            raise IntermediatesError(
                f"a 2-D {'Q' if kind == 'q' else 'K'}cur of shape {a.shape} is the projection BEFORE RoPE "
                "(llama.cpp names both the pre- and post-RoPE tensor Qcur/Kcur): dump the second, (T, H, D) one")
        if a.ndim != 3 or a.shape[1:] != (heads, d):
            raise IntermediatesError(f"expected a llama.cpp (T, {heads}, {d}) tensor (ggml ne = [D, H, T]), "
                                     f"got shape {a.shape}")
        return np.ascontiguousarray(a.transpose(1, 0, 2))[None]  # (T, H, D) -> (1, H, T, D)

    return convert


def _llama_q_scaled(a, config):
    q = _llama_heads("q")(a, config)
    return q / np.asarray(float(config.query_pre_attn_scalar) ** -0.5, dtype=q.dtype)


def _llama_probs(a, config):
    # ggml soft_max output ne = [n_kv, n_tokens, n_head(, n_stream)] -> NumPy (H, T, n_kv)
    a = _squeeze_leading(a, 3)
    if a.ndim != 3:
        raise IntermediatesError(f"expected a llama.cpp (H, T, n_kv) kq_soft_max, got shape {a.shape}")
    return a[None]


def _squeeze_leading(a, ndim):
    while a.ndim > ndim and a.shape[0] == 1:
        a = a[0]
    return a


def lookup(name: str, num_layers: int) -> Alias:
    """Map a reference tensor's name (canonical, transformers or llama.cpp) to an `Alias`.

    Raises IntermediatesError for a name we do not know or a layer index >= num_layers."""
    L = int(num_layers)

    def layer(i, suffix):
        if i >= L:
            raise IntermediatesError(f"{name!r}: layer {i} does not exist (the model has {L} layers)")
        return f"layers.{i}.{suffix}"

    if is_canonical(name):
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= L:
            raise IntermediatesError(f"{name!r}: layer {m.group(1)} does not exist (the model has {L} layers)")
        return Alias(name, name, "canonical", _identity, allow_fewer_tokens=name in ("logits", "logits_raw"))
    m = _HF_HIDDEN_RE.match(name)
    if m:
        i = int(m.group(1))
        if i == 0:
            return Alias(name, "embeddings", "transformers", _identity)
        if i < L:
            return Alias(name, layer(i - 1, "output"), "transformers", _identity)
        if i == L:
            return Alias(name, "final_norm", "transformers", _identity)
        raise IntermediatesError(f"{name!r}: transformers has hidden_states.0 .. hidden_states.{L} for {L} layers")
    m = _HF_ATTN_RE.match(name)
    if m:
        return Alias(name, layer(int(m.group(1)), "attn_probs"), "transformers", _identity)
    if name in _LLAMA_GLOBAL:
        return Alias(name, _LLAMA_GLOBAL[name], "llama.cpp", _llama_tokens_major, allow_fewer_tokens=True)
    m = _LLAMA_RE.match(name)
    if m and m.group(1) in _LLAMA_PER_LAYER:
        base, i = m.group(1), int(m.group(2))
        canonical = layer(i, _LLAMA_PER_LAYER[base])
        if base in ("Qcur", "Kcur", "Vcur"):
            conv = _llama_heads(base[0].lower())
        elif base == "Qcur_scaled":
            conv = _llama_q_scaled
        elif base == "kq_soft_max":
            conv = _llama_probs
        else:
            conv = _llama_tokens_major
        return Alias(name, canonical, "llama.cpp", conv, allow_fewer_tokens=True)
    base = m.group(1) if m else name
    if base in _LLAMA_PER_LAYER:  # a per-layer llama.cpp name without its layer suffix
        hint = (" (stock llama.cpp calls it with il = -1, so every layer's tensor has this same name: "
                "number them ffn_post_norm-{il} in your dump)") if base == "ffn_post_norm" else ""
        raise IntermediatesError(f"{name!r} needs a layer index, e.g. {base}-0{hint}")
    if base in _LLAMA_UNMAPPED:
        raise IntermediatesError(f"{name!r} is llama.cpp's {_LLAMA_UNMAPPED[base]}")
    raise IntermediatesError(f"unknown tensor name {name!r} (see docs/intermediates.md for the names we know)")


def resolve(name: str, num_layers: int | None = None) -> str:
    """The canonical name of `name` (canonical, transformers or llama.cpp).

    num_layers is needed to place transformers' ``hidden_states.{i}`` (its last entry is ``final_norm``);
    without it ``hidden_states.{i}`` for i >= 1 raises."""
    if num_layers is None:
        if is_canonical(name):
            return name
        if _HF_HIDDEN_RE.match(name) and name != "hidden_states.0":
            raise IntermediatesError(f"resolving {name!r} needs num_layers (the last hidden state is final_norm)")
        return lookup(name, 10**9).canonical
    return lookup(name, num_layers).canonical


# ----------------------------------------------------------------------------- running and files


def run_with_intermediates(model, input_ids, attention_mask=None, position_ids=None,
                           names: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """Run one forward pass (no cache) and return {canonical name: array} of every recorded intermediate.

    `model` is any gemma2np model class; Gemma2ForCausalLM adds ``logits_raw`` and ``logits``.
    `names` optionally filters what is kept (a predicate on canonical names)."""
    with model.record_intermediates(names) as rec:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return dict(rec)


def save_intermediates(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Write {name: array} as .npz or .safetensors (chosen by the file extension).

    .npz has no bfloat16: bfloat16 arrays are stored there as float32 (exactly; safetensors keeps BF16)."""
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    if path.endswith(".npz"):
        np.savez(path, **{k: (v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v) for k, v in arrays.items()})
    elif path.endswith(".safetensors"):
        write_safetensors(path, arrays)
    else:
        raise IntermediatesError(f"{path}: use a .npz or .safetensors file name")


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read {name: array} from a .npz or .safetensors file (by extension; other names: both are tried)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise IntermediatesError(f"{path}: no such file")

    def read_npz():
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise IntermediatesError(f"{path}: a single .npy array, not an .npz archive of named tensors")
            return {k: z[k] for k in z.files}

    def read_st():
        tensors, _ = read_safetensors(path, mmap=False)
        return {k: np.array(v) for k, v in tensors.items()}

    readers = [read_npz] if path.endswith(".npz") else [read_st] if path.endswith(".safetensors") else [read_npz, read_st]
    errors = []
    for read in readers:
        try:
            return read()
        except IntermediatesError:
            raise
        except Exception as exc:  # a zip / header error: report it with the file name
            errors.append(f"{type(exc).__name__}: {exc}")
    raise IntermediatesError(f"{path}: cannot read as .npz or .safetensors ({'; '.join(errors)})")
