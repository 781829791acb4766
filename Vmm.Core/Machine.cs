// Machine: the simulated computer, and the hub through which the mechanisms reach each other. Owns the
// arena ("physical memory"), the frame descriptors (MemMap), the page lock, the page allocator, the
// reverse map (Rmap), the TLB flusher and its deferred puts (Tlb), the LRU lists (Lru), the mapping-handle registry, KSM
// (with ksmd and its memory-release worker), the shared zero page, the processes, the cpusets and the
// weighted-interleave weights (partial, in Migration/Cpuset.cs and Migration/Mempolicy.cs), the memory
// blocks and their hotplug (Hotplug/MemoryHotplug.cs); later kswapd. Its public calls are the host API of the whole machine (stats, ReleaseFreeMemory,
// GetPageInfo, GetMemoryBlock, Audit); Dispose's order is in MachineCall.cs and docs/architecture.md.
//
// Locking: the process table is a ConcurrentDictionary; the zero page's one-time allocation takes
// _zeroPageLock (readers Volatile.Read its pfn); the cpuset tree and memberships take CpusetLock
// (before any mmap_lock); the machine-wide counters are atomic. Every public call
// opens a MachineCall first. docs/locking.md has the whole order.
using System.Collections.Concurrent;
using System.Collections.Frozen;
using Vmm.Memory;
using Vmm.Migration;
using Vmm.Mm;
using Vmm.Native;
using Vmm.Rmap;

namespace Vmm;

/// <summary>
/// An in-process machine: NUMA nodes of real, unmanaged memory in 4 KiB frames, and the kernel
/// mechanisms that manage them. Dispose it to give all native memory back.
/// </summary>
/// <remarks>
/// This type is thread-safe: all members may be used concurrently from multiple threads (Dispose
/// included, but not from inside a call into the same machine: see below). Lifetime: a machine owns
/// everything made from it: its processes, DedupeStores and their buffers, pins, and its Ksm. Dispose
/// stops the machine's background threads (ksmd, the memory-release worker), waits for the calls other
/// threads are making into the machine to return, and only then gives the native memory back. From the
/// moment Dispose begins, every call on the machine or on any of its objects throws
/// <see cref="ObjectDisposedException"/> naming the Machine, except the Dispose-like members (Dispose of a
/// store, buffer or pin, <see cref="VmProcess.Exit"/>, and Dispose itself), which are no-ops. Dispose
/// must not be called from inside a call into the same machine (it would wait for itself): that throws
/// <see cref="InvalidOperationException"/> and disposes nothing. A span taken from a pin must not
/// outlive the pin; if the machine is disposed while pins are still held, the arena's address range
/// stays mapped, its memory already given back and reading zeros, until the last pin is disposed (a pin
/// never disposed keeps it reserved: address space only), so a stale span never touches unmapped memory.
/// </remarks>
/// <example>
/// <code>
/// using var machine = new Machine(MachineOptions.Small);
/// VmProcess process = machine.CreateProcess();
/// ulong va = process.Mmap(1 &lt;&lt; 20);
/// process.Write&lt;long&gt;(va, 42);
/// </code>
/// </example>
public sealed unsafe partial class Machine : IDisposable
{
    private static long s_lastId;

    private readonly MemMap _memMap;
    private int _disposed;

