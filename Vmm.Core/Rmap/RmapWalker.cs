// RmapWalker: from a frame to every PTE that maps it (Linux's mm/rmap.c: rmap_walk and its users).
//
// An anonymous page names its anon_vma; each VMA on that anon_vma's list may map it, at the address its
// index gives. A shared (shmem) page names its object; each VMA of the object may map it. The walk
// visits each candidate mapping under the anon_vma (or object) lock, which keeps every visited VMA and
// its page tables alive: munmap and exit unlink a VMA under that lock before they free its tables.
//
// On top of the walk: PageReferenced (test and clear accessed bits), TryToUnmap (replace every mapping
// with a non-present entry; TryToMigrate makes them migration entries, later swap entries;
// TryToUnmapPoisoned hwpoison entries, for memory failure) and
// RemoveMigrationPtes (map the page, or its replacement, back where the migration entries are). The
// migration engine unmaps a whole batch of pages before one flush: TryToMigrate with an UnmapBatch
// (UnmapBatch.cs, Linux's TTU_BATCH_FLUSH) collects the touched mms and FlushBatch flushes them. A KSM
// page has no anon_vma of its own: Walk hands it to Ksm.RmapWalk (rmap_walk_ksm, Ksm/Ksm.Rmap.cs).
// The caller holds the page lock; the walk takes the anon_vma lock (or shmem lock), then each pte lock.
//
// Lock order: page lock -> anon_vma lock (or shmem lock) -> pte lock.
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Mm;

namespace Vmm.Rmap;

/// <summary>How an rmap walk visits the mappings of a page (Linux's struct rmap_walk_control).</summary>
internal sealed class RmapWalkControl
{
    /// <summary>Called for each VMA that may map the page, with the address there. Return false to stop the walk.</summary>
    public required Func<long, Vma, ulong, bool> RmapOne { get; init; }

    /// <summary>Called after each mapping; return true when the walk can stop (for example: no mappings left).</summary>
    public Func<long, bool>? Done { get; init; }

    /// <summary>Replaces the default anon_vma lookup and lock; returns the locked anon_vma or null to skip the walk.</summary>
    public Func<long, AnonVma?>? AnonLock { get; init; }

    /// <summary>Return true to skip a VMA.</summary>
    public Func<Vma, bool>? InvalidVma { get; init; }

    /// <summary>Only try the anon_vma lock; on contention, set Contended and give up.</summary>
    public bool TryLock { get; init; }

    /// <summary>Set when TryLock found the lock taken.</summary>
    public bool Contended { get; set; }
}

/// <summary>The reverse-map walks of a machine.</summary>
internal sealed unsafe class RmapWalker
{
    private readonly Machine _machine;

    public RmapWalker(Machine machine) => _machine = machine;

