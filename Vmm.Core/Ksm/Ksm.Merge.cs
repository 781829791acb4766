// Merging, in batches (Linux's try_to_merge_one_page, try_to_merge_two_pages, stable_tree_append).
// Locking: under the thread mutex; per merge the mm's mmap_lock for read (another mm's only with a zero
// timeout while page locks are held) and the page lock by trylock only; the PTE changes are
// AddressSpace.Ksm.cs's, under the pte lock.
//
// Linux write-protects, flushes and compares one page at a time; a flush here costs microseconds (the
// process-wide barrier of the access protocol), so the scanner queues up to BatchSize merges and
// commits them together:
//   1. for every queued merge: take the mmap_lock (read), check the VMA is still mergeable, trylock the
//      page (never wait: a busy page is retried next pass), and write-protect its PTE, which refuses a
//      page whose references are not all explained by its mappings (a pin);
//   2. one flush: from here no thread writes any of these frames through an old translation;
//   3. for every merge, in queue order: the full compare that decides, then replace_page, which
//      succeeds only if the PTE is still exactly what step 1 left (any fault, zap or migration in
//      between changed it); then link the item to its stable node;
//   4. unlock, and drop the references. The replaced frames' mapping references are dropped after the
//      next flush (DeferPutPage), which also batches.
// A pair (two pages of the unstable index) turns the scanned page itself into the KSM page, as Linux
// does: no allocation, no copy. Its stable node was indexed when the pair was queued, so later pages
// of the same batch can already join it; if the pair fails, they fail with it and retry next pass.
using System.Runtime.InteropServices;
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Mm;
using Vmm.Native;
using Vmm.Rmap;

namespace Vmm;

public sealed partial class Ksm
{
    /// <summary>Merges per flush. 64 pages make the flush cost a few percent of the merge.</summary>
    internal const int BatchSize = 64;

    private enum MergeKind : byte
    {
        /// <summary>Join an existing KSM page (Node, Kpfn).</summary>
        Stable,

        /// <summary>Merge with an unstable-index partner (TreeItem, TreePfn) into a new KSM page (Node).</summary>
        Pair,

        /// <summary>Replace a zero-filled page by the zero page (use_zero_pages).</summary>
        Zero,
    }

    private struct MergeOp
    {
        public MergeKind Kind;
        public bool Ok;
        public int Item;
        public long Pfn;
        public Pte Orig;
        public AnonVma? AnonVma;
        public int TreeItem;
        public long TreePfn;
        public Pte TreeOrig;
        public AnonVma? TreeAnonVma;
        public KsmStableNode? Node;
        public long Kpfn;
        public bool KpfnReferenced; // false when Kpfn is a pending pair's page: the pair's reference covers it
        public bool IsRetry;        // queued again after the pair it depended on failed
        public bool Retry;          // failed only because its pending node's pair failed: look it up again
        public KsmStableNode? From; // re-homing (Ksm.Migrate.cs): Pfn is this node's KSM page, Item is linked to it until the replace
        public bool Rehome;         // re-homing: Pfn is a moved KSM page (possibly several merges of it in one batch)
    }

    private readonly List<MergeOp> _batch = [];
    private readonly HashSet<long> _queuedPfns = [];
    private readonly HashSet<long> _lockedInBatch = [];
    private readonly HashSet<AddressSpace> _narrowed = [];
    private readonly List<(AddressSpace Mm, FlushMarks Marks)> _narrowedMarks = []; // _narrowed's batched-flush marks, during its flush
    private readonly HashSet<AddressSpace> _replacedIn = [];
    private readonly List<long> _replacedFrames = [];
    private AddressSpace? _lockedMm;
    private long _mergedSinceRelease;

    private void Queue(MergeOp op)
    {
        _queuedPfns.Add(op.Pfn);
        if (op.Kind == MergeKind.Pair)
            _queuedPfns.Add(op.TreePfn);
        _batch.Add(op);
    }

