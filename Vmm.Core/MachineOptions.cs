namespace Vmm;

/// <summary>
/// The shape of a <see cref="Machine"/>. The defaults make a laptop-friendly machine: 2 NUMA nodes of
/// 512 MiB in 128 MiB blocks, half of each node's blocks in ZONE_MOVABLE. Nothing is committed until
/// it is used (neither the arena nor the frame descriptors), so a large machine costs only what is
/// touched. <see cref="Validate"/> says which settings cannot work; the <see cref="Machine"/>
/// constructor runs it first.
/// </summary>
/// <remarks>
/// Instances are immutable (init-only properties; <c>with</c> makes a changed copy), except the elements of the
/// <see cref="NodeDistances"/> array, which stay the caller's: a machine copies them when it is built,
/// so changing them later reaches only machines built afterwards. One instance may be shared by threads and machines.
/// </remarks>
public sealed record MachineOptions
{
    /// <summary>NUMA nodes (1 to 64). Default 2.</summary>
    public int NodeCount { get; init; } = 2;

    /// <summary>Bytes per node: a whole number of blocks; NodeCount x NodeSizeBytes at most <see cref="MaxTotalBytes"/>. Default 512 MiB.</summary>
    public long NodeSizeBytes { get; init; } = 512L << 20;

    /// <summary>Bytes per memory block (the hotplug unit): a power of two, at least 2 MiB. Default 128 MiB.</summary>
    public long BlockSizeBytes { get; init; } = 128L << 20;

    /// <summary>
    /// How many of each node's blocks (the highest ones) belong to ZONE_MOVABLE; the rest are
    /// ZONE_NORMAL, which also holds unmovable memory such as page tables. 0 to blocks per node minus
    /// one (ZONE_NORMAL keeps at least one block). Null: half, rounded down.
    /// </summary>
    public int? MovableBlocksPerNode { get; init; }

    /// <summary>
    /// Room for memory hot-add: blocks of address space reserved above each node's memory (reserved only:
    /// they cost no host memory), absent at boot, that <see cref="MemoryHotplug.AddMemory"/> brings in.
    /// 0 (the default): no hot-add. NodeCount x (NodeSizeBytes + this many blocks) counts toward
    /// <see cref="MaxTotalBytes"/>.
    /// </summary>
    public int HotplugBlocksPerNode { get; init; }

    /// <summary>
    /// Linux's min_free_kbytes: memory kept free for emergencies. Null: Linux's formula
    /// (sqrt(16 x lowmem KiB), clamped to 128 KiB .. 256 MiB). 0: no reserve at all (tests that want to
    /// allocate the last frame). Less than the machine's ZONE_NORMAL memory, in KiB.
    /// </summary>
    public long? MinFreeKbytes { get; init; }

    /// <summary>
    /// Linux's node_distance: [from, to], NodeCount x NodeCount, <see cref="LocalDistance"/> (10) on the
    /// diagonal and 11 to 255 elsewhere (the ACPI SLIT rules Linux checks); need not be symmetric.
    /// Null: 10 local, 20 remote.
    /// </summary>
    public int[,]? NodeDistances { get; init; }

    /// <summary>
    /// Page poisoning (Linux's page_poison), for tests: every freed frame is filled with
    /// PageAllocator.PoisonByte, and checked when it is allocated again; a frame written while free
    /// (through a stale translation, or after free) throws VmBugException. Costs a fill per free and a
    /// scan per allocation. Default off.
    /// </summary>
    public bool PoisonFreedFrames { get; init; }

    /// <summary>
    /// Build KSM (kernel samepage merging) into the machine: <see cref="Machine.Ksm"/>. Without it (Linux's
    /// CONFIG_KSM=n) madvise(MERGEABLE / UNMERGEABLE) and PR_SET_MEMORY_MERGE are EINVAL. Default on.
    /// </summary>
    public bool EnableKsm { get; init; } = true;

    /// <summary>
    /// Whether the machine runs background threads: ksmd (while KSM's <c>run</c> is 1) and the worker
    /// that gives the frames merging freed back to the host about two seconds after a full scan, and one
    /// kcompactd per node (woken by a failed allocation above order 0, and every 500 ms for proactive
    /// compaction: <see cref="Compaction.Proactiveness"/>); kswapd, still to come, will obey it too. Default true. False ("stepping by hand"):
    /// no thread ever runs inside the machine except the host's own. <c>run</c> = 1 then means merging is
    /// enabled, and the host advances it with <see cref="Ksm.ScanPages"/> and <see cref="Ksm.RunFullScans"/>;
    /// freed frames go back to the host when it calls <see cref="Ksm.WaitForMemoryRelease"/> (or
    /// <see cref="Machine.ReleaseFreeMemory"/>). Knob rules and counters are Linux's either way
    /// (<c>run</c> = 2 unmerges before the write returns, in both modes). For deterministic tests,
    /// single-threaded hosts, and hosts that schedule their own work.
    /// </summary>
    public bool BackgroundThreads { get; init; } = true;

