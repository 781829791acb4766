// AddressSpace.Mprotect: mprotect (Linux's mm/mprotect.c): splits the VMAs at the range's edges,
// changes their flags, write-protects (or, for PROT_NONE, clears access to) the PTEs that lost a
// permission, merges each VMA with its neighbours again, and flushes once at the end.
//
// Locking: the mmap_lock for write; each pte lock in turn while the PTEs change.
using Vmm.Memory;
using Vmm.Rmap;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    /// <summary>
    /// mprotect, in do_mprotect_pkey's order: both PROT_GROWSDOWN and PROT_GROWSUP, or a misaligned start:
    /// EINVAL; an empty range: success; a range that wraps: ENOMEM; bits other than read, write, exec and
    /// PROT_SEM: EINVAL; then an unmapped part: ENOMEM (the part before it is changed, as in Linux); and
    /// PROT_GROWSDOWN / PROT_GROWSUP on a mapping that does not grow (every Vmm mapping): EINVAL.
    /// </summary>
    public Errno Mprotect(ulong address, ulong length, Protection prot)
    {
        Protection grows = prot & (Protection.GrowsDown | Protection.GrowsUp);
        prot &= ~(Protection.GrowsDown | Protection.GrowsUp);
        if (grows == (Protection.GrowsDown | Protection.GrowsUp))
            return Errno.EINVAL; // can't be both
        if ((address & PageMask) != 0)
            return Errno.EINVAL;
        if (length == 0)
            return Errno.None;
        ulong aligned = (length + PageMask) & ~PageMask;
        ulong end = address + aligned;
        if (aligned < length || end <= address)
            return Errno.ENOMEM; // beyond TASK_SIZE there is no VMA: the loop reports the hole
        if ((prot & ~(Protection.Read | Protection.Write | Protection.Exec | Protection.Sem)) != 0)
            return Errno.EINVAL; // arch_validate_prot
        if (grows != 0)
        {
            // Linux finds the VMA first: none at or above the range is ENOMEM; one that does not grow is EINVAL.
            MmapLock.EnterReadLock();
            try
            {
                Vma? vma = FindVma(address);
                if (vma is null || (grows == Protection.GrowsDown ? vma.Start >= end : vma.Start > address))
                    return Errno.ENOMEM;
                return Errno.EINVAL;
            }
            finally
            {
                MmapLock.ExitReadLock();
            }
        }
        MmapLock.EnterWriteLock();
        try
        {
            VmaFlags wanted = ToVmaFlags(prot);
            bool narrowed = false;
            ulong cursor = address;
            Errno result = Errno.None;
            while (cursor < end)
            {
                Vma? vma = FindVma(cursor);
                if (vma is null || vma.Start > cursor)
                {
                    result = Errno.ENOMEM;
                    break;
                }
                vma = SplitToRange(vma, cursor, end);
                VmaFlags old = vma.Flags;
                vma.Flags = (old & ~(VmaFlags.Read | VmaFlags.Write | VmaFlags.Exec)) | wanted;
                if ((old & VmaFlags.Write) != 0 && (wanted & VmaFlags.Write) == 0 ||
                    (old & VmaFlags.Read) != 0 && (wanted & VmaFlags.Read) == 0)
                    narrowed |= ChangeProtection(vma, removeAccess: (wanted & VmaFlags.Read) == 0);
                cursor = vma.End;
                TryMergeAround(vma);
            }
            // A PTE met read-only (KSM's write-protect) or as a migration entry may stand for a writable
            // translation still cached until its mechanism's batched flush.
            FlushMarks marks = ReadFlushMarks();
            if (narrowed || FlushPending(marks))
            {
                BumpGeneration();
                _machine.Tlb.Flush();
                FlushedUpTo(marks);
            }
            return result;
        }
        finally
        {
            MmapLock.ExitWriteLock();
        }
    }

    /// <summary>change_pte_range: write-protects every present PTE of the VMA; for PROT_NONE also clears
    /// the user bit, so the access path faults and the fault handler consults the VMA. Returns true if anything changed.</summary>
    private bool ChangeProtection(Vma vma, bool removeAccess)
    {
        bool changed = false;
        for (ulong va = vma.Start; ;)
        {
            ulong* table = NextPteTable(ref va, vma.End, out long ptePfn);
            if (table == null)
                break;
            for (ulong tableEnd = Math.Min(vma.End, PteTableEnd(va)); va < tableEnd; va += PageSize)
            {
                ulong* slot = table + Index(va, 0);
                LockPte(ptePfn);
                var pte = new Pte(Volatile.Read(ref *slot));
                if (pte.IsMigrationEntry && pte.SwapType == Pte.MigrationWriteType)
                {
                    // The page comes back read-only (still exclusive) when its migration ends; the restore
                    // takes the user bit from the VMA.
                    Volatile.Write(ref *slot, Pte.SwapEntry(Pte.MigrationReadExclusiveType, pte.SwapOffset).Value);
                }
                else if (pte.IsPresent && (pte.IsWrite || removeAccess))
                {
                    // An atomic clear: the access path may be setting the accessed or dirty bit right now.
                    Interlocked.And(ref *slot, ~(removeAccess ? Pte.WriteBit | Pte.UserBit : Pte.WriteBit));
                    changed = true;
                }
                UnlockPte(ptePfn);
            }
        }
        return changed;
    }
}
