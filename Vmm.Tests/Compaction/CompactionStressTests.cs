using System.Runtime.InteropServices;
using Vmm.Memory;
using Vmm.Mm;
using Vmm.Tests.Stress;

namespace Vmm.Tests.Compaction;

/// <summary>
/// Compaction and the balloon under fire (issue 13, item 5), on <see cref="StressHarness"/>: on a two-node
/// machine, writer threads in three processes write known patterns into private pages (dropping some,
/// so faults keep allocating new frames), fork-shared copy-on-write pages and a MAP_SHARED mapping and
/// read them back; ksmd merges the duplicate-rich ranges (and a second thread steps KSM with ScanPages);
/// a forker forks, checks the child against a snapshot and exits it; move_pages moves pages between the
/// nodes; short pins hold pages (writing through them); and two fragmenters, one per node, map 8 MiB,
/// fill it and free every other page (the fragmentation compaction exists for). Meanwhile compaction
/// runs in every form there is: compact_memory and per-node compaction in a loop, kcompactd (proactive,
/// and woken by failing allocations), and direct compaction in allocations above order 0 (node-bound
/// blocks of order 2 to 10, and contiguous buffers of order 1 to 10; those of order 11 go through
/// alloc_contig_pages), each buffer checked contiguous in ZONE_NORMAL of one node and zeroed, written,
/// read back and freed. The balloon inflates and deflates (its frames migrated by compaction, offline and
/// alloc_contig_range instead of blocking them); a host component keeps data in non-LRU movable frames
/// (<see cref="StressMovableStore"/>) whose callbacks refuse some isolations and answer EAGAIN to some
/// migrations, and checks its bytes after every move; and ZONE_MOVABLE blocks go offline and online
/// (offline moves the balloon's and the store's frames too, and compaction must keep off an offlining
/// block). The oracle: the harness's shadow of every region, the fragmenters' and the buffers' patterns
/// and the store's versions: every byte read must match. At the end every byte is checked, the audit is
/// clean, and once the balloon is deflated, the store freed and every process gone, every frame but the
/// zero page is free.
/// </summary>
/// <remarks>
/// Bounded by iterations in CI (a few seconds); <c>VMM_STRESS_SECONDS=N</c> makes it run for N seconds
/// (the soak; an hour: 3600).
/// </remarks>
[TestFixture]
[Category("Stress")]
[Category("Compaction")]
public sealed class CompactionStressTests
{
    private const ulong Page = StressHarness.Page;
    private const int Words = StressHarness.Words;

    /// <summary>Pages of a fragmenter's range (8 MiB, half of it freed again).</summary>
    private const int FragmenterPages = 2048;

    /// <summary>The balloon's ceiling (8 MiB of the machine's 64), so that the writers' faults always find memory.</summary>
    private const long BalloonMaxPages = 2048;

