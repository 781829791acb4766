using System.Runtime.CompilerServices;
using Vmm.Memory;

namespace Vmm.Tests.Memory;

[TestFixture]
[Category("Smoke")]
public sealed class AllocatorTests
{
    [Test]
    public void A_frame_descriptor_takes_at_most_64_bytes()
    {
        Assert.That(Unsafe.SizeOf<PageDescriptor>(), Is.EqualTo(64), "the budget is one cache line per 4 KiB frame");
        using var machine = TestMachines.Create();
        Assert.That(machine.GetStats().DescriptorBytes, Is.Zero, "a new machine has initialised no memmap section");
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        Assert.That(machine.GetStats().DescriptorBytes, Is.EqualTo(machine.MemMap.FramesPerSection * 64), "the first allocation initialised one section");
        machine.Allocator.FreePages(pfn);
    }

    [Test]
    public void A_new_machine_has_every_frame_free_in_max_order_blocks()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        MachineStats stats = machine.GetStats();
        Assert.That(stats.MemTotalBytes, Is.EqualTo(32L << 20));
        Assert.That(stats.MemFreeBytes, Is.EqualTo(32L << 20));
        foreach (ZoneStats zone in stats.Nodes.SelectMany(n => n.Zones))
        {
            Assert.That(zone.ManagedPages, Is.EqualTo(2048), $"{zone.Zone} on node {zone.Node}: one 8 MiB block");
            Assert.That(zone.BuddyInfo[PageAllocator.MaxOrder], Is.EqualTo(2), "two free 4 MiB blocks per zone");
            Assert.That(zone.BuddyInfo.Take(PageAllocator.MaxOrder).Sum(), Is.Zero, "nothing split yet");
        }
    }

    [Test]
    public void Allocation_prefers_the_requested_node_and_zone()
    {
        using var machine = TestMachines.Create();
        long movable = machine.Allocator.AllocPages(0, AllocFlags.Movable, preferredNode: 1);
        long kernel = machine.Allocator.AllocPages(0, AllocFlags.None, preferredNode: 1);
        Assert.That(machine.GetPageInfo(movable).Node, Is.EqualTo(1));
        Assert.That(machine.GetPageInfo(movable).Zone, Is.EqualTo(ZoneType.Movable), "movable requests try ZONE_MOVABLE first");
        Assert.That(machine.GetPageInfo(kernel).Node, Is.EqualTo(1));
        Assert.That(machine.GetPageInfo(kernel).Zone, Is.EqualTo(ZoneType.Normal), "unmovable requests never use ZONE_MOVABLE");
        Assert.That(machine.GetPageInfo(kernel).RefCount, Is.EqualTo(1));
        Assert.That(machine.GetPageInfo(kernel).MapCount, Is.Zero);
        machine.Allocator.FreePages(movable);
        machine.Allocator.FreePages(kernel);
    }

    [Test]
    public void Unmovable_allocations_never_come_from_ZONE_MOVABLE_even_when_NORMAL_is_full()
    {
        using var machine = TestMachines.Create(TestMachines.Small with { NodeCount = 1 });
        var taken = new List<long>();
        long pfn;
        while ((pfn = machine.Allocator.AllocPages(0, AllocFlags.None)) != PageAllocator.NoPfn)
            taken.Add(pfn);
        Assert.That(taken, Has.Count.EqualTo(512), "exactly the NORMAL zone's one 2 MiB block");
        Assert.That(taken.Select(p => machine.GetPageInfo(p).Zone), Is.All.EqualTo(ZoneType.Normal));
        Assert.That(machine.Allocator.AllocPages(0, AllocFlags.Movable), Is.Not.EqualTo(PageAllocator.NoPfn), "movable memory is still there");
    }

    [Test]
    public void ThisNode_allocations_fail_rather_than_fall_back()
    {
        using var machine = TestMachines.Create();
        var taken = new List<long>();
        long pfn;
        while ((pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.ThisNode, 0)) != PageAllocator.NoPfn)
            taken.Add(pfn);
        Assert.That(taken, Has.Count.EqualTo(1024), "all of node 0, both zones");
        Assert.That(taken.Select(p => machine.GetPageInfo(p).Node), Is.All.EqualTo(0));
        long other = machine.Allocator.AllocPages(0, AllocFlags.Movable, 0);
        Assert.That(machine.GetPageInfo(other).Node, Is.EqualTo(1), "without ThisNode the allocation falls back to node 1");
    }

    [Test]
    public void Fallback_follows_node_distance()
    {
        var options = new MachineOptions
        {
            NodeCount = 3, NodeSizeBytes = 2L << 20, BlockSizeBytes = 2L << 20, MinFreeKbytes = 0, MovableBlocksPerNode = 0,
            NodeDistances = new[,] { { 10, 40, 20 }, { 40, 10, 20 }, { 20, 20, 10 } },
        };
        using var machine = TestMachines.Create(options);
        for (int i = 0; i < 512; i++)
            Assert.That(machine.GetPageInfo(machine.Allocator.AllocPages(0, AllocFlags.Movable, 0)).Node, Is.EqualTo(0));
        Assert.That(machine.GetPageInfo(machine.Allocator.AllocPages(0, AllocFlags.Movable, 0)).Node, Is.EqualTo(2),
            "node 2 is nearer to node 0 (20) than node 1 (40)");
    }

    [Test]
    public void Every_allocated_frame_reads_zero_even_after_a_previous_owner_wrote_it()
    {
        using var machine = TestMachines.Create();
        var first = new List<long>();
        for (int i = 0; i < 64; i++)
        {
            long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
            machine.GetFrameSpan(pfn).Fill(0xA5);
            first.Add(pfn);
        }
        foreach (long pfn in first)
            machine.Allocator.FreePages(pfn);
        var reused = 0;
        for (int i = 0; i < 64; i++)
        {
            long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
            if (first.Contains(pfn))
                reused++;
            Assert.That(machine.GetFrameSpan(pfn).IndexOfAnyExcept((byte)0), Is.EqualTo(-1), $"frame {pfn} must reach its new owner zeroed");
        }
        Assert.That(reused, Is.GreaterThan(0), "the test must actually recycle frames");
    }

    [Test]
    public void Compound_pages_carry_head_and_tail_and_redirect_head_policy_flags()
    {
        using var machine = TestMachines.Create();
        long head = machine.Allocator.AllocPages(2, AllocFlags.Movable | AllocFlags.Compound);
        MemMap map = machine.MemMap;
        Assert.That(machine.GetPageInfo(head).Flags.HasFlag(PageFlags.Head), Is.True);
        for (long tail = head + 1; tail < head + 4; tail++)
        {
            Assert.That(machine.GetPageInfo(tail).Flags.HasFlag(PageFlags.Tail), Is.True);
            Assert.That(map.CompoundHead(tail), Is.EqualTo(head));
            Assert.That(map.CompoundOrder(tail), Is.EqualTo(2));
        }
        map.SetFlag(head + 3, PageFlags.Lru);
        Assert.That(map.RawFlags(head).HasFlag(PageFlags.Lru), Is.True, "PG_lru is a head-policy flag");
        Assert.That(map.RawFlags(head + 3).HasFlag(PageFlags.Lru), Is.False);
        Assert.That(map.TestFlag(head + 2, PageFlags.Lru), Is.True, "tests on a tail read the head");
        map.SetFlag(head + 1, PageFlags.Private);
        Assert.That(map.RawFlags(head + 1).HasFlag(PageFlags.Private), Is.True, "PG_private lives on every frame");
        Assert.That(map.RawFlags(head).HasFlag(PageFlags.Private), Is.False);
        map.SetFlag(head, PageFlags.Dirty);
        Assert.That(map.TestFlag(head + 1, PageFlags.Dirty), Is.True);

        Assert.Throws<VmBugException>(() => map.SetFlag(head + 1, PageFlags.Locked), "PG_locked may not be changed through a tail");
        Assert.That(map.TestFlag(head + 1, PageFlags.Locked), Is.False, "but may be tested through one");
        Assert.Throws<VmBugException>(() => map.SetFlag(head, PageFlags.Reserved), "PG_reserved is not for compound pages");
        Assert.Throws<VmBugException>(() => map.TestFlag(head + 1, PageFlags.Waiters), "PG_waiters is only for heads");

        Assert.Throws<VmBugException>(() => machine.Allocator.FreePages(head, 1), "the order must match the compound order");
        map.ClearFlag(head, PageFlags.Lru);
        map.ClearFlag(head + 1, PageFlags.Private);
        machine.Allocator.FreePages(head, 2);
        Assert.That(machine.GetPageInfo(head + 1).Flags & (PageFlags.Tail | PageFlags.Head), Is.EqualTo(PageFlags.None));
    }

    [Test]
    public void A_double_free_is_caught_and_changes_nothing()
    {
        using var machine = TestMachines.Create();
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        machine.Allocator.FreePages(pfn);
        machine.Allocator.DrainAllPages();
        long freeBefore = machine.GetStats().AllFreePages;
        Assert.Throws<VmBugException>(() => machine.Allocator.FreePages(pfn));
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore));
        Assert.That(machine.GetPageInfo(pfn).RefCount, Is.Zero);
    }

    [Test]
    public void With_poisoning_a_write_to_a_freed_frame_is_caught_when_it_is_allocated_again()
    {
        using var machine = TestMachines.Create(TestMachines.Small with { PoisonFreedFrames = true, NodeCount = 1 });
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        machine.GetFrameSpan(pfn).Fill(1);
        machine.Allocator.FreePages(pfn);
        Assert.That(machine.GetFrameSpan(pfn).IndexOfAnyExcept(PageAllocator.PoisonByte), Is.EqualTo(-1), "freed frames are poisoned");
        Assert.That(machine.Allocator.AllocPages(0, AllocFlags.Movable), Is.EqualTo(pfn), "an intact poisoned frame is handed out again");
        machine.Allocator.FreePages(pfn);
        machine.GetFrameSpan(pfn)[100] = 0; // a stale writer
        var bug = Assert.Throws<VmBugException>(() => machine.Allocator.AllocPages(0, AllocFlags.Movable));
        Assert.That(bug!.Message, Does.Contain("written while free"));
    }

    [Test]
    public void GetPage_on_a_free_frame_is_refused_and_cannot_resurrect_it()
    {
        using var machine = TestMachines.Create();
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        machine.Allocator.FreePages(pfn);
        Assert.Throws<VmBugException>(() => machine.MemMap.GetPage(pfn));
        Assert.That(machine.GetPageInfo(pfn).RefCount, Is.Zero, "the failed get_page left no reference");
        Assert.That(machine.MemMap.TryGetPageUnlessZero(pfn), Is.False, "a free frame cannot be taken by a stale holder");
        Assert.That(machine.Allocator.AllocPages(0, AllocFlags.Movable), Is.EqualTo(pfn), "and the frame is still allocatable");
    }

    [Test]
    public void A_block_freed_while_a_scanner_holds_its_head_loses_no_frame()
    {
        // The race the compaction soak's hour found: a scanner takes a speculative reference on the head of a
        // high-order block (get_page_unless_zero on a frame it saw in use), the owner frees the block, and
        // the scanner's put then frees the head alone. The other 2^order - 1 frames must not be lost.
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        long freeBefore = machine.GetStats().AllFreePages;
        int order = PageAllocator.MaxOrder;
        long pfn = machine.Allocator.AllocPages(order, AllocFlags.Movable, preferredNode: 0);
        Assert.That(machine.MemMap.TryGetPageUnlessZero(pfn), Is.True, "the scanner's speculative reference");
        machine.Allocator.FreePages(pfn, order);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore - 1), "all but the head are free while the scanner holds it");
        machine.PutPage(pfn);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore), "the scanner's put freed the head: every frame is back");
        TestMachines.AssertAuditClean(machine);
        machine.Allocator.DrainAllPages();
        Assert.That(machine.MemMap.RawFlags(pfn) & PageFlags.Buddy, Is.EqualTo(PageFlags.Buddy), "the head is on a free list again");
        Assert.That((int)machine.MemMap[pfn].Private, Is.EqualTo(order), "the halves and the head merged back into one block of the max order");
    }

    [TestCase(false)]
    [TestCase(true)]
    public void A_compound_block_freed_while_a_scanner_holds_it_comes_back_whole(bool throughTail)
    {
        // As above for a compound page: the scanner's put is the last, and frees the whole block from its
        // head (folio_put), whichever frame of the block the scanner named.
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        long freeBefore = machine.GetStats().AllFreePages;
        long head = machine.Allocator.AllocPages(3, AllocFlags.Movable | AllocFlags.Compound, preferredNode: 0);
        long named = throughTail ? head + 5 : head;
        Assert.That(machine.MemMap.TryGetPageUnlessZero(named), Is.True, "the scanner's speculative reference");
        machine.Allocator.FreePages(head, 3);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore - 8), "the block waits for the scanner's put");
        Assert.That(machine.Audit(), Has.None.Contains("lost to the allocator"), "a compound page's tails are not lost while its head is held");
        machine.PutPage(named);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore), "the put freed the whole block");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Freeing_a_block_with_a_bad_frame_is_refused_before_the_reference_goes()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        long pfn = machine.Allocator.AllocPages(2, AllocFlags.Movable, preferredNode: 0);
        machine.MemMap[pfn + 3].MapCount = 0; // the block's last frame still mapped
        var bug = Assert.Throws<VmBugException>(() => machine.Allocator.FreePages(pfn, 2));
        Assert.That(bug!.Message, Does.Contain($"frame {pfn + 3}"));
        Assert.That(machine.GetPageInfo(pfn).RefCount, Is.EqualTo(1), "the caller's reference is left as it was");
        Assert.That(machine.MemMap.RawFlags(pfn + 1) & PageFlags.Buddy, Is.EqualTo(PageFlags.None), "no part of the block was freed");
        machine.MemMap[pfn + 3].MapCount = -1;
        machine.Allocator.FreePages(pfn, 2);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Audit_names_frames_lost_to_the_allocator_and_recounts_the_free_counters()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        long pfn = machine.Allocator.AllocPages(2, AllocFlags.Movable, preferredNode: 0);
        // A leak as the soak's was: the block's reference gone, its frames on no list.
        machine.MemMap[pfn].RefCount = 0;
        IReadOnlyList<string> problems = machine.Audit();
        Assert.That(problems, Has.Some.Contains($"4 frames have refcount 0 but are on no free list or per-CPU list (lost to the allocator), from frame {pfn}"));
        machine.MemMap[pfn].RefCount = 1;
        machine.Allocator.FreePages(pfn, 2);
        TestMachines.AssertAuditClean(machine);

        // A counter that drifted from its lists.
        Zone zone = machine.Allocator.ZoneOf(pfn);
        lock (zone.Lock)
            zone.FreePages++;
        Assert.That(machine.Audit(), Has.Some.Contains($"{zone}: FreePages"));
        lock (zone.Lock)
            zone.FreePages--;
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Split_page_accepts_a_head_a_scanner_holds_a_speculative_reference_to()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        long freeBefore = machine.GetStats().AllFreePages;
        long pfn = machine.Allocator.AllocPages(3);
        Assert.That(machine.MemMap.TryGetPageUnlessZero(pfn), Is.True, "the scanner's speculative reference");
        machine.Allocator.SplitPage(pfn, 3);
        machine.PutPage(pfn);
        for (long p = pfn; p < pfn + 8; p++)
            Assert.That(machine.GetPageInfo(p).RefCount, Is.EqualTo(1), $"frame {p} holds the owner's reference alone");
        machine.Allocator.FreeContigRange(pfn, 8);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Freeing_a_page_that_is_still_mapped_is_refused_and_leaves_the_reference()
    {
        using var machine = TestMachines.Create();
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        machine.MemMap[pfn].MapCount = 0; // one mapping
        Assert.Throws<VmBugException>(() => machine.Allocator.FreePages(pfn));
        Assert.That(machine.GetPageInfo(pfn).RefCount, Is.EqualTo(1), "the caller's reference is restored");
        machine.MemMap[pfn].MapCount = -1;
        machine.Allocator.FreePages(pfn);
    }

    [Test]
    public void Bad_arguments_are_rejected()
    {
        using var machine = TestMachines.Create();
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.Allocator.AllocPages(10), "2 MiB blocks allow order 9 at most");
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.Allocator.AllocPages(-1));
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.Allocator.AllocPages(0, AllocFlags.None, 2));
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.Allocator.FreePages(machine.Topology.TotalFrames));
        long pfn = machine.Allocator.AllocPages(1);
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.Allocator.FreePages(pfn + 1, 1), "not aligned to the order");
        machine.Allocator.FreePages(pfn, 1);
        Assert.Throws<ArgumentException>(() => new Machine(TestMachines.Small with { NodeSizeBytes = 3L << 20 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new Machine(TestMachines.Small with { BlockSizeBytes = 1L << 20 }));
    }

    [Test]
    public void Watermarks_hold_back_the_reserve_from_ordinary_allocations()
    {
        using var machine = TestMachines.Create(new MachineOptions { NodeCount = 1, NodeSizeBytes = 64L << 20, BlockSizeBytes = 32L << 20, MovableBlocksPerNode = 0 });
        ZoneStats zone = machine.GetStats().Nodes[0].Zones[0];
        Assert.That(zone.Watermarks.Min, Is.GreaterThan(0));
        Assert.That(zone.Watermarks.Low, Is.GreaterThan(zone.Watermarks.Min));
        Assert.That(zone.Watermarks.High, Is.GreaterThan(zone.Watermarks.Low));
        int ordinary = 0;
        while (machine.Allocator.AllocPages(0) != PageAllocator.NoPfn)
            ordinary++;
        machine.Allocator.DrainAllPages();
        long free = machine.GetStats().Nodes[0].Zones[0].FreePages;
        Assert.That(free, Is.EqualTo(zone.Watermarks.Min).Within(1), "ordinary allocations stop at the min watermark");
        int high = 0;
        while (machine.Allocator.AllocPages(0, AllocFlags.HighPriority) != PageAllocator.NoPfn)
            high++;
        Assert.That(high, Is.GreaterThan(0), "high-priority allocations may dip below min");
        int last = 0;
        while (machine.Allocator.AllocPages(0, AllocFlags.NoWatermark) != PageAllocator.NoPfn)
            last++;
        Assert.That(ordinary + high + last, Is.EqualTo(zone.ManagedPages), "NoWatermark takes everything that is left");
    }

    [Test]
    public void Unmovable_allocations_claim_pageblocks_and_everything_coalesces_back()
    {
        using var machine = TestMachines.Create(new MachineOptions { NodeCount = 1, NodeSizeBytes = 16L << 20, BlockSizeBytes = 16L << 20, MovableBlocksPerNode = 0, MinFreeKbytes = 0 });
        var pages = new List<long>();
        for (int i = 0; i < 100; i++)
            pages.Add(machine.Allocator.AllocPages(0));
        Assert.That(pages.Select(p => machine.Allocator.GetPageblockMigratetype(p)).Distinct(), Is.EqualTo(new[] { MigrateType.Unmovable }),
            "the pageblock an unmovable allocation steals from becomes UNMOVABLE");
        Assert.That(pages.Select(p => p >> PageAllocator.PageblockOrder).Distinct().Count(), Is.EqualTo(1), "and they cluster in it");
        foreach (long p in pages)
            machine.Allocator.FreePages(p);
        machine.Allocator.DrainAllPages();
        Assert.That(machine.GetStats().Nodes[0].Zones[0].BuddyInfo[PageAllocator.MaxOrder], Is.EqualTo(4), "all 16 MiB back in 4 MiB blocks");
    }
}
