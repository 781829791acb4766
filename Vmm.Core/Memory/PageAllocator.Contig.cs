// PageAllocator.Contig: the allocator's side of contiguous allocation (Linux's test_pages_isolated for an
// exact range, isolate_freepages_range + split_free_pages as alloc_contig_range ends with them,
// free_contig_range, and split_page for alloc_pages_exact). The sequence around it (isolation, draining,
// migrating the range's pages out, retries, undo) is Compaction/ContigAlloc.cs.
//
// Once every frame of [start, end) is free on an ISOLATE list, TakeIsolatedRange takes them off: the free
// blocks that hold them are unlinked, and the parts of those blocks outside the range (a range need not be
// pageblock aligned) go back to the ISOLATE lists, half by half, as break_down_buddy_pages does; then
// each frame of the range is prepared as an order-0 allocation (refcount 1, zeroed unless PG_zeroed says
// it is zero already). The frames are plain frames: each is freed on its own (FreeContigRange puts each,
// as Linux's free_contig_range does), and a buddy allocation of order n becomes 2^n such frames by
// SplitPage. Counters stay true: the frames leave IsolatedFreePages when they leave the lists and count
// as in use from then on, like any allocated frame.
//
// Locking: each pageblock's frames are tested and unlinked under its zone lock; the preparation (zeroing)
// runs with no lock held: the frames are off every list and their pageblocks are ISOLATE, so nothing else
// can reach them until the caller publishes them.
using Vmm.Diagnostics;

namespace Vmm.Memory;

internal sealed unsafe partial class PageAllocator
{
    /// <summary>
    /// test_pages_isolated for an exact range: true if every frame of [<paramref name="startPfn"/>,
    /// <paramref name="endPfn"/>) is free on an ISOLATE list. The range's pageblocks must have been
    /// isolated (<see cref="IsolatePageRange(long, long, out long)"/>); it need not be pageblock aligned.
    /// </summary>
    public bool TestRangeIsolated(long startPfn, long endPfn)
    {
        CheckContigRange(startPfn, endPfn);
        for (long pb = startPfn & ~(long)(PageblockFrames - 1); pb < endPfn; pb += PageblockFrames)
        {
            Zone zone = ZoneOf(pb);
            lock (zone.Lock)
            {
                if (PageblockType(pb) != MigrateType.Isolate)
                    return false;
                long stop = Math.Min(endPfn, pb + PageblockFrames);
                for (long pfn = Math.Max(startPfn, pb); pfn < stop;)
                {
                    long head = FreeBlockHeadLocked(zone, pfn);
                    if (head == NoPfn || (MigrateType)_memMap[head].Index != MigrateType.Isolate)
                        return false;
                    pfn = head + (1L << (int)_memMap[head].Private);
                }
            }
        }
        return true;
    }

    /// <summary>
    /// isolate_freepages_range + split_free_pages: takes every frame of [<paramref name="startPfn"/>,
    /// <paramref name="endPfn"/>) off the ISOLATE lists and hands each out as an order-0 allocation
    /// (refcount 1, zeroed unless known zero). The parts of free blocks outside the range stay free on
    /// the ISOLATE lists. Preconditions: <see cref="TestRangeIsolated"/> returned true and the range's
    /// pageblocks are still isolated by the caller (so every frame is still free: nothing allocates from
    /// an ISOLATE pageblock, and only a holder of a frame can free one).
    /// </summary>
    /// <exception cref="VmBugException">a frame of the range is not free on an ISOLATE list.</exception>
    public void TakeIsolatedRange(long startPfn, long endPfn)
    {
        CheckContigRange(startPfn, endPfn);
        for (long pb = startPfn & ~(long)(PageblockFrames - 1); pb < endPfn; pb += PageblockFrames)
        {
            Zone zone = ZoneOf(pb);
            lock (zone.Lock)
            {
                // Beyond the pageblock order free ISOLATE blocks may have merged (with an adjacent isolated
                // range, too): cut them back to pageblocks first, so a block never reaches past this one.
                SplitCoveringBlockLocked(zone, pb);
                long stop = Math.Min(endPfn, pb + PageblockFrames);
                for (long pfn = Math.Max(startPfn, pb); pfn < stop;)
                {
                    long head = FreeBlockHeadLocked(zone, pfn);
                    if (head == NoPfn || (MigrateType)_memMap[head].Index != MigrateType.Isolate)
                        throw new VmBugException($"frame {pfn} of a contiguous range is not free on an ISOLATE list");
                    int order = (int)_memMap[head].Private;
                    bool reported = (_memMap[head].Flags & (ulong)PageFlags.Reported) != 0;
                    DelFromFreeListLocked(zone, head);
                    KeepOutsideLocked(zone, head, order, startPfn, endPfn, reported);
                    pfn = head + (1L << order);
                }
                zone.BuddyAllocs++;
            }
        }
        // Off every list, in ISOLATE pageblocks: nobody else can reach the frames. Zero them outside the lock.
        for (long pfn = startPfn; pfn < endPfn; pfn++)
            PrepNewPage(pfn, 0, AllocFlags.None);
    }

