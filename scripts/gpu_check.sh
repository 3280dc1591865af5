#!/usr/bin/env bash
# The GPU check: runs ztier's CUDA and NCCL paths on a machine with a GPU,
# from binaries built elsewhere with static liburing/libaio/yaml-cpp:
#
#   here:   ZTIER_BUILD_DIR=build-gpu scripts/build.sh -DZTIER_STATIC_DEPS=ON \
#             -DZTIER_BUILD_BENCHMARKS=OFF && scripts/gpu_check.sh --pack build-gpu .gpu
#   there:  scripts/gpu_check.sh --run .gpu     (results under $OUT or .gpu/out)
#
# --run executes the test binaries (device, collective, coordinator, swapper,
# engine suites: the CUDA/NCCL cases skip nowhere here) and the benchmarks
# (bench io, bench swap, replay and bench step on the GPU), then ztier.torch
# on CUDA (scripts/torch_device_check.py: a GPT and resnet18 against plain
# torch on the GPU) where torch with CUDA is importable; prints a summary.
set -uo pipefail

pack() {
  local build=$1 dest=$2
  rm -rf "$dest" && mkdir -p "$dest/tests"
  cp "$build/ztier" "$dest/"
  for t in tiering_device_test tiering_cudart_test tiering_pinned_pool_test \
           coordinator_nccl_api_test coordinator_collective_test \
           coordinator_coordinator_test swapper_param_swapper_test io_engine_test \
           io_backend_test base_crc32c_test; do
    [[ -x $build/tests/$t ]] && cp "$build/tests/$t" "$dest/tests/"
  done
  strip "$dest/ztier" "$dest"/tests/* 2>/dev/null
  cp -r configs "$dest/"
  # ztier.torch on the GPU: the shared library, the package and its check.
  mkdir -p "$dest/lib" "$dest/scripts"
  cp -L "$build/lib/libztier.so" "$dest/lib/" 2>/dev/null
  cp -r python "$dest/"
  cp scripts/torch_device_check.py scripts/bench_torch_step.py "$dest/scripts/"
  du -sh "$dest"
}

run() {
  local dir=$1
  local out=${OUT:-$dir/out}
  mkdir -p "$out"
  local nccl
  nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
  [[ -z $nccl ]] && nccl=$(dirname "$(find / -name 'libnccl.so.2' 2>/dev/null | head -1)")
  export LD_LIBRARY_PATH=$nccl:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  export ZTIER_TEST_TMPDIR=$PWD/gpu_check_tmp
  mkdir -p "$ZTIER_TEST_TMPDIR"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  local failed=0
  for t in "$dir"/tests/*; do
    local name; name=$(basename "$t")
    local filter='*'
    # The engine and swapper suites are CPU paths already run in CI; here only
    # their io_uring cases, as a smoke test of the static build.
    [[ $name == io_engine_test || $name == swapper_param_swapper_test ]] && filter='*io_uring*'
    timeout 300 "$t" --gtest_filter="$filter" > "$out/$name.log" 2>&1
    local rc=$?
    local summary; summary=$(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/$name.log" | tr '\n' ' ')
    echo "$name rc=$rc $summary"
    ((rc != 0)) && failed=1
  done
  local nvme=$PWD/gpu_check_nvme
  mkdir -p "$nvme"
  "$dir/ztier" bench io --rw write --bs 1MiB --qd 32 --size 2GiB --file "$nvme/io.dat" --json > "$out/bench_io_write.json" 2>&1
  "$dir/ztier" bench io --rw read --bs 1MiB --qd 32 --size 2GiB --file "$nvme/io.dat" --json > "$out/bench_io_read.json" 2>&1
  cat "$out/bench_io_write.json" "$out/bench_io_read.json"
  "$dir/ztier" bench swap --dir "$nvme" --runs 3 2>&1 | grep -v 'info:' | tee "$out/bench_swap.txt"
  "$dir/ztier" trace gen --model "$dir/configs/models/llama2-7b.yaml" --scale 16 --steps 3 -o "$out/llama7b_s16.json" 2>/dev/null
  printf 'tiers:\n  nvme: {paths: [%s], buffer_count: 8, buffer_size: 16e6}\n' "$nvme" > "$out/gpu.yaml"
  "$dir/ztier" replay --trace "$out/llama7b_s16.json" --config "$out/gpu.yaml" --device cuda 2>&1 | tee "$out/replay_cuda.txt"
  if "$dir/ztier" bench step --help > /dev/null 2>&1; then
    "$dir/ztier" bench step --model "$dir/configs/models/llama2-7b.yaml" --scale 16 --steps 4 \
      --config "$out/gpu.yaml" --compute none --timeline "$out/timeline.json" 2>&1 | tee "$out/bench_step.txt"
  fi
  if [[ -f $dir/lib/libztier.so ]] && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    ZTIER_LIBRARY=$dir/lib/libztier.so PYTHONPATH=$dir/python \
      timeout 300 python3 "$dir/scripts/torch_device_check.py" --dir "$nvme" 2>&1 | tee "$out/torch_cuda.txt"
    ((${PIPESTATUS[0]} != 0)) && failed=1
  fi
  rm -rf "$nvme" "$ZTIER_TEST_TMPDIR"
  return $failed
}

case "${1:-}" in
  --pack) pack "${2:-build-gpu}" "${3:-.gpu}" ;;
  --run) run "${2:-.gpu}" ;;
  *) echo "usage: $0 --pack BUILD DEST | --run DIR" >&2; exit 2 ;;
esac
