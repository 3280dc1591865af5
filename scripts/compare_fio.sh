#!/usr/bin/env bash
# Compares `ztier bench io` with fio on the same file, engine, block size and
# queue depth. For each workload x engine it runs N pairs, alternating which
# tool goes first (fio first in odd pairs, ztier first in even ones) so that
# a drift of the drive (thermal, SLC cache, host noise) hits both equally,
# prints each pair and then the median ztier/fio ratio of bandwidth and of
# CPU seconds per GB moved.
#
# Workloads (O_DIRECT unless --buffered):
#   seqread   rw read,      bs 1 MiB, queue depth 32
#   seqwrite  rw write,     bs 1 MiB, queue depth 32
#   randread  rw randread,  bs 4 KiB, queue depth 32, over --rand-size bytes
# Engine psync is synchronous in fio (one request per job at a time), so it
# runs at queue depth 1: fio --ioengine=psync --iodepth=1 --numjobs=1 against
# ztier --backend psync --qd 1 --threads 1.
# --buffered: only seqread, through the page cache (--no-direct, fio
# --direct=0), after a warm-up pass that puts the file in the page cache;
# neither tool drops the cache (fio gets --invalidate=0). That measures the
# tools' own cost, not the disk's.
#
# CPU per GB is CPU seconds (user+sys) per 10^9 bytes moved, two ways:
# "proc", the whole process from exec to exit (fio's job process included),
# from wait4() as /usr/bin/time reports it but with microsecond rather than
# 10 ms precision; and "run", each tool's own figure for its timed window
# (fio usr_cpu+sys_cpu over job_runtime, ztier's getrusage deltas), which
# leaves out start-up (fio spends ~0.2 s CPU before its first I/O).
# Targets printed: bandwidth ratio >= 0.98 sequential, >= 0.95 random and
# buffered; proc CPU ratio <= 1.10 with O_DIRECT.
#
# Usage: scripts/compare_fio.sh [--pairs N] [--file PATH] [--size SIZE]
#          [--rand-size SIZE] [--workloads "seqread seqwrite randread"]
#          [--engines "io_uring libaio psync"] [--buffered] [--out CSV]
#          [--ztier PATH]
# Defaults: 5 pairs; file ${ZTIER_NVME_PATH:-./ztier_nvme}/compare_fio.dat
# (written once with real data before measuring); --size 1GiB for the
# sequential workloads, --rand-size 256MiB for randread (psync's queue depth
# 1 makes larger sizes slow); CSV of every pair in build/compare_fio.csv;
# ztier from $ZTIER, else build/ztier, else build-bench/ztier. Sizes are
# 1024-based and given to both tools in bytes.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
pairs=5
file=${ZTIER_NVME_PATH:-./ztier_nvme}/compare_fio.dat
size=1GiB
rand_size=256MiB
workloads="seqread seqwrite randread"
engines="io_uring libaio psync"
buffered=0
out=build/compare_fio.csv
ztier=${ZTIER:-}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "compare_fio: $*" >&2; exit 2; }

while (($#)); do
  case $1 in
    --pairs) pairs=$2; shift 2 ;;
    --file) file=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --rand-size) rand_size=$2; shift 2 ;;
    --workloads) workloads=$2; shift 2 ;;
    --engines) engines=$2; shift 2 ;;
    --buffered) buffered=1; shift ;;
    --out) out=$2; shift 2 ;;
    --ztier) ztier=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ $pairs =~ ^[1-9][0-9]*$ ]] || die "--pairs '$pairs' must be a positive integer"
command -v fio >/dev/null || die "fio not found (scripts/setup.sh installs it)"
command -v python3 >/dev/null || die "python3 not found"
if [[ -z $ztier ]]; then
  for candidate in "$root/build/ztier" "$root/build-bench/ztier"; do
    if [[ -x $candidate ]]; then ztier=$candidate; break; fi
  done
fi
[[ -n $ztier && -x $ztier ]] || die "ztier binary not found: build it or pass --ztier PATH"
((buffered)) && workloads="seqread"
for w in $workloads; do
  case $w in seqread|seqwrite|randread) ;; *) die "unknown workload '$w'" ;; esac
done
for e in $engines; do
  case $e in io_uring|libaio|psync) ;; *) die "unknown engine '$e'" ;; esac
done

# Sizes go to both tools as plain bytes: fio reads "MiB" as 10^6 by default
# (its kb_base=1024 inverts the IEC names), ztier reads it as 2^20.
to_bytes() {
  python3 - "$1" <<'PY'
import re, sys
m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", sys.argv[1], re.I)
if not m:
    sys.exit(f"compare_fio: size '{sys.argv[1]}' is not bytes or k/m/g/t (1024-based)")
print(int(m[1]) << (10 * " kmgt".index((m[2] or " ").lower())))
PY
}
size=$(to_bytes "$size")
rand_size=$(to_bytes "$rand_size")

