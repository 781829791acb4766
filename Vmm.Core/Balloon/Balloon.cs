// Balloon: the memory balloon (Linux's drivers/virtio/virtio_balloon.c over mm/balloon_compaction.c),
// the user of non-LRU movable pages inside Vmm. The host inflates it to take frames away from the machine
// and gives their memory back to the operating system (the host's RSS falls); it deflates it to give them
// back to the machine's allocator.
//
//   inflate  frames are allocated movable (they may come from ZONE_MOVABLE; above the watermarks, never
//            dipping into reserves: it stops quietly when memory runs out), up to 256 at a time (Linux's
//            VIRTIO_BALLOON_ARRAY_PFNS_MAX); each is marked PG_offline, the batch's memory is decommitted
//            in runs of contiguous frames (one madvise per run; a refused decommit zeroes the frame
//            instead, so a ballooned frame always reads zero), and only then do they join the balloon's
//            list: a frame not on the list refuses isolation, so no mover can take one whose memory is
//            still being given back;
//   deflate  frames leave the list, lose PG_offline and are freed as PG_zeroed (they read zero: their next
//            user needs no zeroing and commits nothing until it writes);
//   migrate  (balloon_page_isolate / balloon_page_migrate / balloon_page_putback, through MovableOperations)
//            isolation takes a frame off the list; a migration gives the new frame's memory back, marks it
//            PG_offline and lists it (no copy: a ballooned frame has no contents), and the VM frees the
//            old frame; a putback lists the frame again. Offline and compaction therefore move balloon
//            frames instead of failing on them.
//
// Counters, as Linux's vm events: balloon_inflate, balloon_deflate, balloon_migrate (pages).
//
// Locking: _lock (b_dev_info->pages_lock) protects the two lists; the callbacks take it under the page
// lock(s) (page lock -> balloon lock), so inflate and deflate never hold it while they allocate, decommit
// or free (the free waits for a page lock). It is a leaf: nothing is taken under it.
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Native;

namespace Vmm;

/// <summary>
/// The machine's memory balloon (Linux's virtio-balloon): <see cref="Inflate"/> takes frames away from the
/// machine and gives their memory back to the host; <see cref="Deflate"/> returns them to the allocator.
/// Ballooned frames are movable: memory offline and compaction migrate them instead of failing.
/// </summary>
/// <remarks>
/// This type is thread-safe: all members may be called concurrently, and concurrently with migrations
/// of its frames. <see cref="Pages"/> and the counters are exact when no other call is in progress.
/// </remarks>
public sealed class Balloon : MovableOperations
{
    /// <summary>VIRTIO_BALLOON_ARRAY_PFNS_MAX: frames inflated or deflated per batch.</summary>
    private const int BatchSize = 256;

    private readonly Machine _machine;
    private readonly Lock _lock = new();

    /// <summary>Ballooned frames a mover may isolate (b_dev_info->pages). Protected by _lock.</summary>
    private readonly FrameList _pages = new();

    /// <summary>Ballooned frames a mover has isolated (counted by b_dev_info->isolated_pages). Protected by _lock.</summary>
    private readonly HashSet<long> _isolated = [];

    private long _inflated;
    private long _deflated;
    private long _migrated;

    internal Balloon(Machine machine) => _machine = machine;

    /// <summary>Frames in the balloon now (on its list or isolated by a mover).</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public long Pages
    {
        get
        {
            using MachineCall call = _machine.EnterCall();
            lock (_lock)
                return _pages.Count + _isolated.Count;
        }
    }

    /// <summary>The bytes of <see cref="Pages"/>.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public long Bytes => Pages * Topology.PageSize;

    /// <summary>balloon_inflate: pages inflated so far.</summary>
    public long Inflated => Volatile.Read(ref _inflated);

    /// <summary>balloon_deflate: pages deflated so far.</summary>
    public long Deflated => Volatile.Read(ref _deflated);

    /// <summary>balloon_migrate: balloon pages migrated so far (by offline, compaction or any mover).</summary>
    public long Migrated => Volatile.Read(ref _migrated);

