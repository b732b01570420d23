/* gemma2np native kernels: plain C99, no Python, callable without the GIL.
 *
 * All tensors are C-contiguous float32 unless stated otherwise. Callers (the
 * Cython wrappers in _native.pyx) validate shapes, dtypes and ranges BEFORE
 * calling; the C side trusts its arguments. Every kernel takes n_threads
 * (<= 0 means 1) and produces bitwise-identical results for any thread count
 * (each output element is computed by exactly one thread in a fixed order).
 *
 * Implemented in csrc/g2_*.c (the file map is at the top of csrc/g2_internal.h).
 *
 * Runtime CPU dispatch: on x86_64 the AVX-512 paths are compiled with
 * __attribute__((target)) / #pragma GCC target and chosen at run time with
 * __builtin_cpu_supports; elsewhere (or when disabled with g2_set_simd(0))
 * the portable scalar code runs.
 */
#ifndef GEMMA2NP_KERNELS_H
#define GEMMA2NP_KERNELS_H

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* weight formats of g2_linear */
#define G2_W_F32    0  /* w: float32 (N, K) */
#define G2_W_BF16   1  /* w: uint16 bf16 bits (N, K); x stays f32, w widened exactly */
#define G2_W_INT8   2  /* w: int8 (N, K) + f32 scales (N, ceil(K/block)); x stays f32 */
#define G2_W_BF16DP 3  /* w: uint16 bf16 bits (N, K); x rounded to bf16 (RNE), f32 accumulation
                          (vdpbf16ps on avx512_bf16) */

/* Batch-size rule of G2_W_BF16 and G2_W_INT8: with M >= G2_DP_MIN_M rows (prefill) x is rounded
 * to bf16 (RNE) and int8 weights to bf16(q * scale), so the product runs on vdpbf16ps like
 * G2_W_BF16DP (the transformers bf16 baseline rounds activations to bf16 too). With fewer rows
 * (decode) x keeps float32 accuracy: bf16 weights use vdpbf16ps on x split exactly into three
 * bf16 parts, int8 weights are widened to float32 and each block sum is scaled once. */
#define G2_DP_MIN_M 8

/* feature bits */
#define G2_CPU_AVX2       1
#define G2_CPU_FMA        2
#define G2_CPU_AVX512F    4
#define G2_CPU_AVX512BW   8
#define G2_CPU_AVX512VL  16
#define G2_CPU_AVX512BF16 32
#define G2_CPU_AVX512VNNI 64

int g2_cpu_features(void);
/* 0 = portable scalar only, 1 = AVX-512 (if the CPU has it; with avx512_bf16 when present),
 * 2 = AVX-512 without the avx512_bf16 instructions (to test that path). Returns the level in
 * effect. */
int g2_set_simd(int level);
int g2_get_simd(void);
int g2_have_openmp(void);

/* Fan-out threshold: a kernel uses its n_threads only when its work, estimated on one thread, is at
 * least `us` microseconds; smaller work runs on the calling thread alone. A parallel region costs a
 * wake-up and a join of every thread: a few microseconds on an idle machine, but with other busy
 * processes on every core a thread waiting for a core holds the join for a scheduler time slice
 * (milliseconds), so fanning out small work made decoding 10-200x slower under load (issue 13).
 * Default G2_PAR_MIN_US_DEFAULT, or the G2_PAR_MIN_US environment variable read at the first call;
 * 0 = always fan out (what the tests use to run the threaded code on small shapes). Results are
 * bitwise the same for any threshold. Why 100: waking a sleeping worker costs ~10-30 us, so
 * splitting pays from ~50 us of real work, and the estimates (DRAM bandwidth for the weights)
 * overstate cache-resident work like the bundled model's ~2x; measured with
 * benchmarks/contention.py (50 us still fanned out the bundled model's gate/up and lost to 1 thread
 * on the busy host). g2_set_parallel_threshold(us < 0) only returns the value in
 * effect; otherwise it sets it and returns it. */
#define G2_PAR_MIN_US_DEFAULT 100.0
double g2_set_parallel_threshold(double us);

/* Keep freed activation-sized blocks in the process heap (glibc only; elsewhere a no-op that
 * returns 0): M_MMAP_THRESHOLD = 32 MB, M_TRIM_THRESHOLD = 64 MB -- the values glibc's own
 * dynamic threshold reaches after the first free of a large block. Returns 1 when applied. */
