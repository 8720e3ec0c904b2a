/* Server reflection (grpc.reflection.v1 and v1alpha, which share one wire
 * format): an index of the files and symbols of a serialized
 * google.protobuf.FileDescriptorSet, built once, and the answer to one
 * ServerReflectionRequest. Bytes in, bytes out; the transport (rpc.c) runs
 * the streams. Read-only after init, so any thread may answer. */
#ifndef BS_REFLECTION_H
#define BS_REFLECTION_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

typedef struct bs_reflection bs_reflection_t;

/* Index the FileDescriptorSet in set[0..len) (which must outlive the index:
 * answers point into it) and remember the service names list_services
 * reports. Fails with BS_EFORMAT on a malformed set. */
int bs_reflection_init(bs_reflection_t **refl, const uint8_t *set, size_t len,
                       const char *const *services, size_t n_services, struct bs_err *err);

/* Free the index; NULL is a no-op. */
void bs_reflection_free(bs_reflection_t *refl);

/* Answer one serialized ServerReflectionRequest with a serialized
 * ServerReflectionResponse in *out (malloc'd; the caller frees it). Lookups
 * that fail are answered with an error_response (NOT_FOUND), not an error, and
 * so are requests that are malformed, have a NUL byte in a string or a host
 * longer than 255 bytes (INVALID_ARGUMENT); only BS_ENOMEM is returned. */
int bs_reflection_answer(const bs_reflection_t *refl, const uint8_t *req, size_t len, uint8_t **out,
                         size_t *out_len, struct bs_err *err);

/* The index of the file that defines a fully qualified symbol (message,
 * nested message, enum, enum value, field, service, method), or -1. */
int bs_reflection_find_symbol(const bs_reflection_t *refl, const char *symbol);

/* The index of the file called name, or -1. */
int bs_reflection_find_file(const bs_reflection_t *refl, const char *name);

/* Name of file i, and the number of files. */
const char *bs_reflection_file_name(const bs_reflection_t *refl, int i);
int bs_reflection_file_count(const bs_reflection_t *refl);

#endif
