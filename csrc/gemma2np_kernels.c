/* gemma2np native kernels. See gemma2np_kernels.h for the API.
 *
 * Build: plain -O3 (no -march, no -ffast-math), -ffp-contract=off so the scalar code rounds
 * exactly like NumPy; OpenMP when available. AVX-512 code lives in functions with a
 * target attribute and is only called when __builtin_cpu_supports says so.
 */
#include "gemma2np_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(G2_NO_SIMD)
#define G2_X86 1
#include <immintrin.h>
#else
#define G2_X86 0
#endif

#define G2_MIN(a, b) ((a) < (b) ? (a) : (b))
#define G2_MAX(a, b) ((a) > (b) ? (a) : (b))
#define NT(n) ((n) > 0 ? (n) : 1)

/* ------------------------------------------------------------------------------------------ */
/* CPU features and dispatch                                                                   */
/* ------------------------------------------------------------------------------------------ */

static int g_features = -1;
static int g_simd = -1; /* -1: not decided yet */

int g2_cpu_features(void) {
    if (g_features >= 0) return g_features;
    int f = 0;
#if G2_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) f |= G2_CPU_AVX2;
    if (__builtin_cpu_supports("fma")) f |= G2_CPU_FMA;
    if (__builtin_cpu_supports("avx512f")) f |= G2_CPU_AVX512F;
    if (__builtin_cpu_supports("avx512bw")) f |= G2_CPU_AVX512BW;
    if (__builtin_cpu_supports("avx512vl")) f |= G2_CPU_AVX512VL;
#if __GNUC__ >= 11 || defined(__clang__)
    if (__builtin_cpu_supports("avx512bf16")) f |= G2_CPU_AVX512BF16;
#endif
    if (__builtin_cpu_supports("avx512vnni")) f |= G2_CPU_AVX512VNNI;
#endif
    g_features = f;
    return f;
}

static int have_avx512(void) {
    int need = G2_CPU_AVX512F | G2_CPU_AVX512BW | G2_CPU_AVX512VL | G2_CPU_FMA;
    return (g2_cpu_features() & need) == need;
}

int g2_set_simd(int level) {
    g_simd = (level > 0 && G2_X86 && have_avx512()) ? (level == 2 ? 2 : 1) : 0;
    return g_simd;
}

int g2_get_simd(void) {
    if (g_simd < 0) g2_set_simd(1);
    return g_simd;
}

static int use_bf16dp(void) {
    return g2_get_simd() == 1 && (g2_cpu_features() & G2_CPU_AVX512BF16);
}

int g2_have_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* glibc hands every freed block above M_MMAP_THRESHOLD (128 KB until a large mmap'd block is
 * freed) back to the kernel, so each activation of a forward pass -- (T, 9216) float32 is 4.7 MB
 * at T = 128 -- was mapped afresh and faulted in page by page: ~97,000 page faults and ~0.3 s of
 * kernel time per 128-token prefill of gemma-2-2b (the int8 load happened to raise the threshold
 * itself by freeing its 32 MB chunks, so only bf16/f32 models paid). */
int g2_tune_malloc(void) {
#if defined(__GLIBC__) && defined(M_MMAP_THRESHOLD) && defined(M_TRIM_THRESHOLD)
    int a = mallopt(M_MMAP_THRESHOLD, 32 << 20);
    int b = mallopt(M_TRIM_THRESHOLD, 64 << 20);
    return a == 1 && b == 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* bf16 helpers                                                                                */
/* ------------------------------------------------------------------------------------------ */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

void g2_f32_to_bf16(const float *x, uint16_t *out, int64_t n, int n_threads) {
    int64_t i;
#pragma omp parallel for schedule(static) num_threads(NT(n_threads)) if (n > 65536)
    for (i = 0; i < n; i++) out[i] = f32_to_bf16(x[i]);
}

/* ------------------------------------------------------------------------------------------ */
/* linear: portable path                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* dp != 0: the "rounded" semantics (see gemma2np_kernels.h): x was already rounded to bf16 by
 * the caller, int8 weights are rounded to bf16(q * scale). */
static inline float wval(int fmt, const void *w, const float *sc, int64_t n, int64_t k, int64_t K,
                         int64_t block, int64_t nb, int dp) {
    switch (fmt) {
    case G2_W_F32: return ((const float *)w)[n * K + k];
    case G2_W_INT8: {
        float v = (float)((const int8_t *)w)[n * K + k] * sc[n * nb + k / block];
        return dp ? bf16_to_f32(f32_to_bf16(v)) : v;
    }
    default: return bf16_to_f32(((const uint16_t *)w)[n * K + k]);
    }
}

static void linear_scalar(int fmt, int dp, const float *x, int64_t M, int64_t K, const void *w,
                          const float *sc, int64_t block, int64_t N, float *y, int nt) {
    int64_t nb = block > 0 ? (K + block - 1) / block : 0;
    int64_t n;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt)
    for (n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * K;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t k = 0; k < K; k++) acc[k & 7] += xr[k] * wval(fmt, w, sc, n, k, K, block, nb, dp);
            y[m * N + n] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        }
    }
}

