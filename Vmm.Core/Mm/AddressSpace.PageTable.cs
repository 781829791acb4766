// The page tables of an address space: 4 levels (PGD, PUD, PMD, PTE table) of 512 64-bit entries,
// each table one arena frame allocated unmovable, flagged PG_table and counted in PageTables.
//
// Locking: page_table_lock (per mm) to install an upper-level entry; the pte lock (the spin word in the
// PTE table frame's PageDescriptor.Private) for leaf entries; tables are freed under the mmap_lock for
// write, after their VMAs are unlinked from the reverse map and after a flush.
//
// Upper-level entries are installed under the mm's page_table_lock; leaf entries are changed under the
// pte lock of their PTE table, a spin word kept in the table frame's descriptor (Linux's split ptlock).
// Readers (the access path, inside an access section) walk without locks: a table is freed only after
// a TLB flush, so a walker never follows a pointer into a freed frame.
using System.Runtime.CompilerServices;
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Native;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    // The page size of the machinery is Topology's; here as ulong, the type of virtual addresses.
    public const int PageShift = Topology.PageShift;
    public const ulong PageSize = Topology.PageSize;
    public const ulong PageMask = PageSize - 1;

    /// <summary>TASK_SIZE: user addresses lie below it (47 bits, as on x86-64 with 4-level tables).</summary>
    public const ulong TaskSize = 0x0000_7FFF_FFFF_F000;

    /// <summary>mmap_min_addr: nothing is mapped below 64 KiB.</summary>
    public const ulong MmapMinAddr = 0x10000;

    private const int EntriesPerTable = 512;

    private readonly Lock _pageTableLock = new();
    private long _pgdPfn = -1; // -1: no PGD yet (pfn 0 is a valid frame)

    /// <summary>Page-table frames this mm uses (pgtables_bytes / 4096). Atomic.</summary>
    public long PageTablePages;

    /// <summary>The end of the 2 MiB that the PTE table covering <paramref name="va"/> spans.</summary>
    private static ulong PteTableEnd(ulong va) => (va | ((PageSize << 9) - 1)) + 1;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int Index(ulong va, int level) => (int)((va >> (PageShift + 9 * level)) & (EntriesPerTable - 1));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private ulong* Table(long pfn) => (ulong*)_machine.Arena.FrameAddress(pfn);

    /// <summary>
    /// Finds the PTE slot for <paramref name="va"/> without allocating. Null if a level is missing, or if
    /// <paramref name="va"/> lies at or above TASK_SIZE: the indexes take 9 bits per level and would
    /// otherwise alias bits 47-63 onto a user address. Safe inside an access section or under the mmap_lock.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public ulong* FindPte(ulong va, out long ptePfn)
    {
        ptePfn = -1;
        if (va >= TaskSize)
            return null;
        long pfn = Volatile.Read(ref _pgdPfn);
        if (pfn < 0)
            return null;
        for (int level = 3; level >= 1; level--)
        {
            ulong entry = Volatile.Read(ref Table(pfn)[Index(va, level)]);
            if ((entry & Pte.PresentBit) == 0)
                return null;
            pfn = (long)((entry & Pte.PfnMask) >> PageShift);
        }
        ptePfn = pfn;
        return Table(pfn) + Index(va, 0);
    }

    /// <summary>
    /// The skeleton of every range walk (zap, fork, mprotect, and later the KSM scanner and unmerge):
    /// returns the first PTE table that covers an address in [<paramref name="va"/>, <paramref name="end"/>)
    /// and moves <paramref name="va"/> to the first such address, or returns null if there is none. A
    /// missing upper-level entry is skipped whole (1 GiB or 512 GiB for one probe), so walking a sparse
    /// range costs what its tables hold, not its length. The caller steps through the table's slots up to
    /// <c>min(end, PteTableEnd(va))</c>. Preconditions: mmap_lock held (tables are freed only under it
    /// for write).
    /// </summary>
    private ulong* NextPteTable(ref ulong va, ulong end, out long ptePfn)
    {
        LockAssert.MmapLockHeld(this);
        ptePfn = -1;
        long pgd = Volatile.Read(ref _pgdPfn);
        while (pgd >= 0 && va < end)
        {
            long pfn = pgd;
            int level = 3;
            for (; level >= 1; level--)
            {
                ulong entry = Volatile.Read(ref Table(pfn)[Index(va, level)]);
                if ((entry & Pte.PresentBit) == 0)
                    break;
                pfn = (long)((entry & Pte.PfnMask) >> PageShift);
            }
            if (level == 0)
            {
                ptePfn = pfn;
                return Table(pfn);
            }
            // No table at this level: skip everything the missing entry would have covered.
            ulong span = 1UL << (PageShift + 9 * level);
            ulong next = (va & ~(span - 1)) + span;
            if (next <= va)
                break; // the top of the address space
            va = next;
        }
        return null;
    }

    /// <summary>
    /// The first address in [<paramref name="va"/>, <paramref name="end"/>) that a PTE table covers, or
    /// <paramref name="end"/> if none does: lets a page-by-page query of a sparse range (DedupeStore's
    /// estimate over a 1 TiB buffer) skip the missing page-table levels whole instead of asking for each
    /// of its 2^28 pages. Takes mmap_lock for read.
    /// </summary>
    public ulong SkipToPageTable(ulong va, ulong end)
    {
        MmapLock.EnterReadLock();
        try
        {
            return NextPteTable(ref va, end, out _) == null ? end : va;
        }
        finally
        {
            MmapLock.ExitReadLock();
        }
    }

    /// <summary>
    /// Finds the PTE slot for <paramref name="va"/>, allocating missing tables. Null if no frame could be
    /// allocated for a table (the caller reports out-of-memory; nothing was changed).
    /// Preconditions: mmap_lock held (read or write); <paramref name="va"/> below TASK_SIZE (it lies in a VMA).
    /// </summary>
    public ulong* AllocPte(ulong va, out long ptePfn)
    {
        LockAssert.MmapLockHeld(this);
        ptePfn = -1;
        long pfn = EnsurePgd();
        if (pfn < 0)
            return null;
        for (int level = 3; level >= 1; level--)
        {
            ulong* slot = Table(pfn) + Index(va, level);
            ulong entry = Volatile.Read(ref *slot);
            if ((entry & Pte.PresentBit) == 0)
            {
                long fresh = AllocTablePage();
                if (fresh < 0)
                    return null;
                lock (_pageTableLock)
                {
                    entry = Volatile.Read(ref *slot);
                    if ((entry & Pte.PresentBit) == 0)
                    {
                        entry = Pte.Table(fresh).Value;
                        Volatile.Write(ref *slot, entry);
                        fresh = -1;
                    }
                }
                if (fresh >= 0)
                    FreeTablePage(fresh); // another thread installed it first
            }
            pfn = (long)((entry & Pte.PfnMask) >> PageShift);
        }
        ptePfn = pfn;
        return Table(pfn) + Index(va, 0);
    }

    private long EnsurePgd()
    {
        long pfn = Volatile.Read(ref _pgdPfn);
        if (pfn >= 0)
            return pfn;
        long fresh = AllocTablePage();
        if (fresh < 0)
            return -1;
        lock (_pageTableLock)
        {
            if (_pgdPfn < 0)
            {
                Volatile.Write(ref _pgdPfn, fresh);
                return fresh;
            }
        }
        FreeTablePage(fresh);
        return _pgdPfn;
    }

    private long AllocTablePage()
    {
        // Page tables are unmovable kernel memory: ZONE_NORMAL, near the process.
        long pfn = _machine.Allocator.AllocPages(0, AllocFlags.None, HomeNode);
        if (pfn == PageAllocator.NoPfn)
            return -1;
        _machine.MemMap.SetFlag(pfn, PageFlags.Table);
        Interlocked.Increment(ref PageTablePages);
        Interlocked.Increment(ref _machine.PageTablePagesTotal);
        return pfn;
    }

    private void FreeTablePage(long pfn)
    {
        _machine.MemMap[pfn].Private = 0; // the pte lock word
        _machine.MemMap.ClearFlag(pfn, PageFlags.Table);
        Interlocked.Decrement(ref PageTablePages);
        Interlocked.Decrement(ref _machine.PageTablePagesTotal);
        _machine.Allocator.FreePages(pfn);
    }

    // ---- the pte lock ------------------------------------------------------------------------------

    // The value a holder stores in the table frame's Private word: 1 in Release (the same
    // CompareExchange as ever on the fault path), the owner's managed thread id in Debug, so that
    // LockAssert.PteLockHeld can ask "held by this thread" (ids are never 0, the free value).
