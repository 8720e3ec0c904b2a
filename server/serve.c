/* blockserve serve: the gRPC inference server. The libuv loop owns every
 * object here; compute runs on the batchers' worker threads. */
#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "cli.h"
#include "log.h"
#include "metrics.h"
#include "metrics_http.h"
#include "repository.h"
#include "rpc.h"
#include "secure.h"
#include "service.h"

#define MAX_REPOS 16

struct serve_opts {
    const char *address;
    int port;
    const char *repos[MAX_REPOS];
    int n_repos;
    const char *device;
    const char *dtype; /* NULL: the backend's default */
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
    struct bs_serving_config defaults;
    int metrics_port;            /* 0: no metrics */
    bool metrics_port_given;     /* a busy default port only warns */
    const char *metrics_address; /* NULL: the gRPC address */
    const char *tls_cert, *tls_key, *tls_client_ca, *token_file;
};

struct server {
    uv_loop_t *loop;
    struct serve_opts opts;
    struct bs_backend be;
    bs_repository_t *repo;
    bs_service_t *svc;
    bs_rpc_server_t *rpc;
    bs_metrics_t *metrics;
    bs_metrics_http_t *metrics_http;
    struct bs_secure sec;
    uv_signal_t sigint, sigterm;
    uv_timer_t grace;
    bool stopping;
    bool rpc_down;
    bool handles_ready; /* sigint, sigterm and grace are initialised */
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: blockserve [serve] [options]\n"
            "  --grpc-port N                 port (default 8001; 0 picks a free one)\n"
            "  --grpc-address HOST           address to bind (default 0.0.0.0)\n"
            "  --model-repository DIR        serve each model directory in DIR (repeatable);\n"
            "                                without one, the built-in models (generated weights)\n"
            "  --device auto|cpu|cuda        compute device (default auto)\n"
            "  --threads N                   compute threads (default: one per core)\n"
            "  --dtype fp32|bf16|fp16        compute dtype (default: cpu fp32, cuda bf16)\n"
            "  --tf32                        let FP32 GEMMs use TF32 tensor cores (cuda)\n"
            "  --log-verbose N               0: info, 1: every request\n"
            "  --log-format text|json        log lines (default text)\n"
            "  --max-message-bytes N         gRPC message limit (default 67108864)\n"
            "  --max-tensor-elements N       per input tensor (default 134217728)\n"
            "  --max-concurrent-streams N    per connection (default 256)\n"
            "  --max-inflight N              inference requests admitted and not answered,\n"
            "                                server-wide; more: RESOURCE_EXHAUSTED (default 4096)\n"
            "  --max-stream-pending N        a stream stops reading while N of its requests are\n"
            "                                in progress or answered but unsent (default 16)\n"
            "  --max-stream-unsent-bytes N   ... or while its unsent answers hold N bytes\n"
            "                                (default 67108864)\n"
            "  --max-unsent-bytes N          server-wide bound on unsent answers: streams stop\n"
            "                                reading, new inferences get RESOURCE_EXHAUSTED\n"
            "                                (default 536870912)\n"
            "  --grace-seconds N             on SIGTERM/SIGINT, time to finish queued work "
            "(default 30)\n"
            "  --max-batch-size N            default for models (default 8)\n"
            "  --max-queue-delay-us N        default batching delay (default 2000)\n"
            "  --max-queue-size N            default queue bound (default 256)\n"
            "  --metrics-port N              Prometheus metrics on http://HOST:N/metrics (default\n"
            "                                8002, busy: a warning; 0: no metrics)\n"
            "  --metrics-address HOST        address for metrics (default: --grpc-address)\n"
            "  --no-metrics                  no metrics endpoint (same as --metrics-port 0)\n"
            "  --tls-cert FILE --tls-key FILE  TLS on the gRPC port (PEM certificate chain, key)\n"
            "  --tls-client-ca FILE          mutual TLS: require client certificates from this CA\n"
            "  --auth-token-file FILE        every call but health checks needs the metadata\n"
            "                                \"authorization: Bearer <token>\" (token: the file,\n"
            "                                trailing whitespace stripped)\n");
}

static int int_flag(const char *flag, const char *v, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno != 0 || *end != '\0' || end == v || x < lo || x > hi) {
        fprintf(stderr, "blockserve: %s: expected an integer in [%lld, %lld], got \"%s\"\n", flag,
                (long long)lo, (long long)hi, v);
        return -1;
    }
    *out = x;
    return 0;
}

