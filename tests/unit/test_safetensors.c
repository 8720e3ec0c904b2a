/* Unit tests for the safetensors reader and writer (engine/safetensors.c).
 * Every test gets a fresh temporary directory (mkdtemp), removed afterwards. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"

struct fixture {
    char dir[256];
    char path[512]; /* scratch for path_in */
};

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));
    if (fx == NULL)
        return -1;
    const char *tmp = getenv("TMPDIR");
    snprintf(fx->dir, sizeof(fx->dir), "%s/bs_st_test.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(fx->dir) == NULL) {
        free(fx);
        return -1;
    }
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    DIR *d = opendir(fx->dir);
    struct dirent *e;
    char path[600];
    while (d != NULL && (e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof(path), "%s/%s", fx->dir, e->d_name);
        if (unlink(path) != 0)
            rmdir(path);
    }
    if (d != NULL)
        closedir(d);
    rmdir(fx->dir);
    free(fx);
    return 0;
}

static const char *path_in(struct fixture *fx, const char *name)
{
    snprintf(fx->path, sizeof(fx->path), "%s/%s", fx->dir, name);
    return fx->path;
}

/* Number of entries in the fixture directory (no temporaries left behind). */
static int dir_entries(struct fixture *fx)
{
    DIR *d = opendir(fx->dir);
    int n = 0;
    for (struct dirent *e; d != NULL && (e = readdir(d)) != NULL;)
        n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    if (d != NULL)
        closedir(d);
    return n;
}

static void write_bytes(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* A file with header size hdr_size, the header text, then data_len bytes of data. */
static void write_raw(const char *path, uint64_t hdr_size, const char *header, size_t data_len)
{
    size_t hlen = strlen(header), n = 8 + hlen + data_len;
    unsigned char *buf = calloc(1, n);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(hdr_size >> (8 * i));
    memcpy(buf + 8, header, hlen);
    for (size_t i = 0; i < data_len; i++)
        buf[8 + hlen + i] = (unsigned char)i;
    write_bytes(path, buf, n);
    free(buf);
}

static void *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    void *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *size = (size_t)n;
    return buf;
}

static void expect_msg(int rc, int want_rc, const struct bs_err *err, const char *want)
{
    if (rc != want_rc || strstr(err->msg, want) == NULL)
        print_error("rc %d (wanted %d), message \"%s\" (wanted \"%s\")\n", rc, want_rc, err->msg,
                    want);
    assert_int_equal(rc, want_rc);
    assert_int_equal(err->code, want_rc);
    assert_non_null(strstr(err->msg, want));
}

/* ---- round trips ---- */

struct sample {
    const char *name;
    enum bs_dtype type;
    int n_dims;
    int64_t ne[BS_MAX_DIMS];
    const void *data;
    size_t nbytes;
};

static const float f32_data[6] = {1.0f, -2.5f, 3.25f, 0.0f, -0.0f, 1e30f};
static const uint16_t f16_data[4] = {0x3c00, 0xc000, 0x7c00, 0x0001};
static const uint16_t bf16_data[3] = {0x3f80, 0xbf80, 0x7f80};
static const int64_t i64_data[3] = {INT64_MIN, -1, INT64_MAX};
static const uint8_t bool_data[5] = {1, 0, 0, 1, 1};
static const float scalar_data = 42.0f;

static const struct sample samples[] = {
    /* First, so that every later tensor starts unaligned. */
    {"bool.mask", BS_TYPE_BOOL, 1, {5}, bool_data, sizeof(bool_data)},
    {"f32.weight", BS_TYPE_F32, 2, {2, 3}, f32_data, sizeof(f32_data)},
    {"f16", BS_TYPE_F16, 4, {1, 2, 1, 2}, f16_data, sizeof(f16_data)},
    {"bf16 \"quoted\" \\ name\n\x01", BS_TYPE_BF16, 2, {3, 1}, bf16_data, sizeof(bf16_data)},
    {"i64.caf\xc3\xa9", BS_TYPE_I64, 1, {3}, i64_data, sizeof(i64_data)},
    {"scalar", BS_TYPE_F32, 0, {0}, &scalar_data, sizeof(scalar_data)},
    {"empty", BS_TYPE_F32, 2, {0, 3}, NULL, 0},
};

