using System.Diagnostics;
using Vmm.Memory;
using Vmm.Migration;
using Vmm.Native;

namespace Vmm.Bench.Scenarios;

/// <summary>
/// scenario migrate-writer: what a page moving under a writer costs the writer. One thread writes one
/// long to page after page of a process's memory (a stride that visits every page, so its next page
/// is rarely the one it just waited for), timing every write, while the main thread moves all of the
/// memory back and forth between the nodes with move_pages (batches of 512). A write that found its page
/// frozen sleeps on the migration entry until that page has moved (the engine counts these waits); a
/// write slower than 2 us during which such a wait began is a migration stall. Reported: the waits per
/// stalled write (1 is the target: one wait, never a second), the stalls' median, p99 and max, against
/// the same run's copy of one page and the time to move one whole batch, first with the engine's
/// waiters-first policy (a batch cut short when a page it froze has a sleeper, pages with sleepers moved
/// first), then without it (Linux's order) for comparison.
/// </summary>
internal sealed class MigrateWriterScenario : IScenario
{
    private const double StallNs = 2000;

    public string Name => "migrate-writer";

    public string Description => "a writer's stalls while move_pages moves its memory: waits per stalled write, stall p50/p99/max vs one page's copy and one batch's move (--size-mib 64, --rounds 6)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int sizeMib = args.GetInt("size-mib", 64);
        int rounds = args.GetInt("rounds", 6);
        ulong bytes = (ulong)sizeMib << 20;
        int pages = (int)(bytes / Topology.PageSize);
        using Machine machine = MmScenario.NewMachine(nodeMib: Math.Max(512, (sizeMib + 128 + 127) / 128 * 128));
        VmProcess process = machine.CreateProcess(homeNode: 0);
        ulong va = process.Mmap(bytes);
        for (ulong off = 0; off < bytes; off += Topology.PageSize)
            process.Write<long>(va + off, (long)off);
        var addresses = new ulong[pages];
        for (int i = 0; i < pages; i++)
            addresses[i] = va + (ulong)i * Topology.PageSize;
        var targets = new int[pages];
        var status = new int[pages];
        int node = 0;
        for (int r = 0; r < 4; r++)
            Move(process, addresses, targets, status, ref node); // warm: tier-up, host faults on new frames

        Result on = Measure(machine, process, va, pages, addresses, targets, status, ref node, rounds, waitersFirst: true);
        Result linuxOrder = Measure(machine, process, va, pages, addresses, targets, status, ref node, rounds, waitersFirst: false);
        int copied = Math.Min(pages, 4096);
        double copyNs = MigrationBench.CopyFramesToOtherNode(machine, process, va, copied, passes: 3).Min() / copied;
        double batchUs = on.MoveNsPerPage * MigrationEngine.MaxBatch / 1000;
        Console.WriteLine($"migrate-writer {sizeMib} MiB, {rounds} moves: one page's copy {copyNs:F0} ns, one batch's move {batchUs:F0} us");
        foreach ((string name, Result r) in new[] { ("waiters first", on), ("Linux order", linuxOrder) })
        {
            Console.WriteLine($"  {name}: {r.Writes} writes, {r.Stalls} stalled ({r.Waits} waits, {r.WaitsPerStall:F2} per stalled write); " +
                              $"stall p50 {r.P50Us:F1} us, p99 {r.P99Us:F1} us, max {r.MaxUs:F1} us; move_pages {r.MoveNsPerPage:F0} ns/page");
        }
        return
        [
            new("waits_per_stalled_write", on.WaitsPerStall),
            new("stalls", on.Stalls),
            new("stall_p50_us", on.P50Us),
            new("stall_p99_us", on.P99Us),
            new("stall_max_us", on.MaxUs),
            new("page_copy_ns", copyNs),
            new("batch_move_us", batchUs),
            new("move_ns_per_page", on.MoveNsPerPage),
            new("linux_order_stall_p50_us", linuxOrder.P50Us),
            new("linux_order_stall_p99_us", linuxOrder.P99Us),
            new("linux_order_stall_max_us", linuxOrder.MaxUs),
            new("linux_order_waits_per_stalled_write", linuxOrder.WaitsPerStall),
            new("size_mib", sizeMib),
        ];
    }

    private sealed record Result(long Writes, int Stalls, long Waits, double WaitsPerStall, double P50Us, double P99Us, double MaxUs, double MoveNsPerPage);

    private static Result Measure(Machine machine, VmProcess process, ulong va, int pages, ulong[] addresses, int[] targets, int[] status,
        ref int node, int rounds, bool waitersFirst)
    {
        machine.Migration.WaitersFirst = waitersFirst;
        var stalls = new List<double>();
        long writes = 0;
        long waitsBefore = machine.Migration.FaultsWaited;
        long stalledWaits = 0;
        using var stop = new ManualResetEventSlim();
        using var started = new ManualResetEventSlim();
        var writer = new Thread(() =>
        {
            // 40503 is prime and does not divide the page count: the stride visits every page.
            long step = 40503 % pages;
            long p = 0;
            started.Set();
            while (!stop.IsSet)
            {
                for (int k = 0; k < 256; k++)
                {
                    long waits = machine.Migration.FaultsWaited;
                    long t0 = Stopwatch.GetTimestamp();
                    process.Write<long>(va + (ulong)p * Topology.PageSize + 8, writes);
                    long t1 = Stopwatch.GetTimestamp();
                    long waited = machine.Migration.FaultsWaited - waits;
                    double ns = Stopwatch.GetElapsedTime(t0, t1).TotalNanoseconds;
                    if (ns > StallNs && waited > 0)
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
        double moveNs = 0;
        for (int r = 0; r < rounds; r++)
            moveNs += Move(process, addresses, targets, status, ref node);
        stop.Set();
        writer.Join();
        machine.Migration.WaitersFirst = true;
        long waitsTotal = machine.Migration.FaultsWaited - waitsBefore;
        stalls.Sort();
        double Pct(double q) => stalls.Count == 0 ? 0 : stalls[Math.Min(stalls.Count - 1, (int)(q * stalls.Count))] / 1000;
        return new Result(writes, stalls.Count, waitsTotal, stalls.Count == 0 ? 0 : (double)stalledWaits / stalls.Count,
            Pct(0.5), Pct(0.99), stalls.Count == 0 ? 0 : stalls[^1] / 1000, moveNs / rounds / pages);
    }

    /// <summary>move_pages of every page to the other node (a page the writer keeps busy may stay: not checked); returns the call's ns.</summary>
    private static double Move(VmProcess process, ulong[] addresses, int[] targets, int[] status, ref int node)
    {
        double ns = MigrationBench.MovePagesTo(process, addresses, targets, status, 1 - node, checkStatus: false);
        node = 1 - node;
        return ns;
    }
}
