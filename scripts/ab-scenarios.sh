#!/usr/bin/env bash
# ab-scenarios.sh: the same scenarios from two checkouts, alternating in one run, so a refactoring can
# be shown to be within noise on the machine of the day (the CPU changes between sessions).
#
#   scripts/ab-scenarios.sh /path/to/before-checkout            # before vs this checkout, 3 rounds
#   ROUNDS=5 SCENARIOS="fault cow" scripts/ab-scenarios.sh ../wt-before
#
# Prints one line per round, scenario and side with the scenario's JSON result, then the CPU model.
set -euo pipefail
AFTER=$(cd "$(dirname "$0")/.." && pwd)
BEFORE=$(cd "${1:?usage: ab-scenarios.sh BEFORE_CHECKOUT}" && pwd)
ROUNDS=${ROUNDS:-3}
SCENARIOS=${SCENARIOS:-"access fault cow alloc fork flush ksm"}
for tree in "$BEFORE" "$AFTER"; do
  dotnet build -c Release "$tree/Vmm.Bench" -v quiet -nologo > /dev/null
done
args_of() { case "$1" in ksm) echo "--pattern identical" ;; *) echo "" ;; esac; }
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
for round in $(seq 1 "$ROUNDS"); do
  for s in $SCENARIOS; do
    for side in before after; do
      tree=$BEFORE; [ "$side" = after ] && tree=$AFTER
      # shellcheck disable=SC2046
      out=$(dotnet "$tree/Vmm.Bench/bin/Release/net10.0/Vmm.Bench.dll" scenario "$s" $(args_of "$s") 2>/dev/null | tail -1)
      printf '%s\t%s\t%s\t%s\n' "$round" "$s" "$side" "$out"
    done
  done
done
