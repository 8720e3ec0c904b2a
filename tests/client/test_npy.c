/* Unit tests for the .npy reader and writer (client/npy.c): files written by
 * NumPy itself (byte strings taken from np.save), round trips, and every
 * rejection path. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "npy.h"

/* np.save of np.arange(6, dtype='<f4').reshape(2, 3) (NumPy 1.24, format 1.0). */
static const char numpy_f4_2x3_hdr[] =
    "\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

/* Build a .npy file: magic, version, header dict padded with spaces and a
 * newline to a multiple of 64 bytes, then data. */
static size_t make_npy(unsigned char *out, int major, const char *dict, const void *data, size_t n)
{
    size_t pre = major == 1 ? 10 : 12, dl = strlen(dict);
    size_t hlen = ((pre + dl + 1 + 63) / 64) * 64 - pre;
    memcpy(out, "\x93NUMPY", 6);
    out[6] = (unsigned char)major;
    out[7] = 0;
    for (size_t i = 0; i < pre - 8; i++)
        out[8 + i] = (unsigned char)(hlen >> (8 * i));
    memcpy(out + pre, dict, dl);
    memset(out + pre + dl, ' ', hlen - dl - 1);
    out[pre + hlen - 1] = '\n';
    memcpy(out + pre + hlen, data, n);
    return pre + hlen + n;
}

static void test_numpy_header_bytes(void **state)
{
    /* The header NumPy writes, byte for byte, padded as np.save pads it. */
    unsigned char buf[256];
    float v[6] = {0, 1, 2, 3, 4, 5};
    size_t n = make_npy(buf, 1, numpy_f4_2x3_hdr + 10, v, sizeof(v));
    assert_int_equal(buf[8], 0x76); /* 118: the same header length as NumPy's */
    struct bs_ctensor t = {0};
    struct bs_err err = {0};
    assert_int_equal(bs_npy_parse(buf, n, &t, &err), 0);
    assert_string_equal(t.datatype, "FP32");
    assert_int_equal(t.n_dims, 2);
    assert_int_equal(t.shape[0], 2);
    assert_int_equal(t.shape[1], 3);
    assert_int_equal(t.nbytes, 24);
    assert_memory_equal(t.data, v, sizeof(v));
    bs_ct_free(&t);
}

static void test_dtypes_and_shapes(void **state)
{
    static const struct {
        const char *dict, *datatype;
        int n_dims;
        int64_t d0;
        size_t bytes;
    } cases[] = {
        {"{'descr': '<f2', 'fortran_order': False, 'shape': (4,), }", "FP16", 1, 4, 8},
        {"{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", "INT64", 1, 3, 24},
        {"{'descr': '|b1', 'fortran_order': False, 'shape': (2, 2), }", "BOOL", 2, 2, 4},
        {"{'descr': '|u1', 'fortran_order': False, 'shape': (5,), }", "UINT8", 1, 5, 5},
        {"{'descr': '<f8', 'fortran_order': False, 'shape': (), }", "FP64", 0, 0, 8},
        {"{\"shape\": (1, 2, 3, 1), \"fortran_order\": False, \"descr\": \"<f4\"}", "FP32", 4, 1,
         24},
        {"{'descr': '<f4', 'fortran_order': True, 'shape': (6,), }", "FP32", 1, 6, 24},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 0, 3), }", "FP32", 3, 2, 0},
    };
    unsigned char data[64] = {1, 2, 3}, buf[256];
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t n = make_npy(buf, i % 2 ? 2 : 1, cases[i].dict, data, cases[i].bytes);
        struct bs_ctensor t = {0};
        struct bs_err err = {0};
        int rc = bs_npy_parse(buf, n, &t, &err);
        if (rc != 0)
            fail_msg("case %zu: %s", i, err.msg);
        assert_string_equal(t.datatype, cases[i].datatype);
        assert_int_equal(t.n_dims, cases[i].n_dims);
        if (t.n_dims > 0)
            assert_int_equal(t.shape[0], cases[i].d0);
        assert_int_equal(t.nbytes, cases[i].bytes);
        assert_memory_equal(t.data, data, cases[i].bytes);
        bs_ct_free(&t);
    }
}

