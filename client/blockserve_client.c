/* The client over gRPC's C core.
 *
 * Every unary call, synchronous or not, is one batch of six ops (send
 * metadata, message and close; receive metadata, message and status) on a
 * completion queue: synchronous calls make a queue of their own and wait on
 * it. A stream runs one batch at a time on its own queue, so its thread may
 * block in each operation without racing another.
 *
 * Threads: bs_client_t is read-only after connect (the channel is
 * thread-safe); a queue and a stream are used by one thread at a time. */
#include "blockserve_client.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <fcntl.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "grpc/health/v1/health.pb-c.h"

#define DEFAULT_CONNECT_S 5.0
#define DEFAULT_CALL_S    60.0
#define DEFAULT_MAX_MSG   (64 << 20)

struct bs_client {
    grpc_channel *channel;
    char target[256];
    char auth[1024];  /* "Bearer <token>", or "" */
    grpc_metadata md; /* authorization metadata when auth is set */
    size_t n_md;
    double call_timeout_s;
};

struct bs_client_queue {
    grpc_completion_queue *cq;
    int pending; /* calls started and not yet returned by bs_client_queue_next */
};

/* One unary call in flight. */
struct call_ctx {
    grpc_call *call;
    void *tag;
    grpc_byte_buffer *send;
    grpc_byte_buffer *recv;
    grpc_metadata_array initial, trailing;
    grpc_status_code status;
    grpc_slice details;
    const char *error_string;
};

struct bs_client_stream {
    bs_client_t *client;
    grpc_completion_queue *cq;
    grpc_call *call;
    bool got_initial, half_closed, ended, finished;
    grpc_metadata_array initial, trailing;
    grpc_status_code status;
    grpc_slice details;
};

static const char *const status_names[] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *bs_client_status_name(int s)
{
    return s >= 0 && (size_t)s < BS_ARRAY_LEN(status_names) ? status_names[s] : "UNKNOWN";
}

__attribute__((format(printf, 4, 5))) static int fail(struct bs_client_err *err, int code,
                                                      int grpc_status, const char *fmt, ...)
{
    if (err == NULL)
        return code;
    va_list ap;
    va_start(ap, fmt);
    err->code = code;
    err->grpc_status = grpc_status;
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    return code;
}

int bs_client_err_set(struct bs_client_err *err, int code, const char *fmt, ...)
{
    if (err == NULL)
        return code;
    va_list ap;
    va_start(ap, fmt);
    err->code = code;
    err->grpc_status = -1;
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    return code;
}

/* The engine-style code for a failed call's status. */
static int code_of_status(int s)
{
    switch (s) {
    case GRPC_STATUS_INVALID_ARGUMENT:
        return BS_EINVAL;
    case GRPC_STATUS_NOT_FOUND:
        return BS_ENOTFOUND;
    case GRPC_STATUS_DEADLINE_EXCEEDED:
        return BS_ETIMEDOUT;
    case GRPC_STATUS_RESOURCE_EXHAUSTED:
        return BS_ERANGE;
    case GRPC_STATUS_UNIMPLEMENTED:
        return BS_EUNSUPP;
    case GRPC_STATUS_CANCELLED:
        return BS_ECANCELED;
    default:
        return BS_EIO;
    }
}

static gpr_timespec deadline_in(double s)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_micros((int64_t)(s * 1e6), GPR_TIMESPAN));
}

/* ---- connecting ----------------------------------------------------------- */

static int read_pem(const char *path, char **out, struct bs_client_err *err)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return fail(err, BS_EIO, -1, "%s: %s", path, strerror(errno));
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n + 4096 + 1 > cap) {
            char *nb = realloc(buf, cap = cap * 2 + 8192);
            if (nb == NULL) {
                free(buf);
                fclose(f);
                return fail(err, BS_ENOMEM, -1, "out of memory reading %s", path);
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, 4096, f);
        n += r;
        if (r < 4096)
            break;
    }
    fclose(f);
    buf[n] = '\0';
    if (strstr(buf, "-----BEGIN") == NULL) {
        free(buf);
        return fail(err, BS_EFORMAT, -1, "%s: not a PEM file (no -----BEGIN line)", path);
    }
    *out = buf;
    return 0;
}

static int make_creds(const struct bs_client_options *o, bool tls, grpc_channel_credentials **creds,
                      struct bs_client_err *err)
{
    if (!tls) {
        *creds = grpc_insecure_credentials_create();
        return 0;
    }
    char *ca = NULL, *cert = NULL, *key = NULL;
    int rc = 0;
    if ((o->tls_cert != NULL) != (o->tls_key != NULL))
        rc = fail(err, BS_EINVAL, -1, "a client certificate needs both --tls-cert and --tls-key");
    if (rc == 0 && o->tls_ca)
        rc = read_pem(o->tls_ca, &ca, err);
    if (rc == 0 && o->tls_cert)
        rc = read_pem(o->tls_cert, &cert, err);
    if (rc == 0 && o->tls_key)
        rc = read_pem(o->tls_key, &key, err);
    if (rc == 0) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
        *creds = grpc_ssl_credentials_create(ca, cert ? &pair : NULL, NULL, NULL);
        if (*creds == NULL)
            rc = fail(err, BS_EINVAL, -1, "gRPC rejected the TLS settings");
    }
    free(ca);
    free(cert);
    if (key != NULL)
        memset(key, 0, strlen(key));
    free(key);
    return rc;
}

/* Is anything accepting TCP connections at target? Used only to explain a
 * failed connect: "nothing listens" and "a listener that does not speak our
 * gRPC (TLS mismatch)" call for different fixes. */
