// Thin wrappers over the Hopper (sm_90a) warpgroup instructions of the sm90 kernels:
// wgmma.mma_async (a 64-row tile product issued by the 4 warps of a warpgroup together, its
// operands read from shared memory through 64-bit matrix descriptors), its fences, and the
// proxy fence that makes cp.async writes to shared memory visible to it.
//
// Only the shapes the kernels issue are here:
//   - both operands K-major in shared memory (score-like products: S = Q K^T in the forward,
//     S, dP and their transposes in the backward), at N = 128 (forward: 128 keys) and N = 64
//     (backward: 64 keys or 64 query rows);
//   - A in registers and B read MN-major (transposed) from shared memory at N = 128 (the
//     head dim: O += P V, dq += dS K, dv += P^T dO, dk += dS^T Q);
//   - A K-major and B MN-major, both in shared memory, at N = 64 (the backward's dq = dS K
//     inside the dk/dv kernel: dS stored by stmatrix, half the head dim a warpgroup).
// Accumulators are float32 in the register layout of mma.sync m16n8 tiles: d[j] is n8 tile j
// of the warp's 16 rows (tile_mma.cuh's layout), so the masks, gates and softmax of the
// mma.sync kernels apply unchanged.
//
// Compiled only for sm_90a: the instructions do not exist elsewhere (the
// __CUDA_ARCH_FEAT_SM90_ALL guard in the sm90 kernels keeps other targets from seeing them).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

// Set where the sm90 kernels' bodies compile: sm_90a code only.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SPARSEK_SM90_KERNEL_BODY 1
#endif

namespace sparsek::sm90 {

// Orders the accumulator and A-fragment register writes of ordinary instructions before the
// wgmma that reads them.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most kPending committed groups of this warpgroup are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// cp.async writes shared memory through the generic proxy, wgmma reads it through the async
// proxy: each writer fences after its copies land and before the barrier that publishes them.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving reads or writes of an accumulator register across a wgmma
// issue or wait (it cannot see that the asynchronous instruction owns the register).
template <int kTiles>
__device__ __forceinline__ void fence_registers(float (&d)[kTiles][4]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+f"(d[j][r])::"memory");
  }
}

// Descriptor of a 128-byte-swizzled operand (layout type 1), 1024-byte-aligned atoms of 8 rows
// of 128 bytes. lbo and sbo in bytes (the hardware keeps them in 16-byte units):
//   K-major (rows x 64 elements per atom column): lbo unused (1), sbo = 1024, the next 8 rows;
//   MN-major: lbo = the distance between two 64-element column blocks, sbo = 1024, the next 8
//   rows of the reduction dim.
// Moving along the reduction dim inside an atom adds to the start address: the hardware
// applies the swizzle to the absolute address bits, which is why atoms must be 1024-aligned.
__device__ __forceinline__ uint64_t smem_descriptor_sw128(const void* smem, uint32_t lbo_bytes,
                                                          uint32_t sbo_bytes) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  uint64_t desc = (address & 0x3FFFFu) >> 4;
  desc |= static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16;
  desc |= static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32;
  desc |= uint64_t{1} << 62;
  return desc;
}

// desc moved `bytes` (a multiple of 16) further along shared memory: only the start address
// field (the low 14 bits, in 16-byte units) changes, and it cannot carry into the next field
// because shared memory addresses stay below 2^18. A product's k steps take their descriptors
// this way from one computed for its first step: one integer add a step instead of the
// address arithmetic, masks and shifts of smem_descriptor_sw128 (which the profile of the
// backward kernels showed costing ~13 instructions per wgmma, a fifth of a step's issue).
__device__ __forceinline__ uint64_t advance_descriptor(uint64_t desc, uint32_t bytes) {
  const uint32_t start = static_cast<uint32_t>(desc) + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | start;
}

// d (+)= A B for a 64 x 16 A and a 16 x kN B, both K-major in shared memory. accumulate = 0
// overwrites d.
template <typename Element, int kN>
__device__ __forceinline__ void wgmma_ss(float (&d)[kN / 8][4], uint64_t desc_a, uint64_t desc_b,
                                         int accumulate);

// d = A B, as wgmma_ss with accumulate = 0 (defined at N = 64 only).
template <typename Element, int kN>
__device__ __forceinline__ void wgmma_ss_overwrite(float (&d)[kN / 8][4], uint64_t desc_a,
                                                   uint64_t desc_b);

