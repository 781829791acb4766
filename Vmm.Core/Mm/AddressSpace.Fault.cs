// Page faults (Linux's handle_mm_fault, do_anonymous_page, do_shared_fault, do_wp_page).
//
// Locking: the mmap_lock for read; a VMA's first anon_vma under the VMA's monitor (PrepareAnonVma);
// the shmem object's lock inside ShmemObject.GetPage; the pte lock for every install and for the
// copy-on-write reuse decision; a fault on a migration entry sleeps once on the page lock, holding none.
// KSM hooks: CountCowKsm and the KSM zero-page count (docs/architecture.md, "KSM hooks"). LRU: every new
// page (anonymous, copy-on-write copy, unshare copy) joins the LRU (Lru.Add) under the pte lock that
// installs it; the copy-on-write reuse check drains this processor's add batch when the page may sit in it.
//
// The access path calls TryHandleFault after leaving its access section, holding no lock. The fault
// takes the mmap_lock for read, finds the VMA, checks the access against it, and makes the PTE allow the
// access; the access path then retries. Frames are allocated with no pte lock held; every PTE install
// re-checks, under the pte lock, that the entry is still what the fault saw, and backs off otherwise
// (another thread of the process faulted the same page first).
//
// Private anonymous memory: a read of a never-written page maps the shared zero page read-only; a
// write allocates a zeroed page. Copy-on-write: a write to a read-only private page reuses it when the
// process is its only user (PG_anon_exclusive, or one mapping and one reference), and copies it
// otherwise. The old frame's mapping reference is dropped only after a TLB flush, because another
// thread may still be reading it through a translation it cached before the PTE changed.
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Native;
using Vmm.Rmap;

namespace Vmm.Mm;

/// <summary>What a fault came to.</summary>
internal enum FaultResult
{
    Done,
    MapError,
    AccessError,
    OutOfMemory,
    Exited,
    /// <summary>VM_FAULT_HWPOISON: the address maps a poisoned page (a hwpoison entry, or a shared page poisoned in its object).</summary>
    HwPoison,
}

internal sealed unsafe partial class AddressSpace
{
    /// <summary>Handles a fault at <paramref name="va"/>; the caller retries the access on Done.</summary>
    public FaultResult TryHandleFault(ulong va, bool write) => TryHandleFault(va, write, unshare: false);

    /// <summary>
    /// Handles a fault. <paramref name="unshare"/> (FAULT_FLAG_UNSHARE, for read pins): a private page that
    /// is not exclusive to this process is copied, and the copy mapped read-only, so that a pin of it can
    /// never be separated from the process by a later copy-on-write.
    /// </summary>
    public FaultResult TryHandleFault(ulong va, bool write, bool unshare)
    {
        MmapLock.EnterReadLock();
        try
        {
            if (Exited)
                return FaultResult.Exited;
            if (va >= TaskSize)
                return FaultResult.MapError; // outside user space; AllocPte would ignore bits 47-63
            Vma? vma = VmaAt(va);
            if (vma is null)
                return FaultResult.MapError;
            if (write ? !vma.CanWrite : !vma.CanRead)
                return FaultResult.AccessError;
            ulong* slot = AllocPte(va, out long ptePfn);
            if (slot == null)
                return FaultResult.OutOfMemory;
            var pte = new Pte(Volatile.Read(ref *slot));
            if (pte.IsNone)
                return vma.IsShared ? SharedFault(vma, va, slot, ptePfn, write) : AnonymousFault(vma, va, slot, ptePfn, write || unshare, mapWritable: !unshare || write);
            if (pte.IsMigrationEntry)
            {
                MigrationEntryWait(slot, ptePfn, pte);
                return FaultResult.Done;
            }
            if (pte.IsHwPoisonEntry)
                return FaultResult.HwPoison; // do_swap_page on a hwpoison entry: VM_FAULT_HWPOISON
            if (!pte.IsPresent)
                throw new VmBugException($"fault on a swap entry ({pte}) at 0x{va:x}: swap is not built yet");
            if ((pte.Value & Pte.UserBit) == 0)
            {
                // PROT_NONE was lifted: give user access back (the write bit comes back through a write fault).
                UpdatePte(slot, ptePfn, pte, pte.WithFlags(Pte.UserBit | Pte.AccessedBit));
                return FaultResult.Done;
            }
            if (write && !pte.IsWrite)
                return WriteProtectFault(vma, va, slot, ptePfn, pte, unshare: false);
            if (unshare && !vma.IsShared && (pte.IsSpecial || !_machine.MemMap.TestFlag(pte.Pfn, PageFlags.AnonExclusive)))
                return WriteProtectFault(vma, va, slot, ptePfn, pte, unshare: true);
            return FaultResult.Done; // spurious: another thread fixed it, or the TLB fill will set A/D
        }
        finally
        {
            MmapLock.ExitReadLock();
        }
    }

