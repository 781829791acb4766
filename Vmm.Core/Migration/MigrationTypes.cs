// The vocabulary of NUMA placement and page migration that hosts see: node masks (Linux's nodemask_t),
// the migration modes and reasons (include/linux/migrate_mode.h), and the MPOL_MF_* flags that mbind and
// move_pages take. Plain values, no behaviour beyond formatting and set arithmetic.
using System.Globalization;
using System.Numerics;
using System.Text;

namespace Vmm;

/// <summary>
/// A set of NUMA nodes (Linux's nodemask_t): bit <c>n</c> stands for node <c>n</c>. A machine has at most
/// 64 nodes (<see cref="MachineOptions.NodeCount"/>), so a mask is one 64-bit word.
/// </summary>
/// <remarks>Instances are immutable: safe to share between threads.</remarks>
/// <param name="Bits">bit <c>n</c> set: node <c>n</c> is in the set.</param>
public readonly record struct NodeMask(ulong Bits)
{
    /// <summary>The empty set.</summary>
    public static NodeMask Empty => default;

    /// <summary>The set of the given nodes.</summary>
    /// <exception cref="ArgumentOutOfRangeException">a node is negative or 64 or more.</exception>
    public static NodeMask Of(params ReadOnlySpan<int> nodes)
    {
        ulong bits = 0;
        foreach (int node in nodes)
            bits |= Bit(node);
        return new NodeMask(bits);
    }

    /// <summary>Nodes 0 to <paramref name="nodeCount"/> - 1.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="nodeCount"/> is not 0 to 64.</exception>
    public static NodeMask FirstNodes(int nodeCount)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(nodeCount);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(nodeCount, 64);
        return new NodeMask(nodeCount == 64 ? ulong.MaxValue : (1UL << nodeCount) - 1);
    }

    /// <summary>True when no node is in the set.</summary>
    public bool IsEmpty => Bits == 0;

    /// <summary>How many nodes are in the set (nodes_weight).</summary>
    public int Count => BitOperations.PopCount(Bits);

    /// <summary>Whether <paramref name="node"/> is in the set (node_isset); false for a node out of range.</summary>
    public bool Contains(int node) => (uint)node < 64 && (Bits & (1UL << node)) != 0;

    /// <summary>The lowest node in the set (first_node), or -1 when empty.</summary>
    public int First => Bits == 0 ? -1 : BitOperations.TrailingZeroCount(Bits);

    /// <summary>The set with <paramref name="node"/> added.</summary>
    /// <exception cref="ArgumentOutOfRangeException">the node is negative or 64 or more.</exception>
    public NodeMask With(int node) => new(Bits | Bit(node));

    /// <summary>The set without <paramref name="node"/>.</summary>
    /// <exception cref="ArgumentOutOfRangeException">the node is negative or 64 or more.</exception>
    public NodeMask Without(int node) => new(Bits & ~Bit(node));

    /// <summary>The nodes of the set, lowest first (for_each_node_mask).</summary>
    public IEnumerable<int> Nodes
    {
        get
        {
            for (ulong bits = Bits; bits != 0; bits &= bits - 1)
                yield return BitOperations.TrailingZeroCount(bits);
        }
    }

    /// <summary>The <paramref name="n"/>-th node of the set, counting from 0 (Linux's nth node of a mask); -1 when the set has fewer.</summary>
    public int NthNode(int n)
    {
        if (n < 0)
            return -1;
        foreach (int node in Nodes)
        {
            if (n-- == 0)
                return node;
        }
        return -1;
    }

    /// <summary>Intersection (nodes_and).</summary>
    public static NodeMask operator &(NodeMask left, NodeMask right) => new(left.Bits & right.Bits);

    /// <summary>Union (nodes_or).</summary>
    public static NodeMask operator |(NodeMask left, NodeMask right) => new(left.Bits | right.Bits);

    /// <summary>Intersection (nodes_and).</summary>
    public static NodeMask BitwiseAnd(NodeMask left, NodeMask right) => left & right;

    /// <summary>Union (nodes_or).</summary>
    public static NodeMask BitwiseOr(NodeMask left, NodeMask right) => left | right;

    /// <summary>Whether every node of this set is also in <paramref name="other"/> (nodes_subset).</summary>
    public bool IsSubsetOf(NodeMask other) => (Bits & ~other.Bits) == 0;

    /// <summary>Linux's node-list format, as cpuset.mems and numactl print it: "0-2,5"; "" when empty.</summary>
    public override string ToString()
    {
        var text = new StringBuilder();
        int node = 0;
        while (node < 64)
        {
            if (!Contains(node))
            {
                node++;
                continue;
            }
            int last = node;
            while (last + 1 < 64 && Contains(last + 1))
                last++;
            if (text.Length > 0)
                text.Append(',');
            text.Append(CultureInfo.InvariantCulture, $"{node}");
            if (last > node)
                text.Append(CultureInfo.InvariantCulture, $"-{last}");
            node = last + 1;
        }
        return text.ToString();
    }

    /// <summary>Parses Linux's node-list format ("0-2,5", "" or whitespace for the empty set; nodelist_parse).</summary>
    /// <returns>false when the text is not a node list of nodes 0 to 63.</returns>
    public static bool TryParse(string? text, out NodeMask mask)
    {
        mask = Empty;
        if (text is null)
            return false;
        ulong bits = 0;
        foreach (string part in text.Split(',', StringSplitOptions.TrimEntries))
        {
            if (part.Length == 0)
            {
                if (text.Trim().Length == 0)
                    break;
                return false;
            }
            string[] range = part.Split('-');
            if (range.Length > 2 ||
                !int.TryParse(range[0], NumberStyles.None, CultureInfo.InvariantCulture, out int from) ||
                !int.TryParse(range[^1], NumberStyles.None, CultureInfo.InvariantCulture, out int to) ||
                from > to || to >= 64)
                return false;
            for (int node = from; node <= to; node++)
                bits |= 1UL << node;
        }
        mask = new NodeMask(bits);
        return true;
    }

    private static ulong Bit(int node)
    {
        if ((uint)node >= 64)
            throw new ArgumentOutOfRangeException(nameof(node), node, "a node is 0 to 63");
        return 1UL << node;
    }
}

