using System.Collections.Concurrent;
using Vmm.Memory;
using Vmm.Migration;
using Vmm.Mm;
using static Vmm.Tests.Ksm.KsmTestKit;
using static Vmm.Tests.Migration.MigrationTestHelpers;
using static Vmm.Tests.TestMachines;

namespace Vmm.Tests.Ksm;

/// <summary>
/// Migration of KSM pages (Ksm/Ksm.Migrate.cs): the stable node follows its page to the new frame, every
/// mapping follows through the node's items, and with merge_across_nodes = 0 the scanner re-homes a moved
/// page into its new node's index (through migrate_nodes), merging it into an equal KSM page already
/// there. Each scenario runs with merge_across_nodes 1 and 0 where both apply, and ends with Audit.
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Ksm")]
[Category("Migration")]
public sealed class KsmMigrationTests
{
    private static Machine CreateMachine(bool mergeAcrossNodes, int maxPageSharing = 256)
    {
        Machine machine = CreateForKsm();
        Assert.That(machine.Ksm!.Write("merge_across_nodes", mergeAcrossNodes ? "1" : "0"), Is.EqualTo(Errno.None));
        Assert.That(machine.Ksm.Write("max_page_sharing", maxPageSharing.ToString(System.Globalization.CultureInfo.InvariantCulture)), Is.EqualTo(Errno.None));
        return machine;
    }

    /// <summary>Processes on <paramref name="node"/>, each with one mergeable page filled with <paramref name="fill"/>.</summary>
    private static List<(VmProcess Process, ulong Va)> Sharers(Machine machine, int count, int node, byte fill) =>
        [.. Enumerable.Range(0, count).Select(_ =>
        {
            VmProcess p = machine.CreateProcess(homeNode: node);
            return (p, MapPattern(p, 1, _ => fill));
        })];

    /// <summary>
    /// Moves the page <paramref name="sharer"/> maps to node 1 (<c>TryReplacePage</c>), asserts the move
    /// succeeded, and returns the frame <paramref name="sharer"/> maps afterwards. Precondition: a page is
    /// present at the sharer's address.
    /// </summary>
    private static long MoveToNodeOne((VmProcess Process, ulong Va) sharer, string because = "")
    {
        Assert.That(sharer.Process.Mm.TryReplacePage(sharer.Va, 1), Is.EqualTo(Errno.None), because);
        return sharer.Process.GetPagemap(sharer.Va).Pfn;
    }

    private static void AssertReads(IEnumerable<(VmProcess Process, ulong Va)> sharers, byte fill)
    {
        byte[] page = new byte[4096];
        foreach ((VmProcess p, ulong va) in sharers)
        {
            p.Read(va, page);
            Assert.That(page, Is.All.EqualTo(fill), $"{p} reads its page's bytes");
        }
    }

    private static void AssertInvariants(Machine machine)
    {
        KsmStats s = machine.Ksm!.GetStats();
        long merging = machine.Processes.Sum(p => p.GetKsmStats().MergingPages);
        Assert.That(merging, Is.EqualTo(s.PagesShared + s.PagesSharing), "sum of ksm_merging_pages = pages_shared + pages_sharing");
    }

