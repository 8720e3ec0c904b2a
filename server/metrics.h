/* Server metrics in Prometheus' text exposition format (0.0.4), with
 * Triton's names and meanings: per model and version, request successes and
 * failures (by reason), inferences (samples) and executions (batches), the
 * queue size, cumulative request / queue / compute durations, a batch-size
 * histogram, requests by priority level, and device memory where the
 * backend reports it.
 *
 * Threads: the loop thread (service, batchers) updates the counters; the
 * metrics HTTP thread renders them. Both go through one small lock, so a
 * rendering is a consistent snapshot (a histogram's buckets, sum and count
 * agree with the execution count). */
#ifndef BS_METRICS_H
#define BS_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "common.h"

typedef struct bs_metrics bs_metrics_t;
typedef struct bs_metrics_model bs_metrics_model_t;

/* Why a request failed (nv_inference_request_failure's reason label): the
 * reasons of the status table (engine/common.h), which decides them. */
enum bs_metrics_reason {
    BS_METRICS_REJECTED = BS_REASON_REJECTED, /* not admitted or dropped unrun: queue full,
                                                 deadline passed in the queue, shutting down */
    BS_METRICS_CANCELED = BS_REASON_CANCELED, /* the client cancelled (or the model was unloaded) */
    BS_METRICS_BACKEND = BS_REASON_BACKEND,   /* the forward failed (out of memory, device error) */
    BS_METRICS_OTHER = BS_REASON_OTHER,       /* an invalid request for this model */
    BS_METRICS_REASON_COUNT,
};

/* Upper bounds of the batch-size histogram (plus +Inf). */
#define BS_METRICS_BATCH_BUCKETS 11

/* Priority levels a model's request counter tells apart (serving.h's
 * BS_MAX_PRIORITY_LEVELS may not exceed it). */
#define BS_METRICS_MAX_PRIORITY 64

/* Timing of one successful request, in ns (Triton adds each request's share
 * of its batch: the batch's compute time). */
struct bs_metrics_request {
    uint64_t request_ns; /* enqueued to answered */
    uint64_t queue_ns;
    uint64_t compute_input_ns, compute_infer_ns, compute_output_ns;
    uint64_t inferences; /* the request's samples (nv_inference_count) */
};

/* Create an empty registry; be (may be NULL) is asked for device memory at
 * each rendering and must outlive the registry. */
int bs_metrics_init(bs_metrics_t **m, const struct bs_backend *be, struct bs_err *err);

/* Register model name at version, served with priority_levels levels (0:
 * none); NULL when out of memory (the model then goes unmeasured). The
 * handle lives as long as the registry; adding a name and version again
 * (a reloaded model) returns the same handle, whose series go on. Models
 * may be added while the registry renders. */
bs_metrics_model_t *bs_metrics_model_add(bs_metrics_t *m, const char *name, const char *version,
                                         int priority_levels);

/* Counters. mm may be NULL (no metrics): then these do nothing. */
void bs_metrics_success(bs_metrics_model_t *mm, const struct bs_metrics_request *r);
void bs_metrics_failure(bs_metrics_model_t *mm, enum bs_metrics_reason reason);
/* A failed inference call that names no served model (unknown model or
 * version, a model that failed to load, an unreadable message, a call
 * cancelled before its message arrived); m may be NULL. */
void bs_metrics_unrouted(bs_metrics_t *m, enum bs_metrics_reason reason);
/* One request handed to the model's batcher at priority level (1..the
 * model's levels; 0 for a model without levels). */
void bs_metrics_priority(bs_metrics_model_t *mm, int level);
/* One execution of batch_size samples (the batch-size histogram). */
void bs_metrics_execution(bs_metrics_model_t *mm, uint64_t batch_size);
/* One execution packed from requests of different sequence lengths. */
void bs_metrics_ragged(bs_metrics_model_t *mm);
/* One execution stopped early (nobody waited for it), leaving
 * blocks_skipped blocks of its stack unrun. */
void bs_metrics_stopped(bs_metrics_model_t *mm, uint64_t blocks_skipped);
/* The model's denoising sequences and block caches now (server/sequences.h:
 * bytes and sequences as gauges, the rest cumulative). */
struct bs_metrics_seq {
    uint64_t bytes, sequences, hits, refreshes, evictions, expired;
};
void bs_metrics_sequences(bs_metrics_model_t *mm, const struct bs_metrics_seq *s);
/* Requests waiting in the model's queue now. */
void bs_metrics_pending(bs_metrics_model_t *mm, int64_t n);

/* Render every metric; *text is malloc'ed (NUL-terminated, *len bytes). */
int bs_metrics_render(bs_metrics_t *m, char **text, size_t *len, struct bs_err *err);

/* Free the registry; NULL is a no-op. */
void bs_metrics_free(bs_metrics_t *m);

#endif
