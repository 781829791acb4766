// Mempolicy: NUMA memory policies (Linux's mm/mempolicy.c, include/uapi/linux/mempolicy.h).
//
// A policy says on which nodes a process's new pages go. There are two levels: the task policy
// (set_mempolicy, one per process) and VMA policies (mbind, one per VMA, split and merged with it and
// copied by fork). A fault asks the VMA's policy first, then the task's, then the system default
// (get_vma_policy); null stands for "default" at both levels, as Linux's NULL mempolicy pointer.
//
// Modes (alloc_pages_mpol, policy_nodemask):
// - DEFAULT / LOCAL: the local node (the process's HomeNode, the node it "runs on"), falling back by
//   distance.
// - PREFERRED: the policy's one node first, then the others by distance from it.
// - PREFERRED_MANY: first only the policy's nodes (nearest to the local node first), then anywhere.
// - BIND: only the policy's nodes, nearest to the local node first; never elsewhere: a fault that finds
//   them full fails as out of memory.
// - INTERLEAVE: node number (ilx mod n) of the policy's n nodes, where the interleave index ilx is the
//   page's offset in its mapping (vm_pgoff + page in the VMA; for shared memory, the object's handle +
//   the page's index, as Linux biases by the inode number), so placement does not depend on the order
//   of faults and survives VMA splits.
// - WEIGHTED_INTERLEAVE: as INTERLEAVE with node n counted weight[n] times (Machine.SetInterleaveWeight,
//   sysfs weighted_interleave/nodeN; default 1).
// Every allocation is further restricted to the process's cpuset mems (the allocator's ALLOC_CPUSET
// check, __GFP_HARDWALL): the policy and the cpuset are combined by a node mask that filters the
// zonelist (PageAllocator.AllocPagesNodemask).
//
// Creation (mpol_new + mpol_set_nodemask): the user's nodes are intersected with the cpuset's mems
// (or, with RELATIVE_NODES, folded onto them); the user's own mask is kept with STATIC_NODES /
// RELATIVE_NODES (w.user_nodemask), otherwise the mems it was made against (w.cpuset_mems_allowed).
// When a cpuset's mems change, each policy is rebound (mpol_rebind_policy): STATIC_NODES keeps the
// user's nodes that are still allowed, RELATIVE_NODES folds them onto the new mems, and the default
// remaps each node to the node of the same rank in the new mems (nodes_remap); PREFERRED and
// PREFERRED_MANY only remember the new mems (the allocator's cpuset filter does the rest), as Linux.
//
// Policies are immutable objects: a change (set, mbind, rebind) publishes a new one, so a fault reads
// a VMA's or the task's policy with one load and never sees a half-rebound mask.
//
// Locking: the task policy and every VMA policy are written under the mm's mmap_lock for write (a
// rebind also holds the machine's cpuset lock, taken before it) and read under it for read (faults,
// get_mempolicy). The interleave weights are an immutable array replaced whole.
using System.Numerics;
using Vmm.Memory;

namespace Vmm;

/// <summary>The mode of a NUMA memory policy (Linux's MPOL_* modes, with their numbers).</summary>
public enum MempolicyMode
{
    /// <summary>MPOL_DEFAULT: the next level's policy (VMA: the task's; task: local allocation).</summary>
    Default = 0,
    /// <summary>MPOL_PREFERRED: one node first, then the others (an empty mask means LOCAL).</summary>
    Preferred = 1,
    /// <summary>MPOL_BIND: only the given nodes; no fallback outside them.</summary>
    Bind = 2,
    /// <summary>MPOL_INTERLEAVE: pages spread over the nodes by their offset in the mapping.</summary>
    Interleave = 3,
    /// <summary>MPOL_LOCAL: the node the process runs on (its home node).</summary>
    Local = 4,
    /// <summary>MPOL_PREFERRED_MANY: any of the given nodes first, then the others.</summary>
    PreferredMany = 5,
    /// <summary>MPOL_WEIGHTED_INTERLEAVE: interleave with per-node weights (<see cref="Machine.SetInterleaveWeight"/>).</summary>
    WeightedInterleave = 6,
}

