// MemoryFailure: what happens to a frame whose memory failed, or that is about to (Linux's
// mm/memory-failure.c: memory_failure, soft_offline_page, get_hwpoison_page, hwpoison_user_mappings,
// page_handle_poison). Machine.MemoryFailure; entered through madvise(MADV_HWPOISON / MADV_SOFT_OFFLINE)
// (AddressSpace.MemoryFailure.cs, madvise_inject_error) and through the pfn calls
// Machine.HardOfflinePage / SoftOfflinePage (sysfs's hard_offline_page and soft_offline_page).
//
// Hard offline (memory_failure): the frame's contents are lost. The frame gets PG_hwpoison and is
// counted (num_poisoned_pages, /proc/meminfo's HardwareCorrupted); every PTE that maps it becomes a
// hwpoison entry (RmapWalker.TryToUnmapPoisoned: mapcount, reference and RSS go), so that an access
// there, in any process, a forked child's included, faults with VM_FAULT_HWPOISON and the host sees a
// BusError; it leaves its LRU list (delete_from_lru_cache); a shared page leaves its object's page cache
// and the object remembers the index (a fault there is a bus error too); its mapping word is cleared.
// What is left is a retired frame: PG_hwpoison, one reference (the one memory_failure took, never put),
// unmapped, on no list, no mapping (issue12-design.md, "A poisoned, retired frame"). Any other reference
// (a pin) makes the call EBUSY (MF_FAILED), as in Linux, but the frame stays poisoned and unmapped; when
// that holder puts its reference the frame is simply retired: a put never reaches zero, so it never
// returns to the allocator (PG_hwpoison is in CheckAtFree: reaching the free path would be a bug).
// A free frame is taken off the buddy lists (PageAllocator.TakePageOffBuddy) and retired the same way.
//
// Soft offline (soft_offline_page): the contents are still good. A page in use is isolated from its LRU
// list and migrated (MigrateReason.MemoryFailure: the engine keeps the old frame's reference instead of
// freeing it), then the old frame is retired (page_handle_poison); the processes never notice. A free
// frame is taken off the buddy lists. A frame poisoned already is success (nothing to do).
//
// Where Vmm refuses before poisoning and Linux poisons anyway (so that a PG_hwpoison frame is always a
// retired one, which the offline of a memory block and the Audit rely on): the zero page and other
// PG_reserved frames, page tables and any other frame that is neither free nor an LRU page, and a KSM
// page (hard offline only: Linux before 6.6 refused KSM pages, later ones collect and unmap their
// mappings through the stable node). Linux marks such a frame PG_hwpoison and answers EBUSY (MF_IGNORED);
// Vmm answers EBUSY and leaves it alone. Soft offline answers EIO for them, as Linux does.
//
// Errors, in Linux's numbers: ENXIO a pfn outside the machine; EHWPOISON a hard offline of a frame
// poisoned already (EFAULT from madvise when the caller maps it nowhere any more); EBUSY as above and when
// other references remain (or, for a soft offline, the page could not be isolated or moved); EIO a soft
// offline of an unhandlable page; ENOMEM no frame to move the page to.
//
// Locking: the memory-failure mutex (_mutex, Linux's mf_mutex) serialises every call; under it the page
// lock, then (inside the reverse map, the LRU, the migration engine and the allocator) their own locks.
// It is taken holding no other lock (no mmap_lock either: madvise's GUP step takes it for read and
// releases it before), and nothing takes it from inside another lock.
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Migration;

namespace Vmm.Mm;

/// <summary>Memory failure handling of one machine (Linux's mm/memory-failure.c). Thread-safe: calls are serialised.</summary>
internal sealed class MemoryFailure
{
    /// <summary>get_any_page's passes before a page that is neither free nor on an LRU list is given up.</summary>
    private const int ShakePasses = 3;

    private readonly Machine _machine;

    /// <summary>mf_mutex: one memory failure or soft offline at a time.</summary>
    private readonly Lock _mutex = new();

    /// <summary>num_poisoned_pages: frames with PG_hwpoison. Raised under _mutex, lowered atomically (Forget), read atomically.</summary>
    private long _poisonedPages;

    public MemoryFailure(Machine machine) => _machine = machine;

    /// <summary>num_poisoned_pages: frames poisoned or retired so far (HardwareCorrupted is this times the page size).</summary>
    public long PoisonedPages => Volatile.Read(ref _poisonedPages);

