using System.Diagnostics;
using Vmm.Memory;
using Vmm.Migration;
using Vmm.Native;

namespace Vmm.Bench.Scenarios;

/// <summary>
/// scenario migrate: a process's memory moved from node 0 to node 1 by move_pages (VmProcess.MovePages,
/// every page named, all to the other node: the lookup, the isolation, the engine's batched migration
/// and the put-back, timed whole), against a memcpy of the same size, frame to frame, in the same run.
/// The engine alone (all pages isolated first, then one MigratePages with reason Syscall, only that
/// timed) is measured too, as extra fields. Warm: the pages go back and forth, the first rounds (tier-up,
/// host faults on never-touched frames) are left out.
/// </summary>
internal sealed class MigrateScenario : IScenario
{
    public string Name => "migrate";

    public string Description => "move_pages of N MiB node 0 -> 1: GB/s, ns/page, vs memcpy; the engine alone too (--size-mib N, --batch N (1-512), --reps N)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int sizeMib = args.GetInt("size-mib", 256);
        int batch = args.GetInt("batch", MigrationEngine.MaxBatch);
        int reps = args.GetInt("reps", 5);
        ulong bytes = (ulong)sizeMib << 20;
        int pages = (int)(bytes / Topology.PageSize);
        using Machine machine = MmScenario.NewMachine(nodeMib: Math.Max(512, (sizeMib + 128 + 127) / 128 * 128));
        machine.Migration.BatchLimit = batch;
        VmProcess process = machine.CreateProcess(homeNode: 0);
        ulong va = process.Mmap(bytes);
        for (ulong off = 0; off < bytes; off += Topology.PageSize)
            process.Write<long>(va + off, (long)off);

        var from = new List<long>(pages);
        var addresses = new ulong[pages];
        for (int i = 0; i < pages; i++)
            addresses[i] = va + (ulong)i * Topology.PageSize;
        var targets = new int[pages];
        var status = new int[pages];
        int node = 0;
        double cold = MovePages(process, addresses, targets, status, ref node);
        var moves = new List<double>();
        var engineMoves = new List<double>();
        var flushes = new List<long>();
        // The first rounds tier the code up and touch (host-fault) the frames of both nodes that the
        // allocator had not handed out yet: a node is twice the size moved, so that takes two rounds each.
        const int WarmRounds = 4;
        for (int r = 0; r < Math.Max(2, reps) + WarmRounds; r++)
        {
            long f = machine.GetVmStats().TlbFlushes;
            double ns = MovePages(process, addresses, targets, status, ref node);
            flushes.Add(machine.GetVmStats().TlbFlushes - f);
            if (r >= WarmRounds)
                moves.Add(ns);
        }
        for (int r = 0; r < Math.Max(2, reps) + 2; r++)
        {
            double ns = Move(machine, process, va, pages, from, ref node);
            if (r >= 2)
                engineMoves.Add(ns);
        }
        for (ulong off = 0; off < bytes; off += 1 << 20)
        {
            if (process.Read<long>(va + off) != (long)off)
                throw new InvalidOperationException($"byte mismatch at offset {off} after the moves");
        }
        double memcpy = MmScenario.Median(MigrationBench.CopyFramesToOtherNode(machine, process, va, pages, reps));
        double moveNs = MmScenario.Median(moves);
        double engineNs = MmScenario.Median(engineMoves);
        double moveGbps = bytes / moveNs;
        double memcpyGbps = bytes / memcpy;
        MigrationStats stats = machine.GetMigrationStats();
        Console.WriteLine($"migrate {sizeMib} MiB, batch {batch}: move_pages {moveGbps:F2} GB/s, {moveNs / pages:F0} ns/page " +
                          $"(cold first move {cold / pages:F0} ns/page); the engine alone {bytes / engineNs:F2} GB/s, {engineNs / pages:F0} ns/page; " +
                          $"memcpy frame to frame {memcpyGbps:F2} GB/s (move_pages at {100 * moveGbps / memcpyGbps:F0}% of it); " +
                          $"{flushes.Max()} flushes per move; pgmigrate_success {stats.Succeeded}, pgmigrate_fail {stats.Failed}");
        return
        [
            new("move_gbps", moveGbps),
            new("ns_per_page", moveNs / pages),
            new("memcpy_gbps", memcpyGbps),
            new("move_pct_of_memcpy", 100 * moveGbps / memcpyGbps),
            new("engine_gbps", bytes / engineNs),
            new("engine_ns_per_page", engineNs / pages),
            new("cold_ns_per_page", cold / pages),
            new("flushes_per_move", flushes.Max()),
            new("batch", batch),
            new("size_mib", sizeMib),
        ];
    }

    /// <summary>move_pages of every page to the other node; returns the call's ns.</summary>
    private static double MovePages(VmProcess process, ulong[] addresses, int[] targets, int[] status, ref int node)
    {
        double ns = MigrationBench.MovePagesTo(process, addresses, targets, status, 1 - node);
        node = 1 - node;
        return ns;
    }

    /// <summary>Isolates every page, moves them all to the other node with one call; returns the call's ns.</summary>
    private static double Move(Machine machine, VmProcess process, ulong va, int pages, List<long> from, ref int node)
    {
        from.Clear();
        machine.Lru.DrainAll(); // the new frames of the last move may still sit in add batches
        for (int i = 0; i < pages; i++)
            from.Add(Isolate(machine, process, va + (ulong)i * Topology.PageSize));
        int target = 1 - node;
        long start = Stopwatch.GetTimestamp();
        int rc = machine.Migration.MigratePages(from,
            _ => machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero | AllocFlags.ThisNode, target),
            null, MigrateMode.Sync, MigrateReason.Syscall, out int succeeded);
        double ns = Stopwatch.GetElapsedTime(start).TotalNanoseconds;
        machine.Migration.PutbackMovablePages(from);
        if (rc != 0 || succeeded != pages)
            throw new InvalidOperationException($"MigratePages returned {rc}, {succeeded} of {pages} moved");
        node = target;
        return ns;
    }

    /// <summary>LRU isolation, as the engine expects of each page it is given (the batches were drained before).</summary>
    private static long Isolate(Machine machine, VmProcess process, ulong va)
    {
        long pfn = process.GetPagemap(va).Pfn;
        machine.MemMap.GetPage(pfn);
        bool isolated = machine.Lru.Isolate(pfn);
        machine.PutPage(pfn);
        return isolated ? pfn : throw new InvalidOperationException($"frame {pfn} is not on an LRU list");
    }
}
