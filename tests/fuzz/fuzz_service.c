/* libFuzzer target for the inference service: server/service.c with the real
 * codec, repository, batchers, engine and CPU backend on a real libuv loop,
 * behind the fake transport of fake_rpc.c, which checks that every call is
 * answered as server/rpc.h promises the client (see fake_rpc.h).
 *
 * The repository is built once (LLVMFuzzerInitialize) from golden cases
 * (tests/golden, or $BS_FUZZ_GOLDEN): small models with small batches and
 * queues, so that batching, full queues, deadlines and cancellation are all
 * reachable, plus one model that fails to load; denoising sequences get a
 * block-cache budget of a few caches and btb_stack3 a 2 ms idle time, so
 * that eviction and idle expiry are too. Each input is a little
 * client program run against a fresh bs_service over that repository:
 *
 *   op byte % 14   arguments                      what the client does
 *   0 UNARY        method, deadline, len, bytes   a unary call (on_unary)
 *   1 OPEN         deadline                       opens a ModelStreamInfer stream
 *   2 MSG          stream, len, bytes             sends one message on a stream
 *   3 END          stream                         half-closes a stream
 *   4 CANCEL       call, how                      cancels a call; how & 1: a stream
 *                                                 first hears a half-close (as gRPC core does)
 *   5 POLL                                        uv_run(UV_RUN_NOWAIT)
 *   6 WAIT                                        uv_run(UV_RUN_ONCE), at most about 2 ms
 *   7 PUMP                                        the transport closes answered calls and
 *                                                 cancels those past their deadline
 *   8 STOP                                        bs_service_stop_accepting
 *   9 REPEAT       count                          the last UNARY or MSG again, 1 + count % 8 times
 *  10 PARAM        key, kind, value               adds a request parameter to the next UNARY
 *                                                 or MSG (appended as ModelInferRequest
 *                                                 field 4, so the value is 8 raw input bytes
 *                                                 instead of a varint deep in a message)
 *  11 SHUTDOWN                                    bs_service_shutdown
 *  12 LOST         method, how                    a unary call ends before its request arrived
 *                                                 whole (on_lost; how & 1: cancelled)
 *  13 FULL                                        the transport's unsent answers reach their
 *                                                 bound, or drain again (toggles)
 *
 * method: index (modulo 9) in unary_methods below; len: 2 bytes, little
 * endian (cut to what is left); stream: index (modulo) among the streams
 * opened; call: index (modulo) among all calls opened; deadline: byte % 6,
 * 0 none, 1 long passed, 2 in 1 ms, 3 in 1 s, 4 INT64_MAX - 1, 5 now; key: index
 * (modulo) in param_keys; kind % 5: 0 int64_param, 1 bool_param (value & 1),
 * 2 uint64_param, 3 string_param (the 8 bytes), 4 int64_param near a power of
 * two: 2^(byte 0 % 64) plus (signed) byte 1, wrapping (boundary values one
 * byte away); value: 8 bytes, little endian.
 * At most FUZZ_MAX_PARAMS parameters are kept for one message.
 * Missing bytes read as 0. tests/fuzz/make_service_corpus.py writes inputs
 * in this format.
 *
 * After the program: run the loop until every batcher is idle, check that
 * everything that must be answered was, cancel what is still open, run the
 * loop until idle again, and check that every call is gone and the service
 * has nothing in flight. Build and run with FUZZ_TARGET=service
 * scripts/fuzz.sh; replay_main.c runs the corpus without libFuzzer (CTest
 * fuzz_service_corpus). */
#include <errno.h>
#include <stdarg.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <uv.h>

#include "backend.h"
#include "fake_rpc.h"
#include "grpc_service.pb-c.h"
#include "log.h"
#include "metrics.h"
#include "repository.h"
#include "service.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_MAX_OPS      512
#define FUZZ_MAX_PARAMS   4
#define FUZZ_MAX_INFLIGHT 6    /* server-wide bound on inferences in flight */
#define FUZZ_MAX_RESPONSE 8192 /* answers above this fail: reachable within FUZZ_MAX_ELEMENTS */
#define FUZZ_MAX_ELEMENTS 4096 /* per tensor: forwards stay small */
#define FUZZ_WAIT_MS      2    /* WAIT blocks at most this long */
#define FUZZ_IDLE_NS      (20ull * 1000000000ull) /* the service must go idle by then */
/* Block caches of denoising sequences: a few small ones fit (btb_stack3 at
 * [1, 4, 32]: 4608 bytes), so that eviction is a few calls away. */
#define FUZZ_CACHE_BYTES 8192

