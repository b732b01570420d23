"""The prefill drivers' M chunks (csrc/g2_linear_drive.c): x is cut into chunks of rows that stay in
cache while every W block runs over them. The chunks must not change a single bit: every output is
still computed by exactly one tile call with the same inputs.

The chunk size is read once per process from G2_XCHUNK_KB (KB of x as the tiles read it; W formats
converted per chunk get G2_XCHUNK_WIDEN times that), so the chunked runs happen in a subprocess with
tiny chunks (1 and 8 KB: one 32-row panel, and 2-4 panels for small K) and are compared bitwise with
this process's default (3 MB: one chunk for these shapes), for every weight format, on the AVX-512
paths with and without avx512_bf16, threads 1..3, M across the chunk edges, K odd / small /
multiples of 1024 (the padded W copy), several parts per call; and the default run against the
NumPy twins to float32 summation rounding, as tests/test_kernels.py does.
"""
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma2np.kernels import int4, q4_0
from gemma2np.kernels import twins as ref

nat = pytest.importorskip("gemma2np._native")
if "avx512f" not in nat.cpu_features():  # pragma: no cover - the chunks are the AVX-512 drivers'
    pytest.skip("no AVX-512: the chunked prefill drivers are not used", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMDS = [1, 2] if "avx512_bf16" in nat.cpu_features() else [1]
U = 2.0**-24


def chunk_rows(row_bytes, unit, widen, kb, widen_factor=2):
    """The rows per chunk g2_linear_drive.c's chunk_rows() picks (a mirror, used to aim M at the edges)."""
    rows = kb * 1024 * (widen_factor if widen else 1) // max(row_bytes, 1)
    rows = rows // unit * unit
    return max(rows, unit)


def _operands(case):
    """x and the packed weights of a case, from its seed."""
    r = np.random.default_rng(case["seed"])
    M, K, fmt = case["M"], case["K"], case["fmt"]
    x = r.standard_normal((M, K), dtype=np.float32)
    ws = [r.standard_normal((n, K), dtype=np.float32) for n in case["Ns"]]
    if fmt == "float32":
        return x, [(w, None) for w in ws]
    if fmt in ("bfloat16", "bfloat16_dp"):
        return x, [(ref.to_bf16_bits(w), None) for w in ws]
    if fmt == "int8":
        return x, [ref.quantize_int8(w, 32) for w in ws]
    if fmt == "int4":
        return x, [int4.quantize_int4(w) for w in ws]
    return x, [q4_0.from_gguf_blocks(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)) for w in ws]


def compute(case):
    """The native (multi-)linear of a case, one array per part."""
    nat.set_simd(case["simd"])
    try:
        x, packed = _operands(case)
        fmt, t = case["fmt"], case["threads"]
        if fmt == "int4":
            return nat.linear_int4_multi(x, [p[0] for p in packed], [p[1] for p in packed], n_threads=t)
        if fmt == "q4_0":
            return nat.linear_q4_0_multi(x, [p[0] for p in packed], [p[1] for p in packed], n_threads=t)
        return nat.linear_multi(x, [p[0] for p in packed], fmt,
                                [p[1] for p in packed] if fmt == "int8" else None, 32 if fmt == "int8" else 0,
                                n_threads=t)
    finally:
        nat.set_simd(1)


def _worker(cases_json, out_path):  # run in the subprocess, with G2_XCHUNK_KB set
    nat.set_parallel_threshold(0)
    cases = json.loads(cases_json)
    np.savez(out_path, **{f"c{i}_{j}": y for i, c in enumerate(cases) for j, y in enumerate(compute(c))})


