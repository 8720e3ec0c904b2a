/* ModelInferRequest / ModelInferResponse (KServe v2, Triton's wire format)
 * to and from engine tensors. Pure functions: no I/O, no threads; this is the
 * fuzz target's surface. */
#ifndef BS_CODEC_H
#define BS_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "sequences.h"
#include "shm.h"

#define BS_CODEC_MAX_INPUTS BS_MAX_INPUTS

/* Limits an untrusted request cannot exceed. */
struct bs_codec_limits {
    int64_t max_elements; /* per tensor */
    int max_inputs;       /* at most BS_CODEC_MAX_INPUTS */
};

/* A decoded, validated request. Input tensors are host tensors whose data
 * points into the unpacked message (raw contents) or into buffers the request
 * owns (typed contents); all of it lives until bs_codec_request_free. An
 * input that names a shared memory region (in_shm[i].given) has no data
 * (NULL) until the front end binds it (bs_shm_bind_inputs). */
struct bs_infer_request {
    void *msg;                 /* Inference__ModelInferRequest (protobuf-c) */
    const char *model_name;
    const char *model_version; /* "" when not given */
    const char *id;            /* "" when not given */
    struct bs_named_tensor inputs[BS_CODEC_MAX_INPUTS];
    int n_inputs;
    void *owned[BS_CODEC_MAX_INPUTS];
    /* Triton's shared_memory_region / _offset / _byte_size of each input and
     * of the output "output" (the answer then carries its datatype and shape
     * but no bytes: the front end writes them into the region) */
    struct bs_shm_ref in_shm[BS_CODEC_MAX_INPUTS];
    struct bs_shm_ref out_shm;
    bool raw_output;           /* answer in raw_output_contents (raw or shared memory inputs) */
    bool want_output;          /* "output" requested (true when outputs is empty) */
    bool stream_intermediate;  /* parameter stream_intermediate: true */
    bool has_out_dtype;        /* parameter output_datatype given: */
    enum bs_dtype out_dtype;   /* the output's dtype (F32, BF16, F16); else the model's default */
    int64_t timeout_us;        /* parameter "timeout" in microseconds, 0 when absent */
    uint64_t priority;         /* parameter "priority" (1: the highest), 0 when absent */
    struct bs_seq_params seq;  /* sequence_id, sequence_start, sequence_end,
                                  block_cache_interval */
    const char *block_cache;   /* answer with parameter block_cache ("refresh", "reuse"); NULL:
                                  none (set by the front end before encoding) */
};

/* Unpack and validate: model name present; each input's name unique, datatype
 * one of FP32, FP16, BF16 (raw only), INT64, BOOL, shape of at most 4 non-negative
 * dims within limits, and contents (raw_input_contents, one per input in
 * order, or typed contents) of exactly the size the shape needs; requested
 * outputs exist ("output"). Inputs in shared memory (Triton's parameters
 * shared_memory_region, a string_param; shared_memory_byte_size, required
 * with it, and shared_memory_offset, an int64_param >= 0 or a uint64_param)
 * carry no contents and, as in Triton, no raw_input_contents entry: the
 * entries are those of the other inputs, in order. Errors name the input:
 * BS_EINVAL for a bad request, BS_ERANGE for limits. On error *req is left
 * empty. */
int bs_codec_decode_infer(const uint8_t *data, size_t len, const struct bs_codec_limits *lim,
                          struct bs_infer_request *req, struct bs_err *err);

/* As bs_codec_decode_infer, but on an error after the message could be
 * unpacked *req keeps its labels (model_name, model_version, id), so that
 * the failure can be counted under its model and answered with its id
 * without decoding again; free it with bs_codec_request_free either way. */
int bs_codec_decode_infer_labeled(const uint8_t *data, size_t len,
                                  const struct bs_codec_limits *lim, struct bs_infer_request *req,
                                  struct bs_err *err);

/* As bs_codec_decode_infer_labeled, on a message the caller built (an
 * Inference__ModelInferRequest, e.g. from HTTP/JSON) instead of bytes: the
 * same checks and errors. The caller keeps owning msg (req->msg stays NULL)
 * and frees it after bs_codec_request_free; raw BOOL bytes are
 * canonicalised in place. */
int bs_codec_decode_infer_msg(void *msg, const struct bs_codec_limits *lim,
                              struct bs_infer_request *req, struct bs_err *err);

/* Release what a decoded request holds; safe on an empty request. */
void bs_codec_request_free(struct bs_infer_request *req);

/* Serialize the response for req: model_name/version/id echoed, one output
 * "output" of out's shape and dtype (FP32, BF16 or FP16), raw or typed as
 * the request was (raw when any input was raw or in shared memory; BF16 and
 * FP16 always raw: InferTensorContents has no field for them, as in
 * Triton); an output in shared memory
 * (req->out_shm) carries no bytes (with raw answers an empty
 * raw_output_contents entry, as Triton sends) and echoes its three
 * shared_memory_* parameters; with
 * final >= 0 the parameter triton_final_response = final (streams). *data is
 * malloc'ed. */
int bs_codec_encode_infer(const struct bs_infer_request *req, const struct bs_tensor *out,
                          int final, uint8_t **data, size_t *len, struct bs_err *err);

/* Streams (ModelStreamInfer): wrap an encoded ModelInferResponse as a
 * ModelStreamInferResponse, or make one that carries an error_message with
 * the request's model name and id. *data is malloc'ed. */
int bs_codec_encode_stream(const uint8_t *resp, size_t resp_len, uint8_t **data, size_t *len,
                           struct bs_err *err);
int bs_codec_encode_stream_error(const char *model_name, const char *id, const char *error,
                                 uint8_t **data, size_t *len, struct bs_err *err);

/* The dtype an output may be answered in, by its Triton datatype name
 * ("FP32", "BF16" or "FP16", exactly): 0, or -1 for any other name. The
 * request parameter output_datatype and serving.json's output_datatype. */
int bs_codec_output_dtype(const char *name, enum bs_dtype *type);

/* Triton's datatype name for an engine dtype ("FP32", "INT64", ...). */
const char *bs_codec_datatype(enum bs_dtype type);

#endif
