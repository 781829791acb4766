using Vmm.Mm;
using static Vmm.Tests.TestMachines;

namespace Vmm.Tests.Mm;

[TestFixture]
[Category("Smoke")]
public sealed class ProcessTests
{
    [Test]
    public void Written_bytes_read_back_across_page_boundaries()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(5 * 4096, options: TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        byte[] data = new byte[3 * 4096 + 123];
        new Random(1).NextBytes(data);
        p.Write(va + 4000, data);
        byte[] back = new byte[data.Length];
        p.Read(va + 4000, back);
        Assert.That(back, Is.EqualTo(data));
        p.Write<long>(va + 4092, 0x1122334455667788); // straddles a page boundary
        Assert.That(p.Read<long>(va + 4092), Is.EqualTo(0x1122334455667788));
        Assert.That(p.Read<int>(va + 5 * 4096 - 4), Is.Zero, "untouched memory reads zero");
        AssertAuditClean(machine);
    }

    [Test]
    public void Large_writes_and_reads_stream_across_neighbouring_frames_and_keep_every_byte()
    {
        using Machine machine = Create(TwoNodes);
        VmProcess p = machine.CreateProcess();
        const int size = 1 << 20;
        ulong va = p.Mmap(size + 8192);
        p.Fill(va, size + 8192, 0); // fault in order: neighbouring frames, so copies coalesce into runs
        Assert.That(p.GetPagemap(va + 4096).Pfn, Is.EqualTo(p.GetPagemap(va).Pfn + 1), "sequential faults get neighbouring frames");
        byte[] data = new byte[size];
        new Random(5).NextBytes(data);
        p.Write(va + 4096, data); // large enough for non-temporal stores
        p.Write(va + 100, data.AsSpan(0, 10_000)); // unaligned, small
        byte[] back = new byte[size];
        p.Read(va + 4096, back);
        byte[] expected = (byte[])data.Clone();
        data.AsSpan(3996, 6004).CopyTo(expected); // the small write (bytes 100..10099) overlapped the start of the large one
        Assert.That(back, Is.EqualTo(expected));
        VmProcess child = p.Fork();
        child.Write<byte>(va + 4096 * 10, 1); // one page of the run becomes a copy: the run breaks there
        byte[] childBack = new byte[size];
        child.Read(va + 4096, childBack);
        expected[4096 * 9] = 1;
        Assert.That(childBack, Is.EqualTo(expected));
        AssertAuditClean(machine);
    }

