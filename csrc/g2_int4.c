/* linear with int4 weights (the layout of gemma2np/kernels/int4.py: Q4_K-like super-blocks of 256
 * inputs, 4-bit codes, 6-bit sub-block scales/mins against an f16 d / dmin; 4.5 bits per weight).
 *
 * Decode (M < G2_DP_MIN_M): x quantised to int8 per 32 inputs once per call, integer dot products
 * with the codes (vpdpbusd, the high nibbles by gf2p8affineqb with GFNI; AVX-512BW pairs without VNNI;
 * plain C on the scalar path), float32 scaling per sub-block in one fixed order (the decode comment
 * below) -- on g2_linear_drive.c's gemv driver, every W row streamed once. Where its time goes:
 * docs/performance.md (int4 / GGUF Q4_0 decode kernels). Bitwise the NumPy twin kernels/int4.py linear_decode.
 * Prefill (M >= G2_DP_MIN_M) with avx512_bf16: g2_gemm_op_drive, the int8 recipe -- x packed once,
 * each block of rows widened straight to bf16 (g2_widen_i4_bf16) for the vdpbf16ps tiles. Otherwise
 * (no avx512_bf16; the scalar path) W is cut into fixed blocks of rows (independent of the thread
 * count), each widened to float32 in per-thread scratch, rounded to bf16 (RNE) and run through
 * g2_linear (G2_W_BF16DP) on one thread. Prefill is bitwise the bfloat16_dp product of bf16 of the
 * dequantised W. So every output is computed by one fixed instruction sequence whatever the thread
 * count, the tiling or M. */
#include "g2_internal.h"
#include "g2_linear.h"
#include "g2_xq8.h"

#include <float.h>

/* super-block consts: D[j] = d * ls_j, Mn[j] = dmin * lm_j (both exact, see kernels/int4.py) */
static inline void sb_consts(const uint8_t *mb, float *D, float *Mn) {
    const float d = g2_f16_to_f32((uint16_t)(mb[0] | (mb[1] << 8)));
    const float dmin = g2_f16_to_f32((uint16_t)(mb[2] | (mb[3] << 8)));
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

/* ---- decode (M < G2_DP_MIN_M): x quantised to int8, integer dot products ------------------------
 *
 * llama.cpp's way (its Q4_K x Q8 dot products): each row of x is quantised once per call, per block
 * of 32 inputs (one int4 sub-block), to q = rint(x / sx) in -127..127 with sx = amax / 127 (float32
 * division, RNE; an all-zero block has sx = 0 and q = 0; a block holding inf or NaN gets sx = inf /
 * NaN and q = 0, so the output is inf / NaN as with float x). Per row of W and sub-block j of
 * super-block s the integer sums  sum u q  (u the 4-bit codes) and  sum q  are exact, and
 *   y = sum_{s,j} ((d ls_j) sx_j) sum u q  -  ((dmin lm_j) sx_j) sum q
 * is the dot product of the dequantised W with the dequantised x, q sx: the second term makes the
 * error from rounding x relative to |w|, not to (d ls) u. The float work, in one fixed order (the
 * NumPy twin kernels/int4.py linear_decode replays it, so every output is bitwise the twin's):
 *   - 16 float lanes per row; lane l (0..15) of half h (0: sub-blocks 0-3, 1: 4-7) of a super-block
 *     holds the exact integer sum u q over the 8 inputs s*256 + h*128 + 8l .. + 7 (sub-block
 *     4h + l/4), as a float (|sum| < 2^24);
 *   - S_j = ((float)ls_j * d) * sx_j and M_j = ((float)lm_j * dmin) * sx_j (d ls exact; one rounding);
 *   - per super-block: acc_l = acc_l + isum_l(h=0) * S_{l/4};  acc_l = acc_l + isum_l(h=1) * S_{4+l/4};
 *     acc_{8+j} = acc_{8+j} - M_j * (float)qsum_j  (separate multiply and add, no FMA);
 *   - y = ((a0+a8)+(a4+a12)) + ((a2+a10)+(a6+a14)) + ... : the halves added lane-wise 16 -> 8 -> 4 -> 2
 *     -> 1 (reduce16).
 * Nothing depends on the thread count, the rows per tile or M. Measured effect on accuracy:
 * docs/precision.md (int4). */

#define XSB 384 /* one prepared super-block of an x row: 256 int8 codes, then 16 + 16 floats */

/* x (M, K) -> xp: per row and super-block s, XSB bytes:
 *   [0, 128)    half 0 (sub-blocks 0-3): 64 bytes of the even inputs' q (sub-block j: bytes 16j..16j+15
 *               = q of inputs 2i), then 64 of the odd ones -- matching the low / high nibbles of the
 *               64 code bytes of that half;  [128, 256) half 1 alike
 *   [256, 320)  float sxx[16] = sx_0..7, sx_0..7 (the x scales, twice: against d ls_j and dmin lm_j)
 *   [320, 384)  float qv[16]  = 0 x 8, (float) sum q of sub-blocks 0..7 */
static void prep_x(const float *x, int64_t M, int64_t K, uint8_t *xp) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t s = 0; s < K / 256; s++) {
            uint8_t *blk = xp + (m * (K / 256) + s) * XSB;
            int8_t *xq = (int8_t *)blk;
            float sxx[16], qv[16];
            for (int j = 0; j < 8; j++) {
                int8_t q[32];
                int qs;
                const float sx = g2_xq8_block(x + m * K + s * 256 + j * 32, q, &qs);
                for (int i = 0; i < 32; i++) xq[(j / 4) * 128 + (i & 1) * 64 + (j % 4) * 16 + i / 2] = q[i];
                sxx[j] = sxx[8 + j] = sx;
                qv[j] = 0.0f;
                qv[8 + j] = (float)qs;
            }
            memcpy(blk + 256, sxx, sizeof sxx);
            memcpy(blk + 320, qv, sizeof qv);
        }
}

