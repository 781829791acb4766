using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using Vmm.Mm;

namespace Vmm.Tests.Hotplug;

/// <summary>
/// Memory offline and online under fire (issue 12, item 9): on a two-node machine of eight blocks, an
/// offliner takes blocks of both zones offline and brings them back, again and again (at most two
/// offline at once; a bounded number of passes, so an offline that cannot finish gives up with EBUSY;
/// some offlines cancelled by their token), while writer threads in three processes write known
/// patterns into private pages, fork-shared copy-on-write pages and a MAP_SHARED mapping and read them
/// back, ksmd merges the duplicate-rich ranges (and a second thread steps KSM with ScanPages), a forker
/// forks, checks the child against a snapshot and exits it, move_pages moves pages between the nodes,
/// and short pins hold pages (writing through them) so that some offlines fail. The oracle: a shadow
/// of every region; every byte read must match it, so a lost write (a page moved out of a block without
/// its last write), a stale read or a write seen by another process fails the test. Freed frames are
/// poisoned. Each offline's result is checked: success means the block is offline and no page of any
/// region is mapped from it; EBUSY is accepted only with blockers that explain it; EINTR only from a
/// cancelled token; anything else fails. A notifier below KSM's priority checks that KSM waits while a
/// block goes offline. At the end every block is online again, every byte is checked, the audit is
/// clean, and after every process exits every frame but the zero page is free and every zone manages
/// what it managed at boot.
/// </summary>
/// <remarks>
/// Bounded by iterations in CI (a few seconds per case); <c>VMM_STRESS_SECONDS=N</c> makes each case run
/// for N seconds (the soak).
/// </remarks>
[TestFixture]
[Category("Stress")]
[Category("Hotplug")]
public sealed class HotplugStressTests
{
    private const ulong Page = 4096;
    private const int Words = (int)Page / 8;
    private const int PrivatePages = 96;
    private const int CowPages = 64;
    private const int SharedPages = 32;
    private const int MaxOfflineAtOnce = 2;

    private enum Kind { Private, Cow, Shared }

    /// <summary>One region a writer owns: the process it writes through, its pages, its shadow and the lock that makes a write and its shadow update one step.</summary>
    private sealed class Region(VmProcess process, ulong baseVa, int pages, Kind kind, int writer)
    {
        public VmProcess Process { get; } = process;
        public ulong Base { get; } = baseVa;
        public int Pages { get; } = pages;
        public Kind Kind { get; } = kind;
        public int Writer { get; } = writer;
        public ulong[] Shadow { get; } = new ulong[pages * Words];
        public object Lock { get; } = new();
        public ulong Length => (ulong)Pages * Page;
        public override string ToString() => $"{Kind} region of writer {Writer} in {Process}";
    }

    private static ulong PatternWord(int pattern, int word) => pattern == 0 ? 0 : 0x0101_0101_0101_0101UL * (ulong)pattern ^ (ulong)word;

