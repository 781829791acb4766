// Compaction: defragmenting a zone's free memory by moving pages (Linux's mm/compaction.c).
//
// Two scanners walk a zone from its ends toward each other, pageblock by pageblock. The migrate scanner
// starts at the bottom and isolates pages in use that can move (through MigrationEngine.IsolatePage,
// so LRU pages and non-LRU movable pages alike); the free scanner starts at the top and isolates free
// pages (PageAllocator.IsolateFreePagesBlock: free buddy blocks of MOVABLE pageblocks split to order 0).
// The isolated pages migrate (MigrateReason.Compaction) into the isolated free frames
// (compaction_alloc / compaction_free), so the bottom of the zone empties and the freed pages merge into
// large blocks while the top fills up. When the scanners meet the zone is done; a run for an
// allocation stops earlier, as soon as a free block of its order exists (compact_finished).
//
// Who runs it (Compaction.Zone.cs for compact_zone and the scanners, Compaction.Daemon.cs for kcompactd):
//  - compact_memory (CompactMemory, CompactNode): every zone whole, SYNC, skip hints ignored;
//  - direct compaction, from the allocator's slow path for an order above 0 (PageAllocator's hook):
//    ASYNC first, then SYNC_LIGHT, each followed by a retry of the allocation (compact_stall, then
//    compact_success or compact_fail); a zone whose compaction failed is deferred for 2^shift
//    requests (compaction_deferred / defer_compaction / compaction_defer_reset, shift up to 6);
//  - kcompactd, one per node: woken with an order by a failing allocation (wakeup_kcompactd), and
//    every 500 ms for proactive compaction while the node's fragmentation score is above the
//    proactiveness's high mark (down to its low mark).
// compaction_suitable refuses a zone with too little free memory for the move (the min or low watermark
// plus twice the request) or, above order 3, whose fragmentation index says the failure is lack of
// memory, not fragmentation (index at or below extfrag_threshold).
//
// Per zone (Zone.cs): the scanners' cached positions (compact_cached_migrate_pfn for async and sync,
// compact_cached_free_pfn), the deferral state, and pageblock skip hints (PB_migrate_skip, in the
// allocator): a pageblock that gave a scanner nothing is skipped by direct compaction and kcompactd
// until the hints are reset (__reset_isolation_suitable: when a deferred zone restarts, or when
// kcompactd finds that a direct compaction's scanners met, compact_blockskip_flush).
//
// Locking: each zone is compacted under the hotplug lock's read side (MemoryHotplug.GetOnlineMems, shared
// by readers as Linux's mem_hotplug_lock is), so zone spans and block states stay put under the scanners
// while several compactions (and contiguous allocations) run at once; direct compaction and kcompactd only
// try it (TryGetOnlineMems: an allocation may hold frame references an offline waits for), compact_memory
// waits for it. Under it: the migration engine's locks (page locks, anon_vma /
// shmem, pte locks, lru_lock), the zone lock for the free scanner and the release. kcompactd's mutex
// (KcompactdMutex) is above the hotplug lock: held across a daemon step, and by Audit (so no daemon
// run changes memory under an audit). Compaction's counters are atomic; the knobs are plain ints read racily.
using Microsoft.Extensions.ObjectPool;
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Migration;

namespace Vmm;

/// <summary>
/// Memory compaction of one machine (Linux's mm/compaction.c): <c>/proc/sys/vm/compact_memory</c>
/// (<see cref="CompactMemory"/>), per node (<see cref="CompactNode"/>), the knobs
/// <see cref="Proactiveness"/> and <see cref="ExtfragThreshold"/>, the counters and the fragmentation
/// score. Direct compaction (in allocations above order 0) and kcompactd (one per node, a background
/// thread while <see cref="MachineOptions.BackgroundThreads"/>) run by themselves.
/// </summary>
/// <remarks>This type is thread-safe: all members may be used concurrently from multiple threads.</remarks>
public sealed partial class Compaction : PageAllocator.IDirectCompactor
{
    /// <summary>COMPACT_MAX_DEFER_SHIFT.</summary>
    internal const int MaxDeferShift = 6;

