using System.Diagnostics;
using Vmm.Mm;
using Vmm.Native;

namespace Vmm.Bench.Scenarios;

/// <summary>Page patterns for the KSM scenarios: what page i of a buffer holds.</summary>
internal static class KsmPatterns
{
    public static readonly string[] Names = ["identical", "half", "unique", "zero"];

    /// <summary>Fills <paramref name="page"/> with page <paramref name="index"/> of the pattern (random data, never only zeros, except "zero").</summary>
    public static void Fill(string pattern, int index, int pages, Span<byte> page)
    {
        switch (pattern)
        {
            case "identical":
                Random(page, 12345);
                break;
            case "half":
                // As the Linux anchor (linux_ksm_bench.c) lays it out: even pages pair up, page i with
                // page i + N/2, so partners are spread over the whole region; odd pages are unique.
                Random(page, index % 2 == 0 ? 1_000_003UL + (ulong)(index % (pages / 2)) : 7_000_000_001UL + (ulong)index);
                break;
            case "unique":
                Random(page, (ulong)index + 1);
                break;
            case "zero":
                page.Clear();
                break;
            default:
                throw new ArgumentException($"unknown pattern '{pattern}' (identical, half, unique, zero)");
        }
    }

    /// <summary>Pseudo-random bytes from a seed (xorshift64*): cheap enough to fill gigabytes.</summary>
    private static void Random(Span<byte> page, ulong seed)
    {
        Span<ulong> words = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ulong>(page);
        ulong x = seed * 0x9E3779B97F4A7C15UL | 1;
        for (int i = 0; i < words.Length; i++)
        {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            words[i] = x * 0x2545F4914F6CDD1DUL;
        }
    }

    /// <summary>A process with <paramref name="pages"/> pages of the pattern, advised mergeable.</summary>
    public static (VmProcess Process, ulong Address) Map(Machine machine, string pattern, int pages)
    {
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap((ulong)pages * Topology.PageSize);
        byte[] page = new byte[Topology.PageSize];
        for (int i = 0; i < pages; i++)
        {
            Fill(pattern, i, pages, page);
            p.Write(va + (ulong)i * Topology.PageSize, page);
        }
        if (p.Madvise(va, (ulong)pages * Topology.PageSize, Advice.Mergeable) != Errno.None)
            throw new InvalidOperationException("madvise(MERGEABLE) failed");
        return (p, va);
    }

    /// <summary>Whether the counters show the state merging should reach for the pattern.</summary>
    public static bool Merged(string pattern, int pages, KsmStats s, bool zeroPages, int maxPageSharing = 256) => pattern switch
    {
        "identical" => s.PagesShared + s.PagesSharing == pages,
        "zero" when zeroPages => s.KsmZeroPages == pages,
        "zero" => s.PagesShared + s.PagesSharing == pages,
        "half" => s.PagesShared == pages / 4 && s.PagesSharing == pages / 4,
        _ => false,
    };

    /// <summary>
    /// Two nodes, each big enough for <paramref name="sizeMib"/> three times over: the buffer, a copy
    /// of it (copy-on-write, unmerge) and slack, so that everything measured stays on warmed frames of
    /// one node and no host page fault is counted.
    /// </summary>
    public static Machine NewMachine(int sizeMib) => new(new MachineOptions
    {
        NodeCount = 2,
        NodeSizeBytes = Math.Max(512L, ((sizeMib * 3L + 127) / 128) * 128) << 20,
        BlockSizeBytes = 128L << 20,
        MinFreeKbytes = 0,
    });
}

/// <summary>
/// scenario ksm: time for one scanning thread to merge a buffer, from starting the scanner to the
/// expected merged state (or to two full scans for unique pages), as the Linux anchor measures ksmd.
/// </summary>
internal sealed class KsmScenario : IScenario
{
    public string Name => "ksm";

