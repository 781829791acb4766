// Zone: one node's NORMAL or MOVABLE memory, with its buddy free lists and per-CPU page caches.
//
// Locking: the zone lock (Zone.Lock) protects the free lists and the counters its fields name; each pcp
// slot has its own spin word (PerCpuPages.Lock), taken before the zone lock, never after.
//
// Free lists: for each order 0..MaxOrder and each migratetype, a doubly linked list threaded through
// the descriptors' LruNext / LruPrev (pfn links). The head frame of a free block carries PG_buddy, its
// order in Private and the list's migratetype in Index, so a block can be unlinked from whatever list
// it is on without searching.
//
// Per-CPU pages (Linux's pcp lists): order-0 frees and allocations go through a small cache per
// processor slot, so the common case never takes the zone lock and never splits or merges. A frame on
// a pcp list is free (refcount 0) but not PG_buddy; it counts in PcpPages, not in FreePages, as Linux
// leaves it out of NR_FREE_PAGES.
//
// Deferred pages (Linux's CONFIG_DEFERRED_STRUCT_PAGE_INIT, kept for the machine's whole life): the
// zone's memory is given to it at boot as deferred sections whose descriptors are not yet initialised
// (MemMap.cs). They count in ManagedPages and FreePages (unlike Linux, which leaves them out of
// NR_FREE_PAGES until its boot-time init threads finish: Vmm's never finish by themselves, and a frame
// nobody has touched is free memory for MemFree, the watermarks and the accounting identity). The
// allocator treats them as max-order MOVABLE free blocks at the tail of that free list: when it would
// take from that list and finds it empty, it initialises the next deferred section first
// (PageAllocator.GrowZoneLocked, Linux's deferred_grow_zone), from the top of the zone down, the order
// in which a fully initialised zone would hand its max-order blocks out.
using System.Runtime.CompilerServices;
using Vmm.Diagnostics;

namespace Vmm.Memory;

/// <summary>
/// A per-processor cache of free order-0 frames, one list per pcp migratetype. Count, the list heads,
/// Allocs and Frees are protected by the spin word Lock (Count is also read racily, for PcpPages);
/// High and Batch are set once at boot, then immutable.
/// </summary>
internal sealed class PerCpuPages
{
    // The spin word (SpinWord.cs): protects the fields below. Lock order: pcp lock -> zone lock.
    public SpinWord Lock;
    public int Count;
    public uint HeadUnmovable = PageDescriptor.NoLink;
    public uint HeadMovable = PageDescriptor.NoLink;
    public int High;
    public int Batch;
    public long Allocs;
    public long Frees;
#pragma warning disable CS0169, IDE0051 // padding: keep neighbouring slots on separate cache lines
    private readonly long _pad0, _pad1, _pad2, _pad3, _pad4;
#pragma warning restore CS0169, IDE0051

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Enter() => Lock.Enter("the pcp lock");

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Exit()
    {
        LockAssert.PcpLockHeld(this);
        Lock.Exit();
    }

#if DEBUG
    /// <summary>Debug only: whether this thread holds the spin word.</summary>
    public bool IsHeldByCurrentThread => Lock.IsHeldByCurrentThread;
#endif
}

/// <summary>One zone of one node: free lists, counters, watermarks, per-CPU caches.</summary>
internal sealed class Zone
{
    public const int MigrateTypeCount = 3;

    public Zone(int node, ZoneType type, int maxOrder, int pcpSlots)
    {
        Node = node;
        Type = type;
        MaxOrder = maxOrder;
        FreeHead = new uint[(maxOrder + 1) * MigrateTypeCount];
        Array.Fill(FreeHead, PageDescriptor.NoLink);
        NrFree = new long[(maxOrder + 1) * MigrateTypeCount];
        Pcp = new PerCpuPages[pcpSlots];
        for (int i = 0; i < pcpSlots; i++)
            Pcp[i] = new PerCpuPages();
    }

    /// <summary>Immutable: the node.</summary>
    public int Node { get; }

    /// <summary>Immutable: NORMAL or MOVABLE.</summary>
    public ZoneType Type { get; }

