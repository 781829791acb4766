// Cpuset: the memory side of cpusets (Linux's kernel/cgroup/cpuset.c, cgroup v1 semantics, where
// memory_migrate is a per-cpuset file). A cpuset has a set of allowed nodes (cpuset.mems); every process
// belongs to exactly one (a new process to the root, a forked child to its parent's); every page a
// process faults is allocated inside its cpuset's mems, whatever its memory policy says (the
// allocator's cpuset check, __cpuset_zone_allowed with __GFP_HARDWALL).
//
// The tree: the root cpuset holds every node of the machine and its mems cannot be written (EACCES).
// A child's mems must stay inside its parent's (EACCES, the v1 rule of validate_change), its own
// children's must stay inside it (EBUSY), nodes must exist (EINVAL), and a cpuset with processes cannot
// be emptied (ENOSPC; attaching a process to an empty cpuset is ENOSPC too).
//
// Writing mems (update_nodemask -> update_tasks_nodemask) and attaching a process (cpuset_attach)
// both give each process its new mems_allowed and rebind its task policy and every VMA policy
// (mpol_rebind_task, mpol_rebind_mm; Migration/Mempolicy.cs says how each mode follows). With
// memory_migrate set (the cpuset written, or the one attached to), the process's pages then move from
// the old mems to the new ones (cpuset_migrate_mm -> do_migrate_pages with MPOL_MF_MOVE_ALL, shared
// with migrate_pages(pid): Migration/PageMoves.cs), after the cpuset lock is released, as Linux runs
// that work once cpuset_mutex is dropped. Pages that cannot move stay where they are, unreported.
//
// Locking: the machine's cpuset lock (Linux's cpuset_mutex, Machine.CpusetLock) protects the tree,
// every cpuset's mems, flags and member list, and each process's cpuset; it is taken before any
// mmap_lock (the rebind takes each member's mmap_lock for write inside it), and never under one.
// Mems are also published with Volatile.Write, so the Mems getter reads them without the lock.
using Vmm.Migration;
using Vmm.Mm;

namespace Vmm;

/// <summary>
/// A cpuset (cgroup v1 cpuset, memory side): the nodes its processes may allocate from, and whether
/// their pages follow when the nodes change (memory_migrate).
/// </summary>
/// <remarks>This type is thread-safe: all members may be used concurrently from multiple threads.</remarks>
public sealed class Cpuset
{
    private readonly Machine _machine;
    private readonly List<Cpuset> _children = [];   // protected by the cpuset lock
    private readonly List<VmProcess> _members = []; // protected by the cpuset lock
    private ulong _mems;                            // written under the cpuset lock, read with Volatile.Read
    private volatile bool _memoryMigrate;

    internal Cpuset(Machine machine, string name, Cpuset? parent, ulong mems)
    {
        _machine = machine;
        Name = name;
        Parent = parent;
        _mems = mems;
    }

    /// <summary>Its name (the root's is "/").</summary>
    public string Name { get; }

    /// <summary>Its parent; null for the root.</summary>
    public Cpuset? Parent { get; }

    /// <summary>The machine it belongs to.</summary>
    public Machine Machine => _machine;

    /// <summary>cpuset.mems: the nodes its processes may allocate from.</summary>
    public NodeMask Mems => new(Volatile.Read(ref _mems));

    /// <summary>
    /// cpuset.memory_migrate: when set, the members' pages follow when <see cref="SetMems"/> changes the
    /// mems, and a process <see cref="Attach"/>ed here brings its pages along, moved from the old nodes to
    /// the new ones as migrate_pages does (Linux's node pairing; pages other processes map move too;
    /// pinned or busy pages stay). Off by default, as in Linux: then only new allocations follow.
    /// </summary>
    public bool MemoryMigrate
    {
        get => _memoryMigrate;
        set => _memoryMigrate = value;
    }

    /// <summary>Its child cpusets.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public IReadOnlyList<Cpuset> Children
    {
        get
        {
            using MachineCall call = _machine.EnterCall();
            lock (_machine.CpusetLock)
                return [.. _children];
        }
    }

    /// <summary>The processes in it (cgroup.procs) that have not exited, by pid.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public IReadOnlyList<VmProcess> Processes
    {
        get
        {
            using MachineCall call = _machine.EnterCall();
            lock (_machine.CpusetLock)
                return [.. _members.OrderBy(p => p.Pid)];
        }
    }

