using System.Runtime.InteropServices;
using NUnit.Framework;
using Vmm.Memory;

namespace Vmm.Tests.Compaction;

/// <summary>
/// A machine whose memory a process filled and then freed every other page of (MADV_DONTNEED): every
/// pageblock holds used and free frames, so no free block of order 9 exists until compaction moves pages.
/// Every page the process kept has contents derived from its index (the shadow), checked by <see cref="AssertContentsIntact"/>.
/// </summary>
internal sealed class FragmentedMachine : IDisposable
{
    public static MachineOptions Options => new()
    {
        NodeCount = 1,
        NodeSizeBytes = 32L << 20,
        BlockSizeBytes = 4L << 20,
        MovableBlocksPerNode = 4,
        MinFreeKbytes = 0,
        BackgroundThreads = false,
        PoisonFreedFrames = true,
    };

    public FragmentedMachine(MachineOptions? options = null)
    {
        Machine = TestMachines.Create(options ?? Options);
        Process = Machine.CreateProcess();
        Machine.Allocator.DrainAllPages();
        long free = Machine.GetStats().Nodes.Sum(n => n.Zones.Sum(z => z.FreePages + z.PcpPages));
        // Leave room for the page tables (one per 512 pages) and a few more: the rest of memory is the process's.
        Pages = (int)(free - free / 512 - 16);
        Va = Process.Mmap((ulong)Pages * Topology.PageSize);
        var page = new byte[Topology.PageSize];
        for (int i = 0; i < Pages; i++)
        {
            Expected(i, page);
            Process.Write(AddressOf(i), page);
        }
        for (int i = 0; i < Pages; i += 2)
            Assert.That(Process.Madvise(AddressOf(i), Topology.PageSize, Advice.DontNeed), Is.EqualTo(Errno.None));
        Machine.Allocator.DrainAllPages();
    }

    public Machine Machine { get; }

    public VmProcess Process { get; }

    public ulong Va { get; }

    public int Pages { get; }

    public ulong AddressOf(int index) => Va + (ulong)index * Topology.PageSize;

    public Zone Zone(ZoneType type) => Machine.Allocator.GetZone(0, type);

    /// <summary>Free blocks of order 9 and more, in 2 MiB units (what buddyinfo's last two columns give).</summary>
    public long Order9Blocks() =>
        Machine.GetStats().Nodes.Sum(n => n.Zones.Sum(z => z.BuddyInfo.Select((count, order) => order >= 9 ? count << (order - 9) : 0).Sum()));

    /// <summary>Free memory in 2 MiB units.</summary>
    public long Order9Possible()
    {
        Machine.Allocator.DrainAllPages();
        return Machine.GetStats().Nodes.Sum(n => n.Zones.Sum(z => z.FreePages)) / PageAllocator.PageblockFrames;
    }

    public static void Expected(int index, Span<byte> page)
    {
        Span<ulong> words = MemoryMarshal.Cast<byte, ulong>(page);
        for (int w = 0; w < words.Length; w++)
            words[w] = ((ulong)index << 32) ^ ((ulong)w * 0x9E3779B97F4A7C15UL) ^ 0x5A5A;
    }

    /// <summary>Every byte of every page the process kept (the odd ones) against the shadow.</summary>
    public void AssertContentsIntact()
    {
        var expected = new byte[Topology.PageSize];
        var actual = new byte[Topology.PageSize];
        for (int i = 1; i < Pages; i += 2)
        {
            Expected(i, expected);
            Process.Read(AddressOf(i), actual);
            if (!expected.AsSpan().SequenceEqual(actual))
                Assert.Fail($"page {i} differs at byte {expected.AsSpan().CommonPrefixLength(actual)} after compaction");
        }
    }

    public void Dispose() => Machine.Dispose();
}

