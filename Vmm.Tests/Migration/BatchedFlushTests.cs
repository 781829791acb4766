using Vmm.Memory;
using Vmm.Mm;
using Vmm.Rmap;

namespace Vmm.Tests.Migration;

/// <summary>
/// The migrator's batched TLB flush (TryToMigrate with an UnmapBatch, flushed once after the batch's last
/// page) against calls that change a migration entry and return before that flush: a thread's software TLB
/// still holds the page's old frame then, and the call must flush itself (Linux's
/// flush_tlb_batched_pending), or that thread's next access reaches the old frame. Each test stops the
/// migrator between its unmap and its flush, as the compaction soak's failures did by chance (a write lost
/// after MADV_DONTNEED, an old content read back); and KSM's write-protect, whose flush waits for the end
/// of its merge batch, against fork and mprotect, which then meet a PTE that is read-only already.
/// </summary>
[TestFixture]
[Category("Migration")]
public sealed class BatchedFlushTests
{
    private const int PageSize = 4096;

    /// <summary>The migrator's steps up to its flush: the page isolated and locked, its mappings migration entries, nothing flushed.</summary>
    private static (long Pfn, UnmapBatch Batch) UnmapWithoutFlush(Machine machine, VmProcess process, ulong va)
    {
        long pfn = process.GetPagemap(va).Pfn;
        machine.MemMap.GetPage(pfn);
        if (!machine.Lru.Isolate(pfn))
        {
            machine.Lru.DrainAll();
            Assert.That(machine.Lru.Isolate(pfn), Is.True, "setup: the page isolates");
        }
        machine.PutPage(pfn);
        Assert.That(machine.PageLock.TryLock(pfn), Is.True);
        var batch = new UnmapBatch(machine.MemMap);
        Assert.That(machine.Rmap.TryToMigrate(pfn, batch), Is.True, "setup: every mapping is a migration entry");
        return (pfn, batch);
    }

    /// <summary>The migration given up: the entries left map the old frame again, the flush, the page back on its list.</summary>
    private static void MapBack(Machine machine, long pfn, UnmapBatch batch)
    {
        machine.Rmap.RemoveMigrationPtes(pfn, pfn, batch);
        machine.Rmap.FlushBatch(batch);
        machine.PageLock.Unlock(pfn);
        machine.Lru.Putback(pfn);
    }

    [Test]
    public void A_page_dropped_while_its_migration_waits_for_its_flush_reads_zero_at_once()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(PageSize);
        p.Fill(va, PageSize, 0x5A); // this thread's TLB now holds the frame, writable

