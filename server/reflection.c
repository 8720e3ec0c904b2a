/* Server reflection over an embedded FileDescriptorSet (see reflection.h).
 *
 * descriptor.proto has no generated code in this build, so the set is read
 * with a small wire-format reader that knows only the fields it needs:
 *   FileDescriptorSet      file=1
 *   FileDescriptorProto    name=1 package=2 dependency=3 message_type=4
 *                          enum_type=5 service=6 extension=7
 *   DescriptorProto        name=1 field=2 nested_type=3 enum_type=4
 *                          extension=6 oneof_decl=8
 *   EnumDescriptorProto    name=1 value=2
 *   ServiceDescriptorProto name=1 method=2
 *   (Field, OneofDescriptor, EnumValue, Method)DescriptorProto: name=1
 * Answers carry the exact FileDescriptorProto bytes of the set.
 *
 * v1 and v1alpha messages are identical on the wire, so both versions are
 * decoded and encoded with the v1 generated code. */
#include "reflection.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grpc/reflection/v1/reflection.pb-c.h"
#include "pbcheck.h"

/* The generated oneof case names, shortened. */
#define REQ_CASE(x)  GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_##x
#define RESP_CASE(x) GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_##x

/* The longest host a request may carry: the answer echoes it in valid_host. */
#define REFL_HOST_MAX 255

/* Status codes carried in ErrorResponse.error_code (grpc/status.h). */
enum {
    REFL_INVALID_ARGUMENT = 3,
    REFL_NOT_FOUND = 5,
    REFL_UNIMPLEMENTED = 12,
};

struct refl_span {
    const uint8_t *p;
    size_t n;
};

struct refl_file {
    char *name;
    const uint8_t *data; /* the FileDescriptorProto, inside the set */
    size_t len;
    struct refl_span *dep_names;
    int *deps; /* file indices (-1: not in the set) */
    size_t n_deps;
};

struct refl_symbol {
    char *name; /* fully qualified, without a leading dot */
    int file;
};

struct bs_reflection {
    struct refl_file *files;
    size_t n_files;
    struct refl_symbol *syms; /* sorted by name once built */
    size_t n_syms, cap_syms;
    char **services;
    size_t n_services;
};

/* ---- wire-format reader --------------------------------------------------------------------- */

struct pb_iter {
    const uint8_t *p, *end;
};

struct pb_field {
    uint32_t num;
    uint32_t wire_type;
    struct refl_span bytes; /* wire type 2 only */
};

static int pb_varint(struct pb_iter *it, uint64_t *v)
{
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (it->p == it->end)
            return -1;
        uint8_t b = *it->p++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if ((b & 0x80) == 0) {
            *v = x;
            return 0;
        }
    }
    return -1;
}

/* 1: f holds the next field; 0: end of input; -1: malformed. */
static int pb_next(struct pb_iter *it, struct pb_field *f)
{
    uint64_t key, v;
    size_t left;
    if (it->p == it->end)
        return 0;
    if (pb_varint(it, &key) != 0 || (key >> 3) == 0 || (key >> 3) > 0x1fffffff)
        return -1;
    f->num = (uint32_t)(key >> 3);
    f->wire_type = (uint32_t)(key & 7);
    left = (size_t)(it->end - it->p);
    switch (f->wire_type) {
    case 0:
        return pb_varint(it, &v) == 0 ? 1 : -1;
    case 1:
        v = 8;
        break;
    case 5:
        v = 4;
        break;
    case 2:
        if (pb_varint(it, &v) != 0)
            return -1;
        left = (size_t)(it->end - it->p);
        f->bytes = (struct refl_span){it->p, (size_t)v};
        break;
    default:
        return -1; /* groups: not used by descriptors */
    }
    if (v > left)
        return -1;
    it->p += v;
    return 1;
}

/* The last value of length-delimited field num in a message (absent: empty). */
static int pb_find(struct refl_span msg, uint32_t num, struct refl_span *out)
{
    struct pb_iter it = {msg.p, msg.p + msg.n};
    struct pb_field f = {0};
    int rc;
    *out = (struct refl_span){(const uint8_t *)"", 0};
    while ((rc = pb_next(&it, &f)) > 0)
        if (f.num == num && f.wire_type == 2)
            *out = f.bytes;
    return rc;
}

/* ---- index ---------------------------------------------------------------------------------- */