static bool tcp_reachable(const char *target)
{
    char host[256];
    snprintf(host, sizeof(host), "%s", target);
    char *colon = strrchr(host, ':');
    if (colon == NULL)
        return false;
    *colon = '\0';
    const char *port = colon + 1;
    char *h = host;
    if (h[0] == '[' && colon > h && colon[-1] == ']') { /* [::1]:8001 */
        colon[-1] = '\0';
        h++;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res, *ai;
    if (getaddrinfo(h, port, &hints, &res) != 0)
        return false;
    bool ok = false;
    for (ai = res; ai != NULL && !ok; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0)
            continue;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            ok = true;
        } else if (errno == EINPROGRESS) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int e = 0;
            socklen_t el = sizeof(e);
            ok = poll(&p, 1, 1000) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &el) == 0 &&
                 e == 0;
        }
        close(fd);
    }
    freeaddrinfo(res);
    return ok;
}

static int explain_connect_failure(const bs_client_t *c, bool tls, bool timed_out, double secs,
                                   struct bs_client_err *err)
{
    if (!tcp_reachable(c->target))
        return fail(err, BS_EIO, GRPC_STATUS_UNAVAILABLE,
                    "cannot connect to %s: nothing accepts connections there (server down, "
                    "wrong host or port?)",
                    c->target);
    if (tls)
        return fail(err, BS_EIO, GRPC_STATUS_UNAVAILABLE,
                    "cannot connect to %s with TLS: the port accepts TCP connections but the "
                    "TLS handshake failed%s (a plaintext server, an untrusted or mismatched "
                    "certificate (--tls-ca), or a client certificate the server rejects?)",
                    c->target, timed_out ? " or timed out" : "");
    return fail(err, BS_EIO, GRPC_STATUS_UNAVAILABLE,
                "cannot connect to %s: the port accepts TCP connections but no plaintext gRPC "
                "connection came up%s (a TLS server? then pass --tls-ca; timeout %.1f s)",
                c->target, timed_out ? " in time" : "", secs);
}

/* Wait until the channel is READY, fails, or the deadline passes. */
static int wait_ready(bs_client_t *c, bool tls, double secs, struct bs_client_err *err)
{
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    gpr_timespec deadline = deadline_in(secs);
    grpc_connectivity_state st = grpc_channel_check_connectivity_state(c->channel, 1);
    bool timed_out = false;
    while (st != GRPC_CHANNEL_READY && st != GRPC_CHANNEL_TRANSIENT_FAILURE &&
           st != GRPC_CHANNEL_SHUTDOWN) {
        grpc_channel_watch_connectivity_state(c->channel, st, deadline, cq, NULL);
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type != GRPC_OP_COMPLETE || !ev.success) {
            timed_out = true;
            break;
        }
        st = grpc_channel_check_connectivity_state(c->channel, 1);
    }
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
    if (st == GRPC_CHANNEL_READY)
        return 0;
    return explain_connect_failure(c, tls, timed_out, secs, err);
}

/* Split a URL into the target and whether it asks for TLS. */
static int parse_url(const char *url, char *target, size_t size, bool *tls,
                     struct bs_client_err *err)
{
    static const struct {
        const char *prefix;
        bool tls;
    } schemes[] = {{"grpc://", false}, {"http://", false}, {"grpcs://", true}, {"https://", true}};
    for (size_t i = 0; i < BS_ARRAY_LEN(schemes); i++) {
        size_t n = strlen(schemes[i].prefix);
        if (strncmp(url, schemes[i].prefix, n) == 0) {
            url += n;
            *tls |= schemes[i].tls;
            break;
        }
    }
    size_t len = strlen(url);
    while (len > 0 && url[len - 1] == '/')
        len--;
    const char *colon = memrchr(url, ':', len);
    if (len == 0 || len >= size || colon == NULL || colon + 1 == url + len ||
        strspn(colon + 1, "0123456789") != (size_t)(url + len - colon - 1))
        return fail(err, BS_EINVAL, -1, "bad url \"%s\": expected HOST:PORT", url);
    memcpy(target, url, len);
    target[len] = '\0';
    return 0;
}

static grpc_arg int_arg(const char *key, int v)
{
    grpc_arg a = {.type = GRPC_ARG_INTEGER, .key = (char *)key};
    a.value.integer = v;
    return a;
}

static grpc_arg str_arg(const char *key, const char *v)
{
    grpc_arg a = {.type = GRPC_ARG_STRING, .key = (char *)key};
    a.value.string = (char *)v;
    return a;
}

