// Compaction.Zone: compact_zone and its two scanners (Linux's compact_zone, compact_finished,
// isolate_migratepages / isolate_migratepages_block, isolate_freepages, compaction_alloc / compaction_free).
//
// One run works on one zone with a pooled CompactControl (compact_control): the scanners' positions,
// the isolated pages waiting to migrate, the isolated free frames waiting to receive them, the counts.
// The loop: compact_finished says whether to go on; the migrate scanner isolates up to ClusterMax pages
// from the pageblocks above its position (skipping ISOLATE pageblocks, pageblocks of other zones or
// offline blocks, never-initialised sections, and for ASYNC runs pageblocks that are not MOVABLE);
// MigratePages moves them, asking compaction_alloc for each new frame, which runs the free scanner
// when its list is empty (pageblocks below the free position, MOVABLE ones only, down to the migrate
// scanner's). When the free scanner cannot find a frame the migration stops with ENOMEM: if the
// scanners met, compact_finished ends the run; else the run ends contended. At the end the free frames
// not used go back to the buddy lists and the zone's per-CPU lists are drained, so the frames the
// migration freed merge into large blocks.
//
// Locking: the caller holds the hotplug lock (the zone's span is stable); the migrate scanner reads
// descriptors racily and isolates through the engine (lru_lock); the free scanner and the release take
// the zone lock per pageblock. No lock is held across MigratePages.
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Migration;

namespace Vmm;

public sealed partial class Compaction
{
    private const long PageblockFrames = PageAllocator.PageblockFrames;

    /// <summary>compact_zone. Preconditions: the hotplug lock held (GetOnlineMems); no page lock held.</summary>
    private CompactResult CompactZoneLocked(CompactControl cc)
    {
        LockAssert.That(_machine.Hotplug.HoldsOnlineMemsOnThisThread, "the hotplug lock held (get_online_mems)");
        Zone zone = cc.Zone;
        PageAllocator allocator = _machine.Allocator;
        long start = zone.StartPfn, end = zone.EndPfn;
        if (end <= start)
            return CompactResult.Skipped;
        if (cc.Order > 0)
        {
            // compaction_suit_allocation_order: nothing to do if the allocation would succeed already;
            // not suitable without free memory to move into, or when the index says lack of memory.
            if (PageAllocator.ZoneWatermarkOk(zone, cc.Order, zone.Watermarks.Min))
                return CompactResult.Success;
            if (!CompactionSuitable(zone, cc.Order))
                return CompactResult.Skipped;
        }
        if (CompactionRestarting(zone, cc.Order))
            ResetIsolationSuitable(zone);

        long lastFreePageblock = (end - 1) & ~(PageblockFrames - 1);
        int sync = cc.Mode == MigrateMode.Async ? 0 : 1;
        if (cc.WholeZone)
        {
            cc.MigratePfn = start;
            cc.FreePfn = lastFreePageblock;
        }
        else
        {
            cc.MigratePfn = zone.CompactCachedMigratePfn[sync];
            cc.FreePfn = zone.CompactCachedFreePfn;
            if (cc.FreePfn < start || cc.FreePfn > lastFreePageblock)
            {
                cc.FreePfn = lastFreePageblock;
                zone.CompactCachedFreePfn = cc.FreePfn;
            }
            if (cc.MigratePfn < start || cc.MigratePfn >= end)
            {
                cc.MigratePfn = start;
                zone.CompactCachedMigratePfn[0] = start;
                zone.CompactCachedMigratePfn[1] = start;
            }
            if (cc.MigratePfn == start)
                cc.WholeZone = true;
        }

        MigrationEngine engine = _machine.Migration;
        CompactResult result;
        long lastMigratedPfn = -1;
        while ((result = CompactFinished(cc)) == CompactResult.Continue)
        {
            if (!IsolateMigratePages(cc))
                goto CheckDrain; // nothing isolated: compact_finished decides whether to go on
            lastMigratedPfn = cc.MigratePfn;
            int rc = engine.MigratePages(cc.MigrateList, cc.AllocateDelegate, cc.FreeDelegate, cc.Mode, MigrateReason.Compaction, out int moved);
            cc.Moved += moved;
            if (cc.MigrateList.Count > 0)
                engine.PutbackMovablePages(cc.MigrateList);
            if (rc == -(int)Errno.ENOMEM && !ScannersMet(cc))
            {
                // The free scanner found no frame and the scanners have not met: the zone is full of
                // what cannot move. The run ends (COMPACT_CONTENDED, as Linux's for this case).
                result = CompactResult.Contended;
                break;
            }

        CheckDrain:
            // Once the migrate scanner has passed a whole block of the order, the frames freed there sit on
            // per-CPU lists: drain them so they merge and compact_finished can see the block.
            if (cc.Order > 0 && lastMigratedPfn >= 0 &&
                lastMigratedPfn < (cc.MigratePfn & ~((1L << cc.Order) - 1)))
            {
                allocator.DrainZonePcp(zone);
                lastMigratedPfn = -1;
            }
        }

        // The free frames not used go back (the free position moves back up to them: they are still free).
        if (cc.FreeList.Count > 0)
        {
            long highest = 0;
            foreach (long pfn in cc.FreeList)
                highest = Math.Max(highest, pfn);
            ReleaseFreeList(cc);
            long block = highest & ~(PageblockFrames - 1);
            if (block > zone.CompactCachedFreePfn)
                zone.CompactCachedFreePfn = Math.Min(block, lastFreePageblock);
        }
        allocator.DrainZonePcp(zone);
        return result;
    }

