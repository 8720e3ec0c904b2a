/* The gRPC transport (server/rpc.c) end to end: a uv loop serves a small
 * in-test application on a free port while tests/unit/rpc_client.py (Debian's
 * python3-grpcio) drives it; the client's last step makes the server shut
 * down with a stream, a health watch and a delayed reply still open. Before
 * that, the reflection index and health table are checked directly, and a
 * server that cannot bind must fail cleanly.
 *
 * Usage: test_rpc PYTHON rpc_client.py */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "descriptors.h"
#include "grpc/reflection/v1/reflection.pb-c.h"
#include "health.h"
#include "health_service.h"
#include "reflection.h"
#include "reflection_service.h"
#include "service.h"
#include "rpc.h"

static int failures;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);               \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

/* ---- the in-test application ---------------------------------------------------------------- */

struct app {
    uv_loop_t loop;
    bs_rpc_server_t *srv;
    bs_health_service_t *health;
    bs_reflection_t *refl;
    bs_reflection_service_t *refl_svc;
    uv_process_t child;
    uv_timer_t watchdog;
    int n_pending; /* delayed ModelInfer replies holding a call reference */
    int unary_cancels, late_cancels, stream_cancels, streams_opened, streams_ended, stream_msgs;
    bool shutdown_started, server_done, child_exited, timed_out;
    int64_t child_status;
    int child_signal;
};

/* Stream calls carry this as their data, delayed replies a struct pending. */
static int stream_marker;

struct pending {
    uv_timer_t timer;
    struct app *app;
    bs_rpc_call_t *call;
    size_t len;
    uint8_t data[];
};

static void pending_free(uv_handle_t *h)
{
    free(h->data);
}

/* Answer (a no-op returning 0 once cancelled) and let go of the call. */
static void pending_complete(struct pending *p)
{
    bool cancelled = bs_rpc_call_cancelled(p->call);
    int rc = bs_rpc_reply(p->call, p->data, p->len);
    CHECK(rc == 0);
    if (cancelled)
        CHECK(bs_rpc_fail(p->call, BS_RPC_INTERNAL, "ignored") == 0);
    bs_rpc_call_set_data(p->call, NULL);
    bs_rpc_call_unref(p->call);
    p->app->n_pending--;
    uv_close((uv_handle_t *)&p->timer, pending_free);
}

static void pending_on_timer(uv_timer_t *t)
{
    pending_complete(t->data);
}

