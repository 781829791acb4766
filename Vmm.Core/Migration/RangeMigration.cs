// RangeMigration: one pass over a pfn range that isolates every page in use there and migrates it away
// (Linux's scan_movable_pages + do_migrate_range for memory offline, isolate_migratepages_range +
// migrate_pages for alloc_contig_range: the same walk, factored out here so both movers share it).
//
// The walk skips what is known free (sections never initialised, free buddy blocks: NextNotFree), takes a
// reference to each candidate (get_page_unless_zero: it may be freed meanwhile), isolates it and hands
// runs of isolated pages to MigrationEngine.MigratePages; what did not move is put back. Pages on an LRU
// list are isolated by the batched fast path (Lru.IsolateMany, one lru_lock round trip per chunk of 64:
// measured, a 64 MiB range clears in about 60 % of the time it takes one page at a time); every other page
// in use that carries the MOVABLE tag, one at a time through MigrationEngine.IsolatePage, the one entry
// point that takes non-LRU movable pages (its owner's isolate callback). The reads are racy (the machine keeps running): a wrong skip only
// leaves a page for the caller's next pass, and the caller's final word is taken under the zone lock
// (TestPagesIsolated and friends).
//
// Locking: none held on entry; the walk takes none of its own (the engine and the LRU take theirs).
using Vmm.Memory;

namespace Vmm.Migration;

/// <summary>The migrate-a-range pass shared by memory offline and alloc_contig_range (see the file overview).</summary>
internal static class RangeMigration
{
    /// <summary>Pages isolated before they are handed to the migration engine together.</summary>
    internal const int MigrateRun = 2048;

    /// <summary>Candidates isolated under one lru_lock round trip.</summary>
    internal const int IsolateChunk = 64;

    /// <summary>
    /// One pass over [<paramref name="start"/>, <paramref name="end"/>): every page in use there is
    /// isolated (LRU pages and non-LRU movable ones) and migrated (MigrateRun at a time) to the frame
    /// <paramref name="allocate"/> gives; what did not move is put back. Stops early, between runs, when
    /// <paramref name="cancellationToken"/> is cancelled (what moved stays moved).
    /// </summary>
    /// <returns>Pages moved.</returns>
    internal static long MigrateRange(Machine machine, long start, long end, Func<long, long> allocate, MigrateReason reason,
        CancellationToken cancellationToken, out bool outOfMemory)
    {
        outOfMemory = false;
        MemMap memMap = machine.MemMap;
        MigrationEngine engine = machine.Migration;
        List<long> list = engine.RentList();
        Span<long> chunk = stackalloc long[IsolateChunk];
        Span<bool> taken = stackalloc bool[IsolateChunk];
        int pending = 0;
        long moved = 0;
        try
        {
            for (long pfn = NextNotFree(memMap, start, end); pfn < end; pfn = NextNotFree(memMap, pfn + 1, end))
            {
                ulong flags = Volatile.Read(ref memMap[pfn].Flags);
                if ((flags & (ulong)PageFlags.Tail) != 0)
                    continue;
                bool lru = (flags & (ulong)PageFlags.Lru) != 0;
                // Not on an LRU list: only a non-LRU movable page (the MOVABLE tag), not isolated already, can
                // be taken; the rest is in transit (the next pass sees it) or unmovable (the caller names it).
                if (!lru && ((Volatile.Read(ref memMap[pfn].Mapping) & PageDescriptor.MappingTagMask) != PageDescriptor.MappingMovable ||
                             (flags & (ulong)PageFlags.Isolated) != 0))
                    continue;
                // Isolation needs a reference of our own (get_page_unless_zero: the page may be freed meanwhile).
                if (!memMap.TryGetPageUnlessZero(pfn))
                    continue;
                if (lru)
                {
                    // The LRU fast path (design section 1): one lru_lock round trip per chunk. A page that
                    // left its LRU list meanwhile is not taken, and waits for the next pass.
                    chunk[pending++] = pfn;
                    if (pending == IsolateChunk)
                    {
                        IsolateChunkInto(machine, chunk, taken, list);
                        pending = 0;
                    }
                }
                else
                {
                    try
                    {
                        if (engine.IsolatePage(pfn, IsolateMode.None))
                            list.Add(pfn);
                    }
                    finally
                    {
                        machine.PutPage(pfn); // the isolation holds its own reference (an owner's callback may throw)
                    }
                }
                if (list.Count >= MigrateRun)
                {
                    moved += MigrateList(machine, list, allocate, reason, ref outOfMemory);
                    if (cancellationToken.IsCancellationRequested)
                        break;
                }
            }
            if (pending > 0)
                IsolateChunkInto(machine, chunk[..pending], taken[..pending], list);
            if (list.Count > 0)
                moved += MigrateList(machine, list, allocate, reason, ref outOfMemory);
        }
        finally
        {
            engine.PutbackMovablePages(list);
            engine.ReturnList(list);
        }
        return moved;
    }

    /// <summary>Isolates the referenced pages of <paramref name="chunk"/> onto <paramref name="list"/> and drops our references.</summary>
    private static void IsolateChunkInto(Machine machine, Span<long> chunk, Span<bool> taken, List<long> list)
    {
        machine.Lru.IsolateMany(chunk, taken);
        for (int i = 0; i < chunk.Length; i++)
        {
            if (taken[i])
                list.Add(chunk[i]);
            machine.PutPage(chunk[i]); // the isolation holds its own reference
        }
    }

    private static long MigrateList(Machine machine, List<long> list, Func<long, long> allocate, MigrateReason reason, ref bool outOfMemory)
    {
        int rc = machine.Migration.MigratePages(list, allocate, null, MigrateMode.Sync, reason, out int succeeded);
        if (rc == -(int)Errno.ENOMEM)
            outOfMemory = true;
        machine.Migration.PutbackMovablePages(list);
        return succeeded;
    }

    /// <summary>
    /// The first frame of [<paramref name="pfn"/>, <paramref name="end"/>) that is not known free, or
    /// <paramref name="end"/>: sections never initialised and free buddy blocks are skipped whole. The
    /// reads are racy (the machine keeps running): a wrong skip only leaves a page for the next pass, and
    /// the final word is the caller's, under the zone lock.
    /// </summary>
    internal static long NextNotFree(MemMap memMap, long pfn, long end)
    {
        while (pfn < end)
        {
            if (!memMap.IsInitialised(pfn))
            {
                pfn += memMap.FramesPerSection - (pfn & (memMap.FramesPerSection - 1));
                continue;
            }
            ref PageDescriptor page = ref memMap[pfn];
            if ((Volatile.Read(ref page.Flags) & (ulong)PageFlags.Buddy) == 0)
                return pfn;
            int order = (int)Math.Min(Volatile.Read(ref page.Private), (ulong)PageAllocator.MaxOrder);
            pfn += (1L << order) - (pfn & ((1L << order) - 1));
        }
        return end;
    }
}
