// Checks shared by the forward and backward dispatchers: the problem's sizes, window and the
// SparseK selection buffers, on either parameter struct (they name these fields alike).
#pragma once

#include <cstdint>
#include <string>

#include "selection/selection_params.h"

namespace sparsek {

// selection_ready: the SparseK selection's buffers are set (false only for
// attention_bwd_prepare, which runs beside the selection and reads none of them).
template <typename Params>
std::string check_problem(const Params& p, bool selection_ready = true) {
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.seqlen_k <= 0 || p.heads_q <= 0 ||
      p.heads_kv <= 0) {
    return "batch, sequence lengths and head counts must be positive";
  }
  if (p.heads_q % p.heads_kv != 0) return "heads_q must be a multiple of heads_kv";
  if (p.heads_q > 65535) return "heads_q must be at most 65535";  // a grid dimension
  if (p.head_dim % 8 != 0 || p.head_dim < 8 || p.head_dim > 256) {
    return "head_dim must be a multiple of 8 between 8 and 256, got " +
           std::to_string(p.head_dim);
  }
  // Positions are 32-bit inside the kernels.
  constexpr int64_t kMaxSeqLen = (int64_t{1} << 31) - 1024;
  if (p.seqlen_q > kMaxSeqLen || p.seqlen_k > kMaxSeqLen || p.window > kMaxSeqLen) {
    return "sequence lengths and window must be below 2^31 - 1024";
  }
  if (p.window < 0) return "window must be >= 0";
  if (p.sparsek && selection_ready) {
    if (!p.tau || !p.key_u || !p.sorted_u || !p.sorted_key || !p.plan) {
      return "SparseK mode needs the selection's tau, key_u, sorted_u, sorted_key and plan";
    }
    // (Chunks past ceil(S / kKeyChunk) would hold padding only: harmless.)
    if (p.key_chunks * SelectionTiles::kKeyChunk < p.seqlen_k ||
        p.key_chunks > SelectionTiles::kMaxChunks) {
      return "key_chunks does not match seqlen_k";
    }
  }
  if (p.sparsek) {
    // The Hopper forward's producer gathers a row at a key position times the row stride in
    // bytes, a 32 x 32 -> 64-bit multiply.
    constexpr int64_t kMaxRowStride = (int64_t{1} << 31) - 1;
    if (p.k_row_stride > kMaxRowStride || p.v_row_stride > kMaxRowStride) {
      return "SparseK needs K and V row strides below 2^31 elements";
    }
  }
  return {};
}

}  // namespace sparsek
