// PageAllocator.Compaction: the allocator's side of memory compaction (Linux's mm/compaction.c, the parts
// that touch the buddy lists, and mm/vmstat.c's fragmentation index).
//
// - The free scanner's isolate_freepages_block: the free buddy blocks of one pageblock are taken off
//   the lists, split to order 0, and handed to the compaction run as "isolated free" frames (refcount 0,
//   no PG_buddy, on no list: the run's own list holds them, and they count in no zone counter, as in
//   Linux where they leave NR_FREE_PAGES). Never from an ISOLATE pageblock (offline or contiguous
//   allocation is emptying it), never from a pageblock that is not MOVABLE (unmovable pages must not be
//   spread into it... and movable pages must not be moved into an unmovable one), never a free block of
//   pageblock order or more (there is nothing to gain: it is already what compaction makes), never
//   from a section not initialised yet (all of it is one max-order free block), and never below the
//   zone's min watermark (a run does not eat the reserve).
// - compaction_alloc's preparation of one such frame (prep_new_page: refcount 1, not zeroed: the
//   migration copies over every byte), and release_free_list: the frames a run did not use go back to
//   the buddy lists one by one, merging with their buddies (into the lists of their pageblock's type
//   now, ISOLATE included if isolation started meanwhile).
// - The inputs of compaction's decisions: fill_contig_block_info, the fragmentation index
//   (__fragmentation_index), the fragmentation score (extfrag_for_order), whether a free block of an
//   order exists for a migratetype (__compact_finished's check), and the watermark checks.
// - Pageblock skip hints (PB_migrate_skip): one byte per pageblock, set by compaction when a pageblock
//   gave it nothing, read and cleared by compaction only. Racy by design, as Linux's are: a stale hint
//   costs one pageblock scanned or skipped once.
// - The direct-compaction hook: the slow path of an allocation above order 0 calls back into the
//   machine (set by Machine; the allocator knows no compaction), with no allocator lock held.
//
// Locking: isolate and release take the zone lock per pageblock (per frame batch for release); the
// hints are bytes written with Volatile (no lock). Nothing here takes a lock above the zone lock.
using Vmm.Diagnostics;

namespace Vmm.Memory;

/// <summary>Linux's enum compact_result, the values Vmm uses (ordered: a larger one did more).</summary>
internal enum CompactResult
{
    /// <summary>COMPACT_NOT_SUITABLE_ZONE / COMPACT_SKIPPED: not run (too little free memory, or the fragmentation index says lack of memory).</summary>
    Skipped,
    /// <summary>COMPACT_DEFERRED: not run, deferred after earlier failures.</summary>
    Deferred,
    /// <summary>COMPACT_CONTINUE: keep going.</summary>
    Continue,
    /// <summary>COMPACT_PARTIAL_SKIPPED: the scanners met, but part of the zone was skipped (cached positions, hints).</summary>
    PartialSkipped,
    /// <summary>COMPACT_CONTENDED: stopped early (no free frame to move a page to).</summary>
    Contended,
    /// <summary>COMPACT_COMPLETE: the scanners met over the whole zone without success.</summary>
    Complete,
    /// <summary>COMPACT_SUCCESS: a block of the order is free (or the proactive goal is met).</summary>
    Success,
}

internal sealed unsafe partial class PageAllocator
{
    private byte[]? _pageblockSkip; // [pfn >> PageblockOrder]: PB_migrate_skip; racy, Volatile

    private byte[] SkipBits => _pageblockSkip ??= new byte[_pageblockType.Length];

    /// <summary>
    /// The direct-compaction hook (Machine sets it once, at construction): called by the slow path of an
    /// allocation above order 0, with no allocator lock held. Null: no compaction.
    /// </summary>
    internal IDirectCompactor? DirectCompactor { get; set; }

    /// <summary>What the allocator's slow path asks of compaction (the callees of mm/page_alloc.c's __alloc_pages_slowpath).</summary>
    internal interface IDirectCompactor
    {
        /// <summary>wakeup_kcompactd: an allocation of <paramref name="order"/> (above 0) went to the slow path on <paramref name="node"/>.</summary>
        void WakeKcompactd(int node, int order);

        /// <summary>
        /// try_to_compact_pages at one priority (<paramref name="mode"/>: ASYNC, then SYNC_LIGHT) on the
        /// zones of <paramref name="zonelist"/> that <paramref name="nodemask"/> allows, for an allocation of
        /// <paramref name="order"/> and <paramref name="mt"/>. Skipped and Deferred mean compaction did not run.
        /// </summary>
        CompactResult TryToCompactPages(int order, MigrateType mt, Zone[] zonelist, ulong nodemask, MigrateMode mode);

        /// <summary>The allocation retried after a compaction that ran: <paramref name="pfn"/> is what it got (compact_success / compact_fail).</summary>
        void AfterDirectCompaction(int order, long pfn);
    }

    /// <summary>The zones of node <paramref name="node"/>.</summary>
    internal Zone[] ZonesOfNode(int node) => _nodeZones[node];

