// MovableOperations: the callbacks through which a component that owns frames outside the LRU lists
// lets the VM move them (Linux's struct movable_operations, include/linux/migrate.h: isolate_page,
// migrate_page, putback_page). The balloon (Balloon/Balloon.cs) is the one inside Vmm; a host
// application can write its own and get frames for it from Machine.MovablePages.
//
// Such a frame carries its owner in its mapping word (handle << 2 | PAGE_MAPPING_MOVABLE, the handle the
// owner's entry in Machine.Mappings); the tag, not a flag, says "non-LRU movable". The owner holds one
// reference on each of its frames. The VM alone sets and clears PG_isolated, under the page lock:
//   isolate  (MigrationEngine.IsolatePage: trylock, tag and !PG_isolated checked, IsolatePage asked,
//            PG_isolated set, one more reference: the isolation's);
//   migrate  (MigrationEngine's move step, both frames locked: MigratePage asked; on None the VM moves
//            the tag and the owner's reference to the new frame, clears PG_isolated and frees the old);
//   putback  (MigrationEngine.PutbackMovablePages: PutbackPage asked, PG_isolated cleared, the
//            isolation's reference dropped).
// An owner that frees an isolated page (MovablePages.FreePage) clears its tag only; the isolation's
// holder finishes it, and the migration counts it as moved, as Linux does.
//
// Locking: the callbacks run under the page lock (both page locks for MigratePage), so an owner's own
// lock nests inside page locks (page lock -> owner lock); an owner must therefore never wait for a page
// lock (call MovablePages.FreePage) while holding a lock its callbacks take. _registration (a leaf) guards
// the owner's handle and page count.
using Vmm.Memory;

namespace Vmm;

/// <summary>
/// The callbacks of an owner of non-LRU movable frames (Linux's <c>struct movable_operations</c>): the
/// migration engine, memory offline and compaction ask the owner before they isolate one of its frames,
/// ask it to move the contents to a new frame, and give back a frame they did not move. Frames come from
/// <see cref="Machine.MovablePages"/>.
/// </summary>
/// <remarks>
/// This type is thread-safe: its registration state is guarded internally. The VM calls the callbacks
/// from any thread that migrates pages, concurrently for different frames, with the frame's page lock
/// held (both frames' for <see cref="MigratePage"/>); an implementation protects its own structures with
/// its own lock, and must not call <see cref="MovablePages.FreePage"/> while holding a lock its callbacks
/// take (the free waits for the page lock). Callbacks must not call <see cref="MovablePages.FreePage"/>
/// (it throws <see cref="InvalidOperationException"/> there). An owner belongs to the
/// first machine it allocates a frame from.
/// </remarks>
public abstract class MovableOperations
{
    private readonly Lock _registration = new();
    private Machine? _machine;
    private long _handle;
    private long _pages;

    /// <summary>
    /// isolate_page: the VM wants to take <paramref name="pfn"/> for migration. Return true if the
    /// owner lets it go (it then stops using the frame until <see cref="MigratePage"/> or
    /// <see cref="PutbackPage"/>), false to refuse (the frame stays where it is, and a memory offline
    /// names it as the reason it failed).
    /// </summary>
    /// <param name="pfn">one of the owner's frames; its page lock is held.</param>
    /// <param name="mode">how the mover works (<see cref="IsolateMode.AsyncMigrate"/>: it will not wait).</param>
    protected internal abstract bool IsolatePage(long pfn, IsolateMode mode);

    /// <summary>
    /// migrate_page: move the isolated frame <paramref name="oldPfn"/> to <paramref name="newPfn"/> (copy
    /// what the owner needs with <see cref="MovablePages.CopyPage"/>, and point its own structures at the
    /// new frame). On <see cref="Errno.None"/> the VM moves the owner's tag and reference to the new frame
    /// and frees the old one; <see cref="Errno.EAGAIN"/> asks to be tried again later; anything else gives
    /// up for this call (the frame is put back).
    /// </summary>
    /// <param name="newPfn">a fresh frame (contents undefined), locked.</param>
    /// <param name="oldPfn">the isolated frame, locked.</param>
    /// <param name="mode">how hard the migration tries.</param>
    protected internal abstract Errno MigratePage(long newPfn, long oldPfn, MigrateMode mode);

    /// <summary>
    /// putback_page: an isolated frame was not migrated and is the owner's again (the VM clears
    /// PG_isolated after this returns).
    /// </summary>
    /// <param name="pfn">the frame; its page lock is held.</param>
    protected internal abstract void PutbackPage(long pfn);

    /// <summary>Frames the owner holds now (allocated and not freed, moved ones counted once).</summary>
    public long PageCount => Volatile.Read(ref _pages);

    /// <summary>The machine this owner belongs to, or null before its first frame.</summary>
    internal Machine? Machine => Volatile.Read(ref _machine);

    /// <summary>The owner's handle in Machine.Mappings while it holds frames, else 0.</summary>
    internal long Handle => Volatile.Read(ref _handle);

    /// <summary>The mapping word of the owner's frames. Preconditions: the owner holds a frame (the handle is live).</summary>
    internal ulong MappingWord => (ulong)Handle << 2 | PageDescriptor.MappingMovable;

    /// <summary>
    /// Counts a new frame for the owner; the first registers the owner's handle in
    /// <paramref name="machine"/>'s mapping registry. Returns the mapping word to store in the frame.
    /// </summary>
    /// <exception cref="ArgumentException">the owner belongs to another machine.</exception>
    internal ulong AddPage(Machine machine)
    {
        lock (_registration)
        {
            if (_machine is null)
                Volatile.Write(ref _machine, machine);
            else if (_machine != machine)
                throw new ArgumentException($"this owner's frames belong to {_machine}, not to {machine}");
            if (_pages == 0)
            {
                long handle = machine.Mappings.NewHandle();
                machine.Mappings.Register(handle, this);
                Volatile.Write(ref _handle, handle);
            }
            Volatile.Write(ref _pages, _pages + 1);
            return (ulong)_handle << 2 | PageDescriptor.MappingMovable;
        }
    }

    /// <summary>Uncounts a frame the owner let go; the last unregisters the handle (a later frame gets a new one).</summary>
    internal void RemovePage(Machine machine)
    {
        lock (_registration)
        {
            if (_pages <= 0)
                throw new VmBugException($"movable owner {GetType().Name} frees more frames than it holds");
            Volatile.Write(ref _pages, _pages - 1);
            if (_pages == 0)
            {
                machine.Mappings.Unregister(_handle);
                Volatile.Write(ref _handle, 0);
            }
        }
    }

    /// <summary>The owner's share of Machine.Audit: its own structures against the frames the VM found tagged with it (none by default).</summary>
    internal virtual void Audit(Machine machine, IReadOnlySet<long> frames, List<string> problems)
    {
    }
}