    /// <summary>
    /// Fault injection for tests (Linux's fail_page_alloc): makes chosen frame allocations and host
    /// commits fail as if memory had run out. Null (the default): nothing is injected, at the cost of
    /// one null test per allocation. Counters: <see cref="Machine.GetFaultInjectionStats"/>.
    /// </summary>
    public FaultInjection? FaultInjection { get; init; }

    /// <summary>Use the portable heap arena even on Linux (its decommit cannot lower RSS).</summary>
    public bool ForcePortableArena { get; init; }

    /// <summary>A small machine for tests: 2 nodes of two 2 MiB blocks each, no watermark reserve.</summary>
    public static MachineOptions Small => new()
    {
        NodeCount = 2,
        NodeSizeBytes = 4L << 20,
        BlockSizeBytes = 2L << 20,
        MinFreeKbytes = 0,
    };

    /// <summary>Linux's LOCAL_DISTANCE: a node's distance to itself.</summary>
    public const int LocalDistance = 10;

    /// <summary>The largest distance a SLIT entry can hold (one byte).</summary>
    public const int MaxDistance = 255;

    /// <summary>
    /// The largest machine Vmm builds: 16 TiB less one 2 MiB block, so that every pfn stays below
    /// 2^32 - 1 (a 32-bit pfn link names a frame in the free lists and compound heads; 2^32 - 1 means
    /// "none"). The host may refuse less (overcommit policy, address-space limits); the machine's
    /// constructor then says so, naming <see cref="NodeSizeBytes"/>.
    /// </summary>
    public const long MaxTotalBytes = (1L << 44) - Topology.MinBlockSizeBytes;

