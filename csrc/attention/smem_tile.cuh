// Shared-memory tiles of rows x kHeadDim 16-bit elements, and their asynchronous loads.
//
// A row is kHeadDim / 8 chunks of 16 bytes. Chunk c of row r is stored at chunk position
// c ^ (r % 8): ldmatrix reads the same logical chunk of 8 consecutive rows, which then falls
// in 8 different 16-byte bank groups (no bank conflicts) although rows are 128, 256 or 512
// bytes apart.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention/sm80_instructions.cuh"

namespace sparsek {

template <int kHeadDim>
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

// swizzled_offset(row, chunk + 2 * step) for an even step offset, from
// base = swizzled_offset(row, chunk) with chunk < 2: the row part of the offset has no bits
// below log2(kHeadDim), so moving by 2 * step chunks is an XOR of the chunk bits.
__device__ __forceinline__ int swizzle_step(int base, int step) { return base ^ (step << 4); }

// The two tile layouts, for the loaders below. kRowPitch: the offset (in elements) between a
// chunk of row r and the same chunk of row r + 8 k, divided by 8 k.
//
// RowSwizzledLayout: the layout of the mma.sync kernels (ldmatrix reads), rows kHeadDim apart.
template <int kHeadDim>
struct RowSwizzledLayout {
  static constexpr int kRowPitch = kHeadDim;
  __device__ __forceinline__ static int offset(int row, int chunk) {
    return swizzled_offset<kHeadDim>(row, chunk);
  }
};

// Sw128Layout: what wgmma reads through a 128-byte-swizzle descriptor (sm90_instructions.cuh):
// the head dim cut into column blocks of 64 elements, each block kRows rows of 128 bytes, the
// same chunk XOR (row % 8) inside a row. For kHeadDim = 64 it is RowSwizzledLayout<64>.
template <int kRows, int kHeadDim>
struct Sw128Layout {
  static constexpr int kRowPitch = 64;
  // Rows this many apart share their swizzle: their offsets differ by rows * kRowPitch.
  static constexpr int kSwizzleRows = 8;
  static constexpr int kColumnBlockElems = kRows * 64;
  static_assert(kRows % 8 == 0 && kHeadDim % 64 == 0, "whole 8 x 128-byte atoms");
  __device__ __forceinline__ static int offset(int row, int chunk) {
    return (chunk >> 3) * kColumnBlockElems + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
  }
};

// The K and V tile layout of a tile config: Cfg::KVLayout where it names one (the sm90
// kernel's configs), RowSwizzledLayout otherwise.
template <typename Cfg, typename = void>
struct KVTileLayout {
  using type = RowSwizzledLayout<Cfg::kHeadDim>;
};
template <typename Cfg>
struct KVTileLayout<Cfg, std::void_t<typename Cfg::KVLayout>> {
  using type = typename Cfg::KVLayout;
};

// Starts the copy of rows [row0, row0 + kRows) of a [num_rows, head_dim] slice (rows
// `row_stride` elements apart) into a swizzled tile. Rows past num_rows and columns past
// head_dim are zero-filled, so padded keys and dims add nothing to any dot product.
template <int kRows, int kHeadDim, int kNThreads, typename Layout = RowSwizzledLayout<kHeadDim>,
          typename Element>
__device__ __forceinline__ void load_tile_async(Element* tile, const Element* gmem,
                                                int64_t row_stride, int64_t row0,
                                                int64_t num_rows, int head_dim) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kRowsPerPass = kNThreads / kChunksPerRow;
  static_assert(kNThreads % kChunksPerRow == 0 && kRows % kRowsPerPass == 0 &&
                    kRowsPerPass % 8 == 0,
                "each thread copies the same chunk column of rows kRowsPerPass apart");
  // A thread keeps its chunk column c and its row modulo 8, so its swizzled offset only
  // advances by whole rows from pass to pass.
  const int r = static_cast<int>(threadIdx.x) / kChunksPerRow;
  const int c = static_cast<int>(threadIdx.x) % kChunksPerRow;
  const bool column_valid = c * 8 < head_dim;
  const Element* src = gmem + (row0 + r) * row_stride + c * 8;
  const int64_t pass_stride = kRowsPerPass * row_stride;
  Element* dst = tile + Layout::offset(r, c);
  // Not unrolled: unrolled, the compiler keeps one 64-bit source address per pass live across
  // the mainloop, which spills registers at D = 128.
#pragma unroll 1
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const bool valid = column_valid && row0 + r + i * kRowsPerPass < num_rows;
    sm80::cp_async_16(dst + i * kRowsPerPass * Layout::kRowPitch, valid ? src : gmem, valid);
    src += pass_stride;
  }
}