    /// <summary>
    /// The free block of order <paramref name="order"/> at <paramref name="head"/>, just unlinked: its parts
    /// outside [<paramref name="startPfn"/>, <paramref name="endPfn"/>) go back on the ISOLATE lists, split
    /// as finely as the range's edges need (break_down_buddy_pages); the parts inside stay off.
    /// Preconditions: zone lock held.
    /// </summary>
    private void KeepOutsideLocked(Zone zone, long head, int order, long startPfn, long endPfn, bool reported)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        long size = 1L << order;
        if (head >= startPfn && head + size <= endPfn)
            return;
        if (head + size <= startPfn || head >= endPfn)
        {
            AddToFreeListLocked(zone, head, order, MigrateType.Isolate);
            if (reported)
                _memMap[head].Flags |= (ulong)PageFlags.Reported;
            return;
        }
        KeepOutsideLocked(zone, head, order - 1, startPfn, endPfn, reported);
        KeepOutsideLocked(zone, head + size / 2, order - 1, startPfn, endPfn, reported);
    }

    /// <summary>The head of the free buddy block that holds <paramref name="pfn"/>, or NoPfn. Preconditions: zone lock held.</summary>
    private long FreeBlockHeadLocked(Zone zone, long pfn)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        return FreeBlockHead(zone, pfn, minOrder: 0);
    }

    /// <summary>
    /// The head of the free buddy block of order <paramref name="minOrder"/> or more that holds
    /// <paramref name="pfn"/>, or NoPfn (a racy answer unless the caller holds the zone lock).
    /// </summary>
    private long FreeBlockHead(Zone zone, long pfn, int minOrder)
    {
        for (int order = minOrder; order <= zone.MaxOrder; order++)
        {
            long head = pfn & ~((1L << order) - 1);
            ref PageDescriptor block = ref _memMap[head];
            if ((block.Flags & (ulong)PageFlags.Buddy) != 0 && (int)block.Private >= order)
                return head;
        }
        return NoPfn;
    }

    /// <summary>
    /// split_page: the 2^<paramref name="order"/> frames of a non-compound block from <see cref="AllocPages"/>
    /// become independent frames with one reference each (the head keeps its own, and any speculative one a
    /// scanner holds meanwhile), so that each can be freed alone (alloc_pages_exact, contiguous buffers).
    /// </summary>
    public void SplitPage(long pfn, int order)
    {
        CheckPfn(pfn);
        // The head may hold more than the owner's reference: a scanner's speculative one (get_page_unless_zero)
        // is harmless here, and its put leaves the head to the owner again; so only "referenced" is required.
        if ((_memMap[pfn].Flags & (ulong)(PageFlags.Head | PageFlags.Tail)) != 0 || Volatile.Read(ref _memMap[pfn].RefCount) < 1)
            throw new VmBugException($"split_page of frame {pfn}: not an allocated non-compound block");
        for (long i = 1; i < 1L << order; i++)
            Volatile.Write(ref _memMap[pfn + i].RefCount, 1);
    }

    /// <summary>
    /// free_contig_range: drops one reference to each of the <paramref name="count"/> frames from
    /// <paramref name="pfn"/> (from <see cref="TakeIsolatedRange"/> or <see cref="SplitPage"/>); each frame
    /// goes back to the free lists when that was its last.
    /// </summary>
    public void FreeContigRange(long pfn, long count)
    {
        CheckContigRange(pfn, pfn + count);
        for (long p = pfn; p < pfn + count; p++)
        {
            if (_memMap.PutPageTestZero(p))
                FreeFrozenPages(p, 0);
        }
    }

    /// <summary>The ZONE_NORMAL zones of <paramref name="node"/>'s zonelist, nearest node first (where unmovable memory may come from).</summary>
    internal Zone[] UnmovableZonelist(int node) => _unmovableZonelist[node];

    /// <summary>The largest order a buddy allocation can have on this machine (MaxOrder, or less with blocks under 4 MiB).</summary>
    internal int ZoneMaxOrder => _nodeZones[0][0].MaxOrder;

    private void CheckContigRange(long startPfn, long endPfn)
    {
        if (startPfn < 0 || endPfn <= startPfn || endPfn > _topology.TotalFrames)
            throw new ArgumentException($"[{startPfn}, {endPfn}) is not a range of frames of this machine");
    }
}
