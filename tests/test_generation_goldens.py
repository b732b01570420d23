"""gemma2np greedy generation vs. transformers 5.23 `generate` (goldens in reference_outputs/, made by
reference_outputs/make_goldens.py).  Replays exactly

    model.generate(input_ids=..., attention_mask=..., max_new_tokens=N, min_new_tokens=N, do_sample=False)

(or without min_new_tokens where the case says so: rows that hit an eos id stop and are padded with
pad_token_id) and requires token-for-token equality with transformers' `sequences` (prompt included).
Runs without torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gemma2np

REF = Path(__file__).resolve().parent.parent / "reference_outputs"

from conftest import BACKENDS  # noqa: E402  (numpy, plus native when the extension is built)
from golden_warnings import generate_warnings, load_warnings  # noqa: E402  (the warnings a case must give)


def _gen_params():
    params = []
    for case_json in sorted(REF.glob("*/case.json")):
        case = json.loads(case_json.read_text())
        for gen in case["generate"]:
            for backend in BACKENDS:
                params.append(pytest.param(case_json.parent, gen["name"], backend,
                                           id=f"{case_json.parent.name}-{gen['name']}-{backend}"))
    return params


GEN_PARAMS = _gen_params()


def test_generation_goldens_present():
    # at least: window < prompt + new tokens with left padding, untied/MHA, old config, eos list, dynamic/longrope
    assert len({p.values[0] for p in GEN_PARAMS}) >= 4, GEN_PARAMS


@pytest.mark.parametrize("case_dir,gen_name,backend", GEN_PARAMS)
def test_greedy_generate_matches_transformers(case_dir, gen_name, backend):
    case = json.loads((case_dir / "case.json").read_text())
    gen = next(g for g in case["generate"] if g["name"] == gen_name)
    with np.load(case_dir / "golden.npz") as z:
        input_ids = z[gen["inputs"]["input_ids"]]
        attention_mask = z[gen["inputs"]["attention_mask"]]
        want = z[gen["sequences"]]
    extra = {"weights": "float32"} if backend == "native" else {}  # greedy tokens must match exactly
    with load_warnings(case_dir):
        model = getattr(gemma2np, case["class"]).from_pretrained(case_dir, backend=backend, **extra)
    with generate_warnings(case_dir, want):
        got = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen["kwargs"])
    got = np.asarray(getattr(got, "sequences", got))  # a plain array, or an output with .sequences
    print(f"\n{case_dir.name} {gen_name} [{backend}] {gen['kwargs']} {gen.get('note', '')}")
    print("  want", want.tolist())
    print("  got ", got.tolist())
    assert got.shape == want.shape, f"sequences shape {got.shape} != transformers {want.shape}"
    if not np.array_equal(got, want):
        b, t = np.argwhere(got != want)[0]
        pytest.fail(f"first mismatch at row {b}, position {t} (new token {t - input_ids.shape[1]}): "
                    f"got {got[b, t]}, transformers {want[b, t]}")