// The same copy for a gathered tile: row r of the tile is row keys[r] of the slice, and a
// negative entry is a padding row (zero-filled).
template <int kRows, int kHeadDim, int kNThreads, typename Layout = RowSwizzledLayout<kHeadDim>,
          typename Element>
__device__ __forceinline__ void load_rows_gathered_async(Element* tile, const Element* gmem,
                                                         int64_t row_stride, const int* keys,
                                                         int head_dim) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kRowsPerPass = kNThreads / kChunksPerRow;
  static_assert(kNThreads % kChunksPerRow == 0 && kRows % kRowsPerPass == 0 &&
                    kRowsPerPass % 8 == 0,
                "each thread copies the same chunk column of rows kRowsPerPass apart");
  constexpr int kPasses = kRows / kRowsPerPass;
  const int r = static_cast<int>(threadIdx.x) / kChunksPerRow;
  const int c = static_cast<int>(threadIdx.x) % kChunksPerRow;
  const bool column_valid = c * 8 < head_dim;
  Element* dst = tile + Layout::offset(r, c);
  // Every position before the first copy (see load_rows_gathered_async_by below).
  int row_keys[kPasses];
#pragma unroll
  for (int i = 0; i < kPasses; ++i) row_keys[i] = keys[r + i * kRowsPerPass];
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {
    const int key = row_keys[i];
    const bool valid = column_valid && key >= 0;
    const Element* src = gmem + static_cast<int64_t>(valid ? key : 0) * row_stride + c * 8;
    sm80::cp_async_16(dst + i * kRowsPerPass * Layout::kRowPitch, src, valid);
  }
}

// Which 16-byte chunk of which rows `thread` of kThreads copies: row r, r + kRowsPerPass, ...
// of chunk column c (valid where it lies inside head_dim).
template <int kRows, int kHeadDim, int kThreads>
struct ChunkCopySlot {
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kPasses = kRows / kRowsPerPass;
  static_assert(kThreads % kChunksPerRow == 0 && kRows % kRowsPerPass == 0,
                "each pass copies whole rows");
  int r;
  int c;
  bool column_valid;
  __device__ __forceinline__ ChunkCopySlot(int thread, int head_dim)
      : r(thread / kChunksPerRow), c(thread % kChunksPerRow), column_valid(c * 8 < head_dim) {}
};

