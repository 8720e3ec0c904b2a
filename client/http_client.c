/* KServe v2 REST over libcurl (see http_client.h). The pure half builds
 * bodies with a growable buffer and parses answers with engine/json.h; the
 * client half keeps one easy handle for its synchronous calls (keep-alive)
 * and one per prepared call. */
#include "http_client.h"

#include <ctype.h>
#include <curl/curl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "json.h"
#include "tensor.h"

/* ---- a growable buffer ------------------------------------------------------ */

struct buf {
    char *p;
    size_t len, cap;
    bool oom;
};

static bool buf_reserve(struct buf *b, size_t more)
{
    if (b->oom)
        return false;
    if (b->len + more + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (p == NULL) {
        b->oom = true;
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

static void buf_put(struct buf *b, const void *data, size_t n)
{
    if (!buf_reserve(b, n))
        return;
    if (n > 0)
        memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
}

__attribute__((format(printf, 2, 3))) static void buf_printf(struct buf *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof(tmp)) {
        buf_put(b, tmp, (size_t)n);
        return;
    }
    if (!buf_reserve(b, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* A JSON string literal of s. */
static void buf_str(struct buf *b, const char *s)
{
    buf_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            buf_printf(b, "\\%c", ch);
        else if (ch < 0x20)
            buf_printf(b, "\\u%04x", ch);
        else
            buf_put(b, s, 1);
    }
    buf_put(b, "\"", 1);
}

/* ---- JSON tensor data ---------------------------------------------------------- */

bool bs_http_url_is_http(const char *url)
{
    return url && (!strncmp(url, "http://", 7) || !strncmp(url, "https://", 8));
}

/* The shortest decimal that reads back as f (as a float when single). */
static void put_shortest(struct buf *b, double f, bool single)
{
    char tmp[40];
    for (int prec = single ? 6 : 15; prec <= (single ? 9 : 17); prec++) {
        snprintf(tmp, sizeof(tmp), "%.*g", prec, f);
        double back = strtod(tmp, NULL);
        if (single ? (float)back == (float)f : back == f)
            break;
    }
    buf_printf(b, "%s", tmp);
}

/* Element i of t as a JSON value; BS_EINVAL for what JSON cannot hold. */
static int json_value(struct buf *b, const struct bs_ctensor *t, int64_t i,
                      struct bs_client_err *err)
{
    const char *dt = t->datatype;
    const void *d = t->data;
    double f = 0;
    if (!strcmp(dt, "FP32"))
        f = ((const float *)d)[i];
    else if (!strcmp(dt, "FP16"))
        f = bs_fp16_to_f32(((const uint16_t *)d)[i]);
    else if (!strcmp(dt, "FP64"))
        f = ((const double *)d)[i];
    else if (!strcmp(dt, "BOOL")) {
        buf_printf(b, "%s", ((const uint8_t *)d)[i] ? "true" : "false");
        return 0;
    } else if (!strcmp(dt, "INT8"))
        buf_printf(b, "%d", ((const int8_t *)d)[i]);
    else if (!strcmp(dt, "INT16"))
        buf_printf(b, "%d", ((const int16_t *)d)[i]);
    else if (!strcmp(dt, "INT32"))
        buf_printf(b, "%" PRId32, ((const int32_t *)d)[i]);
    else if (!strcmp(dt, "INT64"))
        buf_printf(b, "%" PRId64, ((const int64_t *)d)[i]);
    else if (!strcmp(dt, "UINT8"))
        buf_printf(b, "%u", ((const uint8_t *)d)[i]);
    else if (!strcmp(dt, "UINT16"))
        buf_printf(b, "%u", ((const uint16_t *)d)[i]);
    else if (!strcmp(dt, "UINT32"))
        buf_printf(b, "%" PRIu32, ((const uint32_t *)d)[i]);
    else if (!strcmp(dt, "UINT64"))
        buf_printf(b, "%" PRIu64, ((const uint64_t *)d)[i]);
    else if (!strcmp(dt, "BF16"))
        return bs_client_err_set(
            err, BS_EINVAL,
            "input '%s': BF16 has no JSON form in Triton's HTTP protocol: send it as "
            "binary data (drop --http-json)",
            t->name);
    else
        return bs_client_err_set(err, BS_EINVAL, "input '%s': no JSON form for %s", t->name, dt);
    if (!strcmp(dt, "FP32") || !strcmp(dt, "FP16") || !strcmp(dt, "FP64")) {
        if (!isfinite(f))
            return bs_client_err_set(
                err, BS_EINVAL,
                "input '%s': element %lld is %g, which JSON cannot hold (use binary data)", t->name,
                (long long)i, f);
        put_shortest(b, f, strcmp(dt, "FP64") != 0);
    }
    return 0;
}

/* "data": [v0, v1, ...] of t, row-major. */
static int json_data(struct buf *b, const struct bs_ctensor *t, struct bs_client_err *err)
{
    int64_t ne = bs_ct_nelements(t);
    buf_put(b, "\"data\":[", 8);
    for (int64_t i = 0; i < ne; i++) {
        if (i)
            buf_put(b, ",", 1);
        int rc = json_value(b, t, i, err);
        if (rc != 0)
            return rc;
    }
    buf_put(b, "]", 1);
    return 0;
}

static void json_shape(struct buf *b, const struct bs_ctensor *t)
{
    buf_put(b, "\"shape\":[", 9);
    for (int k = 0; k < t->n_dims; k++)
        buf_printf(b, "%s%lld", k ? "," : "", (long long)t->shape[k]);
    buf_put(b, "]", 1);
}

static void json_shm(struct buf *b, const struct bs_client_shm_ref *r)
{
    buf_put(b, "\"shared_memory_region\":", 23);
    buf_str(b, r->region);
    buf_printf(b, ",\"shared_memory_byte_size\":%" PRIu64 ",\"shared_memory_offset\":%" PRIu64,
               r->byte_size, r->offset);
}

static int json_inputs(struct buf *b, const struct bs_ctensor *in, int n,
                       const struct bs_client_infer_opts *o, bool json, struct bs_client_err *err)
{
    buf_put(b, "\"inputs\":[", 10);
    for (int i = 0; i < n; i++) {
        buf_put(b, i ? ",{\"name\":" : "{\"name\":", i ? 9 : 8);
        buf_str(b, in[i].name);
        buf_put(b, ",", 1);
        json_shape(b, &in[i]);
        buf_put(b, ",\"datatype\":", 12);
        buf_str(b, in[i].datatype);
        if (o->in_shm != NULL) {
            buf_put(b, ",\"parameters\":{", 15);
            json_shm(b, &o->in_shm[i]);
            buf_put(b, "}", 1);
        } else if (json) {
            buf_put(b, ",", 1);
            int rc = json_data(b, &in[i], err);
            if (rc != 0)
                return rc;
        } else {
            buf_printf(b, ",\"parameters\":{\"binary_data_size\":%zu}", in[i].nbytes);
        }
        buf_put(b, "}", 1);
    }
    buf_put(b, "]", 1);
    return 0;
}

static void json_outputs(struct buf *b, const struct bs_client_infer_opts *o, bool json)
{
    if (o->outputs == NULL)
        return;
    buf_put(b, ",\"outputs\":[", 12);
    for (int i = 0; i < o->n_outputs; i++) {
        buf_put(b, i ? ",{\"name\":" : "{\"name\":", i ? 9 : 8);
        buf_str(b, o->outputs[i]);
        if (o->out_shm != NULL) {
            buf_put(b, ",\"parameters\":{", 15);
            json_shm(b, &o->out_shm[i]);
            buf_put(b, "}", 1);
        } else if (!json) {
            buf_put(b, ",\"parameters\":{\"binary_data\":true}", 34);
        }
        buf_put(b, "}", 1);
    }
    buf_put(b, "]", 1);
}

int bs_http_pack_infer(const struct bs_ctensor *in, int n, const struct bs_client_infer_opts *o,
                       bool json, uint8_t **body, size_t *len, size_t *header_len,
                       struct bs_client_err *err)
{
    struct buf b = {0};
    int rc = 0;
    *body = NULL;
    buf_put(&b, "{", 1);
    if (o->id && o->id[0]) {
        buf_put(&b, "\"id\":", 5);
        buf_str(&b, o->id);
        buf_put(&b, ",", 1);
    }
    /* without named outputs, every output comes back as binary data */
    bool all_binary = o->outputs == NULL && !json && o->out_shm == NULL;
    if (all_binary || o->output_datatype != NULL) {
        buf_put(&b, "\"parameters\":{", 14);
        if (all_binary)
            buf_put(&b, "\"binary_data_output\":true", 25);
        if (o->output_datatype != NULL) {
            buf_put(&b, all_binary ? ",\"output_datatype\":" : "\"output_datatype\":",
                    all_binary ? 19 : 18);
            buf_str(&b, o->output_datatype);
        }
        buf_put(&b, "},", 2);
    }
    rc = json_inputs(&b, in, n, o, json, err);
    json_outputs(&b, o, json);
    buf_put(&b, "}", 1);
    *header_len = json ? 0 : b.len;
    for (int i = 0; rc == 0 && !json && o->in_shm == NULL && i < n; i++)
        buf_put(&b, in[i].data, in[i].nbytes);
    if (rc == 0 && b.oom)
        rc = bs_client_err_set(err, BS_ENOMEM, "out of memory for the request body");
    if (rc != 0) {
        free(b.p);
        return rc;
    }
    *body = (uint8_t *)b.p;
    *len = b.len;
    return 0;
}

/* ---- parsing answers ------------------------------------------------------------ */

static int parse_json(bs_json_doc_t **doc, const void *text, size_t len, const char *what,
                      struct bs_client_err *err)
{
    struct bs_err e = {0};
    if (bs_json_parse(doc, text, len, 0, &e) != 0)
        return bs_client_err_set(err, BS_EFORMAT, "%s: %s", what, e.msg);
    return 0;
}

static const char *json_str(const struct bs_json *obj, const char *key)
{
    const struct bs_json *v = bs_json_get(obj, key);
    return v && v->type == BS_JSON_STRING ? v->string : "";
}

/* Count the numbers (and booleans) of a possibly nested array. */
static int64_t count_leaves(const struct bs_json *v)
{
    if (v->type != BS_JSON_ARRAY)
        return 1;
    int64_t n = 0;
    for (const struct bs_json *c = v->child; c; c = c->next)
        n += count_leaves(c);
    return n;
}

/* Store one JSON value as element i of t. */
static int store_value(struct bs_ctensor *t, int64_t i, const struct bs_json *v,
                       struct bs_client_err *err)
{
    const char *dt = t->datatype;
    void *d = t->data;
    if (!strcmp(dt, "BOOL")) {
        if (v->type != BS_JSON_BOOL)
            return bs_client_err_set(err, BS_EFORMAT, "output '%s': element %lld is not true/false",
                                     t->name, (long long)i);
        ((uint8_t *)d)[i] = v->boolean;
        return 0;
    }
    if (v->type != BS_JSON_NUMBER)
        return bs_client_err_set(err, BS_EFORMAT, "output '%s': element %lld is not a number",
                                 t->name, (long long)i);
    double f = v->number;
    int64_t k = v->is_integer ? v->integer : (int64_t)f;
    if (!strcmp(dt, "FP32"))
        ((float *)d)[i] = (float)f;
    else if (!strcmp(dt, "FP16"))
        ((uint16_t *)d)[i] = bs_f32_to_fp16((float)f);
    else if (!strcmp(dt, "FP64"))
        ((double *)d)[i] = f;
    else if (!v->is_integer && !(f >= 0 && f <= 18446744073709551615.0 && !strcmp(dt, "UINT64")))
        return bs_client_err_set(err, BS_EFORMAT, "output '%s': element %lld is not an integer",
                                 t->name, (long long)i);
    else if (!strcmp(dt, "INT8"))
        ((int8_t *)d)[i] = (int8_t)k;
    else if (!strcmp(dt, "INT16"))
        ((int16_t *)d)[i] = (int16_t)k;
    else if (!strcmp(dt, "INT32"))
        ((int32_t *)d)[i] = (int32_t)k;
    else if (!strcmp(dt, "INT64"))
        ((int64_t *)d)[i] = k;
    else if (!strcmp(dt, "UINT8"))
        ((uint8_t *)d)[i] = (uint8_t)k;
    else if (!strcmp(dt, "UINT16"))
        ((uint16_t *)d)[i] = (uint16_t)k;
    else if (!strcmp(dt, "UINT32"))
        ((uint32_t *)d)[i] = (uint32_t)k;
    else if (!strcmp(dt, "UINT64"))
        /* past INT64_MAX the parser keeps only a double: exact to its 53 bits, 2^64 clamped */
        ((uint64_t *)d)[i] = v->is_integer                 ? (uint64_t)k
                             : f >= 18446744073709551615.0 ? UINT64_MAX
                                                           : (uint64_t)f;
    else
        return bs_client_err_set(err, BS_EFORMAT, "output '%s': no JSON form for %s", t->name, dt);
    return 0;
}

static int store_all(struct bs_ctensor *t, const struct bs_json *v, int64_t *i,
                     struct bs_client_err *err)
{
    if (v->type != BS_JSON_ARRAY)
        return store_value(t, (*i)++, v, err);
    for (const struct bs_json *c = v->child; c; c = c->next) {
        int rc = store_all(t, c, i, err);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* The name, datatype and shape of one output object into t (not allocated). */
static int output_meta(const struct bs_json *o, struct bs_ctensor *t, struct bs_client_err *err)
{
    memset(t, 0, sizeof(*t));
    snprintf(t->name, sizeof(t->name), "%s", json_str(o, "name"));
    snprintf(t->datatype, sizeof(t->datatype), "%s", json_str(o, "datatype"));
    const struct bs_json *shape = bs_json_get(o, "shape");
    if (shape == NULL || shape->type != BS_JSON_ARRAY || shape->len > BS_CT_MAX_DIMS)
        return bs_client_err_set(err, BS_EFORMAT, "output '%s': no shape (or more than %d dims)",
                                 t->name, BS_CT_MAX_DIMS);
    for (const struct bs_json *d = shape->child; d; d = d->next) {
        if (d->type != BS_JSON_NUMBER || !d->is_integer || d->integer < 0)
            return bs_client_err_set(err, BS_EFORMAT, "output '%s': bad shape", t->name);
        t->shape[t->n_dims++] = d->integer;
    }
    if (bs_ct_datatype_size(t->datatype) == 0)
        return bs_client_err_set(err, BS_EFORMAT, "output '%s': unknown datatype '%s'", t->name,
                                 t->datatype);
    return 0;
}

/* One output: binary bytes from *pos, JSON data, or nothing (shared memory). */
static int one_output(const struct bs_json *o, const uint8_t *bin, size_t bin_len, size_t *pos,
                      struct bs_ctensor *t, struct bs_client_err *err)
{
    int rc = output_meta(o, t, err);
    if (rc != 0)
        return rc;
    const struct bs_json *bsize = bs_json_get(bs_json_get(o, "parameters"), "binary_data_size");
    const struct bs_json *data = bs_json_get(o, "data");
    if (bsize == NULL && data == NULL) { /* in a shared memory region */
        int64_t ne = bs_ct_nelements(t);
        t->nbytes = ne < 0 ? 0 : (size_t)ne * bs_ct_datatype_size(t->datatype);
        return 0;
    }
    struct bs_err e = {0};
    if (bs_ct_alloc(t, &e) != 0)
        return bs_client_err_set(err, e.code, "output '%s': %s", t->name, e.msg);
    if (bsize != NULL) {
        if (bsize->type != BS_JSON_NUMBER || !bsize->is_integer ||
            (uint64_t)bsize->integer != t->nbytes)
            return bs_client_err_set(err, BS_EFORMAT,
                                     "output '%s': binary_data_size %.0f, expected %zu", t->name,
                                     bsize->number, t->nbytes);
        if (*pos > bin_len || bin_len - *pos < t->nbytes)
            return bs_client_err_set(
                err, BS_EFORMAT, "output '%s': the body ends %zu bytes into its %zu bytes of data",
                t->name, *pos <= bin_len ? bin_len - *pos : 0, t->nbytes);
        if (t->nbytes)
            memcpy(t->data, bin + *pos, t->nbytes);
        *pos += t->nbytes;
        return 0;
    }
    int64_t have = count_leaves(data), i = 0;
    if (have != bs_ct_nelements(t))
        return bs_client_err_set(err, BS_EFORMAT, "output '%s': %lld values for %lld elements",
                                 t->name, (long long)have, (long long)bs_ct_nelements(t));
    return store_all(t, data, &i, err);
}

int bs_http_parse_infer(const uint8_t *body, size_t len, size_t header_len, struct bs_ctensor *out,
                        int max, int *n, struct bs_client_err *err)
{
    bs_json_doc_t *doc = NULL;
    *n = 0;
    if (header_len > len)
        return bs_client_err_set(err, BS_EFORMAT,
                                 "Inference-Header-Content-Length %zu is past the body's %zu bytes",
                                 header_len, len);
    size_t hl = header_len ? header_len : len;
    int rc = parse_json(&doc, body, hl, "the infer response", err);
    if (rc != 0)
        return rc;
    const struct bs_json *outs = bs_json_get(bs_json_doc_root(doc), "outputs");
    if (outs == NULL || outs->type != BS_JSON_ARRAY)
        rc = bs_client_err_set(err, BS_EFORMAT, "the infer response has no \"outputs\" array");
    else if (outs->len > (size_t)max)
        rc = bs_client_err_set(err, BS_EINVAL, "the response has %zu outputs (at most %d)",
                               outs->len, max);
    size_t pos = 0;
    for (const struct bs_json *o = rc ? NULL : outs->child; o && rc == 0; o = o->next) {
        rc = one_output(o, body + hl, len - hl, &pos, &out[*n], err);
        (*n)++;
    }
    if (rc == 0 && pos != len - hl)
        rc = bs_client_err_set(err, BS_EFORMAT, "%zu bytes of binary data follow the outputs'",
                               len - hl - pos);
    if (rc != 0) {
        for (int i = 0; i < *n; i++)
            bs_ct_free(&out[i]);
        *n = 0;
    }
    bs_json_doc_free(doc);
    return rc;
}

int bs_http_status_to_grpc(long status)
{
    switch (status) {
    case 200:
        return 0;
    case 400:
        return 3; /* INVALID_ARGUMENT */
    case 401:
        return 16; /* UNAUTHENTICATED */
    case 403:
        return 7; /* PERMISSION_DENIED */
    case 404:
        return 5; /* NOT_FOUND */
    case 409:
        return 6; /* ALREADY_EXISTS */
    case 429:
        return 8; /* RESOURCE_EXHAUSTED */
    case 499:
        return 1; /* CANCELLED */
    case 501:
        return 12; /* UNIMPLEMENTED */
    case 503:
        return 14; /* UNAVAILABLE */
    case 504:
        return 4; /* DEADLINE_EXCEEDED */
    default:
        return status >= 200 && status < 300 ? 0 : 2 /* UNKNOWN */;
    }
}

static int code_of_status(long status)
{
    switch (status) {
    case 400:
        return BS_EINVAL;
    case 404:
        return BS_ENOTFOUND;
    case 429:
        return BS_EBUSY;
    case 499:
        return BS_ECANCELED;
    case 503:
        return BS_EUNSUPP;
    case 504:
        return BS_ETIMEDOUT;
    default:
        return BS_EIO;
    }
}

int bs_http_error_from_body(long status, const uint8_t *body, size_t len, struct bs_client_err *err)
{
    bs_json_doc_t *doc = NULL;
    struct bs_err e = {0};
    const char *msg = NULL;
    if (len > 0 && bs_json_parse(&doc, (const char *)body, len, 0, &e) == 0) {
        const struct bs_json *v = bs_json_get(bs_json_doc_root(doc), "error");
        msg = v && v->type == BS_JSON_STRING ? v->string : NULL;
    }
    if (msg != NULL)
        bs_client_err_set(err, code_of_status(status), "HTTP %ld: %s", status, msg);
    else if (len > 0) /* not Triton's shape: show the start of the body, one line */
        bs_client_err_set(err, code_of_status(status), "HTTP %ld: %.*s", status,
                          (int)strcspn((const char *)body, "\r\n") < 200
                              ? (int)strcspn((const char *)body, "\r\n")
                              : 200,
                          (const char *)body);
    else
        bs_client_err_set(err, code_of_status(status), "HTTP %ld (no body)", status);
    err->grpc_status = bs_http_status_to_grpc(status);
    bs_json_doc_free(doc);
    return err->code;
}

/* ---- compression ------------------------------------------------------------------ */

static int window_bits(enum bs_http_encoding enc)
{
    return enc == BS_HTTP_GZIP ? 15 + 16 : 15; /* gzip wrapper, or zlib's for "deflate" */
}

int bs_http_compress(enum bs_http_encoding enc, const void *in, size_t len, uint8_t **out,
                     size_t *out_len, struct bs_client_err *err)
{
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, window_bits(enc), 8,
                     Z_DEFAULT_STRATEGY) != Z_OK)
        return bs_client_err_set(err, BS_ENOMEM, "zlib: cannot start compressing");
    size_t cap = deflateBound(&z, (uLong)len) + 32;
    *out = malloc(cap);
    if (*out == NULL) {
        deflateEnd(&z);
        return bs_client_err_set(err, BS_ENOMEM, "out of memory for a %zu-byte compressed body",
                                 cap);
    }
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)len;
    z.next_out = *out;
    z.avail_out = (uInt)cap;
    int zr = deflate(&z, Z_FINISH);
    *out_len = z.total_out;
    deflateEnd(&z);
    if (zr != Z_STREAM_END) {
        free(*out);
        *out = NULL;
        return bs_client_err_set(err, BS_EINTERNAL, "zlib: compressing failed (%d)", zr);
    }
    return 0;
}

int bs_http_decompress(enum bs_http_encoding enc, const void *in, size_t len, size_t max_len,
                       uint8_t **out, size_t *out_len, struct bs_client_err *err)
{
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (inflateInit2(&z, window_bits(enc)) != Z_OK)
        return bs_client_err_set(err, BS_ENOMEM, "zlib: cannot start decompressing");
    *out = malloc(max_len + 1);
    if (*out == NULL) {
        inflateEnd(&z);
        return bs_client_err_set(err, BS_ENOMEM, "out of memory");
    }
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)len;
    z.next_out = *out;
    z.avail_out = (uInt)max_len;
    int zr = inflate(&z, Z_FINISH);
    *out_len = z.total_out;
    inflateEnd(&z);
    if (zr != Z_STREAM_END) {
        free(*out);
        *out = NULL;
        return bs_client_err_set(err, BS_EFORMAT,
                                 "zlib: not a whole %s stream within %zu bytes (%d)",
                                 enc == BS_HTTP_GZIP ? "gzip" : "deflate", max_len, zr);
    }
    return 0;
}

/* ---- metadata, index, shared memory status ----------------------------------- */

/* Pack msg and unpack it again: a message built on the stack becomes one
 * that bs_client_msg_free releases. */
static int repack(const ProtobufCMessage *msg, ProtobufCMessage **out, struct bs_client_err *err)
{
    size_t len = protobuf_c_message_get_packed_size(msg);
    uint8_t *tmp = malloc(len ? len : 1);
    if (tmp == NULL)
        return bs_client_err_set(err, BS_ENOMEM, "out of memory");
    protobuf_c_message_pack(msg, tmp);
    *out = protobuf_c_message_unpack(msg->descriptor, NULL, len, tmp);
    free(tmp);
    return *out ? 0 : bs_client_err_set(err, BS_ENOMEM, "out of memory");
}

typedef Inference__ModelMetadataResponse__TensorMetadata tmeta_t;

/* The tensors of array v into t[0..*n) (shapes into dims, 8 a tensor). */
static int meta_tensors(const struct bs_json *v, tmeta_t *t, tmeta_t **p, int64_t (*dims)[8],
                        size_t *n, struct bs_client_err *err)
{
    *n = 0;
    for (const struct bs_json *o = v && v->type == BS_JSON_ARRAY ? v->child : NULL; o;
         o = o->next) {
        if (*n == 32)
            return bs_client_err_set(err, BS_ERANGE, "model metadata: more than 32 tensors");
        tmeta_t *m = &t[*n];
        inference__model_metadata_response__tensor_metadata__init(m);
        m->name = (char *)json_str(o, "name");
        m->datatype = (char *)json_str(o, "datatype");
        m->shape = dims[*n];
        const struct bs_json *s = bs_json_get(o, "shape");
        for (const struct bs_json *d = s && s->type == BS_JSON_ARRAY ? s->child : NULL; d;
             d = d->next) {
            if (m->n_shape == 8 || d->type != BS_JSON_NUMBER || !d->is_integer)
                return bs_client_err_set(err, BS_EFORMAT, "model metadata: bad shape of '%s'",
                                         m->name);
            m->shape[m->n_shape++] = d->integer;
        }
        p[(*n)++] = m;
    }
    return 0;
}

int bs_http_parse_model_metadata(const char *json, size_t len, Inference__ModelMetadataResponse **r,
                                 struct bs_client_err *err)
{
    bs_json_doc_t *doc;
    int rc = parse_json(&doc, json, len, "model metadata", err);
    if (rc != 0)
        return rc;
    const struct bs_json *root = bs_json_doc_root(doc);
    tmeta_t in[32], out[32];
    tmeta_t *pin[32], *pout[32];
    int64_t din[32][8], dout[32][8];
    char *versions[16];
    Inference__ModelMetadataResponse m = INFERENCE__MODEL_METADATA_RESPONSE__INIT;
    m.name = (char *)json_str(root, "name");
    m.platform = (char *)json_str(root, "platform");
    const struct bs_json *vs = bs_json_get(root, "versions");
    for (const struct bs_json *v = vs && vs->type == BS_JSON_ARRAY ? vs->child : NULL;
         v && m.n_versions < 16; v = v->next)
        if (v->type == BS_JSON_STRING)
            versions[m.n_versions++] = (char *)v->string;
    m.versions = versions;
    rc = meta_tensors(bs_json_get(root, "inputs"), in, pin, din, &m.n_inputs, err);
    if (rc == 0)
        rc = meta_tensors(bs_json_get(root, "outputs"), out, pout, dout, &m.n_outputs, err);
    m.inputs = pin;
    m.outputs = pout;
    if (rc == 0)
        rc = repack(&m.base, (ProtobufCMessage **)r, err);
    bs_json_doc_free(doc);
    return rc;
}

int bs_http_parse_repository_index(const char *json, size_t len,
                                   Inference__RepositoryIndexResponse **r,
                                   struct bs_client_err *err)
{
    typedef Inference__RepositoryIndexResponse__ModelIndex idx_t;
    bs_json_doc_t *doc;
    int rc = parse_json(&doc, json, len, "repository index", err);
    if (rc != 0)
        return rc;
    const struct bs_json *root = bs_json_doc_root(doc);
    if (root->type != BS_JSON_ARRAY) {
        bs_json_doc_free(doc);
        return bs_client_err_set(err, BS_EFORMAT, "repository index: not a JSON array");
    }
    idx_t *m = calloc(root->len + 1, sizeof(*m));
    idx_t **p = calloc(root->len + 1, sizeof(*p));
    Inference__RepositoryIndexResponse q = INFERENCE__REPOSITORY_INDEX_RESPONSE__INIT;
    rc = m && p ? 0 : bs_client_err_set(err, BS_ENOMEM, "out of memory");
    for (const struct bs_json *o = rc ? NULL : root->child; o; o = o->next) {
        idx_t *x = &m[q.n_models];
        inference__repository_index_response__model_index__init(x);
        x->name = (char *)json_str(o, "name");
        x->version = (char *)json_str(o, "version");
        x->state = (char *)json_str(o, "state");
        x->reason = (char *)json_str(o, "reason");
        p[q.n_models++] = x;
    }
    q.models = p;
    if (rc == 0)
        rc = repack(&q.base, (ProtobufCMessage **)r, err);
    free(m);
    free(p);
    bs_json_doc_free(doc);
    return rc;
}

static int region_cmp(const void *a, const void *b)
{
    return strcmp(((const struct bs_client_shm_region *)a)->name,
                  ((const struct bs_client_shm_region *)b)->name);
}

static uint64_t json_u64(const struct bs_json *obj, const char *key)
{
    const struct bs_json *v = bs_json_get(obj, key);
    if (v == NULL)
        return 0;
    if (v->type == BS_JSON_STRING) /* protobuf JSON writes 64-bit numbers as strings */
        return strtoull(v->string, NULL, 10);
    return v->type == BS_JSON_NUMBER && v->number > 0 ? (uint64_t)v->number : 0;
}

int bs_http_parse_shm_status(const char *json, size_t len, struct bs_client_shm_region *regions,
                             int max, int *n, struct bs_client_err *err)
{
    bs_json_doc_t *doc;
    *n = 0;
    int rc = parse_json(&doc, json, len, "shared memory status", err);
    if (rc != 0)
        return rc;
    const struct bs_json *root = bs_json_doc_root(doc);
    if (root->type != BS_JSON_ARRAY)
        rc = bs_client_err_set(err, BS_EFORMAT, "shared memory status: not a JSON array");
    for (const struct bs_json *o = rc ? NULL : root->child; o && *n < max; o = o->next) {
        struct bs_client_shm_region *g = &regions[(*n)++];
        snprintf(g->name, sizeof(g->name), "%s", json_str(o, "name"));
        snprintf(g->key, sizeof(g->key), "%s", json_str(o, "key"));
        g->offset = json_u64(o, "offset");
        g->byte_size = json_u64(o, "byte_size");
    }
    bs_json_doc_free(doc);
    if (rc == 0)
        qsort(regions, (size_t)*n, sizeof(*regions), region_cmp);
    return rc;
}

/* Percent-encode s into b (unreserved characters stay). */
static void path_segment(struct buf *b, const char *s)
{
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (isalnum(ch) || ch == '-' || ch == '_' || ch == '.' || ch == '~')
            buf_put(b, s, 1);
        else
            buf_printf(b, "%%%02X", ch);
    }
}

int bs_http_model_path(char *out, size_t size, const char *model, const char *version,
                       const char *suffix)
{
    struct buf b = {0};
    buf_put(&b, "/v2/models/", 11);
    path_segment(&b, model);
    if (version && version[0]) {
        buf_put(&b, "/versions/", 10);
        path_segment(&b, version);
    }
    buf_printf(&b, "%s", suffix ? suffix : "");
    int rc = !b.oom && b.len < size ? 0 : BS_ERANGE;
    snprintf(out, size, "%s", rc == 0 ? b.p : "");
    free(b.p);
    return rc;
}

/* ---- the client ------------------------------------------------------------------ */

struct bs_http {
    char base[512]; /* scheme://host:port, no trailing slash */
    enum bs_http_encoding enc;
    char auth[1100]; /* "Authorization: Bearer ..." or "" */
    const char *tls_ca, *tls_cert, *tls_key;
    double connect_timeout_s, call_timeout_s;
    bool https;
    bs_http_call_t *sync; /* the easy handle of the synchronous calls */
};

struct bs_http_call {
    bs_http_t *h;
    CURL *easy;
    struct curl_slist *headers;
    uint8_t *body; /* the (compressed) request body, owned */
    size_t body_len;
    struct buf resp;
    size_t resp_header_len;
    char errbuf[CURL_ERROR_SIZE];
};

static const char *enc_name(enum bs_http_encoding enc)
{
    return enc == BS_HTTP_GZIP ? "gzip" : enc == BS_HTTP_DEFLATE ? "deflate" : NULL;
}

int bs_http_init(bs_http_t **out, const struct bs_client_options *o, enum bs_http_encoding enc,
                 struct bs_client_err *err)
{
    static bool global_done; /* the CLI's main thread makes its clients first */
    if (!global_done && curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
        return bs_client_err_set(err, BS_EINTERNAL, "libcurl: cannot initialise");
    global_done = true;
    bs_http_t *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return bs_client_err_set(err, BS_ENOMEM, "out of memory");
    const char *url = o->url ? o->url : BS_HTTP_DEFAULT_URL;
    h->https = !strncmp(url, "https://", 8) ||
               (!bs_http_url_is_http(url) && (o->tls || o->tls_ca || o->tls_cert));
    if (bs_http_url_is_http(url))
        url = strstr(url, "://") + 3;
    size_t n = strlen(url);
    while (n > 0 && url[n - 1] == '/')
        n--;
    snprintf(h->base, sizeof(h->base), "%s://%.*s", h->https ? "https" : "http", (int)n, url);
    if (o->token)
        snprintf(h->auth, sizeof(h->auth), "Authorization: Bearer %s", o->token);
    h->enc = enc;
    h->tls_ca = o->tls_ca;
    h->tls_cert = o->tls_cert;
    h->tls_key = o->tls_key;
    h->connect_timeout_s = o->connect_timeout_s > 0 ? o->connect_timeout_s : 5;
    h->call_timeout_s = o->call_timeout_s > 0 ? o->call_timeout_s : 60;
    *out = h;
    return 0;
}

void bs_http_free(bs_http_t *h)
{
    if (h == NULL)
        return;
    bs_http_call_free(h->sync);
    free(h);
}

const char *bs_http_base(const bs_http_t *h)
{
    return h->base;
}

void bs_http_response_free(struct bs_http_response *r)
{
    free(r->body);
    r->body = NULL;
}

static size_t on_body(char *p, size_t size, size_t nmemb, void *arg)
{
    struct bs_http_call *c = arg;
    buf_put(&c->resp, p, size * nmemb);
    return c->resp.oom ? 0 : size * nmemb;
}

static size_t on_header(char *p, size_t size, size_t nmemb, void *arg)
{
    struct bs_http_call *c = arg;
    static const char name[] = "inference-header-content-length:";
    size_t n = size * nmemb;
    if (n > sizeof(name) - 1 && !strncasecmp(p, name, sizeof(name) - 1)) {
        char tmp[32];
        size_t k = n - (sizeof(name) - 1);
        snprintf(tmp, sizeof(tmp), "%.*s", (int)(k < 31 ? k : 31), p + sizeof(name) - 1);
        c->resp_header_len = strtoull(tmp, NULL, 10);
    }
    return n;
}

/* The options every request on e shares: TLS, auth, timeouts, encoding. */
static int call_common(struct bs_http_call *c, double timeout_s)
{
    bs_http_t *h = c->h;
    CURL *e = c->easy;
    int bad = 0;
    bad |= curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    bad |= curl_easy_setopt(e, CURLOPT_WRITEDATA, c);
    bad |= curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    bad |= curl_easy_setopt(e, CURLOPT_HEADERDATA, c);
    bad |= curl_easy_setopt(e, CURLOPT_ERRORBUFFER, c->errbuf);
    bad |= curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    bad |= curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    bad |= curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)(h->connect_timeout_s * 1e3));
    bad |= curl_easy_setopt(e, CURLOPT_TIMEOUT_MS,
                            (long)((timeout_s > 0 ? timeout_s : h->call_timeout_s) * 1e3));
    if (h->enc != BS_HTTP_IDENTITY)
        bad |= curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, enc_name(h->enc));
    if (h->tls_ca)
        bad |= curl_easy_setopt(e, CURLOPT_CAINFO, h->tls_ca);
    if (h->tls_cert)
        bad |= curl_easy_setopt(e, CURLOPT_SSLCERT, h->tls_cert);
    if (h->tls_key)
        bad |= curl_easy_setopt(e, CURLOPT_SSLKEY, h->tls_key);
    /* no "Expect: 100-continue" round trip before large bodies */
    c->headers = curl_slist_append(c->headers, "Expect:");
    if (h->auth[0])
        c->headers = curl_slist_append(c->headers, h->auth);
    return bad || c->headers == NULL ? BS_EINTERNAL : 0;
}

