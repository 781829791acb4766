// PageAllocator: the buddy allocator (Linux's mm/page_alloc.c, in small).
//
// Memory is handed out in blocks of 2^order frames, order 0 to MaxOrder (10: 4 MiB). A free block of
// order k has a "buddy", the block of the same order whose pfn differs in bit k; when both are free
// they merge into one block of order k + 1. Allocation takes the smallest free block that fits and
// splits the rest back onto the lists ("expand"). Blocks never cross a memory block (hotplug unit), so
// they never cross a zone or node either, and a block can be offlined without splitting its neighbours.
//
// Anti-fragmentation: every 2 MiB pageblock has a migratetype (MOVABLE, UNMOVABLE, ISOLATE) and free
// blocks live on the list of their pageblock's type. Unmovable allocations (page tables) steal from
// MOVABLE pageblocks only when they must, and claim a whole pageblock when at least half of it is free,
// so unmovable pages cluster and the rest of memory stays movable (what compaction and hot-remove need).
// Pageblocks of type ISOLATE hand out nothing: their free blocks sit on ISOLATE lists, and frames freed
// inside them go there too. Beyond the pageblock order, two buddies merge only if their pageblocks have
// the same type, so an ISOLATE block is never glued to an allocatable one.
//
// Placement: an allocation names a preferred node; the zonelist tries that node's zones first
// (MOVABLE before NORMAL for movable requests, NORMAL only for unmovable ones), then the other nodes
// by distance. Each zone is tried first against its low watermark, then against min (the slow path),
// then once more after draining the per-CPU caches.
//
// Every frame reaches its new owner zeroed (unless the owner promises to overwrite it, NoZero): no byte
// of one owner ever reaches another. Frames known to be zero (never touched, or decommitted) carry
// PG_zeroed and are not zeroed again.
//
// Deferred init (Linux's deferred struct page init and sparse memmap): at boot a zone receives its
// memory as deferred sections (Zone.DeferredPages, counted free) without touching a descriptor. When an
// allocation would take from the max-order MOVABLE free list of a zone and finds it empty, the zone
// first initialises its next deferred section (GrowZoneLocked), whose frames join that list as one
// max-order block. So the allocator hands frames out in the same order as if every section had been
// initialised at boot, a machine commits descriptors only for the memory it uses, and the per-CPU fast
// path has no new check (growth happens only under the zone lock, on the refill and buddy paths).
// Isolation initialises the sections of its range first; GetBlockInfo, GetPageInfo and Audit read
// never-initialised sections as free, never-touched frames.
//
// Beside this file: PageAllocator.Isolation.cs (MIGRATE_ISOLATE ranges for the coming hot-remove and
// contiguous allocation, Linux's mm/page_isolation.c) and PageAllocator.Reporting.cs (giving free memory back to
// the host, Linux's mm/page_reporting.c).
//
// Locking: pcp spin word -> zone lock. Never take a zone lock, then a pcp lock.
using System.Diagnostics;
using System.Numerics;
using System.Runtime.CompilerServices;
using Vmm.Diagnostics;
using Vmm.Native;

namespace Vmm.Memory;

/// <summary>The machine's page allocator: buddy lists per node and zone, per-CPU caches, isolation.</summary>
internal sealed unsafe partial class PageAllocator
{
    /// <summary>The largest order (Linux's MAX_PAGE_ORDER): 2^10 frames, 4 MiB.</summary>
    public const int MaxOrder = 10;

    /// <summary>log2 of the frames in a pageblock: 9, so a pageblock is 2 MiB.</summary>
    public const int PageblockOrder = 9;

    /// <summary>Frames per pageblock.</summary>
    public const int PageblockFrames = 1 << PageblockOrder;

    /// <summary>Returned when nothing could be allocated.</summary>
    public const long NoPfn = -1;

    /// <summary>"No preferred node": allocate on node 0's zonelist.</summary>
    public const int NumaNoNode = -1;

    private readonly Topology _topology;
    private readonly Arena _arena;
    private readonly MemMap _memMap;
    private readonly Zone[][] _nodeZones;        // [node][ZoneType]; immutable after boot
    private readonly Zone[] _blockZone;          // [block] -> zone; changed only while the block is offline (PageAllocator.Hotplug.cs)
    private readonly Zone[][] _movableZonelist;  // [node] -> zones in fallback order
    private readonly Zone[][] _unmovableZonelist;
    private readonly Zone[][] _movableThisNode;
    private readonly Zone[][] _unmovableThisNode;
    private readonly byte[] _pageblockType;      // [pfn >> PageblockOrder]; written under the zone lock
    private readonly byte[] _pageblockSavedType; // type before isolation; protected by the zone lock
    private readonly int _pcpMask;
    private readonly bool _poison; // MachineOptions.PoisonFreedFrames; immutable
    private readonly FaultInjector? _faults; // MachineOptions.FaultInjection; immutable, null when off
    private readonly MachineOptions _options; // immutable

    internal PageAllocator(Topology topology, Arena arena, MemMap memMap, MachineOptions options, FaultInjector? faults = null)
    {
        _faults = faults;
        _options = options;
        _topology = topology;
        _arena = arena;
        _memMap = memMap;
        int zoneMaxOrder = MemMap.SectionShiftFor(topology);
        Debug.Assert(memMap.SectionShift == zoneMaxOrder, "a memmap section is one max-order block");
        int slots = (int)BitOperations.RoundUpToPowerOf2((uint)Math.Max(1, Environment.ProcessorCount));
        _pcpMask = slots - 1;
        _poison = options.PoisonFreedFrames;

        _nodeZones = new Zone[topology.NodeCount][];
        for (int node = 0; node < topology.NodeCount; node++)
        {
            _nodeZones[node] =
            [
                new Zone(node, ZoneType.Normal, zoneMaxOrder, slots),
                new Zone(node, ZoneType.Movable, zoneMaxOrder, slots),
            ];
        }

        _pageblockType = new byte[topology.TotalFrames >> PageblockOrder];
        _pageblockSavedType = new byte[_pageblockType.Length];
        Array.Fill(_pageblockType, (byte)MigrateType.Movable);

        int bootBlocks = options.BootBlocksPerNode;
        int movableBlocks = options.EffectiveMovableBlocksPerNode(bootBlocks);
        _blockZone = new Zone[topology.BlockCount];
        _blockState = new byte[topology.BlockCount]; // MemoryBlockState.Online unless absent (below)
        for (int block = 0; block < topology.BlockCount; block++)
        {
            int node = topology.NodeOfBlock(block);
            int indexInNode = block - node * topology.BlocksPerNode;
            ZoneType type = indexInNode >= bootBlocks - movableBlocks ? ZoneType.Movable : ZoneType.Normal;
            _blockZone[block] = _nodeZones[node][(int)type];
            if (indexInNode >= bootBlocks)
                _blockState[block] = (byte)MemoryBlockState.Absent; // the hot-add room (its zone: the default for "online")
        }

        int[,] distance = options.EffectiveNodeDistances(topology.NodeCount);
        _movableZonelist = new Zone[topology.NodeCount][];
        _unmovableZonelist = new Zone[topology.NodeCount][];
        _movableThisNode = new Zone[topology.NodeCount][];
        _unmovableThisNode = new Zone[topology.NodeCount][];
        for (int node = 0; node < topology.NodeCount; node++)
        {
            int[] order = NodesByDistance(node, distance);
            _movableZonelist[node] = [.. order.SelectMany(n => new[] { _nodeZones[n][1], _nodeZones[n][0] })];
            _unmovableZonelist[node] = [.. order.Select(n => _nodeZones[n][0])];
            _movableThisNode[node] = [_nodeZones[node][1], _nodeZones[node][0]];
            _unmovableThisNode[node] = [_nodeZones[node][0]];
        }
        NodeDistances = distance;

        for (int block = 0; block < topology.BlockCount; block++)
            if (GetBlockState(block) == MemoryBlockState.Online)
                OnlineBlock(block);
        SetWatermarks(options.EffectiveMinFreeKbytes(NormalManagedPages()));
    }

