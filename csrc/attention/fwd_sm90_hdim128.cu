// Hopper (wgmma) forward kernels for head dims up to 128, float16 and bfloat16.
#include "attention/fwd_launch.cuh"

SPARSEK_INSTANTIATE_FWD_SM90(128);