    /// <summary>
    /// rmap_walk: visits every VMA that may map <paramref name="pfn"/>. Preconditions: the caller holds
    /// the page lock (or a reference and TryLock), so the page's mapping cannot change under the walk;
    /// for a KSM page the ksm_thread_mutex will do too (the Auditor's walk), as its stable node's item
    /// list is changed only with both held.
    /// </summary>
    public void Walk(long pfn, RmapWalkControl control)
    {
        ref PageDescriptor page = ref _machine.MemMap[_machine.MemMap.CompoundHead(pfn)];
        ulong mapping = Volatile.Read(ref page.Mapping);
        ulong tag = mapping & PageDescriptor.MappingTagMask;
        long handle = (long)(mapping >> 2);
#if DEBUG
        LockAssert.That(_machine.PageLock.IsLocked(pfn) || (control.TryLock && _machine.MemMap.RefCount(pfn) > 0) ||
                        (tag == PageDescriptor.MappingKsm && _machine.Ksm is { IsThreadMutexHeldByCurrentThread: true }),
            $"the page lock of frame {pfn} held, or a reference to it and TryLock (or, for a KSM page, the ksm_thread_mutex)");
#endif
        if (mapping == 0 || tag == PageDescriptor.MappingMovable)
            return;
        ulong index = page.Index;
        if (tag == PageDescriptor.MappingAnon)
        {
            AnonVma? anonVma;
            if (control.AnonLock is { } customLock)
            {
                anonVma = customLock(pfn);
                if (anonVma is null)
                    return;
            }
            else
            {
                anonVma = _machine.Mappings.Find<AnonVma>(handle);
                if (anonVma is null || !LockAnonVma(anonVma, control))
                    return;
            }
            try
            {
                // No copy of the list: every change to it is made under the lock held here, and no
                // visitor changes it (a copy per walk was two allocations per migrated page).
                List<AnonVmaChain> chains = anonVma.Chains;
                for (int i = 0; i < chains.Count; i++)
                {
                    if (!Visit(pfn, chains[i].Vma, index, control))
                        return;
                }
            }
            finally
            {
                anonVma.Lock.Exit();
            }
            return;
        }
        if (tag == PageDescriptor.MappingKsm)
        {
            _machine.Ksm?.RmapWalk(pfn, handle, control); // through the stable node's items
            return;
        }
        ShmemObject? shmem = _machine.Mappings.Find<ShmemObject>(handle);
        if (shmem is null)
            return;
        lock (shmem.Lock)
        {
            foreach (Vma vma in shmem.Vmas.ToArray())
            {
                if (!Visit(pfn, vma, index, control))
                    return;
            }
        }
    }

    /// <summary>
    /// anon_vma_lock_read, or its trylock for a control with TryLock: false (Contended set) if the lock
    /// was taken by someone else. The caller unlocks with anonVma.Lock.Exit().
    /// </summary>
    internal static bool LockAnonVma(AnonVma anonVma, RmapWalkControl control)
    {
        if (!control.TryLock)
        {
            anonVma.Lock.Enter();
            return true;
        }
        if (anonVma.Lock.TryEnter())
            return true;
        control.Contended = true;
        return false;
    }

    /// <summary>
    /// Replaces the PTE that maps <paramref name="address"/> in the VMA's mm, under its pte lock, with
    /// what <paramref name="change"/> makes of it (null: leave it), then runs <paramref name="onChanged"/>
    /// with the old value. The replacement is a compare-and-swap: the access path sets accessed and
    /// dirty bits without the pte lock, and none of them may be lost. Returns whether the PTE changed.
    /// </summary>
    private static bool ChangePte(Vma vma, ulong address, Func<Pte, Pte?> change, Action<Pte>? onChanged = null)
    {
        AddressSpace mm = vma.Mm;
        ulong* slot = mm.FindPte(address, out long ptePfn);
        if (slot == null)
            return false;
        mm.LockPte(ptePfn);
        try
        {
            while (true)
            {
                ulong old = Volatile.Read(ref *slot);
                if (change(new Pte(old)) is not { } replacement)
                    return false;
                if (Interlocked.CompareExchange(ref *slot, replacement.Value, old) != old)
                    continue; // an accessed or dirty bit arrived meanwhile: decide again
                onChanged?.Invoke(new Pte(old));
                return true;
            }
        }
        finally
        {
            mm.UnlockPte(ptePfn);
        }
    }

    private static bool Visit(long pfn, Vma vma, ulong index, RmapWalkControl control)
    {
        if (vma.AddressOf(index) is not ulong address)
            return true;
        if (control.InvalidVma?.Invoke(vma) == true)
            return true;
        if (!control.RmapOne(pfn, vma, address))
            return false;
        return control.Done?.Invoke(pfn) != true;
    }

    /// <summary>
    /// folio_referenced: test-and-clears the accessed bit of every PTE that maps the page. Returns how
    /// many mappings had been referenced. Like x86 Linux, it does not flush: a translation cached in a
    /// software TLB keeps working and is counted again only after its next refill.
    /// </summary>
    public int PageReferenced(long pfn)
    {
        int referenced = 0;
        Walk(pfn, new RmapWalkControl
        {
            RmapOne = (page, vma, address) =>
            {
                if (ChangePte(vma, address, pte => pte.IsPresent && !pte.IsSpecial && pte.Pfn == page && pte.IsAccessed ? pte.WithoutFlags(Pte.AccessedBit) : null))
                    referenced++;
                return true;
            },
        });
        return referenced;
    }

