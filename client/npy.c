/* .npy reading and writing. The header is a Python dict literal; we parse
 * exactly the subset NumPy writes: {'descr': STR, 'fortran_order': BOOL,
 * 'shape': TUPLE,} in any order, with spaces, either quote style and an
 * optional trailing comma. */
#include "npy.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NPY_MAGIC     "\x93NUMPY"
#define NPY_MAGIC_LEN 6
#define NPY_ALIGN     64 /* NumPy pads the header so that data starts 64-byte aligned */

/* NumPy descr (without the byte-order character) <-> KServe datatype. */
static const struct {
    const char *descr;
    const char *datatype;
} npy_types[] = {
    {"f4", "FP32"},   {"f2", "FP16"},   {"f8", "FP64"},   {"i8", "INT64"},
    {"i4", "INT32"},  {"i2", "INT16"},  {"i1", "INT8"},   {"u1", "UINT8"},
    {"u2", "UINT16"}, {"u4", "UINT32"}, {"u8", "UINT64"}, {"b1", "BOOL"},
};

struct cursor {
    const char *p, *end;
};

static void skip_ws(struct cursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static bool eat(struct cursor *c, char ch)
{
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return true;
    }
    return false;
}

/* A quoted string without escapes into out (size bytes). */
static bool parse_str(struct cursor *c, char *out, size_t size)
{
    skip_ws(c);
    if (c->p >= c->end || (*c->p != '\'' && *c->p != '"'))
        return false;
    char q = *c->p++;
    size_t n = 0;
    while (c->p < c->end && *c->p != q) {
        if (*c->p == '\\' || n + 1 >= size)
            return false;
        out[n++] = *c->p++;
    }
    if (c->p >= c->end)
        return false;
    c->p++;
    out[n] = '\0';
    return true;
}

static bool parse_word(struct cursor *c, const char *w)
{
    skip_ws(c);
    size_t n = strlen(w);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, w, n) != 0)
        return false;
    c->p += n;
    return true;
}

/* "(d0, d1, ...)" with an optional trailing comma; "()" is a scalar. */
static bool parse_shape(struct cursor *c, struct bs_ctensor *t)
{
    if (!eat(c, '('))
        return false;
    t->n_dims = 0;
    for (;;) {
        if (eat(c, ')'))
            return true;
        skip_ws(c);
        if (c->p >= c->end || *c->p < '0' || *c->p > '9' || t->n_dims == BS_CT_MAX_DIMS)
            return false;
        int64_t v = 0;
        while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
            if (v > (INT64_MAX - 9) / 10)
                return false;
            v = v * 10 + (*c->p++ - '0');
        }
        if (c->p < c->end && *c->p == 'L') /* Python 2 longs */
            c->p++;
        t->shape[t->n_dims++] = v;
        if (!eat(c, ',')) {
            return eat(c, ')');
        }
    }
}

static int set_descr(const char *descr, struct bs_ctensor *t, struct bs_err *err)
{
    char order = descr[0];
    const char *code = descr + 1;
    if (order == '>')
        return bs_err_set(err, BS_EINVAL,
                          "dtype '%s' is big-endian: only little-endian data is supported "
                          "(numpy: a.astype(a.dtype.newbyteorder('<')))",
                          descr);
    if (order != '<' && order != '|' && order != '=')
        return bs_err_set(err, BS_EINVAL, "unsupported dtype '%s'", descr);
    for (size_t i = 0; i < BS_ARRAY_LEN(npy_types); i++) {
        if (strcmp(code, npy_types[i].descr) == 0) {
            bool one_byte = code[1] == '1';
            if (order == '|' && !one_byte)
                return bs_err_set(err, BS_EINVAL, "unsupported dtype '%s'", descr);
            snprintf(t->datatype, sizeof(t->datatype), "%s", npy_types[i].datatype);
            return 0;
        }
    }
    return bs_err_set(err, BS_EINVAL,
                      "unsupported dtype '%s' (supported: f4, f2, f8, i1-i8, u1-u8, b1; "
                      "no strings, objects, complex or structured arrays)",
                      descr);
}

