/* The PTX layer: every inline PTX instruction of kernels/cuda is one device
 * function here, named after the instruction; kernels use PTX only through
 * them. On the GPU each is its asm statement. Under BS_CUDA_EMU (the host
 * emulation that runs the kernels in tests/gpu_emu) emu/ptx_emu.h defines
 * the same functions on the host, written from the PTX ISA's definitions.
 *
 * Operands, per the PTX ISA ("Warp-level matrix instructions": the mma
 * m16n8k16 fragments for .f16/.bf16, ldmatrix; "cp.async"), with lane the
 * lane index, g = lane >> 2 and t = lane % 4; an .f16x2/.bf16x2 register
 * holds two elements, the lower-numbered one in its low 16 bits:
 * - mma A, 16 x 16 row-major, a[0..3] = elements a0..a7: a0,a1 (row g,
 *   columns 2t, 2t+1), a2,a3 (row g+8, same columns), a4,a5 (row g, columns
 *   2t+8, 2t+9), a6,a7 (row g+8, columns 2t+8, 2t+9).
 *   B, 16 x 8 column-major, b0 = elements b0,b1 (rows 2t, 2t+1, column g),
 *   b1 = b2,b3 (rows 2t+8, 2t+9, column g).
 *   C and D, 16 x 8 FP32: d[0],d[1] (row g, columns 2t, 2t+1), d[2],d[3]
 *   (row g+8, same columns).
 * - ldmatrix .m8n8 .b16: lanes 8m..8m+7 give the addresses of rows 0..7 of
 *   matrix m (16 bytes each, 16-byte aligned, in shared memory); register m
 *   of lane l receives row l/4, columns 2(l%4) and 2(l%4)+1 of matrix m;
 *   with .trans, of its transpose: element l/4 of rows 2(l%4) and 2(l%4)+1.
 * - cp.async.cg 16 bytes: global to shared, both 16-byte aligned; complete
 *   and visible to the issuing thread after a cp.async.wait_group that
 *   covers its group (then __syncthreads for the other threads). */
#ifndef BS_CUDA_PTX_CUH
#define BS_CUDA_PTX_CUH

#include <stdint.h>

#ifdef BS_CUDA_EMU
#include "emu/ptx_emu.h"
#else

/* The shared-state-space address of a generic pointer into shared memory. */
__device__ __forceinline__ uint32_t ptx_smem_addr(const void *p)
{
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/* mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with C = D: d += a b,
 * a 16 x 16 by 16 x 8 product for the warp, FP32 accumulation. */
__device__ __forceinline__ void ptx_mma_m16n8k16_f32_bf16(float d[4], const uint32_t a[4],
                                                          uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 with C = D: the same
 * with FP16 operands. */
__device__ __forceinline__ void ptx_mma_m16n8k16_f32_f16(float d[4], const uint32_t a[4],
                                                         uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* ldmatrix.sync.aligned.m8n8.x1.shared.b16: one 8 x 8 matrix, row
 * addresses from lanes 0-7. */
__device__ __forceinline__ void ptx_ldmatrix_x1(uint32_t (&r)[1], const void *row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(ptx_smem_addr(row))
                 : "memory");
}

/* ldmatrix.sync.aligned.m8n8.x2.shared.b16: two matrices, lanes 0-15. */
__device__ __forceinline__ void ptx_ldmatrix_x2(uint32_t (&r)[2], const void *row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(ptx_smem_addr(row))
                 : "memory");
}

/* ldmatrix.sync.aligned.m8n8.x4.shared.b16: four matrices, lanes 0-31. */
__device__ __forceinline__ void ptx_ldmatrix_x4(uint32_t (&r)[4], const void *row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(ptx_smem_addr(row))
                 : "memory");
}

/* ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16: one matrix, transposed. */
__device__ __forceinline__ void ptx_ldmatrix_x1_trans(uint32_t (&r)[1], const void *row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(ptx_smem_addr(row))
                 : "memory");
}

/* ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16: two matrices, transposed. */
__device__ __forceinline__ void ptx_ldmatrix_x2_trans(uint32_t (&r)[2], const void *row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(ptx_smem_addr(row))
                 : "memory");
}

/* ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: four matrices, transposed. */
__device__ __forceinline__ void ptx_ldmatrix_x4_trans(uint32_t (&r)[4], const void *row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(ptx_smem_addr(row))
                 : "memory");
}

/* cp.async.cg.shared.global [dst], [src], 16: starts a 16-byte copy. */
__device__ __forceinline__ void ptx_cp_async_cg16(void *dst, const void *src)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(ptx_smem_addr(dst)), "l"(src)
                 : "memory");
}

/* cp.async.cg.shared.global [dst], [src], 16, src_bytes: copies the first
 * src_bytes (0 to 16) and zero-fills the rest of the 16 (tiles' tails). */
__device__ __forceinline__ void ptx_cp_async_cg16_zfill(void *dst, const void *src, int src_bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(ptx_smem_addr(dst)),
                 "l"(src), "r"(src_bytes)
                 : "memory");
}

/* cp.async.commit_group: this thread's copies since the last commit become
 * one group. */
__device__ __forceinline__ void ptx_cp_async_commit_group()
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/* cp.async.wait_group N: waits until at most N of this thread's most recent
 * groups are pending (every older one is complete). */
template <int N> __device__ __forceinline__ void ptx_cp_async_wait_group()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#endif /* BS_CUDA_EMU */
#endif
