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
 * twin selects them that way) and ls / lm / u are integers. A row with a NaN / inf or |x| > 2^40 is
 * not searched (status 1 / 2, all-zero codes and meta), and ranges / maxima below 2^-100 skip the
 * divisions that could overflow (int4._TINY): every float32 intermediate is finite, so NumPy's NaN
 * rules (clip, casts to uint8) never come into play.
 *
 * Layout of the work: a super-block (8 sub-blocks of 32) is transposed to [element][sub-block], so
 * every loop runs over the 8 sub-blocks as SIMD lanes (the twin is vectorised over sub-blocks the
 * same way), written with GCC / Clang vector types (an MSVC build would need a scalar port of the
 * q_* helpers). That C is compiled twice: portable (the baseline
 * ISA) and, on x86-64, with the AVX-512 target attribute, where the search (~75% of the time) is
 * AVX-512 intrinsics instead (vminps / vroundps / mask blends: the same IEEE operations). All agree
 * bitwise (tests/test_int4_quant.py checks every SIMD level against the twin). Rows are independent
 * and each is quantised by one thread: results do not depend on the thread count. Speed (one thread,
 * CPU time, busy host): ~110 M weights/s with AVX-512, ~30 M portable; the NumPy twin ~3 M. */
#include "g2_internal.h"

#if defined(__GNUC__) && !defined(__clang__)
/* the 32- and 64-byte vector types below never cross a call boundary of the portable build
 * (every helper is inlined): the ABI note does not apply */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__GNUC__)
#define Q_INLINE static inline __attribute__((always_inline))
#else
#define Q_INLINE static inline
#endif

#define Q_HUGE 0x1p40f /* |w| above it: STATUS_TOO_LARGE before the search (int4._HUGE) */
#define Q_TINY 0x1p-100f /* ranges / maxima below it skip divisions that could overflow (int4._TINY) */
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

/* 8 lanes (the 8 sub-blocks of a super-block) as GCC vector types: element-wise IEEE operations
 * exactly like the scalar ones, so the portable build (lowered to SSE2) and the AVX-512 build agree. */
typedef float qvf __attribute__((vector_size(32)));
typedef int32_t qvi __attribute__((vector_size(32)));
typedef double qvd __attribute__((vector_size(64)));
typedef int64_t qvl __attribute__((vector_size(64)));

/* a where mask (all ones) else b, bit for bit (np.where) */
Q_INLINE qvf q_self(qvi m, qvf a, qvf b) { return (qvf)(((qvi)a & m) | ((qvi)b & ~m)); }
Q_INLINE qvd q_seld(qvl m, qvd a, qvd b) { return (qvd)(((qvl)a & m) | ((qvl)b & ~m)); }
Q_INLINE qvd q_wide(qvf a) { return __builtin_convertvector(a, qvd); }
Q_INLINE qvf q_splat(float a) { return (qvf){a, a, a, a, a, a, a, a}; }
Q_INLINE qvd q_splatd(double a) { return (qvd){a, a, a, a, a, a, a, a}; }

/* ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)): the end of int4._psum */
Q_INLINE qvd q_tree(const qvd *r) { return ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])); }

/* int4._psum in float64 of float32 values P[e] (lanes: sub-blocks) */
Q_INLINE qvd q_psum64(const qvf *P) {
    qvd r[8];
    for (int j = 0; j < 8; j++) r[j] = ((q_wide(P[j]) + q_wide(P[j + 8])) + q_wide(P[j + 16])) + q_wide(P[j + 24]);
    return q_tree(r);
}

