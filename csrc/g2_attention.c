/* Fused attention, flash style (no T x S matrix; memory O(T * D)), on the scalar path or the
 * AVX-512 one. The scalar helpers and their AVX-512 twins sit side by side; tests/test_kernels.py
 * and tests/test_attention_kernels.py run both (the `simd` fixture) against the NumPy twin
 * (kernels/twins.py: attention), which follows the same chunking and merge order.
 *
 * The arithmetic of one query row (the same whatever the schedule or the thread count):
 *   - the keys are cut into FIXED chunks of ATT_CHUNK keys, [0, 256), [256, 512), ...;
 *   - a chunk's partial (max m, sum l, unnormalised sum of p * v) is an online softmax over its
 *     blocks of ATT_BLOCK keys, masked keys skipped;
 *   - the partials of the chunks with a visible key are merged in chunk order,
 *     M' = max(M, m), L' = L * e^(M - M') + l * e^(m - M'), acc' = acc * e^(M - M') + a_c * e^(m - M');
 *   - out = acc / L (a row with no visible key: the uniform average over all S keys);
 *   - a score q . k sums D in blocks of ATT_DBLK = 16 elements: per block one chain in d order
 *     from 0, then the block sums in block order from 0 (dot_scalar). The AVX-512 path computes
 *     the same chains with fused multiply-adds, 64 keys in the lanes of 4 registers (K transposed
 *     per block of keys), so its scores are a plain register GEMM; the scalar path and the twin
 *     round each product. (Until issue #15 a score was 16 lanes over D then a horizontal tree sum
 *     on the AVX-512 path, 8 lanes on the scalar one: docs/precision.md has the accuracy of both.)
 *     Every row (1 query row of decode or 128 of a prefill block) has this one arithmetic.
 * Two schedules compute it:
 *   - stream (prefill, or one thread): work items are (batch, kv head, block of ATT_QBLOCK query
 *     rows) for all the query heads of the group; a chunk is read once for those rows (it stays in
 *     L2) and merged into the rows' running state at once; chunks no row of the block can see
 *     (causal future, outside the sliding window: decided from k_pos alone) are never touched;
 *   - split (decode: few query rows, several threads): work items are (batch, kv head, chunk),
 *     their partials go to a buffer and are merged per row afterwards, in chunk order
 *     (flash-decoding), so the threads share the keys of a single query row.
 * Both call the same att_row_chunk / att_merge, so their results are bitwise equal.
 *
 * K and V are float32 or bf16 bits (uint16, widened exactly in registers), with element strides
 * (batch, head, row) and a contiguous last axis, so a view into a preallocated cache needs no copy. */
#include "g2_internal.h"
#include "g2_simd_math.h"

#include <string.h>

#define ATT_BLOCK 64   /* keys per inner online-softmax step (scores kept on the stack) */
#define ATT_CHUNK 256  /* keys per chunk: the unit of the split and of the merge; a constant (never
                        * derived from the thread count) so the bits do not depend on the threads;
                        * a multiple of ATT_BLOCK */
#define ATT_QBLOCK 64  /* query rows (per query head) of a stream work item: each K/V chunk comes from
                        * memory once per item and from L2 for its later tiles (at 16 rows, 2 query
                        * heads, the K/V traffic was ~64 bytes per score) */
#define ATT_SPLIT_MAXT 16 /* query rows up to which few work items take the split schedule */

typedef struct {
    const char *k, *v;   /* base pointers */
    int64_t esz;         /* bytes per element: 4 (float32) or 2 (bf16 bits) */
    int bf16;
    int64_t ksb, ksh, kss, vsb, vsh, vss; /* element strides (batch, head, row) */
    const int64_t *k_pos;
    const uint8_t *key_valid; /* (B, S) or NULL */
    int64_t S, D, window;
    float scaling, softcap;
    int simd;
} att_ctx;

static inline const void *att_krow(const att_ctx *c, int64_t b, int64_t g, int64_t s) {
    return c->k + (b * c->ksb + g * c->ksh + s * c->kss) * c->esz;
}

static inline const void *att_vrow(const att_ctx *c, int64_t b, int64_t g, int64_t s) {
    return c->v + (b * c->vsb + g * c->vsh + s * c->vss) * c->esz;
}

/* ---- scalar math of the portable path: float32 results of the double functions, so the NumPy
 * twin reproduces them bitwise (np.exp / np.tanh in float64, then rounded to float32). libm's and
 * NumPy's double results may differ in their last bit, which changes the float32 only when the
 * exact value lies within a double ulp of a float32 rounding boundary (odds ~2^-29 per value; none
 * in 2e7 random arguments of each). The earlier kernel used expf / tanhf (not reproducible by
 * NumPy); these are as accurate (correctly rounded but for such boundary cases). ------------------ */

static inline float exp_ref(float x) { return (float)exp((double)x); }
static inline float tanh_ref(float x) { return (float)tanh((double)x); }

/* the rescale factor e^(a - b) of the online softmax and the merge: expf on the AVX-512 path (what
 * the earlier one-row kernel used), exp_ref on the scalar path */
static inline float att_rescale(int simd, float x) { return simd ? expf(x) : exp_ref(x); }

static inline float bf16_widen(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- scores of keys [s0, s1) for one query row: sbuf[s - s0] = softcap(q . k_s * scaling) for
 * visible keys, 0 for the others ---------------------------------------------------------- */

/* q . k over D in the kernel's order (the AVX-512 path's, with its products fused): per block of
 * ATT_DBLK elements a chain P_i = ((0 + q_d k_d) + q_(d+1) k_(d+1)) + ... in d order, then
 * ((0 + P_0) + P_1) + ... in block order. One sequential chain per block keeps the AVX-512 scores
 * a plain outer-product GEMM (no horizontal reduce); the block sums keep each chain short (16
 * terms), so the rounding error stays about that of the earlier 16-lane sum (measured:
 * docs/precision.md, "Attention scores"). */
#define ATT_DBLK 16
static float dot_scalar(const float *a, const void *bv, int bf16, int64_t n) {
    const uint16_t *bh = (const uint16_t *)bv;
    const float *bf = (const float *)bv;
    float tot = 0.0f;
    for (int64_t d0 = 0; d0 < n; d0 += ATT_DBLK) {
        const int64_t d1 = G2_MIN(n, d0 + ATT_DBLK);
        float p = 0.0f;
        if (bf16) {
            for (int64_t i = d0; i < d1; i++) p = p + a[i] * bf16_widen(bh[i]);
        } else {
            for (int64_t i = d0; i < d1; i++) p = p + a[i] * bf[i];
        }
        tot = tot + p;
    }
    return tot;
}

static void att_scores_scalar(const att_ctx *c, const float *qr, int64_t b, int64_t g, int64_t s0,
                              int64_t s1, const unsigned char *vis, float *sbuf) {
    for (int64_t s = s0; s < s1; s++) {
        if (!vis[s - s0]) { sbuf[s - s0] = 0.0f; continue; }
        float sc = dot_scalar(qr, att_krow(c, b, g, s), c->bf16, c->D) * c->scaling;
        if (c->softcap > 0.0f) sc = c->softcap * tanh_ref(sc / c->softcap);
        sbuf[s - s0] = sc;
    }
}

#if G2_X86
/* 16 elements of a K/V row from element d (masked), widened from bf16 when needed */
static G2_TGT inline __m512 att_load16(const void *row, int bf16, int64_t d, __mmask16 m) {
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)row + d);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)row + d);
}

