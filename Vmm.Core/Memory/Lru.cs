// LruLists: the per-node LRU lists of user pages and the per-CPU batches that feed them (Linux's lruvec
// of include/linux/mmzone.h, mm/swap.c's cpu_fbatches.lru_add, folio_add_lru, lru_add_drain(_all),
// folio_mark_accessed, folio_activate, lru_cache_disable, and mm/vmscan.c's folio_isolate_lru /
// folio_putback_lru). Reclaim will age these lists; today migration isolates pages from them.
//
// Per node, one lruvec: the inactive-anon and active-anon lists, doubly linked through the descriptors'
// LruNext / LruPrev (pfn links, new pages at the head), and the counts nr_inactive_anon,
// nr_active_anon, nr_isolated_anon. A page's lruvec is its frame's node. An isolated page is also kept
// on a third list of its lruvec (Vmm's own: Linux threads it on the isolator's list), so that Audit can
// name every isolation and the reference it holds; the isolator keeps its pages in a List<long> and
// never touches the links.
//
// A page's LRU state, from its creation to its free:
//   in an add batch   PG_lru clear, the batch holds one reference (Add)
//   on a list         PG_lru set, PG_active says which list; the list holds no reference
//   isolated          PG_lru clear, on the lruvec's isolated list, one reference held by the
//                     isolation (Isolate), until Putback (back on its list) or ReleaseIsolated
//                     (migrated away: the old frame leaves the LRU for good)
// and the put that drops the last reference of a page with PG_lru set unlinks it (PageCacheRelease,
// Linux's __page_cache_release) before the frame goes back to the allocator (Machine.PutPage: every
// put of a user page goes through it: the TLB flusher's deferred puts and munmap's batched frees too).
//
// Add batches (one per processor slot, as the allocator's pcp: Thread.GetCurrentProcessorId and a spin
// word): a new page costs the fault a push and a reference, and its lruvec's lock is taken once per
// 31 pages (PAGEVEC_SIZE), when the batch is full or drained. The batch's reference is what makes a
// page sitting in it look busy to copy-on-write reuse (drained locally, as wp_can_reuse_anon_folio
// does) and to KSM (which drains all batches at the start of every full scan). DisableCache (a
// counter, lru_cache_disable) makes Add go straight to the list, for callers that need every page
// isolatable at once (move_pages, offline).
//
// Locking: lruvec.Lock (lru_lock) protects the lruvec's three lists, their counts, and for every page
// that is on a list or is being put on one: PG_lru and PG_active. So every change of PG_lru (drain,
// isolate, putback, free) and of PG_active on a page whose PG_lru is set (activate) happens under it,
// and a reader under it sees a page either on the list its flags name or not linked at all. A batch's
// spin word protects its slots and count; MarkAccessed sets PG_active of a page in the local batch
// under that spin word, which every drain holds. Order: pte lock (or the shmem object lock, or the ksm
// thread mutex) -> add-batch spin word -> lru_lock; a free's unlink takes the lru_lock alone, under a
// pte lock at most. Pages whose last reference a drain drops are freed after the lru_lock and the spin
// word are released.
using System.Runtime.CompilerServices;
using Vmm.Diagnostics;

namespace Vmm.Memory;

/// <summary>One LRU list of a lruvec: pfn links through the descriptors. Protected by its lruvec's lock.</summary>
internal struct LruList
{
    /// <summary>The first (newest) page, or NoLink.</summary>
    public uint Head;

    /// <summary>The last (oldest) page, or NoLink.</summary>
    public uint Tail;

    /// <summary>Pages on the list. Written under the lock, read racily by the stats.</summary>
    public long Count;

    /// <summary>An empty list.</summary>
    public static LruList Empty => new() { Head = PageDescriptor.NoLink, Tail = PageDescriptor.NoLink };
}

