// Machine: the simulated computer. Owns the arena ("physical memory"), the frame descriptors and the
// page allocator; later, the processes and the background mechanisms (ksmd, kswapd, the offliner).
using Vmm.Memory;
using Vmm.Native;

namespace Vmm;

/// <summary>
/// An in-process machine: NUMA nodes of real, unmanaged memory in 4 KiB frames, and the kernel
/// mechanisms that manage them. Dispose it to give all native memory back.
/// </summary>
/// <example>
/// <code>
/// using var machine = new Machine(MachineOptions.Small);
/// long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable, preferredNode: 1);
/// machine.Allocator.FreePages(pfn);
/// </code>
/// </example>
public sealed unsafe class Machine : IDisposable
{
    private readonly MemMap _memMap;
    private int _disposed;

    /// <summary>Builds a machine. Nothing is committed until used.</summary>
    /// <param name="options">its shape; null for the defaults.</param>
    /// <exception cref="ArgumentException">the options are inconsistent.</exception>
    /// <exception cref="ArenaException">the host refused the memory.</exception>
    public Machine(MachineOptions? options = null)
    {
        Options = options ?? new MachineOptions();
        Topology = Options.CreateTopology();
        Arena = new Arena(Topology, Options.ForcePortableArena);
        try
        {
            _memMap = new MemMap(Topology.TotalFrames);
            PageLock = new PageLock(_memMap);
            Allocator = new PageAllocator(Topology, Arena, _memMap, Options);
        }
        catch
        {
            _memMap?.Dispose();
            Arena.Dispose();
            throw;
        }
    }

    /// <summary>The options it was built with.</summary>
    public MachineOptions Options { get; }

    /// <summary>Nodes, blocks, frames and the pfn arithmetic.</summary>
    public Topology Topology { get; }

    /// <summary>The native memory behind the frames.</summary>
    public Arena Arena { get; }

    /// <summary>The buddy allocator.</summary>
    public PageAllocator Allocator { get; }

    internal MemMap MemMap => _memMap;

    internal PageLock PageLock { get; }

    /// <summary>A snapshot of every node's memory (exact when no other thread allocates meanwhile).</summary>
    public MachineStats GetStats()
    {
        ThrowIfDisposed();
        var nodes = new NodeStats[Topology.NodeCount];
        for (int node = 0; node < nodes.Length; node++)
        {
            nodes[node] = new NodeStats(node,
            [
                PageAllocator.GetZoneStats(Allocator.GetZone(node, ZoneType.Normal)),
                PageAllocator.GetZoneStats(Allocator.GetZone(node, ZoneType.Movable)),
            ]);
        }
        return new MachineStats(nodes, Topology.TotalFrames, _memMap.SizeBytes, HostMemory.ReadRssBytes());
    }

    /// <summary>What the descriptor of <paramref name="pfn"/> says.</summary>
    /// <exception cref="ArgumentOutOfRangeException">no such frame.</exception>
    public PageInfo GetPageInfo(long pfn)
    {
        ThrowIfDisposed();
        if (!Topology.IsValidPfn(pfn))
            throw new ArgumentOutOfRangeException(nameof(pfn), pfn, "no such frame");
        ref PageDescriptor page = ref _memMap[pfn];
        var flags = (PageFlags)Volatile.Read(ref page.Flags);
        return new PageInfo(pfn, Topology.NodeOf(pfn), Allocator.ZoneTypeOf(pfn), Allocator.GetPageblockMigratetype(pfn),
            flags, Volatile.Read(ref page.RefCount), Volatile.Read(ref page.MapCount) + 1,
            (flags & PageFlags.Buddy) != 0 ? (int)page.Private : -1, _memMap.CompoundHead(pfn));
    }

    /// <summary>The bytes of one frame. Valid until the machine is disposed; the caller must own the frame.</summary>
    public Span<byte> GetFrameSpan(long pfn)
    {
        ThrowIfDisposed();
        if (!Topology.IsValidPfn(pfn))
            throw new ArgumentOutOfRangeException(nameof(pfn), pfn, "no such frame");
        return new Span<byte>(Arena.FrameAddress(pfn), Topology.PageSize);
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);

    /// <summary>Releases the arena and every descriptor. The machine is unusable afterwards.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        _memMap.Dispose();
        Arena.Dispose();
    }
}
