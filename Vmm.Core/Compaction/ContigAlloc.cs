// ContigAlloc: contiguous allocation (Linux's alloc_contig_range, alloc_contig_pages and free_contig_range
// in mm/page_alloc.c, standing on mm/page_isolation.c; what CMA and gigantic pages use). It takes a range
// of frames that holds pages in use and makes it one allocation, by moving the pages out.
//
// alloc_contig_range(start, end), under get_online_mems (no block changes state meanwhile):
//   1. drain the LRU add batches (a page still in one has no PG_lru and would look unmovable), then
//      isolate the range's pageblocks (MIGRATE_ISOLATE, the ordinary mode, not the offline's): from here
//      nothing is allocated from them, and frames freed there stay there. A pageblock holding a page that
//      can never move (a page table, a contiguous buffer) refuses: EBUSY, nothing changed;
//   2. passes until every frame of the range is free on an ISOLATE list: drain the LRU add batches and
//      the deferred puts, then isolate each page in use in the range (on an LRU list: the batched fast
//      path; any other: MigrationEngine.IsolatePage, which takes non-LRU movable pages) and migrate it (MR_CONTIG_RANGE, SYNC) to a frame allocated normally (it cannot land in the range:
//      its pageblocks are ISOLATE), RangeMigration's walk, shared with memory offline. A pass that moved
//      nothing counts as a try; the fifth try gives up with EBUSY (Linux's __alloc_contig_migrate_range
//      "tries"), which is what a pinned page gives after its migration's own retries;
//   3. test_pages_isolated on the exact range, then take its frames off the ISOLATE lists as allocated
//      frames (PageAllocator.Contig.cs: refcount 1 each, zeroed unless known zero);
//   4. undo the isolation of the pageblocks (their types back; free frames outside the range allocatable
//      again). The taken frames stay allocated.
// Any failure (EBUSY, ENOMEM when nothing could move for want of frames, EINTR when the token is cancelled)
// undoes the isolation; what moved stays moved (as in Linux), nothing is leaked.
//
// alloc_contig_pages(n, node): the ZONE_NORMAL zones of the node's unmovable zonelist (then other nodes
// by distance; never ZONE_MOVABLE: a contiguous buffer is unmovable memory, and ZONE_MOVABLE must stay
// offlinable), each scanned for aligned candidate ranges (aligned to n when n is a power of two, as Linux
// promises, else to a pageblock) whose frames are all online, in the zone and free or movable
// (pfn_range_valid_contig); alloc_contig_range is tried on each until one succeeds.
//
// Locking: the hotplug lock (get_online_mems) around each call; isolation and the take take zone locks;
// migration takes its own (page locks, anon_vma, pte locks, lru_lock). Never called with a page lock, pte
// lock or zone lock held, nor holding a reference to a frame (an offline may be waiting on it).
using System.Numerics;
using Vmm.Migration;

namespace Vmm.Memory;

/// <summary>alloc_contig_range / alloc_contig_pages / free_contig_range for one machine (see the file overview). Thread-safe.</summary>
internal sealed class ContigAlloc(Machine machine)
{
    /// <summary>Passes that moved nothing before alloc_contig_range gives up (Linux's tries == 5).</summary>
    internal const int MaxIdlePasses = 5;

    /// <summary>Test hook: called after each migration pass with its number (a test cancels the token here).</summary>
    internal Action<int>? AfterPass { get; set; }

    /// <summary>Pages migrated out of contiguous ranges since boot (also in pgmigrate_success for MR_CONTIG_RANGE).</summary>
    internal long PagesMoved => Volatile.Read(ref _pagesMoved);

    private long _pagesMoved;

    /// <summary>
    /// alloc_contig_range: makes the frames of [<paramref name="startPfn"/>, <paramref name="endPfn"/>) one
    /// allocation (each frame refcount 1, zeroed), migrating the pages in use there away.
    /// </summary>
    /// <param name="startPfn">first frame.</param>
    /// <param name="endPfn">one past the last frame; every block of the range online and in one zone.</param>
    /// <param name="cancellationToken">EINTR when cancelled (Linux's fatal signal).</param>
    /// <param name="moved">pages migrated out (they stay moved on failure too).</param>
    /// <returns><see cref="Errno.None"/>; EINVAL (not one online zone), EBUSY (an unmovable page, or pages that
    /// would not move within the tries: a pin), ENOMEM (no frame to move a page to), EINTR. On error nothing
    /// of the range is allocated and its pageblocks are as they were.</returns>
    public Errno AllocContigRange(long startPfn, long endPfn, CancellationToken cancellationToken, out long moved)
    {
        moved = 0;
        if (startPfn < 0 || endPfn <= startPfn || endPfn > machine.Topology.TotalFrames)
            throw new ArgumentException($"[{startPfn}, {endPfn}) is not a range of frames of {machine}");
        machine.Hotplug.GetOnlineMems();
        try
        {
            if (!IsOneOnlineZone(startPfn, endPfn))
                return Errno.EINVAL;
            return AllocContigRangeLocked(startPfn, endPfn, cancellationToken, out moved);
        }
        finally
        {
            machine.Hotplug.PutOnlineMems();
        }
    }