void g2_quantize_int8(const void *w, int src_bf16, int64_t N, int64_t K, int64_t block, int8_t *q,
                      float *scales, int n_threads) {
    const int64_t nb = (K + block - 1) / block;
    int64_t n;
#pragma omp parallel for schedule(static) num_threads(NT(n_threads)) if (N * K > 65536)
    for (n = 0; n < N; n++) {
        for (int64_t b = 0; b < nb; b++) {
            const int64_t k0 = b * block, k1 = G2_MIN(K, k0 + block);
            float v[1024]; /* block <= 1024 (checked by the wrapper) */
            float amax = 0.0f;
            for (int64_t k = k0; k < k1; k++) {
                float x = src_bf16 ? bf16_to_f32(((const uint16_t *)w)[n * K + k]) : ((const float *)w)[n * K + k];
                v[k - k0] = x;
                float a = fabsf(x);
                amax = a > amax ? a : amax;
            }
            const float s = amax / 127.0f;
            scales[n * nb + b] = s;
            for (int64_t k = k0; k < k1; k++) {
                float r = s > 0.0f ? nearbyintf(v[k - k0] / s) : 0.0f;
                r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
                q[n * K + k] = (int8_t)r;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* linear: AVX-512 path                                                                        */
/* ------------------------------------------------------------------------------------------ */
#if G2_X86
#define G2_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")))
#define G2_TGT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2")))
#define G2_INLINE static inline __attribute__((always_inline))

#define MR_MAX 4
#define NR_MAX 8
#define NR_MAIN 4
#define G2_OP_NR 14

/* Scheduling knobs (set once from the environment, for experiments; defaults are the tuned
 * values): G2_GEMV_KB = target bytes of W per work item for M < G2_DP_MIN_M (default 64 KB). */
static int64_t g_gemv_bytes = -1;
static int g_pf = 1;
static int64_t gemv_bytes(void) {
    if (g_gemv_bytes < 0) {
        const char *s = getenv("G2_GEMV_KB");
        int64_t v = s ? atoll(s) : 0;
        g_gemv_bytes = (v > 0 ? v : 64) * 1024;
        s = getenv("G2_PF");
        g_pf = s ? atoi(s) : 1;
    }
    return g_gemv_bytes;
}

G2_INLINE G2_TGT __m512 load_w16(const int fmt, const void *w, int64_t off, __mmask16 msk,
                                 const int full, float scale) {
    if (fmt == G2_W_F32) {
        const float *p = (const float *)w + off;
        return full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(msk, p);
    } else if (fmt == G2_W_BF16) {
        const uint16_t *p = (const uint16_t *)w + off;
        __m256i h = full ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(msk, p);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
        const int8_t *p = (const int8_t *)w + off;
        __m128i b = full ? _mm_loadu_si128((const __m128i *)p) : _mm_maskz_loadu_epi8(msk, p);
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(scale));
    }
}

/* float32 -> bf16 bits in the low 16 bits of each 32-bit lane, RNE, NaN -> quiet NaN: exactly
 * f32_to_bf16 (denormals kept, unlike vcvtneps2bf16). */
G2_INLINE G2_TGT __m512i rne_bf16_epi32(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

/* x (M, K) float32 -> P bf16 planes per row, layout [m][p][K]: x ~= p0 + p1 + p2 with each
 * part the RNE bf16 rounding of what the previous parts left (residuals are exact in f32).
 * P = 1: x rounded to bf16; P = 3: x represented to ~2^-24 relative (exact for normal floats
 * whose parts stay normal). A non-finite part ends the split (residual 0). */
static G2_TGT void split_bf16(const float *x, int64_t M, int64_t K, int P, uint16_t *out, int nt) {
    int64_t m;
#pragma omp parallel for schedule(static) num_threads(nt) if (M * K >= 65536 && nt > 1)
    for (m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 msk = (K - k >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(msk, x + m * K + k);
            for (int p = 0; p < P; p++) {
                __m512i h = rne_bf16_epi32(v);
                _mm256_mask_storeu_epi16(out + (m * P + p) * K + k, msk, _mm512_cvtepi32_epi16(h));
                if (p + 1 < P) {
                    __m512 hv = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
                    __mmask16 fin = (__mmask16)~_mm512_fpclass_ps_mask(hv, 0x99); /* not NaN/inf */
                    v = _mm512_maskz_sub_ps(fin, v, hv);
                }
            }
        }
    }
}

/* One MR x NR tile of dot products over the full K (f32 / bf16-widened weights). Each output
 * element uses one 16-lane accumulator and the same instruction sequence whatever MR/NR/thread
 * count -> results do not depend on tiling, batch size or threads. */
/* PF: software-prefetch the W rows of the next tile (the NR rows after this one) at the same
 * offset: decode streams whole rows, and the hardware prefetcher restarts at every row. Into L2
 * (T1), not L1 (T0): the L1's few miss buffers capped a core at ~12 GB/s; with T1 the L2's
 * larger queue keeps enough lines in flight to stream at the memory's rate (int8 gemv over the
 * 2b model: 24-27 GB/s with T0, 33-50 GB/s with T1 on this host; benchmarks/README.md). */
#define G2_PF(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)

G2_INLINE G2_TGT void tile_avx512(const int fmt, const int MR, const int NR, const float *x,
                                  int64_t K, const void *w, float *y, int64_t ldy, const int PF) {
    __m512 acc[MR_MAX][NR_MAX];
    __m512 xv[MR_MAX];
    int m, n;
    for (m = 0; m < MR; m++)
        for (n = 0; n < NR; n++) acc[m][n] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        for (m = 0; m < MR; m++) xv[m] = _mm512_loadu_ps(x + m * K + k);
        if (PF && (fmt == G2_W_F32 || (k & 31) == 0))
            for (n = 0; n < NR; n++)
                G2_PF((const char *)w + ((NR + n) * K + k) * (fmt == G2_W_F32 ? 4 : 2));
        for (n = 0; n < NR; n++) {
            __m512 wv = load_w16(fmt, w, n * K + k, 0xFFFF, 1, 0.0f);
            for (m = 0; m < MR; m++) acc[m][n] = _mm512_fmadd_ps(xv[m], wv, acc[m][n]);
        }
    }
    if (k < K) {
        __mmask16 msk = (__mmask16)((1u << (K - k)) - 1u);
        for (m = 0; m < MR; m++) xv[m] = _mm512_maskz_loadu_ps(msk, x + m * K + k);
        for (n = 0; n < NR; n++) {
            __m512 wv = load_w16(fmt, w, n * K + k, msk, 0, 0.0f);
            for (m = 0; m < MR; m++) acc[m][n] = _mm512_fmadd_ps(xv[m], wv, acc[m][n]);
        }
    }
    for (m = 0; m < MR; m++)
        for (n = 0; n < NR; n++) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m][n]);
}

/* int8 weights, x float32 (M < G2_DP_MIN_M): per block of `block` inputs the products
 * x * float(q) are accumulated (16 lanes), then the block sum is scaled once:
 * acc += blocksum * scale. BLK > 0: compile-time block. */
G2_INLINE G2_TGT void tile_i8(const int NR, const int BLK, const float *x, int64_t K,
                              const int8_t *w, const float *sc, int64_t block, int64_t nb,
                              float *y, const int PF) {
    __m512 acc[NR_MAX], t[NR_MAX];
    int n;
    const int64_t bl = BLK > 0 ? BLK : block;
    for (n = 0; n < NR; n++) acc[n] = _mm512_setzero_ps();
    int64_t b = 0, k0 = 0;
    for (; k0 + bl <= K; k0 += bl, b++) {
        for (n = 0; n < NR; n++) t[n] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k0 + bl; k += 16) {
            __m512 xv = _mm512_loadu_ps(x + k);
            if (PF && (k & 63) == 0)
                for (n = 0; n < NR; n++) G2_PF(w + (NR + n) * K + k);
            if (PF && (k & 511) == 0) /* the next tile's scales: 16 blocks = one cache line */
                for (n = 0; n < NR; n++) G2_PF(sc + (NR + n) * nb + b);
            for (n = 0; n < NR; n++) {
                __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                    _mm_loadu_si128((const __m128i *)(w + n * K + k))));
                t[n] = _mm512_fmadd_ps(xv, q, t[n]);
            }
        }
        for (n = 0; n < NR; n++) acc[n] = _mm512_fmadd_ps(t[n], _mm512_set1_ps(sc[n * nb + b]), acc[n]);
    }
    if (k0 < K) { /* last, partial block */
        for (n = 0; n < NR; n++) t[n] = _mm512_setzero_ps();
        for (int64_t k = k0; k < K; k += 16) {
            __mmask16 msk = (K - k >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
            __m512 xv = _mm512_maskz_loadu_ps(msk, x + k);
            for (n = 0; n < NR; n++) {
                __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(msk, w + n * K + k)));
                t[n] = _mm512_fmadd_ps(xv, q, t[n]);
            }
        }
        for (n = 0; n < NR; n++) acc[n] = _mm512_fmadd_ps(t[n], _mm512_set1_ps(sc[n * nb + b]), acc[n]);
    }
    for (n = 0; n < NR; n++) y[n] = _mm512_reduce_add_ps(acc[n]);
}

/* bf16 x bf16 -> f32 with vdpbf16ps. x: P bf16 planes per row ([m][p][K]); each (row, part,
 * output) has its own accumulator; parts are summed (p0 + p1) + p2 before the lane reduction. */
G2_INLINE G2_TGT_BF16 void tile_dp(const int MR, const int NR, const int P, const uint16_t *x,
                                   int64_t K, const uint16_t *w, float *y, int64_t ldy,
                                   const int PF) {
    __m512 acc[MR_MAX][NR_MAX][3];
    __m512i xv[MR_MAX][3];
    int m, n, p;
    for (m = 0; m < MR; m++)
        for (n = 0; n < NR; n++)
            for (p = 0; p < P; p++) acc[m][n][p] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        for (m = 0; m < MR; m++)
            for (p = 0; p < P; p++) xv[m][p] = _mm512_loadu_si512((const void *)(x + (m * P + p) * K + k));
        if (PF)
            for (n = 0; n < NR; n++) G2_PF(w + (NR + n) * K + k);
        for (n = 0; n < NR; n++) {
            __m512i wv = _mm512_loadu_si512((const void *)(w + n * K + k));
            for (m = 0; m < MR; m++)
                for (p = 0; p < P; p++)
                    acc[m][n][p] = _mm512_dpbf16_ps(acc[m][n][p], (__m512bh)xv[m][p], (__m512bh)wv);
        }
    }
    if (k < K) {
        __mmask32 msk = (__mmask32)((1u << (K - k)) - 1u);
        for (m = 0; m < MR; m++)
            for (p = 0; p < P; p++) xv[m][p] = _mm512_maskz_loadu_epi16(msk, x + (m * P + p) * K + k);
        for (n = 0; n < NR; n++) {
            __m512i wv = _mm512_maskz_loadu_epi16(msk, w + n * K + k);
            for (m = 0; m < MR; m++)
                for (p = 0; p < P; p++)
                    acc[m][n][p] = _mm512_dpbf16_ps(acc[m][n][p], (__m512bh)xv[m][p], (__m512bh)wv);
        }
    }
    for (m = 0; m < MR; m++)
        for (n = 0; n < NR; n++) {
            __m512 s = acc[m][n][0];
            if (P > 1) s = _mm512_add_ps(s, acc[m][n][1]);
            if (P > 2) s = _mm512_add_ps(s, acc[m][n][2]);
            y[m * ldy + n] = _mm512_reduce_add_ps(s);
        }
}

