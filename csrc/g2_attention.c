/* Fused attention (online softmax over blocks of ATT_BLOCK keys, no T x S matrix): per query row
 * the scores, the running max / sum and the weighted sum of V, on the scalar path or the AVX-512
 * one. The scalar helpers and their AVX-512 twins sit side by side; tests/test_kernels.py runs
 * both (the `simd` fixture) against the NumPy twin. */
#include "g2_internal.h"
#include "g2_simd_math.h"

/* ---- scores of keys [s0, s1) for one query row: sbuf[s - s0] = softcap(q . k_s * scaling) for
 * visible keys, 0 for the others ---------------------------------------------------------- */

/* q . k over D (8 independent lanes, then a fixed pairwise sum) */
static float dot_scalar(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; i++) acc[i & 7] += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static void att_scores_scalar(const float *qr, const float *kb, int64_t s0, int64_t s1, int64_t D,
                              float scaling, float softcap, const unsigned char *vis, float *sbuf) {
    for (int64_t s = s0; s < s1; s++) {
        if (!vis[s - s0]) { sbuf[s - s0] = 0.0f; continue; }
        float sc = dot_scalar(qr, kb + s * D, D) * scaling;
        if (softcap > 0.0f) sc = softcap * tanhf(sc / softcap);
        sbuf[s - s0] = sc;
    }
}

#if G2_X86
/* 4 keys at a time: 4 independent FMA chains, one 16-lane accumulator per key */
static G2_TGT void att_scores_avx512(const float *qr, const float *kb, int64_t s0, int64_t s1,
                                     int64_t D, float scaling, float softcap,
                                     const unsigned char *vis, float *sbuf) {
    int64_t s = s0;
    for (; s < s1; s += 4) {
        int nk = (int)G2_MIN(4, s1 - s);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const float *k0 = kb + s * D;
        const float *k1 = nk > 1 ? k0 + D : k0, *k2 = nk > 2 ? k0 + 2 * D : k0, *k3 = nk > 3 ? k0 + 3 * D : k0;
        int64_t d = 0;
        for (; d < D; d += 16) {
            __mmask16 m = (D - d >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
            __m512 qv = _mm512_maskz_loadu_ps(m, qr + d);
            a0 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k0 + d), a0);
            a1 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k1 + d), a1);
            a2 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k2 + d), a2);
            a3 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k3 + d), a3);
        }
        float r[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                      _mm512_reduce_add_ps(a3)};
        for (int j = 0; j < nk; j++) sbuf[s - s0 + j] = vis[s - s0 + j] ? r[j] * scaling : 0.0f;
    }
    if (softcap > 0.0f) g2_softcap_avx512(sbuf, sbuf, s1 - s0, softcap);
}
#endif

/* ---- weighted sum of V -------------------------------------------------------------------- */

static void scale_axpy_scalar(float *acc, float a, const float *v, float p, int64_t n) {
    /* acc = acc * a + p * v */
    for (int64_t i = 0; i < n; i++) acc[i] = acc[i] * a + p * v[i];
}

#if G2_X86
/* acc[0:D) += p * v */
static G2_TGT void axpy_avx512(float *acc, float p, const float *v, int64_t D) {
    __m512 pv = _mm512_set1_ps(p);
    for (int64_t d = 0; d < D; d += 16) {
        __mmask16 m = (D - d >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
        _mm512_mask_storeu_ps(acc + d, m, _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(m, v + d),
                                                          _mm512_maskz_loadu_ps(m, acc + d)));
    }
}
#endif

#define ATT_BLOCK 64

