// Compaction.Daemon: kcompactd, one per node (Linux's kcompactd, kcompactd_do_work, wakeup_kcompactd,
// proactive compaction: proactive_compact_node / should_proactive_compact_node).
//
// A failing allocation above order 0 wakes its node's kcompactd with the order (the largest order asked
// since it last ran). Woken, it compacts each zone of the node that is not deferred, does not already
// have a block of the order above the min watermark and is suitable, SYNC_LIGHT with skip hints
// honoured, from the cached positions (and defers or resets the zone as direct compaction does). Every
// 500 ms it also looks at the node's fragmentation score: above the proactiveness's high mark it
// compacts each zone whole until its score is under the low mark (proactive compaction); when a
// proactive run did not lower the score, the next proactive look waits 64 times longer. Before it sleeps
// it resets the skip hints of zones where a direct compaction's scanners met (compact_blockskip_flush).
//
// Threads: with MachineOptions.BackgroundThreads, one thread per node, started with the machine and
// stopped (woken and joined) by Machine.Dispose before it waits for calls in flight, as ksmd is.
// Without, no thread runs: tests call StepKcompactd, which does what one wake-up of the thread does.
//
// Locking: the kcompactd mutex (KcompactdMutex, one for the machine) across a step, above the hotplug
// lock, which the step only tries per zone (a zone whose blocks are changing waits for the next step;
// never waiting there keeps a thread that holds the hotplug lock free to audit). Audit takes the
// mutex so that no daemon run changes memory under it. Wake-ups: the requested order is an atomic max;
// the thread sleeps on an AutoResetEvent.
using Vmm.Memory;

namespace Vmm;

public sealed partial class Compaction
{
    /// <summary>HZ / 2: kcompactd's proactive look, in milliseconds.</summary>
    internal const int ProactiveIntervalMs = 500;

    private readonly Kcompactd[] _daemons;
    private readonly object _kcompactdMutex = new();
    private volatile bool _stopping;

    /// <summary>kcompactd's mutex: held across a daemon step; Audit takes it too. Above the hotplug lock.</summary>
    internal object KcompactdMutex => _kcompactdMutex;

    /// <summary>One node's daemon (pgdat's kcompactd fields).</summary>
    private sealed class Kcompactd(int node) : IDisposable
    {
        public int Node { get; } = node;

        /// <summary>kcompactd_max_order: the largest order asked since the last run (0: no request). Atomic max.</summary>
        public int MaxOrder;

        /// <summary>Proactive looks to skip after a proactive run that did not lower the score.</summary>
        public int ProactiveDefer;

        public readonly AutoResetEvent Wake = new(false);

        public Thread? Thread;

        /// <summary>Why the thread stopped, or null (an exception in a step stops it instead of the host process).</summary>
        public Exception? Failure;

        public void Dispose() => Wake.Dispose();
    }

    /// <summary>Starts one kcompactd thread per node (with background threads only). Called once by the machine.</summary>
    internal void StartDaemons()
    {
        if (!_machine.Options.BackgroundThreads)
            return;
        foreach (Kcompactd daemon in _daemons)
        {
            daemon.Thread = new Thread(() => DaemonLoop(daemon)) { IsBackground = true, Name = $"kcompactd{daemon.Node}" };
            daemon.Thread.Start();
        }
    }

    /// <summary>Machine.Dispose, first steps: stops every kcompactd (waits for the step it is in).</summary>
    internal void StopDaemons()
    {
        _stopping = true;
        foreach (Kcompactd daemon in _daemons)
            daemon.Wake.Set();
        foreach (Kcompactd daemon in _daemons)
            daemon.Thread?.Join();
    }

    /// <summary>Machine.Dispose, last step: frees the wait handles.</summary>
    internal void Shutdown()
    {
        foreach (Kcompactd daemon in _daemons)
            daemon.Dispose();
    }

    /// <summary>Why node <paramref name="node"/>'s kcompactd stopped on its own, or null.</summary>
    internal Exception? DaemonFailure(int node) => _daemons[node].Failure;

    /// <summary>Whether kcompactd threads run (background threads on, not stopped).</summary>
    internal bool HasDaemonThreads => _daemons.Length > 0 && _daemons[0].Thread is not null && !_stopping;

    private void DaemonLoop(Kcompactd daemon)
    {
        while (!_stopping)
        {
            daemon.Wake.WaitOne(ProactiveIntervalMs);
            if (_stopping)
                break;
            try
            {
                RunDaemonStep(daemon);
            }
            catch (Exception e)
            {
                // An exception escaping a background thread would end the host process: this daemon
                // stops instead and says why (DaemonFailure), as ksmd does.
                daemon.Failure = e;
                return;
            }
        }
    }

    /// <inheritdoc/>
    void PageAllocator.IDirectCompactor.WakeKcompactd(int node, int order) => WakeKcompactd(node, order);

    /// <summary>wakeup_kcompactd: records the order and wakes the node's thread (without threads, the next step sees it).</summary>
    internal void WakeKcompactd(int node, int order)
    {
        if (order <= 0)
            return;
        Kcompactd daemon = _daemons[node];
        int seen = Volatile.Read(ref daemon.MaxOrder);
        while (order > seen)
        {
            int was = Interlocked.CompareExchange(ref daemon.MaxOrder, order, seen);
            if (was == seen)
                break;
            seen = was;
        }
        if (!_stopping && daemon.Thread is not null)
            daemon.Wake.Set();
    }

