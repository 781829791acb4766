// ContiguousBuffer: physically contiguous memory for the host (what a Linux driver gets from
// alloc_pages of a high order, or from alloc_contig_pages / CMA for more than the largest order: a DMA
// buffer, a ring, a huge page's worth of frames). Machine.AllocateContiguous makes one: up to the largest
// buddy order (4 MiB) one buddy allocation of that order, unmovable (direct compaction, when the allocator
// has it, runs in its slow path); above, alloc_contig_pages (Compaction/ContigAlloc.cs), which moves the
// pages in use out of a range of ZONE_NORMAL. Either way the frames are split into plain frames with one
// reference each (split_page / alloc_pages_exact: the frames beyond the request are freed at once), so
// the buffer is exactly its pages and Dispose frees them one by one (free_contig_range).
//
// Why a registry (Machine.ContiguousBuffers) and not a tag in the mapping word: the frames are unmovable
// already (no PG_lru, no MOVABLE tag, in ZONE_NORMAL: isolation and compaction skip them), so nothing on a
// hot path needs to tell them apart; only offline's explanation (MemoryHotplug.ExplainFrame) and Audit do,
// and both are slow paths that can search a short sorted list. The mapping word is read lock-free by the
// reverse map, KSM, the migration engine and (soon) movable_operations, each with its own meaning of the
// tag bits; a new meaning there would be one more case for every one of them to get right.
//
// Lifetime, as for PinnedMemory: a span or Memory handed out is valid until Dispose. A span already taken
// cannot be recalled, so the buffer holds a reference on the arena's address range
// (Arena.AddPinReference): if the machine is disposed first, the range stays mapped (reading zeros) until
// the buffer is disposed. No finalizer: a span does not keep the buffer alive.
//
// Locking: the registry's lock (a leaf) for Add / Remove / Find; allocation and freeing take the
// allocator's locks (and, for alloc_contig_pages, the hotplug lock first).
using System.Buffers;
using Vmm.Memory;
using Vmm.Native;

namespace Vmm;

/// <summary>
/// Physically contiguous, zeroed memory of a machine (<see cref="Machine.AllocateContiguous(long, int, CancellationToken)"/>):
/// frames <see cref="FirstPfn"/> to <see cref="FirstPfn"/> + <see cref="PageCount"/> - 1, unmovable while
/// the buffer lives (migration, compaction and memory offline leave them alone; an offline of a block that
/// holds them fails with EBUSY naming <see cref="OfflineBlockReason.ContiguousBuffer"/>). Dispose to free them.
/// </summary>
/// <remarks>
/// <para>Lifetime: a span from <see cref="GetSpan()"/> or <see cref="GetSpan(long, int)"/> and the
/// <see cref="Memory{T}"/> from <see cref="AsMemory"/> are valid only until this buffer is disposed:
/// the frames then belong to someone else. After <see cref="Dispose"/> or the machine's, every member
/// that hands them out throws <see cref="ObjectDisposedException"/>, and so does the span of a Memory
/// taken earlier; a span taken earlier cannot be recalled (if the machine is disposed first, it reads
/// zeros, never unmapped memory, until the buffer is disposed).</para>
/// <para>Not thread-safe with respect to <see cref="Dispose"/>: every other member, and the spans and
/// Memory it hands out, may be used concurrently from multiple threads (the bytes themselves are the
/// host's to synchronise, as any shared memory is), but Dispose must not race with them (a span taken
/// before Dispose points at frames the buffer no longer holds).
/// Dispose is idempotent (concurrent Disposes are harmless), and after the machine's Dispose it only lets
/// go of the arena's address range.</para>
/// </remarks>
public sealed unsafe class ContiguousBuffer : IDisposable
{
    private readonly Machine _machine;
    private readonly Manager _manager;
    private int _disposed;   // 1 once Dispose ran. Atomic.
    private int _holdsArena; // 1 while this buffer holds its reference on the arena's address range. Atomic.

    /// <summary>Takes ownership of <paramref name="pageCount"/> frames (refcount 1 each) and registers them. Preconditions: inside a call of the machine.</summary>
    internal ContiguousBuffer(Machine machine, long firstPfn, long pageCount)
    {
        _machine = machine;
        FirstPfn = firstPfn;
        PageCount = pageCount;
        Node = machine.Topology.NodeOf(firstPfn);
        _manager = new Manager(this);
        machine.Arena.AddPinReference();
        _holdsArena = 1;
        machine.ContiguousBuffers.Add(this);
    }

    /// <summary>The first frame (its physical address is <c>FirstPfn * 4096</c>).</summary>
    public long FirstPfn { get; }

    /// <summary>Frames of the buffer.</summary>
    public long PageCount { get; }

    /// <summary>Bytes of the buffer: <see cref="PageCount"/> pages (the request rounded up to whole pages).</summary>
    public long Length => PageCount * Topology.PageSize;

    /// <summary>The NUMA node the frames are on.</summary>
    public int Node { get; }

    /// <summary>True once <see cref="Dispose"/> has run, or the machine was disposed.</summary>
    public bool IsDisposed => Volatile.Read(ref _disposed) != 0 || _machine.IsDisposed;

    /// <summary>True if <paramref name="pfn"/> is one of the buffer's frames.</summary>
    internal bool Contains(long pfn) => pfn >= FirstPfn && pfn < FirstPfn + PageCount;