/* Tile entry points: x, K, w, scales, block, nb, y, ldy. */
typedef void (*tile_fn)(const void *, int64_t, const void *, const float *, int64_t, int64_t,
                        float *, int64_t);

#define DEF_TILE(FMT, MR, NR)                                                                   \
    static G2_TGT __attribute__((noinline)) void tile_##FMT##_##MR##_##NR(                       \
        const void *x, int64_t K, const void *w, const float *sc, int64_t block, int64_t nb,     \
        float *y, int64_t ldy) {                                                                 \
        (void)sc; (void)block; (void)nb;                                                         \
        tile_avx512(FMT, MR, NR, (const float *)x, K, w, y, ldy, MR == 1 && NR > 1 && g_pf);                                \
    }
#define DEF_TILES(FMT) DEF_TILE(FMT, 4, 4) DEF_TILE(FMT, 4, 1) DEF_TILE(FMT, 1, 4) DEF_TILE(FMT, 1, 1)
DEF_TILES(0)
DEF_TILES(1)

#define DEF_TILE_I8(NR, BLK)                                                                    \
    static G2_TGT __attribute__((noinline)) void tile_i8_##NR##_##BLK(                           \
        const void *x, int64_t K, const void *w, const float *sc, int64_t block, int64_t nb,     \
        float *y, int64_t ldy) {                                                                 \
        (void)ldy;                                                                               \
        tile_i8(NR, BLK, (const float *)x, K, (const int8_t *)w, sc, block, nb, y, NR > 1 && g_pf);              \
    }
DEF_TILE_I8(4, 0)
DEF_TILE_I8(1, 0)
DEF_TILE_I8(4, 32)
DEF_TILE_I8(1, 32)

#define DEF_TILE_DP(MR, NR, P)                                                                  \
    static G2_TGT_BF16 __attribute__((noinline)) void tile_dp_##MR##_##NR##_##P(                 \
        const void *x, int64_t K, const void *w, const float *sc, int64_t block, int64_t nb,     \
        float *y, int64_t ldy) {                                                                 \
        (void)sc; (void)block; (void)nb;                                                         \
        tile_dp(MR, NR, P, (const uint16_t *)x, K, (const uint16_t *)w, y, ldy, MR == 1 && NR > 1 && g_pf);                 \
    }
DEF_TILE_DP(1, 1, 3)
DEF_TILE_DP(1, 8, 3)

/* Prefill with vdpbf16ps, outer-product form (oneDNN's layout): x is packed into panels of 16*MP
 * rows, xp[k2][16*MP] holding the bf16 pair (x[m, 2k2], x[m, 2k2+1]) of row m as one 32-bit
 * word; each of NR rows of W broadcasts its pair k2 against the panel, so accumulator (n, j)
 * holds y[m0 + 16j + lane, n] in lane order and runs over k2 in sequence: every output is
 * the same chain of vdpbf16ps whatever the tiling, panel, batch size or thread count. Needs only
 * 2 vector loads + NR broadcasts per 2*NR*MP instructions (the 4x4 dot-product tiles needed 8 loads
 * per 16 and ran ~8% slower). W rows are ldw apart. odd: K is odd, the last pair of each W row is
 * (w[K-1], 0), read as 16 bits so no byte past the row is touched. The M tail of a panel is masked
 * at the store. */
G2_INLINE G2_TGT_BF16 void tile_op(const int NR, const int MP, const uint32_t *xp, int64_t K2, int odd,
                                   const uint16_t *w, int64_t ldw, float *y, int64_t ldy, int64_t mvalid) {
    __m512 acc[G2_OP_NR][2];
    int n, j;
    for (n = 0; n < NR; n++)
        for (j = 0; j < MP; j++) acc[n][j] = _mm512_setzero_ps();
    const int64_t kf = K2 - odd; /* whole pairs */
    for (int64_t k2 = 0; k2 < kf; k2++) {
        __m512i x0 = _mm512_loadu_si512((const void *)(xp + k2 * 16 * MP));
        __m512i x1 = MP > 1 ? _mm512_loadu_si512((const void *)(xp + k2 * 16 * MP + 16)) : x0;
        for (n = 0; n < NR; n++) {
            uint32_t wp;
            memcpy(&wp, w + n * ldw + 2 * k2, 4);
            __m512i b = _mm512_set1_epi32((int)wp);
            acc[n][0] = _mm512_dpbf16_ps(acc[n][0], (__m512bh)x0, (__m512bh)b);
            if (MP > 1) acc[n][1] = _mm512_dpbf16_ps(acc[n][1], (__m512bh)x1, (__m512bh)b);
        }
    }
    if (odd) {
        __m512i x0 = _mm512_loadu_si512((const void *)(xp + kf * 16 * MP));
        __m512i x1 = MP > 1 ? _mm512_loadu_si512((const void *)(xp + kf * 16 * MP + 16)) : x0;
        for (n = 0; n < NR; n++) {
            __m512i b = _mm512_set1_epi32((int)w[n * ldw + 2 * kf]); /* w[K - 1] */
            acc[n][0] = _mm512_dpbf16_ps(acc[n][0], (__m512bh)x0, (__m512bh)b);
            if (MP > 1) acc[n][1] = _mm512_dpbf16_ps(acc[n][1], (__m512bh)x1, (__m512bh)b);
        }
    }
    /* out: the tile goes through an L1 buffer t[n][m] and leaves row by row, one masked store
     * of NR outputs per row (scattering each accumulator down a column of y cost ~25% of the
     * matmul: 16 stores to 16 distant lines per vector) */
    float t[G2_OP_NR * 32];
    for (n = 0; n < NR; n++)
        for (j = 0; j < MP; j++) _mm512_storeu_ps(t + n * 32 + 16 * j, acc[n][j]);
    const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(32));
    const __mmask16 nm = (__mmask16)((1u << NR) - 1u);
    const int64_t mrows = G2_MIN(mvalid, 16 * MP);
    for (int64_t m = 0; m < mrows; m++)
        _mm512_mask_storeu_ps(y + m * ldy, nm, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), nm, col, t + m, 4));
}

typedef void (*op_fn)(const uint32_t *, int64_t, int, const uint16_t *, int64_t, float *, int64_t, int64_t);
#define DEF_TILE_OP(NR, MP)                                                                      \
    static G2_TGT_BF16 __attribute__((noinline)) void tile_op_##NR##_##MP(                        \
        const uint32_t *xp, int64_t K2, int odd, const uint16_t *w, int64_t ldw, float *y, int64_t ldy, \
        int64_t mvalid) {                                                                          \
        tile_op(NR, MP, xp, K2, odd, w, ldw, y, ldy, mvalid);                                      \
    }
DEF_TILE_OP(14, 2) DEF_TILE_OP(8, 2) DEF_TILE_OP(4, 2) DEF_TILE_OP(2, 2) DEF_TILE_OP(1, 2)
DEF_TILE_OP(14, 1) DEF_TILE_OP(8, 1) DEF_TILE_OP(4, 1) DEF_TILE_OP(2, 1) DEF_TILE_OP(1, 1)
static const int g_op_nr[5] = {14, 8, 4, 2, 1};
static const op_fn g_op_tiles[2][5] = {
    {tile_op_14_1, tile_op_8_1, tile_op_4_1, tile_op_2_1, tile_op_1_1},
    {tile_op_14_2, tile_op_8_2, tile_op_4_2, tile_op_2_2, tile_op_1_2}};