    /// <summary>
    /// Builds a machine. Nothing is committed until used: the arena and the frame descriptors are
    /// reserved address space, and a memmap section's descriptors are written when its memory is first
    /// allocated, so a machine costs the host what it touches.
    /// </summary>
    /// <param name="options">its shape; null for the defaults.</param>
    /// <exception cref="ArgumentException">an option is out of range or inconsistent, or the host cannot
    /// reserve the address space for the arena or its descriptors (<see cref="ArgumentException.ParamName"/>
    /// names the option; <see cref="MachineOptions.Validate"/> lists the rules). Nothing is left allocated.</exception>
    public Machine(MachineOptions? options = null)
    {
        Id = Interlocked.Increment(ref s_lastId);
        Options = options ?? new MachineOptions();
        Options.Validate();
        FaultInjector = Options.FaultInjection is { } injection ? new FaultInjector(injection) : null;
        Topology = Options.CreateTopology();
        Arena = ReserveOrExplain(() => new Arena(Topology, Options.ForcePortableArena), "arena");
        try
        {
            _memMap = ReserveOrExplain(() => new MemMap(Topology.TotalFrames, MemMap.SectionShiftFor(Topology), Options.ForcePortableArena), "frame descriptors");
            PageLock = new PageLock(_memMap);
            Allocator = new PageAllocator(Topology, Arena, _memMap, Options, FaultInjector);
            Lru = new LruLists(this);
            Rmap = new RmapWalker(this);
            Tlb = new TlbFlusher(this);
            Migration = new MigrationEngine(this);
            Contig = new ContigAlloc(this);
            Hotplug = new MemoryHotplug(this);
            MemoryFailure = new MemoryFailure(this);
            Hotplug.ForgetPoisoned = MemoryFailure.Forget;
            Ksm = Options.EnableKsm ? new Ksm(this) : null;
            MovablePages = new MovablePages(this);
            Balloon = new Balloon(this);
            Compaction = new Compaction(this);
            Allocator.DirectCompactor = Compaction;
            NodesWithMemory = NodeMask.FirstNodes(Topology.NodeCount).Bits;
            _interleaveWeights = CreateDefaultInterleaveWeights();
            RootCpuset = new Cpuset(this, "/", null, NodesWithMemory);
            Compaction.StartDaemons(); // last: kcompactd may run from here on
        }
        catch
        {
            _memMap?.Dispose();
            Arena.Dispose();
            throw;
        }
    }

    /// <summary>A reservation the host refused becomes an ArgumentException naming the size option.</summary>
    private T ReserveOrExplain<T>(Func<T> reserve, string what)
    {
        try
        {
            return reserve();
        }
        catch (ArenaException e)
        {
            // The argument at fault is the option (a host-facing name), not a parameter of this helper.
#pragma warning disable CA2208
            throw new ArgumentException(
                $"the host cannot reserve the {what} of a machine of {Options.NodeCount} x {Options.NodeSizeBytes} bytes " +
                $"(NodeCount x NodeSizeBytes too large for this host: {e.Message})", nameof(MachineOptions.NodeSizeBytes), e);
#pragma warning restore CA2208
        }
    }

    /// <summary>This machine's number among the machines of the host process: what a thread's call marker names (MachineCall).</summary>
    internal long Id { get; }
    /// <summary>
    /// The fault injector (<see cref="MachineOptions.FaultInjection"/>), or null. Code that asks the host
    /// for memory at run time calls <c>FaultInjector?.ShouldFail(FaultSite.HostCommit)</c> first and,
    /// on true, takes its out-of-memory path.
    /// </summary>
    internal FaultInjector? FaultInjector { get; }

    /// <summary>What fault injection did so far (all zero when the machine was built without it).</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public FaultInjectionStats GetFaultInjectionStats()
    {
        using MachineCall call = EnterCall();
        return FaultInjector?.GetStats() ?? default;
    }

    /// <summary>The options it was built with.</summary>
    public MachineOptions Options { get; }

    /// <summary>The machine's shape: nodes, memory blocks, frames, and the page size.</summary>
    public Topology Topology { get; }

    /// <summary>The native memory behind the frames. Machinery: hosts use the calls below.</summary>
    internal Arena Arena { get; }

    /// <summary>The memory blocks and their hotplug: online, offline, the memory notifier chain.</summary>
    public MemoryHotplug Hotplug { get; }

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
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public long ReleaseFreeMemory()
    {
        using MachineCall call = EnterCall();
        return Allocator.ReleaseFreeMemory();
    }

    /// <summary>What memory block <paramref name="block"/> (the hotplug unit) holds: its node, zone, frames and free frames.</summary>
    /// <exception cref="ArgumentOutOfRangeException">no such block.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public MemoryBlockInfo GetMemoryBlock(int block)
    {
        using MachineCall call = EnterCall();
        ArgumentOutOfRangeException.ThrowIfNegative(block);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(block, Topology.BlockCount);
        return Allocator.GetBlockInfo(block);
    }

