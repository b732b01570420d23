/* linear with int4 weights (the layout of gemma2np/kernels/int4.py: Q4_K-like super-blocks of 256
 * inputs, 4-bit codes, 6-bit sub-block scales/mins against an f16 d / dmin; 4.5 bits per weight).
 *
 * Decode on AVX-512 (M < G2_DP_MIN_M): fused tiles (tile_i4) on g2_linear_drive.c's gemv driver.
 * Otherwise (prefill; the scalar path), no arithmetic of its own beyond the dequantisation: W is cut into fixed blocks of rows
 * (independent of the thread count); each block is widened into per-thread scratch -- to float32
 * (x with fewer than G2_DP_MIN_M rows: decode keeps x in float32, like int8) or to bf16 (RNE) of
 * those float32 values (prefill: vdpbf16ps, like int8) -- and run through g2_linear on one thread
 * (G2_W_F32 / G2_W_BF16DP), whose outputs do not depend on tiling or batch size. So every output is
 * computed by one fixed instruction sequence whatever the thread count. */
#include "g2_internal.h"
#include "g2_linear.h"

/* IEEE half -> float32, exact (denormals included; inf/NaN kept) */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 31u, m = h & 0x3FFu, u;
    if (e == 31u) u = sign | 0x7F800000u | (m << 13);
    else if (e) u = sign | ((e + 112u) << 23) | (m << 13);
    else if (!m) u = sign;
    else { /* denormal: normalise */
        e = 113u;
        while (!(m & 0x400u)) { m <<= 1; e--; }
        u = sign | (e << 23) | ((m & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* super-block consts: D[j] = d * ls_j, Mn[j] = dmin * lm_j (both exact, see kernels/int4.py) */
static inline void sb_consts(const uint8_t *mb, float *D, float *Mn) {
    const float d = f16_to_f32((uint16_t)(mb[0] | (mb[1] << 8)));
    const float dmin = f16_to_f32((uint16_t)(mb[2] | (mb[3] << 8)));
    int v[16];
    for (int g = 0; g < 4; g++) {
        const uint32_t word = (uint32_t)mb[4 + 3 * g] | ((uint32_t)mb[5 + 3 * g] << 8) | ((uint32_t)mb[6 + 3 * g] << 16);
        for (int t = 0; t < 4; t++) v[4 * g + t] = (int)((word >> (6 * t)) & 63u);
    }
    for (int j = 0; j < 8; j++) {
        D[j] = d * (float)v[j];
        Mn[j] = dmin * (float)v[8 + j];
    }
}

/* one row: codes (K/2 bytes), meta (K/256 * 16 bytes) -> dst float32 (K):
 * w = (d * ls_j) * u - dmin * lm_j, both products exact, one rounding (the subtraction) */
static void widen_i4_row_scalar(const uint8_t *codes, const uint8_t *meta, int64_t K, float *dst) {
    for (int64_t s = 0; s < K / 256; s++) {
        float D[8], Mn[8];
        sb_consts(meta + s * 16, D, Mn);
        for (int j = 0; j < 8; j++) {
            const uint8_t *c = codes + s * 128 + j * 16;
            float *o = dst + s * 256 + j * 32;
            for (int i = 0; i < 16; i++) {
                o[2 * i] = D[j] * (float)(c[i] & 15) - Mn[j];
                o[2 * i + 1] = D[j] * (float)(c[i] >> 4) - Mn[j];
            }
        }
    }
}

#if G2_X86
/* the same values 32 at a time: 16 code bytes -> low / high nibbles as floats, interleaved back into
 * input order (2i: low, 2i + 1: high) by two permutes; then the same multiply and subtract
 * (IEEE, no FMA: bitwise the scalar loop) */
static G2_TGT void widen_i4_row_avx512(const uint8_t *codes, const uint8_t *meta, int64_t K, float *dst) {
    const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i m15 = _mm512_set1_epi32(15);
    for (int64_t s = 0; s < K / 256; s++) {
        float D[8], Mn[8];
        sb_consts(meta + s * 16, D, Mn);
        for (int j = 0; j < 8; j++) {
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + s * 128 + j * 16)));
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, m15));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
            const __m512 vd = _mm512_set1_ps(D[j]), vm = _mm512_set1_ps(Mn[j]);
            float *o = dst + s * 256 + j * 32;
            _mm512_storeu_ps(o, _mm512_sub_ps(_mm512_mul_ps(_mm512_permutex2var_ps(lo, ilo, hi), vd), vm));
            _mm512_storeu_ps(o + 16, _mm512_sub_ps(_mm512_mul_ps(_mm512_permutex2var_ps(lo, ihi, hi), vd), vm));
        }
    }
}
#endif

