#!/usr/bin/env bash
# linux-compact-compare.sh: Linux's compaction and Vmm's on memory fragmented the same way, alternating,
# in one run, so the per-page times are taken on the same machine at the same moment (the sibling of
# linux-offline-compare.sh; issue 13's target: Vmm's compaction beats Linux's per page moved).
#   Linux: ../shared/anchors/linux_compact_bench.c (ANCHORS=dir to override) fills FILL MiB of anonymous
#          memory (default 2048 MiB, at most MAX_FILL: first touches of guest memory can be slow
#          enough here that a fill of most of the machine takes minutes; Linux compacts the whole
#          machine either way, so the fair unit is the time per page moved), frees every other page
#          (MADV_DONTNEED), writes 1 to /proc/sys/vm/compact_memory (timed: every zone of every node),
#          and reports the pages it migrated (pgmigrate_success delta), the scanners' counts and the
#          order >= 9 free blocks before and after; it checks every page it kept. Needs root.
#   Vmm:   scenario compact (a 512 MiB ZONE_MOVABLE fragmented the same way, CompactMemory), median of
#          VMM_ROUNDS rounds after VMM_WARM warm-up rounds, in its own process each round.
# If Linux's compaction cannot run here (not root, no /proc/sys/vm/compact_memory), the script says so
# and still prints Vmm's numbers.
#
#   sudo scripts/linux-compact-compare.sh                   # 3 rounds
#   ROUNDS=5 FILL=8192 sudo -E scripts/linux-compact-compare.sh
#
# Prints the CPU model and the load, then per round: ms and ns per page moved of each, pages moved,
# order >= 9 blocks before -> after, and Linux's ns per page / Vmm's (how many times faster Vmm is).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=${ANCHORS:-$ROOT/../shared/anchors}
ROUNDS=${ROUNDS:-3}
VMM_ROUNDS=${VMM_ROUNDS:-3}
VMM_WARM=${VMM_WARM:-2}
ZONE_MIB=${ZONE_MIB:-512}
TMP=${TMPDIR:-/tmp}
SRC=$ANCHORS/linux_compact_bench.c
BIN=$TMP/vmm_linux_compact_bench
[ -f "$SRC" ] || { echo "no linux_compact_bench.c in $ANCHORS (set ANCHORS)" >&2; exit 2; }
gcc -O2 -Wall -o "$BIN" "$SRC"
dotnet build -c Release "$ROOT/Vmm.Bench" -v quiet -nologo > /dev/null
VMM="dotnet $ROOT/Vmm.Bench/bin/Release/net10.0/Vmm.Bench.dll"

avail_mib=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
MAX_FILL=${MAX_FILL:-$(( avail_mib * 3 / 4 ))}
FILL=${FILL:-2048}
[ "$FILL" -le "$MAX_FILL" ] || FILL=$MAX_FILL

linux_ok=1
why=""
if [ "$(id -u)" -ne 0 ]; then
  linux_ok=0; why="not root (/proc/sys/vm/compact_memory is root's)"
elif [ ! -w /proc/sys/vm/compact_memory ]; then
  linux_ok=0; why="no writable /proc/sys/vm/compact_memory (kernel without CONFIG_COMPACTION)"
fi

field() { sed -nE "s/.*\"$1\":\"?([0-9.]+).*/\\1/p" <<< "$2" | head -1; }

echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1); kernel $(uname -r); $(nproc) cpus; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Linux: fill $FILL MiB of $avail_mib MiB available, compact_memory of the whole machine; Vmm: a $ZONE_MIB MiB zone, median of $VMM_ROUNDS rounds after $VMM_WARM warm-up"
if [ "$linux_ok" -eq 0 ]; then
  echo "LINUX COMPACTION DOES NOT RUN HERE: $why. Only Vmm's numbers follow."
fi
printf '%-6s %-5s %10s %10s %12s %18s  %s\n' who round ms ns/page pages_moved order9_before_after note
linux_worked=0
for round in $(seq 1 "$ROUNDS"); do
  lns=""
  if [ "$linux_ok" -eq 1 ]; then
    rc=0
    out=$(timeout 600 "$BIN" "$FILL" 2>&1 | tail -1) || rc=$?
    if [ "$rc" -eq 0 ] && [ -n "$(field linux_compact_ms "$out")" ]; then
      linux_worked=$((linux_worked + 1))
      lns=$(field linux_ns_per_page_moved "$out")
      printf '%-6s %-5s %10s %10s %12s %18s  %s\n' linux "$round" "$(field linux_compact_ms "$out")" "$lns" \
        "$(field linux_pages_moved "$out")" "$(field order9_before "$out") -> $(field order9_after "$out")" \
        "migrate_scanned $(field migrate_scanned "$out"), free_scanned $(field free_scanned "$out"), corrupted $(field pages_corrupted "$out")"
    else
      echo "LINUX COMPACTION FAILED in round $round (rc $rc): $out"
    fi
  fi
  vmm=$($VMM scenario compact --zone-mib "$ZONE_MIB" --rounds "$VMM_ROUNDS" --warm "$VMM_WARM" | tail -1)
  vns=$(field ns_per_page_moved "$vmm")
  printf '%-6s %-5s %10s %10s %12s %18s  %s\n' vmm "$round" "$(field compact_ms "$vmm")" "$vns" \
    "$(field pages_moved "$vmm")" "$(field order9_before "$vmm") -> $(field order9_after "$vmm")" \
    "of $(field order9_possible "$vmm") possible; $(field compact_vs_move_pages "$vmm") x move_pages' rate; migrate_scanned $(field migrate_scanned "$vmm"), free_scanned $(field free_scanned "$vmm")"
  if [ -n "$lns" ] && [ -n "$vns" ]; then
    echo "       linux ns/page / vmm ns/page: $(awk -v l="$lns" -v v="$vns" 'BEGIN { printf "%.2f", l / v }')"
  fi
done
if [ "$linux_ok" -eq 1 ] && [ "$linux_worked" -eq 0 ]; then
  echo "LINUX COMPACTION DID NOT WORK IN ANY ROUND (see above): only Vmm's numbers are real."
fi
echo "load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
