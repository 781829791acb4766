// Topology: the shape of the simulated hardware.
//
// The arena is cut into NUMA nodes, each node into memory blocks (Linux's memory sections / hotplug
// blocks: the unit that is onlined and offlined), each block into 4 KiB frames. Frames are numbered by
// page frame number (pfn) from 0 at the start of the arena; node n owns one contiguous pfn span, so
// every mapping between pfn, block and node is a shift or a division by a constant.
//
// Public as far as a host needs it (Machine.Topology: the machine's shape and the page size), in
// namespace Vmm like every public type, so that `using Vmm;` is all a host writes; the constructor and
// the pfn arithmetic are the machinery's (internal).
//
// Locking: none; a Topology is immutable once built.
namespace Vmm;

/// <summary>The shape of a machine: nodes made of memory blocks made of 4 KiB frames.</summary>
/// <remarks>Instances are immutable: all members may be used concurrently from multiple threads.</remarks>
public sealed class Topology
{
    /// <summary>log2 of the frame size.</summary>
    public const int PageShift = 12;

    /// <summary>The frame size: 4 KiB.</summary>
    public const int PageSize = 1 << PageShift;

    /// <summary>The smallest block: one pageblock (2 MiB), so that a block never splits a pageblock.</summary>
    public const long MinBlockSizeBytes = 2L << 20;

    private readonly int _frameShiftPerBlock;

    /// <summary>Creates a topology of <paramref name="nodeCount"/> nodes of <paramref name="blocksPerNode"/> blocks.</summary>
    /// <param name="nodeCount">NUMA nodes, 1 to 64.</param>
    /// <param name="blocksPerNode">memory blocks per node, at least 1.</param>
    /// <param name="blockSizeBytes">bytes per block: a power of two, at least 2 MiB.</param>
    /// <exception cref="ArgumentOutOfRangeException">a size is out of range.</exception>
    internal Topology(int nodeCount, int blocksPerNode, long blockSizeBytes)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(nodeCount, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(nodeCount, 64);
        ArgumentOutOfRangeException.ThrowIfLessThan(blocksPerNode, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(blockSizeBytes, MinBlockSizeBytes);
        if ((blockSizeBytes & (blockSizeBytes - 1)) != 0)
            throw new ArgumentOutOfRangeException(nameof(blockSizeBytes), blockSizeBytes, "the block size must be a power of two");
        long total = checked(nodeCount * (long)blocksPerNode * blockSizeBytes);
        if (total >> PageShift > uint.MaxValue - 1)
            throw new ArgumentOutOfRangeException(nameof(blocksPerNode), "the arena has more frames than a 32-bit pfn can name");

        NodeCount = nodeCount;
        BlocksPerNode = blocksPerNode;
        BlockSizeBytes = blockSizeBytes;
        FramesPerBlock = blockSizeBytes >> PageShift;
        _frameShiftPerBlock = System.Numerics.BitOperations.Log2((ulong)FramesPerBlock);
        FramesPerNode = FramesPerBlock * blocksPerNode;
        TotalFrames = FramesPerNode * nodeCount;
        BlockCount = nodeCount * blocksPerNode;
    }

    /// <summary>Number of NUMA nodes.</summary>
    public int NodeCount { get; }

    /// <summary>Memory blocks per node.</summary>
    public int BlocksPerNode { get; }

    /// <summary>Memory blocks in the arena.</summary>
    public int BlockCount { get; }

    /// <summary>Bytes per memory block.</summary>
    public long BlockSizeBytes { get; }

    /// <summary>Frames per memory block.</summary>
    public long FramesPerBlock { get; }

    /// <summary>Frames per node.</summary>
    public long FramesPerNode { get; }

    /// <summary>Frames in the arena; valid pfns are 0 to TotalFrames - 1.</summary>
    public long TotalFrames { get; }

    /// <summary>Bytes in the arena.</summary>
    public long TotalBytes => TotalFrames << PageShift;

    /// <summary>True if <paramref name="pfn"/> names a frame of the arena.</summary>
    internal bool IsValidPfn(long pfn) => (ulong)pfn < (ulong)TotalFrames;

    /// <summary>The node that owns a frame (Linux's pfn_to_nid).</summary>
    internal int NodeOf(long pfn) => (int)(pfn / FramesPerNode);

    /// <summary>The memory block that holds a frame (Linux's pfn_to_section_nr, at block size).</summary>
    internal int BlockOf(long pfn) => (int)(pfn >> _frameShiftPerBlock);

    /// <summary>The node a memory block belongs to.</summary>
    internal int NodeOfBlock(int block) => block / BlocksPerNode;

    /// <summary>The first frame of a memory block.</summary>
    internal long FirstPfnOfBlock(int block) => (long)block << _frameShiftPerBlock;

    /// <summary>The first frame of a node (its node_start_pfn).</summary>
    internal long FirstPfnOfNode(int node) => node * FramesPerNode;

    /// <summary>Byte offset of a frame from the arena's base.</summary>
    internal static long OffsetOf(long pfn) => pfn << PageShift;

    /// <summary>The frame that holds a byte offset from the arena's base.</summary>
    internal static long PfnOfOffset(long offset) => offset >> PageShift;
}
