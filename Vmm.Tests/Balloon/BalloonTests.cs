using Vmm.Memory;
using Vmm.Native;
using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Balloon;

/// <summary>
/// The memory balloon: inflate takes frames and gives their memory back to the host, deflate returns
/// them zeroed, and its frames are movable (migrated by offline and by a direct migration) with Linux's
/// balloon_inflate / balloon_deflate / balloon_migrate counters.
/// </summary>
[Category("Compaction")]
public class BalloonTests
{
    private const int Page = 4096;

    /// <summary>The movable block of node 0 of <see cref="TestMachines.TwoNodes"/>.</summary>
    private const int MovableBlockOfNode0 = 1;

    private static long VmStat(Machine machine, string name)
    {
        Assert.That(machine.ReadVmStat(name, out long value), Is.EqualTo(Errno.None), name);
        return value;
    }

    private static List<long> BalloonFrames(Machine machine)
    {
        var frames = new List<long>();
        for (long pfn = 0; pfn < machine.Topology.TotalFrames; pfn++)
        {
            PageInfo info = machine.GetPageInfo(pfn);
            if ((info.Flags & (PageFlags.Movable | PageFlags.Offline)) == (PageFlags.Movable | PageFlags.Offline) && info.RefCount > 0)
                frames.Add(pfn);
        }
        return frames;
    }

    [Test]
    public void Inflate_takes_frames_out_of_the_allocator_and_deflate_gives_them_back_zeroed()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        long freeBefore = machine.GetStats().AllFreePages;

        Assert.That(machine.Balloon.Inflate(1000), Is.EqualTo(1000));

