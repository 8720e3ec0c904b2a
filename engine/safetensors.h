/* Reading and writing the safetensors format: an 8-byte little-endian header
 * size, a JSON header mapping names to {dtype, shape, data_offsets}, then the
 * data. Files are mapped read-only; tensors are views into the mapping. */
#ifndef BS_SAFETENSORS_H
#define BS_SAFETENSORS_H

#include "common.h"
#include "tensor.h"

typedef struct bs_st_file bs_st_file_t;

/* Open and validate path: header size within the file and at most 100 MB, a
 * JSON object of entries with a known dtype, a shape of at most BS_MAX_DIMS
 * non-negative dims and data_offsets that match the shape's byte size and,
 * together, cover the data section exactly (no overlaps, holes or trailing
 * bytes); "__metadata__" is skipped. */
int bs_st_open(bs_st_file_t **file, const char *path, struct bs_err *err);

/* The same validation over a buffer already in memory (not copied: it must
 * outlive the file object). */
int bs_st_open_memory(bs_st_file_t **file, const void *data, size_t size, struct bs_err *err);

/* Unmap and free; NULL is a no-op. */
void bs_st_close(bs_st_file_t *file);

/* Number of tensors and the name of tensor i (in header order). */
int bs_st_count(const bs_st_file_t *file);
const char *bs_st_name(const bs_st_file_t *file, int i);

/* Find a tensor by name: 0 and a contiguous view of its data, or BS_ENOTFOUND.
 * The view points into the read-only mapping (never write through it) and may
 * be unaligned for its dtype: the format only pads the header to 8 bytes, so
 * callers must not assume alignment (the engine converts weights into its own
 * buffers). */
int bs_st_get(const bs_st_file_t *file, const char *name, struct bs_tensor *out);

/* Value of a "__metadata__" string entry, or NULL. */
const char *bs_st_metadata(const bs_st_file_t *file, const char *key);

/* Write n contiguous tensors with the given names to path, data back to back
 * in the given order after a header padded with spaces to a multiple of 8
 * (atomically: "<path>.tmp.<pid>" renamed into place; BS_EIO on failure). */
int bs_st_write(const char *path, const char *const *names, const struct bs_tensor *tensors,
                int n, struct bs_err *err);

#endif