int g2_tune_malloc(void);

/* y[M,N] = x[M,K] @ W[N,K]^T (+ bias[N]).  Returns 0, or -1 on allocation failure. */
/* Symmetric absmax int8 quantisation per (row, block of `block` inputs) of W (N, K) given as float32
 * (src_bf16 = 0) or bf16 bits (src_bf16 = 1): scale = absmax / 127, q = rint(w / scale) clipped to
 * [-127, 127] (round half to even, float32 arithmetic: exactly kernels.reference.quantize_int8); an
 * all-zero block gets scale 0 and q 0. q (N, K) int8, scales (N, ceil(K/block)) float32. */
void g2_quantize_int8(const void *w, int src_bf16, int64_t N, int64_t K, int64_t block, int8_t *q,
                      float *scales, int n_threads);

/* int4 quantisation (csrc/g2_int4_quant.c): W (N, K), K a multiple of 256, float32 (src_bf16 = 0) or
 * bf16 bits (src_bf16 = 1) -> codes (N, K/2), meta (N, K/256*16) in the layout of g2_linear_int4,
 * bitwise kernels/int4.py's quantize_int4 (llama.cpp's RMSE-optimal scale search), and status (N)
 * per row: 0 ok, 1 a NaN / inf (the row is quantised as zeros), 2 too large for int4 (|w| > 2^40:
 * quantised as zeros; or a float16 d / dmin overflowed). Returns 1 if any status is not 0. */
int g2_quantize_int4(const void *w, int src_bf16, int64_t N, int64_t K, uint8_t *codes, uint8_t *meta,
                     uint8_t *status, int n_threads);

int g2_linear(const float *x, int64_t M, int64_t K, int fmt, const void *w,
              const float *scales, int64_t block, int64_t N, const float *bias,
              float *y, int n_threads);

/* Several linears over the same x in one call (q/k/v, gate/up): y[p] (M, N[p]) = x @ w[p]^T for
 * p < nparts (<= G2_MAX_PARTS), all in format fmt (int8: scales[p], same block). x is split /
 * rounded once and the W blocks of every part share one parallel loop. Each y[p] is exactly what
 * g2_linear gives for that part alone. Returns 0, -1 on allocation failure, -2 if nparts is too
 * large. scales may be NULL for formats without scales. */
#define G2_MAX_PARTS 8
int g2_linear_multi(const float *x, int64_t M, int64_t K, int fmt, int nparts, const void *const *w,
                    const float *const *scales, const int64_t *N, int64_t block, float *const *y,
                    int n_threads);

/* int4 weights (layout: gemma2np/kernels/int4.py; K a multiple of 256): codes (N, K/2) two 4-bit
 * codes per byte, meta (N, K/256*16) per super-block f16 d, f16 dmin, 16 six-bit scales/mins.
 * g2_dequantize_int4: out (N, K) float32 = (d*ls)*u - dmin*lm. g2_linear_int4: y (M, N) = x @ W^T
 * with W those float32 values and x quantised to int8 per 32 inputs (integer dot products; exactly
 * kernels/int4.py linear_decode) when M < G2_DP_MIN_M, bf16 (RNE) of them with x rounded to bf16
 * when M >= G2_DP_MIN_M (as int8). Returns 0, -1 on allocation failure, -2 if K % 256 != 0. */
void g2_dequantize_int4(const uint8_t *codes, const uint8_t *meta, int64_t N, int64_t K, float *out,
                        int n_threads);
int g2_linear_int4(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint8_t *meta,
                   int64_t N, float *y, int n_threads);
/* the same for nparts (<= G2_MAX_PARTS) matrices of one x (q/k/v, gate/up): x quantised / packed
 * once, one parallel loop; each y[p] exactly g2_linear_int4's. -2 also for nparts > G2_MAX_PARTS. */
int g2_linear_int4_multi(const float *x, int64_t M, int64_t K, int nparts, const uint8_t *const *codes,
                         const uint8_t *const *meta, const int64_t *N, float *const *y, int n_threads);