/* Point c at method/path with body (compressed here when h says so). */
static int call_target(struct bs_http_call *c, const char *method, const char *path,
                       const void *body, size_t len, size_t header_len, struct bs_client_err *err)
{
    bs_http_t *h = c->h;
    char url[1024], hdr[96];
    snprintf(url, sizeof(url), "%s%s", h->base, path);
    int bad = curl_easy_setopt(c->easy, CURLOPT_URL, url);
    free(c->body);
    c->body = NULL;
    c->body_len = 0;
    if (!strcmp(method, "GET"))
        return bad | curl_easy_setopt(c->easy, CURLOPT_HTTPGET, 1L);
    if (h->enc != BS_HTTP_IDENTITY && len > 0) {
        int rc = bs_http_compress(h->enc, body, len, &c->body, &c->body_len, err);
        if (rc != 0)
            return rc;
        snprintf(hdr, sizeof(hdr), "Content-Encoding: %s", enc_name(h->enc));
        c->headers = curl_slist_append(c->headers, hdr);
    } else if (len > 0) {
        if ((c->body = malloc(len)) == NULL)
            return bs_client_err_set(err, BS_ENOMEM, "out of memory for a %zu-byte request", len);
        memcpy(c->body, body, len);
        c->body_len = len;
    }
    if (header_len > 0) {
        snprintf(hdr, sizeof(hdr), "Inference-Header-Content-Length: %zu", header_len);
        c->headers = curl_slist_append(c->headers, hdr);
        c->headers = curl_slist_append(c->headers, "Content-Type: application/octet-stream");
    } else {
        c->headers = curl_slist_append(c->headers, "Content-Type: application/json");
    }
    bad |= curl_easy_setopt(c->easy, CURLOPT_POST, 1L);
    bad |= curl_easy_setopt(c->easy, CURLOPT_POSTFIELDS, c->body ? (char *)c->body : "");
    bad |= curl_easy_setopt(c->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)c->body_len);
    return bad || c->headers == NULL
               ? bs_client_err_set(err, BS_EINTERNAL, "libcurl: cannot set up a request")
               : 0;
}

