// MigrationEngine: moves isolated pages to new frames while the processes that map them keep running
// (Linux's mm/migrate.c: migrate_pages, migrate_pages_batch, migrate_pages_sync, migrate_folio_unmap,
// migrate_folio_move, putback_movable_pages). It is the one home of page migration: move_pages,
// migrate_pages, mbind, cpusets, KSM page migration, hot-remove and AddressSpace.TryReplacePage all
// stand on MigratePages.
//
// Locking: page locks of the old pages and of their new frames (trylock in ASYNC mode and in the batched
// phase; waited for only when a page is migrated alone, so a batch that holds many page locks never
// sleeps on another one); the reverse map takes the anon_vma or shmem lock and the pte locks
// (RmapWalker.cs; for a KSM page, the stable node's items: Ksm.RmapWalk); for shared memory the verify,
// copy and page-cache switch run under the shmem object's lock. No mmap_lock: fork copies PTEs under the pte lock (docs/locking.md, "Fork versus the
// migrator"). Lock order: page lock (old) -> page lock (new) -> anon_vma / shmem lock -> pte lock.
//
// The caller isolates the pages first: each page of `from` holds one reference that the engine owns
// (Lru.Isolate's), dropped when the page has moved; a page that did not move stays on `from` with it.
//
// Freeze, verify, commit, for a batch of up to 512 pages (Linux 6.3's batched migration):
//   1. unmap, for each page: allocate the new frame, lock the old page (trylock in ASYNC mode) and the
//      new frame (fresh: nobody else can hold it), then replace every PTE that maps the old page with
//      a migration entry (RmapWalker.TryToMigrate with an UnmapBatch), without flushing. A thread that
//      faults on an entry sleeps on the page lock. A page still mapped somewhere (a fork raced) is
//      mapped back and retried in the next pass;
//   2. one TLB flush for every mm the batch touched: from here no thread touches an old frame;
//   3. for each page, verify: the only references left are the isolation's (and the page cache's,
//      for shared memory). Anything more is a pin or a racing user: EAGAIN, retried in the next pass
//      with the page still frozen (as Linux does), mapped back to its old frame after the last pass;
//   4. copy the contents and the descriptor's identity (mapping, index, flags) to the new frame;
//   5. commit, the point of no return: the page cache (shared memory) or the stable node (KSM,
//      Ksm.MigratePage) and every migration entry now name the new frame;
//   6. unlock both; every 32 moved pages (and at the end of the move step), the new frames join their LRU
//      lists together and the old ones lose the isolation reference and are freed (FinishMoved: one
//      lru_lock round trip per 32 pages). For MigrateReason.MemoryFailure (soft offline) the old frame
//      keeps one reference instead, which the caller turns into its retirement (migrate_folio_done).
//
// Non-LRU movable pages (movable_operations, MovableOperations.cs): IsolatePage asks the owner under a
// trylocked page lock and sets PG_isolated (isolate_movable_ops_page). Classify sends such a page down a
// path with no rmap work (it is never mapped); the move step asks the owner (MoveMovableOpsPage): None
// moves the owner's tag and reference to the new frame and frees the old one (no LRU add: FinishMoved's
// batching stays for LRU pages), EAGAIN is retried in the next pass, any other answer undoes both frames
// and fails the page for the call. A page its owner freed while isolated (tag gone, PG_isolated set) is
// done, as Linux counts it. PutbackMovablePages hands PG_isolated pages back to their owner
// (putback_movable_ops_page). An owner's exception fails its page and is rethrown once the lists are consistent.
//
// The loop (migrate_pages): up to 10 passes (NR_MAX_MIGRATE_PAGES_RETRY) over each batch; EAGAIN pages
// are retried in the next pass, permanent failures are not; ENOMEM (no new frame) stops the loop and
// leaves the pages not tried on `from`. In SYNC and SYNC_LIGHT modes a batch is first tried in ASYNC
// mode for 3 passes (migrate_pages_sync), then each page that failed is retried alone, waiting for its
// lock, for the remaining 7.
using System.Runtime.ExceptionServices;
using Microsoft.Extensions.ObjectPool;
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Mm;
using Vmm.Native;
using Vmm.Rmap;

namespace Vmm.Migration;

/// <summary>The migration engine of one machine (Linux's migrate_pages). Thread-safe: each call works on its own pooled batch.</summary>
internal sealed class MigrationEngine
{
    /// <summary>NR_MAX_MIGRATE_PAGES_RETRY: passes over a batch before an EAGAIN page counts as failed.</summary>
    internal const int MaxPasses = 10;

    /// <summary>NR_MAX_MIGRATE_ASYNC_RETRY: the ASYNC passes of a SYNC migration's batched phase.</summary>
    internal const int AsyncPasses = 3;

    /// <summary>
    /// Moved pages finished together (FinishMoved): one lru_lock round trip per this many, while their
    /// descriptors are still in cache (measured: 8, 32 and 512 within noise of each other).
    /// </summary>
    private const int FinishChunk = 32;

    /// <summary>NR_MAX_BATCHED_MIGRATION: the most pages unmapped before one flush.</summary>
    internal const int MaxBatch = 512;

    // PG_anon_exclusive is not carried: while the page is unmapped it lives in the migration entries,
    // and the restore sets it on the new frame from them. PG_active moves with the page (its LRU list).
    private const PageFlags Carried = PageFlags.SwapBacked | PageFlags.Dirty | PageFlags.Referenced | PageFlags.Uptodate |
                                      PageFlags.Active | PageFlags.Workingset;

