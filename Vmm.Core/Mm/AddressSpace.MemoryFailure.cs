// AddressSpace.MemoryFailure: madvise's error injection (Linux's madvise_inject_error in mm/madvise.c):
// MADV_HWPOISON and MADV_SOFT_OFFLINE hand each page of the range to the memory-failure handler
// (Mm/MemoryFailure.cs) with a reference taken the way get_user_pages_fast(start, 1, 0) takes it.
//
// Linux's idiom, not madvise's usual one: no VMA walk and no mmap_lock around the call; each page is
// looked up (and faulted in for read if needed: untouched private memory is the zero page, which the
// handler refuses) on its own, the first error ends the call, and what was done before it stays done.
// An unmapped address, a PROT_NONE page or a hwpoison entry (a page poisoned already) is EFAULT, as
// get_user_pages without FOLL_HWPOISON answers.
//
// Locking: the mmap_lock for read and the pte lock only while a page is looked up and its reference
// taken; the handler runs holding neither.
using Vmm.Diagnostics;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    /// <summary>
    /// madvise_inject_error over [<paramref name="start"/>, <paramref name="end"/>). The caller checked the
    /// range and CAP_SYS_ADMIN. Returns the first error (EFAULT for a page that cannot be had, ENOMEM out
    /// of frames, or the handler's: EBUSY, EIO, EHWPOISON, ENOMEM).
    /// </summary>
    public Errno MadviseInjectError(ulong start, ulong end, Advice advice)
    {
        LockAssert.MmapLockNotHeld(this);
        MemoryFailure handler = _machine.MemoryFailure;
        for (ulong va = start; va < end; va += PageSize)
        {
            Errno error = GetUserPageForRead(va, out long pfn);
            if (error != Errno.None)
                return error;
            error = advice == Advice.SoftOffline
                ? handler.SoftOffline(pfn, countIncreased: true)
                : handler.HardOffline(pfn, countIncreased: true, current: this);
            if (error != Errno.None)
                return error;
        }
        return Errno.None;
    }

    /// <summary>
    /// get_user_pages_fast(va, 1, 0): the frame mapped at <paramref name="va"/>, faulted in for read if
    /// needed, with a reference taken under its pte lock. EFAULT when there is no readable mapping or
    /// the entry is a hwpoison entry; ENOMEM when the fault found no frame.
    /// </summary>
    private Errno GetUserPageForRead(ulong va, out long pfn)
    {
        pfn = -1;
        while (true)
        {
            FaultResult result = TryHandleFault(va, write: false);
            if (result != FaultResult.Done)
                return result == FaultResult.OutOfMemory ? Errno.ENOMEM : Errno.EFAULT;
            MmapLock.EnterReadLock();
            try
            {
                if (Exited)
                    return Errno.EFAULT;
                ulong* slot = FindPte(va, out long ptePfn);
                if (slot == null)
                    continue;
                LockPte(ptePfn);
                try
                {
                    var pte = new Pte(Volatile.Read(ref *slot));
                    if (!pte.IsPresent || (pte.Value & Pte.UserBit) == 0)
                        continue; // zapped, migrating or poisoned meanwhile: fault again
                    // Under the pte lock the mapping keeps the frame alive (the zero page is never freed).
                    _machine.MemMap.GetPage(pte.Pfn);
                    pfn = pte.Pfn;
                    return Errno.None;
                }
                finally
                {
                    UnlockPte(ptePfn);
                }
            }
            finally
            {
                MmapLock.ExitReadLock();
            }
        }
    }
}
