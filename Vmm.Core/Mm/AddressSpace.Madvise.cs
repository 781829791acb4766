// AddressSpace.Madvise: madvise (Linux's mm/madvise.c) on anonymous memory: DONTNEED zaps the range
// (the next touch faults again), WILLNEED only checks it is mapped, MERGEABLE / UNMERGEABLE
// hand the range to KSM (AddressSpace.Ksm.cs), HWPOISON / SOFT_OFFLINE to the memory-failure handler
// page by page (AddressSpace.MemoryFailure.cs, with madvise_inject_error's own error idiom). TryMadviseEnd is the length rule shared with
// SetDedupeDomain.
//
// Errors, in Linux's order and idiom (madvise_walk_vmas): a misaligned start, an advice the Advice enum
// does not define (the enum is the accepted list), or a length that wraps is EINVAL before anything is
// done. Then the walk goes VMA by VMA: a hole in the range is remembered and the walk goes on (the
// mapped parts are still advised) and the call ends ENOMEM; a VMA that refuses the advice (DONTNEED on
// mlocked memory: EINVAL; UNMERGEABLE out of memory: EAGAIN) stops the walk there, and what was done
// before it stays done.
//
// Locking: the mmap_lock for write (WILLNEED: for read, only to check the range is mapped).
using Vmm.Memory;
using Vmm.Rmap;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    /// <summary>
    /// madvise's length rule: the end of [<paramref name="address"/>, + <paramref name="length"/> rounded up
    /// to pages); false (EINVAL) when the rounding or the sum wraps past 2^64. An empty range gives
    /// <paramref name="end"/> == <paramref name="address"/> (success, nothing to do).
    /// </summary>
    internal static bool TryMadviseEnd(ulong address, ulong length, out ulong end)
    {
        ulong aligned = (length + PageMask) & ~PageMask;
        end = address + aligned;
        return aligned >= length && end >= address;
    }

    /// <summary>
    /// madvise. EINVAL: misaligned start, overflowing length, unknown advice; ENOMEM: part of the range
    /// unmapped (the mapped part is still advised). HWPOISON and SOFT_OFFLINE: EPERM without
    /// <paramref name="capSysAdmin"/>, then madvise_inject_error's errors (AddressSpace.MemoryFailure.cs).
    /// </summary>
    public Errno Madvise(ulong address, ulong length, Advice advice, bool capSysAdmin = false)
    {
        // Linux's order: a misaligned start, then the advice, then the length.
        if ((address & PageMask) != 0)
            return Errno.EINVAL;
        if (!Enum.IsDefined(advice))
            return Errno.EINVAL; // the enum is the list of advice Vmm implements
        if (advice is Advice.Mergeable or Advice.Unmergeable && _machine.Ksm is null)
            return Errno.EINVAL; // built without KSM: the advice does not exist
        if (!TryMadviseEnd(address, length, out ulong end))
            return Errno.EINVAL;
        if (end == address)
            return Errno.None;
        if (advice is Advice.HwPoison or Advice.SoftOffline)
            return capSysAdmin ? MadviseInjectError(address, end, advice) : Errno.EPERM; // no mmap_lock: per page
        if (advice == Advice.WillNeed)
            return CheckMapped(address, end); // anonymous memory: only swap readahead would happen here

        MmapLock.EnterWriteLock();
        try
        {
            Errno result = Errno.None;
            ulong cursor = address;
            var pages = new List<long>();
            bool cleared = false;
            while (cursor < end)
            {
                Vma? vma = FindVma(cursor);
                if (vma is null || vma.Start >= end)
                {
                    result = Errno.ENOMEM;
                    break;
                }
                if (vma.Start > cursor)
                    result = Errno.ENOMEM; // a hole: keep going, report at the end
                ulong from = Math.Max(cursor, vma.Start), to = Math.Min(end, vma.End);
                switch (advice)
                {
                    case Advice.DontNeed:
                        if ((vma.Flags & VmaFlags.Locked) != 0)
                        {
                            result = Errno.EINVAL;
                            cursor = end;
                            continue;
                        }
                        cleared |= ZapRange(vma, from, to, pages);
                        break;
                    case Advice.Mergeable or Advice.Unmergeable:
                    {
                        bool mergeable = (vma.Flags & VmaFlags.Mergeable) != 0;
                        // ksm_madvise: already in the wanted state, or a shared mapping (KSM merges private
                        // anonymous memory only): accepted, nothing changes.
                        if (advice == Advice.Mergeable ? mergeable || vma.IsShared : !mergeable)
                            break;
                        Vma target = SplitToRange(vma, from, to);
                        if (advice == Advice.Mergeable)
                        {
                            _machine.Ksm!.Enter(this);
                            target.Flags |= VmaFlags.Mergeable;
                        }
                        else
                        {
                            // Unmerge first (copies), then clear the flag; out of memory is EAGAIN, and the
                            // range stays mergeable.
                            if (target.AnonVma is not null && KsmUnmergeRange(target, target.Start, target.End) != Errno.None)
                            {
                                TryMergeAround(target);
                                result = Errno.EAGAIN;
                                cursor = end;
                                continue;
                            }
                            target.Flags &= ~VmaFlags.Mergeable;
                        }
                        TryMergeAround(target);
                        break;
                    }
                }
                cursor = to;
            }
            FlushAndRelease(pages, [], cleared);
            return result;
        }
        finally
        {
            MmapLock.ExitWriteLock();
        }
    }

    /// <summary>ENOMEM if part of [address, end) is not mapped, as madvise reports holes.</summary>
    private Errno CheckMapped(ulong address, ulong end)
    {
        MmapLock.EnterReadLock();
        try
        {
            ulong cursor = address;
            while (cursor < end)
            {
                Vma? vma = FindVma(cursor);
                if (vma is null || vma.Start > cursor)
                    return Errno.ENOMEM;
                cursor = vma.End;
            }
            return Errno.None;
        }
        finally
        {
            MmapLock.ExitReadLock();
        }
    }
}
