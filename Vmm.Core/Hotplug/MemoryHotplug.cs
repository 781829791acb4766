// MemoryHotplug: memory blocks as devices, their online / offline state, and the memory notifier chain
// (Linux's drivers/base/memory.c and the state machine of mm/memory_hotplug.c). The offline sequence
// itself is MemoryHotplug.Offline.cs; the allocator's side is Memory/PageAllocator.Hotplug.cs.
//
// A block is online in one zone of its node (NORMAL or MOVABLE), going-offline while it is emptied, or
// offline. Writes of its `state` take Linux's strings (online, online_kernel, online_movable, offline)
// and return Linux's errors: EINVAL for a bad string, for a zone the block cannot take, or for a block
// already in the state asked for (device_online / device_offline report that as EINVAL through sysfs).
// Zones keep Linux's classic layout inside a node, ZONE_NORMAL below ZONE_MOVABLE (boot puts the
// movable blocks at the top of each node): a block may be onlined movable only if no block above it in
// its node is online in NORMAL, and kernel only if no block below it is online in MOVABLE. Why: a zone
// stays one contiguous span, which compaction's two scanners (issue 13) walk from its two ends.
//
// The notifier chain runs callbacks by priority (higher first; equal priorities in registration order),
// with Linux's events and payload. An error from a GOING_ event stops the chain and vetoes the change;
// then every callback hears the CANCEL event (as Linux's memory_notify does). KSM registers its
// callback at construction (Ksm/Ksm.Hotplug.cs).
//
// Locking: the hotplug lock (Linux's device_hotplug_lock and mem_hotplug_lock in one) serialises every
// state change, and is held across the notifier calls: a callback that changes a block's state from
// inside would wait for itself, so that throws InvalidOperationException. It is a SemaphoreSlim so that
// a cancelled token interrupts the wait (EINTR). Lock order: hotplug lock -> ksm_thread_mutex (KSM's
// callback) -> everything migration takes. The chain's list is copied on write (_chainLock); calls
// walk a snapshot.
using System.Runtime.ExceptionServices;
using Vmm.Memory;

namespace Vmm;

/// <summary>
/// The memory blocks of a machine and their hotplug: online, offline, the notifier chain
/// (<see cref="Machine.Hotplug"/>; Linux's /sys/devices/system/memory).
/// </summary>
/// <remarks>This type is thread-safe: state changes are serialised by the machine's hotplug lock.</remarks>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "The hotplug lock lives as long as its machine; a SemaphoreSlim whose wait handle is never asked for holds no native resource.")]
public sealed partial class MemoryHotplug
{
    /// <summary>The most blockers an offline reports (the first ones found, in frame order).</summary>
    public const int MaxBlockersReported = 16;

    [ThreadStatic]
    private static MemoryHotplug? t_changing; // the machine whose hotplug lock this thread holds for a state change

    [ThreadStatic]
    private static Dictionary<MemoryHotplug, int>? t_reads; // machines whose hotplug lock this thread reads (get_online_mems), with the nesting depth

    private readonly Machine _machine;
    // The hotplug lock is a reader-writer lock, as Linux's mem_hotplug_lock (a percpu rwsem) is: a state
    // change (online, offline, add, remove) is the writer, get_online_mems the reader. Writers exclude each
    // other with the semaphore (cancellable while waiting), then announce themselves (_writer) and wait for
    // the readers in progress to leave; readers wait while a writer is announced, so a stream of readers
    // cannot starve an offline. Readers share: compaction's zones, contiguous allocations and memory
    // failure's pfn calls run side by side, and direct compaction does not skip a zone because another
    // compaction is running. _readers and _writer are protected by _readGate (Monitor).
    private readonly SemaphoreSlim _hotplugLock = new(1, 1);
    private readonly object _readGate = new();
    private int _readers;
    private bool _writer;
    private readonly Lock _chainLock = new();
    private Registration[] _chain = [];
    private long _registrations;
    private readonly MemoryBlock[] _blocks;
    private int _offlineMigrateMaxPasses;
    private volatile string _autoOnline = "offline";

    internal MemoryHotplug(Machine machine)
    {
        _machine = machine;
        _blocks = new MemoryBlock[machine.Topology.BlockCount];
        for (int i = 0; i < _blocks.Length; i++)
            _blocks[i] = new MemoryBlock(this, machine, i);
    }

