#!/usr/bin/env bash
# The main job: set up, build, and run the offload benchmark on the default
# NVMe path ($ZTIER_NVME_PATH, else ./ztier_nvme under the working directory).
# Today that is `ztier bench io`: sequential read and write through the
# engine at 1 MiB blocks, queue depth 32, O_DIRECT.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
ztier=${ZTIER_BUILD_DIR:-$root/build}/ztier
nvme=${ZTIER_NVME_PATH:-$PWD/ztier_nvme}
mkdir -p -m 0700 "$nvme"
size=${ZTIER_BENCH_SIZE:-1GiB}
echo "== ztier bench io on $nvme (size $size; set ZTIER_NVME_PATH to use another drive)"
"$ztier" bench io --rw write --bs 1MiB --qd 32 --size "$size" --file "$nvme/bench_io.dat"
"$ztier" bench io --rw read --bs 1MiB --qd 32 --size "$size" --file "$nvme/bench_io.dat"
"$ztier" bench io --rw randread --bs 4KiB --qd 32 --size "$size" --time 5 --file "$nvme/bench_io.dat"
