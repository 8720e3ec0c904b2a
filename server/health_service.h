/* grpc.health.v1.Health (Check, Watch) over the gRPC transport: its method
 * rows, open to unauthenticated probes, and the watchers it keeps informed.
 * The status table and the message bytes are health.c's. Loop thread only. */
#ifndef BS_HEALTH_SERVICE_H
#define BS_HEALTH_SERVICE_H

#include "health.h"
#include "rpc.h"

typedef struct bs_health_service bs_health_service_t;

/* Create the service; the whole server ("") starts SERVING. */
int bs_health_service_init(bs_health_service_t **hs, struct bs_err *err);

/* Its rows for the transport (Check: unary, Watch: server streaming). */
int bs_health_service_methods(bs_health_service_t *hs, const struct bs_rpc_method **rows);

/* Set a service name's status ("" = the whole server); watchers of that
 * name hear the change. */
void bs_health_service_set(bs_health_service_t *hs, const char *service, bool serving);

/* Free it once the transport is down; NULL is a no-op. */
void bs_health_service_free(bs_health_service_t *hs);

#endif