/// <summary>One node's lruvec: its lists and their lock (lru_lock).</summary>
internal sealed class Lruvec
{
    public Lruvec(int node) => Node = node;

    /// <summary>The node whose pages these lists hold.</summary>
    public int Node { get; }

    /// <summary>lru_lock: the three lists, their counts, PG_lru and PG_active of the pages on them.</summary>
    public readonly Lock Lock = new();

    /// <summary>LRU_INACTIVE_ANON (nr_inactive_anon).</summary>
    public LruList Inactive = LruList.Empty;

    /// <summary>LRU_ACTIVE_ANON (nr_active_anon).</summary>
    public LruList Active = LruList.Empty;

    /// <summary>Isolated pages (nr_isolated_anon); each holds the isolation's reference.</summary>
    public LruList Isolated = LruList.Empty;
}

/// <summary>
/// One processor slot's add batch (cpu_fbatches.lru_add): up to <see cref="Size"/> new pages, each
/// holding a reference, PG_lru clear. Protected by the spin word Lock (0 free; held: 1 in Release, the
/// holder's managed thread id in Debug).
/// </summary>
internal sealed class LruAddBatch
{
    /// <summary>PAGEVEC_SIZE.</summary>
    public const int Size = 31;

    public SpinWord Lock;
    public int Count;
    public readonly uint[] Pfns = new uint[Size];
#pragma warning disable CS0169, IDE0051 // padding: keep neighbouring slots' spin words on separate cache lines
    private readonly long _pad0, _pad1, _pad2, _pad3, _pad4, _pad5;
#pragma warning restore CS0169, IDE0051

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Enter() => Lock.Enter("the LRU add-batch spin word");

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Exit()
    {
        LockAssert.LruBatchLockHeld(this);
        Lock.Exit();
    }

#if DEBUG
    /// <summary>Debug only: whether this thread holds the spin word.</summary>
    public bool IsHeldByCurrentThread => Lock.IsHeldByCurrentThread;
#endif
}

/// <summary>The LRU lists of a machine (one lruvec per node) and the per-CPU add batches. Owned by <see cref="Machine"/>.</summary>
internal sealed class LruLists
{
    private readonly Machine _machine;
    private readonly MemMap _memMap;
    private readonly Lruvec[] _lruvecs;
    private readonly LruAddBatch[] _batches;
    private readonly int _batchMask;
    private int _disabled; // lru_disable_count; atomic

    public LruLists(Machine machine)
    {
        _machine = machine;
        _memMap = machine.MemMap;
        _lruvecs = new Lruvec[machine.Topology.NodeCount];
        for (int node = 0; node < _lruvecs.Length; node++)
            _lruvecs[node] = new Lruvec(node);
        int slots = (int)System.Numerics.BitOperations.RoundUpToPowerOf2((uint)Math.Max(1, Environment.ProcessorCount));
        _batchMask = slots - 1;
        _batches = new LruAddBatch[slots];
        for (int i = 0; i < slots; i++)
            _batches[i] = new LruAddBatch();
    }

    /// <summary>The lruvec of <paramref name="node"/>.</summary>
    public Lruvec GetLruvec(int node) => _lruvecs[node];

    /// <summary>The lruvec of the page in <paramref name="pfn"/>: its frame's node.</summary>
    private Lruvec LruvecOf(long pfn) => _lruvecs[_machine.Topology.NodeOf(pfn)];

    /// <summary>True while <see cref="DisableCache"/> is in force.</summary>
    public bool IsCacheDisabled => Volatile.Read(ref _disabled) != 0;

    // ---- adding ------------------------------------------------------------------------------------

