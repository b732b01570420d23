/* linear, scheduling only: how the W rows of one (multi-)linear call are cut into blocks and
 * spread over threads, and which tile runs where. No arithmetic of its own -- every output is
 * computed by exactly one tile call (g2_linear.c) whatever the block size or thread count, so the
 * results do not depend on either. */
#include "g2_internal.h"
#include "g2_linear.h"

#if G2_X86
/* Scheduling knobs (set once from the environment, for experiments; defaults are the tuned
 * values): G2_GEMV_KB = target bytes of W per work item for M < G2_DP_MIN_M (default 64 KB). */
static int64_t g_gemv_bytes = -1;
G2_HIDDEN int g2_prefetch = 1; /* G2_PF=0: no software prefetch in the decode tiles */
static int64_t gemv_bytes(void) {
    if (g_gemv_bytes < 0) {
        const char *s = getenv("G2_GEMV_KB");
        int64_t v = s ? atoll(s) : 0;
        g_gemv_bytes = (v > 0 ? v : 64) * 1024;
        s = getenv("G2_PF");
        g2_prefetch = s ? atoi(s) : 1;
    }
    return g_gemv_bytes;
}

/* Rows of x per M chunk of the prefill drivers (see g2_gemm_op_drive): the chunk's x (row_bytes per
 * row, as the tiles read it) is kept to ~G2_XCHUNK_KB (default G2_XCHUNK_KB_DEFAULT) so it stays in
 * cache while every W block runs over it; drivers that convert their W blocks (once per chunk) get
 * G2_XCHUNK_WIDEN (default 2) times that, to spread the conversion over more rows. A multiple of
 * `unit` (the x panel / tile height), at least one unit. Read once from the environment, for
 * experiments. 3 MB: with the 256 KB W block it fits the 4 MB L2 of this host's cores; measured
 * (1 thread, busy host, per-token CPU time at M = 4096 against M = 512): 1 MB (48 rows of
 * down_proj's x) was ~20% slower, 2-32 MB were alike within the noise (~5%), 64 MB was back to
 * the unchunked rate; int8's per-chunk widening cost no measurable time at 1-4x. */
#define G2_XCHUNK_KB_DEFAULT 3072
static int64_t g_xchunk_bytes = -1, g_xchunk_widen = 2;
static int64_t chunk_rows(int64_t row_bytes, int64_t unit, int widen) {
    if (g_xchunk_bytes < 0) {
        const char *s = getenv("G2_XCHUNK_KB");
        int64_t v = s ? atoll(s) : 0;
        s = getenv("G2_XCHUNK_WIDEN");
        int64_t f = s ? atoll(s) : 0;
        g_xchunk_widen = f > 0 ? f : 2;
        g_xchunk_bytes = (v > 0 ? v : G2_XCHUNK_KB_DEFAULT) * 1024;
    }
    int64_t rows = g_xchunk_bytes * (widen ? g_xchunk_widen : 1) / (row_bytes > 0 ? row_bytes : 1);
    rows = rows / unit * unit;
    return rows < unit ? unit : rows;
}

/* global block jb -> part p and its block index; first[p] = first global block of part p */
static inline int part_of(const int64_t *first, int np, int64_t jb) {
    int p = 0;
    while (p + 1 < np && jb >= first[p + 1]) p++;
    return p;
}

/* global block jb of `rows` rows -> its part and the part's rows [*n0, *n1) */
static inline const g2_part *block_rows(const g2_part *parts, const int64_t *first, int np, int64_t jb,
                                        int64_t rows, int64_t *n0, int64_t *n1) {
    const int p = part_of(first, np, jb);
    *n0 = (jb - first[p]) * rows;
    *n1 = G2_MIN(parts[p].N, *n0 + rows);
    return &parts[p];
}

static int64_t count_blocks(const g2_part *parts, int np, int64_t rows) {
    int64_t t = 0;
    for (int p = 0; p < np; p++) t += (parts[p].N + rows - 1) / rows;
    return t;
}

