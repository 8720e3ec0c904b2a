/* safetensors reader and writer. The reader validates the whole header up
 * front, so bs_st_get never fails on a file that opened. Data is read in host
 * byte order: the engine only targets little-endian machines, as the format
 * does. */
#include "safetensors.h"

#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "json.h"

#define ST_HEADER_MAX 100000000ull
#define ST_JSON_DEPTH 8
#define ST_METADATA "__metadata__"

struct st_entry {
    const char *name; /* in the JSON document */
    enum bs_dtype type;
    int n_dims;
    int64_t ne[BS_MAX_DIMS];
    uint64_t begin, end; /* [begin, end) in the data section */
};

struct bs_st_file {
    void *map; /* the mmap()ed file, or NULL for a caller's buffer */
    size_t map_size;
    const unsigned char *data; /* start of the data section */
    uint64_t data_size;
    bs_json_doc_t *doc;             /* the header */
    const struct bs_json *metadata; /* "__metadata__" object, or NULL */
    int n;
    struct st_entry *entries;  /* header order */
    struct st_entry **by_name; /* sorted by name */
};

static const char *json_type_name(const struct bs_json *v)
{
    static const char *names[] = {"null", "a boolean", "a number", "a string", "an array",
                                  "an object"};
    return names[v->type];
}

/* ---- validation of one header entry ---- */

/* v must be an integer in [0, INT64_MAX]. */
static bool st_uint(const struct bs_json *v, int64_t *out)
{
    if (v->type != BS_JSON_NUMBER || !v->is_integer || v->integer < 0)
        return false;
    *out = v->integer;
    return true;
}

/* Describe a JSON value for "found ..." in messages. */
static const char *st_found(const struct bs_json *v, char *buf, size_t size)
{
    if (v->type == BS_JSON_NUMBER && v->is_integer)
        snprintf(buf, size, "%lld", (long long)v->integer);
    else if (v->type == BS_JSON_NUMBER)
        snprintf(buf, size, "%g", v->number);
    else
        snprintf(buf, size, "%s", json_type_name(v));
    return buf;
}

static const struct bs_json *st_field(const struct bs_json *obj, const char *name, const char *key,
                                      enum bs_json_type type, struct bs_err *err)
{
    const struct bs_json *v = bs_json_get(obj, key);
    if (v == NULL)
        bs_err_set(err, BS_EFORMAT, "tensor '%s': missing \"%s\"", name, key);
    else if (v->type != type)
        bs_err_set(err, BS_EFORMAT, "tensor '%s': \"%s\" must be %s, found %s", name, key,
                   type == BS_JSON_STRING ? "a string" : "an array", json_type_name(v));
    else
        return v;
    return NULL;
}

static int st_parse_dtype(const struct bs_json *m, struct st_entry *e, struct bs_err *err)
{
    const struct bs_json *v = st_field(m, e->name, "dtype", BS_JSON_STRING, err);
    if (v == NULL)
        return BS_EFORMAT;
    if (bs_dtype_from_name(v->string, &e->type) != 0)
        return bs_err_set(err, BS_EFORMAT,
                          "unsupported dtype '%s' for tensor '%s' (supported: F32, F16, BF16, "
                          "I64, BOOL)",
                          v->string, e->name);
    return 0;
}

/* Shape and its byte size, checked against overflow. */
static int st_parse_shape(const struct bs_json *m, struct st_entry *e, uint64_t *nbytes,
                          struct bs_err *err)
{
    const struct bs_json *v = st_field(m, e->name, "shape", BS_JSON_ARRAY, err);
    if (v == NULL)
        return BS_EFORMAT;
    if (v->len > BS_MAX_DIMS)
        return bs_err_set(err, BS_EFORMAT, "tensor '%s': shape has %zu dims, at most %d supported",
                          e->name, v->len, BS_MAX_DIMS);
    int64_t numel = 1;
    bool overflow = false;
    e->n_dims = 0;
    for (const struct bs_json *d = v->child; d != NULL; d = d->next, e->n_dims++) {
        char buf[32];
        if (!st_uint(d, &e->ne[e->n_dims]))
            return bs_err_set(err, BS_EFORMAT,
                              "tensor '%s': shape[%d] must be a non-negative integer, found %s",
                              e->name, e->n_dims, st_found(d, buf, sizeof(buf)));
        overflow |= __builtin_mul_overflow(numel, e->ne[e->n_dims], &numel);
    }
    overflow |= __builtin_mul_overflow((uint64_t)numel, (uint64_t)bs_dtype_size(e->type), nbytes);
    if (overflow)
        return bs_err_set(err, BS_EFORMAT, "tensor '%s': shape is too large", e->name);
    return 0;
}

