using System.Diagnostics;
using Vmm.Native;

namespace Vmm.Bench.Scenarios;

/// <summary>
/// scenario offline-writer: what a memory offline costs a writer whose pages it moves (issue 12's "no
/// writer stalls for longer than one page copy plus one flush while its page moves"). A process's
/// memory sits in node 0's one ZONE_MOVABLE block; one thread writes one long to page after page of it
/// (a stride that visits every page), timing every write, while the main thread takes the block offline
/// (its pages move to node 1), onlines it again and moves the pages back with move_pages, round after
/// round. A write slower than 2 us during which a migration wait began, while the offline runs, is a
/// stall. Reported: waits per stalled write (1: one wait, never a second), the stalls' median, p99 and
/// max, beside the same run's copy of one page and the offline's time.
/// </summary>
internal sealed class OfflineWriterScenario : IScenario
{
    private const double StallNs = 2000;

    public string Name => "offline-writer";

    public string Description => "a writer's stalls while its block goes offline: waits per stalled write, stall p50/p99/max vs one page's copy (--size-mib 64, --rounds 6)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int sizeMib = args.GetInt("size-mib", 64);
        int rounds = args.GetInt("rounds", 6);
        ulong bytes = (ulong)sizeMib << 20;
        int pages = (int)(bytes / Topology.PageSize);
        using var machine = new Machine(new MachineOptions
        {
            NodeCount = 2, NodeSizeBytes = 512L << 20, BlockSizeBytes = 128L << 20, MovableBlocksPerNode = 1,
            MinFreeKbytes = 0, BackgroundThreads = false,
        });
        const int movableBlock = 3; // node 0's top block, its only ZONE_MOVABLE one: a node-0 fault lands there first
        MemoryBlock block = machine.Hotplug.GetBlock(movableBlock);
        VmProcess process = machine.CreateProcess(homeNode: 0);
        ulong va = process.Mmap(bytes);
        for (ulong off = 0; off < bytes; off += Topology.PageSize)
            process.Write<long>(va + off, (long)off);
        var addresses = new ulong[pages];
        for (int i = 0; i < pages; i++)
            addresses[i] = va + (ulong)i * Topology.PageSize;
        var targets = new int[pages];
        var status = new int[pages];
        for (int r = 0; r < 2; r++)
            Round(block, process, addresses, targets, status); // warm: tier-up, host faults on new frames

        var stalls = new List<double>();
        long writes = 0, stalledWaits = 0, waitsBefore = machine.Migration.FaultsWaited;
        var offlineMs = new List<double>();
        int offlining = 0;
        using var stop = new ManualResetEventSlim();
        using var started = new ManualResetEventSlim();
        var writer = new Thread(() =>
        {
            long step = 40503 % pages; // prime, not a divisor of the page count: visits every page
            long p = 0;
            started.Set();
            while (!stop.IsSet)
            {
                for (int k = 0; k < 256; k++)
                {
                    long waits = machine.Migration.FaultsWaited;
                    bool during = Volatile.Read(ref offlining) != 0;
                    long t0 = Stopwatch.GetTimestamp();
                    process.Write<long>(va + (ulong)p * Topology.PageSize + 8, writes);
                    long t1 = Stopwatch.GetTimestamp();
                    long waited = machine.Migration.FaultsWaited - waits;
                    double ns = Stopwatch.GetElapsedTime(t0, t1).TotalNanoseconds;
                    if (during && ns > StallNs && waited > 0)
                    {
                        stalls.Add(ns);
                        stalledWaits += waited;
                    }
                    writes++;
                    p = (p + step) % pages;
                }
            }
        }) { IsBackground = true, Name = "writer" };
        writer.Start();
        started.Wait();
        for (int r = 0; r < rounds; r++)
        {
            Volatile.Write(ref offlining, 1);
            offlineMs.Add(Round(block, process, addresses, targets, status));
            Volatile.Write(ref offlining, 0);
        }
        stop.Set();
        writer.Join();
        long waitsTotal = machine.Migration.FaultsWaited - waitsBefore;
        int copied = Math.Min(pages, 4096);
        double copyNs = MigrationBench.CopyFramesToOtherNode(machine, process, va, copied, passes: 3).Min() / copied;
        for (int i = 0; i < pages; i++)
        {
            long expected = (long)((ulong)i * Topology.PageSize);
            if (process.Read<long>(addresses[i]) != expected)
                throw new InvalidOperationException($"page {i}: its first long is not {expected}: the offline lost a write");
        }
        stalls.Sort();
        double Pct(double q) => stalls.Count == 0 ? 0 : stalls[Math.Min(stalls.Count - 1, (int)(q * stalls.Count))] / 1000;
        double perStall = stalls.Count == 0 ? 0 : (double)stalledWaits / stalls.Count;
        Console.WriteLine($"offline-writer {sizeMib} MiB, {rounds} offlines (median {MmScenario.Median(offlineMs):F1} ms): {writes} writes, " +
                          $"{stalls.Count} stalled ({waitsTotal} waits, {perStall:F2} per stalled write); stall p50 {Pct(0.5):F1} us, " +
                          $"p99 {Pct(0.99):F1} us, max {(stalls.Count == 0 ? 0 : stalls[^1] / 1000):F1} us; one page's copy {copyNs:F0} ns");
        if (machine.Audit() is { Count: > 0 } problems)
            throw new InvalidOperationException("audit: " + string.Join("; ", problems));
        return
        [
            new("waits_per_stalled_write", perStall),
            new("stalls", stalls.Count),
            new("stall_p50_us", Pct(0.5)),
            new("stall_p99_us", Pct(0.99)),
            new("stall_max_us", stalls.Count == 0 ? 0 : stalls[^1] / 1000),
            new("page_copy_ns", copyNs),
            new("offline_ms", MmScenario.Median(offlineMs)),
            new("writes", writes),
            new("size_mib", sizeMib),
        ];
    }

    /// <summary>Offline the block (timed), online it, move the pages back to node 0; returns the offline's ms.</summary>
    private static double Round(MemoryBlock block, VmProcess process, ulong[] addresses, int[] targets, int[] status)
    {
        OfflineResult result = block.Offline();
        if (!result.Succeeded)
            throw new InvalidOperationException($"offline failed: {result.Error} {string.Join("; ", result.Blockers)}");
        Errno online = block.Online(ZoneType.Movable);
        if (online != Errno.None)
            throw new InvalidOperationException($"online failed: {online}");
        MigrationBench.MovePagesTo(process, addresses, targets, status, 0, checkStatus: false);
        return result.Elapsed.TotalMilliseconds;
    }
}
