#include "runtime/debug_flags.h"

#include <cstdlib>
#include <cstring>

namespace sparsek {

bool poison_outputs_requested() {
  static const bool requested = [] {
    const char* value = std::getenv("JAX_SPARSEK_POISON_OUTPUTS");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return requested;
}

bool mma_sync_forward_requested() {
  const char* value = std::getenv("JAX_SPARSEK_FORWARD_KERNEL");
  return value != nullptr && std::strcmp(value, "mma_sync") == 0;
}

}  // namespace sparsek
