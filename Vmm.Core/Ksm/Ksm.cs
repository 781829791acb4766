// Ksm: kernel samepage merging (Linux's mm/ksm.c) for a Machine: the knobs of /sys/kernel/mm/ksm, the
// counters, the ksmd thread and its deterministic step API, and the registration of address spaces.
//
// How it works, in short (docs/ksm.md has the whole story):
//   * Address spaces opt in with madvise(MERGEABLE) or process-wide (PR_SET_MEMORY_MERGE); each gets a
//     slot on one list, which a single cursor walks: pages_to_scan pages per batch.
//   * Every present anonymous page visited gets an rmap item holding the checksum seen last time. A page
//     is a candidate only when its checksum did not change between two visits.
//   * Candidates are looked up in the stable index (KSM pages: read-only, merged) and then the unstable
//     index (candidates seen this pass; emptied at every full scan). Both are hash indexes keyed by the
//     page's 64-bit checksum mixed with a per-domain secret; every match is confirmed by a full compare
//     after the pages are write-protected, so the key is only ever a hint.
//   * Merges go through the access protocol: lock the page, write-protect it (after checking that no
//     pin holds it), flush, compare, replace the PTE. The flush costs microseconds, so merges are
//     queued and committed in batches of up to 64: one flush write-protects the whole batch.
//   * A stable node names its page by frame number and holds no reference; every use checks that the
//     frame still names the node (the keyhole check) and removes the node when it does not.
//
// Locking (docs/locking.md): the thread mutex (ksm_thread_mutex) serializes scan batches, run = 2 and
// the knob writes that rebuild the indexes; the mm-list lock protects the slot list and the cursor's
// slot. Exit never takes the thread mutex. Index structures are touched only under the thread mutex;
// a stable node's item list only under its KSM page's lock as well.
using System.Diagnostics;
using System.Globalization;
using Vmm.Diagnostics;
using Vmm.Mm;
using Vmm.Native;

namespace Vmm;

/// <summary>The advisor_mode knob.</summary>
public enum KsmAdvisorMode
{
    /// <summary>pages_to_scan is set by hand.</summary>
    None,

    /// <summary>pages_to_scan follows the measured time of a full scan toward advisor_target_scan_time.</summary>
    ScanTime,
}

/// <summary>Every KSM knob, as /sys/kernel/mm/ksm shows them.</summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="Run">0 stop, 1 run, 2 unmerge everything.</param>
/// <param name="PagesToScan">pages per batch.</param>
/// <param name="SleepMillisecs">pause between batches.</param>
/// <param name="MergeAcrossNodes">merge pages of different NUMA nodes.</param>
/// <param name="UseZeroPages">map zero-filled pages to the zero page.</param>
/// <param name="MaxPageSharing">most mappings of one KSM page.</param>
/// <param name="StableNodeChainsPruneMillisecs">how often chains are pruned.</param>
/// <param name="SmartScan">skip pages that never merge.</param>
/// <param name="AdvisorMode">the pages_to_scan advisor.</param>
/// <param name="AdvisorMaxCpu">advisor CPU budget, percent.</param>
/// <param name="AdvisorTargetScanTime">advisor target for a full scan, seconds.</param>
/// <param name="AdvisorMinPagesToScan">pages_to_scan when the advisor starts.</param>
/// <param name="AdvisorMaxPagesToScan">the advisor's upper bound.</param>
public sealed record KsmKnobs(
    int Run, uint PagesToScan, uint SleepMillisecs, bool MergeAcrossNodes, bool UseZeroPages, int MaxPageSharing,
    uint StableNodeChainsPruneMillisecs, bool SmartScan, KsmAdvisorMode AdvisorMode, ulong AdvisorMaxCpu,
    ulong AdvisorTargetScanTime, ulong AdvisorMinPagesToScan, ulong AdvisorMaxPagesToScan);

