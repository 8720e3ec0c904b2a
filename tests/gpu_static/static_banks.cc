/* A model of shared-memory bank conflicts for the kernels' shared-memory
 * accesses, and the claims the comments make about them (label gpu_static).
 *
 * The hardware model (sm_80, sm_90): 32 banks of 4 bytes. A warp's access
 * is served in phases: all 32 lanes for accesses up to 4 bytes, 16 lanes
 * (half-warps) for 8-byte accesses, 8 lanes (quarter-warps) for 16-byte
 * ones. Within a phase, lanes reading or writing the same 4-byte word share
 * it (a 16-bit access by two lanes to the two halves of one word is no
 * conflict); distinct words in one bank are served one after another. A
 * request's degree is the most distinct words any bank holds in any phase:
 * 1 is conflict-free, n is n-way. Lanes the loop leaves idle (a tile's last
 * iteration) take no part.
 *
 * The addresses are the kernels' own index expressions, written out here
 * with the kernels' own constants (mma_smem, MMA_BK, MMA_MASK_LD, TR_TILE
 * from the headers): attn_mma's cp.async stores of the Q, K and V tiles
 * (16 bytes: phases of 8 lanes) and of the mask tile, its plain mask
 * stores, its ldmatrix reads of Q, K and V (an x4 is 32 row addresses of
 * 16 bytes, one 8 x 8 matrix a phase of 8 lanes) and its float2 mask
 * reads; transpose_kernel's tile store and load. Each (access, padded head
 * dim, warp count) gets the worst degree over every request of every warp,
 * and the wavefronts (shared-memory cycles: the sum of the degrees of a
 * request's phases) of the inner loop per HMMA, beside those of the kernel
 * before the rebuild (old_mma), which the same model measures.
 *
 * usage: gpu_static_banks
 * Prints the table (worst and mean degree), the wavefronts per HMMA ("perf
 * ..." lines, which tests/gpu_static/static_perf.py reads), then one line
 * per claim ("claim ...: ok" or "FAIL"); exits 1 if a claim does not hold.
 * The claims are those of the comments in kernels/cuda/attn_kernels.cuh
 * (MMA_PAD, mma_smem, mma_copy_tile, MMA_MASK_LD), kernels/cuda/README.md
 * (fused attention) and kernels/cuda/ops_kernels.cuh (transpose_kernel):
 * change them together. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "attn_kernels.cuh"
#include "ops_kernels.cuh"

#define BANKS      32
#define BANK_BYTES 4

/* One lane's access in a warp-wide request: byte offset in shared memory. */
struct lane_access {
    int lane;
    int64_t byte;
};

/* The degree of one request of `bytes`-wide accesses (see the top). */
static int request_degree(const std::vector<lane_access> &req, int bytes)
{
    int per_phase = bytes <= 4 ? 32 : 32 * 4 / bytes;
    int worst = 0;
    for (int p0 = 0; p0 < 32; p0 += per_phase) {
        std::set<int64_t> words[BANKS];
        for (const lane_access &a : req) {
            if (a.lane < p0 || a.lane >= p0 + per_phase)
                continue;
            for (int64_t w = a.byte / BANK_BYTES; w <= (a.byte + bytes - 1) / BANK_BYTES; w++)
                words[w % BANKS].insert(w);
        }
        for (const std::set<int64_t> &s : words)
            worst = std::max(worst, (int)s.size());
    }
    return worst;
}

/* The model on textbook cases: lane i at byte i * stride, `bytes` wide. */
static int model_selftest(void)
{
    static const struct {
        int bytes, stride, degree;
    } cases[] = {
        {4, 4, 1},   {4, 0, 1},   {4, 8, 2},   {4, 128, 32}, {4, 132, 1}, /* 32-bit */
        {2, 2, 1},   {2, 4, 1},   {2, 64, 16},                            /* 16-bit: shared words */
        {8, 8, 1},   {8, 16, 2},  {8, 0, 1},                              /* 64-bit: half-warps */
        {16, 16, 1}, {16, 32, 2}, /* 128-bit: quarter-warps */
    };
    int bad = 0;
    for (const auto &c : cases) {
        std::vector<lane_access> req;
        for (int lane = 0; lane < 32; lane++)
            req.push_back({lane, (int64_t)lane * c.stride});
        int d = request_degree(req, c.bytes);
        if (d != c.degree) {
            printf("FAIL: model: %d-byte accesses %d bytes apart: %d-way, expected %d-way\n",
                   c.bytes, c.stride, d, c.degree);
            bad++;
        }
    }
    return bad;
}

