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
 * with the kernels' own constants (mma_smem, MMA_BK, TR_TILE from the
 * headers): attn_mma's load_tile stores of Q and K (row-major) and of V
 * (transposed), on its float4 path (8-byte and 16-bit stores) and its
 * scalar path (16-bit stores), and its 32-bit mma fragment loads of Q, K
 * and Vt; transpose_kernel's tile store and load. Each (access, padded head
 * dim, warp count) gets the worst degree over every request of every warp.
 *
 * usage: gpu_static_banks
 * Prints the table (worst and mean degree), then one line per claim ("claim ...: ok" or "FAIL");
 * exits 1 if a claim does not hold. The claims are those of the comments in
 * kernels/cuda/attn_kernels.cuh (MMA_PAD, load_tile), kernels/cuda/README.md
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

struct stats {
    int requests = 0, worst = 0;
    double sum = 0;
    void add(int d)
    {
        requests++;
        worst = std::max(worst, d);
        sum += d;
    }
};

/* load_tile's element loop, one warp's request per (warp, iteration):
 * e = threadIdx.x + it * THREADS over [0, n); at(e, lane) gives the byte. */
static void tile_loop(int threads, int n, const std::function<int64_t(int)> &at,
                      const request_fn &emit)
{
    for (int base = 0; base < n; base += threads)
        for (int w0 = 0; w0 < threads; w0 += 32) {
            std::vector<lane_access> req;
            for (int lane = 0; lane < 32; lane++)
                if (base + w0 + lane < n)
                    req.push_back({lane, at(base + w0 + lane)});
            if (!req.empty())
                emit(req);
        }
}

/* The patterns of attn_mma<T, DP, WARPS>; what each measures in its name. */
enum mma_access {
    Q_STORE_VEC, /* load_tile<..., TR=false> float4 path: uint2 (8 B) at r * QK_LD + d */
    Q_STORE_SCALAR,
    K_STORE_VEC,
    K_STORE_SCALAR,
    VT_STORE_VEC, /* TR=true float4 path: four 16-bit stores at (d + i) * VT_LD + r */
    VT_STORE_SCALAR,
    Q_FRAG,  /* ld32 of the A fragments from Qs */
    K_FRAG,  /* ld32 of the B fragments from Ks */
    VT_FRAG, /* ld32 of the B fragments from Vt */
    N_MMA_ACCESS
};

static const char *const mma_access_names[] = {
    "Q store, float4 path (8 B)", "Q store, scalar path (2 B)",   "K store, float4 path (8 B)",
    "K store, scalar path (2 B)", "V^T store, float4 path (2 B)", "V^T store, scalar path (2 B)",
    "Q fragment load (4 B)",      "K fragment load (4 B)",        "V^T fragment load (4 B)",
};

static const int mma_access_bytes[] = {8, 2, 8, 2, 2, 2, 4, 4, 4};

/* load_tile<T, DP, ROWS, THREADS, TR>(dst, dst_ld, ...) for the pattern. */
template <int DP, int THREADS>
static void mma_tile_store(int rows, int dst_ld, bool tr, bool vec, const request_fn &emit)
{
    const int es = 2; /* sizeof(T): bf16 and fp16 */
    if (vec) {
        constexpr int DV = DP / 4;
        for (int i = 0; i < (tr ? 4 : 1); i++)
            tile_loop(
                THREADS, rows * DV,
                [&](int e) {
                    int r = e / DV, d = (e % DV) * 4;
                    return (int64_t)es *
                           (tr ? (int64_t)(d + i) * dst_ld + r : (int64_t)r * dst_ld + d);
                },
                emit);
        return;
    }
    tile_loop(
        THREADS, rows * DP,
        [&](int e) {
            int r = e / DP, d = e % DP;
            return (int64_t)es * (tr ? (int64_t)d * dst_ld + r : (int64_t)r * dst_ld + d);
        },
        emit);
}

/* The fragment loads of one warp: base element offsets, lane by lane. */
static void frag_request(int64_t base_elems, int ld, const request_fn &emit)
{
    std::vector<lane_access> req;
    for (int lane = 0; lane < 32; lane++) {
        int g = lane >> 2, t = lane & 3;
        req.push_back({lane, 2 * (base_elems + (int64_t)g * ld + 2 * t)});
    }
    emit(req);
}