enum op {
    OP_UNARY,
    OP_OPEN,
    OP_MSG,
    OP_END,
    OP_CANCEL,
    OP_POLL,
    OP_WAIT,
    OP_PUMP,
    OP_STOP,
    OP_REPEAT,
    OP_PARAM,
    OP_SHUTDOWN,
    OP_LOST,
    OP_FULL,
    OP_COUNT,
};

static const char *const param_keys[] = {
    "timeout",      "stream_intermediate", "priority", "sequence_id", "sequence_start",
    "sequence_end", "block_cache_interval"};

static const enum bs_service_method unary_methods[] = {
    BS_SVC_SERVER_LIVE,     BS_SVC_SERVER_READY,     BS_SVC_MODEL_READY,
    BS_SVC_SERVER_METADATA, BS_SVC_MODEL_METADATA,   BS_SVC_MODEL_INFER,
    BS_SVC_MODEL_CONFIG,    BS_SVC_MODEL_STATISTICS, BS_SVC_REPOSITORY_INDEX,
};

/* The models: golden cases with serving settings that make every queue path
 * cheap to reach. */
static const struct fuzz_model {
    const char *name;
    const char *serving; /* serving.json */
} fuzz_models[] = {
    {"btb_geglu_cross",
     "{\"max_batch_size\": 2, \"max_queue_delay_microseconds\": 1000, \"max_queue_size\": 2}"},
    {"btb_stack3", /* sequences idle out after 2 ms; outputs in BF16 (streamed blocks too) */
     "{\"max_batch_size\": 2, \"max_queue_delay_microseconds\": 500, "
     "\"output_datatype\": \"BF16\", \"preferred_batch_size\": [1], \"max_queue_size\": 4, "
     "\"max_sequence_idle_microseconds\": 2000}"},
    {"ada_group_norm_silu", /* outputs in FP16 */
     "{\"output_datatype\": \"FP16\", \"max_batch_size\": 4, "
     "\"max_queue_delay_microseconds\": 0, \"preferred_batch_size\": [2, 4], "
     "\"max_queue_size\": 3, \"default_timeout_microseconds\": 100000}"},
    {"btb_ada_norm_zero_dit", /* priority levels: level 1 bounded, level 2 (the default) delays */
     "{\"max_batch_size\": 3, \"max_queue_delay_microseconds\": 200, \"max_queue_size\": 3, "
     "\"priority_levels\": 2, \"default_priority_level\": 2, \"priority_queue_policy\": "
     "{\"1\": {\"max_queue_size\": 1}, \"2\": {\"timeout_action\": \"DELAY\", "
     "\"default_timeout_microseconds\": 100}}}"},
};
#define BROKEN_MODEL  "broken"
#define BROKEN_CONFIG "{\"_class_name\": \"BasicTransformerBlock\", \"dim\": 32}"
static const char *const model_files[] = {"config.json", "diffusion_pytorch_model.safetensors"};

static struct {
    uv_loop_t loop;
    uv_timer_t guard;
    struct bs_backend be;
    bs_metrics_t *metrics;
    bs_repository_t *repo;
} g;

__attribute__((format(printf, 1, 2), noreturn)) static void fatal(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "fuzz_service: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

/* ---- the model repository ------------------------------------------------------------------- */

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (f == NULL || fputs(text, f) < 0 || fclose(f) != 0)
        fatal("cannot write %s: %s", path, strerror(errno));
}

/* printf into a path buffer of PATH_MAX bytes; a path that does not fit is fatal. */
__attribute__((format(printf, 2, 3))) static const char *path_of(char *buf, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, PATH_MAX, fmt, ap);
    va_end(ap);
    if (n < 0 || n >= PATH_MAX)
        fatal("path too long: %s...", buf);
    return buf;
}

/* root/<model>/ holding links to the golden case's files and a serving.json. */
static void make_model_dir(const char *root, const char *golden, const char *name,
                           const char *serving)
{
    char dir[PATH_MAX], path[PATH_MAX], target[PATH_MAX];
    if (mkdir(path_of(dir, "%s/%s", root, name), 0700) != 0)
        fatal("mkdir %s: %s", dir, strerror(errno));
    for (size_t i = 0; i < BS_ARRAY_LEN(model_files) && golden != NULL; i++) {
        path_of(target, "%s/%s/%s", golden, name, model_files[i]);
        if (symlink(target, path_of(path, "%s/%s", dir, model_files[i])) != 0)
            fatal("symlink %s: %s", path, strerror(errno));
    }
    write_text(path_of(path, "%s/%s", dir, golden != NULL ? "serving.json" : "config.json"),
               serving);
}

