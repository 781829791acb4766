using Vmm.Memory;
using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Hotplug;

/// <summary>
/// Offlines that cannot finish, and the dry run that predicts them: cancellation (EINTR, everything
/// undone, what moved stays readable), a pinned page with a bounded number of passes (EBUSY naming the
/// pin's process and address), a page table in ZONE_NORMAL (EBUSY at isolation, Unmovable), no memory to
/// move the pages to (ENOMEM; the dry run says NoMemory), and CanOffline changing nothing.
/// </summary>
[TestFixture]
[Category("Hotplug")]
[Category("Smoke")]
public sealed class OfflineFailureTests
{
    private const ulong Page = 4096;

    /// <summary>Blocks of <see cref="TestMachines.TwoNodes"/>: node 0 is blocks 0 (NORMAL) and 1 (MOVABLE), node 1 blocks 2 and 3.</summary>
    private const int NormalOfNode0 = 0, MovableOfNode0 = 1, NormalOfNode1 = 2, MovableOfNode1 = 3;

    /// <summary>An IProgress that runs its handler on the reporting thread (Progress&lt;T&gt; would post it elsewhere).</summary>
    private sealed class SyncProgress(Action<OfflineProgress> handler) : IProgress<OfflineProgress>
    {
        public List<OfflineProgress> Reports { get; } = [];

        public void Report(OfflineProgress value)
        {
            Reports.Add(value);
            handler(value);
        }
    }