    /// <summary>
    /// folio_add_lru: a new user page joins its node's inactive list, through this processor's add
    /// batch (which takes a reference of its own), or at once while the cache is disabled.
    /// Preconditions: the caller holds a reference; PG_lru clear; the page in no batch.
    /// </summary>
    public void Add(long pfn)
    {
        long head = _memMap.CompoundHead(pfn);
        LockAssert.Referenced(_memMap, head);
        LockAssert.That(!_memMap.TestFlag(head, PageFlags.Lru), $"frame {head} not on an LRU list already (PG_lru clear)");
        // The batch's reference: get_page without its second head lookup (the fault path pays for this line).
        if (Interlocked.Increment(ref _memMap[head].RefCount) <= 1)
            throw new VmBugException($"folio_add_lru of frame {head}, which had no reference");
        LruAddBatch batch = _batches[Thread.GetCurrentProcessorId() & _batchMask];
        batch.Enter();
        // Read under the spin word: DisableCache raises the counter and then drains every batch under
        // its spin word, so a push either happened before that drain (and is drained) or sees the counter.
        if (Volatile.Read(ref _disabled) == 0)
        {
            batch.Pfns[batch.Count++] = (uint)head;
            if (batch.Count < LruAddBatch.Size)
            {
                batch.Exit();
                return;
            }
            MoveBatchAndExit(batch);
            return;
        }
        batch.Exit();
        Lruvec lruvec = LruvecOf(head);
        lock (lruvec.Lock)
            AddToListLocked(lruvec, head);
        if (_memMap.PutPageTestZero(head)) // the caller still holds its own
            throw new VmBugException($"folio_add_lru dropped the last reference of frame {head}");
    }

    /// <summary>
    /// folio_add_lru for many new pages at once, straight onto their lists whether or not the cache is
    /// disabled: each lruvec's lock is taken once per run of pages of that node (the migration engine's
    /// new frames of one batch). The callers' references are not touched (each still holds its own).
    /// Preconditions: the caller holds a reference to each page; PG_lru clear; none in a batch.
    /// </summary>
    public void AddMany(ReadOnlySpan<long> pfns)
    {
        Lruvec? locked = null;
        try
        {
            foreach (long pfn in pfns)
            {
                LockAssert.Referenced(_memMap, pfn);
                LockAssert.That(!_memMap.TestFlag(pfn, PageFlags.Lru), $"frame {pfn} not on an LRU list already (PG_lru clear)");
                Lruvec lruvec = LruvecOf(pfn);
                Relock(ref locked, lruvec);
                AddToListLocked(lruvec, pfn);
            }
        }
        finally
        {
            locked?.Lock.Exit();
        }
    }

    /// <summary>
    /// folio_batch_move_lru for the add batch: every page of the batch onto its list (PG_lru set), the
    /// batch emptied, the spin word released, then the batch's references dropped (a page unmapped
    /// meanwhile is freed here, after every lock is released). Preconditions: the batch's spin word held.
    /// </summary>
    private void MoveBatchAndExit(LruAddBatch batch)
    {
        LockAssert.LruBatchLockHeld(batch);
        int count = batch.Count;
        Span<uint> taken = stackalloc uint[LruAddBatch.Size];
        Lruvec? locked = null;
        try
        {
            for (int i = 0; i < count; i++)
            {
                long pfn = batch.Pfns[i];
                taken[i] = (uint)pfn;
                Lruvec lruvec = LruvecOf(pfn);
                Relock(ref locked, lruvec);
                AddToListLocked(lruvec, pfn);
            }
        }
        finally
        {
            locked?.Lock.Exit();
        }
        batch.Count = 0;
        batch.Exit();
        for (int i = 0; i < count; i++)
            _machine.PutPage(taken[i]);
    }

    /// <summary>
    /// folio_lruvec_relock: makes <paramref name="lruvec"/>'s lock the one held, releasing the one held
    /// before if it was another's, for loops over pages of several nodes that keep a lock across pages
    /// of one node. The caller releases <paramref name="locked"/> at the end (in a finally).
    /// </summary>
    private static void Relock(ref Lruvec? locked, Lruvec lruvec)
    {
        if (lruvec == locked)
            return;
        locked?.Lock.Exit();
        lruvec.Lock.Enter();
        locked = lruvec;
    }