    /// <summary>
    /// Writes cpuset.mems (update_nodemask): the members' mems_allowed and memory policies follow.
    /// EACCES: the root cpuset, or nodes outside the parent's mems; EINVAL: a node the machine does not
    /// have; EBUSY: a child's mems would not fit inside; ENOSPC: empty mems for a cpuset with processes.
    /// Writing the current mems does nothing.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno SetMems(NodeMask mems)
    {
        using MachineCall call = _machine.EnterCall();
        List<(AddressSpace Mm, ulong From)>? moves = null;
        Errno error;
        lock (_machine.CpusetLock)
            error = SetMemsLocked(mems, ref moves);
        MigrateMms(moves, mems);
        return error;
    }

    /// <summary>
    /// update_nodemask under the cpuset lock; with memory_migrate, adds each member whose mems changed to
    /// <paramref name="moves"/> (with its old mems). Preconditions: the cpuset lock held.
    /// </summary>
    private Errno SetMemsLocked(NodeMask mems, ref List<(AddressSpace Mm, ulong From)>? moves)
    {
        Diagnostics.LockAssert.Held(_machine.CpusetLock, "the cpuset lock");
        if (Parent is null)
            return Errno.EACCES; // top_cpuset's mems track the machine's nodes: read-only
        if (!mems.IsSubsetOf(new NodeMask(_machine.NodesWithMemory)))
            return Errno.EINVAL;
        if (mems.Bits == _mems)
            return Errno.None;
        foreach (Cpuset child in _children)
        {
            if (!child.Mems.IsSubsetOf(mems))
                return Errno.EBUSY;
        }
        if (!mems.IsSubsetOf(Parent.Mems))
            return Errno.EACCES;
        if (_members.Count > 0 && _mems != 0 && mems.IsEmpty)
            return Errno.ENOSPC;
        Volatile.Write(ref _mems, mems.Bits);
        // update_tasks_nodemask: each member's mems_allowed and policies; with memory_migrate its pages
        // follow (cpuset_migrate_mm), once the lock is released.
        bool migrate = _memoryMigrate;
        foreach (VmProcess member in _members)
        {
            ulong old = member.Mm.SetMemsAllowedLocked(mems.Bits);
            if (migrate && old != mems.Bits)
                (moves ??= []).Add((member.Mm, old));
        }
        return Errno.None;
    }

    /// <summary>
    /// cpuset_migrate_mm's work (cpuset_migrate_mm_workfn): moves each mm's pages from its old mems to
    /// <paramref name="to"/> with do_migrate_pages and MPOL_MF_MOVE_ALL (pages other processes map move
    /// too; pages that cannot move stay, as in Linux, where the work's result is not reported). Runs with
    /// the cpuset lock released, as Linux queues the work and flushes it after cpuset_mutex is dropped:
    /// the moves take mmap_locks and page locks, and may take long. Preconditions: a machine call is open.
    /// </summary>
    private static void MigrateMms(List<(AddressSpace Mm, ulong From)>? moves, NodeMask to)
    {
        if (moves is null)
            return;
        foreach ((AddressSpace mm, ulong from) in moves)
            PageMoves.DoMigratePages(mm, new NodeMask(from), to, moveAll: true, out _);
    }

    /// <summary>
    /// Moves <paramref name="process"/> into this cpuset (writing its pid to cgroup.procs; cpuset_attach):
    /// its allocations are limited to <see cref="Mems"/> from now on and its policies are rebound.
    /// ENOSPC: this cpuset has no mems; ESRCH: the process has exited. Attaching it where it already is
    /// does nothing.
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="process"/> is null.</exception>
    /// <exception cref="ArgumentException">the process belongs to another machine.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Attach(VmProcess process)
    {
        ArgumentNullException.ThrowIfNull(process);
        if (process.Machine != _machine)
            throw new ArgumentException($"{process} belongs to another machine than cpuset {Name}", nameof(process));
        using MachineCall call = _machine.EnterCall();
        ulong oldMems, newMems;
        lock (_machine.CpusetLock)
        {
            if (process.HasExited)
                return Errno.ESRCH;
            newMems = Volatile.Read(ref _mems);
            if (newMems == 0)
                return Errno.ENOSPC; // cpuset_can_attach (v1): no memory to run on
            Cpuset from = process.CpusetLocked;
            if (from == this)
                return Errno.None;
            from._members.Remove(process);
            _members.Add(process);
            process.CpusetLocked = this;
            oldMems = process.Mm.SetMemsAllowedLocked(newMems);
        }
        // cpuset_attach with this cpuset's memory_migrate: the pages follow from the old mems to these
        // (cpuset_migrate_mm), with the cpuset lock released (see MigrateMms).
        if (_memoryMigrate && oldMems != newMems)
            MigrateMms([(process.Mm, oldMems)], new NodeMask(newMems));
        return Errno.None;
    }

