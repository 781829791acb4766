using Vmm.Mm;

namespace Vmm.Tests.Robustness;

/// <summary>
/// Every public call under fault injection (MachineOptions.FaultInjection, Linux's fail_page_alloc):
/// for each call, the 1st, 2nd, ... frame allocation it makes fails, until the call makes no more.
/// Each time the call must return its errno or throw its documented exception (DocumentedFailures),
/// Audit must stay clean, a retry without injection must succeed where the call is repeatable, the
/// data the scenario wrote must still be there, and after everything exits every frame but the zero
/// page must be free again. A random sweep (a probability per allocation, several seeds) follows.
/// VMM_STRESS_SCALE=N runs N times more random seeds.
/// </summary>
[TestFixture]
[Category("Smoke")]
public sealed class FaultInjectionTests
{
    private const int Page = 4096;
    private const int Pages = 6; // small, so a call makes a few dozen allocations at most
    private const int MaxInjectionPoint = 64;

    private static readonly FaultInjection Disarmed = new() { Sites = FaultSites.None };

    /// <summary>What a scenario works on; built by its setup with injection off.</summary>
    private sealed class World
    {
        public required Machine Machine;
        public List<VmProcess> Processes = [];
        public List<IDisposable> Disposables = [];
        public DedupeStore? Store;
        public VmmBuffer? Buffer;
        public ulong Va;
        public VmProcess P => Processes[0];
        public VmProcess Child => Processes[1];
        public global::Vmm.Ksm Ksm => Machine.Ksm!;
    }

    /// <param name="Name">the call under test.</param>
    /// <param name="Setup">builds the world, injection off.</param>
    /// <param name="Call">the call under injection; returns its errno, or null.</param>
    /// <param name="Verify">after the call (failed or not) and its retry: what must still hold.</param>
    /// <param name="Retry">the call is repeatable: once injection is off again it must succeed.</param>
    /// <param name="Options">the machine, when MachineOptions.Small cannot show the call's allocations.</param>
    private sealed record Scenario(string Name, Action<World> Setup, Func<World, Errno?> Call, Action<World>? Verify = null, bool Retry = false, MachineOptions? Options = null)
    {
        public override string ToString() => Name;
    }

    private static byte PatternByte(int page) => (byte)(0x31 + page);

    /// <summary>Maps <paramref name="pages"/> pages in <paramref name="p"/> and fills page i with PatternByte(i).</summary>
    private static ulong MapPattern(VmProcess p, int pages = Pages, MapFlags flags = MapFlags.Private)
    {
        Assert.That(p.Mmap(0, (ulong)(pages * Page), Protection.ReadWrite, flags, out ulong va), Is.EqualTo(Errno.None));
        for (int i = 0; i < pages; i++)
            p.Fill(va + (ulong)(i * Page), Page, PatternByte(i));
        return va;
    }

    private static void AssertPattern(VmProcess p, ulong va, int pages = Pages)
    {
        var page = new byte[Page];
        for (int i = 0; i < pages; i++)
        {
            p.Read(va + (ulong)(i * Page), page);
            Assert.That(page.Count(b => b != PatternByte(i)), Is.Zero, $"page {i} of {p} keeps its contents");
        }
    }