    [Test]
    public void Reading_untouched_memory_maps_the_zero_page_and_allocates_nothing()
    {
        using Machine machine = Create(TwoNodes);
        VmProcess p = machine.CreateProcess();
        long freeBefore = machine.GetStats().AllFreePages;
        ulong va = p.Mmap(64 * 4096);
        byte[] page = new byte[4096];
        for (int i = 0; i < 64; i++)
            p.Read(va + (ulong)i * 4096, page);
        Assert.That(page, Is.All.EqualTo(0));
        Assert.That(p.RssAnonPages, Is.Zero, "the zero page is not counted");
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore - p.PageTablePages - 1), "only page tables and the zero page (made on first use) were allocated");
        p.Write<byte>(va + 4096, 1);
        Assert.That(p.RssAnonPages, Is.EqualTo(1), "a write replaces the zero page with a private page");
        Assert.That(p.Read<byte>(va), Is.Zero);
        AssertAuditClean(machine);
    }

    [Test]
    public void Fork_shares_pages_copy_on_write()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(16 * 4096, options: TwoNodes);
        (Machine machine, VmProcess parent, ulong va, _) = region;
        parent.Fill(va, 16 * 4096, 0xAA);
        VmProcess child = parent.Fork();
        AssertAuditClean(machine);
        long freeAfterFork = machine.GetStats().AllFreePages;
        Assert.That(child.Read<byte>(va + 5), Is.EqualTo(0xAA), "the child sees the parent's memory");

        child.Write<byte>(va + 5, 0xBB);
        Assert.That(parent.Read<byte>(va + 5), Is.EqualTo(0xAA), "the parent does not see the child's write");
        Assert.That(child.Read<byte>(va + 5), Is.EqualTo(0xBB));
        Assert.That(child.Read<byte>(va + 6), Is.EqualTo(0xAA), "the copy keeps the rest of the page");
        parent.Write<byte>(va + 4096, 0xCC);
        Assert.That(child.Read<byte>(va + 4096), Is.EqualTo(0xAA));
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeAfterFork - 2), "exactly two pages were copied");
        AssertAuditClean(machine);

        parent.Write<byte>(va + 5, 0xDD);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeAfterFork - 2),
            "after the child copied, the parent's page is its alone and is reused without copying");
        AssertAuditClean(machine);
    }

    [Test]
    public void Shared_mappings_stay_shared_across_fork()
    {
        using Machine machine = Create(TwoNodes);
        VmProcess parent = machine.CreateProcess();
        Assert.That(parent.Mmap(0, 8 * 4096, Protection.ReadWrite, MapFlags.Shared, out ulong va), Is.EqualTo(Errno.None));
        parent.Write<int>(va, 1);
        VmProcess child = parent.Fork();
        child.Write<int>(va, 2);
        Assert.That(parent.Read<int>(va), Is.EqualTo(2), "a shared page is the same frame in both");
        child.Write<int>(va + 4096 * 3, 7); // never touched before the fork
        Assert.That(parent.Read<int>(va + 4096 * 3), Is.EqualTo(7), "pages created after fork are shared too");
        AssertAuditClean(machine);
        child.Exit();
        Assert.That(parent.Read<int>(va + 4096 * 3), Is.EqualTo(7));
        AssertAuditClean(machine);
    }

    [Test]
    public void Unmapping_zero_page_mappings_invalidates_other_threads_translations()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096, options: TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        using var read = new AutoResetEvent(false);
        using var go = new AutoResetEvent(false);
        object? seen = null;
        var reader = new Thread(() =>
        {
            _ = p.Read<int>(va); // caches the zero page's translation in this thread's TLB
            read.Set();
            go.WaitOne();
            try
            {
                seen = p.Read<int>(va);
            }
            catch (SegmentationFault fault)
            {
                seen = fault;
            }
            read.Set();
            go.WaitOne();
            seen = p.Read<int>(va);
            read.Set();
        });
        reader.Start();
        read.WaitOne();
        Assert.That(p.Munmap(va, 4096), Is.EqualTo(Errno.None));
        go.Set();
        read.WaitOne();
        Assert.That(seen, Is.InstanceOf<SegmentationFault>(), "after munmap the other thread's read faults");
        Assert.That(p.Mmap(va, 4096, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed, out _), Is.EqualTo(Errno.None));
        p.Write<int>(va, 0x42);
        go.Set();
        read.WaitOne();
        reader.Join();
        Assert.That(seen, Is.EqualTo(0x42), "and sees the new mapping's data, not the zero page");
    }

    [Test]
    public void Exit_of_every_process_frees_every_frame()
    {
        using Machine machine = Create(TwoNodes);
        long free = machine.GetStats().AllFreePages;
        VmProcess a = machine.CreateProcess();
        ulong va = a.Mmap(100 * 4096);
        a.Fill(va, 100 * 4096, 3);
        Assert.That(a.Mmap(0, 10 * 4096, Protection.ReadWrite, MapFlags.Shared, out ulong shared), Is.EqualTo(Errno.None));
        a.Fill(shared, 10 * 4096, 4);
        VmProcess b = a.Fork();
        VmProcess c = b.Fork();
        c.Fill(va, 50 * 4096, 9);
        AssertAuditClean(machine);
        a.Exit();
        b.Exit();
        AssertAuditClean(machine);
        Assert.That(c.Read<byte>(va + 60 * 4096), Is.EqualTo(3), "pages survive while one process maps them");
        c.Exit();
        AssertAuditClean(machine);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(free), "every frame is free again");
        Assert.That(machine.Processes, Is.Empty);
    }

    [Test]
    public void Munmap_frees_pages_and_page_tables_and_later_access_faults()
    {
        using Machine machine = Create(TwoNodes);
        VmProcess p = machine.CreateProcess();
        long free = machine.GetStats().AllFreePages;
        ulong va = p.Mmap(1024 * 4096);
        p.Fill(va, 1024 * 4096, 1);
        Assert.That(p.Munmap(va, 1024 * 4096), Is.EqualTo(Errno.None));
        AssertAuditClean(machine);
        Assert.That(p.PageTablePages, Is.EqualTo(1), "only the PGD stays");
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(free - 1));
        var fault = Assert.Throws<SegmentationFault>(() => p.Read<byte>(va));
        Assert.That(fault!.Reason, Is.EqualTo(SegvReason.MapError));
        Assert.That(fault.Address, Is.EqualTo(va));
        Assert.That(fault.Kind, Is.EqualTo(AccessKind.Read));
    }

    [Test]
    public void Range_walks_cross_missing_upper_level_tables_and_find_every_page()
    {
        // One 2 TiB mapping touched at a few pages that live under different PGD and PUD entries:
        // mprotect, fork and munmap each walk it in one pass and must skip the holes at every level.
        using Machine machine = Create(TwoNodes);
        VmProcess p = machine.CreateProcess();
        const ulong GiB = 1UL << 30;
        const ulong start = 512 * GiB - 3 * 4096; // the first pages sit at the very end of PGD entry 0
        const ulong length = 2048 * GiB;
        Assert.That(p.Mmap(start, length, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed, out ulong va), Is.EqualTo(Errno.None));
        long free = machine.GetStats().AllFreePages;
        ulong[] touched = [va, va + 2 * 4096, va + 3 * 4096, va + 7 * GiB + 5 * 4096, va + 1000 * GiB, va + length - 4096];
        for (int i = 0; i < touched.Length; i++)
            p.Write<long>(touched[i], 1000 + i);

        Assert.That(p.Mprotect(va, length, Protection.Read), Is.EqualTo(Errno.None));
        foreach (ulong a in touched)
            Assert.Throws<SegmentationFault>(() => p.Write<long>(a, -1), $"{a:x} is write-protected");

        VmProcess child = p.Fork();
        for (int i = 0; i < touched.Length; i++)
            Assert.That(child.Read<long>(touched[i]), Is.EqualTo(1000 + i), $"the child sees {touched[i]:x}");
        Assert.That(child.RssAnonPages, Is.EqualTo(touched.Length));
        AssertAuditClean(machine);

        child.Exit();
        // A walk that starts inside a missing PUD entry, at an offset past the next touched page's
        // offset in its table: skipping must realign, or it lands beyond that page.
        ulong from = va + 4 * GiB + 8 * 4096;
        Assert.That(p.Mprotect(from, va + length - from, Protection.ReadWrite), Is.EqualTo(Errno.None));
        for (int i = 0; i < touched.Length; i++)
        {
            if (touched[i] < from)
                Assert.Throws<SegmentationFault>(() => p.Write<long>(touched[i], -1), $"{touched[i]:x} stays read-only");
            else
                Assert.DoesNotThrow(() => p.Write<long>(touched[i], -1), $"{touched[i]:x} is writable again");
        }

        Assert.That(p.Munmap(va, length), Is.EqualTo(Errno.None));
        Assert.That(p.RssAnonPages, Is.Zero);
        Assert.That(p.PageTablePages, Is.EqualTo(1), "only the PGD stays");
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(free - 1), "every page and table but the PGD came back");
        AssertAuditClean(machine);
    }

    [Test]
    public void Partial_munmap_splits_the_mapping()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(10 * 4096, options: TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        p.Fill(va, 10 * 4096, 5);
        Assert.That(p.Munmap(va + 3 * 4096, 2 * 4096), Is.EqualTo(Errno.None));
        Assert.That(p.Read<byte>(va + 2 * 4096), Is.EqualTo(5));
        Assert.That(p.Read<byte>(va + 5 * 4096), Is.EqualTo(5));
        Assert.Throws<SegmentationFault>(() => p.Read<byte>(va + 3 * 4096));
        Assert.That(p.RssAnonPages, Is.EqualTo(8));
        AssertAuditClean(machine);
    }

    [Test]
    public void Mprotect_read_only_makes_writes_fault_and_restoring_write_works()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4 * 4096, options: TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        p.Fill(va, 4 * 4096, 1);
        Assert.That(p.Mprotect(va + 4096, 4096, Protection.Read), Is.EqualTo(Errno.None));
        var fault = Assert.Throws<SegmentationFault>(() => p.Write<byte>(va + 4096, 2));
        Assert.That(fault!.Reason, Is.EqualTo(SegvReason.AccessError));
        Assert.That(p.Read<byte>(va + 4096), Is.EqualTo(1), "the failed write changed nothing");
        p.Write<byte>(va, 2);
        Assert.That(p.Mprotect(va + 4096, 4096, Protection.None), Is.EqualTo(Errno.None));
        Assert.Throws<SegmentationFault>(() => p.Read<byte>(va + 4096));
        Assert.That(p.Mprotect(va, 4 * 4096, Protection.ReadWrite), Is.EqualTo(Errno.None));
        p.Write<byte>(va + 4096, 3);
        Assert.That(p.Read<byte>(va + 4096), Is.EqualTo(3));
        AssertAuditClean(machine);
    }

    [Test]
    public void Madvise_dontneed_drops_private_pages_which_then_read_zero()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(8 * 4096, options: TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        p.Fill(va, 8 * 4096, 7);
        Assert.That(p.Madvise(va, 4 * 4096, Advice.DontNeed), Is.EqualTo(Errno.None));
        Assert.That(p.RssAnonPages, Is.EqualTo(4));
        Assert.That(p.Read<byte>(va), Is.Zero);
        Assert.That(p.Read<byte>(va + 4 * 4096), Is.EqualTo(7));
        AssertAuditClean(machine);
    }

    [Test]
    public void Running_out_of_frames_is_the_documented_out_of_memory_exception_and_changes_nothing()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096UL * 4096, options: TestMachines.Small with { NodeCount = 1 });
        (Machine machine, VmProcess p, ulong va, _) = region;
        ulong touched = 0;
        var fault = Assert.Throws<InsufficientMemoryException>(() =>
        {
            for (; touched < 4096; touched++)
                p.Write<byte>(va + touched * 4096, 1);
        });
        Assert.That(fault!.Message, Does.Contain("out of memory"));
        Assert.That(touched, Is.GreaterThan(500));
        AssertAuditClean(machine);
        p.Exit();
        AssertAuditClean(machine);
    }
}