    private static Machine NewMachine() => TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });

    private static bool InBlock(MemoryBlock block, long pfn) => pfn >= block.StartPfn && pfn < block.StartPfn + block.Frames;

    /// <summary>A process with <paramref name="pages"/> pages of random bytes; the address of one of them in <paramref name="block"/>.</summary>
    private static (VmProcess P, ulong Va, byte[] Data, ulong InBlockVa) Fill(Machine machine, MemoryBlock block, int pages)
    {
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap((ulong)pages * Page);
        byte[] data = WriteRandomPages(p, va, pages, seed: 7);
        for (int i = pages - 1; i >= 0; i--)
        {
            ulong a = va + (ulong)i * Page;
            if (InBlock(block, p.GetPagemap(a).Pfn))
                return (p, va, data, a);
        }
        Assert.Fail($"no page of the mapping is in {block}");
        return default;
    }

    private static int CountIn(MemoryBlock block, VmProcess p, ulong va, int pages) =>
        Enumerable.Range(0, pages).Count(i => InBlock(block, p.GetPagemap(va + (ulong)i * Page).Pfn));

    private static void AssertNoPageblockIsolated(Machine machine, MemoryBlock block)
    {
        for (long pfn = block.StartPfn; pfn < block.StartPfn + block.Frames; pfn += PageAllocator.PageblockFrames)
            Assert.That(machine.GetPageInfo(pfn).Migratetype, Is.Not.EqualTo(MigrateType.Isolate), $"pageblock at {pfn}");
        Assert.That(machine.GetMemoryBlock(block.Index).IsolatedFreeFrames, Is.Zero);
    }

    [Test]
    public void A_token_cancelled_before_the_offline_starts_returns_EINTR_and_nothing_happens()
    {
        using Machine machine = NewMachine();
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0);
        var heard = new List<MemoryNotifierEvent>();
        using IDisposable registration = machine.Hotplug.RegisterNotifier((e, _) => { heard.Add(e); return Errno.None; });
        using var cancel = new CancellationTokenSource();
        cancel.Cancel();

        OfflineResult result = block.Offline(null, cancel.Token);

        Assert.That(result.Error, Is.EqualTo(Errno.EINTR));
        Assert.That(result.PagesMoved, Is.Zero);
        Assert.That(heard, Is.Empty, "a pending signal stops the write before the chain hears anything");
        Assert.That(block.State, Is.EqualTo("online"));
    }

    [Test]
    public void A_token_cancelled_during_the_offline_returns_EINTR_undoes_the_isolation_and_the_pages_that_moved_stay_readable()
    {
        using Machine machine = NewMachine();
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0);
        (VmProcess p, ulong va, byte[] data, ulong pinnedVa) = Fill(machine, block, 600);
        int inBlock = CountIn(block, p, va, 600);
        var heard = new List<MemoryNotifierEvent>();
        using IDisposable registration = machine.Hotplug.RegisterNotifier((e, _) => { heard.Add(e); return Errno.None; });
        using var cancel = new CancellationTokenSource();
        var progress = new SyncProgress(_ => cancel.Cancel()); // a signal arrives after the first pass
        OfflineResult result;
        using (p.Pin(pinnedVa, Page, write: false)) // holds the block past the first pass
            result = block.Offline(progress, cancel.Token);

        Assert.That(result.Error, Is.EqualTo(Errno.EINTR));
        Assert.That(result.Passes, Is.EqualTo(1));
        Assert.That(progress.Reports, Has.Count.EqualTo(1));
        Assert.That(progress.Reports[0].PagesLeft, Is.EqualTo(1), "only the pinned page was left after the first pass");
        Assert.That(result.PagesMoved, Is.EqualTo(inBlock - 1), "every page but the pinned one moved, and stays moved");
        Assert.That(CountIn(block, p, va, 600), Is.EqualTo(1));
        Assert.That(heard, Is.EqualTo(new[] { MemoryNotifierEvent.GoingOffline, MemoryNotifierEvent.CancelOffline }));
        Assert.That(block.State, Is.EqualTo("online"));
        Assert.That(block.Zone, Is.EqualTo(ZoneType.Movable));
        AssertNoPageblockIsolated(machine, block);
        Assert.That(machine.Ksm!.IsOfflining, Is.False);
        Assert.That(ReadPages(p, va, 600), Is.EqualTo(data), "moved and unmoved pages read what was written");
        TestMachines.AssertAuditClean(machine);

        // The block takes allocations again.
        VmProcess q = machine.CreateProcess(homeNode: 0);
        ulong qva = q.Mmap(1500 * Page);
        WriteRandomPages(q, qva, 1500, seed: 8);
        Assert.That(CountIn(block, q, qva, 1500), Is.GreaterThan(0), "allocations land in the block again");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_pinned_page_makes_a_bounded_offline_give_up_with_EBUSY_naming_the_pid_and_address()
    {
        using Machine machine = NewMachine();
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0);
        (VmProcess p, ulong va, byte[] data, ulong pinnedVa) = Fill(machine, block, 300);
        long pinnedPfn = p.GetPagemap(pinnedVa).Pfn;
        machine.Hotplug.OfflineMigrateMaxPasses = 3;

        OfflineResult result;
        using (p.Pin(pinnedVa, Page, write: true))
            result = block.Offline();

        Assert.That(result.Error, Is.EqualTo(Errno.EBUSY));
        Assert.That(result.Passes, Is.EqualTo(3));
        OfflineBlocker blocker = result.Blockers.Single();
        Assert.That(blocker.Reason, Is.EqualTo(OfflineBlockReason.Pinned));
        Assert.That(blocker.Pfn, Is.EqualTo(pinnedPfn));
        Assert.That(blocker.Pid, Is.EqualTo(p.Pid));
        Assert.That(blocker.Address, Is.EqualTo(pinnedVa));
        Assert.That(blocker.Description, Does.Contain($"pid {p.Pid}").And.Contain($"0x{pinnedVa:x}"));
        Assert.That(block.State, Is.EqualTo("online"));
        AssertNoPageblockIsolated(machine, block);
        Assert.That(ReadPages(p, va, 300), Is.EqualTo(data));
        TestMachines.AssertAuditClean(machine);

        // Unpinned, the same bounded offline finishes.
        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));
        Assert.That(ReadPages(p, va, 300), Is.EqualTo(data));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void CanOffline_names_a_pinned_page_and_changes_nothing()
    {
        using Machine machine = NewMachine();
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0);
        (VmProcess p, ulong va, byte[] data, ulong pinnedVa) = Fill(machine, block, 300);
        Assert.That(block.CanOffline(out IReadOnlyList<OfflineBlocker> none), Is.True, "pages that can move keep nothing");
        Assert.That(none, Is.Empty);

        long[] pfns = [.. Enumerable.Range(0, 300).Select(i => p.GetPagemap(va + (ulong)i * Page).Pfn)];
        MemoryBlockInfo info = machine.GetMemoryBlock(MovableOfNode0);
        MigrationStats migrations = machine.GetMigrationStats();
        var heard = new List<MemoryNotifierEvent>();
        using IDisposable registration = machine.Hotplug.RegisterNotifier((e, _) => { heard.Add(e); return Errno.None; });
        using (p.Pin(pinnedVa, Page, write: false))
        {
            Assert.That(block.CanOffline(out IReadOnlyList<OfflineBlocker> blockers), Is.False);
            OfflineBlocker blocker = blockers.Single();
            Assert.That(blocker.Reason, Is.EqualTo(OfflineBlockReason.Pinned));
            Assert.That((blocker.Pfn, blocker.Pid, blocker.Address), Is.EqualTo((p.GetPagemap(pinnedVa).Pfn, p.Pid, pinnedVa)));
        }
        Assert.That(heard, Is.Empty, "a dry run tells no notifier");
        Assert.That(Enumerable.Range(0, 300).Select(i => p.GetPagemap(va + (ulong)i * Page).Pfn), Is.EqualTo(pfns), "no page moved");
        Assert.That(machine.GetMemoryBlock(MovableOfNode0), Is.EqualTo(info));
        Assert.That(machine.GetMigrationStats().Succeeded, Is.EqualTo(migrations.Succeeded));
        Assert.That(block.State, Is.EqualTo("online"));
        Assert.That(ReadPages(p, va, 300), Is.EqualTo(data));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_page_table_in_ZONE_NORMAL_is_an_unmovable_blocker_and_the_offline_fails_at_isolation()
    {
        using Machine machine = NewMachine();
        MemoryBlock normal = machine.Hotplug.GetBlock(NormalOfNode0);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap(64 * Page);
        WriteRandomPages(p, va, 64, seed: 9); // page tables come from node 0's ZONE_NORMAL: block 0
        var heard = new List<MemoryNotifierEvent>();
        using IDisposable registration = machine.Hotplug.RegisterNotifier((e, _) => { heard.Add(e); return Errno.None; });

        Assert.That(normal.CanOffline(out IReadOnlyList<OfflineBlocker> blockers), Is.False);
        Assert.That(blockers, Is.Not.Empty);
        Assert.That(blockers.All(b => b.Reason == OfflineBlockReason.Unmovable), Is.True, string.Join("; ", blockers));
        Assert.That(blockers.All(b => machine.GetPageInfo(b.Pfn).Flags.HasFlag(PageFlags.Table)), Is.True, "each blocker is a page table");

        OfflineResult result = normal.Offline();

        Assert.That(result.Error, Is.EqualTo(Errno.EBUSY));
        Assert.That((result.Passes, result.PagesMoved), Is.EqualTo((0, 0L)), "isolation refused before any pass");
        OfflineBlocker blocker = result.Blockers.Single();
        Assert.That(blocker.Reason, Is.EqualTo(OfflineBlockReason.Unmovable));
        Assert.That(machine.GetPageInfo(blocker.Pfn).Flags.HasFlag(PageFlags.Table), Is.True, blocker.Description);
        Assert.That(heard, Is.Empty, "isolation fails before MEM_GOING_OFFLINE");
        Assert.That(normal.State, Is.EqualTo("online"));
        AssertNoPageblockIsolated(machine, normal);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void With_no_memory_elsewhere_the_dry_run_says_NoMemory_and_the_offline_returns_ENOMEM_undone()
    {
        using Machine machine = NewMachine();
        // Node 1 goes away: node 0 is all there is, so the movable block's pages could only go to its own
        // NORMAL block. Fill node 0 almost full.
        Assert.That(machine.Hotplug.GetBlock(MovableOfNode1).Offline().Error, Is.EqualTo(Errno.None));
        Assert.That(machine.Hotplug.GetBlock(NormalOfNode1).Offline().Error, Is.EqualTo(Errno.None));
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode0);
        int pages = (int)machine.GetStats().AllFreePages - 40; // room for the page tables, and a few frames over
        VmProcess p = machine.CreateProcess(homeNode: 0);
        ulong va = p.Mmap((ulong)pages * Page);
        byte[] data = WriteRandomPages(p, va, pages, seed: 10);
        Assert.That(machine.GetMemoryBlock(MovableOfNode0).FreeFrames, Is.Zero, "the movable block is full");

        Assert.That(block.CanOffline(out IReadOnlyList<OfflineBlocker> blockers), Is.False);
        OfflineBlocker noMemory = blockers.Single(b => b.Reason == OfflineBlockReason.NoMemory);
        Assert.That(noMemory.Pfn, Is.EqualTo(-1));
        Assert.That(noMemory.Description, Does.Match($@"^\d+ pages in use in memory{block.Index}, \d+ free frames to move them to$"));

        OfflineResult first = block.Offline();
        Assert.That(first.Error, Is.EqualTo(Errno.ENOMEM), string.Join("; ", first.Blockers));
        Assert.That(first.PagesMoved, Is.LessThan(block.Frames), "the few free frames elsewhere took what they could");
        Assert.That(block.State, Is.EqualTo("online"));
        AssertNoPageblockIsolated(machine, block);
        Assert.That(ReadPages(p, va, pages), Is.EqualTo(data));

        // Now nothing can move at all.
        OfflineResult second = block.Offline();
        Assert.That(second.Error, Is.EqualTo(Errno.ENOMEM));
        Assert.That(second.PagesMoved, Is.Zero);
        Assert.That(second.Passes, Is.EqualTo(1), "a pass that moves nothing for want of memory ends it");
        Assert.That(block.State, Is.EqualTo("online"));
        Assert.That(ReadPages(p, va, pages), Is.EqualTo(data));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void CanOffline_of_a_block_that_is_not_online_says_so()
    {
        using Machine machine = NewMachine();
        MemoryBlock block = machine.Hotplug.GetBlock(MovableOfNode1);
        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));
        Assert.That(block.CanOffline(out IReadOnlyList<OfflineBlocker> blockers), Is.False);
        Assert.That(blockers.Single().Reason, Is.EqualTo(OfflineBlockReason.NotOnline));
        Assert.That(block.Offline().Error, Is.EqualTo(Errno.EINVAL), "offline of an offline block");
    }
}