    /// <summary>Two processes with the same patterned, mergeable pages, merged by two full scans.</summary>
    private static void MergedPair(World w)
    {
        w.Processes.Add(w.Machine.CreateProcess());
        w.Processes.Add(w.Machine.CreateProcess(homeNode: 1));
        w.Va = MapPattern(w.P);
        ulong other = MapPattern(w.Child);
        Assert.That(other, Is.EqualTo(w.Va), "both processes map at the same address (top-down, empty)");
        Assert.That(w.P.Madvise(w.Va, Pages * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
        Assert.That(w.Child.Madvise(w.Va, Pages * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
        w.Ksm.RunFullScans(2);
        Assert.That(w.Ksm.GetStats().PagesSharing, Is.GreaterThan(0), "the setup merged pages");
    }

    private static void OneProcess(World w) => w.Processes.Add(w.Machine.CreateProcess());

    private static void PatternedProcess(World w)
    {
        OneProcess(w);
        w.Va = MapPattern(w.P);
    }

    private static void ForkedPattern(World w)
    {
        PatternedProcess(w);
        w.Processes.Add(w.P.Fork());
    }

    private static void PatternInBoth(World w)
    {
        AssertPattern(w.P, w.Va);
        AssertPattern(w.Child, w.Va);
    }

    private static IEnumerable<Scenario> Scenarios()
    {
        yield return new("Machine.CreateProcess", _ => { }, w => { w.Processes.Add(w.Machine.CreateProcess()); return null; });
        yield return new("Mmap(Populate, private)", OneProcess,
            w => w.P.Mmap(0, Pages * Page, Protection.ReadWrite, MapFlags.Private | MapFlags.Populate, out w.Va));
        yield return new("Mmap(Populate, shared)", OneProcess,
            w => w.P.Mmap(0, Pages * Page, Protection.ReadWrite, MapFlags.Shared | MapFlags.Populate, out w.Va));
        yield return new("Mmap(Populate, read-only)", OneProcess,
            w => w.P.Mmap(0, Pages * Page, Protection.Read, MapFlags.Private | MapFlags.Populate, out w.Va));
        yield return new("Mmap(Fixed) over populated pages", PatternedProcess,
            w => w.P.Mmap(w.Va + Page, 2 * Page, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed | MapFlags.Populate, out _));
        yield return new("Write (demand faults)", w => { OneProcess(w); w.Va = w.P.Mmap(Pages * Page); },
            w => { w.P.Write(w.Va + 100, Enumerable.Repeat((byte)7, Pages * Page - 200).ToArray()); return null; },
            w =>
            {
                var data = new byte[Pages * Page - 200];
                w.P.Read(w.Va + 100, data);
                Assert.That(data.Count(b => b != 7), Is.Zero, "the retried write is whole");
            }, Retry: true);
        yield return new("Write (shared mapping)", w => { OneProcess(w); w.Va = w.P.Mmap(Pages * Page, flags: MapFlags.Shared); },
            w => { w.P.Fill(w.Va, Pages * Page, 9); return null; }, Retry: true);
        yield return new("Read (zero page and page tables)", w => { OneProcess(w); w.Va = w.P.Mmap(Pages * Page); },
            w => { w.P.Read(w.Va, new byte[Pages * Page]); return null; }, Retry: true);
        yield return new("Read<long> / Write<long>", w => { OneProcess(w); w.Va = w.P.Mmap(Pages * Page); },
            w => { w.P.Write<long>(w.Va + 3 * Page, w.P.Read<long>(w.Va) + 5); return null; },
            w => Assert.That(w.P.Read<long>(w.Va + 3 * Page), Is.EqualTo(5)), Retry: true);
        yield return new("Fill", w => { OneProcess(w); w.Va = w.P.Mmap(Pages * Page); },
            w => { w.P.Fill(w.Va, Pages * Page, 0x5A); return null; }, Retry: true);
        yield return new("Write after fork (copy on write)", ForkedPattern,
            w => { w.Child.Fill(w.Va, Pages * Page, 0xEE); return null; },
            w => AssertPattern(w.P, w.Va), Retry: true);
        yield return new("Write in the parent after fork", ForkedPattern,
            w => { w.P.Fill(w.Va, Pages * Page, 0xEE); return null; },
            w => AssertPattern(w.Child, w.Va), Retry: true);
        yield return new("Pin(write) of unpopulated pages", w => { OneProcess(w); w.Va = w.P.Mmap(Pages * Page); },
            w => { w.Disposables.Add(w.P.Pin(w.Va, Pages * Page, write: true)); return null; }, Retry: true);
        yield return new("Pin(write, longTerm) of pages in ZONE_MOVABLE (migrated out first)", PatternedProcess,
            w => { w.Disposables.Add(w.P.Pin(w.Va, Pages * Page, write: true, longTerm: true)); return null; },
            w =>
            {
                AssertPattern(w.P, w.Va);
                foreach (PinnedMemory pin in w.Disposables.OfType<PinnedMemory>())
                {
                    for (int i = 0; i < pin.PageCount; i++)
                        Assert.That(w.Machine.GetPageInfo(pin.FrameOf(i)).Zone, Is.EqualTo(ZoneType.Normal), $"pinned page {i} lies outside ZONE_MOVABLE");
                }
            }, Retry: true);
        yield return new("Pin(read, longTerm) of shared copy-on-write pages", ForkedPattern,
            w => { w.Disposables.Add(w.Child.Pin(w.Va, Pages * Page, write: false, longTerm: true)); return null; }, PatternInBoth, Retry: true);
        yield return new("Pin(read) of shared copy-on-write pages", ForkedPattern,
            w => { w.Disposables.Add(w.Child.Pin(w.Va, Pages * Page, write: false)); return null; }, PatternInBoth, Retry: true);
        yield return new("Pin(write) after fork", ForkedPattern,
            w => { w.Disposables.Add(w.P.Pin(w.Va, Pages * Page, write: true)); return null; }, PatternInBoth, Retry: true);
        yield return new("Fork", w =>
            {
                PatternedProcess(w);
                w.P.Read<byte>(w.P.Mmap(Page)); // a zero-page mapping
                ulong shared = MapPattern(w.P, 2, MapFlags.Shared);
                w.Disposables.Add(w.P.Pin(w.Va + Page, Page, write: true)); // an exclusive pinned page: copied at fork
                _ = shared;
            },
            w => { w.Processes.Add(w.P.Fork()); return null; },
            w =>
            {
                AssertPattern(w.P, w.Va);
                if (w.Processes.Count > 1)
                    AssertPattern(w.Processes[^1], w.Va);
            }, Retry: true);
        yield return new("Fork of a sparse address space", w =>
            {
                OneProcess(w);
                // Mappings under different PGD, PUD and PMD entries, each with written, read-only, zero-page and pinned pages.
                foreach (ulong at in (ulong[])[0x10_0000, 0x4000_0000, 0x7F00_0000_0000, 0x7F00_0020_0000 - 2 * Page])
                {
                    Assert.That(w.P.Mmap(at, 4 * Page, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed, out _), Is.EqualTo(Errno.None));
                    w.P.Fill(at, 2 * Page, 0x42);
                    w.P.Read<byte>(at + 2 * Page);
                    w.Disposables.Add(w.P.Pin(at + Page, Page, write: true));
                    Assert.That(w.P.Mprotect(at, Page, Protection.Read), Is.EqualTo(Errno.None));
                }
                w.Va = MapPattern(w.P);
            },
            w => { w.Processes.Add(w.P.Fork()); return null; },
            w => AssertPattern(w.Processes[^1], w.Va), Retry: true);
        yield return new("Fork of a process with KSM zero pages", w =>
            {
                PatternedProcess(w);
                w.P.Fill(w.Va, 2 * Page, 0);
                Assert.That(w.P.Madvise(w.Va, Pages * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
                Assert.That(w.Ksm.Write("use_zero_pages", "1"), Is.EqualTo(Errno.None));
                w.Ksm.RunFullScans(2);
                Assert.That(w.P.GetKsmStats().ZeroPages, Is.GreaterThan(0), "the setup mapped KSM zero pages");
            },
            w => { w.Processes.Add(w.P.Fork()); return null; }, Retry: true);
        yield return new("Fork of a KSM-merged process", MergedPair,
            w => { w.Processes.Add(w.P.Fork()); return null; }, w => AssertPattern(w.Processes[^1], w.Va), Retry: true);
        yield return new("Write to merged pages (copy of KSM pages)", MergedPair,
            w => { w.Child.Fill(w.Va, Pages * Page, 0x99); return null; }, w => AssertPattern(w.P, w.Va), Retry: true);
        yield return new("Pin(read) of merged pages (unshare)", MergedPair,
            w => { w.Disposables.Add(w.Child.Pin(w.Va, Pages * Page, write: false)); return null; }, PatternInBoth, Retry: true);
        yield return new("Mprotect (splits)", PatternedProcess,
            w => w.P.Mprotect(w.Va + Page, 2 * Page, Protection.Read), w => AssertPattern(w.P, w.Va), Retry: true);
        yield return new("Munmap (splits, frees tables)", PatternedProcess,
            w => w.P.Munmap(w.Va + Page, 2 * Page), Retry: true);
        yield return new("Madvise(DontNeed)", PatternedProcess,
            w => w.P.Madvise(w.Va, 2 * Page, Advice.DontNeed), Retry: true);
        yield return new("Madvise(WillNeed)", PatternedProcess,
            w => w.P.Madvise(w.Va, Pages * Page, Advice.WillNeed), Retry: true);
        yield return new("Madvise(Mergeable)", PatternedProcess,
            w => w.P.Madvise(w.Va + Page, 2 * Page, Advice.Mergeable), w => AssertPattern(w.P, w.Va), Retry: true);
        yield return new("Madvise(Unmergeable) of merged pages", MergedPair,
            w => w.P.Madvise(w.Va, Pages * Page, Advice.Unmergeable), PatternInBoth, Retry: true);
        yield return new("SetMemoryMerge(true)", PatternedProcess, w => w.P.SetMemoryMerge(true), Retry: true);
        yield return new("SetMemoryMerge(false) of merged pages", w => { MergedPair(w); Assert.That(w.P.SetMemoryMerge(true), Is.EqualTo(Errno.None)); },
            w => w.P.SetMemoryMerge(false), PatternInBoth, Retry: true);
        yield return new("SetDedupeDomain(range) of merged pages", MergedPair,
            w => w.P.SetDedupeDomain(w.Va, Pages * Page, 3), PatternInBoth, Retry: true);
        yield return new("SetDedupeDomain(process) of merged pages", MergedPair,
            w => w.P.SetDedupeDomain(4), PatternInBoth, Retry: true);
        yield return new("MovePages to node 1 (a failed page says -ENOMEM in its status)", PatternedProcess,
            w => w.P.MovePages(0, [.. Enumerable.Range(0, Pages).Select(i => w.Va + (ulong)(i * Page))], [.. Enumerable.Repeat(1, Pages)], new int[Pages]),
            w => AssertPattern(w.P, w.Va), Retry: true);
        yield return new("MigratePages 0 -> 1", PatternedProcess,
            w => w.P.MigratePages(0, NodeMask.Of(0), NodeMask.Of(1), out _), w => AssertPattern(w.P, w.Va), Retry: true);
        yield return new("Exit of a merged process", MergedPair,
            w => { w.P.Exit(); return null; }, w => AssertPattern(w.Child, w.Va));
        yield return new("Ksm.ScanPages", w =>
            {
                MergedPair(w);
                w.Child.Fill(w.Va, Page, 0x77); // a copy on write of a KSM page
                w.Processes.Add(w.Machine.CreateProcess());
                ulong va = MapPattern(w.Processes[2]);
                Assert.That(w.Processes[2].Madvise(va, Pages * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
            },
            w => { w.Ksm.ScanPages(1000); return null; }, w => AssertPattern(w.P, w.Va), Retry: true);
        yield return new("Ksm.RunFullScans with use_zero_pages", w =>
            {
                PatternedProcess(w);
                w.P.Fill(w.Va + Page, Page, 0);
                Assert.That(w.P.Madvise(w.Va, Pages * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
                Assert.That(w.Ksm.Write("use_zero_pages", "1"), Is.EqualTo(Errno.None));
            },
            w => { w.Ksm.RunFullScans(2); return null; }, Retry: true);
        yield return new("Ksm.Write(run, 2)", MergedPair, w => w.Ksm.Write("run", "2"), PatternInBoth, Retry: true);
        yield return new("Machine.ReleaseFreeMemory", w =>
            {
                PatternedProcess(w);
                ulong big = w.P.Mmap(6 << 20);
                w.P.Fill(big, 6 << 20, 1);
                Assert.That(w.P.Munmap(big, 6 << 20), Is.EqualTo(Errno.None));
                w.Machine.Allocator.DrainAllPages();
            },
            w => { w.Machine.ReleaseFreeMemory(); return null; }, w => AssertPattern(w.P, w.Va), Retry: true, Options: TestMachines.OneNode);
        yield return new("Ksm.WaitForMemoryRelease after merging", w =>
            {
                // More than the release threshold (2 MiB) merged, so the release worker has work.
                w.Processes.Add(w.Machine.CreateProcess());
                ulong va = w.P.Mmap(3 << 20);
                w.P.Fill(va, 3 << 20, 0x66);
                Assert.That(w.P.Madvise(va, 3 << 20, Advice.Mergeable), Is.EqualTo(Errno.None));
                w.Ksm.RunFullScans(2);
            },
            w => { w.Ksm.WaitForMemoryRelease(); return null; }, Retry: true, Options: TestMachines.OneNode);
        yield return new("DedupeStore constructor", _ => { }, w => { w.Store = new DedupeStore(w.Machine); return null; });
        yield return new("DedupeStore.Allocate", w => w.Store = new DedupeStore(w.Machine),
            w => { w.Buffer = w.Store!.Allocate(Pages * Page); return null; });
        yield return new("DedupeStore.Create", w => w.Store = new DedupeStore(w.Machine),
            w => { w.Buffer = w.Store!.Create(Enumerable.Repeat((byte)3, Pages * Page).ToArray()); return null; },
            w => Assert.That(w.Store!.Buffers, Has.Count.EqualTo(1), "a failed Create leaves no buffer behind; the retry made one"), Retry: true);
        yield return new("VmmBuffer.Write", w => { w.Store = new DedupeStore(w.Machine); w.Buffer = w.Store.Allocate(Pages * Page); },
            w => { w.Buffer!.Write(10, new byte[Pages * Page - 10]); return null; }, Retry: true);
        yield return new("VmmBuffer.Pin", w => { w.Store = new DedupeStore(w.Machine); w.Buffer = w.Store.Allocate(Pages * Page); },
            w => { w.Disposables.Add(w.Buffer!.Pin(writable: true)); return null; }, Retry: true);
        yield return new("PinnedBuffer of a merged buffer", w =>
            {
                w.Store = new DedupeStore(w.Machine);
                w.Buffer = w.Store.Create(Enumerable.Repeat((byte)3, Pages * Page).ToArray());
                w.Store.Create(Enumerable.Repeat((byte)3, Pages * Page).ToArray());
                w.Ksm.RunFullScans(2);
            },
            w =>
            {
                PinnedBuffer pin = w.Buffer!.Pin(writable: true);
                w.Disposables.Add(pin);
                pin.GetSpan(0)[0] = 9;
                return null;
            },
            w => Assert.That(w.Store!.Buffers.Single(b => b != w.Buffer).ToArray().Count(b => b != 3), Is.Zero, "the other buffer keeps its bytes"), Retry: true);
        yield return new("DedupeStore.EstimateSavings", w =>
            {
                w.Store = new DedupeStore(w.Machine);
                w.Buffer = w.Store.Create(Enumerable.Repeat((byte)3, Pages * Page).ToArray());
                w.Store.Create(Enumerable.Repeat((byte)3, Pages * Page).ToArray());
            },
            w => { w.Store!.EstimateSavings(); return null; }, Retry: true);
        yield return new("DedupeStore.Dispose after merging", w =>
            {
                w.Store = new DedupeStore(w.Machine);
                w.Buffer = w.Store.Create(Enumerable.Repeat((byte)3, Pages * Page).ToArray());
                w.Store.Create(Enumerable.Repeat((byte)3, Pages * Page).ToArray());
                w.Ksm.RunFullScans(2);
            },
            w => { w.Store!.Dispose(); return null; });
        yield return new("VmmBuffer.Dispose", w => { w.Store = new DedupeStore(w.Machine); w.Buffer = w.Store.Create(new byte[Page + 1]); },
            w => { w.Buffer!.Dispose(); return null; });
    }

    private static Machine NewMachine(MachineOptions? options) =>
        TestMachines.Create((options ?? TestMachines.Small) with { PoisonFreedFrames = true, FaultInjection = Disarmed });

    [TestCaseSource(nameof(Scenarios))]
    public void Every_allocation_of_a_call_can_fail_and_the_call_fails_cleanly(object scenarioObject)
    {
        var scenario = (Scenario)scenarioObject;
        int failed = 0;
        for (int n = 1; n <= MaxInjectionPoint; n++)
        {
            long injected = RunOnce(scenario, new FaultInjection { Space = n - 1, Times = 1, Sites = FaultSites.All }, $"allocation {n} fails");
            if (injected == 0)
                break; // the call makes fewer than n allocations: every point was tried
            failed++;
        }
        // RunOnce asserted every point; a call that allocates nothing (munmap, madvise, a scan of merged
        // pages) ran once without a failure and must simply succeed, which RunOnce checked too.
        TestContext.Out.WriteLine($"{scenario.Name}: {failed} injection points");
    }

    [TestCaseSource(nameof(Scenarios))]
    public void Random_allocations_of_a_call_can_fail_and_the_call_fails_cleanly(object scenarioObject)
    {
        var scenario = (Scenario)scenarioObject;
        int seeds = 4 * TestEnvironment.StressScale;
        for (ulong seed = 1; seed <= (ulong)seeds; seed++)
            RunOnce(scenario, new FaultInjection { Seed = seed, Probability = 0.3, Sites = FaultSites.All }, $"seed {seed}, probability 0.3");
    }

    [Test]
    public void A_refused_decommit_leaves_the_block_free_and_is_tried_again_later()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(2 << 20, options: TestMachines.Small with { FaultInjection = new FaultInjection { Sites = FaultSites.HostDecommit, Times = 1 } });
        (Machine machine, VmProcess p, ulong va, _) = region;
        p.Fill(va, 2 << 20, 1);
        p.Exit();
        machine.Allocator.DrainAllPages(); // the per-CPU caches hold some of the frames back from their pageblock
        long free = machine.GetStats().AllFreePages;
        long first = machine.ReleaseFreeMemory();
        Assert.That(machine.GetFaultInjectionStats().HostDecommitFailures, Is.EqualTo(1), "one decommit was refused");
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(free), "a refused decommit loses no frame");
        long second = machine.ReleaseFreeMemory();
        Assert.That(second, Is.GreaterThan(0), "the refused block is given back by the next release");
        Assert.That(first + second, Is.GreaterThanOrEqualTo(2L << 20));
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void A_decommit_refused_in_the_KSM_release_worker_fails_neither_WaitForMemoryRelease_nor_Dispose()
    {
        // Before: Arena.Decommit's ArenaException escaped ReleaseFreeMemory into the background release
        // task, which stayed faulted, so every later WaitForMemoryRelease and Machine.Dispose threw.
        var machine = TestMachines.Create(TestMachines.OneNode with { FaultInjection = new FaultInjection { Sites = FaultSites.HostDecommit } });
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(3 << 20);
        p.Fill(va, 3 << 20, 0x66);
        Assert.That(p.Madvise(va, 3 << 20, Advice.Mergeable), Is.EqualTo(Errno.None));
        machine.Ksm!.RunFullScans(2);
        Assert.That(() => machine.Ksm.WaitForMemoryRelease(), Throws.Nothing, "a refused decommit is not the host's problem");
        Assert.That(machine.GetFaultInjectionStats().HostDecommitFailures, Is.GreaterThan(0), "every decommit was refused");
        Assert.That(() => machine.Ksm.WaitForMemoryRelease(), Throws.Nothing, "nor is it remembered");
        p.Exit();
        Assert.That(machine.Audit(), Is.Empty);
        Assert.That(() => machine.Dispose(), Throws.Nothing);
    }

    /// <summary>One run of a scenario: setup, the call under injection, checks, retry, teardown, leak check. Returns the failures injected.</summary>
    private static long RunOnce(Scenario scenario, FaultInjection injection, string what)
    {
        using Machine machine = NewMachine(scenario.Options);
        long freeAtBoot = machine.GetStats().AllFreePages;
        var w = new World { Machine = machine };
        scenario.Setup(w);

        machine.FaultInjector!.Reset(injection);
        Errno? errno = null;
        Exception? thrown = null;
        try
        {
            errno = scenario.Call(w);
        }
        catch (Exception e)
        {
            thrown = e;
        }
        long injected = machine.GetFaultInjectionStats().TotalFailures;
        machine.FaultInjector.Reset(Disarmed);

        string context = $"{scenario.Name}, {what} ({injected} injected)";
        if (thrown is not null)
        {
            Assert.That(DocumentedFailures.IsOutOfMemory(thrown), Is.True, $"{context}: threw {thrown}");
            Assert.That(injected, Is.GreaterThan(0), $"{context}: out of memory without an injected failure: {thrown}");
        }
        if (errno is Errno e2 && e2 != Errno.None)
        {
            Assert.That(DocumentedFailures.OutOfMemoryErrnos, Does.Contain(e2), $"{context}: returned {e2}");
            Assert.That(injected, Is.GreaterThan(0), $"{context}: {e2} without an injected failure");
        }
        AssertAudit(machine, $"{context}, after the call");

        if (scenario.Retry && (thrown is not null || errno is not (null or Errno.None)))
        {
            Errno? again = scenario.Call(w);
            Assert.That(again ?? Errno.None, Is.EqualTo(Errno.None), $"{context}: the retry without injection");
            AssertAudit(machine, $"{context}, after the retry");
        }
        if (scenario.Verify is not null && (scenario.Retry || (thrown is null && errno is null or Errno.None)))
            scenario.Verify(w);

        // Teardown: every pin, store and process goes; every frame but the zero page must come back.
        for (int i = w.Disposables.Count - 1; i >= 0; i--)
            w.Disposables[i].Dispose();
        w.Store?.Dispose();
        foreach (VmProcess p in machine.Processes)
            p.Exit();
        machine.Tlb.Flush();
        AssertAudit(machine, $"{context}, after every exit");
        long zeroPage = machine.ZeroPagePfnIfAllocated >= 0 ? 1 : 0;
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeAtBoot - zeroPage), $"{context}: every frame but the zero page is free after every exit");
        return injected;
    }

    private static void AssertAudit(Machine machine, string context)
    {
        IReadOnlyList<string> problems = machine.Audit();
        if (problems.Count > 0)
            Assert.Fail($"{context}: Audit found {string.Join("; ", problems.Take(5))}");
    }
}
