/* Element-wise and row kernels: rmsnorm, GeGLU, RoPE, softcap / tanh / exp, argmax / top-k and
 * the float32 -> bf16 conversion. Where a kernel has an AVX-512 version it sits right after the
 * scalar loop it is tested against (tests/test_kernels.py runs both through the `simd` fixture,
 * set_simd(0) forcing the scalar one); kernels without one are the same plain C at every SIMD
 * level. Every output element is computed by one thread from its own inputs only, so the chunking
 * and the thread count never change a result. */
#include "g2_internal.h"
#include "g2_simd_math.h"

#define G2_EW_CHUNK 4096 /* elements per work item of the chunked element-wise loops */

/* ------------------------------------------------------------------------------------------ */
/* rmsnorm (scalar only)                                                                       */
/* ------------------------------------------------------------------------------------------ */

void g2_rmsnorm(const float *x, const float *w, int64_t R, int64_t D, float eps, float *out,
                int n_threads) {
    int64_t r;
    const int nt = g2_par_threads(NT(n_threads), (double)R * (double)D * G2_NS_PER_ELEM);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (r = 0; r < R; r++) {
        const float *xr = x + r * D;
        /* sum of squares in double over 8 independent lanes (one serial chain of double adds
         * made this kernel latency-bound: 180 us for 128 x 2304); double keeps it exact to
         * well below float32 rounding, so the lane order does not matter */
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
            for (int j = 0; j < 8; j++) acc[j] += (double)xr[d + j] * (double)xr[d + j];
        for (; d < D; d++) acc[0] += (double)xr[d] * (double)xr[d];
        double ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        float ms = (float)(ss / (double)D);
        float inv = 1.0f / sqrtf(ms + eps);
        for (int64_t d = 0; d < D; d++) out[r * D + d] = (xr[d] * inv) * (1.0f + w[d]);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* GeGLU: act(gate) * up                                                                       */
/* ------------------------------------------------------------------------------------------ */

#define GELU_BETA 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_KAPPA 0.044715f

/* gelu tanh approximation, ops.gelu_tanh's operation order */
static void geglu_tanh_scalar(const float *gate, const float *up, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        float inner = GELU_BETA * (g + ((GELU_KAPPA * g) * g) * g); /* ops.gelu_tanh's order */
        out[i] = ((0.5f * g) * (1.0f + tanhf(inner))) * up[i];
    }
}

#if G2_X86
/* ((0.5 g) (1 + tanh(beta (g + ((kappa g) g) g)))) up, the scalar code's operation order */
static G2_TGT void geglu_tanh_avx512(const float *gate, const float *up, float *out, int64_t n) {
    const __m512 beta = _mm512_set1_ps(0.7978845608028654f), kappa = _mm512_set1_ps(0.044715f);
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        __m512 c = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(kappa, g), g), g);
        __m512 t = g2_tanh512(_mm512_mul_ps(beta, _mm512_add_ps(g, c)));
        __m512 a = _mm512_mul_ps(_mm512_mul_ps(half, g), _mm512_add_ps(one, t));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, up + i)));
    }
}

#endif

/* exact gelu (erf); no AVX-512 version */
static void geglu_erf_scalar(const float *gate, const float *up, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = (0.5f * g * (1.0f + erff(g / 1.41421356237309515f))) * up[i];
    }
}

