// VmmBuffer: one host buffer kept in a DedupeStore's process: a private anonymous mapping that KSM may
// merge with identical pages of the store (and of other mergeable memory in the same dedupe domain).
//
// Reads and writes go through the process's Read / Write, so they take the access protocol's path:
// a write to a merged page copies it first (copy-on-write of a KSM page), a read of a never-written
// page sees zeros without allocating. Pages are demand-allocated: Allocate reserves address space only.
//
// Lifetime: every operation is bracketed by a count of operations in flight (_state), and Dispose
// raises a flag and waits for that count to drain before it unmaps. Why: once the range is unmapped
// the store may map a new buffer at the same address, and an operation that started before Dispose
// would then read or write the new buffer's bytes. With the count, an operation either completes on
// this buffer's pages or throws ObjectDisposedException; it never touches another buffer.
//
// Locking: none of its own beyond the atomic _state word (count in flight | disposed bit); unmapping is
// the store's (DedupeStore.cs).
using System.Buffers;

namespace Vmm;

/// <summary>
/// A buffer of host data in a <see cref="DedupeStore"/>: <see cref="Length"/> bytes of Vmm memory whose
/// identical pages KSM merges. Made by <see cref="DedupeStore.Allocate"/> or
/// <see cref="DedupeStore.Create"/>; dispose it to give its memory back.
/// </summary>
/// <remarks>
/// This type is thread-safe: all members may be used concurrently from multiple threads. Any number of
/// threads may read and write one buffer at once (concurrent writes to the
/// same bytes race as they would in ordinary memory); <see cref="Dispose"/> waits for the operations in
/// flight, and every later operation throws <see cref="ObjectDisposedException"/>.
/// </remarks>
public sealed class VmmBuffer : IDisposable
{
    private const int DisposedBit = int.MinValue;

    private readonly DedupeStore _store;

    // Operations in flight in the low 31 bits; DisposedBit once Dispose (or the store's) has begun. Atomic.
    private int _state;

    internal VmmBuffer(DedupeStore store, ulong address, long length)
    {
        _store = store;
        Address = address;
        Length = length;
    }

    /// <summary>The store the buffer lives in.</summary>
    public DedupeStore Store => _store;

    /// <summary>Bytes in the buffer (its mapping is rounded up to whole 4 KiB pages).</summary>
    public long Length { get; }

    /// <summary>The buffer's first byte in the store's process (page-aligned); for <see cref="VmProcess.GetPagemap"/> and tools.</summary>
    public ulong Address { get; }

    /// <summary>Pages the buffer spans.</summary>
    public long PageCount => (Length + Native.PageOps.PageSize - 1) / Native.PageOps.PageSize;

    /// <summary>True once <see cref="Dispose"/> (or the store's) has begun.</summary>
    public bool IsDisposed => Volatile.Read(ref _state) < 0;

    /// <summary>Copies <paramref name="source"/> into the buffer at <paramref name="offset"/>.</summary>
    /// <exception cref="ArgumentOutOfRangeException">the range does not lie inside the buffer.</exception>
    /// <exception cref="InsufficientMemoryException">the machine ran out of frames (what was written before stays).</exception>
    /// <exception cref="ObjectDisposedException">the buffer, its store or the machine was disposed.</exception>
    public void Write(long offset, ReadOnlySpan<byte> source)
    {
        CheckRange(offset, source.Length, nameof(source));
        Enter();
        try
        {
            if (source.Length > 0)
                _store.Process.Write(Address + (ulong)offset, source);
        }
        finally
        {
            Leave();
        }
    }

    /// <summary>Copies bytes of the buffer from <paramref name="offset"/> into <paramref name="destination"/> (its whole length).</summary>
    /// <exception cref="ArgumentOutOfRangeException">the range does not lie inside the buffer.</exception>
    /// <exception cref="InsufficientMemoryException">the machine ran out of frames (for a page table or the zero page).</exception>
    /// <exception cref="ObjectDisposedException">the buffer, its store or the machine was disposed.</exception>
    public void Read(long offset, Span<byte> destination)
    {
        CheckRange(offset, destination.Length, nameof(destination));
        Enter();
        try
        {
            if (destination.Length > 0)
                _store.Process.Read(Address + (ulong)offset, destination);
        }
        finally
        {
            Leave();
        }
    }

    /// <summary>A copy of the whole buffer.</summary>
    /// <exception cref="InvalidOperationException">the buffer is longer than an array can be.</exception>
    /// <exception cref="ObjectDisposedException">the buffer, its store or the machine was disposed.</exception>
    public byte[] ToArray()
    {
        ObjectDisposedException.ThrowIf(IsDisposed, this);
        if (Length > Array.MaxLength)
            throw new InvalidOperationException($"the buffer ({Length} bytes) is longer than an array can be");
        byte[] copy = GC.AllocateUninitializedArray<byte>((int)Length);
        Read(0, copy);
        return copy;
    }

