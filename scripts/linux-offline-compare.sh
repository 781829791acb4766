#!/usr/bin/env bash
# linux-offline-compare.sh: Linux's memory offline and Vmm's on a block full of anonymous pages,
# alternating, in one run, so each ratio is taken on the same machine at the same moment (the sibling
# of linux-compare.sh and linux-ksm-compare.sh; issue 12's targets: Vmm's offline of a 128 MiB block at
# least 2.5x faster than Linux's, its online faster too).
#   Linux: ../shared/anchors/linux_offline_bench.c (ANCHORS=dir to override) fills FILL MiB of
#          anonymous memory, writes "offline" to the state file of the memory block holding most of its
#          pages (timed), checks every page, writes "online" (timed). Needs root and a kernel with
#          CONFIG_MEMORY_HOTREMOVE; it puts the block back online itself. The block it picks is not
#          always all its own pages (it prints how many are), and a block holding an unmovable page
#          cannot go offline at all (EBUSY): then this script tries again with twice the fill, up to
#          MAX_FILL MiB (default: half of MemAvailable).
#   Vmm:   scenario offline --block-mib B (B: Linux's block size, so both move the same amount), median
#          of VMM_ROUNDS measured rounds after VMM_WARM warm-up rounds, in its own process each round.
# If Linux's offline cannot run here (not root, no memory hotplug in sysfs, or every try EBUSY), the
# script says so and still prints Vmm's numbers. Safety: each Linux run is bounded by a timeout that
# sends SIGINT (a signal interrupts an offline in progress, which the kernel rolls back), and after
# each run any block that was online before and is not now is onlined again.
#
#   sudo scripts/linux-offline-compare.sh                    # 3 rounds
#   ROUNDS=5 FILL=8192 KSM=1 sudo -E scripts/linux-offline-compare.sh
#
# Prints the CPU model and the load, then per round: Linux ms, Vmm ms and Linux / Vmm (how many times
# faster Vmm is) for the offline and the online; with KSM=1 also Vmm's offline-ksm (no Linux twin).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=${ANCHORS:-$ROOT/../shared/anchors}
ROUNDS=${ROUNDS:-3}
FILL=${FILL:-4096}
VMM_ROUNDS=${VMM_ROUNDS:-3}
VMM_WARM=${VMM_WARM:-2}
KSM=${KSM:-0}
TMP=${TMPDIR:-/tmp}
SYSMEM=/sys/devices/system/memory
SRC=$ANCHORS/linux_offline_bench.c
BIN=$TMP/vmm_linux_offline_bench
[ -f "$SRC" ] || { echo "no linux_offline_bench.c in $ANCHORS (set ANCHORS)" >&2; exit 2; }
gcc -O2 -Wall -o "$BIN" "$SRC"
dotnet build -c Release "$ROOT/Vmm.Bench" -v quiet -nologo > /dev/null
VMM="dotnet $ROOT/Vmm.Bench/bin/Release/net10.0/Vmm.Bench.dll"

# Can Linux offline memory here?
linux_ok=1
why=""
if [ "$(id -u)" -ne 0 ]; then
  linux_ok=0; why="not root (the state files of $SYSMEM are root's)"
elif [ ! -r "$SYSMEM/block_size_bytes" ]; then
  linux_ok=0; why="no $SYSMEM (kernel without CONFIG_MEMORY_HOTPLUG)"
elif [ ! -w "$(ls -d "$SYSMEM"/memory*/state | head -1)" ]; then
  linux_ok=0; why="the block state files are not writable"
fi
if [ -r "$SYSMEM/block_size_bytes" ]; then
  BLOCK_MIB=${BLOCK_MIB:-$(( 0x$(cat "$SYSMEM/block_size_bytes") >> 20 ))}
else
  BLOCK_MIB=${BLOCK_MIB:-128}
fi
avail_mib=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
MAX_FILL=${MAX_FILL:-$(( avail_mib / 2 ))}

online_blocks() { grep -l '^online' "$SYSMEM"/memory*/state 2>/dev/null | sort || true; }
# Every block that was online before the Linux run and is not now goes online again.
restore() {
  local before=$1 f
  for f in $(comm -23 <(echo "$before") <(online_blocks)); do
    echo "restoring $(dirname "$f") to online" >&2
    echo online > "$f" || echo "could not online $(dirname "$f") again: do it by hand" >&2
  done
}