mkdir -p "$(dirname "$file")" "$(dirname "$out")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# timed.py OUT CMD...: runs CMD with stdout to OUT (stderr passes through),
# prints "user_s sys_s exit_code" from the child's rusage.
cat >"$tmp/timed.py" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ,
                      file_actions=[(os.POSIX_SPAWN_DUP2, fd, 1)])
_, status, ru = os.wait4(pid, 0)
print(f"{ru.ru_utime:.6f} {ru.ru_stime:.6f} {os.waitstatus_to_exitcode(status)}")
EOF

# result.py KIND JSON: prints "bytes bw_bytes_per_s run_cpu_s" of a fio or
# ztier run; run_cpu_s is the tool's own CPU figure for its timed window
# (fio: usr_cpu+sys_cpu percent of job_runtime; ztier: getrusage deltas).
cat >"$tmp/result.py" <<'EOF'
import json, sys
kind, path = sys.argv[1], sys.argv[2]
text = open(path).read()
doc = json.loads(text[text.index("{"):])  # fio may print notes before it
if kind == "fio":
    job = doc["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    run_cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1e3
    print(side["io_bytes"], side["bw_bytes"], f"{run_cpu:.6f}")
else:
    print(doc["bytes"], doc["bw_bytes_per_s"],
          f"{doc['cpu']['user_s'] + doc['cpu']['sys_s']:.6f}")
EOF

# summary.py CSV: medians per workload and engine, against the targets
# (bandwidth ratio >= 0.98 sequential, >= 0.95 random and buffered; process
# CPU per GB ratio <= 1.10 with O_DIRECT).
cat >"$tmp/summary.py" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
groups = {}
for r in rows:
    groups.setdefault((r["mode"], r["workload"], r["engine"]), []).append(r)
def med(rs, key):
    return statistics.median(float(r[key]) for r in rs)
print()
print("Medians over the pairs (ratios are medians of the per-pair ratios):")
print(f"{'mode':8} {'workload':9} {'engine':8} {'pairs':>5} {'fio GB/s':>9} "
      f"{'ztier GB/s':>10} {'bw ratio':>8} {'target':>9}  {'fio cpu/GB':>10} "
      f"{'ztier cpu/GB':>12} {'cpu ratio':>9} {'target':>9} {'run cpu ratio':>13}")
for (mode, workload, engine), rs in groups.items():
    ratio = med(rs, "bw_ratio")
    cpu_ratio = med(rs, "cpu_ratio")
    if mode == "buffered":
        target, cpu_target = 0.95, None
    elif workload == "randread":
        target, cpu_target = 0.95, 1.10
    else:
        target, cpu_target = 0.98, 1.10
    ok = "ok" if ratio >= target else "BELOW"
    cpu_ok = "-" if cpu_target is None else (
        "ok" if cpu_ratio <= cpu_target else "ABOVE")
    bw_t = f">={target:.2f} {ok}"
    cpu_t = "-" if cpu_target is None else f"<={cpu_target:.1f} {cpu_ok}"
    print(f"{mode:8} {workload:9} {engine:8} {len(rs):5d} "
          f"{med(rs, 'fio_bw') / 1e9:9.3f} {med(rs, 'ztier_bw') / 1e9:10.3f} "
          f"{ratio:8.3f} {bw_t:>9}  {med(rs, 'fio_cpu_per_gb'):10.4f} "
          f"{med(rs, 'ztier_cpu_per_gb'):12.4f} {cpu_ratio:9.3f} {cpu_t:>9} "
          f"{med(rs, 'run_cpu_ratio'):13.3f}")
EOF

mode=direct
direct_fio=1
direct_ztier=--direct
if ((buffered)); then
  mode=buffered
  direct_fio=0
  direct_ztier=--no-direct
fi

# Lay the file out once with real data (an unwritten extent reads as zeros
# without touching the disk), outside any measurement.
echo "compare_fio: writing $file ($size) with ztier before measuring" >&2
"$ztier" bench io --rw write --bs 1MiB --qd 32 --size "$size" --file "$file" \
  "$direct_ztier" --json >/dev/null
if ((buffered)); then
  echo "compare_fio: warming the page cache with a buffered read of $file" >&2
  "$ztier" bench io --rw read --bs 1MiB --qd 32 --size "$size" --file "$file" \
    --no-direct --backend psync --json >/dev/null
fi

echo "mode,workload,engine,pair,first,fio_bw,ztier_bw,bw_ratio,fio_bytes,ztier_bytes,fio_cpu_s,ztier_cpu_s,fio_cpu_per_gb,ztier_cpu_per_gb,cpu_ratio,fio_run_cpu_per_gb,ztier_run_cpu_per_gb,run_cpu_ratio" >"$out"

# run_tool TOOL ENGINE RW BS QD SIZE: runs one measurement, sets bytes, bw, cpu.
run_tool() {
  local tool=$1 engine=$2 rw=$3 bs=$4 qd=$5 sz=$6
  local -a cmd
  if [[ $tool == fio ]]; then
    cmd=(fio --name=compare --filename="$file" --size="$sz" --rw="$rw" --bs="$bs"
         --iodepth="$qd" --numjobs=1 --ioengine="$engine" --direct="$direct_fio"
         --invalidate=0 --output-format=json)
  else
    cmd=("$ztier" bench io --backend "$engine" --rw "$rw" --bs "$bs" --qd "$qd"
         --threads 1 --size "$sz" --file "$file" "$direct_ztier" --json)
  fi
  local user sys rc
  read -r user sys rc < <(python3 "$tmp/timed.py" "$tmp/$tool.json" "${cmd[@]}")
  if [[ $rc != 0 ]]; then
    echo "compare_fio: $tool failed (exit $rc): ${cmd[*]}" >&2
    cat "$tmp/$tool.json" >&2
    exit 1
  fi
  read -r bytes bw run_cpu < <(python3 "$tmp/result.py" "$tool" "$tmp/$tool.json")
  cpu=$(python3 -c "print(f'{$user + $sys:.6f}')")
}

echo "cpu/GB: CPU seconds (user+sys) per 10^9 bytes moved; 'process' is the whole"
echo "process from exec to exit, 'run' the tool's own figure for its timed window."
printf '%-8s %-9s %-8s %4s %-5s %10s %10s %7s %11s %11s %7s %11s %11s %7s\n' \
  mode workload engine pair first "fio GB/s" "ztier GB/s" ratio \
  "fio proc" "ztier proc" ratio "fio run" "ztier run" ratio
for workload in $workloads; do
  case $workload in
    seqread) rw=read bs=1048576 sz=$size ;;
    seqwrite) rw=write bs=1048576 sz=$size ;;
    randread) rw=randread bs=4096 sz=$rand_size ;;
  esac
  for engine in $engines; do
    qd=32
    [[ $engine == psync ]] && qd=1
    for ((pair = 1; pair <= pairs; pair++)); do
      if ((pair % 2)); then order="fio ztier"; else order="ztier fio"; fi
      for tool in $order; do
        run_tool "$tool" "$engine" "$rw" "$bs" "$qd" "$sz"
        eval "${tool}_bytes=$bytes ${tool}_bw=$bw ${tool}_cpu=$cpu ${tool}_run_cpu=$run_cpu"
      done
      # shellcheck disable=SC2154  # set by the eval above
      line=$(python3 - "$fio_bw" "$ztier_bw" "$fio_bytes" "$ztier_bytes" \
               "$fio_cpu" "$ztier_cpu" "$fio_run_cpu" "$ztier_run_cpu" <<'EOF'
import sys
fb, zb, fbytes, zbytes, fc, zc, frc, zrc = map(float, sys.argv[1:])
fgb, zgb = fbytes / 1e9, zbytes / 1e9
fpg, zpg = fc / fgb, zc / zgb
frpg, zrpg = frc / fgb, zrc / zgb
print(f"{fb:.0f} {zb:.0f} {zb / fb:.4f} {fc:.6f} {zc:.6f} {fpg:.6f} {zpg:.6f} "
      f"{zpg / fpg:.4f} {frpg:.6f} {zrpg:.6f} {zrpg / frpg if frpg else 0:.4f}")
EOF
)
      read -r fbw zbw ratio fc zc fpg zpg cratio frpg zrpg rcratio <<<"$line"
      first=${order%% *}
      echo "$mode,$workload,$engine,$pair,$first,$fbw,$zbw,$ratio,$fio_bytes,$ztier_bytes,$fc,$zc,$fpg,$zpg,$cratio,$frpg,$zrpg,$rcratio" >>"$out"
      printf '%-8s %-9s %-8s %4d %-5s %10.3f %10.3f %7.3f %11.4f %11.4f %7.3f %11.4f %11.4f %7.3f\n' \
        "$mode" "$workload" "$engine" "$pair" "$first" \
        "$(python3 -c "print($fbw/1e9)")" "$(python3 -c "print($zbw/1e9)")" \
        "$ratio" "$fpg" "$zpg" "$cratio" "$frpg" "$zrpg" "$rcratio"
    done
  done
done

python3 "$tmp/summary.py" "$out"
echo
echo "compare_fio: all pairs in $out"