/* x (M, K) float32 -> panels of 32 rows (the last one 16 if 16 rows or fewer remain), each
 * [K2][rows] of bf16 pairs (RNE, = f32_to_bf16), rows past M and the odd K's missing half 0.
 * Panel p starts at row 32p, at word offset 32p * K2. 32 inputs of a row at a time: rounded,
 * paired, and scattered down the panel's column for that row. */
static G2_TGT void pack_x_op(const float *x, int64_t M, int64_t K, uint32_t *xp, int nt) {
    const int64_t K2 = (K + 1) / 2, npan = (M + 31) / 32;
    int64_t p;
#pragma omp parallel for schedule(static) num_threads(nt) if (M * K >= 65536 && nt > 1)
    for (p = 0; p < npan; p++) {
        const int64_t m0 = 32 * p, rows = (M - m0 > 16) ? 32 : 16;
        uint32_t *dst = xp + m0 * K2;
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32((int)rows));
        for (int64_t i = 0; i < rows; i++) {
            const int64_t m = m0 + i;
            for (int64_t k2 = 0; k2 < K2; k2 += 16) {
                const int64_t k = 2 * k2;
                const int64_t nk = G2_MIN(32, K - k), npair = G2_MIN(16, K2 - k2);
                __m512i v = _mm512_setzero_si512();
                if (m < M) {
                    __mmask16 ma = nk >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nk) - 1u);
                    __mmask16 mb = nk >= 32 ? (__mmask16)0xFFFF : (nk > 16 ? (__mmask16)((1u << (nk - 16)) - 1u) : 0);
                    __m256i lo = _mm512_cvtepi32_epi16(rne_bf16_epi32(_mm512_maskz_loadu_ps(ma, x + m * K + k)));
                    __m256i hi = _mm512_cvtepi32_epi16(rne_bf16_epi32(_mm512_maskz_loadu_ps(mb, x + m * K + k + 16)));
                    v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                }
                __mmask16 ms = npair >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << npair) - 1u);
                _mm512_mask_i32scatter_epi32(dst + k2 * rows + i, ms, idx, v, 4);
            }
        }
    }
}


/* Widen rows [0, nr) of a bf16/int8 W block: to float32 (exactly load_w16's values), or, with
 * to_bf16 = 1, int8 to bf16(q * scale) (RNE) as uint16 bits, with to_bf16 = 2 as
 * float32 holding those bf16 values. */
static G2_TGT void widen_rows(int fmt, int to_bf16, const void *w, const float *sc, int64_t nr,
                              int64_t K, int64_t block, int64_t nb, void *dst) {
    for (int64_t n = 0; n < nr; n++) {
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 msk = (K - k >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
            float s = (fmt == G2_W_INT8) ? sc[n * nb + k / block] : 0.0f;
            __m512 v = load_w16(fmt, w, n * K + k, msk, 0, s);
            if (to_bf16 == 1)
                _mm256_mask_storeu_epi16((uint16_t *)dst + n * K + k, msk,
                                         _mm512_cvtepi32_epi16(rne_bf16_epi32(v)));
            else if (to_bf16 == 2) /* f32 holding bf16(q*s) */
                _mm512_mask_storeu_ps((float *)dst + n * K + k, msk,
                                      _mm512_castsi512_ps(_mm512_slli_epi32(rne_bf16_epi32(v), 16)));
            else
                _mm512_mask_storeu_ps((float *)dst + n * K + k, msk, v);
        }
    }
}

/* One output matrix of a (multi-)linear: y (M, N) = x @ w^T, w (N, K) with int8 scales sc. The
 * drivers run every part of a call in one parallel loop over their joint list of W blocks, so
 * q/k/v (or gate/up) share one split of x, one fork/join and one load balance. */
typedef struct {
    const char *w;
    const float *sc;
    int64_t N;
    float *y;
} g2_part;

/* global block jb -> part p and its block index; first[p] = first global block of part p */
static inline int part_of(const int64_t *first, int np, int64_t jb) {
    int p = 0;
    while (p + 1 < np && jb >= first[p + 1]) p++;
    return p;
}

/* global block jb of `rows` rows -> its part and the part's rows [*n0, *n1) */
static inline const g2_part *block_rows(const g2_part *parts, const int64_t *first, int np, int64_t jb,
                                        int64_t rows, int64_t *n0, int64_t *n1) {
    const int p = part_of(first, np, jb);
    *n0 = (jb - first[p]) * rows;
    *n1 = G2_MIN(parts[p].N, *n0 + rows);
    return &parts[p];
}

/* Per-thread scratch of the prefill drivers: one allocation for all threads, made before the
 * parallel region (so a failure is reported without any thread having started), sliced by
 * thread number. */
static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* widen_rows(G2_W_INT8, 1, ...) for the vdpbf16ps tiles, with the avx512_bf16 converter:
 * vcvtne2ps2bf16 rounds 32 values at once (RNE, quiet NaN: rne_bf16_epi32's bits) but flushes a
 * denormal q*s (a block with absmax < ~1e-36) to zero -- which vdpbf16ps does with a denormal
 * input anyway, so the products are the same as from widen_rows (tests/test_kernels.py,
 * test_int8_prefill_is_bf16_of_dequantised_weights, plants such blocks). Halves the cost of
 * widening, ~5% of an int8 prefill matmul. */
static G2_TGT_BF16 void widen_i8_bf16(const int8_t *w, const float *sc, int64_t nr, int64_t K,
                                      int64_t block, int64_t nb, uint16_t *dst, int64_t ldd) {
    for (int64_t n = 0; n < nr; n++) {
        int64_t k = 0;
        const int64_t kv = block % 32 == 0 ? K / block * block : 0; /* whole blocks: the tail starts on one */
        for (; k + 32 <= kv; k += 32) {
            __m512 s = _mm512_set1_ps(sc[n * nb + k / block]);
            __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(w + n * K + k)))), s);
            __m512 b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(w + n * K + k + 16)))), s);
            _mm512_storeu_si512((void *)(dst + n * ldd + k), (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
        if (k < K) widen_rows(G2_W_INT8, 1, w + n * K + k, sc + n * nb + k / block, 1, K - k, block, nb, dst + n * ldd + k);
    }
}

static int64_t count_blocks(const g2_part *parts, int np, int64_t rows) {
    int64_t t = 0;
    for (int p = 0; p < np; p++) t += (parts[p].N + rows - 1) / rows;
    return t;
}

/* Row blocks of the prefill drivers: ~256 KB of W rows (row_bytes each) per block, a multiple of
 * `unit` rows, at least 4 blocks per thread, and if possible a block count that splits evenly over
 * the threads (19 blocks on 2 threads left one idle for 1/19). Fills first[] (first global block
 * of each part, first[np] = the total) and returns the rows per block. */
static int64_t plan_blocks(const g2_part *parts, int np, int64_t row_bytes, int64_t unit, int nt,
                           int64_t *first) {
    int64_t nblk = (256 * 1024) / (row_bytes > 0 ? row_bytes : 1);
    nblk = nblk / unit * unit;
    if (nblk < unit) nblk = unit;
    while (nblk > unit && count_blocks(parts, np, nblk) < 4 * (int64_t)nt) nblk -= unit;
    if (nt > 1 && count_blocks(parts, np, nblk) % nt)
        for (int64_t b = nblk - unit; b >= nblk / 2 && b >= unit; b -= unit)
            if (count_blocks(parts, np, b) % nt == 0) {
                nblk = b;
                break;
            }
    first[0] = 0;
    for (int p = 0; p < np; p++) first[p + 1] = first[p] + (parts[p].N + nblk - 1) / nblk;
    return nblk;
}

/* Small M (M < G2_DP_MIN_M, or any M for the f32 weights' tiles when MR=1 is used): parallel
 * over blocks of W rows (~gemv_bytes() of weights each, static), every thread streams whole
 * contiguous blocks; inside a block each x row runs over all tiles of NR rows. */