static void check_samples(const bs_st_file_t *st)
{
    size_t n = BS_ARRAY_LEN(samples);
    assert_int_equal(bs_st_count(st), (int)n);
    const char *base = NULL;
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const struct sample *s = &samples[i];
        struct bs_tensor t;
        assert_string_equal(bs_st_name(st, (int)i), s->name); /* header order */
        assert_int_equal(bs_st_get(st, s->name, &t), 0);
        assert_int_equal(t.type, s->type);
        assert_int_equal(t.n_dims, s->n_dims);
        for (int d = 0; d < s->n_dims; d++)
            assert_int_equal(t.ne[d], s->ne[d]);
        assert_true(bs_tensor_is_contiguous(&t));
        assert_int_equal(bs_tensor_nbytes(&t), s->nbytes);
        if (s->nbytes > 0)
            assert_memory_equal(t.data, s->data, s->nbytes);
        /* Data back to back in the given order. */
        if (i == 0)
            base = t.data;
        assert_ptr_equal(t.data, base + off);
        off += s->nbytes;
    }
    assert_null(bs_st_name(st, (int)n));
    assert_null(bs_st_name(st, -1));
    struct bs_tensor t;
    assert_int_equal(bs_st_get(st, "missing", &t), BS_ENOTFOUND);
    assert_int_equal(bs_st_get(st, "f32", &t), BS_ENOTFOUND);
    assert_null(bs_st_metadata(st, "format"));
}

static void write_samples(const char *path)
{
    size_t n = BS_ARRAY_LEN(samples);
    const char *names[BS_ARRAY_LEN(samples)];
    struct bs_tensor tensors[BS_ARRAY_LEN(samples)];
    for (size_t i = 0; i < n; i++) {
        names[i] = samples[i].name;
        tensors[i] = bs_tensor_make(samples[i].type, samples[i].n_dims, samples[i].ne,
                                    (void *)samples[i].data);
    }
    struct bs_err err = {0};
    int rc = bs_st_write(path, names, tensors, (int)n, &err);
    if (rc != 0)
        print_error("%s\n", err.msg);
    assert_int_equal(rc, 0);
}

static void test_round_trip(void **state)
{
    struct fixture *fx = *state;
    const char *path = path_in(fx, "model.safetensors");
    write_samples(path);
    assert_int_equal(dir_entries(fx), 1); /* the temporary was renamed away */

    bs_st_file_t *st = NULL;
    struct bs_err err = {0};
    int rc = bs_st_open(&st, path, &err);
    if (rc != 0)
        print_error("%s\n", err.msg);
    assert_int_equal(rc, 0);
    check_samples(st);
    bs_st_close(st);

    /* The same bytes from memory; the header is padded to 8 with spaces. */
    size_t size;
    unsigned char *buf = read_file(path, &size);
    uint64_t hdr = 0;
    for (int i = 7; i >= 0; i--)
        hdr = hdr << 8 | buf[i];
    assert_int_equal(hdr % 8, 0);
    assert_int_equal(buf[8], '{');
    size_t total = 0;
    for (size_t i = 0; i < BS_ARRAY_LEN(samples); i++)
        total += samples[i].nbytes;
    assert_int_equal(size, 8 + hdr + total);
    assert_int_equal(bs_st_open_memory(&st, buf, size, &err), 0);
    check_samples(st);
    bs_st_close(st);
    free(buf);
}

