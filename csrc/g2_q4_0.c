/* linear with llama.cpp's Q4_0 weights (the layout of gemma2np/kernels/q4_0.py: per block of 32 inputs
 * 16 code bytes -- byte i: input i low nibble, input i + 16 high -- and one f16 d; w = d * (u - 8)).
 *
 * Decode (M < G2_DP_MIN_M): x quantised to int8 per block of 32 once per call (the int4 decode's
 * rounding, g2_xq8.h), exact integer dot products with the codes (vpdpbusd; AVX-512BW pairs without
 * VNNI; plain C on the scalar path), then float32 scaling per block in one fixed order (the decode
 * comment below), 4 W rows per tile sharing the x loads: bitwise the NumPy twin kernels/q4_0.py
 * linear_decode for any thread count (rows are shared out in fixed blocks).
 * Prefill (M >= G2_DP_MIN_M) with avx512_bf16: as g2_int4.c, g2_gemm_op_drive (widen 3) -- x packed to
 * bf16 once, each block of rows widened straight to bf16 (g2_widen_q4_0_bf16) into per-thread scratch for
 * the vdpbf16ps tiles, all parts in one parallel loop. Otherwise (no avx512_bf16; the scalar path) fixed
 * blocks of rows widened to float32 (exact) then bf16 (RNE; on AVX-512 in one pass,
 * widen_q4_0_bf16_avx512) and run through g2_linear (G2_W_BF16DP) on one thread. Either way bitwise
 * g2_linear(..., G2_W_BF16DP) of the widened weights, for any thread count. */
#include "g2_internal.h"
#include "g2_linear.h"
#include "g2_xq8.h"

static void widen_q4_0_row(const uint8_t *codes, const uint16_t *sc, int64_t K, float *dst) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float d = g2_f16_to_f32(sc[b]);
        const uint8_t *c = codes + b * 16;
        float *o = dst + b * 32;
        for (int i = 0; i < 16; i++) {
            o[i] = d * (float)((int)(c[i] & 15) - 8);
            o[16 + i] = d * (float)((int)(c[i] >> 4) - 8);
        }
    }
}

/* ---- decode (M < G2_DP_MIN_M): x quantised to int8, integer dot products -------------------------
 *
 * llama.cpp's q4_0 x q8_0 dot product: each row of x is quantised once per call, per block of 32 inputs
 * (one Q4_0 block), by the int4 decode's rounding (g2_xq8.h: q = rint(x / sx) in -127..127, sx =
 * amax / 127; zero / inf / NaN blocks as there). Per row of W and block b, isum_b = sum (u - 8) q is an
 * exact integer, and y = sum_b (d_b sx_b) isum_b: the dot product of the dequantised W with the
 * dequantised x. The float work, in one fixed order (the NumPy twin kernels/q4_0.py linear_decode
 * replays it, so every output is bitwise the twin's):
 *   - the blocks go in groups of 4 (128 inputs; the last group padded with blocks of q = 0, sx = 0,
 *     d = 0, which add +0 to each lane and so change nothing); 16 lanes, lane l of group g holds the
 *     exact integer sum of (u - 8) q over the 8 inputs 32b + 4r .. + 3 and 32b + 16 + 4r .. + 3 of
 *     block b = 4g + l/4, r = l % 4 (|sum| <= 8 * 8 * 127 < 2^24: exact as a float);
 *   - S_b = d_b * sx_b (one rounding); acc_l = acc_l + (float)isum_l * S_{4g + l/4} (multiply, then
 *     add, no FMA);
 *   - y = the lanes summed as a fixed tree (l + 8, then + 4, + 2, + 1).
 * The integer sum is formed as sum u q - 8 sum q (both exact in int32: the same integer), which lets
 * vpdpbusd (unsigned u x signed q) do it; the 8 sum q per lane comes with the prepared x. Nothing
 * depends on the thread count, the rows per tile or M. Accuracy: docs/precision.md (GGUF). */

#define XG 256 /* one prepared group of 4 blocks of an x row: 128 int8 q, 16 int32, 16 floats */

