// Converting the row bands' float32 dk and dv accumulators into dk and dv
// (bwd_kv_accumulator.h): a bandwidth-bound pass, 8 dims a thread (two 16-byte loads from
// each accumulator, one 16-byte store to each result).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "attention/bwd_kv_accumulator.h"
#include "attention/sm80_instructions.cuh"
#include "runtime/cuda_check.h"

namespace sparsek {
namespace {

constexpr int kConvertThreads = 256;

// One thread per 8 consecutive elements (the head dim is a multiple of 8: check_problem).
template <typename Element>
__global__ void __launch_bounds__(kConvertThreads)
    store_kv_kernel(const float* __restrict__ dk_accum, const float* __restrict__ dv_accum,
                    Element* __restrict__ dk, Element* __restrict__ dv, int64_t chunks,
                    float scale) {
  for (int64_t c = blockIdx.x * int64_t{kConvertThreads} + threadIdx.x; c < chunks;
       c += int64_t{gridDim.x} * kConvertThreads) {
    const float4* k4 = reinterpret_cast<const float4*>(dk_accum) + 2 * c;
    const float4* v4 = reinterpret_cast<const float4*>(dv_accum) + 2 * c;
    const float4 k0 = k4[0], k1 = k4[1], v0 = v4[0], v1 = v4[1];
    uint4 k_out, v_out;
    k_out.x = sm80::pack2<Element>(k0.x * scale, k0.y * scale);
    k_out.y = sm80::pack2<Element>(k0.z * scale, k0.w * scale);
    k_out.z = sm80::pack2<Element>(k1.x * scale, k1.y * scale);
    k_out.w = sm80::pack2<Element>(k1.z * scale, k1.w * scale);
    v_out.x = sm80::pack2<Element>(v0.x, v0.y);
    v_out.y = sm80::pack2<Element>(v0.z, v0.w);
    v_out.z = sm80::pack2<Element>(v1.x, v1.y);
    v_out.w = sm80::pack2<Element>(v1.z, v1.w);
    reinterpret_cast<uint4*>(dk)[c] = k_out;
    reinterpret_cast<uint4*>(dv)[c] = v_out;
  }
}

template <typename Element>
std::string launch_store(const AttentionBwdParams& p, cudaStream_t stream) {
  const int64_t chunks =
      KvAccumulator::elems(p.batch, p.seqlen_k, p.heads_kv, p.head_dim) / 8;
  if (chunks == 0) return {};
  const int64_t blocks = std::min<int64_t>((chunks + kConvertThreads - 1) / kConvertThreads,
                                           int64_t{1} << 20);
  store_kv_kernel<Element><<<static_cast<unsigned>(blocks), kConvertThreads, 0, stream>>>(
      p.dk_accum, p.dv_accum, static_cast<Element*>(p.dk), static_cast<Element*>(p.dv),
      chunks, p.scale);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

}  // namespace

std::string store_kv_from_accumulators(const AttentionBwdParams& p, cudaStream_t stream) {
  if (p.dtype == DType::kBFloat16) return launch_store<__nv_bfloat16>(p, stream);
  return launch_store<__half>(p, stream);
}

}  // namespace sparsek