    /// <summary>PAGE_ALLOC_COSTLY_ORDER: above it the fragmentation index decides whether compaction may run.</summary>
    internal const int CostlyOrder = 3;

    /// <summary>COMPACTION_HPAGE_ORDER: the order the fragmentation score measures.</summary>
    internal const int HpageOrder = PageAllocator.PageblockOrder;

    private readonly Machine _machine;
    private readonly ObjectPool<CompactControl> _controls;
    private int _proactiveness = 20;
    private int _extfragThreshold = 500;

    // The counters of /proc/vmstat (atomic).
    private long _stall, _fail, _success, _migrateScanned, _freeScanned, _isolated, _daemonWake, _daemonMigrateScanned, _daemonFreeScanned;
    private long _isolatedFreeNow; // frames on the free lists of runs in progress (Audit: zero when quiet)

    internal Compaction(Machine machine)
    {
        _machine = machine;
        _controls = new DefaultObjectPool<CompactControl>(new ControlPolicy(this), Math.Max(4, Environment.ProcessorCount * 2));
        _daemons = new Kcompactd[machine.Topology.NodeCount];
        for (int node = 0; node < _daemons.Length; node++)
            _daemons[node] = new Kcompactd(node);
        foreach (Zone zone in machine.Allocator.Zones)
            ResetCachedPositions(zone);
    }

    /// <summary>
    /// vm.compaction_proactiveness (0 to 100, default 20): how hard kcompactd keeps the fragmentation
    /// score of each node down in the background (0: never; it compacts a node whose score is above
    /// max(100 - proactiveness, 5) + 10, down to max(100 - proactiveness, 5)).
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">outside 0 to 100.</exception>
    public int Proactiveness
    {
        get => Volatile.Read(ref _proactiveness);
        set
        {
            ArgumentOutOfRangeException.ThrowIfNegative(value);
            ArgumentOutOfRangeException.ThrowIfGreaterThan(value, 100);
            int old = Interlocked.Exchange(ref _proactiveness, value);
            // proc_dointvec_minmax_warn_rt_change + wake: raising it wakes every kcompactd to look now.
            if (value > old)
                WakeAllDaemons();
        }
    }

    /// <summary>
    /// vm.extfrag_threshold (0 to 1000, default 500): direct compaction and kcompactd leave a zone alone
    /// for an order above 3 when its fragmentation index for the order is at or below this (the failure
    /// is lack of memory, not fragmentation). 1000 refuses whenever an index applies; compact_memory ignores it.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">outside 0 to 1000.</exception>
    public int ExtfragThreshold
    {
        get => Volatile.Read(ref _extfragThreshold);
        set
        {
            ArgumentOutOfRangeException.ThrowIfNegative(value);
            ArgumentOutOfRangeException.ThrowIfGreaterThan(value, 1000);
            Volatile.Write(ref _extfragThreshold, value);
        }
    }