    /// <summary>
    /// Pins the buffer's pages for zero-copy access: a <see cref="ReadOnlySequence{T}"/> and a span per
    /// page, valid until the result is disposed. Keep pins short: KSM never merges a pinned page (the pin
    /// holds a reference, and merging write-protects only pages whose references are all mappings), and
    /// pinning a page that is merged gives the buffer its own copy again, as Linux's FOLL_PIN does. Pinning
    /// also allocates every page of the buffer that was never written.
    /// </summary>
    /// <remarks>
    /// The pin is short-term (FOLL_PIN without FOLL_LONGTERM, like O_DIRECT I/O): the pages stay where they
    /// are, also in ZONE_MOVABLE, and a memory offline of their block waits until the pin is disposed. For
    /// memory handed over for an unbounded time, pin the range long-term instead:
    /// <c>store.Process.Pin(buffer.Address, (ulong)buffer.Length, write, longTerm: true)</c> moves the pages
    /// out of ZONE_MOVABLE first.
    /// </remarks>
    /// <param name="writable">true to write through <see cref="PinnedBuffer.GetSpan"/>.</param>
    /// <exception cref="InsufficientMemoryException">the machine ran out of frames (nothing stays pinned).</exception>
    /// <exception cref="InvalidOperationException">the buffer spans more pages than one pin can hold (an array's worth).</exception>
    /// <exception cref="ObjectDisposedException">the buffer, its store or the machine was disposed.</exception>
    public PinnedBuffer Pin(bool writable = false)
    {
        if (PageCount > Array.MaxLength)
            throw new InvalidOperationException($"the buffer ({PageCount} pages) spans more pages than one pin can hold");
        // One machine call around the pin and its sequence, so the machine's memory cannot go in between; Dispose
        // may still set its flag, and then PinnedBuffer's constructor disposes the pin it cannot wrap.
        using MachineCall call = _store.Machine.EnterCall();
        Enter();
        try
        {
            return new PinnedBuffer(_store.Process.Pin(Address, (ulong)Length, writable), Length);
        }
        finally
        {
            Leave();
        }
    }

    /// <summary>
    /// Unmaps the buffer: its pages go back to the machine (a merged page when its last mapping goes).
    /// Waits for operations in flight on other threads. Idempotent; a no-op after the machine's Dispose.
    /// Pins taken before stay valid until they are disposed (they hold their frames).
    /// </summary>
    public void Dispose()
    {
        if (Interlocked.Or(ref _state, DisposedBit) < 0)
            return;
        WaitForOperations();
        _store.Release(this);
    }

    /// <summary>The store's Dispose: no operation may start or still run; the store's exit unmaps everything.</summary>
    internal void Close()
    {
        Interlocked.Or(ref _state, DisposedBit);
        WaitForOperations();
    }

    /// <summary>Starts an operation (see the file overview), or throws if the buffer is disposed.</summary>
    internal void Enter()
    {
        if (_store.Machine.IsDisposed)
            throw new ObjectDisposedException(nameof(Machine), $"the machine ({_store.Machine}) of {this} was disposed");
        int state = Volatile.Read(ref _state);
        while (true)
        {
            ObjectDisposedException.ThrowIf(state < 0, this);
            int seen = Interlocked.CompareExchange(ref _state, state + 1, state);
            if (seen == state)
                return;
            state = seen;
        }
    }

    /// <summary>Starts an operation unless the buffer is disposed.</summary>
    internal bool TryEnter()
    {
        if (_store.Machine.IsDisposed)
            return false;
        int state = Volatile.Read(ref _state);
        while (state >= 0)
        {
            int seen = Interlocked.CompareExchange(ref _state, state + 1, state);
            if (seen == state)
                return true;
            state = seen;
        }
        return false;
    }

    internal void Leave() => Interlocked.Decrement(ref _state);

    private void WaitForOperations()
    {
        // Operations are short (one copy through the access protocol), so a spin is the right wait.
        var spin = new SpinWait();
        while ((Volatile.Read(ref _state) & ~DisposedBit) != 0)
            spin.SpinOnce();
    }

    private void CheckRange(long offset, int count, string spanName)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(offset, Length);
        if (count > Length - offset)
            throw new ArgumentOutOfRangeException(spanName, count, $"{count} bytes at offset {offset} run past the end of the buffer ({Length} bytes)");
    }

    /// <inheritdoc/>
    public override string ToString() => $"VmmBuffer 0x{Address:x} ({Length} bytes)";
}
