// Vma: one virtual memory area (Linux's vm_area_struct): a page-aligned range with one protection,
// one kind (private or shared anonymous) and one reverse-map identity. An address space keeps its
// VMAs sorted and non-overlapping; mmap, munmap and mprotect split them at range boundaries, and
// neighbours that became identical merge again.
//
// Locking: the owning mm's mmap_lock; the anon_vma fields are the one exception (see the class docs).
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

/// <summary>
/// One VMA. Its fields are protected by the owning mm's mmap_lock: written under it held for write,
/// read under it held for read or write. The exception is the anon_vma pair (AnonVma, AnonVmaChains),
/// which the first anonymous fault installs under the mmap_lock held only for read (see each field).
/// </summary>
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

    /// <summary>Immutable: the address space the VMA belongs to.</summary>
    public AddressSpace Mm { get; }

    /// <summary>First byte (page aligned).</summary>
    public ulong Start;

    /// <summary>One past the last byte (page aligned).</summary>
    public ulong End;

    /// <summary>VM_* flags. Written under the mmap_lock for write (KSM reads VM_MERGEABLE under it for read).</summary>
    public VmaFlags Flags;

    /// <summary>vm_pgoff: the page index of Start in its object (for anonymous memory, Start >> 12 at creation).</summary>
    public ulong PgOff;

    /// <summary>The anon_vma new anonymous pages of this VMA point at; null until the first fault.
    /// Installed once by anon_vma_prepare (AddressSpace.PrepareAnonVma) under the mmap_lock for read and
    /// the VMA's own monitor (Linux uses the page_table_lock there), published with Volatile.Write; set
    /// under the mmap_lock for write by fork and split.</summary>
    public AnonVma? AnonVma;

    /// <summary>Links to this VMA's anon_vma and its ancestors'. Changed like <see cref="AnonVma"/>; each
    /// link is also on its anon_vma's list, which that anon_vma's lock protects.</summary>
    public List<AnonVmaChain> AnonVmaChains = [];

    /// <summary>For a shared mapping: the object behind it. Set at creation (mmap, fork, split).</summary>
    public ShmemObject? Shmem;

    /// <summary>The dedupe domain: KSM merges pages only with pages of the same domain. Written under
    /// the mmap_lock for write.</summary>
    public ushort KsmDomain;

    /// <summary>vm_policy: the VMA's memory policy (mbind); null for none (the task's applies). Immutable
    /// object; the field is written under the mmap_lock for write (mbind, a cpuset rebind, split, fork)
    /// and read under it for read (faults). Split copies it; VMAs merge only when equal (mpol_equal).</summary>
    public Mempolicy? Policy;

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