// d (+)= A B for a 64 x 16 A in registers (the m16n8k16 A fragment of the warp's 16 rows) and
// a 16 x kN B stored MN-major (kN contiguous) in shared memory.
template <typename Element, int kN>
__device__ __forceinline__ void wgmma_rs_mn_major_b(float (&d)[kN / 8][4], const uint32_t (&a)[4],
                                                    uint64_t desc_b, int accumulate);

// The 64 float32 accumulators of an m64n128 tile: asm operands %0-%63 and their constraints.
#define SPARSEK_WGMMA_ACC_REGS                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define SPARSEK_WGMMA_ACC_OPERANDS(d) \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), \
  "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
  "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), \
  "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), \
  "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), \
  "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), \
  "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), \
  "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), \
  "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), \
  "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), \
  "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), \
  "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), \
  "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])

// Both products at N = 128 for one element type; ptx_type is
// its name in the instruction ("f16", "bf16"). Operands past the accumulators: SS takes the
// two descriptors (%64, %65) and the accumulate flag (%66); RS the four A registers (%64-%67),
// B's descriptor (%68) and the flag (%69). The immediates are scale-a, scale-b (1: no
// negation) and the transposes (SS: none; RS: B read MN-major).
#define SPARSEK_DEFINE_WGMMA_M64N128K16(Element, ptx_type)                                   \
  template <>                                                                                \
  __device__ __forceinline__ void wgmma_ss<Element, 128>(                                     \
      float(&d)[16][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {                  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." ptx_type "." ptx_type "\n"   \
                 SPARSEK_WGMMA_ACC_REGS ", %64, %65, p, 1, 1, 0, 0;\n}\n"                     \
                 : SPARSEK_WGMMA_ACC_OPERANDS(d)                                              \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));                               \
  }                                                                                          \
  template <>                                                                                \
  __device__ __forceinline__ void wgmma_rs_mn_major_b<Element, 128>(                          \
      float(&d)[16][4], const uint32_t(&a)[4], uint64_t desc_b, int accumulate) {            \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." ptx_type "." ptx_type "\n"   \
                 SPARSEK_WGMMA_ACC_REGS ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"       \
                 : SPARSEK_WGMMA_ACC_OPERANDS(d)                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate)); \
  }

SPARSEK_DEFINE_WGMMA_M64N128K16(__half, "f16")
SPARSEK_DEFINE_WGMMA_M64N128K16(__nv_bfloat16, "bf16")

#undef SPARSEK_DEFINE_WGMMA_M64N128K16
#undef SPARSEK_WGMMA_ACC_OPERANDS
#undef SPARSEK_WGMMA_ACC_REGS

// d (+)= A B for a 64 x 16 A stored K-major and a 16 x kN B stored MN-major, both in shared
// memory; wgmma_ss_mn_major_b_overwrite is the same with d output-only (defined at N = 64).
template <typename Element, int kN>
__device__ __forceinline__ void wgmma_ss_mn_major_b(float (&d)[kN / 8][4], uint64_t desc_a,
                                                    uint64_t desc_b);
template <typename Element, int kN>
__device__ __forceinline__ void wgmma_ss_mn_major_b_overwrite(float (&d)[kN / 8][4],
                                                              uint64_t desc_a, uint64_t desc_b);

// Stores four 8 x 8 b16 matrices: register i holds, in every lane, the two elements
// (lane / 4, 2 (lane % 4) + {0, 1}) of matrix i (an mma.sync accumulator pair), and lane
// 8 i + j gives the shared-memory address of row j of matrix i (16 bytes).
__device__ __forceinline__ void stmatrix_x4(uint32_t address, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                   address),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// Stores four 8 x 8 b16 matrices transposed: register i holds, in every lane, the two
// elements (lane / 4, 2 (lane % 4) + {0, 1}) of matrix i (an mma.sync accumulator pair), and
// lane 8 i + j gives the shared-memory address of row j of matrix i's transpose (16 bytes).
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t address, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                   address),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// The 32 float32 accumulators of an m64n64 tile.
#define SPARSEK_WGMMA_ACC_REGS_N64                                                  \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define SPARSEK_WGMMA_OUT_OPERANDS_N64(d) \
  "=f"(d[0][0]), "=f"(d[0][1]), "=f"(d[0][2]), "=f"(d[0][3]), \
  "=f"(d[1][0]), "=f"(d[1][1]), "=f"(d[1][2]), "=f"(d[1][3]), \
  "=f"(d[2][0]), "=f"(d[2][1]), "=f"(d[2][2]), "=f"(d[2][3]), \
  "=f"(d[3][0]), "=f"(d[3][1]), "=f"(d[3][2]), "=f"(d[3][3]), \
  "=f"(d[4][0]), "=f"(d[4][1]), "=f"(d[4][2]), "=f"(d[4][3]), \
  "=f"(d[5][0]), "=f"(d[5][1]), "=f"(d[5][2]), "=f"(d[5][3]), \
  "=f"(d[6][0]), "=f"(d[6][1]), "=f"(d[6][2]), "=f"(d[6][3]), \
  "=f"(d[7][0]), "=f"(d[7][1]), "=f"(d[7][2]), "=f"(d[7][3])
#define SPARSEK_WGMMA_ACC_OPERANDS_N64(d) \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), \
  "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
  "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), \
  "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), \
  "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])

