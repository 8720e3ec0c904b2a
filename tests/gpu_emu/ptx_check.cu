/* ptx_kernels.cuh compiled by nvcc for the module's architectures, so that
 * ptxas checks every asm statement of kernels/cuda/ptx.cuh, including those
 * no kernel of the module uses yet (a GPU run of it is for later). */
#include "ptx_kernels.cuh"

template __global__ void ptx_chain<__nv_bfloat16>(struct ptx_chain_args p);
template __global__ void ptx_chain<__half>(struct ptx_chain_args p);
