/* The system shared memory registry (server/shm.c) over real POSIX shared
 * memory objects: register, status, unregister, acquire and release, a
 * region unregistered while held (its mapping stays readable and writable
 * until the last release; /proc/self/maps shows when it goes), bounds and
 * overflow checks, duplicate names, missing keys, the region limit, binding
 * inputs and writing outputs, errors that leave nothing held. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "codec.h"
#include "shm.h"

static char key_a[64], key_b[64];

/* A shared memory object of size bytes, byte i holding (uint8_t)i. */
static void make_object(const char *key, size_t size)
{
    int fd = shm_open(key, O_RDWR | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, (off_t)size), 0);
    unsigned char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    assert_true(p != MAP_FAILED);
    for (size_t i = 0; i < size; i++)
        p[i] = (unsigned char)i;
    munmap(p, size);
    close(fd);
}

/* Byte at of the object, read through a fresh descriptor. */
static int object_byte(const char *key, off_t at)
{
    int fd = shm_open(key, O_RDONLY, 0);
    unsigned char c = 0;
    assert_true(fd >= 0);
    assert_int_equal(pread(fd, &c, 1, at), 1);
    close(fd);
    return c;
}

/* Whether this process maps the object key now. */
static bool mapped(const char *key)
{
    char line[512], path[80];
    snprintf(path, sizeof(path), "/dev/shm%s\n", key);
    FILE *f = fopen("/proc/self/maps", "r");
    bool found = false;
    assert_non_null(f);
    while (!found && fgets(line, sizeof(line), f) != NULL) {
        size_t n = strlen(line), m = strlen(path);
        found = n >= m && strcmp(line + n - m, path) == 0;
    }
    fclose(f);
    return found;
}

static int setup(void **state)
{
    snprintf(key_a, sizeof(key_a), "/bs_test_shm_a_%d", (int)getpid());
    snprintf(key_b, sizeof(key_b), "/bs_test_shm_b_%d", (int)getpid());
    make_object(key_a, 3 * 4096 + 100);
    make_object(key_b, 256);
    bs_shm_t *shm;
    struct bs_err err = {0};
    assert_int_equal(bs_shm_init(&shm, &err), 0);
    *state = shm;
    return 0;
}

static int teardown(void **state)
{
    bs_shm_free(*state);
    shm_unlink(key_a);
    shm_unlink(key_b);
    return 0;
}

struct seen {
    int n;
    char names[4][32];
    uint64_t offset[4], size[4];
};

static void collect(void *arg, const struct bs_shm_status *st)
{
    struct seen *s = arg;
    assert_true(s->n < 4);
    snprintf(s->names[s->n], sizeof(s->names[0]), "%s", st->name);
    s->offset[s->n] = st->offset;
    s->size[s->n] = st->byte_size;
    s->n++;
}

static void test_register_status_unregister(void **state)
{
    bs_shm_t *shm = *state;
    struct bs_err err = {0};
    assert_int_equal(bs_shm_register(shm, "zeta", key_b, 0, 256, &err), 0);
    assert_int_equal(bs_shm_register(shm, "alpha", key_a, 4097, 100, &err), 0);
    assert_int_equal(bs_shm_count(shm), 2);
    struct seen s = {0};
    assert_int_equal(bs_shm_status(shm, "", collect, &s, &err), 0);
    assert_int_equal(s.n, 2); /* in name order */
    assert_string_equal(s.names[0], "alpha");
    assert_int_equal(s.offset[0], 4097);
    assert_int_equal(s.size[0], 100);
    assert_string_equal(s.names[1], "zeta");
    memset(&s, 0, sizeof(s));
    assert_int_equal(bs_shm_status(shm, "zeta", collect, &s, &err), 0);
    assert_int_equal(s.n, 1);
    assert_int_equal(bs_shm_status(shm, "nope", collect, &s, &err), BS_ENOTFOUND);
    assert_non_null(strstr(err.msg, "'nope' is not registered"));
    /* a region at an offset that is not page-aligned reads the right bytes */
    struct bs_shm_ref ref = {.given = true, .region = "alpha", .offset = 3, .byte_size = 4};
    bs_shm_region_t *r;
    unsigned char *p;
    assert_int_equal(bs_shm_acquire(shm, &ref, &r, (void **)&p, &err), 0);
    assert_int_equal(p[0], (unsigned char)(4097 + 3));
    bs_shm_release(r);
    assert_int_equal(bs_shm_unregister(shm, "nope", &err), 0); /* as Triton: no error */
    assert_int_equal(bs_shm_count(shm), 2);
    assert_int_equal(bs_shm_unregister(shm, "zeta", &err), 0);
    assert_int_equal(bs_shm_count(shm), 1);
    assert_true(mapped(key_a));
    assert_false(mapped(key_b));
    assert_int_equal(bs_shm_unregister(shm, NULL, &err), 0); /* all */
    assert_int_equal(bs_shm_count(shm), 0);
    assert_false(mapped(key_a));
}

