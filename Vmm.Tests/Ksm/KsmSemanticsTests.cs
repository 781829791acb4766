using Vmm.Mm;
using static Vmm.Tests.Ksm.KsmTestKit;
using static Vmm.Tests.TestMachines;

namespace Vmm.Tests.Ksm;

/// <summary>
/// KSM against Linux's rules: knob writes, the max_page_sharing formula, zero pages, NUMA trees, fork,
/// exit, process-wide merging, domains, and the counter invariants. Every scenario ends with Audit,
/// which recounts KSM's bookkeeping from its structures and the page tables.
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Ksm")]
public sealed class KsmSemanticsTests
{
    /// <summary>Σ ksm_merging_pages over processes = pages_shared + pages_sharing, and the profit formulas.</summary>
    private static void AssertInvariants(Machine machine)
    {
        KsmStats s = machine.Ksm!.GetStats();
        long merging = machine.Processes.Sum(p => p.GetKsmStats().MergingPages);
        Assert.That(merging, Is.EqualTo(s.PagesShared + s.PagesSharing), "sum of ksm_merging_pages = pages_shared + pages_sharing");
        Assert.That(s.GeneralProfit, Is.EqualTo((s.PagesSharing + s.KsmZeroPages) * 4096 - s.RmapItems * Vmm.Ksm.RmapItemBytes), "general_profit");
        foreach (VmProcess p in machine.Processes)
        {
            ProcessKsmStats ps = p.GetKsmStats();
            Assert.That(ps.ProcessProfit, Is.EqualTo((ps.MergingPages + ps.ZeroPages) * 4096 - ps.RmapItems * Vmm.Ksm.RmapItemBytes), "ksm_process_profit");
        }
        Assert.That(s.PagesVolatile, Is.EqualTo(Math.Max(0, s.RmapItems - s.PagesShared - s.PagesSharing - s.PagesUnshared)), "pages_volatile");
    }

    // ---- knobs ----------------------------------------------------------------------------------

    [Test]
    public void Knob_defaults_are_Linux_s()
    {
        using Machine machine = CreateForKsm();
        KsmKnobs k = machine.Ksm!.GetKnobs();
        Assert.That(k, Is.EqualTo(new KsmKnobs(0, 100, 20, true, false, 256, 2000, true, KsmAdvisorMode.None, 70, 200, 500, 30000)));
        Assert.That(machine.Ksm.Read("advisor_mode"), Is.EqualTo("[none] scan-time"));
    }

    [TestCase("run", "3", Errno.EINVAL)]
    [TestCase("run", "-1", Errno.EINVAL)]
    [TestCase("run", "x", Errno.EINVAL)]
    [TestCase("run", "1\n", Errno.None)]
    [TestCase("pages_to_scan", "abc", Errno.EINVAL)]
    [TestCase("pages_to_scan", "4294967296", Errno.EINVAL)]
    [TestCase("pages_to_scan", "0", Errno.None)]
    [TestCase("sleep_millisecs", "0", Errno.None)]
    [TestCase("sleep_millisecs", "-5", Errno.EINVAL)]
    [TestCase("merge_across_nodes", "2", Errno.EINVAL)]
    [TestCase("merge_across_nodes", "z", Errno.EINVAL)]
    [TestCase("merge_across_nodes", "99999999999999999999", Errno.ERANGE)]
    [TestCase("merge_across_nodes", "0", Errno.None)]
    [TestCase("use_zero_pages", "y", Errno.None)]
    [TestCase("use_zero_pages", "on", Errno.None)]
    [TestCase("use_zero_pages", "maybe", Errno.EINVAL)]
    [TestCase("max_page_sharing", "1", Errno.EINVAL)]
    [TestCase("max_page_sharing", "-3", Errno.EINVAL)]
    [TestCase("max_page_sharing", "2", Errno.None)]
    [TestCase("max_page_sharing", "3000000000", Errno.ERANGE)]
    [TestCase("stable_node_chains_prune_millisecs", "10", Errno.None)]
    [TestCase("smart_scan", "0", Errno.None)]
    [TestCase("smart_scan", "2", Errno.EINVAL)]
    [TestCase("advisor_mode", "scan-time\n", Errno.None)]
    [TestCase("advisor_mode", "fast", Errno.EINVAL)]
    [TestCase("advisor_target_scan_time", "0", Errno.EINVAL)]
    [TestCase("advisor_target_scan_time", "5", Errno.None)]
    [TestCase("advisor_max_cpu", "150", Errno.None)]
    [TestCase("advisor_min_pages_to_scan", "q", Errno.EINVAL)]
    public void Knob_writes_follow_Linux_s_rules(string knob, string value, Errno expected)
    {
        using Machine machine = CreateForKsm();
        Assert.That(machine.Ksm!.Write(knob, value), Is.EqualTo(expected));
    }

