// PageAllocator.Hotplug: the allocator's side of memory blocks going offline and coming online (Linux's
// online_pages, __offline_isolated_pages and the zone accounting of offline_pages in
// mm/memory_hotplug.c). The sequence around it (isolation, the notifier chain, migration, retries) is
// Hotplug/MemoryHotplug.Offline.cs.
//
// Offline, once every frame of the block is free on an ISOLATE list (or retired by memory failure):
// OfflineIsolatedBlock takes the free blocks off the lists, takes the block's frames out of its zone
// (managed pages, the zone span) and marks the block offline; after MEM_OFFLINE (whose callbacks may
// read the descriptors one last time) ReleaseOfflineBlock gives its memory back to the host
// (Arena.Decommit) and its descriptors too (MemMap.DeinitSection), so an offline block costs the host
// nothing. Its pageblocks stay ISOLATE while it is offline, as in Linux.
//
// Online (OnlineBlockTo) gives the block to a zone exactly as boot does: as deferred sections that are
// initialised when the zone first needs their frames, so onlining touches no descriptor and no page and
// the memory comes back lazily.
//
// Block states are written under the zone lock of the block's zone (and, by their one caller, under the
// hotplug lock); readers outside it (IsPfnOnline) read them racily and must not rely on them to read a
// descriptor: a frame of a block that is online now may be offline a moment later only if nothing holds
// it, and whoever holds a frame keeps its block online (offline waits for every reference to go).
using Vmm.Diagnostics;
using Vmm.Native;

namespace Vmm.Memory;

/// <summary>The state of a memory block (drivers/base/memory.c's MEM_ONLINE, MEM_GOING_OFFLINE, MEM_OFFLINE).</summary>
internal enum MemoryBlockState : byte
{
    /// <summary>Its frames are managed by a zone.</summary>
    Online,
    /// <summary>Being emptied for offline: its pageblocks are isolated.</summary>
    GoingOffline,
    /// <summary>In no zone; its memory and descriptors are given back to the host.</summary>
    Offline,
    /// <summary>Not present (the hot-add room, or removed): no device; its frames are reserved address space only.</summary>
    Absent,
}

internal sealed unsafe partial class PageAllocator
{
    private readonly byte[] _blockState; // [block] -> MemoryBlockState; written under the block's zone lock

    /// <summary>The state of memory block <paramref name="block"/> (read racily).</summary>
    public MemoryBlockState GetBlockState(int block) => (MemoryBlockState)Volatile.Read(ref _blockState[block]);

    /// <summary>True if block <paramref name="block"/> is online or going offline: its frames belong to a zone.</summary>
    public bool IsBlockOnline(int block) => GetBlockState(block) is MemoryBlockState.Online or MemoryBlockState.GoingOffline;

    /// <summary>True if the block that holds <paramref name="pfn"/> is online or going offline (read racily; see the file overview).</summary>
    public bool IsPfnOnline(long pfn) => IsBlockOnline(_topology.BlockOf(pfn));

    /// <summary>Frames of blocks that are offline or absent, in no zone (for the audit's frame count).</summary>
    public long OfflineFrames
    {
        get
        {
            long frames = 0;
            for (int block = 0; block < _blockState.Length; block++)
                if (!IsBlockOnline(block))
                    frames += _topology.FramesPerBlock;
            return frames;
        }
    }

    /// <summary>
    /// Hot-add (add_memory's memory block creation) or removal (remove_memory): an absent block becomes
    /// present and offline, or an offline block absent. Preconditions: the caller holds the hotplug lock.
    /// </summary>
    /// <returns>False if the block was not in the expected state (nothing changed).</returns>
    internal bool SetPresent(int block, bool present)
    {
        Zone zone = _blockZone[block];
        lock (zone.Lock)
        {
            MemoryBlockState expected = present ? MemoryBlockState.Absent : MemoryBlockState.Offline;
            if (GetBlockState(block) != expected)
                return false;
            Volatile.Write(ref _blockState[block], (byte)(present ? MemoryBlockState.Offline : MemoryBlockState.Absent));
            return true;
        }
    }

    /// <summary>True if node <paramref name="node"/> has at least one block that is not offline.</summary>
    public bool NodeHasOnlineMemory(int node)
    {
        for (int i = 0; i < _topology.BlocksPerNode; i++)
            if (IsBlockOnline(node * _topology.BlocksPerNode + i))
                return true;
        return false;
    }

    /// <summary>Marks an online block going offline (after its isolation) or back online (a failed offline).</summary>
    internal void SetGoingOffline(int block, bool going)
    {
        Zone zone = _blockZone[block];
        lock (zone.Lock)
        {
            MemoryBlockState expected = going ? MemoryBlockState.Online : MemoryBlockState.GoingOffline;
            if (GetBlockState(block) != expected)
                throw new VmBugException($"memory block {block} is {GetBlockState(block)}, not {expected}");
            Volatile.Write(ref _blockState[block],
                (byte)(going ? MemoryBlockState.GoingOffline : MemoryBlockState.Online));
        }
    }

    /// <summary>
    /// test_pages_isolated in MEMORY_OFFLINE mode: every frame of the block is free on an ISOLATE list
    /// or retired by memory failure (PG_hwpoison, held only by the retirement).
    /// </summary>
    public bool TestBlockIsolated(int block)
    {
        long start = _topology.FirstPfnOfBlock(block);
        return TestPagesIsolated(start, start + _topology.FramesPerBlock, acceptPoisoned: true);
    }

