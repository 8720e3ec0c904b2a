/* NumPy's .npy format (versions 1.0, 2.0 and 3.0): a magic string, a
 * little-endian header length, a Python dict literal with 'descr',
 * 'fortran_order' and 'shape', then the data in C order. Little-endian (or
 * byte-sized) numeric dtypes only; Fortran order and object arrays are
 * rejected with a message that says so. */
#ifndef BS_NPY_H
#define BS_NPY_H

#include <stddef.h>

#include "ctensor.h"

/* Parse a whole .npy file held in memory into t (its data copied); t->name is left as is. */
int bs_npy_parse(const void *buf, size_t len, struct bs_ctensor *t, struct bs_err *err);

/* Read path into t (see bs_npy_parse); errors are prefixed with the path. */
int bs_npy_read(const char *path, struct bs_ctensor *t, struct bs_err *err);

/* Serialize t as a version 1.0 .npy (2.0 when the header needs it) into a malloc'ed buffer. */
int bs_npy_serialize(const struct bs_ctensor *t, void **buf, size_t *len, struct bs_err *err);

/* Write t to path as .npy. */
int bs_npy_write(const char *path, const struct bs_ctensor *t, struct bs_err *err);

#endif
