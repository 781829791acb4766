// PageAllocator.MemoryFailure: the allocator's side of memory failure (Linux's take_page_off_buddy and
// zone_pcp_disable in mm/page_alloc.c, as mm/memory-failure.c uses them). A free frame that is poisoned
// or soft-offlined must never be handed out again: TakePageOffBuddy finds the free block that holds it,
// takes the block off its list, gives every other part of it back to the lists (break_down_buddy_pages:
// the halves that do not hold the frame, order by order) and retires the frame: PG_hwpoison, one
// reference (the retirement's), nothing else. The frame then counts as in use, like any retired frame
// (Mm/MemoryFailure.cs has the rest, docs/migration.md "Memory failure").
//
// A free frame is not always on a buddy list: it may be cached on a per-CPU list (refcount 0, no
// PG_buddy) or in a memmap section never initialised. TakePageOffBuddy initialises the section first and
// drains the zone's per-CPU lists (Linux's zone_pcp_disable), then looks; a frame freed to a per-CPU list
// between the drain and the look is not found, and the caller retries once, as Linux does.
//
// Locking: the section init, the drain and the take each take the zone lock (the drain takes each pcp
// spin word, then the zone lock inside it); nothing else is held.
using Vmm.Diagnostics;

namespace Vmm.Memory;

internal sealed unsafe partial class PageAllocator
{
    /// <summary>
    /// take_page_off_buddy: if <paramref name="pfn"/> is free on a buddy list, takes it off for good and
    /// returns true with the frame retired (PG_hwpoison, refcount 1, no other state; the free frames of
    /// its block stay free). False when the frame is not free on a buddy list (in use, or raced with an
    /// allocation): nothing changed. The caller counts the poisoned page.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">no such frame.</exception>
    public bool TakePageOffBuddy(long pfn)
    {
        CheckPfn(pfn);
        ThrowIfDisposed();
        // The frame must be on a list to be taken off one: a never-initialised section becomes one free
        // max-order block, and a frame cached per CPU goes back to its buddy list.
        InitSectionsOfRange(pfn, pfn + 1);
        Zone zone = ZoneOf(pfn);
        DrainZone(zone, force: true);
        lock (zone.Lock)
        {
            // Block states change under the zone lock: an offline block's frames are nobody's to take.
            if (!IsPfnOnline(pfn) || !_memMap.IsInitialised(pfn))
                return false;
            return TakePageOffBuddyLocked(zone, pfn);
        }
    }

    /// <summary>The body of <see cref="TakePageOffBuddy"/>. Preconditions: zone lock held; the frame's section initialised.</summary>
    private bool TakePageOffBuddyLocked(Zone zone, long pfn)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        for (int order = 0; order <= zone.MaxOrder; order++)
        {
            long head = pfn & ~((1L << order) - 1);
            ref PageDescriptor block = ref _memMap[head];
            if ((block.Flags & (ulong)PageFlags.Buddy) == 0 || (int)block.Private < order)
                continue;
            int blockOrder = (int)block.Private;
            var mt = (MigrateType)block.Index;
            bool reported = (block.Flags & (ulong)PageFlags.Reported) != 0;
            DelFromFreeListLocked(zone, head);
            BreakDownBuddyLocked(zone, head, blockOrder, pfn, mt, reported);
            ref PageDescriptor page = ref _memMap[pfn];
            // A frame off a free list is clean (FreePagesPrepare and the list primitives leave it so):
            // only its flags and reference change. Reference last, as PrepNewPage publishes it.
            Volatile.Write(ref page.Flags, (ulong)PageFlags.HWPoison);
            Volatile.Write(ref page.RefCount, 1);
            return true;
        }
        return false;
    }

    /// <summary>
    /// break_down_buddy_pages: splits the free block of order <paramref name="high"/> at
    /// <paramref name="head"/> down to the single frame <paramref name="target"/>, putting every half that
    /// does not hold it back on the <paramref name="mt"/> list (carrying PG_reported). Preconditions: zone
    /// lock held; the block is off its list.
    /// </summary>
    private void BreakDownBuddyLocked(Zone zone, long head, int high, long target, MigrateType mt, bool reported)
    {
        LockAssert.Held(zone.Lock, "the zone lock");
        while (high > 0)
        {
            high--;
            long half = 1L << high;
            long other;
            if (target >= head + half)
            {
                other = head;
                head += half;
            }
            else
            {
                other = head + half;
            }
            AddToFreeListLocked(zone, other, high, mt);
            if (reported)
                _memMap[other].Flags |= (ulong)PageFlags.Reported;
        }
    }

    /// <summary>is_free_buddy_page: whether <paramref name="pfn"/> lies in a free block on a buddy list (a racy answer, for diagnostics).</summary>
    public bool IsFreeBuddyPage(long pfn)
    {
        CheckPfn(pfn);
        if (!_memMap.IsInitialised(pfn))
            return true; // a deferred section is one free block waiting to be initialised
        Zone zone = ZoneOf(pfn);
        lock (zone.Lock)
            return FreeBlockHeadLocked(zone, pfn) != NoPfn;
    }
}
