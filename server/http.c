/* The HTTP/REST front end (http.h) on libmicrohttpd.
 *
 * A request's path through it:
 *   1. An HTTP thread (MHD's pool, epoll) routes the URL (404, 405 at once),
 *      checks the bearer token (401) and reads the body, bounded by
 *      max_body_bytes (413), inflating gzip or deflate within the same
 *      bound; an inference's JSON (and binary data) becomes its
 *      ModelInferRequest here (http_codec.c).
 *   2. It suspends the connection and appends the job to the locked list
 *      `queue`; uv_async_send wakes the loop.
 *   3. The loop thread (on_async) runs the control method or validates
 *      (codec.c, the same checks as gRPC) and submits the inference to the
 *      core; while the core has it, a uv_poll on the socket (UV_DISCONNECT)
 *      cancels it when the client goes away.
 *   4. When the answer is known the loop copies the output into the job and
 *      resumes the connection; the HTTP thread renders the JSON (and binary
 *      data), compresses it when asked, and sends it.
 *
 * Thread ownership: a job belongs to the HTTP thread of its connection,
 * except between suspend and resume, when the loop owns it (the handoff is
 * the locked queue one way, MHD_resume_connection the other; the loop never
 * touches a job after resuming it). struct infer (the core's side of an
 * inference: its request, the body its tensors point into, the poll) is the
 * loop's, freed when the core releases it. `queue` and `closed` are under
 * `mu`. */
#include "http.h"

#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include <gnutls/gnutls.h>
#include <microhttpd.h>

#include "grpc_service.pb-c.h"
#include "http_codec.h"
#include "json.h"
#include "log.h"
#include "metrics_http.h"
#include "pbjson.h"

#define HTTP_THREADS         4
#define HTTP_MAX_CONNECTIONS 1024
#define HTTP_TIMEOUT_S       300
#define HTTP_MAX_CAPTURES    2

enum route_kind {
    R_CONTROL, /* a control method */
    R_INFER,
    R_LOST, /* not a request: an inference whose body never arrived whole */
};

/* One routable path: segments, '*' captures (m: model, v: version, r: region). */
struct route {
    const char *pattern;
    const char *verb;
    enum route_kind kind;
    enum bs_control_method method;
    const char *caps;
};

#define CTL(p, verb, m, caps)                                                                      \
    {                                                                                              \
        p, verb, R_CONTROL, m, caps                                                                \
    }
