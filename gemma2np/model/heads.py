"""The heads on top of Gemma2Model (transformers' Gemma2ForCausalLM / ForSequenceClassification /
ForTokenClassification): one more linear layer each, and their losses.

This layer sits above gemma2np/generation/: Gemma2ForCausalLM.generate is generation.generate
(as transformers' GenerationMixin puts generate on the model), imported here, never the other way.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

from .. import intermediates, ops
from ..config import Gemma2Config
from ..generation import generate, get_generation_config
from ..generation.configuration import GENERATION_CONFIG_NAME
from ..outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast, TokenClassifierOutput
from .decoder import Gemma2Model
from .pretrained import Gemma2PreTrainedModel
from .validation import (InputError, as_array, as_int_array, check_labels, check_num_items, flag, keep_logits,
                         reject_unknown)

__all__ = ["Gemma2ForCausalLM", "Gemma2ForSequenceClassification", "Gemma2ForTokenClassification"]


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
                  attention_mask, position_ids, inputs_embeds, cache_position, position_embeddings=None):
        return self.model.forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=True, cache_position=cache_position, position_embeddings=position_embeddings,
        )


class Gemma2ForCausalLM(_WithBase):
    """Gemma2Model + the language-model head (tied to the embedding by default) + the final logit soft-cap."""

    head_kind = "causal_lm"

    def save_pretrained(self, save_directory, dtype: str | None = None, max_shard_size: int | str | None = None):
        """As Gemma2PreTrainedModel.save_pretrained, plus generation_config.json (the generation defaults this
        model uses: the checkpoint's file, unknown keys kept, or the token ids of config.json), as
        transformers' save_pretrained writes `model.generation_config` beside a generative model."""
        super().save_pretrained(save_directory, dtype=dtype, max_shard_size=max_shard_size)
        gc = get_generation_config(self)
        with open(os.path.join(save_directory, GENERATION_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump({**gc.extra, **gc.to_dict()}, f, indent=2, sort_keys=True)

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
        position_embeddings=None,
        **kwargs,
    ):
        c = self.config
        num_items = check_num_items(kwargs.pop("num_items_in_batch", None))
        reject_unknown(kwargs, ())
        return_dict = flag(return_dict, "return_dict", c.return_dict)
        if labels is not None:
            labels = as_int_array(labels, "labels")
            # checked before the forward pass (fail fast); a missing or bad input is the base model's to report
            name, given = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
            shape = as_array(given, name).shape[:2]
            if given is not None and labels.shape != shape:
                raise InputError(f"labels must have shape {shape} like the input, got {labels.shape}")
        out = self._run_base(output_attentions, output_hidden_states, use_cache, past_key_values,
                             input_ids, attention_mask, position_ids, inputs_embeds, cache_position,
                             position_embeddings)
        h = out.last_hidden_state
        # logits_to_keep: an int keeps the last n positions (0 = all), an array selects positions (keep_logits).
        h = keep_logits(h, logits_to_keep)
        # (B, T', E) -> (B, T', V); tensor-parallel: each rank's vocabulary rows, gathered into the full logits
        logits = self.tp.gather_vocab(self.backend.linear(h, self.lm_head))
        self.model._tap(intermediates.LOGITS_RAW, logits)
        logits = self.backend.softcap(logits, c.final_logit_softcapping)  # 30 * tanh(logits / 30)
        self.model._tap(intermediates.LOGITS, logits)
        loss = None
        if labels is not None:
            if logits.ndim != 3 or logits.shape[:2] != labels.shape:
                raise InputError("labels need logits at every position: do not combine labels with logits_to_keep")
            check_labels(labels, c.vocab_size)
            loss = ops.causal_lm_loss(logits, labels, num_items_in_batch=num_items)
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )
        return result if return_dict else result.to_tuple()

    def generate(self, *args, **kwargs):
        """transformers' generate() (gemma2np/generation/): greedy, sampling, streamers, stopping."""
        return generate(self, *args, **kwargs)


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
        position_embeddings=None,
        **kwargs,
    ):
        c = self.config
        reject_unknown(kwargs, ())
        return_dict = flag(return_dict, "return_dict", c.return_dict)
        out = self._run_base(output_attentions, output_hidden_states, use_cache, past_key_values,
                             input_ids, attention_mask, position_ids, inputs_embeds, cache_position,
                             position_embeddings)
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
            loss = _sequence_classification_loss(pooled, as_array(labels, "labels"), c)
        result = SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )
        return result if return_dict else result.to_tuple()


def _sequence_classification_loss(pooled: np.ndarray, labels: np.ndarray, c: Gemma2Config):
    """transformers' ForSequenceClassificationLoss: the problem type is config.problem_type, else inferred:
    one label -> regression (MSE); integer labels -> single-label (cross-entropy); otherwise multi-label (BCE)."""
    n = c.num_labels
    if labels.dtype == object or not (np.issubdtype(labels.dtype, np.number) or labels.dtype == bool) \
            or np.issubdtype(labels.dtype, np.complexfloating):
        raise InputError(f"labels must be a numeric array, got dtype {labels.dtype}")
    problem = c.problem_type
    if problem is None:
        if n == 1:
            problem = "regression"
        elif labels.dtype in (np.int64, np.int32):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "single_label_classification":
        labels = as_int_array(labels, "labels").reshape(-1)
        if labels.shape[0] != pooled.shape[0]:
            raise InputError(f"single-label labels must hold one class per row ({pooled.shape[0]}), got {labels.size}")
        check_labels(labels, n)
    else:
        want = pooled.shape
        got = labels.shape
        if problem == "regression" and n == 1:
            want, got = np.squeeze(pooled).shape, np.squeeze(labels).shape  # transformers squeezes both
        if got != want:
            raise InputError(f"{problem} labels must have shape {want}, got {labels.shape}")
        labels = labels.astype(pooled.dtype)
        if not np.isfinite(labels).all():
            raise InputError("labels contain NaN or infinite values")
    if c.problem_type is None:
        # transformers writes the inferred type into the config on the first call, so later calls keep it
        # (here only once the labels passed the checks, so a refused call leaves the config alone)
        c.problem_type = problem
    if problem == "regression":
        if n == 1:
            return ops.mse_loss(np.squeeze(pooled), np.squeeze(labels))
        return ops.mse_loss(pooled, labels)
    if problem == "single_label_classification":
        return ops.cross_entropy(pooled.reshape(-1, n), labels)
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
        position_embeddings=None,
        **kwargs,
    ):
        c = self.config
        reject_unknown(kwargs, ())
        return_dict = flag(return_dict, "return_dict", c.return_dict)
        out = self._run_base(output_attentions, output_hidden_states, use_cache, past_key_values,
                             input_ids, attention_mask, position_ids, inputs_embeds, cache_position,
                             position_embeddings)
        logits = self.backend.linear(out.last_hidden_state, self.score)  # (B, T, num_labels)
        loss = None
        if labels is not None:
            labels = as_int_array(labels, "labels")
            if labels.shape != logits.shape[:2]:
                raise InputError(f"labels must have shape {logits.shape[:2]}, got {labels.shape}")
            check_labels(labels, c.num_labels)
            loss = ops.cross_entropy(logits.reshape(-1, c.num_labels), labels.reshape(-1))
        result = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
        )
        return result if return_dict else result.to_tuple()
