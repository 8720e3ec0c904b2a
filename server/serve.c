/* blockserve serve: the gRPC inference server. The libuv loop owns every
 * object here; compute runs on the batchers' worker threads. */
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "auth.h"
#include "control.h"
#include "descriptors.h"
#include "health_service.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "metrics_http.h"
#include "opts.h"
#include "reflection_service.h"
#include "repository.h"
#include "rpc.h"
#include "secure.h"
#include "serve.h"
#include "service.h"

#define MAX_REPOS       16
#define MAX_LOAD_MODELS 256

struct serve_opts {
    const char *address;
    int port;
    const char *repos[MAX_REPOS];
    int n_repos;
    int control_mode; /* enum bs_repo_control */
    const char *load_models[MAX_LOAD_MODELS];
    int n_load_models;
    int poll_secs;
    const char *device;
    const char *dtype; /* NULL: the backend's default */
    const char *activations;
    const char *graphs;
    bool tf32;
    int threads;
    int verbose;
    int json_logs;
    int max_message_bytes;
    int64_t max_tensor_elements;
    int grace_seconds;
    int max_streams;
    int max_inflight;
    int max_stream_pending;
    int64_t max_stream_unsent, max_unsent;
    int64_t block_cache_bytes;
    struct bs_serving_config defaults;
    int metrics_port;            /* 0: no metrics */
    bool metrics_port_given;     /* a busy default port only warns */
    const char *metrics_address; /* NULL: the gRPC address */
    const char *tls_cert, *tls_key, *tls_client_ca, *token_file;
    int http_port;            /* 0: no HTTP */
    bool http_port_given;     /* a busy default port only warns */
    const char *http_address; /* NULL: the gRPC address */
};

struct server {
    uv_loop_t *loop;
    struct serve_opts opts;
    struct bs_backend be;
    bs_repository_t *repo;
    bs_core_t *core;
    bs_control_t *control; /* the control plane every front end answers from */
    bs_shm_t *shm;         /* system shared memory regions, shared by every front end */
    bs_service_t *svc;
    bs_rpc_server_t *rpc;
    bs_health_service_t *health;
    bs_reflection_t *refl;
    bs_reflection_service_t *refl_svc;
    bs_auth_t *auth; /* NULL: no bearer token */
    bs_metrics_t *metrics;
    bs_metrics_http_t *metrics_http;
    bs_http_t *http; /* the HTTP/REST front end (NULL: none) */
    struct bs_secure sec;
    uv_signal_t sigint, sigterm;
    uv_timer_t grace;
    bool stopping;
    bool rpc_down;
    bool handles_ready; /* sigint, sigterm and grace are initialised */
};

#define AT(kind, field) BS_OPTS_AT(kind, struct serve_opts, field)
#define GIVEN(field)    BS_OPTS_GIVEN(struct serve_opts, field)

static const char *const log_formats[] = {"text", "json", NULL};
/* in the order of enum bs_repo_control */
static const char *const control_modes[] = {"none", "poll", "explicit", NULL};

