using Vmm.Memory;
using Vmm.Migration;
using Vmm.Mm;
using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Migration;

/// <summary>
/// The migration engine (Migration/MigrationEngine.cs): lists of isolated pages move to another node
/// byte-identical with every mapping following, one TLB flush per batch, Linux's passes, modes, ENOMEM
/// stop and counters; and the single-page path (AddressSpace.TryReplacePage) on top of it.
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Migration")]
public sealed class MigrationEngineTests
{
    private const int PageSize = 4096;

    /// <summary>
    /// Isolates the page at <paramref name="va"/> from its LRU list, as the engine expects of each page of
    /// <c>from</c> (draining the add batches when it is still in one). Only the test's thread moves
    /// pages, so the pfn read from the pagemap stays valid for the moment its reference is taken.
    /// </summary>
    private static long Isolate(Machine machine, VmProcess process, ulong va)
    {
        long pfn = process.GetPagemap(va).Pfn;
        machine.MemMap.GetPage(pfn);
        if (!machine.Lru.Isolate(pfn))
        {
            machine.Lru.DrainAll();
            Assert.That(machine.Lru.Isolate(pfn), Is.True, $"frame {pfn} at 0x{va:x} isolates after a drain");
        }
        machine.PutPage(pfn);
        return pfn;
    }

    /// <summary>
    /// Isolates the <paramref name="pages"/> consecutive pages from <paramref name="va"/> (see
    /// <see cref="Isolate"/>) and returns their frames in address order: the engine's <c>from</c> list.
    /// Precondition: every one of those pages is present.
    /// </summary>
    private static List<long> IsolateRange(Machine machine, VmProcess process, ulong va, int pages)
    {
        var from = new List<long>();
        for (int page = 0; page < pages; page++)
            from.Add(Isolate(machine, process, va + (ulong)(page * PageSize)));
        return from;
    }

    /// <summary>The engine's <c>allocate</c> callback: a new frame on <paramref name="node"/> only (<see cref="AllocOnNode"/>).</summary>
    private static Func<long, long> OnNode(Machine machine, int node) => _ => AllocOnNode(machine, node);

    private static byte PatternOf(int process, int page, int offset) => (byte)((process * 131) + (page * 7) + (offset * 13) + 1);

    private static void FillPattern(VmProcess p, int id, ulong va, int pages)
    {
        var buffer = new byte[PageSize];
        for (int page = 0; page < pages; page++)
        {
            for (int i = 0; i < PageSize; i++)
                buffer[i] = PatternOf(id, page, i);
            p.Write(va + (ulong)(page * PageSize), buffer);
        }
    }

    private static void AssertPattern(VmProcess p, int id, ulong va, int pages, string what)
    {
        var buffer = new byte[PageSize];
        for (int page = 0; page < pages; page++)
        {
            p.Read(va + (ulong)(page * PageSize), buffer);
            for (int i = 0; i < PageSize; i++)
            {
                if (buffer[i] != PatternOf(id, page, i))
                    Assert.Fail($"{what}: page {page} byte {i} is {buffer[i]}, expected {PatternOf(id, page, i)}");
            }
        }
    }

    [Test]
    public void Many_pages_of_several_processes_move_to_node_1_byte_identical_with_every_mapping_following()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        const int Private = 200, Forked = 100, Shared = 50, Hidden = 30;
        var processes = new List<VmProcess>();
        var privateVas = new List<ulong>();
        for (int id = 0; id < 3; id++)
        {
            VmProcess p = machine.CreateProcess(homeNode: 0);
            ulong va = p.Mmap(Private * PageSize);
            FillPattern(p, id, va, Private);
            processes.Add(p);
            privateVas.Add(va);
        }
        VmProcess parent = processes[0];
        ulong forkedVa = parent.Mmap(Forked * PageSize);
        FillPattern(parent, 10, forkedVa, Forked);
        Assert.That(parent.Mmap(0, Shared * PageSize, Protection.ReadWrite, MapFlags.Shared, out ulong sharedVa), Is.EqualTo(Errno.None));
        FillPattern(parent, 11, sharedVa, Shared);
        ulong hiddenVa = parent.Mmap(Hidden * PageSize);
        FillPattern(parent, 12, hiddenVa, Hidden);
        Assert.That(parent.Mprotect(hiddenVa, Hidden * PageSize, Protection.None), Is.EqualTo(Errno.None));
        VmProcess child = parent.Fork(); // shares the forked, shared and hidden pages (and process 0's private ones)

