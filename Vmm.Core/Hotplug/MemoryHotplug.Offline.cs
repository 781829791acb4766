// Memory offline (Linux's offline_pages in mm/memory_hotplug.c, with do_migrate_range and
// scan_movable_pages), and the explanation of what keeps a block (beyond Linux).
//
// The sequence, under the hotplug lock:
//   1. isolate the block's pageblocks (MIGRATE_ISOLATE, MEMORY_OFFLINE mode): from here the allocator
//      hands out nothing in the block, and frames freed there stay there. A page that can never move
//      (a page table or the zero page in ZONE_NORMAL) refuses: EBUSY, nothing changed;
//   2. the block is going-offline; the chain hears MEM_GOING_OFFLINE (a veto undoes everything);
//   3. passes until the block is empty: drain the LRU add batches (lru_add_drain_all), isolate every
//      page on an LRU list in the block (and every non-LRU movable page whose owner lets it go,
//      MigrationEngine.IsolatePage) and migrate it (MR_MEMORY_HOTPLUG, SYNC) to another node (the
//      block's own node only when it is the only node with memory, as Linux does), then test that
//      every frame is free on an ISOLATE list (or retired by memory failure). A pass that moved nothing
//      yields the processor briefly, since what is left is transient (a fault between allocation and
//      the LRU, a reference taken by a call in progress) or held (a pin);
//   4. the free frames leave the allocator, the block its zone; the block is offline; the chain hears
//      MEM_OFFLINE (KSM prunes its stale stable nodes, reading their descriptors); then the block's
//      descriptors go back to the host, and its memory too, in the background (QueueGiveBack).
// Any failure on the way (passes run out: EBUSY; the token cancelled: EINTR; no frame to move a page
// to in a pass that moved nothing: ENOMEM) undoes the isolation, sets the block online again and the
// chain hears MEM_CANCEL_OFFLINE; what did move stays moved (as in Linux), and the result names the
// frames that kept the block (FindBlockers). ENOMEM is Vmm's decision: Linux keeps retrying, but a host
// wants an answer when the rest of the machine is full.
//
// Locking: the hotplug lock for the whole sequence; migration takes its own (page locks, anon_vma, pte
// locks); the explanation takes a reference and tries each page lock (never waits), so it can run
// while everything else keeps running.
using System.Diagnostics;
using System.Runtime.ExceptionServices;
using Vmm.Memory;
using Vmm.Migration;
using Vmm.Mm;
using Vmm.Rmap;

namespace Vmm;

public sealed partial class MemoryHotplug
{
    /// <summary>The offline of <paramref name="block"/> (see the file overview).</summary>
    internal OfflineResult Offline(MemoryBlock block, IProgress<OfflineProgress>? progress, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        Errno entered = EnterHotplug(cancellationToken);
        if (entered != Errno.None)
            return new OfflineResult(entered, [], 0, 0, clock.Elapsed);
        try
        {
            return OfflineLocked(block, progress, clock, cancellationToken);
        }
        finally
        {
            ExitHotplug();
        }
    }

