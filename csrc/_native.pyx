# cython: language_level=3
"""gemma2np._native: thin typed wrappers over the C kernels (csrc/gemma2np_kernels.h, csrc/g2_*.c).

Every wrapper validates dtype (TypeError), C-contiguity, shapes and ranges (ValueError)
before it calls C with the GIL released. Outputs are freshly allocated float32/int64 arrays
unless ``out=`` is given (then it is validated the same way).
"""
import os
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint16_t, int8_t

cnp.import_array()

cdef extern from "gemma2np_kernels.h" nogil:
    int G2_W_F32, G2_W_BF16, G2_W_INT8, G2_W_BF16DP
    int g2_cpu_features()
    int g2_set_simd(int level)
    int g2_get_simd()
    int g2_have_openmp()
    double g2_set_parallel_threshold(double us)
    double G2_PAR_MIN_US_DEFAULT
    int g2_tune_malloc()
    int g2_linear(const float *x, int64_t M, int64_t K, int fmt, const void *w,
                  const float *scales, int64_t block, int64_t N, const float *bias,
                  float *y, int n_threads)
    int G2_MAX_PARTS
    int g2_linear_multi(const float *x, int64_t M, int64_t K, int fmt, int nparts, const void **w,
                        const float **scales, const int64_t *N, int64_t block, float **y,
                        int n_threads)
    void g2_dequantize_int4(const uint8_t *codes, const uint8_t *meta, int64_t N, int64_t K, float *out,
                            int n_threads)
    int g2_linear_int4(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint8_t *meta,
                       int64_t N, float *y, int n_threads)
    int g2_linear_int4_multi(const float *x, int64_t M, int64_t K, int nparts, const uint8_t **codes,
                             const uint8_t **meta, const int64_t *N, float **y, int n_threads)
    void g2_dequantize_q4_0(const uint8_t *codes, const uint16_t *scales, int64_t N, int64_t K, float *out,
                            int n_threads)
    int g2_linear_q4_0(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales,
                       int64_t N, float *y, int n_threads)
    int g2_linear_q4_0_multi(const float *x, int64_t M, int64_t K, int nparts, const uint8_t **codes,
                             const uint16_t **scales, const int64_t *N, float **y, int n_threads)
    void g2_f32_to_bf16(const float *x, uint16_t *out, int64_t n, int n_threads)
    void g2_quantize_int8(const void *w, int src_bf16, int64_t N, int64_t K, int64_t block, int8_t *q,
                          float *scales, int n_threads)
    int g2_quantize_int4(const void *w, int src_bf16, int64_t N, int64_t K, uint8_t *codes,
                         uint8_t *meta, uint8_t *status, int n_threads)
    int g2_attention(const float *q, int64_t qsb, int64_t qsh, int64_t qst, const void *k,
                     const void *v, int kv_bf16, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb,
                     int64_t vsh, int64_t vss, const int64_t *q_pos, const int64_t *k_pos,
                     const uint8_t *key_valid, int64_t B, int64_t Hq, int64_t Hkv, int64_t T,
                     int64_t S, int64_t D, float scaling, float softcap, int64_t window, float *out,
                     int n_threads)
    void g2_rmsnorm(const float *x, const float *w, int64_t R, int64_t D, float eps, float *out,
                    int n_threads)
    void g2_geglu(const float *gate, const float *up, int64_t n, int approximate, float *out,
                  int n_threads)
    void g2_rope(const float *x, const float *cos_, const float *sin_, int64_t B, int64_t H,
                 int64_t T, int64_t D, int64_t Bc, float *out, int n_threads)
    void g2_softcap(const float *x, int64_t n, float cap, float *out, int n_threads)
    void g2_tanh(const float *x, int64_t n, float *out, int n_threads)
    void g2_exp(const float *x, int64_t n, float *out, int n_threads)
    void g2_argmax(const float *x, int64_t R, int64_t V, int64_t *out, int n_threads)
    void g2_topk(const float *x, int64_t R, int64_t V, int64_t k, float *values,
                 int64_t *indices, int n_threads)

FORMATS = {"float32": G2_W_F32, "bfloat16": G2_W_BF16, "int8": G2_W_INT8,
           "bfloat16_dp": G2_W_BF16DP}

_FEATURE_NAMES = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512bf16", "avx512vnni"]


def cpu_features():
    """Names of the CPU features the C code detected."""
    cdef int f = g2_cpu_features()
    return [n for i, n in enumerate(_FEATURE_NAMES) if f & (1 << i)]


def set_simd(int level):
    """0 = force the portable scalar path, 1 = AVX-512 when available (with avx512_bf16 when
    present), 2 = AVX-512 without the avx512_bf16 instructions. Returns the level in use."""
    return g2_set_simd(level)


def get_simd():
    return g2_get_simd()


def have_openmp():
    return bool(g2_have_openmp())


PARALLEL_THRESHOLD_DEFAULT_US = G2_PAR_MIN_US_DEFAULT