    /// <summary>Commits every queued merge (see the overview). Preconditions: thread mutex held; no mmap_lock held.</summary>
    private unsafe void CommitBatch()
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        LockAssert.That(_lockedMm is null, "no mmap_lock held (KSM's own, _lockedMm, released)");
#if DEBUG
        // Nor one the caller took: step 1 takes the mmap_lock of each queued page's mm, and would
        // deadlock (NoRecursion) or break the lock order on one already held by this thread.
        foreach (MergeOp queued in _batch)
        {
            if (Volatile.Read(ref _slots)[_items[queued.Item].Slot] is { } queuedSlot)
                LockAssert.MmapLockNotHeld(queuedSlot.Mm);
            if (queued.Kind == MergeKind.Pair && Volatile.Read(ref _slots)[_items[queued.TreeItem].Slot] is { } treeSlot)
                LockAssert.MmapLockNotHeld(treeSlot.Mm);
        }
#endif
        if (_batch.Count == 0)
            return;
        Span<MergeOp> ops = CollectionsMarshal.AsSpan(_batch);
        try
        {
            // 1. Lock and write-protect.
            for (int i = 0; i < ops.Length; i++)
            {
                ref MergeOp op = ref ops[i];
                switch (op.Kind)
                {
                    case MergeKind.Zero:
                        op.Ok = Protect(op.Item, op.Pfn, out op.Orig, out op.AnonVma);
                        break;
                    case MergeKind.Stable:
                        op.Ok = !op.Node!.Dead && (!op.Node.Pending || op.Node.PendingOk) && LockShared(op.Kpfn) &&
                                (op.Node.Pending || Volatile.Read(ref _machine.MemMap[op.Kpfn].Mapping) == op.Node.MappingWord) &&
                                Protect(op.Item, op.Pfn, out op.Orig, out op.AnonVma, shared: op.Rehome);
                        break;
                    case MergeKind.Pair:
                        op.Ok = Protect(op.Item, op.Pfn, out op.Orig, out op.AnonVma) &&
                                Protect(op.TreeItem, op.TreePfn, out op.TreeOrig, out op.TreeAnonVma);
                        op.Node!.PendingOk = op.Ok;
                        break;
                }
            }

            // 2. One flush for the whole batch.
            if (_narrowed.Count > 0)
            {
                foreach (AddressSpace mm in _narrowed)
                    _narrowedMarks.Add((mm, mm.ReadFlushMarks())); // before the bump: the flush covers them
                foreach (AddressSpace mm in _narrowed)
                    mm.BumpGeneration();
                _narrowed.Clear();
                _machine.Tlb.Flush();
                foreach ((AddressSpace mm, FlushMarks marks) in _narrowedMarks)
                    mm.FlushedUpTo(marks);
                _narrowedMarks.Clear();
            }

            // 3. Compare and replace, in queue order (a pair before the merges that join its new page).
            for (int i = 0; i < ops.Length; i++)
            {
                ref MergeOp op = ref ops[i];
                switch (op.Kind)
                {
                    case MergeKind.Pair:
                        CommitPair(ref op);
                        break;
                    case MergeKind.Stable:
                        op.Node!.Reserved--;
                        // Linux merges one page at a time: a page that would have joined a pair that then
                        // failed would instead have met the pair's partner. Look it up once more.
                        op.Retry = !op.Ok && op.Node.Dead && !op.IsRetry;
                        // Fork's mappings are linked without a limit (as in Linux), so one may have
                        // filled the page since this merge reserved its place: look it up again then.
                        if (op.Ok && !op.Node.Dead && op.Node.HlistLen >= _maxPageSharing)
                        {
                            op.Ok = false;
                            op.Retry = !op.IsRetry;
                        }
                        if (op.Ok && !op.Node.Dead)
                        {
                            op.Ok = PageOps.PageEquals(Frame(op.Pfn), Frame(op.Kpfn)) && StillLinkedToMovedPage(ref op) &&
                                    Replace(op.Item, op.Pfn, op.Kpfn, op.Orig);
                            if (op.Ok)
                            {
                                // Re-homing: the mapping leaves the moved page's node now that its PTE names
                                // the other page (both pages are locked: Protect locked the moved one).
                                if (op.From is not null)
                                    UnlinkFromNode(op.Item, op.From);
                                Append(op.Item, op.Node!, op.AnonVma!, bypassLimit: false);
                            }
                        }
                        break;
                    case MergeKind.Zero:
                        if (op.Ok)
                            op.Ok = PageOps.IsZero(Frame(op.Pfn)) && Replace(op.Item, op.Pfn, -1, op.Orig);
                        break;
                }
                if (op.Ok)
                    _mergedSinceRelease++;
            }
        }
        finally
        {
            // 4. The replaced frames: their mms' cached translations go stale (one generation bump per
            // mm for the batch), then the mappings' references are dropped after a flush; the next
            // batch's flush releases them (a flush is forced only if many pile up).
            foreach (AddressSpace mm in _replacedIn)
                mm.BumpGeneration();
            _replacedIn.Clear();
            foreach (long pfn in _replacedFrames)
                _machine.Tlb.DeferPutPage(pfn, 1024);
            _replacedFrames.Clear();
            // Unlock and drop references (a page to retry keeps its own).
            UnlockMm();
            foreach (long pfn in _lockedInBatch)
                _machine.PageLock.Unlock(pfn);
            _lockedInBatch.Clear();
            foreach (ref MergeOp op in ops)
            {
                if (op.Retry)
                    _retries.Add((op.Item, op.Pfn));
                else
                    _machine.PutPage(op.Pfn);
                if (op.Kind == MergeKind.Pair)
                    _machine.PutPage(op.TreePfn);
                else if (op.Kind == MergeKind.Stable && op.KpfnReferenced)
                    _machine.PutPage(op.Kpfn);
            }
            _batch.Clear();
            _queuedPfns.Clear();
        }
        if (_retries.Count > 0)
        {
            (int Item, long Pfn)[] retries = [.. _retries];
            _retries.Clear();
            foreach ((int item, long pfn) in retries)
            {
                if (_queuedPfns.Contains(pfn) || !QueueMerge(item, pfn, retry: true))
                    _machine.PutPage(pfn);
            }
            CommitBatch();
        }
    }

    private readonly List<(int Item, long Pfn)> _retries = [];

    /// <summary>
    /// After an exception between queueing and committing: drops every queued merge (its references,
    /// its reservation, a pending node), so that what is left is consistent. Preconditions: thread mutex held.
    /// </summary>
    private void AbortBatch()
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        UnlockMm();
        foreach (long pfn in _lockedInBatch)
            _machine.PageLock.Unlock(pfn);
        _lockedInBatch.Clear();
        foreach (MergeOp op in _batch)
        {
            _machine.PutPage(op.Pfn);
            if (op.Kind == MergeKind.Pair)
            {
                _machine.PutPage(op.TreePfn);
                op.Node!.Reserved -= 2;
                if (op.Node.Pending && !op.Node.Dead)
                {
                    op.Node.Pending = false;
                    UnindexNode(op.Node);
                    FreeNode(op.Node);
                }
            }
            else if (op.Kind == MergeKind.Stable)
            {
                op.Node!.Reserved--;
                if (op.KpfnReferenced)
                    _machine.PutPage(op.Kpfn);
            }
        }
        _batch.Clear();
        _queuedPfns.Clear();
        _narrowed.Clear();
        foreach ((_, long pfn) in _retries)
            _machine.PutPage(pfn);
        _retries.Clear();
    }

    /// <summary>try_to_merge_two_pages: the scanned page becomes the KSM page, the partner's PTE moves to it.</summary>
    private unsafe void CommitPair(ref MergeOp op)
    {
        KsmStableNode node = op.Node!;
        node.Reserved -= 2;
        ref PageDescriptor page = ref _machine.MemMap[op.Pfn];
        if (op.Ok)
        {
            // Only a page this mapping alone maps becomes a KSM page in place. A page still shared copy-on-write
            // with another mm (a fork's parent or child) would turn that mm's mapping into a KSM mapping that no
            // rmap item leads to when the other mm is not in this item's anon_vma (the scanned mm is the child,
            // or the other mm never opted in): rmap_walk_ksm and Audit could not find it. The pair is retried
            // next pass; once the sharing ends (a copy on write, an exit), it merges.
            op.Ok = PageOps.PageEquals(Frame(op.Pfn), Frame(op.TreePfn)) && StillProtected(op.Item, op.Pfn, op.Orig) &&
                    _machine.MemMap.MapCount(op.Pfn) == 1;
            if (op.Ok)
            {
                // The page is locked and read-only everywhere: it becomes a KSM page in place.
                ulong anonMapping = page.Mapping;
                Volatile.Write(ref page.Mapping, node.MappingWord);
                op.Ok = Replace(op.TreeItem, op.TreePfn, op.Pfn, op.TreeOrig);
                if (!op.Ok)
                    Volatile.Write(ref page.Mapping, anonMapping); // nobody linked to it yet: undo
            }
        }
        node.Pending = false;
        if (op.Ok)
        {
            Append(op.TreeItem, node, op.TreeAnonVma!, bypassLimit: false);
            Append(op.Item, node, op.AnonVma!, bypassLimit: false);
            return;
        }
        // Undo the index entry. The partner goes back into the unstable index, as Linux leaves it there.
        KsmStableNode? chain = node.Chain;
        UnindexNode(node);
        FreeNode(node);
        if (chain is { Dead: false, Dups.Count: 1 })
            CollapseChain(chain); // as if the chain had never been made (Linux inserts only after the merge)
        InsertUnstable(op.TreeItem);
    }

    /// <summary>
    /// For a re-homing merge whose item is linked to the moved page's node: the item is still linked to it
    /// and the locked page is still that node's (true for any other merge).
    /// </summary>
    private bool StillLinkedToMovedPage(ref MergeOp op)
    {
        if (op.From is not { } from)
            return true;
        ref KsmRmapItem item = ref _items[op.Item];
        return !from.Dead && (item.Address & KsmRmapItem.StableFlag) != 0 && item.Node == from.Index &&
               Volatile.Read(ref _machine.MemMap[op.Pfn].Mapping) == from.MappingWord;
    }

    /// <summary>The pair's own PTE is still what step 1 left, in a VMA still mergeable in the same domain (mmap_lock kept held).</summary>
    private bool StillProtected(int item, long pfn, Pte orig)
    {
        AddressSpace mm = SlotOf(_items[item].Slot).Mm;
        ulong va = _items[item].PageAddress;
        return LockMm(mm) && mm.FindMergeableVma(va) is { } vma && vma.KsmDomain == _items[item].Domain && mm.KsmPteIs(va, orig);
    }

    /// <summary>Step 1 for one page. Returns false (merge skipped) if anything is not as expected.</summary>
    /// <remarks><paramref name="shared"/>: the page is a moved KSM page, which several merges of one batch may
    /// each take a mapping from (re-homing): it is locked once for the batch, as LockShared does.</remarks>
    private bool Protect(int item, long pfn, out Pte orig, out AnonVma? anonVma, bool shared = false)
    {
        orig = Pte.None;
        anonVma = null;
        AddressSpace mm = SlotOf(_items[item].Slot).Mm;
        ulong va = _items[item].PageAddress;
        if (!LockMm(mm))
            return false;
        Vma? vma = mm.FindMergeableVma(va);
        if (vma is null || vma.KsmDomain != _items[item].Domain)
            return false;
        if (shared)
        {
            if (!LockShared(pfn))
                return false;
        }
        else
        {
            if (_lockedInBatch.Contains(pfn) || !_machine.PageLock.TryLock(pfn))
                return false;
            _lockedInBatch.Add(pfn);
        }
        if (!mm.KsmWriteProtect(va, pfn, out orig, out bool changed))
            return false;
        if (changed)
            _narrowed.Add(mm);
        anonVma = vma.AnonVma;
        return true;
    }

    /// <summary>Step 3's PTE switch for one page (kpfn -1: the zero page).</summary>
    private bool Replace(int item, long pfn, long kpfn, Pte orig)
    {
        AddressSpace mm = SlotOf(_items[item].Slot).Mm;
        ulong va = _items[item].PageAddress;
        // The VMA is checked again: an madvise(UNMERGEABLE) between the steps, which holds the mmap_lock
        // for write, either ran before this check (and we back off) or runs after and unmerges us.
        if (!LockMm(mm) || mm.FindMergeableVma(va) is not { } vma || vma.KsmDomain != _items[item].Domain || !mm.KsmReplacePage(va, pfn, kpfn, orig))
            return false;
        _replacedIn.Add(mm);
        _replacedFrames.Add(pfn);
        return true;
    }

    /// <summary>Locks a KSM page for the batch, or finds it already locked by the batch (several merges join one page).</summary>
    private bool LockShared(long pfn)
    {
        if (_lockedInBatch.Contains(pfn))
            return true;
        if (!_machine.PageLock.TryLock(pfn))
            return false;
        _lockedInBatch.Add(pfn);
        return true;
    }

    /// <summary>
    /// Holds one mm's mmap_lock for read across consecutive merges of that mm. While page locks are
    /// held it only tries (the lock order is mmap_lock before page lock): a busy mm skips the merge.
    /// </summary>
    private bool LockMm(AddressSpace mm)
    {
        if (_lockedMm == mm)
            return true;
        UnlockMm();
        if (_lockedInBatch.Count == 0)
            mm.MmapLock.EnterReadLock();
        else if (!mm.MmapLock.TryEnterReadLock(0))
            return false;
        _lockedMm = mm;
        return true;
    }

    private void UnlockMm()
    {
        if (_lockedMm is null)
            return;
        _lockedMm.MmapLock.ExitReadLock();
        _lockedMm = null;
    }

    /// <summary>Merges after which a full scan gives memory back: one pageblock's worth (2 MiB).</summary>
    private const long ReleaseThreshold = 512;

    private readonly Lock _releaseLock = new();
    private Task _release = Task.CompletedTask;
    private bool _releaseAgain;
    private bool _releasePending; // without background threads: a release is due; protected by _releaseLock
    private readonly ManualResetEventSlim _releaseNow = new(false);

    /// <summary>How long freed frames stay committed before they go back to the host (Linux's page_reporting_delay).</summary>
    internal static readonly TimeSpan ReleaseDelay = TimeSpan.FromSeconds(2);

    /// <summary>
    /// Real savings: the frames merging freed go back to the host. Requested at the end of a full scan
    /// once at least a pageblock's worth of pages merged since the last time, and done by a background
    /// worker after <see cref="ReleaseDelay"/>, as Linux defers free page reporting to a delayed
    /// workqueue: the decommit is kernel work (MADV_DONTNEED of every freed frame, about 25 ms per
    /// 256 MiB here) that the scan need not wait for, and a frame reused soon after (a write copying a
    /// merged page) would pay a host page fault had it been given back at once. Every free block is
    /// given back, down to single frames: the pages KSM keeps are scattered (one per 256 merged), so
    /// whole free pageblocks would be rare.
    /// </summary>
    private void ReleaseFreedMemory()
    {
        if (_mergedSinceRelease < ReleaseThreshold)
            return;
        _mergedSinceRelease = 0;
        _machine.Tlb.Flush(); // the replaced frames' last references: they are free from here
        lock (_releaseLock)
        {
            if (!_machine.Options.BackgroundThreads)
            {
                _releasePending = true; // the host gives it back: WaitForMemoryRelease or Machine.ReleaseFreeMemory
                return;
            }
            if (_stopping)
                return; // the machine is being disposed: its memory goes back with the arena
            if (!_release.IsCompleted)
            {
                _releaseAgain = true; // the running worker goes round once more
                return;
            }
            _release = Task.Run(ReleaseWorker);
        }
    }

    private void ReleaseWorker()
    {
        while (true)
        {
            _releaseNow.Wait(ReleaseDelay);
            if (_stopping)
                return;
            _machine.Allocator.DrainAllPages();  // frames cached per CPU join the free lists
            _machine.Allocator.ReleaseFreeMemory(minOrder: 0);
            lock (_releaseLock)
            {
                if (!_releaseAgain)
                {
                    _releaseNow.Reset();
                    return;
                }
                _releaseAgain = false;
            }
        }
    }

    /// <summary>
    /// Gives the memory merging freed so far back to the host now, instead of after the delay, and
    /// waits until it is done. (Without it, the release runs in the background about two seconds after
    /// each full scan that merged at least 2 MiB.) Without background threads
    /// (<see cref="MachineOptions.BackgroundThreads"/> false) nothing is released until this call (or
    /// <see cref="Machine.ReleaseFreeMemory"/>), and it does the release on the calling thread.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void WaitForMemoryRelease()
    {
        using MachineCall call = _machine.EnterCall();
        if (!_machine.Options.BackgroundThreads)
        {
            lock (_releaseLock)
            {
                if (!_releasePending)
                    return;
                _releasePending = false;
            }
            // The worker's work, on the host's thread: it needs no lock of KSM's.
            _machine.Allocator.DrainAllPages();
            _machine.Allocator.ReleaseFreeMemory(minOrder: 0);
            return;
        }
        WaitForReleaseWorker();
    }

    /// <summary>Without background threads: a release is due (for tests).</summary>
    internal bool MemoryReleasePending
    {
        get
        {
            lock (_releaseLock)
                return _releasePending;
        }
    }

    /// <summary>True while a release worker is queued or running (for tests).</summary>
    internal bool ReleaseWorkerPending
    {
        get
        {
            lock (_releaseLock)
                return !_release.IsCompleted;
        }
    }

    /// <summary>Hurries the release worker, if one is pending, and waits for it.</summary>
    private void WaitForReleaseWorker()
    {
        Task release;
        lock (_releaseLock)
        {
            release = _release;
            if (!release.IsCompleted)
                _releaseNow.Set();
        }
        release.Wait();
    }
}