/* Every request an access pattern makes: `emit` is called with each. */
using request_fn = std::function<void(const std::vector<lane_access> &)>;

/* Wavefronts of one request: the shared-memory cycles it takes, the sum
 * over its phases (that have lanes) of the phase's degree. */
static int request_wavefronts(const std::vector<lane_access> &req, int bytes)
{
    int per_phase = bytes <= 4 ? 32 : 32 * 4 / bytes, total = 0;
    for (int p0 = 0; p0 < 32; p0 += per_phase) {
        std::vector<lane_access> ph;
        for (const lane_access &a : req)
            if (a.lane >= p0 && a.lane < p0 + per_phase)
                ph.push_back(a);
        if (!ph.empty())
            total += request_degree(ph, bytes);
    }
    return total;
}

struct stats {
    int requests = 0, worst = 0;
    double sum = 0, wavefronts = 0;
    void add(int d, int w)
    {
        requests++;
        worst = std::max(worst, d);
        sum += d;
        wavefronts += w;
    }
};

/* ---- attn_mma (the kernel of attn_kernels.cuh) ------------------------------ */

/* Its accesses; what each measures in its name. Per key tile: the K and V
 * tiles' cp.async stores and the ldmatrix reads of K and V by every warp
 * (the inner loop); the mask tile's stores and float2 reads (a mask); once
 * per block: Q's cp.async stores and ldmatrix reads. */
enum mma_access {
    KV_CPASYNC, /* mma_copy_tile of a K or V tile: 16 B at r * LD + c * 8 */
    Q_CPASYNC,  /* mma_copy_tile of the Q tile (BQ rows) */
    Q_LDSM,     /* ldmatrix.x4 of the Q fragments */
    K_LDSM,     /* ldmatrix.x4 of K's B fragments */
    V_LDSM,     /* ldmatrix.x4.trans of V's B fragments */
    M_CPASYNC,  /* mma_copy_mask, cp.async path, [B, Lq, Lk] (BQ rows) */
    M_STORE,    /* mma_copy_mask, plain 4-byte stores, [B, Lq, Lk] */
    M_READ,     /* mma_tile's float2 mask reads, [B, Lq, Lk] */
    N_MMA_ACCESS
};

static const char *const mma_access_names[] = {
    "K/V tile cp.async (16 B)",
    "Q tile cp.async (16 B)",
    "Q ldmatrix.x4",
    "K ldmatrix.x4",
    "V ldmatrix.x4.trans",
    "mask cp.async (16 B)",
    "mask store (4 B)",
    "mask float2 read (8 B)",
};

static const int mma_access_bytes[] = {16, 16, 16, 16, 16, 16, 4, 8};

/* The requests of mma_copy_tile<T, DP, WARPS, ROWS>: warp w's instruction i
 * copies rows (item % RB) * 16 + rsub, chunk (item / RB) * 2 + csub. */
template <int DP, int WARPS> static void copy_tile(int rows, const request_fn &emit)
{
    using S = mma_smem<DP, WARPS>;
    const int RB = rows / 16, CP = S::C / 2, items = RB * CP, per = (items + WARPS - 1) / WARPS;
    for (int w = 0; w < WARPS; w++)
        for (int i = 0; i < per; i++) {
            int item = w + i * WARPS;
            if (item >= items)
                break;
            std::vector<lane_access> req;
            for (int lane = 0; lane < 32; lane++) {
                int rsub = ((lane >> 4) << 3) + (lane & 7), csub = (lane >> 3) & 1;
                int r = (item % RB) * 16 + rsub, c = (item / RB) * 2 + csub;
                req.push_back({lane, 2 * ((int64_t)r * S::LD + c * 8)});
            }
            emit(req);
        }
}

