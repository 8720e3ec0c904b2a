/* grpc.health.v1 state: the serving status of each service name ("" is the
 * whole server) and the bytes of HealthCheckRequest / HealthCheckResponse.
 * No gRPC calls here; the transport (rpc.c) serves Check and Watch with it.
 * Loop thread only. */
#ifndef BS_HEALTH_H
#define BS_HEALTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"

typedef struct bs_health bs_health_t;

/* HealthCheckResponse.ServingStatus, same values as health.proto. */
enum bs_health_status {
    BS_HEALTH_UNKNOWN = 0,
    BS_HEALTH_SERVING = 1,
    BS_HEALTH_NOT_SERVING = 2,
    BS_HEALTH_SERVICE_UNKNOWN = 3, /* Watch only: the name is not registered */
};

/* The longest HealthCheckResponse bs_health_encode_response writes. */
#define BS_HEALTH_RESPONSE_MAX 16

/* Create an empty table: every name is unknown until set. */
int bs_health_init(bs_health_t **health, struct bs_err *err);

/* Free the table; NULL is a no-op. */
void bs_health_free(bs_health_t *health);

/* Record service's status, registering the name if new; returns 1 when the
 * status seen by Check/Watch changed, 0 when not, BS_ENOMEM. */
int bs_health_set(bs_health_t *health, const char *service, bool serving);

/* SERVING or NOT_SERVING for a registered name, SERVICE_UNKNOWN otherwise. */
enum bs_health_status bs_health_get(const bs_health_t *health, const char *service);

/* Decode a HealthCheckRequest (data may be NULL: the empty message) into a
 * malloc'd service name in *service; BS_EINVAL when it is malformed or the
 * name holds a NUL byte. */
int bs_health_decode_request(const uint8_t *data, size_t len, char **service, struct bs_err *err);

/* Encode a HealthCheckResponse carrying status into buf; returns its length. */
size_t bs_health_encode_response(enum bs_health_status status, uint8_t buf[BS_HEALTH_RESPONSE_MAX]);

#endif