    /// <summary>
    /// Checks every rule a machine needs, without building one (the <see cref="Machine"/> constructor
    /// runs it first). Each failure names the option in the message and in
    /// <see cref="ArgumentException.ParamName"/>:
    /// <list type="bullet">
    /// <item><see cref="NodeCount"/> 1 to 64.</item>
    /// <item><see cref="BlockSizeBytes"/> a power of two of at least 2 MiB (one pageblock).</item>
    /// <item><see cref="NodeSizeBytes"/> positive, a whole number of blocks (ArgumentException), and
    /// NodeCount x NodeSizeBytes at most <see cref="MaxTotalBytes"/>.</item>
    /// <item><see cref="MovableBlocksPerNode"/> 0 to blocks per node minus one: ZONE_NORMAL must keep a
    /// block, since page tables and the zero page are unmovable and only live there.</item>
    /// <item><see cref="MinFreeKbytes"/> not negative, and less than the machine's ZONE_NORMAL memory
    /// (the reserve is shared among NORMAL zones; at that size no ordinary allocation could succeed).</item>
    /// <item><see cref="NodeDistances"/> NodeCount x NodeCount, <see cref="LocalDistance"/> on the
    /// diagonal, 11 to <see cref="MaxDistance"/> elsewhere (Linux's SLIT rules; ArgumentException).</item>
    /// </list>
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">a value is out of its range.</exception>
    /// <exception cref="ArgumentException">values are inconsistent with each other (a node that is not a
    /// whole number of blocks, a distance table of the wrong shape or with a wrong entry).</exception>
    public void Validate()
    {
        if (NodeCount is < 1 or > 64)
            throw new ArgumentOutOfRangeException(nameof(NodeCount), NodeCount, $"{nameof(NodeCount)} must be 1 to 64 (NUMA nodes)");
        if (BlockSizeBytes < Topology.MinBlockSizeBytes)
            throw new ArgumentOutOfRangeException(nameof(BlockSizeBytes), BlockSizeBytes,
                $"{nameof(BlockSizeBytes)} must be at least {Topology.MinBlockSizeBytes} bytes (2 MiB, one pageblock)");
        if ((BlockSizeBytes & (BlockSizeBytes - 1)) != 0)
            throw new ArgumentOutOfRangeException(nameof(BlockSizeBytes), BlockSizeBytes, $"{nameof(BlockSizeBytes)} must be a power of two");
        if (NodeSizeBytes <= 0)
            throw new ArgumentOutOfRangeException(nameof(NodeSizeBytes), NodeSizeBytes, $"{nameof(NodeSizeBytes)} must be positive");
        if (NodeSizeBytes % BlockSizeBytes != 0)
            throw new ArgumentException(
                $"{nameof(NodeSizeBytes)} ({NodeSizeBytes}) must be a whole number of blocks of {nameof(BlockSizeBytes)} ({BlockSizeBytes})",
                nameof(NodeSizeBytes));
        if (NodeSizeBytes > MaxTotalBytes / NodeCount)
            throw new ArgumentOutOfRangeException(nameof(NodeSizeBytes), NodeSizeBytes,
                $"{nameof(NodeCount)} x {nameof(NodeSizeBytes)} ({NodeCount} x {NodeSizeBytes}) exceeds {MaxTotalBytes} bytes (16 TiB less 2 MiB: a pfn must fit 32 bits)");

        if (HotplugBlocksPerNode < 0)
            throw new ArgumentOutOfRangeException(nameof(HotplugBlocksPerNode), HotplugBlocksPerNode, $"{nameof(HotplugBlocksPerNode)} must not be negative");
        if ((NodeSizeBytes + HotplugBlocksPerNode * BlockSizeBytes) > MaxTotalBytes / NodeCount)
            throw new ArgumentOutOfRangeException(nameof(HotplugBlocksPerNode), HotplugBlocksPerNode,
                $"{nameof(NodeCount)} x ({nameof(NodeSizeBytes)} + {nameof(HotplugBlocksPerNode)} x {nameof(BlockSizeBytes)}) exceeds {MaxTotalBytes} bytes (16 TiB less 2 MiB: a pfn must fit 32 bits)");

        int blocksPerNode = (int)(NodeSizeBytes / BlockSizeBytes);
        if (MovableBlocksPerNode is int movable && (movable < 0 || movable >= blocksPerNode))
            throw new ArgumentOutOfRangeException(nameof(MovableBlocksPerNode), movable,
                $"{nameof(MovableBlocksPerNode)} must be 0 to {blocksPerNode - 1} (blocks per node minus one): " +
                "ZONE_NORMAL needs a block on every node, since page tables and the zero page cannot live in ZONE_MOVABLE");

        if (MinFreeKbytes is long minFree)
        {
            if (minFree < 0)
                throw new ArgumentOutOfRangeException(nameof(MinFreeKbytes), minFree, $"{nameof(MinFreeKbytes)} must not be negative");
            long normalKb = (long)NodeCount * (blocksPerNode - EffectiveMovableBlocksPerNode(blocksPerNode)) * (BlockSizeBytes / 1024);
            if (minFree >= normalKb)
                throw new ArgumentOutOfRangeException(nameof(MinFreeKbytes), minFree,
                    $"{nameof(MinFreeKbytes)} must be less than the machine's ZONE_NORMAL memory ({normalKb} KiB): the reserve is shared among the NORMAL zones, and no zone can keep free more than it has");
        }

        if (NodeDistances is { } distances)
        {
            if (distances.GetLength(0) != NodeCount || distances.GetLength(1) != NodeCount)
                throw new ArgumentException(
                    $"{nameof(NodeDistances)} is {distances.GetLength(0)} x {distances.GetLength(1)}; it must be {nameof(NodeCount)} x {nameof(NodeCount)} ({NodeCount} x {NodeCount})",
                    nameof(NodeDistances));
            for (int from = 0; from < NodeCount; from++)
            {
                for (int to = 0; to < NodeCount; to++)
                {
                    int d = distances[from, to];
                    if (from == to && d != LocalDistance)
                        throw new ArgumentException(
                            $"{nameof(NodeDistances)}[{from}, {to}] is {d}; a node's distance to itself must be {LocalDistance} (LOCAL_DISTANCE)",
                            nameof(NodeDistances));
                    if (from != to && (d <= LocalDistance || d > MaxDistance))
                        throw new ArgumentException(
                            $"{nameof(NodeDistances)}[{from}, {to}] is {d}; a distance between two nodes must be {LocalDistance + 1} to {MaxDistance} (Linux's SLIT rules: more than LOCAL_DISTANCE, one byte)",
                            nameof(NodeDistances));
                }
            }
        }
    }

    /// <summary>The topology of a validated machine.</summary>
    internal Topology CreateTopology() =>
        new(NodeCount, BootBlocksPerNode + HotplugBlocksPerNode, BlockSizeBytes);

    /// <summary>The blocks of each node present at boot (the node's memory; the hot-add room lies above them).</summary>
    internal int BootBlocksPerNode => (int)(NodeSizeBytes / BlockSizeBytes);

    /// <summary>How many blocks of each node are MOVABLE (validated: 0 to blocks per node minus one).</summary>
    internal int EffectiveMovableBlocksPerNode(int blocksPerNode) => MovableBlocksPerNode ?? blocksPerNode / 2;

    /// <summary>min_free_kbytes: as set (validated), or Linux's formula over the NORMAL pages.</summary>
    internal long EffectiveMinFreeKbytes(long normalPages)
    {
        if (MinFreeKbytes is long set)
            return set;
        long lowmemKb = normalPages * (Topology.PageSize / 1024);
        return Math.Clamp((long)Math.Sqrt(lowmemKb * 16.0), 128, 262144);
    }

    /// <summary>node_distance: as set (validated), or 10 local and 20 remote.</summary>
    internal int[,] EffectiveNodeDistances(int nodeCount)
    {
        if (NodeDistances is { } given)
            return (int[,])given.Clone();
        var distance = new int[nodeCount, nodeCount];
        for (int i = 0; i < nodeCount; i++)
            for (int j = 0; j < nodeCount; j++)
                distance[i, j] = i == j ? LocalDistance : 20;
        return distance;
    }
}