def _chunked(cases, kb, tmp_path):
    out = str(tmp_path / f"chunked_{kb}.npz")
    env = dict(os.environ, G2_XCHUNK_KB=str(kb), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("G2_XCHUNK_WIDEN", None)
    code = ("import sys; sys.path.insert(0, %r); import test_linear_drive as t; t._worker(sys.argv[1], sys.argv[2])"
            % os.path.join(ROOT, "tests"))
    subprocess.run([sys.executable, "-c", code, json.dumps(cases), out], env=env, check=True, cwd=ROOT, timeout=600)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def _twin_bound_ok(case, ys):
    """The result is the twin's product to float32 summation rounding (2 (K + 2) u sum|x w|)."""
    x, packed = _operands(case)
    fmt, K = case["fmt"], case["K"]
    for y, (w, s) in zip(ys, packed):
        if fmt == "q4_0":
            wb = ref.f32_to_bf16(q4_0.dequantize_q4_0(w, s))
            yr = q4_0.linear(x, w, s, None, dp_min_m=ref.DP_MIN_M)
            xq, wq = ref._round_bf16(x), ref.bf16_to_f32(wb)
        elif fmt == "int4":
            yr = ref.linear(x, w, "int4", s, None, int4.SUPER)
            xq, wq = ref.linear_operands(x, w, "int4", s, int4.SUPER)
            wq = np.abs(wq) + int4.magnitudes_int4(w, s)
        else:
            blk = 32 if fmt == "int8" else 0
            yr = ref.linear(x, w, fmt, s, None, blk)
            xq, wq = ref.linear_operands(x, w, fmt, s, blk)
        bound = 2 * (K + 2) * U * (np.abs(xq) @ np.abs(wq).T)
        assert np.all(np.abs(y - yr) <= bound + 1e-30), (case, float(np.max(np.abs(y - yr) - bound)))


def _check(cases, tmp_path, twin=True):
    before = nat.get_parallel_threshold()
    nat.set_parallel_threshold(0)  # fan out whatever the size, so threads 2 and 3 really split the work
    try:
        base = [compute(dict(c, threads=1)) for c in cases]  # default chunk: one chunk here
        for kb in (1, 8):
            got = _chunked(cases, kb, tmp_path)
            for i, (c, ys) in enumerate(zip(cases, base)):
                for j, y in enumerate(ys):
                    np.testing.assert_array_equal(got[f"c{i}_{j}"], y, err_msg=f"G2_XCHUNK_KB={kb} {c}")
        if twin:
            for c, ys in zip(cases, base):
                _twin_bound_ok(c, ys)
    finally:
        nat.set_parallel_threshold(before)


def _edges(c):
    return sorted({max(ref.DP_MIN_M, m) for m in (c - 1, c, c + 1, 2 * c - 1, 2 * c + 1)})


# f32 weights run g2_gemm_drive (x rows of K * 4 bytes, 4-row tiles); the others g2_gemm_op_drive with
# avx512_bf16 (packed rows of ceil(K / 2) * 4 bytes, 32-row panels) or g2_gemm_drive without it
def _sweep():
    cases, seed = [], 0
    for fmt, Ks in (("float32", (17, 64, 1024)), ("bfloat16", (63, 1024, 2048)), ("bfloat16_dp", (31, 2048)),
                    ("int8", (64, 1023, 2048)), ("int4", (256, 2048)), ("q4_0", (64, 2048))):
        for K in Ks:
            for simd in (SIMDS if fmt in ("bfloat16", "int8") else SIMDS[:1]):
                op = fmt != "float32" and simd == 1 and fmt in ("bfloat16", "bfloat16_dp", "int8", "int4", "q4_0")
                widen = fmt in ("int8", "int4", "q4_0")
                if op:
                    row, unit = (K + 1) // 2 * 4, 32
                else:
                    row, unit = K * 4, 4
                Ms = set()
                for kb in (1, 8):
                    Ms.update(_edges(chunk_rows(row, unit, widen, kb)))
                for M in sorted(Ms)[:8] + [47]:
                    seed += 1
                    cases.append(dict(fmt=fmt, K=K, M=M, Ns=[45, 17], simd=simd, threads=1 + seed % 3, seed=seed))
    return cases


def test_chunk_rows_mirror_reads_the_driver():
    """The Python mirror aims at the C code's chunk edges: its default is the C default (3 MB, widen x2)."""
    src = open(os.path.join(ROOT, "csrc", "g2_linear_drive.c")).read()
    assert "#define G2_XCHUNK_KB_DEFAULT 3072" in src and "g_xchunk_widen = f > 0 ? f : 2;" in src
    assert chunk_rows(64 * 4, 32, False, 1) == 32 and chunk_rows(32 * 4, 32, False, 8) == 64
    assert chunk_rows(2304 * 2, 32, False, 3072) == 672  # gate/up's x: 672 rows per chunk


@pytest.mark.parametrize("part", range(3))
def test_chunked_prefill_is_bitwise_unchanged(part, tmp_path):
    cases = _sweep()
    _check(cases[part::3], tmp_path)


def test_chunked_prefill_threads_1_to_3(tmp_path):
    """Threads 1..3 inside the chunked subprocess against one thread unchunked, on a shape with many blocks."""
    cases = [dict(fmt=fmt, K=K, M=97, Ns=[301, 45, 14], simd=1, threads=t, seed=100 + t)
             for fmt, K in (("bfloat16", 1024), ("int8", 333), ("float32", 130), ("int4", 512), ("q4_0", 96))
             for t in (1, 2, 3)]
    _check(cases, tmp_path, twin=False)


_CASE = st.builds(lambda fmt, M, ksel, Ns, simd, threads, seed: dict(
    fmt=fmt, M=M, K={"int4": 256 * (1 + ksel % 3), "q4_0": 32 * (1 + ksel % 40)}.get(fmt, 1 + ksel),
    Ns=Ns, simd=simd if fmt in ("bfloat16", "int8") else 1, threads=threads, seed=seed),
    fmt=st.sampled_from(["float32", "bfloat16", "bfloat16_dp", "int8", "int4", "q4_0"]),
    M=st.integers(ref.DP_MIN_M, 140), ksel=st.integers(0, 300), Ns=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    simd=st.sampled_from(SIMDS), threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases=st.lists(_CASE, min_size=12, max_size=12))
def test_chunked_prefill_random_shapes(cases, tmp_path):
    _check(cases, tmp_path)