void g2_attention(const float *q, const float *k, const float *v, const int64_t *q_pos,
                  const int64_t *k_pos, const uint8_t *key_valid, int64_t B, int64_t Hq,
                  int64_t Hkv, int64_t T, int64_t S, int64_t D, float scaling, float softcap,
                  int64_t window, float *out, int n_threads) {
    int simd = 0;
#if G2_X86
    simd = g2_get_simd() != 0;
#endif
    int64_t rep = Hq / Hkv;
    int64_t total = B * Hq * T;
    /* q.k and p*v over every key (masked blocks are skipped, so this is an upper bound); the
     * AVX-512 path also pays per-key bookkeeping (max, exp, masks): ~2x the FMA tiles' cost */
    const double macs = 2.0 * (double)total * (double)S * (double)D;
    const int nt = g2_par_threads(NT(n_threads), macs * (simd ? 2.0 * G2_NS_PER_MAC_F32 : G2_NS_PER_MAC_SCALAR));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *acc = (float *)malloc((size_t)(D > 0 ? D : 1) * sizeof(float));
        float sbuf[ATT_BLOCK], pbuf[ATT_BLOCK];
        unsigned char vis[ATT_BLOCK];
        int64_t idx;
#pragma omp for schedule(dynamic, 2)
        for (idx = 0; idx < total; idx++) {
            if (!acc) continue; /* out of memory: leave row (cannot raise from here) */
            int64_t t = idx % T, h = (idx / T) % Hq, b = idx / (T * Hq), g = h / rep;
            const float *qr = q + idx * D;
            const float *kb = k + (b * Hkv + g) * S * D;
            const float *vb = v + (b * Hkv + g) * S * D;
            const uint8_t *valid = key_valid ? key_valid + b * S : NULL;
            float *o = out + idx * D;
            int64_t qp = q_pos[t];
            float mx = -INFINITY, l = 0.0f;
            int64_t nvis = 0;
            for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
            for (int64_t s0 = 0; s0 < S; s0 += ATT_BLOCK) {
                int64_t s1 = G2_MIN(S, s0 + ATT_BLOCK), nbk = s1 - s0;
                int any = 0;
                for (int64_t s = s0; s < s1; s++) {
                    int64_t kp = k_pos[s];
                    int ok = kp <= qp && (window <= 0 || qp - window < kp) && (!valid || valid[s]);
                    vis[s - s0] = (unsigned char)ok;
                    any |= ok;
                }
                if (!any) continue;
#if G2_X86
                if (simd) {
                    att_scores_avx512(qr, kb, s0, s1, D, scaling, softcap, vis, sbuf);
                } else
#endif
                    att_scores_scalar(qr, kb, s0, s1, D, scaling, softcap, vis, sbuf);
                float bmax = -INFINITY;
                int first = 1;
                for (int64_t j = 0; j < nbk; j++)
                    if (vis[j] && (first || sbuf[j] > bmax)) { bmax = sbuf[j]; first = 0; }
                if (bmax > mx) {
                    float a = (nvis == 0) ? 0.0f : expf(mx - bmax);
                    l *= a;
                    for (int64_t d = 0; d < D; d++) acc[d] *= a;
                    mx = bmax;
                }
                for (int64_t j = 0; j < nbk; j++) pbuf[j] = vis[j] ? sbuf[j] - mx : -INFINITY;
#if G2_X86
                if (simd) g2_exp_avx512(pbuf, pbuf, nbk);
                else
#endif
                    for (int64_t j = 0; j < nbk; j++) pbuf[j] = expf(pbuf[j]);
                for (int64_t s = s0; s < s1; s++) {
                    if (!vis[s - s0]) continue;
                    float p = pbuf[s - s0];
                    l += p;
#if G2_X86
                    if (simd) axpy_avx512(acc, p, vb + s * D, D);
                    else
#endif
                        scale_axpy_scalar(acc, 1.0f, vb + s * D, p, D);
                    nvis++;
                }
            }
            if (nvis == 0) {
                /* no visible key: uniform softmax over all S keys (what HF's finfo.min mask gives) */
                for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
                for (int64_t s = 0; s < S; s++) scale_axpy_scalar(acc, 1.0f, vb + s * D, 1.0f, D);
                l = (float)S;
            }
            if (S == 0) {
                for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            } else {
                for (int64_t d = 0; d < D; d++) o[d] = acc[d] / l;
            }
        }
        free(acc);
    }
}
