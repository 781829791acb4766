// Moving the page behind one virtual address to a new frame while the process's threads keep using it:
// look the page up, take a reference under the pte lock, and hand it to the page migrator, which finds
// every mapping through the reverse map (see Migration/PageMigrator.cs for the freeze-verify-commit
// sequence).
//
// Locking: the mmap_lock for read and the pte lock only to find the page and take a reference; the
// migrator runs after both are released (it needs neither).
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
            return PageMigrator.MovePage(_machine, pfn, targetNode);
        }
        finally
        {
            _machine.PutPage(pfn);
        }
    }
}