#endif

/* ---- weighted sum of V -------------------------------------------------------------------- */

/* acc = acc + p * v (the scalar path: a multiply then an add, as NumPy rounds it) */
static void axpy_scalar(float *acc, float p, const void *vv, int bf16, int64_t n) {
    if (bf16) {
        const uint16_t *v = (const uint16_t *)vv;
        for (int64_t i = 0; i < n; i++) acc[i] = acc[i] + p * bf16_widen(v[i]);
    } else {
        const float *v = (const float *)vv;
        for (int64_t i = 0; i < n; i++) acc[i] = acc[i] + p * v[i];
    }
}


/* ---- the scalar path: one query row against one chunk [c0, c1), online softmax over blocks of
 * ATT_BLOCK keys (the AVX-512 path: att_rows_chunk_avx512, the same steps for several rows).
 * acc[0:D) gets the unnormalised sum of p * v, *mx_out the max, *l_out the sum of p; returns the
 * number of visible keys (0: nothing written but acc = 0) -------------------------------------- */
static int64_t att_row_chunk(const att_ctx *c, const float *qr, int64_t b, int64_t g, int64_t qp,
                             int64_t c0, int64_t c1, float *acc, float *mx_out, float *l_out) {
    const int64_t D = c->D, window = c->window;
    const uint8_t *valid = c->key_valid ? c->key_valid + b * c->S : NULL;
    float sbuf[ATT_BLOCK], pbuf[ATT_BLOCK];
    unsigned char vis[ATT_BLOCK];
    float mx = -INFINITY, l = 0.0f;
    int64_t nvis = 0;
    for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
    for (int64_t s0 = c0; s0 < c1; s0 += ATT_BLOCK) {
        int64_t s1 = G2_MIN(c1, s0 + ATT_BLOCK), nbk = s1 - s0;
        int any = 0;
        for (int64_t s = s0; s < s1; s++) {
            int64_t kp = c->k_pos[s];
            int ok = kp <= qp && (window <= 0 || qp - window < kp) && (!valid || valid[s]);
            vis[s - s0] = (unsigned char)ok;
            any |= ok;
        }
        if (!any) continue;
        att_scores_scalar(c, qr, b, g, s0, s1, vis, sbuf);
        float bmax = -INFINITY;
        int first = 1;
        for (int64_t j = 0; j < nbk; j++)
            if (vis[j] && (first || sbuf[j] > bmax)) { bmax = sbuf[j]; first = 0; }
        if (bmax > mx) {
            float a = (nvis == 0) ? 0.0f : exp_ref(mx - bmax);
            l *= a;
            for (int64_t d = 0; d < D; d++) acc[d] *= a;
            mx = bmax;
        }
        for (int64_t j = 0; j < nbk; j++) pbuf[j] = vis[j] ? sbuf[j] - mx : -INFINITY;
        for (int64_t j = 0; j < nbk; j++) pbuf[j] = exp_ref(pbuf[j]);
        for (int64_t s = s0; s < s1; s++) {
            if (!vis[s - s0]) continue;
            float p = pbuf[s - s0];
            l += p;
            axpy_scalar(acc, p, att_vrow(c, b, g, s), c->bf16, D);
            nvis++;
        }
    }
    *mx_out = mx;
    *l_out = l;
    return nvis;
}

/* the per-thread scratch of the AVX-512 path: a block of K transposed, D x ATT_BLOCK floats, then
 * a 64-element slice of a V block packed, ATT_BLOCK x 64 floats, then the call's query rows packed
 * per d-block of 16 (ATT_TROWS_MAX rows x 16 floats each); 64-byte aligned inside a malloc'd
 * buffer of att_kt_bytes(D) */
#define ATT_TROWS_MAX 64 /* = ATT_TROWS (defined with the AVX-512 kernel) */
static inline size_t att_kt_bytes(int64_t D) {
    return ((size_t)(D + 64) * ATT_BLOCK + (size_t)(D + 15) / 16 * 16 * ATT_TROWS_MAX) * sizeof(float) + 64;
}
static inline float *att_align64(float *p) { return (float *)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

/* a query row of a work item: its inputs and where its chunk partial goes */
typedef struct {
    const float *q;
    int64_t qp;
    float *acc;     /* D floats: the partial's unnormalised sum of p * v */
    float mx, l;    /* the partial's max and sum */
    int64_t nvis;   /* its number of visible keys */
} att_row;

#if G2_X86
#define ATT_TROWS 64 /* rows per call of the tiled kernel (its scratch lives on the stack) */
#if ATT_TROWS != ATT_TROWS_MAX
#error "ATT_TROWS_MAX sizes the scratch of ATT_TROWS rows"
#endif

/* 16 x 16 floats: rows r[0..15] -> columns (out[i] = (r[0][i], ..., r[15][i])), in registers */
G2_INLINE G2_TGT void att_tr16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    /* u[4 q + e], per 128-bit lane L: element 4 L + e of rows 4 q .. 4 q + 3 */
    for (int qq = 0; qq < 4; qq++) {
        u[4 * qq + 0] = _mm512_shuffle_ps(t[4 * qq], t[4 * qq + 2], 0x44);
        u[4 * qq + 1] = _mm512_shuffle_ps(t[4 * qq], t[4 * qq + 2], 0xEE);
        u[4 * qq + 2] = _mm512_shuffle_ps(t[4 * qq + 1], t[4 * qq + 3], 0x44);
        u[4 * qq + 3] = _mm512_shuffle_ps(t[4 * qq + 1], t[4 * qq + 3], 0xEE);
    }
    /* t[e] = (rows 0-3, 8 + e), (rows 4-7, ...) pairs; then the columns */
    for (int e = 0; e < 4; e++) {
        t[e] = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88);       /* rows 0-7: elements e, 8+e */
        t[4 + e] = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xDD);   /* rows 0-7: elements 4+e, 12+e */
        t[8 + e] = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88);
        t[12 + e] = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xDD);
    }
    for (int e = 0; e < 4; e++) {
        r[e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0x88);
        r[8 + e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0xDD);
        r[4 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0x88);
        r[12 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0xDD);
    }
}

/* kt[d * ATT_BLOCK + j] = K[s0 + j][d] (float32; bf16 widened exactly) for j < nbk, 0 for the
 * keys past the block's end; 16 x 16 tiles transposed in registers */
