/* The kernels of norm_kernels.cuh under emulation against the CPU backend's
 * layer norm and group norm, launched on the entries' own plans
 * (ln_plan_make, gn_plan with an H100's 132 SMs): with and without the
 * affine and modulation parameters; rows shorter than a warp's registers
 * and up to the block's (8192), longer ones (ln_wide_kernel); rows whose
 * length is not a multiple of the 8-value chunk; aligned rows (16-byte
 * loads) and column views that are not (scalar loads); in place; x and y
 * in F32, BF16 and F16, mixed; groups split into many chunks (SD's
 * down-block-0 at batch 1, 320 channels of 64 x 64 in 32 groups; one group
 * in 78 chunks), chunks crossing channels; and values far from 0 (1000 +
 * noise), where only a stable variance keeps the tolerance.
 *
 * The reference for narrow tensors (issue 14): the narrow inputs widened to
 * F32, the CPU's F32 op, its output rounded to the output's dtype. F32
 * outputs must be within TOL_EW (atol and rtol 1e-5) of the CPU; narrow
 * outputs within TOL_EW plus 1 ulp of the output's dtype of the rounded
 * reference (F32 results within TOL_EW may round 1 ulp apart), the rest of
 * the buffer bit for bit (0 difference).
 * gn_stats_kernel's partials are also checked against a double
 * computation of each chunk's mean and sum of squared deviations. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "emu_common.h"
#include "norm_kernels.cuh"

#define CPU env->cpu.iface
#define CC  env->cpu.ctx

#define EMU_SMS 132 /* gn_plan's SM count: an H100 SXM */

/* A tensor of any activation dtype on both sides: the CPU's F32 (the
 * widened narrow values) and the kernel's in its dtype. */
struct nt {
    enum bs_dtype dt;
    std::vector<float> cbuf;
    std::vector<unsigned char> ebuf;
    struct bs_tensor c, e;
};

static void nt_init(nt *t, enum bs_dtype dt, std::initializer_list<int64_t> ne, float lo, float hi,
                    float base = 0.0f)
{
    t->dt = dt;
    t->c = bs_tensor_make(BS_TYPE_F32, (int)ne.size(), ne.begin(), NULL);
    t->e = bs_tensor_make(dt, (int)ne.size(), ne.begin(), NULL);
    size_t n = bs_tensor_nelements(&t->c);
    std::vector<float> f(n ? n : 1);
    for (size_t i = 0; i < n; i++)
        f[i] = base + frand(lo, hi);
    t->ebuf.resize((n ? n : 1) * bs_dtype_size(dt));
    bs_convert_from_f32(t->ebuf.data(), dt, f.data(), (int64_t)n);
    t->cbuf.resize(n ? n : 1);
    bs_convert_to_f32(t->cbuf.data(), t->ebuf.data(), dt, (int64_t)n);
    t->c.data = t->cbuf.data();
    t->e.data = t->ebuf.data();
}

static nt nt_cols(const nt &t, int64_t c0, int64_t n)
{
    nt v;
    v.dt = t.dt;
    v.c = bs_tensor_view_cols(&t.c, c0, n);
    v.e = bs_tensor_view_cols(&t.e, c0, n);
    return v;
}

/* An F32 parameter (gamma, beta, modulation rows): the same on both sides. */
static void par_init(nt *t, std::initializer_list<int64_t> ne, float lo, float hi)
{
    nt_init(t, BS_TYPE_F32, ne, lo, hi);
}

static const float *edata(const nt *p)
{
    return p ? (const float *)p->e.data : NULL;
}

static int64_t eld(const nt *p)
{
    return p ? bs_tensor_ld(&p->e) : 0;
}

static const struct bs_tensor *ct(const nt *p)
{
    return p ? &p->c : NULL;
}

static const char *dt_name(enum bs_dtype dt)
{
    return dt == BS_TYPE_BF16 ? "bf16" : dt == BS_TYPE_F16 ? "f16" : "f32";
}

/* Compare the whole buffer w (so that what a view leaves alone stays
 * equal): F32 within TOL_EW, narrow within TOL_EW + 1 ulp of the rounded
 * CPU value. */