def set_parallel_threshold(us):
    """Fan-out threshold in microseconds (process-wide): a kernel uses its n_threads only when its
    work, estimated on one thread, takes at least this long; smaller work stays on the calling
    thread (fork/join of small work collapses under load, issue 13). 0 = always fan out. Results
    are bitwise the same for any value. Returns the value now in effect."""
    if isinstance(us, bool) or not isinstance(us, (int, float, np.integer, np.floating)):
        raise TypeError("the threshold must be a number of microseconds")
    if not (0 <= us < 1e12):
        raise ValueError("the threshold must be in [0, 1e12) microseconds, got %r" % (us,))
    return g2_set_parallel_threshold(us)


def get_parallel_threshold():
    """The fan-out threshold in effect (microseconds): set_parallel_threshold's value, else the
    G2_PAR_MIN_US environment variable, else PARALLEL_THRESHOLD_DEFAULT_US."""
    return g2_set_parallel_threshold(-1.0)


def tune_malloc():
    """Keep activation-sized freed blocks in the heap (glibc mallopt; see gemma2np_kernels.h).
    Returns True when applied (glibc), False elsewhere."""
    return bool(g2_tune_malloc())


def _physical_cores():
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1
    cores = set()
    try:
        for c in cpus:
            base = "/sys/devices/system/cpu/cpu%d/topology/" % c
            with open(base + "core_id") as f1, open(base + "physical_package_id") as f2:
                cores.add((f1.read().strip(), f2.read().strip()))
    except OSError:
        return max(1, len(cpus))
    return max(1, len(cores))