static G2_TGT void att_kt_block_avx512(const att_ctx *c, int64_t b, int64_t g, int64_t s0, int64_t nbk,
                                       float *kt) {
    const int64_t D = c->D;
    const int bf = c->bf16;
    for (int64_t j0 = 0; j0 < ATT_BLOCK; j0 += 16) {
        const void *kr[16];
        int nk = (int)G2_MAX(0, G2_MIN(16, nbk - j0));
        for (int j = 0; j < 16; j++) kr[j] = att_krow(c, b, g, s0 + j0 + (j < nk ? j : 0));
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
            const __mmask16 m = (D - d0 >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d0)) - 1u);
            __m512 r[16];
            for (int j = 0; j < 16; j++) r[j] = j < nk ? att_load16(kr[j], bf, d0, m) : _mm512_setzero_ps();
            att_tr16(r);
            const int nd = (int)G2_MIN(16, D - d0);
            for (int i = 0; i < nd; i++) _mm512_store_ps(kt + (d0 + i) * ATT_BLOCK + j0, r[i]);
        }
    }
}


/* scores of up to 4 query rows x the 64 keys of kt over the d-block [d0, d0 + nd):
 * out[i][j] (+)= the fused chain q[i][d0] * kt[d0][j] + ... (one FMA chain per (row, key), in d
 * order, started from 0), added to out (first block: to 0). kt points at row d0 of the block's
 * transpose (an L1-sized 16 x 64 slice); q[i] at row i's nd elements of the d-block (packed). 16
 * named accumulators. */
static G2_TGT void att_qk_4x64_avx512(const float *kt, int nd, const float *const q[4], float *const out[4],
                                      int first) {
    const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
           a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    for (int d = 0; d < nd; d++) {
        const float *kd = kt + d * ATT_BLOCK;
        const __m512 k0 = _mm512_load_ps(kd), k1 = _mm512_load_ps(kd + 16), k2 = _mm512_load_ps(kd + 32),
                     k3 = _mm512_load_ps(kd + 48);
        __m512 x = _mm512_set1_ps(q0[d]);
        a00 = _mm512_fmadd_ps(x, k0, a00); a01 = _mm512_fmadd_ps(x, k1, a01);
        a02 = _mm512_fmadd_ps(x, k2, a02); a03 = _mm512_fmadd_ps(x, k3, a03);
        x = _mm512_set1_ps(q1[d]);
        a10 = _mm512_fmadd_ps(x, k0, a10); a11 = _mm512_fmadd_ps(x, k1, a11);
        a12 = _mm512_fmadd_ps(x, k2, a12); a13 = _mm512_fmadd_ps(x, k3, a13);
        x = _mm512_set1_ps(q2[d]);
        a20 = _mm512_fmadd_ps(x, k0, a20); a21 = _mm512_fmadd_ps(x, k1, a21);
        a22 = _mm512_fmadd_ps(x, k2, a22); a23 = _mm512_fmadd_ps(x, k3, a23);
        x = _mm512_set1_ps(q3[d]);
        a30 = _mm512_fmadd_ps(x, k0, a30); a31 = _mm512_fmadd_ps(x, k1, a31);
        a32 = _mm512_fmadd_ps(x, k2, a32); a33 = _mm512_fmadd_ps(x, k3, a33);
    }
#define ATT_ACC(o, u, a) _mm512_store_ps((o) + 16 * (u), _mm512_add_ps(first ? _mm512_setzero_ps() : \
                                         _mm512_load_ps((o) + 16 * (u)), a));
    ATT_ACC(out[0], 0, a00) ATT_ACC(out[0], 1, a01) ATT_ACC(out[0], 2, a02) ATT_ACC(out[0], 3, a03)
    ATT_ACC(out[1], 0, a10) ATT_ACC(out[1], 1, a11) ATT_ACC(out[1], 2, a12) ATT_ACC(out[1], 3, a13)
    ATT_ACC(out[2], 0, a20) ATT_ACC(out[2], 1, a21) ATT_ACC(out[2], 2, a22) ATT_ACC(out[2], 3, a23)
    ATT_ACC(out[3], 0, a30) ATT_ACC(out[3], 1, a31) ATT_ACC(out[3], 2, a32) ATT_ACC(out[3], 3, a33)
}

/* the same for 2 rows (decode: 2 query heads per kv head): the same arithmetic per (row, key) */
static G2_TGT void att_qk_2x64_avx512(const float *kt, int nd, const float *q0, const float *q1,
                                      float *out0, float *out1, int first) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
           a13 = a00;
    for (int d = 0; d < nd; d++) {
        const float *kd = kt + d * ATT_BLOCK;
        const __m512 k0 = _mm512_load_ps(kd), k1 = _mm512_load_ps(kd + 16), k2 = _mm512_load_ps(kd + 32),
                     k3 = _mm512_load_ps(kd + 48);
        __m512 x = _mm512_set1_ps(q0[d]);
        a00 = _mm512_fmadd_ps(x, k0, a00); a01 = _mm512_fmadd_ps(x, k1, a01);
        a02 = _mm512_fmadd_ps(x, k2, a02); a03 = _mm512_fmadd_ps(x, k3, a03);
        x = _mm512_set1_ps(q1[d]);
        a10 = _mm512_fmadd_ps(x, k0, a10); a11 = _mm512_fmadd_ps(x, k1, a11);
        a12 = _mm512_fmadd_ps(x, k2, a12); a13 = _mm512_fmadd_ps(x, k3, a13);
    }
    ATT_ACC(out0, 0, a00) ATT_ACC(out0, 1, a01) ATT_ACC(out0, 2, a02) ATT_ACC(out0, 3, a03)
    ATT_ACC(out1, 0, a10) ATT_ACC(out1, 1, a11) ATT_ACC(out1, 2, a12) ATT_ACC(out1, 3, a13)
#undef ATT_ACC
}

/* the scores of 1-2 rows (decode) x the block's keys, the same chains as the tiles above (per
 * d-block of 16 one fused chain in d order from 0, added to the running sum from 0), with each
 * 16 x 16 tile of K transposed in registers and used at once: with 2 rows the scratch round trip
 * of att_kt_block_avx512 would cost as much as the FMAs. out[j] for j < 64 (0 past the block). */
static G2_TGT void att_qk_2rows_direct_avx512(const att_ctx *c, int64_t b, int64_t g, int64_t s0, int64_t nbk,
                                              const float *q0, const float *q1, float *out0, float *out1) {
    const int64_t D = c->D;
    const int bf = c->bf16;
    for (int64_t j0 = 0; j0 < ATT_BLOCK; j0 += 16) {
        const int nk = (int)G2_MAX(0, G2_MIN(16, nbk - j0));
        __m512 t0 = _mm512_setzero_ps(), t1 = t0;
        if (nk > 0) {
            const void *kr[16];
            for (int j = 0; j < 16; j++) kr[j] = att_krow(c, b, g, s0 + j0 + (j < nk ? j : 0));
            for (int64_t d0 = 0; d0 < D; d0 += 16) {
                const __mmask16 m = (D - d0 >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d0)) - 1u);
                __m512 r[16];
                for (int j = 0; j < 16; j++) r[j] = j < nk ? att_load16(kr[j], bf, d0, m) : _mm512_setzero_ps();
                /* the next 16 keys' line at d0, one group ahead: this loop is memory-bound at depth,
                 * and 16 rows read across d in step are not a pattern the hardware prefetcher follows */
                for (int j = 0; j < 16; j++)
                    if (s0 + j0 + 16 + j < c->S)
                        _mm_prefetch((const char *)att_krow(c, b, g, s0 + j0 + 16 + j) + d0 * c->esz, _MM_HINT_T0);
                att_tr16(r);
                __m512 p0 = _mm512_setzero_ps(), p1 = p0;
                if (D - d0 >= 16) {
#pragma GCC unroll 16
                    for (int d = 0; d < 16; d++) {
                        p0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d0 + d]), r[d], p0);
                        p1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[d0 + d]), r[d], p1);
                    }
                } else {
                    for (int d = 0; d < D - d0; d++) {
                        p0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d0 + d]), r[d], p0);
                        p1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[d0 + d]), r[d], p1);
                    }
                }
                t0 = _mm512_add_ps(t0, p0);
                t1 = _mm512_add_ps(t1, p1);
            }
        }
        _mm512_store_ps(out1 + j0, t1); /* out1 may be out0's junk twin (1 row): stored first */
        _mm512_store_ps(out0 + j0, t0);
    }
}