/// <summary>
/// Kernel samepage merging for one <see cref="Machine"/>: identical anonymous pages of mergeable
/// memory are merged into one read-only page, and copied again on write. Knobs are written like
/// /sys/kernel/mm/ksm files (<see cref="Write"/>); the scanner runs as a background thread while
/// <c>run</c> is 1, or step by step through <see cref="ScanPages"/> and <see cref="RunFullScans"/>.
/// </summary>
/// <remarks>
/// This type is thread-safe: all members may be used concurrently from multiple threads. Scan batches (ksmd's and
/// those of ScanPages / RunFullScans), run=2 and the knob writes that rebuild the indexes serialize on
/// one mutex (Linux's ksm_thread_mutex); counters and knobs are read without it, so a snapshot taken
/// while a batch runs may mix before and after. KSM lives exactly as long as its machine: the machine's
/// Dispose stops ksmd and the memory-release worker (waiting for the batch in progress) before it frees
/// any memory, and every member then throws <see cref="ObjectDisposedException"/>. With
/// <see cref="MachineOptions.BackgroundThreads"/> false no thread of KSM's ever runs: run=1 enables merging,
/// and the host advances it with ScanPages / RunFullScans and gives freed memory back with
/// WaitForMemoryRelease.
/// </remarks>
/// <example>
/// <code>
/// machine.Ksm!.Write("pages_to_scan", "10000");
/// process.Madvise(address, length, Advice.Mergeable);
/// machine.Ksm.RunFullScans(2);            // deterministic: two full passes
/// KsmStats stats = machine.Ksm.GetStats(); // pages_shared, pages_sharing, ...
/// </code>
/// </example>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "KSM lives as long as its machine, which stops it (Shutdown) when it is disposed.")]
public sealed partial class Ksm
{
    /// <summary>Bytes of metadata per rmap item in the profit formulas: the item and its index share.</summary>
    public static readonly int RmapItemBytes = System.Runtime.CompilerServices.Unsafe.SizeOf<KsmRmapItem>() + sizeof(int);

    private readonly Machine _machine;
    private readonly object _threadMutex = new();   // ksm_thread_mutex
    private readonly Lock _mmListLock = new();      // ksm_mmlist_lock
    private readonly KsmMmSlot _head = new(null, -1);
    private KsmMmSlot?[] _slots = new KsmMmSlot?[64];
    private readonly Stack<int> _freeSlotIndexes = new();
    private int _slotCount;

    // ---- knobs (plain stores, except where a write takes the thread mutex) ----
    private volatile int _run;
    private uint _pagesToScan = 100;
    private uint _sleepMillisecs = 20;
    private bool _mergeAcrossNodes = true;
    private volatile bool _useZeroPages;
    private int _maxPageSharing = 256;
    private uint _pruneMillisecs = 2000;
    private volatile bool _smartScan = true;
    private KsmAdvisorMode _advisorMode;
    private ulong _advisorMaxCpu = 70;
    private ulong _advisorTargetScanTime = 200;
    private ulong _advisorMinPagesToScan = 500;
    private ulong _advisorMaxPagesToScan = 30000;

    // ---- counters (written under the thread mutex unless atomic) ----
    private long _pagesShared, _pagesSharing, _pagesUnshared, _pagesScanned, _pagesSkipped;
    private long _stableNodeChains, _stableNodeDups;
    private long _zeroPages;   // atomic
    private long _cowKsm;      // atomic

    // ---- ksmd ----
    private readonly AutoResetEvent _wake = new(false);
    private Thread? _thread;
    private volatile bool _stopping;
    private readonly Stopwatch _busy = new(); // time spent in batches: ksmd's CPU time for the advisor

    internal Ksm(Machine machine)
    {
        _machine = machine;
        _cursorSlot = _head;
        int nodes = machine.Topology.NodeCount;
        _stableTrees = [new Dictionary<ulong, KsmStableNode>()];
        _unstableBuckets = [new int[InitialBuckets]];
        Array.Fill(_unstableBuckets[0], -1);
        _unstableMask = InitialBuckets - 1;
        _nodeCount = nodes;
        _domainSecrets[0] = NewSecret();
        MemoryNotifierRegistration = machine.Hotplug.RegisterNotifier(MemoryCallback, MemoryCallbackPriority);
    }

