/* The KServe v2 REST protocol as Triton serves it, over libcurl: health,
 * metadata, config, repository index, model load/unload, system shared
 * memory and inference with Triton's binary tensor data extension (a JSON
 * header of Inference-Header-Content-Length bytes, then the raw tensors) or
 * with JSON "data" arrays; gzip or deflate request bodies.
 *
 * Two layers: pure functions that build request bodies and parse answers
 * (no I/O; tests/client/test_http.c), and a bs_http_t that sends them.
 * Errors fill struct bs_client_err: an HTTP error status reads "HTTP 404:
 * <the server's error>", with grpc_status set to the gRPC code that the
 * HTTP status stands for (404 NOT_FOUND, 401 UNAUTHENTICATED, ...).
 *
 * Threads: a bs_http_t is read-only after bs_http_init except its own easy
 * handle, so the synchronous calls belong to one thread at a time; a
 * bs_http_call_t belongs to one thread. */
#ifndef BS_HTTP_CLIENT_H
#define BS_HTTP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "blockserve_client.h"
#include "ctensor.h"

#define BS_HTTP_DEFAULT_URL "localhost:8000"

/* Content-Encoding of request bodies (and Accept-Encoding of responses). */
enum bs_http_encoding { BS_HTTP_IDENTITY, BS_HTTP_GZIP, BS_HTTP_DEFLATE };

typedef struct bs_http bs_http_t;
typedef struct bs_http_call bs_http_call_t;

/* ---- pure: bodies, answers, compression --------------------------------- */

/* True when url names HTTP: "http://..." or "https://...". */
bool bs_http_url_is_http(const char *url);

/* The infer request body for in[0..n): a JSON header, then (binary, unless
 * json) every input's bytes. *header_len is the JSON header's length (the
 * Inference-Header-Content-Length; 0 when json: the body is all JSON).
 * Inputs with an o->in_shm entry name their region and carry no bytes;
 * outputs are o->outputs (with their o->out_shm regions), asked for as
 * binary_data unless json, or every output ("binary_data_output") when
 * o->outputs is NULL. BF16 has no JSON form in Triton: json refuses it. */
int bs_http_pack_infer(const struct bs_ctensor *in, int n, const struct bs_client_infer_opts *o,
                       bool json, uint8_t **body, size_t *len, size_t *header_len,
                       struct bs_client_err *err);

/* Parse an infer response of len bytes whose first header_len are its JSON
 * header (0: all of it) into out[0..*n): binary outputs take their
 * binary_data_size bytes from after the header in order, JSON outputs their
 * "data"; an output with neither (written to shared memory) gets data NULL
 * and nbytes the size its shape and datatype make. On error nothing is left
 * allocated. */
int bs_http_parse_infer(const uint8_t *body, size_t len, size_t header_len, struct bs_ctensor *out,
                        int max, int *n, struct bs_client_err *err);

/* Fill err from an HTTP error answer: "HTTP <status>: <error>" with the
 * body's {"error": "..."}, or the body itself (cut) when it is not that. */
int bs_http_error_from_body(long status, const uint8_t *body, size_t len,
                            struct bs_client_err *err);

/* The gRPC status code an HTTP status stands for (200: 0, 404: 5, ...). */
int bs_http_status_to_grpc(long status);

/* Compress len bytes of in with gzip or deflate (zlib format, as HTTP's
 * "deflate") into *out (malloc'ed). */
int bs_http_compress(enum bs_http_encoding enc, const void *in, size_t len, uint8_t **out,
                     size_t *out_len, struct bs_client_err *err);

/* Undo bs_http_compress (at most max_len bytes out). */
int bs_http_decompress(enum bs_http_encoding enc, const void *in, size_t len, size_t max_len,
                       uint8_t **out, size_t *out_len, struct bs_client_err *err);

/* A model's metadata JSON (/v2/models/{m}) as a ModelMetadataResponse
 * (free with bs_client_msg_free). */
int bs_http_parse_model_metadata(const char *json, size_t len, Inference__ModelMetadataResponse **r,
                                 struct bs_client_err *err);

/* The repository index JSON ([{"name", "version", "state", "reason"}]) as a
 * RepositoryIndexResponse (free with bs_client_msg_free). */
int bs_http_parse_repository_index(const char *json, size_t len,
                                   Inference__RepositoryIndexResponse **r,
                                   struct bs_client_err *err);

/* The shared memory status JSON ([{"name", "key", "offset", "byte_size"}])
 * into regions[0..*n), sorted by name. */
int bs_http_parse_shm_status(const char *json, size_t len, struct bs_client_shm_region *regions,
                             int max, int *n, struct bs_client_err *err);