    /// <summary>
    /// try_to_migrate: replaces every PTE that maps <paramref name="pfn"/> with a migration entry
    /// naming it, then flushes once. The entry records how the page was mapped: writable, read-only but
    /// exclusive to its process, or read-only and shared; while it is unmapped, PG_anon_exclusive lives
    /// in the entries (as in Linux), so that a fork meanwhile can make it shared. RSS keeps counting the
    /// entries. Returns true if no mapping is left.
    /// Preconditions: the page lock is held; the caller holds its own reference.
    /// </summary>
    public bool TryToMigrate(long pfn)
    {
        var batch = new UnmapBatch(_machine.MemMap);
        bool unmapped = TryToMigrate(pfn, batch);
        FlushBatch(batch);
        return unmapped;
    }

    /// <summary>
    /// try_to_migrate with TTU_BATCH_FLUSH: as <see cref="TryToMigrate(long)"/>, without the flush; the
    /// mms whose PTEs changed are added to <paramref name="batch"/>, and the caller flushes them with
    /// <see cref="FlushBatch"/> before it copies or frees the page. Returns true if no mapping is left.
    /// Preconditions: the page lock is held; the caller holds its own reference.
    /// </summary>
    public bool TryToMigrate(long pfn, UnmapBatch batch)
    {
        LockAssert.PageLocked(_machine.PageLock, pfn);
        LockAssert.Referenced(_machine.MemMap, pfn);
        MemMap memMap = _machine.MemMap;
        Walk(pfn, batch.MigrateControl);
        bool unmapped = memMap.MapCount(pfn) == 0;
        if (unmapped)
            memMap.ClearFlag(pfn, PageFlags.AnonExclusive);
        return unmapped;
    }

    /// <summary>
    /// try_to_unmap_flush: bumps the generation of every mm the batch touched and runs one TLB flush
    /// for all of them (none if nothing changed). After it, no thread reaches any page the batch
    /// unmapped through a stale translation.
    /// </summary>
    public void FlushBatch(UnmapBatch batch)
    {
        if (batch.Touched.Count == 0)
            return;
        List<(AddressSpace Mm, FlushMarks Marks)> flushing = batch.Flushing;
        foreach (AddressSpace mm in batch.Touched)
            flushing.Add((mm, mm.ReadFlushMarks())); // before the bump: the flush covers them
        foreach (AddressSpace mm in batch.Touched)
            mm.BumpGeneration();
        batch.Touched.Clear();
        _machine.Tlb.Flush();
        foreach ((AddressSpace mm, FlushMarks marks) in flushing)
            mm.FlushedUpTo(marks);
        flushing.Clear();
    }

    /// <summary>
    /// try_to_unmap: replaces every PTE that maps <paramref name="pfn"/> with the non-present entry
    /// <paramref name="entryFor"/> makes of it (a migration entry; a swap entry once swap exists),
    /// dropping each mapping's mapcount and reference and moving a dirty bit to PG_dirty, then flushes
    /// once, so that no thread still reaches the frame through a stale translation.
    /// <paramref name="invalidVma"/> may exclude VMAs (whose mappings then stay). Returns true if no
    /// mapping is left. Preconditions: the page lock is held; the caller holds its own reference.
    /// </summary>
    public bool TryToUnmap(long pfn, Func<Pte, Pte> entryFor, Func<Vma, bool>? invalidVma) =>
        Unmap(pfn, entryFor, invalidVma, dropRss: false);

    /// <summary>
    /// try_to_unmap with TTU_HWPOISON (memory failure): every PTE that maps <paramref name="pfn"/> becomes
    /// a hwpoison entry, so that an access there is a bus error. Each mapping's mapcount, reference and
    /// RSS go (Linux's dec_mm_counter: the entry counts in no RSS); a dirty bit moves to PG_dirty. One
    /// flush at the end, after which no thread reaches the frame through a stale translation. Returns
    /// true if no mapping is left. Preconditions: the page lock is held; the caller holds its own reference.
    /// </summary>
    public bool TryToUnmapPoisoned(long pfn) => Unmap(pfn, static pte => Pte.HwPoisonEntry(pte.Pfn), invalidVma: null, dropRss: true);