        (long pfn, UnmapBatch batch) = UnmapWithoutFlush(machine, p, va);
        Assert.That(p.Madvise(va, PageSize, Advice.DontNeed), Is.EqualTo(Errno.None));
        byte[] seen = new byte[PageSize];
        p.Read(va, seen); // before the fix: a TLB hit on the old frame, 0x5A
        Assert.That(seen, Is.All.EqualTo((byte)0), "MADV_DONTNEED returned: the page reads zero");
        p.Write(va, 0x77UL); // before the fix: into the old frame, and lost
        MapBack(machine, pfn, batch); // the zapped entry stays zapped
        Assert.That(p.Read<ulong>(va), Is.EqualTo(0x77UL), "the write after MADV_DONTNEED is the page's");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_flush_that_read_the_marks_before_a_later_unmap_does_not_cover_it()
    {
        // The review's point against a flag: a flusher clears "pending" for marks it never flushed. With the
        // counters a flusher only moves "flushed" up to the marks it read before its bump. Here the flusher
        // reads the marks after page A's unmap, page B is unmapped before it finishes, and it finishes: B's
        // mark must still count as pending, so a zap of B (which meets only a migration entry, nothing
        // else to flush for) still flushes.
        using var machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(2 * PageSize), vb = va + PageSize;
        p.Fill(va, 2 * PageSize, 0x5A);

        (long pfnA, UnmapBatch batchA) = UnmapWithoutFlush(machine, p, va);
        FlushMarks flusherRead = p.Mm.ReadFlushMarks(); // the flusher of A's batch, before its bump
        (long pfnB, UnmapBatch batchB) = UnmapWithoutFlush(machine, p, vb);
        p.Mm.BumpGeneration(); // the flusher's bump and flush, then its report
        machine.Tlb.Flush();
        p.Mm.FlushedUpTo(flusherRead);
        Assert.That(p.Mm.FlushPending(flusherRead), Is.False, "what the flusher read is flushed");
        Assert.That(p.Mm.FlushPending(p.Mm.ReadFlushMarks()), Is.True, "B's later mark is not covered by a flush that read the marks before it");

        long generation = Volatile.Read(ref p.Mm.Generation);
        Assert.That(p.Madvise(vb, PageSize, Advice.DontNeed), Is.EqualTo(Errno.None));
        Assert.That(Volatile.Read(ref p.Mm.Generation), Is.GreaterThan(generation), "the zap flushed for B's pending mark");
        Assert.That(p.Mm.FlushPending(p.Mm.ReadFlushMarks()), Is.False, "and nothing is pending after it");
        Assert.That(p.Read<ulong>(vb), Is.Zero, "MADV_DONTNEED returned: B reads zero");
        MapBack(machine, pfnB, batchB);
        MapBack(machine, pfnA, batchA);
        Assert.That(p.Read<byte>(va), Is.EqualTo((byte)0x5A), "A was never dropped");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_parent_write_after_fork_while_a_migration_waits_for_its_flush_stays_out_of_the_child()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        VmProcess parent = machine.CreateProcess();
        ulong va = parent.Mmap(PageSize);
        (Thread writer, ManualResetEventSlim go, _) = WriterWithWritableTlb(parent, va);

        (long pfn, UnmapBatch batch) = UnmapWithoutFlush(machine, parent, va);
        VmProcess child = parent.Fork();
        go.Set();
        Thread.Sleep(100); // the write has hit its TLB by far (or, fixed, waits on the page lock)
        MapBack(machine, pfn, batch);
        writer.Join();

        Assert.That(child.Read<ulong>(va), Is.EqualTo(1UL), "the child sees the page as it was at fork");
        Assert.That(parent.Read<ulong>(va), Is.EqualTo(2UL));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_write_after_mprotect_read_only_while_a_migration_waits_for_its_flush_faults()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(PageSize);
        (Thread writer, ManualResetEventSlim go, Func<Exception?> caught) = WriterWithWritableTlb(p, va);

        (long pfn, UnmapBatch batch) = UnmapWithoutFlush(machine, p, va);
        Assert.That(p.Mprotect(va, PageSize, Protection.Read), Is.EqualTo(Errno.None));
        go.Set();
        Thread.Sleep(100); // the write has hit its TLB by far (or, fixed, waits on the page lock)
        MapBack(machine, pfn, batch);
        writer.Join();

        Assert.That(caught(), Is.TypeOf<SegmentationFault>(), "a write to a read-only page faults");
        Assert.That(p.Read<ulong>(va), Is.EqualTo(1UL));
        TestMachines.AssertAuditClean(machine);
    }

    /// <summary>
    /// KSM's step 1 for one page: the PTE write-protected under the page lock, its flush left to the end of
    /// the merge batch (not run here). A thread's TLB may still hold the page writable.
    /// </summary>
    private static void KsmWriteProtectWithoutFlush(Machine machine, VmProcess process, ulong va)
    {
        long pfn = process.GetPagemap(va).Pfn;
        AddressSpace mm = process.Mm;
        machine.Lru.DrainAll(); // an add batch's reference would look like a pin to the write-protect
        mm.MmapLock.EnterReadLock();
        machine.MemMap.GetPage(pfn);
        machine.PageLock.Lock(pfn);
        try
        {
            Assert.That(mm.KsmWriteProtect(va, pfn, out _, out bool changed) && changed, Is.True, "setup: a writable PTE write-protected");
        }
        finally
        {
            machine.PageLock.Unlock(pfn);
            machine.PutPage(pfn);
            mm.MmapLock.ExitReadLock();
        }
    }

