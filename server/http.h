/* The KServe v2 HTTP/REST front end, as Triton serves it (health,
 * metadata, config, statistics, the repository, shared memory, inference
 * with JSON or binary tensors, gzip/deflate both ways), on libmicrohttpd.
 * Its own threads read and write the sockets, parse bodies and render
 * answers; the loop thread runs the control plane and the inference core
 * for it (handed over by uv_async_send and a locked list), so HTTP never
 * blocks the loop or the batchers.
 *
 * Thread ownership: bs_http_start, bs_http_shutdown on the loop thread;
 * bs_http_free after the loop has stopped. */
#ifndef BS_HTTP_H
#define BS_HTTP_H

#include <stddef.h>

#include <uv.h>

#include "auth.h"
#include "codec.h"
#include "control.h"
#include "core.h"
#include "shm.h"

typedef struct bs_http bs_http_t;

struct bs_http_options {
    const char *address; /* numeric IPv4 or IPv6 */
    int port;            /* 0: a free one */
    uv_loop_t *loop;
    bs_core_t *core;       /* not owned */
    bs_control_t *control; /* not owned */
    bs_shm_t *shm;         /* system shared memory for inputs and outputs; NULL: none */
    const bs_auth_t *auth; /* bearer token (NULL: none); health stays open */
    struct bs_codec_limits limits;
    size_t max_body_bytes; /* a request body, before and after decompression */
    /* HTTPS: PEM text (NULL: plain HTTP); with client_ca, client
     * certificates are required and verified against it. */
    const char *tls_cert, *tls_key, *tls_client_ca;
};

/* Listen and serve; *bound is the port. BS_EIO: the address cannot be
 * bound (in use). */
int bs_http_start(bs_http_t **h, const struct bs_http_options *o, int *bound, struct bs_err *err);

/* Stop handing work to the loop: requests that arrive from now on are
 * answered 503 by the HTTP threads; the loop handle closes (so that the
 * loop can end). Call after the core has answered what is in flight
 * (bs_core_shutdown). */
void bs_http_shutdown(bs_http_t *h);

/* Let answers already made go out (up to a second), then close every
 * connection and free; NULL is a no-op. After the loop has stopped. */
void bs_http_free(bs_http_t *h);

#endif