    private static readonly int ReasonCount = Enum.GetValues<MigrateReason>().Length;

    private readonly Machine _machine;
    private readonly ObjectPool<MigrationBatch> _batches;
    private readonly ObjectPool<List<long>> _lists;
    private readonly long[] _succeeded = new long[ReasonCount];
    private readonly long[] _failed = new long[ReasonCount];

    public MigrationEngine(Machine machine)
    {
        _machine = machine;
        int retained = Math.Max(4, Environment.ProcessorCount * 2);
        _batches = new DefaultObjectPool<MigrationBatch>(new BatchPolicy(machine.MemMap), retained);
        _lists = new DefaultObjectPool<List<long>>(new ListPolicy(), retained);
    }

    /// <summary>What a step did with one page.</summary>
    private enum Outcome
    {
        /// <summary>MIGRATEPAGE_UNMAP: frozen, waiting for the batch's flush and move.</summary>
        Unmapped,
        /// <summary>MIGRATEPAGE_SUCCESS: moved (or freed under us), the isolation reference dropped.</summary>
        Done,
        /// <summary>-EAGAIN: try again in the next pass.</summary>
        Again,
        /// <summary>A permanent failure (-EBUSY, -EINVAL...): not retried in this batch.</summary>
        Failed,
        /// <summary>-ENOMEM: no new frame; the loop stops.</summary>
        NoMemory,
    }

    /// <summary>Per-call counts (Linux's struct migrate_pages_stats).</summary>
    private struct Stats
    {
        public int Succeeded;
        public int FailedPages;
    }

