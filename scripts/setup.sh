#!/usr/bin/env bash
# Installs every Debian package that ztier's build, tests, benchmarks and plots
# need. Idempotent: packages already present are left alone (apt-get skips them),
# and `apt-get update` runs first so a fresh machine finds current lists.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  liburing-dev libaio-dev libyaml-cpp-dev libgloo-dev
  libgtest-dev libgmock-dev googletest libbenchmark-dev
  libcli11-dev nlohmann-json3-dev libfmt-dev
  fio time
  python3 python3-venv python3-pip python3-setuptools
  python3-torch python3-numpy python3-matplotlib python3-yaml
  python3-torchvision python3-torchaudio libopenblas0-pthread
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
