// PageAllocator.Isolation: MIGRATE_ISOLATE ranges (Linux's mm/page_isolation.c), what memory offline
// (Hotplug/MemoryHotplug.Offline.cs) and contiguous allocation stand on.
//
// IsolatePageRange marks every pageblock of a range ISOLATE (saving its old type): its free blocks move
// to the ISOLATE lists, and frames freed there later go there too, so the allocator hands out nothing
// from it while the caller migrates what is still in use away. A pageblock that holds an unmovable page
// (or is isolated already) refuses, and nothing is isolated. TestPagesIsolated tells when every frame
// of the range is free on an ISOLATE list (the range can go); UndoIsolatePageRange gives the pageblocks
// their old types back and their free blocks back to the allocatable lists. Beyond the pageblock order
// two buddies merge only if their pageblocks have the same type (PageAllocator.cs), so an ISOLATE block
// is never glued to an allocatable one. A pageblock inside a free block larger than a pageblock is
// free as a whole (CoveringFreeBlock); undoing isolation splits such a block first
// (SplitCoveringBlockLocked). After marking, isolation drains every per-CPU cache, so frames of the
// range cached there reach the ISOLATE lists too.
//
// Isolation initialises the deferred sections of its range first (it moves free blocks between lists).
//
// Locking: each pageblock is changed under its zone's lock; the saved types are protected by it too.
using Vmm.Diagnostics;
using Vmm.Native;

namespace Vmm.Memory;

internal sealed unsafe partial class PageAllocator
{
    /// <summary>
    /// start_isolate_page_range: marks the pageblocks of [start, end) MIGRATE_ISOLATE, so that none of
    /// their frames is handed out until <see cref="UndoIsolatePageRange"/>. Free frames there move to
    /// the ISOLATE lists; frames freed there later go there too.
    /// </summary>
    /// <param name="startPfn">first frame, pageblock aligned.</param>
    /// <param name="endPfn">one past the last frame, pageblock aligned, within one zone's blocks.</param>
    /// <param name="unmovablePfn">on EBUSY, the first frame found that can neither be freed nor moved.</param>
    /// <returns><see cref="Errno.None"/>, or EBUSY if a pageblock is already isolated or holds an
    /// unmovable page (nothing is isolated then).</returns>
    /// <exception cref="ArgumentException">the range is not pageblock aligned or leaves the arena.</exception>
    public Errno IsolatePageRange(long startPfn, long endPfn, out long unmovablePfn) =>
        IsolatePageRange(startPfn, endPfn, forOffline: false, out unmovablePfn);

    /// <summary>
    /// <see cref="IsolatePageRange(long, long, out long)"/>; with <paramref name="forOffline"/> (Linux's
    /// MEMORY_OFFLINE), frames retired by memory failure do not count as unmovable: they leave with the block.
    /// </summary>
    public Errno IsolatePageRange(long startPfn, long endPfn, bool forOffline, out long unmovablePfn)
    {
        CheckPageblockRange(startPfn, endPfn);
        unmovablePfn = NoPfn;
        // Isolation moves free blocks between lists and counters: the range's frames must be on them.
        InitSectionsOfRange(startPfn, endPfn);
        for (long pb = startPfn; pb < endPfn; pb += PageblockFrames)
        {
            Zone zone = ZoneOf(pb);
            Errno error;
            lock (zone.Lock)
            {
                error = SetMigratetypeIsolateLocked(zone, pb, forOffline, out unmovablePfn);
            }
            if (error != Errno.None)
            {
                if (pb > startPfn)
                    UndoIsolatePageRange(startPfn, pb);
                return error;
            }
        }
        // Flush the per-CPU caches, taking every slot's spin word: frames of the isolated pageblocks
        // cached there now go to the ISOLATE lists (see FreeToPcp for why this closes the race with
        // concurrent frees; it holds only if no slot is skipped).
        foreach (Zone zone in Zones)
            DrainZone(zone, force: true);
        return Errno.None;
    }

    /// <summary>Same as <see cref="IsolatePageRange(long, long, out long)"/> without the diagnostic.</summary>
    public Errno IsolatePageRange(long startPfn, long endPfn) => IsolatePageRange(startPfn, endPfn, out _);