    /// <summary>
    /// The most pages unmapped before one flush: <see cref="MaxBatch"/>, lowered only by benchmarks that
    /// measure what batching saves (1 gives the unbatched engine: one flush per page).
    /// </summary>
    internal int BatchLimit
    {
        get => _batchLimit;
        set => _batchLimit = value is >= 1 and <= MaxBatch ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "1 to 512");
    }

    private int _batchLimit = MaxBatch;

    /// <summary>
    /// Whether a batch serves pages with sleepers first (cut short in the unmap step, moved first in
    /// the move step). On by default; turned off only by the migrate-writer scenario, to show what it saves.
    /// </summary>
    internal bool WaitersFirst { get; set; } = true;

    /// <summary>A work list from the engine's pool, for callers that build a <c>from</c> list; give it back with <see cref="ReturnList"/>.</summary>
    public List<long> RentList() => _lists.Get();

    /// <summary>Gives back a list from <see cref="RentList"/> (it is cleared).</summary>
    public void ReturnList(List<long> list) => _lists.Return(list);

    /// <summary>
    /// Faults that found a migration entry still in place and slept until the page's move step
    /// (migration_entry_wait). Counted only on that slow path, for the stress tests' reports.
    /// </summary>
    internal long FaultsWaited => Volatile.Read(ref _faultsWaited);

    private long _faultsWaited;

    /// <summary>A fault is about to sleep on a migration entry (see <see cref="FaultsWaited"/>).</summary>
    internal void CountFaultWait() => Interlocked.Increment(ref _faultsWaited);

    /// <summary>pgmigrate_success for <paramref name="reason"/>.</summary>
    public long SucceededFor(MigrateReason reason) => Volatile.Read(ref _succeeded[(int)reason]);

    /// <summary>pgmigrate_fail for <paramref name="reason"/>.</summary>
    public long FailedFor(MigrateReason reason) => Volatile.Read(ref _failed[(int)reason]);

    /// <summary>pgmigrate_success, all reasons.</summary>
    public long TotalSucceeded
    {
        get
        {
            long sum = 0;
            for (int r = 0; r < ReasonCount; r++)
                sum += Volatile.Read(ref _succeeded[r]);
            return sum;
        }
    }

    /// <summary>pgmigrate_fail, all reasons.</summary>
    public long TotalFailed
    {
        get
        {
            long sum = 0;
            for (int r = 0; r < ReasonCount; r++)
                sum += Volatile.Read(ref _failed[r]);
            return sum;
        }
    }

    /// <summary>
    /// migrate_pages: moves each page of <paramref name="from"/> to the frame
    /// <paramref name="allocate"/> gives for it. Preconditions: each page of <paramref name="from"/> is
    /// isolated and holds one reference the engine owns (the isolation's); no page lock held.
    /// </summary>
    /// <param name="from">the isolated pages; on return, exactly the pages not migrated, still isolated
    /// (give them back with <see cref="PutbackMovablePages"/>).</param>
    /// <param name="allocate">returns a new frame for a page (referenced, not zeroed) or <see cref="PageAllocator.NoPfn"/>.</param>
    /// <param name="free">takes back a new frame that was not used; null: it is put.</param>
    /// <param name="mode">ASYNC never waits for a page lock; SYNC_LIGHT and SYNC wait once a page is tried alone.</param>
    /// <param name="reason">whose counters the pages count in.</param>
    /// <param name="succeeded">how many pages moved.</param>
    /// <returns>the number of pages not migrated, or <c>-(int)Errno.ENOMEM</c> when a frame could not
    /// be allocated (the loop stopped there).</returns>
    public int MigratePages(List<long> from, Func<long, long> allocate, Action<long>? free, MigrateMode mode, MigrateReason reason, out int succeeded)
    {
        ArgumentNullException.ThrowIfNull(from);
        ArgumentNullException.ThrowIfNull(allocate);
        if ((uint)reason >= (uint)ReasonCount)
            throw new ArgumentOutOfRangeException(nameof(reason), reason, "no such reason");
        MigrationBatch batch = _batches.Get();
        ExceptionDispatchInfo? thrown = null;
        var stats = default(Stats);
        int rcGather = 0;
        int next = 0;
        try
        {
            batch.Allocate = allocate;
            batch.Free = free;
            batch.Reason = reason;
            batch.Mode = mode;
            while (next < from.Count || batch.Deferred.Count > 0)
            {
                // Pages a batch left untried because a thread was waiting on one of its pages come first.
                batch.Work.AddRange(batch.Deferred);
                batch.Deferred.Clear();
                int n = Math.Min(_batchLimit - batch.Work.Count, from.Count - next);
                for (int i = 0; i < n; i++)
                    batch.Work.Add(from[next + i]);
                next += n;
                int rc = mode == MigrateMode.Async
                    ? MigrateBatch(batch, batch.Work, MigrateMode.Async, MaxPasses, batch.Failed, ref stats)
                    : MigrateSync(batch, mode, ref stats);
                // Pages still on the work list ran out of passes (or were not tried after ENOMEM).
                batch.Failed.AddRange(batch.Work);
                batch.Work.Clear();
                if (rc < 0)
                {
                    rcGather = rc;
                    break;
                }
                rcGather += rc;
            }
            batch.Failed.AddRange(batch.Deferred);
            for (int i = next; i < from.Count; i++)
                batch.Failed.Add(from[i]);
            from.Clear();
            from.AddRange(batch.Failed);
            thrown = batch.Thrown;
        }
        finally
        {
            _batches.Return(batch);
        }
        Interlocked.Add(ref _succeeded[(int)reason], stats.Succeeded);
        Interlocked.Add(ref _failed[(int)reason], stats.FailedPages);
        succeeded = stats.Succeeded;
        thrown?.Throw(); // an owner's callback threw: its page is on from, like any that failed
        return rcGather;
    }

    /// <summary>
    /// The one way a mover (offline, compaction, alloc_contig_range) takes a page it found by pfn for
    /// migration: folio_isolate_lru for a page on an LRU list, isolate_movable_ops_page for a non-LRU
    /// movable page (its owner's isolate callback). On true the page is isolated and holds one more
    /// reference, the isolation's, which <see cref="MigratePages"/> or <see cref="PutbackMovablePages"/>
    /// drops. Preconditions: the caller holds a reference of its own; no page lock, zone lock or lru_lock
    /// held (a non-LRU movable page's owner is called, and takes its own lock).
    /// </summary>
    public bool IsolatePage(long pfn, IsolateMode mode)
    {
        if (_machine.Lru.Isolate(pfn))
            return true;
        // Not on an LRU list: a non-LRU movable page, if its mapping word carries the MOVABLE tag.
        return (Volatile.Read(ref _machine.MemMap[pfn].Mapping) & PageDescriptor.MappingTagMask) == PageDescriptor.MappingMovable &&
               IsolateMovableOpsPage(pfn, mode);
    }

    /// <summary>
    /// isolate_movable_ops_page: trylock the page (a mover never waits for a page lock here: the holder may
    /// be the owner freeing it, or another mover), check the tag and !PG_isolated again under it, ask the
    /// owner, then set PG_isolated and take the isolation's reference. Preconditions: the caller holds a
    /// reference; no page lock held.
    /// </summary>
    private bool IsolateMovableOpsPage(long pfn, IsolateMode mode)
    {
        MemMap memMap = _machine.MemMap;
        LockAssert.Referenced(memMap, pfn);
        if ((Volatile.Read(ref memMap[pfn].Flags) & (ulong)(PageFlags.Isolated | PageFlags.Head | PageFlags.Tail)) != 0)
            return false;
        if (!_machine.PageLock.TryLock(pfn))
            return false;
        try
        {
            // Again under the lock: PG_isolated and the tag change only under it (MovablePages.Free clears the tag).
            ref PageDescriptor page = ref memMap[pfn];
            if ((Volatile.Read(ref page.Flags) & (ulong)PageFlags.Isolated) != 0 ||
                _machine.MovablePages.OwnerOf(Volatile.Read(ref page.Mapping)) is not { } owner ||
                !_machine.MovablePages.CallIsolate(owner, pfn, mode))
                return false;
            memMap.GetPage(pfn); // the isolation's reference
            memMap.SetFlag(pfn, PageFlags.Isolated);
            return true;
        }
        finally
        {
            _machine.PageLock.Unlock(pfn);
        }
    }

    /// <summary>
    /// putback_movable_pages: gives back every page left on <paramref name="from"/> after
    /// <see cref="MigratePages"/> (each loses its isolation reference) and empties the list.
    /// </summary>
    public void PutbackMovablePages(List<long> from)
    {
        ArgumentNullException.ThrowIfNull(from);
        ExceptionDispatchInfo? thrown = null;
        foreach (long pfn in from)
        {
            // PG_isolated: a non-LRU movable page (LRU isolation never sets it); it goes back to its owner.
            if ((Volatile.Read(ref _machine.MemMap[pfn].Flags) & (ulong)PageFlags.Isolated) == 0)
                _machine.Lru.Putback(pfn);
            else
                PutbackMovableOpsPage(pfn, ref thrown);
        }
        from.Clear();
        thrown?.Throw();
    }

    /// <summary>
    /// putback_movable_ops_page: the owner gets the page back (unless it freed it meanwhile: then it
    /// only loses PG_isolated and the isolation's reference, which frees it). An owner's exception is kept
    /// for the end of the list, so that every page is put back. Preconditions: no page lock held.
    /// </summary>
    private void PutbackMovableOpsPage(long pfn, ref ExceptionDispatchInfo? thrown)
    {
        _machine.PageLock.Lock(pfn);
        try
        {
            if (_machine.MovablePages.OwnerOf(Volatile.Read(ref _machine.MemMap[pfn].Mapping)) is { } owner)
                _machine.MovablePages.CallPutback(owner, pfn);
        }
        catch (Exception e)
        {
            thrown ??= ExceptionDispatchInfo.Capture(e);
        }
        finally
        {
            _machine.MemMap.ClearFlag(pfn, PageFlags.Isolated);
            _machine.PageLock.Unlock(pfn);
        }
        _machine.PutPage(pfn);
    }

    /// <summary>
    /// migrate_pages_sync: the batch in ASYNC mode first (trylocks only: a batch holding many page locks
    /// must never sleep on another one), then every page that failed alone, in <paramref name="mode"/>,
    /// for the remaining passes. Failures of the first phase are not counted: they are retried.
    /// </summary>
    private int MigrateSync(MigrationBatch batch, MigrateMode mode, ref Stats stats)
    {
        var first = default(Stats);
        int rc = MigrateBatch(batch, batch.Work, MigrateMode.Async, AsyncPasses, batch.Retry, ref first);
        stats.Succeeded += first.Succeeded;
        if (rc < 0)
        {
            stats.FailedPages += first.FailedPages;
            batch.Work.AddRange(batch.Retry); // back to the caller, which puts them on the failed list
            batch.Retry.Clear();
            return rc;
        }

        // The pages left on the work list (out of passes) and those that failed, one by one.
        batch.Retry.InsertRange(0, batch.Work);
        batch.Work.Clear();
        int failed = 0;
        for (int i = 0; i < batch.Retry.Count; i++)
        {
            batch.Single.Add(batch.Retry[i]);
            rc = MigrateBatch(batch, batch.Single, mode, MaxPasses - AsyncPasses, batch.Failed, ref stats);
            batch.Failed.AddRange(batch.Single);
            batch.Single.Clear();
            if (rc < 0)
            {
                for (int j = i + 1; j < batch.Retry.Count; j++)
                    batch.Work.Add(batch.Retry[j]);
                batch.Retry.Clear();
                return rc;
            }
            failed += rc;
        }
        batch.Retry.Clear();
        return failed;
    }

    /// <summary>
    /// migrate_pages_batch: unmaps the pages of <paramref name="work"/> for up to
    /// <paramref name="passes"/> passes, flushes once, then moves the unmapped ones for up to as many
    /// passes. Permanent failures, and pages that ran out of move passes, go to <paramref name="failed"/>;
    /// pages that ran out of unmap passes stay on <paramref name="work"/> (and after ENOMEM, the pages
    /// not tried). Returns the number of pages that failed, or -ENOMEM.
    /// </summary>
    private int MigrateBatch(MigrationBatch batch, List<long> work, MigrateMode mode, int passes, List<long> failed, ref Stats stats)
    {
        int nrFailed = 0;
        int retry = 1;
        int rcSaved = 0;
        batch.UnmappedCount = 0;
        long waitsSeen = Volatile.Read(ref _faultsWaited);
        for (int pass = 0; pass < passes && retry > 0; pass++)
        {
            retry = 0;
            int keep = 0;
            for (int i = 0; i < work.Count; i++)
            {
                long pfn = work[i];
                if (pass == 0 && WaitersFirst && WaiterAppeared(batch, ref waitsSeen))
                {
                    // A thread sleeps on a page this batch froze: cut the batch here, so that it waits for
                    // the flush and its own page's move, not for the rest of the batch to be unmapped. The
                    // pages not tried yet start the next batch (they have not failed).
                    for (int j = i; j < work.Count; j++)
                        batch.Deferred.Add(work[j]);
                    work.RemoveRange(keep, work.Count - keep);
                    break;
                }
                switch (Unmap(batch, pfn, mode))
                {
                    case Outcome.NoMemory:
                        // Memory is low: stop trying, move what is unmapped, and leave the rest on the list.
                        nrFailed++;
                        stats.FailedPages += 1 + retry;
                        for (int j = i; j < work.Count; j++)
                            work[keep++] = work[j];
                        work.RemoveRange(keep, work.Count - keep);
                        rcSaved = -(int)Errno.ENOMEM;
                        goto Move;
                    case Outcome.Again:
                        retry++;
                        work[keep++] = pfn;
                        break;
                    case Outcome.Done:
                        stats.Succeeded++;
                        break;
                    case Outcome.Unmapped:
                        break;
                    default:
                        nrFailed++;
                        stats.FailedPages++;
                        failed.Add(pfn);
                        break;
                }
            }
            work.RemoveRange(keep, work.Count - keep);
        }
        nrFailed += retry;
        stats.FailedPages += retry;

    Move:
        // One flush for every page unmapped above.
        _machine.Rmap.FlushBatch(batch.Unmap);
        retry = 1;
        waitsSeen = -1; // look for waiters before the first move: one may have come during the unmaps
        for (int pass = 0; pass < passes && retry > 0; pass++)
        {
            retry = 0;
            int keep = 0;
            for (int i = 0; i < batch.UnmappedCount; i++)
            {
                // Waiters first: a thread that sleeps on one of the batch's pages waits for that page's
                // move, not for the moves queued before it (at most the move under way when it came).
                long waits = Volatile.Read(ref _faultsWaited);
                if (waits != waitsSeen && WaitersFirst)
                {
                    waitsSeen = waits;
                    BringWaitersForward(batch, i);
                }
                switch (Move(batch, ref batch.Unmapped[i]))
                {
                    case Outcome.Again:
                        retry++;
                        batch.Unmapped[keep++] = batch.Unmapped[i];
                        break;
                    case Outcome.Done:
                        stats.Succeeded++;
                        break;
                    case Outcome.Failed:
                    {
                        // Only a non-LRU movable page's owner fails a move for good: undo both frames
                        // (migrate_folio_undo_src / _dst); the page goes back with the others not moved.
                        ref Entry entry = ref batch.Unmapped[i];
                        nrFailed++;
                        stats.FailedPages++;
                        UndoSource(batch, entry.Src, entry.WasMapped);
                        failed.Add(entry.Src);
                        UndoDestination(batch, entry.Dst);
                        entry = default;
                        break;
                    }
                    default:
                        throw new VmBugException("migrate_folio_move can only succeed, ask again or fail a movable page");
                }
            }
            batch.UnmappedCount = keep;
        }
        nrFailed += retry;
        stats.FailedPages += retry;
        FinishMoved(batch);

        // Pages still frozen after the last pass: mapped back to their old frames.
        for (int i = 0; i < batch.UnmappedCount; i++)
        {
            ref Entry entry = ref batch.Unmapped[i];
            UndoSource(batch, entry.Src, entry.WasMapped);
            failed.Add(entry.Src);
            UndoDestination(batch, entry.Dst);
            entry = default;
        }
        batch.UnmappedCount = 0;
        return rcSaved != 0 ? rcSaved : nrFailed;
    }

    /// <summary>
    /// True when, since <paramref name="waitsSeen"/>, a thread began to wait on a migration entry and
    /// one of the pages this batch has frozen so far has a sleeper (PG_waiters). Cheap while nobody
    /// waits: one read of the wait counter.
    /// </summary>
    private bool WaiterAppeared(MigrationBatch batch, ref long waitsSeen)
    {
        long waits = Volatile.Read(ref _faultsWaited);
        if (waits == waitsSeen)
            return false;
        waitsSeen = waits;
        for (int i = 0; i < batch.UnmappedCount; i++)
        {
            if (HasWaiters(batch.Unmapped[i].Src))
                return true;
        }
        return false;
    }

    /// <summary>Moves the frozen pages from <paramref name="start"/> on that have sleepers to the front of the rest.</summary>
    private void BringWaitersForward(MigrationBatch batch, int start)
    {
        int front = start;
        for (int j = start; j < batch.UnmappedCount; j++)
        {
            if (!HasWaiters(batch.Unmapped[j].Src))
                continue;
            if (j != front)
                (batch.Unmapped[front], batch.Unmapped[j]) = (batch.Unmapped[j], batch.Unmapped[front]);
            front++;
        }
    }

    /// <summary>PG_waiters: a thread sleeps (or slept) on the page lock. A stale bit only reorders a move.</summary>
    private bool HasWaiters(long pfn) => (Volatile.Read(ref _machine.MemMap[pfn].Flags) & (ulong)PageFlags.Waiters) != 0;

    /// <summary>
    /// migrate_folio_unmap: allocates and locks the new frame, locks the page and replaces its mappings
    /// with migration entries (no flush). On <see cref="Outcome.Unmapped"/> the page is queued on the
    /// batch, both pages locked. Preconditions: the page holds the isolation reference.
    /// </summary>
    private Outcome Unmap(MigrationBatch batch, long src, MigrateMode mode)
    {
        LockAssert.Referenced(_machine.MemMap, src);
        MemMap memMap = _machine.MemMap;
        if (memMap.RefCount(src) == 1 && (Volatile.Read(ref memMap[src].Mapping) & PageDescriptor.MappingTagMask) != PageDescriptor.MappingKsm &&
            (Volatile.Read(ref memMap[src].Flags) & (ulong)PageFlags.Isolated) == 0)
        {
            // Freed from under us: only the isolation reference is left (its last mapping went away,
            // or the page cache dropped it), and nothing can map it again. Nothing to move: done, as
            // Linux counts it. Not for a KSM page: its stable node can still hand it to a merge. Not for a
            // non-LRU movable page (PG_isolated): its flag is cleared under the page lock (Classify's Done).
            ReleaseSource(batch, src);
            return Outcome.Done;
        }
        long dst = batch.Allocate(src);
        if (dst == PageAllocator.NoPfn)
            return Outcome.NoMemory;
        if (!_machine.PageLock.TryLock(src))
        {
            if (mode == MigrateMode.Async)
            {
                FreeDestination(batch, dst);
                return Outcome.Again;
            }
            _machine.PageLock.Lock(src);
        }

        Outcome outcome = Classify(src, out ShmemObject? shmem);
        if (outcome == Outcome.Unmapped && memMap[src].PinCount != 0)
            outcome = Outcome.Again; // pinned: its contents may change behind any copy
        if (outcome != Outcome.Unmapped)
        {
            if (outcome == Outcome.Done)
                memMap.ClearFlag(src, PageFlags.Isolated); // a movable page its owner freed while isolated
            _machine.PageLock.Unlock(src);
            FreeDestination(batch, dst);
            if (outcome == Outcome.Done)
            {
                // migrate_folio_done for it: on no LRU list, so only the isolation's reference to drop.
                KeepSourcesForMemoryFailure(batch, [src]);
                _machine.PutPage(src);
            }
            return outcome;
        }

        // The new frame is locked too, as in Linux: once the page cache or a PTE names it, another
        // mechanism could find it, and must not work on it before the migration is done. Nobody else
        // knows the frame yet, so the trylock cannot fail.
        if (!_machine.PageLock.TryLock(dst))
            throw new VmBugException($"the new frame {dst} of a migration was locked by someone else");
        bool wasMapped = memMap.MapCount(src) > 0;
        if (wasMapped && !_machine.Rmap.TryToMigrate(src, batch.Unmap))
        {
            // A mapping was left (the walk missed a PTE being copied by fork, say): map the page back
            // where it is frozen already and try again next pass. Its mms stay on the batch's flush.
            _machine.Rmap.RemoveMigrationPtes(src, src, batch.Unmap);
            _machine.PageLock.Unlock(dst);
            FreeDestination(batch, dst);
            _machine.PageLock.Unlock(src);
            return Outcome.Again;
        }
        batch.Unmapped[batch.UnmappedCount++] = new Entry(src, dst, shmem, wasMapped);
        return Outcome.Unmapped;
    }

    /// <summary>
    /// Which kind of page <paramref name="src"/> is: <see cref="Outcome.Unmapped"/> for one the engine
    /// moves (anonymous; shared memory, with its object), a permanent failure for one it cannot, EAGAIN
    /// for a shared page whose object is going away. Preconditions: the page lock is held.
    /// </summary>
    private Outcome Classify(long src, out ShmemObject? shmem)
    {
        LockAssert.PageLocked(_machine.PageLock, src);
        shmem = null;
        MemMap memMap = _machine.MemMap;
        ref PageDescriptor page = ref memMap[src];
        ulong mapping = page.Mapping;
        ulong tag = mapping & PageDescriptor.MappingTagMask;
        if (mapping == 0 || memMap.IsCompound(src) || (page.Flags & (ulong)PageFlags.Reserved) != 0)
        {
            // A non-LRU movable page whose owner freed it while it was isolated: nothing to move, and
            // Linux counts it as moved (migrate_folio_unmap's !folio_mapping_flags case).
            return mapping == 0 && (page.Flags & (ulong)PageFlags.Isolated) != 0 ? Outcome.Done : Outcome.Failed;
        }
        if (tag == PageDescriptor.MappingMovable)
            return Outcome.Unmapped; // never mapped: no rmap work; its owner moves it (MoveMovableOpsPage)
        if (tag == PageDescriptor.MappingKsm)
            return _machine.Ksm is null ? Outcome.Failed : Outcome.Unmapped; // its mappings: the stable node's items
        if (tag == PageDescriptor.MappingAnon)
            return Outcome.Unmapped;
        shmem = _machine.Mappings.Find<ShmemObject>((long)(mapping >> 2));
        return shmem is null ? Outcome.Again : Outcome.Unmapped; // no object: the page is being freed
    }

    /// <summary>
    /// migrate_folio_move: verify, copy, commit, restore. <see cref="Outcome.Again"/> leaves the page
    /// frozen for the next pass. Preconditions: both pages locked; the batch has been flushed.
    /// </summary>
    private Outcome Move(MigrationBatch batch, ref Entry entry)
    {
        long src = entry.Src;
        long dst = entry.Dst;
        LockAssert.PageLocked(_machine.PageLock, src);
        LockAssert.PageLocked(_machine.PageLock, dst);
        MemMap memMap = _machine.MemMap;
        ref PageDescriptor oldPage = ref memMap[src];

        // 3. Verify, 4. copy and 5. commit. For shared memory all three run under the object's lock:
        // a fault takes its reference under that lock (ShmemObject.GetPage), so none can appear between
        // the check and the switch of the page cache, and a page the cache dropped meanwhile is noticed.
        if (entry.Shmem is { } shmem)
        {
            lock (shmem.Lock)
            {
                if (!shmem.Pages.TryGetValue((long)oldPage.Index, out long cached) || cached != src ||
                    memMap.RefCount(src) != 2 || oldPage.PinCount != 0)
                    return Outcome.Again;
                CopyPage(_machine, src, dst);
                memMap.GetPage(dst); // the page cache's reference
                shmem.Pages[(long)oldPage.Index] = dst;
            }
            _machine.PutPage(src); // the old frame's page-cache reference (ours is still held)
        }
        else
        {
            ulong tag = oldPage.Mapping & PageDescriptor.MappingTagMask;
            if (tag == PageDescriptor.MappingMovable)
                return MoveMovableOpsPage(batch, ref entry);
            // Anonymous: the isolation reference only. A pin, a fork that copied the page, or a fault
            // that took a reference before the freeze shows up here.
            // A KSM page holds no reference of KSM's (its stable node names it by pfn): the same check.
            if (memMap.RefCount(src) != 1 || oldPage.PinCount != 0)
                return Outcome.Again;
            bool ksm = tag == PageDescriptor.MappingKsm;
            CopyPage(_machine, src, dst);
            // ksm_migrate_folio: after the copy and before any PTE names the new frame, with both pages
            // locked, the stable node switches to it; the KSM reverse-map walk of the restore below
            // finds the mappings only through a node that names the new frame.
            if (ksm)
                _machine.Ksm!.MigratePage(src, dst);
        }

        // Past this line the page lives in the new frame. Linux puts it on its LRU list here, before its
        // PTEs come back; the engine queues it, and the new frames join their lists 32 at a time
        // (FinishMoved: one lru_lock round trip per 32 pages, not per page). Until then
        // the allocation's reference keeps the frame, which is mapped and unlocked but not yet on a
        // list: an isolation that meets it fails (as for a page in an add batch), and a put cannot free it.
        memMap.Trace?.Record(src, FrameEvent.MigrateFrom, dst);
        memMap.Trace?.Record(dst, FrameEvent.MigrateTo, src);
        if (entry.WasMapped)
            _machine.Rmap.RemoveMigrationPtes(src, dst, batch.Unmap);
        Interlocked.And(ref oldPage.Flags, ~(ulong)Carried);
        _machine.PageLock.Unlock(dst);
        _machine.PageLock.Unlock(src);
        batch.NewFrames[batch.MovedCount] = dst;
        batch.Moved[batch.MovedCount++] = src;
        if (batch.MovedCount == FinishChunk)
            FinishMoved(batch);
        entry = default;
        return Outcome.Done;
    }

    /// <summary>
    /// move_to_new_folio for a non-LRU movable page: the owner moves it (<see cref="MovableOperations.MigratePage"/>).
    /// On success the VM moves the owner's tag and reference to the new frame (the allocation's reference
    /// becomes the owner's), clears PG_isolated, and the old frame loses the owner's and the isolation's
    /// references, which frees it; the new frame joins no LRU list. EAGAIN leaves both frozen for the next
    /// pass; any other answer (or an exception, kept for the end of the call) is a permanent failure the
    /// caller undoes. Preconditions: both pages locked; the page lock held from the unmap step on, so the
    /// owner cannot have freed the page since (MovablePages.Free takes it).
    /// </summary>
    private Outcome MoveMovableOpsPage(MigrationBatch batch, ref Entry entry)
    {
        long src = entry.Src;
        long dst = entry.Dst;
        LockAssert.PageLocked(_machine.PageLock, src);
        LockAssert.PageLocked(_machine.PageLock, dst);
        MemMap memMap = _machine.MemMap;
        ulong mapping = Volatile.Read(ref memMap[src].Mapping);
        MovableOperations owner = _machine.MovablePages.OwnerOf(mapping)
                                  ?? throw new VmBugException($"frame {src} carries the MOVABLE tag of an owner that is gone (mapping {mapping:x})");
        // The new frame carries the owner's tag before the owner learns of it. Once its MigratePage has
        // switched to the new frame, the owner may read or write it at once, from another thread, through
        // MovablePages.Read and Write, which take no lock and check the tag. Tagging after the callback
        // left a window in which the owner's own frame was "not a page of this owner" (the compaction
        // soak's hour found it). Linux's drivers likewise tag the new page inside their migrate callback
        // (balloon_page_insert). A refusal takes the tag back.
        Volatile.Write(ref memMap[dst].Mapping, mapping);
        Errno rc;
        try
        {
            rc = _machine.MovablePages.CallMigrate(owner, dst, src, batch.Mode);
        }
        catch (Exception e)
        {
            batch.Thrown ??= ExceptionDispatchInfo.Capture(e);
            rc = Errno.EFAULT;
        }
        if (rc != Errno.None)
        {
            Volatile.Write(ref memMap[dst].Mapping, 0);
            return rc == Errno.EAGAIN ? Outcome.Again : Outcome.Failed;
        }

        // Past this line the page lives in the new frame: the owner points at it, and it carries the tag.
        Volatile.Write(ref memMap[src].Mapping, 0);
        memMap.ClearFlag(src, PageFlags.Isolated);
        _machine.PageLock.Unlock(dst);
        _machine.PageLock.Unlock(src);
        KeepSourcesForMemoryFailure(batch, [src]);
        _machine.PutPage(src); // the owner's reference, now the new frame's (the allocation's)
        _machine.PutPage(src); // the isolation's: frees the old frame
        entry = default;
        return Outcome.Done;
    }

    /// <summary>
    /// The end of the move step for the pages that moved (migrate_folio_done, batched): the new frames
    /// join their LRU lists and lose the allocation's reference (the mappings or the page cache hold
    /// their own), and the old frames leave the isolated list and are freed. Each lruvec's lock is taken
    /// once for the batch.
    /// </summary>
    private void FinishMoved(MigrationBatch batch)
    {
        int count = batch.MovedCount;
        if (count == 0)
            return;
        ReadOnlySpan<long> newFrames = batch.NewFrames.AsSpan(0, count);
        _machine.Lru.AddMany(newFrames);
        foreach (long dst in newFrames)
            _machine.PutPage(dst);
        KeepSourcesForMemoryFailure(batch, batch.Moved.AsSpan(0, count));
        _machine.Lru.ReleaseIsolatedMany(batch.Moved.AsSpan(0, count));
        batch.MovedCount = 0;
    }

    /// <summary>migrate_folio_undo_src: maps the page back to its old frame and unlocks it. Preconditions: the page lock is held.</summary>
    private void UndoSource(MigrationBatch batch, long src, bool wasMapped)
    {
        LockAssert.PageLocked(_machine.PageLock, src);
        if (wasMapped)
            _machine.Rmap.RemoveMigrationPtes(src, src, batch.Unmap);
        _machine.PageLock.Unlock(src);
    }

    /// <summary>migrate_folio_undo_dst: unlocks the unused new frame and gives it back. Preconditions: its lock is held.</summary>
    private void UndoDestination(MigrationBatch batch, long dst)
    {
        LockAssert.PageLocked(_machine.PageLock, dst);
        _machine.PageLock.Unlock(dst);
        FreeDestination(batch, dst);
    }

    private void FreeDestination(MigrationBatch batch, long dst)
    {
        if (batch.Free is { } free)
            free(dst);
        else
            _machine.PutPage(dst);
    }

    /// <summary>
    /// migrate_folio_done: a page that moved (or was freed under us) leaves the isolated list and loses
    /// the isolation reference, which frees it (for MigrateReason.MemoryFailure the caller gets a
    /// reference instead: <see cref="KeepSourcesForMemoryFailure"/>).
    /// </summary>
    private void ReleaseSource(MigrationBatch batch, long src)
    {
        KeepSourcesForMemoryFailure(batch, [src]);
        _machine.Lru.ReleaseIsolated(src);
    }

    /// <summary>
    /// migrate_folio_done with MR_MEMORY_FAILURE: the old frames of a soft offline are not freed, so
    /// that the caller can retire them (page_handle_poison): each keeps one reference past the release
    /// of its isolation, which becomes the retirement's (Mm/MemoryFailure.cs).
    /// </summary>
    private void KeepSourcesForMemoryFailure(MigrationBatch batch, ReadOnlySpan<long> sources)
    {
        if (batch.Reason != MigrateReason.MemoryFailure)
            return;
        foreach (long src in sources)
            _machine.MemMap.GetPage(src);
    }

    /// <summary>Copies contents and identity (mapping, index, carried flags) to the new frame.</summary>
    internal static unsafe void CopyPage(Machine machine, long pfn, long newPfn)
    {
        MemMap memMap = machine.MemMap;
        PageOps.Copy(machine.Arena.FrameAddress(newPfn), machine.Arena.FrameAddress(pfn));
        ref PageDescriptor oldPage = ref memMap[pfn];
        ref PageDescriptor newPage = ref memMap[newPfn];
        newPage.Mapping = oldPage.Mapping;
        newPage.Index = oldPage.Index;
        Interlocked.Or(ref newPage.Flags, oldPage.Flags & (ulong)Carried);
    }

    /// <summary>A page frozen by the unmap step, waiting for the move step.</summary>
    private record struct Entry(long Src, long Dst, ShmemObject? Shmem, bool WasMapped);

    /// <summary>One call's working state (Linux's on-stack lists of migrate_pages), pooled.</summary>
    private sealed class MigrationBatch
    {
        public MigrationBatch(MemMap memMap) => Unmap = new UnmapBatch(memMap);

        public UnmapBatch Unmap { get; }

        /// <summary>The batch being migrated (Linux's folios list).</summary>
        public List<long> Work { get; } = new(MaxBatch);

        /// <summary>migrate_pages_sync's list of pages to retry alone.</summary>
        public List<long> Retry { get; } = new(MaxBatch);

        /// <summary>The one page being retried alone.</summary>
        public List<long> Single { get; } = new(1);

        /// <summary>Pages a batch cut short did not try (a waiter appeared): the next batch starts with them.</summary>
        public List<long> Deferred { get; } = [];

        /// <summary>Pages that will not move (Linux's ret_folios).</summary>
        public List<long> Failed { get; } = [];

        /// <summary>Pages frozen by the unmap step (Linux's unmap_folios and dst_folios).</summary>
        public Entry[] Unmapped { get; } = new Entry[MaxBatch];

        public int UnmappedCount { get; set; }

        /// <summary>Old frames of the pages that moved, waiting for FinishMoved (still isolated).</summary>
        public long[] Moved { get; } = new long[FinishChunk];

        /// <summary>Their new frames, each holding the allocation's reference until FinishMoved.</summary>
        public long[] NewFrames { get; } = new long[FinishChunk];

        public int MovedCount { get; set; }

        public Func<long, long> Allocate { get; set; } = null!;

        public Action<long>? Free { get; set; }

        /// <summary>The call's reason (MemoryFailure keeps the old frames: KeepSourcesForMemoryFailure).</summary>
        public MigrateReason Reason { get; set; }

        /// <summary>The call's mode, as the owners of non-LRU movable pages are told it.</summary>
        public MigrateMode Mode { get; set; }

        /// <summary>The first exception a movable page's owner threw, rethrown once the call's lists are consistent.</summary>
        public ExceptionDispatchInfo? Thrown { get; set; }
    }

    private sealed class BatchPolicy(MemMap memMap) : IPooledObjectPolicy<MigrationBatch>
    {
        public MigrationBatch Create() => new(memMap);

        public bool Return(MigrationBatch batch)
        {
            batch.Work.Clear();
            batch.Retry.Clear();
            batch.Single.Clear();
            batch.Failed.Clear();
            batch.Deferred.Clear();
            batch.Unmap.Touched.Clear();
            batch.UnmappedCount = 0;
            batch.MovedCount = 0;
            batch.Allocate = null!;
            batch.Free = null;
            batch.Thrown = null;
            if (batch.Failed.Capacity > 4 * MaxBatch)
                batch.Failed.Capacity = 4 * MaxBatch; // a huge call's list is not kept forever
            return true;
        }
    }

    private sealed class ListPolicy : IPooledObjectPolicy<List<long>>
    {
        public List<long> Create() => new(1);

        public bool Return(List<long> list)
        {
            list.Clear();
            return list.Capacity <= 4 * MaxBatch;
        }
    }
}
