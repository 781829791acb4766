// The page-table side of the calls that move a process's pages (Migration/PageMoves.cs): finding the
// page behind one address as Linux's follow_page(FOLL_GET | FOLL_DUMP) does for move_pages, and
// finding every page of the address space on one node as queue_pages_range does for migrate_pages.
//
// Locking: the caller holds the mmap_lock (for read); the pte lock is taken for each lookup, and a
// reference is taken under it (a PTE that maps the page under its lock keeps the frame from being freed).
// A page under migration (a migration entry) is waited for, as a fault waits: the lookup sleeps on the
// page lock with the pte lock released, then looks again.
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Native;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    /// <summary>
    /// follow_page(FOLL_GET | FOLL_DUMP): the page mapped at <paramref name="va"/>, with a reference
    /// taken when <paramref name="get"/>. Preconditions: mmap_lock held.
    /// </summary>
    /// <returns>None (<paramref name="pfn"/> set); EFAULT when no VMA covers the address (addresses
    /// outside user space included) or the process has exited; ENOENT when nothing is mapped there or
    /// the page is the zero page (special PTEs are not pages a user can move or own).</returns>
    public Errno FollowPageLocked(ulong va, bool get, out long pfn)
    {
        LockAssert.MmapLockHeld(this);
        pfn = -1;
        if (Exited || va >= TaskSize || VmaAt(va) is null)
            return Errno.EFAULT;
        while (true)
        {
            ulong* slot = FindPte(va & ~PageMask, out long ptePfn);
            if (slot == null)
                return Errno.ENOENT;
            LockPte(ptePfn);
            var pte = new Pte(Volatile.Read(ref *slot));
            if (pte.IsMigrationEntry)
            {
                UnlockPte(ptePfn);
                MigrationEntryWait(slot, ptePfn, pte); // retakes the pte lock and re-checks the entry
                continue;
            }
            if (!pte.IsPresent || pte.IsSpecial)
            {
                UnlockPte(ptePfn);
                return Errno.ENOENT;
            }
            pfn = pte.Pfn;
            if (get)
                _machine.MemMap.GetPage(pfn); // still mapped under the pte lock: it cannot be free
            UnlockPte(ptePfn);
            return Errno.None;
        }
    }

    /// <summary>
    /// queue_pages_range over the whole address space for one node: adds to <paramref name="pages"/>
    /// every page (not the zero page) mapped by a present PTE whose frame lies on <paramref name="node"/>,
    /// each with a reference taken. A page mapped at several addresses is added once per mapping; the
    /// caller drops the duplicates. Preconditions: mmap_lock held.
    /// </summary>
    public void CollectPagesOnNodeLocked(int node, List<long> pages)
    {
        LockAssert.MmapLockHeld(this);
        if (Exited)
            return;
        MemMap memMap = _machine.MemMap;
        Topology topology = _machine.Topology;
        foreach (Vma vma in _vmas)
        {
            ulong va = vma.Start;
            while (true)
            {
                ulong* table = NextPteTable(ref va, vma.End, out long ptePfn);
                if (table == null)
                    break;
                ulong tableEnd = Math.Min(vma.End, PteTableEnd(va));
                bool locked = false;
                for (; va < tableEnd; va += PageSize)
                {
                    ulong raw = Volatile.Read(ref table[Index(va, 0)]);
                    if ((raw & Pte.PresentBit) == 0 || (raw & Pte.SpecialBit) != 0 ||
                        topology.NodeOf(new Pte(raw).Pfn) != node)
                        continue;
                    // Take the pte lock once per table, and only if the table has a page to queue.
                    if (!locked)
                    {
                        LockPte(ptePfn);
                        locked = true;
                    }
                    var pte = new Pte(Volatile.Read(ref table[Index(va, 0)]));
                    if (!pte.IsPresent || pte.IsSpecial || topology.NodeOf(pte.Pfn) != node)
                        continue;
                    memMap.GetPage(pte.Pfn); // mapped under the pte lock: it cannot be free
                    pages.Add(pte.Pfn);
                }
                if (locked)
                    UnlockPte(ptePfn);
            }
        }
    }
}
