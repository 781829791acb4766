// KSM's memory notifier callback (Linux's ksm_memory_callback, seed 000 "ksm: memory hotremove migration
// only", and wait_while_offlining).
//
// MEM_GOING_OFFLINE sets KSM_RUN_OFFLINE under the ksm_thread_mutex: from then on ksmd, a step call
// (ScanPages, RunFullScans) and the writes that tear the stable index down (run, merge_across_nodes,
// max_page_sharing) wait, mutex released, until MEM_OFFLINE or MEM_CANCEL_OFFLINE clears it. Migration
// of KSM pages (Ksm.Migrate.cs) needs no mutex, so the offline moves KSM pages like any other, keeping
// their sharing. MEM_OFFLINE then prunes every stable node (regular, chain dup, or on migrate_nodes)
// whose kpfn lies in the removed range: a node left there would name a frame that no longer exists (the
// node of a KSM page freed before migration reached it, whose stale node no lookup had met yet). Modern
// Linux waits on a flag rather than holding the mutex across the offline (seed 000 held it); the effect
// is the same and the offline never holds KSM's mutex while it migrates.
//
// Locking: the callback runs under the hotplug lock and takes the thread mutex briefly (hotplug lock ->
// ksm_thread_mutex). Waiters use Monitor.Wait on the thread mutex, which releases it while they wait.
using Vmm.Diagnostics;

namespace Vmm;

public sealed partial class Ksm
{
    /// <summary>KSM_CALLBACK_PRI: KSM's place on the memory notifier chain.</summary>
    internal const int MemoryCallbackPriority = 100;

    private bool _offlining; // KSM_RUN_OFFLINE; protected by the thread mutex

    /// <summary>KSM's place on the memory notifier chain (tests dispose it to show what the Audit catches without the callback).</summary>
    internal IDisposable MemoryNotifierRegistration { get; }

    /// <summary>True between MEM_GOING_OFFLINE and MEM_OFFLINE / MEM_CANCEL_OFFLINE (for tests).</summary>
    internal bool IsOfflining
    {
        get
        {
            lock (_threadMutex)
                return _offlining;
        }
    }

    /// <summary>ksm_memory_callback.</summary>
    private Errno MemoryCallback(MemoryNotifierEvent action, MemoryNotification notification)
    {
        switch (action)
        {
            case MemoryNotifierEvent.GoingOffline:
                lock (_threadMutex)
                    _offlining = true;
                break;
            case MemoryNotifierEvent.Offline:
                lock (_threadMutex)
                {
                    CheckStableTree(notification.StartPfn, notification.StartPfn + notification.PageCount);
                    _offlining = false;
                    Monitor.PulseAll(_threadMutex);
                }
                break;
            case MemoryNotifierEvent.CancelOffline:
                lock (_threadMutex)
                {
                    _offlining = false;
                    Monitor.PulseAll(_threadMutex);
                }
                break;
        }
        return Errno.None;
    }

    /// <summary>
    /// wait_while_offlining: waits, the thread mutex released meanwhile, until no memory offline is in
    /// progress. Preconditions: the thread mutex held.
    /// </summary>
    private void WaitWhileOfflining()
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        while (_offlining)
            Monitor.Wait(_threadMutex);
    }

    /// <summary>
    /// ksm_check_stable_tree: removes every stable node whose page frame lies in [start, end).
    /// Preconditions: the thread mutex held.
    /// </summary>
    private void CheckStableTree(long startPfn, long endPfn)
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        foreach (KsmStableNode node in AllStableNodes())
        {
            long kpfn = Volatile.Read(ref node.Kpfn);
            if (kpfn >= startPfn && kpfn < endPfn && !node.Dead)
                RemoveNodeFromStableTree(node);
        }
    }
}