static void nt_expect(emu_env *env, tally *t, const char *name, const nt &w)
{
    size_t n = w.cbuf.size();
    std::vector<float> got(n);
    bs_convert_to_f32(got.data(), w.ebuf.data(), w.dt, (int64_t)n);
    if (w.dt == BS_TYPE_F32) {
        double worst = 0, max_abs = 0;
        for (size_t i = 0; i < n; i++) {
            double d = fabs((double)got[i] - (double)w.cbuf[i]);
            double r = d == 0 ? 0 : d / (TOL_EW + TOL_EW * fabs((double)w.cbuf[i]));
            if (!(r <= worst))
                worst = isnan(r) ? INFINITY : r;
            if (d > max_abs || isnan(d))
                max_abs = d;
        }
        expect_value(env, t, name, max_abs, worst);
        return;
    }
    std::vector<uint16_t> want(n);
    bs_convert_from_f32(want.data(), w.dt, w.cbuf.data(), (int64_t)n);
    int mant = w.dt == BS_TYPE_BF16 ? 7 : 10; /* stored mantissa bits */
    double worst = 0, max_abs = 0;
    for (size_t i = 0; i < n; i++) {
        float wf;
        bs_convert_to_f32(&wf, &want[i], w.dt, 1);
        double ref = fabs((double)w.cbuf[i]);
        /* the spacing of the narrow dtype at ref (subnormal spacing below
         * its smallest normal) */
        int ex;
        frexp(ref > 0 ? ref : 1e-30, &ex);
        int lo_ex = w.dt == BS_TYPE_BF16 ? -125 : -13;
        double ulp = ldexp(1.0, (ex < lo_ex ? lo_ex : ex) - 1 - mant);
        double d = fabs((double)got[i] - (double)wf);
        double r = d == 0 ? 0 : d / (ulp + TOL_EW + TOL_EW * ref);
        if (!(r <= worst))
            worst = isnan(r) ? INFINITY : r;
        if (d > max_abs || isnan(d))
            max_abs = d;
    }
    expect_value(env, t, name, max_abs, worst);
}

/* ---- layer norm ------------------------------------------------------------ */

struct ln_case {
    const char *name;
    nt *y, *x, *gamma, *beta, *scale, *shift; /* y and x may be views of whole */
    nt *whole;                                /* the buffer compared */
    float eps;
    int64_t rows_per_sample;
};

template <typename TX, typename TY> static bool ln_run(const ln_args &a)
{
    ln_plan p = ln_plan_make(a.rows, a.d);
    if (p.wide)
        emu_launch(ln_wide_kernel<TX, TY>, p.grid, p.block, 0, a);
    else
        emu_launch(ln_kernel<TX, TY>, p.grid, p.block, 0, a);
    return p.wide;
}

typedef bool (*ln_fn)(const ln_args &);

template <typename TX> static ln_fn ln_pick_y(enum bs_dtype ty)
{
    return ty == BS_TYPE_BF16  ? ln_run<TX, __nv_bfloat16>
           : ty == BS_TYPE_F16 ? ln_run<TX, __half>
                               : ln_run<TX, float>;
}

static ln_fn ln_pick(enum bs_dtype tx, enum bs_dtype ty)
{
    return tx == BS_TYPE_BF16  ? ln_pick_y<__nv_bfloat16>(ty)
           : tx == BS_TYPE_F16 ? ln_pick_y<__half>(ty)
                               : ln_pick_y<float>(ty);
}

/* Runs the case; counts it in tw when it went wide, else in t. */
static void ln_one(emu_env *env, tally *t, tally *tw, const ln_case &n)
{
    struct bs_norm_params p = {n.eps,       ct(n.gamma),       ct(n.beta), ct(n.scale),
                               ct(n.shift), n.rows_per_sample, 0};
    struct bs_err err = {};
    check_cpu(CPU->layer_norm(CC, &n.y->c, &n.x->c, &p, &err), &err, n.name);
    /* the reference: the CPU's F32 result, rounded by nt_expect */
    int64_t rows = bs_tensor_nrows(&n.x->e), rps = n.rows_per_sample;
    int64_t ldx = bs_tensor_ld(&n.x->e), ldy = bs_tensor_ld(&n.y->e);
    struct ln_args a = {n.x->e.data,
                        n.y->e.data,
                        rows,
                        n.x->e.ne[n.x->e.n_dims - 1],
                        ldx,
                        ldy,
                        rps < 1 ? 1 : rps,
                        n.eps,
                        edata(n.gamma),
                        edata(n.beta),
                        edata(n.scale),
                        edata(n.shift),
                        eld(n.scale),
                        eld(n.shift),
                        norm_vec_ok(n.x->e.data, ldx, bs_dtype_size(n.x->dt)),
                        norm_vec_ok(n.y->e.data, ldy, bs_dtype_size(n.y->dt))};
    bool wide = ln_pick(n.x->dt, n.y->dt)(a);
    char name[160];
    snprintf(name, sizeof(name), "%s (%s -> %s%s)", n.name, dt_name(n.x->dt), dt_name(n.y->dt),
             a.vec_x ? ", 16-byte loads" : "");
    nt_expect(env, wide ? tw : t, name, *n.whole);
}