#define SHM_ROUTES(base, pre)                                                                      \
    CTL(base "/status", "GET", pre##STATUS, ""),                                                   \
        CTL(base "/region/*/status", "GET", pre##STATUS, "r"),                                     \
        CTL(base "/region/*/register", "POST", pre##REGISTER, "r"),                                \
        CTL(base "/unregister", "POST", pre##UNREGISTER, ""),                                      \
        CTL(base "/region/*/unregister", "POST", pre##UNREGISTER, "r")

static const struct route routes[] = {
    CTL("v2/health/live", "GET", BS_CTL_SERVER_LIVE, ""),
    CTL("v2/health/ready", "GET", BS_CTL_SERVER_READY, ""),
    CTL("v2", "GET", BS_CTL_SERVER_METADATA, ""),
    CTL("v2/models/stats", "GET", BS_CTL_MODEL_STATISTICS, ""),
    CTL("v2/models/*", "GET", BS_CTL_MODEL_METADATA, "m"),
    CTL("v2/models/*/versions/*", "GET", BS_CTL_MODEL_METADATA, "mv"),
    CTL("v2/models/*/ready", "GET", BS_CTL_MODEL_READY, "m"),
    CTL("v2/models/*/versions/*/ready", "GET", BS_CTL_MODEL_READY, "mv"),
    CTL("v2/models/*/config", "GET", BS_CTL_MODEL_CONFIG, "m"),
    CTL("v2/models/*/versions/*/config", "GET", BS_CTL_MODEL_CONFIG, "mv"),
    CTL("v2/models/*/stats", "GET", BS_CTL_MODEL_STATISTICS, "m"),
    CTL("v2/models/*/versions/*/stats", "GET", BS_CTL_MODEL_STATISTICS, "mv"),
    {"v2/models/*/infer", "POST", R_INFER, 0, "m"},
    {"v2/models/*/versions/*/infer", "POST", R_INFER, 0, "mv"},
    CTL("v2/repository/index", "POST", BS_CTL_REPOSITORY_INDEX, ""),
    CTL("v2/repository/models/*/load", "POST", BS_CTL_REPOSITORY_LOAD, "m"),
    CTL("v2/repository/models/*/unload", "POST", BS_CTL_REPOSITORY_UNLOAD, "m"),
    SHM_ROUTES("v2/systemsharedmemory", BS_CTL_SHM_),
    SHM_ROUTES("v2/cudasharedmemory", BS_CTL_CUDA_SHM_),
};

enum encoding { ENC_NONE, ENC_GZIP, ENC_DEFLATE };

struct infer;

struct job {
    bs_http_t *h;
    struct MHD_Connection *conn;
    const struct route *route;
    char *model, *version, *region; /* from the URL */
    uint8_t *body;
    size_t len, cap;
    bool too_big, dispatched, answered;
    bool replied;       /* answered on the HTTP thread at once (an error) */
    int64_t header_len; /* Inference-Header-Content-Length; -1: none */
    enum encoding enc_in, enc_out;
    int fd;
    /* An inference, decoded on the HTTP thread. */
    struct bs_http_infer hi;
    int pre_rc;
    char *pre_msg;
    /* The answer, filled on the loop. */
    unsigned status;
    struct bs_jbuf text; /* the body (JSON), when it is not an inference's output */
    bool empty_body;
    struct bs_http_answer ans;
    char *ans_model, *ans_version, *ans_id;
    struct bs_shm_ref out_shm;
    bool has_out;
    struct bs_tensor out;
    struct job *next; /* the queue */
};

/* The core's side of one inference (loop thread). */
struct infer {
    bs_http_t *h;
    struct job *job; /* NULL once answered */
    uint8_t *body;   /* the tensors point into it */
    struct bs_http_infer hi;
    struct bs_infer_request req;
    bs_core_req_t *creq;
    bs_shm_region_t *holds[BS_CODEC_MAX_INPUTS];
    bs_shm_region_t *out_hold; /* the output's range, held from decoding on */
    void *out_ptr;
    uv_poll_t *poll;
    char *model, *version; /* the URL's, which the message names */
};

struct bs_http {
    struct bs_http_options o;
    struct MHD_Daemon *daemon;
    uv_async_t async;
    pthread_mutex_t mu;
    struct job *head, *tail; /* under mu */
    bool closed;             /* under mu: the loop takes no more jobs */
    char *cert, *key, *ca;
};

/* ---- replies on the HTTP thread ------------------------------------------------- */

static void http_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    bs_log_lib(BS_LOG_VERBOSE, "http", fmt, ap);
}

static enum MHD_Result queue_bytes(struct MHD_Connection *conn, unsigned status, void *data,
                                   size_t len, const char *type, const char *allow,
                                   const char *encoding, const char *header_len)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, data, MHD_RESPMEM_MUST_FREE);
    if (r == NULL) {
        free(data);
        return MHD_NO;
    }
    if (type != NULL)
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (allow != NULL)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    if (encoding != NULL)
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_ENCODING, encoding);
    if (header_len != NULL)
        MHD_add_response_header(r, "Inference-Header-Content-Length", header_len);
    enum MHD_Result rc = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return rc;
}

/* {"error": msg} with status. */
static enum MHD_Result reply_error(struct MHD_Connection *conn, unsigned status, const char *msg,
                                   const char *allow)
{
    struct bs_jbuf b = {0};
    bs_jbuf_puts(&b, "{\"error\":");
    bs_jbuf_str(&b, msg, strlen(msg));
    bs_jbuf_puts(&b, "}");
    if (b.oom) {
        free(b.data);
        return MHD_NO;
    }
    return queue_bytes(conn, status, b.data, b.len, "application/json", allow, NULL, NULL);
}

/* ---- jobs ------------------------------------------------------------------------- */

static void job_free(struct job *j)
{
    if (j == NULL)
        return;
    free(j->model);
    free(j->version);
    free(j->region);
    free(j->body);
    bs_http_infer_free(&j->hi);
    free(j->pre_msg);
    free(j->text.data);
    free(j->ans_model);
    free(j->ans_version);
    free(j->ans_id);
    free(j->out.data);
    free(j);
}

/* Hand j to the loop; false once the loop takes no more. */
static bool job_post(bs_http_t *h, struct job *j)
{
    pthread_mutex_lock(&h->mu);
    bool ok = !h->closed;
    if (ok) {
        j->next = NULL;
        if (h->tail != NULL)
            h->tail->next = j;
        else
            h->head = j;
        h->tail = j;
        uv_async_send(&h->async);
    }
    pthread_mutex_unlock(&h->mu);
    return ok;
}

/* Match url against the routes: 0 and *route (captures filled), 404, or
 * 405 (the path exists for another verb, *allow names it). */
static unsigned route_match(struct job *j, const char *url, const char *verb, const char **allow)
{
    char path[1024];
    const char *seg[12];
    int n = 0;
    if (strlen(url) >= sizeof(path))
        return MHD_HTTP_NOT_FOUND;
    strcpy(path, url[0] == '/' ? url + 1 : url);
    size_t pl = strlen(path);
    if (pl > 0 && path[pl - 1] == '/')
        path[pl - 1] = '\0';
    for (char *s = path, *save = NULL, *t; n < 12 && (t = strtok_r(s, "/", &save)); s = NULL)
        seg[n++] = t;
    unsigned status = MHD_HTTP_NOT_FOUND;
    for (size_t r = 0; r < BS_ARRAY_LEN(routes); r++) {
        const char *caps[HTTP_MAX_CAPTURES];
        int k = 0, c = 0;
        char pat[128];
        const char *pseg[12];
        snprintf(pat, sizeof(pat), "%s", routes[r].pattern);
        for (char *s = pat, *save = NULL, *t; k < 12 && (t = strtok_r(s, "/", &save)); s = NULL)
            pseg[k++] = t;
        if (k != n)
            continue;
        bool ok = true;
        for (int i = 0; i < n && ok; i++) {
            if (strcmp(pseg[i], "*") == 0)
                caps[c++] = seg[i];
            else
                ok = strcmp(pseg[i], seg[i]) == 0;
        }
        if (!ok)
            continue;
        if (strcmp(routes[r].verb, verb) != 0) {
            status = MHD_HTTP_METHOD_NOT_ALLOWED;
            *allow = routes[r].verb;
            continue;
        }
        j->route = &routes[r];
        for (int i = 0; i < c; i++) {
            char **dst = routes[r].caps[i] == 'm'   ? &j->model
                         : routes[r].caps[i] == 'v' ? &j->version
                                                    : &j->region;
            *dst = strdup(caps[i]);
            if (*dst == NULL)
                return MHD_HTTP_INTERNAL_SERVER_ERROR;
        }
        return 0;
    }
    return status;
}

/* mutual TLS: the client's certificate, verified against the CA. */
static bool client_cert_ok(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    if (ci == NULL || ci->tls_session == NULL)
        return false;
    gnutls_session_t s = (gnutls_session_t)ci->tls_session;
    unsigned status = 0, n = 0;
    if (gnutls_certificate_get_peers(s, &n) == NULL || n == 0)
        return false;
    return gnutls_certificate_verify_peers2(s, &status) == 0 && status == 0;
}

/* Whether the Accept-Encoding list v accepts name (not with q=0). */
static bool accepts(const char *v, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = v; (p = strcasestr(p, name)) != NULL; p += n) {
        bool starts = p == v || p[-1] == ',' || p[-1] == ' ';
        const char *e = p + n;
        while (*e == ' ')
            e++;
        if (!starts || (*e != '\0' && *e != ',' && *e != ';'))
            continue;
        const char *q = *e == ';' ? strstr(e, "q=") : NULL;
        const char *comma = strchr(e, ',');
        if (q != NULL && (comma == NULL || q < comma) && strtod(q + 2, NULL) <= 0)
            return false;
        return true;
    }
    return false;
}