    internal MemMap MemMap => _memMap;

    /// <summary>Memory compaction: compact_memory, its knobs and counters (kcompactd and direct compaction run by themselves).</summary>
    public Compaction Compaction { get; }

    /// <summary>Kernel samepage merging: its knobs, counters and scanner; null when built without it (<see cref="MachineOptions.EnableKsm"/>).</summary>
    public Ksm? Ksm { get; }

    internal PageLock PageLock { get; }

    private long _zeroPagePfn = PageAllocator.NoPfn;
    private readonly Lock _zeroPageLock = new();

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
        lock (_zeroPageLock)
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

    /// <summary>
    /// Frames for owners of non-LRU movable pages (<see cref="MovableOperations"/>, Linux's
    /// movable_operations): migration, offline and compaction move them by asking their owner.
    /// </summary>
    public MovablePages MovablePages { get; }

    /// <summary>The memory balloon (Linux's virtio-balloon): takes frames from the machine and gives their memory back to the host.</summary>
    public Balloon Balloon { get; }

    /// <summary>Objects named by frames' mapping words.</summary>
    internal MappingRegistry Mappings { get; } = new();

    /// <summary>
    /// The live long-term pins (FOLL_LONGTERM), so that Audit can check that none of their pages lies in
    /// ZONE_MOVABLE. Added by PinnedMemory's constructor, removed by its Dispose; short-term pins are not
    /// listed (they cost nothing here). Thread-safe (a concurrent set: no lock of the tree).
    /// </summary>
    internal ConcurrentDictionary<PinnedMemory, byte> LongtermPins { get; } = new(ReferenceEqualityComparer.Instance);

    /// <summary>NR_PAGETABLE: page-table frames of every process. Atomic.</summary>
    internal long PageTablePagesTotal;

    /// <summary>Copy-on-write faults that copied a page. Atomic.</summary>
    internal long CowFaults;

    /// <summary>The page migration engine (migrate_pages) and its counters.</summary>
    internal MigrationEngine Migration { get; }

    /// <summary>The per-node LRU lists of user pages and their per-CPU add batches (Memory/Lru.cs).</summary>
    internal LruLists Lru { get; }

    /// <summary>The reverse-map walks.</summary>
    internal RmapWalker Rmap { get; }

    /// <summary>The TLB flush and the references deferred until it (DeferPutPage).</summary>
    internal TlbFlusher Tlb { get; }

    private readonly ConcurrentDictionary<int, VmProcess> _processes = new();
    private int _nextPid;

    /// <summary>The processes that have not exited.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public IReadOnlyCollection<VmProcess> Processes
    {
        get
        {
            using MachineCall call = EnterCall();
            return [.. _processes.Values.OrderBy(p => p.Pid)];
        }
    }

    /// <summary>Creates a process with an empty address space.</summary>
    /// <param name="credentials">who it runs as; null for root.</param>
    /// <param name="homeNode">the node its memory is allocated on first.</param>
    /// <exception cref="ArgumentOutOfRangeException">no such node.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public VmProcess CreateProcess(Credentials? credentials = null, int homeNode = 0)
    {
        using MachineCall call = EnterCall();
        if ((uint)homeNode >= (uint)Topology.NodeCount)
            throw new ArgumentOutOfRangeException(nameof(homeNode), homeNode, "no such node");
        var process = new VmProcess(this, Interlocked.Increment(ref _nextPid), credentials ?? Credentials.Root, new AddressSpace(this, homeNode));
        lock (CpusetLock)
            RootCpuset.JoinLocked(process);
        _processes[process.Pid] = process;
        return process;
    }

    /// <summary>The process with <paramref name="pid"/>, or null (ESRCH).</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public VmProcess? FindProcess(int pid)
    {
        using MachineCall call = EnterCall();
        return _processes.TryGetValue(pid, out VmProcess? p) ? p : null;
    }

    internal VmProcess RegisterFork(VmProcess parent, AddressSpace mm)
    {
        var child = new VmProcess(this, Interlocked.Increment(ref _nextPid), parent.Credentials, mm);
        // The child joins its parent's cpuset as it is now (cpuset_fork), after fork released the
        // parent's mmap_lock: the cpuset lock is taken before mmap_locks, never under one.
        lock (CpusetLock)
            parent.CpusetLocked.JoinLocked(child);
        _processes[child.Pid] = child;
        return child;
    }

