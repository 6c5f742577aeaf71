// The nanobind module: FFI handler capsules for JAX and build information.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>

#include "ffi/attention_ffi.h"
#include "sparsek_api.h"

namespace nb = nanobind;

namespace {

using Strides = std::tuple<int64_t, int64_t, int64_t>;  // (batch, row, head), in elements

// The forward on raw device pointers, for frameworks other than JAX (the torch layer): q, o
// [B, T, Hq, D] and k, v [B, S, Hkv, D] addressed through strides, the head dim contiguous.
void attention_fwd_pointers(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse,
                            int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t heads_q,
                            int64_t heads_kv, int64_t head_dim, Strides q_strides,
                            Strides k_strides, Strides v_strides, Strides o_strides,
                            float scale, bool is_causal, int64_t window,
                            const std::string& dtype, int32_t device, uintptr_t stream) {
  sparsek::AttentionFwdParams p;
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.o = reinterpret_cast<void*>(o);
  p.lse = reinterpret_cast<float*>(lse);
  p.batch = batch;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  std::tie(p.q_batch_stride, p.q_row_stride, p.q_head_stride) = q_strides;
  std::tie(p.k_batch_stride, p.k_row_stride, p.k_head_stride) = k_strides;
  std::tie(p.v_batch_stride, p.v_row_stride, p.v_head_stride) = v_strides;
  std::tie(p.o_batch_stride, p.o_row_stride, p.o_head_stride) = o_strides;
  p.scale = scale;
  p.is_causal = is_causal;
  p.window = window;
  if (dtype == "float16") {
    p.dtype = sparsek::DType::kFloat16;
  } else if (dtype == "bfloat16") {
    p.dtype = sparsek::DType::kBFloat16;
  } else {
    throw std::invalid_argument("dtype must be 'float16' or 'bfloat16', got '" + dtype + "'");
  }
  p.device = device;
  std::string error;
  {
    nb::gil_scoped_release release;  // the launch does not touch Python objects
    error = sparsek::attention_fwd(p, reinterpret_cast<void*>(stream));
  }
  if (!error.empty()) throw std::runtime_error("jax_sparsek attention_fwd: " + error);
}

// The backward's span sort on raw device pointers (selection/sort_key_spans.h), for tests of
// its order against bench/sparsek_bwd_visit_model.py: key_u [batch_heads, seqlen_k], tau
// [batch_heads, seqlen_q], the results [batch_heads, KeySpanLayout stride (key_span_stride)],
// and for order "bands" (band_rows) a scratch key_last_row [batch_heads, seqlen_k], and
// optionally visiting_slices [batch_heads] with the CTA list band_ctas [1 + batch_heads *
// stride / 128] (tail_ctas of it longest first; -1: the device's default); slice_min_key
// [batch_heads, stride / 128] scratch, which the kd orders' slice order needs.
void sort_key_spans_pointers(uintptr_t key_u, uintptr_t tau, uintptr_t sorted_u,
                             uintptr_t sorted_key, uintptr_t last_row, uintptr_t slice_order,
                             int64_t batch_heads,
                             int64_t seqlen_q, int64_t seqlen_k, int64_t window,
                             int32_t key_span, const std::string& order, int32_t device,
                             uintptr_t stream, int32_t band_rows, uintptr_t key_last_row,
                             uintptr_t visiting_slices, uintptr_t band_ctas,
                             int32_t tail_ctas, uintptr_t slice_min_key) {
  sparsek::SortKeySpansParams p;
  p.key_u = reinterpret_cast<const float*>(key_u);
  p.key_u_stride = seqlen_k;
  p.batch_heads = batch_heads;
  p.seqlen_k = seqlen_k;
  p.tau = reinterpret_cast<const float*>(tau);
  p.seqlen_q = seqlen_q;
  p.window = window;
  p.key_span = key_span;
  if (order == "kd") {
    p.order = sparsek::KeyOrder::kKd;
  } else if (order == "last-row") {
    p.order = sparsek::KeyOrder::kLastRow;
  } else if (order == "bands") {
    p.order = sparsek::KeyOrder::kBands;
  } else {
    throw std::invalid_argument("order must be 'kd', 'last-row' or 'bands', got '" + order +
                                "'");
  }
  p.stride = sparsek::KeySpanLayout::make(batch_heads, seqlen_q, seqlen_k).stride;
  p.band_rows = band_rows;
  p.key_last_row = reinterpret_cast<int32_t*>(key_last_row);
  p.span_sorted_u = reinterpret_cast<float*>(sorted_u);
  p.span_sorted_key = reinterpret_cast<int32_t*>(sorted_key);
  p.span_last_row = reinterpret_cast<int32_t*>(last_row);
  p.slice_order = reinterpret_cast<int32_t*>(slice_order);  // 0: not written
  p.visiting_slices = reinterpret_cast<int32_t*>(visiting_slices);
  p.slice_min_key = reinterpret_cast<int32_t*>(slice_min_key);
  p.band_ctas = reinterpret_cast<int32_t*>(band_ctas);
  p.tail_ctas = tail_ctas;
  p.device = device;
  std::string error;
  {
    nb::gil_scoped_release release;
    error = sparsek::sparsek_sort_key_spans(p, reinterpret_cast<void*>(stream));
  }
  if (!error.empty()) throw std::runtime_error("jax_sparsek sort_key_spans: " + error);
}

}  // namespace