/* Row blocks of the prefill drivers: ~256 KB of W rows (row_bytes each) per block, a multiple of
 * `unit` rows, at least 4 blocks per thread, and if possible a block count that splits evenly over
 * the threads (19 blocks on 2 threads left one idle for 1/19). Fills first[] (first global block
 * of each part, first[np] = the total) and returns the rows per block. */
static int64_t plan_blocks(const g2_part *parts, int np, int64_t row_bytes, int64_t unit, int nt,
                           int64_t *first) {
    int64_t nblk = (256 * 1024) / (row_bytes > 0 ? row_bytes : 1);
    nblk = nblk / unit * unit;
    if (nblk < unit) nblk = unit;
    while (nblk > unit && count_blocks(parts, np, nblk) < 4 * (int64_t)nt) nblk -= unit;
    if (nt > 1 && count_blocks(parts, np, nblk) % nt)
        for (int64_t b = nblk - unit; b >= nblk / 2 && b >= unit; b -= unit)
            if (count_blocks(parts, np, b) % nt == 0) {
                nblk = b;
                break;
            }
    first[0] = 0;
    for (int p = 0; p < np; p++) first[p + 1] = first[p] + (parts[p].N + nblk - 1) / nblk;
    return nblk;
}

/* Small M (M < G2_DP_MIN_M, or any M for the f32 weights' tiles when MR=1 is used): parallel
 * over blocks of W rows (~gemv_bytes() of weights each, static), every thread streams whole
 * contiguous blocks; inside a block each x row runs over all tiles of NR rows. */
G2_HIDDEN void g2_gemv_drive(tile_fn main4, int NRM, tile_fn tail1, const void *x, int64_t xrow_bytes, int64_t M,
                       int64_t K, const g2_part *parts, int np, int64_t wrow_bytes, int64_t block,
                       int64_t nb, int nt) {
    int64_t Ntot = 0, first[G2_MAX_PARTS + 1];
    for (int p = 0; p < np; p++) Ntot += parts[p].N;
    int64_t rows = gemv_bytes() / (wrow_bytes > 0 ? wrow_bytes : 1);
    rows = rows / NRM * NRM;
    if (rows < NRM) rows = NRM;
    while (rows > NRM && (Ntot + rows - 1) / rows < 8 * (int64_t)nt) rows -= NRM;
    first[0] = 0;
    for (int p = 0; p < np; p++) first[p + 1] = first[p] + (parts[p].N + rows - 1) / rows;
    int64_t nblocks = first[np];
    int64_t jb;
    const char *xc = (const char *)x;
#pragma omp parallel for schedule(static) num_threads(nt) if (nblocks > 1 && nt > 1)
    for (jb = 0; jb < nblocks; jb++) {
        int64_t n0, n1;
        const g2_part *pt = block_rows(parts, first, np, jb, rows, &n0, &n1);
        const int64_t N = pt->N;
        for (int64_t m = 0; m < M; m++) {
            int64_t n = n0;
            for (; n + NRM <= n1; n += NRM)
                main4(xc + m * xrow_bytes, K, pt->w + n * wrow_bytes, pt->sc ? pt->sc + n * nb : NULL, block,
                      nb, pt->y + m * N + n, N);
            for (; n < n1; n++)
                tail1(xc + m * xrow_bytes, K, pt->w + n * wrow_bytes, pt->sc ? pt->sc + n * nb : NULL, block,
                      nb, pt->y + m * N + n, N);
        }
    }
}

/* Larger M: W is cut into blocks of ~256 KB and x into M chunks of chunk_rows() rows; the work
 * items are the (chunk, block) pairs, chunk-major, parallel and dynamic: each W block stays in L2
 * while the chunk's x rows run over it, and the chunk's x stays in cache while every W block runs
 * over it. Unchunked (W block outer, all of x per block), a long prompt's x was re-read from DRAM
 * once per W block; an older measurement that an x-chunk-outer order was slower (MC rows of x in
 * L2: 152-175 vs 188-191 GFLOP/s/thread for bf16) was at prompt lengths whose whole x fits in L3,
 * and with a small chunk -- here a chunk is MBs and each W block still serves all of its rows.
 * Every MR x NR tile reuses NR W rows for MR x rows; the chunks are a multiple of MR rows, so every
 * output is the same tile call as without chunks (bitwise the same results). widen_fmt >= 0: each
 * W block is first converted (per thread scratch, once per chunk) -- int8 -> bf16(q*s) for the dp
 * tiles, or bf16/int8 -> f32 for the f32 tiles. The block size is trimmed so the blocks split
 * evenly over the threads. */
