namespace Vmm;

/// <summary>A snapshot of one zone (exact when no other thread is allocating or freeing).</summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="Node">the node.</param>
/// <param name="Zone">NORMAL or MOVABLE.</param>
/// <param name="ManagedPages">frames given to the allocator.</param>
/// <param name="FreePages">allocatable free frames on the buddy lists (Linux's NR_FREE_PAGES), including
/// the frames of memmap sections not initialised yet (never used; Linux leaves its deferred pages out
/// until its boot-time init finishes, Vmm's stay deferred until needed and count as free).</param>
/// <param name="PcpPages">free frames cached on per-CPU lists.</param>
/// <param name="IsolatedFreePages">free frames in isolated pageblocks: free, but never handed out.</param>
/// <param name="Watermarks">min / low / high in pages.</param>
/// <param name="BuddyInfo">free blocks of each order, as a line of /proc/buddyinfo (a section not
/// initialised yet counts as the max-order block it becomes).</param>
/// <param name="PgAlloc">allocations served (pgalloc).</param>
/// <param name="PgFree">frees received (pgfree).</param>
/// <param name="AllocFailures">times this zone could not serve a request and the allocator moved on.</param>
public sealed record ZoneStats(
    int Node,
    ZoneType Zone,
    long ManagedPages,
    long FreePages,
    long PcpPages,
    long IsolatedFreePages,
    Watermarks Watermarks,
    IReadOnlyList<long> BuddyInfo,
    long PgAlloc,
    long PgFree,
    long AllocFailures)
{
    /// <summary>Every free frame of the zone: buddy lists, per-CPU lists and isolated pageblocks.</summary>
    public long AllFreePages => FreePages + PcpPages + IsolatedFreePages;
}

/// <summary>A snapshot of one NUMA node.</summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="Node">the node number.</param>
/// <param name="Zones">its zones, NORMAL then MOVABLE.</param>
public sealed record NodeStats(int Node, IReadOnlyList<ZoneStats> Zones)
{
    /// <summary>MemTotal: bytes managed by the allocator on this node.</summary>
    public long MemTotalBytes => Zones.Sum(z => z.ManagedPages) * Topology.PageSize;

    /// <summary>MemFree: free bytes that can be allocated (buddy and per-CPU lists; not isolated).</summary>
    public long MemFreeBytes => Zones.Sum(z => z.FreePages + z.PcpPages) * Topology.PageSize;

    /// <summary>nr_inactive_anon: pages on this node's inactive anonymous LRU list (new pages land here once their per-CPU add batch is drained).</summary>
    public long InactiveAnonPages { get; init; }

    /// <summary>nr_active_anon: pages on this node's active anonymous LRU list (accessed twice while inactive).</summary>
    public long ActiveAnonPages { get; init; }

    /// <summary>nr_isolated_anon: this node's pages taken off the LRU lists by a mechanism that moves them (migration).</summary>
    public long IsolatedAnonPages { get; init; }
}

/// <summary>A snapshot of the machine's memory.</summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="Nodes">each node.</param>
/// <param name="TotalFrames">frames in the arena.</param>
/// <param name="DescriptorBytes">bytes of host memory committed to frame descriptors: 64 per frame of
/// every memmap section initialised so far (sections are initialised as their memory is first used).</param>
/// <param name="HostRssBytes">the host process's resident set (VmRSS), or -1 where unknown.</param>
public sealed record MachineStats(IReadOnlyList<NodeStats> Nodes, long TotalFrames, long DescriptorBytes, long HostRssBytes)
{
    /// <summary>MemTotal over all nodes, in bytes.</summary>
    public long MemTotalBytes => Nodes.Sum(n => n.MemTotalBytes);

    /// <summary>MemFree over all nodes, in bytes.</summary>
    public long MemFreeBytes => Nodes.Sum(n => n.MemFreeBytes);

    /// <summary>Every free frame, allocatable or isolated.</summary>
    public long AllFreePages => Nodes.Sum(n => n.Zones.Sum(z => z.AllFreePages));

    /// <summary>
    /// num_poisoned_pages: frames taken out of use by memory failure (<see cref="Advice.HwPoison"/>,
    /// <see cref="Advice.SoftOffline"/>, <see cref="Machine.HardOfflinePage"/>, <see cref="Machine.SoftOfflinePage"/>).
    /// They are never handed out again and count as in use (not free).
    /// </summary>
    public long PoisonedPages { get; init; }

    /// <summary>/proc/meminfo's HardwareCorrupted, in bytes: <see cref="PoisonedPages"/> times the page size.</summary>
    public long HardwareCorruptedBytes => PoisonedPages * Topology.PageSize;
}

/// <summary>What one frame's descriptor says, copied out for tests and tools.</summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="Pfn">the frame.</param>
/// <param name="Node">its node.</param>
/// <param name="Zone">its zone.</param>
/// <param name="Migratetype">its pageblock's migratetype.</param>
/// <param name="Flags">the raw flags.</param>
/// <param name="RefCount">_refcount.</param>
/// <param name="MapCount">page_mapcount (0 when unmapped).</param>
/// <param name="BuddyOrder">the order of the free block it heads, or -1.</param>
/// <param name="CompoundHead">the head of its compound page (itself when not a tail).</param>
public readonly record struct PageInfo(
    long Pfn, int Node, ZoneType Zone, MigrateType Migratetype, PageFlags Flags,
    int RefCount, int MapCount, int BuddyOrder, long CompoundHead);

/// <summary>One memory block (the hotplug unit), as /sys/devices/system/memory/memoryN shows it.</summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="Block">the block number.</param>
/// <param name="Node">its node.</param>
/// <param name="Zone">the zone it was onlined to.</param>
/// <param name="StartPfn">its first frame.</param>
/// <param name="Frames">frames in it.</param>
/// <param name="FreeFrames">frames on allocatable buddy lists or in sections never initialised (frames
/// cached per CPU count as used).</param>
/// <param name="IsolatedFreeFrames">free frames in isolated pageblocks.</param>
public readonly record struct MemoryBlockInfo(int Block, int Node, ZoneType Zone, long StartPfn, long Frames, long FreeFrames, long IsolatedFreeFrames);

/// <summary>Event counters of a machine (a subset of /proc/vmstat).</summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="CowFaults">copy-on-write faults that copied a page.</param>
/// <param name="PgMigrateSuccess">pages moved to another frame (pgmigrate_success).</param>
/// <param name="PageTablePages">page-table frames of all processes (nr_page_table_pages).</param>
/// <param name="TlbFlushes">TLB shootdowns run in this host process (every machine counts here).</param>
/// <param name="CowKsm">write faults that copied a KSM page (cow_ksm); counted in CowFaults too.</param>
public sealed record VmStats(long CowFaults, long PgMigrateSuccess, long PageTablePages, long TlbFlushes, long CowKsm);

/// <summary>
/// Page migration counters: /proc/vmstat's pgmigrate_success and pgmigrate_fail (pages, all reasons),
/// and the same split by the reason the pages were migrated for (every <see cref="MigrateReason"/> is a key).
/// </summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="Succeeded">pages moved to a new frame (pgmigrate_success).</param>
/// <param name="Failed">pages a migration gave up on (pgmigrate_fail).</param>
/// <param name="SucceededByReason">pgmigrate_success by reason.</param>
/// <param name="FailedByReason">pgmigrate_fail by reason.</param>
public sealed record MigrationStats(long Succeeded, long Failed,
    IReadOnlyDictionary<MigrateReason, long> SucceededByReason, IReadOnlyDictionary<MigrateReason, long> FailedByReason);
