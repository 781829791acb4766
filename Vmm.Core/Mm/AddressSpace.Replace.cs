// Moving the page behind one virtual address to a new frame while the process's threads keep using it:
// look the page up, take a reference under the pte lock, and hand it to the page migrator, which finds
// every mapping through the reverse map (see Migration/PageMigrator.cs for the freeze-verify-commit
// sequence).
//
// Locking: the mmap_lock for read and the pte lock only to find the page and take a reference; the
// LRU isolation (lru_lock) and the migrator run after both are released (they need neither).
using Vmm.Memory;
using Vmm.Migration;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    /// <summary>Moves the page mapped at <paramref name="va"/> to a new frame on <paramref name="targetNode"/>.</summary>
    /// <returns>None; EFAULT if nothing is mapped there; ENOENT for the zero page; otherwise the
    /// migrator's answer (EBUSY, EAGAIN, ENOMEM).</returns>
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
        try
        {
            // Isolate it from its LRU list; a new page may still sit in an add batch (PG_lru clear):
            // drain this processor's, then all, as the migration calls do.
            LruLists lru = _machine.Lru;
            if (!lru.Isolate(pfn))
            {
                lru.DrainLocal();
                if (!lru.Isolate(pfn))
                {
                    lru.DrainAll();
                    if (!lru.Isolate(pfn))
                        return Errno.EBUSY; // isolated by another mover
                }
            }
            Errno result = PageMigrator.MovePage(_machine, pfn, targetNode);
            if (result == Errno.None)
                lru.ReleaseIsolated(pfn);
            else
                lru.Putback(pfn);
            return result;
        }
        finally
        {
            _machine.PutPage(pfn);
        }
    }
}