/* bit j of a row's visibility mask as a 16-lane FMA mask */
#define ATT_KM(m, j) ((__mmask16)(0u - (unsigned)(((m) >> (j)) & 1u)))

/* acc[0:64) of 4 rows (o[i], nrr of them real: the others are never stored) += p[i][j] * V[s0+j]
 * over the block's keys in order, for the 64 elements of D from pd (mask mm[u] per vector), V read
 * from vp, the slice packed contiguously (row j at vp + 64 j: a 16 KB slice that stays in L1,
 * where 64 rows 1 KB apart would fall into 16 of its 64 sets); an invisible key leaves a row as
 * it is (masked FMA: a NaN there is never multiplied) */
static G2_TGT void att_pv_4x64_avx512(const float *vp, int64_t nbk, const __mmask16 mm[4], float *const o[4],
                                      const float *const p[4], const uint64_t vm[4], int nrr) {
    const __mmask16 m0 = mm[0], m1 = mm[1], m2 = mm[2], m3 = mm[3];
    float *o0 = o[0], *o1 = o[1], *o2 = o[2], *o3 = o[3];
    const float *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3];
    __m512 c00 = _mm512_maskz_loadu_ps(m0, o0), c01 = _mm512_maskz_loadu_ps(m1, o0 + 16),
           c02 = _mm512_maskz_loadu_ps(m2, o0 + 32), c03 = _mm512_maskz_loadu_ps(m3, o0 + 48);
    __m512 c10 = _mm512_maskz_loadu_ps(m0, o1), c11 = _mm512_maskz_loadu_ps(m1, o1 + 16),
           c12 = _mm512_maskz_loadu_ps(m2, o1 + 32), c13 = _mm512_maskz_loadu_ps(m3, o1 + 48);
    __m512 c20 = _mm512_maskz_loadu_ps(m0, o2), c21 = _mm512_maskz_loadu_ps(m1, o2 + 16),
           c22 = _mm512_maskz_loadu_ps(m2, o2 + 32), c23 = _mm512_maskz_loadu_ps(m3, o2 + 48);
    __m512 c30 = _mm512_maskz_loadu_ps(m0, o3), c31 = _mm512_maskz_loadu_ps(m1, o3 + 16),
           c32 = _mm512_maskz_loadu_ps(m2, o3 + 32), c33 = _mm512_maskz_loadu_ps(m3, o3 + 48);
    const uint64_t full = nbk == 64 ? ~(uint64_t)0 : (((uint64_t)1 << nbk) - 1);
    const uint64_t v0 = vm[0], v1 = vm[1], v2 = vm[2], v3 = vm[3];
    const int allvis = nrr == 4 && (v0 & v1 & v2 & v3) == full;
    const float *vr = vp;
#define ATT_PV4(K0, K1, K2, K3)                                                                          \
    {                                                                                                    \
        __m512 w0 = _mm512_load_ps(vr), w1 = _mm512_load_ps(vr + 16);                                    \
        __m512 w2 = _mm512_load_ps(vr + 32), w3 = _mm512_load_ps(vr + 48);                               \
        __m512 pv = _mm512_set1_ps(p0[j]);                                                               \
        c00 = _mm512_mask3_fmadd_ps(pv, w0, c00, K0); c01 = _mm512_mask3_fmadd_ps(pv, w1, c01, K0);      \
        c02 = _mm512_mask3_fmadd_ps(pv, w2, c02, K0); c03 = _mm512_mask3_fmadd_ps(pv, w3, c03, K0);      \
        pv = _mm512_set1_ps(p1[j]);                                                                      \
        c10 = _mm512_mask3_fmadd_ps(pv, w0, c10, K1); c11 = _mm512_mask3_fmadd_ps(pv, w1, c11, K1);      \
        c12 = _mm512_mask3_fmadd_ps(pv, w2, c12, K1); c13 = _mm512_mask3_fmadd_ps(pv, w3, c13, K1);      \
        pv = _mm512_set1_ps(p2[j]);                                                                      \
        c20 = _mm512_mask3_fmadd_ps(pv, w0, c20, K2); c21 = _mm512_mask3_fmadd_ps(pv, w1, c21, K2);      \
        c22 = _mm512_mask3_fmadd_ps(pv, w2, c22, K2); c23 = _mm512_mask3_fmadd_ps(pv, w3, c23, K2);      \
        pv = _mm512_set1_ps(p3[j]);                                                                      \
        c30 = _mm512_mask3_fmadd_ps(pv, w0, c30, K3); c31 = _mm512_mask3_fmadd_ps(pv, w1, c31, K3);      \
        c32 = _mm512_mask3_fmadd_ps(pv, w2, c32, K3); c33 = _mm512_mask3_fmadd_ps(pv, w3, c33, K3);      \
    }
    if (allvis) { /* every key visible to every row (most prefill blocks): the all-ones masks */
        for (int64_t j = 0; j < nbk; j++, vr += 64) ATT_PV4(0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF)
    } else {
        for (int64_t j = 0; j < nbk; j++, vr += 64) {
            const __mmask16 k0 = ATT_KM(v0, j), k1 = ATT_KM(v1, j), k2 = ATT_KM(v2, j), k3 = ATT_KM(v3, j);
            if (!(k0 | k1 | k2 | k3)) continue;
            ATT_PV4(k0, k1, k2, k3)
        }
    }
#undef ATT_PV4
    _mm512_mask_storeu_ps(o0, m0, c00); _mm512_mask_storeu_ps(o0 + 16, m1, c01);
    _mm512_mask_storeu_ps(o0 + 32, m2, c02); _mm512_mask_storeu_ps(o0 + 48, m3, c03);
    if (nrr > 1) {
        _mm512_mask_storeu_ps(o1, m0, c10); _mm512_mask_storeu_ps(o1 + 16, m1, c11);
        _mm512_mask_storeu_ps(o1 + 32, m2, c12); _mm512_mask_storeu_ps(o1 + 48, m3, c13);
    }
    if (nrr > 2) {
        _mm512_mask_storeu_ps(o2, m0, c20); _mm512_mask_storeu_ps(o2 + 16, m1, c21);
        _mm512_mask_storeu_ps(o2 + 32, m2, c22); _mm512_mask_storeu_ps(o2 + 48, m3, c23);
    }
    if (nrr > 3) {
        _mm512_mask_storeu_ps(o3, m0, c30); _mm512_mask_storeu_ps(o3 + 16, m1, c31);
        _mm512_mask_storeu_ps(o3 + 32, m2, c32); _mm512_mask_storeu_ps(o3 + 48, m3, c33);
    }
}