static int call_new(bs_http_t *h, double timeout_s, bs_http_call_t **out, struct bs_client_err *err)
{
    bs_http_call_t *c = calloc(1, sizeof(*c));
    if (c == NULL || (c->easy = curl_easy_init()) == NULL) {
        free(c);
        return bs_client_err_set(err, BS_ENOMEM, "libcurl: cannot make a handle");
    }
    c->h = h;
    if (call_common(c, timeout_s) != 0) {
        bs_http_call_free(c);
        return bs_client_err_set(err, BS_EINTERNAL, "libcurl: cannot set the options (TLS files?)");
    }
    *out = c;
    return 0;
}

int bs_http_call_init(bs_http_t *h, const char *path, const void *body, size_t len,
                      size_t header_len, double timeout_s, bs_http_call_t **out,
                      struct bs_client_err *err)
{
    int rc = call_new(h, timeout_s, out, err);
    if (rc == 0)
        rc = call_target(*out, "POST", path, body, len, header_len, err);
    if (rc == 0)
        rc = curl_easy_setopt((*out)->easy, CURLOPT_HTTPHEADER, (*out)->headers) ? BS_EINTERNAL : 0;
    if (rc != 0 && *out) {
        bs_http_call_free(*out);
        *out = NULL;
    }
    return rc;
}

