namespace Vmm.Tests.Stress;

/// <summary>
/// A host component that keeps data in non-LRU movable frames (<see cref="Machine.MovablePages"/>): a
/// table of slots, each empty or holding one frame whose bytes are a function of the slot and its
/// version, so a check needs no copy. Its <see cref="Step"/> (one thread) allocates, rewrites, checks and
/// frees slots while the VM's movers (compaction, offline, alloc_contig_range) isolate and migrate its
/// frames through the callbacks, which refuse an isolation now and then and answer EAGAIN to some
/// migrations (the engine retries them). A byte a migration lost or a frame it left behind shows up as a
/// failed check, in <see cref="Audit"/> or as a frame not free at the end.
/// </summary>
/// <remarks>
/// Locking, as <see cref="MovableOperations"/> asks: the store's lock nests inside page locks (the
/// callbacks take it), so <see cref="Step"/> never calls FreePage while holding it. The owner's own reads
/// and writes of a frame happen under the lock, which a migration's copy also holds, and never while the
/// frame is isolated (the owner stops using it until it is migrated or put back).
/// </remarks>
internal sealed class StressMovableStore(Machine machine, int slots) : MovableOperations
{
    private readonly Lock _lock = new();

    /// <summary>Per slot: its frame or -1. Protected by _lock.</summary>
    private readonly long[] _frame = [.. Enumerable.Repeat(-1L, slots)];

    /// <summary>Per slot: what its frame holds (see <see cref="Word"/>). Protected by _lock.</summary>
    private readonly int[] _version = new int[slots];

    /// <summary>Frame to slot, for the live frames. Protected by _lock.</summary>
    private readonly Dictionary<long, int> _slotOf = [];

    /// <summary>Frames isolated by a mover. Protected by _lock.</summary>
    private readonly HashSet<long> _isolated = [];

    private long _callbacks;

    public long Allocated;
    public long AllocationsFailed;
    public long Rewrites;
    public long Checks;
    public long Freed;
    public long Skipped;
    public long IsolationsAllowed;
    public long IsolationsRefused;
    public long Migrated;
    public long MigrationsAgain;
    public long Putbacks;

    public int Slots => slots;

    /// <summary>Word <paramref name="word"/> of a slot's frame at a version: unique per slot and version.</summary>
    public static ulong Word(int slot, int version, int word) =>
        0x5100_0000_0000_0000UL | (ulong)(uint)slot << 36 | (ulong)(uint)version << 12 | (uint)word;

    private static byte[] Contents(int slot, int version)
    {
        byte[] bytes = new byte[StressHarness.Page];
        for (int w = 0; w < StressHarness.Words; w++)
            BitConverter.TryWriteBytes(bytes.AsSpan(w * 8), Word(slot, version, w));
        return bytes;
    }

    /// <summary>
    /// One operation on a random slot (from one thread only: slots fill and empty only here): an empty slot gets a frame (ENOMEM counted, not failed); a full one
    /// is checked, rewritten with a new version, or freed. Returns a failure's description, or null.
    /// </summary>
    public string? Step(Random random)
    {
        int slot = random.Next(slots);
        int choice = random.Next(100);
        long pfn;
        lock (_lock)
            pfn = _frame[slot];
        if (pfn < 0)
        {
            if (machine.MovablePages.AllocatePage(this, out long fresh) != Errno.None)
            {
                Interlocked.Increment(ref AllocationsFailed);
                return null;
            }
            // Written before it is listed: until then the callbacks refuse it (not in _slotOf).
            machine.MovablePages.Write(this, fresh, 0, Contents(slot, 1));
            lock (_lock)
            {
                _frame[slot] = fresh;
                _version[slot] = 1;
                _slotOf[fresh] = slot;
            }
            Interlocked.Increment(ref Allocated);
            return null;
        }
        if (choice < 15)
        {
            // Off the table first, under the lock (the callbacks then leave the frame alone: a migrate
            // callback for it answers EAGAIN), then freed without the lock (FreePage waits for the page lock).
            lock (_lock)
            {
                pfn = _frame[slot]; // again: a migration may have moved it since
                _frame[slot] = -1;
                _slotOf.Remove(pfn);
            }
            machine.MovablePages.FreePage(this, pfn);
            // Once FreePage has cleared the tag no callback comes for the frame: a mover that had it
            // isolated finishes it by itself (it counts as moved).
            lock (_lock)
                _isolated.Remove(pfn);
            Interlocked.Increment(ref Freed);
            return null;
        }
        lock (_lock)
        {
            pfn = _frame[slot];
            if (pfn < 0 || _isolated.Contains(pfn))
            {
                Interlocked.Increment(ref Skipped);
                return null;
            }
            if (choice < 50)
            {
                int version = _version[slot] + 1;
                machine.MovablePages.Write(this, pfn, 0, Contents(slot, version));
                _version[slot] = version;
                Interlocked.Increment(ref Rewrites);
                return null;
            }
            return CheckLocked(slot, pfn, "check");
        }
    }