/* x (M, K) -> xp: per row and group g (ceil(nb / 4) groups), XG bytes:
 *   [0, 64)     q of inputs 32b + i, i < 16 (block b = 4g + j at bytes 16j .. 16j + 15): the low nibbles
 *   [64, 128)   q of inputs 32b + 16 + i: the high nibbles
 *   [128, 192)  int32 q8[16]: lane l = 8 * (sum of q over lane l's 8 inputs)
 *   [192, 256)  float sx[16]: lane l = sx of block 4g + l/4
 * padded blocks (b >= nb): q = 0, sx = 0 */
static void prep_x_q4_0(const float *x, int64_t M, int64_t K, uint8_t *xp) {
    const int64_t nb = K / 32, ng = (nb + 3) / 4;
    memset(xp, 0, (size_t)(M * ng * XG));
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *grp = xp + (m * ng + b / 4) * XG;
            const int j = (int)(b % 4);
            int8_t q[32];
            int qs;
            const float sx = g2_xq8_block(x + m * K + b * 32, q, &qs);
            (void)qs;
            memcpy(grp + 16 * j, q, 16);
            memcpy(grp + 64 + 16 * j, q + 16, 16);
            int32_t q8[4];
            float sx4[4];
            for (int r = 0; r < 4; r++) {
                int t = 0;
                for (int i = 4 * r; i < 4 * r + 4; i++) t += q[i] + q[16 + i];
                q8[r] = 8 * t;
                sx4[r] = sx;
            }
            memcpy(grp + 128 + 16 * j, q8, 16);
            memcpy(grp + 192 + 16 * j, sx4, 16);
        }
}

/* the lane tree of the twin (kernels/q4_0.py _lane_tree): l + 8, then + 4, + 2, + 1 */
static inline float lane_tree(const float *a) {
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = a[i] + a[i + 8];
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* one row of W against one prepared x row, scalar (the reference order) */
static float row_q4_0_scalar(const uint8_t *xp, int64_t K, const uint8_t *codes, const uint16_t *sc) {
    const int64_t nb = K / 32, ng = (nb + 3) / 4;
    float acc[16] = {0};
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *grp = xp + g * XG;
        const int8_t *ql = (const int8_t *)grp, *qh = (const int8_t *)(grp + 64);
        int32_t q8[16];
        float sx[16];
        memcpy(q8, grp + 128, sizeof q8);
        memcpy(sx, grp + 192, sizeof sx);
        for (int l = 0; l < 16; l++) {
            const int64_t b = 4 * g + l / 4;
            const float d = b < nb ? g2_f16_to_f32(sc[b]) : 0.0f;
            int32_t isum = 0;
            if (b < nb)
                for (int i = 4 * (l % 4); i < 4 * (l % 4) + 4; i++) {
                    const int c = codes[b * 16 + i];
                    isum += (c & 15) * ql[16 * (l / 4) + i] + (c >> 4) * qh[16 * (l / 4) + i];
                }
            isum -= q8[l];
            acc[l] = acc[l] + (float)isum * (d * sx[l]);
        }
    }
    return lane_tree(acc);
}

#if G2_X86
#define G2_PF_Q4(p) _mm_prefetch((const char *)(p), _MM_HINT_T1) /* as the int4 decode tiles */

/* NR rows of W (NR <= 4) against one prepared x row, sharing its loads; per row exactly
 * row_q4_0_scalar's arithmetic (the integer lanes are dpbusd's dword sums: dword l of the 64 code bytes
 * of a group = bytes 4l .. 4l + 3 = block l/4, inputs 4r .. 4r + 3 (low nibbles) and + 16 (high)).
 * The last group's codes and scales are read with masked loads (zeros past the row's end). */