    /// <summary>lruvec_add_folio: links the page at the head of the list its PG_active names and sets PG_lru. Preconditions: the lruvec's lock held.</summary>
    private void AddToListLocked(Lruvec lruvec, long pfn)
    {
        LockAssert.Held(lruvec.Lock, "the lru_lock");
        bool active = (_memMap.RawFlags(pfn) & PageFlags.Active) != 0;
        Link(ref active ? ref lruvec.Active : ref lruvec.Inactive, pfn);
        _memMap.SetFlag(pfn, PageFlags.Lru);
    }

    /// <summary>lru_add_drain: this processor slot's batch onto the lists.</summary>
    public void DrainLocal()
    {
        LruAddBatch batch = _batches[Thread.GetCurrentProcessorId() & _batchMask];
        if (Volatile.Read(ref batch.Count) == 0)
            return; // the local batch: a push on this slot by this thread happened before
        batch.Enter();
        if (batch.Count == 0)
            batch.Exit();
        else
            MoveBatchAndExit(batch);
    }

    /// <summary>
    /// lru_add_drain_all: every slot's batch onto the lists. On return every page whose Add happened
    /// before the call (an Add this thread made or saw, through a lock or a PTE) is on its list, or freed.
    /// </summary>
    public void DrainAll() => DrainAll(lockEveryBatch: false);

    /// <summary>
    /// DrainAll. A batch that looks empty is skipped unless <paramref name="lockEveryBatch"/>: an Add
    /// that happened before this call has published its count; only DisableCache must also catch a push
    /// in progress (which read the counter before it was raised), so it takes every spin word.
    /// </summary>
    private void DrainAll(bool lockEveryBatch)
    {
        foreach (LruAddBatch batch in _batches)
        {
            if (!lockEveryBatch && Volatile.Read(ref batch.Count) == 0)
                continue;
            batch.Enter();
            if (batch.Count == 0)
                batch.Exit();
            else
                MoveBatchAndExit(batch);
        }
    }

    /// <summary>lru_cache_disable: from here until <see cref="EnableCache"/>, Add puts pages straight on their lists; the batches are drained.</summary>
    public void DisableCache()
    {
        Interlocked.Increment(ref _disabled);
        DrainAll(lockEveryBatch: true);
    }

    /// <summary>lru_cache_enable: undoes one <see cref="DisableCache"/>.</summary>
    /// <exception cref="VmBugException">the cache was not disabled.</exception>
    public void EnableCache()
    {
        if (Interlocked.Decrement(ref _disabled) < 0)
        {
            Interlocked.Increment(ref _disabled);
            throw new VmBugException("lru_cache_enable without lru_cache_disable");
        }
    }

    // ---- isolation ---------------------------------------------------------------------------------

    /// <summary>
    /// folio_isolate_lru: takes the page off its LRU list for a mechanism that will move it (migration).
    /// False when PG_lru is clear: in an add batch (drain first), already isolated, or not an LRU page.
    /// On true: PG_lru cleared, the page off its list (PG_active kept), one more reference held (the
    /// isolation's), nr_isolated_anon + 1. Preconditions: the caller holds a reference.
    /// </summary>
    public bool Isolate(long pfn)
    {
        long head = _memMap.CompoundHead(pfn);
        LockAssert.Referenced(_memMap, head);
        if (!_memMap.TestFlag(head, PageFlags.Lru))
            return false;
        Lruvec lruvec = LruvecOf(head);
        lock (lruvec.Lock)
            return IsolateLocked(lruvec, head);
    }