/// <summary>Mode flags of set_mempolicy and mbind (Linux's MPOL_F_STATIC_NODES, MPOL_F_RELATIVE_NODES).</summary>
[Flags]
public enum MempolicyFlags
{
    /// <summary>No flag: the nodes are remapped when the cpuset's mems change.</summary>
    None = 0,
    /// <summary>MPOL_F_RELATIVE_NODES: the nodes are ranks within the cpuset's mems (node 0 = its first node).</summary>
    RelativeNodes = 1 << 14,
    /// <summary>MPOL_F_STATIC_NODES: the nodes are physical and never remapped; only those the cpuset allows are used.</summary>
    StaticNodes = 1 << 15,
}

/// <summary>Flags of get_mempolicy (Linux's MPOL_F_NODE, MPOL_F_ADDR, MPOL_F_MEMS_ALLOWED).</summary>
[Flags]
public enum GetMempolicyFlags
{
    /// <summary>The task policy's mode and nodes.</summary>
    None = 0,
    /// <summary>MPOL_F_NODE: a node number instead of the mode (with Address: the node of the page there, faulted in if needed).</summary>
    Node = 1,
    /// <summary>MPOL_F_ADDR: the policy of the VMA at the address.</summary>
    Address = 2,
    /// <summary>MPOL_F_MEMS_ALLOWED: the nodes the process's cpuset allows (alone only).</summary>
    MemsAllowed = 4,
}

/// <summary>
/// One memory policy (Linux's struct mempolicy), immutable. Null stands for MPOL_DEFAULT; MPOL_DEFAULT
/// itself is never stored. See the file header.
/// </summary>
internal sealed class Mempolicy
{
    private Mempolicy(MempolicyMode mode, MempolicyFlags flags, ulong nodes, ulong userNodes, ulong cpusetMems)
    {
        Mode = mode;
        Flags = flags;
        Nodes = nodes;
        UserNodes = userNodes;
        CpusetMems = cpusetMems;
    }

    /// <summary>Never Default.</summary>
    public MempolicyMode Mode { get; }

    public MempolicyFlags Flags { get; }

    /// <summary>pol->nodes: the nodes in effect (PREFERRED: one node; LOCAL: none).</summary>
    public ulong Nodes { get; }

    /// <summary>w.user_nodemask: the nodes as the user gave them (STATIC_NODES / RELATIVE_NODES only).</summary>
    public ulong UserNodes { get; }

    /// <summary>w.cpuset_mems_allowed: the mems the nodes were made against (without STATIC / RELATIVE).</summary>
    public ulong CpusetMems { get; }

    /// <summary>mpol_store_user_nodemask.</summary>
    public bool StoresUserNodes => (Flags & (MempolicyFlags.StaticNodes | MempolicyFlags.RelativeNodes)) != 0;

    /// <summary>The mode and flags as get_mempolicy reports them (mode | MPOL_MODE_FLAGS).</summary>
    public int ReportedMode => (int)Mode | (int)Flags;

    /// <summary>get_policy_nodemask: what get_mempolicy reports as the nodes (the user's with STATIC / RELATIVE).</summary>
    public ulong ReportedNodes => StoresUserNodes ? UserNodes : Mode == MempolicyMode.Local ? 0 : Nodes;

