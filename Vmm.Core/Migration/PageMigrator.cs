// PageMigrator: moves one page to a new frame while the processes that map it keep running (Linux's
// unmap_and_move: migrate_folio_unmap, then migrate_folio_move), the engine that migrate_pages, KSM
// page migration and hot-remove are to be built on. Today it moves anonymous, shared-anonymous and KSM
// pages (not compound pages) wherever they are mapped, through the reverse map; its caller is
// AddressSpace.TryReplacePage (Mm/AddressSpace.Replace.cs).
//
// Locking: the old page's lock (trylock) and the new frame's; the reverse map takes the anon_vma or shmem
// lock and the pte locks (RmapWalker.cs); for shared memory the verify, copy and page-cache switch run
// under the shmem object's lock. No mmap_lock: fork copies PTEs under the pte lock (docs/locking.md,
// "Fork versus the migrator").
//
// Freeze, verify, commit:
//   1. trylock the page (a mechanism never sleeps on a page lock another one holds);
//   2. replace every PTE that maps it with a migration entry (TryToMigrate), which flushes: from here
//      no thread touches the old frame, and a thread that faults on an entry sleeps on the page lock;
//   3. verify: the only references left are the caller's and the isolation's (and the page cache's,
//      for shared memory).
//      Anything more is a pin or a racing user: map the old page back and report EBUSY;
//   4. copy the contents and the descriptor's identity (mapping, index, flags) to the new frame;
//   5. commit, the point of no return: the page cache and every migration entry now name the new frame;
//   6. the new frame joins the LRU (Lru.Add); unlock; the caller ends the old frame's isolation
//      (Lru.ReleaseIsolated) and drops its reference, which frees it.
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Mm;
using Vmm.Native;
using Vmm.Rmap;

namespace Vmm.Migration;

internal static class PageMigrator
{
    // PG_anon_exclusive is not carried: while the page is unmapped it lives in the migration entries,
    // and RemoveMigrationPtes sets it on the new frame from them. PG_active is (folio_migrate_flags):
    // the new frame joins the list the old one was on.
    private const PageFlags Carried = PageFlags.SwapBacked | PageFlags.Dirty | PageFlags.Referenced | PageFlags.Uptodate | PageFlags.Active;

    /// <summary>Copies contents and identity (mapping, index, carried flags) to the new frame.</summary>
    internal static unsafe void CopyPage(Machine machine, long pfn, long newPfn)
    {
        MemMap memMap = machine.MemMap;
        PageOps.Copy(machine.Arena.FrameAddress(newPfn), machine.Arena.FrameAddress(pfn));
        ref PageDescriptor oldPage = ref memMap[pfn];
        ref PageDescriptor newPage = ref memMap[newPfn];
        newPage.Mapping = oldPage.Mapping;
        newPage.Index = oldPage.Index;
        Interlocked.Or(ref newPage.Flags, oldPage.Flags & (ulong)Carried);
    }