/* blockserve serve's options, as --help lists them. */
static const struct bs_opt serve_rows[] = {
    {"--grpc-port", AT(INT, port), .lo = 0, .hi = 65535, .def = "8001", .metavar = "N",
     .help = "port (default %D; 0 picks a free one)"},
    {"--grpc-address", AT(STR, address), .def = "0.0.0.0", .metavar = "HOST",
     .help = "address to bind"},
    {"--model-repository", AT(LIST, repos), .hi = MAX_REPOS,
     BS_OPTS_COUNT(struct serve_opts, n_repos), .metavar = "DIR",
     .help = "serve each model directory in DIR (repeatable);\n"
             "without one, the built-in models (generated weights)"},
    {"--model-control-mode", AT(ENUM, control_mode), .choices = control_modes, .def = "none",
     .help = "none: load every model at start; poll: ... and\n"
             "follow the folders' changes; explicit: load what\n"
             "--load-model names, then RepositoryModelLoad/Unload"},
    {"--load-model", AT(LIST, load_models), .hi = MAX_LOAD_MODELS,
     BS_OPTS_COUNT(struct serve_opts, n_load_models), .metavar = "NAME",
     .help = "explicit mode: load this model at start\n(repeatable; \"*\": every model)"},
    {"--repository-poll-secs", AT(INT, poll_secs), .lo = 1, .hi = 86400, .def = "15",
     .metavar = "N", .help = "poll mode: rescan the folders every N s"},
    {"--device", AT(STR, device), .def = "auto", .metavar = "auto|cpu|cuda",
     .help = "compute device"},
    {"--threads", AT(INT, threads), .lo = 0, .hi = 1024, .metavar = "N",
     .help = "compute threads (default: one per core)"},
    {"--dtype", AT(STR, dtype), .metavar = "fp32|bf16|fp16",
     .help = "compute dtype (default: cpu fp32, cuda bf16)"},
    {"--activations", AT(STR, activations), .def = "auto", .metavar = "auto|fp32|compute",
     .help = "activation dtype between ops: compute (the compute dtype), fp32 (default: cpu "
             "fp32, cuda compute)"},
    {"--graphs", AT(STR, graphs), .def = "auto", .metavar = "auto|on|off|emulate",
     .help = "run transformer and attention blocks through launch graphs, captured per model and "
             "batch shape (default: cuda on, cpu off; emulate: the engine replays the ops, for "
             "testing)"},
    {"--tf32", AT(FLAG, tf32), .help = "let FP32 GEMMs use TF32 tensor cores (cuda)"},
    {"--log-verbose", AT(INT, verbose), .lo = 0, .hi = 9, .metavar = "N",
     .help = "0: info, 1: every request"},
    {"--log-format", AT(ENUM, json_logs), .choices = log_formats, .def = "text",
     .help = "log lines"},
    {"--max-message-bytes", AT(INT, max_message_bytes), .lo = 1024, .hi = INT32_MAX,
     .def = "67108864", .metavar = "N", .help = "gRPC message and HTTP body limit"},
    {"--max-tensor-elements", AT(INT64, max_tensor_elements), .lo = 1, .hi = (int64_t)1 << 34,
     .def = "134217728", .metavar = "N", .help = "per input tensor"},
    {"--max-concurrent-streams", AT(INT, max_streams), .lo = 1, .hi = 1 << 20, .def = "256",
     .metavar = "N", .help = "per connection"},
    {"--max-inflight", AT(INT, max_inflight), .lo = 1, .hi = 1 << 24, .def = "4096", .metavar = "N",
     .help = "inference requests admitted and not answered,\n"
             "server-wide; more: RESOURCE_EXHAUSTED"},
    {"--max-stream-pending", AT(INT, max_stream_pending), .lo = 1, .hi = 1 << 20, .def = "16",
     .metavar = "N",
     .help = "a stream stops reading while N of its requests are\n"
             "in progress or answered but unsent"},
    {"--max-stream-unsent-bytes", AT(INT64, max_stream_unsent), .lo = 1, .hi = (int64_t)1 << 40,
     .def = "67108864", .metavar = "N",
     .help = "... or while its unsent answers hold N bytes\n(default %D)"},
    {"--max-unsent-bytes", AT(INT64, max_unsent), .lo = 1, .hi = (int64_t)1 << 40,
     .def = "536870912", .metavar = "N",
     .help = "server-wide bound on unsent answers: streams stop\n"
             "reading, new inferences get RESOURCE_EXHAUSTED\n(default %D)"},
    {"--block-cache-bytes", AT(INT64, block_cache_bytes), .lo = 0, .hi = (int64_t)1 << 50,
     .def = "1073741824", .metavar = "N",
     .help = "server-wide budget of the denoising sequences'\nblock caches (0: no caching)\n"
             "(default %D)"},
    {"--grace-seconds", AT(INT, grace_seconds), .lo = 0, .hi = 86400, .def = "30", .metavar = "N",
     .help = "on SIGTERM/SIGINT, time to finish queued work"},
    {"--max-batch-size", AT(INT, defaults.max_batch_size), .lo = 1, .hi = 1024, .def = "8",
     .metavar = "N", .help = "default for models"},
    {"--max-queue-delay-us", AT(INT64, defaults.max_queue_delay_us), .lo = 0, .hi = 60000000,
     .def = "2000", .metavar = "N", .help = "default batching delay"},
    {"--max-queue-size", AT(INT, defaults.max_queue_size), .lo = 1, .hi = 1000000, .def = "256",
     .metavar = "N", .help = "default queue bound"},
    {"--http-port", AT(INT, http_port), .lo = 0, .hi = 65535, .def = "8000", GIVEN(http_port_given),
     .metavar = "N",
     .help = "KServe v2 HTTP/REST on this port (default %D, busy:\n"
             "a warning; 0: no HTTP); TLS and the token as gRPC"},
    {"--http-address", AT(STR, http_address), .metavar = "HOST",
     .help = "address for HTTP (default: --grpc-address)"},
    {"--metrics-port", AT(INT, metrics_port), .lo = 0, .hi = 65535, .def = "8002",
     GIVEN(metrics_port_given), .metavar = "N",
     .help = "Prometheus metrics on http://HOST:N/metrics (default\n"
             "%D, busy: a warning; 0: no metrics)"},
    {"--metrics-address", AT(STR, metrics_address), .metavar = "HOST",
     .help = "address for metrics (default: --grpc-address)"},
    {"--no-metrics", AT(SET, metrics_port), .lo = 0, GIVEN(metrics_port_given),
     .help = "no metrics endpoint (same as --metrics-port 0)"},
    {"--tls-cert", AT(STR, tls_cert), .metavar = "FILE",
     .help = "TLS on the gRPC port: certificate chain (PEM)"},
    {"--tls-key", AT(STR, tls_key), .metavar = "FILE",
     .help = "... and its key (PEM, unencrypted)"},
    {"--tls-client-ca", AT(STR, tls_client_ca), .metavar = "FILE",
     .help = "mutual TLS: require client certificates from this CA"},
    {"--auth-token-file", AT(STR, token_file), .metavar = "FILE",
     .help = "every call but health checks needs the metadata\n"
             "\"authorization: Bearer <token>\" (token: the file,\n"
             "trailing whitespace stripped)"},
    {"--help", .kind = BS_OPT_HELP, .alias = "-h", .help = "this help"},
    BS_OPTS_NULL,
};

