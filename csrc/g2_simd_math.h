/* AVX-512 versions of the scalar math helpers, shared by g2_linear.c, g2_attention.c and
 * g2_elementwise.c (always inlined into their AVX-512 callers). Include after g2_internal.h. */
#ifndef G2_SIMD_MATH_H
#define G2_SIMD_MATH_H

#include "g2_internal.h"

#if G2_X86

/* float32 -> bf16 bits in the low 16 bits of each 32-bit lane, RNE, NaN -> quiet NaN: exactly
 * f32_to_bf16 (denormals kept, unlike vcvtneps2bf16). */
G2_INLINE G2_TGT __m512i g2_rne_bf16_epi32(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

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

#endif /* G2_X86 */
#endif