    internal void Unregister(VmProcess process)
    {
        lock (CpusetLock)
            process.CpusetLocked.LeaveLocked(process);
        _processes.TryRemove(process.Pid, out _);
    }

    /// <summary>
    /// put_page (folio_put): drops a reference to the page that holds <paramref name="pfn"/> (its head,
    /// for a compound page); frees the whole page when it was the last, after taking it off its LRU list
    /// (__page_cache_release). Every put of a user page goes through here, and so does a scanner's put
    /// of a speculative reference, which may be the last one of a compound block its owner freed meanwhile.
    /// </summary>
    internal void PutPage(long pfn)
    {
        // A plain page (every user page today) is one frame; a compound page is freed whole from its head.
        // Read while our reference holds the page: its compound state changes only at allocation and free.
        long head = pfn;
        int order = 0;
        if ((Volatile.Read(ref _memMap[pfn].Flags) & (ulong)(PageFlags.Head | PageFlags.Tail)) != 0)
        {
            head = _memMap.CompoundHead(pfn);
            order = _memMap.CompoundOrder(head);
        }
        if (_memMap.PutPageTestZero(head))
        {
            Lru.PageCacheRelease(head);
            Allocator.FreeFrozenPages(head, order);
        }
    }

    /// <summary>A snapshot of every node's memory (exact when no other thread allocates meanwhile).</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public MachineStats GetStats()
    {
        using MachineCall call = EnterCall();
        var nodes = new NodeStats[Topology.NodeCount];
        for (int node = 0; node < nodes.Length; node++)
        {
            (long inactive, long active, long isolated) = Lru.GetCounts(node);
            nodes[node] = new NodeStats(node,
            [
                PageAllocator.GetZoneStats(Allocator.GetZone(node, ZoneType.Normal)),
                PageAllocator.GetZoneStats(Allocator.GetZone(node, ZoneType.Movable)),
            ])
            {
                InactiveAnonPages = inactive,
                ActiveAnonPages = active,
                IsolatedAnonPages = isolated,
            };
        }
        return new MachineStats(nodes, Topology.TotalFrames, _memMap.CommittedBytes, HostMemory.ReadRssBytes())
        {
            PoisonedPages = MemoryFailure.PoisonedPages,
        };
    }

    /// <summary>
    /// Recounts every mapcount, refcount, rmap link, RSS and page-table counter and every free frame
    /// from the page tables and free lists, and returns each difference (empty when all is well).
    /// Exact only while no other thread changes memory.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public IReadOnlyList<string> Audit()
    {
        using MachineCall call = EnterCall();
        return Diagnostics.Auditor.Run(this);
    }

    /// <summary>Event counters, as /proc/vmstat shows them.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public VmStats GetVmStats()
    {
        using MachineCall call = EnterCall();
        return new VmStats(Volatile.Read(ref CowFaults), Migration.TotalSucceeded,
            Volatile.Read(ref PageTablePagesTotal), TlbShootdown.Flushes, Ksm?.GetStats().CowKsm ?? 0);
    }

    /// <summary>
    /// Page migration counters: pgmigrate_success and pgmigrate_fail, in total and by reason.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public MigrationStats GetMigrationStats()
    {
        using MachineCall call = EnterCall();
        var succeeded = new Dictionary<MigrateReason, long>();
        var failed = new Dictionary<MigrateReason, long>();
        foreach (MigrateReason reason in Enum.GetValues<MigrateReason>())
        {
            succeeded[reason] = Migration.SucceededFor(reason);
            failed[reason] = Migration.FailedFor(reason);
        }
        return new MigrationStats(succeeded.Values.Sum(), failed.Values.Sum(), succeeded.ToFrozenDictionary(), failed.ToFrozenDictionary());
    }

