// Auditor: recounts every counter, mapcount and refcount from ground truth (the page tables, the
// page caches, the free lists, the LRU lists and their add batches) and reports each difference;
// poisoned frames (memory failure) must be retired ones, and as many as num_poisoned_pages. Tests call it after every scenario; it is
// exact only when no other thread changes memory meanwhile.
//
// Locking: Run takes the KSM thread mutex when KSM is built in (no batch runs while it recounts), and
// the locks of the structures it reads as it walks them.
using System.Collections;
using Vmm.Memory;
using Vmm.Mm;
using Vmm.Rmap;

namespace Vmm.Diagnostics;

internal static unsafe class Auditor
{
    public static List<string> Run(Machine machine)
    {
        // No kcompactd run may move pages while the counters are recounted (its mutex is above KSM's).
        lock (machine.Compaction.KcompactdMutex)
            return RunWithoutDaemons(machine);
    }

    private static List<string> RunWithoutDaemons(Machine machine)
    {
        // No KSM batch may run while the counters are recounted.
        if (machine.Ksm is { } ksm)
        {
            List<string>? result = null;
            ksm.WithThreadMutex(() => result = RunLocked(machine));
            return result!;
        }
        return RunLocked(machine);
    }

    /// <summary>
    /// The audit proper. Preconditions: the ksm_thread_mutex held when the machine has KSM; no other
    /// thread changes memory meanwhile (not checkable: the host's promise).
    /// </summary>
    private static List<string> RunLocked(Machine machine)
    {
#if DEBUG
        LockAssert.That(machine.Ksm is null || machine.Ksm.IsThreadMutexHeldByCurrentThread, "the ksm_thread_mutex held");
#endif
        var problems = new List<string>();
        var ksmZeroPtes = new Dictionary<AddressSpace, long>();
        machine.Tlb.Flush(); // release deferred references so that refcounts are final
        MemMap memMap = machine.MemMap;
        var mapcount = new Dictionary<long, int>();
        var references = new Dictionary<long, int>();
        var tables = new HashSet<long>();
        var shmems = new HashSet<ShmemObject>();
        long tableTotal = 0;

        foreach (VmProcess process in machine.Processes)
        {
            AddressSpace mm = process.Mm;
            ksmZeroPtes[mm] = 0;
            mm.MmapLock.EnterReadLock();
            try
            {
                List<long> mmTables = mm.EnumerateTablePages();
                foreach (long pfn in mmTables)
                {
                    if (!tables.Add(pfn))
                        problems.Add($"page-table frame {pfn} is used twice");
                    if (!memMap.TestFlag(pfn, PageFlags.Table))
                        problems.Add($"page-table frame {pfn} of {process} lacks PG_table");
                }
                if (mmTables.Count != Volatile.Read(ref mm.PageTablePages))
                    problems.Add($"{process}: PageTables counter {mm.PageTablePages}, tables found {mmTables.Count}");
                tableTotal += mmTables.Count;

                long anon = 0, shmem = 0;
                foreach ((ulong va, Pte pte) in mm.EnumeratePtes())
                {
                    Vma? vma = mm.VmaAt(va);
                    if (vma is null)
                    {
                        problems.Add($"{process}: PTE at 0x{va:x} ({pte}) outside every VMA");
                        continue;
                    }
                    if (pte.IsHwPoisonEntry)
                    {
                        // A mapping of a poisoned page: no reference, no mapcount, no RSS; the frame it
                        // names must be poisoned (and is checked as a retired frame below).
                        if (!memMap.IsValidPfn(pte.SwapOffset) || !memMap.IsInitialised(pte.SwapOffset) ||
                            !memMap.TestFlag(pte.SwapOffset, PageFlags.HWPoison))
                            problems.Add($"{process}: hwpoison entry at 0x{va:x} names frame {pte.SwapOffset}, which is not PG_hwpoison");
                        continue;
                    }
                    if (!pte.IsPresent)
                    {
                        problems.Add($"{process}: unexpected non-present PTE at 0x{va:x} ({pte})");
                        continue;
                    }
                    if (pte.IsSpecial)
                    {
                        if (pte.Pfn != machine.ZeroPagePfnIfAllocated)
                            problems.Add($"{process}: special PTE at 0x{va:x} maps frame {pte.Pfn}, not the zero page");
                        if (pte.IsWrite)
                            problems.Add($"{process}: the zero page is mapped writable at 0x{va:x}");
                        if (AddressSpace.IsKsmZeroPte(pte))
                            ksmZeroPtes[mm]++;
                        continue;
                    }
                    long pfn = pte.Pfn;
                    mapcount[pfn] = mapcount.GetValueOrDefault(pfn) + 1;
                    // A page lock outlives no mechanism: one still held here was leaked (a migration
                    // that forgot an old page or its new frame, say).
                    if (mapcount[pfn] == 1 && memMap.TestFlag(pfn, PageFlags.Locked))
                        problems.Add($"{process}: frame {pfn} mapped at 0x{va:x} is still PG_locked");
                    references[pfn] = references.GetValueOrDefault(pfn) + 1;
                    if ((pte.Value & Pte.UserBit) != 0 && !vma.CanRead)
                        problems.Add($"{process}: PTE at 0x{va:x} allows access in a PROT_NONE VMA");
                    if (pte.IsWrite && !vma.CanWrite)
                        problems.Add($"{process}: PTE at 0x{va:x} is writable in a read-only VMA");
                    if (vma.IsShared)
                    {
                        shmem++;
                        shmems.Add(vma.Shmem!);
                        lock (vma.Shmem!.Lock)
                        {
                            long index = (long)vma.PageIndex(va);
                            if (!vma.Shmem.Pages.TryGetValue(index, out long cached) || cached != pfn)
                                problems.Add($"{process}: shared PTE at 0x{va:x} maps frame {pfn}, but the page cache holds {(vma.Shmem.Pages.TryGetValue(index, out long c) ? c : -1)} at index {index}");
                        }
                        continue;
                    }
                    anon++;
                    if (pte.IsWrite && !memMap.TestFlag(pfn, PageFlags.AnonExclusive))
                        problems.Add($"{process}: writable PTE at 0x{va:x} maps frame {pfn}, which is not exclusive");
                    CheckAnonRmap(machine, process, vma, va, pfn, problems);
                }
                if (anon != Volatile.Read(ref mm.RssAnon))
                    problems.Add($"{process}: RssAnon {mm.RssAnon}, private pages mapped {anon}");
                if (shmem != Volatile.Read(ref mm.RssShmem))
                    problems.Add($"{process}: RssShmem {mm.RssShmem}, shared pages mapped {shmem}");
                foreach (Vma vma in mm.Vmas)
                    if (vma.Shmem is { } s)
                        shmems.Add(s);
            }
            finally
            {
                mm.MmapLock.ExitReadLock();
            }
        }

        foreach (ShmemObject shmem in shmems)
        {
            lock (shmem.Lock)
            {
                foreach ((long index, long pfn) in shmem.Pages)
                {
                    references[pfn] = references.GetValueOrDefault(pfn) + 1;
                    mapcount.TryAdd(pfn, 0);
                    if (memMap[pfn].Mapping != (ulong)shmem.Handle << 2 || (long)memMap[pfn].Index != index)
                        problems.Add($"shmem page {pfn} (index {index}) names mapping {memMap[pfn].Mapping:x} index {memMap[pfn].Index}");
                }
            }
        }

        // The LRU: every list walked (links, flags, node, count); every user page (mapped by a user PTE or
        // in a page cache; the zero page is special) is on its node's list, in an add batch or isolated;
        // the references batches and isolations hold are part of the recount below.
        machine.Lru.Audit(problems, out HashSet<long> onLruLists, out Dictionary<long, int> lruHeld, out _);
        foreach (long pfn in mapcount.Keys)
        {
            if (!onLruLists.Contains(pfn) && !lruHeld.ContainsKey(pfn))
                problems.Add($"frame {pfn} is a user page (flags {memMap.RawFlags(pfn)}) but on no LRU list, in no add batch and not isolated");
        }
        foreach ((long pfn, int count) in lruHeld)
        {
            references[pfn] = references.GetValueOrDefault(pfn) + count;
            mapcount.TryAdd(pfn, 0);
        }

        foreach ((long pfn, int expected) in mapcount)
        {
            if (!machine.Allocator.IsPfnOnline(pfn))
            {
                problems.Add($"frame {pfn} is mapped or held ({expected} mappings) but its memory block is offline");
                continue;
            }
            if (expected > 1 && memMap.TestFlag(pfn, PageFlags.AnonExclusive))
                problems.Add($"frame {pfn} is PG_anon_exclusive but mapped {expected} times");
            int pins = memMap[pfn].PinCount;
            int actualMap = memMap.MapCount(pfn);
            int actualRef = memMap.RefCount(pfn);
            if (actualMap != expected)
                problems.Add($"frame {pfn}: mapcount {actualMap}, mappings found {expected}");
            int refs = references[pfn] + pins;
            if (actualRef != refs)
                problems.Add($"frame {pfn}: refcount {actualRef}, references explained {refs} (mappings, page cache, LRU batch or isolation, {pins} pins)");
        }

        if (Volatile.Read(ref machine.PageTablePagesTotal) != tableTotal)
            problems.Add($"NR_PAGETABLE {machine.PageTablePagesTotal}, tables found {tableTotal}");

        // Every frame is free, or in use by an owner found above: a page table, the zero page, a mapping or
        // a page cache, an LRU add batch or isolation (whose references were checked above, pins included), or only pins (PinnedMemory,
        // after its page was unmapped: then the pins are all its references). Nothing else may hold a frame
        // while the machine is quiet: KSM holds no reference on its stable pages (their mappings do), the
        // deferred puts were released by the flush above, and the allocator's per-cpu lists hold free
        // frames (refcount 0). A frame held by none of these leaked: an orphan. A section whose descriptors
        // were never initialised is wholly free (its zone counts it in DeferredPages): it is not read, so an
        // audit commits no descriptor.
        HashSet<long> contiguous = AuditContiguousBuffers(machine, problems);
        BitArray onFreeLists = machine.Allocator.AuditFreeLists(problems);
        var lost = new List<long>();
        long inUse = 0, offline = 0;
        long poisonedFrames = 0;
        var movable = new Dictionary<long, HashSet<long>>(); // owner handle -> frames tagged with it
        var deferred = new Dictionary<Zone, long>();
        for (long pfn = 0; pfn < memMap.FrameCount; pfn++)
        {
            if ((pfn & (memMap.FramesPerSection - 1)) == 0 && !machine.Allocator.IsPfnOnline(pfn))
            {
                // An offline block: in no zone, its descriptors given back (MemMap.DeinitSection).
                if (memMap.IsInitialised(pfn))
                    problems.Add($"frame {pfn} is in an offline memory block but its memmap section is initialised");
                offline += memMap.FramesPerSection;
                pfn += memMap.FramesPerSection - 1;
                continue;
            }
            if ((pfn & (memMap.FramesPerSection - 1)) == 0 && !memMap.IsInitialised(pfn))
            {
                Zone zone = machine.Allocator.ZoneOf(pfn);
                deferred[zone] = deferred.GetValueOrDefault(zone) + memMap.FramesPerSection;
                // Why check more than the count: growth (PageAllocator.GrowZoneLocked) only walks down from
                // the zone's cursor and frees a section as one max-order block of its pageblocks' type, which
                // WatermarkOk and GetPageInfo assume is MOVABLE. A deferred section at or above the cursor is
                // free memory the allocator can never hand out, though every counter still adds up.
                long section = memMap.SectionOf(pfn);
                if (section >= Volatile.Read(ref zone.DeferredCursor))
                    problems.Add($"{zone}: section {section} is deferred but not below the zone's cursor {zone.DeferredCursor}: it can never be grown into");
                for (long pageblock = pfn; pageblock < pfn + memMap.FramesPerSection; pageblock += PageAllocator.PageblockFrames)
                {
                    MigrateType type = machine.Allocator.GetPageblockMigratetype(pageblock);
                    if (type != MigrateType.Movable)
                        problems.Add($"{zone}: deferred section {section} has a {type} pageblock at frame {pageblock}");
                }
                pfn += memMap.FramesPerSection - 1;
                continue;
            }
            ref PageDescriptor page = ref memMap[pfn];
            if ((page.Flags & (ulong)PageFlags.Lru) != 0 && !onLruLists.Contains(pfn))
                problems.Add($"frame {pfn} has PG_lru (refcount {page.RefCount}) but is on no LRU list");
            bool poisoned = (page.Flags & (ulong)PageFlags.HWPoison) != 0;
            if (poisoned)
                poisonedFrames++;
            if (page.RefCount == 0)
            {
                if (page.PinCount != 0)
                    problems.Add($"frame {pfn} is free but has {page.PinCount} pins");
                if (poisoned)
                    problems.Add($"frame {pfn} is PG_hwpoison but free: a retired frame went back to the allocator");
                // Free means on a free list or a per-CPU list (or isolated by a compaction run, which the
                // quiet machine has none of: Compaction.Audit). A frame with no reference and on no list is
                // lost to the allocator: nobody will ever free or hand it out again.
                if (IsTailOfLiveCompound(memMap, pfn))
                    inUse++; // in use with its head (whose reference stands for the whole page)
                else if (!onFreeLists[(int)pfn])
                    lost.Add(pfn);
                continue;
            }
            inUse++;
            if (poisoned)
            {
                CheckRetiredFrame(machine, pfn, tables.Contains(pfn) || mapcount.ContainsKey(pfn), problems);
                continue;
            }
            if ((page.Flags & (ulong)PageFlags.Isolated) != 0)
                problems.Add($"frame {pfn} is PG_isolated at quiet (refcount {page.RefCount}): an isolation of a non-LRU movable page was never finished");
            if ((page.Mapping & PageDescriptor.MappingTagMask) == PageDescriptor.MappingMovable)
            {
                CheckMovableFrame(machine, pfn, tables.Contains(pfn) || mapcount.ContainsKey(pfn), movable, problems);
                continue;
            }
            if (pfn == machine.ZeroPagePfnIfAllocated || tables.Contains(pfn) || mapcount.ContainsKey(pfn) || contiguous.Contains(pfn))
                continue;
            if (page.PinCount > 0)
            {
                if (page.RefCount != page.PinCount)
                    problems.Add($"frame {pfn}: refcount {page.RefCount}, but only its {page.PinCount} pins hold it (nothing maps or caches it)");
                continue;
            }
            problems.Add($"frame {pfn} is in use (refcount {page.RefCount}, flags {(PageFlags)page.Flags}) but nothing maps, caches or pins it: an orphan");
        }
        foreach (Zone zone in machine.Allocator.Zones)
        {
            long expected = deferred.GetValueOrDefault(zone);
            long counted = Volatile.Read(ref zone.DeferredPages);
            if (counted != expected)
                problems.Add($"{zone}: DeferredPages {counted}, frames of sections never initialised {expected}");
        }
        if (lost.Count > 0)
        {
            // The frames just after a frame in use may be the tails of a block someone still holds (then the
            // head is also reported, as an orphan): say so, so that the reader looks at the holder first.
            long before = lost[0] - 1;
            string held = before >= 0 && memMap.IsInitialised(before) && memMap[before].RefCount > 0
                ? $" (or the rest of a block of frame {before}, which is in use)" : "";
            problems.Add($"{lost.Count} frames have refcount 0 but are on no free list or per-CPU list (lost to the allocator{held}), from frame {lost[0]}: "
                         + string.Join(", ", lost.Take(8)) + (machine.MemMap.Trace is { } trace ? "\n" + trace.Dump(lost[0]) : ""));
        }
        AuditMovableOwners(machine, movable, problems);
        if (poisonedFrames != machine.MemoryFailure.PoisonedPages)
            problems.Add($"num_poisoned_pages {machine.MemoryFailure.PoisonedPages}, frames with PG_hwpoison {poisonedFrames}");
        machine.Ksm?.Audit(problems, ksmZeroPtes);
        machine.Compaction.Audit(problems);
        long free = machine.GetStats().AllFreePages;
        if (free + inUse + offline != memMap.FrameCount)
            problems.Add($"free frames {free} + frames in use {inUse} + offline frames {offline} != {memMap.FrameCount}");
        if (offline != machine.Allocator.OfflineFrames)
            problems.Add($"offline blocks hold {machine.Allocator.OfflineFrames} frames, frames found offline {offline}");
        AuditCpusetsAndPolicies(machine, problems);
        AuditLongtermPins(machine, problems);
        return problems;
    }

