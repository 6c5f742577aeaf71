// Debug switches read once from the environment.
#pragma once

namespace sparsek {

// JAX_SPARSEK_POISON_OUTPUTS=1: fill outputs with NaN before every kernel run, so that tests
// can check that every element was written.
bool poison_outputs_requested();

// JAX_SPARSEK_FORWARD_KERNEL=mma_sync: run the forward on the mma.sync kernel even where the
// Hopper (wgmma) kernel could run; read at every call, so that a benchmark or a test can
// compare both in one process. Unset or "auto": the fastest kernel the device runs.
bool mma_sync_forward_requested();

// JAX_SPARSEK_BACKWARD_KERNEL=mma_sync: the same for the backward's dq and dk/dv kernels.
bool mma_sync_backward_requested();

// JAX_SPARSEK_DETERMINISTIC_BACKWARD=1: the dense Hopper backward computes dq in its own
// kernel (bitwise reproducible) instead of adding it with atomics in the dk/dv kernel. Read
// at every call; the workspace that jit reserves follows the value at trace time.
bool deterministic_backward_requested();

// JAX_SPARSEK_KEY_SPAN=1024|2048|4096|8192: the width of the SparseK backward's sorted key spans
// (selection/sort_key_spans.h) instead of key_span_width(S); read at every call (tests run
// the wider spans at small S; benchmarks compare widths). 0 when unset, -1 when it holds
// anything else.
int requested_key_span();

// JAX_SPARSEK_KEY_ORDER=bands|kd|last-row: the order of the SparseK backward's keys
// (selection/sort_key_spans.h); read at every call (benchmarks compare them). 0 when unset,
// KeyOrder's value (1 last-row, 2 kd, 3 bands) when set to one, -1 when it holds anything
// else.
int requested_key_order();

// JAX_SPARSEK_KEY_BAND_ROWS=1024|...|32768: the height of the SparseK backward's row bands
// (KeyBands) instead of KeyBands::rows(T); read at every call. 0 when unset, -1 when it holds
// anything else.
int requested_key_band_rows();

// JAX_SPARSEK_SLICE_ORDER=start|spans: the SparseK backward's dk/dv CTAs take the kd slices by
// first row tile (the span sort's slice order, the default) or as the sort leaves them, span
// by span; read at every call (benchmarks compare both). 1 when unset or start, 0 spans, -1
// when it holds anything else.
int requested_slice_order();

// JAX_SPARSEK_BWD_CLUSTER=1|2|4|8: CTAs a thread-block cluster in the SparseK backward's fused
// dk/dv grid (neighbouring slices of one sorted key span, started together) instead of the
// launcher's default; read at every call (benchmarks compare sizes). 0 when unset, -1 when it
// holds anything else.
int requested_bwd_cluster();

// JAX_SPARSEK_BWD_GRID=list|tiles|heads: the SparseK dk/dv grid's CTA order (cta_order.h):
// with row bands the CTA list (sort_key_spans.h, BandCtas; the default), or a tile-major or
// head-major grid of every band's capacity; for the span orders tile-major (the default, which
// "list" keeps) or head-major. Read at every call (benchmarks compare them). 0 when
// unset, 1 tiles, 2 heads, 3 list, -1 when it holds anything else.
int requested_bwd_grid();

// JAX_SPARSEK_BWD_SKIP_HALVES=1|0: the SparseK dk/dv kernel that adds dq skips a warpgroup's
// products and gates on the steps whose rows see none of its 64 keys (1, the default), or
// computes them (0: the comparison); read at every call. -1 when it holds anything else.
int requested_bwd_skip_halves();

// JAX_SPARSEK_BWD_PRODUCER_FENCE=1|0: in the warp-specialized dk/dv kernel the producer
// warpgroup waits for its own copies, then publishes them to the async proxy (wgmma) before it
// arrives on their full barrier (1, the default), or arrives as the copies land and every
// consumer thread fences after its wait (0: the comparison); read at every call. -1 when it
// holds anything else.
int requested_bwd_producer_fence();

// JAX_SPARSEK_BWD_PREPARE=fused|separate: the backward computes Delta and zeroes its
// accumulators in one kernel (attention/bwd_preprocess.h; the default), or computes Delta one
// row a thread and zeroes each accumulator with a memset (the comparison); read at every
// call. 1 when unset or "fused", 0 for "separate", -1 when it holds anything else.
int requested_bwd_prepare();

// JAX_SPARSEK_FWD_HEADS_PER_CTA=1|2|4|8: how many query heads of one kv group a CTA of the
// Hopper SparseK forward takes in turn (the largest count that divides the group, up to this),
// instead of the launcher's choice (fwd_launch.cuh); read at every call (tests run every
// count, benchmarks compare them). 0 when unset, -1 when it holds anything else.
int requested_fwd_heads_per_cta();

// JAX_SPARSEK_SIDE_STREAM=1|0: the SparseK backward overlaps its key sorts with Delta and the
// zeroed dq accumulator, and du with dq's conversion, on a second stream (runtime/
// side_stream.h; the default), or runs everything on the caller's stream; read at every call
// (benchmarks compare both). 1 when unset or "1", 0 for "0", -1 when it holds anything else.
int requested_side_stream();

// JAX_SPARSEK_DEPENDENT_LAUNCH=1|0: the SparseK selection's tile kernel starts while the anchor
// kernel runs, and the Hopper SparseK forward while the tile kernel finishes (programmatic
// dependent launch, runtime/grid_dependency.cuh; the default on sm_90), or each kernel after
// the one before; read at every call (benchmarks compare both). 1 when unset or "1", 0 for
// "0", -1 when it holds anything else.
int requested_dependent_launch();

}  // namespace sparsek
