// AddressSpace.Mempolicy: the memory-policy calls of a process (Linux's set_mempolicy, get_mempolicy,
// mbind in mm/mempolicy.c) and the policy-aware allocation of user pages (vma_alloc_folio,
// get_vma_policy). The policy objects and the placement rules are in Migration/Mempolicy.cs.
//
// mbind, in do_mbind's order: the mode and flags (sanitize_mpol_flags), the MPOL_MF_* flags (EINVAL;
// MOVE_ALL without CAP_SYS_NICE: EPERM), a misaligned start (EINVAL), the length (a wrapping end:
// EINVAL; an empty range: done), the policy itself (mpol_new, mpol_set_nodemask: EINVAL); then, under
// the mmap_lock for write, the range walk (queue_pages_range): a hole at the head, middle or tail of
// the range is EFAULT unless the new policy is DEFAULT (MPOL_MF_DISCONTIG_OK), a range with no VMA at
// all is always EFAULT; with MPOL_MF_STRICT alone, a page already on a node outside the given nodes
// (or a page being migrated) stops the walk with EIO and, as Linux 6.7+, the policy is then NOT
// applied. Otherwise every VMA of the range is split to the range and given the policy, then merged
// with its neighbours where everything, the policy included (mpol_equal), is equal (mbind_range).
//
// MPOL_MF_MOVE / MPOL_MF_MOVE_ALL: with the LRU add cache disabled (lru_cache_disable), the walk isolates
// every present page of the range on a node outside the given nodes (MOVE: only a page this process
// alone maps; a shared one is skipped, not failed); after the policy is applied and the mmap_lock
// dropped, the migration engine moves them (MIGRATE_SYNC, MR_MEMPOLICY_MBIND), each to the node the new
// policy gives for its offset (alloc_migration_target_by_mpol). Pages that could not be isolated or moved
// make the call EIO with STRICT, and are otherwise ignored, as Linux's nr_failed.
//
// Locking: the mmap_lock for write (set_mempolicy, mbind, and a cpuset's rebind, which also holds the
// cpuset lock, taken before it), for read (get_mempolicy, faults); mbind's walk takes each pte lock
// and, inside it, the LRU lock (Lru.Isolate); the migration runs with no mmap_lock held. Policies are immutable: readers
// load the reference once.
using System.Numerics;
using System.Runtime.CompilerServices;
using Vmm.Diagnostics;
using Vmm.Memory;
using Vmm.Migration;

namespace Vmm.Mm;

internal sealed unsafe partial class AddressSpace
{
    /// <summary>
    /// task->mempolicy: the process's policy; null is MPOL_DEFAULT. Written under the mmap_lock for
    /// write, read under it (faults read it for read).
    /// </summary>
    public Mempolicy? TaskPolicy;

    /// <summary>
    /// task->mems_allowed: the nodes the process's cpuset allows. Written under the cpuset lock and the
    /// mmap_lock for write together; read under either.
    /// </summary>
    public ulong MemsAllowed;

    /// <summary>task->il_prev: the node the task-level interleave last used (MAX_NUMNODES - 1 after a set). Written like <see cref="TaskPolicy"/>.</summary>
    public int InterleavePrevious = 63;

    // ================================================================================================
    // Allocation
    // ================================================================================================

    /// <summary>
    /// vma_alloc_folio: a new user page for <paramref name="va"/> of <paramref name="vma"/>, where the
    /// VMA's policy (else the task's, else the default) and the cpuset say. The default policy in an
    /// unrestricted cpuset costs one load and a compare more than a plain allocation.
    /// Preconditions: mmap_lock held.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private long AllocUserPage(Vma vma, ulong va, AllocFlags flags)
    {
        flags = CurrentAllocContext(flags);
        Mempolicy? policy = vma.Policy ?? TaskPolicy;
        if (policy is null && MemsAllowed == _machine.NodesWithMemory)
            return _machine.Allocator.AllocPages(0, flags, HomeNode);
        return Mempolicy.AllocPage(_machine, flags, policy, vma.PageIndex(va), HomeNode, MemsAllowed);
    }

