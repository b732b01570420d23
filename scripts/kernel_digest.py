"""Bitwise digest of every native kernel's output (a refactoring check, not a test).

    PYTHONPATH=. python scripts/kernel_digest.py > after.json   # in the tree whose _native to check
    PYTHONPATH=/path/to/old/tree python scripts/kernel_digest.py > before.json
    python scripts/kernel_digest.py --diff before.json after.json

Runs every kernel of gemma2np._native on fixed pseudo-random inputs (odd and power-of-two sizes,
every weight format, decode and prefill batch sizes, masks, windows, softcaps) on every SIMD level
the CPU has and on 1, 2 and 3 threads, and prints one SHA-256 per (kernel, case, level, threads).
Two builds whose digests are equal give bitwise-identical results on these inputs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np


def _h(*arrays) -> str:
    d = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        d.update(str(a.dtype).encode() + str(a.shape).encode())
        d.update(a.tobytes())
    return d.hexdigest()[:32]


def _bf16(w):
    u = w.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return r


def cases(nat):
    rng = np.random.default_rng(1234)

    def rnd(*shape, scale=1.0):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)

    # linear / linear_multi: decode (M < 8) and prefill (M >= 8) shapes, odd and 2 KB-multiple K
    for (M, N, K) in [(1, 37, 131), (3, 64, 256), (4, 41, 77), (7, 130, 96), (9, 29, 33), (17, 70, 129),
                      (40, 100, 1024), (33, 45, 2048), (64, 300, 64), (1, 1000, 512), (2, 513, 2304)]:
        x = rnd(M, K)
        w = rnd(N, K, scale=0.05)
        q, s = nat.quantize_int8(w, 32, n_threads=1)
        packs = {"float32": (w, None, 0), "bfloat16": (_bf16(w), None, 0),
                 "bfloat16_dp": (_bf16(w), None, 0), "int8": (q, s, 32)}
        for fmt, (wf, sf, blk) in packs.items():
            yield ("linear", fmt, M, N, K), lambda nt, wf=wf, sf=sf, blk=blk, fmt=fmt, x=x: nat.linear(
                x, wf, fmt, scales=sf, block=blk, n_threads=nt)
        w2 = rnd(N // 2 + 1, K, scale=0.05)
        q2, s2 = nat.quantize_int8(w2, 32, n_threads=1)
        for fmt in ("float32", "bfloat16", "int8"):
            if fmt == "float32":
                ws, ss, blk = [w, w2], None, 0
            elif fmt == "bfloat16":
                ws, ss, blk = [_bf16(w), _bf16(w2)], None, 0
            else:
                ws, ss, blk = [q, q2], [s, s2], 32
            yield ("linear_multi", fmt, M, N, K), lambda nt, ws=ws, ss=ss, blk=blk, fmt=fmt, x=x: nat.linear_multi(
                x, ws, fmt, scales=ss, block=blk, n_threads=nt)
    for (N, K, blk) in [(5, 100, 16), (64, 2304, 32), (3, 1024, 64)]:
        w = rnd(N, K, scale=3.0)
        w[0, :blk] = 0
        yield ("quantize_int8", N, K, blk), lambda nt, w=w, blk=blk: nat.quantize_int8(w, blk, n_threads=nt)
        yield ("quantize_int8_bf16", N, K, blk), lambda nt, w=w, blk=blk: nat.quantize_int8(_bf16(w), blk, n_threads=nt)
    # attention: GQA, window, softcap, masks (incl. a fully masked row), decode and prefill
    for (B, Hq, Hkv, T, S, D, cap, win) in [(1, 4, 2, 1, 37, 64, 50.0, None), (2, 4, 1, 5, 5, 16, None, 3),
                                            (1, 8, 4, 33, 200, 64, 50.0, 128), (2, 2, 2, 3, 70, 40, None, None),
                                            (1, 8, 4, 1, 300, 256, 50.0, 4096)]:
        q, k, v = rnd(B, Hq, T, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
        qp = np.arange(S - T, S, dtype=np.int64)
        kp = np.arange(S, dtype=np.int64)
        kv = rng.random((B, S)) > 0.2
        kv[-1, :] = False if B > 1 else kv[-1, :]
        for mask in (None, kv):
            yield ("attention", B, Hq, Hkv, T, S, D, cap, win, mask is None), \
                lambda nt, q=q, k=k, v=v, qp=qp, kp=kp, m=mask, cap=cap, win=win, D=D: nat.attention(
                    q, k, v, qp, kp, m, D ** -0.5, softcap=cap, window=win, n_threads=nt)
    for (R, D) in [(1, 256), (3, 7), (128, 2304), (17, 300)]:
        x, w = rnd(R, D, scale=3.0), rnd(D)
        yield ("rmsnorm", R, D), lambda nt, x=x, w=w: nat.rmsnorm(x, w, 1e-6, n_threads=nt)
    for n in (1, 17, 4096, 20000, 100003):
        g, u = rnd(n, scale=4.0), rnd(n)
        for appr in ("tanh", "none"):
            yield ("geglu", n, appr), lambda nt, g=g, u=u, a=appr: nat.geglu(g, u, a, n_threads=nt)
        x = rnd(n, scale=60.0)
        yield ("softcap", n), lambda nt, x=x: nat.softcap(x, 30.0, n_threads=nt)
        yield ("tanh", n), lambda nt, x=x: nat.tanh(x * np.float32(0.1), n_threads=nt)
        yield ("exp", n), lambda nt, x=x: nat.exp(x, n_threads=nt)
        yield ("f32_to_bf16", n), lambda nt, x=x: nat.f32_to_bf16(x, n_threads=nt)
    for (B, H, T, D, pb) in [(1, 4, 1, 64, False), (2, 3, 7, 10, True), (1, 8, 128, 256, False)]:
        x = rnd(B, H, T, D)
        ang = rnd(B if pb else 1, T, D)
        yield ("rope", B, H, T, D, pb), lambda nt, x=x, c=np.cos(ang), s=np.sin(ang): nat.rope(x, c, s, n_threads=nt)
    for (R, V, k) in [(1, 4096, 50), (3, 1000, 7), (2, 256000, 64)]:
        x = np.round(rnd(R, V) * 4).astype(np.float32)
        yield ("argmax", R, V), lambda nt, x=x: nat.argmax(x, n_threads=nt)
        yield ("topk", R, V, k), lambda nt, x=x, k=k: nat.topk(x, k, n_threads=nt)


def digest() -> dict:
    from gemma2np import _native as nat

    levels = [0, 1, 2] if "avx512f" in nat.cpu_features() else [0]
    out = {"_module": nat.__file__}
    for level in levels:
        assert nat.set_simd(level) == level
        for key, fn in cases(nat):
            for nt in (1, 2, 3):
                r = fn(nt)
                r = list(r) if isinstance(r, (list, tuple)) else [r]
                out["%s|simd%d|t%d" % (key, level, nt)] = _h(*r)
    nat.set_simd(1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diff", nargs=2, metavar=("BEFORE", "AFTER"))
    a = ap.parse_args(argv)
    if a.diff:
        before, after = (json.load(open(p)) for p in a.diff)
        keys = sorted((set(before) | set(after)) - {"_module"})
        bad = [k for k in keys if before.get(k) != after.get(k)]
        for k in bad:
            print("DIFFERS:", k, before.get(k), after.get(k))
        print("%d digests compared, %d differ" % (len(keys), len(bad)))
        return 1 if bad else 0
    json.dump(digest(), sys.stdout, indent=0, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
