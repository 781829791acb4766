using System.Diagnostics;
using Vmm.Memory;
using Vmm.Migration;

namespace Vmm.Bench.Scenarios;

/// <summary>
/// scenario migrate-ksm: 256 MiB of merged mappings moved to the other node. N processes (--mappings,
/// default 2) each map size/N MiB of the same contents (every page different from the others, equal to
/// the same page of the other processes), merged by KSM into size/N MiB of KSM pages, each mapped N times.
/// The KSM pages then go back and forth between the nodes by move_pages (the first process names its
/// pages, MPOL_MF_MOVE_ALL since each is mapped more than once): each move migrates every KSM page with
/// all its mappings (the engine finds them through the stable node's rmap items and switches the stable
/// node to the new frame). Reported per KSM page moved and per mapping moved; the engine alone (pages
/// isolated first, only MigratePages timed) as extra fields. The first rounds (tier-up, host faults on
/// frames never handed out) are left out.
/// </summary>
internal sealed class MigrateKsmScenario : IScenario
{
    public string Name => "migrate-ksm";

    public string Description => "KSM pages of N MiB of merged mappings moved node to node: ns per KSM page and per mapping (--size-mib 256, --mappings 2, --reps 5)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int sizeMib = args.GetInt("size-mib", 256);
        int mappings = args.GetInt("mappings", 2);
        int reps = args.GetInt("reps", 5);
        if (mappings < 2 || mappings > 256 || sizeMib % mappings != 0)
            throw new ArgumentException("--mappings must be 2 to 256 (max_page_sharing) and divide --size-mib");
        int pages = sizeMib * 256 / mappings; // KSM pages, each mapped `mappings` times
        ulong bytes = (ulong)pages * Topology.PageSize;
        using Machine machine = MmScenario.NewMachine(nodeMib: Math.Max(512, (sizeMib + 128 + 127) / 128 * 128));
        var processes = new List<(VmProcess Process, ulong Va)>();
        for (int i = 0; i < mappings; i++)
            processes.Add(KsmPatterns.Map(machine, "unique", pages));
        Vmm.Ksm ksm = machine.Ksm!;
        long merge = Stopwatch.GetTimestamp();
        KsmStats stats = ksm.GetStats();
        for (int scans = 0; scans < 6 && !(stats.PagesShared == pages && stats.PagesSharing == (long)pages * (mappings - 1)); scans++)
        {
            ksm.RunFullScans(1);
            stats = ksm.GetStats();
        }
        if (stats.PagesShared != pages || stats.PagesSharing != (long)pages * (mappings - 1))
            throw new InvalidOperationException($"not merged: pages_shared {stats.PagesShared}, pages_sharing {stats.PagesSharing}; expected {pages} and {(long)pages * (mappings - 1)}");
        double mergeMs = Stopwatch.GetElapsedTime(merge).TotalMilliseconds;
        Console.WriteLine($"merged {sizeMib} MiB of mappings into {pages:N0} KSM pages ({mappings} mappings each) in {mergeMs:F0} ms");

        (VmProcess first, ulong va) = processes[0];
        int node = first.GetPagemap(va).Node;
        var from = new List<long>(pages);
        var addresses = new ulong[pages];
        for (int i = 0; i < pages; i++)
            addresses[i] = va + (ulong)i * Topology.PageSize;
        var targets = new int[pages];
        var status = new int[pages];
        var moves = new List<double>();
        var engineMoves = new List<double>();
        const int WarmRounds = 4; // tier-up, and the host faults of frames of both nodes never handed out before
        for (int r = 0; r < Math.Max(2, reps) + WarmRounds; r++)
        {
            int target = 1 - node;
            double ns = MoveByMovePages(first, addresses, targets, status, target);
            node = target;
            if (r >= WarmRounds)
                moves.Add(ns);
        }
        for (int r = 0; r < Math.Max(2, reps) + 2; r++)
        {
            int target = 1 - node;
            double ns = MoveByEngine(machine, first, va, pages, from, target);
            node = target;
            if (r >= 2)
                engineMoves.Add(ns);
        }

