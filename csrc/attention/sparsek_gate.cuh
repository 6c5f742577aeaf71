// The SparseK gate m_ij of one (row, key) pair and the projection's fractional set F_i
// (SPARSEK.md, "Gates" and "Gradients"), from the key's position and score and the row's
// position and threshold. Shared by the forward's key visit and both backward kernels, so
// that every kernel weighs a pair the same way.
#pragma once

#include <cmath>

namespace sparsek {

// key: position (negative: a padding entry); pos: the row's position p(i) = i + S - T;
// u: where the key's score is (read only for sparse-domain keys: the forward's register
// budget depends on not loading it earlier). Window keys weigh 1; sparse-domain keys
// clip(u - tau, 0, 1), where -inf scores and -inf tau (the row takes its whole domain) come
// out as 0 and 1: saturation turns the NaN of -inf - -inf into 0.
__device__ __forceinline__ float sparsek_gate(int key, int pos, int window, const float* u,
                                              float tau) {
  if (key < 0 || key > pos) return 0.f;
  if (key > pos - window) return 1.f;
  return __saturatef(*u - tau);
}

// sparsek_gate for a score held in a register, as selects (no branch): the same value.
__device__ __forceinline__ float sparsek_gate_of_score(int key, int pos, int window, float u,
                                                       float tau) {
  const float in_domain = key > pos - window ? 1.f : __saturatef(u - tau);
  return key < 0 || key > pos ? 0.f : in_domain;
}

// j in F_i (SPARSEK.md: the gates strictly inside (0, 1)), from m = sparsek_gate(...):
// window keys weigh exactly 1 and keys outside the row's domain 0, while a sparse-domain key
// weighs clip(u - tau, 0, 1), which lies in (0, 1) iff 0 < u - tau < 1 (tau = -inf, a row
// within budget, gives 1; tau = +inf, a padding row, 0: both leave F empty).
__device__ __forceinline__ bool sparsek_fractional(float m) { return m > 0.f && m < 1.f; }

}  // namespace sparsek
