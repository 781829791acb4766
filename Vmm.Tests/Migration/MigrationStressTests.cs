using Vmm.Mm;
using Vmm.Tests.Stress;

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
/// memory_migrate) holds for every page; after every process exits, every frame but the zero page is free.
/// The writers, the oracle, the forker, move_pages and KSM are <see cref="StressHarness"/>'s.
/// </summary>
[TestFixture]
[Category("Stress")]
[Category("Migration")]
public sealed class MigrationStressTests
{
    private const ulong Page = StressHarness.Page;

    [TestCase(0)]
    [TestCase(1)]
    public void No_write_is_lost_misplaced_or_stale_while_every_mover_moves_pages_between_nodes(int mergeAcrossNodes)
    {
        int seed = TestEnvironment.Seed(11_000 + mergeAcrossNodes);
        using var machine = TestMachines.Create(TestMachines.TwoLargeNodes with { PoisonFreedFrames = true });
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("merge_across_nodes", mergeAcrossNodes.ToString(System.Globalization.CultureInfo.InvariantCulture)), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("max_page_sharing", "4"), Is.EqualTo(Errno.None));

        // P2 lives on node 1 in a cpuset whose mems flip; memory_migrate makes mems changes move its pages (cpuset_migrate_mm).
        Cpuset flipping = machine.CreateCpuset("flipping", NodeMask.Of(0, 1));
        flipping.MemoryMigrate = true;
        var h = new StressHarness(machine, $"MigrationStressTests(merge_across_nodes={mergeAcrossNodes})", seed,
            new StressLayout(PrivatePages: 24, CowPages: 24, SharedPages: 16, P2HomeNode: 1)
            {
                ConfigureP2 = p2 => Assert.That(flipping.Attach(p2), Is.EqualTo(Errno.None)),
            }) { OpsPerWriter = 4_000 * TestEnvironment.StressScale };
        (VmProcess p0, VmProcess p1, VmProcess p2) = (h.P0, h.P1, h.P2);
        IReadOnlyList<StressRegion> regions = h.Regions;

        long minMoves = 200L * TestEnvironment.StressScale, minForks = 10L * TestEnvironment.StressScale;
        long longtermPins = 0, longtermPinsRefused = 0;
        long mbindCalls = 0, cpusetChanges = 0, replaced = 0, replaceBackedOff = 0;
        long migratePagesCalls = 0, migratePagesNotMoved = 0;
        MigrationStats before = machine.GetMigrationStats();

        long MovedByMbind() => machine.GetMigrationStats().SucceededByReason.GetValueOrDefault(MigrateReason.MempolicyMbind)
                               - before.SucceededByReason.GetValueOrDefault(MigrateReason.MempolicyMbind);

        h.MechanismsShort = () => MovedByMbind() < minMoves || Volatile.Read(ref replaced) < minMoves || Volatile.Read(ref h.Forks) < minForks
                                  || Volatile.Read(ref cpusetChanges) < 4 || Volatile.Read(ref h.MovePagesPlaced) < minMoves
                                  || Volatile.Read(ref migratePagesCalls) < 4;

        // mbind with MOVE (pages this process alone maps) or MOVE_ALL (every page) flips ranges of P0 and
        // P1 between node 0 and node 1, with BIND or PREFERRED policies.
        h.Add("mbind mover", 101, random =>
        {
            StressRegion region = regions[random.Next(regions.Count)];
            VmProcess p = region.Kind == RegionKind.Shared ? h.Processes[random.Next(2)] : region.Process;
            if (p == p2)
                return; // P2 belongs to the cpuset mover
            int first = random.Next(region.Pages);
            int count = 1 + random.Next(region.Pages - first);
            MempolicyMode mode = random.Next(3) == 0 ? MempolicyMode.Preferred : MempolicyMode.Bind;
            MovePolicyFlags flags = random.Next(2) == 0 ? MovePolicyFlags.Move : MovePolicyFlags.MoveAll;
            Errno e = p.Mbind(region.PageVa(first), (ulong)count * Page, mode, NodeMask.Of(random.Next(2)), MempolicyFlags.None, flags);
            if (e != Errno.None)
                h.Fail($"mbind {mode} {flags} of {count} pages of {region} returned {e}");
            Interlocked.Increment(ref mbindCalls);
        });

