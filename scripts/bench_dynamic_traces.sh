#!/usr/bin/env bash
# Prefetch hit rate of the coordinator on traces that change between steps,
# adaptive trace policy beside the single-order policy (one recorded order,
# dropped at the first deviation and recorded again on the next step), in
# one run with the same binary. Bookkeeping only (`ztier replay --null-io`):
# the figures are the coordinator's decisions, not the drive's speed.
#
# Traces (generated with `ztier trace gen` into --dir):
#   moe        moe-small, 12 training steps, top-2 of 8 experts per MoE layer,
#              changing every step
#   moe+hints  the same with router hints (`trace gen --hints`)
#   rl         gpt2-xl, 4 rounds of 8 forward-only decode steps then a
#              training step (`--decode-steps 8`)
#   rl-moe     moe-small in the same rounds, without and with hints
# The hit rate is the share of module fetches that needed no demand gather,
# after the warm-up steps (1 for moe, the first round, 9 steps, for rl):
# the steps in which the coordinator first sees each order.
#
# Usage: scripts/bench_dynamic_traces.sh [--ztier PATH] [--dir DIR] [--config YAML]
set -euo pipefail
cd "$(dirname "$0")/.."

ztier=build/ztier
dir=${TMPDIR:-/tmp}/ztier_dynamic_traces
config=""
while (($#)); do
  case $1 in
    --ztier) ztier=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "bench_dynamic_traces: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -x $ztier ]] || { echo "bench_dynamic_traces: no ztier binary at $ztier (build first, or --ztier PATH)" >&2; exit 2; }
mkdir -p "$dir"

gen() {  # name model args...
  local name=$1 model=$2; shift 2
  "$ztier" trace gen --model "configs/models/$model.yaml" "$@" -o "$dir/$name.json" 2>/dev/null
}
gen moe moe-small --steps 12
gen moe_hints moe-small --steps 12 --hints
gen rl gpt2-xl --steps 4 --decode-steps 8
gen rl_moe moe-small --steps 4 --decode-steps 8
gen rl_moe_hints moe-small --steps 4 --decode-steps 8 --hints

printf '%-12s %-9s %8s %9s %8s %8s %8s %8s %10s\n' trace policy warmup "hit rate" invalid orders switches resyncs "guesses" 
for row in "moe 1" "moe_hints 1" "rl 9" "rl_moe 9" "rl_moe_hints 9"; do
  set -- $row
  for policy in single adaptive; do
    out=$("$ztier" replay --trace "$dir/$1.json" --null-io --trace-policy "$policy" \
          --warmup-steps "$2" ${config:+--config "$config"} 2>/dev/null)
    rate=$(sed -n 's/^prefetch hit rate after [0-9]* warm-up steps\{0,1\}: \([0-9.]*\).*/\1/p' <<<"$out")
    inval=$(sed -n 's/.*trace invalidations \([0-9]*\).*/\1/p' <<<"$out")
    read -r orders switches resyncs < <(sed -n \
      's/^trace ([a-z]*): orders \([0-9]*\), .*switches \([0-9]*\), resyncs \([0-9]*\),.*/\1 \2 \3/p' <<<"$out")
    guesses=$(sed -n 's/.*guesses right \([0-9]*\), wrong \([0-9]*\).*/\1\/\2/p' <<<"$out")
    printf '%-12s %-9s %8s %9s %8s %8s %8s %8s %10s\n' "$1" "$policy" "$2" "$rate" "$inval" \
      "$orders" "$switches" "$resyncs" "$guesses"
  done
done
echo "(guesses: speculations right/wrong; hit rate: module fetches without a demand gather)"
