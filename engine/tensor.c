#include "tensor.h"

#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    size_t size;
} dtype_info[BS_TYPE_COUNT] = {
    [BS_TYPE_F32] = {"F32", 4},  [BS_TYPE_F16] = {"F16", 2}, [BS_TYPE_BF16] = {"BF16", 2},
    [BS_TYPE_I64] = {"I64", 8},  [BS_TYPE_BOOL] = {"BOOL", 1},
};

size_t bs_dtype_size(enum bs_dtype type)
{
    return (unsigned)type < BS_TYPE_COUNT ? dtype_info[type].size : 0;
}

const char *bs_dtype_name(enum bs_dtype type)
{
    return (unsigned)type < BS_TYPE_COUNT ? dtype_info[type].name : "?";
}

int bs_dtype_from_name(const char *name, enum bs_dtype *type)
{
    for (int i = 0; i < BS_TYPE_COUNT; i++) {
        if (strcmp(name, dtype_info[i].name) == 0) {
            *type = (enum bs_dtype)i;
            return 0;
        }
    }
    return BS_EINVAL;
}

struct bs_tensor bs_tensor_make(enum bs_dtype type, int n_dims, const int64_t *ne, void *data)
{
    struct bs_tensor t = {.type = type, .n_dims = n_dims, .data = data};
    int64_t stride = (int64_t)bs_dtype_size(type);
    for (int i = n_dims - 1; i >= 0; i--) {
        t.ne[i] = ne[i];
        t.nb[i] = stride;
        stride *= ne[i];
    }
    return t;
}

int64_t bs_tensor_nelements(const struct bs_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->n_dims; i++)
        n *= t->ne[i];
    return n;
}

size_t bs_tensor_nbytes(const struct bs_tensor *t)
{
    return (size_t)bs_tensor_nelements(t) * bs_dtype_size(t->type);
}

bool bs_tensor_is_contiguous(const struct bs_tensor *t)
{
    int64_t stride = (int64_t)bs_dtype_size(t->type);
    for (int i = t->n_dims - 1; i >= 0; i--) {
        if (t->ne[i] != 1 && t->nb[i] != stride)
            return false;
        stride *= t->ne[i];
    }
    return true;
}

bool bs_tensor_is_rows(const struct bs_tensor *t)
{
    if (t->n_dims == 0)
        return true;
    int last = t->n_dims - 1;
    if (t->ne[last] != 1 && t->nb[last] != (int64_t)bs_dtype_size(t->type))
        return false;
    /* Outer dims must fold into one row stride. */
    for (int i = 0; i < last - 1; i++) {
        if (t->ne[i] != 1 && t->nb[i] != t->nb[i + 1] * t->ne[i + 1])
            return false;
    }
    return true;
}

int64_t bs_tensor_nrows(const struct bs_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->n_dims - 1; i++)
        n *= t->ne[i];
    return n;
}

int64_t bs_tensor_ld(const struct bs_tensor *t)
{
    if (t->n_dims < 2)
        return t->n_dims == 1 ? t->ne[0] : 1;
    return t->nb[t->n_dims - 2] / (int64_t)bs_dtype_size(t->type);
}

struct bs_tensor bs_tensor_view_cols(const struct bs_tensor *t, int64_t c0, int64_t n)
{
    struct bs_tensor v = *t;
    int last = t->n_dims - 1;
    v.ne[last] = n;
    v.data = (char *)t->data + c0 * t->nb[last];
    return v;
}

struct bs_tensor bs_tensor_view_outer(const struct bs_tensor *t, int64_t i0, int64_t n)
{
    struct bs_tensor v = *t;
    v.ne[0] = n;
    if (t->data != NULL) /* a shape-only tensor stays one: NULL + 0 is undefined */
        v.data = (char *)t->data + i0 * t->nb[0];
    return v;
}

struct bs_tensor bs_tensor_reshape(const struct bs_tensor *t, int n_dims, const int64_t *ne)
{
    return bs_tensor_make(t->type, n_dims, ne, t->data);
}

char *bs_tensor_shape_str(const struct bs_tensor *t, char *buf, size_t size)
{
    size_t off = 0;
    off += (size_t)snprintf(buf + off, size - off, "[");
    for (int i = 0; i < t->n_dims && off < size; i++)
        off += (size_t)snprintf(buf + off, size - off, i ? ", %lld" : "%lld", (long long)t->ne[i]);
    if (off < size)
        snprintf(buf + off, size - off, "]");
    return buf;
}

float bs_fp16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {
        /* Subnormal half: normalise. */
        int e = -1;
        do {
            e++;
            mant <<= 1;
        } while ((mant & 0x400) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t bs_f32_to_fp16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    if (absx >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00);
    if (absx < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (absx < 0x33000000u)
            return (uint16_t)sign;
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t half = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t r = absx - 0x38000000u; /* rebias exponent 127 -> 15 */
    uint32_t half = r >> 13;
    uint32_t rem = r & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1)))
        half++;
    return (uint16_t)(sign | half);
}

float bs_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t bs_f32_to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40); /* quiet nan */
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

int bs_convert_to_f32(float *dst, const void *src, enum bs_dtype src_type, int64_t n)
{
    const uint16_t *h = src;
    switch (src_type) {
    case BS_TYPE_F32:
        memmove(dst, src, (size_t)n * 4);
        return 0;
    case BS_TYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, h + i, 2);
            dst[i] = bs_fp16_to_f32(v);
        }
        return 0;
    case BS_TYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, h + i, 2);
            dst[i] = bs_bf16_to_f32(v);
        }
        return 0;
    case BS_TYPE_I64:
        for (int64_t i = 0; i < n; i++) {
            int64_t v;
            memcpy(&v, (const char *)src + 8 * i, 8);
            dst[i] = (float)v;
        }
        return 0;
    case BS_TYPE_BOOL:
        for (int64_t i = 0; i < n; i++)
            dst[i] = ((const uint8_t *)src)[i] ? 1.0f : 0.0f;
        return 0;
    default:
        return BS_EINVAL;
    }
}

int bs_convert_from_f32(void *dst, enum bs_dtype dst_type, const float *src, int64_t n)
{
    switch (dst_type) {
    case BS_TYPE_F32:
        memmove(dst, src, (size_t)n * 4);
        return 0;
    case BS_TYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t v = bs_f32_to_fp16(src[i]);
            memcpy((char *)dst + 2 * i, &v, 2);
        }
        return 0;
    case BS_TYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t v = bs_f32_to_bf16(src[i]);
            memcpy((char *)dst + 2 * i, &v, 2);
        }
        return 0;
    default:
        return BS_EINVAL;
    }
}