    /// <summary>Immutable: the largest buddy order here (10, or less when blocks are smaller than 4 MiB).</summary>
    public int MaxOrder { get; }

    /// <summary>The zone lock: protects the free lists, NrFree, FreePages, IsolatedFreePages and the counters below.</summary>
    public readonly Lock Lock = new();

    /// <summary>Free list heads, indexed [order * MigrateTypeCount + migratetype]. Protected by Lock.</summary>
    public readonly uint[] FreeHead;

    /// <summary>Free blocks on each list, same index. Protected by Lock.</summary>
    public readonly long[] NrFree;

    /// <summary>Per-CPU caches. Each protected by its own spin word.</summary>
    public readonly PerCpuPages[] Pcp;

    /// <summary>Pages given to the allocator (NORMAL / MOVABLE memory online here). Protected by Lock.</summary>
    public long ManagedPages;

    /// <summary>Lowest and one past the highest pfn of the zone's blocks. Protected by Lock.</summary>
    public long StartPfn = long.MaxValue, EndPfn;

    /// <summary>Free pages in the buddy lists that can be allocated (NR_FREE_PAGES). Protected by Lock; read racily.</summary>
    public long FreePages;

    /// <summary>
    /// Free frames of sections not initialised yet (a subset of FreePages; always whole sections, which
    /// are max-order blocks of MOVABLE pageblocks). Protected by Lock; read racily by the watermark check.
    /// </summary>
    public long DeferredPages;

    /// <summary>The next section to initialise is the highest below this one that belongs to the zone and
    /// is not initialised (sections initialised out of turn, by isolation, are skipped). Protected by Lock.</summary>
    public long DeferredCursor;

    /// <summary>Free pages on MIGRATE_ISOLATE lists: free but never handed out. Protected by Lock.</summary>
    public long IsolatedFreePages;

    /// <summary>Allocations and frees that went straight to the buddy lists. Protected by Lock.</summary>
    public long BuddyAllocs, BuddyFrees;

    /// <summary>Allocation attempts that found this zone below its watermark or empty. Atomic.</summary>
    public long AllocFailures;

    // Compaction's per-zone state (Linux's compact_cached_*, compact_considered / defer_shift /
    // order_failed, compact_blockskip_flush). Written racily, as Linux's, by the compaction runs on the
    // zone (each under the hotplug lock's read side, which several share), the direct-compaction retry of
    // an allocation and the deferral check: a lost update costs one extra or one skipped attempt, or a
    // scanner starting from a slightly older position; read racily.

    /// <summary>compact_cached_migrate_pfn[async, sync]: where the migrate scanner goes on. Racy.</summary>
    public readonly long[] CompactCachedMigratePfn = new long[2];

    /// <summary>compact_cached_free_pfn: where the free scanner goes on (a pageblock start). Racy.</summary>
    public long CompactCachedFreePfn;

    /// <summary>compact_considered: requests skipped since the last deferral. Racy.</summary>
    public int CompactConsidered;

    /// <summary>compact_defer_shift: 2^this requests are skipped after a failure (0 to 6). Racy.</summary>
    public int CompactDeferShift;

    /// <summary>compact_order_failed: the lowest order compaction failed for (orders below it are not deferred). Racy.</summary>
    public int CompactOrderFailed;

    /// <summary>compact_blockskip_flush: a direct compaction's scanners met; kcompactd clears the skip hints before it sleeps. Racy.</summary>
    public bool CompactBlockskipFlush;

    /// <summary>Thresholds in pages. Set once at boot, then immutable.</summary>
    public Watermarks Watermarks;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static int ListIndex(int order, MigrateType mt) => order * MigrateTypeCount + (int)mt;

    /// <summary>Frames cached on the pcp lists (racy sum; exact when the machine is quiet).</summary>
    public long PcpPages
    {
        get
        {
            long sum = 0;
            foreach (PerCpuPages pcp in Pcp)
                sum += Volatile.Read(ref pcp.Count);
            return sum;
        }
    }

    public override string ToString() => $"node {Node} {Type}";
}
