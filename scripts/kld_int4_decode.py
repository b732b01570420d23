"""KLD of native int4 against float32 on docs/precision.md's windows with every int4 matmul run the
decode way: `gemma2np perplexity` scores whole windows, i.e. prefill (>= 8 rows: bf16 products), so on
its own it never measures the decode kernel. Here each int4 linear is computed in chunks of
DP_MIN_M - 1 rows; rows are independent, so every token's linears are exactly what a decode step
computes (attention etc. unchanged).

    python scripts/kld_int4_decode.py MODE TEXT     (from the repository root; TEXT as in docs/precision.md)

MODE: prefill (the docs command as is) | decode (the int8-x integer kernel) | floatx (x kept float32:
the float32 product of the dequantised W, the numerics decode had before). Figures: docs/precision.md.
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
from gemma2np.kernels import native, int4
from gemma2np.kernels.twins import DP_MIN_M
mode = sys.argv[1]
orig = native.NativeBackend.linear
CACHE = {}

def linear(self, x, handle):
    if getattr(handle, "fmt", None) != "int4" or mode == "prefill":
        return orig(self, x, handle)
    x = np.asarray(x, np.float32)
    x2 = x.reshape(-1, x.shape[-1])
    if mode == "floatx":
        if id(handle) not in CACHE:
            CACHE[id(handle)] = (handle, int4.dequantize_int4(handle.w, handle.scales))
        y = x2 @ CACHE[id(handle)][1].T
        if handle.bias is not None:
            y = y + handle.bias
    else:
        y = np.concatenate([orig(self, np.ascontiguousarray(x2[i:i + DP_MIN_M - 1]), handle)
                            for i in range(0, len(x2), DP_MIN_M - 1)])
    return y.reshape(x.shape[:-1] + (y.shape[-1],)).astype(np.float32)

native.NativeBackend.linear = linear
native.NativeBackend.linear_many = lambda self, x, hs: [self.linear(x, h) for h in hs]
from gemma2np.cli import main
sys.exit(main(["perplexity", "--model", "gemma2np/data/gemma2-shakespeare", "--backend", "native", "--weights", "int4",
               "--against", "float32", "--text", sys.argv[2], "--ctx", "256",
               "--max-windows", "24", "--threads", "1"]))
