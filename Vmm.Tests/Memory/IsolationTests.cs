using Vmm.Memory;

namespace Vmm.Tests.Memory;

[TestFixture]
[Category("Smoke")]
public sealed class IsolationTests
{
    /// <summary>One node of 8 MiB in two 4 MiB blocks, one of them movable: a block to isolate and one to allocate from.</summary>
    private static MachineOptions OneNode => TestMachines.OneNode with { NodeSizeBytes = 8L << 20, BlockSizeBytes = 4L << 20, MovableBlocksPerNode = 1 };

    [Test]
    public void An_isolated_free_range_is_never_allocated_and_comes_back_after_undo()
    {
        using var machine = TestMachines.Create(OneNode);
        PageAllocator allocator = machine.Allocator;
        long start = machine.Topology.FirstPfnOfBlock(1);
        long end = start + machine.Topology.FramesPerBlock;
        Assert.That(allocator.IsolatePageRange(start, end), Is.EqualTo(Errno.None));
        Assert.That(allocator.TestPagesIsolated(start, end), Is.True, "every frame of a free block is on the ISOLATE lists");
        Assert.That(allocator.GetPageblockMigratetype(start), Is.EqualTo(MigrateType.Isolate));
        Assert.That(machine.GetStats().Nodes[0].Zones[1].IsolatedFreePages, Is.EqualTo(1024));
        Assert.That(machine.GetStats().Nodes[0].Zones[1].FreePages, Is.Zero, "isolated frames do not count as allocatable");

        var taken = new List<long>();
        long pfn;
        while ((pfn = allocator.AllocPages(0, AllocFlags.Movable)) != PageAllocator.NoPfn)
            taken.Add(pfn);
        Assert.That(taken, Has.Count.EqualTo(1024), "only the NORMAL block is left to allocate");
        Assert.That(taken, Has.None.InRange(start, end - 1));

        allocator.UndoIsolatePageRange(start, end);
        Assert.That(allocator.GetPageblockMigratetype(start), Is.EqualTo(MigrateType.Movable), "the previous type comes back");
        Assert.That(allocator.AllocPages(0, AllocFlags.Movable), Is.InRange(start, end - 1));
        Assert.That(machine.GetStats().Nodes[0].Zones[1].BuddyInfo.Sum(), Is.GreaterThan(0));
    }

    [Test]
    public void A_page_freed_inside_an_isolated_range_goes_to_the_isolate_list()
    {
        using var machine = TestMachines.Create(OneNode);
        PageAllocator allocator = machine.Allocator;
        long start = machine.Topology.FirstPfnOfBlock(1);
        long end = start + machine.Topology.FramesPerBlock;
        long pfn = allocator.AllocPages(0, AllocFlags.Movable);
        Assert.That(pfn, Is.InRange(start, end - 1), "movable allocations start in ZONE_MOVABLE");
        Assert.That(allocator.IsolatePageRange(start, end), Is.EqualTo(Errno.None), "in-use pages of ZONE_MOVABLE do not block isolation");
        Assert.That(allocator.TestPagesIsolated(start, end), Is.False, "one frame is still in use");
        allocator.FreePages(pfn);
        Assert.That(allocator.TestPagesIsolated(start, end), Is.True, "the freed frame joined the ISOLATE lists, not a per-CPU cache");
        allocator.UndoIsolatePageRange(start, end);
        Assert.That(machine.GetStats().Nodes[0].Zones[1].BuddyInfo[PageAllocator.MaxOrder], Is.EqualTo(1), "and merged back after undo");
    }

    [Test]
    public void An_unmovable_page_in_ZONE_NORMAL_makes_isolation_fail_with_EBUSY_and_isolates_nothing()
    {
        using var machine = TestMachines.Create(OneNode);
        PageAllocator allocator = machine.Allocator;
        long pfn = allocator.AllocPages(0, AllocFlags.None);
        long pageblock = pfn & ~(long)(PageAllocator.PageblockFrames - 1);
        long start = 0, end = machine.Topology.FramesPerBlock;
        Assert.That(allocator.IsolatePageRange(start, end, out long bad), Is.EqualTo(Errno.EBUSY));
        Assert.That(bad, Is.EqualTo(pfn), "the diagnostic names the page");
        for (long pb = start; pb < end; pb += PageAllocator.PageblockFrames)
            Assert.That(allocator.GetPageblockMigratetype(pb), Is.Not.EqualTo(MigrateType.Isolate), "the partial isolation was rolled back");

        machine.MemMap.SetFlag(pfn, PageFlags.Lru); // now it looks like a movable LRU page
        Assert.That(allocator.IsolatePageRange(pageblock, pageblock + PageAllocator.PageblockFrames), Is.EqualTo(Errno.None));
        Assert.That(allocator.IsolatePageRange(pageblock, pageblock + PageAllocator.PageblockFrames), Is.EqualTo(Errno.EBUSY), "already isolated");
        allocator.UndoIsolatePageRange(pageblock, pageblock + PageAllocator.PageblockFrames);
        machine.MemMap.ClearFlag(pfn, PageFlags.Lru);
        allocator.FreePages(pfn);
    }

    [Test]
    public void Isolating_one_pageblock_of_a_max_order_block_splits_it()
    {
        using var machine = TestMachines.Create(OneNode);
        PageAllocator allocator = machine.Allocator;
        long start = machine.Topology.FirstPfnOfBlock(1) + PageAllocator.PageblockFrames; // second half of a 4 MiB block
        Assert.That(allocator.IsolatePageRange(start, start + PageAllocator.PageblockFrames), Is.EqualTo(Errno.None));
        ZoneStats zone = machine.GetStats().Nodes[0].Zones[1];
        Assert.That(zone.BuddyInfo[PageAllocator.MaxOrder], Is.Zero);
        Assert.That(zone.BuddyInfo[PageAllocator.PageblockOrder], Is.EqualTo(2));
        Assert.That(zone.IsolatedFreePages, Is.EqualTo(512));
        Assert.That(zone.FreePages, Is.EqualTo(512));
        Assert.That(allocator.AllocPages(9, AllocFlags.Movable | AllocFlags.ThisNode), Is.EqualTo(start - PageAllocator.PageblockFrames));
    }

    [Test]
    public void Misaligned_ranges_are_rejected()
    {
        using var machine = TestMachines.Create(OneNode);
        Assert.Throws<ArgumentException>(() => machine.Allocator.IsolatePageRange(1, 512));
        Assert.Throws<ArgumentException>(() => machine.Allocator.IsolatePageRange(0, 100));
        Assert.Throws<ArgumentException>(() => machine.Allocator.IsolatePageRange(512, 512));
        Assert.Throws<ArgumentException>(() => machine.Allocator.UndoIsolatePageRange(0, machine.Topology.TotalFrames + 512));
    }
}
