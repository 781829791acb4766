// MovablePages: frames for owners of non-LRU movable pages (MovableOperations.cs), and the VM's side of
// their life: allocation with the owner's tag (Linux's __SetPageMovable after an alloc_page), free
// (__ClearPageMovable + put_page), the copy a migrate callback does (migrate_page_copy's data part),
// and an owner's reads and writes of its frames. The isolate / migrate / putback steps live in
// MigrationEngine (isolate_movable_ops_page, move_to_new_folio's movable branch, putback_movable_ops_page);
// they call the owner through the Call* helpers here, which remember on the thread which frames a callback
// was called for, so that CopyPage and FreePage can tell a misuse from a use.
//
// Locking: AllocatePage takes the allocator's locks and the owner's registration lock (a leaf); FreePage
// takes the page lock (sleeping: never call it holding a lock the owner's callbacks take, nor from a
// callback) and then the registration lock; Read, Write and CopyPage take none (the
// owner serialises its own accesses with its migrate callback, as Linux's drivers do with their locks).
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Migration;
using Vmm.Native;

namespace Vmm;

/// <summary>
/// Frames for owners of non-LRU movable pages (<see cref="MovableOperations"/>): allocated with the
/// owner's tag, so migration, memory offline and compaction move them by asking the owner.
/// </summary>
/// <remarks>
/// This type is thread-safe: all members may be called concurrently. The owner serialises its own
/// <see cref="Read"/> / <see cref="Write"/> of a frame with its migrate callback (a frame it reads may
/// be moving otherwise).
/// </remarks>
public sealed unsafe class MovablePages
{
    [ThreadStatic] private static bool t_inCallback;
    [ThreadStatic] private static long t_callbackPfn;
    [ThreadStatic] private static long t_callbackNewPfn;

    private readonly Machine _machine;

    internal MovablePages(Machine machine) => _machine = machine;

    /// <summary>
    /// Allocates a zeroed frame for <paramref name="owner"/>, tagged as its non-LRU movable page (it may
    /// come from ZONE_MOVABLE). The owner holds its one reference until <see cref="FreePage"/>.
    /// </summary>
    /// <param name="owner">the frame's owner; it belongs to this machine from its first frame on.</param>
    /// <param name="pfn">the frame, or -1.</param>
    /// <param name="node">the node to try first, or -1 for node 0's order of preference.</param>
    /// <returns><see cref="Errno.None"/>, or ENOMEM when no frame is free above the watermarks.</returns>
    /// <exception cref="ArgumentNullException"><paramref name="owner"/> is null.</exception>
    /// <exception cref="ArgumentOutOfRangeException">no such node.</exception>
    /// <exception cref="ArgumentException">the owner belongs to another machine.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno AllocatePage(MovableOperations owner, out long pfn, int node = -1)
    {
        ArgumentNullException.ThrowIfNull(owner);
        using MachineCall call = _machine.EnterCall();
        if (node < -1 || node >= _machine.Topology.NodeCount)
            throw new ArgumentOutOfRangeException(nameof(node), node, "no such node");
        pfn = Allocate(owner, AllocFlags.Movable, node);
        return pfn == PageAllocator.NoPfn ? Errno.ENOMEM : Errno.None;
    }

    /// <summary>
    /// The allocation proper (no call marker): a frame with the owner's tag and reference, or NoPfn.
    /// Preconditions: inside a machine call.
    /// </summary>
    internal long Allocate(MovableOperations owner, AllocFlags flags, int node)
    {
        if (owner.Machine is { } other && other != _machine)
            throw new ArgumentException($"this owner's frames belong to {other}, not to {_machine}", nameof(owner));
        long pfn = _machine.Allocator.AllocPages(0, flags | AllocFlags.Movable, node);
        if (pfn == PageAllocator.NoPfn)
            return PageAllocator.NoPfn;
        ulong mapping;
        try
        {
            mapping = owner.AddPage(_machine);
        }
        catch
        {
            _machine.PutPage(pfn);
            throw;
        }
        // Published after the count: an audit or a scanner that sees the tag finds the owner registered.
        Volatile.Write(ref _machine.MemMap[pfn].Mapping, mapping);
        return pfn;
    }

