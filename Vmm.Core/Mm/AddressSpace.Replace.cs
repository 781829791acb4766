// Moving the page behind one virtual address to a new frame while the process's threads keep using it:
// look the page up, take a reference under the pte lock, isolate it from its LRU list, and hand it to
// the migration engine as a list of one page in SYNC mode; the engine finds every mapping through the
// reverse map (see Migration/MigrationEngine.cs for the freeze-verify-commit sequence).
//
// Locking: the mmap_lock for read and the pte lock only to find the page and take a reference; the
// LRU isolation (lru_lock) and the engine run after both are released (they need neither).
using Vmm.Memory;
using Vmm.Migration;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    /// <summary>Moves the page mapped at <paramref name="va"/> to a new frame on <paramref name="targetNode"/>.</summary>
    /// <returns>None; EFAULT if nothing is mapped there; ENOENT for the zero page; EBUSY if the page
    /// is being migrated already (isolated by another mover), is pinned, locked or in use elsewhere
    /// through every pass, or is of a kind the engine does not move; ENOMEM if no frame is free on the
    /// target node.</returns>
    public Errno TryReplacePage(ulong va, int targetNode)
    {
        long pfn;
        MmapLock.EnterReadLock();
        try
        {
            if (Exited || VmaAt(va) is null)
                return Errno.EFAULT;
            ulong* slot = FindPte(va, out long ptePfn);
            if (slot == null)
                return Errno.EFAULT;
            LockPte(ptePfn);
            var pte = new Pte(Volatile.Read(ref *slot));
            if (!pte.IsPresent || pte.IsSpecial)
            {
                UnlockPte(ptePfn);
                return pte.IsSpecial ? Errno.ENOENT : pte.IsMigrationEntry ? Errno.EBUSY : Errno.EFAULT;
            }
            pfn = pte.Pfn;
            _machine.MemMap.GetPage(pfn); // the PTE still maps it under the pte lock: it cannot be free
            UnlockPte(ptePfn);
        }
        finally
        {
            MmapLock.ExitReadLock();
        }

        // Isolate it from its LRU list; a new page may still sit in an add batch (PG_lru clear): drain
        // this processor's, then all, as the migration calls do. The isolation holds its own reference,
        // which the engine drops when the page moves and PutbackMovablePages when it does not.
        LruLists lru = _machine.Lru;
        bool isolated = lru.Isolate(pfn);
        if (!isolated)
        {
            lru.DrainLocal();
            isolated = lru.Isolate(pfn);
            if (!isolated)
            {
                lru.DrainAll();
                isolated = lru.Isolate(pfn);
            }
        }
        _machine.PutPage(pfn); // ours; the isolation's (if any) keeps the page
        if (!isolated)
            return Errno.EBUSY; // isolated by another mover, or not an LRU page

        MigrationEngine engine = _machine.Migration;
        List<long> from = engine.RentList();
        try
        {
            from.Add(pfn);
            int rc = engine.MigratePages(from,
                _ => _machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero | AllocFlags.ThisNode, targetNode),
                null, MigrateMode.Sync, MigrateReason.Syscall, out _);
            return rc == 0 ? Errno.None : rc == -(int)Errno.ENOMEM ? Errno.ENOMEM : Errno.EBUSY;
        }
        finally
        {
            engine.PutbackMovablePages(from);
            engine.ReturnList(from);
        }
    }
}
