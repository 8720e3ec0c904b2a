/* The control plane of the KServe v2 protocol: every method that is not an
 * inference (liveness and readiness, metadata, configuration, statistics,
 * the model repository and its control, shared memory), independent of the
 * transport. A front end turns its wire request into the method's protobuf-c
 * request message (gRPC: unpacks it; HTTP: builds it from the path and the
 * JSON body), calls bs_control_call, and renders the response message its
 * own way (gRPC: packs it; HTTP: writes it as JSON), so that both answer
 * the same things with the same errors.
 *
 * Thread ownership: loop thread only. */
#ifndef BS_CONTROL_H
#define BS_CONTROL_H

#include <protobuf-c/protobuf-c.h>

#include "common.h"
#include "core.h"
#include "shm.h"

typedef struct bs_control bs_control_t;

enum bs_control_method {
    BS_CTL_SERVER_LIVE,
    BS_CTL_SERVER_READY,
    BS_CTL_MODEL_READY,
    BS_CTL_SERVER_METADATA,
    BS_CTL_MODEL_METADATA,
    BS_CTL_MODEL_CONFIG,
    BS_CTL_MODEL_STATISTICS,
    BS_CTL_REPOSITORY_INDEX,
    BS_CTL_REPOSITORY_LOAD,
    BS_CTL_REPOSITORY_UNLOAD,
    BS_CTL_SHM_STATUS,
    BS_CTL_SHM_REGISTER,
    BS_CTL_SHM_UNREGISTER,
    BS_CTL_CUDA_SHM_STATUS,
    BS_CTL_CUDA_SHM_REGISTER,
    BS_CTL_CUDA_SHM_UNREGISTER,
    BS_CTL_METHOD_COUNT,
};

struct bs_control_options {
    bs_core_t *core;    /* not owned */
    bs_shm_t *shm;      /* system shared memory regions (not owned; NULL: none, the methods
                           answer BS_ENOTIMPL) */
    const char *device; /* the compute backend's name ("cpu", "cuda"), for the CUDA shared
                           memory methods' answer; NULL: "cpu" */
};

/* How a method ends: rc 0 and its response message (valid during the call
 * only), or a failure code (the status table maps it) and its message. */
typedef void (*bs_control_done)(void *arg, int rc, const char *msg, const ProtobufCMessage *resp);

int bs_control_init(bs_control_t **ctl, const struct bs_control_options *opts, struct bs_err *err);
void bs_control_free(bs_control_t *ctl);

/* The request message type of method m (its descriptor). */
const ProtobufCMessageDescriptor *bs_control_request_desc(enum bs_control_method m);

/* Run method m on req (a message of bs_control_request_desc(m), read during
 * this call only). done(arg, ...) follows exactly once: inside this call for
 * the methods that answer at once, later (on the loop thread) for those that
 * wait (loading a model). */
void bs_control_call(bs_control_t *ctl, enum bs_control_method m, const ProtobufCMessage *req,
                     bs_control_done done, void *arg);

#endif