    /// <summary>
    /// The counters <see cref="ReadVmStat"/> knows, by their /proc/vmstat names: nr_free_pages,
    /// nr_page_table_pages, pgmigrate_success, pgmigrate_fail, cow_ksm, nr_tlb_remote_flush (the TLB
    /// shootdowns of this host process), nr_inactive_anon, nr_active_anon, nr_isolated_anon (pages on
    /// the LRU lists of all nodes, and isolated from them; pages still in a per-CPU add batch are on
    /// none), Vmm's own cow_faults (copy-on-write faults that copied a page; Linux has no such line), and
    /// num_poisoned_pages (frames poisoned or retired by memory failure, Linux's counter behind
    /// /proc/meminfo's HardwareCorrupted: <see cref="MachineStats.HardwareCorruptedBytes"/>), and compaction's
    /// compact_migrate_scanned, compact_free_scanned, compact_isolated, compact_stall, compact_fail,
    /// compact_success, compact_daemon_wake, compact_daemon_migrate_scanned and compact_daemon_free_scanned
    /// (<see cref="CompactionStats"/>), and the balloon's balloon_inflate, balloon_deflate and balloon_migrate
    /// (pages, <see cref="Balloon"/>).
    /// </summary>
    public static IReadOnlyList<string> VmStatNames { get; } =
        ["nr_free_pages", "nr_page_table_pages", "pgmigrate_success", "pgmigrate_fail", "cow_ksm", "nr_tlb_remote_flush", "cow_faults",
         "nr_inactive_anon", "nr_active_anon", "nr_isolated_anon", "num_poisoned_pages",
         "balloon_inflate", "balloon_deflate", "balloon_migrate", .. Compaction.VmStatNames];

    /// <summary>
    /// One /proc/vmstat counter by name (see <see cref="VmStatNames"/>). ENOENT (and 0) for a name it
    /// does not know (no such line in /proc/vmstat).
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="name"/> is null.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno ReadVmStat(string name, out long value)
    {
        ArgumentNullException.ThrowIfNull(name);
        using MachineCall call = EnterCall();
        value = 0;
        if (!VmStatNames.Contains(name))
            return Errno.ENOENT;
        VmStats stats = GetVmStats();
        value = name switch
        {
            "nr_free_pages" => GetStats().Nodes.Sum(n => n.Zones.Sum(z => z.FreePages)),
            "nr_page_table_pages" => stats.PageTablePages,
            "pgmigrate_success" => stats.PgMigrateSuccess,
            "pgmigrate_fail" => Migration.TotalFailed,
            "cow_ksm" => stats.CowKsm,
            "nr_tlb_remote_flush" => stats.TlbFlushes,
            "nr_inactive_anon" => GetStats().Nodes.Sum(n => n.InactiveAnonPages),
            "nr_active_anon" => GetStats().Nodes.Sum(n => n.ActiveAnonPages),
            "nr_isolated_anon" => GetStats().Nodes.Sum(n => n.IsolatedAnonPages),
            "num_poisoned_pages" => MemoryFailure.PoisonedPages,
            "balloon_inflate" => Balloon.Inflated,
            "balloon_deflate" => Balloon.Deflated,
            "balloon_migrate" => Balloon.Migrated,
            _ when name.StartsWith("compact_", StringComparison.Ordinal) => Compaction.ReadVmStat(name),
            _ => stats.CowFaults,
        };
        return Errno.None;
    }