static void test_overwrite_and_empty(void **state)
{
    struct fixture *fx = *state;
    char path[600];
    snprintf(path, sizeof(path), "%s", path_in(fx, "x.safetensors"));
    write_samples(path);
    /* Zero tensors: replaces the file, header "{}" padded to 8 bytes. */
    struct bs_err err = {0};
    assert_int_equal(bs_st_write(path, NULL, NULL, 0, &err), 0);
    size_t size;
    char *buf = read_file(path, &size);
    assert_int_equal(size, 16);
    assert_memory_equal(buf, "\x08\0\0\0\0\0\0\0{}      ", 16);
    free(buf);
    bs_st_file_t *st = NULL;
    assert_int_equal(bs_st_open(&st, path, &err), 0);
    assert_int_equal(bs_st_count(st), 0);
    struct bs_tensor t;
    assert_int_equal(bs_st_get(st, "x", &t), BS_ENOTFOUND);
    bs_st_close(st);
    assert_int_equal(dir_entries(fx), 1);
}

static void test_metadata(void **state)
{
    struct fixture *fx = *state;
    const char *path = path_in(fx, "meta.safetensors");
    const char *header = "{\"__metadata__\": {\"format\": \"pt\", \"note\": \"a\\u00e9\"}, "
                         "\"w\": {\"dtype\": \"F16\", \"shape\": [2], \"data_offsets\": [0, 4]}}";
    write_raw(path, strlen(header), header, 4);
    bs_st_file_t *st = NULL;
    struct bs_err err = {0};
    assert_int_equal(bs_st_open(&st, path, &err), 0);
    assert_int_equal(bs_st_count(st), 1);
    assert_string_equal(bs_st_name(st, 0), "w");
    assert_string_equal(bs_st_metadata(st, "format"), "pt");
    assert_string_equal(bs_st_metadata(st, "note"), "a\xc3\xa9");
    assert_null(bs_st_metadata(st, "missing"));
    struct bs_tensor t;
    assert_int_equal(bs_st_get(st, "__metadata__", &t), BS_ENOTFOUND);
    assert_int_equal(bs_st_get(st, "w", &t), 0);
    assert_memory_equal(t.data, "\x00\x01\x02\x03", 4);
    bs_st_close(st);

    /* Empty metadata, extra keys in an entry, trailing padding: all fine. */
    header = "{\"__metadata__\":{},\"w\":{\"dtype\":\"BOOL\",\"shape\":[],\"data_offsets\":[1,2],"
             "\"extra\":[1]},\"v\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[0,1]}}   ";
    write_raw(path, strlen(header), header, 2);
    assert_int_equal(bs_st_open(&st, path, &err), 0);
    assert_null(bs_st_metadata(st, "format"));
    assert_int_equal(bs_st_get(st, "w", &t), 0);
    assert_int_equal(t.n_dims, 0);
    assert_int_equal(*(const uint8_t *)t.data, 1);
    bs_st_close(st);
}

/* ---- malformed files ---- */

struct bad_case {
    const char *header;
    size_t data_len;
    int rc;
    const char *want;
};

#define ENTRY(dtype, shape, offsets) \
    "{\"x\": {\"dtype\": " dtype ", \"shape\": " shape ", \"data_offsets\": " offsets "}}"

