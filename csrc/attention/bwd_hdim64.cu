// Backward kernels for head dims up to 64, float16 and bfloat16 (see bwd_launch.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/bwd_launch.cuh"

SPARSEK_INSTANTIATE_BWD(64);
