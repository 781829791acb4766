using System.Collections.Concurrent;
using System.Diagnostics;
using Vmm.Memory;
using Vmm.Mm;

namespace Vmm.Tests.Stress;

/// <summary>What a stress region holds: private pages, fork-shared copy-on-write pages, or a MAP_SHARED mapping.</summary>
internal enum RegionKind { Private, Cow, Shared }

/// <summary>One region a writer owns: the process it writes through, its pages, its shadow and the lock that makes a write and its shadow update one step.</summary>
internal sealed class StressRegion(VmProcess process, ulong baseVa, int pages, RegionKind kind, int writer)
{
    public VmProcess Process { get; } = process;
    public ulong Base { get; } = baseVa;
    public int Pages { get; } = pages;
    public RegionKind Kind { get; } = kind;
    public int Writer { get; } = writer;
    public ulong[] Shadow { get; } = new ulong[pages * StressHarness.Words];
    public object Lock { get; } = new();

    /// <summary>Per page, how many times a writer dropped it (MADV_DONTNEED); a pin taken before a drop holds a frame the region no longer maps. Under <see cref="Lock"/>.</summary>
    public int[] Drops { get; } = new int[pages];

    public ulong Length => (ulong)Pages * StressHarness.Page;
    public ulong PageVa(int page) => Base + (ulong)page * StressHarness.Page;
    public override string ToString() => $"{Kind} region of writer {Writer} in {Process}";
}

/// <summary>
/// The sizes of a stress test's regions and where its third process lives. <see cref="ConfigureP2"/> runs
/// right after P2 is created, before any of its regions is mapped (a cpuset to attach it to, a policy).
/// </summary>
internal sealed record StressLayout(int PrivatePages, int CowPages, int SharedPages, int P2HomeNode = 0)
{
    /// <summary>Runs on P2 before its regions are mapped.</summary>
    public Action<VmProcess>? ConfigureP2 { get; init; }

    /// <summary>
    /// When set, writers also drop a page of their private or copy-on-write region now and then
    /// (MADV_DONTNEED: it reads as zeros and the next touch faults a new frame in), so faults keep
    /// allocating while the mechanisms run.
    /// </summary>
    public bool WritersDropPages { get; init; }
}

/// <summary>
/// The set-up every concurrency stress test of the memory mechanisms shares (Migration, Hotplug,
/// Compaction): three processes (P0; P1, forked from P0 after P0 wrote a copy-on-write region; P2, on
/// its own), each with a private mergeable region, P0 and P1 with the copy-on-write region, P0 with a
/// MAP_SHARED mapping that P1 also maps; a writer thread per region that writes known patterns (whole
/// pages from a small set, for KSM, and single words tagged with the writer) and reads pages back; a
/// shadow of every region (the oracle: every byte read must match it, so a lost write, a write seen by
/// another process or a stale read fails); and the background mechanisms of every test (a forker that
/// checks each child against a snapshot, move_pages, pins written through, ksmd and a KSM watcher or a
/// <c>ScanPages</c> stepper). A test adds its own mechanism threads with <see cref="Add"/>, runs them
/// with <see cref="Run"/>, then calls <see cref="CheckEveryRegion"/> and, last,
/// <see cref="ExitEveryProcessAndAssertEveryFrameFree"/>.
/// </summary>
/// <remarks>
/// Bounded by iterations in CI: writers run <see cref="OpsPerWriter"/> operations (scaled by
/// VMM_STRESS_SCALE) and go on while <see cref="MechanismsShort"/> says the test's mechanisms have not
/// done their minimum yet, up to a safety bound; with VMM_STRESS_SECONDS every thread runs that long
/// instead (the soak), and the minimums become "at least once" (<see cref="AtLeast"/>). Mechanism
/// threads run while any writer runs; the first failure stops everything.
/// </remarks>
internal sealed class StressHarness
{
    public const ulong Page = 4096;
    public const int Words = (int)Page / 8;

    private readonly List<Thread> _threads = [];
    private readonly ManualResetEventSlim _start = new();
    private readonly List<StressRegion> _regions = [];
    private int _writersRunning;
    private bool _ksmdStarted;