    /// <summary>Linux's node_distance table (10 = local).</summary>
    public int[,] NodeDistances { get; }

    internal IEnumerable<Zone> Zones => _nodeZones.SelectMany(z => z);

    internal Zone GetZone(int node, ZoneType type) => _nodeZones[node][(int)type];

    /// <summary>The zone that manages a frame.</summary>
    internal Zone ZoneOf(long pfn) => _blockZone[_topology.BlockOf(pfn)];

    /// <summary>The zone type a frame belongs to.</summary>
    public ZoneType ZoneTypeOf(long pfn)
    {
        CheckPfn(pfn);
        return ZoneOf(pfn).Type;
    }

    /// <summary>The migratetype of the pageblock that holds <paramref name="pfn"/>.</summary>
    public MigrateType GetPageblockMigratetype(long pfn)
    {
        CheckPfn(pfn);
        return PageblockType(pfn);
    }

    // ================================================================================================
    // Allocation
    // ================================================================================================

    /// <summary>
    /// Allocates 2^<paramref name="order"/> contiguous frames, naturally aligned, with a reference count
    /// of one and (unless <see cref="AllocFlags.NoZero"/>) zeroed.
    /// </summary>
    /// <param name="order">0 to <see cref="MaxOrder"/> (or less on machines with blocks under 4 MiB).</param>
    /// <param name="flags">how the allocation may be satisfied.</param>
    /// <param name="preferredNode">the node to try first, or <see cref="NumaNoNode"/>.</param>
    /// <returns>The first frame, or <see cref="NoPfn"/> if no zone could satisfy the request.</returns>
    /// <exception cref="ArgumentOutOfRangeException">order or node out of range.</exception>
    public long AllocPages(int order = 0, AllocFlags flags = AllocFlags.None, int preferredNode = NumaNoNode) =>
        AllocPagesFiltered(order, flags, preferredNode, default(AnyNode));

    /// <summary>The node mask that restricts nothing (every node allowed).</summary>
    public const ulong AllNodes = ulong.MaxValue;

    /// <summary>
    /// __alloc_pages(gfp, order, nid, nodemask): <see cref="AllocPages"/> on the zonelist of
    /// <paramref name="preferredNode"/>, filtered by <paramref name="nodemask"/> (bit n: node n may be
    /// used). Memory policies (BIND, PREFERRED_MANY) and cpusets pass their nodes here; a mask that
    /// allows no node of the zonelist fails (NoPfn). <see cref="AllNodes"/> is <see cref="AllocPages"/> itself.
    /// </summary>
    /// <param name="order">0 to <see cref="MaxOrder"/>.</param>
    /// <param name="flags">how the allocation may be satisfied.</param>
    /// <param name="preferredNode">the node whose zonelist is walked, or <see cref="NumaNoNode"/>; it may be outside the mask (the walk then starts at the nearest allowed node).</param>
    /// <param name="nodemask">the nodes that may be used.</param>
    /// <returns>The first frame, or <see cref="NoPfn"/>.</returns>
    /// <exception cref="ArgumentOutOfRangeException">order or node out of range.</exception>
    public long AllocPagesNodemask(int order, AllocFlags flags, int preferredNode, ulong nodemask) =>
        nodemask == AllNodes
            ? AllocPagesFiltered(order, flags, preferredNode, default(AnyNode))
            : AllocPagesFiltered(order, flags, preferredNode, new InNodemask(nodemask));

    /// <summary>Which zones of a zonelist may be used (for_each_zone_zonelist_nodemask's mask).</summary>
    private interface INodeFilter
    {
        bool Allows(int node);

        ulong Mask { get; }
    }

    /// <summary>No nodemask. A struct type argument, so the JIT compiles the unfiltered walk without any test:
    /// the default allocation (every fault without a policy) pays nothing for nodemasks.</summary>
    private readonly struct AnyNode : INodeFilter
    {
        public bool Allows(int node) => true;

        public ulong Mask => AllNodes;
    }

    /// <summary>A nodemask: bit n allows node n.</summary>
    private readonly struct InNodemask(ulong mask) : INodeFilter
    {
        public bool Allows(int node) => ((mask >> node) & 1) != 0;

        public ulong Mask => mask;
    }

    private long AllocPagesFiltered<TFilter>(int order, AllocFlags flags, int preferredNode, TFilter nodemask)
        where TFilter : struct, INodeFilter
    {
        ThrowIfDisposed();
        if ((uint)order > (uint)_nodeZones[0][0].MaxOrder)
            throw new ArgumentOutOfRangeException(nameof(order), order, $"order must be 0 to {_nodeZones[0][0].MaxOrder}");
        if (preferredNode < NumaNoNode || preferredNode >= _topology.NodeCount)
            throw new ArgumentOutOfRangeException(nameof(preferredNode), preferredNode, "no such node");
        // fail_page_alloc: the one place every frame is handed out (the per-CPU fast path included).
        if (_faults is not null && _faults.ShouldFailAlloc(order, flags))
            return NoPfn;
        int node = preferredNode == NumaNoNode ? 0 : preferredNode;
        bool movable = (flags & AllocFlags.Movable) != 0;
        bool thisNode = (flags & AllocFlags.ThisNode) != 0;
        Zone[] zonelist = movable
            ? (thisNode ? _movableThisNode : _movableZonelist)[node]
            : (thisNode ? _unmovableThisNode : _unmovableZonelist)[node];
        MigrateType mt = movable ? MigrateType.Movable : MigrateType.Unmovable;

        // Fast path: the first zone above its low watermark.
        long pfn = TryZonelist(zonelist, order, mt, WatermarkLevel.Low, nodemask);
        if (pfn == NoPfn)
        {
            // Slow path: down to min (or below it for the flags that allow it), then once more after
            // pulling the frames cached on per-CPU lists back into the buddy lists.
            WatermarkLevel level = (flags & AllocFlags.NoWatermark) != 0 ? WatermarkLevel.None
                : (flags & AllocFlags.HighPriority) != 0 ? WatermarkLevel.HalfMin : WatermarkLevel.Min;
            pfn = TryZonelist(zonelist, order, mt, level, nodemask);
            if (pfn == NoPfn)
            {
                foreach (Zone zone in zonelist)
                {
                    if (nodemask.Allows(zone.Node))
                        DrainZone(zone);
                }
                pfn = TryZonelist(zonelist, order, mt, level, nodemask);
            }
            if (pfn == NoPfn && order > 0 && DirectCompactor is { } compactor)
                pfn = AllocPagesDirectCompact(compactor, zonelist, order, mt, level, nodemask, node);
            if (pfn == NoPfn)
                return NoPfn;
        }
        PrepNewPage(pfn, order, flags);
        return pfn;
    }