    [Test]
    public void A_merged_page_shared_by_four_processes_moves_to_another_node_and_stays_merged([Values(true, false)] bool mergeAcrossNodes)
    {
        using Machine machine = CreateMachine(mergeAcrossNodes);
        Vmm.Ksm ksm = machine.Ksm!;
        var sharers = Sharers(machine, 4, node: 0, fill: 0x37);
        ksm.RunFullScans(2);
        long oldPfn = sharers[0].Process.GetPagemap(sharers[0].Va).Pfn;
        Assert.That(sharers.Select(s => s.Process.GetPagemap(s.Va).Pfn), Is.All.EqualTo(oldPfn), "merged into one KSM page");
        Assert.That(machine.Topology.NodeOf(oldPfn), Is.Zero);
        KsmStats before = ksm.GetStats();
        Assert.That((before.PagesShared, before.PagesSharing), Is.EqualTo((1L, 3L)));

        Assert.That(sharers[1].Process.Mm.TryReplacePage(sharers[1].Va, 1), Is.EqualTo(Errno.None), "a KSM page moves");

        long newPfn = sharers[0].Process.GetPagemap(sharers[0].Va).Pfn;
        Assert.That(newPfn, Is.Not.EqualTo(oldPfn));
        Assert.That(machine.Topology.NodeOf(newPfn), Is.EqualTo(1));
        foreach ((VmProcess p, ulong va) in sharers)
        {
            PagemapEntry entry = p.GetPagemap(va);
            Assert.That((entry.Pfn, entry.Ksm, entry.Writable), Is.EqualTo((newPfn, true, false)), $"{p}'s mapping follows the page and stays a read-only KSM mapping");
        }
        Assert.That(machine.MemMap.MapCount(newPfn), Is.EqualTo(4), "one frame, four mappings");
        Assert.That(machine.MemMap.RefCount(oldPfn), Is.Zero, "the old frame is free");
        Assert.That(ksm.GetStats(), Is.EqualTo(before with { MetadataBytes = ksm.GetStats().MetadataBytes }), "the counters do not move");
        AssertReads(sharers, 0x37);
        AssertAuditClean(machine);

        // The next scan meets the page: with merge_across_nodes 0 its node is re-homed into node 1's index.
        ksm.RunFullScans(1);
        Assert.That(ksm.MigrateNodeCount, Is.Zero, "nothing waits on migrate_nodes after the scan");
        Assert.That(sharers.Select(s => s.Process.GetPagemap(s.Va).Pfn), Is.All.EqualTo(newPfn), "still one KSM page");
        Assert.That((ksm.GetStats().PagesShared, ksm.GetStats().PagesSharing), Is.EqualTo((1L, 3L)));
        AssertAuditClean(machine);

        // A write copies it (cow_ksm); the others keep the KSM page.
        sharers[2].Process.Write<byte>(sharers[2].Va + 5, 0x99);
        Assert.That(ksm.GetStats().CowKsm, Is.EqualTo(before.CowKsm + 1), "a write to the moved KSM page copies it");
        Assert.That(sharers[2].Process.GetPagemap(sharers[2].Va).Ksm, Is.False);
        Assert.That(sharers[2].Process.Read<byte>(sharers[2].Va + 5), Is.EqualTo(0x99));
        AssertReads([sharers[0], sharers[1], sharers[3]], 0x37);
        ksm.RunFullScans(1);
        Assert.That((ksm.GetStats().PagesShared, ksm.GetStats().PagesSharing), Is.EqualTo((1L, 2L)), "the copy is counted when ksmd next visits it");
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void A_lookup_while_a_KSM_page_migrates_finds_its_stable_node_on_the_new_frame_and_the_merge_waits([Values(true, false)] bool mergeAcrossNodes)
    {
        using Machine machine = CreateMachine(mergeAcrossNodes);
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("smart_scan", "0"), Is.EqualTo(Errno.None)); // the latecomer is visited every pass
        // The latecomer registers first, so that a one-page scan step visits only its page.
        VmProcess late = machine.CreateProcess(homeNode: 1);
        ulong lateVa = MapPattern(late, 1, _ => 0x01);
        var sharers = Sharers(machine, 2, node: 1, fill: 0x7E);
        ksm.RunFullScans(2);
        long oldPfn = sharers[0].Process.GetPagemap(sharers[0].Va).Pfn;
        Assert.That(sharers[1].Process.GetPagemap(sharers[1].Va).Pfn, Is.EqualTo(oldPfn));
        late.Fill(lateVa, 4096, 0x7E);
        ksm.ScanPages(1);    // the latecomer's new checksum
        ksm.RunFullScans(1); // the rest of that pass (the sharers' pages, not moving yet)

        // The migrator's steps, stopped after Ksm.MigratePage and before the PTEs come back.
        machine.MemMap.GetPage(oldPfn);
        Assert.That(machine.PageLock.TryLock(oldPfn), Is.True);
        long newPfn = AllocOnNode(machine, 1);
        machine.PageLock.Lock(newPfn);
        Assert.That(machine.Rmap.TryToMigrate(oldPfn), Is.True);
        Assert.That(machine.MemMap.RefCount(oldPfn), Is.EqualTo(1), "a KSM page holds no reference of KSM's: only the migrator's is left");
        MigrationEngine.CopyPage(machine, oldPfn, newPfn);
        ksm.MigratePage(oldPfn, newPfn);

        // A lookup now: the latecomer's page finds the stable node, whose old frame no longer names it.
        // The keyhole check must follow kpfn to the new frame, not declare the node stale; the merge
        // itself backs off (the new frame is locked by the migration).
        ksm.ScanPages(1);
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(1), "the stable node survived the lookup");
        Assert.That(late.GetPagemap(lateVa).Ksm, Is.False, "the merge waits for the migration");
        // The rest of the pass meets the sharers' mappings as migration entries: their items stay linked
        // (the scan neither drops them nor waits for the page lock the migration holds).
        Task rest = Task.Run(() => ksm.RunFullScans(1));
        bool scanEndedDuringMigration = rest.Wait(TimeSpan.FromSeconds(10));
        KsmStats during = ksm.GetStats();

