using System.Diagnostics;
using Vmm.Migration;

namespace Vmm.Bench.Scenarios;

/// <summary>
/// scenario contig (--mib 64): a contiguous buffer of --mib MiB (Machine.AllocateContiguous, so
/// alloc_contig_pages above 4 MiB) taken from a ZONE_NORMAL that a process's pages fill. The machine has
/// two nodes of 4 x --mib MiB, all ZONE_NORMAL, no watermarks; the process (node 0) faults pages with
/// contents a seed and the index determine until node 0's zone has fewer free frames than a pageblock
/// (the per-CPU lists drained between tries). The allocation must clear a range of node 0 by migrating
/// its pages (MR_CONTIG_RANGE) to node 1 (node 0 has no room left). Timed: contig_ms, the call; pages_moved
/// (pgmigrate_success for MR_CONTIG_RANGE in the call); the move rate, and the same run's memcpy rate
/// of as many frames to node 1 (PageOps.Copy, the copy no migration avoids), measured just before; and the
/// call's CPU time on the calling thread (contig_cpu_ms: on a shared machine the wall clock also counts
/// the time the thread waited for a core). After
/// the allocation every byte of the process is checked. Each round then disposes the buffer, moves the
/// pages back to node 0 and faults more until the zone is full again. The first --warm rounds are left
/// out; medians of --rounds.
/// </summary>
internal sealed class ContigScenario : IScenario
{
    public string Name => "contig";

    public string Description => "contiguous buffer from a ZONE_NORMAL full of a process's pages: contig_ms, pages_moved, move_gbps vs memcpy_gbps (--mib 64, --rounds 3, --warm 1)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int mib = args.GetInt("mib", 64);
        int rounds = Math.Max(1, args.GetInt("rounds", 3));
        int warm = Math.Max(0, args.GetInt("warm", 1));
        if (mib < 8 || (mib & (mib - 1)) != 0)
            throw new ArgumentException("--mib must be a power of two, at least 8 (above the largest buddy order, 4 MiB)");
        long bytes = (long)mib << 20;
        using var machine = new Machine(new MachineOptions
        {
            NodeCount = 2,
            NodeSizeBytes = bytes * 4,
            BlockSizeBytes = bytes * 2,
            MovableBlocksPerNode = 0,
            MinFreeKbytes = 0,
            BackgroundThreads = false,
        });
        int frames = (int)(bytes / Topology.PageSize);
        long nodeFrames = machine.Topology.FramesPerNode;
        var filler = new OfflineScenario.Region(machine, seed: 3, capacity: (int)nodeFrames);

        var contigMs = new List<double>();
        var contigCpuMs = new List<double>();
        var memcpyNs = new List<double>();
        long pagesMoved = 0;
        for (int round = 0; round < warm + rounds; round++)
        {
            if (round > 0)
            {
                // The buffer's frames went to per-CPU lists: back to the buddy lists, where move_pages finds them.
                machine.Allocator.DrainAllPages();
                OfflineScenario.MoveBack([filler], checkStatus: false); // what does not fit is faulted anew below
            }
            FillZone(machine, filler);
            long freeInZone = machine.GetStats().Nodes[0].Zones[0].FreePages;
            double copy = MmScenario.Median(MigrationBench.CopyFrames(machine, FramesOfNode0(filler, frames), toNode: 1, passes: 1));

            long movedBefore = machine.Migration.SucceededFor(MigrateReason.ContigRange);
            double cpuStart = ThreadCpu.Nanoseconds();
            long start = Stopwatch.GetTimestamp();
            ContiguousBuffer buffer = machine.AllocateContiguous(bytes, node: 0);
            double ms = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            double cpuMs = (ThreadCpu.Nanoseconds() - cpuStart) / 1e6;
            long moved = machine.Migration.SucceededFor(MigrateReason.ContigRange) - movedBefore;
            try
            {
                if (buffer.Node != 0 || buffer.PageCount != frames)
                    throw new InvalidOperationException($"round {round}: {buffer}, expected {frames} frames on node 0");
                Verify(filler, buffer, round);
            }
            finally
            {
                buffer.Dispose();
            }
            Console.WriteLine($"round {round}{(round < warm ? " (warm-up)" : "")}: {mib} MiB contiguous in {ms:F2} ms ({cpuMs:F2} ms CPU), {moved} pages moved " +
                              $"({(double)moved * Topology.PageSize / ms / 1e6:F2} GB/s), zone had {freeInZone} free frames; memcpy of as many frames {copy / 1e6:F2} ms");
            if (round < warm)
                continue;
            contigMs.Add(ms);
            contigCpuMs.Add(cpuMs);
            memcpyNs.Add(copy);
            pagesMoved = moved;
        }

