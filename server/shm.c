/* System shared memory (shm.h): a registry of named, mapped ranges of POSIX
 * shared memory objects.
 *
 * A region is reference-counted: the registry holds one reference while the
 * name is registered, every acquired range one more. Unregistering drops the
 * registry's reference (the name is free again at once); the mapping goes
 * with the last reference, so a request that still reads its inputs from a
 * region, or will write its output there, keeps it mapped. The registry
 * itself can be freed while ranges are held: held regions do not point back
 * at it.
 *
 * Register maps [offset, offset + byte_size) of the object, the start
 * rounded down to a page (mmap's rule); the object's size (fstat) bounds it,
 * so a request can never touch bytes past the object's end (SIGBUS).
 *
 * Thread ownership: loop thread only (the counts are plain ints). The bytes
 * of a held range are read by the batcher's workers; nothing here touches
 * them but bs_shm_write_*, on the loop. */
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "codec.h"

struct bs_shm_region {
    char name[BS_SHM_NAME_MAX];
    char key[BS_SHM_NAME_MAX];
    uint64_t offset, byte_size; /* as registered */
    void *map;                  /* the mapping, from the page holding offset */
    size_t map_len;
    unsigned char *data; /* offset's byte within map */
    int refs;            /* the registry's (while registered) + one per hold */
};

struct bs_shm {
    bs_shm_region_t *regions[BS_SHM_MAX_REGIONS]; /* registered, in name order */
    int n;
};

