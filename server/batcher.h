/* Per-model dynamic batcher on the libuv loop. Requests whose non-batch dims
 * agree are concatenated along dim 0 up to max_batch_size; requests that
 * differ only in sequence lengths join too, packed without padding (ragged
 * batching, unless the model turns it off), up to max_batch_tokens; a
 * batch leaves
 * when it is full, reaches a preferred size, or its oldest request has waited
 * max_queue_delay. With priority levels (Triton's), each level has its own
 * queue and policy, and batches take the highest levels first. Batches run
 * on worker threads (uv_queue_work); results come back to the loop thread
 * and are split per request.
 *
 * Thread ownership: every field and every bs_batcher_* call belongs to the
 * loop thread, except the batch being computed, which the worker owns
 * between uv_queue_work and its after-work callback. */
#ifndef BS_BATCHER_H
#define BS_BATCHER_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "backend.h"
#include "metrics.h"
#include "model.h"
#include "serving.h"

/* What a batcher runs on and reports to: live objects it does not own. */
struct bs_batcher_deps {
    struct bs_backend *be;       /* the backend the model was loaded on (forward scratch) */
    bs_metrics_model_t *metrics; /* Prometheus counters to update, or NULL */
};

/* Cumulative statistics (Triton's ModelStatistics); durations in ns. */
struct bs_duration {
    uint64_t count, ns;
};

struct bs_batch_stats {
    uint64_t batch_size;
    struct bs_duration compute_input, compute_infer, compute_output;
};

struct bs_model_stats {
    uint64_t last_inference_ms; /* ms since the epoch */
    uint64_t inference_count;   /* samples of successful requests (Triton) */
    uint64_t execution_count;   /* batches run */
    struct bs_duration success, fail, queue, compute_input, compute_infer, compute_output;
    struct bs_batch_stats *batch; /* indexed by batch size - 1, max_batch_size entries */
    int n_batch;
    /* blockserve's own: executions packed from requests of different
     * sequence lengths; executions stopped early because nobody waited for
     * them, and the blocks of their stacks left unrun. */
    uint64_t ragged_count, stopped_count, blocks_skipped;
};

typedef struct bs_batcher bs_batcher_t;
typedef struct bs_job bs_job_t;

/* What a request hears back, on the loop thread. */
struct bs_job_ops {
    /* Intermediate results of a stack, block by block (only when submitted
     * with intermediate = true); out is this request's slice. */
    void (*on_block)(void *arg, int block, int n_blocks, const struct bs_tensor *out);
    /* Exactly once: rc 0 and the output (valid during the call), or a
     * negative BS_E* code with a message (BS_ETIMEDOUT: the deadline or a
     * rejecting queue timeout passed in the queue, BS_ECANCELED: cancelled,
     * others: the forward failed). */
    void (*on_done)(void *arg, int rc, const char *msg, const struct bs_tensor *out);
    /* Optional, for a successful job, just before it is counted and on_done
     * runs: the owner prepares its answer from out (e.g. encodes it).
     * Returning a negative BS_E* code (with err) fails the job instead: it is
     * counted as that failure and on_done hears that code and message. */
    int (*on_output)(void *arg, const struct bs_tensor *out, struct bs_err *err);
};

/* Create a batcher for model on loop with the settings cfg (copied);
 * workers run forwards on deps->be, counters go to deps->metrics. */
int bs_batcher_init(bs_batcher_t **b, uv_loop_t *loop, bs_model_t *model,
                    const struct bs_serving_config *cfg, const struct bs_batcher_deps *deps,
                    struct bs_err *err);

/* One request, as bs_batcher_submit reads it (during the call only). */
struct bs_batcher_request {
    const struct bs_named_tensor *in; /* host tensors, valid until on_done */
    int n_in;
    bool intermediate; /* hear each block's output (on_block) */
    /* The output's dtype: BS_TYPE_F32 (the zero value), BF16 or F16. Only
     * requests of one output dtype share a batch; on_block and on_done
     * hear tensors of it. */
    enum bs_dtype out_dtype;
    /* Triton's "priority": 1 the highest; 0, or a number above the model's
     * priority_levels, means its default_priority_level (ignored without levels). */
    uint64_t priority;
    /* Triton's "timeout" in us (0: none): shortens the queue timeout of the
     * request's level where its policy allows (allow_timeout_override). */
    int64_t timeout_us;
    /* Step-level block caching (a call of a denoising sequence): what the
     * forward does with cache (engine/model.h); BS_CACHE_OFF: nothing. */
    bs_block_cache_t *cache;
    enum bs_cache_mode cache_mode;
    /* The transport's deadline on uv_hrtime()'s clock (INT64_MAX: none):
     * always applies, whatever the level's policy. */
    int64_t deadline_ns;
};

/* Queue one request at its priority level. Returns 0 and a job handle, or an
 * error at once (bad inputs: BS_EINVAL; its level's queue full: BS_EBUSY;
 * draining: BS_EUNSUPP) without calling on_done; such a failure is counted
 * (statistics and metrics) like any other. */
int bs_batcher_submit(bs_batcher_t *b, const struct bs_batcher_request *req,
                      const struct bs_job_ops *ops, void *arg, bs_job_t **job, struct bs_err *err);

/* Drop a job: a queued one is removed and hears on_done(BS_ECANCELED) at
 * once; a running one hears it when its batch returns (its output discarded). */
void bs_batcher_cancel(bs_batcher_t *b, bs_job_t *job);

/* The metrics reason of a failure code (REJECTED, CANCELED, OTHER, BACKEND). */
enum bs_metrics_reason bs_batcher_reason(int rc);

/* Count a request for this model that failed before it reached the batcher
 * (malformed, over a server-wide bound): ModelStatistics' fail and the
 * metrics' failure{reason} move together. */
void bs_batcher_count_failure(bs_batcher_t *b, int rc);

/* Requests waiting and batches running. */
int bs_batcher_queued(const bs_batcher_t *b);
int bs_batcher_running(const bs_batcher_t *b);

/* Statistics so far (read on the loop thread). */
const struct bs_model_stats *bs_batcher_stats(const bs_batcher_t *b);

/* Stop taking requests (BS_EUNSUPP), run what is queued without waiting for
 * the queue delay, and call done(arg) from a later loop callback once nothing
 * is queued or running; then bs_batcher_free (done may call it). */
void bs_batcher_drain(bs_batcher_t *b, void (*done)(void *arg), void *arg);

/* Release the batcher; NULL is a no-op. Queued jobs hear BS_ECANCELED at once,
 * a running batch's jobs when it returns. Completes asynchronously: the
 * handles are closed and the memory released in their close callbacks, so the
 * loop must run afterwards. After drain's done nothing runs, and the model
 * and backend may be freed as soon as this returns; otherwise they must live
 * until the loop has run the running batch to its end. A pending drain's done
 * is not called. The handle is invalid once this returns. */
void bs_batcher_free(bs_batcher_t *b);

#endif