#define DEF_TILE_Q40(NAME, TGT, DOT, HI)                                                                     \
    static TGT __attribute__((noinline)) void NAME(const int NR, const uint8_t *xp, int64_t K,            \
                                                   const uint8_t *w, const uint16_t *sc, float *y,        \
                                                   int64_t ldy, const int PF) {                           \
        const int64_t nb = K / 32, ng = (nb + 3) / 4, wrow = K / 2;                                        \
        const __m512i m15 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();                           \
        const __m512i iA = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);               \
        __m512 acc[4];                                                                                     \
        int n;                                                                                             \
        for (n = 0; n < NR; n++) acc[n] = _mm512_setzero_ps();                                             \
        for (int64_t g = 0; g < ng; g++) {                                                                 \
            const uint8_t *xs = xp + g * XG;                                                               \
            const __m512i xl = _mm512_loadu_si512(xs), xh = _mm512_loadu_si512(xs + 64);                   \
            const __m512i q8 = _mm512_loadu_si512(xs + 128);                                               \
            const __m512 sx = _mm512_loadu_ps(xs + 192);                                                   \
            const int64_t left = nb - 4 * g;                                                               \
            const __mmask64 cm = left >= 4 ? ~(__mmask64)0 : (((__mmask64)1 << (16 * left)) - 1);          \
            const __mmask8 dm = left >= 4 ? (__mmask8)15 : (__mmask8)((1u << left) - 1);                   \
            if (PF)                                                                                        \
                for (n = 0; n < NR; n++) {                                                                 \
                    G2_PF_Q4(w + (NR + n) * wrow + g * 64);                                                \
                    if ((g & 7) == 0) G2_PF_Q4(sc + (NR + n) * nb + 4 * g); /* 8 groups' scales a line */  \
                }                                                                                          \
            for (n = 0; n < NR; n++) {                                                                     \
                const __m512i ca = _mm512_maskz_loadu_epi8(cm, w + n * wrow + g * 64);                     \
                const __m512 d4 = _mm512_cvtph_ps(_mm256_zextsi128_si256(_mm_maskz_loadu_epi16(dm, sc + n * nb + 4 * g))); \
                const __m512 S = _mm512_mul_ps(_mm512_permutexvar_ps(iA, d4), sx);                         \
                __m512i ia = DOT(zero, _mm512_and_si512(ca, m15), xl);                                     \
                ia = DOT(ia, HI(ca, m15), xh);                                                             \
                ia = _mm512_sub_epi32(ia, q8);                                                             \
                acc[n] = _mm512_add_ps(acc[n], _mm512_mul_ps(_mm512_cvtepi32_ps(ia), S));                  \
            }                                                                                              \
        }                                                                                                  \
        for (n = 0; n < NR; n++) {                                                                         \
            float a[16];                                                                                   \
            _mm512_storeu_ps(a, acc[n]);                                                                   \
            y[n * ldy] = lane_tree(a);                                                                     \
        }                                                                                                  \
    }
DEF_TILE_Q40(tile_q40_vnni, G2_TGT_VNNI, dot_vnni, g2_hi_nib)
DEF_TILE_Q40(tile_q40_gfni, G2_TGT_GFNI, dot_vnni, g2_hi_nib_gfni)
DEF_TILE_Q40(tile_q40_bw, G2_TGT, dot_bw, g2_hi_nib)

/* prep_x_q4_0 on AVX-512, bitwise the same (g2_xq8.h; exact integer sums) */
static G2_TGT void prep_x_q4_0_avx512(const float *x, int64_t M, int64_t K, uint8_t *xp) {
    const int64_t nb = K / 32, ng = (nb + 3) / 4;
    /* 16 int32 q (inputs 0..15 of a half) -> their sums in 4s: lane r = q[4r] + .. + q[4r + 3] */
    memset(xp, 0, (size_t)(M * ng * XG));
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *grp = xp + (m * ng + b / 4) * XG;
            const int j = (int)(b % 4);
            __m512i qa, qb;
            const float sx = g2_xq8_block_avx512(x + m * K + b * 32, &qa, &qb);
            _mm_storeu_si128((__m128i *)(grp + 16 * j), _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(grp + 64 + 16 * j), _mm512_cvtepi32_epi8(qb));
            int32_t t[16], q8[4];
            float sx4[4];
            _mm512_storeu_si512(t, _mm512_add_epi32(qa, qb));
            for (int r = 0; r < 4; r++) {
                q8[r] = 8 * (t[4 * r] + t[4 * r + 1] + t[4 * r + 2] + t[4 * r + 3]);
                sx4[r] = sx;
            }
            memcpy(grp + 128 + 16 * j, q8, 16);
            memcpy(grp + 192 + 16 * j, sx4, 16);
        }
}
#endif

/* decode: x prepared once, then the rows of every matrix in fixed blocks of Q40_ROWS (the same for any
 * thread count; every row's arithmetic is the same in a 4-row tile or alone), all blocks of all parts
 * in one parallel loop */