# One Linux offline: sets linux_off, linux_on, linux_note; returns 1 if it could not offline.
linux_run() {
  local fill=$FILL out rc before
  linux_off=""; linux_on=""; linux_note=""
  while :; do
    before=$(online_blocks)
    rc=0
    out=$(timeout -s INT 300 "$BIN" "$fill" 2>&1) || rc=$?
    restore "$before"
    if [ "$rc" -eq 0 ]; then
      linux_off=$(awk '$1=="metric" && $2=="offline_ms" {print $3}' <<< "$out")
      linux_on=$(awk '$1=="metric" && $2=="online_ms" {print $3}' <<< "$out")
      linux_note=$(sed -n 's/^block_size_mib.*best_block \([0-9]*\) our_pages_in_block \([0-9]*\) of \([0-9]*\).*/block \1, its pages \2 of \3/p' <<< "$out")", fill $fill MiB"
      return 0
    fi
    linux_note="fill $fill MiB: rc $rc: $(tr '\n' ' ' <<< "$out")"
    # EBUSY (an unmovable page in the block it picked): a bigger fill owns whole blocks more often.
    if grep -q "Device or resource busy" <<< "$out" && [ $((fill * 2)) -le "$MAX_FILL" ]; then
      echo "linux: $linux_note; trying again with $((fill * 2)) MiB" >&2
      fill=$((fill * 2))
      continue
    fi
    return 1
  done
}

field() { sed -nE "s/.*\"$1\":([0-9.]+).*/\\1/p" <<< "$2"; }
row() {
  local ratio
  ratio=$(awk -v l="$3" -v v="$4" 'BEGIN { if (l != "" && l != "-" && v > 0) printf "%.2f", l / v; else print "-" }')
  printf '%-11s %5s %10s %10s %7s  %s\n' "$1" "$2" "${3:--}" "$4" "$ratio" "${5:-}"
}

echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1); kernel $(uname -r); $(nproc) cpus; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "block ${BLOCK_MIB} MiB; Vmm: median of $VMM_ROUNDS rounds after $VMM_WARM warm-up per process; Linux: one offline per round (fill $FILL MiB, at most $MAX_FILL)"
if [ "$linux_ok" -eq 0 ]; then
  echo "LINUX MEMORY OFFLINE DOES NOT WORK HERE: $why. Only Vmm's numbers follow."
fi
linux_worked=0
printf '%-11s %5s %10s %10s %7s  %s\n' measure round linux_ms vmm_ms ratio note
for round in $(seq 1 "$ROUNDS"); do
  if [ "$linux_ok" -eq 1 ]; then
    if linux_run; then
      linux_worked=$((linux_worked + 1))
    else
      echo "LINUX MEMORY OFFLINE FAILED in round $round: $linux_note"
      linux_note="linux failed"
    fi
  fi
  vmm=$($VMM scenario offline --block-mib "$BLOCK_MIB" --rounds "$VMM_ROUNDS" --warm "$VMM_WARM" | tail -1)
  row offline "$round" "$linux_off" "$(field offline_ms "$vmm")" "${linux_note:-}"
  row online "$round" "$linux_on" "$(field online_ms "$vmm")"
  echo "            vmm: $(field pages_moved "$vmm") pages, $(field move_gbps "$vmm") GB/s vs memcpy $(field memcpy_gbps "$vmm") GB/s, offline min $(field offline_ms_min "$vmm") max $(field offline_ms_max "$vmm") ms, CPU $(field offline_cpu_ms "$vmm") ms (of which the host's madvise of a block ~$(field host_decommit_ms "$vmm") ms)"
  if [ "$KSM" -eq 1 ]; then
    vmm=$($VMM scenario offline-ksm --block-mib "$BLOCK_MIB" --rounds "$VMM_ROUNDS" --warm "$VMM_WARM" | tail -1)
    row offline-ksm "$round" "" "$(field offline_ms "$vmm")" "Vmm only: $(field ksm_pages_in_block "$vmm") KSM pages in the block"
  fi
  linux_off=""; linux_on=""; linux_note=""
done
if [ "$linux_ok" -eq 1 ] && [ "$linux_worked" -eq 0 ]; then
  echo "LINUX MEMORY OFFLINE DID NOT WORK IN ANY ROUND (see the failures above): only Vmm's numbers are real."
fi
echo "load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
