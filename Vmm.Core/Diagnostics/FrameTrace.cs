// FrameTrace: an opt-in history of what happened to each frame, for hunting races that a stress test
// only shows long after the fact (a lost write, a frame owned twice). Off unless the environment
// variable VMM_FRAME_TRACE=1 is set when the machine is created; then every frame keeps its last
// Depth events (allocation, free, isolation by compaction, decommit, migration, mapping and
// unmapping at an address, KSM replacement...) with a global sequence number, and Dump prints them.
// Locking: none; events are written with plain stores into a per-frame ring whose slot is claimed
// atomically. A torn event reads as garbage in a dump, which is only read after the failure.
using System.Text;

namespace Vmm.Diagnostics;

/// <summary>What happened to a frame.</summary>
internal enum FrameEvent : byte
{
    None,
    Alloc,          // prep_new_page: arg = order | zero-skipped << 8
    Free,           // free_pages_prepare
    FreeZeroed,     // a balloon frame freed PG_zeroed
    CompactIsolate, // taken off a free list by compaction's free scanner
    CompactRelease, // an unused isolated free frame back on a free list
    Decommit,       // its memory given back to the host: arg = count of the run
    ReportZero,     // free page reporting marked it PG_zeroed
    MigrateFrom,    // its contents copied to a new frame: arg = the new frame
    MigrateTo,      // it received a page's contents: arg = the old frame
    MapAnon,        // a fault mapped it: arg = mm id << 40 | vpn
    MapCow,         // a copy-on-write fault mapped it (the copy): arg = mm id << 40 | vpn
    Unmap,          // a zap removed a PTE of it: arg = mm id << 40 | vpn
    MigUnmap,       // a PTE became a migration entry: arg = mm id << 40 | vpn
    MigRestore,     // a migration entry became a PTE of it: arg = mm id << 40 | vpn
    KsmReplaced,    // KSM replaced a PTE of it by its KSM page: arg = the KSM page (-1: zero page)
    KsmMapped,      // KSM mapped it (a KSM page) at an address: arg = mm id << 40 | vpn
    ForkCopy,       // fork copied its PTE to a child: arg = child mm id << 40 | vpn
    BalloonInflate,
    BalloonDeflate,
    SectionInit,    // its memmap section was initialised (PG_zeroed)
    ReuseWrite,     // a write fault reused it (wp_page_reuse): arg = mm id << 40 | vpn
    MapZero,        // a read fault mapped the zero page: arg = mm id << 40 | vpn
}

/// <summary>The per-frame event rings of one machine (see the file's overview).</summary>
internal sealed class FrameTrace
{
    private const int Depth = 16;
    private static long _seq;

    private readonly long[] _events; // per frame, Depth pairs: (seq << 16 | thread << 8 | kind, arg)
    private readonly int[] _cursor;

    // The same events of mapping kinds, keyed by address instead (a hash table of rings, AddrDepth
    // triples (key, seq << 16 | thread << 8 | kind, pfn)): a hot frame's ring forgets an address fast.
    private const int AddrSlots = 1 << 16;
    private const int AddrDepth = 16;
    private readonly long[] _addr = new long[AddrSlots * AddrDepth * 3];
    private readonly int[] _addrCursor = new int[AddrSlots];

    private FrameTrace(long frames)
    {
        _events = new long[frames * Depth * 2];
        _cursor = new int[frames];
    }

    private static bool IsMapping(FrameEvent kind) =>
        kind is FrameEvent.MapAnon or FrameEvent.MapCow or FrameEvent.Unmap or FrameEvent.MigUnmap or FrameEvent.MigRestore
            or FrameEvent.KsmMapped or FrameEvent.ForkCopy or FrameEvent.ReuseWrite or FrameEvent.MapZero;

    /// <summary>Records a mapping event in the address table only (for frames that have no ring worth keeping: the zero page).</summary>
    public void RecordAt(long at, FrameEvent kind, long pfn, long seq = 0)
    {
        long key = Math.Abs(at);
        int slot = (int)(((ulong)key * 0x9E3779B97F4A7C15UL) >> 48) & (AddrSlots - 1);
        int i = (Interlocked.Increment(ref _addrCursor[slot]) - 1) & (AddrDepth - 1);
        if (seq == 0)
            seq = Interlocked.Increment(ref _seq);
        long o = ((long)slot * AddrDepth + i) * 3;
        _addr[o] = at;
        _addr[o + 2] = pfn;
        Volatile.Write(ref _addr[o + 1], (seq << 16) | ((long)(Environment.CurrentManagedThreadId & 0xff) << 8) | (long)kind);
    }

    /// <summary>A trace for <paramref name="frames"/> frames if VMM_FRAME_TRACE=1, else null.</summary>
    public static FrameTrace? CreateIfEnabled(long frames) =>
        Environment.GetEnvironmentVariable("VMM_FRAME_TRACE") == "1" ? new FrameTrace(frames) : null;

