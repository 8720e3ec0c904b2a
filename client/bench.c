/* The load generator.
 *
 * Calls are handed out as tickets from one atomic counter: ticket i may start
 * at t0 + i / rps (or at once without a rate), and no ticket is handed out
 * past count or after t0 + duration. Unary: each thread keeps its share of
 * the concurrency in flight on its own completion queue, waiting on the queue
 * (not sleeping) when its next ticket is not due yet. Stream: one thread per
 * stream, one request in flight on it (write, then read its answer).
 *
 * HTTP: each thread drives its share of the slots through one curl multi
 * handle, one easy handle a slot, reused call after call (keep-alive).
 *
 * Threads: each worker owns its struct worker; the shared state is the
 * ticket counter (atomic) and the read-only options. Results are merged on
 * the calling thread after every worker has been joined. */
#include "bench.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>

struct bench {
    const struct bs_bench_opts *o;
    double t0;
    atomic_llong next_ticket;
    atomic_bool stop; /* a worker failed: everyone stops starting calls */
};

struct slot {
    double t_start;
    bool busy;
};

struct worker {
    struct bench *b;
    bs_client_t *client;
    int slots;
    int first_slot; /* its slots are first_slot .. first_slot + slots - 1 overall */
    pthread_t thread;
    struct bs_latency lat;
    struct bs_latency lat_status[BS_BENCH_N_STATUS];
    struct bs_latency start_lag;
    int64_t status[BS_BENCH_N_STATUS];
    char first_error[256];
    double t_last;
    int rc;
    struct bs_client_err err;
};

