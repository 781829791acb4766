#!/usr/bin/env python3
"""ab-summary.py: medians per scenario metric and side from ab-scenarios.sh output (stdin)."""
import json, statistics, sys
from collections import defaultdict

values = defaultdict(lambda: defaultdict(list))
cpu = ""
for line in sys.stdin:
    if line.startswith("cpu:"):
        cpu = line.strip()
        continue
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 4 or not parts[3].startswith("{"):
        continue
    _, scenario, side, blob = parts
    for key, v in json.loads(blob).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and key not in ("size_mib", "full_scans", "pages_shared", "pages_sharing", "ksm_zero_pages"):
            values[(scenario, key)][side].append(v)
print(cpu)
print(f"{'scenario':8} {'metric':22} {'before (median, range)':>30} {'after (median, range)':>30} {'after/before':>12}")
for (scenario, key), sides in values.items():
    b, a = sides.get("before", []), sides.get("after", [])
    if not b or not a:
        continue
    mb, ma = statistics.median(b), statistics.median(a)
    fmt = lambda xs, m: f"{m:.4g} ({min(xs):.4g}-{max(xs):.4g})"
    print(f"{scenario:8} {key:22} {fmt(b, mb):>30} {fmt(a, ma):>30} {ma / mb:12.2f}")
