using Vmm.Mm;
using static Vmm.Tests.Ksm.KsmTestKit;
using static Vmm.Tests.TestMachines;

namespace Vmm.Tests.Ksm;

[TestFixture]
[Category("Smoke")]
[Category("Ksm")]
public sealed class KsmMergeTests
{
    [Test]
    public void Identical_pages_merge_into_one_KSM_page_after_two_full_scans()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 100, _ => 0x5A);

        ksm.RunFullScans(1);
        Assert.That(ksm.GetStats().PagesShared, Is.Zero, "the first visit only records the checksum");
        ksm.RunFullScans(1);
        KsmStats stats = ksm.GetStats();
        Assert.That(stats.PagesShared, Is.EqualTo(1));
        Assert.That(stats.PagesSharing, Is.EqualTo(99));
        Assert.That(p.GetKsmStats().MergingPages, Is.EqualTo(100), "sum of ksm_merging_pages = shared + sharing");
        long pfn = p.GetPagemap(va).Pfn;
        for (int i = 0; i < 100; i++)
        {
            PagemapEntry e = p.GetPagemap(va + (ulong)i * 4096);
            Assert.That(e.Pfn, Is.EqualTo(pfn));
            Assert.That(e.Ksm, Is.True);
            Assert.That(e.Writable, Is.False, "a KSM page is mapped read-only everywhere");
        }
        Assert.That(p.Read<byte>(va + 4096 * 50 + 7), Is.EqualTo(0x5A));
        AssertAuditClean(machine);
    }

    [Test]
    public void A_write_to_a_merged_page_copies_it_and_the_others_keep_sharing()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 10, _ => 7);
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(9));
        p.Write<byte>(va + 3 * 4096, 9);
        Assert.That(p.Read<byte>(va + 3 * 4096), Is.EqualTo(9));
        Assert.That(p.Read<byte>(va + 3 * 4096 + 1), Is.EqualTo(7));
        Assert.That(p.Read<byte>(va + 4 * 4096), Is.EqualTo(7), "the other mappings still see the shared content");
        Assert.That(ksm.GetStats().CowKsm, Is.EqualTo(1));
        Assert.That(machine.GetVmStats().CowKsm, Is.EqualTo(1), "vmstat cow_ksm");
        Assert.That(p.GetPagemap(va + 3 * 4096).Ksm, Is.False);
        ksm.RunFullScans(1);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(8), "the counters drop when ksmd revisits the copied address");
        AssertAuditClean(machine);
    }

    [Test]
    public void Unique_pages_never_merge()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        MapPattern(p, 50, i => (byte)(i + 1));
        ksm.RunFullScans(3);
        KsmStats stats = ksm.GetStats();
        Assert.That(stats.PagesShared, Is.Zero);
        Assert.That(stats.PagesUnshared, Is.EqualTo(50));
        Assert.That(stats.RmapItems, Is.EqualTo(50));
        AssertAuditClean(machine);
    }

    [Test]
    public void Unmergeable_unmerges_by_copying()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 20, i => (byte)(i % 2));
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(2));
        Assert.That(p.Madvise(va, 20 * 4096, Advice.Unmergeable), Is.EqualTo(Errno.None));
        for (int i = 0; i < 20; i++)
        {
            Assert.That(p.GetPagemap(va + (ulong)i * 4096).Ksm, Is.False);
            Assert.That(p.Read<byte>(va + (ulong)i * 4096 + 100), Is.EqualTo((byte)(i % 2)));
        }
        ksm.RunFullScans(1);
        Assert.That(ksm.GetStats().PagesShared, Is.Zero);
        Assert.That(ksm.GetStats().RmapItems, Is.Zero, "the slot goes once no VMA is mergeable");
        AssertAuditClean(machine);
    }

    [Test]
    public void Run_2_unmerges_everything_and_resets_full_scans()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 30, _ => 3);
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(29));
        Assert.That(ksm.Write("run", "2"), Is.EqualTo(Errno.None));
        KsmStats stats = ksm.GetStats();
        Assert.That(stats.PagesShared + stats.PagesSharing, Is.Zero);
        Assert.That(stats.RmapItems, Is.Zero);
        Assert.That(stats.FullScans, Is.Zero);
        Assert.That(p.GetPagemap(va).Ksm, Is.False);
        Assert.That(p.Read<byte>(va + 29 * 4096), Is.EqualTo(3));
        AssertAuditClean(machine);
    }

    [Test]
    public void Madvise_mergeable_is_einval_without_ksm()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096, options: TestMachines.TwoLargeNodes with { EnableKsm = false });
        (Machine machine, VmProcess p, ulong va, _) = region;
        Assert.That(p.Madvise(va, 4096, Advice.Mergeable), Is.EqualTo(Errno.EINVAL));
        Assert.That(p.Madvise(va, 4096, Advice.Unmergeable), Is.EqualTo(Errno.EINVAL));
        Assert.That(p.SetMemoryMerge(true), Is.EqualTo(Errno.EINVAL));
    }
}