static void gemv_drive(tile_fn main4, int NRM, tile_fn tail1, const void *x, int64_t xrow_bytes, int64_t M,
                       int64_t K, const g2_part *parts, int np, int64_t wrow_bytes, int64_t block,
                       int64_t nb, int nt) {
    int64_t Ntot = 0, first[G2_MAX_PARTS + 1];
    for (int p = 0; p < np; p++) Ntot += parts[p].N;
    int64_t rows = gemv_bytes() / (wrow_bytes > 0 ? wrow_bytes : 1);
    rows = rows / NRM * NRM;
    if (rows < NRM) rows = NRM;
    while (rows > NRM && (Ntot + rows - 1) / rows < 8 * (int64_t)nt) rows -= NRM;
    first[0] = 0;
    for (int p = 0; p < np; p++) first[p + 1] = first[p] + (parts[p].N + rows - 1) / rows;
    int64_t nblocks = first[np];
    int64_t jb;
    const char *xc = (const char *)x;
#pragma omp parallel for schedule(static) num_threads(nt) if (nblocks > 1 && nt > 1)
    for (jb = 0; jb < nblocks; jb++) {
        int64_t n0, n1;
        const g2_part *pt = block_rows(parts, first, np, jb, rows, &n0, &n1);
        const int64_t N = pt->N;
        for (int64_t m = 0; m < M; m++) {
            int64_t n = n0;
            for (; n + NRM <= n1; n += NRM)
                main4(xc + m * xrow_bytes, K, pt->w + n * wrow_bytes, pt->sc ? pt->sc + n * nb : NULL, block,
                      nb, pt->y + m * N + n, N);
            for (; n < n1; n++)
                tail1(xc + m * xrow_bytes, K, pt->w + n * wrow_bytes, pt->sc ? pt->sc + n * nb : NULL, block,
                      nb, pt->y + m * N + n, N);
        }
    }
}

/* Larger M: W is cut into blocks of ~256 KB (parallel over blocks, dynamic); each W block stays
 * in L2 while all x rows run over it (the x-chunk-outer order, MC rows of x kept in L2, was
 * measured slower: 152-175 vs 188-191 GFLOP/s/thread for bf16); every MR x NR tile reuses NR W
 * rows for MR x rows. widen_fmt >= 0: each W block is first converted (per thread scratch, once)
 * -- int8 -> bf16(q*s) for the dp tiles, or bf16/int8 -> f32 for the f32 tiles. The block size is
 * trimmed so the blocks split evenly over the threads. */
static int gemm_drive(const tile_fn tiles[2][2], const void *x, int64_t xrow_bytes, int64_t M,
                      int64_t K, const g2_part *parts, int np, int64_t wrow_bytes, int64_t block,
                      int64_t nb, int nt, int widen_fmt, int widen_to_bf16, int64_t trow_bytes) {
    int64_t first[G2_MAX_PARTS + 1];
    const int64_t nblk = plan_blocks(parts, np, trow_bytes, NR_MAIN, nt, first);
    const int64_t nblocks = first[np];
    const char *xc = (const char *)x;
    char *scratch_all = NULL;
    if (widen_fmt >= 0 && !(scratch_all = (char *)malloc((size_t)(nt * nblk * trow_bytes)))) return -1;
#pragma omp parallel num_threads(nt)
    {
        char *scratch = scratch_all ? scratch_all + (size_t)thread_id() * (size_t)(nblk * trow_bytes) : NULL;
        /* W block outer (it stays in L2 while every x row runs over it; x comes from L3):
         * measured faster for every format/shape than keeping an x chunk in L2 instead */
        int64_t jb;
#pragma omp for schedule(dynamic, 1)
        for (jb = 0; jb < nblocks; jb++) {
            int64_t n0, n1;
            const g2_part *pt = block_rows(parts, first, np, jb, nblk, &n0, &n1);
            const int64_t N = pt->N;
            const char *wblk = pt->w + n0 * wrow_bytes;
            const float *sblk = pt->sc ? pt->sc + n0 * nb : NULL;
            if (widen_fmt >= 0) {
                widen_rows(widen_fmt, widen_to_bf16, wblk, sblk, n1 - n0, K, block, nb, scratch);
                wblk = scratch;
                sblk = NULL;
            }
            int64_t m = 0;
            while (m < M) {
                int mr = (M - m >= 4) ? 1 : 0;
                int64_t n = n0;
                while (n < n1) {
                    int nr = (n1 - n >= NR_MAIN) ? 1 : 0;
                    tiles[mr][nr](xc + m * xrow_bytes, K, wblk + (n - n0) * trow_bytes,
                                  sblk ? sblk + (n - n0) * nb : NULL, block, nb, pt->y + m * N + n, N);
                    n += nr ? NR_MAIN : 1;
                }
                m += mr ? 4 : 1;
            }
        }
    }
    free(scratch_all);
    return 0;
}

/* The rounded (dp) semantics with vdpbf16ps: W blocks as in gemm_drive (int8 blocks widened to
 * bf16(q*s) first), each block run against every x panel with tile_op, NR = 14 rows at a time and
 * 8/4/2/1 for the block's tail. */
static int gemm_op_drive(const float *x, int64_t M, int64_t K, const g2_part *parts, int np,
                         int widen_int8, int64_t block, int64_t nb, int nt) {
    const int64_t K2 = (K + 1) / 2, npan = (M + 31) / 32;
    const int odd = (int)(K & 1);
    uint32_t *xp = (uint32_t *)malloc((size_t)(npan * 32 * K2) * sizeof(uint32_t));
    if (!xp) return -1;
    pack_x_op(x, M, K, xp, nt);
    const int64_t trow = K * 2; /* bf16 row bytes (int8 rows once widened) */
    /* rows 2 KB-multiples apart (K = 1024, 2048, ...) fall into the same few L1 sets and 14 of them
     * thrash its 8 ways (o_proj, K = 2048: 230 instead of 400 GFLOP/s): such blocks are copied
     * with one spare cache line per row first */
    const int pad = (trow % 2048) == 0;
    const int64_t ldw = pad ? K + 32 : K;
    int64_t first[G2_MAX_PARTS + 1];
    const int64_t nblk = plan_blocks(parts, np, trow, G2_OP_NR, nt, first);
    const int64_t nblocks = first[np];
    const size_t sbytes = (size_t)(nblk * ldw) * sizeof(uint16_t);
    uint16_t *scratch_all = NULL;
    if ((widen_int8 || pad) && !(scratch_all = (uint16_t *)malloc((size_t)nt * sbytes))) {
        free(xp);
        return -1;
    }
#pragma omp parallel num_threads(nt)
    {
        uint16_t *scratch = scratch_all ? (uint16_t *)((char *)scratch_all + (size_t)thread_id() * sbytes) : NULL;
        int64_t jb;
#pragma omp for schedule(dynamic, 1)
        for (jb = 0; jb < nblocks; jb++) {
            int64_t n0, n1;
            const g2_part *pt = block_rows(parts, first, np, jb, nblk, &n0, &n1);
            const int64_t N = pt->N;
            const uint16_t *wblk;
            if (widen_int8) {
                widen_i8_bf16((const int8_t *)pt->w + n0 * K, pt->sc + n0 * nb, n1 - n0, K, block, nb, scratch, ldw);
                wblk = scratch;
            } else if (pad) {
                for (int64_t r = 0; r < n1 - n0; r++)
                    memcpy(scratch + r * ldw, (const uint16_t *)pt->w + (n0 + r) * K, (size_t)trow);
                wblk = scratch;
            } else {
                wblk = (const uint16_t *)pt->w + n0 * K;
            }
            for (int64_t pn = 0; pn < npan; pn++) {
                const int64_t m0 = 32 * pn, left = M - m0;
                const int mp = left > 16 ? 1 : 0; /* 32- or 16-row panel */
                const uint32_t *xpp = xp + m0 * K2;
                int64_t n = n0;
                for (int v = 0; v < 5; v++) {
                    const int nr = g_op_nr[v];
                    for (; n + nr <= n1; n += nr)
                        g_op_tiles[mp][v](xpp, K2, odd, wblk + (n - n0) * ldw, ldw, pt->y + m0 * N + n, N, left);
                }
            }
        }
    }
    free(scratch_all);
    free(xp);
    return 0;
}