/* the same for 1 or 2 rows x 128 elements of D from pd (decode), 8 vectors per row */
static G2_TGT void att_pv_2x128_avx512(const att_ctx *c, int64_t b, int64_t g, int64_t s0, int64_t nbk,
                                       int64_t pd, float *o0, float *o1, const float *p0, const float *p1,
                                       uint64_t v0, uint64_t v1, int on1) {
    const int64_t D = c->D;
    const int bf = c->bf16;
    __mmask16 mm[8];
    for (int u = 0; u < 8; u++) {
        int64_t d = pd + 16 * u;
        mm[u] = d >= D ? (__mmask16)0 : (D - d >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
    }
    if (!on1) v1 = 0;
#define ATT_LD2(u) __m512 e##u = _mm512_maskz_loadu_ps(mm[u], o0 + 16 * u), f##u = _mm512_maskz_loadu_ps(mm[u], o1 + 16 * u);
    ATT_LD2(0) ATT_LD2(1) ATT_LD2(2) ATT_LD2(3) ATT_LD2(4) ATT_LD2(5) ATT_LD2(6) ATT_LD2(7)
#undef ATT_LD2
    const void *vr = att_vrow(c, b, g, s0);
    const int64_t vstep = c->vss * c->esz;
    for (int64_t j = 0; j < nbk; j++, vr = (const char *)vr + vstep) {
        const __mmask16 k0 = ATT_KM(v0, j), k1 = ATT_KM(v1, j);
        if (!(k0 | k1)) continue;
        const __m512 pa = _mm512_set1_ps(p0[j]), pb = _mm512_set1_ps(p1[j]);
        __m512 w;
#define ATT_PV2(u) w = att_load16(vr, bf, pd + 16 * u, mm[u]); e##u = _mm512_mask3_fmadd_ps(pa, w, e##u, k0); \
                   f##u = _mm512_mask3_fmadd_ps(pb, w, f##u, k1);
        ATT_PV2(0) ATT_PV2(1) ATT_PV2(2) ATT_PV2(3) ATT_PV2(4) ATT_PV2(5) ATT_PV2(6) ATT_PV2(7)
#undef ATT_PV2
    }
#define ATT_ST2(u) _mm512_mask_storeu_ps(o0 + 16 * u, mm[u], e##u); if (on1) _mm512_mask_storeu_ps(o1 + 16 * u, mm[u], f##u);
    ATT_ST2(0) ATT_ST2(1) ATT_ST2(2) ATT_ST2(3) ATT_ST2(4) ATT_ST2(5) ATT_ST2(6) ATT_ST2(7)
#undef ATT_ST2
}

/* The partials of nr <= ATT_TROWS rows (of one batch and kv head) over the chunk [c0, c1), per
 * block of ATT_BLOCK keys:
 *   - visibility: one 64-bit mask per row from vector compares of k_pos (and key_valid);
 *   - scores: the block's keys transposed once into kt (D x 64, amortised over all the active
 *     rows), then, per d-block of ATT_DBLK (a 4 KB slice of kt, in L1) and per tile of 4 (or 2)
 *     rows x 64 keys, a register chain of FMAs over the d-block added into the row's scores:
 *     score = (((0 + P_0) + P_1) + ...) with P_i the fused chain over d-block i in d order --
 *     the scalar path's and the twin's order, with fused products (so not bitwise theirs). A
 *     score is its own lane: its bits do not depend on the tile or on the rows next to it. With
 *     at most 2 active rows (decode) the same chains run on K tiles transposed in registers
 *     (att_qk_2rows_direct_avx512), which skips the scratch;
 *   - per row: * scaling, the polynomial softcap, the block max, the expf rescale, the
 *     polynomial exp, l += p in key order (4 rows' chains interleaved);
 *   - p * V: per 64 elements of D (a slice of the V block that stays in L1) and per tile of 4
 *     rows, one FMA per visible key and element in key order (2 rows x 128 when the call has at
 *     most 2 active rows: decode with 2 query heads per kv head).
 * So a row's bits do not depend on the tile it shares, on the rows next to it or on the thread
 * count (tests/test_attention_kernels.py checks it against one-row calls). */
static G2_TGT void att_rows_chunk_avx512(const att_ctx *c, int64_t b, int64_t g, att_row *rows, int nr,
                                         int64_t c0, int64_t c1, float *kt) {
    const int64_t D = c->D, window = c->window;
    const uint8_t *valid = c->key_valid ? c->key_valid + b * c->S : NULL;
    float sbuf[ATT_TROWS][ATT_BLOCK] __attribute__((aligned(64)));
    float pbuf[ATT_TROWS][ATT_BLOCK] __attribute__((aligned(64)));
    float junk[ATT_BLOCK] __attribute__((aligned(64))); /* where the unused rows of a tile go */
    uint64_t vm[ATT_TROWS];
    int act[ATT_TROWS];
    float *const vpk = kt + D * ATT_BLOCK; /* the packed V slice (att_kt_bytes) */
    /* the rows' q packed per d-block: q_r[d0 + i] at qpk[d0 * ATT_TROWS + 16 r + i] (a d-block of
     * all the rows is 4 KB contiguous, where rows 1 KB apart would share 4 of L1's 64 sets) */
    float *const qpk = vpk + 64 * ATT_BLOCK;
    for (int r = 0; r < nr; r++)
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
            const __mmask16 md = (D - d0 >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d0)) - 1u);
            _mm512_store_ps(qpk + d0 * ATT_TROWS + 16 * r, _mm512_maskz_loadu_ps(md, rows[r].q + d0));
        }
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < nr; r++) {
        memset(rows[r].acc, 0, (size_t)D * sizeof(float));
        rows[r].mx = -INFINITY;
        rows[r].l = 0.0f;
        rows[r].nvis = 0;
    }
    for (int64_t s0 = c0; s0 < c1; s0 += ATT_BLOCK) {
        const int64_t s1 = G2_MIN(c1, s0 + ATT_BLOCK), nbk = s1 - s0;
        const uint64_t full = nbk == 64 ? ~(uint64_t)0 : (((uint64_t)1 << nbk) - 1);
        /* visibility: kp <= qp, qp - window < kp, key_valid; from 8 vectors of k_pos */
        uint64_t vmask = full;
        if (valid) {
            __m512i vb = _mm512_maskz_loadu_epi8((__mmask64)full, valid + s0);
            vmask = (uint64_t)_mm512_test_epi8_mask(vb, vb);
        }
        __m512i kp[8];
        __m512i kmn = _mm512_set1_epi64(INT64_MAX), kmx = _mm512_set1_epi64(INT64_MIN);
        for (int i = 0; i < 8; i++) {
            const __mmask8 m = (__mmask8)(full >> (8 * i));
            kp[i] = _mm512_maskz_loadu_epi64(m, c->k_pos + s0 + 8 * i);
            kmn = _mm512_mask_min_epi64(kmn, m, kmn, kp[i]);
            kmx = _mm512_mask_max_epi64(kmx, m, kmx, kp[i]);
        }
        const int64_t bkmin = _mm512_reduce_min_epi64(kmn), bkmax = _mm512_reduce_max_epi64(kmx);
        int na = 0;
        for (int r = 0; r < nr; r++) {
            const int64_t qp = rows[r].qp;
            uint64_t m;
            if (bkmax <= qp && (window <= 0 || qp - window < bkmin)) {
                m = vmask; /* the whole block in the row's causal window */
            } else if (bkmin > qp || (window > 0 && bkmax <= qp - window)) {
                m = 0;
            } else {
                const __m512i vq = _mm512_set1_epi64(qp), vw = _mm512_set1_epi64(qp - window);
                m = 0;
                for (int i = 0; i < 8; i++) {
                    __mmask8 k = _mm512_cmple_epi64_mask(kp[i], vq);
                    if (window > 0) k &= _mm512_cmpgt_epi64_mask(kp[i], vw);
                    m |= (uint64_t)k << (8 * i);
                }
                m &= vmask;
            }
            vm[r] = m & full;
            if (vm[r]) act[na++] = r;
        }
        if (!na) continue;
        if (na <= 2) {
            att_qk_2rows_direct_avx512(c, b, g, s0, nbk, rows[act[0]].q, rows[act[na - 1]].q, sbuf[act[0]],
                                       na > 1 ? sbuf[act[1]] : junk);
        } else {
        att_kt_block_avx512(c, b, g, s0, nbk, kt);
        for (int64_t d0 = 0; d0 < D; d0 += ATT_DBLK) {
            const int nd = (int)G2_MIN(ATT_DBLK, D - d0);
            for (int rg = 0; rg < na; rg += 4) {
                const int nrr = G2_MIN(4, na - rg);
                const float *qr[4];
                float *sr[4];
                for (int i = 0; i < 4; i++) {
                    const int r = act[rg + (i < nrr ? i : 0)];
                    qr[i] = qpk + d0 * ATT_TROWS + 16 * r;
                    sr[i] = i < nrr ? sbuf[r] : junk;
                }
                if (nrr <= 2) att_qk_2x64_avx512(kt + d0 * ATT_BLOCK, nd, qr[0], qr[1], sr[0], sr[1], d0 == 0);
                else att_qk_4x64_avx512(kt + d0 * ATT_BLOCK, nd, qr, sr, d0 == 0);
            }
        }
        }
        /* per row: scaling (0 for invisible keys, as the scalar path), softcap, block max,
         * rescale, p = exp(s - max) (0 for invisible keys) -- att_row_chunk's steps */
        const __m512 vscal = _mm512_set1_ps(c->scaling), vcap = _mm512_set1_ps(c->softcap);
        for (int ia = 0; ia < na; ia++) {
            const int r = act[ia];
            att_row *w = &rows[r];
            const uint64_t m = vm[r];
            __m512 vmax = ninf;
            for (int u = 0; u < 4; u++) {
                const __mmask16 mu = (__mmask16)(m >> (16 * u));
                __m512 x = _mm512_maskz_mul_ps(mu, _mm512_load_ps(sbuf[r] + 16 * u), vscal);
                if (c->softcap > 0.0f) x = _mm512_mul_ps(vcap, g2_tanh512(_mm512_div_ps(x, vcap)));
                _mm512_store_ps(sbuf[r] + 16 * u, x);
                vmax = _mm512_mask_max_ps(vmax, mu, vmax, x);
            }
            /* the max of the visible scores (the same value as the scalar scan's; the sign of a
             * zero maximum may differ, which changes no exp below) */
            const float bmax = _mm512_reduce_max_ps(vmax);
            if (bmax > w->mx) {
                float f = (w->nvis == 0) ? 0.0f : att_rescale(1, w->mx - bmax);
                w->l *= f;
                float *acc = w->acc;
                const __m512 vf = _mm512_set1_ps(f);
                for (int64_t d = 0; d < D; d += 16) {
                    const __mmask16 md = (D - d >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
                    _mm512_mask_storeu_ps(acc + d, md, _mm512_mul_ps(_mm512_maskz_loadu_ps(md, acc + d), vf));
                }
                w->mx = bmax;
            }
            const __m512 vmx = _mm512_set1_ps(w->mx);
            for (int u = 0; u < 4; u++) {
                const __mmask16 mu = (__mmask16)(m >> (16 * u));
                __m512 x = _mm512_mask_sub_ps(ninf, mu, _mm512_load_ps(sbuf[r] + 16 * u), vmx);
                _mm512_store_ps(pbuf[r] + 16 * u, _mm512_maskz_mov_ps(mu, g2_exp512(x)));
            }
            w->nvis += __builtin_popcountll(m);
        }
        /* l += p in key order (invisible keys add +0, the identity for l >= +0), 4 rows at once */
        for (int ia = 0; ia < na; ia += 4) {
            const int n4 = G2_MIN(4, na - ia);
            const float *p0 = pbuf[act[ia]], *p1 = pbuf[act[ia + (n4 > 1)]], *p2 = pbuf[act[ia + (n4 > 2 ? 2 : 0)]],
                        *p3 = pbuf[act[ia + (n4 > 3 ? 3 : 0)]];
            float l0 = rows[act[ia]].l, l1 = rows[act[ia + (n4 > 1)]].l, l2 = rows[act[ia + (n4 > 2 ? 2 : 0)]].l,
                  l3 = rows[act[ia + (n4 > 3 ? 3 : 0)]].l;
            for (int64_t j = 0; j < nbk; j++) {
                l0 += p0[j];
                l1 += p1[j];
                l2 += p2[j];
                l3 += p3[j];
            }
            /* stores in reverse so that a duplicated slot (n4 < 4: row ia again) ends with its own sum */
            rows[act[ia + (n4 > 3 ? 3 : 0)]].l = l3;
            rows[act[ia + (n4 > 2 ? 2 : 0)]].l = l2;
            rows[act[ia + (n4 > 1)]].l = l1;
            rows[act[ia]].l = l0;
        }
        /* acc += p * v */
        if (na <= 2) {
            const int r0 = act[0], r1 = act[na - 1];
            for (int64_t pd = 0; pd < D; pd += 128)
                att_pv_2x128_avx512(c, b, g, s0, nbk, pd, rows[r0].acc + pd, rows[r1].acc + pd, pbuf[r0], pbuf[r1],
                                    vm[r0], vm[r1], na > 1);
            continue;
        }
        for (int64_t pd = 0; pd < D; pd += 64) {
            __mmask16 mm[4];
            for (int u = 0; u < 4; u++) {
                int64_t d = pd + 16 * u;
                mm[u] = d >= D ? (__mmask16)0 : (D - d >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
            }
            /* pack the slice: V[s0 + j][pd, pd + 64) -> vpk[64 j, 64 j + 64) (widened, 0 past D) */
            {
                const int bf = c->bf16;
                const char *vr = (const char *)att_vrow(c, b, g, s0);
                const int64_t vstep = c->vss * c->esz;
                for (int64_t j = 0; j < nbk; j++, vr += vstep)
                    for (int u = 0; u < 4; u++)
                        _mm512_store_ps(vpk + 64 * j + 16 * u, att_load16(vr, bf, pd + 16 * u, mm[u]));
            }
            for (int rg = 0; rg < na; rg += 4) {
                const int nrr = G2_MIN(4, na - rg);
                float *o[4];
                const float *p[4];
                uint64_t v4[4];
                for (int i = 0; i < 4; i++) {
                    const int r = act[rg + (i < nrr ? i : 0)];
                    o[i] = rows[r].acc + pd;
                    p[i] = pbuf[r];
                    v4[i] = i < nrr ? vm[r] : 0;
                }
                att_pv_4x64_avx512(vpk, nbk, mm, o, p, v4, nrr);
            }
        }
    }
}
#endif

/* the chunk partials of nr rows: the tiled kernel on the AVX-512 path (kt: its per-thread scratch,
 * att_kt_bytes), row by row on the scalar one */
static void att_rows_chunk(const att_ctx *c, int64_t b, int64_t g, att_row *rows, int64_t nr, int64_t c0,
                           int64_t c1, float *kt) {
    (void)kt; /* unused without the AVX-512 path */
#if G2_X86
    if (c->simd) {
        for (int64_t r0 = 0; r0 < nr; r0 += ATT_TROWS)
            att_rows_chunk_avx512(c, b, g, rows + r0, (int)G2_MIN(ATT_TROWS, nr - r0), c0, c1, kt);
        return;
    }
#endif
    for (int64_t r = 0; r < nr; r++)
        rows[r].nvis = att_row_chunk(c, rows[r].q, b, g, rows[r].qp, c0, c1, rows[r].acc, &rows[r].mx, &rows[r].l);
}

/* merge a chunk partial (m, l, a[0:D), nvc visible keys) into a row's running state (M, L, ACC,
 * nv); the first partial is taken as it is (so a one-chunk row is the chunk's arithmetic) */
static void att_merge(int simd, int64_t D, float *M, float *L, float *ACC, int64_t *nv, float m,
                      float l, const float *a, int64_t nvc) {
    if (nvc == 0) return;
    if (*nv == 0) {
        *M = m;
        *L = l;
        for (int64_t d = 0; d < D; d++) ACC[d] = a[d];
        *nv = nvc;
        return;
    }
    float mn = m > *M ? m : *M;
    float fo = att_rescale(simd, *M - mn), fn = att_rescale(simd, m - mn);
    *L = *L * fo + l * fn;  /* two products and a sum, unfused on both paths */
    for (int64_t d = 0; d < D; d++) ACC[d] = ACC[d] * fo + a[d] * fn;
    *M = mn;
    *nv += nvc;
}

/* out row o = ACC / L, or, with no visible key, the uniform average over all S keys (what HF's
 * finfo.min mask gives), summed in key order; ACC may be o itself */
static void att_finish(const att_ctx *c, int64_t b, int64_t g, float L, const float *ACC, int64_t nv,
                       float *o) {
    const int64_t D = c->D, S = c->S;
    if (S == 0) {
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        return;
    }
    if (nv == 0) {
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t s = 0; s < S; s++) axpy_scalar(o, 1.0f, att_vrow(c, b, g, s), c->bf16, D);
        L = (float)S;
        ACC = o;
    }
    for (int64_t d = 0; d < D; d++) o[d] = ACC[d] / L;
}

