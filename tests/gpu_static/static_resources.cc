/* The CUDA module's kernels against the GPU's per-block and per-SM limits,
 * from ptxas's figures (label gpu_static; ptxas_gate.py compiles the module
 * with its real flags and writes the figures this program reads).
 *
 * usage: gpu_static_resources RECORDS
 * RECORDS: one line per kernel instance and architecture, tab-separated:
 *   arch (sm_80), kernel (demangled, "attn_mma<__nv_bfloat16, 80, 8, false>"),
 *   registers, stack frame, spill stores, spill loads, static shared memory
 *   (bytes), and from the PTX: .maxntid (0: no __launch_bounds__),
 *   .minnctapersm (0: none), .maxnreg (0: none).
 *
 * The launch table below says, for every instance, the block size and the
 * most dynamic shared memory its launcher (attn_cuda.cu, ops_cuda.cu,
 * linear_cuda.cu, norm_cuda.cu) uses
 * and whether the launcher raises cudaFuncAttributeMaxDynamicSharedMemorySize
 * (opt-in), from the kernel headers' own constants (attn_mma's
 * mma_smem<DP, WARPS>::bytes(sizeof(T), mask rows), attn_f32_smem). Every compiled
 * instance must have a row and every row a compiled instance, so a new
 * kernel or instance fails here until it is added.
 *
 * Checked for each instance on each architecture, one line printed per
 * instance, "FAIL: ..." for each violation (exit 1):
 * - no spill stores or loads;
 * - registers at most 255, and at most 65536 / threads, where threads is
 *   the __launch_bounds__ maximum or, without one, the launcher's block
 *   size (which must not exceed the bound);
 * - with a minimum of blocks per SM declared, registers x threads x blocks
 *   at most 65536, and the SM fits that many blocks;
 * - static + dynamic shared memory within the block limit: 48 KiB without
 *   the opt-in, else 163 KiB (sm_80) or 227 KiB (sm_90);
 * - blocks per SM at least 1, from the CUDA toolkit's occupancy calculator
 *   (cuda_occupancy.h, the arithmetic of cudaOccupancyMaxActiveBlocksPerMultiprocessor:
 *   65536 registers per SM in 4 sub-partitions, allocated per warp in units
 *   of 256; 2048 threads and 32 blocks per SM; 164 KiB (sm_80) or 228 KiB
 *   (sm_90) of shared memory per SM, 1 KiB more reserved per block,
 *   allocated in units of 128 bytes).
 * Then the occupancy claims of the comments (occupancy_claims below) are
 * checked against those blocks per SM. First, a self-test feeds the checks
 * made-up figures that break each limit once. */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include <cuda_occupancy.h>

#include "attn_kernels.cuh"
#include "linear_kernels.cuh"
#include "norm_kernels.cuh"
#include "ops_kernels.cuh"

/* ---- what the launchers launch ---------------------------------------------- */

struct launch {
    std::string kernel;
    int threads;
    size_t dyn_smem; /* the most a launch of it uses */
    bool optin;      /* the launcher sets cudaFuncAttributeMaxDynamicSharedMemorySize */
    int dp, warps;   /* attn_mma's template arguments, else 0 */
};

/* An instance for uniform batches and one for ragged ones (launch_mma_w),
 * each with an F32 output and one of T (launch_mma_t). */
template <typename T, int DP, int WARPS>
static void add_mma(std::vector<launch> *l, const char *tname)
{
    using S = mma_smem<DP, WARPS>;
    for (const char *ragged : {"false", "true"})
        for (const char *oname : {"float", tname}) {
            char name[128];
            snprintf(name, sizeof(name), "attn_mma<%s, %d, %d, %s, %s>", tname, DP, WARPS, ragged,
                     oname);
            /* 8 warps only with a mask of one row or none (mma_warps) */
            l->push_back(
                {name, S::THREADS, S::bytes(sizeof(T), WARPS == 4 ? S::BQ : 1), true, DP, WARPS});
        }
}

/* launch_mma in attn_cuda.cu: every padded head dim with 4 warps, those up
 * to 80 with 8 (mma_warps); uniform and ragged. */
