/* The attention kernels under emulation against the CPU backend's attention
 * (F32): attn_mma in bf16 and fp16, attn_f32, and softmax_rows (the unfused
 * baseline's, with its two GEMMs done here on the host as cuBLAS would).
 *
 * Shapes reach every template instance and tail: each padded head dim of
 * attn_mma (32, 48, 64, 80, 128, 160) with 4 warps and those up to 80 with 8
 * (the launcher takes 8 from 2048 queries; the kernel does not care, so the
 * harness launches both directly), attn_f32 up to 512; Lq and Lk of 0, 1,
 * 77, 130 and a tile plus one (65: 64-key tiles and 64-query blocks; 129:
 * 8-warp blocks; 17: attn_f32's 16); masks [B, 1, Lk] and [B, Lq, Lk] with
 * a row of -inf; float4 loads on (aligned rows) and off (a head dim not a
 * multiple of 4, or an odd row stride and offset); B and heads above 1.
 *
 * Also, per kernel: masks with rows of every kind the mask rule names
 * (rule_value: all -FLT_MAX, all -inf, both mixed, with finite values, all
 * -10000, all 30000) in both forms, against the CPU twin, which
 * tests/unit/test_cpu_ops.c holds to a double reference of the rule; a mask
 * of constant rows against the kernel's own unmasked output, to 1e-5
 * (TOL_EW), not the dtype's tolerance (const_rows_case: the shift loses
 * nothing); batch x heads 65,552, past grid.y's 65,535 (grid_case: the
 * blocks at the grid's edges); attn_mma's overflow flag (overflow_case);
 * ragged batches (ragged_case_run: the kernels' RAGGED instances on a batch
 * of mixed lengths against the CPU twin on each sample alone, each sample
 * to its own tolerance; ragged_cases). Every other case must leave the
 * flag clear. */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <type_traits>

#include "attn_kernels.cuh"
#include "emu_common.h"

/* The mask's form and fill: noise with 20% -10000 (and a row of -inf in
 * [B, Lq, Lk]), or rows by the mask rule (rule_value). */
enum mask_kind { MASK_NONE, MASK_KEYS, MASK_FULL, RULE_KEYS, RULE_FULL };
enum layout {
    SEPARATE,  /* q alone; k and v column views of one [B*Lk, 2*inner] tensor */
    FUSED_QKV, /* q, k and v column views of one [B*L, 3*inner] (self-attention) */
    UNALIGNED, /* as SEPARATE but every view starts one column in: odd strides */
};

struct attn_case {
    int64_t batch, lq, lk;
    int heads, hd;
    mask_kind mask;
    layout lay;
};

/* The tensors of a case; qv, kk, vv are views of q, kv or qkv. */
struct attn_io {
    pair q, kv, qkv, o, mask;
    pair qv, kk, vv;
    struct bs_attn_params pc, pe;
};

static const char *const mask_names[] = {"no mask", "mask [B,1,Lk]", "mask [B,Lq,Lk]",
                                         "rule mask [B,1,Lk]", "rule mask [B,Lq,Lk]"};

/* The overflow flag the kernels' arguments point to (attn_args_of). */
static int ovf_flag;

/* Mask row r of a rule mask, key j of lk: row r % 8 is all -FLT_MAX
 * (torch.finfo(float32).min), all -inf, -inf then -FLT_MAX on odd keys of
 * the second half (and the last key: a first key tile with none), -FLT_MAX
 * mixed with finite values, all -10000, -inf mixed with finite values,
 * -FLT_MAX, -inf and 0 mixed, all 30000. */
static float rule_value(int64_t r, int64_t j, int64_t lk)
{
    float u = frand(-1, 1);
    switch (r % 8) {
    case 0:
        return -FLT_MAX;
    case 1:
        return -INFINITY;
    case 2:
        return j == lk - 1 || (j >= lk / 2 && j % 2) ? -FLT_MAX : -INFINITY;
    case 3:
        return u < -0.4f ? -FLT_MAX : frand(-2, 0);
    case 4:
        return -10000.0f;
    case 5:
        return u < -0.4f ? -INFINITY : frand(-2, 0);
    case 6:
        return u < -0.3f ? -FLT_MAX : u < 0.3f ? -INFINITY : 0.0f;
    default:
        return 30000.0f;
    }
}
static const char *const layout_names[] = {"", " qkv", " unaligned"};

static void attn_io_init(attn_io *io, const attn_case &c)
{
    int64_t inner = (int64_t)c.heads * c.hd;
    if (c.lay == FUSED_QKV) {
        pair_init(&io->qkv, {c.batch * c.lq, 3 * inner}, -1, 1);
        io->qv = pair_cols(io->qkv, 0, inner);
        io->kk = pair_cols(io->qkv, inner, inner);
        io->vv = pair_cols(io->qkv, 2 * inner, inner);
    } else {
        int64_t off = c.lay == UNALIGNED ? 1 : 0;
        pair_init(&io->q, {c.batch * c.lq, inner + off}, -1, 1);
        pair_init(&io->kv, {c.batch * c.lk, 2 * inner + off}, -1, 1);
        io->qv = pair_cols(io->q, off, inner);
        io->kk = pair_cols(io->kv, off, inner);
        io->vv = pair_cols(io->kv, off + inner, inner);
    }
    pair_init(&io->o, {c.batch * c.lq, inner}, -1, 1);
    io->pc = {}; /* F32, no mask */
    io->pc.batch = c.batch;
    io->pc.lq = c.lq;
    io->pc.lk = c.lk;
    io->pc.heads = c.heads;
    io->pc.head_dim = c.hd;
    io->pc.scale = 1.0f / sqrtf((float)c.hd);
    io->pe = io->pc;
    if (c.mask == MASK_NONE || c.lk == 0)
        return;
    int64_t mq = c.mask == MASK_KEYS || c.mask == RULE_KEYS ? 1 : c.lq;
    pair_init(&io->mask, {c.batch, mq, c.lk}, -2, 0);
    float *m = io->mask.cbuf.data();
    for (int64_t i = 0; i < c.batch * mq * c.lk; i++)
        if (c.mask >= RULE_KEYS)
            m[i] = rule_value(i / c.lk, i % c.lk, c.lk);
        else if (frand(0, 1) < 0.2f)
            m[i] = -10000.0f;
    if (c.mask == MASK_FULL && c.lq > 1) /* one row with no key at all */
        for (int64_t i = 0; i < c.lk; i++)
            m[c.lk + i] = -INFINITY;
    pair_sync(&io->mask);
    io->pc.mask = &io->mask.c;
    io->pe.mask = &io->mask.e;
}

/* The kernels' arguments, as the entry fills them. */
static attn_args attn_args_of(attn_io *io)
{
    attn_args a;
    attn_args_fill(&a, &io->o.e, &io->qv.e, &io->kk.e, &io->vv.e, &io->pe);
    a.overflow = &ovf_flag;
    return a;
}

/* A case that must not set the overflow flag: counted as failed if it did. */
static void expect_no_overflow(emu_env *env, tally *t, const char *name)
{
    if (ovf_flag == 0)
        return;
    char what[200];
    snprintf(what, sizeof(what), "%s: overflow flag set (%d) without an overflow", name, ovf_flag);
    expect_value(env, t, what, INFINITY, INFINITY);
    ovf_flag = 0;
}

static void cpu_attention(emu_env *env, attn_io *io)
{
    struct bs_err err = {};
    check_cpu(env->cpu.iface->attention(env->cpu.ctx, &io->o.c, &io->qv.c, &io->kk.c, &io->vv.c,
                                        &io->pc, &err),
              &err, "attention");
}

static void case_name(char *buf, size_t size, const char *what, const attn_case &c, bool vec)
{
    snprintf(buf, size, "%s B%lld Lq%lld Lk%lld %dx%d %s%s%s", what, (long long)c.batch,
             (long long)c.lq, (long long)c.lk, c.heads, c.hd, mask_names[c.mask],
             layout_names[c.lay], vec ? " float4" : "");
}