    /// <summary>Whether the pageblock of <paramref name="pfn"/> belongs to <paramref name="zone"/> and its memory block is online (pageblock_pfn_to_page).</summary>
    internal bool PageblockInZone(Zone zone, long pfn) =>
        _blockZone[_topology.BlockOf(pfn)] == zone && IsBlockOnline(_topology.BlockOf(pfn));

    /// <summary>The pageblock's migratetype (racy read).</summary>
    internal MigrateType PageblockTypeOf(long pfn) => PageblockType(pfn);

    /// <summary>get_pageblock_skip.</summary>
    internal bool IsPageblockSkip(long pfn) => Volatile.Read(ref SkipBits[pfn >> PageblockOrder]) != 0;

    /// <summary>set_pageblock_skip.</summary>
    internal void SetPageblockSkip(long pfn) => Volatile.Write(ref SkipBits[pfn >> PageblockOrder], 1);

    /// <summary>__reset_isolation_suitable's clearing: every skip hint of the zone's pageblocks.</summary>
    internal void ClearPageblockSkip(Zone zone)
    {
        byte[] bits = SkipBits;
        long start = Volatile.Read(ref zone.StartPfn), end = Volatile.Read(ref zone.EndPfn);
        for (long pfn = start & ~(long)(PageblockFrames - 1); pfn < end; pfn += PageblockFrames)
        {
            if (PageblockInZone(zone, pfn))
                Volatile.Write(ref bits[pfn >> PageblockOrder], 0);
        }
    }

    /// <summary>Pageblocks of the zone with their skip hint set (Audit, tests).</summary>
    internal int CountPageblockSkip(Zone zone)
    {
        byte[] bits = SkipBits;
        int count = 0;
        long start = Volatile.Read(ref zone.StartPfn), end = Volatile.Read(ref zone.EndPfn);
        for (long pfn = start & ~(long)(PageblockFrames - 1); pfn < end; pfn += PageblockFrames)
        {
            if (PageblockInZone(zone, pfn) && Volatile.Read(ref bits[pfn >> PageblockOrder]) != 0)
                count++;
        }
        return count;
    }

    /// <summary>
    /// isolate_freepages_block over the pageblock of <paramref name="startPfn"/>, from that frame on: takes
    /// its free buddy blocks (below pageblock order) off the lists, split to order 0, onto <paramref name="freeList"/>,
    /// until <paramref name="wanted"/> frames were taken or the zone would fall below its min watermark.
    /// Refused (nothing taken) for a pageblock that is not MOVABLE (ISOLATE included), not initialised,
    /// or covered by a free block of pageblock order or more. Returns the frames taken;
    /// <paramref name="scanned"/> counts the frames looked at (compact_free_scanned);
    /// <paramref name="belowWatermark"/> says it stopped at the min watermark; <paramref name="stopPfn"/> is
    /// where the next call may go on (the pageblock's end when it was scanned to the end).
    /// </summary>
    internal int IsolateFreePagesBlock(Zone zone, long startPfn, List<long> freeList, int wanted, out long scanned, out bool belowWatermark, out long stopPfn)
    {
        scanned = 0;
        belowWatermark = false;
        long pageblockPfn = startPfn & ~(long)(PageblockFrames - 1);
        long end = pageblockPfn + PageblockFrames;
        stopPfn = end;
        if (!_memMap.IsInitialised(pageblockPfn))
            return 0; // a deferred section: one max-order free block, nothing to gain
        int taken = 0;
        lock (zone.Lock)
        {
            // suitable_migration_target, under the lock: isolation changes the type under it too.
            if (PageblockType(pageblockPfn) != MigrateType.Movable || CoveringFreeBlock(zone, pageblockPfn) != NoPfn)
                return 0;
            long pfn = startPfn;
            for (; pfn < end && taken < wanted;)
            {
                scanned++;
                ref PageDescriptor page = ref _memMap[pfn];
                if ((page.Flags & (ulong)PageFlags.Buddy) == 0)
                {
                    pfn++;
                    continue;
                }
                int order = (int)page.Private;
                // __isolate_free_page's check: the zone keeps its min watermark after the take.
                if (zone.FreePages - (1L << order) < zone.Watermarks.Min)
                {
                    belowWatermark = true;
                    break;
                }
                DelFromFreeListLocked(zone, pfn);
                for (long p = pfn; p < pfn + (1L << order); p++)
                {
                    freeList.Add(p);
                    _memMap.Trace?.Record(p, FrameEvent.CompactIsolate, order);
                }
                taken += 1 << order;
                pfn += 1L << order;
            }
            stopPfn = pfn;
        }
        return taken;
    }

    /// <summary>
    /// compaction_alloc's preparation of a frame <see cref="IsolateFreePagesBlock"/> isolated: prep_new_page
    /// with NoZero (the migration overwrites every byte), refcount 1.
    /// </summary>
    internal void PrepIsolatedFreePage(long pfn) => PrepNewPage(pfn, 0, AllocFlags.NoZero);

