using System.Diagnostics;
using System.Runtime.InteropServices;
using Vmm.Migration;
using Vmm.Native;

namespace Vmm.Bench.Scenarios;

/// <summary>
/// scenario offline (and offline-ksm, or offline --ksm-half): one memory block full of in-use anonymous
/// pages taken offline (MemoryBlock.Offline: isolate, migrate every page out with reason
/// MEMORY_HOTPLUG, memory back to the host), timed, then onlined again (timed), as
/// anchors/linux_offline_bench.c does with Linux's own offline. The machine has two nodes of four
/// blocks of --block-mib each; node 0's top block is its only ZONE_MOVABLE block, so a process of node 0
/// fills it first (no watermarks: min_free_kbytes 0); the scenario faults pages until every frame of the
/// block is mapped by its pages (the per-CPU lists drained between tries), and fails if it cannot.
/// The offline moves them to node 1. Every round the pages go back into the block (move_pages to node
/// 0, then more pages faulted if some landed elsewhere), the contents of every page are checked after
/// the offline, and the memcpy of the block's frames to frames of node 1 (the copy an offline cannot
/// avoid) is measured just before it. The first --warm rounds (tier-up, host faults on destination
/// frames never touched) are left out; medians of --rounds. For scale, the same run also times the
/// host's part of giving a block's memory back (madvise(DONTNEED) of a block of touched memory, in an
/// arena of its own): Vmm's offline does that, Linux's does not (its memory stays the machine's). And
/// the offline's CPU time on the calling thread (offline_cpu_ms): on a shared machine the wall clock
/// also counts the time the thread waited for a core.
/// With KSM (offline-ksm): two processes map the same half-block of contents, merged by KSM before the
/// filler process fills the frames the merge freed, so half the block's frames are KSM pages mapped
/// twice; the offline must move them keeping their sharing (pages_shared and pages_sharing unchanged,
/// every pair of mappings still on one frame).
/// </summary>
internal sealed class OfflineScenario(bool ksmHalf) : IScenario
{
    private const int BlocksPerNode = 4;

    public string Name => ksmHalf ? "offline-ksm" : "offline";

    public string Description => ksmHalf
        ? "offline of one block, half of its pages KSM pages mapped twice: offline_ms, online_ms, sharing kept (--block-mib 128, --rounds 5, --warm 2)"
        : "offline of one block full of anonymous pages: offline_ms, pages_moved, move_gbps vs memcpy_gbps, online_ms (--block-mib 128, --rounds 5, --warm 2, --ksm-half)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int blockMib = args.GetInt("block-mib", 128);
        int rounds = Math.Max(1, args.GetInt("rounds", 5));
        int warm = Math.Max(0, args.GetInt("warm", 2));
        bool ksm = ksmHalf || args.Has("ksm-half");
        if (blockMib < 2 || (blockMib & (blockMib - 1)) != 0)
            throw new ArgumentException("--block-mib must be a power of two, at least 2");
        long blockBytes = (long)blockMib << 20;
        using var machine = new Machine(new MachineOptions
        {
            NodeCount = 2,
            NodeSizeBytes = blockBytes * BlocksPerNode,
            BlockSizeBytes = blockBytes,
            MovableBlocksPerNode = 1,
            MinFreeKbytes = 0,
            // As a host runs it: the offline hands the block's give-back to the hotplug worker, which the
            // round then waits for (WaitForMemoryRelease, timed apart as giveback_ms) before going on.
            BackgroundThreads = true,
        });
        int target = BlocksPerNode - 1; // node 0's ZONE_MOVABLE block
        MemoryBlock block = machine.Hotplug.GetBlock(target);
        int frames = (int)block.Frames;
        if (block.Zone != ZoneType.Movable)
            throw new InvalidOperationException($"block {target} is in {block.Zone}, expected Movable");