static void widen_i4_row(const uint8_t *codes, const uint8_t *meta, int64_t K, float *dst) {
#if G2_X86
    if (g2_get_simd()) {
        widen_i4_row_avx512(codes, meta, K, dst);
        return;
    }
#endif
    widen_i4_row_scalar(codes, meta, K, dst);
}

#if G2_X86
#define G2_PF_I4(p) _mm_prefetch((const char *)(p), _MM_HINT_T1) /* as the int8 decode tiles (g2_linear.c) */
/* Decode (M < G2_DP_MIN_M) on AVX-512, fused: the 4-bit codes are widened in registers, never
 * stored. x is first split per sub-block of 32 into its 16 even and 16 odd inputs (xd), which pair
 * lane i with byte i's low and high nibble. Per sub-block j of a row:
 *   t = xe * lo + xo * hi                        (16 lanes, the codes as floats)
 *   acc += t * (d * ls_j);  acc -= (xe + xo) * (dmin * lm_j)
 * i.e. y = sum_j (d ls_j) sum x u - (dmin lm_j) sum x: the dequantised weights' dot product, with
 * rounding errors relative to sum |x| ((d ls) u + dmin lm) (tests/test_int4.py bounds it so). Each
 * output is one 16-lane chain in a fixed order: independent of NR, batch size and threads. */
G2_INLINE G2_TGT void tile_i4(const int NR, const float *xd, int64_t K, const uint8_t *w, const uint8_t *meta,
                              float *y, const int PF) {
    __m512 acc[4];
    const __m512i m15 = _mm512_set1_epi32(15);
    const int64_t wrow = K / 2, mrow = K / 16;
    int n;
    for (n = 0; n < NR; n++) acc[n] = _mm512_setzero_ps();
    for (int64_t s = 0; s < K / 256; s++) {
        float D[4][8], Mn[4][8];
        for (n = 0; n < NR; n++) sb_consts(meta + n * mrow + s * 16, D[n], Mn[n]);
        for (int j = 0; j < 8; j++) {
            const int64_t k = s * 256 + j * 32;
            const __m512 xe = _mm512_loadu_ps(xd + k), xo = _mm512_loadu_ps(xd + k + 16);
            const __m512 xs = _mm512_add_ps(xe, xo);
            if (PF && (j & 3) == 0)
                for (n = 0; n < NR; n++) G2_PF_I4(w + (NR + n) * wrow + k / 2);
            for (n = 0; n < NR; n++) {
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + n * wrow + k / 2)));
                __m512 t = _mm512_mul_ps(xe, _mm512_cvtepi32_ps(_mm512_and_si512(b, m15)));
                t = _mm512_fmadd_ps(xo, _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), t);
                acc[n] = _mm512_fmadd_ps(t, _mm512_set1_ps(D[n][j]), acc[n]);
                acc[n] = _mm512_fnmadd_ps(xs, _mm512_set1_ps(Mn[n][j]), acc[n]);
            }
        }
    }
    for (n = 0; n < NR; n++) y[n] = _mm512_reduce_add_ps(acc[n]);
}

/* g2_gemv_drive's tile signature: meta rides in the scales slot (its row of K/16 bytes is nb = K/64
 * "floats" apart, so the driver's sc + n * nb lands on row n's bytes) */
#define DEF_TILE_I4(NR)                                                                          \
    static G2_TGT __attribute__((noinline)) void tile_i4_##NR(                                    \
        const void *x, int64_t K, const void *w, const float *sc, int64_t block, int64_t nb,      \
        float *y, int64_t ldy) {                                                                  \
        (void)block; (void)nb; (void)ldy;                                                         \
        tile_i4(NR, (const float *)x, K, (const uint8_t *)w, (const uint8_t *)sc, y, NR > 1 && g2_prefetch); \
    }
DEF_TILE_I4(4)
DEF_TILE_I4(1)