/* one candidate of the search: L = clip(rint(isc * xm), 0, 15); the sums of w L, w L L, w L x */
Q_INLINE void q_candidate(const qvf *X, const qvf *W, const qvf *XM, qvf isc, qvd *sl, qvd *sl2, qvd *sxl) {
    const qvf fifteen = q_splat(15.0f), bias = q_splat(Q_BIAS);
    qvd rl[8], rll[8], rlx[8];
    for (int j = 0; j < 8; j++) {
        for (int q = 0; q < 4; q++) {
            const int e = j + 8 * q;
            qvf t = isc * XM[e]; /* >= 0: isc > 0 and xm = x - min(x, 0) >= 0 */
            t = q_self(t < fifteen, t, fifteen);
            const qvf L = (t + bias) - bias;
            const qvf wl = W[e] * L;
            const qvd a = q_wide(wl), b = q_wide(wl * L), c = q_wide(wl * X[e]);
            if (q == 0) { rl[j] = a; rll[j] = b; rlx[j] = c; }
            else { rl[j] = rl[j] + a; rll[j] = rll[j] + b; rlx[j] = rlx[j] + c; }
        }
    }
    *sl = q_tree(rl);
    *sl2 = q_tree(rll);
    *sxl = q_tree(rlx);
}

/* the search (_qkx2) over the 21 candidates (plus the first, i = 10's isc): the best scale bs and
 * min bm per lane, by the error expanded from the sums, in the twin's order */
#define Q_ERR(s, m) ((s) * (s) * sl2 + (m) * (m) * sw + sxx + two * (s) * (m) * sl - two * (s) * sxl - \
                     two * (m) * sx)
Q_INLINE void q_search(const qvf *X, const qvf *W, const qvf *XM, qvf mn, qvf safe, qvd sw, qvd sx, qvd sxx,
                       qvd *bs_out, qvd *bm_out) {
    const qvd two = q_splatd(2.0), oned = q_splatd(1.0), zerod = q_splatd(0.0);
    qvd sl, sl2, sxl;
    const qvf isc0 = q_splat(15.0f) / safe;
    q_candidate(X, W, XM, isc0, &sl, &sl2, &sxl);
    qvd bs = q_wide(q_splat(1.0f) / isc0), bm = q_wide(mn);
    qvd best = Q_ERR(bs, bm);
    const qvd sl_0 = sl, sl2_0 = sl2, sxl_0 = sxl;
    for (int i = 0; i <= 20; i++) {
        /* the twin's f(_RMIN + _RDELTA * i + _NMAX): (-1 + 0.1 i) + 15 in double, then to float */
        const float c = (float)((-1.0 + 0.1 * (double)i) + 15.0);
        if (c == 15.0f) { /* i = 10: the first candidate's isc again, bitwise: the same sums */
            sl = sl_0; sl2 = sl2_0; sxl = sxl_0;
        } else {
            q_candidate(X, W, XM, q_splat(c) / safe, &sl, &sl2, &sxl);
        }
        const qvd D = sw * sl2 - sl * sl;
        const qvl ok = D > zerod;
        const qvd Ds = q_seld(ok, D, oned);
        qvd ts = (sw * sxl - sx * sl) / Ds;
        qvd tm = (sl2 * sx - sl * sxl) / Ds;
        const qvl pos = tm > zerod; /* the min is clamped to <= 0, the scale refitted */
        tm = q_seld(pos, zerod, tm);
        ts = q_seld(pos, sxl / q_seld(sl2 > zerod, sl2, oned), ts);
        const qvd mad = Q_ERR(ts, tm);
        const qvl better = ok & (mad < best);
        best = q_seld(better, mad, best);
        bs = q_seld(better, ts, bs);
        bm = q_seld(better, tm, bm);
    }
    *bs_out = bs;
    *bm_out = bm;
}
#undef Q_ERR

#if G2_X86
/* q_candidate with AVX-512 instructions the compiler does not pick on its own: vminps is exactly
 * `t < 15 ? t : 15` (it returns its second operand unless the first is smaller) and vroundps with
 * _MM_FROUND_TO_NEAREST_INT is round half to even, like the bias trick; one float32 -> float64
 * conversion per 8 lanes; the tree is summed as it goes (same additions, fewer live registers). */