void *bs_http_call_easy(bs_http_call_t *c)
{
    return c->easy;
}

void bs_http_call_reset(bs_http_call_t *c)
{
    c->resp.len = 0;
    c->resp.oom = false;
    c->resp_header_len = 0;
    c->errbuf[0] = '\0';
}

int bs_http_call_result(bs_http_call_t *c, int curl_code, struct bs_client_err *err)
{
    long status = 0;
    if (curl_code != CURLE_OK) {
        bs_client_err_set(err, curl_code == CURLE_OPERATION_TIMEDOUT ? BS_ETIMEDOUT : BS_EIO,
                          "cannot reach %s: %s", c->h->base,
                          c->errbuf[0] ? c->errbuf : curl_easy_strerror((CURLcode)curl_code));
        err->grpc_status = curl_code == CURLE_OPERATION_TIMEDOUT ? 4 : 14;
        return err->code;
    }
    curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &status);
    if (status >= 200 && status < 300)
        return 0;
    return bs_http_error_from_body(status, (const uint8_t *)c->resp.p, c->resp.len, err);
}

void bs_http_call_free(bs_http_call_t *c)
{
    if (c == NULL)
        return;
    if (c->easy)
        curl_easy_cleanup(c->easy);
    curl_slist_free_all(c->headers);
    free(c->body);
    free(c->resp.p);
    free(c);
}

