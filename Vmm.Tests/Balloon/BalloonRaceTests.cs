using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Balloon;

/// <summary>
/// The balloon while everything else runs: inflate and deflate race memory offline / online of the
/// block its pages fill and a writer whose every byte is checked; the machine audits clean after.
/// </summary>
[Category("Compaction")]
[Category("Stress")]
public class BalloonRaceTests
{
    private const int Page = 4096;

    [Test]
    public void Inflate_and_deflate_race_offline_and_a_writer_and_the_machine_stays_consistent()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes with { BackgroundThreads = false });
        machine.Hotplug.OfflineMigrateMaxPasses = 50;
        MemoryBlock block = machine.Hotplug.GetBlock(1); // node 0's ZONE_MOVABLE block
        VmProcess p = machine.CreateProcess(homeNode: 0);
        const int pages = 256;
        ulong va = p.Mmap((ulong)pages * Page);
        byte[] data = WriteRandomPages(p, va, pages, seed: 7);
        int iterations = 30 * TestEnvironment.StressScale;
        var stop = new CancellationTokenSource();
        Exception? failure = null;
        long offlined = 0, busy = 0, balloonMoves = 0;

        void Guarded(Action body)
        {
            try
            {
                body();
            }
            catch (Exception e)
            {
                Interlocked.CompareExchange(ref failure, e, null);
                stop.Cancel();
            }
        }

        var balloon = new Thread(() => Guarded(() =>
        {
            var random = new Random(TestEnvironment.Seed(11));
            while (!stop.IsCancellationRequested)
            {
                machine.Balloon.Inflate(random.Next(1, 1500));
                machine.Balloon.Deflate(random.Next(1, 1500));
            }
        }));
        var writer = new Thread(() => Guarded(() =>
        {
            var random = new Random(TestEnvironment.Seed(12));
            while (!stop.IsCancellationRequested)
            {
                int page = random.Next(pages);
                int offset = random.Next(Page);
                byte value = (byte)random.Next(256);
                lock (data)
                {
                    p.Write(va + (ulong)(page * Page + offset), value);
                    data[page * Page + offset] = value;
                }
            }
        }));
        balloon.Start();
        writer.Start();
        Guarded(() =>
        {
            for (int i = 0; i < iterations && !stop.IsCancellationRequested; i++)
            {
                long migratedBefore = machine.Balloon.Migrated;
                OfflineResult result = block.Offline();
                if (result.Succeeded)
                {
                    offlined++;
                    balloonMoves += machine.Balloon.Migrated - migratedBefore;
                    Assert.That(block.Online(), Is.EqualTo(Errno.None));
                }
                else
                {
                    Assert.That(result.Error, Is.EqualTo(Errno.EBUSY).Or.EqualTo(Errno.ENOMEM), string.Join("; ", result.Blockers));
                    busy++;
                }
            }
        });
        stop.Cancel();
        balloon.Join();
        writer.Join();
        if (failure is not null)
            throw new AssertionException($"a thread failed: {failure}");

        TestContext.Out.WriteLine($"{offlined} offlines ({balloonMoves} balloon pages migrated), {busy} busy; balloon_inflate {machine.Balloon.Inflated}, balloon_deflate {machine.Balloon.Deflated}, balloon_migrate {machine.Balloon.Migrated}");
        Assert.That(offlined, Is.GreaterThan(0), "offlines succeeded while the balloon changed size");
        Assert.That(ReadPages(p, va, pages), Is.EqualTo(data), "every byte the writer wrote");
        TestMachines.AssertAuditClean(machine);
        machine.Balloon.Deflate(long.MaxValue);
        Assert.That(machine.Balloon.Pages, Is.Zero);
        Assert.That(machine.Balloon.Inflated, Is.EqualTo(machine.Balloon.Deflated));
        TestMachines.AssertAuditClean(machine);
    }
}