#if DEBUG
    private static ulong PteLockHeldValue => (ulong)Environment.CurrentManagedThreadId;
#else
    private const ulong PteLockHeldValue = 1;
#endif

    /// <summary>Takes the pte lock of a PTE table (a spin lock: holders never block).</summary>
    public void LockPte(long ptePfn)
    {
        ref ulong word = ref _machine.MemMap[ptePfn].Private;
        if (Interlocked.CompareExchange(ref word, PteLockHeldValue, 0) == 0)
            return;
        // Contended: in Debug, a lock this thread already holds is a self-deadlock; say so instead of spinning.
        LockAssert.That(Volatile.Read(ref word) != (ulong)Environment.CurrentManagedThreadId,
            $"the pte lock of table frame {ptePfn} not already held by this thread (it would spin forever)");
        var spinner = new SpinWait();
        while (Volatile.Read(ref word) != 0 || Interlocked.CompareExchange(ref word, PteLockHeldValue, 0) != 0)
            spinner.SpinOnce();
    }

    /// <summary>Releases the pte lock of a PTE table. Preconditions: this thread holds it.</summary>
    public void UnlockPte(long ptePfn)
    {
        LockAssert.PteLockHeld(this, ptePfn);
        Volatile.Write(ref _machine.MemMap[ptePfn].Private, 0UL);
    }

