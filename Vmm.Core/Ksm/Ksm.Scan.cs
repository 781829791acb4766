// The KSM scanner (Linux's ksm_do_scan, scan_get_next_rmap_item, cmp_and_merge_page). Everything here
// runs under the thread mutex. Each batch walks the mergeable VMAs of the registered mms from a
// cursor, one present anonymous page at a time; a page whose checksum held since its last visit is
// looked up in the indexes (Ksm.Index.cs: the stable index of KSM pages, the unstable index of this
// pass's candidates), and a match is queued for the merge batch (Ksm.Merge.cs).
using System.Diagnostics;
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Mm;
using Vmm.Native;
using Vmm.Rmap;

namespace Vmm;

public sealed partial class Ksm
{
    private KsmMmSlot _cursorSlot;     // protected by the mm-list lock (written), read under the thread mutex
    private ulong _cursorAddress;
    private int _cursorPrev = -1;      // the item after which the next one is expected; -1: the slot's head
    private long _seqnr;               // full_scans

    private readonly KsmRmapItemPool _items = new();
    private long _rmapItemCount;
    private static readonly ulong ZeroChecksum = ComputeZeroChecksum();
    private long _scanStartTicks;

    private static unsafe ulong ComputeZeroChecksum()
    {
        byte* zero = stackalloc byte[PageOps.PageSize];
        new Span<byte>(zero, PageOps.PageSize).Clear();
        return PageOps.Checksum64(zero);
    }

    private unsafe byte* Frame(long pfn) => _machine.Arena.FrameAddress(pfn);

    // ================================================================================================
    // ksm_do_scan
    // ================================================================================================