    /// <summary>The body of <see cref="AllocContigRange"/>. Preconditions: the hotplug lock held (get_online_mems); the range in one online zone.</summary>
    private Errno AllocContigRangeLocked(long startPfn, long endPfn, CancellationToken cancellationToken, out long moved)
    {
        moved = 0;
        if (cancellationToken.IsCancellationRequested)
            return Errno.EINTR;
        PageAllocator allocator = machine.Allocator;
        long pbStart = startPfn & ~(long)(PageAllocator.PageblockFrames - 1);
        long pbEnd = (endPfn + PageAllocator.PageblockFrames - 1) & ~(long)(PageAllocator.PageblockFrames - 1);

        // 1. Isolate. A page in an LRU add batch has no PG_lru yet and would look unmovable: drain first.
        machine.Lru.DrainAll();
        Errno isolated = allocator.IsolatePageRange(pbStart, pbEnd, out _);
        if (isolated != Errno.None)
            return isolated;

        Errno failure = Errno.None;
        try
        {
            // 2. Passes. Destinations are ordinary movable allocations near the page's node; they cannot
            // come from the range, whose pageblocks hand out nothing now.
            Topology topology = machine.Topology;
            Func<long, long> allocate = old => allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero, topology.NodeOf(old));
            int idle = 0;
            for (int pass = 1; ; pass++)
            {
                if (cancellationToken.IsCancellationRequested)
                {
                    failure = Errno.EINTR;
                    break;
                }
                // lru_add_drain_all, and the deferred puts of unmapped pages (an extra reference each,
                // which would fail their migration) released by a flush.
                machine.Lru.DrainAll();
                machine.Tlb.Flush();
                long movedThisPass = RangeMigration.MigrateRange(machine, startPfn, endPfn, allocate, MigrateReason.ContigRange,
                    cancellationToken, out bool outOfMemory);
                moved += movedThisPass;
                AfterPass?.Invoke(pass);
                if (allocator.TestRangeIsolated(startPfn, endPfn))
                    break;
                if (cancellationToken.IsCancellationRequested)
                {
                    failure = Errno.EINTR;
                    break;
                }
                if (outOfMemory && movedThisPass == 0)
                {
                    failure = Errno.ENOMEM;
                    break;
                }
                if (movedThisPass == 0 && ++idle >= MaxIdlePasses)
                {
                    failure = Errno.EBUSY;
                    break;
                }
                if (movedThisPass == 0)
                    Thread.Sleep(1); // what is left is transient or held: give its owner the processor
            }

            // 3. Take the frames: every one is free on an ISOLATE list, and stays so (nothing allocates
            // from an ISOLATE pageblock; only a holder frees a frame, and nobody holds one).
            if (failure == Errno.None)
                allocator.TakeIsolatedRange(startPfn, endPfn);
        }
        finally
        {
            // 4. (or the undo of a failure) The pageblocks get their types back; the taken frames stay allocated.
            allocator.UndoIsolatePageRange(pbStart, pbEnd);
            Interlocked.Add(ref _pagesMoved, moved);
        }
        return failure;
    }

    /// <summary>
    /// alloc_contig_pages: <paramref name="pageCount"/> contiguous frames from a ZONE_NORMAL zone of
    /// <paramref name="node"/> (then of other nodes by distance), each with refcount 1, zeroed.
    /// </summary>
    /// <param name="pageCount">frames wanted.</param>
    /// <param name="node">the preferred node, or <see cref="PageAllocator.NumaNoNode"/> (node 0's zonelist).</param>
    /// <param name="cancellationToken">EINTR when cancelled.</param>
    /// <param name="pfn">the first frame, or <see cref="PageAllocator.NoPfn"/>.</param>
    /// <param name="moved">pages migrated on the way (by failed candidates too).</param>
    /// <returns><see cref="Errno.None"/>, ENOMEM (no candidate range could be cleared), or EINTR.</returns>
    public Errno AllocContigPages(long pageCount, int node, CancellationToken cancellationToken, out long pfn, out long moved)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(pageCount);
        if (node < PageAllocator.NumaNoNode || node >= machine.Topology.NodeCount)
            throw new ArgumentOutOfRangeException(nameof(node), node, "no such node");
        pfn = PageAllocator.NoPfn;
        moved = 0;
        long align = BitOperations.IsPow2(pageCount) ? Math.Max(pageCount, PageAllocator.PageblockFrames) : PageAllocator.PageblockFrames;
        Topology topology = machine.Topology;
        machine.Hotplug.GetOnlineMems();
        try
        {
            // So that pfn_range_valid_contig sees PG_lru on pages just faulted.
            machine.Lru.DrainAll();
            foreach (Zone zone in machine.Allocator.UnmovableZonelist(node == PageAllocator.NumaNoNode ? 0 : node))
            {
                long nodeStart = zone.Node * topology.FramesPerNode, nodeEnd = nodeStart + topology.FramesPerNode;
                for (long candidate = AlignUp(nodeStart, align); candidate + pageCount <= nodeEnd;)
                {
                    if (cancellationToken.IsCancellationRequested)
                        return Errno.EINTR;
                    long bad = FirstInvalidFrame(zone, candidate, pageCount);
                    if (bad != PageAllocator.NoPfn)
                    {
                        candidate = AlignUp(bad + 1, align);
                        continue;
                    }
                    Errno error = AllocContigRangeLocked(candidate, candidate + pageCount, cancellationToken, out long movedHere);
                    moved += movedHere;
                    if (error == Errno.None)
                    {
                        pfn = candidate;
                        return Errno.None;
                    }
                    if (error == Errno.EINTR)
                        return error;
                    candidate += align;
                }
            }
            return Errno.ENOMEM;
        }
        finally
        {
            machine.Hotplug.PutOnlineMems();
        }
    }

    /// <summary>free_contig_range: drops the reference of each of <paramref name="pageCount"/> frames from <paramref name="pfn"/>.</summary>
    public void FreeContigRange(long pfn, long pageCount) => machine.Allocator.FreeContigRange(pfn, pageCount);

    /// <summary>
    /// pfn_range_valid_contig: the first frame of [<paramref name="start"/>, +<paramref name="count"/>) that
    /// rules the range out (its block not online or not in <paramref name="zone"/>; reserved; in use and
    /// neither on an LRU list nor movable), or NoPfn. Racy reads: a hint; alloc_contig_range decides.
    /// </summary>
    private long FirstInvalidFrame(Zone zone, long start, long count)
    {
        PageAllocator allocator = machine.Allocator;
        MemMap memMap = machine.MemMap;
        Topology topology = machine.Topology;
        long end = start + count;
        for (long block = start & ~(topology.FramesPerBlock - 1); block < end; block += topology.FramesPerBlock)
        {
            int index = topology.BlockOf(block);
            if (allocator.GetBlockState(index) != MemoryBlockState.Online || allocator.ZoneOf(block) != zone)
                return Math.Min(end, block + topology.FramesPerBlock) - 1; // the whole block is out
        }
        for (long pfn = RangeMigration.NextNotFree(memMap, start, end); pfn < end; pfn = RangeMigration.NextNotFree(memMap, pfn + 1, end))
        {
            ref PageDescriptor page = ref memMap[pfn];
            var flags = (PageFlags)Volatile.Read(ref page.Flags);
            if ((flags & PageFlags.Reserved) != 0)
                return pfn;
            if (Volatile.Read(ref page.RefCount) == 0 || (flags & PageFlags.Tail) != 0)
                continue; // free (on a per-CPU list, or just freed), or a tail whose head was looked at
            if ((flags & PageFlags.Lru) == 0 &&
                (Volatile.Read(ref page.Mapping) & PageDescriptor.MappingTagMask) != PageDescriptor.MappingMovable)
                return pfn; // neither on an LRU list nor a non-LRU movable page (the tag, not a flag: design section 2)
            if ((flags & PageFlags.Head) != 0)
                pfn += (1L << memMap[pfn].CompoundOrder) - 1;
        }
        return PageAllocator.NoPfn;
    }

    /// <summary>Every memory block of the range online (not going offline) and in one zone.</summary>
    private bool IsOneOnlineZone(long start, long end)
    {
        PageAllocator allocator = machine.Allocator;
        Topology topology = machine.Topology;
        Zone zone = allocator.ZoneOf(start);
        for (long block = start & ~(topology.FramesPerBlock - 1); block < end; block += topology.FramesPerBlock)
        {
            if (allocator.GetBlockState(topology.BlockOf(block)) != MemoryBlockState.Online || allocator.ZoneOf(block) != zone)
                return false;
        }
        return true;
    }

    private static long AlignUp(long value, long align) => (value + align - 1) & ~(align - 1); // align: a power of two
}