/* The path of model's endpoint: "/v2/models/NAME" plus suffix (a name is
 * percent-encoded); version NULL or "" for the default. */
int bs_http_model_path(char *buf, size_t size, const char *model, const char *version,
                       const char *suffix);

/* ---- the client ------------------------------------------------------------ */

/* A client for o->url (http://, https:// or HOST:PORT; https when o asks for
 * TLS), sending bodies with enc. Nothing is connected yet. */
int bs_http_init(bs_http_t **h, const struct bs_client_options *o, enum bs_http_encoding enc,
                 struct bs_client_err *err);

/* Release h; NULL is a no-op. */
void bs_http_free(bs_http_t *h);

/* The base URL ("http://localhost:8000"). */
const char *bs_http_base(const bs_http_t *h);

/* An answer: status, body (malloc'ed, NUL-terminated past len) and its
 * Inference-Header-Content-Length (0 when absent). */
struct bs_http_response {
    long status;
    uint8_t *body;
    size_t len;
    size_t header_len;
};

/* Release r's body. */
void bs_http_response_free(struct bs_http_response *r);

/* method ("GET" or "POST") on path with body (compressed with h's encoding
 * when a POST has one); header_len > 0 adds Inference-Header-Content-Length.
 * Returns 0 and *r for a 2xx answer; anything else fails with err (an HTTP
 * error, or "cannot reach http://...: <why>"). */
int bs_http_request(bs_http_t *h, const char *method, const char *path, const void *body,
                    size_t len, size_t header_len, struct bs_http_response *r,
                    struct bs_client_err *err);

/* /v2/health/live, /v2/health/ready and /v2/models/{m}/ready (200: yes,
 * another answer: no). */
int bs_http_server_live(bs_http_t *h, bool *live, struct bs_client_err *err);
int bs_http_server_ready(bs_http_t *h, bool *ready, struct bs_client_err *err);
int bs_http_model_ready(bs_http_t *h, const char *model, bool *ready, struct bs_client_err *err);

/* Model metadata and the repository index, as the gRPC messages. */
int bs_http_model_metadata(bs_http_t *h, const char *model, Inference__ModelMetadataResponse **r,
                           struct bs_client_err *err);
int bs_http_repository_index(bs_http_t *h, Inference__RepositoryIndexResponse **r,
                             struct bs_client_err *err);

/* The names of model's optional inputs from /v2/models/{m}/config
 * ("input": [{"name", "optional"}]) into names[0..*n). */
int bs_http_optional_inputs(bs_http_t *h, const char *model, char (*names)[BS_CT_MAX_NAME], int max,
                            int *n, struct bs_client_err *err);

/* POST /v2/repository/models/{m}/load and /unload with {}. */
int bs_http_model_load(bs_http_t *h, const char *model, struct bs_client_err *err);
int bs_http_model_unload(bs_http_t *h, const char *model, struct bs_client_err *err);

/* /v2/systemsharedmemory[/region/{name}]/register, /status, /unregister. */
int bs_http_shm_register(bs_http_t *h, const char *name, const char *key, uint64_t offset,
                         uint64_t byte_size, struct bs_client_err *err);
int bs_http_shm_status(bs_http_t *h, const char *name, struct bs_client_shm_region *regions,
                       int max, int *n, struct bs_client_err *err);
int bs_http_shm_unregister(bs_http_t *h, const char *name, struct bs_client_err *err);

/* One infer call: pack, POST, parse. */
int bs_http_infer(bs_http_t *h, const char *model, const struct bs_ctensor *in, int n,
                  const struct bs_client_infer_opts *o, bool json, struct bs_ctensor *out, int max,
                  int *n_out, struct bs_client_err *err);

/* ---- prepared calls (the bench) -------------------------------------------- */

/* A POST of body to path on an easy handle of its own, sent as many times
 * as asked (keep-alive); the body is compressed once here. */
int bs_http_call_init(bs_http_t *h, const char *path, const void *body, size_t len,
                      size_t header_len, double timeout_s, bs_http_call_t **call,
                      struct bs_client_err *err);

/* The call's CURL easy handle, for a curl multi handle. */
void *bs_http_call_easy(bs_http_call_t *call);

/* Forget the last answer (before sending again). */
void bs_http_call_reset(bs_http_call_t *call);

/* After the transfer ended with curl_code: 0 for a 2xx answer, else err
 * (an HTTP error as bs_http_error_from_body, or the transport's). */
int bs_http_call_result(bs_http_call_t *call, int curl_code, struct bs_client_err *err);

/* Release call; NULL is a no-op. */
void bs_http_call_free(bs_http_call_t *call);

#endif