int bs_http_request(bs_http_t *h, const char *method, const char *path, const void *body,
                    size_t len, size_t header_len, struct bs_http_response *r,
                    struct bs_client_err *err)
{
    memset(r, 0, sizeof(*r));
    if (h->sync == NULL && call_new(h, 0, &h->sync, err) != 0)
        return err->code;
    bs_http_call_t *c = h->sync;
    /* the common headers stay; the per-request ones are rebuilt */
    curl_slist_free_all(c->headers);
    c->headers = NULL;
    c->headers = curl_slist_append(c->headers, "Expect:");
    if (h->auth[0])
        c->headers = curl_slist_append(c->headers, h->auth);
    bs_http_call_reset(c);
    int rc = call_target(c, method, path, body, len, header_len, err);
    if (rc != 0)
        return rc;
    curl_easy_setopt(c->easy, CURLOPT_HTTPHEADER, c->headers);
    rc = bs_http_call_result(c, curl_easy_perform(c->easy), err);
    curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &r->status);
    if (rc != 0)
        return rc;
    if (c->resp.oom)
        return bs_client_err_set(err, BS_ENOMEM, "out of memory for the answer");
    r->body = (uint8_t *)c->resp.p;
    r->len = c->resp.len;
    r->header_len = c->resp_header_len;
    c->resp = (struct buf){0}; /* the answer is the caller's now */
    if (r->body == NULL && (r->body = calloc(1, 1)) == NULL)
        return bs_client_err_set(err, BS_ENOMEM, "out of memory");
    return 0;
}