/* the 16 lanes -> one float, in reduce16's fixed order (module comment) */
static inline float reduce16(const float *a) {
    float t8[8], t4[4];
    for (int i = 0; i < 8; i++) t8[i] = a[i] + a[i + 8];
    for (int i = 0; i < 4; i++) t4[i] = t8[i] + t8[i + 4];
    return (t4[0] + t4[2]) + (t4[1] + t4[3]);
}

/* one row of W against one prepared x row: the reference order, used where there is no AVX-512 */
static float row_q_scalar(const uint8_t *xp, int64_t K, const uint8_t *codes, const uint8_t *meta) {
    float acc[16] = {0};
    for (int64_t s = 0; s < K / 256; s++) {
        const uint8_t *blk = xp + s * XSB, *mb = meta + s * 16, *c = codes + s * 128;
        const int8_t *xq = (const int8_t *)blk;
        float sxx[16], qv[16], S[16];
        memcpy(sxx, blk + 256, sizeof sxx);
        memcpy(qv, blk + 320, sizeof qv);
        const float d = g2_f16_to_f32((uint16_t)(mb[0] | (mb[1] << 8)));
        const float dmin = g2_f16_to_f32((uint16_t)(mb[2] | (mb[3] << 8)));
        for (int g = 0; g < 4; g++) {
            const uint32_t word = (uint32_t)mb[4 + 3 * g] | ((uint32_t)mb[5 + 3 * g] << 8) | ((uint32_t)mb[6 + 3 * g] << 16);
            for (int t = 0; t < 4; t++) {
                const int v = 4 * g + t;
                S[v] = ((float)((word >> (6 * t)) & 63u) * (v < 8 ? d : dmin)) * sxx[v];
            }
        }
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 16; l++) {
                const int qq = l / 4, r = l % 4;
                int32_t isum = 0;
                for (int i = 4 * r; i < 4 * r + 4; i++) {
                    const int b = c[h * 64 + qq * 16 + i];
                    isum += (b & 15) * xq[h * 128 + qq * 16 + i] + (b >> 4) * xq[h * 128 + 64 + qq * 16 + i];
                }
                acc[l] = acc[l] + (float)isum * S[4 * h + qq];
            }
        for (int j = 8; j < 16; j++) acc[j] = acc[j] - S[j] * qv[j];
    }
    return reduce16(acc);
}