    /// <summary>
    /// migration_entry_wait: the page is being moved under its page lock. Sleep until the lock is
    /// released (the migrator never waits for us), then let the caller retry. No reference is taken
    /// (one would make the migrator's reference check fail, and a page touched all the time could then
    /// never move): while the pte lock shows the entry in place, the migrator still holds the page
    /// locked and referenced, so PG_waiters can be set safely; after waking we do not touch the page.
    /// </summary>
    private void MigrationEntryWait(ulong* slot, long ptePfn, Pte entry)
    {
        LockPte(ptePfn);
        if (Volatile.Read(ref *slot) != entry.Value)
        {
            UnlockPte(ptePfn);
            return;
        }
        // Counted once PG_waiters is set (inside the callback): a migration that sees the count move
        // looks for pages with sleepers, and must find this one (MigrationEngine's waiters first).
        _machine.PageLock.WaitUnlockedOnce(entry.SwapOffset, () =>
        {
            UnlockPte(ptePfn);
            _machine.Migration.CountFaultWait();
        });
    }

    /// <summary>
    /// Takes the pte lock for installing <paramref name="pfn"/> in an empty PTE. If another thread filled
    /// the PTE meanwhile, unlocks, drops the page and returns false (the fault is done: retry the access);
    /// otherwise returns true with the pte lock held.
    /// </summary>
    private bool LockEmptyPte(ulong* slot, long ptePfn, long pfn)
    {
        LockPte(ptePfn);
        if (Volatile.Read(ref *slot) == 0)
            return true;
        UnlockPte(ptePfn);
        _machine.PutPage(pfn);
        return false;
    }

    /// <summary>Replaces a PTE if it still holds <paramref name="expected"/>. Returns false if it changed meanwhile.</summary>
    private bool UpdatePte(ulong* slot, long ptePfn, Pte expected, Pte value)
    {
        LockPte(ptePfn);
        bool same = Volatile.Read(ref *slot) == expected.Value;
        if (same)
            Volatile.Write(ref *slot, value.Value);
        UnlockPte(ptePfn);
        return same;
    }

    /// <summary>do_anonymous_page. Preconditions: mmap_lock held.</summary>
    private FaultResult AnonymousFault(Vma vma, ulong va, ulong* slot, long ptePfn, bool write, bool mapWritable = true)
    {
        LockAssert.MmapLockHeld(this);
        if (!write)
        {
            // A read of memory never written: the shared zero page, read-only, not refcounted per mapping.
            long zero = _machine.ZeroPagePfn;
            if (zero == PageAllocator.NoPfn)
                return FaultResult.OutOfMemory;
            UpdatePte(slot, ptePfn, Pte.None, Pte.Make(zero, write: false, accessed: true, special: true));
            _machine.MemMap.Trace?.RecordAt(Vmm.Diagnostics.FrameTrace.At(Id, va), Vmm.Diagnostics.FrameEvent.MapZero, zero);
            return FaultResult.Done;
        }
        AnonVma anonVma = PrepareAnonVma(vma);
        long pfn = AllocUserPage(vma, va, AllocFlags.Movable);
        if (pfn == PageAllocator.NoPfn)
            return FaultResult.OutOfMemory;
        if (!LockEmptyPte(slot, ptePfn, pfn))
            return FaultResult.Done;
        PageAddNewAnonRmap(pfn, vma, va, anonVma);
        _machine.MemMap.Trace?.Record(pfn, Vmm.Diagnostics.FrameEvent.MapAnon, Vmm.Diagnostics.FrameTrace.At(Id, va));
        _machine.Lru.Add(pfn); // folio_add_lru_vma: under the pte lock, while the fault's reference is still certain
        Volatile.Write(ref *slot, Pte.Make(pfn, write: vma.CanWrite && mapWritable, dirty: true, accessed: true).Value);
        UnlockPte(ptePfn);
        Interlocked.Increment(ref RssAnon);
        return FaultResult.Done;
    }