static void expect_reject(const unsigned char *buf, size_t n, const char *needle)
{
    struct bs_ctensor t = {0};
    struct bs_err err = {0};
    assert_int_not_equal(bs_npy_parse(buf, n, &t, &err), 0);
    if (strstr(err.msg, needle) == NULL)
        fail_msg("message \"%s\" lacks \"%s\"", err.msg, needle);
    assert_null(t.data);
}

static void test_rejections(void **state)
{
    static const struct {
        const char *dict;
        size_t bytes;
        const char *needle;
    } cases[] = {
        {"{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24, "Fortran order"},
        {"{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8, "big-endian"},
        {"{'descr': '<U8', 'fortran_order': False, 'shape': (1,), }", 32, "unsupported dtype"},
        {"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", 8, "unsupported dtype"},
        {"{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }", 8, "unsupported dtype"},
        {"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", 4, "structured"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 20, "needs 24"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 28, "needs 24"},
        {"{'descr': '<f4', 'shape': (2,), }", 8, "fortran_order"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, -1), }", 8, "unexpected"},
        {"['<f4']", 8, "not a dict"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999, "
         "99999999999), }",
         8, "too large"},
    };
    unsigned char data[64] = {0}, buf[512];
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t n = make_npy(buf, 1, cases[i].dict, data, cases[i].bytes);
        expect_reject(buf, n, cases[i].needle);
    }
    expect_reject((const unsigned char *)"PK\x03\x04 not npy at all", 20, "not a .npy");
    size_t n = make_npy(buf, 1, cases[0].dict, data, 0);
    buf[6] = 9;
    expect_reject(buf, n, "version 9");
    n = make_npy(buf, 1, cases[0].dict, data, 0);
    expect_reject(buf, 40, "truncated");
}

static void test_round_trip(void **state)
{
    struct bs_ctensor t = {.datatype = "INT64", .n_dims = 3, .shape = {2, 1, 3}};
    struct bs_err err = {0};
    assert_int_equal(bs_ct_alloc(&t, &err), 0);
    for (int i = 0; i < 6; i++)
        ((int64_t *)t.data)[i] = -3 + i * 1000000007LL;
    void *buf;
    size_t len;
    assert_int_equal(bs_npy_serialize(&t, &buf, &len, &err), 0);
    assert_int_equal((10 + ((unsigned char *)buf)[8]) % 64, 0); /* data 64-byte aligned */
    assert_non_null(strstr((char *)buf + 10, "'shape': (2, 1, 3)"));
    struct bs_ctensor u = {0};
    assert_int_equal(bs_npy_parse(buf, len, &u, &err), 0);
    assert_string_equal(u.datatype, "INT64");
    assert_int_equal(u.n_dims, 3);
    assert_int_equal(u.shape[2], 3);
    assert_memory_equal(u.data, t.data, t.nbytes);
    free(buf);
    bs_ct_free(&u);
    /* one dim is written as NumPy writes it, "(5,)" */
    struct bs_ctensor v = {.datatype = "BOOL", .n_dims = 1, .shape = {5}};
    assert_int_equal(bs_ct_alloc(&v, &err), 0);
    assert_int_equal(bs_npy_serialize(&v, &buf, &len, &err), 0);
    assert_non_null(strstr((char *)buf + 10, "'descr': '|b1'"));
    assert_non_null(strstr((char *)buf + 10, "'shape': (5,)"));
    free(buf);
    /* BF16 has no NumPy dtype */
    snprintf(v.datatype, sizeof(v.datatype), "BF16");
    assert_int_not_equal(bs_npy_serialize(&v, &buf, &len, &err), 0);
    assert_non_null(strstr(err.msg, "safetensors"));
    bs_ct_free(&v);
    bs_ct_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_numpy_header_bytes),
        cmocka_unit_test(test_dtypes_and_shapes),
        cmocka_unit_test(test_rejections),
        cmocka_unit_test(test_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