def default_threads():
    """OMP_NUM_THREADS if set (first entry), else the number of physical cores we may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env:
        try:
            n = int(env)
            if n > 0:
                return n
        except ValueError:
            pass
    return _physical_cores()


cdef int _threads(n_threads) except -1:
    if n_threads is None:
        return default_threads()
    if not isinstance(n_threads, (int, np.integer)) or isinstance(n_threads, bool):
        raise TypeError("n_threads must be an int or None")
    if n_threads < 1 or n_threads > 1024:
        raise ValueError("n_threads must be in [1, 1024], got %r" % (n_threads,))
    return <int>n_threads


cdef _check(a, str name, dtype, int ndim=-1):
    if not isinstance(a, np.ndarray):
        raise TypeError("%s must be a numpy.ndarray, got %s" % (name, type(a).__name__))
    if a.dtype != dtype:
        raise TypeError("%s must have dtype %s, got %s" % (name, np.dtype(dtype), a.dtype))
    if ndim >= 0 and a.ndim != ndim:
        raise ValueError("%s must be %d-D, got shape %s" % (name, ndim, a.shape))
    if not a.flags.c_contiguous:
        raise ValueError("%s must be C-contiguous" % name)


cdef _out(out, shape, dtype, str name="out"):
    if out is None:
        return np.empty(shape, dtype=dtype)
    _check(out, name, dtype)
    if tuple(out.shape) != tuple(shape):
        raise ValueError("%s must have shape %s, got %s" % (name, tuple(shape), out.shape))
    if not out.flags.writeable:
        raise ValueError("%s must be writeable" % name)
    return out


def f32_to_bf16(x, n_threads=None):
    """float32 -> bf16 bits (uint16), round to nearest even."""
    _check(x, "x", np.float32)
    cdef int nt = _threads(n_threads)
    out = np.empty(x.shape, dtype=np.uint16)
    cdef cnp.ndarray xa = x, oa = out
    cdef int64_t n = x.size
    with nogil:
        g2_f32_to_bf16(<const float *>cnp.PyArray_DATA(xa), <uint16_t *>cnp.PyArray_DATA(oa), n, nt)
    return out


def quantize_int8(w, int block=32, n_threads=None):
    """W (N, K) float32, or bf16 bits as uint16 -> (q int8 (N, K), scales float32 (N, ceil(K/block))):
    symmetric absmax per (row, block), exactly kernels.reference.quantize_int8."""
    if block <= 0 or block % 16 or block > 1024:
        raise ValueError("block must be a positive multiple of 16 up to 1024, got %r" % (block,))
    w = np.asarray(w)
    if w.dtype == np.uint16:
        _check(w, "w", np.uint16, 2)
    else:
        _check(w, "w", np.float32, 2)
    cdef int src_bf16 = 1 if w.dtype == np.uint16 else 0
    cdef int64_t N = w.shape[0], K = w.shape[1], blk = block
    cdef int64_t nb = (K + blk - 1) // blk
    cdef int nt = _threads(n_threads)
    q = np.empty((N, K), dtype=np.int8)
    sc = np.empty((N, nb), dtype=np.float32)
    cdef cnp.ndarray wa = w, qa = q, sa = sc
    with nogil:
        g2_quantize_int8(<const void *>cnp.PyArray_DATA(wa), src_bf16, N, K, blk,
                         <int8_t *>cnp.PyArray_DATA(qa), <float *>cnp.PyArray_DATA(sa), nt)
    return q, sc



def quantize_int4(w, n_threads=None):
    """W (N, K) float32, or bf16 bits as uint16, K a multiple of 256 -> (codes uint8 (N, K/2), meta
    uint8 (N, K/256*16), status uint8 (N,)): exactly kernels.int4._quantize (status per row: 0 ok,
    1 NaN/inf, 2 too large for int4; int4.check_status raises for them)."""
    w = np.asarray(w)
    if w.dtype == np.uint16:
        _check(w, "w", np.uint16, 2)
    else:
        _check(w, "w", np.float32, 2)
    cdef int64_t N = w.shape[0], K = w.shape[1]
    if K % 256 or K == 0:
        raise ValueError("int4 weights need in_features a positive multiple of 256, got %d" % K)
    cdef int src_bf16 = 1 if w.dtype == np.uint16 else 0
    cdef int nt = _threads(n_threads)
    codes = np.empty((N, K // 2), dtype=np.uint8)
    meta = np.empty((N, K // 256 * 16), dtype=np.uint8)
    status = np.empty(N, dtype=np.uint8)
    cdef cnp.ndarray wa = w, ca = codes, ma = meta, sa = status
    with nogil:
        g2_quantize_int4(<const void *>cnp.PyArray_DATA(wa), src_bf16, N, K, <uint8_t *>cnp.PyArray_DATA(ca),
                         <uint8_t *>cnp.PyArray_DATA(ma), <uint8_t *>cnp.PyArray_DATA(sa), nt)
    return codes, meta, status

def linear(x, w, str fmt="float32", scales=None, bias=None, int block=0, n_threads=None, out=None):
    """y = x @ W^T (+ bias).

    x: (M, K) float32. fmt "float32": w (N, K) float32; "bfloat16" / "bfloat16_dp": w (N, K)
    uint16 bf16 bits; "int8": w (N, K) int8, scales (N, ceil(K/block)) float32, block a
    positive multiple of 16. bias: (N,) float32 or None. Returns (M, N) float32.
    """
    if fmt not in FORMATS:
        raise ValueError("fmt must be one of %s, got %r" % (sorted(FORMATS), fmt))
    cdef int f = FORMATS[fmt]
    _check(x, "x", np.float32, 2)
    wdt = {G2_W_F32: np.float32, G2_W_BF16: np.uint16, G2_W_BF16DP: np.uint16, G2_W_INT8: np.int8}[f]
    _check(w, "w", wdt, 2)
    cdef int64_t M = x.shape[0], K = x.shape[1], N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError("w must have shape (N, %d), got %s" % (K, w.shape))
    cdef int64_t nb = 0
    cdef cnp.ndarray sa = None
    if f == G2_W_INT8:
        if block <= 0 or block % 16 != 0:
            raise ValueError("int8 block must be a positive multiple of 16, got %d" % block)
        nb = (K + block - 1) // block
        if scales is None:
            raise ValueError("int8 weights need scales")
        _check(scales, "scales", np.float32, 2)
        if scales.shape[0] != N or scales.shape[1] != nb:
            raise ValueError("scales must have shape (%d, %d), got %s" % (N, nb, scales.shape))
        sa = scales
    elif scales is not None:
        raise ValueError("scales are only used with fmt='int8'")
    cdef cnp.ndarray ba = None
    if bias is not None:
        _check(bias, "bias", np.float32, 1)
        if bias.shape[0] != N:
            raise ValueError("bias must have shape (%d,), got %s" % (N, bias.shape))
        ba = bias
    cdef int nt = _threads(n_threads)
    y = _out(out, (M, N), np.float32)
    cdef cnp.ndarray xa = x, wa = w, ya = y
    cdef const float *sp = NULL if sa is None else <const float *>cnp.PyArray_DATA(sa)
    cdef const float *bp = NULL if ba is None else <const float *>cnp.PyArray_DATA(ba)
    cdef int rc
    with nogil:
        rc = g2_linear(<const float *>cnp.PyArray_DATA(xa), M, K, f, cnp.PyArray_DATA(wa), sp,
                       block, N, bp, <float *>cnp.PyArray_DATA(ya), nt)
    if rc != 0:
        raise MemoryError("g2_linear: out of memory")
    return y


def _check_int4(codes, meta):
    _check(codes, "codes", np.uint8, 2)
    _check(meta, "meta", np.uint8, 2)
    cdef int64_t N = codes.shape[0], K = 2 * codes.shape[1]
    if K == 0 or K % 256:
        raise ValueError("int4 codes must have shape (N, K/2) with K a multiple of 256, got %s" % (codes.shape,))
    if meta.shape[0] != N or meta.shape[1] != K // 256 * 16:
        raise ValueError("int4 meta must have shape (%d, %d), got %s" % (N, K // 256 * 16, meta.shape))
    return N, K


def dequantize_int4(codes, meta, n_threads=None):
    """int4 (codes uint8 (N, K/2), meta uint8 (N, K/256*16)) -> float32 (N, K); exactly
    kernels.int4.dequantize_int4."""
    N, K = _check_int4(codes, meta)
    cdef int nt = _threads(n_threads)
    out = np.empty((N, K), dtype=np.float32)
    cdef cnp.ndarray ca = codes, ma = meta, oa = out
    cdef int64_t n = N, k = K
    with nogil:
        g2_dequantize_int4(<const uint8_t *>cnp.PyArray_DATA(ca), <const uint8_t *>cnp.PyArray_DATA(ma), n, k,
                           <float *>cnp.PyArray_DATA(oa), nt)
    return out


def _check_q4_0(codes, scales):
    _check(codes, "codes", np.uint8, 2)
    _check(scales, "scales", np.uint16, 2)
    cdef int64_t N = codes.shape[0], K = 2 * codes.shape[1]
    if K == 0 or K % 32:
        raise ValueError("q4_0 codes must have shape (N, K/2) with K a multiple of 32, got %s" % (codes.shape,))
    if scales.shape[0] != N or scales.shape[1] != K // 32:
        raise ValueError("q4_0 scales must have shape (%d, %d), got %s" % (N, K // 32, scales.shape))
    return N, K


def dequantize_q4_0(codes, scales, n_threads=None):
    """q4_0 (codes uint8 (N, K/2), scales uint16 f16 bits (N, K/32)) -> float32 (N, K); exactly
    kernels.q4_0.dequantize_q4_0."""
    N, K = _check_q4_0(codes, scales)
    cdef int nt = _threads(n_threads)
    out = np.empty((N, K), dtype=np.float32)
    cdef cnp.ndarray ca = codes, sa = scales, oa = out
    cdef int64_t n = N, k = K
    with nogil:
        g2_dequantize_q4_0(<const uint8_t *>cnp.PyArray_DATA(ca), <const uint16_t *>cnp.PyArray_DATA(sa), n, k,
                           <float *>cnp.PyArray_DATA(oa), nt)
    return out


def linear_q4_0(x, codes, scales, bias=None, n_threads=None, out=None):
    """y = x @ W^T (+ bias), W in the q4_0 layout (kernels/q4_0.py, llama.cpp's Q4_0 blocks); x (M, K)
    float32. Bitwise kernels.q4_0.linear with fewer than DP_MIN_M rows. Returns (M, N) float32."""
    _check(x, "x", np.float32, 2)
    N, K = _check_q4_0(codes, scales)
    if x.shape[1] != K:
        raise ValueError("x has %d features, the q4_0 weights expect %d" % (x.shape[1], K))
    if bias is not None:
        _check(bias, "bias", np.float32, 1)
        if bias.shape[0] != N:
            raise ValueError("bias must have shape (%d,), got %s" % (N, bias.shape))
    cdef int64_t M = x.shape[0], n = N, k = K
    cdef int nt = _threads(n_threads)
    y = _out(out, (M, N), np.float32)
    cdef cnp.ndarray xa = x, ca = codes, sa = scales, ya = y
    cdef int rc
    with nogil:
        rc = g2_linear_q4_0(<const float *>cnp.PyArray_DATA(xa), M, k, <const uint8_t *>cnp.PyArray_DATA(ca),
                            <const uint16_t *>cnp.PyArray_DATA(sa), n, <float *>cnp.PyArray_DATA(ya), nt)
    if rc != 0:
        raise MemoryError("g2_linear_q4_0: out of memory")
    if bias is not None:
        y += bias
    return y


cdef list _quant_parts(int64_t M, int64_t K, list codes, list second, check, str kind,
                       const uint8_t **cp, const void **sp, int64_t *Np, float **yp):
    """The pointers of linear_int4_multi / linear_q4_0_multi's matrices (codes and their meta / scales,
    each checked by `check`, K columns) and their (M, N_i) float32 outputs, which it returns."""
    cdef cnp.ndarray a
    ys = []
    for i in range(len(codes)):
        n_i, k_i = check(codes[i], second[i])
        if k_i != K:
            raise ValueError("x has %d features, %s matrix %d expects %d" % (K, kind, i, k_i))
        Np[i] = n_i
        a = codes[i]
        cp[i] = <const uint8_t *>cnp.PyArray_DATA(a)
        a = second[i]
        sp[i] = <const void *>cnp.PyArray_DATA(a)
        y = np.empty((M, n_i), np.float32)
        ys.append(y)
        a = y
        yp[i] = <float *>cnp.PyArray_DATA(a)
    return ys


def linear_q4_0_multi(x, codes, scales, n_threads=None):
    """[linear_q4_0(x, c, s) for c, s in zip(codes, scales)] in one call: x is quantised once (decode)
    and every matrix's row blocks share one parallel loop; each result equals linear_q4_0's exactly.
    1..G2_MAX_PARTS matrices with K columns. Returns a list of (M, N_i)."""
    _check(x, "x", np.float32, 2)
    codes, scales = list(codes), list(scales)
    cdef int P = len(codes)
    if P < 1 or P > G2_MAX_PARTS or len(scales) != P:
        raise ValueError("linear_q4_0_multi takes 1..%d (codes, scales) pairs, got %d codes and %d scales"
                         % (G2_MAX_PARTS, P, len(scales)))
    cdef int64_t M = x.shape[0], K = x.shape[1]
    cdef const uint8_t *cp[16]
    cdef const void *sp[16]
    cdef float *yp[16]
    cdef int64_t Np[16]
    ys = _quant_parts(M, K, codes, scales, _check_q4_0, "q4_0", cp, sp, Np, yp)
    cdef int nt = _threads(n_threads)
    cdef cnp.ndarray xa = x
    cdef int rc
    with nogil:
        rc = g2_linear_q4_0_multi(<const float *>cnp.PyArray_DATA(xa), M, K, P, cp, <const uint16_t **>sp, Np, yp,
                                  nt)
    if rc != 0:
        raise MemoryError("g2_linear_q4_0_multi: out of memory")
    return ys


def linear_int4(x, codes, meta, bias=None, n_threads=None, out=None):
    """y = x @ W^T (+ bias), W in the int4 layout (kernels/int4.py); x (M, K) float32. With fewer
    than DP_MIN_M rows x is quantised to int8 per 32 inputs and meets the codes in integer dot
    products (bitwise kernels.int4.linear_decode); with more W acts as bf16 of its float32
    dequantisation and x is rounded to bf16 (as int8). Returns (M, N) float32."""
    _check(x, "x", np.float32, 2)
    N, K = _check_int4(codes, meta)
    if x.shape[1] != K:
        raise ValueError("x has %d features, the int4 weights expect %d" % (x.shape[1], K))
    if bias is not None:
        _check(bias, "bias", np.float32, 1)
        if bias.shape[0] != N:
            raise ValueError("bias must have shape (%d,), got %s" % (N, bias.shape))
    cdef int64_t M = x.shape[0], n = N, k = K
    cdef int nt = _threads(n_threads)
    y = _out(out, (M, N), np.float32)
    cdef cnp.ndarray xa = x, ca = codes, ma = meta, ya = y
    cdef int rc
    with nogil:
        rc = g2_linear_int4(<const float *>cnp.PyArray_DATA(xa), M, k, <const uint8_t *>cnp.PyArray_DATA(ca),
                            <const uint8_t *>cnp.PyArray_DATA(ma), n, <float *>cnp.PyArray_DATA(ya), nt)
    if rc != 0:
        raise MemoryError("g2_linear_int4: out of memory")
    if bias is not None:
        y += bias
    return y


MAX_PARTS = G2_MAX_PARTS


def linear_int4_multi(x, codes, metas, n_threads=None):
    """[linear_int4(x, c, m) for c, m in zip(codes, metas)] in one call: x is quantised (decode) or
    packed (prefill) once and every matrix's row blocks share one parallel loop; each result equals
    linear_int4's exactly. 1..G2_MAX_PARTS matrices with K columns. Returns a list of (M, N_i)."""
    _check(x, "x", np.float32, 2)
    codes, metas = list(codes), list(metas)
    cdef int P = len(codes)
    if P < 1 or P > G2_MAX_PARTS or len(metas) != P:
        raise ValueError("linear_int4_multi takes 1..%d (codes, meta) pairs, got %d codes and %d metas"
                         % (G2_MAX_PARTS, P, len(metas)))
    cdef int64_t M = x.shape[0], K = x.shape[1]
    cdef const uint8_t *cp[16]
    cdef const void *mp[16]
    cdef float *yp[16]
    cdef int64_t Np[16]
    ys = _quant_parts(M, K, codes, metas, _check_int4, "int4", cp, mp, Np, yp)
    cdef int nt = _threads(n_threads)
    cdef cnp.ndarray xa = x
    cdef int rc
    with nogil:
        rc = g2_linear_int4_multi(<const float *>cnp.PyArray_DATA(xa), M, K, P, cp, <const uint8_t **>mp, Np, yp, nt)
    if rc != 0:
        raise MemoryError("g2_linear_int4_multi: out of memory")
    return ys