    /// <summary>
    /// __offline_isolated_pages and offline_pages' accounting: takes the free blocks of
    /// <paramref name="block"/> off the ISOLATE lists, the block's frames out of its zone (managed pages,
    /// span) and marks it offline (<see cref="ReleaseOfflineBlock"/> then gives its memory back).
    /// Preconditions: <see cref="TestBlockIsolated"/> returned true and nothing can free into the block
    /// (every frame is free or retired, so no reference is left); the caller holds the hotplug lock.
    /// </summary>
    /// <returns>Frames that were retired by memory failure (they leave with the block).</returns>
    public long OfflineIsolatedBlock(int block)
    {
        Zone zone = _blockZone[block];
        long start = _topology.FirstPfnOfBlock(block);
        long end = start + _topology.FramesPerBlock;
        long free = 0, poisoned = 0;
        lock (zone.Lock)
        {
            if (GetBlockState(block) != MemoryBlockState.GoingOffline)
                throw new VmBugException($"memory block {block} offlined while {GetBlockState(block)}");
            SplitCoveringBlockLocked(zone, start); // a block never spans memory blocks; kept for symmetry with undo
            for (long pfn = start; pfn < end;)
            {
                ref PageDescriptor page = ref _memMap[pfn];
                if ((page.Flags & (ulong)PageFlags.Buddy) != 0)
                {
                    if ((MigrateType)page.Index != MigrateType.Isolate)
                        throw new VmBugException($"frame {pfn} of offlining block {block} is free on a {(MigrateType)page.Index} list");
                    int order = (int)page.Private;
                    DelFromFreeListLocked(zone, pfn);
                    free += 1L << order;
                    pfn += 1L << order;
                    continue;
                }
                if (!IsRetiredPoisoned(ref page))
                    throw new VmBugException($"frame {pfn} of offlining block {block} is in use (refcount {page.RefCount}, flags {(PageFlags)page.Flags})");
                poisoned++;
                pfn++;
            }
            zone.ManagedPages -= end - start;
            Volatile.Write(ref _blockState[block], (byte)MemoryBlockState.Offline);
            RecomputeZoneSpanLocked(zone);
        }
        SetWatermarks(_options.EffectiveMinFreeKbytes(NormalManagedPages()));
        return poisoned;
    }

    /// <summary>
    /// Gives an offline block's memory and its descriptors back to the host. Called after MEM_OFFLINE,
    /// whose callbacks (KSM's pruning of stable nodes that still name the block's frames) may read the
    /// descriptors for the last time. Preconditions: the block is offline; the caller holds the hotplug lock.
    /// </summary>
    public void ReleaseOfflineBlock(int block)
    {
        if (GetBlockState(block) != MemoryBlockState.Offline)
            throw new VmBugException($"memory block {block} released while {GetBlockState(block)}");
        long start = _topology.FirstPfnOfBlock(block);
        long end = start + _topology.FramesPerBlock;
        for (long section = _memMap.SectionOf(start); section < _memMap.SectionOf(end); section++)
            if (_memMap.IsSectionInitialised(section))
                _memMap.DeinitSection(section);
        TryDecommit(start, end - start);
    }

    /// <summary>
    /// online_pages: gives offline block <paramref name="block"/> to the <paramref name="type"/> zone of
    /// its node, as deferred sections of never-touched memory (as boot does), and sets the watermarks again.
    /// Preconditions: the block is offline; the caller holds the hotplug lock.
    /// </summary>
    public void OnlineBlockTo(int block, ZoneType type)
    {
        int node = _topology.NodeOfBlock(block);
        Zone zone = _nodeZones[node][(int)type];
        Zone old = _blockZone[block];
        long start = _topology.FirstPfnOfBlock(block);
        lock (old.Lock)
        {
            if (GetBlockState(block) != MemoryBlockState.Offline)
                throw new VmBugException($"memory block {block} onlined while {GetBlockState(block)}");
        }
        // Nobody reads the pageblock types or the zone of an offline block's frames (nothing holds one),
        // so they can change before the zone takes the block.
        for (long pb = start; pb < start + _topology.FramesPerBlock; pb += PageblockFrames)
            Volatile.Write(ref _pageblockType[pb >> PageblockOrder], (byte)MigrateType.Movable);
        Volatile.Write(ref _blockZone[block], zone);
        // Online in the same step as the zone gets the frames (its deferred count and cursor): from the
        // moment an allocation can take one, every reader sees its block online, and a zone that grows
        // meanwhile never meets the block's sections online but not yet counted as deferred.
        lock (zone.Lock)
        {
            Volatile.Write(ref _blockState[block], (byte)MemoryBlockState.Online);
            OnlineBlockLocked(zone, block);
        }
        SetWatermarks(_options.EffectiveMinFreeKbytes(NormalManagedPages()));
    }

    /// <summary>The zone of an online block, or null if the block is offline.</summary>
    public ZoneType? ZoneTypeOfBlock(int block) =>
        IsBlockOnline(block) ? _blockZone[block].Type : null;

    /// <summary>The zone type an offline block was last online in (its default zone for "online").</summary>
    public ZoneType LastZoneTypeOfBlock(int block) => _blockZone[block].Type;

    /// <summary>resize_zone_range / shrink_zone_span: the zone spans its blocks that are not offline. Preconditions: zone lock held.</summary>
    private void RecomputeZoneSpanLocked(Zone zone)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        long startPfn = long.MaxValue, endPfn = 0;
        for (int block = 0; block < _blockZone.Length; block++)
        {
            if (_blockZone[block] != zone || !IsBlockOnline(block))
                continue;
            long first = _topology.FirstPfnOfBlock(block);
            startPfn = Math.Min(startPfn, first);
            endPfn = Math.Max(endPfn, first + _topology.FramesPerBlock);
        }
        zone.StartPfn = startPfn;
        zone.EndPfn = endPfn;
    }
}
