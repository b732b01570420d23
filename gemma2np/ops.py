"""The Gemma 2 reference ops: small pure functions over NumPy arrays.

Read this file top to bottom to learn the architecture, then gemma2np/model/decoder.py for how a
layer wires these ops (through a backend: kernels/protocol.py). Every function works in float32 (the
default) or float64 (a ground truth: pass float64 arrays); shapes are in the comments, with
B = batch, T = new tokens, S = keys (cache + new), H = query heads, K = key/value heads,
D = head_dim, E = hidden_size, F = intermediate_size, V = vocab_size.

Where transformers settles a numerics question one way, the comment says how and why: the goal is
to compute the same numbers as `transformers` (eager attention, float32), not merely similar ones.
"""

from __future__ import annotations

import math

import numpy as np

from .rope import apply_rotary_pos_emb, rotate_half  # noqa: F401  (re-exported: part of the reference)

# ----------------------------------------------------------------------------- embedding
# The lookup itself is `embed_weight[input_ids]` (B, T) -> (B, T, E); backends do it with
# checkpoint.gather_rows, which reads the rows of a memory-mapped table without faulting it in.


def embedding_normalizer(hidden_size: int, dtype=np.float32):
    """Gemma multiplies embeddings by sqrt(hidden_size), *rounded to the weights' dtype first*.

    transformers: `self.embed_scale.to(self.weight.dtype)`; in bfloat16 sqrt(3584) = 59.87 becomes 59.75
    (https://github.com/huggingface/transformers/pull/29402). We compute in float32/float64, so the factor
    is rounded to that dtype (exactly 48.0 for gemma-2-2b's hidden size 2304).
    """
    return np.asarray(hidden_size**0.5, dtype=dtype)


def scale_embeddings(x: np.ndarray, hidden_size: int) -> np.ndarray:
    """(B, T, E) -> (B, T, E). Applied to looked-up embeddings only: transformers scales inside its embedding
    module, so user-supplied `inputs_embeds` are used as given, NOT scaled (golden `sharded_inputs_embeds`)."""
    return x * embedding_normalizer(hidden_size, x.dtype)


