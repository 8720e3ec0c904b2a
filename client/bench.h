/* A closed-loop (or rate-limited) load generator over one serialized
 * ModelInferRequest, in the spirit of ghz: unary calls kept in flight
 * asynchronously by a few threads, or one ModelStreamInfer stream per
 * concurrent caller; latencies of every call and counts per status. */
#ifndef BS_BENCH_H
#define BS_BENCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "blockserve_client.h"
#include "http_client.h"
#include "latency.h"

/* Status slots (HTTP statuses count as the gRPC code they stand for,
 * bs_http_status_to_grpc): the gRPC codes 0..16 and one for error_message on a stream. */
#define BS_BENCH_N_STATUS     18
#define BS_BENCH_STREAM_ERROR 17

/* One request as sent: a serialized ModelInferRequest (gRPC) or an HTTP
 * infer body whose first header_len bytes are its JSON header. */
struct bs_bench_req {
    const uint8_t *req;
    size_t len;
    size_t header_len;
};

struct bs_bench_opts {
    int concurrency;    /* calls (or streams) in flight */
    int64_t count;      /* stop after this many calls; 0: no limit (needs duration_s) */
    double duration_s;  /* stop starting calls after this long; 0: no limit (needs count) */
    double rps;         /* start at most this many calls per second overall; 0: no limit */
    bool stream;        /* ModelStreamInfer, one stream per concurrent caller */
    int threads;        /* unary: threads sharing the concurrency; 0: 1 */
    double timeout_s;   /* deadline per call (a stream: the end of the run plus this) */
    const uint8_t *req; /* the serialized ModelInferRequest sent every time */
    size_t req_len;
    size_t header_len; /* HTTP: the Inference-Header-Content-Length of req */
    /* NULL, or one request per slot (concurrency of them): in-flight slot k
       (a stream: stream k) always sends slot_reqs[k], as --shm needs */
    const struct bs_bench_req *slot_reqs;
    bs_http_t *http;       /* HTTP/REST: POST http_path (curl multi, one easy handle a slot) */
    const char *http_path; /* "/v2/models/NAME/infer" */
};

struct bs_bench_result {
    double elapsed_s;                                /* first start to last completion */
    int64_t count;                                   /* completed calls */
    int64_t status[BS_BENCH_N_STATUS];               /* completed calls by status */
    char first_error[256];                           /* the first failure's status and message */
    struct bs_latency lat;                           /* every completed call, microseconds */
    struct bs_latency lat_status[BS_BENCH_N_STATUS]; /* the same samples split by status */
    struct bs_latency start_lag; /* each call's start after its scheduled time (with a
                                    rate; else after its ticket), microseconds */
};

/* Run the load through clients[0..n_clients) (calls spread round-robin) and
 * fill r (release it with bs_bench_result_free). Fails only when the load
 * could not be run at all; failed calls are counted, not returned. */
int bs_bench_run(bs_client_t *const *clients, int n_clients, const struct bs_bench_opts *o,
                 struct bs_bench_result *r, struct bs_client_err *err);

/* Release r's latency samples (r->lat, r->lat_status, r->start_lag). */
void bs_bench_result_free(struct bs_bench_result *r);

/* The label of a status slot ("OK", "NOT_FOUND", ..., "STREAM_ERROR"). */
const char *bs_bench_status_name(int slot);

#endif