const char *bs_bench_status_name(int slot)
{
    return slot == BS_BENCH_STREAM_ERROR ? "STREAM_ERROR" : bs_client_status_name(slot);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Take the next ticket: its start time, or a negative value when the run is over. */
static double take_ticket(struct bench *b)
{
    const struct bs_bench_opts *o = b->o;
    if (atomic_load(&b->stop))
        return -1;
    double now = now_s();
    if (o->duration_s > 0 && now - b->t0 >= o->duration_s)
        return -1;
    long long i = atomic_fetch_add(&b->next_ticket, 1);
    if (o->count > 0 && i >= o->count)
        return -1;
    double t = o->rps > 0 ? b->t0 + (double)i / o->rps : now;
    if (o->duration_s > 0 && t - b->t0 >= o->duration_s)
        return -1;
    return t;
}

static void record(struct worker *w, double t_start, int slot, const char *msg)
{
    double t = now_s();
    if ((bs_latency_add(&w->lat, (t - t_start) * 1e6) != 0 ||
         bs_latency_add(&w->lat_status[slot], (t - t_start) * 1e6) != 0) &&
        w->rc == 0)
        w->rc = BS_ENOMEM;
    w->status[slot]++;
    if (slot != 0 && w->first_error[0] == '\0')
        snprintf(w->first_error, sizeof(w->first_error), "%s: %s", bs_bench_status_name(slot), msg);
    if (t > w->t_last)
        w->t_last = t;
}

/* A call due at `due` starts now: keep how late it is. */
static void record_lag(struct worker *w, double due)
{
    double lag = now_s() - due;
    if (bs_latency_add(&w->start_lag, lag > 0 ? lag * 1e6 : 0) != 0 && w->rc == 0)
        w->rc = BS_ENOMEM;
}

static void sleep_until(double t)
{
    double d = t - now_s();
    if (d > 0) {
        struct timespec ts = {(time_t)d, (long)((d - (double)(time_t)d) * 1e9)};
        nanosleep(&ts, NULL);
    }
}

/* Unary: keep w->slots calls in flight on one queue. */
static void *unary_worker(void *arg)
{
    struct worker *w = arg;
    const struct bs_bench_opts *o = w->b->o;
    bs_client_queue_t *q;
    struct slot *slots = calloc((size_t)w->slots, sizeof(*slots));
    if (slots == NULL || bs_client_queue_create(&q, &w->err) != 0) {
        free(slots);
        w->rc = BS_ENOMEM;
        atomic_store(&w->b->stop, true);
        return NULL;
    }
    int inflight = 0;
    bool done = false;
    double due = -1; /* a ticket taken and not started yet */
    for (;;) {
        while (!done && inflight < w->slots) {
            if (due < 0 && (due = take_ticket(w->b)) < 0) {
                done = true;
                break;
            }
            if (due > now_s())
                break; /* wait for it on the queue below */
            int k = 0;
            while (slots[k].busy)
                k++;
            record_lag(w, due);
            slots[k] = (struct slot){.t_start = now_s(), .busy = true};
            const struct bs_bench_req *sr = o->slot_reqs ? &o->slot_reqs[w->first_slot + k] : NULL;
            if (bs_client_call_start(w->client, q, BS_CLIENT_METHOD("ModelInfer"),
                                     sr ? sr->req : o->req, sr ? sr->len : o->req_len, o->timeout_s,
                                     &slots[k], &w->err) != 0) {
                w->rc = w->err.code;
                atomic_store(&w->b->stop, true);
                done = true;
                break;
            }
            inflight++;
            due = -1;
        }
        if (inflight == 0 && done)
            break;
        double wait = due >= 0 ? due - now_s() : 3600;
        struct bs_client_event ev;
        if (bs_client_queue_next(q, wait > 0 ? wait : 0, &ev)) {
            struct slot *s = ev.tag;
            record(w, s->t_start, ev.grpc_status, ev.message);
            s->busy = false;
            inflight--;
        }
    }
    bs_client_queue_free(q);
    free(slots);
    return NULL;
}

/* One request on the stream and its answer. */
static int stream_one(struct worker *w, bs_client_stream_t *s)
{
    const struct bs_bench_opts *o = w->b->o;
    Inference__ModelStreamInferResponse *r;
    const struct bs_bench_req *sr = o->slot_reqs ? &o->slot_reqs[w->first_slot] : NULL;
    double t = now_s();
    int rc = bs_client_stream_write(s, sr ? sr->req : o->req, sr ? sr->len : o->req_len, &w->err);
    if (rc == 0)
        rc = bs_client_stream_read(s, &r, &w->err);
    if (rc == 1)
        rc = bs_client_stream_finish(s, &w->err);
    if (rc == 1) { /* ended with OK but without the answer */
        snprintf(w->err.msg, sizeof(w->err.msg), "the stream ended before the answer");
        w->err.grpc_status = 2; /* UNKNOWN */
        rc = BS_EIO;
    }
    if (rc != 0) {
        int st = w->err.grpc_status >= 0 ? w->err.grpc_status : 2 /* UNKNOWN */;
        record(w, t, st, w->err.msg);
        return rc;
    }
    bool bad = r->error_message && r->error_message[0];
    record(w, t, bad ? BS_BENCH_STREAM_ERROR : 0, bad ? r->error_message : "");
    bs_client_msg_free(r);
    return 0;
}

/* A stream lives for the whole run: its deadline is the time left plus one call's. */
static double stream_deadline(const struct bench *b)
{
    const struct bs_bench_opts *o = b->o;
    double left = o->duration_s > 0 ? o->duration_s - (now_s() - b->t0) : 24 * 3600;
    return (left > 0 ? left : 0) + o->timeout_s;
}

static void *stream_worker(void *arg)
{
    struct worker *w = arg;
    bs_client_stream_t *s = NULL;
    double due;
    while ((due = take_ticket(w->b)) >= 0) {
        sleep_until(due);
        record_lag(w, due);
        if (s == NULL &&
            bs_client_stream_open(w->client, stream_deadline(w->b), &s, &w->err) != 0) {
            record(w, now_s(), w->err.grpc_status >= 0 ? w->err.grpc_status : 2, w->err.msg);
            continue;
        }
        if (stream_one(w, s) != 0) { /* the stream broke: open a new one for the next call */
            bs_client_stream_free(s);
            s = NULL;
        }
    }
    if (s != NULL) {
        struct bs_client_err e;
        bs_client_stream_finish(s, &e);
        bs_client_stream_free(s);
    }
    return NULL;
}

/* HTTP: the easy handles of w's slots, each with its request. */
static int http_calls(struct worker *w, bs_http_call_t **calls, struct slot *slots)
{
    const struct bs_bench_opts *o = w->b->o;
    for (int k = 0; k < w->slots; k++) {
        const struct bs_bench_req *sr = o->slot_reqs ? &o->slot_reqs[w->first_slot + k] : NULL;
        int rc = bs_http_call_init(o->http, o->http_path, sr ? sr->req : o->req,
                                   sr ? sr->len : o->req_len, sr ? sr->header_len : o->header_len,
                                   o->timeout_s, &calls[k], &w->err);
        if (rc != 0)
            return rc;
        curl_easy_setopt(bs_http_call_easy(calls[k]), CURLOPT_PRIVATE, (char *)&slots[k]);
    }
    return 0;
}

/* Record every finished transfer of m; returns how many finished. */
static int http_drain(struct worker *w, CURLM *m, bs_http_call_t **calls, struct slot *slots)
{
    CURLMsg *msg;
    int left, done = 0;
    while ((msg = curl_multi_info_read(m, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        char *priv = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
        struct slot *s = (struct slot *)priv;
        int k = (int)(s - slots);
        struct bs_client_err e = {0};
        int st = 0;
        if (bs_http_call_result(calls[k], msg->data.result, &e) != 0)
            st = e.grpc_status > 0 && e.grpc_status < 17 ? e.grpc_status : 2 /* UNKNOWN */;
        record(w, s->t_start, st, e.msg);
        curl_multi_remove_handle(m, msg->easy_handle);
        s->busy = false;
        done++;
    }
    return done;
}

/* HTTP: keep w->slots requests in flight on one curl multi handle. */
static void *http_worker(void *arg)
{
    struct worker *w = arg;
    CURLM *m = curl_multi_init();
    bs_http_call_t **calls = calloc((size_t)w->slots, sizeof(*calls));
    struct slot *slots = calloc((size_t)w->slots, sizeof(*slots));
    if (m == NULL || calls == NULL || slots == NULL) {
        w->rc = w->err.code = BS_ENOMEM;
        snprintf(w->err.msg, sizeof(w->err.msg), "out of memory");
    } else if (http_calls(w, calls, slots) != 0) {
        w->rc = w->err.code;
    } else {
        curl_multi_setopt(m, CURLMOPT_MAXCONNECTS, (long)w->slots);
    }
    bool done = w->rc != 0;
    if (done)
        atomic_store(&w->b->stop, true);
    int inflight = 0;
    double due = -1;
    for (;;) {
        while (!done && inflight < w->slots) {
            if (due < 0 && (due = take_ticket(w->b)) < 0) {
                done = true;
                break;
            }
            if (due > now_s())
                break;
            int k = 0;
            while (slots[k].busy)
                k++;
            record_lag(w, due);
            bs_http_call_reset(calls[k]);
            slots[k] = (struct slot){.t_start = now_s(), .busy = true};
            curl_multi_add_handle(m, bs_http_call_easy(calls[k]));
            inflight++;
            due = -1;
        }
        if (inflight == 0 && done)
            break;
        int running;
        curl_multi_perform(m, &running);
        int n = http_drain(w, m, calls, slots);
        inflight -= n;
        if (n == 0) {
            double wait = due >= 0 ? due - now_s() : 1.0;
            curl_multi_poll(m, NULL, 0, wait > 0 ? (int)(wait * 1e3) + 1 : 0, NULL);
        }
    }
    for (int k = 0; calls && k < w->slots; k++)
        bs_http_call_free(calls[k]);
    if (m)
        curl_multi_cleanup(m);
    free(calls);
    free(slots);
    return NULL;
}

static void merge(struct bs_bench_result *r, struct worker *w, int *rc)
{
    if ((bs_latency_merge(&r->lat, &w->lat) != 0 ||
         bs_latency_merge(&r->start_lag, &w->start_lag) != 0) &&
        *rc == 0)
        *rc = BS_ENOMEM;
    for (int k = 0; k < BS_BENCH_N_STATUS; k++) {
        r->status[k] += w->status[k];
        r->count += w->status[k];
        if (bs_latency_merge(&r->lat_status[k], &w->lat_status[k]) != 0 && *rc == 0)
            *rc = BS_ENOMEM;
        bs_latency_free(&w->lat_status[k]);
    }
    if (r->first_error[0] == '\0' && w->first_error[0] != '\0')
        memcpy(r->first_error, w->first_error, sizeof(r->first_error));
    bs_latency_free(&w->lat);
    bs_latency_free(&w->start_lag);
}

static void latency_init_all(struct bs_latency *all, struct bs_latency *by_status,
                             struct bs_latency *lag)
{
    bs_latency_init(all);
    bs_latency_init(lag);
    for (int k = 0; k < BS_BENCH_N_STATUS; k++)
        bs_latency_init(&by_status[k]);
}

void bs_bench_result_free(struct bs_bench_result *r)
{
    bs_latency_free(&r->lat);
    bs_latency_free(&r->start_lag);
    for (int k = 0; k < BS_BENCH_N_STATUS; k++)
        bs_latency_free(&r->lat_status[k]);
}

int bs_bench_run(bs_client_t *const *clients, int n_clients, const struct bs_bench_opts *o,
                 struct bs_bench_result *r, struct bs_client_err *err)
{
    memset(r, 0, sizeof(*r));
    latency_init_all(&r->lat, r->lat_status, &r->start_lag);
    err->grpc_status = -1;
    if (o->concurrency < 1 || (n_clients < 1 && !o->http) ||
        (o->count <= 0 && o->duration_s <= 0)) {
        snprintf(err->msg, sizeof(err->msg), "bench: needs -c >= 1 and -n or -z");
        return err->code = BS_EINVAL;
    }
    int n = o->stream && !o->http ? o->concurrency : (o->threads > 0 ? o->threads : 1);
    if (n > o->concurrency)
        n = o->concurrency;
    struct worker *w = calloc((size_t)n, sizeof(*w));
    if (w == NULL) {
        snprintf(err->msg, sizeof(err->msg), "out of memory");
        return err->code = BS_ENOMEM;
    }
    struct bench b = {.o = o, .t0 = now_s()};
    atomic_init(&b.next_ticket, 0);
    atomic_init(&b.stop, false);
    int started = 0, rc = 0, first = 0;
    void *(*fn)(void *) = o->http ? http_worker : o->stream ? stream_worker : unary_worker;
    for (int i = 0; i < n; i++) {
        w[i].b = &b;
        w[i].client = o->http ? NULL : clients[i % n_clients];
        w[i].slots = o->concurrency / n + (i < o->concurrency % n);
        w[i].first_slot = first;
        first += w[i].slots;
        latency_init_all(&w[i].lat, w[i].lat_status, &w[i].start_lag);
        if (pthread_create(&w[i].thread, NULL, fn, &w[i]))
            break;
        started++;
    }
    if (started < n) {
        atomic_store(&b.stop, true);
        rc = BS_EINTERNAL;
        snprintf(err->msg, sizeof(err->msg), "bench: cannot start threads");
    }
    double t_last = b.t0;
    for (int i = 0; i < started; i++) {
        pthread_join(w[i].thread, NULL);
        if (w[i].rc != 0 && rc == 0) {
            rc = w[i].rc;
            *err = w[i].err;
        }
        if (w[i].t_last > t_last)
            t_last = w[i].t_last;
        merge(r, &w[i], &rc);
    }
    r->elapsed_s = t_last - b.t0;
    free(w);
    if (rc != 0)
        err->code = rc;
    return rc;
}