        var filler = new Region(machine, seed: 1, capacity: frames * 2);
        Region? a = null, b = null;
        KsmStats? merged = null;
        if (ksm)
        {
            // Two processes with the same half-block of contents (each page unique otherwise), merged.
            a = new Region(machine, seed: 2, capacity: frames / 2);
            b = new Region(machine, seed: 2, capacity: frames / 2);
            a.Advise(Advice.Mergeable);
            b.Advise(Advice.Mergeable);
            a.FaultMore(frames / 2);
            b.FaultMore(frames / 2);
            Vmm.Ksm kernel = machine.Ksm!;
            long mergeStart = Stopwatch.GetTimestamp();
            for (int scans = 0; scans < 6; scans++)
            {
                kernel.RunFullScans(1);
                merged = kernel.GetStats();
                if (merged.PagesShared == frames / 2 && merged.PagesSharing == frames / 2)
                    break;
            }
            if (merged is null || merged.PagesShared != frames / 2 || merged.PagesSharing != frames / 2)
                throw new InvalidOperationException($"not merged: pages_shared {merged?.PagesShared}, pages_sharing {merged?.PagesSharing}; expected {frames / 2} each");
            Console.WriteLine($"merged {frames / 2:N0} pairs of pages into KSM pages in {Stopwatch.GetElapsedTime(mergeStart).TotalMilliseconds:F0} ms");
        }
        else
        {
            filler.FaultMore(frames);
        }
        Region[] regions = ksm ? [a!, b!, filler] : [filler];

        var offlineMs = new List<double>();
        var onlineMs = new List<double>();
        var memcpyNs = new List<double>();
        var ksmInBlock = new List<int>();
        var decommitNs = new List<double>();
        var offlineCpuMs = new List<double>();
        var giveBackMs = new List<double>();
        using var scratch = new Arena(new Topology(1, 1, blockBytes));
        long pagesMoved = -1;
        int passes = 0;
        for (int round = 0; round < warm + rounds; round++)
        {
            if (round > 0)
                MoveBack(regions);
            EnsureFull(machine, target, filler);
            (long[] pfns, int ksmPages) = FramesInBlock(machine, target, regions);
            if (pfns.Length != frames)
                throw new InvalidOperationException($"round {round}: the scenario's pages map {pfns.Length} of the block's {frames} frames");
            HashSet<int>? ksmBefore = ksm ? KsmIndices(a!, b!) : null;
            double copy = CopyFrames(machine, pfns, toNode: 1);
            double decommit = TimeDecommit(scratch);

            double cpuStart = ThreadCpu.Nanoseconds();
            long start = Stopwatch.GetTimestamp();
            OfflineResult result = block.Offline();
            double offline = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            double offlineCpu = (ThreadCpu.Nanoseconds() - cpuStart) / 1e6;
            long giveBackStart = Stopwatch.GetTimestamp();
            machine.Hotplug.WaitForMemoryRelease();
            double giveBack = Stopwatch.GetElapsedTime(giveBackStart).TotalMilliseconds;
            if (!result.Succeeded)
                throw new InvalidOperationException($"round {round}: offline failed with {result.Error} after {result.Passes} passes: {string.Join("; ", result.Blockers)}");
            if (result.PagesMoved != frames)
                throw new InvalidOperationException($"round {round}: the offline moved {result.PagesMoved} pages; the block held {frames}");

            Verify(machine, target, regions, round);
            if (ksm)
                VerifySharing(machine, a!, b!, ksmBefore!, merged!, round);

            start = Stopwatch.GetTimestamp();
            Errno online = block.Online(ZoneType.Movable);
            double onlineTime = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            if (online != Errno.None || block.State != "online")
                throw new InvalidOperationException($"round {round}: online failed with {online}, state {block.State}");

            Console.WriteLine($"round {round}{(round < warm ? " (warm-up)" : "")}: offline {offline:F2} ms ({offlineCpu:F2} ms CPU, {result.Passes} passes, {result.PagesMoved} pages, " +
                              $"{(double)result.PagesMoved * Topology.PageSize / offline / 1e6:F2} GB/s), online {onlineTime:F2} ms, give-back after it {giveBack:F2} ms, " +
                              $"memcpy of the block {copy / 1e6:F2} ms, madvise(DONTNEED) of a block {decommit / 1e6:F2} ms{(ksm ? $", {ksmPages} KSM pages in the block" : "")}");
            if (round < warm)
                continue;
            offlineMs.Add(offline);
            offlineCpuMs.Add(offlineCpu);
            giveBackMs.Add(giveBack);
            onlineMs.Add(onlineTime);
            memcpyNs.Add(copy);
            decommitNs.Add(decommit);
            ksmInBlock.Add(ksmPages);
            pagesMoved = result.PagesMoved;
            passes = Math.Max(passes, result.Passes);
        }