    /// <summary>A thread that writes 1 at <paramref name="va"/> (its TLB then holds the page writable), waits, then writes 2.</summary>
    private static (Thread Thread, ManualResetEventSlim Go, Func<Exception?> Caught) WriterWithWritableTlb(VmProcess process, ulong va)
    {
        var written = new ManualResetEventSlim();
        var go = new ManualResetEventSlim();
        Exception? caught = null;
        var thread = new Thread(() =>
        {
            process.Write(va, 1UL);
            written.Set();
            go.Wait();
            try
            {
                process.Write(va, 2UL);
            }
            catch (Exception e)
            {
                caught = e;
            }
        });
        thread.Start();
        written.Wait();
        return (thread, go, () => caught);
    }

    [Test]
    public void A_parent_write_after_fork_while_ksm_waits_for_its_flush_stays_out_of_the_child()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        VmProcess parent = machine.CreateProcess();
        ulong va = parent.Mmap(PageSize);
        (Thread writer, ManualResetEventSlim go, _) = WriterWithWritableTlb(parent, va);

        KsmWriteProtectWithoutFlush(machine, parent, va);
        VmProcess child = parent.Fork(); // before the fix: the PTE was read-only already, so no flush
        go.Set();
        writer.Join(); // before the fix: a TLB hit, into the frame the child shares

        Assert.That(child.Read<ulong>(va), Is.EqualTo(1UL), "the child sees the page as it was at fork");
        Assert.That(parent.Read<ulong>(va), Is.EqualTo(2UL));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public unsafe void A_copy_on_write_copy_waits_for_a_write_through_a_translation_ksm_has_not_flushed_yet()
    {
        // A thread inside an access section translated the page writable before KSM write-protected it, and
        // writes through that translation later (a copy in progress). KSM's flush waits for its section; a
        // copy-on-write copy of the page made meanwhile must wait too (flush_tlb_batched_pending for KSM's
        // protect mark), or the write lands in the old frame after the copy and is lost.
        using var machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(PageSize);
        p.Fill(va, PageSize, 0x11);

        var translated = new ManualResetEventSlim();
        var go = new ManualResetEventSlim();
        var inSection = new Thread(() =>
        {
            AccessContext context = AccessContext.Current;
            TlbShootdown.Enter(context);
            byte* frame = p.Mm.Translate(context, va, write: true);
            translated.Set();
            go.Wait();
            if (frame != null)
                frame[100] = 0x99;
            TlbShootdown.Exit(context);
        }) { IsBackground = true };
        inSection.Start();
        translated.Wait();

        KsmWriteProtectWithoutFlush(machine, p, va);
        long pfn = p.GetPagemap(va).Pfn;
        machine.MemMap.GetPage(pfn); // a second reference, as KSM's merge batch holds one: the fault copies
        Exception? faultFailure = null;
        var writer = new Thread(() =>
        {
            try { p.Write(va, (byte)0x77); }
            catch (Exception e) { faultFailure = e; }
        }) { IsBackground = true };
        writer.Start();
        bool copiedAtOnce = writer.Join(200); // fixed: the copy waits for the section; before: it copied at once
        go.Set();
        inSection.Join();
        writer.Join();
        machine.PutPage(pfn);
        TestContext.Out.WriteLine(copiedAtOnce ? "the fault did not wait" : "the fault waited for the section");

        Assert.That(faultFailure, Is.Null);
        Assert.That(p.GetPagemap(va).Pfn, Is.Not.EqualTo(pfn), "setup: the write fault copied the page");
        Assert.That(p.Read<byte>(va), Is.EqualTo((byte)0x77), "the faulting write");
        Assert.That(p.Read<byte>(va + 100), Is.EqualTo((byte)0x99), "the write through the translation KSM had not flushed yet is in the copy");
        machine.Tlb.Flush();
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_write_after_mprotect_read_only_while_ksm_waits_for_its_flush_faults()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(PageSize);
        (Thread writer, ManualResetEventSlim go, Func<Exception?> caught) = WriterWithWritableTlb(p, va);

        KsmWriteProtectWithoutFlush(machine, p, va);
        Assert.That(p.Mprotect(va, PageSize, Protection.Read), Is.EqualTo(Errno.None)); // before the fix: nothing to narrow, no flush
        go.Set();
        writer.Join();

        Assert.That(caught(), Is.TypeOf<SegmentationFault>(), "a write to a read-only page faults");
        Assert.That(p.Read<ulong>(va), Is.EqualTo(1UL));
        TestMachines.AssertAuditClean(machine);
    }
}