static const struct bad_case bad_headers[] = {
    {"", 0, BS_EFORMAT, "header: byte 0: expected a value"},
    {"{\"x\": ", 0, BS_EFORMAT, "header: byte 6: expected a value"},
    {"not json", 0, BS_EFORMAT, "header: byte 0"},
    {"{\"x\": {}}  x", 0, BS_EFORMAT, "header: byte 11: expected end of input"},
    {"[1, 2]", 0, BS_EFORMAT, "header must be a JSON object, found an array"},
    {"\"str\"", 0, BS_EFORMAT, "header must be a JSON object, found a string"},
    {"{\"x\": 1}", 0, BS_EFORMAT, "tensor 'x': expected an object, found a number"},
    {"{\"x\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, BS_EFORMAT,
     "tensor 'x': missing \"dtype\""},
    {ENTRY("4", "[1]", "[0, 4]"), 4, BS_EFORMAT,
     "tensor 'x': \"dtype\" must be a string, found a number"},
    {ENTRY("\"F64\"", "[1]", "[0, 8]"), 8, BS_EFORMAT, "unsupported dtype 'F64' for tensor 'x'"},
    {ENTRY("\"I32\"", "[1]", "[0, 4]"), 4, BS_EFORMAT, "unsupported dtype 'I32' for tensor 'x'"},
    {ENTRY("\"U8\"", "[1]", "[0, 1]"), 1, BS_EFORMAT, "unsupported dtype 'U8' for tensor 'x'"},
    {ENTRY("\"f32\"", "[1]", "[0, 4]"), 4, BS_EFORMAT, "unsupported dtype 'f32'"},
    {"{\"x\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4, BS_EFORMAT,
     "tensor 'x': missing \"shape\""},
    {ENTRY("\"F32\"", "3", "[0, 12]"), 12, BS_EFORMAT,
     "tensor 'x': \"shape\" must be an array, found a number"},
    {ENTRY("\"F32\"", "[1, 1, 1, 1, 1]", "[0, 4]"), 4, BS_EFORMAT,
     "tensor 'x': shape has 5 dims, at most 4 supported"},
    {ENTRY("\"F32\"", "[2, -3]", "[0, 4]"), 4, BS_EFORMAT,
     "tensor 'x': shape[1] must be a non-negative integer, found -3"},
    {ENTRY("\"F32\"", "[1.5]", "[0, 4]"), 4, BS_EFORMAT,
     "tensor 'x': shape[0] must be a non-negative integer, found 1.5"},
    {ENTRY("\"F32\"", "[\"2\"]", "[0, 8]"), 8, BS_EFORMAT,
     "tensor 'x': shape[0] must be a non-negative integer, found a string"},
    {ENTRY("\"F32\"", "[4611686018427387904, 4]", "[0, 0]"), 0, BS_EFORMAT,
     "tensor 'x': shape is too large"},
    {ENTRY("\"I64\"", "[4611686018427387904]", "[0, 0]"), 0, BS_EFORMAT,
     "tensor 'x': shape is too large"},
    {"{\"x\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, BS_EFORMAT,
     "tensor 'x': missing \"data_offsets\""},
    {ENTRY("\"F32\"", "[1]", "[0]"), 4, BS_EFORMAT,
     "tensor 'x': \"data_offsets\" must be [begin, end]"},
    {ENTRY("\"F32\"", "[1]", "[0, 4, 8]"), 8, BS_EFORMAT,
     "tensor 'x': \"data_offsets\" must be [begin, end]"},
    {ENTRY("\"F32\"", "[1]", "[-4, 0]"), 4, BS_EFORMAT,
     "tensor 'x': \"data_offsets\" must be [begin, end] with two non-negative integers"},
    {ENTRY("\"F32\"", "[1]", "[0, 4]"), 3, BS_EFORMAT,
     "tensor 'x': data_offsets end 4 is past the end of the data section (3 bytes)"},
    {ENTRY("\"F32\"", "[0]", "[9, 9]"), 8, BS_EFORMAT, "tensor 'x': data_offsets end 9 is past"},
    {ENTRY("\"F32\"", "[2, 3]", "[0, 8]"), 24, BS_EFORMAT,
     "tensor 'x': data_offsets span 8 bytes but its shape and dtype need 24"},
    {ENTRY("\"BF16\"", "[]", "[0, 4]"), 4, BS_EFORMAT,
     "tensor 'x': data_offsets span 4 bytes but its shape and dtype need 2"},
    {ENTRY("\"F32\"", "[1]", "[8, 4]"), 8, BS_EFORMAT,
     "tensor 'x': data_offsets begin 8 > end 4"},
    {"{\"x\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, "
     "\"y\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}, "
     "\"x\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
     8, BS_EFORMAT, "duplicate tensor name 'x'"},
    {"{\"__metadata__\": {\"a\": \"b\", \"k\": 1}}", 0, BS_EFORMAT,
     "\"__metadata__\": value of 'k' must be a string, found a number"},
    {"{\"__metadata__\": {\"k\": {\"nested\": \"v\"}}}", 0, BS_EFORMAT,
     "value of 'k' must be a string, found an object"},
    {"{\"__metadata__\": [\"a\"]}", 0, BS_EFORMAT,
     "\"__metadata__\" must be an object, found an array"},
    {"{\"__metadata__\": {}, \"__metadata__\": {}}", 0, BS_EFORMAT, "duplicate \"__metadata__\""},
};