    public string Description => "KSM merge time of a buffer (--size-mib 256, --pattern identical|half|unique|zero, --use-zero-pages, --reps 3, --pages-to-scan 100000)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int sizeMib = args.GetInt("size-mib", 256);
        string pattern = args.GetString("pattern", "identical");
        bool zeroPages = args.Has("use-zero-pages");
        int reps = args.GetInt("reps", 3);
        int pagesToScan = args.GetInt("pages-to-scan", 100000);
        int pages = sizeMib * 256;
        var times = new List<(double Ms, long Scans, KsmStats Stats)>();
        const int warmupRounds = 3; // tiered compilation settles over the first three
        for (int r = 0; r < reps + warmupRounds; r++)
        {
            using Machine machine = KsmPatterns.NewMachine(sizeMib);
            MmScenario.WarmArena(machine, (ulong)pages * Topology.PageSize + (64UL << 20));
            Vmm.Ksm ksm = machine.Ksm!;
            if (zeroPages)
                ksm.Write("use_zero_pages", "1");
            KsmPatterns.Map(machine, pattern, pages);
            long start = Stopwatch.GetTimestamp();
            KsmStats stats;
            while (true)
            {
                ksm.ScanPages(pagesToScan);
                stats = ksm.GetStats();
                if (KsmPatterns.Merged(pattern, pages, stats, zeroPages) || stats.FullScans >= (pattern == "unique" ? 2 : 10))
                    break;
            }
            double ms = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            if (r >= warmupRounds)
                times.Add((ms, stats.FullScans, stats));
            Console.WriteLine($"  round {r}: {ms:F1} ms, {stats.FullScans} full scans, shared {stats.PagesShared}, sharing {stats.PagesSharing}, zero {stats.KsmZeroPages}, scanned {stats.PagesScanned}");
        }
        var median = times.OrderBy(t => t.Ms).ElementAt(times.Count / 2);
        bool reached = pattern == "unique" || KsmPatterns.Merged(pattern, pages, median.Stats, zeroPages);
        Console.WriteLine($"ksm {pattern}{(zeroPages ? " (use_zero_pages)" : "")} {sizeMib} MiB: {median.Ms:F1} ms to {(pattern == "unique" ? "two full scans" : "the merged state")}{(reached ? "" : " (NOT reached)")}, " +
                          $"{median.Ms * 1e6 / median.Stats.PagesScanned:F0} ns per scanned page, metadata {median.Stats.MetadataBytes / (double)pages:F1} B/page");
        return
        [
            new("pattern", pattern), new("size_mib", sizeMib), new("use_zero_pages", zeroPages),
            new("merge_ms", Math.Round(median.Ms, 2)), new("full_scans", median.Scans),
            new("pages_shared", median.Stats.PagesShared), new("pages_sharing", median.Stats.PagesSharing),
            new("ksm_zero_pages", median.Stats.KsmZeroPages), new("reached", reached),
            new("scan_ns_per_page", Math.Round(median.Ms * 1e6 / median.Stats.PagesScanned, 1)),
            new("metadata_bytes_per_page", Math.Round(median.Stats.MetadataBytes / (double)pages, 1)),
        ];
    }
}

/// <summary>scenario ksm-unmerge: a write to a merged page (cow_ksm), and run=2 per merged page.</summary>
internal sealed class KsmUnmergeScenario : IScenario
{
    public string Name => "ksm-unmerge";

    public string Description => "KSM copy-on-write and run=2 unmerge costs (--size-mib 256, --reps 3)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int sizeMib = args.GetInt("size-mib", 256);
        int reps = args.GetInt("reps", 3);
        int pages = sizeMib * 256;
        var cow = new List<double>();
        var unmerge = new List<double>();
        const int warmupRounds = 3; // the fault path tiers up over the first rounds
        for (int r = 0; r < reps + warmupRounds; r++)
        {
            // COW: a 1-byte write to every merged page.
            using (Machine machine = KsmPatterns.NewMachine(sizeMib))
            {
                MmScenario.WarmArena(machine, (ulong)pages * 8192 + (64UL << 20));
                (VmProcess p, ulong va) = MergeIdentical(machine, pages);
                long start = Stopwatch.GetTimestamp();
                for (int i = 0; i < pages; i++)
                    p.Write<byte>(va + (ulong)i * Topology.PageSize + 100, 1);
                double ns = Stopwatch.GetElapsedTime(start).TotalNanoseconds / pages;
                if (r >= warmupRounds)
                    cow.Add(ns);
            }
            // run=2: unmerge everything.
            using (Machine machine = KsmPatterns.NewMachine(sizeMib))
            {
                MmScenario.WarmArena(machine, (ulong)pages * 8192 + (64UL << 20));
                MergeIdentical(machine, pages);
                KsmStats before = machine.Ksm!.GetStats();
                long start = Stopwatch.GetTimestamp();
                if (machine.Ksm.Write("run", "2") != Errno.None)
                    throw new InvalidOperationException("run=2 failed");
                double ns = Stopwatch.GetElapsedTime(start).TotalNanoseconds / (before.PagesShared + before.PagesSharing);
                if (r >= warmupRounds)
                    unmerge.Add(ns);
            }
            if (r >= warmupRounds)
                Console.WriteLine($"  round {r}: cow {cow[^1]:F0} ns, unmerge {unmerge[^1]:F0} ns per page");
        }
        double cowNs = MmScenario.Median(cow), unmergeNs = MmScenario.Median(unmerge);
        Console.WriteLine($"ksm-unmerge {sizeMib} MiB: write to a merged page {cowNs:F0} ns, run=2 {unmergeNs:F0} ns per merged page");
        return [new("size_mib", sizeMib), new("cow_ns", Math.Round(cowNs, 1)), new("unmerge_ns", Math.Round(unmergeNs, 1))];
    }

    private static (VmProcess, ulong) MergeIdentical(Machine machine, int pages)
    {
        (VmProcess p, ulong va) = KsmPatterns.Map(machine, "identical", pages);
        machine.Ksm!.RunFullScans(2);
        if (machine.Ksm.GetStats().PagesShared + machine.Ksm.GetStats().PagesSharing != pages)
            throw new InvalidOperationException("the buffer did not merge");
        return (p, va);
    }
}