    private OfflineResult OfflineLocked(MemoryBlock block, IProgress<OfflineProgress>? progress, Stopwatch clock, CancellationToken cancellationToken)
    {
        PageAllocator allocator = _machine.Allocator;
        MemoryBlockState state = allocator.GetBlockState(block.Index);
        if (state != MemoryBlockState.Online)
            return new OfflineResult(state == MemoryBlockState.Absent ? Errno.ENODEV : Errno.EINVAL, [], 0, 0, clock.Elapsed);
        long start = block.StartPfn, end = start + block.Frames;

        // 1. Isolate.
        Errno isolated = allocator.IsolatePageRange(start, end, forOffline: true, out long unmovable);
        if (isolated != Errno.None)
            return new OfflineResult(isolated, [ExplainFrame(unmovable, afterPasses: true) ?? Unknown(unmovable)], 0, 0, clock.Elapsed);
        allocator.SetGoingOffline(block.Index, going: true);
        int node = block.Node;
        var notification = new MemoryNotification(start, block.Frames, NodeLosesLastMemory(block) ? node : -1);

        // 2. MEM_GOING_OFFLINE.
        Errno veto = Notify(MemoryNotifierEvent.GoingOffline, notification, out ExceptionDispatchInfo? thrown);
        if (veto != Errno.None || thrown is not null)
        {
            CancelOffline(block, notification);
            thrown?.Throw();
            return new OfflineResult(veto, [new OfflineBlocker(-1, OfflineBlockReason.NotifierVeto, -1, 0, $"a memory notifier vetoed the offline with {veto}")], 0, 0, clock.Elapsed);
        }

        // 3. Passes.
        long moved = 0;
        int pass = 0;
        int maxPasses = OfflineMigrateMaxPasses;
        Errno failure = Errno.None;
        bool completed = false;
        try
        {
            ulong targets = MigrationTargets(node);
            while (true)
            {
                if (cancellationToken.IsCancellationRequested)
                {
                    failure = Errno.EINTR;
                    break;
                }
                pass++;
                // lru_add_drain_all, and the deferred puts of unmapped pages (an extra reference each,
                // which would fail their migration) released by a flush.
                _machine.Lru.DrainAll();
                _machine.Tlb.Flush();
                long movedThisPass = MigrateBlock(start, end, node, targets, out bool outOfMemory);
                moved += movedThisPass;
                if (allocator.TestBlockIsolated(block.Index))
                    break;
                progress?.Report(new OfflineProgress(pass, moved, CountInUse(start, end), block.Frames));
                if (outOfMemory && movedThisPass == 0)
                {
                    failure = Errno.ENOMEM;
                    break;
                }
                if (maxPasses != 0 && pass >= maxPasses)
                {
                    // One last look: what held the block (another mover's isolation, a deferred put)
                    // may have let go since the pass ended.
                    Thread.Sleep(1);
                    _machine.Tlb.Flush();
                    if (!allocator.TestBlockIsolated(block.Index))
                        failure = Errno.EBUSY;
                    break;
                }
                if (movedThisPass == 0)
                    Thread.Sleep(1); // what is left is transient or held: give its owner the processor
            }
            if (failure == Errno.None)
            {
                // 4. Out of the allocator, the zone and the host.
                long poisoned = allocator.OfflineIsolatedBlock(block.Index);
                ForgetPoisoned?.Invoke(poisoned);
                completed = true;
            }
        }
        catch
        {
            // A broken invariant (VmBugException) or a progress callback that threw: the block goes back.
            CancelOffline(block, notification);
            throw;
        }
        if (!completed)
        {
            IReadOnlyList<OfflineBlocker> blockers = failure == Errno.EINTR ? [] : FindBlockers(block, dryRun: false);
            if (blockers.Count == 0 && failure != Errno.EINTR)
                blockers = [new OfflineBlocker(-1, OfflineBlockReason.Busy, -1, 0,
                    $"pages of memory{block.Index} were held by others during the last pass (isolated by another mover, or in transit) and let go since: try again")];
            CancelOffline(block, notification);
            return new OfflineResult(failure, blockers, moved, pass, clock.Elapsed);
        }
        Interlocked.Increment(ref _offlines);
        progress?.Report(new OfflineProgress(pass, moved, 0, block.Frames));
        Notify(MemoryNotifierEvent.Offline, notification, out thrown);
        // After MEM_OFFLINE: KSM's callback reads the descriptors of stale stable nodes in the block.
        allocator.ReleaseOfflineDescriptors(block.Index);
        QueueGiveBack(block.Index);
        thrown?.Throw();
        return new OfflineResult(Errno.None, [], moved, pass, clock.Elapsed);
    }

    /// <summary>
    /// Memory failure's hook: frames retired by it that left the machine with an offlined block (the
    /// HardwareCorrupted count falls by them, as Linux's num_poisoned_pages does).
    /// </summary>
    internal Action<long>? ForgetPoisoned { get; set; }

    /// <summary>failed_removal_isolated: undo the isolation, the block online again, MEM_CANCEL_OFFLINE.</summary>
    private void CancelOffline(MemoryBlock block, MemoryNotification notification)
    {
        _machine.Allocator.UndoIsolatePageRange(block.StartPfn, block.StartPfn + block.Frames);
        _machine.Allocator.SetGoingOffline(block.Index, going: false);
        Notify(MemoryNotifierEvent.CancelOffline, notification, out ExceptionDispatchInfo? thrown);
        thrown?.Throw();
    }

    /// <summary>True if every other block of the block's node is offline (its node loses N_MEMORY).</summary>
    private bool NodeLosesLastMemory(MemoryBlock block)
    {
        Topology topology = _machine.Topology;
        int first = block.Node * topology.BlocksPerNode;
        for (int b = first; b < first + topology.BlocksPerNode; b++)
            if (b != block.Index && _machine.Allocator.IsBlockOnline(b))
                return false;
        return true;
    }

    /// <summary>do_migrate_range's nodemask: every node with online memory but <paramref name="node"/>, or <paramref name="node"/> alone if there is no other.</summary>
    private ulong MigrationTargets(int node)
    {
        ulong mask = 0;
        for (int n = 0; n < _machine.Topology.NodeCount; n++)
            if (n != node && _machine.Allocator.NodeHasOnlineMemory(n))
                mask |= 1UL << n;
        return mask == 0 ? 1UL << node : mask;
    }

