// PinnedMemory: zero-copy host access to a process's pages (Linux's pin_user_pages, FOLL_PIN).
// Locking: pinning is AddressSpace.Pin.cs's (mmap_lock for read, the pte lock per page); Dispose drops
// pins atomically and guards against a second Dispose with Interlocked.
//
// Each pinned page holds one reference and one pin (PinCount), so every mechanism that verifies
// references (migration, KSM, hot-remove) sees it as busy and leaves it alone. Pinning first makes the
// page exclusive to the process (a write fault for write pins, an unshare fault for read pins), so a
// later copy-on-write can never separate the pinned frame from the process: fork copies a pinned page
// for the child instead of sharing it.
//
// AsSequence exposes the pinned bytes as a ReadOnlySequence<byte> without copying (PinnedSequence.cs,
// beside this file): a pin holds its frames, so the sequence is valid exactly as long as the pin.
//
// Lifetime. A span handed out (GetSpan, GetReadOnlySpan, a segment of AsSequence) must not outlive the
// pin, nor the machine: it is a raw view of a frame, and once the pin is released the frame may be
// merged, migrated, freed and reused by anyone. Every call that hands one out throws
// ObjectDisposedException after the pin's Dispose or the machine's; the sequence's segments check both
// every time their Span is asked for. A span already taken cannot be recalled, so the pin also holds a
// reference on the arena's address range (Arena.AddPinReference): if the machine is disposed first, the
// range stays mapped (its memory given back, reading zeros) until the pin is disposed, and a stale span
// never touches unmapped memory. There is no finalizer: a span does not keep its pin alive, so a pin
// collected undisposed while the host still uses a span of it must not let the range go. A pin never
// disposed keeps a disposed machine's range reserved for the life of the host process (address space
// only; its memory was given back at Dispose), as it keeps its frames pinned while the machine lives. With MachineOptions.PoisonFreedFrames, a write through a
// stale span into a frame that was freed meanwhile is reported (VmBugException) when the frame is
// allocated again.
using System.Buffers;
using Vmm.Mm;

namespace Vmm;

/// <summary>Pinned pages of a process, with a span per page. Dispose to unpin.</summary>
/// <remarks>
/// <para>Lifetime: a span from <see cref="GetSpan"/>, <see cref="GetReadOnlySpan"/> or
/// <see cref="AsSequence"/> is valid only until this pin is disposed (and while its machine is not):
/// the frames then belong to someone else. Using one later is a host bug that Vmm cannot always catch;
/// what it can, it does: every call here throws <see cref="ObjectDisposedException"/> after either
/// Dispose, a sequence's segments throw it when read, and with
/// <see cref="MachineOptions.PoisonFreedFrames"/> a write into a frame freed meanwhile is reported when the
/// frame is reused. If the machine is disposed while pins are held, their spans read zeros (never
/// unmapped memory) until the pins are disposed.</para>
/// <para>Not thread-safe with respect to <see cref="Dispose"/>: every other member, and the spans and
/// sequence it hands out, may be used concurrently from multiple threads, but Dispose must not race with
/// them (a span taken before Dispose points at frames the pin no longer holds). Dispose is idempotent
/// (concurrent Disposes are harmless), and a no-op after the machine's Dispose (the machine's memory is
/// already gone).</para>
/// </remarks>
public sealed unsafe class PinnedMemory : IDisposable
{
    private readonly Machine _machine;
    private readonly long[] _frames;
    private readonly ulong _address;
    private readonly ulong _length;
    private int _disposed;
    private int _holdsArena; // 1 while this pin holds its reference on the arena's address range. Atomic.

    internal PinnedMemory(Machine machine, ulong address, ulong length, long[] frames, bool writable, bool longTerm)
    {
        _machine = machine;
        _address = address;
        _length = length;
        _frames = frames;
        Writable = writable;
        IsLongTerm = longTerm;
        // Made inside a machine call (VmProcess.Pin), so the arena is not disposed yet.
        machine.Arena.AddPinReference();
        _holdsArena = 1;
        // Audit checks that no page of a live long-term pin lies in ZONE_MOVABLE: it needs to find them.
        if (longTerm)
            machine.LongtermPins.TryAdd(this, 0);
    }

    /// <summary>True once <see cref="Dispose"/> has run, or the machine was disposed.</summary>
    public bool IsDisposed => Volatile.Read(ref _disposed) != 0 || _machine.IsDisposed;

