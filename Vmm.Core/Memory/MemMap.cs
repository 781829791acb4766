// MemMap: the array of frame descriptors (Linux's mem_map / vmemmap) and the operations on them.
//
// The array is unmanaged, one 64-byte PageDescriptor per frame of the arena, indexed by pfn. Like
// Linux's sparse memmap (SPARSEMEM_VMEMMAP) it is *reserved* for the whole arena at once, with
// mmap(MAP_NORESERVE), so an untouched descriptor costs no host memory, and it is initialised one
// section at a time on first use (Linux's deferred struct page init): a section is 2^MaxOrder frames
// (one max-order buddy block, 4 MiB of arena, 64 KiB of descriptors; smaller when memory blocks are
// smaller). Until its section is initialised a descriptor must not be read: its bytes are zero on
// Linux and garbage on the portable fallback, and reading would commit nothing useful. Whoever walks
// pfns asks IsInitialised first (PageAllocator.GetBlockInfo, Machine.GetPageInfo, Audit); the
// allocator hands out only frames of initialised sections, so every pfn reached through a page table,
// a free list or a reference is initialised. A never-initialised frame is free, never touched (reads
// zero), and belongs to its zone's deferred pages.
//
// Flag operations follow each flag's compound policy (PageFlags.cs); the atomic ones use Interlocked on
// the descriptor in place, so any thread that holds a reference to a frame (or the frame's zone lock,
// for free frames) may use them.
//
// Locking: who writes each descriptor field under which lock is on the fields (PageDescriptor.cs);
// initialising a section runs under the zone lock of its zone, and the section bit is published after
// the descriptors (Interlocked.Or), so a lock-free IsInitialised reader sees initialised descriptors.
using System.Diagnostics;
using System.Runtime.CompilerServices;
using Vmm.Native;

namespace Vmm.Memory;

/// <summary>The frame descriptors of a machine and the flag, reference and compound operations on them.</summary>
internal sealed unsafe class MemMap : IDisposable
{
    private readonly ArenaHandle _reservation;
    private PageDescriptor* _pages;
    private readonly ulong[] _sectionInitialised; // one bit per section; set once, under the section's zone lock
    private long _initialisedSections;            // atomic

    /// <summary>Reserves (commits nothing) descriptors for <paramref name="frameCount"/> frames, in sections of 2^<paramref name="sectionShift"/> frames.</summary>
    /// <param name="frameCount">frames of the arena.</param>
    /// <param name="sectionShift">log2 of the frames per section (see <see cref="SectionShiftFor"/>).</param>
    /// <param name="forcePortable">use the committed heap fallback even on Linux (as the arena does).</param>
    /// <exception cref="ArgumentOutOfRangeException">no frames, or frames not a whole number of sections.</exception>
    /// <exception cref="ArenaException">the host refused the reservation.</exception>
    public MemMap(long frameCount, int sectionShift, bool forcePortable = false)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(frameCount, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(sectionShift);
        if ((frameCount & ((1L << sectionShift) - 1)) != 0)
            throw new ArgumentOutOfRangeException(nameof(frameCount), frameCount, $"not a whole number of sections of {1L << sectionShift} frames");
        FrameCount = frameCount;
        SectionShift = sectionShift;
        SectionCount = frameCount >> sectionShift;
        _sectionInitialised = new ulong[(SectionCount + 63) >> 6];
        _reservation = ArenaHandle.Reserve((nuint)(frameCount * PageDescriptor.Size), forcePortable, clearPortable: false);
        _reservation.AdviseNoHugePages(); // sections commit 64 KiB at a time: a huge page would commit 2 MiB per touch
        _pages = (PageDescriptor*)_reservation.DangerousGetHandle();
        Trace = Vmm.Diagnostics.FrameTrace.CreateIfEnabled(frameCount);
    }

    /// <summary>The per-frame event history (VMM_FRAME_TRACE=1), or null.</summary>
    internal readonly Vmm.Diagnostics.FrameTrace? Trace;

    /// <summary>The section shift for a topology: 2^MaxOrder frames, or one memory block if that is smaller.</summary>
    public static int SectionShiftFor(Topology topology) =>
        Math.Min(PageAllocator.MaxOrder, System.Numerics.BitOperations.Log2((ulong)topology.FramesPerBlock));

    /// <summary>Where the descriptor array starts in the host's address space (for tests that read /proc/self/smaps).</summary>
    public nint BaseAddress => (nint)_pages;

    /// <summary>Frames described.</summary>
    public long FrameCount { get; }

    /// <summary>log2 of the frames per section.</summary>
    public int SectionShift { get; }

    /// <summary>Frames per section.</summary>
    public long FramesPerSection => 1L << SectionShift;

    /// <summary>Sections of the memmap.</summary>
    public long SectionCount { get; }

    /// <summary>True once the descriptors have been released.</summary>
    public bool IsDisposed => _pages == null;