        var from = new List<long>();
        for (int id = 0; id < 3; id++)
            from.AddRange(IsolateRange(machine, processes[id], privateVas[id], Private));
        from.AddRange(IsolateRange(machine, parent, forkedVa, Forked));
        from.AddRange(IsolateRange(machine, parent, sharedVa, Shared));
        from.AddRange(IsolateRange(machine, parent, hiddenVa, Hidden));
        int total = from.Count;
        Assert.That(total, Is.GreaterThan(MigrationEngine.MaxBatch), "more than one batch");
        Assert.That(from.All(pfn => machine.Topology.NodeOf(pfn) == 0), "everything starts on node 0");

        int rc = machine.Migration.MigratePages(from, OnNode(machine, 1), null, MigrateMode.Sync, MigrateReason.Syscall, out int succeeded);

        Assert.That(rc, Is.Zero, "no page failed");
        Assert.That(succeeded, Is.EqualTo(total));
        Assert.That(from, Is.Empty, "the list keeps only the pages not migrated");
        Assert.That(parent.Mprotect(hiddenVa, Hidden * PageSize, Protection.Read), Is.EqualTo(Errno.None));
        Assert.That(child.Mprotect(hiddenVa, Hidden * PageSize, Protection.Read), Is.EqualTo(Errno.None));
        for (int id = 0; id < 3; id++)
            AssertPattern(processes[id], id, privateVas[id], Private, $"process {id}");
        foreach (VmProcess p in new[] { parent, child })
        {
            AssertPattern(p, 0, privateVas[0], Private, "process 0's pages in the child too");
            AssertPattern(p, 10, forkedVa, Forked, "pages shared by fork");
            AssertPattern(p, 11, sharedVa, Shared, "shared memory");
            AssertPattern(p, 12, hiddenVa, Hidden, "PROT_NONE pages");
        }
        foreach ((VmProcess p, ulong va, int pages) in new[]
                 {
                     (processes[1], privateVas[1], Private), (processes[2], privateVas[2], Private), (parent, forkedVa, Forked),
                     (parent, sharedVa, Shared), (parent, hiddenVa, Hidden), (parent, privateVas[0], Private),
                 })
        {
            for (int page = 0; page < pages; page++)
            {
                ulong address = va + (ulong)(page * PageSize);
                long pfn = p.GetPagemap(address).Pfn;
                Assert.That(machine.Topology.NodeOf(pfn), Is.EqualTo(1), $"0x{address:x} of pid {p.Pid} is on node 1");
                if (address < hiddenVa || address >= hiddenVa + Hidden * PageSize || p == parent)
                {
                    if (p == parent && (va == forkedVa || va == sharedVa || va == hiddenVa || va == privateVas[0]))
                        Assert.That(child.GetPagemap(address).Pfn, Is.EqualTo(pfn), "the child's mapping follows the page");
                }
            }
        }
        child.Write<byte>(forkedVa, 0xEE); // copy-on-write still works on a moved page
        Assert.That(parent.Read<byte>(forkedVa), Is.EqualTo(PatternOf(10, 0, 0)));
        child.Write<byte>(sharedVa, 0xEF);
        Assert.That(parent.Read<byte>(sharedVa), Is.EqualTo(0xEF), "still one shared page");
        Assert.That(machine.GetMigrationStats().Succeeded, Is.EqualTo(total));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_batch_of_512_pages_is_unmapped_with_one_TLB_flush()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(1024 * PageSize, fill: 0x3C, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        List<long> from = IsolateRange(machine, p, va, 1024);

        long flushes = TlbShootdown.Flushes;
        int rc = machine.Migration.MigratePages(from, OnNode(machine, 1), null, MigrateMode.Async, MigrateReason.Compaction, out int succeeded);
        long delta = TlbShootdown.Flushes - flushes;

        Assert.That((rc, succeeded), Is.EqualTo((0, 1024)));
        Assert.That(delta, Is.EqualTo(2), "1024 pages are two batches of 512, one flush each");
        Assert.That(p.Read<byte>(va + 1023 * PageSize + 7), Is.EqualTo(0x3C));
        TestMachines.AssertAuditClean(machine);
    }

