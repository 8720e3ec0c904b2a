/* Internal to the CPU backend (kernels/cpu): the backend context, shared by
 * backend_cpu.c, ops_cpu.c and attn_cpu.c, and the op entries that
 * backend_cpu.c puts in its function table. Not part of the engine API.
 *
 * Thread ownership (STYLE rule 12): pool and n_threads are set by
 * bs_backend_cpu_init and read-only afterwards. scratch, scratch_floats and
 * scratch_bytes belong to whoever holds scratch_lock: an op that uses the
 * scratch takes the lock, grows it if needed, runs its tasks on the pool (task
 * thread t uses slice t) and releases the lock when the run has returned.
 * The BF16 weights packed by pack_weight (packed, n_packed, cap_packed) and
 * gemm_scratch belong to whoever holds packed_lock for writing (pack_weight,
 * buf_free); linear holds it for reading while it looks a weight up.
 * gemm_scratch is allocated once, by the first pack_weight, and then used only
 * inside pool runs of the BF16 GEMM, slice t by pool thread t (the pool
 * serialises runs, so two tasks never share a slice). wide_buf and
 * wide_floats (the F32 copies of narrow operands, backend_cpu.c) belong to
 * whoever holds wide_lock; an op that finds it held uses memory of its own. */
#ifndef BS_OPS_CPU_H
#define BS_OPS_CPU_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "threadpool.h"

/* The instruction sets the kernels dispatch on, in increasing order; chosen
 * once per backend (bs__cpu_isa_detect): the best the CPU has, capped by
 * BS_CPU_ISA (generic, avx2, avx512, avx512bf16) so tests reach each path. */
enum bs__cpu_isa {
    BS__ISA_GENERIC,     /* plain C and OpenBLAS */
    BS__ISA_AVX2,        /* AVX2 + FMA + F16C (the build's baseline, x86-64-v3) */
    BS__ISA_AVX512,      /* AVX-512 F, BW, DQ, VL */
    BS__ISA_AVX512_BF16, /* and AVX512_BF16: vdpbf16ps, vcvtne2ps2bf16 */
};

/* Name of an ISA as BS_CPU_ISA spells it. */
const char *bs__cpu_isa_name(enum bs__cpu_isa isa);

/* The ISA this CPU runs, capped by $BS_CPU_ISA when set (an unknown value is
 * ignored); the build's own limit applies too (no AVX2 code without it). */
enum bs__cpu_isa bs__cpu_isa_detect(void);

struct bs__cpu {
    bs_pool_t *pool;
    int n_threads;
    enum bs__cpu_isa isa; /* set at init, read-only afterwards */
    enum bs_dtype dtype;  /* the default compute dtype: F32 or BF16 */

    pthread_mutex_t scratch_lock;
    float *scratch;        /* n_threads slices of scratch_floats floats, 64-byte aligned */
    size_t scratch_floats; /* per thread */
    size_t scratch_bytes;  /* total allocated */

    pthread_rwlock_t packed_lock;
    struct bs__cpu_packed *packed; /* by base address; defined in backend_cpu.c */
    size_t n_packed, cap_packed;
    void *gemm_scratch; /* n_threads slices of bs__gemm_bf16_scratch_bytes, or NULL */

    pthread_mutex_t wide_lock;
    float *wide_buf;    /* 64-byte aligned, or NULL */
    size_t wide_floats; /* its size */
};

/* Bytes of per-thread scratch the CPU backend context holds (for tests). */
size_t bs__cpu_scratch_bytes(void *ctx);

/* Make every thread's scratch slice at least floats long (64-byte aligned
 * slices); the caller holds scratch_lock. Returns 0 or BS_ENOMEM. */
int bs__cpu_scratch_reserve(struct bs__cpu *c, size_t floats, struct bs_err *err);

/* Range task: process items [i0, i1). */
typedef void (*bs__range_fn)(void *arg, int64_t i0, int64_t i1);

/* Run fn over items [0, n), split into chunks on the pool when n * cost
 * (floats touched per item, roughly) is large enough to pay for waking the
 * workers, else in one call on this thread. */
void bs__cpu_parallel_for(struct bs__cpu *c, int64_t n, int64_t cost, bs__range_fn fn, void *arg);

/* Narrow activations (engine/backend.h, ABI 6). bs__cpu_widen: n values of
 * dtype t (F32, BF16, F16) at src as F32 into dst, the values
 * bs_convert_to_f32 gives. bs__cpu_narrow: n floats rounded once into dtype
 * t at dst, to nearest even as bs_convert_from_f32 (the same bits, NaN
 * included; F16 through F16C where the build has it). */
void bs__cpu_widen(float *dst, const void *src, enum bs_dtype t, int64_t n);
void bs__cpu_narrow(void *dst, enum bs_dtype t, const float *src, int64_t n);

/* Rows tensor t widened into contiguous F32 dst (nrows x ncols), and back:
 * src rounded into t (bs__cpu_narrow per row); split on the pool. */
void bs__cpu_rows_widen(struct bs__cpu *c, float *dst, const struct bs_tensor *t);
void bs__cpu_rows_narrow(struct bs__cpu *c, struct bs_tensor *t, const float *src);

/* Longest row (floats) that layer_norm takes with a narrow x or y: such rows
 * go through stack buffers. The backend's entry widens longer ones itself
 * (bs__cpu_layer_norm fails on them with BS_EINVAL). */
#define BS__CPU_ROW_MAX 4096

/* Op entries of the function table (contracts in engine/backend.h, argument
 * checks in engine/opcheck.h); linear lives in backend_cpu.c. act, glu, add,
 * transpose and layer_norm (rows up to BS__CPU_ROW_MAX) take narrow
 * activations themselves; group_norm and attention take F32 only and the
 * entries of backend_cpu.c give them F32 copies. */
int bs__cpu_layer_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                       const struct bs_norm_params *p, struct bs_err *err);
int bs__cpu_group_norm(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                       const struct bs_norm_params *p, struct bs_err *err);
int bs__cpu_act(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                struct bs_err *err);
int bs__cpu_glu(void *ctx, struct bs_tensor *y, const struct bs_tensor *x, enum bs_act act,
                struct bs_err *err);
int bs__cpu_add(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                const struct bs_tensor *gate, int64_t rows_per_sample, float alpha,
                struct bs_err *err);
int bs__cpu_transpose(void *ctx, struct bs_tensor *y, const struct bs_tensor *x,
                      struct bs_err *err);
int bs__cpu_get_rows(void *ctx, struct bs_tensor *y, const struct bs_tensor *table,
                     const int64_t *idx, int64_t n, struct bs_err *err);
int bs__cpu_attention(void *ctx, struct bs_tensor *o, const struct bs_tensor *q,
                      const struct bs_tensor *k, const struct bs_tensor *v,
                      const struct bs_attn_params *p, struct bs_err *err);

#endif
