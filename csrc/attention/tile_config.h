// Tile sizes of the forward kernel, in one place. A kernel is compiled for a padded head dim
// (64, 128 or 256); any head dim that is a multiple of 8 runs on the smallest one that holds
// it, with the extra columns zero-filled on load and never stored.
#pragma once

#include "attention/smem_tile.cuh"

namespace sparsek {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kMinBlocksPerSm_>
struct FwdTileConfig {
  static constexpr int kHeadDim = kHeadDim_;  // padded head dim held in shared memory
  static constexpr int kBlockM = kBlockM_;    // query rows per CTA
  static constexpr int kBlockN = kBlockN_;    // keys per step of the mainloop
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;

  // Each warp owns kWarpRows consecutive query rows: kMTiles m16 tiles. Two tiles per warp
  // let every K and V fragment read from shared memory feed two mma instructions.
  static constexpr int kWarpRows = kBlockM / kNWarps;
  static constexpr int kMTiles = kWarpRows / 16;
  static constexpr int kNTilesS = kBlockN / 8;   // n8 tiles of the score block
  static constexpr int kNTilesO = kHeadDim / 8;  // n8 tiles of the output block
  static constexpr int kKStepsQK = kHeadDim / 16;
  static constexpr int kKStepsPV = kBlockN / 16;

  static constexpr int kSmemQElems = kBlockM * kHeadDim;
  static constexpr int kSmemKVElems = kBlockN * kHeadDim;
  static constexpr int kSmemBytes = (kSmemQElems + 2 * kSmemKVElems) * 2;

  static_assert(kWarpRows % 16 == 0 && kMTiles >= 1, "a warp owns whole m16 tiles");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 64 == 0, "tiles of 16 keys, 64 dims");
};

template <int kHeadDim>
struct FwdTileSizes;

// D <= 64: 3 CTAs of 4 warps per SM (168 registers a thread), so that small problems fill
// the GPU in one wave; D <= 128: 2 CTAs of 4 warps (about 200 live registers a thread);
// D = 256: one CTA of 8 warps, whose accumulators need 16 rows a warp to fit.
template <>
struct FwdTileSizes<64> {
  using Config = FwdTileConfig<64, 128, 64, 4, 3>;
};
template <>
struct FwdTileSizes<128> {
  using Config = FwdTileConfig<128, 128, 64, 4, 2>;
};
template <>
struct FwdTileSizes<256> {
  using Config = FwdTileConfig<256, 128, 64, 8, 1>;
};

// The Hopper kernel (fwd_kernel_sm90.cuh): two consumer warpgroups of 4 warps per CTA own
// kBlockM = 128 query rows, 64 each (16 a warp: the rows of one wgmma m64 tile); each
// mainloop step multiplies them with kBlockN = 128 keys. 128 rows share every K and V tile:
// with 64, the K/V bytes per tensor-core FLOP double and L2 cannot feed them (measured:
// 64-row CTAs, two per SM, ran at 348 TFLOP/s). A third, producer warpgroup copies K and V
// into two stages (one producer warp was too few: its 128 cp.async instructions a step made
// it the bottleneck). The register file is split between the SM's four schedulers, so a
// ninth warp costs as much as a twelfth: the producer warpgroup hands its registers to the
// consumers (kProducerRegisters + 2 kConsumerRegisters <= 512 a scheduler lane; 224 is
// what the SparseK consumers need without spills, 56 what the producers need).
// Field names are FwdTileConfig's, read by the shared key visits, softmax and epilogue; Q, K
// and V are stored in the wgmma 128-byte-swizzle layout.
template <int kHeadDim_>
struct FwdSm90TileConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kNConsumerThreads = 256;
  static constexpr int kNProducerThreads = 128;
  static constexpr int kNThreads = kNConsumerThreads + kNProducerThreads;
  static constexpr int kProducerRegisters = 56;
  static constexpr int kConsumerRegisters = 224;
  static constexpr int kWarpgroupRows = 64;

  static constexpr int kWarpRows = 16;
  static constexpr int kMTiles = 1;
  static constexpr int kNTilesS = kBlockN / 8;
  static constexpr int kNTilesO = kHeadDim / 8;
  static constexpr int kKStepsQK = kHeadDim / 16;
  static constexpr int kKStepsPV = kBlockN / 16;
  // SparseK: the gate multiplies exp2(s - max) rather than adding log2(m) to s (one MUFU
  // operation a pair fewer; 16 rows a warp leave the registers to recompute it).
  static constexpr bool kGateAfterExp = true;
  // SparseK: the contiguous range's tiles before the candidates', so that K(0) needs no plan
  // (sparse_key_visit.cuh, fwd_kernel_sm90.cuh).
  static constexpr bool kRangeTilesFirst = true;

  using QLayout = Sw128Layout<kBlockM, kHeadDim>;
  using KVLayout = Sw128Layout<kBlockN, kHeadDim>;
  static constexpr int kSmemQElems = kBlockM * kHeadDim;
  static constexpr int kSmemKVElems = kBlockN * kHeadDim;
  // K's and V's stages. A third V stage for SparseK (the consumers wait for V(it - 1) at 32k,
  // 3.5% of the warps' samples) measured no faster (bench/NOTES.md).
  static constexpr int kKStages = 2;
  static constexpr int kVStages = 2;
  // SparseK: key positions of tile it (being read by the consumers), it + 1 (gathered a tile
  // ahead of V) and it + 2 (stashed early), and the slots of the tiles before, which free
  // only once V(it - kVStages) is released: before that nothing has been, so the producer
  // stashes tiles 2 .. kVStages + 1 into fresh slots (fwd_kernel_sm90.cuh).
  static constexpr int kKeySlots = kVStages + 2;
  // The full and empty mbarriers of each K and V stage.
  static constexpr int kNumStageBarriers = 2 * (kKStages + kVStages);
  // wgmma's swizzle atoms need 1024-byte alignment, which the kernel makes by rounding the
  // dynamic shared memory base up: up to 1 KB more.
  static constexpr int kSmemAlign = 1024;
  static constexpr int kSmemBytes = (kSmemQElems + (kKStages + kVStages) * kSmemKVElems) * 2 +
                                    kNumStageBarriers * 8 + kSmemAlign;
};

template <int kHeadDim>
struct FwdSm90TileSizes {
  static_assert(kHeadDim == 128, "the Hopper kernel covers 64 < D <= 128");
  using Config = FwdSm90TileConfig<kHeadDim>;
};

}  // namespace sparsek
