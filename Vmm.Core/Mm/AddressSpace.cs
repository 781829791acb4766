// AddressSpace: one process's virtual memory (Linux's mm_struct): its fields and counters, the VMA list
// (find, insert, split, merge, the reverse-map links) and exit. The rest of the type lives in partial
// files by mechanism: the syscalls by call family (AddressSpace.Mmap.cs: mmap, munmap and the zap;
// AddressSpace.Mprotect.cs; AddressSpace.Madvise.cs), faults (.Fault), page tables (.PageTable), user
// access (.Access), fork (.Fork), pins (.Pin), KSM's PTE changes (.Ksm), page replacement (.Replace).
//
// Every change that removes or narrows a translation (munmap, mprotect without write, DONTNEED, fork's
// write-protect, copy-on-write) follows the same order: change the PTEs under the pte lock, bump the
// mm's generation (so software TLB entries go stale), flush (TlbShootdown), and only then release
// frames or page tables. That order is what makes the access protocol's rule hold.
//
// Writers of the mmap_lock besides those named below: madvise, PR_SET_MEMORY_MERGE and SetDedupeDomain.
// A VMA's first anon_vma is the one VMA field installed under it held only for read (with the VMA's
// monitor: AddressSpace.PrepareAnonVma, Vma.cs).
//
// Locking: the mmap_lock (reader/writer) protects the VMA list and every VMA's fields; faults take it
// for read, mmap / munmap / mprotect / fork / exit for write. See docs/locking.md.
using Vmm.Diagnostics;
using Vmm.Rmap;

namespace Vmm.Mm;

/// <summary>A process's address space. Internal: hosts use <see cref="VmProcess"/>.</summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "The mmap_lock lives as long as the address space; a racing fault may still touch it after exit, so it is never disposed.")]
internal sealed unsafe partial class AddressSpace
{
    private static long _nextId;

    private readonly Machine _machine;
    private readonly List<Vma> _vmas = []; // sorted by Start, non-overlapping; protected by MmapLock

    public AddressSpace(Machine machine, int homeNode)
    {
        _machine = machine;
        HomeNode = homeNode;
        MemsAllowed = machine.NodesWithMemory; // the root cpuset's, until a cpuset says otherwise
        Id = Interlocked.Increment(ref _nextId);
    }

    /// <summary>Immutable: a process-wide unique id (keys the software TLB).</summary>
    public long Id { get; }

    /// <summary>The node new pages are allocated on first. Set at creation, then not changed.</summary>
    public int HomeNode { get; set; }

    public Machine Machine => _machine;

    /// <summary>The mmap_lock: protects the VMA list, every VMA's fields (see Vma) and Exited. Immutable reference.</summary>
    public readonly ReaderWriterLockSlim MmapLock = new(LockRecursionPolicy.NoRecursion);

    /// <summary>Bumped whenever a translation is removed or narrowed; software TLB entries of older generations are stale. Atomic.</summary>
    public long Generation = 1;

    /// <summary>Set (under the mmap_lock for write) once exit has begun; the access path then faults.</summary>
    public volatile bool Exited;

    /// <summary>MM_ANONPAGES: private anonymous pages mapped. Atomic.</summary>
    public long RssAnon;

    /// <summary>MM_SHMEMPAGES: shared anonymous pages mapped. Atomic.</summary>
    public long RssShmem;

    /// <summary>The VMAs, in address order. Preconditions: mmap_lock held.</summary>
    public IReadOnlyList<Vma> Vmas
    {
        get
        {
            LockAssert.MmapLockHeld(this);
            return _vmas;
        }
    }

    public void BumpGeneration() => Interlocked.Increment(ref Generation);

