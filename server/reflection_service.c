/* Server reflection over the transport (see reflection_service.h): each
 * request message on the stream gets its answer; the client's half-close
 * ends the stream OK. */
#include "reflection_service.h"

#include <stdlib.h>

struct bs_reflection_service {
    const bs_reflection_t *refl;
    struct bs_rpc_handlers h;
    struct bs_rpc_method rows[2];
};

static void on_open(void *arg, bs_rpc_call_t *call, int id)
{
    (void)arg, (void)call, (void)id; /* nothing to set up: answers need no state */
}

static void on_msg(void *arg, bs_rpc_call_t *call, const uint8_t *data, size_t len)
{
    bs_reflection_service_t *rs = arg;
    uint8_t *out;
    size_t out_len;
    struct bs_err err = {0};
    if (bs_reflection_answer(rs->refl, data, len, &out, &out_len, &err) != 0) {
        bs_rpc_stream_finish(call, BS_RPC_RESOURCE_EXHAUSTED, err.msg);
        return;
    }
    bs_rpc_stream_send(call, out, out_len);
    free(out);
}

static void on_end(void *arg, bs_rpc_call_t *call)
{
    (void)arg;
    bs_rpc_stream_finish(call, BS_RPC_OK, NULL);
}

int bs_reflection_service_init(bs_reflection_service_t **rsp, const bs_reflection_t *refl,
                               struct bs_err *err)
{
    static const char *const paths[2] = {
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    };
    bs_reflection_service_t *rs = calloc(1, sizeof(*rs));
    *rsp = NULL;
    if (rs == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    rs->refl = refl;
    rs->h = (struct bs_rpc_handlers){
        .on_stream_open = on_open, .on_stream_msg = on_msg, .on_stream_end = on_end, .arg = rs};
    for (int i = 0; i < 2; i++)
        rs->rows[i] = (struct bs_rpc_method){
            .path = paths[i], .kind = BS_RPC_BIDI, .id = i, .slots = 2, .h = &rs->h};
    *rsp = rs;
    return 0;
}

int bs_reflection_service_methods(bs_reflection_service_t *rs, const struct bs_rpc_method **rows)
{
    *rows = rs->rows;
    return (int)BS_ARRAY_LEN(rs->rows);
}

void bs_reflection_service_free(bs_reflection_service_t *rs)
{
    free(rs);
}
