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

}  // namespace sparsek