    /// <summary>
    /// memory_failure: poisons <paramref name="pfn"/> (see the file overview).
    /// </summary>
    /// <param name="pfn">the failed frame.</param>
    /// <param name="countIncreased">MF_COUNT_INCREASED: the caller holds a reference to the frame, which
    /// this call takes over (it becomes the retirement's, or is put on a refusal).</param>
    /// <param name="current">MF_ACTION_REQUIRED: the process whose access (madvise) found the frame; for a
    /// frame poisoned already, EHWPOISON if it still maps the frame there, else EFAULT.</param>
    public Errno HardOffline(long pfn, bool countIncreased, AddressSpace? current)
    {
        MemMap memMap = _machine.MemMap;
        if (!memMap.IsValidPfn(pfn))
            return Errno.ENXIO;
        lock (_mutex)
        {
            if (IsPoisoned(pfn))
            {
                if (countIncreased)
                    _machine.PutPage(pfn);
                return current is null ? Errno.EHWPOISON : KillAccessingProcess(current, pfn);
            }
            if (!countIncreased)
            {
                // get_hwpoison_page without MF_SOFT_OFFLINE: a free frame is taken off the buddy
                // lists; an unhandlable one is EBUSY (MF_MSG_GET_HWPOISON, ignored).
                for (int attempt = 0; ; attempt++)
                {
                    int got = GetHwpoisonPage(pfn);
                    if (got > 0)
                        break;
                    if (got < 0)
                        return Errno.EBUSY;
                    if (_machine.Allocator.TakePageOffBuddy(pfn))
                    {
                        Interlocked.Increment(ref _poisonedPages);
                        return Errno.None;
                    }
                    if (attempt > 0)
                        return Errno.EBUSY; // lost the race with an allocation twice
                }
            }
            return HardOfflineReferenced(pfn);
        }
    }

    /// <summary>
    /// soft_offline_page: moves the page at <paramref name="pfn"/> to a new frame and retires the old
    /// one, or retires a free frame; a frame poisoned already is success.
    /// </summary>
    /// <param name="pfn">the frame.</param>
    /// <param name="countIncreased">MF_COUNT_INCREASED: the caller holds a reference, which this call takes over.</param>
    public Errno SoftOffline(long pfn, bool countIncreased)
    {
        MemMap memMap = _machine.MemMap;
        if (!memMap.IsValidPfn(pfn))
            return Errno.ENXIO;
        lock (_mutex)
        {
            if (IsPoisoned(pfn))
            {
                if (countIncreased)
                    _machine.PutPage(pfn); // "page already poisoned": nothing to do
                return Errno.None;
            }
            for (int attempt = 0; ; attempt++)
            {
                int got;
                if (countIncreased && IsHandlable(pfn))
                {
                    got = 1;
                }
                else
                {
                    if (countIncreased)
                    {
                        // Not an LRU page (yet): drop the caller's reference and look again the
                        // reference-less way, after shaking it (get_any_page).
                        _machine.PutPage(pfn);
                        countIncreased = false;
                    }
                    // Without a reference the frame's block may have gone offline meanwhile (the madvise
                    // path holds no get_online_mems: an offline may be waiting for its reference).
                    if (!_machine.Allocator.IsPfnOnline(pfn))
                        return Errno.EIO;
                    got = GetHwpoisonPage(pfn);
                }
                if (got > 0)
                    return SoftOfflineInUsePage(pfn);
                if (got < 0)
                    return (Errno)(-got);
                if (_machine.Allocator.TakePageOffBuddy(pfn))
                {
                    Interlocked.Increment(ref _poisonedPages);
                    return Errno.None;
                }
                if (attempt > 0)
                    return Errno.EBUSY;
            }
        }
    }