        FinishMigration(machine, oldPfn, newPfn); // the migrator puts its new frame on the LRU and lets both go
        rest.Wait(); // (a scan that did wait is released by the unlocks above)
        Assert.That(scanEndedDuringMigration, Is.True, "the scan does not wait for the migration");
        Assert.That((during.PagesShared, during.PagesSharing), Is.EqualTo((1L, 1L)), "the mappings in migration stay linked");
        Assert.That(machine.MemMap.RefCount(oldPfn), Is.Zero, "the old frame is free");
        Assert.That(sharers.Select(s => s.Process.GetPagemap(s.Va).Pfn), Is.All.EqualTo(newPfn));
        AssertAuditClean(machine);

        ksm.RunFullScans(2);
        Assert.That(late.GetPagemap(lateVa).Pfn, Is.EqualTo(newPfn), "the latecomer merges into the moved KSM page");
        Assert.That((ksm.GetStats().PagesShared, ksm.GetStats().PagesSharing), Is.EqualTo((1L, 2L)));
        AssertReads([.. sharers, (late, lateVa)], 0x7E);
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    /// <summary>
    /// The race of MemoryFailureStressTests (soft offline of KSM pages under a looping ksmd): the scan
    /// passes a KSM mapping because its PTE is a migration entry, the move ends, and only then does the
    /// scan meet the mapping's rmap item (on its way to the next present page). The item must stay
    /// linked: the address maps the moved KSM page again, and the reverse map must find it there.
    /// The test holds the pte lock of the next page's table, which stops the scan right after it has
    /// passed the moving mappings, ends the move meanwhile, and then lets the scan go on.
    /// </summary>
    [Test]
    public unsafe void A_scan_that_passes_a_KSM_mapping_in_migration_keeps_its_item_when_the_move_ends_before_it_meets_the_item()
    {
        const ulong TableSpan = 2UL << 20; // one page-table page maps 2 MiB
        using Machine machine = CreateMachine(mergeAcrossNodes: true);
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("smart_scan", "0"), Is.EqualTo(Errno.None));
        VmProcess p = machine.CreateProcess();
        ulong region = p.Mmap(3 * TableSpan);
        Assert.That(p.Madvise(region, 3 * TableSpan, Advice.Mergeable), Is.EqualTo(Errno.None));
        // Two equal pages at the end of one page table, a different one at the start of the next.
        ulong next = (region + 2 * TableSpan) & ~(TableSpan - 1);
        ulong first = next - 2 * 4096, second = next - 4096;
        p.Fill(first, 4096, 0x5A);
        p.Fill(second, 4096, 0x5A);
        p.Fill(next, 4096, 0x33);
        ksm.RunFullScans(3);
        long oldPfn = p.GetPagemap(first).Pfn;
        Assert.That(p.GetPagemap(first).Ksm && p.GetPagemap(second).Pfn == oldPfn, Is.True, "setup: the two equal pages share a KSM page");
        Assert.That((ksm.GetStats().PagesShared, ksm.GetStats().PagesSharing), Is.EqualTo((1L, 1L)));