    /// <summary>
    /// Pages isolated by the migrate scanner before they migrate together (Linux's COMPACT_CLUSTER_MAX is
    /// 32; each migration call costs Vmm one TLB flush, so Vmm takes more: see docs/migration.md). The
    /// scanner goes on into the next pageblock until it has this many.
    /// </summary>
    internal int ClusterMax
    {
        get => Volatile.Read(ref _clusterMax);
        set => Volatile.Write(ref _clusterMax, value is >= 1 and <= MigrationEngine.MaxBatch ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "1 to 512"));
    }

    private int _clusterMax = DefaultClusterMax;

    /// <summary>The measured default of <see cref="ClusterMax"/> (scenario compact).</summary>
    internal const int DefaultClusterMax = 256;

    /// <summary>
    /// /proc/sys/vm/compact_memory: compacts every zone of every node whole (SYNC, skip hints ignored),
    /// waiting for memory hotplug in progress; returns when done.
    /// </summary>
    /// <exception cref="InvalidOperationException">called from a memory notifier callback of the same machine (the hotplug lock is held).</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void CompactMemory()
    {
        using MachineCall call = _machine.EnterCall();
        for (int node = 0; node < _machine.Topology.NodeCount; node++)
            CompactNodeCore(node);
    }

    /// <summary>/sys/devices/system/node/nodeN/compact: <see cref="CompactMemory"/> for one node.</summary>
    /// <exception cref="ArgumentOutOfRangeException">no such node.</exception>
    /// <exception cref="InvalidOperationException">called from a memory notifier callback of the same machine.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void CompactNode(int node)
    {
        using MachineCall call = _machine.EnterCall();
        if ((uint)node >= (uint)_machine.Topology.NodeCount)
            throw new ArgumentOutOfRangeException(nameof(node), node, "no such node");
        CompactNodeCore(node);
    }

    /// <summary>compact_node: each zone of the node whole, SYNC, skip hints ignored.</summary>
    private void CompactNodeCore(int node)
    {
        // lru_add_drain_all and the deferred puts (an extra reference each would fail their pages' migration).
        _machine.Lru.DrainAll();
        _machine.Tlb.Flush();
        foreach (Zone zone in _machine.Allocator.ZonesOfNode(node))
        {
            _machine.Hotplug.GetOnlineMems();
            try
            {
                if (zone.ManagedPages == 0)
                    continue;
                CompactWholeZoneLocked(zone, MigrateMode.Sync, ignoreSkipHint: true, proactive: false, daemon: false);
            }
            finally
            {
                _machine.Hotplug.PutOnlineMems();
            }
        }
    }

    /// <summary>
    /// One run over a whole zone (no order to stop at): compact_node's (SYNC, hints ignored) and proactive
    /// compaction's (SYNC_LIGHT, hints honoured, until the zone's score is down). Preconditions: the hotplug
    /// lock's read side held (get_online_mems); no page lock held.
    /// </summary>
    private void CompactWholeZoneLocked(Zone zone, MigrateMode mode, bool ignoreSkipHint, bool proactive, bool daemon)
    {
        LockAssert.That(_machine.Hotplug.HoldsOnlineMemsOnThisThread, "the hotplug lock held (get_online_mems)");
        CompactControl cc = _controls.Get();
        try
        {
            cc.Init(zone, order: -1, MigrateType.Movable, mode);
            cc.IgnoreSkipHint = ignoreSkipHint;
            cc.WholeZone = true;
            cc.Proactive = proactive;
            CompactZoneLocked(cc);
            CountScans(cc, daemon);
        }
        finally
        {
            _controls.Return(cc);
        }
    }

    /// <summary>
    /// The fragmentation score of a node (fragmentation_score_node): the sum over its zones of the share
    /// of free memory not in free blocks of order 9 or more (0 to 100), each weighted by the zone's share
    /// of the node's memory. kcompactd's proactive compaction keeps it down.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">no such node.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public int GetFragmentationScore(int node)
    {
        using MachineCall call = _machine.EnterCall();
        if ((uint)node >= (uint)_machine.Topology.NodeCount)
            throw new ArgumentOutOfRangeException(nameof(node), node, "no such node");
        return FragmentationScoreNode(node);
    }

    /// <summary>The counters (/proc/vmstat's compact_* lines).</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public CompactionStats GetStats()
    {
        using MachineCall call = _machine.EnterCall();
        return new CompactionStats(Volatile.Read(ref _stall), Volatile.Read(ref _fail), Volatile.Read(ref _success),
            Volatile.Read(ref _migrateScanned), Volatile.Read(ref _freeScanned), Volatile.Read(ref _isolated),
            Volatile.Read(ref _daemonWake), Volatile.Read(ref _daemonMigrateScanned), Volatile.Read(ref _daemonFreeScanned),
            _machine.Migration.SucceededFor(MigrateReason.Compaction), _machine.Migration.FailedFor(MigrateReason.Compaction));
    }

    /// <summary>The vmstat names of <see cref="GetStats"/>'s counters, in Linux's spelling.</summary>
    internal static readonly string[] VmStatNames =
    [
        "compact_migrate_scanned", "compact_free_scanned", "compact_isolated", "compact_stall", "compact_fail", "compact_success",
        "compact_daemon_wake", "compact_daemon_migrate_scanned", "compact_daemon_free_scanned",
    ];

    /// <summary>One counter by its vmstat name (one of <see cref="VmStatNames"/>).</summary>
    internal long ReadVmStat(string name) => name switch
    {
        "compact_migrate_scanned" => Volatile.Read(ref _migrateScanned),
        "compact_free_scanned" => Volatile.Read(ref _freeScanned),
        "compact_isolated" => Volatile.Read(ref _isolated),
        "compact_stall" => Volatile.Read(ref _stall),
        "compact_fail" => Volatile.Read(ref _fail),
        "compact_success" => Volatile.Read(ref _success),
        "compact_daemon_wake" => Volatile.Read(ref _daemonWake),
        "compact_daemon_migrate_scanned" => Volatile.Read(ref _daemonMigrateScanned),
        "compact_daemon_free_scanned" => Volatile.Read(ref _daemonFreeScanned),
        _ => throw new ArgumentOutOfRangeException(nameof(name), name, "not a compaction counter"),
    };

    /// <summary>Frames on the free lists of compaction runs in progress (zero when no run is).</summary>
    internal long IsolatedFreeFrames => Interlocked.Read(ref _isolatedFreeNow);

    // ================================================================================================
    // Direct compaction (the allocator's hook)
    // ================================================================================================

    /// <inheritdoc/>
    CompactResult PageAllocator.IDirectCompactor.TryToCompactPages(int order, MigrateType mt, Zone[] zonelist, ulong nodemask, MigrateMode mode)
    {
        var rc = CompactResult.Skipped;
        // The local LRU add batch: pages faulted just before are not on a list yet (lru_add_drain).
        _machine.Lru.DrainLocal();
        foreach (Zone zone in zonelist)
        {
            if (((nodemask >> zone.Node) & 1) == 0 || Volatile.Read(ref zone.ManagedPages) == 0)
                continue;
            if (CompactionDeferred(zone, order))
            {
                rc = Max(rc, CompactResult.Deferred);
                continue;
            }
            // Only try the hotplug lock: the allocating thread may hold frame references that an offline
            // in progress is waiting for. A zone whose blocks are changing is skipped.
            if (!_machine.Hotplug.TryGetOnlineMems())
                continue;
            CompactResult status;
            try
            {
                status = CompactZoneOrderLocked(zone, order, mt, mode, daemon: false);
            }
            finally
            {
                _machine.Hotplug.PutOnlineMems();
            }
            rc = Max(rc, status);
            if (status == CompactResult.Success)
            {
                // The allocation may still fail (another thread may take the block): not a full reset.
                CompactionDeferReset(zone, order, allocSuccess: false);
                break;
            }
            // Only a synchronous run that went through the zone defers it (an async one gives up easily).
            if (mode != MigrateMode.Async && status is CompactResult.Complete or CompactResult.PartialSkipped)
                DeferCompaction(zone, order);
        }
        return rc;
    }

    /// <inheritdoc/>
    void PageAllocator.IDirectCompactor.AfterDirectCompaction(int order, long pfn)
    {
        Interlocked.Increment(ref _stall);
        if (pfn == PageAllocator.NoPfn)
        {
            Interlocked.Increment(ref _fail);
            return;
        }
        Interlocked.Increment(ref _success);
        CompactionDeferReset(_machine.Allocator.ZoneOf(pfn), order, allocSuccess: true);
    }

    /// <summary>
    /// compact_zone_order: one zone for an allocation of <paramref name="order"/>, skip hints honoured,
    /// from the cached positions. Preconditions: the hotplug lock held; no page lock held.
    /// </summary>
    private CompactResult CompactZoneOrderLocked(Zone zone, int order, MigrateType mt, MigrateMode mode, bool daemon)
    {
        LockAssert.That(_machine.Hotplug.HoldsOnlineMemsOnThisThread, "the hotplug lock held (get_online_mems)");
        CompactControl cc = _controls.Get();
        try
        {
            cc.Init(zone, order, mt, mode);
            cc.Direct = !daemon;
            CompactResult result = CompactZoneLocked(cc);
            CountScans(cc, daemon);
            return result;
        }
        finally
        {
            _controls.Return(cc);
        }
    }

    private void CountScans(CompactControl cc, bool daemon)
    {
        Interlocked.Add(ref _migrateScanned, cc.MigrateScanned);
        Interlocked.Add(ref _freeScanned, cc.FreeScanned);
        Interlocked.Add(ref _isolated, cc.Isolated);
        if (daemon)
        {
            Interlocked.Add(ref _daemonMigrateScanned, cc.MigrateScanned);
            Interlocked.Add(ref _daemonFreeScanned, cc.FreeScanned);
        }
    }

    private static CompactResult Max(CompactResult a, CompactResult b) => a > b ? a : b;

    // ================================================================================================
    // Deferral (compaction_deferred, defer_compaction, compaction_defer_reset, compaction_restarting)
    // ================================================================================================

    /// <summary>compaction_deferred: true while the zone sits out requests of this order after failures (each call counts one).</summary>
    internal static bool CompactionDeferred(Zone zone, int order)
    {
        if (order < Volatile.Read(ref zone.CompactOrderFailed))
            return false;
        long limit = 1L << Volatile.Read(ref zone.CompactDeferShift);
        int considered = Volatile.Read(ref zone.CompactConsidered) + 1;
        if (considered >= limit)
        {
            Volatile.Write(ref zone.CompactConsidered, (int)limit);
            return false;
        }
        Volatile.Write(ref zone.CompactConsidered, considered);
        return true;
    }

    /// <summary>defer_compaction: a synchronous run failed for <paramref name="order"/>: sit out twice as many requests next time.</summary>
    internal static void DeferCompaction(Zone zone, int order)
    {
        Volatile.Write(ref zone.CompactConsidered, 0);
        int shift = Volatile.Read(ref zone.CompactDeferShift);
        if (shift < MaxDeferShift)
            Volatile.Write(ref zone.CompactDeferShift, shift + 1);
        if (order < Volatile.Read(ref zone.CompactOrderFailed))
            Volatile.Write(ref zone.CompactOrderFailed, order);
    }

    /// <summary>compaction_defer_reset: a run succeeded for <paramref name="order"/> (and the allocation too, with <paramref name="allocSuccess"/>).</summary>
    internal static void CompactionDeferReset(Zone zone, int order, bool allocSuccess)
    {
        if (allocSuccess)
        {
            Volatile.Write(ref zone.CompactConsidered, 0);
            Volatile.Write(ref zone.CompactDeferShift, 0);
        }
        if (order >= Volatile.Read(ref zone.CompactOrderFailed))
            Volatile.Write(ref zone.CompactOrderFailed, order + 1);
    }

    /// <summary>compaction_restarting: the zone was deferred as long as it can be and the wait is over: its hints are reset.</summary>
    private static bool CompactionRestarting(Zone zone, int order) =>
        order >= Volatile.Read(ref zone.CompactOrderFailed) &&
        Volatile.Read(ref zone.CompactDeferShift) == MaxDeferShift &&
        Volatile.Read(ref zone.CompactConsidered) >= 1 << MaxDeferShift;

    // ================================================================================================
    // Suitability, fragmentation index and score
    // ================================================================================================

    /// <summary>
    /// compaction_suitable: enough free memory above the watermark for the move (the low watermark for
    /// orders above 3, else min, plus twice the request: compact_gap), and above order 3 a
    /// fragmentation index above extfrag_threshold (the failure is fragmentation, not lack of memory).
    /// </summary>
    internal bool CompactionSuitable(Zone zone, int order)
    {
        Watermarks marks = zone.Watermarks;
        long watermark = (order > CostlyOrder ? marks.Low : marks.Min) + (2L << order);
        if (!PageAllocator.ZoneWatermarkOk(zone, 0, watermark))
            return false;
        if (order > CostlyOrder)
        {
            int index = PageAllocator.FragmentationIndex(zone, order);
            if (index >= 0 && index <= ExtfragThreshold)
                return false;
        }
        return true;
    }

    /// <summary>fragmentation_score_zone: extfrag_for_order(zone, 9).</summary>
    internal static int FragmentationScoreZone(Zone zone) => PageAllocator.ExtfragForOrder(zone, HpageOrder);

    /// <summary>fragmentation_score_node: the zones' scores weighted by their share of the node's pages.</summary>
    internal int FragmentationScoreNode(int node)
    {
        Zone[] zones = _machine.Allocator.ZonesOfNode(node);
        long nodePages = 0;
        foreach (Zone zone in zones)
            nodePages += Volatile.Read(ref zone.ManagedPages);
        long score = 0;
        foreach (Zone zone in zones)
            score += FragmentationScoreZone(zone) * Volatile.Read(ref zone.ManagedPages) / (nodePages + 1);
        return (int)score;
    }

    /// <summary>fragmentation_score_wmark: the low mark max(100 - proactiveness, 5), the high one 10 above it (at most 100).</summary>
    internal int FragmentationScoreWmark(bool low)
    {
        int wmarkLow = Math.Max(100 - Proactiveness, 5);
        return low ? wmarkLow : Math.Min(wmarkLow + 10, 100);
    }

    /// <summary>__reset_isolation_suitable: every skip hint of the zone cleared, the scanners back at the zone's ends.</summary>
    internal void ResetIsolationSuitable(Zone zone)
    {
        _machine.Allocator.ClearPageblockSkip(zone);
        ResetCachedPositions(zone);
        zone.CompactBlockskipFlush = false;
    }

    /// <summary>reset_cached_positions.</summary>
    private static void ResetCachedPositions(Zone zone)
    {
        long start = Volatile.Read(ref zone.StartPfn), end = Volatile.Read(ref zone.EndPfn);
        if (end == 0)
            start = end = 0; // no memory yet (a zone that only hot-add will fill)
        zone.CompactCachedMigratePfn[0] = start;
        zone.CompactCachedMigratePfn[1] = start;
        zone.CompactCachedFreePfn = end == 0 ? 0 : (end - 1) & ~(long)(PageAllocator.PageblockFrames - 1);
    }

    /// <summary>Audit (quiet machine): no compaction run holds free frames; the deferral state is in range.</summary>
    internal void Audit(List<string> problems)
    {
        long held = IsolatedFreeFrames;
        if (held != 0)
            problems.Add($"compaction: {held} free frames still isolated by compaction runs");
        foreach (Zone zone in _machine.Allocator.Zones)
        {
            if (zone.CompactDeferShift is < 0 or > MaxDeferShift)
                problems.Add($"compaction: {zone}'s compact_defer_shift {zone.CompactDeferShift} is outside 0 to {MaxDeferShift}");
            if (zone.CompactConsidered < 0 || zone.CompactConsidered > 1 << MaxDeferShift)
                problems.Add($"compaction: {zone}'s compact_considered {zone.CompactConsidered} is outside 0 to {1 << MaxDeferShift}");
        }
    }

    private sealed class ControlPolicy(Compaction owner) : IPooledObjectPolicy<CompactControl>
    {
        public CompactControl Create() => new(owner);

        public bool Return(CompactControl cc)
        {
            cc.Clear();
            return true;
        }
    }
}
