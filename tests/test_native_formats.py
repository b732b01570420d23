"""How far the native backend's bfloat16 and int8 weights move the logits from float32, on the goldens.

The golden models are tiny random networks built so that every feature bites (softcaps saturate,
norm weights random with std 0.5, init std up to 0.3), which makes them far more sensitive to weight
rounding than a trained checkpoint: a relative weight error e moves each pre-softcap logit by about
e * |logit| * sqrt(depth), and these logits reach 6-12 before the final cap of 3-10.
bf16 keeps 8 mantissa bits (relative error <= 2^-9 = 0.2%); int8 with an absmax scale per block of
32 weights has a step of absmax/127 (error <= 0.4% of the block's largest weight). The bounds below
are ~3x the worst figures measured on these cases (docs/precision.md) -- tight enough that a wrong
scale, a transposed block or a dropped bias (errors of order 1) fails.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import gemma2np
from gemma2np.kernels import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="native extension not built")

ROOT = Path(__file__).resolve().parents[1] / "reference_outputs"
CASES = sorted(p.parent for p in ROOT.glob("*/case.json")
               if json.loads(p.read_text())["class"] == "Gemma2ForCausalLM")

# weights -> (max |diff| of logits, mean |diff|, minimum top-1 agreement)
BOUNDS = {"bfloat16": (0.5, 0.03, 0.95), "int8": (2.5, 0.1, 0.9)}


# every causal-LM golden, including those that run past their tiny max_position_embeddings or load longrope
# without `factor` on purpose (their warnings are asserted in test_goldens.py; here they are beside the point)
@pytest.mark.filterwarnings("ignore:position .* past max_position_embeddings:UserWarning")
@pytest.mark.filterwarnings("ignore:longrope .*without `factor`:UserWarning")
@pytest.mark.parametrize("weights", sorted(BOUNDS))
def test_distance_from_float32(weights):
    max_abs, mean_abs, agree, n = 0.0, [], [], 0
    for case_dir in CASES:
        case = json.loads((case_dir / "case.json").read_text())
        data = np.load(case_dir / "golden.npz")
        call = case["calls"][0]
        ids = data[call["inputs"]["input_ids"]] if "input_ids" in call["inputs"] else None
        if ids is None:
            continue
        mask = data[call["inputs"]["attention_mask"]] if "attention_mask" in call["inputs"] else np.ones_like(ids)
        ref = gemma2np.Gemma2ForCausalLM.from_pretrained(case_dir)(input_ids=ids, attention_mask=mask).logits
        got = gemma2np.Gemma2ForCausalLM.from_pretrained(case_dir, backend="native", weights=weights)(
            input_ids=ids, attention_mask=mask).logits
        real = mask.astype(bool)
        d = np.abs(got - ref)[real]
        max_abs = max(max_abs, float(d.max()))
        mean_abs.append(float(d.mean()))
        agree.append(float((got.argmax(-1) == ref.argmax(-1))[real].mean()))
        n += 1
    mean = float(np.mean(mean_abs))
    top1 = float(np.mean(agree))
    print(f"\nnative {weights} vs float32 over {n} golden cases: max|diff| {max_abs:.3e}, "
          f"mean|diff| {mean:.3e}, top-1 agreement {top1:.1%}")
    bmax, bmean, btop = BOUNDS[weights]
    assert n >= 8
    assert max_abs <= bmax and mean <= bmean and top1 >= btop
    assert max_abs > 0  # the format really is lossy: a silent fall-back to float32 would show 0
