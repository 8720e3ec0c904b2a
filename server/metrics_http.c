/* The metrics endpoint on libmicrohttpd (see metrics_http.h).
 *
 * Thread ownership: bs_metrics_http_start and _stop run on the caller's
 * thread (the loop thread, at start-up and after the loop has stopped);
 * the access handler runs on libmicrohttpd's polling thread and only reads
 * the registry through bs_metrics_render, which takes the registry's lock. */
#include "metrics_http.h"

#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <microhttpd.h>

#include "log.h"

#define METRICS_PATH            "/metrics"
#define METRICS_CONTENT_TYPE    "text/plain; version=0.0.4; charset=utf-8"
#define METRICS_MAX_CONNECTIONS 64
#define METRICS_TIMEOUT_S       10

struct bs_metrics_http {
    struct MHD_Daemon *daemon;
    bs_metrics_t *metrics;
};

static enum MHD_Result http_reply(struct MHD_Connection *conn, unsigned status, const char *body,
                                  const char *allow)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), (void *)body, MHD_RESPMEM_PERSISTENT);
    if (r == NULL)
        return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
    if (allow != NULL)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    enum MHD_Result rc = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result http_metrics(bs_metrics_http_t *h, struct MHD_Connection *conn)
{
    char *text;
    size_t len;
    struct bs_err err = {0};
    if (bs_metrics_render(h->metrics, &text, &len, &err) != 0)
        return http_reply(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory\n", NULL);
    struct MHD_Response *r = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (r == NULL) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, METRICS_CONTENT_TYPE);
    enum MHD_Result rc = MHD_queue_response(conn, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result http_on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                       const char *method, const char *version,
                                       const char *upload_data, size_t *upload_data_size,
                                       void **con_cls)
{
    bs_metrics_http_t *h = cls;
    if (strcmp(url, METRICS_PATH) != 0)
        return http_reply(conn, MHD_HTTP_NOT_FOUND, "not found: try " METRICS_PATH "\n", NULL);
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return http_reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed\n", "GET, HEAD");
    return http_metrics(h, conn);
}

static void http_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    bs_log_lib(BS_LOG_WARN, "metrics http", fmt, ap);
}

int bs_http_resolve(const char *option, const char *address, int port, struct sockaddr_storage *ss,
                    struct bs_err *err)
{
    struct addrinfo hints, *res = NULL;
    char service[16];
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV;
    snprintf(service, sizeof(service), "%d", port);
    int rc = getaddrinfo(address, service, &hints, &res);
    if (rc != 0)
        return bs_err_set(err, BS_EINVAL,
                          "%s \"%s\": %s (a numeric IPv4 or IPv6 address is expected)", option,
                          address, gai_strerror(rc));
    memset(ss, 0, sizeof(*ss));
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    return 0;
}

int bs_metrics_http_start(bs_metrics_http_t **hp, bs_metrics_t *m, const char *address, int port,
                          int *bound, struct bs_err *err)
{
    struct sockaddr_storage ss;
    int rc;
    *hp = NULL;
    if ((rc = bs_http_resolve("--metrics-address", address, port, &ss, err)) != 0)
        return rc;
    bs_metrics_http_t *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    h->metrics = m;
    unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    h->daemon =
        MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, http_on_request, h,
                         MHD_OPTION_EXTERNAL_LOGGER, http_log, NULL, /* first */
                         MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss, MHD_OPTION_CONNECTION_LIMIT,
                         (unsigned)METRICS_MAX_CONNECTIONS, MHD_OPTION_CONNECTION_TIMEOUT,
                         (unsigned)METRICS_TIMEOUT_S, MHD_OPTION_END);
    if (h->daemon == NULL) {
        free(h);
        return bs_err_set(err, BS_EIO,
                          "metrics: cannot listen on %s:%d (in use? "
                          "--metrics-port picks another, --no-metrics disables)",
                          address, port);
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_BIND_PORT);
    *bound = info != NULL ? info->port : port;
    *hp = h;
    return 0;
}

void bs_metrics_http_stop(bs_metrics_http_t *h)
{
    if (h == NULL)
        return;
    MHD_stop_daemon(h->daemon);
    free(h);
}
