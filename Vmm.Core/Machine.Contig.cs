// Machine.Contig: the host's physically contiguous buffers (Buffers/ContiguousBuffer.cs has the why;
// Compaction/ContigAlloc.cs the alloc_contig_range machinery behind the large ones).
//
// Locking: the allocator's and ContigAlloc's; the registry's lock (a leaf) to record the buffer.
using System.Numerics;
using Vmm.Memory;
using Vmm.Native;

namespace Vmm;

public sealed partial class Machine
{
    /// <summary>alloc_contig_range / alloc_contig_pages / free_contig_range of this machine.</summary>
    internal ContigAlloc Contig { get; }

    /// <summary>The live contiguous buffers (Audit and the offline's explanation recognise their frames by it).</summary>
    internal ContiguousBufferRegistry ContiguousBuffers { get; } = new();

    /// <summary>
    /// Allocates <paramref name="bytes"/> (rounded up to whole pages) of physically contiguous, zeroed
    /// memory. Up to the largest buddy order (4 MiB) it is one buddy allocation of that order (Linux's
    /// alloc_pages_exact); above, alloc_contig_pages, which migrates the pages in use out of a range of
    /// ZONE_NORMAL to make room. The memory is unmovable while the buffer lives and never comes from
    /// ZONE_MOVABLE (which must stay offlinable).
    /// </summary>
    /// <param name="bytes">the size, above zero.</param>
    /// <param name="node">the NUMA node to take it from first (then the others by distance), or -1 for node 0's order.</param>
    /// <param name="cancellationToken">stops a large allocation (above 4 MiB, whose page migration may take
    /// a while) between its migration steps.</param>
    /// <returns>The buffer; dispose it to free the memory.</returns>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="bytes"/> not above zero, or no such node.</exception>
    /// <exception cref="InsufficientMemoryException">no contiguous range of that size could be found or
    /// cleared (free memory too fragmented, a pinned or unmovable page in every candidate range, or no free
    /// memory elsewhere to move pages to). Nothing is left allocated; pages moved on the way stay moved.</exception>
    public ContiguousBuffer AllocateContiguous(long bytes, int node = -1, CancellationToken cancellationToken = default)
    {
        using MachineCall call = EnterCall();
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bytes);
        if (node < -1 || node >= Topology.NodeCount)
            throw new ArgumentOutOfRangeException(nameof(node), node, $"a node of 0 to {Topology.NodeCount - 1}, or -1");
        long pages = (bytes + Topology.PageSize - 1) / Topology.PageSize;
        if (pages > Topology.TotalFrames)
            throw new InsufficientMemoryException($"{bytes} bytes of contiguous memory asked of a machine of {Topology.TotalFrames} frames");
        long pfn;
        int maxOrder = Allocator.ZoneMaxOrder;
        if (pages <= 1L << maxOrder)
        {
            // alloc_pages_exact: one unmovable buddy block of the order that fits, split into single
            // frames, the ones beyond the request freed at once.
            int order = BitOperations.Log2(BitOperations.RoundUpToPowerOf2((ulong)pages));
            pfn = Allocator.AllocPages(order, AllocFlags.None, node);
            if (pfn == PageAllocator.NoPfn)
                throw new InsufficientMemoryException($"no free block of order {order} ({(4096L << order) >> 10} KiB) for a contiguous buffer of {bytes} bytes");
            Allocator.SplitPage(pfn, order);
            if ((1L << order) > pages)
                Allocator.FreeContigRange(pfn + pages, (1L << order) - pages);
        }
        else
        {
            Errno error = Contig.AllocContigPages(pages, node, cancellationToken, out pfn, out _);
            if (error == Errno.EINTR)
                throw new OperationCanceledException("the contiguous allocation was cancelled; nothing is left allocated", cancellationToken);
            if (error != Errno.None)
                throw new InsufficientMemoryException($"no range of {pages} contiguous frames ({bytes} bytes) could be cleared in ZONE_NORMAL ({error}): free memory too fragmented, an unmovable or pinned page in every candidate range, or nowhere to move pages to");
        }
        try
        {
            return new ContiguousBuffer(this, pfn, pages);
        }
        catch
        {
            Allocator.FreeContigRange(pfn, pages);
            throw;
        }
    }
}