template <typename T> static void add_mma_t(std::vector<launch> *l, const char *tname)
{
    add_mma<T, 32, 4>(l, tname);
    add_mma<T, 48, 4>(l, tname);
    add_mma<T, 64, 4>(l, tname);
    add_mma<T, 80, 4>(l, tname);
    add_mma<T, 128, 4>(l, tname);
    add_mma<T, 160, 4>(l, tname);
    add_mma<T, 32, 8>(l, tname);
    add_mma<T, 48, 8>(l, tname);
    add_mma<T, 64, 8>(l, tname);
    add_mma<T, 80, 8>(l, tname);
}

static std::vector<launch> launches(void)
{
    std::vector<launch> l;
    add_mma_t<__nv_bfloat16>(&l, "__nv_bfloat16");
    add_mma_t<__half>(&l, "__half");
    /* activation types (act_type): launch_mma_t's conversion pass from each
     * into each 16-bit type, launch_f32 (head dims up to F32_MAX_D) and the
     * elementwise kernels of ops_cuda.cu on every input and output type */
    static const char *const acts[] = {"float", "__nv_bfloat16", "__half"};
    for (const char *t : {"__nv_bfloat16", "__half"})
        for (const char *s : acts)
            l.push_back({std::string("attn_to16<") + t + ", " + s + ">", ATTN_TO16_THREADS, 0,
                         false, 0, 0});
    for (const char *ti : acts)
        for (const char *to : acts)
            for (const char *ragged : {"false", "true"})
                l.push_back({std::string("attn_f32<") + ti + ", " + to + ", " + ragged + ">",
                             F32_THREADS, attn_f32_smem(F32_MAX_D), true, 0, 0});
    /* unfused_sample: 256 threads a row */
    for (const char *t : {"__nv_bfloat16", "__half", "float"})
        l.push_back({std::string("softmax_rows<") + t + ">", 256, 0, false, 0, 0});
    /* ops_cuda.cu */
    for (const char *k : {"to_half_kernel<__nv_bfloat16>", "to_half_kernel<__half>", "bias_kernel",
                          "gather_rows_kernel"}) /* the last: graph_rows (bs__cuda_gather_rows) */
        l.push_back({k, EW_THREADS, 0, false, 0, 0});
    for (const char *k : {"act_kernel", "glu_kernel", "add_kernel"})
        for (const char *ty : acts)
            for (const char *tx : acts)
                l.push_back(
                    {std::string(k) + "<" + ty + ", " + tx + ">", EW_THREADS, 0, false, 0, 0});
    for (const char *t : acts) /* dim3(TR_TILE, 8) */
        l.push_back({std::string("transpose_kernel<") + t + ">", TR_TILE * 8, 0, false, 0, 0});
    /* norm_cuda.cu: every (x, y) dtype pair, NORM_THREADS a block */
    static const char *const nt[] = {"float", "__nv_bfloat16", "__half"};
    for (const char *tx : nt) {
        l.push_back({std::string("gn_stats_kernel<") + tx + ">", NORM_THREADS, 0, false, 0, 0});
        for (const char *ty : nt)
            for (const char *k : {"ln_kernel", "ln_wide_kernel", "gn_norm_kernel"})
                l.push_back(
                    {std::string(k) + "<" + tx + ", " + ty + ">", NORM_THREADS, 0, false, 0, 0});
    }
    /* linear_cuda.cu */
    for (const char *k :
         {"lin_convert_kernel<__nv_bfloat16, float>", "lin_convert_kernel<__nv_bfloat16, __half>",
          "lin_convert_kernel<__half, float>", "lin_convert_kernel<__half, __nv_bfloat16>",
          "lin_convert_kernel<float, __nv_bfloat16>", "lin_convert_kernel<float, __half>"})
        l.push_back({k, EW_THREADS, 0, false, 0, 0});
    for (const char *t : {"__nv_bfloat16", "__half"})
        l.push_back({std::string("lin_seed_kernel<") + t + ">", EW_THREADS, 0, false, 0, 0});
    return l;
}

/* ---- the architectures ------------------------------------------------------- */

struct arch {
    const char *name;
    cudaOccDeviceProp prop;
};

static cudaOccDeviceProp device_prop(int major, size_t smem_sm, size_t smem_optin, int sms)
{
    cudaOccDeviceProp p;
    p.computeMajor = major;
    p.computeMinor = 0;
    p.maxThreadsPerBlock = 1024;
    p.maxThreadsPerMultiprocessor = 2048;
    p.regsPerBlock = 65536;
    p.regsPerMultiprocessor = 65536;
    p.warpSize = 32;
    p.sharedMemPerBlock = 48 * 1024;
    p.sharedMemPerMultiprocessor = smem_sm;
    p.numSms = sms;
    p.sharedMemPerBlockOptin = smem_optin;
    p.reservedSharedMemPerBlock = 1024;
    return p;
}