/* GET path: true on 200, false on another HTTP status; err on no answer. */
static int get_ok(bs_http_t *h, const char *path, bool *ok, struct bs_client_err *err)
{
    struct bs_http_response r;
    int rc = bs_http_request(h, "GET", path, NULL, 0, 0, &r, err);
    *ok = rc == 0;
    bs_http_response_free(&r);
    if (rc != 0 && r.status > 0 && err->grpc_status != 16 && err->grpc_status != 7)
        return 0; /* an answer, just not 200 (but credentials are an error) */
    return rc;
}

int bs_http_server_live(bs_http_t *h, bool *live, struct bs_client_err *err)
{
    return get_ok(h, "/v2/health/live", live, err);
}

int bs_http_server_ready(bs_http_t *h, bool *ready, struct bs_client_err *err)
{
    return get_ok(h, "/v2/health/ready", ready, err);
}

int bs_http_model_ready(bs_http_t *h, const char *model, bool *ready, struct bs_client_err *err)
{
    char path[512];
    if (bs_http_model_path(path, sizeof(path), model, NULL, "/ready") != 0)
        return bs_client_err_set(err, BS_EINVAL, "model name too long");
    return get_ok(h, path, ready, err);
}

int bs_http_model_metadata(bs_http_t *h, const char *model, Inference__ModelMetadataResponse **m,
                           struct bs_client_err *err)
{
    char path[512];
    struct bs_http_response r;
    if (bs_http_model_path(path, sizeof(path), model, NULL, "") != 0)
        return bs_client_err_set(err, BS_EINVAL, "model name too long");
    int rc = bs_http_request(h, "GET", path, NULL, 0, 0, &r, err);
    if (rc == 0)
        rc = bs_http_parse_model_metadata((const char *)r.body, r.len, m, err);
    bs_http_response_free(&r);
    return rc;
}

