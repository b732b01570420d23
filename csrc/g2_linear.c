/* linear: y = x @ W^T for every weight format -- the portable scalar path first, then the AVX-512
 * tiles it is tested against (tests/test_kernels.py runs both through the `simd` fixture), then the
 * public entry points that pick one. How W is cut into blocks and spread over threads is in
 * g2_linear_drive.c; the formats and the batch-size rule are described in gemma2np_kernels.h. */
#include "g2_internal.h"
#include "g2_simd_math.h"
#include "g2_linear.h"

/* ------------------------------------------------------------------------------------------ */
/* portable scalar path                                                                        */
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
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt) if (nt > 1)
    for (n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * K;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t k = 0; k < K; k++) acc[k & 7] += xr[k] * wval(fmt, w, sc, n, k, K, block, nb, dp);
            y[m * N + n] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX-512 path: tiles (each output is one 16-lane accumulator chain, see tile_avx512)         */
/* ------------------------------------------------------------------------------------------ */
#if G2_X86
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
                __m512i h = g2_rne_bf16_epi32(v);
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

/* The tile variants (each a compile-time MR x NR so the accumulators stay in registers), and who
 * runs them -- 24 in all:
 *   tile_{0,1}_{4,1}_{4,1}  f32 / bf16-widened W, MR x NR in {4,1}^2: g2_gemm_drive's main tile and
 *                           its M / N tails (f32 W with M >= 4; bf16 "rounded" prefill without
 *                           avx512_bf16); the 1x4 / 1x1 pair is also the decode tile (g2_gemv_drive)
 *   tile_i8_{4,1}_{0,32}    int8 W, x float32 (decode): NR = 4 and its tail, block 32 fixed at compile
 *                           time (the default) or any block
 *   tile_dp_1_{8,1}_3       bf16 W, x split into 3 bf16 parts (decode on avx512_bf16)
 *   tile_op_{14,8,4,2,1}_{2,1}  vdpbf16ps outer product (prefill on avx512_bf16): 14 W rows and the
 *                           8/4/2/1 tail of a block, against 32- or 16-row x panels */
#define DEF_TILE(FMT, MR, NR)                                                                   \
    static G2_TGT __attribute__((noinline)) void tile_##FMT##_##MR##_##NR(                       \
        const void *x, int64_t K, const void *w, const float *sc, int64_t block, int64_t nb,     \
        float *y, int64_t ldy) {                                                                 \
        (void)sc; (void)block; (void)nb;                                                         \
        tile_avx512(FMT, MR, NR, (const float *)x, K, w, y, ldy, MR == 1 && NR > 1 && g2_prefetch);                                \
    }
#define DEF_TILES(FMT) DEF_TILE(FMT, 4, 4) DEF_TILE(FMT, 4, 1) DEF_TILE(FMT, 1, 4) DEF_TILE(FMT, 1, 1)
DEF_TILES(0)
DEF_TILES(1)

#define DEF_TILE_I8(NR, BLK)                                                                    \
    static G2_TGT __attribute__((noinline)) void tile_i8_##NR##_##BLK(                           \
        const void *x, int64_t K, const void *w, const float *sc, int64_t block, int64_t nb,     \
        float *y, int64_t ldy) {                                                                 \
        (void)ldy;                                                                               \
        tile_i8(NR, BLK, (const float *)x, K, (const int8_t *)w, sc, block, nb, y, NR > 1 && g2_prefetch);              \
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
        tile_dp(MR, NR, P, (const uint16_t *)x, K, (const uint16_t *)w, y, ldy, MR == 1 && NR > 1 && g2_prefetch);                 \
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

#define DEF_TILE_OP(NR, MP)                                                                      \
    static G2_TGT_BF16 __attribute__((noinline)) void tile_op_##NR##_##MP(                        \
        const uint32_t *xp, int64_t K2, int odd, const uint16_t *w, int64_t ldw, float *y, int64_t ldy, \
        int64_t mvalid) {                                                                          \
        tile_op(NR, MP, xp, K2, odd, w, ldw, y, ldy, mvalid);                                      \
    }
