using Vmm.Mm;

namespace Vmm.Tests.Mm;

/// <summary>
/// Memory failure (Linux's mm/memory-failure.c): madvise(MADV_HWPOISON / MADV_SOFT_OFFLINE) and the pfn
/// calls Machine.HardOfflinePage / SoftOfflinePage. A poisoned page is gone for every process that maps
/// it (a BusError on access), a soft-offlined page moves without anyone noticing, and either way the
/// old frame is retired: PG_hwpoison, one reference, never handed out again, counted in
/// HardwareCorrupted, and accounted by the Audit.
/// </summary>
[Category("Smoke")]
public sealed class MemoryFailureTests
{
    private const ulong Page = 4096;

    private static void AssertRetired(Machine machine, long pfn, string because)
    {
        PageInfo info = machine.GetPageInfo(pfn);
        Assert.That(info.Flags, Is.EqualTo(PageFlags.HWPoison), $"{because}: PG_hwpoison and nothing else");
        Assert.That((info.RefCount, info.MapCount), Is.EqualTo((1, 0)), $"{because}: the retirement's one reference, no mapping");
    }

    private static long FreeFrames(Machine machine) => machine.GetStats().AllFreePages;

    // ---- MADV_HWPOISON ------------------------------------------------------------------------------

    [Test]
    public void A_poisoned_page_throws_BusError_on_every_access_and_its_neighbours_are_untouched()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(3 * Page, fill: 0x5A);
        (Machine machine, VmProcess p, ulong va, _) = m;
        ulong poisoned = va + Page;
        long pfn = p.GetPagemap(poisoned).Pfn;
        long rss = p.Mm.RssAnon;

        Assert.That(p.Madvise(poisoned, Page, Advice.HwPoison), Is.EqualTo(Errno.None));

        BusError read = Assert.Throws<BusError>(() => p.Read<byte>(poisoned + 10))!;
        Assert.That((read.Address, read.Kind), Is.EqualTo((poisoned + 10, AccessKind.Read)), "the address of the access");
        BusError write = Assert.Throws<BusError>(() => p.Write<long>(poisoned + 8, 1))!;
        Assert.That((write.Address, write.Kind), Is.EqualTo((poisoned + 8, AccessKind.Write)));
        Assert.Throws<BusError>(() => p.Fill(poisoned, 16, 1));
        BusError span = Assert.Throws<BusError>(() => p.Read(va, new byte[3 * Page]))!;
        Assert.That(span.Address, Is.EqualTo(poisoned), "a multi-page read stops at the first poisoned byte");
        Assert.That(p.Read<byte>(va), Is.EqualTo(0x5A), "the page before is fine");
        Assert.That(p.Read<byte>(va + 2 * Page + 4095), Is.EqualTo(0x5A), "the page after is fine");
        p.Write<byte>(va, 1);

