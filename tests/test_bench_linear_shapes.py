"""benchmarks/bench_linear_shapes.py (issue 10's per-linear rates): it runs, times every group of a layer the
way the decoder calls it, and counts the bytes a decode step reads (codes + scales for int8)."""
import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("gemma2np._native")

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_linear_shapes.py")
spec = importlib.util.spec_from_file_location("bench_linear_shapes", _PATH)
bls = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bls)

TINY = {"q": (64, 48), "k": (32, 48), "v": (32, 48), "o": (48, 64), "gate": (96, 48), "up": (96, 48), "down": (48, 96)}


def test_layer_shapes_of_the_9b_config():
    s = bls.layer_shapes(bls.load_config("9b"))
    assert s == {"q": (4096, 3584), "k": (2048, 3584), "v": (2048, 3584), "o": (3584, 4096),
                 "gate": (14336, 3584), "up": (14336, 3584), "down": (3584, 14336)}


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_run_times_every_group_at_decode_and_prefill(fmt):
    rows = bls.run("tiny", fmt, 1, 8, 1, 1, bls.time.perf_counter, shapes=TINY, log=lambda *a: None)
    assert [(r["M"], r["group"]) for r in rows] == [(M, g) for M in (1, 8) for g, _ in bls.GROUPS]
    assert all(r["ms"] > 0 and r["GBs"] > 0 and r["GFLOPs"] > 0 for r in rows)
    # GFLOP/s and GB/s of a row describe the same time: flops / bytes of the group's matrices
    for r in rows:
        names = dict(bls.GROUPS)[r["group"]]
        flops = sum(2 * r["M"] * TINY[n][0] * TINY[n][1] for n in names)
        # bf16: 2 bytes a weight; int8: 1, and a float32 scale per (row, block of 32 inputs), a partial block too
        nbytes = sum(N * K * 2 if fmt == "bfloat16" else N * K + N * -(-K // 32) * 4 for N, K in (TINY[n] for n in names))
        assert r["GFLOPs"] / r["GBs"] == pytest.approx(flops / nbytes, rel=1e-9)


def test_copies_are_fresh_buffers_with_the_same_values():
    from gemma2np.kernels.native import NativeBackend

    layer = bls.make_layer(NativeBackend(n_threads=1), TINY, "int8")
    twin = bls.copy_layer(layer)
    for k, h in layer.items():
        assert not np.shares_memory(h.w, twin[k].w) and not np.shares_memory(h.scales, twin[k].scales)
        np.testing.assert_array_equal(h.w, twin[k].w)
        np.testing.assert_array_equal(h.scales, twin[k].scales)