/* Remove what make_repository created (loaded models keep their weights). */
static void remove_model_dir(const char *root, const char *name)
{
    static const char *const files[] = {"config.json", "diffusion_pytorch_model.safetensors",
                                        "serving.json"};
    char path[PATH_MAX];
    for (size_t i = 0; i < BS_ARRAY_LEN(files); i++)
        unlink(path_of(path, "%s/%s/%s", root, name, files[i]));
    rmdir(path_of(path, "%s/%s", root, name));
}

/* A temporary repository: the fuzz models, and BROKEN_MODEL, whose
 * config.json names no weights that exist. */
static void make_repository(char *root)
{
    const char *env = getenv("BS_FUZZ_GOLDEN");
    const char *tmp = getenv("TMPDIR");
    char golden[PATH_MAX];
    if (realpath(env != NULL && env[0] != '\0' ? env : "tests/golden", golden) == NULL)
        fatal("golden cases %s: %s (run from the repository root or set BS_FUZZ_GOLDEN)",
              env ? env : "tests/golden", strerror(errno));
    path_of(root, "%s/bs_fuzz_repo_XXXXXX", tmp != NULL && tmp[0] ? tmp : "/tmp");
    if (mkdtemp(root) == NULL)
        fatal("mkdtemp %s: %s", root, strerror(errno));
    for (size_t i = 0; i < BS_ARRAY_LEN(fuzz_models); i++)
        make_model_dir(root, golden, fuzz_models[i].name, fuzz_models[i].serving);
    make_model_dir(root, NULL, BROKEN_MODEL, BROKEN_CONFIG);
}

static void remove_repository(const char *root)
{
    for (size_t i = 0; i < BS_ARRAY_LEN(fuzz_models); i++)
        remove_model_dir(root, fuzz_models[i].name);
    remove_model_dir(root, BROKEN_MODEL);
    rmdir(root);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    struct bs_err err = {0};
    char root[PATH_MAX];
    const char *dirs[1] = {root};
    struct bs_repo_options ro = {.dirs = dirs, .n_dirs = 1};
    ro.defaults = (struct bs_serving_config){
        .max_batch_size = 2, .max_queue_delay_us = 100, .max_queue_size = 2};
    bs_log_init(0, 0);
    if (uv_loop_init(&g.loop) != 0)
        fatal("uv_loop_init failed");
    uv_timer_init(&g.loop, &g.guard);
    if (bs_backend_cpu_init(&g.be, 1, &err) != 0 || bs_metrics_init(&g.metrics, &g.be, &err) != 0)
        fatal("%s", err.msg);
    ro.metrics = g.metrics;
    make_repository(root);
    int rc = bs_repository_init(&g.repo, &g.loop, &g.be, &ro, &err);
    remove_repository(root);
    if (rc != 0)
        fatal("%s", err.msg);
    for (size_t i = 0; i < BS_ARRAY_LEN(fuzz_models); i++) {
        struct bs_repo_model *rm = bs_repository_find(g.repo, fuzz_models[i].name);
        if (rm == NULL || rm->model == NULL)
            fatal("model %s did not load: %s", fuzz_models[i].name, rm ? rm->reason : "missing");
    }
    return 0;
}

/* ---- the loop ------------------------------------------------------------------------------- */

static void on_guard(uv_timer_t *t)
{
    (void)t;
}

/* One loop iteration that blocks at most FUZZ_WAIT_MS. */
static void run_once(void)
{
    uv_timer_start(&g.guard, on_guard, FUZZ_WAIT_MS, 0);
    uv_run(&g.loop, UV_RUN_ONCE);
    uv_timer_stop(&g.guard);
}

static bool batchers_idle(void)
{
    for (int i = 0; i < bs_repository_count(g.repo); i++) {
        const bs_batcher_t *b = bs_repository_get(g.repo, i)->batcher;
        if (b != NULL && (bs_batcher_queued(b) > 0 || bs_batcher_running(b) > 0))
            return false;
    }
    return true;
}

/* Run the loop (and the transport) until no batcher has work. */
static void settle(void)
{
    uint64_t t0 = uv_hrtime();
    for (;;) {
        fake_rpc_pump();
        if (batchers_idle())
            return;
        if (uv_hrtime() - t0 > FUZZ_IDLE_NS)
            fatal("the batchers still have work after %llu s",
                  (unsigned long long)(FUZZ_IDLE_NS / 1000000000ull));
        run_once();
    }
}

/* ---- one input ------------------------------------------------------------------------------ */