#if DEBUG
    /// <summary>Debug only: whether this thread holds the pte lock of <paramref name="ptePfn"/>.</summary>
    public bool IsPteLockHeldByCurrentThread(long ptePfn) =>
        Volatile.Read(ref _machine.MemMap[ptePfn].Private) == (ulong)Environment.CurrentManagedThreadId;
#endif

    // ---- freeing tables ------------------------------------------------------------------------------

    /// <summary>
    /// free_pgtables: unhooks every table whose whole span lies in [floor, ceiling) and queues it to be
    /// freed after the next flush. The span must hold no VMA (so every entry below is none).
    /// Preconditions: mmap_lock held for write; the VMAs of the span are already unlinked from the rmap.
    /// </summary>
    private void FreePageTables(ulong floor, ulong ceiling, List<long> tablesToFree)
    {
        LockAssert.MmapLockHeld(this, write: true);
        long pgd = Volatile.Read(ref _pgdPfn);
        if (pgd < 0 || floor >= ceiling)
            return;
        FreeLevel(pgd, 3, 0, floor, ceiling, tablesToFree);
    }

    /// <summary>Unhooks and queues the child tables of one table whose span lies wholly in [floor, ceiling).</summary>
    private void FreeLevel(long tablePfn, int level, ulong tableBase, ulong floor, ulong ceiling, List<long> tablesToFree)
    {
        if (level == 0)
            return; // the entries are PTEs, already zapped
        ulong* table = Table(tablePfn);
        ulong childSpan = 1UL << (PageShift + 9 * level);
        for (int i = 0; i < EntriesPerTable; i++)
        {
            ulong entry = table[i];
            ulong childBase = tableBase + (ulong)i * childSpan;
            if (entry == 0 || childBase + childSpan <= floor || childBase >= ceiling)
                continue;
            long child = (long)((entry & Pte.PfnMask) >> PageShift);
            if (childBase >= floor && childBase + childSpan <= ceiling)
            {
                Volatile.Write(ref table[i], 0UL);
                FreeSubtree(child, level - 1, tablesToFree);
            }
            else
            {
                FreeLevel(child, level - 1, childBase, floor, ceiling, tablesToFree);
            }
        }
    }

    private void FreeSubtree(long tablePfn, int level, List<long> tablesToFree)
    {
        ulong* table = Table(tablePfn);
        for (int i = 0; i < EntriesPerTable; i++)
        {
            ulong entry = table[i];
            if (entry == 0)
                continue;
            if (level == 0)
                throw new VmBugException($"freeing a PTE table (frame {tablePfn}) that still maps {new Pte(entry)}");
            FreeSubtree((long)((entry & Pte.PfnMask) >> PageShift), level - 1, tablesToFree);
        }
        tablesToFree.Add(tablePfn);
    }

    /// <summary>Every page-table frame of the mm, the PGD included. Preconditions: mmap_lock held.</summary>
    public List<long> EnumerateTablePages()
    {
        LockAssert.MmapLockHeld(this);
        var result = new List<long>();
        long pgd = Volatile.Read(ref _pgdPfn);
        if (pgd >= 0)
            CollectTables(pgd, 3, result);
        return result;
    }

    private void CollectTables(long pfn, int level, List<long> result)
    {
        result.Add(pfn);
        if (level == 0)
            return;
        for (int i = 0; i < EntriesPerTable; i++)
        {
            ulong entry = Volatile.Read(ref Table(pfn)[i]);
            if ((entry & Pte.PresentBit) != 0)
                CollectTables((long)((entry & Pte.PfnMask) >> PageShift), level - 1, result);
        }
    }

    /// <summary>Every non-none leaf entry with its address. Preconditions: mmap_lock held.</summary>
    public IEnumerable<(ulong Va, Pte Pte)> EnumeratePtes()
    {
        LockAssert.MmapLockHeld(this);
        var result = new List<(ulong, Pte)>();
        long pgd = Volatile.Read(ref _pgdPfn);
        if (pgd >= 0)
            CollectPtes(pgd, 3, 0, result);
        return result;
    }

    private void CollectPtes(long pfn, int level, ulong tableBase, List<(ulong, Pte)> result)
    {
        ulong childSpan = 1UL << (PageShift + 9 * level);
        for (int i = 0; i < EntriesPerTable; i++)
        {
            ulong entry = Volatile.Read(ref Table(pfn)[i]);
            if (entry == 0)
                continue;
            ulong va = tableBase + (ulong)i * childSpan;
            if (level == 0)
                result.Add((va, new Pte(entry)));
            else if ((entry & Pte.PresentBit) != 0)
                CollectPtes((long)((entry & Pte.PfnMask) >> PageShift), level - 1, va, result);
        }
    }
}
