using Vmm.Memory;

namespace Vmm.Tests.Migration;

/// <summary>
/// The movable_operations contract: frames of an owner outside the LRU lists are isolated by asking the
/// owner, moved by the owner's migrate callback (EAGAIN retried, other errors put back), put back to it,
/// and finished by the VM when the owner frees one while isolated. Driven through the engine directly
/// and through memory offline.
/// </summary>
[Category("Compaction")]
[Category("Migration")]
public class MovableOperationsTests
{
    private const int Page = 4096;

    /// <summary>The movable block of node 0 of <see cref="TestMachines.TwoNodes"/>.</summary>
    private const int MovableBlockOfNode0 = 1;

    /// <summary>A scripted owner: it keeps a byte pattern per page and checks it after every move.</summary>
    private sealed class TestOwner(Machine machine) : MovableOperations
    {
        private readonly Lock _lock = new();

        /// <summary>Its frames by page number (the owner's own structure).</summary>
        public Dictionary<int, long> Frames { get; } = [];

        public HashSet<long> Refused { get; } = [];

        /// <summary>Answers of the migrate callback, in order; empty: Errno.None.</summary>
        public Queue<Errno> MigrateAnswers { get; } = new();

        public List<(long New, long Old)> Migrations { get; } = [];

        public List<long> Putbacks { get; } = [];

        public List<long> Isolations { get; } = [];

        public Action<long, long>? DuringMigrate { get; set; }

        /// <summary>Called in the migrate callback once the owner points at the new frame.</summary>
        public Action<long>? AfterSwitch { get; set; }

        public int Allocate(int count, int node = -1)
        {
            for (int i = 0; i < count; i++)
            {
                Assert.That(machine.MovablePages.AllocatePage(this, out long pfn, node), Is.EqualTo(Errno.None));
                int index = Frames.Count;
                lock (_lock)
                    Frames[index] = pfn;
                machine.MovablePages.Write(this, pfn, 0, Pattern(index));
            }
            return count;
        }

        public static byte[] Pattern(int index)
        {
            var bytes = new byte[Page];
            new Random(index + 1).NextBytes(bytes);
            return bytes;
        }

        public void AssertContents()
        {
            var buffer = new byte[Page];
            foreach ((int index, long pfn) in Frames)
            {
                machine.MovablePages.Read(this, pfn, 0, buffer);
                Assert.That(buffer, Is.EqualTo(Pattern(index)), $"page {index} (frame {pfn}) keeps its bytes");
            }
        }

        protected internal override bool IsolatePage(long pfn, IsolateMode mode)
        {
            lock (_lock)
            {
                Isolations.Add(pfn);
                return !Refused.Contains(pfn);
            }
        }

        protected internal override Errno MigratePage(long newPfn, long oldPfn, MigrateMode mode)
        {
            DuringMigrate?.Invoke(newPfn, oldPfn);
            lock (_lock)
            {
                Migrations.Add((newPfn, oldPfn));
                Errno answer = MigrateAnswers.Count > 0 ? MigrateAnswers.Dequeue() : Errno.None;
                if (answer != Errno.None)
                    return answer;
                machine.MovablePages.CopyPage(newPfn, oldPfn);
                int index = Frames.Single(f => f.Value == oldPfn).Key;
                Frames[index] = newPfn;
                AfterSwitch?.Invoke(newPfn);
                return Errno.None;
            }
        }

        protected internal override void PutbackPage(long pfn)
        {
            lock (_lock)
                Putbacks.Add(pfn);
        }
    }

    private static bool Isolate(Machine machine, long pfn)
    {
        Assert.That(machine.MemMap.TryGetPageUnlessZero(pfn), Is.True, "the test holds a reference while it isolates");
        try
        {
            return machine.Migration.IsolatePage(pfn, IsolateMode.None);
        }
        finally
        {
            machine.PutPage(pfn);
        }
    }

