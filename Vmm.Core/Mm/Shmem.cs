// Shmem: shared anonymous memory (Linux's mm/shmem.c). mmap(MAP_SHARED | MAP_ANONYMOUS) creates a
// ShmemObject (Linux's shmem inode); every VMA that maps it, in the creating process and in its forked
// children, faults its pages from the object's page cache, so all of them see the same frames.
//
// The page cache: index (the page offset in the object) -> frame. A page is created zeroed on its first
// fault (GetPage, shmem_get_folio), tagged as a file page (mapping word = the object's handle, no ANON
// tag; index = its cache index; PG_swapbacked), and lives until the last VMA of the object goes away
// (Release), whatever processes unmap in between.
//
// A new page joins the LRU (Lru.Add) under the object's lock, as shmem_add_to_page_cache's caller does.
//
// Its lock (ShmemObject.Lock) protects the page cache and the VMA list (i_mmap). References: the page
// cache holds one reference per cached page; a fault takes its own reference under the lock (GetPage
// returns with it), which the PTE then owns, so the migrator, which checks references under the same
// lock, never sees one appear behind its back. Release drops the cache's references after the next TLB
// flush (DeferPutPage), since another thread may still read a frame through a cached translation.
//
// A poisoned page (memory failure, Mm/MemoryFailure.cs) leaves the page cache and its index is
// remembered in Poisoned: a fault there gets PoisonedPfn (the fault is a bus error), as Linux's
// shmem_get_folio refuses a hwpoisoned folio it finds in the cache. The frame itself is retired at once.
//
// Why Mm/ and not Rmap/: the object is the backing store of a kind of VMA (it lists Vmas, and the fault
// path and mmap/munmap are its callers); the reverse map only looks it up by handle (RmapWalker,
// MigrationEngine), as it looks up anon_vmas.
using Vmm.Diagnostics;
using Vmm.Memory;

namespace Vmm.Mm;

/// <summary>The object behind shared anonymous mappings (Linux's shmem inode): a page cache by index.</summary>
internal sealed class ShmemObject
{
    private readonly Machine _machine;

    private ShmemObject(Machine machine, long handle)
    {
        _machine = machine;
        Handle = handle;
    }

    /// <summary>Immutable: the key stored in page mapping words.</summary>
    public long Handle { get; }

    /// <summary>The lock of the page cache and the VMA list.</summary>
    public readonly object Lock = new();

    /// <summary>Cached pages by index; each holds one reference. Protected by Lock.</summary>
    public readonly Dictionary<long, long> Pages = [];

    /// <summary>Indexes whose page was poisoned (memory failure); null until the first. Protected by Lock.</summary>
    public HashSet<long>? Poisoned;

    /// <summary>What <see cref="GetPage"/> returns for an index whose page was poisoned.</summary>
    public const long PoisonedPfn = -2;

    /// <summary>VMAs mapping the object (i_mmap). Protected by Lock.</summary>
    public readonly List<Vma> Vmas = [];

    /// <summary>shmem_zero_setup: a new, empty object, registered so that its pages' mapping words find it.</summary>
    public static ShmemObject Create(Machine machine)
    {
        var shmem = new ShmemObject(machine, machine.Mappings.NewHandle());
        machine.Mappings.Register(shmem.Handle, shmem);
        return shmem;
    }

    /// <summary>
    /// shmem_get_folio: the page at <paramref name="index"/>, created zeroed if absent, with a reference
    /// for the caller (<see cref="PoisonedPfn"/>, and no reference, for an index whose page was
    /// poisoned). A new page is placed by <paramref name="policy"/> (the faulting VMA's or task's;
    /// Vmm keeps mbind's policy on the VMA rather than in a shared policy tree of the object) inside the
    /// faulting process's cpuset, interleaved by the object's handle + the index (shmem_get_pgoff_policy).
    /// Preconditions: the faulting mm's mmap_lock held.
    /// </summary>
    public long GetPage(long index, AddressSpace mm, Mempolicy? policy)
    {
        MemMap memMap = _machine.MemMap;
        lock (Lock)
        {
            if (Poisoned is { } poisoned && poisoned.Contains(index))
                return PoisonedPfn;
            if (Pages.TryGetValue(index, out long cached))
            {
                memMap.GetPage(cached);
                return cached;
            }
            long pfn = mm.AllocSharedPage(policy, (ulong)Handle + (ulong)index);
            if (pfn == PageAllocator.NoPfn)
                return PageAllocator.NoPfn;
            ref PageDescriptor page = ref memMap[pfn];
            page.Mapping = (ulong)Handle << 2; // a file mapping: no ANON tag
            page.Index = (ulong)index;
            memMap.SetFlag(pfn, PageFlags.SwapBacked);
            Pages[index] = pfn;
            memMap.GetPage(pfn); // one reference for the page cache, one for the caller
            _machine.Lru.Add(pfn); // shmem pages live on the anon LRU lists (PG_swapbacked)
            return pfn;
        }
    }

    /// <summary>The last VMA of the object went away: drop its page cache. Preconditions: Lock held.</summary>
    public void Release()
    {
        LockAssert.Held(Lock, "the shmem object lock");
        _machine.Mappings.Unregister(Handle);
        foreach (long pfn in Pages.Values)
            _machine.Tlb.DeferPutPage(pfn);
        Pages.Clear();
    }
}