static void test_register_errors(void **state)
{
    bs_shm_t *shm = *state;
    struct bs_err err = {0};
    char long_name[BS_SHM_NAME_MAX + 1];
    memset(long_name, 'n', sizeof(long_name) - 1);
    long_name[BS_SHM_NAME_MAX] = '\0';
    assert_int_equal(bs_shm_register(shm, "", key_a, 0, 1, &err), BS_EINVAL);
    assert_int_equal(bs_shm_register(shm, long_name, key_a, 0, 1, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "too long"));
    assert_int_equal(bs_shm_register(shm, "r", "", 0, 1, &err), BS_EINVAL);
    assert_int_equal(bs_shm_register(shm, "r", "/bs_test_shm_missing_key", 0, 1, &err),
                     BS_ENOTFOUND);
    assert_non_null(strstr(err.msg, "cannot be opened"));
    assert_int_equal(bs_shm_register(shm, "r", key_b, 0, 0, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "byte_size is 0"));
    assert_int_equal(bs_shm_register(shm, "r", key_b, 0, 257, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "past its end"));
    assert_int_equal(bs_shm_register(shm, "r", key_b, 200, 57, &err), BS_EINVAL);
    assert_int_equal(bs_shm_register(shm, "r", key_b, UINT64_MAX, 2, &err), BS_EINVAL);
    assert_int_equal(bs_shm_register(shm, "r", key_b, 2, UINT64_MAX, &err), BS_EINVAL);
    assert_int_equal(bs_shm_count(shm), 0);
    assert_false(mapped(key_b)); /* nothing of the failures stays mapped */
    assert_int_equal(bs_shm_register(shm, "r", key_b, 200, 56, &err), 0);
    assert_int_equal(bs_shm_register(shm, "r", key_a, 0, 8, &err), BS_EEXIST);
    assert_non_null(strstr(err.msg, "already registered"));
    assert_int_equal(bs_shm_count(shm), 1);
}

static void test_unregister_while_held(void **state)
{
    bs_shm_t *shm = *state;
    struct bs_err err = {0};
    assert_int_equal(bs_shm_register(shm, "held", key_a, 4096, 4096, &err), 0);
    struct bs_shm_ref ref = {.given = true, .region = "held", .offset = 10, .byte_size = 16};
    bs_shm_region_t *r1, *r2;
    unsigned char *p1, *p2;
    assert_int_equal(bs_shm_acquire(shm, &ref, &r1, (void **)&p1, &err), 0);
    assert_int_equal(bs_shm_acquire(shm, &ref, &r2, (void **)&p2, &err), 0);
    assert_ptr_equal(p1, p2);
    assert_int_equal(bs_shm_unregister(shm, "held", &err), 0);
    /* the name is gone at once: new requests cannot name it, and it is free */
    bs_shm_region_t *r3;
    void *p3;
    assert_int_equal(bs_shm_acquire(shm, &ref, &r3, &p3, &err), BS_ENOTFOUND);
    assert_null(r3);
    assert_int_equal(bs_shm_count(shm), 0);
    assert_int_equal(bs_shm_register(shm, "held", key_b, 0, 16, &err), 0);
    /* the held mapping still reads and writes the old object */
    assert_int_equal(p1[0], (unsigned char)(4096 + 10));
    p1[1] = 0xab;
    assert_int_equal(object_byte(key_a, 4096 + 11), 0xab);
    assert_true(mapped(key_a));
    bs_shm_release(r1);
    assert_true(mapped(key_a)); /* one more hold */
    p1[2] = 0xcd;
    assert_int_equal(object_byte(key_a, 4096 + 12), 0xcd);
    bs_shm_release(NULL); /* a no-op */
    bs_shm_release(r2);   /* the last hold: unmapped */
    assert_false(mapped(key_a));
}

