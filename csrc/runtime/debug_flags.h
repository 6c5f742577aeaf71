// Debug switches read once from the environment.
#pragma once

namespace sparsek {

// JAX_SPARSEK_POISON_OUTPUTS=1: fill outputs with NaN before every kernel run, so that tests
// can check that every element was written.
bool poison_outputs_requested();

}  // namespace sparsek