    // ================================================================================================
    // Knobs
    // ================================================================================================

    /// <summary>Every knob's current value.</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public KsmKnobs GetKnobs()
    {
        using MachineCall call = _machine.EnterCall();
        return Knobs;
    }

    private KsmKnobs Knobs => new(_run, Volatile.Read(ref _pagesToScan), Volatile.Read(ref _sleepMillisecs), _mergeAcrossNodes,
        _useZeroPages, _maxPageSharing, _pruneMillisecs, _smartScan, _advisorMode, _advisorMaxCpu, _advisorTargetScanTime,
        _advisorMinPagesToScan, _advisorMaxPagesToScan);

    /// <summary>The knobs: the writable /sys/kernel/mm/ksm files, which <see cref="Write"/> and <see cref="Read"/> accept.</summary>
    public static IReadOnlyList<string> KnobNames { get; } =
    [
        "run", "pages_to_scan", "sleep_millisecs", "merge_across_nodes", "use_zero_pages", "max_page_sharing",
        "stable_node_chains_prune_millisecs", "smart_scan", "advisor_mode", "advisor_max_cpu",
        "advisor_target_scan_time", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
    ];

    /// <summary>
    /// The counters: the read-only /sys/kernel/mm/ksm files, which <see cref="Read"/> and <see cref="TryRead"/>
    /// accept and <see cref="Write"/> refuses with EACCES.
    /// </summary>
    public static IReadOnlyList<string> CounterNames { get; } =
    [
        "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "pages_scanned", "pages_skipped",
        "full_scans", "stable_node_chains", "stable_node_dups", "ksm_zero_pages", "general_profit",
    ];

    /// <summary>A counter's value by its file name, or null for a name that is not a counter.</summary>
    private string? ReadCounter(string name)
    {
        if (!CounterNames.Contains(name))
            return null;
        KsmStats c = GetStats();
        long value = name switch
        {
            "pages_shared" => c.PagesShared,
            "pages_sharing" => c.PagesSharing,
            "pages_unshared" => c.PagesUnshared,
            "pages_volatile" => c.PagesVolatile,
            "pages_scanned" => c.PagesScanned,
            "pages_skipped" => c.PagesSkipped,
            "full_scans" => c.FullScans,
            "stable_node_chains" => c.StableNodeChains,
            "stable_node_dups" => c.StableNodeDups,
            "ksm_zero_pages" => c.KsmZeroPages,
            _ => c.GeneralProfit,
        };
        return value.ToString(CultureInfo.InvariantCulture);
    }