    /// <summary>
    /// <see cref="Isolate"/> for several pages, each lruvec's lock taken once per run of pages of one
    /// node (move_pages isolates the pages it looked up under one mmap_lock hold this way).
    /// <paramref name="isolated"/>[i] says whether page i was taken. Preconditions: as Isolate, for each.
    /// </summary>
    public void IsolateMany(ReadOnlySpan<long> pfns, Span<bool> isolated)
    {
        Lruvec? locked = null;
        try
        {
            for (int i = 0; i < pfns.Length; i++)
            {
                long head = _memMap.CompoundHead(pfns[i]);
                LockAssert.Referenced(_memMap, head);
                isolated[i] = false;
                if (!_memMap.TestFlag(head, PageFlags.Lru))
                    continue;
                Lruvec lruvec = LruvecOf(head);
                Relock(ref locked, lruvec);
                isolated[i] = IsolateLocked(lruvec, head);
            }
        }
        finally
        {
            locked?.Lock.Exit();
        }
    }

    /// <summary>The body of an isolation. Preconditions: the lruvec's lock held; the caller holds a reference.</summary>
    private bool IsolateLocked(Lruvec lruvec, long head)
    {
        LockAssert.Held(lruvec.Lock, "the lru_lock");
        // Tested again under the lock: PG_lru only changes under it (another isolator may have won).
        if (!_memMap.TestFlag(head, PageFlags.Lru))
            return false;
        _memMap.GetPage(head); // the isolation's reference
        bool active = _memMap.TestFlag(head, PageFlags.Active);
        Unlink(ref active ? ref lruvec.Active : ref lruvec.Inactive, head);
        _memMap.ClearFlag(head, PageFlags.Lru);
        Link(ref lruvec.Isolated, head);
        return true;
    }

    /// <summary>
    /// folio_putback_lru: an isolated page goes back on its list (the one PG_active names), nr_isolated
    /// - 1, and the isolation's reference is dropped (freeing the page if it was the last). A page
    /// poisoned meanwhile (PG_hwpoison) only leaves the isolated list.
    /// Preconditions: the page isolated by <see cref="Isolate"/>.
    /// </summary>
    /// <exception cref="VmBugException">the page is not isolated.</exception>
    public void Putback(long pfn)
    {
        long head = _memMap.CompoundHead(pfn);
        LockAssert.Referenced(_memMap, head);
        Lruvec lruvec = LruvecOf(head);
        lock (lruvec.Lock)
        {
            UnlinkIsolatedLocked(lruvec, head);
            // A page poisoned while a mover had it isolated (memory failure could not take it off the
            // LRU itself) is retired: it never goes back on a list (Mm/MemoryFailure.cs).
            if ((Volatile.Read(ref _memMap[head].Flags) & (ulong)PageFlags.HWPoison) == 0)
                AddToListLocked(lruvec, head);
        }
        _machine.PutPage(head);
    }

    /// <summary>
    /// The end of an isolation that does not go back (migrate_folio_done for a page that moved): the
    /// page leaves the isolated list (nr_isolated - 1), its PG_active and PG_referenced are cleared (the
    /// new frame carries them: folio_migrate_flags), and the isolation's reference is dropped, which
    /// frees the old frame when it was the last. Preconditions: the page isolated by <see cref="Isolate"/>.
    /// </summary>
    /// <exception cref="VmBugException">the page is not isolated.</exception>
    public void ReleaseIsolated(long pfn) => ReleaseIsolatedMany([pfn]);

    /// <summary>
    /// <see cref="ReleaseIsolated"/> for the pages a migration batch moved: each lruvec's lock taken once
    /// per run of pages of one node, then the isolation references dropped (freeing the old frames)
    /// with no lock held. Preconditions: each page isolated by <see cref="Isolate"/>.
    /// </summary>
    public void ReleaseIsolatedMany(ReadOnlySpan<long> pfns)
    {
        Lruvec? locked = null;
        try
        {
            foreach (long pfn in pfns)
            {
                long head = _memMap.CompoundHead(pfn);
                LockAssert.Referenced(_memMap, head);
                Lruvec lruvec = LruvecOf(head);
                Relock(ref locked, lruvec);
                UnlinkIsolatedLocked(lruvec, head);
                Interlocked.And(ref _memMap[head].Flags, ~(ulong)(PageFlags.Active | PageFlags.Referenced));
            }
        }
        finally
        {
            locked?.Lock.Exit();
        }
        foreach (long pfn in pfns)
            _machine.PutPage(_memMap.CompoundHead(pfn));
    }

