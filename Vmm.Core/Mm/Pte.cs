// Pte: the 64-bit page-table entry, laid out like x86-64's where the hardware defines bits.
// A value type: entries live in page-table frames and change under the pte lock
// (AddressSpace.PageTable.cs); bits the access path sets (accessed, dirty) change atomically.
//
// Present entry:      bit 0 present, 1 write, 2 user, 5 accessed, 6 dirty, 9 special (no struct page
//                     behind it: the shared zero page), bits 12-51 the pfn.
// Non-present entry:  0 is "none". Otherwise bits 1-5 hold a type and bits 12-51 an offset, as a swap
//                     entry: types 1-27 are swap devices, 28 is a hwpoison entry (Linux's SWP_HWPOISON:
//                     the page it names failed; an access is a bus error), 29-31 are migration entries
//                     (read-exclusive / read / write); the offset of both kinds is a pfn.
// Upper levels (PGD, PUD, PMD) hold present | write | user | the pfn of the next table.
using System.Runtime.CompilerServices;

namespace Vmm.Mm;

/// <summary>A page-table entry value. Immutable; page tables are changed by atomic writes of whole values.</summary>
internal readonly record struct Pte(ulong Value)
{
    public const ulong PresentBit = 1UL << 0;
    public const ulong WriteBit = 1UL << 1;
    public const ulong UserBit = 1UL << 2;
    public const ulong AccessedBit = 1UL << 5;
    public const ulong DirtyBit = 1UL << 6;
    public const ulong SpecialBit = 1UL << 9;
    public const ulong PfnMask = ((1UL << 52) - 1) & ~0xFFFUL;
    private const int TypeShift = 1;
    private const ulong TypeMask = 0x1FUL << TypeShift;

    /// <summary>
    /// Swap type of a hwpoison entry (SWP_HWPOISON): the mapping's page was poisoned (memory failure), and
    /// an access faults with a bus error. Its offset is the poisoned frame; it holds no reference and
    /// counts in no RSS.
    /// </summary>
    public const int HwPoisonType = 28;

    /// <summary>Swap type of a migration entry for a read-only mapping of a page exclusive to its process
    /// (PG_anon_exclusive lives in the entry while the page is unmapped, as in Linux).</summary>
    public const int MigrationReadExclusiveType = 29;

    /// <summary>Swap type of a migration entry for a page that was mapped read-only (and shared).</summary>
    public const int MigrationReadType = 30;

    /// <summary>Swap type of a migration entry for a page that was mapped writable.</summary>
    public const int MigrationWriteType = 31;

    public static readonly Pte None = new(0);

    /// <summary>A present mapping of <paramref name="pfn"/>; without <paramref name="user"/> it is PROT_NONE.</summary>
    public static Pte Make(long pfn, bool write, bool dirty = false, bool accessed = false, bool special = false, bool user = true) =>
        new(((ulong)pfn << AddressSpace.PageShift) | PresentBit | (user ? UserBit : 0) | (write ? WriteBit : 0) | (dirty ? DirtyBit : 0) |
            (accessed ? AccessedBit : 0) | (special ? SpecialBit : 0));

    /// <summary>The same entry pointing at another frame.</summary>
    public Pte WithPfn(long pfn) => new((Value & ~PfnMask) | ((ulong)pfn << AddressSpace.PageShift));

    /// <summary>An upper-level entry pointing at the next table.</summary>
    public static Pte Table(long pfn) => new(((ulong)pfn << AddressSpace.PageShift) | PresentBit | WriteBit | UserBit);

    /// <summary>A non-present swap-format entry.</summary>
    public static Pte SwapEntry(int type, long offset)
    {
        if (type is < 1 or > 31)
            throw new ArgumentOutOfRangeException(nameof(type), type, "swap types are 1 to 31");
        return new(((ulong)offset << AddressSpace.PageShift) | ((ulong)type << TypeShift));
    }

    public bool IsNone => Value == 0;

    public bool IsPresent
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => (Value & PresentBit) != 0;
    }

    public bool IsWrite => (Value & WriteBit) != 0;

    public bool IsAccessed => (Value & AccessedBit) != 0;

    public bool IsDirty => (Value & DirtyBit) != 0;

    /// <summary>pte_special: maps a frame that is not refcounted per mapping (the zero page).</summary>
    public bool IsSpecial => (Value & SpecialBit) != 0;

    public long Pfn
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => (long)((Value & PfnMask) >> AddressSpace.PageShift);
    }

    /// <summary>A non-present, non-none entry: swap or migration.</summary>
    public bool IsSwapFormat => !IsPresent && Value != 0;

    public int SwapType => (int)((Value & TypeMask) >> TypeShift);

    public long SwapOffset => (long)((Value & PfnMask) >> AddressSpace.PageShift);

    public bool IsMigrationEntry => IsSwapFormat && SwapType >= MigrationReadExclusiveType;

    /// <summary>make_hwpoison_entry: the entry that replaces every mapping of a poisoned frame.</summary>
    public static Pte HwPoisonEntry(long pfn) => SwapEntry(HwPoisonType, pfn);

    /// <summary>is_hwpoison_entry.</summary>
    public bool IsHwPoisonEntry => IsSwapFormat && SwapType == HwPoisonType;

    /// <summary>A migration entry that remembers the page was exclusive to this process.</summary>
    public bool IsExclusiveMigrationEntry => IsMigrationEntry && SwapType != MigrationReadType;

    public Pte WithoutWrite() => new(Value & ~WriteBit);

    public Pte WithWrite() => new(Value | WriteBit);

    public Pte WithFlags(ulong bits) => new(Value | bits);

    public Pte WithoutFlags(ulong bits) => new(Value & ~bits);

    public override string ToString() =>
        IsNone ? "none"
        : IsPresent ? $"pfn {Pfn}{(IsWrite ? " W" : " RO")}{(IsDirty ? " D" : "")}{(IsAccessed ? " A" : "")}{(IsSpecial ? " special" : "")}"
        : IsHwPoisonEntry ? $"hwpoison pfn {SwapOffset}"
        : IsMigrationEntry ? $"migration {(SwapType == MigrationWriteType ? "write" : SwapType == MigrationReadExclusiveType ? "read-exclusive" : "read")} pfn {SwapOffset}"
        : $"swap type {SwapType} offset {SwapOffset}";
}
