// FaultInjection: Linux's fault-injection framework (fail_page_alloc, failslab; lib/fault-inject.c) in small.
//
// A machine built with MachineOptions.FaultInjection makes some of its own requests for memory fail on
// purpose, so that tests can drive every error path a real shortage would: the page allocator returns
// NoPfn as if every zone were empty, and a host commit reports that the host refused. Callers cannot
// tell an injected failure from a real one; that is the point.
//
// Which calls fail is Linux's fault_attr rule, per site (each site counts its own calls):
//   the first Space calls never fail; after them, a call is a candidate when its number is a multiple
//   of Interval, and a candidate fails with Probability; at most Times failures in all (-1: no limit).
// "Fail the N-th allocation" is Space = N - 1, Times = 1. Probability draws are not a shared Random:
// call n of a site fails iff a seeded hash of (seed, site, n) falls under the probability, so the same
// seed and the same sequence of calls fail the same calls, whatever thread makes them.
//
// Sites (FaultSites):
//   FrameAllocation - every frame the machine hands out goes through PageAllocator.AllocPages (faults,
//                     copy-on-write copies, page tables, fork's eager copies, shmem pages, migration
//                     targets, the zero page); the per-CPU fast path is inside it. Filters mirror Linux's
//                     knobs: MinOrder (min-order), IgnoreUnmovable (the inverse of ignore-gfp-highmem:
//                     leave kernel memory such as page tables alone), IgnoreNoWatermark (Linux never fails
//                     __GFP_NOFAIL; our nearest kin are ALLOC_NO_WATERMARKS requests such as the zero page).
//   HostCommit      - the machine asks the host for memory at run time: a zone initialising its next
//                     deferred memmap section (PageAllocator.GrowZoneLocked) commits that section's
//                     descriptors. A refusal fails the allocation that needed it, as out of memory, and
//                     the section stays deferred. Isolation also initialises the sections of its range
//                     and is not a site: it has no out-of-memory path (offline will give it one). Arena
//                     frames commit on first touch, which the host
//                     cannot refuse short of killing the process: not a site. Other code that asks the
//                     host for memory calls Machine.FaultInjector?.ShouldFail(FaultSite.HostCommit).
//   HostDecommit    - giving free memory back (madvise DONTNEED in ReleaseFreeMemory and the KSM release
//                     worker): a refused decommit leaves the block free and not yet given back.
// Managed allocations (KSM's rmap-item slab, lists) are not sites: the CLR's OutOfMemoryException is not
// an error path Vmm can take back, as failslab cannot fail a __GFP_NOFAIL slab.
//
// Cost when off: the allocator holds a null reference and tests it once per allocation.
//
// Locking: none; the per-site call and failure counts are atomic, and a draw is a pure hash, so
// ShouldFail may be called under any lock (the allocator calls it under the zone lock).
namespace Vmm;

/// <summary>Where a machine asks for memory, for <see cref="FaultInjection"/>.</summary>
[Flags]
public enum FaultSites
{
    /// <summary>Nothing fails.</summary>
    None = 0,
    /// <summary>Frame allocations of the page allocator (fail_page_alloc).</summary>
    FrameAllocation = 1 << 0,
    /// <summary>Host memory committed at run time (arena prefault, frame descriptors of newly used memory).</summary>
    HostCommit = 1 << 1,
    /// <summary>Host memory given back (madvise DONTNEED of free frames).</summary>
    HostDecommit = 1 << 2,
    /// <summary>Every site.</summary>
    All = FrameAllocation | HostCommit | HostDecommit,
}

/// <summary>One site of <see cref="FaultSites"/>, as the injector counts them.</summary>
internal enum FaultSite
{
    /// <summary>A frame allocation.</summary>
    FrameAllocation = 0,
    /// <summary>A host commit.</summary>
    HostCommit = 1,
    /// <summary>A host decommit.</summary>
    HostDecommit = 2,
}