    /// <summary>
    /// For memory offline: <paramref name="frames"/> retired frames left the machine with an offlined
    /// block (Linux's num_poisoned_pages_sub when a block with hwpoisoned pages goes): they stop being
    /// counted. The offline counts them (they are the block's only frames in use) and de-initialises
    /// their descriptors; a block onlined again comes back with fresh frames. Meant for the hotplug's
    /// <c>ForgetPoisoned</c> hook. Atomic, takes no lock (why: the offline calls it holding the hotplug
    /// lock, and memory failure may one day take that lock inside its mutex, as Linux's soft_offline_page
    /// takes get_online_mems inside mf_mutex).
    /// </summary>
    public void Forget(long frames)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(frames);
        if (Interlocked.Add(ref _poisonedPages, -frames) < 0)
        {
            Interlocked.Add(ref _poisonedPages, frames);
            throw new VmBugException($"{frames} poisoned frames forgotten, more than are counted");
        }
    }

    private bool IsPoisoned(long pfn) =>
        _machine.MemMap.IsInitialised(pfn) && _machine.MemMap.TestFlag(pfn, PageFlags.HWPoison);

    /// <summary>HWPoisonHandlable for a referenced frame: an order-0 LRU page (shake_page drains the add batches first).</summary>
    private bool IsHandlable(long pfn)
    {
        MemMap memMap = _machine.MemMap;
        if (memMap.IsCompound(pfn) || (memMap.RawFlags(pfn) & (PageFlags.Reserved | PageFlags.Table)) != 0)
            return false;
        if (memMap.TestFlag(pfn, PageFlags.Lru))
            return true;
        _machine.Lru.DrainAll(); // shake_page: lru_add_drain_all
        return memMap.TestFlag(pfn, PageFlags.Lru);
    }

    /// <summary>
    /// get_hwpoison_page / get_any_page without a reference: 1 with a reference taken (an LRU page), 0
    /// for a free frame, -EIO for a frame that stays neither free nor on an LRU list through
    /// <see cref="ShakePasses"/> shakes (-EBUSY when it keeps racing with allocation and free).
    /// </summary>
    private int GetHwpoisonPage(long pfn)
    {
        MemMap memMap = _machine.MemMap;
        if (!memMap.IsInitialised(pfn))
            return 0; // a never-initialised section: free
        for (int pass = 0; ; pass++)
        {
            if (memMap.TryGetPageUnlessZero(pfn))
            {
                if (IsHandlable(pfn))
                    return 1;
                _machine.PutPage(pfn);
            }
            else if (!memMap.IsCompound(pfn))
            {
                return 0; // refcount 0: free (on a buddy or per-CPU list); TakePageOffBuddy will tell
            }
            if (pass + 1 >= ShakePasses)
                return -(int)Errno.EIO;
        }
    }

    /// <summary>
    /// memory_failure once the caller's reference is held: refuse what Vmm will not poison, then poison,
    /// unmap, take off the LRU and the page cache, and retire. Consumes the reference (it becomes the
    /// retirement's). Preconditions: _mutex held.
    /// </summary>
    private Errno HardOfflineReferenced(long pfn)
    {
        LockAssert.Held(_mutex, "the memory-failure mutex");
        MemMap memMap = _machine.MemMap;
        // Vmm refuses before poisoning what Linux would mark and then ignore (see the overview).
        if (!IsHandlable(pfn) || IsKsmPage(pfn))
        {
            _machine.PutPage(pfn);
            return Errno.EBUSY;
        }
        _machine.PageLock.Lock(pfn);
        // Looked at again under the page lock: KSM merges under it, and may have made this a KSM page.
        if (IsKsmPage(pfn))
        {
            _machine.PageLock.Unlock(pfn);
            _machine.PutPage(pfn);
            return Errno.EBUSY;
        }
        memMap.SetFlag(pfn, PageFlags.HWPoison);
        Interlocked.Increment(ref _poisonedPages);

        // hwpoison_user_mappings: from here on no access reaches the frame.
        bool unmapped = memMap.MapCount(pfn) == 0 || _machine.Rmap.TryToUnmapPoisoned(pfn);

        // delete_from_lru_cache: off its list for good (the isolation's reference goes with it).
        if (_machine.Lru.Isolate(pfn))
            _machine.Lru.ReleaseIsolated(pfn);

        // A shared page leaves its object's page cache; the index stays poisoned (shmem_get_folio -EIO).
        ulong mapping = Volatile.Read(ref memMap[pfn].Mapping);
        if (mapping != 0 && (mapping & PageDescriptor.MappingTagMask) == 0 &&
            _machine.Mappings.Find<ShmemObject>((long)(mapping >> 2)) is { } shmem)
        {
            bool cached = false;
            lock (shmem.Lock)
            {
                long index = (long)memMap[pfn].Index;
                if (shmem.Pages.TryGetValue(index, out long page) && page == pfn)
                {
                    shmem.Pages.Remove(index);
                    (shmem.Poisoned ??= []).Add(index);
                    cached = true;
                }
            }
            if (cached)
                _machine.PutPage(pfn); // the page cache's reference (ours remains)
        }
        RetireLocked(pfn);
        _machine.PageLock.Unlock(pfn);

        // Deferred puts (a copy-on-write's old mapping reference) are released by a flush; what remains
        // beyond ours is a real user (has_extra_refcount): MF_FAILED, EBUSY, the frame stays poisoned.
        _machine.Tlb.Flush();
        return unmapped && memMap.RefCount(pfn) == 1 ? Errno.None : Errno.EBUSY;
    }

    /// <summary>
    /// soft_offline_in_use_page: isolates the referenced LRU page at <paramref name="pfn"/>, migrates it
    /// (MR_MEMORY_FAILURE: the engine hands the old frame back with a reference) and retires the old
    /// frame. Consumes the caller's reference. Preconditions: _mutex held.
    /// </summary>
    private Errno SoftOfflineInUsePage(long pfn)
    {
        LockAssert.Held(_mutex, "the memory-failure mutex");
        MemMap memMap = _machine.MemMap;
        _machine.PageLock.Lock(pfn);
        bool poisoned = memMap.TestFlag(pfn, PageFlags.HWPoison);
        _machine.PageLock.Unlock(pfn);
        if (poisoned)
        {
            _machine.PutPage(pfn);
            return Errno.None;
        }

        // mf_isolate_folio: the isolation's reference replaces ours.
        LruLists lru = _machine.Lru;
        bool isolated = lru.Isolate(pfn);
        if (!isolated)
        {
            lru.DrainAll();
            isolated = lru.Isolate(pfn);
        }
        _machine.PutPage(pfn);
        if (!isolated)
            return Errno.EBUSY;

        MigrationEngine engine = _machine.Migration;
        List<long> from = engine.RentList();
        try
        {
            from.Add(pfn);
            // alloc_migration_target with NUMA_NO_NODE: the page's own node first, any node after.
            int node = _machine.Topology.NodeOf(pfn);
            int rc = engine.MigratePages(from,
                _ => _machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero, node),
                null, MigrateMode.Sync, MigrateReason.MemoryFailure, out _);
            if (rc != 0 || from.Count != 0)
                return rc < 0 ? Errno.ENOMEM : Errno.EBUSY;
        }
        finally
        {
            engine.PutbackMovablePages(from);
            engine.ReturnList(from);
        }

        // page_handle_poison: the engine kept one reference on the old frame (KeepSourcesForMemoryFailure);
        // it becomes the retirement's.
        memMap.SetFlag(pfn, PageFlags.HWPoison);
        Interlocked.Increment(ref _poisonedPages);
        RetireLocked(pfn);
        return Errno.None;
    }

    /// <summary>
    /// Leaves a poisoned frame as a retired one: no mapping word, no index, no flag but PG_hwpoison (and
    /// the page lock's own bits, which belong to whoever holds or waits for it). Preconditions: _mutex
    /// held; PG_hwpoison set; the frame unmapped and on no list.
    /// </summary>
    private void RetireLocked(long pfn)
    {
        LockAssert.Held(_mutex, "the memory-failure mutex");
        ref PageDescriptor page = ref _machine.MemMap[pfn];
        Volatile.Write(ref page.Mapping, 0UL);
        page.Index = 0;
        Interlocked.And(ref page.Flags, (ulong)(PageFlags.HWPoison | PageFlags.Locked | PageFlags.Waiters));
    }

    private bool IsKsmPage(long pfn) =>
        (Volatile.Read(ref _machine.MemMap[pfn].Mapping) & PageDescriptor.MappingTagMask) == PageDescriptor.MappingKsm;

    /// <summary>
    /// kill_accessing_process: a frame poisoned already was found through <paramref name="mm"/> (madvise):
    /// EHWPOISON if the process still maps it (a present PTE or a hwpoison entry naming it; the SIGBUS
    /// itself comes with its next access), EFAULT if not.
    /// </summary>
    private static Errno KillAccessingProcess(AddressSpace mm, long pfn)
    {
        mm.MmapLock.EnterReadLock();
        try
        {
            if (mm.Exited)
                return Errno.EFAULT;
            foreach ((ulong _, Pte pte) in mm.EnumeratePtes())
            {
                if ((pte.IsPresent && !pte.IsSpecial && pte.Pfn == pfn) || (pte.IsHwPoisonEntry && pte.SwapOffset == pfn))
                    return Errno.EHWPOISON;
            }
            return Errno.EFAULT;
        }
        finally
        {
            mm.MmapLock.ExitReadLock();
        }
    }
}