/* x (M, K) -> xd: per sub-block of 32, the 16 even inputs then the 16 odd ones */
static void split_even_odd(const float *x, int64_t M, int64_t K, float *xd) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += 32)
            for (int i = 0; i < 16; i++) {
                xd[m * K + k + i] = x[m * K + k + 2 * i];
                xd[m * K + k + 16 + i] = x[m * K + k + 2 * i + 1];
            }
}
#endif

void g2_dequantize_int4(const uint8_t *codes, const uint8_t *meta, int64_t N, int64_t K, float *out,
                        int n_threads) {
    const int nt = g2_par_threads(NT(n_threads), (double)N * (double)K * G2_NS_PER_ELEM);
    int64_t n;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (n = 0; n < N; n++) widen_i4_row(codes + n * (K / 2), meta + n * (K / 256) * 16, K, out + n * K);
}

int g2_linear_int4(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint8_t *meta,
                   int64_t N, float *y, int n_threads) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0 || K % 256) return -2;
    const int dp = M >= G2_DP_MIN_M;
#if G2_X86
    if (!dp && g2_get_simd()) { /* decode: the fused tiles over the whole W, streamed once */
        float *xd = (float *)malloc((size_t)(M * K) * sizeof(float));
        if (!xd) return -1;
        split_even_odd(x, M, K, xd);
        g2_part part = {(const char *)codes, (const float *)(const void *)meta, N, y};
        const int nt = g2_par_threads(NT(n_threads), (double)N * (double)K * (0.5625 * G2_NS_PER_WBYTE) +
                                                         (double)M * (double)N * (double)K * G2_NS_PER_MAC_F32);
        g2_gemv_drive(tile_i4_4, 4, tile_i4_1, xd, K * 4, M, K, &part, 1, K / 2, 0, K / 64, nt);
        free(xd);
        return 0;
    }
#endif
    /* rows per block: ~256 KB of widened float32 rows (stays in L2 while x runs over it), a
     * multiple of 4 (the f32 tiles' NR); fixed by K alone, so never by the thread count */
    int64_t R = (256 * 1024) / (K * 4);
    R = R / 4 * 4;
    if (R < 4) R = 4;
    const int64_t nblk = (N + R - 1) / R;
    /* streaming the 4.5-bit weights plus the widening and the multiply-adds */
    const double macs = (double)M * (double)N * (double)K;
    int nt = g2_par_threads(NT(n_threads), (double)N * (double)K * (0.5625 * G2_NS_PER_WBYTE + G2_NS_PER_ELEM * 0.25) +
                                               macs * (dp ? G2_NS_PER_MAC_BF16DP : G2_NS_PER_MAC_F32));
    if (nt > nblk) nt = (int)nblk;
    const size_t wbytes = (size_t)(R * K) * sizeof(float), ybytes = (size_t)(M * R) * sizeof(float);
    char *scratch_all = (char *)malloc((size_t)nt * (wbytes + (dp ? wbytes / 2 : 0) + ybytes));
    if (!scratch_all) return -1;
    int fail = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        char *mine = scratch_all + (size_t)g2_thread_id() * (wbytes + (dp ? wbytes / 2 : 0) + ybytes);
        float *wf = (float *)mine;
        float *yt = (float *)(mine + wbytes);
        uint16_t *wb = dp ? (uint16_t *)(mine + wbytes + ybytes) : NULL;
        int64_t b;
#pragma omp for schedule(static)
        for (b = 0; b < nblk; b++) {
            const int64_t n0 = b * R, nr = G2_MIN(R, N - n0);
            for (int64_t r = 0; r < nr; r++)
                widen_i4_row(codes + (n0 + r) * (K / 2), meta + (n0 + r) * (K / 256) * 16, K, wf + r * K);
            int rc;
            if (dp) { /* prefill: bf16(w) (RNE) on vdpbf16ps, x rounded to bf16 by g2_linear */
                for (int64_t i = 0; i < nr * K; i++) wb[i] = f32_to_bf16(wf[i]);
                rc = g2_linear(x, M, K, G2_W_BF16DP, wb, NULL, 0, nr, NULL, yt, 1);
            } else {
                rc = g2_linear(x, M, K, G2_W_F32, wf, NULL, 0, nr, NULL, yt, 1);
            }
            if (rc) {
#pragma omp atomic write
                fail = 1;
            }
            for (int64_t m = 0; m < M; m++) memcpy(y + m * N + n0, yt + m * nr, (size_t)nr * sizeof(float));
        }
    }
    free(scratch_all);
    return fail ? -1 : 0;
}