#if G2_X86
/* Prefill's widening (g2_gemm_op_drive, widen 2): straight to bf16 in registers, the same float32
 * values as widen_i4_row ((d ls_j) u - dmin lm_j: two exact products, one rounding; the 16 sub-block
 * constants from one vectorised 6-bit unpack), then vcvtne2ps2bf16 (RNE, quiet NaN: f32_to_bf16's
 * bits). That converter flushes denormals, but none can occur: d ls u and dmin lm are multiples of
 * 2^-24 (d, dmin are f16), so their difference is 0 or >= 2^-24 in magnitude. */
G2_HIDDEN G2_TGT_BF16 void g2_widen_i4_bf16(const uint8_t *codes, const uint8_t *meta, int64_t nr, int64_t K,
                                            uint16_t *dst, int64_t ldd) {
    const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i m15 = _mm512_set1_epi32(15), m63 = _mm512_set1_epi32(63);
    const __m512i sh6 = _mm512_setr_epi32(0, 6, 12, 18, 0, 6, 12, 18, 0, 6, 12, 18, 0, 6, 12, 18);
    const __m512i pick6 = _mm512_setr_epi32(0x80060504, 0x80060504, 0x80060504, 0x80060504, 0x80090807, 0x80090807,
                                            0x80090807, 0x80090807, 0x800C0B0A, 0x800C0B0A, 0x800C0B0A, 0x800C0B0A,
                                            0x800F0E0D, 0x800F0E0D, 0x800F0E0D, 0x800F0E0D);
    const __m256i pickd = _mm256_setr_epi16(0x0100, 0x0100, 0x0100, 0x0100, 0x0100, 0x0100, 0x0100, 0x0100, 0x0302,
                                            0x0302, 0x0302, 0x0302, 0x0302, 0x0302, 0x0302, 0x0302);
    for (int64_t n = 0; n < nr; n++)
        for (int64_t s = 0; s < K / 256; s++) {
            const uint8_t *c = codes + n * (K / 2) + s * 128;
            const __m512i mm = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(meta + n * (K / 16) + s * 16)));
            const __m512 dd = _mm512_cvtph_ps(_mm256_shuffle_epi8(_mm512_castsi512_si256(mm), pickd));
            const __m512 ls = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(mm, pick6), sh6), m63));
            float DM[16]; /* D_0..7 = d ls_j, Mn_0..7 = dmin lm_j, exact */
            _mm512_storeu_ps(DM, _mm512_mul_ps(ls, dd));
            for (int j = 0; j < 8; j++) {
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + j * 16)));
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, m15));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
                const __m512 vd = _mm512_set1_ps(DM[j]), vm = _mm512_set1_ps(DM[8 + j]);
                const __m512 w0 = _mm512_sub_ps(_mm512_mul_ps(_mm512_permutex2var_ps(lo, ilo, hi), vd), vm);
                const __m512 w1 = _mm512_sub_ps(_mm512_mul_ps(_mm512_permutex2var_ps(lo, ihi, hi), vd), vm);
                _mm512_storeu_si512((void *)(dst + n * ldd + s * 256 + j * 32), (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
            }
        }
}
#endif

#if G2_X86
#define G2_PF_I4(p) _mm_prefetch((const char *)(p), _MM_HINT_T1) /* as the int8 decode tiles (g2_linear.c) */
/* reduce16 of 4 rows' lanes at once, the same additions with the same operands in the same order
 * (so bitwise reduce16, NaN payloads included): two rows per register, low 8 lanes + high 8 (t8), then
 * lanes i + (i + 4) of each row's t8 (t4, one row per 128-bit lane), then (t4[0] + t4[2]) + (t4[1] + t4[3])
 * within each 128-bit lane. ~15 vector operations instead of ~60 scalar loads and adds per tile. */
