// Hopper (wgmma) backward kernels for head dims up to 128, float16 and bfloat16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/bwd_launch.cuh"

SPARSEK_INSTANTIATE_BWD_SM90(128);