/* ---- attn_mma ------------------------------------------------------------------ */

/* Blocks of a grid for emu_launch_blocks: all of them (count 0), or the
 * range [first, first + count). */
struct block_range {
    uint64_t first = 0, count = 0;
};

/* The launcher's instance: the ragged one for a ragged batch (a.q_off);
 * shared memory as the launcher sizes it (mask rows). */
template <typename T, typename TO, int DP, int W>
static void launch_mma_w(const attn_args &a, int64_t batch, block_range r)
{
    using S = mma_smem<DP, W>;
    dim3 grid = attn_grid(a.lq, batch * a.heads, S::BQ);
    uint64_t count = r.count ? r.count : (uint64_t)grid.x;
    int mrows = a.mask == NULL ? 0 : a.mq == 1 ? 1 : S::BQ;
    size_t smem = S::bytes(sizeof(T), mrows);
    if (a.q_off != NULL)
        emu_launch_blocks(attn_mma<T, DP, W, true, TO>, grid, dim3(S::THREADS), smem, r.first,
                          count, a);
    else
        emu_launch_blocks(attn_mma<T, DP, W, false, TO>, grid, dim3(S::THREADS), smem, r.first,
                          count, a);
}

/* The instances the launcher has: 8 warps only up to DP 80. */
template <typename T, typename TO, int DP>
static void launch_mma_dp(const attn_args &a, int64_t batch, int warps, block_range r)
{
    if constexpr (DP <= 80) {
        if (warps == 8)
            return launch_mma_w<T, TO, DP, 8>(a, batch, r);
    }
    if (warps != 4) {
        fprintf(stderr, "attn_mma has no %d-warp instance for DP %d\n", warps, DP);
        exit(2);
    }
    launch_mma_w<T, TO, DP, 4>(a, batch, r);
}

/* The entry's conversion pass (attn_cuda.cu, launch_mma_t): Q, K and V of
 * a (TS: F32 or 16-bit) into buf in T by attn_to16, on a small grid (its
 * loops stride over rows and columns; the emulation runs a host thread per
 * CUDA thread). */
template <typename T, typename TS = float>
static attn_src16 convert16(const attn_args &a, int64_t batch, std::vector<unsigned char> *buf)
{
    int64_t rq = a.q_off ? a.q_off[batch] : batch * a.lq,
            rk = a.q_off ? a.k_off[batch] : batch * a.lk;
    int hs = attn_hs(a.head_dim);
    buf->assign(attn16_bytes(rq, rk, a.heads, hs, sizeof(T)) + 16, 0xff);
    void *base = (void *)(((uintptr_t)buf->data() + 15) & ~(uintptr_t)15);
    attn_src16 s = attn16_layout(base, rq, rk, a.heads, hs, sizeof(T));
    const TS *srcs[3] = {(const TS *)a.q, (const TS *)a.k, (const TS *)a.v};
    const void *dsts[3] = {s.q, s.k, s.v};
    int64_t lds[3] = {a.ldq, a.ldk, a.ldv}, rows[3] = {rq, rk, rk};
    for (int i = 0; i < 3; i++)
        if (rows[i] > 0)
            emu_launch(attn_to16<T, TS>, dim3(1, (unsigned)std::min<int64_t>(rows[i], 2)), dim3(64),
                       0, (T *)dsts[i], srcs[i], rows[i], lds[i], a.heads, a.head_dim, hs,
                       a.overflow);
    return s;
}

/* attn_mma on src16, or (NULL) on a's operands (of TS) through the
 * conversion pass, as the entry runs it; o of TO (F32 or T). */
template <typename T, typename TO = float, typename TS = float>
static void launch_mma(const attn_args &a0, int64_t batch, int warps, block_range r = {},
                       const attn_src16 *src16 = NULL)
{
    attn_args a = a0;
    std::vector<unsigned char> buf;
    attn_src16 conv;
    if (src16 == NULL) {
        conv = convert16<T, TS>(a, batch, &buf);
        src16 = &conv;
    }
    attn_src16_set(&a, src16);
    switch (mma_dp(a.head_dim)) {
    case 32:
        return launch_mma_dp<T, TO, 32>(a, batch, warps, r);
    case 48:
        return launch_mma_dp<T, TO, 48>(a, batch, warps, r);
    case 64:
        return launch_mma_dp<T, TO, 64>(a, batch, warps, r);
    case 80:
        return launch_mma_dp<T, TO, 80>(a, batch, warps, r);
    case 128:
        return launch_mma_dp<T, TO, 128>(a, batch, warps, r);
    default:
        return launch_mma_dp<T, TO, 160>(a, batch, warps, r);
    }
}

/* attn_mma in dtype dt (the launcher's choice of kernel by head dim). */
static void launch_mma_dt(enum bs_dtype dt, const attn_args &a, int64_t batch, int warps,
                          block_range r = {})
{
    if (dt == BS_TYPE_BF16)
        launch_mma<__nv_bfloat16>(a, batch, warps, r);
    else
        launch_mma<__half>(a, batch, warps, r);
}

/* attn_f32 on q, k, v of TI into o of TO. */
template <typename TI = float, typename TO = float>
static void launch_f32(const attn_args &a, int64_t batch, block_range r = {})
{
    dim3 grid = attn_grid(a.lq, batch * a.heads, F32_BQ);
    uint64_t count = r.count ? r.count : (uint64_t)grid.x;
    if (a.q_off != NULL)
        emu_launch_blocks(attn_f32<TI, TO, true>, grid, dim3(F32_THREADS),
                          attn_f32_smem(a.head_dim), r.first, count, a);
    else
        emu_launch_blocks(attn_f32<TI, TO, false>, grid, dim3(F32_THREADS),
                          attn_f32_smem(a.head_dim), r.first, count, a);
}

/* ---- cases every attention kernel runs ----------------------------------------- */

/* A mask whose rows are each one constant (-10000, 30000, 0, -1e30, 5)
 * changes nothing: the kernel's output with it equals its output without,
 * to TOL_EW, in both mask forms (the shift adds exactly 0; adding -10000 to
 * the scores in FP32 would round them to 1e-3). launch(a) runs the kernel. */
template <typename L>
static void const_rows_case(emu_env *env, tally *t, const char *what, attn_case c, L launch)
{
    static const float consts[] = {-10000.0f, 30000.0f, 0.0f, -1e30f, 5.0f};
    c.mask = MASK_NONE;
    attn_io io;
    attn_io_init(&io, c);
    launch(attn_args_of(&io));
    std::vector<float> ref = io.o.ebuf;
    for (int64_t mq : {(int64_t)1, c.lq}) {
        pair mask;
        pair_init(&mask, {c.batch, mq, c.lk}, 0, 0);
        for (int64_t r = 0; r < c.batch * mq; r++)
            for (int64_t j = 0; j < c.lk; j++)
                mask.ebuf[(size_t)(r * c.lk + j)] = consts[r % 5];
        io.pe.mask = &mask.e;
        launch(attn_args_of(&io));
        double err = 0, share = 0;
        for (size_t i = 0; i < ref.size(); i++) {
            double d = fabs((double)io.o.ebuf[i] - ref[i]);
            err = d > err || isnan(d) ? d : err;
            double sh = d / (TOL_EW + TOL_EW * fabs((double)ref[i]));
            share = sh > share || isnan(sh) ? sh : share;
        }
        char name[200];
        snprintf(name, sizeof(name),
                 "%s B%lld Lq%lld Lk%lld %dx%d constant mask rows [B,%s,Lk] "
                 "vs none (TOL_EW)",
                 what, (long long)c.batch, (long long)c.lq, (long long)c.lk, c.heads, c.hd,
                 mq == 1 ? "1" : "Lq");
        expect_value(env, t, name, err, share);
    }
    expect_no_overflow(env, t, what);
}

