"""scripts/profile_decode.py (issue #15's decode profile): the accounting it prints, on the bundled model."""
from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "gemma2np", "data", "gemma2-shakespeare")


def _load_script():
    spec = importlib.util.spec_from_file_location("profile_decode", os.path.join(ROOT, "scripts", "profile_decode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _backends():
    out = ["numpy"]
    try:
        from gemma2np import _native  # noqa: F401
        out.append("native")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("backend", _backends())
def test_profile_counts_every_op_of_a_step_and_its_weight_bytes(backend, capsys):
    mod = _load_script()
    steps = 2
    res = mod.main(["--model", MODEL, "--backend", backend, "--weights", "float32", "--depth", "20",
                    "--steps", str(steps), "--threads", "1", "--replay"])
    ops, model = res["ops"], res["model"]
    cfg = model.config
    L = cfg.num_hidden_layers
    calls = lambda prefix: sum(v[0] for k, v in ops.items() if k.startswith(prefix)) // steps  # noqa: E731
    # per decode step: 4 norms per layer + the final one, q/k/v and gate/up fused, o_proj and down_proj,
    # one attention and one rope and geglu per layer, the head's linear + softcap, one argmax
    assert calls("rmsnorm") == 4 * L + 1
    assert calls("linear_many") == 2 * L
    assert calls("linear ") == 2 * L + 1
    assert calls("attention") == calls("rope") == calls("geglu") == L
    assert calls("softcap") == calls("argmax") == calls("embed") == 1
    # a linear's bytes are its weights' (+ x and y): the head reads the whole (vocab, hidden) matrix each step
    head = ops["linear %d->%d" % (cfg.hidden_size, cfg.vocab_size)]
    wbytes = model.lm_head.w.nbytes  # LinearHandle (native) and ReferenceLinear (numpy) both hold it as .w
    assert head[3] // steps == wbytes + 4 * (cfg.hidden_size + cfg.vocab_size)
    # the timed ops and the replayed Python both fit inside the step
    assert sum(v[2] for v in ops.values()) / steps <= res["step_cpu"] * 1.0001
    assert 0 < res["replay_cpu"] < res["step_cpu"]
    text = capsys.readouterr().out
    assert "| **step** |" in text and "model python alone" in text
