/* The CUDA device language on the host, so that the kernels of kernels/cuda
 * (the *_kernels.cuh headers, the same source nvcc compiles) run under a
 * host C++20 compiler in tests without a GPU (tests/gpu_emu). Compiled only
 * with BS_CUDA_EMU, through kernels/cuda/device.cuh; never in the module.
 *
 * A launch (emu_launch, synchronous) runs the blocks one after another, each
 * on blockDim host threads, one per CUDA thread, created for the block and
 * joined at its end; emu_launch_blocks runs only a range of the grid's
 * blocks (a grid too large to emulate whole, checked at its edges).
 * threadIdx, blockIdx, blockDim and gridDim are thread_local. Dynamic shared
 * memory (BS_DYNAMIC_SMEM) is a buffer of exactly smem_bytes per block (ASan
 * sees an overrun), filled with 0xff bytes, NaN as F32, BF16 and FP16, so
 * that reading what no thread wrote shows; static __shared__ variables
 * become function statics, the block's because one block runs at a time in
 * a process. Launches past the GPU's limits (1024 threads, grid x above
 * 2^31 - 1, y or z above 65535, more than sm_80's dynamic shared memory)
 * abort.
 *
 * __syncthreads is a barrier of the block's threads, __syncwarp one of the
 * warp's (32 consecutive linear thread indices, x fastest); a thread that
 * returns leaves both, as exited threads do on the GPU. Warp collectives
 * (the shuffles here, mma and ldmatrix in ptx_emu.h) go through the warp's
 * exchange slots (emu::collective): each lane deposits its operands in its
 * slot, warp barrier, each lane computes its own results from all the
 * slots, warp barrier again. Shuffle masks must name the whole warp (the
 * kernels use 0xffffffff). A barrier that waits more than
 * EMU_STALL_SECONDS aborts: that is a deadlock (a __syncthreads that not
 * every live thread reaches). Built with -fsanitize=thread, the harness
 * reports shared-memory races, such as a missing __syncthreads.
 *
 * The bf16/fp16 types and conversions are CUDA's own (cuda_bf16.h and
 * cuda_fp16.h define them for host compilers too); math functions are the C
 * library's, which may differ from the GPU's by an ulp or two. */
#ifndef BS_CUDA_EMU_H
#define BS_CUDA_EMU_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The qualifiers. cuda's host_defines.h already maps __global__, __device__
 * and __host__ to nothing for a host compiler, and __align__ to the aligned
 * attribute; __restrict__ is g++'s own. */
#undef __shared__
#define __shared__ static /* one block at a time: a function static is the block's */
#undef __forceinline__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define BS_DYNAMIC_SMEM(T, name) T *name = reinterpret_cast<T *>(emu::self.block->smem)

#define EMU_STALL_SECONDS    120
#define EMU_MAX_DYNAMIC_SMEM (163 * 1024) /* sm_80's opt-in maximum a block */

namespace emu
{

/* A barrier of a team that members may leave for good (drop): the count of
 * arrivals and of members in one atomic word, waiters asleep on a futex of
 * the generation (no mutex, so a release wakes each waiter once). */
class barrier
{
  public:
    explicit barrier(int n) : state_((uint64_t)n << 32)
    {
    }
    /* Arrive and wait until every member has arrived. */
    void wait()
    {
        uint32_t gen = gen_.load(std::memory_order_acquire);
        uint64_t s = state_.fetch_add(1, std::memory_order_acq_rel) + 1;
        if ((uint32_t)s == (uint32_t)(s >> 32)) {
            release(s);
            return;
        }
        auto t0 = std::chrono::steady_clock::now();
        while (gen_.load(std::memory_order_acquire) == gen) {
            struct timespec ts = {10, 0};
            syscall(SYS_futex, &gen_, FUTEX_WAIT_PRIVATE, gen, &ts, nullptr, 0);
            if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(EMU_STALL_SECONDS)) {
                fprintf(stderr,
                        "emu: a barrier waited %d s: deadlock (a __syncthreads, __syncwarp "
                        "or warp collective that not every live thread reaches)\n",
                        EMU_STALL_SECONDS);
                abort();
            }
        }
    }
    /* Leave the team (an exited thread); may complete the current phase. */
    void drop()
    {
        uint64_t s =
            state_.fetch_sub((uint64_t)1 << 32, std::memory_order_acq_rel) - ((uint64_t)1 << 32);
        if ((uint32_t)s != 0 && (uint32_t)s == (uint32_t)(s >> 32))
            release(s);
    }

