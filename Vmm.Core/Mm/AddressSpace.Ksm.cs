// The page-table side of KSM (Linux's write_protect_page, replace_page, break_ksm and the scanner's
// page-table walk). The scan and merge policy lives in Ksm/; here are only the PTE changes, each under
// the pte lock and each checked against what the PTE held when the decision was made.
//
// Locking: the caller holds the mmap_lock (read for the scanner's calls, write for madvise,
// PR_SET_MEMORY_MERGE and SetDedupeDomain) and, for write-protect and replace, the page locks; each PTE
// changes under its pte lock. The KSM fields of the mm say what protects each.
//
// A KSM page is always mapped read-only and clean, and never PG_anon_exclusive. A KSM zero PTE (the
// zero page put in place of a zero-filled page by use_zero_pages) is the zero page's special PTE with
// the dirty bit set: nothing else ever sets the dirty bit on a zero-page PTE, so the bit marks it.
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Rmap;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    /// <summary>This mm's KSM slot, or null when not registered. Protected by the KSM mm-list lock.</summary>
    public KsmMmSlot? KsmSlot;

    /// <summary>MMF_VM_MERGE_ANY (PR_SET_MEMORY_MERGE): every compatible VMA is VM_MERGEABLE. Written under the mmap_lock for write.</summary>
    public volatile bool KsmMergeAny;

    /// <summary>
    /// Set by KSM's exit hook before exit tears the mm down (Linux's ksm_test_exit sees mm_users == 0 by
    /// then): from here KSM treats the mm as gone, before Exited is set under the mmap_lock.
    /// </summary>
    public volatile bool KsmExiting;

    /// <summary>ksm_rmap_items of this mm. Written under the KSM thread mutex.</summary>
    public long KsmRmapItems;

    /// <summary>ksm_merging_pages of this mm. Written under the KSM thread mutex.</summary>
    public long KsmMergingPages;

    /// <summary>ksm_zero_pages of this mm: KSM zero PTEs mapped. Atomic.</summary>
    public long KsmZeroPages;

    /// <summary>The dedupe domain new VMAs get. Written under the mmap_lock for write.</summary>
    public ushort KsmDefaultDomain;

    /// <summary>
    /// PR_SET_MEMORY_MERGE: with <paramref name="enable"/>, every private VMA, present and future,
    /// becomes VM_MERGEABLE; without it, every VMA is unmerged and unmarked (ENOMEM if a copy cannot be
    /// made: then nothing is unmarked and merging stays on). EINVAL when KSM is not built in.
    /// </summary>
    public Errno SetMemoryMerge(bool enable)
    {
        Ksm? ksm = _machine.Ksm;
        if (ksm is null)
            return Errno.EINVAL;
        MmapLock.EnterWriteLock();
        try
        {
            if (Exited || enable == KsmMergeAny)
                return Errno.None;
            if (enable)
            {
                ksm.Enter(this);
                KsmMergeAny = true;
                foreach (Vma vma in _vmas)
                    if (!vma.IsShared)
                        vma.Flags |= VmaFlags.Mergeable;
            }
            else
            {
                foreach (Vma vma in _vmas)
                {
                    if ((vma.Flags & VmaFlags.Mergeable) != 0 && vma.AnonVma is not null && KsmUnmergeRange(vma, vma.Start, vma.End) != Errno.None)
                        return Errno.ENOMEM;
                }
                foreach (Vma vma in _vmas)
                    vma.Flags &= ~VmaFlags.Mergeable;
                KsmMergeAny = false;
            }
            MergeAllVmas();
            return Errno.None;
        }
        finally
        {
            MmapLock.ExitWriteLock();
        }
    }

    /// <summary>
    /// Puts [<paramref name="address"/>, + <paramref name="length"/>) in dedupe domain
    /// <paramref name="domain"/> (null range: the whole process and its future mappings). Pages merged
    /// under the old domain are unmerged first, so no KSM page spans two domains. EINVAL: misaligned start,
    /// or a length that wraps when rounded up or added to the start (madvise's rules); ENOMEM: part of it unmapped (the mapped part is changed) or no memory for a
    /// copy.
    /// </summary>
    public Errno SetDedupeDomain(ulong address, ulong length, ushort domain, bool wholeProcess)
    {
        ulong end = TaskSize;
        if (wholeProcess)
        {
            address = 0;
        }
        else
        {
            // madvise's range rules: a misaligned start, or a length that wraps when rounded up to pages
            // or added to the start, is EINVAL; an empty range succeeds and changes nothing.
            if ((address & PageMask) != 0 || !TryMadviseEnd(address, length, out end))
                return Errno.EINVAL;
            if (end == address)
                return Errno.None;
        }
        MmapLock.EnterWriteLock();
        try
        {
            if (wholeProcess)
                KsmDefaultDomain = domain;
            Errno result = Errno.None;
            ulong cursor = address;
            while (cursor < end)
            {
                Vma? vma = FindVma(cursor);
                if (vma is null || vma.Start >= end)
                {
                    if (!wholeProcess)
                        result = Errno.ENOMEM;
                    break;
                }
                if (vma.Start > cursor && !wholeProcess)
                    result = Errno.ENOMEM;
                ulong from = Math.Max(cursor, vma.Start), to = Math.Min(end, vma.End);
                cursor = to;
                if (vma.KsmDomain == domain)
                    continue;
                Vma target = SplitToRange(vma, from, to);
                if (target.AnonVma is not null && KsmUnmergeRange(target, target.Start, target.End) != Errno.None)
                    return Errno.ENOMEM;
                target.KsmDomain = domain;
            }
            MergeAllVmas();
            return result;
        }
        finally
        {
            MmapLock.ExitWriteLock();
        }
    }

    /// <summary>Joins every pair of neighbouring VMAs that became identical. Preconditions: mmap_lock held for write.</summary>
    private void MergeAllVmas()
    {
        LockAssert.MmapLockHeld(this, write: true);
        for (int i = _vmas.Count - 1; i > 0; i--)
        {
            if (i < _vmas.Count && CanMerge(_vmas[i - 1], _vmas[i]))
                MergeInto(_vmas[i - 1], _vmas[i]);
        }
    }

    /// <summary>A KSM zero PTE: the zero page with the dirty bit KSM sets as its marker.</summary>
    public static bool IsKsmZeroPte(Pte pte) => pte.IsPresent && pte.IsSpecial && pte.IsDirty;

    /// <summary>A KSM zero PTE went away (zap, copy-on-write, unshare): the counters follow.</summary>
    private void KsmZeroPteGone()
    {
        Interlocked.Decrement(ref KsmZeroPages);
        _machine.Ksm?.ZeroPagesChanged(-1);
    }

    /// <summary>
    /// find_mergeable_vma: the VMA at <paramref name="va"/> if KSM may work on it now (the mm is not
    /// exiting, the VMA is VM_MERGEABLE and has an anon_vma). Preconditions: mmap_lock held.
    /// </summary>
    public Vma? FindMergeableVma(ulong va)
    {
        LockAssert.MmapLockHeld(this);
        if (Exited || KsmExiting)
            return null;
        Vma? vma = VmaAt(va);
        return vma is not null && (vma.Flags & VmaFlags.Mergeable) != 0 && vma.AnonVma is not null ? vma : null;
    }

    /// <summary>
    /// The scanner's walk: the next present anonymous page in [<paramref name="va"/>, <paramref name="end"/>)
    /// of a private VMA, with a reference taken under its pte lock. Moves <paramref name="va"/> to it.
    /// Skips missing page-table levels whole. Preconditions: mmap_lock held.
    /// </summary>
    public bool KsmNextAnonPage(ref ulong va, ulong end, out long pfn)
    {
        LockAssert.MmapLockHeld(this);
        MemMap memMap = _machine.MemMap;
        pfn = -1;
        while (true)
        {
            ulong* table = NextPteTable(ref va, end, out long ptePfn);
            if (table == null)
                return false;
            for (ulong tableEnd = Math.Min(end, PteTableEnd(va)); va < tableEnd; va += PageSize)
            {
                ulong* slot = table + Index(va, 0);
                ulong raw = Volatile.Read(ref *slot);
                if ((raw & Pte.PresentBit) == 0 || (raw & Pte.SpecialBit) != 0)
                    continue;
                LockPte(ptePfn);
                var pte = new Pte(Volatile.Read(ref *slot));
                bool found = pte.IsPresent && !pte.IsSpecial && IsAnonSmallPage(pte.Pfn);
                if (found)
                    memMap.GetPage(pte.Pfn); // mapped under the pte lock: it cannot be free
                UnlockPte(ptePfn);
                if (found)
                {
                    pfn = pte.Pfn;
                    return true;
                }
            }
        }
    }

    private bool IsAnonSmallPage(long pfn)
    {
        ref PageDescriptor page = ref _machine.MemMap[pfn];
        return (page.Mapping & PageDescriptor.MappingAnon) != 0 &&
               (page.Flags & (ulong)(PageFlags.Head | PageFlags.Tail | PageFlags.Reserved)) == 0;
    }

    /// <summary>
    /// write_protect_page: makes the PTE at <paramref name="va"/> that maps <paramref name="pfn"/>
    /// read-only and clean, so that the page's contents can be compared once the caller has flushed.
    /// A writable, dirty or exclusive mapping is first checked for references beyond its mappings and
    /// the caller's one: a pinned page, or one a mechanism is working on, is never merged.
    /// <paramref name="orig"/> is the PTE as left, for <see cref="KsmReplacePage"/> to verify;
    /// <paramref name="changed"/> says whether a translation was narrowed (the caller must flush).
    /// Preconditions: mmap_lock held; the page locked; the caller holds one reference.
    /// </summary>
    public bool KsmWriteProtect(ulong va, long pfn, out Pte orig, out bool changed)
    {
        LockAssert.MmapLockHeld(this);
        LockAssert.PageLocked(_machine.PageLock, pfn);
        LockAssert.Referenced(_machine.MemMap, pfn);
        orig = Pte.None;
        changed = false;
        MemMap memMap = _machine.MemMap;
        ulong* slot = FindPte(va, out long ptePfn);
        if (slot == null)
            return false;
        LockPte(ptePfn);
        try
        {
            while (true)
            {
                var pte = new Pte(Volatile.Read(ref *slot));
                if (!pte.IsPresent || pte.IsSpecial || pte.Pfn != pfn)
                    return false;
                bool exclusive = memMap.TestFlag(pfn, PageFlags.AnonExclusive);
                Pte wanted = pte.WithoutFlags(Pte.WriteBit | Pte.DirtyBit).WithFlags(Pte.AccessedBit);
                if (pte.IsWrite || pte.IsDirty || exclusive)
                {
                    // Every reference is explained by a mapping, except ours. A pin (or a racing
                    // copy-on-write, migration or pin that took its reference under this pte lock)
                    // shows as one more.
                    if (memMap.RefCount(pfn) != memMap.MapCount(pfn) + 1 || memMap[pfn].PinCount != 0)
                        return false;
                }
                // A compare-and-swap: the access path sets accessed and dirty bits without the pte lock.
                if (Interlocked.CompareExchange(ref *slot, wanted.Value, pte.Value) != pte.Value)
                    continue;
                if (pte.IsDirty)
                    memMap.SetFlag(pfn, PageFlags.Dirty);
                if (exclusive)
                    memMap.ClearFlag(pfn, PageFlags.AnonExclusive);
                changed = pte.IsWrite;
                if (changed)
                    MarkProtectFlushPending(); // flushed with the merge batch
                orig = wanted;
                return true;
            }
        }
        finally
        {
            UnlockPte(ptePfn);
        }
    }

    /// <summary>Whether the PTE at va is exactly orig. Preconditions: mmap_lock held.</summary>
    public bool KsmPteIs(ulong va, Pte orig)
    {
        LockAssert.MmapLockHeld(this);
        ulong* slot = FindPte(va, out _);
        return slot != null && Volatile.Read(ref *slot) == orig.Value;
    }

    /// <summary>
    /// Whether the PTE at va still leads to the KSM page whose mapping word is <paramref name="mappingWord"/>:
    /// a migration entry (the page is being moved, and comes back there when the move ends) or a present
    /// PTE of a frame that carries that mapping word (the node's page, moved or not). The scanner keeps the
    /// stable rmap item of such an address instead of dropping it. One read of the PTE, without the pte
    /// lock: a hint that errs only towards keeping (a kept item whose mapping then goes is dropped on its
    /// next visit, as after any copy on write). Preconditions: mmap_lock held.
    /// </summary>
    public bool KsmStillMapsKsmPage(ulong va, ulong mappingWord)
    {
        LockAssert.MmapLockHeld(this);
        ulong* slot = FindPte(va, out _);
        if (slot == null)
            return false;
        var pte = new Pte(Volatile.Read(ref *slot));
        if (pte.IsMigrationEntry)
            return true;
        return pte.IsPresent && !pte.IsSpecial && Volatile.Read(ref _machine.MemMap[pte.Pfn].Mapping) == mappingWord;
    }

    /// <summary>
    /// replace_page: if the PTE at <paramref name="va"/> still holds <paramref name="orig"/>, maps
    /// <paramref name="kpfn"/> (a KSM page, read-only) there instead, or the zero page as a KSM zero PTE
    /// when <paramref name="kpfn"/> is -1. The old page loses the mapping but not yet its reference: the
    /// caller must bump this mm's generation and then drop the mapping's reference after a flush
    /// (DeferPutPage), since a thread may still read the old frame through a translation cached before.
    /// (The scanner does both once per batch, not per page.) Returns false if the PTE changed since it
    /// was write-protected. Preconditions: mmap_lock held; both pages locked; the caller holds a
    /// reference to each.
    /// </summary>
    public bool KsmReplacePage(ulong va, long pfn, long kpfn, Pte orig)
    {
        LockAssert.MmapLockHeld(this);
        LockAssert.PageLocked(_machine.PageLock, pfn);
        LockAssert.Referenced(_machine.MemMap, pfn);
        LockAssert.That(kpfn < 0 || (_machine.PageLock.IsLocked(kpfn) && _machine.MemMap.RefCount(kpfn) > 0),
            $"the KSM page {kpfn} locked and referenced");
        MemMap memMap = _machine.MemMap;
        ulong* slot = FindPte(va, out long ptePfn);
        if (slot == null)
            return false;
        bool zero = kpfn < 0;
        Pte replacement;
        if (zero)
        {
            long zeroPfn = _machine.ZeroPagePfn;
            if (zeroPfn == PageAllocator.NoPfn)
                return false;
            replacement = Pte.Make(zeroPfn, write: false, dirty: true, accessed: true, special: true, user: (orig.Value & Pte.UserBit) != 0);
        }
        else
        {
            replacement = Pte.Make(kpfn, write: false, accessed: true, user: (orig.Value & Pte.UserBit) != 0);
        }
        LockPte(ptePfn);
        try
        {
            if (Interlocked.CompareExchange(ref *slot, replacement.Value, orig.Value) != orig.Value)
                return false;
            memMap.Trace?.Record(pfn, Vmm.Diagnostics.FrameEvent.KsmReplaced, kpfn);
            if (kpfn < 0)
                memMap.Trace?.RecordAt(Vmm.Diagnostics.FrameTrace.At(Id, va), Vmm.Diagnostics.FrameEvent.KsmMapped, -1);
            if (kpfn >= 0)
                memMap.Trace?.Record(kpfn, Vmm.Diagnostics.FrameEvent.KsmMapped, Vmm.Diagnostics.FrameTrace.At(Id, va));
            if (zero)
            {
                Interlocked.Increment(ref KsmZeroPages);
                _machine.Ksm?.ZeroPagesChanged(1);
                Interlocked.Decrement(ref RssAnon); // the zero page is not an anonymous page
            }
            else
            {
                memMap.GetPage(kpfn);
                Interlocked.Increment(ref memMap[kpfn].MapCount);
            }
            if (Interlocked.Decrement(ref memMap[pfn].MapCount) < -1)
                throw new VmBugException($"mapcount of frame {pfn} went below zero");
        }
        finally
        {
            UnlockPte(ptePfn);
        }
        return true;
    }

    /// <summary>
    /// unmerge_ksm_pages / break_ksm: every KSM page and KSM zero PTE of [start, end) in
    /// <paramref name="vma"/> is replaced by a private, exclusive, read-only copy (an unshare fault), so
    /// that the range uses its own memory again. Skips missing page-table levels whole.
    /// Returns ENOMEM when a copy cannot be allocated (the pages before it stay unmerged).
    /// Preconditions: mmap_lock held (read or write).
    /// </summary>
    public Errno KsmUnmergeRange(Vma vma, ulong start, ulong end)
    {
        LockAssert.MmapLockHeld(this);
        for (ulong va = start; ;)
        {
            ulong* table = NextPteTable(ref va, end, out long ptePfn);
            if (table == null)
                return Errno.None;
            for (ulong tableEnd = Math.Min(end, PteTableEnd(va)); va < tableEnd;)
            {
                ulong* slot = table + Index(va, 0);
                var pte = new Pte(Volatile.Read(ref *slot));
                bool ksm = pte.IsPresent && (pte.IsSpecial ? pte.IsDirty : IsKsmPage(pte.Pfn));
                if (!ksm || Exited)
                {
                    va += PageSize;
                    continue;
                }
                // Unshare, then look at the same PTE again: a racing fault may have backed us off.
                if (WriteProtectFault(vma, va, slot, ptePfn, pte, unshare: true) == FaultResult.OutOfMemory)
                    return Errno.ENOMEM;
            }
        }
    }
}