/* Batch x heads 65,552 (past grid.y's 65,535, which the kernels used to
 * take it from): 4097 samples x 16 heads, head dim 1, Lq 65 (2 to 5 query
 * tiles), Lk 3, a rule mask [B,1,Lk]. The CPU twin computes everything; the
 * kernel runs the blocks of (sample, head) 0, 1 and 65,534 to the last, the
 * grid's edges, which are compared (tol: the kernel's, rms-scaled when
 * rms). launch(a, range) runs the kernel on the blocks in range; bq is its
 * queries per block. */
template <typename L>
static void grid_case(emu_env *env, tally *t, const char *what, int bq, double tol, bool rms,
                      L launch)
{
    const attn_case c = {4097, 65, 3, 16, 1, RULE_KEYS, SEPARATE};
    const int64_t bh = c.batch * c.heads, tiles = (c.lq + bq - 1) / bq, lo = 65534;
    attn_io io;
    attn_io_init(&io, c);
    cpu_attention(env, &io);
    attn_args a = attn_args_of(&io);
    launch(a, block_range{0, (uint64_t)(2 * tiles)});
    launch(a, block_range{(uint64_t)(lo * tiles), (uint64_t)((bh - lo) * tiles)});
    double ss = 0, n = 0, err = 0, share = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int64_t x = 0; x < bh; x = x == 1 ? lo : x + 1) {
            int64_t b = x / c.heads, h = x % c.heads;
            for (int64_t i = 0; i < c.lq; i++) {
                size_t at = (size_t)((b * c.lq + i) * io.o.c.ne[1] + h);
                double want = io.o.cbuf[at], d = fabs((double)io.o.ebuf[at] - want);
                if (pass == 0) {
                    ss += want * want, n++;
                    continue;
                }
                double atol = rms ? tol * sqrt(ss / n) : tol;
                double sh = d / (atol + tol * fabs(want));
                err = d > err || isnan(d) ? d : err;
                share = sh > share || isnan(sh) ? sh : share;
            }
        }
    char name[200];
    snprintf(name, sizeof(name), "%s B%lld x %d heads = %lld (grid x %lld), edge blocks", what,
             (long long)c.batch, c.heads, (long long)bh, (long long)(bh * tiles));
    expect_value(env, t, name, err, share);
    expect_no_overflow(env, t, what);
}

/* ---- ragged batches ------------------------------------------------------------- */

/* A ragged batch (bs_attn_params.q_off): each sample's queries and keys,
 * heads x hd, and the mask: MASK_KEYS and RULE_KEYS one row per sample,
 * MASK_FULL and RULE_FULL one per query (mask_per_query), filled as in
 * attn_io_init (rule rows counted over the whole flat mask). */
struct ragged_case {
    std::vector<int64_t> lq, lk;
    int heads, hd;
    mask_kind mask;
};

#define RAGGED_GAP 3    /* mask elements before each sample's part, */
#define RAGGED_PAD 7.0f /* at this value: a key read from there would dominate its row */

/* The tensors of a ragged case: q alone, k and v column views of one kv
 * tensor, o, the flat mask and the offsets; pe the kernel's parameters. */
struct ragged_io {
    pair q, kv, o, mask;
    pair kk, vv;
    std::vector<int64_t> q_off, k_off, m_off;
    struct bs_attn_params pe;
};

static void ragged_mask_init(ragged_io *io, const ragged_case &c)
{
    const size_t nb = c.lq.size();
    const bool per_query = c.mask == MASK_FULL || c.mask == RULE_FULL;
    int64_t total = 0;
    for (size_t b = 0; b < nb; b++) {
        io->m_off.push_back(total + RAGGED_GAP);
        total += RAGGED_GAP + (per_query ? c.lq[b] : 1) * c.lk[b];
    }
    pair_init(&io->mask, {total}, -2, 0);
    float *m = io->mask.cbuf.data();
    int64_t row = 0; /* over the whole mask, for rule_value */
    for (size_t b = 0; b < nb; b++) {
        float *part = m + io->m_off[b];
        std::fill(part - RAGGED_GAP, part, RAGGED_PAD);
        int64_t rows = per_query ? c.lq[b] : 1, lk = c.lk[b];
        for (int64_t r = 0; r < rows; r++, row++)
            for (int64_t j = 0; j < lk; j++) {
                float &v = part[r * lk + j];
                if (c.mask >= RULE_KEYS)
                    v = rule_value(row, j, lk);
                else if (frand(0, 1) < 0.2f)
                    v = -10000.0f;
                if (c.mask == MASK_FULL && r == 1) /* a row with no key at all */
                    v = -INFINITY;
            }
    }
    pair_sync(&io->mask);
}

static void ragged_io_init(ragged_io *io, const ragged_case &c)
{
    const int64_t inner = (int64_t)c.heads * c.hd;
    int64_t lq = 0, lk = 0;
    io->q_off = {0};
    io->k_off = {0};
    for (size_t b = 0; b < c.lq.size(); b++) {
        io->q_off.push_back(io->q_off.back() + c.lq[b]);
        io->k_off.push_back(io->k_off.back() + c.lk[b]);
        lq = std::max(lq, c.lq[b]);
        lk = std::max(lk, c.lk[b]);
    }
    pair_init(&io->q, {io->q_off.back(), inner}, -1, 1);
    pair_init(&io->kv, {io->k_off.back(), 2 * inner}, -1, 1);
    pair_init(&io->o, {io->q_off.back(), inner}, -1, 1);
    io->kk = pair_cols(io->kv, 0, inner);
    io->vv = pair_cols(io->kv, inner, inner);
    io->pe = {};
    io->pe.batch = (int64_t)c.lq.size();
    io->pe.lq = lq;
    io->pe.lk = lk;
    io->pe.heads = c.heads;
    io->pe.head_dim = c.hd;
    io->pe.scale = 1.0f / sqrtf((float)c.hd);
    io->pe.q_off = io->q_off.data();
    io->pe.k_off = io->k_off.data();
    if (c.mask == MASK_NONE)
        return;
    ragged_mask_init(io, c);
    io->pe.mask = &io->mask.e;
    io->pe.m_off = io->m_off.data();
    io->pe.mask_per_query = c.mask == MASK_FULL || c.mask == RULE_FULL;
}

/* The reference: the CPU twin on each sample alone, a uniform batch of one
 * on views of its rows and its mask part. */
static void ragged_cpu(emu_env *env, ragged_io *io, const ragged_case &c)
{
    for (size_t b = 0; b < c.lq.size(); b++) {
        int64_t q0 = io->q_off[b], k0 = io->k_off[b], lq = c.lq[b], lk = c.lk[b];
        struct bs_tensor q = bs_tensor_view_outer(&io->q.c, q0, lq);
        struct bs_tensor o = bs_tensor_view_outer(&io->o.c, q0, lq);
        struct bs_tensor k = bs_tensor_view_outer(&io->kk.c, k0, lk);
        struct bs_tensor v = bs_tensor_view_outer(&io->vv.c, k0, lk);
        struct bs_tensor mask;
        int64_t mne[3] = {1, io->pe.mask_per_query ? lq : 1, lk};
        struct bs_attn_params p = {};
        p.batch = 1;
        p.lq = lq;
        p.lk = lk;
        p.heads = c.heads;
        p.head_dim = c.hd;
        p.scale = io->pe.scale;
        if (c.mask != MASK_NONE && lk > 0) {
            mask = bs_tensor_make(BS_TYPE_F32, 3, mne, io->mask.cbuf.data() + io->m_off[b]);
            p.mask = &mask;
        }
        struct bs_err err = {};
        check_cpu(env->cpu.iface->attention(env->cpu.ctx, &o, &q, &k, &v, &p, &err), &err,
                  "attention (a ragged batch's sample)");
    }
}

