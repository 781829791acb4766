// PinnedSequence: a ReadOnlySequence<byte> over pinned arena frames, without copying.
// Locking: none; the pin holds the frames, and a segment checks the pin's and the machine's disposed
// flags each time its Span is asked for.
//
// A pinned range is a list of frames in virtual-page order. Frames with consecutive numbers are
// adjacent in the arena (FrameAddress(pfn) = base + pfn x 4096), so each run of consecutive frames
// becomes one segment: a buffer whose pages came from the buddy allocator in order reads as a handful of
// segments, and the worst case (scattered frames) is one segment per page.
//
// Each segment's memory comes from a FrameRunManager (a MemoryManager<byte> over unmanaged memory).
// ReadOnlyMemory<byte>.Span asks the manager every time, so once the owning pin is disposed every
// later .Span (through the sequence or any ReadOnlyMemory taken from it) throws ObjectDisposedException
// instead of reading frames the pin no longer holds. A span taken before Dispose cannot be recalled:
// that is the same contract as MemoryPool's memory.
using System.Buffers;

namespace Vmm.Mm;

/// <summary>Builds the sequence of a pin. Immutable once built.</summary>
internal static unsafe class PinnedSequence
{
    /// <summary>The largest segment: MemoryManager lengths are ints; 1 GiB keeps them far from the limit.</summary>
    private const int MaxSegmentBytes = 1 << 30;

    /// <summary>
    /// The bytes [<paramref name="address"/>, + <paramref name="length"/>) of pinned pages whose frames are
    /// <paramref name="frames"/> (one per virtual page, the first page containing <paramref name="address"/>).
    /// </summary>
    /// <param name="arena">where the frames live.</param>
    /// <param name="frames">the pinned frames, in virtual-page order.</param>
    /// <param name="address">the first pinned byte (need not be page-aligned).</param>
    /// <param name="length">pinned bytes.</param>
    /// <param name="isDisposed">the pin's state: every span request checks it.</param>
    public static ReadOnlySequence<byte> Create(Native.Arena arena, long[] frames, ulong address, ulong length, Func<bool> isDisposed)
    {
        if (frames.Length == 0 || length == 0)
            return ReadOnlySequence<byte>.Empty;
        ulong pageSize = AddressSpace.PageSize;
        ulong offsetInFirst = address & AddressSpace.PageMask;
        Segment? first = null, last = null;
        ulong remaining = length;
        int i = 0;
        while (i < frames.Length && remaining > 0)
        {
            // Extend a run while the next frame follows this one in the arena.
            ulong skip = i == 0 ? offsetInFirst : 0;
            byte* start = arena.FrameAddress(frames[i]) + skip;
            ulong runBytes = Math.Min(pageSize - skip, remaining);
            int j = i + 1;
            while (j < frames.Length && frames[j] == frames[j - 1] + 1 && runBytes < remaining && runBytes + pageSize <= MaxSegmentBytes)
            {
                runBytes += Math.Min(pageSize, remaining - runBytes);
                j++;
            }
            var manager = new FrameRunManager(start, (int)runBytes, isDisposed);
            var segment = new Segment(manager.Memory, last is null ? 0 : last.RunningIndex + last.Memory.Length);
            if (last is null)
                first = segment;
            else
                last.SetNext(segment);
            last = segment;
            remaining -= runBytes;
            i = j;
        }
        return new ReadOnlySequence<byte>(first!, 0, last!, last!.Memory.Length);
    }

    private sealed class Segment : ReadOnlySequenceSegment<byte>
    {
        public Segment(ReadOnlyMemory<byte> memory, long runningIndex)
        {
            Memory = memory;
            RunningIndex = runningIndex;
        }

        public void SetNext(Segment next) => Next = next;
    }

    /// <summary>A run of adjacent pinned frames as Memory; valid while the pin is.</summary>
    private sealed class FrameRunManager : MemoryManager<byte>
    {
        private readonly byte* _start;
        private readonly int _length;
        private readonly Func<bool> _isDisposed;

        public FrameRunManager(byte* start, int length, Func<bool> isDisposed)
        {
            _start = start;
            _length = length;
            _isDisposed = isDisposed;
        }

        public override Span<byte> GetSpan()
        {
            // Why a check per call: the frames belong to the pin, and after unpinning they may be
            // merged, migrated or freed and reused; reading them then would be reading someone else's page.
            ObjectDisposedException.ThrowIf(_isDisposed(), this);
            return new Span<byte>(_start, _length);
        }

        public override MemoryHandle Pin(int elementIndex = 0)
        {
            ObjectDisposedException.ThrowIf(_isDisposed(), this);
            ArgumentOutOfRangeException.ThrowIfNegative(elementIndex);
            ArgumentOutOfRangeException.ThrowIfGreaterThan(elementIndex, _length);
            // Already fixed in unmanaged memory: nothing to do on unpin.
            return new MemoryHandle(_start + elementIndex);
        }

        public override void Unpin()
        {
        }

        protected override void Dispose(bool disposing)
        {
            // The pin owns the frames; this manager owns nothing.
        }
    }
}
