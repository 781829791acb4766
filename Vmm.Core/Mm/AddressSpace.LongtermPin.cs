// Long-term pins (Linux's FOLL_LONGTERM: __gup_longterm_locked and check_and_migrate_movable_folios in
// mm/gup.c, folio_is_longterm_pinnable in include/linux/mm.h).
//
// A pin that may be held for an unbounded time must not sit in ZONE_MOVABLE: that zone promises that
// every page in it can be moved, which is what lets a block of it always go offline. So a long-term pin
// first pins the range as a short-term pin does, then looks at every pinned page:
//
//   1. collect: a page is long-term pinnable unless it lies in ZONE_MOVABLE (the shared zero page is
//      always pinnable: it is never freed nor moved). Each page that is not is isolated from its LRU
//      list (the per-CPU add batches are drained once when one of them sits in a batch); the count of
//      such pages, isolated or not, decides what follows. None: the pin is done.
//   2. unpin everything (a pinned page cannot be migrated: the engine refuses it), migrate the isolated
//      pages (SYNC, MR_LONGTERM_PIN) to frames allocated without __GFP_MOVABLE on the page's node first
//      (so ZONE_NORMAL, any node when that one is full), and put back whatever did not move;
//   3. any page not migrated (no frame outside ZONE_MOVABLE, or the page busy): the pin fails, as
//      Linux's -ENOMEM, with nothing pinned; otherwise (-EAGAIN) pin the whole range again from step 1:
//      the process's PTEs now name the new frames.
//
// While it runs, the thread's own page allocations leave out ZONE_MOVABLE (Linux's memalloc_pin_save,
// PF_MEMALLOC_PIN): a page the pin faults in (not yet present, copied on write, or unshared from KSM or a
// fork) is placed outside the zone from the start, so only pages that were already there need moving.
//
// Linux retries for as long as a pass returns -EAGAIN, also when nothing could be isolated (a page in
// ZONE_MOVABLE isolated by another migration meanwhile). Vmm retries while migration makes progress and
// bounds the passes that isolate nothing (MaxIdlePasses, sleeping between them): a page can only be
// held off its LRU list for as long as another mover holds it, so giving up after that is an answer,
// not a hang. The give-up is the same InsufficientMemoryException as a failed migration.
//
// Once pinned, a page stays put: the migration engine, KSM and memory offline all refuse a page whose
// references include a pin, and a fault never replaces a present page that is exclusive to the process
// (a pinned anonymous page is PG_anon_exclusive: the pin made it so) or a shared-memory page, so nothing
// moves a long-term pinned page back into ZONE_MOVABLE. Audit checks it (Machine.LongtermPins).
//
// Locking: the pin passes are AddressSpace.Pin.cs's (the mmap_lock for read and the pte lock, per page);
// the isolation takes the lru_lock; the migration runs with no lock held (the engine may sleep on page
// locks), on isolated pages that hold their own references, so the unpinned pages cannot be freed under it.
using System.Runtime.CompilerServices;
using Microsoft.Extensions.ObjectPool;
using Vmm.Memory;
using Vmm.Migration;

namespace Vmm.Mm;

internal sealed partial class AddressSpace
{
    /// <summary>
    /// How many passes in a row may find pages in ZONE_MOVABLE and isolate none of them (each held by
    /// another mover) before a long-term pin gives up. The passes after the first sleep a millisecond.
    /// </summary>
    internal const int MaxIdlePasses = 16;

    /// <summary>
    /// PF_MEMALLOC_PIN (memalloc_pin_save): true while this thread runs a long-term pin, so that the pages
    /// its own faults allocate (a page not yet present, a copy on write, an unshare of a KSM page) are
    /// taken outside ZONE_MOVABLE at once instead of being migrated out right after. Per thread, as Linux's
    /// flag is per task: another thread of the process faulting meanwhile places its pages as usual.
    /// </summary>
    [ThreadStatic]
    private static bool t_memallocPin;

    /// <summary>
    /// current_gfp_context for user pages: __GFP_MOVABLE cleared while this thread runs a long-term pin
    /// (<see cref="t_memallocPin"/>). On the fault path: one thread-static read per page allocated.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static AllocFlags CurrentAllocContext(AllocFlags flags) => t_memallocPin ? flags & ~AllocFlags.Movable : flags;

    private static readonly ObjectPool<LongtermPinContext> LongtermContexts =
        new DefaultObjectPool<LongtermPinContext>(new LongtermPinContextPolicy(), Math.Max(4, Environment.ProcessorCount * 2));