    /// <summary>The whole buffer's bytes; valid until Dispose.</summary>
    /// <exception cref="InvalidOperationException">the buffer is larger than a span can be (2 GiB); use <see cref="GetSpan(long, int)"/>.</exception>
    /// <exception cref="ObjectDisposedException">after Dispose, or after the machine's.</exception>
    public Span<byte> GetSpan()
    {
        if (Length > int.MaxValue)
            throw new InvalidOperationException($"the buffer's {Length} bytes do not fit in one span: take it in parts with GetSpan(offset, length)");
        return GetSpan(0, (int)Length);
    }

    /// <summary>Bytes <paramref name="offset"/> to <paramref name="offset"/> + <paramref name="length"/> - 1 of the buffer; valid until Dispose.</summary>
    /// <exception cref="ArgumentOutOfRangeException">the slice leaves the buffer.</exception>
    /// <exception cref="ObjectDisposedException">after Dispose, or after the machine's.</exception>
    public Span<byte> GetSpan(long offset, int length)
    {
        ThrowIfDisposed();
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(offset, Length - length);
        // Contiguous frames are contiguous bytes of the arena.
        return new Span<byte>(_machine.Arena.FrameAddress(FirstPfn) + offset, length);
    }

    /// <summary>
    /// The whole buffer as <see cref="Memory{T}"/> (for async APIs), without copying; valid until Dispose:
    /// its <see cref="Memory{T}.Span"/> throws <see cref="ObjectDisposedException"/> after it. Pinning it is
    /// free (the memory is native and never moves while the buffer lives).
    /// </summary>
    /// <exception cref="InvalidOperationException">the buffer is larger than 2 GiB.</exception>
    /// <exception cref="ObjectDisposedException">after Dispose, or after the machine's.</exception>
    public Memory<byte> AsMemory()
    {
        ThrowIfDisposed();
        if (Length > int.MaxValue)
            throw new InvalidOperationException($"the buffer's {Length} bytes do not fit in one Memory<byte>");
        return _manager.Memory;
    }

    private void ThrowIfDisposed()
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        if (_machine.IsDisposed)
            throw new ObjectDisposedException(nameof(Machine), $"the machine ({_machine}) of this buffer was disposed");
    }

    /// <summary>
    /// free_contig_range: gives the frames back to the machine's allocator. Idempotent; after the machine's
    /// Dispose it only lets go of the arena (the frames went with the machine).
    /// </summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        if (_machine.TryEnterCall(out MachineCall call))
        {
            using (call)
            {
                // Out of the registry first: from here the frames are no buffer's, and Audit and the
                // offline's explanation must not look for them in one once they are free.
                _machine.ContiguousBuffers.Remove(this);
                _machine.Contig.FreeContigRange(FirstPfn, PageCount);
            }
        }
        if (Interlocked.Exchange(ref _holdsArena, 0) == 1)
            _machine.Arena.ReleasePinReference();
    }

    /// <inheritdoc/>
    public override string ToString() => $"contiguous buffer of {Length} bytes at frames {FirstPfn}..{FirstPfn + PageCount - 1} (node {Node})";

    /// <summary>The buffer as a MemoryManager, for <see cref="AsMemory"/>: its span is the buffer's (checked on every use).</summary>
    private sealed class Manager(ContiguousBuffer buffer) : MemoryManager<byte>
    {
        public override Span<byte> GetSpan() => buffer.GetSpan();

        public override MemoryHandle Pin(int elementIndex = 0)
        {
            Span<byte> span = buffer.GetSpan();
            ArgumentOutOfRangeException.ThrowIfNegative(elementIndex);
            ArgumentOutOfRangeException.ThrowIfGreaterThan(elementIndex, span.Length);
            return new MemoryHandle(buffer._machine.Arena.FrameAddress(buffer.FirstPfn) + elementIndex);
        }

        public override void Unpin()
        {
        }

        protected override void Dispose(bool disposing)
        {
        }
    }
}

/// <summary>
/// The live contiguous buffers of a machine, sorted by first frame, so that the slow paths that must
/// recognise their frames (Audit, the offline's explanation) can find them. Locking: its own lock, a leaf.
/// </summary>
internal sealed class ContiguousBufferRegistry
{
    private readonly Lock _lock = new();
    private readonly List<ContiguousBuffer> _buffers = []; // sorted by FirstPfn; _lock

    public void Add(ContiguousBuffer buffer)
    {
        lock (_lock)
        {
            int at = IndexAfter(buffer.FirstPfn);
            _buffers.Insert(at, buffer);
        }
    }

    public void Remove(ContiguousBuffer buffer)
    {
        lock (_lock)
            _buffers.Remove(buffer);
    }

    /// <summary>The live buffer that holds <paramref name="pfn"/>, or null.</summary>
    public ContiguousBuffer? Find(long pfn)
    {
        lock (_lock)
        {
            int at = IndexAfter(pfn) - 1;
            return at >= 0 && _buffers[at].Contains(pfn) ? _buffers[at] : null;
        }
    }

    /// <summary>A copy of the live buffers, in frame order.</summary>
    public ContiguousBuffer[] Snapshot()
    {
        lock (_lock)
            return [.. _buffers];
    }

    /// <summary>The number of buffers whose first frame is at or below <paramref name="pfn"/>. Preconditions: _lock held.</summary>
    private int IndexAfter(long pfn)
    {
        int lo = 0, hi = _buffers.Count;
        while (lo < hi)
        {
            int mid = (lo + hi) >>> 1;
            if (_buffers[mid].FirstPfn <= pfn)
                lo = mid + 1;
            else
                hi = mid;
        }
        return lo;
    }
}