    [TestCase(0)]
    [TestCase(1)]
    public void No_byte_is_lost_while_blocks_of_both_zones_go_offline_and_online_under_writers_ksm_fork_and_move_pages(int mergeAcrossNodes)
    {
        int seed = TestEnvironment.Seed(12_000 + mergeAcrossNodes);
        using var machine = TestMachines.Create(TestMachines.TwoLargeNodes with { PoisonFreedFrames = true });
        Vmm.Ksm ksm = machine.Ksm!;
        MemoryHotplug hotplug = machine.Hotplug;
        Assert.That(hotplug.Blocks, Has.Count.EqualTo(8), "two nodes of four 8 MiB blocks");
        Assert.That(ksm.Write("merge_across_nodes", mergeAcrossNodes.ToString(CultureInfo.InvariantCulture)), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("max_page_sharing", "4"), Is.EqualTo(Errno.None));
        long freeAtBoot = machine.GetStats().AllFreePages;
        long[] managedAtBoot = ManagedPerZone(machine);
        ZoneType?[] zoneAtBoot = [.. hotplug.Blocks.Select(b => b.Zone)];

        // Every process lives on node 0, so node 1's NORMAL blocks hold no page table and can go offline;
        // node 0's NORMAL blocks hold the page tables (and the zero page): their offline must fail with
        // an explanation, or succeed when the tables happen to be elsewhere.
        VmProcess p0 = machine.CreateProcess(homeNode: 0);
        Assert.That(p0.Mmap(0, SharedPages * Page, Protection.ReadWrite, MapFlags.Shared, out ulong sharedBase), Is.EqualTo(Errno.None));
        ulong cowBase = p0.Mmap(CowPages * Page);
        Assert.That(p0.Madvise(cowBase, CowPages * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
        var cowInitial = new ulong[CowPages * Words];
        for (int w = 0; w < cowInitial.Length; w++)
            cowInitial[w] = PatternWord(1 + w / Words % 3, w % Words);
        byte[] bytes = new byte[CowPages * Page];
        Buffer.BlockCopy(cowInitial, 0, bytes, 0, bytes.Length);
        p0.Write(cowBase, bytes);
        VmProcess p1 = p0.Fork();
        VmProcess p2 = machine.CreateProcess(homeNode: 0);
        VmProcess[] processes = [p0, p1, p2];

        var regions = new List<Region>();
        int writerId = 0;
        foreach (VmProcess p in processes)
        {
            ulong va = p.Mmap(PrivatePages * Page);
            Assert.That(p.Madvise(va, PrivatePages * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
            regions.Add(new Region(p, va, PrivatePages, Kind.Private, ++writerId));
        }
        foreach (VmProcess p in new[] { p0, p1 })
        {
            var region = new Region(p, cowBase, CowPages, Kind.Cow, ++writerId);
            cowInitial.CopyTo(region.Shadow, 0);
            regions.Add(region);
        }
        var shared = new Region(p0, sharedBase, SharedPages, Kind.Shared, ++writerId);
        regions.Add(shared);
        foreach (Region r in regions.Where(r => r.Kind == Kind.Private))
        {
            for (int w = 0; w < r.Shadow.Length; w++)
                r.Shadow[w] = PatternWord(1, w % Words);
            byte[] initial = new byte[r.Length];
            Buffer.BlockCopy(r.Shadow, 0, initial, 0, initial.Length);
            r.Process.Write(r.Base, initial);
        }

        int opsPerWriter = 3_000 * TestEnvironment.StressScale;
        long minMovableOfflines = 4L * TestEnvironment.StressScale, minNormalOfflines = 2L * TestEnvironment.StressScale;
        long minForks = 5L * TestEnvironment.StressScale;
        TimeSpan? duration = TestEnvironment.StressDuration;
        var safety = TimeSpan.FromSeconds(120);
        var stopwatch = Stopwatch.StartNew();
        var failures = new ConcurrentQueue<string>();
        int writersRunning = regions.Count;
        long checks = 0, forks = 0, maxSharing = 0, pins = 0, pinnedWrites = 0, scanned = 0;
        long movePagesCalls = 0, movePagesPlaced = 0;
        long offlinedMovable = 0, offlinedNormal = 0, onlined = 0, busy = 0, busyAtIsolation = 0, interrupted = 0, pagesMovedByOffline = 0;
        long goingOfflineHeard = 0, ksmWaitedSeen = 0;
        var blockerReasons = new ConcurrentDictionary<OfflineBlockReason, long>();
        using var start = new ManualResetEventSlim();

        void Fail(string what) => failures.Enqueue($"seed {seed}, {stopwatch.Elapsed.TotalSeconds:F1} s: {what}");

        bool OfflinerShort() => Volatile.Read(ref offlinedMovable) < minMovableOfflines || Volatile.Read(ref offlinedNormal) < minNormalOfflines
                                || Volatile.Read(ref forks) < minForks;

        bool More(long i) => duration is { } d
            ? stopwatch.Elapsed < d && failures.IsEmpty
            : (i < opsPerWriter || OfflinerShort()) && stopwatch.Elapsed < safety && failures.IsEmpty;

        bool Running() => Volatile.Read(ref writersRunning) > 0 && failures.IsEmpty;

        // Below KSM's callback (priority 100): at MEM_GOING_OFFLINE KSM has already stopped its scanner
        // (KSM_RUN_OFFLINE), and at MEM_OFFLINE / MEM_CANCEL_OFFLINE it has let it go again.
        using IDisposable watcher = hotplug.RegisterNotifier((action, n) =>
        {
            switch (action)
            {
                case MemoryNotifierEvent.GoingOffline:
                    Interlocked.Increment(ref goingOfflineHeard);
                    if (!ksm.IsOfflining)
                        Fail($"KSM is not waiting at MEM_GOING_OFFLINE of pfn {n.StartPfn}");
                    else
                        Interlocked.Increment(ref ksmWaitedSeen);
                    break;
                case MemoryNotifierEvent.Offline or MemoryNotifierEvent.CancelOffline:
                    if (ksm.IsOfflining)
                        Fail($"KSM still waits at {action} of pfn {n.StartPfn}");
                    break;
            }
            return Errno.None;
        }, priority: 0);

        void CheckPage(VmProcess process, ulong pageVa, ulong[] shadow, int page, byte[] buffer, string who)
        {
            process.Read(pageVa, buffer);
            for (int s = 0; s < Words; s++)
            {
                ulong seen = BitConverter.ToUInt64(buffer, s * 8);
                if (seen != shadow[page * Words + s])
                {
                    Fail($"{who}: page {page} (0x{pageVa:x}) word {s} reads {seen:x}, expected {shadow[page * Words + s]:x}");
                    return;
                }
            }
            Interlocked.Increment(ref checks);
        }

        void Writer(Region region)
        {
            start.Wait();
            var random = new Random(seed * 31 + region.Writer);
            byte[] page = new byte[Page], buffer = new byte[Page];
            ulong tag = (ulong)region.Writer << 56;
            try
            {
                for (long i = 0; More(i); i++)
                {
                    int target = random.Next(region.Pages);
                    ulong pageVa = region.Base + (ulong)target * Page;
                    VmProcess through = region.Kind == Kind.Shared ? processes[random.Next(2)] : region.Process;
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
                            int w = random.Next(Words);
                            ulong v = tag | (ulong)(i + 1);
                            through.Write(pageVa + (ulong)w * 8, v);
                            region.Shadow[target * Words + w] = v;
                        }
                        else if (region.Kind == Kind.Shared && choice < 78)
                        {
                            through.Madvise(region.Base, region.Length, Advice.DontNeed);
                        }
                        else
                        {
                            VmProcess reader = region.Kind == Kind.Shared ? processes[1 - Array.IndexOf(processes, through)] : region.Process;
                            CheckPage(reader, pageVa, region.Shadow, target, buffer, region.ToString());
                        }
                    }
                }
                lock (region.Lock)
                {
                    for (int page2 = 0; page2 < region.Pages; page2++)
                        CheckPage(region.Process, region.Base + (ulong)page2 * Page, region.Shadow, page2, buffer, $"{region} at its end");
                }
            }
            catch (Exception e)
            {
                Fail($"{region}: {e}");
            }
            finally
            {
                Interlocked.Decrement(ref writersRunning);
            }
        }

        // No page of any region may be mapped from an offline block.
        void AssertNothingMappedFrom(MemoryBlock block)
        {
            foreach (Region r in regions)
            {
                for (int page = 0; page < r.Pages; page++)
                {
                    PagemapEntry entry = r.Process.GetPagemap(r.Base + (ulong)page * Page);
                    if (entry.Present && !entry.ZeroPage && entry.Pfn >= block.StartPfn && entry.Pfn < block.StartPfn + block.Frames)
                        Fail($"page {page} of {r} is mapped from frame {entry.Pfn} of {block}, offline");
                }
            }
        }

        // EBUSY must come with a reason: at least one blocker, and in ZONE_MOVABLE never an unmovable page.
        bool Explains(MemoryBlock block, ZoneType zone, OfflineResult result)
        {
            if (result.Blockers.Count == 0)
                return false;
            foreach (OfflineBlocker b in result.Blockers)
            {
                blockerReasons.AddOrUpdate(b.Reason, 1, (_, n) => n + 1);
                // What held the block during the last pass (another mover's isolation) let go before the
                // blockers were listed: the offline says so without a frame.
                if (b.Pfn == -1 && b.Reason == OfflineBlockReason.Busy)
                    continue;
                if (b.Pfn < block.StartPfn || b.Pfn >= block.StartPfn + block.Frames)
                    return false;
                bool acceptable = b.Reason switch
                {
                    OfflineBlockReason.Pinned or OfflineBlockReason.Busy or OfflineBlockReason.NotIsolatable => true,
                    OfflineBlockReason.Unmovable or OfflineBlockReason.Reserved => zone == ZoneType.Normal,
                    _ => false,
                };
                if (!acceptable)
                    return false;
            }
            return true;
        }

        // Takes random blocks offline (at most two at once) and brings offline ones back in the zone they had.
        void Offliner()
        {
            start.Wait();
            var random = new Random(seed * 31 + 201);
            var offline = new Dictionary<int, ZoneType>();
            try
            {
                while (Running())
                {
                    // Half the time the block that holds a random page of a region, so that offlines have pages to move.
                    MemoryBlock block = hotplug.GetBlock(random.Next(hotplug.Blocks.Count));
                    if (random.Next(2) == 0)
                    {
                        Region r = regions[random.Next(regions.Count)];
                        PagemapEntry entry = r.Process.GetPagemap(r.Base + (ulong)random.Next(r.Pages) * Page);
                        if (entry.Present && !entry.ZeroPage)
                            block = hotplug.GetBlock(machine.Topology.BlockOf(entry.Pfn));
                    }
                    if (offline.TryGetValue(block.Index, out ZoneType zoneBefore))
                    {
                        Errno online = random.Next(2) == 0 ? block.Online(zoneBefore)
                            : block.Write("state", zoneBefore == ZoneType.Movable ? "online_movable" : "online_kernel");
                        if (online != Errno.None || block.State != "online" || block.Zone != zoneBefore)
                            Fail($"online of {block} to {zoneBefore} returned {online}, state {block.State}, zone {block.Zone}");
                        offline.Remove(block.Index);
                        Interlocked.Increment(ref onlined);
                        continue;
                    }
                    if (offline.Count >= MaxOfflineAtOnce)
                        continue;
                    ZoneType zone = block.Zone!.Value;
                    hotplug.OfflineMigrateMaxPasses = 2 + random.Next(30);
                    using var cancel = new CancellationTokenSource();
                    bool cancellable = random.Next(8) == 0;
                    if (cancellable)
                        cancel.CancelAfter(random.Next(1, 4));
                    OfflineResult result = block.Offline(null, cancellable ? cancel.Token : CancellationToken.None);
                    Interlocked.Add(ref pagesMovedByOffline, result.PagesMoved);
                    if (result.Succeeded)
                    {
                        if (block.State != "offline" || block.Zone is not null || result.Blockers.Count != 0)
                            Fail($"offline of {block} succeeded but it is {block.State}, zone {block.Zone}, {result.Blockers.Count} blockers");
                        offline[block.Index] = zone;
                        Interlocked.Increment(ref zone == ZoneType.Movable ? ref offlinedMovable : ref offlinedNormal);
                        AssertNothingMappedFrom(block);
                        continue;
                    }
                    if (block.State != "online" || block.Zone != zone)
                        Fail($"a failed offline ({result.Error}) of {block} left it {block.State} in {block.Zone}, not online in {zone}");
                    if (result.Error == Errno.EINTR && cancellable)
                        Interlocked.Increment(ref interrupted);
                    else if (result.Error == Errno.EBUSY && Explains(block, zone, result))
                    {
                        Interlocked.Increment(ref busy);
                        if (result.Passes == 0)
                            Interlocked.Increment(ref busyAtIsolation);
                        else if (result.Passes > hotplug.OfflineMigrateMaxPasses)
                            Fail($"offline of {block} made {result.Passes} passes, more than {hotplug.OfflineMigrateMaxPasses}");
                    }
                    else
                        Fail($"offline of {block} ({zone}) returned {result.Error} after {result.Passes} passes: {string.Join("; ", result.Blockers)}");
                }
                foreach ((int index, ZoneType zone) in offline)
                {
                    Errno online = hotplug.GetBlock(index).Online(zone);
                    if (online != Errno.None)
                        Fail($"final online of block {index} returned {online}");
                }
            }
            catch (Exception e)
            {
                Fail($"offliner: {e}");
            }
        }

        void PinnedWrite(Region region, ulong va, PinnedMemory pin, Random random)
        {
            int page = (int)((va - region.Base) / Page), w = random.Next(Words);
            ulong v = 0x00DD_0000_0000_0000UL | ((ulong)region.Writer << 56) | (ulong)Interlocked.Increment(ref pinnedWrites);
            lock (region.Lock)
            {
                BitConverter.TryWriteBytes(pin.GetSpan(0).Slice(w * 8, 8), v);
                region.Shadow[page * Words + w] = v;
            }
        }

        // Short pins (a device writing into the page): an offline meanwhile must wait for them or give up.
        void Pinner()
        {
            start.Wait();
            var random = new Random(seed * 31 + 202);
            try
            {
                while (Running())
                {
                    Region region = regions[random.Next(regions.Count)];
                    ulong va = region.Base + (ulong)random.Next(region.Pages) * Page;
                    VmProcess p = region.Kind == Kind.Shared ? processes[random.Next(2)] : region.Process;
                    bool write = random.Next(2) == 0;
                    using (PinnedMemory pin = p.Pin(va, Page, write))
                    {
                        Interlocked.Increment(ref pins);
                        if (write)
                            PinnedWrite(region, va, pin, random);
                        Thread.Sleep(random.Next(3));
                        if (write)
                            PinnedWrite(region, va, pin, random);
                    }
                    Thread.Sleep(random.Next(3));
                }
            }
            catch (Exception e)
            {
                Fail($"pinner: {e}");
            }
        }

        // Forks with the parent's writers stopped for the moment of the fork, checks every byte of the
        // child against the snapshot (and the shared mapping against the live shadow), writes, exits it.
        void Forker()
        {
            start.Wait();
            var random = new Random(seed * 31 + 203);
            byte[] buffer = new byte[Page];
            try
            {
                while (Running())
                {
                    VmProcess parent = processes[random.Next(processes.Length)];
                    Region[] mine = [.. regions.Where(r => r.Process == parent && r.Kind != Kind.Shared)];
                    VmProcess child;
                    ulong[][] snapshot;
                    foreach (Region r in mine)
                        Monitor.Enter(r.Lock);
                    try
                    {
                        child = parent.Fork();
                        snapshot = [.. mine.Select(r => (ulong[])r.Shadow.Clone())];
                    }
                    finally
                    {
                        foreach (Region r in mine)
                            Monitor.Exit(r.Lock);
                    }
                    Interlocked.Increment(ref forks);
                    for (int k = 0; k < mine.Length; k++)
                        for (int page = 0; page < mine[k].Pages; page++)
                            CheckPage(child, mine[k].Base + (ulong)page * Page, snapshot[k], page, buffer, $"child {child} of {mine[k]}");
                    if (parent != p2)
                    {
                        lock (shared.Lock)
                            for (int page = 0; page < SharedPages; page++)
                                CheckPage(child, sharedBase + (ulong)page * Page, shared.Shadow, page, buffer, $"child {child} through the shared mapping");
                    }
                    if (mine.Length > 0)
                        child.Write<ulong>(mine[0].Base + (ulong)random.Next(mine[0].Pages) * Page, 0xDEAD_0000_0000_0000UL | (uint)child.Pid);
                    child.Exit();
                    Thread.Sleep(1);
                }
            }
            catch (Exception e)
            {
                Fail($"forker: {e}");
            }
        }

        // move_pages of a few pages to random nodes; every status is the new node or a documented errno.
        void MovePagesMover()
        {
            start.Wait();
            var random = new Random(seed * 31 + 204);
            try
            {
                while (Running())
                {
                    Region region = regions[random.Next(regions.Count)];
                    VmProcess target = region.Kind == Kind.Shared ? processes[random.Next(2)] : region.Process;
                    int count = 1 + random.Next(12);
                    ulong[] pages = new ulong[count];
                    int[] nodes = new int[count], status = new int[count];
                    for (int k = 0; k < count; k++)
                    {
                        pages[k] = region.Base + (ulong)random.Next(region.Pages) * Page;
                        nodes[k] = random.Next(2);
                    }
                    MovePolicyFlags flags = random.Next(2) == 0 ? MovePolicyFlags.Move : MovePolicyFlags.MoveAll;
                    Errno e = target.MovePages(0, pages, nodes, status, flags);
                    Interlocked.Increment(ref movePagesCalls);
                    if (e != Errno.None)
                    {
                        Fail($"move_pages {flags} of {count} pages of {region} returned {e}");
                        continue;
                    }
                    for (int k = 0; k < count; k++)
                    {
                        if (status[k] == nodes[k])
                            Interlocked.Increment(ref movePagesPlaced);
                        else if (status[k] is not (-(int)Errno.EBUSY or -(int)Errno.ENOENT or -(int)Errno.EACCES or -(int)Errno.ENOMEM))
                            Fail($"move_pages {flags} of 0x{pages[k]:x} ({region}) to node {nodes[k]}: status {status[k]}");
                    }
                    Thread.Sleep(random.Next(2));
                }
            }
            catch (Exception e)
            {
                Fail($"move_pages mover: {e}");
            }
        }

        // KSM stepped by hand beside ksmd: both wait while a block goes offline.
        void Scanner()
        {
            start.Wait();
            try
            {
                while (Running())
                {
                    Interlocked.Add(ref scanned, ksm.ScanPages(64));
                    Interlocked.Exchange(ref maxSharing, Math.Max(Volatile.Read(ref maxSharing), ksm.GetStats().PagesSharing));
                    Thread.Sleep(1);
                }
            }
            catch (Exception e)
            {
                Fail($"scanner: {e}");
            }
        }

        Assert.That(ksm.Write("pages_to_scan", "300"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("sleep_millisecs", "0"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("run", "1"), Is.EqualTo(Errno.None));
        List<Thread> threads =
        [
            .. regions.Select(r => new Thread(() => Writer(r)) { Name = $"writer {r.Writer}" }),
            new Thread(Offliner) { Name = "offliner" },
            new Thread(Pinner) { Name = "pinner" },
            new Thread(Forker) { Name = "forker" },
            new Thread(MovePagesMover) { Name = "move_pages mover" },
            new Thread(Scanner) { Name = "ksm scanner" },
        ];
        threads.ForEach(t => t.Start());
        start.Set();
        threads.ForEach(t => t.Join());
        Assert.That(ksm.Write("run", "0"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Failure, Is.Null, "ksmd did not stop on an exception");
        Assert.That(failures, Is.Empty, string.Join("\n", failures.Take(10)));

        // Every block is back in the zone it had at boot; every byte of every region reads as the shadow says.
        Assert.That(hotplug.Blocks.Select(b => b.Zone), Is.EqualTo(zoneAtBoot), "every block online again in its zone");
        Assert.That(ksm.IsOfflining, Is.False);
        byte[] check = new byte[Page];
        foreach (Region r in regions)
            for (int page = 0; page < r.Pages; page++)
                foreach (VmProcess p in r.Kind == Kind.Shared ? new[] { p0, p1 } : [r.Process])
                    CheckPage(p, r.Base + (ulong)page * Page, r.Shadow, page, check, $"final check of {r} through {p}");
        Assert.That(failures, Is.Empty, string.Join("\n", failures.Take(10)));
        TestMachines.AssertAuditClean(machine);

        KsmStats ksmStats = ksm.GetStats();
        TestContext.Progress.WriteLine(
            $"HotplugStressTests(merge_across_nodes={mergeAcrossNodes}, seed {seed}): {stopwatch.Elapsed.TotalSeconds:F1} s, {checks} page checks; "
            + $"offlines: {offlinedMovable} movable, {offlinedNormal} normal, {pagesMovedByOffline} pages moved; onlines {onlined}; "
            + $"EBUSY {busy} ({busyAtIsolation} at isolation), EINTR {interrupted}; blockers [{string.Join(", ", blockerReasons.Select(kv => $"{kv.Key} {kv.Value}"))}]; "
            + $"MEM_GOING_OFFLINE {goingOfflineHeard} (KSM waiting at {ksmWaitedSeen}); pins {pins} ({pinnedWrites} writes through them); "
            + $"move_pages {movePagesCalls} calls placed {movePagesPlaced}; forks {forks}; KSM max pages_sharing {maxSharing}, scanned by hand {scanned}, full scans {ksmStats.FullScans}");

        Assert.That(offlinedMovable, Is.GreaterThanOrEqualTo(duration is null ? minMovableOfflines : 1), "ZONE_MOVABLE blocks went offline under the writers");
        Assert.That(offlinedNormal, Is.GreaterThanOrEqualTo(duration is null ? minNormalOfflines : 1), "ZONE_NORMAL blocks went offline under the writers");
        Assert.That(pagesMovedByOffline, Is.GreaterThan(0), "offline moved pages in use");
        Assert.That(forks, Is.GreaterThanOrEqualTo(duration is null ? minForks : 1));
        Assert.That(maxSharing, Is.GreaterThan(0), "KSM merged while blocks went offline");
        Assert.That(ksmWaitedSeen, Is.EqualTo(goingOfflineHeard), "KSM waited through every offline");

        // Nothing lost: once every process is gone, every frame but the zero page is free again and every
        // zone manages what it managed at boot.
        foreach (VmProcess p in processes)
            p.Exit();
        Assert.That(ksm.Write("run", "2"), Is.EqualTo(Errno.None));
        machine.Tlb.Flush();
        TestMachines.AssertAuditClean(machine);
        long zeroPage = machine.ZeroPagePfnIfAllocated >= 0 ? 1 : 0;
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeAtBoot - zeroPage), "every frame but the zero page is free after every exit");
        Assert.That(ManagedPerZone(machine), Is.EqualTo(managedAtBoot), "every zone manages what it did at boot");
    }

    private static long[] ManagedPerZone(Machine machine) =>
        [.. machine.GetStats().Nodes.SelectMany(n => n.Zones).Select(z => z.ManagedPages)];
}
