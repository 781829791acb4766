namespace Vmm;

/// <summary>The zones of a node (Linux's ZONE_NORMAL and ZONE_MOVABLE).</summary>
public enum ZoneType
{
    /// <summary>ZONE_NORMAL: every kind of allocation, including unmovable kernel data such as page tables.</summary>
    Normal = 0,
    /// <summary>ZONE_MOVABLE: movable allocations only, so that its blocks can always be offlined.</summary>
    Movable = 1,
}

/// <summary>Pageblock migratetypes: what kind of allocation a 2 MiB pageblock serves.</summary>
public enum MigrateType : byte
{
    /// <summary>MIGRATE_UNMOVABLE: pages that cannot be moved (page tables).</summary>
    Unmovable = 0,
    /// <summary>MIGRATE_MOVABLE: user pages that migration can move.</summary>
    Movable = 1,
    /// <summary>MIGRATE_ISOLATE: being emptied (offline, contiguous allocation): hands out nothing.</summary>
    Isolate = 2,
}

/// <summary>How an allocation may be satisfied (a small subset of Linux's gfp_t and alloc_flags).</summary>
[Flags]
internal enum AllocFlags
{
    /// <summary>GFP_KERNEL-like: unmovable, zeroed, any node by distance, above the min watermark.</summary>
    None = 0,
    /// <summary>__GFP_MOVABLE: the page can be migrated (user memory); may use ZONE_MOVABLE.</summary>
    Movable = 1 << 0,
    /// <summary>__GFP_THISNODE: only the preferred node, no fallback.</summary>
    ThisNode = 1 << 1,
    /// <summary>The caller overwrites every byte before anyone can read the frame (a copy): skip zeroing.</summary>
    NoZero = 1 << 2,
    /// <summary>__GFP_COMP: make a compound page (head + tails) of an order above 0.</summary>
    Compound = 1 << 3,
    /// <summary>ALLOC_HIGH (GFP_ATOMIC-like): may dip to half of the min watermark.</summary>
    HighPriority = 1 << 4,
    /// <summary>ALLOC_NO_WATERMARKS: may take the last free page (exit and reclaim paths).</summary>
    NoWatermark = 1 << 5,
}

/// <summary>A zone's free-memory thresholds, in pages (Linux's WMARK_MIN / LOW / HIGH).</summary>
/// <remarks>Instances are immutable: safe to share between threads.</remarks>
/// <param name="Min">below it only HighPriority and NoWatermark allocations succeed.</param>
/// <param name="Low">below it reclaim should start (kswapd).</param>
/// <param name="High">reclaim stops above it.</param>
public readonly record struct Watermarks(long Min, long Low, long High);
