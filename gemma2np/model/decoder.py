"""Gemma2Model: the decoder stack. Read it beside gemma2np/ops.py (the math of each op).

    h = embed(input_ids) * sqrt(E)                                     (B, T, E)
    for each layer (transformers' Gemma2DecoderLayer, four norms):
        h = h + post_attention_layernorm(self_attn(input_layernorm(h)))
        h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
    return norm(h)                                                     (B, T, E)

Every op runs through `self.backend` (kernels/protocol.py: the reference ops, the twins or the C
kernels, chosen at load), called the same way on all of them. `tap(name, x)` records a named
intermediate (gemma2np/intermediates.py) inside `record_intermediates()` and does nothing otherwise.
Shapes: B batch, T new tokens, S keys (cache + new), E hidden, H query heads, K kv heads, D head_dim,
F intermediate size.
"""

from __future__ import annotations

import numpy as np

from .. import intermediates, ops
from ..outputs import BaseModelOutputWithPast
from .pretrained import Gemma2PreTrainedModel, no_tap
from .validation import check_cache_fits, check_inputs, check_position_embeddings, flag, reject_unknown, resolve_cache

__all__ = ["Gemma2Model", "layer_visibility"]


class Gemma2Model(Gemma2PreTrainedModel):
    """The decoder stack: embeddings, num_hidden_layers decoder layers, final norm -> hidden states."""

    head_kind = "base"

    def _base(self):
        return self

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
        position_embeddings=None,
        **kwargs,
    ):
        c, be, tap = self.config, self.backend, self._tap
        reject_unknown(kwargs, ())
        output_attentions = flag(output_attentions, "output_attentions", c.output_attentions)
        output_hidden_states = flag(output_hidden_states, "output_hidden_states", c.output_hidden_states)
        use_cache = flag(use_cache, "use_cache", c.use_cache)
        return_dict = flag(return_dict, "return_dict", c.return_dict)
        cache, legacy = resolve_cache(past_key_values, use_cache, c, self.cache_dtype)  # (cache_dtype: cache.py)
        past_len = cache.get_seq_length() if cache is not None else 0
        input_ids, inputs_embeds, mask, position_ids, cache_position, batch, seq = check_inputs(
            c, input_ids, inputs_embeds, attention_mask, position_ids, cache_position, past_len
        )
        check_cache_fits(cache, batch, c, self.tp.n_kv_heads)  # tensor-parallel: the cache holds the rank's heads

        # 1. embeddings (B, T) ids -> (B, T, E), scaled by sqrt(E) only when we look them up: transformers'
        #    Gemma2Model does not scale user-supplied inputs_embeds (the scale lives in its embedding module).
        if inputs_embeds is None:
            h = ops.scale_embeddings(be.embed(self.embed_tokens, input_ids), c.hidden_size)
        else:
            h = inputs_embeds.astype(self.dtype)
        tap(intermediates.EMBEDDINGS, h)

        # 2. RoPE tables for these positions, shared by every layer: cos, sin (1|B, T, D). The seed's
        #    position_embeddings replace them (transformers 5.23 documents it but its outer forward raises a
        #    TypeError; we do what its layers do with it: rotate q and k by the given tables, nothing else).
        if position_embeddings is None:
            cos, sin = self.rotary_emb(position_ids)
        else:
            cos, sin = check_position_embeddings(position_embeddings, batch, seq, c.head_dim, self.dtype)

        # 3. the decoder layers; hidden_states collects transformers' tuple, attentions each layer's probs
        all_hidden = [h] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            h, probs = self._decoder_layer(i, layer, h, cos, sin, cache_position, mask, cache, output_attentions)
            if output_hidden_states and i < len(self.layers) - 1:
                all_hidden.append(h)
            if output_attentions:
                all_attn.append(probs)

        # 4. the final norm (B, T, E)
        h = be.rmsnorm(h, self.norm, c.rms_norm_eps)
        tap(intermediates.FINAL_NORM, h)
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
        """One Gemma2DecoderLayer: h (B, T, E) -> (h (B, T, E), attention probs (B, H, T, S) or None)."""
        c, be, tap, n = self.config, self.backend, self._tap, w.names
        B, T, _ = h.shape
        H, K, D = self.tp.n_heads, self.tp.n_kv_heads, c.head_dim  # this rank's heads (all of them unsplit)
        # output_attentions or recording: the backend also returns the probabilities (its kernel still
        # computes the output, so the numbers do not depend on what is asked for)
        want_probs = bool(output_attentions) or tap is not no_tap

        # --- attention block ---------------------------------------------------------------
        residual = h
        x = be.rmsnorm(h, w.input_layernorm, c.rms_norm_eps)                      # (B, T, E)
        tap(n.input_norm, x)
        q, k, v = be.linear_many(x, (w.q_proj, w.k_proj, w.v_proj))             # (B, T, H*D), (B, T, K*D) x 2
        q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)                           # (B, H, T, D)
        k = k.reshape(B, T, K, D).transpose(0, 2, 1, 3)                           # (B, K, T, D)
        v = v.reshape(B, T, K, D).transpose(0, 2, 1, 3)                           # (B, K, T, D)
        q, k = be.rope(q, k, cos, sin)  # RoPE on the two halves of each head; keys are cached *after* it
        tap(n.q, q)
        tap(n.k, k)
        tap(n.v, v)
        if cache is not None:
            k, v, k_pos = cache.update(k, v, cache_position, i)                   # (B, K, S, D), k_pos (S,)
        else:
            k_pos = cache_position
        key_valid, window = layer_visibility(c, i, B, T, k_pos, cache_position, mask)
        # scaling = query_pre_attn_scalar ** -0.5 (transformers: `config.query_pre_attn_scalar**-0.5`)
        scaling = float(c.query_pre_attn_scalar) ** -0.5
        attn = be.attention(q, k, v, cache_position, k_pos, key_valid, scaling, c.attn_logit_softcapping, window,
                            return_probs=want_probs)                              # (B, H, T, D) [, (B, H, T, S)]
        attn, probs = attn if want_probs else (attn, None)
        tap(n.attn_probs, probs)
        attn = attn.transpose(0, 2, 1, 3).reshape(B, T, H * D)                    # (B, T, H*D)
        attn = self.tp.allreduce(be.linear(attn, w.o_proj))                       # (B, T, E)  (tensor-parallel:
                                                                                  # the sum of the ranks' partials)
        tap(n.attn_out, attn)
        attn = be.rmsnorm(attn, w.post_attention_layernorm, c.rms_norm_eps)
        tap(n.post_attn_norm, attn)
        h = residual + attn
        tap(n.attn_residual, h)

        # --- feed-forward block (GeGLU) --------------------------------------------------------
        residual = h
        x = be.rmsnorm(h, w.pre_feedforward_layernorm, c.rms_norm_eps)            # (B, T, E)
        tap(n.pre_ffn_norm, x)
        gate, up = be.linear_many(x, (w.gate_proj, w.up_proj))                   # (B, T, F) x 2
        tap(n.gate, gate)
        tap(n.up, up)
        y = self.tp.allreduce(be.linear(be.geglu(gate, up, c.hidden_activation), w.down_proj))  # (B, T, E)
        tap(n.ffn_out, y)
        y = be.rmsnorm(y, w.post_feedforward_layernorm, c.rms_norm_eps)
        tap(n.post_ffn_norm, y)
        h = residual + y
        tap(n.output, h)
        return h, (self.tp.gather_heads(probs) if output_attentions else None)


