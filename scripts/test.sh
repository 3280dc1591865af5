#!/usr/bin/env bash
# Sets up a fresh machine (Debian packages), builds ztier and runs every test
# suite with ctest. Exits non-zero on any failure. Tests that need a GPU skip
# with a printed reason where none is present.
#   scripts/test.sh              setup + Release build in build/ + ctest
#   ZTIER_BUILD_DIR=... ZTIER_BUILD_TYPE=Debug scripts/test.sh -DZTIER_SANITIZE=address,undefined
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${ZTIER_BUILD_DIR:-$root/build}
"$root/scripts/setup.sh"
ZTIER_BUILD_DIR=$build "$root/scripts/build.sh" "$@"
cd "$build"
ctest --output-on-failure -j "$(nproc)" --timeout 900
