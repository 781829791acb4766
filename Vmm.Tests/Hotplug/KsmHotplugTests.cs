using System.Globalization;
using Vmm.Tests.Ksm;

namespace Vmm.Tests.Hotplug;

/// <summary>
/// KSM and memory offline (ksm_memory_callback, seed 000): KSM pages in the block move out keeping their
/// sharing; ksmd, ScanPages and writes of run wait while a block goes offline; MEM_OFFLINE prunes the
/// stable nodes (regular and chain dups) whose page frame lay in the block, and the Audit catches one
/// left there.
/// </summary>
[TestFixture]
[Category("Hotplug")]
[Category("Ksm")]
[Category("Smoke")]
public sealed class KsmHotplugTests
{
    private const ulong Page = 4096;

    private static Machine NewMachine() => TestMachines.Create(TestMachines.TwoLargeNodes with { BackgroundThreads = false });

    private static MemoryBlock BlockOf(Machine machine, long pfn) => machine.Hotplug.GetBlock(machine.Topology.BlockOf(pfn));

    private static long[] PfnsOf(VmProcess p, ulong va, int pages) =>
        [.. Enumerable.Range(0, pages).Select(i => p.GetPagemap(va + (ulong)i * Page).Pfn)];

    [TestCase(0)]
    [TestCase(1)]
    public void KSM_pages_in_an_offlined_block_move_out_and_keep_their_sharing(int mergeAcrossNodes)
    {
        using Machine machine = NewMachine();
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("merge_across_nodes", mergeAcrossNodes.ToString(CultureInfo.InvariantCulture)), Is.EqualTo(Errno.None));
        VmProcess p = machine.CreateProcess(homeNode: 0);
        const int pages = 64;
        ulong va = KsmTestKit.MapPattern(p, pages, i => (byte)(1 + i % 2)); // two contents: two KSM pages
        ksm.RunFullScans(3);
        KsmStats before = ksm.GetStats();
        Assert.That((before.PagesShared, before.PagesSharing), Is.EqualTo((2L, 62L)), "merged before the offline");
        long[] kpfns = [.. PfnsOf(p, va, pages).Distinct()];
        Assert.That(kpfns, Has.Length.EqualTo(2));
        MemoryBlock block = BlockOf(machine, kpfns[0]);
        Assert.That(BlockOf(machine, kpfns[1]), Is.SameAs(block), "both KSM pages in one block");
        Assert.That(block.Zone, Is.EqualTo(ZoneType.Movable));

        OfflineResult result = block.Offline();

        Assert.That(result.Error, Is.EqualTo(Errno.None), string.Join("; ", result.Blockers));
        KsmStats after = ksm.GetStats();
        Assert.That((after.PagesShared, after.PagesSharing), Is.EqualTo((before.PagesShared, before.PagesSharing)), "pages_shared and pages_sharing unchanged");
        long[] moved = PfnsOf(p, va, pages);
        for (int i = 0; i < pages; i++)
        {
            PagemapEntry entry = p.GetPagemap(va + (ulong)i * Page);
            Assert.That(entry.Ksm, Is.True, $"page {i} is still a KSM page");
            Assert.That(entry.Pfn, Is.EqualTo(moved[i % 2]), $"page {i} shares the frame of its content");
            Assert.That(entry.Pfn, Is.Not.InRange(block.StartPfn, block.StartPfn + block.Frames - 1), "outside the offline block");
            Assert.That(p.Read<byte>(va + (ulong)i * Page + 100), Is.EqualTo((byte)(1 + i % 2)));
        }
        Assert.That(moved[0], Is.Not.EqualTo(moved[1]));
        TestMachines.AssertAuditClean(machine);

