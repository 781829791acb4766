using Vmm.Memory;

namespace Vmm.Tests.Memory;

[TestFixture]
[Category("Smoke")]
public sealed class LruTests
{
    private const int Page = 4096;

    private static PageFlags FlagsOf(Machine machine, long pfn) => machine.GetPageInfo(pfn).Flags;

    private static (long Inactive, long Active, long Isolated) Counts(Machine machine, int node)
    {
        NodeStats stats = machine.GetStats().Nodes[node];
        return (stats.InactiveAnonPages, stats.ActiveAnonPages, stats.IsolatedAnonPages);
    }

    /// <summary>
    /// A new process on <paramref name="machine"/> (home node 0) with one private page mapped and written
    /// with <paramref name="value"/>, its frame drained from the add batches onto node 0's inactive list.
    /// Returns the process, the page's address and its frame.
    /// </summary>
    private static (VmProcess Process, ulong Va, long Pfn) MapPageOnLru(Machine machine, long value)
    {
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(Page);
        p.Write<long>(va, value);
        long pfn = p.GetPagemap(va).Pfn;
        machine.Lru.DrainAll();
        return (p, va, pfn);
    }

    [Test]
    public void Add_puts_a_page_in_a_batch_with_a_reference_of_its_own_and_a_drain_moves_it_to_the_inactive_list()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable, 1);
        Assert.That(pfn, Is.Not.EqualTo(PageAllocator.NoPfn));

        machine.Lru.Add(pfn);
        Assert.That(FlagsOf(machine, pfn) & PageFlags.Lru, Is.EqualTo(PageFlags.None), "a batched page is not on a list yet");
        Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(2), "the batch holds a reference of its own");
        Assert.That(machine.Lru.BatchedPageCount, Is.EqualTo(1));
        Assert.That(Counts(machine, 1), Is.EqualTo((0L, 0L, 0L)));

        machine.Lru.DrainAll();
        Assert.That(FlagsOf(machine, pfn) & (PageFlags.Lru | PageFlags.Active), Is.EqualTo(PageFlags.Lru), "drained onto the inactive list");
        Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(1), "the drain dropped the batch's reference");
        Assert.That(machine.Lru.BatchedPageCount, Is.Zero);
        Assert.That(Counts(machine, 1), Is.EqualTo((1L, 0L, 0L)), "on its frame's node");
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 0L, 0L)));

        machine.PutPage(pfn);
        Assert.That(Counts(machine, 1), Is.EqualTo((0L, 0L, 0L)), "the final put unlinks the page");
        Assert.That(machine.GetPageInfo(pfn).RefCount, Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_faulted_page_ends_on_its_nodes_inactive_list_after_DrainAll()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess(homeNode: 1);
        ulong va = p.Mmap(Page);
        p.Write<long>(va, 42);
        long pfn = p.GetPagemap(va).Pfn;
        Assert.That(machine.Topology.NodeOf(pfn), Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine); // a batched page is accounted for too

        machine.Lru.DrainAll();
        Assert.That(FlagsOf(machine, pfn) & (PageFlags.Lru | PageFlags.Active), Is.EqualTo(PageFlags.Lru));
        Assert.That(Counts(machine, 1), Is.EqualTo((1L, 0L, 0L)));
        Assert.That(machine.ReadVmStat("nr_inactive_anon", out long inactive), Is.EqualTo(Errno.None));
        Assert.That(inactive, Is.EqualTo(1));
        Assert.That(machine.ReadVmStat("nr_active_anon", out long active), Is.EqualTo(Errno.None));
        Assert.That(active, Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_copy_on_write_copy_joins_the_LRU_too()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess parent = machine.CreateProcess();
        ulong va = parent.Mmap(Page);
        parent.Write<long>(va, 1);
        VmProcess child = parent.Fork();
        child.Write<long>(va, 2);
        long copy = child.GetPagemap(va).Pfn;
        Assert.That(copy, Is.Not.EqualTo(parent.GetPagemap(va).Pfn), "the child's write copied the page");
        machine.Lru.DrainAll();
        Assert.That(FlagsOf(machine, copy) & PageFlags.Lru, Is.EqualTo(PageFlags.Lru));
        Assert.That(Counts(machine, 0).Inactive, Is.EqualTo(2));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Isolate_fails_on_a_page_that_is_not_on_an_LRU_list()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(3 * Page);
        p.Write<long>(va, 1);
        long batched = p.GetPagemap(va).Pfn;
        Assert.That(machine.Lru.Isolate(batched), Is.False, "a page in an add batch (PG_lru clear)");

        machine.Lru.DrainAll();
        Assert.That(machine.Lru.Isolate(batched), Is.True);
        Assert.That(machine.Lru.Isolate(batched), Is.False, "already isolated");
        machine.Lru.Putback(batched);

        Assert.That(p.Read<long>(va + Page), Is.Zero);
        long zero = p.GetPagemap(va + Page).Pfn;
        Assert.That(zero, Is.EqualTo(machine.ZeroPagePfn));
        Assert.That(machine.Lru.Isolate(zero), Is.False, "the zero page");

        long table;
        p.Mm.MmapLock.EnterReadLock();
        try
        {
            table = p.Mm.EnumerateTablePages()[^1];
        }
        finally
        {
            p.Mm.MmapLock.ExitReadLock();
        }
        Assert.That(FlagsOf(machine, table) & PageFlags.Table, Is.EqualTo(PageFlags.Table));
        Assert.That(machine.Lru.Isolate(table), Is.False, "a page table");
        Assert.That(Counts(machine, 0).Isolated, Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Isolate_takes_an_LRU_page_off_its_list_with_a_reference_and_Putback_restores_it()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        (VmProcess p, ulong va, long pfn) = MapPageOnLru(machine, 7);
        int before = machine.MemMap.RefCount(pfn);

        Assert.That(machine.Lru.Isolate(pfn), Is.True);
        Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(before + 1), "the isolation holds a reference");
        Assert.That(FlagsOf(machine, pfn) & PageFlags.Lru, Is.EqualTo(PageFlags.None));
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 0L, 1L)), "off the inactive list, counted in nr_isolated_anon");
        Assert.That(machine.ReadVmStat("nr_isolated_anon", out long isolated), Is.EqualTo(Errno.None));
        Assert.That(isolated, Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine); // the isolation's reference is explained
        Assert.That(p.Read<long>(va), Is.EqualTo(7), "isolation does not disturb the mapping");

        machine.Lru.Putback(pfn);
        Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(before));
        Assert.That(FlagsOf(machine, pfn) & (PageFlags.Lru | PageFlags.Active), Is.EqualTo(PageFlags.Lru));
        Assert.That(Counts(machine, 0), Is.EqualTo((1L, 0L, 0L)));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void An_isolated_page_unmapped_meanwhile_is_freed_by_its_Putback()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        (VmProcess p, ulong va, long pfn) = MapPageOnLru(machine, 7);
        Assert.That(machine.Lru.Isolate(pfn), Is.True);
        Assert.That(p.Munmap(va, Page), Is.EqualTo(Errno.None));
        Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(1), "only the isolation holds it");
        TestMachines.AssertAuditClean(machine);

        machine.Lru.Putback(pfn);
        Assert.That(machine.GetPageInfo(pfn).RefCount, Is.Zero, "the putback dropped the last reference");
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 0L, 0L)));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void MarkAccessed_twice_activates_a_page_and_isolation_keeps_it_active()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        (VmProcess p, ulong va, long pfn) = MapPageOnLru(machine, 7);

        machine.Lru.MarkAccessed(pfn);
        Assert.That(FlagsOf(machine, pfn) & (PageFlags.Referenced | PageFlags.Active), Is.EqualTo(PageFlags.Referenced), "the first access only references it");
        Assert.That(Counts(machine, 0), Is.EqualTo((1L, 0L, 0L)));

        machine.Lru.MarkAccessed(pfn);
        Assert.That(FlagsOf(machine, pfn) & (PageFlags.Referenced | PageFlags.Active | PageFlags.Lru), Is.EqualTo(PageFlags.Active | PageFlags.Lru),
            "the second activates it and clears PG_referenced");
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 1L, 0L)));
        TestMachines.AssertAuditClean(machine);

        Assert.That(machine.Lru.Isolate(pfn), Is.True);
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 0L, 1L)));
        machine.Lru.Putback(pfn);
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 1L, 0L)), "back on the active list");

        Assert.That(p.Munmap(va, Page), Is.EqualTo(Errno.None));
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 0L, 0L)), "the free unlinks an active page too");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Activate_moves_an_inactive_page_and_leaves_others_alone()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        machine.Lru.Add(pfn);
        machine.Lru.Activate(pfn);
        Assert.That(FlagsOf(machine, pfn) & PageFlags.Active, Is.EqualTo(PageFlags.None), "a batched page is not on a list: folio_activate does nothing");
        machine.Lru.DrainAll();
        machine.Lru.Activate(pfn);
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 1L, 0L)));
        machine.Lru.Activate(pfn);
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 1L, 0L)), "already active");
        machine.PutPage(pfn);
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 0L, 0L)));
    }

    [Test]
    public void Munmap_and_exit_of_LRU_pages_leave_the_lists_and_batches_empty()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        long freeBefore = machine.GetStats().AllFreePages;
        VmProcess a = machine.CreateProcess();
        VmProcess b = machine.CreateProcess(homeNode: 1);
        ulong vaA = a.Mmap(100 * Page);
        ulong vaB = b.Mmap(100 * Page);
        for (int i = 0; i < 100; i++)
        {
            a.Write<long>(vaA + (ulong)(i * Page), i);
            b.Write<long>(vaB + (ulong)(i * Page), i);
        }
        // Some pages are on the lists (the batch filled), the last ones still batched.
        Assert.That(Counts(machine, 0).Inactive + Counts(machine, 1).Inactive + machine.Lru.BatchedPageCount, Is.EqualTo(200));
        TestMachines.AssertAuditClean(machine);

        Assert.That(a.Munmap(vaA, 100 * Page), Is.EqualTo(Errno.None));
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 0L, 0L)));
        b.Exit();
        Assert.That(Counts(machine, 1), Is.EqualTo((0L, 0L, 0L)));
        Assert.That(machine.Lru.BatchedPageCount, Is.Zero, "munmap and exit drain the batches");
        a.Exit();
        TestMachines.AssertAuditClean(machine);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore), "every page came back");
    }

    [Test]
    public void Shared_memory_pages_are_on_the_LRU()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess parent = machine.CreateProcess();
        ulong va = parent.Mmap(4 * Page, Protection.ReadWrite, MapFlags.Shared);
        for (int i = 0; i < 4; i++)
            parent.Write<long>(va + (ulong)(i * Page), i + 1);
        VmProcess child = parent.Fork();
        Assert.That(child.Read<long>(va + Page), Is.EqualTo(2));
        machine.Lru.DrainAll();
        Assert.That(Counts(machine, 0), Is.EqualTo((4L, 0L, 0L)), "one entry per cached page, however many map it");
        for (int i = 0; i < 4; i++)
            Assert.That(FlagsOf(machine, parent.GetPagemap(va + (ulong)(i * Page)).Pfn) & PageFlags.Lru, Is.EqualTo(PageFlags.Lru));
        TestMachines.AssertAuditClean(machine);

        child.Exit();
        parent.Exit();
        TestMachines.AssertAuditClean(machine); // also releases the page cache's deferred references
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 0L, 0L)));
    }

    [Test]
    public void While_the_cache_is_disabled_new_pages_go_straight_to_their_list()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(2 * Page);
        p.Write<long>(va, 1);
        machine.Lru.DisableCache();
        Assert.That(machine.Lru.BatchedPageCount, Is.Zero, "disabling drains the batches");
        Assert.That(Counts(machine, 0).Inactive, Is.EqualTo(1));
        p.Write<long>(va + Page, 2);
        long pfn = p.GetPagemap(va + Page).Pfn;
        Assert.That(FlagsOf(machine, pfn) & PageFlags.Lru, Is.EqualTo(PageFlags.Lru), "no batch while disabled");
        Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(1), "and no batch reference");
        Assert.That(machine.Lru.Isolate(pfn), Is.True, "isolatable at once");
        machine.Lru.Putback(pfn);
        machine.Lru.EnableCache();
        Assert.Throws<VmBugException>(machine.Lru.EnableCache, "enable without disable is a bug");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void ReleaseIsolated_ends_an_isolation_for_good_and_frees_a_page_nothing_else_holds()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        machine.Lru.Add(pfn);
        machine.Lru.DrainAll();
        machine.Lru.Activate(pfn);
        Assert.That(machine.Lru.Isolate(pfn), Is.True);
        machine.PutPage(pfn); // the allocation's: only the isolation holds it now
        machine.Lru.ReleaseIsolated(pfn);
        Assert.That(machine.GetPageInfo(pfn).RefCount, Is.Zero, "freed, PG_active cleared first (the allocator checks)");
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 0L, 0L)));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Audit_reports_a_user_page_that_is_on_no_LRU_list()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        long pfn = MapPageOnLru(machine, 1).Pfn;
        Assert.That(machine.Lru.Isolate(pfn), Is.True);
        machine.Lru.ReleaseIsolated(pfn); // wrongly: the page is still mapped
        Assert.That(machine.Audit(), Has.Some.Contains($"frame {pfn} is a user page"));
        machine.MemMap.GetPage(pfn);
        machine.Lru.Add(pfn); // repair: back through a batch
        machine.PutPage(pfn);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    [Category("Stress")]
    public void Faults_and_unmaps_racing_with_drains_isolations_and_putbacks_leave_the_lists_consistent()
    {
        const int workers = 3;
        int iterations = 300 * TestEnvironment.StressScale;
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        var processes = new VmProcess[workers];
        for (int i = 0; i < workers; i++)
            processes[i] = machine.CreateProcess(homeNode: i % 2);
        var failures = new List<string>();
        int running = workers;
        long isolations = 0;

        void Worker(int id)
        {
            try
            {
                VmProcess p = processes[id];
                var random = new Random(id);
                var clock = System.Diagnostics.Stopwatch.StartNew();
                // Past the iterations, until the mover has isolated something (on a loaded machine it may
                // not have run yet), for at most 30 s more.
                for (int i = 0; i < iterations || (Volatile.Read(ref isolations) == 0 && clock.Elapsed < TimeSpan.FromSeconds(30)); i++)
                {
                    int pages = random.Next(1, 40);
                    ulong va = p.Mmap((ulong)(pages * Page), Protection.ReadWrite, random.Next(4) == 0 ? MapFlags.Shared : MapFlags.Private);
                    for (int j = 0; j < pages; j++)
                        p.Write<long>(va + (ulong)(j * Page), (id << 20) | j);
                    for (int j = 0; j < pages; j++)
                    {
                        long value = p.Read<long>(va + (ulong)(j * Page));
                        if (value != ((id << 20) | j))
                            lock (failures) failures.Add($"worker {id}: page {j} reads {value:x}");
                    }
                    Assert.That(p.Munmap(va, (ulong)(pages * Page)), Is.EqualTo(Errno.None));
                }
            }
            catch (Exception e)
            {
                lock (failures) failures.Add($"worker {id}: {e}");
            }
            finally
            {
                Interlocked.Decrement(ref running);
            }
        }

        void Mover()
        {
            try
            {
                var random = new Random(99);
                MemMap memMap = machine.MemMap;
                var isolated = new List<long>();
                while (Volatile.Read(ref running) > 0)
                {
                    machine.Lru.DrainAll();
                    // As compaction does: pick frames by number, take a reference unless free, isolate.
                    for (int k = 0; k < 64; k++)
                    {
                        long pfn = random.NextInt64(memMap.FrameCount);
                        if (!memMap.IsInitialised(pfn) || !memMap.TryGetPageUnlessZero(pfn))
                            continue;
                        if (machine.Lru.Isolate(pfn))
                        {
                            isolated.Add(pfn);
                            Interlocked.Increment(ref isolations);
                            if (random.Next(2) == 0)
                                machine.Lru.MarkAccessed(pfn);
                        }
                        machine.PutPage(pfn);
                    }
                    foreach (long pfn in isolated)
                        machine.Lru.Putback(pfn);
                    isolated.Clear();
                }
            }
            catch (Exception e)
            {
                lock (failures) failures.Add($"mover: {e}");
            }
        }

        var threads = new List<Thread>();
        for (int i = 0; i < workers; i++)
        {
            int id = i;
            threads.Add(new Thread(() => Worker(id)));
        }
        threads.Add(new Thread(Mover));
        foreach (Thread t in threads)
            t.Start();
        foreach (Thread t in threads)
            t.Join();

        Assert.That(failures, Is.Empty);
        Assert.That(Interlocked.Read(ref isolations), Is.GreaterThan(0), "the mover isolated pages while the workers ran");
        TestMachines.AssertAuditClean(machine);
        foreach (VmProcess p in processes)
            p.Exit();
        TestMachines.AssertAuditClean(machine);
        Assert.That(Counts(machine, 0), Is.EqualTo((0L, 0L, 0L)));
        Assert.That(Counts(machine, 1), Is.EqualTo((0L, 0L, 0L)));
    }
}