static int make_channel(bs_client_t *c, const struct bs_client_options *o, bool tls,
                        struct bs_client_err *err)
{
    grpc_channel_credentials *creds;
    int rc = make_creds(o, tls, &creds, err);
    if (rc != 0)
        return rc;
    int max = o->max_message_bytes > 0 ? o->max_message_bytes : DEFAULT_MAX_MSG;
    grpc_arg args[5];
    size_t n = 0;
    args[n++] = int_arg(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, max);
    args[n++] = int_arg(GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, max);
    args[n++] = str_arg(GRPC_ARG_PRIMARY_USER_AGENT_STRING, "blockserve-cli/0.1");
    if (o->own_connection)
        args[n++] = int_arg(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    if (tls && o->tls_server_name)
        args[n++] = str_arg(GRPC_SSL_TARGET_NAME_OVERRIDE_ARG, o->tls_server_name);
    grpc_channel_args ca = {.num_args = n, .args = args};
    c->channel = grpc_channel_create(c->target, creds, &ca);
    grpc_channel_credentials_release(creds);
    return c->channel ? 0 : fail(err, BS_EIO, -1, "cannot create a channel to %s", c->target);
}

int bs_client_connect(bs_client_t **out, const struct bs_client_options *o,
                      struct bs_client_err *err)
{
    *out = NULL;
    bs_client_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return fail(err, BS_ENOMEM, -1, "out of memory");
    grpc_init();
    bool tls = o->tls || o->tls_ca || o->tls_cert;
    int rc =
        parse_url(o->url ? o->url : BS_CLIENT_DEFAULT_URL, c->target, sizeof(c->target), &tls, err);
    c->call_timeout_s = o->call_timeout_s > 0 ? o->call_timeout_s : DEFAULT_CALL_S;
    if (rc == 0 && o->token) {
        if (o->token[0] == '\0' || strpbrk(o->token, "\r\n") ||
            (size_t)snprintf(c->auth, sizeof(c->auth), "Bearer %s", o->token) >= sizeof(c->auth))
            rc = fail(err, BS_EINVAL, -1, "bad token: empty, too long or spans lines");
        c->md.key = grpc_slice_from_static_string("authorization");
        c->md.value = grpc_slice_from_static_string(c->auth);
        c->n_md = 1;
    }
    if (rc == 0)
        rc = make_channel(c, o, tls, err);
    if (rc == 0)
        rc = wait_ready(c, tls, o->connect_timeout_s > 0 ? o->connect_timeout_s : DEFAULT_CONNECT_S,
                        err);
    if (rc != 0) {
        bs_client_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

void bs_client_free(bs_client_t *c)
{
    if (c == NULL)
        return;
    if (c->channel)
        grpc_channel_destroy(c->channel);
    free(c);
    grpc_shutdown();
}

const char *bs_client_target(const bs_client_t *c)
{
    return c->target;
}

/* ---- asynchronous unary calls ---------------------------------------------- */

int bs_client_queue_create(bs_client_queue_t **q, struct bs_client_err *err)
{
    *q = calloc(1, sizeof(**q));
    if (*q == NULL)
        return fail(err, BS_ENOMEM, -1, "out of memory");
    (*q)->cq = grpc_completion_queue_create_for_next(NULL);
    return 0;
}

static void call_ctx_free(struct call_ctx *x)
{
    if (x->call)
        grpc_call_unref(x->call);
    grpc_byte_buffer_destroy(x->send);
    if (x->recv)
        grpc_byte_buffer_destroy(x->recv);
    grpc_metadata_array_destroy(&x->initial);
    grpc_metadata_array_destroy(&x->trailing);
    grpc_slice_unref(x->details);
    gpr_free((void *)x->error_string);
    free(x);
}

void bs_client_queue_free(bs_client_queue_t *q)
{
    if (q == NULL)
        return;
    struct bs_client_event ev;
    while (q->pending > 0) /* calls time out at their deadline at the latest */
        bs_client_queue_next(q, 3600, &ev);
    grpc_completion_queue_shutdown(q->cq);
    while (grpc_completion_queue_next(q->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(q->cq);
    free(q);
}

int bs_client_call_start(bs_client_t *c, bs_client_queue_t *q, const char *method, const void *req,
                         size_t req_len, double timeout_s, void *tag, struct bs_client_err *err)
{
    struct call_ctx *x = calloc(1, sizeof(*x));
    if (x == NULL)
        return fail(err, BS_ENOMEM, -1, "out of memory");
    x->tag = tag;
    x->details = grpc_empty_slice();
    grpc_metadata_array_init(&x->initial);
    grpc_metadata_array_init(&x->trailing);
    grpc_slice m = grpc_slice_from_static_string(method);
    x->call =
        grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, q->cq, m, NULL,
                                 deadline_in(timeout_s > 0 ? timeout_s : c->call_timeout_s), NULL);
    grpc_slice body = grpc_slice_from_static_buffer(req, req_len);
    x->send = grpc_raw_byte_buffer_create(&body, 1);
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = c->n_md;
    ops[0].data.send_initial_metadata.metadata = c->n_md ? &c->md : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = x->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &x->initial;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &x->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &x->trailing;
    ops[5].data.recv_status_on_client.status = &x->status;
    ops[5].data.recv_status_on_client.status_details = &x->details;
    ops[5].data.recv_status_on_client.error_string = &x->error_string;
    grpc_call_error e = grpc_call_start_batch(x->call, ops, 6, x, NULL);
    if (e != GRPC_CALL_OK) {
        call_ctx_free(x);
        return fail(err, BS_EINTERNAL, -1, "grpc_call_start_batch: %s",
                    grpc_call_error_to_string(e));
    }
    q->pending++;
    return 0;
}

static size_t bb_length(grpc_byte_buffer *bb)
{
    return bb ? grpc_byte_buffer_length(bb) : 0;
}

/* Copy the received message of bb into a malloc'ed buffer. */
static int bb_copy(grpc_byte_buffer *bb, uint8_t **out, size_t *len)
{
    grpc_byte_buffer_reader r;
    *out = NULL;
    *len = 0;
    if (bb == NULL || !grpc_byte_buffer_reader_init(&r, bb))
        return bb == NULL ? 0 : BS_EIO;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    *len = GRPC_SLICE_LENGTH(s);
    *out = malloc(*len ? *len : 1);
    if (*out != NULL)
        memcpy(*out, GRPC_SLICE_START_PTR(s), *len);
    grpc_slice_unref(s);
    return *out ? 0 : BS_ENOMEM;
}

static void copy_details(grpc_slice d, char *buf, size_t size)
{
    size_t n = GRPC_SLICE_LENGTH(d);
    if (n >= size)
        n = size - 1;
    memcpy(buf, GRPC_SLICE_START_PTR(d), n);
    buf[n] = '\0';
}

/* Wait for the next call on q; with resp, also hand over its message bytes. */
static int queue_next(bs_client_queue_t *q, double timeout_s, struct bs_client_event *ev,
                      uint8_t **resp, size_t *resp_len)
{
    grpc_event e = grpc_completion_queue_next(q->cq, deadline_in(timeout_s), NULL);
    if (e.type != GRPC_OP_COMPLETE)
        return 0;
    struct call_ctx *x = e.tag;
    q->pending--;
    memset(ev, 0, sizeof(*ev));
    ev->tag = x->tag;
    ev->grpc_status = e.success ? (int)x->status : GRPC_STATUS_INTERNAL;
    copy_details(x->details, ev->message, sizeof(ev->message));
    ev->resp_len = bb_length(x->recv);
    if (ev->grpc_status == GRPC_STATUS_OK && ev->resp_len == 0 && x->recv == NULL) {
        ev->grpc_status = GRPC_STATUS_INTERNAL;
        snprintf(ev->message, sizeof(ev->message), "status OK without a response message");
    }
    if (resp != NULL && bb_copy(x->recv, resp, resp_len) != 0) {
        ev->grpc_status = GRPC_STATUS_RESOURCE_EXHAUSTED;
        snprintf(ev->message, sizeof(ev->message), "out of memory reading the response");
    }
    call_ctx_free(x);
    return 1;
}

int bs_client_queue_next(bs_client_queue_t *q, double timeout_s, struct bs_client_event *ev)
{
    return queue_next(q, timeout_s, ev, NULL, NULL);
}

/* ---- synchronous calls ----------------------------------------------------- */

int bs_client_call_raw(bs_client_t *c, const char *method, const void *req, size_t req_len,
                       double timeout_s, uint8_t **resp, size_t *resp_len,
                       struct bs_client_err *err)
{
    bs_client_queue_t *q;
    struct bs_client_event ev;
    *resp = NULL;
    *resp_len = 0;
    int rc = bs_client_queue_create(&q, err);
    if (rc != 0)
        return rc;
    rc = bs_client_call_start(c, q, method, req, req_len, timeout_s, NULL, err);
    if (rc == 0) {
        if (queue_next(q, 1e7, &ev, resp, resp_len) ==
            0) { /* cannot happen: the call has a deadline */
            ev.grpc_status = GRPC_STATUS_DEADLINE_EXCEEDED;
            snprintf(ev.message, sizeof(ev.message), "no completion");
        }
        if (ev.grpc_status != GRPC_STATUS_OK) {
            rc = fail(err, code_of_status(ev.grpc_status), ev.grpc_status, "%s: %s",
                      bs_client_status_name(ev.grpc_status), ev.message);
            free(*resp);
            *resp = NULL;
            *resp_len = 0;
        }
    }
    bs_client_queue_free(q);
    return rc;
}

int bs_client_call(bs_client_t *c, const char *method, const ProtobufCMessage *req,
                   const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **resp,
                   struct bs_client_err *err)
{
    size_t n = protobuf_c_message_get_packed_size(req);
    uint8_t *buf = malloc(n ? n : 1), *r;
    size_t rn;
    *resp = NULL;
    if (buf == NULL)
        return fail(err, BS_ENOMEM, -1, "out of memory");
    protobuf_c_message_pack(req, buf);
    int rc = bs_client_call_raw(c, method, buf, n, 0, &r, &rn, err);
    free(buf);
    if (rc != 0)
        return rc;
    *resp = protobuf_c_message_unpack(resp_desc, NULL, rn, r);
    free(r);
    if (*resp == NULL)
        return fail(err, BS_EFORMAT, -1, "%s: cannot parse the response (%zu bytes) as %s", method,
                    rn, resp_desc->name);
    return 0;
}

void bs_client_msg_free(void *msg)
{
    if (msg != NULL)
        protobuf_c_message_free_unpacked(msg, NULL);
}

#define CALL(c, method, req, type, lower, r, err)                                                  \
    bs_client_call((c), BS_CLIENT_METHOD(method), &(req)->base, &lower##__descriptor,              \
                   (ProtobufCMessage **)(r), (err))

int bs_client_health_check(bs_client_t *c, const char *service, int *status,
                           struct bs_client_err *err)
{
    Grpc__Health__V1__HealthCheckRequest q = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    Grpc__Health__V1__HealthCheckResponse *r;
    q.service = (char *)(service ? service : "");
    int rc = bs_client_call(c, "/grpc.health.v1.Health/Check", &q.base,
                            &grpc__health__v1__health_check_response__descriptor,
                            (ProtobufCMessage **)&r, err);
    if (rc == 0) {
        *status = (int)r->status;
        bs_client_msg_free(r);
    }
    return rc;
}

int bs_client_server_live(bs_client_t *c, bool *live, struct bs_client_err *err)
{
    Inference__ServerLiveRequest q = INFERENCE__SERVER_LIVE_REQUEST__INIT;
    Inference__ServerLiveResponse *r;
    int rc = CALL(c, "ServerLive", &q, Inference__ServerLiveResponse,
                  inference__server_live_response, &r, err);
    if (rc == 0) {
        *live = r->live;
        bs_client_msg_free(r);
    }
    return rc;
}

int bs_client_server_ready(bs_client_t *c, bool *ready, struct bs_client_err *err)
{
    Inference__ServerReadyRequest q = INFERENCE__SERVER_READY_REQUEST__INIT;
    Inference__ServerReadyResponse *r;
    int rc = CALL(c, "ServerReady", &q, Inference__ServerReadyResponse,
                  inference__server_ready_response, &r, err);
    if (rc == 0) {
        *ready = r->ready;
        bs_client_msg_free(r);
    }
    return rc;
}

int bs_client_model_ready(bs_client_t *c, const char *model, bool *ready, struct bs_client_err *err)
{
    Inference__ModelReadyRequest q = INFERENCE__MODEL_READY_REQUEST__INIT;
    Inference__ModelReadyResponse *r;
    q.name = (char *)model;
    int rc = CALL(c, "ModelReady", &q, Inference__ModelReadyResponse,
                  inference__model_ready_response, &r, err);
    if (rc == 0) {
        *ready = r->ready;
        bs_client_msg_free(r);
    }
    return rc;
}

int bs_client_server_metadata(bs_client_t *c, Inference__ServerMetadataResponse **r,
                              struct bs_client_err *err)
{
    Inference__ServerMetadataRequest q = INFERENCE__SERVER_METADATA_REQUEST__INIT;
    return CALL(c, "ServerMetadata", &q, Inference__ServerMetadataResponse,
                inference__server_metadata_response, r, err);
}

int bs_client_model_metadata(bs_client_t *c, const char *model,
                             Inference__ModelMetadataResponse **r, struct bs_client_err *err)
{
    Inference__ModelMetadataRequest q = INFERENCE__MODEL_METADATA_REQUEST__INIT;
    q.name = (char *)model;
    return CALL(c, "ModelMetadata", &q, Inference__ModelMetadataResponse,
                inference__model_metadata_response, r, err);
}

int bs_client_model_config(bs_client_t *c, const char *model, Inference__ModelConfigResponse **r,
                           struct bs_client_err *err)
{
    Inference__ModelConfigRequest q = INFERENCE__MODEL_CONFIG_REQUEST__INIT;
    q.name = (char *)model;
    return CALL(c, "ModelConfig", &q, Inference__ModelConfigResponse,
                inference__model_config_response, r, err);
}

int bs_client_repository_index(bs_client_t *c, Inference__RepositoryIndexResponse **r,
                               struct bs_client_err *err)
{
    Inference__RepositoryIndexRequest q = INFERENCE__REPOSITORY_INDEX_REQUEST__INIT;
    return CALL(c, "RepositoryIndex", &q, Inference__RepositoryIndexResponse,
                inference__repository_index_response, r, err);
}

int bs_client_infer(bs_client_t *c, const Inference__ModelInferRequest *req,
                    Inference__ModelInferResponse **r, struct bs_client_err *err)
{
    return CALL(c, "ModelInfer", req, Inference__ModelInferResponse,
                inference__model_infer_response, r, err);
}

/* ---- tensors in requests and responses ------------------------------------ */

/* The three shared memory parameters of one tensor. The input and output
 * ParametersEntry messages have one layout (base, key, value); each entry is
 * initialised with its own descriptor, so one array type serves both. */
struct shm_params {
    Inference__InferParameter v[3];
    Inference__ModelInferRequest__InferInputTensor__ParametersEntry e[3];
    Inference__ModelInferRequest__InferInputTensor__ParametersEntry *p[3];
};

static void shm_params_fill(struct shm_params *s, const ProtobufCMessageDescriptor *entry_desc,
                            const struct bs_client_shm_ref *r)
{
    static const char *const keys[3] = {"shared_memory_region", "shared_memory_byte_size",
                                        "shared_memory_offset"};
    for (int k = 0; k < 3; k++) {
        inference__infer_parameter__init(&s->v[k]);
        protobuf_c_message_init(entry_desc, &s->e[k]);
        s->e[k].key = (char *)keys[k];
        s->e[k].value = &s->v[k];
        s->p[k] = &s->e[k];
    }
    s->v[0].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    s->v[0].string_param = (char *)r->region;
    s->v[1].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    s->v[1].int64_param = (int64_t)r->byte_size;
    s->v[2].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    s->v[2].int64_param = (int64_t)r->offset;
}

struct pack_parts {
    Inference__ModelInferRequest__InferInputTensor *tensors, **ptrs;
    Inference__ModelInferRequest__InferRequestedOutputTensor *outs, **out_ptrs;
    ProtobufCBinaryData *raw;
    struct shm_params *shm; /* n inputs, then n_outputs outputs */
};

static void pack_parts_free(struct pack_parts *p)
{
    free(p->tensors);
    free(p->ptrs);
    free(p->outs);
    free(p->out_ptrs);
    free(p->raw);
    free(p->shm);
}

static void pack_outputs(struct pack_parts *p, const struct bs_client_infer_opts *o, int n)
{
    typedef Inference__ModelInferRequest__InferRequestedOutputTensor__ParametersEntry entry_t;
    for (int i = 0; i < o->n_outputs; i++) {
        inference__model_infer_request__infer_requested_output_tensor__init(&p->outs[i]);
        p->outs[i].name = (char *)o->outputs[i];
        if (o->out_shm != NULL) {
            shm_params_fill(
                &p->shm[n + i],
                &inference__model_infer_request__infer_requested_output_tensor__parameters_entry__descriptor,
                &o->out_shm[i]);
            p->outs[i].n_parameters = 3;
            p->outs[i].parameters = (entry_t **)p->shm[n + i].p;
        }
        p->out_ptrs[i] = &p->outs[i];
    }
}

int bs_client_pack_infer_request_ex(const char *model, const struct bs_ctensor *in, int n,
                                    const struct bs_client_infer_opts *o, uint8_t **buf,
                                    size_t *len, struct bs_client_err *err)
{
    size_t nn = (size_t)n + 1, no = (size_t)(o->n_outputs > 0 ? o->n_outputs : 0) + 1;
    struct pack_parts p = {
        .tensors = calloc(nn, sizeof(*p.tensors)),
        .ptrs = calloc(nn, sizeof(*p.ptrs)),
        .outs = calloc(no, sizeof(*p.outs)),
        .out_ptrs = calloc(no, sizeof(*p.out_ptrs)),
        .raw = calloc(nn, sizeof(*p.raw)),
        .shm = calloc(nn + no, sizeof(*p.shm)),
    };
    int rc = 0;
    if (!p.tensors || !p.ptrs || !p.outs || !p.out_ptrs || !p.raw || !p.shm)
        rc = fail(err, BS_ENOMEM, -1, "out of memory");
    for (int i = 0; rc == 0 && i < n; i++) {
        inference__model_infer_request__infer_input_tensor__init(&p.tensors[i]);
        p.tensors[i].name = (char *)in[i].name;
        p.tensors[i].datatype = (char *)in[i].datatype;
        p.tensors[i].n_shape = (size_t)in[i].n_dims;
        p.tensors[i].shape = (int64_t *)in[i].shape;
        if (o->in_shm != NULL) {
            shm_params_fill(
                &p.shm[i],
                &inference__model_infer_request__infer_input_tensor__parameters_entry__descriptor,
                &o->in_shm[i]);
            p.tensors[i].n_parameters = 3;
            p.tensors[i].parameters = p.shm[i].p;
        }
        p.ptrs[i] = &p.tensors[i];
        p.raw[i].len = in[i].nbytes;
        p.raw[i].data = in[i].data;
    }
    if (rc == 0) {
        pack_outputs(&p, o, n);
        Inference__ModelInferRequest q = INFERENCE__MODEL_INFER_REQUEST__INIT;
        q.model_name = (char *)model;
        q.id = (char *)(o->id ? o->id : "");
        q.n_inputs = (size_t)n;
        q.inputs = p.ptrs;
        q.n_outputs = (size_t)(o->n_outputs > 0 ? o->n_outputs : 0);
        q.outputs = p.out_ptrs;
        q.n_raw_input_contents = o->in_shm ? 0 : (size_t)n;
        q.raw_input_contents = p.raw;
        Inference__InferParameter odt = INFERENCE__INFER_PARAMETER__INIT;
        Inference__ModelInferRequest__ParametersEntry odt_entry =
            INFERENCE__MODEL_INFER_REQUEST__PARAMETERS_ENTRY__INIT;
        Inference__ModelInferRequest__ParametersEntry *params[1] = {&odt_entry};
        if (o->output_datatype != NULL) {
            odt.parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
            odt.string_param = (char *)o->output_datatype;
            odt_entry.key = "output_datatype";
            odt_entry.value = &odt;
            q.n_parameters = 1;
            q.parameters = params;
        }
        *len = protobuf_c_message_get_packed_size(&q.base);
        *buf = malloc(*len ? *len : 1);
        if (*buf == NULL)
            rc = fail(err, BS_ENOMEM, -1, "out of memory for a %zu-byte request", *len);
        else
            protobuf_c_message_pack(&q.base, *buf);
    }
    pack_parts_free(&p);
    return rc;
}

int bs_client_pack_infer_request(const char *model, const char *id, const struct bs_ctensor *in,
                                 int n, uint8_t **buf, size_t *len, struct bs_client_err *err)
{
    struct bs_client_infer_opts o = {.id = id};
    return bs_client_pack_infer_request_ex(model, in, n, &o, buf, len, err);
}

int bs_client_response_output_meta(const Inference__ModelInferResponse *r, struct bs_ctensor *out,
                                   int max, int *n, struct bs_client_err *err)
{
    *n = 0;
    if (r->n_outputs > (size_t)max)
        return fail(err, BS_EINVAL, -1, "the response has %zu outputs (at most %d)", r->n_outputs,
                    max);
    for (size_t i = 0; i < r->n_outputs; i++) {
        const Inference__ModelInferResponse__InferOutputTensor *o = r->outputs[i];
        struct bs_ctensor *t = &out[i];
        memset(t, 0, sizeof(*t));
        snprintf(t->name, sizeof(t->name), "%s", o->name ? o->name : "");
        snprintf(t->datatype, sizeof(t->datatype), "%s", o->datatype ? o->datatype : "");
        if (o->n_shape > BS_CT_MAX_DIMS)
            return fail(err, BS_EFORMAT, -1, "output '%s': %zu dims", t->name, o->n_shape);
        t->n_dims = (int)o->n_shape;
        memcpy(t->shape, o->shape, o->n_shape * sizeof(int64_t));
        int64_t ne = bs_ct_nelements(t);
        t->nbytes = ne < 0 ? 0 : (size_t)ne * bs_ct_datatype_size(t->datatype);
    }
    *n = (int)r->n_outputs;
    return 0;
}

/* ---- model control and shared memory ---------------------------------------- */

int bs_client_model_load(bs_client_t *c, const char *model, struct bs_client_err *err)
{
    Inference__RepositoryModelLoadRequest q = INFERENCE__REPOSITORY_MODEL_LOAD_REQUEST__INIT;
    Inference__RepositoryModelLoadResponse *r = NULL;
    q.model_name = (char *)model;
    int rc = CALL(c, "RepositoryModelLoad", &q, Inference__RepositoryModelLoadResponse,
                  inference__repository_model_load_response, &r, err);
    bs_client_msg_free(r);
    return rc;
}

int bs_client_model_unload(bs_client_t *c, const char *model, struct bs_client_err *err)
{
    Inference__RepositoryModelUnloadRequest q = INFERENCE__REPOSITORY_MODEL_UNLOAD_REQUEST__INIT;
    Inference__RepositoryModelUnloadResponse *r = NULL;
    q.model_name = (char *)model;
    int rc = CALL(c, "RepositoryModelUnload", &q, Inference__RepositoryModelUnloadResponse,
                  inference__repository_model_unload_response, &r, err);
    bs_client_msg_free(r);
    return rc;
}

int bs_client_shm_register(bs_client_t *c, const char *name, const char *key, uint64_t offset,
                           uint64_t byte_size, struct bs_client_err *err)
{
    Inference__SystemSharedMemoryRegisterRequest q =
        INFERENCE__SYSTEM_SHARED_MEMORY_REGISTER_REQUEST__INIT;
    Inference__SystemSharedMemoryRegisterResponse *r = NULL;
    q.name = (char *)name;
    q.key = (char *)key;
    q.offset = offset;
    q.byte_size = byte_size;
    int rc =
        CALL(c, "SystemSharedMemoryRegister", &q, Inference__SystemSharedMemoryRegisterResponse,
             inference__system_shared_memory_register_response, &r, err);
    bs_client_msg_free(r);
    return rc;
}

static int region_cmp(const void *a, const void *b)
{
    return strcmp(((const struct bs_client_shm_region *)a)->name,
                  ((const struct bs_client_shm_region *)b)->name);
}

int bs_client_shm_status(bs_client_t *c, const char *name, struct bs_client_shm_region *regions,
                         int max, int *n, struct bs_client_err *err)
{
    Inference__SystemSharedMemoryStatusRequest q =
        INFERENCE__SYSTEM_SHARED_MEMORY_STATUS_REQUEST__INIT;
    Inference__SystemSharedMemoryStatusResponse *r = NULL;
    q.name = (char *)(name ? name : "");
    *n = 0;
    int rc = CALL(c, "SystemSharedMemoryStatus", &q, Inference__SystemSharedMemoryStatusResponse,
                  inference__system_shared_memory_status_response, &r, err);
    for (size_t i = 0; rc == 0 && i < r->n_regions && *n < max; i++) {
        const Inference__SystemSharedMemoryStatusResponse__RegionStatus *v = r->regions[i]->value;
        struct bs_client_shm_region *g = &regions[(*n)++];
        snprintf(g->name, sizeof(g->name), "%s",
                 v && v->name && v->name[0] ? v->name : r->regions[i]->key);
        snprintf(g->key, sizeof(g->key), "%s", v && v->key ? v->key : "");
        g->offset = v ? v->offset : 0;
        g->byte_size = v ? v->byte_size : 0;
    }
    bs_client_msg_free(r);
    if (rc == 0)
        qsort(regions, (size_t)*n, sizeof(*regions), region_cmp);
    return rc;
}

int bs_client_shm_unregister(bs_client_t *c, const char *name, struct bs_client_err *err)
{
    Inference__SystemSharedMemoryUnregisterRequest q =
        INFERENCE__SYSTEM_SHARED_MEMORY_UNREGISTER_REQUEST__INIT;
    Inference__SystemSharedMemoryUnregisterResponse *r = NULL;
    q.name = (char *)(name ? name : "");
    int rc =
        CALL(c, "SystemSharedMemoryUnregister", &q, Inference__SystemSharedMemoryUnregisterResponse,
             inference__system_shared_memory_unregister_response, &r, err);
    bs_client_msg_free(r);
    return rc;
}

/* Typed contents of one output into t (already shaped and allocated). */
static int typed_output(const Inference__InferTensorContents *c, struct bs_ctensor *t,
                        struct bs_client_err *err)
{
    int64_t ne = bs_ct_nelements(t);
    size_t have = 0;
    if (c != NULL && strcmp(t->datatype, "FP32") == 0) {
        have = c->n_fp32_contents;
        if (have == (size_t)ne)
            memcpy(t->data, c->fp32_contents, t->nbytes);
    } else if (c != NULL && strcmp(t->datatype, "INT64") == 0) {
        have = c->n_int64_contents;
        if (have == (size_t)ne)
            memcpy(t->data, c->int64_contents, t->nbytes);
    } else if (c != NULL && strcmp(t->datatype, "BOOL") == 0) {
        have = c->n_bool_contents;
        for (size_t i = 0; have == (size_t)ne && i < have; i++)
            ((uint8_t *)t->data)[i] = c->bool_contents[i] != 0;
    } else if (ne > 0) {
        return fail(err, BS_EUNSUPP, -1, "output '%s': typed %s contents are not supported",
                    t->name, t->datatype);
    }
    if (have != (size_t)ne)
        return fail(err, BS_EFORMAT, -1, "output '%s': %zu values for %lld elements", t->name, have,
                    (long long)ne);
    return 0;
}

static int one_output(const Inference__ModelInferResponse *r, size_t i, struct bs_ctensor *t,
                      struct bs_client_err *err)
{
    const Inference__ModelInferResponse__InferOutputTensor *o = r->outputs[i];
    struct bs_err e = {0};
    memset(t, 0, sizeof(*t));
    snprintf(t->name, sizeof(t->name), "%s", o->name ? o->name : "");
    snprintf(t->datatype, sizeof(t->datatype), "%s", o->datatype ? o->datatype : "");
    if (o->n_shape > BS_CT_MAX_DIMS)
        return fail(err, BS_EFORMAT, -1, "output '%s': %zu dims", t->name, o->n_shape);
    t->n_dims = (int)o->n_shape;
    memcpy(t->shape, o->shape, o->n_shape * sizeof(int64_t));
    if (bs_ct_alloc(t, &e) != 0)
        return fail(err, e.code, -1, "output '%s': %s", t->name, e.msg);
    if (r->n_raw_output_contents == 0)
        return typed_output(o->contents, t, err);
    if (i >= r->n_raw_output_contents || r->raw_output_contents[i].len != t->nbytes)
        return fail(err, BS_EFORMAT, -1, "output '%s': raw contents hold %zu bytes, expected %zu",
                    t->name, i < r->n_raw_output_contents ? r->raw_output_contents[i].len : 0,
                    t->nbytes);
    if (t->nbytes > 0)
        memcpy(t->data, r->raw_output_contents[i].data, t->nbytes);
    return 0;
}

int bs_client_response_outputs(const Inference__ModelInferResponse *r, struct bs_ctensor *out,
                               int max, int *n, struct bs_client_err *err)
{
    *n = 0;
    if (r->n_outputs > (size_t)max)
        return fail(err, BS_EINVAL, -1, "the response has %zu outputs (at most %d)", r->n_outputs,
                    max);
    for (size_t i = 0; i < r->n_outputs; i++) {
        int rc = one_output(r, i, &out[i], err);
        if (rc != 0) {
            for (size_t j = 0; j <= i; j++)
                bs_ct_free(&out[j]);
            return rc;
        }
    }
    *n = (int)r->n_outputs;
    return 0;
}

/* ---- streams --------------------------------------------------------------- */

/* Run one batch on the stream and wait for it; false when it failed. */
static bool stream_batch(bs_client_stream_t *s, const grpc_op *ops, size_t n)
{
    if (grpc_call_start_batch(s->call, ops, n, s, NULL) != GRPC_CALL_OK)
        return false;
    grpc_event e = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    return e.type == GRPC_OP_COMPLETE && e.success;
}

int bs_client_stream_open(bs_client_t *c, double timeout_s, bs_client_stream_t **out,
                          struct bs_client_err *err)
{
    bs_client_stream_t *s = calloc(1, sizeof(*s));
    *out = NULL;
    if (s == NULL)
        return fail(err, BS_ENOMEM, -1, "out of memory");
    s->client = c;
    s->details = grpc_empty_slice();
    grpc_metadata_array_init(&s->initial);
    grpc_metadata_array_init(&s->trailing);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    s->call = grpc_channel_create_call(
        c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, s->cq,
        grpc_slice_from_static_string(BS_CLIENT_METHOD("ModelStreamInfer")), NULL,
        deadline_in(timeout_s > 0 ? timeout_s : c->call_timeout_s), NULL);
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_SEND_INITIAL_METADATA;
    op.data.send_initial_metadata.count = c->n_md;
    op.data.send_initial_metadata.metadata = c->n_md ? &c->md : NULL;
    if (!stream_batch(s, &op, 1)) {
        bs_client_stream_free(s);
        return fail(err, BS_EIO, GRPC_STATUS_UNAVAILABLE, "cannot open a ModelStreamInfer stream");
    }
    *out = s;
    return 0;
}

/* The stream failed: collect its status for the message. */
static int stream_failed(bs_client_stream_t *s, const char *what, struct bs_client_err *err)
{
    struct bs_client_err e;
    if (bs_client_stream_finish(s, &e) != 0)
        return fail(err, e.code, e.grpc_status, "%s: %s", what, e.msg);
    return fail(err, BS_EIO, -1, "%s: the stream ended", what);
}

int bs_client_stream_write(bs_client_stream_t *s, const void *req, size_t len,
                           struct bs_client_err *err)
{
    if (s->half_closed || s->ended)
        return fail(err, BS_EINVAL, -1, "the stream is closed");
    grpc_slice body = grpc_slice_from_copied_buffer(req, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&body, 1);
    grpc_slice_unref(body);
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = bb;
    bool ok = stream_batch(s, &op, 1);
    grpc_byte_buffer_destroy(bb);
    return ok ? 0 : stream_failed(s, "sending a request", err);
}

int bs_client_stream_read(bs_client_stream_t *s, Inference__ModelStreamInferResponse **r,
                          struct bs_client_err *err)
{
    grpc_op ops[2];
    grpc_byte_buffer *bb = NULL;
    size_t n = 0;
    *r = NULL;
    if (s->ended)
        return 1;
    memset(ops, 0, sizeof(ops));
    if (!s->got_initial) {
        ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
        ops[n++].data.recv_initial_metadata.recv_initial_metadata = &s->initial;
        s->got_initial = true;
    }
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n++].data.recv_message.recv_message = &bb;
    if (!stream_batch(s, ops, n) || bb == NULL) {
        s->ended = true;
        return 1;
    }
    uint8_t *buf;
    size_t len;
    int rc = bb_copy(bb, &buf, &len);
    grpc_byte_buffer_destroy(bb);
    if (rc != 0)
        return fail(err, rc, -1, "out of memory reading a response");
    *r = inference__model_stream_infer_response__unpack(NULL, len, buf);
    free(buf);
    if (*r == NULL)
        return fail(err, BS_EFORMAT, -1, "cannot parse a ModelStreamInferResponse (%zu bytes)",
                    len);
    return 0;
}

int bs_client_stream_finish(bs_client_stream_t *s, struct bs_client_err *err)
{
    if (!s->finished) {
        grpc_op ops[3];
        size_t n = 0;
        memset(ops, 0, sizeof(ops));
        if (!s->half_closed) {
            ops[n++].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
            s->half_closed = true;
        }
        if (!s->got_initial) {
            ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
            ops[n++].data.recv_initial_metadata.recv_initial_metadata = &s->initial;
            s->got_initial = true;
        }
        ops[n].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        ops[n].data.recv_status_on_client.trailing_metadata = &s->trailing;
        ops[n].data.recv_status_on_client.status = &s->status;
        ops[n++].data.recv_status_on_client.status_details = &s->details;
        if (!stream_batch(s, ops, n)) {
            /* the close may fail on a dead call: ask for the status alone */
            s->status = GRPC_STATUS_UNKNOWN;
            stream_batch(s, &ops[n - 1], 1);
        }
        s->finished = s->ended = true;
    }
    if (s->status == GRPC_STATUS_OK)
        return 0;
    char msg[256];
    copy_details(s->details, msg, sizeof(msg));
    return fail(err, code_of_status(s->status), s->status, "%s: %s",
                bs_client_status_name(s->status), msg);
}

void bs_client_stream_free(bs_client_stream_t *s)
{
    if (s == NULL)
        return;
    if (!s->finished) {
        grpc_call_cancel(s->call, NULL);
        struct bs_client_err e;
        bs_client_stream_finish(s, &e);
    }
    grpc_call_unref(s->call);
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(s->cq);
    grpc_metadata_array_destroy(&s->initial);
    grpc_metadata_array_destroy(&s->trailing);
    grpc_slice_unref(s->details);
    free(s);
}
