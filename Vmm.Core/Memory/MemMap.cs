// MemMap: the array of frame descriptors (Linux's mem_map / vmemmap) and the operations on them.
//
// The array is unmanaged, 64-byte aligned, one PageDescriptor per frame of the arena, including frames
// of offline blocks. Flag operations follow each flag's compound policy (PageFlags.cs); the atomic ones
// use Interlocked on the descriptor in place, so any thread that holds a reference to a frame (or the
// frame's zone lock, for free frames) may use them.
using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Vmm.Memory;

/// <summary>The frame descriptors of a machine and the flag, reference and compound operations on them.</summary>
internal sealed unsafe class MemMap : IDisposable
{
    private PageDescriptor* _pages;

    /// <summary>Allocates zeroed descriptors for <paramref name="frameCount"/> frames.</summary>
    public MemMap(long frameCount)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(frameCount, 1);
        FrameCount = frameCount;
        nuint bytes = (nuint)(frameCount * PageDescriptor.Size);
        _pages = (PageDescriptor*)NativeMemory.AlignedAlloc(bytes, 64);
        NativeMemory.Clear(_pages, bytes);
        for (long pfn = 0; pfn < frameCount; pfn++)
        {
            _pages[pfn].MapCount = -1;
            _pages[pfn].LruNext = PageDescriptor.NoLink;
            _pages[pfn].LruPrev = PageDescriptor.NoLink;
        }
    }

    /// <summary>Frames described.</summary>
    public long FrameCount { get; }

    /// <summary>True once the descriptors have been released.</summary>
    public bool IsDisposed => _pages == null;

    /// <summary>Bytes of native memory the descriptors take.</summary>
    public long SizeBytes => FrameCount * PageDescriptor.Size;

    /// <summary>The descriptor of a frame, by reference.</summary>
    public ref PageDescriptor this[long pfn]
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get
        {
            Debug.Assert((ulong)pfn < (ulong)FrameCount, "pfn out of range");
            return ref _pages[pfn];
        }
    }

    /// <summary>True if <paramref name="pfn"/> has a descriptor.</summary>
    public bool IsValidPfn(long pfn) => (ulong)pfn < (ulong)FrameCount;

    // ---- compound pages ----------------------------------------------------------------------

    /// <summary>The head frame of the compound page that holds <paramref name="pfn"/> (itself if not a tail).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public long CompoundHead(long pfn)
    {
        ref PageDescriptor page = ref this[pfn];
        return (Volatile.Read(ref page.Flags) & (ulong)PageFlags.Tail) != 0 ? page.CompoundHead : pfn;
    }

    /// <summary>True if the frame is a head or a tail of a compound page.</summary>
    public bool IsCompound(long pfn) => (this[pfn].Flags & (ulong)(PageFlags.Head | PageFlags.Tail)) != 0;

    /// <summary>The order of the compound page that holds <paramref name="pfn"/>; 0 for a plain page.</summary>
    public int CompoundOrder(long pfn)
    {
        long head = CompoundHead(pfn);
        return (this[head].Flags & (ulong)PageFlags.Head) != 0 ? this[head].CompoundOrder : 0;
    }

    // ---- flags with their compound policy -----------------------------------------------------

    /// <summary>The flags word of a frame as it is (no policy applied).</summary>
    public PageFlags RawFlags(long pfn) => (PageFlags)Volatile.Read(ref this[pfn].Flags);

    /// <summary>Tests one flag, following its compound policy.</summary>
    /// <exception cref="VmBugException">the policy forbids asking this frame.</exception>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TestFlag(long pfn, PageFlags flag)
    {
        long target = FlagTarget(pfn, flag, modify: false);
        return (Volatile.Read(ref this[target].Flags) & (ulong)flag) != 0;
    }

    /// <summary>Sets one flag atomically, following its compound policy.</summary>
    public void SetFlag(long pfn, PageFlags flag)
    {
        long target = FlagTarget(pfn, flag, modify: true);
        Interlocked.Or(ref this[target].Flags, (ulong)flag);
    }

    /// <summary>Clears one flag atomically, following its compound policy.</summary>
    public void ClearFlag(long pfn, PageFlags flag)
    {
        long target = FlagTarget(pfn, flag, modify: true);
        Interlocked.And(ref this[target].Flags, ~(ulong)flag);
    }

    /// <summary>Sets one flag atomically and returns whether it was already set.</summary>
    public bool TestAndSetFlag(long pfn, PageFlags flag)
    {
        long target = FlagTarget(pfn, flag, modify: true);
        return (Interlocked.Or(ref this[target].Flags, (ulong)flag) & (ulong)flag) != 0;
    }

    /// <summary>Clears one flag atomically and returns whether it was set.</summary>
    public bool TestAndClearFlag(long pfn, PageFlags flag)
    {
        long target = FlagTarget(pfn, flag, modify: true);
        return (Interlocked.And(ref this[target].Flags, ~(ulong)flag) & (ulong)flag) != 0;
    }

    /// <summary>Which frame holds <paramref name="flag"/> for <paramref name="pfn"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private long FlagTarget(long pfn, PageFlags flag, bool modify)
    {
        ulong raw = Volatile.Read(ref this[pfn].Flags);
        // Fast path: a plain (non-compound) page holds all its own flags.
        if ((raw & (ulong)(PageFlags.Head | PageFlags.Tail)) == 0)
            return pfn;
        return CompoundFlagTarget(pfn, flag, modify, (raw & (ulong)PageFlags.Tail) != 0);
    }

    private long CompoundFlagTarget(long pfn, PageFlags flag, bool modify, bool isTail)
    {
        switch (PageFlagPolicies.Of(flag))
        {
            case PageFlagPolicy.Any:
                return pfn;
            case PageFlagPolicy.Head:
                return isTail ? this[pfn].CompoundHead : pfn;
            case PageFlagPolicy.OnlyHead:
                if (isTail)
                    throw new VmBugException($"PG_{flag} asked of tail frame {pfn} (policy: head only)");
                return pfn;
            case PageFlagPolicy.NoTail:
                if (isTail && modify)
                    throw new VmBugException($"PG_{flag} changed through tail frame {pfn} (policy: no tail)");
                return isTail ? this[pfn].CompoundHead : pfn;
            default:
                throw new VmBugException($"PG_{flag} used on compound frame {pfn} (policy: no compound)");
        }
    }

    // ---- references --------------------------------------------------------------------------

    /// <summary>page_ref_count: the references to the (head of the) page.</summary>
    public int RefCount(long pfn) => Volatile.Read(ref this[CompoundHead(pfn)].RefCount);

    /// <summary>page_mapcount: page tables that map the frame (the biased counter plus one).</summary>
    public int MapCount(long pfn) => Volatile.Read(ref this[pfn].MapCount) + 1;

    /// <summary>get_page: takes a reference on a page the caller already holds a reference to.</summary>
    /// <exception cref="VmBugException">the page had no reference (it may be free).</exception>
    public void GetPage(long pfn)
    {
        long head = CompoundHead(pfn);
        if (Interlocked.Increment(ref this[head].RefCount) <= 1)
        {
            Interlocked.Decrement(ref this[head].RefCount); // leave the free frame as it was
            throw new VmBugException($"get_page on frame {head} with no reference");
        }
    }

    /// <summary>
    /// get_page_unless_zero: takes a reference unless the page is free. For holders of a stale pfn
    /// (a scanner, a stable node's kpfn) that must not resurrect a freed frame.
    /// </summary>
    public bool TryGetPageUnlessZero(long pfn)
    {
        ref int count = ref this[CompoundHead(pfn)].RefCount;
        int current = Volatile.Read(ref count);
        while (current > 0)
        {
            int seen = Interlocked.CompareExchange(ref count, current + 1, current);
            if (seen == current)
                return true;
            current = seen;
        }
        return false;
    }

    /// <summary>
    /// put_page_testzero: drops a reference and returns true if it was the last, in which case the
    /// caller must free the page.
    /// </summary>
    /// <exception cref="VmBugException">the reference count would go below zero.</exception>
    public bool PutPageTestZero(long pfn)
    {
        long head = CompoundHead(pfn);
        int now = Interlocked.Decrement(ref this[head].RefCount);
        if (now < 0)
        {
            Interlocked.Increment(ref this[head].RefCount);
            throw new VmBugException($"put_page on free frame {head}");
        }
        return now == 0;
    }

    /// <summary>Releases the descriptors.</summary>
    public void Dispose()
    {
        if (_pages != null)
        {
            NativeMemory.AlignedFree(_pages);
            _pages = null;
        }
    }
}