#define Q40_ROWS 32
static void decode_block(const uint8_t *xp, int64_t xrow, int64_t M, int64_t K, const uint8_t *codes,
                         const uint16_t *scales, int64_t N, float *y, int64_t n0, int64_t n1, int simd) {
#if G2_X86
    if (simd) {
        const int vnni = simd == 1 && (g2_cpu_features() & G2_CPU_AVX512VNNI) ? (g2_has_gfni() ? 2 : 1) : 0;
        for (int64_t m = 0; m < M; m++) {
            int64_t n = n0;
            for (; n + 4 <= n1; n += 4) {
                if (vnni == 2) tile_q40_gfni(4, xp + m * xrow, K, codes + n * (K / 2), scales + n * (K / 32), y + m * N + n, 1, g2_prefetch);
                else if (vnni) tile_q40_vnni(4, xp + m * xrow, K, codes + n * (K / 2), scales + n * (K / 32), y + m * N + n, 1, g2_prefetch);
                else tile_q40_bw(4, xp + m * xrow, K, codes + n * (K / 2), scales + n * (K / 32), y + m * N + n, 1, g2_prefetch);
            }
            for (; n < n1; n++) {
                if (vnni == 2) tile_q40_gfni(1, xp + m * xrow, K, codes + n * (K / 2), scales + n * (K / 32), y + m * N + n, 1, 0);
                else if (vnni) tile_q40_vnni(1, xp + m * xrow, K, codes + n * (K / 2), scales + n * (K / 32), y + m * N + n, 1, 0);
                else tile_q40_bw(1, xp + m * xrow, K, codes + n * (K / 2), scales + n * (K / 32), y + m * N + n, 1, 0);
            }
        }
        return;
    }
#endif
    (void)simd;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = row_q4_0_scalar(xp + m * xrow, K, codes + n * (K / 2), scales + n * (K / 32));
}

static int decode_q4_0(const float *x, int64_t M, int64_t K, int nparts, const uint8_t *const *codes,
                       const uint16_t *const *scales, const int64_t *N, float *const *y, int n_threads) {
    const int64_t ng = (K / 32 + 3) / 4, xrow = ng * XG;
    uint8_t *xp = (uint8_t *)malloc((size_t)(M * xrow));
    if (!xp) return -1;
#if G2_X86
    const int simd = g2_get_simd();
    if (simd) prep_x_q4_0_avx512(x, M, K, xp);
    else
#else
    const int simd = 0;
#endif
        prep_x_q4_0(x, M, K, xp);
    int64_t first[G2_MAX_PARTS + 1];
    double Ntot = 0.0;
    first[0] = 0;
    for (int p = 0; p < nparts; p++) {
        first[p + 1] = first[p] + (N[p] > 0 ? (N[p] + Q40_ROWS - 1) / Q40_ROWS : 0);
        Ntot += (double)(N[p] > 0 ? N[p] : 0);
    }
    const int64_t nblk = first[nparts];
    /* streaming the 4.5-bit weights; the integer tiles cost about as much per weight as vdpbf16ps per
     * multiply-add (as int4's decode) */
    const int nt = g2_par_threads(NT(n_threads), Ntot * (double)K * (0.5625 * G2_NS_PER_WBYTE) +
                                                     (double)M * Ntot * (double)K * G2_NS_PER_MAC_BF16DP);
    int64_t jb;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nblk > 1)
    for (jb = 0; jb < nblk; jb++) {
        int p = 0;
        while (jb >= first[p + 1]) p++;
        const int64_t n0 = (jb - first[p]) * Q40_ROWS, n1 = G2_MIN(N[p], n0 + Q40_ROWS);
        decode_block(xp, xrow, M, K, codes[p], scales[p], N[p], y[p], n0, n1, simd);
    }
    free(xp);
    return 0;
}

#if G2_X86
/* prefill's widening straight to bf16, 32 weights at a time: the same d * (u - 8) (exact in float32), then
 * round to nearest even by the integer trick (bits + 0x7FFF + lsb) >> 16 -- f32_to_bf16's result for every
 * non-NaN value (the loader refuses NaN / inf scales) -- so bitwise the scalar f32 + f32_to_bf16 path */