    /// <summary>Pages pinned.</summary>
    public int PageCount => _frames.Length;

    /// <summary>True if the pin allows writes through <see cref="GetSpan"/>.</summary>
    public bool Writable { get; }

    /// <summary>
    /// True for a long-term pin (FOLL_LONGTERM: <see cref="VmProcess.Pin(ulong, ulong, bool, bool)"/> with
    /// <c>longTerm</c>): none of its pages lies in ZONE_MOVABLE, so it never holds up a memory offline.
    /// </summary>
    public bool IsLongTerm { get; }

    /// <summary>The frames pinned, one per page (for Audit).</summary>
    internal ReadOnlySpan<long> Frames => _frames;

    /// <summary>The bytes of page <paramref name="index"/> that lie in the pinned range; valid until the pin is disposed.</summary>
    /// <exception cref="InvalidOperationException">a read-only pin (use <see cref="GetReadOnlySpan"/>).</exception>
    /// <exception cref="ArgumentOutOfRangeException">no such page.</exception>
    /// <exception cref="ObjectDisposedException">after Dispose, or after the machine's.</exception>
    public Span<byte> GetSpan(int index)
    {
        if (!Writable)
            throw new InvalidOperationException("the pages were pinned read-only");
        return Slice(index);
    }

    /// <summary>The bytes of page <paramref name="index"/> that lie in the pinned range, read-only; valid until the pin is disposed.</summary>
    /// <exception cref="ArgumentOutOfRangeException">no such page.</exception>
    /// <exception cref="ObjectDisposedException">after Dispose, or after the machine's.</exception>
    public ReadOnlySpan<byte> GetReadOnlySpan(int index) => Slice(index);

    private Span<byte> Slice(int index)
    {
        ThrowIfDisposed();
        ArgumentOutOfRangeException.ThrowIfNegative(index);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(index, _frames.Length);
        ulong pageStart = (_address & ~AddressSpace.PageMask) + (ulong)index * AddressSpace.PageSize;
        ulong from = Math.Max(pageStart, _address);
        ulong to = Math.Min(pageStart + AddressSpace.PageSize, _address + _length);
        byte* frame = _machine.Arena.FrameAddress(_frames[index]);
        return new Span<byte>(frame + (from - pageStart), (int)(to - from));
    }

    /// <summary>
    /// The pinned bytes as one sequence, without copying: each run of physically adjacent frames is one
    /// segment. Valid until <see cref="Dispose"/> (or the machine's); after it, reading a segment's
    /// span throws <see cref="ObjectDisposedException"/>. A read-only pin's memory must not be written through it.
    /// </summary>
    /// <exception cref="ObjectDisposedException">after Dispose, or after the machine's.</exception>
    public ReadOnlySequence<byte> AsSequence()
    {
        ThrowIfDisposed();
        return PinnedSequence.Create(_machine.Arena, _frames, _address, _length, () => IsDisposed);
    }

    /// <summary>The frame of page <paramref name="index"/> (for tests and tools).</summary>
    /// <exception cref="ArgumentOutOfRangeException">no such page.</exception>
    public long FrameOf(int index)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(index);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(index, _frames.Length);
        return _frames[index];
    }

    /// <summary>Throws if the pin or its machine is disposed.</summary>
    internal void ThrowIfDisposed()
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        if (_machine.IsDisposed)
            throw new ObjectDisposedException(nameof(Machine), $"the machine ({_machine}) of this pin was disposed");
    }

    /// <summary>
    /// unpin_user_pages: drops every pin and its reference. Idempotent; after the machine's Dispose it
    /// only lets go of the arena (the frames went with the machine).
    /// </summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        GC.SuppressFinalize(this);
        if (IsLongTerm)
            _machine.LongtermPins.TryRemove(this, out _);
        if (_machine.TryEnterCall(out MachineCall call))
        {
            using (call)
            {
                foreach (long pfn in _frames)
                {
                    if (Interlocked.Decrement(ref _machine.MemMap[pfn].PinCount) < 0)
                        throw new VmBugException($"unpin of frame {pfn} that was not pinned");
                    _machine.PutPage(pfn);
                }
            }
        }
        ReleaseArena();
    }

    private void ReleaseArena()
    {
        if (Interlocked.Exchange(ref _holdsArena, 0) == 1)
            _machine.Arena.ReleasePinReference();
    }
}
