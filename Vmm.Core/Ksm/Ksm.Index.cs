// The KSM index (Linux's stable and unstable "trees", in mm/ksm.c): where the scanner (Ksm.Scan.cs)
// looks up a page's content. Everything here runs under the thread mutex.
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
using System.Security.Cryptography;
using Vmm.Diagnostics;
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

    private readonly int _nodeCount;
    private Dictionary<ulong, KsmStableNode>[] _stableTrees;
    private int[][] _unstableBuckets;
    private int _unstableMask;
    private readonly Dictionary<ushort, ulong> _domainSecrets = [];
    private readonly List<KsmStableNode?> _nodeTable = [];
    private readonly Stack<int> _freeNodeIndexes = new();
    private long _nodeObjects;

    private static ulong NewSecret() => BitConverter.ToUInt64(RandomNumberGenerator.GetBytes(8)) | 1;

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
    /// "sharing". Preconditions: the thread mutex held; the KSM page locked (or gone: a stale node's page
    /// can be found by nobody; so only the thread mutex is checked).
    /// </summary>
    private void UnlinkFromNode(int handle, KsmStableNode node)
    {
        // The KSM page's own lock is not checked: a stale node's page may be gone (freed, even reused).
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
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

    /// <summary>stable_tree_append: links an item to the node of the KSM page it maps. Preconditions: the thread mutex held; the KSM page locked.</summary>
    private void Append(int handle, KsmStableNode node, AnonVma anonVma, bool bypassLimit)
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        LockAssert.PageLocked(_machine.PageLock, node.Kpfn);
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
        if (kpfn >= 0 && IsMisplaced(node))
        {
            // Its page moved to another NUMA node since (merge_across_nodes = 0): Linux's replace path.
            // It leaves this index for migrate_nodes, and the scanner re-homes it when it meets the page.
            PutNodePage(node, kpfn);
            LeaveForMigrateNodes(node);
            kpfn = -1;
        }
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
            if (page >= 0 && IsMisplaced(dup))
            {
                // Moved to another NUMA node since: off to migrate_nodes (the replace path), out of the chain.
                PutNodePage(dup, page);
                LeaveForMigrateNodes(dup);
                page = -1;
            }
            if (page < 0)
            {
                i--; // stale or moved: it removed itself from the chain, the next one moved into its place
                if (chain.Dead)
                    break; // that was the last copy: the chain is gone
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
            existing = MakeChain(existing);
        node.Kind = KsmNodeKind.Dup;
        node.Chain = existing;
        existing.Dups!.Insert(0, node);
        _stableNodeDups++;
        return node;
    }

    /// <summary>alloc_stable_node_chain: a regular indexed node becomes the first copy of a new chain, which takes its place.</summary>
    private KsmStableNode MakeChain(KsmStableNode existing)
    {
        KsmStableNode chain = NewNode(KsmNodeKind.Chain, existing.Key, existing.Domain, existing.Nid);
        chain.Dups = [existing];
        chain.ChainPruneTime = Environment.TickCount64;
        existing.Kind = KsmNodeKind.Dup;
        existing.Chain = chain;
        _stableTrees[existing.Nid][existing.Key] = chain;
        _stableNodeChains++;
        _stableNodeDups++;
        return chain;
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
        if (node.Migrating)
        {
            // On migrate_nodes, in no index.
            _migrateNodes.Remove(node);
            node.Migrating = false;
            return;
        }
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
