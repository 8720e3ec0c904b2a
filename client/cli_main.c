/* blockserve-cli: health, models, metadata, infer, stream, bench, load,
 * unload, shm and make-request against a blockserve (or any KServe v2)
 * server, over gRPC or HTTP/REST. Exit status: 0 success, 1 failure (the
 * message says why), 2 usage error. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "blockserve_client.h"
#include "cli_args.h"
#include "cli_inputs.h"
#include "cli_shm.h"
#include "http_client.h"
#include "tensor.h"
#include "version.h"

#define MAX_OUTPUTS 8

static int report(const struct cli *a, const struct bs_client_err *err)
{
    fprintf(stderr, "blockserve-cli %s: %s\n", a->cmd, err->msg);
    return 1;
}

static int connect_or_report(struct cli *a, struct cli_conn *conn)
{
    struct bs_client_err err = {0};
    memset(conn, 0, sizeof(*conn));
    if (a->http ? bs_http_init(&conn->http, &a->co, (enum bs_http_encoding)a->compress, &err)
                : bs_client_connect(&conn->grpc, &a->co, &err))
        return report(a, &err);
    return 0;
}

static void conn_free(struct cli_conn *conn)
{
    bs_client_free(conn->grpc);
    bs_http_free(conn->http);
    memset(conn, 0, sizeof(*conn));
}

static int need_grpc(const struct cli *a, const struct cli_conn *conn)
{
    if (conn->http) {
        fprintf(stderr, "blockserve-cli %s: not over HTTP (ModelStreamInfer is gRPC's)\n", a->cmd);
        return 1;
    }
    return 0;
}

static int need_model(const struct cli *a)
{
    if (a->model == NULL) {
        fprintf(stderr, "blockserve-cli %s: missing MODEL\n", a->cmd);
        return 2;
    }
    return 0;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A JSON string literal of s (quotes and control characters escaped). */
static void print_json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

/* ---- health, models, metadata ------------------------------------------- */

/* A call that the server refused for want of credentials. */
static bool needs_credentials(const struct bs_client_err *err)
{
    return err->grpc_status == 16 /* UNAUTHENTICATED */ ||
           err->grpc_status == 7 /* PERMISSION_DENIED */;
}

/* grpc.health.v1 first: servers with authentication answer it without a
 * token. ServerLive/ServerReady then, unless they need credentials we lack;
 * servers without grpc.health.v1 (UNIMPLEMENTED) are judged by ServerReady. */
/* HTTP: /v2/health/live, /v2/health/ready and the model's /ready. */
static int cmd_health_http(struct cli *a, bs_http_t *h)
{
    struct bs_client_err err = {0};
    bool live = false, ready = false, model_ready = true;
    if (bs_http_server_live(h, &live, &err) != 0 || bs_http_server_ready(h, &ready, &err) != 0)
        return report(a, &err);
    if (a->model && bs_http_model_ready(h, a->model, &model_ready, &err) != 0)
        return report(a, &err);
    printf("%s: live %s, ready %s", bs_http_base(h), live ? "yes" : "no", ready ? "yes" : "no");
    if (a->model)
        printf(", model %s ready %s", a->model, model_ready ? "yes" : "no");
    printf("\n");
    if (!ready || !model_ready) {
        fprintf(stderr, "blockserve-cli health: %s is not ready\n",
                ready ? a->model : "the server");
        return 1;
    }
    return 0;
}