    /// <summary>A tail frame (refcount 0 by design) of a compound page whose head is in use and covers it.</summary>
    private static bool IsTailOfLiveCompound(MemMap memMap, long pfn)
    {
        ref PageDescriptor page = ref memMap[pfn];
        if ((page.Flags & (ulong)PageFlags.Tail) == 0)
            return false;
        long head = page.CompoundHead;
        if (head < 0 || head >= pfn || !memMap.IsInitialised(head))
            return false;
        ref PageDescriptor h = ref memMap[head];
        return (h.Flags & (ulong)PageFlags.Head) != 0 && h.RefCount > 0 && pfn < head + (1L << h.CompoundOrder);
    }

    /// <summary>
    /// Contiguous buffers (Machine.AllocateContiguous): every frame of a live one is held by the buffer's
    /// one reference alone (no mapping, pin, page cache or LRU list), lies in an online ZONE_NORMAL block
    /// and belongs to no other buffer. Returns the frames, which the orphan check then counts as owned.
    /// </summary>
    private static HashSet<long> AuditContiguousBuffers(Machine machine, List<string> problems)
    {
        MemMap memMap = machine.MemMap;
        var frames = new HashSet<long>();
        foreach (ContiguousBuffer buffer in machine.ContiguousBuffers.Snapshot())
        {
            if (buffer.IsDisposed)
                continue; // a Dispose in progress (Audit is exact only when nothing else runs)
            for (long pfn = buffer.FirstPfn; pfn < buffer.FirstPfn + buffer.PageCount; pfn++)
            {
                if (!frames.Add(pfn))
                    problems.Add($"frame {pfn} belongs to two contiguous buffers");
                if (!machine.Allocator.IsPfnOnline(pfn) || !memMap.IsInitialised(pfn))
                {
                    problems.Add($"frame {pfn} of a live {buffer} is in a block that is not online");
                    continue;
                }
                ref PageDescriptor page = ref memMap[pfn];
                if (page.RefCount != 1 || page.MapCount != -1 || page.PinCount != 0 || page.Mapping != 0 ||
                    (page.Flags & (ulong)(PageFlags.Buddy | PageFlags.Lru | PageFlags.Head | PageFlags.Tail)) != 0)
                    problems.Add($"frame {pfn} of a live {buffer}: refcount {page.RefCount}, mapcount {page.MapCount}, pincount {page.PinCount}, mapping {page.Mapping:x}, flags {(PageFlags)page.Flags}; expected only the buffer's reference");
                if (machine.Allocator.ZoneTypeOf(pfn) != ZoneType.Normal)
                    problems.Add($"frame {pfn} of a live {buffer} lies in {machine.Allocator.ZoneTypeOf(pfn)}, not ZONE_NORMAL");
            }
        }
        return frames;
    }