        Assert.That(machine.Balloon.Pages, Is.EqualTo(1000));
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore - 1000), "the frames left the allocator");
        Assert.That(VmStat(machine, "balloon_inflate"), Is.EqualTo(1000));
        List<long> frames = BalloonFrames(machine);
        Assert.That(frames, Has.Count.EqualTo(1000), "each ballooned frame is PG_offline and carries the MOVABLE tag");
        Assert.That(machine.GetPageInfo(frames[0]).Flags & PageFlags.Isolated, Is.EqualTo(PageFlags.None));
        TestMachines.AssertAuditClean(machine);

        Assert.That(machine.Balloon.Deflate(400), Is.EqualTo(400));
        Assert.That(machine.Balloon.Pages, Is.EqualTo(600));
        Assert.That(VmStat(machine, "balloon_deflate"), Is.EqualTo(400));
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore - 600));
        TestMachines.AssertAuditClean(machine);

        Assert.That(machine.Balloon.Deflate(long.MaxValue), Is.EqualTo(600), "deflate stops when the balloon is empty");
        Assert.That(machine.Balloon.Pages, Is.Zero);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore));
        foreach (long pfn in frames)
        {
            PageInfo info = machine.GetPageInfo(pfn);
            Assert.That(info.RefCount, Is.Zero, $"frame {pfn} is free");
            Assert.That(info.Flags & (PageFlags.Offline | PageFlags.Movable), Is.EqualTo(PageFlags.None));
        }
        Assert.That(frames.Count(pfn => (machine.GetPageInfo(pfn).Flags & PageFlags.Zeroed) != 0), Is.GreaterThan(900),
            "deflated frames are free and known zero (their memory was given back)");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Deflated_frames_read_zero_in_the_process_that_gets_them()
    {
        using Machine machine = TestMachines.Create(TestMachines.OneNode);
        VmProcess p = machine.CreateProcess();
        const int pages = 1500;
        ulong va = p.Mmap((ulong)pages * Page);
        p.Fill(va, (ulong)pages * Page, 0xA5);
        Assert.That(p.Munmap(va, (ulong)pages * Page), Is.EqualTo(Errno.None));
        machine.Tlb.Flush();
        long inflated = machine.Balloon.Inflate(long.MaxValue);
        machine.Balloon.Deflate(inflated);

        va = p.Mmap((ulong)pages * Page);
        var buffer = new byte[Page];
        for (int i = 0; i < pages; i++)
        {
            p.Write<byte>(va + (ulong)i * Page + 7, 1); // a write fault allocates the frame
            p.Read(va + (ulong)i * Page, buffer);
            buffer[7] = 0;
            Assert.That(buffer.AsSpan().IndexOfAnyExcept((byte)0), Is.EqualTo(-1), $"page {i} reads zero");
        }
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_refused_decommit_zeroes_the_ballooned_frame_instead()
    {
        using Machine machine = TestMachines.Create(TestMachines.OneNode with
        {
            FaultInjection = new FaultInjection { Sites = FaultSites.HostDecommit, Interval = 3 },
        });
        VmProcess p = machine.CreateProcess();
        const int pages = 1024;
        ulong va = p.Mmap((ulong)pages * Page);
        p.Fill(va, (ulong)pages * Page, 0xC3);
        Assert.That(p.Munmap(va, (ulong)pages * Page), Is.EqualTo(Errno.None));
        machine.Tlb.Flush();

        long taken = machine.Balloon.Inflate(2000);

        Assert.That(taken, Is.EqualTo(2000), "a refused decommit does not stop the inflate");
        Assert.That(machine.GetFaultInjectionStats().HostDecommitFailures, Is.GreaterThan(0), "some decommits were refused");
        TestMachines.AssertAuditClean(machine);
        machine.Balloon.Deflate(taken);
        va = p.Mmap((ulong)pages * Page);
        for (int i = 0; i < pages; i++)
        {
            p.Write<byte>(va + (ulong)i * Page, 1);
            Assert.That(p.Read<long>(va + (ulong)i * Page + 8), Is.Zero, $"page {i}: a frame the balloon held reads zero, given back or zeroed");
        }
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Inflate_stops_quietly_when_memory_runs_out()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        long free = machine.GetStats().AllFreePages;

        long taken = machine.Balloon.Inflate(long.MaxValue);

        Assert.That(taken, Is.GreaterThan(free * 9 / 10), "it takes what is free");
        Assert.That(taken, Is.LessThanOrEqualTo(free));
        Assert.That(machine.Balloon.Pages, Is.EqualTo(taken));
        Assert.That(machine.Balloon.Inflate(10), Is.LessThanOrEqualTo(machine.GetStats().AllFreePages + 10), "another inflate takes only what is left, without throwing");
        TestMachines.AssertAuditClean(machine);
        machine.Balloon.Deflate(long.MaxValue);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(free));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Inflating_gives_touched_memory_back_to_the_host()
    {
        if (!OperatingSystem.IsLinux())
            Assert.Ignore("RSS is read from /proc");
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false, EnableKsm = false });
        if (!machine.ReturnsMemoryToHost)
            Assert.Ignore("this arena cannot lower the host's RSS");
        VmProcess p = machine.CreateProcess(homeNode: 0);
        const int pages = 3000;
        ulong va = p.Mmap((ulong)pages * Page);
        WriteRandomPages(p, va, pages, seed: 40);
        long touched = (long)pages * Page;
        // Freed, the frames stay resident: the balloon must give them back.
        Assert.That(p.Munmap(va, (ulong)pages * Page), Is.EqualTo(Errno.None));
        machine.Tlb.Flush();
        GC.Collect();
        long before = HostMemory.ReadRssBytes();

        long taken = machine.Balloon.Inflate(long.MaxValue);
        GC.Collect();
        long after = HostMemory.ReadRssBytes();

        Assert.That(taken, Is.GreaterThan(pages));
        Assert.That(before - after, Is.GreaterThanOrEqualTo(touched * 9 / 10),
            $"RSS {before >> 10} -> {after >> 10} KiB: the {touched >> 10} KiB touched went back to the host");
        TestMachines.AssertAuditClean(machine);

        machine.Balloon.Deflate(long.MaxValue);
        GC.Collect();
        Assert.That(HostMemory.ReadRssBytes() - after, Is.LessThan(touched / 4), "deflate commits nothing: the frames read zero until written");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Offline_of_a_movable_block_full_of_balloon_pages_migrates_them()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        MemoryBlock block = machine.Hotplug.GetBlock(MovableBlockOfNode0);
        long taken = machine.Balloon.Inflate(block.Frames);
        List<long> inBlock = [.. BalloonFrames(machine).Where(pfn => machine.Topology.BlockOf(pfn) == block.Index)];
        Assert.That(block.Zone, Is.EqualTo(ZoneType.Movable));
        Assert.That(inBlock, Has.Count.GreaterThan(block.Frames * 9 / 10), "the balloon filled node 0's ZONE_MOVABLE block");

        OfflineResult result = block.Offline();

        Assert.That(result.Error, Is.EqualTo(Errno.None), string.Join("; ", result.Blockers));
        Assert.That(result.PagesMoved, Is.EqualTo(inBlock.Count));
        Assert.That(machine.Balloon.Migrated, Is.EqualTo(inBlock.Count));
        Assert.That(VmStat(machine, "balloon_migrate"), Is.EqualTo(inBlock.Count));
        Assert.That(machine.Balloon.Pages, Is.EqualTo(taken), "the balloon keeps its size");
        Assert.That(BalloonFrames(machine).Count(pfn => machine.Topology.BlockOf(pfn) == block.Index), Is.Zero);
        TestMachines.AssertAuditClean(machine);

        Assert.That(machine.Balloon.Deflate(long.MaxValue), Is.EqualTo(taken), "the moved frames deflate like any");
        Assert.That(block.Online(), Is.EqualTo(Errno.None));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_direct_migration_moves_a_balloon_page_and_its_putback_relists_it()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        machine.Balloon.Inflate(2);
        List<long> frames = BalloonFrames(machine);
        foreach (long pfn in frames)
        {
            Assert.That(machine.MemMap.TryGetPageUnlessZero(pfn), Is.True);
            Assert.That(machine.Migration.IsolatePage(pfn, IsolateMode.None), Is.True, "the balloon lets a listed frame go");
            machine.PutPage(pfn);
        }
        List<long> list = [frames[0]];
        Assert.That(machine.Balloon.Deflate(5), Is.Zero, "isolated frames are off the list: deflate does not take them");

        int rc = machine.Migration.MigratePages(list, _ => machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero, 1),
            null, MigrateMode.Sync, MigrateReason.Compaction, out int succeeded);
        Assert.That(rc, Is.Zero);
        Assert.That(succeeded, Is.EqualTo(1));
        Assert.That(machine.Balloon.Migrated, Is.EqualTo(1));
        Assert.That(machine.GetPageInfo(frames[0]).RefCount, Is.Zero, "the old frame was freed");
        machine.Migration.PutbackMovablePages([frames[1]]);

        List<long> now = BalloonFrames(machine);
        Assert.That(now, Has.Count.EqualTo(2));
        Assert.That(now, Does.Contain(frames[1]), "the frame put back is the balloon's again");
        Assert.That(machine.Topology.NodeOf(now.Single(pfn => pfn != frames[1])), Is.EqualTo(1), "the moved one lives on node 1");
        TestMachines.AssertAuditClean(machine);
        Assert.That(machine.Balloon.Deflate(5), Is.EqualTo(2));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Memory_failure_of_a_balloon_frame_is_refused_and_changes_nothing()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        machine.Balloon.Inflate(4);
        List<long> frames = BalloonFrames(machine);

        Errno hard = machine.HardOfflinePage(frames[0]);
        Errno soft = machine.SoftOfflinePage(frames[1]);

        Assert.That(hard, Is.Not.EqualTo(Errno.None), "memory failure handles LRU pages only: a balloon frame is refused");
        Assert.That(soft, Is.Not.EqualTo(Errno.None));
        Assert.That(BalloonFrames(machine), Is.EqualTo(frames), "the balloon keeps its frames");
        Assert.That(machine.GetStats().PoisonedPages, Is.Zero);
        TestMachines.AssertAuditClean(machine);
        Assert.That(machine.Balloon.Deflate(4), Is.EqualTo(4));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Inflate_and_deflate_reject_negative_counts()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.Balloon.Inflate(-1));
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.Balloon.Deflate(-1));
        Assert.That(machine.Balloon.Inflate(0), Is.Zero);
    }
}