// The SS products at N = 64 (the backward's score-like products, and dq = dS K with B read
// MN-major: the last immediate); operands as at N = 128: the descriptors are %32 and %33,
// the accumulate flag %34. The _overwrite products have scale-d 0 and their accumulators
// output-only ("=f"): the compiler then knows the previous values are dead, instead of
// keeping them alive from one mainloop step to the next.
//
// SPARSEK_WGMMA_SS_N64: one product whose scale-d is the constant `scale_d` (1 accumulates,
// 0 overwrites), B's transpose immediate `trans_b`, and `operands` the accumulators'
// constraint list (SPARSEK_WGMMA_ACC_OPERANDS_N64 or SPARSEK_WGMMA_OUT_OPERANDS_N64).
#define SPARSEK_WGMMA_SS_N64(Element, ptx_type, name, scale_d, trans_b, operands)           \
  template <>                                                                                \
  __device__ __forceinline__ void name<Element, 64>(float(&d)[8][4], uint64_t desc_a,        \
                                                    uint64_t desc_b) {                       \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " #scale_d ", 0;\n"                        \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." ptx_type "." ptx_type "\n"    \
                 SPARSEK_WGMMA_ACC_REGS_N64 ", %32, %33, p, 1, 1, 0, " #trans_b ";\n}\n"      \
                 : operands(d)                                                               \
                 : "l"(desc_a), "l"(desc_b));                                                \
  }
#define SPARSEK_DEFINE_WGMMA_M64N64K16(Element, ptx_type)                                    \
  template <>                                                                                \
  __device__ __forceinline__ void wgmma_ss<Element, 64>(                                      \
      float(&d)[8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {                   \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." ptx_type "." ptx_type "\n"    \
                 SPARSEK_WGMMA_ACC_REGS_N64 ", %32, %33, p, 1, 1, 0, 0;\n}\n"                 \
                 : SPARSEK_WGMMA_ACC_OPERANDS_N64(d)                                          \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));                               \
  }                                                                                          \
  SPARSEK_WGMMA_SS_N64(Element, ptx_type, wgmma_ss_overwrite, 0, 0,                          \
                       SPARSEK_WGMMA_OUT_OPERANDS_N64)                                       \
  SPARSEK_WGMMA_SS_N64(Element, ptx_type, wgmma_ss_mn_major_b, 1, 1,                         \
                       SPARSEK_WGMMA_ACC_OPERANDS_N64)                                       \
  SPARSEK_WGMMA_SS_N64(Element, ptx_type, wgmma_ss_mn_major_b_overwrite, 0, 1,               \
                       SPARSEK_WGMMA_OUT_OPERANDS_N64)

SPARSEK_DEFINE_WGMMA_M64N64K16(__half, "f16")
SPARSEK_DEFINE_WGMMA_M64N64K16(__nv_bfloat16, "bf16")

#undef SPARSEK_DEFINE_WGMMA_M64N64K16
#undef SPARSEK_WGMMA_SS_N64
#undef SPARSEK_WGMMA_ACC_OPERANDS_N64
#undef SPARSEK_WGMMA_OUT_OPERANDS_N64
#undef SPARSEK_WGMMA_ACC_REGS_N64

}  // namespace sparsek::sm90
