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
// The variable's value among `names`: 0 when unset or empty, 1 + its index among them, -1
// when anything else.
int env_name_choice(const char* name, std::initializer_list<const char*> names) {
  const char* value = std::getenv(name);
  if (value == nullptr || value[0] == '\0') return 0;
  int index = 1;
  for (const char* choice : names) {
    if (std::strcmp(choice, value) == 0) return index;
    ++index;
  }
  return -1;
}
// A setting that is on unless turned off: 1 when unset, empty or `on`, 0 when `off`, -1 when
// anything else.
int env_switch(const char* name, const char* on, const char* off) {
  const int choice = env_name_choice(name, {on, off});
  return choice < 0 ? -1 : (choice == 2 ? 0 : 1);
}
}  // namespace

int requested_key_span() {
  return env_choice("JAX_SPARSEK_KEY_SPAN", {1024, 2048, 4096, 8192});
}

int requested_key_order() {
  return env_name_choice("JAX_SPARSEK_KEY_ORDER", {"last-row", "kd", "bands"});
}

int requested_key_band_rows() {
  return env_choice("JAX_SPARSEK_KEY_BAND_ROWS", {1024, 2048, 4096, 8192, 16384, 32768});
}

int requested_slice_order() { return env_switch("JAX_SPARSEK_SLICE_ORDER", "start", "spans"); }

int requested_bwd_grid() {
  return env_name_choice("JAX_SPARSEK_BWD_GRID", {"tiles", "heads", "list"});
}

int requested_bwd_skip_halves() { return env_switch("JAX_SPARSEK_BWD_SKIP_HALVES", "1", "0"); }

int requested_bwd_producer_fence() {
  return env_switch("JAX_SPARSEK_BWD_PRODUCER_FENCE", "1", "0");
}

int requested_bwd_prepare() {
  return env_switch("JAX_SPARSEK_BWD_PREPARE", "fused", "separate");
}

int requested_fwd_heads_per_cta() {
  return env_choice("JAX_SPARSEK_FWD_HEADS_PER_CTA", {1, 2, 4, 8});
}

int requested_bwd_cluster() { return env_choice("JAX_SPARSEK_BWD_CLUSTER", {1, 2, 4, 8}); }

int requested_dependent_launch() { return env_switch("JAX_SPARSEK_DEPENDENT_LAUNCH", "1", "0"); }

int requested_side_stream() { return env_switch("JAX_SPARSEK_SIDE_STREAM", "1", "0"); }

}  // namespace sparsek
