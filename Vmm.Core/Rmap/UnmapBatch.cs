// UnmapBatch: try_to_migrate without the flush (Linux's TTU_BATCH_FLUSH and its struct
// tlbflush_unmap_batch): the migration engine unmaps up to 512 pages, collecting the mms whose PTEs
// changed, and flushes once for the whole batch (RmapWalker.FlushBatch, Linux's try_to_unmap_flush)
// before it copies any of them.
//
// Why deferring the flush is safe: until the flush, a thread may still read or write an old frame
// through a translation cached before its PTE became a migration entry. Nothing is copied, verified
// as final, or freed before the flush, and restoring an old frame's own PTEs (a page that backs off)
// is harmless whether or not the flush has run: the translation it replaces named the same frame.
//
// The walk controls are built once per batch and their callbacks are this object's methods, so a walk
// allocates nothing; the engine pools the batches (MigrationEngine.cs).
//
// Locking: the caller holds the page lock of the page walked (and of the new frame, for a restore); the
// walk takes the anon_vma (or shmem) lock and each pte lock (RmapWalker.cs). One thread uses a batch
// at a time.
using Vmm.Memory;
using Vmm.Mm;

namespace Vmm.Rmap;

/// <summary>
/// The mms touched by unflushed try_to_migrate walks, and the allocation-free walk controls that
/// change their PTEs. Not thread-safe: one migration owns it at a time.
/// </summary>
internal sealed unsafe class UnmapBatch
{
    private readonly MemMap _memMap;
    private long _restoreOld;
    private long _restoreNew;

    public UnmapBatch(MemMap memMap)
    {
        _memMap = memMap;
        MigrateControl = new RmapWalkControl { RmapOne = MigrateOne, Done = IsUnmapped };
        RestoreControl = new RmapWalkControl { RmapOne = RestoreOne };
    }

    /// <summary>The mms whose PTEs changed since the last flush (Linux's tlbflush_unmap_batch cpumask).</summary>
    public HashSet<AddressSpace> Touched { get; } = [];

    /// <summary>FlushBatch's list of the touched mms and their batched-flush marks, read before its flush (reused).</summary>
    public List<(AddressSpace Mm, FlushMarks Marks)> Flushing { get; } = [];

    /// <summary>try_to_migrate_one for every mapping, no flush.</summary>
    internal RmapWalkControl MigrateControl { get; }

    /// <summary>remove_migration_pte for every mapping of the page being restored.</summary>
    internal RmapWalkControl RestoreControl { get; }

    /// <summary>Sets the frames the next restore walk looks for and installs.</summary>
    internal void PrepareRestore(long oldPfn, long newPfn)
    {
        _restoreOld = oldPfn;
        _restoreNew = newPfn;
    }

    private bool IsUnmapped(long pfn) => _memMap.MapCount(pfn) == 0;

    // The entry records how the page was mapped: writable, read-only but exclusive to its process, or
    // read-only and shared. Exclusivity is read for each PTE under its pte lock, not once before the
    // walk: a fork that runs meanwhile clears PG_anon_exclusive (under the parent's pte lock) before it
    // shares the page, and an entry made from a stale "exclusive" would let both processes write one
    // frame. The replacement is a compare-and-swap: the access path sets accessed and dirty bits
    // without the pte lock, and none may be lost (a dirty bit moves to PG_dirty).
    private bool MigrateOne(long pfn, Vma vma, ulong address)
    {
        AddressSpace mm = vma.Mm;
        ulong* slot = mm.FindPte(address, out long ptePfn);
        if (slot == null)
            return true;
        mm.LockPte(ptePfn);
        try
        {
            while (true)
            {
                ulong old = Volatile.Read(ref *slot);
                var pte = new Pte(old);
                if (!pte.IsPresent || pte.IsSpecial || pte.Pfn != pfn)
                    return true;
                int type = pte.IsWrite ? Pte.MigrationWriteType
                    : _memMap.TestFlag(pfn, PageFlags.AnonExclusive) ? Pte.MigrationReadExclusiveType
                    : Pte.MigrationReadType;
                if (Interlocked.CompareExchange(ref *slot, Pte.SwapEntry(type, pfn).Value, old) != old)
                    continue; // an accessed or dirty bit arrived meanwhile: decide again
                if (pte.IsDirty)
                    _memMap.SetFlag(pfn, PageFlags.Dirty);
                _memMap.Trace?.Record(pfn, Vmm.Diagnostics.FrameEvent.MigUnmap, Vmm.Diagnostics.FrameTrace.At(mm.Id, address));
                mm.MarkUnmapFlushPending(); // flushed with the batch (FlushBatch), or by a zap, mprotect or fork first
                Interlocked.Decrement(ref _memMap[pfn].MapCount);
                // The entry holds no reference; RSS keeps counting it.
                if (_memMap.PutPageTestZero(pfn))
                    throw new VmBugException($"try_to_migrate dropped the last reference of frame {pfn}");
                Touched.Add(mm);
                return true;
            }
        }
        finally
        {
            mm.UnlockPte(ptePfn);
        }
    }

    // Protection comes from the VMA as it is now (an mprotect may have run meanwhile), writability from
    // the entry; an exclusive entry makes the page PG_anon_exclusive again. A non-present entry becoming
    // present needs no flush: no translation of it can be cached.
    private bool RestoreOne(long pfn, Vma vma, ulong address)
    {
        AddressSpace mm = vma.Mm;
        ulong* slot = mm.FindPte(address, out long ptePfn);
        if (slot == null)
            return true;
        long oldPfn = _restoreOld;
        long newPfn = _restoreNew;
        mm.LockPte(ptePfn);
        try
        {
            var pte = new Pte(Volatile.Read(ref *slot));
            if (!pte.IsMigrationEntry || pte.SwapOffset != oldPfn)
                return true;
            bool write = pte.SwapType == Pte.MigrationWriteType && vma.CanWrite;
            Volatile.Write(ref *slot, Pte.Make(newPfn, write, dirty: write, accessed: true, user: vma.CanRead).Value);
            _memMap.GetPage(newPfn);
            _memMap.Trace?.Record(newPfn, Vmm.Diagnostics.FrameEvent.MigRestore, Vmm.Diagnostics.FrameTrace.At(mm.Id, address));
            Interlocked.Increment(ref _memMap[newPfn].MapCount);
            if (pte.IsExclusiveMigrationEntry && !vma.IsShared)
                _memMap.SetFlag(newPfn, PageFlags.AnonExclusive);
            return true;
        }
        finally
        {
            mm.UnlockPte(ptePfn);
        }
    }
}