    // Linux's mm->tlb_flush_batched, as two counters per kind: marks set and marks flushed. A mechanism
    // that narrows or removes a translation under the pte lock and flushes later, once for many, marks
    // the mm first: the migrator's unmap (one flush after the batch's last page) and try_to_unmap's walk
    // (one flush at its end) leave non-present entries ("unmap" marks); KSM's write-protect (one flush
    // per merge batch) leaves read-only PTEs ("protect" marks). Until that flush a thread's software TLB
    // may still hold the old translation, writable. A call that changes PTEs and returns must not leave
    // one behind: zap (MADV_DONTNEED, munmap, exit), mprotect and fork flush while a mark is not flushed
    // yet, and a copy-on-write copy does for protect marks (a write through the stale translation would
    // land in the frame after the copy). Without it a thread's next access reached the old frame after
    // MADV_DONTNEED returned: a write lost, an old content read back. Why counters and not a flag: a
    // flag cleared by one flusher before its flush completes tells a second caller "nothing pending"
    // while the stale translation still validates; "flushed" moves only past marks read before a
    // completed flush (Linux 6.x splits tlb_flush_batched into pending and flushed for the same reason).
    private long _unmapMarks, _protectMarks, _unmapFlushed, _protectFlushed;

    /// <summary>set_tlb_ubc_flush_pending for a removed translation (a migration or hwpoison entry). Preconditions: the pte lock of the changed PTE held.</summary>
    public void MarkUnmapFlushPending() => Interlocked.Increment(ref _unmapMarks);

    /// <summary>set_tlb_ubc_flush_pending for a write-protected translation (KSM). Preconditions: the pte lock of the changed PTE held.</summary>
    public void MarkProtectFlushPending() => Interlocked.Increment(ref _protectMarks);

    /// <summary>The marks set so far. Read them before the generation bump of a flush, and pass them to <see cref="FlushedUpTo"/> after it.</summary>
    public FlushMarks ReadFlushMarks() => new(Volatile.Read(ref _unmapMarks), Volatile.Read(ref _protectMarks));

    /// <summary>Whether some of <paramref name="marks"/> still wait for a completed flush (only the protect marks with <paramref name="protectOnly"/>).</summary>
    public bool FlushPending(FlushMarks marks, bool protectOnly = false) =>
        marks.Protect > Volatile.Read(ref _protectFlushed) || (!protectOnly && marks.Unmap > Volatile.Read(ref _unmapFlushed));

    /// <summary>A flush of this mm (a generation bump, then Tlb.Flush) begun after <paramref name="marks"/> were read has completed.</summary>
    public void FlushedUpTo(FlushMarks marks)
    {
        AdvanceTo(ref _unmapFlushed, marks.Unmap);
        AdvanceTo(ref _protectFlushed, marks.Protect);
    }

    private static void AdvanceTo(ref long flushed, long value)
    {
        long seen;
        while ((seen = Volatile.Read(ref flushed)) < value && Interlocked.CompareExchange(ref flushed, value, seen) != seen)
        {
        }
    }

    /// <summary>
    /// flush_tlb_batched_pending: bumps the generation and flushes if a batched flush of this mm is still
    /// pending (only for protect marks with <paramref name="protectOnly"/>). Call it after meeting the PTEs
    /// (under their pte locks). Preconditions: not inside an access section.
    /// </summary>
    public void FlushTlbBatchedPending(bool protectOnly = false)
    {
        FlushMarks marks = ReadFlushMarks();
        if (!FlushPending(marks, protectOnly))
            return;
        BumpGeneration();
        _machine.Tlb.Flush();
        FlushedUpTo(marks);
    }

    // ================================================================================================
    // VMA list
    // ================================================================================================

    /// <summary>find_vma: the first VMA that ends above <paramref name="address"/>, or null.</summary>
    public Vma? FindVma(ulong address)
    {
        int lo = 0, hi = _vmas.Count - 1;
        Vma? found = null;
        while (lo <= hi)
        {
            int mid = (lo + hi) >> 1;
            Vma vma = _vmas[mid];
            if (vma.End > address)
            {
                found = vma;
                hi = mid - 1;
            }
            else
            {
                lo = mid + 1;
            }
        }
        return found;
    }

