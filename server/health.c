/* grpc.health.v1 status table and message codec (see health.h). */
#include "health.h"

#include <stdlib.h>
#include <string.h>

#include "grpc/health/v1/health.pb-c.h"
#include "pbcheck.h"

struct health_entry {
    char *name;
    bool serving;
};

struct bs_health {
    struct health_entry *entries; /* few names: linear search */
    size_t n, cap;
};

int bs_health_init(bs_health_t **health, struct bs_err *err)
{
    *health = calloc(1, sizeof(**health));
    if (*health == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    return 0;
}

void bs_health_free(bs_health_t *health)
{
    if (health == NULL)
        return;
    for (size_t i = 0; i < health->n; i++)
        free(health->entries[i].name);
    free(health->entries);
    free(health);
}

static struct health_entry *health_find(const bs_health_t *health, const char *service)
{
    for (size_t i = 0; i < health->n; i++)
        if (strcmp(health->entries[i].name, service) == 0)
            return &health->entries[i];
    return NULL;
}

int bs_health_set(bs_health_t *health, const char *service, bool serving)
{
    struct health_entry *e = health_find(health, service);
    if (e != NULL) {
        if (e->serving == serving)
            return 0;
        e->serving = serving;
        return 1;
    }
    if (health->n == health->cap) {
        size_t cap = health->cap ? 2 * health->cap : 8;
        struct health_entry *p = realloc(health->entries, cap * sizeof(*p));
        if (p == NULL)
            return BS_ENOMEM;
        health->entries = p;
        health->cap = cap;
    }
    char *name = strdup(service);
    if (name == NULL)
        return BS_ENOMEM;
    health->entries[health->n++] = (struct health_entry){name, serving};
    return 1;
}

enum bs_health_status bs_health_get(const bs_health_t *health, const char *service)
{
    const struct health_entry *e = health_find(health, service);
    if (e == NULL)
        return BS_HEALTH_SERVICE_UNKNOWN;
    return e->serving ? BS_HEALTH_SERVING : BS_HEALTH_NOT_SERVING;
}

int bs_health_decode_request(const uint8_t *data, size_t len, char **service, struct bs_err *err)
{
    Grpc__Health__V1__HealthCheckRequest *q = NULL;
    *service = NULL;
    if (data != NULL && len > 0) {
        int rc = bs_pb_check_strings(&grpc__health__v1__health_check_request__descriptor, data, len,
                                     err);
        if (rc != 0)
            return rc;
        q = grpc__health__v1__health_check_request__unpack(NULL, len, data);
        if (q == NULL)
            return bs_err_set(err, BS_EINVAL, "malformed HealthCheckRequest");
    }
    *service = strdup(q != NULL && q->service != NULL ? q->service : "");
    if (q != NULL)
        grpc__health__v1__health_check_request__free_unpacked(q, NULL);
    if (*service == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    return 0;
}

size_t bs_health_encode_response(enum bs_health_status status, uint8_t buf[BS_HEALTH_RESPONSE_MAX])
{
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    r.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
    return grpc__health__v1__health_check_response__pack(&r, buf);
}
