"""The warnings the golden cases (reference_outputs/) are expected to raise, as `pytest.warns` contexts.

Some goldens run past a tiny max_position_embeddings (8) on purpose: transformers runs on there (RoPE
extrapolates, dynamic / yarn / longrope rescale) and gemma2np does too, with a UserWarning. rope_longrope
has no `factor`, for which gemma2np warns at load as transformers does (warning_once). Each expectation
is decided from the case's config.json and the golden inputs / sequences, never from running gemma2np;
where none is expected the context is a no-op, so any warning there still shows in the summary.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest


def _config(case_dir: Path) -> dict:
    return json.loads((Path(case_dir) / "config.json").read_text())


def load_warnings(case_dir: Path):
    """For from_pretrained(case_dir): longrope without `factor` warns."""
    cfg = _config(case_dir)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "longrope" and rope.get("factor") is None:
        return pytest.warns(UserWarning, match="longrope .*without `factor`")
    return contextlib.nullcontext()


def _past_context(case_dir: Path, last_position: int):
    if last_position + 1 > _config(case_dir).get("max_position_embeddings", 8192):
        return pytest.warns(UserWarning, match="past max_position_embeddings")
    return contextlib.nullcontext()


def call_warnings(case_dir: Path, call: dict, data: dict):
    """For a forward call of case.json (no cache): the last position is position_ids' largest, else T - 1."""
    inputs = call["inputs"]
    if "position_ids" in inputs:
        last = int(np.max(data[inputs["position_ids"]]))
    else:
        last = np.shape(data[inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]])[1] - 1
    return _past_context(case_dir, last)


def generate_warnings(case_dir: Path, sequences: np.ndarray):
    """For generate() giving transformers' `sequences` (B, S): the last token is never fed back, so the
    largest position the model sees is S - 2."""
    return _past_context(case_dir, sequences.shape[1] - 2)