        // The scanner finds its index consistent: nothing to undo, nothing merged again.
        ksm.RunFullScans(2);
        KsmStats later = ksm.GetStats();
        Assert.That((later.PagesShared, later.PagesSharing), Is.EqualTo((before.PagesShared, before.PagesSharing)));
        Assert.That(PfnsOf(p, va, pages), Is.EqualTo(moved));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void ScanPages_and_a_write_of_run_wait_while_a_block_goes_offline()
    {
        using Machine machine = NewMachine();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = KsmTestKit.MapPattern(p, 32, i => (byte)(i % 4));
        MemoryBlock block = BlockOf(machine, p.GetPagemap(va).Pfn);
        int offlineHeard = 0; // set before KSM hears MEM_OFFLINE (priority above KSM's)
        bool offliningSeen = false, waitedWhileGoingOffline = false;
        int scanReturnedAfterOffline = -1, runReturnedAfterOffline = -1;
        var threads = new List<Thread>();
        using IDisposable first = machine.Hotplug.RegisterNotifier((e, _) =>
        {
            if (e == MemoryNotifierEvent.Offline)
                Volatile.Write(ref offlineHeard, 1);
            return Errno.None;
        }, Vmm.Ksm.MemoryCallbackPriority + 1);
        using IDisposable below = machine.Hotplug.RegisterNotifier((e, _) =>
        {
            if (e != MemoryNotifierEvent.GoingOffline)
                return Errno.None;
            offliningSeen = ksm.IsOfflining; // KSM heard MEM_GOING_OFFLINE first
            threads.Add(new Thread(() => { ksm.ScanPages(16); scanReturnedAfterOffline = Volatile.Read(ref offlineHeard); }));
            threads.Add(new Thread(() => { ksm.SetRun(1); runReturnedAfterOffline = Volatile.Read(ref offlineHeard); }));
            threads.ForEach(t => t.Start());
            // Both wait for as long as the offline lasts; here, 200 ms.
            waitedWhileGoingOffline = !threads[0].Join(100) & !threads[1].Join(100);
            return Errno.None;
        }, 0);

        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));

        Assert.That(threads.All(t => t.Join(TimeSpan.FromSeconds(10))), Is.True, "MEM_OFFLINE lets them go");
        Assert.That(offliningSeen, Is.True, "KSM_RUN_OFFLINE set at MEM_GOING_OFFLINE");
        Assert.That(waitedWhileGoingOffline, Is.True, "neither returned while the block was going offline");
        Assert.That((scanReturnedAfterOffline, runReturnedAfterOffline), Is.EqualTo((1, 1)), "both returned after MEM_OFFLINE");
        Assert.That(ksm.IsOfflining, Is.False);
        Assert.That(ksm.Read("run"), Is.EqualTo("1"));
        TestMachines.AssertAuditClean(machine);
    }

    /// <summary>
    /// Six identical pages merged (one KSM page, or with max_page_sharing 2 a chain of three dups), then
    /// unmapped without a scan since: their stable nodes are stale, naming freed frames of one block.
    /// </summary>
    private static (MemoryBlock Block, long StaleNodes) MakeStaleStableNodes(Machine machine, int maxPageSharing)
    {
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("max_page_sharing", maxPageSharing.ToString(CultureInfo.InvariantCulture)), Is.EqualTo(Errno.None));
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = KsmTestKit.MapPattern(p, 6, _ => 0x5A);
        ksm.RunFullScans(4);
        long[] kpfns = [.. PfnsOf(p, va, 6).Distinct()];
        KsmStats merged = ksm.GetStats();
        Assert.That(merged.PagesShared, Is.EqualTo(kpfns.Length));
        Assert.That(merged.StableNodeDups, Is.EqualTo(maxPageSharing == 2 ? 3 : 0));
        MemoryBlock block = BlockOf(machine, kpfns[0]);
        Assert.That(kpfns.All(k => BlockOf(machine, k) == block), Is.True);
        Assert.That(p.Munmap(va, 6 * Page), Is.EqualTo(Errno.None));
        machine.Tlb.Flush();
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(kpfns.Length), "no scan since: the nodes are stale, not removed");
        return (block, kpfns.Length);
    }

    [TestCase(256, TestName = "Offline_prunes_a_stale_stable_node_whose_frame_was_in_the_block")]
    [TestCase(2, TestName = "Offline_prunes_stale_chain_dups_whose_frames_were_in_the_block")]
    public void Offline_prunes_stale_stable_nodes_in_the_block(int maxPageSharing)
    {
        using Machine machine = NewMachine();
        Vmm.Ksm ksm = machine.Ksm!;
        (MemoryBlock block, long stale) = MakeStaleStableNodes(machine, maxPageSharing);
        Assert.That(stale, Is.GreaterThan(0));

        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));

        KsmStats after = ksm.GetStats();
        Assert.That(after.PagesShared, Is.Zero, "every stable node that named a frame of the block is gone");
        Assert.That((after.StableNodeChains, after.StableNodeDups), Is.EqualTo((0L, 0L)));
        TestMachines.AssertAuditClean(machine);
        Assert.That(block.Online(), Is.EqualTo(Errno.None));
        ksm.RunFullScans(2);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void The_audit_catches_a_stable_node_left_naming_a_frame_of_an_offline_block()
    {
        using Machine machine = NewMachine();
        (MemoryBlock block, _) = MakeStaleStableNodes(machine, 256);
        machine.Ksm!.MemoryNotifierRegistration.Dispose(); // KSM no longer hears MEM_OFFLINE: no pruning

        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));

        Assert.That(machine.Ksm.GetStats().PagesShared, Is.EqualTo(1), "the stale node is still there");
        Assert.That(machine.Audit(), Has.Some.Contains("which is in an offline memory block"));
    }
    [Test]
    public void Offline_prunes_a_stale_node_waiting_on_migrate_nodes_whose_frame_was_in_the_block()
    {
        using Machine machine = NewMachine();
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("merge_across_nodes", "0"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("smart_scan", "0"), Is.EqualTo(Errno.None)); // every page is looked at on every scan
        // q comes first in KSM's list: its page is looked at before p's pages in every scan.
        VmProcess q = machine.CreateProcess(homeNode: 0);
        ulong qva = KsmTestKit.MapPattern(q, 1, _ => 0x11);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = KsmTestKit.MapPattern(p, 6, _ => 0x3C);
        ksm.RunFullScans(3);
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(1));
        // q's page takes the same content; one scan records its checksum (a changed page is not merged).
        q.Fill(qva, Page, 0x3C);
        ksm.RunFullScans(1);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(5), "q's page is not merged yet");
        // The KSM page moves to node 1: its node, in node 0's index, is misplaced. The next scan looks q's
        // page up in node 0's index before it meets the KSM page: the lookup moves the node to migrate_nodes.
        int[] status = new int[1];
        Assert.That(p.MovePages(0, [va], [1], status, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.None));
        Assert.That(status[0], Is.EqualTo(1));
        long kpfn = p.GetPagemap(va).Pfn;
        for (int step = 0; step < 8 && ksm.MigrateNodeCount == 0; step++)
            ksm.ScanPages(1);
        Assert.That(ksm.MigrateNodeCount, Is.EqualTo(1), "the node waits on migrate_nodes");
        Assert.That(p.Munmap(va, 6 * Page), Is.EqualTo(Errno.None));
        machine.Tlb.Flush();
        Assert.That(ksm.MigrateNodeCount, Is.EqualTo(1), "stale now, and no scan met it");

        Assert.That(BlockOf(machine, kpfn).Offline().Error, Is.EqualTo(Errno.None));

        Assert.That(ksm.MigrateNodeCount, Is.Zero, "MEM_OFFLINE pruned it");
        TestMachines.AssertAuditClean(machine);
    }
}
