/* Internal to the CPU backend (kernels/cpu): the backend context, shared by
 * backend_cpu.c, ops_cpu.c and attn_cpu.c, and the op entries that
 * backend_cpu.c puts in its function table. Not part of the engine API.
 *
 * Thread ownership (STYLE rule 12): pool and n_threads are set by
 * bs_backend_cpu_init and read-only afterwards. scratch, scratch_floats and
 * scratch_bytes belong to whoever holds scratch_lock: an op that uses the
 * scratch takes the lock, grows it if needed, runs its tasks on the pool (task
 * thread t uses slice t) and releases the lock when the run has returned. */
#ifndef BS_OPS_CPU_H
#define BS_OPS_CPU_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "threadpool.h"

struct bs__cpu {
    bs_pool_t *pool;
    int n_threads;

    pthread_mutex_t scratch_lock;
    float *scratch;        /* n_threads slices of scratch_floats floats, 64-byte aligned */
    size_t scratch_floats; /* per thread */
    size_t scratch_bytes;  /* total allocated */
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

/* Op entries of the function table (contracts in engine/backend.h, argument
 * checks in engine/opcheck.h); linear lives in backend_cpu.c. */
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
