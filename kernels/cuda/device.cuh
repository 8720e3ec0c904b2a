/* What the kernel headers of kernels/cuda (attn_kernels.cuh, ops_kernels.cuh)
 * include first. Each kernel is written once, in those headers, and
 * compiles two ways: with nvcc for the GPU (through the .cu files), and with
 * a host C++ compiler under BS_CUDA_EMU, where emu/cuda_emu.h supplies the
 * device language (threads, shared memory, barriers, shuffles) so that
 * tests/gpu_emu runs the kernels on the CPU. Both get the 16-bit float types
 * (cuda_bf16.h, cuda_fp16.h) and the PTX layer (ptx.cuh). */
#ifndef BS_CUDA_DEVICE_CUH
#define BS_CUDA_DEVICE_CUH

#ifdef BS_CUDA_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
/* The block's dynamic shared memory as T name[], 16-byte aligned (a macro:
 * the emulation has no extern __shared__). */
#define BS_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) T name[]
#endif

#include "ptx.cuh"

#endif
