"""The MPI code for real: each test launches `mpiexec -n N python tests/mpi_workers/<script>` (with a
timeout, so a hang fails instead of blocking CI) and checks what rank 0 reported.

Needs mpi4py and an mpiexec (`pip install "gemma2np[mpi]"`). Without them these tests skip, unless
GEMMA2NP_REQUIRE_MPI=1 (set by .ci/run), where a missing MPI is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "mpi_workers"


def _mpiexec():
    exe = shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        exe = None
    if exe is None:
        if os.environ.get("GEMMA2NP_REQUIRE_MPI") == "1":
            pytest.fail("GEMMA2NP_REQUIRE_MPI=1 but mpi4py / mpiexec are missing: pip install '.[mpi]'")
        pytest.skip("mpi4py / mpiexec not installed (pip install 'gemma2np[mpi]')")
    return exe


def run_mpi(n: int, script: str, *args, timeout: float = 120.0, threads: int = 1, input=None):
    """Run a worker (or, script="-m", a module) on n ranks (n = 0: one process without mpiexec);
    returns the CompletedProcess (stdout/stderr text, returncode)."""
    exe = _mpiexec()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    target = ["-m"] if script == "-m" else [str(WORKERS / script)]
    cmd = ([exe, "-n", str(n)] if n else []) + [sys.executable, *target, *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s (a hang):\n{e.stderr}")


@pytest.mark.parametrize("n", [2, 3])
def test_collectives_on_real_ranks(n, tmp_path):
    out = tmp_path / "result.json"
    p = run_mpi(n, "collectives.py", out)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res == {"size": n, "checks": ["allreduce_sum", "allgather", "merges", "map_windows", "check"]}


def test_uncaught_exception_on_one_rank_aborts_the_job():
    t = time.monotonic()
    p = run_mpi(2, "failures.py", "raise", timeout=60)
    assert p.returncode != 0
    assert "FloatingPointError: rank one blew up" in p.stderr
    assert "rank 1/2" in p.stderr
    assert "unreachable" not in p.stdout
    assert time.monotonic() - t < 60


def test_a_rank_that_dies_ends_the_job():
    p = run_mpi(3, "failures.py", "exit", timeout=60)
    assert p.returncode != 0
    assert "unreachable" not in p.stdout


def test_load_failure_is_reported_once_by_rank_0():
    p = run_mpi(3, "failures.py", "check", timeout=60)
    assert p.returncode == 1
    assert p.stderr.count("Traceback") == 1 and p.stderr.count("RankError: ") == 1, p.stderr
    assert "1 of 3 rank(s) failed to load: rank 1: cannot read model.safetensors (simulated)" in p.stderr
    assert "unreachable" not in p.stdout


def _backends():
    from gemma2np.kernels import native_available

    return "numpy,native" if native_available() else "numpy"


@pytest.mark.parametrize("n", [2, 3])
def test_goldens_through_tensor_parallel(n, tmp_path):
    """Every golden (all four classes) through the tensor-parallel path on the NumPy reference and the native
    backend: within the golden bound, logits of real tokens within 1e-5 of one process, greedy tokens as
    transformers, sampled tokens as one process with the same seed or generator (tests/mpi_workers/goldens.py
    asserts each); here: that it ran to the end over every case, and the per-rank weight bytes."""
    out = tmp_path / "goldens.json"
    p = run_mpi(n, "goldens.py", out, _backends(), timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    cases = sorted(d.parent.name for d in (ROOT / "reference_outputs").glob("*/case.json"))
    assert sorted(res["cases"]) == cases and all(v == _backends().split(",") for v in res["cases"].values())
    assert res["generate"] >= 8 * len(_backends().split(","))
    print(f"\n-n {n}: worst vs golden {res['worst_golden']:.2e}, logits vs one process {res['worst_vs_single']:.2e}")
    # weights: every rank holds ~1/N of the split tensors (uneven head splits: a little more), all of the replicated
    w = res["weights"]
    whole = w["unsplit"]["sharded"]
    for r, (rank, plan) in enumerate(zip(w["ranks"], w["plans"])):
        print(f"  {plan}: {rank['sharded']} B split ({rank['sharded'] / whole:.3f} of {whole}) + "
              f"{rank['replicated']} B replicated")
        assert rank["replicated"] == w["unsplit"]["replicated"]
        assert rank["sharded"] <= whole / n * 1.25
    assert sum(rank["sharded"] for rank in w["ranks"]) >= whole
    if n == 2:  # 2 ranks, 2 KV heads: an exact split
        assert all(rank["sharded"] * 2 == whole for rank in w["ranks"])


GEN = ["gemma2np", "generate", "--prompt", "ROMEO:", "--max-new-tokens", "24", "--do-sample", "--temperature", "0.9",
       "--top-k", "40", "--seed", "3"]


@pytest.mark.parametrize("n,backend", [(2, "numpy"), (3, "native")])
def test_cli_generate_under_mpiexec(n, backend):
    """`mpiexec -n N gemma2np generate ...` is tensor-parallel, prints once (rank 0), and samples the
    same text as one process with the same seed (the bundled model: bf16 weights on native)."""
    from gemma2np.kernels import native_available

    if backend == "native" and not native_available():
        pytest.skip("native extension not built")
    one = run_mpi(0, "-m", *GEN, "--backend", backend)
    tp = run_mpi(n, "-m", *GEN, "--backend", backend)
    assert one.returncode == 0 and tp.returncode == 0, tp.stderr
    assert tp.stdout == one.stdout and len(tp.stdout.strip()) > 10
    assert tp.stderr.count("prompt tokens") == 1, tp.stderr  # the timing line: rank 0 only


def test_cli_errors_under_mpiexec_are_reported_once():
    # every rank finds the same bad argument: one line, exit 2, no abort
    p = run_mpi(2, "-m", "gemma2np", "generate", "--prompt", "x", "--model", "/nonexistent/model", timeout=60)
    assert p.returncode == 2 and p.stderr.count("error:") == 1 and "MPI_Abort" not in p.stderr, p.stderr
    # rank 0 alone has the error (only it reads the prompt): it says so, and the job ends (bounded)
    p = run_mpi(2, "-m", "gemma2np", "generate", "--prompt", "   ", timeout=60)
    assert p.returncode != 0 and "the prompt is empty" in p.stderr and "rank 0 failed alone" in p.stderr
    # a command that does not run tensor-parallel
    p = run_mpi(2, "-m", "gemma2np", "chat", timeout=60)
    assert p.returncode == 2 and p.stderr.count("only generate runs") == 1


@pytest.mark.parametrize("n", [2, 3])
def test_weight_formats_and_float64_tensor_parallel(n, tmp_path):
    out = tmp_path / "formats.json"
    p = run_mpi(n, "formats.py", out, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    print(json.dumps(res, indent=1))
    assert all(r["greedy_equal"] for r in res.values() if isinstance(r, dict)), res
    assert res["numpy/float64/None"]["max_diff"] <= 1e-12  # the float64 ground truth across ranks
    # float32: logits up to |18| here (softcap 30, not the goldens' 3), so the goldens' 1e-5 bound is taken
    # relative to the largest logit (a few float32 ulps of it); GGUF Q8_0 on numpy is dequantised at use
    assert res["from_config"]["unseeded_ranks_agree"]  # seed=None: rank 0's fresh seed on every rank
    assert res["resize_refused"] is True
    assert res["save_pretrained"]["max_diff"] == 0.0  # the whole model written once, by rank 0
    for key in ("numpy/float32/None", "gguf-q8_0/numpy", "native/float32/float32", "from_config"):
        if key in res:
            assert res[key]["max_diff"] <= 1e-6 * res[key]["max_abs_logit"], (key, res[key])
    if "native/float32/float32" in res:
        for fmt in ("bfloat16", "int8"):
            r = res[f"native/float32/{fmt}"]
            assert r["max_diff"] <= 0.5 * r["format_error"], (fmt, r)
        r = res["gguf-q8_0/native"]  # the Q8_0 blocks as int8 on every rank
        assert r["int8"] and r["max_diff"] <= 0.5 * r["format_error"], r


def test_a_rank_that_cannot_load_the_model_is_reported_once():
    p = run_mpi(3, "failures.py", "loadfail", timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("Traceback") == 1, p.stderr
    assert "1 of 3 rank(s) failed to load the model: rank 1: CheckpointError: model directory not found" in p.stderr
    assert "unreachable" not in p.stdout


def test_bad_input_is_checked_on_rank_0_and_reported_once():
    p = run_mpi(2, "failures.py", "badinput", timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("Traceback") == 1, p.stderr
    assert "InputError: token id 99999 is out of range" in p.stderr
    assert "unreachable" not in p.stdout


@pytest.fixture(scope="module")
def f32_checkpoint(tmp_path_factory):
    """A random float32 checkpoint, hidden 512, 4 layers, intermediate 4096, vocab 32000 (179 MB)."""
    from gemma2np import Gemma2Config, Gemma2ForCausalLM

    d = tmp_path_factory.mktemp("resident")
    cfg = Gemma2Config(hidden_size=512, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=64, vocab_size=32000, sliding_window=64)
    Gemma2ForCausalLM.from_config(cfg, seed=0).save_pretrained(d)
    return d


@pytest.mark.parametrize("n", [2, 3])
def test_each_rank_maps_only_its_slices(n, tmp_path, f32_checkpoint):
    """Measured resident memory (RSS growth over load + a forward pass that reads every weight) of each
    rank against one process holding the whole 179 MB model: a fraction near 1/N (what is left is the
    rank's activations, the gathered logits and MPI's buffers, ~10-20 MB here)."""
    size = sum(f.stat().st_size for f in f32_checkpoint.glob("*.safetensors"))
    p = run_mpi(0, "resident.py", f32_checkpoint, tmp_path / "one.json", "one", timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    whole = json.loads((tmp_path / "one.json").read_text())["ranks"][0]
    p = run_mpi(n, "resident.py", f32_checkpoint, tmp_path / "tp.json", "tp", timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = json.loads((tmp_path / "tp.json").read_text())["ranks"]
    assert whole >= 0.9 * size  # one process: every weight page resident after the forward
    shares = [r / whole for r in ranks]
    print(f"\n-n {n}: resident per rank {[f'{r / 1e6:.0f} MB' for r in ranks]} = {[f'{s:.2f}' for s in shares]}"
          f" of one process ({whole / 1e6:.0f} MB)")
    assert all(s < 1 / n + 0.2 for s in shares), shares


@pytest.mark.parametrize("n", [2, 3])
def test_cli_perplexity_is_data_parallel_under_mpiexec(n, tmp_path):
    """`mpiexec -n N gemma2np perplexity ...`: windows spread over the ranks (each holding the whole model),
    gathered on rank 0 in window order: the same JSON, bit for bit, as one process; printed once."""
    from test_perplexity import TEXT

    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    outs = {}
    for ranks in (0, n):
        out = tmp_path / f"ppl{ranks}.json"
        p = run_mpi(ranks, "-m", "gemma2np", "perplexity", "--text", text, "--ctx", "24", "--max-windows", "7",
                    "--against", "float32", "--backend", "native", "--json", out, timeout=180)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count(" windows of ") == 1, p.stdout  # printed by rank 0 only
        outs[ranks] = json.loads(out.read_text())
    assert outs[0]["windows"] == 7
    assert outs[n] == outs[0]