static G2_TGT void widen_q4_0_bf16_avx512(const uint8_t *codes, const uint16_t *sc, int64_t K, uint16_t *dst) {
    const __m512i m15 = _mm512_set1_epi32(15), e8 = _mm512_set1_epi32(8);
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
    for (int64_t b = 0; b < K / 32; b++) {
        const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + b * 16)));
        const __m512 vd = _mm512_set1_ps(g2_f16_to_f32(sc[b]));
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

#if G2_X86
/* Prefill's widening (g2_gemm_op_drive, widen 3): nr rows -> bf16 rows ldd apart. The same d * (u - 8) as
 * widen_q4_0_row (exact in float32: d is an f16, u - 8 a 4-bit integer), then vcvtne2ps2bf16: RNE with
 * f32_to_bf16's quiet-NaN bits, so bitwise widen_q4_0_row + f32_to_bf16. That converter flushes
 * denormals, but none can occur: d (u - 8) is 0 or a multiple of 2^-24 (f16's smallest denormal), far
 * above float32's denormal range. A block's low nibbles are inputs 0..15 and its high nibbles 16..31,
 * exactly the two halves vcvtne2ps2bf16(hi, lo) writes: no permute. */
G2_HIDDEN G2_TGT_BF16 void g2_widen_q4_0_bf16(const uint8_t *codes, const uint16_t *sc, int64_t nr, int64_t K,
                                              uint16_t *dst, int64_t ldd) {
    const __m512i m15 = _mm512_set1_epi32(15), e8 = _mm512_set1_epi32(8);
    for (int64_t n = 0; n < nr; n++) {
        const uint8_t *c = codes + n * (K / 2);
        const uint16_t *s = sc + n * (K / 32);
        uint16_t *o = dst + n * ldd;
        for (int64_t b = 0; b < K / 32; b++) {
            const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + b * 16)));
            const __m512 vd = _mm512_set1_ps(g2_f16_to_f32(s[b]));
            const __m512 lo = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(u, m15), e8)));
            const __m512 hi = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(u, 4), e8)));
            _mm512_storeu_si512((void *)(o + b * 32), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
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

/* prefill without avx512_bf16 (or scalar), one matrix */
static int prefill_q4_0(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales,
                        int64_t N, float *y, int n_threads) {
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

int g2_linear_q4_0_multi(const float *x, int64_t M, int64_t K, int nparts, const uint8_t *const *codes,
                         const uint16_t *const *scales, const int64_t *N, float *const *y, int n_threads) {
    if (M <= 0 || nparts <= 0) return 0;
    if (nparts > G2_MAX_PARTS) return -2;
    if (K <= 0 || K % 32) return -2;
    if (M < G2_DP_MIN_M) return decode_q4_0(x, M, K, nparts, codes, scales, N, y, n_threads);
#if G2_X86
    if (g2_use_bf16dp()) { /* prefill: the int4 recipe -- x packed once, blocks widened to bf16 in place */
        g2_part parts[G2_MAX_PARTS];
        int np = 0;
        double Ntot = 0.0;
        for (int p = 0; p < nparts; p++)
            if (N[p] > 0) { /* the f16 scale rows travel in the driver's (float *) scales slot, as int4's meta */
                g2_part pt = {(const char *)codes[p], (const float *)(const void *)scales[p], N[p], y[p]};
                parts[np++] = pt;
                Ntot += (double)N[p];
            }
        if (!np) return 0;
        const int nt = g2_par_threads(NT(n_threads), (double)M * Ntot * (double)K * G2_NS_PER_MAC_BF16DP);
        return g2_gemm_op_drive(x, M, K, parts, np, 3, 0, 0, nt);
    }
#endif
    for (int p = 0; p < nparts; p++) {
        if (N[p] <= 0) continue;
        const int rc = prefill_q4_0(x, M, K, codes[p], scales[p], N[p], y[p], n_threads);
        if (rc) return rc;
    }
    return 0;
}

int g2_linear_q4_0(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales,
                   int64_t N, float *y, int n_threads) {
    if (M <= 0 || N <= 0) return 0;
    return g2_linear_q4_0_multi(x, M, K, 1, &codes, &scales, &N, &y, n_threads);
}
