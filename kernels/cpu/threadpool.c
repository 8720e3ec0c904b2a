/* The CPU thread pool: n_threads - 1 persistent workers plus the caller of
 * bs_pool_run, tasks handed out by an atomic counter.
 *
 * A run does not wait for workers that have not woken up yet: when the runner
 * has run out of tasks it closes the run, waits only for the workers that
 * joined it (they may still be inside a task), and returns. A worker that
 * wakes after that sees the run closed and goes back to sleep. Small runs
 * thus cost the runner no futex wake-up latency (about 50 us on VMs).
 *
 * Thread ownership (STYLE rule 12):
 * - n_threads, workers: written by bs_pool_init before any worker starts and
 *   read-only afterwards; bs_pool_free joins the workers before freeing.
 * - run_lock: held by the one thread inside bs_pool_run (the "runner") for the
 *   whole run, so runs from several threads are serialised and the thread
 *   index a task sees is unique among the threads working at that moment.
 * - fn, arg, n_tasks, generation, open, busy, stop: guarded by lock. The
 *   runner writes the job, sets open and bumps generation; a worker that sees
 *   a new generation while open copies the job and increments busy (under
 *   lock), works without the lock, then decrements busy. The runner clears
 *   open once the task counter is exhausted and waits on done until busy is
 *   0 before it returns, so the job, and whatever arg points to, outlive
 *   every task that uses them.
 * - next: atomic; every thread of a run takes task indices from it.
 * - published: atomic copy of generation | stop (bit 63), written under lock
 *   by the runner and bs_pool_free, read without the lock by spinning
 *   workers.
 * After a run a worker polls published for up to SPIN_NS before it sleeps on
 * wake: the ops of a forward come back to back (a BF16 block is ~15 runs),
 * and a sleeping worker takes 35-55 us to wake on these VMs, which the
 * runner spent working alone (5-50% of a short op). Between forwards a
 * worker spins SPIN_NS once and then sleeps; idle servers cost nothing. */
#include "threadpool.h"

#include <assert.h>
#include <pthread.h>
#include <time.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

struct bs_pool_worker {
    struct bs_pool *pool;
    int index; /* thread index passed to tasks, 1..n_threads-1 */
    pthread_t tid;
};

struct bs_pool {
    int n_threads;
    struct bs_pool_worker *workers; /* n_threads - 1 */

    pthread_mutex_t run_lock;

    pthread_mutex_t lock;
    pthread_cond_t wake; /* a new generation, or stop */
    pthread_cond_t done; /* busy reached 0 */
    uint64_t generation;
    bool open; /* workers may still join the current run */
    int busy;  /* workers inside the current run */
    bool stop;
    bs_pool_fn fn;
    void *arg;
    int64_t n_tasks;

    atomic_int_fast64_t next;
    atomic_uint_fast64_t published;
};

/* How long a worker polls for the next run before it sleeps. */
#ifndef SPIN_NS
#define SPIN_NS 100000
#endif
#define STOP_BIT   ((uint64_t)1 << 63)

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Poll for a generation other than seen (or stop) for up to SPIN_NS; the
 * caller does not hold the lock. */
static void spin_for_run(struct bs_pool *pool, uint64_t seen)
{
    int64_t deadline = now_ns() + SPIN_NS;
    for (int i = 1;; i++) {
        uint64_t p = atomic_load_explicit(&pool->published, memory_order_acquire);
        if (p != seen)
            return;
        cpu_relax();
        if ((i & 63) == 0 && now_ns() > deadline)
            return;
    }
}

/* The pool whose task this thread is running (catches nested runs). */
static _Thread_local const struct bs_pool *tls_running;

static void run_tasks(struct bs_pool *pool, bs_pool_fn fn, void *arg, int64_t n_tasks, int thread)
{
    tls_running = pool;
    for (;;) {
        int64_t t = atomic_fetch_add_explicit(&pool->next, 1, memory_order_relaxed);
        if (t >= n_tasks)
            break;
        fn(arg, t, thread);
    }
    tls_running = NULL;
}