void g2_geglu(const float *gate, const float *up, int64_t n, int approximate, float *out,
              int n_threads) {
    int64_t ch, nch = (n + G2_EW_CHUNK - 1) / G2_EW_CHUNK;
    int simd = 0;
#if G2_X86
    simd = approximate && g2_get_simd();
#endif
    (void)simd;
    const int nt = g2_par_threads(NT(n_threads), (double)n * (simd ? G2_NS_PER_EW_SIMD : G2_NS_PER_EW_LIBM));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (ch = 0; ch < nch; ch++) {
        const int64_t i0 = ch * G2_EW_CHUNK, cnt = G2_MIN(G2_EW_CHUNK, n - i0);
#if G2_X86
        if (simd) {
            geglu_tanh_avx512(gate + i0, up + i0, out + i0, cnt);
            continue;
        }
#endif
        if (approximate) geglu_tanh_scalar(gate + i0, up + i0, out + i0, cnt);
        else geglu_erf_scalar(gate + i0, up + i0, out + i0, cnt);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* RoPE (scalar only)                                                                          */
/* ------------------------------------------------------------------------------------------ */

void g2_rope(const float *x, const float *cos_, const float *sin_, int64_t B, int64_t H,
             int64_t T, int64_t D, int64_t Bc, float *out, int n_threads) {
    int64_t half = D / 2, rows = B * H * T, r;
    const int nt = g2_par_threads(NT(n_threads), (double)rows * (double)D * G2_NS_PER_ELEM);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (r = 0; r < rows; r++) {
        int64_t t = r % T, b = r / (H * T);
        int64_t bc = Bc == 1 ? 0 : b;
        const float *c = cos_ + (bc * T + t) * D, *s = sin_ + (bc * T + t) * D;
        const float *xr = x + r * D;
        float *o = out + r * D;
        for (int64_t i = 0; i < half; i++) {
            float x1 = xr[i], x2 = xr[i + half];
            float a = x1 * c[i] + (-x2) * s[i];
            float bb = x2 * c[i + half] + x1 * s[i + half];
            o[i] = a;
            o[i + half] = bb;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* softcap / tanh / exp                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* scalar: libm's tanhf / expf */
static void ew_scalar(int op, const float *x, float *out, int64_t cnt, float cap) {
    for (int64_t i = 0; i < cnt; i++)
        out[i] = op == 0 ? cap * tanhf(x[i] / cap) : (op == 1 ? tanhf(x[i]) : expf(x[i]));
}

#if G2_X86
/* AVX-512: g2_exp512 / g2_tanh512 (g2_simd_math.h); exp and softcap are also used by attention */
G2_HIDDEN G2_TGT void g2_exp_avx512(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(out + i, m, g2_exp512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

static G2_TGT void tanh_avx512(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(out + i, m, g2_tanh512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* cap * tanh(x / cap) */
G2_HIDDEN G2_TGT void g2_softcap_avx512(const float *x, float *out, int64_t n, float cap) {
    __m512 c = _mm512_set1_ps(cap);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), c);
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(c, g2_tanh512(v)));
    }
}

#endif

/* elementwise ops: 0 softcap (cap * tanh(x / cap)), 1 tanh, 2 exp; chunks, static schedule */
static void ew_run(int op, const float *x, int64_t n, float cap, float *out, int n_threads) {
    int64_t ch, nch = (n + G2_EW_CHUNK - 1) / G2_EW_CHUNK;
    int simd = g2_get_simd() != 0;
    const int nt = g2_par_threads(NT(n_threads), (double)n * (simd ? G2_NS_PER_EW_SIMD : G2_NS_PER_EW_LIBM));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (ch = 0; ch < nch; ch++) {
        const int64_t i0 = ch * G2_EW_CHUNK, cnt = G2_MIN(G2_EW_CHUNK, n - i0);
#if G2_X86
        if (simd) {
            if (op == 0) g2_softcap_avx512(x + i0, out + i0, cnt, cap);
            else if (op == 1) tanh_avx512(x + i0, out + i0, cnt);
            else g2_exp_avx512(x + i0, out + i0, cnt);
            continue;
        }
#endif
        (void)simd;
        ew_scalar(op, x + i0, out + i0, cnt, cap);
    }
}

void g2_softcap(const float *x, int64_t n, float cap, float *out, int n_threads) {
    ew_run(0, x, n, cap, out, n_threads);
}

void g2_tanh(const float *x, int64_t n, float *out, int n_threads) {
    ew_run(1, x, n, 0.0f, out, n_threads);
}

void g2_exp(const float *x, int64_t n, float *out, int n_threads) {
    ew_run(2, x, n, 0.0f, out, n_threads);
}

/* ------------------------------------------------------------------------------------------ */
/* argmax / top-k (scalar only: comparisons, no arithmetic)                                    */
/* ------------------------------------------------------------------------------------------ */

void g2_argmax(const float *x, int64_t R, int64_t V, int64_t *out, int n_threads) {
    int64_t r;
    const int nt = g2_par_threads(NT(n_threads), (double)R * (double)V * G2_NS_PER_ELEM);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (r = 0; r < R; r++) {
        const float *xr = x + r * V;
        int64_t best = 0;
        float bv = xr[0];
        if (!isnan(bv)) {
            for (int64_t i = 1; i < V; i++) {
                float vi = xr[i];
                if (vi > bv) { bv = vi; best = i; }
                else if (isnan(vi)) { best = i; break; }
            }
        }
        out[r] = best;
    }
}

/* "a is better than b": larger value, ties -> smaller index */
#define TK_BETTER(va, ia, vb, ib) ((va) > (vb) || ((va) == (vb) && (ia) < (ib)))

static void tk_sift_down(float *hv, int64_t *hi, int64_t n, int64_t i) {
    /* min-heap on "better": the worst element at the root */
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && TK_BETTER(hv[w], hi[w], hv[l], hi[l])) w = l;
        if (r < n && TK_BETTER(hv[w], hi[w], hv[r], hi[r])) w = r;
        if (w == i) return;
        float tv = hv[i]; hv[i] = hv[w]; hv[w] = tv;
        int64_t ti = hi[i]; hi[i] = hi[w]; hi[w] = ti;
        i = w;
    }
}

void g2_topk(const float *x, int64_t R, int64_t V, int64_t k, float *values, int64_t *indices,
             int n_threads) {
    int64_t r;
    if (k <= 0) return;
    /* a heap of k: ~2 comparisons per element while the heap is warm, more while it fills */
    const int nt = g2_par_threads(NT(n_threads), (double)R * (double)V * 2.0 * G2_NS_PER_ELEM);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (r = 0; r < R; r++) {
        const float *xr = x + r * V;
        float *hv = values + r * k;
        int64_t *hi = indices + r * k;
        int64_t n = 0;
        for (int64_t i = 0; i < V; i++) {
            float vi = xr[i];
            if (n < k) {
                /* sift up */
                int64_t c = n++;
                hv[c] = vi; hi[c] = i;
                while (c > 0) {
                    int64_t p = (c - 1) / 2;
                    if (TK_BETTER(hv[p], hi[p], hv[c], hi[c])) {
                        float tv = hv[p]; hv[p] = hv[c]; hv[c] = tv;
                        int64_t ti = hi[p]; hi[p] = hi[c]; hi[c] = ti;
                        c = p;
                    } else break;
                }
            } else if (TK_BETTER(vi, i, hv[0], hi[0])) {
                hv[0] = vi; hi[0] = i;
                tk_sift_down(hv, hi, n, 0);
            }
        }
        /* heap sort: repeatedly move the worst to the end -> best first */
        for (int64_t end = n - 1; end > 0; end--) {
            float tv = hv[0]; hv[0] = hv[end]; hv[end] = tv;
            int64_t ti = hi[0]; hi[0] = hi[end]; hi[end] = ti;
            tk_sift_down(hv, hi, end, 0);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* float32 -> bf16 bits, exactly ml_dtypes.bfloat16's conversion (weight packing)              */
/* ------------------------------------------------------------------------------------------ */

/* RNE like f32_to_bf16, but a NaN becomes the canonical quiet NaN 0x7FC0 / 0xFFC0 (sign kept), as
 * ml_dtypes (Eigen's bfloat16) does, so bits packed here equal bits packed with
 * x.astype(ml_dtypes.bfloat16) for every input. (The internal f32_to_bf16 keeps the NaN's top
 * payload bits instead; it only ever rounds activations, where any NaN stays a NaN.) */
static inline uint16_t f32_to_bf16_ml(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((u >> 16) & 0x8000u) | 0x7fc0u);
    return f32_to_bf16(f);
}

static void f32_to_bf16_scalar(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_bf16_ml(x[i]);
}

#if G2_X86
static G2_TGT void f32_to_bf16_avx512(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        __m512i h = g2_rne_bf16_epi32(v);
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        __m512i qnan = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16),
                                                        _mm512_set1_epi32(0x8000)),
                                       _mm512_set1_epi32(0x7fc0));
        h = _mm512_mask_mov_epi32(h, nan, qnan);
        _mm256_mask_storeu_epi16(out + i, m, _mm512_cvtepi32_epi16(h));
    }
}
#endif

void g2_f32_to_bf16(const float *x, uint16_t *out, int64_t n, int n_threads) {
    int64_t ch, nch = (n + G2_EW_CHUNK - 1) / G2_EW_CHUNK;
    int simd = g2_get_simd() != 0;
    const int nt = g2_par_threads(NT(n_threads), (double)n * (simd ? 0.25 : 1.0) * G2_NS_PER_ELEM);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (ch = 0; ch < nch; ch++) {
        const int64_t i0 = ch * G2_EW_CHUNK, cnt = G2_MIN(G2_EW_CHUNK, n - i0);
#if G2_X86
        if (simd) {
            f32_to_bf16_avx512(x + i0, out + i0, cnt);
            continue;
        }
#endif
        (void)simd;
        f32_to_bf16_scalar(x + i0, out + i0, cnt);
    }
}
