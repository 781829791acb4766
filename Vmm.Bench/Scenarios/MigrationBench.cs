using System.Diagnostics;
using Vmm.Memory;
using Vmm.Migration;
using Vmm.Native;

namespace Vmm.Bench.Scenarios;

/// <summary>What the migration scenarios (migrate, migrate-ksm, migrate-writer) share: a timed move_pages and the memcpy they are measured against.</summary>
internal static class MigrationBench
{
    /// <summary>
    /// move_pages of every page of <paramref name="addresses"/> to <paramref name="target"/>, called by
    /// the process on itself; returns the call's ns. Throws on a whole-call error, and, when
    /// <paramref name="checkStatus"/>, on a page whose status is not the target node.
    /// </summary>
    public static double MovePagesTo(VmProcess process, ulong[] addresses, int[] targets, int[] status, int target,
        MovePolicyFlags flags = MovePolicyFlags.Move, bool checkStatus = true)
    {
        Array.Fill(targets, target);
        long start = Stopwatch.GetTimestamp();
        Errno error = process.MovePages(0, addresses, targets, status, flags);
        double ns = Stopwatch.GetElapsedTime(start).TotalNanoseconds;
        if (error != Errno.None)
            throw new InvalidOperationException($"move_pages: {error}");
        for (int i = 0; checkStatus && i < status.Length; i++)
        {
            if (status[i] != target)
                throw new InvalidOperationException($"move_pages: page {i} has status {status[i]}, expected node {target}");
        }
        return ns;
    }

    /// <summary>
    /// The memcpy a move is measured against: the frames of the <paramref name="pages"/> pages at
    /// <paramref name="va"/> copied frame to frame onto new frames of the other node, with the engine's
    /// copy (PageOps.Copy); returns the ns of each of <paramref name="passes"/> passes over them.
    /// </summary>
    public static double[] CopyFramesToOtherNode(Machine machine, VmProcess process, ulong va, int pages, int passes)
    {
        var sources = new long[pages];
        int other = 1 - machine.Topology.NodeOf(process.GetPagemap(va).Pfn);
        for (int i = 0; i < pages; i++)
            sources[i] = process.GetPagemap(va + (ulong)i * Topology.PageSize).Pfn;
        return CopyFrames(machine, sources, other, passes);
    }

    /// <summary>
    /// The frames <paramref name="sources"/> copied frame to frame onto new frames of node
    /// <paramref name="toNode"/> with the engine's copy (PageOps.Copy); returns the ns of each of
    /// <paramref name="passes"/> passes over them. The new frames are freed after.
    /// </summary>
    public static unsafe double[] CopyFrames(Machine machine, long[] sources, int toNode, int passes)
    {
        var copies = new long[sources.Length];
        for (int i = 0; i < sources.Length; i++)
        {
            copies[i] = machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero | AllocFlags.ThisNode, toNode);
            if (copies[i] < 0)
            {
                for (int j = 0; j < i; j++)
                    machine.Allocator.FreePages(copies[j]);
                throw new InvalidOperationException($"no free frame on node {toNode} for the memcpy's copy {i} of {sources.Length}");
            }
        }
        Arena arena = machine.Arena;
        var ns = new double[passes];
        for (int r = 0; r < passes; r++)
        {
            long start = Stopwatch.GetTimestamp();
            for (int i = 0; i < sources.Length; i++)
                PageOps.Copy(arena.FrameAddress(copies[i]), arena.FrameAddress(sources[i]));
            ns[r] = Stopwatch.GetElapsedTime(start).TotalNanoseconds;
        }
        foreach (long pfn in copies)
            machine.Allocator.FreePages(pfn);
        return ns;
    }
}