[TestFixture]
[Category("Compaction")]
public class CompactionTests
{
    [Test]
    public void An_order_9_allocation_that_fails_in_a_fragmented_zone_succeeds_through_direct_compaction()
    {
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        Assert.That(f.Order9Blocks(), Is.Zero, "every pageblock holds pages the process kept");

        // Without compaction the allocation fails.
        PageAllocator.IDirectCompactor? hook = machine.Allocator.DirectCompactor;
        machine.Allocator.DirectCompactor = null;
        Assert.That(machine.Allocator.AllocPages(9, AllocFlags.Movable), Is.EqualTo(PageAllocator.NoPfn), "no free block of order 9 exists");
        machine.Allocator.DirectCompactor = hook;

        long pfn = machine.Allocator.AllocPages(9, AllocFlags.Movable);

        Assert.That(pfn, Is.Not.EqualTo(PageAllocator.NoPfn), "direct compaction made a free block of order 9");
        Assert.That(pfn % 512, Is.Zero, "a naturally aligned block");
        CompactionStats stats = machine.Compaction.GetStats();
        Assert.That(stats.Stall, Is.EqualTo(1), "one direct compaction ran (async was enough)");
        Assert.That(stats.Success, Is.EqualTo(1), "and the retried allocation succeeded");
        Assert.That(stats.Fail, Is.Zero);
        Assert.That(stats.PagesMigrated, Is.GreaterThan(0), "pages moved to make the block");
        Assert.That(stats.MigrateScanned, Is.GreaterThan(0));
        Assert.That(stats.FreeScanned, Is.GreaterThan(0));
        Assert.That(stats.Isolated, Is.GreaterThanOrEqualTo(2 * stats.PagesMigrated), "each moved page and its new frame were isolated");
        Assert.That(machine.ReadVmStat("compact_stall", out long stall), Is.EqualTo(Errno.None));
        Assert.That(stall, Is.EqualTo(1), "vmstat shows the same counter");
        Assert.That(machine.Compaction.IsolatedFreeFrames, Is.Zero, "the run gave back every free frame it did not use");
        machine.Allocator.FreePages(pfn, 9);
        f.AssertContentsIntact();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Direct_compaction_runs_while_another_thread_reads_the_hotplug_lock()
    {
        // get_online_mems is the hotplug lock's shared side, as Linux's mem_hotplug_lock: compact_memory, a
        // kcompactd step or a contiguous allocation holding it must not make direct compaction skip the zone.
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        using var held = new ManualResetEventSlim();
        using var release = new ManualResetEventSlim();
        var reader = new Thread(() =>
        {
            machine.Hotplug.GetOnlineMems();
            held.Set();
            release.Wait();
            machine.Hotplug.PutOnlineMems();
        });
        reader.Start();
        held.Wait();
        long pfn;
        try
        {
            pfn = machine.Allocator.AllocPages(9, AllocFlags.Movable);
        }
        finally
        {
            release.Set();
            reader.Join();
        }

        Assert.That(pfn, Is.Not.EqualTo(PageAllocator.NoPfn), "direct compaction ran beside the other reader and made the block");
        CompactionStats stats = machine.Compaction.GetStats();
        Assert.That(stats.Stall, Is.EqualTo(1));
        Assert.That(stats.Success, Is.EqualTo(1));
        machine.Allocator.FreePages(pfn, 9);
        f.AssertContentsIntact();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_block_state_change_waits_for_the_readers_of_the_hotplug_lock_in_progress()
    {
        // The writer side: an offline waits for the readers in progress (a compaction pass, a contiguous
        // allocation) before it changes anything, and starts once they have left.
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        machine.Hotplug.GetOnlineMems();
        MemoryBlock block = machine.Hotplug.Blocks.First(b => b.State == "online" && b.Zone == ZoneType.Movable);
        var offline = Task.Run(() => block.Write("state", "offline"));
        Assert.That(offline.Wait(300), Is.False, "the offline waits for the reader to leave");
        machine.Hotplug.PutOnlineMems();
        Assert.That(offline.Wait(TimeSpan.FromSeconds(30)), Is.True, "and starts once it has");
        _ = offline.Result;
        f.AssertContentsIntact();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Compact_memory_recovers_nearly_all_free_memory_as_order_9_blocks_and_keeps_every_byte()
    {
        using var f = new FragmentedMachine();
        long possible = f.Order9Possible();
        Assert.That(f.Order9Blocks(), Is.Zero);

        f.Machine.Compaction.CompactMemory();

        long after = f.Order9Blocks();
        Assert.That(after, Is.GreaterThanOrEqualTo(possible * 9 / 10), $"of {possible} possible 2 MiB blocks");
        CompactionStats stats = f.Machine.Compaction.GetStats();
        Assert.That(stats.PagesMigrated, Is.GreaterThan(f.Pages / 8), "a good part of the kept pages moved");
        Assert.That(stats.Stall, Is.Zero, "compact_memory is not direct compaction");
        f.AssertContentsIntact();
        TestMachines.AssertAuditClean(f.Machine);
    }

    [Test]
    public void Compact_node_compacts_only_that_node()
    {
        using var f = new FragmentedMachine(FragmentedMachine.Options with { NodeCount = 2, NodeSizeBytes = 16L << 20, MovableBlocksPerNode = 2 });
        Machine machine = f.Machine;
        long node1Before = machine.GetStats().Nodes[1].Zones.Sum(z => z.BuddyInfo[9] + z.BuddyInfo[10]);

        machine.Compaction.CompactNode(0);

        var nodes = machine.GetStats().Nodes;
        Assert.That(nodes[0].Zones.Sum(z => z.BuddyInfo[9] + z.BuddyInfo[10]), Is.GreaterThan(0), "node 0 has order-9 blocks now");
        Assert.That(nodes[1].Zones.Sum(z => z.BuddyInfo[9] + z.BuddyInfo[10]), Is.EqualTo(node1Before), "node 1 was left alone");
        Assert.That(() => machine.Compaction.CompactNode(2), Throws.InstanceOf<ArgumentOutOfRangeException>());
        f.AssertContentsIntact();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Direct_compaction_honours_skip_hints_compact_memory_ignores_them_and_kcompactd_resets_them()
    {
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        PageAllocator allocator = machine.Allocator;
        foreach (ZoneType type in new[] { ZoneType.Normal, ZoneType.Movable })
        {
            Zone zone = f.Zone(type);
            for (long pfn = zone.StartPfn; pfn < zone.EndPfn; pfn += PageAllocator.PageblockFrames)
                allocator.SetPageblockSkip(pfn);
        }

        long pfn9 = allocator.AllocPages(9, AllocFlags.Movable);

        CompactionStats stats = machine.Compaction.GetStats();
        Assert.That(pfn9, Is.EqualTo(PageAllocator.NoPfn), "every pageblock is hinted: direct compaction found nothing to move");
        Assert.That(stats.Stall, Is.EqualTo(2), "both priorities ran (async, then sync-light)");
        Assert.That(stats.Fail, Is.EqualTo(2));
        Assert.That(stats.MigrateScanned, Is.Zero, "the migrate scanner skipped every hinted pageblock");
        Assert.That(stats.PagesMigrated, Is.Zero);
        Assert.That(f.Zone(ZoneType.Movable).CompactBlockskipFlush, Is.True, "the scanners met in a direct compaction");

        // kcompactd, before it sleeps, clears the hints of zones where that happened.
        machine.Compaction.StepKcompactd(0);
        Assert.That(allocator.CountPageblockSkip(f.Zone(ZoneType.Movable)), Is.Zero, "the hints were reset");
        Assert.That(f.Zone(ZoneType.Movable).CompactBlockskipFlush, Is.False);

        // Hints again; compact_memory ignores them.
        Zone movable = f.Zone(ZoneType.Movable);
        for (long pfn = movable.StartPfn; pfn < movable.EndPfn; pfn += PageAllocator.PageblockFrames)
            allocator.SetPageblockSkip(pfn);
        machine.Compaction.CompactMemory();
        stats = machine.Compaction.GetStats();
        Assert.That(stats.MigrateScanned, Is.GreaterThanOrEqualTo(movable.EndPfn - movable.StartPfn), "compact_memory scanned the hinted zone whole");
        Assert.That(f.Order9Blocks(), Is.GreaterThan(0));
        f.AssertContentsIntact();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_pageblock_that_gives_the_migrate_scanner_nothing_gets_a_skip_hint()
    {
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        machine.Compaction.CompactMemory(); // the bottom pageblocks are empty now
        Zone movable = f.Zone(ZoneType.Movable);
        machine.Compaction.ResetIsolationSuitable(movable);
        Assert.That(machine.Allocator.CountPageblockSkip(movable), Is.Zero);

        machine.Compaction.CompactMemory();

        int hinted = machine.Allocator.CountPageblockSkip(movable);
        Assert.That(hinted, Is.GreaterThan(0), "the emptied pageblocks gave nothing this time");
        for (long pfn = movable.StartPfn; pfn < movable.EndPfn; pfn += PageAllocator.PageblockFrames)
        {
            if (!machine.Allocator.IsPageblockSkip(pfn))
                continue;
            bool anyMovable = false, anyFree = false;
            for (long p = pfn; p < pfn + PageAllocator.PageblockFrames; p++)
            {
                PageInfo info = machine.GetPageInfo(p);
                anyMovable |= (info.Flags & PageFlags.Lru) != 0;
                anyFree |= info.BuddyOrder >= 0;
            }
            Assert.That(!anyMovable || !anyFree, Is.True, $"pageblock {pfn} is hinted: it is either all free or gave no free frame");
        }
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_zone_where_compaction_fails_is_deferred_for_more_requests_each_time()
    {
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        // Every page the process kept is pinned: nothing can move, every run goes through the zone and fails.
        var pins = new List<PinnedMemory>();
        for (int i = 1; i < f.Pages; i += 2)
            pins.Add(f.Process.Pin(f.AddressOf(i), Topology.PageSize, write: false));
        Zone movable = f.Zone(ZoneType.Movable);

        Assert.That(machine.Allocator.AllocPages(9, AllocFlags.Movable), Is.EqualTo(PageAllocator.NoPfn));
        Assert.That(machine.Compaction.GetStats().Stall, Is.EqualTo(2), "async and sync-light both ran");
        Assert.That(movable.CompactDeferShift, Is.EqualTo(1), "the failed sync-light run deferred the zone");
        Assert.That(movable.CompactOrderFailed, Is.Zero, "no order has succeeded yet: every order is deferred (it rises with successes)");

        Assert.That(machine.Allocator.AllocPages(9, AllocFlags.Movable), Is.EqualTo(PageAllocator.NoPfn));
        CompactionStats stats = machine.Compaction.GetStats();
        Assert.That(stats.Stall, Is.EqualTo(3), "the async attempt was deferred (1 of 2 requests skipped), sync-light ran");
        Assert.That(stats.Fail, Is.EqualTo(3));
        Assert.That(stats.Success, Is.Zero);
        Assert.That(movable.CompactDeferShift, Is.EqualTo(2), "and failed again: 4 requests skipped next time");

        // Once order 4 has succeeded, requests of order 4 and below are never deferred.
        Vmm.Compaction.CompactionDeferReset(movable, 4, allocSuccess: false);
        Assert.That(Vmm.Compaction.CompactionDeferred(movable, 4), Is.False);
        Assert.That(movable.CompactDeferShift, Is.EqualTo(2), "only a successful allocation resets the shift");
        pins.ForEach(p => p.Dispose());
        f.AssertContentsIntact();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Deferral_ends_after_a_success_and_a_fully_deferred_zone_restarts_with_its_hints_reset()
    {
        using var f = new FragmentedMachine();
        Zone movable = f.Zone(ZoneType.Movable);
        movable.CompactDeferShift = Vmm.Compaction.MaxDeferShift;
        movable.CompactConsidered = 1 << Vmm.Compaction.MaxDeferShift;
        movable.CompactOrderFailed = 9;
        f.Zone(ZoneType.Normal).CompactDeferShift = Vmm.Compaction.MaxDeferShift;
        f.Zone(ZoneType.Normal).CompactConsidered = 1 << Vmm.Compaction.MaxDeferShift;
        f.Zone(ZoneType.Normal).CompactOrderFailed = 9;
        for (long pfn = movable.StartPfn; pfn < movable.EndPfn; pfn += PageAllocator.PageblockFrames)
            f.Machine.Allocator.SetPageblockSkip(pfn);

        long pfn9 = f.Machine.Allocator.AllocPages(9, AllocFlags.Movable);

        Assert.That(pfn9, Is.Not.EqualTo(PageAllocator.NoPfn), "the restarting zone's hints were cleared (compaction_restarting), so it could compact");
        Assert.That(movable.CompactDeferShift, Is.Zero, "a successful allocation resets the deferral");
        Assert.That(movable.CompactConsidered, Is.Zero);
        Assert.That(movable.CompactOrderFailed, Is.EqualTo(10), "orders up to 9 are known to work");
        f.Machine.Allocator.FreePages(pfn9, 9);
        TestMachines.AssertAuditClean(f.Machine);
    }

    [Test]
    public void Extfrag_threshold_refuses_compaction_when_the_index_says_lack_of_memory()
    {
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        int index = PageAllocator.FragmentationIndex(f.Zone(ZoneType.Movable), 9);
        Assert.That(index, Is.InRange(501, 999), "scattered single free pages: failure by fragmentation");

        machine.Compaction.ExtfragThreshold = 1000;
        Assert.That(machine.Allocator.AllocPages(9, AllocFlags.Movable), Is.EqualTo(PageAllocator.NoPfn), "every zone refused");
        Assert.That(machine.Compaction.GetStats().Stall, Is.Zero, "compaction did not run at all");
        Assert.That(machine.Compaction.GetStats().MigrateScanned, Is.Zero);

        machine.Compaction.ExtfragThreshold = 500;
        long pfn = machine.Allocator.AllocPages(9, AllocFlags.Movable);
        Assert.That(pfn, Is.Not.EqualTo(PageAllocator.NoPfn), "at the default threshold the zone is compacted");
        Assert.That(machine.Compaction.GetStats().Success, Is.EqualTo(1));
        Assert.That(() => machine.Compaction.ExtfragThreshold = 1001, Throws.InstanceOf<ArgumentOutOfRangeException>());
        machine.Allocator.FreePages(pfn, 9);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void The_fragmentation_index_is_near_zero_when_free_memory_is_in_few_large_blocks()
    {
        using Machine machine = TestMachines.Create(FragmentedMachine.Options);
        Zone zone = machine.Allocator.GetZone(0, ZoneType.Movable);
        Assert.That(PageAllocator.FragmentationIndex(zone, 9), Is.EqualTo(-1000), "a free block of order 9 exists: the allocation would succeed");
        Assert.That(PageAllocator.FragmentationIndex(zone, 10), Is.EqualTo(-1000));
        Assert.That(PageAllocator.ExtfragForOrder(zone, 9), Is.Zero, "all free memory is in order-9-or-more blocks");
    }

    [Test]
    public void Kcompactd_proactively_compacts_a_node_whose_fragmentation_score_is_above_the_high_mark()
    {
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        int before = machine.Compaction.GetFragmentationScore(0);
        Assert.That(before, Is.GreaterThan(machine.Compaction.FragmentationScoreWmark(low: false)), "single free pages everywhere");

        machine.Compaction.Proactiveness = 0;
        Assert.That(machine.Compaction.StepKcompactd(0), Is.EqualTo(Vmm.Compaction.DaemonWork.None), "proactiveness 0: never");

        machine.Compaction.Proactiveness = 20;
        Assert.That(machine.Compaction.StepKcompactd(0), Is.EqualTo(Vmm.Compaction.DaemonWork.Proactive));

        int after = machine.Compaction.GetFragmentationScore(0);
        Assert.That(after, Is.LessThanOrEqualTo(machine.Compaction.FragmentationScoreWmark(low: true)), $"down from {before} to the low mark");
        CompactionStats stats = machine.Compaction.GetStats();
        Assert.That(stats.DaemonMigrateScanned, Is.GreaterThan(0), "kcompactd's own scan counters");
        Assert.That(stats.DaemonMigrateScanned, Is.EqualTo(stats.MigrateScanned), "all scanning was kcompactd's");
        Assert.That(stats.PagesMigrated, Is.GreaterThan(0));
        Assert.That(machine.Compaction.StepKcompactd(0), Is.EqualTo(Vmm.Compaction.DaemonWork.None), "under the high mark now");
        f.AssertContentsIntact();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_failing_order_9_allocation_wakes_kcompactd_which_compacts_for_that_order()
    {
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        machine.Compaction.Proactiveness = 0;
        machine.Compaction.ExtfragThreshold = 1000; // no direct compaction: only the wake-up
        Assert.That(machine.Allocator.AllocPages(9, AllocFlags.Movable), Is.EqualTo(PageAllocator.NoPfn));
        machine.Compaction.ExtfragThreshold = 500;

        Assert.That(machine.Compaction.StepKcompactd(0), Is.EqualTo(Vmm.Compaction.DaemonWork.Requested));

        CompactionStats stats = machine.Compaction.GetStats();
        Assert.That(stats.DaemonWake, Is.EqualTo(1));
        Assert.That(stats.Stall, Is.Zero);
        Assert.That(stats.DaemonMigrateScanned, Is.GreaterThan(0));
        machine.Allocator.DirectCompactor = null;
        long pfn = machine.Allocator.AllocPages(9, AllocFlags.Movable);
        Assert.That(pfn, Is.Not.EqualTo(PageAllocator.NoPfn), "kcompactd made the block; no direct compaction was needed");
        Assert.That(machine.Compaction.StepKcompactd(0), Is.EqualTo(Vmm.Compaction.DaemonWork.None), "the request was served");
        machine.Allocator.FreePages(pfn, 9);
        f.AssertContentsIntact();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void The_scanners_never_touch_an_isolated_pageblock()
    {
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        Zone movable = f.Zone(ZoneType.Movable);
        // The top block of ZONE_MOVABLE is being offlined (isolated): where the free scanner starts.
        long start = movable.EndPfn - (4L << 20) / Topology.PageSize, end = movable.EndPfn;
        Assert.That(machine.Allocator.IsolatePageRange(start, end), Is.EqualTo(Errno.None));
        var inRange = new Dictionary<int, long>();
        for (int i = 1; i < f.Pages; i += 2)
        {
            long pfn = f.Process.GetPagemap(f.AddressOf(i)).Pfn;
            if (pfn >= start && pfn < end)
                inRange[i] = pfn;
        }
        long isolatedFree = movable.IsolatedFreePages;
        Assert.That(inRange, Is.Not.Empty);
        Assert.That(isolatedFree, Is.GreaterThan(0));

        machine.Compaction.CompactMemory();

        foreach ((int i, long pfn) in inRange)
            Assert.That(f.Process.GetPagemap(f.AddressOf(i)).Pfn, Is.EqualTo(pfn), $"page {i} in the isolated block stayed");
        Assert.That(movable.IsolatedFreePages, Is.EqualTo(isolatedFree), "no free frame of the isolated block was taken");
        Assert.That(machine.Compaction.GetStats().PagesMigrated, Is.GreaterThan(0), "the rest of the zone was compacted");
        machine.Allocator.UndoIsolatePageRange(start, end);
        f.AssertContentsIntact();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Buddyinfo_and_pagetypeinfo_show_the_free_blocks_before_and_after()
    {
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        string before = machine.ReadBuddyInfo();
        string[] lines = before.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.That(lines, Has.Length.EqualTo(2), "one line per zone with memory");
        Assert.That(lines[0], Does.StartWith("Node 0, zone   Normal "));
        Assert.That(lines[1], Does.StartWith("Node 0, zone  Movable "));
        long[] movableBefore = [.. lines[1]["Node 0, zone  Movable ".Length..].Split(' ', StringSplitOptions.RemoveEmptyEntries).Select(long.Parse)];
        Assert.That(movableBefore, Has.Length.EqualTo(11), "orders 0 to 10");
        Assert.That(movableBefore[9] + movableBefore[10], Is.Zero);

        machine.Compaction.CompactMemory();

        string after = machine.ReadBuddyInfo();
        long[] movableAfter = [.. after.Split('\n')[1]["Node 0, zone  Movable ".Length..].Split(' ', StringSplitOptions.RemoveEmptyEntries).Select(long.Parse)];
        Assert.That(movableAfter[9] + 2 * movableAfter[10], Is.GreaterThan(0), "compaction made order-9 blocks");
        Assert.That(movableAfter[0], Is.LessThan(movableBefore[0]), "out of single pages");

        string types = machine.ReadPageTypeInfo();
        Assert.That(types, Does.StartWith("Page block order: 9\nPages per block:  512\n\nFree pages count per migrate type at order "));
        Assert.That(types, Does.Contain("Node    0, zone  Movable, type      Movable "));
        Assert.That(types, Does.Contain("Number of blocks type     Unmovable      Movable      Isolate"));
        string blocksLine = types.Split('\n').Single(l => l.StartsWith("Node 0, zone  Movable ", StringComparison.Ordinal));
        long[] blocks = [.. blocksLine["Node 0, zone  Movable ".Length..].Split(' ', StringSplitOptions.RemoveEmptyEntries).Select(long.Parse)];
        Assert.That(blocks, Is.EqualTo(new long[] { 0, 8, 0 }), "16 MiB of MOVABLE pageblocks");
    }

    [Test]
    public void Compaction_counters_are_in_vmstat()
    {
        foreach (string name in new[] { "compact_stall", "compact_fail", "compact_success", "compact_migrate_scanned", "compact_free_scanned", "compact_isolated", "compact_daemon_wake", "compact_daemon_migrate_scanned", "compact_daemon_free_scanned" })
            Assert.That(Machine.VmStatNames, Does.Contain(name));
        using Machine machine = TestMachines.Create();
        Assert.That(machine.ReadVmStat("compact_isolated", out long value), Is.EqualTo(Errno.None));
        Assert.That(value, Is.Zero);
    }

    [Test]
    public void Kcompactd_threads_run_with_background_threads_and_stop_on_dispose()
    {
        var machine = TestMachines.Create(FragmentedMachine.Options with { BackgroundThreads = true });
        Assert.That(machine.Compaction.HasDaemonThreads, Is.True);
        machine.Compaction.WakeKcompactd(0, 9);
        machine.Dispose();
        Assert.That(machine.Compaction.HasDaemonThreads, Is.False, "Dispose stopped and joined them");
        Assert.That(machine.Compaction.DaemonFailure(0), Is.Null);
    }

    /// <summary>
    /// compaction_free when a scanner holds a speculative reference to the unused destination frame
    /// (another mover's migrate scanner took it with TryGetPageUnlessZero after the frame was handed out):
    /// the frame is not put back on the run's free list, and the scanner's put frees it.
    /// </summary>
    [Test]
    public void An_unused_destination_frame_a_scanner_holds_is_freed_by_that_scanner()
    {
        using var f = new FragmentedMachine();
        Machine machine = f.Machine;
        PageAllocator allocator = machine.Allocator;
        long free = machine.GetStats().AllFreePages;
        long first = -1;
        for (long pfn = 0; pfn < machine.MemMap.FrameCount && first < 0; pfn++)
            if (machine.MemMap.IsInitialised(pfn) && machine.MemMap.TestFlag(pfn, PageFlags.Buddy) &&
                allocator.PageblockTypeOf(pfn) == MigrateType.Movable)
                first = pfn;
        Assert.That(first, Is.GreaterThanOrEqualTo(0), "a fragmented MOVABLE pageblock");
        var list = new List<long>();
        Assert.That(allocator.IsolateFreePagesBlock(allocator.ZoneOf(first), first, list, 2, out _, out _, out _), Is.EqualTo(2));
        long dst = list[^1];
        list.RemoveAt(list.Count - 1);
        allocator.PrepIsolatedFreePage(dst);
        Assert.That(machine.MemMap.TryGetPageUnlessZero(dst), Is.True, "a migrate scanner's speculative reference");

        Assert.That(allocator.UnprepIsolatedFreePage(dst), Is.False, "not the last reference: the frame is not taken back");
        Assert.That(machine.MemMap.RefCount(dst), Is.EqualTo(1));
        machine.PutPage(dst); // the scanner lets go: the ordinary free
        allocator.ReleaseIsolatedFreePages(list);
        allocator.DrainAllPages();
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(free), "both frames free again, neither twice");
        TestMachines.AssertAuditClean(machine);
        f.AssertContentsIntact();
    }
}