        // Every mapping of every page is on the node moved to, still merged, with its contents.
        byte[] expected = new byte[Topology.PageSize], actual = new byte[Topology.PageSize];
        foreach ((VmProcess p, ulong at) in processes)
        {
            for (int i = 0; i < pages; i++)
            {
                PagemapEntry entry = p.GetPagemap(at + (ulong)i * Topology.PageSize);
                if (!entry.Ksm || entry.Node != node || entry.MapCount != mappings)
                    throw new InvalidOperationException($"{p} page {i}: ksm {entry.Ksm}, node {entry.Node} (expected {node}), mapcount {entry.MapCount}");
                if (i % 64 == 0)
                {
                    KsmPatterns.Fill("unique", i, pages, expected);
                    p.Read(at + (ulong)i * Topology.PageSize, actual);
                    if (!expected.AsSpan().SequenceEqual(actual))
                        throw new InvalidOperationException($"{p} page {i}: contents changed by the moves");
                }
            }
        }
        KsmStats after = ksm.GetStats();
        if (after.PagesShared != pages || after.PagesSharing != (long)pages * (mappings - 1))
            throw new InvalidOperationException($"sharing changed by the moves: pages_shared {after.PagesShared}, pages_sharing {after.PagesSharing}");
        IReadOnlyList<string> audit = machine.Audit();
        if (audit.Count > 0)
            throw new InvalidOperationException($"Audit: {string.Join("; ", audit.Take(5))}");

        double moveNs = MmScenario.Median(moves);
        double engineNs = MmScenario.Median(engineMoves);
        MigrationStats migration = machine.GetMigrationStats();
        Console.WriteLine($"migrate-ksm {sizeMib} MiB of mappings ({pages:N0} KSM pages x {mappings}): {moveNs / pages:F0} ns per KSM page, " +
                          $"{moveNs / pages / mappings:F0} ns per mapping, {bytes / moveNs:F2} GB/s of KSM pages by move_pages; " +
                          $"the engine alone {engineNs / pages:F0} ns per KSM page; " +
                          $"pgmigrate_success {migration.Succeeded}, pgmigrate_fail {migration.Failed}");
        return
        [
            new("ns_per_page", moveNs / pages),
            new("ns_per_mapping", moveNs / pages / mappings),
            new("ksm_pages", pages),
            new("mappings_per_page", mappings),
            new("move_gbps", bytes / moveNs),
            new("engine_ns_per_page", engineNs / pages),
            new("merge_ms", mergeMs),
            new("size_mib", sizeMib),
        ];
    }

    /// <summary>move_pages of every KSM page to <paramref name="target"/> (MOVE_ALL: each has other mappings); returns the call's ns.</summary>
    private static double MoveByMovePages(VmProcess process, ulong[] addresses, int[] targets, int[] status, int target) =>
        MigrationBench.MovePagesTo(process, addresses, targets, status, target, MovePolicyFlags.MoveAll);

    /// <summary>
    /// Every KSM page isolated (through the first process's mappings), then one MigratePages to
    /// <paramref name="target"/>, as move_pages calls it; returns the call's ns.
    /// </summary>
    private static double MoveByEngine(Machine machine, VmProcess process, ulong va, int pages, List<long> from, int target)
    {
        from.Clear();
        machine.Lru.DrainAll(); // the new frames of the last move may still sit in add batches
        for (int i = 0; i < pages; i++)
        {
            long pfn = process.GetPagemap(va + (ulong)i * Topology.PageSize).Pfn;
            machine.MemMap.GetPage(pfn);
            bool isolated = machine.Lru.Isolate(pfn);
            machine.PutPage(pfn);
            if (!isolated)
                throw new InvalidOperationException($"KSM page {pfn} is not on an LRU list");
            from.Add(pfn);
        }
        long start = Stopwatch.GetTimestamp();
        int rc = machine.Migration.MigratePages(from,
            _ => machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero | AllocFlags.ThisNode, target),
            null, MigrateMode.Sync, MigrateReason.Syscall, out int succeeded);
        double ns = Stopwatch.GetElapsedTime(start).TotalNanoseconds;
        machine.Migration.PutbackMovablePages(from);
        if (rc != 0 || succeeded != pages)
            throw new InvalidOperationException($"MigratePages returned {rc}, {succeeded} of {pages} KSM pages moved");
        return ns;
    }
}
