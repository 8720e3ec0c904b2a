/* System shared memory (Triton's extension): named regions of POSIX shared
 * memory objects (shm_open keys) that a request's inputs are read from and
 * its output is written into, instead of travelling in the message. Every
 * front end shares this one registry (and the control plane's methods
 * register, list and unregister through it).
 *
 * A region stays mapped while any request uses it: unregistering removes
 * its name at once (new requests cannot name it), and the mapping goes when
 * the last request holding it releases it.
 *
 * Thread ownership: loop thread only; the bytes of an acquired range may be
 * read and written by any thread until it is released. */
#ifndef BS_SHM_H
#define BS_SHM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"

#define BS_SHM_NAME_MAX    128  /* region names and keys, NUL included */
#define BS_SHM_MAX_REGIONS 1024 /* registered at once (held-only ones not counted) */

typedef struct bs_shm bs_shm_t;
typedef struct bs_shm_region bs_shm_region_t;

/* Where a tensor lives in shared memory: Triton's parameters
 * shared_memory_region, shared_memory_offset, shared_memory_byte_size. */
struct bs_shm_ref {
    bool given; /* the tensor named a region */
    char region[BS_SHM_NAME_MAX];
    uint64_t offset;
    uint64_t byte_size;
};

/* A registered region as Status lists it. */
struct bs_shm_status {
    const char *name;
    const char *key;
    uint64_t offset;
    uint64_t byte_size;
};

int bs_shm_init(bs_shm_t **shm, struct bs_err *err);

/* Free the registry; regions still held by requests are unmapped when
 * released (NULL is a no-op). */
void bs_shm_free(bs_shm_t *shm);

/* Register name over [offset, offset + byte_size) of the object key: opens
 * and maps it now. BS_EEXIST: the name is taken; BS_ENOTFOUND: no such key;
 * BS_EINVAL: a bad name, key, offset or size (0, or past the object's end);
 * BS_ERANGE: BS_SHM_MAX_REGIONS are registered. */
int bs_shm_register(bs_shm_t *shm, const char *name, const char *key, uint64_t offset,
                    uint64_t byte_size, struct bs_err *err);

/* Unregister name ("" or NULL: every region). A name that is not
 * registered is no error (as in Triton: clients unregister defensively). */
int bs_shm_unregister(bs_shm_t *shm, const char *name, struct bs_err *err);

/* The registered regions in name order (name "" or NULL: all; a name that is
 * not registered: BS_ENOTFOUND). fn is called for each; the strings are
 * valid during the call only. */
int bs_shm_status(const bs_shm_t *shm, const char *name,
                  void (*fn)(void *arg, const struct bs_shm_status *st), void *arg,
                  struct bs_err *err);

/* The bytes ref names, held mapped until bs_shm_release: *ptr points at
 * ref->offset within the region, ref->byte_size long. BS_ENOTFOUND: no such
 * region; BS_EINVAL: offset or size past its end. */
int bs_shm_acquire(bs_shm_t *shm, const struct bs_shm_ref *ref, bs_shm_region_t **region,
                   void **ptr, struct bs_err *err);
void bs_shm_release(bs_shm_region_t *region);

/* For the front ends, after decoding: every input whose refs[i].given is
 * set is bound to its bytes. The ref's byte size must equal the tensor's
 * (its shape and datatype, already decoded) and its data must start at a
 * multiple of the element size; the range is acquired and the tensor's data
 * points at it; holds[i] receives the region to release when the request
 * ends (NULL for inputs that came in the message). Errors name the input;
 * on error nothing stays held and no input is left bound. */
struct bs_named_tensor;
int bs_shm_bind_inputs(bs_shm_t *shm, const struct bs_shm_ref *refs, struct bs_named_tensor *inputs,
                       int n, bs_shm_region_t **holds, struct bs_err *err);

/* Write out (its bytes, contiguous) into the range ref names; BS_EINVAL
 * when the range is smaller than the output ("... needs N bytes"), with
 * nothing written. Looks the region up by name now: a front end that must
 * survive an unregister while the request runs holds the range from decoding
 * on (bs_shm_acquire) and writes with bs_shm_write_held instead. */
struct bs_tensor;
int bs_shm_write_output(bs_shm_t *shm, const struct bs_shm_ref *ref, const struct bs_tensor *out,
                        struct bs_err *err);

/* Write out into ptr, a range of ref->byte_size bytes acquired for ref;
 * the same checks and errors as bs_shm_write_output. */
int bs_shm_write_held(void *ptr, const struct bs_shm_ref *ref, const struct bs_tensor *out,
                      struct bs_err *err);

/* Regions registered now (for tests and the metrics). */
int bs_shm_count(const bs_shm_t *shm);

#endif
