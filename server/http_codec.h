/* Inference requests and answers of the KServe v2 HTTP/REST protocol as
 * Triton serves it: the JSON request (tensors as JSON `data`, or as binary
 * data after a JSON header of Inference-Header-Content-Length bytes, one
 * `binary_data_size` per such input) becomes the same ModelInferRequest
 * protobuf-c message that gRPC receives, so that bs_codec_decode_infer_msg
 * validates both alike; the answer is JSON with the output as `data` or as
 * binary data after the header. Pure functions: no I/O, no threads (the
 * fuzz target's surface, like codec.h). */
#ifndef BS_HTTP_CODEC_H
#define BS_HTTP_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "json.h"
#include "pbjson.h"
#include "shm.h"

/* JSON values one request may hold (a tree node each); larger tensors go as
 * binary data. */
#define BS_HTTP_MAX_JSON_VALUES (1 << 22)

/* A request built from HTTP. The message's strings point into the parsed
 * JSON, its binary contents into the body: both must outlive it. */
struct bs_http_infer {
    void *msg; /* Inference__ModelInferRequest, for bs_codec_decode_infer_msg */
    struct bs_shm_ref in_shm[BS_CODEC_MAX_INPUTS]; /* shared_memory_* of each input */
    struct bs_shm_ref out_shm;                     /* ... of the output */
    bool binary_output;                            /* answer the output as binary data */
    bs_json_doc_t *doc;
    void *arena; /* everything else the message holds */
};

/* Build hi from body (len bytes; with header_len >= 0, its first header_len
 * bytes are the JSON and the rest the inputs' binary data, in input order).
 * model and version come from the URL. Errors (BS_EINVAL; BS_ERANGE for
 * limits) name the input; on error hi is empty. Raw BOOL bytes in body may
 * be rewritten (canonicalised) later by the codec. */
int bs_http_decode_infer(const char *model, const char *version, uint8_t *body, size_t len,
                         int64_t header_len, struct bs_http_infer *hi, struct bs_err *err);

/* Release what hi holds; safe on an empty one. */
void bs_http_infer_free(struct bs_http_infer *hi);

/* What the answer names. */
struct bs_http_answer {
    const char *model_name, *model_version, *id;
    const char *block_cache;          /* parameter block_cache; NULL: none */
    const struct bs_shm_ref *out_shm; /* the output went to shared memory (NULL: not) */
    bool binary_output;
};

/* Append the answer for out (a contiguous FP32, BF16 or FP16 tensor; NULL:
 * no output) to b: the JSON, then with binary_output the output's bytes;
 * *json_len is the JSON's length (the Inference-Header-Content-Length).
 * BF16 is always binary data (JSON has no BF16 numbers, as in Triton);
 * FP16 as JSON `data` holds each value widened to F32 (exact). */
int bs_http_encode_infer(const struct bs_http_answer *a, const struct bs_tensor *out,
                         struct bs_jbuf *b, size_t *json_len, struct bs_err *err);

/* Content-Encoding: inflate data (gzip, else deflate: the zlib format, as
 * RFC 9110 means it) into *out (malloc'ed), at most max bytes: more is
 * BS_ERANGE ("inflates to more than ..."), found out without holding more
 * than max + 1 bytes (a zip bomb costs nothing); bad data BS_EINVAL. */
int bs_http_inflate(const uint8_t *data, size_t len, bool gzip, size_t max, uint8_t **out,
                    size_t *out_len, struct bs_err *err);

/* Compress data as gzip (else deflate); NULL when that fails. */
uint8_t *bs_http_deflate(const uint8_t *data, size_t len, bool gzip, size_t *out_len);

#endif
