#!/usr/bin/env bash
# linux-compare.sh: Linux and Vmm on the same page-fault work, alternating, in one run, so each ratio is
# taken on the same machine at the same moment (the CPU kind changes between sessions). The sibling of
# linux-ksm-compare.sh (KSM merges); this one covers:
#   fault     demand-zero write fault, ns per page   (anchors/linux_fault_cow.c   vs scenario fault)
#   cow       copy-on-write fault after fork, ns      (anchors/linux_fault_cow.c   vs scenario cow)
#   ksm_cow   write to a merged KSM page, ns          (anchors/linux_ksm_bench.c   vs scenario ksm-unmerge)
#   unmerge   run=2 unmerge, ns per merged page       (anchors/linux_ksm_bench.c   vs scenario ksm-unmerge)
# Needs root for the KSM part (the Linux bench drives /sys/kernel/mm/ksm, saving every knob first and
# restoring it at exit); without it, only fault and cow run.
#
#   scripts/linux-compare.sh                  # 256 MiB, 3 rounds
#   ROUNDS=5 SIZE=256 scripts/linux-compare.sh
#
# Prints the CPU model, then one line per round and measure: Linux ns, Vmm ns, and Linux / Vmm (how many
# times faster Vmm is).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=${ANCHORS:-$ROOT/../shared/anchors}
SIZE=${SIZE:-256}
ROUNDS=${ROUNDS:-3}
TMP=${TMPDIR:-/tmp}
for f in linux_fault_cow.c linux_ksm_bench.c; do
  [ -f "$ANCHORS/$f" ] || { echo "no $f in $ANCHORS (set ANCHORS)" >&2; exit 2; }
done
gcc -O2 -Wall -o "$TMP/vmm_linux_fault_cow" "$ANCHORS/linux_fault_cow.c"
gcc -O2 -march=native -Wall -o "$TMP/vmm_linux_ksm_bench" "$ANCHORS/linux_ksm_bench.c"
dotnet build -c Release "$ROOT/Vmm.Bench" -v quiet -nologo > /dev/null
VMM="dotnet $ROOT/Vmm.Bench/bin/Release/net10.0/Vmm.Bench.dll"
ksm=1
[ "$(id -u)" -eq 0 ] && [ -w /sys/kernel/mm/ksm/run ] || ksm=0
field() { sed -E "s/.*\"$1\":([0-9.]+).*/\\1/" <<< "$2"; }
row() {
  local ratio
  ratio=$(awk -v l="$3" -v v="$4" 'BEGIN { if (v > 0) printf "%.2f", l / v; else print "-" }')
  printf '%-9s %5s %10s %10s %7s\n' "$1" "$2" "$3" "$4" "$ratio"
}
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
printf '%-9s %5s %10s %10s %7s\n' measure round linux_ns vmm_ns ratio
for round in $(seq 1 "$ROUNDS"); do
  linux=$("$TMP/vmm_linux_fault_cow" "$SIZE")
  fault=$($VMM scenario fault --size-mib "$SIZE" | tail -1)
  cow=$($VMM scenario cow --size-mib "$SIZE" | tail -1)
  row fault "$round" "$(field linux_fault_ns "$linux")" "$(field fault_ns "$fault")"
  row cow "$round" "$(field linux_cow_ns "$linux")" "$(field cow_ns "$cow")"
  if [ "$ksm" -eq 1 ]; then
    # The whole output first: the bench must finish and restore the knobs.
    out=$("$TMP/vmm_linux_ksm_bench" -s "$SIZE" -m same -p 100000 -t 60)
    metric() { awk -v m="$1" '$1=="metric" && $2==m {print $3}' <<< "$out" | head -1; }
    vmm=$($VMM scenario ksm-unmerge --size-mib "$SIZE" --reps 3 | tail -1)
    row ksm_cow "$round" "$(metric cow_ns_per_page)" "$(field cow_ns "$vmm")"
    row unmerge "$round" "$(metric run2_ns_per_page)" "$(field unmerge_ns "$vmm")"
  fi
done