    /// <summary>The VMA that contains <paramref name="address"/>, or null.</summary>
    public Vma? VmaAt(ulong address) => FindVma(address) is { } vma && vma.Start <= address ? vma : null;

    private int IndexOf(Vma vma)
    {
        int index = _vmas.BinarySearch(vma, VmaStartComparer.Instance);
        return index >= 0 && ReferenceEquals(_vmas[index], vma) ? index : throw new VmBugException($"VMA {vma} is not in its mm");
    }

    /// <summary>Links a VMA into the list, in address order. Preconditions: mmap_lock held for write.</summary>
    private void InsertVma(Vma vma)
    {
        LockAssert.MmapLockHeld(this, write: true);
        int index = _vmas.BinarySearch(vma, VmaStartComparer.Instance);
        if (index >= 0)
            throw new VmBugException($"VMA {vma} overlaps {_vmas[index]}");
        _vmas.Insert(~index, vma);
    }

    /// <summary>
    /// split_vma: cuts <paramref name="vma"/> at <paramref name="address"/>; returns the new upper part.
    /// Both halves keep the same anon_vma and rmap links. Preconditions: mmap_lock held for write.
    /// </summary>
    private Vma SplitVma(Vma vma, ulong address)
    {
        LockAssert.MmapLockHeld(this, write: true);
        var upper = new Vma(this, address, vma.End, vma.Flags, vma.PgOff + ((address - vma.Start) >> PageShift))
        {
            AnonVma = vma.AnonVma,
            Shmem = vma.Shmem,
            KsmDomain = vma.KsmDomain,
            Policy = vma.Policy, // vma_dup_policy: immutable, so the halves share the object
        };
        CloneAnonVmaChains(vma, upper);
        if (vma.Shmem is { } shmem)
            lock (shmem.Lock)
                shmem.Vmas.Add(upper);
        vma.End = address;
        InsertVma(upper);
        return upper;
    }

    /// <summary>
    /// The split half of vma_modify: the part of <paramref name="vma"/> inside [<paramref name="from"/>,
    /// <paramref name="to"/>), split off at either edge that falls inside it (the VMA itself when it lies
    /// wholly within). mprotect, madvise(MERGEABLE / UNMERGEABLE) and SetDedupeDomain change only that
    /// part's fields, then merge around it (TryMergeAround; SetDedupeDomain once for the whole range,
    /// MergeAllVmas). Preconditions: mmap_lock held for write.
    /// </summary>
    private Vma SplitToRange(Vma vma, ulong from, ulong to)
    {
        LockAssert.MmapLockHeld(this, write: true);
        Vma target = vma;
        if (target.Start < from)
            target = SplitVma(target, from);
        if (target.End > to)
            SplitVma(target, to);
        return target;
    }

    /// <summary>vma_merge: joins a VMA with its neighbours where they are identical and contiguous.</summary>
    private void TryMergeAround(Vma vma)
    {
        int index = IndexOf(vma);
        if (index + 1 < _vmas.Count && CanMerge(vma, _vmas[index + 1]))
            MergeInto(vma, _vmas[index + 1]);
        if (index > 0 && CanMerge(_vmas[index - 1], vma))
            MergeInto(_vmas[index - 1], vma);
    }

    private static bool CanMerge(Vma lower, Vma upper) =>
        lower.End == upper.Start && lower.Flags == upper.Flags && lower.Shmem == upper.Shmem && lower.KsmDomain == upper.KsmDomain &&
        Mempolicy.Equal(lower.Policy, upper.Policy) && lower.PgOff + lower.Pages == upper.PgOff &&
        (lower.AnonVma == upper.AnonVma || (upper.AnonVma is null && lower.AnonVma is null));

