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

    // Linux's mm->tlb_flush_batched. 1 once a mechanism has narrowed or removed a translation of this mm
    // under the pte lock and flushes later, once for a batch: the migrator (TryToMigrate with an
    // UnmapBatch: one flush after the batch's last page), KSM's write-protect (one flush per merge batch)
    // and try_to_unmap's walk (one flush at its end). Until that flush a thread's software TLB may still
    // hold the old translation, writable. A call that changes PTEs and returns to its caller must not
    // leave such a translation behind: zap (MADV_DONTNEED, munmap, exit), mprotect and fork take the mark
    // and flush (flush_tlb_batched_pending), and a copy-on-write copy does before it reads the page (a
    // write through a stale translation would land in the frame after the copy). Without it a thread's
    // next access reached the old frame after MADV_DONTNEED returned: a write lost, an old content read.
    private int _tlbFlushPending;

    /// <summary>
    /// set_tlb_ubc_flush_pending: a translation of this mm was narrowed or removed, and its flush is
    /// deferred to the end of the caller's batch. Preconditions: the pte lock of the changed PTE held
    /// (a call that then meets the PTE under that lock sees the mark).
    /// </summary>
    public void MarkTlbFlushPending()
    {
        if (Volatile.Read(ref _tlbFlushPending) == 0)
            Volatile.Write(ref _tlbFlushPending, 1);
    }

    /// <summary>
    /// flush_tlb_batched_pending's test: takes the mark; true when a batched flush was pending, and the
    /// caller must then bump the generation and flush before it returns (or copies a page). The flush
    /// after the take covers every narrowing that set the mark before it.
    /// </summary>
    public bool TakeTlbFlushPending() =>
        Volatile.Read(ref _tlbFlushPending) != 0 && Interlocked.Exchange(ref _tlbFlushPending, 0) != 0;

    /// <summary>flush_tlb_batched_pending: flushes this mm if a batched flush is pending. Preconditions: not inside an access section.</summary>
    public void FlushTlbBatchedPending()
    {
        if (!TakeTlbFlushPending())
            return;
        BumpGeneration();
        _machine.Tlb.Flush();
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