    /// <summary>The memory blocks present now (online or offline; not the hot-add room), by index (phys_index). A snapshot.</summary>
    public IReadOnlyList<MemoryBlock> Blocks =>
        [.. _blocks.Where(b => _machine.Allocator.GetBlockState(b.Index) != MemoryBlockState.Absent)];

    /// <summary>The memory block <paramref name="index"/>.</summary>
    /// <exception cref="ArgumentOutOfRangeException">no such block, or it is not present (hot-add room, or removed).</exception>
    public MemoryBlock GetBlock(int index)
    {
        if ((uint)index >= (uint)_blocks.Length)
            throw new ArgumentOutOfRangeException(nameof(index), index, $"no memory block {index}: the machine has {_blocks.Length}");
        if (_machine.Allocator.GetBlockState(index) == MemoryBlockState.Absent)
            throw new ArgumentOutOfRangeException(nameof(index), index, $"memory block {index} is not present (hot-add room, or removed): AddMemory brings it in");
        return _blocks[index];
    }

    /// <summary>
    /// offline_migrate_max_passes: how many passes over a block an offline makes before it gives up with
    /// EBUSY (each pass migrates what it can and checks whether the block is empty). 0, the default, is
    /// Linux's behaviour: retry until the block is empty or the offline is cancelled.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">a negative value.</exception>
    public int OfflineMigrateMaxPasses
    {
        get => Volatile.Read(ref _offlineMigrateMaxPasses);
        set
        {
            ArgumentOutOfRangeException.ThrowIfNegative(value);
            Volatile.Write(ref _offlineMigrateMaxPasses, value);
        }
    }

    /// <summary>
    /// auto_online_blocks: what happens to a block when it is hot-added: "offline" (the default; it waits
    /// for a write of its state), "online", "online_kernel" or "online_movable".
    /// </summary>
    public string AutoOnlineBlocks => _autoOnline;

    /// <summary>Writes auto_online_blocks (see <see cref="AutoOnlineBlocks"/>).</summary>
    /// <returns><see cref="Errno.None"/>, or EINVAL for any other string.</returns>
    /// <exception cref="ArgumentNullException"><paramref name="value"/> is null.</exception>
    public Errno WriteAutoOnlineBlocks(string value)
    {
        ArgumentNullException.ThrowIfNull(value);
        string trimmed = value.TrimEnd('\n');
        if (trimmed != "offline" && ParseOnline(trimmed) is null)
            return Errno.EINVAL;
        _autoOnline = trimmed;
        return Errno.None;
    }

    // ================================================================================================
    // The notifier chain
    // ================================================================================================

    /// <summary>
    /// register_memory_notifier: <paramref name="callback"/> hears every online and offline of every
    /// block, by <paramref name="priority"/> (higher first). Dispose the result to unregister.
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="callback"/> is null.</exception>
    public IDisposable RegisterNotifier(MemoryNotifier callback, int priority = 0)
    {
        ArgumentNullException.ThrowIfNull(callback);
        var registration = new Registration(this, callback, priority, Interlocked.Increment(ref _registrations));
        lock (_chainLock)
        {
            Registration[] chain = [.. _chain, registration];
            Array.Sort(chain, static (a, b) => a.Priority != b.Priority ? b.Priority.CompareTo(a.Priority) : a.Order.CompareTo(b.Order));
            _chain = chain;
        }
        return registration;
    }

    private void Unregister(Registration registration)
    {
        lock (_chainLock)
            _chain = [.. _chain.Where(r => r != registration)];
    }

    /// <summary>Callbacks registered now (for tests).</summary>
    internal int NotifierCount => Volatile.Read(ref _chain).Length;

    /// <summary>
    /// memory_notify: runs the chain for one event. For a GOING_ event the first error (or exception)
    /// stops it and is returned (an exception is handed back in <paramref name="thrown"/>); for the others
    /// every callback runs, errors are ignored, and the first exception is handed back.
    /// </summary>
    private Errno Notify(MemoryNotifierEvent action, MemoryNotification notification, out ExceptionDispatchInfo? thrown)
    {
        thrown = null;
        bool canVeto = action is MemoryNotifierEvent.GoingOffline or MemoryNotifierEvent.GoingOnline;
        foreach (Registration registration in Volatile.Read(ref _chain))
        {
            if (registration.Removed)
                continue;
            Errno error;
            try
            {
                error = registration.Callback(action, notification);
            }
            catch (Exception e)
            {
                thrown ??= ExceptionDispatchInfo.Capture(e);
                if (canVeto)
                    return Errno.EINVAL;
                continue;
            }
            if (canVeto && error != Errno.None)
                return error;
        }
        return Errno.None;
    }