    /// <summary>The arg of a mapping event.</summary>
    /// <remarks>23 bits of the mm id: the key stays positive (a migration entry's event is recorded negated).</remarks>
    public static long At(long mmId, ulong va) => ((mmId & 0x7F_FFFF) << 40) | (long)((va >> 12) & ((1UL << 40) - 1));

    public void Record(long pfn, FrameEvent kind, long arg = 0)
    {
        if ((ulong)pfn >= (ulong)_cursor.Length)
            return;
        int slot = (Interlocked.Increment(ref _cursor[pfn]) - 1) & (Depth - 1);
        long seq = Interlocked.Increment(ref _seq);
        long at = (pfn * Depth + slot) * 2;
        _events[at + 1] = arg;
        Volatile.Write(ref _events[at], (seq << 16) | ((long)(Environment.CurrentManagedThreadId & 0xff) << 8) | (long)kind);
        if (IsMapping(kind))
            RecordAt(arg, kind, pfn, seq);
    }

    public void RecordRange(long pfn, long count, FrameEvent kind, long arg = 0)
    {
        for (long i = 0; i < count; i++)
            Record(pfn + i, kind, arg);
    }

    /// <summary>The frame's events, oldest first, one per line.</summary>
    public string Dump(long pfn)
    {
        if ((ulong)pfn >= (ulong)_cursor.Length)
            return $"frame {pfn}: out of range\n";
        var events = new List<(long Seq, int Thread, FrameEvent Kind, long Arg)>();
        for (int i = 0; i < Depth; i++)
        {
            long at = (pfn * Depth + i) * 2;
            long head = Volatile.Read(ref _events[at]);
            if (head != 0)
                events.Add((head >> 16, (int)((head >> 8) & 0xff), (FrameEvent)(head & 0xff), _events[at + 1]));
        }
        events.Sort((a, b) => a.Seq.CompareTo(b.Seq));
        var text = new StringBuilder($"frame {pfn} ({Volatile.Read(ref _cursor[pfn])} events):\n");
        foreach (var e in events)
        {
            string arg = e.Kind is FrameEvent.MapAnon or FrameEvent.MapCow or FrameEvent.Unmap or FrameEvent.MigUnmap or FrameEvent.MigRestore
                or FrameEvent.KsmMapped or FrameEvent.ForkCopy or FrameEvent.ReuseWrite
                ? $"mm {e.Arg >> 40} va 0x{(e.Arg & ((1L << 40) - 1)) << 12:x}"
                : e.Arg.ToString();
            text.Append($"  #{e.Seq} t{e.Thread} {e.Kind} {arg}\n");
        }
        return text.ToString();
    }

    /// <summary>The events recorded for <paramref name="at"/> (an address of an mm), oldest first, and the frames they name.</summary>
    public string DumpAddress(long at, out List<long> frames)
    {
        long key = Math.Abs(at);
        int slot = (int)(((ulong)key * 0x9E3779B97F4A7C15UL) >> 48) & (AddrSlots - 1);
        var events = new List<(long Seq, long Pfn, int Thread, FrameEvent Kind, bool Entry)>();
        for (int i = 0; i < AddrDepth; i++)
        {
            long o = ((long)slot * AddrDepth + i) * 3;
            long head = Volatile.Read(ref _addr[o + 1]);
            if (head != 0 && Math.Abs(_addr[o]) == key)
                events.Add((head >> 16, _addr[o + 2], (int)((head >> 8) & 0xff), (FrameEvent)(head & 0xff), _addr[o] < 0));
        }
        events.Sort((a, b) => a.Seq.CompareTo(b.Seq));
        frames = events.Select(e => e.Pfn).Distinct().ToList();
        var text = new StringBuilder($"address mm {key >> 40} va 0x{(key & ((1L << 40) - 1)) << 12:x} ({Volatile.Read(ref _addrCursor[slot])} events in its slot):\n");
        foreach (var e in events)
            text.Append($"  #{e.Seq} t{e.Thread} {e.Kind}{(e.Entry ? " (migration entry)" : "")} frame {e.Pfn}\n");
        return text.ToString();
    }

    /// <summary>Frames an event of <paramref name="pfn"/> names (migration partners, KSM pages), for a deeper dump.</summary>
    public IEnumerable<long> Partners(long pfn)
    {
        if ((ulong)pfn >= (ulong)_cursor.Length)
            yield break;
        for (int i = 0; i < Depth; i++)
        {
            long at = (pfn * Depth + i) * 2;
            var kind = (FrameEvent)(_events[at] & 0xff);
            if (kind is FrameEvent.MigrateFrom or FrameEvent.MigrateTo or FrameEvent.KsmReplaced && _events[at + 1] >= 0)
                yield return _events[at + 1];
        }
    }
}