static int cmd_health(struct cli *a, struct cli_conn *conn)
{
    if (conn->http)
        return cmd_health_http(a, conn->http);
    bs_client_t *c = conn->grpc;
    static const char *const serving[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
    struct bs_client_err err = {0};
    bool live = false, ready = false, model_ready = true, checked = true;
    int hs = -1;
    if (bs_client_health_check(c, "", &hs, &err) != 0 && err.grpc_status != 12 /* UNIMPLEMENTED */)
        return report(a, &err);
    if (bs_client_server_live(c, &live, &err) != 0 ||
        bs_client_server_ready(c, &ready, &err) != 0) {
        if (!needs_credentials(&err) || hs < 0)
            return report(a, &err);
        checked = false; /* ServerLive/Ready need a token: grpc.health.v1 decides */
        live = ready = hs == 1;
    }
    if (a->model && bs_client_model_ready(c, a->model, &model_ready, &err) != 0)
        return report(a, &err);
    printf("%s: grpc.health.v1 %s", bs_client_target(c),
           hs < 0    ? "not served"
           : hs <= 3 ? serving[hs]
                     : "?");
    if (checked)
        printf(", live %s, ready %s", live ? "yes" : "no", ready ? "yes" : "no");
    else
        printf(", ready %s (ServerReady needs a token)", ready ? "yes" : "no");
    if (a->model)
        printf(", model %s ready %s", a->model, model_ready ? "yes" : "no");
    printf("\n");
    if (!ready || !model_ready || (hs >= 0 && hs != 1)) {
        fprintf(stderr, "blockserve-cli health: %s is not ready\n",
                ready && hs == 1 ? a->model : "the server");
        return 1;
    }
    return 0;
}

static int cmd_models(struct cli *a, struct cli_conn *conn)
{
    struct bs_client_err err = {0};
    Inference__RepositoryIndexResponse *r;
    if ((conn->http ? bs_http_repository_index(conn->http, &r, &err)
                    : bs_client_repository_index(conn->grpc, &r, &err)) != 0)
        return report(a, &err);
    if (a->json)
        printf("[");
    for (size_t i = 0; i < r->n_models; i++) {
        const Inference__RepositoryIndexResponse__ModelIndex *m = r->models[i];
        if (a->json) {
            printf("%s{\"name\": ", i ? ", " : "");
            print_json_str(m->name);
            printf(", \"version\": ");
            print_json_str(m->version);
            printf(", \"state\": ");
            print_json_str(m->state);
            printf(", \"reason\": ");
            print_json_str(m->reason);
            printf("}");
        } else
            printf("%s\t%s\t%s%s%s\n", m->name, m->version[0] ? m->version : "-", m->state,
                   m->reason[0] ? "\t" : "", m->reason);
    }
    if (a->json)
        printf("]\n");
    bs_client_msg_free(r);
    return 0;
}

static void print_tensor_meta(const char *kind,
                              const Inference__ModelMetadataResponse__TensorMetadata *t,
                              bool optional, bool json, bool first)
{
    if (json) {
        printf("%s{\"name\": \"%s\", \"datatype\": \"%s\", \"shape\": [", first ? "" : ", ",
               t->name, t->datatype);
        for (size_t k = 0; k < t->n_shape; k++)
            printf("%s%lld", k ? ", " : "", (long long)t->shape[k]);
        printf("], \"optional\": %s}", optional ? "true" : "false");
        return;
    }
    printf("%s %s %s [", kind, t->name, t->datatype);
    for (size_t k = 0; k < t->n_shape; k++)
        printf("%s%lld", k ? ", " : "", (long long)t->shape[k]);
    printf("]%s\n", optional ? " (optional)" : "");
}

static int cmd_metadata(struct cli *a, struct cli_conn *conn)
{
    struct bs_client_err err = {0};
    Inference__ModelMetadataResponse *m;
    Inference__ModelConfigResponse *cfg = NULL;
    char optional[16][BS_CT_MAX_NAME];
    int n_optional = 0;
    if (cli_model_metadata(a, conn, &m, &err) != 0)
        return report(a, &err);
    if (conn->http &&
        bs_http_optional_inputs(conn->http, a->model, optional, 16, &n_optional, &err) != 0)
        n_optional = 0;
    if (conn->grpc && bs_client_model_config(conn->grpc, a->model, &cfg, &err) != 0)
        cfg = NULL;
    if (a->json)
        printf("{\"name\": \"%s\", \"platform\": \"%s\", \"inputs\": [", m->name, m->platform);
    else
        printf("model %s platform %s versions %s\n", m->name, m->platform,
               m->n_versions ? m->versions[0] : "-");
    for (size_t i = 0; i < m->n_inputs; i++) {
        bool opt = false;
        for (size_t k = 0; cfg && cfg->config && k < cfg->config->n_input; k++)
            if (!strcmp(cfg->config->input[k]->name, m->inputs[i]->name))
                opt = cfg->config->input[k]->optional;
        for (int k = 0; k < n_optional; k++)
            opt |= !strcmp(optional[k], m->inputs[i]->name);
        print_tensor_meta("input", m->inputs[i], opt, a->json, i == 0);
    }
    if (a->json)
        printf("], \"outputs\": [");
    for (size_t i = 0; i < m->n_outputs; i++)
        print_tensor_meta("output", m->outputs[i], false, a->json, i == 0);
    if (a->json)
        printf("]}\n");
    bs_client_msg_free(m);
    bs_client_msg_free(cfg);
    return 0;
}

/* ---- infer, stream ---------------------------------------------------------- */

static void print_outputs(const struct bs_ctensor *t, int n, const char *prefix)
{
    for (int i = 0; i < n; i++) {
        char sb[128];
        printf("%s%s %s %s", prefix, t[i].name, t[i].datatype,
               bs_ct_shape_str(&t[i], sb, sizeof(sb)));
        bool f32 = !strcmp(t[i].datatype, "FP32"), f16 = !strcmp(t[i].datatype, "FP16");
        if (f32 || f16 || !strcmp(t[i].datatype, "BF16")) {
            int64_t ne = bs_ct_nelements(&t[i]);
            const uint16_t *h = t[i].data;
            printf(" [");
            for (int64_t k = 0; k < ne && k < 4; k++)
                printf("%s%.6g", k ? ", " : "",
                       f32   ? (double)((const float *)t[i].data)[k]
                       : f16 ? (double)bs_fp16_to_f32(h[k])
                             : (double)bs_bf16_to_f32(h[k]));
            printf("%s]", ne > 4 ? ", ..." : "");
        }
        printf("\n");
    }
}

/* Decode a serialized response's outputs into out (freed by the caller). */
static int response_outputs(const Inference__ModelInferResponse *r, struct bs_ctensor *out, int *n,
                            struct bs_client_err *err)
{
    return bs_client_response_outputs(r, out, MAX_OUTPUTS, n, err);
}

static int write_outputs(const struct cli *a, const struct bs_ctensor *t, int n,
                         struct bs_client_err *err)
{
    struct bs_err e = {0};
    if (bs_ct_write_file(a->output, t, n, &e) != 0) {
        snprintf(err->msg, sizeof(err->msg), "--output %s", e.msg);
        return err->code = e.code;
    }
    return 0;
}

/* One infer call over conn with io's id, outputs and shared memory: out
 * gets the outputs (data NULL for those in shared memory). */
static int infer_once(struct cli *a, struct cli_conn *conn, const struct cli_inputs *in,
                      const struct bs_client_infer_opts *io, struct bs_ctensor *out, int *n_out,
                      struct bs_client_err *err)
{
    *n_out = 0;
    if (conn->http)
        return bs_http_infer(conn->http, a->model, in->t, in->n, io, a->http_json, out, MAX_OUTPUTS,
                             n_out, err);
    uint8_t *req = NULL, *resp = NULL;
    size_t req_len, resp_len;
    Inference__ModelInferResponse *r = NULL;
    int rc = bs_client_pack_infer_request_ex(a->model, in->t, in->n, io, &req, &req_len, err);
    if (rc == 0)
        rc = bs_client_call_raw(conn->grpc, BS_CLIENT_METHOD("ModelInfer"), req, req_len, 0, &resp,
                                &resp_len, err);
    if (rc == 0 && (r = inference__model_infer_response__unpack(NULL, resp_len, resp)) == NULL) {
        snprintf(err->msg, sizeof(err->msg), "cannot parse the ModelInferResponse");
        rc = err->code = BS_EFORMAT;
    }
    if (rc == 0)
        rc = io->out_shm ? bs_client_response_output_meta(r, out, MAX_OUTPUTS, n_out, err)
                         : response_outputs(r, out, n_out, err);
    bs_client_msg_free(r);
    free(resp);
    free(req);
    return rc;
}

/* Copy each output from its part of slot 0 of the region. */
static int read_shm_outputs(const struct cli_shm *s, struct bs_ctensor *out, int n,
                            struct bs_client_err *err)
{
    for (int i = 0; i < n; i++) {
        int k = 0;
        while (k < s->n_out && strcmp(s->out_names[k], out[i].name) != 0)
            k++;
        if (k == s->n_out || out[i].nbytes > s->out_size[k]) {
            err->code = BS_EFORMAT;
            snprintf(err->msg, sizeof(err->msg),
                     "--shm: output '%s' (%zu bytes) is not in the region's %zu bytes for it",
                     out[i].name, out[i].nbytes, k < s->n_out ? s->out_size[k] : 0);
            return err->code;
        }
        if (out[i].data == NULL &&
            (out[i].data = malloc(out[i].nbytes ? out[i].nbytes : 1)) == NULL)
            return err->code = BS_ENOMEM;
        memcpy(out[i].data, s->base + s->out_off[k], out[i].nbytes);
    }
    return 0;
}

/* The request's extras: --id, the model's outputs by name (HTTP binary data
 * asks for each; --shm gives each its part of the region). */
struct infer_plan {
    Inference__ModelMetadataResponse *m;
    const char *outputs[CLI_SHM_MAX_OUTPUTS];
    struct bs_client_infer_opts io;
    struct cli_shm shm;
    bool shm_open;
};

static int plan_init(struct cli *a, struct cli_conn *conn, const struct cli_inputs *in, int slots,
                     struct infer_plan *p, struct bs_client_err *err)
{
    memset(p, 0, sizeof(*p));
    p->io.id = a->id;
    p->io.output_datatype = a->output_datatype;
    p->shm.fd = -1;
    if (!a->shm && !conn->http)
        return 0; /* gRPC: every output, raw, as before */
    int rc = cli_model_metadata(a, conn, &p->m, err);
    if (rc != 0 && !a->shm) {
        p->m = NULL; /* HTTP without names: every output as binary data ("binary_data_output") */
        return 0;
    }
    if (rc != 0)
        return rc;
    for (size_t k = 0; k < p->m->n_outputs && k < CLI_SHM_MAX_OUTPUTS; k++)
        p->outputs[k] = p->m->outputs[k]->name;
    p->io.outputs = p->outputs;
    p->io.n_outputs =
        (int)(p->m->n_outputs < CLI_SHM_MAX_OUTPUTS ? p->m->n_outputs : CLI_SHM_MAX_OUTPUTS);
    if (!a->shm)
        return 0;
    p->shm_open = true;
    return cli_shm_open(&p->shm, conn, p->m, in, slots, err);
}

static void plan_free(struct infer_plan *p, struct cli_conn *conn)
{
    if (p->shm_open)
        cli_shm_close(&p->shm, conn);
    bs_client_msg_free(p->m);
}

static int cmd_infer(struct cli *a, struct cli_conn *conn)
{
    struct bs_client_err err = {0};
    struct cli_inputs in;
    struct bs_ctensor out[MAX_OUTPUTS];
    struct bs_client_shm_ref in_refs[CLI_MAX_TENSORS], out_refs[CLI_SHM_MAX_OUTPUTS];
    struct infer_plan p;
    int n_out = 0;
    if (cli_inputs_load(a, conn, &in, &err) != 0)
        return report(a, &err);
    int rc = plan_init(a, conn, &in, 1, &p, &err);
    if (rc == 0 && a->shm) {
        cli_shm_refs(&p.shm, &in, 0, in_refs, out_refs);
        p.io.in_shm = in_refs;
        p.io.out_shm = out_refs;
    }
    double t0 = now_s();
    if (rc == 0)
        rc = infer_once(a, conn, &in, &p.io, out, &n_out, &err);
    double ms = (now_s() - t0) * 1e3;
    if (rc == 0 && a->shm)
        rc = read_shm_outputs(&p.shm, out, n_out, &err);
    if (rc == 0 && a->output)
        rc = write_outputs(a, out, n_out, &err);
    if (rc == 0) {
        print_outputs(out, n_out, "output ");
        printf("latency_ms %.3f%s%s\n", ms, a->output ? " written to " : "",
               a->output ? a->output : "");
    }
    for (int i = 0; i < n_out; i++)
        bs_ct_free(&out[i]);
    plan_free(&p, conn);
    cli_inputs_free(&in);
    return rc == 0 ? 0 : report(a, &err);
}

/* Read one stream response and print its status; *failed counts errors. */
static int stream_read_one(struct cli *a, bs_client_stream_t *s, const double *t_sent, int64_t n,
                           int64_t *failed, struct bs_client_err *err)
{
    Inference__ModelStreamInferResponse *r;
    int rc = bs_client_stream_read(s, &r, err);
    if (rc == 1) {
        rc = bs_client_stream_finish(s, err);
        if (rc == 0)
            snprintf(err->msg, sizeof(err->msg), "the server ended the stream early");
        return rc ? rc : BS_EIO;
    }
    if (rc != 0)
        return rc;
    const Inference__ModelInferResponse *ir = r->infer_response;
    const char *id = ir && ir->id ? ir->id : "";
    char *end;
    long long k = strtoll(id, &end, 10);
    double ms = *end == '\0' && k >= 0 && k < n ? (now_s() - t_sent[k]) * 1e3 : -1;
    if (r->error_message && r->error_message[0]) {
        (*failed)++;
        printf("id %s error: %s\n", id[0] ? id : "?", r->error_message);
    } else {
        struct bs_ctensor out[MAX_OUTPUTS];
        int n_out = 0;
        printf("id %s ok latency_ms %.3f", id, ms);
        if (ir && response_outputs(ir, out, &n_out, err) == 0) {
            print_outputs(out, n_out, " ");
            for (int i = 0; i < n_out; i++)
                bs_ct_free(&out[i]);
        } else {
            printf(" (outputs unreadable)\n");
            (*failed)++;
        }
    }
    bs_client_msg_free(r);
    return 0;
}

/* The request with id set to i ("0", "1", ...). */
static int stream_request(struct cli *a, const struct cli_inputs *in, int64_t i, uint8_t **buf,
                          size_t *len, struct bs_client_err *err)
{
    char id[32];
    snprintf(id, sizeof(id), "%lld", (long long)i);
    struct bs_client_infer_opts o = {.id = id, .output_datatype = a->output_datatype};
    return bs_client_pack_infer_request_ex(a->model, in->t, in->n, &o, buf, len, err);
}

static int cmd_stream(struct cli *a, struct cli_conn *conn)
{
    struct bs_client_err err = {0};
    struct cli_inputs in;
    bs_client_stream_t *s = NULL;
    bs_client_t *c = conn->grpc;
    if (need_grpc(a, conn))
        return 1;
    int64_t n = a->count > 0 ? a->count : 1, sent = 0, done = 0, failed = 0;
    double *t_sent = calloc((size_t)n, sizeof(double)), t0 = now_s();
    if (t_sent == NULL || cli_inputs_load(a, conn, &in, &err) != 0) {
        free(t_sent);
        return t_sent ? report(a, &err) : 1;
    }
    int rc = bs_client_stream_open(c, 0, &s, &err);
    while (rc == 0 && done < n) {
        while (rc == 0 && sent < n && sent - done < a->window) {
            uint8_t *buf = NULL;
            size_t len = 0;
            rc = stream_request(a, &in, sent, &buf, &len, &err);
            t_sent[sent] = now_s();
            if (rc == 0)
                rc = bs_client_stream_write(s, buf, len, &err);
            free(buf);
            sent += rc == 0;
        }
        if (rc == 0)
            rc = stream_read_one(a, s, t_sent, n, &failed, &err);
        done += rc == 0;
    }
    if (rc == 0)
        rc = bs_client_stream_finish(s, &err);
    if (rc == 0)
        printf("stream: %lld responses, %lld ok, %lld failed, %.3f s\n", (long long)done,
               (long long)(done - failed), (long long)failed, now_s() - t0);
    bs_client_stream_free(s);
    cli_inputs_free(&in);
    free(t_sent);
    if (rc != 0)
        return report(a, &err);
    if (failed > 0)
        fprintf(stderr, "blockserve-cli stream: %lld of %lld requests failed\n", (long long)failed,
                (long long)n);
    return failed > 0;
}

/* ---- bench ------------------------------------------------------------------ */

static void print_bench_text(const struct cli *a, struct bs_bench_result *r)
{
    struct bs_latency_summary s;
    struct bs_latency_bucket b[10];
    bs_latency_summarize(&r->lat, &s);
    int nb = bs_latency_histogram(&r->lat, b, 10);
    printf("Summary:\n  Count:\t%lld\n  Total:\t%.3f s\n  Slowest:\t%.3f ms\n"
           "  Fastest:\t%.3f ms\n  Average:\t%.3f ms\n  Requests/sec:\t%.2f\n\n",
           (long long)r->count, r->elapsed_s, s.max_us / 1e3, s.min_us / 1e3, s.mean_us / 1e3,
           r->elapsed_s > 0 ? (double)r->count / r->elapsed_s : 0);
    size_t most = 1;
    for (int i = 0; i < nb; i++)
        most = b[i].count > most ? b[i].count : most;
    printf("Response time histogram (ms):\n");
    for (int i = 0; i < nb; i++) {
        printf("  %10.3f [%zu]\t|", b[i].upper_us / 1e3, b[i].count);
        for (size_t k = 0; k < b[i].count * 40 / most; k++)
            printf("#");
        printf("\n");
    }
    printf("\nLatency distribution:\n  50 %% in %.3f ms\n  90 %% in %.3f ms\n"
           "  95 %% in %.3f ms\n  99 %% in %.3f ms\n\nStatus code distribution:\n",
           s.p50_us / 1e3, s.p90_us / 1e3, s.p95_us / 1e3, s.p99_us / 1e3);
    for (int k = 0; k < BS_BENCH_N_STATUS; k++)
        if (r->status[k])
            printf("  [%s]\t%lld responses\n", bs_bench_status_name(k), (long long)r->status[k]);
    if (r->first_error[0])
        printf("\nFirst error: %s\n", r->first_error);
    BS_UNUSED(a);
}

static void print_bench_json(const struct cli *a, struct bs_bench_result *r)
{
    struct bs_latency_summary s;
    struct bs_latency_bucket b[10];
    bs_latency_summarize(&r->lat, &s);
    int nb = bs_latency_histogram(&r->lat, b, 10);
    printf("{\"model\": ");
    print_json_str(a->model);
    printf(", \"transport\": \"%s\", \"shm\": %s",
           !a->http       ? "grpc"
           : a->http_json ? "http-json"
                          : "http",
           a->shm ? "true" : "false");
    printf(", \"stream\": %s, \"concurrency\": %d, \"count\": %lld, \"total_s\": %.6f, "
           "\"rps\": %.3f, \"latency_ms\": {\"min\": %.4f, \"avg\": %.4f, \"max\": %.4f, "
           "\"p50\": %.4f, \"p90\": %.4f, \"p95\": %.4f, \"p99\": %.4f}, \"histogram\": [",
           a->stream ? "true" : "false", a->concurrency, (long long)r->count, r->elapsed_s,
           r->elapsed_s > 0 ? (double)r->count / r->elapsed_s : 0, s.min_us / 1e3, s.mean_us / 1e3,
           s.max_us / 1e3, s.p50_us / 1e3, s.p90_us / 1e3, s.p95_us / 1e3, s.p99_us / 1e3);
    for (int i = 0; i < nb; i++)
        printf("%s{\"upper_ms\": %.4f, \"count\": %zu}", i ? ", " : "", b[i].upper_us / 1e3,
               b[i].count);
    printf("], \"status_codes\": {");
    for (int k = 0, first = 1; k < BS_BENCH_N_STATUS; k++)
        if (r->status[k]) {
            printf("%s\"%s\": %lld", first ? "" : ", ", bs_bench_status_name(k),
                   (long long)r->status[k]);
            first = 0;
        }
    /* the latencies of each status apart (admitted versus rejected calls), and
       how late calls started after their scheduled time (--rps: open loop) */
    printf("}, \"latency_ms_by_status\": {");
    for (int k = 0, first = 1; k < BS_BENCH_N_STATUS; k++)
        if (r->status[k]) {
            bs_latency_summarize(&r->lat_status[k], &s);
            printf("%s\"%s\": {\"count\": %zu, \"min\": %.4f, \"avg\": %.4f, \"max\": %.4f, "
                   "\"p50\": %.4f, \"p90\": %.4f, \"p95\": %.4f, \"p99\": %.4f}",
                   first ? "" : ", ", bs_bench_status_name(k), s.count, s.min_us / 1e3,
                   s.mean_us / 1e3, s.max_us / 1e3, s.p50_us / 1e3, s.p90_us / 1e3, s.p95_us / 1e3,
                   s.p99_us / 1e3);
            first = 0;
        }
    bs_latency_summarize(&r->start_lag, &s);
    printf("}, \"start_lag_ms\": {\"p50\": %.4f, \"p99\": %.4f, \"max\": %.4f}", s.p50_us / 1e3,
           s.p99_us / 1e3, s.max_us / 1e3);
    printf(", \"first_error\": ");
    print_json_str(r->first_error);
    printf("}\n");
}

/* Serialize one request for conn's transport into r. */
static int pack_for(struct cli *a, struct cli_conn *conn, const struct cli_inputs *in,
                    const struct bs_client_infer_opts *io, struct bs_bench_req *r,
                    struct bs_client_err *err)
{
    uint8_t *buf = NULL;
    size_t len = 0, hl = 0;
    int rc = conn->http
                 ? bs_http_pack_infer(in->t, in->n, io, a->http_json, &buf, &len, &hl, err)
                 : bs_client_pack_infer_request_ex(a->model, in->t, in->n, io, &buf, &len, err);
    if (rc == 0)
        *r = (struct bs_bench_req){buf, len, hl};
    return rc;
}

/* The requests: one, or with --shm one per slot, each naming its own part of the region. */
static int bench_requests(struct cli *a, struct cli_conn *conn, const struct cli_inputs *in,
                          struct infer_plan *p, struct bs_bench_req *reqs, int n,
                          struct bs_client_err *err)
{
    struct bs_client_shm_ref in_refs[CLI_MAX_TENSORS], out_refs[CLI_SHM_MAX_OUTPUTS];
    for (int k = 0; k < n; k++) {
        if (a->shm) {
            cli_shm_refs(&p->shm, in, k, in_refs, out_refs);
            p->io.in_shm = in_refs;
            p->io.out_shm = out_refs;
        }
        int rc = pack_for(a, conn, in, &p->io, &reqs[k], err);
        if (rc != 0)
            return rc;
    }
    return 0;
}

static int cmd_bench(struct cli *a, struct cli_conn *conn)
{
    struct bs_client_err err = {0};
    struct cli_inputs in = {0};
    struct infer_plan p = {0};
    char path[512] = "";
    bs_client_t *extra[64] = {conn->grpc};
    int n_clients = 1, rc, n_reqs = a->shm ? a->concurrency : 1;
    if (a->count <= 0 && a->duration_s <= 0) {
        fprintf(stderr, "blockserve-cli bench: give -n COUNT or -z DURATION\n");
        return 2;
    }
    if (a->stream && need_grpc(a, conn))
        return 2;
    struct bs_bench_req *reqs = calloc((size_t)n_reqs, sizeof(*reqs));
    if (reqs == NULL)
        return 1;
    if ((rc = cli_inputs_load(a, conn, &in, &err)) == 0)
        rc = plan_init(a, conn, &in, n_reqs, &p, &err);
    if (rc == 0)
        rc = bench_requests(a, conn, &in, &p, reqs, n_reqs, &err);
    if (rc == 0 && conn->http && bs_http_model_path(path, sizeof(path), a->model, NULL, "/infer"))
        rc = BS_EINVAL;
    struct bs_client_options co = a->co;
    co.own_connection = true;
    for (; rc == 0 && conn->grpc && n_clients < a->connections && n_clients < 64; n_clients++)
        rc = bs_client_connect(&extra[n_clients], &co, &err);
    struct bs_bench_opts o = {
        .concurrency = a->concurrency,
        .count = a->count,
        .duration_s = a->duration_s,
        .rps = a->rps,
        .stream = a->stream,
        .threads = a->threads,
        .timeout_s = a->co.call_timeout_s > 0 ? a->co.call_timeout_s : 10,
        .req = reqs[0].req,
        .req_len = reqs[0].len,
        .header_len = reqs[0].header_len,
        .slot_reqs = a->shm ? reqs : NULL,
        .http = conn->http,
        .http_path = path,
    };
    struct bs_bench_result r = {0};
    if (rc == 0)
        rc = bs_bench_run(conn->http ? NULL : extra, conn->http ? 0 : n_clients, &o, &r, &err);
    if (rc == 0 && a->json)
        print_bench_json(a, &r);
    else if (rc == 0)
        print_bench_text(a, &r);
    bs_bench_result_free(&r);
    for (int i = 1; i < n_clients; i++)
        bs_client_free(extra[i]);
    for (int k = 0; k < n_reqs; k++)
        free((void *)reqs[k].req);
    free(reqs);
    plan_free(&p, conn);
    cli_inputs_free(&in);
    if (rc != 0)
        return report(a, &err);
    return r.status[0] == r.count ? 0 : 1; /* any failed call fails the run */
}

/* ---- load, unload, shm ------------------------------------------------------- */

static int cmd_load(struct cli *a, struct cli_conn *conn)
{
    struct bs_client_err err = {0};
    bool load = !strcmp(a->cmd, "load");
    int rc =
        conn->http
            ? (load ? bs_http_model_load : bs_http_model_unload)(conn->http, a->model, &err)
            : (load ? bs_client_model_load : bs_client_model_unload)(conn->grpc, a->model, &err);
    if (rc != 0)
        return report(a, &err);
    printf("%s: %s\n", a->model, load ? "loaded" : "unloaded");
    return 0;
}

static int shm_status(struct cli *a, struct cli_conn *conn, const char *name)
{
    struct bs_client_err err = {0};
    struct bs_client_shm_region g[64];
    int n = 0;
    int rc = conn->http ? bs_http_shm_status(conn->http, name, g, 64, &n, &err)
                        : bs_client_shm_status(conn->grpc, name, g, 64, &n, &err);
    if (rc != 0)
        return report(a, &err);
    for (int i = 0; i < n; i++)
        printf("%s\t%s\t%llu\t%llu\n", g[i].name, g[i].key, (unsigned long long)g[i].offset,
               (unsigned long long)g[i].byte_size);
    return 0;
}

static int shm_register(struct cli *a, struct cli_conn *conn)
{
    struct bs_client_err err = {0};
    char *end;
    errno = 0;
    unsigned long long size = strtoull(a->args[3], &end, 10);
    if (*end || end == a->args[3] || errno || a->args[3][0] == '-' || size == 0) {
        fprintf(stderr,
                "blockserve-cli shm register: SIZE: expected a byte count > 0, got \"%s\"\n",
                a->args[3]);
        return 2;
    }
    const char *name = a->args[1], *key = a->args[2];
    int rc = conn->http
                 ? bs_http_shm_register(conn->http, name, key, (uint64_t)a->offset, size, &err)
                 : bs_client_shm_register(conn->grpc, name, key, (uint64_t)a->offset, size, &err);
    if (rc != 0)
        return report(a, &err);
    printf("%s: registered %s offset %lld byte_size %llu\n", name, key, (long long)a->offset, size);
    return 0;
}

static int cmd_shm(struct cli *a, struct cli_conn *conn)
{
    struct bs_client_err err = {0};
    const char *act = a->args[0], *name = a->n_args > 1 ? a->args[1] : "";
    if (!strcmp(act, "register"))
        return shm_register(a, conn);
    if (!strcmp(act, "status"))
        return shm_status(a, conn, name);
    int rc = conn->http ? bs_http_shm_unregister(conn->http, name, &err)
                        : bs_client_shm_unregister(conn->grpc, name, &err);
    if (rc != 0)
        return report(a, &err);
    printf("%s: unregistered\n", name[0] ? name : "every region");
    return 0;
}

/* shm ACTION's words: register NAME KEY SIZE, status [NAME], unregister [NAME]. */
static int shm_usage_ok(const struct cli *a)
{
    const char *act = a->args[0];
    int n = a->n_args;
    if (!strcmp(act, "register")                               ? n == 4
        : !strcmp(act, "status") || !strcmp(act, "unregister") ? n <= 2
                                                               : false)
        return 0;
    fprintf(stderr, "blockserve-cli shm: usage: shm register NAME KEY SIZE [--offset O] | "
                    "shm status [NAME] | shm unregister [NAME]\n");
    return 2;
}

/* ---- make-request ------------------------------------------------------------ */

static void write_base64(FILE *f, const uint8_t *p, size_t n)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) |
                     (i + 2 < n ? p[i + 2] : 0);
        char q[4] = {tbl[v >> 18], tbl[(v >> 12) & 63], i + 1 < n ? tbl[(v >> 6) & 63] : '=',
                     i + 2 < n ? tbl[v & 63] : '='};
        fwrite(q, 1, 4, f);
    }
}

