using Vmm.Memory;
using Vmm.Native;
using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Hotplug;

/// <summary>
/// Offline and online again, repeatedly: nothing leaks (Audit, frame counts, managed pages, descriptor
/// memory), the block's memory leaves the host when it goes offline (RSS), and the zone's deferred
/// sections never reach into an offline block.
/// </summary>
[TestFixture]
[Category("Hotplug")]
public sealed class OfflineCycleTests
{
    private const int Page = 4096;

    /// <summary>Node 0 of <see cref="TestMachines.TwoLargeNodes"/>: blocks 0-1 NORMAL, 2-3 MOVABLE (two 4 MiB memmap sections each).</summary>
    private const int UpperMovableBlockOfNode0 = 3;

    private static int PagesIn(Machine machine, VmProcess p, ulong va, int pages, MemoryBlock block)
    {
        int n = 0;
        for (int i = 0; i < pages; i++)
        {
            long pfn = p.GetPagemap(va + (ulong)i * Page).Pfn;
            if (pfn >= block.StartPfn && pfn < block.StartPfn + block.Frames)
                n++;
        }
        return n;
    }

    [Test]
    public void A_zone_never_hands_out_frames_of_an_offline_block_whose_sections_lay_below_its_deferred_cursor()
    {
        // The movable zone of node 0 grows its deferred sections from the top: one page puts the cursor in
        // the middle of block 3. Offlining block 3 gives its sections back (isolation had initialised the
        // lower one); the zone, growing again, must skip them and take block 2's instead.
        using Machine machine = TestMachines.Create(TestMachines.TwoLargeNodes with { BackgroundThreads = false });
        MemoryBlock upper = machine.Hotplug.GetBlock(UpperMovableBlockOfNode0);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong first = p.Mmap(Page);
        p.Write<long>(first, 1);
        Assert.That(machine.Topology.BlockOf(p.GetPagemap(first).Pfn), Is.EqualTo(UpperMovableBlockOfNode0), "the first movable page comes from the top of node 0");

        Assert.That(upper.Offline().Error, Is.EqualTo(Errno.None));

        const int pages = 3000; // more than block 2 alone (2048 frames): the rest falls back to ZONE_NORMAL
        ulong va = p.Mmap((ulong)pages * Page);
        byte[] data = WriteRandomPages(p, va, pages, seed: 3);
        Assert.That(PagesIn(machine, p, va, pages, upper), Is.Zero, "no page of the new mapping is in the offline block");
        Assert.That(ReadPages(p, va, pages), Is.EqualTo(data));
        TestMachines.AssertAuditClean(machine);
        Assert.That(upper.Online(), Is.EqualTo(Errno.None));
        TestMachines.AssertAuditClean(machine);
    }
    private static long[] ManagedPerZone(Machine machine) =>
        [.. machine.GetStats().Nodes.SelectMany(n => n.Zones).Select(z => z.ManagedPages)];