    /// <summary>Takes an isolated page off the isolated list. Preconditions: the lruvec's lock held.</summary>
    private void UnlinkIsolatedLocked(Lruvec lruvec, long head)
    {
        LockAssert.Held(lruvec.Lock, "the lru_lock");
        ref PageDescriptor page = ref _memMap[head];
        bool linked = page.LruPrev != PageDescriptor.NoLink || lruvec.Isolated.Head == (uint)head;
        if (_memMap.TestFlag(head, PageFlags.Lru) || !linked)
            throw new VmBugException($"frame {head} is not isolated (flags {_memMap.RawFlags(head)})");
        Unlink(ref lruvec.Isolated, head);
    }

    // ---- aging -------------------------------------------------------------------------------------

    /// <summary>
    /// folio_mark_accessed: the first access sets PG_referenced; a second one, with the page referenced
    /// and inactive, activates it (on its list: moved to the active list; in this processor's add batch:
    /// PG_active set, so the drain puts it on the active list) and clears PG_referenced.
    /// Preconditions: the caller holds a reference.
    /// </summary>
    public void MarkAccessed(long pfn)
    {
        long head = _memMap.CompoundHead(pfn);
        LockAssert.Referenced(_memMap, head);
        PageFlags flags = _memMap.RawFlags(head);
        if ((flags & PageFlags.Referenced) == 0)
        {
            _memMap.SetFlag(head, PageFlags.Referenced);
            return;
        }
        if ((flags & (PageFlags.Active | PageFlags.Unevictable)) != 0)
            return;
        if ((flags & PageFlags.Lru) != 0)
            Activate(head);
        else
            ActivateInLocalBatch(head);
        _memMap.ClearFlag(head, PageFlags.Referenced);
    }

    /// <summary>__lru_cache_activate_folio: a page still in this processor's add batch is marked active, so its drain puts it on the active list.</summary>
    private void ActivateInLocalBatch(long head)
    {
        LruAddBatch batch = _batches[Thread.GetCurrentProcessorId() & _batchMask];
        batch.Enter();
        // Drains read PG_active under this spin word: setting it here cannot race with the page's move.
        for (int i = batch.Count - 1; i >= 0; i--)
        {
            if (batch.Pfns[i] == (uint)head)
            {
                _memMap.SetFlag(head, PageFlags.Active);
                break;
            }
        }
        batch.Exit();
    }

    /// <summary>
    /// folio_activate: a page on its inactive list moves to the active list (PG_active set). Nothing for
    /// a page not on an LRU list, already active or unevictable. Preconditions: the caller holds a reference.
    /// </summary>
    public void Activate(long pfn)
    {
        long head = _memMap.CompoundHead(pfn);
        LockAssert.Referenced(_memMap, head);
        Lruvec lruvec = LruvecOf(head);
        lock (lruvec.Lock)
        {
            PageFlags flags = _memMap.RawFlags(head);
            if ((flags & PageFlags.Lru) == 0 || (flags & (PageFlags.Active | PageFlags.Unevictable)) != 0)
                return;
            Unlink(ref lruvec.Inactive, head);
            _memMap.SetFlag(head, PageFlags.Active);
            Link(ref lruvec.Active, head);
        }
    }

    // ---- freeing -----------------------------------------------------------------------------------