template <int DP, int WARPS> static stats mma_pattern(mma_access acc)
{
    using S = mma_smem<DP, WARPS>;
    constexpr int KS = DP / 16, NT = MMA_BK / 8, DT = DP / 8;
    stats st;
    request_fn emit = [&](const std::vector<lane_access> &r) {
        st.add(request_degree(r, mma_access_bytes[acc]));
    };
    switch (acc) {
    case Q_STORE_VEC:
    case Q_STORE_SCALAR:
        mma_tile_store<DP, S::THREADS>(S::BQ, S::QK_LD, false, acc == Q_STORE_VEC, emit);
        break;
    case K_STORE_VEC:
    case K_STORE_SCALAR:
        mma_tile_store<DP, S::THREADS>(MMA_BK, S::QK_LD, false, acc == K_STORE_VEC, emit);
        break;
    case VT_STORE_VEC:
    case VT_STORE_SCALAR:
        mma_tile_store<DP, S::THREADS>(MMA_BK, S::VT_LD, true, acc == VT_STORE_VEC, emit);
        break;
    case Q_FRAG: /* qr = qs + r0 * QK_LD + kk * 16 + 2t; +8 rows, +8 columns */
        for (int w = 0; w < WARPS; w++)
            for (int kk = 0; kk < KS; kk++)
                for (int off : {0, 8 * S::QK_LD, 8, 8 * S::QK_LD + 8})
                    frag_request((int64_t)w * 16 * S::QK_LD + kk * 16 + off, S::QK_LD, emit);
        break;
    case K_FRAG: /* kr = ks + (n * 8 + g) * QK_LD + kk * 16 + 2t; +8 columns */
        for (int kk = 0; kk < KS; kk++)
            for (int n = 0; n < NT; n++)
                for (int off : {0, 8})
                    frag_request((int64_t)n * 8 * S::QK_LD + kk * 16 + off, S::QK_LD, emit);
        break;
    case VT_FRAG: /* vr = vt + (i * 8 + g) * VT_LD + j * 16 + 2t; +8 columns */
        for (int j = 0; j < MMA_BK / 16; j++)
            for (int i = 0; i < DT; i++)
                for (int off : {0, 8})
                    frag_request((int64_t)i * 8 * S::VT_LD + j * 16 + off, S::VT_LD, emit);
        break;
    default:
        break;
    }
    return st;
}

/* The instances attn_cuda.cu launches: every padded head dim with 4 warps,
 * those up to 80 with 8 (launch_mma). */
struct mma_instance {
    int dp, warps;
    stats (*pattern)(mma_access);
};
static const mma_instance mma_instances[] = {
    {32, 4, mma_pattern<32, 4>}, {48, 4, mma_pattern<48, 4>},   {64, 4, mma_pattern<64, 4>},
    {80, 4, mma_pattern<80, 4>}, {128, 4, mma_pattern<128, 4>}, {160, 4, mma_pattern<160, 4>},
    {32, 8, mma_pattern<32, 8>}, {48, 8, mma_pattern<48, 8>},   {64, 8, mma_pattern<64, 8>},
    {80, 8, mma_pattern<80, 8>},
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
            st.add(request_degree(req, 4));
        }
    return st;
}

/* ---- claims ---------------------------------------------------------------- */

/* The worst degree of each attn_mma access by padded head dim (32, 48, 64,
 * 80, 128, 160), the same for 4 and 8 warps: what kernels/cuda/README.md
 * (fused attention) and the comments of MMA_PAD and load_tile in
 * attn_kernels.cuh state. */
static const int claimed_dps[] = {32, 48, 64, 80, 128, 160};
static const int claimed[N_MMA_ACCESS][6] = {
    {2, 2, 1, 2, 1, 2},    /* Q store, float4: a half-warp's 8-byte stores span two rows */
    {1, 1, 1, 1, 1, 1},    /* Q store, scalar */
    {2, 2, 1, 2, 1, 2},    /* K store, float4 */
    {1, 1, 1, 1, 1, 1},    /* K store, scalar */
    {4, 6, 8, 10, 16, 16}, /* V^T store, float4 */
    {4, 4, 4, 4, 4, 4},    /* V^T store, scalar */
    {1, 1, 1, 1, 1, 1},    /* fragment loads: conflict-free */
    {1, 1, 1, 1, 1, 1},    {1, 1, 1, 1, 1, 1},
};

static int failures = 0;

static void claim(bool ok, const std::string &what, const std::string &detail)
{
    printf("claim %s: %s%s\n", what.c_str(), ok ? "ok" : "FAIL", detail.c_str());
    if (!ok)
        failures++;
}

static void check_claims(stats table[][N_MMA_ACCESS])
{
    for (int a = 0; a < N_MMA_ACCESS; a++) {
        std::string said, bad;
        for (int k = 0; k < 6; k++)
            said += (k ? ", " : "") + std::to_string(claimed[a][k]);
        for (int i = 0; i < N_MMA_INSTANCES; i++) {
            int k = 0;
            while (k < 6 && claimed_dps[k] != mma_instances[i].dp)
                k++;
            int got = table[i][a].worst, want = k < 6 ? claimed[a][k] : -1;
            if (got != want)
                bad += " DP " + std::to_string(mma_instances[i].dp) + "/" +
                       std::to_string(mma_instances[i].warps) + " warps is " + std::to_string(got) +
                       "-way, claimed " + std::to_string(want) + ";";
        }
        claim(bad.empty(), std::string("attn_mma ") + mma_access_names[a] + " worst degree " + said,
              bad);
    }
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
    stats ts = transpose_pattern(false), tl = transpose_pattern(true);
    printf("transpose_kernel: tile store %d, tile load %d\n", ts.worst, tl.worst);

    check_claims(table);
    printf("%s\n", failures ? "FAIL: a comment's claim does not hold (correct the claim here and "
                              "in the comments, or the kernel)"
                            : "every claim holds");
    return failures ? 1 : 0;
}