static void run_ln(emu_env *env)
{
    tally t, tw;
    t.kernel = "ln_kernel";
    tw.kernel = "ln_wide_kernel";
    const enum bs_dtype F = BS_TYPE_F32, B = BS_TYPE_BF16, H = BS_TYPE_F16;
    nt x, y, gamma, beta, scale, shift;
    nt_init(&x, F, {6, 320}, 2, 4); /* mean far from 0 */
    nt_init(&y, F, {6, 320}, -1, 1);
    par_init(&gamma, {320}, 0.5f, 1.5f);
    par_init(&beta, {320}, -0.5f, 0.5f);
    par_init(&scale, {3, 320}, -0.5f, 0.5f);
    par_init(&shift, {3, 320}, -0.5f, 0.5f);
    ln_one(
        env, &t, &tw,
        {"ln [6,320] affine + scale/shift", &y, &x, &gamma, &beta, &scale, &shift, &y, 1e-6f, 2});
    ln_one(env, &t, &tw,
           {"ln [6,320] in place, scale only", &x, &x, NULL, NULL, &scale, NULL, &x, 1e-5f, 2});
    /* 77 columns (fewer than a chunk a lane), column views of both: unaligned */
    nt w, wy;
    nt_init(&w, F, {4, 100}, -3, 3);
    nt_init(&wy, F, {4, 90}, -1, 1);
    nt wv = nt_cols(w, 10, 77), wyv = nt_cols(wy, 5, 77);
    ln_one(env, &t, &tw,
           {"ln [4,77] views, no parameters", &wyv, &wv, NULL, NULL, NULL, NULL, &wy, 1e-5f, 0});
    /* 1000 columns, in place */
    nt l, lg;
    nt_init(&l, F, {2, 1000}, -2, 5);
    par_init(&lg, {1000}, 0.5f, 1.5f);
    ln_one(env, &t, &tw,
           {"ln [2,1000] in place, gamma", &l, &l, &lg, NULL, NULL, NULL, &l, 1e-5f, 1});
    /* DiT-XL's AdaLN rows (1152, 2 samples of 16 tokens) in every dtype pair */
    nt dg, db, ds, dh;
    par_init(&dg, {1152}, 0.5f, 1.5f);
    par_init(&db, {1152}, -0.5f, 0.5f);
    par_init(&ds, {2, 1152}, -0.5f, 0.5f);
    par_init(&dh, {2, 1152}, -0.5f, 0.5f);
    for (enum bs_dtype tx : {F, B, H})
        for (enum bs_dtype ty : {F, B, H}) {
            nt dx, dy;
            nt_init(&dx, tx, {32, 1152}, -2, 3);
            nt_init(&dy, ty, {32, 1152}, -1, 1);
            ln_one(env, &t, &tw,
                   {"ln [32,1152] affine + AdaLN", &dy, &dx, &dg, &db, &ds, &dh, &dy, 1e-6f, 16});
        }
    /* in place in the narrow dtypes, modulation only */
    for (enum bs_dtype d : {B, H}) {
        nt ip;
        nt_init(&ip, d, {7, 1280}, -1, 2);
        nt ips;
        par_init(&ips, {7, 1280}, -0.5f, 0.5f);
        ln_one(env, &t, &tw,
               {"ln [7,1280] in place, scale + shift", &ip, &ip, NULL, NULL, &ips, &ips, &ip, 1e-5f,
                1});
    }
    /* the longest rows in registers (8192: 256 threads x 4 chunks), and one
     * over a chunk short of a multiple of 8 (5 rows of 1155 in rows of 1160:
     * aligned, the last chunk partial; 2 rows a block of 64 x 4 idle) */
    nt lx, ly, lgm;
    nt_init(&lx, B, {3, 8192}, -2, 2);
    nt_init(&ly, F, {3, 8192}, -1, 1);
    par_init(&lgm, {8192}, 0.5f, 1.5f);
    ln_one(env, &t, &tw, {"ln [3,8192] gamma", &ly, &lx, &lgm, NULL, NULL, NULL, &ly, 1e-6f, 1});
    nt px, py;
    nt_init(&px, F, {5, 1160}, -2, 2);
    nt_init(&py, H, {5, 1160}, -1, 1);
    nt pxv = nt_cols(px, 0, 1155), pyv = nt_cols(py, 0, 1155);
    ln_one(
        env, &t, &tw,
        {"ln [5,1155] views of rows of 1160", &pyv, &pxv, NULL, NULL, NULL, NULL, &py, 1e-5f, 1});
    /* unaligned views in 16 bits (column 3: 6 bytes in) */
    nt ux, uy;
    nt_init(&ux, H, {6, 700}, -2, 2);
    nt_init(&uy, B, {6, 700}, -1, 1);
    nt uxv = nt_cols(ux, 3, 640), uyv = nt_cols(uy, 1, 640);
    ln_one(env, &t, &tw,
           {"ln [6,640] unaligned views", &uyv, &uxv, NULL, NULL, NULL, NULL, &uy, 1e-5f, 1});
    /* mean >> std: 1000 + U(-1, 1); a variance from E[x^2] - E[x]^2 in F32
     * would be off by far more than the tolerance */
    nt mx, my;
    nt_init(&mx, F, {4, 1280}, -1, 1, 1000.0f);
    nt_init(&my, F, {4, 1280}, -1, 1);
    ln_one(env, &t, &tw,
           {"ln [4,1280] 1000 + noise", &my, &mx, NULL, NULL, NULL, NULL, &my, 1e-6f, 1});
    /* wide rows (past LN_MAX_D): F32, and F16 -> BF16 in a view */
    nt vx, vy, vg;
    nt_init(&vx, F, {2, 9000}, -1, 3, 100.0f);
    nt_init(&vy, F, {2, 9000}, -1, 1);
    par_init(&vg, {9000}, 0.5f, 1.5f);
    ln_one(env, &t, &tw,
           {"ln [2,9000] gamma, 100 + noise", &vy, &vx, &vg, NULL, NULL, NULL, &vy, 1e-6f, 1});
    nt zx, zy;
    nt_init(&zx, H, {1, 20001}, -2, 2);
    nt_init(&zy, B, {1, 20003}, -1, 1);
    nt zyv = nt_cols(zy, 2, 20001);
    ln_one(env, &t, &tw, {"ln [1,20001] view", &zyv, &zx, NULL, NULL, NULL, NULL, &zy, 1e-5f, 1});
    t.note = "rows of 77 to 8192 in registers, F32/BF16/F16 in and out";
    tw.note = "rows of 9000 and 20001";
    tally_report(env, t);
    tally_report(env, tw);
}