    /// <summary>
    /// A frame tagged MOVABLE (a non-LRU movable page, MovableOperations): held by its owner's one
    /// reference only (no isolation at quiet), mapped by nothing, on no list, no page table; counted
    /// under its owner's handle for <see cref="AuditMovableOwners"/>.
    /// </summary>
    private static void CheckMovableFrame(Machine machine, long pfn, bool usedAsPage, Dictionary<long, HashSet<long>> movable, List<string> problems)
    {
        ref PageDescriptor page = ref machine.MemMap[pfn];
        long handle = (long)(page.Mapping >> 2);
        if (!movable.TryGetValue(handle, out HashSet<long>? frames))
            movable[handle] = frames = [];
        frames.Add(pfn);
        if (usedAsPage || pfn == machine.ZeroPagePfnIfAllocated)
            problems.Add($"non-LRU movable frame {pfn} is also mapped, cached or a page table");
        if (page.RefCount != 1)
            problems.Add($"non-LRU movable frame {pfn}: refcount {page.RefCount}, expected its owner's 1");
        if (page.MapCount != -1 || page.PinCount != 0)
            problems.Add($"non-LRU movable frame {pfn}: mapcount {page.MapCount + 1}, pincount {page.PinCount}");
        if ((page.Flags & (ulong)(PageFlags.Lru | PageFlags.Head | PageFlags.Tail | PageFlags.Locked)) != 0)
            problems.Add($"non-LRU movable frame {pfn} has flags {(PageFlags)page.Flags}");
    }

