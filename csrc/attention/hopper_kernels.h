// Where the Hopper (wgmma) kernels run: the forward's (fwd_kernel_sm90.cuh) and the
// backward's (bwd_*_kernel_sm90.cuh), one decision for both dispatchers and for the kernel
// names reported to Python.
#pragma once

#include <cstdint>
#include <string>

namespace sparsek {

// Sets `runs` when the current device has compute capability 9.0, this build holds sm_90a
// code and 64 < head_dim <= 128. D = 256 accumulators do not fit a warpgroup's registers; at
// D <= 64 the forward's 128-row CTAs, one per SM, lost to the mma.sync kernel's three per SM
// on the small seed config (bench/NOTES.md, "Hopper forward kernel"). Returns the failed CUDA
// call's message, if any.
std::string hopper_kernels_run(int64_t head_dim, bool& runs);

// Throws `error` as std::runtime_error when it is non-empty (a failed CUDA call's message),
// clearing CUDA's last error first, for the Python-facing reports below.
void throw_if_error(const std::string& error);

// The name a dispatcher's choice is reported by ("sm90_wgmma" or "mma_sync"), for the
// Python-facing forward_kernel_name and backward_kernel_name; a failed CUDA call's message
// (`error`, non-empty) is thrown as std::runtime_error instead.
std::string kernel_name(const std::string& error, bool hopper);

}  // namespace sparsek
