/* Tensors as the client sees them: a name, a KServe datatype ("FP32",
 * "INT64", ...), a shape and contiguous little-endian bytes that the tensor
 * owns; read from and written to .npy and .safetensors files. */
#ifndef BS_CTENSOR_H
#define BS_CTENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

#define BS_CT_MAX_DIMS         8
#define BS_CT_MAX_NAME         128
#define BS_CT_MAX_FILE_TENSORS 16

struct bs_ctensor {
    char name[BS_CT_MAX_NAME];
    char datatype[16]; /* KServe name: FP32, FP16, BF16, FP64, INT8..INT64, UINT8.., BOOL */
    int n_dims;
    int64_t shape[BS_CT_MAX_DIMS];
    void *data; /* owned (malloc), nbytes long; may be NULL when nbytes is 0 */
    size_t nbytes;
};

/* Bytes per element of a KServe datatype, or 0 when the name is unknown (or BYTES). */
size_t bs_ct_datatype_size(const char *datatype);

/* Number of elements of t's shape (1 for a scalar); -1 on overflow. */
int64_t bs_ct_nelements(const struct bs_ctensor *t);

/* Allocate t->data for t's datatype and shape (zeroed); BS_EINVAL for an unknown datatype. */
int bs_ct_alloc(struct bs_ctensor *t, struct bs_err *err);

/* Release t's data and clear it; NULL is a no-op. */
void bs_ct_free(struct bs_ctensor *t);

/* Format t's shape as "[1, 77, 768]" into buf; returns buf. */
char *bs_ct_shape_str(const struct bs_ctensor *t, char *buf, size_t size);

/* Read every tensor of a .npy (one tensor, named default_name) or
 * .safetensors file (each by its own name) into out[0..*n); the format is
 * chosen by the file's extension. On error nothing is left allocated. */
int bs_ct_read_file(const char *path, const char *default_name, struct bs_ctensor *out, int max,
                    int *n, struct bs_err *err);

/* Write tensors to path: .npy holds exactly one tensor, .safetensors any
 * number (FP32, FP16, BF16, INT64, BOOL) by name. */
int bs_ct_write_file(const char *path, const struct bs_ctensor *t, int n, struct bs_err *err);

#endif