/* Content-Encoding (accept: false; -1 for one we cannot inflate) or what
 * Accept-Encoding lets the answer use (accept: true). */
static int parse_encoding(const char *v, bool accept)
{
    if (v == NULL)
        return ENC_NONE;
    if (accept)
        return accepts(v, "gzip") ? ENC_GZIP : accepts(v, "deflate") ? ENC_DEFLATE : ENC_NONE;
    if (strcasecmp(v, "gzip") == 0)
        return ENC_GZIP;
    if (strcasecmp(v, "deflate") == 0)
        return ENC_DEFLATE;
    return strcasecmp(v, "identity") == 0 ? ENC_NONE : -1;
}

static enum MHD_Result early_error(struct job *j, unsigned status, const char *msg,
                                   const char *allow)
{
    j->replied = true;
    return reply_error(j->conn, status, msg, allow);
}

/* The first call on a request: route, authenticate, read the headers. */
static enum MHD_Result job_begin(bs_http_t *h, struct MHD_Connection *conn, const char *url,
                                 const char *verb, void **con_cls)
{
    const char *allow = NULL;
    struct job *j = calloc(1, sizeof(*j));
    if (j == NULL)
        return MHD_NO;
    j->h = h;
    j->conn = conn;
    j->header_len = -1;
    *con_cls = j; /* freed by on_completed from here on */
    unsigned st = route_match(j, url, verb, &allow);
    if (st != 0)
        return early_error(j, st, st == MHD_HTTP_NOT_FOUND ? "not found" : "method not allowed",
                           allow);
    bool health = j->route->method == BS_CTL_SERVER_LIVE ||
                  j->route->method == BS_CTL_SERVER_READY || j->route->method == BS_CTL_MODEL_READY;
    health &= j->route->kind == R_CONTROL;
    if (h->o.tls_client_ca != NULL && !client_cert_ok(conn))
        return early_error(j, MHD_HTTP_FORBIDDEN, "a valid client certificate is required", NULL);
    if (h->o.auth != NULL && !health) {
        size_t n = 0;
        const char *v = NULL, *why = NULL;
        if (MHD_lookup_connection_value_n(conn, MHD_HEADER_KIND, "Authorization", 13, &v, &n) !=
            MHD_YES)
            v = NULL;
        if (!bs_auth_check_value(h->o.auth, v, n, &why))
            return early_error(j, MHD_HTTP_UNAUTHORIZED, why, NULL);
    }
    const char *ce = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Encoding");
    int enc = parse_encoding(ce, false);
    if (enc < 0)
        return early_error(j, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE,
                           "unsupported Content-Encoding (gzip, deflate or identity)", NULL);
    j->enc_in = (enum encoding)enc;
    j->enc_out = (enum encoding)parse_encoding(
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Accept-Encoding"), true);
    const char *hl =
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Inference-Header-Content-Length");
    if (hl != NULL) {
        char *end;
        errno = 0;
        long long v = strtoll(hl, &end, 10);
        if (errno != 0 || end == hl || *end != '\0' || v < 0)
            return early_error(j, MHD_HTTP_BAD_REQUEST,
                               "Inference-Header-Content-Length is not a byte count", NULL);
        j->header_len = v;
    }
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    j->fd = ci != NULL ? ci->connect_fd : -1;
    return MHD_YES;
}

/* Keep n more bytes of the body; past the limit they are read and dropped
 * (answering 413 before the client has sent it all would reset the
 * connection under a client still writing, which then never reads the
 * answer). */
static void job_append(struct job *j, const char *data, size_t n)
{
    size_t max = j->h->o.max_body_bytes;
    if (j->too_big || n > max - j->len) {
        j->too_big = true;
        return;
    }
    if (j->len + n > j->cap) {
        size_t cap = j->cap ? j->cap : 4096;
        while (cap < j->len + n)
            cap *= 2;
        uint8_t *b = realloc(j->body, cap);
        if (b == NULL) {
            j->too_big = true;
            return;
        }
        j->body = b;
        j->cap = cap;
    }
    memcpy(j->body + j->len, data, n);
    j->len += n;
}

/* The whole body is here: prepare it and hand the job to the loop. */
static enum MHD_Result job_dispatch(bs_http_t *h, struct job *j)
{
    struct bs_err err = {0};
    if (j->too_big) {
        char msg[160];
        snprintf(msg, sizeof(msg),
                 "the request body exceeds the limit of %zu bytes (--max-message-bytes)",
                 h->o.max_body_bytes);
        return early_error(j, 413, msg, NULL);
    }
    if (j->enc_in != ENC_NONE) {
        uint8_t *out;
        size_t n;
        if (bs_http_inflate(j->body, j->len, j->enc_in == ENC_GZIP, h->o.max_body_bytes, &out, &n,
                            &err) != 0)
            return early_error(j, bs_status_http(err.code), err.msg, NULL);
        free(j->body);
        j->body = out;
        j->len = j->cap = n;
    }
    if (j->route->kind == R_INFER) {
        j->pre_rc = bs_http_decode_infer(j->model, j->version ? j->version : "", j->body, j->len,
                                         j->header_len, &j->hi, &err);
        if (j->pre_rc != 0 && (j->pre_msg = strdup(err.msg)) == NULL)
            return MHD_NO;
    }
    j->dispatched = true;
    MHD_suspend_connection(j->conn);
    if (!job_post(h, j)) {
        MHD_resume_connection(j->conn);
        j->status = MHD_HTTP_SERVICE_UNAVAILABLE;
        j->answered = true;
        bs_jbuf_puts(&j->text, "{\"error\":\"the server is shutting down\"}");
    }
    return MHD_YES;
}

/* The loop has answered: render and send. */
static enum MHD_Result job_send(struct job *j)
{
    struct bs_jbuf b = {0};
    size_t json_len = 0;
    const char *type = "application/json";
    char hl[32];
    bool binary = false;
    if (j->has_out) {
        struct bs_err err = {0};
        j->ans.model_name = j->ans_model;
        j->ans.model_version = j->ans_version;
        j->ans.id = j->ans_id;
        j->ans.out_shm = &j->out_shm;
        if (bs_http_encode_infer(&j->ans, &j->out, &b, &json_len, &err) != 0) {
            free(b.data);
            return reply_error(j->conn, bs_status_http(err.code), err.msg, NULL);
        }
        binary = json_len < b.len;
    } else {
        b = j->text;
        j->text = (struct bs_jbuf){0};
    }
    if (binary) {
        type = "application/octet-stream";
        snprintf(hl, sizeof(hl), "%zu", json_len);
    }
    if (j->empty_body) {
        free(b.data);
        b = (struct bs_jbuf){0};
    }
    const char *enc = NULL;
    if (j->enc_out != ENC_NONE && b.len > 0) {
        size_t zl;
        uint8_t *z = bs_http_deflate((uint8_t *)b.data, b.len, j->enc_out == ENC_GZIP, &zl);
        if (z != NULL) {
            free(b.data);
            b.data = (char *)z;
            b.len = zl;
            enc = j->enc_out == ENC_GZIP ? "gzip" : "deflate";
        }
    }
    return queue_bytes(j->conn, j->status, b.data, b.len, b.len ? type : NULL, NULL, enc,
                       binary ? hl : NULL);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *verb, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    bs_http_t *h = cls;
    struct job *j = *con_cls;
    (void)version;
    if (j == NULL)
        return job_begin(h, conn, url, verb, con_cls);
    if (j->replied) { /* read and drop the rest of the body */
        *upload_size = 0;
        return MHD_YES;
    }
    if (j->answered)
        return job_send(j);
    if (*upload_size > 0) {
        job_append(j, upload, *upload_size);
        *upload_size = 0;
        return MHD_YES;
    }
    if (j->dispatched) /* resumed without an answer: cannot happen */
        return MHD_NO;
    return job_dispatch(h, j);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode why)
{
    bs_http_t *h = cls;
    struct job *j = *con_cls;
    (void)conn;
    *con_cls = NULL;
    if (j == NULL)
        return;
    if (!j->dispatched && j->route != NULL && j->route->kind == R_INFER &&
        why != MHD_REQUEST_TERMINATED_COMPLETED_OK) {
        /* an inference that never arrived whole: counted on the loop */
        struct job *lost = calloc(1, sizeof(*lost));
        static const struct route lost_route = {"", "", R_LOST, 0, ""};
        if (lost != NULL) {
            lost->h = h;
            lost->route = &lost_route;
            lost->pre_rc = why == MHD_REQUEST_TERMINATED_CLIENT_ABORT;
            if (!job_post(h, lost))
                free(lost);
        }
    }
    job_free(j);
}

/* ---- the loop's side: control methods ---------------------------------------------- */

/* Give j back to its HTTP thread; the loop must not touch it afterwards. */
static void job_answer(struct job *j)
{
    j->answered = true;
    MHD_resume_connection(j->conn);
}

static void job_fail(struct job *j, int rc, const char *msg)
{
    j->status = (unsigned)bs_status_http(rc);
    bs_jbuf_puts(&j->text, "{\"error\":");
    bs_jbuf_str(&j->text, msg, strlen(msg));
    bs_jbuf_puts(&j->text, "}");
    job_answer(j);
}

static void control_done(void *arg, int rc, const char *msg, const ProtobufCMessage *resp)
{
    struct job *j = arg;
    if (rc != 0) {
        job_fail(j, rc, msg ? msg : "error");
        return;
    }
    j->status = MHD_HTTP_OK;
    switch (j->route->method) {
    case BS_CTL_SERVER_LIVE:
        j->status = ((const Inference__ServerLiveResponse *)resp)->live ? 200 : 400;
        j->empty_body = true;
        break;
    case BS_CTL_SERVER_READY:
        j->status = ((const Inference__ServerReadyResponse *)resp)->ready ? 200 : 400;
        j->empty_body = true;
        break;
    case BS_CTL_MODEL_READY:
        j->status = ((const Inference__ModelReadyResponse *)resp)->ready ? 200 : 400;
        j->empty_body = true;
        break;
    case BS_CTL_MODEL_CONFIG: /* Triton answers the configuration itself */
        bs_pbjson_write_field(&j->text, resp, "config", false);
        break;
    case BS_CTL_REPOSITORY_INDEX: /* a top-level array */
        bs_pbjson_write_field(&j->text, resp, "models", false);
        break;
    case BS_CTL_SHM_STATUS:
    case BS_CTL_CUDA_SHM_STATUS: /* an array of the regions */
        bs_pbjson_write_field(&j->text, resp, "regions", true);
        break;
    case BS_CTL_REPOSITORY_LOAD:
    case BS_CTL_REPOSITORY_UNLOAD:
    case BS_CTL_SHM_REGISTER:
    case BS_CTL_SHM_UNREGISTER:
    case BS_CTL_CUDA_SHM_REGISTER:
    case BS_CTL_CUDA_SHM_UNREGISTER:
        j->empty_body = true;
        break;
    default:
        bs_pbjson_write(&j->text, resp);
    }
    if (j->text.oom) {
        free(j->text.data);
        j->text = (struct bs_jbuf){0};
        job_fail(j, BS_ENOMEM, "out of memory");
        return;
    }
    job_answer(j);
}

static int set_string(ProtobufCMessage *m, const char *field, const char *v)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field_by_name(m->descriptor, field);
    if (f == NULL || f->type != PROTOBUF_C_TYPE_STRING)
        return -1;
    *(const char **)((char *)m + f->offset) = v;
    return 0;
}

