// RmapWalker: from a frame to every PTE that maps it (Linux's mm/rmap.c: rmap_walk and its users).
//
// An anonymous page names its anon_vma; each VMA on that anon_vma's list may map it, at the address its
// index gives. A shared (shmem) page names its object; each VMA of the object may map it. The walk
// visits each candidate mapping under the anon_vma (or object) lock, which keeps every visited VMA and
// its page tables alive: munmap and exit unlink a VMA under that lock before they free its tables.
//
// On top of the walk: PageReferenced (test and clear accessed bits), TryToUnmap (replace every mapping
// with a non-present entry: a migration entry, later a swap entry) and RemoveMigrationPtes (map the
// page, or its replacement, back where the migration entries are).
//
// Lock order: page lock -> anon_vma lock (or shmem lock) -> pte lock.
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
    /// the page lock (or a reference and TryLock), so the page's mapping cannot change under the walk.
    /// </summary>
    public void Walk(long pfn, RmapWalkControl control)
    {
        ref PageDescriptor page = ref _machine.MemMap[_machine.MemMap.CompoundHead(pfn)];
        ulong mapping = Volatile.Read(ref page.Mapping);
        ulong tag = mapping & PageDescriptor.MappingTagMask;
        long handle = (long)(mapping >> 2);
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
                if (anonVma is null)
                    return;
                if (control.TryLock)
                {
                    if (!Monitor.TryEnter(anonVma.Lock))
                    {
                        control.Contended = true;
                        return;
                    }
                }
                else
                {
                    Monitor.Enter(anonVma.Lock);
                }
            }
            try
            {
                foreach (AnonVmaChain chain in anonVma.Chains.ToArray())
                {
                    if (!Visit(pfn, chain.Vma, index, control))
                        return;
                }
            }
            finally
            {
                Monitor.Exit(anonVma.Lock);
            }
            return;
        }
        if (tag == PageDescriptor.MappingKsm)
            return; // KSM pages are walked through their stable node (the KSM issue)
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
    /// Runs <paramref name="change"/> on the PTE that maps <paramref name="address"/> in the VMA's mm,
    /// under its pte lock; <paramref name="change"/> returns the new value, or null to leave it.
    /// Returns whether the PTE was changed.
    /// </summary>
    private static bool ChangePte(Vma vma, ulong address, Func<Pte, Pte?> change)
    {
        AddressSpace mm = vma.Mm;
        ulong* slot = mm.FindPte(address, out long ptePfn);
        if (slot == null)
            return false;
        mm.LockPte(ptePfn);
        try
        {
            Pte? value = change(new Pte(Volatile.Read(ref *slot)));
            if (value is { } changed)
                Volatile.Write(ref *slot, changed.Value);
            return value is not null;
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
    /// naming it (write or read, as the PTE was), then flushes once. RSS keeps counting the entries, as
    /// in Linux. Returns true if no mapping is left.
    /// Preconditions: the page lock is held; the caller holds its own reference.
    /// </summary>
    public bool TryToMigrate(long pfn) =>
        TryToUnmap(pfn, pte => Pte.SwapEntry(pte.IsWrite ? Pte.MigrationWriteType : Pte.MigrationReadType, pte.Pfn), null);

    /// <summary>
    /// try_to_unmap: replaces every PTE that maps <paramref name="pfn"/> with the non-present entry
    /// <paramref name="entryFor"/> makes of it (a migration entry; a swap entry once swap exists),
    /// dropping each mapping's mapcount and reference, then flushes once, so that no thread still
    /// reaches the frame through a stale translation. <paramref name="invalidVma"/> may exclude VMAs
    /// (whose mappings then stay). Returns true if no mapping is left.
    /// Preconditions: the page lock is held; the caller holds its own reference.
    /// </summary>
    public bool TryToUnmap(long pfn, Func<Pte, Pte> entryFor, Func<Vma, bool>? invalidVma)
    {
        MemMap memMap = _machine.MemMap;
        var touched = new HashSet<AddressSpace>();
        Walk(pfn, new RmapWalkControl
        {
            RmapOne = (page, vma, address) =>
            {
                bool unmapped = ChangePte(vma, address, pte =>
                {
                    if (!pte.IsPresent || pte.IsSpecial || pte.Pfn != page)
                        return null;
                    Interlocked.Decrement(ref memMap[page].MapCount);
                    // The entry holds no reference.
                    if (memMap.PutPageTestZero(page))
                        throw new VmBugException($"try_to_unmap dropped the last reference of frame {page}");
                    return entryFor(pte);
                });
                if (unmapped)
                    touched.Add(vma.Mm);
                return true;
            },
            Done = page => memMap.MapCount(page) == 0,
            InvalidVma = invalidVma,
        });
        foreach (AddressSpace mm in touched)
            mm.BumpGeneration();
        if (touched.Count > 0)
            _machine.FlushTlb();
        return memMap.MapCount(pfn) == 0;
    }

    /// <summary>
    /// remove_migration_ptes: every migration entry naming <paramref name="oldPfn"/> in the mappings of
    /// <paramref name="newPfn"/> (which carries the old page's mapping and index) becomes a present PTE
    /// of <paramref name="newPfn"/> again, with a reference and a mapcount each.
    /// Preconditions: both pages locked (or the new one not yet visible to anyone else).
    /// </summary>
    public void RemoveMigrationPtes(long oldPfn, long newPfn)
    {
        MemMap memMap = _machine.MemMap;
        Walk(newPfn, new RmapWalkControl
        {
            RmapOne = (page, vma, address) =>
            {
                ChangePte(vma, address, pte =>
                {
                    if (!pte.IsMigrationEntry || pte.SwapOffset != oldPfn)
                        return null;
                    bool write = pte.SwapType == Pte.MigrationWriteType && vma.CanWrite;
                    memMap.GetPage(newPfn);
                    Interlocked.Increment(ref memMap[newPfn].MapCount);
                    return Pte.Make(newPfn, write, dirty: write, accessed: true);
                });
                return true;
            },
        });
    }
}