G2_INLINE G2_TGT void reduce16_x4(const __m512 acc[4], float *y) {
    const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(acc[0], acc[1], 0x44), _mm512_shuffle_f32x4(acc[0], acc[1], 0xEE));
    const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2], acc[3], 0x44), _mm512_shuffle_f32x4(acc[2], acc[3], 0xEE));
    /* 128-bit lanes (t01: r0 t8[0..3], r0 t8[4..7], r1 .., r1 ..) -> (r0, r1, r2, r3) x t8[0..3] and x t8[4..7] */
    const __m512 t4 = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
    const __m512 u = _mm512_add_ps(t4, _mm512_permute_ps(t4, 0x4E));  /* (t4[0] + t4[2], t4[1] + t4[3], ..) */
    const __m512 v = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));    /* element 0: u0 + u1 */
    _mm_storeu_ps(y, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), v)));
}

/* G2_TGT_VNNI, dot_vnni, dot_bw: the integer step (g2_xq8.h, shared with g2_q4_0.c) */

/* NR rows of W (NR <= 4) against one prepared x row, sharing its loads; per row exactly row_q_scalar's
 * arithmetic (16 lanes = its acc[16]; the integer lanes are the dword sums of dpbusd: dword l of the
 * 64 code bytes of half h = bytes 4l..4l+3 = sub-block 4h + l/4, inputs 8l..8l+7 of the half) */
#define DEF_TILE_Q(NAME, TGT, DOT, HI)                                                                       \
    G2_INLINE TGT void NAME(const int NR, const uint8_t *xp, int64_t K, const uint8_t *w, const uint8_t *meta, \
                            float *y, const int PF) {                                                     \
        const int64_t wrow = K / 2, mrow = K / 16;                                                         \
        const __m512i m15 = _mm512_set1_epi8(15), m63 = _mm512_set1_epi32(63), zero = _mm512_setzero_si512(); \
        const __m512i sh6 = _mm512_setr_epi32(0, 6, 12, 18, 0, 6, 12, 18, 0, 6, 12, 18, 0, 6, 12, 18);    \
        /* 128-bit lane g (the broadcast meta) -> its 4 dwords = bytes 4+3g .. 6+3g (one 24-bit group) */  \
        const __m512i pick6 = _mm512_setr_epi32(0x80060504, 0x80060504, 0x80060504, 0x80060504,          \
                                                0x80090807, 0x80090807, 0x80090807, 0x80090807,          \
                                                0x800C0B0A, 0x800C0B0A, 0x800C0B0A, 0x800C0B0A,          \
                                                0x800F0E0D, 0x800F0E0D, 0x800F0E0D, 0x800F0E0D);         \
        /* 16 halves: d (bytes 0-1) x 8, dmin (bytes 2-3) x 8 */                                         \
        const __m256i pickd = _mm256_setr_epi16(0x0100, 0x0100, 0x0100, 0x0100, 0x0100, 0x0100, 0x0100,  \
                                                0x0100, 0x0302, 0x0302, 0x0302, 0x0302, 0x0302, 0x0302,  \
                                                0x0302, 0x0302);                                         \
        const __m512i iA = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);               \
        const __m512i iB = _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);               \
        __m512 acc[4];                                                                                     \
        int n;                                                                                             \
        for (n = 0; n < NR; n++) acc[n] = _mm512_setzero_ps();                                             \
        for (int64_t s = 0; s < K / 256; s++) {                                                            \
            const uint8_t *xs = xp + s * XSB;                                                              \
            const __m512i xal = _mm512_loadu_si512(xs), xah = _mm512_loadu_si512(xs + 64);                 \
            const __m512i xbl = _mm512_loadu_si512(xs + 128), xbh = _mm512_loadu_si512(xs + 192);          \
            const __m512 sxx = _mm512_loadu_ps(xs + 256), qv = _mm512_loadu_ps(xs + 320);                  \
            if (PF)                                                                                        \
                for (n = 0; n < NR; n++) {                                                                 \
                    G2_PF_I4(w + (NR + n) * wrow + s * 128);                                               \
                    G2_PF_I4(w + (NR + n) * wrow + s * 128 + 64);                                          \
                    if ((s & 3) == 0) G2_PF_I4(meta + (NR + n) * mrow + s * 16);                           \
                }                                                                                          \
            for (n = 0; n < NR; n++) {                                                                     \
                const __m512i mm = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(meta + n * mrow + s * 16))); \
                const __m512 dd = _mm512_cvtph_ps(_mm256_shuffle_epi8(_mm512_castsi512_si256(mm), pickd)); \
                const __m512 ls = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(mm, pick6), sh6), m63)); \
                const __m512 S = _mm512_mul_ps(_mm512_mul_ps(ls, dd), sxx);                                \
                const uint8_t *c = w + n * wrow + s * 128;                                                 \
                const __m512i ca = _mm512_loadu_si512(c), cb = _mm512_loadu_si512(c + 64);                 \
                __m512i ia = DOT(zero, _mm512_and_si512(ca, m15), xal);                                    \
                ia = DOT(ia, HI(ca, m15), xah);                                                            \
                __m512i ib = DOT(zero, _mm512_and_si512(cb, m15), xbl);                                    \
                ib = DOT(ib, HI(cb, m15), xbh);                                                            \
                acc[n] = _mm512_add_ps(acc[n], _mm512_mul_ps(_mm512_cvtepi32_ps(ia), _mm512_permutexvar_ps(iA, S))); \
                acc[n] = _mm512_add_ps(acc[n], _mm512_mul_ps(_mm512_cvtepi32_ps(ib), _mm512_permutexvar_ps(iB, S))); \
                acc[n] = _mm512_sub_ps(acc[n], _mm512_maskz_mul_ps(0xFF00, S, qv));                        \
            }                                                                                              \
        }                                                                                                  \
        if (NR == 4)                                                                                       \
            reduce16_x4(acc, y);                                                                           \
        else                                                                                               \
            for (n = 0; n < NR; n++) {                                                                     \
                float a[16];                                                                               \
                _mm512_storeu_ps(a, acc[n]);                                                               \
                y[n] = reduce16(a);                                                                        \
            }                                                                                              \
    }
