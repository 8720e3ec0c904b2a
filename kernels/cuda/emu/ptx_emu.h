/* The PTX layer of kernels/cuda/ptx.cuh on the host (BS_CUDA_EMU): the same
 * functions, each written from the instruction's definition in the PTX ISA
 * (sections "Matrix Fragments for mma.m16n8k16 with floating point type",
 * "Warp-level matrix load instruction: ldmatrix" and "Data Movement and
 * Conversion Instructions: cp.async"), not from the kernels' use of them.
 *
 * Warp-collective instructions (mma, ldmatrix) go through the warp's
 * exchange (emu::collective, cuda_emu.h): every lane deposits its operands,
 * warp barrier, each lane computes its own results from all of them, warp
 * barrier.
 *
 * BS_PTX_EMU_MUTANT builds a deliberately wrong mma (A registers 1 and 2
 * swapped): tests/gpu_emu checks that the attention test then fails. */
#ifndef BS_CUDA_PTX_EMU_H
#define BS_CUDA_PTX_EMU_H

#include <deque>
#include <vector>

namespace ptx_emu
{

/* mma.m16n8k16, .f16/.bf16 operands: the row and column of element i of
 * lane l's fragment, as the ISA gives them (groupID = l >> 2,
 * threadID_in_group = l % 4). A: a0..a7; B: b0..b3; C and D: c0..c3. */
inline int a_row(int l, int i)
{
    return (l >> 2) + (i < 2 || (4 <= i && i < 6) ? 0 : 8);
}
inline int a_col(int l, int i)
{
    return (l % 4) * 2 + (i & 1) + (i < 4 ? 0 : 8);
}
inline int b_row(int l, int i)
{
    return (l % 4) * 2 + (i & 1) + (i < 2 ? 0 : 8);
}
inline int b_col(int l, int)
{
    return l >> 2;
}
inline int c_row(int l, int i)
{
    return (l >> 2) + (i < 2 ? 0 : 8);
}
inline int c_col(int l, int i)
{
    return (l % 4) * 2 + (i & 1);
}

/* Element i of a fragment of 16-bit elements: two to a 32-bit register,
 * "low to high", so register i / 2, bits 16 (i % 2) up. */
inline uint16_t elem16(const uint32_t *regs, int i)
{
    return (uint16_t)(regs[i / 2] >> (16 * (i % 2)));
}

inline float bf16_value(uint16_t bits)
{
    __nv_bfloat16_raw r;
    r.x = bits;
    return __bfloat162float(__nv_bfloat16(r));
}

inline float f16_value(uint16_t bits)
{
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
}

struct mma_operands {
    uint32_t a[4], b[2];
};

/* d += a b for the warp. Products of 16-bit values are exact in FP32; the
 * sum of each output is taken in double and rounded once (the hardware's
 * order and intermediate rounding are unspecified). */
template <float (*VALUE)(uint16_t)>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
#ifdef BS_PTX_EMU_MUTANT
    const mma_operands mine = {{a[0], a[2], a[1], a[3]}, {b0, b1}};
#else
    const mma_operands mine = {{a[0], a[1], a[2], a[3]}, {b0, b1}};
#endif
    int l = emu::self.lane;
    emu::collective(mine, [&](emu::lanes<mma_operands> all) {
        float am[16][16], bm[16][8];
        for (int j = 0; j < 32; j++) {
            mma_operands o = all[j];
            for (int i = 0; i < 8; i++)
                am[a_row(j, i)][a_col(j, i)] = VALUE(elem16(o.a, i));
            for (int i = 0; i < 4; i++)
                bm[b_row(j, i)][b_col(j, i)] = VALUE(elem16(o.b, i));
        }
        for (int i = 0; i < 4; i++) { /* c_i and d_i are the same element */
            double s = d[i];
            for (int k = 0; k < 16; k++)
                s += (double)am[c_row(l, i)][k] * bm[k][c_col(l, i)];
            d[i] = (float)s;
        }
    });
}

/* ldmatrix.m8n8.xN{.trans}.b16: lanes 8m..8m+7 hold the row addresses of
 * matrix m; lane l receives in register m elements (row l >> 2, columns
 * 2 (l % 4) and 2 (l % 4) + 1), the first in the low half. ".trans: the
 * matrix is loaded in column-major format": element (r, c) is then element
 * r of address c. */