/// <summary>
/// How a mover isolates a page for migration (Linux's isolate_mode_t, with its values): passed to
/// a movable page owner's isolate callback (movable_operations), so an owner can refuse work it cannot do without blocking.
/// </summary>
[Flags]
public enum IsolateMode
{
    /// <summary>No restriction.</summary>
    None = 0,
    /// <summary>ISOLATE_ASYNC_MIGRATE: the migration that follows is asynchronous (compaction's first tries): never block.</summary>
    AsyncMigrate = 0x4,
    /// <summary>ISOLATE_UNEVICTABLE: unevictable (mlocked) pages may be taken too.</summary>
    Unevictable = 0x8,
}

/// <summary>How hard a migration may try (Linux's enum migrate_mode).</summary>
public enum MigrateMode
{
    /// <summary>MIGRATE_ASYNC: never block; a page whose lock is taken is skipped (compaction's first tries).</summary>
    Async,
    /// <summary>MIGRATE_SYNC_LIGHT: may wait for a page lock, not for long operations (writeback).</summary>
    SyncLight,
    /// <summary>MIGRATE_SYNC: may block on everything (move_pages, mbind, offline).</summary>
    Sync,
}

/// <summary>Why pages are migrated (Linux's enum migrate_reason): each reason has its own counters.</summary>
public enum MigrateReason
{
    /// <summary>MR_COMPACTION: compaction defragmenting a zone.</summary>
    Compaction,
    /// <summary>MR_MEMORY_FAILURE: soft-offlining a frame that reports errors.</summary>
    MemoryFailure,
    /// <summary>MR_MEMORY_HOTPLUG: emptying a memory block for offline.</summary>
    MemoryHotplug,
    /// <summary>MR_SYSCALL: move_pages and migrate_pages (and cpuset memory_migrate).</summary>
    Syscall,
    /// <summary>MR_MEMPOLICY_MBIND: mbind with MPOL_MF_MOVE / MPOL_MF_MOVE_ALL.</summary>
    MempolicyMbind,
    /// <summary>MR_NUMA_MISPLACED: NUMA balancing moving a page to the node that uses it.</summary>
    NumaMisplaced,
    /// <summary>MR_CONTIG_RANGE: alloc_contig_range clearing a range (CMA).</summary>
    ContigRange,
    /// <summary>MR_LONGTERM_PIN: a long-term pin moving a page out of ZONE_MOVABLE first.</summary>
    LongtermPin,
    /// <summary>MR_DEMOTION: moving a page to a slower memory tier.</summary>
    Demotion,
}

/// <summary>The MPOL_MF_* flags of mbind and move_pages (Linux's numbers).</summary>
[Flags]
public enum MovePolicyFlags
{
    /// <summary>No flag.</summary>
    None = 0,
    /// <summary>MPOL_MF_STRICT (mbind): fail with EIO if a page of the range is not placed as the policy says and cannot be moved.</summary>
    Strict = 1 << 0,
    /// <summary>MPOL_MF_MOVE: move the pages mapped by this process only.</summary>
    Move = 1 << 1,
    /// <summary>MPOL_MF_MOVE_ALL: move pages even when other processes map them too; needs CAP_SYS_NICE.</summary>
    MoveAll = 1 << 2,
}
