/* linear with llama.cpp's Q4_0 weights (the layout of gemma2np/kernels/q4_0.py: per block of 32 inputs
 * 16 code bytes -- byte i: input i low nibble, input i + 16 high -- and one f16 d; w = d * (u - 8)).
 *
 * Decode (M < G2_DP_MIN_M): fused, the codes are widened in registers and never stored. Per weight row
 * and x row, 16 float32 lanes; per block b: t = xe * (lo - 8) + xo * (hi - 8); acc = acc + t * d_b, each
 * operation rounded on its own (no FMA; -ffp-contract=off), then the lanes summed as a fixed tree. The
 * AVX-512 path and the scalar path run exactly these operations, and kernels/q4_0.py's twin too, so
 * results are bitwise the twin's for any thread count (rows are shared out whole).
 * Prefill (M >= G2_DP_MIN_M): as g2_int4.c, fixed blocks of rows widened to float32 (exact) then bf16
 * (RNE; on AVX-512 in one pass, widen_q4_0_bf16_avx512) into per-thread scratch and run through g2_linear (G2_W_BF16DP, vdpbf16ps) on one thread:
 * bitwise g2_linear(..., G2_W_BF16DP) of the widened weights, for any thread count. */
#include "g2_internal.h"
#include "g2_linear.h"

/* IEEE half -> float32, exact (denormals included; inf/NaN kept): g2_int4.c's, kept private there */
static inline float q4_f16(uint16_t h) {
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

static void widen_q4_0_row(const uint8_t *codes, const uint16_t *sc, int64_t K, float *dst) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float d = q4_f16(sc[b]);
        const uint8_t *c = codes + b * 16;
        float *o = dst + b * 32;
        for (int i = 0; i < 16; i++) {
            o[i] = d * (float)((int)(c[i] & 15) - 8);
            o[16 + i] = d * (float)((int)(c[i] >> 4) - 8);
        }
    }
}

/* the lane tree of the twin (kernels/q4_0.py _lane_tree): l + 8, then + 4, + 2, + 1 */
static inline float lane_tree(const float *a) {
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = a[i] + a[i + 8];
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* one weight row against M x rows, scalar */
static void row_q4_0_scalar(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *sc,
                            float *y, int64_t ldy) {
    for (int64_t m = 0; m < M; m++) {
        float acc[16] = {0};
        const float *xm = x + m * K;
        for (int64_t b = 0; b < K / 32; b++) {
            const float d = q4_f16(sc[b]);
            const uint8_t *c = codes + b * 16;
            for (int l = 0; l < 16; l++) {
                const float t = xm[b * 32 + l] * (float)((int)(c[l] & 15) - 8) +
                                xm[b * 32 + 16 + l] * (float)((int)(c[l] >> 4) - 8);
                acc[l] = acc[l] + t * d;
            }
        }
        y[m * ldy] = lane_tree(acc);
    }
}

#if G2_X86
/* the same operations 16 lanes at a time; x rows handled in groups of up to 4 per pass over the row */
static G2_TGT void row_q4_0_avx512(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *sc,
                                   float *y, int64_t ldy) {
    const __m512i m15 = _mm512_set1_epi32(15), e8 = _mm512_set1_epi32(8);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int nm = (int)G2_MIN(4, M - m0);
        __m512 acc[4];
        for (int j = 0; j < nm; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t b = 0; b < K / 32; b++) {
            const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + b * 16)));
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(u, m15), e8));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(u, 4), e8));
            const __m512 vd = _mm512_set1_ps(q4_f16(sc[b]));
            for (int j = 0; j < nm; j++) {
                const float *xb = x + (m0 + j) * K + b * 32;
                const __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(xb), lo),
                                               _mm512_mul_ps(_mm512_loadu_ps(xb + 16), hi));
                acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(t, vd));
            }
        }
        for (int j = 0; j < nm; j++) {
            float a[16];
            _mm512_storeu_ps(a, acc[j]);
            y[(m0 + j) * ldy] = lane_tree(a);
        }
    }
}
#endif

#if G2_X86
/* prefill's widening straight to bf16, 32 weights at a time: the same d * (u - 8) (exact in float32), then
 * round to nearest even by the integer trick (bits + 0x7FFF + lsb) >> 16 -- f32_to_bf16's result for every
 * non-NaN value (the loader refuses NaN / inf scales) -- so bitwise the scalar f32 + f32_to_bf16 path */
