/* A fixed pool of compute threads for the CPU kernels: bs_pool_run hands out
 * tasks 0..n_tasks-1 to the workers and the calling thread, and returns when
 * all of them are done. */
#ifndef BS_THREADPOOL_H
#define BS_THREADPOOL_H

#include <stdint.h>

struct bs_err;

typedef struct bs_pool bs_pool_t;

/* A task: `task` in [0, n_tasks), `thread` in [0, bs_pool_size) names the
 * thread running it, unique among the threads of one run (index per-thread
 * scratch with it; thread 0 is the caller of bs_pool_run). */
typedef void (*bs_pool_fn)(void *arg, int64_t task, int thread);

/* Start n_threads - 1 worker threads (n_threads >= 1); the caller of
 * bs_pool_run is the n-th. */
int bs_pool_init(bs_pool_t **pool, int n_threads, struct bs_err *err);

/* Stop and join the workers, then free the pool; NULL is a no-op. Must not
 * race with bs_pool_run. */
void bs_pool_free(bs_pool_t *pool);

/* Number of threads that run tasks (workers + the caller). */
int bs_pool_size(const bs_pool_t *pool);

/* Run fn on every task and return when all have finished. Safe to call from
 * several threads at once (runs are serialised); must not be called from
 * inside a task. */
void bs_pool_run(bs_pool_t *pool, int64_t n_tasks, bs_pool_fn fn, void *arg);

#endif