    /// <summary>
    /// What the descriptor of <paramref name="pfn"/> says. A frame whose descriptors were never
    /// initialised (its memory never used) is reported as it will be once initialised: free and
    /// known zero (PG_zeroed), the first frame of its section heading a free max-order block
    /// (PG_buddy, PG_reported); nothing is initialised or committed by asking.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">no such frame.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public PageInfo GetPageInfo(long pfn)
    {
        using MachineCall call = EnterCall();
        if (!Topology.IsValidPfn(pfn))
            throw new ArgumentOutOfRangeException(nameof(pfn), pfn, "no such frame");
        if (!Allocator.IsPfnOnline(pfn))
            return new PageInfo(pfn, Topology.NodeOf(pfn), Allocator.ZoneTypeOf(pfn), Allocator.GetPageblockMigratetype(pfn),
                PageFlags.Offline, 0, 0, -1, pfn);
        if (!_memMap.IsInitialised(pfn))
        {
            bool head = (pfn & (_memMap.FramesPerSection - 1)) == 0;
            return new PageInfo(pfn, Topology.NodeOf(pfn), Allocator.ZoneTypeOf(pfn), Allocator.GetPageblockMigratetype(pfn),
                head ? PageFlags.Buddy | PageFlags.Zeroed | PageFlags.Reported : PageFlags.Zeroed,
                0, 0, head ? _memMap.SectionShift : -1, pfn);
        }
        ref PageDescriptor page = ref _memMap[pfn];
        var flags = (PageFlags)Volatile.Read(ref page.Flags);
        // PG_movable lives in the mapping word's tag (PAGE_MAPPING_MOVABLE), never in the flags.
        if ((Volatile.Read(ref page.Mapping) & PageDescriptor.MappingTagMask) == PageDescriptor.MappingMovable)
            flags |= PageFlags.Movable;
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

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(IsDisposed, this);

    /// <summary>True once <see cref="Dispose"/> has begun: every later call throws <see cref="ObjectDisposedException"/>.</summary>
    public bool IsDisposed => Volatile.Read(ref _disposed) != 0;

    /// <summary>
    /// Opens a public call (see MachineCall.cs): from here until the result is disposed, Dispose waits
    /// for this thread. Every public member that touches the machine's memory or structures starts with it.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed (or is being disposed).</exception>
    internal MachineCall EnterCall()
    {
        if (!MachineCall.TryEnter(Id, ref _disposed, out MachineCall call))
            ThrowDisposed();
        return call;
    }

    /// <summary>EnterCall for the members that are no-ops after Dispose (the Dispose-like ones): false once the machine is disposed.</summary>
    internal bool TryEnterCall(out MachineCall call) => MachineCall.TryEnter(Id, ref _disposed, out call);

    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    private void ThrowDisposed() => throw new ObjectDisposedException(nameof(Machine), $"the machine ({this}) was disposed");

    /// <inheritdoc/>
    public override string ToString() => $"machine {Id}";

    /// <summary>
    /// Stops the machine's background threads (ksmd, the memory-release worker), waits for every call
    /// other threads are making into it to return, then releases the arena and every descriptor. Calls
    /// that begin once Dispose has begun throw <see cref="ObjectDisposedException"/>; the Dispose-like
    /// members of the machine's objects (VmProcess.Exit, and Dispose of stores, buffers and pins) are
    /// no-ops. Idempotent. If pins are still held, the arena's address range stays reserved (its memory
    /// given back to the host, reading zero) until the last pin is disposed, so a span
    /// taken from a pin never points at unmapped memory; its contents are gone, though.
    /// </summary>
    /// <exception cref="InvalidOperationException">called from inside a call of this machine (it would wait for itself); nothing is disposed.</exception>
    public void Dispose()
    {
        if (MachineCall.IsInside(Id))
            throw new InvalidOperationException($"{this} cannot be disposed from inside one of its own calls: the disposal would wait for itself");
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        // Read<T> / Write<T> of a translated page run inside one access section and take no marker: a
        // shootdown covers them. Every cached translation of this machine goes stale, and the flush waits
        // for the sections begun before; a later section misses its TLB, and the walk sees the flag and
        // falls back to the marked path, which throws (AddressSpace.TryReadValue). Exited address spaces
        // bumped their generation at teardown and their walks refuse.
        foreach (VmProcess process in _processes.Values)
            process.Mm.BumpGeneration();
        // The flush's process-wide barrier, issued after the flag was set, is also the one the call markers
        // need (MachineCall.cs): a thread that publishes its marker after it sees the flag and throws; one
        // that published before is found by the wait below. Then the machine's own threads stop, and the
        // calls in flight drain.
        TlbShootdown.Flush();
        Ksm?.StopBackgroundWork(); // ksmd and the release worker stop before the memory they use goes away
        Compaction.StopDaemons();   // so do the kcompactd threads
        TlbShootdown.WaitForMachineCalls(Id);
        Ksm?.Shutdown();
        Compaction.Shutdown();
        _memMap.Dispose();
        Arena.Dispose();
    }
}