    /// <summary>
    /// One pass of scan_movable_pages + do_migrate_range over [start, end): every page on an LRU list is
    /// isolated and migrated, and every non-LRU movable page through its owner (RangeMigration, shared with
    /// alloc_contig_range); what did not move is put back.
    /// </summary>
    /// <returns>Pages moved.</returns>
    private long MigrateBlock(long start, long end, int node, ulong targets, out bool outOfMemory)
    {
        PageAllocator allocator = _machine.Allocator;
        Func<long, long> allocate = _ => allocator.AllocPagesNodemask(0, AllocFlags.Movable | AllocFlags.NoZero, node, targets);
        return RangeMigration.MigrateRange(_machine, start, end, allocate, MigrateReason.MemoryHotplug, CancellationToken.None, out outOfMemory);
    }

    /// <summary>Frames of [start, end) in use (not free, not retired): for progress reports (racy).</summary>
    private long CountInUse(long start, long end)
    {
        MemMap memMap = _machine.MemMap;
        long used = 0;
        for (long pfn = NextNotFree(start, end); pfn < end; pfn = NextNotFree(pfn + 1, end))
        {
            ref PageDescriptor page = ref memMap[pfn];
            if (Volatile.Read(ref page.RefCount) > 0 && (Volatile.Read(ref page.Flags) & (ulong)PageFlags.HWPoison) == 0)
                used++;
        }
        return used;
    }

    /// <summary>The first frame of [<paramref name="pfn"/>, <paramref name="end"/>) that is not known free (RangeMigration.NextNotFree).</summary>
    private long NextNotFree(long pfn, long end) => RangeMigration.NextNotFree(_machine.MemMap, pfn, end);

    // ================================================================================================
    // Giving an offline block's memory back to the host
    // ================================================================================================

    private readonly HashSet<int> _giveBackPending = []; // blocks offline whose memory is still committed; hotplug lock
    private Task _giveBack = Task.CompletedTask;          // the worker; hotplug lock

    /// <summary>
    /// The block's memory goes back to the host (madvise DONTNEED of the whole block). That is the
    /// host's work, not the offline's: Linux's offline ends with the block offline and leaves giving the
    /// memory back to the hypervisor (virtio-mem, a balloon), and here it costs about as much as the
    /// offline's migration itself (a 128 MiB zap, with TLB-shootdown IPIs to every CPU the host process
    /// runs on). So a worker does it just after the offline returns, under the hotplug lock (an online
    /// of the block first does it itself: its frames come back marked zero). Without background
    /// threads (tests that want determinism) it is done on the offline's thread before it returns.
    /// Preconditions: the hotplug lock held; the block offline.
    /// </summary>
    private void QueueGiveBack(int block)
    {
        if (!_machine.Options.BackgroundThreads)
        {
            _machine.Allocator.GiveBackBlockMemory(block);
            return;
        }
        _giveBackPending.Add(block);
        if (_giveBack.IsCompleted)
            _giveBack = Task.Run(GiveBackWorker);
    }

    /// <summary>Gives back, now, what an offline left pending. Preconditions: the hotplug lock held.</summary>
    private void GiveBackPendingLocked()
    {
        foreach (int block in _giveBackPending)
            if (!_machine.Allocator.IsBlockOnline(block))
                _machine.Allocator.GiveBackBlockMemory(block);
        _giveBackPending.Clear();
    }

    private void GiveBackWorker()
    {
        // A call like any host's, so that Dispose waits for it (it touches the arena); after Dispose has
        // begun the memory goes back with the arena anyway.
        if (!_machine.TryEnterCall(out MachineCall call))
            return;
        using (call)
        {
            // As a writer, like every other user of the lock's exclusive side: the block's memory goes
            // back while no reader (compaction, a contiguous allocation) runs, as before the read side was shared.
            EnterHotplug(CancellationToken.None);
            try
            {
                GiveBackPendingLocked();
            }
            finally
            {
                ExitHotplug();
            }
        }
    }

    /// <summary>Called by an online before the block joins a zone: its memory must read zero by then. Preconditions: the hotplug lock held.</summary>
    private void GiveBackBeforeOnline(int block)
    {
        if (_giveBackPending.Remove(block))
            _machine.Allocator.GiveBackBlockMemory(block);
    }

    /// <summary>
    /// Gives the memory of every block offlined so far back to the host now and waits until it is done
    /// (offline hands that to a background worker, so the host's RSS falls just after an offline returns;
    /// without background threads, <see cref="MachineOptions.BackgroundThreads"/> false, the offline does
    /// it itself and this returns at once).
    /// </summary>
    /// <exception cref="InvalidOperationException">called from a memory notifier callback of the same machine.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void WaitForMemoryRelease()
    {
        using MachineCall call = _machine.EnterCall();
        EnterHotplug(CancellationToken.None);
        try
        {
            GiveBackPendingLocked();
        }
        finally
        {
            ExitHotplug();
        }
    }

    /// <summary>Blocks whose memory a worker is still to give back (for tests).</summary>
    internal int GiveBackPendingCount
    {
        get
        {
            _hotplugLock.Wait();
            try
            {
                return _giveBackPending.Count;
            }
            finally
            {
                _hotplugLock.Release();
            }
        }
    }
}