DEF_TILE_Q(tile_q_vnni, G2_TGT_VNNI, dot_vnni, g2_hi_nib)
DEF_TILE_Q(tile_q_gfni, G2_TGT_GFNI, dot_vnni, g2_hi_nib_gfni)
DEF_TILE_Q(tile_q_bw, G2_TGT, dot_bw, g2_hi_nib)

/* prep_x on AVX-512, bitwise the same (g2_xq8.h: IEEE division, RNE rounding, exact integer sums) */
static G2_TGT void prep_x_avx512(const float *x, int64_t M, int64_t K, uint8_t *xp) {
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int64_t m = 0; m < M; m++)
        for (int64_t s = 0; s < K / 256; s++) {
            uint8_t *blk = xp + (m * (K / 256) + s) * XSB;
            float sxx[16], qv[16];
            for (int j = 0; j < 8; j++) {
                __m512i qa, qb;
                const float sx = g2_xq8_block_avx512(x + m * K + s * 256 + j * 32, &qa, &qb);
                int8_t *dst = (int8_t *)blk + (j / 4) * 128 + (j % 4) * 16;
                _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(qa, ev, qb)));
                _mm_storeu_si128((__m128i *)(dst + 64), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(qa, od, qb)));
                sxx[j] = sxx[8 + j] = sx;
                qv[j] = 0.0f;
                qv[8 + j] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
            }
            memcpy(blk + 256, sxx, sizeof sxx);
            memcpy(blk + 320, qv, sizeof qv);
        }
}

/* g2_gemv_drive's tile signature: meta rides in the scales slot (its row of K/16 bytes is nb = K/64
 * "floats" apart, so the driver's sc + n * nb lands on row n's bytes) */