DEF_TILE_OP(14, 2) DEF_TILE_OP(8, 2) DEF_TILE_OP(4, 2) DEF_TILE_OP(2, 2) DEF_TILE_OP(1, 2)
DEF_TILE_OP(14, 1) DEF_TILE_OP(8, 1) DEF_TILE_OP(4, 1) DEF_TILE_OP(2, 1) DEF_TILE_OP(1, 1)
G2_HIDDEN const int g2_op_nr[5] = {14, 8, 4, 2, 1};
G2_HIDDEN const op_fn g2_op_tiles[2][5] = {
    {tile_op_14_1, tile_op_8_1, tile_op_4_1, tile_op_2_1, tile_op_1_1},
    {tile_op_14_2, tile_op_8_2, tile_op_4_2, tile_op_2_2, tile_op_1_2}};

/* x (M, K) float32 -> panels of 32 rows (the last one 16 if 16 rows or fewer remain), each
 * [K2][rows] of bf16 pairs (RNE, = f32_to_bf16), rows past M and the odd K's missing half 0.
 * Panel p starts at row 32p, at word offset 32p * K2. 32 inputs of a row at a time: rounded,
 * paired, and scattered down the panel's column for that row. */
G2_HIDDEN G2_TGT void g2_pack_x_op(const float *x, int64_t M, int64_t K, uint32_t *xp, int nt) {
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
                    __m256i lo = _mm512_cvtepi32_epi16(g2_rne_bf16_epi32(_mm512_maskz_loadu_ps(ma, x + m * K + k)));
                    __m256i hi = _mm512_cvtepi32_epi16(g2_rne_bf16_epi32(_mm512_maskz_loadu_ps(mb, x + m * K + k + 16)));
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
G2_HIDDEN G2_TGT void g2_widen_rows(int fmt, int to_bf16, const void *w, const float *sc, int64_t nr,
                              int64_t K, int64_t block, int64_t nb, void *dst) {
    for (int64_t n = 0; n < nr; n++) {
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 msk = (K - k >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
            float s = (fmt == G2_W_INT8) ? sc[n * nb + k / block] : 0.0f;
            __m512 v = load_w16(fmt, w, n * K + k, msk, 0, s);
            if (to_bf16 == 1)
                _mm256_mask_storeu_epi16((uint16_t *)dst + n * K + k, msk,
                                         _mm512_cvtepi32_epi16(g2_rne_bf16_epi32(v)));
            else if (to_bf16 == 2) /* f32 holding bf16(q*s) */
                _mm512_mask_storeu_ps((float *)dst + n * K + k, msk,
                                      _mm512_castsi512_ps(_mm512_slli_epi32(g2_rne_bf16_epi32(v), 16)));
            else
                _mm512_mask_storeu_ps((float *)dst + n * K + k, msk, v);
        }
    }
}

/* widen_rows(G2_W_INT8, 1, ...) for the vdpbf16ps tiles, with the avx512_bf16 converter:
 * vcvtne2ps2bf16 rounds 32 values at once (RNE, quiet NaN: g2_rne_bf16_epi32's bits) but flushes a
 * denormal q*s (a block with absmax < ~1e-36) to zero -- which vdpbf16ps does with a denormal
 * input anyway, so the products are the same as from widen_rows (tests/test_kernels.py,
 * test_int8_prefill_is_bf16_of_dequantised_weights, plants such blocks). Halves the cost of
 * widening, ~5% of an int8 prefill matmul. */
G2_HIDDEN G2_TGT_BF16 void g2_widen_i8_bf16(const int8_t *w, const float *sc, int64_t nr, int64_t K,
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
        if (k < K) g2_widen_rows(G2_W_INT8, 1, w + n * K + k, sc + n * nb + k / block, 1, K - k, block, nb, dst + n * ldd + k);
    }
}

static const tile_fn g_tiles_f32[2][2] = {{tile_0_1_1, tile_0_1_4}, {tile_0_4_1, tile_0_4_4}};
static const tile_fn g_tiles_bf16w[2][2] = {{tile_1_1_1, tile_1_1_4}, {tile_1_4_1, tile_1_4_4}};