    /// <summary>
    /// Writes a knob as writing its /sys/kernel/mm/ksm file would, with Linux's rules: a value that
    /// does not parse is EINVAL (ERANGE where Linux's parser reports it); run above 2, merge_across_nodes
    /// above 1, max_page_sharing below 2 and advisor_target_scan_time 0 are EINVAL; pages_to_scan is
    /// EINVAL while the advisor is on; merge_across_nodes and max_page_sharing are EBUSY while KSM pages
    /// exist (the procedure: run=2, change, run=1); run=2 unmerges everything before it returns and
    /// reports ENOMEM if it ran out of memory (run is then 0). A trailing newline is accepted. A name
    /// that is no file is ENOENT (opening a missing sysfs file); a counter (<see cref="CounterNames"/>) is
    /// EACCES, as kernfs refuses to open a file without a store method for writing, even for root.
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="knob"/> or <paramref name="value"/> is null.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Write(string knob, string value)
    {
        ArgumentNullException.ThrowIfNull(knob);
        ArgumentNullException.ThrowIfNull(value);
        using MachineCall call = _machine.EnterCall();
        if (CounterNames.Contains(knob))
            return Errno.EACCES;
        string text = value.EndsWith('\n') ? value[..^1] : value;
        switch (knob)
        {
            case "run":
                return ParseUInt(text, out uint run) != Errno.None || run > 2 ? Errno.EINVAL : SetRun((int)run);
            case "pages_to_scan":
                if (_advisorMode != KsmAdvisorMode.None)
                    return Errno.EINVAL;
                if (ParseUInt(text, out uint pages) != Errno.None)
                    return Errno.EINVAL;
                Volatile.Write(ref _pagesToScan, pages);
                return Errno.None;
            case "sleep_millisecs":
                if (ParseUInt(text, out uint sleep) != Errno.None)
                    return Errno.EINVAL;
                Volatile.Write(ref _sleepMillisecs, sleep);
                _wake.Set(); // the new pause applies at once
                return Errno.None;
            case "merge_across_nodes":
            {
                Errno parsed = ParseULong(text, out ulong across);
                if (parsed != Errno.None)
                    return parsed;
                return across > 1 ? Errno.EINVAL : SetMergeAcrossNodes(across == 1);
            }
            case "use_zero_pages":
                if (!ParseBool(text, out bool zero))
                    return Errno.EINVAL;
                _useZeroPages = zero;
                return Errno.None;
            case "max_page_sharing":
            {
                Errno parsed = ParseInt(text, out int sharing);
                if (parsed != Errno.None)
                    return parsed;
                return sharing < 2 ? Errno.EINVAL : SetMaxPageSharing(sharing);
            }
            case "stable_node_chains_prune_millisecs":
                if (ParseUInt(text, out uint prune) != Errno.None)
                    return Errno.EINVAL;
                _pruneMillisecs = prune;
                return Errno.None;
            case "smart_scan":
                if (!ParseBool(text, out bool smart))
                    return Errno.EINVAL;
                _smartScan = smart;
                return Errno.None;
            case "advisor_mode":
                return SetAdvisorMode(text);
            case "advisor_max_cpu":
                return StoreULong(text, ref _advisorMaxCpu, allowZero: true);
            case "advisor_target_scan_time":
                return StoreULong(text, ref _advisorTargetScanTime, allowZero: false);
            case "advisor_min_pages_to_scan":
                return StoreULong(text, ref _advisorMinPagesToScan, allowZero: true);
            case "advisor_max_pages_to_scan":
                return StoreULong(text, ref _advisorMaxPagesToScan, allowZero: true);
            default:
                return Errno.ENOENT;
        }
    }

    /// <summary>Reads a knob or a counter as its /sys/kernel/mm/ksm file shows it (without the newline).</summary>
    /// <exception cref="ArgumentNullException"><paramref name="knob"/> is null.</exception>
    /// <exception cref="ArgumentException">no such file (<see cref="TryRead"/> reports ENOENT instead).</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public string Read(string knob) =>
        TryRead(knob, out string value) == Errno.None ? value : throw new ArgumentException($"no KSM file named '{knob}'", nameof(knob));

    /// <summary>
    /// Reads a knob or a counter as its /sys/kernel/mm/ksm file shows it (without the newline). ENOENT
    /// (and an empty <paramref name="value"/>) for a name that is no file.
    /// </summary>
    /// <exception cref="ArgumentNullException"><paramref name="name"/> is null.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno TryRead(string name, out string value)
    {
        ArgumentNullException.ThrowIfNull(name);
        using MachineCall call = _machine.EnterCall();
        string? found = ReadCounter(name) ?? ReadKnob(name);
        value = found ?? "";
        return found is null ? Errno.ENOENT : Errno.None;
    }