/* One ldmatrix.x4: lane l gives the row address row(l) (element offset). */
static void ldsm(const std::function<int64_t(int)> &row, const request_fn &emit)
{
    std::vector<lane_access> req;
    for (int lane = 0; lane < 32; lane++)
        req.push_back({lane, 2 * row(lane)});
    emit(req);
}

template <int DP, int WARPS> static stats mma_pattern(mma_access acc)
{
    using S = mma_smem<DP, WARPS>;
    constexpr int KS = DP / 16, NT = MMA_BK / 8, DT = DP / 8, LD = S::LD;
    stats st;
    request_fn emit = [&](const std::vector<lane_access> &r) {
        st.add(request_degree(r, mma_access_bytes[acc]),
               request_wavefronts(r, mma_access_bytes[acc]));
    };
    switch (acc) {
    case KV_CPASYNC:
        copy_tile<DP, WARPS>(MMA_BK, emit);
        break;
    case Q_CPASYNC:
        copy_tile<DP, WARPS>(S::BQ, emit);
        break;
    case Q_LDSM: /* qs + (warp * 16 + (m & 1) * 8 + (l & 7)) * LD + (m >> 1) * 8 + kk * 16 */
        for (int w = 0; w < WARPS; w++)
            for (int kk = 0; kk < KS; kk++)
                ldsm(
                    [&](int l) {
                        int m = l >> 3;
                        return (int64_t)(w * 16 + (m & 1) * 8 + (l & 7)) * LD + (m >> 1) * 8 +
                               kk * 16;
                    },
                    emit);
        break;
    case K_LDSM: /* koff + np * 16 * LD + kk * 16, koff = ((m >> 1) * 8 + (l & 7)) * LD + (m & 1) *
                    8 */
        for (int w = 0; w < WARPS; w++)
            for (int kk = 0; kk < KS; kk++)
                for (int np = 0; np < NT / 2; np++)
                    ldsm(
                        [&](int l) {
                            int m = l >> 3;
                            return (int64_t)((m >> 1) * 8 + (l & 7)) * LD + (m & 1) * 8 +
                                   np * 16 * LD + kk * 16;
                        },
                        emit);
        break;
    case V_LDSM: /* voff + j * 16 * LD + ip * 16, voff = ((m & 1) * 8 + (l & 7)) * LD + (m >> 1) * 8
                  */
        for (int w = 0; w < WARPS; w++)
            for (int j = 0; j < MMA_BK / 16; j++)
                for (int ip = 0; ip < DT / 2; ip++)
                    ldsm(
                        [&](int l) {
                            int m = l >> 3;
                            return (int64_t)((m & 1) * 8 + (l & 7)) * LD + (m >> 1) * 8 +
                                   j * 16 * LD + ip * 16;
                        },
                        emit);
        break;
    case M_CPASYNC: /* e = tid + i * THREADS < BQ * 16: row e >> 4, keys (e & 15) * 4 */
    case M_STORE:   /* e < BQ * 64: row e >> 6, key e & 63 */
    {
        const bool vec = acc == M_CPASYNC;
        const int n = S::BQ * (vec ? 16 : 64);
        for (int base = 0; base < n; base += S::THREADS)
            for (int w0 = 0; w0 < S::THREADS; w0 += 32) {
                std::vector<lane_access> req;
                for (int lane = 0; lane < 32; lane++) {
                    int e = base + w0 + lane;
                    if (e >= n)
                        continue;
                    int r = vec ? e >> 4 : e >> 6, c = vec ? (e & 15) * 4 : e & 63;
                    req.push_back({lane, 4 * ((int64_t)r * MMA_MASK_LD + c)});
                }
                if (!req.empty())
                    emit(req);
            }
        break;
    }
    case M_READ: /* rows warp * 16 + g and + 8, keys n * 8 + 2t */
        for (int w = 0; w < WARPS; w++)
            for (int n = 0; n < NT; n++)
                for (int hi = 0; hi < 2; hi++) {
                    std::vector<lane_access> req;
                    for (int lane = 0; lane < 32; lane++) {
                        int g = lane >> 2, t = lane & 3;
                        req.push_back({lane, 4 * ((int64_t)(w * 16 + g + 8 * hi) * MMA_MASK_LD +
                                                  n * 8 + 2 * t)});
                    }
                    emit(req);
                }
        break;
    default:
        break;
    }
    return st;
}