    /// <summary>
    /// The body of both unmaps: each PTE that maps <paramref name="pfn"/> becomes the entry
    /// <paramref name="entryFor"/> gives, losing its mapcount and reference (and, with
    /// <paramref name="dropRss"/>, its RSS count: an entry that counts in no RSS), a dirty bit moved to
    /// PG_dirty; one flush at the end. Preconditions: the page lock is held; the caller holds its own reference.
    /// </summary>
    private bool Unmap(long pfn, Func<Pte, Pte> entryFor, Func<Vma, bool>? invalidVma, bool dropRss)
    {
        LockAssert.PageLocked(_machine.PageLock, pfn);
        LockAssert.Referenced(_machine.MemMap, pfn);
        MemMap memMap = _machine.MemMap;
        var touched = new HashSet<AddressSpace>();
        Walk(pfn, new RmapWalkControl
        {
            RmapOne = (page, vma, address) =>
            {
                bool unmapped = ChangePte(vma, address,
                    pte => pte.IsPresent && !pte.IsSpecial && pte.Pfn == page ? entryFor(pte) : null,
                    old =>
                    {
                        if (old.IsDirty)
                            memMap.SetFlag(page, PageFlags.Dirty);
                        vma.Mm.MarkUnmapFlushPending(); // flushed at the walk's end
                        Interlocked.Decrement(ref memMap[page].MapCount);
                        if (dropRss)
                            Interlocked.Decrement(ref vma.IsShared ? ref vma.Mm.RssShmem : ref vma.Mm.RssAnon);
                        // The entry holds no reference.
                        if (memMap.PutPageTestZero(page))
                            throw new VmBugException($"try_to_unmap dropped the last reference of frame {page}");
                    });
                if (unmapped)
                    touched.Add(vma.Mm);
                return true;
            },
            Done = page => memMap.MapCount(page) == 0,
            InvalidVma = invalidVma,
        });
        var flushing = touched.Select(mm => (Mm: mm, Marks: mm.ReadFlushMarks())).ToList(); // before the bump: the flush covers them
        foreach (AddressSpace mm in touched)
            mm.BumpGeneration();
        if (touched.Count > 0)
            _machine.Tlb.Flush();
        foreach ((AddressSpace mm, FlushMarks marks) in flushing)
            mm.FlushedUpTo(marks);
        return memMap.MapCount(pfn) == 0;
    }

    /// <summary>
    /// remove_migration_ptes: every migration entry naming <paramref name="oldPfn"/> in the mappings of
    /// <paramref name="newPfn"/> (which carries the old page's mapping and index) becomes a present PTE
    /// of <paramref name="newPfn"/> again, with a reference and a mapcount each. Protection comes from
    /// the VMA as it is now (an mprotect may have run meanwhile), writability from the entry; an
    /// exclusive entry makes the page PG_anon_exclusive again.
    /// Preconditions: both pages locked (the walk of the new page needs its lock, as Linux's
    /// rmap_walk_locked does; the migrator locks the new frame before any PTE or cache names it).
    /// </summary>
    public void RemoveMigrationPtes(long oldPfn, long newPfn) => RemoveMigrationPtes(oldPfn, newPfn, new UnmapBatch(_machine.MemMap));

    /// <summary>
    /// remove_migration_ptes with the walk control of <paramref name="batch"/> (no allocation).
    /// Preconditions: both pages locked.
    /// </summary>
    public void RemoveMigrationPtes(long oldPfn, long newPfn, UnmapBatch batch)
    {
        LockAssert.PageLocked(_machine.PageLock, oldPfn);
        LockAssert.PageLocked(_machine.PageLock, newPfn);
        batch.PrepareRestore(oldPfn, newPfn);
        Walk(newPfn, batch.RestoreControl);
    }
}
