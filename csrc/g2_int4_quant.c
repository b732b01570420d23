/* int4 weight preparation: the quantiser of gemma2np/kernels/int4.py (quantize_int4 / _quantize,
 * its NumPy twin), bitwise: same codes, same meta, same per-row status.
 *
 * The twin is llama.cpp's make_qkx2_quants RMSE search (21 candidate roundings per sub-block of 32,
 * weighted least squares, float64 sums) followed by the 6-bit rounding of the 8 sub-block scales and
 * mins against the super-block's float16 d / dmin. Every step there is one IEEE operation on float32
 * or float64 in a fixed order, and this file repeats exactly those operations:
 *   - sums of 32 values in the order of int4._psum (NumPy's pairwise summation written out: 8
 *     interleaved accumulators, then ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)));
 *   - np.rint (round half to even) on values known to lie in [0, 63] after clamping: (t + 2^23) - 2^23,
 *     exact RNE for 0 <= t < 2^22 (clamping before rounding gives the same integers as NumPy's
 *     rint-then-clip: rint is monotone and fixes the integer bounds); no libm, no rounding mode;
 *   - float32 -> float16 with round to nearest even, in integer arithmetic (as NumPy's cast);
 *   - the products and quotients of the error expansion in the twin's order (C and Python both
 *     associate a * b * c and a + b - c from the left). -ffp-contract=off (setup.py): no FMA.
 * Zero signs can differ from NumPy's (np.minimum / max / clip of +-0 return either), but they never
 * reach an output: every division is guarded, d / dmin are +0 when their max is not positive (the
 * twin selects them that way) and ls / lm / u are integers.
 *
 * Layout of the work: a super-block (8 sub-blocks of 32) is transposed to [element][sub-block], so
 * every loop runs over the 8 sub-blocks as SIMD lanes (the twin is vectorised over sub-blocks the
 * same way). The same C is compiled twice: portable (the baseline ISA) and, on x86-64, with the
 * AVX-512 target attribute (the compiler vectorises it wider); both do the same IEEE operations, so
 * they agree bitwise (tests/test_int4_quant.py checks every SIMD level against the twin). Rows are
 * independent and each is quantised by one thread: results do not depend on the thread count. */
#include "g2_internal.h"

#if defined(__GNUC__)
#define Q_INLINE static inline __attribute__((always_inline))
#else
#define Q_INLINE static inline
#endif

#define Q_HUGE 0x1p40f /* |w| above it: STATUS_TOO_LARGE before the search (int4._HUGE) */
#define Q_BIAS 0x1p23f /* (t + 2^23) - 2^23 rounds 0 <= t < 2^22 to the nearest integer, ties to even */

/* int4.STATUS_* */
#define Q_OK 0
#define Q_NONFINITE 1
#define Q_TOO_LARGE 2

/* float32 -> IEEE half bits, round to nearest even (np.float32.astype(np.float16)) */
static inline uint16_t q_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return sign | 0x7e00u;  /* NaN */
    if (u >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 rounds to inf */
    if (u >= 0x38800000u) {                      /* a normal half (>= 2^-14) */
        u -= 0x38000000u;                        /* rebias the exponent, 127 -> 15 */
        return sign | (uint16_t)((u + 0x0fffu + ((u >> 13) & 1u)) >> 13);
    }
    /* a subnormal half (or 0, or 2^-14 after rounding up): |f| / 2^-24 rounded to even; the
     * scaling by 2^24 is exact and leaves a value < 1024, rounded by the bias trick */
    const float a = fabsf(f) * 0x1p24f;
    return sign | (uint16_t)((a + Q_BIAS) - Q_BIAS);
}