struct reader {
    const uint8_t *p;
    size_t n;
};

static uint8_t take_u8(struct reader *r)
{
    if (r->n == 0)
        return 0;
    r->n--;
    return *r->p++;
}

/* A length-prefixed message; points into the input. */
static const uint8_t *take_msg(struct reader *r, size_t *len)
{
    size_t n = take_u8(r);
    n |= (size_t)take_u8(r) << 8;
    if (n > r->n)
        n = r->n;
    const uint8_t *p = r->p;
    r->p += n;
    r->n -= n;
    *len = n;
    return p;
}

static int64_t deadline_of(uint8_t b)
{
    int64_t now = (int64_t)uv_hrtime();
    switch (b % 6) {
    case 1:
        return 0;
    case 2:
        return now + 1000000;
    case 3:
        return now + 1000000000;
    case 4:
        return INT64_MAX - 1;
    case 5:
        return now;
    default:
        return INT64_MAX;
    }
}

static uint64_t take_u64(struct reader *r)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)take_u8(r) << (8 * i);
    return v;
}

/* A parameter waiting for the next message. */
struct param {
    uint8_t key, kind;
    uint64_t value;
};

/* The client's state within one input. */
struct client {
    int streams[FAKE_RPC_MAX_CALLS];
    int n_streams;
    int n_calls;
    struct param params[FUZZ_MAX_PARAMS];
    int n_params;
    /* the last UNARY or MSG, for REPEAT */
    enum op last;
    enum bs_service_method method;
    uint8_t deadline;
    int stream;
    const uint8_t *msg; /* the input's bytes, or buf */
    size_t len;
    uint8_t *buf; /* a message with parameters appended */
};

/* The message of the op being run: the input's bytes, followed by the
 * pending parameters as a serialized ModelInferRequest (protobuf merges
 * concatenated messages; map entries are kept in order, so a later key
 * wins in the codec). */
static void client_set_msg(struct client *c, const uint8_t *msg, size_t len)
{
    Inference__InferParameter v[FUZZ_MAX_PARAMS];
    Inference__ModelInferRequest__ParametersEntry e[FUZZ_MAX_PARAMS], *ep[FUZZ_MAX_PARAMS];
    Inference__ModelInferRequest r = INFERENCE__MODEL_INFER_REQUEST__INIT;
    char text[FUZZ_MAX_PARAMS][9];
    free(c->buf);
    c->buf = NULL;
    c->msg = msg;
    c->len = len;
    if (c->n_params == 0)
        return;
    for (int i = 0; i < c->n_params; i++) {
        const struct param *p = &c->params[i];
        inference__infer_parameter__init(&v[i]);
        switch (p->kind % 5) {
        case 0:
            v[i].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
            v[i].int64_param = (int64_t)p->value;
            break;
        case 4: {
            uint64_t near = ((uint64_t)1 << (p->value & 63)) + (uint64_t)(int8_t)(p->value >> 8);
            v[i].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
            v[i].int64_param = (int64_t)near; /* two's complement: 2^63 is INT64_MIN */
            break;
        }
        case 1:
            v[i].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_BOOL_PARAM;
            v[i].bool_param = p->value & 1;
            break;
        case 2:
            v[i].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM;
            v[i].uint64_param = p->value;
            break;
        default:
            memcpy(text[i], &p->value, 8);
            text[i][8] = '\0';
            v[i].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
            v[i].string_param = text[i];
            break;
        }
        inference__model_infer_request__parameters_entry__init(&e[i]);
        e[i].key = (char *)param_keys[p->key % BS_ARRAY_LEN(param_keys)];
        e[i].value = &v[i];
        ep[i] = &e[i];
    }
    r.n_parameters = (size_t)c->n_params;
    r.parameters = ep;
    c->n_params = 0;
    size_t extra = inference__model_infer_request__get_packed_size(&r);
    if ((c->buf = malloc(len + extra)) == NULL)
        fatal("out of memory");
    if (len > 0)
        memcpy(c->buf, msg, len);
    inference__model_infer_request__pack(&r, c->buf + len);
    c->msg = c->buf;
    c->len = len + extra;
}

static void client_unary(struct client *c)
{
    if (fake_rpc_unary(c->method, c->msg, c->len, deadline_of(c->deadline)) >= 0)
        c->n_calls++;
}

static void client_msg(struct client *c)
{
    if (c->n_streams > 0)
        fake_rpc_stream_msg(c->streams[c->stream % c->n_streams], c->msg, c->len);
}