def linear_multi(x, ws, str fmt="float32", scales=None, int block=0, n_threads=None):
    """[x @ W^T for W in ws] in one call (the parts share one split of x and one parallel loop);
    each result equals linear(x, W, fmt, scales[i], block=block) exactly. ws: a sequence of
    1..G2_MAX_PARTS matrices of the same format with K columns; scales: a matching sequence
    for fmt="int8", else None. Returns a list of (M, N_i) float32 arrays."""
    if fmt not in FORMATS:
        raise ValueError("fmt must be one of %s, got %r" % (sorted(FORMATS), fmt))
    cdef int f = FORMATS[fmt]
    _check(x, "x", np.float32, 2)
    ws = list(ws)
    cdef int P = len(ws)
    if P < 1 or P > G2_MAX_PARTS:
        raise ValueError("linear_multi takes 1..%d matrices, got %d" % (G2_MAX_PARTS, P))
    cdef int64_t M = x.shape[0], K = x.shape[1]
    wdt = {G2_W_F32: np.float32, G2_W_BF16: np.uint16, G2_W_BF16DP: np.uint16, G2_W_INT8: np.int8}[f]
    if f == G2_W_INT8:
        if block <= 0 or block % 16 != 0:
            raise ValueError("int8 block must be a positive multiple of 16, got %d" % block)
        if scales is None or len(scales) != P:
            raise ValueError("int8 weights need one scales array per matrix")
        scales = list(scales)
    elif scales is not None:
        raise ValueError("scales are only used with fmt='int8'")
    cdef int64_t nb = (K + block - 1) // block if f == G2_W_INT8 else 0
    cdef const void *wp[16]
    cdef const float *sp[16]
    cdef float *yp[16]
    cdef int64_t Np[16]
    cdef cnp.ndarray a
    ys = []
    for i in range(P):
        _check(ws[i], "ws[%d]" % i, wdt, 2)
        if ws[i].shape[1] != K:
            raise ValueError("ws[%d] must have shape (N, %d), got %s" % (i, K, ws[i].shape))
        Np[i] = ws[i].shape[0]
        a = ws[i]
        wp[i] = cnp.PyArray_DATA(a)
        sp[i] = NULL
        if f == G2_W_INT8:
            _check(scales[i], "scales[%d]" % i, np.float32, 2)
            if scales[i].shape[0] != Np[i] or scales[i].shape[1] != nb:
                raise ValueError("scales[%d] must have shape (%d, %d), got %s"
                                 % (i, Np[i], nb, scales[i].shape))
            a = scales[i]
            sp[i] = <const float *>cnp.PyArray_DATA(a)
        y = np.empty((M, Np[i]), np.float32)
        ys.append(y)
        a = y
        yp[i] = <float *>cnp.PyArray_DATA(a)
    cdef int nt = _threads(n_threads)
    cdef cnp.ndarray xa = x
    cdef int rc
    with nogil:
        rc = g2_linear_multi(<const float *>cnp.PyArray_DATA(xa), M, K, f, P, wp,
                             sp if f == G2_W_INT8 else NULL, Np, block, yp, nt)
    if rc != 0:
        raise MemoryError("g2_linear_multi: out of memory")
    return ys


