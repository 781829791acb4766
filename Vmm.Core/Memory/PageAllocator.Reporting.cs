// PageAllocator.Reporting: giving free memory back to the host (Linux's mm/page_reporting.c, free
// page reporting).
//
// ReleaseFreeMemory decommits the memory of free blocks (of at least a pageblock by default; KSM asks
// for order 0) that were not given back yet: the host's RSS falls, the blocks stay on their free lists,
// marked PG_reported (skipped next time) and PG_zeroed (they read zero, so allocating them needs no
// zeroing). Giving memory back is best effort: a refused decommit leaves the block free and committed.
//
// Locking: each zone is walked under its zone lock (see the why in ReleaseFreeMemory).
using Vmm.Diagnostics;
using Vmm.Native;

namespace Vmm.Memory;

internal sealed unsafe partial class PageAllocator
{
    /// <summary>
    /// Gives the host memory of every free block of at least pageblock size (or the zone's largest
    /// order, if smaller) back to the operating system, like Linux's free page reporting. The frames
    /// stay free and read as zeros; allocating them later needs no zeroing. Blocks already given back
    /// are skipped.
    /// </summary>
    /// <returns>Bytes given back by this call.</returns>
    public long ReleaseFreeMemory() => ReleaseFreeMemory(PageblockOrder);

    /// <summary>
    /// <see cref="ReleaseFreeMemory()"/> down to blocks of 2^<paramref name="minOrder"/> frames. KSM
    /// uses order 0: the pages it keeps are scattered (one per 256 merged, by default), so no pageblock
    /// of a merged range is ever wholly free, yet every frame it freed can go back to the host.
    /// </summary>
    /// <returns>Bytes given back by this call.</returns>
    public long ReleaseFreeMemory(int minOrder)
    {
        ThrowIfDisposed();
        ArgumentOutOfRangeException.ThrowIfNegative(minOrder);
        long released = 0;
        foreach (Zone zone in Zones)
        {
            int smallest = Math.Min(minOrder, zone.MaxOrder);
            // Why under the zone lock: the blocks stay on their lists (so counters and isolation see
            // them as free throughout), and nobody can allocate a block while its memory is dropped.
            lock (zone.Lock)
            {
                for (int order = smallest; order <= zone.MaxOrder; order++)
                {
                    for (int mt = 0; mt < Zone.MigrateTypeCount; mt++)
                    {
                        for (uint pfn = zone.FreeHead[Zone.ListIndex(order, (MigrateType)mt)]; pfn != PageDescriptor.NoLink; pfn = _memMap[pfn].LruNext)
                        {
                            ref PageDescriptor head = ref _memMap[pfn];
                            if ((head.Flags & (ulong)PageFlags.Reported) != 0)
                                continue;
                            long count = 1L << order;
                            if (!TryDecommit(pfn, count))
                                continue;
                            for (long i = 0; i < count; i++)
                                _memMap[pfn + i].Flags |= (ulong)PageFlags.Zeroed;
                            _memMap.Trace?.RecordRange(pfn, count, FrameEvent.ReportZero, count);
                            head.Flags |= (ulong)PageFlags.Reported;
                            released += count << Topology.PageShift;
                        }
                    }
                }
            }
        }
        return released;
    }

    /// <summary>
    /// One decommit. A refusal (injected, or the host's) leaves the block free, committed and not
    /// reported, so a later release tries again: giving memory back is best effort, as Linux's free
    /// page reporting is, and must never fail the caller (the KSM release worker has nobody to tell).
    /// </summary>
    internal bool TryDecommit(long pfn, long count)
    {
        if (_faults is not null && _faults.ShouldFail(FaultSite.HostDecommit))
            return false;
        try
        {
            _arena.Decommit(pfn, count);
            _memMap.Trace?.RecordRange(pfn, count, FrameEvent.Decommit, count);
            return true;
        }
        catch (ArenaException)
        {
            return false;
        }
    }
}
