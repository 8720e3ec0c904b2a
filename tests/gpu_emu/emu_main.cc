/* Every CUDA kernel of kernels/cuda run on the CPU under emulation
 * (kernels/cuda/emu/cuda_emu.h) against its CPU twin, with the tolerances
 * of tests/gpu/test_gpu_ops.c (emu_common.h); the PTX layer against the
 * definitions of its instructions.
 *
 * usage: test_gpu_emu GROUP [--log FILE] [--expect-failure] [-v]
 *   GROUP: attn_mma_bf16, attn_mma_fp16, attn_f32, softmax_rows, ops, linear, norm, ptx.
 * Prints one line per kernel, "emulated <kernel>: <cases> cases, max err
 * <e> (<share> of tolerance), <what they covered>", also written to FILE; a case out of
 * tolerance prints FAIL and the test exits 1. --expect-failure (the
 * mutant's run, BS_PTX_EMU_MUTANT) stops at the first failing case and
 * exits 0 only if there was one. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "emu_common.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

float frand(float lo, float hi)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return lo + (hi - lo) * (float)((double)(rng_state >> 40) / 16777216.0);
}

void pair_init(pair *p, std::initializer_list<int64_t> ne, float lo, float hi)
{
    p->c = bs_tensor_make(BS_TYPE_F32, (int)ne.size(), ne.begin(), NULL);
    size_t n = bs_tensor_nbytes(&p->c) / sizeof(float);
    p->cbuf.resize(n ? n : 1);
    for (size_t i = 0; i < n; i++)
        p->cbuf[i] = frand(lo, hi);
    p->ebuf = p->cbuf;
    p->e = p->c;
    p->c.data = p->cbuf.data();
    p->e.data = p->ebuf.data();
}

pair pair_cols(const pair &p, int64_t c0, int64_t n)
{
    pair v;
    v.c = bs_tensor_view_cols(&p.c, c0, n);
    v.e = bs_tensor_view_cols(&p.e, c0, n);
    return v;
}

void pair_sync(pair *p)
{
    std::copy(p->cbuf.begin(), p->cbuf.end(), p->ebuf.begin());
}

void check_cpu(int rc, const struct bs_err *err, const char *what)
{
    if (rc != 0) {
        fprintf(stderr, "FAIL %s: the CPU twin failed: %s\n", what, err->msg);
        exit(1);
    }
}

bool expect_value(emu_env *env, tally *t, const char *name, double err, double share)
{
    bool ok = share <= 1.0; /* false for NaN */
    t->cases++;
    t->max_err = isnan(err) || err > t->max_err ? err : t->max_err;
    t->max_share = isnan(share) || share > t->max_share ? share : t->max_share;
    if (!ok) {
        t->failed++;
        env->failures++;
    }
    if (!ok || env->verbose)
        printf("%s %-60s max abs err %.3g (%.2f of tolerance)\n", ok ? "ok  " : "FAIL", name, err,
               share);
    if (!ok && env->stop_at_failure) {
        printf("stopping at the first failure (--expect-failure)\n");
        exit(0);
    }
    return ok;
}

bool expect_close(emu_env *env, tally *t, const char *name, const pair &p, double atol, double rtol,
                  bool rms_scaled)
{
    const std::vector<float> &want = p.cbuf, &got = p.ebuf;
    size_t n = want.size();
    if (rms_scaled) {
        double ss = 0;
        for (size_t i = 0; i < n; i++)
            ss += (double)want[i] * want[i];
        atol *= n ? sqrt(ss / (double)n) : 1.0;
    }
    double worst = 0, max_abs = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        /* d == 0 is within any tolerance (atol and want may both be 0) */
        double r = d == 0 ? 0 : d / (atol + rtol * fabs((double)want[i]));
        if (!(r <= worst)) /* NaN too */
            worst = isnan(r) ? INFINITY : r;
        if (d > max_abs || isnan(d))
            max_abs = d;
    }
    return expect_value(env, t, name, max_abs, worst);
}

void tally_report(emu_env *env, const tally &t)
{
    char line[256];
    snprintf(line, sizeof(line), "emulated %s: %d cases, max err %.3g (%.2f of tolerance)%s%s%s",
             t.kernel.c_str(), t.cases, t.max_err, t.max_share, t.note.empty() ? "" : ", ",
             t.note.c_str(), t.failed ? ", FAILED" : "");
    printf("%s\n", line);
    if (env->log)
        fprintf(env->log, "%s\n", line);
}

int main(int argc, char **argv)
{
    emu_env env = {};
    const char *group = NULL, *log_path = NULL;
    bool expect_failure = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--log") == 0 && i + 1 < argc)
            log_path = argv[++i];
        else if (strcmp(argv[i], "--expect-failure") == 0)
            expect_failure = true;
        else if (strcmp(argv[i], "-v") == 0)
            env.verbose = true;
        else
            group = argv[i];
    }
    if (group == NULL) {
        fprintf(stderr, "usage: test_gpu_emu attn_mma_bf16|attn_mma_fp16|attn_f32|softmax_rows|"
                        "ops|linear|norm|ptx [--log FILE] [--expect-failure] [-v]\n");
        return 2;
    }
    env.stop_at_failure = expect_failure;
    struct bs_err err = {};
    check_cpu(bs_backend_cpu_init(&env.cpu, 1, &err), &err, "cpu backend");
    if (log_path != NULL && (env.log = fopen(log_path, "w")) == NULL) {
        perror(log_path);
        return 2;
    }
    if (strcmp(group, "attn_mma_bf16") == 0)
        run_attn_mma(&env, BS_TYPE_BF16);
    else if (strcmp(group, "attn_mma_fp16") == 0)
        run_attn_mma(&env, BS_TYPE_F16);
    else if (strcmp(group, "attn_f32") == 0)
        run_attn_f32(&env);
    else if (strcmp(group, "softmax_rows") == 0)
        run_softmax_rows(&env);
    else if (strcmp(group, "ops") == 0)
        run_ops(&env);
    else if (strcmp(group, "linear") == 0)
        run_linear(&env);
    else if (strcmp(group, "norm") == 0)
        run_norm(&env);
    else if (strcmp(group, "ptx") == 0)
        run_ptx(&env);
    else {
        fprintf(stderr, "test_gpu_emu: unknown group %s\n", group);
        return 2;
    }
    if (env.log)
        fclose(env.log);
    bs_backend_free(&env.cpu);
    if (expect_failure) {
        printf("FAIL: --expect-failure, but every case passed\n");
        return 1;
    }
    return env.failures ? 1 : 0;
}