    /// <summary>
    /// A new page of a shared-memory object at <paramref name="ilx"/> (the object's handle + the page's
    /// index: shmem_get_pgoff_policy), by <paramref name="policy"/> (the faulting VMA's, or the task's).
    /// Called by ShmemObject.GetPage under the object's lock. Preconditions: mmap_lock held.
    /// </summary>
    public long AllocSharedPage(Mempolicy? policy, ulong ilx)
    {
        AllocFlags flags = CurrentAllocContext(AllocFlags.Movable);
        if (policy is null && MemsAllowed == _machine.NodesWithMemory)
            return _machine.Allocator.AllocPages(0, flags, HomeNode);
        return Mempolicy.AllocPage(_machine, flags, policy, ilx, HomeNode, MemsAllowed);
    }

    /// <summary>get_vma_policy without the task fallback (__get_vma_policy). Preconditions: mmap_lock held.</summary>
    public Mempolicy? EffectivePolicy(Vma vma) => vma.Policy ?? TaskPolicy;

    // ================================================================================================
    // set_mempolicy / get_mempolicy
    // ================================================================================================

    /// <summary>do_set_mempolicy: see <see cref="VmProcess.SetMempolicy"/>.</summary>
    public Errno SetMempolicy(MempolicyMode mode, NodeMask nodes, MempolicyFlags flags)
    {
        MmapLock.EnterWriteLock();
        try
        {
            Errno error = Mempolicy.TryCreate(mode, flags, nodes, MemsAllowed, out Mempolicy? policy);
            if (error != Errno.None)
                return error;
            TaskPolicy = policy;
            if (policy?.Mode is MempolicyMode.Interleave or MempolicyMode.WeightedInterleave)
                InterleavePrevious = 63; // MAX_NUMNODES - 1: the next task-level interleave starts at the first node
            return Errno.None;
        }
        finally
        {
            MmapLock.ExitWriteLock();
        }
    }

    /// <summary>do_get_mempolicy: see <see cref="VmProcess.GetMempolicy"/>.</summary>
    public Errno GetMempolicy(out int mode, out NodeMask nodes, ulong address, GetMempolicyFlags flags)
    {
        mode = 0;
        nodes = NodeMask.Empty;
        if ((flags & ~(GetMempolicyFlags.Node | GetMempolicyFlags.Address | GetMempolicyFlags.MemsAllowed)) != 0)
            return Errno.EINVAL;
        Mempolicy? policy;
        MmapLock.EnterReadLock();
        try
        {
            if ((flags & GetMempolicyFlags.MemsAllowed) != 0)
            {
                if ((flags & (GetMempolicyFlags.Node | GetMempolicyFlags.Address)) != 0)
                    return Errno.EINVAL;
                nodes = new NodeMask(MemsAllowed);
                return Errno.None;
            }
            if ((flags & GetMempolicyFlags.Address) != 0)
            {
                Vma? vma = Exited ? null : VmaAt(address);
                if (vma is null)
                    return Errno.EFAULT;
                policy = vma.Policy; // the VMA's own: a VMA without one reports MPOL_DEFAULT
            }
            else if (address != 0)
            {
                return Errno.EINVAL;
            }
            else
            {
                policy = TaskPolicy;
            }
            if ((flags & GetMempolicyFlags.Node) != 0 && (flags & GetMempolicyFlags.Address) == 0)
            {
                // The task's next interleave node; any other policy has no "next node".
                if (policy?.Mode is not (MempolicyMode.Interleave or MempolicyMode.WeightedInterleave))
                    return Errno.EINVAL;
                mode = NextNodeIn(InterleavePrevious, policy.Nodes);
            }
        }
        finally
        {
            MmapLock.ExitReadLock();
        }
        if ((flags & (GetMempolicyFlags.Node | GetMempolicyFlags.Address)) == (GetMempolicyFlags.Node | GetMempolicyFlags.Address))
        {
            Errno error = LookupNode(address, out int node);
            if (error != Errno.None)
                return error;
            mode = node;
        }
        else if ((flags & GetMempolicyFlags.Node) == 0)
        {
            mode = policy?.ReportedMode ?? (int)MempolicyMode.Default;
        }
        nodes = new NodeMask(policy?.ReportedNodes ?? 0);
        return Errno.None;
    }