# ----------------------------------------------------------------------------- normalisation


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Gemma RMSNorm.                      x (..., E), weight (E,) -> (..., E)

    Two Gemma-specific choices (transformers' Gemma2RMSNorm):
    * the scale is (1 + weight): checkpoints store weight centred on 0 (GGUF stores 1 + w instead);
    * the whole computation runs in float32 and is cast back once at the end, `(x * w).to(dtype)`,
      unlike Llama's `x.to(dtype) * w` (https://github.com/huggingface/transformers/pull/29402).
    """
    dtype = np.result_type(x.dtype, np.float32)
    xf = x.astype(dtype, copy=False)
    inv_rms = 1.0 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + dtype.type(eps))
    return ((xf * inv_rms) * (1.0 + weight.astype(dtype, copy=False))).astype(x.dtype, copy=False)


# ----------------------------------------------------------------------------- linear maps and activations


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x W^T + b, the layout of torch.nn.Linear.   x (..., IN), weight (OUT, IN) -> (..., OUT)"""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation ("gelu_pytorch_tanh", Gemma's activation): what the checkpoints were trained with."""
    c = x.dtype.type(math.sqrt(2.0 / math.pi))
    return x.dtype.type(0.5) * x * (1.0 + np.tanh(c * (x + x.dtype.type(0.044715) * x * x * x)))


def _erf(x: np.ndarray) -> np.ndarray:
    # NumPy has no vectorised erf; math.erf per element is exact to double precision.
    return np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype)


def gelu_exact(x: np.ndarray) -> np.ndarray:
    """GELU with the exact erf ("gelu")."""
    return x.dtype.type(0.5) * x * (1.0 + _erf(x / x.dtype.type(math.sqrt(2.0))))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


ACT_FNS = {
    # name in config.hidden_activation -> function; the names and formulas of transformers' ACT2FN.
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu_accurate": gelu_tanh,
    "gelu": gelu_exact,
    "gelu_python": gelu_exact,
    "gelu_10": lambda x: np.clip(gelu_exact(x), -10, 10),
    "quick_gelu": lambda x: x * _sigmoid(x.dtype.type(1.702) * x),
    "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6),
    "relu2": lambda x: np.square(np.maximum(x, 0)),
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "linear": lambda x: x,
    "mish": lambda x: x * np.tanh(np.logaddexp(0, x)),
    "leaky_relu": lambda x: np.where(x >= 0, x, x.dtype.type(0.01) * x),
}


def geglu(gate: np.ndarray, up: np.ndarray, activation: str = "gelu_pytorch_tanh") -> np.ndarray:
    """Gated activation: act(gate) * up.   (..., F), (..., F) -> (..., F)"""
    return ACT_FNS[activation](gate) * up


# ----------------------------------------------------------------------------- soft-capping


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """cap * tanh(x / cap): squashes logits smoothly into (-cap, cap). `None` disables it.

    Written as divide, tanh, multiply -- transformers' order -- so float32 results agree to the last bit.
    """
    if cap is None:
        return x
    c = x.dtype.type(cap)
    return np.tanh(x / c) * c


# ----------------------------------------------------------------------------- attention


def visible_keys(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None) -> np.ndarray:
    """Which keys each query may see.      q_pos (T,), k_pos (S,) -> (T, S) bool

    Causal: key j is visible from query i iff k_pos[j] <= q_pos[i]. Sliding layers also require
    q_pos[i] - window < k_pos[j]: the window holds `window` keys *including the query itself*
    (transformers' `sliding_window_overlay`: `kv_idx > q_idx - sliding_window`). Positions are the
    absolute indices in cache + input (`cache_position`), never the RoPE `position_ids`: padding
    does not shift the window.
    """
    q = q_pos[:, None]
    k = k_pos[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


def attention_bias(
    q_pos: np.ndarray, k_pos: np.ndarray, key_valid: np.ndarray | None, window: int | None, dtype=np.float32
) -> np.ndarray:
    """Additive mask: 0 where visible, finfo(dtype).min elsewhere.   -> (B or 1, 1, T, S)

    transformers adds `finfo.min`, not -inf. A row with no visible key at all (a left-pad query)
    therefore becomes min + score ~= min everywhere, and softmax gives a *uniform* distribution
    over all S keys -- finite garbage at a padded position, never NaN. We reproduce it so whole
    tensors agree with transformers, padded rows included.
    """
    allowed = visible_keys(q_pos, k_pos, window)[None]  # (1, T, S)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :].astype(bool)  # (B, T, S)
    bias = np.where(allowed, dtype(0), np.finfo(dtype).min).astype(dtype)
    return bias[:, None]  # (B|1, 1, T, S)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (subtract the row max)."""
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def repeat_kv(x: np.ndarray, n_rep: int) -> np.ndarray:
    """Grouped-query attention: K key/value heads serve H = K * n_rep query heads.   (B, K, S, D) -> (B, H, S, D)

    KV head g serves query heads g*n_rep ... g*n_rep + n_rep - 1 (torch.repeat_interleave order,
    transformers' `repeat_kv`), not g, g+K, g+2K, ...
    """
    return x if n_rep == 1 else np.repeat(x, n_rep, axis=1)


def attention_probs(
    q: np.ndarray,
    k: np.ndarray,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    key_valid: np.ndarray | None,
    scaling: float,
    softcap_value: float | None,
    window: int | None,
) -> np.ndarray:
    """Attention probabilities.   q (B, H, T, D) after RoPE, k (B, K, S, D) -> (B, H, T, S)

    1. scores = (q . k) * scaling, with scaling = query_pre_attn_scalar ** -0.5 -- NOT head_dim ** -0.5:
       the two differ for gemma-2-27b (144 vs 128) and for any config that sets them apart;
    2. soft-cap the scores: cap * tanh(scores / cap), cap = attn_logit_softcapping (50);
    3. THEN add the mask. Capping after masking would map finfo.min to -cap and leak attention
       onto masked (future / padded / out-of-window) keys;
    4. softmax in float32 (or float64).
    """
    k = repeat_kv(k, q.shape[1] // k.shape[1])  # (B, H, S, D)
    scores = (q @ np.swapaxes(k, -1, -2)) * q.dtype.type(scaling)  # (B, H, T, S)
    scores = softcap(scores, softcap_value)
    scores = scores + attention_bias(q_pos, k_pos, key_valid, window, q.dtype.type)
    return softmax(scores, axis=-1)


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    key_valid: np.ndarray | None,
    scaling: float,
    softcap_value: float | None,
    window: int | None,
    return_probs: bool = False,
):
    """Gemma 2 scaled-dot-product attention (transformers' `eager_attention_forward`).

    q (B, H, T, D) after RoPE; k, v (B, K, S, D), keys after RoPE -> out (B, H, T, D) [, probs (B, H, T, S)]
    out = attention_probs(...) @ v, v repeated over the query heads of its group (repeat_kv).
    """
    probs = attention_probs(q, k, q_pos, k_pos, key_valid, scaling, softcap_value, window)  # (B, H, T, S)
    out = probs @ repeat_kv(v, q.shape[1] // v.shape[1])  # (B, H, T, D)
    return (out, probs) if return_probs else out


# ----------------------------------------------------------------------------- picking tokens


def argmax(x: np.ndarray) -> np.ndarray:
    """Greedy pick.   (..., V) -> (...) int64: the first maximal index (the first NaN, if any), like
    torch.argmax on CPU, so greedy decoding breaks ties as transformers does."""
    return np.argmax(x, axis=-1).astype(np.int64)


def topk(x: np.ndarray, k: int):
    """The k largest.   (..., V) -> values (..., k), indices (..., k) int64, value-descending, ties by the
    smaller index (a stable sort of -x). NaN has no place in an order: ValueError."""
    if np.isnan(x).any():
        raise ValueError("topk input contains NaN")
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k].astype(np.int64)
    return np.take_along_axis(x, idx, axis=-1), idx


# ----------------------------------------------------------------------------- losses


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def cross_entropy(logits: np.ndarray, labels: np.ndarray, ignore_index: int = -100, num_items_in_batch=None):
    """Mean cross-entropy over labels != ignore_index.   logits (N, C), labels (N,) -> scalar

    transformers' `fixed_cross_entropy`: mean over counted items, or sum / num_items_in_batch when given.
    All-ignored batches give NaN (0 / 0), as torch does.
    """
    logits = logits.astype(np.result_type(logits.dtype, np.float32), copy=False)
    keep = labels != ignore_index
    lp = log_softmax(logits[keep], axis=-1)
    nll = -lp[np.arange(lp.shape[0]), labels[keep]]
    total = nll.sum(dtype=logits.dtype)
    if num_items_in_batch is not None:
        return total / logits.dtype.type(num_items_in_batch)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / logits.dtype.type(keep.sum())


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray, ignore_index: int = -100, num_items_in_batch=None):
    """Next-token loss: position t predicts labels[t + 1]; the labels are shifted inside (pad with -100),
    so pass labels = input_ids.   logits (B, T, V), labels (B, T) -> scalar"""
    shifted = np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), ignore_index, labels.dtype)], axis=1)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index, num_items_in_batch)


def mse_loss(pred: np.ndarray, target: np.ndarray):
    return np.mean(np.square(pred - target))


def bce_with_logits(logits: np.ndarray, targets: np.ndarray):
    """Binary cross-entropy on logits, the stable form torch uses: max(x,0) - x*y + log(1 + exp(-|x|))."""
    x = logits
    return np.mean(np.maximum(x, 0) - x * targets + np.log1p(np.exp(-np.abs(x))))