/* IEEE half bits -> float32, exact (the same function as g2_int4.c's f16_to_f32) */
static inline float q_f16_to_f32(uint16_t h) {
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

/* int4._psum in float64 of float32 values P[e][g], per lane g */
Q_INLINE void q_psum64(const float P[32][8], double out[8]) {
    double r[8][8];
    for (int j = 0; j < 8; j++)
        for (int g = 0; g < 8; g++) {
            double a = (double)P[j][g] + (double)P[j + 8][g];
            a = a + (double)P[j + 16][g];
            r[j][g] = a + (double)P[j + 24][g];
        }
    for (int g = 0; g < 8; g++)
        out[g] = ((r[0][g] + r[1][g]) + (r[2][g] + r[3][g])) + ((r[4][g] + r[5][g]) + (r[6][g] + r[7][g]));
}

/* one candidate of the search: L = clip(rint(isc * xm), 0, 15); sums of w L, w L L, w L x */
Q_INLINE void q_candidate(const float X[32][8], const float W[32][8], const float XM[32][8],
                          const float isc[8], double sl[8], double sl2[8], double sxl[8]) {
    float PL[32][8], PLL[32][8], PLX[32][8];
    for (int e = 0; e < 32; e++)
        for (int g = 0; g < 8; g++) {
            float t = isc[g] * XM[e][g]; /* >= 0: isc > 0 and xm = x - min(x, 0) >= 0 */
            t = t < 15.0f ? t : 15.0f;
            const float L = (t + Q_BIAS) - Q_BIAS;
            const float wl = W[e][g] * L;
            PL[e][g] = wl;
            PLL[e][g] = wl * L;
            PLX[e][g] = wl * X[e][g];
        }
    q_psum64(PL, sl);
    q_psum64(PLL, sl2);
    q_psum64(PLX, sxl);
}

/* clip(rint(t), 0, hi) for finite t, as the integer it is (hi <= 63) */
Q_INLINE uint8_t q_code(float t, float hi) {
    t = t > 0.0f ? t : 0.0f;
    t = t < hi ? t : hi;
    return (uint8_t)((t + Q_BIAS) - Q_BIAS);
}

/* one super-block: src 256 float32 inputs (finite, |x| <= 2^40) -> codes (128 bytes), meta (16
 * bytes). Returns 1 when d or dmin overflowed float16 (the row is then STATUS_TOO_LARGE). */
Q_INLINE int q_superblock(const float *src, uint8_t *codes, uint8_t *meta) {
    float X[32][8], W[32][8], XM[32][8], P[32][8];
    float lo[8], hi[8], mn[8], safe[8], av[8];
    int flat[8];
    for (int e = 0; e < 32; e++)
        for (int g = 0; g < 8; g++) X[e][g] = src[32 * g + e];

    /* _qkx2's inputs: min (clamped to <= 0, +0 for a zero min), max, weights av + |x| */
    for (int g = 0; g < 8; g++) lo[g] = hi[g] = X[0][g];
    for (int e = 1; e < 32; e++)
        for (int g = 0; g < 8; g++) {
            lo[g] = X[e][g] < lo[g] ? X[e][g] : lo[g];
            hi[g] = X[e][g] > hi[g] ? X[e][g] : hi[g];
        }
    {
        float r[8][8];
        for (int j = 0; j < 8; j++) /* _psum in float32 of x * x */
            for (int g = 0; g < 8; g++) {
                float a = X[j][g] * X[j][g] + X[j + 8][g] * X[j + 8][g];
                a = a + X[j + 16][g] * X[j + 16][g];
                r[j][g] = a + X[j + 24][g] * X[j + 24][g];
            }
        for (int g = 0; g < 8; g++) {
            const float s = ((r[0][g] + r[1][g]) + (r[2][g] + r[3][g])) + ((r[4][g] + r[5][g]) + (r[6][g] + r[7][g]));
            av[g] = sqrtf(s / 32.0f); /* IEEE sqrt: correctly rounded, as np.sqrt */
        }
    }
    for (int g = 0; g < 8; g++) {
        mn[g] = lo[g] < 0.0f ? lo[g] : 0.0f;
        flat[g] = hi[g] == mn[g];
        safe[g] = flat[g] ? 1.0f : hi[g] - mn[g];
    }
    for (int e = 0; e < 32; e++)
        for (int g = 0; g < 8; g++) {
            W[e][g] = av[g] + fabsf(X[e][g]);
            XM[e][g] = X[e][g] - mn[g];
        }
    double sw[8], sx[8], sxx[8];
    q_psum64(W, sw);
    for (int e = 0; e < 32; e++)
        for (int g = 0; g < 8; g++) P[e][g] = W[e][g] * X[e][g];
    q_psum64(P, sx);
    for (int e = 0; e < 32; e++)
        for (int g = 0; g < 8; g++) P[e][g] = P[e][g] * X[e][g];
    q_psum64(P, sxx);

    /* the search (_qkx2): the error of scale s and min m from the sums, in the twin's order */
#define Q_ERR(s, m) ((s) * (s) * sl2[g] + (m) * (m) * sw[g] + sxx[g] + 2.0 * (s) * (m) * sl[g] - \
                     2.0 * (s) * sxl[g] - 2.0 * (m) * sx[g])
    float isc[8];
    double sl[8], sl2[8], sxl[8], bs[8], bm[8], best[8];
    for (int g = 0; g < 8; g++) isc[g] = 15.0f / safe[g];
    q_candidate(X, W, XM, isc, sl, sl2, sxl);
    for (int g = 0; g < 8; g++) {
        bs[g] = (double)(1.0f / isc[g]);
        bm[g] = (double)mn[g];
        best[g] = Q_ERR(bs[g], bm[g]);
    }
    for (int i = 0; i <= 20; i++) {
        /* the twin's f(_RMIN + _RDELTA * i + _NMAX): (-1 + 0.1 i) + 15 in double, then to float */
        const float c = (float)((-1.0 + 0.1 * (double)i) + 15.0);
        for (int g = 0; g < 8; g++) isc[g] = c / safe[g];
        q_candidate(X, W, XM, isc, sl, sl2, sxl);
        for (int g = 0; g < 8; g++) {
            const double D = sw[g] * sl2[g] - sl[g] * sl[g];
            const int ok = D > 0;
            const double Ds = ok ? D : 1.0;
            double ts = (sw[g] * sxl[g] - sx[g] * sl[g]) / Ds;
            double tm = (sl2[g] * sx[g] - sl[g] * sxl[g]) / Ds;
            if (tm > 0) { /* the min is clamped to <= 0, the scale refitted */
                tm = 0.0;
                ts = sxl[g] / (sl2[g] > 0 ? sl2[g] : 1.0);
            }
            const double mad = Q_ERR(ts, tm);
            if (ok && mad < best[g]) {
                best[g] = mad;
                bs[g] = ts;
                bm[g] = tm;
            }
        }
    }
#undef Q_ERR
    float sc[8], mv[8];
    for (int g = 0; g < 8; g++) {
        sc[g] = flat[g] ? 0.0f : (float)bs[g];
        mv[g] = (float)(-bm[g]);
    }

    /* 6-bit scales and mins against the super-block's float16 d / dmin (quantize_int4) */
    float msc = sc[0], mmn = mv[0];
    for (int g = 1; g < 8; g++) {
        msc = sc[g] > msc ? sc[g] : msc;
        mmn = mv[g] > mmn ? mv[g] : mmn;
    }
    const float inv_sc = msc > 0.0f ? 63.0f / msc : 0.0f;
    const float inv_mn = mmn > 0.0f ? 63.0f / mmn : 0.0f;
    uint8_t v[16];
    for (int g = 0; g < 8; g++) {
        v[g] = q_code(inv_sc * sc[g], 63.0f);
        v[8 + g] = q_code(inv_mn * mv[g], 63.0f);
    }
    const uint16_t dh = q_f32_to_f16(msc > 0.0f ? msc / 63.0f : 0.0f);
    const uint16_t mh = q_f32_to_f16(mmn > 0.0f ? mmn / 63.0f : 0.0f);
    const float d = q_f16_to_f32(dh), dmin = q_f16_to_f32(mh);
    float Dg[8], Mg[8];
    for (int g = 0; g < 8; g++) {
        Dg[g] = d * (float)v[g];
        Mg[g] = dmin * (float)v[8 + g];
    }
    uint8_t u[8][32];
    for (int g = 0; g < 8; g++)
        for (int e = 0; e < 32; e++)
            u[g][e] = Dg[g] > 0.0f ? q_code((X[e][g] + Mg[g]) / Dg[g], 15.0f) : 0;
    for (int g = 0; g < 8; g++)
        for (int i = 0; i < 16; i++) codes[16 * g + i] = (uint8_t)(u[g][2 * i] | (u[g][2 * i + 1] << 4));
    meta[0] = (uint8_t)(dh & 0xff);
    meta[1] = (uint8_t)(dh >> 8);
    meta[2] = (uint8_t)(mh & 0xff);
    meta[3] = (uint8_t)(mh >> 8);
    for (int q = 0; q < 4; q++) { /* int4._pack6 */
        const uint32_t word = (uint32_t)v[4 * q] | ((uint32_t)v[4 * q + 1] << 6) |
                              ((uint32_t)v[4 * q + 2] << 12) | ((uint32_t)v[4 * q + 3] << 18);
        meta[4 + 3 * q] = (uint8_t)(word & 0xff);
        meta[5 + 3 * q] = (uint8_t)((word >> 8) & 0xff);
        meta[6 + 3 * q] = (uint8_t)((word >> 16) & 0xff);
    }
    return ((dh & 0x7c00u) == 0x7c00u) || ((mh & 0x7c00u) == 0x7c00u);
}