static size_t base64_decode(const char *s, uint8_t *out)
{
    uint32_t acc = 0;
    int bits = 0;
    size_t n = 0;
    for (; *s; s++) {
        const char *tab = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        const char *p = strchr(tab, *s);
        if (*s == '=' || p == NULL)
            continue;
        acc = acc << 6 | (uint32_t)(p - tab);
        if ((bits += 6) >= 8) {
            bits -= 8;
            out[n++] = (uint8_t)(acc >> bits);
        }
    }
    return n;
}

/* A JSON member onto the message's field of the same name (scalars, strings,
 * Triton's {"b64": ...} bytes). */
static int set_member(ProtobufCMessage *m, const struct bs_json *v, void **owned,
                      struct bs_err *err)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field_by_name(m->descriptor, v->key);
    char *p = f ? (char *)m + f->offset : NULL;
    if (f == NULL || f->label == PROTOBUF_C_LABEL_REPEATED)
        return bs_err_set(err, BS_EINVAL, "unexpected field '%.64s'", v->key);
    bool is_uint = f->type == PROTOBUF_C_TYPE_UINT64 || f->type == PROTOBUF_C_TYPE_UINT32;
    switch (f->type) {
    case PROTOBUF_C_TYPE_STRING:
        if (v->type != BS_JSON_STRING)
            break;
        *(const char **)p = v->string;
        return 0;
    case PROTOBUF_C_TYPE_BOOL:
        if (v->type != BS_JSON_BOOL)
            break;
        *(protobuf_c_boolean *)p = v->boolean;
        return 0;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_UINT32:
        if (v->type != BS_JSON_NUMBER || !v->is_integer || (is_uint && v->integer < 0))
            break;
        if (f->type == PROTOBUF_C_TYPE_INT64 || f->type == PROTOBUF_C_TYPE_UINT64)
            *(int64_t *)p = v->integer;
        else
            *(int32_t *)p = (int32_t)v->integer;
        return 0;
    case PROTOBUF_C_TYPE_BYTES: {
        const struct bs_json *b64 = bs_json_get(v, "b64");
        if (b64 == NULL || b64->type != BS_JSON_STRING)
            break;
        uint8_t *d = malloc(b64->len + 1);
        if (d == NULL)
            return bs_err_set(err, BS_ENOMEM, "out of memory");
        *owned = d;
        ((ProtobufCBinaryData *)p)->data = d;
        ((ProtobufCBinaryData *)p)->len = base64_decode(b64->string, d);
        return 0;
    }
    default:
        break;
    }
    return bs_err_set(err, BS_EINVAL, "field '%.64s' has the wrong type", v->key);
}