// The CTA-wide copy above made by kThreads threads of which this one is `thread` (a producer
// warpgroup). A thread's rows are kRowsPerPass apart, a whole number of swizzle periods, so
// its destination moves by a constant a pass and its source by one 64-bit add; the passes
// are unrolled, and a tile whose rows all lie before num_rows (every tile but a ragged last
// one) copies without a per-pass bound check. Written as a loop that recomputed the swizzled
// offset and the row bound each pass, the copy was ~23 SASS instructions a pass: at 32k rows
// the dense forward's producer issued 44% of the kernel's instructions (ncu), taking issue
// slots from the consumers' softmax on the same schedulers.
template <int kRows, int kHeadDim, int kThreads, typename Layout, typename Element>
__device__ __forceinline__ void load_tile_async_by(int thread, Element* tile,
                                                   const Element* gmem, int64_t row_stride,
                                                   int64_t row0, int64_t num_rows,
                                                   int head_dim) {
  using Slot = ChunkCopySlot<kRows, kHeadDim, kThreads>;
  static_assert(Slot::kRowsPerPass % Layout::kSwizzleRows == 0,
                "a thread's rows keep their swizzle from pass to pass");
  const Slot slot(thread, head_dim);
  Element* dst = tile + Layout::offset(slot.r, slot.c);
  const char* src = reinterpret_cast<const char*>(gmem + (row0 + slot.r) * row_stride +
                                                  slot.c * 8);
  const int64_t pass_bytes = Slot::kRowsPerPass * row_stride * int64_t{sizeof(Element)};
  // This thread's rows before num_rows: passes [0, valid_passes).
  const int64_t rows_left = num_rows - row0 - slot.r;
  const int valid_passes =
      !slot.column_valid || rows_left <= 0
          ? 0
          : static_cast<int>(min(int64_t{Slot::kPasses},
                                 (rows_left + Slot::kRowsPerPass - 1) / Slot::kRowsPerPass));
  if (valid_passes == Slot::kPasses) {
#pragma unroll
    for (int i = 0; i < Slot::kPasses; ++i) {
      sm80::cp_async_16(dst + i * Slot::kRowsPerPass * Layout::kRowPitch, src, true);
      src += pass_bytes;
    }
  } else {
    // Passes past the bound zero-fill their chunk (the source is not read).
#pragma unroll 1
    for (int i = 0; i < Slot::kPasses; ++i) {
      const bool valid = i < valid_passes;
      sm80::cp_async_16(dst + i * Slot::kRowsPerPass * Layout::kRowPitch,
                        valid ? static_cast<const void*>(src) : gmem, valid);
      src += pass_bytes;
    }
  }
}

// One warp's copy of kRows rows [row0, row0 + kRows) of a [num_rows, head_dim] slice into
// rows [local_row0, local_row0 + kRows) of a tile of `Layout` (a whole number of swizzle
// periods from its start), with the zero-fill of load_tile_async. The chained SparseK
// forward's next Q rows (fwd_kernel_sm90.cuh): each warp copies its own rows once it has
// staged its output in them, so no other warp waits for it. A lane takes one chunk column of
// every (32 / chunks)-th row; the offsets are recomputed each pass (kRows * chunks / 32 copies
// a lane, once a head).
template <int kRows, int kHeadDim, typename Layout, typename Element>
__device__ __forceinline__ void load_warp_rows_async(Element* tile, int local_row0,
                                                     const Element* gmem, int64_t row_stride,
                                                     int64_t row0, int64_t num_rows,
                                                     int head_dim, int lane) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kRowsPerPass = 32 / kChunksPerRow;
  static_assert(32 % kChunksPerRow == 0 && kRows % kRowsPerPass == 0,
                "a pass copies whole rows");
  const int c = lane % kChunksPerRow;
  const bool column_valid = c * 8 < head_dim;
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const int r = i * kRowsPerPass + lane / kChunksPerRow;
    const bool valid = column_valid && row0 + r < num_rows;
    const Element* src = valid ? gmem + (row0 + r) * row_stride + c * 8 : gmem;
    sm80::cp_async_16(tile + Layout::offset(local_row0 + r, c), src, valid);
  }
}