    /// <summary>next_node_in: the first node of <paramref name="nodes"/> after <paramref name="previous"/>, wrapping.</summary>
    private static int NextNodeIn(int previous, ulong nodes)
    {
        ulong above = previous >= 63 ? 0 : nodes & ~((2UL << previous) - 1);
        ulong pick = above != 0 ? above : nodes;
        return pick == 0 ? 64 : BitOperations.TrailingZeroCount(pick);
    }

    /// <summary>
    /// lookup_node: the node of the page at <paramref name="address"/>, read-faulting it in first as
    /// get_user_pages does (a never-written private page is the zero page, on its node). EFAULT: no
    /// mapping or one that cannot be read; ENOMEM: no frame for the fault.
    /// </summary>
    private Errno LookupNode(ulong address, out int node)
    {
        node = -1;
        ulong va = address & ~PageMask;
        while (true)
        {
            MmapLock.EnterReadLock();
            try
            {
                Vma? vma = Exited || va >= TaskSize ? null : VmaAt(va);
                if (vma is null || !vma.CanRead)
                    return Errno.EFAULT;
                ulong* slot = FindPte(va, out _);
                var pte = slot == null ? Pte.None : new Pte(Volatile.Read(ref *slot));
                if (pte.IsPresent && (pte.Value & Pte.UserBit) != 0)
                {
                    node = _machine.Topology.NodeOf(pte.Pfn);
                    return Errno.None;
                }
            }
            finally
            {
                MmapLock.ExitReadLock();
            }
            switch (TryHandleFault(va, write: false))
            {
                case FaultResult.Done:
                    continue;
                case FaultResult.OutOfMemory:
                    return Errno.ENOMEM;
                default:
                    return Errno.EFAULT;
            }
        }
    }

    // ================================================================================================
    // mbind
    // ================================================================================================

    /// <summary>do_mbind: see <see cref="VmProcess.Mbind"/>. <paramref name="credentials"/> are the caller's.</summary>
    public Errno Mbind(ulong start, ulong length, MempolicyMode mode, NodeMask nodes, MempolicyFlags modeFlags,
        MovePolicyFlags flags, Credentials credentials)
    {
        Errno error = Mempolicy.CheckModeAndFlags(mode, modeFlags);
        if (error != Errno.None)
            return error;
        if ((flags & ~(MovePolicyFlags.Strict | MovePolicyFlags.Move | MovePolicyFlags.MoveAll)) != 0)
            return Errno.EINVAL;
        if ((flags & MovePolicyFlags.MoveAll) != 0 && (credentials.Capabilities & Capabilities.SysNice) == 0)
            return Errno.EPERM;
        if ((start & PageMask) != 0)
            return Errno.EINVAL;
        if (mode == MempolicyMode.Default)
            flags &= ~MovePolicyFlags.Strict;
        ulong end = start + ((length + PageMask) & ~PageMask); // PAGE_ALIGN may wrap to 0, as Linux's
        if (end < start)
            return Errno.EINVAL;
        if (end == start)
            return Errno.None;

        bool move = (flags & (MovePolicyFlags.Move | MovePolicyFlags.MoveAll)) != 0;
        MigrationEngine engine = _machine.Migration;
        List<long>? pages = null;
        Mempolicy? target = null;
        int failed = 0;
        if (move)
        {
            // lru_cache_disable: every page already faulted leaves its add batch for its list (so it can
            // be isolated), and new ones go straight to their list until the call ends.
            _machine.Lru.DisableCache();
            pages = engine.RentList();
        }
        try
        {
            MmapLock.EnterWriteLock();
            try
            {
                error = Mempolicy.TryCreate(mode, modeFlags, nodes, MemsAllowed, out Mempolicy? policy);
                if (error != Errno.None)
                    return error;
                error = QueuePagesRange(start, end, nodes.Bits, flags, discontiguousOk: policy is null, pages, ref failed);
                if (error != Errno.None)
                    return error;
                MbindRange(start, end, policy);
                target = policy ?? TaskPolicy; // DEFAULT's pages go where the task policy (or local) says
            }
            finally
            {
                MmapLock.ExitWriteLock();
            }
            if (pages is { Count: > 0 })
            {
                // alloc_migration_target_by_mpol: each page's new frame where the policy puts its offset,
                // inside the cpuset. The mmap_lock is not needed while the engine works (Linux 6.7+).
                MemMap memMap = _machine.MemMap;
                ulong mems = MemsAllowed;
                int rc = engine.MigratePages(pages,
                    src => Mempolicy.AllocPage(_machine, AllocFlags.Movable | AllocFlags.NoZero, target, InterleaveIndexOf(memMap, src), HomeNode, mems),
                    null, MigrateMode.Sync, MigrateReason.MempolicyMbind, out _);
                if (rc != 0)
                    failed++; // Linux: nr_failed |= migrate_pages(...); only STRICT reports it
            }
            return failed != 0 && (flags & MovePolicyFlags.Strict) != 0 ? Errno.EIO : Errno.None;
        }
        finally
        {
            if (pages is not null)
            {
                engine.PutbackMovablePages(pages);
                engine.ReturnList(pages);
            }
            if (move)
                _machine.Lru.EnableCache();
        }
    }

