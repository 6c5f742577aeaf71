// Workspace buffers start at 256-byte boundaries (XLA's and cudaMalloc's alignment, and more
// than any vector access needs): the one rounding every workspace layout uses.
#pragma once

#include <cstdint>

namespace sparsek {

constexpr int64_t kWorkspaceAlign = 256;

constexpr int64_t align256(int64_t bytes) {
  return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

}  // namespace sparsek
