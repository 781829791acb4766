// Vma: one virtual memory area (Linux's vm_area_struct): a page-aligned range with one protection,
// one kind (private or shared anonymous) and one reverse-map identity. An address space keeps its
// VMAs sorted and non-overlapping; mmap, munmap and mprotect split them at range boundaries, and
// neighbours that became identical merge again.
using Vmm.Rmap;

namespace Vmm.Mm;

/// <summary>VM_* flags of a VMA.</summary>
[Flags]
internal enum VmaFlags
{
    None = 0,
    Read = 1 << 0,
    Write = 1 << 1,
    Exec = 1 << 2,
    Shared = 1 << 3,
    /// <summary>VM_MERGEABLE: KSM may merge its pages.</summary>
    Mergeable = 1 << 4,
    /// <summary>VM_LOCKED: mlocked.</summary>
    Locked = 1 << 5,
}

/// <summary>One VMA. All fields are protected by the owning mm's mmap_lock (written under it held for write).</summary>
internal sealed class Vma
{
    public Vma(AddressSpace mm, ulong start, ulong end, VmaFlags flags, ulong pgOff)
    {
        Mm = mm;
        Start = start;
        End = end;
        Flags = flags;
        PgOff = pgOff;
    }

    public AddressSpace Mm { get; }

    /// <summary>First byte (page aligned).</summary>
    public ulong Start;

    /// <summary>One past the last byte (page aligned).</summary>
    public ulong End;

    public VmaFlags Flags;

    /// <summary>vm_pgoff: the page index of Start in its object (for anonymous memory, Start >> 12 at creation).</summary>
    public ulong PgOff;

    /// <summary>The anon_vma new anonymous pages of this VMA point at; null until the first fault.</summary>
    public AnonVma? AnonVma;

    /// <summary>Links to this VMA's anon_vma and its ancestors'.</summary>
    public List<AnonVmaChain> AnonVmaChains = [];

    /// <summary>For a shared mapping: the object behind it.</summary>
    public ShmemObject? Shmem;

    /// <summary>The dedupe domain: KSM merges pages only with pages of the same domain.</summary>
    public ushort KsmDomain;

    public bool IsShared => (Flags & VmaFlags.Shared) != 0;

    public bool CanRead => (Flags & (VmaFlags.Read | VmaFlags.Write)) != 0;

    public bool CanWrite => (Flags & VmaFlags.Write) != 0;

    public ulong Pages => (End - Start) >> AddressSpace.PageShift;

    /// <summary>The page index (linear_page_index) of an address inside the VMA.</summary>
    public ulong PageIndex(ulong address) => PgOff + ((address - Start) >> AddressSpace.PageShift);

    /// <summary>The address of a page index in this VMA, or null if the VMA does not cover it.</summary>
    public ulong? AddressOf(ulong index)
    {
        if (index < PgOff)
            return null;
        ulong address = Start + ((index - PgOff) << AddressSpace.PageShift);
        return address >= Start && address < End ? address : null;
    }

    public override string ToString() => $"[{Start:x}-{End:x}) {Flags}";
}