    [Test]
    public void No_byte_is_lost_while_compaction_and_the_balloon_move_pages_under_writers_ksm_fork_and_contiguous_allocations()
    {
        int seed = TestEnvironment.Seed(13_000);
        using var machine = TestMachines.Create(TestMachines.TwoLargeNodes with { PoisonFreedFrames = true });
        Vmm.Ksm ksm = machine.Ksm!;
        Vmm.Compaction compaction = machine.Compaction;
        Vmm.Balloon balloon = machine.Balloon;
        Assert.That(ksm.Write("max_page_sharing", "4"), Is.EqualTo(Errno.None));
        // kcompactd compacts proactively while a node's fragmentation score is above the low mark.
        compaction.Proactiveness = 50;
        // Direct compaction even where the fragmentation index blames a lack of memory rather than
        // fragmentation (node 0 runs nearly full): the allocations below order 10 then stall and compact.
        compaction.ExtfragThreshold = 0;

        var h = new StressHarness(machine, "CompactionStressTests", seed,
            new StressLayout(PrivatePages: 96, CowPages: 64, SharedPages: 32, P2HomeNode: 1) { WritersDropPages = true })
        { OpsPerWriter = 1_500 * TestEnvironment.StressScale };
        var store = new StressMovableStore(machine, slots: 256);

        long minCompactions = 5L * TestEnvironment.StressScale, minBuffers = 20L * TestEnvironment.StressScale;
        long minForks = 5L * TestEnvironment.StressScale, minBalloonCycles = 10L * TestEnvironment.StressScale, minOfflines = 2L * TestEnvironment.StressScale;
        long compactMemoryCalls = 0, compactNodeCalls = 0;
        long buffers = 0, buffersOfPageblocks = 0, buffersAboveMaxOrder = 0, buffersRefused = 0;
        long highOrder = 0, highOrderFailed = 0;
        long inflated = 0, deflated = 0, balloonCycles = 0, fragmenterRounds = 0, fragmenterChecks = 0;
        MemoryHotplug hotplug = machine.Hotplug;
        long offlined = 0, offlinesBusy = 0, pagesMovedByOffline = 0;
        MigrationStats before = machine.GetMigrationStats();
        long VmStat(string name)
        {
            Assert.That(machine.ReadVmStat(name, out long value), Is.EqualTo(Errno.None), name);
            return value;
        }
        long MovedBy(MigrateReason reason) => machine.GetMigrationStats().SucceededByReason.GetValueOrDefault(reason)
                                              - before.SucceededByReason.GetValueOrDefault(reason);

        h.MechanismsShort = () => Volatile.Read(ref compactMemoryCalls) + Volatile.Read(ref compactNodeCalls) < minCompactions
                                  || Volatile.Read(ref buffers) < minBuffers || Volatile.Read(ref h.Forks) < minForks
                                  || Volatile.Read(ref balloonCycles) < minBalloonCycles || balloon.Migrated == 0
                                  || Volatile.Read(ref store.Migrated) == 0 || MovedBy(MigrateReason.Compaction) == 0
                                  || Volatile.Read(ref offlined) < minOfflines;

        // compact_memory, or one node's, now and then: every zone whole, synchronous.
        h.Add("compactor", 301, random =>
        {
            if (random.Next(3) == 0)
            {
                compaction.CompactMemory();
                Interlocked.Increment(ref compactMemoryCalls);
            }
            else
            {
                compaction.CompactNode(random.Next(machine.Topology.NodeCount));
                Interlocked.Increment(ref compactNodeCalls);
            }
            // A pause: compaction holds the hotplug lock, and direct compaction only tries it (it skips the
            // zone while another compaction or an offline holds it), so back to back runs would starve it.
            Thread.Sleep(20 + random.Next(40));
        });

        // Contiguous buffers: up to the max order one buddy allocation (direct compaction when it fails),
        // above it alloc_contig_pages. Each is checked contiguous, on one node, in ZONE_NORMAL, zeroed,
        // then written and read back while the movers run, and freed.
        int[] orders = [1, 2, 3, 4, 6, 9, 9, 10, 11];
        h.Add("contiguous buffers", 302, random =>
        {
            int order = orders[random.Next(orders.Length)];
            long bytes = (long)Page << order;
            ContiguousBuffer buffer;
            try
            {
                buffer = machine.AllocateContiguous(bytes, node: random.Next(4) == 0 ? 1 : 0);
            }
            catch (InsufficientMemoryException)
            {
                Interlocked.Increment(ref buffersRefused);
                return;
            }
            using (buffer)
            {
                if (buffer.PageCount != 1L << order || buffer.Length != bytes)
                    h.Fail($"{buffer}: asked for {bytes} bytes");
                for (long pfn = buffer.FirstPfn; pfn < buffer.FirstPfn + buffer.PageCount; pfn += 1 + random.Next(64))
                {
                    PageInfo info = machine.GetPageInfo(pfn);
                    if (info.Zone != ZoneType.Normal || info.Node != buffer.Node)
                        h.Fail($"{buffer}: frame {pfn} is in {info.Zone} of node {info.Node}");
                }
                Span<ulong> words = MemoryMarshal.Cast<byte, ulong>(buffer.GetSpan());
                int firstNonZero = words.IndexOfAnyExcept(0UL);
                if (firstNonZero >= 0)
                    h.Fail($"{buffer}: word {firstNonZero} of a new buffer reads {words[firstNonZero]:x}, not 0");
                ulong stamp = 0xC0_0000_0000_0000UL | (ulong)buffer.FirstPfn << 20;
                for (int w = 0; w < words.Length; w++)
                    words[w] = stamp | (uint)w;
                Thread.Sleep(random.Next(3));
                for (int w = 0; w < words.Length; w++)
                {
                    if (words[w] != (stamp | (uint)w))
                    {
                        h.Fail($"{buffer}: word {w} reads {words[w]:x}, expected {stamp | (uint)w:x}");
                        break;
                    }
                }
                Interlocked.Increment(ref buffers);
                if (order > PageAllocator.MaxOrder)
                    Interlocked.Increment(ref buffersAboveMaxOrder);
                else if (order >= PageAllocator.PageblockOrder)
                    Interlocked.Increment(ref buffersOfPageblocks);
            }
        });

        // Allocations above order 0 that must come from one node (a THP-like __GFP_THISNODE request, by the
        // allocator's internal call): when the node has no free block of the order, the slow path runs
        // direct compaction (compact_stall, then compact_success or compact_fail, deferral after failures)
        // and wakes kcompactd. A block it returns lies on the node; it is held a moment and freed.
        h.Add("high-order allocations", 310, random =>
        {
            int order = 2 + random.Next(PageAllocator.MaxOrder - 1);
            int node = random.Next(2);
            long pfn = machine.Allocator.AllocPages(order, AllocFlags.Movable | AllocFlags.ThisNode, node);
            if (pfn == PageAllocator.NoPfn)
            {
                Interlocked.Increment(ref highOrderFailed);
                Thread.Sleep(random.Next(3));
                return;
            }
            if (pfn % (1L << order) != 0 || machine.GetPageInfo(pfn).Node != node || machine.GetPageInfo(pfn + (1L << order) - 1).Node != node)
                h.Fail($"an order-{order} block of node {node} at frame {pfn} is misaligned or on another node");
            Interlocked.Increment(ref highOrder);
            Thread.Sleep(random.Next(3));
            machine.Allocator.FreePages(pfn, order);
        });

        // The balloon inflates and deflates by up to 512 pages, never above its ceiling; whatever it holds
        // at a time, compaction and alloc_contig_range may move.
        h.Add("balloon", 303, random =>
        {
            long pages = balloon.Pages;
            if (pages < BalloonMaxPages && random.Next(2) == 0)
            {
                long asked = 1 + random.Next((int)Math.Min(512, BalloonMaxPages - pages));
                long taken = balloon.Inflate(asked);
                if (taken < 0 || taken > asked)
                    h.Fail($"balloon: Inflate({asked}) took {taken}");
                Interlocked.Add(ref inflated, taken);
            }
            else
            {
                long asked = 1 + random.Next(512);
                long returned = balloon.Deflate(asked);
                if (returned < 0 || returned > asked || returned > pages)
                    h.Fail($"balloon: Deflate({asked}) of {pages} returned {returned}");
                Interlocked.Add(ref deflated, returned);
                Interlocked.Increment(ref balloonCycles);
            }
            Thread.Sleep(random.Next(3));
        });

        // A host component's data in movable frames (checked after every move by its own checks).
        h.Add("movable store", 304, random =>
        {
            if (store.Step(random) is { } problem)
                h.Fail(problem);
        });

        // Two fragmenters, one a node: each maps 16 MiB in its own process (on node 0, more than its
        // ZONE_MOVABLE holds beside the regions and the balloon, so it spills into ZONE_NORMAL, where
        // contiguous buffers come from; node 1 keeps free memory, so direct compaction there has room to
        // work), fills each page with a pattern of its node, index and round, and frees every other page
        // (MADV_DONTNEED): the fragmentation compaction exists for. It keeps the range until its next step,
        // which checks every page (the freed ones read zero) and unmaps it before mapping the next.
        VmProcess[] fragmenterProcesses = [machine.CreateProcess(homeNode: 0), machine.CreateProcess(homeNode: 1)];
        void AddFragmenter(int node)
        {
            VmProcess process = fragmenterProcesses[node];
            (ulong Va, int Round, int Parity)? fragmented = null;
            byte[] bytes = new byte[FragmenterPages * (int)Page];
            ulong Pattern(int round, int page, int word) =>
                0xF0_0000_0000_0000UL | (ulong)(uint)node << 48 | (ulong)(uint)round << 24 | (ulong)(uint)page << 10 | (uint)word;
            void CheckAndUnmap()
            {
                if (fragmented is not (ulong va, int round, int parity))
                    return;
                process.Read(va, bytes);
                ReadOnlySpan<ulong> words = MemoryMarshal.Cast<byte, ulong>(bytes);
                for (int page = 0; page < FragmenterPages; page++)
                {
                    bool dropped = (page & 1) == parity;
                    for (int w = 0; w < Words; w++)
                    {
                        ulong seen = words[page * Words + w], expected = dropped ? 0 : Pattern(round, page, w);
                        if (seen != expected)
                        {
                            h.Fail($"fragmenter of node {node}, round {round}: page {page} word {w} reads {seen:x}, expected {expected:x}");
                            break;
                        }
                    }
                }
                Interlocked.Add(ref fragmenterChecks, FragmenterPages);
                Errno unmapped = process.Munmap(va, FragmenterPages * Page);
                if (unmapped != Errno.None)
                    h.Fail($"fragmenter of node {node}, round {round}: munmap returned {unmapped}");
                fragmented = null;
            }
            h.Add($"fragmenter of node {node}", 305 + node, random =>
            {
                CheckAndUnmap();
                int round = (int)Interlocked.Increment(ref fragmenterRounds);
                ulong va = process.Mmap(FragmenterPages * Page);
                Span<ulong> words = MemoryMarshal.Cast<byte, ulong>(bytes.AsSpan());
                for (int page = 0; page < FragmenterPages; page++)
                    for (int w = 0; w < Words; w++)
                        words[page * Words + w] = Pattern(round, page, w);
                process.Write(va, bytes);
                int parity = random.Next(2);
                for (int page = parity; page < FragmenterPages; page += 2)
                {
                    Errno e = process.Madvise(va + (ulong)page * Page, Page, Advice.DontNeed);
                    if (e != Errno.None)
                        h.Fail($"fragmenter of node {node}, round {round}: MADV_DONTNEED of page {page} returned {e}");
                }
                fragmented = (va, round, parity);
                Thread.Sleep(10 + random.Next(40));
            }, after: CheckAndUnmap);
        }
        AddFragmenter(0);
        AddFragmenter(1);

        // ZONE_MOVABLE blocks go offline and come back: offline moves balloon and store frames too, and
        // compaction must leave an isolated block's free pages alone and skip a block that is offline.
        h.Add("offliner", 309, random =>
        {
            MemoryBlock block = hotplug.GetBlock(random.Next(hotplug.Blocks.Count));
            if (block.Zone != ZoneType.Movable)
                return;
            hotplug.OfflineMigrateMaxPasses = 2 + random.Next(30);
            OfflineResult result = block.Offline(null, CancellationToken.None);
            Interlocked.Add(ref pagesMovedByOffline, result.PagesMoved);
            if (result.Succeeded)
            {
                Interlocked.Increment(ref offlined);
                Thread.Sleep(random.Next(3));
                Errno online = block.Online(ZoneType.Movable);
                if (online != Errno.None || block.Zone != ZoneType.Movable)
                    h.Fail($"online of {block} returned {online}, zone {block.Zone}");
            }
            else if (result.Error == Errno.EBUSY && result.Blockers.All(b => b.Reason is OfflineBlockReason.Pinned or OfflineBlockReason.Busy or OfflineBlockReason.NotIsolatable or OfflineBlockReason.MovableRefused))
                Interlocked.Increment(ref offlinesBusy);
            else
                h.Fail($"offline of {block} returned {result.Error} after {result.Passes} passes: {string.Join("; ", result.Blockers)}");
            Thread.Sleep(5 + random.Next(25));
        });

        // Short pins (a device writing into the page): compaction meanwhile must skip the page or fail to move it.
        h.AddShortPinner(306);
        h.AddForker(307);
        h.AddMovePagesMover(308, maxPauseMs: 1);
        h.AddKsmScanner(64);

        h.StartKsmd();
        h.Run();
        h.CheckEveryRegion("final check");
        Assert.That(store.CheckAll(), Is.Empty, "the movable store's bytes at the end");

        MigrationStats after = machine.GetMigrationStats();
        TestContext.Progress.WriteLine(
            h.Report()
            + $"; compact_memory {compactMemoryCalls}, per node {compactNodeCalls}; compact_stall {VmStat("compact_stall")}, compact_success {VmStat("compact_success")}, "
            + $"compact_fail {VmStat("compact_fail")}, compact_migrate_scanned {VmStat("compact_migrate_scanned")}, compact_free_scanned {VmStat("compact_free_scanned")}, "
            + $"compact_isolated {VmStat("compact_isolated")}, compact_daemon_wake {VmStat("compact_daemon_wake")}; "
            + $"pages moved by compaction {MovedBy(MigrateReason.Compaction)}, by alloc_contig_range {MovedBy(MigrateReason.ContigRange)}; "
            + $"high-order allocations {highOrder} ({highOrderFailed} failed); "
            + $"contiguous buffers {buffers} ({buffersOfPageblocks} of order 9 or 10, {buffersAboveMaxOrder} above the max order (alloc_contig_pages), {buffersRefused} refused); "
            + $"balloon: inflated {inflated}, deflated {deflated}, migrated {balloon.Migrated}, holds {balloon.Pages}; "
            + $"offlines {offlined} ({offlinesBusy} EBUSY, {pagesMovedByOffline} pages moved); "
            + $"{store}; fragmenter {fragmenterRounds} rounds, {fragmenterChecks} page checks; "
            + $"pgmigrate_success {after.Succeeded - before.Succeeded}, pgmigrate_fail {after.Failed - before.Failed}");

        Assert.That(compactMemoryCalls + compactNodeCalls, Is.GreaterThanOrEqualTo(h.AtLeast(minCompactions)), "compaction ran under the writers");
        Assert.That(MovedBy(MigrateReason.Compaction), Is.GreaterThan(0), "compaction moved pages in use");
        // Direct compaction only tries the hotplug lock's read side and skips a zone while an offline holds
        // it: a bounded run (a few seconds, an offliner running) cannot count on a stall; a soak must see some.
        if (h.Duration is not null)
            Assert.That(VmStat("compact_stall"), Is.GreaterThan(0), "direct compaction ran in allocations above order 0");
        Assert.That(buffers, Is.GreaterThanOrEqualTo(h.AtLeast(minBuffers)), "contiguous buffers were allocated under the writers");
        Assert.That(balloonCycles, Is.GreaterThanOrEqualTo(h.AtLeast(minBalloonCycles)), "the balloon inflated and deflated");
        Assert.That(balloon.Migrated, Is.GreaterThan(0), "balloon pages were migrated instead of blocking a mover");
        Assert.That(store.Migrated, Is.GreaterThan(0), "the movable store's frames were migrated");
        Assert.That(offlined, Is.GreaterThanOrEqualTo(h.AtLeast(minOfflines)), "ZONE_MOVABLE blocks went offline while compaction ran");
        Assert.That(h.Forks, Is.GreaterThanOrEqualTo(h.AtLeast(minForks)));
        Assert.That(h.MaxSharing, Is.GreaterThan(0), "KSM merged while compaction ran");

        Assert.That(hotplug.Blocks.Select(b => b.State), Is.All.EqualTo("online"), "every block online again");

        // Nothing lost: the balloon gives back all it holds, the store frees its frames, every process
        // exits, and then every frame but the zero page is free.
        Assert.That(balloon.Deflate(balloon.Pages), Is.EqualTo(inflated - deflated), "the balloon holds what it took and did not give back");
        Assert.That(balloon.Pages, Is.Zero);
        store.FreeAll();
        Assert.That(store.PageCount, Is.Zero, "the movable store holds no frame");
        foreach (VmProcess p in fragmenterProcesses)
            p.Exit();
        compaction.Proactiveness = 0;
        lock (compaction.KcompactdMutex) // no kcompactd step holds free frames isolated while the frames are counted
            h.ExitEveryProcessAndAssertEveryFrameFree();
    }
}