static void test_acquire_bounds(void **state)
{
    bs_shm_t *shm = *state;
    struct bs_err err = {0};
    bs_shm_region_t *r;
    void *p;
    assert_int_equal(bs_shm_register(shm, "b", key_b, 0, 256, &err), 0);
    struct bs_shm_ref ref = {.given = true, .region = "b", .offset = 250, .byte_size = 6};
    assert_int_equal(bs_shm_acquire(shm, &ref, &r, &p, &err), 0);
    bs_shm_release(r);
    ref.byte_size = 7;
    assert_int_equal(bs_shm_acquire(shm, &ref, &r, &p, &err), BS_EINVAL);
    assert_null(r);
    assert_non_null(strstr(err.msg, "past the end of shared memory region 'b' (256 bytes)"));
    ref.offset = UINT64_MAX;
    ref.byte_size = 2;
    assert_int_equal(bs_shm_acquire(shm, &ref, &r, &p, &err), BS_EINVAL);
    ref.offset = 0;
    ref.byte_size = 0; /* an empty range inside the region */
    assert_int_equal(bs_shm_acquire(shm, &ref, &r, &p, &err), 0);
    assert_non_null(p);
    bs_shm_release(r);
    strcpy(ref.region, "c");
    assert_int_equal(bs_shm_acquire(shm, &ref, &r, &p, &err), BS_ENOTFOUND);
    assert_int_equal(bs_shm_unregister(shm, "b", &err), 0);
    assert_false(mapped(key_b)); /* no hold left behind */
}

static void test_bind_inputs(void **state)
{
    bs_shm_t *shm = *state;
    struct bs_err err = {0};
    assert_int_equal(bs_shm_register(shm, "in", key_a, 0, 4096, &err), 0);
    static float msg_data[6] = {1, 2, 3, 4, 5, 6};
    int64_t ne[2] = {2, 3};
    struct bs_named_tensor in[3] = {
        {"a", bs_tensor_make(BS_TYPE_F32, 2, ne, NULL)},
        {"b", bs_tensor_make(BS_TYPE_F32, 2, ne, msg_data)},
        {"c", bs_tensor_make(BS_TYPE_F16, 2, ne, NULL)},
    };
    struct bs_shm_ref refs[3] = {{.given = true, .region = "in", .offset = 64, .byte_size = 24},
                                 {0},
                                 {.given = true, .region = "in", .offset = 128, .byte_size = 12}};
    bs_shm_region_t *holds[3];
    assert_int_equal(bs_shm_bind_inputs(shm, refs, in, 3, holds, &err), 0);
    assert_non_null(holds[0]);
    assert_null(holds[1]);
    assert_non_null(holds[2]);
    assert_int_equal(((unsigned char *)in[0].t.data)[0], 64);
    assert_int_equal(((unsigned char *)in[2].t.data)[0], 128);
    assert_ptr_equal(in[1].t.data, msg_data);
    for (int i = 0; i < 3; i++)
        bs_shm_release(holds[i]);

    /* a size mismatch on the last input: nothing held, nothing bound */
    in[0].t.data = in[2].t.data = NULL;
    refs[2].byte_size = 13;
    assert_int_equal(bs_shm_bind_inputs(shm, refs, in, 3, holds, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "input 'c': shared_memory_byte_size is 13, expected 12"));
    assert_non_null(strstr(err.msg, "FP16 [2, 3]"));
    for (int i = 0; i < 3; i++)
        assert_null(holds[i]);
    assert_null(in[0].t.data);
    /* past the region; then unknown; then misaligned */
    refs[2].byte_size = 12;
    refs[2].offset = 4090;
    assert_int_equal(bs_shm_bind_inputs(shm, refs, in, 3, holds, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "input 'c': shared_memory_offset 4090"));
    refs[2].offset = 128;
    strcpy(refs[2].region, "other");
    assert_int_equal(bs_shm_bind_inputs(shm, refs, in, 3, holds, &err), BS_ENOTFOUND);
    strcpy(refs[2].region, "in");
    refs[0].offset = 66;
    assert_int_equal(bs_shm_bind_inputs(shm, refs, in, 3, holds, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "multiple of 4 bytes"));
    for (int i = 0; i < 3; i++)
        assert_null(holds[i]);
    assert_null(in[0].t.data);
    assert_int_equal(bs_shm_unregister(shm, "in", &err), 0);
    assert_false(mapped(key_a)); /* the failures left no hold */
}