        // P2's cpuset flips its mems: {0}, {1}, {0, 1}. Its policies are rebound; its new pages follow.
        NodeMask[] choices = [NodeMask.Of(0), NodeMask.Of(1), NodeMask.Of(0, 1)];
        h.Add("cpuset mover", 102, random =>
        {
            Errno e = flipping.SetMems(choices[random.Next(choices.Length)]);
            if (e != Errno.None)
                h.Fail($"cpuset mems returned {e}");
            Interlocked.Increment(ref cpusetChanges);
            Thread.Sleep(random.Next(3));
        });

        // "Move the page at this address now", one page at a time, to a random node; and pins (short-term
        // ones make every move of the pinned page fail until they are released).
        h.Add("replacer", 103, random =>
        {
            (StressRegion region, int page, VmProcess p) = h.PickPage(random);
            ulong va = region.PageVa(page);
            if (random.Next(16) == 0)
            {
                bool write = random.Next(2) == 0;
                // Half of them long-term (FOLL_LONGTERM): the page first leaves ZONE_MOVABLE, under the
                // writers, KSM and the other movers. Its move may find the page busy (another pin, a
                // merge in progress): Linux's -ENOMEM, with nothing pinned.
                bool longTerm = random.Next(2) == 0;
                bool pinned = h.PinAndWrite(region, p, va, write, longTerm, random, pin =>
                {
                    if (longTerm)
                    {
                        Interlocked.Increment(ref longtermPins);
                        if (machine.GetPageInfo(pin.FrameOf(0)).Zone == ZoneType.Movable)
                            h.Fail($"a long-term pin of 0x{va:x} in {p} holds a page in ZONE_MOVABLE");
                    }
                    Thread.Yield();
                });
                if (!pinned)
                    Interlocked.Increment(ref longtermPinsRefused);
                return;
            }
            Errno result = p.Mm.TryReplacePage(va, random.Next(2));
            if (result == Errno.None)
                Interlocked.Increment(ref replaced);
            else if (result is Errno.EBUSY or Errno.EAGAIN or Errno.ENOENT or Errno.EFAULT)
                Interlocked.Increment(ref replaceBackedOff);
            else
                h.Fail($"replace of 0x{va:x} in {p} returned {result}");
        });

        h.AddForker(104);
        // A node outside P2's cpuset, whose mems flip meanwhile, refuses the whole call for P2's pages.
        h.AddMovePagesMover(105, acceptCallError: (_, target, e) => e == Errno.EACCES && target == p2);

        // migrate_pages: every page of P0 or P1 on one node goes to the other.
        h.Add("migrate_pages mover", 106, random =>
        {
            VmProcess target = h.Processes[random.Next(2)];
            int from = random.Next(2);
            VmProcess caller = h.Processes[random.Next(h.Processes.Length)];
            Errno e = caller.MigratePages(target.Pid, NodeMask.Of(from), NodeMask.Of(1 - from), out long notMoved);
            if (e == Errno.EINVAL && caller == p2)
                return; // the new node is outside the caller's own cpuset (kernel_migrate_pages), whose mems flip
            if (e != Errno.None)
                h.Fail($"migrate_pages of {target} from node {from} returned {e}");
            Interlocked.Increment(ref migratePagesCalls);
            Interlocked.Add(ref migratePagesNotMoved, notMoved);
            Thread.Sleep(random.Next(3));
        });
        h.AddKsmWatcher();

        h.StartKsmd();
        h.Run();
        h.CheckEveryRegion("final check");

        // Asserts that every page of the regions, as seen through one process, is placed as it should be.
        void AssertPlacement(IEnumerable<StressRegion> of, VmProcess through, Func<PagemapEntry, bool> placed, string context)
        {
            foreach (StressRegion r in of)
            {
                for (int page = 0; page < r.Pages; page++)
                {
                    PagemapEntry entry = through.GetPagemap(r.PageVa(page));
                    Assert.That(placed(entry), Is.True, $"page {page} of {r} {context}: {entry}");
                }
            }
        }

