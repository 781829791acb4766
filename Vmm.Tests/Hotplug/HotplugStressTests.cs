using System.Collections.Concurrent;
using System.Globalization;
using Vmm.Mm;
using Vmm.Tests.Stress;

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
/// what it managed at boot. The writers, the oracle, the forker, move_pages, the pins and KSM are
/// <see cref="StressHarness"/>'s.
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
    private const ulong Page = StressHarness.Page;
    private const int MaxOfflineAtOnce = 2;

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
        ZoneType?[] zoneAtBoot = [.. hotplug.Blocks.Select(b => b.Zone)];

        // Every process lives on node 0, so node 1's NORMAL blocks hold no page table and can go offline;
        // node 0's NORMAL blocks hold the page tables (and the zero page): their offline must fail with
        // an explanation, or succeed when the tables happen to be elsewhere.
        var h = new StressHarness(machine, $"HotplugStressTests(merge_across_nodes={mergeAcrossNodes})", seed,
            new StressLayout(PrivatePages: 96, CowPages: 64, SharedPages: 32, P2HomeNode: 0)) { OpsPerWriter = 3_000 * TestEnvironment.StressScale };
        IReadOnlyList<StressRegion> regions = h.Regions;

        long minMovableOfflines = 4L * TestEnvironment.StressScale, minNormalOfflines = 2L * TestEnvironment.StressScale;
        long minForks = 5L * TestEnvironment.StressScale;
        long offlinedMovable = 0, offlinedNormal = 0, onlined = 0, busy = 0, busyAtIsolation = 0, interrupted = 0, pagesMovedByOffline = 0;
        long goingOfflineHeard = 0, ksmWaitedSeen = 0;
        var blockerReasons = new ConcurrentDictionary<OfflineBlockReason, long>();

        h.MechanismsShort = () => Volatile.Read(ref offlinedMovable) < minMovableOfflines || Volatile.Read(ref offlinedNormal) < minNormalOfflines
                                  || Volatile.Read(ref h.Forks) < minForks;

        // Below KSM's callback (priority 100): at MEM_GOING_OFFLINE KSM has already stopped its scanner
        // (KSM_RUN_OFFLINE), and at MEM_OFFLINE / MEM_CANCEL_OFFLINE it has let it go again.
        using IDisposable watcher = hotplug.RegisterNotifier((action, n) =>
        {
            switch (action)
            {
                case MemoryNotifierEvent.GoingOffline:
                    Interlocked.Increment(ref goingOfflineHeard);
                    if (!ksm.IsOfflining)
                        h.Fail($"KSM is not waiting at MEM_GOING_OFFLINE of pfn {n.StartPfn}");
                    else
                        Interlocked.Increment(ref ksmWaitedSeen);
                    break;
                case MemoryNotifierEvent.Offline or MemoryNotifierEvent.CancelOffline:
                    if (ksm.IsOfflining)
                        h.Fail($"KSM still waits at {action} of pfn {n.StartPfn}");
                    break;
            }
            return Errno.None;
        }, priority: 0);

        // No page of any region may be mapped from an offline block.
        void AssertNothingMappedFrom(MemoryBlock block)
        {
            foreach (StressRegion r in regions)
            {
                for (int page = 0; page < r.Pages; page++)
                {
                    PagemapEntry entry = r.Process.GetPagemap(r.PageVa(page));
                    if (entry.Present && !entry.ZeroPage && entry.Pfn >= block.StartPfn && entry.Pfn < block.StartPfn + block.Frames)
                        h.Fail($"page {page} of {r} is mapped from frame {entry.Pfn} of {block}, offline");
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

        // Takes random blocks offline (at most two at once) and brings offline ones back in the zone they
        // had; at the end, every block still offline comes back.
        var offline = new Dictionary<int, ZoneType>();
        h.Add("offliner", 201, random =>
        {
            // Half the time the block that holds a random page of a region, so that offlines have pages to move.
            MemoryBlock block = hotplug.GetBlock(random.Next(hotplug.Blocks.Count));
            if (random.Next(2) == 0)
            {
                StressRegion r = regions[random.Next(regions.Count)];
                PagemapEntry entry = r.Process.GetPagemap(r.PageVa(random.Next(r.Pages)));
                if (entry.Present && !entry.ZeroPage)
                    block = hotplug.GetBlock(machine.Topology.BlockOf(entry.Pfn));
            }
            if (offline.TryGetValue(block.Index, out ZoneType zoneBefore))
            {
                Errno online = random.Next(2) == 0 ? block.Online(zoneBefore)
                    : block.Write("state", zoneBefore == ZoneType.Movable ? "online_movable" : "online_kernel");
                if (online != Errno.None || block.State != "online" || block.Zone != zoneBefore)
                    h.Fail($"online of {block} to {zoneBefore} returned {online}, state {block.State}, zone {block.Zone}");
                offline.Remove(block.Index);
                Interlocked.Increment(ref onlined);
                return;
            }
            if (offline.Count >= MaxOfflineAtOnce)
                return;
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
                    h.Fail($"offline of {block} succeeded but it is {block.State}, zone {block.Zone}, {result.Blockers.Count} blockers");
                offline[block.Index] = zone;
                Interlocked.Increment(ref zone == ZoneType.Movable ? ref offlinedMovable : ref offlinedNormal);
                AssertNothingMappedFrom(block);
                return;
            }
            if (block.State != "online" || block.Zone != zone)
                h.Fail($"a failed offline ({result.Error}) of {block} left it {block.State} in {block.Zone}, not online in {zone}");
            if (result.Error == Errno.EINTR && cancellable)
                Interlocked.Increment(ref interrupted);
            else if (result.Error == Errno.EBUSY && Explains(block, zone, result))
            {
                Interlocked.Increment(ref busy);
                if (result.Passes == 0)
                    Interlocked.Increment(ref busyAtIsolation);
                else if (result.Passes > hotplug.OfflineMigrateMaxPasses)
                    h.Fail($"offline of {block} made {result.Passes} passes, more than {hotplug.OfflineMigrateMaxPasses}");
            }
            else
                h.Fail($"offline of {block} ({zone}) returned {result.Error} after {result.Passes} passes: {string.Join("; ", result.Blockers)}");
        }, after: () =>
        {
            foreach ((int index, ZoneType zone) in offline)
            {
                Errno online = hotplug.GetBlock(index).Online(zone);
                if (online != Errno.None)
                    h.Fail($"final online of block {index} returned {online}");
            }
        });

        // Short pins (a device writing into the page): an offline meanwhile must wait for them or give up.
        h.AddShortPinner(202);
        h.AddForker(203);
        h.AddMovePagesMover(204, maxPauseMs: 1);
        // KSM stepped by hand beside ksmd: both wait while a block goes offline.
        h.AddKsmScanner(64);

        h.StartKsmd();
        h.Run();

        // Every block is back in the zone it had at boot; every byte of every region reads as the shadow says.
        Assert.That(hotplug.Blocks.Select(b => b.Zone), Is.EqualTo(zoneAtBoot), "every block online again in its zone");
        Assert.That(ksm.IsOfflining, Is.False);
        h.CheckEveryRegion("final check");

        TestContext.Progress.WriteLine(
            h.Report()
            + $"; offlines: {offlinedMovable} movable, {offlinedNormal} normal, {pagesMovedByOffline} pages moved; onlines {onlined}; "
            + $"EBUSY {busy} ({busyAtIsolation} at isolation), EINTR {interrupted}; blockers [{string.Join(", ", blockerReasons.Select(kv => $"{kv.Key} {kv.Value}"))}]; "
            + $"MEM_GOING_OFFLINE {goingOfflineHeard} (KSM waiting at {ksmWaitedSeen})");

        Assert.That(offlinedMovable, Is.GreaterThanOrEqualTo(h.AtLeast(minMovableOfflines)), "ZONE_MOVABLE blocks went offline under the writers");
        Assert.That(offlinedNormal, Is.GreaterThanOrEqualTo(h.AtLeast(minNormalOfflines)), "ZONE_NORMAL blocks went offline under the writers");
        Assert.That(pagesMovedByOffline, Is.GreaterThan(0), "offline moved pages in use");
        Assert.That(h.Forks, Is.GreaterThanOrEqualTo(h.AtLeast(minForks)));
        Assert.That(h.MaxSharing, Is.GreaterThan(0), "KSM merged while blocks went offline");
        Assert.That(ksmWaitedSeen, Is.EqualTo(goingOfflineHeard), "KSM waited through every offline");

        // Nothing lost: once every process is gone, every frame but the zero page is free again and every
        // zone manages what it managed at boot.
        h.ExitEveryProcessAndAssertEveryFrameFree();
    }
}