    /// <summary>
    /// pin_user_pages with FOLL_LONGTERM when <paramref name="longTerm"/> (else the short-term
    /// <see cref="Pin(ulong, ulong, bool)"/>): pins every page of the range after moving each page that lies
    /// in ZONE_MOVABLE out of it. The same checks and exceptions as the short-term pin; in addition
    /// InsufficientMemoryException when a page could not be moved out of ZONE_MOVABLE (no free frame
    /// outside it, or the page held busy by someone else: Linux's -ENOMEM). Pins nothing then.
    /// </summary>
    public PinnedMemory Pin(ulong address, ulong length, bool write, bool longTerm)
    {
        if (!longTerm)
            return Pin(address, length, write);
        CheckPinRange(address, length, write);
        LongtermPinContext context = LongtermContexts.Get();
        context.Machine = _machine;
        bool savedMemallocPin = t_memallocPin; // memalloc_pin_save
        t_memallocPin = true;
        try
        {
            int idlePasses = 0;
            while (true)
            {
                PinRange(address, length, write, context.Frames);
                int collected = CollectLongtermUnpinnable(context);
                if (collected == 0)
                {
                    var pin = new PinnedMemory(_machine, address, length, [.. context.Frames], write, longTerm: true);
                    context.Frames.Clear(); // the pins now belong to the PinnedMemory
                    return pin;
                }
                // A pinned page cannot be migrated: let go of the whole range first, as Linux does. The pages
                // to move keep their isolation's reference, so none is freed meanwhile.
                UnpinAll(context.Frames);
                if (context.Movable.Count == 0)
                {
                    // Every page to move was off its LRU list: another migration holds it. Wait for it.
                    if (++idlePasses > MaxIdlePasses)
                        throw new InsufficientMemoryException(
                            $"long-term pin of 0x{address:x} (+{length}): {collected} page(s) in ZONE_MOVABLE stayed isolated by another mover for {MaxIdlePasses} passes");
                    if (idlePasses == 1)
                        Thread.Yield();
                    else
                        Thread.Sleep(1);
                    continue;
                }
                idlePasses = 0;
                int notMoved = MigrateLongtermUnpinnable(context);
                if (notMoved != 0)
                    throw new InsufficientMemoryException(notMoved < 0
                        ? $"long-term pin of 0x{address:x} (+{length}): no free frame outside ZONE_MOVABLE to move a page to"
                        : $"long-term pin of 0x{address:x} (+{length}): {notMoved} page(s) in ZONE_MOVABLE could not be moved out (busy)");
                // -EAGAIN: every page moved; pin the range again, through the new frames.
            }
        }
        finally
        {
            t_memallocPin = savedMemallocPin; // memalloc_pin_restore
            // Reached with pins or isolated pages left only through an exception on the way: nothing stays.
            UnpinAll(context.Frames);
            if (context.Movable.Count != 0)
                _machine.Migration.PutbackMovablePages(context.Movable);
            LongtermContexts.Return(context);
        }
    }

    /// <summary>
    /// folio_is_longterm_pinnable: false for a page in ZONE_MOVABLE, true for any other (and for the
    /// shared zero page wherever it lies: it never moves and is never freed).
    /// </summary>
    internal static bool IsLongtermPinnable(Machine machine, long pfn) =>
        pfn == machine.ZeroPagePfnIfAllocated || machine.Allocator.ZoneOf(pfn).Type != ZoneType.Movable;

    /// <summary>
    /// collect_longterm_unpinnable_folios: isolates each pinned page of <paramref name="context"/> that is
    /// not long-term pinnable onto its movable list. A page that sits in an LRU add batch is isolatable once
    /// the batches are drained (done once per pass, on the first such page, as Linux's lru_add_drain_all);
    /// one that is still not isolatable (isolated by another mover, or met twice in the range) is counted
    /// without being listed.
    /// </summary>
    /// <returns>the number of pages that are not long-term pinnable, listed or not.</returns>
    private int CollectLongtermUnpinnable(LongtermPinContext context)
    {
        Machine machine = _machine;
        int collected = 0;
        bool drained = false;
        foreach (long pfn in context.Frames)
        {
            if (IsLongtermPinnable(machine, pfn))
                continue;
            collected++;
            // The pin's reference is the one Isolate asks the caller to hold.
            bool isolated = machine.Lru.Isolate(pfn);
            if (!isolated && !drained && !machine.MemMap.TestFlag(pfn, PageFlags.Lru))
            {
                // A page faulted in by this pin is still in an add batch (PG_lru clear, no list).
                machine.Lru.DrainAll();
                drained = true;
                isolated = machine.Lru.Isolate(pfn);
            }
            if (isolated)
                context.Movable.Add(pfn);
        }
        return collected;
    }

    /// <summary>
    /// migrate_longterm_unpinnable_folios (after the unpin): migrates the isolated pages of
    /// <paramref name="context"/> out of ZONE_MOVABLE (SYNC, MR_LONGTERM_PIN) and puts back what did not
    /// move. Preconditions: no pin held on them, no lock held.
    /// </summary>
    /// <returns>0 when every page moved; else the engine's answer (the pages not moved, or -ENOMEM).</returns>
    private int MigrateLongtermUnpinnable(LongtermPinContext context)
    {
        MigrationEngine engine = _machine.Migration;
        int rc = engine.MigratePages(context.Movable, context.Allocate, null, MigrateMode.Sync, MigrateReason.LongtermPin, out _);
        int left = context.Movable.Count; // exactly the pages not migrated, still isolated
        if (left != 0)
            engine.PutbackMovablePages(context.Movable);
        return rc != 0 ? rc : left;
    }

    /// <summary>A long-term pin's work lists (pooled).</summary>
    private sealed class LongtermPinContext
    {
        /// <summary>The machine of the pin under way.</summary>
        public Machine Machine = null!;

        /// <summary>The frames pinned by the current pass, in range order.</summary>
        public readonly List<long> Frames = [];

        /// <summary>The isolated pages to move out of ZONE_MOVABLE: the engine's <c>from</c> list.</summary>
        public readonly List<long> Movable = [];

        /// <summary>
        /// alloc_migration_target with GFP_USER (no __GFP_MOVABLE, no __GFP_THISNODE): a frame outside
        /// ZONE_MOVABLE, on the page's node first, not zeroed. Built once per context.
        /// </summary>
        public readonly Func<long, long> Allocate;

        // The allocator closes over the context, not over a call: one delegate per pooled context.
        public LongtermPinContext() =>
            Allocate = src => Machine.Allocator.AllocPages(0, AllocFlags.NoZero, Machine.Topology.NodeOf(src));
    }

    private sealed class LongtermPinContextPolicy : IPooledObjectPolicy<LongtermPinContext>
    {
        public LongtermPinContext Create() => new();

        public bool Return(LongtermPinContext context)
        {
            context.Machine = null!;
            context.Frames.Clear();
            context.Movable.Clear();
            return true;
        }
    }
}