/// <summary>
/// scenario ksm-index: the index choice, measured. Files N pages into a content-ordered tree (Linux's
/// way: a red-black tree compared with memcmp) and into a hash table keyed by the 64-bit checksum the
/// change filter computes anyway, then looks every page up again. Reports ns per insert and per
/// lookup, and the page compares each made.
/// </summary>
internal sealed unsafe class KsmIndexScenario : IScenario
{
    public string Name => "ksm-index";

    public string Description => "memcmp tree vs checksum hash for the KSM index (--size-mib 256, --pattern unique|identical|half)";

    public IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args)
    {
        int sizeMib = args.GetInt("size-mib", 256);
        string pattern = args.GetString("pattern", "unique");
        int pages = sizeMib * 256;
        byte* arena = (byte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)pages * Topology.PageSize, Topology.PageSize);
        try
        {
            byte[] page = new byte[Topology.PageSize];
            for (int i = 0; i < pages; i++)
            {
                KsmPatterns.Fill(pattern, i, pages, page);
                page.CopyTo(new Span<byte>(arena + (long)i * Topology.PageSize, Topology.PageSize));
            }
            long compares = 0;
            var comparer = Comparer<int>.Create((a, b) =>
            {
                compares++;
                return a == b ? 0 : Vmm.Native.PageOps.Compare(arena + (long)a * Topology.PageSize, arena + (long)b * Topology.PageSize);
            });
            double treeInsert = 0, treeLookup = 0, hashInsert = 0, hashLookup = 0;
            long treeInsertCompares = 0, treeLookupCompares = 0, hashCompares = 0;
            for (int round = 0; round < 3; round++)
            {
                // The tree: SortedSet is a red-black tree; equal contents are one entry, as in Linux's trees.
                var tree = new SortedSet<int>(comparer);
                compares = 0;
                long t0 = Stopwatch.GetTimestamp();
                for (int i = 0; i < pages; i++)
                    tree.Add(i);
                treeInsert = Stopwatch.GetElapsedTime(t0).TotalNanoseconds / pages;
                treeInsertCompares = compares;
                compares = 0;
                t0 = Stopwatch.GetTimestamp();
                for (int i = 0; i < pages; i++)
                    tree.TryGetValue(i, out _);
                treeLookup = Stopwatch.GetElapsedTime(t0).TotalNanoseconds / pages;
                treeLookupCompares = compares;

                // The hash: the checksum is read from the page (the filter needs it anyway), then one
                // compare against the entry found confirms the match, as the merge step does.
                var hash = new Dictionary<ulong, int>(pages);
                var sums = new ulong[pages];
                hashCompares = 0;
                t0 = Stopwatch.GetTimestamp();
                for (int i = 0; i < pages; i++)
                {
                    sums[i] = Vmm.Native.PageOps.Checksum64(arena + (long)i * Topology.PageSize);
                    if (hash.TryGetValue(sums[i], out int other))
                    {
                        hashCompares++;
                        Vmm.Native.PageOps.PageEquals(arena + (long)i * Topology.PageSize, arena + (long)other * Topology.PageSize);
                    }
                    else
                    {
                        hash[sums[i]] = i;
                    }
                }
                hashInsert = Stopwatch.GetElapsedTime(t0).TotalNanoseconds / pages;
                t0 = Stopwatch.GetTimestamp();
                for (int i = 0; i < pages; i++)
                {
                    ulong sum = Vmm.Native.PageOps.Checksum64(arena + (long)i * Topology.PageSize);
                    if (hash.TryGetValue(sum, out int other))
                        Vmm.Native.PageOps.PageEquals(arena + (long)i * Topology.PageSize, arena + (long)other * Topology.PageSize);
                }
                hashLookup = Stopwatch.GetElapsedTime(t0).TotalNanoseconds / pages;
            }
            Console.WriteLine($"ksm-index {pattern} {sizeMib} MiB: memcmp tree {treeInsert:F0} ns/insert ({treeInsertCompares / (double)pages:F1} compares), {treeLookup:F0} ns/lookup ({treeLookupCompares / (double)pages:F1} compares); " +
                              $"checksum hash (checksum included) {hashInsert:F0} ns/insert, {hashLookup:F0} ns/lookup (1 read + {hashCompares / (double)pages:F2} compares)");
            return
            [
                new("pattern", pattern), new("size_mib", sizeMib),
                new("tree_insert_ns", Math.Round(treeInsert, 1)), new("tree_lookup_ns", Math.Round(treeLookup, 1)),
                new("tree_compares_per_insert", Math.Round(treeInsertCompares / (double)pages, 2)),
                new("hash_insert_ns", Math.Round(hashInsert, 1)), new("hash_lookup_ns", Math.Round(hashLookup, 1)),
            ];
        }
        finally
        {
            System.Runtime.InteropServices.NativeMemory.AlignedFree(arena);
        }
    }
}
