/* grpc.health.v1.Health over the transport (see health_service.h).
 *
 * A Watch call stays open until the client cancels it (or the transport
 * shuts down, which cancels it): the service holds a reference on it and a
 * struct watch in its call data, and drops both in on_cancel. */
#include "health_service.h"

#include <stdlib.h>
#include <string.h>

#include "log.h"

enum { METHOD_CHECK, METHOD_WATCH };

struct watch {
    bs_rpc_call_t *call;
    char *service;
    enum bs_health_status last; /* last status sent */
    struct watch *prev, *next;
};

struct bs_health_service {
    bs_health_t *health;
    struct watch *watches;
    struct bs_rpc_handlers h;
    struct bs_rpc_method rows[2];
};

static void watch_send(struct watch *w, enum bs_health_status st)
{
    uint8_t buf[BS_HEALTH_RESPONSE_MAX];
    size_t n = bs_health_encode_response(st, buf);
    w->last = st;
    bs_rpc_stream_send(w->call, buf, n);
}

static void watch_start(bs_health_service_t *hs, bs_rpc_call_t *call, char *service)
{
    struct watch *w = calloc(1, sizeof(*w));
    if (w == NULL) {
        free(service);
        bs_rpc_stream_finish(call, BS_RPC_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    w->call = call;
    w->service = service;
    w->next = hs->watches;
    if (hs->watches != NULL)
        hs->watches->prev = w;
    hs->watches = w;
    bs_rpc_call_ref(call);
    bs_rpc_call_set_data(call, w);
    watch_send(w, bs_health_get(hs->health, service)); /* open until cancelled */
}

static void on_call(void *arg, bs_rpc_call_t *call, int id, const uint8_t *data, size_t len)
{
    bs_health_service_t *hs = arg;
    struct bs_err err = {0};
    char *service;
    int rc = bs_health_decode_request(data, len, &service, &err);
    if (rc != 0) {
        bs_rpc_fail(call, rc == BS_ENOMEM ? BS_RPC_RESOURCE_EXHAUSTED : BS_RPC_INVALID_ARGUMENT,
                    err.msg);
        return;
    }
    if (id == METHOD_WATCH) {
        watch_start(hs, call, service);
        return;
    }
    enum bs_health_status st = bs_health_get(hs->health, service);
    free(service);
    if (st == BS_HEALTH_SERVICE_UNKNOWN) {
        bs_rpc_fail(call, BS_RPC_NOT_FOUND, "unknown service");
        return;
    }
    uint8_t buf[BS_HEALTH_RESPONSE_MAX];
    bs_rpc_reply(call, buf, bs_health_encode_response(st, buf));
}

static void on_cancel(void *arg, bs_rpc_call_t *call)
{
    bs_health_service_t *hs = arg;
    struct watch *w = bs_rpc_call_data(call);
    if (w == NULL)
        return; /* a Check */
    if (w->prev != NULL)
        w->prev->next = w->next;
    else
        hs->watches = w->next;
    if (w->next != NULL)
        w->next->prev = w->prev;
    bs_rpc_call_set_data(call, NULL);
    free(w->service);
    free(w);
    bs_rpc_call_unref(call);
}

int bs_health_service_init(bs_health_service_t **hsp, struct bs_err *err)
{
    bs_health_service_t *hs = calloc(1, sizeof(*hs));
    int rc;
    *hsp = NULL;
    if (hs == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    if ((rc = bs_health_init(&hs->health, err)) != 0) {
        free(hs);
        return rc;
    }
    if (bs_health_set(hs->health, "", true) < 0) {
        bs_health_free(hs->health);
        free(hs);
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    }
    hs->h = (struct bs_rpc_handlers){.on_call = on_call, .on_cancel = on_cancel, .arg = hs};
    hs->rows[0] = (struct bs_rpc_method){.path = "/grpc.health.v1.Health/Check",
                                         .kind = BS_RPC_UNARY,
                                         .id = METHOD_CHECK,
                                         .slots = 4,
                                         .open = true,
                                         .h = &hs->h};
    hs->rows[1] = (struct bs_rpc_method){.path = "/grpc.health.v1.Health/Watch",
                                         .kind = BS_RPC_SERVER_STREAM,
                                         .id = METHOD_WATCH,
                                         .slots = 2,
                                         .open = true,
                                         .h = &hs->h};
    *hsp = hs;
    return 0;
}

int bs_health_service_methods(bs_health_service_t *hs, const struct bs_rpc_method **rows)
{
    *rows = hs->rows;
    return (int)BS_ARRAY_LEN(hs->rows);
}

void bs_health_service_set(bs_health_service_t *hs, const char *service, bool serving)
{
    service = service ? service : "";
    int rc = bs_health_set(hs->health, service, serving);
    if (rc < 0)
        bs_log(BS_LOG_ERROR, NULL, "health: out of memory");
    if (rc <= 0)
        return;
    for (struct watch *w = hs->watches; w != NULL; w = w->next) {
        if (strcmp(w->service, service) != 0)
            continue;
        enum bs_health_status st = bs_health_get(hs->health, w->service);
        if (st != w->last)
            watch_send(w, st);
    }
}

void bs_health_service_free(bs_health_service_t *hs)
{
    if (hs == NULL)
        return;
    while (hs->watches != NULL) { /* the transport is down: nothing refers to them */
        struct watch *w = hs->watches;
        hs->watches = w->next;
        free(w->service);
        free(w);
    }
    bs_health_free(hs->health);
    free(hs);
}