static void test_write_output(void **state)
{
    bs_shm_t *shm = *state;
    struct bs_err err = {0};
    assert_int_equal(bs_shm_register(shm, "out", key_b, 16, 64, &err), 0);
    float vals[6] = {1.5f, -2, 3, 4, 5, 6};
    int64_t ne[2] = {2, 3};
    struct bs_tensor out = bs_tensor_make(BS_TYPE_F32, 2, ne, vals);
    struct bs_shm_ref ref = {.given = true, .region = "out", .offset = 8, .byte_size = 20};
    assert_int_equal(bs_shm_write_output(shm, &ref, &out, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "shared_memory_byte_size is 20 in region 'out'"));
    assert_non_null(strstr(err.msg, "FP32 [2, 3]) needs 24 bytes"));
    for (int i = 0; i < 20; i++) /* nothing written */
        assert_int_equal(object_byte(key_b, 16 + 8 + i), (16 + 8 + i) & 0xff);
    ref.byte_size = 56; /* larger than needed is fine (Triton: "at least") */
    assert_int_equal(bs_shm_write_output(shm, &ref, &out, &err), 0);
    float back;
    int fd = shm_open(key_b, O_RDONLY, 0);
    assert_int_equal(pread(fd, &back, 4, 16 + 8), 4);
    assert_true(back == 1.5f);
    close(fd);
    assert_int_equal(object_byte(key_b, 16 + 8 + 24), (16 + 8 + 24) & 0xff); /* only 24 */
    ref.offset = 48; /* 48 + 56 past the region's 64 */
    assert_int_equal(bs_shm_write_output(shm, &ref, &out, &err), BS_EINVAL);
    assert_non_null(strstr(err.msg, "output 'output': "));
    strcpy(ref.region, "none");
    assert_int_equal(bs_shm_write_output(shm, &ref, &out, &err), BS_ENOTFOUND);
    assert_int_equal(bs_shm_unregister(shm, "", &err), 0);
    assert_false(mapped(key_b));
}

static void test_region_limit(void **state)
{
    bs_shm_t *shm = *state;
    struct bs_err err = {0};
    char name[32];
    for (int i = 0; i < BS_SHM_MAX_REGIONS; i++) {
        snprintf(name, sizeof(name), "r%04d", i);
        assert_int_equal(bs_shm_register(shm, name, key_b, (uint64_t)i % 200, 8, &err), 0);
    }
    assert_int_equal(bs_shm_register(shm, "one_more", key_b, 0, 8, &err), BS_ERANGE);
    assert_non_null(strstr(err.msg, "1024 regions are registered (the limit)"));
    assert_int_equal(bs_shm_unregister(shm, "r0500", &err), 0);
    assert_int_equal(bs_shm_register(shm, "one_more", key_b, 0, 8, &err), 0);
    assert_int_equal(bs_shm_count(shm), BS_SHM_MAX_REGIONS);
    assert_int_equal(bs_shm_unregister(shm, "", &err), 0);
    assert_int_equal(bs_shm_count(shm), 0);
    assert_false(mapped(key_b));
}

/* The registry freed while a range is held: the release unmaps it (ASan's
 * leak checker sees the rest). */
static void test_free_while_held(void **state)
{
    (void)state;
    bs_shm_t *shm;
    struct bs_err err = {0};
    assert_int_equal(bs_shm_init(&shm, &err), 0);
    assert_int_equal(bs_shm_register(shm, "x", key_b, 0, 16, &err), 0);
    struct bs_shm_ref ref = {.given = true, .region = "x", .offset = 0, .byte_size = 16};
    bs_shm_region_t *r;
    unsigned char *p;
    assert_int_equal(bs_shm_acquire(shm, &ref, &r, (void **)&p, &err), 0);
    bs_shm_free(shm);
    assert_int_equal(p[5], 5);
    assert_true(mapped(key_b));
    bs_shm_release(r);
    assert_false(mapped(key_b));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_register_status_unregister, setup, teardown),
        cmocka_unit_test_setup_teardown(test_register_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unregister_while_held, setup, teardown),
        cmocka_unit_test_setup_teardown(test_acquire_bounds, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bind_inputs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_output, setup, teardown),
        cmocka_unit_test_setup_teardown(test_region_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_while_held, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