static const tile_fn g_tiles_f32[2][2] = {{tile_0_1_1, tile_0_1_4}, {tile_0_4_1, tile_0_4_4}};
static const tile_fn g_tiles_bf16w[2][2] = {{tile_1_1_1, tile_1_1_4}, {tile_1_4_1, tile_1_4_4}};

/* dp: the rounded semantics (x -> bf16; int8 W -> bf16(q*s)). Returns 0 or -1 (no memory). */
static int linear_avx512(int fmt, int dp, const float *x, int64_t M, int64_t K, const g2_part *parts,
                         int np, int64_t block, int nt) {
    int64_t nb = (fmt == G2_W_INT8) ? (K + block - 1) / block : 0;
    int64_t wbytes = fmt == G2_W_F32 ? 4 : (fmt == G2_W_INT8 ? 1 : 2);
    int bf = use_bf16dp();
    int rc = 0;
    if (fmt == G2_W_F32) {
        if (M < 4)
            gemv_drive(tile_0_1_4, 4, tile_0_1_1, x, K * 4, M, K, parts, np, K * 4, 0, 0, nt);
        else
            rc = gemm_drive(g_tiles_f32, x, K * 4, M, K, parts, np, K * 4, 0, 0, nt, -1, 0, K * 4);
        return rc;
    }
    if (!dp) { /* x stays float32 */
        if (fmt == G2_W_INT8) {
            int b32 = block == 32;
            gemv_drive(b32 ? tile_i8_4_32 : tile_i8_4_0, 4, b32 ? tile_i8_1_32 : tile_i8_1_0, x, K * 4, M,
                       K, parts, np, K, block, nb, nt);
            return 0;
        }
        /* bf16 weights */
        if (bf) { /* x split into 3 bf16 parts: vdpbf16ps at f32 accuracy */
            uint16_t *xs = (uint16_t *)malloc((size_t)(M * 3 * K) * sizeof(uint16_t));
            if (!xs) return -1;
            split_bf16(x, M, K, 3, xs, nt);
            gemv_drive(tile_dp_1_8_3, 8, tile_dp_1_1_3, xs, 3 * K * 2, M, K, parts, np, K * 2, 0, 0, nt);
            free(xs);
        } else {
            gemv_drive(tile_1_1_4, 4, tile_1_1_1, x, K * 4, M, K, parts, np, K * 2, 0, 0, nt);
        }
        return 0;
    }
    /* rounded semantics */
    if (bf) return gemm_op_drive(x, M, K, parts, np, fmt == G2_W_INT8, block, nb, nt);
    /* no avx512_bf16: rounded x in f32, f32 tiles (int8: widened to f32 of bf16(q*s)) */
    float *xr = (float *)malloc((size_t)(M * K) * sizeof(float));
    if (!xr) return -1;
    for (int64_t i = 0; i < M * K; i++) xr[i] = bf16_to_f32(f32_to_bf16(x[i]));
    if (fmt == G2_W_INT8)
        rc = gemm_drive(g_tiles_f32, xr, K * 4, M, K, parts, np, K * wbytes, block, nb, nt, G2_W_INT8, 2, K * 4);
    else
        rc = gemm_drive(g_tiles_bf16w, xr, K * 4, M, K, parts, np, K * 2, 0, 0, nt, -1, 0, K * 2);
    free(xr);
    return rc;
}
#endif /* G2_X86 */

int g2_linear_multi(const float *x, int64_t M, int64_t K, int fmt, int nparts, const void *const *w,
                    const float *const *scales, const int64_t *N, int64_t block, float *const *y,
                    int n_threads) {
    int nt = NT(n_threads);
    int rc = 0;
    if (M <= 0 || nparts <= 0) return 0;
    if (nparts > G2_MAX_PARTS) return -2;
    int dp = fmt == G2_W_BF16DP || ((fmt == G2_W_BF16 || fmt == G2_W_INT8) && M >= G2_DP_MIN_M);
    if (K <= 0) {
        for (int p = 0; p < nparts; p++)
            for (int64_t i = 0; i < M * N[p]; i++) y[p][i] = 0.0f;
        return 0;
    }
#if G2_X86
    if (g2_get_simd()) {
        g2_part parts[G2_MAX_PARTS];
        int np = 0;
        for (int p = 0; p < nparts; p++)
            if (N[p] > 0) {
                parts[np].w = (const char *)w[p];
                parts[np].sc = scales ? scales[p] : NULL;
                parts[np].N = N[p];
                parts[np].y = y[p];
                np++;
            }
        return np ? linear_avx512(fmt, dp, x, M, K, parts, np, block, nt) : 0;
    }
#endif
    const float *xs = x;
    float *xr = NULL;
    if (dp) {
        xr = (float *)malloc((size_t)(M * K) * sizeof(float));
        if (!xr) return -1;
        for (int64_t i = 0; i < M * K; i++) xr[i] = bf16_to_f32(f32_to_bf16(x[i]));
        xs = xr;
    }
    for (int p = 0; p < nparts; p++)
        if (N[p] > 0)
            linear_scalar(fmt == G2_W_BF16DP ? G2_W_BF16 : fmt, dp, xs, M, K, w[p], scales ? scales[p] : NULL,
                          block, N[p], y[p], nt);
    free(xr);
    return rc;
}

int g2_linear(const float *x, int64_t M, int64_t K, int fmt, const void *w, const float *scales,
              int64_t block, int64_t N, const float *bias, float *y, int n_threads) {
    if (M <= 0 || N <= 0) return 0;
    int rc = g2_linear_multi(x, M, K, fmt, 1, &w, &scales, &N, block, &y, n_threads);
    if (rc) return rc;
    if (bias) {
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] += bias[n];
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* attention                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static float dot_scalar(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; i++) acc[i & 7] += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}
static void scale_axpy_scalar(float *acc, float a, const float *v, float p, int64_t n) {
    /* acc = acc * a + p * v */
    for (int64_t i = 0; i < n; i++) acc[i] = acc[i] * a + p * v[i];
}

#if G2_X86

/* Vectorised exp and tanh (float32, no fast-math; see tests/test_kernels.py for the measured
 * max ulp error against NumPy over the whole float range).
 * exp: n = rint(x log2 e), r = x - n ln2 (Cody-Waite, ln2 in two parts), exp(r) =
 *      1 + r + r^2 P(r) (degree-5 minimax on [-ln2/2, ln2/2]), times 2^n with vscalefps
 *      (correct overflow to inf, gradual underflow); NaN propagates.
 * tanh: |x| < 0.5625: x + x^3 Q(x^2) (degree-5 minimax); else sign(x) (1 - 2 / (exp(2|x|) + 1))
 *      (no cancellation there: the subtracted term is <= 0.5), saturating to +-1. */
G2_INLINE G2_TGT __m512 g2_exp512(__m512 x) {
    __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 P = _mm512_set1_ps(1.9907526286704142e-4f);
    P = _mm512_fmadd_ps(P, r, _mm512_set1_ps(1.393364326228148e-3f));
    P = _mm512_fmadd_ps(P, r, _mm512_set1_ps(8.333286093519424e-3f));
    P = _mm512_fmadd_ps(P, r, _mm512_set1_ps(4.16664649792524e-2f));
    P = _mm512_fmadd_ps(P, r, _mm512_set1_ps(1.6666666756203666e-1f));
    P = _mm512_fmadd_ps(P, r, _mm512_set1_ps(5.00000001346175e-1f));
    __m512 p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(r, r), P, r), _mm512_set1_ps(1.0f));
    __m512 res = _mm512_scalef_ps(p, n);
    return _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