cdef _check_rows(a, str name, dtypes):
    """A 4-D array of one of `dtypes` whose last axis is contiguous (any other strides, in whole
    elements): returns its element strides of the first three axes."""
    if not isinstance(a, np.ndarray):
        raise TypeError("%s must be a numpy.ndarray, got %s" % (name, type(a).__name__))
    if a.dtype not in dtypes:
        raise TypeError("%s must have dtype %s, got %s" % (name, " or ".join(str(np.dtype(d)) for d in dtypes), a.dtype))
    if a.ndim != 4:
        raise ValueError("%s must be 4-D, got shape %s" % (name, a.shape))
    cdef int64_t isz = a.itemsize
    if a.shape[3] > 1 and a.strides[3] != isz:
        raise ValueError("%s must be contiguous along its last axis" % name)
    if any(st % isz for st in a.strides[:3]):
        raise ValueError("%s strides must be whole elements" % name)
    return a.strides[0] // isz, a.strides[1] // isz, a.strides[2] // isz


def attention(q, k, v, q_pos, k_pos, key_valid, double scaling, softcap=None, window=None,
              n_threads=None, out=None):
    """Fused attention, see gemma2np_kernels.h. q float32 (B,Hq,T,D); k, v (B,Hkv,S,D) both float32
    or both bf16 (uint16 bits, or ml_dtypes.bfloat16); q, k, v may be strided views (a cache
    buffer's) as long as their last axis is contiguous. key_valid: (B, S) bool/uint8 or None."""
    if isinstance(k, np.ndarray) and k.dtype.name == "bfloat16":
        k = k.view(np.uint16)
    if isinstance(v, np.ndarray) and v.dtype.name == "bfloat16":
        v = v.view(np.uint16)
    qsb, qsh, qst = _check_rows(q, "q", (np.float32,))
    ksb, ksh, kss = _check_rows(k, "k", (np.float32, np.uint16))
    vsb, vsh, vss = _check_rows(v, "v", (np.float32, np.uint16))
    if v.dtype != k.dtype:
        raise TypeError("k and v must have the same dtype, got %s and %s" % (k.dtype, v.dtype))
    _check(q_pos, "q_pos", np.int64, 1)
    _check(k_pos, "k_pos", np.int64, 1)
    cdef int64_t B = q.shape[0], Hq = q.shape[1], T = q.shape[2], D = q.shape[3]
    cdef int64_t Hkv = k.shape[1], S = k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError("k must have shape (%d, Hkv, S, %d), got %s" % (B, D, k.shape))
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError("v must have the shape of k %s, got %s" % (k.shape, v.shape))
    if Hkv <= 0 or Hq % Hkv != 0:
        raise ValueError("query heads (%d) must be a positive multiple of kv heads (%d)" % (Hq, Hkv))
    if q_pos.shape[0] != T:
        raise ValueError("q_pos must have shape (%d,), got %s" % (T, q_pos.shape))
    if k_pos.shape[0] != S:
        raise ValueError("k_pos must have shape (%d,), got %s" % (S, k_pos.shape))
    cdef cnp.ndarray kva = None
    if key_valid is not None:
        if isinstance(key_valid, np.ndarray) and key_valid.dtype == np.bool_:
            key_valid = key_valid.view(np.uint8)
        _check(key_valid, "key_valid", np.uint8, 2)
        if key_valid.shape[0] != B or key_valid.shape[1] != S:
            raise ValueError("key_valid must have shape (%d, %d), got %s" % (B, S, key_valid.shape))
        kva = key_valid
    if not np.isfinite(scaling):
        raise ValueError("scaling must be finite")
    cdef float cap = 0.0
    if softcap is not None:
        cap = float(softcap)
        if not np.isfinite(cap):
            raise ValueError("softcap must be finite")
    cdef int64_t win = 0
    if window is not None:
        win = int(window)
    cdef int nt = _threads(n_threads)
    o = _out(out, (B, Hq, T, D), np.float32)
    cdef cnp.ndarray qa = q, ka = k, va = v, qpa = q_pos, kpa = k_pos, oa = o
    cdef const uint8_t *kvp = NULL if kva is None else <const uint8_t *>cnp.PyArray_DATA(kva)
    cdef float sc = scaling
    cdef int bf = k.dtype == np.uint16
    cdef int64_t a0 = qsb, a1 = qsh, a2 = qst, b0 = ksb, b1 = ksh, b2 = kss, c0 = vsb, c1 = vsh, c2 = vss
    cdef int rc
    with nogil:
        rc = g2_attention(<const float *>cnp.PyArray_DATA(qa), a0, a1, a2,
                          <const void *>cnp.PyArray_DATA(ka), <const void *>cnp.PyArray_DATA(va), bf,
                          b0, b1, b2, c0, c1, c2, <const int64_t *>cnp.PyArray_DATA(qpa),
                          <const int64_t *>cnp.PyArray_DATA(kpa), kvp, B, Hq, Hkv, T, S, D, sc, cap,
                          win, <float *>cnp.PyArray_DATA(oa), nt)
    if rc != 0:
        raise MemoryError("g2_attention: out of memory")
    return o