static const struct bs_opt *const serve_tables[] = {serve_rows, NULL};
static const struct bs_opts_cmd serve_cmd = {.tables = serve_tables}; /* no positional */

static void usage(FILE *f)
{
    fprintf(f, "usage: blockserve [serve] [options]\n");
    bs_opts_help(f, serve_rows, 30);
}

static int parse_opts(int argc, char **argv, struct serve_opts *o)
{
    struct bs_opts_err e;
    memset(o, 0, sizeof(*o));
    int rc = bs_opts_parse(&serve_cmd, o, argc, argv, &e);
    if (rc == BS_OPTS_HELP) {
        usage(stdout);
        exit(0);
    }
    if (rc == BS_OPTS_OK && o->n_load_models > 0 && o->control_mode != BS_REPO_CONTROL_EXPLICIT) {
        fprintf(stderr, "blockserve: --load-model needs --model-control-mode explicit\n");
        return -1;
    }
    if (rc == BS_OPTS_OK)
        return 0;
    if (rc == BS_OPTS_EVALUE && e.opt->kind != BS_OPT_ENUM) /* a number out of range */
        fprintf(stderr, "blockserve: %s\n", e.msg);
    else if (e.value == NULL)
        fprintf(stderr, "blockserve: unknown option or missing value: %s\n", e.arg);
    else
        fprintf(stderr, "blockserve: unknown option or bad value: %s %s\n", e.arg, e.value);
    return -1;
}

static void on_rpc_down(void *arg)
{
    struct server *s = arg;
    s->rpc_down = true;
    if (s->handles_ready) { /* not after a start-up failure */
        uv_close((uv_handle_t *)&s->sigint, NULL);
        uv_close((uv_handle_t *)&s->sigterm, NULL);
        uv_close((uv_handle_t *)&s->grace, NULL);
    }
    bs_log(BS_LOG_INFO, NULL, "stopped");
}

static void shut_transport(struct server *s)
{
    if (s->rpc != NULL && !s->rpc_down) {
        uv_timer_stop(&s->grace);
        /* From here gRPC core resets (CANCELLED) the calls it receives
         * before its GOAWAY reaches their client, without handing them
         * over; the time lets a client tell those apart (tests/stress). */
        bs_log(BS_LOG_INFO, NULL, "stopping the gRPC transport (monotonic clock %.6f s)",
               (double)uv_hrtime() / 1e9);
        bs_service_shutdown(s->svc); /* every admitted request gets its own answer first */
        bs_log(BS_LOG_INFO, NULL, "stopping the HTTP front end");
        bs_http_shutdown(s->http);
        bs_rpc_server_shutdown(s->rpc, on_rpc_down, s);
    }
}