/* Every case, written to file in fx's folder, is refused with its code and
 * message; the message names the file, and opening the same bytes from
 * memory gives the same message without it. */
static void expect_refused(struct fixture *fx, const char *file, const struct bad_case *cases,
                           size_t n)
{
    char path[600];
    snprintf(path, sizeof(path), "%s", path_in(fx, file));
    for (size_t i = 0; i < n; i++) {
        const struct bad_case *c = &cases[i];
        write_raw(path, strlen(c->header), c->header, c->data_len);
        bs_st_file_t *st = (bs_st_file_t *)&st;
        struct bs_err err = {0};
        int rc = bs_st_open(&st, path, &err);
        if (rc == 0)
            print_error("case %zu (%s) was accepted\n", i, c->header);
        expect_msg(rc, c->rc, &err, c->want);
        assert_null(st);
        assert_memory_equal(err.msg, path, strlen(path));
        size_t size;
        void *buf = read_file(path, &size);
        struct bs_err err2 = {0};
        rc = bs_st_open_memory(&st, buf, size, &err2);
        expect_msg(rc, c->rc, &err2, c->want);
        assert_string_equal(err.msg + strlen(path) + 2, err2.msg);
        free(buf);
    }
}

static void test_bad_headers(void **state)
{
    expect_refused(*state, "bad.safetensors", bad_headers, BS_ARRAY_LEN(bad_headers));
}

/* ---- the layout of the data section ---- */

#define T(name, shape, begin, end)                                                                 \
    "\"" name "\": {\"dtype\": \"F32\", \"shape\": " shape ", \"data_offsets\": [" begin ", " end "]}"

static const struct bad_case bad_layouts[] = {
    {"{" T("a", "[2]", "0", "8") ", " T("b", "[2]", "4", "12") "}", 12, BS_EFORMAT,
     "tensors 'a' (data_offsets [0, 8]) and 'b' (data_offsets [4, 12]) overlap"},
    {"{" T("b", "[2]", "4", "12") ", " T("a", "[3]", "0", "12") "}", 12, BS_EFORMAT,
     "tensors 'a' (data_offsets [0, 12]) and 'b' (data_offsets [4, 12]) overlap"},
    {"{" T("a", "[2]", "0", "8") ", " T("b", "[2]", "0", "8") "}", 8, BS_EFORMAT,
     "tensors 'a' (data_offsets [0, 8]) and 'b' (data_offsets [0, 8]) overlap"},
    {"{" T("a", "[2]", "0", "8") ", " T("z", "[0]", "4", "4") "}", 8, BS_EFORMAT,
     "tensors 'a' (data_offsets [0, 8]) and 'z' (data_offsets [4, 4]) overlap"},
    {"{" T("a", "[2]", "0", "8") ", " T("b", "[1]", "12", "16") "}", 16, BS_EFORMAT,
     "no tensor covers bytes [8, 12) of the data section (a hole between 'a' and 'b'); "
     "the tensors' data_offsets must cover all of it"},
    {"{" T("b", "[1]", "4", "8") "}", 8, BS_EFORMAT,
     "no tensor covers bytes [0, 4) of the data section (a hole before 'b', the first tensor)"},
    {"{" T("a", "[2]", "0", "8") "}", 11, BS_EFORMAT,
     "no tensor covers bytes [8, 11) of the data section (trailing bytes after 'a', the last "
     "tensor)"},
    {"{}", 3, BS_EFORMAT,
     "no tensor covers bytes [0, 3) of the data section (trailing bytes: the header lists no "
     "tensors)"},
    {"{" T("a", "[0]", "0", "0") "}", 4, BS_EFORMAT, "no tensor covers bytes [0, 4)"},
    {"{" T("a", "[2]", "0", "8") ", " T("b", "[2]", "8", "16") ", " T("c", "[2]", "4", "12") "}",
     16, BS_EFORMAT, "tensors 'a' (data_offsets [0, 8]) and 'c' (data_offsets [4, 12]) overlap"},
};