/// <summary>
/// Deliberate failures of the machine's memory requests, for tests (Linux's fail_page_alloc and its
/// fault_attr knobs): the first <see cref="Space"/> calls of a site succeed; after them every
/// <see cref="Interval"/>-th call fails with <see cref="Probability"/>, at most <see cref="Times"/> times.
/// Deterministic: the same <see cref="Seed"/> and the same sequence of calls fail the same calls.
/// </summary>
/// <remarks>Instances are immutable (init-only properties; <c>with</c> makes a changed copy): one may be shared by threads and machines.</remarks>
/// <example>Fail the third frame allocation, once: <c>new FaultInjection { Space = 2, Times = 1 }</c>.
/// Fail one allocation in ten at random: <c>new FaultInjection { Seed = 7, Probability = 0.1 }</c>.</example>
public sealed record FaultInjection
{
    /// <summary>Seed of the probability draws. Default 0.</summary>
    public ulong Seed { get; init; }

    /// <summary>Chance, 0 to 1, that a candidate call fails (Linux's probability, in percent there). Default 1.</summary>
    public double Probability { get; init; } = 1.0;

    /// <summary>Only every <see cref="Interval"/>-th call (counted per site) is a candidate. At least 1; default 1.</summary>
    public long Interval { get; init; } = 1;

    /// <summary>The first <see cref="Space"/> calls of each site never fail. Default 0.</summary>
    public long Space { get; init; }

    /// <summary>At most this many failures in all; -1 for no limit (Linux's times). Default -1.</summary>
    public long Times { get; init; } = -1;

    /// <summary>Which requests may fail. Default <see cref="FaultSites.FrameAllocation"/>.</summary>
    public FaultSites Sites { get; init; } = FaultSites.FrameAllocation;

    /// <summary>Frame allocations below this order never fail (Linux's min-order). Default 0.</summary>
    public int MinOrder { get; init; }

    /// <summary>Leave unmovable (kernel) frame allocations, such as page tables, alone. Default false.</summary>
    public bool IgnoreUnmovable { get; init; }

    /// <summary>Leave emergency allocations that may take the last frame (the zero page) alone. Default false.</summary>
    public bool IgnoreNoWatermark { get; init; }

    internal void Validate()
    {
        if (double.IsNaN(Probability) || Probability < 0 || Probability > 1)
            throw new ArgumentOutOfRangeException(nameof(Probability), Probability, "FaultInjection.Probability must be 0 to 1");
        ArgumentOutOfRangeException.ThrowIfLessThan(Interval, 1, "FaultInjection.Interval");
        ArgumentOutOfRangeException.ThrowIfNegative(Space, "FaultInjection.Space");
        ArgumentOutOfRangeException.ThrowIfLessThan(Times, -1, "FaultInjection.Times");
        ArgumentOutOfRangeException.ThrowIfNegative(MinOrder, "FaultInjection.MinOrder");
    }
}

/// <summary>What fault injection did so far: calls seen and failures injected, per site.</summary>
/// <remarks>Instances are immutable: safe to share between threads.</remarks>
/// <param name="FrameAllocations">frame allocations seen (after the filters).</param>
/// <param name="FrameAllocationFailures">frame allocations failed on purpose.</param>
/// <param name="HostCommits">host commits seen.</param>
/// <param name="HostCommitFailures">host commits failed on purpose.</param>
/// <param name="HostDecommits">host decommits seen.</param>
/// <param name="HostDecommitFailures">host decommits failed on purpose.</param>
public readonly record struct FaultInjectionStats(
    long FrameAllocations, long FrameAllocationFailures,
    long HostCommits, long HostCommitFailures,
    long HostDecommits, long HostDecommitFailures)
{
    /// <summary>Failures injected at every site.</summary>
    public long TotalFailures => FrameAllocationFailures + HostCommitFailures + HostDecommitFailures;
}