    [Test]
    public void Repeated_offline_and_online_cycles_leak_nothing()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        MemoryBlock block = machine.Hotplug.GetBlock(1); // node 0's MOVABLE block
        long[] managedAtBoot = ManagedPerZone(machine);
        long freeAtBoot = machine.GetStats().AllFreePages;
        VmProcess p = machine.CreateProcess(homeNode: 0);
        const int pages = 1500;
        long freeAfterCycle = -1, descriptorsAfterCycle = -1;
        for (int cycle = 0; cycle < 6; cycle++)
        {
            ulong va = p.Mmap((ulong)pages * Page);
            byte[] data = WriteRandomPages(p, va, pages, seed: 20 + cycle);
            int inBlock = PagesIn(machine, p, va, pages, block);
            Assert.That(inBlock, Is.GreaterThan(pages / 2), $"cycle {cycle}: the pages start in the block");

            OfflineResult result = block.Offline();
            Assert.That(result.Error, Is.EqualTo(Errno.None), $"cycle {cycle}: {string.Join("; ", result.Blockers)}");
            Assert.That(result.PagesMoved, Is.EqualTo(inBlock));
            Assert.That(ReadPages(p, va, pages), Is.EqualTo(data), $"cycle {cycle}: contents after the offline");
            for (long section = machine.MemMap.SectionOf(block.StartPfn); section < machine.MemMap.SectionOf(block.StartPfn + block.Frames); section++)
                Assert.That(machine.MemMap.IsSectionInitialised(section), Is.False, $"cycle {cycle}: the block's descriptors went back");
            long initialised = Enumerable.Range(0, (int)machine.MemMap.SectionCount).Count(s => machine.MemMap.IsSectionInitialised(s));
            Assert.That(machine.GetStats().DescriptorBytes, Is.EqualTo(initialised * machine.MemMap.FramesPerSection * 64), $"cycle {cycle}: descriptor memory counts the initialised sections");
            TestMachines.AssertAuditClean(machine, $"cycle {cycle}, offline");

            Assert.That(block.Online(ZoneType.Movable), Is.EqualTo(Errno.None));
            Assert.That(ManagedPerZone(machine), Is.EqualTo(managedAtBoot), $"cycle {cycle}: every zone manages what it did at boot");
            Assert.That(p.Munmap(va, (ulong)pages * Page), Is.EqualTo(Errno.None));
            machine.Tlb.Flush();
            TestMachines.AssertAuditClean(machine, $"cycle {cycle}, online");

            MachineStats stats = machine.GetStats();
            if (cycle > 0)
            {
                Assert.That(stats.AllFreePages, Is.EqualTo(freeAfterCycle), $"cycle {cycle}: every frame came back");
                Assert.That(stats.DescriptorBytes, Is.EqualTo(descriptorsAfterCycle), $"cycle {cycle}: descriptor memory does not grow");
            }
            freeAfterCycle = stats.AllFreePages;
            descriptorsAfterCycle = stats.DescriptorBytes;
        }
        Assert.That(machine.Hotplug.OfflineCount, Is.EqualTo(6));
        Assert.That(machine.Hotplug.OnlineCount, Is.EqualTo(6));
        p.Exit();
        machine.Tlb.Flush();
        long zeroPage = machine.ZeroPagePfnIfAllocated >= 0 ? 1 : 0;
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeAtBoot - zeroPage), "every frame is free after the exit");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void An_offlined_block_gives_its_touched_memory_back_to_the_host_and_online_takes_none()
    {
        if (!OperatingSystem.IsLinux())
            Assert.Ignore("RSS is read from /proc");
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        if (!machine.ReturnsMemoryToHost)
            Assert.Ignore("this arena cannot lower the host's RSS");
        MemoryBlock block = machine.Hotplug.GetBlock(1);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        const int pages = 1900;
        ulong va = p.Mmap((ulong)pages * Page);
        WriteRandomPages(p, va, pages, seed: 30);
        long touched = PagesIn(machine, p, va, pages, block) * (long)Page;
        Assert.That(touched, Is.GreaterThan(6L << 20), "most of the block is touched");
        // Freed, the frames stay resident (nothing gives free memory back until asked): the offline must.
        Assert.That(p.Munmap(va, (ulong)pages * Page), Is.EqualTo(Errno.None));
        machine.Tlb.Flush();
        long descriptorsBefore = machine.GetStats().DescriptorBytes;
        GC.Collect();
        long before = HostMemory.ReadRssBytes();

        OfflineResult result = block.Offline();
        Assert.That(result.Error, Is.EqualTo(Errno.None));
        Assert.That(result.PagesMoved, Is.Zero, "nothing was in use");
        GC.Collect();
        long offline = HostMemory.ReadRssBytes();
        long descriptorsOffline = machine.GetStats().DescriptorBytes;

        Assert.That(before - offline, Is.GreaterThanOrEqualTo(touched * 9 / 10),
            $"RSS {before >> 10} -> {offline >> 10} KiB: the block's {touched >> 10} KiB touched left the process");
        Assert.That(descriptorsOffline, Is.EqualTo(descriptorsBefore - (block.Frames * 64)), "the block's descriptors went back too");

        Assert.That(block.Online(), Is.EqualTo(Errno.None));
        GC.Collect();
        long online = HostMemory.ReadRssBytes();
        Assert.That(online - offline, Is.LessThan(touched / 4), $"RSS {offline >> 10} -> {online >> 10} KiB: online commits nothing");
        Assert.That(machine.GetStats().DescriptorBytes, Is.EqualTo(descriptorsOffline), "nor any descriptor");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void With_background_threads_the_give_back_follows_the_offline_and_WaitForMemoryRelease_waits_for_it()
    {
        if (!OperatingSystem.IsLinux())
            Assert.Ignore("RSS is read from /proc");
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes with { EnableKsm = false });
        if (!machine.ReturnsMemoryToHost)
            Assert.Ignore("this arena cannot lower the host's RSS");
        MemoryBlock block = machine.Hotplug.GetBlock(1);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        const int pages = 1900;
        ulong va = p.Mmap((ulong)pages * Page);
        WriteRandomPages(p, va, pages, seed: 31);
        long touched = PagesIn(machine, p, va, pages, block) * (long)Page;
        Assert.That(p.Munmap(va, (ulong)pages * Page), Is.EqualTo(Errno.None));
        machine.Tlb.Flush();
        GC.Collect();
        long before = HostMemory.ReadRssBytes();

        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));
        machine.Hotplug.WaitForMemoryRelease();
        Assert.That(machine.Hotplug.GiveBackPendingCount, Is.Zero);
        GC.Collect();
        long after = HostMemory.ReadRssBytes();
        Assert.That(before - after, Is.GreaterThanOrEqualTo(touched * 9 / 10),
            $"RSS {before >> 10} -> {after >> 10} KiB: the block's {touched >> 10} KiB touched left the process");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void An_online_that_overtakes_the_background_give_back_hands_out_frames_that_read_zero()
    {
        // The frames of an onlined block come back marked zero (PG_zeroed: not zeroed again when allocated),
        // so the online must give the old contents back first if the worker has not yet.
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes with { EnableKsm = false });
        MemoryBlock block = machine.Hotplug.GetBlock(1);
        for (int round = 0; round < 5; round++)
        {
            VmProcess p = machine.CreateProcess(homeNode: 0);
            const int pages = 1900;
            ulong va = p.Mmap((ulong)pages * Page);
            p.Fill(va, (ulong)pages * Page, 0xC3);
            Assert.That(p.Munmap(va, (ulong)pages * Page), Is.EqualTo(Errno.None));
            machine.Tlb.Flush();
            Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));
            Assert.That(block.Online(ZoneType.Movable), Is.EqualTo(Errno.None), "at once: the worker may not have run");
            Assert.That(machine.Hotplug.GiveBackPendingCount, Is.Zero, "the online gave the block back itself");
            ulong fresh = p.Mmap((ulong)pages * Page);
            var page = new byte[Page];
            for (int i = 0; i < pages; i++)
            {
                p.Read(fresh + (ulong)i * Page, page);
                Assert.That(Array.IndexOf(page, (byte)0xC3), Is.EqualTo(-1), $"round {round}, page {i}: an old byte came back");
            }
            p.Exit();
        }
        TestMachines.AssertAuditClean(machine);
    }
}
