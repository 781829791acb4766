#!/usr/bin/env bash
# growth.sh: how Vmm's per-page costs grow with the size of the memory worked on (issue 14's growth
# curve): the demand-zero fault (scenario fault) and a KSM merge of unique and identical pages (scenario
# ksm; unique: two full scans, as the Linux anchor waits for), at 64 MiB to 8 GiB, with Linux's ksmd
# on the same KSM work beside it (../shared/anchors/linux_ksm_bench.c, as root; skipped otherwise).
#
#   scripts/growth.sh                         # 64 256 1024 4096 8192 MiB
#   SIZES="256 1024" scripts/growth.sh
#
# Prints one line per size and measure: ns per page for Vmm (and Linux), and Vmm's per-page cost
# relative to its cost at 256 MiB (the curve: flat is 1.00). Needs about 2.5x the largest size in free
# memory (the KSM machine's nodes are sized for a copy and slack) and a quiet machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=${ANCHORS:-$ROOT/../shared/anchors}
SIZES=${SIZES:-"64 256 1024 4096 8192"}
TMP=${TMPDIR:-/tmp}
dotnet build -c Release "$ROOT/Vmm.Bench" -v quiet -nologo > /dev/null
VMM="dotnet $ROOT/Vmm.Bench/bin/Release/net10.0/Vmm.Bench.dll"
linux=0
if [ "$(id -u)" -eq 0 ] && [ -w /sys/kernel/mm/ksm/run ] && [ -f "$ANCHORS/linux_ksm_bench.c" ]; then
  gcc -O2 -march=native -Wall -o "$TMP/vmm_linux_ksm_bench" "$ANCHORS/linux_ksm_bench.c"
  linux=1
fi
field() { sed -E "s/.*\"$1\":([0-9.]+).*/\\1/" <<< "$2"; }
declare -A base
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
printf '%-14s %7s %12s %12s %9s\n' measure size_mib vmm_ns_page linux_ns_page vs_256mib
for size in $SIZES; do
  pages=$((size * 256))
  out=$($VMM scenario fault --size-mib "$size" --reps 3 | tail -1)
  rows=("fault $(field fault_ns "$out") -")
  for pattern in unique identical; do
    out=$($VMM scenario ksm --size-mib "$size" --pattern "$pattern" --reps 1 | tail -1)
    vmm=$(awk -v ms="$(field merge_ms "$out")" -v n="$pages" 'BEGIN { printf "%.1f", ms * 1e6 / n }')
    lin=-
    if [ "$linux" -eq 1 ]; then
      mode=$pattern; [ "$pattern" = identical ] && mode=same
      lout=$("$TMP/vmm_linux_ksm_bench" -s "$size" -m "$mode" -p 100000 -t 600)
      lms=$(awk '$1=="metric" && $2=="merge_time_ms" {print $3}' <<< "$lout" | head -1)
      [ -n "$lms" ] && lin=$(awk -v ms="$lms" -v n="$pages" 'BEGIN { printf "%.1f", ms * 1e6 / n }')
    fi
    rows+=("ksm_$pattern $vmm $lin")
  done
  for row in "${rows[@]}"; do
    read -r name vmm lin <<< "$row"
    [ "$size" = 256 ] && base[$name]=$vmm
    rel=-
    [ -n "${base[$name]:-}" ] && rel=$(awk -v v="$vmm" -v b="${base[$name]}" 'BEGIN { printf "%.2f", v / b }')
    printf '%-14s %7s %12s %12s %9s\n' "$name" "$size" "$vmm" "$lin" "$rel"
  done
done
