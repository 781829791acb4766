// Machine: the simulated computer. Owns the arena ("physical memory"), the frame descriptors, the
// page allocator and the processes; later, the background mechanisms (ksmd, kswapd, the offliner).
using System.Collections.Concurrent;
using Vmm.Memory;
using Vmm.Mm;
using Vmm.Native;
using Vmm.Rmap;

namespace Vmm;

/// <summary>
/// An in-process machine: NUMA nodes of real, unmanaged memory in 4 KiB frames, and the kernel
/// mechanisms that manage them. Dispose it to give all native memory back.
/// </summary>
/// <example>
/// <code>
/// using var machine = new Machine(MachineOptions.Small);
/// VmProcess process = machine.CreateProcess();
/// ulong va = process.Mmap(1 &lt;&lt; 20);
/// process.Write&lt;long&gt;(va, 42);
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
        FaultInjector = Options.FaultInjection is { } injection ? new FaultInjector(injection) : null;
        Topology = Options.CreateTopology();
        Arena = new Arena(Topology, Options.ForcePortableArena);
        try
        {
            _memMap = new MemMap(Topology.TotalFrames);
            PageLock = new PageLock(_memMap);
            Allocator = new PageAllocator(Topology, Arena, _memMap, Options, FaultInjector);
            Rmap = new RmapWalker(this);
            Ksm = Options.EnableKsm ? new Ksm(this) : null;
        }
        catch
        {
            _memMap?.Dispose();
            Arena.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The fault injector (<see cref="MachineOptions.FaultInjection"/>), or null. Code that asks the host
    /// for memory at run time calls <c>FaultInjector?.ShouldFail(FaultSite.HostCommit)</c> first and,
    /// on true, takes its out-of-memory path.
    /// </summary>
    internal FaultInjector? FaultInjector { get; }

    /// <summary>What fault injection did so far (all zero when the machine was built without it).</summary>
    public FaultInjectionStats GetFaultInjectionStats() => FaultInjector?.GetStats() ?? default;

    /// <summary>The options it was built with.</summary>
    public MachineOptions Options { get; }

    /// <summary>Nodes, blocks, frames and the pfn arithmetic.</summary>
    public Topology Topology { get; }

    /// <summary>The native memory behind the frames. Machinery: hosts use the calls below.</summary>
    internal Arena Arena { get; }

    /// <summary>The buddy allocator. Machinery: hosts use <see cref="ReleaseFreeMemory"/> and <see cref="GetMemoryBlock"/>.</summary>
    internal PageAllocator Allocator { get; }

    /// <summary>
    /// True when the arena is an mmap'd region whose decommitted frames really leave the host's RSS;
    /// false for the portable heap arena (<see cref="MachineOptions.ForcePortableArena"/>), whose decommit only zeroes.
    /// </summary>
    public bool ReturnsMemoryToHost => Arena.ReturnsMemoryToHost;

    /// <summary>
    /// Gives every free block of 2 MiB or more that was not given back yet to the host (Linux's free
    /// page reporting): the host's RSS falls, and the frames read zero when next used.
    /// </summary>
    /// <returns>the bytes given back by this call.</returns>
    public long ReleaseFreeMemory()
    {
        ThrowIfDisposed();
        return Allocator.ReleaseFreeMemory();
    }

    /// <summary>What memory block <paramref name="block"/> (the hotplug unit) holds: its node, zone, frames and free frames.</summary>
    /// <exception cref="ArgumentOutOfRangeException">no such block.</exception>
    public MemoryBlockInfo GetMemoryBlock(int block)
    {
        ThrowIfDisposed();
        ArgumentOutOfRangeException.ThrowIfNegative(block);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(block, Topology.BlockCount);
        return Allocator.GetBlockInfo(block);
    }

    internal MemMap MemMap => _memMap;

    /// <summary>Kernel samepage merging: its knobs, counters and scanner; null when built without it (<see cref="MachineOptions.EnableKsm"/>).</summary>
    public Ksm? Ksm { get; }

    internal PageLock PageLock { get; }

    private long _zeroPagePfn = PageAllocator.NoPfn;

    /// <summary>
    /// The shared zero page (PG_reserved, never freed), mapped read-only wherever private memory is
    /// read before it is written. Allocated on first use, so a machine that never needs it keeps every
    /// frame; NoPfn if no frame could be had.
    /// </summary>
    internal long ZeroPagePfn
    {
        get
        {
            long pfn = Volatile.Read(ref _zeroPagePfn);
            return pfn != PageAllocator.NoPfn ? pfn : AllocateZeroPage();
        }
    }

    private long AllocateZeroPage()
    {
        lock (_deferredLock)
        {
            if (_zeroPagePfn != PageAllocator.NoPfn)
                return _zeroPagePfn;
            // Kernel memory: ZONE_NORMAL first; a machine without one takes a movable frame.
            long pfn = Allocator.AllocPages(0, AllocFlags.NoWatermark);
            if (pfn == PageAllocator.NoPfn)
                pfn = Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoWatermark);
            if (pfn != PageAllocator.NoPfn)
            {
                _memMap.SetFlag(pfn, PageFlags.Reserved);
                Volatile.Write(ref _zeroPagePfn, pfn);
            }
            return pfn;
        }
    }

    /// <summary>The zero page if it exists, without allocating it.</summary>
    internal long ZeroPagePfnIfAllocated => Volatile.Read(ref _zeroPagePfn);

    /// <summary>Objects named by frames' mapping words.</summary>
    internal MappingRegistry Mappings { get; } = new();

    /// <summary>NR_PAGETABLE: page-table frames of every process. Atomic.</summary>
    internal long PageTablePagesTotal;

    /// <summary>Copy-on-write faults that copied a page. Atomic.</summary>
    internal long CowFaults;

    /// <summary>pgmigrate_success: pages moved to a new frame under running threads. Atomic.</summary>
    internal long PagesMigrated;

    /// <summary>The reverse-map walks.</summary>
    internal RmapWalker Rmap { get; }

    private readonly ConcurrentDictionary<int, VmProcess> _processes = new();
    private int _nextPid;
    private readonly Lock _deferredLock = new();
    private List<long> _deferredPuts = [];

    /// <summary>The processes that have not exited.</summary>
    public IReadOnlyCollection<VmProcess> Processes => [.. _processes.Values.OrderBy(p => p.Pid)];

    /// <summary>Creates a process with an empty address space.</summary>
    /// <param name="credentials">who it runs as; null for root.</param>
    /// <param name="homeNode">the node its memory is allocated on first.</param>
    /// <exception cref="ArgumentOutOfRangeException">no such node.</exception>
    public VmProcess CreateProcess(Credentials? credentials = null, int homeNode = 0)
    {
        ThrowIfDisposed();
        if ((uint)homeNode >= (uint)Topology.NodeCount)
            throw new ArgumentOutOfRangeException(nameof(homeNode), homeNode, "no such node");
        var process = new VmProcess(this, Interlocked.Increment(ref _nextPid), credentials ?? Credentials.Root, new AddressSpace(this, homeNode));
        _processes[process.Pid] = process;
        return process;
    }

    /// <summary>The process with <paramref name="pid"/>, or null (ESRCH).</summary>
    public VmProcess? FindProcess(int pid) => _processes.TryGetValue(pid, out VmProcess? p) ? p : null;

    internal VmProcess RegisterFork(VmProcess parent, AddressSpace mm)
    {
        var child = new VmProcess(this, Interlocked.Increment(ref _nextPid), parent.Credentials, mm);
        _processes[child.Pid] = child;
        return child;
    }

    internal void Unregister(VmProcess process) => _processes.TryRemove(process.Pid, out _);

    /// <summary>put_page: drops a reference; frees the frame when it was the last.</summary>
    internal void PutPage(long pfn)
    {
        if (_memMap.PutPageTestZero(pfn))
            Allocator.FreeFrozenPages(pfn, 0);
    }

    /// <summary>
    /// Drops a reference after the next TLB flush: for a frame other threads may still be reading
    /// through translations cached before its PTE changed. Batched: the flush runs once 64 are queued.
    /// </summary>
    internal void DeferPutPage(long pfn) => DeferPutPage(pfn, 64);

    /// <summary>
    /// DeferPutPage with a larger batch, for a caller that flushes often anyway (the KSM scanner flushes
    /// once per merge batch, which releases these too): a flush runs only once <paramref name="flushAt"/>
    /// references are queued.
    /// </summary>
    internal void DeferPutPage(long pfn, int flushAt)
    {
        bool flush;
        lock (_deferredLock)
        {
            _deferredPuts.Add(pfn);
            flush = _deferredPuts.Count >= flushAt;
        }
        if (flush)
            FlushTlb();
    }

    /// <summary>The TLB shootdown, then the release of every deferred reference queued before it.</summary>
    internal void FlushTlb()
    {
        List<long> ready;
        lock (_deferredLock)
        {
            ready = _deferredPuts;
            _deferredPuts = [];
        }
        TlbShootdown.Flush();
        foreach (long pfn in ready)
            PutPage(pfn);
    }

    /// <summary>Frames whose last references wait for a flush.</summary>
    internal int DeferredPutCount
    {
        get
        {
            lock (_deferredLock)
                return _deferredPuts.Count;
        }
    }

    internal ShmemObject CreateShmem()
    {
        var shmem = new ShmemObject(Mappings.NewHandle());
        Mappings.Register(shmem.Handle, shmem);
        return shmem;
    }

    /// <summary>shmem_get_folio: the page at <paramref name="index"/>, created zeroed if absent, with a reference for the caller.</summary>
    internal long ShmemGetPage(ShmemObject shmem, long index, int node)
    {
        lock (shmem.Lock)
        {
            if (shmem.Pages.TryGetValue(index, out long cached))
            {
                _memMap.GetPage(cached);
                return cached;
            }
            long pfn = Allocator.AllocPages(0, AllocFlags.Movable, node);
            if (pfn == PageAllocator.NoPfn)
                return PageAllocator.NoPfn;
            ref PageDescriptor page = ref _memMap[pfn];
            page.Mapping = (ulong)shmem.Handle << 2; // a file mapping: no ANON tag
            page.Index = (ulong)index;
            _memMap.SetFlag(pfn, PageFlags.SwapBacked);
            shmem.Pages[index] = pfn;
            _memMap.GetPage(pfn); // one reference for the page cache, one for the caller
            return pfn;
        }
    }

    /// <summary>The last VMA of a shmem object went away: drop its page cache. Preconditions: shmem.Lock held.</summary>
    internal void ReleaseShmem(ShmemObject shmem)
    {
        Mappings.Unregister(shmem.Handle);
        foreach (long pfn in shmem.Pages.Values)
            DeferPutPage(pfn);
        shmem.Pages.Clear();
    }

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

    /// <summary>
    /// Recounts every mapcount, refcount, rmap link, RSS and page-table counter and every free frame
    /// from the page tables and free lists, and returns each difference (empty when all is well).
    /// Exact only while no other thread changes memory.
    /// </summary>
    public IReadOnlyList<string> Audit()
    {
        ThrowIfDisposed();
        return Diagnostics.Auditor.Run(this);
    }

    /// <summary>Event counters, as /proc/vmstat shows them.</summary>
    public VmStats GetVmStats()
    {
        ThrowIfDisposed();
        return new VmStats(Volatile.Read(ref CowFaults), Volatile.Read(ref PagesMigrated),
            Volatile.Read(ref PageTablePagesTotal), TlbShootdown.Flushes, Ksm?.GetStats().CowKsm ?? 0);
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
    internal Span<byte> GetFrameSpan(long pfn)
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
        Ksm?.Shutdown(); // ksmd stops before the memory it scans goes away
        _memMap.Dispose();
        Arena.Dispose();
    }
}