    private string? ReadKnob(string knob)
    {
        KsmKnobs k = GetKnobs();
        return knob switch
        {
            "run" => k.Run.ToString(CultureInfo.InvariantCulture),
            "pages_to_scan" => k.PagesToScan.ToString(CultureInfo.InvariantCulture),
            "sleep_millisecs" => k.SleepMillisecs.ToString(CultureInfo.InvariantCulture),
            "merge_across_nodes" => k.MergeAcrossNodes ? "1" : "0",
            "use_zero_pages" => k.UseZeroPages ? "1" : "0",
            "max_page_sharing" => k.MaxPageSharing.ToString(CultureInfo.InvariantCulture),
            "stable_node_chains_prune_millisecs" => k.StableNodeChainsPruneMillisecs.ToString(CultureInfo.InvariantCulture),
            "smart_scan" => k.SmartScan ? "1" : "0",
            "advisor_mode" => k.AdvisorMode == KsmAdvisorMode.None ? "[none] scan-time" : "none [scan-time]",
            "advisor_max_cpu" => k.AdvisorMaxCpu.ToString(CultureInfo.InvariantCulture),
            "advisor_target_scan_time" => k.AdvisorTargetScanTime.ToString(CultureInfo.InvariantCulture),
            "advisor_min_pages_to_scan" => k.AdvisorMinPagesToScan.ToString(CultureInfo.InvariantCulture),
            "advisor_max_pages_to_scan" => k.AdvisorMaxPagesToScan.ToString(CultureInfo.InvariantCulture),
            _ => null,
        };
    }

    /// <summary>
    /// run: 0 stops ksmd, 1 starts it, 2 unmerges every KSM page and frees every rmap item (before it
    /// returns). EINVAL above 2; ENOMEM if run=2 ran out of memory (run is then 0). Without background
    /// threads (<see cref="MachineOptions.BackgroundThreads"/> false) 1 starts no thread: merging is
    /// enabled and the host advances it with <see cref="ScanPages"/> and <see cref="RunFullScans"/>.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno SetRun(int value)
    {
        if ((uint)value > 2)
            return Errno.EINVAL;
        using MachineCall call = _machine.EnterCall();
        lock (_threadMutex)
        {
            WaitWhileOfflining();
            if (_run == value)
                return Errno.None;
            _run = value;
            if (value == 2)
            {
                Errno error = UnmergeAndRemoveAllRmapItems();
                if (error != Errno.None)
                {
                    _run = 0;
                    return error;
                }
            }
        }
        if (value == 1)
        {
            EnsureThread();
            _wake.Set();
        }
        return Errno.None;
    }

    private Errno SetAdvisorMode(string text)
    {
        KsmAdvisorMode mode;
        if (text == "none")
            mode = KsmAdvisorMode.None;
        else if (text == "scan-time")
            mode = KsmAdvisorMode.ScanTime;
        else
            return Errno.EINVAL;
        if (mode == _advisorMode)
            return Errno.None;
        _advisorMode = mode;
        // A change resets pages_to_scan: the default by hand, the advisor's starting point otherwise.
        if (mode == KsmAdvisorMode.None)
        {
            Volatile.Write(ref _pagesToScan, 100u);
        }
        else
        {
            _advisorScanTime = 0;
            _advisorChange = 0;
            _advisorCpuTicks = 0;
            Volatile.Write(ref _pagesToScan, (uint)Math.Min(_advisorMinPagesToScan, uint.MaxValue));
        }
        return Errno.None;
    }

    private static Errno StoreULong(string text, ref ulong field, bool allowZero)
    {
        if (ParseULong(text, out ulong value) != Errno.None || (!allowZero && value == 0))
            return Errno.EINVAL;
        field = value;
        return Errno.None;
    }

    // kstrtouint / kstrtoul / kstrtoint with base 10: an optional '+', digits; ERANGE on overflow.
    private static Errno ParseULong(string text, out ulong value)
    {
        value = 0;
        string digits = text.StartsWith('+') ? text[1..] : text;
        if (digits.Length == 0 || !digits.All(char.IsAsciiDigit))
            return Errno.EINVAL;
        return ulong.TryParse(digits, NumberStyles.None, CultureInfo.InvariantCulture, out value) ? Errno.None : Errno.ERANGE;
    }

    private static Errno ParseUInt(string text, out uint value)
    {
        value = 0;
        Errno error = ParseULong(text, out ulong wide);
        if (error != Errno.None)
            return error;
        if (wide > uint.MaxValue)
            return Errno.ERANGE;
        value = (uint)wide;
        return Errno.None;
    }