int bs_http_repository_index(bs_http_t *h, Inference__RepositoryIndexResponse **m,
                             struct bs_client_err *err)
{
    struct bs_http_response r;
    int rc = bs_http_request(h, "POST", "/v2/repository/index", "{}", 2, 0, &r, err);
    if (rc == 0)
        rc = bs_http_parse_repository_index((const char *)r.body, r.len, m, err);
    bs_http_response_free(&r);
    return rc;
}

int bs_http_optional_inputs(bs_http_t *h, const char *model, char (*names)[BS_CT_MAX_NAME], int max,
                            int *n, struct bs_client_err *err)
{
    char path[512];
    struct bs_http_response r;
    bs_json_doc_t *doc = NULL;
    *n = 0;
    if (bs_http_model_path(path, sizeof(path), model, NULL, "/config") != 0)
        return bs_client_err_set(err, BS_EINVAL, "model name too long");
    int rc = bs_http_request(h, "GET", path, NULL, 0, 0, &r, err);
    if (rc == 0)
        rc = parse_json(&doc, r.body, r.len, "model config", err);
    const struct bs_json *in = rc ? NULL : bs_json_get(bs_json_doc_root(doc), "input");
    for (const struct bs_json *o = in && in->type == BS_JSON_ARRAY ? in->child : NULL;
         o && *n < max; o = o->next) {
        const struct bs_json *opt = bs_json_get(o, "optional");
        if (opt && opt->type == BS_JSON_BOOL && opt->boolean)
            snprintf(names[(*n)++], BS_CT_MAX_NAME, "%s", json_str(o, "name"));
    }
    bs_json_doc_free(doc);
    bs_http_response_free(&r);
    return rc;
}