    /// <summary>
    /// sanitize_mpol_flags + mpol_new + mpol_set_nodemask: a policy of <paramref name="mode"/> on
    /// <paramref name="nodes"/> for a process whose cpuset allows <paramref name="mems"/> (already
    /// limited to the machine's nodes). <paramref name="policy"/> is null for MPOL_DEFAULT.
    /// </summary>
    /// <returns>EINVAL: an unknown mode or flag, STATIC with RELATIVE, nodes given where none are
    /// allowed (DEFAULT, LOCAL) or none where some are needed, flags on an empty PREFERRED or on LOCAL,
    /// or no given node left once restricted to the cpuset's mems.</returns>
    public static Errno TryCreate(MempolicyMode mode, MempolicyFlags flags, NodeMask nodes, ulong mems, out Mempolicy? policy)
    {
        policy = null;
        Errno checkedFlags = CheckModeAndFlags(mode, flags);
        if (checkedFlags != Errno.None)
            return checkedFlags;
        bool userFlags = (flags & (MempolicyFlags.StaticNodes | MempolicyFlags.RelativeNodes)) != 0;
        // mpol_new.
        switch (mode)
        {
            case MempolicyMode.Default:
                return nodes.IsEmpty ? Errno.None : Errno.EINVAL;
            case MempolicyMode.Preferred when nodes.IsEmpty:
                if (userFlags)
                    return Errno.EINVAL;
                mode = MempolicyMode.Local; // preferred with no node: local allocation
                break;
            case MempolicyMode.Local:
                if (!nodes.IsEmpty || userFlags)
                    return Errno.EINVAL;
                break;
            default:
                if (nodes.IsEmpty)
                    return Errno.EINVAL;
                break;
        }
        if (mode == MempolicyMode.Local)
        {
            policy = new Mempolicy(MempolicyMode.Local, flags, 0, 0, 0);
            return Errno.None;
        }
        // mpol_set_nodemask: the nodes the cpuset allows (and that have memory).
        ulong allowed = (flags & MempolicyFlags.RelativeNodes) != 0 ? RelativeNodemask(nodes.Bits, mems) : nodes.Bits & mems;
        if (allowed == 0)
            return Errno.EINVAL;
        if (mode == MempolicyMode.Preferred)
            allowed = 1UL << BitOperations.TrailingZeroCount(allowed);
        policy = userFlags
            ? new Mempolicy(mode, flags, allowed, nodes.Bits, 0)
            : new Mempolicy(mode, flags, allowed, 0, mems);
        return Errno.None;
    }

    /// <summary>sanitize_mpol_flags: EINVAL for an unknown mode or flag, or STATIC with RELATIVE.</summary>
    public static Errno CheckModeAndFlags(MempolicyMode mode, MempolicyFlags flags)
    {
        if ((uint)mode > (uint)MempolicyMode.WeightedInterleave)
            return Errno.EINVAL;
        if ((flags & ~(MempolicyFlags.StaticNodes | MempolicyFlags.RelativeNodes)) != 0)
            return Errno.EINVAL; // Linux: the bits land in the mode, which is then >= MPOL_MAX
        if ((flags & MempolicyFlags.StaticNodes) != 0 && (flags & MempolicyFlags.RelativeNodes) != 0)
            return Errno.EINVAL;
        return Errno.None;
    }

    /// <summary>
    /// mpol_rebind_policy: this policy for a process whose cpuset now allows <paramref name="mems"/>.
    /// Returns this object when nothing changes. Never empty: when no node survives, all of the new
    /// mems are used (as Linux).
    /// </summary>
    public Mempolicy Rebind(ulong mems)
    {
        if (Mode == MempolicyMode.Local)
            return this;
        if (!StoresUserNodes && CpusetMems == mems)
            return this;
        switch (Mode)
        {
            case MempolicyMode.Preferred or MempolicyMode.PreferredMany:
                // mpol_rebind_preferred: only the mems are remembered; the allocator's cpuset filter
                // keeps the pages inside the new mems.
                return StoresUserNodes ? this : new Mempolicy(Mode, Flags, Nodes, UserNodes, mems);
            default:
            {
                // mpol_rebind_nodemask.
                ulong nodes;
                ulong remembered = CpusetMems;
                if ((Flags & MempolicyFlags.StaticNodes) != 0)
                {
                    nodes = UserNodes & mems;
                }
                else if ((Flags & MempolicyFlags.RelativeNodes) != 0)
                {
                    nodes = RelativeNodemask(UserNodes, mems);
                }
                else
                {
                    nodes = Remap(Nodes, CpusetMems, mems);
                    remembered = mems;
                }
                if (nodes == 0)
                    nodes = mems;
                return new Mempolicy(Mode, Flags, nodes, UserNodes, remembered);
            }
        }
    }

