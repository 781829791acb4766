#!/usr/bin/env bash
# linux-ksm-compare.sh: Linux's ksmd and Vmm's KSM on the same workloads, alternating, in one run, so
# the ratio is not spoiled by a noisy machine. Needs root (it drives /sys/kernel/mm/ksm; the Linux
# bench saves every knob first and restores it at exit) and the anchor bench source, by default
# ../shared/anchors/linux_ksm_bench.c next to the checkout (LINUX_BENCH=path to override).
#
#   sudo scripts/linux-ksm-compare.sh            # identical, half, unique at 256 MiB, 3 rounds
#   ROUNDS=5 SIZE=256 sudo -E scripts/linux-ksm-compare.sh
#
# Prints one line per round and pattern: Linux merge ms, Vmm merge ms, and the ratio.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${LINUX_BENCH:-$ROOT/../shared/anchors/linux_ksm_bench.c}
SIZE=${SIZE:-256}
ROUNDS=${ROUNDS:-3}
BIN=${TMPDIR:-/tmp}/vmm_linux_ksm_bench
[ -f "$SRC" ] || { echo "no Linux bench source at $SRC (set LINUX_BENCH)" >&2; exit 2; }
# -march=native only for this file (the anchors' mem_limits.c needs AVX-512, which not every machine has).
gcc -O2 -march=native -Wall -o "$BIN" "$SRC"
dotnet build -c Release "$ROOT/Vmm.Bench" -v quiet -nologo > /dev/null
VMM="dotnet $ROOT/Vmm.Bench/bin/Release/net10.0/Vmm.Bench.dll"
linux_mode() { case "$1" in identical) echo same ;; *) echo "$1" ;; esac; }
printf '%-10s %5s %12s %12s %8s\n' pattern round linux_ms vmm_ms ratio
for round in $(seq 1 "$ROUNDS"); do
  for pattern in identical half unique; do
    # Linux: the first merge cycle's time ("merge_time" of cycle 1), pages_to_scan 100000, sleep 0.
    # (The whole output first: the bench must finish its cycles and restore the knobs.)
    out=$("$BIN" -s "$SIZE" -m "$(linux_mode "$pattern")" -p 100000 -t 60)
    linux=$(awk '$1=="metric" && $2=="merge_time_ms" {print $3}' <<< "$out" | head -1)
    out=$($VMM scenario ksm --size-mib "$SIZE" --pattern "$pattern" --reps 3)
    vmm=$(tail -1 <<< "$out" | sed -E 's/.*"merge_ms":([0-9.]+).*/\1/')
    ratio=$(awk -v l="${linux:-0}" -v v="$vmm" 'BEGIN { if (v > 0) printf "%.2f", l / v; else print "-" }')
    printf '%-10s %5s %12s %12s %8s\n' "$pattern" "$round" "${linux:-?}" "$vmm" "$ratio"
  done
done