/* A100 and H100 (SXM): what cudaGetDeviceProperties reports. */
static const arch archs[] = {
    {"sm_80", device_prop(8, 164 * 1024, 163 * 1024, 108)},
    {"sm_90", device_prop(9, 228 * 1024, 227 * 1024, 132)},
};

/* ---- ptxas's figures ------------------------------------------------------- */

struct record {
    std::string arch, kernel;
    int regs, stack, spill_st, spill_ld, smem, maxntid, minblocks, maxnreg;
    int blocks; /* per SM, computed */
};

static std::vector<record> read_records(const char *path)
{
    std::vector<record> v;
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        perror(path);
        exit(1);
    }
    char line[1024];
    while (fgets(line, sizeof(line), f)) {
        char *fields[10];
        int n = 0;
        for (char *s = strtok(line, "\t\n"); s && n < 10; s = strtok(NULL, "\t\n"))
            fields[n++] = s;
        if (n != 10) {
            fprintf(stderr, "%s: a line without 10 tab-separated fields\n", path);
            exit(1);
        }
        record r = {fields[0], fields[1], 0, 0, 0, 0, 0, 0, 0, 0, 0};
        int *num[] = {&r.regs, &r.stack,   &r.spill_st,  &r.spill_ld,
                      &r.smem, &r.maxntid, &r.minblocks, &r.maxnreg};
        for (int i = 0; i < 8; i++)
            *num[i] = atoi(fields[2 + i]);
        v.push_back(r);
    }
    fclose(f);
    return v;
}

/* ---- the checks ---------------------------------------------------------------- */

static int failures = 0;
static bool quiet = false; /* the self-test's checks print nothing */

