using System.Collections.Concurrent;
using System.Diagnostics;
using Vmm.Mm;

namespace Vmm.Tests.Migration;

/// <summary>
/// Page migration under fire (issue 11, items 6 and 8): on a two-node machine, writer threads in several
/// processes write known patterns into their own private pages, into fork-shared copy-on-write pages and
/// into a MAP_SHARED mapping, and read them back, while ksmd merges the duplicate-rich ranges, a forker
/// forks, checks the child against a snapshot and exits it, and movers keep moving the pages by every
/// path there is: mbind MOVE / MOVE_ALL (BIND and PREFERRED, node 0 and node 1), cpuset mems changes,
/// <c>TryReplacePage</c>, move_pages, migrate_pages and cpuset memory_migrate, and pins (short-term, which
/// make moves fail, and long-term, which first move their page out of ZONE_MOVABLE). The oracle: a shadow of every region (per process for private and copy-on-write pages,
/// one for the shared mapping); every byte read must match it, so a lost write, a write seen by another
/// process (a copy-on-write page moved without its break) or a stale read (a reader left on an old frame)
/// all fail. Freed frames are poisoned. At the end: every byte checked, Audit clean, and the placement a
/// mover's last command fixes (mbind BIND node 1 with MOVE_ALL, migrate_pages, a cpuset moved with
/// memory_migrate) holds for every page.
/// </summary>
[TestFixture]
[Category("Stress")]
[Category("Migration")]
public sealed class MigrationStressTests
{
    private const ulong Page = 4096;
    private const int Words = (int)Page / 8;
    private const int PrivatePages = 24;
    private const int CowPages = 24;
    private const int SharedPages = 16;

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
    public void No_write_is_lost_misplaced_or_stale_while_every_mover_moves_pages_between_nodes(int mergeAcrossNodes)
    {
        int seed = TestEnvironment.Seed(11_000 + mergeAcrossNodes);
        using var machine = TestMachines.Create(TestMachines.TwoLargeNodes with { PoisonFreedFrames = true });
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("merge_across_nodes", mergeAcrossNodes.ToString(System.Globalization.CultureInfo.InvariantCulture)), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("max_page_sharing", "4"), Is.EqualTo(Errno.None));

        // P0 maps the shared mapping and the copy-on-write region, writes the latter and forks P1: both
        // map the same frames until a write breaks the sharing. P2 lives in a cpuset whose mems flip.
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
        VmProcess p2 = machine.CreateProcess(homeNode: 1);
        Cpuset flipping = machine.CreateCpuset("flipping", NodeMask.Of(0, 1));
        flipping.MemoryMigrate = true; // mems changes move P2's pages (cpuset_migrate_mm)
        Assert.That(flipping.Attach(p2), Is.EqualTo(Errno.None));
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
        // Every private page starts with pattern 1: duplicates everywhere, so ksmd merges from its first pass.
        foreach (Region r in regions.Where(r => r.Kind == Kind.Private))
        {
            for (int w = 0; w < r.Shadow.Length; w++)
                r.Shadow[w] = PatternWord(1, w % Words);
            byte[] initial = new byte[r.Length];
            Buffer.BlockCopy(r.Shadow, 0, initial, 0, initial.Length);
            r.Process.Write(r.Base, initial);
        }

        int opsPerWriter = 4_000 * TestEnvironment.StressScale;
        long minMoves = 200L * TestEnvironment.StressScale, minForks = 10L * TestEnvironment.StressScale;
        TimeSpan? duration = TestEnvironment.StressDuration;
        var safety = TimeSpan.FromSeconds(120);
        var stopwatch = Stopwatch.StartNew();
        var failures = new ConcurrentQueue<string>();
        int writersRunning = regions.Count;
        long checks = 0, forks = 0, maxSharing = 0, pins = 0, pinnedWrites = 0, longtermPins = 0, longtermPinsRefused = 0;
        long mbindCalls = 0, cpusetChanges = 0, replaced = 0, replaceBackedOff = 0;
        long movePagesCalls = 0, movePagesPlaced = 0, movePagesBusy = 0, migratePagesCalls = 0, migratePagesNotMoved = 0;
        MigrationStats before = machine.GetMigrationStats();
        using var start = new ManualResetEventSlim();