static G2_TGT inline __attribute__((always_inline)) void q_candidate_avx512(
        const qvf *X, const qvf *W, const qvf *XM, qvf iscv, qvd *sl, qvd *sl2, qvd *sxl) {
    const __m256 fifteen = _mm256_set1_ps(15.0f), isc = (__m256)iscv;
    __m512d p[3][4]; /* pair sums (r0+r1), (r2+r3), (r4+r5), (r6+r7) of each of the 3 sums */
    for (int jp = 0; jp < 4; jp++) {
        __m512d r[3][2];
        for (int h = 0; h < 2; h++) {
            const int j = 2 * jp + h;
            __m512d a = _mm512_setzero_pd(), b = a, c = a;
            for (int q = 0; q < 4; q++) {
                const int e = j + 8 * q;
                __m256 t = _mm256_min_ps(_mm256_mul_ps(isc, (__m256)XM[e]), fifteen);
                const __m256 L = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                const __m256 wl = _mm256_mul_ps((__m256)W[e], L);
                const __m512d va = _mm512_cvtps_pd(wl), vb = _mm512_cvtps_pd(_mm256_mul_ps(wl, L)),
                              vc = _mm512_cvtps_pd(_mm256_mul_ps(wl, (__m256)X[e]));
                if (q == 0) { a = va; b = vb; c = vc; }
                else { a = _mm512_add_pd(a, va); b = _mm512_add_pd(b, vb); c = _mm512_add_pd(c, vc); }
            }
            r[0][h] = a; r[1][h] = b; r[2][h] = c;
        }
        for (int k = 0; k < 3; k++) p[k][jp] = _mm512_add_pd(r[k][0], r[k][1]);
    }
    qvd *out[3] = {sl, sl2, sxl};
    for (int k = 0; k < 3; k++)
        *out[k] = (qvd)_mm512_add_pd(_mm512_add_pd(p[k][0], p[k][1]), _mm512_add_pd(p[k][2], p[k][3]));
}

/* q_search in AVX-512 intrinsics: the same operations in the same order (the compiler scalarised
 * parts of the generic vector code); comparisons are the ordered, quiet predicates of C's < and >. */
static G2_TGT void q_search_avx512(const qvf *X, const qvf *W, const qvf *XM, qvf mnv, qvf safev, qvd swv,
                                   qvd sxv, qvd sxxv, qvd *bs_out, qvd *bm_out) {
    const __m512d two = _mm512_set1_pd(2.0), oned = _mm512_set1_pd(1.0), zerod = _mm512_setzero_pd();
    const __m512d sw = (__m512d)swv, sx = (__m512d)sxv, sxx = (__m512d)sxxv;
    const __m256 safe = (__m256)safev;
#define Q_ERR(s, m) _mm512_sub_pd(_mm512_sub_pd(_mm512_add_pd(_mm512_add_pd(_mm512_add_pd( \
        _mm512_mul_pd(_mm512_mul_pd(s, s), sl2), _mm512_mul_pd(_mm512_mul_pd(m, m), sw)), sxx), \
        _mm512_mul_pd(_mm512_mul_pd(_mm512_mul_pd(two, s), m), sl)), _mm512_mul_pd(_mm512_mul_pd(two, s), sxl)), \
        _mm512_mul_pd(_mm512_mul_pd(two, m), sx))
    qvd slv, sl2v, sxlv;
    const __m256 isc0 = _mm256_div_ps(_mm256_set1_ps(15.0f), safe);
    q_candidate_avx512(X, W, XM, (qvf)isc0, &slv, &sl2v, &sxlv);
    __m512d sl = (__m512d)slv, sl2 = (__m512d)sl2v, sxl = (__m512d)sxlv;
    __m512d bs = _mm512_cvtps_pd(_mm256_div_ps(_mm256_set1_ps(1.0f), isc0)), bm = _mm512_cvtps_pd((__m256)mnv);
    __m512d best = Q_ERR(bs, bm);
    const __m512d sl_0 = sl, sl2_0 = sl2, sxl_0 = sxl;
    for (int i = 0; i <= 20; i++) {
        const float c = (float)((-1.0 + 0.1 * (double)i) + 15.0);
        if (c == 15.0f) {
            sl = sl_0; sl2 = sl2_0; sxl = sxl_0;
        } else {
            q_candidate_avx512(X, W, XM, (qvf)_mm256_div_ps(_mm256_set1_ps(c), safe), &slv, &sl2v, &sxlv);
            sl = (__m512d)slv; sl2 = (__m512d)sl2v; sxl = (__m512d)sxlv;
        }
        const __m512d D = _mm512_sub_pd(_mm512_mul_pd(sw, sl2), _mm512_mul_pd(sl, sl));
        const __mmask8 ok = _mm512_cmp_pd_mask(D, zerod, _CMP_GT_OQ);
        const __m512d Ds = _mm512_mask_blend_pd(ok, oned, D);
        __m512d ts = _mm512_div_pd(_mm512_sub_pd(_mm512_mul_pd(sw, sxl), _mm512_mul_pd(sx, sl)), Ds);
        __m512d tm = _mm512_div_pd(_mm512_sub_pd(_mm512_mul_pd(sl2, sx), _mm512_mul_pd(sl, sxl)), Ds);
        const __mmask8 pos = _mm512_cmp_pd_mask(tm, zerod, _CMP_GT_OQ);
        tm = _mm512_mask_blend_pd(pos, tm, zerod);
        const __m512d sl2z = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(sl2, zerod, _CMP_GT_OQ), oned, sl2);
        ts = _mm512_mask_blend_pd(pos, ts, _mm512_div_pd(sxl, sl2z));
        const __m512d mad = Q_ERR(ts, tm);
        const __mmask8 better = ok & _mm512_cmp_pd_mask(mad, best, _CMP_LT_OQ);
        best = _mm512_mask_blend_pd(better, best, mad);
        bs = _mm512_mask_blend_pd(better, bs, ts);
        bm = _mm512_mask_blend_pd(better, bm, tm);
    }