    /// <summary>
    /// The interleave index of a page being moved: an anonymous page's index (vm_pgoff + its page in the
    /// VMA, as the fault computed it), a shared page's object handle + index (shmem_get_pgoff_policy).
    /// </summary>
    private static ulong InterleaveIndexOf(MemMap memMap, long pfn)
    {
        ref PageDescriptor page = ref memMap[pfn];
        ulong mapping = page.Mapping;
        return (mapping & PageDescriptor.MappingTagMask) == 0 ? (mapping >> 2) + page.Index : page.Index;
    }

    /// <summary>
    /// queue_pages_range with MPOL_MF_INVERT: EFAULT for a hole (unless <paramref name="discontiguousOk"/>)
    /// or a range with no VMA. With STRICT alone, EIO at the first present page whose node is not in
    /// <paramref name="nodes"/> (the user's mask, as Linux), or the first migration entry. With MOVE /
    /// MOVE_ALL, each such page is isolated onto <paramref name="pages"/> (MOVE: only a page this process
    /// alone maps; a shared one is skipped, which is no failure), and one that cannot be isolated counts in
    /// <paramref name="failed"/>. Preconditions: mmap_lock held for write.
    /// </summary>
    private Errno QueuePagesRange(ulong start, ulong end, ulong nodes, MovePolicyFlags flags, bool discontiguousOk,
        List<long>? pages, ref int failed)
    {
        LockAssert.MmapLockHeld(this, write: true);
        bool strictOnly = (flags & (MovePolicyFlags.Strict | MovePolicyFlags.Move | MovePolicyFlags.MoveAll)) == MovePolicyFlags.Strict;
        Vma? vma = FindVma(start);
        if (vma is null || vma.Start >= end)
            return Errno.EFAULT; // the whole range is a hole
        if (!discontiguousOk && start < vma.Start)
            return Errno.EFAULT; // a hole at the head
        while (vma is not null && vma.Start < end)
        {
            Vma? next = FindVma(vma.End);
            if (!discontiguousOk && vma.End < end && (next is null || vma.End < next.Start))
                return Errno.EFAULT; // a hole in the middle or at the tail
            if (strictOnly && HasMisplacedPage(vma, Math.Max(start, vma.Start), Math.Min(end, vma.End), nodes))
                return Errno.EIO;
            if (pages is not null)
                failed += QueueMisplacedPages(vma, Math.Max(start, vma.Start), Math.Min(end, vma.End), nodes, flags, pages);
            vma = next;
        }
        return Errno.None;
    }

    /// <summary>
    /// queue_folios_pte_range for STRICT alone: whether a present page of [from, to) (not the zero page)
    /// lies on a node outside <paramref name="nodes"/>, or a page there is being migrated. Preconditions:
    /// mmap_lock held for write.
    /// </summary>
    private bool HasMisplacedPage(Vma vma, ulong from, ulong to, ulong nodes)
    {
        LockAssert.MmapLockHeld(this, write: true);
        for (ulong va = from; va < to;)
        {
            ulong* slot = FindPte(va, out _);
            if (slot == null)
            {
                // No PTE table here: on to the next one (NextPteTable, not SkipToPageTable, which takes
                // the mmap_lock we already hold for write).
                if (NextPteTable(ref va, to, out _) == null)
                    break;
                continue;
            }
            var pte = new Pte(Volatile.Read(ref *slot));
            if (pte.IsMigrationEntry)
                return true;
            if (pte.IsPresent && !pte.IsSpecial && (nodes & (1UL << _machine.Topology.NodeOf(pte.Pfn))) == 0)
                return true;
            va += PageSize;
        }
        return false;
    }