/// <summary>
/// The machine's fault injector: one per machine built with <see cref="MachineOptions.FaultInjection"/>.
/// Thread-safe: counters are atomic, and a decision depends only on the settings and the call's number.
/// </summary>
internal sealed class FaultInjector
{
    private const int SiteCount = 3;
    private volatile FaultInjection _settings; // replaced whole by Reset
    private readonly long[] _calls = new long[SiteCount];    // atomic
    private readonly long[] _failures = new long[SiteCount]; // atomic
    private long _remaining;                                   // atomic; failures still allowed (-1: unlimited)

    internal FaultInjector(FaultInjection settings)
    {
        settings.Validate();
        _settings = settings;
        _remaining = settings.Times;
    }

    /// <summary>The settings in force.</summary>
    internal FaultInjection Settings => _settings;

    /// <summary>
    /// New settings and zeroed counters (tests re-arm one machine between calls: "fail the N-th
    /// allocation of the next call"). Not atomic with respect to calls in flight on other threads.
    /// </summary>
    internal void Reset(FaultInjection settings)
    {
        settings.Validate();
        for (int i = 0; i < SiteCount; i++)
        {
            Volatile.Write(ref _calls[i], 0);
            Volatile.Write(ref _failures[i], 0);
        }
        Volatile.Write(ref _remaining, settings.Times);
        _settings = settings;
    }

    /// <summary>should_fail_alloc_page: the filters for frame allocations, then the common rule.</summary>
    internal bool ShouldFailAlloc(int order, AllocFlags flags)
    {
        FaultInjection s = _settings;
        if ((s.Sites & FaultSites.FrameAllocation) == 0 || order < s.MinOrder)
            return false;
        if (s.IgnoreUnmovable && (flags & AllocFlags.Movable) == 0)
            return false;
        if (s.IgnoreNoWatermark && (flags & AllocFlags.NoWatermark) != 0)
            return false;
        return Decide(s, FaultSite.FrameAllocation);
    }

    /// <summary>
    /// should_fail for a site: true if this call must fail. The hook for any code that asks the host
    /// for memory (<see cref="FaultSite.HostCommit"/>, <see cref="FaultSite.HostDecommit"/>); frame
    /// allocations go through <see cref="ShouldFailAlloc"/>.
    /// </summary>
    internal bool ShouldFail(FaultSite site)
    {
        FaultInjection s = _settings;
        if ((s.Sites & (FaultSites)(1 << (int)site)) == 0)
            return false;
        return Decide(s, site);
    }

    private bool Decide(FaultInjection s, FaultSite site)
    {
        long n = Interlocked.Increment(ref _calls[(int)site]);
        if (n <= s.Space || (n - s.Space) % s.Interval != 0)
            return false;
        if (s.Probability < 1.0 && Draw(s.Seed, site, n) >= s.Probability)
            return false;
        // Times: take one failure from the budget, unless it is spent (Linux's atomic_dec_not_zero).
        while (true)
        {
            long left = Volatile.Read(ref _remaining);
            if (left == 0)
                return false;
            if (left < 0 || Interlocked.CompareExchange(ref _remaining, left - 1, left) == left)
                break;
        }
        Interlocked.Increment(ref _failures[(int)site]);
        return true;
    }

    /// <summary>A uniform number in [0, 1) from (seed, site, n): splitmix64's finaliser.</summary>
    private static double Draw(ulong seed, FaultSite site, long n)
    {
        ulong z = seed + 0x9E3779B97F4A7C15UL * (ulong)(n + 1) + ((ulong)site << 56);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        z ^= z >> 31;
        return (z >> 11) * (1.0 / (1UL << 53));
    }

    /// <summary>The counters so far.</summary>
    internal FaultInjectionStats GetStats() => new(
        Volatile.Read(ref _calls[0]), Volatile.Read(ref _failures[0]),
        Volatile.Read(ref _calls[1]), Volatile.Read(ref _failures[1]),
        Volatile.Read(ref _calls[2]), Volatile.Read(ref _failures[2]));
}