/* Each sample's rows of o against the CPU twin's: |emulated - cpu| <= atol
 * + tol |cpu| with atol tol, or tol x rms(the sample's rows of cpu) when
 * rms (so that a sample without keys, all 0, lowers no other's
 * tolerance, and must itself be exactly 0). The largest error and share
 * over the samples count as one case. */
static void expect_ragged(emu_env *env, tally *t, const char *name, const ragged_io &io, double tol,
                          bool rms, enum bs_dtype ot = BS_TYPE_F32)
{
    const int64_t ld = io.o.c.ne[1];
    double err = 0, share = 0;
    for (size_t b = 0; b + 1 < io.q_off.size(); b++) {
        const size_t lo = (size_t)(io.q_off[b] * ld), hi = (size_t)(io.q_off[b + 1] * ld);
        double ss = 0, atol = tol;
        for (size_t i = lo; i < hi; i++)
            ss += (double)io.o.cbuf[i] * io.o.cbuf[i];
        if (rms)
            atol *= sqrt(ss / (double)(hi - lo));
        for (size_t i = lo; i < hi; i++) {
            double want = io.o.cbuf[i], d = fabs((double)io.o.ebuf[i] - want);
            double sh = d == 0 ? 0 : d / (atol + tol * fabs(want) + ulp_dt(ot, want));
            err = d > err || isnan(d) ? d : err;
            share = sh > share || isnan(sh) ? sh : share;
        }
    }
    expect_value(env, t, name, err, share);
}

/* ---- narrow activations ------------------------------------------------------------ */

/* A case's q, k, v in dtype qt and o in ot (engine/backend.h: BF16, F16 or
 * F32 each; q, k, v one dtype). The q, k, v tensors' values (both sides)
 * are first rounded to qt, so that the CPU twin reads what the kernel
 * reads; a's q, k and v then point into 16-bit copies of those tensors at
 * the views' offsets (same strides in elements), a's o into a 16-bit
 * buffer of o's layout. After the kernel, narrow_finish widens o into the
 * emulated side and rounds the CPU twin's o to ot: the reference of
 * issue 14 (widen, F32 op, round once). */
struct narrow_io {
    std::vector<uint16_t> in[2], o16;
    enum bs_dtype qt, ot;
};

static void narrow_start(narrow_io *n, attn_args *a, std::initializer_list<pair *> wholes, pair *o,
                         enum bs_dtype qt, enum bs_dtype ot)
{
    n->qt = qt;
    n->ot = ot;
    int i = 0;
    for (pair *w : wholes) {
        std::vector<uint16_t> &h = n->in[i++];
        int64_t len = (int64_t)w->cbuf.size();
        h.assign((size_t)len, 0);
        if (qt == BS_TYPE_F32)
            continue;
        bs_convert_from_f32(h.data(), qt, w->cbuf.data(), len);
        bs_convert_to_f32(w->cbuf.data(), h.data(), qt, len);
        pair_sync(w);
        for (const void **p : {&a->q, &a->k, &a->v}) {
            const float *f = (const float *)*p;
            if (f >= w->ebuf.data() && f < w->ebuf.data() + len)
                *p = h.data() + (f - w->ebuf.data());
        }
    }
    if (ot != BS_TYPE_F32) {
        n->o16.assign(o->ebuf.size(), 0xffff); /* NaN in both dtypes */
        a->o = n->o16.data() + ((const float *)a->o - o->ebuf.data());
    }
}

static void narrow_finish(const narrow_io &n, pair *o)
{
    if (n.ot == BS_TYPE_F32)
        return;
    int64_t len = (int64_t)o->cbuf.size();
    bs_convert_to_f32(o->ebuf.data(), n.o16.data(), n.ot, len);
    std::vector<uint16_t> r((size_t)len);
    bs_convert_from_f32(r.data(), n.ot, o->cbuf.data(), len);
    bs_convert_to_f32(o->cbuf.data(), r.data(), n.ot, len);
}

/* expect_close with 1 ulp of ot more per element (ulp_dt). */
static void expect_close_ot(emu_env *env, tally *t, const char *name, const pair &p, double tol,
                            bool rms, enum bs_dtype ot)
{
    size_t n = p.cbuf.size();
    double atol = tol, err = 0, share = 0;
    if (rms) {
        double ss = 0;
        for (float w : p.cbuf)
            ss += (double)w * w;
        atol *= n ? sqrt(ss / (double)n) : 1.0;
    }
    for (size_t i = 0; i < n; i++) {
        double want = p.cbuf[i], d = fabs((double)p.ebuf[i] - want);
        double sh = d == 0 ? 0 : d / (atol + tol * fabs(want) + ulp_dt(ot, want));
        err = d > err || isnan(d) ? d : err;
        share = sh > share || isnan(sh) ? sh : share;
    }
    expect_value(env, t, name, err, share);
}

/* The fused entry's attn_mma path (attn_cuda.cu, launch_mma_t) for q, k, v
 * of qt and o of ot: operands of T's dtype with aligned rows and heads go
 * to the kernel as they are (*direct set), others through attn_to16<T,
 * TS>; o of F32 or T straight from the kernel, of the other 16-bit dtype
 * through F32 rows and act_kernel<TO, float> (BS_ACT_NONE). */
template <typename T>
static void mma_entry(const attn_args &a0, int64_t rows_q, int64_t batch, int warps,
                      enum bs_dtype qt, enum bs_dtype ot, bool *direct)
{
    const enum bs_dtype tt = std::is_same<T, __half>::value ? BS_TYPE_F16 : BS_TYPE_BF16;
    attn_args a = a0;
    *direct = qt == tt && attn_src16_ok(a.q, a.ldq, a.k, a.ldk, a.v, a.ldv, a.head_dim);
    attn_src16 s = {a.q, a.k, a.v, a.ldq, a.ldk, a.ldv, a.head_dim};
    const attn_src16 *src = *direct ? &s : NULL;
    const int64_t inner = (int64_t)a.heads * a.head_dim;
    std::vector<float> tmp;
    const bool o_tmp = ot != BS_TYPE_F32 && ot != tt;
    if (o_tmp) {
        tmp.assign((size_t)(rows_q * inner), NAN);
        a.o = tmp.data();
        a.ldo = inner;
    }
    act_type(qt, [&](auto *qp) {
        using TS = ACT_T(qp);
        if (ot == tt)
            launch_mma<T, T, TS>(a, batch, warps, {}, src);
        else
            launch_mma<T, float, TS>(a, batch, warps, {}, src);
    });
    if (o_tmp && rows_q > 0)
        emu_act_convert(a0.o, ot, a0.ldo, tmp.data(), inner, rows_q, inner);
}

/* One uniform case with narrow tensors: attn_mma in dt through mma_entry
 * (warps), or attn_f32<TI, TO> (dt F32). */