static void test_bad_layouts(void **state)
{
    expect_refused(*state, "layout.safetensors", bad_layouts, BS_ARRAY_LEN(bad_layouts));
}

/* Out of header order, zero-size tensors at the start, between two others
 * and at the end, and a file of only zero-size tensors: all cover the data. */
static void test_good_layouts(void **state)
{
    struct fixture *fx = *state;
    static const struct {
        const char *header;
        size_t data_len;
        int n;
    } cases[] = {
        {"{" T("b", "[1]", "8", "12") ", " T("a", "[2]", "0", "8") "}", 12, 2},
        {"{" T("z0", "[0]", "0", "0") ", " T("a", "[2]", "0", "8") ", " T("z1", "[2, 0]", "8", "8")
         ", " T("b", "[1]", "8", "12") ", " T("z2", "[0]", "12", "12") "}", 12, 5},
        {"{" T("z", "[0]", "0", "0") ", " T("y", "[0, 4]", "0", "0") "}", 0, 2},
        {"{\"__metadata__\": {\"format\": \"pt\"}}", 0, 0},
    };
    char path[600];
    snprintf(path, sizeof(path), "%s", path_in(fx, "good.safetensors"));
    for (size_t i = 0; i < BS_ARRAY_LEN(cases); i++) {
        write_raw(path, strlen(cases[i].header), cases[i].header, cases[i].data_len);
        bs_st_file_t *st = NULL;
        struct bs_err err = {0};
        int rc = bs_st_open(&st, path, &err);
        if (rc != 0)
            print_error("case %zu: %s\n", i, err.msg);
        assert_int_equal(rc, 0);
        assert_int_equal(bs_st_count(st), cases[i].n);
        bs_st_close(st);
    }
    /* The writer lays tensors out back to back, zero-size ones included. */
    const struct bs_tensor t[3] = {
        bs_tensor_make(BS_TYPE_F32, 1, (int64_t[]){2}, (void *)f32_data),
        bs_tensor_make(BS_TYPE_F32, 1, (int64_t[]){0}, NULL),
        bs_tensor_make(BS_TYPE_I64, 1, (int64_t[]){1}, (void *)i64_data),
    };
    const char *names[3] = {"w", "empty", "i"};
    struct bs_err err = {0};
    assert_int_equal(bs_st_write(path, names, t, 3, &err), 0);
    bs_st_file_t *st = NULL;
    assert_int_equal(bs_st_open(&st, path, &err), 0);
    bs_st_close(st);
}

#undef T

static void test_bad_sizes(void **state)
{
    struct fixture *fx = *state;
    char path[600];
    snprintf(path, sizeof(path), "%s", path_in(fx, "short.safetensors"));
    bs_st_file_t *st = NULL;
    struct bs_err err = {0};

    write_bytes(path, "", 0);
    expect_msg(bs_st_open(&st, path, &err), BS_EFORMAT, &err, "file is 0 bytes, too short");
    write_bytes(path, "\x02\0\0\0\0\0\0", 7);
    expect_msg(bs_st_open(&st, path, &err), BS_EFORMAT, &err, "file is 7 bytes, too short");
    expect_msg(bs_st_open_memory(&st, "\x02\0\0\0\0\0\0", 7, &err), BS_EFORMAT, &err,
               "file is 7 bytes, too short");
    expect_msg(bs_st_open_memory(&st, NULL, 0, &err), BS_EFORMAT, &err, "too short");

    write_raw(path, 100, "{}", 0);
    expect_msg(bs_st_open(&st, path, &err), BS_EFORMAT, &err,
               "header size 100 is larger than the 2 bytes that follow it");
    write_raw(path, UINT64_MAX, "{}", 0);
    expect_msg(bs_st_open(&st, path, &err), BS_ERANGE, &err,
               "header size 18446744073709551615 exceeds the limit of 100000000 bytes");
    write_raw(path, 100000001, "{}", 0);
    expect_msg(bs_st_open(&st, path, &err), BS_ERANGE, &err, "exceeds the limit");
    assert_null(st);

    /* A header size of 0 leaves an empty header, which is not JSON. */
    write_raw(path, 0, "", 8);
    expect_msg(bs_st_open(&st, path, &err), BS_EFORMAT, &err, "header: byte 0");
}

