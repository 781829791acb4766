// The KSM scanner (Linux's ksm_do_scan, scan_get_next_rmap_item, cmp_and_merge_page) and its two
// indexes (stable and unstable "trees"). Everything here runs under the thread mutex.
//
// The indexes are hash tables, not content-ordered trees. Linux orders its trees by memcmp, which
// costs a full-page compare per level of every lookup. Here the key is the page's 64-bit checksum,
// which the change filter computes anyway, mixed with a per-domain secret: one read of the page per
// visit finds the candidate, and the one compare that decides (after write-protection) is the only
// other read. A stale or colliding key can only cost a failed merge, never a wrong one. The secret
// makes the key of the same content differ between dedupe domains, and a match also requires the same
// domain, so one domain can never learn through the index (or merge timing) what another holds.
//
// The unstable index is a bucket array with chains through the items; it is emptied at the start of
// every full scan by clearing the buckets. Items still flagged from the previous scan are cleaned up
// lazily, told apart by the low byte of the scan count they were filed with (Linux's seqnr trick).
// The stable index maps a key to a stable node, or to a chain of copies (dups) when max_page_sharing
// splits one content over several KSM pages.
using System.Diagnostics;
using Vmm.Memory;
using Vmm.Mm;
using Vmm.Native;
using Vmm.Rmap;

namespace Vmm;

public sealed partial class Ksm
{
    private const int InitialBuckets = 1024;

    /// <summary>At most this many same-key entries are examined per lookup (bounds a crafted collision storm).</summary>
    private const int MaxChainProbe = 16;

    private KsmMmSlot _cursorSlot;     // protected by the mm-list lock (written), read under the thread mutex
    private ulong _cursorAddress;
    private int _cursorPrev = -1;      // the item after which the next one is expected; -1: the slot's head
    private long _seqnr;               // full_scans

    private readonly KsmRmapItemPool _items = new();
    private long _rmapItemCount;
    private readonly int _nodeCount;
    private Dictionary<ulong, KsmStableNode>[] _stableTrees;
    private int[][] _unstableBuckets;
    private int _unstableMask;
    private readonly Dictionary<ushort, ulong> _domainSecrets = [];
    private readonly List<KsmStableNode?> _nodeTable = [];
    private readonly Stack<int> _freeNodeIndexes = new();
    private long _nodeObjects;
    private static readonly ulong ZeroChecksum = ComputeZeroChecksum();
    private long _scanStartTicks;

    private static unsafe ulong ComputeZeroChecksum()
    {
        byte* zero = stackalloc byte[PageOps.PageSize];
        new Span<byte>(zero, PageOps.PageSize).Clear();
        return PageOps.Checksum64(zero);
    }

    private int NidOf(long pfn) => _stableTrees.Length == 1 ? 0 : _machine.Topology.NodeOf(pfn);

