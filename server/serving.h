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

#define BS_MAX_PREFERRED 8

struct bs_serving_config {
    int max_batch_size;         /* samples per batch (dim 0), >= 1 */
    int64_t max_queue_delay_us; /* how long the oldest request may wait for others */
    int preferred_batch_size[BS_MAX_PREFERRED];
    int n_preferred;
    int max_queue_size;         /* queued requests; more get RESOURCE_EXHAUSTED */
    int64_t default_timeout_us; /* 0: none */
    bool has_dtype;             /* "dtype" given: the model computes in dtype, */
    enum bs_dtype dtype;        /* else in the server's --dtype */
    /* Ragged batching: requests whose inputs differ only in their sequence
     * dims (tokens, context tokens, H x W) share a batch, packed without
     * padding. "ragged_batching": false sets ragged_off (then only equal
     * shapes join, for comparison). */
    bool ragged_off;
    int64_t max_batch_tokens; /* cap on the main input's tokens (rows) of one
                                 batch; 0: none */
};

/* Parse a "serving" object (JSON text of the object) over cfg: the keys it
 * names replace cfg's values; unknown keys and bad values are errors that
 * name the key. */
int bs_serving_parse(struct bs_serving_config *cfg, const char *json, size_t len,
                     struct bs_err *err);

/* The same for an object already parsed (config.json's "serving"). */
int bs_serving_parse_json(struct bs_serving_config *cfg, const struct bs_json *obj,
                          struct bs_err *err);

#endif
