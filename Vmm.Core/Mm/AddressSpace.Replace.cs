// Replacing the frame behind a mapped page while the process's threads keep using it: the "freeze,
// verify, commit" sequence that migration, KSM and hot-remove are built from.
//
//   1. lock the page (PG_locked), so that no other mechanism works on it;
//   2. under the pte lock, replace the PTE with a migration entry (non-present): a thread that faults on
//      it waits for the page lock and retries;
//   3. flush: from here on no thread reads or writes the old frame through a stale translation;
//   4. verify: the references are exactly those the mappings explain plus ours; an extra one is a pin
//      (or a racing user), so put the old PTE back and give up;
//   5. copy the old frame to the new one;
//   6. commit (the point of no return): the PTE maps the new frame; unlock; free the old frame.
//
// This version replaces a page that one PTE of this mm maps. The migration engine generalises it
// through the reverse map to every mapping of the page.
using Vmm.Memory;
using Vmm.Native;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    /// <summary>
    /// Moves the private anonymous page mapped at <paramref name="va"/> to a new frame on
    /// <paramref name="targetNode"/>, copying its contents, while other threads may be using it.
    /// </summary>
    /// <returns>None; EFAULT if nothing is mapped there; ENOENT for the zero page; EBUSY if the page is
    /// shared, locked by another mechanism, or pinned; ENOMEM if no frame could be allocated.</returns>
    public Errno TryReplacePage(ulong va, int targetNode)
    {
        MmapLock.EnterReadLock();
        try
        {
            if (Exited)
                return Errno.EFAULT;
            Vma? vma = VmaAt(va);
            if (vma is null || vma.IsShared)
                return Errno.EFAULT;
            ulong* slot = FindPte(va, out long ptePfn);
            if (slot == null)
                return Errno.EFAULT;
            var pte = new Pte(Volatile.Read(ref *slot));
            if (!pte.IsPresent)
                return Errno.EFAULT;
            if (pte.IsSpecial)
                return Errno.ENOENT;
            long oldPfn = pte.Pfn;
            MemMap memMap = _machine.MemMap;

            // Take a reference under the pte lock (the PTE still maps the page, so it cannot be freed).
            LockPte(ptePfn);
            if (Volatile.Read(ref *slot) != pte.Value)
            {
                UnlockPte(ptePfn);
                return Errno.EAGAIN;
            }
            memMap.GetPage(oldPfn);
            UnlockPte(ptePfn);

            // 1. A background mechanism never sleeps on a page lock: trylock, and back off if busy.
            if (!_machine.PageLock.TryLock(oldPfn))
            {
                _machine.PutPage(oldPfn);
                return Errno.EBUSY;
            }
            try
            {
                if (memMap.MapCount(oldPfn) != 1)
                    return Errno.EBUSY;
                long newPfn = _machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero | AllocFlags.ThisNode, targetNode);
                if (newPfn == PageAllocator.NoPfn)
                    return Errno.ENOMEM;

                // 2. Freeze: a migration entry in place of the PTE.
                LockPte(ptePfn);
                pte = new Pte(Volatile.Read(ref *slot));
                if (!pte.IsPresent || pte.Pfn != oldPfn)
                {
                    UnlockPte(ptePfn);
                    _machine.PutPage(newPfn);
                    return Errno.EAGAIN;
                }
                Pte migration = Pte.SwapEntry(pte.IsWrite ? Pte.MigrationWriteType : Pte.MigrationReadType, oldPfn);
                Volatile.Write(ref *slot, migration.Value);
                UnlockPte(ptePfn);

                // 3. Flush: why before the verify and the copy: a thread that translated before step 2 may
                // still be writing into the old frame; after the flush none is.
                BumpGeneration();
                _machine.FlushTlb();

                // 4. Verify: one reference per mapping (1) plus ours. Anything more is a pin.
                if (memMap.RefCount(oldPfn) != 2 || memMap[oldPfn].PinCount != 0)
                {
                    LockPte(ptePfn);
                    Volatile.Write(ref *slot, pte.Value);
                    UnlockPte(ptePfn);
                    _machine.PutPage(newPfn);
                    return Errno.EBUSY;
                }

                // 5. Copy contents and the descriptor's identity.
                PageOps.Copy(_machine.Arena.FrameAddress(newPfn), _machine.Arena.FrameAddress(oldPfn));
                ref PageDescriptor oldPage = ref memMap[oldPfn];
                ref PageDescriptor newPage = ref memMap[newPfn];
                newPage.Mapping = oldPage.Mapping;
                newPage.Index = oldPage.Index;
                newPage.MapCount = oldPage.MapCount;
                ulong carried = (ulong)(PageFlags.SwapBacked | PageFlags.AnonExclusive | PageFlags.Dirty | PageFlags.Referenced);
                Interlocked.Or(ref newPage.Flags, oldPage.Flags & carried);

                // 6. Commit: past this line the page lives in the new frame. The old frame loses its mapping.
                LockPte(ptePfn);
                Volatile.Write(ref *slot, Pte.Make(newPfn, pte.IsWrite, pte.IsDirty, pte.IsAccessed).Value);
                UnlockPte(ptePfn);
                oldPage.MapCount = -1;
                Interlocked.And(ref oldPage.Flags, ~carried);
                _machine.PutPage(oldPfn); // the mapping's reference; ours goes in finally
                Interlocked.Increment(ref _machine.PagesReplaced);
                return Errno.None;
            }
            finally
            {
                _machine.PageLock.Unlock(oldPfn);
                _machine.PutPage(oldPfn);
            }
        }
        finally
        {
            MmapLock.ExitReadLock();
        }
    }
}