    private static int Migrate(Machine machine, List<long> list, out int succeeded, MigrateMode mode = MigrateMode.Sync) =>
        machine.Migration.MigratePages(list, _ => machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero, 1),
            null, mode, MigrateReason.Compaction, out succeeded);

    [Test]
    public void An_allocated_frame_carries_its_owners_tag_and_reads_back_what_the_owner_wrote()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        var owner = new TestOwner(machine);
        owner.Allocate(3);
        long pfn = owner.Frames[1];

        PageInfo info = machine.GetPageInfo(pfn);
        Assert.That(info.Flags & PageFlags.Movable, Is.EqualTo(PageFlags.Movable), "GetPageInfo reports the MOVABLE tag as PG_movable");
        Assert.That(machine.MemMap.RawFlags(pfn) & PageFlags.Movable, Is.EqualTo(PageFlags.None), "the flag itself is never stored");
        Assert.That(info.RefCount, Is.EqualTo(1), "the owner's one reference");
        Assert.That(owner.PageCount, Is.EqualTo(3));
        owner.AssertContents();
        var part = new byte[16];
        machine.MovablePages.Read(owner, pfn, 100, part);
        Assert.That(part, Is.EqualTo(TestOwner.Pattern(1)[100..116]), "a read at an offset");
        TestMachines.AssertAuditClean(machine);

        foreach (long frame in owner.Frames.Values)
            machine.MovablePages.FreePage(owner, frame);
        Assert.That(owner.PageCount, Is.Zero);
        Assert.That(machine.GetPageInfo(pfn).RefCount, Is.Zero, "freed");
        Assert.That(machine.GetPageInfo(pfn).Flags & PageFlags.Movable, Is.EqualTo(PageFlags.None), "and untagged");
        Assert.That(machine.Mappings.Find<MovableOperations>(owner.Handle), Is.Null, "the last frame unregistered the owner");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void MigratePages_moves_isolated_pages_through_their_owner_and_frees_the_old_frames()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        var owner = new TestOwner(machine);
        owner.Allocate(40, node: 0);
        List<long> old = [.. owner.Frames.Values];
        List<long> list = machine.Migration.RentList();
        foreach (long pfn in old)
        {
            Assert.That(Isolate(machine, pfn), Is.True);
            list.Add(pfn);
        }
        Assert.That(machine.MemMap.TestFlag(old[0], PageFlags.Isolated), Is.True, "the VM sets PG_isolated");
        Assert.That(machine.MemMap.RefCount(old[0]), Is.EqualTo(2), "the isolation holds a reference");

        int rc = Migrate(machine, list, out int succeeded);
        machine.Migration.PutbackMovablePages(list);
        machine.Migration.ReturnList(list);

        Assert.That(rc, Is.Zero);
        Assert.That(succeeded, Is.EqualTo(40));
        Assert.That(owner.Migrations, Has.Count.EqualTo(40));
        Assert.That(owner.Putbacks, Is.Empty);
        foreach (long pfn in owner.Frames.Values)
        {
            Assert.That(machine.Topology.NodeOf(pfn), Is.EqualTo(1), "moved to the target node");
            Assert.That(machine.GetPageInfo(pfn).Flags & (PageFlags.Movable | PageFlags.Isolated | PageFlags.Lru), Is.EqualTo(PageFlags.Movable),
                "the new frame carries the tag, not PG_isolated, and joined no LRU list");
            Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(1), "the owner's reference moved with it");
        }
        foreach (long pfn in old)
            Assert.That(machine.GetPageInfo(pfn).RefCount, Is.Zero, "the old frames were freed");
        owner.AssertContents();
        Assert.That(owner.PageCount, Is.EqualTo(40), "a move does not change the owner's count");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void The_owner_may_use_its_new_frame_from_another_thread_as_soon_as_it_switched_to_it()
    {
        // The owner's other threads find the new frame through the owner's own structure the moment the
        // callback switched to it, and read it without a lock (MovablePages.Read checks the tag). The
        // compaction soak's hour met an owner thread that did so before the VM had tagged the frame.
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        var owner = new TestOwner(machine);
        owner.Allocate(4, node: 0);
        var seen = new List<string>();
        owner.AfterSwitch = newPfn =>
        {
            var buffer = new byte[Page];
            var reader = new Thread(() =>
            {
                try
                {
                    machine.MovablePages.Read(owner, newPfn, 0, buffer);
                    lock (seen)
                        seen.Add("read");
                }
                catch (Exception e)
                {
                    lock (seen)
                        seen.Add(e.GetType().Name + ": " + e.Message);
                }
            });
            reader.Start();
            reader.Join();
        };
        List<long> list = machine.Migration.RentList();
        foreach (long pfn in owner.Frames.Values)
        {
            Assert.That(Isolate(machine, pfn), Is.True);
            list.Add(pfn);
        }
        int rc = Migrate(machine, list, out int succeeded);
        machine.Migration.PutbackMovablePages(list);
        machine.Migration.ReturnList(list);

        Assert.That(seen, Is.EqualTo(Enumerable.Repeat("read", 4)), "every read of a new frame the owner switched to succeeded");
        Assert.That(rc, Is.Zero);
        Assert.That(succeeded, Is.EqualTo(4));
        owner.AssertContents();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void An_owner_that_refuses_isolation_keeps_its_page_and_the_offline_names_it()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        machine.Hotplug.OfflineMigrateMaxPasses = 3;
        var owner = new TestOwner(machine);
        owner.Allocate(64, node: 0);
        MemoryBlock block = machine.Hotplug.GetBlock(MovableBlockOfNode0);
        long refused = owner.Frames.Values.First(pfn => machine.Topology.BlockOf(pfn) == block.Index);
        owner.Refused.Add(refused);

        Assert.That(Isolate(machine, refused), Is.False, "the owner said no");
        Assert.That(machine.MemMap.TestFlag(refused, PageFlags.Isolated), Is.False);
        OfflineResult result = block.Offline();

        Assert.That(result.Error, Is.EqualTo(Errno.EBUSY));
        Assert.That(result.Blockers.Select(b => (b.Pfn, b.Reason)), Does.Contain((refused, OfflineBlockReason.MovableRefused)),
            "the blockers name the page its owner would not let go");
        Assert.That(owner.Migrations.Select(m => m.Old), Does.Not.Contain(refused), "it was never migrated");
        Assert.That(owner.Frames.Values, Does.Contain(refused));
        Assert.That(result.PagesMoved, Is.GreaterThan(0), "the others of the block moved");
        owner.AssertContents();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_migration_the_owner_answers_EAGAIN_is_retried_until_it_succeeds()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        var owner = new TestOwner(machine);
        owner.Allocate(1, node: 0);
        long old = owner.Frames[0];
        owner.MigrateAnswers.Enqueue(Errno.EAGAIN);
        owner.MigrateAnswers.Enqueue(Errno.EAGAIN);
        List<long> list = [old];
        Assert.That(Isolate(machine, old), Is.True);

        int rc = Migrate(machine, list, out int succeeded);

        Assert.That(rc, Is.Zero);
        Assert.That(succeeded, Is.EqualTo(1));
        Assert.That(list, Is.Empty);
        Assert.That(owner.Migrations, Has.Count.EqualTo(3), "two EAGAINs, then the move");
        Assert.That(owner.Migrations.Select(m => m.Old), Is.All.EqualTo(old));
        Assert.That(owner.Frames[0], Is.Not.EqualTo(old));
        owner.AssertContents();
        TestMachines.AssertAuditClean(machine);
    }

    /// <summary>
    /// ASYNC: one call, no retry. SYNC (migrate_pages_sync, as Linux): the batched ASYNC phase's failures
    /// are retried once alone in SYNC mode, where a permanent error is final.
    /// </summary>
    [TestCase(MigrateMode.Async, 1)]
    [TestCase(MigrateMode.Sync, 2)]
    public void A_permanent_error_is_not_retried_and_the_page_goes_back_to_its_owner_intact(MigrateMode mode, int calls)
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        var owner = new TestOwner(machine);
        owner.Allocate(2, node: 0);
        long failing = owner.Frames[0];
        owner.MigrateAnswers.Enqueue(Errno.EIO);
        owner.MigrateAnswers.Enqueue(Errno.EIO);
        List<long> list = [failing];
        Assert.That(Isolate(machine, failing), Is.True);
        long freeBefore = machine.GetStats().AllFreePages;

        int rc = Migrate(machine, list, out int succeeded, mode);

        Assert.That(rc, Is.EqualTo(1), "one page failed");
        Assert.That(succeeded, Is.Zero);
        Assert.That(list, Is.EqualTo(new[] { failing }), "it is left on the list for the putback");
        Assert.That(owner.Migrations, Has.Count.EqualTo(calls), "a permanent error is not retried within a phase");
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore), "the new frame was given back");
        Assert.That(machine.MemMap.TestFlag(failing, PageFlags.Isolated), Is.True, "still isolated until the putback");

        machine.Migration.PutbackMovablePages(list);
        Assert.That(owner.Putbacks, Is.EqualTo(new[] { failing }), "putback_page was called");
        Assert.That(machine.MemMap.TestFlag(failing, PageFlags.Isolated), Is.False, "the VM cleared PG_isolated");
        Assert.That(machine.MemMap.RefCount(failing), Is.EqualTo(1), "the isolation's reference is gone");
        Assert.That(owner.Frames[0], Is.EqualTo(failing));
        owner.AssertContents();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_page_put_back_without_a_migration_goes_back_to_its_owner()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        var owner = new TestOwner(machine);
        owner.Allocate(1);
        long pfn = owner.Frames[0];
        List<long> list = machine.Migration.RentList();
        Assert.That(Isolate(machine, pfn), Is.True);
        Assert.That(Isolate(machine, pfn), Is.False, "an isolated page cannot be isolated twice");
        Assert.That(owner.Isolations, Has.Count.EqualTo(1), "the owner is not asked twice");
        list.Add(pfn);

        machine.Migration.PutbackMovablePages(list);
        machine.Migration.ReturnList(list);

        Assert.That(owner.Putbacks, Is.EqualTo(new[] { pfn }));
        Assert.That(machine.GetPageInfo(pfn).Flags & (PageFlags.Isolated | PageFlags.Movable), Is.EqualTo(PageFlags.Movable));
        Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_page_its_owner_freed_while_isolated_counts_as_moved_and_is_freed()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        var owner = new TestOwner(machine);
        owner.Allocate(2);
        long pfn = owner.Frames[0];
        List<long> list = [pfn];
        Assert.That(Isolate(machine, pfn), Is.True);

        machine.MovablePages.FreePage(owner, pfn);
        owner.Frames.Remove(0);
        Assert.That(owner.PageCount, Is.EqualTo(1));
        Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(1), "the isolation still holds it");
        int rc = Migrate(machine, list, out int succeeded);

        Assert.That(rc, Is.Zero);
        Assert.That(succeeded, Is.EqualTo(1), "counted as moved, as Linux does");
        Assert.That(list, Is.Empty);
        Assert.That(owner.Migrations, Is.Empty, "nothing to ask the owner");
        Assert.That(machine.GetPageInfo(pfn).RefCount, Is.Zero, "the frame is free");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_page_its_owner_freed_while_isolated_is_freed_by_the_putback()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        var owner = new TestOwner(machine);
        owner.Allocate(1);
        long pfn = owner.Frames[0];
        List<long> list = [pfn];
        Assert.That(Isolate(machine, pfn), Is.True);
        machine.MovablePages.FreePage(owner, pfn);

        machine.Migration.PutbackMovablePages(list);

        Assert.That(owner.Putbacks, Is.Empty, "the owner let it go: it is not asked");
        Assert.That(machine.GetPageInfo(pfn).RefCount, Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Offline_moves_a_blocks_movable_pages_through_their_owner()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        var owner = new TestOwner(machine);
        owner.Allocate(600, node: 0);
        MemoryBlock block = machine.Hotplug.GetBlock(MovableBlockOfNode0);
        int inBlock = owner.Frames.Values.Count(pfn => machine.Topology.BlockOf(pfn) == block.Index);
        Assert.That(inBlock, Is.GreaterThan(500), "movable allocations fill ZONE_MOVABLE first");

        OfflineResult result = block.Offline();

        Assert.That(result.Error, Is.EqualTo(Errno.None), string.Join("; ", result.Blockers));
        Assert.That(result.PagesMoved, Is.EqualTo(inBlock));
        Assert.That(owner.Frames.Values.Count(pfn => machine.Topology.BlockOf(pfn) == block.Index), Is.Zero);
        Assert.That(machine.GetMigrationStats().SucceededByReason[MigrateReason.MemoryHotplug], Is.EqualTo(inBlock));
        owner.AssertContents();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_block_holding_movable_pages_in_ZONE_NORMAL_can_be_isolated_for_offline()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false, MovableBlocksPerNode = 0 });
        var owner = new TestOwner(machine);
        owner.Allocate(200, node: 0);
        MemoryBlock block = machine.Hotplug.GetBlock(owner.Frames.Values.GroupBy(machine.Topology.BlockOf).MaxBy(g => g.Count())!.Key);
        Assert.That(block.Zone, Is.EqualTo(ZoneType.Normal));

        Assert.That(block.CanOffline(out IReadOnlyList<OfflineBlocker> blockers), Is.True, string.Join("; ", blockers));
        OfflineResult result = block.Offline();

        Assert.That(result.Error, Is.EqualTo(Errno.None), string.Join("; ", result.Blockers));
        Assert.That(owner.Frames.Values.Count(pfn => machine.Topology.BlockOf(pfn) == block.Index), Is.Zero);
        owner.AssertContents();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Misuse_throws_the_usual_exceptions_and_changes_nothing()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        using Machine other = TestMachines.Create(TestMachines.TwoNodes);
        var owner = new TestOwner(machine);
        var stranger = new TestOwner(machine);
        owner.Allocate(1);
        stranger.Allocate(1);
        long pfn = owner.Frames[0];
        var buffer = new byte[8];

        Assert.Throws<ArgumentNullException>(() => machine.MovablePages.AllocatePage(null!, out _));
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.MovablePages.AllocatePage(owner, out _, node: 7));
        Assert.Throws<ArgumentException>(() => other.MovablePages.AllocatePage(owner, out _), "an owner belongs to one machine");
        Assert.Throws<ArgumentException>(() => machine.MovablePages.FreePage(stranger, pfn), "not its frame");
        Assert.Throws<ArgumentException>(() => machine.MovablePages.Read(stranger, pfn, 0, buffer));
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.MovablePages.Read(owner, pfn, Page - 4, buffer));
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.MovablePages.Write(owner, pfn, -1, buffer));
        Assert.Throws<InvalidOperationException>(() => machine.MovablePages.CopyPage(stranger.Frames[0], pfn), "outside a migrate callback");
        Assert.That(machine.MovablePages.AllocatePage(owner, out long second), Is.EqualTo(Errno.None));
        machine.MovablePages.FreePage(owner, second);
        Assert.Throws<ArgumentException>(() => machine.MovablePages.FreePage(owner, second), "freed twice");

        Assert.That(owner.PageCount, Is.EqualTo(1));
        owner.AssertContents();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_callback_that_frees_its_own_page_gets_an_exception_after_the_migration_left_everything_consistent()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
        var owner = new TestOwner(machine);
        owner.Allocate(2, node: 0);
        long pfn = owner.Frames[0];
        owner.DuringMigrate = (_, old) => machine.MovablePages.FreePage(owner, old);
        List<long> list = [pfn];
        Assert.That(Isolate(machine, pfn), Is.True);

        Assert.Throws<InvalidOperationException>(() => Migrate(machine, list, out _), "it would wait for its own page lock");

        Assert.That(list, Is.EqualTo(new[] { pfn }), "the page failed and is left for the putback");
        machine.Migration.PutbackMovablePages(list);
        Assert.That(owner.Putbacks, Is.EqualTo(new[] { pfn }));
        Assert.That(owner.Frames[0], Is.EqualTo(pfn));
        owner.AssertContents();
        TestMachines.AssertAuditClean(machine);
    }
}
