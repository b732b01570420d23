"""Make tests/data/llamacpp/ with a real llama.cpp build (dev-only; nothing here runs in the tests).

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp   # vendors llama.cpp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp && cd /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=OFF
    cmake --build build -j2 --target llama-debug llama-eval-callback llama-perplexity llama-quantize
    python scripts/make_llamacpp_fixtures.py --llama-cpp /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp

Steps (all with llama.cpp's own tools; the GGUFs stay in --work, only logs and small files are kept):
1. convert the bundled model with llama.cpp's convert_hf_to_gguf.py (its own gguf-py) to F32;
2. a *broken* copy of that GGUF: every blk.N.attn_norm.weight rewritten from llama.cpp's stored
   1 + w to w (the classic "forgot Gemma's 1 + w" porting bug), with the gguf package;
3. llama-eval-callback logs of a short prompt on both (F32 KV cache, so the only differences from
   gemma2np are kernel rounding), one more with flash attention off (prints kq_soft_max), and a
   llama-debug --verbose log (it runs a warm-up evaluation on <bos><eos> first);
4. llama-debug --save-logits: llamacpp-<model>.bin (last-token logits) + -tokens.bin.

llama.cpp at this commit logs through an asynchronous logger that is never flushed at exit
(upstream issue 22142): the end of a long log is often lost. Each run is repeated until its log is
complete (the graph's last node, result_output, with its sum); gemma2np compare reports a cut log
as truncated (exit 2) rather than comparing half of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's gemma2np
MODEL = os.path.join(ROOT, "gemma2np", "data", "gemma2-shakespeare")
OUT = os.path.join(ROOT, "tests", "data", "llamacpp")
PROMPT = "ROMEO: What light"
# the vendor/llama.cpp submodule of llama-cpp-python 0.3.36 (git ls-tree HEAD vendor/llama.cpp in its
# repository; its CHANGELOG: "update llama.cpp to ggml-org/llama.cpp@0c1e57098"). The build itself
# reports llama-cpp-python's own commit (1652066), which is what cmake's git lookup finds.
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def run(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, **kw)


def complete(text: str) -> bool:
    from gemma2np.llamacpp_log import LlamaCppLogError, parse_log

    try:
        log = parse_log(text)
        ev = log.evaluation()
    except LlamaCppLogError:
        return False
    return any(t.name == "result_output" and t.sum is not None for t in ev)


def log_run(cmd, out_path, tries=40):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for i in range(tries):
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=True)
        text = p.stdout.decode("utf-8", "replace")
        if complete(text):
            with open(out_path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"{out_path}: complete after {i + 1} run(s), {len(text)} bytes", file=sys.stderr)
            return
    raise SystemExit(f"no complete log after {tries} runs of {' '.join(cmd)}")


def break_attn_norms(src: str, dst: str) -> None:
    import gguf

    shutil.copyfile(src, dst)
    r = gguf.GGUFReader(dst, "r+")
    n = 0
    for t in r.tensors:
        if t.name.endswith(".attn_norm.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            t.data[...] = t.data - np.float32(1.0)  # stored 1 + w  ->  w
            n += 1
    r.data.flush()
    assert n > 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", required=True, help="the llama.cpp source tree with build/bin")
    ap.add_argument("--work", default="/tmp/gemma2np-llamacpp", help="scratch directory for the GGUFs")
    args = ap.parse_args()
    lc = os.path.abspath(args.llama_cpp)
    bins = os.path.join(lc, "build", "bin")
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    f32 = os.path.join(args.work, "shakespeare-f32.gguf")
    broken = os.path.join(args.work, "shakespeare-broken-attn-norm.gguf")
    env = dict(os.environ, PYTHONPATH=os.path.join(lc, "gguf-py"))
    run([sys.executable, os.path.join(lc, "convert_hf_to_gguf.py"), MODEL, "--outtype", "f32", "--outfile", f32],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    break_attn_norms(f32, broken)

    common = ["-p", PROMPT, "-t", "1", "-ctk", "f32", "-ctv", "f32"]
    ev = os.path.join(bins, "llama-eval-callback")
    log_run([ev, "-m", f32, *common], os.path.join(OUT, "eval-callback-f32.log"))
    log_run([ev, "-m", f32, *common, "-fa", "off"], os.path.join(OUT, "eval-callback-f32-fa-off.log"))
    log_run([ev, "-m", broken, *common], os.path.join(OUT, "eval-callback-broken-attn-norm.log"))
    dbg = os.path.join(bins, "llama-debug")
    log_run([dbg, "-m", f32, *common, "--verbose"], os.path.join(OUT, "llama-debug-verbose-f32.log"))
    run([dbg, "-m", f32, *common, "--save-logits", "--logits-output-dir", args.work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for suffix in (".bin", "-tokens.bin", "-prompt.txt"):
        shutil.copyfile(os.path.join(args.work, "llamacpp-shakespeare-f32" + suffix),
                        os.path.join(OUT, "llamacpp-shakespeare-f32" + suffix))

    version = subprocess.run([ev, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout.decode()
    info = {
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "source": "llama-cpp-python 0.3.36 sdist (PyPI), vendor/llama.cpp",
        "llama_version_output": version.strip().splitlines(),
        "build": "cmake -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release (CPU, AVX-512)",
        "model": "gemma2np/data/gemma2-shakespeare converted with llama.cpp's convert_hf_to_gguf.py --outtype f32",
        "broken_model": "the same GGUF with every blk.N.attn_norm.weight stored as w instead of 1 + w",
        "prompt": PROMPT,
        "run_options": common,
        "files": sorted(f for f in os.listdir(OUT) if f != "fixtures.json"),
    }
    with open(os.path.join(OUT, "fixtures.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