    private sealed class Registration(MemoryHotplug owner, MemoryNotifier callback, int priority, long order) : IDisposable
    {
        public MemoryNotifier Callback { get; } = callback;
        public int Priority { get; } = priority;
        public long Order { get; } = order;
        public volatile bool Removed;

        public void Dispose()
        {
            if (Removed)
                return;
            Removed = true;
            owner.Unregister(this);
        }
    }

    // ================================================================================================
    // State changes
    // ================================================================================================

    /// <summary>mhp_online_type_from_str: the zone an online string asks for, null for "online" (the default zone), or no match.</summary>
    private static (bool Valid, ZoneType? Zone)? ParseOnline(string value) => value switch
    {
        "online" => (true, null),
        "online_kernel" => (true, ZoneType.Normal),
        "online_movable" => (true, ZoneType.Movable),
        _ => null,
    };

    /// <summary>state_store: one write of a block's state file.</summary>
    internal Errno WriteState(MemoryBlock block, string value)
    {
        ArgumentNullException.ThrowIfNull(value);
        string trimmed = value.TrimEnd('\n');
        if (trimmed == "offline")
            return Offline(block, null, CancellationToken.None).Error;
        if (ParseOnline(trimmed) is not { } online)
            return Errno.EINVAL;
        return Online(block, online.Zone);
    }

    /// <summary>Takes the hotplug lock for one state change (or returns EINTR when cancelled first).</summary>
    private Errno EnterHotplug(CancellationToken cancellationToken)
    {
        if (t_changing == this)
            throw new InvalidOperationException("a memory block's state was changed from inside a memory notifier callback (or progress report) of the same machine: the change in progress holds the hotplug lock");
        if (ReadDepth() > 0)
            throw new InvalidOperationException("a memory block's state was changed by a thread inside get_online_mems of the same machine (it would wait for itself)");
        try
        {
            _hotplugLock.Wait(cancellationToken);
        }
        catch (OperationCanceledException)
        {
            return Errno.EINTR;
        }
        lock (_readGate)
        {
            _writer = true;
            // The readers in progress finish what they do (a compaction pass, a contiguous allocation, a
            // memory-failure call: each bounded) without waiting for this writer, so this wait ends.
            while (_readers > 0)
            {
                if (cancellationToken.IsCancellationRequested)
                {
                    _writer = false;
                    Monitor.PulseAll(_readGate);
                    _hotplugLock.Release();
                    return Errno.EINTR;
                }
                Monitor.Wait(_readGate, 50);
            }
        }
        t_changing = this;
        return Errno.None;
    }

    private void ExitHotplug()
    {
        t_changing = null;
        lock (_readGate)
        {
            _writer = false;
            Monitor.PulseAll(_readGate); // readers waiting for this change
        }
        _hotplugLock.Release();
    }

    /// <summary>
    /// get_online_mems, the hotplug lock's read side: no block changes state until
    /// <see cref="PutOnlineMems"/>; other readers run alongside (memory failure's pfn calls, contiguous
    /// allocations, compaction). Nests on one thread. Must not be called holding a reference to a frame:
    /// an offline in progress may be waiting for that reference to go.
    /// </summary>
    /// <exception cref="InvalidOperationException">this thread is changing a block's state (a notifier callback).</exception>
    internal void GetOnlineMems()
    {
        if (t_changing == this)
            throw new InvalidOperationException("get_online_mems from inside a memory notifier callback (or progress report) of the same machine: the change in progress holds the hotplug lock");
        if (EnterNestedRead())
            return;
        lock (_readGate)
        {
            // Writers first: a reader that comes while a change waits for the readers to leave waits for the change.
            while (_writer)
                Monitor.Wait(_readGate);
            _readers++;
        }
        BeginRead();
    }

    /// <summary>
    /// get_online_mems without waiting, for callers that may hold frame references (direct compaction
    /// from an allocation, kcompactd): false when a state change holds the lock or waits for it (or this
    /// thread is inside one), and the caller does without. On true, <see cref="PutOnlineMems"/> ends it.
    /// </summary>
    internal bool TryGetOnlineMems()
    {
        if (t_changing == this)
            return false;
        if (EnterNestedRead())
            return true;
        lock (_readGate)
        {
            if (_writer)
                return false;
            _readers++;
        }
        BeginRead();
        return true;
    }

