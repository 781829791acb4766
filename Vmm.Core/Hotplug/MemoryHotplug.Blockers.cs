// What keeps a memory block from going offline (beyond Linux, whose offline says EBUSY and dumps a page
// to the kernel log): for each frame in use that cannot leave, the reason and, where a process maps it,
// which process and address. The dry run (MemoryBlock.CanOffline) asks only what an offline could not
// get past by retrying: unmovable and reserved pages, pins, and too little free memory elsewhere. After
// an offline failed, every frame still in use is named with its most likely reason.
//
// Locking: none held by the caller needed. Each frame is looked at with a reference of its own
// (get_page_unless_zero) and, to find its mappings, a page lock taken by trylock (a page that is locked
// is named without its process): the walk never waits, so it can run beside everything else.
using Vmm.Memory;
using Vmm.Mm;
using Vmm.Rmap;

namespace Vmm;

public sealed partial class MemoryHotplug
{
    /// <summary>The frames that keep <paramref name="block"/> (at most <see cref="MaxBlockersReported"/>).</summary>
    internal IReadOnlyList<OfflineBlocker> FindBlockers(MemoryBlock block, bool dryRun)
    {
        PageAllocator allocator = _machine.Allocator;
        MemoryBlockState state = allocator.GetBlockState(block.Index);
        if (dryRun && state != MemoryBlockState.Online)
            return [new OfflineBlocker(-1, OfflineBlockReason.NotOnline, -1, 0, $"memory{block.Index} is {block.State}")];
        MemMap memMap = _machine.MemMap;
        var blockers = new List<OfflineBlocker>();
        long start = block.StartPfn, end = start + block.Frames;
        long inUse = 0;
        for (long pfn = NextNotFree(start, end); pfn < end; pfn = NextNotFree(pfn + 1, end))
        {
            ref PageDescriptor page = ref memMap[pfn];
            if (Volatile.Read(ref page.RefCount) == 0 || (Volatile.Read(ref page.Flags) & (ulong)PageFlags.HWPoison) != 0)
                continue;
            inUse++;
            if (blockers.Count >= MaxBlockersReported)
                continue;
            if (ExplainFrame(pfn, afterPasses: !dryRun) is { } blocker)
                blockers.Add(blocker);
        }
        if (dryRun && blockers.Count < MaxBlockersReported)
        {
            // Where the block's pages would go: free memory on the target nodes, outside this block.
            ulong targets = MigrationTargets(block.Node);
            long free = 0;
            for (int n = 0; n < _machine.Topology.NodeCount; n++)
            {
                if (((targets >> n) & 1) == 0)
                    continue;
                foreach (ZoneType type in (ZoneType[])[ZoneType.Normal, ZoneType.Movable])
                {
                    Zone zone = allocator.GetZone(n, type);
                    free += Math.Max(0, Volatile.Read(ref zone.FreePages) - zone.Watermarks.Min);
                }
            }
            if (targets == 1UL << block.Node)
                free -= FreeFramesOf(block); // the block's own free frames are no target
            if (inUse > free)
                blockers.Add(new OfflineBlocker(-1, OfflineBlockReason.NoMemory, -1, 0,
                    $"{inUse} pages in use in memory{block.Index}, {Math.Max(free, 0)} free frames to move them to"));
        }
        return blockers;
    }

    private long FreeFramesOf(MemoryBlock block)
    {
        MemoryBlockInfo info = _machine.Allocator.GetBlockInfo(block.Index);
        return info.FreeFrames;
    }

