/* Tensors: a dtype, up to four dims (outermost first, as in PyTorch) with byte
 * strides, and a data pointer that a tensor never owns. Views are new structs
 * over the same data. */
#ifndef BS_TENSOR_H
#define BS_TENSOR_H

#include <stdbool.h>
#include <stdint.h>

#include "common.h"

#define BS_MAX_DIMS 4

enum bs_dtype {
    BS_TYPE_F32,
    BS_TYPE_F16,
    BS_TYPE_BF16,
    BS_TYPE_I64,
    BS_TYPE_BOOL,
    BS_TYPE_COUNT,
};

struct bs_tensor {
    enum bs_dtype type;
    int n_dims;               /* 0 (scalar) to BS_MAX_DIMS */
    int64_t ne[BS_MAX_DIMS];  /* sizes, outermost first */
    int64_t nb[BS_MAX_DIMS];  /* strides in bytes */
    void *data;               /* not owned */
};

/* Size in bytes of one element of type. */
size_t bs_dtype_size(enum bs_dtype type);

/* Name as safetensors spells it ("F32", "F16", "BF16", "I64", "BOOL"). */
const char *bs_dtype_name(enum bs_dtype type);

/* Parse a safetensors dtype name; returns 0 or BS_EINVAL for names we do not support. */
int bs_dtype_from_name(const char *name, enum bs_dtype *type);

/* A contiguous tensor of the given shape over data (which may be NULL for now). */
struct bs_tensor bs_tensor_make(enum bs_dtype type, int n_dims, const int64_t *ne, void *data);

/* Number of elements (1 for a scalar). */
int64_t bs_tensor_nelements(const struct bs_tensor *t);

/* Bytes covered by a contiguous tensor of this shape. */
size_t bs_tensor_nbytes(const struct bs_tensor *t);

/* True when the elements are laid out densely in row-major order. */
bool bs_tensor_is_contiguous(const struct bs_tensor *t);

/* True when every dim but the last folds into rows of one stride and the last
 * dim is dense: the layout every row-wise op takes. */
bool bs_tensor_is_rows(const struct bs_tensor *t);

/* Number of rows (product of all dims but the last) of a rows-layout tensor. */
int64_t bs_tensor_nrows(const struct bs_tensor *t);

/* Row stride in elements of a rows-layout tensor. */
int64_t bs_tensor_ld(const struct bs_tensor *t);

/* View of columns [c0, c0 + n) of the last dim. */
struct bs_tensor bs_tensor_view_cols(const struct bs_tensor *t, int64_t c0, int64_t n);

/* View of entries [i0, i0 + n) along dim 0. */
struct bs_tensor bs_tensor_view_outer(const struct bs_tensor *t, int64_t i0, int64_t n);

/* The same data seen with another shape; t must be contiguous. */
struct bs_tensor bs_tensor_reshape(const struct bs_tensor *t, int n_dims, const int64_t *ne);

/* Format the shape as "[2, 77, 768]" into buf; returns buf. */
char *bs_tensor_shape_str(const struct bs_tensor *t, char *buf, size_t size);

/* Convert n elements of type src_type at src (contiguous) to float. */
int bs_convert_to_f32(float *dst, const void *src, enum bs_dtype src_type, int64_t n);

/* Convert n floats to type dst_type (F32, F16 or BF16, round to nearest even). */
int bs_convert_from_f32(void *dst, enum bs_dtype dst_type, const float *src, int64_t n);

/* IEEE half and bfloat16 conversions. */
float bs_fp16_to_f32(uint16_t h);
uint16_t bs_f32_to_fp16(float f);
float bs_bf16_to_f32(uint16_t h);
uint16_t bs_f32_to_bf16(float f);

#endif
