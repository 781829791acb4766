// Migration of KSM pages (Linux's ksm_migrate_folio, the migrate_nodes list of merge_across_nodes = 0,
// the re-homing in stable_tree_search / cmp_and_merge_page, and the pruning of migrate_nodes at the
// start of a full scan).
//
// A stable node names its KSM page by frame number (kpfn) and holds no reference. When the migrator
// moves a KSM page, it copies the page and its mapping word (which names the node) to the new frame,
// and then, with both pages locked and every mapping still a migration entry, calls MigratePage: the
// node now names the new frame, and the old frame's mapping word stops naming the node. A lock-free
// reader (GetKsmPage, the keyhole check) that still holds the old kpfn fails its mapping check on the
// old frame, re-reads kpfn after a barrier, sees it changed and follows it; a reader that validates
// under the page lock (the merge batch, LinkForkedMapping) sees the old frame named by no node.
//
// merge_across_nodes = 0 keeps one stable index per NUMA node, and a node must sit in the index of
// its page's node. Moving the page does not move the node (MigratePage cannot take the thread mutex:
// it runs under page locks, which nest inside it). As in Linux, the node stays where it is until the
// scanner next meets the page (or a lookup meets the node): then it leaves its index for the
// migrate_nodes list, and the same visit looks its content up in the index of the page's new node:
//   * an equal KSM page with room is there: this mapping is merged into it (the moved page's mappings
//     go over one visit at a time; when the last one has gone its frame is freed and its node, now
//     stale, is pruned). Linux keeps a moved page mapped more than once as a further copy in a chain
//     instead; the issue asks for the merge, which gives the frame back;
//   * the content is there but every copy is full (max_page_sharing): the node joins the content's
//     chain as one more copy (Linux's chain_append);
//   * nothing is there: the node is inserted into that index (it is "re-homed").
// A lookup that meets a node whose page has moved off its index's node (not yet visited) moves it to
// migrate_nodes too (Linux's replace path). Nodes left on migrate_nodes whose pages went away are pruned
// at the start of every full scan; run = 2 and the merge_across_nodes switch tear them down with the rest.
//
// Locking: MigratePage runs under both page locks, without the thread mutex (the lock order is thread
// mutex -> page lock); it writes kpfn and the old frame's mapping word only, with a barrier between
// them. Everything else here runs under the thread mutex; the moved page's items leave its node under
// its page lock (taken by the merge batch), as every change to a node's item list does.
using Vmm.Diagnostics;
using Vmm.Memory;

namespace Vmm;

public sealed partial class Ksm
{
    /// <summary>
    /// migrate_nodes: stable nodes taken out of their index because their page is now on another NUMA
    /// node (merge_across_nodes = 0), waiting to be re-homed by the scanner. Protected by the thread mutex.
    /// </summary>
    private readonly HashSet<KsmStableNode> _migrateNodes = [];

    /// <summary>Nodes on the migrate_nodes list (for tests).</summary>
    internal int MigrateNodeCount
    {
        get
        {
            lock (_threadMutex)
                return _migrateNodes.Count;
        }
    }

    /// <summary>
    /// ksm_migrate_folio: the KSM page in <paramref name="oldPfn"/> now lives in <paramref name="newPfn"/>.
    /// The stable node its mapping word names is switched to the new frame, and the old frame stops
    /// naming the node. With merge_across_nodes = 0 the node stays in its index until the scanner meets
    /// the page (it cannot be moved here: that needs the thread mutex, which nests outside page locks).
    /// Preconditions: both pages locked; the new page already carries the old one's mapping word and
    /// contents; every mapping of the page is a migration entry (no PTE names either frame yet). The
    /// migrator calls it after the copy and before it restores the PTEs: the KSM reverse-map walk of the
    /// new page (RemoveMigrationPtes) finds the mappings only once the node names the new frame.
    /// </summary>
    internal void MigratePage(long oldPfn, long newPfn)
    {
        LockAssert.PageLocked(_machine.PageLock, oldPfn);
        LockAssert.PageLocked(_machine.PageLock, newPfn);
        MemMap memMap = _machine.MemMap;
        ulong mapping = Volatile.Read(ref memMap[newPfn].Mapping);
        if ((mapping & PageDescriptor.MappingTagMask) != PageDescriptor.MappingKsm || Volatile.Read(ref memMap[oldPfn].Mapping) != mapping)
            throw new VmBugException($"KSM migration of frame {oldPfn} to {newPfn}: the new frame does not carry the old one's KSM mapping word ({mapping:x})");
        // A KSM page named by no node (torn down while it lingered unmapped): nothing names the frame.
        KsmStableNode? node = _machine.Mappings.Find<KsmStableNode>((long)(mapping >> 2));
        if (node is null)
            return;
        // The node cannot go away meanwhile: only a failed keyhole check or a teardown that takes this
        // page's lock removes a node whose page is alive, and the old frame is locked, referenced and
        // still named by it.
        long kpfn = Volatile.Read(ref node.Kpfn);
        if (kpfn != oldPfn)
            throw new VmBugException($"KSM migration of frame {oldPfn}: its stable node {node.Handle} names frame {kpfn}");
        if (_machine.Topology.NodeOf(newPfn) != _machine.Topology.NodeOf(oldPfn))
            Volatile.Write(ref node.MovedAcrossNodes, true); // the audit's licence to be in the wrong index for now
        Volatile.Write(ref node.Kpfn, newPfn);
        // Pairs with GetKsmPage: a reader that sees the old frame no longer naming the node re-reads kpfn
        // after a barrier, and must find the new frame there.
        Interlocked.MemoryBarrier();
        Volatile.Write(ref memMap[oldPfn].Mapping, PageDescriptor.MappingKsm);
    }