    /// <summary>
    /// The compaction part of __alloc_pages_slowpath, for an order above 0 that failed even after the
    /// drain: kcompactd is woken, then direct compaction runs at ASYNC priority and, if that did not
    /// give a block, at SYNC_LIGHT, the allocation retried after each run. Runs with no allocator lock
    /// held; the caller must hold no page lock, pte lock or zone lock (compaction migrates pages).
    /// </summary>
    private long AllocPagesDirectCompact<TFilter>(IDirectCompactor compactor, Zone[] zonelist, int order, MigrateType mt,
        WatermarkLevel level, TFilter nodemask, int node)
        where TFilter : struct, INodeFilter
    {
        compactor.WakeKcompactd(node, order);
        foreach (MigrateMode mode in (ReadOnlySpan<MigrateMode>)[MigrateMode.Async, MigrateMode.SyncLight])
        {
            CompactResult result = compactor.TryToCompactPages(order, mt, zonelist, nodemask.Mask, mode);
            if (result is CompactResult.Skipped or CompactResult.Deferred)
                continue;
            DrainZonesOf(zonelist, nodemask); // the sources compaction freed sit on per-CPU lists
            long pfn = TryZonelist(zonelist, order, mt, level, nodemask);
            compactor.AfterDirectCompaction(order, pfn);
            if (pfn != NoPfn)
                return pfn;
        }
        return NoPfn;
    }

    private void DrainZonesOf<TFilter>(Zone[] zonelist, TFilter nodemask)
        where TFilter : struct, INodeFilter
    {
        foreach (Zone zone in zonelist)
        {
            if (nodemask.Allows(zone.Node))
                DrainZone(zone);
        }
    }

    private enum WatermarkLevel { Low, Min, HalfMin, None }

    private long TryZonelist<TFilter>(Zone[] zonelist, int order, MigrateType mt, WatermarkLevel level, TFilter nodemask)
        where TFilter : struct, INodeFilter
    {
        foreach (Zone zone in zonelist)
        {
            // for_each_zone_zonelist_nodemask: a zone of a node outside the mask is not a candidate
            // (and not a failure of that zone).
            if (!nodemask.Allows(zone.Node))
                continue;
            if (!WatermarkOk(zone, order, mt, level))
            {
                Interlocked.Increment(ref zone.AllocFailures);
                continue;
            }
            long pfn = order == 0 ? RmqueuePcp(zone, mt) : RmqueueBuddy(zone, order, mt);
            if (pfn != NoPfn)
                return pfn;
            Interlocked.Increment(ref zone.AllocFailures);
        }
        return NoPfn;
    }

    /// <summary>
    /// Linux's __zone_watermark_ok: after taking the block, more than the mark must stay free; for
    /// order > 0 a free block of at least that order must also exist. Racy by design (a hint, as in Linux);
    /// the free lists themselves are checked under the lock.
    /// </summary>
    private static bool WatermarkOk(Zone zone, int order, MigrateType mt, WatermarkLevel level)
    {
        long mark = level switch
        {
            WatermarkLevel.Low => zone.Watermarks.Low,
            WatermarkLevel.Min => zone.Watermarks.Min,
            WatermarkLevel.HalfMin => zone.Watermarks.Min / 2,
            _ => 0,
        };
        if (level == WatermarkLevel.None)
            return true;
        long free = Volatile.Read(ref zone.FreePages) - ((1L << order) - 1);
        if (free <= mark)
            return false;
        if (order == 0)
            return true;
        for (int o = order; o <= zone.MaxOrder; o++)
        {
            if (Volatile.Read(ref zone.NrFree[Zone.ListIndex(o, mt)]) > 0 ||
                Volatile.Read(ref zone.NrFree[Zone.ListIndex(o, Fallback(mt))]) > 0)
                return true;
        }
        // Deferred sections are max-order MOVABLE blocks; mt or its fallback is MOVABLE.
        return Volatile.Read(ref zone.DeferredPages) != 0;
    }

    private long RmqueuePcp(Zone zone, MigrateType mt)
    {
        PerCpuPages pcp = zone.Pcp[Thread.GetCurrentProcessorId() & _pcpMask];
        pcp.Enter();
        try
        {
            ref uint head = ref mt == MigrateType.Movable ? ref pcp.HeadMovable : ref pcp.HeadUnmovable;
            if (head == PageDescriptor.NoLink)
                RefillPcpLocked(zone, pcp, ref head, mt);
            if (head == PageDescriptor.NoLink)
                return NoPfn;
            long pfn = head;
            head = _memMap[pfn].LruNext;
            _memMap[pfn].LruNext = PageDescriptor.NoLink;
            pcp.Count--;
            pcp.Allocs++;
            return pfn;
        }
        finally
        {
            pcp.Exit();
        }
    }

    /// <summary>rmqueue_bulk: moves up to Batch order-0 frames from the buddy lists to a pcp list. Preconditions: pcp lock held.</summary>
    private void RefillPcpLocked(Zone zone, PerCpuPages pcp, ref uint head, MigrateType mt)
    {
        LockAssert.PcpLockHeld(pcp);
        Debug.Assert(head == PageDescriptor.NoLink, "refilled only when empty");
        lock (zone.Lock)
        {
            // Keep the frames in the order the buddy lists hand them out (ascending within a split
            // block), so that pages faulted in one after another get neighbouring frames: copies that
            // cross page boundaries then stream through memory instead of jumping around.
            uint tail = PageDescriptor.NoLink;
            for (int i = 0; i < pcp.Batch; i++)
            {
                long pfn = RmqueueSmallestLocked(zone, 0, mt);
                if (pfn == NoPfn)
                    pfn = RmqueueFallbackLocked(zone, 0, mt);
                if (pfn == NoPfn)
                    break;
                if (tail == PageDescriptor.NoLink)
                    head = (uint)pfn;
                else
                    _memMap[tail].LruNext = (uint)pfn;
                tail = (uint)pfn;
                pcp.Count++;
            }
        }
    }

    private long RmqueueBuddy(Zone zone, int order, MigrateType mt)
    {
        lock (zone.Lock)
        {
            long pfn = RmqueueSmallestLocked(zone, order, mt);
            if (pfn == NoPfn)
                pfn = RmqueueFallbackLocked(zone, order, mt);
            if (pfn != NoPfn)
                zone.BuddyAllocs++;
            return pfn;
        }
    }

