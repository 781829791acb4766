// AddressSpace: one process's virtual memory (Linux's mm_struct): its VMAs, page tables, counters and
// the syscalls that change them (mmap, munmap, mprotect, madvise).
//
// Every change that removes or narrows a translation (munmap, mprotect without write, DONTNEED, fork's
// write-protect, copy-on-write) follows the same order: change the PTEs under the pte lock, bump the
// mm's generation (so software TLB entries go stale), flush (TlbShootdown), and only then release
// frames or page tables. That order is what makes the access protocol's rule hold.
//
// Locking: the mmap_lock (reader/writer) protects the VMA list and every VMA's fields; faults take it
// for read, mmap / munmap / mprotect / fork / exit for write. See docs/locking.md.
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
        Id = Interlocked.Increment(ref _nextId);
    }

    /// <summary>Immutable: a process-wide unique id (keys the software TLB).</summary>
    public long Id { get; }

    /// <summary>The node new pages are allocated on first.</summary>
    public int HomeNode { get; set; }

    public Machine Machine => _machine;

    /// <summary>The mmap_lock.</summary>
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
    public IReadOnlyList<Vma> Vmas => _vmas;

    public void BumpGeneration() => Interlocked.Increment(ref Generation);

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

    private void InsertVma(Vma vma)
    {
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
        var upper = new Vma(this, address, vma.End, vma.Flags, vma.PgOff + ((address - vma.Start) >> PageShift))
        {
            AnonVma = vma.AnonVma,
            Shmem = vma.Shmem,
            KsmDomain = vma.KsmDomain,
        };
        CloneAnonVmaChains(vma, upper);
        if (vma.Shmem is { } shmem)
            lock (shmem.Lock)
                shmem.Vmas.Add(upper);
        vma.End = address;
        InsertVma(upper);
        return upper;
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
        lower.PgOff + lower.Pages == upper.PgOff &&
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
                    _machine.ReleaseShmem(shmem);
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
    // mmap / munmap / mprotect / madvise
    // ================================================================================================

    /// <summary>mmap of anonymous memory. See VmProcess.Mmap for the errno rules.</summary>
    public Errno Mmap(ulong address, ulong length, Protection prot, MapFlags flags, out ulong mapped)
    {
        mapped = 0;
        if (length == 0)
            return Errno.EINVAL;
        // The mapping type: MAP_SHARED, MAP_PRIVATE, or MAP_SHARED_VALIDATE (both bits).
        MapFlags type = flags & MapFlags.SharedValidate;
        if (type == MapFlags.None)
            return Errno.EINVAL;
        bool shared = type != MapFlags.Private;
        const MapFlags known = MapFlags.SharedValidate | MapFlags.Fixed | MapFlags.Anonymous | MapFlags.Populate | MapFlags.FixedNoReplace;
        if ((flags & ~known) != 0 && type == MapFlags.SharedValidate)
            return Errno.EOPNOTSUPP; // otherwise unknown flags are ignored, as Linux does
        // mmap does not validate the protection: bits it does not know (PROT_SEM, PROT_GROWSDOWN, ...) are
        // ignored, as calc_vm_prot_bits does; only read, write and exec become VMA flags.
        ulong aligned = (length + PageMask) & ~PageMask;
        if (aligned < length || aligned > TaskSize)
            return Errno.ENOMEM;
        bool fixedAddress = (flags & (MapFlags.Fixed | MapFlags.FixedNoReplace)) != 0;
        if (fixedAddress)
        {
            if ((address & PageMask) != 0)
                return Errno.EINVAL;
            if (address < MmapMinAddr)
                return Errno.EPERM; // below mmap_min_addr
            if (address > TaskSize - aligned)
                return Errno.ENOMEM;
        }
        else
        {
            address = (address + PageMask) & ~PageMask; // a hint is rounded up to a page
        }

        MmapLock.EnterWriteLock();
        try
        {
            if (Exited)
                return Errno.ENOMEM;
            if (fixedAddress)
            {
                Vma? overlap = FindVma(address);
                if (overlap is not null && overlap.Start < address + aligned)
                {
                    if ((flags & MapFlags.FixedNoReplace) != 0)
                        return Errno.EEXIST;
                    Errno unmapped = UnmapLocked(address, aligned);
                    if (unmapped != Errno.None)
                        return unmapped;
                }
            }
            else
            {
                // A hint is honoured when the range there is free, as in Linux.
                bool hintFits = address != 0 && address >= MmapMinAddr && address <= TaskSize - aligned &&
                                (FindVma(address) is not { } next || next.Start >= address + aligned);
                if (!hintFits)
                {
                    address = GetUnmappedArea(aligned);
                    if (address == 0)
                        return Errno.ENOMEM;
                }
            }

            VmaFlags vmFlags = ToVmaFlags(prot) | (shared ? VmaFlags.Shared : 0);
            if (KsmMergeAny && !shared)
                vmFlags |= VmaFlags.Mergeable; // ksm_vma_flags: a process that merges everything
            var vma = new Vma(this, address, address + aligned, vmFlags, shared ? 0 : address >> PageShift) { KsmDomain = KsmDefaultDomain };
            if (shared)
            {
                ShmemObject shmem = _machine.CreateShmem();
                vma.Shmem = shmem;
                lock (shmem.Lock)
                    shmem.Vmas.Add(vma);
            }
            InsertVma(vma);
            if (!shared)
                TryMergeAround(vma);
            mapped = address;
        }
        finally
        {
            MmapLock.ExitWriteLock();
        }

        if ((flags & MapFlags.Populate) != 0)
            Populate(mapped, aligned, (prot & Protection.Write) != 0);
        return Errno.None;
    }

    private static VmaFlags ToVmaFlags(Protection prot) =>
        ((prot & Protection.Read) != 0 ? VmaFlags.Read : 0) |
        ((prot & Protection.Write) != 0 ? VmaFlags.Write | VmaFlags.Read : 0) |
        ((prot & Protection.Exec) != 0 ? VmaFlags.Exec : 0);

    /// <summary>munmap. EINVAL for a misaligned start, a zero or overflowing length, or a range outside user space (start above TASK_SIZE, non-canonical addresses included).</summary>
    public Errno Munmap(ulong address, ulong length)
    {
        if ((address & PageMask) != 0 || length == 0)
            return Errno.EINVAL;
        ulong aligned = (length + PageMask) & ~PageMask;
        if (aligned < length || address > TaskSize || aligned > TaskSize - address)
            return Errno.EINVAL;
        MmapLock.EnterWriteLock();
        try
        {
            return UnmapLocked(address, aligned);
        }
        finally
        {
            MmapLock.ExitWriteLock();
        }
    }

    /// <summary>do_vmi_munmap: removes every mapping in [address, address + length). Preconditions: mmap_lock held for write.</summary>
    private Errno UnmapLocked(ulong address, ulong length)
    {
        ulong end = address + length;
        Vma? first = FindVma(address);
        if (first is null || first.Start >= end)
            return Errno.None;
        if (first.Start < address)
            SplitVma(first, address);
        Vma? last = FindVma(end - 1);
        if (last is not null && last.Start < end && last.End > end)
            SplitVma(last, end);

        var removed = new List<Vma>();
        foreach (Vma vma in _vmas)
            if (vma.Start >= address && vma.End <= end)
                removed.Add(vma);

        var pages = new List<long>();
        bool cleared = false;
        foreach (Vma vma in removed)
            cleared |= ZapRange(vma, vma.Start, vma.End, pages);
        foreach (Vma vma in removed)
        {
            RemoveVmaLinks(vma);
            _vmas.Remove(vma);
        }

        // Free the tables that covered only the removed range: between the neighbours that remain.
        int nextIndex = _vmas.FindIndex(v => v.Start >= end);
        int prevIndex = (nextIndex < 0 ? _vmas.Count : nextIndex) - 1;
        ulong floor = prevIndex >= 0 ? _vmas[prevIndex].End : 0;
        ulong ceiling = nextIndex >= 0 ? _vmas[nextIndex].Start : TaskSize + PageSize;
        var tables = new List<long>();
        FreePageTables(floor, ceiling, tables);

        FlushAndRelease(pages, tables, cleared);
        return Errno.None;
    }

    /// <summary>
    /// zap_pte_range: clears every PTE of [start, end) in one VMA, dropping the mappings' rmap and
    /// collecting the frames to release after the flush. Preconditions: mmap_lock held.
    /// </summary>
    private bool ZapRange(Vma vma, ulong start, ulong end, List<long> pagesToPut)
    {
        bool cleared = false;
        for (ulong va = start; ;)
        {
            ulong* table = NextPteTable(ref va, end, out long ptePfn);
            if (table == null)
                break;
            for (ulong tableEnd = Math.Min(end, PteTableEnd(va)); va < tableEnd; va += PageSize)
            {
                ulong* slot = table + Index(va, 0);
                if (Volatile.Read(ref *slot) == 0)
                    continue;
                LockPte(ptePfn);
                var old = new Pte(Interlocked.Exchange(ref *slot, 0UL));
                UnlockPte(ptePfn);
                // Any present PTE, the zero page's included, may sit in some thread's software TLB.
                cleared |= old.IsPresent;
                if (!old.IsPresent)
                {
                    // A migration entry holds no reference; the migrator finds this VMA gone. RSS counted it.
                    if (old.IsMigrationEntry)
                    {
                        if (vma.IsShared)
                            Interlocked.Decrement(ref RssShmem);
                        else
                            Interlocked.Decrement(ref RssAnon);
                    }
                    continue;
                }
                if (old.IsSpecial)
                {
                    if (IsKsmZeroPte(old))
                        KsmZeroPteGone();
                    continue; // the zero page is not refcounted per mapping
                }
                PageRemoveRmap(old.Pfn, vma);
                pagesToPut.Add(old.Pfn);
            }
        }
        return cleared;
    }

    /// <summary>Bumps the generation, flushes, then drops the collected references and frees the tables.</summary>
    private void FlushAndRelease(List<long> pages, List<long> tables, bool cleared = true)
    {
        if (pages.Count == 0 && tables.Count == 0 && !cleared)
            return;
        BumpGeneration();
        _machine.FlushTlb();
        foreach (long pfn in pages)
            _machine.PutPage(pfn);
        foreach (long pfn in tables)
            FreeTablePage(pfn);
    }

    /// <summary>
    /// mprotect, in do_mprotect_pkey's order: both PROT_GROWSDOWN and PROT_GROWSUP, or a misaligned start:
    /// EINVAL; an empty range: success; a range that wraps: ENOMEM; bits other than read, write, exec and
    /// PROT_SEM: EINVAL; then an unmapped part: ENOMEM (the part before it is changed, as in Linux); and
    /// PROT_GROWSDOWN / PROT_GROWSUP on a mapping that does not grow (every Vmm mapping): EINVAL.
    /// </summary>
    public Errno Mprotect(ulong address, ulong length, Protection prot)
    {
        Protection grows = prot & (Protection.GrowsDown | Protection.GrowsUp);
        prot &= ~(Protection.GrowsDown | Protection.GrowsUp);
        if (grows == (Protection.GrowsDown | Protection.GrowsUp))
            return Errno.EINVAL; // can't be both
        if ((address & PageMask) != 0)
            return Errno.EINVAL;
        if (length == 0)
            return Errno.None;
        ulong aligned = (length + PageMask) & ~PageMask;
        ulong end = address + aligned;
        if (aligned < length || end <= address)
            return Errno.ENOMEM; // beyond TASK_SIZE there is no VMA: the loop reports the hole
        if ((prot & ~(Protection.Read | Protection.Write | Protection.Exec | Protection.Sem)) != 0)
            return Errno.EINVAL; // arch_validate_prot
        if (grows != 0)
        {
            // Linux finds the VMA first: none at or above the range is ENOMEM; one that does not grow is EINVAL.
            MmapLock.EnterReadLock();
            try
            {
                Vma? vma = FindVma(address);
                if (vma is null || (grows == Protection.GrowsDown ? vma.Start >= end : vma.Start > address))
                    return Errno.ENOMEM;
                return Errno.EINVAL;
            }
            finally
            {
                MmapLock.ExitReadLock();
            }
        }
        MmapLock.EnterWriteLock();
        try
        {
            VmaFlags wanted = ToVmaFlags(prot);
            bool narrowed = false;
            ulong cursor = address;
            Errno result = Errno.None;
            while (cursor < end)
            {
                Vma? vma = FindVma(cursor);
                if (vma is null || vma.Start > cursor)
                {
                    result = Errno.ENOMEM;
                    break;
                }
                if (vma.Start < cursor)
                    vma = SplitVma(vma, cursor);
                if (vma.End > end)
                    SplitVma(vma, end);
                VmaFlags old = vma.Flags;
                vma.Flags = (old & ~(VmaFlags.Read | VmaFlags.Write | VmaFlags.Exec)) | wanted;
                if ((old & VmaFlags.Write) != 0 && (wanted & VmaFlags.Write) == 0 ||
                    (old & VmaFlags.Read) != 0 && (wanted & VmaFlags.Read) == 0)
                    narrowed |= ChangeProtection(vma, removeAccess: (wanted & VmaFlags.Read) == 0);
                cursor = vma.End;
                TryMergeAround(vma);
            }
            if (narrowed)
            {
                BumpGeneration();
                _machine.FlushTlb();
            }
            return result;
        }
        finally
        {
            MmapLock.ExitWriteLock();
        }
    }

    /// <summary>change_pte_range: write-protects every present PTE of the VMA; for PROT_NONE also clears
    /// the user bit, so the access path faults and the fault handler consults the VMA. Returns true if anything changed.</summary>
    private bool ChangeProtection(Vma vma, bool removeAccess)
    {
        bool changed = false;
        for (ulong va = vma.Start; ;)
        {
            ulong* table = NextPteTable(ref va, vma.End, out long ptePfn);
            if (table == null)
                break;
            for (ulong tableEnd = Math.Min(vma.End, PteTableEnd(va)); va < tableEnd; va += PageSize)
            {
                ulong* slot = table + Index(va, 0);
                LockPte(ptePfn);
                var pte = new Pte(Volatile.Read(ref *slot));
                if (pte.IsMigrationEntry && pte.SwapType == Pte.MigrationWriteType)
                {
                    // The page comes back read-only (still exclusive) when its migration ends; the restore
                    // takes the user bit from the VMA.
                    Volatile.Write(ref *slot, Pte.SwapEntry(Pte.MigrationReadExclusiveType, pte.SwapOffset).Value);
                }
                else if (pte.IsPresent && (pte.IsWrite || removeAccess))
                {
                    // An atomic clear: the access path may be setting the accessed or dirty bit right now.
                    Interlocked.And(ref *slot, ~(removeAccess ? Pte.WriteBit | Pte.UserBit : Pte.WriteBit));
                    changed = true;
                }
                UnlockPte(ptePfn);
            }
        }
        return changed;
    }

    /// <summary>
    /// madvise's length rule: the end of [<paramref name="address"/>, + <paramref name="length"/> rounded up
    /// to pages); false (EINVAL) when the rounding or the sum wraps past 2^64. An empty range gives
    /// <paramref name="end"/> == <paramref name="address"/> (success, nothing to do).
    /// </summary>
    internal static bool TryMadviseEnd(ulong address, ulong length, out ulong end)
    {
        ulong aligned = (length + PageMask) & ~PageMask;
        end = address + aligned;
        return aligned >= length && end >= address;
    }

    /// <summary>madvise. EINVAL: misaligned start, overflowing length, unknown advice; ENOMEM: part of the range unmapped (the mapped part is still advised).</summary>
    public Errno Madvise(ulong address, ulong length, Advice advice)
    {
        // Linux's order: a misaligned start, then the advice, then the length.
        if ((address & PageMask) != 0)
            return Errno.EINVAL;
        if (advice is not (Advice.Normal or Advice.WillNeed or Advice.DontNeed or Advice.Mergeable or Advice.Unmergeable))
            return Errno.EINVAL;
        if (advice is Advice.Mergeable or Advice.Unmergeable && _machine.Ksm is null)
            return Errno.EINVAL; // built without KSM: the advice does not exist
        if (!TryMadviseEnd(address, length, out ulong end))
            return Errno.EINVAL;
        if (end == address)
            return Errno.None;
        if (advice == Advice.WillNeed)
            return CheckMapped(address, end); // anonymous memory: only swap readahead would happen here

        MmapLock.EnterWriteLock();
        try
        {
            Errno result = Errno.None;
            ulong cursor = address;
            var pages = new List<long>();
            bool cleared = false;
            while (cursor < end)
            {
                Vma? vma = FindVma(cursor);
                if (vma is null || vma.Start >= end)
                {
                    result = Errno.ENOMEM;
                    break;
                }
                if (vma.Start > cursor)
                    result = Errno.ENOMEM; // a hole: keep going, report at the end
                ulong from = Math.Max(cursor, vma.Start), to = Math.Min(end, vma.End);
                switch (advice)
                {
                    case Advice.DontNeed:
                        if ((vma.Flags & VmaFlags.Locked) != 0)
                        {
                            result = Errno.EINVAL;
                            cursor = end;
                            continue;
                        }
                        cleared |= ZapRange(vma, from, to, pages);
                        break;
                    case Advice.Mergeable or Advice.Unmergeable:
                    {
                        bool mergeable = (vma.Flags & VmaFlags.Mergeable) != 0;
                        // ksm_madvise: already in the wanted state, or a shared mapping (KSM merges private
                        // anonymous memory only): accepted, nothing changes.
                        if (advice == Advice.Mergeable ? mergeable || vma.IsShared : !mergeable)
                            break;
                        Vma target = vma;
                        if (target.Start < from)
                            target = SplitVma(target, from);
                        if (target.End > to)
                            SplitVma(target, to);
                        if (advice == Advice.Mergeable)
                        {
                            _machine.Ksm!.Enter(this);
                            target.Flags |= VmaFlags.Mergeable;
                        }
                        else
                        {
                            // Unmerge first (copies), then clear the flag; out of memory is EAGAIN, and the
                            // range stays mergeable.
                            if (target.AnonVma is not null && KsmUnmergeRange(target, target.Start, target.End) != Errno.None)
                            {
                                TryMergeAround(target);
                                result = Errno.EAGAIN;
                                cursor = end;
                                continue;
                            }
                            target.Flags &= ~VmaFlags.Mergeable;
                        }
                        TryMergeAround(target);
                        break;
                    }
                }
                cursor = to;
            }
            FlushAndRelease(pages, [], cleared);
            return result;
        }
        finally
        {
            MmapLock.ExitWriteLock();
        }
    }

    /// <summary>ENOMEM if part of [address, end) is not mapped, as madvise reports holes.</summary>
    private Errno CheckMapped(ulong address, ulong end)
    {
        MmapLock.EnterReadLock();
        try
        {
            ulong cursor = address;
            while (cursor < end)
            {
                Vma? vma = FindVma(cursor);
                if (vma is null || vma.Start > cursor)
                    return Errno.ENOMEM;
                cursor = vma.End;
            }
            return Errno.None;
        }
        finally
        {
            MmapLock.ExitReadLock();
        }
    }

    /// <summary>Faults every page of a range in (MAP_POPULATE). Stops quietly at the first page that cannot be faulted.</summary>
    private void Populate(ulong address, ulong length, bool write)
    {
        for (ulong va = address; va < address + length; va += PageSize)
        {
            if (TryHandleFault(va, write) != FaultResult.Done)
                return;
        }
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
