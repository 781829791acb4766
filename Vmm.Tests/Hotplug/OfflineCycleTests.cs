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
}