static void on_drained(void *arg)
{
    struct server *s = arg;
    bs_log(BS_LOG_INFO, NULL, "queued work finished");
    shut_transport(s);
}

static void on_grace(uv_timer_t *t)
{
    struct server *s = t->data;
    bs_log(BS_LOG_WARN, NULL, "grace period over with %d inferences unanswered: cancelling",
           bs_core_in_flight(s->core));
    shut_transport(s);
}

static void on_signal(uv_signal_t *h, int signum)
{
    struct server *s = h->data;
    if (s->stopping) {
        bs_log(BS_LOG_WARN, NULL, "second signal: stopping now");
        shut_transport(s);
        return;
    }
    s->stopping = true;
    /* The time says from when a request is refused: one that arrived
     * between the signal and this handler was admitted and is answered
     * (tests/stress tells those apart). */
    bs_log(BS_LOG_INFO, NULL,
           "%s: no new requests; finishing queued work (grace %d s; monotonic clock %.6f s)",
           signum == SIGINT ? "SIGINT" : "SIGTERM", s->opts.grace_seconds,
           (double)uv_hrtime() / 1e9);
    bs_core_stop_accepting(s->core);
    bs_health_service_set(s->health, "", false);
    bs_health_service_set(s->health, "inference.GRPCInferenceService", false);
    uv_timer_start(&s->grace, on_grace, (uint64_t)s->opts.grace_seconds * 1000, 0);
    bs_repository_drain(s->repo, on_drained, s);
}

/* The metrics endpoint; a busy default port only costs the metrics. */
static int start_metrics(struct server *s, struct bs_err *err)
{
    const char *address = s->opts.metrics_address ? s->opts.metrics_address : s->opts.address;
    int port = 0;
    if (s->opts.metrics_port == 0)
        return 0;
    if (bs_metrics_http_start(&s->metrics_http, s->metrics, address, s->opts.metrics_port, &port,
                              err) != 0) {
        if (s->opts.metrics_port_given || s->opts.metrics_address != NULL || err->code != BS_EIO)
            return err->code; /* only the default port being busy is forgiven */
        bs_log(BS_LOG_WARN, NULL, "%s; serving without metrics", err->msg);
        return 0;
    }
    bs_log(BS_LOG_INFO, NULL, "metrics on http://%s%s%s:%d/metrics",
           strchr(address, ':') ? "[" : "", address, strchr(address, ':') ? "]" : "", port);
    return 0;
}

/* The HTTP/REST front end; a busy default port only costs HTTP. */
static int start_http(struct server *s, struct bs_err *err)
{
    const char *address = s->opts.http_address ? s->opts.http_address : s->opts.address;
    int port = 0;
    if (s->opts.http_port == 0)
        return 0;
    struct bs_http_options ho = {
        .address = address,
        .port = s->opts.http_port,
        .loop = s->loop,
        .core = s->core,
        .control = s->control,
        .shm = s->shm,
        .auth = s->auth,
        .limits = {s->opts.max_tensor_elements, BS_CODEC_MAX_INPUTS},
        .max_body_bytes = (size_t)s->opts.max_message_bytes,
        .tls_cert = s->sec.cert_chain,
        .tls_key = s->sec.key,
        .tls_client_ca = s->sec.client_ca,
    };
    if (bs_http_start(&s->http, &ho, &port, err) != 0) {
        if (s->opts.http_port_given || s->opts.http_address != NULL || err->code != BS_EIO)
            return err->code; /* only the default port being busy is forgiven */
        bs_log(BS_LOG_WARN, NULL, "%s; serving without HTTP", err->msg);
        return 0;
    }
    bs_log(BS_LOG_INFO, NULL, "HTTP on %s://%s%s%s:%d/v2", s->opts.tls_cert ? "https" : "http",
           strchr(address, ':') ? "[" : "", address, strchr(address, ':') ? "]" : "", port);
    return 0;
}