    /// <summary>do_shared_fault for shared anonymous memory: the page comes from the shmem object's page cache. Preconditions: mmap_lock held.</summary>
    private FaultResult SharedFault(Vma vma, ulong va, ulong* slot, long ptePfn, bool write)
    {
        LockAssert.MmapLockHeld(this);
        ShmemObject shmem = vma.Shmem!;
        long pfn = shmem.GetPage((long)vma.PageIndex(va), this, EffectivePolicy(vma));
        if (pfn == PageAllocator.NoPfn)
            return FaultResult.OutOfMemory;
        if (pfn == ShmemObject.PoisonedPfn)
            return FaultResult.HwPoison; // shmem_fault: the page at this index was poisoned
        if (!LockEmptyPte(slot, ptePfn, pfn))
            return FaultResult.Done;
        Interlocked.Increment(ref _machine.MemMap[pfn].MapCount); // page_add_file_rmap; the reference came with GetPage
        Volatile.Write(ref *slot, Pte.Make(pfn, write: write && vma.CanWrite, dirty: write, accessed: true).Value);
        UnlockPte(ptePfn);
        Interlocked.Increment(ref RssShmem);
        return FaultResult.Done;
    }

    /// <summary>do_wp_page: a write to a present, read-only PTE in a writable VMA. Preconditions: mmap_lock held.</summary>
    private FaultResult WriteProtectFault(Vma vma, ulong va, ulong* slot, long ptePfn, Pte pte, bool unshare)
    {
        LockAssert.MmapLockHeld(this);
        if (vma.IsShared)
        {
            UpdatePte(slot, ptePfn, pte, pte.WithFlags(Pte.WriteBit | Pte.DirtyBit | Pte.AccessedBit));
            return FaultResult.Done;
        }
        MemMap memMap = _machine.MemMap;
        long oldPfn = pte.Pfn;
        if (!pte.IsSpecial)
        {
            // wp_can_reuse_anon_folio: the page is ours alone. The checks run under the pte lock, which
            // every path that adds a mapping or a pin of this page also holds.
            LockPte(ptePfn);
            if (Volatile.Read(ref *slot) != pte.Value)
            {
                UnlockPte(ptePfn);
                return FaultResult.Done;
            }
            bool exclusive = memMap.TestFlag(oldPfn, PageFlags.AnonExclusive);
            if (!exclusive && !IsKsmPage(oldPfn) && memMap.MapCount(oldPfn) == 1)
            {
                // One mapping, and a second reference with PG_lru clear: it may be an add batch's (a page
                // faulted, forked, and copied away from by the child). Drain this processor's batch and
                // look again, as Linux does; then, unlike Linux, every batch: a host thread is not bound
                // to the processor its fault ran on (it may have moved since), and a page that is ours
                // alone is reused, not copied, whichever slot it waits in. The page's Add happened before
                // the PTE we hold locked was installed, so DrainAll's lock-free emptiness check sees its batch.
                if (memMap.RefCount(oldPfn) == 2 && !memMap.TestFlag(oldPfn, PageFlags.Lru))
                {
                    _machine.Lru.DrainLocal();
                    if (memMap.RefCount(oldPfn) == 2 && !memMap.TestFlag(oldPfn, PageFlags.Lru))
                        _machine.Lru.DrainAll();
                }
                if (memMap.RefCount(oldPfn) == 1)
                {
                    memMap.SetFlag(oldPfn, PageFlags.AnonExclusive);
                    exclusive = true;
                }
            }
            if (exclusive)
            {
                if (!unshare)
                    Volatile.Write(ref *slot, pte.WithFlags(Pte.WriteBit | Pte.DirtyBit | Pte.AccessedBit).Value);
                _machine.MemMap.Trace?.Record(oldPfn, Vmm.Diagnostics.FrameEvent.ReuseWrite, Vmm.Diagnostics.FrameTrace.At(Id, va));
                UnlockPte(ptePfn);
                return FaultResult.Done;
            }
            memMap.GetPage(oldPfn); // keep the frame alive while we copy it without the lock
            UnlockPte(ptePfn);
        }

        // wp_page_copy.
        AnonVma anonVma = PrepareAnonVma(vma);
        long newPfn = AllocUserPage(vma, va, AllocFlags.Movable | (pte.IsSpecial ? 0 : AllocFlags.NoZero));
        if (newPfn == PageAllocator.NoPfn)
        {
            if (!pte.IsSpecial)
                _machine.PutPage(oldPfn);
            return FaultResult.OutOfMemory;
        }
        if (!pte.IsSpecial)
        {
            // A read-only PTE means no thread writes the page, unless KSM write-protected it and its
            // batch has not flushed yet: a thread may still write through its old writable translation,
            // and a write after the copy would be lost. Flush first then (flush_tlb_batched_pending).
            FlushTlbBatchedPending(protectOnly: true);
            PageOps.Copy(_machine.Arena.FrameAddress(newPfn), _machine.Arena.FrameAddress(oldPfn));
        }

        LockPte(ptePfn);
        if (Volatile.Read(ref *slot) != pte.Value)
        {
            UnlockPte(ptePfn);
            _machine.PutPage(newPfn);
            if (!pte.IsSpecial)
                _machine.PutPage(oldPfn);
            return FaultResult.Done;
        }
        PageAddNewAnonRmap(newPfn, vma, va, anonVma);
        _machine.MemMap.Trace?.Record(newPfn, Vmm.Diagnostics.FrameEvent.MapCow, Vmm.Diagnostics.FrameTrace.At(Id, va));
        if (!pte.IsSpecial)
            _machine.MemMap.Trace?.Record(oldPfn, Vmm.Diagnostics.FrameEvent.Unmap, Vmm.Diagnostics.FrameTrace.At(Id, va));
        _machine.Lru.Add(newPfn);
        Volatile.Write(ref *slot, Pte.Make(newPfn, write: !unshare, dirty: true, accessed: true, user: (pte.Value & Pte.UserBit) != 0).Value);
        UnlockPte(ptePfn);
        // Other threads' cached read-only translations of the old frame are now stale.
        BumpGeneration();
        Interlocked.Increment(ref RssAnon);
        if (IsKsmZeroPte(pte))
            KsmZeroPteGone();
        if (!pte.IsSpecial)
        {
            Interlocked.Increment(ref _machine.CowFaults);
            if (IsKsmPage(oldPfn))
                _machine.Ksm?.CountCowKsm();
            PageRemoveRmap(oldPfn, vma);
            _machine.PutPage(oldPfn);        // our temporary reference
            _machine.Tlb.DeferPutPage(oldPfn);   // the mapping's: only after a flush
        }
        return FaultResult.Done;
    }