/* Add scope.name (or name when scope is empty) for file; *full gets the stored string. */
static int refl_add_symbol(bs_reflection_t *r, int file, const char *scope, struct refl_span name,
                           const char **full)
{
    if (r->n_syms == r->cap_syms) {
        size_t cap = r->cap_syms ? 2 * r->cap_syms : 256;
        struct refl_symbol *p = realloc(r->syms, cap * sizeof(*p));
        if (p == NULL)
            return BS_ENOMEM;
        r->syms = p;
        r->cap_syms = cap;
    }
    size_t scope_len = strlen(scope);
    char *s = malloc(scope_len + 1 + name.n + 1);
    if (s == NULL)
        return BS_ENOMEM;
    size_t o = 0;
    if (scope_len > 0) {
        memcpy(s, scope, scope_len);
        s[scope_len] = '.';
        o = scope_len + 1;
    }
    memcpy(s + o, name.p, name.n);
    s[o + name.n] = '\0';
    r->syms[r->n_syms++] = (struct refl_symbol){s, file};
    if (full != NULL)
        *full = s;
    return 0;
}

/* Add the symbol named by field 1 of msg, under scope. */
static int refl_add_named(bs_reflection_t *r, int file, const char *scope, struct refl_span msg,
                          const char **full)
{
    struct refl_span name;
    if (pb_find(msg, 1, &name) < 0 || name.n == 0)
        return BS_EFORMAT;
    return refl_add_symbol(r, file, scope, name, full);
}

static int refl_index_enum(bs_reflection_t *r, int file, const char *scope, struct refl_span msg)
{
    struct pb_iter it = {msg.p, msg.p + msg.n};
    struct pb_field f = {0};
    int rc = refl_add_named(r, file, scope, msg, NULL);
    while (rc == 0 && (rc = pb_next(&it, &f)) > 0) {
        rc = 0;
        if (f.num == 2 && f.wire_type == 2) /* values live in the enum's scope */
            rc = refl_add_named(r, file, scope, f.bytes, NULL);
    }
    return rc < 0 ? rc : 0;
}

static int refl_index_message(bs_reflection_t *r, int file, const char *scope, struct refl_span msg)
{
    struct pb_iter it = {msg.p, msg.p + msg.n};
    struct pb_field f = {0};
    const char *full;
    int rc = refl_add_named(r, file, scope, msg, &full);
    while (rc == 0 && (rc = pb_next(&it, &f)) > 0) {
        rc = 0;
        if (f.wire_type != 2)
            continue;
        if (f.num == 2 || f.num == 6 || f.num == 8) /* field, extension, oneof */
            rc = refl_add_named(r, file, full, f.bytes, NULL);
        else if (f.num == 3)
            rc = refl_index_message(r, file, full, f.bytes);
        else if (f.num == 4)
            rc = refl_index_enum(r, file, full, f.bytes);
    }
    return rc < 0 ? rc : 0;
}

static int refl_index_service(bs_reflection_t *r, int file, const char *scope, struct refl_span msg)
{
    struct pb_iter it = {msg.p, msg.p + msg.n};
    struct pb_field f = {0};
    const char *full;
    int rc = refl_add_named(r, file, scope, msg, &full);
    while (rc == 0 && (rc = pb_next(&it, &f)) > 0) {
        rc = 0;
        if (f.num == 2 && f.wire_type == 2)
            rc = refl_add_named(r, file, full, f.bytes, NULL);
    }
    return rc < 0 ? rc : 0;
}

/* Name and dependencies of file i (pass 1). */
static int refl_read_file_header(struct refl_file *file)
{
    struct pb_iter it = {file->data, file->data + file->len};
    struct pb_field f = {0};
    struct refl_span name;
    int rc;
    if (pb_find((struct refl_span){file->data, file->len}, 1, &name) < 0 || name.n == 0)
        return BS_EFORMAT;
    file->name = strndup((const char *)name.p, name.n);
    if (file->name == NULL)
        return BS_ENOMEM;
    while ((rc = pb_next(&it, &f)) > 0) {
        if (f.num != 3 || f.wire_type != 2)
            continue;
        struct refl_span *d = realloc(file->dep_names, (file->n_deps + 1) * sizeof(*d));
        if (d == NULL)
            return BS_ENOMEM;
        file->dep_names = d;
        d[file->n_deps++] = f.bytes;
    }
    return rc < 0 ? BS_EFORMAT : 0;
}