    /// <summary>mpol_equal: same mode, flags and nodes (and user nodes where kept). Two nulls (default) are equal.</summary>
    public static bool Equal(Mempolicy? a, Mempolicy? b)
    {
        if (ReferenceEquals(a, b))
            return true;
        if (a is null || b is null)
            return false;
        if (a.Mode != b.Mode || a.Flags != b.Flags)
            return false;
        if (a.StoresUserNodes && a.UserNodes != b.UserNodes)
            return false;
        return a.Mode == MempolicyMode.Local || a.Nodes == b.Nodes;
    }

    /// <summary>
    /// mpol_relative_nodemask: the user's node n is the (n mod |mems|)-th node of <paramref name="mems"/>
    /// (nodes_fold, then nodes_onto).
    /// </summary>
    public static ulong RelativeNodemask(ulong user, ulong mems)
    {
        int weight = BitOperations.PopCount(mems);
        if (weight == 0)
            return 0;
        ulong result = 0;
        for (ulong bits = user; bits != 0; bits &= bits - 1)
        {
            int rank = BitOperations.TrailingZeroCount(bits) % weight;
            result |= 1UL << NthNode(mems, rank);
        }
        return result;
    }

    /// <summary>
    /// nodes_remap (bitmap_remap): a node of <paramref name="src"/> that is the k-th node of
    /// <paramref name="oldMems"/> becomes the (k mod |new|)-th node of <paramref name="newMems"/>; a node not in
    /// the old mems stays as it is.
    /// </summary>
    public static ulong Remap(ulong src, ulong oldMems, ulong newMems)
    {
        int weight = BitOperations.PopCount(newMems);
        ulong result = 0;
        for (ulong bits = src; bits != 0; bits &= bits - 1)
        {
            int node = BitOperations.TrailingZeroCount(bits);
            if (weight == 0 || (oldMems & (1UL << node)) == 0)
            {
                result |= 1UL << node;
                continue;
            }
            int rank = BitOperations.PopCount(oldMems & ((1UL << node) - 1));
            result |= 1UL << NthNode(newMems, rank % weight);
        }
        return result;
    }

    /// <summary>The <paramref name="n"/>-th node (from 0) of a mask that has more than n nodes.</summary>
    public static int NthNode(ulong mask, int n)
    {
        for (; n > 0; n--)
            mask &= mask - 1;
        return BitOperations.TrailingZeroCount(mask);
    }

    /// <summary>interleave_nid: node number (ilx mod n) of the policy's n nodes.</summary>
    public static int InterleaveNid(ulong nodes, ulong ilx, int fallback)
    {
        int count = BitOperations.PopCount(nodes);
        return count == 0 ? fallback : NthNode(nodes, (int)(ilx % (ulong)count));
    }

    /// <summary>weighted_interleave_nid: as <see cref="InterleaveNid"/> with node n counted weights[n] times.</summary>
    public static int WeightedInterleaveNid(ulong nodes, ulong ilx, byte[] weights, int fallback)
    {
        if (nodes == 0)
            return fallback;
        ulong total = 0;
        for (ulong bits = nodes; bits != 0; bits &= bits - 1)
            total += weights[BitOperations.TrailingZeroCount(bits)];
        ulong target = ilx % total;
        for (ulong bits = nodes; ; bits &= bits - 1)
        {
            int node = BitOperations.TrailingZeroCount(bits);
            if (target < weights[node])
                return node;
            target -= weights[node];
        }
    }

