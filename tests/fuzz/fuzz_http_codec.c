/* libFuzzer target for the HTTP/REST inference codec (server/http_codec.c):
 * the first two bytes choose the Inference-Header-Content-Length (0xffff:
 * none), the rest is the body. Any body either builds a message, which the
 * gRPC codec then accepts or refuses with a message, or fails with a message
 * and an empty request; an accepted request's answer (an FP32 output of its
 * first input's shape) is valid JSON followed by exactly the output's bytes.
 * The body is also inflated as gzip and deflate within a small limit. Build
 * and run with FUZZ_TARGET=http scripts/fuzz.sh. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "http_codec.h"
#include "json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_MAX_ELEMENTS 4096

static const struct bs_codec_limits limits = {.max_elements = FUZZ_MAX_ELEMENTS, .max_inputs = 4};

static void check(bool ok)
{
    if (!ok)
        __builtin_trap();
}

static void check_answer(const struct bs_infer_request *req, const struct bs_http_infer *hi)
{
    static float zeros[FUZZ_MAX_ELEMENTS];
    int64_t ne[BS_MAX_DIMS] = {1};
    int n_dims = 1;
    if (req->n_inputs > 0) {
        n_dims = req->inputs[0].t.n_dims;
        memcpy(ne, req->inputs[0].t.ne, sizeof(ne));
    }
    struct bs_tensor out = bs_tensor_make(BS_TYPE_F32, n_dims, ne, zeros);
    struct bs_http_answer a = {.model_name = req->model_name,
                               .model_version = req->model_version,
                               .id = req->id,
                               .binary_output = hi->binary_output};
    struct bs_jbuf b = {0};
    size_t json_len = 0;
    struct bs_err err = {0};
    check(bs_http_encode_infer(&a, &out, &b, &json_len, &err) == 0);
    size_t nbytes = bs_tensor_nbytes(&out);
    check(b.len == json_len + (hi->binary_output ? nbytes : 0));
    bs_json_doc_t *doc = NULL;
    check(bs_json_parse(&doc, b.data, json_len, 0, &err) == 0);
    const struct bs_json *root = bs_json_doc_root(doc);
    check(strcmp(bs_json_get(root, "model_name")->string, req->model_name) == 0);
    bs_json_doc_free(doc);
    free(b.data);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    unsigned hl = (unsigned)data[0] << 8 | data[1];
    size_t len = size - 2;
    uint8_t *body = malloc(len ? len : 1); /* exactly len bytes: ASan sees overreads */
    memcpy(body, data + 2, len);
    struct bs_http_infer hi;
    struct bs_err err = {0};
    int rc = bs_http_decode_infer("m", "", body, len, hl == 0xffff ? -1 : (int64_t)hl, &hi, &err);
    if (rc != 0) {
        check(err.msg[0] != '\0' && hi.msg == NULL && hi.doc == NULL && hi.arena == NULL);
    } else {
        struct bs_infer_request req;
        rc = bs_codec_decode_infer_msg(hi.msg, &limits, &req, &err);
        check(rc == 0 || err.msg[0] != '\0');
        if (rc == 0)
            check_answer(&req, &hi);
        bs_codec_request_free(&req);
        bs_http_infer_free(&hi);
    }
    for (int gz = 0; gz < 2; gz++) {
        uint8_t *out = NULL;
        size_t n = 0;
        rc = bs_http_inflate(body, len, gz, 1 << 16, &out, &n, &err);
        check(rc == 0 ? n <= (1 << 16) : out == NULL);
        free(out);
    }
    free(body);
    return 0;
}