/* llama.cpp Q4_0 weights (layout: gemma2np/kernels/q4_0.py; K a multiple of 32): codes (N, K/2), per
 * block of 32 byte i = input i (low nibble) and i + 16 (high), scales (N, K/32) f16 bits of d.
 * g2_dequantize_q4_0: out (N, K) float32 = d * (u - 8). g2_linear_q4_0: y (M, N) = x @ W^T, with
 * M < G2_DP_MIN_M x rounded to int8 per 32 (as int4's decode) and integer dot products, the arithmetic of
 * kernels/q4_0.py linear_decode (bitwise its twin), else bf16 of W with x rounded to bf16 (as int8). Returns 0, -1 on allocation failure, -2 if K is not a multiple of 32. */
void g2_dequantize_q4_0(const uint8_t *codes, const uint16_t *scales, int64_t N, int64_t K, float *out,
                        int n_threads);
int g2_linear_q4_0(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales,
                   int64_t N, float *y, int n_threads);
/* several q4_0 matrices of the same x (q/k/v, gate/up): x quantised once (decode) and every matrix's row
 * blocks in one parallel loop; each y[p] exactly g2_linear_q4_0's. 1..G2_MAX_PARTS parts; returns as
 * g2_linear_q4_0, -2 also for too many parts. */
int g2_linear_q4_0_multi(const float *x, int64_t M, int64_t K, int nparts, const uint8_t *const *codes,
                         const uint16_t *const *scales, const int64_t *N, float *const *y, int n_threads);

/* Round float32 to bf16 bits exactly as x.astype(ml_dtypes.bfloat16): round to nearest even,
 * denormals kept, NaN -> 0x7FC0 / 0xFFC0 (sign kept, payload dropped). For weight packing. */
void g2_f32_to_bf16(const float *x, uint16_t *out, int64_t n, int n_threads);

/* Fused attention (online softmax over fixed chunks of keys, no T x S matrix; g2_attention.c).
 * q (B,Hq,T,D) float32 with element strides (qsb, qsh, qst) and a contiguous last axis; k/v
 * (B,Hkv,S,D) float32 (kv_bf16 = 0) or bf16 bits (kv_bf16 = 1), element strides (batch, head, row),
 * last axis contiguous; out (B,Hq,T,D) contiguous; q_pos (T), k_pos (S), key_valid (B,S) or NULL.
 * softcap <= 0: none; window <= 0: none. Returns 0, or -1 when out of memory. */
int g2_attention(const float *q, int64_t qsb, int64_t qsh, int64_t qst, const void *k, const void *v,
                 int kv_bf16, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh,
                 int64_t vss, const int64_t *q_pos, const int64_t *k_pos, const uint8_t *key_valid,
                 int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S, int64_t D, float scaling,
                 float softcap, int64_t window, float *out, int n_threads);

/* out[r,:] = x[r,:] * 1/sqrt(mean(x[r,:]^2) + eps) * (1 + w)   (float32) */
void g2_rmsnorm(const float *x, const float *w, int64_t R, int64_t D, float eps, float *out,
                int n_threads);

/* out = act(gate) * up, act: 0 = gelu tanh approximation, 1 = exact gelu (erf) */
void g2_geglu(const float *gate, const float *up, int64_t n, int approximate, float *out,
              int n_threads);

/* RoPE rotate-half: x (B,H,T,D); cos/sin (Bc,T,D) with Bc in {1,B}; out may alias x. */
void g2_rope(const float *x, const float *cos_, const float *sin_, int64_t B, int64_t H,
             int64_t T, int64_t D, int64_t Bc, float *out, int n_threads);

/* out = cap * tanh(x / cap); out may alias x */
void g2_softcap(const float *x, int64_t n, float cap, float *out, int n_threads);

/* out = tanh(x), out = exp(x) (float32; the AVX-512 versions are polynomial, a few ulp; see
 * tests/test_kernels.py); out may alias x */
void g2_tanh(const float *x, int64_t n, float *out, int n_threads);
void g2_exp(const float *x, int64_t n, float *out, int n_threads);

/* argmax over the last axis of x (R,V): first index of the maximum (NaN counts as maximum,
 * first NaN wins, like numpy.argmax). */
void g2_argmax(const float *x, int64_t R, int64_t V, int64_t *out, int n_threads);

/* top-k over the last axis (R,V), k <= V, no NaN in x: values/indices (R,k), ordered by value
 * descending, ties by index ascending. Uses a size-k heap (O(V log k)). */
void g2_topk(const float *x, int64_t R, int64_t V, int64_t k, float *values, int64_t *indices,
             int n_threads);

#ifdef __cplusplus
}
#endif
#endif