def rmsnorm(x, w, double eps=1e-6, n_threads=None, out=None):
    """Gemma RMSNorm over the last axis: x * rsqrt(mean(x^2) + eps) * (1 + w), float32."""
    _check(x, "x", np.float32)
    _check(w, "w", np.float32, 1)
    if x.ndim < 1 or x.shape[x.ndim - 1] != w.shape[0]:
        raise ValueError("last axis of x %s must match w %s" % (x.shape, w.shape))
    if not eps >= 0:
        raise ValueError("eps must be >= 0")
    cdef int64_t D = w.shape[0]
    cdef int64_t R = x.size // D if D > 0 else 0
    cdef int nt = _threads(n_threads)
    o = _out(out, x.shape, np.float32)
    cdef cnp.ndarray xa = x, wa = w, oa = o
    cdef float e = eps
    with nogil:
        g2_rmsnorm(<const float *>cnp.PyArray_DATA(xa), <const float *>cnp.PyArray_DATA(wa), R, D,
                   e, <float *>cnp.PyArray_DATA(oa), nt)
    return o


def geglu(gate, up, approximate="tanh", n_threads=None, out=None):
    """act(gate) * up with act = gelu ("tanh" approximation or "none" = exact erf)."""
    _check(gate, "gate", np.float32)
    _check(up, "up", np.float32)
    if gate.shape != up.shape:
        raise ValueError("gate %s and up %s must have the same shape" % (gate.shape, up.shape))
    if approximate not in ("tanh", "none"):
        raise ValueError("approximate must be 'tanh' or 'none'")
    cdef int appr = 1 if approximate == "tanh" else 0
    cdef int nt = _threads(n_threads)
    o = _out(out, gate.shape, np.float32)
    cdef cnp.ndarray ga = gate, ua = up, oa = o
    cdef int64_t n = gate.size
    with nogil:
        g2_geglu(<const float *>cnp.PyArray_DATA(ga), <const float *>cnp.PyArray_DATA(ua), n, appr,
                 <float *>cnp.PyArray_DATA(oa), nt)
    return o