/* HMMAs (mma.m16n8k16) of a block per key tile: each warp KS x NT for the
 * scores and 4 x DT for P V. */
static int mma_hmma_per_tile(int dp, int warps)
{
    return warps * ((dp / 16) * (MMA_BK / 8) + (MMA_BK / 16) * (dp / 8));
}

/* ---- the kernel before the rebuild (issue 14, item 2), as a baseline ------------- */

/* attn_mma as it was (commit f13fbe3): F32 tiles rounded to T by the
 * threads into Qs and Ks (row stride DP + 8, 8-byte stores on its float4
 * path) and a transposed Vt (row stride 72, 16-bit stores), every fragment
 * a 32-bit ld.shared (Q's reloaded every tile). Its inner loop per tile:
 * the K and V^T stores and the Q, K and V fragment loads. Kept here, with
 * its constants, so that the figures it had are measured by the same model
 * as the new kernel's. */
namespace old_mma
{
template <int DP, int WARPS> static stats per_tile(void)
{
    const int threads = 32 * WARPS, qk_ld = DP + 8, vt_ld = 64 + 8, DV = DP / 4;
    const int KS = DP / 16, NT = 8, DT = DP / 8;
    stats st;
    auto emit_b = [&](int bytes) {
        return [&st, bytes](const std::vector<lane_access> &r) {
            st.add(request_degree(r, bytes), request_wavefronts(r, bytes));
        };
    };
    auto loop = [&](int n, const std::function<int64_t(int)> &at, int bytes) {
        request_fn e = emit_b(bytes);
        for (int base = 0; base < n; base += threads)
            for (int w0 = 0; w0 < threads; w0 += 32) {
                std::vector<lane_access> req;
                for (int lane = 0; lane < 32; lane++)
                    if (base + w0 + lane < n)
                        req.push_back({lane, at(base + w0 + lane)});
                if (!req.empty())
                    e(req);
            }
    };
    /* K: uint2 at r * qk_ld + d; V^T: four 16-bit stores at (d + i) * vt_ld + r */
    loop(
        64 * DV, [&](int e) { return (int64_t)2 * ((e / DV) * qk_ld + (e % DV) * 4); }, 8);
    for (int i = 0; i < 4; i++)
        loop(
            64 * DV, [&](int e) { return (int64_t)2 * (((e % DV) * 4 + i) * vt_ld + e / DV); }, 2);
    request_fn e4 = emit_b(4);
    auto frag = [&](int64_t base, int ld) {
        std::vector<lane_access> req;
        for (int lane = 0; lane < 32; lane++)
            req.push_back({lane, 2 * (base + (int64_t)(lane >> 2) * ld + 2 * (lane & 3))});
        e4(req);
    };
    for (int w = 0; w < WARPS; w++) {
        for (int kk = 0; kk < KS; kk++) {
            for (int off : {0, 8 * qk_ld, 8, 8 * qk_ld + 8})
                frag((int64_t)w * 16 * qk_ld + kk * 16 + off, qk_ld);
            for (int n = 0; n < NT; n++)
                for (int off : {0, 8})
                    frag((int64_t)n * 8 * qk_ld + kk * 16 + off, qk_ld);
        }
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < DT; i++)
                for (int off : {0, 8})
                    frag((int64_t)i * 8 * vt_ld + j * 16 + off, vt_ld);
    }
    return st;
}
} // namespace old_mma

/* The instances attn_cuda.cu launches: every padded head dim with 4 warps,
 * those up to 80 with 8 (launch_mma). */