/* Before anything loads: read and check the TLS files and the token (so a
 * bad file fails at once), and create the metrics registry, which reads the
 * backend (s->be, set up by start) only when rendering. */
static int prepare(struct server *s, struct bs_err *err)
{
    if (bs_secure_load_tls(&s->sec, s->opts.tls_cert, s->opts.tls_key, s->opts.tls_client_ca,
                           err) != 0 ||
        bs_secure_load_token(&s->sec, s->opts.token_file, err) != 0)
        return err->code;
    if (s->opts.metrics_port > 0 && bs_metrics_init(&s->metrics, &s->be, err) != 0)
        return err->code;
    return 0;
}

/* The services the gRPC transport offers; what list_services reports. */
static const char *const grpc_services[] = {
    "inference.GRPCInferenceService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
};

#define MAX_ROWS 40

/* Health, reflection and the bearer token: the parts the transport runs
 * besides inference. */
static int start_grpc_parts(struct server *s, struct bs_err *err)
{
    if (bs_health_service_init(&s->health, err) != 0 ||
        bs_reflection_init(&s->refl, bs_descriptor_set, bs_descriptor_set_len, grpc_services,
                           BS_ARRAY_LEN(grpc_services), err) != 0 ||
        bs_reflection_service_init(&s->refl_svc, s->refl, err) != 0)
        return err->code;
    if (s->sec.token != NULL && bs_auth_bearer_init(&s->auth, s->sec.token, err) != 0)
        return err->code;
    return 0;
}

/* Every service's method rows, in one table for the transport. */
static int grpc_rows(struct server *s, struct bs_rpc_method *rows)
{
    const struct bs_rpc_method *r;
    int n = 0, k;
    k = bs_service_methods(s->svc, &r);
    for (int i = 0; i < k && n < MAX_ROWS; i++)
        rows[n++] = r[i];
    k = bs_health_service_methods(s->health, &r);
    for (int i = 0; i < k && n < MAX_ROWS; i++)
        rows[n++] = r[i];
    k = bs_reflection_service_methods(s->refl_svc, &r);
    for (int i = 0; i < k && n < MAX_ROWS; i++)
        rows[n++] = r[i];
    return n;
}

static int start(struct server *s, struct bs_err *err)
{
    struct bs_repo_options ro = {.dirs = s->opts.repos,
                                 .n_dirs = s->opts.n_repos,
                                 .defaults = s->opts.defaults,
                                 .metrics = s->metrics,
                                 .control = (enum bs_repo_control)s->opts.control_mode,
                                 .load_models = s->opts.load_models,
                                 .n_load_models = s->opts.n_load_models,
                                 .poll_secs = s->opts.poll_secs};
    struct bs_core_options co = {.max_inflight = s->opts.max_inflight,
                                 .metrics = s->metrics,
                                 .block_cache_bytes = (size_t)s->opts.block_cache_bytes,
                                 .loop = s->loop};
    struct bs_service_options so = {
        .limits = {s->opts.max_tensor_elements, BS_CODEC_MAX_INPUTS},
        .max_response_bytes = (size_t)s->opts.max_message_bytes,
    };
    struct bs_rpc_options rpc_opts = {.max_recv_bytes = s->opts.max_message_bytes,
                                      .max_send_bytes = s->opts.max_message_bytes,
                                      .max_concurrent_streams = s->opts.max_streams,
                                      .max_stream_pending = s->opts.max_stream_pending,
                                      .max_stream_unsent_bytes = (size_t)s->opts.max_stream_unsent,
                                      .max_unsent_bytes = (size_t)s->opts.max_unsent};
    struct bs_rpc_method rows[MAX_ROWS];
    struct bs_rpc_auth auth;
    char address[300];
    int port = 0;
    struct bs_backend_opts bo = {s->opts.device, s->opts.threads, s->opts.dtype, s->opts.tf32,
                                 s->opts.activations, s->opts.graphs};
    if (bs_backend_init_opts(&s->be, &bo, err) != 0)
        return err->code;
    bs_log(BS_LOG_INFO, NULL, "compute: %s", err->msg);
    if (bs_repository_init(&s->repo, s->loop, &s->be, &ro, err) != 0 ||
        bs_core_init(&s->core, s->repo, &co, err) != 0)
        return err->code;
    if (bs_shm_init(&s->shm, err) != 0)
        return err->code;
    struct bs_control_options cto = {.core = s->core, .shm = s->shm, .device = s->be.iface->name};
    if (bs_control_init(&s->control, &cto, err) != 0)
        return err->code;
    so.control = s->control;
    so.shm = s->shm;
    if (bs_service_init(&s->svc, s->core, &so, err) != 0 || start_grpc_parts(s, err) != 0)
        return err->code;
    rpc_opts.methods = rows;
    rpc_opts.n_methods = grpc_rows(s, rows);
    if (s->auth != NULL) {
        auth = bs_auth_hook(s->auth);
        rpc_opts.auth = &auth;
    }
    snprintf(address, sizeof(address), "%s:%d", s->opts.address, s->opts.port);
    rpc_opts.address = address;
    rpc_opts.tls_cert_chain = s->sec.cert_chain;
    rpc_opts.tls_key = s->sec.key;
    rpc_opts.tls_client_ca = s->sec.client_ca;
    if (start_metrics(s, err) != 0 || start_http(s, err) != 0)
        return err->code;
    if (bs_rpc_server_init(&s->rpc, s->loop, &rpc_opts, &port, err) != 0)
        return err->code;
    bs_secure_free(&s->sec); /* the transport and the hook have their copies */
    bs_health_service_set(s->health, "", true);
    bs_health_service_set(s->health, "inference.GRPCInferenceService", true);
    uv_signal_init(s->loop, &s->sigint);
    uv_signal_init(s->loop, &s->sigterm);
    uv_timer_init(s->loop, &s->grace);
    s->handles_ready = true;
    s->sigint.data = s->sigterm.data = s->grace.data = s;
    uv_signal_start(&s->sigint, on_signal, SIGINT);
    uv_signal_start(&s->sigterm, on_signal, SIGTERM);
    bs_log(BS_LOG_INFO, NULL, "serving %d models on %s:%d%s%s", bs_repository_count(s->repo),
           s->opts.address, port, s->opts.tls_cert ? " (TLS" : "",
           s->opts.tls_cert ? (s->opts.tls_client_ca ? ", client certificates)" : ")") : "");
    return 0;
}

