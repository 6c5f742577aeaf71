// The backward's own workspace (AttentionBwdParams::workspace): per-row float32 sums that
// one kernel produces and a later one reads, and the dq accumulator of the Hopper backward
// that fuses dq into dk/dv. Offsets in bytes, each a multiple of 256.
//   delta        [B, Hq, T]       Delta_i = <dO_i, o_i> - dlse_i        (bwd_preprocess.cu)
//   mean         [B, Hq, T]       SparseK only: the mean of g_il over F_i (dq kernel ->
//                                 dk/dv kernel); with the dq accumulator, the sum of g_il
//                                 over F_i instead (dk/dv kernel -> bwd_sparsek_du.h)
//   row_edges    [B, Hkv, T + 1]  SparseK with the accumulator: int32 ends of the keys'
//                                 intervals of fractional rows (bwd_sparsek_du.h)
//   mean_prefix  [B, Hkv, T + 1]  SparseK with the accumulator: float64 prefix sums of the
//                                 group's row means (bwd_sparsek_du.h)
//   segment_totals                SparseK with the accumulator: per (B, Hkv) and segment of
//                                 MeanPrefixSegments::kRows rows, the float64 sum of its
//                                 means, then the int32 sum of its row edges
//   dq_accum                      with_dq_accumulator only: float32 dq tiles
//                                 (bwd_dq_accumulator.h)
//   dk_accum, dv_accum            SparseK with the accumulator: float32 [B, S, Hkv, D] each,
//                                 for row bands (bwd_kv_accumulator.h)
#pragma once

#include <cstdint>

#include "attention/bwd_dq_accumulator.h"
#include "attention/bwd_kv_accumulator.h"
#include "runtime/workspace_align.h"

namespace sparsek {

// One call's buffers in the workspace (null where the call has none).
struct BwdRowBuffers {
  float* delta = nullptr;
  float* mean = nullptr;          // SparseK: the means (dq kernel) or row sums (dq fused)
  float* dq_accum = nullptr;      // the dk/dv kernel adds dq
  int32_t* row_edges = nullptr;   // SparseK with dq_accum
  double* mean_prefix = nullptr;  // SparseK with dq_accum
  double* segment_mean_totals = nullptr;    // SparseK with dq_accum
  int32_t* segment_count_totals = nullptr;  // SparseK with dq_accum
};

// The rows of a (batch, kv head) are scanned in segments of kRows, one CTA each
// (bwd_sparsek_du.cu), so that the scan uses the whole GPU instead of B x Hkv CTAs.
struct MeanPrefixSegments {
  static constexpr int kRows = 1024;
  static int64_t count(int64_t seqlen_q) { return (seqlen_q + kRows - 1) / kRows; }
};

struct BwdWorkspaceLayout {
  int64_t delta_offset = 0;
  int64_t mean_offset = 0;         // == row_edges_offset when there is no mean buffer
  int64_t row_edges_offset = 0;    // == mean_prefix_offset when there are none
  int64_t mean_prefix_offset = 0;  // == segment_totals_offset when there is none
  int64_t segment_totals_offset = 0;  // == dq_accum_offset when there are none
  int64_t segment_counts_offset = 0;  // within the segment totals
  int64_t dq_accum_offset = 0;     // == kv_accum_offset when there is no accumulator
  int64_t kv_accum_offset = 0;     // dk's, then dv's at kv_accum_offset + kv_accum_bytes
  int64_t kv_accum_bytes = 0;      // each; 0 when there are none
  int64_t bytes = 0;

  // The dq accumulator's tiles are padded to 128 dims: its size does not depend on the head
  // dim; the dk and dv accumulators' is B S Hkv D floats each.
  static BwdWorkspaceLayout make(int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                 int64_t heads_q, int64_t heads_kv, int64_t head_dim,
                                 bool sparsek, bool with_dq_accumulator) {
    BwdWorkspaceLayout l;
    const int64_t rows_bytes = align256(batch * heads_q * seqlen_q * int64_t{4});
    const bool sparsek_du_pass = sparsek && with_dq_accumulator;
    const int64_t kv_rows = batch * heads_kv * (seqlen_q + 1);
    l.delta_offset = 0;
    l.mean_offset = rows_bytes;
    l.row_edges_offset = l.mean_offset + (sparsek ? rows_bytes : 0);
    l.mean_prefix_offset =
        l.row_edges_offset + (sparsek_du_pass ? align256(kv_rows * int64_t{4}) : 0);
    l.segment_totals_offset =
        l.mean_prefix_offset + (sparsek_du_pass ? align256(kv_rows * int64_t{8}) : 0);
    const int64_t segments =
        sparsek_du_pass ? batch * heads_kv * MeanPrefixSegments::count(seqlen_q) : 0;
    l.segment_counts_offset = l.segment_totals_offset + align256(segments * int64_t{8});
    l.dq_accum_offset = l.segment_counts_offset + align256(segments * int64_t{4});
    l.kv_accum_offset =
        l.dq_accum_offset +
        (with_dq_accumulator ? align256(DqAccumulatorTiles::elems(batch, seqlen_q, heads_q) * 4)
                             : 0);
    l.kv_accum_bytes =
        sparsek_du_pass
            ? align256(KvAccumulator::elems(batch, seqlen_k, heads_kv, head_dim) * 4)
            : 0;
    l.bytes = l.kv_accum_offset + 2 * l.kv_accum_bytes;
    return l;
  }

  float* delta(void* workspace) const {
    return reinterpret_cast<float*>(static_cast<char*>(workspace) + delta_offset);
  }
  float* mean(void* workspace, bool sparsek) const {
    return sparsek ? reinterpret_cast<float*>(static_cast<char*>(workspace) + mean_offset)
                   : nullptr;
  }
  int32_t* row_edges(void* workspace) const {
    return reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + row_edges_offset);
  }
  double* mean_prefix(void* workspace) const {
    return reinterpret_cast<double*>(static_cast<char*>(workspace) + mean_prefix_offset);
  }
  double* segment_mean_totals(void* workspace) const {
    return reinterpret_cast<double*>(static_cast<char*>(workspace) + segment_totals_offset);
  }
  int32_t* segment_count_totals(void* workspace) const {
    return reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + segment_counts_offset);
  }
  float* dq_accum(void* workspace) const {
    return reinterpret_cast<float*>(static_cast<char*>(workspace) + dq_accum_offset);
  }
  float* dk_accum(void* workspace) const {
    return reinterpret_cast<float*>(static_cast<char*>(workspace) + kv_accum_offset);
  }
  float* dv_accum(void* workspace) const {
    return reinterpret_cast<float*>(static_cast<char*>(workspace) + kv_accum_offset +
                                    kv_accum_bytes);
  }
};

}  // namespace sparsek