    /// <summary>PageKsm: the page's mapping word carries the KSM tag.</summary>
    public bool IsKsmPage(long pfn) =>
        (_machine.MemMap[_machine.MemMap.CompoundHead(pfn)].Mapping & PageDescriptor.MappingTagMask) == PageDescriptor.MappingKsm;

    // ================================================================================================
    // Reverse-map bookkeeping (rmap.c)
    // ================================================================================================

    /// <summary>folio_add_new_anon_rmap: the first mapping of a new anonymous page, exclusive to this process.</summary>
    private void PageAddNewAnonRmap(long pfn, Vma vma, ulong va, AnonVma anonVma)
    {
        ref PageDescriptor page = ref _machine.MemMap[pfn];
        page.MapCount = 0;
        page.Mapping = ((ulong)anonVma.Handle << 2) | PageDescriptor.MappingAnon;
        page.Index = vma.PageIndex(va);
        // One atomic for both bits: the page is order-0 (no compound redirection) and not yet mapped,
        // but a pfn scanner holding a speculative reference may be setting PG_locked concurrently.
        Interlocked.Or(ref page.Flags, (ulong)(PageFlags.SwapBacked | PageFlags.AnonExclusive));
    }

    /// <summary>folio_remove_rmap_pte: one mapping less; the counters follow.</summary>
    private void PageRemoveRmap(long pfn, Vma vma)
    {
        int left = Interlocked.Decrement(ref _machine.MemMap[pfn].MapCount);
        if (left < -1)
            throw new VmBugException($"mapcount of frame {pfn} went below zero");
        if (vma.IsShared)
            Interlocked.Decrement(ref RssShmem);
        else
            Interlocked.Decrement(ref RssAnon);
    }
}