    /// <summary>A new child cpuset. Preconditions: the cpuset lock held; arguments checked.</summary>
    internal Cpuset AddChildLocked(string name, ulong mems)
    {
        Diagnostics.LockAssert.Held(_machine.CpusetLock, "the cpuset lock");
        var child = new Cpuset(_machine, name, this, mems);
        _children.Add(child);
        return child;
    }

    /// <summary>Whether a child of that name exists. Preconditions: the cpuset lock held.</summary>
    internal bool HasChildLocked(string name)
    {
        Diagnostics.LockAssert.Held(_machine.CpusetLock, "the cpuset lock");
        return _children.Exists(c => c.Name == name);
    }

    /// <summary>
    /// A new or forked process joins this cpuset (cgroup_post_fork / cpuset_fork): its mems_allowed and
    /// policies are set to this cpuset's mems (a fork copied the parent's, which may have changed since).
    /// Preconditions: the cpuset lock held; the process is in no cpuset yet.
    /// </summary>
    internal void JoinLocked(VmProcess process)
    {
        Diagnostics.LockAssert.Held(_machine.CpusetLock, "the cpuset lock");
        _members.Add(process);
        process.CpusetLocked = this;
        if (process.Mm.MemsAllowed != _mems)
            process.Mm.SetMemsAllowedLocked(_mems);
    }

    /// <summary>An exited process leaves its cpuset. Preconditions: the cpuset lock held.</summary>
    internal void LeaveLocked(VmProcess process)
    {
        Diagnostics.LockAssert.Held(_machine.CpusetLock, "the cpuset lock");
        _members.Remove(process);
    }

    /// <summary>The members, for Audit. Preconditions: the cpuset lock held.</summary>
    internal IReadOnlyList<VmProcess> MembersLocked => _members;

    /// <summary>The children, for Audit. Preconditions: the cpuset lock held.</summary>
    internal IReadOnlyList<Cpuset> ChildrenLocked => _children;

    /// <inheritdoc/>
    public override string ToString() => $"cpuset {Name} (mems {Mems})";
}

// The machine's cpusets (the rest of Machine is in Machine.cs).
public sealed partial class Machine
{
    /// <summary>cpuset_mutex: the cpuset tree, each cpuset's mems and members, each process's cpuset. Taken before any mmap_lock.</summary>
    internal Lock CpusetLock { get; } = new();

    /// <summary>node_states[N_MEMORY]: every node of the machine (immutable: no node hot-plug yet).</summary>
    internal ulong NodesWithMemory { get; }

    /// <summary>The root cpuset (top_cpuset): every node; new processes start in it.</summary>
    public Cpuset RootCpuset { get; }

    /// <summary>
    /// Creates a cpuset (mkdir in the cpuset hierarchy, then writing its cpuset.mems) under
    /// <paramref name="parent"/> (null: the root). Empty mems are allowed (as a new v1 cpuset), but no
    /// process can be attached until it has some.
    /// </summary>
    /// <param name="name">its name: not empty, no '/', unique among its siblings.</param>
    /// <param name="mems">its nodes: a subset of the parent's.</param>
    /// <param name="parent">the parent cpuset, or null for the root.</param>
    /// <exception cref="ArgumentException">the name is empty, has a '/' or is taken (EEXIST); the mems are not
    /// nodes of the machine (EINVAL) or not inside the parent's (EACCES); the parent is another machine's.</exception>
    /// <exception cref="ArgumentNullException"><paramref name="name"/> is null.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Cpuset CreateCpuset(string name, NodeMask mems, Cpuset? parent = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        if (name.Contains('/', StringComparison.Ordinal))
            throw new ArgumentException($"a cpuset name has no '/': \"{name}\"", nameof(name));
        parent ??= RootCpuset;
        if (parent.Machine != this)
            throw new ArgumentException($"{parent} belongs to another machine", nameof(parent));
        using MachineCall call = EnterCall();
        if (!mems.IsSubsetOf(new NodeMask(NodesWithMemory)))
            throw new ArgumentException($"mems {mems} name nodes the machine does not have (it has {new NodeMask(NodesWithMemory)})", nameof(mems));
        lock (CpusetLock)
        {
            if (!mems.IsSubsetOf(parent.Mems))
                throw new ArgumentException($"mems {mems} are not inside the parent's ({parent.Mems})", nameof(mems));
            if (parent.HasChildLocked(name))
                throw new ArgumentException($"{parent} already has a child named \"{name}\"", nameof(name));
            return parent.AddChildLocked(name, mems.Bits);
        }
    }
}