Q_INLINE float q_load(const void *w, int src_bf16, int64_t i) {
    return src_bf16 ? bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

/* one row n: its status; a row with a NaN / inf or |x| > 2^40 is quantised as zeros (as the twin) */
Q_INLINE uint8_t q_row(const void *w, int src_bf16, int64_t n, int64_t K, uint8_t *codes, uint8_t *meta) {
    int nonfinite = 0, huge = 0;
    for (int64_t k = 0; k < K; k++) {
        const float a = fabsf(q_load(w, src_bf16, n * K + k));
        if (!(a <= Q_HUGE)) {
            if (a != a || a == INFINITY) nonfinite = 1;
            else huge = 1;
        }
    }
    uint8_t status = nonfinite ? Q_NONFINITE : (huge ? Q_TOO_LARGE : Q_OK);
    float buf[256];
    for (int64_t s = 0; s < K / 256; s++) {
        for (int k = 0; k < 256; k++) buf[k] = status ? 0.0f : q_load(w, src_bf16, n * K + s * 256 + k);
        if (q_superblock(buf, codes + n * (K / 2) + s * 128, meta + n * (K / 16) + s * 16) && !status)
            status = Q_TOO_LARGE;
    }
    return status;
}

static void q_rows_portable(const void *w, int src_bf16, int64_t n, int64_t K, uint8_t *codes,
                            uint8_t *meta, uint8_t *status) {
    status[n] = q_row(w, src_bf16, n, K, codes, meta);
}

#if G2_X86
/* the same code, vectorised by the compiler for AVX-512 (same IEEE operations: same results) */
static G2_TGT void q_rows_avx512(const void *w, int src_bf16, int64_t n, int64_t K, uint8_t *codes,
                                 uint8_t *meta, uint8_t *status) {
    status[n] = q_row(w, src_bf16, n, K, codes, meta);
}
#endif

int g2_quantize_int4(const void *w, int src_bf16, int64_t N, int64_t K, uint8_t *codes, uint8_t *meta,
                     uint8_t *status, int n_threads) {
    void (*rowf)(const void *, int, int64_t, int64_t, uint8_t *, uint8_t *, uint8_t *) = q_rows_portable;
#if G2_X86
    if (g2_get_simd() >= 1) rowf = q_rows_avx512;
#endif
    int64_t n;
    /* ~22 passes of ~15 operations over each weight */
    const int nt = g2_par_threads(NT(n_threads), (double)N * (double)K * 300.0 * G2_NS_PER_MAC_F32);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (n = 0; n < N; n++) rowf(w, src_bf16, n, K, codes, meta, status);
    for (n = 0; n < N; n++)
        if (status[n]) return 1;
    return 0;
}