G2_INLINE G2_TGT __m512 g2_tanh512(__m512 x) {
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u));
    __m512 ax = _mm512_andnot_ps(sign, x);
    __m512 u = _mm512_mul_ps(x, x);
    __m512 Q = _mm512_set1_ps(2.4921316923409097e-3f);
    Q = _mm512_fmadd_ps(Q, u, _mm512_set1_ps(-8.502826311198341e-3f));
    Q = _mm512_fmadd_ps(Q, u, _mm512_set1_ps(2.1812895276501428e-2f));
    Q = _mm512_fmadd_ps(Q, u, _mm512_set1_ps(-5.396417629608254e-2f));
    Q = _mm512_fmadd_ps(Q, u, _mm512_set1_ps(1.3333322519679336e-1f));
    Q = _mm512_fmadd_ps(Q, u, _mm512_set1_ps(-3.3333333286779887e-1f));
    __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(x, u), Q, x);
    small = _mm512_or_ps(_mm512_andnot_ps(sign, small), _mm512_and_ps(x, sign)); /* tanh(-0) = -0 */
    __m512 e = g2_exp512(_mm512_add_ps(ax, ax));
    __m512 big = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                               _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
    big = _mm512_or_ps(big, _mm512_and_ps(x, sign));
    return _mm512_mask_mov_ps(big, _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.5625f), _CMP_LT_OQ), small);
}

static G2_TGT void exp_avx512(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(out + i, m, g2_exp512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

static G2_TGT void tanh_avx512(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(out + i, m, g2_tanh512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* cap * tanh(x / cap) */
static G2_TGT void softcap_avx512(const float *x, float *out, int64_t n, float cap) {
    __m512 c = _mm512_set1_ps(cap);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), c);
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(c, g2_tanh512(v)));
    }
}

/* ((0.5 g) (1 + tanh(beta (g + ((kappa g) g) g)))) up, the scalar code's operation order */
static G2_TGT void geglu_tanh_avx512(const float *gate, const float *up, float *out, int64_t n) {
    const __m512 beta = _mm512_set1_ps(0.7978845608028654f), kappa = _mm512_set1_ps(0.044715f);
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        __m512 c = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(kappa, g), g), g);
        __m512 t = g2_tanh512(_mm512_mul_ps(beta, _mm512_add_ps(g, c)));
        __m512 a = _mm512_mul_ps(_mm512_mul_ps(half, g), _mm512_add_ps(one, t));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, up + i)));
    }
}

/* scores of keys [s0, s1) for one query row: sbuf[s - s0] = softcap(q . k_s * scaling) for
 * visible keys (4 keys at a time: 4 independent FMA chains), 0 for the others. */
static G2_TGT void att_scores_avx512(const float *qr, const float *kb, int64_t s0, int64_t s1,
                                     int64_t D, float scaling, float softcap,
                                     const unsigned char *vis, float *sbuf) {
    int64_t s = s0;
    for (; s < s1; s += 4) {
        int nk = (int)G2_MIN(4, s1 - s);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const float *k0 = kb + s * D;
        const float *k1 = nk > 1 ? k0 + D : k0, *k2 = nk > 2 ? k0 + 2 * D : k0, *k3 = nk > 3 ? k0 + 3 * D : k0;
        int64_t d = 0;
        for (; d < D; d += 16) {
            __mmask16 m = (D - d >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
            __m512 qv = _mm512_maskz_loadu_ps(m, qr + d);
            a0 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k0 + d), a0);
            a1 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k1 + d), a1);
            a2 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k2 + d), a2);
            a3 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k3 + d), a3);
        }
        float r[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                      _mm512_reduce_add_ps(a3)};
        for (int j = 0; j < nk; j++) sbuf[s - s0 + j] = vis[s - s0 + j] ? r[j] * scaling : 0.0f;
    }
    if (softcap > 0.0f) softcap_avx512(sbuf, sbuf, s1 - s0, softcap);
}

/* acc[0:D) += p * v */
static G2_TGT void axpy_avx512(float *acc, float p, const float *v, int64_t D) {
    __m512 pv = _mm512_set1_ps(p);
    for (int64_t d = 0; d < D; d += 16) {
        __mmask16 m = (D - d >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
        _mm512_mask_storeu_ps(acc + d, m, _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(m, v + d),
                                                          _mm512_maskz_loadu_ps(m, acc + d)));
    }
}
#endif

#define ATT_BLOCK 64