struct mma_instance {
    int dp, warps;
    stats (*pattern)(mma_access);
    stats (*old_tile)(void);
};
static const mma_instance mma_instances[] = {
    {32, 4, mma_pattern<32, 4>, old_mma::per_tile<32, 4>},
    {48, 4, mma_pattern<48, 4>, old_mma::per_tile<48, 4>},
    {64, 4, mma_pattern<64, 4>, old_mma::per_tile<64, 4>},
    {80, 4, mma_pattern<80, 4>, old_mma::per_tile<80, 4>},
    {128, 4, mma_pattern<128, 4>, old_mma::per_tile<128, 4>},
    {160, 4, mma_pattern<160, 4>, old_mma::per_tile<160, 4>},
    {32, 8, mma_pattern<32, 8>, old_mma::per_tile<32, 8>},
    {48, 8, mma_pattern<48, 8>, old_mma::per_tile<48, 8>},
    {64, 8, mma_pattern<64, 8>, old_mma::per_tile<64, 8>},
    {80, 8, mma_pattern<80, 8>, old_mma::per_tile<80, 8>},
};
#define N_MMA_INSTANCES ((int)(sizeof(mma_instances) / sizeof(mma_instances[0])))

/* transpose_kernel: block (TR_TILE, 8), warps of 32 consecutive linear
 * thread indices (x fastest); tile[i][tx] stored for i = ty, ty + 8, ...,
 * then tile[tx][i] loaded. Row stride TR_TILE + 1 floats. */
static stats transpose_pattern(bool load)
{
    const int bx = TR_TILE, by = 8, ld = TR_TILE + 1;
    stats st;
    for (int w0 = 0; w0 < bx * by; w0 += 32)
        for (int k = 0; k < TR_TILE / by; k++) {
            std::vector<lane_access> req;
            for (int lane = 0; lane < 32; lane++) {
                int tid = w0 + lane, tx = tid % bx, ty = tid / bx, i = ty + k * by;
                req.push_back({lane, 4 * (int64_t)(load ? tx * ld + i : i * ld + tx)});
            }
            st.add(request_degree(req, 4), request_wavefronts(req, 4));
        }
    return st;
}

/* ---- claims ---------------------------------------------------------------- */

/* Every attn_mma access is conflict-free (degree 1) for every instance:
 * what kernels/cuda/README.md (fused attention) and the comments of
 * MMA_PAD, mma_smem, mma_copy_tile and MMA_MASK_LD in attn_kernels.cuh
 * state. */
static const int claimed[N_MMA_ACCESS] = {1, 1, 1, 1, 1, 1, 1, 1};

/* Wavefronts per HMMA of the inner loop (no mask: K and V cp.async stores
 * and ldmatrix reads of a tile over its HMMAs), at most (measured: 2.5 at 4
 * warps, 2.25 at 8, every DP; 4.75 to 10.5 before the rebuild). 2 is the
 * floor of an m16n8k16 whose B operand (two 8 x 8 matrices, 256 bytes)
 * comes from shared memory for every HMMA, as here; the tile's stores add
 * 2 x 64 x DP x 2 bytes over the block's 16 x WARPS x DP / 2 HMMAs (0.5 at
 * 4 warps, 0.25 at 8). Fewer needs B fragments shared by more rows per
 * warp (32, FlashAttention-2's layout) or wgmma on sm_90. */
#define WAVEFRONTS_PER_HMMA_MAX 2.5

static int failures = 0;

static void claim(bool ok, const std::string &what, const std::string &detail)
{
    printf("claim %s: %s%s\n", what.c_str(), ok ? "ok" : "FAIL", detail.c_str());
    if (!ok)
        failures++;
}

