/* linear internals shared by g2_linear.c (arithmetic: tiles and packers) and g2_linear_drive.c
 * (scheduling: blocks and threads). AVX-512 only. */
#ifndef G2_LINEAR_H
#define G2_LINEAR_H

#include "g2_internal.h"

#if G2_X86

#define MR_MAX 4      /* x rows per tile (tile_avx512, tile_dp) */
#define NR_MAX 8      /* W rows per tile */
#define NR_MAIN 4     /* W rows of the main f32 / bf16 / int8 tiles; prefill blocks are a multiple */
#define G2_OP_NR 14   /* W rows of the main vdpbf16ps outer-product tile */

/* Tile entry points: x, K, w, scales, block, nb, y, ldy. */
typedef void (*tile_fn)(const void *, int64_t, const void *, const float *, int64_t, int64_t,
                        float *, int64_t);
/* outer-product tile: x panel, K2, odd, w, ldw, y, ldy, valid rows of the panel */
typedef void (*op_fn)(const uint32_t *, int64_t, int, const uint16_t *, int64_t, float *, int64_t, int64_t);

/* One output matrix of a (multi-)linear: y (M, N) = x @ w^T, w (N, K) with int8 scales sc. The
 * drivers run every part of a call in one parallel loop over their joint list of W blocks, so
 * q/k/v (or gate/up) share one split of x, one fork/join and one load balance. */
typedef struct {
    const char *w;
    const float *sc;
    int64_t N;
    float *y;
} g2_part;

/* g2_linear.c: the outer-product tiles (NR = g2_op_nr[v], 16 or 32 x rows = g2_op_tiles[MP-1][v]),
 * the x packer they read and the W widening of the prefill drivers */
G2_HIDDEN extern const int g2_op_nr[5];
G2_HIDDEN extern const op_fn g2_op_tiles[2][5];
G2_HIDDEN G2_TGT void g2_pack_x_op(const float *x, int64_t M, int64_t K, uint32_t *xp, int nt);
G2_HIDDEN G2_TGT void g2_widen_rows(int fmt, int to_bf16, const void *w, const float *sc, int64_t nr,
                             int64_t K, int64_t block, int64_t nb, void *dst);
G2_HIDDEN G2_TGT_BF16 void g2_widen_i8_bf16(const int8_t *w, const float *sc, int64_t nr, int64_t K,
                                int64_t block, int64_t nb, uint16_t *dst, int64_t ldd);
/* g2_int4.c: nr int4 rows (codes, meta) -> bf16 rows ldd apart, bf16 (RNE) of the float32 dequantisation */
G2_HIDDEN G2_TGT_BF16 void g2_widen_i4_bf16(const uint8_t *codes, const uint8_t *meta, int64_t nr, int64_t K,
                                            uint16_t *dst, int64_t ldd);
/* g2_q4_0.c: nr q4_0 rows (codes, f16 scales) -> bf16 rows ldd apart, bf16 (RNE) of d * (u - 8) */
G2_HIDDEN G2_TGT_BF16 void g2_widen_q4_0_bf16(const uint8_t *codes, const uint16_t *sc, int64_t nr, int64_t K,
                                              uint16_t *dst, int64_t ldd);

/* g2_linear_drive.c */
G2_HIDDEN extern int g2_prefetch; /* software prefetch in the decode tiles (G2_PF, default 1) */
G2_HIDDEN void g2_gemv_drive(tile_fn main4, int NRM, tile_fn tail1, const void *x, int64_t xrow_bytes,
                             int64_t M, int64_t K, const g2_part *parts, int np, int64_t wrow_bytes,
                             int64_t block, int64_t nb, int nt);
G2_HIDDEN int g2_gemm_drive(const tile_fn tiles[2][2], const void *x, int64_t xrow_bytes, int64_t M,
                            int64_t K, const g2_part *parts, int np, int64_t wrow_bytes, int64_t block,
                            int64_t nb, int nt, int widen_fmt, int widen_to_bf16, int64_t trow_bytes);
G2_HIDDEN int g2_gemm_op_drive(const float *x, int64_t M, int64_t K, const g2_part *parts, int np,
                               int widen_int8, int64_t block, int64_t nb, int nt);

#endif /* G2_X86 */
#endif