/* ---- group norm --------------------------------------------------------- */

struct gn_case {
    const char *name;
    nt *y, *x, *gamma, *beta, *scale, *shift;
    float eps;
    int groups;
    int sms = EMU_SMS; /* gn_plan's SM count */
};

template <typename TX, typename TY> static void gn_run(const gn_args &a, unsigned blocks)
{
    emu_launch(gn_stats_kernel<TX>, dim3(blocks), dim3(NORM_THREADS), 0, a);
    emu_launch(gn_norm_kernel<TX, TY>, dim3(blocks), dim3(NORM_THREADS), 0, a);
}

typedef void (*gn_fn)(const gn_args &, unsigned);

template <typename TX> static gn_fn gn_pick_y(enum bs_dtype ty)
{
    return ty == BS_TYPE_BF16  ? gn_run<TX, __nv_bfloat16>
           : ty == BS_TYPE_F16 ? gn_run<TX, __half>
                               : gn_run<TX, float>;
}

static gn_fn gn_pick(enum bs_dtype tx, enum bs_dtype ty)
{
    return tx == BS_TYPE_BF16  ? gn_pick_y<__nv_bfloat16>(ty)
           : tx == BS_TYPE_F16 ? gn_pick_y<__half>(ty)
                               : gn_pick_y<float>(ty);
}

/* gn_stats_kernel's partials against each chunk's mean and sum of squared
 * deviations in double, from x before the op: share of 1e-6 x (|mean| +
 * std) and 1e-5 relative. */