/* Symbols of file i, scoped by its package (pass 2). */
static int refl_index_file(bs_reflection_t *r, int i)
{
    const struct refl_file *file = &r->files[i];
    struct refl_span msg = {file->data, file->len}, pkg;
    struct pb_iter it = {file->data, file->data + file->len};
    struct pb_field f = {0};
    int rc = pb_find(msg, 2, &pkg);
    if (rc < 0)
        return BS_EFORMAT;
    char *scope = strndup((const char *)pkg.p, pkg.n);
    if (scope == NULL)
        return BS_ENOMEM;
    rc = 0;
    while (rc == 0 && (rc = pb_next(&it, &f)) > 0) {
        rc = 0;
        if (f.wire_type != 2)
            continue;
        if (f.num == 4)
            rc = refl_index_message(r, i, scope, f.bytes);
        else if (f.num == 5)
            rc = refl_index_enum(r, i, scope, f.bytes);
        else if (f.num == 6)
            rc = refl_index_service(r, i, scope, f.bytes);
        else if (f.num == 7)
            rc = refl_add_named(r, i, scope, f.bytes, NULL);
    }
    free(scope);
    return rc < 0 ? (rc == -1 ? BS_EFORMAT : rc) : 0;
}

static int refl_find_file_span(const bs_reflection_t *r, struct refl_span name)
{
    for (size_t i = 0; i < r->n_files; i++)
        if (strlen(r->files[i].name) == name.n && memcmp(r->files[i].name, name.p, name.n) == 0)
            return (int)i;
    return -1;
}

static int refl_resolve_deps(bs_reflection_t *r)
{
    for (size_t i = 0; i < r->n_files; i++) {
        struct refl_file *file = &r->files[i];
        if (file->n_deps == 0)
            continue;
        file->deps = malloc(file->n_deps * sizeof(*file->deps));
        if (file->deps == NULL)
            return BS_ENOMEM;
        for (size_t d = 0; d < file->n_deps; d++)
            file->deps[d] = refl_find_file_span(r, file->dep_names[d]);
    }
    return 0;
}

static int refl_symbol_cmp(const void *a, const void *b)
{
    return strcmp(((const struct refl_symbol *)a)->name, ((const struct refl_symbol *)b)->name);
}

/* Split the set into files, then index each. */
static int refl_build(bs_reflection_t *r, const uint8_t *set, size_t len)
{
    struct pb_iter it = {set, set + len};
    struct pb_field f = {0};
    int rc;
    while ((rc = pb_next(&it, &f)) > 0) {
        if (f.num != 1 || f.wire_type != 2)
            continue;
        struct refl_file *p = realloc(r->files, (r->n_files + 1) * sizeof(*p));
        if (p == NULL)
            return BS_ENOMEM;
        r->files = p;
        p[r->n_files] = (struct refl_file){.data = f.bytes.p, .len = f.bytes.n};
        r->n_files++;
        if ((rc = refl_read_file_header(&p[r->n_files - 1])) != 0)
            return rc;
    }
    if (rc < 0)
        return BS_EFORMAT;
    for (size_t i = 0; i < r->n_files; i++)
        if ((rc = refl_index_file(r, (int)i)) != 0)
            return rc;
    if (r->n_syms > 0)
        qsort(r->syms, r->n_syms, sizeof(*r->syms), refl_symbol_cmp);
    return refl_resolve_deps(r);
}

