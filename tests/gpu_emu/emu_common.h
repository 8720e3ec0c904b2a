/* tests/gpu_emu: what the harness's files share. Tensors come in pairs, the
 * CPU twin's and the emulated kernel's, with the same shape, layout and
 * first contents; a case runs the CPU op on one and the kernel under
 * emulation (emu_launch) on the other, then compares the whole buffers, as
 * tests/gpu/test_gpu_ops.c compares the GPU with the CPU. */
#ifndef BS_GPU_EMU_COMMON_H
#define BS_GPU_EMU_COMMON_H

#include <stdint.h>

#include <initializer_list>
#include <string>
#include <vector>

extern "C" {
#include "backend.h"
}

/* Tolerances of tests/gpu/test_gpu_ops.c, per element:
 * |emulated - cpu| <= atol + rtol |cpu|. */
#define TOL_EW   1e-5 /* ops computed in FP32 in every dtype: atol and rtol */
#define TOL_F32  1e-4 /* attention in fp32 */
#define TOL_BF16 2e-2 /* attention in bf16: rtol, and atol x rms(cpu) */
#define TOL_F16  4e-3 /* attention in fp16 */

/* An upper bound of one ulp of dtype dt at x (0 for F32): narrow results
 * may differ from the reference rounded to dt by that much (the kernel's
 * FP32 value and the CPU's may straddle a rounding boundary). */
static inline double ulp_dt(enum bs_dtype dt, double x)
{
    if (dt == BS_TYPE_BF16)
        return x < 0 ? ulp_dt(dt, -x) : (x * 0x1p-7 > 0x1p-133 ? x * 0x1p-7 : 0x1p-133);
    if (dt == BS_TYPE_F16)
        return x < 0 ? ulp_dt(dt, -x) : (x * 0x1p-10 > 0x1p-24 ? x * 0x1p-10 : 0x1p-24);
    return 0.0;
}

/* One tensor on both sides: c for the CPU twin, e for the kernel. */
struct pair {
    struct bs_tensor c, e;
    std::vector<float> cbuf, ebuf;
};

/* A new F32 tensor pair of shape ne, filled with uniform values in [lo, hi). */
void pair_init(pair *p, std::initializer_list<int64_t> ne, float lo, float hi);

/* Column views [c0, c0 + n) of both sides. */
pair pair_cols(const pair &p, int64_t c0, int64_t n);

/* Copy the CPU side's contents to the emulated side (not for views). */
void pair_sync(pair *p);

/* A uniform value in [lo, hi) (xorshift; the same sequence every run). */
float frand(float lo, float hi);

/* The test's environment: the CPU twin and the per-kernel tallies. */
struct emu_env {
    struct bs_backend cpu;
    bool verbose;
    bool stop_at_failure; /* the mutant's run: the first failure is enough */
    FILE *log;            /* the "emulated ..." lines, for the coverage check */
    int failures;
};

/* Cases of one kernel: how many, and the largest error and share of the
 * tolerance among them. */
struct tally {
    std::string kernel, note; /* note: what the cases covered, for the line */
    int cases = 0, failed = 0;
    double max_err = 0, max_share = 0;
};

/* Compare the whole buffers of p (so that what a view leaves alone must stay
 * equal too) and count the case in t; atol scales with rms(cpu) when
 * rms_scaled. Returns true when within tolerance. */
bool expect_close(emu_env *env, tally *t, const char *name, const pair &p, double atol, double rtol,
                  bool rms_scaled);

/* Count a case whose error was measured by the caller. */
bool expect_value(emu_env *env, tally *t, const char *name, double err, double share);

/* Print (and log) "emulated <kernel>: <cases> cases, max err <e> (<s> of
 * tolerance), <note>". */
void tally_report(emu_env *env, const tally &t);

/* Exit the test with a message when an op of the CPU twin fails. */
void check_cpu(int rc, const struct bs_err *err, const char *what);

/* act_kernel<TY, float> (BS_ACT_NONE) under emulation: rows x cols F32
 * (stride ldx) rounded into y of dtype ty (stride ldy), as the attention
 * entry converts an o of a dtype attn_mma has no instance for. */
void emu_act_convert(void *y, enum bs_dtype ty, int64_t ldy, const float *x, int64_t ldx,
                     int64_t rows, int64_t cols);

/* The groups of cases, one per file; each reports its kernels. */
void run_attn_mma(emu_env *env, enum bs_dtype dtype);
void run_attn_f32(emu_env *env);
void run_softmax_rows(emu_env *env);
void run_ops(emu_env *env);
void run_linear(emu_env *env);
void run_norm(emu_env *env);
void run_ptx(emu_env *env);

#endif
