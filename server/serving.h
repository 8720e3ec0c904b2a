/* A model's serving settings (Triton's dynamic batching and queue policy):
 * plain data, the server's defaults overridden by the "serving" object of a
 * model's config.json or its serving.json. */
#ifndef BS_SERVING_H
#define BS_SERVING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "json.h"
#include "tensor.h"

#define BS_MAX_PREFERRED       8
#define BS_MAX_PRIORITY_LEVELS 64

/* What happens to a request whose queue timeout passes (Triton's
 * ModelQueuePolicy.TimeoutAction). */
enum bs_timeout_action {
    BS_TIMEOUT_REJECT, /* answered DEADLINE_EXCEEDED */
    BS_TIMEOUT_DELAY,  /* kept, behind its level's requests still within their timeout */
};

/* One queue's policy (Triton's ModelQueuePolicy). */
struct bs_queue_policy {
    enum bs_timeout_action timeout_action;
    int64_t default_timeout_us;  /* queue timeout; 0: none */
    bool allow_timeout_override; /* a request's "timeout" may shorten it */
    int max_queue_size;          /* requests queued; more: RESOURCE_EXHAUSTED (0: no bound) */
};

/* The fields a priority_queue_policy entry gives (struct bs_level_policy). */
enum {
    BS_POLICY_GIVEN = 1 << 0, /* the level has an entry */
    BS_POLICY_ACTION = 1 << 1,
    BS_POLICY_TIMEOUT = 1 << 2,
    BS_POLICY_OVERRIDE = 1 << 3,
    BS_POLICY_QUEUE_SIZE = 1 << 4,
};

/* A level's entry of priority_queue_policy: the fields it gives (BS_POLICY_*
 * bits); the others are the default queue policy's (bs_serving_policy). */
struct bs_level_policy {
    unsigned given;
    struct bs_queue_policy p;
};

struct bs_serving_config {
    int max_batch_size;         /* samples per batch (dim 0), >= 1 */
    int64_t max_queue_delay_us; /* how long the oldest request may wait for others */
    int preferred_batch_size[BS_MAX_PREFERRED];
    int n_preferred;
    /* The default queue policy (Triton's default_queue_policy): the queue of a
     * model without priority levels, and of each level without an entry in
     * level_policy. Zero values are blockserve's defaults. */
    int max_queue_size;         /* queued requests; more: RESOURCE_EXHAUSTED (0: no bound) */
    int64_t default_timeout_us; /* 0: none */
    enum bs_timeout_action timeout_action; /* zero: REJECT */
    bool timeout_override_off;             /* "allow_timeout_override": false sets it */
    /* Triton's priority levels: 0 (none: one queue), or levels 1..priority_levels,
     * 1 the highest; a request without a valid "priority" goes to
     * default_priority_level (in [1, priority_levels] when there are levels). */
    int priority_levels;
    int default_priority_level;
    struct bs_level_policy level_policy[BS_MAX_PRIORITY_LEVELS]; /* [level - 1] */
    /* "output_datatype": what requests without the parameter output_datatype
     * are answered in (F32, the zero value: the default; BF16 or F16: the
     * F32 output rounded to nearest even). */
    enum bs_dtype out_dtype;
    bool has_dtype;             /* "dtype" given: the model computes in dtype, */
    enum bs_dtype dtype;        /* else in the server's --dtype */
    /* Ragged batching: requests whose inputs differ only in their sequence
     * dims (tokens, context tokens, H x W) share a batch, packed without
     * padding. "ragged_batching": false sets ragged_off (then only equal
     * shapes join, for comparison). */
    bool ragged_off;
    int64_t max_batch_tokens; /* cap on the main input's tokens (rows) of one
                                 batch; 0: none */
    /* Denoising sequences (server/sequences.h): how long a sequence may
     * idle (Triton's max_sequence_idle_microseconds; 0: 1 s), and a cap on
     * the bytes its model's block caches hold (0: the server's budget). */
    int64_t max_sequence_idle_us;
    int64_t block_cache_bytes;
};

/* Parse a "serving" object (JSON text of the object) over cfg: the keys it
 * names replace cfg's values; unknown keys and bad values are errors that
 * name the key. */
int bs_serving_parse(struct bs_serving_config *cfg, const char *json, size_t len,
                     struct bs_err *err);

/* The same for an object already parsed (config.json's "serving"). */
int bs_serving_parse_json(struct bs_serving_config *cfg, const struct bs_json *obj,
                          struct bs_err *err);

/* Are the queue and priority settings consistent (levels in range, the
 * default level given with levels, values not negative)? Errors name the
 * serving key. The parse functions check this on their result. */
int bs_serving_check(const struct bs_serving_config *cfg, struct bs_err *err);

/* The queue policy of level (1..priority_levels; 0 without levels): its
 * priority_queue_policy entry over the default queue policy. */
struct bs_queue_policy bs_serving_policy(const struct bs_serving_config *cfg, int level);

#endif