int bs_reflection_init(bs_reflection_t **refl, const uint8_t *set, size_t len,
                       const char *const *services, size_t n_services, struct bs_err *err)
{
    bs_reflection_t *r = calloc(1, sizeof(*r));
    int rc;
    *refl = NULL;
    if (r == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    if ((rc = refl_build(r, set, len)) != 0) {
        bs_reflection_free(r);
        return bs_err_set(err, rc, "reflection: %s",
                          rc == BS_ENOMEM ? "out of memory" : "malformed FileDescriptorSet");
    }
    r->services = calloc(n_services ? n_services : 1, sizeof(*r->services));
    if (r->services == NULL)
        goto fail_nomem;
    for (; r->n_services < n_services; r->n_services++)
        if ((r->services[r->n_services] = strdup(services[r->n_services])) == NULL)
            goto fail_nomem;
    *refl = r;
    return 0;
fail_nomem:
    bs_reflection_free(r);
    return bs_err_set(err, BS_ENOMEM, "out of memory");
}

void bs_reflection_free(bs_reflection_t *refl)
{
    if (refl == NULL)
        return;
    for (size_t i = 0; i < refl->n_files; i++) {
        free(refl->files[i].name);
        free(refl->files[i].dep_names);
        free(refl->files[i].deps);
    }
    free(refl->files);
    for (size_t i = 0; i < refl->n_syms; i++)
        free(refl->syms[i].name);
    free(refl->syms);
    for (size_t i = 0; i < refl->n_services; i++)
        free(refl->services[i]);
    free(refl->services);
    free(refl);
}

int bs_reflection_find_symbol(const bs_reflection_t *refl, const char *symbol)
{
    if (symbol == NULL || refl->n_syms == 0)
        return -1;
    if (symbol[0] == '.')
        symbol++;
    struct refl_symbol key = {(char *)symbol, 0};
    const struct refl_symbol *s =
        bsearch(&key, refl->syms, refl->n_syms, sizeof(*refl->syms), refl_symbol_cmp);
    return s != NULL ? s->file : -1;
}

int bs_reflection_find_file(const bs_reflection_t *refl, const char *name)
{
    if (name == NULL)
        return -1;
    return refl_find_file_span(refl, (struct refl_span){(const uint8_t *)name, strlen(name)});
}

const char *bs_reflection_file_name(const bs_reflection_t *refl, int i)
{
    return i >= 0 && (size_t)i < refl->n_files ? refl->files[i].name : NULL;
}

int bs_reflection_file_count(const bs_reflection_t *refl)
{
    return (int)refl->n_files;
}

/* ---- answers -------------------------------------------------------------------------------- */

/* Everything an answer points at, released in one place. */
struct refl_answer {
    Grpc__Reflection__V1__ServerReflectionResponse resp;
    Grpc__Reflection__V1__ErrorResponse error;
    Grpc__Reflection__V1__FileDescriptorResponse files;
    Grpc__Reflection__V1__ListServiceResponse list;
    Grpc__Reflection__V1__ExtensionNumberResponse ext;
    ProtobufCBinaryData *file_bytes;
    Grpc__Reflection__V1__ServiceResponse *svc;
    Grpc__Reflection__V1__ServiceResponse **svc_ptrs;
    char msg[320];
};

static void refl_error(struct refl_answer *a, int code)
{
    a->error.error_code = code;
    a->error.error_message = a->msg;
    a->resp.message_response_case = RESP_CASE(ERROR_RESPONSE);
    a->resp.error_response = &a->error;
}

static int refl_not_found(struct refl_answer *a, const char *what, const char *name)
{
    snprintf(a->msg, sizeof(a->msg), "%s not found: %s", what, name ? name : "");
    refl_error(a, REFL_NOT_FOUND);
    return 0;
}

/* Depth-first: the file first, then its dependencies, each once. */
static size_t refl_collect(const bs_reflection_t *r, int fi, bool *seen, int *order, size_t n)
{
    if (fi < 0 || seen[fi])
        return n;
    seen[fi] = true;
    order[n++] = fi;
    for (size_t d = 0; d < r->files[fi].n_deps; d++)
        n = refl_collect(r, r->files[fi].deps[d], seen, order, n);
    return n;
}

static int refl_answer_file(const bs_reflection_t *r, int fi, struct refl_answer *a)
{
    bool *seen = calloc(r->n_files, sizeof(*seen));
    int *order = calloc(r->n_files, sizeof(*order));
    a->file_bytes = calloc(r->n_files, sizeof(*a->file_bytes));
    if (seen == NULL || order == NULL || a->file_bytes == NULL) {
        free(seen);
        free(order);
        return BS_ENOMEM;
    }
    size_t n = refl_collect(r, fi, seen, order, 0);
    for (size_t i = 0; i < n; i++)
        a->file_bytes[i] =
            (ProtobufCBinaryData){r->files[order[i]].len, (uint8_t *)r->files[order[i]].data};
    a->files.n_file_descriptor_proto = n;
    a->files.file_descriptor_proto = a->file_bytes;
    a->resp.message_response_case = RESP_CASE(FILE_DESCRIPTOR_RESPONSE);
    a->resp.file_descriptor_response = &a->files;
    free(seen);
    free(order);
    return 0;
}

static int refl_answer_list(const bs_reflection_t *r, struct refl_answer *a)
{
    size_t n = r->n_services;
    a->svc = calloc(n ? n : 1, sizeof(*a->svc));
    a->svc_ptrs = calloc(n ? n : 1, sizeof(*a->svc_ptrs));
    if (a->svc == NULL || a->svc_ptrs == NULL)
        return BS_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        grpc__reflection__v1__service_response__init(&a->svc[i]);
        a->svc[i].name = r->services[i];
        a->svc_ptrs[i] = &a->svc[i];
    }
    a->list.n_service = n;
    a->list.service = a->svc_ptrs;
    a->resp.message_response_case = RESP_CASE(LIST_SERVICES_RESPONSE);
    a->resp.list_services_response = &a->list;
    return 0;
}