        PagemapEntry entry = p.GetPagemap(poisoned);
        Assert.That((entry.Present, entry.Swapped), Is.EqualTo((false, true)), "a hwpoison entry is a swap-format entry");
        Assert.That(p.Mm.RssAnon, Is.EqualTo(rss - 1), "a hwpoison entry counts in no RSS");
        AssertRetired(machine, pfn, "the poisoned frame");
        MachineStats stats = machine.GetStats();
        Assert.That((stats.PoisonedPages, stats.HardwareCorruptedBytes), Is.EqualTo((1L, 4096L)), "HardwareCorrupted: 4 kB");
        Assert.That(machine.ReadVmStat("num_poisoned_pages", out long count), Is.EqualTo(Errno.None));
        Assert.That(count, Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Another_process_with_the_same_contents_is_not_affected()
    {
        using Machine machine = TestMachines.Create();
        VmProcess a = machine.CreateProcess(), b = machine.CreateProcess();
        ulong va = a.Mmap(Page), vb = b.Mmap(Page);
        a.Fill(va, Page, 7);
        b.Fill(vb, Page, 7);

        Assert.That(a.Madvise(va, Page, Advice.HwPoison), Is.EqualTo(Errno.None));

        Assert.Throws<BusError>(() => a.Read<byte>(va));
        Assert.That(b.Read<byte>(vb + 100), Is.EqualTo(7), "b's page is its own frame");
        b.Write<byte>(vb, 8);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_page_shared_copy_on_write_is_poisoned_in_parent_and_child()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(2 * Page, fill: 3);
        (Machine machine, VmProcess parent, ulong va, _) = m;
        VmProcess child = parent.Fork();
        Assert.That(child.GetPagemap(va).Pfn, Is.EqualTo(parent.GetPagemap(va).Pfn), "setup: one frame, two mappings");

        Assert.That(child.Madvise(va, Page, Advice.HwPoison), Is.EqualTo(Errno.None));

        Assert.Throws<BusError>(() => parent.Read<byte>(va), "every mapping of the frame became a hwpoison entry");
        Assert.Throws<BusError>(() => child.Read<byte>(va));
        Assert.That(parent.Read<byte>(va + Page), Is.EqualTo(3));
        child.Write<byte>(va + Page, 4);
        Assert.That(parent.Read<byte>(va + Page), Is.EqualTo(3), "copy-on-write still separates the other page");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_child_forked_after_the_poison_inherits_it()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(2 * Page, fill: 9);
        (Machine machine, VmProcess parent, ulong va, _) = m;
        Assert.That(parent.Madvise(va, Page, Advice.HwPoison), Is.EqualTo(Errno.None));

        VmProcess child = parent.Fork();

        Assert.Throws<BusError>(() => child.Read<byte>(va), "copy_nonpresent_pte copies the hwpoison entry");
        Assert.Throws<BusError>(() => parent.Read<byte>(va));
        Assert.That(child.Read<byte>(va + Page), Is.EqualTo(9));
        child.Write<byte>(va + Page, 1);
        Assert.That(parent.Read<byte>(va + Page), Is.EqualTo(9));
        TestMachines.AssertAuditClean(machine);
        child.Exit();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Exit_after_a_poison_frees_every_frame_but_the_retired_one()
    {
        using Machine machine = TestMachines.Create();
        long before = FreeFrames(machine);
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(16 * Page);
        p.Fill(va, 16 * Page, 1);
        long pfn = p.GetPagemap(va + 5 * Page).Pfn;
        Assert.That(p.Madvise(va + 5 * Page, Page, Advice.HwPoison), Is.EqualTo(Errno.None));

        p.Exit();

        Assert.That(FreeFrames(machine), Is.EqualTo(before - 1), "everything came back but the retired frame");
        AssertRetired(machine, pfn, "after exit");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Dropping_the_poisoned_range_lets_the_address_fault_in_a_new_page()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(Page, fill: 2);
        (Machine machine, VmProcess p, ulong va, _) = m;
        Assert.That(p.Madvise(va, Page, Advice.HwPoison), Is.EqualTo(Errno.None));

        Assert.That(p.Madvise(va, Page, Advice.DontNeed), Is.EqualTo(Errno.None), "zap drops the hwpoison entry");

        Assert.That(p.Read<byte>(va), Is.Zero, "a fresh page");
        p.Write<byte>(va, 5);
        Assert.That(p.Read<byte>(va), Is.EqualTo(5));
        Assert.That(machine.GetStats().PoisonedPages, Is.EqualTo(1), "the retired frame stays retired");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_pin_of_a_poisoned_page_throws_BusError()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(2 * Page, fill: 2);
        (Machine machine, VmProcess p, ulong va, _) = m;
        Assert.That(p.Madvise(va + Page, Page, Advice.HwPoison), Is.EqualTo(Errno.None));

        BusError e = Assert.Throws<BusError>(() => p.Pin(va, 2 * Page, write: false))!;
        Assert.That(e.Address, Is.EqualTo(va + Page));
        TestMachines.AssertAuditClean(machine, "a failed pin pins nothing");
    }

    [Test]
    public void Poisoning_a_pinned_page_is_EBUSY_but_the_page_is_poisoned_and_retired_when_the_pin_goes()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(Page, fill: 0x11);
        (Machine machine, VmProcess p, ulong va, _) = m;
        long pfn = p.GetPagemap(va).Pfn;
        PinnedMemory pin = p.Pin(va, Page, write: false);

        Assert.That(p.Madvise(va, Page, Advice.HwPoison), Is.EqualTo(Errno.EBUSY), "MF_FAILED: the pin is an extra reference");

        Assert.Throws<BusError>(() => p.Read<byte>(va), "unmapped all the same");
        Assert.That(pin.GetReadOnlySpan(0)[0], Is.EqualTo(0x11), "the pin's holder still reaches the frame, as DMA would");
        Assert.That(machine.GetPageInfo(pfn).RefCount, Is.EqualTo(2), "the retirement's and the pin's");
        TestMachines.AssertAuditClean(machine);

        pin.Dispose();

        AssertRetired(machine, pfn, "after the pin went");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_second_poison_of_the_same_address_is_EFAULT_and_counts_nothing()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(Page, fill: 1);
        (Machine machine, VmProcess p, ulong va, _) = m;
        Assert.That(p.Madvise(va, Page, Advice.HwPoison), Is.EqualTo(Errno.None));

        Assert.That(p.Madvise(va, Page, Advice.HwPoison), Is.EqualTo(Errno.EFAULT), "get_user_pages fails on a hwpoison entry");
        Assert.That(p.Madvise(va, Page, Advice.SoftOffline), Is.EqualTo(Errno.EFAULT));
        Assert.That(machine.GetStats().PoisonedPages, Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Untouched_memory_is_the_zero_page_which_is_never_poisoned()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(Page);
        (Machine machine, VmProcess p, ulong va, _) = m;

        Assert.That(p.Madvise(va, Page, Advice.HwPoison), Is.EqualTo(Errno.EBUSY), "a reserved kernel page: Linux ignores it (MF_IGNORED)");
        Assert.That(p.Madvise(va, Page, Advice.SoftOffline), Is.EqualTo(Errno.EIO), "not an LRU page: get_hwpoison_page gives up");

        Assert.That(p.GetPagemap(va).ZeroPage, Is.True);
        Assert.That(p.Read<byte>(va), Is.Zero);
        Assert.That(machine.GetStats().PoisonedPages, Is.Zero, "the zero page stays good: every process reads it");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_KSM_page_is_not_hard_poisoned_but_soft_offline_moves_it_and_keeps_it_merged()
    {
        using Machine machine = TestMachines.CreateForKsm();
        VmProcess a = machine.CreateProcess(), b = machine.CreateProcess();
        ulong va = a.Mmap(Page), vb = b.Mmap(Page);
        a.Fill(va, Page, 0x5A);
        b.Fill(vb, Page, 0x5A);
        Assert.That(a.Madvise(va, Page, Advice.Mergeable), Is.EqualTo(Errno.None));
        Assert.That(b.Madvise(vb, Page, Advice.Mergeable), Is.EqualTo(Errno.None));
        machine.Ksm!.RunFullScans(2);
        long kpfn = a.GetPagemap(va).Pfn;
        Assert.That(a.GetPagemap(va).Ksm && b.GetPagemap(vb).Pfn == kpfn, Is.True, "setup: one KSM page");

        Assert.That(a.Madvise(va, Page, Advice.HwPoison), Is.EqualTo(Errno.EBUSY), "Vmm refuses KSM pages, as Linux before 6.6 did");
        Assert.That(machine.GetStats().PoisonedPages, Is.Zero);
        Assert.That(b.Read<byte>(vb), Is.EqualTo(0x5A));

        Assert.That(a.Madvise(va, Page, Advice.SoftOffline), Is.EqualTo(Errno.None));

        PagemapEntry ea = a.GetPagemap(va), eb = b.GetPagemap(vb);
        Assert.That((ea.Ksm, eb.Pfn), Is.EqualTo((true, ea.Pfn)), "still one KSM page for both");
        Assert.That(ea.Pfn, Is.Not.EqualTo(kpfn));
        Assert.That(b.Read<byte>(vb + 4095), Is.EqualTo(0x5A));
        AssertRetired(machine, kpfn, "the old KSM frame");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_poisoned_shared_page_is_a_bus_error_for_every_mapper_and_for_later_faults_of_its_index()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(2 * Page, Protection.ReadWrite, MapFlags.Shared);
        p.Fill(va, 2 * Page, 4);
        VmProcess child = p.Fork();
        long pfn = p.GetPagemap(va).Pfn;

        Assert.That(p.Madvise(va, Page, Advice.HwPoison), Is.EqualTo(Errno.None));

        Assert.Throws<BusError>(() => p.Read<byte>(va));
        Assert.Throws<BusError>(() => child.Read<byte>(va));
        Assert.That(p.Madvise(va, Page, Advice.DontNeed), Is.EqualTo(Errno.None));
        Assert.Throws<BusError>(() => p.Read<byte>(va), "the object remembers the index: the fault finds no page to map");
        child.Write<byte>(va + Page, 6);
        Assert.That(p.Read<byte>(va + Page), Is.EqualTo(6), "the other page is still shared");
        AssertRetired(machine, pfn, "the shared frame left the page cache");
        TestMachines.AssertAuditClean(machine);

        child.Exit();
        p.Exit();
        TestMachines.AssertAuditClean(machine);
    }

    // ---- the errors of madvise_inject_error ----------------------------------------------------------

    [Test]
    public void Without_CAP_SYS_ADMIN_both_advices_are_EPERM_and_change_nothing([Values(Advice.HwPoison, Advice.SoftOffline)] Advice advice)
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess(Credentials.User(1000));
        ulong va = p.Mmap(Page);
        p.Fill(va, Page, 1);
        long pfn = p.GetPagemap(va).Pfn;

        Assert.That(p.Madvise(va, Page, advice), Is.EqualTo(Errno.EPERM));
        Assert.That(p.Madvise(va, 0, advice), Is.EqualTo(Errno.None), "a zero length returns before the capability check, as in Linux");

        Assert.That(p.GetPagemap(va).Pfn, Is.EqualTo(pfn));
        Assert.That(p.Read<byte>(va), Is.EqualTo(1));
        Assert.That(machine.GetStats().PoisonedPages, Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void An_address_without_a_readable_page_is_EFAULT([Values(Advice.HwPoison, Advice.SoftOffline)] Advice advice)
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(3 * Page);
        p.Fill(va, 3 * Page, 1);
        Assert.That(p.Munmap(va + Page, Page), Is.EqualTo(Errno.None));
        ulong none = p.Mmap(Page, Protection.None);

        Assert.That(p.Madvise(va + Page, Page, advice), Is.EqualTo(Errno.EFAULT), "a hole: get_user_pages's EFAULT, not madvise's ENOMEM");
        Assert.That(p.Madvise(none, Page, advice), Is.EqualTo(Errno.EFAULT), "PROT_NONE cannot be read");
        Assert.That(p.Madvise(0x7FFF_FFFF_F000, Page, advice), Is.EqualTo(Errno.EFAULT), "above TASK_SIZE");
        Assert.That(p.Madvise(va + 1, Page, advice), Is.EqualTo(Errno.EINVAL), "a misaligned start");
        Assert.That(p.Madvise(va, ulong.MaxValue, advice), Is.EqualTo(Errno.EINVAL), "a length that wraps");
        Assert.That(machine.GetStats().PoisonedPages, Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void The_first_error_ends_the_range_and_the_pages_before_it_stay_done()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(3 * Page);
        p.Fill(va, 3 * Page, 1);
        Assert.That(p.Munmap(va + Page, Page), Is.EqualTo(Errno.None));

        Assert.That(p.Madvise(va, 3 * Page, Advice.HwPoison), Is.EqualTo(Errno.EFAULT));

        Assert.Throws<BusError>(() => p.Read<byte>(va), "the first page was poisoned before the hole");
        Assert.That(p.Read<byte>(va + 2 * Page), Is.EqualTo(1), "the page after the hole was never reached");
        Assert.That(machine.GetStats().PoisonedPages, Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    // ---- MADV_SOFT_OFFLINE ---------------------------------------------------------------------------

    [Test]
    public void Soft_offline_moves_the_contents_to_a_new_frame_on_the_same_node_and_retires_the_old_one()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(2 * Page, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = m;
        byte[] data = new byte[2 * Page];
        new Random(12).NextBytes(data);
        p.Write(va, data);
        PagemapEntry before = p.GetPagemap(va);
        long freeBefore = FreeFrames(machine);

        Assert.That(p.Madvise(va, 2 * Page, Advice.SoftOffline), Is.EqualTo(Errno.None));

        PagemapEntry after = p.GetPagemap(va);
        Assert.That(after.Pfn, Is.Not.EqualTo(before.Pfn), "a new frame");
        Assert.That((after.Node, after.Writable, after.Exclusive), Is.EqualTo((before.Node, true, true)), "same node, still writable and exclusive");
        byte[] read = new byte[2 * Page];
        p.Read(va, read);
        Assert.That(read, Is.EqualTo(data), "every byte moved");
        p.Write<byte>(va, 1);
        AssertRetired(machine, before.Pfn, "the old frame");
        Assert.That(machine.GetStats().PoisonedPages, Is.EqualTo(2));
        Assert.That(FreeFrames(machine), Is.EqualTo(freeBefore - 2), "two frames retired, none leaked");
        Assert.That(machine.GetMigrationStats().SucceededByReason[MigrateReason.MemoryFailure], Is.EqualTo(2), "pgmigrate_success, MR_MEMORY_FAILURE");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Soft_offline_of_a_page_shared_by_fork_moves_both_mappings()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(Page, fill: 0x33);
        (Machine machine, VmProcess parent, ulong va, _) = m;
        VmProcess child = parent.Fork();
        long old = parent.GetPagemap(va).Pfn;

        Assert.That(child.Madvise(va, Page, Advice.SoftOffline), Is.EqualTo(Errno.None));

        long moved = parent.GetPagemap(va).Pfn;
        Assert.That((moved != old, child.GetPagemap(va).Pfn), Is.EqualTo((true, moved)), "one new frame, still shared");
        child.Write<byte>(va, 1);
        Assert.That(parent.Read<byte>(va), Is.EqualTo(0x33), "still copy-on-write");
        AssertRetired(machine, old, "the old frame");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Soft_offline_of_a_shared_mapping_keeps_it_shared()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(Page, Protection.ReadWrite, MapFlags.Shared);
        p.Fill(va, Page, 4);
        VmProcess child = p.Fork();
        long old = p.GetPagemap(va).Pfn;

        Assert.That(p.Madvise(va, Page, Advice.SoftOffline), Is.EqualTo(Errno.None));

        Assert.That(p.GetPagemap(va).Pfn, Is.Not.EqualTo(old));
        child.Write<byte>(va, 9);
        Assert.That(p.Read<byte>(va), Is.EqualTo(9), "both map the object's new frame");
        AssertRetired(machine, old, "the old frame");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Soft_offline_of_a_pinned_page_is_EBUSY_and_changes_nothing()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(Page, fill: 6);
        (Machine machine, VmProcess p, ulong va, _) = m;
        long pfn = p.GetPagemap(va).Pfn;
        using (PinnedMemory pin = p.Pin(va, Page, write: true))
        {
            Assert.That(p.Madvise(va, Page, Advice.SoftOffline), Is.EqualTo(Errno.EBUSY), "migration gives up on a pinned page");
            Assert.That(p.GetPagemap(va).Pfn, Is.EqualTo(pfn));
            Assert.That(machine.GetStats().PoisonedPages, Is.Zero);
            TestMachines.AssertAuditClean(machine);
        }
        Assert.That(p.Read<byte>(va), Is.EqualTo(6));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Soft_offline_with_no_frame_to_move_to_is_ENOMEM_and_changes_nothing()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap((ulong)machine.Topology.TotalFrames * Page);
        ulong end = va;
        try
        {
            for (; ; end += Page)
                p.Write<byte>(end, 0x77);
        }
        catch (InsufficientMemoryException)
        {
        }
        long pfn = p.GetPagemap(va).Pfn;

        Assert.That(p.Madvise(va, Page, Advice.SoftOffline), Is.EqualTo(Errno.ENOMEM), "no frame for the copy");

        Assert.That(p.GetPagemap(va).Pfn, Is.EqualTo(pfn));
        Assert.That(p.Read<byte>(va), Is.EqualTo(0x77));
        Assert.That(machine.GetStats().PoisonedPages, Is.Zero);
        Assert.That(machine.GetMigrationStats().SucceededByReason[MigrateReason.MemoryFailure], Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    // ---- pfn calls: hard_offline_page / soft_offline_page --------------------------------------------

    [Test]
    public void A_free_frame_is_taken_off_the_buddy_lists_and_never_handed_out()
    {
        using Machine machine = TestMachines.Create();
        VmProcess p = machine.CreateProcess();
        ulong warm = p.Mmap(Page);
        p.Write<byte>(warm, 1); // initialise a section: the next frames come from an initialised free block
        long soft = p.GetPagemap(warm).Pfn + 1;
        long hard = machine.Topology.TotalFrames - 1; // a section never initialised: free too
        Assert.That((machine.GetPageInfo(soft).RefCount, machine.GetPageInfo(hard).RefCount), Is.EqualTo((0, 0)), "setup: both free");
        long free = FreeFrames(machine);

        Assert.That(machine.SoftOfflinePage(soft), Is.EqualTo(Errno.None));
        Assert.That(machine.HardOfflinePage(hard), Is.EqualTo(Errno.None));

        AssertRetired(machine, soft, "a soft-offlined free frame");
        AssertRetired(machine, hard, "a hard-offlined free frame");
        Assert.That(FreeFrames(machine), Is.EqualTo(free - 2), "exactly the two frames left the allocator");
        Assert.That(machine.GetStats().HardwareCorruptedBytes, Is.EqualTo(2 * 4096));
        TestMachines.AssertAuditClean(machine);

        // Take every frame there is: none of them is a retired one.
        ulong all = p.Mmap((ulong)machine.Topology.TotalFrames * Page);
        var seen = new HashSet<long>();
        for (ulong va = all; ; va += Page)
        {
            try
            {
                p.Write<byte>(va, 1);
            }
            catch (InsufficientMemoryException)
            {
                break;
            }
            seen.Add(p.GetPagemap(va).Pfn);
        }
        Assert.That(seen, Does.Not.Contain(soft).And.Not.Contain(hard), "a retired frame is never allocated");
        Assert.That(seen.Count, Is.GreaterThan(1500), "setup: the machine's memory was used up");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Offlining_a_frame_twice_is_EHWPOISON_for_hard_and_success_for_soft_and_counts_once()
    {
        using Machine machine = TestMachines.Create();
        long pfn = machine.Topology.TotalFrames - 10;
        Assert.That(machine.HardOfflinePage(pfn), Is.EqualTo(Errno.None));

        Assert.That(machine.HardOfflinePage(pfn), Is.EqualTo(Errno.EHWPOISON));
        Assert.That(machine.SoftOfflinePage(pfn), Is.EqualTo(Errno.None), "soft_offline_page: already poisoned, nothing to do");
        Assert.That(machine.GetStats().PoisonedPages, Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_frame_outside_the_machine_is_ENXIO()
    {
        using Machine machine = TestMachines.Create();
        foreach (long pfn in new[] { -1, machine.Topology.TotalFrames, long.MaxValue })
        {
            Assert.That(machine.HardOfflinePage(pfn), Is.EqualTo(Errno.ENXIO), $"{pfn}");
            Assert.That(machine.SoftOfflinePage(pfn), Is.EqualTo(Errno.ENXIO), $"{pfn}");
        }
    }

    [Test]
    public void A_page_table_frame_is_refused_EBUSY_by_hard_and_EIO_by_soft_offline()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(Page, fill: 1);
        (Machine machine, VmProcess p, ulong va, _) = m;
        long table;
        p.Mm.MmapLock.EnterReadLock();
        try
        {
            table = p.Mm.EnumerateTablePages()[0];
        }
        finally
        {
            p.Mm.MmapLock.ExitReadLock();
        }

        Assert.That(machine.HardOfflinePage(table), Is.EqualTo(Errno.EBUSY), "not an LRU page: Vmm leaves kernel frames alone");
        Assert.That(machine.SoftOfflinePage(table), Is.EqualTo(Errno.EIO), "get_hwpoison_page: unhandlable");

        Assert.That(machine.GetPageInfo(table).Flags & PageFlags.HWPoison, Is.EqualTo(PageFlags.None));
        Assert.That(p.Read<byte>(va), Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Hard_offline_of_a_frame_in_use_poisons_the_process_that_maps_it()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(2 * Page, fill: 8);
        (Machine machine, VmProcess p, ulong va, _) = m;
        long pfn = p.GetPagemap(va + Page).Pfn;

        Assert.That(machine.HardOfflinePage(pfn), Is.EqualTo(Errno.None));

        Assert.Throws<BusError>(() => p.Read<byte>(va + Page));
        Assert.That(p.Read<byte>(va), Is.EqualTo(8));
        AssertRetired(machine, pfn, "the frame");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Soft_offline_of_a_frame_in_use_moves_it_under_the_process()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(Page, fill: 0x42);
        (Machine machine, VmProcess p, ulong va, _) = m;
        long pfn = p.GetPagemap(va).Pfn;

        Assert.That(machine.SoftOfflinePage(pfn), Is.EqualTo(Errno.None));

        Assert.That(p.GetPagemap(va).Pfn, Is.Not.EqualTo(pfn));
        Assert.That(p.Read<byte>(va + 4095), Is.EqualTo(0x42));
        AssertRetired(machine, pfn, "the old frame");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Frames_forgotten_by_an_offline_leave_the_count()
    {
        using Machine machine = TestMachines.Create();
        Assert.That(machine.HardOfflinePage(machine.Topology.TotalFrames - 3), Is.EqualTo(Errno.None));
        Assert.That(machine.SoftOfflinePage(machine.Topology.TotalFrames - 4), Is.EqualTo(Errno.None));

        machine.MemoryFailure.Forget(1); // what the offline of the block that held one of them reports

        Assert.That(machine.GetStats().PoisonedPages, Is.EqualTo(1));
        Assert.Throws<VmBugException>(() => machine.MemoryFailure.Forget(2), "more than were ever counted is a bug");
        Assert.That(machine.GetStats().PoisonedPages, Is.EqualTo(1));
        // No Audit: without a real offline the two flagged frames disagree with the count on purpose.
    }

    // ---- the Audit -----------------------------------------------------------------------------------

    [Test]
    public void The_audit_catches_a_poisoned_frame_that_is_still_in_use_and_a_wrong_count()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(Page, fill: 1);
        (Machine machine, VmProcess p, ulong va, _) = m;
        long pfn = p.GetPagemap(va).Pfn;

        machine.MemMap.SetFlag(pfn, PageFlags.HWPoison); // what a handler that forgot to unmap would leave

        IReadOnlyList<string> problems = machine.Audit();
        Assert.That(problems, Has.Some.Contains("still mapped"), "a PG_hwpoison frame must be retired");
        Assert.That(problems, Has.Some.Contains("num_poisoned_pages 0"), "and counted");
        machine.MemMap.ClearFlag(pfn, PageFlags.HWPoison);
        TestMachines.AssertAuditClean(machine);
    }
}

/// <summary>
/// Memory failure under load: soft offline and hard poison racing with writers, readers, ksmd, fork and
/// exit. Every write survives a soft offline, a poisoned page stays poisoned for every process that
/// maps it, nothing else is disturbed, and the Audit is clean at the end.
/// </summary>
[Category("Stress")]
public sealed class MemoryFailureStressTests
{
    private const ulong Page = 4096;
    private const int Writers = 3;
    private const int PagesPerWriter = 8;
    private const int Sacrificial = 24;
    private const int MergeablePages = 24;

    [Test]
    public void Soft_offline_and_poison_racing_with_writers_ksm_and_fork_lose_nothing_else()
    {
        int rounds = 150 * TestEnvironment.StressScale;
        DateTime? until = TestEnvironment.StressDuration is { } d ? DateTime.UtcNow + d : null;
        using Machine machine = TestMachines.CreateForKsm();
        VmProcess a = machine.CreateProcess();
        ulong written = a.Mmap(Writers * PagesPerWriter * Page);
        a.Fill(written, Writers * PagesPerWriter * Page, 0);
        ulong sacrificial = a.Mmap(Sacrificial * Page);
        for (int i = 0; i < Sacrificial; i++)
            a.Fill(sacrificial + (ulong)i * Page, Page, (byte)(i + 1));
        ulong mergeable = a.Mmap(MergeablePages * Page);
        for (int i = 0; i < MergeablePages; i++)
            a.Fill(mergeable + (ulong)i * Page, Page, (byte)(0xA0 + i % 4));
        Assert.That(a.Madvise(mergeable, MergeablePages * Page, Advice.Mergeable), Is.EqualTo(Errno.None));

        var poisoned = new bool[Sacrificial];          // written only by the poisoner
        var failures = new System.Collections.Concurrent.ConcurrentQueue<string>();
        var lastWritten = new long[Writers * PagesPerWriter];
        using var stop = new CancellationTokenSource();
        int softDone = 0, hardDone = 0;

        void Guard(Action body)
        {
            try
            {
                body();
            }
            catch (Exception e)
            {
                failures.Enqueue(e.ToString());
                stop.Cancel();
            }
        }

        var threads = new List<Thread>();
        for (int w = 0; w < Writers; w++)
        {
            int writer = w;
            threads.Add(new Thread(() => Guard(() =>
            {
                long value = 0;
                while (!stop.IsCancellationRequested)
                {
                    int page = writer * PagesPerWriter + (int)(value % PagesPerWriter);
                    ulong va = written + (ulong)page * Page;
                    value++;
                    a.Write<long>(va, value);
                    a.Write<long>(va + Page - 8, value);
                    Volatile.Write(ref lastWritten[page], value);
                    if (a.Read<long>(va) != value || a.Read<long>(va + Page - 8) != value)
                        failures.Enqueue($"writer {writer}: page {page} lost {value}");
                }
            })));
        }
        threads.Add(new Thread(() => Guard(() =>
        {
            // Reader of the sacrificial pages: the pattern, or a BusError once the page is poisoned.
            while (!stop.IsCancellationRequested)
            {
                for (int i = 0; i < Sacrificial; i++)
                {
                    bool known = Volatile.Read(ref poisoned[i]);
                    try
                    {
                        byte b = a.Read<byte>(sacrificial + (ulong)i * Page + 100);
                        if (known)
                            failures.Enqueue($"sacrificial page {i} read after its poison");
                        else if (b != i + 1)
                            failures.Enqueue($"sacrificial page {i} reads {b}");
                    }
                    catch (BusError)
                    {
                        // poisoned (perhaps a moment before the poisoner recorded it)
                    }
                }
            }
        })));
        threads.Add(new Thread(() => Guard(() =>
        {
            while (!stop.IsCancellationRequested)
                machine.Ksm!.RunFullScans(1);
        })));
        threads.Add(new Thread(() => Guard(() =>
        {
            while (!stop.IsCancellationRequested)
            {
                VmProcess child = a.Fork();
                for (int i = 0; i < Sacrificial; i++)
                {
                    bool known = Volatile.Read(ref poisoned[i]);
                    try
                    {
                        child.Read<byte>(sacrificial + (ulong)i * Page);
                        if (known)
                            failures.Enqueue($"child reads sacrificial page {i} after its poison");
                    }
                    catch (BusError)
                    {
                    }
                }
                for (int i = 0; i < MergeablePages; i++)
                {
                    byte b = child.Read<byte>(mergeable + (ulong)i * Page + 7);
                    if (b != 0xA0 + i % 4)
                        failures.Enqueue($"child reads mergeable page {i} as {b}");
                }
                child.Exit();
            }
        })));
        foreach (Thread t in threads)
            t.Start();

        var random = new Random(TestEnvironment.Seed(1212));
        // Every move retires a frame: a long soak stops once half the machine is retired, before the
        // writers' copy-on-write faults (after a fork) could run out of frames.
        long retireAtMost = machine.Topology.TotalFrames / 2;
        for (int round = 0; (until is { } end ? DateTime.UtcNow < end : round < rounds) && !stop.IsCancellationRequested &&
             softDone + hardDone < retireAtMost; round++)
        {
            ulong target = random.Next(3) switch
            {
                0 => written + (ulong)random.Next(Writers * PagesPerWriter) * Page,
                1 => mergeable + (ulong)random.Next(MergeablePages) * Page,
                _ => sacrificial + (ulong)random.Next(Sacrificial) * Page,
            };
            Errno soft = a.Madvise(target, Page, Advice.SoftOffline);
            if (soft == Errno.None)
                softDone++;
            else if (soft is not (Errno.EBUSY or Errno.EFAULT)) // EBUSY: busy through every pass; EFAULT: poisoned already
                failures.Enqueue($"soft offline of 0x{target:x}: {soft}");
            if (round % 10 == 0)
            {
                int i = random.Next(Sacrificial);
                Errno hard = a.Madvise(sacrificial + (ulong)i * Page, Page, Advice.HwPoison);
                if (hard == Errno.None)
                {
                    hardDone++;
                    Volatile.Write(ref poisoned[i], true);
                }
                else if (hard == Errno.EFAULT)
                {
                    if (!poisoned[i])
                        failures.Enqueue($"poison of sacrificial page {i}: EFAULT, but it was not poisoned");
                }
                else if (hard == Errno.EBUSY)
                {
                    // Still referenced elsewhere for a moment (MF_FAILED: poisoned all the same), or refused
                    // before the poison (isolated by a mover): the page table tells which.
                    if (!a.GetPagemap(sacrificial + (ulong)i * Page).Present)
                        Volatile.Write(ref poisoned[i], true);
                }
                else
                {
                    failures.Enqueue($"poison of sacrificial page {i}: {hard}");
                }
            }
        }
        stop.Cancel();
        foreach (Thread t in threads)
            t.Join();

        Assert.That(failures, Is.Empty);
        for (int page = 0; page < Writers * PagesPerWriter; page++)
        {
            long expected = lastWritten[page];
            Assert.That(a.Read<long>(written + (ulong)page * Page), Is.EqualTo(expected), $"written page {page}");
        }
        for (int i = 0; i < MergeablePages; i++)
            Assert.That(a.Read<byte>(mergeable + (ulong)i * Page + 4095), Is.EqualTo(0xA0 + i % 4), $"mergeable page {i}");
        for (int i = 0; i < Sacrificial; i++)
        {
            if (poisoned[i])
                Assert.Throws<BusError>(() => a.Read<byte>(sacrificial + (ulong)i * Page), $"sacrificial page {i} stays poisoned");
            else
                Assert.That(a.Read<byte>(sacrificial + (ulong)i * Page), Is.EqualTo(i + 1));
        }
        Assert.That(softDone, Is.GreaterThan(0), "setup: soft offline did move pages");
        Assert.That(machine.GetStats().PoisonedPages, Is.GreaterThanOrEqualTo(softDone + hardDone));
        TestContext.Out.WriteLine($"{(until is null ? rounds : "timed")} rounds: {softDone} soft offlines, {hardDone} poisons, {machine.GetMigrationStats().FailedByReason[MigrateReason.MemoryFailure]} pages not moved");
        TestMachines.AssertAuditClean(machine);
    }
}