  private:
    /* The last arrival: zero the arrivals (members stay) and wake the rest. */
    void release(uint64_t s)
    {
        while (
            !state_.compare_exchange_weak(s, s & ~(uint64_t)0xffffffffu, std::memory_order_acq_rel))
            ;
        gen_.fetch_add(1, std::memory_order_release);
        syscall(SYS_futex, &gen_, FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
    }
    std::atomic<uint64_t> state_; /* members << 32 | arrivals */
    std::atomic<uint32_t> gen_{0};
};

#define EMU_SLOT_BYTES 32

struct warp_state {
    explicit warp_state(int n) : bar(n), lanes(n)
    {
    }
    barrier bar;
    int lanes;                                          /* 32 but in a block's last, partial warp */
    alignas(16) unsigned char slot[32][EMU_SLOT_BYTES]; /* each lane's operands of a collective */
};

struct block_state {
    explicit block_state(int threads) : bar(threads)
    {
    }
    barrier bar;
    std::vector<std::unique_ptr<warp_state>> warps;
    unsigned char *smem = nullptr; /* dynamic shared memory */
};

/* The emulated thread running on this host thread. */
struct thread_ctx {
    block_state *block = nullptr;
    warp_state *warp = nullptr;
    int lane = 0;
};
inline thread_local thread_ctx self;

inline void fail(const char *what)
{
    fprintf(stderr, "emu: %s\n", what);
    abort();
}

/* Run body on every thread of the blocks [first, first + count) of the grid
 * (linear block index, x fastest; in order). */
inline void launch(dim3 grid, dim3 blk, size_t smem_bytes, uint64_t first, uint64_t count,
                   const std::function<void()> &body);

/* The 32 lanes' deposits of a collective: lanes[l] is lane l's. */
template <typename T> struct lanes {
    const unsigned char (*slot)[EMU_SLOT_BYTES];
    T operator[](int lane) const
    {
        T v;
        memcpy(&v, slot[lane], sizeof(T));
        return v;
    }
};

/* A warp collective: every lane deposits mine in its slot, warp barrier,
 * f(the deposits) computes this lane's result, warp barrier (so that no lane
 * writes its slot for the next collective before all have read this one).
 * A lane that has exited leaves stale bytes: undefined, as on the GPU. */
template <typename T, typename F> auto collective(const T &mine, F f)
{
    static_assert(sizeof(T) <= EMU_SLOT_BYTES && std::is_trivially_copyable_v<T>);
    warp_state &w = *self.warp;
    memcpy(w.slot[self.lane], &mine, sizeof(T));
    w.bar.wait();
    struct barrier_after { /* the second barrier, once f has returned */
        warp_state &w;
        ~barrier_after()
        {
            w.bar.wait();
        }
    } after{w};
    return f(lanes<T>{w.slot});
}

/* v of lane src(lane), for every lane of the warp at once (shuffles). */
template <typename T, typename F> T exchange(unsigned mask, T v, F src)
{
    int n = self.warp->lanes;
    if (mask != 0xffffffffu && mask != (n == 32 ? 0xffffffffu : (1u << n) - 1))
        fail("a shuffle mask that is not the whole warp is not emulated");
    return collective(v, [&](lanes<T> all) { return all[src(self.lane)]; });
}

} // namespace emu

/* ---- the built-in variables and functions ------------------------------- */

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline void __syncthreads()
{
    emu::self.block->bar.wait();
}

inline void __syncwarp(unsigned mask = 0xffffffffu)
{
    (void)mask;
    emu::self.warp->bar.wait();
}

/* Lanes outside the caller's segment of width give the caller's own value. */
template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32)
{
    return emu::exchange(mask, v, [&](int l) { return (l & ~(width - 1)) + (src & (width - 1)); });
}