static int parse_opts(int argc, char **argv, struct serve_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->address = "0.0.0.0";
    o->port = 8001;
    o->device = "auto";
    o->max_message_bytes = 64 << 20;
    o->max_tensor_elements = (int64_t)1 << 27;
    o->grace_seconds = 30;
    o->max_streams = 256;
    o->max_inflight = 4096;
    o->max_stream_pending = 16;
    o->max_stream_unsent = (int64_t)64 << 20;
    o->max_unsent = (int64_t)512 << 20;
    o->defaults = (struct bs_serving_config){.max_batch_size = 8, .max_queue_delay_us = 2000,
                                             .max_queue_size = 256};
    o->metrics_port = 8002;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        int64_t v = 0;
        if (strcmp(f, "--no-metrics") == 0) { /* the one flag without a value */
            o->metrics_port = 0;
            o->metrics_port_given = true;
            continue;
        }
        if (strcmp(f, "--help") == 0 || strcmp(f, "-h") == 0) {
            usage(stdout);
            exit(0);
        }
        if (strcmp(f, "--tf32") == 0) {
            o->tf32 = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "blockserve: unknown option or missing value: %s\n", f);
            return -1;
        }
        const char *val = argv[++i];
        int rc = 0;
        if (strcmp(f, "--grpc-port") == 0 && (rc = int_flag(f, val, 0, 65535, &v)) == 0)
            o->port = (int)v;
        else if (strcmp(f, "--grpc-address") == 0)
            o->address = val;
        else if (strcmp(f, "--model-repository") == 0 && o->n_repos < MAX_REPOS)
            o->repos[o->n_repos++] = val;
        else if (strcmp(f, "--device") == 0)
            o->device = val;
        else if (strcmp(f, "--dtype") == 0)
            o->dtype = val;
        else if (strcmp(f, "--threads") == 0 && (rc = int_flag(f, val, 0, 1024, &v)) == 0)
            o->threads = (int)v;
        else if (strcmp(f, "--log-verbose") == 0 && (rc = int_flag(f, val, 0, 9, &v)) == 0)
            o->verbose = (int)v;
        else if (strcmp(f, "--log-format") == 0 && (!strcmp(val, "json") || !strcmp(val, "text")))
            o->json_logs = strcmp(val, "json") == 0;
        else if (strcmp(f, "--max-message-bytes") == 0 &&
                 (rc = int_flag(f, val, 1024, INT32_MAX, &v)) == 0)
            o->max_message_bytes = (int)v;
        else if (strcmp(f, "--max-tensor-elements") == 0 &&
                 (rc = int_flag(f, val, 1, (int64_t)1 << 34, &v)) == 0)
            o->max_tensor_elements = v;
        else if (strcmp(f, "--max-concurrent-streams") == 0 &&
                 (rc = int_flag(f, val, 1, 1 << 20, &v)) == 0)
            o->max_streams = (int)v;
        else if (strcmp(f, "--max-inflight") == 0 && (rc = int_flag(f, val, 1, 1 << 24, &v)) == 0)
            o->max_inflight = (int)v;
        else if (strcmp(f, "--max-stream-pending") == 0 &&
                 (rc = int_flag(f, val, 1, 1 << 20, &v)) == 0)
            o->max_stream_pending = (int)v;
        else if (strcmp(f, "--max-stream-unsent-bytes") == 0 &&
                 (rc = int_flag(f, val, 1, (int64_t)1 << 40, &v)) == 0)
            o->max_stream_unsent = v;
        else if (strcmp(f, "--max-unsent-bytes") == 0 &&
                 (rc = int_flag(f, val, 1, (int64_t)1 << 40, &v)) == 0)
            o->max_unsent = v;
        else if (strcmp(f, "--grace-seconds") == 0 && (rc = int_flag(f, val, 0, 86400, &v)) == 0)
            o->grace_seconds = (int)v;
        else if (strcmp(f, "--max-batch-size") == 0 && (rc = int_flag(f, val, 1, 1024, &v)) == 0)
            o->defaults.max_batch_size = (int)v;
        else if (strcmp(f, "--max-queue-delay-us") == 0 &&
                 (rc = int_flag(f, val, 0, 60000000, &v)) == 0)
            o->defaults.max_queue_delay_us = v;
        else if (strcmp(f, "--max-queue-size") == 0 &&
                 (rc = int_flag(f, val, 1, 1000000, &v)) == 0)
            o->defaults.max_queue_size = (int)v;
        else if (strcmp(f, "--metrics-port") == 0 && (rc = int_flag(f, val, 0, 65535, &v)) == 0) {
            o->metrics_port = (int)v;
            o->metrics_port_given = true;
        } else if (strcmp(f, "--metrics-address") == 0)
            o->metrics_address = val;
        else if (strcmp(f, "--tls-cert") == 0)
            o->tls_cert = val;
        else if (strcmp(f, "--tls-key") == 0)
            o->tls_key = val;
        else if (strcmp(f, "--tls-client-ca") == 0)
            o->tls_client_ca = val;
        else if (strcmp(f, "--auth-token-file") == 0)
            o->token_file = val;
        else if (rc == 0) {
            fprintf(stderr, "blockserve: unknown option or bad value: %s %s\n", f, val);
            return -1;
        }
        if (rc != 0)
            return -1;
    }
    return 0;
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
           bs_service_in_flight(s->svc));
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
    bs_log(BS_LOG_INFO, NULL, "%s: no new requests; finishing queued work (grace %d s)",
           signum == SIGINT ? "SIGINT" : "SIGTERM", s->opts.grace_seconds);
    bs_service_stop_accepting(s->svc);
    bs_rpc_set_serving(s->rpc, "", false);
    bs_rpc_set_serving(s->rpc, "inference.GRPCInferenceService", false);
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