static void narrow_case(emu_env *env, tally *t, enum bs_dtype dt, const attn_case &c, int warps,
                        enum bs_dtype qt, enum bs_dtype ot)
{
    attn_io io;
    attn_io_init(&io, c);
    attn_args a = attn_args_of(&io);
    narrow_io n;
    if (c.lay == FUSED_QKV)
        narrow_start(&n, &a, {&io.qkv}, &io.o, qt, ot);
    else
        narrow_start(&n, &a, {&io.q, &io.kv}, &io.o, qt, ot);
    cpu_attention(env, &io);
    bool direct = false;
    if (dt == BS_TYPE_F32)
        act_type(qt, [&](auto *qp) {
            act_type(ot, [&](auto *op) { launch_f32<ACT_T(qp), ACT_T(op)>(a, c.batch); });
        });
    else if (dt == BS_TYPE_BF16)
        mma_entry<__nv_bfloat16>(a, c.batch * c.lq, c.batch, warps, qt, ot, &direct);
    else
        mma_entry<__half>(a, c.batch * c.lq, c.batch, warps, qt, ot, &direct);
    narrow_finish(n, &io.o);
    char what[96], name[240];
    if (dt == BS_TYPE_F32)
        snprintf(what, sizeof(what), "attn_f32 q,k,v %s o %s", bs_dtype_name(qt),
                 bs_dtype_name(ot));
    else
        snprintf(what, sizeof(what), "attn_mma %s DP%d %dw q,k,v %s%s o %s", bs_dtype_name(dt),
                 mma_dp(c.hd), warps, bs_dtype_name(qt), direct ? " (as they are)" : "",
                 bs_dtype_name(ot));
    case_name(name, sizeof(name), what, c, false);
    double tol = dt == BS_TYPE_F32 ? TOL_F32 : dt == BS_TYPE_BF16 ? TOL_BF16 : TOL_F16;
    expect_close_ot(env, t, name, io.o, tol, dt != BS_TYPE_F32, ot);
    expect_no_overflow(env, t, name);
}

/* One ragged case with narrow tensors (as narrow_case), each sample to its
 * own tolerance (expect_ragged). */
static void narrow_ragged(emu_env *env, tally *t, enum bs_dtype dt, const ragged_case &c, int warps,
                          enum bs_dtype qt, enum bs_dtype ot)
{
    ragged_io io;
    ragged_io_init(&io, c);
    attn_args a;
    attn_args_fill(&a, &io.o.e, &io.q.e, &io.kk.e, &io.vv.e, &io.pe);
    a.overflow = &ovf_flag;
    narrow_io n;
    narrow_start(&n, &a, {&io.q, &io.kv}, &io.o, qt, ot);
    ragged_cpu(env, &io, c);
    int64_t batch = (int64_t)c.lq.size();
    bool direct = false;
    if (dt == BS_TYPE_F32)
        act_type(qt, [&](auto *qp) {
            act_type(ot, [&](auto *op) { launch_f32<ACT_T(qp), ACT_T(op)>(a, batch); });
        });
    else if (dt == BS_TYPE_BF16)
        mma_entry<__nv_bfloat16>(a, io.q_off.back(), batch, warps, qt, ot, &direct);
    else
        mma_entry<__half>(a, io.q_off.back(), batch, warps, qt, ot, &direct);
    narrow_finish(n, &io.o);
    char name[200];
    snprintf(name, sizeof(name), "%s %s ragged B%lld %dx%d %s q,k,v %s%s o %s",
             dt == BS_TYPE_F32 ? "attn_f32" : "attn_mma", bs_dtype_name(dt), (long long)batch,
             c.heads, c.hd, mask_names[c.mask], bs_dtype_name(qt), direct ? " (as they are)" : "",
             bs_dtype_name(ot));
    double tol = dt == BS_TYPE_F32 ? TOL_F32 : dt == BS_TYPE_BF16 ? TOL_BF16 : TOL_F16;
    expect_ragged(env, t, name, io, tol, dt != BS_TYPE_F32, ot);
    expect_no_overflow(env, t, name);
}

/* attn_mma's narrow cases in dt (T) with other the other 16-bit dtype:
 * q, k, v of T aligned (as they are) into o of T, uniform with a mask per
 * query and ragged with a rule mask; of T unaligned (attn_to16<T, T>) into
 * F32; of the other dtype into the other (attn_to16<T, other>, o through
 * F32 rows and act_kernel); F32 into T from a fused QKV. */
static void run_mma_narrow(emu_env *env, tally *t, enum bs_dtype dt)
{
    const enum bs_dtype other = dt == BS_TYPE_BF16 ? BS_TYPE_F16 : BS_TYPE_BF16;
    narrow_case(env, t, dt, {2, 65, 77, 2, 64, MASK_FULL, SEPARATE}, 4, dt, dt);
    narrow_case(env, t, dt, {1, 129, 70, 1, 32, MASK_KEYS, SEPARATE}, 8, dt, dt);
    narrow_case(env, t, dt, {1, 40, 70, 1, 64, MASK_KEYS, UNALIGNED}, 4, dt, BS_TYPE_F32);
    narrow_case(env, t, dt, {1, 33, 65, 2, 40, RULE_KEYS, SEPARATE}, 4, other, other);
    narrow_case(env, t, dt, {1, 30, 30, 1, 48, MASK_NONE, FUSED_QKV}, 4, BS_TYPE_F32, dt);
    narrow_ragged(env, t, dt, {{10, 70, 1}, {65, 5, 0}, 1, 64, RULE_FULL}, 4, dt, dt);
    narrow_ragged(env, t, dt, {{3, 66}, {70, 2}, 2, 40, MASK_KEYS}, 4, other, BS_TYPE_F32);
}

/* One ragged case: the kernel (launch(a)) on the whole batch against the
 * CPU twin sample by sample (tol: the kernel's, rms scaled when rms). */
template <typename L>
static void ragged_case_run(emu_env *env, tally *t, const char *what, const ragged_case &c,
                            double tol, bool rms, L launch)
{
    ragged_io io;
    ragged_io_init(&io, c);
    ragged_cpu(env, &io, c);
    attn_args a;
    attn_args_fill(&a, &io.o.e, &io.q.e, &io.kk.e, &io.vv.e, &io.pe);
    a.overflow = &ovf_flag;
    launch(a);
    char name[200];
    int at = snprintf(name, sizeof(name), "%s ragged B%zu Lq", what, c.lq.size());
    for (size_t b = 0; b < c.lq.size() && at < (int)sizeof(name); b++)
        at += snprintf(name + at, sizeof(name) - at, "%s%lld", b ? "," : "", (long long)c.lq[b]);
    for (size_t b = 0; b < c.lk.size() && at < (int)sizeof(name); b++)
        at += snprintf(name + at, sizeof(name) - at, "%s%lld", b ? "," : " Lk", (long long)c.lk[b]);
    if (at < (int)sizeof(name))
        snprintf(name + at, sizeof(name) - at, " %dx%d %s%s", c.heads, c.hd, mask_names[c.mask],
                 a.vec ? " float4" : "");
    expect_ragged(env, t, name, io, tol, rms);
    expect_no_overflow(env, t, name);
}

/* The ragged cases of attn_mma and attn_f32 (bq: queries a block, bk: keys
 * a tile): samples of one query and of a tile plus one, lengths crossing
 * the tiles, a sample without keys, key lengths apart from the query
 * lengths, both mask forms with -10000, -FLT_MAX and -inf rows (8 samples:
 * a rule row of each kind in the one-row form), head dims 40, 64, 72, 80,
 * 128 and 160 (the callers add their own). */
static std::vector<ragged_case> ragged_cases(int64_t bq, int64_t bk)
{
    return {
        {{1, 2 * bq + 2, bq, bq + 1}, {bk + 13, 0, 2 * bk + 2, 1}, 2, 40, MASK_FULL},
        {{bq + 1, 1, 3, 1, 5, 1, 2, 2}, {1, 2 * bk + 2, 0, 1, bk + 6, 2, 3, 9}, 1, 64, RULE_KEYS},
        {{20, 2 * bq + 2}, {2 * bk + 2, bk + 13}, 1, 72, RULE_FULL},
        {{1, 1, bq + 6}, {bk + 1, 0, bk}, 2, 80, MASK_KEYS},
        {{bq, 2}, {0, 2 * bk + 1}, 1, 128, MASK_NONE},
        {{bq + 2, 1}, {bk + 1, 20}, 1, 160, RULE_FULL},
    };
}