    /// <summary>compact_scanners_met: the free scanner's pageblock is at or below the migrate scanner's.</summary>
    private static bool ScannersMet(CompactControl cc) =>
        cc.FreePfn >> PageAllocator.PageblockOrder <= cc.MigratePfn >> PageAllocator.PageblockOrder;

    /// <summary>__compact_finished.</summary>
    private CompactResult CompactFinished(CompactControl cc)
    {
        Zone zone = cc.Zone;
        if (ScannersMet(cc))
        {
            ResetCachedPositions(zone);
            // kcompactd clears the skip hints before it sleeps: the next direct compaction starts afresh.
            if (cc.Direct)
                zone.CompactBlockskipFlush = true;
            return cc.WholeZone ? CompactResult.Complete : CompactResult.PartialSkipped;
        }
        if (cc.Proactive)
            return FragmentationScoreZone(zone) > FragmentationScoreWmark(low: true) ? CompactResult.Continue : CompactResult.Success;
        if (cc.Order < 0)
            return CompactResult.Continue; // compact_memory: to the end
        // A free block of the order appears only once a whole pageblock is done (Linux's check point).
        if ((cc.MigratePfn & (PageblockFrames - 1)) != 0)
            return CompactResult.Continue;
        return PageAllocator.HasFreeBlockFor(zone, cc.Order, cc.MigrateType) ? CompactResult.Success : CompactResult.Continue;
    }

    // ================================================================================================
    // The migrate scanner
    // ================================================================================================

    /// <summary>
    /// isolate_migratepages: from the migrate position, pageblock by pageblock up to the free scanner's,
    /// isolates pages onto cc.MigrateList until it holds ClusterMax (Vmm goes on across pageblocks to
    /// fill a batch: each migration call costs a TLB flush). True if it isolated any.
    /// </summary>
    private bool IsolateMigratePages(CompactControl cc)
    {
        Zone zone = cc.Zone;
        PageAllocator allocator = _machine.Allocator;
        MemMap memMap = _machine.MemMap;
        int cluster = ClusterMax;
        long low = cc.MigratePfn;
        long blockStart = low & ~(PageblockFrames - 1);
        for (long blockEnd = blockStart + PageblockFrames; blockEnd <= cc.FreePfn;
             blockStart = blockEnd, blockEnd += PageblockFrames, low = blockStart)
        {
            if (low < blockStart)
                low = blockStart;
            if (!allocator.PageblockInZone(zone, blockStart) || !memMap.IsInitialised(blockStart))
            {
                low = blockEnd;
                continue;
            }
            if (!cc.IgnoreSkipHint && allocator.IsPageblockSkip(blockStart))
            {
                low = blockEnd;
                continue;
            }
            if (!SuitableMigrationSource(cc, blockStart))
            {
                UpdateCachedMigrate(cc, blockEnd);
                low = blockEnd;
                continue;
            }
            low = IsolateMigratePagesBlock(cc, low, blockEnd, cluster);
            if (cc.MigrateList.Count >= cluster)
                break;
        }
        cc.MigratePfn = low;
        return cc.MigrateList.Count > 0;
    }

    /// <summary>
    /// suitable_migration_source: never an ISOLATE pageblock (offline or a contiguous allocation empties
    /// it); an ASYNC run takes only MOVABLE pageblocks, as Linux's async compaction of a movable request.
    /// </summary>
    private bool SuitableMigrationSource(CompactControl cc, long blockStart)
    {
        MigrateType type = _machine.Allocator.PageblockTypeOf(blockStart);
        if (type == MigrateType.Isolate)
            return false;
        return cc.Mode != MigrateMode.Async || type == cc.MigrateType;
    }