    // Counters of the shared mechanisms: fields, so that threads add to them with Interlocked.
    public long Checks;
    public long Forks;
    public long Pins;
    public long PinnedWrites;
    public long Drops;
    public long MaxSharing;
    public long KsmScanned;
    public long MovePagesCalls;
    public long MovePagesPlaced;
    public long MovePagesBusy;

    /// <summary>Builds the processes and regions on <paramref name="machine"/> (a fresh one with KSM) and writes their first contents.</summary>
    public StressHarness(Machine machine, string name, int seed, StressLayout layout)
    {
        Machine = machine;
        Name = name;
        Seed = seed;
        Layout = layout;
        FreeAtBoot = machine.GetStats().AllFreePages;
        ManagedAtBoot = ManagedPerZone(machine);

        // P0 maps the shared mapping and the copy-on-write region, writes the latter and forks P1: both
        // map the same frames until a write breaks the sharing.
        P0 = machine.CreateProcess(homeNode: 0);
        Assert.That(P0.Mmap(0, (ulong)layout.SharedPages * Page, Protection.ReadWrite, MapFlags.Shared, out ulong sharedBase), Is.EqualTo(Errno.None));
        ulong cowBase = P0.Mmap((ulong)layout.CowPages * Page);
        Assert.That(P0.Madvise(cowBase, (ulong)layout.CowPages * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
        var cowInitial = new ulong[layout.CowPages * Words];
        for (int w = 0; w < cowInitial.Length; w++)
            cowInitial[w] = PatternWord(1 + w / Words % 3, w % Words);
        byte[] bytes = new byte[layout.CowPages * (int)Page];
        Buffer.BlockCopy(cowInitial, 0, bytes, 0, bytes.Length);
        P0.Write(cowBase, bytes);
        P1 = P0.Fork();
        P2 = machine.CreateProcess(homeNode: layout.P2HomeNode);
        layout.ConfigureP2?.Invoke(P2);
        Processes = [P0, P1, P2];

        int writerId = 0;
        foreach (VmProcess p in Processes)
        {
            ulong va = p.Mmap((ulong)layout.PrivatePages * Page);
            Assert.That(p.Madvise(va, (ulong)layout.PrivatePages * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
            _regions.Add(new StressRegion(p, va, layout.PrivatePages, RegionKind.Private, ++writerId));
        }
        foreach (VmProcess p in new[] { P0, P1 })
        {
            var region = new StressRegion(p, cowBase, layout.CowPages, RegionKind.Cow, ++writerId);
            cowInitial.CopyTo(region.Shadow, 0);
            _regions.Add(region);
        }
        Shared = new StressRegion(P0, sharedBase, layout.SharedPages, RegionKind.Shared, ++writerId);
        _regions.Add(Shared);
        // Every private page starts with pattern 1: duplicates everywhere, so KSM merges from its first pass.
        foreach (StressRegion r in _regions.Where(r => r.Kind == RegionKind.Private))
        {
            for (int w = 0; w < r.Shadow.Length; w++)
                r.Shadow[w] = PatternWord(1, w % Words);
            byte[] initial = new byte[r.Length];
            Buffer.BlockCopy(r.Shadow, 0, initial, 0, initial.Length);
            r.Process.Write(r.Base, initial);
        }
        Stopwatch = Stopwatch.StartNew();
    }

    public Machine Machine { get; }
    public string Name { get; }
    public int Seed { get; }
    public StressLayout Layout { get; }
    public Vmm.Ksm Ksm => Machine.Ksm!;
    public VmProcess P0 { get; }
    public VmProcess P1 { get; }
    public VmProcess P2 { get; }
    public VmProcess[] Processes { get; }
    public IReadOnlyList<StressRegion> Regions => _regions;
    public StressRegion Shared { get; }
    public Stopwatch Stopwatch { get; }
    public ConcurrentQueue<string> Failures { get; } = new();

    /// <summary>Free frames before the harness made its processes.</summary>
    public long FreeAtBoot { get; }

    /// <summary>Managed frames of every zone (node by node) before the harness made its processes.</summary>
    public long[] ManagedAtBoot { get; }

    /// <summary>Operations each writer does at least in a bounded run.</summary>
    public int OpsPerWriter { get; init; } = 3_000 * TestEnvironment.StressScale;

    /// <summary>True while the test's mechanisms have not done their minimum of a bounded run: the writers go on.</summary>
    public Func<bool> MechanismsShort { get; set; } = () => false;

    /// <summary>The soak's length (VMM_STRESS_SECONDS), or null for a bounded run.</summary>
    public TimeSpan? Duration { get; } = TestEnvironment.StressDuration;

    /// <summary>How long a bounded run may take before its writers stop whatever the minimums say.</summary>
    public TimeSpan Safety { get; init; } = TimeSpan.FromSeconds(120);

    /// <summary>A minimum to assert on a counter: <paramref name="bounded"/> in a bounded run, 1 in a soak (whose length, not its count, is fixed).</summary>
    public long AtLeast(long bounded) => Duration is null ? bounded : 1;

    public static ulong PatternWord(int pattern, int word) => pattern == 0 ? 0 : 0x0101_0101_0101_0101UL * (ulong)pattern ^ (ulong)word;

    public static long[] ManagedPerZone(Machine machine) =>
        [.. machine.GetStats().Nodes.SelectMany(n => n.Zones).Select(z => z.ManagedPages)];

    public void Fail(string what) => Failures.Enqueue($"seed {Seed}, {Stopwatch.Elapsed.TotalSeconds:F1} s: {what}");

    /// <summary>Whether a writer goes on to its operation <paramref name="i"/>.</summary>
    public bool More(long i) => Duration is { } d
        ? Stopwatch.Elapsed < d && Failures.IsEmpty
        : (i < OpsPerWriter || MechanismsShort()) && Stopwatch.Elapsed < Safety && Failures.IsEmpty;

    /// <summary>Whether the mechanism threads go on: while a writer runs and nothing failed.</summary>
    public bool Running() => Volatile.Read(ref _writersRunning) > 0 && Failures.IsEmpty;

    /// <summary>A random page of a random region, and the process to reach it through (the shared mapping: either P0 or P1).</summary>
    public (StressRegion Region, int Page, VmProcess Through) PickPage(Random random)
    {
        StressRegion region = _regions[random.Next(_regions.Count)];
        int page = random.Next(region.Pages);
        VmProcess through = region.Kind == RegionKind.Shared ? Processes[random.Next(2)] : region.Process;
        return (region, page, through);
    }

    /// <summary>Reads one page through a process and reports the first word that differs from the shadow.</summary>
    public void CheckPage(VmProcess process, ulong pageVa, ulong[] shadow, int page, byte[] buffer, string who)
    {
        process.Read(pageVa, buffer);
        for (int s = 0; s < Words; s++)
        {
            ulong seen = BitConverter.ToUInt64(buffer, s * 8);
            if (seen != shadow[page * Words + s])
            {
                Fail($"{who}: page {page} (0x{pageVa:x}) word {s} reads {seen:x}, expected {shadow[page * Words + s]:x}" + Diagnose(process, pageVa));
                return;
            }
        }
        Interlocked.Increment(ref Checks);
    }

    /// <summary>
    /// What the page tables and the frame trace (VMM_FRAME_TRACE=1) say about a page whose check failed:
    /// its PTE, its frame's descriptor, every other mapping of the frame, the frame's history (and its
    /// migration partners'), and the address's history; then the page read again.
    /// </summary>
    private unsafe string Diagnose(VmProcess process, ulong pageVa)
    {
        var text = new System.Text.StringBuilder();
        try
        {
            // First, before anything can change it: the page again, and this thread's TLB entry for it.
            byte[] again = new byte[Page];
            process.Read(pageVa, again);
            MemMap memMap = Machine.MemMap;
            Vmm.Mm.AddressSpace mm = process.Mm;
            ulong vpn = pageVa >> 12;
            Vmm.Mm.TlbEntry entry = Vmm.Mm.AccessContext.Current.Tlb[(int)(vpn & (Vmm.Mm.AccessContext.TlbEntries - 1))];
            long generation = Volatile.Read(ref mm.Generation);
            text.Append($"\n  read again at once: word 0 {BitConverter.ToUInt64(again, 0):x}; TLB entry: mm {entry.MmId} vpn 0x{entry.Vpn:x} generation {entry.Generation} (mm's {generation}) "
                + $"frame {(entry.Frame == 0 ? -1 : (long)(((byte*)entry.Frame - Machine.Arena.Base) >> 12))} writable {entry.Writable}\n");
            ulong* slot = mm.FindPte(pageVa, out _);
            var pte = new Pte(slot == null ? 0 : Volatile.Read(ref *slot));
            text.Append($"  mm {mm.Id}: pte {pte} (0x{pte.Value:x})\n");
            var frames = new List<long>();
            if (pte.Value != 0 && !pte.IsSpecial)
            {
                long pfn = pte.Pfn;
                frames.Add(pfn);
                ref PageDescriptor d = ref memMap[pfn];
                text.Append($"  frame {pfn}: flags {(PageFlags)d.Flags} mapping 0x{d.Mapping:x} refcount {d.RefCount} mapcount {d.MapCount} pincount {d.PinCount}\n");
            }
            if (memMap.Trace is { } trace)
            {
                text.Append(trace.DumpAddress(Vmm.Diagnostics.FrameTrace.At(mm.Id, pageVa), out List<long> named));
                foreach (long f in frames.Concat(named).Where(f => f >= 0).Distinct())
                    text.Append(trace.Dump(f));
            }
            text.Append($"  machine audit (racy): {string.Join(", ", Machine.Audit().Take(5))}\n");
        }
        catch (Exception e)
        {
            text.Append($"\n  (diagnosis failed: {e.GetType().Name}: {e.Message})");
        }
        return text.ToString();
    }

    /// <summary>
    /// Writes one word through a pin (a device's DMA) and into the shadow, under the region's lock; unless
    /// a writer dropped the page since <paramref name="drops"/> was read (before the pin): then the pinned
    /// frame may be one the region no longer maps, and a write into it is, as in Linux, seen by nobody.
    /// </summary>
    public void PinnedWrite(StressRegion region, ulong va, PinnedMemory pin, int drops, Random random)
    {
        int page = (int)((va - region.Base) / Page), w = random.Next(Words);
        ulong v = 0x00DD_0000_0000_0000UL | ((ulong)region.Writer << 56) | (ulong)Interlocked.Increment(ref PinnedWrites);
        lock (region.Lock)
        {
            if (region.Drops[page] != drops)
                return;
            BitConverter.TryWriteBytes(pin.GetSpan(0).Slice(w * 8, 8), v);
            region.Shadow[page * Words + w] = v;
        }
    }

    /// <summary>
    /// Pins the page at <paramref name="va"/> (for write: a device writing into it, whose writes go to
    /// the pinned frame, so a page moved while pinned would lose the second write), writes through it,
    /// runs <paramref name="hold"/> while pinned, writes again and unpins. False when a long-term pin was
    /// refused (its move out of ZONE_MOVABLE found the page busy: Linux's -ENOMEM, nothing pinned).
    /// </summary>
    public bool PinAndWrite(StressRegion region, VmProcess through, ulong va, bool write, bool longTerm, Random random, Action<PinnedMemory> hold)
    {
        int drops;
        lock (region.Lock)
            drops = region.Drops[(int)((va - region.Base) / Page)];
        PinnedMemory pin;
        try
        {
            pin = through.Pin(va, Page, write, longTerm);
        }
        catch (InsufficientMemoryException) when (longTerm)
        {
            return false;
        }
        using (pin)
        {
            Interlocked.Increment(ref Pins);
            if (write)
                PinnedWrite(region, va, pin, drops, random);
            hold(pin);
            if (write)
                PinnedWrite(region, va, pin, drops, random);
        }
        return true;
    }

    private void Writer(StressRegion region)
    {
        _start.Wait();
        var random = new Random(Seed * 31 + region.Writer);
        byte[] page = new byte[Page], buffer = new byte[Page];
        ulong tag = (ulong)region.Writer << 56;
        try
        {
            for (long i = 0; More(i); i++)
            {
                int target = random.Next(region.Pages);
                ulong pageVa = region.PageVa(target);
                // The shared mapping is written and read through either process: both map the same frames.
                VmProcess through = region.Kind == RegionKind.Shared ? Processes[random.Next(2)] : region.Process;
                int choice = random.Next(100);
                lock (region.Lock)
                {
                    if (choice < 40)
                    {
                        // A whole page from a small set of patterns (0 is zero-filled): duplicates for KSM.
                        int pattern = random.Next(4);
                        for (int w = 0; w < Words; w++)
                        {
                            ulong v = PatternWord(pattern, w);
                            BitConverter.TryWriteBytes(page.AsSpan(w * 8), v);
                            region.Shadow[target * Words + w] = v;
                        }
                        through.Write(pageVa, page);
                    }
                    else if (choice < 75)
                    {
                        // One word, tagged with the writer: the page becomes unique, and another
                        // process that sees the tag has seen a write that was not its own.
                        int w = random.Next(Words);
                        ulong v = tag | (ulong)(i + 1);
                        through.Write(pageVa + (ulong)w * 8, v);
                        region.Shadow[target * Words + w] = v;
                    }
                    else if (region.Kind == RegionKind.Shared && choice < 78)
                    {
                        // Drop one process's PTEs: it faults the pages in again (from the page cache) while they move.
                        through.Madvise(region.Base, region.Length, Advice.DontNeed);
                    }
                    else if (Layout.WritersDropPages && region.Kind != RegionKind.Shared && choice < 78)
                    {
                        // Drop an anonymous page: it reads as zeros, and the next write faults a new frame in.
                        Errno e = through.Madvise(pageVa, Page, Advice.DontNeed);
                        if (e != Errno.None)
                            Fail($"{region}: MADV_DONTNEED of page {target} returned {e}");
                        Array.Clear(region.Shadow, target * Words, Words);
                        region.Drops[target]++;
                        Interlocked.Increment(ref Drops);
                    }
                    else
                    {
                        VmProcess reader = region.Kind == RegionKind.Shared ? Processes[1 - Array.IndexOf(Processes, through)] : region.Process;
                        CheckPage(reader, pageVa, region.Shadow, target, buffer, region.ToString());
                    }
                }
            }
            lock (region.Lock)
            {
                for (int p = 0; p < region.Pages; p++)
                    CheckPage(region.Process, region.PageVa(p), region.Shadow, p, buffer, $"{region} at its end");
            }
        }
        catch (Exception e)
        {
            Fail($"{region}: {e}");
        }
        finally
        {
            Interlocked.Decrement(ref _writersRunning);
        }
    }

    /// <summary>
    /// Adds a mechanism thread: after the start it runs <paramref name="step"/> while <see cref="Running"/>,
    /// with its own seeded random, then <paramref name="after"/>; an exception is a failure of the test.
    /// </summary>
    public void Add(string name, int seedOffset, Action<Random> step, Action? after = null)
    {
        _threads.Add(new Thread(() =>
        {
            _start.Wait();
            var random = new Random(Seed * 31 + seedOffset);
            try
            {
                while (Running())
                    step(random);
                after?.Invoke();
            }
            catch (Exception e)
            {
                Fail($"{name}: {e}");
            }
        }) { Name = name });
    }

    /// <summary>
    /// Forks a random process with its writers stopped for the moment of the fork (a consistent
    /// snapshot), checks every byte of the child's private and copy-on-write pages against the snapshot
    /// and its shared pages against the live shadow, breaks one copy-on-write page in the child only, and
    /// exits it.
    /// </summary>
    public void AddForker(int seedOffset)
    {
        byte[] buffer = new byte[Page];
        Add("forker", seedOffset, random =>
        {
            VmProcess parent = Processes[random.Next(Processes.Length)];
            StressRegion[] mine = [.. _regions.Where(r => r.Process == parent && r.Kind != RegionKind.Shared)];
            VmProcess child;
            ulong[][] snapshot;
            foreach (StressRegion r in mine)
                Monitor.Enter(r.Lock);
            try
            {
                child = parent.Fork();
                snapshot = [.. mine.Select(r => (ulong[])r.Shadow.Clone())];
            }
            finally
            {
                foreach (StressRegion r in mine)
                    Monitor.Exit(r.Lock);
            }
            Interlocked.Increment(ref Forks);
            for (int k = 0; k < mine.Length; k++)
                for (int page = 0; page < mine[k].Pages; page++)
                    CheckPage(child, mine[k].PageVa(page), snapshot[k], page, buffer, $"child {child} of {mine[k]}");
            if (parent != P2)
            {
                lock (Shared.Lock)
                    for (int page = 0; page < Shared.Pages; page++)
                        CheckPage(child, Shared.PageVa(page), Shared.Shadow, page, buffer, $"child {child} through the shared mapping");
            }
            if (mine.Length > 0)
                child.Write<ulong>(mine[0].PageVa(random.Next(mine[0].Pages)), 0xDEAD_0000_0000_0000UL | (uint)child.Pid);
            child.Exit();
            Thread.Sleep(1);
        });
    }

    /// <summary>
    /// Short pins of random pages (a device writing into the page, for write pins): held a few
    /// milliseconds, during which a mover must wait for them, skip the page or give up on it.
    /// </summary>
    public void AddShortPinner(int seedOffset) => Add("pinner", seedOffset, random =>
    {
        (StressRegion region, int page, VmProcess through) = PickPage(random);
        bool write = random.Next(2) == 0;
        PinAndWrite(region, through, region.PageVa(page), write, longTerm: false, random, _ => Thread.Sleep(random.Next(3)));
        Thread.Sleep(random.Next(3));
    });

    /// <summary>
    /// move_pages: a few pages (an address anywhere in each page) of a random region to random nodes,
    /// called by a random process on the region's (pid), Move or MoveAll. Every page's status is its new
    /// node or a documented errno. <paramref name="acceptCallError"/> names a whole-call errno the test
    /// expects (a cpuset that flips); <paramref name="maxPauseMs"/> paces the thread.
    /// </summary>
    public void AddMovePagesMover(int seedOffset, Func<VmProcess, VmProcess, Errno, bool>? acceptCallError = null, int maxPauseMs = 0)
    {
        Add("move_pages mover", seedOffset, random =>
        {
            StressRegion region = _regions[random.Next(_regions.Count)];
            VmProcess target = region.Kind == RegionKind.Shared ? Processes[random.Next(2)] : region.Process;
            VmProcess caller = Processes[random.Next(Processes.Length)];
            int count = 1 + random.Next(12);
            ulong[] pages = new ulong[count];
            int[] nodes = new int[count], status = new int[count];
            for (int k = 0; k < count; k++)
            {
                pages[k] = region.PageVa(random.Next(region.Pages)) + (ulong)random.Next((int)Page);
                nodes[k] = random.Next(2);
            }
            MovePolicyFlags flags = random.Next(2) == 0 ? MovePolicyFlags.Move : MovePolicyFlags.MoveAll;
            Errno e = caller.MovePages(caller == target ? 0 : target.Pid, pages, nodes, status, flags);
            Interlocked.Increment(ref MovePagesCalls);
            if (e != Errno.None)
            {
                if (acceptCallError is null || !acceptCallError(caller, target, e))
                    Fail($"move_pages {flags} of {count} pages of {region} in {target} by {caller} returned {e}");
                return;
            }
            for (int k = 0; k < count; k++)
            {
                if (status[k] == nodes[k])
                    Interlocked.Increment(ref MovePagesPlaced);
                else if (status[k] == -(int)Errno.EBUSY)
                    Interlocked.Increment(ref MovePagesBusy);
                else if (status[k] is not (-(int)Errno.ENOENT or -(int)Errno.EACCES or -(int)Errno.ENOMEM))
                    Fail($"move_pages {flags} of 0x{pages[k]:x} ({region} in {target}) to node {nodes[k]}: status {status[k]}");
            }
            if (maxPauseMs > 0)
                Thread.Sleep(random.Next(maxPauseMs + 1));
        });
    }

    /// <summary>Starts ksmd at full speed (300 pages a pass, no sleep); <see cref="Run"/> stops it and checks it did not fail.</summary>
    public void StartKsmd()
    {
        Assert.That(Ksm.Write("pages_to_scan", "300"), Is.EqualTo(Errno.None));
        Assert.That(Ksm.Write("sleep_millisecs", "0"), Is.EqualTo(Errno.None));
        Assert.That(Ksm.Write("run", "1"), Is.EqualTo(Errno.None));
        _ksmdStarted = true;
    }

    /// <summary>Records the highest pages_sharing seen while the test runs.</summary>
    public void AddKsmWatcher() => Add("ksm watcher", 0, _ =>
    {
        ObserveSharing();
        Thread.Sleep(2);
    });

    /// <summary>Steps KSM by hand (<c>ScanPages</c>) beside ksmd, and records the highest pages_sharing.</summary>
    public void AddKsmScanner(int pagesPerStep) => Add("ksm scanner", 0, _ =>
    {
        Interlocked.Add(ref KsmScanned, Ksm.ScanPages(pagesPerStep));
        ObserveSharing();
        Thread.Sleep(1);
    });

    private void ObserveSharing()
    {
        long sharing = Ksm.GetStats().PagesSharing;
        long seen;
        while ((seen = Volatile.Read(ref MaxSharing)) < sharing && Interlocked.CompareExchange(ref MaxSharing, sharing, seen) != seen)
        {
        }
    }

    /// <summary>
    /// Starts a writer per region and every added mechanism thread at once, waits for all of them, stops
    /// ksmd (if started) and asserts that nothing failed.
    /// </summary>
    public void Run()
    {
        _writersRunning = _regions.Count;
        List<Thread> threads = [.. _regions.Select(r => new Thread(() => Writer(r)) { Name = $"writer {r.Writer}" }), .. _threads];
        threads.ForEach(t => t.Start());
        _start.Set();
        threads.ForEach(t => t.Join());
        if (_ksmdStarted)
            Assert.That(Ksm.Write("run", "0"), Is.EqualTo(Errno.None));
        if (Machine.Ksm is not null)
            Assert.That(Ksm.Failure, Is.Null, "ksmd did not stop on an exception");
        AssertNoFailure();
    }

    public void AssertNoFailure() => Assert.That(Failures, Is.Empty, string.Join("\n", Failures.Take(3)));

    /// <summary>
    /// Every byte of every region, through its own process and (the shared mapping) through both; then no
    /// failure is recorded and the audit is clean. Only for when no writer or mechanism runs any more.
    /// </summary>
    public void CheckEveryRegion(string when)
    {
        byte[] check = new byte[Page];
        foreach (StressRegion r in _regions)
            for (int page = 0; page < r.Pages; page++)
                foreach (VmProcess p in r.Kind == RegionKind.Shared ? new[] { P0, P1 } : [r.Process])
                    CheckPage(p, r.PageVa(page), r.Shadow, page, check, $"{when} of {r} through {p}");
        AssertNoFailure();
        TestMachines.AssertAuditClean(Machine);
    }

    /// <summary>
    /// Nothing lost: every process exits, KSM lets go of its trees, and then the audit is clean, every
    /// frame but the zero page is free and every zone manages what it managed before the harness began.
    /// </summary>
    public void ExitEveryProcessAndAssertEveryFrameFree()
    {
        foreach (VmProcess p in Processes)
            p.Exit();
        if (Machine.Ksm is not null)
            Assert.That(Ksm.Write("run", "2"), Is.EqualTo(Errno.None));
        Machine.Tlb.Flush();
        TestMachines.AssertAuditClean(Machine);
        long zeroPage = Machine.ZeroPagePfnIfAllocated >= 0 ? 1 : 0;
        Assert.That(Machine.GetStats().AllFreePages, Is.EqualTo(FreeAtBoot - zeroPage), "every frame but the zero page is free after every exit");
        Assert.That(ManagedPerZone(Machine), Is.EqualTo(ManagedAtBoot), "every zone manages what it did at boot");
    }

    /// <summary>The shared mechanisms' counts, for the test's report line.</summary>
    public string Report() =>
        $"{Name}, seed {Seed}: {Stopwatch.Elapsed.TotalSeconds:F1} s, {Checks} page checks; forks {Forks}; pins {Pins} ({PinnedWrites} writes through them); "
        + (Drops > 0 ? $"pages dropped {Drops}; " : "")
        + $"move_pages {MovePagesCalls} calls placed {MovePagesPlaced} pages ({MovePagesBusy} -EBUSY); "
        + $"KSM max pages_sharing {MaxSharing}, scanned by hand {KsmScanned}, full scans {Ksm.GetStats().FullScans}, cow_ksm {Ksm.GetStats().CowKsm}";
}
