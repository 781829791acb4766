// Arena: the "physical memory" of the machine.
//
// One anonymous mapping, reserved with MAP_NORESERVE so that nothing is committed until a frame is
// touched. Decommit (madvise MADV_DONTNEED) hands the host memory of a run of frames back to the
// operating system: the host's RSS falls at once and the next touch reads zeros. Off Linux the arena
// is an ordinary aligned heap block; decommit then only zeroes (the memory stays committed).
// Locking: none; the arena never decides who owns a frame (the allocator does, under its locks), and
// the pin count on its handle is atomic.
//
// Pins outlive nothing, but a host may hold a span of a pin when the machine is disposed. Each pin
// holds a reference on the arena's handle (SafeHandle's count): Dispose with pins still held gives the
// memory back (MADV_DONTNEED on the whole range) but leaves the range mapped, and the last pin's
// release unmaps it. A stale span then reads zeros instead of touching unmapped memory (or memory the
// runtime mapped there since). The portable heap arena keeps its block (zeroing it could cost more
// than the host saves) until then.
using Vmm.Native.Interop;

namespace Vmm.Native;

/// <summary>The native memory behind every frame. Owns it; <see cref="Dispose"/> releases it.</summary>
internal sealed unsafe class Arena : IDisposable
{
    private readonly ArenaHandle _handle;
    private readonly byte* _base;
    private int _pins; // references taken by AddPinReference and not yet released. Atomic.

    /// <summary>Reserves an arena for <paramref name="topology"/>.</summary>
    /// <param name="topology">the shape of the memory.</param>
    /// <param name="forcePortable">use the heap fallback even on Linux (for tests of that path).</param>
    /// <exception cref="ArenaException">the host refused the reservation.</exception>
    public Arena(Topology topology, bool forcePortable = false)
    {
        ArgumentNullException.ThrowIfNull(topology);
        Topology = topology;
        _handle = ArenaHandle.Reserve((nuint)topology.TotalBytes, forcePortable);
        _base = (byte*)_handle.DangerousGetHandle();
    }

    /// <summary>The shape of the memory.</summary>
    public Topology Topology { get; }

    /// <summary>True when decommitted memory really leaves the host process (an mmap'd arena).</summary>
    public bool ReturnsMemoryToHost => _handle.IsMapped;

    /// <summary>The first byte of frame 0.</summary>
    public byte* Base
    {
        get
        {
            ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
            return _base;
        }
    }

    /// <summary>The first byte of a frame. No bounds check beyond a Debug assertion: this is the hot path.</summary>
    public byte* FrameAddress(long pfn)
    {
        System.Diagnostics.Debug.Assert(Topology.IsValidPfn(pfn), "pfn out of range");
        return _base + (pfn << Topology.PageShift);
    }

    /// <summary>The frame that holds <paramref name="address"/>, or -1 if it lies outside the arena.</summary>
    public long PfnOf(byte* address)
    {
        long offset = address - _base;
        return (ulong)offset < (ulong)Topology.TotalBytes ? offset >> Topology.PageShift : -1;
    }

    /// <summary>
    /// Gives the host memory of <paramref name="count"/> frames from <paramref name="pfn"/> back to the
    /// operating system. Their contents are lost: they read as zeros afterwards.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">the run leaves the arena.</exception>
    /// <exception cref="ArenaException">the host refused.</exception>
    public void Decommit(long pfn, long count)
    {
        CheckRun(pfn, count);
        if (count == 0)
            return;
        byte* start = FrameAddress(pfn);
        nuint length = (nuint)(count << Topology.PageShift);
        if (_handle.IsMapped)
        {
            if (Libc.madvise((nint)start, length, Libc.MADV_DONTNEED) != 0)
                throw new ArenaException($"madvise(DONTNEED) failed (errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()})");
        }
        else
        {
            System.Runtime.InteropServices.NativeMemory.Clear(start, length);
        }
    }

    /// <summary>
    /// Makes a run of frames resident again. Touching a decommitted frame also recommits it (it
    /// reads zeros); this call only does it ahead of time when <paramref name="populate"/> is true.
    /// </summary>
    /// <returns>True if the memory was prefaulted.</returns>
    public bool Recommit(long pfn, long count, bool populate)
    {
        CheckRun(pfn, count);
        if (!populate || count == 0 || !_handle.IsMapped)
            return false;
        byte* start = FrameAddress(pfn);
        nuint length = (nuint)(count << Topology.PageShift);
        if (Libc.madvise((nint)start, length, Libc.MADV_POPULATE_WRITE) == 0)
            return true;
        // Older kernels lack MADV_POPULATE_WRITE: touch one byte per frame instead (the value is
        // already zero, so writing zero changes nothing but commits the page).
        for (long i = 0; i < count; i++)
            Volatile.Write(ref start[i << Topology.PageShift], start[i << Topology.PageShift]);
        return true;
    }

    private void CheckRun(long pfn, long count)
    {
        ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
        if (pfn < 0 || count < 0 || pfn > Topology.TotalFrames - count)
            throw new ArgumentOutOfRangeException(nameof(count), $"frames [{pfn}, {pfn}+{count}) leave the arena of {Topology.TotalFrames} frames");
    }

    /// <summary>
    /// A pin's hold on the address range: it stays mapped until the reference is released, even after
    /// <see cref="Dispose"/>. Preconditions: the arena is not disposed (pins are made inside machine calls).
    /// </summary>
    public void AddPinReference()
    {
        bool added = false;
        _handle.DangerousAddRef(ref added);
        Interlocked.Increment(ref _pins);
    }

    /// <summary>Holds taken by <see cref="AddPinReference"/> and not released (for tests).</summary>
    public int PinReferences => Volatile.Read(ref _pins);

    /// <summary>True once the native memory itself is released: disposed, and no pin holds it.</summary>
    public bool IsReleased => _handle.IsClosed && Volatile.Read(ref _pins) == 0;

    /// <summary>Releases a hold taken by <see cref="AddPinReference"/>; the last one after Dispose unmaps the arena.</summary>
    public void ReleasePinReference()
    {
        Interlocked.Decrement(ref _pins);
        _handle.DangerousRelease();
    }

    /// <summary>
    /// Releases the native memory. Every pointer into the arena is invalid afterwards, except those of
    /// pins still held (<see cref="AddPinReference"/>): the memory then goes back to the host at once, and
    /// the range is unmapped when the last pin lets go.
    /// </summary>
    public void Dispose()
    {
        if (_handle.IsClosed)
            return;
        if (Volatile.Read(ref _pins) > 0 && _handle.IsMapped)
            Libc.madvise((nint)_base, _handle.Length, Libc.MADV_DONTNEED); // best effort: a failure only keeps the memory until the unmap
        _handle.Dispose();
    }
}