    /// <summary>put_online_mems.</summary>
    internal void PutOnlineMems()
    {
        int depth = ReadDepth();
        if (depth == 0)
            throw new VmBugException("put_online_mems without get_online_mems on this thread");
        if (depth > 1)
        {
            t_reads![this] = depth - 1;
            return;
        }
        t_reads!.Remove(this);
        lock (_readGate)
        {
            if (--_readers == 0)
                Monitor.PulseAll(_readGate); // a writer waiting for the readers to leave
        }
    }

    /// <summary>A nested get_online_mems of this thread: counted, never waits (a writer that announced itself
    /// meanwhile is waiting for this thread's outer read, so waiting here would deadlock).</summary>
    private bool EnterNestedRead()
    {
        int depth = ReadDepth();
        if (depth == 0)
            return false;
        t_reads![this] = depth + 1;
        return true;
    }

    private void BeginRead() => (t_reads ??= new Dictionary<MemoryHotplug, int>(ReferenceEqualityComparer.Instance))[this] = 1;

    /// <summary>This thread's nested get_online_mems of this machine (0: none).</summary>
    private int ReadDepth() => t_reads is { } reads && reads.TryGetValue(this, out int depth) ? depth : 0;

    /// <summary>True while this thread holds this machine's hotplug lock, for a change or for reading (get_online_mems).</summary>
    internal bool HoldsOnlineMemsOnThisThread => t_changing == this || ReadDepth() > 0;

    /// <summary>The zones block <paramref name="index"/> may be onlined to now (see the file overview), default first.</summary>
    internal IReadOnlyList<ZoneType> ValidZonesOf(int index)
    {
        PageAllocator allocator = _machine.Allocator;
        if (allocator.ZoneTypeOfBlock(index) is ZoneType current)
            return [current];
        Topology topology = _machine.Topology;
        int node = topology.NodeOfBlock(index);
        int first = node * topology.BlocksPerNode;
        bool normal = true, movable = true;
        for (int b = first; b < first + topology.BlocksPerNode; b++)
        {
            ZoneType? zone = b == index ? null : allocator.ZoneTypeOfBlock(b);
            if (b < index && zone == ZoneType.Movable)
                normal = false;
            if (b > index && zone == ZoneType.Normal)
                movable = false;
        }
        ZoneType last = allocator.LastZoneTypeOfBlock(index);
        var zones = new List<ZoneType>(2);
        if (last == ZoneType.Normal ? normal : movable)
            zones.Add(last);
        ZoneType other = last == ZoneType.Normal ? ZoneType.Movable : ZoneType.Normal;
        if (other == ZoneType.Normal ? normal : movable)
            zones.Add(other);
        return zones;
    }

    /// <summary>
    /// online_pages with its notifier calls: block <paramref name="block"/> goes online in
    /// <paramref name="zone"/> (null: its default zone, the first of valid_zones).
    /// </summary>
    internal Errno Online(MemoryBlock block, ZoneType? zone)
    {
        Errno entered = EnterHotplug(CancellationToken.None);
        if (entered != Errno.None)
            return entered;
        try
        {
            return OnlineLocked(block, zone);
        }
        finally
        {
            ExitHotplug();
        }
    }

    /// <summary><see cref="Online"/>. Preconditions: the hotplug lock held.</summary>
    private Errno OnlineLocked(MemoryBlock block, ZoneType? zone)
    {
        PageAllocator allocator = _machine.Allocator;
        MemoryBlockState state = allocator.GetBlockState(block.Index);
        if (state == MemoryBlockState.Absent)
            return Errno.ENODEV; // removed: the device is gone
        if (state != MemoryBlockState.Offline)
            return Errno.EINVAL; // device_online on an online device: 1, which state_store turns into EINVAL
        IReadOnlyList<ZoneType> valid = ValidZonesOf(block.Index);
        ZoneType target = zone ?? valid[0];
        if (!valid.Contains(target))
            return Errno.EINVAL;
        int node = block.Node;
        var notification = new MemoryNotification(block.StartPfn, block.Frames, allocator.NodeHasOnlineMemory(node) ? -1 : node);
        Errno veto = Notify(MemoryNotifierEvent.GoingOnline, notification, out ExceptionDispatchInfo? thrown);
        if (veto != Errno.None || thrown is not null)
        {
            Notify(MemoryNotifierEvent.CancelOnline, notification, out _);
            thrown?.Throw();
            return veto;
        }
        GiveBackBeforeOnline(block.Index);
        allocator.OnlineBlockTo(block.Index, target);
        Interlocked.Increment(ref _onlines);
        Notify(MemoryNotifierEvent.Online, notification, out thrown);
        thrown?.Throw();
        return Errno.None;
    }

