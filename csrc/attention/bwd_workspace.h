// The backward's own workspace (AttentionBwdParams::workspace): per-row float32 sums that
// one kernel produces and a later one reads, and the dq accumulator of the dense Hopper
// backward. Offsets in bytes, each a multiple of 256.
//   delta    [B, Hq, T]     Delta_i = <dO_i, o_i> - dlse_i          (bwd_preprocess.cu)
//   mean     [B, Hq, T]     SparseK only: mean of g_il over F_i    (dq kernel -> dk/dv kernel)
//   dq_accum                with_dq_accumulator only: float32 dq tiles (bwd_dq_accumulator.h)
#pragma once

#include <cstdint>

#include "attention/bwd_dq_accumulator.h"
#include "runtime/workspace_align.h"

namespace sparsek {

struct BwdWorkspaceLayout {
  int64_t delta_offset = 0;
  int64_t mean_offset = 0;      // == dq_accum_offset when there is no mean buffer
  int64_t dq_accum_offset = 0;  // == bytes when there is no accumulator
  int64_t bytes = 0;

  // The accumulator's tiles are padded to 128 dims: its size does not depend on the head dim.
  static BwdWorkspaceLayout make(int64_t batch, int64_t seqlen_q, int64_t heads_q,
                                 bool sparsek, bool with_dq_accumulator) {
    BwdWorkspaceLayout l;
    const int64_t rows_bytes = align256(batch * heads_q * seqlen_q * int64_t{4});
    l.delta_offset = 0;
    l.mean_offset = rows_bytes;
    l.dq_accum_offset = rows_bytes * (sparsek ? 2 : 1);
    l.bytes = l.dq_accum_offset +
              (with_dq_accumulator
                   ? align256(DqAccumulatorTiles::elems(batch, seqlen_q, heads_q) * 4)
                   : 0);
    return l;
  }

  float* delta(void* workspace) const {
    return reinterpret_cast<float*>(static_cast<char*>(workspace) + delta_offset);
  }
  float* mean(void* workspace, bool sparsek) const {
    return sparsek ? reinterpret_cast<float*>(static_cast<char*>(workspace) + mean_offset)
                   : nullptr;
  }
  float* dq_accum(void* workspace) const {
    return reinterpret_cast<float*>(static_cast<char*>(workspace) + dq_accum_offset);
  }
};

}  // namespace sparsek
