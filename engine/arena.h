/* A scratch arena over backend memory: bump allocation, freed all at once.
 * It grows by chaining chunks when a forward needs more than it holds; on
 * reset it folds them into one chunk of the high-water size, so after the
 * largest batch has run once, a forward allocates nothing (STYLE rule 10). */
#ifndef BS_ARENA_H
#define BS_ARENA_H

#include <stddef.h>

#include "backend.h"

struct bs_arena_chunk;

struct bs_arena {
    struct bs_backend *be;
    struct bs_arena_chunk *head; /* current chunk; older ones follow */
    size_t used_total;           /* bytes handed out since the last reset */
    size_t peak;                 /* high-water mark of used_total */
};

/* Start an empty arena allocating from be. */
void bs_arena_init(struct bs_arena *a, struct bs_backend *be);

/* Release every chunk; the arena is empty afterwards. */
void bs_arena_free(struct bs_arena *a);

/* Make one chunk of at least size bytes; only between forwards (nothing allocated). */
int bs_arena_reserve(struct bs_arena *a, size_t size, struct bs_err *err);

/* size bytes aligned to 64, or NULL (with err set) when the backend is out of memory. */
void *bs_arena_alloc(struct bs_arena *a, size_t size, struct bs_err *err);

/* A position to come back to: everything allocated after it is released together. */
struct bs_arena_mark {
    struct bs_arena_chunk *chunk;
    size_t used, used_total;
};

/* The current position. */
struct bs_arena_mark bs_arena_mark(const struct bs_arena *a);

/* Release everything allocated since mark m was taken. */
void bs_arena_release(struct bs_arena *a, struct bs_arena_mark m);

/* Forget every allocation; keeps (and consolidates) the memory. */
void bs_arena_reset(struct bs_arena *a);

/* Bytes the arena holds from the backend. */
size_t bs_arena_capacity(const struct bs_arena *a);

#endif