    private static Errno ParseInt(string text, out int value)
    {
        value = 0;
        bool negative = text.StartsWith('-');
        Errno error = ParseULong(negative ? text[1..] : text, out ulong magnitude);
        if (error != Errno.None)
            return error;
        if (magnitude > (negative ? 1UL << 31 : int.MaxValue))
            return Errno.ERANGE;
        value = negative ? (int)-(long)magnitude : (int)magnitude;
        return Errno.None;
    }

    // kstrtobool: y/Y/1/n/N/0, or on/off (any case).
    private static bool ParseBool(string text, out bool value)
    {
        value = false;
        if (text.Length == 0)
            return false;
        switch (char.ToLowerInvariant(text[0]))
        {
            case 'y' or '1':
                value = true;
                return true;
            case 'n' or '0':
                return true;
            case 'o' when text.Length > 1:
                char second = char.ToLowerInvariant(text[1]);
                value = second == 'n';
                return second is 'n' or 'f';
            default:
                return false;
        }
    }

    // ================================================================================================
    // Counters
    // ================================================================================================

    /// <summary>A snapshot of the counters (exact when no batch runs meanwhile).</summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public KsmStats GetStats()
    {
        using MachineCall call = _machine.EnterCall();
        long shared = Volatile.Read(ref _pagesShared), sharing = Volatile.Read(ref _pagesSharing);
        long unshared = Volatile.Read(ref _pagesUnshared), items = Volatile.Read(ref _rmapItemCount);
        long zero = Volatile.Read(ref _zeroPages);
        long volatilePages = Math.Max(0, items - shared - sharing - unshared);
        return new KsmStats(shared, sharing, unshared, volatilePages, Volatile.Read(ref _pagesScanned),
            Volatile.Read(ref _pagesSkipped), Volatile.Read(ref _seqnr), Volatile.Read(ref _stableNodeChains),
            Volatile.Read(ref _stableNodeDups), zero, items,
            (sharing + zero) * Topology.PageSize - items * RmapItemBytes, Volatile.Read(ref _cowKsm), MetadataBytes);
    }

    /// <summary>What KSM's own structures hold: item chunks, index buckets and stable nodes.</summary>
    private long MetadataBytes
    {
        get
        {
            long buckets = 0;
            foreach (int[] b in _unstableBuckets)
                buckets += (long)b.Length * sizeof(int);
            return _items.Bytes + buckets + Volatile.Read(ref _nodeObjects) * 160;
        }
    }

    internal static ProcessKsmStats GetProcessStats(AddressSpace mm)
    {
        long items = Volatile.Read(ref mm.KsmRmapItems), merging = Volatile.Read(ref mm.KsmMergingPages);
        long zero = Volatile.Read(ref mm.KsmZeroPages);
        bool mergeable;
        mm.MmapLock.EnterReadLock();
        try
        {
            mergeable = mm.Vmas.Any(v => (v.Flags & VmaFlags.Mergeable) != 0);
        }
        finally
        {
            mm.MmapLock.ExitReadLock();
        }
        return new ProcessKsmStats(items, zero, merging, (merging + zero) * Topology.PageSize - items * RmapItemBytes, mm.KsmMergeAny, mergeable);
    }

    internal void ZeroPagesChanged(int delta) => Interlocked.Add(ref _zeroPages, delta);

    internal void CountCowKsm() => Interlocked.Increment(ref _cowKsm);

    // ================================================================================================
    // The step API and ksmd
    // ================================================================================================