    /// <summary>
    /// Every handle a MOVABLE-tagged frame names is a live owner, which counts exactly those frames; every
    /// registered owner holds frames (its handle goes with its last one); each owner checks its own lists.
    /// </summary>
    private static void AuditMovableOwners(Machine machine, Dictionary<long, HashSet<long>> movable, List<string> problems)
    {
        foreach ((long handle, HashSet<long> frames) in movable)
        {
            MovableOperations? owner = machine.Mappings.Find<MovableOperations>(handle);
            if (owner is null)
                problems.Add($"{frames.Count} frames (first {frames.Min()}) carry the MOVABLE tag of handle {handle}, which names no live owner");
            else if (owner.Handle != handle)
                problems.Add($"movable owner {owner.GetType().Name} is registered as {handle} but holds handle {owner.Handle}");
        }
        foreach ((long handle, MovableOperations owner) in machine.Mappings.All<MovableOperations>())
        {
            HashSet<long> frames = movable.TryGetValue(handle, out HashSet<long>? found) ? found : [];
            if (owner.PageCount != frames.Count)
                problems.Add($"movable owner {owner.GetType().Name} (handle {handle}) counts {owner.PageCount} frames, frames tagged with it {frames.Count}");
            owner.Audit(machine, frames, problems);
        }
        // An owner with no frame is unregistered, but its own lists must be empty too (the balloon's).
        if (machine.Balloon.Handle == 0)
            machine.Balloon.Audit(machine, new HashSet<long>(), problems);
    }