    private ulong KeyOf(ulong checksum, ushort domain)
    {
        if (!_domainSecrets.TryGetValue(domain, out ulong secret))
            _domainSecrets[domain] = secret = NewSecret();
        // splitmix64's finalizer: every bit of the checksum and the secret reaches every bit of the key.
        ulong z = checksum ^ secret;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
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
                RemoveTrailingRmapItems(slot, keep ? _cursorPrev : -1);
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

    /// <summary>remove_trailing_rmap_items: every item after <paramref name="prev"/> (-1: all of them).</summary>
    private void RemoveTrailingRmapItems(KsmMmSlot slot, int prev)
    {
        int current = prev < 0 ? slot.RmapList : _items[prev].Next;
        SetLink(slot, prev, -1);
        while (current >= 0)
        {
            int next = _items[current].Next;
            RemoveRmapItemFromTree(current);
            FreeItem(slot, current);
            current = next;
        }
    }

    private void StartFullScan()
    {
        _scanStartTicks = Stopwatch.GetTimestamp();
        // Linux drains the per-CPU LRU caches here, whose extra references would make pages look
        // pinned; the references Vmm holds back are the deferred puts (frames copied away on write),
        // which keep dead KSM pages alive and their nodes from going stale. Release them.
        if (_machine.Tlb.DeferredPutCount > 0)
            _machine.Tlb.Flush();
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
            if (node is null || node.Dead)
                return false;
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

    // ================================================================================================
    // The unstable index
    // ================================================================================================

    /// <summary>
    /// unstable_tree_search_insert: an item of this pass with the same content key whose page is still
    /// there (returned with a reference in <paramref name="treePfn"/>, and taken out of the index), or
    /// -1 after filing this item.
    /// </summary>
    private int UnstableSearchInsert(int handle, long pfn, ulong key, int nid, out long treePfn)
    {
        treePfn = -1;
        int[] buckets = _unstableBuckets[nid];
        int bucket = (int)(key & (ulong)_unstableMask);
        ref KsmRmapItem item = ref _items[handle];
        int probes = 0;
        for (int t = buckets[bucket]; t >= 0 && probes < MaxChainProbe; t = _items[t].HashNext, probes++)
        {
            ref KsmRmapItem candidate = ref _items[t];
            if (candidate.Checksum != item.Checksum || candidate.Domain != item.Domain)
                continue;
            long page = GetMergeablePage(t);
            if (page < 0)
                continue; // its page went away since it was filed
            if (page == pfn)
            {
                _machine.PutPage(page);
                return -1; // the same frame (fork shares it): nothing to merge, and not filed twice
            }
            if (_stableTrees.Length > 1 && _machine.Topology.NodeOf(page) != nid)
            {
                _machine.PutPage(page);
                return -1; // moved to another node since: it is filed again next pass
            }
            if (_queuedPfns.Contains(page))
            {
                _machine.PutPage(page);
                continue;
            }
            UnlinkUnstable(t);
            treePfn = page;
            return t;
        }
        item.Address = item.PageAddress | KsmRmapItem.UnstableFlag | ((ulong)_seqnr & KsmRmapItem.SeqnrMask);
        item.Nid = (byte)nid;
        item.HashNext = buckets[bucket];
        buckets[bucket] = handle;
        _pagesUnshared++;
        return -1;
    }

    /// <summary>Files an item (again) in the unstable index of this pass.</summary>
    private void InsertUnstable(int handle)
    {
        ref KsmRmapItem item = ref _items[handle];
        int[] buckets = _unstableBuckets[item.Nid];
        int bucket = (int)(KeyOf(item.Checksum, item.Domain) & (ulong)_unstableMask);
        item.Address = item.PageAddress | KsmRmapItem.UnstableFlag | ((ulong)_seqnr & KsmRmapItem.SeqnrMask);
        item.HashNext = buckets[bucket];
        buckets[bucket] = handle;
        _pagesUnshared++;
    }

    /// <summary>Takes an item of this pass out of its bucket and clears its flag.</summary>
    private void UnlinkUnstable(int handle)
    {
        ref KsmRmapItem item = ref _items[handle];
        int[] buckets = _unstableBuckets[item.Nid];
        int bucket = (int)(KeyOf(item.Checksum, item.Domain) & (ulong)_unstableMask);
        if (buckets[bucket] == handle)
        {
            buckets[bucket] = item.HashNext;
        }
        else
        {
            int t = buckets[bucket];
            while (t >= 0 && _items[t].HashNext != handle)
                t = _items[t].HashNext;
            if (t < 0)
                throw new VmBugException($"KSM rmap item {handle} is flagged unstable but not in its bucket");
            _items[t].HashNext = item.HashNext;
        }
        item.HashNext = -1;
        item.Address = item.PageAddress;
        _pagesUnshared--;
    }

    /// <summary>get_mergeable_page: the page an item's address maps now, with a reference; -1 if none.</summary>
    private long GetMergeablePage(int handle)
    {
        AddressSpace mm = SlotOf(_items[handle].Slot).Mm;
        ulong va = _items[handle].PageAddress;
        mm.MmapLock.EnterReadLock();
        try
        {
            if (mm.FindMergeableVma(va) is not { } vma || vma.KsmDomain != _items[handle].Domain)
                return -1;
            ulong from = va;
            if (!mm.KsmNextAnonPage(ref from, va + AddressSpace.PageSize, out long pfn))
                return -1;
            if ((_machine.MemMap[pfn].Mapping & PageDescriptor.MappingTagMask) == PageDescriptor.MappingKsm)
            {
                _machine.PutPage(pfn);
                return -1;
            }
            return pfn;
        }
        finally
        {
            mm.MmapLock.ExitReadLock();
        }
    }

    // ================================================================================================
    // Items on and off the indexes
    // ================================================================================================

    /// <summary>
    /// remove_rmap_item_from_tree: unlinks an item from its stable node (the counters drop: this is
    /// where a copy-on-write of a KSM page is finally accounted) or from this pass's unstable index.
    /// </summary>
    private void RemoveRmapItemFromTree(int handle)
    {
        ref KsmRmapItem item = ref _items[handle];
        if ((item.Address & KsmRmapItem.StableFlag) != 0)
        {
            KsmStableNode node = _nodeTable[item.Node] ?? throw new VmBugException($"KSM rmap item {handle} names a freed stable node");
            long kpfn = GetKsmPage(node, KsmLockMode.Lock);
            if (kpfn < 0)
                return; // the node was stale: removing it unlinked this item too
            try
            {
                UnlinkFromNode(handle, node);
            }
            finally
            {
                _machine.PageLock.Unlock(kpfn);
                _machine.PutPage(kpfn);
            }
        }
        else if ((item.Address & KsmRmapItem.UnstableFlag) != 0)
        {
            // Filed this pass (age 0): take it out of its bucket. Filed last pass (age 1): the buckets
            // were cleared since, only the flag is left.
            byte age = (byte)((ulong)_seqnr - (item.Address & KsmRmapItem.SeqnrMask));
            if (age > 1)
                throw new VmBugException($"KSM rmap item {handle} stayed in the unstable index for {age} passes");
            if (age == 0)
            {
                UnlinkUnstable(handle);
            }
            else
            {
                item.Address = item.PageAddress;
                _pagesUnshared--;
            }
        }
    }

    /// <summary>
    /// Takes an item off its stable node's list: the last item to leave was the "shared" one, the others
    /// "sharing". Preconditions: the KSM page locked (or gone: a stale node's page can be found by nobody).
    /// </summary>
    private void UnlinkFromNode(int handle, KsmStableNode node)
    {
        ref KsmRmapItem item = ref _items[handle];
        if (item.HashPrev >= 0)
            _items[item.HashPrev].HashNext = item.HashNext;
        else
            node.Hlist = item.HashNext;
        if (item.HashNext >= 0)
            _items[item.HashNext].HashPrev = item.HashPrev;
        node.HlistLen--;
        if (node.Hlist >= 0)
            _pagesSharing--;
        else
            _pagesShared--;
        SlotOf(item.Slot).Mm.KsmMergingPages--;
        item.HashNext = item.HashPrev = item.Node = -1;
        item.AnonVma = null;
        item.Address = item.PageAddress;
    }

    /// <summary>stable_tree_append: links an item to the node of the KSM page it maps. Preconditions: the KSM page locked.</summary>
    private void Append(int handle, KsmStableNode node, AnonVma anonVma, bool bypassLimit)
    {
        if (!bypassLimit && node.HlistLen >= _maxPageSharing)
            throw new VmBugException($"KSM page {node.Kpfn} would exceed max_page_sharing ({_maxPageSharing})");
        ref KsmRmapItem item = ref _items[handle];
        item.HashNext = node.Hlist;
        item.HashPrev = -1;
        if (node.Hlist >= 0)
            _items[node.Hlist].HashPrev = handle;
        node.Hlist = handle;
        node.HlistLen++;
        item.Node = node.Index;
        item.AnonVma = anonVma;
        item.Address = item.PageAddress | KsmRmapItem.StableFlag;
        if (item.HashNext >= 0)
            _pagesSharing++;
        else
            _pagesShared++;
        SlotOf(item.Slot).Mm.KsmMergingPages++;
    }

    // ================================================================================================
    // The stable index
    // ================================================================================================

    private enum KsmLockMode
    {
        NoLock,
        Lock,
    }

    /// <summary>
    /// ksm_get_folio, the keyhole check: the node's page with a reference (and, by mode, its lock) if the
    /// frame still names this node; otherwise the node is stale and is removed (-1). A frame that moved
    /// meanwhile (kpfn changed under us) is followed. (The merge batch takes page locks itself, by
    /// trylock, so Linux's TRYLOCK mode has no caller here.)
    /// </summary>
    private long GetKsmPage(KsmStableNode node, KsmLockMode mode)
    {
        MemMap memMap = _machine.MemMap;
        while (true)
        {
            long kpfn = Volatile.Read(ref node.Kpfn);
            ulong expected = node.MappingWord;
            if (Volatile.Read(ref memMap[kpfn].Mapping) == expected && memMap.TryGetPageUnlessZero(kpfn))
            {
                if (Volatile.Read(ref memMap[kpfn].Mapping) == expected)
                {
                    if (mode == KsmLockMode.NoLock)
                        return kpfn;
                    _machine.PageLock.Lock(kpfn);
                    if (Volatile.Read(ref memMap[kpfn].Mapping) == expected)
                        return kpfn;
                    _machine.PageLock.Unlock(kpfn);
                }
                _machine.PutPage(kpfn);
            }
            // Pairs with the migrator, which publishes the new kpfn before the old frame lets go.
            Interlocked.MemoryBarrier();
            if (Volatile.Read(ref node.Kpfn) != kpfn)
                continue;
            RemoveNodeFromStableTree(node);
            return -1;
        }
    }

    /// <summary>
    /// The node's page with a reference (validated), or -1 if stale. A pending node's page is returned
    /// without one: its pair holds the page for the batch, and one more reference would make the pair's
    /// own write-protect see the page as in use.
    /// </summary>
    private long GetNodePage(KsmStableNode node) => node.Pending ? node.Kpfn : GetKsmPage(node, KsmLockMode.NoLock);

    private void PutNodePage(KsmStableNode node, long pfn)
    {
        if (!node.Pending)
            _machine.PutPage(pfn);
    }

    /// <summary>A KSM page that can take one more mapping (it has some, and fewer than max_page_sharing).</summary>
    private bool IsSharingCandidate(KsmStableNode node)
    {
        int effective = node.HlistLen + node.Reserved;
        return effective > 0 && effective < _maxPageSharing;
    }

    /// <summary>stable_tree_search: a KSM page (referenced, in <paramref name="kpfn"/>) this content can join, or null.</summary>
    private KsmStableNode? StableSearch(ulong key, ushort domain, int nid, out long kpfn)
    {
        kpfn = -1;
        if (!_stableTrees[nid].TryGetValue(key, out KsmStableNode? node) || node.Domain != domain)
            return null;
        if (node.Kind == KsmNodeKind.Chain)
            return ChooseDup(node, prune: true, out kpfn);
        if (!IsSharingCandidate(node))
            return null;
        kpfn = GetNodePage(node);
        return kpfn >= 0 ? node : null;
    }

    /// <summary>
    /// stable_node_dup: picks the copy of a chain to merge into: the fullest one that is not full.
    /// Stale copies found on the way are removed; a full walk (pruning) runs at most every
    /// stable_node_chains_prune_millisecs. A chain left with one copy collapses into a plain node.
    /// </summary>
    private KsmStableNode? ChooseDup(KsmStableNode chain, bool prune, out long kpfn)
    {
        kpfn = -1;
        long now = Environment.TickCount64;
        bool fullWalk = prune && now - chain.ChainPruneTime >= _pruneMillisecs;
        if (fullWalk)
            chain.ChainPruneTime = now;
        KsmStableNode? chosen = null;
        long chosenPfn = -1;
        List<KsmStableNode> dups = chain.Dups!;
        for (int i = 0; i < dups.Count; i++)
        {
            KsmStableNode dup = dups[i];
            long page = GetNodePage(dup);
            if (page < 0)
            {
                i--; // stale: it removed itself from the chain, the next one moved into its place
                continue;
            }
            bool better = chosen is null ||
                (!IsSharingCandidate(chosen) && IsSharingCandidate(dup)) ||
                (IsSharingCandidate(chosen) && IsSharingCandidate(dup) && dup.HlistLen + dup.Reserved > chosen.HlistLen + chosen.Reserved);
            if (better)
            {
                if (chosen is not null)
                    PutNodePage(chosen, chosenPfn);
                chosen = dup;
                chosenPfn = page;
            }
            else
            {
                PutNodePage(dup, page);
            }
            if (!fullWalk && IsSharingCandidate(chosen!))
                break;
        }
        if (chosen is null || chain.Dead)
        {
            if (chosen is not null)
                PutNodePage(chosen, chosenPfn);
            return null;
        }
        if (dups.Count == 1)
            CollapseChain(chain);
        else if (dups[0] != chosen && chosen.HlistLen + chosen.Reserved + 1 < _maxPageSharing)
        {
            dups.Remove(chosen);
            dups.Insert(0, chosen); // the next lookup stops at it
        }
        if (!IsSharingCandidate(chosen))
        {
            PutNodePage(chosen, chosenPfn);
            return null; // every copy is full: the page must find a partner to make a new copy
        }
        kpfn = chosenPfn;
        return chosen;
    }

    /// <summary>A chain with one copy left: the copy takes the chain's place in the index.</summary>
    private void CollapseChain(KsmStableNode chain)
    {
        KsmStableNode dup = chain.Dups![0];
        dup.Kind = KsmNodeKind.Regular;
        dup.Chain = null;
        _stableTrees[chain.Nid][chain.Key] = dup;
        chain.Dups.Clear();
        _stableNodeChains--;
        _stableNodeDups--;
        FreeNode(chain);
    }

    /// <summary>
    /// stable_tree_insert, done when a pair is queued: the node of the KSM page-to-be, indexed at once
    /// (as a further copy if the content already has full KSM pages). Committed or removed by the batch.
    /// </summary>
    private KsmStableNode InsertPendingNode(ulong key, ushort domain, int nid, long pfn)
    {
        KsmStableNode node = NewNode(KsmNodeKind.Regular, key, domain, nid);
        node.Kpfn = pfn;
        node.Pending = true;
        node.Reserved = 2;
        Dictionary<ulong, KsmStableNode> tree = _stableTrees[nid];
        if (!tree.TryGetValue(key, out KsmStableNode? existing))
        {
            tree[key] = node;
            return node;
        }
        if (existing.Domain != domain)
            return node; // a 64-bit key shared across domains: this copy stays out of the index
        if (existing.Kind == KsmNodeKind.Regular)
        {
            KsmStableNode chain = NewNode(KsmNodeKind.Chain, key, domain, nid);
            chain.Dups = [existing];
            chain.ChainPruneTime = Environment.TickCount64;
            existing.Kind = KsmNodeKind.Dup;
            existing.Chain = chain;
            tree[key] = chain;
            _stableNodeChains++;
            _stableNodeDups++;
            existing = chain;
        }
        node.Kind = KsmNodeKind.Dup;
        node.Chain = existing;
        existing.Dups!.Insert(0, node);
        _stableNodeDups++;
        return node;
    }

    private KsmStableNode NewNode(KsmNodeKind kind, ulong key, ushort domain, int nid)
    {
        long handle = _machine.Mappings.NewHandle();
        int index;
        if (_freeNodeIndexes.Count > 0)
        {
            index = _freeNodeIndexes.Pop();
        }
        else
        {
            index = _nodeTable.Count;
            _nodeTable.Add(null);
        }
        var node = new KsmStableNode(handle, index, kind, key, domain, nid);
        _nodeTable[index] = node;
        _machine.Mappings.Register(handle, node);
        _nodeObjects++;
        return node;
    }

    private void FreeNode(KsmStableNode node)
    {
        node.Dead = true;
        _machine.Mappings.Unregister(node.Handle);
        _nodeTable[node.Index] = null;
        _freeNodeIndexes.Push(node.Index);
        _nodeObjects--;
    }

    /// <summary>
    /// remove_node_from_stable_tree: a node whose page is gone (or that is torn down): its items lose
    /// their link (one "shared" per node, the rest "sharing"), then it leaves the index.
    /// </summary>
    private void RemoveNodeFromStableTree(KsmStableNode node)
    {
        while (node.Hlist >= 0)
            UnlinkFromNode(node.Hlist, node);
        UnindexNode(node);
        FreeNode(node);
    }

    /// <summary>Takes a node (regular or dup) out of the index; a chain that loses its last copy goes too.</summary>
    private void UnindexNode(KsmStableNode node)
    {
        Dictionary<ulong, KsmStableNode> tree = _stableTrees[node.Nid];
        if (node.Kind == KsmNodeKind.Dup)
        {
            KsmStableNode chain = node.Chain!;
            chain.Dups!.Remove(node);
            node.Chain = null;
            _stableNodeDups--;
            if (chain.Dups.Count == 0)
            {
                if (tree.TryGetValue(chain.Key, out KsmStableNode? indexed) && indexed == chain)
                    tree.Remove(chain.Key);
                _stableNodeChains--;
                FreeNode(chain);
            }
        }
        else if (tree.TryGetValue(node.Key, out KsmStableNode? indexed) && indexed == node)
        {
            tree.Remove(node.Key);
        }
    }

    /// <summary>Every stable node (regular nodes and dups, not chains), for teardown and audit.</summary>
    private List<KsmStableNode> AllStableNodes() =>
        [.. _nodeTable.Where(n => n is not null && n.Kind != KsmNodeKind.Chain).Select(n => n!)];
}