    /// <summary>Bytes of address space reserved for the descriptors (all frames).</summary>
    public long ReservedBytes => FrameCount * PageDescriptor.Size;

    /// <summary>Bytes of descriptors initialised, and so committed (host memory): initialised sections x their descriptors.</summary>
    public long CommittedBytes => Volatile.Read(ref _initialisedSections) * (FramesPerSection * PageDescriptor.Size);

    /// <summary>Sections whose descriptors have been initialised.</summary>
    public long InitialisedSections => Volatile.Read(ref _initialisedSections);

    /// <summary>The section that holds <paramref name="pfn"/>.</summary>
    public long SectionOf(long pfn) => pfn >> SectionShift;

    /// <summary>True if the descriptors of <paramref name="section"/> have been initialised (and may be read).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool IsSectionInitialised(long section) =>
        (Volatile.Read(ref _sectionInitialised[section >> 6]) & (1UL << (int)(section & 63))) != 0;

    /// <summary>True if the descriptor of <paramref name="pfn"/> has been initialised (and may be read).</summary>
    public bool IsInitialised(long pfn) => IsSectionInitialised(pfn >> SectionShift);

    /// <summary>
    /// sparse_init_one_section / memmap_init_range: writes the descriptors of one section as those of
    /// free, never-touched frames (PG_zeroed: a fresh anonymous mapping reads zeros; no references, no
    /// mappings, no links), committing their host memory, then marks the section initialised. The
    /// caller then hands the frames to the buddy lists (PageAllocator.InitSectionLocked). Called by the
    /// allocator when a zone grows into a deferred section and, when memory hot-add exists, by hot-add
    /// for each section of an added block: it is the one place descriptors come to life.
    /// Preconditions: the zone lock of the section's zone held (checked by the one caller,
    /// PageAllocator.InitSectionLocked: the memmap does not know the zones); the section not initialised.
    /// </summary>
    /// <exception cref="VmBugException">the section was already initialised.</exception>
    public void InitSection(long section)
    {
        if (IsSectionInitialised(section))
            throw new VmBugException($"memmap section {section} initialised twice");
        long start = section << SectionShift;
        long end = start + FramesPerSection;
        for (long pfn = start; pfn < end; pfn++)
        {
            ref PageDescriptor page = ref _pages[pfn];
            page = default; // the portable reservation is not cleared
            page.Flags = (ulong)PageFlags.Zeroed;
            page.MapCount = -1;
            page.LruNext = PageDescriptor.NoLink;
            page.LruPrev = PageDescriptor.NoLink;
            Trace?.Record(pfn, Vmm.Diagnostics.FrameEvent.SectionInit);
        }
        // Publish after the descriptors are written (Interlocked is a full fence): a reader that sees
        // the bit reads initialised descriptors. Sections of different zones share a word, so Or.
        Interlocked.Or(ref _sectionInitialised[section >> 6], 1UL << (int)(section & 63));
        Interlocked.Increment(ref _initialisedSections);
    }

    /// <summary>
    /// The reverse of <see cref="InitSection"/>, for memory offline (Linux keeps the memmap of an offline
    /// section until the memory is removed; Vmm gives it back at once, since online initialises sections
    /// lazily anyway): marks the section not initialised, then gives its descriptors' host memory back.
    /// A lock-free reader that checked IsInitialised just before reads zeros (or stale values on the
    /// portable fallback) from a frame nobody can reach any more: no page table, list or stable node
    /// names a frame of an offline block (the offline removed or pruned every one first).
    /// Preconditions: the block of the section is offline (under the zone lock's protection no more:
    /// nothing links to its frames); the section is initialised.
    /// </summary>
    /// <exception cref="VmBugException">the section was not initialised.</exception>
    public void DeinitSection(long section)
    {
        if (!IsSectionInitialised(section))
            throw new VmBugException($"memmap section {section} de-initialised while not initialised");
        Interlocked.And(ref _sectionInitialised[section >> 6], ~(1UL << (int)(section & 63)));
        Interlocked.Decrement(ref _initialisedSections);
        byte* start = (byte*)(_pages + (section << SectionShift));
        nuint length = (nuint)(FramesPerSection * PageDescriptor.Size);
        // Best effort, as Arena.Decommit: a refusal keeps the descriptors committed; InitSection rewrites them.
        if (_reservation.IsMapped)
            _ = Vmm.Native.Interop.Libc.madvise((nint)start, length, Vmm.Native.Interop.Libc.MADV_DONTNEED);
    }

    /// <summary>The descriptor of a frame, by reference.</summary>
    public ref PageDescriptor this[long pfn]
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get
        {
            Debug.Assert((ulong)pfn < (ulong)FrameCount && IsInitialised(pfn), "pfn out of range or in a section never initialised");
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

    /// <summary>Releases the descriptors (unmaps the reservation).</summary>
    public void Dispose()
    {
        if (_pages != null)
        {
            _pages = null;
            _reservation.Dispose();
        }
    }
}