static int st_parse_offsets(const struct bs_json *m, struct st_entry *e, uint64_t nbytes,
                            uint64_t data_size, struct bs_err *err)
{
    const struct bs_json *v = st_field(m, e->name, "data_offsets", BS_JSON_ARRAY, err);
    if (v == NULL)
        return BS_EFORMAT;
    int64_t b, end;
    if (v->len != 2 || !st_uint(v->child, &b) || !st_uint(v->child->next, &end))
        return bs_err_set(err, BS_EFORMAT,
                          "tensor '%s': \"data_offsets\" must be [begin, end] with two "
                          "non-negative integers",
                          e->name);
    if (b > end)
        return bs_err_set(err, BS_EFORMAT, "tensor '%s': data_offsets begin %lld > end %lld",
                          e->name, (long long)b, (long long)end);
    if ((uint64_t)end > data_size)
        return bs_err_set(err, BS_EFORMAT,
                          "tensor '%s': data_offsets end %lld is past the end of the data "
                          "section (%llu bytes)",
                          e->name, (long long)end, (unsigned long long)data_size);
    if ((uint64_t)(end - b) != nbytes)
        return bs_err_set(err, BS_EFORMAT,
                          "tensor '%s': data_offsets span %lld bytes but its shape and dtype "
                          "need %llu",
                          e->name, (long long)(end - b), (unsigned long long)nbytes);
    e->begin = (uint64_t)b;
    e->end = (uint64_t)end;
    return 0;
}

static int st_parse_entry(const struct bs_json *m, struct st_entry *e, uint64_t data_size,
                          struct bs_err *err)
{
    uint64_t nbytes = 0;
    int rc;
    e->name = m->key;
    if (m->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EFORMAT, "tensor '%s': expected an object, found %s", e->name,
                          json_type_name(m));
    if ((rc = st_parse_dtype(m, e, err)) != 0 || (rc = st_parse_shape(m, e, &nbytes, err)) != 0)
        return rc;
    return st_parse_offsets(m, e, nbytes, data_size, err);
}

static int st_parse_metadata(bs_st_file_t *f, const struct bs_json *m, struct bs_err *err)
{
    if (f->metadata != NULL)
        return bs_err_set(err, BS_EFORMAT, "duplicate \"%s\"", ST_METADATA);
    if (m->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EFORMAT, "\"%s\" must be an object, found %s", ST_METADATA,
                          json_type_name(m));
    for (const struct bs_json *v = m->child; v != NULL; v = v->next) {
        if (v->type != BS_JSON_STRING)
            return bs_err_set(err, BS_EFORMAT, "\"%s\": value of '%s' must be a string, found %s",
                              ST_METADATA, v->key, json_type_name(v));
    }
    f->metadata = m;
    return 0;
}

/* ---- the whole header ---- */

static int st_cmp_entry(const void *a, const void *b)
{
    return strcmp((*(struct st_entry *const *)a)->name, (*(struct st_entry *const *)b)->name);
}

