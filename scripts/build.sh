#!/usr/bin/env bash
# Configures and builds ztier (Release) into build/ (or $ZTIER_BUILD_DIR).
# Extra arguments go to cmake's configure step, e.g.
#   scripts/build.sh -DZTIER_WITH_CUDA=OFF
# The CLI is then build/ztier.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${ZTIER_BUILD_DIR:-$root/build}
type=${ZTIER_BUILD_TYPE:-Release}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [[ ! -f $build/CMakeCache.txt ]]; then
  cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE="$type" "$@"
elif (($#)); then
  cmake -S "$root" -B "$build" "$@"
fi
cmake --build "$build" -j "$(nproc)"
