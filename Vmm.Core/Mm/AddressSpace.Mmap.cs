// AddressSpace.Mmap: mmap and munmap of anonymous memory (Linux's mm/mmap.c and mm/vma.c's
// do_vmi_munmap), and the zap that both munmap and madvise(DONTNEED) and exit use (zap_page_range).
//
// mmap finds or checks the range, unmaps what MAP_FIXED replaces, and inserts a VMA (a shared one
// gets a new shmem object, Shmem.cs); pages come later, by fault, or at once for MAP_POPULATE. munmap
// splits the VMAs at the range's edges, zaps their PTEs, and only after the flush drops the references
// and frees the page tables (FlushAndRelease: the order AddressSpace.cs's header describes).
//
// Locking: mmap and munmap take the mmap_lock for write; the zap takes each pte lock in turn.
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Rmap;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
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
                ShmemObject shmem = ShmemObject.Create(_machine);
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
        LockAssert.MmapLockHeld(this, write: true);
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
        LockAssert.MmapLockHeld(this);
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
                        _machine.MemMap.Trace?.Record(old.Pfn, Vmm.Diagnostics.FrameEvent.Unmap, -Vmm.Diagnostics.FrameTrace.At(Id, va));
                        if (vma.IsShared)
                            Interlocked.Decrement(ref RssShmem);
                        else
                            Interlocked.Decrement(ref RssAnon);
                    }
                    continue;
                }
                if (old.IsSpecial)
                {
                    _machine.MemMap.Trace?.RecordAt(Vmm.Diagnostics.FrameTrace.At(Id, va), Vmm.Diagnostics.FrameEvent.Unmap, old.Pfn);
                    if (IsKsmZeroPte(old))
                        KsmZeroPteGone();
                    continue; // the zero page is not refcounted per mapping
                }
                PageRemoveRmap(old.Pfn, vma);
                _machine.MemMap.Trace?.Record(old.Pfn, Vmm.Diagnostics.FrameEvent.Unmap, Vmm.Diagnostics.FrameTrace.At(Id, va));
                pagesToPut.Add(old.Pfn);
            }
        }
        return cleared;
    }

    /// <summary>Bumps the generation, flushes, then drops the collected references and frees the tables.</summary>
    private void FlushAndRelease(List<long> pages, List<long> tables, bool cleared = true)
    {
        // A migration or hwpoison entry zapped here may have replaced a translation whose flush its
        // mechanism has deferred (the batched-flush marks): flush for it too, before the call returns.
        FlushMarks marks = ReadFlushMarks();
        if (pages.Count == 0 && tables.Count == 0 && !cleared && !FlushPending(marks))
            return;
        // lru_add_drain, as Linux's unmap_region / exit_mmap / zap_page_range_single do: pages still in an
        // add batch would keep the batch's reference, and the frames would not come back with the call.
        // All batches, not only this processor's: a host thread is not bound to the slot its faults used,
        // and hosts (and the tests) count on munmap and exit giving the memory back. Empty batches cost
        // one read each.
        if (pages.Count > 0)
            _machine.Lru.DrainAll();
        BumpGeneration();
        _machine.Tlb.Flush();
        FlushedUpTo(marks);
        foreach (long pfn in pages)
            _machine.PutPage(pfn);
        foreach (long pfn in tables)
            FreeTablePage(pfn);
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
}