def rope(x, cos, sin, n_threads=None, out=None):
    """Rotate-half RoPE: x (B, H, T, D); cos/sin (T, D) or (B, T, D) or (1, T, D)."""
    _check(x, "x", np.float32, 4)
    _check(cos, "cos", np.float32)
    _check(sin, "sin", np.float32)
    cdef int64_t B = x.shape[0], H = x.shape[1], T = x.shape[2], D = x.shape[3]
    if D % 2 != 0:
        raise ValueError("head_dim must be even, got %d" % D)
    if cos.shape != sin.shape:
        raise ValueError("cos %s and sin %s must have the same shape" % (cos.shape, sin.shape))
    cdef int64_t Bc
    if cos.ndim == 2 and cos.shape == (T, D):
        Bc = 1
    elif cos.ndim == 3 and cos.shape[1:] == (T, D) and cos.shape[0] in (1, B):
        Bc = cos.shape[0]
    else:
        raise ValueError("cos/sin must have shape (T, D), (1, T, D) or (B, T, D) = %s, got %s"
                         % ((B, T, D), cos.shape))
    cdef int nt = _threads(n_threads)
    o = _out(out, x.shape, np.float32)
    cdef cnp.ndarray xa = x, ca = cos, sa = sin, oa = o
    with nogil:
        g2_rope(<const float *>cnp.PyArray_DATA(xa), <const float *>cnp.PyArray_DATA(ca),
                <const float *>cnp.PyArray_DATA(sa), B, H, T, D, Bc,
                <float *>cnp.PyArray_DATA(oa), nt)
    return o


