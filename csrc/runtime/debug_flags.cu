#include "runtime/debug_flags.h"

#include <cstdlib>
#include <cstring>
#include <string>

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

int requested_key_span() {
  const char* value = std::getenv("JAX_SPARSEK_KEY_SPAN");
  if (value == nullptr || value[0] == '\0') return 0;
  for (const int width : {1024, 2048, 4096}) {
    if (std::to_string(width) == value) return width;
  }
  return -1;
}

int requested_bwd_cluster() {
  const char* value = std::getenv("JAX_SPARSEK_BWD_CLUSTER");
  if (value == nullptr || value[0] == '\0') return 0;
  for (const int ctas : {1, 2, 4, 8}) {
    if (std::to_string(ctas) == value) return ctas;
  }
  return -1;
}

}  // namespace sparsek