template <int N, bool TRANS> inline void ldmatrix(uint32_t (&r)[N], const void *row)
{
    if ((uintptr_t)row % 16 != 0)
        emu::fail("ldmatrix: a row address not 16-byte aligned");
    int l = emu::self.lane;
    emu::collective(row, [&](emu::lanes<const void *> rows) {
        for (int m = 0; m < N; m++) {
            uint32_t v = 0;
            for (int j = 0; j < 2; j++) {
                int rr = l >> 2, cc = 2 * (l % 4) + j;
                const uint16_t *p = TRANS ? (const uint16_t *)rows[8 * m + cc] + rr
                                          : (const uint16_t *)rows[8 * m + rr] + cc;
                uint16_t e;
                memcpy(&e, p, 2);
                v |= (uint32_t)e << (16 * j);
            }
            r[m] = v;
        }
    });
}

/* cp.async: this thread's copies not yet committed, and its committed
 * groups, oldest first. A copy is carried out when a wait_group completes
 * its group (the latest the ISA allows), so a kernel that reads before it
 * waits sees the old bytes. */
struct copy {
    void *dst;
    const void *src;
    int src_bytes;
};
inline thread_local std::vector<copy> uncommitted;
inline thread_local std::deque<std::vector<copy>> groups;

inline void cp_async(void *dst, const void *src, int src_bytes)
{
    if ((uintptr_t)dst % 16 != 0 || (uintptr_t)src % 16 != 0 || src_bytes < 0 || src_bytes > 16)
        emu::fail("cp.async: an address not 16-byte aligned or src_bytes outside 0..16");
    uncommitted.push_back({dst, src, src_bytes});
}

inline void cp_async_wait(size_t n)
{
    for (; groups.size() > n; groups.pop_front())
        for (const copy &c : groups.front()) {
            if (c.src_bytes > 0)
                memcpy(c.dst, c.src, (size_t)c.src_bytes);
            memset((char *)c.dst + c.src_bytes, 0, (size_t)(16 - c.src_bytes));
        }
}

} // namespace ptx_emu

inline void ptx_mma_m16n8k16_f32_bf16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    ptx_emu::mma_m16n8k16<ptx_emu::bf16_value>(d, a, b0, b1);
}

inline void ptx_mma_m16n8k16_f32_f16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    ptx_emu::mma_m16n8k16<ptx_emu::f16_value>(d, a, b0, b1);
}

inline void ptx_ldmatrix_x1(uint32_t (&r)[1], const void *row)
{
    ptx_emu::ldmatrix<1, false>(r, row);
}
inline void ptx_ldmatrix_x2(uint32_t (&r)[2], const void *row)
{
    ptx_emu::ldmatrix<2, false>(r, row);
}
inline void ptx_ldmatrix_x4(uint32_t (&r)[4], const void *row)
{
    ptx_emu::ldmatrix<4, false>(r, row);
}
inline void ptx_ldmatrix_x1_trans(uint32_t (&r)[1], const void *row)
{
    ptx_emu::ldmatrix<1, true>(r, row);
}
inline void ptx_ldmatrix_x2_trans(uint32_t (&r)[2], const void *row)
{
    ptx_emu::ldmatrix<2, true>(r, row);
}
inline void ptx_ldmatrix_x4_trans(uint32_t (&r)[4], const void *row)
{
    ptx_emu::ldmatrix<4, true>(r, row);
}

inline void ptx_cp_async_cg16(void *dst, const void *src)
{
    ptx_emu::cp_async(dst, src, 16);
}

inline void ptx_cp_async_cg16_zfill(void *dst, const void *src, int src_bytes)
{
    ptx_emu::cp_async(dst, src, src_bytes);
}

inline void ptx_cp_async_commit_group()
{
    ptx_emu::groups.push_back(std::move(ptx_emu::uncommitted));
    ptx_emu::uncommitted.clear();
}

template <int N> inline void ptx_cp_async_wait_group()
{
    ptx_emu::cp_async_wait(N);
}

#endif
