// PinnedBuffer: a VmmBuffer's pages pinned for zero-copy host access (a thin owner of PinnedMemory).
//
// Why pins and not raw frame pointers: a frame that is not pinned can be merged by KSM, migrated or
// reclaimed at any moment, and its bytes would then belong to someone else. A pin holds a reference and
// a pin count on each page, which every such mechanism checks; KSM's write-protect step refuses a page
// whose references are not all explained by mappings, so a pinned page is never merged. The price is
// that a long-lived pin keeps its pages out of deduplication: pin, use, dispose.
//
// Short-term, not long-term (FOLL_LONGTERM), on purpose. A buffer pin is the host reading or writing the
// bytes in place and letting go, like O_DIRECT I/O, for which Linux uses short-term pins too. A long-term
// pin would copy every page of the buffer that lies in ZONE_MOVABLE (where user pages go first) to
// ZONE_NORMAL on every pin, about the cost of reading the buffer, and leave the pages there after the
// unpin, filling the zone that page tables and other unmovable memory need. The price of the short pin:
// a memory offline of a ZONE_MOVABLE block waits (and, with its passes bounded, gives up with EBUSY)
// while the pin is held. A host that keeps a buffer pinned indefinitely pins it long-term itself through
// the store's process (VmProcess.Pin with longTerm), as VmmBuffer.Pin's remarks say.
//
// Locking: none of its own; pinning and unpinning are PinnedMemory's (AddressSpace.Pin.cs).
using System.Buffers;

namespace Vmm;

/// <summary>
/// The pinned pages of a <see cref="VmmBuffer"/> (<see cref="VmmBuffer.Pin"/>): the bytes as a
/// <see cref="ReadOnlySequence{T}"/> and as one span per page, valid until <see cref="Dispose"/>.
/// KSM never merges a pinned page, so keep pins short.
/// </summary>
/// <remarks>
/// <para>Lifetime: the sequence and the spans must not outlive this pin (nor the machine). After
/// <see cref="Dispose"/> or the machine's, every member that hands them out throws
/// <see cref="ObjectDisposedException"/>, and so does reading a segment of a sequence taken earlier; a
/// span taken earlier cannot be recalled (it reads zeros once the machine is gone, never unmapped memory,
/// and with <see cref="MachineOptions.PoisonFreedFrames"/> a write into a frame freed meanwhile is
/// reported when the frame is reused). Dispose is idempotent, and a no-op after the machine's.</para>
/// <para>Not thread-safe with respect to <see cref="Dispose"/>: every other member, and the spans and
/// sequence it hands out, may be used concurrently from multiple threads, but Dispose must not race with
/// them (a span taken before Dispose points at frames the pin no longer holds). Concurrent Disposes are
/// harmless.</para>
/// </remarks>
public sealed class PinnedBuffer : IDisposable
{
    private readonly PinnedMemory _pin;
    private readonly ReadOnlySequence<byte> _sequence;
    private volatile bool _disposed;

    internal PinnedBuffer(PinnedMemory pin, long length)
    {
        _pin = pin;
        Length = length;
        try
        {
            _sequence = pin.AsSequence();
        }
        catch
        {
            // Why: VmmBuffer.Pin's machine call only keeps Dispose from freeing, not from setting its flag, so
            // AsSequence may refuse (ObjectDisposedException). The pin would then be dropped undisposed, and its
            // hold on the arena would keep a disposed machine's range reserved until a GC ran its finalizer.
            // Still inside the call, its Dispose unpins and lets go at once.
            pin.Dispose();
            throw;
        }
    }

    /// <summary>Bytes pinned: the whole buffer.</summary>
    public long Length { get; }

    /// <summary>Pages pinned; page i holds bytes [i x 4096, (i + 1) x 4096) of the buffer.</summary>
    public int PageCount => _pin.PageCount;

    /// <summary>True if the pin allows writes through <see cref="GetSpan"/>.</summary>
    public bool Writable => _pin.Writable;

    /// <summary>
    /// The pinned bytes in order, without copying: one segment per run of physically adjacent frames.
    /// After <see cref="Dispose"/> (or the machine's), reading a segment's span throws <see cref="ObjectDisposedException"/>.
    /// </summary>
    /// <exception cref="ObjectDisposedException">after Dispose, or after the machine's.</exception>
    public ReadOnlySequence<byte> AsSequence()
    {
        ObjectDisposedException.ThrowIf(IsDisposed, this);
        _pin.ThrowIfDisposed();
        return _sequence;
    }

    /// <summary>True once <see cref="Dispose"/> has run.</summary>
    public bool IsDisposed => _disposed;

    /// <summary>The bytes of page <paramref name="page"/> (the last page may be shorter than 4096).</summary>
    /// <exception cref="ArgumentOutOfRangeException">no such page.</exception>
    /// <exception cref="ObjectDisposedException">after Dispose, or after the machine's.</exception>
    public ReadOnlySpan<byte> GetReadOnlySpan(int page)
    {
        CheckPage(page);
        return _pin.GetReadOnlySpan(page);
    }

    /// <summary>The writable bytes of page <paramref name="page"/> (the last page may be shorter than 4096).</summary>
    /// <exception cref="InvalidOperationException">the buffer was pinned read-only.</exception>
    /// <exception cref="ArgumentOutOfRangeException">no such page.</exception>
    /// <exception cref="ObjectDisposedException">after Dispose, or after the machine's.</exception>
    public Span<byte> GetSpan(int page)
    {
        CheckPage(page);
        return _pin.GetSpan(page);
    }

    /// <summary>An out-of-range page is an argument error naming <c>page</c> (not the pin's own <c>index</c>).</summary>
    private void CheckPage(int page)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(page);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(page, PageCount);
    }

    /// <summary>Unpins every page; KSM may merge them again from its next visit. Idempotent; a no-op after the machine's Dispose.</summary>
    public void Dispose()
    {
        _disposed = true;
        _pin.Dispose();
    }
}