int bs_shm_init(bs_shm_t **shm, struct bs_err *err)
{
    *shm = calloc(1, sizeof(**shm));
    if (*shm == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory for the shared memory registry");
    return 0;
}

static void region_unref(bs_shm_region_t *r)
{
    if (--r->refs > 0)
        return;
    munmap(r->map, r->map_len);
    free(r);
}

void bs_shm_free(bs_shm_t *shm)
{
    if (shm == NULL)
        return;
    for (int i = 0; i < shm->n; i++)
        region_unref(shm->regions[i]);
    free(shm);
}

/* The index of name in the sorted list, or where it would go (*found false). */
static int find(const bs_shm_t *shm, const char *name, bool *found)
{
    int lo = 0, hi = shm->n;
    while (lo < hi) {
        int mid = (lo + hi) / 2, c = strcmp(shm->regions[mid]->name, name);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = false;
    return lo;
}

static int check_name(const char *what, const char *s, struct bs_err *err)
{
    size_t n = s ? strnlen(s, BS_SHM_NAME_MAX) : 0;
    char nb[BS_SHOW_MAX + 4];
    if (n == 0)
        return bs_err_set(err, BS_EINVAL, "shared memory %s is empty", what);
    if (n >= BS_SHM_NAME_MAX)
        return bs_err_set(err, BS_EINVAL, "shared memory %s '%s' is too long (at most %d bytes)",
                          what, bs_show(nb, s), BS_SHM_NAME_MAX - 1);
    return 0;
}

/* Open key and map [offset, offset + byte_size) of it into r. */
static int map_object(bs_shm_region_t *r, struct bs_err *err)
{
    char kb[BS_SHOW_MAX + 4];
    int fd = shm_open(r->key, O_RDWR, 0);
    if (fd < 0) {
        int e = errno;
        return bs_err_set(err, e == ENOENT ? BS_ENOTFOUND : BS_EINVAL,
                          "shared memory key '%s' cannot be opened: %s", bs_show(kb, r->key),
                          strerror(e));
    }
    struct stat st;
    int rc = 0;
    uint64_t end;
    long page = sysconf(_SC_PAGESIZE);
    uint64_t start = r->offset - r->offset % (uint64_t)page;
    if (fstat(fd, &st) != 0) {
        rc = bs_err_set(err, BS_EIO, "shared memory key '%s': fstat: %s", bs_show(kb, r->key),
                        strerror(errno));
    } else if (__builtin_add_overflow(r->offset, r->byte_size, &end) ||
               end > (uint64_t)st.st_size || end - start > SIZE_MAX) {
        rc = bs_err_set(err, BS_EINVAL,
                        "shared memory key '%s' holds %lld bytes: offset %llu + byte_size %llu "
                        "is past its end",
                        bs_show(kb, r->key), (long long)st.st_size, (unsigned long long)r->offset,
                        (unsigned long long)r->byte_size);
    } else {
        r->map_len = (size_t)(end - start);
        r->map = mmap(NULL, r->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)start);
        if (r->map == MAP_FAILED) {
            r->map = NULL;
            rc = bs_err_set(err, BS_EINVAL, "shared memory key '%s' cannot be mapped: %s",
                            bs_show(kb, r->key), strerror(errno));
        } else {
            r->data = (unsigned char *)r->map + (r->offset - start);
        }
    }
    close(fd);
    return rc;
}

int bs_shm_register(bs_shm_t *shm, const char *name, const char *key, uint64_t offset,
                    uint64_t byte_size, struct bs_err *err)
{
    char nb[BS_SHOW_MAX + 4];
    int rc;
    bool found;
    if ((rc = check_name("region name", name, err)) != 0 || (rc = check_name("key", key, err)) != 0)
        return rc;
    if (byte_size == 0)
        return bs_err_set(err, BS_EINVAL, "shared memory region '%s': byte_size is 0",
                          bs_show(nb, name));
    int at = find(shm, name, &found);
    if (found)
        return bs_err_set(err, BS_EEXIST,
                          "shared memory region '%s' is already registered (unregister it first)",
                          bs_show(nb, name));
    if (shm->n >= BS_SHM_MAX_REGIONS)
        return bs_err_set(err, BS_ERANGE,
                          "cannot register shared memory region '%s': %d regions are registered "
                          "(the limit)",
                          bs_show(nb, name), BS_SHM_MAX_REGIONS);
    bs_shm_region_t *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return bs_err_set(err, BS_ENOMEM, "out of memory");
    strcpy(r->name, name); /* lengths checked above */
    strcpy(r->key, key);
    r->offset = offset;
    r->byte_size = byte_size;
    if ((rc = map_object(r, err)) != 0) {
        free(r);
        return rc;
    }
    r->refs = 1;
    memmove(&shm->regions[at + 1], &shm->regions[at], (size_t)(shm->n - at) * sizeof(r));
    shm->regions[at] = r;
    shm->n++;
    return 0;
}

int bs_shm_unregister(bs_shm_t *shm, const char *name, struct bs_err *err)
{
    bool found;
    if (name == NULL || name[0] == '\0') {
        for (int i = 0; i < shm->n; i++)
            region_unref(shm->regions[i]);
        shm->n = 0;
        return 0;
    }
    int at = find(shm, name, &found);
    (void)err;
    if (!found) /* Triton's answer too: nothing to do */
        return 0;
    region_unref(shm->regions[at]);
    memmove(&shm->regions[at], &shm->regions[at + 1],
            (size_t)(shm->n - at - 1) * sizeof(shm->regions[0]));
    shm->n--;
    return 0;
}

int bs_shm_status(const bs_shm_t *shm, const char *name,
                  void (*fn)(void *arg, const struct bs_shm_status *st), void *arg,
                  struct bs_err *err)
{
    int lo = 0, hi = shm->n;
    bool found;
    if (name != NULL && name[0] != '\0') {
        lo = find(shm, name, &found);
        if (!found) {
            char nb[BS_SHOW_MAX + 4];
            return bs_err_set(err, BS_ENOTFOUND, "shared memory region '%s' is not registered",
                              bs_show(nb, name));
        }
        hi = lo + 1;
    }
    for (int i = lo; i < hi; i++) {
        const bs_shm_region_t *r = shm->regions[i];
        struct bs_shm_status st = {r->name, r->key, r->offset, r->byte_size};
        fn(arg, &st);
    }
    return 0;
}

int bs_shm_count(const bs_shm_t *shm)
{
    return shm->n;
}

int bs_shm_acquire(bs_shm_t *shm, const struct bs_shm_ref *ref, bs_shm_region_t **region,
                   void **ptr, struct bs_err *err)
{
    char nb[BS_SHOW_MAX + 4];
    bool found;
    uint64_t end;
    *region = NULL;
    *ptr = NULL;
    int at = find(shm, ref->region, &found);
    if (!found)
        return bs_err_set(err, BS_ENOTFOUND, "shared memory region '%s' is not registered",
                          bs_show(nb, ref->region));
    bs_shm_region_t *r = shm->regions[at];
    if (__builtin_add_overflow(ref->offset, ref->byte_size, &end) || end > r->byte_size)
        return bs_err_set(err, BS_EINVAL,
                          "shared_memory_offset %llu + shared_memory_byte_size %llu is past the "
                          "end of shared memory region '%s' (%llu bytes)",
                          (unsigned long long)ref->offset, (unsigned long long)ref->byte_size,
                          bs_show(nb, ref->region), (unsigned long long)r->byte_size);
    r->refs++;
    *region = r;
    *ptr = r->data + ref->offset;
    return 0;
}

void bs_shm_release(bs_shm_region_t *region)
{
    if (region != NULL)
        region_unref(region);
}

int bs_shm_bind_inputs(bs_shm_t *shm, const struct bs_shm_ref *refs, struct bs_named_tensor *inputs,
                       int n, bs_shm_region_t **holds, struct bs_err *err)
{
    char nb[BS_SHOW_MAX + 4], sb[96];
    int rc = 0, i;
    for (i = 0; i < n; i++)
        holds[i] = NULL;
    for (i = 0; i < n && rc == 0; i++) {
        if (!refs[i].given)
            continue;
        struct bs_tensor *t = &inputs[i].t;
        size_t want = bs_tensor_nbytes(t), align = bs_dtype_size(t->type);
        void *ptr;
        if (refs[i].byte_size != want)
            rc = bs_err_set(
                err, BS_EINVAL, "input '%s': shared_memory_byte_size is %llu, expected %zu (%s %s)",
                bs_show(nb, inputs[i].name), (unsigned long long)refs[i].byte_size, want,
                bs_codec_datatype(t->type), bs_tensor_shape_str(t, sb, sizeof(sb)));
        else if ((rc = bs_shm_acquire(shm, &refs[i], &holds[i], &ptr, err)) != 0)
            bs_err_wrap(err, "input '%s'", bs_show(nb, inputs[i].name));
        else if (((uintptr_t)ptr % align) != 0)
            rc = bs_err_set(err, BS_EINVAL,
                            "input '%s': its data in shared memory region '%s' starts at an "
                            "address that is not a multiple of %zu bytes (its element size; "
                            "align the region's offset plus shared_memory_offset)",
                            bs_show(nb, inputs[i].name), bs_show(sb, refs[i].region), align);
        else
            t->data = ptr;
    }
    if (rc != 0) {
        for (int k = 0; k < i; k++) {
            if (holds[k] != NULL && refs[k].given)
                inputs[k].t.data = NULL;
            bs_shm_release(holds[k]);
            holds[k] = NULL;
        }
    }
    return rc;
}

int bs_shm_write_held(void *ptr, const struct bs_shm_ref *ref, const struct bs_tensor *out,
                      struct bs_err *err)
{
    char nb[BS_SHOW_MAX + 4], sb[96];
    if (!bs_tensor_is_contiguous(out))
        return bs_err_set(err, BS_EINTERNAL, "output: not contiguous");
    size_t need = bs_tensor_nbytes(out);
    if (ref->byte_size < need)
        return bs_err_set(err, BS_EINVAL,
                          "output 'output': shared_memory_byte_size is %llu in region '%s', but "
                          "the output (%s %s) needs %zu bytes",
                          (unsigned long long)ref->byte_size, bs_show(nb, ref->region),
                          bs_codec_datatype(out->type), bs_tensor_shape_str(out, sb, sizeof(sb)),
                          need);
    if (need > 0)
        memcpy(ptr, out->data, need);
    return 0;
}

int bs_shm_write_output(bs_shm_t *shm, const struct bs_shm_ref *ref, const struct bs_tensor *out,
                        struct bs_err *err)
{
    bs_shm_region_t *r;
    void *ptr;
    int rc = bs_shm_acquire(shm, ref, &r, &ptr, err);
    if (rc != 0)
        return bs_err_wrap(err, "output 'output'");
    rc = bs_shm_write_held(ptr, ref, out, err);
    bs_shm_release(r);
    return rc;
}