    /// <summary>
    /// __page_cache_release: a page whose last reference was just dropped leaves its LRU list (PG_lru
    /// and PG_active cleared) before the frame goes back to the allocator. Nothing for a page not on a
    /// list. Preconditions: refcount 0 (the caller dropped the last reference; nobody else can reach it
    /// to isolate it, and drains and putbacks hold references of their own).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void PageCacheRelease(long pfn)
    {
        if ((Volatile.Read(ref _memMap[pfn].Flags) & (ulong)PageFlags.Lru) != 0)
            PageCacheReleaseSlow(pfn);
    }

    private void PageCacheReleaseSlow(long pfn)
    {
        LockAssert.That(_memMap[pfn].RefCount == 0, $"frame {pfn} with refcount 0");
        Lruvec lruvec = LruvecOf(pfn);
        lock (lruvec.Lock)
        {
            bool active = _memMap.TestFlag(pfn, PageFlags.Active);
            Unlink(ref active ? ref lruvec.Active : ref lruvec.Inactive, pfn);
            Interlocked.And(ref _memMap[pfn].Flags, ~(ulong)(PageFlags.Lru | PageFlags.Active));
        }
    }

    // ---- list primitives (under the lruvec's lock) -----------------------------------------------

    private void Link(ref LruList list, long pfn)
    {
        ref PageDescriptor page = ref _memMap[pfn];
        page.LruPrev = PageDescriptor.NoLink;
        page.LruNext = list.Head;
        if (list.Head != PageDescriptor.NoLink)
            _memMap[list.Head].LruPrev = (uint)pfn;
        else
            list.Tail = (uint)pfn;
        list.Head = (uint)pfn;
        Volatile.Write(ref list.Count, list.Count + 1);
    }

    private void Unlink(ref LruList list, long pfn)
    {
        ref PageDescriptor page = ref _memMap[pfn];
        if (page.LruPrev != PageDescriptor.NoLink)
            _memMap[page.LruPrev].LruNext = page.LruNext;
        else if (list.Head == (uint)pfn)
            list.Head = page.LruNext;
        else
            throw new VmBugException($"frame {pfn} is not on the LRU list it was to be taken off");
        if (page.LruNext != PageDescriptor.NoLink)
            _memMap[page.LruNext].LruPrev = page.LruPrev;
        else
            list.Tail = page.LruPrev;
        page.LruNext = PageDescriptor.NoLink;
        page.LruPrev = PageDescriptor.NoLink;
        Volatile.Write(ref list.Count, list.Count - 1);
    }

    // ---- stats and audit ---------------------------------------------------------------------------

    /// <summary>nr_inactive_anon, nr_active_anon, nr_isolated_anon of <paramref name="node"/> (racy snapshot).</summary>
    public (long Inactive, long Active, long Isolated) GetCounts(int node)
    {
        Lruvec lruvec = _lruvecs[node];
        return (Volatile.Read(ref lruvec.Inactive.Count), Volatile.Read(ref lruvec.Active.Count), Volatile.Read(ref lruvec.Isolated.Count));
    }

    /// <summary>Pages waiting in add batches, all slots (racy snapshot).</summary>
    public int BatchedPageCount => _batches.Sum(b => Volatile.Read(ref b.Count));