static void mma_case(emu_env *env, tally *t, enum bs_dtype dt, const attn_case &c, int warps)
{
    attn_io io;
    attn_io_init(&io, c);
    cpu_attention(env, &io);
    attn_args a = attn_args_of(&io);
    if (c.batch > 0 && c.lq > 0) /* the entry launches nothing otherwise */
        launch_mma_dt(dt, a, c.batch, warps);
    char what[64], name[160];
    snprintf(what, sizeof(what), "attn_mma %s DP%d %dw", bs_dtype_name(dt), mma_dp(c.hd), warps);
    case_name(name, sizeof(name), what, c, a.vec);
    double tol = dt == BS_TYPE_BF16 ? TOL_BF16 : TOL_F16;
    expect_close(env, t, name, io.o, tol, tol, true);
    expect_no_overflow(env, t, name);
}

/* attn_mma's overflow flag (overflow.cuh): set when a Q, K or V value (one,
 * at row r of the tensor named) rounds to inf in the dtype, and only then:
 * FP16 65504 and 65519 stay finite, 65520 and -70000 do not; BF16 3.38e38
 * stays finite, FLT_MAX does not; an inf input is not an overflow. With and
 * without float4 loads (head dims 32 and 30). */
static void overflow_case(emu_env *env, tally *t, enum bs_dtype dt, int which, float value,
                          bool want, int hd)
{
    const attn_case c = {1, 20, 20, 1, hd, MASK_NONE, SEPARATE};
    static const char *const names[] = {"q", "k", "v"};
    attn_io io;
    attn_io_init(&io, c);
    pair &p = which == 0 ? io.qv : which == 1 ? io.kk : io.vv;
    ((float *)p.e.data)[13 * bs_tensor_ld(&p.e) + 5] = value; /* row 13, column 5 */
    attn_args a = attn_args_of(&io);
    ovf_flag = 0;
    launch_mma_dt(dt, a, c.batch, 4);
    bool got = ovf_flag != 0;
    bool ok = got == want && (!got || ovf_flag == BS_OVF_ATTENTION);
    char name[160];
    snprintf(name, sizeof(name), "attn_mma %s overflow flag: %s = %g%s: %s (want %s)",
             bs_dtype_name(dt), names[which], (double)value, a.vec ? " float4" : "",
             got ? "set" : "clear", want ? "set" : "clear");
    expect_value(env, t, name, 0.0, ok ? 0.0 : INFINITY);
    ovf_flag = 0;
}

static void run_mma_overflow(emu_env *env, tally *t, enum bs_dtype dt)
{
    bool f16 = dt == BS_TYPE_F16;
    const float fine[] = {65504.0f, 65519.0f, 3.38e38f, -INFINITY};
    const float over[] = {65520.0f, -70000.0f, FLT_MAX, -FLT_MAX};
    for (int hd : {32, 30})
        for (int which = 0; which < 3; which++) {
            for (float v : fine) /* 3.38e38 only for bf16 */
                if (!f16 || v != 3.38e38f)
                    overflow_case(env, t, dt, which, v, false, hd);
            for (float v : over) /* bf16: only FLT_MAX's */
                if (f16 || fabsf(v) == FLT_MAX)
                    overflow_case(env, t, dt, which, v, true, hd);
        }
}

/* attn_mma on 16-bit operands handed to it as they are (attn_src16: the
 * path of 16-bit activations, no conversion pass): Q, K and V rounded to T
 * on the host into rows with a gap of 8 elements of NaN after the heads
 * (row stride heads x hd + 8), against the CPU twin. */
template <typename T>
static void direct16_case(emu_env *env, tally *t, enum bs_dtype dt, const attn_case &c, int warps)
{
    attn_io io;
    attn_io_init(&io, c);
    cpu_attention(env, &io);
    attn_args a = attn_args_of(&io);
    const int64_t inner = (int64_t)c.heads * c.hd, ld = inner + 8;
    std::vector<T> h16[3];
    const float *src[3] = {(const float *)a.q, (const float *)a.k, (const float *)a.v};
    int64_t lds[3] = {a.ldq, a.ldk, a.ldv},
            rows[3] = {c.batch * c.lq, c.batch * c.lk, c.batch * c.lk};
    for (int i = 0; i < 3; i++) {
        h16[i].assign((size_t)(rows[i] * ld + 8), (T)NAN);
        for (int64_t r = 0; r < rows[i]; r++)
            for (int64_t j = 0; j < inner; j++)
                h16[i][(size_t)(r * ld + j)] = (T)src[i][r * lds[i] + j];
    }
    attn_src16 s = {h16[0].data(), h16[1].data(), h16[2].data(), ld, ld, ld, c.hd};
    bool ok = attn_src16_ok(s.q, s.ldq, s.k, s.ldk, s.v, s.ldv, c.hd);
    launch_mma<T>(a, c.batch, warps, {}, &s);
    char what[96], name[200];
    snprintf(what, sizeof(what), "attn_mma %s DP%d %dw 16-bit operands as they are%s",
             bs_dtype_name(dt), mma_dp(c.hd), warps, ok ? "" : " (NOT ALIGNED)");
    case_name(name, sizeof(name), what, c, false);
    double tol = dt == BS_TYPE_BF16 ? TOL_BF16 : TOL_F16;
    if (!ok)
        expect_value(env, t, name, INFINITY, INFINITY);
    expect_close(env, t, name, io.o, tol, tol, true);
    expect_no_overflow(env, t, name);
}

/* attn_to16, the conversion pass, bit for bit against CUDA's host rounding:
 * 5 rows of 3 heads x hd from a view with an odd row stride, into rows of
 * 3 x attn_hs(hd), zero from hd to the next multiple of 8. */
template <typename T> static void to16_case(emu_env *env, tally *t, int hd)
{
    const int heads = 3, hs = attn_hs(hd);
    const int64_t rows = 5, ld = heads * hd + 3;
    std::vector<float> src((size_t)(rows * ld));
    for (float &x : src)
        x = frand(-3, 3);
    std::vector<T> dst((size_t)(rows * heads * hs) + 8, (T)NAN);
    emu_launch(attn_to16<T, float>, dim3(2, 2), dim3(32), 0, dst.data(),
               (const float *)src.data() + 1, rows, ld, heads, hd, hs, &ovf_flag);
    int bad = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int h = 0; h < heads; h++)
            for (int d = 0; d < hs; d++) {
                T want = d < hd ? (T)src[(size_t)(r * ld + 1 + h * hd + d)] : (T)0.0f;
                T got = dst[(size_t)((r * heads + h) * hs + d)];
                bad += memcmp(&want, &got, sizeof(T)) != 0;
            }
    char name[120];
    snprintf(name, sizeof(name), "attn_to16 %s 5 rows x 3 heads x %d (padded to %d): %d wrong",
             sizeof(T) == 2 && std::is_same<T, __half>::value ? "F16" : "BF16", hd, hs, bad);
    expect_value(env, t, name, bad, bad ? INFINITY : 0.0);
    expect_no_overflow(env, t, name);
}