/* dp: the rounded semantics (x -> bf16; int8 W -> bf16(q*s)). Returns 0 or -1 (no memory). */
static int linear_avx512(int fmt, int dp, const float *x, int64_t M, int64_t K, const g2_part *parts,
                         int np, int64_t block, int nt) {
    int64_t nb = (fmt == G2_W_INT8) ? (K + block - 1) / block : 0;
    int64_t wbytes = fmt == G2_W_F32 ? 4 : (fmt == G2_W_INT8 ? 1 : 2);
    int bf = g2_use_bf16dp();
    int rc = 0;
    /* thread policy: decode (the gemv driver) streams W once, prefill is bound by the tiles */
    int64_t Ntot = 0;
    for (int p = 0; p < np; p++) Ntot += parts[p].N;
    const double macs = (double)M * (double)Ntot * (double)K;
    const int gemv = fmt == G2_W_F32 ? M < 4 : !dp;
    nt = g2_par_threads(nt, gemv ? (double)Ntot * (double)K * (double)wbytes * G2_NS_PER_WBYTE + macs * G2_NS_PER_MAC_F32
                                 : macs * (bf ? G2_NS_PER_MAC_BF16DP : G2_NS_PER_MAC_F32));
    if (fmt == G2_W_F32) {
        if (M < 4)
            g2_gemv_drive(tile_0_1_4, 4, tile_0_1_1, x, K * 4, M, K, parts, np, K * 4, 0, 0, nt);
        else
            rc = g2_gemm_drive(g_tiles_f32, x, K * 4, M, K, parts, np, K * 4, 0, 0, nt, -1, 0, K * 4);
        return rc;
    }
    if (!dp) { /* x stays float32 */
        if (fmt == G2_W_INT8) {
            int b32 = block == 32;
            g2_gemv_drive(b32 ? tile_i8_4_32 : tile_i8_4_0, 4, b32 ? tile_i8_1_32 : tile_i8_1_0, x, K * 4, M,
                       K, parts, np, K, block, nb, nt);
            return 0;
        }
        /* bf16 weights */
        if (bf) { /* x split into 3 bf16 parts: vdpbf16ps at f32 accuracy */
            uint16_t *xs = (uint16_t *)malloc((size_t)(M * 3 * K) * sizeof(uint16_t));
            if (!xs) return -1;
            split_bf16(x, M, K, 3, xs, nt);
            g2_gemv_drive(tile_dp_1_8_3, 8, tile_dp_1_1_3, xs, 3 * K * 2, M, K, parts, np, K * 2, 0, 0, nt);
            free(xs);
        } else {
            g2_gemv_drive(tile_1_1_4, 4, tile_1_1_1, x, K * 4, M, K, parts, np, K * 2, 0, 0, nt);
        }
        return 0;
    }
    /* rounded semantics */
    if (bf) return g2_gemm_op_drive(x, M, K, parts, np, fmt == G2_W_INT8, block, nb, nt);
    /* no avx512_bf16: rounded x in f32, f32 tiles (int8: widened to f32 of bf16(q*s)) */
    float *xr = (float *)malloc((size_t)(M * K) * sizeof(float));
    if (!xr) return -1;
    for (int64_t i = 0; i < M * K; i++) xr[i] = bf16_to_f32(f32_to_bf16(x[i]));
    if (fmt == G2_W_INT8)
        rc = g2_gemm_drive(g_tiles_f32, xr, K * 4, M, K, parts, np, K * wbytes, block, nb, nt, G2_W_INT8, 2, K * 4);
    else
        rc = g2_gemm_drive(g_tiles_bf16w, xr, K * 4, M, K, parts, np, K * 2, 0, 0, nt, -1, 0, K * 2);
    free(xr);
    return rc;
}
#endif /* G2_X86 */

/* ------------------------------------------------------------------------------------------ */
/* public entry points                                                                         */
/* ------------------------------------------------------------------------------------------ */

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
    double macs = 0.0;
    for (int p = 0; p < nparts; p++) macs += (double)M * (double)N[p] * (double)K;
    nt = g2_par_threads(nt, macs * G2_NS_PER_MAC_SCALAR);
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
/* weight preparation: int8 quantisation                                                       */
/* ------------------------------------------------------------------------------------------ */

void g2_quantize_int8(const void *w, int src_bf16, int64_t N, int64_t K, int64_t block, int8_t *q,
                      float *scales, int n_threads) {
    const int64_t nb = (K + block - 1) / block;
    int64_t n;
    /* a division and a rounding per weight */
    const int nt = g2_par_threads(NT(n_threads), (double)N * (double)K * 4.0 * G2_NS_PER_ELEM);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
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
