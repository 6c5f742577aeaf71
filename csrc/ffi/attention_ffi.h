// XLA FFI handlers exported to Python as capsules.
#pragma once

#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* jax_sparsek_attention_fwd(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* jax_sparsek_sparsek_fwd(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* jax_sparsek_sparsek_select(XLA_FFI_CallFrame* call_frame);
