/* Tensors (dtypes, conversions, views) and the scratch arena. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "arena.h"
#include "backend.h"
#include "tensor.h"

static void test_dtype_names(void **state)
{
    (void)state;
    enum bs_dtype t;
    for (int i = 0; i < BS_TYPE_COUNT; i++) {
        assert_int_equal(bs_dtype_from_name(bs_dtype_name((enum bs_dtype)i), &t), 0);
        assert_int_equal(t, i);
    }
    assert_int_equal(bs_dtype_from_name("F64", &t), BS_EINVAL);
    assert_int_equal(bs_dtype_size(BS_TYPE_BF16), 2);
    assert_int_equal(bs_dtype_size(BS_TYPE_I64), 8);
    assert_int_equal(bs_dtype_size(BS_TYPE_BOOL), 1);
}

/* Every half converts to float and back to itself (NaNs stay NaN). */
static void test_fp16_roundtrip(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = bs_fp16_to_f32((uint16_t)h);
        uint16_t back = bs_f32_to_fp16(f);
        if (isnan(f))
            assert_true((back & 0x7c00) == 0x7c00 && (back & 0x3ff) != 0);
        else
            assert_int_equal(back, h);
    }
}

static void test_fp16_values(void **state)
{
    (void)state;
    assert_true(bs_fp16_to_f32(0x3c00) == 1.0f);
    assert_true(bs_fp16_to_f32(0xc000) == -2.0f);
    assert_true(bs_fp16_to_f32(0x7bff) == 65504.0f);
    assert_true(bs_fp16_to_f32(0x0001) == ldexpf(1.0f, -24));
    assert_int_equal(bs_f32_to_fp16(65520.0f), 0x7c00);          /* overflow to inf */
    assert_int_equal(bs_f32_to_fp16(1.0f + ldexpf(1.0f, -11)), 0x3c00); /* tie to even */
    assert_int_equal(bs_f32_to_fp16(1.0f + 3 * ldexpf(1.0f, -11)), 0x3c02);
    assert_int_equal(bs_f32_to_fp16(ldexpf(1.0f, -25)), 0x0000); /* tie to even: zero */
    assert_int_equal(bs_f32_to_fp16(ldexpf(1.5f, -25)), 0x0001);
}

static void test_bf16(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = bs_bf16_to_f32((uint16_t)h);
        if (!isnan(f))
            assert_int_equal(bs_f32_to_bf16(f), h);
    }
    assert_int_equal(bs_f32_to_bf16(1.0f), 0x3f80);
    assert_int_equal(bs_f32_to_bf16(1.00390625f), 0x3f80); /* tie to even */
    assert_int_equal(bs_f32_to_bf16(1.01171875f), 0x3f82);
}

static void test_convert(void **state)
{
    (void)state;
    int64_t i64[3] = {-3, 0, 999};
    uint8_t b[3] = {1, 0, 1};
    float f[3];
    assert_int_equal(bs_convert_to_f32(f, i64, BS_TYPE_I64, 3), 0);
    assert_true(f[0] == -3.0f && f[2] == 999.0f);
    assert_int_equal(bs_convert_to_f32(f, b, BS_TYPE_BOOL, 3), 0);
    assert_true(f[0] == 1.0f && f[1] == 0.0f);
    uint16_t h[3];
    float src[3] = {0.5f, -1.25f, 3.0f};
    assert_int_equal(bs_convert_from_f32(h, BS_TYPE_F16, src, 3), 0);
    assert_int_equal(bs_convert_to_f32(f, h, BS_TYPE_F16, 3), 0);
    assert_memory_equal(f, src, sizeof(src));
    assert_int_equal(bs_convert_from_f32(h, BS_TYPE_I64, src, 3), BS_EINVAL);
}

static void test_views(void **state)
{
    (void)state;
    float data[2 * 3 * 12];
    int64_t ne[3] = {2, 3, 12};
    struct bs_tensor t = bs_tensor_make(BS_TYPE_F32, 3, ne, data);
    char buf[64];
    assert_string_equal(bs_tensor_shape_str(&t, buf, sizeof(buf)), "[2, 3, 12]");
    assert_true(bs_tensor_is_contiguous(&t));
    assert_true(bs_tensor_is_rows(&t));
    assert_int_equal(bs_tensor_nrows(&t), 6);
    assert_int_equal(bs_tensor_ld(&t), 12);
    assert_int_equal(bs_tensor_nbytes(&t), sizeof(data));

    struct bs_tensor c = bs_tensor_view_cols(&t, 4, 4);
    assert_ptr_equal(c.data, data + 4);
    assert_false(bs_tensor_is_contiguous(&c));
    assert_true(bs_tensor_is_rows(&c));
    assert_int_equal(bs_tensor_ld(&c), 12);
    assert_int_equal(bs_tensor_nrows(&c), 6);

    struct bs_tensor o = bs_tensor_view_outer(&t, 1, 1);
    assert_ptr_equal(o.data, data + 36);
    assert_int_equal(bs_tensor_nelements(&o), 36);

    /* a transposed view is not a rows layout */
    struct bs_tensor tr = t;
    tr.ne[1] = 12;
    tr.ne[2] = 3;
    tr.nb[1] = 4;
    tr.nb[2] = 48;
    assert_false(bs_tensor_is_rows(&tr));

    struct bs_tensor s = bs_tensor_make(BS_TYPE_I64, 0, NULL, data);
    assert_int_equal(bs_tensor_nelements(&s), 1);
    assert_string_equal(bs_tensor_shape_str(&s, buf, sizeof(buf)), "[]");
}

static void test_arena(void **state)
{
    (void)state;
    struct bs_backend be;
    struct bs_err err;
    struct bs_arena a;
    assert_int_equal(bs_backend_cpu_init(&be, 1, &err), 0);
    bs_arena_init(&a, &be);
    char *p = bs_arena_alloc(&a, 100, &err);
    assert_non_null(p);
    assert_int_equal((uintptr_t)p % 64, 0);
    struct bs_arena_mark m = bs_arena_mark(&a);
    char *q = bs_arena_alloc(&a, 3 << 20, &err); /* does not fit: a second chunk */
    assert_non_null(q);
    memset(q, 1, 3 << 20);
    bs_arena_release(&a, m);
    char *r = bs_arena_alloc(&a, 10, &err);
    assert_ptr_equal(r, p + 128);
    bs_arena_reset(&a);
    /* consolidated to the high-water mark: the same pattern now fits one chunk */
    assert_true(bs_arena_capacity(&a) >= (size_t)(3 << 20) + 128);
    size_t cap = bs_arena_capacity(&a);
    assert_non_null(bs_arena_alloc(&a, 100, &err));
    assert_non_null(bs_arena_alloc(&a, 3 << 20, &err));
    assert_int_equal(bs_arena_capacity(&a), cap);
    bs_arena_reset(&a);
    assert_int_equal(bs_arena_reserve(&a, 8 << 20, &err), 0);
    assert_true(bs_arena_capacity(&a) >= (size_t)(8 << 20));
    bs_arena_free(&a);
    assert_int_equal(bs_arena_capacity(&a), 0);
    bs_backend_free(&be);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtype_names), cmocka_unit_test(test_fp16_roundtrip),
        cmocka_unit_test(test_fp16_values), cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_convert),     cmocka_unit_test(test_views),
        cmocka_unit_test(test_arena),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