void run_attn_mma(emu_env *env, enum bs_dtype dt)
{
    tally t;
    t.kernel = "attn_mma";
    t.note = std::string(bs_dtype_name(dt)) + ", DP 32-160 x 4 warps, DP 32-80 x 8 warps";
    /* Every padded head dim, 4 warps: 2 samples x 2 heads, a query block
     * plus one, two key tiles. */
    static const attn_case dims[] = {
        {2, 65, 77, 2, 32, MASK_FULL, SEPARATE},    {2, 65, 77, 2, 40, MASK_KEYS, SEPARATE},
        {2, 65, 77, 2, 64, MASK_NONE, SEPARATE},    {2, 65, 77, 2, 72, MASK_FULL, SEPARATE},
        {2, 65, 77, 2, 128, MASK_KEYS, SEPARATE},   {2, 65, 77, 2, 160, MASK_FULL, SEPARATE},
        {1, 77, 77, 2, 30, MASK_KEYS, SEPARATE},    /* hd % 4 != 0: scalar loads */
        {1, 77, 65, 2, 120, MASK_FULL, UNALIGNED},  /* odd strides: scalar loads */
        {1, 33, 40, 1, 150, MASK_NONE, SEPARATE},   /* DP 160, scalar loads */
        {1, 130, 130, 2, 48, MASK_FULL, FUSED_QKV}, /* self-attention from one QKV */
    };
    for (const attn_case &c : dims)
        mma_case(env, &t, dt, c, 4);
    /* Lq and Lk of 0, 1, a tile plus one, 77 and 130; both mask forms. */
    static const int64_t lens[] = {0, 1, 65, 77, 130};
    int i = 0;
    for (int64_t lq : lens)
        for (int64_t lk : lens)
            mma_case(env, &t, dt, {1, lq, lk, 1, 32, (mask_kind)(i++ % 3), SEPARATE}, 4);
    /* 8 warps (128 queries a block): DP up to 80, a block plus one. */
    static const attn_case eight[] = {
        {1, 129, 65, 2, 32, MASK_FULL, SEPARATE},  {1, 129, 65, 2, 48, MASK_KEYS, SEPARATE},
        {1, 129, 65, 2, 64, MASK_NONE, SEPARATE},  {1, 129, 65, 2, 80, MASK_FULL, SEPARATE},
        {1, 129, 77, 1, 72, MASK_KEYS, UNALIGNED}, {2, 1, 1, 1, 64, MASK_FULL, SEPARATE},
        {1, 130, 0, 1, 40, MASK_NONE, SEPARATE},
    };
    for (const attn_case &c : eight)
        mma_case(env, &t, dt, c, 8);
    /* The mask rule in both forms; 3 key tiles (a row's first with no key at
     * -FLT_MAX); 8 warps too. */
    static const attn_case rule[] = {
        {8, 17, 77, 1, 32, RULE_KEYS, SEPARATE},
        {1, 65, 130, 2, 64, RULE_FULL, SEPARATE},
        {1, 70, 77, 1, 30, RULE_FULL, UNALIGNED},
    };
    for (const attn_case &c : rule)
        mma_case(env, &t, dt, c, 4);
    mma_case(env, &t, dt, {1, 129, 77, 1, 48, RULE_FULL, SEPARATE}, 8);
    char what[64];
    for (int warps : {4, 8}) {
        snprintf(what, sizeof(what), "attn_mma %s %dw", bs_dtype_name(dt), warps);
        const_rows_case(env, &t, what, {2, 40, 130, 1, 40, MASK_NONE, SEPARATE},
                        [&](const attn_args &a) { launch_mma_dt(dt, a, 2, warps); });
    }
    snprintf(what, sizeof(what), "attn_mma %s", bs_dtype_name(dt));
    double tol = dt == BS_TYPE_BF16 ? TOL_BF16 : TOL_F16;
    /* Ragged batches: 4 warps (64 queries a block), the scalar loads, 8
     * warps (128). */
    std::vector<ragged_case> rc = ragged_cases(64, MMA_BK);
    rc.push_back({{10, 70}, {5, 66}, 1, 30, MASK_KEYS});
    for (const ragged_case &c : rc)
        ragged_case_run(env, &t, what, c, tol, true,
                        [&](const attn_args &a) { launch_mma_dt(dt, a, (int64_t)c.lq.size(), 4); });
    static const ragged_case rc8[] = {
        {{129, 1, 40}, {65, 3, 0}, 1, 64, RULE_FULL},
        {{130, 2}, {1, 77}, 1, 80, MASK_KEYS},
    };
    for (const ragged_case &c : rc8)
        ragged_case_run(env, &t, what, c, tol, true,
                        [&](const attn_args &a) { launch_mma_dt(dt, a, (int64_t)c.lq.size(), 8); });
    grid_case(env, &t, what, 64, tol, true,
              [&](const attn_args &a, block_range r) { launch_mma_dt(dt, a, 4097, 4, r); });
    run_mma_overflow(env, &t, dt);
    /* The pipeline's depth: Lk of 1, one tile, one tile plus one, 2 and 3
     * tiles, 2 and 3 tiles plus a tail; masks of rows 16-byte aligned (Lk a
     * multiple of 4: the mask's cp.async path) and not; 4 and 8 warps. */
    static const int64_t depths[] = {1, 64, 65, 128, 150, 192, 200};
    int k = 0;
    for (int64_t lk : depths) {
        mma_case(env, &t, dt, {1, 70, lk, 2, 64, (mask_kind)(1 + k % 4), SEPARATE}, 4);
        mma_case(env, &t, dt, {2, 20, lk, 1, 128, (mask_kind)(k % 5), SEPARATE}, 4);
        mma_case(env, &t, dt, {1, 130, lk, 1, 72, (mask_kind)((k + 2) % 5), UNALIGNED}, 8);
        k++;
    }
    /* 16-bit operands passed as they are (no conversion pass). */
    static const attn_case d16[] = {
        {2, 65, 77, 2, 40, MASK_KEYS, SEPARATE},
        {1, 70, 150, 1, 128, RULE_FULL, SEPARATE},
        {1, 129, 130, 2, 80, MASK_NONE, SEPARATE},
    };
    for (const attn_case &c : d16) {
        int warps = c.hd <= 80 && c.lq > 128 ? 8 : 4;
        if (dt == BS_TYPE_BF16)
            direct16_case<__nv_bfloat16>(env, &t, dt, c, warps);
        else
            direct16_case<__half>(env, &t, dt, c, warps);
    }
    run_mma_narrow(env, &t, dt);
    t.note += ", rule masks, constant rows, B x heads 65552, overflow flag, ragged batches, "
              "pipeline depths, 16-bit operands, narrow q/k/v/o";
    tally_report(env, t);

    tally tc;
    tc.kernel = "attn_to16";
    tc.note = std::string(bs_dtype_name(dt)) + ", bit for bit, heads padded to 8 (overflow: "
                                               "attn_mma's overflow cases run through it)";
    for (int hd : {30, 40, 64})
        if (dt == BS_TYPE_BF16)
            to16_case<__nv_bfloat16>(env, &tc, hd);
        else
            to16_case<__half>(env, &tc, hd);
    tally_report(env, tc);
}

/* ---- attn_f32 -------------------------------------------------------------------- */

static void f32_case(emu_env *env, tally *t, const attn_case &c)
{
    attn_io io;
    attn_io_init(&io, c);
    cpu_attention(env, &io);
    attn_args a = attn_args_of(&io);
    if (c.batch > 0 && c.lq > 0)
        launch_f32(a, c.batch);
    char name[160];
    case_name(name, sizeof(name), "attn_f32", c, false);
    expect_close(env, t, name, io.o, TOL_F32, TOL_F32, false);
    expect_no_overflow(env, t, name);
}