        IReadOnlyList<string> audit = machine.Audit();
        if (audit.Count > 0)
            throw new InvalidOperationException($"Audit: {string.Join("; ", audit.Take(5))}");
        double median = MmScenario.Median(contigMs);
        double moveGbps = (double)pagesMoved * Topology.PageSize / (median * 1e6);
        double memcpyGbps = (double)frames * Topology.PageSize / MmScenario.Median(memcpyNs);
        string cpu = OfflineScenario.CpuModel();
        Console.WriteLine($"contig {mib} MiB on {cpu}: {median:F2} ms median (min {contigMs.Min():F2}), {pagesMoved} pages moved, " +
                          $"{moveGbps:F2} GB/s vs memcpy {memcpyGbps:F2} GB/s ({100 * moveGbps / memcpyGbps:F0}% of it), " +
                          $"{pagesMoved / (median / 1e3) / 1e6:F2} M pages/s; every byte of the process checked after each round");
        return
        [
            new("contig_ms", median),
            new("contig_ms_min", contigMs.Min()),
            new("contig_ms_max", contigMs.Max()),
            new("contig_cpu_ms", MmScenario.Median(contigCpuMs)),
            new("pages_moved", pagesMoved),
            new("move_pages_per_s", pagesMoved / (median / 1e3)),
            new("move_gbps", moveGbps),
            new("memcpy_gbps", memcpyGbps),
            new("move_pct_of_memcpy", 100 * moveGbps / memcpyGbps),
            new("bytes_checked", (long)filler.Faulted * Topology.PageSize),
            new("rounds", rounds),
            new("mib", mib),
            new("cpu", cpu),
        ];
    }

    /// <summary>Faults pages of the filler until node 0's ZONE_NORMAL has fewer free frames than a pageblock (its pages land there first).</summary>
    private static void FillZone(Machine machine, OfflineScenario.Region filler)
    {
        for (int attempt = 0; attempt < 100; attempt++)
        {
            machine.Allocator.DrainAllPages();
            long free = machine.GetStats().Nodes[0].Zones[0].FreePages;
            if (free < 512)
                return;
            filler.FaultMore((int)free);
        }
        throw new InvalidOperationException($"node 0 still has {machine.GetStats().Nodes[0].Zones[0].FreePages} free frames after 100 tries to fill it");
    }

    /// <summary>The frames of <paramref name="count"/> of the filler's pages on node 0 (the memcpy's sources).</summary>
    private static long[] FramesOfNode0(OfflineScenario.Region filler, int count)
    {
        var frames = new List<long>(count);
        for (int i = 0; i < filler.Faulted && frames.Count < count; i++)
        {
            PagemapEntry e = filler.Process.GetPagemap(filler.AddressOf(i));
            if (e.Present && e.Node == 0)
                frames.Add(e.Pfn);
        }
        return [.. frames];
    }

    /// <summary>Every page of the filler present, outside the buffer, with its contents (every byte).</summary>
    private static void Verify(OfflineScenario.Region filler, ContiguousBuffer buffer, int round)
    {
        byte[] expected = new byte[Topology.PageSize], actual = new byte[Topology.PageSize];
        for (int i = 0; i < filler.Faulted; i++)
        {
            PagemapEntry e = filler.Process.GetPagemap(filler.AddressOf(i));
            if (!e.Present || (e.Pfn >= buffer.FirstPfn && e.Pfn < buffer.FirstPfn + buffer.PageCount))
                throw new InvalidOperationException($"round {round}: page {i} is {(e.Present ? $"in the buffer's frame {e.Pfn}" : "not present")}");
            filler.Expected(i, expected);
            filler.Process.Read(filler.AddressOf(i), actual);
            if (!expected.AsSpan().SequenceEqual(actual))
                throw new InvalidOperationException($"round {round}: page {i} (frame {e.Pfn}) differs at byte {expected.AsSpan().CommonPrefixLength(actual)} after the contiguous allocation");
        }
    }
}