        // The last command fixes the placement: mbind BIND node 1 with MOVE_ALL over every range of P0
        // (shared and copy-on-write pages included) leaves every page of them on node 1 (nothing is pinned now).
        long movedByMbindBeforeFinal = MovedByMbind();
        foreach (StressRegion r in regions.Where(r => r.Process == p0))
            Assert.That(p0.Mbind(r.Base, r.Length, MempolicyMode.Bind, NodeMask.Of(1), MempolicyFlags.None, MovePolicyFlags.MoveAll), Is.EqualTo(Errno.None));
        AssertPlacement(regions.Where(r => r.Process == p0), p0, entry => entry.Present && entry.Node == 1, "after mbind BIND {1} MOVE_ALL");
        h.CheckEveryRegion("check after the final moves");

        // migrate_pages of P1 from node 0 to node 1 (root: MOVE_ALL) leaves every page it maps on node 1.
        Assert.That(p1.MigratePages(p1.Pid, NodeMask.Of(0), NodeMask.Of(1), out long finalNotMoved), Is.EqualTo(Errno.None));
        Assert.That(finalNotMoved, Is.Zero, "nothing is pinned or busy now");
        AssertPlacement(regions.Where(r => r.Process == p1 || r.Kind == RegionKind.Shared), p1, entry => !entry.Present || entry.Node == 1,
            $"in {p1} after migrate_pages {{0}} -> {{1}}");

        // P2's cpuset moves with memory_migrate: mems {0}, then {1}: every page of P2 ends on node 1.
        Assert.That(flipping.SetMems(NodeMask.Of(0)), Is.EqualTo(Errno.None));
        Assert.That(flipping.SetMems(NodeMask.Of(1)), Is.EqualTo(Errno.None));
        AssertPlacement(regions.Where(r => r.Process == p2), p2, entry => entry.Present && entry.Node == 1, "after its cpuset's mems became {1} with memory_migrate");
        h.CheckEveryRegion("check after migrate_pages and the cpuset move");

        MigrationStats after = machine.GetMigrationStats();
        TestContext.Progress.WriteLine(
            h.Report()
            + $"; moved by mbind {movedByMbindBeforeFinal} pages in {mbindCalls} calls (+{MovedByMbind() - movedByMbindBeforeFinal} by the final one), "
            + $"TryReplacePage {replaced} ({replaceBackedOff} backed off), cpuset mems changes {cpusetChanges} (memory_migrate on), "
            + $"long-term pins {longtermPins} ({longtermPinsRefused} refused, "
            + $"{after.SucceededByReason.GetValueOrDefault(MigrateReason.LongtermPin) - before.SucceededByReason.GetValueOrDefault(MigrateReason.LongtermPin)} pages moved out of ZONE_MOVABLE for them); "
            + $"migrate_pages {migratePagesCalls} calls ({migratePagesNotMoved} not moved); "
            + $"pgmigrate_success {after.Succeeded - before.Succeeded}, pgmigrate_fail {after.Failed - before.Failed}, faults waited {machine.Migration.FaultsWaited}");

        Assert.That(h.MaxSharing, Is.GreaterThan(0), "ksmd merged while the pages moved");
        Assert.That(h.Forks, Is.GreaterThanOrEqualTo(h.AtLeast(minForks)));
        Assert.That(replaced, Is.GreaterThanOrEqualTo(h.AtLeast(minMoves)), "frames were replaced under the writers");
        Assert.That(movedByMbindBeforeFinal, Is.GreaterThanOrEqualTo(h.AtLeast(minMoves)), "mbind moved pages under the writers");
        Assert.That(h.MovePagesPlaced, Is.GreaterThanOrEqualTo(h.AtLeast(minMoves)), "move_pages placed pages under the writers");
        Assert.That(migratePagesCalls, Is.GreaterThanOrEqualTo(h.AtLeast(4)), "migrate_pages ran under the writers");
        h.ExitEveryProcessAndAssertEveryFrameFree();
    }
}