    /// <summary>
    /// Moves the page in <paramref name="pfn"/> to a new frame on <paramref name="targetNode"/>.
    /// Preconditions: the caller holds a reference to the page (and drops it afterwards) and has isolated
    /// it from its LRU list (Lru.Isolate); it ends the isolation afterwards (Lru.ReleaseIsolated when
    /// the page moved, Lru.Putback otherwise).
    /// </summary>
    /// <returns>None; EBUSY (locked by another mechanism, pinned, or in use elsewhere); EAGAIN (its
    /// mappings changed under us: try again); EINVAL (not an anonymous, shared-anonymous or KSM page);
    /// ENOMEM (no frame on the target node).</returns>
    public static unsafe Errno MovePage(Machine machine, long pfn, int targetNode)
    {
        LockAssert.Referenced(machine.MemMap, pfn);
        MemMap memMap = machine.MemMap;
        if (!machine.PageLock.TryLock(pfn))
            return Errno.EBUSY;
        try
        {
            ref PageDescriptor oldPage = ref memMap[pfn];
            ulong mapping = oldPage.Mapping;
            ulong tag = mapping & PageDescriptor.MappingTagMask;
            // KSM pages move too (ksm-migrate): their mappings are found through the stable node's items.
            if (mapping == 0 || tag == PageDescriptor.MappingMovable || (tag == PageDescriptor.MappingKsm && machine.Ksm is null) || memMap.IsCompound(pfn) ||
                (oldPage.Flags & (ulong)PageFlags.Reserved) != 0)
                return Errno.EINVAL;
            ShmemObject? shmem = tag == 0 ? machine.Mappings.Find<ShmemObject>((long)(mapping >> 2)) : null;
            if (tag == 0 && shmem is null)
                return Errno.EAGAIN; // the object went away: the page is being freed

            long newPfn = machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero | AllocFlags.ThisNode, targetNode);
            if (newPfn == PageAllocator.NoPfn)
                return Errno.ENOMEM;
            // The new frame is locked too, as in Linux: once the page cache or a PTE names it, another
            // mechanism could find it, and must not work on it before the migration is done.
            machine.PageLock.Lock(newPfn);
            try
            {
                return MoveLocked(machine, pfn, newPfn, shmem);
            }
            finally
            {
                machine.PageLock.Unlock(newPfn);
                machine.PutPage(newPfn); // the allocation's reference: the mappings (or the cache) hold their own now
            }
        }
        finally
        {
            machine.PageLock.Unlock(pfn);
        }
    }

    /// <summary>Steps 2 to 5. Preconditions: both pages locked; the caller holds a reference to each.</summary>
    private static Errno MoveLocked(Machine machine, long pfn, long newPfn, ShmemObject? shmem)
    {
        LockAssert.PageLocked(machine.PageLock, pfn);
        LockAssert.PageLocked(machine.PageLock, newPfn);
        LockAssert.Referenced(machine.MemMap, pfn);
        LockAssert.Referenced(machine.MemMap, newPfn);
        MemMap memMap = machine.MemMap;
        ref PageDescriptor oldPage = ref memMap[pfn];
        // 2. Freeze.
        if (!machine.Rmap.TryToMigrate(pfn))
        {
            machine.Rmap.RemoveMigrationPtes(pfn, pfn);
            return Errno.EAGAIN;
        }

        // 3. Verify, 4. copy and 5. commit. For shared memory all three run under the object's lock:
        // a fault takes its reference under that lock (ShmemObject.GetPage), so none can appear between the
        // check and the switch of the page cache, and an object that lost its last mapping meanwhile
        // (its cache emptied) is noticed.
        Errno verdict;
        if (shmem is not null)
        {
            lock (shmem.Lock)
            {
                verdict = !shmem.Pages.TryGetValue((long)oldPage.Index, out long cached) || cached != pfn ? Errno.EAGAIN
                    : memMap.RefCount(pfn) != 3 || oldPage.PinCount != 0 ? Errno.EBUSY
                    : Errno.None;
                if (verdict == Errno.None)
                {
                    CopyPage(machine, pfn, newPfn);
                    memMap.GetPage(newPfn); // the page cache's reference
                    shmem.Pages[(long)oldPage.Index] = newPfn;
                }
            }
        }
        else
        {
            verdict = memMap.RefCount(pfn) != 2 || oldPage.PinCount != 0 ? Errno.EBUSY : Errno.None;
            if (verdict == Errno.None)
                CopyPage(machine, pfn, newPfn);
        }
        if (verdict != Errno.None)
        {
            machine.Rmap.RemoveMigrationPtes(pfn, pfn);
            return verdict;
        }

        // Past this line the page lives in the new frame.
        if (shmem is not null)
            machine.PutPage(pfn); // the old frame's page-cache reference
        // KSM (ksm-migrate; the engine must keep this call at this point): after the copy, before the PTEs
        // are restored, with both pages locked, the stable node switches to the new frame. The KSM rmap
        // walk of the new page below finds the mappings only through a node that names it. A KSM page
        // holds no reference of KSM's (the stable node names it by pfn), so the check above is the anon one.
        if ((oldPage.Mapping & PageDescriptor.MappingTagMask) == PageDescriptor.MappingKsm)
            machine.Ksm!.MigratePage(pfn, newPfn);
        machine.Rmap.RemoveMigrationPtes(pfn, newPfn);
        Interlocked.And(ref oldPage.Flags, ~(ulong)Carried);
        machine.Lru.Add(newPfn); // still holding the allocation's reference
        Interlocked.Increment(ref machine.PagesMigrated);
        return Errno.None;
    }
}
