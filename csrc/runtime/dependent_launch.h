// Whether this call launches the kernels that can overlap their predecessor's end
// (runtime/grid_dependency.cuh) as programmatically dependent launches: on sm_90 and later,
// unless JAX_SPARSEK_DEPENDENT_LAUNCH=0.
#pragma once

#include <string>

namespace sparsek {

// *allowed for the current device; an error message when the device query fails or the
// variable holds anything but 0 or 1.
std::string dependent_launch_allowed(bool* allowed);

}  // namespace sparsek