        // The migrator's steps up to Ksm.MigratePage: both mappings are migration entries.
        machine.MemMap.GetPage(oldPfn);
        Assert.That(machine.PageLock.TryLock(oldPfn), Is.True);
        long newPfn = AllocOnNode(machine, 1);
        machine.PageLock.Lock(newPfn);
        Assert.That(machine.Rmap.TryToMigrate(oldPfn), Is.True);
        MigrationEngine.CopyPage(machine, oldPfn, newPfn);
        ksm.MigratePage(oldPfn, newPfn);

        // The next pass starts: it passes both migration entries and stops at the next table's pte lock.
        AddressSpace mm = p.Mm;
        long nextTable;
        mm.MmapLock.EnterReadLock();
        try
        {
            Assert.That(mm.FindPte(next, out nextTable) != null, Is.True);
        }
        finally
        {
            mm.MmapLock.ExitReadLock();
        }
        Task scan;
        mm.LockPte(nextTable);
        try
        {
            scan = Task.Run(() => ksm.ScanPages(1));
            SpinWait.SpinUntil(() => mm.MmapLock.CurrentReadCount > 0, TimeSpan.FromSeconds(10));
            Thread.Sleep(200); // the scan walks two PTEs and spins on the lock: it has passed them by far
            Assert.That(scan.IsCompleted, Is.False, "setup: the scan waits for the next table's pte lock");
            FinishMigration(machine, oldPfn, newPfn); // the move ends while the scan waits
        }
        finally
        {
            mm.UnlockPte(nextTable);
        }
        scan.Wait();