        IReadOnlyList<string> audit = machine.Audit();
        if (audit.Count > 0)
            throw new InvalidOperationException($"Audit: {string.Join("; ", audit.Take(5))}");

        double offlineMedian = MmScenario.Median(offlineMs);
        double onlineMedian = MmScenario.Median(onlineMs);
        double bytes = (double)pagesMoved * Topology.PageSize;
        double moveGbps = bytes / (offlineMedian * 1e6);
        double memcpyGbps = (double)frames * Topology.PageSize / MmScenario.Median(memcpyNs);
        string cpu = CpuModel();
        MigrationStats stats = machine.GetMigrationStats();
        Console.WriteLine($"{Name} {blockMib} MiB block on {cpu}: offline {offlineMedian:F2} ms median (min {offlineMs.Min():F2}), {pagesMoved} pages moved, " +
                          $"{moveGbps:F2} GB/s vs memcpy {memcpyGbps:F2} GB/s ({100 * moveGbps / memcpyGbps:F0}% of it); online {onlineMedian:F2} ms median; " +
                          $"offline ms by round: {string.Join(' ', offlineMs.Select(m => m.ToString("F1", System.Globalization.CultureInfo.InvariantCulture)))}; " +
                          $"pgmigrate_success {stats.Succeeded}, pgmigrate_fail {stats.Failed}");
        var result2 = new List<KeyValuePair<string, object>>
        {
            new("offline_ms", offlineMedian),
            new("online_ms", onlineMedian),
            new("pages_moved", pagesMoved),
            new("move_gbps", moveGbps),
            new("memcpy_gbps", memcpyGbps),
            new("move_pct_of_memcpy", 100 * moveGbps / memcpyGbps),
            new("offline_cpu_ms", MmScenario.Median(offlineCpuMs)),
            new("giveback_ms", MmScenario.Median(giveBackMs)),
            new("host_decommit_ms", MmScenario.Median(decommitNs) / 1e6),
            new("offline_ms_min", offlineMs.Min()),
            new("offline_ms_max", offlineMs.Max()),
            new("online_ms_min", onlineMs.Min()),
            new("passes_max", passes),
            new("rounds", rounds),
            new("block_mib", blockMib),
            new("ksm_half", ksm),
        };
        if (ksm)
        {
            result2.Add(new("ksm_pages_in_block", (int)MmScenario.Median(ksmInBlock.Select(k => (double)k))));
            result2.Add(new("pages_shared", merged!.PagesShared));
            result2.Add(new("pages_sharing", merged.PagesSharing));
        }
        result2.Add(new("cpu", cpu));
        return result2;
    }

    /// <summary>
    /// Until no frame of the block is free: the per-CPU lists drained (a frame cached on another CPU's
    /// list is free but out of reach of this thread's faults), then as many more pages of the filler
    /// faulted as the block has free frames (node 0's ZONE_MOVABLE is the block, first in the zonelist).
    /// </summary>
    private static void EnsureFull(Machine machine, int target, Region filler)
    {
        for (int attempt = 0; attempt < 100; attempt++)
        {
            machine.Allocator.DrainAllPages();
            long free = machine.GetMemoryBlock(target).FreeFrames;
            if (free == 0)
                return;
            filler.FaultMore((int)free);
        }
        throw new InvalidOperationException($"block {target} still has {machine.GetMemoryBlock(target).FreeFrames} free frames after 100 tries to fill it");
    }

    /// <summary>The distinct frames of block <paramref name="target"/> that the regions map, and how many of them are KSM pages.</summary>
    private static (long[] Pfns, int KsmPages) FramesInBlock(Machine machine, int target, Region[] regions)
    {
        var pfns = new HashSet<long>();
        int ksmPages = 0;
        foreach (Region r in regions)
        {
            for (int i = 0; i < r.Faulted; i++)
            {
                PagemapEntry e = r.Process.GetPagemap(r.AddressOf(i));
                if (!e.Present)
                    throw new InvalidOperationException($"page {i} of {r.Process} is not present");
                if (machine.Topology.BlockOf(e.Pfn) == target && pfns.Add(e.Pfn) && e.Ksm)
                    ksmPages++;
            }
        }
        long[] sorted = [.. pfns];
        Array.Sort(sorted);
        return (sorted, ksmPages);
    }

    /// <summary>Every page out of the block, present, with its contents (every byte).</summary>
    private static void Verify(Machine machine, int target, Region[] regions, int round)
    {
        byte[] expected = new byte[Topology.PageSize], actual = new byte[Topology.PageSize];
        foreach (Region r in regions)
        {
            for (int i = 0; i < r.Faulted; i++)
            {
                PagemapEntry e = r.Process.GetPagemap(r.AddressOf(i));
                if (!e.Present || machine.Topology.BlockOf(e.Pfn) == target)
                    throw new InvalidOperationException($"round {round}: page {i} of {r.Process} is {(e.Present ? $"still in the offline block (frame {e.Pfn})" : "not present")}");
                r.Expected(i, expected);
                r.Process.Read(r.AddressOf(i), actual);
                if (!expected.AsSpan().SequenceEqual(actual))
                {
                    int at = expected.AsSpan().CommonPrefixLength(actual);
                    throw new InvalidOperationException($"round {round}: page {i} of {r.Process} (now frame {e.Pfn}) differs at byte {at} after the offline: the migration copied the wrong data");
                }
            }
        }
    }

    /// <summary>The pages of <paramref name="a"/> that are KSM pages shared with the same page of <paramref name="b"/>.</summary>
    private static HashSet<int> KsmIndices(Region a, Region b)
    {
        var set = new HashSet<int>();
        for (int i = 0; i < a.Faulted; i++)
        {
            PagemapEntry x = a.Process.GetPagemap(a.AddressOf(i)), y = b.Process.GetPagemap(b.AddressOf(i));
            if (x.Ksm && y.Ksm && x.Pfn == y.Pfn)
                set.Add(i);
        }
        return set;
    }

    private static void VerifySharing(Machine machine, Region a, Region b, HashSet<int> before, KsmStats merged, int round)
    {
        KsmStats now = machine.Ksm!.GetStats();
        if (now.PagesShared != merged.PagesShared || now.PagesSharing != merged.PagesSharing)
            throw new InvalidOperationException($"round {round}: sharing changed by the offline: pages_shared {merged.PagesShared} -> {now.PagesShared}, pages_sharing {merged.PagesSharing} -> {now.PagesSharing}");
        HashSet<int> after = KsmIndices(a, b);
        if (!after.SetEquals(before))
            throw new InvalidOperationException($"round {round}: {before.Count} pages were KSM pages shared by both processes before the offline, {after.Count} after ({before.Except(after).Count()} lost)");
        foreach (int i in after)
        {
            PagemapEntry e = a.Process.GetPagemap(a.AddressOf(i));
            if (e.MapCount != 2)
                throw new InvalidOperationException($"round {round}: KSM page {i} has mapcount {e.MapCount} after the offline, expected 2");
        }
    }

    /// <summary>Every page of the regions that is on node 1 (the offline put it there) back to node 0 by move_pages (MOVE_ALL: KSM pages have two mappings).</summary>
    internal static void MoveBack(Region[] regions, bool checkStatus = true)
    {
        foreach (Region r in regions)
        {
            var addresses = new List<ulong>();
            for (int i = 0; i < r.Faulted; i++)
            {
                if (r.Process.GetPagemap(r.AddressOf(i)).Node != 0)
                    addresses.Add(r.AddressOf(i));
            }
            if (addresses.Count == 0)
                continue;
            var status = new int[addresses.Count];
            MigrationBench.MovePagesTo(r.Process, [.. addresses], new int[addresses.Count], status, 0, MovePolicyFlags.MoveAll, checkStatus);
        }
    }

    /// <summary>The block's frames copied to new frames of <paramref name="toNode"/> with the engine's copy (PageOps.Copy); ns of the copy.</summary>
    private static double CopyFrames(Machine machine, long[] sources, int toNode) =>
        MmScenario.Median(MigrationBench.CopyFrames(machine, sources, toNode, passes: 1));

    /// <summary>Every frame of <paramref name="scratch"/> touched, then all given back to the host at once (what an offline's Arena.Decommit does); ns of the give-back.</summary>
    private static unsafe double TimeDecommit(Arena scratch)
    {
        long frames = scratch.Topology.FramesPerBlock;
        for (long pfn = 0; pfn < frames; pfn++)
            *scratch.FrameAddress(pfn) = 1;
        long start = Stopwatch.GetTimestamp();
        scratch.Decommit(0, frames);
        return Stopwatch.GetElapsedTime(start).TotalNanoseconds;
    }

    /// <summary>The CPU's model name (/proc/cpuinfo), or the architecture where there is none.</summary>
    internal static string CpuModel()
    {
        try
        {
            foreach (string line in File.ReadLines("/proc/cpuinfo"))
            {
                if (line.StartsWith("model name", StringComparison.Ordinal))
                    return line[(line.IndexOf(':', StringComparison.Ordinal) + 1)..].Trim();
            }
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
        return RuntimeInformation.ProcessArchitecture.ToString();
    }

    /// <summary>One process's anonymous mapping, faulted page by page with contents a seed and the page index determine.</summary>
    internal sealed class Region
    {
        private readonly ulong _seed;
        private readonly int _capacity;
        private readonly byte[] _page = new byte[Topology.PageSize];

        public Region(Machine machine, ulong seed, int capacity)
        {
            _seed = seed;
            _capacity = capacity;
            Process = machine.CreateProcess(homeNode: 0);
            Address = Process.Mmap((ulong)capacity * Topology.PageSize);
        }

        public VmProcess Process { get; }

        public ulong Address { get; }

        /// <summary>Pages faulted (written) so far, from the start of the mapping.</summary>
        public int Faulted { get; private set; }

        public ulong AddressOf(int index) => Address + (ulong)index * Topology.PageSize;

        public void Advise(Advice advice)
        {
            if (Process.Madvise(Address, (ulong)_capacity * Topology.PageSize, advice) != Errno.None)
                throw new InvalidOperationException($"madvise({advice}) failed");
        }

        /// <summary>Writes the next <paramref name="count"/> pages (a write fault each).</summary>
        public void FaultMore(int count)
        {
            if (Faulted + count > _capacity)
                throw new InvalidOperationException($"{Process}: {Faulted} + {count} pages exceed the mapping's {_capacity}");
            for (int i = 0; i < count; i++)
            {
                Expected(Faulted, _page);
                Process.Write(AddressOf(Faulted), _page);
                Faulted++;
            }
        }

        /// <summary>The contents of page <paramref name="index"/>: xorshift64* words from the seed and the index (never all zeros).</summary>
        public void Expected(int index, Span<byte> page)
        {
            Span<ulong> words = MemoryMarshal.Cast<byte, ulong>(page);
            ulong x = ((_seed << 40) + (ulong)index + 1) * 0x9E3779B97F4A7C15UL | 1;
            for (int i = 0; i < words.Length; i++)
            {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                words[i] = x * 0x2545F4914F6CDD1DUL;
            }
        }
    }
}