    /// <summary>
    /// Gives <paramref name="pfn"/> back: its tag is cleared and the owner's reference dropped, which frees
    /// it, unless a mover has it isolated: then the mover finishes it (a migration counts it as moved).
    /// Waits for the frame's page lock: do not call it while holding a lock the owner's callbacks take.
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="owner"/> is null.</exception>
    /// <exception cref="ArgumentException">the frame is not one of <paramref name="owner"/>'s.</exception>
    /// <exception cref="InvalidOperationException">called from a movable_operations callback (it could wait for a page lock its own thread holds).</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void FreePage(MovableOperations owner, long pfn)
    {
        ArgumentNullException.ThrowIfNull(owner);
        using MachineCall call = _machine.EnterCall();
        Free(owner, pfn, zeroed: false);
    }

    /// <summary>
    /// The free proper (no call marker). <paramref name="zeroed"/>: the frame reads zero (its memory was
    /// given back), so it is freed as PG_zeroed and its next user need not zero it.
    /// Preconditions: inside a machine call; no page lock held.
    /// </summary>
    internal void Free(MovableOperations owner, long pfn, bool zeroed)
    {
        // Not from a callback at all: it runs under page locks (its own frame's, and a migration batch may
        // hold up to 1,024 more), and a free waits for a page lock, so it could wait for its own thread.
        if (t_inCallback)
            throw new InvalidOperationException($"frame {pfn} cannot be freed from a movable_operations callback (the caller holds page locks the free could wait for)");
        MemMap memMap = _machine.MemMap;
        // A reference of our own first: a wrong pfn may name a free frame, whose lock we must not touch.
        if (!_machine.Topology.IsValidPfn(pfn) || !_machine.Allocator.IsPfnOnline(pfn) || !memMap.IsInitialised(pfn) ||
            !memMap.TryGetPageUnlessZero(pfn))
            throw new ArgumentException($"frame {pfn} is not a page of this owner (it is free or does not exist)", nameof(pfn));
        bool isolated;
        _machine.PageLock.Lock(pfn);
        try
        {
            ref PageDescriptor page = ref memMap[pfn];
            if (owner.Handle == 0 || Volatile.Read(ref page.Mapping) != owner.MappingWord)
                throw new ArgumentException($"frame {pfn} is not a page of this owner", nameof(pfn));
            // __ClearPageMovable: from here no mover can isolate it; one that has it isolated sees the tag
            // gone and finishes it (MigrationEngine: "freed from under us").
            Volatile.Write(ref page.Mapping, 0);
            isolated = (Volatile.Read(ref page.Flags) & (ulong)PageFlags.Isolated) != 0;
        }
        catch
        {
            _machine.PageLock.Unlock(pfn);
            _machine.PutPage(pfn);
            throw;
        }
        _machine.PageLock.Unlock(pfn);
        owner.RemovePage(_machine);
        _machine.PutPage(pfn); // ours
        if (!zeroed || isolated)
        {
            _machine.PutPage(pfn); // the owner's: frees it unless an isolation still holds it
            return;
        }
        if (memMap.PutPageTestZero(pfn))
            _machine.Allocator.FreeFrozenZeroedPage(pfn);
    }

    /// <summary>
    /// Copies the contents of <paramref name="oldPfn"/> to <paramref name="newPfn"/>: for use inside
    /// <see cref="MovableOperations.MigratePage"/>, for the frames it was called with.
    /// </summary>
    /// <exception cref="InvalidOperationException">not called from a migrate callback for these two frames.</exception>
    public void CopyPage(long newPfn, long oldPfn)
    {
        if (!t_inCallback || t_callbackPfn != oldPfn || t_callbackNewPfn != newPfn)
            throw new InvalidOperationException($"CopyPage({newPfn}, {oldPfn}) is for a MigratePage callback called with these two frames");
        PageOps.Copy(_machine.Arena.FrameAddress(newPfn), _machine.Arena.FrameAddress(oldPfn));
    }

    /// <summary>Reads <paramref name="destination"/>.Length bytes of the owner's frame <paramref name="pfn"/> from <paramref name="offset"/>.</summary>
    /// <exception cref="ArgumentNullException"><paramref name="owner"/> is null.</exception>
    /// <exception cref="ArgumentException">the frame is not one of <paramref name="owner"/>'s.</exception>
    /// <exception cref="ArgumentOutOfRangeException">the range leaves the frame.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void Read(MovableOperations owner, long pfn, int offset, Span<byte> destination)
    {
        ArgumentNullException.ThrowIfNull(owner);
        using MachineCall call = _machine.EnterCall();
        CheckAccess(owner, pfn, offset, destination.Length);
        new ReadOnlySpan<byte>(_machine.Arena.FrameAddress(pfn) + offset, destination.Length).CopyTo(destination);
    }

