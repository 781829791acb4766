using Vmm.Memory;
using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Compaction;

/// <summary>
/// alloc_contig_range, alloc_contig_pages and free_contig_range (Compaction/ContigAlloc.cs): a range full
/// of a process's pages cleared and taken (every byte of the process still right), a pinned page (EBUSY
/// after the tries, nothing leaked, the range allocatable again), cancellation (EINTR, undone), a full
/// zone, and unmovable frames refusing isolation.
/// </summary>
[TestFixture]
[Category("Compaction")]
public sealed class ContigAllocTests
{
    private const ulong Page = 4096;

    /// <summary>Two nodes of 16 MiB in 8 MiB blocks, all ZONE_NORMAL (contiguous buffers come from there), no watermarks.</summary>
    internal static MachineOptions AllNormal => TestMachines.TwoNodes with { MovableBlocksPerNode = 0, BackgroundThreads = false };

    /// <summary>A process whose <paramref name="pages"/> pages of random bytes fill most of node 0.</summary>
    internal static (VmProcess P, ulong Va, byte[] Data) FillNode0(Machine machine, int pages)
    {
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap((ulong)pages * Page);
        byte[] data = WriteRandomPages(p, va, pages, seed: 13);
        return (p, va, data);
    }

    /// <summary>The first pageblock-aligned range of <paramref name="frames"/> frames on node 0 whose every frame is a page the process maps.</summary>
    internal static long RangeFullOfPages(Machine machine, VmProcess p, ulong va, int pages, long frames)
    {
        var mapped = new HashSet<long>();
        for (int i = 0; i < pages; i++)
            mapped.Add(p.GetPagemap(va + (ulong)i * Page).Pfn);
        for (long start = 0; start + frames <= machine.Topology.FramesPerNode; start += PageAllocator.PageblockFrames)
        {
            bool all = true;
            for (long pfn = start; pfn < start + frames && all; pfn++)
                all = mapped.Contains(pfn);
            if (all)
                return start;
        }
        Assert.Fail($"no range of {frames} frames on node 0 is wholly mapped by the process");
        return -1;
    }

    /// <summary>
    /// A process of 3,000 pages filling node 0, a pageblock wholly mapped by it, and the address of the
    /// process's page in frame <paramref name="pageToPin"/> of that pageblock.
    /// </summary>
    private static (VmProcess P, ulong Va, byte[] Data, long Start, ulong PageVa) PageblockFullOfPages(Machine machine, int pageToPin)
    {
        const int pages = 3000;
        (VmProcess p, ulong va, byte[] data) = FillNode0(machine, pages);
        long start = RangeFullOfPages(machine, p, va, pages, PageAllocator.PageblockFrames);
        for (int i = 0; i < pages; i++)
        {
            if (p.GetPagemap(va + (ulong)i * Page).Pfn == start + pageToPin)
                return (p, va, data, start, va + (ulong)i * Page);
        }
        Assert.Fail($"no page of the process is in frame {start + pageToPin}");
        return default;
    }

    private static void AssertContents(VmProcess p, ulong va, byte[] data, string when)
    {
        byte[] now = ReadPages(p, va, data.Length / (int)Page);
        int at = now.AsSpan().CommonPrefixLength(data);
        Assert.That(at, Is.EqualTo(data.Length), $"every byte of the process is as written {when} (first difference at byte {at})");
    }

    private static void AssertFramesFree(Machine machine, long start, long end, string because)
    {
        machine.Allocator.DrainAllPages();
        for (long pfn = start; pfn < end; pfn++)
            Assert.That(machine.MemMap.RefCount(pfn), Is.Zero, $"frame {pfn}: {because}");
    }

    [Test]
    public void Alloc_contig_range_moves_every_page_out_of_a_full_range_and_takes_it_keeping_every_byte()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        const int pages = 3000;
        (VmProcess p, ulong va, byte[] data) = FillNode0(machine, pages);
        long start = RangeFullOfPages(machine, p, va, pages, 1024);
        long end = start + 1024;
        long migratedBefore = machine.Migration.SucceededFor(MigrateReason.ContigRange);

        Errno error = machine.Contig.AllocContigRange(start, end, CancellationToken.None, out long moved);