    // ================================================================================================
    // Hot-add and removal
    // ================================================================================================

    /// <summary>
    /// add_memory: brings the lowest absent block of <paramref name="node"/>'s hot-add room
    /// (<see cref="MachineOptions.HotplugBlocksPerNode"/>) into the machine as a new, offline block, then
    /// onlines it if <see cref="AutoOnlineBlocks"/> says so (a failed auto-online leaves it offline, as in Linux).
    /// </summary>
    /// <param name="node">the node the memory belongs to.</param>
    /// <param name="block">the new block, or null on failure.</param>
    /// <returns><see cref="Errno.None"/>, or ENOSPC when the node's room is used up.</returns>
    /// <exception cref="ArgumentOutOfRangeException">no such node.</exception>
    /// <exception cref="InvalidOperationException">called from a memory notifier callback of the same machine.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno AddMemory(int node, out MemoryBlock? block)
    {
        Topology topology = _machine.Topology;
        if ((uint)node >= (uint)topology.NodeCount)
            throw new ArgumentOutOfRangeException(nameof(node), node, $"no node {node}: the machine has {topology.NodeCount}");
        block = null;
        using MachineCall call = _machine.EnterCall();
        Errno entered = EnterHotplug(CancellationToken.None);
        if (entered != Errno.None)
            return entered;
        try
        {
            int first = node * topology.BlocksPerNode;
            for (int b = first; b < first + topology.BlocksPerNode; b++)
            {
                if (!_machine.Allocator.SetPresent(b, present: true))
                    continue;
                block = _blocks[b];
                Interlocked.Increment(ref _added);
                string auto = _autoOnline;
                if (auto != "offline" && ParseOnline(auto) is { } online)
                    _ = OnlineLocked(block, online.Zone);
                return Errno.None;
            }
            return Errno.ENOSPC;
        }
        finally
        {
            ExitHotplug();
        }
    }

    /// <summary>
    /// remove_memory: takes an offline block out of the machine (its device goes; it returns to the
    /// hot-add room, and <see cref="AddMemory"/> may bring it back).
    /// </summary>
    /// <returns><see cref="Errno.None"/>; EBUSY if the block is not offline; ENODEV if it is already removed.</returns>
    /// <exception cref="ArgumentNullException"><paramref name="block"/> is null.</exception>
    /// <exception cref="ArgumentException"><paramref name="block"/> belongs to another machine.</exception>
    /// <exception cref="InvalidOperationException">called from a memory notifier callback of the same machine.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno RemoveMemory(MemoryBlock block)
    {
        ArgumentNullException.ThrowIfNull(block);
        if (block.Index >= _blocks.Length || _blocks[block.Index] != block)
            throw new ArgumentException($"{block} is a block of another machine", nameof(block));
        using MachineCall call = _machine.EnterCall();
        Errno entered = EnterHotplug(CancellationToken.None);
        if (entered != Errno.None)
            return entered;
        try
        {
            MemoryBlockState state = _machine.Allocator.GetBlockState(block.Index);
            if (state == MemoryBlockState.Absent)
                return Errno.ENODEV;
            if (!_machine.Allocator.SetPresent(block.Index, present: false))
                return Errno.EBUSY; // try_remove_memory: a block that is not offline
            Interlocked.Increment(ref _removed);
            return Errno.None;
        }
        finally
        {
            ExitHotplug();
        }
    }

    private long _added, _removed;

    /// <summary>Blocks hot-added since boot.</summary>
    public long AddedCount => Interlocked.Read(ref _added);

    /// <summary>Blocks removed since boot.</summary>
    public long RemovedCount => Interlocked.Read(ref _removed);

    private long _onlines, _offlines;

    /// <summary>Blocks onlined by a state change since boot.</summary>
    public long OnlineCount => Interlocked.Read(ref _onlines);

    /// <summary>Blocks offlined since boot.</summary>
    public long OfflineCount => Interlocked.Read(ref _offlines);
}
