/* Internals shared by the kernel files (not part of the API; see gemma2np_kernels.h for that).
 *
 * Files (one job each):
 *   g2_dispatch.c     CPU feature detection, SIMD level, thread policy, OpenMP and malloc settings
 *   g2_linear.c       linear: the scalar path and, next to it, the AVX-512 tiles it is tested against
 *   g2_linear_drive.c linear: how W is cut into blocks and spread over threads (no arithmetic)
 *   g2_attention.c    fused attention: scalar and AVX-512 helpers side by side
 *   g2_int4.c         linear with int4 weights: dequantise blocks of rows, run g2_linear on them
 *   g2_q4_0.c         linear with llama.cpp Q4_0 weights: fused decode lanes, bf16 prefill (as g2_int4.c)
 *   g2_int4_quant.c   the int4 quantiser (RMSE-optimal scales), bitwise its NumPy twin
 *   g2_elementwise.c  rmsnorm, GeGLU, RoPE, softcap / tanh / exp, argmax / top-k, f32 -> bf16
 *   g2_simd_math.h    AVX-512 exp / tanh / bf16 rounding shared by those files
 *
 * Build: plain -O3 (no -march, no -ffast-math), -ffp-contract=off so the scalar code rounds
 * exactly like NumPy; OpenMP when available. AVX-512 code lives in functions with a target
 * attribute and is only called when __builtin_cpu_supports says so. Symbols shared between the
 * files are hidden (G2_HIDDEN), so the extension exports only the g2_* API.
 */
#ifndef G2_INTERNAL_H
#define G2_INTERNAL_H

#include "gemma2np_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(G2_NO_SIMD)
#define G2_X86 1
#include <immintrin.h>
#else
#define G2_X86 0
#endif

#if defined(__GNUC__)
#define G2_HIDDEN __attribute__((visibility("hidden")))
#else
#define G2_HIDDEN
#endif

#define G2_MIN(a, b) ((a) < (b) ? (a) : (b))
#define G2_MAX(a, b) ((a) > (b) ? (a) : (b))
#define NT(n) ((n) > 0 ? (n) : 1)

#if G2_X86
#define G2_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")))
#define G2_TGT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2")))
#define G2_INLINE static inline __attribute__((always_inline))
#endif

/* ---- dispatch (g2_dispatch.c) ------------------------------------------------------------- */

/* the vdpbf16ps paths: SIMD level 1 on a CPU with avx512_bf16 */
static inline int g2_use_bf16dp(void) {
    return g2_get_simd() == 1 && (g2_cpu_features() & G2_CPU_AVX512BF16);
}

/* Thread policy: how many of nt threads to use for work estimated at `ns` nanoseconds on one
 * thread -- nt when ns >= the fan-out threshold (g2_set_parallel_threshold, default
 * G2_PAR_MIN_US_DEFAULT microseconds), else 1. Results never depend on it (every output element is
 * computed by one thread in a fixed order whatever the thread count), so it only moves time. */
G2_HIDDEN int g2_par_threads(int nt, double ns);

/* Rough single-thread costs behind the estimates (AVX-512 on the 2-vCPU EPYC of README's benchmark;
 * they only need to be right within ~2x: they decide "worth a fork/join or not", nothing else). */
#define G2_NS_PER_WBYTE 0.0625     /* streaming weights from DRAM: ~16 GB/s per core */
#define G2_NS_PER_MAC_F32 0.03     /* FMA tiles (f32 / widened weights), ~32 multiply-adds per ns */
#define G2_NS_PER_MAC_BF16DP 0.01  /* vdpbf16ps outer-product tiles, ~100 per ns */
#define G2_NS_PER_MAC_SCALAR 1.0   /* the portable scalar loops */
#define G2_NS_PER_EW_SIMD 0.25     /* an element-wise AVX-512 polynomial (tanh / exp / GeGLU) */
#define G2_NS_PER_EW_LIBM 5.0      /* tanhf / expf / erff from libm */
#define G2_NS_PER_ELEM 0.5         /* a plain loop over floats (rmsnorm, rope, argmax, ...) */

static inline int g2_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ---- bf16 (scalar; the AVX-512 twin is g2_rne_bf16_epi32 in g2_simd_math.h) --------------- */

/* IEEE half bits -> float32, exact (denormals normalised; inf/NaN kept): the f16 scales of the int4,
 * q4_0 and int4-quantiser kernels (one definition, so every kernel decodes a scale the same way) */
static inline float g2_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 31u, m = h & 0x3FFu, u;
    if (e == 31u) u = sign | 0x7F800000u | (m << 13);
    else if (e) u = sign | ((e + 112u) << 23) | (m << 13);
    else if (!m) u = sign;
    else {
        e = 113u;
        while (!(m & 0x400u)) { m <<= 1; e--; }
        u = sign | (e << 23) | ((m & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, NaN -> quiet NaN (ml_dtypes.bfloat16's rounding) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* ---- element-wise loops shared with attention (g2_elementwise.c) -------------------------- */
#if G2_X86
G2_HIDDEN G2_TGT void g2_exp_avx512(const float *x, float *out, int64_t n);
G2_HIDDEN G2_TGT void g2_softcap_avx512(const float *x, float *out, int64_t n, float cap);
#endif

#endif
