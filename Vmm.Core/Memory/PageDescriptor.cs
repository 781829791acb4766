// PageDescriptor: one frame's descriptor, Vmm's struct page (Linux's include/linux/mm_types.h).
//
// 64 bytes, one cache line, in the unmanaged memmap (MemMap.cs), indexed by pfn. Each field below says
// who writes it and under what, as mm_types.h does; docs/architecture.md ("Frame descriptors") has the
// same as a table. "The owner" is the one thread that holds a frame nobody else can reach: the
// allocator between taking it off a free list and publishing refcount 1, the freeing thread after the
// last put, or a mechanism's new page before it is mapped or cached. Anyone else reads a descriptor
// only with a reference (or, for a free frame, the zone lock); a holder of a bare pfn takes one with
// MemMap.TryGetPageUnlessZero and re-validates.
//
// Locking: per field, below; the lock order is docs/locking.md's.
using System.Runtime.InteropServices;

namespace Vmm.Memory;

/// <summary>
/// One frame's descriptor: Vmm's <c>struct page</c>. Exactly 64 bytes, one cache line, kept in the
/// unmanaged memmap (no managed object per frame). Fields are read and written through
/// <see cref="MemMap"/>; each field's docs say who writes it and under which lock.
/// </summary>
[StructLayout(LayoutKind.Explicit, Size = Size)]
internal struct PageDescriptor
{
    /// <summary>Bytes per descriptor.</summary>
    public const int Size = 64;

    /// <summary>A link value meaning "no frame".</summary>
    public const uint NoLink = uint.MaxValue;

    /// <summary>Low bits of <see cref="Mapping"/> that tag what it points at (Linux's PAGE_MAPPING_*).</summary>
    public const ulong MappingTagMask = 3;

    /// <summary>Tag: Mapping holds an anon_vma handle (PAGE_MAPPING_ANON).</summary>
    public const ulong MappingAnon = 1;

    /// <summary>Tag: Mapping holds a movable-ops owner handle (PAGE_MAPPING_MOVABLE).</summary>
    public const ulong MappingMovable = 2;

    /// <summary>Tag: Mapping holds a KSM stable node handle (PAGE_MAPPING_KSM = ANON | MOVABLE).</summary>
    public const ulong MappingKsm = 3;

    /// <summary>PageFlags bits (8 B). Atomic (Interlocked.Or / And through MemMap) for anyone holding a
    /// reference; PG_locked is the page lock itself (PageLock). Plain stores only where nobody holds a
    /// reference: the freeing thread, the buddy state of a free frame (PG_buddy, PG_reported) under the
    /// zone lock, section init.</summary>
    [FieldOffset(0)] public ulong Flags;

    /// <summary>_refcount (4 B): references to the frame; 0 when free. Atomic (get, put,
    /// get-unless-zero); the allocator publishes 1 last, after resetting the descriptor; the last put frees.</summary>
    [FieldOffset(8)] public int RefCount;

    /// <summary>_mapcount (4 B) with Linux's bias: -1 means mapped by no page table. Atomic. Raised
    /// under that PTE table's pte lock by whoever installs a PTE of the frame (fault, fork, KSM replace,
    /// migration restore; set to 0 by the owner for a new page's first mapping). Lowered by whoever
    /// cleared a PTE: KSM replace under the pte lock, zap and copy-on-write after the clear, once the pte
    /// lock is released; so a reader may briefly count a mapping that is already gone, and the decisions
    /// that read it (copy-on-write reuse, KSM's reference check) then err towards "shared".</summary>
    [FieldOffset(12)] public int MapCount;

    /// <summary>The tagged mapping word (8 B): handle &lt;&lt; 2 | tag (see MappingAnon and friends).
    /// Written by the owner of a new page (the anonymous fault under the pte lock before it maps it, the
    /// shmem fault under the object's lock, migration's new frame under its page lock), by KSM under the
    /// page lock and the ksm thread mutex (Volatile.Write; lock-free readers use Volatile.Read), cleared by
    /// the freeing thread.</summary>
    [FieldOffset(16)] public ulong Mapping;

    /// <summary>index (8 B): page offset in its mapping (for anon pages, the linear page index), written
    /// with <see cref="Mapping"/> by the same writers. For a free block: the free list's migratetype,
    /// under the zone lock.</summary>
    [FieldOffset(24)] public ulong Index;

    /// <summary>lru.next (4 B): next frame on the list this frame is on, or NoLink. The list's lock
    /// protects it: a free frame's buddy free list (the zone lock) or pcp list (its spin word); a user
    /// page's LRU list (inactive, active, or the isolated list of its node's lruvec: that lruvec's
    /// lru_lock, Memory/Lru.cs). A page in use on no list (in an add batch, a page table, the zero page)
    /// leaves it NoLink or stale; nobody reads it then.</summary>
    [FieldOffset(32)] public uint LruNext;

    /// <summary>lru.prev (4 B): previous frame on the list, or NoLink. Protected like <see cref="LruNext"/>.</summary>
    [FieldOffset(36)] public uint LruPrev;

    /// <summary>private (8 B): buddy order of a free block (under the zone lock); for a PTE-table frame,
    /// the pte lock's spin word itself (0 free; held: 1 in Release, the holder's managed thread id in Debug;
    /// Linux's split ptlock in ptdesc), cleared when the
    /// table is freed; later the swap entry of a swap-cache page. Cleared by the freeing thread.</summary>
    [FieldOffset(40)] public ulong Private;

    /// <summary>For a tail frame: the head's pfn (4 B). Written by the allocator while it owns the block.</summary>
    [FieldOffset(48)] public uint CompoundHead;

    /// <summary>For a head frame: the compound order (1 B). Written by the allocator while it owns the block.</summary>
    [FieldOffset(52)] public byte CompoundOrder;

    /// <summary>Reserved for later use (3 B).</summary>
    [FieldOffset(53)] public byte Reserved0;

    /// <summary>Reserved for later use.</summary>
    [FieldOffset(54)] public ushort Reserved1;

    /// <summary>_pincount (4 B): FOLL_PIN-style pins; each also holds one reference. Atomic; a pin is
    /// taken under the pte lock of the PTE it pins through (so a decision made under that lock, the
    /// copy-on-write reuse check, KSM's write-protect, the migrator's unmap, sees it) and dropped without a lock.</summary>
    [FieldOffset(56)] public int PinCount;

    /// <summary>Reserved for later use (4 B).</summary>
    [FieldOffset(60)] public uint Reserved2;
}
