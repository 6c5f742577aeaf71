// The warpgroup tile products of the sm90 kernels, over tiles stored in the 128-byte-swizzle
// layout (smem_tile.cuh's Sw128Layout: column blocks of 64 elements, each block rows of 128
// bytes). A warpgroup issues each product for its 64 rows; the caller fences, commits and
// waits (sm90_instructions.cuh), so that products can overlap other work.
//
//   issue_kmajor_product: d = A B^T over the head dim, A and B both stored rows x head dim
//     (S = Q K^T, dP = dO V^T, S^T = K Q^T, dP^T = V dO^T);
//   pack_a_fragments: an accumulator block as the register A operand of the next product
//     (the accumulator layout of n8 tiles 2 kk and 2 kk + 1 is the A fragment of k step kk);
//   issue_register_a_product: d += A B with A in registers and B stored reduction dim x
//     head dim (O += P V, dq += dS K, dv += P^T dO, dk += dS^T Q);
//   store_a_fragments_transposed: packed A fragments (a block of the warpgroup's rows x the
//     reduction dim) into a swizzled tile of their transpose, by stmatrix;
//   issue_shared_a_product: d = A B with A stored rows x reduction dim and B stored
//     reduction dim x head dim, both in shared memory (dq = dS K in the dk/dv kernel).
#pragma once

#include <cstdint>

#include "attention/sm80_instructions.cuh"
#include "attention/sm90_instructions.cuh"

namespace sparsek::sm90 {

// Descriptor strides (bytes): 8 rows of 128 bytes per swizzle atom; the leading byte offset
// of a K-major operand is unused.
constexpr uint32_t kAtomBytes = 1024;
constexpr uint32_t kUnusedLbo = 16;

// d = A B^T over kKSteps steps of 16 head dims: step ks is column block ks / 4, byte 32
// (ks % 4) of each 128-byte row. a and b point at the first of the product's rows; column
// blocks are kABlockElems and kBBlockElems elements apart. kOutputOnly (N = 64): the first
// step declares d output-only (wgmma_ss_overwrite), so d's previous values are not kept
// alive for it; the forward (N = 128) passes d in and out, as benchmarked.
template <typename Element, int kN, int kKSteps, int kABlockElems, int kBBlockElems,
          bool kOutputOnly = false>
__device__ __forceinline__ void issue_kmajor_product(float (&d)[kN / 8][4], const Element* a,
                                                     const Element* b) {
  const uint64_t desc_a0 = smem_descriptor_sw128(a, kUnusedLbo, kAtomBytes);
  const uint64_t desc_b0 = smem_descriptor_sw128(b, kUnusedLbo, kAtomBytes);
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    const int column = (ks & 3) * 16;
    const uint64_t desc_a = advance_descriptor(
        desc_a0, ((ks >> 2) * kABlockElems + column) * static_cast<int>(sizeof(Element)));
    const uint64_t desc_b = advance_descriptor(
        desc_b0, ((ks >> 2) * kBBlockElems + column) * static_cast<int>(sizeof(Element)));
    if constexpr (kOutputOnly) {
      if (ks == 0) {
        wgmma_ss_overwrite<Element, kN>(d, desc_a, desc_b);
      } else {
        wgmma_ss<Element, kN>(d, desc_a, desc_b, 1);
      }
    } else {
      wgmma_ss<Element, kN>(d, desc_a, desc_b, ks > 0 ? 1 : 0);
    }
  }
}

template <typename Element, int kKSteps>
__device__ __forceinline__ void pack_a_fragments(uint32_t (&a)[kKSteps][4],
                                                 const float (&p)[2 * kKSteps][4]) {
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    a[kk][0] = sm80::pack2<Element>(p[2 * kk][0], p[2 * kk][1]);
    a[kk][1] = sm80::pack2<Element>(p[2 * kk][2], p[2 * kk][3]);
    a[kk][2] = sm80::pack2<Element>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[kk][3] = sm80::pack2<Element>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
  }
}

// d += A B: k step kk is rows [16 kk, 16 kk + 16) of b (two 8-row atoms of every column
// block, the blocks kBBlockElems elements apart: the descriptor's leading byte offset).
template <typename Element, int kN, int kKSteps, int kBBlockElems>
__device__ __forceinline__ void issue_register_a_product(float (&d)[kN / 8][4],
                                                         const uint32_t (&a)[kKSteps][4],
                                                         const Element* b) {
  const uint64_t desc_b0 = smem_descriptor_sw128(b, kBBlockElems * 2, kAtomBytes);
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    const uint64_t desc_b =
        advance_descriptor(desc_b0, kk * 16 * 64 * static_cast<int>(sizeof(Element)));
    wgmma_rs_mn_major_b<Element, kN>(d, a[kk], desc_b, 1);
  }
}

// The warp's packed fragments a[kk] (kk: 16 columns 16 kk..16 kk + 15 of its 16 rows, as
// pack_a_fragments leaves them) stored transposed into a Layout tile (smem_tile.cuh): the
// warp's row r, column c lands at tile row c, column first_column + r. Register i of a[kk] is
// the 8 x 8 matrix of rows 8 (i % 2) and columns 16 kk + 8 (i / 2): its transpose is 8 tile
// rows of 8 columns, one 16-byte chunk each.
template <typename Layout, typename Element, int kKSteps>
__device__ __forceinline__ void store_a_fragments_transposed(Element* tile,
                                                             const uint32_t (&a)[kKSteps][4],
                                                             int first_column, int lane) {
  const int i = lane >> 3;
  const int chunk = (first_column >> 3) + (i & 1);
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    const int row = 16 * kk + 8 * (i >> 1) + (lane & 7);
    stmatrix_x4_trans(base + 2 * Layout::offset(row, chunk), a[kk]);
  }
}

// d = A B over kKSteps steps of 16: A's step ks is column block ks / 4, byte 32 (ks % 4) of
// each 128-byte row (K-major, as issue_kmajor_product); B's is rows [16 ks, 16 ks + 16) of a
// reduction dim x kN tile stored MN-major (as issue_register_a_product). d is output-only.
template <typename Element, int kN, int kKSteps, int kABlockElems, int kBBlockElems>
__device__ __forceinline__ void issue_shared_a_product(float (&d)[kN / 8][4], const Element* a,
                                                       const Element* b) {
  const uint64_t desc_a0 = smem_descriptor_sw128(a, kUnusedLbo, kAtomBytes);
  const uint64_t desc_b0 = smem_descriptor_sw128(b, kBBlockElems * 2, kAtomBytes);
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    const uint64_t desc_a = advance_descriptor(
        desc_a0,
        ((ks >> 2) * kABlockElems + (ks & 3) * 16) * static_cast<int>(sizeof(Element)));
    const uint64_t desc_b =
        advance_descriptor(desc_b0, ks * 16 * 64 * static_cast<int>(sizeof(Element)));
    if (ks == 0) {
      wgmma_ss_mn_major_b_overwrite<Element, kN>(d, desc_a, desc_b);
    } else {
      wgmma_ss_mn_major_b<Element, kN>(d, desc_a, desc_b);
    }
  }
}

}  // namespace sparsek::sm90
