using Vmm.Native;

namespace Vmm;

/// <summary>
/// The shape of a <see cref="Machine"/>. The defaults make a laptop-friendly machine: 2 NUMA nodes of
/// 512 MiB in 128 MiB blocks, half of each node's blocks in ZONE_MOVABLE. Nothing is committed until
/// it is used, so a large arena costs only what is touched.
/// </summary>
public sealed record MachineOptions
{
    /// <summary>NUMA nodes (1 to 64). Default 2.</summary>
    public int NodeCount { get; init; } = 2;

    /// <summary>Bytes per node: a whole number of blocks. Default 512 MiB.</summary>
    public long NodeSizeBytes { get; init; } = 512L << 20;

    /// <summary>Bytes per memory block (the hotplug unit): a power of two, at least 2 MiB. Default 128 MiB.</summary>
    public long BlockSizeBytes { get; init; } = 128L << 20;

    /// <summary>
    /// How many of each node's blocks (the highest ones) belong to ZONE_MOVABLE; the rest are
    /// ZONE_NORMAL, which also holds unmovable memory such as page tables. Null: half, rounded down.
    /// </summary>
    public int? MovableBlocksPerNode { get; init; }

    /// <summary>
    /// Linux's min_free_kbytes: memory kept free for emergencies. Null: Linux's formula
    /// (sqrt(16 x lowmem KiB), clamped to 128 KiB .. 256 MiB). 0: no reserve at all (tests that want to
    /// allocate the last frame).
    /// </summary>
    public long? MinFreeKbytes { get; init; }

    /// <summary>Linux's node_distance: [from, to], 10 on the diagonal. Null: 10 local, 20 remote.</summary>
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

    internal Topology CreateTopology()
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(BlockSizeBytes, Topology.MinBlockSizeBytes, nameof(BlockSizeBytes));
        if (NodeSizeBytes < BlockSizeBytes || NodeSizeBytes % BlockSizeBytes != 0)
            throw new ArgumentException($"NodeSizeBytes ({NodeSizeBytes}) must be a positive multiple of BlockSizeBytes ({BlockSizeBytes})");
        return new Topology(NodeCount, checked((int)(NodeSizeBytes / BlockSizeBytes)), BlockSizeBytes);
    }

    internal int EffectiveMovableBlocksPerNode(int blocksPerNode)
    {
        int movable = MovableBlocksPerNode ?? blocksPerNode / 2;
        if (movable < 0 || movable > blocksPerNode)
            throw new ArgumentException($"MovableBlocksPerNode ({movable}) must be 0 to {blocksPerNode}");
        return movable;
    }

    internal long EffectiveMinFreeKbytes(long normalPages)
    {
        if (MinFreeKbytes is long set)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(set, nameof(MinFreeKbytes));
            return set;
        }
        long lowmemKb = normalPages * (Topology.PageSize / 1024);
        return Math.Clamp((long)Math.Sqrt(lowmemKb * 16.0), 128, 262144);
    }

    internal int[,] EffectiveNodeDistances(int nodeCount)
    {
        if (NodeDistances is { } given)
        {
            if (given.GetLength(0) != nodeCount || given.GetLength(1) != nodeCount)
                throw new ArgumentException($"NodeDistances must be {nodeCount} x {nodeCount}");
            return (int[,])given.Clone();
        }
        var distance = new int[nodeCount, nodeCount];
        for (int i = 0; i < nodeCount; i++)
            for (int j = 0; j < nodeCount; j++)
                distance[i, j] = i == j ? 10 : 20;
        return distance;
    }
}