static void test_open_errors(void **state)
{
    struct fixture *fx = *state;
    bs_st_file_t *st = (bs_st_file_t *)&st;
    struct bs_err err = {0};
    expect_msg(bs_st_open(&st, path_in(fx, "nonexistent.safetensors"), &err), BS_EIO, &err,
               "nonexistent.safetensors: cannot open: No such file or directory");
    assert_null(st);
    expect_msg(bs_st_open(&st, fx->dir, &err), BS_EIO, &err, "not a regular file");
    assert_int_equal(bs_st_open(&st, path_in(fx, "nope"), NULL), BS_EIO);

    bs_st_close(NULL);
    assert_int_equal(bs_st_count(NULL), 0);
    assert_null(bs_st_name(NULL, 0));
    assert_null(bs_st_metadata(NULL, "k"));
}

/* ---- writer errors ---- */

static void test_write_errors(void **state)
{
    struct fixture *fx = *state;
    float data[4] = {0};
    int64_t ne[2] = {2, 2};
    struct bs_tensor t[2] = {bs_tensor_make(BS_TYPE_F32, 2, ne, data),
                             bs_tensor_make(BS_TYPE_F32, 1, ne, data)};
    struct bs_err err = {0};
    char path[600];
    snprintf(path, sizeof(path), "%s", path_in(fx, "out.safetensors"));

    const char *dup[2] = {"a", "a"};
    expect_msg(bs_st_write(path, dup, t, 2, &err), BS_EINVAL, &err, "duplicate tensor name 'a'");
    const char *meta[1] = {"__metadata__"};
    expect_msg(bs_st_write(path, meta, t, 1, &err), BS_EINVAL, &err, "reserved");
    const char *bad_utf8[1] = {"\xff"};
    expect_msg(bs_st_write(path, bad_utf8, t, 1, &err), BS_EINVAL, &err, "invalid UTF-8");
    const char *null_name[1] = {NULL};
    expect_msg(bs_st_write(path, null_name, t, 1, &err), BS_EINVAL, &err, "tensor 0 has no name");

    const char *one[1] = {"w"};
    struct bs_tensor tr = t[0]; /* a transposed view is not contiguous */
    tr.nb[0] = 4;
    tr.nb[1] = 8;
    expect_msg(bs_st_write(path, one, &tr, 1, &err), BS_EINVAL, &err, "tensor 'w': not contiguous");
    struct bs_tensor nodata = t[0];
    nodata.data = NULL;
    expect_msg(bs_st_write(path, one, &nodata, 1, &err), BS_EINVAL, &err, "tensor 'w': no data");
    struct bs_tensor neg = t[0];
    neg.ne[1] = -1;
    expect_msg(bs_st_write(path, one, &neg, 1, &err), BS_EINVAL, &err, "bad dim 1");
    expect_msg(bs_st_write(path, one, t, -1, &err), BS_EINVAL, &err, "bad tensor list");
    assert_int_equal(dir_entries(fx), 0);

    /* I/O failures: a missing directory, and a rename onto a directory. */
    expect_msg(bs_st_write(path_in(fx, "missing/out.safetensors"), one, t, 1, &err), BS_EIO, &err,
               "cannot create");
    assert_int_equal(mkdir(path, 0755), 0);
    expect_msg(bs_st_write(path, one, t, 1, &err), BS_EIO, &err, "cannot write: Is a directory");
    assert_memory_equal(err.msg, path, strlen(path));
    assert_int_equal(dir_entries(fx), 1); /* the temporary was removed */
    assert_int_equal(rmdir(path), 0);

    assert_int_equal(bs_st_write(path, one, t, 1, NULL), 0);
    assert_int_equal(bs_st_write(path, dup, t, 2, NULL), BS_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_overwrite_and_empty, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metadata, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_headers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_layouts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_good_layouts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_sizes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_open_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_errors, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