    /// <summary>Writes <paramref name="source"/> into the owner's frame <paramref name="pfn"/> at <paramref name="offset"/>.</summary>
    /// <exception cref="ArgumentNullException"><paramref name="owner"/> is null.</exception>
    /// <exception cref="ArgumentException">the frame is not one of <paramref name="owner"/>'s.</exception>
    /// <exception cref="ArgumentOutOfRangeException">the range leaves the frame.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public void Write(MovableOperations owner, long pfn, int offset, ReadOnlySpan<byte> source)
    {
        ArgumentNullException.ThrowIfNull(owner);
        using MachineCall call = _machine.EnterCall();
        CheckAccess(owner, pfn, offset, source.Length);
        source.CopyTo(new Span<byte>(_machine.Arena.FrameAddress(pfn) + offset, source.Length));
    }

    private void CheckAccess(MovableOperations owner, long pfn, int offset, int length)
    {
        if (offset < 0 || length < 0 || offset > Topology.PageSize - length)
            throw new ArgumentOutOfRangeException(nameof(offset), offset, $"{length} bytes at {offset} leave a {Topology.PageSize}-byte frame");
        // Racy on purpose (no reference, no lock): the owner holds the frame, so the tag is stable for it,
        // except across its own migrate callback, which it serialises with its accesses.
        if (!_machine.Topology.IsValidPfn(pfn) || !_machine.Allocator.IsPfnOnline(pfn) || !_machine.MemMap.IsInitialised(pfn) ||
            owner.Handle == 0 || Volatile.Read(ref _machine.MemMap[pfn].Mapping) != owner.MappingWord)
            throw new ArgumentException($"frame {pfn} is not a page of this owner", nameof(pfn));
    }

    /// <summary>The owner of a frame tagged MOVABLE (the tag read by the caller), or null if it let go.</summary>
    internal MovableOperations? OwnerOf(ulong mapping) =>
        (mapping & PageDescriptor.MappingTagMask) == PageDescriptor.MappingMovable
            ? _machine.Mappings.Find<MovableOperations>((long)(mapping >> 2))
            : null;

    /// <summary>isolate_page, with the thread's callback context set. Preconditions: the page lock held.</summary>
    internal bool CallIsolate(MovableOperations owner, long pfn, IsolateMode mode)
    {
        LockAssert.PageLocked(_machine.PageLock, pfn);
        Enter(pfn, -1, out (bool, long, long) saved);
        try
        {
            return owner.IsolatePage(pfn, mode);
        }
        finally
        {
            Leave(saved);
        }
    }

    /// <summary>migrate_page, with the thread's callback context set. Preconditions: both page locks held.</summary>
    internal Errno CallMigrate(MovableOperations owner, long newPfn, long oldPfn, MigrateMode mode)
    {
        LockAssert.PageLocked(_machine.PageLock, oldPfn);
        LockAssert.PageLocked(_machine.PageLock, newPfn);
        Enter(oldPfn, newPfn, out (bool, long, long) saved);
        try
        {
            return owner.MigratePage(newPfn, oldPfn, mode);
        }
        finally
        {
            Leave(saved);
        }
    }

    /// <summary>putback_page, with the thread's callback context set. Preconditions: the page lock held.</summary>
    internal void CallPutback(MovableOperations owner, long pfn)
    {
        LockAssert.PageLocked(_machine.PageLock, pfn);
        Enter(pfn, -1, out (bool, long, long) saved);
        try
        {
            owner.PutbackPage(pfn);
        }
        finally
        {
            Leave(saved);
        }
    }

    private static void Enter(long pfn, long newPfn, out (bool, long, long) saved)
    {
        saved = (t_inCallback, t_callbackPfn, t_callbackNewPfn);
        t_inCallback = true;
        t_callbackPfn = pfn;
        t_callbackNewPfn = newPfn;
    }

    private static void Leave((bool InCallback, long Pfn, long NewPfn) saved)
    {
        t_inCallback = saved.InCallback;
        t_callbackPfn = saved.Pfn;
        t_callbackNewPfn = saved.NewPfn;
    }
}
