/* The CPU backend's BF16 GEMM (internal to kernels/cpu, not engine API):
 * y = x w^T + b + beta y with w packed once, at load, into BF16 panels, and x
 * rounded to BF16 as it is packed block by block. Products are of BF16
 * operands, sums in F32, on one of three paths chosen by the backend's ISA:
 *   avx512bf16  vdpbf16ps (two products and a sum per lane and instruction)
 *   avx2, avx512  the same packed weights widened to F32 (shift left 16) and
 *               FMA'd with the same BF16-rounded x: the same products, summed
 *               in another order
 *   generic     plain C over the same layout.
 *
 * The packed layout: w's rows in panels of BS__GEMM_NR (32) rows, N padded
 * with zero rows to whole panels and K with a zero column to even. A panel
 * holds, for each k-pair kp (columns 2kp and 2kp+1), its 32 rows' pairs: 32 x
 * 2 BF16 = 128 bytes, row j's pair at bytes 4j..4j+3, lower half column 2kp.
 * Panel p starts at p * ceil(K/2) * 128 bytes. A view of rows [r0, r0 + n) of
 * a packed weight is computed from the panels covering it.
 *
 * Threads: a pack or a GEMM may run from several threads at once. Pool runs
 * use the per-thread scratch slices the caller passes (slice t for pool
 * thread t: the pool serialises runs, so no two running tasks share one); a
 * GEMM small enough to run on the calling thread allocates its own. */
#ifndef BS_GEMM_BF16_H
#define BS_GEMM_BF16_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ops_cpu.h"

#define BS__GEMM_NR 32 /* rows of w per packed panel */

/* Bytes of the packed layout of an [n, k] weight (0 when n or k is 0). */
size_t bs__gemm_bf16_packed_bytes(int64_t n, int64_t k);

/* Pack w, F32 [n, k] contiguous, into dst (bs__gemm_bf16_packed_bytes bytes,
 * 64-byte aligned), rounding to nearest even; splits the work on c's pool. */
void bs__gemm_bf16_pack(struct bs__cpu *c, void *dst, const float *w, int64_t n, int64_t k);

/* Bytes of one pool thread's scratch slice (64-byte aligned slices). */
size_t bs__gemm_bf16_scratch_bytes(void);

/* A GEMM on rows [n0, n0 + n) of a packed [wn, k] weight. */
struct bs__gemm_bf16_args {
    const void *x; /* [m, k], row stride ldx (elements): F32, or BF16 when x_bf16 */
    bool x_bf16;   /* x is BF16: read as it is (the values F32 x would round to) */
    int64_t m, k, ldx;
    const void *w;  /* the packed weight's base (its row 0) */
    int64_t wn;     /* rows of the packed weight */
    int64_t n0, n;  /* rows of w used: y's columns */
    const float *b; /* [n] or NULL */
    float *y;       /* [m, n], row stride ldy */
    int64_t ldy;
    float beta; /* 0 or 1 */
};

/* y = x w[n0:n0+n]^T + b + beta y on the path of c->isa, bias and beta
 * applied as the results are stored; K = 0 gives y = b + beta y. scratch is
 * c->n_threads slices of bs__gemm_bf16_scratch_bytes, used only inside pool
 * runs. Returns 0, or BS_ENOMEM when a serial run cannot get its scratch. */
int bs__gemm_bf16_run(struct bs__cpu *c, const struct bs__gemm_bf16_args *g, void *scratch,
                      struct bs_err *err);

#endif