        Assert.That(p.GetPagemap(first).Pfn == newPfn && p.GetPagemap(second).Pfn == newPfn, Is.True, "both mappings followed the page");
        AssertAuditClean(machine); // before the fix: "the reverse map of KSM page .. does not find it" twice
        Assert.That((ksm.GetStats().PagesShared, ksm.GetStats().PagesSharing), Is.EqualTo((1L, 1L)),
            "the items of the mappings the scan passed while they moved stay linked");
        // And a second move finds both mappings through the node's items.
        Assert.That(p.Mm.TryReplacePage(first, 0), Is.EqualTo(Errno.None), "the KSM page moves again");
        Assert.That(p.GetPagemap(second).Pfn, Is.EqualTo(p.GetPagemap(first).Pfn));
        Assert.That(machine.Topology.NodeOf(p.GetPagemap(first).Pfn), Is.Zero);
        AssertReads([(p, first), (p, second)], 0x5A);
        AssertAuditClean(machine);
    }

    [Test]
    public void A_forked_childs_unlinked_mapping_of_a_KSM_page_follows_the_move([Values(true, false)] bool mergeAcrossNodes)
    {
        using Machine machine = CreateMachine(mergeAcrossNodes);
        Vmm.Ksm ksm = machine.Ksm!;
        var sharers = Sharers(machine, 2, node: 0, fill: 0x21);
        ksm.RunFullScans(2);
        VmProcess child = sharers[0].Process.Fork(); // its mapping is found through the parent's item's anon_vma
        ulong va = sharers[0].Va;
        long moved = MoveToNodeOne(sharers[0]);
        Assert.That(child.GetPagemap(va).Pfn, Is.EqualTo(moved), "the child's mapping follows the page");
        Assert.That(machine.Topology.NodeOf(moved), Is.EqualTo(1));
        AssertReads([.. sharers, (child, va)], 0x21);
        AssertAuditClean(machine);
        ksm.RunFullScans(2);
        Assert.That((ksm.GetStats().PagesShared, ksm.GetStats().PagesSharing), Is.EqualTo((1L, 2L)), "the child's mapping is linked on the next visit");
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void A_KSM_page_in_a_max_page_sharing_chain_moves([Values(true, false)] bool mergeAcrossNodes)
    {
        using Machine machine = CreateMachine(mergeAcrossNodes, maxPageSharing: 2);
        Vmm.Ksm ksm = machine.Ksm!;
        var sharers = Sharers(machine, 4, node: 0, fill: 0x4D);
        ksm.RunFullScans(3);
        KsmStats before = ksm.GetStats();
        Assert.That((before.PagesShared, before.PagesSharing, before.StableNodeChains, before.StableNodeDups), Is.EqualTo((2L, 2L, 1L, 2L)),
            "4 pages, max_page_sharing 2: two copies in one chain");
        long oldPfn = sharers[0].Process.GetPagemap(sharers[0].Va).Pfn;
        var sameCopy = sharers.Where(s => s.Process.GetPagemap(s.Va).Pfn == oldPfn).ToList();
        Assert.That(sameCopy, Has.Count.EqualTo(2));

        long newPfn = MoveToNodeOne(sharers[0], "a copy inside a chain moves");
        Assert.That(machine.Topology.NodeOf(newPfn), Is.EqualTo(1));
        Assert.That(sameCopy.Select(s => s.Process.GetPagemap(s.Va).Pfn), Is.All.EqualTo(newPfn), "both mappings of that copy follow it");
        Assert.That(ksm.GetStats().StableNodeDups, Is.EqualTo(2), "until the scanner meets it, the copy stays in its chain");
        AssertReads(sharers, 0x4D);
        AssertAuditClean(machine);

        ksm.RunFullScans(1);
        KsmStats after = ksm.GetStats();
        Assert.That((after.PagesShared, after.PagesSharing), Is.EqualTo((2L, 2L)), "still two KSM pages, each full");
        if (mergeAcrossNodes)
        {
            Assert.That((after.StableNodeChains, after.StableNodeDups), Is.EqualTo((1L, 2L)), "only the kpfn changed");
        }
        else
        {
            // The moved copy left node 0's chain for node 1's index (a plain node there); node 0's chain keeps
            // its one copy until a lookup of the content collapses it.
            Assert.That(ksm.MigrateNodeCount, Is.Zero);
            Assert.That((after.StableNodeChains, after.StableNodeDups), Is.EqualTo((1L, 1L)), "one copy left in node 0's chain");
            // A fifth page of that content on node 1 can join nothing (the re-homed copy is full) and waits.
            VmProcess fifth = machine.CreateProcess(homeNode: 1);
            ulong fifthVa = MapPattern(fifth, 1, _ => 0x4D);
            ksm.RunFullScans(2);
            Assert.That(fifth.GetPagemap(fifthVa).Ksm, Is.False, "the re-homed copy is full: max_page_sharing holds across the move");
        }
        AssertReads(sharers, 0x4D);
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void With_merge_across_nodes_0_a_page_moved_where_an_equal_KSM_page_lives_merges_into_it()
    {
        using Machine machine = CreateMachine(mergeAcrossNodes: false);
        Vmm.Ksm ksm = machine.Ksm!;
        var onZero = Sharers(machine, 2, node: 0, fill: 0x5A);
        var onOne = Sharers(machine, 3, node: 1, fill: 0x5A);
        ksm.RunFullScans(2);
        Assert.That((ksm.GetStats().PagesShared, ksm.GetStats().PagesSharing), Is.EqualTo((2L, 3L)), "one KSM page per node");
        long resident = onOne[0].Process.GetPagemap(onOne[0].Va).Pfn;

        long moved = MoveToNodeOne(onZero[0]);
        Assert.That(machine.Topology.NodeOf(moved), Is.EqualTo(1));
        Assert.That(moved, Is.Not.EqualTo(resident));
        AssertAuditClean(machine);

        // The next scan moves both of its mappings to the KSM page already on node 1.
        ksm.RunFullScans(1);
        Assert.That(onZero.Concat(onOne).Select(s => s.Process.GetPagemap(s.Va).Pfn), Is.All.EqualTo(resident), "every mapping is on node 1's KSM page");
        Assert.That((ksm.GetStats().PagesShared, ksm.GetStats().PagesSharing), Is.EqualTo((1L, 4L)), "pages_shared falls by one");
        Assert.That(machine.MemMap.MapCount(moved), Is.Zero);
        AssertReads(onZero.Concat(onOne), 0x5A);
        AssertInvariants(machine);
        AssertAuditClean(machine);

        // Its node lingers on migrate_nodes until its frame is free; the next full scan prunes it.
        ksm.RunFullScans(1);
        Assert.That(ksm.MigrateNodeCount, Is.Zero, "the stale node was pruned from migrate_nodes");
        Assert.That(machine.MemMap.RefCount(moved), Is.Zero, "the moved frame is free");
        AssertAuditClean(machine);
    }

    [Test]
    public void With_merge_across_nodes_0_a_page_moved_where_none_lives_is_rehomed_into_that_nodes_index()
    {
        using Machine machine = CreateMachine(mergeAcrossNodes: false);
        Vmm.Ksm ksm = machine.Ksm!;
        var sharers = Sharers(machine, 2, node: 0, fill: 0x6B);
        ksm.RunFullScans(2);
        long moved = MoveToNodeOne(sharers[0]);
        ksm.RunFullScans(1);
        Assert.That(ksm.MigrateNodeCount, Is.Zero);
        Assert.That((ksm.GetStats().PagesShared, ksm.GetStats().PagesSharing), Is.EqualTo((1L, 1L)));
        Assert.That(sharers.Select(s => s.Process.GetPagemap(s.Va).Pfn), Is.All.EqualTo(moved), "re-homing changes no mapping");

        // It is in node 1's index now: a page of node 1 joins it, a page of node 0 finds nothing.
        VmProcess onOne = machine.CreateProcess(homeNode: 1), onZero = machine.CreateProcess(homeNode: 0);
        ulong vaOne = MapPattern(onOne, 1, _ => 0x6B), vaZero = MapPattern(onZero, 1, _ => 0x6B);
        ksm.RunFullScans(2);
        Assert.That(onOne.GetPagemap(vaOne).Pfn, Is.EqualTo(moved), "a page of node 1 merges into the re-homed KSM page");
        Assert.That(onZero.GetPagemap(vaZero).Ksm, Is.False, "node 0's index no longer holds it");
        Assert.That((ksm.GetStats().PagesShared, ksm.GetStats().PagesSharing), Is.EqualTo((1L, 2L)));
        AssertReads([.. sharers, (onOne, vaOne), (onZero, vaZero)], 0x6B);
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void Audit_reports_a_stable_node_in_another_nodes_index_unless_a_migration_moved_its_page_there()
    {
        using Machine machine = CreateMachine(mergeAcrossNodes: false);
        Vmm.Ksm ksm = machine.Ksm!;
        var sharers = Sharers(machine, 2, node: 0, fill: 0x2C);
        ksm.RunFullScans(2);
        long moved = MoveToNodeOne(sharers[0]);
        KsmStableNode node = ksm.NodeOfPage(moved)!;
        Assert.That(node.Nid, Is.Zero, "until the scanner meets it, the node stays in node 0's index");
        AssertAuditClean(machine); // licensed: the migration moved it

        node.MovedAcrossNodes = false; // as if the page had got there some other way
        Assert.That(machine.Audit(), Has.Some.Contains("is in the index of node 0 but its page"));
        node.MovedAcrossNodes = true;

        ksm.RunFullScans(1);
        Assert.That(node.Nid, Is.EqualTo(1), "re-homed");
        Assert.That(node.MovedAcrossNodes, Is.False);
        AssertAuditClean(machine);
    }

    [Test]
    public void A_node_waiting_on_migrate_nodes_is_torn_down_by_run_2_and_merge_across_nodes_can_switch()
    {
        using Machine machine = CreateMachine(mergeAcrossNodes: false);
        Vmm.Ksm ksm = machine.Ksm!;
        var onZero = Sharers(machine, 2, node: 0, fill: 0x11);
        var onOne = Sharers(machine, 2, node: 1, fill: 0x11);
        ksm.RunFullScans(2);
        MoveToNodeOne(onZero[0]);
        ksm.RunFullScans(1);
        Assert.That(ksm.MigrateNodeCount, Is.EqualTo(1), "the merged-away page's node waits on migrate_nodes (its frame's last references are on their way)");
        Assert.That(ksm.Write("merge_across_nodes", "1"), Is.EqualTo(Errno.EBUSY), "KSM pages exist");
        Assert.That(ksm.Write("run", "2"), Is.EqualTo(Errno.None));
        Assert.That(ksm.MigrateNodeCount, Is.Zero, "run=2 tears migrate_nodes down with the index");
        Assert.That(ksm.Write("merge_across_nodes", "1"), Is.EqualTo(Errno.None));
        AssertReads(onZero.Concat(onOne), 0x11);
        Assert.That(ksm.Write("run", "1"), Is.EqualTo(Errno.None));
        ksm.RunFullScans(2);
        Assert.That((ksm.GetStats().PagesShared, ksm.GetStats().PagesSharing), Is.EqualTo((1L, 3L)), "merge_across_nodes 1: one KSM page for both nodes");
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    [Category("Stress")]
    public void A_scan_racing_with_moves_of_its_KSM_pages_never_maps_a_freed_frame([Values(true, false)] bool mergeAcrossNodes)
    {
        using Machine machine = Create(TwoLargeNodes with { EnableKsm = true, PoisonFreedFrames = true });
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("merge_across_nodes", mergeAcrossNodes ? "1" : "0"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("max_page_sharing", "3"), Is.EqualTo(Errno.None));
        const int Processes = 6, Pages = 8;
        var regions = new List<(VmProcess Process, ulong Va)>();
        for (int i = 0; i < Processes; i++)
        {
            VmProcess p = machine.CreateProcess(homeNode: i % 2);
            regions.Add((p, MapPattern(p, Pages, page => (byte)(0x40 + page % 3))));
        }
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.Positive);

        int iterations = 400 * TestEnvironment.StressScale;
        var failures = new ConcurrentQueue<string>();
        int moversRunning = 2, moved = 0;
        void Mover(int seed)
        {
            var random = new Random(TestEnvironment.Seed(seed));
            try
            {
                for (int i = 0; i < iterations && failures.IsEmpty; i++)
                {
                    (VmProcess p, ulong va) = regions[random.Next(regions.Count)];
                    ulong page = va + (ulong)random.Next(Pages) * 4096;
                    Errno result = p.Mm.TryReplacePage(page, random.Next(2));
                    if (result == Errno.None)
                        Interlocked.Increment(ref moved);
                    else if (result is not (Errno.EBUSY or Errno.EAGAIN))
                        failures.Enqueue($"move: {result}");
                }
            }
            catch (Exception e)
            {
                failures.Enqueue($"mover: {e}");
            }
            finally
            {
                Interlocked.Decrement(ref moversRunning);
            }
        }
        // Reads every page, and now and then writes a page's own byte back (a copy-on-write of a KSM page,
        // which the scanner merges again): the contents never change, so any other byte is a lost page.
        void Checker()
        {
            byte[] buffer = new byte[4096];
            var random = new Random(TestEnvironment.Seed(13));
            try
            {
                while (Volatile.Read(ref moversRunning) > 0 && failures.IsEmpty)
                {
                    foreach ((VmProcess p, ulong va) in regions)
                    {
                        for (int page = 0; page < Pages; page++)
                        {
                            byte expected = (byte)(0x40 + page % 3);
                            if (random.Next(16) == 0)
                                p.Write<byte>(va + (ulong)page * 4096 + (ulong)random.Next(4096), expected);
                            p.Read(va + (ulong)page * 4096, buffer);
                            if (Array.Exists(buffer, b => b != expected))
                                failures.Enqueue($"{p} page {page}: read {buffer.First(b => b != expected):x2}, expected {expected:x2}");
                        }
                    }
                }
            }
            catch (Exception e)
            {
                failures.Enqueue($"checker: {e}");
            }
        }
        Thread[] threads = [new(() => Mover(11)), new(() => Mover(12)), new(Checker)];
        foreach (Thread t in threads)
            t.Start();
        try
        {
            while (Volatile.Read(ref moversRunning) > 0 && failures.IsEmpty)
                ksm.ScanPages(7);
        }
        finally
        {
            foreach (Thread t in threads)
                t.Join();
        }
        Assert.That(failures, Is.Empty);
        Assert.That(moved, Is.Positive, "pages moved while the scanner ran");
        TestContext.Out.WriteLine($"moved {moved} of {2 * iterations}; {ksm.GetStats()}");
        ksm.RunFullScans(3);
        Assert.That(ksm.GetStats().PagesSharing, Is.Positive, "merged again once the moves stop");
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }
}