def layer_visibility(c, i: int, B: int, T: int, k_pos: np.ndarray, q_pos: np.ndarray, mask: np.ndarray | None):
    """What the queries of layer i may see, as the backend's attention takes it: (key_valid, window).

    key_valid (B, S) bool or None: padding, from attention_mask at the keys' absolute positions.
    window: sliding_window on sliding layers, else None (ops.visible_keys has the causal/window rule).
    """
    key_valid = None if mask is None else mask[:, k_pos]
    window = c.sliding_window if c.layer_types[i] == "sliding_attention" else None
    if window == 1 and T == 1 and k_pos.shape[0] > 1:
        # transformers 5.23 with sliding_window = 1, one new token after cached ones: its cache kept every
        # key (cache.py) while its mask covers W - 1 + 1 = 1 key; eager attention *broadcasts* that
        # (B, 1, 1, 1) mask over all keys, so the token attends to every cached key, padding included,
        # exactly when it may see itself. Its forward pass over the whole sequence does not do this; we
        # follow its generate() here so greedy tokens match (tests/test_against_transformers.py).
        self_visible = np.ones((B, 1), bool) if mask is None else mask[:, q_pos]
        key_valid = np.repeat(self_visible, k_pos.shape[0], axis=1)
        window = None
    return key_valid, window
