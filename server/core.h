/* The inference core: routes decoded requests to their model's batcher,
 * admits or refuses them, counts every outcome, and tells the front end how
 * each ends. It knows nothing of gRPC, HTTP or protobuf: a front end (the
 * gRPC service today, service.c) decodes a request from its wire format
 * into struct bs_core_request, hands it over with its reply callbacks, and
 * encodes what comes back.
 *
 * Thread ownership: everything here runs on the loop thread, like the
 * batchers it drives. */
#ifndef BS_CORE_H
#define BS_CORE_H

#include <stdbool.h>
#include <stdint.h>

#include "metrics.h"
#include "repository.h"
#include "sequences.h"

typedef struct bs_core bs_core_t;
typedef struct bs_core_req bs_core_req_t;

struct bs_core_options {
    int max_inflight;      /* requests admitted and not answered, server-wide (0: no bound) */
    bs_metrics_t *metrics; /* for failures that name no served model; NULL: none */
    /* Denoising sequences: the bytes their block caches may hold
     * server-wide (0: no caching), and the loop whose timer ends idle
     * sequences and whose workers free dropped caches (NULL: idle ones end
     * when a later request looks, and caches are freed at once). */
    size_t block_cache_bytes;
    uv_loop_t *loop;
};

/* One decoded inference request. The core reads it during bs_core_submit;
 * the inputs must stay valid until on_done. */
struct bs_core_request {
    const char *model_name;
    const char *model_version; /* "" or NULL: the model's highest ready version */
    const struct bs_named_tensor *inputs;
    int n_inputs;
    bool intermediate;   /* stream each block's output of a stack (on_block) */
    /* The output's dtype (BS_TYPE_F32, BF16 or F16: the F32 result rounded
     * to nearest even) when has_out_dtype; else the model's serving
     * output_datatype (FP32 unless set). on_block and on_output hear
     * tensors of that dtype. */
    bool has_out_dtype;
    enum bs_dtype out_dtype;
    uint64_t priority;   /* Triton's "priority" (1: the highest; 0: the model's default level) */
    int64_t timeout_us;  /* the request's own queue timeout (0: none); the model's queue
                            policy decides whether it applies */
    int64_t deadline_ns; /* the transport's deadline on uv_hrtime()'s clock (INT64_MAX: none) */
    bool sender_full;    /* the front end cannot take more answers now: refuse (BS_EBUSY) */
    /* Its denoising sequence (Triton's sequence_id, sequence_start,
     * sequence_end) and block_cache_interval (server/sequences.h). A call of
     * a sequence whose previous call still runs waits for it. */
    struct bs_seq_params seq;
};

/* What a front end hears about one admitted request, on the loop thread. */
struct bs_core_reply {
    /* Optional: an intermediate block's output (intermediate requests). */
    void (*on_block)(void *arg, const struct bs_tensor *out);
    /* The final output, before the request is counted: the front end
     * prepares its answer (encodes it); a negative BS_E* code fails the
     * request instead (counted as that failure, then on_done hears it). */
    int (*on_output)(void *arg, const struct bs_tensor *out, struct bs_err *err);
    /* Exactly once: rc 0 (send what on_output prepared) or a failure code
     * (the status table maps it, engine/common.h) and its message. */
    void (*on_done)(void *arg, int rc, const char *msg);
    /* Optional, exactly once, after on_done: the core no longer reads the
     * request (its inputs). Usually right after on_done; after an early
     * answer (bs_core_shutdown) only once the running batch has returned.
     * The request must stay valid until then. */
    void (*on_release)(void *arg);
};

/* Create the core over repo (which it does not own). */
int bs_core_init(bs_core_t **core, bs_repository_t *repo, const struct bs_core_options *opts,
                 struct bs_err *err);

/* Free the core (after every request is done); NULL is a no-op. */
void bs_core_free(bs_core_t *core);

/* Route, admit and queue one request. Returns 0 and a handle (on_done
 * follows exactly once, never inside this call), or a failure code at once,
 * already counted, with nothing kept. */
int bs_core_submit(bs_core_t *core, const struct bs_core_request *req,
                   const struct bs_core_reply *reply, void *arg, bs_core_req_t **handle,
                   struct bs_err *err);

/* The caller went away: a queued request hears on_done(BS_ECANCELED) now, a
 * running one when its batch returns. */
void bs_core_cancel(bs_core_t *core, bs_core_req_t *req);

/* Count a request the front end refused before submitting it (it could not
 * be decoded): under the model it names when that is a served one, else as
 * unrouted. model_name may be NULL. */
void bs_core_count_failure(bs_core_t *core, const char *model_name, const char *model_version,
                           int rc);

/* Count an inference call that ended before its request arrived whole
 * (cancelled: by the client or its deadline). */
void bs_core_count_lost(bs_core_t *core, bool cancelled);

/* The entry of model name at version ("" or NULL: its highest ready
 * version), loaded when need_ready; NULL with BS_ENOTFOUND (unknown model,
 * a version not served, an unloaded model) or BS_EUNSUPP (failed to load)
 * in err. Without need_ready, an unloaded model's entry (model NULL). */
struct bs_repo_model *bs_core_lookup(bs_core_t *core, const char *name, const char *version,
                                     bool need_ready, struct bs_err *err);

bs_repository_t *bs_core_repository(bs_core_t *core);

/* From now on requests are refused (BS_EUNSUPP: UNAVAILABLE); readiness is false. */
void bs_core_stop_accepting(bs_core_t *core);
bool bs_core_accepting(const bs_core_t *core);

/* Answer every request still in flight now, with BS_EUNSUPP ("the server is
 * shutting down"), and cancel its job (on_release follows when it is done);
 * also stops accepting. */
void bs_core_shutdown(bs_core_t *core);

/* Requests admitted and not yet answered. */
int bs_core_in_flight(const bs_core_t *core);

/* What a request that asked for block caching did, for its answer:
 * "refresh" or "reuse"; NULL when it did not ask (valid from submit until
 * on_done). */
const char *bs_core_block_cache(const bs_core_req_t *req);

/* The version that serves req ("1", "3", ...: the resolved one when the
 * request named none), for its answer (valid from submit until on_done). */
const char *bs_core_version(const bs_core_req_t *req);

/* Sequence and block-cache counters of model (NULL: all). */
void bs_core_seq_stats(const bs_core_t *core, const bs_model_t *model, struct bs_seq_stats *st);

#endif
