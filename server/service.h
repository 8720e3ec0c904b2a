/* inference.GRPCInferenceService on top of the transport (rpc.h), the
 * request codec, the repository and its batchers. Loop thread only. */
#ifndef BS_SERVICE_H
#define BS_SERVICE_H

#include <stdbool.h>

#include "codec.h"
#include "metrics.h"
#include "repository.h"
#include "rpc.h"

typedef struct bs_service bs_service_t;

struct bs_service_options {
    struct bs_codec_limits limits; /* what one request may hold */
    bs_metrics_t *metrics;         /* for unrouted failures; NULL: none */
    int max_inflight;              /* inferences admitted and not answered, server-wide (0: no bound) */
    size_t max_response_bytes;     /* the transport's send limit (0: none) */
};

/* Create the service over repo; bs_service_handlers gives the table for
 * bs_rpc_server_init. */
int bs_service_init(bs_service_t **svc, bs_repository_t *repo,
                    const struct bs_service_options *opts, struct bs_err *err);
void bs_service_handlers(bs_service_t *svc, struct bs_rpc_handlers *h);

/* From now on new inferences get UNAVAILABLE and ServerReady is false. */
void bs_service_stop_accepting(bs_service_t *svc);

/* Before the transport shuts down: answer every inference still in flight
 * UNAVAILABLE (each stream message its own error message) and cancel its
 * job, then finish every stream UNAVAILABLE after its queued answers. */
void bs_service_shutdown(bs_service_t *svc);

/* Inferences accepted and not yet answered. */
int bs_service_in_flight(const bs_service_t *svc);

/* Free the service (after the transport has shut down); NULL is a no-op. */
void bs_service_free(bs_service_t *svc);

#endif