#undef Q_ERR
    *bs_out = (qvd)bs;
    *bm_out = (qvd)bm;
}
#endif


/* clip(rint(t), 0, hi) for finite t, as the integer it is (hi <= 63) */
Q_INLINE uint8_t q_code(float t, float hi) {
    t = t > 0.0f ? t : 0.0f;
    t = t < hi ? t : hi;
    return (uint8_t)((t + Q_BIAS) - Q_BIAS);
}

/* one super-block: src 256 float32 inputs (finite, |x| <= 2^40) -> codes (128 bytes), meta (16
 * bytes). Returns 1 when d or dmin overflowed float16 (the row is then STATUS_TOO_LARGE). */
Q_INLINE int q_superblock(const float *src, uint8_t *codes, uint8_t *meta, int avx512) {
    qvf X[32], W[32], XM[32], P[32];
    for (int e = 0; e < 32; e++)
        for (int g = 0; g < 8; g++) X[e][g] = src[32 * g + e];

    /* _qkx2's inputs: min (clamped to <= 0, +0 for a zero min), max, weights av + |x| */
    const qvf zero = q_splat(0.0f);
    qvf lo = X[0], hi = X[0];
    for (int e = 1; e < 32; e++) {
        lo = q_self(X[e] < lo, X[e], lo);
        hi = q_self(X[e] > hi, X[e], hi);
    }
    qvf av;
    {
        qvf r[8];
        for (int j = 0; j < 8; j++) /* _psum in float32 of x * x */
            r[j] = ((X[j] * X[j] + X[j + 8] * X[j + 8]) + X[j + 16] * X[j + 16]) + X[j + 24] * X[j + 24];
        const qvf ss = (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))) / q_splat(32.0f);
        for (int g = 0; g < 8; g++) av[g] = sqrtf(ss[g]); /* IEEE sqrt: correctly rounded, as np.sqrt */
    }
    const qvf mn = q_self(lo < zero, lo, zero);
    const qvi flat = hi == mn;
    const qvi tiny = ~flat & (hi - mn < q_splat(Q_TINY)); /* scale 0, min -mn, no search (the twin's) */
    const qvf safe = q_self(flat | tiny, q_splat(1.0f), hi - mn);
    const qvi absmask = (qvi){0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff,
                              0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
    for (int e = 0; e < 32; e++) {
        W[e] = av + (qvf)((qvi)X[e] & absmask);
        XM[e] = X[e] - mn;
    }
    const qvd sw = q_psum64(W);
    for (int e = 0; e < 32; e++) P[e] = W[e] * X[e];
    const qvd sx = q_psum64(P);
    for (int e = 0; e < 32; e++) P[e] = P[e] * X[e];
    const qvd sxx = q_psum64(P);

    qvd bs, bm;
#if G2_X86
    if (avx512) q_search_avx512(X, W, XM, mn, safe, sw, sx, sxx, &bs, &bm);
    else
#endif
    q_search(X, W, XM, mn, safe, sw, sx, sxx, &bs, &bm);
    float sc[8], mv[8];
    for (int g = 0; g < 8; g++) {
        sc[g] = (flat[g] | tiny[g]) ? 0.0f : (float)bs[g];
        mv[g] = (float)(-(tiny[g] ? (double)mn[g] : bm[g]));
    }

    /* 6-bit scales and mins against the super-block's float16 d / dmin (quantize_int4) */
    float msc = sc[0], mmn = mv[0];
    for (int g = 1; g < 8; g++) {
        msc = sc[g] > msc ? sc[g] : msc;
        mmn = mv[g] > mmn ? mv[g] : mmn;
    }
    const float inv_sc = msc > Q_TINY ? 63.0f / msc : 0.0f; /* 63 / max would overflow below ~2e-37 */
    const float inv_mn = mmn > Q_TINY ? 63.0f / mmn : 0.0f;
    uint8_t v[16];
    for (int g = 0; g < 8; g++) {
        v[g] = q_code(inv_sc * sc[g], 63.0f);
        v[8 + g] = q_code(inv_mn * mv[g], 63.0f);
    }
    const uint16_t dh = q_f32_to_f16(msc > 0.0f ? msc / 63.0f : 0.0f);
    const uint16_t mh = q_f32_to_f16(mmn > 0.0f ? mmn / 63.0f : 0.0f);
    const float d = g2_f16_to_f32(dh), dmin = g2_f16_to_f32(mh);
    qvf Dg, Mg;
    for (int g = 0; g < 8; g++) {
        Dg[g] = d * (float)v[g];
        Mg[g] = dmin * (float)v[8 + g];
    }
    /* u = clip(rint((x + M) / D), 0, 15) where D > 0, else 0 */
    const qvi dpos = Dg > zero;
    const qvf Dz = q_self(dpos, Dg, q_splat(1.0f)), fifteen = q_splat(15.0f), bias = q_splat(Q_BIAS);
    qvi U[32];
    for (int e = 0; e < 32; e++) {
        qvf t = (X[e] + Mg) / Dz;
        t = q_self(t > zero, t, zero);
        t = q_self(t < fifteen, t, fifteen);
        U[e] = __builtin_convertvector((t + bias) - bias, qvi) & dpos;
    }
    for (int g = 0; g < 8; g++)
        for (int i = 0; i < 16; i++) codes[16 * g + i] = (uint8_t)(U[2 * i][g] | (U[2 * i + 1][g] << 4));
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

/* one row n: its status; a row with a bad status gets all-zero codes and meta (as the twin) */
Q_INLINE uint8_t q_row(const void *w, int src_bf16, int64_t n, int64_t K, uint8_t *codes, uint8_t *meta,
                        int avx512) {
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
    for (int64_t s = 0; s < K / 256 && !status; s++) {
        for (int k = 0; k < 256; k++) buf[k] = q_load(w, src_bf16, n * K + s * 256 + k);
        if (q_superblock(buf, codes + n * (K / 2) + s * 128, meta + n * (K / 16) + s * 16, avx512))
            status = Q_TOO_LARGE;
    }
    if (status) { /* a row int4 cannot hold: all-zero codes and meta (what zeros quantise to) */
        memset(codes + n * (K / 2), 0, (size_t)(K / 2));
        memset(meta + n * (K / 16), 0, (size_t)(K / 16));
    }
    return status;
}

static void q_rows_portable(const void *w, int src_bf16, int64_t n, int64_t K, uint8_t *codes,
                            uint8_t *meta, uint8_t *status) {
    status[n] = q_row(w, src_bf16, n, K, codes, meta, 0);
}

#if G2_X86
/* the same code, vectorised by the compiler for AVX-512 (same IEEE operations: same results) */
static G2_TGT void q_rows_avx512(const void *w, int src_bf16, int64_t n, int64_t K, uint8_t *codes,
                                 uint8_t *meta, uint8_t *status) {
    status[n] = q_row(w, src_bf16, n, K, codes, meta, 1);
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
