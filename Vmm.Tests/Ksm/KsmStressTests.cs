using System.Collections.Concurrent;
using System.Diagnostics;
using Vmm.Mm;

namespace Vmm.Tests.Ksm;

/// <summary>
/// KSM under fire: writer threads in several processes keep writing duplicate-rich contents (whole
/// pages from a small set of patterns, and single words) into mergeable memory while ksmd scans at full
/// speed, another thread toggles MERGEABLE / UNMERGEABLE on ranges and moves pages between nodes, and
/// a forker forks a process, checks the child against a snapshot and lets it exit. The oracle: each
/// writer's shadow of its pages; every byte must match it at every check and at the end, so a write
/// lost in a merge, a write that leaked into a shared KSM page (seen by other writers) or a merge of
/// pages that were not equal all fail the test. Freed frames are poisoned.
/// </summary>
[TestFixture]
[Category("Stress")]
[Category("Ksm")]
public sealed class KsmStressTests
{
    private const int PagesPerWriter = 24;
    private const int Words = 4096 / 8;

    [Test]
    public void No_write_is_lost_or_misplaced_while_ksmd_merges_at_full_speed()
    {
        using var machine = TestMachines.Create(TestMachines.TwoLargeNodes with { PoisonFreedFrames = true });
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("max_page_sharing", "3"), Is.EqualTo(Errno.None)); // chains and dups too
        Assert.That(ksm.Write("use_zero_pages", "1"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("stable_node_chains_prune_millisecs", "5"), Is.EqualTo(Errno.None));
        VmProcess[] processes = [machine.CreateProcess(homeNode: 0), machine.CreateProcess(homeNode: 1)];
        const int writersPerProcess = 2;
        int opsPerWriter = 20_000 * TestEnvironment.StressScale;
        TimeSpan? duration = TestEnvironment.StressDuration;
        var safety = TimeSpan.FromSeconds(120);
        var stopwatch = Stopwatch.StartNew();
        var failures = new ConcurrentQueue<string>();

        var regions = new List<(VmProcess Process, ulong Base, int Writer)>();
        int id = 0;
        foreach (VmProcess p in processes)
        {
            for (int w = 0; w < writersPerProcess; w++)
            {
                ulong va = p.Mmap(PagesPerWriter * 4096UL);
                Assert.That(p.Madvise(va, PagesPerWriter * 4096UL, Advice.Mergeable), Is.EqualTo(Errno.None));
                regions.Add((p, va, ++id));
            }
        }
        var shadows = regions.Select(_ => new ulong[PagesPerWriter * Words]).ToArray();
        for (int r = 0; r < regions.Count; r++)
        {
            // Start duplicate-rich: every page holds pattern 1, so the first passes already merge.
            for (int w = 0; w < PagesPerWriter * Words; w++)
                shadows[r][w] = PatternWord(1, w % Words);
            byte[] initial = new byte[PagesPerWriter * 4096];
            Buffer.BlockCopy(shadows[r], 0, initial, 0, initial.Length);
            regions[r].Process.Write(regions[r].Base, initial);
        }
        var shadowLocks = regions.Select(_ => new object()).ToArray();
        int writersRunning = regions.Count;
        long checks = 0, maxSharing = 0;
        using var start = new ManualResetEventSlim();

        static ulong PatternWord(int pattern, int word) => pattern == 0 ? 0 : 0x0101_0101_0101_0101UL * (ulong)pattern ^ (ulong)word;

        void CheckPage(VmProcess process, ulong pageVa, ulong[] shadow, int page, byte[] buffer, string who)
        {
            process.Read(pageVa, buffer);
            for (int s = 0; s < Words; s++)
            {
                ulong seen = BitConverter.ToUInt64(buffer, s * 8);
                if (seen != shadow[page * Words + s])
                {
                    failures.Enqueue($"{who}: page {page} word {s} reads {seen:x}, expected {shadow[page * Words + s]:x}");
                    return;
                }
            }
            Interlocked.Increment(ref checks);
        }

        void Writer(int index)
        {
            (VmProcess process, ulong baseVa, int writer) = regions[index];
            ulong[] shadow = shadows[index];
            start.Wait();
            var random = new Random(TestEnvironment.Seed(writer));
            byte[] page = new byte[4096], buffer = new byte[4096];
            try
            {
                for (long i = 0; duration is { } d ? stopwatch.Elapsed < d : i < opsPerWriter && stopwatch.Elapsed < safety; i++)
                {
                    int target = random.Next(PagesPerWriter);
                    ulong pageVa = baseVa + (ulong)target * 4096;
                    int choice = random.Next(100);
                    lock (shadowLocks[index])
                    {
                        if (choice < 55)
                        {
                            // A whole page from a small set of patterns (0 is zero-filled): duplicates everywhere.
                            int pattern = random.Next(4);
                            for (int w = 0; w < Words; w++)
                            {
                                ulong v = PatternWord(pattern, w);
                                BitConverter.TryWriteBytes(page.AsSpan(w * 8), v);
                                shadow[target * Words + w] = v;
                            }
                            process.Write(pageVa, page);
                        }
                        else if (choice < 75)
                        {
                            // One word: the page becomes unique (until rewritten).
                            int w = random.Next(Words);
                            ulong v = ((ulong)writer << 56) | (ulong)(i + 1);
                            process.Write(pageVa + (ulong)w * 8, v);
                            shadow[target * Words + w] = v;
                        }
                    }
                    if (choice >= 75)
                        lock (shadowLocks[index])
                            CheckPage(process, pageVa, shadow, target, buffer, $"writer {writer}");
                    if (!failures.IsEmpty)
                        return;
                }
            }
            catch (Exception e)
            {
                failures.Enqueue($"writer {writer}: {e}");
            }
            finally
            {
                Interlocked.Decrement(ref writersRunning);
            }
        }

        // Toggles merging on ranges (unmerge copies everything back) and moves pages between nodes.
        void Meddler()
        {
            start.Wait();
            var random = new Random(TestEnvironment.Seed(99));
            try
            {
                while (Volatile.Read(ref writersRunning) > 0 && failures.IsEmpty)
                {
                    (VmProcess process, ulong baseVa, _) = regions[random.Next(regions.Count)];
                    ulong from = baseVa + (ulong)random.Next(PagesPerWriter) * 4096;
                    switch (random.Next(12))
                    {
                        case 0 or 1 or 2:
                            process.Madvise(from, 4 * 4096, Advice.Unmergeable);
                            process.Madvise(from, 4 * 4096, Advice.Mergeable);
                            break;
                        case 3:
                            // A dedupe domain change (unmerges the range first); back to 0 next time round.
                            process.SetDedupeDomain(from, 2 * 4096, (ushort)random.Next(2));
                            break;
                        case 4:
                            // The whole process unmergeable for a moment: ksmd may drop its slot meanwhile.
                            foreach (var region in regions.Where(r => r.Process == process))
                                process.Madvise(region.Base, PagesPerWriter * 4096UL, Advice.Unmergeable);
                            Thread.Yield();
                            foreach (var region in regions.Where(r => r.Process == process))
                                process.Madvise(region.Base, PagesPerWriter * 4096UL, Advice.Mergeable);
                            break;
                        case 5 when random.Next(8) == 0:
                            // Unmerge everything, then merge again.
                            if (ksm.Write("run", "2") is not (Errno.None or Errno.ENOMEM))
                                failures.Enqueue("run=2 failed");
                            ksm.Write("run", "1");
                            break;
                        default:
                            process.Mm.TryReplacePage(from, random.Next(2));
                            break;
                    }
                    Interlocked.Exchange(ref maxSharing, Math.Max(Volatile.Read(ref maxSharing), ksm.GetStats().PagesSharing));
                }
            }
            catch (Exception e)
            {
                failures.Enqueue($"meddler: {e}");
            }
        }

        // Forks the first process; the child must see exactly what the parent's writers had written
        // when the fork ran (the fork takes the writers' locks for a consistent snapshot).
        void Forker()
        {
            start.Wait();
            byte[] buffer = new byte[4096];
            try
            {
                while (Volatile.Read(ref writersRunning) > 0 && failures.IsEmpty)
                {
                    int[] mine = [.. Enumerable.Range(0, regions.Count).Where(r => regions[r].Process == processes[0])];
                    ulong[][] snapshot;
                    VmProcess child;
                    foreach (int r in mine)
                        Monitor.Enter(shadowLocks[r]);
                    try
                    {
                        child = processes[0].Fork();
                        snapshot = [.. mine.Select(r => (ulong[])shadows[r].Clone())];
                    }
                    finally
                    {
                        foreach (int r in mine)
                            Monitor.Exit(shadowLocks[r]);
                    }
                    for (int k = 0; k < mine.Length; k++)
                        for (int page = 0; page < PagesPerWriter; page++)
                            CheckPage(child, regions[mine[k]].Base + (ulong)page * 4096, snapshot[k], page, buffer, $"child of writer {regions[mine[k]].Writer}");
                    child.Exit();
                    Thread.Sleep(5);
                }
            }
            catch (Exception e)
            {
                failures.Enqueue($"forker: {e}");
            }
        }

        Assert.That(ksm.Write("pages_to_scan", "500"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("sleep_millisecs", "0"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("run", "1"), Is.EqualTo(Errno.None));
        var threads = Enumerable.Range(0, regions.Count).Select(i => new Thread(() => Writer(i)))
            .Append(new Thread(Meddler)).Append(new Thread(Forker)).ToList();
        threads.ForEach(t => t.Start());
        start.Set();
        threads.ForEach(t => t.Join());
        Assert.That(ksm.Write("run", "0"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Failure, Is.Null, "ksmd did not stop on an exception");
        Assert.That(failures, Is.Empty, string.Join("\n", failures.Take(10)));

        // Merge what is left, then every byte of every region against its shadow.
        ksm.RunFullScans(3);
        KsmStats stats = ksm.GetStats();
        Assert.That(Math.Max(maxSharing, stats.PagesSharing) + stats.KsmZeroPages, Is.GreaterThan(0), "merging happened");
        Assert.That(stats.CowKsm, Is.GreaterThan(0), "writes broke sharing");
        byte[] check = new byte[4096];
        for (int r = 0; r < regions.Count; r++)
            for (int page = 0; page < PagesPerWriter; page++)
                CheckPage(regions[r].Process, regions[r].Base + (ulong)page * 4096, shadows[r], page, check, $"final check of writer {regions[r].Writer}");
        Assert.That(failures, Is.Empty, string.Join("\n", failures.Take(10)));
        Assert.That(machine.Audit(), Is.Empty);
        TestContext.Out.WriteLine($"{checks} page checks, {stats}");
    }
}