static void client_open(struct client *c, uint8_t deadline)
{
    int slot = fake_rpc_stream_open(deadline_of(deadline));
    if (slot < 0)
        return;
    c->n_calls++;
    c->streams[c->n_streams++] = slot;
}

/* The ops that carry, repeat or prepare a request message. */
static void client_request_op(struct client *c, enum op op, struct reader *r)
{
    const uint8_t *msg;
    size_t len;
    switch (op) {
    case OP_UNARY:
        c->method = unary_methods[take_u8(r) % BS_ARRAY_LEN(unary_methods)];
        c->deadline = take_u8(r);
        msg = take_msg(r, &len);
        client_set_msg(c, msg, len);
        c->last = OP_UNARY;
        client_unary(c);
        break;
    case OP_MSG:
        c->stream = take_u8(r);
        msg = take_msg(r, &len);
        client_set_msg(c, msg, len);
        c->last = OP_MSG;
        client_msg(c);
        break;
    case OP_REPEAT:
        for (int i = 0, n = 1 + take_u8(r) % 8; i < n; i++) {
            if (c->last == OP_UNARY)
                client_unary(c);
            else if (c->last == OP_MSG)
                client_msg(c);
        }
        break;
    case OP_PARAM: {
        struct param p = {.key = take_u8(r), .kind = take_u8(r)};
        p.value = take_u64(r);
        if (c->n_params < FUZZ_MAX_PARAMS)
            c->params[c->n_params++] = p;
        break;
    }
    default:
        break;
    }
}

static bs_core_t *fuzz_core; /* this input's inference core */

static void client_step(struct client *c, bs_service_t *svc, enum op op, struct reader *r)
{
    uint8_t a, b;
    switch (op) {
    case OP_UNARY:
    case OP_MSG:
    case OP_REPEAT:
    case OP_PARAM:
        client_request_op(c, op, r);
        break;
    case OP_OPEN:
        client_open(c, take_u8(r));
        break;
    case OP_END:
        a = take_u8(r);
        if (c->n_streams > 0)
            fake_rpc_stream_end(c->streams[a % c->n_streams]);
        break;
    case OP_CANCEL:
        a = take_u8(r);
        b = take_u8(r);
        if (c->n_calls > 0)
            fake_rpc_cancel(a % c->n_calls, b & 1);
        break;
    case OP_POLL:
        uv_run(&g.loop, UV_RUN_NOWAIT);
        break;
    case OP_WAIT:
        run_once();
        break;
    case OP_PUMP:
        fake_rpc_pump();
        break;
    case OP_STOP:
        bs_core_stop_accepting(fuzz_core);
        break;
    case OP_SHUTDOWN:
        bs_service_shutdown(svc);
        break;
    case OP_LOST:
        a = take_u8(r);
        b = take_u8(r);
        fake_rpc_lost(unary_methods[a % BS_ARRAY_LEN(unary_methods)], b & 1);
        break;
    case OP_FULL:
        fake_rpc_set_unsent_full(!fake_rpc_unsent_full());
        break;
    case OP_COUNT:
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* no loop: idle sequences end when a call looks, caches are freed at once */
    struct bs_core_options co = {.max_inflight = FUZZ_MAX_INFLIGHT,
                                 .metrics = g.metrics,
                                 .block_cache_bytes = FUZZ_CACHE_BYTES};
    struct bs_service_options so = {.limits = {FUZZ_MAX_ELEMENTS, BS_CODEC_MAX_INPUTS},
                                    .max_response_bytes = FUZZ_MAX_RESPONSE};
    struct bs_err err = {0};
    struct bs_rpc_handlers h;
    struct client c = {.last = OP_COUNT};
    struct reader r = {data, size};
    bs_service_t *svc;
    if (bs_core_init(&fuzz_core, g.repo, &co, &err) != 0 ||
        bs_service_init(&svc, fuzz_core, &so, &err) != 0)
        fatal("%s", err.msg);
    bs_service_handlers(svc, &h);
    fake_rpc_begin(&h);
    for (int i = 0; i < FUZZ_MAX_OPS && r.n > 0; i++)
        client_step(&c, svc, (enum op)(take_u8(&r) % OP_COUNT), &r);
    free(c.buf);
    settle();
    fake_rpc_check_answered();
    fake_rpc_cancel_open();
    settle();
    fake_rpc_end();
    if (bs_core_in_flight(fuzz_core) != 0)
        fatal("%d inferences still in flight with every call gone", bs_core_in_flight(fuzz_core));
    bs_service_free(svc);
    bs_core_free(fuzz_core);
    fuzz_core = NULL;
    return 0;
}