    /// <summary>
    /// Why frame <paramref name="pfn"/> (in use) keeps its block, or null when nothing stops it from
    /// moving (in a dry run). <paramref name="afterPasses"/>: an offline failed, so a movable page that is
    /// still here was held by something, and is named too.
    /// </summary>
    private OfflineBlocker? ExplainFrame(long pfn, bool afterPasses)
    {
        MemMap memMap = _machine.MemMap;
        PageAllocator allocator = _machine.Allocator;
        if (!memMap.IsInitialised(pfn))
            return null;
        if (_machine.ContiguousBuffers.Find(pfn) is { } buffer)
            return new OfflineBlocker(pfn, OfflineBlockReason.ContiguousBuffer, -1, 0,
                $"frame {pfn} belongs to a {buffer} (Machine.AllocateContiguous): unmovable until the buffer is disposed");
        if (pfn == _machine.ZeroPagePfnIfAllocated)
            return new OfflineBlocker(pfn, OfflineBlockReason.Reserved, -1, 0, $"frame {pfn} is the shared zero page (reserved, never migrated)");
        var flags = memMap.RawFlags(pfn);
        if ((flags & PageFlags.Reserved) != 0)
            return new OfflineBlocker(pfn, OfflineBlockReason.Reserved, -1, 0, $"frame {pfn} is reserved");
        bool movableZone = allocator.ZoneTypeOf(pfn) == ZoneType.Movable;
        if ((flags & PageFlags.Table) != 0)
            return new OfflineBlocker(pfn, OfflineBlockReason.Unmovable, -1, 0, $"frame {pfn} is a page table (unmovable, in ZONE_NORMAL)");
        if (!memMap.TryGetPageUnlessZero(pfn))
            return null; // freed meanwhile
        try
        {
            long head = memMap.CompoundHead(pfn);
            flags = memMap.RawFlags(head);
            // Movable: on an LRU list, or a non-LRU movable page (the MOVABLE tag in its mapping word).
            ulong mapping = Volatile.Read(ref memMap[head].Mapping);
            bool movableOps = (mapping & PageDescriptor.MappingTagMask) == PageDescriptor.MappingMovable;
            bool lru = (flags & PageFlags.Lru) != 0 || movableOps;
            int pins = Volatile.Read(ref memMap[head].PinCount);
            (int pid, ulong address) = FindMapping(head);
            string where = pid >= 0 ? $", mapped by pid {pid} at 0x{address:x}" : "";
            if (pins > 0)
                return new OfflineBlocker(pfn, OfflineBlockReason.Pinned, pid, address,
                    $"frame {pfn} is pinned ({pins} pin{(pins == 1 ? "" : "s")}){where}: migration waits for the pin to be released");
            if (!lru && !movableZone && (flags & PageFlags.Isolated) == 0 && !afterPasses)
                return new OfflineBlocker(pfn, OfflineBlockReason.Unmovable, pid, address, $"frame {pfn} is in use and not movable (flags {flags}){where}");
            if (!afterPasses)
                return null;
            if (movableOps && (flags & PageFlags.Isolated) == 0)
            {
                string owner = _machine.MovablePages.OwnerOf(mapping)?.GetType().Name ?? "an owner that let it go";
                return new OfflineBlocker(pfn, OfflineBlockReason.MovableRefused, -1, 0,
                    $"frame {pfn} is a non-LRU movable page of {owner}, which refused to isolate it or failed its migration");
            }
            if (!lru)
                return new OfflineBlocker(pfn, OfflineBlockReason.NotIsolatable, pid, address,
                    $"frame {pfn} is in use but on no LRU list (flags {flags}, refcount {memMap.RefCount(head) - 1}){where}: being set up, torn down or moved by someone else");
            return new OfflineBlocker(pfn, OfflineBlockReason.Busy, pid, address,
                $"frame {pfn} could not be migrated (refcount {memMap.RefCount(head) - 1}, mapcount {memMap.MapCount(head)}){where}: held by a reference its mappings do not explain");
        }
        finally
        {
            _machine.PutPage(pfn);
        }
    }

    /// <summary>A frame isolation refused without a reason found (it changed meanwhile).</summary>
    private static OfflineBlocker Unknown(long pfn) =>
        new(pfn, OfflineBlockReason.Unmovable, -1, 0, $"frame {pfn} could not be isolated (it was unmovable when isolation looked)");

    /// <summary>
    /// One process and address that map <paramref name="pfn"/> (rmap walk under a trylocked page lock),
    /// or (-1, 0). Preconditions: the caller holds a reference to the page.
    /// </summary>
    private (int Pid, ulong Address) FindMapping(long pfn)
    {
        MemMap memMap = _machine.MemMap;
        if (memMap.MapCount(pfn) <= 0)
            return (-1, 0);
        if (!_machine.PageLock.TryLock(pfn))
            return (-1, 0);
        AddressSpace? foundMm = null;
        ulong foundAddress = 0;
        try
        {
            _machine.Rmap.Walk(pfn, new RmapWalkControl
            {
                TryLock = true,
                RmapOne = (page, vma, address) =>
                {
                    if (!MapsAt(vma.Mm, address, page))
                        return true;
                    foundMm = vma.Mm;
                    foundAddress = address;
                    return false;
                },
            });
        }
        finally
        {
            _machine.PageLock.Unlock(pfn);
        }
        if (foundMm is null)
            return (-1, 0);
        foreach (VmProcess process in _machine.Processes)
            if (process.Mm == foundMm)
                return (process.Pid, foundAddress);
        return (-1, 0);
    }

    private static unsafe bool MapsAt(AddressSpace mm, ulong address, long pfn)
    {
        ulong* slot = mm.FindPte(address, out _);
        if (slot == null)
            return false;
        var pte = new Pte(Volatile.Read(ref *slot));
        return pte.IsPresent && !pte.IsSpecial && pte.Pfn == pfn;
    }
}
