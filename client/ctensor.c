/* Client tensors and their files (.npy through npy.c, .safetensors through
 * the engine's reader and writer). */
#include "ctensor.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "npy.h"
#include "safetensors.h"

static const struct {
    const char *name;
    size_t size;
} datatypes[] = {
    {"FP32", 4},   {"FP16", 2},   {"BF16", 2}, {"FP64", 8},  {"INT64", 8},
    {"INT32", 4},  {"INT16", 2},  {"INT8", 1}, {"UINT8", 1}, {"UINT16", 2},
    {"UINT32", 4}, {"UINT64", 8}, {"BOOL", 1},
};

/* Safetensors dtypes the engine reads and writes, with their KServe names. */
static const struct {
    enum bs_dtype type;
    const char *datatype;
} st_types[] = {
    {BS_TYPE_F32, "FP32"},  {BS_TYPE_F16, "FP16"},  {BS_TYPE_BF16, "BF16"},
    {BS_TYPE_I64, "INT64"}, {BS_TYPE_BOOL, "BOOL"},
};

size_t bs_ct_datatype_size(const char *datatype)
{
    for (size_t i = 0; i < BS_ARRAY_LEN(datatypes); i++)
        if (strcmp(datatype, datatypes[i].name) == 0)
            return datatypes[i].size;
    return 0;
}

int64_t bs_ct_nelements(const struct bs_ctensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->n_dims; i++)
        if (t->shape[i] < 0 || __builtin_mul_overflow(n, t->shape[i], &n))
            return -1;
    return n;
}

int bs_ct_alloc(struct bs_ctensor *t, struct bs_err *err)
{
    size_t esize = bs_ct_datatype_size(t->datatype);
    int64_t ne = bs_ct_nelements(t);
    if (esize == 0)
        return bs_err_set(err, BS_EINVAL, "unsupported datatype '%s'", t->datatype);
    if (ne < 0 || (uint64_t)ne > SIZE_MAX / esize)
        return bs_err_set(err, BS_EINVAL, "tensor '%s': shape is too large", t->name);
    t->nbytes = (size_t)ne * esize;
    t->data = calloc(t->nbytes > 0 ? t->nbytes : 1, 1);
    if (t->data == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory for %zu bytes", t->nbytes);
    return 0;
}

void bs_ct_free(struct bs_ctensor *t)
{
    if (t == NULL)
        return;
    free(t->data);
    memset(t, 0, sizeof(*t));
}

char *bs_ct_shape_str(const struct bs_ctensor *t, char *buf, size_t size)
{
    size_t n = 0;
    if (size == 0)
        return buf;
    buf[0] = '\0';
    n += (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < t->n_dims && n < size; i++)
        n += (size_t)snprintf(buf + n, size - n, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (n < size)
        snprintf(buf + n, size - n, "]");
    return buf;
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int from_st(const bs_st_file_t *f, int i, struct bs_ctensor *t, struct bs_err *err)
{
    const char *name = bs_st_name(f, i);
    struct bs_tensor v;
    bs_st_get(f, name, &v);
    memset(t, 0, sizeof(*t));
    if (strlen(name) >= sizeof(t->name))
        return bs_err_set(err, BS_EINVAL, "tensor name '%.40s...' is too long", name);
    snprintf(t->name, sizeof(t->name), "%s", name);
    for (size_t k = 0; k < BS_ARRAY_LEN(st_types); k++)
        if (st_types[k].type == v.type)
            snprintf(t->datatype, sizeof(t->datatype), "%s", st_types[k].datatype);
    t->n_dims = v.n_dims;
    memcpy(t->shape, v.ne, sizeof(v.ne[0]) * (size_t)v.n_dims);
    int rc = bs_ct_alloc(t, err);
    if (rc == 0 && t->nbytes > 0)
        memcpy(t->data, v.data, t->nbytes);
    return rc;
}

static int read_st(const char *path, struct bs_ctensor *out, int max, int *n, struct bs_err *err)
{
    bs_st_file_t *f;
    int rc = bs_st_open(&f, path, err);
    if (rc != 0)
        return rc;
    int count = bs_st_count(f);
    if (count > max)
        rc = bs_err_set(err, BS_EINVAL, "%s: %d tensors, at most %d", path, count, max);
    for (int i = 0; rc == 0 && i < count; i++) {
        rc = from_st(f, i, &out[i], err);
        *n = i + 1;
    }
    bs_st_close(f);
    if (rc != 0) {
        for (int i = 0; i < *n; i++)
            bs_ct_free(&out[i]);
        *n = 0;
    }
    return rc;
}

int bs_ct_read_file(const char *path, const char *default_name, struct bs_ctensor *out, int max,
                    int *n, struct bs_err *err)
{
    *n = 0;
    if (ends_with(path, ".safetensors"))
        return read_st(path, out, max, n, err);
    if (!ends_with(path, ".npy"))
        return bs_err_set(err, BS_EINVAL, "%s: expected a .npy or .safetensors file", path);
    if (max < 1)
        return bs_err_set(err, BS_EINVAL, "too many tensors");
    memset(&out[0], 0, sizeof(out[0]));
    if (strlen(default_name) >= sizeof(out[0].name))
        return bs_err_set(err, BS_EINVAL, "tensor name '%.40s...' is too long", default_name);
    snprintf(out[0].name, sizeof(out[0].name), "%s", default_name);
    int rc = bs_npy_read(path, &out[0], err);
    if (rc == 0)
        *n = 1;
    return rc;
}

static int write_st(const char *path, const struct bs_ctensor *t, int n, struct bs_err *err)
{
    const char *names[BS_CT_MAX_FILE_TENSORS];
    struct bs_tensor ts[BS_CT_MAX_FILE_TENSORS];
    if (n > BS_CT_MAX_FILE_TENSORS)
        return bs_err_set(err, BS_EINVAL, "too many tensors (%d) for one file", n);
    for (int i = 0; i < n; i++) {
        int k = -1;
        for (size_t j = 0; j < BS_ARRAY_LEN(st_types); j++)
            if (strcmp(t[i].datatype, st_types[j].datatype) == 0)
                k = (int)j;
        if (k < 0 || t[i].n_dims > BS_MAX_DIMS)
            return bs_err_set(err, BS_EINVAL,
                              "%s: tensor '%s' (%s, %d dims) cannot be written as safetensors "
                              "here (FP32, FP16, BF16, INT64, BOOL, at most %d dims)",
                              path, t[i].name, t[i].datatype, t[i].n_dims, BS_MAX_DIMS);
        names[i] = t[i].name;
        ts[i] = bs_tensor_make(st_types[k].type, t[i].n_dims, t[i].shape, t[i].data);
    }
    return bs_st_write(path, names, ts, n, err);
}

int bs_ct_write_file(const char *path, const struct bs_ctensor *t, int n, struct bs_err *err)
{
    if (ends_with(path, ".safetensors"))
        return write_st(path, t, n, err);
    if (!ends_with(path, ".npy"))
        return bs_err_set(err, BS_EINVAL, "%s: expected a .npy or .safetensors file name", path);
    if (n != 1)
        return bs_err_set(err, BS_EINVAL,
                          "%s: .npy holds one tensor and there are %d (use .safetensors)", path, n);
    return bs_npy_write(path, &t[0], err);
}
