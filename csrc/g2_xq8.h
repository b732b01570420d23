/* The decode kernels' activation rounding (g2_int4.c, g2_q4_0.c; NumPy twin kernels/int4.py quantize_x):
 * one block of 32 inputs of x -> q = rint(x / sx) in -127..127, sx = amax / 127 (float32 division,
 * RNE; an all-zero block has sx = 0 and q = 0; a block holding inf or NaN gets sx = inf / NaN and
 * q = 0, so a dot product against it is inf / NaN as with float x). Shared so that both formats round
 * x identically; the scalar and AVX-512 versions give the same q and sx bit for bit (IEEE division,
 * round to nearest even, exact integer clamps). */
#ifndef G2_XQ8_H
#define G2_XQ8_H
#include "g2_internal.h"

#include <float.h>

/* scalar: q[0..31] in input order; returns sx, *qsum = sum q (exact) */
static inline float g2_xq8_block(const float *xb, int8_t *q, int *qsum) {
    float amax = 0.0f;
    int nan = 0;
    for (int i = 0; i < 32; i++) {
        const float a = fabsf(xb[i]);
        if (a != a) nan = 1;
        if (a > amax) amax = a;
    }
    const float sx = nan ? NAN : amax / 127.0f;
    const int ok = sx > 0.0f && sx <= FLT_MAX; /* 0, inf, NaN: q = 0 */
    int qs = 0;
    for (int i = 0; i < 32; i++) {
        int v = 0;
        if (ok) {
            const float r = rintf(xb[i] / sx); /* RNE (the default rounding mode) */
            v = r > 127.0f ? 127 : (r < -127.0f ? -127 : (int)r);
        }
        qs += v;
        q[i] = (int8_t)v;
    }
    *qsum = qs;
    return sx;
}

#if G2_X86
/* AVX-512: the same block as two vectors of 16 int32 q (inputs 0..15 in *qa, 16..31 in *qb); returns sx */
G2_INLINE G2_TGT float g2_xq8_block_avx512(const float *xb, __m512i *qa, __m512i *qb) {
    const __m512 absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    const __m512i q127 = _mm512_set1_epi32(127), qm127 = _mm512_set1_epi32(-127);
    const __m512 a = _mm512_loadu_ps(xb), b = _mm512_loadu_ps(xb + 16);
    const int nan = (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q)) != 0;
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, absm), _mm512_and_ps(b, absm)));
    const float sx = nan ? NAN : amax / 127.0f;
    __m512i va = _mm512_setzero_si512(), vb = _mm512_setzero_si512();
    if (sx > 0.0f && sx <= FLT_MAX) {
        const __m512 vs = _mm512_set1_ps(sx);
        const int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        va = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(a, vs), rn));
        vb = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(b, vs), rn));
        va = _mm512_max_epi32(_mm512_min_epi32(va, q127), qm127);
        vb = _mm512_max_epi32(_mm512_min_epi32(vb, q127), qm127);
    }
    *qa = va;
    *qb = vb;
    return sx;
}

#define G2_TGT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,avx2")))

/* the integer step: acc (16 dwords) += sum over each dword's 4 bytes of u (0..15) * q (int8) */
G2_INLINE G2_TGT_VNNI __m512i dot_vnni(__m512i acc, __m512i u, __m512i q) { return _mm512_dpbusd_epi32(acc, u, q); }
/* without VNNI (and at simd level 2, so tests run it): pairs to int16 (|15 * 127 * 2| < 2^15: no
 * saturation), pairs of those to int32: the same exact sums */
/* the high nibble of every byte: (b >> 4) & 15 -- two operations, or one GF(2) affine map (below) */
G2_INLINE G2_TGT __m512i g2_hi_nib(__m512i b, __m512i m15) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), m15); }
#define G2_TGT_GFNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,gfni,fma,avx2")))
/* gf2p8affineqb: output bit i of each byte = parity(matrix byte 7-i AND input byte); rows 7-i = 1 << (i + 4)
 * for i < 4 and 0 for i >= 4 make it b >> 4 exactly (a bit permutation, no arithmetic) */
G2_INLINE G2_TGT_GFNI __m512i g2_hi_nib_gfni(__m512i b, __m512i m15) {
    (void)m15;
    return _mm512_gf2p8affine_epi64_epi8(b, _mm512_set1_epi64((long long)0x1020408000000000ULL), 0);
}
/* GFNI present and not switched off by G2_GFNI=0 (an experiment knob, read once, as G2_PF) */
static inline int g2_has_gfni(void) {
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("G2_GFNI");
        v = __builtin_cpu_supports("gfni") && !(e && atoi(e) == 0) ? 1 : 0;
    }
    return v;
}
G2_INLINE G2_TGT __m512i dot_bw(__m512i acc, __m512i u, __m512i q) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, q), _mm512_set1_epi16(1)));
}
#endif
#endif
