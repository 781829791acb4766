using System.Runtime.InteropServices;

namespace Vmm.Memory;

/// <summary>
/// One frame's descriptor: Vmm's <c>struct page</c>. Exactly 64 bytes, one cache line, kept in the
/// unmanaged memmap (no managed object per frame). Fields are read and written through
/// <see cref="MemMap"/>; who may touch which field when is described there and in docs/locking.md.
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

    /// <summary>PageFlags bits (8 B). Changed atomically except while the frame is owned exclusively.</summary>
    [FieldOffset(0)] public ulong Flags;

    /// <summary>_refcount (4 B): references to the frame; 0 when free.</summary>
    [FieldOffset(8)] public int RefCount;

    /// <summary>_mapcount (4 B) with Linux's bias: -1 means mapped by no page table.</summary>
    [FieldOffset(12)] public int MapCount;

    /// <summary>The tagged mapping word (8 B): handle &lt;&lt; 2 | tag (see MappingAnon and friends).</summary>
    [FieldOffset(16)] public ulong Mapping;

    /// <summary>index (8 B): page offset in its mapping (for anon pages, the linear page index).
    /// For a free block: the free list's migratetype.</summary>
    [FieldOffset(24)] public ulong Index;

    /// <summary>lru.next (4 B): next frame on the list this frame is on, or NoLink.</summary>
    [FieldOffset(32)] public uint LruNext;

    /// <summary>lru.prev (4 B): previous frame on the list, or NoLink.</summary>
    [FieldOffset(36)] public uint LruPrev;

    /// <summary>private (8 B): buddy order of a free block; swap entry of a swap-cache page; owner data.</summary>
    [FieldOffset(40)] public ulong Private;

    /// <summary>For a tail frame: the head's pfn (4 B).</summary>
    [FieldOffset(48)] public uint CompoundHead;

    /// <summary>For a head frame: the compound order (1 B).</summary>
    [FieldOffset(52)] public byte CompoundOrder;

    /// <summary>Reserved for later use (3 B).</summary>
    [FieldOffset(53)] public byte Reserved0;

    /// <summary>Reserved for later use.</summary>
    [FieldOffset(54)] public ushort Reserved1;

    /// <summary>_pincount (4 B): FOLL_PIN-style pins; each also holds one reference.</summary>
    [FieldOffset(56)] public int PinCount;

    /// <summary>Reserved for later use (4 B).</summary>
    [FieldOffset(60)] public uint Reserved2;
}