    [Test]
    public void A_rejected_knob_write_changes_nothing_and_an_unknown_knob_is_ENOENT()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        KsmKnobs before = ksm.GetKnobs();
        foreach ((string knob, string value) in new[] { ("run", "7"), ("pages_to_scan", "-1"), ("max_page_sharing", "1"), ("merge_across_nodes", "5"), ("smart_scan", "x") })
            Assert.That(ksm.Write(knob, value), Is.Not.EqualTo(Errno.None));
        Assert.That(ksm.GetKnobs(), Is.EqualTo(before));
        Assert.That(ksm.Write("no_such_knob", "1"), Is.EqualTo(Errno.ENOENT), "as opening a missing sysfs file");
    }

    [Test]
    public void The_advisor_owns_pages_to_scan_and_switching_it_resets_the_value()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("pages_to_scan", "777"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("advisor_min_pages_to_scan", "1234"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("advisor_mode", "scan-time"), Is.EqualTo(Errno.None));
        Assert.That(ksm.GetKnobs().PagesToScan, Is.EqualTo(1234u), "scan-time starts from advisor_min_pages_to_scan");
        Assert.That(ksm.Write("pages_to_scan", "10"), Is.EqualTo(Errno.EINVAL), "pages_to_scan belongs to the advisor");
        Assert.That(ksm.Read("advisor_mode"), Is.EqualTo("none [scan-time]"));
        Assert.That(ksm.Write("advisor_mode", "none"), Is.EqualTo(Errno.None));
        Assert.That(ksm.GetKnobs().PagesToScan, Is.EqualTo(100u), "back to the default");
        Assert.That(ksm.Write("pages_to_scan", "10"), Is.EqualTo(Errno.None));
    }

    [Test]
    public void The_scan_time_advisor_raises_pages_to_scan_when_a_full_scan_is_quicker_than_its_target()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        MapPattern(p, 64, i => (byte)i);
        Assert.That(ksm.Write("advisor_target_scan_time", "1"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("advisor_mode", "scan-time"), Is.EqualTo(Errno.None));
        uint before = ksm.GetKnobs().PagesToScan;
        ksm.RunFullScans(1);
        uint after = ksm.GetKnobs().PagesToScan;
        // A pass of 64 pages takes well under a second and about 1 % CPU: the 10 % CPU floor lifts the rate.
        Assert.That(after, Is.GreaterThan(before), "the advisor raised the rate at the end of the full scan");
        Assert.That(after, Is.LessThanOrEqualTo(30000u), "bounded by advisor_max_pages_to_scan");
        Assert.That(ksm.Write("advisor_max_pages_to_scan", "1000"), Is.EqualTo(Errno.None));
        ksm.RunFullScans(1);
        Assert.That(ksm.GetKnobs().PagesToScan, Is.EqualTo(1000u), "the advisor's upper bound");
    }

    [Test]
    public void Knobs_that_rebuild_the_index_are_EBUSY_while_pages_are_merged_and_free_after_run_2()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        MapPattern(p, 8, _ => 1);
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(1));
        Assert.That(ksm.Write("max_page_sharing", "10"), Is.EqualTo(Errno.EBUSY));
        Assert.That(ksm.Write("merge_across_nodes", "0"), Is.EqualTo(Errno.EBUSY));
        Assert.That(ksm.Write("max_page_sharing", "256"), Is.EqualTo(Errno.None), "the same value is no change");
        Assert.That(ksm.Write("run", "2"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("max_page_sharing", "10"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("merge_across_nodes", "0"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("run", "1"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("run", "0"), Is.EqualTo(Errno.None));
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesShared + ksm.GetStats().PagesSharing, Is.EqualTo(8), "merging works again in the new layout");
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    // ---- merge scenarios ------------------------------------------------------------------------

    [Test]
    public void Pairs_merge_into_one_KSM_page_each()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 40, i => (byte)(i / 2 + 1));
        ksm.RunFullScans(2);
        KsmStats s = ksm.GetStats();
        Assert.That(s.PagesShared, Is.EqualTo(20));
        Assert.That(s.PagesSharing, Is.EqualTo(20));
        for (int i = 0; i < 40; i += 2)
            Assert.That(p.GetPagemap(va + (ulong)i * 4096).Pfn, Is.EqualTo(p.GetPagemap(va + (ulong)(i + 1) * 4096).Pfn));
        Assert.That(p.GetPagemap(va).Pfn, Is.Not.EqualTo(p.GetPagemap(va + 2 * 4096).Pfn));
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void Merging_gives_the_frames_back_to_the_allocator()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        long before = machine.GetStats().AllFreePages;
        MapPattern(p, 200, _ => 9);
        long written = machine.GetStats().AllFreePages;
        ksm.RunFullScans(2);
        machine.Audit(); // flushes deferred references
        long after = machine.GetStats().AllFreePages;
        Assert.That(after - written, Is.EqualTo(199), "199 of the 200 frames are free again");
        Assert.That(before - after, Is.LessThan(10), "only the KSM page and page tables stay in use");
    }

    [TestCase(2, 7)]
    [TestCase(3, 9)]
    [TestCase(4, 9)]
    [TestCase(4, 10)]
    [TestCase(4, 11)]
    [TestCase(5, 23)]
    public void Max_page_sharing_splits_identical_pages_over_KSM_copies_by_Linux_s_formula(int maxSharing, int pages)
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("max_page_sharing", maxSharing.ToString(System.Globalization.CultureInfo.InvariantCulture)), Is.EqualTo(Errno.None));
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, pages, _ => 0x42);
        ksm.RunFullScans(2);
        int q = pages / maxSharing, r = pages % maxSharing;
        long shared = r >= 2 ? q + 1 : q;
        long sharing = r >= 2 ? pages - shared : q * (maxSharing - 1);
        KsmStats s = ksm.GetStats();
        Assert.That(s.PagesShared, Is.EqualTo(shared), "pages_shared");
        Assert.That(s.PagesSharing, Is.EqualTo(sharing), "pages_sharing");
        Assert.That(s.PagesUnshared, Is.EqualTo(r == 1 ? 1 : 0), "a leftover single page has no partner");
        Assert.That(s.StableNodeChains, Is.EqualTo(shared > 1 ? 1 : 0));
        Assert.That(s.StableNodeDups, Is.EqualTo(shared > 1 ? shared : 0));
        var mapCounts = Enumerable.Range(0, pages).Select(i => p.GetPagemap(va + (ulong)i * 4096)).Where(e => e.Ksm)
            .GroupBy(e => e.Pfn).Select(g => g.Count()).ToList();
        Assert.That(mapCounts, Has.All.LessThanOrEqualTo(maxSharing), "no KSM page exceeds max_page_sharing");
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(shared), "stable on later scans");
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void Without_use_zero_pages_zero_filled_pages_merge_into_one_KSM_page()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 30, _ => 0);
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(1));
        Assert.That(ksm.GetStats().KsmZeroPages, Is.Zero);
        Assert.That(p.GetPagemap(va).Ksm, Is.True);
        AssertAuditClean(machine);
    }

    [Test]
    public void With_use_zero_pages_zero_filled_pages_map_the_zero_page_and_are_counted_until_written_or_unmapped()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("use_zero_pages", "1"), Is.EqualTo(Errno.None));
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 30, i => i < 20 ? (byte)0 : (byte)5);
        long rss = p.RssAnonPages;
        ksm.RunFullScans(2);
        KsmStats s = ksm.GetStats();
        Assert.That(s.KsmZeroPages, Is.EqualTo(20));
        Assert.That(p.GetKsmStats().ZeroPages, Is.EqualTo(20));
        Assert.That(s.PagesShared, Is.EqualTo(1), "the other ten merge normally");
        Assert.That(p.GetPagemap(va).ZeroPage, Is.True);
        Assert.That(p.RssAnonPages, Is.EqualTo(rss - 20), "the zero page is not an anonymous page");
        Assert.That(p.Read<long>(va + 5 * 4096 + 8), Is.Zero);
        AssertAuditClean(machine);

        p.Write<byte>(va + 3 * 4096, 1); // a write copies a fresh zeroed page
        Assert.That(p.Read<byte>(va + 3 * 4096), Is.EqualTo(1));
        Assert.That(ksm.GetStats().KsmZeroPages, Is.EqualTo(19));
        Assert.That(p.Munmap(va, 10 * 4096), Is.EqualTo(Errno.None));
        Assert.That(ksm.GetStats().KsmZeroPages, Is.EqualTo(10), "munmap drops the rest of the first ten");
        Assert.That(p.GetKsmStats().ZeroPages, Is.EqualTo(10));
        ksm.RunFullScans(1);
        AssertInvariants(machine);
        AssertAuditClean(machine);
        Assert.That(p.Madvise(va + 10 * 4096, 20 * 4096, Advice.Unmergeable), Is.EqualTo(Errno.None));
        Assert.That(ksm.GetStats().KsmZeroPages, Is.Zero, "unmerge replaces KSM zero PTEs too");
        Assert.That(p.Read<byte>(va + 15 * 4096), Is.Zero);
        AssertAuditClean(machine);
    }

    [Test]
    public void Pages_never_written_are_not_scanned()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(64 * 4096);
        Assert.That(p.Read<long>(va), Is.Zero); // maps the shared zero page
        p.Madvise(va, 64 * 4096, Advice.Mergeable);
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().RmapItems, Is.Zero, "the zero page is not anonymous memory");
        AssertAuditClean(machine);
    }

    [Test]
    public void A_pinned_page_is_never_merged_until_it_is_unpinned()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 4, _ => 8);
        using (PinnedMemory pin = p.Pin(va + 4096, 4096, write: false))
        {
            ksm.RunFullScans(3);
            Assert.That(p.GetPagemap(va + 4096).Ksm, Is.False, "a pin holds a reference no mapping explains");
            Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(2), "the other three merge");
            Assert.That(pin.GetReadOnlySpan(0)[7], Is.EqualTo(8));
        }
        ksm.RunFullScans(1);
        Assert.That(p.GetPagemap(va + 4096).Ksm, Is.True);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(3));
        AssertAuditClean(machine);
    }

    [Test]
    public void A_page_that_changes_between_visits_is_volatile_and_does_not_merge()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 3, _ => 4);
        for (int scan = 0; scan < 4; scan++)
        {
            p.Write<int>(va + 2 * 4096, scan + 100); // page 2 changes before every pass
            ksm.RunFullScans(1);
        }
        KsmStats s = ksm.GetStats();
        Assert.That(s.PagesShared + s.PagesSharing, Is.EqualTo(2));
        Assert.That(s.PagesVolatile, Is.EqualTo(1));
        Assert.That(p.GetPagemap(va + 2 * 4096).Ksm, Is.False);
        AssertInvariants(machine);
    }

    /// <summary>Takes every free frame of the machine into a hog process; returns it.</summary>
    private static VmProcess ExhaustMemory(Machine machine)
    {
        VmProcess hog = machine.CreateProcess();
        ulong size = (ulong)machine.Topology.TotalFrames * 4096;
        ulong va = hog.Mmap(size);
        try
        {
            for (ulong off = 0; off < size; off += 4096)
                hog.Write<byte>(va + off, 1);
        }
        catch (InsufficientMemoryException)
        {
        }
        return hog;
    }

    [Test]
    public void Unmergeable_out_of_memory_is_EAGAIN_and_the_range_stays_mergeable_and_consistent()
    {
        using Machine machine = TestMachines.Create();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 100, _ => 3);
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(99));
        VmProcess hog = ExhaustMemory(machine);
        Assert.That(p.Madvise(va, 100 * 4096, Advice.Unmergeable), Is.EqualTo(Errno.EAGAIN), "madvise reports ENOMEM from unmerging as EAGAIN");
        Assert.That(p.GetKsmStats().Mergeable, Is.True, "the flag is cleared only once everything is unmerged");
        Assert.That(p.GetPagemap(va + 99 * 4096).Ksm, Is.True, "some pages are still merged");
        for (int i = 0; i < 100; i++)
            Assert.That(p.Read<byte>(va + (ulong)i * 4096 + 9), Is.EqualTo(3));
        AssertAuditClean(machine);
        hog.Exit();
        Assert.That(p.Madvise(va, 100 * 4096, Advice.Unmergeable), Is.EqualTo(Errno.None));
        Assert.That(p.GetPagemap(va + 99 * 4096).Ksm, Is.False);
        ksm.RunFullScans(1);
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void Run_2_out_of_memory_reports_ENOMEM_and_stops_ksm()
    {
        using Machine machine = TestMachines.Create();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 100, _ => 3);
        ksm.RunFullScans(2);
        VmProcess hog = ExhaustMemory(machine);
        Assert.That(ksm.Write("run", "2"), Is.EqualTo(Errno.ENOMEM));
        Assert.That(ksm.Read("run"), Is.EqualTo("0"), "run becomes 0 when unmerging fails");
        Assert.That(p.Read<byte>(va + 50 * 4096), Is.EqualTo(3));
        AssertAuditClean(machine);
        hog.Exit();
        Assert.That(ksm.Write("run", "2"), Is.EqualTo(Errno.None));
        Assert.That(ksm.GetStats().PagesShared + ksm.GetStats().PagesSharing, Is.Zero);
        AssertAuditClean(machine);
    }

    [Test]
    public void A_KSM_page_whose_mappings_were_all_copied_is_freed_and_its_node_removed_as_stale()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 5, _ => 4);
        ksm.RunFullScans(2);
        long kpfn = p.GetPagemap(va).Pfn;
        for (int i = 0; i < 5; i++)
            p.Write<byte>(va + (ulong)i * 4096, (byte)(10 + i)); // every mapping copies
        machine.Audit(); // releases the deferred references: the KSM page is free now
        Assert.That(machine.GetPageInfo(kpfn).RefCount, Is.Zero, "the last mapping's copy freed the KSM page");
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(1), "counters move lazily: nothing has visited the addresses yet");
        ksm.RunFullScans(1);
        KsmStats s = ksm.GetStats();
        Assert.That(s.PagesShared + s.PagesSharing, Is.Zero, "the stale node went with its items");
        Assert.That(p.GetKsmStats().MergingPages, Is.Zero);
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void Stale_copies_of_a_chain_are_pruned_and_a_chain_with_one_copy_left_collapses()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("max_page_sharing", "2"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("stable_node_chains_prune_millisecs", "0"), Is.EqualTo(Errno.None));
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 6, _ => 8);
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(3));
        Assert.That(ksm.GetStats().StableNodeChains, Is.EqualTo(1));
        Assert.That(ksm.GetStats().StableNodeDups, Is.EqualTo(3));
        for (int i = 0; i < 4; i++)
            p.Write<byte>(va + (ulong)i * 4096, (byte)(20 + i)); // two of the three copies lose all their mappings
        ksm.RunFullScans(2);
        KsmStats s = ksm.GetStats();
        Assert.That(s.PagesShared, Is.EqualTo(1));
        Assert.That(s.PagesSharing, Is.EqualTo(1));
        Assert.That(s.StableNodeChains, Is.EqualTo(1), "as in Linux, stale copies are pruned only when a lookup walks the chain");
        // A lookup of that content walks the chain (pruning is due: 0 ms), prunes the copies whose pages
        // are gone, and collapses the chain left with one copy.
        ulong extra = MapPattern(p, 1, _ => 8);
        ksm.RunFullScans(2);
        s = ksm.GetStats();
        Assert.That(s.StableNodeChains, Is.Zero, "the chain collapsed into a plain node");
        Assert.That(s.StableNodeDups, Is.Zero);
        Assert.That(s.PagesShared, Is.EqualTo(1));
        Assert.That(p.GetPagemap(extra).Ksm, Is.False, "the last copy is full (2 mappings): the new page waits for a partner");
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    // ---- NUMA -------------------------------------------------------------------------------------

    [Test]
    public void Merge_across_nodes_0_keeps_one_KSM_page_per_node_and_1_merges_them()
    {
        foreach (bool across in new[] { true, false })
        {
            using Machine machine = CreateForKsm();
            Vmm.Ksm ksm = machine.Ksm!;
            Assert.That(ksm.Write("merge_across_nodes", across ? "1" : "0"), Is.EqualTo(Errno.None));
            VmProcess a = machine.CreateProcess(homeNode: 0), b = machine.CreateProcess(homeNode: 1);
            ulong va = MapPattern(a, 5, _ => 3), vb = MapPattern(b, 5, _ => 3);
            Assert.That(a.GetPagemap(va).Node, Is.EqualTo(0));
            Assert.That(b.GetPagemap(vb).Node, Is.EqualTo(1));
            ksm.RunFullScans(2);
            KsmStats s = ksm.GetStats();
            Assert.That(s.PagesShared, Is.EqualTo(across ? 1 : 2), $"merge_across_nodes={(across ? 1 : 0)}");
            Assert.That(s.PagesSharing, Is.EqualTo(across ? 9 : 8));
            if (!across)
            {
                Assert.That(a.GetPagemap(va).Node, Is.EqualTo(0), "a KSM page stays on its node");
                Assert.That(b.GetPagemap(vb).Node, Is.EqualTo(1));
            }
            AssertInvariants(machine);
            AssertAuditClean(machine);
        }
    }

    // ---- fork, exit, process-wide merging ----------------------------------------------------------

    [Test]
    public void A_forked_child_shares_the_KSM_pages_and_ksmd_links_its_mappings_without_a_partner()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess parent = machine.CreateProcess();
        ulong va = MapPattern(parent, 10, _ => 6);
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(9));
        VmProcess child = parent.Fork();
        Assert.That(child.GetPagemap(va).Ksm, Is.True, "fork copies the KSM mappings");
        Assert.That(child.GetKsmStats().MergingPages, Is.Zero, "not linked yet: ksm_fork starts the child's counters at 0");
        AssertInvariants(machine);
        AssertAuditClean(machine); // rmap_walk_ksm finds the child's mappings through the parent's items
        ksm.RunFullScans(2);
        KsmStats s = ksm.GetStats();
        Assert.That(s.PagesShared, Is.EqualTo(1));
        Assert.That(s.PagesSharing, Is.EqualTo(19), "the child's ten mappings joined the same KSM page");
        Assert.That(child.GetKsmStats().MergingPages, Is.EqualTo(10));
        child.Write<byte>(va, 1);
        Assert.That(parent.Read<byte>(va), Is.EqualTo(6), "the child's write is its own");
        Assert.That(child.Read<byte>(va + 1), Is.EqualTo(6));
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void Process_wide_merging_marks_new_mappings_is_inherited_by_fork_and_unmerges_when_disabled()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        Assert.That(p.SetMemoryMerge(true), Is.EqualTo(Errno.None));
        Assert.That(p.IsMemoryMergeEnabled, Is.True);
        ulong va = MapPattern(p, 6, _ => 2, mergeable: false);
        Assert.That(p.Mmap(0, 4096, Protection.ReadWrite, MapFlags.Shared, out ulong shared), Is.EqualTo(Errno.None));
        p.Fill(shared, 4096, 2);
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(5), "the private pages merge; the shared mapping is never mergeable");
        Assert.That(p.GetPagemap(shared).Ksm, Is.False);
        Assert.That(p.GetKsmStats(), Is.EqualTo(new ProcessKsmStats(6, 0, 6, 6 * 4096 - 6 * Vmm.Ksm.RmapItemBytes, true, true)));
        VmProcess child = p.Fork();
        Assert.That(child.IsMemoryMergeEnabled, Is.True, "PR_SET_MEMORY_MERGE is inherited");
        Assert.That(p.SetMemoryMerge(false), Is.EqualTo(Errno.None));
        Assert.That(p.GetPagemap(va).Ksm, Is.False, "disabling unmerges");
        Assert.That(p.GetKsmStats().Mergeable, Is.False);
        Assert.That(p.Read<byte>(va + 5 * 4096), Is.EqualTo(2));
        ksm.RunFullScans(1);
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void An_exiting_process_is_let_go_by_ksmd_and_its_counters_leave_with_it()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess a = machine.CreateProcess(), b = machine.CreateProcess();
        MapPattern(a, 20, _ => 1);
        MapPattern(b, 20, _ => 1);
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(39));
        ksm.ScanPages(7); // the cursor stands inside a's list
        a.Exit();
        b.Exit(); // b has items and is not the cursor's: it moves right after the cursor
        AssertAuditClean(machine);
        ksm.RunFullScans(1);
        KsmStats s = ksm.GetStats();
        Assert.That(s.RmapItems, Is.Zero, "ksmd freed every item of the exited processes");
        Assert.That(s.PagesShared + s.PagesSharing + s.PagesUnshared, Is.Zero);
        Assert.That(ksm.ScanOrder(), Is.Empty, "and their slots");
        AssertAuditClean(machine);
    }

    [Test]
    public void A_new_slot_joins_behind_the_cursor_but_at_the_tail_once_run_is_2()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess a = machine.CreateProcess(), b = machine.CreateProcess();
        MapPattern(a, 4, _ => 1);
        MapPattern(b, 4, _ => 2);
        ksm.ScanPages(5); // cursor in b
        VmProcess c = machine.CreateProcess();
        MapPattern(c, 4, _ => 3);
        Assert.That(ksm.ScanOrder(), Is.EqualTo(new[] { a.Mm, c.Mm, b.Mm }), "just behind the cursor's slot: a full lap before its first scan");
        Assert.That(ksm.Write("run", "2"), Is.EqualTo(Errno.None));
        VmProcess d = machine.CreateProcess();
        MapPattern(d, 4, _ => 4);
        Assert.That(ksm.ScanOrder()[^1], Is.EqualTo(d.Mm), "while run is 2, at the tail");
    }

    [Test]
    public void Madvise_reports_holes_with_ENOMEM_and_still_advises_the_mapped_parts()
    {
        using Machine machine = CreateForKsm();
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 6, _ => 7, mergeable: false);
        Assert.That(p.Munmap(va + 2 * 4096, 4096), Is.EqualTo(Errno.None));
        Assert.That(p.Madvise(va, 6 * 4096, Advice.Mergeable), Is.EqualTo(Errno.ENOMEM));
        machine.Ksm!.RunFullScans(2);
        Assert.That(machine.Ksm.GetStats().PagesShared + machine.Ksm.GetStats().PagesSharing, Is.EqualTo(5), "both mapped parts were advised");
        Assert.That(p.Madvise(va + 1, 4096, Advice.Mergeable), Is.EqualTo(Errno.EINVAL), "unaligned start");
        Assert.That(p.Madvise(va, ulong.MaxValue - 4096, Advice.Mergeable), Is.EqualTo(Errno.EINVAL), "overflowing length");
        AssertAuditClean(machine);
    }

    // ---- domains and smart scan ----------------------------------------------------------------------

    [Test]
    public void Pages_merge_only_within_their_dedupe_domain()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess a = machine.CreateProcess(), b = machine.CreateProcess();
        Assert.That(b.SetDedupeDomain(7), Is.EqualTo(Errno.None));
        ulong va = MapPattern(a, 3, _ => 5), vb = MapPattern(b, 3, _ => 5);
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(2), "one KSM page per domain");
        Assert.That(a.GetPagemap(va).Pfn, Is.Not.EqualTo(b.GetPagemap(vb).Pfn));
        // Moving a range into the other domain unmerges it first, then it merges there.
        Assert.That(a.SetDedupeDomain(va, 3 * 4096, 7), Is.EqualTo(Errno.None));
        Assert.That(a.GetPagemap(va).Ksm, Is.False);
        ksm.RunFullScans(3);
        Assert.That(a.GetPagemap(va).Pfn, Is.EqualTo(b.GetPagemap(vb).Pfn), "now the same domain");
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void Smart_scan_skips_pages_that_never_merge_more_and_more()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        MapPattern(p, 1, _ => 9);
        // Visits 1-4 are scanned (4 arms one skip), 5 skipped, 6 scanned (arms 2), 7-8 skipped, 9 scanned.
        ksm.RunFullScans(9);
        Assert.That(ksm.GetStats().PagesSkipped, Is.EqualTo(3));
        Assert.That(ksm.GetStats().PagesScanned, Is.EqualTo(6));
        Assert.That(ksm.Write("smart_scan", "0"), Is.EqualTo(Errno.None));
        ksm.RunFullScans(3);
        Assert.That(ksm.GetStats().PagesSkipped, Is.EqualTo(3), "off: nothing more is skipped");
        Assert.That(ksm.GetStats().PagesScanned, Is.EqualTo(9));
    }

    [Test]
    public void Twins_copied_on_write_in_different_passes_merge_again_under_smart_scan()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess a = machine.CreateProcess(), b = machine.CreateProcess();
        ulong va = MapPattern(a, 8, _ => 1), vb = MapPattern(b, 8, _ => 1);
        ksm.RunFullScans(12); // old enough for smart_scan to skip them, had they stayed unique
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(15));
        a.Write<long>(va, 0x1234); // the same patch, one pass apart
        ksm.RunFullScans(1);
        b.Write<long>(vb, 0x1234);
        ksm.RunFullScans(30);
        Assert.That(a.GetPagemap(va).Pfn, Is.EqualTo(b.GetPagemap(vb).Pfn), "the patched twins found each other again");
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(2));
        AssertInvariants(machine);
        AssertAuditClean(machine);
    }

    [Test]
    public void Ksmd_merges_in_the_background_while_run_is_1()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        MapPattern(p, 50, _ => 3);
        Assert.That(ksm.Write("sleep_millisecs", "1"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("pages_to_scan", "1000"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("run", "1"), Is.EqualTo(Errno.None));
        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (ksm.GetStats().PagesSharing < 49 && DateTime.UtcNow < deadline)
            Thread.Sleep(5);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(49));
        Assert.That(ksm.Write("run", "0"), Is.EqualTo(Errno.None));
        AssertAuditClean(machine);
    }
}