static int parse_header(const char *h, size_t n, struct bs_ctensor *t, struct bs_err *err)
{
    struct cursor c = {h, h + n};
    bool have_descr = false, have_order = false, have_shape = false, fortran = false;
    char key[32], descr[32];
    if (!eat(&c, '{'))
        return bs_err_set(err, BS_EFORMAT, "header is not a dict");
    while (!eat(&c, '}')) {
        if (!parse_str(&c, key, sizeof(key)) || !eat(&c, ':'))
            return bs_err_set(err, BS_EFORMAT, "malformed header dict");
        if (strcmp(key, "descr") == 0 && parse_str(&c, descr, sizeof(descr)))
            have_descr = true;
        else if (strcmp(key, "fortran_order") == 0 && parse_word(&c, "True"))
            have_order = fortran = true;
        else if (strcmp(key, "fortran_order") == 0 && parse_word(&c, "False"))
            have_order = true;
        else if (strcmp(key, "shape") == 0 && parse_shape(&c, t))
            have_shape = true;
        else
            return bs_err_set(err, BS_EFORMAT,
                              "header key '%s': unexpected key or value (a structured dtype?)",
                              key);
        if (!eat(&c, ',') && !(skip_ws(&c), c.p < c.end && *c.p == '}'))
            return bs_err_set(err, BS_EFORMAT, "malformed header dict");
    }
    if (!have_descr || !have_order || !have_shape)
        return bs_err_set(err, BS_EFORMAT, "header lacks %s",
                          !have_descr   ? "'descr'"
                          : !have_order ? "'fortran_order'"
                                        : "'shape'");
    if (fortran && t->n_dims > 1)
        return bs_err_set(err, BS_EINVAL,
                          "array is in Fortran order; save it in C order "
                          "(numpy: np.save(path, np.ascontiguousarray(a)))");
    return set_descr(descr, t, err);
}

int bs_npy_parse(const void *buf, size_t len, struct bs_ctensor *t, struct bs_err *err)
{
    const unsigned char *b = buf;
    if (len < NPY_MAGIC_LEN + 4 || memcmp(b, NPY_MAGIC, NPY_MAGIC_LEN) != 0)
        return bs_err_set(err, BS_EFORMAT, "not a .npy file (no \\x93NUMPY magic)");
    unsigned major = b[6];
    size_t hlen, hstart;
    if (major == 1) {
        hlen = (size_t)b[8] | (size_t)b[9] << 8;
        hstart = 10;
    } else if (major == 2 || major == 3) {
        if (len < 12)
            return bs_err_set(err, BS_EFORMAT, "truncated .npy header");
        hlen = (size_t)b[8] | (size_t)b[9] << 8 | (size_t)b[10] << 16 | (size_t)b[11] << 24;
        hstart = 12;
    } else {
        return bs_err_set(err, BS_EFORMAT, ".npy format version %u.%u is not supported", major,
                          b[7]);
    }
    if (hlen > len - hstart)
        return bs_err_set(err, BS_EFORMAT, "truncated .npy header (%zu bytes announced)", hlen);
    int rc = parse_header((const char *)b + hstart, hlen, t, err);
    if (rc != 0)
        return rc;
    int64_t ne = bs_ct_nelements(t);
    size_t esize = bs_ct_datatype_size(t->datatype);
    size_t have = len - hstart - hlen;
    if (ne < 0 || (uint64_t)ne > SIZE_MAX / esize)
        return bs_err_set(err, BS_EFORMAT, "shape is too large");
    size_t want = (size_t)ne * esize;
    if (have != want) {
        char sb[128];
        return bs_err_set(err, BS_EFORMAT, "data holds %zu bytes, shape %s of %s needs %zu", have,
                          bs_ct_shape_str(t, sb, sizeof(sb)), t->datatype, want);
    }
    if ((rc = bs_ct_alloc(t, err)) != 0)
        return rc;
    if (want > 0)
        memcpy(t->data, b + hstart + hlen, want);
    return 0;
}