static int refl_dispatch(const bs_reflection_t *r,
                         const Grpc__Reflection__V1__ServerReflectionRequest *q,
                         struct refl_answer *a)
{
    int fi;
    switch (q->message_request_case) {
    case REQ_CASE(FILE_BY_FILENAME):
        if ((fi = bs_reflection_find_file(r, q->file_by_filename)) < 0)
            return refl_not_found(a, "file", q->file_by_filename);
        return refl_answer_file(r, fi, a);
    case REQ_CASE(FILE_CONTAINING_SYMBOL):
        if ((fi = bs_reflection_find_symbol(r, q->file_containing_symbol)) < 0)
            return refl_not_found(a, "symbol", q->file_containing_symbol);
        return refl_answer_file(r, fi, a);
    case REQ_CASE(FILE_CONTAINING_EXTENSION):
        /* no file in the set declares extensions */
        return refl_not_found(a, "extension of",
                              q->file_containing_extension != NULL
                                  ? q->file_containing_extension->containing_type
                                  : NULL);
    case REQ_CASE(ALL_EXTENSION_NUMBERS_OF_TYPE):
        if (bs_reflection_find_symbol(r, q->all_extension_numbers_of_type) < 0)
            return refl_not_found(a, "type", q->all_extension_numbers_of_type);
        a->ext.base_type_name = q->all_extension_numbers_of_type;
        a->resp.message_response_case = RESP_CASE(ALL_EXTENSION_NUMBERS_RESPONSE);
        a->resp.all_extension_numbers_response = &a->ext;
        return 0;
    case REQ_CASE(LIST_SERVICES):
        return refl_answer_list(r, a);
    default:
        snprintf(a->msg, sizeof(a->msg), "the request is not supported");
        refl_error(a, REFL_UNIMPLEMENTED);
        return 0;
    }
}

/* The request in req, or NULL with an error_response (INVALID_ARGUMENT) in a:
 * malformed, a string with a NUL byte in it, or a host too long to echo. */
static Grpc__Reflection__V1__ServerReflectionRequest *refl_unpack(const uint8_t *req, size_t len,
                                                                  struct refl_answer *a)
{
    struct bs_err perr = {0};
    Grpc__Reflection__V1__ServerReflectionRequest *q = NULL;
    if (bs_pb_check_strings(&grpc__reflection__v1__server_reflection_request__descriptor, req, len,
                            &perr) != 0)
        snprintf(a->msg, sizeof(a->msg), "%.300s", perr.msg);
    else if ((q = grpc__reflection__v1__server_reflection_request__unpack(NULL, len, req)) == NULL)
        snprintf(a->msg, sizeof(a->msg), "malformed ServerReflectionRequest");
    else if (q->host != NULL && strnlen(q->host, REFL_HOST_MAX + 1) > REFL_HOST_MAX) {
        snprintf(a->msg, sizeof(a->msg), "host is longer than %d bytes", REFL_HOST_MAX);
        grpc__reflection__v1__server_reflection_request__free_unpacked(q, NULL);
        q = NULL;
    }
    if (q == NULL)
        refl_error(a, REFL_INVALID_ARGUMENT);
    return q;
}

int bs_reflection_answer(const bs_reflection_t *refl, const uint8_t *req, size_t len, uint8_t **out,
                         size_t *out_len, struct bs_err *err)
{
    struct refl_answer a = {
        .resp = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__INIT,
        .error = GRPC__REFLECTION__V1__ERROR_RESPONSE__INIT,
        .files = GRPC__REFLECTION__V1__FILE_DESCRIPTOR_RESPONSE__INIT,
        .list = GRPC__REFLECTION__V1__LIST_SERVICE_RESPONSE__INIT,
        .ext = GRPC__REFLECTION__V1__EXTENSION_NUMBER_RESPONSE__INIT,
    };
    int rc = 0;
    *out = NULL;
    *out_len = 0;
    Grpc__Reflection__V1__ServerReflectionRequest *q = refl_unpack(req, len, &a);
    if (q != NULL) {
        a.resp.valid_host = q->host;
        a.resp.original_request = q;
        rc = refl_dispatch(refl, q, &a);
    }
    if (rc == 0) {
        size_t n = grpc__reflection__v1__server_reflection_response__get_packed_size(&a.resp);
        *out = malloc(n ? n : 1);
        if (*out == NULL)
            rc = BS_ENOMEM;
        else
            *out_len = grpc__reflection__v1__server_reflection_response__pack(&a.resp, *out);
    }
    free(a.file_bytes);
    free(a.svc);
    free(a.svc_ptrs);
    if (q != NULL)
        grpc__reflection__v1__server_reflection_request__free_unpacked(q, NULL);
    if (rc != 0)
        return bs_err_set(err, rc, "out of memory");
    return 0;
}