void g2_attention(const float *q, const float *k, const float *v, const int64_t *q_pos,
                  const int64_t *k_pos, const uint8_t *key_valid, int64_t B, int64_t Hq,
                  int64_t Hkv, int64_t T, int64_t S, int64_t D, float scaling, float softcap,
                  int64_t window, float *out, int n_threads) {
    int simd = 0;
#if G2_X86
    simd = g2_get_simd() != 0;
#endif
    int64_t rep = Hq / Hkv;
    int64_t total = B * Hq * T;
#pragma omp parallel num_threads(NT(n_threads))
    {
        float *acc = (float *)malloc((size_t)(D > 0 ? D : 1) * sizeof(float));
        float sbuf[ATT_BLOCK], pbuf[ATT_BLOCK];
        unsigned char vis[ATT_BLOCK];
        int64_t idx;
#pragma omp for schedule(dynamic, 2)
        for (idx = 0; idx < total; idx++) {
            if (!acc) continue; /* out of memory: leave row (cannot raise from here) */
            int64_t t = idx % T, h = (idx / T) % Hq, b = idx / (T * Hq), g = h / rep;
            const float *qr = q + idx * D;
            const float *kb = k + (b * Hkv + g) * S * D;
            const float *vb = v + (b * Hkv + g) * S * D;
            const uint8_t *valid = key_valid ? key_valid + b * S : NULL;
            float *o = out + idx * D;
            int64_t qp = q_pos[t];
            float mx = -INFINITY, l = 0.0f;
            int64_t nvis = 0;
            for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
            for (int64_t s0 = 0; s0 < S; s0 += ATT_BLOCK) {
                int64_t s1 = G2_MIN(S, s0 + ATT_BLOCK), nbk = s1 - s0;
                int any = 0;
                for (int64_t s = s0; s < s1; s++) {
                    int64_t kp = k_pos[s];
                    int ok = kp <= qp && (window <= 0 || qp - window < kp) && (!valid || valid[s]);
                    vis[s - s0] = (unsigned char)ok;
                    any |= ok;
                }
                if (!any) continue;
#if G2_X86
                if (simd) {
                    att_scores_avx512(qr, kb, s0, s1, D, scaling, softcap, vis, sbuf);
                } else
#endif
                {
                    for (int64_t s = s0; s < s1; s++) {
                        if (!vis[s - s0]) { sbuf[s - s0] = 0.0f; continue; }
                        float sc = dot_scalar(qr, kb + s * D, D) * scaling;
                        if (softcap > 0.0f) sc = softcap * tanhf(sc / softcap);
                        sbuf[s - s0] = sc;
                    }
                }
                float bmax = -INFINITY;
                int first = 1;
                for (int64_t j = 0; j < nbk; j++)
                    if (vis[j] && (first || sbuf[j] > bmax)) { bmax = sbuf[j]; first = 0; }
                if (bmax > mx) {
                    float a = (nvis == 0) ? 0.0f : expf(mx - bmax);
                    l *= a;
                    for (int64_t d = 0; d < D; d++) acc[d] *= a;
                    mx = bmax;
                }
                for (int64_t j = 0; j < nbk; j++) pbuf[j] = vis[j] ? sbuf[j] - mx : -INFINITY;
#if G2_X86
                if (simd) exp_avx512(pbuf, pbuf, nbk);
                else
#endif
                    for (int64_t j = 0; j < nbk; j++) pbuf[j] = expf(pbuf[j]);
                for (int64_t s = s0; s < s1; s++) {
                    if (!vis[s - s0]) continue;
                    float p = pbuf[s - s0];
                    l += p;
#if G2_X86
                    if (simd) axpy_avx512(acc, p, vb + s * D, D);
                    else
#endif
                        scale_axpy_scalar(acc, 1.0f, vb + s * D, p, D);
                    nvis++;
                }
            }
            if (nvis == 0) {
                /* no visible key: uniform softmax over all S keys (what HF's finfo.min mask gives) */
                for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
                for (int64_t s = 0; s < S; s++) scale_axpy_scalar(acc, 1.0f, vb + s * D, 1.0f, D);
                l = (float)S;
            }
            if (S == 0) {
                for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            } else {
                for (int64_t d = 0; d < D; d++) o[d] = acc[d] / l;
            }
        }
        free(acc);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* elementwise / row kernels                                                                   */
/* ------------------------------------------------------------------------------------------ */

void g2_rmsnorm(const float *x, const float *w, int64_t R, int64_t D, float eps, float *out,
                int n_threads) {
    int64_t r;
#pragma omp parallel for schedule(static) num_threads(NT(n_threads)) if (R * D > 32768)
    for (r = 0; r < R; r++) {
        const float *xr = x + r * D;
        /* sum of squares in double over 8 independent lanes (one serial chain of double adds
         * made this kernel latency-bound: 180 us for 128 x 2304); double keeps it exact to
         * well below float32 rounding, so the lane order does not matter */
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
            for (int j = 0; j < 8; j++) acc[j] += (double)xr[d + j] * (double)xr[d + j];
        for (; d < D; d++) acc[0] += (double)xr[d] * (double)xr[d];
        double ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        float ms = (float)(ss / (double)D);
        float inv = 1.0f / sqrtf(ms + eps);
        for (int64_t d = 0; d < D; d++) out[r * D + d] = (xr[d] * inv) * (1.0f + w[d]);
    }
}

#define GELU_BETA 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_KAPPA 0.044715f

void g2_geglu(const float *gate, const float *up, int64_t n, int approximate, float *out,
              int n_threads) {
    int64_t i;
#if G2_X86
    if (approximate && g2_get_simd()) {
        int64_t chunk = 4096, nch = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(NT(n_threads)) if (n > 16384)
        for (i = 0; i < nch; i++)
            geglu_tanh_avx512(gate + i * chunk, up + i * chunk, out + i * chunk, G2_MIN(chunk, n - i * chunk));
        return;
    }
#endif
    if (approximate) {
#pragma omp parallel for schedule(static) num_threads(NT(n_threads)) if (n > 16384)
        for (i = 0; i < n; i++) {
            float g = gate[i];
            float inner = GELU_BETA * (g + ((GELU_KAPPA * g) * g) * g); /* ops.gelu_tanh's order */
            out[i] = ((0.5f * g) * (1.0f + tanhf(inner))) * up[i];
        }
    } else {
#pragma omp parallel for schedule(static) num_threads(NT(n_threads)) if (n > 16384)
        for (i = 0; i < n; i++) {
            float g = gate[i];
            out[i] = (0.5f * g * (1.0f + erff(g / 1.41421356237309515f))) * up[i];
        }
    }
}

void g2_rope(const float *x, const float *cos_, const float *sin_, int64_t B, int64_t H,
             int64_t T, int64_t D, int64_t Bc, float *out, int n_threads) {
    int64_t half = D / 2, rows = B * H * T, r;
#pragma omp parallel for schedule(static) num_threads(NT(n_threads)) if (rows * D > 32768)
    for (r = 0; r < rows; r++) {
        int64_t t = r % T, b = r / (H * T);
        int64_t bc = Bc == 1 ? 0 : b;
        const float *c = cos_ + (bc * T + t) * D, *s = sin_ + (bc * T + t) * D;
        const float *xr = x + r * D;
        float *o = out + r * D;
        for (int64_t i = 0; i < half; i++) {
            float x1 = xr[i], x2 = xr[i + half];
            float a = x1 * c[i] + (-x2) * s[i];
            float bb = x2 * c[i + half] + x1 * s[i + half];
            o[i] = a;
            o[i + half] = bb;
        }
    }
}

#define G2_EW_CHUNK 4096

/* elementwise ops: 0 softcap (cap * tanh(x / cap)), 1 tanh, 2 exp; chunks, static schedule */
static void ew_chunk(int op, int simd, const float *x, float *out, int64_t cnt, float cap) {
#if G2_X86
    if (simd) {
        if (op == 0) softcap_avx512(x, out, cnt, cap);
        else if (op == 1) tanh_avx512(x, out, cnt);
        else exp_avx512(x, out, cnt);
        return;
    }
#endif
    (void)simd;
    for (int64_t i = 0; i < cnt; i++)
        out[i] = op == 0 ? cap * tanhf(x[i] / cap) : (op == 1 ? tanhf(x[i]) : expf(x[i]));
}

static void ew_run(int op, const float *x, int64_t n, float cap, float *out, int n_threads) {
    int64_t ch, nch = (n + G2_EW_CHUNK - 1) / G2_EW_CHUNK;
    int simd = g2_get_simd() != 0;
#pragma omp parallel for schedule(static) num_threads(NT(n_threads)) if (n > 65536)
    for (ch = 0; ch < nch; ch++) {
        int64_t i0 = ch * G2_EW_CHUNK;
        ew_chunk(op, simd, x + i0, out + i0, G2_MIN(G2_EW_CHUNK, n - i0), cap);
    }
}

void g2_softcap(const float *x, int64_t n, float cap, float *out, int n_threads) {
    ew_run(0, x, n, cap, out, n_threads);
}

void g2_tanh(const float *x, int64_t n, float *out, int n_threads) {
    ew_run(1, x, n, 0.0f, out, n_threads);
}

void g2_exp(const float *x, int64_t n, float *out, int n_threads) {
    ew_run(2, x, n, 0.0f, out, n_threads);
}

void g2_argmax(const float *x, int64_t R, int64_t V, int64_t *out, int n_threads) {
    int64_t r;
#pragma omp parallel for schedule(static) num_threads(NT(n_threads)) if (R > 1)
    for (r = 0; r < R; r++) {
        const float *xr = x + r * V;
        int64_t best = 0;
        float bv = xr[0];
        if (!isnan(bv)) {
            for (int64_t i = 1; i < V; i++) {
                float vi = xr[i];
                if (vi > bv) { bv = vi; best = i; }
                else if (isnan(vi)) { best = i; break; }
            }
        }
        out[r] = best;
    }
}

/* "a is better than b": larger value, ties -> smaller index */
#define TK_BETTER(va, ia, vb, ib) ((va) > (vb) || ((va) == (vb) && (ia) < (ib)))

static void tk_sift_down(float *hv, int64_t *hi, int64_t n, int64_t i) {
    /* min-heap on "better": the worst element at the root */
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && TK_BETTER(hv[w], hi[w], hv[l], hi[l])) w = l;
        if (r < n && TK_BETTER(hv[w], hi[w], hv[r], hi[r])) w = r;
        if (w == i) return;
        float tv = hv[i]; hv[i] = hv[w]; hv[w] = tv;
        int64_t ti = hi[i]; hi[i] = hi[w]; hi[w] = ti;
        i = w;
    }
}

void g2_topk(const float *x, int64_t R, int64_t V, int64_t k, float *values, int64_t *indices,
             int n_threads) {
    int64_t r;
    if (k <= 0) return;
#pragma omp parallel for schedule(static) num_threads(NT(n_threads)) if (R > 1)
    for (r = 0; r < R; r++) {
        const float *xr = x + r * V;
        float *hv = values + r * k;
        int64_t *hi = indices + r * k;
        int64_t n = 0;
        for (int64_t i = 0; i < V; i++) {
            float vi = xr[i];
            if (n < k) {
                /* sift up */
                int64_t c = n++;
                hv[c] = vi; hi[c] = i;
                while (c > 0) {
                    int64_t p = (c - 1) / 2;
                    if (TK_BETTER(hv[p], hi[p], hv[c], hi[c])) {
                        float tv = hv[p]; hv[p] = hv[c]; hv[c] = tv;
                        int64_t ti = hi[p]; hi[p] = hi[c]; hi[c] = ti;
                        c = p;
                    } else break;
                }
            } else if (TK_BETTER(vi, i, hv[0], hi[0])) {
                hv[0] = vi; hi[0] = i;
                tk_sift_down(hv, hi, n, 0);
            }
        }
        /* heap sort: repeatedly move the worst to the end -> best first */
        for (int64_t end = n - 1; end > 0; end--) {
            float tv = hv[0]; hv[0] = hv[end]; hv[end] = tv;
            int64_t ti = hi[0]; hi[0] = hi[end]; hi[end] = ti;
            tk_sift_down(hv, hi, end, 0);
        }
    }
}
