// Fork (Linux's dup_mmap, anon_vma_fork, copy_page_range).
//
// Locking: the parent's mmap_lock for write (and the child's, nested under it: dup_mmap's
// mmap_write_lock_nested); each anon_vma or shmem object's lock while the child's VMA is linked; the
// parent's pte lock while each PTE is copied and write-protected (the migrator and KSM change PTEs
// without the mmap_lock). KSM hears of the child through ksm_fork (Ksm.Enter) at the end. The child's
// page tables are installed under the child's page_table_lock (AllocPte) and its PTEs are written
// without its pte lock: no fault or syscall can reach the child before fork returns, and a reverse-map
// walker that reaches a child VMA through a shared anon_vma or shmem object can see a child PTE appear
// only after fork took that page's reference, so the migrator's reference check refuses the page (it is
// retried) instead of missing a mapping.
//
// The child gets a copy of every VMA. Shared mappings keep sharing their frames. Private anonymous
// pages are shared copy-on-write: both PTEs become read-only and the page loses PG_anon_exclusive, so
// the first write on either side copies. A pinned exclusive page is the exception: it is copied for
// the child at once (Linux's page_needs_cow_for_dma), so the pin keeps pointing at the parent's page.
// The parent's write-protected PTEs are flushed before fork returns: after fork, no parent write can
// reach a frame the child sees.
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Native;
using Vmm.Rmap;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    /// <summary>Copies this address space into a new one. Returns null (and leaves no trace) when memory runs out.</summary>
    public AddressSpace? Fork(int childHomeNode)
    {
        var child = new AddressSpace(_machine, childHomeNode) { KsmMergeAny = KsmMergeAny, KsmDefaultDomain = KsmDefaultDomain };
        MmapLock.EnterWriteLock();
        // dup_mmap's mmap_write_lock_nested: the child is built under its own mmap_lock for write too.
        // No other thread can take it yet (ksmd finds the child only through ksm_fork, at the end, and
        // then waits for fork to return), so this costs one uncontended acquire; it makes the child's
        // VMA insertion, table allocation and KSM registration meet their preconditions like any mm's.
        // Lock order: parent before child, and nobody can hold the child's while waiting for a parent's.
        // The child's lock is released before the finally's flush: once ksm_fork has run, ksmd may be
        // waiting for it.
        bool childLocked = false;
        bool writeProtected = false;
        try
        {
            child.MmapLock.EnterWriteLock();
            childLocked = true;
            if (Exited)
                return null;
            // copy_process's mpol_dup and the cpuset's mems: the child starts with the parent's task
            // policy and allowed nodes (the child joins the parent's cpuset after fork returns, which
            // rebinds it if the mems changed meanwhile). Read here, under the parent's mmap_lock.
            child.TaskPolicy = TaskPolicy;
            child.MemsAllowed = MemsAllowed;
            child.InterleavePrevious = InterleavePrevious;
            foreach (Vma vma in _vmas)
            {
                var copy = new Vma(child, vma.Start, vma.End, vma.Flags, vma.PgOff) { Shmem = vma.Shmem, KsmDomain = vma.KsmDomain, Policy = vma.Policy };
                if (vma.Shmem is { } shmem)
                {
                    lock (shmem.Lock)
                        shmem.Vmas.Add(copy);
                }
                else if (vma.AnonVma is { } parentAnonVma)
                {
                    // anon_vma_fork: find the parent's pages through every anon_vma the parent links to,
                    // and give the child its own for the pages it will create.
                    CloneAnonVmaChains(vma, copy);
                    var own = new AnonVma(_machine.Mappings.NewHandle(), parentAnonVma);
                    _machine.Mappings.Register(own.Handle, own);
                    var link = new AnonVmaChain(copy, own);
                    lock (own.Lock)
                        own.Chains.Add(link);
                    copy.AnonVmaChains.Add(link);
                    copy.AnonVma = own;
                }
                child.InsertVma(copy);
                if (!CopyPageRange(vma, copy, child, ref writeProtected))
                {
                    child.MmapLock.ExitWriteLock(); // Teardown takes it again
                    childLocked = false;
                    AbortFork(child, writeProtected);
                    writeProtected = false;
                    return null;
                }
            }
            // ksm_fork: a child of a registered mm is registered too (its VMAs keep VM_MERGEABLE; its
            // mappings of KSM pages are linked by ksmd later, without a compare).
            if (KsmSlot is not null)
                _machine.Ksm?.Enter(child);
            return child;
        }
        finally
        {
            if (childLocked)
                child.MmapLock.ExitWriteLock();
            // A PTE fork met read-only (KSM's write-protect) or as a migration entry may stand for a
            // writable translation still cached until its mechanism's batched flush: dup_mmap flushes
            // the parent at its end for the same reason, so that no parent write reaches a frame the child shares.
            FlushMarks marks = ReadFlushMarks();
            if (writeProtected || FlushPending(marks))
            {
                BumpGeneration();
                _machine.Tlb.Flush();
                FlushedUpTo(marks);
            }
            MmapLock.ExitWriteLock();
        }
    }

    private void AbortFork(AddressSpace child, bool writeProtected)
    {
        if (writeProtected)
        {
            BumpGeneration();
            _machine.Tlb.Flush();
        }
        child.Teardown();
    }

    /// <summary>
    /// copy_nonpresent_pte for a migration entry: the child gets the entry too (the migrator restores
    /// it through the reverse map); a private writable one becomes read-only in both, as the page is now
    /// shared copy-on-write. A hwpoison entry is copied as it is.
    /// </summary>
    private bool CopyMigrationEntry(Vma parentVma, ulong* slot, long ptePfn, ulong* childSlot, AddressSpace child)
    {
        LockPte(ptePfn);
        try
        {
            var pte = new Pte(Volatile.Read(ref *slot));
            if (pte.IsPresent || pte.IsNone)
                return false;
            if (pte.IsHwPoisonEntry)
            {
                // The child inherits the poison (copy_nonpresent_pte copies the entry as it is): its
                // access there is a bus error too. No reference, no RSS.
                *childSlot = pte.Value;
                return true;
            }
            if (!pte.IsMigrationEntry)
                throw new VmBugException($"fork met a swap entry ({pte}): swap is not built yet");
            if (!parentVma.IsShared)
            {
                // The page becomes shared copy-on-write: neither side may keep it writable or exclusive.
                if (pte.IsExclusiveMigrationEntry)
                {
                    pte = Pte.SwapEntry(Pte.MigrationReadType, pte.SwapOffset);
                    Volatile.Write(ref *slot, pte.Value);
                }
                Interlocked.Increment(ref child.RssAnon);
            }
            else
            {
                Interlocked.Increment(ref child.RssShmem);
            }
            *childSlot = pte.Value;
            return true;
        }
        finally
        {
            UnlockPte(ptePfn);
        }
    }

    /// <summary>copy_page_range for one VMA. Preconditions: this mm's mmap_lock held for write.</summary>
    private bool CopyPageRange(Vma parentVma, Vma childVma, AddressSpace child, ref bool writeProtected)
    {
        LockAssert.MmapLockHeld(this, write: true);
        MemMap memMap = _machine.MemMap;
        for (ulong va = parentVma.Start; ;)
        {
            ulong* table = NextPteTable(ref va, parentVma.End, out long ptePfn);
            if (table == null)
                break;
            ulong* childTable = null; // the child's table for the same 2 MiB, allocated on first need
            for (ulong tableEnd = Math.Min(parentVma.End, PteTableEnd(va)); va < tableEnd; va += PageSize)
            {
                ulong* slot = table + Index(va, 0);
                if (Volatile.Read(ref *slot) == 0)
                    continue;
                if (childTable == null)
                {
                    ulong* first = child.AllocPte(va, out _);
                    if (first == null)
                        return false;
                    childTable = first - Index(va, 0);
                }
                ulong* childSlot = childTable + Index(va, 0);
                if (CopyMigrationEntry(parentVma, slot, ptePfn, childSlot, child))
                    continue;

                // Everything below runs under the parent's pte lock: the page migrator changes PTEs
                // without the mmap_lock, and must see either the parent's PTE alone or both mappings.
                LockPte(ptePfn);
                var pte = new Pte(Volatile.Read(ref *slot));
                if (!pte.IsPresent)
                {
                    UnlockPte(ptePfn);
                    if (!pte.IsNone)
                        va -= PageSize; // it just became a migration entry: look at this PTE again
                    continue;
                }
                if (pte.IsSpecial)
                {
                    UnlockPte(ptePfn);
                    *childSlot = pte.Value;
                    if (IsKsmZeroPte(pte))
                    {
                        // The child maps a KSM zero page too: it counts for the child and globally.
                        Interlocked.Increment(ref child.KsmZeroPages);
                        _machine.Ksm?.ZeroPagesChanged(1);
                    }
                    continue;
                }
                long pfn = pte.Pfn;
                if (parentVma.IsShared)
                {
                    memMap.GetPage(pfn);
                    Interlocked.Increment(ref memMap[pfn].MapCount);
                    UnlockPte(ptePfn);
                    *childSlot = pte.WithoutFlags(Pte.AccessedBit).Value;
                    Interlocked.Increment(ref child.RssShmem);
                    continue;
                }
                if (memMap[pfn].PinCount > 0 && memMap.TestFlag(pfn, PageFlags.AnonExclusive))
                {
                    // The pin must keep seeing the parent's writes: the child gets its own copy now. The
                    // reference keeps the frame while we copy without the lock.
                    memMap.GetPage(pfn);
                    UnlockPte(ptePfn);
                    long copyPfn = AllocUserPage(parentVma, va, AllocFlags.Movable | AllocFlags.NoZero); // folio_prealloc: the parent's policy
                    if (copyPfn == PageAllocator.NoPfn)
                    {
                        _machine.PutPage(pfn);
                        return false;
                    }
                    PageOps.Copy(_machine.Arena.FrameAddress(copyPfn), _machine.Arena.FrameAddress(pfn));
                    _machine.PutPage(pfn);
                    child.PageAddNewAnonRmap(copyPfn, childVma, va, childVma.AnonVma!);
                    _machine.Lru.Add(copyPfn);
                    *childSlot = pte.WithPfn(copyPfn).WithFlags(Pte.DirtyBit).WithoutFlags(Pte.AccessedBit).Value; // same protection, PROT_NONE included
                    Interlocked.Increment(ref child.RssAnon);
                    continue;
                }
                memMap.ClearFlag(pfn, PageFlags.AnonExclusive);
                memMap.GetPage(pfn);
                memMap.Trace?.Record(pfn, Vmm.Diagnostics.FrameEvent.ForkCopy, Vmm.Diagnostics.FrameTrace.At(child.Id, va));
                Interlocked.Increment(ref memMap[pfn].MapCount);
                if (pte.IsWrite)
                {
                    // An atomic clear: the access path may be setting the accessed or dirty bit right now.
                    pte = new Pte(Interlocked.And(ref *slot, ~Pte.WriteBit)).WithoutWrite();
                    writeProtected = true;
                }
                *childSlot = pte.WithoutFlags(Pte.AccessedBit).Value;
                UnlockPte(ptePfn);
                Interlocked.Increment(ref child.RssAnon);
            }
        }
        return true;
    }
}