        void Fail(string what) => failures.Enqueue($"seed {seed}, {stopwatch.Elapsed.TotalSeconds:F1} s: {what}");

        long MovedByMbind() => machine.GetMigrationStats().SucceededByReason.GetValueOrDefault(MigrateReason.MempolicyMbind)
                               - before.SucceededByReason.GetValueOrDefault(MigrateReason.MempolicyMbind);

        bool MoversShort() => MovedByMbind() < minMoves || Volatile.Read(ref replaced) < minMoves || Volatile.Read(ref forks) < minForks
                              || Volatile.Read(ref cpusetChanges) < 4 || Volatile.Read(ref movePagesPlaced) < minMoves
                              || Volatile.Read(ref migratePagesCalls) < 4;

        bool More(long i) => duration is { } d
            ? stopwatch.Elapsed < d && failures.IsEmpty
            : (i < opsPerWriter || MoversShort()) && stopwatch.Elapsed < safety && failures.IsEmpty;

        bool Running() => Volatile.Read(ref writersRunning) > 0 && failures.IsEmpty;

        // Reads one page through a process and reports the first word that differs from the shadow.
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
                    // The shared mapping is written and read through either process: both map the same frames.
                    VmProcess through = region.Kind == Kind.Shared ? processes[random.Next(2)] : region.Process;
                    int choice = random.Next(100);
                    lock (region.Lock)
                    {
                        if (choice < 40)
                        {
                            // A whole page from a small set of patterns (0 is zero-filled): duplicates for ksmd.
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
                        else if (region.Kind == Kind.Shared && choice < 78)
                        {
                            // Drop one process's PTEs: it faults the pages in again (from the page cache) while they move.
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

        // mbind with MOVE (pages this process alone maps) or MOVE_ALL (every page) flips ranges of P0 and
        // P1 between node 0 and node 1, with BIND or PREFERRED policies.
        void MbindMover()
        {
            start.Wait();
            var random = new Random(seed * 31 + 101);
            try
            {
                while (Running())
                {
                    Region region = regions[random.Next(regions.Count)];
                    VmProcess p = region.Kind == Kind.Shared ? processes[random.Next(2)] : region.Process;
                    if (p == p2)
                        continue; // P2 belongs to the cpuset mover
                    int first = random.Next(region.Pages);
                    int count = 1 + random.Next(region.Pages - first);
                    MempolicyMode mode = random.Next(3) == 0 ? MempolicyMode.Preferred : MempolicyMode.Bind;
                    MovePolicyFlags flags = random.Next(2) == 0 ? MovePolicyFlags.Move : MovePolicyFlags.MoveAll;
                    Errno e = p.Mbind(region.Base + (ulong)first * Page, (ulong)count * Page, mode, NodeMask.Of(random.Next(2)), MempolicyFlags.None, flags);
                    if (e != Errno.None)
                        Fail($"mbind {mode} {flags} of {count} pages of {region} returned {e}");
                    Interlocked.Increment(ref mbindCalls);
                }
            }
            catch (Exception e)
            {
                Fail($"mbind mover: {e}");
            }
        }

        // P2's cpuset flips its mems: {0}, {1}, {0, 1}. Its policies are rebound; its new pages follow.
        void CpusetMover()
        {
            start.Wait();
            var random = new Random(seed * 31 + 102);
            NodeMask[] choices = [NodeMask.Of(0), NodeMask.Of(1), NodeMask.Of(0, 1)];
            try
            {
                while (Running())
                {
                    Errno e = flipping.SetMems(choices[random.Next(choices.Length)]);
                    if (e != Errno.None)
                        Fail($"cpuset mems returned {e}");
                    Interlocked.Increment(ref cpusetChanges);
                    Thread.Sleep(random.Next(3));
                }
            }
            catch (Exception e)
            {
                Fail($"cpuset mover: {e}");
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

        // "Move the page at this address now", one page at a time, to a random node; and pins (short-term
        // ones make every move of the pinned page fail until they are released).
        void Replacer()
        {
            start.Wait();
            var random = new Random(seed * 31 + 103);
            try
            {
                while (Running())
                {
                    Region region = regions[random.Next(regions.Count)];
                    ulong va = region.Base + (ulong)random.Next(region.Pages) * Page;
                    VmProcess p = region.Kind == Kind.Shared ? processes[random.Next(2)] : region.Process;
                    if (random.Next(16) == 0)
                    {
                        // A pin for write is a device writing into the page (DMA): its writes go to the
                        // pinned frame, so a page moved while pinned would lose the second write.
                        bool write = random.Next(2) == 0;
                        // Half of them long-term (FOLL_LONGTERM): the page first leaves ZONE_MOVABLE, under the
                        // writers, KSM and the other movers. Its move may find the page busy (another pin, a
                        // merge in progress): Linux's -ENOMEM, with nothing pinned.
                        bool longTerm = random.Next(2) == 0;
                        PinnedMemory pin;
                        try
                        {
                            pin = p.Pin(va, Page, write, longTerm);
                        }
                        catch (InsufficientMemoryException) when (longTerm)
                        {
                            Interlocked.Increment(ref longtermPinsRefused);
                            continue;
                        }
                        using (pin)
                        {
                            Interlocked.Increment(ref pins);
                            if (longTerm)
                            {
                                Interlocked.Increment(ref longtermPins);
                                if (machine.GetPageInfo(pin.FrameOf(0)).Zone == ZoneType.Movable)
                                    Fail($"a long-term pin of 0x{va:x} in {p} holds a page in ZONE_MOVABLE");
                            }
                            if (write)
                                PinnedWrite(region, va, pin, random);
                            Thread.Yield();
                            if (write)
                                PinnedWrite(region, va, pin, random);
                        }
                        continue;
                    }
                    Errno result = p.Mm.TryReplacePage(va, random.Next(2));
                    if (result == Errno.None)
                        Interlocked.Increment(ref replaced);
                    else if (result is Errno.EBUSY or Errno.EAGAIN or Errno.ENOENT or Errno.EFAULT)
                        Interlocked.Increment(ref replaceBackedOff);
                    else
                        Fail($"replace of 0x{va:x} in {p} returned {result}");
                }
            }
            catch (Exception e)
            {
                Fail($"replacer: {e}");
            }
        }

        // Forks a process with its writers stopped for the moment of the fork (a consistent snapshot),
        // checks every byte of the child's private and copy-on-write pages against the snapshot and its
        // shared pages against the live shadow, breaks one copy-on-write page in the child only, exits it.
        void Forker()
        {
            start.Wait();
            var random = new Random(seed * 31 + 104);
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

        // move_pages: a few pages of a region to random nodes, called by a random process on the
        // region's (pid), Move or MoveAll. Every page's status is its new node or a documented errno.
        void MovePagesMover()
        {
            start.Wait();
            var random = new Random(seed * 31 + 105);
            try
            {
                while (Running())
                {
                    Region region = regions[random.Next(regions.Count)];
                    VmProcess target = region.Kind == Kind.Shared ? processes[random.Next(2)] : region.Process;
                    VmProcess caller = processes[random.Next(processes.Length)];
                    int count = 1 + random.Next(12);
                    ulong[] pages = new ulong[count];
                    int[] nodes = new int[count], status = new int[count];
                    for (int k = 0; k < count; k++)
                    {
                        pages[k] = region.Base + (ulong)random.Next(region.Pages) * Page + (ulong)random.Next((int)Page);
                        nodes[k] = random.Next(2);
                    }
                    MovePolicyFlags flags = random.Next(2) == 0 ? MovePolicyFlags.Move : MovePolicyFlags.MoveAll;
                    Errno e = caller.MovePages(caller == target ? 0 : target.Pid, pages, nodes, status, flags);
                    Interlocked.Increment(ref movePagesCalls);
                    if (e == Errno.EACCES && target == p2)
                        continue; // a node outside P2's cpuset, whose mems flip meanwhile
                    if (e != Errno.None)
                    {
                        Fail($"move_pages {flags} of {count} pages of {region} in {target} returned {e}");
                        continue;
                    }
                    for (int k = 0; k < count; k++)
                    {
                        if (status[k] == nodes[k])
                            Interlocked.Increment(ref movePagesPlaced);
                        else if (status[k] == -(int)Errno.EBUSY)
                            Interlocked.Increment(ref movePagesBusy);
                        else if (status[k] is not (-(int)Errno.ENOENT or -(int)Errno.EACCES or -(int)Errno.ENOMEM))
                            Fail($"move_pages {flags} of 0x{pages[k]:x} ({region} in {target}) to node {nodes[k]}: status {status[k]}");
                    }
                }
            }
            catch (Exception e)
            {
                Fail($"move_pages mover: {e}");
            }
        }

        // migrate_pages: every page of P0 or P1 on one node goes to the other.
        void MigratePagesMover()
        {
            start.Wait();
            var random = new Random(seed * 31 + 106);
            try
            {
                while (Running())
                {
                    VmProcess target = processes[random.Next(2)];
                    int from = random.Next(2);
                    VmProcess caller = processes[random.Next(processes.Length)];
                    Errno e = caller.MigratePages(target.Pid, NodeMask.Of(from), NodeMask.Of(1 - from), out long notMoved);
                    if (e == Errno.EINVAL && caller == p2)
                        continue; // the new node is outside the caller's own cpuset (kernel_migrate_pages), whose mems flip
                    if (e != Errno.None)
                        Fail($"migrate_pages of {target} from node {from} returned {e}");
                    Interlocked.Increment(ref migratePagesCalls);
                    Interlocked.Add(ref migratePagesNotMoved, notMoved);
                    Thread.Sleep(random.Next(3));
                }
            }
            catch (Exception e)
            {
                Fail($"migrate_pages mover: {e}");
            }
        }

        void KsmWatcher()
        {
            start.Wait();
            while (Running())
            {
                Interlocked.Exchange(ref maxSharing, Math.Max(Volatile.Read(ref maxSharing), ksm.GetStats().PagesSharing));
                Thread.Sleep(2);
            }
        }

        Assert.That(ksm.Write("pages_to_scan", "300"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("sleep_millisecs", "0"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("run", "1"), Is.EqualTo(Errno.None));
        List<Thread> threads =
        [
            .. regions.Select(r => new Thread(() => Writer(r)) { Name = $"writer {r.Writer}" }),
            new Thread(MbindMover) { Name = "mbind mover" },
            new Thread(CpusetMover) { Name = "cpuset mover" },
            new Thread(Replacer) { Name = "replacer" },
            new Thread(Forker) { Name = "forker" },
            new Thread(MovePagesMover) { Name = "move_pages mover" },
            new Thread(MigratePagesMover) { Name = "migrate_pages mover" },
            new Thread(KsmWatcher) { Name = "ksm watcher" },
        ];
        threads.ForEach(t => t.Start());
        start.Set();
        threads.ForEach(t => t.Join());
        Assert.That(ksm.Write("run", "0"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Failure, Is.Null, "ksmd did not stop on an exception");
        Assert.That(failures, Is.Empty, string.Join("\n", failures.Take(10)));

        // Every byte of every region, through its own process and (the shared mapping) through both; then
        // no failure is recorded and the audit is clean. Only for when no writer or mover runs any more.
        byte[] check = new byte[Page];
        void CheckEveryRegion(string when)
        {
            foreach (Region r in regions)
                for (int page = 0; page < r.Pages; page++)
                    foreach (VmProcess p in r.Kind == Kind.Shared ? new[] { p0, p1 } : [r.Process])
                        CheckPage(p, r.Base + (ulong)page * Page, r.Shadow, page, check, $"{when} of {r} through {p}");
            Assert.That(failures, Is.Empty, string.Join("\n", failures.Take(10)));
            TestMachines.AssertAuditClean(machine);
        }

        // Asserts that every page of the regions, as seen through one process, is placed as it should be.
        void AssertPlacement(IEnumerable<Region> of, VmProcess through, Func<PagemapEntry, bool> placed, string context)
        {
            foreach (Region r in of)
            {
                for (int page = 0; page < r.Pages; page++)
                {
                    PagemapEntry entry = through.GetPagemap(r.Base + (ulong)page * Page);
                    Assert.That(placed(entry), Is.True, $"page {page} of {r} {context}: {entry}");
                }
            }
        }

        CheckEveryRegion("final check");

        // The last command fixes the placement: mbind BIND node 1 with MOVE_ALL over every range of P0
        // (shared and copy-on-write pages included) leaves every page of them on node 1 (nothing is pinned now).
        long movedByMbindBeforeFinal = MovedByMbind();
        foreach (Region r in regions.Where(r => r.Process == p0))
            Assert.That(p0.Mbind(r.Base, r.Length, MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.None, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.None));
        AssertPlacement(regions.Where(r => r.Process == p0), p0, entry => entry.Present && entry.Node == 1, "after mbind BIND {1} MOVE_ALL");
        CheckEveryRegion("check after the final moves");

        // migrate_pages of P1 from node 0 to node 1 (root: MOVE_ALL) leaves every page it maps on node 1.
        Assert.That(p1.MigratePages(p1.Pid, NodeMask.Of(0), NodeMask.Of(1), out long finalNotMoved), Is.EqualTo(Errno.None));
        Assert.That(finalNotMoved, Is.Zero, "nothing is pinned or busy now");
        AssertPlacement(regions.Where(r => r.Process == p1 || r.Kind == Kind.Shared), p1, entry => !entry.Present || entry.Node == 1,
            $"in {p1} after migrate_pages {{0}} -> {{1}}");

        // P2's cpuset moves with memory_migrate: mems {0}, then {1}: every page of P2 ends on node 1.
        Assert.That(flipping.SetMems(NodeMask.Of(0)), Is.EqualTo(Errno.None));
        Assert.That(flipping.SetMems(NodeMask.Of(1)), Is.EqualTo(Errno.None));
        AssertPlacement(regions.Where(r => r.Process == p2), p2, entry => entry.Present && entry.Node == 1, "after its cpuset's mems became {1} with memory_migrate");
        CheckEveryRegion("check after migrate_pages and the cpuset move");

        MigrationStats after = machine.GetMigrationStats();
        KsmStats ksmStats = ksm.GetStats();
        TestContext.Progress.WriteLine(
            $"MigrationStressTests(merge_across_nodes={mergeAcrossNodes}, seed {seed}): {stopwatch.Elapsed.TotalSeconds:F1} s, {checks} page checks; "
            + $"moved by mbind {movedByMbindBeforeFinal} pages in {mbindCalls} calls (+{MovedByMbind() - movedByMbindBeforeFinal} by the final one), "
            + $"TryReplacePage {replaced} ({replaceBackedOff} backed off), cpuset mems changes {cpusetChanges} (memory_migrate on), pins {pins} ({pinnedWrites} writes through them; {longtermPins} long-term, {longtermPinsRefused} long-term refused, "
            + $"{after.SucceededByReason.GetValueOrDefault(MigrateReason.LongtermPin) - before.SucceededByReason.GetValueOrDefault(MigrateReason.LongtermPin)} pages moved out of ZONE_MOVABLE for them); "
            + $"move_pages {movePagesCalls} calls placed {movePagesPlaced} pages ({movePagesBusy} -EBUSY), migrate_pages {migratePagesCalls} calls ({migratePagesNotMoved} not moved); "
            + $"pgmigrate_success {after.Succeeded - before.Succeeded}, pgmigrate_fail {after.Failed - before.Failed}, faults waited {machine.Migration.FaultsWaited}; "
            + $"KSM max pages_sharing {maxSharing}, full scans {ksmStats.FullScans}, cow_ksm {ksmStats.CowKsm}; forks {forks}");

        Assert.That(maxSharing, Is.GreaterThan(0), "ksmd merged while the pages moved");
        Assert.That(forks, Is.GreaterThanOrEqualTo(duration is null ? minForks : 1));
        Assert.That(replaced, Is.GreaterThanOrEqualTo(duration is null ? minMoves : 1), "frames were replaced under the writers");
        Assert.That(movedByMbindBeforeFinal, Is.GreaterThanOrEqualTo(duration is null ? minMoves : 1), "mbind moved pages under the writers");
        Assert.That(movePagesPlaced, Is.GreaterThanOrEqualTo(duration is null ? minMoves : 1), "move_pages placed pages under the writers");
        Assert.That(migratePagesCalls, Is.GreaterThanOrEqualTo(duration is null ? 4 : 1), "migrate_pages ran under the writers");
        foreach (VmProcess p in processes)
            p.Exit();
        TestMachines.AssertAuditClean(machine);
    }
}