    /// <summary>
    /// Whether a node sits in the index of another NUMA node than its page's (merge_across_nodes = 0):
    /// its page moved since it was indexed. A pending node's page is this batch's, held by its pair.
    /// Preconditions: thread mutex held.
    /// </summary>
    private bool IsMisplaced(KsmStableNode node) =>
        _stableTrees.Length > 1 && !node.Migrating && !node.Pending && node.Kind != KsmNodeKind.Chain &&
        NidOf(Volatile.Read(ref node.Kpfn)) != node.Nid;

    /// <summary>
    /// Takes a node out of its index (a dup out of its chain, which goes if it was the last copy) and
    /// puts it on migrate_nodes, as a plain node. Its items stay linked: its page is still mapped.
    /// Preconditions: thread mutex held.
    /// </summary>
    private void LeaveForMigrateNodes(KsmStableNode node)
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        if (node.Migrating)
            return;
        UnindexNode(node);
        node.Kind = KsmNodeKind.Regular;
        node.Migrating = true;
        _migrateNodes.Add(node);
    }

    /// <summary>
    /// The scanner meets a KSM page whose stable node waits on migrate_nodes (cmp_and_merge_page with
    /// stable_tree_search's migrate_nodes paths), at the item <paramref name="handle"/>: merge this
    /// mapping into an equal KSM page with room in the index of the page's node, or join the content's
    /// chain there, or insert the node there. Returns true if a merge was queued (it took the page's
    /// reference). Preconditions: thread mutex held; the caller holds a reference to <paramref name="pfn"/>.
    /// </summary>
    private bool RehomeKsmPage(int handle, long pfn, KsmStableNode node)
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        LockAssert.Referenced(_machine.MemMap, pfn);
        ref KsmRmapItem item = ref _items[handle];
        bool linked = (item.Address & KsmRmapItem.StableFlag) != 0 && item.Node == node.Index;
        int nid = NidOf(pfn);
        KsmStableNode? target = StableSearch(node.Key, node.Domain, nid, out long kpfn);
        if (target is not null)
        {
            // Queue this mapping's move into the KSM page already there. A linked item stays on the moved
            // page's node until the batch replaces its PTE (under that page's lock): a failed merge must
            // leave the mapping findable by the reverse map.
            if (!linked)
                RemoveRmapItemFromTree(handle);
            target.Reserved++;
            Queue(new MergeOp
            {
                Kind = MergeKind.Stable, Item = handle, Pfn = pfn, Node = target, Kpfn = kpfn, KpfnReferenced = !target.Pending,
                From = linked ? node : null, Rehome = true, IsRetry = true,
            });
            return true;
        }
        Dictionary<ulong, KsmStableNode> tree = _stableTrees[nid];
        if (tree.TryGetValue(node.Key, out KsmStableNode? existing))
        {
            if (existing.Domain != node.Domain)
                return false; // a 64-bit key shared across domains: it waits on migrate_nodes
            // The content is there, every copy full: one copy more (chain_append).
            _migrateNodes.Remove(node);
            node.Migrating = false;
            node.Nid = nid;
            if (existing.Kind == KsmNodeKind.Regular)
                existing = MakeChain(existing);
            node.Kind = KsmNodeKind.Dup;
            node.Chain = existing;
            existing.Dups!.Add(node);
            _stableNodeDups++;
        }
        else
        {
            _migrateNodes.Remove(node);
            node.Migrating = false;
            node.Nid = nid;
            tree[node.Key] = node;
        }
        Volatile.Write(ref node.MovedAcrossNodes, false);
        if (!linked)
        {
            // A mapping fork made: link it now, as for a page in its right index.
            RemoveRmapItemFromTree(handle);
            LinkForkedMapping(handle, pfn, node);
        }
        return false;
    }

    /// <summary>
    /// The migrate_nodes pruning at the start of a full scan: nodes whose pages went away are removed
    /// (the keyhole check does it). Stale nodes in the indexes are pruned by lookups; these are found
    /// by no lookup. Preconditions: thread mutex held.
    /// </summary>
    private void PruneMigrateNodes()
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        if (_migrateNodes.Count == 0)
            return;
        foreach (KsmStableNode node in _migrateNodes.ToArray())
        {
            long page = GetKsmPage(node, KsmLockMode.NoLock);
            if (page >= 0)
                _machine.PutPage(page);
        }
    }

    /// <summary>
    /// The audit of migration state: migrate_nodes holds exactly the nodes flagged Migrating, none of
    /// them in an index; a node in the index of NUMA node nid has its page on nid unless its page moved
    /// since it was indexed (the scanner re-homes it when it meets it); every frame in use whose mapping
    /// word names a live node is that node's kpfn. Preconditions: thread mutex held; a quiet machine.
    /// </summary>
    private void AuditMigration(List<string> problems)
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        MemMap memMap = _machine.MemMap;
        foreach (KsmStableNode node in _migrateNodes)
        {
            if (!node.Migrating || node.Dead || node.Kind != KsmNodeKind.Regular)
                problems.Add($"KSM node {node.Handle} on migrate_nodes: migrating {node.Migrating}, dead {node.Dead}, kind {node.Kind}");
            if (_mergeAcrossNodes)
                problems.Add($"KSM node {node.Handle} on migrate_nodes with merge_across_nodes = 1");
            foreach (Dictionary<ulong, KsmStableNode> tree in _stableTrees)
            {
                if (tree.TryGetValue(node.Key, out KsmStableNode? indexed) && (indexed == node || indexed.Dups?.Contains(node) == true))
                    problems.Add($"KSM node {node.Handle} is on migrate_nodes and in a stable index");
            }
        }
        foreach (KsmStableNode? maybe in _nodeTable)
        {
            if (maybe is not { } node || node.Kind == KsmNodeKind.Chain)
                continue;
            if (node.Migrating != _migrateNodes.Contains(node))
                problems.Add($"KSM node {node.Handle}: migrating {node.Migrating}, but {(node.Migrating ? "not " : "")}on migrate_nodes");
            long kpfn = node.Kpfn;
            if (kpfn < 0 || kpfn >= memMap.FrameCount)
            {
                problems.Add($"KSM node {node.Handle} names no frame ({kpfn})");
                continue;
            }
            bool live = memMap.IsInitialised(kpfn) && memMap.RefCount(kpfn) > 0 && memMap[kpfn].Mapping == node.MappingWord;
            if (live && !node.Migrating && _stableTrees.Length > 1 && NidOf(kpfn) != node.Nid && !node.MovedAcrossNodes)
                problems.Add($"KSM node {node.Handle} is in the index of node {node.Nid} but its page {kpfn} is on node {NidOf(kpfn)}, and no migration moved it there");
        }
        for (long pfn = 0; pfn < memMap.FrameCount; pfn++)
        {
            if ((pfn & (memMap.FramesPerSection - 1)) == 0 && !memMap.IsInitialised(pfn))
            {
                pfn += memMap.FramesPerSection - 1; // never initialised: wholly free
                continue;
            }
            ref PageDescriptor page = ref memMap[pfn];
            if (page.RefCount == 0 || (page.Mapping & PageDescriptor.MappingTagMask) != PageDescriptor.MappingKsm || page.Mapping >> 2 == 0)
                continue;
            KsmStableNode? named = _machine.Mappings.Find<KsmStableNode>((long)(page.Mapping >> 2));
            if (named is { Dead: false } && named.Kpfn != pfn)
                problems.Add($"frame {pfn}'s mapping word names KSM node {named.Handle}, whose page is frame {named.Kpfn}");
        }
    }
}
