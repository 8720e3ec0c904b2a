/* The metrics endpoint: GET /metrics over HTTP/1.1 (libmicrohttpd, its own
 * thread), answering the registry's Prometheus text. Other paths answer 404,
 * other methods 405. It never touches the libuv loop. */
#ifndef BS_METRICS_HTTP_H
#define BS_METRICS_HTTP_H

#include <sys/socket.h>

#include "common.h"
#include "metrics.h"

typedef struct bs_metrics_http bs_metrics_http_t;

/* Listen on address:port (numeric host, IPv4 or IPv6; port 0 picks a free
 * one; *bound receives the port) and serve m from a new thread. */
int bs_metrics_http_start(bs_metrics_http_t **h, bs_metrics_t *m, const char *address, int port,
                          int *bound, struct bs_err *err);

/* Stop serving (joins the thread) and free; NULL is a no-op. */
void bs_metrics_http_stop(bs_metrics_http_t *h);

/* address:port as a socket address for a listener (numeric hosts only: no
 * lookups), shared by the metrics and the HTTP/REST endpoints; a bad address
 * is BS_EINVAL naming option (e.g. "--http-address"). */
int bs_http_resolve(const char *option, const char *address, int port, struct sockaddr_storage *ss,
                    struct bs_err *err);

#endif
