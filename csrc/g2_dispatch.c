/* CPU feature detection and the SIMD level in effect (run-time dispatch), plus the process-wide
 * settings the kernels rely on (OpenMP present or not, when to fan out to threads, malloc
 * thresholds). */
#include "g2_internal.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* CPU features and dispatch                                                                   */
/* ------------------------------------------------------------------------------------------ */

static int g_features = -1;
static int g_simd = -1; /* -1: not decided yet */

int g2_cpu_features(void) {
    if (g_features >= 0) return g_features;
    int f = 0;
#if G2_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) f |= G2_CPU_AVX2;
    if (__builtin_cpu_supports("fma")) f |= G2_CPU_FMA;
    if (__builtin_cpu_supports("avx512f")) f |= G2_CPU_AVX512F;
    if (__builtin_cpu_supports("avx512bw")) f |= G2_CPU_AVX512BW;
    if (__builtin_cpu_supports("avx512vl")) f |= G2_CPU_AVX512VL;
#if __GNUC__ >= 11 || defined(__clang__)
    if (__builtin_cpu_supports("avx512bf16")) f |= G2_CPU_AVX512BF16;
#endif
    if (__builtin_cpu_supports("avx512vnni")) f |= G2_CPU_AVX512VNNI;
#endif
    g_features = f;
    return f;
}

static int have_avx512(void) {
    int need = G2_CPU_AVX512F | G2_CPU_AVX512BW | G2_CPU_AVX512VL | G2_CPU_FMA;
    return (g2_cpu_features() & need) == need;
}

int g2_set_simd(int level) {
    g_simd = (level > 0 && G2_X86 && have_avx512()) ? (level == 2 ? 2 : 1) : 0;
    return g_simd;
}

int g2_get_simd(void) {
    if (g_simd < 0) g2_set_simd(1);
    return g_simd;
}

int g2_have_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* thread policy (see g2_set_parallel_threshold in gemma2np_kernels.h)                         */
/* ------------------------------------------------------------------------------------------ */

static double g_par_min_ns = -1.0; /* < 0: not read from the environment yet */

double g2_set_parallel_threshold(double us) {
    if (us >= 0.0) {
        g_par_min_ns = us * 1000.0;
    } else if (g_par_min_ns < 0.0) {
        const char *s = getenv("G2_PAR_MIN_US");
        char *end = NULL;
        double v = s ? strtod(s, &end) : -1.0;
        g_par_min_ns = (s && end != s && v >= 0.0 && v < 1e12 ? v : G2_PAR_MIN_US_DEFAULT) * 1000.0;
    }
    return g_par_min_ns / 1000.0;
}

int g2_par_threads(int nt, double ns) {
    if (nt <= 1) return 1;
    if (g_par_min_ns < 0.0) g2_set_parallel_threshold(-1.0);
    return ns >= g_par_min_ns ? nt : 1;
}

/* glibc hands every freed block above M_MMAP_THRESHOLD (128 KB until a large mmap'd block is
 * freed) back to the kernel, so each activation of a forward pass -- (T, 9216) float32 is 4.7 MB
 * at T = 128 -- was mapped afresh and faulted in page by page: ~97,000 page faults and ~0.3 s of
 * kernel time per 128-token prefill of gemma-2-2b (the int8 load happened to raise the threshold
 * itself by freeing its 32 MB chunks, so only bf16/f32 models paid). */
int g2_tune_malloc(void) {
#if defined(__GLIBC__) && defined(M_MMAP_THRESHOLD) && defined(M_TRIM_THRESHOLD)
    int a = mallopt(M_MMAP_THRESHOLD, 32 << 20);
    int b = mallopt(M_TRIM_THRESHOLD, 64 << 20);
    return a == 1 && b == 1;
#else
    return 0;
#endif
}