    private void MergeInto(Vma lower, Vma upper)
    {
        lower.End = upper.End;
        RemoveVmaLinks(upper);
        _vmas.Remove(upper);
    }

    /// <summary>Unlinks a VMA from the reverse map (unlink_anon_vmas, and the shmem i_mmap list).</summary>
    private void RemoveVmaLinks(Vma vma)
    {
        foreach (AnonVmaChain chain in vma.AnonVmaChains)
        {
            lock (chain.AnonVma.Lock)
            {
                chain.AnonVma.Chains.Remove(chain);
                if (chain.AnonVma.Chains.Count == 0)
                    _machine.Mappings.Unregister(chain.AnonVma.Handle);
            }
        }
        vma.AnonVmaChains = [];
        if (vma.Shmem is { } shmem)
        {
            lock (shmem.Lock)
            {
                shmem.Vmas.Remove(vma);
                if (shmem.Vmas.Count == 0)
                    shmem.Release();
            }
        }
    }

    private static void CloneAnonVmaChains(Vma source, Vma target)
    {
        foreach (AnonVmaChain chain in source.AnonVmaChains)
        {
            var link = new AnonVmaChain(target, chain.AnonVma);
            lock (chain.AnonVma.Lock)
                chain.AnonVma.Chains.Add(link);
            target.AnonVmaChains.Add(link);
        }
    }

    /// <summary>anon_vma_prepare: gives a VMA its anon_vma before its first anonymous page. Preconditions: mmap_lock held.</summary>
    public AnonVma PrepareAnonVma(Vma vma)
    {
        LockAssert.MmapLockHeld(this);
        if (vma.AnonVma is { } existing)
            return existing;
        lock (vma)
        {
            if (vma.AnonVma is { } raced)
                return raced;
            var anonVma = new AnonVma(_machine.Mappings.NewHandle(), parent: null);
            _machine.Mappings.Register(anonVma.Handle, anonVma);
            var link = new AnonVmaChain(vma, anonVma);
            lock (anonVma.Lock)
                anonVma.Chains.Add(link);
            vma.AnonVmaChains.Add(link);
            Volatile.Write(ref vma.AnonVma, anonVma);
            return anonVma;
        }
    }

    /// <summary>
    /// get_unmapped_area: the highest gap of <paramref name="length"/> bytes below the mmap base
    /// (top-down, as Linux lays out mmaps). 0 if none.
    /// </summary>
    private ulong GetUnmappedArea(ulong length)
    {
        ulong top = TaskSize;
        for (int i = _vmas.Count - 1; i >= -1; i--)
        {
            ulong bottom = i >= 0 ? _vmas[i].End : MmapMinAddr;
            if (top >= bottom && top - bottom >= length)
                return top - length;
            if (i >= 0)
                top = _vmas[i].Start;
        }
        return 0;
    }

    private sealed class VmaStartComparer : IComparer<Vma>
    {
        public static readonly VmaStartComparer Instance = new();

        public int Compare(Vma? x, Vma? y) => x!.Start.CompareTo(y!.Start);
    }

    // ================================================================================================
    // Exit
    // ================================================================================================

    /// <summary>exit_mmap: unmaps everything and frees every page table. Idempotent.</summary>
    public void Teardown()
    {
        MmapLock.EnterWriteLock();
        try
        {
            if (Exited)
                return;
            Exited = true;
            var pages = new List<long>();
            foreach (Vma vma in _vmas)
                ZapRange(vma, vma.Start, vma.End, pages);
            foreach (Vma vma in _vmas)
                RemoveVmaLinks(vma);
            _vmas.Clear();
            var tables = new List<long>();
            FreePageTables(0, TaskSize + PageSize, tables);
            long pgd = Interlocked.Exchange(ref _pgdPfn, -1);
            if (pgd >= 0)
                tables.Add(pgd);
            FlushAndRelease(pages, tables);
        }
        finally
        {
            MmapLock.ExitWriteLock();
        }
    }
}
