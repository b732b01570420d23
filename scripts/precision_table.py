"""How far float32, bfloat16-weight and int8-weight runs sit from a float64 ground truth, on the goldens.

    python scripts/precision_table.py            # Markdown table on stdout (docs/precision.md quotes it)
    python scripts/precision_table.py --per-case # one table row per (case, run)

For every Gemma2ForCausalLM golden case in reference_outputs/ and every recorded call that passes
input_ids (calls with inputs_embeds or logits_to_keep are skipped), gemma2np runs the call in float64
(the reference, NumPy backend, dtype="float64") and in each of the configurations below; the logits
are compared with the float64 ones at the real (unpadded) positions:

  transformers fp32   the golden logits themselves (transformers 5.23, eager, float32)
  numpy fp32          gemma2np, NumPy reference backend, float32
  native fp32         gemma2np, native C kernels, float32 weights
  native bf16         native kernels, weights rounded to bfloat16 (activations float32)
  native int8         native kernels, weights int8, symmetric absmax scale per row and block of 32 inputs

When the native extension cannot be imported, the bf16 / int8 rows run on the NumPy twins of the
kernels (gemma2np.kernels.TwinBackend: the same weight formats, computed in NumPy) and are labelled
"emulated".

Columns: max and mean |logits - logits_float64| over real positions and vocabulary, and top-1
agreement: the fraction of real positions whose argmax equals float64's.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gemma2np  # noqa: E402
from gemma2np.kernels import native_available  # noqa: E402

REF = ROOT / "reference_outputs"
INPUTS = ("input_ids", "attention_mask", "position_ids")


def _load(case_dir, run):
    kind, weights = run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "numpy":
            return gemma2np.Gemma2ForCausalLM.from_pretrained(case_dir, dtype=weights)
        if kind == "native":
            return gemma2np.Gemma2ForCausalLM.from_pretrained(case_dir, backend="native", weights=weights)
        # emulation: the NumPy twins of the kernels
        return gemma2np.Gemma2ForCausalLM.from_pretrained(case_dir, backend="twins", weights=weights)


def _calls():
    for case_json in sorted(REF.glob("*/case.json")):
        case = json.loads(case_json.read_text())
        if case["class"] != "Gemma2ForCausalLM":
            continue
        with np.load(case_json.parent / "golden.npz") as z:
            data = {k: z[k] for k in z.files}
        for call in case["calls"]:
            if "input_ids" not in call["inputs"] or "logits_to_keep" in call["inputs"] or call["kwargs"]:
                continue
            if "logits" not in call["outputs"]:
                continue
            args = {k: data[v] for k, v in call["inputs"].items() if k in INPUTS}
            yield case_json.parent, call["name"], args, data[call["outputs"]["logits"]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-case", action="store_true", help="one row per (case, call, run)")
    p.add_argument("--emulate", action="store_true",
                   help="run bf16 / int8 on the kernels' NumPy twins even when the native extension is available")
    args = p.parse_args(argv)

    native = native_available() and not args.emulate
    runs = [("transformers fp32", None), ("numpy fp32", ("numpy", "float32"))]
    if native:
        runs.append(("native fp32", ("native", "float32")))
    if native:
        runs += [("native bf16", ("native", "bfloat16")), ("native int8 (block 32)", ("native", "int8"))]
    else:
        runs += [("bf16 (emulated: NumPy twins)", ("twins", "bfloat16")),
                 ("int8 block 32 (emulated: NumPy twins)", ("twins", "int8"))]

    stats = {label: {"max": 0.0, "sum": 0.0, "n": 0, "top1": 0, "pos": 0} for label, _ in runs}
    rows = []
    cases = set()
    for case_dir, call, inputs, golden_logits in _calls():
        cases.add(case_dir.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            truth = _load(case_dir, ("numpy", "float64"))(**inputs).logits
        mask = inputs.get("attention_mask")
        real = np.ones(truth.shape[:2], bool) if mask is None else mask.astype(bool)
        t = truth[real]  # (N, V)
        for label, run in runs:
            if run is None:
                got = golden_logits
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = _load(case_dir, run)(**inputs).logits
            g = np.asarray(got, np.float64)[real]
            err = np.abs(g - t)
            top1 = int(np.sum(g.argmax(-1) == t.argmax(-1)))
            s = stats[label]
            s["max"] = max(s["max"], float(err.max()))
            s["sum"] += float(err.sum())
            s["n"] += err.size
            s["top1"] += top1
            s["pos"] += t.shape[0]
            rows.append((f"{case_dir.name}/{call}", label, float(err.max()), float(err.mean()), top1 / t.shape[0]))

    print(f"{len(cases)} golden cases, {len(rows) // len(runs)} calls, "
          f"{stats[runs[0][0]]['pos']} real positions; error of the logits against gemma2np float64"
          + ("" if native else " (bf16/int8 rows emulated on the kernels' NumPy twins)"))
    print()
    if args.per_case:
        print("| case/call | run | max abs | mean abs | top-1 |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]:.2e} | {r[3]:.2e} | {r[4]:.3f} |")
    else:
        print("| run | max abs logits error | mean abs logits error | top-1 agreement |")
        print("|---|---|---|---|")
        for label, _ in runs:
            s = stats[label]
            print(f"| {label} | {s['max']:.2e} | {s['sum'] / s['n']:.2e} | "
                  f"{s['top1'] / s['pos']:.4f} ({s['top1']}/{s['pos']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
