// Page flags and their compound-page policy.
//
// The flags keep Linux's names (PG_locked, PG_lru, ...). A compound page (a head frame followed by
// 2^order - 1 tail frames) keeps most state on its head; which frame a flag lives on is the flag's
// policy, as in Linux's include/linux/page-flags.h:
//   Any        the flag lives on every frame separately (PG_head, PG_private, PG_buddy, ...).
//   Head       tests and changes on a tail are redirected to the head (PG_lru, PG_dirty, ...).
//   OnlyHead   only the head may be asked; asking a tail is a bug (PG_waiters).
//   NoTail     tests on a tail are redirected to the head; changing it through a tail is a bug
//              (PG_locked, PG_swapbacked, ...).
//   NoCompound the flag is meaningless on compound pages; any use on one is a bug (PG_reserved).
namespace Vmm;

/// <summary>The state bits of a frame descriptor (Linux's page->flags).</summary>
[Flags]
public enum PageFlags : ulong
{
    /// <summary>No flag.</summary>
    None = 0,
    /// <summary>PG_locked: the page lock is held.</summary>
    Locked = 1UL << 0,
    /// <summary>PG_waiters: someone sleeps on the page lock (wake them on unlock).</summary>
    Waiters = 1UL << 1,
    /// <summary>PG_referenced: accessed recently (second-chance LRU aging).</summary>
    Referenced = 1UL << 2,
    /// <summary>PG_uptodate: the contents are valid.</summary>
    Uptodate = 1UL << 3,
    /// <summary>PG_dirty: the contents differ from any backing copy (swap).</summary>
    Dirty = 1UL << 4,
    /// <summary>PG_lru: the page is on an LRU list.</summary>
    Lru = 1UL << 5,
    /// <summary>PG_head: first frame of a compound page.</summary>
    Head = 1UL << 6,
    /// <summary>PG_active: on the active LRU list.</summary>
    Active = 1UL << 7,
    /// <summary>PG_workingset: part of the working set (refault detection).</summary>
    Workingset = 1UL << 8,
    /// <summary>PG_reserved: never handed to the allocator, never migrated.</summary>
    Reserved = 1UL << 9,
    /// <summary>PG_private: the private word is in use by the owner.</summary>
    Private = 1UL << 10,
    /// <summary>PG_writeback: being written to swap.</summary>
    Writeback = 1UL << 11,
    /// <summary>PG_reclaim: to be reclaimed as soon as writeback ends.</summary>
    Reclaim = 1UL << 12,
    /// <summary>PG_swapbacked: anonymous memory, backed by swap when evicted.</summary>
    SwapBacked = 1UL << 13,
    /// <summary>PG_unevictable: on the unevictable list (mlocked).</summary>
    Unevictable = 1UL << 14,
    /// <summary>PG_mlocked: mapped by an mlocked VMA.</summary>
    Mlocked = 1UL << 15,
    /// <summary>PG_swapcache: in the swap cache; the private word holds the swap entry.</summary>
    SwapCache = 1UL << 16,
    /// <summary>PG_buddy (a page type in Linux): head of a free block; the private word is its order.</summary>
    Buddy = 1UL << 17,
    /// <summary>PG_isolated: a non-LRU movable page isolated for migration.</summary>
    Isolated = 1UL << 18,
    /// <summary>A tail frame of a compound page; CompoundHead names the head (Linux: bit 0 of compound_head).</summary>
    Tail = 1UL << 19,
    /// <summary>Vmm: the frame's bytes are known to be all zero (fresh or decommitted); zeroing can be skipped.</summary>
    Zeroed = 1UL << 20,
    /// <summary>PG_reported (a page type in Linux): a free block whose memory was given back to the host.</summary>
    Reported = 1UL << 21,
    /// <summary>PG_table (a page type in Linux): a page-table page.</summary>
    Table = 1UL << 22,
    /// <summary>PG_offline (a page type in Linux): the frame is in an offline block or ballooned out.</summary>
    Offline = 1UL << 23,
    /// <summary>
    /// PG_movable: a non-LRU page with movable operations (<see cref="MovableOperations"/>). As in Linux it
    /// lives in the mapping word's low bits (PAGE_MAPPING_MOVABLE), never in the stored flags;
    /// <see cref="Machine.GetPageInfo"/> reports it for a frame that carries that tag.
    /// </summary>
    Movable = 1UL << 24,
    /// <summary>PG_anon_exclusive: an anonymous page mapped by exactly one process, which may write it without copying.</summary>
    AnonExclusive = 1UL << 25,
    /// <summary>
    /// PG_hwpoison: the frame's memory failed (MADV_HWPOISON, a hard offline) or was retired by a soft
    /// offline. Such a frame is never handed out again: it keeps one reference (the retirement's), is
    /// unmapped, on no list and names no mapping once its last other user is gone.
    /// </summary>
    HWPoison = 1UL << 26,
}

