// PinnedMemory: zero-copy host access to a process's pages (Linux's pin_user_pages, FOLL_PIN).
//
// Each pinned page holds one reference and one pin (PinCount), so every mechanism that verifies
// references (migration, KSM, hot-remove) sees it as busy and leaves it alone. Pinning first makes the
// page exclusive to the process (a write fault for write pins, an unshare fault for read pins), so a
// later copy-on-write can never separate the pinned frame from the process: fork copies a pinned page
// for the child instead of sharing it.
//
// AsSequence exposes the pinned bytes as a ReadOnlySequence<byte> without copying (PinnedSequence.cs
// in Buffers/): a pin holds its frames, so the sequence is valid exactly as long as the pin.
using System.Buffers;
using Vmm.Memory;

namespace Vmm.Mm;

/// <summary>Pinned pages of a process, with a span per page. Dispose to unpin.</summary>
public sealed unsafe class PinnedMemory : IDisposable
{
    private readonly Machine _machine;
    private readonly long[] _frames;
    private readonly ulong _address;
    private readonly ulong _length;
    private int _disposed;

    internal PinnedMemory(Machine machine, ulong address, ulong length, long[] frames, bool writable)
    {
        _machine = machine;
        _address = address;
        _length = length;
        _frames = frames;
        Writable = writable;
    }

    /// <summary>Pages pinned.</summary>
    public int PageCount => _frames.Length;

    /// <summary>True if the pin allows writes through <see cref="GetSpan"/>.</summary>
    public bool Writable { get; }

    /// <summary>The bytes of page <paramref name="index"/> that lie in the pinned range.</summary>
    /// <exception cref="InvalidOperationException">a read-only pin (use <see cref="GetReadOnlySpan"/>).</exception>
    /// <exception cref="ObjectDisposedException">after Dispose.</exception>
    public Span<byte> GetSpan(int index)
    {
        if (!Writable)
            throw new InvalidOperationException("the pages were pinned read-only");
        return Slice(index);
    }

    /// <summary>The bytes of page <paramref name="index"/> that lie in the pinned range, read-only.</summary>
    /// <exception cref="ObjectDisposedException">after Dispose.</exception>
    public ReadOnlySpan<byte> GetReadOnlySpan(int index) => Slice(index);

    private Span<byte> Slice(int index)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
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
    /// segment. Valid until <see cref="Dispose"/>; after it, reading a segment's span throws
    /// <see cref="ObjectDisposedException"/>. A read-only pin's memory must not be written through it.
    /// </summary>
    /// <exception cref="ObjectDisposedException">after Dispose.</exception>
    public ReadOnlySequence<byte> AsSequence()
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        return PinnedSequence.Create(_machine.Arena, _frames, _address, _length, () => Volatile.Read(ref _disposed) != 0);
    }

    /// <summary>The frame of page <paramref name="index"/> (for tests and tools).</summary>
    /// <exception cref="ArgumentOutOfRangeException">no such page.</exception>
    public long FrameOf(int index)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(index);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(index, _frames.Length);
        return _frames[index];
    }

    /// <summary>unpin_user_pages: drops every pin and its reference. Idempotent.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        foreach (long pfn in _frames)
        {
            if (Interlocked.Decrement(ref _machine.MemMap[pfn].PinCount) < 0)
                throw new VmBugException($"unpin of frame {pfn} that was not pinned");
            _machine.PutPage(pfn);
        }
    }
}
