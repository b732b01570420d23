"""gemma2np forward passes vs. the PyTorch goldens in reference_outputs/ (made by reference_outputs/make_goldens.py
with torch 2.13.0 + transformers 5.23.0, float32, eager attention).

Every case directory is loaded exactly as a user would load a checkpoint:

    cls = getattr(gemma2np, case["class"]); model = cls.from_pretrained(case_dir, backend=backend)

and each recorded call is replayed with the recorded inputs; every recorded output tensor (logits, loss,
last_hidden_state, hidden_states[i], attentions[i]) must agree within case["tolerance"] (1e-4) in max |diff|.
The max diff of every tensor is printed (pytest -s, or shown on failure).

Runs without torch.  Regenerate the goldens with `python reference_outputs/make_goldens.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gemma2np

REF = Path(__file__).resolve().parent.parent / "reference_outputs"
CASE_DIRS = sorted(p.parent for p in REF.glob("*/case.json"))

# backends the model can run on: the pure-NumPy reference always, the C/Cython one when it is built
from conftest import BACKENDS  # noqa: E402  (numpy, plus native when the extension is built)
from golden_warnings import call_warnings, load_warnings  # noqa: E402  (the warnings a case must give)


def load_case(case_dir: Path):
    case = json.loads((case_dir / "case.json").read_text())
    with np.load(case_dir / "golden.npz") as z:
        data = {k: z[k] for k in z.files}
    return case, data


def load_model(case_dir: Path, case: dict, backend: str):
    cls = getattr(gemma2np, case["class"])
    # a fresh model for every call: the goldens were made on fresh models (transformers keeps state across
    # calls for dynamic RoPE and the sequence-classification problem_type)
    # native runs with float32 weights here (bound 1e-4, like NumPy); bf16/int8 are measured against
    # float32 in tests/test_native_formats.py
    extra = {"weights": "float32"} if backend == "native" else {}
    with load_warnings(case_dir):
        return cls.from_pretrained(case_dir, backend=backend, **extra)


def call_args(call: dict, data: dict) -> dict:
    args = {name: data[key] for name, key in call["inputs"].items()}
    args.update(call["kwargs"])  # JSON scalars, e.g. logits_to_keep=3
    return args


def compare(name: str, got, want: np.ndarray, tol: float) -> float:
    """Exact shape, finite, max |diff| <= tol.  Returns the max diff (printed by the caller)."""
    got = np.asarray(got)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != golden {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    d = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
    print(f"  {name:28s} shape {str(want.shape):18s} max|diff| {d:.3e}")
    return d


def compare_outputs(get, call: dict, data: dict, tol: float, label: str):
    """get(field) -> the model's value for a ModelOutput field name."""
    worst = {}
    for field, keys in call["outputs"].items():
        value = get(field)
        assert value is not None, f"{label}: output {field!r} is None but transformers returned it"
        if isinstance(keys, list):
            assert len(value) == len(keys), f"{label}: len({field}) {len(value)} != golden {len(keys)}"
            for i, key in enumerate(keys):
                worst[f"{field}[{i}]"] = compare(f"{field}[{i}]", value[i], data[key], tol)
        else:
            worst[field] = compare(field, value, data[keys], tol)
    bad = {k: v for k, v in worst.items() if not v <= tol}
    assert not bad, f"{label}: max|diff| above {tol}: {bad}"


def _call_params():
    params = []
    for case_dir in CASE_DIRS:
        case = json.loads((case_dir / "case.json").read_text())
        for call in case["calls"]:
            for backend in BACKENDS:
                params.append(pytest.param(case_dir, call["name"], backend,
                                           id=f"{case_dir.name}-{call['name']}-{backend}"))
    return params


CALL_PARAMS = _call_params()


def _find_call(case, name):
    return next(c for c in case["calls"] if c["name"] == name)


def test_goldens_present():
    """The goldens exist and cover every model class of the API."""
    assert len(CASE_DIRS) >= 15, CASE_DIRS
    classes = {json.loads((d / "case.json").read_text())["class"] for d in CASE_DIRS}
    assert classes == {"Gemma2Model", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification",
                       "Gemma2ForTokenClassification"}, classes


@pytest.mark.parametrize("case_dir", CASE_DIRS, ids=[d.name for d in CASE_DIRS])
def test_case_files_complete(case_dir):
    """Every npz key a case refers to exists, and the checkpoint files are there (torch-free sanity check)."""
    case, data = load_case(case_dir)
    assert (case_dir / "config.json").is_file()
    assert (case_dir / "model.safetensors").is_file() or (case_dir / "model.safetensors.index.json").is_file()
    for call in case["calls"]:
        for key in call["inputs"].values():
            assert key in data, key
        for keys in call["outputs"].values():
            for key in keys if isinstance(keys, list) else [keys]:
                assert key in data, key
    for gen in case["generate"]:
        assert gen["sequences"] in data and all(k in data for k in gen["inputs"].values())


@pytest.mark.parametrize("case_dir,call_name,backend", CALL_PARAMS)
def test_forward_matches_golden(case_dir, call_name, backend):
    case, data = load_case(case_dir)
    call = _find_call(case, call_name)
    model = load_model(case_dir, case, backend)
    print(f"\n{case_dir.name} {call_name} [{backend}] {call.get('note', '')}")
    with call_warnings(case_dir, call, data):
        out = model(**call_args(call, data), output_hidden_states=call["output_hidden_states"],
                    output_attentions=call["output_attentions"])
    compare_outputs(lambda f: getattr(out, f), call, data, case["tolerance"], f"{case_dir.name}/{call_name}")


@pytest.mark.parametrize("case_dir,call_name,backend", CALL_PARAMS)
def test_output_indexing(case_dir, call_name, backend):
    """out["logits"] / out[0] like transformers' ModelOutput: string keys and the position among non-None fields."""
    case, data = load_case(case_dir)
    call = _find_call(case, call_name)
    model = load_model(case_dir, case, backend)
    with call_warnings(case_dir, call, data):
        out = model(**call_args(call, data), output_hidden_states=call["output_hidden_states"],
                    output_attentions=call["output_attentions"])
    tol = case["tolerance"]
    main = "logits" if "logits" in call["outputs"] else "last_hidden_state"
    assert compare(f'out["{main}"]', out[main], data[call["outputs"][main]], tol) <= tol
    first = call["return_tuple_fields"][0]  # "loss" when labels were given, else "logits" / "last_hidden_state"
    want = call["outputs"][first]
    assert not isinstance(want, list)
    assert compare(f"out[0] ({first})", out[0], data[want], tol) <= tol


@pytest.mark.parametrize("case_dir,call_name,backend", CALL_PARAMS)
def test_return_dict_false(case_dir, call_name, backend):
    """return_dict=False gives a tuple of the non-None fields in ModelOutput order (transformers' to_tuple);
    past_key_values sits at its position but is not compared."""
    case, data = load_case(case_dir)
    call = _find_call(case, call_name)
    model = load_model(case_dir, case, backend)
    with call_warnings(case_dir, call, data):
        t = model(**call_args(call, data), output_hidden_states=call["output_hidden_states"],
                  output_attentions=call["output_attentions"], return_dict=False)
    assert isinstance(t, tuple), type(t)
    fields = call["return_tuple_fields"]
    assert len(t) == len(fields), f"tuple of {len(t)} items, transformers gives {len(fields)}: {fields}"
    by_field = dict(zip(fields, t))
    compare_outputs(lambda f: by_field[f], call, data, case["tolerance"], f"{case_dir.name}/{call_name} tuple")
