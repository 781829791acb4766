// AnonVma: the reverse map of anonymous memory (Linux's anon_vma and anon_vma_chain).
//
// An anonymous page points (through its mapping word) at the anon_vma of the VMA that created it, and
// its index is its linear page index in that VMA. Each VMA links, through anon_vma_chains, to its own
// anon_vma and to those of every ancestor it was forked from; each anon_vma lists the VMAs linked to
// it. So the VMAs that may map a page are exactly those on its anon_vma's list, and the address in each
// is vma.Start + ((index - vma.PgOff) << PageShift).
//
// Fork: the child VMA is linked to every anon_vma its parent VMA is linked to (pages shared
// copy-on-write stay findable from the parent's anon_vma), then gets an anon_vma of its own for the
// pages it creates later. Split: both halves keep the same links. The code that builds and breaks the
// links (anon_vma_prepare, anon_vma_fork, unlink_anon_vmas) lives with the VMA list in
// Mm/AddressSpace.cs; this file holds the types, and RmapWalker.cs walks them.
//
// Locking: an anon_vma family shares one lock, the root's (AnonVma.Lock), which protects every
// Chains list of the family. A VMA's own AnonVma / AnonVmaChains fields: see Vma.cs.
using Vmm.Mm;

namespace Vmm.Rmap;

/// <summary>One anon_vma: the set of VMAs that may map pages created by one VMA.</summary>
internal sealed class AnonVma
{
    public AnonVma(long handle, AnonVma? parent)
    {
        Handle = handle;
        Root = parent?.Root ?? this;
    }

    /// <summary>Immutable: the key stored in page mapping words.</summary>
    public long Handle { get; }

    /// <summary>Immutable: the oldest ancestor; its lock protects every list of the family (anon_vma_lock).</summary>
    public AnonVma Root { get; }

    /// <summary>
    /// The anon_vma lock (the root's). A System.Threading.Lock rather than the object's monitor: every
    /// page a migration moves takes it twice (unmap and restore walks), and the monitor's native enter
    /// and exit cost about 20 ns per page more (measured, issue 11).
    /// </summary>
    public Lock Lock => Root._lock;

    private readonly Lock _lock = new();

    /// <summary>VMAs linked to this anon_vma. Protected by Lock.</summary>
    public readonly List<AnonVmaChain> Chains = [];
}

/// <summary>One link between a VMA and an anon_vma (anon_vma_chain).</summary>
/// <param name="Vma">the VMA.</param>
/// <param name="AnonVma">the anon_vma.</param>
internal sealed record AnonVmaChain(Vma Vma, AnonVma AnonVma);