void run_attn_f32(emu_env *env)
{
    tally t;
    t.kernel = "attn_f32";
    t.note = "head dims 24-512";
    static const attn_case dims[] = {
        {2, 33, 40, 2, 24, MASK_FULL, SEPARATE},   {2, 33, 40, 2, 64, MASK_KEYS, SEPARATE},
        {1, 33, 40, 2, 30, MASK_KEYS, UNALIGNED},  {2, 17, 33, 2, 161, MASK_FULL, SEPARATE},
        {1, 20, 20, 2, 200, MASK_NONE, FUSED_QKV}, {1, 17, 33, 1, 512, MASK_KEYS, SEPARATE},
    };
    /* Ragged batches first (the mutant build's ragged bug fails the group
     * early: gpu_emu_mutant_ragged_fails). */
    std::vector<ragged_case> rc = ragged_cases(F32_BQ, F32_BK);
    rc.push_back({{17, 1}, {3, 40}, 1, 200, RULE_KEYS});
    for (const ragged_case &c : rc)
        ragged_case_run(env, &t, "attn_f32", c, TOL_F32, false,
                        [&](const attn_args &a) { launch_f32(a, (int64_t)c.lq.size()); });
    for (const attn_case &c : dims)
        f32_case(env, &t, c);
    static const int64_t lens[] = {0, 1, 17, 77, 130};
    int i = 0;
    for (int64_t lq : lens)
        for (int64_t lk : lens)
            f32_case(env, &t, {1, lq, lk, 1, 24, (mask_kind)(i++ % 3), SEPARATE});
    f32_case(env, &t, {8, 17, 40, 1, 24, RULE_KEYS, SEPARATE});
    f32_case(env, &t, {1, 33, 77, 2, 64, RULE_FULL, SEPARATE});
    const_rows_case(env, &t, "attn_f32", {2, 33, 40, 2, 24, MASK_NONE, SEPARATE},
                    [](const attn_args &a) { launch_f32(a, 2); });
    grid_case(env, &t, "attn_f32", F32_BQ, TOL_F32, false,
              [](const attn_args &a, block_range r) { launch_f32(a, 4097, r); });
    /* narrow q, k, v and o (every kernel instance's input and output type) */
    narrow_case(env, &t, BS_TYPE_F32, {2, 17, 33, 2, 24, MASK_FULL, SEPARATE}, 0, BS_TYPE_BF16,
                BS_TYPE_BF16);
    narrow_case(env, &t, BS_TYPE_F32, {1, 17, 40, 1, 30, MASK_KEYS, UNALIGNED}, 0, BS_TYPE_F16,
                BS_TYPE_F32);
    narrow_case(env, &t, BS_TYPE_F32, {1, 20, 20, 2, 200, RULE_FULL, FUSED_QKV}, 0, BS_TYPE_F32,
                BS_TYPE_F16);
    narrow_case(env, &t, BS_TYPE_F32, {1, 18, 20, 1, 161, MASK_NONE, SEPARATE}, 0, BS_TYPE_F16,
                BS_TYPE_BF16);
    narrow_case(env, &t, BS_TYPE_F32, {1, 5, 7, 1, 24, MASK_KEYS, SEPARATE}, 0, BS_TYPE_BF16,
                BS_TYPE_F32);
    narrow_case(env, &t, BS_TYPE_F32, {1, 5, 7, 1, 24, MASK_FULL, SEPARATE}, 0, BS_TYPE_F16,
                BS_TYPE_F16);
    narrow_case(env, &t, BS_TYPE_F32, {1, 5, 7, 1, 24, MASK_NONE, SEPARATE}, 0, BS_TYPE_F32,
                BS_TYPE_BF16);
    narrow_case(env, &t, BS_TYPE_F32, {1, 5, 7, 1, 24, RULE_KEYS, SEPARATE}, 0, BS_TYPE_BF16,
                BS_TYPE_F16);
    narrow_ragged(env, &t, BS_TYPE_F32, {{17, 1, 5}, {3, 40, 0}, 2, 24, RULE_KEYS}, 0, BS_TYPE_BF16,
                  BS_TYPE_F16);
    narrow_ragged(env, &t, BS_TYPE_F32, {{2, 20}, {18, 1}, 1, 32, MASK_FULL}, 0, BS_TYPE_F16,
                  BS_TYPE_F16);
    t.note += ", rule masks, constant rows, B x heads 65552, ragged batches, narrow q/k/v/o "
              "(every pair)";
    tally_report(env, t);
}

/* ---- softmax_rows (the unfused baseline) -------------------------------------------- */

template <typename T> static float round_to(float x)
{
    return (float)(T)x;
}

/* The unfused baseline of attn_cuda.cu on one case: q, k, v rounded to T,
 * S = scale q k^T per head in T (cuBLAS: FP32 sums, output T), softmax_rows
 * under emulation, o = P v (FP32 sums) into io->o.e. */
template <typename T> static void unfused(const attn_case &c, attn_io *io, const attn_args &a)
{
    int64_t lq = c.lq, lk = c.lk, hd = c.hd;
    std::vector<T> s((size_t)(c.heads * lq * lk));
    const float *q = (const float *)a.q, *k = (const float *)a.k, *v = (const float *)a.v;
    float *o = (float *)a.o;
    for (int64_t b = 0; b < c.batch; b++) {
        for (int h = 0; h < c.heads; h++)
            for (int64_t i = 0; i < lq; i++)
                for (int64_t j = 0; j < lk; j++) {
                    float dot = 0;
                    for (int64_t d = 0; d < hd; d++)
                        dot += round_to<T>(q[(b * lq + i) * a.ldq + h * hd + d]) *
                               round_to<T>(k[(b * lk + j) * a.ldk + h * hd + d]);
                    s[(size_t)((h * lq + i) * lk + j)] = (T)(a.scale * dot);
                }
        const float *mask = a.mask ? a.mask + b * a.mask_nb0 : NULL;
        emu_launch(softmax_rows<T>, dim3((unsigned)(c.heads * lq)), dim3(256), 0, s.data(), lk, lq,
                   mask, a.mask_nb1, a.mq);
        for (int h = 0; h < c.heads; h++)
            for (int64_t i = 0; i < lq; i++)
                for (int64_t d = 0; d < hd; d++) {
                    float acc = 0;
                    for (int64_t j = 0; j < lk; j++)
                        acc += (float)s[(size_t)((h * lq + i) * lk + j)] *
                               round_to<T>(v[(b * lk + j) * a.ldv + h * hd + d]);
                    o[(b * lq + i) * a.ldo + h * hd + d] = acc;
                }
    }
}

void run_softmax_rows(emu_env *env)
{
    tally t;
    t.kernel = "softmax_rows";
    t.note = "F32, BF16, F16";
    static const attn_case cases[] = {
        {2, 3, 1, 2, 16, MASK_KEYS, SEPARATE},  {2, 3, 77, 2, 16, MASK_FULL, SEPARATE},
        {1, 2, 300, 2, 8, MASK_NONE, SEPARATE}, {1, 3, 300, 1, 8, MASK_FULL, UNALIGNED},
        {8, 1, 77, 1, 16, RULE_KEYS, SEPARATE}, {1, 8, 130, 1, 8, RULE_FULL, SEPARATE},
    };
    static const enum bs_dtype dts[] = {BS_TYPE_F32, BS_TYPE_BF16, BS_TYPE_F16};
    for (enum bs_dtype dt : dts)
        for (const attn_case &c : cases) {
            attn_io io;
            attn_io_init(&io, c);
            cpu_attention(env, &io);
            attn_args a = attn_args_of(&io);
            double tol = TOL_F32;
            if (dt == BS_TYPE_F32) {
                unfused<float>(c, &io, a);
            } else if (dt == BS_TYPE_BF16) {
                unfused<__nv_bfloat16>(c, &io, a);
                tol = TOL_BF16;
            } else {
                unfused<__half>(c, &io, a);
                tol = TOL_F16;
            }
            char what[64], name[160];
            snprintf(what, sizeof(what), "softmax_rows<%s> (unfused)", bs_dtype_name(dt));
            case_name(name, sizeof(name), what, c, false);
            expect_close(env, &t, name, io.o, tol, tol, dt != BS_TYPE_F32);
        }
    const attn_case cc = {2, 3, 130, 1, 8, MASK_NONE, SEPARATE};
    const_rows_case(env, &t, "softmax_rows<F32>", cc,
                    [&](const attn_args &a) { unfused<float>(cc, NULL, a); });
    const_rows_case(env, &t, "softmax_rows<BF16>", cc,
                    [&](const attn_args &a) { unfused<__nv_bfloat16>(cc, NULL, a); });
    const_rows_case(env, &t, "softmax_rows<F16>", cc,
                    [&](const attn_args &a) { unfused<__half>(cc, NULL, a); });
    t.note += ", rule masks, constant rows";
    tally_report(env, t);
}