    /// <summary>
    /// Long-term pins (FOLL_LONGTERM): every page of a live one is pinned and long-term pinnable (outside
    /// ZONE_MOVABLE, or the zero page): nothing may have moved it back, and the pin never took a page there.
    /// </summary>
    private static void AuditLongtermPins(Machine machine, List<string> problems)
    {
        MemMap memMap = machine.MemMap;
        foreach (PinnedMemory pin in machine.LongtermPins.Keys)
        {
            if (pin.IsDisposed)
                continue; // a Dispose in progress (Audit is exact only when nothing else runs)
            foreach (long pfn in pin.Frames)
            {
                if (memMap[pfn].PinCount <= 0)
                    problems.Add($"frame {pfn} of a live long-term pin is not pinned");
                if (!AddressSpace.IsLongtermPinnable(machine, pfn))
                    problems.Add($"frame {pfn} of a live long-term pin lies in {machine.Allocator.ZoneTypeOf(pfn)}");
            }
        }
    }

    /// <summary>
    /// A frame with PG_hwpoison is retired (issue12-design.md, "A poisoned, retired frame"): its one
    /// reference is the retirement's (plus one per pin still held, which the pins drop), it is mapped by
    /// nothing (hwpoison entries are not mappings), cached by no page cache, on no list and no page
    /// table, names no mapping, and carries no flag but PG_hwpoison (and the page lock's bits). It
    /// counts as in use, never as free and never as an orphan.
    /// </summary>
    private static void CheckRetiredFrame(Machine machine, long pfn, bool usedAsPage, List<string> problems)
    {
        ref PageDescriptor page = ref machine.MemMap[pfn];
        if (usedAsPage || pfn == machine.ZeroPagePfnIfAllocated)
            problems.Add($"frame {pfn} is PG_hwpoison but still mapped, cached, on an LRU list or a page table");
        if (page.RefCount != 1 + page.PinCount)
            problems.Add($"retired frame {pfn}: refcount {page.RefCount}, expected the retirement's 1 + {page.PinCount} pins");
        if (page.MapCount != -1)
            problems.Add($"retired frame {pfn}: mapcount {page.MapCount + 1}");
        if (page.Mapping != 0)
            problems.Add($"retired frame {pfn} names mapping {page.Mapping:x}");
        var extra = (PageFlags)page.Flags & ~(PageFlags.HWPoison | PageFlags.Locked | PageFlags.Waiters);
        if (extra != 0)
            problems.Add($"retired frame {pfn} has flags {extra}");
        if (page.LruNext != PageDescriptor.NoLink || page.LruPrev != PageDescriptor.NoLink)
            problems.Add($"retired frame {pfn} is linked on a list");
    }