static void fail(const record &r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(const record &r, const char *fmt, ...)
{
    failures++;
    if (quiet)
        return;
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL: %s %s: ", r.arch.c_str(), r.kernel.c_str());
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

/* Blocks of `threads` per SM, from the toolkit's calculator; *why names the
 * limiting resource. */
static int blocks_per_sm(const arch &a, const record &r, int threads, size_t dyn, bool optin,
                         const char **why)
{
    cudaOccFuncAttributes fa;
    fa.maxThreadsPerBlock = r.maxntid ? r.maxntid : 1024;
    fa.numRegs = r.regs;
    fa.sharedSizeBytes = (size_t)r.smem;
    fa.shmemLimitConfig = optin ? FUNC_SHMEM_LIMIT_OPTIN : FUNC_SHMEM_LIMIT_DEFAULT;
    fa.maxDynamicSharedSizeBytes = optin ? dyn : 0;
    fa.numBlockBarriers = 1;
    cudaOccDeviceState st;
    cudaOccResult res;
    memset(&res, 0, sizeof(res));
    if (cudaOccMaxActiveBlocksPerMultiprocessor(&res, &a.prop, &fa, &st, threads, dyn) !=
        CUDA_OCC_SUCCESS) {
        *why = "calculator error";
        return 0;
    }
    unsigned f = res.limitingFactors;
    *why = f & OCC_LIMIT_REGISTERS       ? "registers"
           : f & OCC_LIMIT_SHARED_MEMORY ? "shared memory"
           : f & OCC_LIMIT_WARPS         ? "threads"
           : f & OCC_LIMIT_BLOCKS        ? "blocks"
                                         : "-";
    return res.activeBlocksPerMultiprocessor;
}

static void check(record *r, const arch &a, const launch &l)
{
    int bound = r->maxntid ? r->maxntid : l.threads;
    size_t limit = l.optin ? a.prop.sharedMemPerBlockOptin : a.prop.sharedMemPerBlock;
    const char *why = "";
    r->blocks = blocks_per_sm(a, *r, l.threads, l.dyn_smem, l.optin, &why);
    if (!quiet)
        printf(
            "%s %-32s %4d threads %4d regs  spills %d/%d B  stack %d B  smem %d+%zu B (limit %zu)  "
            "%d block%s/SM (%s)\n",
            r->arch.c_str(), r->kernel.c_str(), l.threads, r->regs, r->spill_st, r->spill_ld,
            r->stack, r->smem, l.dyn_smem, limit, r->blocks, r->blocks == 1 ? "" : "s", why);
    if (r->spill_st != 0 || r->spill_ld != 0)
        fail(*r, "spills (%d bytes stored, %d loaded)", r->spill_st, r->spill_ld);
    if (r->maxntid && l.threads > r->maxntid)
        fail(*r, "launched with %d threads, __launch_bounds__ %d", l.threads, r->maxntid);
    if (l.threads > a.prop.maxThreadsPerBlock)
        fail(*r, "%d threads a block", l.threads);
    if (r->regs > 255 || r->regs * bound > a.prop.regsPerBlock)
        fail(*r, "%d registers x %d threads (at most 255 a thread, 65536 a block)", r->regs, bound);
    if (r->maxnreg && r->regs > r->maxnreg)
        fail(*r, "%d registers, .maxnreg %d", r->regs, r->maxnreg);
    if (r->minblocks) {
        const char *w2;
        int fit = blocks_per_sm(a, *r, bound, l.dyn_smem, l.optin, &w2);
        if ((int64_t)r->regs * bound * r->minblocks > a.prop.regsPerMultiprocessor ||
            fit < r->minblocks)
            fail(*r, "declares %d blocks per SM, %d registers x %d threads: %d fit (%s)",
                 r->minblocks, r->regs, bound, fit, w2);
    }
    if ((size_t)r->smem + l.dyn_smem > limit)
        fail(*r, "shared memory %d + %zu bytes, limit %zu%s", r->smem, l.dyn_smem, limit,
             l.optin ? "" : " (the launcher does not opt in)");
    if (r->blocks < 1)
        fail(*r, "no block fits an SM (%s)", why);
}

/* The table's padded head dims with 4 warps are mma_dp's (attn_kernels.cuh). */
static void check_mma_dps(const std::vector<launch> &ls)
{
    std::vector<int> want, have;
    for (int hd = 1; hd <= F32_MAX_D; hd++)
        if (mma_dp(hd) != 0 && (want.empty() || want.back() != mma_dp(hd)))
            want.push_back(mma_dp(hd));
    for (const launch &l : ls)
        if (l.warps == 4 && l.kernel.find("__nv_bfloat16") != std::string::npos &&
            l.kernel.find("false, float>") != std::string::npos)
            have.push_back(l.dp);
    if (want != have) {
        printf("FAIL: mma_dp's padded head dims are not the launch table's 4-warp ones\n");
        failures++;
    }
}

/* ---- occupancy claims ------------------------------------------------------ */

/* Blocks per SM that comments state: attn_kernels.cuh (MMA_SLOTS_8W,
 * mma_warps) and "Fused attention" in kernels/cuda/README.md, at the
 * launcher's largest shared memory (4 warps: a mask row per query): the
 * 4-warp instances at least 2 blocks per SM except DP 128 on sm_80 and
 * DP 160 (1: 90 and 120 KiB of shared memory), the 8-warp ones at least
 * MMA_SLOTS_8W (1: they take 122 to 200 registers; bounding them to 128
 * for 2 blocks spilled). Both element types, uniform and ragged instances,
 * F32 and T outputs. Change them together. */
static const struct {
    int dp, warps;
    const char *arch;
    int min, max;
} occupancy_claims[] = {
    {32, 4, "sm_80", 2, 32},
    {48, 4, "sm_80", 2, 32},
    {64, 4, "sm_80", 2, 32},
    {80, 4, "sm_80", 2, 32},
    {128, 4, "sm_80", 1, 32},
    {160, 4, "sm_80", 1, 32},
    {32, 4, "sm_90", 2, 32},
    {48, 4, "sm_90", 2, 32},
    {64, 4, "sm_90", 2, 32},
    {80, 4, "sm_90", 2, 32},
    {128, 4, "sm_90", 2, 32},
    {160, 4, "sm_90", 1, 32},
    {32, 8, "sm_80", MMA_SLOTS_8W, 32},
    {48, 8, "sm_80", MMA_SLOTS_8W, 32},
    {64, 8, "sm_80", MMA_SLOTS_8W, 32},
    {80, 8, "sm_80", MMA_SLOTS_8W, 32},
    {32, 8, "sm_90", MMA_SLOTS_8W, 32},
    {48, 8, "sm_90", MMA_SLOTS_8W, 32},
    {64, 8, "sm_90", MMA_SLOTS_8W, 32},
    {80, 8, "sm_90", MMA_SLOTS_8W, 32},
};

static void check_claims(const std::vector<record> &recs, const std::vector<launch> &ls)
{
    for (const auto &c : occupancy_claims) {
        std::string got;
        bool ok = true;
        int n = 0;
        for (const record &r : recs)
            for (const launch &l : ls)
                if (l.kernel == r.kernel && l.dp == c.dp && l.warps == c.warps &&
                    r.arch == c.arch) {
                    got += (n ? ", " : "") + r.kernel + " " + std::to_string(r.blocks);
                    ok = ok && r.blocks >= c.min && r.blocks <= c.max;
                    n++;
                }
        ok = ok && n == 8;
        char said[32];
        if (c.min == c.max)
            snprintf(said, sizeof(said), "%d", c.min);
        else
            snprintf(said, sizeof(said), "at least %d", c.min);
        printf("claim attn_mma<T, %d, %d> on %s: %s block%s per SM: %s (%s)\n", c.dp, c.warps,
               c.arch, said, c.max == 1 ? "" : "s", ok ? "ok" : "FAIL", got.c_str());
        if (!ok)
            failures++;
    }
}

/* The checks themselves, on made-up figures: each violation must fail. */
static int self_test(void)
{
    const struct {
        const char *what;
        int regs, spill_st, maxntid, minblocks, threads;
        size_t dyn;
        bool optin;
        bool bad;
    } cases[] = {
        {"within limits", 32, 0, 256, 0, 256, 1024, false, false},
        {"spill stores", 32, 8, 256, 0, 256, 0, false, true},
        {"registers x bound", 200, 0, 512, 0, 256, 0, false, true},
        {"launch above bound", 32, 0, 128, 0, 256, 0, false, true},
        {"shared memory, no opt-in", 32, 0, 128, 0, 128, 48 * 1024 + 1, false, true},
        {"shared memory, opt-in", 32, 0, 128, 0, 128, 163 * 1024 + 1, true, true},
        {"min blocks per SM", 128, 0, 256, 3, 256, 0, false, true},
    };
    int bad = 0;
    quiet = true;
    for (const auto &c : cases) {
        record r = {"sm_80", "k", c.regs, 0, c.spill_st, 0, 0, c.maxntid, c.minblocks, 0, 0};
        launch l = {"k", c.threads, c.dyn, c.optin, 0, 0};
        int before = failures;
        check(&r, archs[0], l);
        if ((failures > before) != c.bad) {
            printf("FAIL: self-test: %s %s\n", c.what, c.bad ? "passed" : "failed");
            bad++;
        }
        failures = before;
    }
    quiet = false;
    printf("self-test: %zu made-up cases, %s\n", sizeof(cases) / sizeof(cases[0]),
           bad ? "FAIL" : "each violation caught");
    return bad;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: gpu_static_resources RECORDS\n");
        return 2;
    }
    if (self_test() != 0)
        return 1;
    std::vector<record> recs = read_records(argv[1]);
    std::vector<launch> ls = launches();
    check_mma_dps(ls);
    printf("arch  kernel  threads  registers  spills (stored/loaded)  stack  shared memory "
           "(static+dynamic, block limit)  blocks per SM (limited by)\n");
    for (const arch &a : archs) {
        for (const launch &l : ls) {
            int n = 0;
            for (record &r : recs)
                if (r.arch == a.name && r.kernel == l.kernel) {
                    check(&r, a, l);
                    n++;
                }
            if (n != 1) {
                printf("FAIL: %s %s: %d instances compiled, the launch table expects 1\n", a.name,
                       l.kernel.c_str(), n);
                failures++;
            }
        }
    }
    for (const record &r : recs) {
        bool known = false;
        for (const launch &l : ls)
            known = known || l.kernel == r.kernel;
        bool arch_known = false;
        for (const arch &a : archs)
            arch_known = arch_known || r.arch == a.name;
        if (!known || !arch_known) {
            printf("FAIL: %s %s: compiled, but %s (tests/gpu_static/static_resources.cc)\n",
                   r.arch.c_str(), r.kernel.c_str(),
                   known ? "the architecture has no limits here" : "the launch table has no row");
            failures++;
        }
    }
    check_claims(recs, ls);
    printf("%zu kernel instances x %zu architectures: %s\n", ls.size(),
           sizeof(archs) / sizeof(archs[0]), failures ? "FAIL" : "within every limit");
    return failures ? 1 : 0;
}