    [TestCase(MigrateMode.Async)]
    [TestCase(MigrateMode.Sync)]
    public void A_pinned_page_fails_every_pass_and_stays_on_the_list_while_the_others_move(MigrateMode mode)
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(8 * PageSize, fill: 0x21, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        List<long> from = IsolateRange(machine, p, va, 8);
        long pinnedPfn = from[3];

        using (PinnedMemory pin = p.Pin(va + 3 * PageSize, PageSize, write: true))
        {
            int rc = machine.Migration.MigratePages(from, OnNode(machine, 1), null, mode, MigrateReason.Syscall, out int succeeded);
            Assert.That((rc, succeeded), Is.EqualTo((1, 7)), "one page not migrated, seven moved");
            Assert.That(from, Is.EqualTo(new[] { pinnedPfn }), "the pinned page stays on the list, still isolated");
            Assert.That(p.GetPagemap(va + 3 * PageSize).Pfn, Is.EqualTo(pinnedPfn), "mapped back to its frame");
            pin.GetSpan(0)[0] = 0x99;
            Assert.That(p.Read<byte>(va + 3 * PageSize), Is.EqualTo(0x99), "the pin still reaches the page the process uses");
            machine.Migration.PutbackMovablePages(from);
        }
        MigrationStats stats = machine.GetMigrationStats();
        Assert.That((stats.Succeeded, stats.Failed), Is.EqualTo((7L, 1L)), "pgmigrate_success / pgmigrate_fail");
        Assert.That(machine.ReadVmStat("pgmigrate_fail", out long fail), Is.EqualTo(Errno.None));
        Assert.That(fail, Is.EqualTo(1));
        for (int page = 0; page < 8; page++)
            Assert.That(machine.Topology.NodeOf(p.GetPagemap(va + (ulong)(page * PageSize)).Pfn), Is.EqualTo(page == 3 ? 0 : 1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void ASYNC_mode_skips_a_page_whose_lock_is_held()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4 * PageSize, fill: 0x42, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        List<long> from = IsolateRange(machine, p, va, 4);
        long locked = from[1];
        machine.PageLock.Lock(locked);
        int rc;
        try
        {
            rc = machine.Migration.MigratePages(from, OnNode(machine, 1), null, MigrateMode.Async, MigrateReason.Compaction, out _);
        }
        finally
        {
            machine.PageLock.Unlock(locked);
        }
        Assert.That(rc, Is.EqualTo(1));
        Assert.That(from, Is.EqualTo(new[] { locked }), "the locked page was skipped, never waited for");
        Assert.That(p.GetPagemap(va + PageSize).Pfn, Is.EqualTo(locked));
        machine.Migration.PutbackMovablePages(from);
        Assert.That(machine.GetMigrationStats().FailedByReason[MigrateReason.Compaction], Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void SYNC_mode_waits_for_a_page_whose_lock_is_held_until_it_is_released()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4 * PageSize, fill: 0x43, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        List<long> from = IsolateRange(machine, p, va, 4);
        long locked = from[2];
        machine.PageLock.Lock(locked);
        int rc = -1;
        var mover = new Thread(() => rc = machine.Migration.MigratePages(from, OnNode(machine, 1), null, MigrateMode.Sync, MigrateReason.Syscall, out _));
        mover.Start();
        bool finishedWhileLocked = mover.Join(TimeSpan.FromMilliseconds(300));
        machine.PageLock.Unlock(locked);
        Assert.That(mover.Join(TimeSpan.FromSeconds(30)), Is.True, "the mover finishes once the lock is released");
        Assert.That(finishedWhileLocked, Is.False, "SYNC waits for the lock instead of giving up");
        Assert.That(rc, Is.Zero);
        Assert.That(from, Is.Empty);
        Assert.That(machine.Topology.NodeOf(p.GetPagemap(va + 2 * PageSize).Pfn), Is.EqualTo(1));
        Assert.That(p.Read<byte>(va + 2 * PageSize + 9), Is.EqualTo(0x43));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void ENOMEM_from_allocate_stops_the_loop_and_leaves_the_rest_on_the_list()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(10 * PageSize, fill: 0x55, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        List<long> from = IsolateRange(machine, p, va, 10);
        long[] original = [.. from];
        int allocations = 0;
        Func<long, long> onNode1 = OnNode(machine, 1);
        int rc = machine.Migration.MigratePages(from, src => ++allocations <= 4 ? onNode1(src) : PageAllocator.NoPfn,
            null, MigrateMode.Async, MigrateReason.MemoryHotplug, out int succeeded);

        Assert.That(rc, Is.EqualTo(-(int)Errno.ENOMEM));
        Assert.That(succeeded, Is.EqualTo(4));
        Assert.That(allocations, Is.EqualTo(5), "the loop stopped at the first failed allocation");
        Assert.That(from, Is.EquivalentTo(original[4..]), "the pages not migrated stay on the list");
        for (int page = 0; page < 10; page++)
            Assert.That(machine.Topology.NodeOf(p.GetPagemap(va + (ulong)(page * PageSize)).Pfn), Is.EqualTo(page < 4 ? 1 : 0));
        machine.Migration.PutbackMovablePages(from);
        Assert.That(p.Read<byte>(va + 9 * PageSize), Is.EqualTo(0x55));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Unused_new_frames_go_back_through_free()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(2 * PageSize, fill: 0x56, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        var from = new List<long> { Isolate(machine, p, va), Isolate(machine, p, va + PageSize) };
        machine.PageLock.Lock(from[0]);
        var freed = new List<long>();
        int rc;
        try
        {
            rc = machine.Migration.MigratePages(from, OnNode(machine, 1), dst => { freed.Add(dst); machine.PutPage(dst); },
                MigrateMode.Async, MigrateReason.Compaction, out _);
        }
        finally
        {
            machine.PageLock.Unlock(from[0]);
        }
        Assert.That(rc, Is.EqualTo(1));
        Assert.That(freed, Has.Count.EqualTo(MigrationEngine.MaxPasses), "one new frame each pass the locked page was tried");
        machine.Migration.PutbackMovablePages(from);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Counters_are_kept_per_reason_and_in_vmstat()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(6 * PageSize, fill: 0x66, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        var from = new List<long> { Isolate(machine, p, va), Isolate(machine, p, va + PageSize) };
        machine.Migration.MigratePages(from, OnNode(machine, 1), null, MigrateMode.Sync, MigrateReason.Compaction, out _);
        from.AddRange([Isolate(machine, p, va + 2 * PageSize), Isolate(machine, p, va + 3 * PageSize), Isolate(machine, p, va + 4 * PageSize)]);
        machine.Migration.MigratePages(from, OnNode(machine, 1), null, MigrateMode.Async, MigrateReason.MempolicyMbind, out _);
        using (p.Pin(va + 5 * PageSize, 1, write: false))
        {
            from.Add(Isolate(machine, p, va + 5 * PageSize));
            machine.Migration.MigratePages(from, OnNode(machine, 1), null, MigrateMode.Async, MigrateReason.NumaMisplaced, out _);
            machine.Migration.PutbackMovablePages(from);
        }

        MigrationStats stats = machine.GetMigrationStats();
        Assert.That(stats.SucceededByReason[MigrateReason.Compaction], Is.EqualTo(2));
        Assert.That(stats.SucceededByReason[MigrateReason.MempolicyMbind], Is.EqualTo(3));
        Assert.That(stats.FailedByReason[MigrateReason.NumaMisplaced], Is.EqualTo(1));
        Assert.That(stats.SucceededByReason[MigrateReason.Syscall], Is.Zero);
        Assert.That(stats.SucceededByReason.Keys, Is.EquivalentTo(Enum.GetValues<MigrateReason>()), "every reason has its counters");
        Assert.That((stats.Succeeded, stats.Failed), Is.EqualTo((5L, 1L)));
        Assert.That(machine.ReadVmStat("pgmigrate_success", out long success), Is.EqualTo(Errno.None));
        Assert.That(success, Is.EqualTo(5));
        Assert.That(machine.GetVmStats().PgMigrateSuccess, Is.EqualTo(5));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_page_whose_last_mapping_went_away_while_isolated_is_freed_and_counted_as_done()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(PageSize, fill: 0x77, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        var from = new List<long> { Isolate(machine, p, va) };
        Assert.That(p.Munmap(va, PageSize), Is.EqualTo(Errno.None));
        int rc = machine.Migration.MigratePages(from, OnNode(machine, 1), null, MigrateMode.Sync, MigrateReason.Syscall, out int succeeded);
        Assert.That((rc, succeeded), Is.EqualTo((0, 1)));
        Assert.That(from, Is.Empty);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_writer_writing_during_moves_never_loses_a_write()
    {
        const int Pages = 32;
        int rounds = 40 * TestEnvironment.StressScale;
        using MachineWithRegion region = TestMachines.CreateWithRegion(Pages * PageSize, fill: 0, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        var shadow = new long[Pages];
        var failures = new System.Collections.Concurrent.ConcurrentQueue<string>();
        int moverDone = 0;
        long writes = 0;
        var writer = new Thread(() =>
        {
            long sequence = 0;
            while (Volatile.Read(ref moverDone) == 0 || sequence < 1000)
            {
                sequence++;
                int page = (int)(sequence % Pages);
                ulong address = va + (ulong)(page * PageSize) + (ulong)(sequence % 64 * 8);
                p.Write<long>(address, sequence);
                shadow[page] = sequence;
                long back = p.Read<long>(address);
                if (back != sequence)
                    failures.Enqueue($"wrote {sequence} at 0x{address:x}, read back {back}");
            }
            Interlocked.Exchange(ref writes, sequence);
        });
        writer.Start();
        int moved = 0;
        for (int round = 0; round < rounds; round++)
        {
            List<long> from = IsolateRange(machine, p, va, Pages);
            machine.Migration.MigratePages(from, OnNode(machine, (round + 1) % 2), null,
                round % 2 == 0 ? MigrateMode.Sync : MigrateMode.Async, MigrateReason.Syscall, out int succeeded);
            machine.Migration.PutbackMovablePages(from);
            moved += succeeded;
        }
        Volatile.Write(ref moverDone, 1);
        Assert.That(writer.Join(TimeSpan.FromSeconds(60)), Is.True);
        Assert.That(failures, Is.Empty);
        Assert.That(moved, Is.GreaterThan(0), "pages moved under the writer");
        for (int page = 0; page < Pages; page++)
        {
            long last = shadow[page];
            ulong address = va + (ulong)(page * PageSize) + (ulong)(last % 64 * 8);
            Assert.That(p.Read<long>(address), Is.EqualTo(last), $"page {page}'s last write survived every move");
        }
        TestContext.Out.WriteLine($"{writes} writes, {moved} page moves");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_KSM_page_moves_with_every_mapping_and_stays_merged()
    {
        using Machine machine = TestMachines.CreateForKsm();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(8 * PageSize);
        p.Fill(va, 8 * PageSize, 0x5A);
        Assert.That(p.Madvise(va, 8 * PageSize, Advice.Mergeable), Is.EqualTo(Errno.None));
        machine.Ksm!.RunFullScans(2);
        long kpfn = p.GetPagemap(va).Pfn;
        Assert.That(p.GetPagemap(va).Ksm, Is.True);
        Assert.That(machine.Topology.NodeOf(kpfn), Is.Zero);
        var from = new List<long> { Isolate(machine, p, va) };
        int rc = machine.Migration.MigratePages(from, OnNode(machine, 1), null, MigrateMode.Sync, MigrateReason.Syscall, out int succeeded);
        Assert.That((rc, succeeded), Is.EqualTo((0, 1)));
        long moved = p.GetPagemap(va).Pfn;
        Assert.That(machine.Topology.NodeOf(moved), Is.EqualTo(1));
        for (int page = 0; page < 8; page++)
        {
            PagemapEntry entry = p.GetPagemap(va + (ulong)(page * PageSize));
            Assert.That((entry.Pfn, entry.Ksm), Is.EqualTo((moved, true)), $"page {page} follows the KSM page and stays merged");
        }
        Assert.That(p.Read<byte>(va + 5 * PageSize + 3), Is.EqualTo(0x5A));
        p.Write<byte>(va, 1); // copy-on-write of the moved KSM page
        Assert.That(p.Read<byte>(va + PageSize), Is.EqualTo(0x5A));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Audit_reports_a_mapped_page_left_locked()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(PageSize, fill: 1, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        long pfn = p.GetPagemap(va).Pfn;
        machine.PageLock.Lock(pfn);
        Assert.That(machine.Audit(), Has.Some.Contains("still PG_locked"), "a leaked page lock (a migration that forgot one) is caught");
        machine.PageLock.Unlock(pfn);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Processes_that_unmap_fork_and_exit_while_their_pages_move_leave_nothing_behind()
    {
        const int Pages = 64;
        int rounds = 30 * TestEnvironment.StressScale;
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        for (int round = 0; round < rounds; round++)
        {
            VmProcess p = machine.CreateProcess();
            ulong va = p.Mmap(Pages * PageSize);
            p.Fill(va, Pages * PageSize, (byte)round);
            VmProcess child = p.Fork();
            List<long> from = IsolateRange(machine, p, va, Pages);
            using var go = new Barrier(2);
            var meddler = new Thread(() =>
            {
                go.SignalAndWait();
                Assert.That(p.Munmap(va + 8 * PageSize, 8 * PageSize), Is.EqualTo(Errno.None));
                child.Write<byte>(va, 1); // copy-on-write of a page that may be frozen: waits, then copies
                child.Exit();
                Assert.That(p.Munmap(va + 32 * PageSize, 16 * PageSize), Is.EqualTo(Errno.None));
            });
            meddler.Start();
            go.SignalAndWait();
            int rc = machine.Migration.MigratePages(from, OnNode(machine, round % 2 == 0 ? 1 : 0), null,
                round % 3 == 0 ? MigrateMode.Async : MigrateMode.Sync, MigrateReason.Syscall, out int succeeded);
            meddler.Join();
            Assert.That(rc, Is.GreaterThanOrEqualTo(0));
            Assert.That(succeeded + from.Count, Is.EqualTo(Pages), "every page moved, was freed under the engine, or is handed back");
            machine.Migration.PutbackMovablePages(from);
            for (int page = 0; page < Pages; page++)
            {
                if (page is >= 8 and < 16 or >= 32 and < 48)
                    continue;
                Assert.That(p.Read<byte>(va + (ulong)(page * PageSize) + 17), Is.EqualTo((byte)round), $"round {round} page {page}");
            }
            p.Exit();
            TestMachines.AssertAuditClean(machine);
        }
    }

    [Test]
    public void A_page_shared_by_three_processes_moves_to_another_node_and_stays_shared()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess a = machine.CreateProcess(homeNode: 0);
        ulong va = a.Mmap(2 * 4096);
        a.Fill(va, 8192, 0x5C);
        VmProcess b = a.Fork();
        VmProcess c = a.Fork();
        long pfn = a.GetPagemap(va).Pfn;
        Assert.That(machine.Topology.NodeOf(pfn), Is.Zero);
        Assert.That(a.Mm.TryReplacePage(va, 1), Is.EqualTo(Errno.None));
        long moved = a.GetPagemap(va).Pfn;
        Assert.That(moved, Is.Not.EqualTo(pfn));
        Assert.That(machine.Topology.NodeOf(moved), Is.EqualTo(1));
        Assert.That(new[] { b.GetPagemap(va).Pfn, c.GetPagemap(va).Pfn }, Is.All.EqualTo(moved), "every mapping follows the page");
        Assert.That(b.Read<byte>(va + 100), Is.EqualTo(0x5C));
        c.Write<byte>(va, 1); // copy-on-write still works on the moved page
        Assert.That(a.Read<byte>(va), Is.EqualTo(0x5C));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_shared_anonymous_page_moves_with_its_page_cache_entry()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        VmProcess a = machine.CreateProcess();
        Assert.That(a.Mmap(0, 4096, Protection.ReadWrite, MapFlags.Shared, out ulong va), Is.EqualTo(Errno.None));
        a.Write<int>(va, 5);
        VmProcess b = a.Fork();
        Assert.That(a.Mm.TryReplacePage(va, 1), Is.EqualTo(Errno.None));
        Assert.That(machine.Topology.NodeOf(b.GetPagemap(va).Pfn), Is.EqualTo(1));
        b.Write<int>(va, 6);
        Assert.That(a.Read<int>(va), Is.EqualTo(6), "still one shared page");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_PROT_NONE_page_stays_inaccessible_after_it_moves()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        p.Write<int>(va, 0x1111);
        Assert.That(p.Mprotect(va, 4096, Protection.None), Is.EqualTo(Errno.None));
        Assert.That(p.Mm.TryReplacePage(va, 1), Is.EqualTo(Errno.None));
        Assert.Throws<SegmentationFault>(() => p.Read<int>(va), "the restored PTE takes its protection from the VMA");
        TestMachines.AssertAuditClean(machine);
        Assert.That(p.Mprotect(va, 4096, Protection.Read), Is.EqualTo(Errno.None));
        Assert.That(p.Read<int>(va), Is.EqualTo(0x1111));
    }

    [Test]
    public void A_fork_while_a_page_is_under_migration_leaves_it_shared_copy_on_write()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess parent, ulong va, _) = region;
        parent.Write<int>(va, 0x11);
        long pfn = parent.GetPagemap(va).Pfn;
        Assert.That(parent.GetPagemap(va).Exclusive, Is.True);

        // The engine's steps, with a fork between the freeze and the commit.
        machine.MemMap.GetPage(pfn);
        machine.PageLock.Lock(pfn);
        Assert.That(machine.Rmap.TryToMigrate(pfn), Is.True);
        VmProcess child = parent.Fork();
        Assert.That(child.GetPagemap(va).Swapped, Is.True, "the child copied the migration entry");
        long newPfn = machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero, 1);
        MigrationEngine.CopyPage(machine, pfn, newPfn);
        machine.PageLock.Lock(newPfn); // as the engine does: both pages locked
        FinishMigration(machine, pfn, newPfn); // as the engine does: the new frame joins the LRU
        Assert.That(child.GetPagemap(va).Pfn, Is.EqualTo(newPfn), "both processes map the new frame");

        Assert.That(parent.GetPagemap(va).MapCount, Is.EqualTo(2));
        Assert.That(parent.GetPagemap(va).Exclusive, Is.False, "fork turned the exclusive entry into a shared one");
        parent.Write<int>(va, 0x22);
        Assert.That(child.Read<int>(va), Is.EqualTo(0x11), "copy-on-write keeps the child's view");
        TestMachines.AssertAuditClean(machine);
    }

    /// <summary>
    /// Waiters first: a thread that faults on a page the batch has already frozen is served at once.
    /// At the 100th allocation of a 300-page batch (the unmap step), a writer thread writes to the first
    /// page, which is frozen by then; the allocation waits until the writer sleeps on the migration
    /// entry. With the policy on, the batch is cut there: the write completes before the 101st frame is
    /// even allocated, in two flushed batches (100 pages, then 200); with it off (Linux's order), the
    /// write waits for all 300 pages to be unmapped, one flush. Every byte and the audit agree either way.
    /// </summary>
    [TestCase(true)]
    [TestCase(false)]
    public void A_writer_that_faults_on_a_frozen_page_cuts_the_batch_short_and_is_served_first(bool waitersFirst)
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        machine.Migration.WaitersFirst = waitersFirst;
        const int Pages = 300, WaiterAt = 100;
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap(Pages * PageSize);
        FillPattern(p, 1, va, Pages);
        List<long> from = IsolateRange(machine, p, va, Pages);

        int allocations = 0;
        int allocationsWhenWritten = -1;
        Thread? writer = null;
        long flushesBefore = machine.GetVmStats().TlbFlushes;
        int rc = machine.Migration.MigratePages(from, src =>
        {
            if (allocations == WaiterAt + 1 && waitersFirst)
            {
                // The second batch starts: the writer was woken when its page moved. Let it record before
                // this allocation is counted (a bounded wait: in Linux's order this point is reached only
                // after the write has completed anyway).
                writer!.Join(TimeSpan.FromSeconds(30));
            }
            if (++allocations == WaiterAt + 1)
            {
                long waits = machine.Migration.FaultsWaited;
                writer = new Thread(() =>
                {
                    p.Write<byte>(va, PatternOf(1, 0, 0)); // the same byte: the pattern still holds
                    Volatile.Write(ref allocationsWhenWritten, Volatile.Read(ref allocations));
                });
                writer.Start();
                // The writer has set PG_waiters on the frozen page once the wait is counted.
                SpinWait.SpinUntil(() => machine.Migration.FaultsWaited != waits, TimeSpan.FromSeconds(30));
                Assert.That(machine.Migration.FaultsWaited, Is.Not.EqualTo(waits), "the writer sleeps on the migration entry");
            }
            return AllocOnNode(machine, 1);
        }, null, MigrateMode.Sync, MigrateReason.Syscall, out int succeeded);
        writer!.Join();

        Assert.That((rc, succeeded, from.Count), Is.EqualTo((0, Pages, 0)));
        long flushes = machine.GetVmStats().TlbFlushes - flushesBefore;
        if (waitersFirst)
        {
            Assert.That(allocationsWhenWritten, Is.EqualTo(WaiterAt + 1), "the write completed before the rest of the batch was unmapped");
            Assert.That(flushes, Is.EqualTo(2), "the batch was cut in two, each flushed once");
        }
        else
        {
            Assert.That(allocationsWhenWritten, Is.EqualTo(Pages), "Linux's order: the write waits for the whole batch's unmap");
            Assert.That(flushes, Is.EqualTo(1));
        }
        for (int i = 0; i < Pages; i++)
            Assert.That(machine.Topology.NodeOf(p.GetPagemap(va + (ulong)(i * PageSize)).Pfn), Is.EqualTo(1), $"page {i} on node 1");
        AssertPattern(p, 1, va, Pages, "after the move");
        TestMachines.AssertAuditClean(machine);
    }
}
