#!/usr/bin/env bash
# The main job: set up, build, and run the step benchmark with
# configs/default.yaml on the default NVMe path ($ZTIER_NVME_PATH, else
# ./ztier_nvme under the working directory):
#   1. `ztier bench step` on the tiny model (seconds: checks the whole path),
#   2. `ztier bench step` on LLaMA-2 7B scaled by 1/64 (same layers and
#      modules, ~200 MB of parameters), with a Perfetto timeline,
#   3. `ztier bench optimizer` on the same shape: the AdamW step with its
#      state (~1.3 GB, twice on disk) on NVMe.
# Each prints its summary table (step time against the bound: for the step,
# effective against measured NVMe bandwidth, stalls, prefetch hit rate; for
# the optimizer, the drive's time for its bytes and the update's in memory).
# Environment: ZTIER_BUILD_DIR (default build/), ZTIER_NVME_PATH,
# ZTIER_STEP_SCALE (default 64), ZTIER_STEP_COMPUTE (default balanced).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
ztier=${ZTIER_BUILD_DIR:-$root/build}/ztier
export ZTIER_NVME_PATH=${ZTIER_NVME_PATH:-$PWD/ztier_nvme}
mkdir -p -m 0700 "$ZTIER_NVME_PATH"
config=$root/configs/default.yaml
scale=${ZTIER_STEP_SCALE:-64}
compute=${ZTIER_STEP_COMPUTE:-balanced}
timeline=$PWD/ztier_step_timeline.json

extra=()
# Swap buffers are page-locked; without the privilege or a memlock limit
# large enough, run with pageable buffers instead of failing.
if [[ $(id -u) -ne 0 && $(ulimit -l) != unlimited ]]; then
  echo "== memlock limit is $(ulimit -l) KiB: running with --allow-unpinned"
  extra+=(--allow-unpinned)
fi

echo "== ztier bench step: tiny model, config $config, NVMe path $ZTIER_NVME_PATH"
"$ztier" bench step --model "$root/configs/models/tiny.yaml" --config "$config" \
  --steps 3 "${extra[@]}"
echo
echo "== ztier bench step: llama2-7b scaled 1/$scale, compute $compute"
"$ztier" bench step --model "$root/configs/models/llama2-7b.yaml" --config "$config" \
  --scale "$scale" --steps 3 --compute "$compute" --timeline "$timeline" "${extra[@]}"
echo
echo "== ztier bench optimizer: llama2-7b scaled 1/$scale, AdamW state on NVMe"
"$ztier" bench optimizer --model "$root/configs/models/llama2-7b.yaml" --config "$config" \
  --scale "$scale" --runs 3
echo
echo "timeline: $timeline (open in https://ui.perfetto.dev)"