#define DEF_TILE_I4(NAME, TGT, BODY, NR)                                                          \
    static TGT __attribute__((noinline)) void NAME(                                               \
        const void *x, int64_t K, const void *w, const float *sc, int64_t block, int64_t nb,      \
        float *y, int64_t ldy) {                                                                  \
        (void)block; (void)nb; (void)ldy;                                                         \
        BODY(NR, (const uint8_t *)x, K, (const uint8_t *)w, (const uint8_t *)sc, y, NR > 1 && g2_prefetch); \
    }
DEF_TILE_I4(tile_i4v_4, G2_TGT_VNNI, tile_q_vnni, 4)
DEF_TILE_I4(tile_i4v_1, G2_TGT_VNNI, tile_q_vnni, 1)
DEF_TILE_I4(tile_i4g_4, G2_TGT_GFNI, tile_q_gfni, 4)
DEF_TILE_I4(tile_i4g_1, G2_TGT_GFNI, tile_q_gfni, 1)
DEF_TILE_I4(tile_i4b_4, G2_TGT, tile_q_bw, 4)
DEF_TILE_I4(tile_i4b_1, G2_TGT, tile_q_bw, 1)
#endif

void g2_dequantize_int4(const uint8_t *codes, const uint8_t *meta, int64_t N, int64_t K, float *out,
                        int n_threads) {
    const int nt = g2_par_threads(NT(n_threads), (double)N * (double)K * G2_NS_PER_ELEM);
    int64_t n;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (n = 0; n < N; n++) widen_i4_row(codes + n * (K / 2), meta + n * (K / 256) * 16, K, out + n * K);
}