static double gn_part_share(const gn_args &a, const std::vector<float> &x0, int64_t groups_total)
{
    double worst = 0;
    for (int64_t g = 0; g < groups_total; g++)
        for (int64_t k = 0; k < a.chunks; k++) {
            int64_t c0 = k * a.chunk, len = a.n - c0 < a.chunk ? a.n - c0 : a.chunk;
            const float *p = x0.data() + g * a.n + c0;
            double s = 0, m2 = 0;
            for (int64_t i = 0; i < len; i++)
                s += p[i];
            double mean = s / (double)len;
            for (int64_t i = 0; i < len; i++)
                m2 += ((double)p[i] - mean) * ((double)p[i] - mean);
            const double *got = a.part + 2 * (g * a.chunks + k);
            double sd = sqrt(m2 / (double)len);
            double r1 = fabs(got[0] - mean) / (1e-6 * (fabs(mean) + sd) + 1e-30);
            double r2 = fabs(got[1] - m2) / (1e-5 * m2 + 1e-30);
            worst = fmax(worst, fmax(r1, r2));
        }
    return worst;
}

static void gn_one(emu_env *env, tally *t, tally *ts, const gn_case &n)
{
    std::vector<float> x0 = n.x->cbuf; /* before an in-place op */
    struct bs_norm_params p = {n.eps,       ct(n.gamma), ct(n.beta), ct(n.scale),
                               ct(n.shift), 0,           n.groups};
    struct bs_err err = {};
    check_cpu(CPU->group_norm(CC, &n.y->c, &n.x->c, &p, &err), &err, n.name);
    int64_t bsz = n.x->e.ne[0], ch = n.x->e.ne[1], s = bs_tensor_nelements(&n.x->e) / (bsz * ch);
    int64_t gn = ch / n.groups * s;
    struct gn_args a = {n.x->e.data,
                        n.y->e.data,
                        ch,
                        s,
                        n.groups,
                        gn,
                        0,
                        0,
                        n.eps,
                        edata(n.gamma),
                        edata(n.beta),
                        edata(n.scale),
                        edata(n.shift),
                        eld(n.scale),
                        eld(n.shift),
                        NULL,
                        norm_vec_ok(n.x->e.data, gn, bs_dtype_size(n.x->dt)),
                        norm_vec_ok(n.y->e.data, gn, bs_dtype_size(n.y->dt))};
    gn_plan(&a, bsz, n.sms);
    unsigned blocks = (unsigned)(bsz * n.groups * a.chunks);
    std::vector<double> part(2 * (size_t)blocks, NAN);
    a.part = part.data();
    gn_pick(n.x->dt, n.y->dt)(a, blocks);
    char name[160];
    snprintf(name, sizeof(name), "%s (%s -> %s, %u blocks of chunks of %lld%s)", n.name,
             dt_name(n.x->dt), dt_name(n.y->dt), blocks, (long long)a.chunk,
             a.vec_x ? ", 16-byte loads" : "");
    nt_expect(env, t, name, *n.y);
    expect_value(env, ts, name, 0, gn_part_share(a, x0, bsz * n.groups));
}