// Which 16-byte chunks of which rows `thread` of kThreads copies in a gather (Sw128Layout):
// eight threads a row, thread q = thread % 8 taking chunk q of each of the row's kHeadDim / 64
// column blocks (128 bytes each), of rows r, r + kRowsPerPass, ... A warp's copy then reads
// four whole 128-byte lines of four rows (as the dense copy's two rows of 256 bytes), and a
// thread's destinations are one register plus immediates: its rows keep their swizzle
// (kRowsPerPass is a whole number of 8-row periods) and its column blocks lie a constant
// apart.
template <int kRows, int kHeadDim, int kThreads>
struct GatherCopySlot {
  static constexpr int kThreadsPerRow = 8;
  static constexpr int kColumnBlocks = kHeadDim / 64;
  static constexpr int kRowsPerPass = kThreads / kThreadsPerRow;
  static constexpr int kPasses = kRows / kRowsPerPass;
  static_assert(kHeadDim % 64 == 0 && kThreads % kThreadsPerRow == 0 &&
                    kRows % kRowsPerPass == 0,
                "each pass copies whole rows of whole column blocks");
  int r;
  int q;
  __device__ __forceinline__ explicit GatherCopySlot(int thread)
      : r(thread / kThreadsPerRow), q(thread % kThreadsPerRow) {}
  // Whether chunk q of column block cb lies inside head_dim.
  __device__ __forceinline__ bool column_valid(int cb, int head_dim) const {
    return (cb * 8 + q) * 8 < head_dim;
  }
};

// The producer's gather: row r of the tile is row keys[r] of the slice (a negative entry is a
// padding row, zero-filled), by kThreads threads of which this one is `thread`, with the
// chunks of GatherCopySlot. A row's source is one 32 x 32 + 64-bit multiply-add in bytes
// (row_stride < 2^31 elements, checked at launch: check_problem.h) and its kHeadDim / 64
// copies take immediate offsets from it and from the destination. Before (16 threads a row,
// one chunk a thread) every copy had a row of its own: ~6 SASS instructions a copy (the
// position's test, select, multiply-add and 64-bit add) against ~3 now. All of a thread's
// positions are read before its first copy is issued: the compiler does not move a
// shared-memory load past a cp.async (which writes shared memory), so read between the
// copies, each position's load latency stood alone in the producer's chain (ncu: the most
// stalled instructions of the SparseK forward's producer were the uses of those loads).
template <int kRows, int kHeadDim, int kThreads, typename Layout, typename Element>
__device__ __forceinline__ void load_rows_gathered_async_by(int thread, Element* tile,
                                                            const Element* gmem,
                                                            int64_t row_stride,
                                                            const int* keys, int head_dim) {
  using Slot = GatherCopySlot<kRows, kHeadDim, kThreads>;
  static_assert(Slot::kRowsPerPass % Layout::kSwizzleRows == 0,
                "a thread's rows keep their swizzle from pass to pass");
  const Slot slot(thread);
  Element* dst = tile + Layout::offset(slot.r, slot.q);
  const Element* src = gmem + slot.q * 8;
  const uint32_t stride_bytes = static_cast<uint32_t>(row_stride * sizeof(Element));
  int row_keys[Slot::kPasses];
#pragma unroll
  for (int i = 0; i < Slot::kPasses; ++i) row_keys[i] = keys[slot.r + i * Slot::kRowsPerPass];
  // Every column block inside head_dim (head_dim = kHeadDim): no per-block test. A padding
  // row's source is row 0 (not read: the copy zero-fills).
  auto copy_rows = [&](auto all_columns) {
#pragma unroll
    for (int i = 0; i < Slot::kPasses; ++i) {
      const char* row_src = static_cast<const char*>(
          sm80::row_address(src, static_cast<uint32_t>(max(row_keys[i], 0)), stride_bytes));
#pragma unroll
      for (int cb = 0; cb < Slot::kColumnBlocks; ++cb) {
        const int sign = decltype(all_columns)::value || slot.column_valid(cb, head_dim)
                             ? row_keys[i]
                             : -1;
        sm80::cp_async_16_zero_if_negative(
            dst + i * Slot::kRowsPerPass * Layout::kRowPitch + cb * Layout::kColumnBlockElems,
            row_src + cb * 128, sign);
      }
    }
  };
  if (head_dim >= kHeadDim) {
    copy_rows(std::true_type{});
  } else {
    copy_rows(std::false_type{});
  }
}

}  // namespace sparsek