/* The request as protobuf JSON (ghz -D / -d): names, datatypes, shapes and
 * base64 raw_input_contents. */
static void write_json_request(FILE *f, const struct cli *a, const struct cli_inputs *in)
{
    fprintf(f, "{\"model_name\": \"%s\", \"inputs\": [", a->model);
    for (int i = 0; i < in->n; i++) {
        fprintf(f, "%s{\"name\": \"%s\", \"datatype\": \"%s\", \"shape\": [", i ? ", " : "",
                in->t[i].name, in->t[i].datatype);
        for (int k = 0; k < in->t[i].n_dims; k++)
            fprintf(f, "%s%lld", k ? ", " : "", (long long)in->t[i].shape[k]);
        fprintf(f, "]}");
    }
    fprintf(f, "], \"raw_input_contents\": [");
    for (int i = 0; i < in->n; i++) {
        fprintf(f, "%s\"", i ? ", " : "");
        write_base64(f, in->t[i].data, in->t[i].nbytes);
        fprintf(f, "\"");
    }
    fprintf(f, "]}\n");
}

static int cmd_make_request(struct cli *a)
{
    struct bs_client_err err = {0};
    struct cli_inputs in;
    struct cli_conn c = {0};
    uint8_t *req = NULL;
    size_t len = 0;
    if (a->out == NULL) {
        fprintf(stderr, "blockserve-cli make-request: missing --out FILE\n");
        return 2;
    }
    if (cli_inputs_need_server(a) && connect_or_report(a, &c) != 0)
        return 1;
    int rc = cli_inputs_load(a, &c, &in, &err);
    if (rc == 0 && a->format == CLI_FORMAT_BIN)
        rc = bs_client_pack_infer_request(a->model, a->id, in.t, in.n, &req, &len, &err);
    FILE *f = rc == 0 ? fopen(a->out, "wb") : NULL;
    if (rc == 0 && f == NULL) {
        snprintf(err.msg, sizeof(err.msg), "--out %s: cannot open for writing", a->out);
        rc = BS_EIO;
    }
    if (f != NULL) {
        if (req != NULL)
            fwrite(req, 1, len, f);
        else
            write_json_request(f, a, &in);
        if (ferror(f) | fclose(f)) {
            snprintf(err.msg, sizeof(err.msg), "--out %s: write failed", a->out);
            rc = BS_EIO;
        }
    }
    if (rc == 0)
        printf("%s: ModelInferRequest for %s with %d inputs (%s)\n", a->out, a->model, in.n,
               req ? "binary protobuf, ghz -B" : "JSON, ghz -D");
    cli_inputs_free(&in);
    free(req);
    conn_free(&c);
    return rc == 0 ? 0 : report(a, &err);
}