    /// <summary>
    /// Takes up to <paramref name="pages"/> frames from the machine and gives their memory back to the
    /// host. Stops quietly when no frame is free above the watermarks.
    /// </summary>
    /// <returns>the frames taken (fewer than asked when memory ran out).</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="pages"/> is negative.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public long Inflate(long pages)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(pages);
        using MachineCall call = _machine.EnterCall();
        Span<long> batch = stackalloc long[BatchSize];
        long taken = 0;
        while (taken < pages)
        {
            int want = (int)Math.Min(BatchSize, pages - taken);
            int n = 0;
            while (n < want)
            {
                // No zeroing: the memory is given back below, which zeroes it anyway.
                long pfn = _machine.MovablePages.Allocate(this, AllocFlags.NoZero, -1);
                if (pfn == PageAllocator.NoPfn)
                    break;
                batch[n++] = pfn;
            }
            if (n == 0)
                break;
            GiveBack(batch[..n]);
            // Listed last: until now a mover's isolate callback refuses these frames (not on the list).
            lock (_lock)
            {
                foreach (long pfn in batch[..n])
                    _pages.Add(pfn);
            }
            Interlocked.Add(ref _inflated, n);
            taken += n;
            if (n < want)
                break;
        }
        return taken;
    }

    /// <summary>Returns up to <paramref name="pages"/> ballooned frames to the machine's allocator (they read zero).</summary>
    /// <returns>the frames returned (fewer than asked when the balloon holds fewer on its list).</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="pages"/> is negative.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public long Deflate(long pages)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(pages);
        using MachineCall call = _machine.EnterCall();
        Span<long> batch = stackalloc long[BatchSize];
        long returned = 0;
        while (returned < pages)
        {
            int want = (int)Math.Min(BatchSize, pages - returned);
            int n = 0;
            // balloon_page_list_dequeue: off the list under the lock (isolated frames are not on it); once
            // off it, no mover can isolate them (the callback refuses), so they are freed with no lock held.
            lock (_lock)
            {
                while (n < want && _pages.Count > 0)
                    batch[n++] = _pages.RemoveLast();
            }
            if (n == 0)
                break;
            foreach (long pfn in batch[..n])
            {
                _machine.MemMap.ClearFlag(pfn, PageFlags.Offline);
                _machine.MovablePages.Free(this, pfn, zeroed: true);
            }
            Interlocked.Add(ref _deflated, n);
            returned += n;
        }
        return returned;
    }

    /// <summary>
    /// Marks the frames PG_offline and gives their memory back in runs of contiguous frames. A refused
    /// decommit (the host's, or injected) zeroes the frame instead. Preconditions: the frames are the
    /// balloon's and on no list (nobody else touches them).
    /// </summary>
    private unsafe void GiveBack(Span<long> frames)
    {
        frames.Sort();
        int start = 0;
        for (int i = 1; i <= frames.Length; i++)
        {
            if (i < frames.Length && frames[i] == frames[i - 1] + 1)
                continue;
            long first = frames[start];
            long count = i - start;
            if (!_machine.Allocator.TryDecommit(first, count))
            {
                for (long pfn = first; pfn < first + count; pfn++)
                    PageOps.Zero(_machine.Arena.FrameAddress(pfn));
            }
            start = i;
        }
        foreach (long pfn in frames)
            _machine.MemMap.SetFlag(pfn, PageFlags.Offline);
    }

    /// <summary>balloon_page_isolate: a frame on the list leaves it for the mover. Preconditions: its page lock held.</summary>
    protected internal override bool IsolatePage(long pfn, IsolateMode mode)
    {
        LockAssert.PageLocked(_machine.PageLock, pfn);
        lock (_lock)
        {
            if (!_pages.Remove(pfn))
                return false; // being inflated or deflated
            _isolated.Add(pfn);
            return true;
        }
    }

    /// <summary>
    /// balloon_page_migrate: the new frame takes the old one's place (its memory given back, PG_offline,
    /// listed); nothing to copy. The VM frees the old frame. Preconditions: both page locks held.
    /// </summary>
    protected internal override Errno MigratePage(long newPfn, long oldPfn, MigrateMode mode)
    {
        LockAssert.PageLocked(_machine.PageLock, oldPfn);
        LockAssert.PageLocked(_machine.PageLock, newPfn);
        GiveBack([newPfn]);
        lock (_lock)
        {
            if (!_isolated.Remove(oldPfn))
                throw new VmBugException($"balloon frame {oldPfn} migrated but not isolated");
            _pages.Add(newPfn);
        }
        _machine.MemMap.ClearFlag(oldPfn, PageFlags.Offline);
        Interlocked.Increment(ref _migrated);
        return Errno.None;
    }

    /// <summary>balloon_page_putback: the frame is listed again. Preconditions: its page lock held.</summary>
    protected internal override void PutbackPage(long pfn)
    {
        LockAssert.PageLocked(_machine.PageLock, pfn);
        lock (_lock)
        {
            if (!_isolated.Remove(pfn))
                throw new VmBugException($"balloon frame {pfn} put back but not isolated");
            _pages.Add(pfn);
        }
    }

    /// <summary>Audit: the listed frames are exactly the frames tagged with the balloon, each PG_offline; none isolated at quiet.</summary>
    internal override void Audit(Machine machine, IReadOnlySet<long> frames, List<string> problems)
    {
        lock (_lock)
        {
            if (_isolated.Count != 0)
                problems.Add($"balloon: {_isolated.Count} frames isolated at quiet");
            foreach (long pfn in _pages)
            {
                if (!frames.Contains(pfn))
                    problems.Add($"balloon: listed frame {pfn} does not carry the balloon's tag");
                else if (!machine.MemMap.TestFlag(pfn, PageFlags.Offline))
                    problems.Add($"balloon: frame {pfn} lacks PG_offline");
            }
            foreach (long pfn in frames)
                if (!_pages.Contains(pfn) && !_isolated.Contains(pfn))
                    problems.Add($"balloon: frame {pfn} carries the balloon's tag but is not on its list");
        }
    }

    /// <summary>
    /// The balloon's list: add, remove any frame (an isolation) and take the last (a deflate) in O(1),
    /// so deflating a large balloon stays linear. Not thread-safe: used under the balloon's lock.
    /// </summary>
    private sealed class FrameList : IEnumerable<long>
    {
        private readonly List<long> _frames = [];
        private readonly Dictionary<long, int> _index = [];

        public int Count => _frames.Count;

        public bool Contains(long pfn) => _index.ContainsKey(pfn);

        public void Add(long pfn)
        {
            _index.Add(pfn, _frames.Count);
            _frames.Add(pfn);
        }

        public bool Remove(long pfn)
        {
            if (!_index.Remove(pfn, out int at))
                return false;
            long last = _frames[^1];
            _frames.RemoveAt(_frames.Count - 1);
            if (last != pfn)
            {
                _frames[at] = last;
                _index[last] = at;
            }
            return true;
        }

        public long RemoveLast()
        {
            long pfn = _frames[^1];
            Remove(pfn);
            return pfn;
        }

        public IEnumerator<long> GetEnumerator() => _frames.GetEnumerator();

        System.Collections.IEnumerator System.Collections.IEnumerable.GetEnumerator() => GetEnumerator();
    }
}