    /// <summary>
    /// isolate_migratepages_block over [<paramref name="low"/>, <paramref name="end"/>): every page on
    /// an LRU list or carrying the MOVABLE tag is isolated (a reference of ours first, so that the page
    /// cannot be freed and reused under the isolation), until the list holds <paramref name="cluster"/>.
    /// A whole pageblock that gave nothing gets its skip hint. Returns where it stopped.
    /// </summary>
    private long IsolateMigratePagesBlock(CompactControl cc, long low, long end, int cluster)
    {
        MemMap memMap = _machine.MemMap;
        MigrationEngine engine = _machine.Migration;
        IsolateMode mode = cc.Mode == MigrateMode.Async ? IsolateMode.AsyncMigrate : IsolateMode.None;
        long blockStart = low & ~(PageblockFrames - 1);
        bool wholeBlock = low == blockStart;
        int isolated = 0;
        long pfn = low;
        for (; pfn < end; pfn++)
        {
            cc.MigrateScanned++;
            ref PageDescriptor page = ref memMap[pfn];
            ulong flags = Volatile.Read(ref page.Flags);
            if ((flags & (ulong)PageFlags.Buddy) != 0)
            {
                // A free block: skip it whole (a racy order, bounded: a wrong one skips a few frames this time).
                ulong order = Volatile.Read(ref page.Private);
                if (order is > 0 and <= PageAllocator.MaxOrder)
                {
                    long next = Math.Min(end, (pfn | ((1L << (int)order) - 1)) + 1);
                    cc.MigrateScanned += next - pfn - 1; // counted as scanned, as Linux counts them
                    pfn = next - 1;
                }
                continue;
            }
            bool candidate = (flags & (ulong)PageFlags.Lru) != 0 ||
                             (Volatile.Read(ref page.Mapping) & PageDescriptor.MappingTagMask) == PageDescriptor.MappingMovable;
            if (!candidate || (flags & (ulong)(PageFlags.Head | PageFlags.Tail)) != 0)
                continue;
            // get_page_unless_zero: the page may be freed meanwhile; the isolation needs it alive.
            if (!memMap.TryGetPageUnlessZero(pfn))
                continue;
            if (engine.IsolatePage(pfn, mode))
            {
                cc.MigrateList.Add(pfn);
                isolated++;
            }
            _machine.PutPage(pfn); // the isolation holds its own reference
            if (cc.MigrateList.Count >= cluster)
            {
                pfn++;
                break;
            }
        }
        cc.Isolated += isolated;
        if (pfn >= end && wholeBlock && isolated == 0)
        {
            // Nothing to take here: later runs that honour hints skip the pageblock (PB_migrate_skip).
            _machine.Allocator.SetPageblockSkip(blockStart);
            UpdateCachedMigrate(cc, end);
        }
        return pfn;
    }

    /// <summary>update_cached_migrate: the cached position moves past a pageblock that gave nothing.</summary>
    private static void UpdateCachedMigrate(CompactControl cc, long pfn)
    {
        Zone zone = cc.Zone;
        if (pfn > zone.CompactCachedMigratePfn[0])
            zone.CompactCachedMigratePfn[0] = pfn;
        if (cc.Mode != MigrateMode.Async && pfn > zone.CompactCachedMigratePfn[1])
            zone.CompactCachedMigratePfn[1] = pfn;
    }

    // ================================================================================================
    // The free scanner and the engine's callbacks
    // ================================================================================================

    /// <summary>
    /// isolate_freepages: from the free position down to the pageblock above the migrate scanner's,
    /// isolates free frames of suitable pageblocks until there are as many as pages waiting to migrate.
    /// A pageblock that gave nothing gets its skip hint (and the cached free position moves below it).
    /// </summary>
    private void IsolateFreePages(CompactControl cc)
    {
        Zone zone = cc.Zone;
        PageAllocator allocator = _machine.Allocator;
        long lowPfn = (cc.MigratePfn & ~(PageblockFrames - 1)) + PageblockFrames; // pageblock_end_pfn(migrate_pfn)
        int wanted = Math.Max(1, cc.MigrateList.Count);
        long isolateStart = cc.FreePfn; // may lie inside its pageblock: where the last call stopped
        long blockStart = isolateStart & ~(PageblockFrames - 1);
        for (; blockStart >= lowPfn; blockStart -= PageblockFrames, isolateStart = blockStart)
        {
            if (!allocator.PageblockInZone(zone, blockStart))
                continue;
            if (!cc.IgnoreSkipHint && allocator.IsPageblockSkip(blockStart))
                continue;
            int need = wanted - cc.FreeList.Count;
            int before = cc.FreeList.Count;
            int got = allocator.IsolateFreePagesBlock(zone, Math.Max(isolateStart, blockStart), cc.FreeList, need,
                out long scanned, out bool lowMemory, out long stopPfn);
            cc.FreeScanned += scanned;
            cc.Isolated += got;
            Interlocked.Add(ref _isolatedFreeNow, cc.FreeList.Count - before);
            if (lowMemory)
            {
                isolateStart = stopPfn;
                break; // the zone is at its min watermark: take no more (the run ends with what it has)
            }
            if (got == 0 && isolateStart == blockStart)
            {
                // update_pageblock_skip: the hint (shared with the migrate scanner, as Linux's one bit
                // is), and the cached free position below this pageblock.
                allocator.SetPageblockSkip(blockStart);
                if (blockStart < zone.CompactCachedFreePfn)
                    zone.CompactCachedFreePfn = blockStart;
                continue;
            }
            if (cc.FreeList.Count >= wanted)
            {
                // Enough: the next call goes on where this one stopped (the next pageblock down if this one is done).
                isolateStart = stopPfn;
                if (stopPfn >= blockStart + PageblockFrames)
                {
                    blockStart -= PageblockFrames;
                    isolateStart = blockStart;
                }
                break;
            }
        }
        cc.FreePfn = blockStart < lowPfn ? lowPfn - PageblockFrames : Math.Max(isolateStart, blockStart);
    }