/* can a query at position qp (or any in [qmin, qmax]) see a key of chunk ch? (k_pos only) */
static inline int att_chunk_dead(const int64_t *kmin, const int64_t *kmax, int64_t ch, int64_t qmin,
                                 int64_t qmax, int64_t window) {
    return kmin[ch] > qmax || (window > 0 && kmax[ch] <= qmin - window);
}

int g2_attention(const float *q, int64_t qsb, int64_t qsh, int64_t qst, const void *k, const void *v,
                 int kv_bf16, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh,
                 int64_t vss, const int64_t *q_pos, const int64_t *k_pos, const uint8_t *key_valid,
                 int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S, int64_t D, float scaling,
                 float softcap, int64_t window, float *out, int n_threads) {
    att_ctx c;
    c.k = (const char *)k;
    c.v = (const char *)v;
    c.bf16 = kv_bf16 != 0;
    c.esz = c.bf16 ? 2 : 4;
    c.ksb = ksb; c.ksh = ksh; c.kss = kss;
    c.vsb = vsb; c.vsh = vsh; c.vss = vss;
    c.k_pos = k_pos;
    c.key_valid = key_valid;
    c.S = S; c.D = D; c.window = window;
    c.scaling = scaling; c.softcap = softcap;
    c.simd = 0;
#if G2_X86
    c.simd = g2_get_simd() != 0;
#endif
    if (B <= 0 || Hq <= 0 || T <= 0) return 0;
    const int64_t rep = Hq / Hkv;
    const int64_t nch = S > 0 ? (S + ATT_CHUNK - 1) / ATT_CHUNK : 0;
    const int64_t nqb = (T + ATT_QBLOCK - 1) / ATT_QBLOCK;
    const int64_t Dp = D > 0 ? D : 1;
    /* per chunk: min and max key position, for skipping chunks from k_pos alone */
    int64_t *kmin = (int64_t *)malloc((size_t)(nch > 0 ? 2 * nch : 1) * sizeof(int64_t));
    if (!kmin) return -1;
    int64_t *kmax = kmin + nch;
    for (int64_t ch = 0; ch < nch; ch++) {
        int64_t lo = INT64_MAX, hi = INT64_MIN;
        for (int64_t s = ch * ATT_CHUNK; s < G2_MIN(S, (ch + 1) * ATT_CHUNK); s++) {
            lo = G2_MIN(lo, k_pos[s]);
            hi = k_pos[s] > hi ? k_pos[s] : hi;
        }
        kmin[ch] = lo;
        kmax[ch] = hi;
    }
    /* q.k and p*v over every key (dead chunks are skipped, so this is an upper bound); the AVX-512
     * path also pays per-key bookkeeping (max, exp, masks): ~2x the FMA tiles' cost */
    const double macs = 2.0 * (double)(B * Hq * T) * (double)S * (double)D;
    const int nt = g2_par_threads(NT(n_threads), macs * (c.simd ? 2.0 * G2_NS_PER_MAC_F32 : G2_NS_PER_MAC_SCALAR));
    /* the split schedule when few query rows would leave threads idle (the bits are the same) */
    int split = nt > 1 && nch > 1 && T <= ATT_SPLIT_MAXT && B * Hkv < 4 * nt;
    float *part = NULL;  /* (row, chunk) -> [m, l, acc[0:D)] */
    int64_t *pnv = NULL;
    const int64_t pstride = Dp + 2;
    if (split) {
        part = (float *)malloc((size_t)(B * Hq * T * nch) * (size_t)pstride * sizeof(float));
        pnv = (int64_t *)malloc((size_t)(B * Hq * T * nch) * sizeof(int64_t));
        if (!part || !pnv) { free(part); free(pnv); part = NULL; pnv = NULL; split = 0; }
    }
    int err = 0;
    const int64_t nrow = rep * ATT_QBLOCK; /* rows of a work item, at most */
    if (split) {
        const int64_t items = B * Hkv * nch;
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            att_row *rw = (att_row *)malloc((size_t)nrow * sizeof(att_row));
            float *ktb = c.simd ? (float *)malloc(att_kt_bytes(Dp)) : NULL;
            if (!rw || (c.simd && !ktb)) {
                free(rw);
                rw = NULL;
#pragma omp atomic write
                err = 1;
            }
            int64_t it;
#pragma omp for schedule(dynamic, 1)
            for (it = 0; it < items; it++) {
                if (!rw) continue; /* out of memory: reported after the loop */
                int64_t ch = it % nch, g = (it / nch) % Hkv, b = it / (nch * Hkv);
                int64_t c0 = ch * ATT_CHUNK, c1 = G2_MIN(S, c0 + ATT_CHUNK), nr = 0;
                for (int64_t hh = 0; hh < rep; hh++) {
                    int64_t h = g * rep + hh;
                    for (int64_t t = 0; t < T; t++) {
                        int64_t pi = ((b * Hq + h) * T + t) * nch + ch;
                        int64_t qp = q_pos[t];
                        pnv[pi] = 0;
                        if (att_chunk_dead(kmin, kmax, ch, qp, qp, window)) continue;
                        rw[nr].q = q + b * qsb + h * qsh + t * qst;
                        rw[nr].qp = qp;
                        rw[nr].acc = part + pi * pstride + 2;
                        nr++;
                    }
                }
                att_rows_chunk(&c, b, g, rw, nr, c0, c1, ktb ? att_align64(ktb) : NULL);
                for (int64_t r = 0; r < nr; r++) {
                    float *pp = rw[r].acc - 2;
                    pp[0] = rw[r].mx;
                    pp[1] = rw[r].l;
                    pnv[(pp - part) / pstride] = rw[r].nvis;
                }
            }
            free(rw);
            free(ktb);
            /* the merge, in the same parallel region (the loop above ends with a barrier): one
             * fork/join per decode call instead of two, 26 fewer per token of gemma-2-2b (the
             * second region came right after the first, so its worker was usually still spinning:
             * this saves a fork and a join, not a futex wake-up; docs/performance.md). Each row is
             * merged by one thread in chunk order, as before, so the bits do not change. */
            int failed;
#pragma omp atomic read
            failed = err;
            const int64_t rows = B * Hq * T;
            int64_t row;
#pragma omp for schedule(static)
            for (row = 0; row < rows; row++) {
                if (failed) continue; /* a thread ran out of memory: some partials are missing */
                int64_t b = row / (Hq * T), h = (row / T) % Hq, g = h / rep;
                float *o = out + row * D;
                float M = -INFINITY, L = 0.0f;
                int64_t nv = 0;
                for (int64_t ch = 0; ch < nch; ch++) {
                    const float *pp = part + (row * nch + ch) * pstride;
                    att_merge(c.simd, D, &M, &L, o, &nv, pp[0], pp[1], pp + 2, pnv[row * nch + ch]);
                }
                att_finish(&c, b, g, L, o, nv, o);
            }
        }
    } else {
        const int64_t items = B * Hkv * nqb;
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            /* per thread: the item's rows, their chunk partials, their running (M, L, nv); their
             * running acc lives in the output rows */
            att_row *rw = (att_row *)malloc((size_t)nrow * sizeof(att_row));
            float *pacc = (float *)malloc((size_t)(nrow * Dp) * sizeof(float));
            float *ML = (float *)malloc((size_t)(2 * nrow) * sizeof(float));
            int64_t *NV = (int64_t *)malloc((size_t)nrow * sizeof(int64_t));
            int64_t *RI = (int64_t *)malloc((size_t)nrow * sizeof(int64_t));
            float *ktb = c.simd ? (float *)malloc(att_kt_bytes(Dp)) : NULL;
            int ok = rw && pacc && ML && NV && RI && (!c.simd || ktb);
            if (!ok) {
#pragma omp atomic write
                err = 1;
            }
            int64_t it;
#pragma omp for schedule(dynamic, 1)
            for (it = 0; it < items; it++) {
                if (!ok) continue; /* out of memory: reported after the loop */
                int64_t qb = it % nqb, g = (it / nqb) % Hkv, b = it / (nqb * Hkv);
                int64_t t0 = qb * ATT_QBLOCK, t1 = G2_MIN(T, t0 + ATT_QBLOCK), nt_ = t1 - t0;
                int64_t qmin = INT64_MAX, qmax = INT64_MIN;
                for (int64_t t = t0; t < t1; t++) {
                    qmin = G2_MIN(qmin, q_pos[t]);
                    qmax = q_pos[t] > qmax ? q_pos[t] : qmax;
                }
                for (int64_t r = 0; r < rep * nt_; r++) { ML[2 * r] = -INFINITY; ML[2 * r + 1] = 0.0f; NV[r] = 0; }
                for (int64_t ch = 0; ch < nch; ch++) {
                    if (att_chunk_dead(kmin, kmax, ch, qmin, qmax, window)) continue;
                    int64_t c0 = ch * ATT_CHUNK, c1 = G2_MIN(S, c0 + ATT_CHUNK), nr = 0;
                    for (int64_t hh = 0; hh < rep; hh++) {
                        int64_t h = g * rep + hh;
                        for (int64_t t = t0; t < t1; t++) {
                            int64_t qp = q_pos[t];
                            if (att_chunk_dead(kmin, kmax, ch, qp, qp, window)) continue;
                            rw[nr].q = q + b * qsb + h * qsh + t * qst;
                            rw[nr].qp = qp;
                            rw[nr].acc = pacc + nr * Dp;
                            RI[nr] = hh * nt_ + (t - t0);
                            nr++;
                        }
                    }
                    att_rows_chunk(&c, b, g, rw, nr, c0, c1, ktb ? att_align64(ktb) : NULL);
                    for (int64_t i = 0; i < nr; i++) {
                        int64_t r = RI[i], h = g * rep + r / nt_, t = t0 + r % nt_;
                        att_merge(c.simd, D, &ML[2 * r], &ML[2 * r + 1], out + ((b * Hq + h) * T + t) * D,
                                  &NV[r], rw[i].mx, rw[i].l, rw[i].acc, rw[i].nvis);
                    }
                }
                for (int64_t hh = 0; hh < rep; hh++) {
                    int64_t h = g * rep + hh;
                    for (int64_t t = t0; t < t1; t++) {
                        int64_t r = hh * nt_ + (t - t0);
                        float *o = out + ((b * Hq + h) * T + t) * D;
                        att_finish(&c, b, g, ML[2 * r + 1], o, NV[r], o);
                    }
                }
            }
            free(rw);
            free(pacc);
            free(ML);
            free(NV);
            free(RI);
            free(ktb);
        }
    }
    free(part);
    free(pnv);
    free(kmin);
    return err ? -1 : 0;
}
