using System.Diagnostics;
using System.Runtime.InteropServices;
using NUnit.Framework;
using Vmm.Memory;

namespace Vmm.Tests.Compaction;

/// <summary>
/// Compaction (compact_memory, direct compaction, kcompactd in the background) while writer threads
/// write, read back and drop-and-refault their pages: every byte is checked against each writer's shadow.
/// Bounded by rounds (VMM_STRESS_SCALE scales them; VMM_STRESS_SECONDS runs that long).
/// </summary>
[TestFixture]
[Category("Compaction")]
[Category("Stress")]
public class CompactionRaceTests
{
    private const int Writers = 2;

    [Test]
    public void Compaction_runs_while_writers_write_and_drop_pages_and_every_byte_survives()
    {
        using var f = new FragmentedMachine(FragmentedMachine.Options with { BackgroundThreads = true });
        Machine machine = f.Machine;
        var versions = new int[f.Pages]; // the shadow: page i holds Pattern(i, versions[i]); 0 = zero page (dropped)
        for (int i = 1; i < f.Pages; i += 2)
            versions[i] = -1; // FragmentedMachine's own contents
        // Half of the kept pages dropped too (i = 3 mod 4, which stay zero): room for compaction to move
        // pages into while the rounds below fault and take memory.
        for (int i = 3; i < f.Pages; i += 4)
        {
            Assert.That(f.Process.Madvise(f.AddressOf(i), Topology.PageSize, Advice.DontNeed), Is.EqualTo(Errno.None));
            versions[i] = 0;
        }
        using var stop = new CancellationTokenSource();
        var failures = new List<Exception>();
        var threads = new Thread[Writers];
        long ops = 0;
        for (int t = 0; t < Writers; t++)
        {
            int me = t;
            threads[t] = new Thread(() =>
            {
                try
                {
                    var random = new Random(TestEnvironment.Seed(17) + me);
                    var page = new byte[Topology.PageSize];
                    var read = new byte[Topology.PageSize];
                    while (!stop.IsCancellationRequested)
                    {
                        // Writer t owns the pages i = 1 mod 4 whose quarter index is t modulo Writers.
                        int quarter = random.Next(f.Pages / 4 / Writers) * Writers + me;
                        int i = 4 * quarter + 1;
                        if (i >= f.Pages)
                            continue;
                        switch (random.Next(4))
                        {
                            case 0:
                                versions[i] = Math.Max(1, versions[i] + 1);
                                Pattern(i, versions[i], page);
                                f.Process.Write(f.AddressOf(i), page);
                                break;
                            case 1:
                                Assert.That(f.Process.Madvise(f.AddressOf(i), Topology.PageSize, Advice.DontNeed), Is.EqualTo(Errno.None));
                                versions[i] = 0;
                                break;
                            default:
                                Pattern(i, versions[i], page);
                                f.Process.Read(f.AddressOf(i), read);
                                if (!page.AsSpan().SequenceEqual(read))
                                    throw new AssertionException($"page {i} (version {versions[i]}) differs at byte {page.AsSpan().CommonPrefixLength(read)}");
                                break;
                        }
                        Interlocked.Increment(ref ops);
                    }
                }
                catch (Exception e)
                {
                    lock (failures)
                        failures.Add(e);
                }
            }) { IsBackground = true, Name = $"writer{t}" };
            threads[t].Start();
        }

        int rounds = 6 * TestEnvironment.StressScale;
        var clock = Stopwatch.StartNew();
        long order9 = 0;
        for (int round = 0; round < rounds || (TestEnvironment.StressDuration is { } d && clock.Elapsed < d); round++)
        {
            if (round % 3 == 0)
                machine.Compaction.CompactMemory();
            // Fragment again with the even pages, which nobody else touches: all faulted in, every other
            // one dropped at once (scattered holes), the rest after this round.
            for (int i = 0; i < f.Pages; i += 2)
                f.Process.Write<long>(f.AddressOf(i), i);
            for (int i = 0; i < f.Pages; i += 4)
                Assert.That(f.Process.Madvise(f.AddressOf(i), Topology.PageSize, Advice.DontNeed), Is.EqualTo(Errno.None));
            // Take order-9 blocks (a few: compaction needs free memory to move pages into): they need
            // direct compaction under the writers; kcompactd is woken while they are held, then they go back.
            var held = new List<long>();
            for (int k = 0; k < 6; k++)
            {
                long pfn = machine.Allocator.AllocPages(9, AllocFlags.Movable);
                if (pfn == PageAllocator.NoPfn)
                    break;
                held.Add(pfn);
            }
            order9 += held.Count;
            machine.Compaction.WakeKcompactd(0, 9);
            Thread.Sleep(20);
            foreach (long pfn in held)
                machine.Allocator.FreePages(pfn, 9);
            for (int i = 2; i < f.Pages; i += 4)
                Assert.That(f.Process.Madvise(f.AddressOf(i), Topology.PageSize, Advice.DontNeed), Is.EqualTo(Errno.None));
            if (failures.Count > 0)
                break;
        }
        stop.Cancel();
        foreach (Thread thread in threads)
            thread.Join();
        CompactionStats stats = machine.Compaction.GetStats();
        TestContext.Out.WriteLine($"{clock.Elapsed.TotalSeconds:F0} s: {Interlocked.Read(ref ops)} writer operations, {stats.PagesMigrated} pages migrated by compaction " +
                                  $"({stats.PagesFailed} failed), {order9} order-9 allocations, stall {stats.Stall} / success {stats.Success}, " +
                                  $"kcompactd wakes {stats.DaemonWake}, daemon migrate_scanned {stats.DaemonMigrateScanned}");
        Assert.That(failures, Is.Empty, "no writer saw a wrong byte");
        Assert.That(Interlocked.Read(ref ops), Is.GreaterThan(0));
        Assert.That(machine.Compaction.GetStats().PagesMigrated, Is.GreaterThan(0), "compaction moved pages under the writers");
        Assert.That(order9, Is.GreaterThan(0), "order-9 allocations succeeded");

        var expected = new byte[Topology.PageSize];
        var actual = new byte[Topology.PageSize];
        for (int i = 1; i < f.Pages; i += 2)
        {
            Pattern(i, versions[i], expected);
            f.Process.Read(f.AddressOf(i), actual);
            Assert.That(actual.AsSpan().SequenceEqual(expected), Is.True, $"page {i} at the end");
        }
        machine.Compaction.StopDaemons(); // so that the audit sees a quiet machine
        TestMachines.AssertAuditClean(machine);
    }

    private static void Pattern(int index, int version, Span<byte> page)
    {
        if (version == 0)
        {
            page.Clear();
            return;
        }
        if (version < 0)
        {
            FragmentedMachine.Expected(index, page);
            return;
        }
        Span<ulong> words = MemoryMarshal.Cast<byte, ulong>(page);
        for (int w = 0; w < words.Length; w++)
            words[w] = ((ulong)index << 40) ^ ((ulong)version << 20) ^ (ulong)w;
    }
}