    /// <summary>
    /// Audit's part: walks every list and batch under its lock and reports what is wrong with it (a
    /// flag, node, link or count that disagrees). Returns, in <paramref name="onLists"/>, the pages on
    /// the inactive and active lists, and in <paramref name="held"/> the references held by batches and
    /// isolations, per page (the isolated pages are those of <paramref name="held"/> not in a batch).
    /// </summary>
    public void Audit(List<string> problems, out HashSet<long> onLists, out Dictionary<long, int> held, out HashSet<long> batched)
    {
        onLists = [];
        held = [];
        batched = [];
        var isolatedAll = new HashSet<long>();
        foreach (Lruvec lruvec in _lruvecs)
        {
            lock (lruvec.Lock)
            {
                AuditList(lruvec, ref lruvec.Inactive, "inactive", PageFlags.Lru, problems, onLists);
                AuditList(lruvec, ref lruvec.Active, "active", PageFlags.Lru | PageFlags.Active, problems, onLists);
                var isolated = new HashSet<long>();
                AuditList(lruvec, ref lruvec.Isolated, "isolated", PageFlags.None, problems, isolated);
                foreach (long pfn in isolated)
                {
                    if (!isolatedAll.Add(pfn) || onLists.Contains(pfn))
                        problems.Add($"LRU: isolated frame {pfn} is also on another list");
                    held[pfn] = held.GetValueOrDefault(pfn) + 1;
                }
            }
        }
        for (int slot = 0; slot < _batches.Length; slot++)
        {
            LruAddBatch batch = _batches[slot];
            batch.Enter();
            try
            {
                for (int i = 0; i < batch.Count; i++)
                {
                    long pfn = batch.Pfns[i];
                    if (!batched.Add(pfn))
                        problems.Add($"LRU: frame {pfn} is in add batches twice");
                    if (_memMap.TestFlag(pfn, PageFlags.Lru))
                        problems.Add($"LRU: frame {pfn} in add batch {slot} has PG_lru set");
                    if (onLists.Contains(pfn))
                        problems.Add($"LRU: frame {pfn} is in add batch {slot} and on a list");
                    if (isolatedAll.Contains(pfn))
                        problems.Add($"LRU: frame {pfn} is in add batch {slot} and isolated");
                    held[pfn] = held.GetValueOrDefault(pfn) + 1;
                }
            }
            finally
            {
                batch.Exit();
            }
        }
    }

    /// <summary>Walks one list: links both ways, flags (PG_lru / PG_active exactly <paramref name="expected"/>), node, count. Preconditions: the lruvec's lock held.</summary>
    private void AuditList(Lruvec lruvec, ref LruList list, string name, PageFlags expected, List<string> problems, HashSet<long> seen)
    {
        LockAssert.Held(lruvec.Lock, "the lru_lock");
        long count = 0;
        uint prev = PageDescriptor.NoLink;
        for (uint pfn = list.Head; pfn != PageDescriptor.NoLink; pfn = _memMap[pfn].LruNext)
        {
            if (!_memMap.IsValidPfn(pfn) || !_memMap.IsInitialised(pfn))
            {
                problems.Add($"LRU node {lruvec.Node} {name}: link to frame {pfn}, not a frame in use");
                break;
            }
            if (!seen.Add(pfn) || count > list.Count + 1)
            {
                problems.Add($"LRU node {lruvec.Node} {name}: frame {pfn} met twice (a cycle)");
                break;
            }
            count++;
            ref PageDescriptor page = ref _memMap[pfn];
            if (page.LruPrev != prev)
                problems.Add($"LRU node {lruvec.Node} {name}: frame {pfn}'s prev link is {page.LruPrev}, expected {prev}");
            PageFlags flags = (PageFlags)page.Flags & (PageFlags.Lru | PageFlags.Active);
            if (name == "isolated")
                flags &= PageFlags.Lru; // an isolated page keeps PG_active
            if (flags != expected)
                problems.Add($"LRU node {lruvec.Node} {name}: frame {pfn} has flags {(PageFlags)page.Flags}");
            if (_machine.Topology.NodeOf(pfn) != lruvec.Node)
                problems.Add($"LRU node {lruvec.Node} {name}: frame {pfn} belongs to node {_machine.Topology.NodeOf(pfn)}");
            if (page.RefCount == 0)
                problems.Add($"LRU node {lruvec.Node} {name}: frame {pfn} is free");
            prev = pfn;
        }
        if (list.Tail != prev)
            problems.Add($"LRU node {lruvec.Node} {name}: tail {list.Tail}, last frame walked {prev}");
        if (count != list.Count)
            problems.Add($"LRU node {lruvec.Node} {name}: count {list.Count}, frames on the list {count}");
    }
}