    /// <summary>One batch: up to <paramref name="budget"/> pages, ending early at a full-scan boundary. Preconditions: thread mutex held.</summary>
    // Why AggressiveOptimization: one call runs a loop over tens of thousands of pages, so tiered
    // compilation would only ever reach it through on-stack replacement, late and less optimized.
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    private int DoScan(int budget)
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        _busy.Start();
        try
        {
            int scanned = 0;
            while (scanned < budget)
            {
                int item = ScanGetNextRmapItem(out long pfn);
                if (item < 0)
                    break;
                bool queued = false;
                try
                {
                    queued = CmpAndMergePage(item, pfn);
                }
                finally
                {
                    if (!queued)
                        _machine.PutPage(pfn);
                }
                scanned++;
                _pagesScanned++;
                if (_batch.Count >= BatchSize)
                    CommitBatch();
            }
            CommitBatch();
            return scanned;
        }
        catch
        {
            AbortBatch();
            throw;
        }
        finally
        {
            _busy.Stop();
        }
    }

    /// <summary>
    /// scan_get_next_rmap_item: the item of the next present anonymous page of a mergeable VMA, with a
    /// reference to the page in <paramref name="pfn"/>; -1 at the end of a full scan, when nothing is
    /// registered, or when no item could be allocated.
    /// </summary>
    private int ScanGetNextRmapItem(out long pfn)
    {
        pfn = -1;
        if (_cursorSlot == _head)
        {
            StartFullScan();
            lock (_mmListLock)
                _cursorSlot = _head.Next;
            if (_cursorSlot == _head)
                return -1;
            _cursorAddress = 0;
            _cursorPrev = -1;
        }
        while (true)
        {
            KsmMmSlot slot = _cursorSlot;
            AddressSpace mm = slot.Mm;
            mm.MmapLock.EnterReadLock();
            try
            {
                if (!mm.Exited && !mm.KsmExiting)
                {
                    IReadOnlyList<Vma> vmas = mm.Vmas;
                    ulong va = _cursorAddress;
                    for (int i = FirstVmaEndingAbove(vmas, va); i < vmas.Count; i++)
                    {
                        Vma vma = vmas[i];
                        if ((vma.Flags & VmaFlags.Mergeable) == 0)
                            continue;
                        if (va < vma.Start)
                            va = vma.Start;
                        if (vma.AnonVma is null)
                        {
                            va = vma.End;
                            continue;
                        }
                        while (mm.KsmNextAnonPage(ref va, vma.End, out long page))
                        {
                            int item = GetNextRmapItem(slot, va);
                            if (item < 0)
                            {
                                _machine.PutPage(page);
                                return -1;
                            }
                            _cursorPrev = item;
                            _items[item].Domain = vma.KsmDomain;
                            if (ShouldSkipRmapItem(item, page))
                            {
                                _machine.PutPage(page);
                                va += AddressSpace.PageSize;
                                continue;
                            }
                            _cursorAddress = va + AddressSpace.PageSize;
                            pfn = page;
                            return item;
                        }
                    }
                }
            }
            finally
            {
                mm.MmapLock.ExitReadLock();
            }

            // Nothing more in this mm. Commit first: queued merges name items that may be freed below.
            CommitBatch();
            KsmMmSlot next;
            mm.MmapLock.EnterReadLock();
            try
            {
                bool keep = !mm.Exited && !mm.KsmExiting && (mm.KsmMergeAny || mm.Vmas.Any(v => (v.Flags & VmaFlags.Mergeable) != 0));
                RemoveTrailingRmapItems(slot, keep ? _cursorPrev : -1, keepMigrating: keep);
                lock (_mmListLock)
                {
                    next = slot.Next;
                    _cursorSlot = next;
                    if (!keep)
                    {
                        Unlink(slot);
                        FreeSlotLocked(slot);
                    }
                }
            }
            finally
            {
                mm.MmapLock.ExitReadLock();
            }
            if (next == _head)
            {
                EndFullScan();
                return -1;
            }
            _cursorAddress = 0;
            _cursorPrev = -1;
        }
    }

    private static int FirstVmaEndingAbove(IReadOnlyList<Vma> vmas, ulong address)
    {
        int lo = 0, hi = vmas.Count;
        while (lo < hi)
        {
            int mid = (lo + hi) >>> 1;
            if (vmas[mid].End > address)
                hi = mid;
            else
                lo = mid + 1;
        }
        return lo;
    }

    /// <summary>
    /// get_next_rmap_item: the item for <paramref name="va"/> in the slot's sorted list, after the
    /// cursor. Items for lower addresses met on the way belong to pages that are gone: freed.
    /// </summary>
    private int GetNextRmapItem(KsmMmSlot slot, ulong va)
    {
        int prev = _cursorPrev;
        int current = prev < 0 ? slot.RmapList : _items[prev].Next;
        while (current >= 0)
        {
            ulong address = _items[current].PageAddress;
            if (address == va)
                return current;
            if (address > va)
                break;
            int next = _items[current].Next;
            if (IsMappingStillLinked(slot, current))
            {
                // Its page is being moved (Ksm.Migrate.cs), or was while the walk passed it: keep it linked.
                prev = current;
                current = next;
                continue;
            }
            RemoveRmapItemFromTree(current);
            SetLink(slot, prev, next);
            FreeItem(slot, current);
            current = next;
        }
        int item = _items.Allocate();
        if (item < 0)
            return -1;
        ref KsmRmapItem fresh = ref _items[item];
        fresh.Address = va;
        fresh.Slot = slot.Index;
        fresh.Next = current;
        SetLink(slot, prev, item);
        _rmapItemCount++;
        slot.Mm.KsmRmapItems++;
        return item;
    }

    private void SetLink(KsmMmSlot slot, int prev, int value)
    {
        if (prev < 0)
            slot.RmapList = value;
        else
            _items[prev].Next = value;
    }

    private void FreeItem(KsmMmSlot slot, int item)
    {
        _items.Free(item);
        _rmapItemCount--;
        slot.Mm.KsmRmapItems--;
    }

    /// <summary>
    /// remove_trailing_rmap_items: every item after <paramref name="prev"/> (-1: all of them), except, when
    /// <paramref name="keepMigrating"/>, the stable items of mappings that are migration entries now.
    /// </summary>
    private void RemoveTrailingRmapItems(KsmMmSlot slot, int prev, bool keepMigrating = false)
    {
        int current = prev < 0 ? slot.RmapList : _items[prev].Next;
        SetLink(slot, prev, -1);
        while (current >= 0)
        {
            int next = _items[current].Next;
            if (keepMigrating && IsMappingStillLinked(slot, current))
            {
                SetLink(slot, prev, current);
                _items[current].Next = -1;
                prev = current;
                current = next;
                continue;
            }
            RemoveRmapItemFromTree(current);
            FreeItem(slot, current);
            current = next;
        }
    }

    /// <summary>
    /// Whether a stable item that the walk has passed without visiting must stay linked: its address still
    /// leads to its node's KSM page. The walk passes an address whose PTE is not a present page; for a KSM
    /// mapping that is a migration entry (its page is being moved, the mapping comes back when the move
    /// ends). Linux drops the item there and links the mapping again on a later visit; until then no item
    /// leads to the mapping, and a second move of the page could not find it. So the scanner keeps such items.
    /// Why the present-PTE case too: the walk decides to pass an address (KsmNextAnonPage, reading the PTE
    /// without locks) earlier than it decides here, when it meets the item on its way to a later address or
    /// at the end of the mm. A move can end in between (the migrator takes no mmap_lock): the PTE was a
    /// migration entry when passed and maps the moved page (whose mapping word names the node) now. Had this
    /// asked only "is it a migration entry now", it would drop the item of a live mapping, which the KSM
    /// reverse map would then miss until the next pass relinked it (the Audit's "the reverse map of KSM
    /// page .. does not find it", and a move or unmerge in that window would miss the mapping). Asking
    /// whether the address still leads to the node's page, in one read of the PTE, covers both moments.
    /// Preconditions: the mm's mmap_lock held (the scanner's); thread mutex held.
    /// </summary>
    private bool IsMappingStillLinked(KsmMmSlot slot, int handle)
    {
        ref KsmRmapItem item = ref _items[handle];
        if ((item.Address & KsmRmapItem.StableFlag) == 0 || _nodeTable[item.Node] is not { } node)
            return false;
        return slot.Mm.KsmStillMapsKsmPage(item.PageAddress, node.MappingWord);
    }

    private void StartFullScan()
    {
        _scanStartTicks = Stopwatch.GetTimestamp();
        // lru_add_drain_all, as Linux's scan_get_next_rmap_item: a page still in a per-CPU add batch
        // holds the batch's reference, which would make it look pinned to the merge.
        _machine.Lru.DrainAll();
        // The other references Vmm holds back are the deferred puts (frames copied away on write),
        // which keep dead KSM pages alive and their nodes from going stale. Release them.
        if (_machine.Tlb.DeferredPutCount > 0)
            _machine.Tlb.Flush();
        // Nodes on migrate_nodes are found by no lookup: those whose pages went away are pruned here.
        PruneMigrateNodes();
        // The unstable index starts empty on every pass, sized for the items there are.
        int wanted = InitialBuckets;
        while (wanted < _rmapItemCount && wanted < 1 << 28)
            wanted <<= 1;
        for (int nid = 0; nid < _unstableBuckets.Length; nid++)
        {
            if (_unstableBuckets[nid].Length != wanted)
                _unstableBuckets[nid] = new int[wanted];
            Array.Fill(_unstableBuckets[nid], -1);
        }
        _unstableMask = wanted - 1;
    }

    private void EndFullScan()
    {
        Volatile.Write(ref _seqnr, _seqnr + 1);
        if (_advisorMode == KsmAdvisorMode.ScanTime)
            RunScanTimeAdvisor();
        ReleaseFreedMemory();
    }

    // ================================================================================================
    // smart_scan
    // ================================================================================================

    /// <summary>should_skip_rmap_item: pages that never merge are visited less and less often.</summary>
    private bool ShouldSkipRmapItem(int handle, long pfn)
    {
        if (!_smartScan)
            return false;
        if ((_machine.MemMap[pfn].Mapping & PageDescriptor.MappingTagMask) == PageDescriptor.MappingKsm)
            return false;
        ref KsmRmapItem item = ref _items[handle];
        if ((item.Address & KsmRmapItem.StableFlag) != 0)
        {
            // Merged until a write copied it: it is live data again, and its former partners were
            // copied too, likely in other passes. Restart its age so that their schedules line up and
            // they can meet in the unstable index again (Linux keeps the age, and such twins can stay
            // in alternating skip schedules forever).
            item.Age = 0;
            item.RemainingSkips = 0;
        }
        byte age = item.Age;
        if (age != byte.MaxValue)
            item.Age++;
        if (age < 3)
            return false; // enough visits to go from checksum to unstable index to merge
        if (item.RemainingSkips == 0)
        {
            item.RemainingSkips = age <= 3 ? (byte)1 : age <= 5 ? (byte)2 : age <= 8 ? (byte)4 : (byte)8;
            return false;
        }
        _pagesSkipped++;
        item.RemainingSkips--;
        // Never leave an item in the unstable index across a pass it was not visited in.
        RemoveRmapItemFromTree(handle);
        return true;
    }

    // ================================================================================================
    // cmp_and_merge_page
    // ================================================================================================

    /// <summary>
    /// Decides what to do with one visited page. Returns true if the page's reference went to a merge
    /// queued in the batch (the batch drops it), false if the caller drops it now.
    /// </summary>
    private unsafe bool CmpAndMergePage(int handle, long pfn)
    {
        ulong mapping = Volatile.Read(ref _machine.MemMap[pfn].Mapping);
        if ((mapping & PageDescriptor.MappingTagMask) == PageDescriptor.MappingKsm)
        {
            // Already a KSM page: nothing to do if this mapping is linked; otherwise it is a mapping
            // fork made (the child shares the KSM page): link it, no compare needed.
            KsmStableNode? node = _machine.Mappings.Find<KsmStableNode>((long)(mapping >> 2));
            if (node is null || node.Dead || node.Kind == KsmNodeKind.Chain)
                return false;
            // merge_across_nodes = 0: a page migrated to another NUMA node leaves its node's index for
            // migrate_nodes, and this visit re-homes it (Ksm.Migrate.cs). The scanner holds a reference, so
            // the page cannot move on meanwhile (the migrator would see it and back off).
            if (IsMisplaced(node))
                LeaveForMigrateNodes(node);
            else if (node.Nid == NidOf(pfn))
                Volatile.Write(ref node.MovedAcrossNodes, false);
            if (node.Migrating)
                return RehomeKsmPage(handle, pfn, node);
            ref KsmRmapItem linked = ref _items[handle];
            if ((linked.Address & KsmRmapItem.StableFlag) != 0 && linked.Node == node.Index)
                return false;
            RemoveRmapItemFromTree(handle);
            LinkForkedMapping(handle, pfn, node);
            return false;
        }
        RemoveRmapItemFromTree(handle);
        if (_queuedPfns.Contains(pfn))
            return false; // another mapping of this frame is already queued in this batch
        ref KsmRmapItem item = ref _items[handle];
        ulong checksum = PageOps.Checksum64(Frame(pfn));
        if (checksum != item.Checksum)
        {
            item.Checksum = checksum; // changed since the last visit: volatile, wait for the next one
            return false;
        }
        if (_useZeroPages && checksum == ZeroChecksum)
        {
            Queue(new MergeOp { Kind = MergeKind.Zero, Item = handle, Pfn = pfn });
            return true;
        }
        return QueueMerge(handle, pfn, retry: false);
    }

    /// <summary>
    /// The index lookups of cmp_and_merge_page for a page whose checksum held: queue a merge into a
    /// KSM page, or with an unstable partner, or file the page. Returns true if a merge was queued
    /// (with the page's reference).
    /// </summary>
    private bool QueueMerge(int handle, long pfn, bool retry)
    {
        ref KsmRmapItem item = ref _items[handle];
        int nid = NidOf(pfn);
        ulong key = KeyOf(item.Checksum, item.Domain);
        KsmStableNode? stable = StableSearch(key, item.Domain, nid, out long kpfn);
        if (stable is not null)
        {
            stable.Reserved++;
            Queue(new MergeOp { Kind = MergeKind.Stable, Item = handle, Pfn = pfn, Node = stable, Kpfn = kpfn, KpfnReferenced = !stable.Pending, IsRetry = retry });
            return true;
        }
        int tree = UnstableSearchInsert(handle, pfn, key, nid, out long treePfn);
        if (tree < 0)
            return false;
        // A partner: this page will become the KSM page. Its stable node is indexed now (pending), so
        // that the pages after it in this batch can join it.
        KsmStableNode pending = InsertPendingNode(key, item.Domain, nid, pfn);
        Queue(new MergeOp { Kind = MergeKind.Pair, Item = handle, Pfn = pfn, TreeItem = tree, TreePfn = treePfn, Node = pending, IsRetry = retry });
        return true;
    }

    /// <summary>A KSM page mapped where no item is linked yet (fork copied the mapping): link it.</summary>
    private void LinkForkedMapping(int handle, long pfn, KsmStableNode node)
    {
        AddressSpace mm = SlotOf(_items[handle].Slot).Mm;
        ulong va = _items[handle].PageAddress;
        mm.MmapLock.EnterReadLock();
        try
        {
            Vma? vma = mm.FindMergeableVma(va);
            if (vma is null || !_machine.PageLock.TryLock(pfn))
                return;
            try
            {
                if (Volatile.Read(ref _machine.MemMap[pfn].Mapping) == node.MappingWord && !node.Dead)
                    Append(handle, node, vma.AnonVma!, bypassLimit: true);
            }
            finally
            {
                _machine.PageLock.Unlock(pfn);
            }
        }
        finally
        {
            mm.MmapLock.ExitReadLock();
        }
    }
}
