using Vmm.Memory;
using Vmm.Mm;
using static Vmm.Tests.Ksm.KsmTestKit;

namespace Vmm.Tests.Mm;

/// <summary>
/// Long-term pins (FOLL_LONGTERM, Mm/AddressSpace.LongtermPin.cs): a page in ZONE_MOVABLE is moved out of
/// it before it is pinned, contents and sharing kept; a short-term pin moves nothing; a long-term pin that
/// cannot move a page fails with nothing pinned; Audit checks that no live long-term pin holds a page in
/// ZONE_MOVABLE.
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Migration")]
public sealed class LongtermPinTests
{
    private const int PageSize = 4096;

    /// <summary>2 nodes of 16 MiB in 8 MiB blocks: on each node one block of ZONE_NORMAL and one of ZONE_MOVABLE.</summary>
    private static MachineOptions WithMovable => TestMachines.TwoNodes with { MovableBlocksPerNode = 1 };

    private static byte PatternOf(int page, int offset) => (byte)((page * 7) + (offset * 13) + 1);

    /// <summary>A process on node 0 with <paramref name="pages"/> patterned pages, all in ZONE_MOVABLE (asserted).</summary>
    private static (VmProcess P, ulong Va) MapPatternInMovable(Machine machine, int pages, MapFlags flags = MapFlags.Private)
    {
        VmProcess p = machine.CreateProcess(homeNode: 0);
        Assert.That(p.Mmap(0, (ulong)pages * PageSize, Protection.ReadWrite, flags, out ulong va), Is.EqualTo(Errno.None));
        WritePattern(p, va, pages);
        for (int page = 0; page < pages; page++)
            Assert.That(ZoneAt(machine, p, va, page), Is.EqualTo(ZoneType.Movable), $"page {page} starts in ZONE_MOVABLE (user pages try it first)");
        return (p, va);
    }

    private static void WritePattern(VmProcess p, ulong va, int pages)
    {
        var buffer = new byte[PageSize];
        for (int page = 0; page < pages; page++)
        {
            for (int i = 0; i < PageSize; i++)
                buffer[i] = PatternOf(page, i);
            p.Write(va + (ulong)(page * PageSize), buffer);
        }
    }

    private static void AssertPattern(ReadOnlySpan<byte> bytes, int page, string what)
    {
        for (int i = 0; i < bytes.Length; i++)
        {
            if (bytes[i] != PatternOf(page, i))
                Assert.Fail($"{what}: page {page} byte {i} is {bytes[i]}, expected {PatternOf(page, i)}");
        }
    }

    private static void AssertPattern(VmProcess p, ulong va, int pages, string what)
    {
        var buffer = new byte[PageSize];
        for (int page = 0; page < pages; page++)
        {
            p.Read(va + (ulong)(page * PageSize), buffer);
            AssertPattern(buffer, page, what);
        }
    }

    private static ZoneType ZoneAt(Machine machine, VmProcess p, ulong va, int page) =>
        machine.GetPageInfo(p.GetPagemap(va + (ulong)(page * PageSize)).Pfn).Zone;

    private static long LongtermPinMoves(Machine machine) => machine.GetMigrationStats().SucceededByReason[MigrateReason.LongtermPin];

    private static long LongtermPinFailures(Machine machine) => machine.GetMigrationStats().FailedByReason[MigrateReason.LongtermPin];