static int start(struct server *s, struct bs_err *err)
{
    struct bs_repo_options ro = {s->opts.repos, s->opts.n_repos, s->opts.defaults, s->metrics};
    struct bs_service_options so = {
        .limits = {s->opts.max_tensor_elements, BS_CODEC_MAX_INPUTS},
        .metrics = s->metrics,
        .max_inflight = s->opts.max_inflight,
        .max_response_bytes = (size_t)s->opts.max_message_bytes,
    };
    struct bs_rpc_options rpc_opts = {.max_recv_bytes = s->opts.max_message_bytes,
                                      .max_send_bytes = s->opts.max_message_bytes,
                                      .max_concurrent_streams = s->opts.max_streams,
                                      .max_stream_pending = s->opts.max_stream_pending,
                                      .max_stream_unsent_bytes = (size_t)s->opts.max_stream_unsent,
                                      .max_unsent_bytes = (size_t)s->opts.max_unsent};
    struct bs_rpc_handlers h;
    char address[300];
    int port = 0;
    struct bs_backend_opts bo = {s->opts.device, s->opts.threads, s->opts.dtype, s->opts.tf32};
    if (bs_backend_init_opts(&s->be, &bo, err) != 0)
        return err->code;
    bs_log(BS_LOG_INFO, NULL, "compute: %s", err->msg);
    if (bs_repository_init(&s->repo, s->loop, &s->be, &ro, err) != 0 ||
        bs_service_init(&s->svc, s->repo, &so, err) != 0)
        return err->code;
    bs_service_handlers(s->svc, &h);
    snprintf(address, sizeof(address), "%s:%d", s->opts.address, s->opts.port);
    rpc_opts.address = address;
    rpc_opts.tls_cert_chain = s->sec.cert_chain;
    rpc_opts.tls_key = s->sec.key;
    rpc_opts.tls_client_ca = s->sec.client_ca;
    rpc_opts.auth_token = s->sec.token;
    if (start_metrics(s, err) != 0)
        return err->code;
    if (bs_rpc_server_init(&s->rpc, s->loop, &rpc_opts, &h, &port, err) != 0)
        return err->code;
    bs_secure_free(&s->sec); /* the transport has its copies */
    bs_rpc_set_serving(s->rpc, "", true);
    bs_rpc_set_serving(s->rpc, "inference.GRPCInferenceService", true);
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

int bs_cli_serve(int argc, char **argv)
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
        uv_run(s.loop, UV_RUN_DEFAULT);
    }
    /* uv_run returned: no batch is running (their work requests keep the
     * loop alive). Batchers close their handles asynchronously: run once more. */
    bs_metrics_http_stop(s.metrics_http);
    bs_rpc_server_free(s.rpc);
    bs_service_free(s.svc);
    bs_repository_free(s.repo);
    uv_run(s.loop, UV_RUN_DEFAULT);
    bs_metrics_free(s.metrics);
    bs_secure_free(&s.sec);
    bs_backend_free(&s.be);
    uv_loop_close(s.loop);
    return rc == 0 ? 0 : 1;
}
