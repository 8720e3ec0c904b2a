/* inference.GRPCInferenceService on top of the transport (rpc.h) and the
 * request codec: the gRPC front end of the inference core (core.h). Loop
 * thread only. */
#ifndef BS_SERVICE_H
#define BS_SERVICE_H

#include <stdbool.h>

#include "codec.h"
#include "control.h"
#include "core.h"
#include "repository.h"
#include "rpc.h"

typedef struct bs_service bs_service_t;

/* inference.GRPCInferenceService's methods (the ids of its rows). */
enum bs_service_method {
    BS_SVC_SERVER_LIVE,
    BS_SVC_SERVER_READY,
    BS_SVC_MODEL_READY,
    BS_SVC_SERVER_METADATA,
    BS_SVC_MODEL_METADATA,
    BS_SVC_MODEL_INFER,
    BS_SVC_MODEL_STREAM_INFER, /* bidirectional streaming */
    BS_SVC_MODEL_CONFIG,
    BS_SVC_MODEL_STATISTICS,
    BS_SVC_REPOSITORY_INDEX,
    BS_SVC_REPOSITORY_MODEL_LOAD,
    BS_SVC_REPOSITORY_MODEL_UNLOAD,
    BS_SVC_SYSTEM_SHM_STATUS,
    BS_SVC_SYSTEM_SHM_REGISTER,
    BS_SVC_SYSTEM_SHM_UNREGISTER,
    BS_SVC_CUDA_SHM_STATUS,
    BS_SVC_CUDA_SHM_REGISTER,
    BS_SVC_CUDA_SHM_UNREGISTER,
    BS_SVC_METHOD_COUNT,
};

struct bs_service_options {
    struct bs_codec_limits limits; /* what one request may hold */
    size_t max_response_bytes;     /* the transport's send limit (0: none) */
    bs_control_t *control;         /* the control plane to answer from (not owned; NULL:
                                      the service makes its own over core) */
    bs_shm_t *shm;                 /* system shared memory for tensors (not owned; NULL:
                                      a request naming a region is refused) */
};

/* Create the service over core (not owned); bs_service_methods gives its
 * rows for the transport (struct bs_rpc_options' methods). */
int bs_service_init(bs_service_t **svc, bs_core_t *core, const struct bs_service_options *opts,
                    struct bs_err *err);
int bs_service_methods(bs_service_t *svc, const struct bs_rpc_method **rows);

/* The handlers behind those rows (ids: enum bs_service_method), for a test
 * transport. */
void bs_service_handlers(bs_service_t *svc, struct bs_rpc_handlers *h);

/* Before the transport shuts down: the core answers every inference still
 * in flight (UNAVAILABLE; each stream message its own error message), then
 * every stream is finished UNAVAILABLE after its queued answers. */
void bs_service_shutdown(bs_service_t *svc);

/* Free the service (after the transport has shut down); NULL is a no-op. */
void bs_service_free(bs_service_t *svc);

#endif
