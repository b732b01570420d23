"""Threads under load (issue 13): the native kernels' fan-out threshold and the OpenMP environment
defaults set before the extension loads (gemma2np/kernels/_openmp_env.py).

The threshold only decides whether a kernel wakes its threads; every result must stay bitwise the
same whatever it is. Small work must really stay on the calling thread (checked by counting the
process's threads: libgomp creates its workers at the first region that uses them).
"""
import os
import platform
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from gemma2np.kernels import _openmp_env

nat = pytest.importorskip("gemma2np._native")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env_extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMP_", "GOMP_", "KMP_", "G2_", "GEMMA2NP_OMP"))}
    env.update(env_extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p


# ----------------------------------------------------------------------------- the threshold


def test_parallel_threshold_get_set_and_bad_values():
    before = nat.get_parallel_threshold()
    try:
        assert nat.set_parallel_threshold(0) == 0.0 and nat.get_parallel_threshold() == 0.0
        assert nat.set_parallel_threshold(12.5) == 12.5
        for bad in (-1, float("nan"), float("inf"), 1e13):
            with pytest.raises(ValueError):
                nat.set_parallel_threshold(bad)
        for bad in ("10", None, True):
            with pytest.raises(TypeError):
                nat.set_parallel_threshold(bad)
        assert nat.get_parallel_threshold() == 12.5
    finally:
        nat.set_parallel_threshold(before)


@pytest.mark.parametrize("value, want", [(None, nat.PARALLEL_THRESHOLD_DEFAULT_US), ("7", 7.0), ("0", 0.0),
                                         ("junk", nat.PARALLEL_THRESHOLD_DEFAULT_US),
                                         ("-3", nat.PARALLEL_THRESHOLD_DEFAULT_US)])
def test_parallel_threshold_from_environment(value, want):
    env = {} if value is None else {"G2_PAR_MIN_US": value}
    out = _run("import gemma2np._native as n; print(n.get_parallel_threshold())", **env).stdout
    assert float(out) == want


def _cases(rng):
    """(name, fn(n_threads)) over shapes on both sides of the default threshold."""
    def rnd(*s):
        return rng.standard_normal(s, dtype=np.float32)

    for M, N, K in [(1, 40, 64), (1, 1024, 1024), (3, 700, 512), (16, 256, 384), (64, 512, 1024)]:
        x, w = rnd(M, K), rnd(N, K) * np.float32(0.05)
        wb = w.astype(ml_dtypes.bfloat16).view(np.uint16)
        q, s = nat.quantize_int8(w, 32)
        yield ("f32", M, N, K), lambda nt, x=x, w=w: nat.linear(x, w, "float32", n_threads=nt)
        yield ("bf16", M, N, K), lambda nt, x=x, w=wb: nat.linear(x, w, "bfloat16", n_threads=nt)
        yield ("int8", M, N, K), lambda nt, x=x, q=q, s=s: nat.linear(x, q, "int8", scales=s, block=32, n_threads=nt)
        yield ("multi", M, N, K), lambda nt, x=x, w=wb: nat.linear_multi(x, [w, w[: N // 2 + 1]], "bfloat16",
                                                                         n_threads=nt)
    for T, S in [(1, 40), (1, 900), (33, 200)]:
        q, k, v = rnd(1, 8, T, 64), rnd(1, 4, S, 64), rnd(1, 4, S, 64)
        qp, kp = np.arange(S - T, S, dtype=np.int64), np.arange(S, dtype=np.int64)
        yield ("attention", T, S), lambda nt, q=q, k=k, v=v, qp=qp, kp=kp: nat.attention(
            q, k, v, qp, kp, None, 0.125, softcap=50.0, window=128, n_threads=nt)
    for n in (300, 200003):
        x = rnd(n)
        yield ("geglu", n), lambda nt, x=x: nat.geglu(x, x[::-1].copy(), n_threads=nt)
        yield ("softcap", n), lambda nt, x=x: nat.softcap(x * 60, 30.0, n_threads=nt)
        yield ("bf16", n), lambda nt, x=x: nat.f32_to_bf16(x, n_threads=nt)
    for R, D in [(1, 256), (300, 2304)]:
        x, w = rnd(R, D), rnd(D)
        yield ("rmsnorm", R, D), lambda nt, x=x, w=w: nat.rmsnorm(x, w, n_threads=nt)
        yield ("rope", R, D), lambda nt, x=x: nat.rope(x.reshape(1, 1, R, D), np.cos(x), np.sin(x), n_threads=nt)
        yield ("topk", R, D), lambda nt, x=x: nat.topk(x, 5, n_threads=nt)
        yield ("argmax", R, D), lambda nt, x=x: nat.argmax(x, n_threads=nt)


@pytest.mark.parametrize("level", [0, 1] if "avx512f" in nat.cpu_features() else [0], ids=lambda l: {0: "scalar", 1: "avx512"}[l])
def test_results_do_not_depend_on_the_threshold(level):
    before = nat.get_parallel_threshold()
    nat.set_simd(level)
    try:
        for name, fn in _cases(np.random.default_rng(3)):
            got = []
            for us in (0, nat.PARALLEL_THRESHOLD_DEFAULT_US, 1e9):
                nat.set_parallel_threshold(us)
                for nt in (1, 2, 3):
                    r = fn(nt)
                    got.append(np.concatenate([a.ravel().view(np.uint8) for a in (r if isinstance(r, (list, tuple)) else [r])]))
            for g in got[1:]:
                np.testing.assert_array_equal(g, got[0], err_msg=str(name))
    finally:
        nat.set_simd(1)
        nat.set_parallel_threshold(before)


_THREADS = """
import numpy as np, gemma2np._native as nat
def threads():
    with open('/proc/self/status') as f:
        return int([l for l in f if l.startswith('Threads:')][0].split()[1])
r = np.random.default_rng(0)
t0 = threads()
# decode-sized work of the bundled model: q/k/v (512 x 256 bf16), rmsnorm, rope, attention, geglu
x = r.standard_normal((1, 256), dtype=np.float32)
w = (r.standard_normal((512, 256), dtype=np.float32) * 0.05).astype(np.float32)
for fmt in ("float32", "bfloat16"):
    ww = w if fmt == "float32" else nat.f32_to_bf16(w)
    nat.linear(x, ww, fmt, n_threads=2)
nat.rmsnorm(x, x[0], n_threads=2)
nat.geglu(x, x, n_threads=2)
q = r.standard_normal((1, 4, 1, 64), dtype=np.float32); k = r.standard_normal((1, 2, 40, 64), dtype=np.float32)
nat.attention(q, k, k, np.array([39]), np.arange(40), None, 0.125, n_threads=2)
t_small = threads()
# a large one (64 MB of bf16 weights) must fan out
big = nat.f32_to_bf16(r.standard_normal((8192, 4096), dtype=np.float32))
nat.linear(r.standard_normal((1, 4096), dtype=np.float32), big, "bfloat16", n_threads=2)
print(t0, t_small, threads())
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="counts threads through /proc")
def test_small_work_stays_on_the_calling_thread():
    if not nat.have_openmp():
        pytest.skip("serial build: no OpenMP threads at all")
    t0, t_small, t_big = map(int, _run(_THREADS).stdout.split())
    assert t_small == t0, "small kernels started OpenMP threads (%d -> %d)" % (t0, t_small)
    assert t_big == t0 + 1, "the large linear did not use its second thread (%d -> %d)" % (t0, t_big)
    # and with the threshold at 0 the same small calls do start the worker
    t0, t_small, _ = map(int, _run(_THREADS, G2_PAR_MIN_US="0").stdout.split())
    assert t_small == t0 + 1


# ----------------------------------------------------------------------------- OpenMP environment defaults


def test_openmp_defaults_fill_only_what_the_user_left_unset():
    env = {}
    assert _openmp_env.apply_defaults(env) == {"GOMP_SPINCOUNT": _openmp_env.GOMP_SPINCOUNT_DEFAULT,
                                               "KMP_BLOCKTIME": _openmp_env.KMP_BLOCKTIME_DEFAULT}
    assert env == {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
    env = {"GOMP_SPINCOUNT": "5"}
    assert _openmp_env.apply_defaults(env) == {"KMP_BLOCKTIME": "0"} and env["GOMP_SPINCOUNT"] == "5"
    env = {"KMP_BLOCKTIME": "200"}
    _openmp_env.apply_defaults(env)
    assert env == {"KMP_BLOCKTIME": "200", "GOMP_SPINCOUNT": "1000"}
    for user in ({"OMP_WAIT_POLICY": "active"}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"GEMMA2NP_OMP_DEFAULTS": "0"}):
        env = dict(user)
        assert _openmp_env.apply_defaults(env) == {} and env == user


_DISPLAY = "from gemma2np import kernels; kernels.get_backend('native'); import os; print(os.environ.get('GOMP_SPINCOUNT'))"


@pytest.mark.skipif(platform.system() != "Linux", reason="libgomp's OMP_DISPLAY_ENV output")
def test_libgomp_sees_the_defaults_and_the_users_choice():
    """The defaults are in place before libgomp loads with the extension: libgomp's own report of
    its settings (OMP_DISPLAY_ENV) shows them; a user's OMP_WAIT_POLICY is left alone."""
    if not nat.have_openmp():
        pytest.skip("serial build")
    p = _run(_DISPLAY, OMP_DISPLAY_ENV="verbose")
    if "OPENMP DISPLAY ENVIRONMENT" not in p.stderr:
        pytest.skip("the OpenMP runtime is not libgomp")
    assert "GOMP_SPINCOUNT = '1000'" in p.stderr, p.stderr
    p = _run(_DISPLAY, OMP_DISPLAY_ENV="verbose", OMP_WAIT_POLICY="active")
    assert p.stdout.strip() == "None"
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in p.stderr and "GOMP_SPINCOUNT = '1000'" not in p.stderr
    p = _run(_DISPLAY, OMP_DISPLAY_ENV="verbose", GOMP_SPINCOUNT="77")
    assert "GOMP_SPINCOUNT = '77'" in p.stderr