    /// <summary>
    /// Runs one scan batch of up to <paramref name="pages"/> pages on the calling thread (what ksmd does
    /// between sleeps), whatever <c>run</c> says. Stops early at the end of a full scan. Returns the
    /// pages examined. This is how a machine without background threads
    /// (<see cref="MachineOptions.BackgroundThreads"/> false) advances merging.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="pages"/> is negative.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public int ScanPages(int pages)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(pages);
        using MachineCall call = _machine.EnterCall();
        lock (_threadMutex)
        {
            WaitWhileOfflining();
            return DoScan(pages);
        }
    }

    /// <summary>
    /// Scans until <paramref name="count"/> more full scans have completed, on the calling thread. With
    /// no address space registered, returns at once.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="count"/> is negative.</exception>
    /// <exception cref="ObjectDisposedException">the machine was disposed (also between two scans: a Dispose on another thread stops the run).</exception>
    public void RunFullScans(int count)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        using MachineCall call = _machine.EnterCall();
        long target = Volatile.Read(ref _seqnr) + count;
        while (Volatile.Read(ref _seqnr) < target)
        {
            // A long run of scans does not hold up the machine's Dispose for long: it stops between scans.
            if (_machine.IsDisposed)
                throw new ObjectDisposedException(nameof(Machine), $"the machine ({_machine}) was disposed during RunFullScans");
            lock (_threadMutex)
            {
                WaitWhileOfflining();
                if (Volatile.Read(ref _seqnr) >= target)
                    return;
                if (IsListEmpty)
                    return;
                DoScan(int.MaxValue);
            }
        }
    }

    private bool IsListEmpty
    {
        get
        {
            lock (_mmListLock)
                return _head.Next == _head;
        }
    }

    private bool ShouldRun => _run == 1 && !IsListEmpty;

    /// <summary>True while ksmd's thread exists (started by run=1, never without background threads).</summary>
    internal bool HasThread
    {
        get
        {
            lock (_wake)
                return _thread is not null;
        }
    }

    private void EnsureThread()
    {
        lock (_wake)
        {
            // Without background threads the host steps KSM itself (MachineOptions.BackgroundThreads).
            if (_thread is not null || _stopping || !_machine.Options.BackgroundThreads)
                return;
            _thread = new Thread(ThreadLoop) { IsBackground = true, Name = "ksmd" };
            _thread.Start();
        }
    }

    /// <summary>ksm_scan_thread: a batch of pages_to_scan, then sleep_millisecs, while run is 1.</summary>
    private void ThreadLoop()
    {
        while (!_stopping)
        {
            if (ShouldRun)
            {
                lock (_threadMutex)
                {
                    WaitWhileOfflining();
                    if (ShouldRun && !_stopping)
                    {
                        try
                        {
                            DoScan((int)Math.Min(Volatile.Read(ref _pagesToScan), int.MaxValue));
                        }
                        catch (Exception e)
                        {
                            // A bug (VmBugException) or a host failure: an exception escaping a background
                            // thread would end the host process. ksmd stops instead and says why.
                            Failure = e;
                            _run = 0;
                        }
                    }
                }
                uint sleep = Volatile.Read(ref _sleepMillisecs);
                if (sleep > 0)
                    _wake.WaitOne((int)Math.Min(sleep, int.MaxValue));
            }
            else
            {
                _wake.WaitOne(1000);
            }
        }
    }

    /// <summary>
    /// Why ksmd stopped on its own, or null: an exception in a background batch (a VmBugException is a
    /// bug in Vmm) stops ksmd (run becomes 0) instead of ending the host process. The step API throws
    /// such exceptions to its caller instead.
    /// </summary>
    public Exception? Failure { get; private set; }

    /// <summary>
    /// Machine.Dispose, first step: stops ksmd (waits for the batch it is in) and the memory-release
    /// worker, and keeps both from starting again. Host calls still in flight may go on (the machine
    /// waits for them next); they find no thread to wake.
    /// </summary>
    internal void StopBackgroundWork()
    {
        Thread? thread;
        lock (_wake)
        {
            _stopping = true;
            thread = _thread;
        }
        _wake.Set();
        thread?.Join();
        WaitForReleaseWorker(); // the worker uses the arena, which the machine frees next
    }

    /// <summary>Machine.Dispose, last step, once no call is in flight: frees the wait handles.</summary>
    internal void Shutdown()
    {
        WaitForReleaseWorker(); // one a host scan requested before StopBackgroundWork took the release lock
        _wake.Dispose();
        _releaseNow.Dispose();
    }

    // ================================================================================================
    // Registration (ksm_enter / ksm_exit, PR_SET_MEMORY_MERGE)
    // ================================================================================================

    /// <summary>
    /// __ksm_enter: gives the mm a slot on the scan list. A new slot goes just behind the cursor, so it
    /// is reached after a full lap (a fresh fork settles first); while run is 2 it goes to the tail, so
    /// that the unmerge pass still reaches it. Preconditions: the mm's mmap_lock held for write.
    /// </summary>
    internal void Enter(AddressSpace mm)
    {
        LockAssert.MmapLockHeld(mm, write: true);
        bool wasEmpty;
        lock (_mmListLock)
        {
            if (mm.KsmSlot is not null)
                return;
            int index = _freeSlotIndexes.Count > 0 ? _freeSlotIndexes.Pop() : _slotCount++;
            if (index >= _slots.Length)
            {
                var grown = new KsmMmSlot?[_slots.Length * 2];
                Array.Copy(_slots, grown, _slots.Length);
                Volatile.Write(ref _slots, grown);
            }
            var slot = new KsmMmSlot(mm, index);
            Volatile.Write(ref _slots[index], slot);
            wasEmpty = _head.Next == _head;
            KsmMmSlot before = _run == 2 ? _head : _cursorSlot;
            InsertBefore(slot, before);
            mm.KsmSlot = slot;
        }
        if (wasEmpty)
            _wake.Set();
    }

    /// <summary>
    /// __ksm_exit: called before exit tears the address space down. Never takes the thread mutex (ksmd
    /// may hold it while working on this very mm): a slot without items is freed at once; one with items
    /// moves just after the cursor, so ksmd reaches it next, sees the mm exiting and frees everything.
    /// </summary>
    internal void Exit(AddressSpace mm)
    {
        mm.KsmExiting = true;
        lock (_mmListLock)
        {
            KsmMmSlot? slot = mm.KsmSlot;
            if (slot is null || slot == _cursorSlot)
                return;
            Unlink(slot);
            if (slot.RmapList < 0)
            {
                FreeSlotLocked(slot);
                return;
            }
            InsertBefore(slot, _cursorSlot.Next);
        }
        // Exit then takes the mmap_lock for write, which waits out any KSM operation holding it for
        // read; every KSM path checks Exited after taking it.
    }

    /// <summary>Preconditions: the mm-list lock held; the slot unlinked and without items.</summary>
    private void FreeSlotLocked(KsmMmSlot slot)
    {
        LockAssert.Held(_mmListLock, "the KSM mm-list lock");
        LockAssert.That(slot.Next == slot && slot.Prev == slot, $"KSM slot {slot.Index} unlinked");
        if (slot.RmapList >= 0)
            throw new VmBugException($"KSM slot {slot.Index} freed with rmap items still on it");
        slot.Mm.KsmSlot = null;
        _slots[slot.Index] = null;
        _freeSlotIndexes.Push(slot.Index);
    }

    private static void InsertBefore(KsmMmSlot slot, KsmMmSlot before)
    {
        slot.Next = before;
        slot.Prev = before.Prev;
        before.Prev.Next = slot;
        before.Prev = slot;
    }

    private static void Unlink(KsmMmSlot slot)
    {
        slot.Prev.Next = slot.Next;
        slot.Next.Prev = slot.Prev;
        slot.Next = slot.Prev = slot;
    }

    private KsmMmSlot SlotOf(int index) => Volatile.Read(ref _slots)[index] ?? throw new VmBugException($"KSM slot {index} is gone");

    /// <summary>The registered address spaces in scan order (for tests and tools).</summary>
    internal List<AddressSpace> ScanOrder()
    {
        lock (_mmListLock)
        {
            var order = new List<AddressSpace>();
            for (KsmMmSlot s = _head.Next; s != _head; s = s.Next)
                order.Add(s.Mm);
            return order;
        }
    }
}