static void app_delayed_echo(struct app *app, bs_rpc_call_t *call, const uint8_t *d, size_t n)
{
    struct pending *p = malloc(sizeof(*p) + n);
    if (p == NULL) {
        bs_rpc_fail(call, BS_RPC_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    p->app = app;
    p->call = call;
    p->len = n;
    if (n > 0)
        memcpy(p->data, d, n);
    uv_timer_init(&app->loop, &p->timer);
    p->timer.data = p;
    bs_rpc_call_ref(call);
    bs_rpc_call_set_data(call, p);
    app->n_pending++;
    uv_timer_start(&p->timer, pending_on_timer, n >= 4 && memcmp(d, "slow", 4) == 0 ? 30000 : 5, 0);
}

static void app_reply_text(bs_rpc_call_t *call, const char *text)
{
    CHECK(bs_rpc_reply(call, (const uint8_t *)text, strlen(text)) == 0);
}

/* ServerReady: "serving:NAME" or "notserving:NAME" sets NAME's health. */
static void app_set_health(struct app *app, bs_rpc_call_t *call, const uint8_t *d, size_t n)
{
    char buf[256];
    snprintf(buf, sizeof(buf), "%.*s", (int)n, (const char *)d);
    char *colon = strchr(buf, ':');
    if (colon == NULL) {
        bs_rpc_fail(call, BS_RPC_INVALID_ARGUMENT, "want serving:NAME or notserving:NAME");
        return;
    }
    *colon = '\0';
    bs_health_service_set(app->health, colon + 1, strcmp(buf, "serving") == 0);
    app_reply_text(call, "ok");
}

/* ModelConfig: the deadline left and the x-test metadata. */
static void app_deadline(bs_rpc_call_t *call)
{
    char buf[128], left[32];
    int64_t dl = bs_rpc_call_deadline(call);
    const char *md = bs_rpc_call_metadata(call, "x-test");
    if (dl == INT64_MAX)
        snprintf(left, sizeof(left), "inf");
    else
        snprintf(left, sizeof(left), "%lld", (long long)((dl - (int64_t)uv_hrtime()) / 1000000));
    snprintf(buf, sizeof(buf), "deadline_ms=%s md=%s", left, md ? md : "(none)");
    app_reply_text(call, buf);
}

/* RepositoryIndex: answering twice or with the wrong call kind is refused. */
static void app_misuse(bs_rpc_call_t *call)
{
    CHECK(bs_rpc_stream_send(call, (const uint8_t *)"x", 1) == BS_EINVAL);
    app_reply_text(call, "misuse-ok");
    CHECK(bs_rpc_reply(call, (const uint8_t *)"again", 5) == BS_EINVAL);
    CHECK(bs_rpc_fail(call, BS_RPC_INTERNAL, "again") == BS_EINVAL);
}

static void app_on_unary(void *arg, bs_rpc_call_t *call, int m, const uint8_t *d, size_t n)
{
    struct app *app = arg;
    char buf[128];
    CHECK(!bs_rpc_call_cancelled(call));
    switch (m) {
    case BS_SVC_MODEL_INFER:
        app_delayed_echo(app, call, d, n);
        break;
    case BS_SVC_MODEL_READY:
        snprintf(buf, sizeof(buf), "model not found: %.*s", (int)n, (const char *)d);
        CHECK(bs_rpc_fail(call, BS_RPC_NOT_FOUND, buf) == 0);
        break;
    case BS_SVC_SERVER_READY:
        app_set_health(app, call, d, n);
        break;
    case BS_SVC_SERVER_LIVE:
        snprintf(buf, sizeof(buf), "live len=%zu", n);
        app_reply_text(call, buf);
        break;
    case BS_SVC_SERVER_METADATA:
        snprintf(buf, sizeof(buf), "unary_cancels=%d stream_cancels=%d", app->unary_cancels,
                 app->stream_cancels);
        app_reply_text(call, buf);
        break;
    case BS_SVC_MODEL_CONFIG:
        app_deadline(call);
        break;
    case BS_SVC_REPOSITORY_INDEX:
        app_misuse(call);
        break;
    default:
        bs_rpc_fail(call, BS_RPC_UNIMPLEMENTED, "not in this test");
        break;
    }
}

static void app_on_server_done(void *arg);

static void app_shutdown(struct app *app)
{
    if (app->shutdown_started)
        return;
    app->shutdown_started = true;
    bs_rpc_server_shutdown(app->srv, app_on_server_done, app);
}

static void app_on_stream_open(void *arg, bs_rpc_call_t *call, int id)
{
    struct app *app = arg;
    app->streams_opened++;
    bs_rpc_call_set_data(call, &stream_marker);
}

static void app_on_stream_msg(void *arg, bs_rpc_call_t *call, const uint8_t *d, size_t n)
{
    struct app *app = arg;
    app->stream_msgs++;
    if (n == 8 && memcmp(d, "shutdown", 8) == 0) {
        app_shutdown(app); /* the stream stays open: the shutdown cancels it */
        return;
    }
    CHECK(bs_rpc_stream_send(call, d, n) == 0);
}

static void app_on_stream_end(void *arg, bs_rpc_call_t *call)
{
    struct app *app = arg;
    app->streams_ended++;
    CHECK(bs_rpc_stream_finish(call, BS_RPC_OK, NULL) == 0);
    CHECK(bs_rpc_stream_send(call, (const uint8_t *)"late", 4) == BS_EINVAL);
}

static void app_on_cancel(void *arg, bs_rpc_call_t *call)
{
    struct app *app = arg;
    void *data = bs_rpc_call_data(call);
    CHECK(bs_rpc_call_cancelled(call));
    if (data == &stream_marker) {
        /* A cancel can reach a stream as on_stream_end first (and the finish
         * below then fails on the wire): on_cancel still follows. */
        app->stream_cancels++;
        CHECK(bs_rpc_stream_send(call, (const uint8_t *)"x", 1) == 0); /* dropped */
        CHECK(bs_rpc_stream_finish(call, BS_RPC_OK, NULL) == 0);
        return;
    }
    if (data == NULL) {
        app->late_cancels++; /* answered, but the answer did not reach the client */
        return;
    }
    struct pending *p = data;
    app->unary_cancels++;
    uv_timer_stop(&p->timer);
    pending_complete(p);
}

/* ---- the client process and the end --------------------------------------------------------- */

static void app_maybe_end(struct app *app)
{
    if (app->server_done && app->child_exited && !uv_is_closing((uv_handle_t *)&app->watchdog))
        uv_close((uv_handle_t *)&app->watchdog, NULL);
}

static void app_on_server_done(void *arg)
{
    struct app *app = arg;
    app->server_done = true;
    CHECK(app->n_pending == 0); /* every reference was released first */
    app_maybe_end(app);
}

static void app_on_child_exit(uv_process_t *child, int64_t status, int signal)
{
    struct app *app = child->data;
    app->child_exited = true;
    app->child_status = status;
    app->child_signal = signal;
    uv_close((uv_handle_t *)child, NULL);
    app_shutdown(app); /* normally already started by the client */
    app_maybe_end(app);
}

static void app_on_watchdog(uv_timer_t *t)
{
    struct app *app = t->data;
    fprintf(stderr, "test_rpc: timed out\n");
    app->timed_out = true;
    if (!app->child_exited)
        uv_process_kill(&app->child, SIGKILL);
    app_shutdown(app);
}

static int app_spawn_client(struct app *app, const char *python, const char *script, int port)
{
    char port_str[16];
    snprintf(port_str, sizeof(port_str), "%d", port);
    char *args[] = {(char *)python, (char *)script, port_str, NULL};
    uv_stdio_container_t stdio[3] = {
        {.flags = UV_INHERIT_FD, .data.fd = 0},
        {.flags = UV_INHERIT_FD, .data.fd = 1},
        {.flags = UV_INHERIT_FD, .data.fd = 2},
    };
    uv_process_options_t o = {
        .exit_cb = app_on_child_exit,
        .file = python,
        .args = args,
        .stdio_count = 3,
        .stdio = stdio,
    };
    app->child.data = app;
    return uv_spawn(&app->loop, &app->child, &o);
}

/* The test app answers the inference paths (ids: enum bs_service_method);
 * health and reflection register their own rows, as in the server. */
static const char *const app_paths[BS_SVC_METHOD_COUNT] = {
    "ServerLive", "ServerReady",      "ModelReady",  "ServerMetadata",  "ModelMetadata",
    "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex",
    "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
};

static int app_rows(struct app *app, const struct bs_rpc_handlers *h, struct bs_rpc_method *rows,
                    char paths[][64])
{
    static const char *const services[] = {
        "inference.GRPCInferenceService", "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"};
    const struct bs_rpc_method *r;
    struct bs_err err = {0};
    int n = 0, k;
    for (int i = 0; i < BS_SVC_METHOD_COUNT; i++) {
        snprintf(paths[i], 64, "/inference.GRPCInferenceService/%s", app_paths[i]);
        rows[n++] = (struct bs_rpc_method){.path = paths[i],
                                           .kind = i == BS_SVC_MODEL_STREAM_INFER ? BS_RPC_BIDI
                                                                                  : BS_RPC_UNARY,
                                           .id = i,
                                           .h = h};
    }
    CHECK(bs_health_service_init(&app->health, &err) == 0);
    CHECK(bs_reflection_init(&app->refl, bs_descriptor_set, bs_descriptor_set_len, services,
                             BS_ARRAY_LEN(services), &err) == 0);
    CHECK(bs_reflection_service_init(&app->refl_svc, app->refl, &err) == 0);
    k = bs_health_service_methods(app->health, &r);
    for (int i = 0; i < k; i++)
        rows[n++] = r[i];
    k = bs_reflection_service_methods(app->refl_svc, &r);
    for (int i = 0; i < k; i++)
        rows[n++] = r[i];
    return n;
}

static void test_end_to_end(const char *python, const char *script)
{
    struct app app;
    memset(&app, 0, sizeof(app));
    struct bs_rpc_handlers h = {.on_call = app_on_unary,
                                .on_stream_open = app_on_stream_open,
                                .on_stream_msg = app_on_stream_msg,
                                .on_stream_end = app_on_stream_end,
                                .on_cancel = app_on_cancel,
                                .arg = &app};
    struct bs_rpc_method rows[BS_SVC_METHOD_COUNT + 4];
    char paths[BS_SVC_METHOD_COUNT][64];
    struct bs_rpc_options opts = {.address = "127.0.0.1:0"};
    struct bs_err err = {0};
    int port = 0;
    CHECK(uv_loop_init(&app.loop) == 0);
    opts.methods = rows;
    opts.n_methods = app_rows(&app, &h, rows, paths);
    int rc = bs_rpc_server_init(&app.srv, &app.loop, &opts, &port, &err);
    CHECK(rc == 0);
    if (rc != 0) {
        fprintf(stderr, "test_rpc: server: %s\n", err.msg);
        return;
    }
    CHECK(port > 0);
    uv_timer_init(&app.loop, &app.watchdog);
    app.watchdog.data = &app;
    uv_timer_start(&app.watchdog, app_on_watchdog, 90000, 0);
    rc = app_spawn_client(&app, python, script, port);
    CHECK(rc == 0);
    if (rc != 0) {
        fprintf(stderr, "test_rpc: spawn %s: %s\n", python, uv_strerror(rc));
        uv_close((uv_handle_t *)&app.child, NULL);
        app.child_exited = true;
        app_shutdown(&app);
    }
    uv_run(&app.loop, UV_RUN_DEFAULT);

    CHECK(app.server_done);
    CHECK(app.child_exited && app.child_status == 0 && app.child_signal == 0);
    CHECK(!app.timed_out);
    CHECK(app.n_pending == 0);
    CHECK(app.unary_cancels >= 3);  /* client cancel, deadline, shutdown */
    CHECK(app.stream_cancels >= 2); /* client cancel, shutdown */
    CHECK(app.streams_ended >= 11); /* the half-closes of rpc_client.py test_streams */
    CHECK(app.streams_opened <= app.streams_ended + app.stream_cancels);
    bs_rpc_server_free(app.srv);
    bs_health_service_free(app.health);
    bs_reflection_service_free(app.refl_svc);
    bs_reflection_free(app.refl);
    CHECK(uv_loop_close(&app.loop) == 0); /* every handle, the server's too, is closed */
    printf("test_rpc: port %d, %d streams, %d stream messages, %d unary and %d stream cancels\n",
           port, app.streams_opened, app.stream_msgs, app.unary_cancels, app.stream_cancels);
}

/* ---- direct checks -------------------------------------------------------------------------- */

static void test_bad_address(void)
{
    uv_loop_t loop;
    bs_rpc_server_t *srv = (bs_rpc_server_t *)&loop; /* must be reset to NULL */
    struct bs_rpc_options opts = {.address = "256.256.256.256:1"};
    struct bs_err err = {0};
    int port = -1;
    CHECK(uv_loop_init(&loop) == 0);
    printf("test_rpc: binding 256.256.256.256:1 must fail (gRPC logs an error line)\n");
    fflush(stdout);
    CHECK(bs_rpc_server_init(&srv, &loop, &opts, &port, &err) == BS_EIO);
    CHECK(srv == NULL);
    CHECK(strstr(err.msg, "256.256.256.256:1") != NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
    bs_rpc_server_free(NULL);
}

static void expect_symbol(const bs_reflection_t *r, const char *symbol, const char *file)
{
    int i = bs_reflection_find_symbol(r, symbol);
    const char *got = bs_reflection_file_name(r, i);
    if (file == NULL ? i != -1 : (got == NULL || strcmp(got, file) != 0)) {
        fprintf(stderr, "reflection: %s: got %s, want %s\n", symbol, got ? got : "-",
                file ? file : "-");
        failures++;
    }
}

static void test_reflection_index(void)
{
    static const char *const services[] = {"a.B"};
    bs_reflection_t *r = NULL;
    struct bs_err err = {0};
    CHECK(bs_reflection_init(&r, bs_descriptor_set, bs_descriptor_set_len, services, 1, &err) == 0);
    if (r == NULL)
        return;
    CHECK(bs_reflection_file_count(r) == 5);
    expect_symbol(r, "inference.GRPCInferenceService", "grpc_service.proto");
    expect_symbol(r, "inference.GRPCInferenceService.ModelInfer", "grpc_service.proto");
    expect_symbol(r, ".inference.ModelInferRequest", "grpc_service.proto");
    expect_symbol(r, "inference.ModelInferRequest.InferInputTensor", "grpc_service.proto");
    expect_symbol(r, "inference.ModelInferRequest.InferInputTensor.shape", "grpc_service.proto");
    expect_symbol(r, "grpc.health.v1.HealthCheckResponse.ServingStatus",
                  "grpc/health/v1/health.proto");
    expect_symbol(r, "grpc.health.v1.HealthCheckResponse.SERVING", "grpc/health/v1/health.proto");
    expect_symbol(r, "grpc.reflection.v1alpha.ServerReflectionRequest",
                  "grpc/reflection/v1alpha/reflection.proto");
    expect_symbol(r, "grpc.reflection.v1.ServerReflection.ServerReflectionInfo",
                  "grpc/reflection/v1/reflection.proto");
    expect_symbol(r, "inference", NULL);
    expect_symbol(r, "inference.NoSuch", NULL);
    expect_symbol(r, "", NULL);
    CHECK(bs_reflection_find_file(r, "model_config.proto") >= 0);
    CHECK(bs_reflection_find_file(r, "nope.proto") == -1);
    bs_reflection_free(r);

    /* Truncated sets are refused, not read past their end. */
    for (size_t cut = 1; cut < 64; cut += 7) {
        r = NULL;
        int rc = bs_reflection_init(&r, bs_descriptor_set, cut, services, 1, &err);
        CHECK(rc == BS_EFORMAT && r == NULL);
        bs_reflection_free(r);
    }
    bs_reflection_free(NULL);
}

#define REFL_RESP(x) GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_##x

/* Append field num (length-delimited) holding n bytes of s; returns the new end. */
static uint8_t *put_field(uint8_t *p, unsigned num, const char *s, size_t n)
{
    *p++ = (uint8_t)(num << 3 | 2);
    for (size_t v = n;; v >>= 7) {
        *p++ = (uint8_t)((v & 0x7f) | (v >= 0x80 ? 0x80 : 0));
        if (v < 0x80)
            break;
    }
    memcpy(p, s, n);
    return p + n;
}

/* Answer a request of host (host_len bytes) and field num holding n bytes of s. */
static Grpc__Reflection__V1__ServerReflectionResponse *
reflect_once(const bs_reflection_t *r, const char *host, size_t host_len, unsigned num,
             const char *s, size_t n, size_t *out_len)
{
    uint8_t req[1024], *out = NULL;
    uint8_t *end = put_field(put_field(req, 1, host, host_len), num, s, n);
    struct bs_err err = {0};
    CHECK(bs_reflection_answer(r, req, (size_t)(end - req), &out, out_len, &err) == 0);
    Grpc__Reflection__V1__ServerReflectionResponse *resp =
        grpc__reflection__v1__server_reflection_response__unpack(NULL, *out_len, out);
    free(out);
    CHECK(resp != NULL);
    return resp;
}

/* INVALID_ARGUMENT with a message containing want, and nothing echoed. */
static void expect_refl_invalid(const Grpc__Reflection__V1__ServerReflectionResponse *resp,
                                const char *want)
{
    const Grpc__Reflection__V1__ErrorResponse *e = NULL;
    if (resp != NULL && resp->message_response_case == REFL_RESP(ERROR_RESPONSE))
        e = resp->error_response;
    CHECK(e != NULL && e->error_code == 3 && strstr(e->error_message, want) != NULL);
    CHECK(resp != NULL && resp->original_request == NULL &&
          (resp->valid_host == NULL || resp->valid_host[0] == '\0'));
    if (e == NULL || strstr(e->error_message, want) == NULL)
        fprintf(stderr, "reflection: got \"%s\", want \"%s\"\n", e ? e->error_message : "-", want);
}

/* Hostile requests: a host too long to echo, NUL bytes in strings, garbage. */
static void test_reflection_answers(void)
{
    static const char *const services[] = {"a.B"};
    static char host[300];
    bs_reflection_t *r = NULL;
    struct bs_err err = {0};
    size_t n;
    CHECK(bs_reflection_init(&r, bs_descriptor_set, bs_descriptor_set_len, services, 1, &err) == 0);
    if (r == NULL)
        return;
    memset(host, 'h', sizeof(host));
    Grpc__Reflection__V1__ServerReflectionResponse *resp =
        reflect_once(r, host, 255, 7, "*", 1, &n); /* 255 bytes: echoed */
    CHECK(resp != NULL && resp->valid_host != NULL && strlen(resp->valid_host) == 255 &&
          resp->message_response_case == REFL_RESP(LIST_SERVICES_RESPONSE));
    grpc__reflection__v1__server_reflection_response__free_unpacked(resp, NULL);

    resp = reflect_once(r, host, 256, 7, "*", 1, &n);
    expect_refl_invalid(resp, "host is longer than 255 bytes");
    CHECK(n < 64);
    grpc__reflection__v1__server_reflection_response__free_unpacked(resp, NULL);

    resp = reflect_once(r, "local\0host", 10, 7, "*", 1, &n);
    expect_refl_invalid(resp, "field \"host\" contains a NUL byte");
    grpc__reflection__v1__server_reflection_response__free_unpacked(resp, NULL);

    static const char sym[] = "inference.GRPCInferenceService\0evil";
    resp = reflect_once(r, "h", 1, 4, sym, sizeof(sym) - 1, &n);
    expect_refl_invalid(resp, "field \"file_containing_symbol\" contains a NUL byte");
    grpc__reflection__v1__server_reflection_response__free_unpacked(resp, NULL);

    resp = reflect_once(r, "h", 1, 5, "\xff", 1, &n); /* a cut varint inside a nested message */
    expect_refl_invalid(resp, "malformed ServerReflectionRequest");
    grpc__reflection__v1__server_reflection_response__free_unpacked(resp, NULL);
    bs_reflection_free(r);
}

static void test_health_table(void)
{
    bs_health_t *h = NULL;
    char *name = NULL;
    uint8_t buf[BS_HEALTH_RESPONSE_MAX];
    struct bs_err err = {0};
    CHECK(bs_health_init(&h, &err) == 0);
    CHECK(bs_health_get(h, "") == BS_HEALTH_SERVICE_UNKNOWN);
    CHECK(bs_health_set(h, "a", true) == 1);
    CHECK(bs_health_set(h, "a", true) == 0);
    CHECK(bs_health_set(h, "a", false) == 1);
    CHECK(bs_health_get(h, "a") == BS_HEALTH_NOT_SERVING);
    CHECK(bs_health_decode_request(NULL, 0, &name, &err) == 0 && strcmp(name, "") == 0);
    free(name);
    CHECK(bs_health_decode_request((const uint8_t *)"\x0a\x03"
                                                    "abc",
                                   5, &name, &err) == 0 &&
          strcmp(name, "abc") == 0);
    free(name);
    CHECK(bs_health_decode_request((const uint8_t *)"\x0a\x09"
                                                    "abc",
                                   5, &name, &err) == BS_EINVAL);
    CHECK(bs_health_decode_request((const uint8_t *)"\x0a\x03"
                                                    "a\0c",
                                   5, &name, &err) == BS_EINVAL &&
          strstr(err.msg, "field \"service\" contains a NUL byte") != NULL);
    CHECK(bs_health_encode_response(BS_HEALTH_SERVING, buf) == 2 && buf[0] == 0x08 && buf[1] == 1);
    bs_health_free(h);
    bs_health_free(NULL);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s PYTHON rpc_client.py\n", argv[0]);
        return 2;
    }
    test_health_table();
    test_reflection_index();
    test_reflection_answers();
    test_bad_address();
    test_end_to_end(argv[1], argv[2]);
    if (failures > 0) {
        fprintf(stderr, "test_rpc: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test_rpc: all checks passed\n");
    return 0;
}
