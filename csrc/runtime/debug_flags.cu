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

namespace {
bool env_equals(const char* name, const char* expected) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, expected) == 0;
}
}  // namespace

bool mma_sync_forward_requested() { return env_equals("JAX_SPARSEK_FORWARD_KERNEL", "mma_sync"); }

bool mma_sync_backward_requested() {
  return env_equals("JAX_SPARSEK_BACKWARD_KERNEL", "mma_sync");
}

bool deterministic_backward_requested() {
  return env_equals("JAX_SPARSEK_DETERMINISTIC_BACKWARD", "1");
}

}  // namespace sparsek