/* prefill without avx512_bf16 (or scalar), one matrix */
static int prefill_blocks(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint8_t *meta, int64_t N,
                          float *y, int n_threads) {
    /* rows per block ~256 KB of widened float32 rows (in
     * L2 while x runs over it), a multiple of 4; fixed by K alone, so never by the thread count */
    int64_t R = (256 * 1024) / (K * 4);
    R = R / 4 * 4;
    if (R < 4) R = 4;
    const int64_t nblk = (N + R - 1) / R;
    /* streaming the 4.5-bit weights plus the widening and the multiply-adds */
    const double macs = (double)M * (double)N * (double)K;
    int nt = g2_par_threads(NT(n_threads), (double)N * (double)K * (0.5625 * G2_NS_PER_WBYTE + G2_NS_PER_ELEM * 0.25) +
                                               macs * G2_NS_PER_MAC_BF16DP);
    if (nt > nblk) nt = (int)nblk;
    const size_t wbytes = (size_t)(R * K) * sizeof(float), ybytes = (size_t)(M * R) * sizeof(float);
    char *scratch_all = (char *)malloc((size_t)nt * (wbytes + wbytes / 2 + ybytes));
    if (!scratch_all) return -1;
    int fail = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        char *mine = scratch_all + (size_t)g2_thread_id() * (wbytes + wbytes / 2 + ybytes);
        float *wf = (float *)mine;
        float *yt = (float *)(mine + wbytes);
        uint16_t *wb = (uint16_t *)(mine + wbytes + ybytes);
        int64_t b;
#pragma omp for schedule(static)
        for (b = 0; b < nblk; b++) {
            const int64_t n0 = b * R, nr = G2_MIN(R, N - n0);
            for (int64_t r = 0; r < nr; r++)
                widen_i4_row(codes + (n0 + r) * (K / 2), meta + (n0 + r) * (K / 256) * 16, K, wf + r * K);
            /* bf16(w) (RNE); x rounded to bf16 by g2_linear */
            for (int64_t i = 0; i < nr * K; i++) wb[i] = f32_to_bf16(wf[i]);
            const int rc = g2_linear(x, M, K, G2_W_BF16DP, wb, NULL, 0, nr, NULL, yt, 1);
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

int g2_linear_int4_multi(const float *x, int64_t M, int64_t K, int nparts, const uint8_t *const *codes,
                         const uint8_t *const *meta, const int64_t *N, float *const *y, int n_threads) {
    if (M <= 0 || nparts <= 0) return 0;
    if (nparts > G2_MAX_PARTS) return -2;
    if (K <= 0 || K % 256) return -2;
    double Ntot = 0.0;
    for (int p = 0; p < nparts; p++) Ntot += (double)N[p];
    if (Ntot <= 0.0) return 0;
    if (M < G2_DP_MIN_M) { /* decode: x quantised once, then every row of W streamed once */
        const int64_t xrow = K / 256 * XSB;
        uint8_t *xp = (uint8_t *)malloc((size_t)(M * xrow));
        if (!xp) return -1;
#if G2_X86
        if (g2_get_simd()) {
            prep_x_avx512(x, M, K, xp);
            /* streaming the 4.5-bit weights; the integer tiles cost about as much per weight as
             * vdpbf16ps per multiply-add */
            const int nt = g2_par_threads(NT(n_threads), Ntot * (double)K * (0.5625 * G2_NS_PER_WBYTE) +
                                                             (double)M * Ntot * (double)K * G2_NS_PER_MAC_BF16DP);
            const int vnni = g2_get_simd() == 1 && (g2_cpu_features() & G2_CPU_AVX512VNNI);
            g2_part parts[G2_MAX_PARTS];
            int np = 0;
            for (int p = 0; p < nparts; p++)
                if (N[p] > 0) {
                    g2_part pt = {(const char *)codes[p], (const float *)(const void *)meta[p], N[p], y[p]};
                    parts[np++] = pt;
                }
            const int gfni = vnni && g2_has_gfni();
            g2_gemv_drive(gfni ? tile_i4g_4 : vnni ? tile_i4v_4 : tile_i4b_4, 4, gfni ? tile_i4g_1 : vnni ? tile_i4v_1 : tile_i4b_1, xp, xrow, M, K, parts,
                          np, K / 2, 0, K / 64, nt);
            free(xp);
            return 0;
        }
#endif
        prep_x(x, M, K, xp);
        const int ns = g2_par_threads(NT(n_threads), (double)M * Ntot * (double)K * G2_NS_PER_MAC_SCALAR);
        for (int p = 0; p < nparts; p++) {
            const int64_t Np = N[p];
            const uint8_t *cp = codes[p], *mp = meta[p];
            float *yp = y[p];
            int64_t n;
#pragma omp parallel for schedule(static) num_threads(ns) if (ns > 1)
            for (n = 0; n < Np; n++)
                for (int64_t m = 0; m < M; m++)
                    yp[m * Np + n] = row_q_scalar(xp + m * xrow, K, cp + n * (K / 2), mp + n * (K / 16));
        }
        free(xp);
        return 0;
    }
#if G2_X86
    if (g2_use_bf16dp()) { /* prefill: the int8 recipe -- x packed once, blocks widened to bf16 in place */
        g2_part parts[G2_MAX_PARTS];
        int np = 0;
        for (int p = 0; p < nparts; p++)
            if (N[p] > 0) {
                g2_part pt = {(const char *)codes[p], (const float *)(const void *)meta[p], N[p], y[p]};
                parts[np++] = pt;
            }
        const int nt = g2_par_threads(NT(n_threads), (double)M * Ntot * (double)K * G2_NS_PER_MAC_BF16DP);
        return g2_gemm_op_drive(x, M, K, parts, np, 2, 0, K / 64, nt);
    }
#endif
    for (int p = 0; p < nparts; p++) {
        if (N[p] <= 0) continue;
        const int rc = prefill_blocks(x, M, K, codes[p], meta[p], N[p], y[p], n_threads);
        if (rc) return rc;
    }
    return 0;
}

int g2_linear_int4(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint8_t *meta,
                   int64_t N, float *y, int n_threads) {
    if (M <= 0 || N <= 0) return 0;
    return g2_linear_int4_multi(x, M, K, 1, &codes, &meta, &N, &y, n_threads);
}