G2_HIDDEN int g2_gemm_drive(const tile_fn tiles[2][2], const void *x, int64_t xrow_bytes, int64_t M,
                      int64_t K, const g2_part *parts, int np, int64_t wrow_bytes, int64_t block,
                      int64_t nb, int nt, int widen_fmt, int widen_to_bf16, int64_t trow_bytes) {
    int64_t first[G2_MAX_PARTS + 1];
    const int64_t nblk = plan_blocks(parts, np, trow_bytes, NR_MAIN, nt, first);
    const int64_t nblocks = first[np];
    const int64_t mc = chunk_rows(xrow_bytes, MR_MAX, widen_fmt >= 0), nitems = (M + mc - 1) / mc * nblocks;
    const char *xc = (const char *)x;
    char *scratch_all = NULL;
    if (widen_fmt >= 0 && !(scratch_all = (char *)malloc((size_t)(nt * nblk * trow_bytes)))) return -1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        char *scratch = scratch_all ? scratch_all + (size_t)g2_thread_id() * (size_t)(nblk * trow_bytes) : NULL;
        int64_t it;
#pragma omp for schedule(dynamic, 1)
        for (it = 0; it < nitems; it++) {
            const int64_t jb = it % nblocks, m1 = G2_MIN(M, (it / nblocks + 1) * mc);
            int64_t n0, n1;
            const g2_part *pt = block_rows(parts, first, np, jb, nblk, &n0, &n1);
            const int64_t N = pt->N;
            const char *wblk = pt->w + n0 * wrow_bytes;
            const float *sblk = pt->sc ? pt->sc + n0 * nb : NULL;
            if (widen_fmt >= 0) {
                g2_widen_rows(widen_fmt, widen_to_bf16, wblk, sblk, n1 - n0, K, block, nb, scratch);
                wblk = scratch;
                sblk = NULL;
            }
            int64_t m = it / nblocks * mc; /* a multiple of 4: the tiles are those of one chunk */
            while (m < m1) {
                int mr = (M - m >= 4) ? 1 : 0;
                int64_t n = n0;
                while (n < n1) {
                    int nr = (n1 - n >= NR_MAIN) ? 1 : 0;
                    tiles[mr][nr](xc + m * xrow_bytes, K, wblk + (n - n0) * trow_bytes,
                                  sblk ? sblk + (n - n0) * nb : NULL, block, nb, pt->y + m * N + n, N);
                    n += nr ? NR_MAIN : 1;
                }
                m += mr ? 4 : 1;
            }
        }
    }
    free(scratch_all);
    return 0;
}

/* The rounded (dp) semantics with vdpbf16ps: W blocks as in gemm_drive (widen_int8 1: int8 blocks
 * widened to bf16(q*s) first; 2: int4 blocks (g2_int4.c's layout, meta in the scales slot) to bf16
 * of their float32 dequantisation; 3: q4_0 blocks (g2_q4_0.c's layout, the f16 scales in the scales
 * slot) likewise), each block run against the x panels of an M chunk with tile_op, NR = 14 rows
 * at a time and 8/4/2/1 for the block's tail. The work items are the (chunk, block) pairs,
 * chunk-major, as in gemm_drive: x is packed once, and each chunk of it (chunk_rows() of its
 * packed rows, a multiple of the 32-row panel, so the panels and every tile call are those
 * without chunks) stays in cache while all W blocks run over it -- unchunked, x was re-read from
 * DRAM once per W block, and an 8192-token down_proj ran at 2/3 of a 512-token one's rate. A block
 * that needs converting (widened, or padded) is converted once per chunk. */
