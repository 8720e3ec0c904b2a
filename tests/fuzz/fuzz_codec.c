/* libFuzzer target for the request codec: any byte string either decodes to
 * a request that satisfies the codec's promises or fails with a message and
 * an empty request; a decoded request then encodes a response (an FP32 output
 * of the first input's shape) that unpacks again and matches. Build and run
 * with scripts/fuzz.sh. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "grpc_service.pb-c.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_MAX_ELEMENTS 4096

static const struct bs_codec_limits limits = {.max_elements = FUZZ_MAX_ELEMENTS, .max_inputs = 4};

/* A broken promise is a crash libFuzzer records. */
static void check(bool ok)
{
    if (!ok)
        __builtin_trap();
}

/* A shared memory reference names a region by a non-empty, terminated name. */
static void check_shm_ref(const struct bs_shm_ref *ref)
{
    if (!ref->given)
        return;
    size_t n = strnlen(ref->region, sizeof(ref->region));
    check(n > 0 && n < sizeof(ref->region));
}

/* Every input is a sane contiguous tensor whose bytes can all be read, or
 * (in shared memory) one without data yet. */
static void check_inputs(const struct bs_infer_request *req)
{
    check(req->n_inputs >= 0 && req->n_inputs <= limits.max_inputs);
    check_shm_ref(&req->out_shm);
    for (int i = 0; i < req->n_inputs; i++) {
        const struct bs_tensor *t = &req->inputs[i].t;
        check(req->inputs[i].name != NULL && req->inputs[i].name[0] != '\0');
        check((unsigned)t->type < BS_TYPE_COUNT && t->n_dims >= 0 && t->n_dims <= BS_MAX_DIMS);
        check_shm_ref(&req->in_shm[i]);
        if (req->in_shm[i].given) { /* bound later by the front end */
            check(t->data == NULL && bs_tensor_is_contiguous(t));
            continue;
        }
        check(t->data != NULL && bs_tensor_is_contiguous(t));
        int64_t n = bs_tensor_nelements(t);
        check(n >= 0 && n <= FUZZ_MAX_ELEMENTS);
        const volatile uint8_t *p = t->data;
        uint8_t acc = 0;
        for (size_t k = 0; k < bs_tensor_nbytes(t); k++) /* ASan: out of bounds, freed */
            acc |= p[k];
        (void)acc;
        if (t->type == BS_TYPE_BOOL)
            for (int64_t k = 0; k < n; k++)
                check(p[k] <= 1);
        for (int j = 0; j < i; j++)
            check(strcmp(req->inputs[i].name, req->inputs[j].name) != 0);
    }
}

static void check_response(const struct bs_infer_request *req, const struct bs_tensor *out,
                           int final, const uint8_t *data, size_t len)
{
    Inference__ModelInferResponse *res = inference__model_infer_response__unpack(NULL, len, data);
    check(res != NULL);
    check(strcmp(res->model_name, req->model_name) == 0);
    check(strcmp(res->id, req->id) == 0);
    check(res->n_parameters == (final >= 0 ? 1u : 0u));
    check(res->n_outputs == 1);
    const Inference__ModelInferResponse__InferOutputTensor *o = res->outputs[0];
    check(o->n_shape == (size_t)out->n_dims);
    for (int i = 0; i < out->n_dims; i++)
        check(o->shape[i] == out->ne[i]);
    size_t nbytes = bs_tensor_nbytes(out);
    if (req->out_shm.given) { /* no bytes: an empty raw entry, or no contents */
        check(o->n_parameters == 3 && o->contents == NULL);
        check(res->n_raw_output_contents == (req->raw_output ? 1u : 0u));
        check(!req->raw_output || res->raw_output_contents[0].len == 0);
    } else if (req->raw_output) {
        check(res->n_raw_output_contents == 1 && res->raw_output_contents[0].len == nbytes);
        check(nbytes == 0 || memcmp(res->raw_output_contents[0].data, out->data, nbytes) == 0);
    } else {
        size_t n = o->contents ? o->contents->n_fp32_contents : 0;
        check(n * sizeof(float) == nbytes);
        check(n == 0 || memcmp(o->contents->fp32_contents, out->data, nbytes) == 0);
    }
    inference__model_infer_response__free_unpacked(res, NULL);
}

static void encode(const struct bs_infer_request *req, int final)
{
    struct bs_tensor shape = {.n_dims = 0};
    if (req->n_inputs > 0)
        shape = req->inputs[0].t;
    int64_t n = bs_tensor_nelements(&shape);
    float *values = malloc((size_t)n * sizeof(float) + 1);
    check(values != NULL);
    for (int64_t i = 0; i < n; i++)
        values[i] = (float)i * 0.5f - 3.0f;
    struct bs_tensor out = bs_tensor_make(BS_TYPE_F32, shape.n_dims, shape.ne, values);
    uint8_t *data = NULL;
    size_t len = 0;
    struct bs_err err;
    check(bs_codec_encode_infer(req, &out, final, &data, &len, &err) == 0);
    check(data != NULL);
    check_response(req, &out, final, data, len);
    free(data);
    free(values);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct bs_infer_request req;
    struct bs_err err = {0};
    int rc = bs_codec_decode_infer(data, size, &limits, &req, &err);
    if (rc != 0) {
        check(rc == BS_EINVAL || rc == BS_ERANGE || rc == BS_ENOMEM);
        check(err.code == rc && err.msg[0] != '\0' && memchr(err.msg, 0, sizeof(err.msg)));
        check(req.msg == NULL && req.n_inputs == 0 && req.model_name == NULL);
        bs_codec_request_free(&req);
        return 0;
    }
    check(req.msg != NULL && req.model_name[0] != '\0' && req.want_output);
    check(req.timeout_us >= 0);
    check_inputs(&req);
    encode(&req, size > 0 ? data[size - 1] % 3 - 1 : -1);
    bs_codec_request_free(&req);
    bs_codec_request_free(&req);
    return 0;
}