static int read_all(const char *path, unsigned char **buf, size_t *len, struct bs_err *err)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return bs_err_set(err, BS_EIO, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    unsigned char *b = malloc(cap);
    while (b != NULL) {
        n += fread(b + n, 1, cap - n, f);
        if (n < cap)
            break;
        unsigned char *nb = cap > SIZE_MAX / 2 ? NULL : realloc(b, cap * 2);
        if (nb == NULL) {
            free(b);
            b = NULL;
            break;
        }
        b = nb;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (b == NULL || bad) {
        free(b);
        return bs_err_set(err, b == NULL ? BS_ENOMEM : BS_EIO, "%s: cannot read", path);
    }
    *buf = b;
    *len = n;
    return 0;
}

int bs_npy_read(const char *path, struct bs_ctensor *t, struct bs_err *err)
{
    unsigned char *buf = NULL;
    size_t len = 0;
    int rc = read_all(path, &buf, &len, err);
    if (rc != 0)
        return rc;
    rc = bs_npy_parse(buf, len, t, err);
    free(buf);
    return rc != 0 ? bs_err_wrap(err, "%s", path) : 0;
}

static const char *descr_of(const char *datatype)
{
    for (size_t i = 0; i < BS_ARRAY_LEN(npy_types); i++)
        if (strcmp(datatype, npy_types[i].datatype) == 0)
            return npy_types[i].descr;
    return NULL;
}

int bs_npy_serialize(const struct bs_ctensor *t, void **buf, size_t *len, struct bs_err *err)
{
    const char *code = descr_of(t->datatype);
    if (code == NULL)
        return bs_err_set(err, BS_EINVAL, "%s has no NumPy dtype (use .safetensors)", t->datatype);
    char dict[512];
    int n = snprintf(dict, sizeof(dict), "{'descr': '%c%s', 'fortran_order': False, 'shape': (",
                     code[1] == '1' ? '|' : '<', code);
    for (int i = 0; i < t->n_dims; i++) /* NumPy writes (5,) and (2, 3) */
        n += snprintf(dict + n, sizeof(dict) - (size_t)n, "%s%lld%s", i > 0 ? ", " : "",
                      (long long)t->shape[i], t->n_dims == 1 ? "," : "");
    n += snprintf(dict + n, sizeof(dict) - (size_t)n, "), }");
    size_t pre = 10, total = pre + (size_t)n + 1; /* + '\n' */
    int major = 1;
    if (total - pre > 65535) {
        major = 2;
        pre = 12;
    }
    size_t hlen = ((pre + (size_t)n + 1 + NPY_ALIGN - 1) / NPY_ALIGN) * NPY_ALIGN - pre;
    unsigned char *b = malloc(pre + hlen + t->nbytes);
    if (b == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    memcpy(b, NPY_MAGIC, NPY_MAGIC_LEN);
    b[6] = (unsigned char)major;
    b[7] = 0;
    for (size_t i = 0; i < pre - 8; i++)
        b[8 + i] = (unsigned char)(hlen >> (8 * i));
    memcpy(b + pre, dict, (size_t)n);
    memset(b + pre + n, ' ', hlen - (size_t)n - 1);
    b[pre + hlen - 1] = '\n';
    if (t->nbytes > 0)
        memcpy(b + pre + hlen, t->data, t->nbytes);
    *buf = b;
    *len = pre + hlen + t->nbytes;
    return 0;
}

int bs_npy_write(const char *path, const struct bs_ctensor *t, struct bs_err *err)
{
    void *buf;
    size_t len;
    int rc = bs_npy_serialize(t, &buf, &len, err);
    if (rc != 0)
        return rc;
    FILE *f = fopen(path, "wb");
    if (f == NULL) {
        free(buf);
        return bs_err_set(err, BS_EIO, "%s: %s", path, strerror(errno));
    }
    size_t w = fwrite(buf, 1, len, f);
    int bad = fclose(f) != 0 || w != len;
    free(buf);
    return bad ? bs_err_set(err, BS_EIO, "%s: write failed", path) : 0;
}
