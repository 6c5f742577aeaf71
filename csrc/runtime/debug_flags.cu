#include "runtime/debug_flags.h"

#include <cstdlib>
#include <cstring>
#include <initializer_list>
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

namespace {
// The variable's value among `choices`: 0 when unset or empty, -1 when anything else.
int env_choice(const char* name, std::initializer_list<int> choices) {
  const char* value = std::getenv(name);
  if (value == nullptr || value[0] == '\0') return 0;
  for (const int choice : choices) {
    if (std::to_string(choice) == value) return choice;
  }
  return -1;
}
}  // namespace

int requested_key_span() {
  return env_choice("JAX_SPARSEK_KEY_SPAN", {1024, 2048, 4096, 8192});
}

int requested_key_order() {
  const char* value = std::getenv("JAX_SPARSEK_KEY_ORDER");
  if (value == nullptr || value[0] == '\0') return 0;
  if (std::strcmp(value, "last-row") == 0) return 1;
  if (std::strcmp(value, "kd") == 0) return 2;
  return -1;
}

int requested_bwd_cluster() { return env_choice("JAX_SPARSEK_BWD_CLUSTER", {1, 2, 4, 8}); }

}  // namespace sparsek