        Assert.That(error, Is.EqualTo(Errno.None));
        Assert.That(moved, Is.EqualTo(1024), "every frame of the range held one of the process's pages");
        Assert.That(machine.Migration.SucceededFor(MigrateReason.ContigRange) - migratedBefore, Is.EqualTo(1024), "counted as MR_CONTIG_RANGE");
        for (long pfn = start; pfn < end; pfn++)
        {
            Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(1), $"frame {pfn} is allocated, one reference");
            Assert.That(machine.GetFrameSpan(pfn).IndexOfAnyExcept((byte)0), Is.EqualTo(-1), $"frame {pfn} is zeroed: no byte of the process is left in it");
        }
        for (int i = 0; i < pages; i++)
        {
            long pfn = p.GetPagemap(va + (ulong)i * Page).Pfn;
            Assert.That(pfn, Is.Not.InRange(start, end - 1), $"page {i} moved out of the range");
        }
        AssertContents(p, va, data, "after alloc_contig_range");
        Assert.That(machine.Allocator.GetPageblockMigratetype(start), Is.Not.EqualTo(MigrateType.Isolate), "the isolation is undone");

        machine.Contig.FreeContigRange(start, end - start);
        AssertFramesFree(machine, start, end, "free_contig_range gave it back");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_range_that_is_not_pageblock_aligned_is_taken_exactly_and_its_neighbours_stay_free()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        long start = machine.Topology.FramesPerNode + 700, end = start + 300; // on free node 1
        Assert.That(machine.Contig.AllocContigRange(start, end, CancellationToken.None, out _), Is.EqualTo(Errno.None));
        Assert.That(machine.MemMap.RefCount(start - 1), Is.Zero, "the frame before the range stays free");
        Assert.That(machine.MemMap.RefCount(end), Is.Zero, "the frame after the range stays free");
        long freeBefore = machine.GetStats().AllFreePages;
        machine.Contig.FreeContigRange(start, end - start);
        Assert.That(machine.GetStats().AllFreePages - freeBefore, Is.EqualTo(300), "the counters saw 300 frames come back");
        Assert.That(machine.GetStats().Nodes[1].Zones[0].AllFreePages, Is.EqualTo(machine.Topology.FramesPerNode), "every frame of node 1 is free again");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_pinned_page_makes_alloc_contig_range_fail_with_EBUSY_leaking_nothing_and_the_range_is_allocatable_after_the_unpin()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        (VmProcess p, ulong va, byte[] data, long start, ulong pinnedVa) = PageblockFullOfPages(machine, pageToPin: 100);
        long end = start + PageAllocator.PageblockFrames;
        long freeBefore;
        using (PinnedMemory pin = p.Pin(pinnedVa, Page, write: false))
        {
            freeBefore = machine.GetStats().AllFreePages;
            Errno error = machine.Contig.AllocContigRange(start, end, CancellationToken.None, out long moved);

            Assert.That(error, Is.EqualTo(Errno.EBUSY), "the pinned page never moves");
            Assert.That(moved, Is.EqualTo(511), "the others moved, and stay moved");
            Assert.That(p.GetPagemap(pinnedVa).Pfn, Is.EqualTo(start + 100), "the pinned page is where it was");
            Assert.That(machine.Allocator.GetPageblockMigratetype(start), Is.Not.EqualTo(MigrateType.Isolate), "the isolation is undone");
            Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore), "nothing was taken: 511 frames freed in the range, 511 allocated outside");
            AssertContents(p, va, data, "after the failed alloc_contig_range");
            TestMachines.AssertAuditClean(machine);
        }
        Assert.That(machine.Contig.AllocContigRange(start, end, CancellationToken.None, out long movedAfter), Is.EqualTo(Errno.None), "without the pin the range clears");
        Assert.That(movedAfter, Is.EqualTo(1), "only the once-pinned page was left in it");
        machine.Contig.FreeContigRange(start, end - start);
        AssertContents(p, va, data, "after the second alloc_contig_range");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Cancelling_alloc_contig_range_returns_EINTR_and_undoes_everything_but_the_moves()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        (VmProcess p, ulong va, byte[] data, long start, ulong pinnedVa) = PageblockFullOfPages(machine, pageToPin: 7);
        long end = start + PageAllocator.PageblockFrames;
        using var cancel = new CancellationTokenSource();
        int passes = 0;
        machine.Contig.AfterPass = pass =>
        {
            passes = pass;
            cancel.Cancel(); // after the first pass: a pin keeps the range from clearing, so a second would follow
        };
        Errno error;
        long moved;
        using (PinnedMemory pin = p.Pin(pinnedVa, Page, write: false))
            error = machine.Contig.AllocContigRange(start, end, cancel.Token, out moved);
        machine.Contig.AfterPass = null;

        Assert.That(error, Is.EqualTo(Errno.EINTR));
        Assert.That(passes, Is.EqualTo(1), "it stopped after the pass that saw the cancellation");
        Assert.That(moved, Is.EqualTo(511), "what moved stays moved");
        for (long pb = start; pb < end; pb += PageAllocator.PageblockFrames)
            Assert.That(machine.Allocator.GetPageblockMigratetype(pb), Is.Not.EqualTo(MigrateType.Isolate), "the isolation is undone");
        Assert.That(machine.MemMap.RefCount(start), Is.Zero, "a moved page's frame is free again, not taken");
        AssertContents(p, va, data, "after the cancelled alloc_contig_range");
        TestMachines.AssertAuditClean(machine);

        Assert.That(machine.Contig.AllocContigRange(start, end, new CancellationToken(canceled: true), out long none), Is.EqualTo(Errno.EINTR), "a token cancelled before the call");
        Assert.That(none, Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_page_table_in_the_range_makes_alloc_contig_range_fail_at_isolation_with_EBUSY()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        FillNode0(machine, 64);
        long table = -1;
        for (long pfn = 0; pfn < machine.Topology.FramesPerNode && table < 0; pfn++)
        {
            if (machine.MemMap.IsInitialised(pfn) && machine.MemMap.TestFlag(pfn, PageFlags.Table))
                table = pfn;
        }
        Assert.That(table, Is.GreaterThanOrEqualTo(0), "the process has page tables on node 0");
        long start = table & ~(long)(PageAllocator.PageblockFrames - 1);
        Assert.That(machine.Contig.AllocContigRange(start, start + PageAllocator.PageblockFrames, CancellationToken.None, out long moved), Is.EqualTo(Errno.EBUSY));
        Assert.That(moved, Is.Zero, "nothing is moved for a range that can never be cleared");
        Assert.That(machine.Allocator.GetPageblockMigratetype(start), Is.Not.EqualTo(MigrateType.Isolate));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Alloc_contig_pages_in_a_full_zone_clears_a_range_and_leaves_every_byte_of_the_process_right()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        // Node 0 full: every frame but a few is a page of the process or one of its page tables.
        int pages = (int)machine.GetStats().Nodes[0].Zones[0].FreePages - 40;
        (VmProcess p, ulong va, byte[] data) = FillNode0(machine, pages);
        Assert.That(machine.GetStats().Nodes[0].Zones[0].FreePages, Is.LessThan(64), "node 0's zone is full");

        Errno error = machine.Contig.AllocContigPages(2048, node: 0, CancellationToken.None, out long pfn, out long moved);

        Assert.That(error, Is.EqualTo(Errno.None));
        Assert.That(machine.Topology.NodeOf(pfn), Is.EqualTo(0), "on the node asked for");
        Assert.That(pfn % 2048, Is.Zero, "a power-of-two count is naturally aligned, as Linux promises");
        Assert.That(moved, Is.GreaterThan(1900), "the range was full of the process's pages: they went to node 1");
        for (long f = pfn; f < pfn + 2048; f++)
            Assert.That(machine.MemMap.RefCount(f), Is.EqualTo(1));
        AssertContents(p, va, data, "after alloc_contig_pages");
        machine.Contig.FreeContigRange(pfn, 2048);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Alloc_contig_pages_fails_with_ENOMEM_when_no_range_can_be_cleared()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        Assert.That(machine.Contig.AllocContigPages(machine.Topology.FramesPerNode * 2, node: 0, CancellationToken.None, out long pfn, out _),
            Is.EqualTo(Errno.ENOMEM), "no node holds twice its size");
        Assert.That(pfn, Is.EqualTo(PageAllocator.NoPfn));
        TestMachines.AssertAuditClean(machine);
    }
}