    /// <summary>set_migratetype_isolate for one pageblock: refuses (EBUSY, the frame in <paramref name="unmovablePfn"/>)
    /// when it is already isolated or something unmovable is in it, else marks it ISOLATE and moves its free
    /// blocks to the ISOLATE lists. Preconditions: zone lock held.</summary>
    private Errno SetMigratetypeIsolateLocked(Zone zone, long pageblockPfn, bool forOffline, out long unmovablePfn)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        unmovablePfn = NoPfn;
        int index = (int)(pageblockPfn >> PageblockOrder);
        if ((MigrateType)_pageblockType[index] == MigrateType.Isolate)
        {
            unmovablePfn = pageblockPfn;
            return Errno.EBUSY;
        }
        long bad = FindUnmovablePageLocked(zone, pageblockPfn, forOffline);
        if (bad != NoPfn)
        {
            unmovablePfn = bad;
            return Errno.EBUSY;
        }
        _pageblockSavedType[index] = _pageblockType[index];
        Volatile.Write(ref _pageblockType[index], (byte)MigrateType.Isolate);
        MoveFreePagesBlockLocked(zone, pageblockPfn, MigrateType.Isolate);
        return Errno.None;
    }

    /// <summary>
    /// has_unmovable_pages: a frame in use that migration could never move out (reserved, or in
    /// ZONE_NORMAL without PG_lru or the MOVABLE mapping tag). ZONE_MOVABLE holds only movable pages by construction.
    /// Preconditions: zone lock held.
    /// </summary>
    private long FindUnmovablePageLocked(Zone zone, long pageblockPfn, bool forOffline)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        if (CoveringFreeBlock(zone, pageblockPfn) != NoPfn)
            return NoPfn;
        long end = pageblockPfn + PageblockFrames;
        for (long pfn = pageblockPfn; pfn < end;)
        {
            ref PageDescriptor page = ref _memMap[pfn];
            var flags = (PageFlags)Volatile.Read(ref page.Flags);
            if ((flags & PageFlags.Buddy) != 0)
            {
                pfn += 1L << (int)page.Private;
                continue;
            }
            if ((flags & PageFlags.Reserved) != 0)
                return pfn;
            if (forOffline && (flags & PageFlags.HWPoison) != 0)
            {
                pfn++;
                continue;
            }
            if (zone.Type == ZoneType.Movable || (Volatile.Read(ref page.RefCount) == 0 && (flags & PageFlags.Tail) == 0))
            {
                pfn++;
                continue;
            }
            long head = _memMap.CompoundHead(pfn);
            var headFlags = (PageFlags)Volatile.Read(ref _memMap[head].Flags);
            // Movable: on an LRU list, or a non-LRU movable page (the MOVABLE tag in its mapping word).
            if ((headFlags & PageFlags.Lru) == 0 &&
                (Volatile.Read(ref _memMap[head].Mapping) & PageDescriptor.MappingTagMask) != PageDescriptor.MappingMovable)
                return pfn;
            pfn += head == pfn && (headFlags & PageFlags.Head) != 0 ? 1L << _memMap[head].CompoundOrder : 1;
        }
        return NoPfn;
    }

    /// <summary>The head of a free block larger than a pageblock that covers <paramref name="pageblockPfn"/>, or NoPfn.</summary>
    private long CoveringFreeBlock(Zone zone, long pageblockPfn) => FreeBlockHead(zone, pageblockPfn, PageblockOrder);

    /// <summary>
    /// undo_isolate_page_range: gives the pageblocks of [start, end) back their type from before
    /// isolation and returns their free frames to the allocatable lists (merging them again).
    /// Pageblocks that are not isolated are left alone.
    /// </summary>
    /// <exception cref="ArgumentException">the range is not pageblock aligned or leaves the arena.</exception>
    public void UndoIsolatePageRange(long startPfn, long endPfn)
    {
        CheckPageblockRange(startPfn, endPfn);
        for (long pb = startPfn; pb < endPfn; pb += PageblockFrames)
        {
            Zone zone = ZoneOf(pb);
            lock (zone.Lock)
            {
                int index = (int)(pb >> PageblockOrder);
                if ((MigrateType)_pageblockType[index] != MigrateType.Isolate)
                    continue;
                var restored = (MigrateType)_pageblockSavedType[index];
                Volatile.Write(ref _pageblockType[index], (byte)restored);
                SplitCoveringBlockLocked(zone, pb);
                long end = pb + PageblockFrames;
                for (long pfn = pb; pfn < end;)
                {
                    ref PageDescriptor page = ref _memMap[pfn];
                    if ((page.Flags & (ulong)PageFlags.Buddy) != 0 && (MigrateType)page.Index == MigrateType.Isolate)
                    {
                        int order = (int)page.Private;
                        DelFromFreeListLocked(zone, pfn);
                        FreeOneLocked(zone, pfn, order, restored);
                        pfn += 1L << order;
                    }
                    else
                    {
                        pfn++;
                    }
                }
            }
        }
    }

    /// <summary>test_pages_isolated: true if every frame of [start, end) is free on an ISOLATE list.</summary>
    /// <exception cref="ArgumentException">the range is not pageblock aligned or leaves the arena.</exception>
    public bool TestPagesIsolated(long startPfn, long endPfn) => TestPagesIsolated(startPfn, endPfn, acceptPoisoned: false);

    /// <summary>
    /// <see cref="TestPagesIsolated(long, long)"/>; with <paramref name="acceptPoisoned"/> (MEMORY_OFFLINE),
    /// a frame retired by memory failure (PG_hwpoison, held only by the retirement) counts as isolated.
    /// </summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)] // a per-frame loop run a few times per offline
    public bool TestPagesIsolated(long startPfn, long endPfn, bool acceptPoisoned)
    {
        CheckPageblockRange(startPfn, endPfn);
        for (long pb = startPfn; pb < endPfn; pb += PageblockFrames)
        {
            Zone zone = ZoneOf(pb);
            lock (zone.Lock)
            {
                if (PageblockType(pb) != MigrateType.Isolate)
                    return false;
                if (CoveringFreeBlock(zone, pb) is long cover and not NoPfn)
                {
                    if ((MigrateType)_memMap[cover].Index != MigrateType.Isolate)
                        return false;
                    continue;
                }
                for (long pfn = pb; pfn < pb + PageblockFrames;)
                {
                    ref PageDescriptor page = ref _memMap[pfn];
                    if (acceptPoisoned && IsRetiredPoisoned(ref page))
                    {
                        pfn++;
                        continue;
                    }
                    if ((page.Flags & (ulong)PageFlags.Buddy) == 0 || (MigrateType)page.Index != MigrateType.Isolate)
                        return false;
                    pfn += 1L << (int)page.Private;
                }
            }
        }
        return true;
    }

    /// <summary>A frame retired by memory failure: PG_hwpoison, no mapping, held only by the retirement's reference.</summary>
    private static bool IsRetiredPoisoned(ref PageDescriptor page) =>
        (Volatile.Read(ref page.Flags) & (ulong)PageFlags.HWPoison) != 0 && Volatile.Read(ref page.RefCount) == 1 &&
        Volatile.Read(ref page.MapCount) == -1;
}