G2_HIDDEN int g2_gemm_op_drive(const float *x, int64_t M, int64_t K, const g2_part *parts, int np,
                         int widen_int8, int64_t block, int64_t nb, int nt) {
    const int64_t K2 = (K + 1) / 2, npan = (M + 31) / 32;
    const int odd = (int)(K & 1);
    uint32_t *xp = (uint32_t *)malloc((size_t)(npan * 32 * K2) * sizeof(uint32_t));
    if (!xp) return -1;
    g2_pack_x_op(x, M, K, xp, nt);
    const int64_t trow = K * 2; /* bf16 row bytes (int8 rows once widened) */
    /* rows 2 KB-multiples apart (K = 1024, 2048, ...) fall into the same few L1 sets and 14 of them
     * thrash its 8 ways (o_proj, K = 2048: 230 instead of 400 GFLOP/s): such blocks are copied
     * with one spare cache line per row first */
    const int pad = (trow % 2048) == 0;
    const int64_t ldw = pad ? K + 32 : K;
    int64_t first[G2_MAX_PARTS + 1];
    const int64_t nblk = plan_blocks(parts, np, trow, G2_OP_NR, nt, first);
    const int64_t nblocks = first[np];
    const int64_t mc = chunk_rows(K2 * 4, 32, widen_int8 != 0), nitems = (M + mc - 1) / mc * nblocks;
    const size_t sbytes = (size_t)(nblk * ldw) * sizeof(uint16_t);
    uint16_t *scratch_all = NULL;
    if ((widen_int8 || pad) && !(scratch_all = (uint16_t *)malloc((size_t)nt * sbytes))) {
        free(xp);
        return -1;
    }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        uint16_t *scratch = scratch_all ? (uint16_t *)((char *)scratch_all + (size_t)g2_thread_id() * sbytes) : NULL;
        int64_t it;
#pragma omp for schedule(dynamic, 1)
        for (it = 0; it < nitems; it++) {
            const int64_t jb = it % nblocks, c = it / nblocks;
            int64_t n0, n1;
            const g2_part *pt = block_rows(parts, first, np, jb, nblk, &n0, &n1);
            const int64_t N = pt->N;
            const uint16_t *wblk;
            if (widen_int8 == 3) { /* q4_0: K/2 code bytes and K/32 f16 scales (K/16 bytes) per row */
                g2_widen_q4_0_bf16((const uint8_t *)pt->w + n0 * (K / 2),
                                   (const uint16_t *)(const void *)((const char *)pt->sc + n0 * (K / 16)), n1 - n0, K,
                                   scratch, ldw);
                wblk = scratch;
            } else if (widen_int8 == 2) {
                g2_widen_i4_bf16((const uint8_t *)pt->w + n0 * (K / 2), (const uint8_t *)pt->sc + n0 * (K / 16), n1 - n0,
                                 K, scratch, ldw);
                wblk = scratch;
            } else if (widen_int8) {
                g2_widen_i8_bf16((const int8_t *)pt->w + n0 * K, pt->sc + n0 * nb, n1 - n0, K, block, nb, scratch, ldw);
                wblk = scratch;
            } else if (pad) {
                for (int64_t r = 0; r < n1 - n0; r++)
                    memcpy(scratch + r * ldw, (const uint16_t *)pt->w + (n0 + r) * K, (size_t)trow);
                wblk = scratch;
            } else {
                wblk = (const uint16_t *)pt->w + n0 * K;
            }
            const int64_t pn1 = G2_MIN(npan, (c + 1) * (mc / 32));
            for (int64_t pn = c * (mc / 32); pn < pn1; pn++) {
                const int64_t m0 = 32 * pn, left = M - m0;
                const int mp = left > 16 ? 1 : 0; /* 32- or 16-row panel */
                const uint32_t *xpp = xp + m0 * K2;
                int64_t n = n0;
                for (int v = 0; v < 5; v++) {
                    const int nr = g2_op_nr[v];
                    for (; n + nr <= n1; n += nr)
                        g2_op_tiles[mp][v](xpp, K2, odd, wblk + (n - n0) * ldw, ldw, pt->y + m0 * N + n, N, left);
                }
            }
        }
    }
    free(scratch_all);
    free(xp);
    return 0;
}

#endif /* G2_X86 */
