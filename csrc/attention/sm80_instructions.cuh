// Thin wrappers over the sm_80+ instructions the tile math uses: cp.async (global to shared
// memory without registers), ldmatrix (shared memory to mma fragments) and mma.sync m16n8k16.
// They run unchanged on sm_90 and sm_100.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sparsek::sm80 {

__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Copies 16 bytes; when `valid` is false writes 16 zero bytes instead (src is not read).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem_dst)),
               "l"(gmem_src), "r"(src_bytes));
}

// The same, zero-filling where `sign` < 0 (cp.async's ignore-src predicate, set by one
// compare): a gather passes the row's position, negative for padding. Through src-size (above)
// the compiler took the test through a shift, a select and a second test.
__device__ __forceinline__ void cp_async_16_zero_if_negative(void* smem_dst,
                                                             const void* gmem_src, int sign) {
  asm volatile(
      "{\n"
      ".reg .pred z;\n"
      "setp.lt.s32 z, %2, 0;\n"
      "cp.async.cg.shared.global [%0], [%1], 16, z;\n"
      "}\n" ::"r"(smem_address(smem_dst)),
      "l"(gmem_src), "r"(sign));
}

// base + row * stride_bytes, as one IMAD.WIDE.U32 with base as its 64-bit addend. Written
// plainly the compiler split base into a uniform pointer and the thread's offset and added them
// in three instructions a row, or added a zero high word after the multiply-add; base and the
// stride pass through opaque moves so that it sees one register pair and a 32-bit factor.
__device__ __forceinline__ const void* row_address(const void* base, uint32_t row,
                                                   uint32_t stride_bytes) {
  uint64_t address = reinterpret_cast<uint64_t>(base);
  asm volatile("mov.b64 %0, %0;" : "+l"(address));
  asm volatile("mov.b32 %0, %0;" : "+r"(stride_bytes));
  return reinterpret_cast<const void*>(address + static_cast<uint64_t>(row) * stride_bytes);
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPendingGroups>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPendingGroups));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem_row)));
}

// d += a * b for a 16x16 (row) by 16x8 (col) product with float32 accumulation.
template <typename Element>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4],
                                            uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                    uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&d)[4],
                                                           const uint32_t (&a)[4],
                                                           uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats packed into one register of two 16-bit elements (lo in the low half).
template <typename Element>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

}  // namespace sparsek::sm80