static G2_TGT void widen_q4_0_bf16_avx512(const uint8_t *codes, const uint16_t *sc, int64_t K, uint16_t *dst) {
    const __m512i m15 = _mm512_set1_epi32(15), e8 = _mm512_set1_epi32(8);
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
    for (int64_t b = 0; b < K / 32; b++) {
        const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + b * 16)));
        const __m512 vd = _mm512_set1_ps(q4_f16(sc[b]));
        const __m512 v[2] = {
            _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(u, m15), e8))),
            _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(u, 4), e8)))};
        for (int h = 0; h < 2; h++) {
            const __m512i bits = _mm512_castps_si512(v[h]);
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
            const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(half, lsb)), 16);
            _mm256_storeu_si256((__m256i *)(dst + b * 32 + h * 16), _mm512_cvtepi32_epi16(r));
        }
    }
}
#endif

void g2_dequantize_q4_0(const uint8_t *codes, const uint16_t *scales, int64_t N, int64_t K, float *out,
                        int n_threads) {
    const int nt = g2_par_threads(NT(n_threads), (double)N * (double)K * G2_NS_PER_ELEM);
    int64_t n;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (n = 0; n < N; n++) widen_q4_0_row(codes + n * (K / 2), scales + n * (K / 32), K, out + n * K);
}

int g2_linear_q4_0(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales,
                   int64_t N, float *y, int n_threads) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0 || K % 32) return -2;
    const int dp = M >= G2_DP_MIN_M;
    if (!dp) { /* decode: every output one fixed sequence (see the top of the file) */
        const int nt = g2_par_threads(NT(n_threads), (double)N * (double)K * (0.5625 * G2_NS_PER_WBYTE) +
                                                         (double)M * (double)N * (double)K * G2_NS_PER_MAC_F32);
#if G2_X86
        const int simd = g2_get_simd();
#else
        const int simd = 0;
#endif
        int64_t n;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
        for (n = 0; n < N; n++) {
#if G2_X86
            if (simd) {
                row_q4_0_avx512(x, M, K, codes + n * (K / 2), scales + n * (K / 32), y + n, N);
                continue;
            }
#endif
            (void)simd;
            row_q4_0_scalar(x, M, K, codes + n * (K / 2), scales + n * (K / 32), y + n, N);
        }
        return 0;
    }
    /* prefill: rows per block ~256 KB of widened float32 rows, a multiple of 4; fixed by K alone */
    int64_t R = (256 * 1024) / (K * 4);
    R = R / 4 * 4;
    if (R < 4) R = 4;
    const int64_t nblk = (N + R - 1) / R;
    const double macs = (double)M * (double)N * (double)K;
    int nt = g2_par_threads(NT(n_threads), (double)N * (double)K * (0.5625 * G2_NS_PER_WBYTE + G2_NS_PER_ELEM * 0.25) +
                                               macs * G2_NS_PER_MAC_BF16DP);
    if (nt > nblk) nt = (int)nblk;
    const size_t wbytes = (size_t)(R * K) * sizeof(float), ybytes = (size_t)(M * R) * sizeof(float);
    const size_t per = wbytes + wbytes / 2 + ybytes;
    char *scratch_all = (char *)malloc((size_t)nt * per);
    if (!scratch_all) return -1;
    int fail = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        char *mine = scratch_all + (size_t)g2_thread_id() * per;
        float *wf = (float *)mine;
        float *yt = (float *)(mine + wbytes);
        uint16_t *wb = (uint16_t *)(mine + wbytes + ybytes);
        int64_t b;
#pragma omp for schedule(static)
        for (b = 0; b < nblk; b++) {
            const int64_t n0 = b * R, nr = G2_MIN(R, N - n0);
#if G2_X86
            if (g2_get_simd()) {
                for (int64_t r = 0; r < nr; r++)
                    widen_q4_0_bf16_avx512(codes + (n0 + r) * (K / 2), scales + (n0 + r) * (K / 32), K, wb + r * K);
            } else
#endif
            {
                for (int64_t r = 0; r < nr; r++)
                    widen_q4_0_row(codes + (n0 + r) * (K / 2), scales + (n0 + r) * (K / 32), K, wf + r * K);
                for (int64_t i = 0; i < nr * K; i++) wb[i] = f32_to_bf16(wf[i]);
            }
            if (g2_linear(x, M, K, G2_W_BF16DP, wb, NULL, 0, nr, NULL, yt, 1)) {
#pragma omp atomic write
                fail = 1;
            }
            for (int64_t m = 0; m < M; m++) memcpy(y + m * N + n0, yt + m * nr, (size_t)nr * sizeof(float));
        }
    }
    free(scratch_all);
    return fail ? -1 : 0;
}