    /// <summary>
    /// Cpusets and memory policies: the tree nests (a child's mems inside its parent's); every live
    /// process is a member of exactly the cpuset it names, with that cpuset's mems as its mems_allowed;
    /// every task and VMA policy is well formed (never DEFAULT, nodes of the machine, PREFERRED one node,
    /// LOCAL none, the others some) and the nodes of BIND / INTERLEAVE / WEIGHTED_INTERLEAVE lie inside
    /// the process's mems (rebinding keeps them there).
    /// </summary>
    private static void AuditCpusetsAndPolicies(Machine machine, List<string> problems)
    {
        lock (machine.CpusetLock)
        {
            var seen = new Dictionary<VmProcess, Cpuset>();
            var pending = new Stack<Cpuset>();
            pending.Push(machine.RootCpuset);
            while (pending.Count > 0)
            {
                Cpuset cs = pending.Pop();
                if (cs.Parent is { } parent && !cs.Mems.IsSubsetOf(parent.Mems))
                    problems.Add($"{cs}: mems not inside its parent's ({parent.Mems})");
                foreach (Cpuset child in cs.ChildrenLocked)
                    pending.Push(child);
                foreach (VmProcess member in cs.MembersLocked)
                {
                    if (!seen.TryAdd(member, cs))
                        problems.Add($"{member} is a member of {cs} and of {seen[member]}");
                    if (member.CpusetLocked != cs)
                        problems.Add($"{member} is a member of {cs} but names {member.CpusetLocked}");
                    if (member.Mm.MemsAllowed != cs.Mems.Bits)
                        problems.Add($"{member}: mems_allowed {new NodeMask(member.Mm.MemsAllowed)}, its {cs} has {cs.Mems}");
                }
            }
            foreach (VmProcess process in machine.Processes)
            {
                if (!process.HasExited && !seen.ContainsKey(process))
                    problems.Add($"{process} is in no cpuset's member list");
                AddressSpace mm = process.Mm;
                mm.MmapLock.EnterReadLock();
                try
                {
                    CheckPolicy(machine, $"{process}: task policy", mm.TaskPolicy, mm.MemsAllowed, problems);
                    foreach (Vma vma in mm.Vmas)
                        CheckPolicy(machine, $"{process}: policy of VMA {vma}", vma.Policy, mm.MemsAllowed, problems);
                }
                finally
                {
                    mm.MmapLock.ExitReadLock();
                }
            }
        }
    }