    /// <summary>compaction_alloc: the next isolated free frame (the free scanner runs when there is none), prepared as an allocation; NoPfn when none is left.</summary>
    private long CompactionAlloc(CompactControl cc)
    {
        if (cc.FreeList.Count == 0 && !ScannersMet(cc))
            IsolateFreePages(cc);
        if (cc.FreeList.Count == 0)
            return PageAllocator.NoPfn;
        // The frame isolated last is taken first: a removal from the end of the list.
        long pfn = cc.FreeList[^1];
        cc.FreeList.RemoveAt(cc.FreeList.Count - 1);
        Interlocked.Decrement(ref _isolatedFreeNow);
        _machine.Allocator.PrepIsolatedFreePage(pfn);
        return pfn;
    }

    /// <summary>
    /// compaction_free: a frame compaction_alloc gave that the migration did not use goes back on the run's
    /// free list, unless a scanner holds a speculative reference to it: that reference's put frees it.
    /// </summary>
    private void CompactionFree(CompactControl cc, long pfn)
    {
        if (!_machine.Allocator.UnprepIsolatedFreePage(pfn))
            return;
        cc.FreeList.Add(pfn);
        Interlocked.Increment(ref _isolatedFreeNow);
    }

    /// <summary>release_free_list: the run's unused free frames back to the buddy lists.</summary>
    private void ReleaseFreeList(CompactControl cc)
    {
        int count = cc.FreeList.Count;
        _machine.Allocator.ReleaseIsolatedFreePages(cc.FreeList);
        Interlocked.Add(ref _isolatedFreeNow, -count);
    }

    /// <summary>
    /// One run's state (Linux's struct compact_control), pooled with its lists and the two delegates
    /// the engine calls (bound once, to this object: no allocation per run).
    /// </summary>
    internal sealed class CompactControl
    {
        public CompactControl(Compaction owner)
        {
            AllocateDelegate = _ => owner.CompactionAlloc(this);
            FreeDelegate = pfn => owner.CompactionFree(this, pfn);
        }

        public Func<long, long> AllocateDelegate { get; }

        public Action<long> FreeDelegate { get; }

        /// <summary>Isolated free frames (cc->freepages).</summary>
        public List<long> FreeList { get; } = new(MigrationEngine.MaxBatch);

        /// <summary>Isolated pages waiting to migrate (cc->migratepages).</summary>
        public List<long> MigrateList { get; } = new(MigrationEngine.MaxBatch);

        public Zone Zone { get; private set; } = null!;

        /// <summary>The order to make a free block of; -1 for compact_memory (to the end).</summary>
        public int Order { get; private set; }

        public MigrateType MigrateType { get; private set; }

        public MigrateMode Mode { get; private set; }

        public bool IgnoreSkipHint { get; set; }

        public bool WholeZone { get; set; }

        public bool Direct { get; set; }

        public bool Proactive { get; set; }

        public long MigratePfn { get; set; }

        public long FreePfn { get; set; }

        public long MigrateScanned { get; set; }

        public long FreeScanned { get; set; }

        public long Isolated { get; set; }

        public long Moved { get; set; }

        public void Init(Zone zone, int order, MigrateType mt, MigrateMode mode)
        {
            Zone = zone;
            Order = order;
            MigrateType = mt;
            Mode = mode;
        }

        public void Clear()
        {
            FreeList.Clear();
            MigrateList.Clear();
            Zone = null!;
            Order = 0;
            IgnoreSkipHint = WholeZone = Direct = Proactive = false;
            MigratePfn = FreePfn = MigrateScanned = FreeScanned = Isolated = Moved = 0;
        }
    }
}