NB_MODULE(_jax_sparsek_ext, m) {
  m.doc() = "jax_sparsek CUDA kernels: XLA FFI handlers and build information";
  m.def("attention_fwd_handler",
        []() { return nb::capsule(reinterpret_cast<void*>(&jax_sparsek_attention_fwd)); },
        "XLA FFI handler of the attention forward, as a capsule for jax.ffi");
  m.def("sparsek_fwd_handler",
        []() { return nb::capsule(reinterpret_cast<void*>(&jax_sparsek_sparsek_fwd)); },
        "XLA FFI handler of the SparseK forward (selection + attention), as a capsule");
  m.def("attention_bwd_handler",
        []() { return nb::capsule(reinterpret_cast<void*>(&jax_sparsek_attention_bwd)); },
        "XLA FFI handler of the attention backward (dense modes), as a capsule");
  m.def("sparsek_bwd_handler",
        []() { return nb::capsule(reinterpret_cast<void*>(&jax_sparsek_sparsek_bwd)); },
        "XLA FFI handler of the SparseK backward (selection + backward kernels), as a capsule");
  m.def("attention_bwd_workspace_bytes", &sparsek::attention_bwd_workspace_bytes,
        nb::arg("batch"), nb::arg("seqlen_q"), nb::arg("seqlen_k"), nb::arg("heads_q"),
        nb::arg("heads_kv"), nb::arg("head_dim"), nb::arg("sparsek"),
        "Bytes of device workspace the attention backward kernels need");
  m.def("sparsek_workspace_bytes", &sparsek::sparsek_workspace_bytes, nb::arg("batch"),
        nb::arg("seqlen_q"), nb::arg("seqlen_k"), nb::arg("heads_kv"),
        "Bytes of device workspace the SparseK selection stage needs");
  m.def(
      "sparsek_bwd_workspace_bytes",
      [](int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t heads_q, int64_t heads_kv,
         int64_t head_dim) {
        return sparsek::sparsek_bwd_workspace_layout(batch, seqlen_q, seqlen_k, heads_q,
                                                     heads_kv, head_dim)
            .bytes;
      },
      nb::arg("batch"), nb::arg("seqlen_q"), nb::arg("seqlen_k"), nb::arg("heads_q"),
      nb::arg("heads_kv"), nb::arg("head_dim"),
      "Bytes of device workspace the SparseK backward call (selection, span sort, backward "
      "kernels) needs");
  m.def("sparsek_key_span_workspace_bytes", &sparsek::sparsek_key_span_workspace_bytes,
        nb::arg("batch"), nb::arg("seqlen_q"), nb::arg("seqlen_k"), nb::arg("heads_kv"),
        "Bytes of device workspace the SparseK backward's span sort needs");
  m.def(
      "key_span_stride",
      [](int64_t seqlen_q, int64_t seqlen_k) {
        return sparsek::KeySpanLayout::make(1, seqlen_q, seqlen_k).stride;
      },
      nb::arg("seqlen_q"), nb::arg("seqlen_k"),
      "Row stride, in entries, of the span sort's results for T rows and S keys (every "
      "order's)");
  m.def("key_band_layout",
        [](int64_t seqlen_q, int64_t seqlen_k, int64_t band_rows) {
          std::vector<int64_t> capacities;
          for (int64_t b = 0; b < sparsek::KeyBands::count(seqlen_q, band_rows); ++b) {
            capacities.push_back(sparsek::KeyBands::capacity(b, seqlen_q, seqlen_k, band_rows));
          }
          return capacities;
        },
        nb::arg("seqlen_q"), nb::arg("seqlen_k"), nb::arg("band_rows"),
        "Entries of each row band's list (KeyBands::capacity), band by band");
  m.def("key_band_rows", &sparsek::sparsek_key_band_rows, nb::arg("seqlen_q"),
        "The backward's row band height for T rows (JAX_SPARSEK_KEY_BAND_ROWS or the default; "
        "-1 where the variable is not a valid height)");
  m.def("sort_key_spans_pointers", &sort_key_spans_pointers, nb::arg("key_u"), nb::arg("tau"),
        nb::arg("sorted_u"), nb::arg("sorted_key"), nb::arg("last_row"),
        nb::arg("slice_order"), nb::arg("batch_heads"), nb::arg("seqlen_q"), nb::arg("seqlen_k"), nb::arg("window"),
        nb::arg("key_span"), nb::arg("order"), nb::arg("device"), nb::arg("stream"),
        nb::arg("band_rows") = 0, nb::arg("key_last_row") = 0, nb::arg("visiting_slices") = 0,
        nb::arg("band_ctas") = 0, nb::arg("tail_ctas") = -1, nb::arg("slice_min_key") = 0,
        "The SparseK backward's span sort on raw device pointers (float32 key_u [BH, S] and "
        "tau [BH, T]; float32, int32, int32 results [BH, key_span_stride(T, S)], int32 slice "
        "order [BH, key_span_stride(T, S) / 128] or 0; order 'bands' with band_rows and an "
        "int32 key_last_row scratch [BH, S], and optionally int32 visiting_slices [BH] with "
        "the CTA list band_ctas [1 + BH * key_span_stride(T, S) / 128], tail_ctas of it "
        "longest first; slice_min_key [BH, key_span_stride(T, S) / 128] int32 scratch for the "
        "kd orders' slice order); raises "
        "RuntimeError with the failed check or CUDA call");
  m.def("sparsek_select_handler",
        []() { return nb::capsule(reinterpret_cast<void*>(&jax_sparsek_sparsek_select)); },
        "XLA FFI handler of the SparseK selection stage alone (tau from scores)");
  m.def("attention_fwd_pointers", &attention_fwd_pointers, nb::arg("q"), nb::arg("k"),
        nb::arg("v"), nb::arg("o"), nb::arg("lse"), nb::arg("batch"), nb::arg("seqlen_q"),
        nb::arg("seqlen_k"), nb::arg("heads_q"), nb::arg("heads_kv"), nb::arg("head_dim"),
        nb::arg("q_strides"), nb::arg("k_strides"), nb::arg("v_strides"),
        nb::arg("o_strides"), nb::arg("scale"), nb::arg("is_causal"), nb::arg("window"),
        nb::arg("dtype"), nb::arg("device"), nb::arg("stream"),
        "Attention forward on raw device pointers (strides in elements as (batch, row, "
        "head)); raises RuntimeError with the failed check or CUDA call");
  m.def(
      "build_options",
      []() {
        const sparsek::BuildOptions options = sparsek::build_options();
        nb::dict d;
        d["cuda_compiler_version"] = options.cuda_compiler_version;
        d["fast_math"] = options.fast_math;
        return d;
      },
      "How the library was compiled: {'cuda_compiler_version': str, 'fast_math': bool}");
  m.def("version", &sparsek::library_version, "Version of the compiled library");
  m.def("cuda_arch", &sparsek::current_device_arch,
        "Architecture of the current CUDA device, e.g. 'sm_90'; RuntimeError without one");
  m.def("supported_archs", &sparsek::compiled_archs, "CUDA targets compiled in");
  m.def("forward_kernel", &sparsek::forward_kernel_name, nb::arg("head_dim"),
        "The forward kernel a call with this head dim runs on the current device: "
        "'sm90_wgmma' or 'mma_sync'");
  m.def("backward_kernel", &sparsek::backward_kernel_name, nb::arg("head_dim"),
        "The backward kernels a call with this head dim runs on the current device: "
        "'sm90_wgmma' or 'mma_sync'");
  m.def("backward_dq", &sparsek::backward_dq_name, nb::arg("head_dim"), nb::arg("sparsek"),
        "How the backward computes dq on the current device: 'dkdv_atomic' (added by the "
        "dk/dv kernel with float32 atomics, not bitwise reproducible) or 'dq_kernel' "
        "(deterministic; JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 asks for it)");
}