    private static void CheckPolicy(Machine machine, string what, Mempolicy? policy, ulong mems, List<string> problems)
    {
        if (policy is null)
            return;
        int count = System.Numerics.BitOperations.PopCount(policy.Nodes);
        bool shaped = policy.Mode switch
        {
            MempolicyMode.Default => false,
            MempolicyMode.Local => count == 0,
            MempolicyMode.Preferred => count == 1,
            _ => count > 0,
        };
        if (!shaped || (policy.Nodes & ~machine.NodesWithMemory) != 0)
            problems.Add($"{what}: malformed ({policy.Mode}, nodes {new NodeMask(policy.Nodes)})");
        if (policy.Mode is MempolicyMode.Bind or MempolicyMode.Interleave or MempolicyMode.WeightedInterleave &&
            (policy.Nodes & ~mems) != 0)
            problems.Add($"{what}: {policy.Mode} nodes {new NodeMask(policy.Nodes)} outside the mems allowed {new NodeMask(mems)}");
    }

    private static void CheckAnonRmap(Machine machine, VmProcess process, Vma vma, ulong va, long pfn, List<string> problems)
    {
        ref PageDescriptor page = ref machine.MemMap[pfn];
        if ((page.Mapping & PageDescriptor.MappingTagMask) == PageDescriptor.MappingKsm)
        {
            CheckKsmRmap(machine, process, vma, va, pfn, problems);
            return;
        }
        if ((page.Mapping & PageDescriptor.MappingTagMask) != PageDescriptor.MappingAnon)
        {
            problems.Add($"{process}: anonymous page {pfn} at 0x{va:x} has mapping {page.Mapping:x}");
            return;
        }
        AnonVma? anonVma = machine.Mappings.Find<AnonVma>((long)(page.Mapping >> 2));
        if (anonVma is null)
        {
            problems.Add($"{process}: page {pfn} at 0x{va:x} names a freed anon_vma");
            return;
        }
        lock (anonVma.Lock)
        {
            foreach (AnonVmaChain chain in anonVma.Chains)
                if (ReferenceEquals(chain.Vma, vma) && chain.Vma.AddressOf(page.Index) == va)
                    return;
        }
        problems.Add($"{process}: the reverse map of page {pfn} does not find it at 0x{va:x}");
    }

    /// <summary>A KSM page is named by a live stable node, mapped read-only, and found by rmap_walk_ksm.</summary>
    private static void CheckKsmRmap(Machine machine, VmProcess process, Vma vma, ulong va, long pfn, List<string> problems)
    {
        if (machine.Ksm?.NodeOfPage(pfn) is not { } node)
        {
            problems.Add($"{process}: KSM page {pfn} at 0x{va:x} is named by no live stable node");
            return;
        }
        if (node.Domain != vma.KsmDomain)
            problems.Add($"{process}: KSM page {pfn} of dedupe domain {node.Domain} is mapped at 0x{va:x} in domain {vma.KsmDomain}");
        if (machine.MemMap.TestFlag(pfn, PageFlags.AnonExclusive))
            problems.Add($"{process}: KSM page {pfn} is PG_anon_exclusive");
        bool found = false;
        machine.Rmap.Walk(pfn, new RmapWalkControl
        {
            RmapOne = (_, candidate, address) =>
            {
                found |= ReferenceEquals(candidate, vma) && address == va;
                return !found;
            },
        });
        if (!found)
            problems.Add($"{process}: the reverse map of KSM page {pfn} does not find it at 0x{va:x}");
    }
}
