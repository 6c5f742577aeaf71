// A second stream beside the caller's, for work that depends on nothing the caller's stream
// runs meanwhile: the SparseK backward sorts its keys (latency-bound, on a few dozen SMs) on it
// while the caller's stream computes Delta and zeroes the dq accumulator (bandwidth-bound),
// and finishes du on it while dq is converted.
//
// The side stream has the device's greatest priority: the block scheduler then gives its
// kernels the SMs first as blocks retire, and the caller's bandwidth-bound grids fill the
// rest. At normal priority the two streams' kernels took the SMs in turn and the sort's chain
// ended about when it would have on one stream (bench/NOTES.md, twentieth session: the
// SparseK backward at 32k 1.2% / 1.9% slower at normal priority, sigma 1 / 4).
//
// fork_side_stream: *side runs after everything issued to `main` so far.
// join_side_stream: what is issued to `main` next runs after everything issued to `side`.
// Each host thread keeps one side stream and one event per device (created on first use,
// never destroyed). An event is recorded and waited on by the same thread
// at once, so that callers on other threads never wait on each other's records.
// JAX_SPARSEK_SIDE_STREAM=0 (read at every call) makes *side the caller's stream itself:
// nothing overlaps, as before the side stream.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

namespace sparsek {

std::string fork_side_stream(cudaStream_t main, cudaStream_t* side);
std::string join_side_stream(cudaStream_t main, cudaStream_t side);

}  // namespace sparsek