    [Test]
    public void A_long_term_pin_moves_pages_out_of_ZONE_MOVABLE_with_their_contents_intact()
    {
        const int Pages = 64;
        using Machine machine = TestMachines.Create(WithMovable);
        (VmProcess p, ulong va) = MapPatternInMovable(machine, Pages);
        long[] before = Enumerable.Range(0, Pages).Select(i => p.GetPagemap(va + (ulong)(i * PageSize)).Pfn).ToArray();

        using (PinnedMemory pin = p.Pin(va, Pages * PageSize, write: true, longTerm: true))
        {
            Assert.That(pin.IsLongTerm, Is.True);
            Assert.That(pin.PageCount, Is.EqualTo(Pages));
            for (int page = 0; page < Pages; page++)
            {
                PagemapEntry entry = p.GetPagemap(va + (ulong)(page * PageSize));
                Assert.That(entry.Pfn, Is.EqualTo(pin.FrameOf(page)), $"page {page}: the process maps the pinned frame");
                Assert.That(entry.Pfn, Is.Not.EqualTo(before[page]), $"page {page} moved to a new frame");
                Assert.That(machine.GetPageInfo(entry.Pfn).Zone, Is.EqualTo(ZoneType.Normal), $"page {page} now lies in ZONE_NORMAL");
                Assert.That(machine.GetPageInfo(entry.Pfn).Node, Is.Zero, $"page {page} stayed on its node (node 0's ZONE_NORMAL has room)");
                Assert.That(entry.Pinned, Is.EqualTo(1), $"page {page} is pinned once");
                AssertPattern(pin.GetReadOnlySpan(page), page, "through the pin");
            }
            AssertPattern(p, va, Pages, "through the process");
            Assert.That(LongtermPinMoves(machine), Is.EqualTo(Pages), "pgmigrate_success counts every page under MR_LONGTERM_PIN");
            Assert.That(LongtermPinFailures(machine), Is.Zero);

            pin.GetSpan(3)[5] = 0xEE;
            Assert.That(p.Read<byte>(va + 3 * PageSize + 5), Is.EqualTo(0xEE), "the host writes through the pin into the process's page");
            p.Write<byte>(va + 4 * PageSize + 6, 0xDD);
            Assert.That(pin.GetReadOnlySpan(4)[6], Is.EqualTo(0xDD), "and sees the process's writes");
            TestMachines.AssertAuditClean(machine, "Audit checks every live long-term pin lies outside ZONE_MOVABLE");
        }
        Assert.That(p.GetPagemap(va).Pinned, Is.Zero, "dispose unpins");
        Assert.That(machine.LongtermPins, Is.Empty, "a disposed pin leaves the machine's list");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_short_term_pin_leaves_its_pages_in_ZONE_MOVABLE()
    {
        const int Pages = 16;
        using Machine machine = TestMachines.Create(WithMovable);
        (VmProcess p, ulong va) = MapPatternInMovable(machine, Pages);
        long first = p.GetPagemap(va).Pfn;

        using (PinnedMemory shortPin = p.Pin(va, Pages * PageSize, write: true))
        using (PinnedMemory alsoShort = p.Pin(va, Pages * PageSize, write: false, longTerm: false))
        {
            Assert.That(shortPin.IsLongTerm, Is.False);
            Assert.That(alsoShort.IsLongTerm, Is.False, "longTerm: false is the short-term pin");
            Assert.That(shortPin.FrameOf(0), Is.EqualTo(first), "nothing moved");
            for (int page = 0; page < Pages; page++)
                Assert.That(ZoneAt(machine, p, va, page), Is.EqualTo(ZoneType.Movable), $"page {page} is still in ZONE_MOVABLE");
            Assert.That(LongtermPinMoves(machine), Is.Zero);
            Assert.That(machine.LongtermPins, Is.Empty, "short-term pins are not listed");
            TestMachines.AssertAuditClean(machine);
        }
        TestMachines.AssertAuditClean(machine);
    }

    [TestCase(MapFlags.Private, true)]
    [TestCase(MapFlags.Private, false)]
    [TestCase(MapFlags.Shared, true)]
    [TestCase(MapFlags.Shared, false)]
    public void Pages_a_long_term_pin_faults_in_are_allocated_outside_ZONE_MOVABLE_with_nothing_to_migrate(MapFlags flags, bool write)
    {
        const int Pages = 8;
        using Machine machine = TestMachines.Create(WithMovable);
        VmProcess p = machine.CreateProcess(homeNode: 0);
        Assert.That(p.Mmap(0, (Pages + 1) * PageSize, Protection.ReadWrite, flags, out ulong va), Is.EqualTo(Errno.None));

        using (PinnedMemory pin = p.Pin(va, Pages * PageSize, write, longTerm: true))
        {
            for (int page = 0; page < Pages; page++)
            {
                Assert.That(machine.GetPageInfo(pin.FrameOf(page)).Zone, Is.EqualTo(ZoneType.Normal), $"page {page}");
                Assert.That(pin.GetReadOnlySpan(page).ContainsAnyExcept((byte)0), Is.False, $"page {page} reads zeros");
            }
            Assert.That(LongtermPinMoves(machine), Is.Zero, "memalloc_pin: the pin's own faults left out ZONE_MOVABLE, so nothing had to move");
            p.Write<byte>(va + Pages * PageSize, 1);
            Assert.That(ZoneAt(machine, p, va, Pages), Is.EqualTo(ZoneType.Movable), "after the pin, the same thread's faults use ZONE_MOVABLE again");
            TestMachines.AssertAuditClean(machine);
        }
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_read_only_long_term_pin_moves_pages_too_and_a_page_already_outside_ZONE_MOVABLE_stays()
    {
        const int Pages = 4;
        using Machine machine = TestMachines.Create(WithMovable);
        (VmProcess p, ulong va) = MapPatternInMovable(machine, Pages);
        using (PinnedMemory first = p.Pin(va, PageSize, write: true, longTerm: true))
        {
            long moved = first.FrameOf(0);
            using PinnedMemory pin = p.Pin(va + 100, Pages * PageSize - 200, write: false, longTerm: true);
            Assert.That(pin.FrameOf(0), Is.EqualTo(moved), "the page already in ZONE_NORMAL is pinned where it is");
            Assert.That(p.GetPagemap(va).Pinned, Is.EqualTo(2));
            for (int page = 0; page < Pages; page++)
                Assert.That(machine.GetPageInfo(pin.FrameOf(page)).Zone, Is.EqualTo(ZoneType.Normal), $"page {page}");
            Assert.That(pin.GetReadOnlySpan(0).Length, Is.EqualTo(PageSize - 100));
            Assert.That(pin.GetReadOnlySpan(1)[0], Is.EqualTo(PatternOf(1, 0)));
            Assert.That(LongtermPinMoves(machine), Is.EqualTo(Pages), "each page moved once");
            Assert.Throws<InvalidOperationException>(() => pin.GetSpan(0), "a read-only long-term pin is still read-only");
            TestMachines.AssertAuditClean(machine);
        }
        AssertPattern(p, va, Pages, "after both pins");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_long_term_pin_when_ZONE_NORMAL_is_full_fails_with_nothing_pinned_and_nothing_moved()
    {
        const int Pages = 16;
        using Machine machine = TestMachines.Create(WithMovable);
        (VmProcess p, ulong va) = MapPatternInMovable(machine, Pages);
        long[] before = Enumerable.Range(0, Pages).Select(i => p.GetPagemap(va + (ulong)(i * PageSize)).Pfn).ToArray();
        // Take every free frame of ZONE_NORMAL, on both nodes (unmovable requests never use ZONE_MOVABLE).
        var taken = new List<long>();
        long pfn;
        while ((pfn = machine.Allocator.AllocPages(0, AllocFlags.NoWatermark)) != PageAllocator.NoPfn)
            taken.Add(pfn);
        Assert.That(taken.All(f => machine.Allocator.ZoneTypeOf(f) == ZoneType.Normal), "unmovable frames come from ZONE_NORMAL only");

        var error = Assert.Throws<InsufficientMemoryException>(() => p.Pin(va, Pages * PageSize, write: true, longTerm: true));
        Assert.That(error!.Message, Does.Contain("ZONE_MOVABLE"), "the message says why");

        for (int page = 0; page < Pages; page++)
        {
            PagemapEntry entry = p.GetPagemap(va + (ulong)(page * PageSize));
            Assert.That(entry.Pinned, Is.Zero, $"page {page}: nothing stays pinned");
            Assert.That(entry.Pfn, Is.EqualTo(before[page]), $"page {page} is where it was");
        }
        Assert.That(machine.LongtermPins, Is.Empty);
        Assert.That(LongtermPinMoves(machine), Is.Zero);
        Assert.That(machine.Lru.GetCounts(0).Isolated, Is.Zero, "every isolated page was put back");
        AssertPattern(p, va, Pages, "after the failed pin");
        foreach (long frame in taken)
            machine.Allocator.FreePages(frame);
        TestMachines.AssertAuditClean(machine);

        using (PinnedMemory pin = p.Pin(va, Pages * PageSize, write: true, longTerm: true))
            Assert.That(machine.GetPageInfo(pin.FrameOf(Pages - 1)).Zone, Is.EqualTo(ZoneType.Normal), "with room again, the same pin succeeds");
        AssertPattern(p, va, Pages, "after the pin that succeeded");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_long_term_pin_goes_to_another_node_when_its_own_ZONE_NORMAL_is_full()
    {
        const int Pages = 4;
        using Machine machine = TestMachines.Create(WithMovable);
        (VmProcess p, ulong va) = MapPatternInMovable(machine, Pages);
        var taken = new List<long>();
        long pfn;
        while ((pfn = machine.Allocator.AllocPages(0, AllocFlags.NoWatermark | AllocFlags.ThisNode, 0)) != PageAllocator.NoPfn)
            taken.Add(pfn);

        using (PinnedMemory pin = p.Pin(va, Pages * PageSize, write: true, longTerm: true))
        {
            for (int page = 0; page < Pages; page++)
            {
                PageInfo info = machine.GetPageInfo(pin.FrameOf(page));
                Assert.That((info.Node, info.Zone), Is.EqualTo((1, ZoneType.Normal)), $"page {page}: node 1's ZONE_NORMAL, not a movable frame of node 0");
            }
            AssertPattern(p, va, Pages, "after the move to node 1");
        }
        foreach (long frame in taken)
            machine.Allocator.FreePages(frame);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_long_term_pin_of_a_page_pinned_short_term_by_someone_else_fails_cleanly()
    {
        const int Pages = 4;
        using Machine machine = TestMachines.Create(WithMovable);
        (VmProcess p, ulong va) = MapPatternInMovable(machine, Pages);
        using PinnedMemory other = p.Pin(va + 2 * PageSize, PageSize, write: true);

        Assert.Throws<InsufficientMemoryException>(() => p.Pin(va, Pages * PageSize, write: true, longTerm: true),
            "a page held by a short-term pin cannot move: Linux's -ENOMEM");

        Assert.That(p.GetPagemap(va + 2 * PageSize).Pinned, Is.EqualTo(1), "only the other pin is left");
        Assert.That(p.GetPagemap(va + 2 * PageSize).Pfn, Is.EqualTo(other.FrameOf(0)));
        Assert.That(p.GetPagemap(va).Pinned, Is.Zero);
        Assert.That(LongtermPinFailures(machine), Is.GreaterThan(0), "pgmigrate_fail counts the page under MR_LONGTERM_PIN");
        Assert.That(machine.LongtermPins, Is.Empty);
        AssertPattern(p, va, Pages, "after the failed pin");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_long_term_pin_waits_for_a_page_another_mover_holds_isolated_and_gives_up_after_a_bounded_number_of_passes()
    {
        const int Pages = 3;
        using Machine machine = TestMachines.Create(WithMovable);
        (VmProcess p, ulong va) = MapPatternInMovable(machine, Pages);
        long held = p.GetPagemap(va + PageSize).Pfn;
        void IsolateHeld()
        {
            // As a mover does: with a reference of its own, then the isolation's reference keeps the page.
            machine.MemMap.GetPage(held);
            machine.Lru.DrainAll();
            Assert.That(machine.Lru.Isolate(held), Is.True, "another mover isolates the middle page");
            machine.PutPage(held);
        }
        IsolateHeld();

        var error = Assert.Throws<InsufficientMemoryException>(() => p.Pin(va, Pages * PageSize, write: true, longTerm: true));
        Assert.That(error!.Message, Does.Contain("stayed isolated"));
        for (int page = 0; page < Pages; page++)
            Assert.That(p.GetPagemap(va + (ulong)(page * PageSize)).Pinned, Is.Zero, $"page {page}: nothing stays pinned");
        Assert.That(machine.LongtermPins, Is.Empty);
        machine.Lru.Putback(held);
        TestMachines.AssertAuditClean(machine, "the failed pin left nothing behind");

        // The other mover lets go a little later: a pin that starts before that waits for it and succeeds.
        IsolateHeld();
        PinnedMemory? pin = null;
        Exception? failure = null;
        var pinner = new Thread(() =>
        {
            try
            {
                pin = p.Pin(va, Pages * PageSize, write: true, longTerm: true);
            }
            catch (Exception e)
            {
                failure = e;
            }
        });
        var clock = System.Diagnostics.Stopwatch.StartNew();
        pinner.Start();
        Thread.Sleep(1);
        machine.Lru.Putback(held);
        TimeSpan putbackAfter = clock.Elapsed;
        pinner.Join();
        if (failure is InsufficientMemoryException && putbackAfter > TimeSpan.FromMilliseconds(10))
            Assert.Inconclusive($"the host was too busy to let go within the pin's bounded passes ({putbackAfter.TotalMilliseconds:F1} ms)");
        Assert.That(failure, Is.Null, "the pin waited for the other mover");
        using (pin)
        {
            for (int page = 0; page < Pages; page++)
                Assert.That(machine.GetPageInfo(pin!.FrameOf(page)).Zone, Is.EqualTo(ZoneType.Normal), $"page {page}");
            AssertPattern(p, va, Pages, "after the wait");
            TestMachines.AssertAuditClean(machine);
        }
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_long_term_pinned_page_stays_put_through_faults_fork_and_migration()
    {
        const int Pages = 2;
        using Machine machine = TestMachines.Create(WithMovable);
        (VmProcess p, ulong va) = MapPatternInMovable(machine, Pages);
        using PinnedMemory pin = p.Pin(va, Pages * PageSize, write: false, longTerm: true);
        long frame = pin.FrameOf(0);

        p.Write<byte>(va, 0x42); // a write fault on the read-only pinned page: the page is the process's own, reused in place
        Assert.That(p.GetPagemap(va).Pfn, Is.EqualTo(frame), "the write fault reused the pinned page");
        VmProcess child = p.Fork();
        child.Write<byte>(va + 1, 0x43);
        p.Write<byte>(va + 2, 0x44);
        Assert.That(p.GetPagemap(va).Pfn, Is.EqualTo(frame), "fork copied the pinned page for the child; the parent keeps it");
        Assert.That(pin.GetReadOnlySpan(0)[..3].ToArray(), Is.EqualTo(new byte[] { 0x42, PatternOf(0, 1), 0x44 }));
        Assert.That(p.Mm.TryReplacePage(va, 1), Is.EqualTo(Errno.EBUSY), "no migration takes it back");
        Assert.That(p.MovePages(0, [va], [1], new int[1]), Is.EqualTo(Errno.None));
        Assert.That(p.GetPagemap(va).Pfn, Is.EqualTo(frame), "move_pages leaves it where it is");
        Assert.That(machine.GetPageInfo(frame).Zone, Is.EqualTo(ZoneType.Normal));
        child.Exit();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_long_term_pin_of_shared_memory_moves_the_page_for_every_process_that_maps_it()
    {
        const int Pages = 8;
        using Machine machine = TestMachines.Create(WithMovable);
        (VmProcess p, ulong va) = MapPatternInMovable(machine, Pages, MapFlags.Shared);
        VmProcess child = p.Fork(); // maps the same shared-memory pages

        using (PinnedMemory pin = p.Pin(va, Pages * PageSize, write: true, longTerm: true))
        {
            for (int page = 0; page < Pages; page++)
            {
                ulong address = va + (ulong)(page * PageSize);
                Assert.That(machine.GetPageInfo(pin.FrameOf(page)).Zone, Is.EqualTo(ZoneType.Normal), $"page {page}");
                Assert.That(child.GetPagemap(address).Pfn, Is.EqualTo(pin.FrameOf(page)), $"page {page}: the child maps the moved page too");
                Assert.That(p.GetPagemap(address).Pfn, Is.EqualTo(pin.FrameOf(page)));
            }
            AssertPattern(child, va, Pages, "the child reads the moved pages");
            pin.GetSpan(1)[0] = 0x99;
            Assert.That(child.Read<byte>(va + PageSize), Is.EqualTo(0x99), "a write through the pin reaches every process");
            child.Write<byte>(va + 2 * PageSize, 0x98);
            Assert.That(pin.GetReadOnlySpan(2)[0], Is.EqualTo(0x98), "and the other process's writes reach the pin");
            Assert.That(LongtermPinMoves(machine), Is.EqualTo(Pages));
            TestMachines.AssertAuditClean(machine);
        }
        child.Exit();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    [Category("Ksm")]
    public void A_long_term_pin_of_KSM_merged_pages_in_ZONE_MOVABLE_pins_its_own_copies_outside_it()
    {
        const int Pages = 16;
        using Machine machine = TestMachines.Create(TestMachines.TwoLargeNodes with { EnableKsm = true, MovableBlocksPerNode = 2 });
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess a = machine.CreateProcess(homeNode: 0);
        VmProcess b = machine.CreateProcess(homeNode: 0);
        ulong vaA = MapPattern(a, Pages, i => (byte)(0x30 + (i % 4)));
        ulong vaB = MapPattern(b, Pages, i => (byte)(0x30 + (i % 4)));
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesShared, Is.EqualTo(4), "four contents, each one KSM page");
        long ksmPage = a.GetPagemap(vaA).Pfn;
        Assert.That(a.GetPagemap(vaA).Ksm, Is.True);
        Assert.That(machine.GetPageInfo(ksmPage).Zone, Is.EqualTo(ZoneType.Movable), "the KSM page lies in ZONE_MOVABLE");

        using (PinnedMemory pin = a.Pin(vaA, Pages * PageSize, write: false, longTerm: true))
        {
            for (int page = 0; page < Pages; page++)
            {
                PagemapEntry entry = a.GetPagemap(vaA + (ulong)(page * PageSize));
                Assert.That(entry.Ksm, Is.False, $"page {page}: the pin unshared it (a pinned page is the process's own)");
                Assert.That(entry.Pfn, Is.EqualTo(pin.FrameOf(page)));
                Assert.That(machine.GetPageInfo(entry.Pfn).Zone, Is.EqualTo(ZoneType.Normal), $"page {page}: the copy lies in ZONE_NORMAL");
                Assert.That(pin.GetReadOnlySpan(page).ContainsAnyExcept((byte)(0x30 + (page % 4))), Is.False, $"page {page}: contents intact");
            }
            Assert.That(LongtermPinMoves(machine), Is.Zero, "the unshare faults ran under memalloc_pin: the copies were made outside ZONE_MOVABLE");
            Assert.That(b.GetPagemap(vaB).Pfn, Is.EqualTo(ksmPage), "the other process still shares the KSM page");
            Assert.That(b.GetPagemap(vaB).Ksm, Is.True);
            Assert.That(b.Read<byte>(vaB + 5 * PageSize), Is.EqualTo(0x31));
            TestMachines.AssertAuditClean(machine);
            ksm.RunFullScans(2);
            Assert.That(a.GetPagemap(vaA).Pfn, Is.EqualTo(pin.FrameOf(0)), "ksmd never merges a pinned page");
            TestMachines.AssertAuditClean(machine);
        }
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    [Category("Ksm")]
    public void A_VmmBuffer_pin_is_short_term_and_its_stores_process_can_pin_it_long_term()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoLargeNodes with { EnableKsm = true, MovableBlocksPerNode = 2 });
        using var store = new DedupeStore(machine);
        byte[] contents = Enumerable.Range(0, 3 * PageSize).Select(i => (byte)(i * 31 + 7)).ToArray();
        using VmmBuffer buffer = store.Create(contents);
        using (PinnedBuffer shortPin = buffer.Pin())
        {
            for (int page = 0; page < 3; page++)
                Assert.That(ZoneAt(machine, store.Process, buffer.Address, page), Is.EqualTo(ZoneType.Movable), $"page {page}: a buffer pin moves nothing");
        }
        using (PinnedMemory pin = store.Process.Pin(buffer.Address, (ulong)buffer.Length, write: false, longTerm: true))
        {
            for (int page = 0; page < 3; page++)
                Assert.That(machine.GetPageInfo(pin.FrameOf(page)).Zone, Is.EqualTo(ZoneType.Normal), $"page {page}");
            Assert.That(buffer.ToArray(), Is.EqualTo(contents), "the buffer's bytes are intact");
            TestMachines.AssertAuditClean(machine);
        }
        TestMachines.AssertAuditClean(machine);
    }

    /// <summary>Block 1 of <see cref="WithMovable"/>: node 0's ZONE_MOVABLE block (block 0 is its ZONE_NORMAL one).</summary>
    private const int MovableBlockOfNode0 = 1;

    [Test]
    [Category("Hotplug")]
    public void A_ZONE_MOVABLE_block_goes_offline_while_pages_that_were_in_it_are_pinned_long_term()
    {
        const int Pages = 32;
        using Machine machine = TestMachines.Create(WithMovable with { BackgroundThreads = false });
        (VmProcess p, ulong va) = MapPatternInMovable(machine, Pages);
        MemoryBlock block = machine.Hotplug.GetBlock(MovableBlockOfNode0);
        Assert.That(machine.Topology.BlockOf(p.GetPagemap(va).Pfn), Is.EqualTo(MovableBlockOfNode0), "the pages start in the block");

        using PinnedMemory pin = p.Pin(va, Pages * PageSize, write: true, longTerm: true);
        Assert.That(block.CanOffline(out IReadOnlyList<OfflineBlocker> blockers), Is.True, string.Join("; ", blockers));
        OfflineResult result = block.Offline();

        Assert.That(result.Error, Is.EqualTo(Errno.None), string.Join("; ", result.Blockers));
        Assert.That(block.State, Is.EqualTo("offline"));
        for (int page = 0; page < Pages; page++)
        {
            Assert.That(p.GetPagemap(va + (ulong)(page * PageSize)).Pfn, Is.EqualTo(pin.FrameOf(page)), $"page {page}: the offline did not touch the pinned page");
            AssertPattern(pin.GetReadOnlySpan(page), page, "through the pin after the offline");
        }
        pin.GetSpan(0)[0] = 0x5A;
        Assert.That(p.Read<byte>(va), Is.EqualTo(0x5A), "the pin still is the process's page");
        TestMachines.AssertAuditClean(machine);
        Assert.That(block.Online(), Is.EqualTo(Errno.None));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    [Category("Hotplug")]
    public void A_short_term_pin_in_ZONE_MOVABLE_holds_up_its_blocks_offline_and_a_long_term_pin_of_the_same_page_does_not()
    {
        using Machine machine = TestMachines.Create(WithMovable with { BackgroundThreads = false });
        (VmProcess p, ulong va) = MapPatternInMovable(machine, 4);
        MemoryBlock block = machine.Hotplug.GetBlock(MovableBlockOfNode0);
        machine.Hotplug.OfflineMigrateMaxPasses = 2;

        using (PinnedMemory shortPin = p.Pin(va + PageSize, PageSize, write: true))
        {
            OfflineResult refused = block.Offline();
            Assert.That(refused.Error, Is.EqualTo(Errno.EBUSY), "the short-term pinned page cannot move");
            Assert.That(refused.Blockers.Select(b => (b.Reason, b.Pid, b.Address)), Does.Contain((OfflineBlockReason.Pinned, p.Pid, va + PageSize)),
                "the blocker names the pin's process and address");
            Assert.That(block.State, Is.EqualTo("online"));
        }
        using (PinnedMemory longPin = p.Pin(va + PageSize, PageSize, write: true, longTerm: true))
        {
            OfflineResult result = block.Offline();
            Assert.That(result.Error, Is.EqualTo(Errno.None), string.Join("; ", result.Blockers));
            Assert.That(p.GetPagemap(va + PageSize).Pfn, Is.EqualTo(longPin.FrameOf(0)));
            AssertPattern(p, va, 4, "after the offline");
            TestMachines.AssertAuditClean(machine);
        }
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Audit_reports_a_live_long_term_pin_that_holds_a_page_in_ZONE_MOVABLE()
    {
        using Machine machine = TestMachines.Create(WithMovable);
        (VmProcess p, ulong va) = MapPatternInMovable(machine, 1);
        using PinnedMemory shortPin = p.Pin(va, PageSize, write: true);
        long frame = shortPin.FrameOf(0);
        // A long-term pin of a page that was never moved: what a broken pin (or a mover that took a pinned
        // page back) would leave. Its pin and reference are taken as AddressSpace.Pin takes them.
        machine.MemMap.GetPage(frame);
        Interlocked.Increment(ref machine.MemMap[frame].PinCount);
        using (var broken = new PinnedMemory(machine, va, PageSize, [frame], writable: true, longTerm: true))
        {
            Assert.That(machine.Audit(), Has.Some.Contains($"frame {frame} of a live long-term pin lies in Movable"));
        }
        TestMachines.AssertAuditClean(machine);
    }
}