static void check_claims(stats table[][N_MMA_ACCESS], const double *wf)
{
    for (int a = 0; a < N_MMA_ACCESS; a++) {
        std::string bad;
        for (int i = 0; i < N_MMA_INSTANCES; i++)
            if (table[i][a].worst != claimed[a])
                bad += " DP " + std::to_string(mma_instances[i].dp) + "/" +
                       std::to_string(mma_instances[i].warps) + " warps is " +
                       std::to_string(table[i][a].worst) + "-way;";
        claim(bad.empty(),
              std::string("attn_mma ") + mma_access_names[a] + " conflict-free (degree " +
                  std::to_string(claimed[a]) + ") at every DP and warp count",
              bad);
    }
    std::string bad;
    for (int i = 0; i < N_MMA_INSTANCES; i++)
        if (wf[i] > WAVEFRONTS_PER_HMMA_MAX)
            bad += " DP " + std::to_string(mma_instances[i].dp) + "/" +
                   std::to_string(mma_instances[i].warps) + " warps: " + std::to_string(wf[i]) +
                   ";";
    char what[120];
    snprintf(what, sizeof(what),
             "attn_mma inner loop at most %.2f shared-memory wavefronts per HMMA",
             WAVEFRONTS_PER_HMMA_MAX);
    claim(bad.empty(), what, bad);
    stats ts = transpose_pattern(false), tl = transpose_pattern(true);
    claim(ts.worst == 1 && tl.worst == 1, "transpose_kernel's padded tile is conflict-free",
          ts.worst == 1 && tl.worst == 1 ? ""
                                         : " store " + std::to_string(ts.worst) + "-way, load " +
                                               std::to_string(tl.worst) + "-way");
}

int main(void)
{
    if (model_selftest() != 0)
        return 1;
    static stats table[N_MMA_INSTANCES][N_MMA_ACCESS];
    for (int i = 0; i < N_MMA_INSTANCES; i++)
        for (int a = 0; a < N_MMA_ACCESS; a++)
            table[i][a] = mma_instances[i].pattern((mma_access)a);

    printf("shared-memory bank conflicts: worst degree of a warp's request (mean over its "
           "requests); 1 = conflict-free\n");
    printf("%-30s", "attn_mma<T, DP, WARPS> DP/WARPS");
    for (int i = 0; i < N_MMA_INSTANCES; i++)
        printf(" %9s",
               (std::to_string(mma_instances[i].dp) + "/" + std::to_string(mma_instances[i].warps))
                   .c_str());
    printf("\n");
    for (int a = 0; a < N_MMA_ACCESS; a++) {
        printf("%-30s", mma_access_names[a]);
        for (int i = 0; i < N_MMA_INSTANCES; i++) {
            const stats &s = table[i][a];
            printf(" %2d (%4.1f)", s.worst, s.sum / s.requests);
        }
        printf("\n");
    }
    /* The inner loop's wavefronts per HMMA, per key tile of a block: new
     * (no mask; with a mask [B, Lq, Lk] on the cp.async path) and old. */
    double wf[N_MMA_INSTANCES];
    printf("inner loop, shared-memory wavefronts per HMMA (per key tile of a block):\n");
    for (int i = 0; i < N_MMA_INSTANCES; i++) {
        const mma_instance &in = mma_instances[i];
        double h = mma_hmma_per_tile(in.dp, in.warps);
        double nomask = (2 * table[i][KV_CPASYNC].wavefronts + table[i][K_LDSM].wavefronts +
                         table[i][V_LDSM].wavefronts) /
                        h;
        double masked = nomask + (table[i][M_CPASYNC].wavefronts + table[i][M_READ].wavefronts) / h;
        stats old = in.old_tile();
        double oldw = old.wavefronts / h;
        wf[i] = nomask;
        printf("perf attn_mma DP%d/%dw: wavefronts_per_hmma %.3f (mask [B,Lq,Lk] %.3f; before the "
               "rebuild %.3f, worst conflict %d-way)\n",
               in.dp, in.warps, nomask, masked, oldw, old.worst);
    }
    stats ts = transpose_pattern(false), tl = transpose_pattern(true);
    printf("transpose_kernel: tile store %d, tile load %d\n", ts.worst, tl.worst);

    check_claims(table, wf);
    printf("%s\n", failures ? "FAIL: a comment's claim does not hold (correct the claim here and "
                              "in the comments, or the kernel)"
                            : "every claim holds");
    return failures ? 1 : 0;
}
