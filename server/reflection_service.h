/* Server reflection (grpc.reflection.v1 and v1alpha ServerReflectionInfo)
 * over the gRPC transport: its method rows and handlers; the answers are
 * reflection.c's. Loop thread only. */
#ifndef BS_REFLECTION_SERVICE_H
#define BS_REFLECTION_SERVICE_H

#include "reflection.h"
#include "rpc.h"

typedef struct bs_reflection_service bs_reflection_service_t;

/* Serve refl (not owned) on both reflection versions. */
int bs_reflection_service_init(bs_reflection_service_t **rs, const bs_reflection_t *refl,
                               struct bs_err *err);

/* Its rows for the transport (bidirectional streams). */
int bs_reflection_service_methods(bs_reflection_service_t *rs, const struct bs_rpc_method **rows);

/* Free it once the transport is down; NULL is a no-op. */
void bs_reflection_service_free(bs_reflection_service_t *rs);

#endif