/* ---- dispatch ---------------------------------------------------------------- */

int main(int argc, char **argv)
{
    static const struct {
        const char *name;
        bool model;
        int (*fn)(struct cli *, struct cli_conn *);
    } cmds[] = {
        {"health", false, cmd_health},    {"models", false, cmd_models},
        {"metadata", true, cmd_metadata}, {"infer", true, cmd_infer},
        {"stream", true, cmd_stream},     {"bench", true, cmd_bench},
        {"load", true, cmd_load},         {"unload", true, cmd_load},
        {"shm", false, cmd_shm},
    };
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "help")) {
        cli_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "version") || !strcmp(argv[1], "--version")) {
        printf("blockserve-cli %s\n", BS_VERSION);
        return 0;
    }
    struct cli a;
    int parsed = cli_parse(argc - 1, argv + 1, &a);
    if (parsed != 0)
        return parsed > 0 ? 0 : 2; /* --help, or a usage error */
    if (!strcmp(a.cmd, "make-request"))
        return need_model(&a) ? 2 : cmd_make_request(&a);
    for (size_t i = 0; i < BS_ARRAY_LEN(cmds); i++) {
        if (strcmp(a.cmd, cmds[i].name) != 0)
            continue;
        if (cmds[i].model && need_model(&a))
            return 2;
        if (!strcmp(a.cmd, "shm") && shm_usage_ok(&a))
            return 2;
        struct cli_conn c;
        if (connect_or_report(&a, &c) != 0)
            return 1;
        int rc = cmds[i].fn(&a, &c);
        conn_free(&c);
        return rc;
    }
    fprintf(stderr, "blockserve-cli: unknown command \"%s\"\n\n", a.cmd);
    cli_usage(stderr);
    return 2;
}
