// The reverse map of KSM pages (Linux's rmap_walk_ksm) and the audit of KSM's bookkeeping.
// Locking: the walk runs with the KSM page's lock held (it protects the stable node's item list) and
// takes each item's anon_vma lock; the audit runs under the thread mutex.
//
// A KSM page has no anon_vma of its own: its mappings are its stable node's items, each with the
// address and the anon_vma of the VMA it was merged in. Fork copies KSM mappings into children before
// ksmd links them, so a walk makes two passes over the items: first the VMAs of each item's own mm,
// then the VMAs of other mms that share the item's anon_vma family (the children).
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Mm;
using Vmm.Rmap;

namespace Vmm;

public sealed partial class Ksm
{
    /// <summary>
    /// rmap_walk_ksm: visits every VMA that may map the KSM page <paramref name="pfn"/>, whose mapping
    /// word names stable node <paramref name="handle"/>. Preconditions: the page lock held (it protects
    /// the node's item list), or the thread mutex (under which the list is changed too: the Auditor).
    /// </summary>
    internal void RmapWalk(long pfn, long handle, RmapWalkControl control)
    {
        LockAssert.That(_machine.PageLock.IsLocked(pfn) || Monitor.IsEntered(_threadMutex),
            $"the page lock of KSM page {pfn} held (or the ksm_thread_mutex)");
        KsmStableNode? node = _machine.Mappings.Find<KsmStableNode>(handle);
        // A frame the node no longer names maps nothing: a migrated page's old frame (Ksm.MigratePage
        // switched the node to the new frame before the migrator restored the PTEs, which name the new one).
        if (node is null || Volatile.Read(ref node.Kpfn) != pfn)
            return;
        for (int pass = 0; pass < 2; pass++)
        {
            for (int h = node.Hlist; h >= 0; h = _items[h].HashNext)
            {
                AnonVma? anonVma = _items[h].AnonVma;
                if (anonVma is null)
                    continue;
                AddressSpace own = SlotOf(_items[h].Slot).Mm;
                ulong address = _items[h].PageAddress;
                if (!RmapWalker.LockAnonVma(anonVma, control))
                    return;
                try
                {
                    foreach (AnonVmaChain chain in anonVma.Chains.ToArray())
                    {
                        Vma vma = chain.Vma;
                        if (address < vma.Start || address >= vma.End || (vma.Mm == own) != (pass == 0))
                            continue;
                        if (control.InvalidVma?.Invoke(vma) == true)
                            continue;
                        if (!control.RmapOne(pfn, vma, address) || control.Done?.Invoke(pfn) == true)
                            return;
                    }
                }
                finally
                {
                    anonVma.Lock.Exit();
                }
            }
        }
    }

#if DEBUG
    /// <summary>Debug only: whether this thread holds ksm_thread_mutex (a monitor: Monitor.IsEntered).</summary>
    internal bool IsThreadMutexHeldByCurrentThread => Monitor.IsEntered(_threadMutex);

#endif
    /// <summary>Runs <paramref name="action"/> with the thread mutex held (no batch runs meanwhile).</summary>
    internal void WithThreadMutex(Action action)
    {
        lock (_threadMutex)
            action();
    }