def softcap(x, double cap, n_threads=None, out=None):
    """cap * tanh(x / cap); out may be x (in place)."""
    _check(x, "x", np.float32)
    if not (cap > 0 and np.isfinite(cap)):
        raise ValueError("cap must be a positive finite number, got %r" % cap)
    cdef int nt = _threads(n_threads)
    o = _out(out, x.shape, np.float32)
    cdef cnp.ndarray xa = x, oa = o
    cdef int64_t n = x.size
    cdef float c = cap
    with nogil:
        g2_softcap(<const float *>cnp.PyArray_DATA(xa), n, c, <float *>cnp.PyArray_DATA(oa), nt)
    return o


def _unary(int op, x, n_threads, out):
    _check(x, "x", np.float32)
    cdef int nt = _threads(n_threads)
    o = _out(out, x.shape, np.float32)
    cdef cnp.ndarray xa = x, oa = o
    cdef int64_t n = x.size
    with nogil:
        if op == 1:
            g2_tanh(<const float *>cnp.PyArray_DATA(xa), n, <float *>cnp.PyArray_DATA(oa), nt)
        else:
            g2_exp(<const float *>cnp.PyArray_DATA(xa), n, <float *>cnp.PyArray_DATA(oa), nt)
    return o


def tanh(x, n_threads=None, out=None):
    """tanh(x), float32 (AVX-512: polynomial + exp, a few ulp); out may be x."""
    return _unary(1, x, n_threads, out)


def exp(x, n_threads=None, out=None):
    """exp(x), float32 (AVX-512: Cody-Waite + polynomial + vscalefps, a few ulp); out may be x."""
    return _unary(2, x, n_threads, out)


def argmax(x, n_threads=None):
    """Argmax over the last axis (first maximum; first NaN wins) -> int64 of shape x.shape[:-1]."""
    _check(x, "x", np.float32)
    if x.ndim < 1 or x.shape[x.ndim - 1] == 0:
        raise ValueError("argmax needs a non-empty last axis, got shape %s" % (x.shape,))
    cdef int64_t V = x.shape[x.ndim - 1]
    cdef int64_t R = x.size // V
    cdef int nt = _threads(n_threads)
    o = np.empty(x.shape[:-1], dtype=np.int64)
    cdef cnp.ndarray xa = x, oa = o
    with nogil:
        g2_argmax(<const float *>cnp.PyArray_DATA(xa), R, V, <int64_t *>cnp.PyArray_DATA(oa), nt)
    return o


def topk(x, int k, n_threads=None):
    """Top-k over the last axis: (values float32, indices int64), each of shape (..., k),
    value-descending, ties by smaller index. NaN in x -> ValueError."""
    _check(x, "x", np.float32)
    if x.ndim < 1:
        raise ValueError("topk needs at least 1-D input")
    cdef int64_t V = x.shape[x.ndim - 1]
    if k < 1 or k > V:
        raise ValueError("k must be in [1, %d], got %d" % (V, k))
    if np.isnan(x).any():
        raise ValueError("topk input contains NaN")
    cdef int64_t R = x.size // V
    cdef int nt = _threads(n_threads)
    vals = np.empty(x.shape[:-1] + (k,), dtype=np.float32)
    idx = np.empty(x.shape[:-1] + (k,), dtype=np.int64)
    cdef cnp.ndarray xa = x, va = vals, ia = idx
    cdef int64_t kk = k
    with nogil:
        g2_topk(<const float *>cnp.PyArray_DATA(xa), R, V, kk, <float *>cnp.PyArray_DATA(va),
                <int64_t *>cnp.PyArray_DATA(ia), nt)
    return vals, idx
