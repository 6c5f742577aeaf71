#!/usr/bin/env bash
# One device call: build for sm_90a, run the GPU tests, the main job and the benchmark.
# Usage on the GPU machine, from the repo root:  bash bench/device_session.sh [bench args...]
# Logs go to $OUT (or ./device_logs). The XLA FFI headers of the oldest supported jaxlib are
# taken from .ffi_headers/include when present (carried with the call), so the handler that
# is tested is the one that loads on every supported jaxlib.
set -uo pipefail
OUT=${OUT:-$PWD/device_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .ffi_headers/include ]; then
  export JAX_SPARSEK_XLA_FFI_INCLUDE=$PWD/.ffi_headers/include
fi
export JAX_SPARSEK_CUDA_ARCHS=${JAX_SPARSEK_CUDA_ARCHS:-90a}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
  | tee "$OUT/gpu.txt"
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build took $(( $(date +%s) - start )) s"
grep -E "spill|registers" "$OUT/build.log" | sort | uniq -c | head -20
python3 -c "import jax_sparsek, json; print(jax_sparsek.__file__, json.dumps(jax_sparsek.build_info()))" 2>&1 | tail -1

# TESTS: which test files to run (default: all; CI runs the CPU ones on every submission).
timeout "${TEST_TIMEOUT:-320}" python3 -m pytest -q --durations=10 ${TESTS:-tests} 2>&1 \
  | tee "$OUT/tests.log" | tail -40
# Outside the source tree, so that the installed package (with its kernels) is imported.
if [ "${MAIN_JOB:-1}" = 1 ]; then
  (cd /tmp && python3 -m jax_sparsek) 2>&1 | tee "$OUT/main_job.log" | tail -20
fi
if [ -f bench/torch_compare.py ] && [ "${TORCH_COMPARE:-1}" = 1 ]; then
  (cd /tmp && python3 "$OLDPWD/bench/torch_compare.py") 2>&1 | tee "$OUT/torch_compare.log" | tail -20
fi
if [ "${TRAIN:-0}" = 1 ]; then
  (cd /tmp && timeout 150 python3 -m jax_sparsek.train --json "$OUT/train.json") 2>&1 \
    | tee "$OUT/train.log" | tail -32
fi
# SPARSEK_BENCH: arguments of bench/sparsek_benchmark.py ("all" for its defaults).
if [ -n "${SPARSEK_BENCH:-}" ]; then
  args=${SPARSEK_BENCH/#all/}
  timeout "${SPARSEK_BENCH_TIMEOUT:-400}" python3 bench/sparsek_benchmark.py $args \
    --json "$OUT/sparsek.json" 2>&1 | tee "$OUT/sparsek_bench.log"
fi
# BWD_BENCH: arguments of bench/backward_benchmark.py ("all" for its defaults).
if [ -n "${BWD_BENCH:-}" ]; then
  args=${BWD_BENCH/#all/}
  timeout "${BWD_BENCH_TIMEOUT:-300}" python3 bench/backward_benchmark.py $args \
    --json "$OUT/backward.json" 2>&1 | tee "$OUT/backward_bench.log"
fi
if [ "$#" -gt 0 ]; then
  python3 bench/benchmark.py "$@" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
fi
