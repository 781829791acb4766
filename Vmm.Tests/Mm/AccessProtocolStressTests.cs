using System.Diagnostics;
using Vmm.Mm;

namespace Vmm.Tests.Mm;

/// <summary>
/// The access protocol under fire: writer threads write known patterns into their pages while other
/// threads keep replacing those pages' frames (freeze with a migration entry, flush, verify, copy,
/// commit) and forking the process (write-protect, flush, copy-on-write). The oracle: every writer's
/// shadow of its own pages; every byte of every page must match it, no write may be lost, and no
/// process may see another's values.
/// </summary>
[TestFixture]
[Category("Stress")]
public sealed class AccessProtocolStressTests
{
    private const int PagesPerWriter = 16;
    private const int SlotsPerPage = 4096 / 8;

    [Test]
    public void No_write_is_lost_or_misplaced_while_frames_are_replaced_and_processes_fork()
    {
        // Poisoning turns a write into a freed frame into an exception at its next allocation.
        using var machine = TestMachines.Create(TestMachines.TwoNodes with { PoisonFreedFrames = true });
        // A shared mapping made before the fork: both processes map the same frames, through the page cache.
        VmProcess first = machine.CreateProcess(homeNode: 0);
        Assert.That(first.Mmap(0, PagesPerWriter * 4096UL, Protection.ReadWrite, MapFlags.Shared, out ulong sharedBase), Is.EqualTo(Errno.None));
        VmProcess[] processes = [first, first.Fork()];
        const int writersPerProcess = 2;
        int writesPerWriter = 20_000 * TestEnvironment.StressScale;
        long minReplacements = 2_000L * TestEnvironment.StressScale, minForks = 40L * TestEnvironment.StressScale;
        var safety = TimeSpan.FromSeconds(120);
        TimeSpan? duration = TestEnvironment.StressDuration;
        var stopwatch = Stopwatch.StartNew();

        var regions = new List<(VmProcess Process, ulong Base, int Writer)>();
        int writerId = 0;
        foreach (VmProcess p in processes)
        {
            for (int w = 0; w < writersPerProcess; w++)
                regions.Add((p, p.Mmap(PagesPerWriter * 4096UL), ++writerId));
        }

        var failures = new System.Collections.Concurrent.ConcurrentQueue<string>();
        int writersRunning = regions.Count + 1;
        long replaced = 0, forks = 0, busy = 0;
        using var start = new ManualResetEventSlim();

        // Reads one page through a process and reports every slot that differs from the shadow.
        void CheckPage(VmProcess process, ulong pageVa, ulong[] shadow, int page, byte[] buffer, string who)
        {
            process.Read(pageVa, buffer);
            for (int s = 0; s < SlotsPerPage; s++)
            {
                ulong seen = BitConverter.ToUInt64(buffer, s * 8);
                if (seen != shadow[page * SlotsPerPage + s])
                    failures.Enqueue($"{who}: page {page} slot {s} reads {seen:x}, wrote {shadow[page * SlotsPerPage + s]:x}");
            }
        }

        void Writer((VmProcess Process, ulong Base, int Writer) region)
        {
            start.Wait();
            var random = new Random(region.Writer);
            var shadow = new ulong[PagesPerWriter * SlotsPerPage];
            var buffer = new byte[4096];
            ulong tag = (ulong)region.Writer << 48;
            bool More(long i) => duration is { } d
                ? stopwatch.Elapsed < d
                : (i < writesPerWriter || Volatile.Read(ref replaced) < minReplacements || Volatile.Read(ref forks) < minForks) && stopwatch.Elapsed < safety;
            for (long i = 0; More(i); i++)
            {
                int slot = random.Next(shadow.Length);
                ulong value = tag | (ulong)(i + 1);
                region.Process.Write(region.Base + (ulong)slot * 8, value);
                shadow[slot] = value;
                if (i % 64 == 0)
                {
                    int page = random.Next(PagesPerWriter);
                    CheckPage(region.Process, region.Base + (ulong)page * 4096, shadow, page, buffer, $"writer {region.Writer}");
                }
            }
            // Every byte, one last time.
            for (int page = 0; page < PagesPerWriter; page++)
                CheckPage(region.Process, region.Base + (ulong)page * 4096, shadow, page, buffer, $"writer {region.Writer} at the end");
            Interlocked.Decrement(ref writersRunning);
        }

        // The shared writer writes through one process and checks through the other, which keeps
        // dropping its PTEs (DONTNEED keeps shared contents) so that it faults the pages in again while
        // the replacer moves them.
        void SharedWriter()
        {
            start.Wait();
            var random = new Random(1234);
            var shadow = new ulong[PagesPerWriter * SlotsPerPage];
            var buffer = new byte[4096];
            ulong tag = 0xFFUL << 48;
            bool More(long i) => duration is { } d
                ? stopwatch.Elapsed < d
                : (i < writesPerWriter || Volatile.Read(ref replaced) < minReplacements || Volatile.Read(ref forks) < minForks) && stopwatch.Elapsed < safety;
            for (long i = 0; More(i); i++)
            {
                int slot = random.Next(shadow.Length);
                ulong value = tag | (ulong)(i + 1);
                processes[0].Write(sharedBase + (ulong)slot * 8, value);
                shadow[slot] = value;
                if (i % 256 == 0)
                    processes[1].Madvise(sharedBase, PagesPerWriter * 4096UL, Advice.DontNeed);
                if (i % 16 == 0)
                {
                    int page = random.Next(PagesPerWriter);
                    CheckPage(processes[1], sharedBase + (ulong)page * 4096, shadow, page, buffer, "the shared writer, through the other process");
                }
            }
            Interlocked.Decrement(ref writersRunning);
        }

        void Replacer()
        {
            start.Wait();
            var random = new Random(99);
            while (Volatile.Read(ref writersRunning) > 0)
            {
                (VmProcess p, ulong baseVa, _) = random.Next(regions.Count + 1) is int r && r < regions.Count ? regions[r] : (processes[random.Next(2)], sharedBase, 0);
                ulong va = baseVa + (ulong)random.Next(PagesPerWriter) * 4096;
                Errno result = p.Mm.TryReplacePage(va, random.Next(2));
                if (result == Errno.None)
                    Interlocked.Increment(ref replaced);
                else if (result is Errno.EBUSY or Errno.EAGAIN or Errno.ENOENT or Errno.EFAULT)
                    Interlocked.Increment(ref busy);
                else
                    failures.Enqueue($"replace returned {result}");
            }
        }

        void Forker()
        {
            start.Wait();
            var random = new Random(7);
            var buffer = new byte[4096];
            while (Volatile.Read(ref writersRunning) > 0)
            {
                int index = random.Next(processes.Length);
                VmProcess child = processes[index].Fork();
                Interlocked.Increment(ref forks);
                // The child's copy holds only values its parent's writers wrote (or zero).
                foreach ((VmProcess owner, ulong baseVa, int writer) in regions)
                {
                    if (owner != processes[index])
                        continue;
                    child.Read(baseVa + (ulong)random.Next(PagesPerWriter) * 4096, buffer);
                    for (int s = 0; s < SlotsPerPage; s++)
                    {
                        ulong seen = BitConverter.ToUInt64(buffer, s * 8);
                        if (seen != 0 && (int)(seen >> 48) != writer)
                            failures.Enqueue($"a child of {owner} sees value {seen:x} in writer {writer}'s page");
                    }
                }
                child.Write<ulong>(regions[index * writersPerProcess].Base, 0xDEAD); // a COW break in the child only
                child.Exit();
                Thread.Sleep(1);
            }
        }

        Thread[] threads =
        [
            .. regions.Select(r => new Thread(() => Writer(r))),
            new Thread(SharedWriter),
            new Thread(Replacer),
            new Thread(Forker),
        ];
        foreach (Thread t in threads)
            t.Start();
        start.Set();
        foreach (Thread t in threads)
            t.Join();

        Assert.That(failures, Is.Empty, string.Join("\n", failures.Take(10)));
        Assert.That(replaced, Is.GreaterThanOrEqualTo(duration is null ? minReplacements : 1), $"frames were really replaced under the writers ({busy} attempts backed off)");
        Assert.That(forks, Is.GreaterThanOrEqualTo(duration is null ? minForks : 1));
        Assert.That(machine.Audit(), Is.Empty);
        foreach (VmProcess p in processes)
            p.Exit();
        Assert.That(machine.Audit(), Is.Empty);
        TestContext.Out.WriteLine($"replaced {replaced} frames ({busy} backed off), {forks} forks, {TlbShootdown.Flushes} flushes");
    }
}