template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32)
{
    return emu::exchange(mask, v, [&](int l) {
        int s = l ^ lane_mask;
        return s / width == l / width ? s : l;
    });
}

template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    return emu::exchange(mask, v, [&](int l) {
        return (l & (width - 1)) + (int)delta < width ? l + (int)delta : l;
    });
}

template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    return emu::exchange(
        mask, v, [&](int l) { return (l & (width - 1)) >= (int)delta ? l - (int)delta : l; });
}

/* Atomics (none of the kernels uses one yet). */
template <typename T> T atomicAdd(T *p, T v)
{
    return std::atomic_ref<T>(*p).fetch_add(v);
}

template <typename T> T atomicMax(T *p, T v)
{
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v))
        ;
    return old;
}

/* Fast-math intrinsics, computed exactly here. */
inline float __expf(float x)
{
    return expf(x);
}
inline float __logf(float x)
{
    return logf(x);
}
inline float __fdividef(float a, float b)
{
    return a / b;
}
inline float rsqrtf(float x)
{
    return 1.0f / sqrtf(x);
}

/* ---- launching ------------------------------------------------------------- */

inline void emu::launch(dim3 grid, dim3 blk, size_t smem_bytes, uint64_t first, uint64_t count,
                        const std::function<void()> &body)
{
    int n = (int)(blk.x * blk.y * blk.z), n_warps = (n + 31) / 32;
    uint64_t blocks = (uint64_t)grid.x * grid.y * grid.z;
    if (n < 1 || n > 1024 || blocks == 0 || grid.x > 2147483647u || grid.y > 65535 ||
        grid.z > 65535)
        fail("invalid launch configuration");
    if (first > blocks || count > blocks - first)
        fail("blocks outside the grid");
    if (smem_bytes > EMU_MAX_DYNAMIC_SMEM)
        fail("more dynamic shared memory than sm_80 gives a block (163 KiB)");
    /* exactly smem_bytes (ASan sees an overrun), 16-byte aligned like the GPU's */
    std::vector<unsigned char> smem(smem_bytes);
    for (uint64_t lin = first; lin < first + count; lin++) {
        unsigned bx = (unsigned)(lin % grid.x), by = (unsigned)(lin / grid.x % grid.y),
                 bz = (unsigned)(lin / grid.x / grid.y);
        block_state b(n);
        for (int w = 0; w < n_warps; w++)
            b.warps.push_back(std::make_unique<warp_state>(n - 32 * w < 32 ? n - 32 * w : 32));
        if (!smem.empty())
            memset(smem.data(), 0xff, smem.size());
        b.smem = smem.data();
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (int t = 0; t < n; t++)
            threads.emplace_back([&, t] {
                threadIdx = make_uint3(t % blk.x, t / blk.x % blk.y, t / (blk.x * blk.y));
                blockIdx = make_uint3(bx, by, bz);
                blockDim = blk;
                gridDim = grid;
                self = {&b, b.warps[t / 32].get(), t % 32};
                body();
                self.warp->bar.drop();
                b.bar.drop();
            });
        for (std::thread &th : threads)
            th.join();
    }
}

/* kernel<<<grid, block, smem_bytes>>>(args...), synchronously. */
template <typename... P, typename... A>
void emu_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A &&...args)
{
    static_assert(sizeof...(P) == sizeof...(A), "emu_launch: wrong number of kernel arguments");
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    emu::launch(grid, block, smem_bytes, 0, (uint64_t)grid.x * grid.y * grid.z,
                [&] { std::apply(kernel, params); });
}

/* The same launch, running only its blocks [first, first + count) (linear
 * index, x fastest): the rest of the grid does nothing. */
template <typename... P, typename... A>
void emu_launch_blocks(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes,
                       uint64_t first, uint64_t count, A &&...args)
{
    static_assert(sizeof...(P) == sizeof...(A), "emu_launch: wrong number of kernel arguments");
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    emu::launch(grid, block, smem_bytes, first, count, [&] { std::apply(kernel, params); });
}

#endif
