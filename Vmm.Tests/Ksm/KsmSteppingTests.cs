using Vmm.Mm;
using static Vmm.Tests.Ksm.KsmTestKit;
using static Vmm.Tests.TestMachines;

namespace Vmm.Tests.Ksm;

/// <summary>
/// Stepping by hand (issue 9, deliverable 9): with MachineOptions.BackgroundThreads false no thread runs
/// inside the machine; run=1 enables merging and the host advances it with ScanPages / RunFullScans,
/// under Linux's knob rules and counters.
/// </summary>
[TestFixture]
[Category("Ksm")]
[Category("Smoke")]
public sealed class KsmSteppingTests
{
    private static Machine NewMachine(bool backgroundThreads) => Create(TwoLargeNodes with { BackgroundThreads = backgroundThreads });

    /// <summary>64 pages: 16 copies each of 4 contents, mergeable.</summary>
    private static ulong MapDuplicates(VmProcess p) => MapPattern(p, 64, i => (byte)(1 + i % 4));

    [Test]
    public void Run_1_without_background_threads_starts_no_ksmd_and_nothing_merges_until_the_host_steps()
    {
        using Machine machine = NewMachine(backgroundThreads: false);
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        MapDuplicates(p);
        Assert.That(ksm.Write("sleep_millisecs", "0"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("run", "1"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Read("run"), Is.EqualTo("1"), "run reads back as written");
        Assert.That(ksm.HasThread, Is.False, "no ksmd thread");

        // A background ksmd with sleep_millisecs 0 would have done many full scans by now.
        Thread.Sleep(100);
        KsmStats idle = ksm.GetStats();
        Assert.That((idle.FullScans, idle.PagesScanned, idle.PagesSharing), Is.EqualTo((0L, 0L, 0L)), "nothing scans on its own");

        ksm.RunFullScans(2);
        KsmStats stepped = ksm.GetStats();
        Assert.That(stepped.PagesShared, Is.EqualTo(4), "four contents, one KSM page each");
        Assert.That(stepped.PagesSharing, Is.EqualTo(60));
        Assert.That(ksm.HasThread, Is.False, "stepping starts no thread either");
        AssertAuditClean(machine);
    }

    [Test]
    public void Counters_after_the_same_steps_match_a_machine_with_background_threads()
    {
        using Machine manual = NewMachine(backgroundThreads: false), background = NewMachine(backgroundThreads: true);
        // The background machine keeps run=0, so that only the steps below scan it.
        Assert.That(manual.Ksm!.Write("run", "1"), Is.EqualTo(Errno.None));
        var stats = new List<(KsmStats Manual, KsmStats Background)>();
        foreach (Machine machine in new[] { manual, background })
            MapDuplicates(machine.CreateProcess());
        foreach (int pages in new[] { 10, 50, 100, 7, 1000 })
        {
            manual.Ksm.ScanPages(pages);
            background.Ksm!.ScanPages(pages);
            stats.Add((manual.Ksm.GetStats(), background.Ksm.GetStats()));
        }
        manual.Ksm.RunFullScans(2);
        background.Ksm!.RunFullScans(2);
        stats.Add((manual.Ksm.GetStats(), background.Ksm.GetStats()));
        foreach ((KsmStats m, KsmStats b) in stats)
        {
            Assert.That((m.PagesShared, m.PagesSharing, m.PagesUnshared, m.PagesVolatile, m.PagesScanned, m.FullScans, m.RmapItems, m.GeneralProfit),
                Is.EqualTo((b.PagesShared, b.PagesSharing, b.PagesUnshared, b.PagesVolatile, b.PagesScanned, b.FullScans, b.RmapItems, b.GeneralProfit)),
                "the same steps, the same counters");
        }
        Assert.That(stats[^1].Manual.PagesSharing, Is.EqualTo(60));
        AssertAuditClean(manual);
        AssertAuditClean(background);
    }

    [Test]
    public void Knob_rules_stay_Linux_s_and_run_2_unmerges_before_it_returns_without_background_threads()
    {
        using Machine machine = NewMachine(backgroundThreads: false);
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapDuplicates(p);
        Assert.That(ksm.Write("run", "3"), Is.EqualTo(Errno.EINVAL));
        Assert.That(ksm.Write("run", "1"), Is.EqualTo(Errno.None));
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(60));
        Assert.That(ksm.Write("max_page_sharing", "10"), Is.EqualTo(Errno.EBUSY), "EBUSY while KSM pages exist");

        Assert.That(ksm.Write("run", "2"), Is.EqualTo(Errno.None));
        KsmStats unmerged = ksm.GetStats();
        Assert.That((unmerged.PagesShared, unmerged.PagesSharing, unmerged.RmapItems), Is.EqualTo((0L, 0L, 0L)), "run=2 unmerged everything before the write returned");
        Assert.That(p.GetPagemap(va).Ksm, Is.False);
        Assert.That(ksm.Write("max_page_sharing", "10"), Is.EqualTo(Errno.None), "and the knob may change now");
        Assert.That(ksm.HasThread, Is.False);
        AssertAuditClean(machine);
    }

    [Test]
    public void Without_background_threads_freed_frames_go_back_to_the_host_when_the_host_asks()
    {
        using Machine machine = NewMachine(backgroundThreads: false);
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        MapPattern(p, 2048, _ => 9); // 8 MiB of one content: past the 2 MiB release threshold
        Assert.That(ksm.Write("run", "1"), Is.EqualTo(Errno.None));
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.GreaterThan(512));
        Assert.That(ksm.ReleaseState(), Is.EqualTo((true, false)), "a release is due, and no worker was started");

        ksm.WaitForMemoryRelease();
        Assert.That(ksm.ReleaseState(), Is.EqualTo((false, false)), "the host's call did it, on its own thread");
        Assert.DoesNotThrow(ksm.WaitForMemoryRelease, "nothing more to release");
        Assert.That(p.Read<byte>(p.Mmap(4096)), Is.Zero);
        AssertAuditClean(machine);
    }
}

/// <summary>Test helpers on Ksm's internals.</summary>
internal static class KsmSteppingTestExtensions
{
    public static (bool Pending, bool WorkerRunning) ReleaseState(this Vmm.Ksm ksm) =>
        (ksm.MemoryReleasePending, ksm.ReleaseWorkerPending);
}