    /// <summary>
    /// Recounts KSM's bookkeeping from its structures and the page tables. Preconditions: the thread
    /// mutex held; no other thread changes memory. <paramref name="zeroPtes"/>: KSM zero PTEs found per mm.
    /// </summary>
    internal void Audit(List<string> problems, Dictionary<AddressSpace, long> zeroPtes)
    {
        LockAssert.Held(_threadMutex, "the ksm_thread_mutex");
        // "No other thread changes memory" is the caller's promise (Audit runs on a quiet machine): not checkable.
        long shared = 0, sharing = 0, chains = 0, dups = 0, unshared = 0, items = 0;
        var merging = new Dictionary<AddressSpace, long>();
        foreach (KsmStableNode? maybe in _nodeTable)
        {
            if (maybe is not { } node)
                continue;
            if (node.Dead || node.Pending || node.Reserved != 0)
                problems.Add($"KSM node {node.Handle}: dead {node.Dead}, pending {node.Pending}, reserved {node.Reserved} outside a batch");
            if (_machine.Mappings.Find<KsmStableNode>(node.Handle) != node)
                problems.Add($"KSM node {node.Handle} is not registered");
            if (node.Kind == KsmNodeKind.Chain)
            {
                chains++;
                if (node.Dups is not { Count: > 0 })
                    problems.Add($"KSM chain {node.Handle} has no dups");
                continue;
            }
            if (node.Kind == KsmNodeKind.Dup)
            {
                dups++;
                if (node.Chain is null || !node.Chain.Dups!.Contains(node))
                    problems.Add($"KSM dup {node.Handle} is not in its chain");
            }
            else if (!node.Migrating && (!_stableTrees[node.Nid].TryGetValue(node.Key, out KsmStableNode? indexed) || indexed != node))
            {
                problems.Add($"KSM node {node.Handle} (page {node.Kpfn}) is not in the stable index");
            }
            if (!_machine.Allocator.IsPfnOnline(Volatile.Read(ref node.Kpfn)))
                problems.Add($"KSM node {node.Handle} names frame {node.Kpfn}, which is in an offline memory block");
            int count = 0;
            for (int h = node.Hlist; h >= 0; h = _items[h].HashNext)
            {
                ref KsmRmapItem item = ref _items[h];
                count++;
                if ((item.Address & KsmRmapItem.StableFlag) == 0 || item.Node != node.Index)
                    problems.Add($"KSM item {h} on node {node.Handle} is not flagged stable for it");
                AddressSpace mm = SlotOf(item.Slot).Mm;
                merging[mm] = merging.GetValueOrDefault(mm) + 1;
            }
            if (count != node.HlistLen)
                problems.Add($"KSM node {node.Handle}: rmap_hlist_len {node.HlistLen}, items {count}");
            if (count > 0)
            {
                shared++;
                sharing += count - 1;
            }
        }
        lock (_mmListLock)
        {
            for (KsmMmSlot slot = _head.Next; slot != _head; slot = slot.Next)
            {
                long mmItems = 0, mmMerging = 0;
                ulong last = 0;
                for (int h = slot.RmapList; h >= 0; h = _items[h].Next)
                {
                    ref KsmRmapItem item = ref _items[h];
                    mmItems++;
                    if (item.Slot != slot.Index)
                        problems.Add($"KSM item {h} is on the list of slot {slot.Index} but names slot {item.Slot}");
                    if (mmItems > 1 && item.PageAddress <= last)
                        problems.Add($"KSM items of {slot.Mm.Id} are out of address order at 0x{item.PageAddress:x}");
                    last = item.PageAddress;
                    if ((item.Address & KsmRmapItem.StableFlag) != 0)
                        mmMerging++;
                    if ((item.Address & KsmRmapItem.UnstableFlag) != 0)
                        unshared++;
                }
                items += mmItems;
                if (mmItems != slot.Mm.KsmRmapItems)
                    problems.Add($"mm {slot.Mm.Id}: ksm_rmap_items {slot.Mm.KsmRmapItems}, items found {mmItems}");
                if (mmMerging != slot.Mm.KsmMergingPages || mmMerging != merging.GetValueOrDefault(slot.Mm))
                    problems.Add($"mm {slot.Mm.Id}: ksm_merging_pages {slot.Mm.KsmMergingPages}, stable items {mmMerging}, on nodes {merging.GetValueOrDefault(slot.Mm)}");
            }
        }
        AuditMigration(problems);
        Check(problems, "pages_shared", _pagesShared, shared);
        Check(problems, "pages_sharing", _pagesSharing, sharing);
        Check(problems, "pages_unshared", _pagesUnshared, unshared);
        Check(problems, "rmap items", _rmapItemCount, items);
        Check(problems, "stable_node_chains", _stableNodeChains, chains);
        Check(problems, "stable_node_dups", _stableNodeDups, dups);
        long zero = 0;
        foreach ((AddressSpace mm, long found) in zeroPtes)
        {
            zero += found;
            if (found != Volatile.Read(ref mm.KsmZeroPages))
                problems.Add($"mm {mm.Id}: ksm_zero_pages {mm.KsmZeroPages}, KSM zero PTEs {found}");
        }
        Check(problems, "ksm_zero_pages", Volatile.Read(ref _zeroPages), zero);
    }

    private static void Check(List<string> problems, string name, long counter, long found)
    {
        if (counter != found)
            problems.Add($"KSM {name} {counter}, recounted {found}");
    }

    /// <summary>The live stable node a KSM page's mapping word names, or null (for the audit).</summary>
    internal KsmStableNode? NodeOfPage(long pfn)
    {
        ulong mapping = _machine.MemMap[pfn].Mapping;
        if ((mapping & PageDescriptor.MappingTagMask) != PageDescriptor.MappingKsm)
            return null;
        KsmStableNode? node = _machine.Mappings.Find<KsmStableNode>((long)(mapping >> 2));
        return node is { Dead: false } && node.Kpfn == pfn ? node : null;
    }
}
