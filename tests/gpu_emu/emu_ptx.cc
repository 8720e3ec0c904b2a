/* The PTX layer under emulation (ptx_kernels.cuh): random A, B, C in bf16
 * and fp16, D = A B + C through cp.async, every ldmatrix form and the mma,
 * against the product in double; the zero-filled copy with 0, 6 and 16
 * source bytes. Tolerance: 1e-6 (1 + |D|) (the emulated mma rounds once). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <vector>

#include "emu_common.h"
#include "ptx_kernels.cuh"

template <typename T> static void chain_case(emu_env *env, tally *t, const char *type, int trial)
{
    std::vector<T> a(256), at(256), b(128), bt(128);
    std::vector<float> af(256), bf(128), c(128), d(128, NAN);
    for (int m = 0; m < 16; m++)
        for (int k = 0; k < 16; k++) {
            a[m * 16 + k] = at[k * 16 + m] = (T)frand(-2, 2);
            af[m * 16 + k] = (float)a[m * 16 + k];
        }
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < 8; n++) {
            b[k * 8 + n] = bt[n * 16 + k] = (T)frand(-2, 2);
            bf[k * 8 + n] = (float)b[k * 8 + n];
        }
    for (float &x : c)
        x = frand(-4, 4);
    alignas(16) unsigned char tail[16], tail_out[16];
    for (int i = 0; i < 16; i++)
        tail[i] = (unsigned char)(0xa0 + i);
    memset(tail_out, 0x55, sizeof(tail_out));
    static const int tail_bytes[] = {16, 6, 0};
    int mismatches = 0, tb = tail_bytes[trial % 3];
    ptx_chain_args p = {a.data(), at.data(), b.data(), bt.data(), c.data(),
                        d.data(), tail,      tail_out, tb,        &mismatches};
    emu_launch(ptx_chain<T>, dim3(1), dim3(32), 0, p);

    double err = 0, share = 0;
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 8; n++) {
            double want = c[m * 8 + n];
            for (int k = 0; k < 16; k++)
                want += (double)af[m * 16 + k] * bf[k * 8 + n];
            double e = fabs(d[m * 8 + n] - want);
            err = isnan(e) || e > err ? e : err;
            double s = e / (1e-6 * (1 + fabs(want)));
            share = isnan(s) || s > share ? s : share;
        }
    for (int i = 0; i < 16; i++)
        if (tail_out[i] != (i < tb ? tail[i] : 0))
            share = INFINITY;
    if (mismatches != 0)
        share = INFINITY;
    char name[128];
    snprintf(name, sizeof(name), "ptx %s: cp.async (zfill %d), ldmatrix x1/x2/x4 [.trans], mma",
             type, tb);
    expect_value(env, t, name, err, share);
    if (mismatches != 0)
        printf("     %d fragment registers differ between ldmatrix forms\n", mismatches);
}

void run_ptx(emu_env *env)
{
    tally t;
    t.kernel = "ptx_chain";
    t.note = "the PTX layer: mma bf16 and f16, ldmatrix x1/x2/x4 and .trans, cp.async";
    for (int trial = 0; trial < 3; trial++) {
        chain_case<__nv_bfloat16>(env, &t, "bf16", trial);
        chain_case<__half>(env, &t, "f16", trial);
    }
    tally_report(env, t);
}