    /// <summary>
    /// compaction_free: a frame handed out by compaction_alloc that the migration did not use comes back
    /// (no mapping: the engine copies nothing into a frame it gives back). It becomes an isolated free
    /// frame again (checked and cleared as a free would: free_pages_prepare), for the next page, and true
    /// is returned. False when its reference was not the last: a scanner (compaction's or an offline's
    /// migrate scanner) took a speculative one (TryGetPageUnlessZero) since it was handed out, and that
    /// reference's put frees the frame through the ordinary path, as Linux's compaction_free leaves it.
    /// </summary>
    internal bool UnprepIsolatedFreePage(long pfn)
    {
        if (!_memMap.PutPageTestZero(pfn))
            return false;
        FreePagesPrepare(pfn, 0);
        return true;
    }

    /// <summary>release_free_list: the isolated free frames of <paramref name="freeList"/> go back to the buddy lists (and the list is emptied).</summary>
    internal void ReleaseIsolatedFreePages(List<long> freeList)
    {
        int i = 0;
        while (i < freeList.Count)
        {
            Zone zone = ZoneOf(freeList[i]);
            lock (zone.Lock)
            {
                // One lock round trip for a run of frames of one zone (a run's frames all are).
                for (; i < freeList.Count && ZoneOf(freeList[i]) == zone; i++)
                {
                    long pfn = freeList[i];
                    LockAssert.That(_memMap[pfn].RefCount == 0 && (_memMap[pfn].Flags & (ulong)PageFlags.Buddy) == 0, $"isolated free frame {pfn} unused");
                    _memMap.Trace?.Record(pfn, FrameEvent.CompactRelease);
                    FreeOneLocked(zone, pfn, 0, PageblockType(pfn));
                }
            }
        }
        freeList.Clear();
    }

    /// <summary>Drains the zone's per-CPU lists into its buddy lists (drain_local_pages for compaction: freed sources merge).</summary>
    internal void DrainZonePcp(Zone zone) => DrainZone(zone);

    /// <summary>
    /// fill_contig_block_info for <paramref name="order"/>: free pages, free blocks and free blocks
    /// that could serve the order (in units of 2^order), over every type but ISOLATE; deferred
    /// sections count as max-order blocks. Racy reads (a hint, as Linux's).
    /// </summary>
    internal static (long FreePages, long FreeBlocksTotal, long FreeBlocksSuitable) ContigBlockInfo(Zone zone, int order)
    {
        long freePages = 0, blocks = 0, suitable = 0;
        for (int o = 0; o <= zone.MaxOrder; o++)
        {
            long n = Volatile.Read(ref zone.NrFree[Zone.ListIndex(o, MigrateType.Movable)]) +
                     Volatile.Read(ref zone.NrFree[Zone.ListIndex(o, MigrateType.Unmovable)]);
            if (o == zone.MaxOrder)
                n += Volatile.Read(ref zone.DeferredPages) >> zone.MaxOrder;
            blocks += n;
            freePages += n << o;
            if (o >= order)
                suitable += n << (o - order);
        }
        return (freePages, blocks, suitable);
    }

    /// <summary>
    /// __fragmentation_index: -1000 when a block of the order is free already; otherwise toward 0 when an
    /// allocation of the order would fail for lack of memory, toward 1000 when for fragmentation.
    /// </summary>
    internal static int FragmentationIndex(Zone zone, int order)
    {
        (long freePages, long total, long suitable) = ContigBlockInfo(zone, order);
        if (total == 0)
            return 0;
        if (suitable > 0)
            return -1000;
        long requested = 1L << order;
        return (int)(1000 - (1000 + freePages * 1000 / requested) / total);
    }

    /// <summary>extfrag_for_order: the percentage of free memory that is not in free blocks of <paramref name="order"/> or more.</summary>
    internal static int ExtfragForOrder(Zone zone, int order)
    {
        (long freePages, _, long suitable) = ContigBlockInfo(zone, order);
        if (freePages == 0)
            return 0;
        return (int)((freePages - (suitable << order)) * 100 / freePages);
    }

    /// <summary>
    /// __compact_finished's test: a free block of <paramref name="order"/> or more that an allocation of
    /// <paramref name="mt"/> could take (its own type, or the other one when the allocator would steal
    /// it: a block of at least a pageblock). Racy read.
    /// </summary>
    internal static bool HasFreeBlockFor(Zone zone, int order, MigrateType mt)
    {
        for (int o = order; o <= zone.MaxOrder; o++)
        {
            if (Volatile.Read(ref zone.NrFree[Zone.ListIndex(o, mt)]) > 0)
                return true;
            if (o >= PageblockOrder && Volatile.Read(ref zone.NrFree[Zone.ListIndex(o, Fallback(mt))]) > 0)
                return true;
        }
        return Volatile.Read(ref zone.DeferredPages) != 0;
    }

    /// <summary>zone_watermark_ok(zone, order, mark): free pages above <paramref name="mark"/> after the block, and a block of the order.</summary>
    internal static bool ZoneWatermarkOk(Zone zone, int order, long mark)
    {
        long free = Volatile.Read(ref zone.FreePages) - ((1L << order) - 1);
        if (free <= mark)
            return false;
        return order == 0 || HasFreeBlockFor(zone, order, MigrateType.Movable) || HasFreeBlockFor(zone, order, MigrateType.Unmovable);
    }
}