    private void WakeAllDaemons()
    {
        if (_stopping)
            return;
        foreach (Kcompactd daemon in _daemons)
        {
            if (daemon.Thread is not null)
                daemon.Wake.Set();
        }
    }

    /// <summary>What one kcompactd step did (for tests).</summary>
    internal enum DaemonWork
    {
        /// <summary>Nothing was asked and the score was under the high mark (or proactive compaction is deferred / off).</summary>
        None,
        /// <summary>kcompactd_do_work for a woken order.</summary>
        Requested,
        /// <summary>Proactive compaction of the node.</summary>
        Proactive,
    }

    /// <summary>
    /// One wake-up of node <paramref name="node"/>'s kcompactd, on the calling thread: the requested
    /// order's work if a failing allocation asked for one, else the proactive look. For tests of machines
    /// without background threads.
    /// </summary>
    internal DaemonWork StepKcompactd(int node) => RunDaemonStep(_daemons[node]);

    private DaemonWork RunDaemonStep(Kcompactd daemon)
    {
        lock (_kcompactdMutex)
        {
            DaemonWork work = DaemonWork.None;
            int order = Interlocked.Exchange(ref daemon.MaxOrder, 0);
            if (order > 0)
            {
                Interlocked.Increment(ref _daemonWake);
                KcompactdDoWork(daemon.Node, order);
                work = DaemonWork.Requested;
            }
            else if (daemon.ProactiveDefer > 0)
            {
                daemon.ProactiveDefer--;
            }
            else if (ShouldProactiveCompactNode(daemon.Node))
            {
                int before = FragmentationScoreNode(daemon.Node);
                ProactiveCompactNode(daemon.Node);
                // No progress: look again only after 2^COMPACT_MAX_DEFER_SHIFT intervals.
                if (FragmentationScoreNode(daemon.Node) >= before)
                    daemon.ProactiveDefer = (1 << MaxDeferShift) - 1;
                work = DaemonWork.Proactive;
            }
            ResetIsolationSuitableOfNode(daemon.Node);
            return work;
        }
    }

    /// <summary>kcompactd_do_work: each zone of the node that can use it, for <paramref name="order"/>.</summary>
    private void KcompactdDoWork(int node, int order)
    {
        _machine.Lru.DrainAll();
        foreach (Zone zone in _machine.Allocator.ZonesOfNode(node))
        {
            if (_stopping)
                return;
            if (Volatile.Read(ref zone.ManagedPages) == 0 || CompactionDeferred(zone, order))
                continue;
            if (PageAllocator.ZoneWatermarkOk(zone, order, zone.Watermarks.Min) || !CompactionSuitable(zone, order))
                continue;
            if (!_machine.Hotplug.TryGetOnlineMems())
                continue; // blocks are changing: this zone waits for the next wake-up
            CompactResult status;
            try
            {
                status = CompactZoneOrderLocked(zone, order, MigrateType.Movable, MigrateMode.SyncLight, daemon: true);
            }
            finally
            {
                _machine.Hotplug.PutOnlineMems();
            }
            if (status == CompactResult.Success)
                CompactionDeferReset(zone, order, allocSuccess: false);
            else if (status == CompactResult.Complete)
                DeferCompaction(zone, order);
        }
    }

    /// <summary>should_proactive_compact_node: proactiveness on and the node's score above the high mark.</summary>
    private bool ShouldProactiveCompactNode(int node) =>
        Proactiveness != 0 && FragmentationScoreNode(node) > FragmentationScoreWmark(low: false);

    /// <summary>proactive_compact_node: each zone whole, SYNC_LIGHT, hints honoured, until its score is under the low mark.</summary>
    private void ProactiveCompactNode(int node)
    {
        _machine.Lru.DrainAll();
        _machine.Tlb.Flush();
        foreach (Zone zone in _machine.Allocator.ZonesOfNode(node))
        {
            if (_stopping)
                return;
            if (Volatile.Read(ref zone.ManagedPages) == 0 || !_machine.Hotplug.TryGetOnlineMems())
                continue;
            try
            {
                CompactWholeZoneLocked(zone, MigrateMode.SyncLight, ignoreSkipHint: false, proactive: true, daemon: true);
            }
            finally
            {
                _machine.Hotplug.PutOnlineMems();
            }
        }
    }

    /// <summary>reset_isolation_suitable (kswapd's, before sleeping): zones whose direct compaction's scanners met get their hints cleared.</summary>
    private void ResetIsolationSuitableOfNode(int node)
    {
        foreach (Zone zone in _machine.Allocator.ZonesOfNode(node))
        {
            if (!Volatile.Read(ref zone.CompactBlockskipFlush) || !_machine.Hotplug.TryGetOnlineMems())
                continue;
            try
            {
                ResetIsolationSuitable(zone);
            }
            finally
            {
                _machine.Hotplug.PutOnlineMems();
            }
        }
    }
}
