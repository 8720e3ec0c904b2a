#include "arena.h"

#include <assert.h>
#include <stdlib.h>

#define ARENA_ALIGN 64
#define ARENA_MIN_CHUNK ((size_t)1 << 20)

struct bs_arena_chunk {
    struct bs_arena_chunk *next;
    char *base; /* backend memory */
    size_t size;
    size_t used;
};

static size_t align_up(size_t n)
{
    return (n + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
}

void bs_arena_init(struct bs_arena *a, struct bs_backend *be)
{
    a->be = be;
    a->head = NULL;
    a->used_total = 0;
    a->peak = 0;
}

static void free_chunks(struct bs_arena *a)
{
    struct bs_arena_chunk *c = a->head;
    while (c != NULL) {
        struct bs_arena_chunk *next = c->next;
        a->be->iface->buf_free(a->be->ctx, c->base);
        free(c);
        c = next;
    }
    a->head = NULL;
}

void bs_arena_free(struct bs_arena *a)
{
    if (a == NULL || a->be == NULL)
        return;
    free_chunks(a);
    a->used_total = 0;
}

static int push_chunk(struct bs_arena *a, size_t size, struct bs_err *err)
{
    struct bs_arena_chunk *c = malloc(sizeof(*c));
    if (c == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of host memory for an arena chunk");
    c->base = a->be->iface->buf_alloc(a->be->ctx, size);
    if (c->base == NULL) {
        free(c);
        return bs_err_set(err, BS_ENOMEM, "%s backend: cannot allocate %zu bytes of scratch",
                          a->be->iface->name, size);
    }
    c->size = size;
    c->used = 0;
    c->next = a->head;
    a->head = c;
    return 0;
}

int bs_arena_reserve(struct bs_arena *a, size_t size, struct bs_err *err)
{
    assert(a->used_total == 0 && "reserve only between forwards");
    size = align_up(size);
    if (a->head != NULL && a->head->next == NULL && a->head->size >= size)
        return 0;
    free_chunks(a);
    if (size > a->peak)
        a->peak = size;
    return push_chunk(a, size < ARENA_MIN_CHUNK ? ARENA_MIN_CHUNK : size, err);
}

void *bs_arena_alloc(struct bs_arena *a, size_t size, struct bs_err *err)
{
    size = align_up(size ? size : 1);
    struct bs_arena_chunk *c = a->head;
    if (c == NULL || c->size - c->used < size) {
        size_t want = size > ARENA_MIN_CHUNK ? size : ARENA_MIN_CHUNK;
        if (c != NULL && want < c->size)
            want = c->size; /* grow geometrically */
        if (push_chunk(a, want, err) != 0)
            return NULL;
        c = a->head;
    }
    void *p = c->base + c->used;
    c->used += size;
    a->used_total += size;
    if (a->used_total > a->peak)
        a->peak = a->used_total;
    return p;
}

struct bs_arena_mark bs_arena_mark(const struct bs_arena *a)
{
    struct bs_arena_mark m = {a->head, a->head ? a->head->used : 0, a->used_total};
    return m;
}

void bs_arena_release(struct bs_arena *a, struct bs_arena_mark m)
{
    /* Chunks pushed after the mark hold only newer allocations. */
    while (a->head != m.chunk) {
        struct bs_arena_chunk *c = a->head;
        a->head = c->next;
        a->be->iface->buf_free(a->be->ctx, c->base);
        free(c);
    }
    if (a->head != NULL)
        a->head->used = m.used;
    a->used_total = m.used_total;
}

void bs_arena_reset(struct bs_arena *a)
{
    a->used_total = 0;
    if (a->head == NULL)
        return;
    if (a->head->next != NULL || a->head->size < a->peak) {
        /* Several chunks, or one smaller than the high-water mark (chunks can
         * be released mid-forward): replace them by one of the high-water
         * size. If that allocation fails, the next forward grows again. */
        size_t peak = a->peak;
        free_chunks(a);
        (void)push_chunk(a, peak, NULL);
        return;
    }
    a->head->used = 0;
}

size_t bs_arena_capacity(const struct bs_arena *a)
{
    size_t n = 0;
    for (const struct bs_arena_chunk *c = a->head; c != NULL; c = c->next)
        n += c->size;
    return n;
}
