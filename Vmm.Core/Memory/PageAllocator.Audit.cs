// PageAllocator.Audit: the allocator's side of Machine.Audit (Diagnostics/Auditor.cs), for a quiet
// machine. Every buddy free list and every per-CPU list is walked; each block is checked against the list
// it is on (PG_buddy, its order and migratetype, alignment, zone, back links, refcount 0), and the zone's
// counters (NrFree, FreePages, IsolatedFreePages, each pcp's Count) are recounted from what the walk
// found. The frames found free are returned, so that the auditor can name a frame with refcount 0 that is
// on no list: one the allocator has lost for good (the compaction soak's hour lost 1,023 such frames, an
// order-10 block's tail, before the __free_pages fix; only the final sum caught it, with no frame named).
//
// Locking: each pcp list under its spin word, then each zone's free lists under its zone lock (the
// allocator's order). The walk is exact only when nothing allocates or frees meanwhile, like the rest of
// the audit.
using System.Collections;
using Vmm.Diagnostics;

namespace Vmm.Memory;

internal sealed partial class PageAllocator
{
    /// <summary>
    /// Walks every free list and per-CPU list, adds what is wrong to <paramref name="problems"/>, and
    /// returns the frames found free (in a buddy block or on a pcp list), indexed by pfn.
    /// </summary>
    internal BitArray AuditFreeLists(List<string> problems)
    {
        var free = new BitArray(checked((int)_memMap.FrameCount));
        foreach (Zone zone in Zones)
        {
            foreach (PerCpuPages pcp in zone.Pcp)
            {
                pcp.Enter();
                try
                {
                    long found = AuditPcpList(zone, pcp.HeadMovable, MigrateType.Movable, free, problems)
                                 + AuditPcpList(zone, pcp.HeadUnmovable, MigrateType.Unmovable, free, problems);
                    if (found != pcp.Count)
                        problems.Add($"{zone}: a per-CPU list counts {pcp.Count} frames, {found} found on it");
                }
                finally
                {
                    pcp.Exit();
                }
            }
            lock (zone.Lock)
            {
                long allocatable = 0, isolated = 0;
                for (int order = 0; order <= zone.MaxOrder; order++)
                {
                    for (int mt = 0; mt < Zone.MigrateTypeCount; mt++)
                    {
                        int index = Zone.ListIndex(order, (MigrateType)mt);
                        long blocks = AuditFreeList(zone, order, (MigrateType)mt, free, problems);
                        if (blocks != zone.NrFree[index])
                            problems.Add($"{zone}: nr_free[{order}][{(MigrateType)mt}] {zone.NrFree[index]}, blocks found on the list {blocks}");
                        if ((MigrateType)mt == MigrateType.Isolate)
                            isolated += blocks << order;
                        else
                            allocatable += blocks << order;
                    }
                }
                // Deferred sections are free and counted in FreePages, but on no list (Zone.cs).
                if (zone.FreePages != allocatable + zone.DeferredPages)
                    problems.Add($"{zone}: FreePages {zone.FreePages}, free frames found on its lists {allocatable} + deferred {zone.DeferredPages}");
                if (zone.IsolatedFreePages != isolated)
                    problems.Add($"{zone}: IsolatedFreePages {zone.IsolatedFreePages}, free frames found on its ISOLATE lists {isolated}");
            }
        }
        return free;
    }

    /// <summary>One buddy free list: returns its blocks. Preconditions: zone lock held.</summary>
    private long AuditFreeList(Zone zone, int order, MigrateType mt, BitArray free, List<string> problems)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        long blocks = 0, size = 1L << order;
        uint prev = PageDescriptor.NoLink;
        for (uint pfn = zone.FreeHead[Zone.ListIndex(order, mt)]; pfn != PageDescriptor.NoLink; prev = pfn, pfn = _memMap[pfn].LruNext)
        {
            if (++blocks > _memMap.FrameCount)
            {
                problems.Add($"{zone}: the order-{order} {mt} free list loops");
                break;
            }
            if (!_memMap.IsInitialised(pfn))
            {
                problems.Add($"{zone}: the order-{order} {mt} free list links to frame {pfn}, whose memmap section is not initialised");
                break; // its descriptor would be committed by reading it, and its link is garbage
            }
            ref PageDescriptor page = ref _memMap[pfn];
            if ((page.Flags & (ulong)PageFlags.Buddy) == 0 || (int)page.Private != order || (MigrateType)page.Index != mt ||
                page.RefCount != 0 || page.LruPrev != prev || (pfn & (size - 1)) != 0 || ZoneOf(pfn) != zone)
                problems.Add($"{zone}: frame {pfn} on the order-{order} {mt} free list: flags {(PageFlags)page.Flags}, order {page.Private}, " +
                             $"type {(MigrateType)page.Index}, refcount {page.RefCount}, prev link {page.LruPrev} (expected {prev}), zone {ZoneOf(pfn)}");
            for (long p = pfn; p < pfn + size && p < _memMap.FrameCount; p++)
            {
                if (free[(int)p])
                    problems.Add($"frame {p} is free twice (in the order-{order} {mt} block at {pfn}, and in another block or on a per-CPU list)");
                free[(int)p] = true;
            }
        }
        return blocks;
    }

    /// <summary>One per-CPU list: returns its frames. Preconditions: the pcp's spin word held.</summary>
    private long AuditPcpList(Zone zone, uint head, MigrateType mt, BitArray free, List<string> problems)
    {
        long frames = 0;
        for (uint pfn = head; pfn != PageDescriptor.NoLink; pfn = _memMap[pfn].LruNext)
        {
            if (++frames > _memMap.FrameCount)
            {
                problems.Add($"{zone}: a {mt} per-CPU list loops");
                break;
            }
            if (!_memMap.IsInitialised(pfn))
            {
                problems.Add($"{zone}: a {mt} per-CPU list links to frame {pfn}, whose memmap section is not initialised");
                break;
            }
            ref PageDescriptor page = ref _memMap[pfn];
            if (page.RefCount != 0 || (page.Flags & (ulong)PageFlags.Buddy) != 0 || ZoneOf(pfn) != zone)
                problems.Add($"{zone}: frame {pfn} on a {mt} per-CPU list: flags {(PageFlags)page.Flags}, refcount {page.RefCount}, zone {ZoneOf(pfn)}");
            if (free[(int)pfn])
                problems.Add($"frame {pfn} is free twice (on a per-CPU list, and in a buddy block or on another list)");
            free[(int)pfn] = true;
        }
        return frames;
    }
}