/* A repository load/unload's parameters: {"key": string|bool|int}. */
static int set_repo_params(ProtobufCMessage *m, const struct bs_json *obj, void **owned,
                           struct bs_err *err)
{
    typedef Inference__RepositoryModelLoadRequest__ParametersEntry entry_t;
    size_t n = obj->type == BS_JSON_OBJECT ? obj->len : 0;
    if (obj->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EINVAL, "'parameters' must be an object");
    struct pe {
        entry_t e;
        Inference__ModelRepositoryParameter v;
    } *ps = calloc(n ? n : 1, sizeof(*ps));
    entry_t **list = calloc(n ? n : 1, sizeof(*list));
    owned[0] = ps;
    owned[1] = list;
    if (ps == NULL || list == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    size_t i = 0;
    for (const struct bs_json *v = obj->child; v != NULL; v = v->next, i++) {
        ps[i].e = (entry_t)INFERENCE__REPOSITORY_MODEL_LOAD_REQUEST__PARAMETERS_ENTRY__INIT;
        ps[i].v = (Inference__ModelRepositoryParameter)INFERENCE__MODEL_REPOSITORY_PARAMETER__INIT;
        ps[i].e.key = (char *)v->key;
        ps[i].e.value = &ps[i].v;
        if (v->type == BS_JSON_STRING) {
            ps[i].v.parameter_choice_case =
                INFERENCE__MODEL_REPOSITORY_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
            ps[i].v.string_param = (char *)v->string;
        } else if (v->type == BS_JSON_BOOL) {
            ps[i].v.parameter_choice_case =
                INFERENCE__MODEL_REPOSITORY_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM;
            ps[i].v.bool_param = v->boolean;
        } else if (v->type == BS_JSON_NUMBER && v->is_integer) {
            ps[i].v.parameter_choice_case =
                INFERENCE__MODEL_REPOSITORY_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
            ps[i].v.int64_param = v->integer;
        } else {
            return bs_err_set(err, BS_EINVAL, "parameter '%.64s' must be a string, bool or integer",
                              v->key);
        }
        list[i] = &ps[i].e;
    }
    /* load and unload requests share the layout of fields 1-3 */
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field_by_name(m->descriptor, "parameters");
    *(size_t *)((char *)m + f->quantifier_offset) = n;
    *(entry_t ***)((char *)m + f->offset) = list;
    return 0;
}

/* The control request of j: URL captures and the JSON body's members. */
static void run_control(bs_http_t *h, struct job *j)
{
    const ProtobufCMessageDescriptor *d = bs_control_request_desc(j->route->method);
    ProtobufCMessage *m = calloc(1, d->sizeof_message);
    bs_json_doc_t *doc = NULL;
    void *owned[3] = {0};
    struct bs_err err = {0};
    int rc = 0;
    if (m == NULL) {
        job_fail(j, BS_ENOMEM, "out of memory");
        return;
    }
    protobuf_c_message_init(d, m);
    if (j->model != NULL) {
        if (set_string(m, "name", j->model) != 0)
            set_string(m, "model_name", j->model);
    }
    if (j->version != NULL)
        set_string(m, "version", j->version);
    if (j->region != NULL)
        set_string(m, "name", j->region);
    if (j->len > 0 && (rc = bs_json_parse(&doc, (const char *)j->body, j->len, 8, &err)) != 0)
        rc = bs_err_set(&err, BS_EINVAL, "malformed JSON body: %s", err.msg);
    const struct bs_json *root = doc ? bs_json_doc_root(doc) : NULL;
    if (rc == 0 && root != NULL && root->type != BS_JSON_OBJECT)
        rc = bs_err_set(&err, BS_EINVAL, "the body must be a JSON object");
    for (const struct bs_json *v = root ? root->child : NULL; rc == 0 && v; v = v->next) {
        if (strcmp(v->key, "parameters") == 0 && (j->route->method == BS_CTL_REPOSITORY_LOAD ||
                                                  j->route->method == BS_CTL_REPOSITORY_UNLOAD))
            rc = set_repo_params(m, v, owned, &err);
        else
            rc = set_member(m, v, &owned[2], &err);
    }
    if (rc != 0)
        job_fail(j, rc, err.msg);
    else
        bs_control_call(h->o.control, j->route->method, m, control_done, j);
    for (int i = 0; i < 3; i++)
        free(owned[i]);
    free(m);
    bs_json_doc_free(doc);
}

/* ---- the loop's side: inferences ---------------------------------------------------- */

static void poll_closed(uv_handle_t *p)
{
    free(p);
}

static void infer_unwatch(struct infer *in)
{
    if (in->poll != NULL) {
        uv_poll_stop(in->poll); /* removes the fd from the loop's epoll now */
        uv_close((uv_handle_t *)in->poll, poll_closed);
        in->poll = NULL;
    }
}

static void on_disconnect(uv_poll_t *p, int status, int events)
{
    struct infer *in = p->data;
    (void)status;
    (void)events;
    infer_unwatch(in);
    if (in->job != NULL)
        bs_core_cancel(in->h->o.core, in->creq); /* reply_done follows */
}

/* While the core has the request (the connection suspended, so that
 * libmicrohttpd does not watch it): a client that goes away cancels it. */
static void infer_watch(struct infer *in, int fd)
{
    if (fd < 0 || (in->poll = malloc(sizeof(*in->poll))) == NULL)
        return;
    if (uv_poll_init(in->h->o.loop, in->poll, fd) != 0) {
        free(in->poll);
        in->poll = NULL;
        return;
    }
    in->poll->data = in;
    uv_poll_start(in->poll, UV_DISCONNECT, on_disconnect);
}

static int reply_output(void *arg, const struct bs_tensor *out, struct bs_err *err)
{
    struct infer *in = arg;
    struct job *j = in->job;
    const struct bs_shm_ref *ref = &in->hi.out_shm;
    j->ans.block_cache = bs_core_block_cache(in->creq);
    j->ans.binary_output = in->hi.binary_output;
    j->out_shm = *ref;
    if (!in->req.want_output)
        return 0;
    if (ref->given) {
        int rc = bs_shm_write_held(in->out_ptr, ref, out, err);
        if (rc != 0)
            return rc;
    }
    j->out = *out;
    j->out.data = NULL;
    size_t n = bs_tensor_nbytes(out);
    if (!ref->given && n > 0) {
        j->out.data = malloc(n);
        if (j->out.data == NULL)
            return bs_err_set(err, BS_ENOMEM, "out of memory for a %zu-byte output", n);
        memcpy(j->out.data, out->data, n);
    }
    j->has_out = true;
    return 0;
}

static void reply_done(void *arg, int rc, const char *msg)
{
    struct infer *in = arg;
    struct job *j = in->job;
    infer_unwatch(in);
    in->job = NULL;
    bs_log(BS_LOG_VERBOSE, in->req.id[0] ? in->req.id : NULL, "model %s (http): %s",
           in->req.model_name, rc == 0 ? "ok" : msg);
    if (rc != 0) {
        free(j->out.data);
        j->out.data = NULL;
        j->has_out = false;
        job_fail(j, rc, msg);
        return;
    }
    j->ans_model = strdup(in->req.model_name);
    j->ans_version = strdup(bs_core_version(in->creq)); /* the version that served it */
    j->ans_id = strdup(in->req.id);
    if (j->ans_model == NULL || j->ans_version == NULL || j->ans_id == NULL) {
        j->has_out = false;
        job_fail(j, BS_ENOMEM, "out of memory");
        return;
    }
    j->status = MHD_HTTP_OK;
    job_answer(j);
}

static void infer_free(struct infer *in)
{
    for (int i = 0; i < BS_CODEC_MAX_INPUTS; i++)
        if (in->holds[i] != NULL)
            bs_shm_release(in->holds[i]);
    if (in->out_hold != NULL)
        bs_shm_release(in->out_hold);
    bs_codec_request_free(&in->req);
    bs_http_infer_free(&in->hi);
    free(in->body);
    free(in->model);
    free(in->version);
    free(in);
}

static void reply_release(void *arg)
{
    infer_free(arg);
}

static const struct bs_core_reply core_reply = {
    .on_output = reply_output, .on_done = reply_done, .on_release = reply_release};

static void run_infer(bs_http_t *h, struct job *j)
{
    struct bs_err err = {0};
    int rc;
    if (j->pre_rc != 0) {
        bs_core_count_failure(h->o.core, j->model, j->version, j->pre_rc);
        job_fail(j, j->pre_rc, j->pre_msg);
        return;
    }
    struct infer *in = calloc(1, sizeof(*in));
    if (in == NULL) {
        bs_core_count_failure(h->o.core, j->model, j->version, BS_ENOMEM);
        job_fail(j, BS_ENOMEM, "out of memory");
        return;
    }
    in->h = h;
    in->hi = j->hi; /* the request and the body its tensors point into move here */
    in->body = j->body;
    in->model = j->model;
    in->version = j->version;
    memset(&j->hi, 0, sizeof(j->hi));
    j->body = NULL;
    j->model = j->version = NULL;
    bool shm = false;
    for (int i = 0; i < BS_CODEC_MAX_INPUTS; i++)
        shm |= in->hi.in_shm[i].given;
    if ((shm || in->hi.out_shm.given) && h->o.shm == NULL)
        rc = bs_err_set(&err, BS_EINVAL, "shared memory is not served here");
    else
        rc = bs_codec_decode_infer_msg(in->hi.msg, &h->o.limits, &in->req, &err);
    if (rc == 0 && shm)
        rc = bs_shm_bind_inputs(h->o.shm, in->hi.in_shm, in->req.inputs, in->req.n_inputs,
                                in->holds, &err);
    if (rc == 0 && in->hi.out_shm.given && /* held until released: an unregister cannot drop it */
        (rc = bs_shm_acquire(h->o.shm, &in->hi.out_shm, &in->out_hold, &in->out_ptr, &err)) != 0)
        bs_err_wrap(&err, "output 'output'"); /* named as gRPC names it */
    if (rc == 0 && in->req.stream_intermediate)
        rc = bs_err_set(&err, BS_EINVAL, "stream_intermediate needs ModelStreamInfer (gRPC)");
    if (rc != 0) {
        bs_core_count_failure(h->o.core, in->model, in->version, rc);
    } else {
        struct bs_core_request cr = {
            .model_name = in->req.model_name,
            .model_version = in->req.model_version,
            .inputs = in->req.inputs,
            .n_inputs = in->req.n_inputs,
            .has_out_dtype = in->req.has_out_dtype,
            .out_dtype = in->req.out_dtype,
            .priority = in->req.priority,
            .timeout_us = in->req.timeout_us,
            .deadline_ns = INT64_MAX,
            .seq = in->req.seq,
        };
        in->job = j;
        rc = bs_core_submit(h->o.core, &cr, &core_reply, in, &in->creq, &err); /* counted */
    }
    if (rc != 0) {
        infer_free(in);
        job_fail(j, rc, err.msg);
        return;
    }
    infer_watch(in, j->fd);
}

static void run_job(bs_http_t *h, struct job *j)
{
    switch (j->route->kind) {
    case R_CONTROL:
        run_control(h, j);
        break;
    case R_INFER:
        run_infer(h, j);
        break;
    case R_LOST:
        bs_core_count_lost(h->o.core, j->pre_rc != 0);
        free(j);
        break;
    }
}

static void on_async(uv_async_t *a)
{
    bs_http_t *h = a->data;
    pthread_mutex_lock(&h->mu);
    struct job *j = h->head;
    h->head = h->tail = NULL;
    pthread_mutex_unlock(&h->mu);
    for (struct job *next; j != NULL; j = next) {
        next = j->next;
        run_job(h, j);
    }
}

/* ---- lifecycle ------------------------------------------------------------------------ */

static struct MHD_Daemon *start_daemon(bs_http_t *h, const struct sockaddr_storage *ss)
{
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME |
                     MHD_USE_ERROR_LOG;
    if (ss->ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    struct MHD_OptionItem tls[4] = {{MHD_OPTION_END, 0, NULL}};
    int n = 0;
    if (h->cert != NULL) {
        flags |= MHD_USE_TLS;
        tls[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, h->cert};
        tls[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, h->key};
        if (h->ca != NULL)
            tls[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_TRUST, 0, h->ca};
    }
    tls[n] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    return MHD_start_daemon(
        flags, 0, NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER, http_log, NULL,
        MHD_OPTION_SOCK_ADDR, (const struct sockaddr *)ss, MHD_OPTION_THREAD_POOL_SIZE,
        (unsigned)HTTP_THREADS, MHD_OPTION_CONNECTION_LIMIT, (unsigned)HTTP_MAX_CONNECTIONS,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)HTTP_TIMEOUT_S, MHD_OPTION_NOTIFY_COMPLETED,
        on_completed, h, MHD_OPTION_ARRAY, tls, MHD_OPTION_END);
}

static char *dup_or_null(const char *s, bool *fail)
{
    char *d = s ? strdup(s) : NULL;
    *fail |= s != NULL && d == NULL;
    return d;
}

int bs_http_start(bs_http_t **hp, const struct bs_http_options *o, int *bound, struct bs_err *err)
{
    struct sockaddr_storage ss;
    int rc;
    bool fail = false;
    *hp = NULL;
    if ((rc = bs_http_resolve("--http-address", o->address, o->port, &ss, err)) != 0)
        return rc;
    if (o->tls_cert != NULL && !MHD_is_feature_supported(MHD_FEATURE_TLS))
        return bs_err_set(err, BS_EINVAL, "HTTPS: this libmicrohttpd has no TLS");
    bs_http_t *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    h->o = *o;
    h->cert = dup_or_null(o->tls_cert, &fail);
    h->key = dup_or_null(o->tls_key, &fail);
    h->ca = dup_or_null(o->tls_client_ca, &fail);
    if (fail) {
        rc = bs_err_set(err, BS_ENOMEM, "out of memory");
        goto fail_copies;
    }
    h->o.tls_cert = h->cert;
    h->o.tls_key = h->key;
    h->o.tls_client_ca = h->ca;
    pthread_mutex_init(&h->mu, NULL);
    if (uv_async_init(o->loop, &h->async, on_async) != 0) {
        rc = bs_err_set(err, BS_EIO, "http: cannot create the loop handle");
        goto fail_async;
    }
    h->async.data = h;
    h->daemon = start_daemon(h, &ss);
    if (h->daemon == NULL) {
        rc = bs_err_set(err, BS_EIO,
                        "http: cannot listen on %s:%d (in use? --http-port picks another, "
                        "--http-port 0 disables)",
                        o->address, o->port);
        h->closed = true;
        uv_close((uv_handle_t *)&h->async, NULL); /* h lives until bs_http_free */
        *hp = h;
        return rc;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_BIND_PORT);
    *bound = info != NULL ? info->port : o->port;
    *hp = h;
    return 0;
fail_async:
    pthread_mutex_destroy(&h->mu);
fail_copies:
    free(h->cert);
    free(h->key);
    free(h->ca);
    free(h);
    return rc;
}

void bs_http_shutdown(bs_http_t *h)
{
    if (h == NULL)
        return;
    pthread_mutex_lock(&h->mu);
    bool was = h->closed;
    h->closed = true;
    pthread_mutex_unlock(&h->mu);
    if (was)
        return;
    on_async(&h->async); /* what was posted before: answered (the core refuses now) */
    uv_close((uv_handle_t *)&h->async, NULL);
}

void bs_http_free(bs_http_t *h)
{
    if (h == NULL)
        return;
    if (h->daemon != NULL) {
        /* answers already resumed go out before the connections close */
        for (int i = 0; i < 100; i++) {
            const union MHD_DaemonInfo *info =
                MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
            if (info == NULL || info->num_connections == 0)
                break;
            nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
        }
        MHD_stop_daemon(h->daemon);
    }
    pthread_mutex_destroy(&h->mu);
    free(h->cert);
    if (h->key != NULL)
        explicit_bzero(h->key, strlen(h->key));
    free(h->key);
    free(h->ca);
    free(h);
}