int bs_serve_main(int argc, char **argv)
{
    struct server s;
    struct bs_err err = {0};
    memset(&s, 0, sizeof(s));
    if (parse_opts(argc, argv, &s.opts) != 0)
        return 2;
    bs_log_init(s.opts.verbose, s.opts.json_logs);
    signal(SIGPIPE, SIG_IGN);
    /* Request tensors, batch buffers and answers are megabytes each. With
     * glibc's dynamic threshold they soon come from the heap, and a burst
     * leaves hundreds of MB held after it; a fixed threshold keeps every
     * block of 1 MiB or more in its own mapping, returned when freed (a few
     * page faults per request, small beside the forward). */
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
    s.loop = uv_default_loop();
    int rc = prepare(&s, &err);
    if (rc == 0)
        rc = start(&s, &err);
    if (rc == 0) {
        uv_run(s.loop, UV_RUN_DEFAULT);
    } else {
        bs_log(BS_LOG_ERROR, NULL, "%s", err.msg);
        if (s.rpc != NULL)
            bs_rpc_server_shutdown(s.rpc, on_rpc_down, &s);
        bs_http_shutdown(s.http);
        uv_run(s.loop, UV_RUN_DEFAULT);
    }
    /* uv_run returned: no batch is running (their work requests keep the
     * loop alive). Batchers close their handles asynchronously: run once more. */
    bs_metrics_http_stop(s.metrics_http);
    bs_http_free(s.http); /* before the core: its threads post nothing more */
    bs_rpc_server_free(s.rpc);
    bs_health_service_free(s.health);
    bs_reflection_service_free(s.refl_svc);
    bs_reflection_free(s.refl);
    bs_auth_free(s.auth);
    bs_service_free(s.svc);
    bs_control_free(s.control);
    bs_shm_free(s.shm); /* after the service: no request holds a region now */
    bs_core_free(s.core);
    bs_repository_free(s.repo);
    uv_run(s.loop, UV_RUN_DEFAULT);
    bs_metrics_free(s.metrics);
    bs_secure_free(&s.sec);
    bs_backend_free(&s.be);
    uv_loop_close(s.loop);
    return rc == 0 ? 0 : 1;
}
