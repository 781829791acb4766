// Undoing merges and rebuilding the indexes: run = 2 (unmerge_and_remove_all_rmap_items), the
// teardown of the stable index (remove_all_stable_nodes, seed 004), the knobs that need an empty
// index (merge_across_nodes, max_page_sharing), and the scan-time advisor.
// Locking: the thread mutex; run = 2 takes the mm-list lock for the cursor and each mm's mmap_lock for
// read while it unmerges that mm (madvise(UNMERGEABLE) unmerges in AddressSpace.Ksm.cs, under it for write).
using System.Diagnostics;
using Vmm.Diagnostics;
using Vmm.Mm;

namespace Vmm;

public sealed partial class Ksm
{
    /// <summary>
    /// run = 2: every mergeable VMA of every registered mm is unmerged (its KSM pages replaced by private
    /// copies), every rmap item freed, every stable node torn down, and full_scans reset to 0. Slots
    /// stay registered; an mm that registers meanwhile goes to the list tail, so the pass reaches it.
    /// On ENOMEM the pass stops there (earlier mms are unmerged, later ones untouched).
    /// Preconditions: thread mutex held; run already 2.
    /// </summary>
    private Errno UnmergeAndRemoveAllRmapItems()
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        LockAssert.That(_run == 2, "run already 2");
        lock (_mmListLock)
            _cursorSlot = _head.Next;
        while (true)
        {
            KsmMmSlot slot;
            lock (_mmListLock)
            {
                slot = _cursorSlot;
                if (slot == _head)
                    break;
            }
            AddressSpace mm = slot.Mm;
            Errno error = Errno.None;
            mm.MmapLock.EnterReadLock();
            try
            {
                if (!mm.Exited && !mm.KsmExiting)
                {
                    foreach (Vma vma in mm.Vmas)
                    {
                        if ((vma.Flags & VmaFlags.Mergeable) == 0 || vma.AnonVma is null)
                            continue;
                        error = mm.KsmUnmergeRange(vma, vma.Start, vma.End);
                        if (error != Errno.None)
                            break;
                    }
                }
            }
            finally
            {
                mm.MmapLock.ExitReadLock();
            }
            if (error != Errno.None)
            {
                lock (_mmListLock)
                    _cursorSlot = _head;
                ClearUnstableFlags(); // the pass is abandoned: the next one reuses this seqnr with empty buckets
                return error;
            }
            RemoveTrailingRmapItems(slot, -1);
            lock (_mmListLock)
            {
                _cursorSlot = slot.Next;
                if (mm.Exited || mm.KsmExiting)
                {
                    Unlink(slot);
                    FreeSlotLocked(slot);
                }
            }
        }
        RemoveAllStableNodes();
        Volatile.Write(ref _seqnr, 0);
        _machine.Tlb.Flush(); // the merged pages the copies replaced are free now
        return Errno.None;
    }

    /// <summary>
    /// remove_all_stable_nodes (seed 004): tears down every stable node of the current layout. A node
    /// whose page is gone is removed as stale; one whose page lingers unmapped (its last references are
    /// on their way) is detached from the page and removed. A page still mapped is busy: it stays, and
    /// the result is false. Preconditions: thread mutex held.
    /// </summary>
    private bool RemoveAllStableNodes()
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        bool busy = false;
        foreach (KsmStableNode node in AllStableNodes())
        {
            if (node.Dead)
                continue;
            long kpfn = GetKsmPage(node, KsmLockMode.Lock);
            if (kpfn < 0)
                continue; // stale: already removed
            try
            {
                if (_machine.MemMap.MapCount(kpfn) > 0)
                {
                    busy = true;
                    continue;
                }
                // Still a KSM page, but named by no node: nothing can find or join it any more.
                Volatile.Write(ref _machine.MemMap[kpfn].Mapping, Memory.PageDescriptor.MappingKsm);
                RemoveNodeFromStableTree(node);
            }
            finally
            {
                _machine.PageLock.Unlock(kpfn);
                _machine.PutPage(kpfn);
            }
        }
        return !busy;
    }

    /// <summary>merge_across_nodes: a change needs an empty stable index (EBUSY otherwise).</summary>
    private Errno SetMergeAcrossNodes(bool value)
    {
        lock (_threadMutex)
        {
            WaitWhileOfflining();
            if (value == _mergeAcrossNodes)
                return Errno.None;
            if (_pagesShared != 0 || !RemoveAllStableNodes())
                return Errno.EBUSY;
            // migrate_nodes is part of the index torn down above (its nodes are in the node table).
            if (_migrateNodes.Count != 0)
                throw new VmBugException($"{_migrateNodes.Count} KSM nodes left on migrate_nodes after the stable index was torn down");
            // Items still filed in the old layout's unstable index are cleaned by their flags and seqnr;
            // fresh buckets for the new layout.
            foreach (int[] buckets in _unstableBuckets)
                Array.Fill(buckets, -1);
            ClearUnstableFlags();
            int trees = value ? 1 : _nodeCount;
            _stableTrees = [.. Enumerable.Range(0, trees).Select(_ => new Dictionary<ulong, KsmStableNode>())];
            _unstableBuckets = [.. Enumerable.Range(0, trees).Select(_ => { var b = new int[_unstableMask + 1]; Array.Fill(b, -1); return b; })];
            _mergeAcrossNodes = value;
            return Errno.None;
        }
    }

    /// <summary>max_page_sharing: a change needs an empty stable index (EBUSY otherwise).</summary>
    private Errno SetMaxPageSharing(int value)
    {
        lock (_threadMutex)
        {
            WaitWhileOfflining();
            if (value == _maxPageSharing)
                return Errno.None;
            if (_pagesShared != 0 || !RemoveAllStableNodes())
                return Errno.EBUSY;
            _maxPageSharing = value;
            return Errno.None;
        }
    }

    /// <summary>Drops every item's unstable flag (the buckets were just cleared).</summary>
    private void ClearUnstableFlags()
    {
        lock (_mmListLock)
        {
            for (KsmMmSlot slot = _head.Next; slot != _head; slot = slot.Next)
            {
                for (int h = slot.RmapList; h >= 0; h = _items[h].Next)
                {
                    ref KsmRmapItem item = ref _items[h];
                    if ((item.Address & KsmRmapItem.UnstableFlag) != 0)
                    {
                        item.Address = item.PageAddress;
                        item.HashNext = -1;
                        _pagesUnshared--;
                    }
                }
            }
        }
    }

    // ================================================================================================
    // The scan-time advisor
    // ================================================================================================

    private long _advisorScanTime;   // seconds of the previous full scan
    private long _advisorChange;     // smoothed percent change of the scan time
    private long _advisorCpuTicks;   // ksmd busy ticks at the previous evaluation

    /// <summary>
    /// scan_time_advisor: at the end of a full scan, sets pages_to_scan so that a full scan takes about
    /// advisor_target_scan_time, smoothed by the trend of scan times, within a CPU budget
    /// (advisor_max_cpu, at least 10 %) and advisor_max_pages_to_scan. Integer arithmetic, as Linux's.
    /// </summary>
    private void RunScanTimeAdvisor()
    {
        long scanTime = Math.Max(1, (Stopwatch.GetTimestamp() - _scanStartTicks) / Stopwatch.Frequency);
        long busy = _busy.ElapsedTicks;
        long cpuMs = (busy - _advisorCpuTicks) * 1000 / Stopwatch.Frequency;
        long cpuPercent = Math.Max(1, cpuMs * 100 / (scanTime * 1000));
        long last = _advisorScanTime != 0 ? _advisorScanTime : scanTime;
        long factor = Math.Max(1, (long)_advisorTargetScanTime * 100 / scanTime);
        long change = Math.Max(1, scanTime * 100 / last);
        change = (70 * _advisorChange + 30 * change) / 100;
        long pagesToScan = Volatile.Read(ref _pagesToScan);
        long pages = pagesToScan * 100 / factor;
        pages = pages * change / 100;
        long perOnePercent = Math.Max(1, pagesToScan / cpuPercent);
        pages = Math.Min(pages, perOnePercent * (long)Math.Min(_advisorMaxCpu, int.MaxValue));
        pages = Math.Max(pages, perOnePercent * 10);
        pages = Math.Min(pages, (long)Math.Min(_advisorMaxPagesToScan, uint.MaxValue));
        _advisorChange = change;
        _advisorScanTime = scanTime;
        _advisorCpuTicks = busy;
        Volatile.Write(ref _pagesToScan, (uint)Math.Clamp(pages, 0, uint.MaxValue));
    }
}