    private string? CheckLocked(int slot, long pfn, string when)
    {
        byte[] buffer = new byte[StressHarness.Page];
        machine.MovablePages.Read(this, pfn, 0, buffer);
        for (int w = 0; w < StressHarness.Words; w++)
        {
            ulong seen = BitConverter.ToUInt64(buffer, w * 8), expected = Word(slot, _version[slot], w);
            if (seen != expected)
                return $"movable store, {when}: slot {slot} (frame {pfn}) word {w} reads {seen:x}, expected {expected:x}";
        }
        Interlocked.Increment(ref Checks);
        return null;
    }

    /// <summary>At quiet: checks every slot's bytes and that nothing is isolated. Returns the failures.</summary>
    public List<string> CheckAll()
    {
        var problems = new List<string>();
        lock (_lock)
        {
            if (_isolated.Count != 0)
                problems.Add($"movable store: {_isolated.Count} frames isolated at quiet");
            for (int slot = 0; slot < slots; slot++)
                if (_frame[slot] >= 0 && CheckLocked(slot, _frame[slot], "final check") is { } problem)
                    problems.Add(problem);
        }
        return problems;
    }

    /// <summary>Frees every frame (at quiet).</summary>
    public void FreeAll()
    {
        var frames = new List<long>();
        lock (_lock)
        {
            for (int slot = 0; slot < slots; slot++)
            {
                if (_frame[slot] >= 0)
                    frames.Add(_frame[slot]);
                _frame[slot] = -1;
            }
            _slotOf.Clear();
        }
        foreach (long pfn in frames)
            machine.MovablePages.FreePage(this, pfn);
        Interlocked.Add(ref Freed, frames.Count);
    }

    /// <summary>Every eighth call, counted over the callbacks of all threads: the store's "busy now".</summary>
    private bool Busy() => Interlocked.Increment(ref _callbacks) % 8 == 0;

    protected internal override bool IsolatePage(long pfn, IsolateMode mode)
    {
        lock (_lock)
        {
            if (!_slotOf.ContainsKey(pfn) || Busy())
            {
                Interlocked.Increment(ref IsolationsRefused);
                return false;
            }
            if (!_isolated.Add(pfn))
                throw new InvalidOperationException($"movable store: frame {pfn} isolated twice");
            Interlocked.Increment(ref IsolationsAllowed);
            return true;
        }
    }

    protected internal override Errno MigratePage(long newPfn, long oldPfn, MigrateMode mode)
    {
        lock (_lock)
        {
            if (!_isolated.Contains(oldPfn))
                throw new InvalidOperationException($"movable store: frame {oldPfn} migrated but not isolated");
            // A frame the store is freeing (off the table, FreePage waiting for the page lock) stays where
            // it is; and now and then the store is busy: the engine tries again.
            if (!_slotOf.TryGetValue(oldPfn, out int slot) || Busy())
            {
                Interlocked.Increment(ref MigrationsAgain);
                return Errno.EAGAIN;
            }
            machine.MovablePages.CopyPage(newPfn, oldPfn);
            _isolated.Remove(oldPfn);
            _slotOf.Remove(oldPfn);
            _slotOf[newPfn] = slot;
            _frame[slot] = newPfn;
            Interlocked.Increment(ref Migrated);
            return Errno.None;
        }
    }

    protected internal override void PutbackPage(long pfn)
    {
        lock (_lock)
        {
            if (!_isolated.Remove(pfn))
                throw new InvalidOperationException($"movable store: frame {pfn} put back but not isolated");
            Interlocked.Increment(ref Putbacks);
        }
    }

    /// <summary>Audit's share: the frames tagged with the store are exactly those its table holds (at quiet).</summary>
    internal override void Audit(Machine auditedMachine, IReadOnlySet<long> frames, List<string> problems)
    {
        lock (_lock)
        {
            foreach (long pfn in frames)
                if (!_slotOf.ContainsKey(pfn))
                    problems.Add($"movable store: frame {pfn} carries its tag but is in no slot");
            foreach (long pfn in _slotOf.Keys)
                if (!frames.Contains(pfn))
                    problems.Add($"movable store: slot frame {pfn} does not carry its tag");
        }
    }

    public override string ToString() =>
        $"movable store: {Allocated} allocated ({AllocationsFailed} ENOMEM), {Rewrites} rewrites, {Checks} checks, {Freed} freed, {Skipped} skipped while isolated; "
        + $"isolations {IsolationsAllowed} allowed, {IsolationsRefused} refused; migrated {Migrated}, EAGAIN {MigrationsAgain}, put back {Putbacks}";
}
