/* A test kernel for every function of the PTX layer (kernels/cuda/ptx.cuh),
 * written once: emu_ptx.cc runs it under emulation, and ptx_check.cu
 * compiles it with nvcc so that ptxas checks each asm statement for the
 * module's architectures (the module's kernels use only the mma so far).
 *
 * One warp: A (16 x 16, row-major and transposed), B (16 x 8, as [k][n] and
 * as B^T [n][k]) reach shared memory by cp.async, in two groups; a 16-byte
 * zero-filled copy too. The fragments of A and B are loaded by ldmatrix in
 * every form that yields them: A by .x4 from A and by .x4.trans from A^T,
 * its first register by .x1; B by .x2 from B^T and by .x2.trans from B, its
 * first register by .x1.trans. The forms must agree (mismatches counts the
 * registers that do not), and D = A B + C by the mma must be the product:
 * the mma's fragments and ldmatrix's, both as the ISA defines them, are
 * made to fit each other, so either one wrong shows. */
#ifndef BS_GPU_EMU_PTX_KERNELS_CUH
#define BS_GPU_EMU_PTX_KERNELS_CUH

#include "device.cuh"

struct ptx_chain_args {
    const void *a, *at;      /* A and A^T, 16 x 16 row-major */
    const void *b, *bt;      /* B [k][n] 16 x 8 and B^T [n][k] 8 x 16 */
    const float *c;          /* C, 16 x 8 */
    float *d;                /* D = A B + C, 16 x 8 */
    const void *tail;        /* 16 bytes (16-byte aligned) */
    unsigned char *tail_out; /* its first tail_bytes, then zeros */
    int tail_bytes;
    int *mismatches;
};

__device__ __forceinline__ void chain_mma(const __nv_bfloat16 *, float d[4], const uint32_t a[4],
                                          const uint32_t b[2])
{
    ptx_mma_m16n8k16_f32_bf16(d, a, b[0], b[1]);
}

__device__ __forceinline__ void chain_mma(const __half *, float d[4], const uint32_t a[4],
                                          const uint32_t b[2])
{
    ptx_mma_m16n8k16_f32_f16(d, a, b[0], b[1]);
}

template <typename T> __global__ void ptx_chain(struct ptx_chain_args p)
{
    __shared__ __align__(16) T as[16 * 16];
    __shared__ __align__(16) T ats[16 * 16];
    __shared__ __align__(16) T bs[16 * 8];
    __shared__ __align__(16) T bts[8 * 16];
    __shared__ __align__(16) unsigned char tail[16];
    const int l = threadIdx.x, g = l >> 2, t = l & 3;

    ptx_cp_async_cg16(as + 8 * l, (const T *)p.a + 8 * l); /* 8 elements = 16 bytes */
    ptx_cp_async_cg16(ats + 8 * l, (const T *)p.at + 8 * l);
    ptx_cp_async_commit_group();
    if (l < 16)
        ptx_cp_async_cg16(bs + 8 * l, (const T *)p.b + 8 * l);
    else
        ptx_cp_async_cg16(bts + 8 * (l - 16), (const T *)p.bt + 8 * (l - 16));
    if (l == 0)
        ptx_cp_async_cg16_zfill(tail, p.tail, p.tail_bytes);
    ptx_cp_async_commit_group();

    ptx_cp_async_wait_group<1>(); /* A's group is complete, B's may not be */
    __syncwarp();
    uint32_t a4[4], a1[1], at4[4];
    ptx_ldmatrix_x4(a4, as + (l % 16) * 16 + (l / 16) * 8);
    ptx_ldmatrix_x1(a1, as + (l % 8) * 16);
    ptx_ldmatrix_x4_trans(at4, ats + ((l % 8) + 8 * (l / 16)) * 16 + 8 * ((l / 8) % 2));

    ptx_cp_async_wait_group<0>();
    __syncwarp();
    uint32_t b2[2], b2t[2], b1t[1];
    ptx_ldmatrix_x2(b2, bts + (l % 8) * 16 + 8 * ((l / 8) % 2));
    ptx_ldmatrix_x2_trans(b2t, bs + (l % 16) * 8);
    ptx_ldmatrix_x1_trans(b1t, bs + (l % 8) * 8);

    int bad = (a1[0] != a4[0]) + (b2t[0] != b2[0]) + (b2t[1] != b2[1]) + (b1t[0] != b2[0]);
    for (int i = 0; i < 4; i++)
        bad += at4[i] != a4[i];
    float acc[4];
    for (int i = 0; i < 4; i++)
        acc[i] = p.c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    chain_mma(as, acc, a4, b2);
    for (int i = 0; i < 4; i++)
        p.d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
    atomicAdd(p.mismatches, bad);
    if (l < 16)
        p.tail_out[l] = tail[l];
}

#endif