    /// <summary>
    /// The head of the free list of order <paramref name="o"/> and type <paramref name="mt"/>. The
    /// zone's deferred sections sit, in effect, at the tail of the max-order MOVABLE list: when that
    /// list is empty and sections are deferred, the next one is initialised and its block returned.
    /// Preconditions: zone lock held.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private uint FreeListHeadLocked(Zone zone, int o, MigrateType mt)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        uint head = zone.FreeHead[Zone.ListIndex(o, mt)];
        if (head == PageDescriptor.NoLink && o == zone.MaxOrder && mt == MigrateType.Movable && zone.DeferredPages != 0 && GrowZoneLocked(zone))
            head = zone.FreeHead[Zone.ListIndex(o, mt)];
        return head;
    }

    /// <summary>__rmqueue_smallest: the smallest free block of the type that fits, split down. Preconditions: zone lock held.</summary>
    private long RmqueueSmallestLocked(Zone zone, int order, MigrateType mt)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        for (int o = order; o <= zone.MaxOrder; o++)
        {
            uint head = FreeListHeadLocked(zone, o, mt);
            if (head == PageDescriptor.NoLink)
                continue;
            bool reported = (_memMap[head].Flags & (ulong)PageFlags.Reported) != 0;
            DelFromFreeListLocked(zone, head);
            ExpandLocked(zone, head, order, o, mt, reported);
            return head;
        }
        return NoPfn;
    }

    /// <summary>
    /// __rmqueue_fallback: steals from the other pcp migratetype, largest block first. When the request
    /// is unmovable or large, and at least half of the victim pageblock is free, the whole pageblock
    /// changes type (so unmovable pages gather in few pageblocks). Preconditions: zone lock held.
    /// </summary>
    private long RmqueueFallbackLocked(Zone zone, int order, MigrateType startType)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        MigrateType fallback = Fallback(startType);
        for (int o = zone.MaxOrder; o >= order; o--)
        {
            uint head = FreeListHeadLocked(zone, o, fallback);
            if (head == PageDescriptor.NoLink)
                continue;
            bool canClaim = o >= PageblockOrder / 2 || startType == MigrateType.Unmovable;
            if (canClaim)
            {
                if (o >= PageblockOrder)
                {
                    SetTypeRangeLocked(head, 1L << o, startType);
                    MoveFreeBlockLocked(zone, head, startType);
                }
                else if (CountFreeInPageblockLocked(head) >= PageblockFrames / 2)
                {
                    _pageblockType[head >> PageblockOrder] = (byte)startType;
                    MoveFreePagesBlockLocked(zone, head & ~(long)(PageblockFrames - 1), startType);
                }
                long pfn = RmqueueSmallestLocked(zone, order, startType);
                if (pfn != NoPfn)
                    return pfn;
            }
            // Take the block without claiming its pageblock; the remainder stays on the fallback list.
            bool reported = (_memMap[head].Flags & (ulong)PageFlags.Reported) != 0;
            DelFromFreeListLocked(zone, head);
            ExpandLocked(zone, head, order, o, fallback, reported);
            return head;
        }
        return NoPfn;
    }

    private static MigrateType Fallback(MigrateType mt) =>
        mt == MigrateType.Movable ? MigrateType.Unmovable : MigrateType.Movable;

    /// <summary>expand: splits a block of order high, keeping the first 2^low frames. Preconditions: zone lock held.</summary>
    private void ExpandLocked(Zone zone, long pfn, int low, int high, MigrateType mt, bool reported)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        while (high > low)
        {
            high--;
            long buddy = pfn + (1L << high);
            AddToFreeListLocked(zone, buddy, high, mt);
            if (reported)
                _memMap[buddy].Flags |= (ulong)PageFlags.Reported;
        }
    }

    /// <summary>prep_new_page: checks the frames are really free, then gives them their first reference.</summary>
    /// <remarks>
    /// A frame on a free list is always clean: FreePagesPrepare and the free-list primitives leave
    /// Mapping, Index, Private, links and compound fields at their rest values. So only the flags
    /// and compound fields are written here. The head is always checked (check_new_page); tails are
    /// checked in Debug builds, as Linux checks them only with debug checks enabled.
    /// </remarks>
    private void PrepNewPage(long pfn, int order, AllocFlags flags)
    {
        long count = 1L << order;
        bool zero = (flags & AllocFlags.NoZero) == 0;
        bool compound = order > 0 && (flags & AllocFlags.Compound) != 0;
        CheckNewPage(pfn);
        for (long i = 0; i < count; i++)
        {
            ref PageDescriptor page = ref _memMap[pfn + i];
#if DEBUG
            CheckNewPage(pfn + i);
#endif
            if (_poison)
                CheckPoison(pfn + i, (page.Flags & (ulong)PageFlags.Zeroed) != 0);
            _memMap.Trace?.Record(pfn + i, FrameEvent.Alloc, order | ((zero && (page.Flags & (ulong)PageFlags.Zeroed) != 0) ? 256 : 0) | (zero ? 0 : 512));
            if (zero && (page.Flags & (ulong)PageFlags.Zeroed) == 0)
                PageOps.Zero(_arena.FrameAddress(pfn + i));
            if (compound)
            {
                // Head pointer first, flags last: a racy reader that sees PG_tail finds its head.
                page.CompoundHead = (uint)pfn;
                if (i == 0)
                    page.CompoundOrder = (byte)order;
            }
            Volatile.Write(ref page.Flags, compound ? (ulong)(i == 0 ? PageFlags.Head : PageFlags.Tail) : 0);
        }
        // Publish the reference last: a scanner's TryGetPageUnlessZero must see a prepared frame.
        Volatile.Write(ref _memMap[pfn].RefCount, 1);
    }

    /// <summary>check_new_page: a frame taken off a free list has no references, no mappings, no state.</summary>
    private void CheckNewPage(long pfn)
    {
        ref PageDescriptor page = ref _memMap[pfn];
        if (page.RefCount != 0 || page.MapCount != -1 || page.PinCount != 0 || page.Mapping != 0 || page.Private != 0 ||
            (page.Flags & ~(ulong)(PageFlags.Zeroed | PageFlags.Reported)) != 0 || page.LruNext != PageDescriptor.NoLink)
            throw new VmBugException($"bad page at allocation: frame {pfn} flags {(PageFlags)page.Flags} refcount {page.RefCount} mapcount {page.MapCount}");
    }

    // ================================================================================================
    // Freeing
    // ================================================================================================

    /// <summary>
    /// __free_pages: drops the caller's reference to a block of 2^<paramref name="order"/> frames
    /// allocated by <see cref="AllocPages"/>; the block returns to the free lists when that was the
    /// last reference.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">pfn or order out of range, or pfn not aligned to order.</exception>
    /// <exception cref="VmBugException">the block is already free, still mapped, pinned or locked.</exception>
    public void FreePages(long pfn, int order = 0)
    {
        CheckPfn(pfn);
        if (!_memMap.IsInitialised(pfn))
            throw new VmBugException($"free of frame {pfn}, which was never allocated (its memmap section is not initialised)");
        if ((uint)order > (uint)ZoneOf(pfn).MaxOrder || (pfn & ((1L << order) - 1)) != 0)
            throw new ArgumentOutOfRangeException(nameof(order), order, $"frame {pfn} is not the start of an order-{order} block");
        ref PageDescriptor head = ref _memMap[pfn];
        if ((head.Flags & (ulong)PageFlags.Tail) != 0)
            throw new VmBugException($"free of tail frame {pfn}");
        if ((head.Flags & (ulong)PageFlags.Head) != 0 && head.CompoundOrder != order)
            throw new VmBugException($"free of order-{head.CompoundOrder} compound page {pfn} as order {order}");
        // Read before the put: once our reference is gone, the head may be freed and reused at any moment.
        bool compound = (head.Flags & (ulong)PageFlags.Head) != 0;
        if (order > 0 && !compound)
            CheckTailsAtFree(pfn, order); // before the put: a bad frame leaves the caller's reference as it was
        if (_memMap.PutPageTestZero(pfn))
        {
            FreeFrozenPages(pfn, order);
        }
        else if (!compound)
        {
            // Not the last reference: a scanner (compaction's, an offline's, memory failure's) took a
            // speculative one on the head (get_page_unless_zero on a frame it saw in use a moment ago), and
            // its put will free the head as a single frame. The rest of a non-compound block is still ours
            // alone (its frames have refcount 0, so no scanner can take them): free it now, in halves, as
            // Linux's __free_pages does, or it would be lost to the allocator for good.
            while (order-- > 0)
                FreeFrozenPages(pfn + (1L << order), order);
        }
    }

    /// <summary>
    /// Frees a block whose reference count has reached zero (free_unref_page / __free_pages_ok).
    /// Preconditions: refcount 0; no other thread can reach the frames.
    /// </summary>
    internal void FreeFrozenPages(long pfn, int order)
    {
        // "No other thread can reach the frames" is an ownership argument (the last reference was ours): not checkable.
        LockAssert.That(_memMap[pfn].RefCount == 0, $"frame {pfn} with refcount 0");
        FreePagesPrepare(pfn, order);
        if (order == 0)
            FreeToPcp(pfn);
        else
            FreeToBuddy(pfn, order);
    }

    /// <summary>
    /// <see cref="FreeFrozenPages"/> of one frame whose memory was given back to the host (a balloon
    /// page's): it reads zero, so it is freed PG_zeroed and its next allocation skips the zeroing (and
    /// does not commit it again). With page poisoning on it is poisoned and freed as any other.
    /// Preconditions: refcount 0; no other thread can reach the frame; its memory decommitted.
    /// </summary>
    internal void FreeFrozenZeroedPage(long pfn)
    {
        LockAssert.That(_memMap[pfn].RefCount == 0, $"frame {pfn} with refcount 0");
        FreePagesPrepare(pfn, 0);
        _memMap.Trace?.Record(pfn, FrameEvent.FreeZeroed);
        if (!_poison)
            _memMap[pfn].Flags = (ulong)PageFlags.Zeroed;
        FreeToPcp(pfn);
    }

    /// <summary>
    /// free_pages_prepare's checks of frames 1 to 2^<paramref name="order"/> - 1 of a non-compound block,
    /// made before the caller's reference goes (FreePages): when a speculative holder keeps the head, those
    /// frames are freed in halves at once, and a bad one must fail the caller, not the holder's later put.
    /// </summary>
    private void CheckTailsAtFree(long pfn, int order)
    {
        for (long p = pfn + 1; p < pfn + (1L << order); p++)
        {
            ref PageDescriptor page = ref _memMap[p];
            if (IsBadAtFree(ref page, tail: true))
                throw new VmBugException($"bad page at free: frame {p} of the order-{order} block at {pfn}: flags {(PageFlags)page.Flags} refcount {page.RefCount} mapcount {page.MapCount} pincount {page.PinCount}");
        }
    }

    /// <summary>free_page_is_bad: still mapped, pinned or flagged in use; a frame after a block's first also still referenced.</summary>
    private static bool IsBadAtFree(ref PageDescriptor page, bool tail) =>
        page.MapCount != -1 || page.PinCount != 0 || ((PageFlags)page.Flags & PageFlagPolicies.CheckAtFree) != 0 ||
        (tail && page.RefCount != 0);

    /// <summary>free_pages_prepare: checks that nothing still uses the frames and clears their state.</summary>
    private void FreePagesPrepare(long pfn, int order)
    {
        long count = 1L << order;
        for (long i = 0; i < count; i++)
        {
            ref PageDescriptor page = ref _memMap[pfn + i];
            PageFlags flags = (PageFlags)page.Flags;
            if (IsBadAtFree(ref page, tail: i > 0))
            {
                if (i == 0)
                    Interlocked.Increment(ref _memMap[pfn].RefCount); // leave the page as the caller had it
                throw new VmBugException($"bad page at free: frame {pfn + i} flags {flags} refcount {page.RefCount} mapcount {page.MapCount} pincount {page.PinCount}");
            }
        }
        for (long i = 0; i < count; i++)
        {
            ref PageDescriptor page = ref _memMap[pfn + i];
            _memMap.Trace?.Record(pfn + i, FrameEvent.Free, order);
            page.Flags = 0;
            page.Mapping = 0;
            page.Index = 0;
            page.Private = 0;
            page.CompoundHead = 0;
            page.CompoundOrder = 0;
            page.LruNext = PageDescriptor.NoLink;
            page.LruPrev = PageDescriptor.NoLink;
            if (_poison)
                new Span<byte>(_arena.FrameAddress(pfn + i), Topology.PageSize).Fill(PoisonByte);
        }
    }

    /// <summary>The byte free frames are filled with when <see cref="MachineOptions.PoisonFreedFrames"/> is on.</summary>
    public const byte PoisonByte = 0x6B;

    /// <summary>
    /// Page poisoning: a freed frame must come back exactly as it was poisoned, or someone wrote to it
    /// while it was free. A PG_zeroed frame (its memory given back to the host, or never touched) must
    /// read zero instead: a write after the decommit would otherwise hand its next owner that content
    /// instead of zeros, since its allocation skips the zeroing.
    /// </summary>
    private void CheckPoison(long pfn, bool zeroed)
    {
        var frame = new ReadOnlySpan<byte>(_arena.FrameAddress(pfn), Topology.PageSize);
        byte expected = zeroed ? (byte)0 : PoisonByte;
        int at = frame.IndexOfAnyExcept(expected);
        if (at >= 0)
            throw new VmBugException($"frame {pfn} was written while free (byte {at} is 0x{frame[at]:x2}, expected 0x{expected:x2}{(zeroed ? ": PG_zeroed" : ", the poison")}): a stale translation or a use after free"
                + (_memMap.Trace is { } trace ? "\n" + trace.Dump(pfn) : ""));
    }

    private void FreeToPcp(long pfn)
    {
        Zone zone = ZoneOf(pfn);
        PerCpuPages pcp = zone.Pcp[Thread.GetCurrentProcessorId() & _pcpMask];
        pcp.Enter();
        try
        {
            // Read the pageblock type under the pcp lock: isolation sets the type first and then drains
            // every pcp under its lock, so a frame of an isolated pageblock either sees ISOLATE here or
            // is flushed by that drain. It never stays cached where an allocation could take it.
            MigrateType mt = PageblockType(pfn);
            if (mt == MigrateType.Isolate)
            {
                lock (zone.Lock)
                {
                    // Read again under the zone lock: an undo may have restored the type meanwhile.
                    FreeOneLocked(zone, pfn, 0, PageblockType(pfn));
                    zone.BuddyFrees++;
                }
                return;
            }
            ref uint head = ref mt == MigrateType.Movable ? ref pcp.HeadMovable : ref pcp.HeadUnmovable;
            _memMap[pfn].LruNext = head;
            head = (uint)pfn;
            pcp.Count++;
            pcp.Frees++;
            if (pcp.Count > pcp.High)
                FreePcpBatchLocked(zone, pcp, pcp.Batch);
        }
        finally
        {
            pcp.Exit();
        }
    }

    /// <summary>free_pcppages_bulk: returns up to <paramref name="count"/> cached frames to the buddy lists. Preconditions: pcp lock held.</summary>
    private void FreePcpBatchLocked(Zone zone, PerCpuPages pcp, int count)
    {
        LockAssert.PcpLockHeld(pcp);
        lock (zone.Lock)
        {
            while (count-- > 0 && pcp.Count > 0)
            {
                ref uint head = ref pcp.HeadMovable != PageDescriptor.NoLink ? ref pcp.HeadMovable : ref pcp.HeadUnmovable;
                long pfn = head;
                head = _memMap[pfn].LruNext;
                _memMap[pfn].LruNext = PageDescriptor.NoLink;
                pcp.Count--;
                FreeOneLocked(zone, pfn, 0, PageblockType(pfn));
            }
        }
    }

    private void FreeToBuddy(long pfn, int order)
    {
        Zone zone = ZoneOf(pfn);
        lock (zone.Lock)
        {
            zone.BuddyFrees++;
            if (order <= PageblockOrder)
            {
                FreeOneLocked(zone, pfn, order, PageblockType(pfn));
                return;
            }
            // A block larger than a pageblock may span pageblocks of different types: free it one
            // pageblock at a time so each piece lands on its own type's list (merging re-joins them).
            for (long p = pfn; p < pfn + (1L << order); p += PageblockFrames)
                FreeOneLocked(zone, p, PageblockOrder, PageblockType(p));
        }
    }

    /// <summary>__free_one_page: puts a block on its free list, merging with free buddies. Preconditions: zone lock held.</summary>
    private void FreeOneLocked(Zone zone, long pfn, int order, MigrateType mt)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        while (order < zone.MaxOrder)
        {
            long buddy = pfn ^ (1L << order);
            ref PageDescriptor b = ref _memMap[buddy];
            if ((b.Flags & (ulong)PageFlags.Buddy) == 0 || (int)b.Private != order)
                break;
            Debug.Assert(order >= PageblockOrder || (MigrateType)b.Index == mt, "buddies within a pageblock sit on lists of its type");
            if (order >= PageblockOrder && (MigrateType)b.Index != mt)
            {
                // Beyond a pageblock the buddy may be of another type. An ISOLATE pageblock must never
                // become part of an allocatable block (nor the other way round); two allocatable types
                // merge, and the buddy's pageblocks take this block's type so that a later split puts
                // every piece on the right list (as Linux 6.10 does).
                if (mt == MigrateType.Isolate || (MigrateType)b.Index == MigrateType.Isolate)
                    break;
                SetTypeRangeLocked(buddy, 1L << order, mt);
            }
            DelFromFreeListLocked(zone, buddy);
            pfn = Math.Min(pfn, buddy);
            order++;
        }
        // A merged block is not marked reported even if its halves were: reporting it again costs one
        // madvise on memory that is already gone, and its frames keep PG_zeroed either way.
        AddToFreeListLocked(zone, pfn, order, mt);
    }

    // ================================================================================================
    // Free-list primitives (all: zone lock held)
    // ================================================================================================

    /// <summary>Links a free block at the head of its list and counts it. Preconditions: zone lock held.</summary>
    private void AddToFreeListLocked(Zone zone, long pfn, int order, MigrateType mt)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        ref PageDescriptor page = ref _memMap[pfn];
        Debug.Assert((page.Flags & (ulong)PageFlags.Buddy) == 0, "frame already on a free list");
        int index = Zone.ListIndex(order, mt);
        uint next = zone.FreeHead[index];
        page.Flags = (page.Flags & (ulong)PageFlags.Zeroed) | (ulong)PageFlags.Buddy;
        page.Private = (ulong)order;
        page.Index = (ulong)mt;
        page.LruPrev = PageDescriptor.NoLink;
        page.LruNext = next;
        if (next != PageDescriptor.NoLink)
            _memMap[next].LruPrev = (uint)pfn;
        zone.FreeHead[index] = (uint)pfn;
        zone.NrFree[index]++;
        if (mt == MigrateType.Isolate)
            zone.IsolatedFreePages += 1L << order;
        else
            zone.FreePages += 1L << order;
    }

    /// <summary>Unlinks a free block from whatever list it is on and uncounts it. Preconditions: zone lock held.</summary>
    private void DelFromFreeListLocked(Zone zone, long pfn)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        ref PageDescriptor page = ref _memMap[pfn];
        Debug.Assert((page.Flags & (ulong)PageFlags.Buddy) != 0, "frame not on a free list");
        int order = (int)page.Private;
        var mt = (MigrateType)page.Index;
        int index = Zone.ListIndex(order, mt);
        if (page.LruPrev == PageDescriptor.NoLink)
            zone.FreeHead[index] = page.LruNext;
        else
            _memMap[page.LruPrev].LruNext = page.LruNext;
        if (page.LruNext != PageDescriptor.NoLink)
            _memMap[page.LruNext].LruPrev = page.LruPrev;
        page.LruNext = PageDescriptor.NoLink;
        page.LruPrev = PageDescriptor.NoLink;
        page.Flags &= ~(ulong)(PageFlags.Buddy | PageFlags.Reported);
        page.Private = 0;
        page.Index = 0;
        zone.NrFree[index]--;
        if (mt == MigrateType.Isolate)
            zone.IsolatedFreePages -= 1L << order;
        else
            zone.FreePages -= 1L << order;
    }

    /// <summary>Moves one free block to the list of another type, keeping its order and reported state. Preconditions: zone lock held.</summary>
    private void MoveFreeBlockLocked(Zone zone, long pfn, MigrateType mt)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        int order = (int)_memMap[pfn].Private;
        bool reported = (_memMap[pfn].Flags & (ulong)PageFlags.Reported) != 0;
        DelFromFreeListLocked(zone, pfn);
        AddToFreeListLocked(zone, pfn, order, mt);
        if (reported)
            _memMap[pfn].Flags |= (ulong)PageFlags.Reported;
    }

    /// <summary>
    /// If a free block larger than a pageblock covers <paramref name="pageblockPfn"/>, splits it into
    /// pageblock-sized blocks, each on the list of its own pageblock's type. Preconditions: zone lock held.
    /// </summary>
    private void SplitCoveringBlockLocked(Zone zone, long pageblockPfn)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        for (int o = PageblockOrder + 1; o <= zone.MaxOrder; o++)
        {
            long start = pageblockPfn & ~((1L << o) - 1);
            ref PageDescriptor page = ref _memMap[start];
            if ((page.Flags & (ulong)PageFlags.Buddy) == 0 || (int)page.Private != o)
                continue;
            bool reported = (page.Flags & (ulong)PageFlags.Reported) != 0;
            DelFromFreeListLocked(zone, start);
            for (long p = start; p < start + (1L << o); p += PageblockFrames)
            {
                AddToFreeListLocked(zone, p, PageblockOrder, PageblockType(p));
                if (reported)
                    _memMap[p].Flags |= (ulong)PageFlags.Reported;
            }
            return;
        }
    }

    /// <summary>move_freepages_block: puts every free block inside one pageblock on the lists of <paramref name="mt"/>. Preconditions: zone lock held.</summary>
    private void MoveFreePagesBlockLocked(Zone zone, long pageblockPfn, MigrateType mt)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        SplitCoveringBlockLocked(zone, pageblockPfn);
        long end = pageblockPfn + PageblockFrames;
        for (long pfn = pageblockPfn; pfn < end;)
        {
            ref PageDescriptor page = ref _memMap[pfn];
            if ((page.Flags & (ulong)PageFlags.Buddy) != 0)
            {
                int order = (int)page.Private;
                MoveFreeBlockLocked(zone, pfn, mt);
                pfn += 1L << order;
            }
            else
            {
                pfn++;
            }
        }
    }

    /// <summary>Free frames in the pageblock of <paramref name="pfn"/> (buddy blocks only). Preconditions: the zone lock of its zone held.</summary>
    private long CountFreeInPageblockLocked(long pfn)
    {
        LockAssert.Held(ZoneOf(pfn).Lock, "the zone lock");
        long start = pfn & ~(long)(PageblockFrames - 1);
        long free = 0;
        for (long p = start; p < start + PageblockFrames;)
        {
            ref PageDescriptor page = ref _memMap[p];
            if ((page.Flags & (ulong)PageFlags.Buddy) != 0)
            {
                long n = 1L << (int)page.Private;
                free += n;
                p += n;
            }
            else
            {
                p++;
            }
        }
        return free;
    }

    /// <summary>Sets the migratetype of every pageblock in the range. Preconditions: the zone lock of its zone held.</summary>
    private void SetTypeRangeLocked(long pfn, long count, MigrateType mt)
    {
        LockAssert.Held(ZoneOf(pfn).Lock, "the zone lock");
        for (long p = pfn; p < pfn + count; p += PageblockFrames)
            _pageblockType[p >> PageblockOrder] = (byte)mt;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private MigrateType PageblockType(long pfn) => (MigrateType)Volatile.Read(ref _pageblockType[pfn >> PageblockOrder]);

    // ================================================================================================
    // Per-CPU drain
    // ================================================================================================

    /// <summary>drain_all_pages: returns every frame cached on per-CPU lists to the buddy lists.</summary>
    public void DrainAllPages()
    {
        ThrowIfDisposed();
        foreach (Zone zone in Zones)
            DrainZone(zone);
    }

    /// <param name="zone">the zone.</param>
    /// <param name="force">take every slot's spin word even if its count reads zero: isolation needs
    /// this, since a free may hold the word with the frame not yet pushed (see FreeToPcp).</param>
    private void DrainZone(Zone zone, bool force = false)
    {
        foreach (PerCpuPages pcp in zone.Pcp)
        {
            if (!force && Volatile.Read(ref pcp.Count) == 0)
                continue;
            pcp.Enter();
            try
            {
                FreePcpBatchLocked(zone, pcp, int.MaxValue);
            }
            finally
            {
                pcp.Exit();
            }
        }
    }

    // ================================================================================================
    // Memory blocks
    // ================================================================================================

    /// <summary>What one memory block holds: its zone and how many of its frames are free.</summary>
    /// <exception cref="ArgumentOutOfRangeException">no such block.</exception>
    public MemoryBlockInfo GetBlockInfo(int block)
    {
        ThrowIfDisposed();
        if ((uint)block >= (uint)_topology.BlockCount)
            throw new ArgumentOutOfRangeException(nameof(block), block, "no such memory block");
        Zone zone = _blockZone[block];
        long start = _topology.FirstPfnOfBlock(block);
        long end = start + _topology.FramesPerBlock;
        long free = 0, isolated = 0;
        lock (zone.Lock)
        {
            // An offline block has no free frames: its memory is not the allocator's (and its descriptors are gone).
            for (long pfn = IsBlockOnline(block) ? start : end; pfn < end;)
            {
                if (!_memMap.IsInitialised(pfn))
                {
                    free += _memMap.FramesPerSection; // a deferred section: free, never touched
                    pfn += _memMap.FramesPerSection;
                    continue;
                }
                ref PageDescriptor page = ref _memMap[pfn];
                if ((page.Flags & (ulong)PageFlags.Buddy) == 0)
                {
                    pfn++;
                    continue;
                }
                long n = 1L << (int)page.Private;
                if ((MigrateType)page.Index == MigrateType.Isolate)
                    isolated += n;
                else
                    free += n;
                pfn += n;
            }
        }
        return new MemoryBlockInfo(block, zone.Node, zone.Type, start, end - start, free, isolated);
    }

    // ================================================================================================
    // Boot, watermarks, statistics
    // ================================================================================================

    /// <summary>
    /// online_pages, deferred: gives memory block <paramref name="block"/> to its zone as deferred
    /// sections. It touches no descriptor: the zone counts the frames as managed and free, and
    /// initialises a section when it first needs its frames (<see cref="GrowZoneLocked"/>). Boot calls it
    /// for every block; memory hot-add (to come) will call it for an added block, after which its
    /// descriptors too are committed on first use.
    /// </summary>
    private void OnlineBlock(int block)
    {
        Zone zone = _blockZone[block];
        lock (zone.Lock)
            OnlineBlockLocked(zone, block);
    }

    /// <summary>The body of <see cref="OnlineBlock"/>. Preconditions: the lock of the block's zone held.</summary>
    private void OnlineBlockLocked(Zone zone, int block)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        long start = _topology.FirstPfnOfBlock(block);
        long end = start + _topology.FramesPerBlock;
        zone.StartPfn = Math.Min(zone.StartPfn, start);
        zone.EndPfn = Math.Max(zone.EndPfn, end);
        zone.ManagedPages += end - start;
        zone.FreePages += end - start;
        zone.DeferredPages += end - start;
        zone.DeferredCursor = Math.Max(zone.DeferredCursor, _memMap.SectionOf(end));
    }

    /// <summary>
    /// deferred_grow_zone: initialises the zone's next deferred section (the highest one not yet
    /// initialised) and puts its frames on the free lists. Returns false when nothing is deferred.
    /// Preconditions: zone lock held.
    /// </summary>
    private bool GrowZoneLocked(Zone zone)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        long first = _memMap.SectionOf(zone.StartPfn);
        while (zone.DeferredCursor > first)
        {
            long section = --zone.DeferredCursor;
            long pfn = section << _memMap.SectionShift;
            // A section of an offline (or absent) block is not deferred memory: its block keeps its zone for the next
            // online, but its frames left the zone (and the cursor may still lie above them, if the block
            // went offline after the zone had grown into it).
            if (_memMap.IsSectionInitialised(section) || ZoneOf(pfn) != zone || !IsBlockOnline(_topology.BlockOf(pfn)))
                continue;
            // Initialising commits the section's descriptors (host memory): a host that refuses fails this
            // allocation as out of memory, and the section stays deferred for a later try.
            if (_faults is not null && _faults.ShouldFail(FaultSite.HostCommit))
            {
                zone.DeferredCursor++;
                return false;
            }
            InitSectionLocked(zone, section);
            return true;
        }
        Debug.Assert(zone.DeferredPages == 0, "deferred pages without a deferred section");
        return false;
    }

    /// <summary>
    /// deferred_init_memmap_chunk: initialises the descriptors of one deferred section of
    /// <paramref name="zone"/> (<see cref="MemMap.InitSection"/>, the call hot-add will share) and frees
    /// its frames to the buddy lists as one max-order block of never-touched memory: PG_zeroed on every
    /// frame, and reported (nothing was ever committed, so ReleaseFreeMemory has nothing to give back).
    /// The frames were counted free already; they move from DeferredPages to the lists.
    /// Preconditions: zone lock held; the section belongs to the zone and is not initialised.
    /// </summary>
    private void InitSectionLocked(Zone zone, long section)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        long pfn = section << _memMap.SectionShift;
        long frames = _memMap.FramesPerSection;
        Debug.Assert(ZoneOf(pfn) == zone, "section of another zone");
        _memMap.InitSection(section);
        // Never initialised pageblocks keep their boot type (MOVABLE): only free blocks and isolation
        // (which initialises first) change a pageblock's type.
        FreeOneLocked(zone, pfn, zone.MaxOrder, PageblockType(pfn));
        _memMap[pfn].Flags |= (ulong)PageFlags.Reported;
        // FreeOneLocked counted the block again: it was free (deferred) already. Subtract after adding,
        // so a racy watermark reader sees too much free memory for a moment rather than too little.
        zone.FreePages -= frames;
        zone.DeferredPages -= frames;
    }

    /// <summary>Initialises every deferred section that overlaps [start, end) (for isolation, which changes free lists there).</summary>
    private void InitSectionsOfRange(long startPfn, long endPfn)
    {
        for (long section = _memMap.SectionOf(startPfn); section <= _memMap.SectionOf(endPfn - 1); section++)
        {
            if (_memMap.IsSectionInitialised(section))
                continue;
            long pfn = section << _memMap.SectionShift;
            Zone zone = ZoneOf(pfn);
            lock (zone.Lock)
            {
                // An offline block's sections are not the zone's: they stay as the offline left them.
                if (!_memMap.IsSectionInitialised(section) && IsBlockOnline(_topology.BlockOf(pfn)))
                    InitSectionLocked(zone, section);
            }
        }
    }

    private long NormalManagedPages() => _nodeZones.Sum(z => z[(int)ZoneType.Normal].ManagedPages);

    /// <summary>
    /// __setup_per_zone_wmarks: min_free_kbytes is shared among NORMAL zones by size; MOVABLE zones get
    /// a small fixed reserve; low and high sit a quarter of min (at least 0.1 % of the zone) above it.
    /// </summary>
    private void SetWatermarks(long minFreeKbytes)
    {
        long minFreePages = minFreeKbytes * 1024 / Topology.PageSize;
        long normalTotal = NormalManagedPages();
        foreach (Zone zone in Zones)
        {
            long managed = zone.ManagedPages;
            long min;
            if (minFreeKbytes == 0 || managed == 0)
                min = 0;
            else if (zone.Type == ZoneType.Movable)
                min = Math.Clamp(managed / 1024, 32, 128);
            else
                min = normalTotal == 0 ? 0 : minFreePages * managed / normalTotal;
            long delta = minFreeKbytes == 0 ? 0 : Math.Max(min / 4, managed * 10 / 10000);
            zone.Watermarks = new Watermarks(min, min + delta, min + 2 * delta);
            int batch = (int)Math.Clamp(managed / 1024, 1, 63);
            foreach (PerCpuPages pcp in zone.Pcp)
            {
                pcp.Batch = batch;
                pcp.High = 6 * batch;
            }
        }
    }

    internal static ZoneStats GetZoneStats(Zone zone)
    {
        var buddy = new long[zone.MaxOrder + 1];
        long pcpAllocs = 0, pcpFrees = 0;
        foreach (PerCpuPages pcp in zone.Pcp)
        {
            pcpAllocs += Volatile.Read(ref pcp.Allocs);
            pcpFrees += Volatile.Read(ref pcp.Frees);
        }
        lock (zone.Lock)
        {
            for (int order = 0; order <= zone.MaxOrder; order++)
                for (int mt = 0; mt < Zone.MigrateTypeCount; mt++)
                    buddy[order] += zone.NrFree[Zone.ListIndex(order, (MigrateType)mt)];
            buddy[zone.MaxOrder] += zone.DeferredPages >> zone.MaxOrder; // deferred sections are max-order blocks
            return new ZoneStats(zone.Node, zone.Type, zone.ManagedPages, zone.FreePages, zone.PcpPages,
                zone.IsolatedFreePages, zone.Watermarks, buddy, zone.BuddyAllocs + pcpAllocs,
                zone.BuddyFrees + pcpFrees, Volatile.Read(ref zone.AllocFailures));
        }
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_memMap.IsDisposed, this);

    private void CheckPfn(long pfn)
    {
        ThrowIfDisposed();
        if (!_topology.IsValidPfn(pfn))
            throw new ArgumentOutOfRangeException(nameof(pfn), pfn, $"no frame {pfn}: the arena has {_topology.TotalFrames}");
    }

    private void CheckPageblockRange(long startPfn, long endPfn)
    {
        ThrowIfDisposed();
        if (startPfn < 0 || endPfn > _topology.TotalFrames || startPfn >= endPfn)
            throw new ArgumentException($"[{startPfn}, {endPfn}) is not a range of frames of the arena");
        if (((startPfn | endPfn) & (PageblockFrames - 1)) != 0)
            throw new ArgumentException($"[{startPfn}, {endPfn}) is not aligned to pageblocks of {PageblockFrames} frames");
    }

    private static int[] NodesByDistance(int node, int[,] distance)
    {
        int count = distance.GetLength(0);
        return [.. Enumerable.Range(0, count).OrderBy(n => distance[node, n]).ThenBy(n => (n - node + count) % count)];
    }
}