static void run_gn(emu_env *env)
{
    tally t, ts;
    t.kernel = "gn_norm_kernel";
    ts.kernel = "gn_stats_kernel";
    const enum bs_dtype F = BS_TYPE_F32, B = BS_TYPE_BF16, H = BS_TYPE_F16;
    nt x, y, gamma, beta, scale, shift;
    nt_init(&x, F, {2, 16, 37}, -2, 3);
    nt_init(&y, F, {2, 16, 37}, -1, 1);
    par_init(&gamma, {16}, 0.5f, 1.5f);
    par_init(&beta, {16}, -0.5f, 0.5f);
    par_init(&scale, {2, 16}, -0.5f, 0.5f);
    par_init(&shift, {2, 16}, -0.5f, 0.5f);
    gn_one(
        env, &t, &ts,
        {"gn [2,16,37] /4, affine + scale/shift", &y, &x, &gamma, &beta, &scale, &shift, 1e-5f, 4});
    /* 4 channels x 1100 a group: several chunks */
    nt v, vy;
    nt_init(&v, F, {1, 8, 1100}, -3, 3);
    nt_init(&vy, F, {1, 8, 1100}, -1, 1);
    gn_one(env, &t, &ts, {"gn [1,8,1100] /2", &vy, &v, NULL, NULL, NULL, NULL, 1e-6f, 2});
    /* in place, 20 values a group (chunks of 8 cross channels), shift only */
    nt sx, s_shift;
    nt_init(&sx, F, {1, 12, 5}, 1, 2);
    par_init(&s_shift, {1, 12}, -0.5f, 0.5f);
    gn_one(env, &t, &ts,
           {"gn [1,12,5] /3 in place, shift", &sx, &sx, NULL, NULL, NULL, &s_shift, 1e-5f, 3});
    /* SD down-block-0 at batch 1: 320 x 64 x 64 in 32 groups, affine; on
     * an H100 33 chunks a group (1056 blocks), here planned for 16 SMs: 10
     * chunks (the registers' least), a third of the emulation time */
    nt dx, dy, dg, db;
    nt_init(&dx, F, {1, 320, 4096}, -2, 3);
    nt_init(&dy, B, {1, 320, 4096}, -1, 1);
    par_init(&dg, {320}, 0.5f, 1.5f);
    par_init(&db, {320}, -0.5f, 0.5f);
    gn_one(env, &t, &ts,
           {"gn [1,320,4096] /32, affine", &dy, &dx, &dg, &db, NULL, NULL, 1e-5f, 32, 16});
    /* one group of 40000: 78 chunks, more partials than a warp's lanes */
    nt ax, ay;
    nt_init(&ax, H, {1, 2, 20000}, -2, 3, 5.0f);
    nt_init(&ay, F, {1, 2, 20000}, -1, 1);
    gn_one(env, &t, &ts, {"gn [1,2,20000] /1", &ay, &ax, NULL, NULL, NULL, NULL, 1e-5f, 1});
    /* every dtype pair, batch 2 with modulation, chunks of 8 crossing
     * channels (100 values a channel) */
    nt mg, mb, ms, mh;
    par_init(&mg, {32}, 0.5f, 1.5f);
    par_init(&mb, {32}, -0.5f, 0.5f);
    par_init(&ms, {2, 32}, -0.5f, 0.5f);
    par_init(&mh, {2, 32}, -0.5f, 0.5f);
    for (enum bs_dtype tx : {F, B, H})
        for (enum bs_dtype ty : {F, B, H}) {
            nt mx, my;
            nt_init(&mx, tx, {2, 32, 100}, -2, 3);
            nt_init(&my, ty, {2, 32, 100}, -1, 1);
            gn_one(env, &t, &ts,
                   {"gn [2,32,100] /8, affine + mod", &my, &mx, &mg, &mb, &ms, &mh, 1e-5f, 8});
        }
    /* several chunks a group, chunks crossing channels (250 a channel) */
    nt kg, kb, ks, kh;
    par_init(&kg, {64}, 0.5f, 1.5f);
    par_init(&kb, {64}, -0.5f, 0.5f);
    par_init(&ks, {2, 64}, -0.5f, 0.5f);
    par_init(&kh, {2, 64}, -0.5f, 0.5f);
    for (enum bs_dtype d : {F, B}) {
        nt kx, ky;
        nt_init(&kx, d, {2, 64, 250}, -2, 3);
        nt_init(&ky, d, {2, 64, 250}, -1, 1);
        gn_one(env, &t, &ts,
               {"gn [2,64,250] /8, affine + mod", &ky, &kx, &kg, &kb, &ks, &kh, 1e-5f, 8});
    }
    /* in place in 16 bits, groups of 2997 (not a multiple of 8: scalar loads) */
    nt g30, g96;
    par_init(&g30, {30}, 0.5f, 1.5f);
    par_init(&g96, {96}, 0.5f, 1.5f);
    for (enum bs_dtype d : {B, H}) {
        nt ip;
        nt_init(&ip, d, {1, 30, 999}, -1, 2);
        gn_one(env, &t, &ts,
               {"gn [1,30,999] /10 in place", &ip, &ip, &g30, NULL, NULL, NULL, 1e-5f, 10});
    }
    /* mean >> std, many chunks */
    nt fx, fy;
    nt_init(&fx, F, {1, 32, 1024}, -1, 1, 1000.0f);
    nt_init(&fy, F, {1, 32, 1024}, -1, 1);
    gn_one(env, &t, &ts,
           {"gn [1,32,1024] /16, 1000 + noise", &fy, &fx, NULL, NULL, NULL, NULL, 1e-6f, 16});
    /* spatial 1 (every value its own channel) */
    nt ox, oy;
    nt_init(&ox, F, {3, 96, 1}, -2, 2);
    nt_init(&oy, H, {3, 96, 1}, -1, 1);
    gn_one(env, &t, &ts, {"gn [3,96,1] /4", &oy, &ox, &g96, NULL, NULL, NULL, 1e-5f, 4});
    t.note = "groups of 20 to 40960 values in up to 78 chunks, F32/BF16/F16 in and out";
    ts.note = "chunk means and squared deviations vs double";
    tally_report(env, ts);
    tally_report(env, t);
}

void run_norm(emu_env *env)
{
    run_ln(env);
    run_gn(env);
}