    /// <summary>
    /// alloc_pages_mpol: one page (order 0) where <paramref name="policy"/> says, inside
    /// <paramref name="mems"/> (the cpuset's). <paramref name="ilx"/> is the interleave index,
    /// <paramref name="localNode"/> the node the process runs on. NoPfn when nothing allowed is free.
    /// </summary>
    public static long AllocPage(Machine machine, AllocFlags flags, Mempolicy? policy, ulong ilx, int localNode, ulong mems)
    {
        PageAllocator allocator = machine.Allocator;
        int node = localNode;
        ulong mask = mems;
        switch (policy?.Mode)
        {
            case MempolicyMode.Preferred:
                node = BitOperations.TrailingZeroCount(policy.Nodes);
                break;
            case MempolicyMode.PreferredMany:
            {
                // alloc_pages_preferred_many: the policy's nodes first (Linux without direct reclaim
                // there), then any allowed node.
                ulong preferred = policy.Nodes & mems;
                if (preferred != 0)
                {
                    long pfn = allocator.AllocPagesNodemask(0, flags, node, preferred);
                    if (pfn != PageAllocator.NoPfn)
                        return pfn;
                }
                break;
            }
            case MempolicyMode.Bind:
                // cpuset_nodemask_valid_mems_allowed: a bind mask that no longer meets the mems (a
                // rebind in flight) is ignored rather than failing every allocation.
                if ((policy.Nodes & mems) != 0)
                    mask = policy.Nodes & mems;
                break;
            case MempolicyMode.Interleave:
                node = InterleaveNid(policy.Nodes, ilx, localNode);
                break;
            case MempolicyMode.WeightedInterleave:
                node = WeightedInterleaveNid(policy.Nodes, ilx, machine.InterleaveWeights, localNode);
                break;
        }
        return allocator.AllocPagesNodemask(0, flags, node, mask);
    }
}

// The weighted-interleave weights (/sys/kernel/mm/mempolicy/weighted_interleave/nodeN); the rest of
// Machine is in Machine.cs.
public sealed partial class Machine
{
    private byte[] _interleaveWeights; // immutable array, replaced whole under _interleaveWeightsLock
    private readonly Lock _interleaveWeightsLock = new();

    /// <summary>iw_table: weight per node (1 to 255), read by weighted interleave with one load.</summary>
    internal byte[] InterleaveWeights => Volatile.Read(ref _interleaveWeights);

    private byte[] CreateDefaultInterleaveWeights()
    {
        var weights = new byte[Topology.NodeCount];
        Array.Fill(weights, (byte)1);
        return weights;
    }

    /// <summary>
    /// Writes weighted_interleave/node<paramref name="node"/>: weighted interleave puts
    /// <paramref name="weight"/> pages on the node for each round (default 1). EINVAL: a weight outside
    /// 1 to 255 (as Linux 6.16's sysfs store; the value is a u8 and 0 is refused).
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">no such node (the sysfs file does not exist).</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno SetInterleaveWeight(int node, int weight)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(node);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(node, Topology.NodeCount);
        using MachineCall call = EnterCall();
        if (weight is < 1 or > 255)
            return Errno.EINVAL;
        lock (_interleaveWeightsLock)
        {
            byte[] weights = (byte[])_interleaveWeights.Clone();
            weights[node] = (byte)weight;
            Volatile.Write(ref _interleaveWeights, weights);
        }
        return Errno.None;
    }

    /// <summary>Reads weighted_interleave/node<paramref name="node"/> (1 to 255).</summary>
    /// <exception cref="ArgumentOutOfRangeException">no such node.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public int GetInterleaveWeight(int node)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(node);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(node, Topology.NodeCount);
        using MachineCall call = EnterCall();
        return InterleaveWeights[node];
    }
}
