// The nanobind module: FFI handler capsules for JAX and build information.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "ffi/attention_ffi.h"
#include "sparsek_api.h"

namespace nb = nanobind;

NB_MODULE(_jax_sparsek_ext, m) {
  m.doc() = "jax_sparsek CUDA kernels: XLA FFI handlers and build information";
  m.def("attention_fwd_handler",
        []() { return nb::capsule(reinterpret_cast<void*>(&jax_sparsek_attention_fwd)); },
        "XLA FFI handler of the attention forward, as a capsule for jax.ffi");
  m.def("version", &sparsek::library_version, "Version of the compiled library");
  m.def("cuda_arch", &sparsek::current_device_arch,
        "Architecture of the current CUDA device, e.g. 'sm_90'; RuntimeError without one");
  m.def("supported_archs", &sparsek::compiled_archs, "CUDA targets compiled in");
}