    /// <summary>
    /// queue_folios_pte_range with MOVE / MOVE_ALL (migrate_folio_add): isolates every present page of
    /// [from, to) (not the zero page) whose node is not in <paramref name="nodes"/> onto
    /// <paramref name="pages"/>, under its pte lock. Returns the pages that should move but cannot be
    /// isolated (and migration entries: a page already moving). Preconditions: mmap_lock held for write.
    /// </summary>
    private int QueueMisplacedPages(Vma vma, ulong from, ulong to, ulong nodes, MovePolicyFlags flags, List<long> pages)
    {
        LockAssert.MmapLockHeld(this, write: true);
        MemMap memMap = _machine.MemMap;
        bool moveAll = (flags & MovePolicyFlags.MoveAll) != 0;
        int failed = 0;
        for (ulong va = from; va < to;)
        {
            ulong* slot = FindPte(va, out long ptePfn);
            if (slot == null)
            {
                // No PTE table here: on to the next one (NextPteTable, not SkipToPageTable, which takes
                // the mmap_lock we already hold for write).
                if (NextPteTable(ref va, to, out _) == null)
                    break;
                continue;
            }
            LockPte(ptePfn);
            try
            {
                var pte = new Pte(Volatile.Read(ref *slot));
                if (pte.IsMigrationEntry)
                {
                    failed++;
                }
                else if (pte.IsPresent && !pte.IsSpecial && (nodes & (1UL << _machine.Topology.NodeOf(pte.Pfn))) == 0)
                {
                    long pfn = pte.Pfn;
                    // Unless MOVE_ALL, a page other processes map too stays (folio_maybe_mapped_shared),
                    // and that is not a failure.
                    if (moveAll || memMap.MapCount(pfn) <= 1)
                    {
                        // The PTE's mapping keeps the page alive under the pte lock; Isolate wants a
                        // reference of the caller's own, and takes the isolation's.
                        memMap.GetPage(pfn);
                        if (_machine.Lru.Isolate(pfn))
                            pages.Add(pfn);
                        else
                            failed++; // in another mover's hands, or not on an LRU list
                        _machine.PutPage(pfn);
                    }
                }
            }
            finally
            {
                UnlockPte(ptePfn);
            }
            va += PageSize;
        }
        return failed;
    }

    /// <summary>
    /// mbind_range / vma_modify_policy / vma_replace_policy: every VMA part inside [start, end) gets
    /// <paramref name="policy"/> (null: default), split at the range's edges and merged with equal
    /// neighbours. Preconditions: mmap_lock held for write.
    /// </summary>
    private void MbindRange(ulong start, ulong end, Mempolicy? policy)
    {
        LockAssert.MmapLockHeld(this, write: true);
        ulong cursor = start;
        while (cursor < end)
        {
            Vma? vma = FindVma(cursor);
            if (vma is null || vma.Start >= end)
                break;
            ulong from = Math.Max(cursor, vma.Start), to = Math.Min(end, vma.End);
            if (!Mempolicy.Equal(vma.Policy, policy))
            {
                Vma target = SplitToRange(vma, from, to);
                target.Policy = policy;
                TryMergeAround(target);
            }
            cursor = to;
        }
    }

    /// <summary>
    /// mpol_rebind_task + mpol_rebind_mm: the cpuset now allows <paramref name="mems"/>; the task policy
    /// and every VMA policy follow (Mempolicy.Rebind). Returns the mems allowed before. Preconditions:
    /// the machine's cpuset lock held (this takes the mmap_lock for write inside it).
    /// </summary>
    public ulong SetMemsAllowedLocked(ulong mems)
    {
        LockAssert.Held(_machine.CpusetLock, "the cpuset lock");
        MmapLock.EnterWriteLock();
        try
        {
            ulong old = MemsAllowed;
            MemsAllowed = mems;
            if (Exited)
                return old;
            TaskPolicy = TaskPolicy?.Rebind(mems);
            foreach (Vma vma in _vmas)
                vma.Policy = vma.Policy?.Rebind(mems);
            return old;
        }
        finally
        {
            MmapLock.ExitWriteLock();
        }
    }
}