static void *worker_main(void *p)
{
    struct bs_pool_worker *w = p;
    struct bs_pool *pool = w->pool;
    uint64_t seen = 0;

    pthread_mutex_lock(&pool->lock);
    for (;;) {
        if (!pool->stop && pool->generation == seen) {
            pthread_mutex_unlock(&pool->lock);
            spin_for_run(pool, seen);
            pthread_mutex_lock(&pool->lock);
        }
        while (!pool->stop && pool->generation == seen)
            pthread_cond_wait(&pool->wake, &pool->lock);
        if (pool->stop)
            break;
        seen = pool->generation;
        if (!pool->open)
            continue; /* woke too late: the runner finished this run alone */
        pool->busy++;
        bs_pool_fn fn = pool->fn;
        void *arg = pool->arg;
        int64_t n_tasks = pool->n_tasks;
        pthread_mutex_unlock(&pool->lock);

        run_tasks(pool, fn, arg, n_tasks, w->index);

        pthread_mutex_lock(&pool->lock);
        if (--pool->busy == 0)
            pthread_cond_signal(&pool->done);
    }
    pthread_mutex_unlock(&pool->lock);
    return NULL;
}

/* Stop and join the first n workers. */
static void stop_workers(struct bs_pool *pool, int n)
{
    pthread_mutex_lock(&pool->lock);
    pool->stop = true;
    atomic_store_explicit(&pool->published, pool->generation | STOP_BIT, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);
    for (int i = 0; i < n; i++)
        pthread_join(pool->workers[i].tid, NULL);
}

int bs_pool_init(bs_pool_t **out, int n_threads, struct bs_err *err)
{
    int started = 0, rc = 0;
    *out = NULL;
    if (n_threads < 1)
        return bs_err_set(err, BS_EINVAL, "thread pool: n_threads must be >= 1 (got %d)",
                          n_threads);
    struct bs_pool *pool = calloc(1, sizeof(*pool));
    if (pool == NULL)
        goto fail_pool;
    pool->n_threads = n_threads;
    pool->workers = calloc((size_t)n_threads, sizeof(*pool->workers));
    if (pool->workers == NULL)
        goto fail_workers;
    atomic_init(&pool->next, 0);
    atomic_init(&pool->published, 0);
    pthread_mutex_init(&pool->run_lock, NULL);
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);

    for (; started < n_threads - 1; started++) {
        struct bs_pool_worker *w = &pool->workers[started];
        w->pool = pool;
        w->index = started + 1;
        if ((rc = pthread_create(&w->tid, NULL, worker_main, w)) != 0)
            goto fail_threads;
    }
    *out = pool;
    return 0;

fail_threads:
    stop_workers(pool, started);
    pthread_cond_destroy(&pool->done);
    pthread_cond_destroy(&pool->wake);
    pthread_mutex_destroy(&pool->lock);
    pthread_mutex_destroy(&pool->run_lock);
    free(pool->workers);
    free(pool);
    return bs_err_set(err, BS_EINTERNAL, "thread pool: cannot start thread %d of %d: %s",
                      started + 1, n_threads, strerror(rc));
fail_workers:
    free(pool);
fail_pool:
    return bs_err_set(err, BS_ENOMEM, "thread pool: out of memory");
}

void bs_pool_free(bs_pool_t *pool)
{
    if (pool == NULL)
        return;
    stop_workers(pool, pool->n_threads - 1);
    pthread_cond_destroy(&pool->done);
    pthread_cond_destroy(&pool->wake);
    pthread_mutex_destroy(&pool->lock);
    pthread_mutex_destroy(&pool->run_lock);
    free(pool->workers);
    free(pool);
}

int bs_pool_size(const bs_pool_t *pool)
{
    return pool->n_threads;
}

void bs_pool_run(bs_pool_t *pool, int64_t n_tasks, bs_pool_fn fn, void *arg)
{
    assert(tls_running != pool && "bs_pool_run called from inside one of its tasks");
    if (n_tasks <= 0)
        return;
    pthread_mutex_lock(&pool->run_lock);
    atomic_store_explicit(&pool->next, 0, memory_order_relaxed);
    if (pool->n_threads == 1 || n_tasks == 1) {
        /* Nothing to share: skip waking the workers. */
        run_tasks(pool, fn, arg, n_tasks, 0);
        pthread_mutex_unlock(&pool->run_lock);
        return;
    }
    pthread_mutex_lock(&pool->lock);
    pool->fn = fn;
    pool->arg = arg;
    pool->n_tasks = n_tasks;
    pool->open = true;
    pool->generation++;
    atomic_store_explicit(&pool->published, pool->generation, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);

    run_tasks(pool, fn, arg, n_tasks, 0);

    pthread_mutex_lock(&pool->lock);
    pool->open = false; /* every task is taken: late workers need not join */
    while (pool->busy > 0)
        pthread_cond_wait(&pool->done, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
    pthread_mutex_unlock(&pool->run_lock);
}