/// <summary>Where a flag lives on a compound page (see the file overview).</summary>
internal enum PageFlagPolicy : byte
{
    /// <summary>Every frame has its own copy.</summary>
    Any,
    /// <summary>Redirected to the head.</summary>
    Head,
    /// <summary>Only the head may be asked.</summary>
    OnlyHead,
    /// <summary>Tests go to the head; changes through a tail are a bug.</summary>
    NoTail,
    /// <summary>Not for compound pages at all.</summary>
    NoCompound,
}

/// <summary>The per-flag compound policy table.</summary>
internal static class PageFlagPolicies
{
    /// <summary>Flags that must be clear when a page is freed (Linux's PAGE_FLAGS_CHECK_AT_FREE).</summary>
    public const PageFlags CheckAtFree =
        PageFlags.Locked | PageFlags.Lru | PageFlags.Active | PageFlags.Private | PageFlags.Writeback |
        PageFlags.Reclaim | PageFlags.SwapCache | PageFlags.Unevictable | PageFlags.Mlocked |
        PageFlags.Buddy | PageFlags.Isolated | PageFlags.Table | PageFlags.Reserved |
        PageFlags.HWPoison; // a retired frame keeps its reference for ever: reaching the free path is a bug

    /// <summary>The policy of a single flag.</summary>
    /// <exception cref="ArgumentException"><paramref name="flag"/> is not exactly one flag.</exception>
    public static PageFlagPolicy Of(PageFlags flag) => flag switch
    {
        PageFlags.Locked => PageFlagPolicy.NoTail,
        PageFlags.Waiters => PageFlagPolicy.OnlyHead,
        PageFlags.Referenced => PageFlagPolicy.Head,
        PageFlags.Uptodate => PageFlagPolicy.NoTail,
        PageFlags.Dirty => PageFlagPolicy.Head,
        PageFlags.Lru => PageFlagPolicy.Head,
        PageFlags.Head => PageFlagPolicy.Any,
        PageFlags.Active => PageFlagPolicy.Head,
        PageFlags.Workingset => PageFlagPolicy.Head,
        PageFlags.Reserved => PageFlagPolicy.NoCompound,
        PageFlags.Private => PageFlagPolicy.Any,
        PageFlags.Writeback => PageFlagPolicy.NoTail,
        PageFlags.Reclaim => PageFlagPolicy.NoTail,
        PageFlags.SwapBacked => PageFlagPolicy.NoTail,
        PageFlags.Unevictable => PageFlagPolicy.Head,
        PageFlags.Mlocked => PageFlagPolicy.NoTail,
        PageFlags.SwapCache => PageFlagPolicy.NoTail,
        PageFlags.Buddy => PageFlagPolicy.Any,
        PageFlags.Isolated => PageFlagPolicy.Any,
        PageFlags.Tail => PageFlagPolicy.Any,
        PageFlags.Zeroed => PageFlagPolicy.Any,
        PageFlags.Reported => PageFlagPolicy.Any,
        PageFlags.Table => PageFlagPolicy.NoCompound,
        PageFlags.Offline => PageFlagPolicy.Any,
        PageFlags.Movable => PageFlagPolicy.Head,
        PageFlags.AnonExclusive => PageFlagPolicy.NoTail,
        PageFlags.HWPoison => PageFlagPolicy.Any,
        _ => throw new ArgumentException($"'{flag}' is not a single page flag", nameof(flag)),
    };
}