static int post_empty(bs_http_t *h, const char *path, struct bs_client_err *err)
{
    struct bs_http_response r;
    int rc = bs_http_request(h, "POST", path, "{}", 2, 0, &r, err);
    bs_http_response_free(&r);
    return rc;
}

static int repo_path(char *out, size_t size, const char *model, const char *verb)
{
    struct buf b = {0};
    buf_put(&b, "/v2/repository/models/", 22);
    path_segment(&b, model);
    buf_printf(&b, "/%s", verb);
    int rc = !b.oom && b.len < size ? 0 : BS_ERANGE;
    snprintf(out, size, "%s", rc == 0 ? b.p : "");
    free(b.p);
    return rc;
}

int bs_http_model_load(bs_http_t *h, const char *model, struct bs_client_err *err)
{
    char path[512];
    if (repo_path(path, sizeof(path), model, "load") != 0)
        return bs_client_err_set(err, BS_EINVAL, "model name too long");
    return post_empty(h, path, err);
}

int bs_http_model_unload(bs_http_t *h, const char *model, struct bs_client_err *err)
{
    char path[512];
    if (repo_path(path, sizeof(path), model, "unload") != 0)
        return bs_client_err_set(err, BS_EINVAL, "model name too long");
    return post_empty(h, path, err);
}

/* /v2/systemsharedmemory[/region/NAME]/verb */
static int shm_path(char *out, size_t size, const char *name, const char *verb)
{
    struct buf b = {0};
    buf_put(&b, "/v2/systemsharedmemory", 22);
    if (name && name[0]) {
        buf_put(&b, "/region/", 8);
        path_segment(&b, name);
    }
    buf_printf(&b, "/%s", verb);
    int rc = !b.oom && b.len < size ? 0 : BS_ERANGE;
    snprintf(out, size, "%s", rc == 0 ? b.p : "");
    free(b.p);
    return rc;
}

int bs_http_shm_register(bs_http_t *h, const char *name, const char *key, uint64_t offset,
                         uint64_t byte_size, struct bs_client_err *err)
{
    char path[512];
    struct buf b = {0};
    if (shm_path(path, sizeof(path), name, "register") != 0)
        return bs_client_err_set(err, BS_EINVAL, "region name too long");
    buf_put(&b, "{\"key\":", 7);
    buf_str(&b, key);
    buf_printf(&b, ",\"offset\":%" PRIu64 ",\"byte_size\":%" PRIu64 "}", offset, byte_size);
    struct bs_http_response r;
    int rc = b.oom ? bs_client_err_set(err, BS_ENOMEM, "out of memory")
                   : bs_http_request(h, "POST", path, b.p, b.len, 0, &r, err);
    if (!b.oom)
        bs_http_response_free(&r);
    free(b.p);
    return rc;
}

int bs_http_shm_status(bs_http_t *h, const char *name, struct bs_client_shm_region *regions,
                       int max, int *n, struct bs_client_err *err)
{
    char path[512];
    struct bs_http_response r;
    *n = 0;
    if (shm_path(path, sizeof(path), name, "status") != 0)
        return bs_client_err_set(err, BS_EINVAL, "region name too long");
    int rc = bs_http_request(h, "GET", path, NULL, 0, 0, &r, err);
    if (rc == 0)
        rc = bs_http_parse_shm_status((const char *)r.body, r.len, regions, max, n, err);
    bs_http_response_free(&r);
    return rc;
}

int bs_http_shm_unregister(bs_http_t *h, const char *name, struct bs_client_err *err)
{
    char path[512];
    if (shm_path(path, sizeof(path), name, "unregister") != 0)
        return bs_client_err_set(err, BS_EINVAL, "region name too long");
    return post_empty(h, path, err);
}

int bs_http_infer(bs_http_t *h, const char *model, const struct bs_ctensor *in, int n,
                  const struct bs_client_infer_opts *o, bool json, struct bs_ctensor *out, int max,
                  int *n_out, struct bs_client_err *err)
{
    char path[512];
    uint8_t *body = NULL;
    size_t len = 0, header_len = 0;
    struct bs_http_response r = {0};
    *n_out = 0;
    if (bs_http_model_path(path, sizeof(path), model, NULL, "/infer") != 0)
        return bs_client_err_set(err, BS_EINVAL, "model name too long");
    int rc = bs_http_pack_infer(in, n, o, json, &body, &len, &header_len, err);
    if (rc == 0)
        rc = bs_http_request(h, "POST", path, body, len, header_len, &r, err);
    if (rc == 0)
        rc = bs_http_parse_infer(r.body, r.len, r.header_len, out, max, n_out, err);
    bs_http_response_free(&r);
    free(body);
    return rc;
}
