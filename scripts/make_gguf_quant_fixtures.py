"""Make tests/data/gguf/ with a real llama.cpp build (dev-only; nothing here runs in the tests).

Build llama.cpp as in scripts/make_llamacpp_fixtures.py (llama-cpp-python 0.3.36's vendored tree, targets
llama-debug and llama-quantize), then
    python scripts/make_gguf_quant_fixtures.py --llama-cpp /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp

1. the bundled model -> F32 GGUF with llama.cpp's convert_hf_to_gguf.py (its own gguf-py);
2. llama-quantize it to Q4_0, Q8_0 and Q4_K_M (no imatrix);
3. llama-debug --save-logits on each (the prompt and options of the F32 fixtures: one thread, F32 KV
   cache; --no-repack, see COMMON): llamacpp-shakespeare-<type>.bin (last-token logits, float32) and -tokens.bin;
4. only the Q4_K_M file is kept (3.3 MB: gguf-py cannot write k-quants). The Q4_0 and Q8_0 files are
   re-made by tests/gguf_quant_fixtures.py from the bundled weights; this script checks that the re-made
   files hold bitwise the tensors and the metadata of llama-quantize's, so the committed logits are
   llama.cpp's on exactly the files the tests load.
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
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from make_llamacpp_fixtures import LLAMA_CPP_COMMIT, MODEL, PROMPT, run  # noqa: E402

OUT = os.path.join(ROOT, "tests", "data", "gguf")
TYPES = ("Q4_0", "Q8_0", "Q4_K_M")
# --no-repack: at this commit the AMX repacked matmul (ggml_backend_amx_mul_mat) segfaults on this
# model's quantized tensors on this machine (gdb backtrace); without repacking the plain CPU kernels run
COMMON = ["-p", PROMPT, "-t", "1", "-ctk", "f32", "-ctv", "f32", "--no-repack"]


def same_file(a: str, b: str) -> bool:
    import gguf

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta = {t.name: t for t in ra.tensors}
    if sorted(ta) != sorted(t.name for t in rb.tensors):
        return False
    for t in rb.tensors:
        u = ta[t.name]
        if u.tensor_type != t.tensor_type or not np.array_equal(np.asarray(u.data).view(np.uint8).ravel(),
                                                               np.asarray(t.data).view(np.uint8).ravel()):
            return False
    fa = {f.name: f.contents() for f in ra.fields.values()}
    fb = {f.name: f.contents() for f in rb.fields.values()}
    return fa == fb


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", required=True, help="the llama.cpp source tree with build/bin")
    ap.add_argument("--work", default="/tmp/gemma2np-gguf-quant", help="scratch directory for the GGUFs")
    args = ap.parse_args()
    lc = os.path.abspath(args.llama_cpp)
    bins = os.path.join(lc, "build", "bin")
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    f32 = os.path.join(args.work, "shakespeare-f32.gguf")
    env = dict(os.environ, PYTHONPATH=os.path.join(lc, "gguf-py"))
    run([sys.executable, os.path.join(lc, "convert_hf_to_gguf.py"), MODEL, "--outtype", "f32", "--outfile", f32],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for q in TYPES:
        name = f"shakespeare-{q}"
        path = os.path.join(args.work, name + ".gguf")
        run([os.path.join(bins, "llama-quantize"), f32, path, q, "1"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        run([os.path.join(bins, "llama-debug"), "-m", path, *COMMON, "--save-logits", "--logits-output-dir",
             args.work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for suffix in (".bin", "-tokens.bin"):
            shutil.copyfile(os.path.join(args.work, "llamacpp-" + name + suffix),
                            os.path.join(OUT, "llamacpp-" + name + suffix))
        if q == "Q4_K_M":
            shutil.copyfile(path, os.path.join(OUT, name + ".gguf"))
    from gguf_quant_fixtures import quant_gguf

    for q in ("Q4_0", "Q8_0"):
        mine = quant_gguf(q, os.path.join(args.work, f"remade-{q}.gguf"), os.path.join(OUT, "shakespeare-Q4_K_M.gguf"))
        if not same_file(mine, os.path.join(args.work, f"shakespeare-{q}.gguf")):
            raise SystemExit(f"the re-made {q} GGUF differs from llama-quantize's")
    info = {
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "source": "llama-cpp-python 0.3.36 sdist (PyPI), vendor/llama.cpp",
        "model": "gemma2np/data/gemma2-shakespeare, convert_hf_to_gguf.py --outtype f32, llama-quantize <type> 1",
        "types": list(TYPES),
        "prompt": PROMPT,
        "run_options": COMMON,
        "logits": "llama-debug --save-logits: last-token logits (float32) and the prompt's token ids (int32)",
        "remade": "Q4_0 and Q8_0 GGUFs are re-made by tests/gguf_quant_fixtures.py (checked bitwise equal here)",
        "files": sorted(f for f in os.listdir(OUT) if f != "fixtures.json"),
    }
    with open(os.path.join(OUT, "fixtures.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