/* Sort the name index and reject duplicates. */
static int st_index(bs_st_file_t *f, struct bs_err *err)
{
    f->by_name = malloc((size_t)(f->n ? f->n : 1) * sizeof(*f->by_name));
    if (f->by_name == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    for (int i = 0; i < f->n; i++)
        f->by_name[i] = &f->entries[i];
    qsort(f->by_name, (size_t)f->n, sizeof(*f->by_name), st_cmp_entry);
    for (int i = 1; i < f->n; i++) {
        if (strcmp(f->by_name[i - 1]->name, f->by_name[i]->name) == 0)
            return bs_err_set(err, BS_EFORMAT, "duplicate tensor name '%s'", f->by_name[i]->name);
    }
    return 0;
}

static int st_cmp_offsets(const void *a, const void *b)
{
    const struct st_entry *x = *(struct st_entry *const *)a, *y = *(struct st_entry *const *)b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Bytes [from, to) of the data section are in no tensor; prev and next are
 * the tensors around them (NULL: none). */
static int st_uncovered(uint64_t from, uint64_t to, const struct st_entry *prev,
                        const struct st_entry *next, struct bs_err *err)
{
    char where[160];
    if (next != NULL && prev != NULL)
        snprintf(where, sizeof(where), "a hole between '%s' and '%s'", prev->name, next->name);
    else if (next != NULL)
        snprintf(where, sizeof(where), "a hole before '%s', the first tensor", next->name);
    else if (prev != NULL)
        snprintf(where, sizeof(where), "trailing bytes after '%s', the last tensor", prev->name);
    else
        snprintf(where, sizeof(where), "trailing bytes: the header lists no tensors");
    return bs_err_set(err, BS_EFORMAT,
                      "no tensor covers bytes [%llu, %llu) of the data section (%s); the "
                      "tensors' data_offsets must cover all of it",
                      (unsigned long long)from, (unsigned long long)to, where);
}

static int st_overlap(const struct st_entry *a, const struct st_entry *b, struct bs_err *err)
{
    return bs_err_set(err, BS_EFORMAT,
                      "tensors '%s' (data_offsets [%llu, %llu]) and '%s' (data_offsets "
                      "[%llu, %llu]) overlap",
                      a->name, (unsigned long long)a->begin, (unsigned long long)a->end, b->name,
                      (unsigned long long)b->begin, (unsigned long long)b->end);
}

/* The tensors' byte ranges must tile the data section, as the format requires:
 * sorted by offset, each starts where the one before ended, the first at 0,
 * the last at the end (a zero-size tensor sits at such a boundary). Every
 * range already lies inside the data section, so nothing here overflows. */
static int st_check_layout(const bs_st_file_t *f, struct bs_err *err)
{
    struct st_entry **order = malloc((size_t)(f->n ? f->n : 1) * sizeof(*order));
    if (order == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    for (int i = 0; i < f->n; i++)
        order[i] = &f->entries[i];
    qsort(order, (size_t)f->n, sizeof(*order), st_cmp_offsets);
    const struct st_entry *prev = NULL; /* the tensor that ends at pos */
    uint64_t pos = 0;
    int rc = 0;
    for (int i = 0; i < f->n && rc == 0; i++) {
        const struct st_entry *e = order[i];
        if (e->begin < pos)
            rc = st_overlap(prev, e, err);
        else if (e->begin > pos)
            rc = st_uncovered(pos, e->begin, prev, e, err);
        pos = e->end;
        prev = e;
    }
    if (rc == 0 && pos != f->data_size)
        rc = st_uncovered(pos, f->data_size, prev, NULL, err);
    free(order);
    return rc;
}

static int st_parse_header(bs_st_file_t *f, const char *text, size_t len, struct bs_err *err)
{
    int rc = bs_json_parse(&f->doc, text, len, ST_JSON_DEPTH, err);
    if (rc != 0) {
        bs_err_wrap(err, "header");
        return rc;
    }
    const struct bs_json *root = bs_json_doc_root(f->doc);
    if (root->type != BS_JSON_OBJECT)
        return bs_err_set(err, BS_EFORMAT, "header must be a JSON object, found %s",
                          json_type_name(root));
    if (root->len > (size_t)INT32_MAX)
        return bs_err_set(err, BS_ERANGE, "header lists too many tensors");
    f->entries = calloc(root->len ? root->len : 1, sizeof(*f->entries));
    if (f->entries == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    for (const struct bs_json *m = root->child; m != NULL; m = m->next) {
        if (strcmp(m->key, ST_METADATA) == 0)
            rc = st_parse_metadata(f, m, err);
        else
            rc = st_parse_entry(m, &f->entries[f->n++], f->data_size, err);
        if (rc != 0)
            return rc;
    }
    if ((rc = st_index(f, err)) != 0)
        return rc;
    return st_check_layout(f, err);
}

/* Validate size bytes at data into f (which the caller frees on error). */
static int st_load(bs_st_file_t *f, const unsigned char *data, size_t size, struct bs_err *err)
{
    if (size < 8)
        return bs_err_set(err, BS_EFORMAT,
                          "file is %zu bytes, too short for the 8-byte header size", size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | data[i];
    if (n > ST_HEADER_MAX)
        return bs_err_set(err, BS_ERANGE, "header size %llu exceeds the limit of %llu bytes",
                          (unsigned long long)n, ST_HEADER_MAX);
    if (n > size - 8)
        return bs_err_set(err, BS_EFORMAT,
                          "header size %llu is larger than the %zu bytes that follow it",
                          (unsigned long long)n, size - 8);
    f->data = data + 8 + n;
    f->data_size = size - 8 - n;
    return st_parse_header(f, (const char *)data + 8, (size_t)n, err);
}

int bs_st_open_memory(bs_st_file_t **file, const void *data, size_t size, struct bs_err *err)
{
    *file = NULL;
    if (data == NULL && size != 0)
        return bs_err_set(err, BS_EINVAL, "no data");
    bs_st_file_t *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    int rc = st_load(f, data, size, err);
    if (rc != 0) {
        bs_st_close(f);
        return rc;
    }
    *file = f;
    return 0;
}

/* Map path read-only into *map / *size. */
static int st_map(const char *path, void **map, size_t *size, struct bs_err *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return bs_err_set(err, BS_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) != 0)
        rc = bs_err_set(err, BS_EIO, "%s: cannot stat: %s", path, strerror(errno));
    else if (!S_ISREG(st.st_mode))
        rc = bs_err_set(err, BS_EIO, "%s: not a regular file", path);
    else if (st.st_size < 8)
        rc = bs_err_set(err, BS_EFORMAT,
                        "%s: file is %lld bytes, too short for the 8-byte header size", path,
                        (long long)st.st_size);
    else if ((*map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0)) == MAP_FAILED)
        rc = bs_err_set(err, BS_EIO, "%s: cannot map: %s", path, strerror(errno));
    *size = (size_t)st.st_size;
    close(fd);
    return rc;
}

int bs_st_open(bs_st_file_t **file, const char *path, struct bs_err *err)
{
    void *map = NULL;
    size_t size = 0;
    *file = NULL;
    int rc = st_map(path, &map, &size, err);
    if (rc != 0)
        return rc;
    bs_st_file_t *f = calloc(1, sizeof(*f));
    if (f == NULL) {
        munmap(map, size);
        return bs_err_set(err, BS_ENOMEM, "%s: out of memory", path);
    }
    f->map = map;
    f->map_size = size;
    if ((rc = st_load(f, map, size, err)) != 0) {
        bs_st_close(f);
        bs_err_wrap(err, "%s", path);
        return rc;
    }
    *file = f;
    return 0;
}

void bs_st_close(bs_st_file_t *file)
{
    if (file == NULL)
        return;
    if (file->map != NULL)
        munmap(file->map, file->map_size);
    bs_json_doc_free(file->doc);
    free(file->entries);
    free(file->by_name);
    free(file);
}

int bs_st_count(const bs_st_file_t *file)
{
    return file ? file->n : 0;
}

const char *bs_st_name(const bs_st_file_t *file, int i)
{
    return file && i >= 0 && i < file->n ? file->entries[i].name : NULL;
}

int bs_st_get(const bs_st_file_t *file, const char *name, struct bs_tensor *out)
{
    if (file == NULL || file->n == 0)
        return BS_ENOTFOUND;
    struct st_entry key = {.name = name}, *pk = &key;
    struct st_entry **hit =
        bsearch(&pk, file->by_name, (size_t)file->n, sizeof(*file->by_name), st_cmp_entry);
    if (hit == NULL)
        return BS_ENOTFOUND;
    const struct st_entry *e = *hit;
    /* The mapping is read-only: the view's data must never be written. */
    *out = bs_tensor_make(e->type, e->n_dims, e->ne, (void *)(file->data + e->begin));
    return 0;
}

const char *bs_st_metadata(const bs_st_file_t *file, const char *key)
{
    const struct bs_json *v = file ? bs_json_get(file->metadata, key) : NULL;
    return v ? v->string : NULL;
}

/* ---- writing ---- */

struct st_buf {
    char *p;
    size_t len, cap;
    bool oom; /* sticky: checked once at the end */
};

static void buf_put(struct st_buf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

__attribute__((format(printf, 2, 3))) static void buf_fmt(struct st_buf *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    buf_put(b, tmp, n < (int)sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* s as a JSON string: quotes and backslashes escaped, control bytes as \u00XX. */
static void buf_json_string(struct st_buf *b, const char *s)
{
    buf_put(b, "\"", 1);
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            buf_fmt(b, "\\%c", c);
        else if (c < 0x20)
            buf_fmt(b, "\\u%04x", c);
        else
            buf_put(b, s, 1);
    }
    buf_put(b, "\"", 1);
}

/* A tensor the writer can store: known dtype, sane shape, contiguous data. */
static int st_check_tensor(const char *name, const struct bs_tensor *t, int i, uint64_t *nbytes,
                           struct bs_err *err)
{
    if (name == NULL)
        return bs_err_set(err, BS_EINVAL, "tensor %d has no name", i);
    if (strcmp(name, ST_METADATA) == 0)
        return bs_err_set(err, BS_EINVAL, "'%s' is reserved and cannot name a tensor", name);
    if ((unsigned)t->type >= BS_TYPE_COUNT)
        return bs_err_set(err, BS_EINVAL, "tensor '%s': unknown dtype %d", name, (int)t->type);
    if (t->n_dims < 0 || t->n_dims > BS_MAX_DIMS)
        return bs_err_set(err, BS_EINVAL, "tensor '%s': %d dims (expected 0 to %d)", name,
                          t->n_dims, BS_MAX_DIMS);
    uint64_t n = bs_dtype_size(t->type);
    for (int d = 0; d < t->n_dims; d++) {
        if (t->ne[d] < 0 || __builtin_mul_overflow(n, (uint64_t)t->ne[d], &n))
            return bs_err_set(err, BS_EINVAL, "tensor '%s': bad dim %d (%lld)", name, d,
                              (long long)t->ne[d]);
    }
    if (n > 0 && t->data == NULL)
        return bs_err_set(err, BS_EINVAL, "tensor '%s': no data", name);
    if (n > 0 && !bs_tensor_is_contiguous(t))
        return bs_err_set(err, BS_EINVAL, "tensor '%s': not contiguous", name);
    *nbytes = n;
    return 0;
}

/* The JSON header, padded with spaces to a multiple of 8 bytes. */
static int st_build_header(struct st_buf *b, const char *const *names,
                           const struct bs_tensor *tensors, int n, uint64_t *data_size,
                           struct bs_err *err)
{
    uint64_t off = 0, nbytes = 0;
    buf_put(b, "{", 1);
    for (int i = 0; i < n; i++) {
        const struct bs_tensor *t = &tensors[i];
        int rc = st_check_tensor(names[i], t, i, &nbytes, err);
        if (rc != 0)
            return rc;
        buf_put(b, i ? "," : "", i ? 1 : 0);
        buf_json_string(b, names[i]);
        buf_fmt(b, ":{\"dtype\":\"%s\",\"shape\":[", bs_dtype_name(t->type));
        for (int d = 0; d < t->n_dims; d++)
            buf_fmt(b, d ? ",%lld" : "%lld", (long long)t->ne[d]);
        buf_fmt(b, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                (unsigned long long)(off + nbytes));
        off += nbytes; /* cannot wrap: every tensor is in memory */
    }
    buf_put(b, "}", 1);
    while (b->len % 8 != 0)
        buf_put(b, " ", 1);
    if (b->oom)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    if (b->len > ST_HEADER_MAX)
        return bs_err_set(err, BS_ERANGE, "header of %zu bytes exceeds the limit of %llu", b->len,
                          ST_HEADER_MAX);
    *data_size = off;
    return 0;
}

/* Read the header back as bs_st_open would: catches duplicate names and
 * names that are not valid UTF-8, so nothing unreadable is ever written. */
static int st_self_check(const struct st_buf *hdr, uint64_t data_size, struct bs_err *err)
{
    bs_st_file_t f = {.data_size = data_size};
    struct bs_err e = {0};
    int rc = st_parse_header(&f, hdr->p, hdr->len, &e);
    bs_json_doc_free(f.doc);
    free(f.entries);
    free(f.by_name);
    if (rc == BS_ENOMEM)
        return bs_err_set(err, rc, "out of memory");
    if (rc != 0)
        return bs_err_set(err, BS_EINVAL, "invalid tensor names: %s", e.msg);
    return 0;
}

static int st_write_all(int fd, const void *data, size_t n)
{
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n < ((size_t)1 << 30) ? n : (size_t)1 << 30);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Size, header, data, fsync; -1 with errno on failure. */
static int st_write_fd(int fd, const struct st_buf *hdr, const struct bs_tensor *tensors, int n)
{
    unsigned char size[8];
    for (int i = 0; i < 8; i++)
        size[i] = (unsigned char)((uint64_t)hdr->len >> (8 * i));
    if (st_write_all(fd, size, sizeof(size)) != 0 || st_write_all(fd, hdr->p, hdr->len) != 0)
        return -1;
    for (int i = 0; i < n; i++) {
        size_t nbytes = bs_tensor_nbytes(&tensors[i]);
        if (nbytes > 0 && st_write_all(fd, tensors[i].data, nbytes) != 0)
            return -1;
    }
    return fsync(fd);
}

/* Write to "<path>.tmp.<pid>" and rename it over path. */
static int st_write_tmp(const char *path, const struct st_buf *hdr,
                        const struct bs_tensor *tensors, int n, struct bs_err *err)
{
    size_t size = strlen(path) + 32;
    char *tmp = malloc(size);
    if (tmp == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    snprintf(tmp, size, "%s.tmp.%ld", path, (long)getpid());
    int rc = 0, fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = bs_err_set(err, BS_EIO, "cannot create %s: %s", tmp, strerror(errno));
        free(tmp);
        return rc;
    }
    int ok = st_write_fd(fd, hdr, tensors, n) == 0, saved = errno;
    if (close(fd) != 0 && ok) {
        ok = 0;
        saved = errno;
    }
    if (ok && rename(tmp, path) != 0) {
        ok = 0;
        saved = errno;
    }
    if (!ok) {
        unlink(tmp);
        rc = bs_err_set(err, BS_EIO, "cannot write: %s", strerror(saved));
    }
    free(tmp);
    return rc;
}

int bs_st_write(const char *path, const char *const *names, const struct bs_tensor *tensors,
                int n, struct bs_err *err)
{
    struct st_buf hdr = {0};
    uint64_t data_size = 0;
    int rc;
    if (n < 0 || (n > 0 && (names == NULL || tensors == NULL)))
        rc = bs_err_set(err, BS_EINVAL, "bad tensor list");
    else if ((rc = st_build_header(&hdr, names, tensors, n, &data_size, err)) == 0 &&
             (rc = st_self_check(&hdr, data_size, err)) == 0)
        rc = st_write_tmp(path, &hdr, tensors, n, err);
    free(hdr.p);
    if (rc != 0)
        bs_err_wrap(err, "%s", path);
    return rc;
}
